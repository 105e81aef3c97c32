//! End-to-end checks of the `sandbox` backend through the `Isolation`
//! trait: real commands in a real workspace, asserting what a user would
//! check from inside and outside. They need root and cgroups; without them
//! each test says `skipped: <reason>` and passes (under CI, it fails).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kiln_platform::{DockerNetwork, DockerUser, Platform};
use kiln_sandbox::cgroup::{action_cgroup_name, CgroupRoot, Version};
use kiln_sandbox::{Sandbox, SandboxConfig};
use kiln_worker::{
    CancellationToken, CommandSpec, Isolation, Limits, NoIsolation, ProcessOutcome, StopReason,
};

fn sandbox() -> Option<&'static Sandbox> {
    static SANDBOX: OnceLock<Result<Sandbox, String>> = OnceLock::new();
    // On a thread of its own: callers are inside a tokio runtime already.
    let probe = || {
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(Sandbox::probe(SandboxConfig::default()))
        })
        .join()
        .unwrap()
    };
    match SANDBOX.get_or_init(probe) {
        Ok(sandbox) => Some(sandbox),
        Err(reason) => {
            // CI runs as root on a host with cgroups: there a failed probe
            // is a failure, not a skip.
            if std::env::var_os("CI").is_some() {
                panic!("the sandbox does not work under CI: {reason}");
            }
            use std::io::Write as _;
            let _ = std::io::stderr().write_all(format!("\nskipped: {reason}\n").as_bytes());
            None
        }
    }
}

#[test]
fn the_sandbox_can_be_shared_as_an_isolation() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Sandbox>();
    let _: Option<Arc<dyn Isolation>> = None::<Arc<Sandbox>>.map(|s| s as Arc<dyn Isolation>);
}

/// A workspace and an output directory beside it, under /tmp.
struct Action {
    _root: tempfile::TempDir,
    workspace: PathBuf,
    io: PathBuf,
    platform: Platform,
    limits: Limits,
}

impl Action {
    /// An action started the default way (`dockerInit` unset: the action
    /// is PID 1) or with an init.
    fn with_init(docker_init: bool) -> Action {
        let mut action = Action::new();
        action.platform.docker_init = docker_init;
        action
    }

    fn new() -> Action {
        let root = tempfile::Builder::new()
            .prefix("kiln-sandbox-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let workspace = root.path().join("workspace");
        let io = root.path().join("io");
        std::fs::create_dir(&workspace).unwrap();
        std::fs::create_dir(&io).unwrap();
        let mut platform = Platform::default();
        platform.docker_network = Some(DockerNetwork::Off);
        Action {
            workspace,
            io,
            _root: root,
            platform,
            limits: Limits {
                timeout: Duration::from_secs(60),
                grace: Duration::from_secs(1),
                memory_bytes: Some(512 << 20),
                cpu_millis: None,
                pids_max: Some(256),
            },
        }
    }

    fn spec(&self, arguments: &[&str]) -> CommandSpec {
        CommandSpec {
            arguments: arguments.iter().map(|a| a.to_string()).collect(),
            environment_variables: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("KILN_TEST".into(), "yes".into()),
            ],
            workspace: self.workspace.clone(),
            working_directory: self.workspace.clone(),
            stdout_path: self.io.join("stdout"),
            stderr_path: self.io.join("stderr"),
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

    async fn run_with(
        &self,
        isolation: &dyn Isolation,
        arguments: &[&str],
    ) -> (ProcessOutcome, String, String) {
        let outcome = isolation
            .run(
                &self.spec(arguments),
                &self.limits,
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        let stdout = std::fs::read_to_string(self.io.join("stdout")).unwrap_or_default();
        let stderr = std::fs::read_to_string(self.io.join("stderr")).unwrap_or_default();
        (outcome, stdout, stderr)
    }

    async fn run(&self, sandbox: &Sandbox, script: &str) -> (ProcessOutcome, String, String) {
        self.run_with(sandbox, &["bash", "-c", script]).await
    }
}

/// Host processes whose command line contains `token`.
fn host_processes_with(token: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(token) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

#[tokio::test]
async fn outputs_in_the_workspace_reach_the_host_and_the_environment_is_exact() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let action = Action::with_init(docker_init);
        std::fs::write(action.workspace.join("input.txt"), "from the host\n").unwrap();
        let (outcome, stdout, stderr) = action
            .run(sandbox, "cat input.txt > output.txt && pwd && env | sort")
            .await;
        assert_eq!(outcome.exit_code, 0, "{stderr}");
        assert_eq!(
            std::fs::read_to_string(action.workspace.join("output.txt")).unwrap(),
            "from the host\n"
        );
        let workspace = action.workspace.display().to_string();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines[0], workspace, "the workspace is at its own path");
        // bash adds PWD, SHLVL and _ itself; nothing else is added.
        let mut variables: Vec<&str> = lines[1..]
            .iter()
            .copied()
            .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
            .collect();
        variables.sort();
        assert_eq!(variables, ["KILN_TEST=yes", "PATH=/usr/bin:/bin"]);
    }
}

#[tokio::test]
async fn a_program_busy_for_a_moment_still_starts() {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let action = Action::with_init(docker_init);
        let program = action.workspace.join("tool");
        let mut writer = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&program)
            .unwrap();
        writer.write_all(b"#!/bin/sh\nexit 7\n").unwrap();
        // Held open for writing, as a fork elsewhere in the executor holds
        // a just-written input until that fork execs: ETXTBSY meanwhile.
        let release = std::thread::spawn(move || {
            std::thread::sleep(kiln_worker::process::BUSY_TEXT_PAUSE * 5);
            drop(writer);
        });
        let (outcome, _, stderr) = action.run_with(sandbox, &["./tool"]).await;
        release.join().unwrap();
        assert_eq!(outcome.exit_code, 7, "init {docker_init}: {stderr}");
    }
}

#[tokio::test]
async fn the_system_is_read_only_and_tmp_is_private() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let action = Action::with_init(docker_init);
        let marker = format!("kiln-sandbox-tmp-{}", std::process::id());
        let (outcome, _, stderr) = action
        .run(
            sandbox,
            &format!(
                "if touch /usr/{marker} 2>/dev/null; then echo usr-writable; exit 1; fi; \
                 if touch /{marker} 2>/dev/null; then echo root-writable; exit 1; fi; \
                 touch /tmp/{marker} && test -e /tmp/{marker} && echo x > /dev/null && echo ok > /dev/shm/x"
            ),
        )
        .await;
        assert_eq!(outcome.exit_code, 0, "{stderr}");
        assert!(!Path::new("/usr").join(&marker).exists());
        assert!(
            !Path::new("/tmp").join(&marker).exists(),
            "/tmp is the host's"
        );
    }
}

#[tokio::test]
async fn host_secrets_and_other_directories_are_invisible() {
    let Some(sandbox) = sandbox() else { return };
    let secret_dir = PathBuf::from(format!(
        "/var/tmp/kiln-sandbox-test-secret-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("secret.txt"), "hunter2").unwrap();
    let other = Action::new();
    std::fs::write(other.workspace.join("theirs.txt"), "another action").unwrap();
    let action = Action::new();
    let (outcome, stdout, stderr) = action
        .run(
            sandbox,
            &format!(
                "for p in {secret} {secret}/secret.txt {other} /var/lib/kiln /root/.cargo /run/kiln-sandbox /var/tmp; do \
                   test -e $p && echo visible: $p; done; \
                 ls -A /root 2>/dev/null | sed 's/^/in root: /'; \
                 cat /etc/shadow /etc/gshadow 2>/dev/null; \
                 test -r /etc/passwd && echo passwd-readable",
                secret = secret_dir.display(),
                other = other.workspace.display(),
            ),
        )
        .await;
    std::fs::remove_dir_all(&secret_dir).unwrap();
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert_eq!(stdout, "passwd-readable\n", "only /etc/passwd may show");
}

#[tokio::test]
async fn the_sandbox_sees_only_its_own_processes() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let action = Action::with_init(docker_init);
        let (outcome, stdout, stderr) = action
            .run(
                sandbox,
                "cat /proc/1/comm; echo self $$; ps -e -o pid=,comm= | wc -l",
            )
            .await;
        assert_eq!(outcome.exit_code, 0, "{stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        if docker_init {
            assert_eq!(lines[0], "kiln-init", "PID 1 is the sandbox's init");
            assert_eq!(
                lines[1], "self 2",
                "the action is the first process after init"
            );
        } else {
            assert_eq!(lines[0], "bash", "the action is PID 1");
            assert_eq!(lines[1], "self 1");
        }
        // (init,) bash, ps and wc: not the host's hundreds.
        let count: usize = lines[2].trim().parse().unwrap();
        assert!(count <= 4, "ps saw {count} processes");
    }
}

#[tokio::test]
async fn no_network_with_docker_network_off() {
    let Some(sandbox) = sandbox() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    for docker_init in [false, true] {
        let action = Action::with_init(docker_init);
        let (outcome, stdout, stderr) = action
            .run(
                sandbox,
                &format!(
                    "ls /sys/class/net; \
                 if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo reached; fi 2>/dev/null"
                ),
            )
            .await;
        assert_eq!(outcome.exit_code, 0, "{stderr}");
        assert_eq!(
            stdout, "lo\n",
            "only loopback, and the host's listener is out of reach"
        );
    }
}

#[tokio::test]
async fn a_memory_hog_is_killed_and_says_so() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let mut action = Action::with_init(docker_init);
        action.limits.memory_bytes = Some(64 << 20);
        let (outcome, _, stderr) = action
            .run(
                sandbox,
                r#"x=$(head -c 300M /dev/zero | tr "\0" a); echo survived"#,
            )
            .await;
        assert!(outcome.memory_exceeded, "{outcome:?} {stderr}");
        assert_ne!(outcome.exit_code, 0);
        assert_eq!(outcome.stopped, None);
    }
}

#[tokio::test]
async fn a_tiny_memory_limit_is_raised_to_the_floor() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let mut action = Action::with_init(docker_init);
        action.limits.memory_bytes = Some(64 << 10);
        let (outcome, stdout, stderr) = action.run(sandbox, "echo alive").await;
        assert_eq!(outcome.exit_code, 0, "{stderr}");
        assert_eq!(stdout, "alive\n");
    }
}

#[tokio::test]
async fn a_fork_bomb_is_contained_by_pids_max() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let mut action = Action::with_init(docker_init);
        action.limits.pids_max = Some(64);
        action.limits.timeout = Duration::from_secs(20);
        let token = format!("kiln-fork-bomb-{}", std::process::id());
        // The bomb grows while its parent waits; the comment names it on the host.
        let (outcome, _, stderr) = action
            .run(sandbox, &format!(":(){{ :|:& }};:; sleep 5 # {token}"))
            .await;
        // It ends (by itself or by the timeout), and nothing of it is left.
        assert!(!outcome.memory_exceeded, "{outcome:?}");
        assert!(
            stderr.contains("fork") || outcome.stopped.is_some(),
            "pids.max was never hit: {stderr}"
        );
        assert_eq!(host_processes_with(&token), Vec::<String>::new());
        // The host still starts processes, sandboxed or not (a plain
        // process in the host's network: `none` refuses dockerNetwork=off).
        let mut after = Action::new();
        after.platform.docker_network = None;
        assert_eq!(
            after
                .run_with(&NoIsolation, &["/bin/true"])
                .await
                .0
                .exit_code,
            0
        );
        after.platform.docker_network = Some(DockerNetwork::Off);
        assert_eq!(after.run(sandbox, "true").await.0.exit_code, 0);
    }
}

#[tokio::test]
async fn a_timeout_kills_the_whole_sandbox() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let mut action = Action::with_init(docker_init);
        // Ample time for the grandchild to start before the stop begins.
        action.limits.timeout = Duration::from_secs(2);
        action.limits.grace = Duration::from_millis(500);
        let token = format!("kiln-grandchild-{}", std::process::id());
        // The grandchild ignores the polite SIGTERM and would write a marker
        // much later; only the sandbox's end can stop it.
        let (outcome, _, stderr) = action
            .run(
                sandbox,
                &format!(
                "(trap '' TERM; touch started; exec -a {token} bash -c 'sleep 3600; touch late') & \
                 while [ ! -e started ]; do sleep 0.01; done; sleep 3600"
            ),
            )
            .await;
        assert_eq!(outcome.stopped, Some(StopReason::Timeout), "{stderr}");
        assert!(action.workspace.join("started").exists());
        assert_eq!(host_processes_with(&token), Vec::<String>::new());
        assert!(!action.workspace.join("late").exists());
    }
}

#[tokio::test]
async fn an_action_ignoring_sigterm_is_killed_after_the_grace_period() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let mut action = Action::with_init(docker_init);
        // Ample time for bash to set its trap before the stop begins.
        action.limits.timeout = Duration::from_secs(2);
        action.limits.grace = Duration::from_millis(300);
        let (outcome, _, stderr) = action
            .run(
                sandbox,
                "trap '' TERM; touch started; sleep 3600; touch late",
            )
            .await;
        assert_eq!(outcome.stopped, Some(StopReason::Timeout), "{stderr}");
        assert_eq!(outcome.signal, Some(SIGKILL), "{outcome:?}");
        assert!(action.workspace.join("started").exists());
        assert!(!action.workspace.join("late").exists());
    }
}

const SIGKILL: i32 = 9;

#[tokio::test]
async fn only_stdio_is_open_in_the_action() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let action = Action::with_init(docker_init);
        // ls's own directory descriptor shows too; nothing else may.
        let (outcome, stdout, stderr) = action.run(sandbox, "ls /proc/self/fd | wc -l").await;
        assert_eq!(outcome.exit_code, 0, "{stderr}");
        assert_eq!(stdout.trim(), "4", "0, 1, 2 and ls's own");
    }
}

#[tokio::test]
async fn the_init_does_not_reveal_the_executor() {
    let Some(sandbox) = sandbox() else { return };
    // Init is a fork of its starter (here the test process, with no
    // launcher installed): its environment and memory are the starter's,
    // and must stay unreadable. (Its command line, readable by
    // anyone as everywhere, is the executor's too.)
    std::env::set_var("KILN_SANDBOX_TEST_SECRET", "hunter2");
    let action = Action::with_init(true);
    let (outcome, stdout, stderr) = action
        .run(
            sandbox,
            "cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'; \
             head -c 16 /proc/1/mem > /dev/null 2>&1 && echo mem-readable; true",
        )
        .await;
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
    assert!(
        !stdout.contains("sandbox-"),
        "the test binary's name showed: {stdout}"
    );
    assert!(!stdout.contains("mem-readable"));
}

/// Waits until `path` exists (the action says it got there).
async fn until_exists(path: &Path) {
    while !path.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn cancelling_stops_the_sandbox() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let action = Action::with_init(docker_init);
        let token = format!("kiln-cancelled-{}-{docker_init}", std::process::id());
        let spec = action.spec(&[
            "bash",
            "-c",
            &format!("(exec -a {token} sleep 3600) & touch started; wait"),
        ]);
        let cancel = CancellationToken::new();
        let run = sandbox.run(&spec, &action.limits, &cancel);
        let started = action.workspace.join("started");
        let cancel_when_started = async {
            until_exists(&started).await;
            cancel.cancel();
        };
        let (outcome, ()) = tokio::join!(run, cancel_when_started);
        let outcome = outcome.unwrap();
        assert_eq!(outcome.stopped, Some(StopReason::Cancelled));
        assert_eq!(host_processes_with(&token), Vec::<String>::new());
    }
}

#[tokio::test]
async fn dropping_a_run_leaves_nothing_behind() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let action = Action::with_init(docker_init);
        let token = format!("kiln-dropped-{}-{docker_init}", std::process::id());
        let spec = action.spec(&[
            "bash",
            "-c",
            &format!("(exec -a {token} sleep 3600) & touch started; wait"),
        ]);
        let cancel = CancellationToken::new();
        let started = action.workspace.join("started");
        tokio::select! {
            _ = sandbox.run(&spec, &action.limits, &cancel) => panic!("the action ended by itself"),
            _ = until_exists(&started) => {}
        }
        // The run future is dropped: its cgroup guard kills what is left and
        // waits until the cgroup is empty.
        assert_eq!(host_processes_with(&token), Vec::<String>::new());
    }
}

#[tokio::test]
async fn docker_user_sets_the_uid_and_gid() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let mut action = Action::with_init(docker_init);
        action.platform.docker_user = Some(DockerUser::UidGid(1000, 1000));
        let (outcome, stdout, stderr) = action.run(sandbox, "id -u; id -g; id -G").await;
        assert_eq!(outcome.exit_code, 0, "{stderr}");
        assert_eq!(stdout, "1000\n1000\n1000\n");
    }
}

#[tokio::test]
async fn docker_user_names_resolve_through_the_host_passwd() {
    let Some(sandbox) = sandbox() else { return };
    let mut action = Action::new();
    action.platform.docker_user = Some(DockerUser::Name("nobody".into()));
    let (outcome, stdout, stderr) = action.run(sandbox, "id -un").await;
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert_eq!(stdout, "nobody\n");
    action.platform.docker_user = Some(DockerUser::Name("no-such-user-kiln".into()));
    let error = sandbox
        .run(
            &action.spec(&["true"]),
            &action.limits,
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("no-such-user-kiln"), "{error}");
}

#[tokio::test]
async fn pseudo_terminals_work() {
    let Some(sandbox) = sandbox() else { return };
    let action = Action::new();
    let (outcome, stdout, stderr) = action
        .run(sandbox, "script -qec 'tty' /dev/null | tr -d '\\r'")
        .await;
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert_eq!(stdout, "/dev/pts/0\n");
}

#[tokio::test]
async fn root_in_the_sandbox_cannot_remount_the_system() {
    let Some(sandbox) = sandbox() else { return };
    let action = Action::new();
    let (outcome, stdout, stderr) = action
        .run(
            sandbox,
            "mount -o remount,rw /usr 2>/dev/null && echo remounted; \
             mount -t tmpfs tmpfs /tmp 2>/dev/null && echo mounted; id -u",
        )
        .await;
    assert_eq!(outcome.exit_code, 0, "{stderr}");
    assert_eq!(stdout, "0\n");
}

#[tokio::test]
async fn a_missing_command_exits_127_naming_it() {
    let Some(sandbox) = sandbox() else { return };
    for docker_init in [false, true] {
        let action = Action::with_init(docker_init);
        let (outcome, _, stderr) = action.run_with(sandbox, &["no-such-tool-kiln", "x"]).await;
        assert_eq!(outcome.exit_code, 127);
        assert!(stderr.contains("no-such-tool-kiln"), "{stderr}");
        // Found on the host but not inside the sandbox: the same answer.
        let hidden = action.io.join("tool");
        std::fs::write(&hidden, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&hidden, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (outcome, _, stderr) = action.run_with(sandbox, &[hidden.to_str().unwrap()]).await;
        assert_eq!(outcome.exit_code, 127, "{stderr}");
        assert!(stderr.contains("tool"), "{stderr}");
    }
}

#[test]
fn a_cgroup_holds_its_processes_and_is_removed_when_dropped() {
    if sandbox().is_none() {
        return;
    }
    let root = CgroupRoot::detect("kiln").unwrap();
    let limits = Limits {
        timeout: Duration::from_secs(1),
        grace: Duration::from_secs(1),
        memory_bytes: Some(32 << 20),
        cpu_millis: Some(500),
        pids_max: Some(8),
    };
    let cgroup = root.create(&action_cgroup_name(), &limits).unwrap();
    let directories: Vec<PathBuf> = cgroup.directories().map(Path::to_path_buf).collect();
    let mut child = std::process::Command::new("sleep")
        .arg("3600")
        .spawn()
        .unwrap();
    cgroup.add_pid(child.id()).unwrap();
    assert_eq!(cgroup.pids().unwrap(), [child.id()]);
    assert!(!cgroup.memory_exceeded());
    // The limits are where the kernel enforces them.
    let read = |file: &str| {
        directories
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .unwrap_or_else(|| panic!("no {file}"))
            .trim()
            .to_string()
    };
    match root.version() {
        Version::V1 => {
            assert_eq!(read("memory.limit_in_bytes"), (32 << 20).to_string());
            assert_eq!(read("cpu.cfs_quota_us"), "50000");
        }
        Version::V2 => {
            assert_eq!(read("memory.max"), (32 << 20).to_string());
            assert_eq!(read("cpu.max"), "50000 100000");
        }
    }
    assert_eq!(read("pids.max"), "8");
    assert!(cgroup.peak_memory_bytes().is_some());
    drop(cgroup);
    assert!(child.wait().unwrap().code().is_none(), "killed by a signal");
    for directory in directories {
        assert!(
            !directory.exists(),
            "{} was not removed",
            directory.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_starts_while_other_threads_allocate() {
    let Some(sandbox) = sandbox() else { return };
    // Started in this process (no launcher), dockerInit's start copies a
    // process whose other threads may hold the allocator's locks at that
    // instant: nothing in the copy may wait for one. Two threads allocate
    // without pause while actions start.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn: Vec<_> = (0..2)
        .map(|seed| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                let mut size = 16 + seed;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    kept.push(vec![0u8; size]);
                    if kept.len() > 64 {
                        kept.clear();
                    }
                    size = size * 7 % 4093 + 16;
                }
            })
        })
        .collect();
    let action = Action::with_init(true);
    for round in 0..40 {
        let started = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            action.run(sandbox, "true"),
        )
        .await;
        let Ok((outcome, _, stderr)) = started else {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            panic!("start {round} under dockerInit never finished");
        };
        assert_eq!(outcome.exit_code, 0, "start {round}: {stderr}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for thread in churn {
        thread.join().unwrap();
    }
}
