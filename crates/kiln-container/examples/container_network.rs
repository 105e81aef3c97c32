//! What `dockerNetwork=bridge` costs a container action: runs `true` in
//! the test base image through the `docker` and `podman` backends with
//! `dockerNetwork=off` and `bridge`, the modes alternating in rounds so
//! both see the same machine state, and prints each backend's and mode's
//! mean and median milliseconds per action and the difference. Uses only
//! the backends' public API as it stood before the isolated networks, so
//! the same file measures the runtime-default bridge it replaced. Needs
//! root, dockerd, podman and the test images (`tests/images/build.sh`).
//!
//! `cargo run -p kiln-container --example container_network [ROUNDS] [PER_ROUND]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_container::{Docker, DockerConfig, Podman, PodmanConfig};
use kiln_platform::{Platform, PropertySources};
use kiln_worker::{CancellationToken, CommandSpec, Isolation, Limits};

const IMAGE: &str = "docker://127.0.0.1:5000/kiln-test/base:latest";

fn spec(root: &std::path::Path, network: &str) -> CommandSpec {
    let workspace = root.join("workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    let properties = [
        ("container-image".to_string(), IMAGE.to_string()),
        ("dockerNetwork".to_string(), network.to_string()),
    ];
    let platform = Platform::parse(&PropertySources {
        action: &properties,
        ..Default::default()
    })
    .unwrap();
    CommandSpec {
        arguments: vec!["true".into()],
        environment_variables: vec![("PATH".into(), "/usr/bin:/bin".into())],
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
    let argument = |n: usize, default: u32| {
        std::env::args()
            .nth(n)
            .and_then(|value| value.parse().ok())
            .unwrap_or(default)
    };
    let (rounds, per_round) = (argument(1, 10), argument(2, 10));
    let (docker, podman) = tokio::join!(
        Docker::probe(DockerConfig::default()),
        Podman::probe(PodmanConfig::default())
    );
    let backends: Vec<Box<dyn Isolation>> = vec![
        Box::new(docker.unwrap_or_else(|reason| panic!("no docker: {reason}"))),
        Box::new(podman.unwrap_or_else(|reason| panic!("no podman: {reason}"))),
    ];
    let limits = Limits {
        timeout: Duration::from_secs(60),
        grace: Duration::from_secs(1),
        memory_bytes: None,
        cpu_millis: None,
        pids_max: Some(1024),
    };
    let root = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let modes = ["off", "bridge"];
    let specs = modes.map(|mode| spec(&root.path().join(mode), mode));
    // One untimed run of each first: the pull, lazily created state.
    for backend in &backends {
        for spec in &specs {
            backend.prepare(&spec.platform, &cancel).await.unwrap();
            let outcome = backend.run(spec, &limits, &cancel).await.unwrap();
            assert_eq!(outcome.exit_code, 0, "{}", backend.name());
        }
    }
    let mut times = vec![[Vec::new(), Vec::new()]; backends.len()];
    for _ in 0..rounds {
        for (backend, times) in backends.iter().zip(times.iter_mut()) {
            for (spec, times) in specs.iter().zip(times.iter_mut()) {
                for _ in 0..per_round {
                    let start = Instant::now();
                    backend.prepare(&spec.platform, &cancel).await.unwrap();
                    let outcome = backend.run(spec, &limits, &cancel).await.unwrap();
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(outcome.exit_code, 0, "{}", backend.name());
                }
            }
        }
    }
    println!("{rounds} rounds of {per_round} actions per backend and mode, alternating");
    for (backend, times) in backends.iter().zip(times.iter_mut()) {
        let [off, bridge] = times;
        let (off_mean, off_median) = summary(off);
        let (bridge_mean, bridge_median) = summary(bridge);
        println!(
            "{}: off {off_mean:.1} / {off_median:.1} ms, bridge {bridge_mean:.1} / {bridge_median:.1} ms \
             (mean / median); bridge - off: {:+.1} / {:+.1} ms",
            backend.name(),
            bridge_mean - off_mean,
            bridge_median - off_median
        );
    }
}
