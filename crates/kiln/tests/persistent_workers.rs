//! Persistent workers (`persistentWorkerKey` with `recycle-runner`)
//! through a real `kiln serve` and its embedded executor: a test worker
//! (`tests/support/test_worker.rs`, built with the package) serves
//! successive actions from one process in both protocols; its response's
//! output is the action's stderr and its exit code the action's; a worker
//! that crashes, hangs or answers garbage fails its action with a status
//! naming the key and quoting its stderr, and the next action gets a fresh
//! worker; an action with no flag file is refused; without
//! `recycle-runner` the action runs once, its command line as given; under
//! `docker` and `podman`, a worker (a shell one, in the test image's
//! busybox) lives in the runner's container and serves successive actions.

mod common;

use common::remote::{self, completed, digest};
use common::KilnServer;

use kiln_proto::reapi::{self, Digest};
use prost::Message;
use tonic::transport::Channel;

const WORKER: &str = env!("CARGO_BIN_EXE_kiln-test-worker");

/// A `kiln serve` with its embedded executor, and a channel to it.
async fn serve(scratch: &std::path::Path) -> (KilnServer, Channel) {
    let server = KilnServer::start(&scratch.join("data"), &scratch.join("kiln.log"), &[]);
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", server.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (server, channel)
}

/// What one action ended as.
#[derive(Debug)]
struct Ran {
    status: tonic::Code,
    message: String,
    exit_code: i32,
    stderr: String,
    /// The declared output `out.txt`, if the action made it.
    out: Option<String>,
}

/// Runs `startup` (after the worker program) with a flag file
/// `args.params` holding `request` lines, as an action with `properties`
/// declaring the output `out.txt`; `timeout_s` sets `Action.timeout`.
async fn run(
    channel: &Channel,
    startup: &[&str],
    request: &[&str],
    properties: &[(&str, &str)],
    timeout_s: i64,
) -> Ran {
    let mut program = vec![WORKER];
    program.extend(startup);
    run_program(channel, &program, request, properties, timeout_s).await
}

/// [`run`] with `program` (and its arguments) in place of the test
/// worker.
async fn run_program(
    channel: &Channel,
    program: &[&str],
    request: &[&str],
    properties: &[(&str, &str)],
    timeout_s: i64,
) -> Ran {
    let params = format!("{}\n", request.join("\n")).into_bytes();
    let mut arguments: Vec<String> = program.iter().map(|s| s.to_string()).collect();
    arguments.push("@args.params".into());
    let root = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "args.params".into(),
            digest: Some(digest(&params)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let command = reapi::Command {
        arguments,
        output_paths: vec!["out.txt".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let action = reapi::Action {
        command_digest: Some(digest(&command)),
        input_root_digest: Some(digest(&root)),
        timeout: (timeout_s > 0).then_some(kiln_proto::protobuf::Duration {
            seconds: timeout_s,
            nanos: 0,
        }),
        do_not_cache: true,
        platform: Some(remote::platform(properties)),
        ..Default::default()
    }
    .encode_to_vec();
    let action_digest = digest(&action);
    remote::upload(channel, &[params, root, command, action]).await;
    let response = completed(
        remote::execute(channel.clone(), action_digest, true, &[])
            .await
            .unwrap(),
    )
    .await;
    let status = response.status.clone().unwrap_or_default();
    let result = response.result.unwrap_or_default();
    let out = match result.output_files.iter().find(|f| f.path == "out.txt") {
        Some(file) => Some(read_blob(channel, file.digest.clone().unwrap()).await),
        None => None,
    };
    let stderr = match result.stderr_digest {
        Some(d) => read_blob(channel, d).await,
        None => String::new(),
    };
    Ran {
        status: tonic::Code::from_i32(status.code),
        message: status.message,
        exit_code: result.exit_code,
        stderr,
        out,
    }
}

async fn read_blob(channel: &Channel, digest: Digest) -> String {
    use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
    if digest.size_bytes == 0 {
        return String::new();
    }
    let response = ContentAddressableStorageClient::new(channel.clone())
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: vec![digest],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    String::from_utf8(response.responses[0].data.to_vec()).unwrap()
}

/// The `pid=…` and `request=…` the test worker reports in `text`.
fn pid_and_request(text: &str) -> (u32, u32) {
    let field = |name: &str| -> u32 {
        let start = text
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
            + name.len();
        text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    (field("pid="), field("request="))
}

fn worker_properties<'a>(key: &'a str, protocol: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("workload-isolation-type", "none"),
        ("recycle-runner", "true"),
        ("persistentWorkerKey", key),
        ("persistentWorkerProtocol", protocol),
    ]
}

#[tokio::test]
async fn one_worker_process_serves_successive_actions_in_both_protocols() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, channel) = serve(scratch.path()).await;
    for (protocol, startup) in [("proto", vec![]), ("json", vec!["--json"])] {
        let properties = worker_properties(protocol, protocol);
        let first = run(&channel, &startup, &["--out=out.txt"], &properties, 0).await;
        let second = run(
            &channel,
            &startup,
            &["--out=out.txt", "--exit=0"],
            &properties,
            0,
        )
        .await;
        for ran in [&first, &second] {
            assert_eq!(ran.status, tonic::Code::Ok, "{protocol}: {ran:?}");
            assert_eq!(ran.exit_code, 0, "{protocol}: {ran:?}");
            // The response's output is the action's stderr.
            assert!(
                ran.stderr.starts_with("test worker pid="),
                "{protocol}: {ran:?}"
            );
        }
        let (pid, request) = pid_and_request(&first.stderr);
        assert_eq!(request, 1, "{protocol}: {first:?}");
        assert_eq!(
            pid_and_request(&second.stderr),
            (pid, 2),
            "{protocol}: the second action went to another process: {second:?}"
        );
        // The output was collected from the workspace, and the request
        // listed the action's one input (the flag file).
        assert_eq!(
            second.out.as_deref(),
            Some(format!("pid={pid} request=2 inputs=1\n").as_str()),
            "{protocol}"
        );
    }
}

#[tokio::test]
async fn a_non_zero_exit_code_fails_the_action_and_keeps_the_worker() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, channel) = serve(scratch.path()).await;
    let properties = worker_properties("exit", "proto");
    let failed = run(&channel, &[], &["--exit=7"], &properties, 0).await;
    assert_eq!(failed.status, tonic::Code::Ok, "{failed:?}");
    assert_eq!(failed.exit_code, 7, "{failed:?}");
    assert!(failed.stderr.contains("test worker pid="), "{failed:?}");
    let next = run(&channel, &[], &["--out=out.txt"], &properties, 0).await;
    assert_eq!(next.exit_code, 0, "{next:?}");
    assert_eq!(
        pid_and_request(&next.stderr),
        (pid_and_request(&failed.stderr).0, 2),
        "{next:?}"
    );
}

#[tokio::test]
async fn a_worker_that_fails_a_request_is_replaced_by_a_fresh_one() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, channel) = serve(scratch.path()).await;
    for (protocol, failure, code, said) in [
        (
            "proto",
            "--crash",
            tonic::Code::Internal,
            "crashing on request 2",
        ),
        ("json", "--garbage", tonic::Code::Internal, "malformed"),
        (
            "proto",
            "--hang",
            tonic::Code::DeadlineExceeded,
            "did not answer within",
        ),
    ] {
        let key = format!("fails-{failure}");
        let properties = worker_properties(&key, protocol);
        let startup: &[&str] = if protocol == "json" { &["--json"] } else { &[] };
        let first = run(&channel, startup, &["--out=out.txt"], &properties, 0).await;
        assert_eq!(first.exit_code, 0, "{first:?}");
        let (pid, _) = pid_and_request(&first.stderr);
        let failed = run(&channel, startup, &[failure], &properties, 2).await;
        assert_eq!(failed.status, code, "{failure}: {failed:?}");
        assert!(
            failed
                .message
                .contains(&format!("persistent worker {key:?}")),
            "{failure}: {failed:?}"
        );
        assert!(failed.message.contains(said), "{failure}: {failed:?}");
        // Its stderr is quoted: the line it wrote when it started.
        assert!(
            failed
                .message
                .contains(&format!("test worker {pid} started")),
            "{failure}: {failed:?}"
        );
        let next = run(&channel, startup, &["--out=out.txt"], &properties, 0).await;
        assert_eq!(next.exit_code, 0, "{failure}: {next:?}");
        let (fresh, request) = pid_and_request(&next.stderr);
        assert_ne!(fresh, pid, "{failure}: the failed worker served again");
        assert_eq!(request, 1, "{failure}: {next:?}");
    }
}

#[tokio::test]
async fn an_action_without_a_flag_file_is_refused_naming_the_key() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, channel) = serve(scratch.path()).await;
    let properties = worker_properties("no-flag-file", "proto");
    let action = remote::upload_action(
        &channel,
        vec![WORKER.into(), "--exit=0".into()],
        None,
        vec![],
        &properties,
    )
    .await;
    let response = completed(
        remote::execute(channel.clone(), action, true, &[])
            .await
            .unwrap(),
    )
    .await;
    let status = response.status.unwrap_or_default();
    assert_eq!(
        tonic::Code::from_i32(status.code),
        tonic::Code::InvalidArgument,
        "{status:?}"
    );
    assert!(
        status
            .message
            .contains("persistentWorkerKey=\"no-flag-file\""),
        "{status:?}"
    );
    assert!(
        status.message.contains("no flag-file argument"),
        "{status:?}"
    );
}

#[tokio::test]
async fn without_recycle_runner_the_action_runs_once_as_written() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, channel) = serve(scratch.path()).await;
    let properties = [
        ("workload-isolation-type", "none"),
        ("persistentWorkerKey", "one-shot"),
    ];
    for _ in 0..2 {
        let ran = run(&channel, &[], &["--out=out.txt"], &properties, 0).await;
        assert_eq!((ran.status, ran.exit_code), (tonic::Code::Ok, 0), "{ran:?}");
        // The tool read its flag file itself, without --persistent_worker.
        assert!(ran.stderr.starts_with("one-shot test worker"), "{ran:?}");
        assert_eq!(pid_and_request(&ran.stderr).1, 1, "{ran:?}");
    }
}

/// A JSON-protocol worker in the test image's busybox shell: each request
/// writes `out.txt` and answers with its pid and a counter, exit code
/// `counter - 1`.
const SHELL_WORKER: &str = r#"n=0; while IFS= read -r line; do n=$((n+1)); echo "n=$n" > out.txt; printf '{"exitCode":%d,"output":"shell worker pid=%s request=%d"}\n' "$((n-1))" "$$" "$n"; done"#;

#[tokio::test]
async fn a_worker_in_a_docker_or_podman_runner_serves_successive_actions() {
    let runtimes: Vec<&str> = ["docker", "podman"]
        .into_iter()
        .filter(|runtime| common::runtime_available(runtime))
        .collect();
    if runtimes.is_empty() {
        common::say_skipped("container workers: neither docker nor podman is available");
        return;
    }
    common::test_images().expect("building the test images");
    let scratch = tempfile::tempdir().unwrap();
    let isolation = format!("none,{}", runtimes.join(","));
    let server = KilnServer::start(
        &scratch.path().join("data"),
        &scratch.path().join("kiln.log"),
        &["--isolation", &isolation],
    );
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", server.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    for runtime in runtimes.iter().copied() {
        let properties = [
            ("workload-isolation-type", runtime),
            (
                "container-image",
                "docker://127.0.0.1:5000/kiln-test/base:latest",
            ),
            ("dockerNetwork", "off"),
            ("recycle-runner", "true"),
            ("persistentWorkerKey", "shell"),
            ("persistentWorkerProtocol", "json"),
        ];
        let program = ["sh", "-c", SHELL_WORKER, "shell-worker"];
        let first = run_program(&channel, &program, &["a"], &properties, 0).await;
        let second = run_program(&channel, &program, &["b"], &properties, 0).await;
        assert_eq!(first.status, tonic::Code::Ok, "{runtime}: {first:?}");
        assert_eq!(first.exit_code, 0, "{runtime}: {first:?}");
        let (pid, request) = pid_and_request(&first.stderr);
        assert_eq!(request, 1, "{runtime}: {first:?}");
        assert_eq!(first.out.as_deref(), Some("n=1\n"), "{runtime}");
        // The worker's exit code fails the action; the worker stays.
        assert_eq!(second.exit_code, 1, "{runtime}: {second:?}");
        assert_eq!(
            pid_and_request(&second.stderr),
            (pid, 2),
            "{runtime}: the second action went to another process: {second:?}"
        );
        assert_eq!(second.out.as_deref(), Some("n=2\n"), "{runtime}");
    }
    // Stopping the server ends the runners' containers, and the workers
    // in them.
    let data_dir = scratch.path().join("data");
    let status = server.terminate(std::time::Duration::from_secs(60));
    assert!(status.success(), "kiln serve stopped with {status}");
    for runtime in runtimes {
        let left = common::containers_of_server(runtime, &data_dir);
        assert!(
            left.is_empty(),
            "{runtime}: the stopped server left {left:?}"
        );
    }
}

#[tokio::test]
async fn a_worker_in_a_sandbox_runner_serves_successive_actions_from_its_own_namespace() {
    if !common::root_available("sandboxed persistent workers") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let server = KilnServer::start(
        &scratch.path().join("data"),
        &scratch.path().join("kiln.log"),
        &["--isolation", "none,sandbox"],
    );
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", server.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let properties = [
        ("workload-isolation-type", "sandbox"),
        ("dockerNetwork", "off"),
        ("recycle-runner", "true"),
        ("persistentWorkerKey", "sandbox-shell"),
        ("persistentWorkerProtocol", "json"),
    ];
    // Its argv[0] names it for the check that it is gone at the end.
    let program = ["sh", "-c", SHELL_WORKER, "kiln-sandboxed-shell-worker"];
    let first = run_program(&channel, &program, &["a"], &properties, 0).await;
    assert_eq!(first.status, tonic::Code::Ok, "{first:?}");
    assert_eq!(first.exit_code, 0, "{first:?}");
    assert_eq!(first.out.as_deref(), Some("n=1\n"));
    // PID 1: the worker is in a PID namespace of its own.
    assert_eq!(pid_and_request(&first.stderr), (1, 1), "{first:?}");
    let running = || {
        let output = std::process::Command::new("pgrep")
            .args(["-f", "kiln-sandboxed-shell-worker"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    assert!(!running().is_empty(), "no worker process between actions");
    let second = run_program(&channel, &program, &["b"], &properties, 0).await;
    // The worker's exit code fails the action; the worker stays, and it
    // wrote the output into the workspace the second action's inputs
    // came to.
    assert_eq!(second.exit_code, 1, "{second:?}");
    assert_eq!(
        pid_and_request(&second.stderr),
        (1, 2),
        "the second action went to another process: {second:?}"
    );
    assert_eq!(second.out.as_deref(), Some("n=2\n"));

    // dockerInit would put an init before the worker: refused by name.
    let mut with_init = properties.to_vec();
    with_init.push(("dockerInit", "true"));
    let refused = run_program(&channel, &program, &["c"], &with_init, 0).await;
    assert_eq!(
        refused.status,
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message.contains("dockerInit"), "{refused:?}");

    // Stopping the server ends the worker with its namespace.
    let status = server.terminate(std::time::Duration::from_secs(60));
    assert!(status.success(), "kiln serve stopped with {status}");
    assert_eq!(running(), "", "a sandboxed worker outlived the server");
}
