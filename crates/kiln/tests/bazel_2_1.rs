//! Bazel 2.1.0, an older client that sends platform properties on the
//! `Command` only (never on the `Action`), against `kiln serve` with its
//! embedded executor in pool `alpha`:
//! - `Pool=alpha` runs (in the executor's workspace), and after
//!   `bazel clean` the rebuild is all remote cache hits with the same bytes;
//! - `Pool=beta`, which no executor serves, fails naming the pool: proof
//!   that Kiln read the Command's platform (ignored, the action would have
//!   run in the default pool, `alpha`);
//! - a malformed `EstimatedMemory` fails naming the property and value;
//! - an `x-buildbuddy-platform.Pool` header beats the Command's `Pool`.
//!
//! The binary comes from `scripts/install-deps.sh`
//! (/usr/local/lib/kiln-test/bazel-2.1.0, or `KILN_BAZEL2`).

mod common;

use common::{Bazel, KilnServer, ProcessSummary};

#[test]
fn bazel_2_1_sends_platforms_on_the_command_and_kiln_honours_them() {
    let Some(binary) = common::bazel2() else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("kiln-data");
    let server = KilnServer::start(
        &data_dir,
        &scratch.path().join("kiln.log"),
        &["--pool", "alpha", "--unmatched-grace-ms", "500"],
    );
    let remote = |properties: &str| {
        vec![
            format!("--remote_executor=grpc://127.0.0.1:{}", server.port),
            "--spawn_strategy=remote".to_string(),
            format!("--remote_default_exec_properties={properties}"),
        ]
    };
    let bazel = Bazel::with_binary(
        &binary,
        "workspace-bazel2",
        scratch.path(),
        remote("Pool=alpha"),
    );

    let output = bazel.run_ok(&["build", "//:where", "//:shout"]);
    assert_eq!(
        ProcessSummary::parse(&output).count("remote"),
        2,
        "{output}"
    );
    let outputs = bazel.read_outputs(&["bazel-bin/where.txt", "bazel-bin/shout.txt"]);
    let ran_in = String::from_utf8_lossy(&outputs["bazel-bin/where.txt"]).to_string();
    assert!(
        ran_in.starts_with(&data_dir.join("execution/work").display().to_string()),
        "the genrule ran in the embedded executor's workspace: {ran_in}"
    );
    assert_eq!(outputs["bazel-bin/shout.txt"], b"HELLO FROM BAZEL 2.1\n");

    bazel.run_ok(&["clean"]);
    let output = bazel.run_ok(&["build", "//:where", "//:shout"]);
    ProcessSummary::parse(&output).assert_all_remote_cache_hits("rebuild after clean");
    assert_eq!(
        bazel.read_outputs(&["bazel-bin/where.txt", "bazel-bin/shout.txt"]),
        outputs
    );

    // Same client, other properties: only the Command carries them.
    for (i, (properties, named)) in [
        ("Pool=beta", "FAILED_PRECONDITION: action"),
        ("EstimatedMemory=lots", "INVALID_ARGUMENT: action"),
    ]
    .into_iter()
    .enumerate()
    {
        let other = Bazel::with_binary(
            &binary,
            "workspace-bazel2",
            &scratch.path().join(format!("other-{i}")),
            remote(properties),
        );
        let output = other.run(&["build", "//:where"]);
        let text = common::combined(&output);
        assert!(!output.status.success(), "{properties} must fail:\n{text}");
        let (key, value) = properties.split_once('=').unwrap();
        let error = text
            .lines()
            .find(|line| line.contains(named))
            .unwrap_or_else(|| panic!("no {named} error for {properties}:\n{text}"));
        assert!(
            error.contains(key) && error.contains(value),
            "the error names {key} and {value}: {error}"
        );
    }

    // The header wins over the Command's Pool=beta.
    let mut flags = remote("Pool=beta");
    flags.push("--remote_exec_header=x-buildbuddy-platform.Pool=alpha".into());
    let headed = Bazel::with_binary(
        &binary,
        "workspace-bazel2",
        &scratch.path().join("headed"),
        flags,
    );
    let output = headed.run_ok(&["build", "//:where"]);
    assert_eq!(
        ProcessSummary::parse(&output).count("remote"),
        1,
        "{output}"
    );
}
