//! The isolation probes of a real `kiln executor`, seen from a real `kiln
//! serve`: each container runtime is offered only after a trial container
//! ran (the server's "executor registered" line lists what the executor
//! advertises), and a runtime that answers but cannot start containers is
//! left out, the executor's log saying why in the runtime's own words.
//! The failing runtimes are fakes that need neither dockerd nor podman: a
//! daemon speaking just enough of the Engine API, a `podman` script. The
//! working ones are the real dockerd and podman (`scripts/services.sh
//! start`); without them that test is skipped, or fails under CI.

mod common;

use common::Process;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Upper bound for anything that could hang; never a pass/fail threshold.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// The executor's log up to its probe result for each of `names` (each
/// logged as `isolation type offered` or `... not offered`, with
/// `isolation=NAME`).
fn probe_results(executor: &Process, names: &[&str]) -> Vec<String> {
    let fields: Vec<String> = names.iter().map(|n| format!("isolation={n} ")).collect();
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    executor.log_until_all(&fields)
}

/// `kiln serve` without an embedded executor; it and its address.
fn serve(data_dir: &Path) -> (Process, String) {
    let (server, url) = common::serve_without_executor("127.0.0.1:0", data_dir, &[]);
    let address = url
        .strip_prefix("grpc://")
        .unwrap_or_else(|| panic!("not a plaintext address: {url}"))
        .to_string();
    (server, address)
}

/// `kiln executor` offering `isolation`, plus `extra` flags.
fn executor(address: &str, work_dir: &Path, isolation: &str, extra: &[&str]) -> Process {
    common::open_to_actions(work_dir);
    let scheduler = format!("grpc://{address}");
    let mut args = vec![
        "executor",
        "--scheduler",
        &scheduler,
        "--name",
        "probed",
        "--work-dir",
        work_dir.to_str().unwrap(),
        "--isolation",
        isolation,
    ];
    args.extend_from_slice(extra);
    Process::spawn(&args)
}

/// The `isolation_types` the server's "executor registered" line lists.
fn registered_types(server: &Process) -> String {
    let lines = server.log_until_all(&["executor registered"]);
    let line = lines.last().unwrap();
    let start = line
        .find("isolation_types=")
        .unwrap_or_else(|| panic!("no isolation_types in {line:?}"));
    let end = start + line[start..].find(']').expect("a list") + 1;
    line[start..end].to_string()
}

/// The executor's "isolation type not offered" line for `isolation`.
fn not_offered_line(lines: &[String], isolation: &str) -> String {
    lines
        .iter()
        .find(|line| {
            line.contains("isolation type not offered")
                && line.contains(&format!("isolation={isolation} "))
        })
        .unwrap_or_else(|| {
            panic!(
                "no line says why {isolation} is not offered:\n{}",
                lines.join("\n")
            )
        })
        .clone()
}

/// What runc says on a host that cannot grant the rlimits asked for.
const RUNC_ERROR: &str = "runc create failed: unable to start container process: \
     error during container init: error setting rlimit type 7: operation not permitted";

/// A `podman` script answering every question like podman 4.3; `run` does
/// `run_does` (shell).
fn fake_podman(dir: &Path, run_does: &str) -> PathBuf {
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
  run) {run_does} ;;
  *) echo "fake podman: unexpected $*" >&2; exit 2 ;;
esac
"#
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// A daemon on a unix socket that answers the Engine API's questions like
/// dockerd 20.10 (ping, version, info, the image is there) but refuses to
/// create any container, with runc's error. One thread per connection;
/// each answer closes its connection, so no request parsing beyond the
/// head and a `Content-Length` body is needed.
fn fake_dockerd(socket: &Path) {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || answer(stream));
        }
    });
}

fn answer(mut stream: UnixStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    let _ = stream.read_exact(&mut body);
    let mut request = head.split_whitespace();
    let (method, target) = (request.next().unwrap_or(""), request.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let path = path.strip_prefix("/v1.41").unwrap_or(path);
    let (status, body) = match (method, path) {
        (_, "/_ping") => (200, "OK".to_string()),
        (_, "/version") => (
            200,
            r#"{"ApiVersion":"1.41","Version":"20.10.24-fake"}"#.into(),
        ),
        (_, "/info") => (
            200,
            r#"{"DefaultRuntime":"runc","Runtimes":{"runc":{"path":"runc"}}}"#.into(),
        ),
        (_, "/containers/json") => (200, "[]".into()),
        ("GET", image) if image.starts_with("/images/") && image.ends_with("/json") => {
            (200, r#"{"Id":"sha256:0123"}"#.into())
        }
        ("POST", "/containers/create") => (
            500,
            format!(
                r#"{{"message":"failed to create shim task: OCI runtime create failed: {RUNC_ERROR}: unknown"}}"#
            ),
        ),
        ("DELETE", _) => (204, String::new()),
        _ => (404, r#"{"message":"fake dockerd: no such thing"}"#.into()),
    };
    let response = format!(
        "HTTP/1.1 {status} FAKE\r\nContent-Type: application/json\r\nApi-Version: 1.41\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

#[test]
fn runtimes_that_cannot_start_containers_are_not_offered_and_the_log_says_why() {
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("docker.sock");
    fake_dockerd(&socket);
    let podman = fake_podman(
        scratch.path(),
        &format!("echo 'Error: {RUNC_ERROR}' >&2; exit 126"),
    );
    let (server, address) = serve(&scratch.path().join("server"));
    let executor = executor(
        &address,
        &scratch.path().join("executor"),
        "none,docker,podman",
        &[
            "--docker-socket",
            socket.to_str().unwrap(),
            "--podman-binary",
            podman.to_str().unwrap(),
        ],
    );

    assert_eq!(registered_types(&server), r#"isolation_types=["none"]"#);
    let lines = probe_results(&executor, &["docker", "podman"]);
    let docker = not_offered_line(&lines, "docker");
    assert!(
        docker.contains("the trial action `/true` could not run"),
        "{docker}"
    );
    assert!(docker.contains("error setting rlimit type 7"), "{docker}");
    let podman = not_offered_line(&lines, "podman");
    assert!(
        podman.contains("the trial action `/true` failed with exit code 126"),
        "{podman}"
    );
    assert!(podman.contains("error setting rlimit type 7"), "{podman}");
}

#[test]
fn a_probe_that_hangs_is_given_up_after_the_probe_timeout() {
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("run.pid");
    let podman = fake_podman(
        scratch.path(),
        &format!("echo $$ > {}; exec sleep 300", pid_file.display()),
    );
    let (server, address) = serve(&scratch.path().join("server"));
    let started = Instant::now();
    let executor = executor(
        &address,
        &scratch.path().join("executor"),
        "none,podman",
        &[
            "--podman-binary",
            podman.to_str().unwrap(),
            "--probe-timeout-s",
            "2",
        ],
    );

    let lines = probe_results(&executor, &["podman"]);
    let podman = not_offered_line(&lines, "podman");
    assert!(podman.contains("did not finish within 2s"), "{podman}");
    assert_eq!(registered_types(&server), r#"isolation_types=["none"]"#);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "start-up took {:?}",
        started.elapsed()
    );
    // The hung `podman run` went with the dropped probe.
    let pid = std::fs::read_to_string(&pid_file).expect("the trial reached `podman run`");
    let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
    let deadline = Instant::now() + HANG_GUARD;
    while proc_dir.exists() && !is_zombie(&proc_dir) {
        assert!(Instant::now() < deadline, "the hung podman run still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(proc_dir: &Path) -> bool {
    std::fs::read_to_string(proc_dir.join("stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn working_runtimes_are_offered_once_their_trial_container_ran() {
    let available: Vec<&str> = ["docker", "podman"]
        .into_iter()
        .filter(|name| common::runtime_available(name))
        .collect();
    if available.is_empty() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (server, address) = serve(&scratch.path().join("server"));
    let offer = format!("none,{}", available.join(","));
    let executor = executor(&address, &scratch.path().join("executor"), &offer, &[]);

    let registered = registered_types(&server);
    for name in &available {
        assert!(registered.contains(&format!("\"{name}\"")), "{registered}");
    }
    let lines = probe_results(&executor, &available);
    for name in &available {
        assert!(
            lines.iter().any(|l| l.contains("isolation type offered")
                && l.contains(&format!("isolation={name} "))),
            "{name} offered:\n{}",
            lines.join("\n")
        );
        // The trial container is gone; the executor's owner has none left.
        let owner_filter = format!(
            "label=kiln.owner=kiln-worker:{}",
            scratch.path().join("executor").display()
        );
        let left = Command::new(name)
            .args(["ps", "-a", "-q", "--filter", &owner_filter])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "", "{name}");
    }
}

#[test]
fn an_executor_configured_without_none_does_not_offer_it() {
    if !common::root_available("the sandbox") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (server, address) = serve(&scratch.path().join("server"));
    let _executor = executor(
        &address,
        &scratch.path().join("executor"),
        "sandbox",
        &["--default-isolation", "none"],
    );

    assert_eq!(registered_types(&server), r#"isolation_types=["sandbox"]"#);
}

#[test]
fn an_executor_left_with_nothing_to_offer_without_none_refuses_to_start() {
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("docker.sock");
    fake_dockerd(&socket);
    let (_server, address) = serve(&scratch.path().join("server"));
    let mut executor = executor(
        &address,
        &scratch.path().join("executor"),
        "docker",
        &["--docker-socket", socket.to_str().unwrap()],
    );

    let deadline = Instant::now() + HANG_GUARD;
    let status = loop {
        if let Some(status) = executor.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the executor still runs");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut log = Vec::new();
    while let Ok(line) = executor.stderr.recv_timeout(Duration::from_secs(10)) {
        log.push(line);
    }
    let log = log.join("\n");
    assert!(
        log.contains("none of the configured isolation types (docker) works on this host"),
        "{log}"
    );
}

#[test]
fn firecracker_is_offered_once_a_trial_action_ran_in_a_vm_and_a_broken_kernel_is_named() {
    let scratch = tempfile::tempdir().unwrap();
    let (server, address) = serve(&scratch.path().join("server"));
    let vm_flags = |name: &str| {
        vec![
            "--vm-run-dir".to_string(),
            scratch.path().join(name).join("run").display().to_string(),
            "--vm-cache-dir".to_string(),
            scratch
                .path()
                .join(name)
                .join("cache")
                .display()
                .to_string(),
        ]
    };

    // A kernel path that holds nothing: not offered, and the log says why.
    let broken_kernel = scratch.path().join("no-such-vmlinuz");
    let mut flags = vm_flags("broken");
    flags.extend(["--vm-kernel".into(), broken_kernel.display().to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let broken = executor(
        &address,
        &scratch.path().join("broken"),
        "none,firecracker",
        &flags,
    );
    let lines = probe_results(&broken, &["firecracker"]);
    let line = not_offered_line(&lines, "firecracker");
    assert!(
        line.contains(&broken_kernel.display().to_string()),
        "the reason does not name the kernel: {line}"
    );
    assert_eq!(registered_types(&server), r#"isolation_types=["none"]"#);
    drop(broken);

    // The installed kernel (scripts/install-deps.sh): offered once a trial
    // action ran in a VM, and no VM is left of the trial.
    let flags = vm_flags("working");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let working = executor(
        &address,
        &scratch.path().join("working"),
        "none,firecracker",
        &flags,
    );
    let lines = probe_results(&working, &["firecracker"]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("isolation type offered") && l.contains("isolation=firecracker ")),
        "firecracker not offered (QEMU and the guest kernel come from \
         scripts/install-deps.sh):\n{}",
        lines.join("\n")
    );
    let run_dir = scratch.path().join("working").join("run");
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the trial left {left:?}");
}
