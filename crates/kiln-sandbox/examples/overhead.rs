//! What a sandbox costs per action: runs `/bin/true` N times (default 200)
//! through `none` and through `sandbox` (with and without a network
//! namespace, with and without cgroup limits) and prints the mean
//! milliseconds per action. Needs root.
//!
//! `cargo run --release -p kiln-sandbox --example overhead [N] [BALLAST_MIB]`
//!
//! BALLAST_MIB makes this process resident in that much more memory first,
//! as a busy executor would be: forks copy page tables, so the sandbox's
//! start cost grows with the executor's resident size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_platform::{DockerNetwork, Platform};
use kiln_sandbox::{Sandbox, SandboxConfig};
use kiln_worker::{CancellationToken, CommandSpec, Isolation, Limits, NoIsolation};

async fn measure(
    label: &str,
    isolation: &dyn Isolation,
    network: DockerNetwork,
    docker_init: bool,
    limits: &Limits,
    count: u32,
) {
    let root = tempfile::tempdir().unwrap();
    let workspace = root.path().join("workspace");
    std::fs::create_dir(&workspace).unwrap();
    let mut platform = Platform::default();
    platform.docker_network = Some(network);
    platform.docker_init = docker_init;
    let spec = CommandSpec {
        arguments: vec!["/bin/true".into()],
        environment_variables: Vec::new(),
        workspace: workspace.clone(),
        working_directory: workspace,
        stdout_path: root.path().join("stdout"),
        stderr_path: root.path().join("stderr"),
        output: None,
        platform: Arc::new(platform),
        action_user: None,
        runner_tmp: None,
        output_paths: Vec::new(),
        owned_directories: Vec::new(),
        input_digests: None,
        stored_outputs: None,
    };
    let cancel = CancellationToken::new();
    // One untimed run first: page cache, lazily created state.
    isolation.run(&spec, limits, &cancel).await.unwrap();
    let start = Instant::now();
    for _ in 0..count {
        let outcome = isolation.run(&spec, limits, &cancel).await.unwrap();
        assert_eq!(outcome.exit_code, 0);
    }
    let per_action = start.elapsed().as_secs_f64() * 1000.0 / f64::from(count);
    println!("{label:<40} {per_action:7.3} ms/action");
}

#[tokio::main]
async fn main() {
    let count: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let ballast_mib: usize = std::env::args()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let ballast = vec![1u8; ballast_mib << 20];
    let sandbox = Sandbox::probe(SandboxConfig::default())
        .await
        .unwrap_or_else(|reason| {
            eprintln!("no sandbox: {reason}");
            std::process::exit(1);
        });
    let unlimited = Limits {
        timeout: Duration::from_secs(60),
        grace: Duration::from_secs(1),
        memory_bytes: None,
        cpu_millis: None,
        pids_max: None,
    };
    let limited = Limits {
        memory_bytes: Some(1 << 30),
        cpu_millis: Some(2000),
        pids_max: Some(1024),
        ..unlimited
    };
    println!("{count} x /bin/true, {ballast_mib} MiB ballast");
    measure(
        "none",
        &NoIsolation,
        DockerNetwork::Bridge,
        false,
        &unlimited,
        count,
    )
    .await;
    for (label, network, docker_init, limits) in [
        (
            "sandbox, network=bridge, limits",
            DockerNetwork::Bridge,
            false,
            &limited,
        ),
        (
            "sandbox, network=off, limits",
            DockerNetwork::Off,
            false,
            &limited,
        ),
        (
            "sandbox, network=off, no limits",
            DockerNetwork::Off,
            false,
            &unlimited,
        ),
        (
            "sandbox, network=off, limits, dockerInit",
            DockerNetwork::Off,
            true,
            &limited,
        ),
    ] {
        measure(label, &sandbox, network, docker_init, limits, count).await;
    }
    drop(std::hint::black_box(ballast));
}
