//! End-to-end test of Kiln as a remote cache for a real Bazel client.
//!
//! Starts the `kiln` binary, points Debian's Bazel 4.2.3 at it with
//! `--remote_cache`, builds and tests the offline workspace in
//! `tests/bazel/workspace`, then proves after `bazel clean` that every action
//! is served from Kiln byte-for-byte, also when Bazel downloads nothing
//! (`--remote_download_minimal`) and has to fetch test inputs on demand.

mod common;

use common::{assert_test_passed, parse_listening_line, Bazel, KilnServer, ProcessSummary};

/// Outputs compared between the first build and the cache-served rebuild,
/// relative to the workspace root (through Bazel's convenience symlinks).
const COMPARED_OUTPUTS: &[&str] = &[
    "bazel-bin/hello/greeting.txt",
    "bazel-bin/hello/hello",
    "bazel-bin/hello/libgreet.a",
    "bazel-bin/hello/libgreet.so",
    "bazel-testlogs/hello/hello_test/test.log",
];

#[test]
fn bazel_uses_kiln_as_remote_cache() {
    if !common::bazel_available() {
        return;
    }

    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-")
        .tempdir()
        .expect("create scratch directory");
    let server = KilnServer::start(
        &scratch.path().join("kiln-data"),
        &scratch.path().join("kiln.log"),
        &[],
    );
    let bazel = Bazel::new(
        scratch.path(),
        vec![format!("--remote_cache=grpc://127.0.0.1:{}", server.port)],
    );

    // 1. Cold build and test: everything runs locally and is uploaded.
    let first_build = bazel.run_ok(&["build", "//..."]);
    let summary = ProcessSummary::parse(&first_build);
    assert_eq!(
        summary.count("remote cache hit"),
        0,
        "the first build ran against an empty cache: {summary:?}"
    );
    bazel.run_ok(&["test", "//..."]);
    let first_outputs = bazel.read_outputs(COMPARED_OUTPUTS);

    // 2. After a clean, every action must be a remote cache hit and the
    // outputs must be exactly what the first build produced.
    bazel.run_ok(&["clean"]);
    let cached = bazel.run_ok(&["test", "//..."]);
    ProcessSummary::parse(&cached).assert_all_remote_cache_hits("cached `bazel test //...`");
    assert_test_passed(&cached);
    let cached_outputs = bazel.read_outputs(COMPARED_OUTPUTS);
    for (path, first_bytes) in &first_outputs {
        let cached_bytes = &cached_outputs[path];
        assert!(
            first_bytes == cached_bytes,
            "{path}: {} bytes from the cache differ from the {} bytes the first build made",
            cached_bytes.len(),
            first_bytes.len()
        );
    }

    // 3. Build without the bytes: Bazel only asks the cache for metadata...
    bazel.run_ok(&["clean"]);
    let minimal = bazel.run_ok(&["test", "--remote_download_minimal", "//..."]);
    ProcessSummary::parse(&minimal)
        .assert_all_remote_cache_hits("`bazel test --remote_download_minimal //...`");
    assert_test_passed(&minimal);
    assert!(
        !bazel.workspace.join("bazel-bin/hello/hello").exists(),
        "--remote_download_minimal should leave bazel-bin/hello/hello remote"
    );

    // ...and when the test must really run, it fetches its inputs (the
    // binary and the genrule output) from Kiln's CAS on demand.
    let rerun = bazel.run_ok(&[
        "test",
        "--remote_download_minimal",
        "--nocache_test_results",
        "//...",
    ]);
    assert_test_passed(&rerun);
    assert!(
        rerun.contains("Executed 1 out of 1 test"),
        "--nocache_test_results should have run the test:\n{rerun}"
    );
    let summary = ProcessSummary::parse(&rerun);
    assert_eq!(
        summary.count("remote cache hit") + summary.count("internal") + 1,
        summary.total,
        "only the test itself should run locally: {summary:?}"
    );

    bazel.run_ok(&["shutdown"]);
}

#[test]
fn parses_bazel_process_summaries() {
    let summary =
        ProcessSummary::parse_line("INFO: 7 processes: 4 remote cache hit, 3 internal.").unwrap();
    assert_eq!(summary.total, 7);
    assert_eq!(summary.count("remote cache hit"), 4);
    assert_eq!(summary.count("internal"), 3);
    summary.assert_all_remote_cache_hits("example");

    let summary = ProcessSummary::parse_line("INFO: 1 process: 1 internal.").unwrap();
    assert_eq!(summary.count("internal"), 1);

    let summary =
        ProcessSummary::parse_line("INFO: 15 processes: 9 internal, 6 linux-sandbox.").unwrap();
    assert_eq!(summary.count("linux-sandbox"), 6);

    assert!(ProcessSummary::parse_line("INFO: 0 processes.").is_some());
    assert!(ProcessSummary::parse_line("INFO: Elapsed time: 1.0s").is_none());
    assert!(ProcessSummary::parse_line("INFO: Found 4 targets...").is_none());
    assert_eq!(
        parse_listening_line("listening grpc://127.0.0.1:4242\n"),
        Some(4242)
    );
    assert_eq!(parse_listening_line("listening on 4242"), None);
}

#[test]
#[should_panic(expected = "every action should be a remote cache hit")]
fn rejects_locally_run_actions() {
    ProcessSummary::parse_line("INFO: 5 processes: 2 remote cache hit, 1 internal, 2 local.")
        .unwrap()
        .assert_all_remote_cache_hits("example");
}
