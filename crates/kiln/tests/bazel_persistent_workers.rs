//! Persistent workers driven by a real Bazel (4.2.3, which has no
//! `--experimental_remote_mark_tool_inputs`): a Starlark rule whose action
//! passes its arguments in a flag file, with `persistentWorkerKey` and
//! `recycle-runner` set through `exec_properties`. Two actions of the key,
//! one after the other, are served by one worker process (the test worker,
//! `tests/support/test_worker.rs`, as the rule's tool).

mod common;

use std::fs;

use common::{Bazel, KilnServer};

const DEFS: &str = r#"
def _work_impl(ctx):
    out = ctx.actions.declare_file(ctx.label.name + ".txt")
    args = ctx.actions.args()
    args.add("--out=" + out.path)
    args.use_param_file("@%s", use_always = True)
    args.set_param_file_format("multiline")
    ctx.actions.run(
        executable = ctx.executable.tool,
        arguments = [args],
        inputs = ctx.files.srcs,
        outputs = [out],
        mnemonic = "TestWorker",
    )
    return [DefaultInfo(files = depset([out]))]

work = rule(
    implementation = _work_impl,
    attrs = {
        "tool": attr.label(executable = True, cfg = "exec", allow_single_file = True),
        "srcs": attr.label_list(allow_files = True),
    },
)
"#;

const BUILD: &str = r#"
load(":defs.bzl", "work")

WORKER = {
    "workload-isolation-type": "none",
    "recycle-runner": "true",
    "persistentWorkerKey": "kiln-test-worker",
}

work(name = "first", tool = "kiln-test-worker", exec_properties = WORKER)
work(name = "second", tool = "kiln-test-worker", srcs = [":first"], exec_properties = WORKER)
"#;

/// `pid=P request=N` from a test worker's output file.
fn pid_and_request(text: &str) -> (String, String) {
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
            .to_string()
    };
    (field("pid="), field("request="))
}

#[test]
fn bazel_actions_of_one_key_are_served_by_one_worker_process() {
    if !common::bazel_available() {
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bazel-workers-")
        .tempdir()
        .expect("create scratch directory");
    let server = KilnServer::start(
        &scratch.path().join("kiln-data"),
        &scratch.path().join("kiln.log"),
        &[],
    );
    let bazel = Bazel::new(scratch.path(), common::remote_only_flags(server.port));
    let package = bazel.workspace.join("workers");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("BUILD"), BUILD).unwrap();
    fs::write(package.join("defs.bzl"), DEFS).unwrap();
    let tool = package.join("kiln-test-worker");
    fs::copy(env!("CARGO_BIN_EXE_kiln-test-worker"), &tool).unwrap();
    common::make_executable(&tool);

    bazel.run_ok(&["build", "//workers:second"]);
    let read = |name: &str| {
        fs::read_to_string(
            bazel
                .workspace
                .join(format!("bazel-bin/workers/{name}.txt")),
        )
        .unwrap_or_else(|e| panic!("{name}.txt: {e}"))
    };
    let (first, second) = (read("first"), read("second"));
    eprintln!("first: {first}second: {second}");
    let (first_pid, first_request) = pid_and_request(&first);
    let (second_pid, second_request) = pid_and_request(&second);
    assert_eq!(first_request, "1");
    assert_eq!(
        (second_pid, second_request),
        (first_pid, "2".to_string()),
        "the second action was not served by the first one's worker"
    );
}
