//! The sandbox's networks, end to end: with `dockerNetwork=bridge` an
//! action reaches machines outside the host (here a network namespace the
//! test joins to the host with a veth pair, standing in for the LAN) but
//! not the host itself, on its loopback or its own addresses; with `off` it
//! reaches nothing; and nothing per action is left behind. Needs root, `ip`
//! (iproute2) and `nft` (nftables); without them each test says
//! `skipped: <reason>` and passes (under CI, it fails).
//!
//! The tests run one at a time: they count this process's interfaces.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kiln_platform::{DockerNetwork, Platform};
use kiln_sandbox::network::{
    interfaces_owned_by, Outbound, DELETION_BOUND, INTERFACE_PREFIX, NFT_TABLE,
};

#[path = "support/outside.rs"]
mod outside;
use kiln_sandbox::{Sandbox, SandboxConfig};
use kiln_worker::{CancellationToken, CommandSpec, Isolation, Limits, ProcessOutcome, StopReason};
use outside::{connect_script, ip, was_reached, Outside};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn skip_or_fail(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("the sandbox's network does not work under CI: {reason}");
    }
    eprintln!("\nskipped: {reason}");
}

fn probe(config: SandboxConfig) -> Result<Sandbox, String> {
    // On a thread of its own: callers are inside a tokio runtime already.
    std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(Sandbox::probe(config))
    })
    .join()
    .unwrap()
}

/// The sandbox, with bridged networks working; None (after saying why)
/// where this host cannot.
fn sandbox() -> Option<&'static Sandbox> {
    static SANDBOX: OnceLock<Result<Sandbox, String>> = OnceLock::new();
    let probed = SANDBOX.get_or_init(|| {
        let sandbox = probe(SandboxConfig::default())?;
        sandbox
            .bridge_network()
            .map_err(|reason| format!("no bridged network: {reason}"))?;
        Ok(sandbox)
    });
    match probed {
        Ok(sandbox) => Some(sandbox),
        Err(reason) => {
            skip_or_fail(reason);
            None
        }
    }
}

/// Whether link `name` exists in this process's network namespace (asked
/// of `ip`: `/sys/class/net` shows the namespace sysfs was mounted in).
fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .expect("running ip (iproute2)")
        .status
        .success()
}

struct Action {
    root: tempfile::TempDir,
    platform: Platform,
    limits: Limits,
}

impl Action {
    fn new(network: DockerNetwork, docker_init: bool) -> Action {
        let root = tempfile::Builder::new()
            .prefix("kiln-sandbox-net-test-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir(root.path().join("workspace")).unwrap();
        let mut platform = Platform::default();
        platform.docker_network = Some(network);
        platform.docker_init = docker_init;
        Action {
            root,
            platform,
            limits: Limits {
                timeout: Duration::from_secs(60),
                grace: Duration::from_secs(1),
                memory_bytes: Some(256 << 20),
                cpu_millis: None,
                pids_max: Some(256),
            },
        }
    }

    fn spec(&self, script: &str) -> CommandSpec {
        let workspace = self.root.path().join("workspace");
        CommandSpec {
            arguments: vec!["bash".into(), "-c".into(), script.into()],
            environment_variables: vec![("PATH".into(), "/usr/bin:/bin".into())],
            workspace: workspace.clone(),
            working_directory: workspace,
            stdout_path: self.root.path().join("stdout"),
            stderr_path: self.root.path().join("stderr"),
            output: None,
            platform: Arc::new(self.platform.clone()),
            action_user: None,
            runner_tmp: None,
            output_paths: Vec::new(),
            owned_directories: Vec::new(),
            input_digests: None,
            stored_outputs: None,
        }
    }

    async fn run(&self, sandbox: &Sandbox, script: &str) -> (ProcessOutcome, String, String) {
        let spec = self.spec(script);
        let outcome = sandbox
            .run(&spec, &self.limits, &CancellationToken::new())
            .await
            .unwrap();
        let read = |name| std::fs::read_to_string(self.root.path().join(name)).unwrap_or_default();
        (outcome, read("stdout"), read("stderr"))
    }
}

#[tokio::test]
async fn a_bridged_action_reaches_outside_but_not_the_host() {
    let Some(sandbox) = sandbox() else { return };
    let _serial = SERIAL.lock().await;
    let outside = Outside::new();
    for docker_init in [false, true] {
        let outside_listener = outside.listen();
        let outside_port = outside_listener.local_addr().unwrap().port();
        // On every host address, loopback included.
        let host_listener = TcpListener::bind("0.0.0.0:0").unwrap();
        let host_port = host_listener.local_addr().unwrap().port();
        let host_targets = outside.host_targets(host_port);
        let outside_target = format!("{}:{outside_port}", outside.address);
        let mut targets = host_targets.clone();
        targets.push(outside_target.clone());

        let action = Action::new(DockerNetwork::Bridge, docker_init);
        let (outcome, stdout, stderr) = action.run(sandbox, &connect_script(&targets)).await;

        assert_eq!(outcome.exit_code, 0, "{stderr}");
        let mut expected: Vec<String> = host_targets
            .iter()
            .map(|target| format!("blocked {target}"))
            .chain([format!("reached {outside_target}")])
            .collect();
        expected.sort();
        assert_eq!(
            stdout.lines().collect::<Vec<_>>(),
            expected,
            "dockerInit={docker_init}"
        );
        assert!(
            was_reached(&outside_listener),
            "the outside listener saw the connection"
        );
        assert!(
            !was_reached(&host_listener),
            "nothing reached the host's listener"
        );
    }
}

#[tokio::test]
async fn a_bridged_action_has_its_own_interface_a_default_route_and_the_hosts_resolvers() {
    let Some(sandbox) = sandbox() else { return };
    let _serial = SERIAL.lock().await;
    let action = Action::new(DockerNetwork::Bridge, false);
    let (outcome, stdout, stderr) = action
        .run(
            sandbox,
            "ls /sys/class/net; awk '$2 == \"00000000\" {print \"default via\", $1}' /proc/net/route; \
             grep -c nameserver /etc/resolv.conf",
        )
        .await;
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    let host_resolvers = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap()
        .lines()
        .filter(|line| line.contains("nameserver"))
        .count();
    assert_eq!(
        stdout,
        format!("eth0\nlo\ndefault via eth0\n{host_resolvers}\n")
    );
}

#[tokio::test]
async fn an_action_without_network_reaches_neither_outside_nor_the_host() {
    let Some(sandbox) = sandbox() else { return };
    let _serial = SERIAL.lock().await;
    let outside = Outside::new();
    let outside_listener = outside.listen();
    let host_listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let targets = [
        format!("127.0.0.1:{host_port}"),
        format!("{}:{host_port}", outside.host_address),
        format!(
            "{}:{}",
            outside.address,
            outside_listener.local_addr().unwrap().port()
        ),
    ];
    let action = Action::new(DockerNetwork::Off, false);
    let (outcome, stdout, stderr) = action.run(sandbox, &connect_script(&targets)).await;
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert!(
        stdout.lines().all(|line| line.starts_with("blocked ")) && stdout.lines().count() == 3,
        "{stdout}"
    );
    assert!(!was_reached(&outside_listener));
    assert!(!was_reached(&host_listener));
}

#[tokio::test]
async fn nothing_per_action_is_left_after_a_run_or_a_killed_action() {
    let Some(sandbox) = sandbox() else { return };
    let _serial = SERIAL.lock().await;
    let pid = std::process::id();
    let rules_before = nft_rules();
    let action = Action::new(DockerNetwork::Bridge, false);
    let (outcome, stdout, _) = action
        .run(sandbox, "ls /sys/class/net | grep -c eth0")
        .await;
    assert_eq!((outcome.exit_code, stdout.as_str()), (0, "1\n"));
    sandbox.networks_released().await;
    assert_eq!(interfaces_owned_by(pid), Vec::<String>::new());

    for docker_init in [false, true] {
        // The action says it started through a FIFO in its workspace, then
        // waits (with a child of its own) until it is killed.
        let action = Action::new(DockerNetwork::Bridge, docker_init);
        let fifo = action.root.path().join("workspace/started");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let spec = action.spec("echo started > started; sleep 600 & sleep 600");
        let cancel = CancellationToken::new();
        let unblock = fifo.clone();
        let running = async {
            let outcome = sandbox.run(&spec, &action.limits, &cancel).await;
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
        let watch = async {
            let line = tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(line, "started\n");
            let during = interfaces_owned_by(pid);
            cancel.cancel();
            during
        };
        let (outcome, during) = tokio::join!(running, watch);
        assert_eq!(
            during.len(),
            1,
            "the running action's interface: {during:?}"
        );
        assert_eq!(outcome.unwrap().stopped, Some(StopReason::Cancelled));
        sandbox.networks_released().await;
        assert_eq!(interfaces_owned_by(pid), Vec::<String>::new());
        assert!(!link_exists(&during[0]));
    }
    assert_eq!(nft_rules(), rules_before, "no rule is added per action");
}

/// The sandbox table's rules, as nft lists them.
fn nft_rules() -> String {
    let output = Command::new("nft")
        .args(["list", "table", "inet", NFT_TABLE])
        .output()
        .expect("running nft");
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn an_interface_whose_namespace_outlives_its_action_is_deleted_after_the_bound() {
    if sandbox().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let pid = std::process::id();
    let config = SandboxConfig::default();
    let outbound = Outbound::set_up(&config.network_cidr, &config.nft_binary).unwrap();

    // Released as nothing else holds it: gone with its namespace.
    let network = outbound.connect().unwrap();
    assert_eq!(interfaces_owned_by(pid).len(), 1);
    outbound.release(network).await;
    outbound.released().await;
    assert_eq!(interfaces_owned_by(pid), Vec::<String>::new());

    // Released while something else (here this test) still holds its
    // namespace: deleted outright once the bound has passed.
    let network = outbound.connect().unwrap();
    let held = std::fs::File::open(network.path()).unwrap();
    let interface = interfaces_owned_by(pid);
    assert_eq!(interface.len(), 1);
    let released = std::time::Instant::now();
    outbound.release(network).await;
    outbound.released().await;
    assert!(
        released.elapsed() >= DELETION_BOUND,
        "waited {:?} for a namespace still held",
        released.elapsed()
    );
    assert!(!link_exists(&interface[0]));
    assert_eq!(interfaces_owned_by(pid), Vec::<String>::new());
    drop(held);
}

#[tokio::test]
async fn interfaces_left_by_a_dead_executor_are_deleted_at_start_up() {
    if sandbox().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    // What an executor killed with SIGKILL leaves: an interface whose alias
    // names an owner that is gone (pid 1 never has start time 0).
    let name = format!("{INTERFACE_PREFIX}{}", 60_000 + std::process::id() % 5_000);
    let peer = format!("ktl{}", std::process::id() % 100_000);
    ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
    ip(&["link", "set", &name, "alias", "kiln-sandbox owner=1:0"]);
    let exists = link_exists;
    assert!(exists(&name));

    let probed = probe(SandboxConfig::default());

    let (left, peer_left) = (exists(&name), exists(&peer));
    if left || peer_left {
        let _ = Command::new("ip").args(["link", "del", &name]).output();
    }
    probed.unwrap();
    assert!(!left && !peer_left, "the leftover pair was deleted");
}

#[tokio::test]
async fn without_nft_bridge_is_refused_naming_it_and_nothing_falls_back_to_the_host() {
    if sandbox().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let config = SandboxConfig {
        nft_binary: PathBuf::from("/nonexistent/nft"),
        ..SandboxConfig::default()
    };
    let sandbox = probe(config).expect("the sandbox itself still works");
    let reason = sandbox.bridge_network().unwrap_err();
    assert!(
        reason.contains("/nonexistent/nft") && reason.contains("nftables"),
        "{reason}"
    );

    let host_listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = host_listener.local_addr().unwrap().port();
    let bridged = Action::new(DockerNetwork::Bridge, false);
    let spec = bridged.spec("true");
    let error = sandbox
        .run(&spec, &bridged.limits, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, kiln_worker::RunError::Unsupported(message)
            if message.starts_with("dockerNetwork=bridge:") && message.contains("nftables")),
        "{error:?}"
    );

    // An action that does not choose runs without network, not on the
    // host's.
    let mut unset = Action::new(DockerNetwork::Off, false);
    unset.platform.docker_network = None;
    let (outcome, stdout, stderr) = unset
        .run(
            &sandbox,
            &format!(
                "ls /sys/class/net; {}",
                connect_script(&[format!("127.0.0.1:{port}")])
            ),
        )
        .await;
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert_eq!(stdout, format!("lo\nblocked 127.0.0.1:{port}\n"));
    assert!(!was_reached(&host_listener));
}
