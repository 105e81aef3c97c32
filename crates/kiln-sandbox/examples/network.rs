//! What a private bridged network costs a sandboxed action: runs
//! `/bin/true` through `sandbox` with `dockerNetwork=off` and `bridge`,
//! alternating in rounds so both see the same machine state, and prints
//! each mode's mean and median milliseconds per action and their
//! difference. Needs root and nftables.
//!
//! `cargo run --release -p kiln-sandbox --example network [ROUNDS] [PER_ROUND]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_platform::{DockerNetwork, Platform};
use kiln_sandbox::{Sandbox, SandboxConfig};
use kiln_worker::{CancellationToken, CommandSpec, Isolation, Limits};

fn spec(root: &std::path::Path, network: DockerNetwork) -> CommandSpec {
    let workspace = root.join("workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    let mut platform = Platform::default();
    platform.docker_network = Some(network);
    CommandSpec {
        arguments: vec!["/bin/true".into()],
        environment_variables: Vec::new(),
        workspace: workspace.clone(),
        working_directory: workspace,
        stdout_path: root.join("stdout"),
        stderr_path: root.join("stderr"),
        output: None,
        platform: Arc::new(platform),
        action_user: None,
        runner_tmp: None,
        output_paths: Vec::new(),
        owned_directories: Vec::new(),
        input_digests: None,
        stored_outputs: None,
    }
}

fn summary(times: &mut [f64]) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    (mean, times[times.len() / 2])
}

#[tokio::main]
async fn main() {
    let rounds: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let per_round: u32 = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(25);
    let sandbox = Sandbox::probe(SandboxConfig::default())
        .await
        .unwrap_or_else(|reason| {
            eprintln!("no sandbox: {reason}");
            std::process::exit(1);
        });
    if let Err(reason) = sandbox.bridge_network() {
        eprintln!("no bridged network: {reason}");
        std::process::exit(1);
    }
    let limits = Limits {
        timeout: Duration::from_secs(60),
        grace: Duration::from_secs(1),
        memory_bytes: Some(1 << 30),
        cpu_millis: Some(2000),
        pids_max: Some(1024),
    };
    let root = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let modes = [DockerNetwork::Off, DockerNetwork::Bridge];
    let specs = modes.map(|mode| spec(&root.path().join(format!("{mode:?}")), mode));
    // One untimed run of each first: page cache, lazily created state.
    for spec in &specs {
        sandbox.run(spec, &limits, &cancel).await.unwrap();
    }
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (spec, times) in specs.iter().zip(times.iter_mut()) {
            for _ in 0..per_round {
                let start = Instant::now();
                let outcome = sandbox.run(spec, &limits, &cancel).await.unwrap();
                times.push(start.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(outcome.exit_code, 0);
            }
        }
    }
    println!(
        "{rounds} rounds x {per_round} x /bin/true per mode, alternating (sandbox, limits, no dockerInit)"
    );
    let [off, bridge] = &mut times;
    let (off_mean, off_median) = summary(off);
    let (bridge_mean, bridge_median) = summary(bridge);
    println!(
        "{:<24} {:>9} {:>9}",
        "dockerNetwork", "mean ms", "median ms"
    );
    println!("{:<24} {off_mean:9.3} {off_median:9.3}", "off");
    println!("{:<24} {bridge_mean:9.3} {bridge_median:9.3}", "bridge");
    println!(
        "{:<24} {:9.3} {:9.3}",
        "bridge - off",
        bridge_mean - off_mean,
        bridge_median - off_median
    );
}
