//! The platform-property contract driven by a real Bazel client against
//! `kiln serve` (embedded executor off) and two `kiln executor` processes in
//! different pools:
//! - a genrule with `Pool` and an sh_test with `test.Pool` run only on the
//!   executor of their pool (each prints its working directory, which lies
//!   under its executor's `--work-dir`);
//! - a registry password sent as a `x-buildbuddy-platform.` header never
//!   reaches the server's or executors' logs, the data dir or Bazel's output;
//! - `default-timeout` + `termination-grace-period`: an action that traps
//!   SIGTERM is stopped, runs its handler during the grace period, is then
//!   SIGKILLed, and fails as a timeout with its partial output shown by Bazel;
//! - a malformed `EstimatedMemory` fails the build with a message naming it.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{combined, Bazel, KilnServer};

/// Upper bound for anything that could hang; never a pass/fail threshold.
const HANG_GUARD: Duration = Duration::from_secs(120);

const SECRET: &str = "kiln-test-SECRET-7f3a9c1e5b";

const BUILD: &str = r#"
genrule(
    name = "in_alpha",
    outs = ["in_alpha.txt"],
    cmd = "pwd > $@",
    exec_properties = {"Pool": "alpha"},
)

sh_test(
    name = "in_beta_test",
    size = "small",
    srcs = ["print_pwd.sh"],
    exec_properties = {"test.Pool": "beta"},
)

# No exec_properties: Bazel sends --remote_default_exec_properties only
# for targets without their own.
genrule(
    name = "plain",
    outs = ["plain.txt"],
    cmd = "echo plain > $@",
)

genrule(
    name = "slow_to_stop",
    outs = ["slow_to_stop.txt"],
    cmd = "trap 'echo got-SIGTERM-marker; sleep 1; echo grace-used-marker; sleep 60; echo survived-marker' TERM; " +
          "echo started-marker; sleep 60 & wait; echo not-reached > $@",
    exec_properties = {
        "Pool": "alpha",
        "default-timeout": "2s",
        "termination-grace-period": "3s",
    },
)
"#;

/// A `kiln executor` child process logging to a file; killed when dropped.
struct Executor {
    child: Child,
}

impl Executor {
    fn start(port: u16, pool: &str, work_dir: &Path, log_path: &Path) -> Executor {
        common::open_to_actions(work_dir);
        let log = fs::File::create(log_path).expect("create executor log");
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["executor", "--scheduler"])
            .arg(format!("grpc://127.0.0.1:{port}"))
            .args(["--pool", pool, "--name", &format!("exec-{pool}")])
            .args(["--capacity", "2", "--work-dir"])
            .arg(work_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kiln executor");
        // Registration is the event to wait for: its log line.
        let started = Instant::now();
        loop {
            let text = fs::read_to_string(log_path).unwrap_or_default();
            if text.contains("executor registered") {
                break;
            }
            assert!(
                started.elapsed() < HANG_GUARD,
                "executor {pool} never registered:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Executor { child }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bazel_platform_properties_pools_timeouts_secrets_and_errors() {
    if !common::bazel_available() {
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-platform-")
        .tempdir()
        .expect("create scratch directory");
    let data_dir = scratch.path().join("kiln-data");
    let server_log = scratch.path().join("kiln.log");
    let server = KilnServer::start(&data_dir, &server_log, &["--embedded-executor", "false"]);
    let alpha_dir = scratch.path().join("exec-alpha");
    let beta_dir = scratch.path().join("exec-beta");
    let alpha_log = scratch.path().join("exec-alpha.log");
    let beta_log = scratch.path().join("exec-beta.log");
    let _alpha = Executor::start(server.port, "alpha", &alpha_dir, &alpha_log);
    let _beta = Executor::start(server.port, "beta", &beta_dir, &beta_log);

    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(server.port));
    let package = bazel.workspace.join("platform");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("BUILD"), BUILD).unwrap();
    fs::write(
        package.join("print_pwd.sh"),
        "#!/bin/sh\necho \"test ran in $(pwd -P)\"\n",
    )
    .unwrap();
    common::make_executable(&package.join("print_pwd.sh"));

    // (a) + (c): each action lands in its pool; the password header passes
    // through without being recorded anywhere.
    let header =
        format!("--remote_exec_header=x-buildbuddy-platform.container-registry-password={SECRET}");
    let output = bazel.run(&[
        "test",
        "--remote_exec_header=x-buildbuddy-platform.container-registry-username=kiln-user",
        &header,
        "--test_output=all",
        "//platform:in_alpha",
        "//platform:in_beta_test",
    ]);
    let text = combined(&output);
    eprintln!("---- bazel test (pools) ----\n{text}");
    assert!(output.status.success(), "pooled build failed:\n{text}");
    let alpha_pwd = fs::read_to_string(bazel.workspace.join("bazel-bin/platform/in_alpha.txt"))
        .expect("genrule output");
    let alpha_real = alpha_dir.canonicalize().unwrap();
    let beta_real = beta_dir.canonicalize().unwrap();
    assert!(
        Path::new(alpha_pwd.trim()).starts_with(&alpha_real),
        "Pool=alpha genrule ran in {alpha_pwd:?}, not under {}",
        alpha_real.display()
    );
    let test_log = fs::read_to_string(
        bazel
            .workspace
            .join("bazel-testlogs/platform/in_beta_test/test.log"),
    )
    .expect("test log");
    let test_pwd = test_log
        .lines()
        .find_map(|line| line.strip_prefix("test ran in "))
        .unwrap_or_else(|| panic!("no pwd line in the test log:\n{test_log}"));
    assert!(
        Path::new(test_pwd).starts_with(&beta_real),
        "test.Pool=beta test ran in {test_pwd:?}, not under {}",
        beta_real.display()
    );
    assert!(!text.contains(SECRET), "Bazel's output shows the password");

    // (d): a malformed property fails the build, naming it.
    let output = bazel.run(&[
        "build",
        "--remote_default_exec_properties=EstimatedMemory=lots",
        "//platform:plain",
    ]);
    let text = combined(&output);
    eprintln!("---- bazel build (EstimatedMemory=lots) ----\n{text}");
    assert!(
        !output.status.success(),
        "EstimatedMemory=lots built:\n{text}"
    );
    assert!(
        text.contains("EstimatedMemory"),
        "the failure does not name EstimatedMemory:\n{text}"
    );

    // (b): default-timeout stops the action with SIGTERM; the trap runs for
    // its second inside the grace period, and the failure is a timeout with
    // the output produced so far.
    let started = Instant::now();
    let output = bazel.run(&["build", "//platform:slow_to_stop"]);
    let elapsed = started.elapsed();
    let text = combined(&output);
    eprintln!("---- bazel build (timeout) ----\n{text}");
    assert!(
        !output.status.success(),
        "the slow action succeeded:\n{text}"
    );
    assert!(
        text.to_lowercase().contains("timeout") || text.contains("DEADLINE_EXCEEDED"),
        "the failure is not reported as a timeout:\n{text}"
    );
    for marker in ["started-marker", "got-SIGTERM-marker", "grace-used-marker"] {
        assert!(
            text.contains(marker),
            "partial output {marker:?} missing from Bazel's output:\n{text}"
        );
    }
    assert!(
        !text.contains("survived-marker"),
        "the handler outlived the grace period:\n{text}"
    );
    // A lower bound only: the kill cannot come before timeout + grace.
    assert!(
        elapsed >= Duration::from_secs(5),
        "stopped after {elapsed:?}, before the 2 s timeout plus the 3 s grace"
    );
    assert!(!text.contains(SECRET));

    bazel.run_ok(&["shutdown"]);
    drop(_alpha);
    drop(_beta);
    common::assert_nowhere(SECRET, &[&server_log, &alpha_log, &beta_log], &[&data_dir]);
}
