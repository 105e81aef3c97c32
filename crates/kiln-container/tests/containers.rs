//! End-to-end tests of the `docker` and `podman` backends against the real
//! dockerd, podman and the two local registries, with the images
//! `tests/images/build.sh` builds (run once per test process). Each case
//! runs for both runtimes. Without the services a test prints
//! `skipped: <reason>` and passes (`scripts/services.sh start` brings them
//! up), except under CI, where a missing service fails the test.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_container::image::{ImageStore, Images};
use kiln_container::{
    Docker, DockerConfig, ImageConfig, NetworkConfig, Podman, PodmanConfig, ResolvedImage,
};
use kiln_platform::{Platform, PropertySources, RegistryCredentials};
use kiln_worker::{
    CancellationToken, CommandSpec, Isolation, Limits, ProcessOutcome, Resident, RunError,
    StopReason,
};

#[path = "../../kiln-sandbox/tests/support/outside.rs"]
mod outside;
use outside::{connect_script, was_reached, Outside};

const BASE: &str = "127.0.0.1:5000/kiln-test/base:latest";
const NONROOT: &str = "127.0.0.1:5000/kiln-test/nonroot:latest";
const ENTRYPOINT: &str = "127.0.0.1:5000/kiln-test/entrypoint:latest";
const PRIVATE: &str = "127.0.0.1:5001/kiln-test/private:latest";
const USER: &str = "kiln";
const PASSWORD: &str = "Kiln-Test-Secret-7f3a9c";

/// Says why a case is skipped, straight to stderr (the harness captures
/// `eprintln!`, and a skip must show in a passing run). Under CI, which
/// starts every service (`scripts/services.sh start`), a skip is a failure.
macro_rules! skipped {
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        if std::env::var_os("CI").is_some() {
            panic!("{line} (CI must provide dockerd, podman and the registries)");
        }
        use std::io::Write as _;
        let _ = std::io::stderr().write_all(format!("\n{line}\n").as_bytes());
    }};
}

/// One runtime for the whole process: the backends (and bollard's
/// connection pool) live as long as it.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

struct Services {
    /// `image:tag` → `image@sha256:…`, from build.sh's output.
    pinned: HashMap<String, String>,
    docker: Result<Arc<Docker>, String>,
    podman: Result<Arc<Podman>, String>,
}

/// Builds the images once and probes both backends once.
fn services() -> Result<&'static Services, String> {
    static SERVICES: OnceLock<Result<Services, String>> = OnceLock::new();
    SERVICES
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/images/build.sh");
            let script = std::env::var_os("KILN_TEST_IMAGES_SCRIPT")
                .map(PathBuf::from)
                .unwrap_or(script);
            let built = std::process::Command::new("bash")
                .arg(&script)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !built.status.success() {
                return Err(format!(
                    "{} failed (are dockerd, podman and the registries up? scripts/services.sh start): {}",
                    script.display(),
                    String::from_utf8_lossy(&built.stderr).trim()
                ));
            }
            let pinned = String::from_utf8_lossy(&built.stdout)
                .lines()
                .filter_map(|line| {
                    let (name, digest) = line.split_once('@')?;
                    Some((name.to_string(), format!("{}@{digest}", name.rsplit_once(':')?.0)))
                })
                .collect();
            // An owner of their own: the probes remove what earlier runs of
            // these tests left, never the containers of anything else.
            let owner = Some("kiln-container-tests".to_string());
            let (docker, podman) = runtime().block_on(async {
                tokio::join!(
                    Docker::probe(DockerConfig {
                        owner: owner.clone(),
                        ..Default::default()
                    }),
                    Podman::probe(PodmanConfig {
                        owner,
                        ..Default::default()
                    })
                )
            });
            Ok(Services {
                pinned,
                docker: docker.map(Arc::new),
                podman: podman.map(Arc::new),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The backends to run a case with; prints why one is skipped.
fn backends(test: &str) -> Vec<Arc<dyn Isolation>> {
    let services = match services() {
        Ok(services) => services,
        Err(reason) => {
            skipped!("skipped: {test}: {reason}");
            return Vec::new();
        }
    };
    let mut found: Vec<Arc<dyn Isolation>> = Vec::new();
    match &services.docker {
        Ok(docker) => found.push(docker.clone()),
        Err(reason) => skipped!("skipped: {test} with docker: {reason}"),
    }
    match &services.podman {
        Ok(podman) => found.push(podman.clone()),
        Err(reason) => skipped!("skipped: {test} with podman: {reason}"),
    }
    found
}

fn platform(properties: &[(&str, &str)]) -> Platform {
    let properties: Vec<(String, String)> = properties
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Platform::parse(&PropertySources {
        action: &properties,
        ..Default::default()
    })
    .unwrap()
}

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(600),
        grace: Duration::from_secs(1),
        memory_bytes: None,
        cpu_millis: Some(1000),
        pids_max: Some(1000),
    }
}

/// One action's directories, as the runner lays them out.
struct Action {
    /// Holds the directories until the action is dropped.
    _dir: tempfile::TempDir,
    spec: CommandSpec,
}

impl Action {
    fn new(platform: Platform, arguments: &[&str]) -> Action {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("workspace");
        let io = dir.path().join("io");
        std::fs::create_dir(&workspace).unwrap();
        std::fs::create_dir(&io).unwrap();
        // The runner's modes: 0777 with nonroot-workspace, else 0755.
        let mode = if platform.nonroot_workspace {
            0o777
        } else {
            0o755
        };
        std::fs::set_permissions(&workspace, std::fs::Permissions::from_mode(mode)).unwrap();
        Action {
            spec: CommandSpec {
                arguments: arguments.iter().map(|a| a.to_string()).collect(),
                environment_variables: vec![
                    ("PATH".into(), "/usr/bin:/bin".into()),
                    ("KILN_TEST".into(), "from the command".into()),
                ],
                working_directory: workspace.clone(),
                workspace,
                stdout_path: io.join("stdout"),
                stderr_path: io.join("stderr"),
                output: None,
                platform: Arc::new(platform),
                action_user: None,
                runner_tmp: None,
                output_paths: Vec::new(),
                owned_directories: Vec::new(),
                input_digests: None,
                stored_outputs: None,
            },
            _dir: dir,
        }
    }

    fn workspace(&self) -> &Path {
        &self.spec.workspace
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.spec.stdout_path).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.spec.stderr_path).unwrap_or_default()
    }

    /// Prepares (the pull) and runs it as the runner does.
    async fn run(
        &self,
        backend: &dyn Isolation,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        backend.prepare(&self.spec.platform, cancel).await?;
        backend.run(&self.spec, limits, cancel).await
    }
}

/// Runs `arguments` in `image` with `properties` on `backend`.
async fn run(
    backend: &dyn Isolation,
    image: &str,
    properties: &[(&str, &str)],
    arguments: &[&str],
) -> (ProcessOutcome, Action) {
    let mut all = vec![("container-image", image)];
    all.extend_from_slice(properties);
    let action = Action::new(platform(&all), arguments);
    let outcome = action
        .run(backend, &limits(), &CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", backend.name()));
    (outcome, action)
}

fn cli(runtime: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(runtime)
        .args(args)
        .output()
        .unwrap()
}

/// Containers of either runtime whose id starts with `id`.
fn containers_with_id(runtime: &str, id: &str) -> String {
    let output = cli(
        runtime,
        &["ps", "-a", "-q", "--filter", "label=kiln.action=1"],
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with(id) || id.starts_with(line.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn the_action_runs_in_the_image_with_its_arguments_and_environment() {
    for backend in backends("runs_in_the_image") {
        runtime().block_on(async {
            let script =
                "test -e /bin/busybox && test ! -e /etc/os-release && echo \"out $KILN_TEST\" \
                          && echo err >&2 && env > env.txt; exit 3";
            let (outcome, action) = run(&*backend, BASE, &[], &["sh", "-c", script]).await;
            let name = backend.name();
            assert_eq!(outcome.exit_code, 3, "{name}: {}", action.stderr());
            assert_eq!(action.stdout(), "out from the command\n", "{name}");
            assert_eq!(
                action.stderr(),
                "err\n",
                "{name}: the image's CMD must not run"
            );
            assert_eq!(outcome.stopped, None);
            assert!(!outcome.memory_exceeded);
            let env = std::fs::read_to_string(action.workspace().join("env.txt")).unwrap();
            assert!(env.contains("KILN_TEST=from the command"), "{name}: {env}");
            assert!(
                !env.contains("CARGO"),
                "{name}: the executor's environment leaked: {env}"
            );
        });
    }
}

#[test]
fn an_image_named_by_digest_runs() {
    for backend in backends("image_by_digest") {
        runtime().block_on(async {
            let pinned = services().unwrap().pinned[BASE].clone();
            let (outcome, action) = run(&*backend, &pinned, &[], &["echo", "pinned"]).await;
            assert_eq!(
                outcome.exit_code,
                0,
                "{}: {}",
                backend.name(),
                action.stderr()
            );
            assert_eq!(action.stdout(), "pinned\n");
        });
    }
}

#[test]
fn the_entrypoint_is_kept_and_receives_the_arguments() {
    for backend in backends("entrypoint") {
        runtime().block_on(async {
            let (outcome, action) =
                run(&*backend, ENTRYPOINT, &[], &["echo", "hello", "world"]).await;
            let name = backend.name();
            assert_eq!(outcome.exit_code, 0, "{name}: {}", action.stderr());
            assert_eq!(action.stdout(), "hello world\n", "{name}");
            assert!(
                action
                    .stderr()
                    .contains("entrypoint wrapper saw: echo hello world"),
                "{name}: {}",
                action.stderr()
            );
            assert!(!action.stderr().contains("image CMD ran"), "{name}");
        });
    }
}

#[test]
fn a_command_that_does_not_exist_exits_127() {
    for backend in backends("command_not_found") {
        runtime().block_on(async {
            let (outcome, action) = run(&*backend, BASE, &[], &["no-such-command"]).await;
            assert_eq!(
                outcome.exit_code,
                127,
                "{}: {}",
                backend.name(),
                action.stderr()
            );
            assert!(
                action.stderr().contains("no-such-command"),
                "{}",
                action.stderr()
            );
        });
    }
}

/// An image, its properties, and what `id -u`:`id -g` prints in it.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn docker_user_and_run_as_root_choose_the_user() {
    for backend in backends("docker_user") {
        runtime().block_on(async {
            let name = backend.name();
            let cases: [Case; 6] = [
                (BASE, &[], "0:0"),
                // The image's /etc/passwd gives uid 1000 (builder) group 1000.
                (BASE, &[("dockerUser", "1000")], "1000:1000"),
                (BASE, &[("dockerUser", "1000:1000")], "1000:1000"),
                (BASE, &[("dockerUser", "builder")], "1000:1000"),
                (NONROOT, &[], "1000:1000"),
                (NONROOT, &[("dockerRunAsRoot", "true")], "0:0"),
            ];
            for (image, properties, expected) in cases {
                let (outcome, action) = run(
                    &*backend,
                    image,
                    properties,
                    &["sh", "-c", "echo $(id -u):$(id -g)"],
                )
                .await;
                assert_eq!(
                    outcome.exit_code,
                    0,
                    "{name} {properties:?}: {}",
                    action.stderr()
                );
                assert_eq!(
                    action.stdout().trim(),
                    expected,
                    "{name} {image} {properties:?}"
                );
            }
        });
    }
}

#[test]
fn a_nonroot_user_writes_the_workspace_only_with_nonroot_workspace() {
    for backend in backends("nonroot_workspace") {
        runtime().block_on(async {
            let name = backend.name();
            let write = ["sh", "-c", "echo written > made-by-user"];
            let (outcome, action) = run(&*backend, NONROOT, &[], &write).await;
            assert_ne!(
                outcome.exit_code, 0,
                "{name}: a 0755 root workspace must not be writable"
            );
            assert!(!action.workspace().join("made-by-user").exists());

            let (outcome, action) =
                run(&*backend, NONROOT, &[("nonroot-workspace", "true")], &write).await;
            assert_eq!(outcome.exit_code, 0, "{name}: {}", action.stderr());
            let written = std::fs::read_to_string(action.workspace().join("made-by-user")).unwrap();
            assert_eq!(written, "written\n");
        });
    }
}

#[test]
fn outputs_appear_in_the_workspace_on_the_host_and_the_working_directory_is_set() {
    for backend in backends("outputs") {
        runtime().block_on(async {
            let mut action = Action::new(
                platform(&[("container-image", BASE)]),
                &[
                    "sh",
                    "-c",
                    "pwd > where; mkdir -p ../out/dir && echo data > ../out/dir/file",
                ],
            );
            std::fs::write(action.workspace().join("input.txt"), "input").unwrap();
            let sub = action.workspace().join("sub");
            std::fs::create_dir(&sub).unwrap();
            action.spec.working_directory = sub.clone();
            let outcome = action
                .run(&*backend, &limits(), &CancellationToken::new())
                .await
                .unwrap();
            assert_eq!(
                outcome.exit_code,
                0,
                "{}: {}",
                backend.name(),
                action.stderr()
            );
            let workspace = action.workspace();
            assert_eq!(
                std::fs::read_to_string(sub.join("where")).unwrap().trim(),
                sub.display().to_string()
            );
            assert_eq!(
                std::fs::read_to_string(workspace.join("out/dir/file")).unwrap(),
                "data\n"
            );
        });
    }
}

#[test]
fn docker_network_off_leaves_only_loopback() {
    for backend in backends("network") {
        runtime().block_on(async {
            let name = backend.name();
            let list = ["sh", "-c", "ls /sys/class/net | sort | tr '\\n' ' '"];
            let (outcome, action) = run(&*backend, BASE, &[("dockerNetwork", "off")], &list).await;
            assert_eq!(outcome.exit_code, 0, "{name}: {}", action.stderr());
            assert_eq!(action.stdout().trim(), "lo", "{name}");

            let (outcome, action) =
                run(&*backend, BASE, &[("dockerNetwork", "bridge")], &list).await;
            assert_eq!(outcome.exit_code, 0, "{name}: {}", action.stderr());
            assert!(
                action.stdout().trim().len() > "lo".len(),
                "{name}: {}",
                action.stdout()
            );
        });
    }
}

/// Bash lines that find the action's default gateway in /proc/net/route
/// (little-endian hex) and export it as `gw`, for [`connect_script`]
/// targets written `$gw:PORT`.
const FIND_GATEWAY: &str = r#"h=$(awk '$2 == "00000000" {print $3; exit}' /proc/net/route)
if [ -n "$h" ]; then export gw=$((16#${h:6:2})).$((16#${h:4:2})).$((16#${h:2:2})).$((16#${h:0:2})); fi
echo "$gw" > gateway
"#;

#[test]
fn a_bridged_action_reaches_outside_but_not_the_host_nor_its_gateway() {
    for backend in backends("bridged network") {
        runtime().block_on(async {
            let name = backend.name();
            let outside = Outside::new();
            for network in ["bridge", "off"] {
                let outside_listener = outside.listen();
                let outside_port = outside_listener.local_addr().unwrap().port();
                // On every host address: loopback, eth0, docker0, the
                // actions' bridge and the outside link's host end.
                let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
                let host_port = host_listener.local_addr().unwrap().port();
                let host_targets = outside.host_targets(host_port);
                let outside_target = format!("{}:{outside_port}", outside.address);
                let mut targets = host_targets.clone();
                targets.push(outside_target.clone());
                if network == "bridge" {
                    targets.push(format!("$gw:{host_port}"));
                }
                let script = format!("{FIND_GATEWAY}{}", connect_script(&targets));

                let (outcome, action) = run(
                    &*backend,
                    BASE,
                    &[("dockerNetwork", network)],
                    &["bash", "-c", &script],
                )
                .await;

                assert_eq!(outcome.exit_code, 0, "{name}: {}", action.stderr());
                let gateway = std::fs::read_to_string(action.workspace().join("gateway")).unwrap();
                let gateway = gateway.trim();
                let mut expected: Vec<String> = host_targets
                    .iter()
                    .map(|target| format!("blocked {target}"))
                    .collect();
                if network == "bridge" {
                    assert!(
                        gateway.parse::<std::net::Ipv4Addr>().is_ok(),
                        "{name}: a default route, via {gateway:?}"
                    );
                    expected.push(format!("blocked {gateway}:{host_port}"));
                    expected.push(format!("reached {outside_target}"));
                } else {
                    assert_eq!(gateway, "", "{name}: no route without network");
                    expected.push(format!("blocked {outside_target}"));
                }
                // The gateway is one of the host's addresses too.
                expected.sort();
                expected.dedup();
                assert_eq!(
                    action.stdout().lines().collect::<Vec<_>>(),
                    expected,
                    "{name} dockerNetwork={network}"
                );
                assert_eq!(
                    was_reached(&outside_listener),
                    network == "bridge",
                    "{name} dockerNetwork={network}: the outside listener"
                );
                assert!(
                    !was_reached(&host_listener),
                    "{name} dockerNetwork={network}: nothing reached the host's listener"
                );
            }
        });
    }
}

/// Listens on port 8080 of every address of the action, checks that its
/// own address answers, says `started ADDRESS` into the FIFO `started`,
/// then waits to be cancelled.
const LISTENER: &str = r#"address=$(/sbin/ip -4 addr show eth0 | awk '/inet / {split($2, a, "/"); print a[1]}')
(while :; do nc -l -p 8080 -e echo hello; done) &
for i in $(seq 100); do
  if timeout 2 bash -c "exec 3<>/dev/tcp/$address/8080; cat <&3" 2>/dev/null | grep -q hello; then
    echo "answers on $address"; break
  fi
  sleep 0.05
done
echo "started $address" > started
sleep 600
"#;

#[test]
fn concurrent_bridged_actions_cannot_reach_each_other_nor_be_reached_from_outside() {
    for backend in backends("isolated actions") {
        runtime().block_on(async {
            let name = backend.name();
            let listening = Action::new(
                platform(&[("container-image", BASE), ("dockerNetwork", "bridge")]),
                &["bash", "-c", LISTENER],
            );
            let fifo = listening.workspace().join("started");
            let made = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap();
            assert!(made.success());
            let cancel = CancellationToken::new();
            let unblock = fifo.clone();
            let listen = async {
                let outcome = listening.run(&*backend, &limits(), &cancel).await;
                // Ended without saying it started: end the wait below too.
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&unblock)
                    .and_then(|mut fifo| fifo.write_all(b"ended\n"));
                outcome
            };
            let connect = async {
                let line = tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo))
                    .await
                    .unwrap()
                    .unwrap();
                let address = line
                    .trim()
                    .strip_prefix("started ")
                    .unwrap_or_else(|| panic!("{name}: the listener said {line:?}"))
                    .to_string();
                let target = format!("{address}:8080");
                let (outcome, other) = run(
                    &*backend,
                    BASE,
                    &[("dockerNetwork", "bridge")],
                    &["bash", "-c", &connect_script(std::slice::from_ref(&target))],
                )
                .await;
                // Nor can a machine outside the host start one, though the
                // host routes for the actions' addresses.
                let outside = Outside::new();
                let via = outside.host_address.to_string();
                outside::ip(&["-n", &outside.name, "route", "add", &address, "via", &via]);
                let script = connect_script(std::slice::from_ref(&target));
                let from_outside = tokio::task::spawn_blocking(move || {
                    let scratch = tempfile::tempdir().unwrap();
                    let output = std::process::Command::new("ip")
                        .args(["netns", "exec", &outside.name, "bash", "-c", &script])
                        .current_dir(scratch.path())
                        .output()
                        .unwrap();
                    String::from_utf8_lossy(&output.stdout).into_owned()
                })
                .await
                .unwrap();
                cancel.cancel();
                assert_eq!(outcome.exit_code, 0, "{name}: {}", other.stderr());
                assert_eq!(
                    from_outside,
                    format!("blocked {target}\n"),
                    "{name}: a connection from outside the host"
                );
                (address, target, other.stdout())
            };
            let (listened, (address, target, stdout)) = tokio::join!(listen, connect);
            assert_eq!(
                listened.unwrap().stopped,
                Some(StopReason::Cancelled),
                "{name}"
            );
            assert_eq!(
                listening.stdout(),
                format!("answers on {address}\n"),
                "{name}: the listener answered on its own address"
            );
            assert_eq!(stdout, format!("blocked {target}\n"), "{name}");
        });
    }
}

#[test]
fn without_nft_bridge_is_refused_naming_it_and_unset_means_no_network() {
    let Ok(services) = services() else {
        skipped!("skipped: no nft: {}", services().err().unwrap());
        return;
    };
    let network = NetworkConfig {
        nft_binary: "/nonexistent/nft".into(),
        ..NetworkConfig::default()
    };
    runtime().block_on(async {
        let mut probed: Vec<(Box<dyn Isolation>, String)> = Vec::new();
        if services.docker.is_ok() {
            let docker = Docker::probe(DockerConfig {
                network: network.clone(),
                ..Default::default()
            })
            .await
            .expect("docker itself still works");
            let reason = docker.bridge_network().unwrap_err().to_string();
            probed.push((Box::new(docker), reason));
        }
        if services.podman.is_ok() {
            let podman = Podman::probe(PodmanConfig {
                network,
                ..Default::default()
            })
            .await
            .expect("podman itself still works");
            let reason = podman.bridge_network().unwrap_err().to_string();
            probed.push((Box::new(podman), reason));
        }
        for (backend, reason) in probed {
            let name = backend.name();
            assert!(
                reason.contains("/nonexistent/nft") && reason.contains("nftables"),
                "{name}: {reason}"
            );
            let bridged = Action::new(
                platform(&[("container-image", BASE), ("dockerNetwork", "bridge")]),
                &["true"],
            );
            let error = bridged
                .run(&*backend, &limits(), &CancellationToken::new())
                .await
                .unwrap_err();
            assert!(
                matches!(&error, RunError::Unsupported(message)
                    if message.starts_with("dockerNetwork=bridge:") && message.contains("/nonexistent/nft")),
                "{name}: {error:?}"
            );
            // An action that does not choose runs without network, not on
            // the runtime's default bridge.
            let list = ["sh", "-c", "ls /sys/class/net | sort | tr '\\n' ' '"];
            let (outcome, action) = run(&*backend, BASE, &[], &list).await;
            assert_eq!(outcome.exit_code, 0, "{name}: {}", action.stderr());
            assert_eq!(action.stdout().trim(), "lo", "{name}");
        }
    });
}

#[test]
fn docker_init_makes_an_init_pid_1() {
    for backend in backends("init") {
        runtime().block_on(async {
            let name = backend.name();
            let comm = ["cat", "/proc/1/comm"];
            let (outcome, action) = run(&*backend, BASE, &[], &comm).await;
            assert_eq!(outcome.exit_code, 0, "{name}: {}", action.stderr());
            assert_eq!(
                action.stdout().trim(),
                "cat",
                "{name}: without init the command is PID 1"
            );

            let (outcome, action) = run(&*backend, BASE, &[("dockerInit", "true")], &comm).await;
            assert_eq!(outcome.exit_code, 0, "{name}: {}", action.stderr());
            let pid1 = action.stdout();
            assert!(
                !pid1.trim().is_empty() && pid1.trim() != "cat",
                "{name}: PID 1 is {pid1:?}"
            );
        });
    }
}

/// Runs `sleep` until `stop` fires (the action has written its container's
/// id by then); the container must be stopped and gone.
async fn stop_case(backend: &dyn Isolation, limits: Limits, cancel_when_started: bool) {
    let name = backend.name();
    let action = Action::new(
        platform(&[("container-image", BASE)]),
        &[
            "sh",
            "-c",
            "hostname > id.tmp && mv id.tmp id && exec sleep 600",
        ],
    );
    let cancel = CancellationToken::new();
    let id_file = action.workspace().join("id");
    let watcher = {
        let cancel = cancel.clone();
        let id_file = id_file.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            while !id_file.exists() && started.elapsed() < Duration::from_secs(120) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if cancel_when_started {
                cancel.cancel();
            }
        })
    };
    let outcome = action.run(backend, &limits, &cancel).await.unwrap();
    watcher.abort();
    let expected = if cancel_when_started {
        StopReason::Cancelled
    } else {
        StopReason::Timeout
    };
    assert_eq!(
        outcome.stopped,
        Some(expected),
        "{name}: {outcome:?} {}",
        action.stderr()
    );
    let id = std::fs::read_to_string(&id_file).expect("the action started before it was stopped");
    let left = containers_with_id(name, id.trim());
    assert!(left.is_empty(), "{name}: container {left} was left behind");
}

#[test]
fn a_timeout_stops_and_removes_the_container() {
    for backend in backends("timeout") {
        runtime().block_on(async {
            let limits = Limits {
                timeout: Duration::from_secs(5),
                ..limits()
            };
            stop_case(&*backend, limits, false).await;
        });
    }
}

#[test]
fn cancellation_stops_and_removes_the_container() {
    for backend in backends("cancel") {
        runtime().block_on(stop_case(&*backend, limits(), true));
    }
}

#[test]
fn exceeding_the_memory_limit_is_reported() {
    for backend in backends("memory") {
        runtime().block_on(async {
            let name = backend.name();
            let action = Action::new(
                platform(&[("container-image", BASE)]),
                &[
                    "bash",
                    "-c",
                    "x=$(head -c 400000000 /dev/zero | tr '\\0' x); echo survived",
                ],
            );
            let limits = Limits {
                memory_bytes: Some(48 << 20),
                ..limits()
            };
            let outcome = action
                .run(&*backend, &limits, &CancellationToken::new())
                .await
                .unwrap();
            assert!(
                outcome.memory_exceeded,
                "{name}: {outcome:?} {}",
                action.stderr()
            );
            assert_ne!(outcome.exit_code, 0);
            assert!(!action.stdout().contains("survived"));
            // conmon reports podman's OOM kills in a file named `oom` in
            // its working directory: never the executor's.
            let stray = std::env::current_dir().unwrap().join("oom");
            assert!(!stray.exists(), "{name} left {}", stray.display());

            // Under the limit, a failing command is not an OOM kill.
            let action = Action::new(
                platform(&[("container-image", BASE)]),
                &["sh", "-c", "exit 137"],
            );
            let outcome = action
                .run(&*backend, &limits, &CancellationToken::new())
                .await
                .unwrap();
            assert_eq!(outcome.exit_code, 137);
            assert!(!outcome.memory_exceeded, "{name}");
        });
    }
}

fn expect_error(result: Result<(), RunError>, what: &str) -> RunError {
    match result {
        Ok(()) => panic!("{what}: prepared, expected an error"),
        Err(error) => {
            let message = error.to_string();
            assert!(
                !message.contains(PASSWORD),
                "{what}: the password leaked: {message}"
            );
            assert!(
                !format!("{error:?}").contains(PASSWORD),
                "{what}: leaked in Debug"
            );
            error
        }
    }
}

/// Held by the tests that pull or remove the private image's local copy.
static PRIVATE_IMAGE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_private_image_needs_the_right_credentials_every_time() {
    let _private = PRIVATE_IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    for backend in backends("private") {
        runtime().block_on(async {
            let name = backend.name();
            let cancel = CancellationToken::new();
            let right = [
                ("container-registry-username", USER),
                ("container-registry-password", PASSWORD),
            ];
            let (outcome, action) = run(&*backend, PRIVATE, &right, &["echo", "private"]).await;
            assert_eq!(outcome.exit_code, 0, "{name}: {}", action.stderr());
            assert_eq!(action.stdout(), "private\n");

            // Now local and resolved: wrong or no credentials must still fail.
            let wrong = platform(&[
                ("container-image", PRIVATE),
                ("container-registry-username", USER),
                ("container-registry-password", "Wrong-Password-1"),
            ]);
            let error = expect_error(backend.prepare(&wrong, &cancel).await, "wrong password");
            let message = error.to_string();
            assert!(
                matches!(error, RunError::Unsupported(_)),
                "{name}: {error:?}"
            );
            assert!(
                message.contains(PRIVATE) && message.contains("127.0.0.1:5001"),
                "{message}"
            );
            assert!(!message.contains("Wrong-Password-1"), "{message}");
            assert_eq!(
                tonic::Status::from(error).code(),
                tonic::Code::FailedPrecondition
            );

            let anonymous = platform(&[("container-image", PRIVATE)]);
            let error = expect_error(backend.prepare(&anonymous, &cancel).await, "no credentials");
            assert!(
                matches!(error, RunError::Unsupported(_)),
                "{name}: {error:?}"
            );
            assert!(error.to_string().contains(PRIVATE));
        });
    }
    // build.sh: no local copy of the private image may stay behind.
    if let Ok(services) = services() {
        if let Some(pinned) = services.pinned.get(PRIVATE) {
            let _ = cli("docker", &["rmi", pinned]);
        }
    }
}

#[test]
fn unknown_images_and_unreachable_registries_are_named() {
    for backend in backends("unknown_image") {
        runtime().block_on(async {
            let name = backend.name();
            let cancel = CancellationToken::new();
            let unknown = "127.0.0.1:5000/kiln-test/no-such-image:latest";
            let error = expect_error(
                backend
                    .prepare(&platform(&[("container-image", unknown)]), &cancel)
                    .await,
                "unknown image",
            );
            assert!(
                matches!(error, RunError::Unsupported(_)),
                "{name}: {error:?}"
            );
            assert!(error.to_string().contains(unknown), "{error}");

            let unreachable = "127.0.0.1:1/kiln-test/base:latest";
            let error = expect_error(
                backend
                    .prepare(
                        &platform(&[
                            ("container-image", unreachable),
                            ("container-registry-username", USER),
                            ("container-registry-password", PASSWORD),
                        ]),
                        &cancel,
                    )
                    .await,
                "unreachable registry",
            );
            assert!(
                matches!(error, RunError::Unavailable(_)),
                "{name}: {error:?}"
            );
            assert!(error.to_string().contains("127.0.0.1:1"), "{error}");
            assert_eq!(tonic::Status::from(error).code(), tonic::Code::Unavailable);
        });
    }
}

#[test]
fn no_image_is_a_failed_precondition_unless_a_default_is_configured() {
    if backends("default_image").is_empty() {
        return;
    }
    runtime().block_on(async {
        let cancel = CancellationToken::new();
        for backend in backends("default_image") {
            let error = backend.prepare(&Platform::default(), &cancel).await.unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "workload-isolation-type={} needs container-image (this executor has no default image)",
                    backend.name()
                )
            );
        }
        let images = ImageConfig {
            default_image: Some(format!("docker://{BASE}")),
            ..Default::default()
        };
        let mut with_default: Vec<Box<dyn Isolation>> = Vec::new();
        let services = services().unwrap();
        if services.docker.is_ok() {
            let config = DockerConfig {
                images: images.clone(),
                owner: None,
                ..Default::default()
            };
            with_default.push(Box::new(Docker::probe(config).await.unwrap()));
        }
        if services.podman.is_ok() {
            let config = PodmanConfig {
                images,
                owner: None,
                ..Default::default()
            };
            with_default.push(Box::new(Podman::probe(config).await.unwrap()));
        }
        for backend in with_default {
            let action = Action::new(Platform::default(), &["echo", "default"]);
            let outcome = action.run(&*backend, &limits(), &cancel).await.unwrap();
            assert_eq!(outcome.exit_code, 0, "{}: {}", backend.name(), action.stderr());
            assert_eq!(action.stdout(), "default\n");
        }
    });
}

/// Uses the private image under its digest name, which only this test
/// and the private-image test pull (one at a time).
#[test]
fn docker_pulls_in_prepare_and_again_when_the_image_is_gone() {
    let Ok(services) = services() else {
        skipped!(
            "skipped: docker_pulls_in_prepare: {}",
            services().err().unwrap()
        );
        return;
    };
    let Ok(docker) = &services.docker else {
        skipped!("skipped: docker_pulls_in_prepare: docker unavailable");
        return;
    };
    let _private = PRIVATE_IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    // The private image's digest is only in the auth registry under its
    // name; the local store must not have it under that name yet.
    let pinned = services.pinned[PRIVATE].clone();
    let _ = cli("docker", &["rmi", &pinned]);
    assert!(!cli("docker", &["image", "inspect", &pinned])
        .status
        .success());
    let private = platform(&[
        ("container-image", PRIVATE),
        ("container-registry-username", USER),
        ("container-registry-password", PASSWORD),
    ]);
    runtime()
        .block_on(docker.prepare(&private, &CancellationToken::new()))
        .unwrap();
    assert!(
        cli("docker", &["image", "inspect", &pinned])
            .status
            .success(),
        "after prepare, {pinned} is local"
    );

    // Gone again before the run (an image prune): the run pulls it back.
    assert!(cli("docker", &["rmi", &pinned]).status.success());
    let action = Action::new(private, &["echo", "pulled again"]);
    let outcome = runtime()
        .block_on(docker.run(&action.spec, &limits(), &CancellationToken::new()))
        .unwrap();
    assert_eq!(outcome.exit_code, 0, "{}", action.stderr());
    assert_eq!(action.stdout(), "pulled again\n");
    let _ = cli("docker", &["rmi", &pinned]);
}

#[test]
fn podman_holds_the_image_after_prepare() {
    let Ok(services) = services() else {
        skipped!(
            "skipped: podman_holds_the_image_after_prepare: {}",
            services().err().unwrap()
        );
        return;
    };
    let Ok(podman) = &services.podman else {
        skipped!("skipped: podman_holds_the_image_after_prepare: podman unavailable");
        return;
    };
    runtime()
        .block_on(podman.prepare(
            &platform(&[("container-image", NONROOT)]),
            &CancellationToken::new(),
        ))
        .unwrap();
    let pinned = &services.pinned[NONROOT];
    assert!(cli("podman", &["image", "exists", pinned]).status.success());
}

#[test]
fn podman_pulls_again_when_its_image_was_removed_behind_its_back() {
    let Ok(services) = services() else {
        skipped!("skipped: podman_pulls_again: {}", services().err().unwrap());
        return;
    };
    let Ok(podman) = &services.podman else {
        skipped!("skipped: podman_pulls_again: podman unavailable");
        return;
    };
    // An image of this test's own (a label makes its digest unique), so
    // removing it cannot disturb the tests running beside it.
    let image = format!("127.0.0.1:5000/kiln-test/recovery:{}", std::process::id());
    let succeeded = |output: std::process::Output, what: &str| {
        assert!(
            output.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let source = succeeded(cli("podman", &["create", BASE, "true"]), "podman create");
    let label = format!(
        "LABEL kiln.test.recovery={:?}",
        std::time::SystemTime::now()
    );
    succeeded(
        cli("podman", &["commit", "--change", &label, &source, &image]),
        "podman commit",
    );
    let _ = cli("podman", &["rm", "-f", &source]);
    succeeded(cli("podman", &["push", &image]), "podman push");
    runtime().block_on(async {
        let (outcome, action) = run(podman.as_ref(), &image, &[], &["echo", "first"]).await;
        assert_eq!((outcome.exit_code, action.stdout().trim()), (0, "first"));
        // Removed behind the backend's back, which still believes podman
        // holds it: the run notices and pulls it again.
        succeeded(cli("podman", &["rmi", "-f", &image]), "podman rmi");
        let (outcome, action) = run(podman.as_ref(), &image, &[], &["echo", "second"]).await;
        assert_eq!(
            (outcome.exit_code, action.stdout().trim()),
            (0, "second"),
            "stderr: {}",
            action.stderr()
        );
    });
    let _ = cli("podman", &["rmi", "-f", &image]);
}

/// Counts pulls; holds no image until one happened.
struct CountingStore {
    pulls: AtomicUsize,
}

#[async_trait]
impl ImageStore for CountingStore {
    async fn has_image(&self, _pinned: &str) -> Result<bool, RunError> {
        Ok(self.pulls.load(Ordering::SeqCst) > 0)
    }

    async fn pull_image(
        &self,
        _image: &ResolvedImage,
        _credentials: Option<&RegistryCredentials>,
        _insecure: bool,
    ) -> Result<(), RunError> {
        tokio::task::yield_now().await;
        self.pulls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn concurrent_prepares_of_one_image_pull_once() {
    if let Err(reason) = services() {
        skipped!("skipped: concurrent_prepares_pull_once: {reason}");
        return;
    }
    runtime().block_on(async {
        let images = Images::new("docker", ImageConfig::default()).unwrap();
        let store = CountingStore {
            pulls: AtomicUsize::new(0),
        };
        let cancel = CancellationToken::new();
        let base = platform(&[("container-image", BASE)]);
        let by_digest = platform(&[("container-image", &services().unwrap().pinned[BASE])]);
        let prepares = (0..8).map(|i| {
            let platform = if i % 2 == 0 { &base } else { &by_digest };
            images.ensure(platform, &store, true, &cancel)
        });
        let resolved = futures::future::join_all(prepares).await;
        let digests: std::collections::HashSet<String> =
            resolved.into_iter().map(|r| r.unwrap().digest).collect();
        assert_eq!(digests.len(), 1, "a tag and its digest resolve alike");
        assert_eq!(store.pulls.load(Ordering::SeqCst), 1);
    });
}

/// Not a test: per-action time of a trivial action (`true`) with a warm
/// image through each backend, against the runtime's own `run --rm`.
/// `cargo test -p kiln-container --release --test containers -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_overhead() {
    const N: usize = 30;
    let Ok(services) = services() else {
        skipped!("skipped: measure_overhead: {}", services().err().unwrap());
        return;
    };
    let pinned = services.pinned[BASE].clone();
    let median = |mut samples: Vec<f64>| {
        samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        samples[samples.len() / 2]
    };
    let mean = |samples: &[f64]| samples.iter().sum::<f64>() / samples.len() as f64;
    for backend in backends("measure_overhead") {
        let name = backend.name();
        for memory in [None, Some(1u64 << 30)] {
            let limits = Limits {
                memory_bytes: memory,
                cpu_millis: None,
                ..limits()
            };
            let action = Action::new(
                platform(&[("container-image", BASE), ("dockerNetwork", "off")]),
                &["true"],
            );
            let cancel = CancellationToken::new();
            let mut raw_args = vec!["run", "--rm", "--network", "none"];
            let memory_arg;
            if let Some(bytes) = memory {
                memory_arg = format!("--memory={bytes}b");
                raw_args.push(&memory_arg);
            }
            raw_args.extend([pinned.as_str(), "true"]);
            // Interleaved, so drift in the machine's load hits both alike.
            let (mut prepare, mut run, mut raw) = (Vec::new(), Vec::new(), Vec::new());
            runtime().block_on(async {
                action.run(&*backend, &limits, &cancel).await.unwrap();
                for _ in 0..N {
                    let started = Instant::now();
                    backend
                        .prepare(&action.spec.platform, &cancel)
                        .await
                        .unwrap();
                    let prepared = Instant::now();
                    let outcome = backend.run(&action.spec, &limits, &cancel).await.unwrap();
                    assert_eq!(outcome.exit_code, 0);
                    prepare.push((prepared - started).as_secs_f64() * 1000.0);
                    run.push(prepared.elapsed().as_secs_f64() * 1000.0);

                    let started = Instant::now();
                    let status = tokio::process::Command::new(name)
                        .args(&raw_args)
                        .status()
                        .await
                        .unwrap();
                    assert!(status.success());
                    raw.push(started.elapsed().as_secs_f64() * 1000.0);
                }
            });
            let (run_mean, raw_mean) = (mean(&run), mean(&raw));
            let (run_median, raw_median) = (median(run.clone()), median(raw.clone()));
            println!(
                "{name} (memory limit {memory:?}), N={N}: backend run mean {run_mean:.1} ms \
                 (median {run_median:.1}), prepare (warm) mean {:.2} ms; raw `{name} {}` mean \
                 {raw_mean:.1} ms (median {raw_median:.1}); run/raw: means {:.3}, medians {:.3}",
                mean(&prepare),
                raw_args.join(" "),
                run_mean / raw_mean,
                run_median / raw_median
            );
        }
    }
}

#[test]
fn a_probe_removes_only_its_own_owners_leftovers() {
    let Ok(services) = services() else {
        skipped!("skipped: leftovers: {}", services().err().unwrap());
        return;
    };
    let owner = format!("leftover-test-{}", std::process::id());
    for runtime_name in ["docker", "podman"] {
        let available = match runtime_name {
            "docker" => services.docker.is_ok(),
            _ => services.podman.is_ok(),
        };
        if !available {
            skipped!("skipped: leftovers with {runtime_name}: unavailable");
            continue;
        }
        let create = |owner: &str| {
            let created = cli(
                runtime_name,
                &[
                    "create",
                    "--label=kiln.action=1",
                    &format!("--label=kiln.owner={owner}"),
                    BASE,
                    "true",
                ],
            );
            assert!(created.status.success(), "{runtime_name} create");
            String::from_utf8_lossy(&created.stdout).trim().to_string()
        };
        let mine = create(&owner);
        let other = create(&format!("{owner}-other"));
        let exists = |id: &str| {
            cli(runtime_name, &["container", "inspect", id])
                .status
                .success()
        };
        let probed = runtime().block_on(async {
            match runtime_name {
                "docker" => Docker::probe(DockerConfig {
                    owner: Some(owner.clone()),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
                _ => Podman::probe(PodmanConfig {
                    owner: Some(owner.clone()),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            }
        });
        probed.unwrap();
        assert!(
            !exists(&mine),
            "{runtime_name}: the owner's leftover was removed"
        );
        assert!(
            exists(&other),
            "{runtime_name}: another owner's container stays"
        );
        let _ = cli(runtime_name, &["rm", "-f", &other]);
    }
}

/// Podman as `scripts/serve.sh` users have it: no `default_ulimits` in its
/// configuration (scripts/services.sh writes some for the tests' own
/// `podman run`s). Root without `CAP_SYS_RESOURCE` cannot grant podman's
/// built-in 1048576, so the backend must ask for limits that fit the host.
#[test]
fn podman_starts_containers_without_configured_ulimits() {
    let services = match services() {
        Ok(services) => services,
        Err(reason) => return skipped!("skipped: podman without ulimits: {reason}"),
    };
    if let Err(reason) = &services.podman {
        return skipped!("skipped: podman without ulimits: {reason}");
    }
    let dir = tempfile::tempdir().unwrap();
    // The services' configuration minus its ulimits; CONTAINERS_CONF makes
    // podman read this file alone.
    let conf = dir.path().join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ninit_path = \"/usr/bin/catatonit\"\n\
         [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
         [network]\nnetwork_backend = \"netavark\"\n",
    )
    .unwrap();
    let wrapper = dir.path().join("podman");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nCONTAINERS_CONF={} exec podman \"$@\"\n",
            conf.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    runtime().block_on(async {
        let podman = Podman::probe(PodmanConfig {
            binary: wrapper.clone(),
            ..Default::default()
        })
        .await
        .expect("probe");
        let (outcome, action) =
            run(&podman, BASE, &[], &["sh", "-c", "ulimit -Hn; ulimit -Hu"]).await;
        assert_eq!(outcome.exit_code, 0, "{}", action.stderr());
        let limits: Vec<u64> = action
            .stdout()
            .lines()
            .map(|line| line.trim().parse().unwrap())
            .collect();
        let host_nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .maximum
            .unwrap_or(u64::MAX);
        assert_eq!(limits.len(), 2, "{}", action.stdout());
        assert!(
            limits[0] <= host_nofile && limits[0] > 0,
            "nofile {} must fit the host's hard limit {host_nofile}",
            limits[0]
        );
    });
}

/// The probe's trial: a container of the one-file trial image really
/// starts (the runtime's own event log says so), and afterwards only the
/// image is left, no container.
#[test]
fn a_probe_starts_a_trial_container_and_leaves_only_its_image() {
    let Ok(services) = services() else {
        skipped!("skipped: trial container: {}", services().err().unwrap());
        return;
    };
    let trial_image = kiln_container::trial::TrialImage::for_arch(std::env::consts::ARCH)
        .expect("a trial program for this architecture");
    for runtime_name in ["docker", "podman"] {
        let available = match runtime_name {
            "docker" => services.docker.is_ok(),
            _ => services.podman.is_ok(),
        };
        if !available {
            skipped!("skipped: trial container with {runtime_name}: unavailable");
            continue;
        }
        let owner = format!("trial-test-{}-{runtime_name}", uuid_like());
        let probed = runtime().block_on(async {
            match runtime_name {
                "docker" => Docker::probe(DockerConfig {
                    owner: Some(owner.clone()),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
                _ => Podman::probe(PodmanConfig {
                    owner: Some(owner.clone()),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            }
        });
        probed.unwrap_or_else(|reason| panic!("{runtime_name}: {reason}"));

        let label = format!("label=kiln.owner={owner}");
        // `--until` in whole seconds: the next one, so this one's events
        // are in (docker answers when that second has begun).
        let until = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 1)
        .to_string();
        let events = match runtime_name {
            "docker" => cli(
                "docker",
                &[
                    "events",
                    "--since",
                    "10m",
                    "--until",
                    &until,
                    "--filter",
                    &label,
                    "--filter",
                    "event=start",
                    "--format",
                    "{{.From}}",
                ],
            ),
            _ => cli(
                "podman",
                &[
                    "events",
                    "--stream=false",
                    "--since",
                    "10m",
                    "--filter",
                    &label,
                    "--filter",
                    "event=start",
                    "--format",
                    "{{.Image}}",
                ],
            ),
        };
        let started = String::from_utf8_lossy(&events.stdout).to_string();
        assert_eq!(
            started.trim(),
            trial_image.reference,
            "{runtime_name}: one trial container of the trial image started: {started:?} {}",
            String::from_utf8_lossy(&events.stderr)
        );
        let left = cli(runtime_name, &["ps", "-a", "-q", "--filter", &label]);
        assert_eq!(
            String::from_utf8_lossy(&left.stdout).trim(),
            "",
            "{runtime_name}: no trial container is left"
        );
        assert!(
            cli(runtime_name, &["image", "inspect", &trial_image.reference])
                .status
                .success(),
            "{runtime_name}: the trial image is kept for the next start-up"
        );
    }
}

/// A fresh name part, so concurrent runs of the tests never see each
/// other's events.
fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A `podman` that answers every question like podman 4.3 but whose
/// containers fail to start the way runc fails on a host that cannot grant
/// the rlimits asked for. Needs no podman: it runs everywhere.
fn failing_podman(dir: &Path, run: &str) -> PathBuf {
    let script = dir.join("podman");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
case "$1" in
  version) echo 4.3.1 ;;
  info) echo "runc v2 systemd" ;;
  network|image|ps|rm|stop|inspect) ;;
  import) cat >/dev/null ;;
  run) {run} ;;
  *) echo "fake podman: unexpected $*" >&2; exit 2 ;;
esac
"#
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn a_podman_whose_containers_cannot_start_is_refused_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let podman = failing_podman(
        dir.path(),
        "echo 'Error: runc: runc create failed: unable to start container process: \
         error during container init: error setting rlimit type 7: operation not permitted: \
         OCI permission denied' >&2; exit 126",
    );
    let probed = runtime().block_on(Podman::probe(PodmanConfig {
        binary: podman,
        ..Default::default()
    }));
    let reason = match probed {
        Ok(_) => panic!("a podman that cannot start containers was accepted"),
        Err(reason) => reason,
    };
    assert!(
        reason.starts_with("podman: the trial action `/true`"),
        "{reason}"
    );
    assert!(reason.contains("exit code 126"), "{reason}");
    assert!(
        reason.contains("error setting rlimit type 7: operation not permitted"),
        "the runtime's own words: {reason}"
    );
}

/// The real failure the trial exists for: podman with no configured
/// ulimits and without Kiln's `--ulimit` flags asks runc for nofile and
/// nproc of 1048576, which root without `CAP_SYS_RESOURCE` cannot grant, so
/// every container fails to start while `podman version` and `podman
/// info` answer fine. The probe must refuse it, in runc's words.
#[test]
fn a_podman_whose_runtime_refuses_the_rlimits_is_refused_in_runcs_words() {
    let services = match services() {
        Ok(services) => services,
        Err(reason) => return skipped!("skipped: podman refusing rlimits: {reason}"),
    };
    if let Err(reason) = &services.podman {
        return skipped!("skipped: podman refusing rlimits: {reason}");
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ninit_path = \"/usr/bin/catatonit\"\n\
         [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
         [network]\nnetwork_backend = \"netavark\"\n",
    )
    .unwrap();
    let wrapper = dir.path().join("podman");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\nexport CONTAINERS_CONF={}\n\
             if [ \"$1\" = run ]; then\n  args=()\n  \
             for a in \"$@\"; do case \"$a\" in --ulimit=*) ;; *) args+=(\"$a\");; esac; done\n  \
             exec podman \"${{args[@]}}\"\nfi\nexec podman \"$@\"\n",
            conf.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let probed = runtime().block_on(Podman::probe(PodmanConfig {
        binary: wrapper,
        ..Default::default()
    }));
    match probed {
        // Not a missing service: this host lets root raise its limits.
        Ok(_) => skipped_anywhere(
            "skipped: podman refusing rlimits: this host grants nofile=1048576, nothing fails",
        ),
        Err(reason) => {
            assert!(reason.starts_with("podman: the trial action"), "{reason}");
            assert!(reason.contains("error setting rlimit"), "{reason}");
        }
    }
}

/// A skip that is one under CI too: the host, not a service, decides.
fn skipped_anywhere(line: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(format!("\n{line}\n").as_bytes());
}

// Warm runners (`recycle-runner=true`): one container per runner, whose
// actions Kiln's agent starts inside it.

/// A runner's actions: the same action directory each time, as the
/// executor's runner pool hands it out, and what the backend keeps in it.
struct Runner {
    action: Action,
    resident: Option<Box<dyn Resident>>,
}

impl Runner {
    fn new(image: &str) -> Runner {
        Runner {
            action: Action::new(
                platform(&[("container-image", image), ("recycle-runner", "true")]),
                &["true"],
            ),
            resident: None,
        }
    }

    /// Runs `script` (under `sh -c`, with `KILN_TEST=value`) as the
    /// runner's next action; its outcome, stdout and stderr.
    async fn run(
        &mut self,
        backend: &dyn Isolation,
        arguments: &[&str],
        value: &str,
        limits: &Limits,
    ) -> (ProcessOutcome, String, String) {
        let spec = &mut self.action.spec;
        spec.arguments = arguments.iter().map(|a| a.to_string()).collect();
        spec.environment_variables[1].1 = value.into();
        let cancel = CancellationToken::new();
        backend.prepare(&spec.platform, &cancel).await.unwrap();
        let outcome = backend
            .run_in_runner(spec, limits, &cancel, &mut self.resident)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", backend.name()));
        (outcome, self.action.stdout(), self.action.stderr())
    }

    /// The runner's container name (from its description).
    fn container(&self) -> String {
        let described = format!("{:?}", self.resident.as_ref().expect("a started runner"));
        described
            .split('"')
            .nth(1)
            .expect("the container's name")
            .to_string()
    }
}

/// Waits (a minute at most) for container `name` to be removed; whether
/// it was.
async fn gone_within_a_minute(runtime: &str, name: &str) -> bool {
    let started = Instant::now();
    while container_exists(runtime, name) && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    !container_exists(runtime, name)
}

fn container_exists(runtime: &str, name: &str) -> bool {
    let output = cli(
        runtime,
        &["ps", "-a", "-q", "--filter", &format!("name=^{name}$")],
    );
    !String::from_utf8_lossy(&output.stdout).trim().is_empty()
}

#[test]
fn a_warm_runner_keeps_its_container_and_processes_between_actions() {
    for backend in backends("warm_runner") {
        runtime().block_on(async {
            let name = backend.name();
            let mut runner = Runner::new(BASE);
            let first = "echo kept > /tmp/left-by-the-first; \
                         sleep 600 > /dev/null 2>&1 & echo $! > /tmp/sleeper; \
                         echo \"one $KILN_TEST\"; echo to-stderr >&2";
            let (outcome, stdout, stderr) = runner
                .run(&*backend, &["sh", "-c", first], "first", &limits())
                .await;
            assert_eq!(outcome.exit_code, 0, "{name}: {stderr}");
            assert_eq!(stdout, "one first\n", "{name}");
            assert_eq!(stderr, "to-stderr\n", "{name}");
            let container = runner.container();
            assert!(container_exists(name, &container), "{name}: {container}");

            // The second action: the same container (its /tmp and the
            // process the first left running), its own environment and
            // working directory.
            let second = "cat /tmp/left-by-the-first; kill -0 \"$(cat /tmp/sleeper)\" && \
                          echo sleeper alive; echo \"two $KILN_TEST\"; pwd; exit 7";
            let (outcome, stdout, stderr) = runner
                .run(&*backend, &["sh", "-c", second], "second", &limits())
                .await;
            assert_eq!(outcome.exit_code, 7, "{name}: {stderr}");
            let workspace = runner.action.workspace().display().to_string();
            assert_eq!(
                stdout,
                format!("kept\nsleeper alive\ntwo second\n{workspace}\n"),
                "{name}: {stderr}"
            );
            assert_eq!(runner.container(), container, "{name}: a new container");

            // Not found, and not executable: as a shell says, the runner
            // still serving.
            let (outcome, _, stderr) = runner
                .run(&*backend, &["no-such-command"], "", &limits())
                .await;
            assert_eq!(outcome.exit_code, 127, "{name}: {stderr}");
            assert!(stderr.contains("no-such-command"), "{name}: {stderr}");
            let (outcome, _, stderr) = runner.run(&*backend, &["/etc/passwd"], "", &limits()).await;
            assert_eq!(outcome.exit_code, 126, "{name}: {stderr}");

            // A timeout stops the action's processes, not the runner's.
            let short = Limits {
                timeout: Duration::from_millis(500),
                ..limits()
            };
            let (outcome, _, _) = runner.run(&*backend, &["sleep", "600"], "", &short).await;
            assert_eq!(outcome.stopped, Some(StopReason::Timeout), "{name}");
            assert_eq!(outcome.signal, Some(15), "{name}: {outcome:?}");

            // Dropping the runner removes its container.
            runner.resident = None;
            assert!(
                gone_within_a_minute(name, &container).await,
                "{name}: {container} was left behind"
            );
        });
    }
}

#[test]
fn a_warm_runner_keeps_the_images_entrypoint_and_environment() {
    for backend in backends("warm_entrypoint") {
        runtime().block_on(async {
            let name = backend.name();
            let mut runner = Runner::new(ENTRYPOINT);
            for round in ["a", "b"] {
                let (outcome, stdout, stderr) = runner
                    .run(&*backend, &["echo", "hello", round], "", &limits())
                    .await;
                assert_eq!(outcome.exit_code, 0, "{name}: {stderr}");
                assert_eq!(stdout, format!("hello {round}\n"), "{name}");
                assert!(
                    stderr.contains(&format!("entrypoint wrapper saw: echo hello {round}")),
                    "{name}: {stderr}"
                );
                assert!(!stderr.contains("image CMD ran"), "{name}");
            }
        });
    }
}

#[test]
fn a_warm_runner_reports_an_oom_kill() {
    for backend in backends("warm_memory") {
        runtime().block_on(async {
            let name = backend.name();
            let mut runner = Runner::new(BASE);
            let limits = Limits {
                memory_bytes: Some(48 << 20),
                ..limits()
            };
            let (outcome, _, stderr) = runner
                .run(&*backend, &["sh", "-c", "exit 0"], "", &limits)
                .await;
            assert_eq!(outcome.exit_code, 0, "{name}: {stderr}");
            let (outcome, stdout, stderr) = runner
                .run(
                    &*backend,
                    &[
                        "bash",
                        "-c",
                        "x=$(head -c 400000000 /dev/zero | tr '\\0' x); echo survived",
                    ],
                    "",
                    &limits,
                )
                .await;
            assert!(outcome.memory_exceeded, "{name}: {outcome:?} {stderr}");
            assert!(!stdout.contains("survived"), "{name}");
        });
    }
}

/// A persistent worker in the JSON protocol, in the image's busybox
/// shell: it answers each request line with its pid and a counter.
const SHELL_WORKER: &str = r#"n=0; echo "worker $$ up" >&2; while IFS= read -r line; do n=$((n+1)); printf '{"exitCode":%d,"output":"pid=%s n=%d"}\n' "$((n-1))" "$$" "$n"; done"#;

#[test]
fn a_persistent_worker_lives_in_the_runner_container_between_actions() {
    use kiln_platform::WorkerProtocol;
    use kiln_worker::persistent::{WorkRequest, WorkerIdentity, WorkerStart};
    for backend in backends("warm_worker") {
        runtime().block_on(async {
            let name = backend.name();
            let mut runner = Runner::new(BASE);
            let spec = runner.action.spec.clone();
            let start = WorkerStart {
                identity: WorkerIdentity {
                    startup: vec![
                        "sh".into(),
                        "-c".into(),
                        SHELL_WORKER.into(),
                        "--persistent_worker".into(),
                    ],
                    environment_variables: spec.environment_variables.clone(),
                    working_directory: spec.working_directory.clone(),
                },
                protocol: WorkerProtocol::Json,
                runner_dir: spec.workspace.parent().unwrap().to_path_buf(),
            };
            backend
                .prepare(&spec.platform, &CancellationToken::new())
                .await
                .unwrap();
            let mut worker = backend
                .start_worker_in_runner(&spec, &start, &limits(), &mut runner.resident)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let request = WorkRequest {
                arguments: vec!["a".into()],
                ..Default::default()
            };
            let first = worker.request(&request).await.unwrap();
            let second = worker.request(&request).await.unwrap();
            assert_eq!(first.exit_code, 0, "{name}");
            assert_eq!(second.exit_code, 1, "{name}");
            let pid = first
                .output
                .strip_prefix("pid=")
                .and_then(|rest| rest.split(' ').next())
                .unwrap_or_else(|| panic!("{name}: {}", first.output))
                .to_string();
            assert_eq!(first.output, format!("pid={pid} n=1"), "{name}");
            assert_eq!(
                second.output,
                format!("pid={pid} n=2"),
                "{name}: another process"
            );
            assert!(
                worker.stderr_tail().contains(&format!("worker {pid} up")),
                "{name}"
            );

            // It runs inside the runner's container, beside its actions.
            let check = format!("kill -0 {pid} && echo alive || echo gone");
            let (_, stdout, _) = runner
                .run(&*backend, &["sh", "-c", &check], "", &limits())
                .await;
            assert_eq!(stdout, "alive\n", "{name}");

            // Dropped, it is gone; the runner is not.
            drop(worker);
            let mut seen = String::new();
            for _ in 0..100 {
                let (_, stdout, _) = runner
                    .run(&*backend, &["sh", "-c", &check], "", &limits())
                    .await;
                seen = stdout;
                if seen == "gone\n" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(seen, "gone\n", "{name}: the dropped worker still runs");
        });
    }
}

#[test]
fn a_waiting_runner_container_is_frozen_and_thawed_for_its_next_action() {
    for backend in backends("warm_frozen") {
        runtime().block_on(async {
            let name = backend.name();
            let mut runner = Runner::new(BASE);
            // A process the action leaves behind, appending to a file of
            // the workspace (read here, on the host) every 10 ms.
            let ticker =
                "(while :; do echo t >> ticks; sleep 0.01; done) </dev/null >/dev/null 2>&1 &";
            let (outcome, _, stderr) = runner
                .run(&*backend, &["sh", "-c", ticker], "", &limits())
                .await;
            assert_eq!(outcome.exit_code, 0, "{name}: {stderr}");
            let ticks = runner.action.workspace().join("ticks");
            let count = || {
                std::fs::read_to_string(&ticks)
                    .map(|t| t.lines().count())
                    .unwrap_or(0)
            };
            // Waits (bounded) until the count moves past `above`.
            let grows_past = |above: usize| async move {
                for _ in 0..200 {
                    if count() > above {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            };
            assert!(grows_past(0).await, "{name}: the ticker never ticked");
            // What it holds against the executor's warm-runner budget.
            let held = runner.resident.as_ref().unwrap().memory_bytes();
            assert!(
                held > 0,
                "{name}: a running container reads as holding no memory"
            );

            runner.resident.as_ref().unwrap().pause();
            // Whatever was in flight when the freezer was set lands first.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let frozen_at = count();
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(count(), frozen_at, "{name}: the paused runner kept running");

            runner.resident.as_ref().unwrap().resume();
            assert!(
                grows_past(frozen_at).await,
                "{name}: the resumed runner stayed frozen"
            );
            let (outcome, stdout, _) = runner
                .run(&*backend, &["echo", "still serving"], "", &limits())
                .await;
            assert_eq!(
                (outcome.exit_code, stdout.as_str()),
                (0, "still serving\n"),
                "{name}"
            );

            // Frozen, and then dropped: the container still goes.
            runner.resident.as_ref().unwrap().pause();
            let container = runner.container();
            runner.resident = None;
            assert!(
                gone_within_a_minute(name, &container).await,
                "{name}: a frozen runner's container stayed"
            );
        });
    }
}
