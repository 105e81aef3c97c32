//! End-to-end test of Kiln as a remote executor for a real Bazel client.
//!
//! Starts the `kiln` binary (scheduler and embedded executor), points
//! Debian's Bazel 4.2.3 at it with `--remote_executor` and remote-only
//! strategies, builds and tests `tests/bazel/workspace`, proves after
//! `bazel clean` that everything is a remote cache hit, and that an
//! unsatisfiable `Pool` fails fast naming the pool unless a
//! `x-buildbuddy-platform.Pool` header overrides it.

mod common;

use std::time::{Duration, Instant};

use common::{assert_test_passed, Bazel, KilnServer, ProcessSummary};

/// Outputs that must exist after the remote build (downloaded from Kiln).
const REMOTE_OUTPUTS: &[&str] = &[
    "bazel-bin/hello/greeting.txt",
    "bazel-bin/hello/pooled.txt",
    "bazel-bin/hello/hello",
    "bazel-testlogs/hello/hello_test/test.log",
];

/// Generous bound for "fails fast": far below any queueing timeout, far
/// above Bazel's own start-up on a slow machine.
const FAIL_FAST_BOUND: Duration = Duration::from_secs(90);

#[test]
fn bazel_builds_and_tests_through_kiln_remote_execution() {
    if !common::bazel_available() {
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-exec-")
        .tempdir()
        .expect("create scratch directory");
    let server = KilnServer::start(
        &scratch.path().join("kiln-data"),
        &scratch.path().join("kiln.log"),
        &["--pool", "default", "--concurrency", "2"],
    );
    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(server.port));

    // 1. Cold: every spawn runs remotely on Kiln, the test passes.
    let first = bazel.run_ok(&["test", "//..."]);
    assert_test_passed(&first);
    let summary = ProcessSummary::parse(&first);
    assert!(
        summary.count("remote") > 0,
        "nothing ran remotely: {summary:?}"
    );
    assert_only(
        &summary,
        &["remote", "internal"],
        "cold remote `bazel test //...`",
    );
    let outputs = bazel.read_outputs(REMOTE_OUTPUTS);
    assert_eq!(
        outputs["bazel-bin/hello/pooled.txt"],
        b"ran in the default pool\n"
    );

    // 2. After a clean, everything comes from Kiln's Action Cache.
    bazel.run_ok(&["clean"]);
    let cached = bazel.run_ok(&["test", "//..."]);
    assert_test_passed(&cached);
    ProcessSummary::parse(&cached).assert_all_remote_cache_hits("`bazel test //...` after clean");

    // 3. An action for a pool no executor serves fails fast, naming it.
    // (The default exec property changes the action digest, so it is not a
    // cache hit.)
    let started = Instant::now();
    let output = bazel.run(&[
        "build",
        "--remote_default_exec_properties=Pool=nowhere",
        "//hello:greeting",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("---- bazel build with Pool=nowhere ----\n{text}");
    assert!(
        !output.status.success(),
        "an unservable pool must fail:\n{text}"
    );
    assert!(
        text.contains("nowhere"),
        "the failure must name the pool:\n{text}"
    );
    assert!(
        started.elapsed() < FAIL_FAST_BOUND,
        "failing took {:?}",
        started.elapsed()
    );

    // 4. A header beats the action's properties: the same action runs.
    let overridden = bazel.run_ok(&[
        "build",
        "--remote_default_exec_properties=Pool=nowhere",
        "--remote_exec_header=x-buildbuddy-platform.Pool=default",
        "//hello:greeting",
    ]);
    let summary = ProcessSummary::parse(&overridden);
    assert_eq!(summary.count("remote"), 1, "{summary:?}");

    bazel.run_ok(&["shutdown"]);
}

/// Every spawn in `summary` is of one of `kinds`.
fn assert_only(summary: &ProcessSummary, kinds: &[&str], what: &str) {
    let unexpected: Vec<_> = summary
        .by_kind
        .keys()
        .filter(|kind| !kinds.contains(&kind.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{what}: spawns of kinds {unexpected:?} ran ({summary:?})"
    );
}
