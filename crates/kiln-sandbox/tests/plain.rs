//! `none` on a root executor ([`PlainProcess`]) through the `Isolation`
//! trait: what it does with the properties it honours the sandbox's way
//! (`dockerNetwork=off`, `dockerInit`, and, where the operator allows it,
//! `dockerRunAsRoot` and `dockerUser`), and its refusals, which name the
//! property and the setting. They need root; without it each test says
//! `skipped: <reason>` and passes (under CI, it fails).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_platform::{DockerNetwork, DockerUser, Platform};
use kiln_sandbox::PlainProcess;
use kiln_worker::{
    CancellationToken, CommandSpec, Isolation, Limits, NoIsolation, ProcessOutcome, RunAs, RunError,
};

/// The action user of a root executor in these tests.
const NOBODY: (u32, u32) = (65534, 65534);

fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI runs as root, this process does not"
    );
    eprintln!("skipped: {test}: needs root");
    false
}

/// A workspace the action user can enter, and an output directory.
struct Action {
    _root: tempfile::TempDir,
    workspace: PathBuf,
    io: PathBuf,
    platform: Platform,
}

impl Action {
    fn new() -> Action {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::Builder::new()
            .prefix("kiln-plain-test-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let workspace = root.path().join("workspace");
        let io = root.path().join("io");
        std::fs::create_dir(&workspace).unwrap();
        std::fs::set_permissions(&workspace, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::create_dir(&io).unwrap();
        Action {
            workspace,
            io,
            _root: root,
            platform: Platform::default(),
        }
    }

    fn spec(&self, script: &str) -> CommandSpec {
        CommandSpec {
            arguments: ["bash", "-c", script].map(String::from).to_vec(),
            environment_variables: vec![("PATH".into(), "/usr/bin:/bin".into())],
            workspace: self.workspace.clone(),
            working_directory: self.workspace.clone(),
            stdout_path: self.io.join("stdout"),
            stderr_path: self.io.join("stderr"),
            output: None,
            platform: Arc::new(self.platform.clone()),
            action_user: Some(NOBODY),
            runner_tmp: None,
            output_paths: Vec::new(),
            owned_directories: Vec::new(),
            input_digests: None,
            stored_outputs: None,
        }
    }

    /// Runs `script` as the worker would: whom it runs as first, then the
    /// run. Returns stdout, after asserting exit code 0.
    async fn run(&self, none: &dyn Isolation, script: &str) -> Result<String, RunError> {
        none.run_as(&self.platform, Some(NOBODY))?;
        let limits = Limits {
            timeout: Duration::from_secs(60),
            grace: Duration::from_secs(1),
            memory_bytes: None,
            cpu_millis: None,
            pids_max: Some(256),
        };
        let outcome: ProcessOutcome = none
            .run(&self.spec(script), &limits, &CancellationToken::new())
            .await?;
        let stderr = std::fs::read_to_string(self.io.join("stderr")).unwrap_or_default();
        assert_eq!(outcome.exit_code, 0, "{outcome:?}: {stderr}");
        Ok(std::fs::read_to_string(self.io.join("stdout")).unwrap_or_default())
    }
}

/// Prints the interfaces of the action's network namespace, then whether
/// it reached the listener on `port`.
fn network_probe(port: u16) -> String {
    format!(
        "awk -F: 'NR > 2 {{ gsub(/ /, \"\", $1); print $1 }}' /proc/net/dev | sort | tr '\\n' ' '; \
         if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; then echo reached; else echo unreachable; fi"
    )
}

#[tokio::test]
async fn docker_network_off_takes_a_none_action_off_the_hosts_network() {
    if !root("docker_network_off_takes_a_none_action_off_the_hosts_network") {
        return;
    }
    let none = PlainProcess::new("kiln");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Unset: the host's network, its loopback services in reach.
    let action = Action::new();
    let stdout = action.run(&none, &network_probe(port)).await.unwrap();
    assert!(stdout.ends_with(" reached\n"), "{stdout}");
    assert_ne!(
        stdout, "lo reached\n",
        "the host has more than lo: {stdout}"
    );
    for docker_init in [false, true] {
        let mut action = Action::new();
        action.platform.docker_network = Some(DockerNetwork::Off);
        action.platform.docker_init = docker_init;
        let stdout = action.run(&none, &network_probe(port)).await.unwrap();
        assert_eq!(
            stdout, "lo unreachable\n",
            "dockerInit={docker_init}: only loopback, the host's listener out of reach"
        );
        // Its own loopback is up: a closed port refuses (a loopback that
        // is down would be unreachable).
        let stdout = action
            .run(
                &none,
                "if (exec 3<>/dev/tcp/127.0.0.1/1) 2>&1 | grep -q 'Connection refused'; \
                 then echo lo-up; else echo lo-down; fi",
            )
            .await
            .unwrap();
        assert_eq!(stdout, "lo-up\n", "dockerInit={docker_init}");
    }
}

#[tokio::test]
async fn docker_init_makes_kilns_init_pid_1_and_it_reaps_orphans() {
    if !root("docker_init_makes_kilns_init_pid_1_and_it_reaps_orphans") {
        return;
    }
    let none = PlainProcess::new("kiln");
    let mut action = Action::new();
    action.platform.docker_init = true;
    // An orphan (its parent exits at once) that then exits: only an init
    // that reaps keeps it from staying a zombie. Bounded wait for that.
    let stdout = action
        .run(
            &none,
            "echo init=$(cat /proc/1/comm) self=$$ uid=$(id -u); \
             sh -c 'sleep 0.2 & exit 0'; \
             for i in $(seq 200); do \
               zombies=$(cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == \"Z\"' | wc -l); \
               alive=$(cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^sleep$'); \
               if [ \"$alive\" = 0 ] && [ \"$zombies\" = 0 ]; then break; fi; sleep 0.05; \
             done; echo alive=$alive zombies=$zombies",
        )
        .await
        .unwrap();
    assert_eq!(
        stdout, "init=kiln-init self=2 uid=65534\nalive=0 zombies=0\n",
        "PID 1 is Kiln's init, the action runs as the action user, and the orphan was reaped"
    );
}

#[tokio::test]
async fn choosing_the_user_is_refused_unless_the_operator_allows_it() {
    if !root("choosing_the_user_is_refused_unless_the_operator_allows_it") {
        return;
    }
    let none = PlainProcess::new("kiln");
    let mut as_root = Action::new();
    as_root.platform.docker_run_as_root = true;
    let mut as_1234 = Action::new();
    as_1234.platform.docker_user = Some(DockerUser::Uid(1234));
    for (action, property) in [
        (&as_root, "dockerRunAsRoot=true"),
        (&as_1234, "dockerUser=1234"),
    ] {
        match action.run(&none, "id -u").await {
            Err(RunError::Unsupported(message)) => {
                assert!(message.starts_with(&format!("{property}: ")), "{message}");
                assert!(message.contains("--none-allow-user-switch"), "{message}");
            }
            other => panic!("{property} was not refused: {other:?}"),
        }
    }

    let allowed = PlainProcess::new("kiln").allowing_user_switch(true);
    assert_eq!(
        allowed.run_as(&as_root.platform, Some(NOBODY)).unwrap(),
        RunAs::Privileged,
        "a root action's inputs must be overlaid or copied"
    );
    assert_eq!(
        allowed.run_as(&as_1234.platform, Some(NOBODY)).unwrap(),
        RunAs::User(1234, 1234)
    );
    // Root keeps the sandbox's capabilities: it cannot mount.
    let stdout = as_root
        .run(
            &allowed,
            "id -u; mkdir -p m; mount -t tmpfs none m 2>/dev/null && echo mounted || echo no-mount",
        )
        .await
        .unwrap();
    assert_eq!(stdout, "0\nno-mount\n");
    let stdout = as_1234.run(&allowed, "id -u; id -g").await.unwrap();
    assert_eq!(stdout, "1234\n1234\n");
    for docker_init in [false, true] {
        as_1234.platform.docker_init = docker_init;
        let stdout = as_1234.run(&allowed, "id -u").await.unwrap();
        assert_eq!(stdout, "1234\n", "dockerInit={docker_init}");
    }
}

#[tokio::test]
async fn a_plain_child_process_refuses_what_it_cannot_honour() {
    for (set, property) in [
        (
            (|p: &mut Platform| p.docker_network = Some(DockerNetwork::Off)) as fn(&mut Platform),
            "dockerNetwork=off",
        ),
        (|p: &mut Platform| p.docker_init = true, "dockerInit=true"),
        (
            |p: &mut Platform| p.docker_run_as_root = true,
            "dockerRunAsRoot=true",
        ),
        (
            |p: &mut Platform| p.docker_user = Some(DockerUser::Name("builder".into())),
            "dockerUser=builder",
        ),
    ] {
        let mut action = Action::new();
        set(&mut action.platform);
        match NoIsolation.run_as(&action.platform, None) {
            Err(RunError::Unsupported(message)) => {
                assert!(message.starts_with(&format!("{property}: ")), "{message}")
            }
            other => panic!("{property} was not refused: {other:?}"),
        }
    }
}
