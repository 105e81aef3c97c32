//! `kiln executor` as real processes against a real `kiln serve`: an
//! executor SIGKILLed in the middle of an action loses its stream, and the
//! server requeues the action onto the other executor, which completes it;
//! an executor outlives a restart of its server, stopping the actions of
//! the lost session first; a server with an executor token accepts only
//! executors presenting it.

mod common;

use common::remote::{self, completed, digest, wait_bounded};
use common::Process;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use kiln_proto::longrunning::Operation;
use kiln_proto::reapi::{self, Digest};
use prost::Message;
use tonic::transport::Channel;
use tonic::Streaming;

/// Upper bound for anything that could hang; never a pass/fail threshold.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// `kiln executor` in pool `procs` with one slot, plus `extra` flags.
fn spawn_executor(address: &str, name: &str, work_dir: &Path, extra: &[&str]) -> Process {
    common::open_to_actions(work_dir);
    Process::spawn_command(executor_command(address, name, work_dir, extra))
}

/// The command line of `kiln executor` `name` in pool `procs`, one action
/// at a time, in `work_dir`, with `extra` flags.
fn executor_command(address: &str, name: &str, work_dir: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(common::executor_args(
            &format!("grpc://{address}"),
            name,
            work_dir,
        ))
        .args(extra);
    command
}

/// An executor that has registered.
fn executor(address: &str, name: &str, work_dir: &Path) -> Process {
    let process = spawn_executor(address, name, work_dir, &[]);
    process.wait_for_log("executor registered");
    process
}

/// A server and a registered executor `name` offering `none` and
/// `docker`, with the test images built: (server, its address, executor).
fn serve_docker_executor(scratch: &Path, name: &str) -> (Process, String, Process) {
    common::test_images().unwrap_or_else(|error| panic!("building the test images: {error}"));
    serve_with_executor(scratch, name, "none,docker")
}

/// A server and a registered executor `name` offering `isolation` (as
/// `--isolation` takes it): (server, its address, executor).
fn serve_with_executor(scratch: &Path, name: &str, isolation: &str) -> (Process, String, Process) {
    let (server, address) = serve(scratch, &[]);
    let executor = spawn_executor(
        &address,
        name,
        &scratch.join("work"),
        &["--isolation", isolation],
    );
    executor.wait_for_log("executor registered");
    (server, address, executor)
}

/// `kiln serve` without an embedded executor, plus `extra` flags; returns
/// it and its address.
fn serve(scratch: &Path, extra: &[&str]) -> (Process, String) {
    serve_on("127.0.0.1:0", &scratch.join("server"), extra)
}

/// `kiln serve` listening on `listen`, with its data in `data_dir`.
fn serve_on(listen: &str, data_dir: &Path, extra: &[&str]) -> (Process, String) {
    let (server, url) = common::serve_without_executor(listen, data_dir, extra);
    let address = url
        .strip_prefix("grpc://")
        .unwrap_or_else(|| panic!("not a plaintext address: {url}"))
        .to_string();
    (server, address)
}

/// Uploads an action running `script` in pool `procs` and executes it.
async fn execute(address: &str, script: String) -> Streaming<Operation> {
    execute_with(address, script, &[]).await
}

/// [`execute`], with platform `properties` besides the pool.
async fn execute_with(
    address: &str,
    script: String,
    properties: &[(&str, &str)],
) -> Streaming<Operation> {
    let (channel, action) = upload_action(
        address,
        vec!["/bin/sh".into(), "-c".into(), script],
        None,
        vec![],
        properties,
    )
    .await;
    execute_digest(channel, action).await.unwrap()
}

/// Uploads an action running `arguments` in pool `procs` with platform
/// `properties` besides the pool, on the input root `root` (default: the
/// empty directory) whose blobs are `blobs`. Returns a channel to the
/// server and the action's digest.
async fn upload_action(
    address: &str,
    arguments: Vec<String>,
    root: Option<Digest>,
    blobs: Vec<Vec<u8>>,
    properties: &[(&str, &str)],
) -> (Channel, Digest) {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut all = vec![("Pool", "procs")];
    all.extend_from_slice(properties);
    let action = remote::upload_action(&channel, arguments, root, blobs, &all).await;
    (channel, action)
}

/// Executes the uploaded action `action_digest`.
async fn execute_digest(
    channel: Channel,
    action_digest: Digest,
) -> Result<Streaming<Operation>, tonic::Status> {
    remote::execute(channel, action_digest, false, &[]).await
}

/// A directory under `scratch` where actions leave marks for the test:
/// writable by the action user a root executor runs actions as.
fn marks(scratch: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let marks = scratch.join("marks");
    common::open_to_actions(&marks);
    std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o777)).unwrap();
    marks
}

/// A FIFO an action writes its pid into (`echo $$ > FIFO`).
fn pid_fifo(scratch: &Path) -> std::path::PathBuf {
    let fifo = marks(scratch).join("started");
    assert!(Command::new("mkfifo")
        .args(["-m", "0666"])
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    fifo
}

/// The pid an action wrote into `fifo`, once it has started.
async fn started_pid(fifo: std::path::PathBuf) -> u32 {
    tokio::time::timeout(
        HANG_GUARD,
        tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo).unwrap()),
    )
    .await
    .expect("the executor never started the action")
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

/// The runner usage Kiln reports in a result's auxiliary metadata.
fn runner_usage(response: &reapi::ExecuteResponse) -> kiln_proto::runner::RunnerUsage {
    let metadata = response
        .result
        .as_ref()
        .and_then(|r| r.execution_metadata.as_ref())
        .expect("execution metadata");
    let any = metadata
        .auxiliary_metadata
        .iter()
        .find(|any| any.type_url == kiln_proto::runner::RUNNER_USAGE_TYPE)
        .expect("no RunnerUsage in auxiliary_metadata");
    kiln_proto::runner::RunnerUsage::decode(any.value.as_slice()).unwrap()
}

#[tokio::test]
async fn results_say_whether_their_runner_was_warm() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &[]);
    let _executor = executor(&address, "proc-warm", &scratch.path().join("work"));
    let warm = [
        ("recycle-runner", "true"),
        ("runner-recycling-key", "metadata"),
    ];
    let mut usages = Vec::new();
    for script in ["echo one", "echo two"] {
        let response = completed(execute_with(&address, script.into(), &warm).await).await;
        assert_eq!(response.result.as_ref().unwrap().exit_code, 0);
        usages.push(runner_usage(&response));
    }
    let cold = runner_usage(&completed(execute(&address, "echo three".into()).await).await);
    eprintln!("{usages:?} {cold:?}");
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    assert!(!usages[0].warm && usages[0].uses == 1);
    assert_eq!(usages[0].runner_key_hash.len(), 16);
    assert_eq!(usages[0].runner_key_hash, usages[1].runner_key_hash);
    assert_eq!(usages[1].isolation_type, "none");
    // A root executor runs `none` actions in a cgroup of their own, so it
    // can keep their runners warm; one that is not root cannot.
    assert_eq!(usages[1].warm, is_root);
    assert_eq!(usages[1].uses, if is_root { 2 } else { 1 });
    assert!(!cold.warm && cold.runner_key_hash.is_empty() && cold.uses == 1);
}

#[tokio::test]
async fn actions_go_to_the_executor_holding_their_runner_warm() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &[]);
    let _first = executor(&address, "proc-a", &scratch.path().join("a"));
    let _second = executor(&address, "proc-b", &scratch.path().join("b"));
    let warm = [
        ("recycle-runner", "true"),
        ("runner-recycling-key", "routing"),
    ];
    // One at a time, so both executors are idle when each is queued: only
    // warm routing decides which takes it.
    let mut ran = Vec::new();
    for i in 0..10 {
        let response = completed(execute_with(&address, format!("echo {i}"), &warm).await).await;
        let worker = response
            .result
            .as_ref()
            .and_then(|r| r.execution_metadata.as_ref())
            .map(|m| m.worker.clone())
            .unwrap();
        ran.push((worker, runner_usage(&response).warm));
    }
    eprintln!("{ran:?}");
    let warm_runs = ran.iter().filter(|(_, warm)| *warm).count();
    assert_eq!(
        warm_runs, 9,
        "every action after the first should run warm: {ran:?}"
    );
    assert!(ran.iter().all(|(worker, _)| *worker == ran[0].0), "{ran:?}");
}

#[tokio::test]
async fn a_cached_result_is_served_with_no_executor_registered() {
    use kiln_proto::reapi::action_cache_client::ActionCacheClient;
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &["--unmatched-grace-ms", "60000"]);
    // An action and a cached result for it; no executor will ever come
    // (an uncached action would wait the minute for one).
    let (channel, action) = upload_action(
        &address,
        vec!["/bin/sh".into(), "-c".into(), "echo cached".into()],
        None,
        vec![],
        &[],
    )
    .await;
    let stdout = digest(b"");
    ActionCacheClient::new(channel.clone())
        .update_action_result(reapi::UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(reapi::ActionResult {
                exit_code: 0,
                stdout_digest: Some(stdout),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        completed(execute_digest(channel, action).await.unwrap()).await
    })
    .await
    .expect("a cached result waited for an executor");
    assert!(response.cached_result);
    assert_eq!(response.result.unwrap().exit_code, 0);
}

/// Uploads `blobs` and an action running `true` on the input root `root`,
/// executes it and returns its response.
async fn execute_on_tree(
    address: &str,
    root: reapi::Digest,
    blobs: Vec<Vec<u8>>,
) -> reapi::ExecuteResponse {
    let (channel, action) =
        upload_action(address, vec!["/bin/true".into()], Some(root), blobs, &[]).await;
    completed(execute_digest(channel, action).await.unwrap()).await
}

#[tokio::test]
async fn input_trees_that_expand_without_bound_are_refused_naming_the_limit() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &[]);
    let _executor = executor(&address, "proc-limits", &scratch.path().join("work"));
    // Each level lists the one below twice: 40 levels are 2^40 files once
    // laid out, from 42 small blobs.
    let file = b"x".to_vec();
    let mut level = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "f".into(),
            digest: Some(digest(&file)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let mut blobs = vec![file, level.clone()];
    for _ in 0..40 {
        let below = digest(&level);
        level = reapi::Directory {
            directories: ["a", "b"]
                .map(|name| reapi::DirectoryNode {
                    name: name.into(),
                    digest: Some(below.clone()),
                })
                .to_vec(),
            ..Default::default()
        }
        .encode_to_vec();
        blobs.push(level.clone());
    }
    let response = execute_on_tree(&address, digest(&level), blobs).await;
    let status = response.status.unwrap_or_default();
    assert_eq!(
        status.code,
        tonic::Code::InvalidArgument as i32,
        "{status:?}"
    );
    assert!(
        status.message.contains("max_input_entries"),
        "{}",
        status.message
    );

    // A chain deeper than the depth limit.
    let mut level = reapi::Directory::default().encode_to_vec();
    let mut blobs = vec![level.clone()];
    for _ in 0..300 {
        level = reapi::Directory {
            directories: vec![reapi::DirectoryNode {
                name: "d".into(),
                digest: Some(digest(&level)),
            }],
            ..Default::default()
        }
        .encode_to_vec();
        blobs.push(level.clone());
    }
    let response = execute_on_tree(&address, digest(&level), blobs).await;
    let status = response.status.unwrap_or_default();
    assert_eq!(
        status.code,
        tonic::Code::InvalidArgument as i32,
        "{status:?}"
    );
    assert!(
        status.message.contains("max_input_depth"),
        "{}",
        status.message
    );

    // A Directory (or Action) blob too large to read whole is refused by
    // its declared size before anything is read.
    let huge = reapi::Digest {
        hash: digest(b"huge").hash,
        size_bytes: 1 << 30,
    };
    let response = execute_on_tree(&address, huge.clone(), vec![]).await;
    let status = response.status.unwrap_or_default();
    assert_eq!(
        status.code,
        tonic::Code::InvalidArgument as i32,
        "{status:?}"
    );
    assert!(
        status.message.contains("over the limit"),
        "{}",
        status.message
    );
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let error = execute_digest(channel, huge).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(
        error.message().contains("MAX_MESSAGE_BLOB_BYTES"),
        "{}",
        error.message()
    );
}

/// Whether process `pid` is still alive (and not a zombie).
fn alive(pid: u32) -> bool {
    kiln_worker::process::is_running(pid)
}

#[tokio::test]
async fn an_execution_no_client_waits_for_is_cancelled() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &["--orphan-grace-ms", "500"]);
    let _executor = executor(&address, "proc-orphans", &scratch.path().join("work"));

    // The only client goes away: the action is stopped within the grace.
    let fifo = pid_fifo(scratch.path());
    let stream = execute(
        &address,
        format!("echo $$ > {}; exec sleep 60", fifo.display()),
    )
    .await;
    let pid = started_pid(fifo.clone()).await;
    assert!(alive(pid));
    drop(stream);
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the action of a client that left (pid {pid}) still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Two clients merged into one execution: one leaving does not stop it.
    std::fs::remove_file(&fifo).unwrap();
    let fifo = pid_fifo(scratch.path());
    let script = format!("echo $$ > {}; sleep 3; echo finished", fifo.display());
    let leaving = execute(&address, script.clone()).await;
    let pid = started_pid(fifo).await;
    let staying = execute(&address, script).await;
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        alive(pid),
        "one merged client leaving stopped the execution"
    );
    let response = completed(staying).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.stdout_digest, Some(digest(b"finished\n")));
}

#[tokio::test]
async fn a_full_scheduler_answers_resource_exhausted_with_a_retry_delay() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(
        scratch.path(),
        &["--max-queued-executions", "2", "--orphan-grace-ms", "200"],
    );
    let _executor = executor(&address, "proc-full", &scratch.path().join("work"));
    let first = execute(&address, "sleep 60 # one".into()).await;
    let second = execute(&address, "sleep 60 # two".into()).await;
    let (channel, action) =
        upload_action(&address, vec!["/bin/true".into()], None, vec![], &[]).await;
    let error = execute_digest(channel, action).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("max_queued_executions"),
        "{}",
        error.message()
    );
    let details = kiln_proto::rpc::Status::decode(error.details()).unwrap();
    let retry = details
        .details
        .iter()
        .find(|any| any.type_url == kiln_proto::status::RETRY_INFO_TYPE)
        .expect("no RetryInfo");
    let retry = kiln_proto::status::RetryInfo::decode(retry.value.as_slice()).unwrap();
    assert!(retry.retry_delay.unwrap().seconds > 0);
    drop((first, second));
}

#[tokio::test]
async fn an_action_without_an_estimate_gets_the_default_memory_limit() {
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &[]);
    let process = spawn_executor(
        &address,
        "proc-defaults",
        &scratch.path().join("work"),
        &[
            "--isolation",
            "none,sandbox",
            "--default-action-memory-limit",
            "64MB",
        ],
    );
    process.wait_for_log("executor registered");
    // Holds ~200 MB in a shell variable.
    let hog = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}";
    let sandbox = [("workload-isolation-type", "sandbox")];
    let response = completed(execute_with(&address, hog.into(), &sandbox).await).await;
    let result = response.result.unwrap();
    assert_ne!(
        result.exit_code, 0,
        "a 200 MB action ran under a 64 MB default"
    );
    // With an estimate, the estimate is its limit.
    let estimated = [
        ("workload-isolation-type", "sandbox"),
        ("EstimatedMemory", "1GB"),
    ];
    let response = completed(execute_with(&address, hog.into(), &estimated).await).await;
    assert_eq!(response.result.unwrap().exit_code, 0);
}

#[tokio::test]
async fn an_executor_that_never_finishes_loses_its_action_after_timeout_grace_and_margin() {
    use kiln_proto::executor::executor_message::Kind as ExecutorKind;
    use kiln_proto::executor::executor_service_client::ExecutorServiceClient;
    use kiln_proto::executor::scheduler_message::Kind as SchedulerKind;
    use kiln_proto::executor::{ExecutorMessage, Heartbeat, Register};

    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &["--assignment-margin-ms", "500"]);
    // A hostile executor: it takes work and heartbeats, and never finishes.
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (outbound, receiver) = tokio::sync::mpsc::channel(16);
    outbound
        .send(ExecutorMessage {
            kind: Some(ExecutorKind::Register(Register {
                name: "stuck".into(),
                pool: "procs".into(),
                os_family: "linux".into(),
                arch: if cfg!(target_arch = "aarch64") {
                    "arm64"
                } else {
                    "amd64"
                }
                .into(),
                capacity: 1,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut inbound = ExecutorServiceClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let beats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let beat = ExecutorMessage {
                kind: Some(ExecutorKind::Heartbeat(Heartbeat::default())),
            };
            if outbound.send(beat).await.is_err() {
                return;
            }
        }
    });
    assert!(matches!(
        inbound.message().await.unwrap().unwrap().kind,
        Some(SchedulerKind::Registered(_))
    ));
    let timing = [
        ("default-timeout", "1s"),
        ("termination-grace-period", "1s"),
    ];
    let stream = execute_with(&address, "echo done".into(), &timing).await;
    let Some(SchedulerKind::Assignment(assignment)) =
        inbound.message().await.unwrap().unwrap().kind
    else {
        panic!("the stuck executor got no assignment");
    };
    // Only now a working executor: it gets the action once the stuck one
    // has held it past 1 s + 1 s + 0.5 s.
    let _working = executor(&address, "proc-working", &scratch.path().join("work"));
    let response = completed(stream).await;
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.execution_metadata.unwrap().worker, "proc-working");
    // And the stuck executor was told to stop it.
    let cancel = tokio::time::timeout(HANG_GUARD, inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match cancel.kind {
        Some(SchedulerKind::Cancel(cancel)) => {
            assert_eq!(cancel.assignment_id, assignment.assignment_id)
        }
        other => panic!("expected a Cancel, got {other:?}"),
    }
    beats.abort();
}

#[tokio::test]
async fn staging_that_hangs_ends_at_the_staging_deadline() {
    if !common::runtime_available("docker") {
        return;
    }
    // A "registry" that accepts connections and never answers.
    let registry = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = registry.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut connections = Vec::new();
        for stream in registry.incoming().take(8) {
            connections.push(stream);
        }
    });
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &[]);
    let process = spawn_executor(
        &address,
        "proc-staging",
        &scratch.path().join("work"),
        &["--isolation", "none,docker", "--staging-timeout-s", "2"],
    );
    process.wait_for_log("executor registered");
    let image = format!("docker://127.0.0.1:{port}/hangs:latest");
    let properties = [
        ("workload-isolation-type", "docker"),
        ("container-image", image.as_str()),
    ];
    let started = std::time::Instant::now();
    let response = completed(execute_with(&address, "true".into(), &properties).await).await;
    let status = response.status.unwrap_or_default();
    assert_eq!(status.code, tonic::Code::Unavailable as i32, "{status:?}");
    assert!(
        status.message.contains("staging_timeout"),
        "{}",
        status.message
    );
    assert!(started.elapsed() < HANG_GUARD);
    drop(held);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_the_rest_keep_working() {
    use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &["--max-connections", "2"]);
    let call = |channel: Channel| async move {
        CapabilitiesClient::new(channel)
            .get_capabilities(reapi::GetCapabilitiesRequest::default())
            .await
    };
    let open = || async {
        Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
    };
    let first = open().await.unwrap();
    let second = open().await.unwrap();
    call(first.clone()).await.unwrap();
    call(second.clone()).await.unwrap();
    let third = match open().await {
        Err(_) => None,
        Ok(channel) => Some(call(channel).await),
    };
    assert!(
        third.as_ref().is_none_or(|outcome| outcome.is_err()),
        "a third connection was served: {third:?}"
    );
    // The two within the cap still work; one closing makes room.
    call(second.clone()).await.unwrap();
    drop(first);
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        if let Ok(channel) = open().await {
            if call(channel).await.is_ok() {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_idle_bytestream_write_is_ended() {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    use kiln_proto::bytestream::WriteRequest;
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &["--bytestream-idle-timeout-ms", "500"]);
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Declares 4 MiB, sends 64 KiB, then nothing.
    let blob = vec![7u8; 4 << 20];
    let d = digest(&blob);
    let first = WriteRequest {
        resource_name: format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash,
            d.size_bytes
        ),
        write_offset: 0,
        finish_write: false,
        data: blob[..64 << 10].to_vec().into(),
    };
    let requests = futures::stream::iter([first]).chain(futures::stream::pending());
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(HANG_GUARD, ByteStreamClient::new(channel).write(requests))
        .await
        .expect("an idle write was never ended");
    let error = outcome.unwrap_err();
    assert_eq!(error.code(), tonic::Code::DeadlineExceeded, "{error:?}");
    assert!(
        error.message().contains("bytestream_idle_timeout"),
        "{}",
        error.message()
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn a_bytestream_read_whose_client_stops_reading_ends_in_an_error() {
    // A large blob just written is read from memory (its write buffers) by
    // a task; with no memory for recent blobs, from its file by a thread.
    // Both are given up on once the client stops reading.
    for recent_memory in ["1GiB", "0"] {
        let ended = read_and_stop_reading(recent_memory).await;
        assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    }
}

/// Uploads 64 MiB to a disk-backed server with `--recent-blob-memory
/// RECENT_MEMORY`, reads one message of it and stops reading past the idle
/// timeout: how the read ends (never complete).
async fn read_and_stop_reading(recent_memory: &str) -> tonic::Status {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    use kiln_proto::bytestream::{ReadRequest, WriteRequest};
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(
        scratch.path(),
        &[
            "--storage-backend",
            "disk",
            "--recent-blob-memory",
            recent_memory,
            "--bytestream-idle-timeout-ms",
            "500",
        ],
    );
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let blob: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    let d = digest(&blob);
    let name = format!("blobs/{}/{}", d.hash, d.size_bytes);
    let upload = format!("uploads/{}/{name}", uuid::Uuid::new_v4());
    let chunks: Vec<WriteRequest> = blob
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, data)| WriteRequest {
            resource_name: if i == 0 {
                upload.clone()
            } else {
                String::new()
            },
            write_offset: (i << 20) as i64,
            finish_write: (i + 1) << 20 >= blob.len(),
            data: data.to_vec().into(),
        })
        .collect();
    ByteStreamClient::new(channel.clone())
        .write(futures::stream::iter(chunks))
        .await
        .unwrap();
    let mut stream = ByteStreamClient::new(channel)
        .read(ReadRequest {
            resource_name: name,
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = stream.message().await.unwrap().unwrap().data.len();
    // Stop reading past the idle timeout: the server gives the read up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ended = loop {
        match tokio::time::timeout(HANG_GUARD, stream.message())
            .await
            .unwrap()
        {
            Ok(Some(message)) => received += message.data.len(),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let status = ended.unwrap_or_else(|| {
        panic!(
            "with --recent-blob-memory {recent_memory}, the read ended as complete \
             after {received} of {} bytes",
            blob.len()
        )
    });
    assert!(received < blob.len());
    status
}

#[tokio::test]
async fn a_killed_executor_process_loses_its_action_to_another() {
    let scratch = tempfile::tempdir().unwrap();
    let (server, address) = serve(scratch.path(), &[]);
    let mut first = executor(&address, "proc-first", &scratch.path().join("first"));

    // The action: on its first run it leaves a file in its workspace,
    // reports its pid through a FIFO and sleeps; run again (the marker exists) it finishes at once.
    let fifo = pid_fifo(scratch.path());
    let marker = marks(scratch.path()).join("marker");
    let script = format!(
        "if [ -e {m} ]; then echo second run; else touch {m} left-behind; echo $$ > {f}; exec sleep 600; fi",
        m = marker.display(),
        f = fifo.display()
    );
    let stream = execute(&address, script).await;
    let pid = started_pid(fifo).await;

    let _second = executor(&address, "proc-second", &scratch.path().join("second"));
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    // The orphaned `sleep` of the killed executor is ours to stop.
    let _ = Command::new("kill").arg(pid.to_string()).status();

    let response = completed(stream).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.stdout_digest, Some(digest(b"second run\n")));
    assert_eq!(result.execution_metadata.unwrap().worker, "proc-second");
    server.wait_for_log("requeued");

    // Started again on its directory, the killed executor's successor
    // empties the action directory it left, for reuse.
    let work = scratch.path().join("first/work");
    let left: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.file_name().is_some_and(|name| name.len() == 32))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].join("workspace/left-behind").exists());
    let again = spawn_executor(&address, "proc-first", &scratch.path().join("first"), &[]);
    again.log_until_all(&[
        "emptied the action directories an earlier run left",
        "executor registered",
    ]);
    for part in ["workspace", "io"] {
        let dir = left[0].join(part);
        let entries: Vec<_> = std::fs::read_dir(&dir).map_or(Vec::new(), |d| d.collect());
        assert!(entries.is_empty(), "{}: {entries:?}", dir.display());
    }
}

#[tokio::test]
async fn an_executor_process_registers_again_after_its_server_restarts() {
    let scratch = tempfile::tempdir().unwrap();
    let (mut server, address) = serve(scratch.path(), &[]);
    let mut executor = executor(&address, "proc-lasting", &scratch.path().join("executor"));

    // The server goes away; the executor keeps trying rather than exiting.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    executor.wait_for_log("cannot register with the scheduler; retrying");
    executor.wait_for_log("cannot register with the scheduler; retrying");
    assert!(
        executor.child.try_wait().unwrap().is_none(),
        "the executor exited when its server went away"
    );

    // A new server on the same address gets the executor back, which runs
    // its actions.
    let (_server, again) = serve_on(&address, &scratch.path().join("server-2"), &[]);
    assert_eq!(again, address);
    executor.wait_for_log("executor registered");
    let response = completed(execute(&address, "echo back".into()).await).await;
    let result = response.result.unwrap();
    assert_eq!(result.stdout_digest, Some(digest(b"back\n")));
    assert_eq!(result.execution_metadata.unwrap().worker, "proc-lasting");
}

#[tokio::test]
async fn an_executor_stops_the_actions_of_a_lost_session_before_registering_again() {
    let scratch = tempfile::tempdir().unwrap();
    let (mut server, address) = serve(scratch.path(), &[]);
    let executor = executor(&address, "proc-tidy", &scratch.path().join("executor"));

    // The action reports its pid, then answers SIGTERM by taking two more
    // seconds (within the default grace period) before it exits.
    let fifo = pid_fifo(scratch.path());
    let script = format!(
        "echo $$ > {f}; trap 'sleep 2; exit 0' TERM; sleep 600 & wait",
        f = fifo.display()
    );
    let _stream = execute(&address, script).await;
    let pid = started_pid(fifo).await;

    // The server goes away: by the time the executor tries to register
    // again, the action of the lost session has stopped.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    executor.wait_for_log("cannot register with the scheduler; retrying");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the action of the lost session (pid {pid}) still runs while the executor registers again"
    );
}

#[tokio::test]
async fn with_an_executor_token_only_executors_presenting_it_register() {
    let scratch = tempfile::tempdir().unwrap();
    let secret = format!("kiln-token-{}", std::process::id());
    let token_file = scratch.path().join("token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    let wrong_file = scratch.path().join("wrong-token");
    std::fs::write(&wrong_file, "not-the-token").unwrap();
    let (mut server, address) = serve(
        scratch.path(),
        &["--executor-token-file", token_file.to_str().unwrap()],
    );

    // Without the token, or with another, the executor is refused and exits
    // with an error that says why.
    for (name, extra) in [
        ("proc-none", vec![]),
        (
            "proc-wrong",
            vec!["--executor-token-file", wrong_file.to_str().unwrap()],
        ),
    ] {
        let mut refused = spawn_executor(&address, name, &scratch.path().join(name), &extra);
        refused.wait_for_log("executor token");
        let status = wait_bounded(&mut refused.child);
        assert!(!status.success(), "{name} must not run: {status}");
    }

    // With it, the executor registers and runs actions.
    let mut accepted = spawn_executor(
        &address,
        "proc-token",
        &scratch.path().join("proc-token"),
        &["--executor-token-file", token_file.to_str().unwrap()],
    );
    accepted.wait_for_log("executor registered");
    let response = completed(execute(&address, "echo ran".into()).await).await;
    let result = response.result.unwrap();
    assert_eq!(result.stdout_digest, Some(digest(b"ran\n")));
    assert_eq!(result.execution_metadata.unwrap().worker, "proc-token");

    // The secret is in no log line of the server or the executors.
    let _ = server.child.kill();
    let _ = accepted.child.kill();
    for process in [&mut server, &mut accepted] {
        let _ = process.child.wait();
        // Until the reader thread has forwarded the last line.
        while let Ok(line) = process.stderr.recv_timeout(HANG_GUARD) {
            assert!(!line.contains(&secret), "the token leaked: {line}");
        }
    }
}

#[tokio::test]
async fn header_overrides_partition_the_action_cache() {
    use kiln_proto::reapi::action_cache_client::ActionCacheClient;
    if !common::runtime_available("docker") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address, _executor) = serve_docker_executor(scratch.path(), "proc-images");

    // One action digest; the image comes from a header only (base runs as
    // root, nonroot as uid 1000).
    let (channel, action) = upload_action(
        &address,
        vec!["/bin/sh".into(), "-c".into(), "id -u".into()],
        None,
        vec![],
        &[("workload-isolation-type", "docker")],
    )
    .await;
    const HEADER: &str = "x-buildbuddy-platform.container-image";
    let base = "docker://127.0.0.1:5000/kiln-test/base:latest";
    let nonroot = "docker://127.0.0.1:5000/kiln-test/nonroot:latest";
    let run = |image: &'static str| {
        let channel = channel.clone();
        let action = action.clone();
        async move {
            let stream = remote::execute(channel, action, false, &[(HEADER, image)])
                .await
                .unwrap();
            let response = completed(stream).await;
            let result = response.result.clone().unwrap_or_default();
            (response.cached_result, result.stdout_digest)
        }
    };

    // Each image runs once, and each answers its own repeats from the cache.
    assert_eq!(run(base).await, (false, Some(digest(b"0\n"))));
    assert_eq!(run(nonroot).await, (false, Some(digest(b"1000\n"))));
    assert_eq!(run(base).await, (true, Some(digest(b"0\n"))));
    assert_eq!(run(nonroot).await, (true, Some(digest(b"1000\n"))));

    // GetActionResult finds each result under its own header, and neither
    // without one.
    let lookup = |headers: Vec<(&'static str, &'static str)>| {
        let mut request = tonic::Request::new(reapi::GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        });
        for (name, value) in headers {
            request.metadata_mut().insert(name, value.parse().unwrap());
        }
        let mut client = ActionCacheClient::new(channel.clone());
        async move { client.get_action_result(request).await }
    };
    let found = lookup(vec![(HEADER, nonroot)]).await.unwrap().into_inner();
    assert_eq!(found.stdout_digest, Some(digest(b"1000\n")));
    let missing = lookup(vec![]).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
}

/// The pids of `parent`'s children whose command line is `kiln launcher`.
fn launchers_of(parent: u32) -> Vec<u32> {
    children_running(parent, "launcher")
}

/// The pids of `parent`'s children whose command line is `kiln
/// <subcommand> …`.
fn children_running(parent: u32, subcommand: &str) -> Vec<u32> {
    children_of(parent)
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|b| *b == 0).nth(1) == Some(subcommand.as_bytes())
        })
        .collect()
}

/// Whether process `pid` has ended (gone, or a zombie not yet reaped).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// The launchers of executor `executor` (one per CPU), waited for
/// (bounded).
fn launchers_running(executor: u32) -> Vec<u32> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    launchers_counted(executor, cpus)
}

/// The `count` launchers of executor `executor`, waited for (bounded).
fn launchers_counted(executor: u32, count: usize) -> Vec<u32> {
    for _ in 0..600 {
        let launchers = launchers_of(executor);
        if launchers.len() == count {
            return launchers;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "executor {executor} does not have {count} launchers: {:?}",
        launchers_of(executor)
    );
}

/// How many launchers a `--run-as` process with this test's CPUs has:
/// one per CPU, and at least two, so that one can start another.
fn run_as_launchers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().min(8))
        .max(2)
}

/// Sends `signal` (as `kill` takes it) to each of `pids`.
fn signal_all(signal: &str, pids: &[u32]) {
    for pid in pids {
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }
}

/// A shell command that waits (bounded) until the test writes `go` in
/// `marks`.
fn until_go(marks: &Path) -> String {
    format!(
        "i=0 && while [ ! -e {m}/go ] && [ $i -lt 2000 ]; do sleep 0.05; i=$((i+1)); done",
        m = marks.display()
    )
}

/// Stops `launchers`, lets the action waiting [`until_go`] end, and
/// watches `stream` for two seconds: whether the operation finished
/// meanwhile. The launchers stay stopped.
async fn end_with_launchers_stopped(
    stream: &mut Streaming<Operation>,
    launchers: &[u32],
    marks: &Path,
) -> bool {
    signal_all("-STOP", launchers);
    std::fs::write(marks.join("go"), "").unwrap();
    tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(operation) = stream.next().await {
            if operation.unwrap().done {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// Stops `launchers` and executes `script` under `sandbox`: the action
/// reaches EXECUTING and goes no further (its start waits on a stopped
/// launcher, half a second of it watched). The launchers stay stopped.
async fn execute_with_launchers_stopped(
    address: &str,
    launchers: &[u32],
    script: &str,
) -> Streaming<Operation> {
    execute_waiting_on_launchers(
        address,
        launchers,
        script,
        &[("workload-isolation-type", "sandbox")],
    )
    .await
}

/// Stops `launchers` and executes `script` with `properties`; asserts
/// that the action reaches EXECUTING, that a request of its executor then
/// waits unread on one of them, and that the action goes no further while
/// they are stopped (half a second of it watched). The launchers stay
/// stopped.
async fn execute_waiting_on_launchers(
    address: &str,
    launchers: &[u32],
    script: &str,
    properties: &[(&str, &str)],
) -> Streaming<Operation> {
    signal_all("-STOP", launchers);
    let mut stream = execute_with(address, script.into(), properties).await;
    loop {
        let operation = tokio::time::timeout(HANG_GUARD, stream.next())
            .await
            .expect("the operation never reached EXECUTING")
            .expect("the stream ended before EXECUTING")
            .unwrap();
        assert!(!operation.done, "finished with the launchers stopped");
        if remote::stage(&operation) == reapi::execution_stage::Value::Executing {
            break;
        }
    }
    // EXECUTING is said before the executor has asked a launcher anything
    // (on a loaded machine, up to seconds before): a test that kills them
    // now must know its request is already with one of them.
    wait_until("a request waiting on a stopped launcher", || {
        launchers
            .iter()
            .any(|&launcher| unread_request(launcher) > 0)
    })
    .await;
    let early = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
    assert!(
        early.is_err(),
        "the operation moved on with the launchers stopped: {early:?}"
    );
    stream
}

/// How many bytes of requests wait unread on `launcher`'s socket to its
/// executor (its descriptor 3), read through a copy of that descriptor.
fn unread_request(launcher: u32) -> u64 {
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let pid = Pid::from_raw(launcher as i32).expect("a launcher's pid");
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).expect("pidfd_open of a launcher");
    let socket =
        pidfd_getfd(&pidfd, 3, PidfdGetfdFlags::empty()).expect("a copy of a launcher's socket");
    rustix::io::ioctl_fionread(&socket).expect("FIONREAD on a launcher's socket")
}

/// The overlay workspace of an action that runs as root is mounted by the
/// launchers, not by the executor: while they are stopped, a `docker`
/// action (which starts no process through them) waits in EXECUTING with
/// nothing mounted under the work root; once they go on, it runs, as root,
/// with its workspace on that overlay. Killed while such a mount waits on
/// them, they are replaced: the action is given back, runs again, and no
/// mount is left behind.
#[tokio::test]
async fn overlay_workspaces_are_mounted_by_the_launchers() {
    if !common::root_available("the launchers of a root executor")
        || !common::runtime_available("docker")
    {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address, process) = serve_docker_executor(scratch.path(), "mounts");
    let launchers = launchers_running(process.child.id());
    let work_root = scratch.path().join("work").canonicalize().unwrap();
    let mounted_below = |root: &Path| -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| Path::new(point).starts_with(root))
            .map(str::to_owned)
            .collect()
    };
    const SCRIPT: &str = "id -u; grep ' - overlay kiln-workspace ' /proc/self/mountinfo | wc -l";
    const DOCKER: &[(&str, &str)] = &[
        ("workload-isolation-type", "docker"),
        (
            "container-image",
            "docker://127.0.0.1:5000/kiln-test/base:latest",
        ),
    ];
    let stream = execute_waiting_on_launchers(&address, &launchers, SCRIPT, DOCKER).await;
    let early = mounted_below(&work_root);
    signal_all("-CONT", &launchers);
    assert_eq!(
        early,
        Vec::<String>::new(),
        "mounted with the launchers stopped"
    );
    let response = completed(stream).await;
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    // Root in the container, on one overlay: its workspace.
    assert_eq!(result.stdout_digest, Some(digest(b"0\n1\n")));

    // Killed while the mount waits on them.
    let stream =
        execute_waiting_on_launchers(&address, &launchers, &format!("{SCRIPT}; true"), DOCKER)
            .await;
    signal_all("-KILL", &launchers);
    let response = completed(stream).await;
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    assert_eq!(result.stdout_digest, Some(digest(b"0\n1\n")));
    process.wait_for_log("the launcher exited while mounting a workspace overlay");
    // Every overlay detached once its action was done (bounded wait: the
    // detach follows the result's upload).
    for _ in 0..100 {
        if mounted_below(&work_root).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("left mounted: {:?}", mounted_below(&work_root));
}

/// What an action's user made is taken back by the launchers, not by the
/// executor: an action as `nobody` (a root executor's default under `none`)
/// closes a directory it made and the output in it to everyone else. With
/// the launchers stopped once it ends, the action goes no further and that
/// directory stays `nobody`'s; once they go on, the output is read, becomes
/// a file-cache entry of the executor's (read-only, its only link), and
/// the directories go to the executor's pool of spare directories.
#[tokio::test]
async fn what_an_action_user_made_is_taken_back_by_the_launchers() {
    use std::os::unix::fs::MetadataExt;
    if !common::root_available("the launchers of a root executor") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &[]);
    let work_dir = scratch.path().join("work");
    let process = executor(&address, "take-back", &work_dir);
    let launchers = launchers_running(process.child.id());
    let marks = marks(scratch.path());
    let script = format!(
        "id -u > {marks}/user && mkdir -p out/closed && echo made > out/closed/result.txt \
         && chmod 600 out/closed/result.txt && chmod 700 out/closed && touch {marks}/started && {go}",
        marks = marks.display(),
        go = until_go(&marks),
    );
    let (channel, action_digest) =
        upload_with_outputs(&address, &script, &["out/closed/result.txt"], &[]).await;
    let mut stream = execute_digest(channel, action_digest).await.unwrap();
    wait_until("the action to start", || marks.join("started").exists()).await;
    let user = std::fs::read_to_string(marks.join("user")).unwrap();
    assert!(common::is_default_action_user(&user), "ran as {user}");
    let uid: u32 = user.trim().parse().unwrap();
    let closed: Vec<_> = walk(&work_dir)
        .into_iter()
        .filter(|path| path.ends_with("workspace/out/closed"))
        .collect();
    assert_eq!(closed.len(), 1, "{closed:?}");
    let owner = |path: &Path| path.symlink_metadata().map(|m| (m.uid(), m.gid())).ok();

    let finished = end_with_launchers_stopped(&mut stream, &launchers, &marks).await;
    let left_as_it_was = owner(&closed[0]);
    signal_all("-CONT", &launchers);
    assert!(!finished, "finished with the launchers stopped");
    assert_eq!(
        left_as_it_was,
        Some((uid, uid)),
        "taken back by the executor"
    );

    let response = completed(stream).await;
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    assert_eq!(result.output_files.len(), 1, "{result:?}");
    assert_eq!(result.output_files[0].digest, Some(digest(b"made\n")));
    // Once the directory is emptied (after the result is sent: bounded
    // wait), the output's one copy is the cache's entry.
    let entries = || -> Vec<std::path::PathBuf> {
        walk(&work_dir)
            .into_iter()
            .filter(|path| std::fs::read(path).is_ok_and(|bytes| bytes == b"made\n"))
            .collect()
    };
    wait_until("the workspace to be emptied", || entries().len() == 1).await;
    let entry = entries().remove(0).symlink_metadata().unwrap();
    assert_eq!((entry.uid(), entry.gid(), entry.nlink()), (0, 0, 1));
    assert_eq!(entry.mode() & 0o7777, 0o444);
    assert!(!closed[0].exists(), "the workspace was not emptied");
    let spare: Vec<_> = walk(&work_dir)
        .into_iter()
        .filter(|path| {
            path.parent()
                .is_some_and(|parent| parent.ends_with("spare"))
        })
        .collect();
    assert!(
        spare.len() >= 2,
        "out/ and out/closed/ kept for reuse: {spare:?}"
    );
    for dir in &spare {
        let meta = dir.symlink_metadata().unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, 0, 0o755)
        );
    }
}

/// Uploads an action (never cached) running `script`, declaring
/// `output_paths`, in pool `procs` with `properties` besides it; returns a
/// channel to the server and the action's digest.
async fn upload_with_outputs(
    address: &str,
    script: &str,
    output_paths: &[&str],
    properties: &[(&str, &str)],
) -> (Channel, Digest) {
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let command = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        output_paths: output_paths.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let empty = reapi::Directory::default().encode_to_vec();
    let mut all = vec![("Pool", "procs")];
    all.extend_from_slice(properties);
    let action = reapi::Action {
        command_digest: Some(digest(&command)),
        input_root_digest: Some(digest(&empty)),
        platform: Some(remote::platform(&all)),
        do_not_cache: true,
        ..Default::default()
    }
    .encode_to_vec();
    let action_digest = digest(&action);
    remote::upload_as(&channel, None, &[command, empty, action]).await;
    (channel, action_digest)
}

/// Executes `script` declaring `output_paths` (see
/// [`upload_with_outputs`]); the completed response.
async fn execute_with_outputs(
    address: &str,
    script: &str,
    output_paths: &[&str],
    properties: &[(&str, &str)],
) -> reapi::ExecuteResponse {
    let (channel, action) = upload_with_outputs(address, script, output_paths, properties).await;
    completed(execute_digest(channel, action).await.unwrap()).await
}

/// The executor reads no file past its mode (it keeps no
/// CAP_DAC_READ_SEARCH): what an action's user closed to others, in
/// output files and output directories, is given to it by the launchers
/// before it is read, in a fresh runner and in a warm one, kept with its
/// workspace or not; what an action closed to its owner is opened to the
/// executor where it is the owner; outputs linked to each other are given
/// too; and a closed output with a name that is no output, which is never
/// given, fails the action naming it.
#[tokio::test]
async fn outputs_closed_to_others_are_read_once_taken_back() {
    if !common::root_available("the launchers of a root executor") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address, _executor) =
        serve_with_executor(scratch.path(), "closed-outputs", "none,sandbox");
    // A tree closed at every level, a file closed even to its owner, and a
    // file alone in a closed directory.
    let script = "rm -rf tree lone zero && mkdir -p tree/deep lone && echo t > tree/top \
                  && echo f > tree/deep/file && echo z > zero && echo l > lone/file \
                  && chmod 600 tree/top tree/deep/file lone/file && chmod 000 zero \
                  && chmod 700 tree tree/deep lone";
    let file = |name: &str, bytes: &[u8]| reapi::FileNode {
        name: name.into(),
        digest: Some(digest(bytes)),
        ..Default::default()
    };
    let deep = reapi::Directory {
        files: vec![file("file", b"f\n")],
        ..Default::default()
    };
    let tree = reapi::Directory {
        files: vec![file("top", b"t\n")],
        directories: vec![reapi::DirectoryNode {
            name: "deep".into(),
            digest: Some(digest(&deep.encode_to_vec())),
        }],
        ..Default::default()
    };
    let tree_digest = digest(&tree.encode_to_vec());
    let cases: [&[(&str, &str)]; 5] = [
        &[("workload-isolation-type", "none")],
        &[("workload-isolation-type", "sandbox")],
        &[
            ("workload-isolation-type", "none"),
            ("recycle-runner", "true"),
        ],
        &[
            ("workload-isolation-type", "none"),
            ("recycle-runner", "true"),
            ("preserve-workspace", "true"),
        ],
        &[
            ("workload-isolation-type", "sandbox"),
            ("recycle-runner", "true"),
            ("preserve-workspace", "true"),
        ],
    ];
    for properties in cases {
        // Twice: a warm runner's second action reads its outputs too.
        for round in 0..2 {
            let response =
                execute_with_outputs(&address, script, &["tree", "zero", "lone/file"], properties)
                    .await;
            let result = response.result.clone().expect("a result");
            assert_eq!(
                (
                    result.exit_code,
                    response.status.as_ref().map_or(0, |s| s.code)
                ),
                (0, 0),
                "{properties:?}, round {round}: {response:?}"
            );
            let mut files: Vec<_> = result
                .output_files
                .iter()
                .map(|f| (f.path.as_str(), f.digest.clone()))
                .collect();
            files.sort_by_key(|(path, _)| *path);
            assert_eq!(
                files,
                [
                    ("lone/file", Some(digest(b"l\n"))),
                    ("zero", Some(digest(b"z\n")))
                ],
                "{properties:?}, round {round}"
            );
            assert_eq!(result.output_directories.len(), 1, "{properties:?}");
            assert_eq!(
                result.output_directories[0].root_directory_digest,
                Some(tree_digest.clone()),
                "{properties:?}, round {round}"
            );
        }
    }

    // Outputs linked to each other only are given and read; a closed
    // output with a name that is not an output is never given, so never
    // read: the status says why.
    let response = execute_with_outputs(
        &address,
        "echo x > a && chmod 600 a && ln a b",
        &["a", "b"],
        &[("workload-isolation-type", "none")],
    )
    .await;
    let result = response.result.expect("a result");
    assert_eq!(
        result
            .output_files
            .iter()
            .map(|f| (f.path.as_str(), f.digest.clone()))
            .collect::<Vec<_>>(),
        [("a", Some(digest(b"x\n"))), ("b", Some(digest(b"x\n")))],
        "{:?}",
        response.status
    );
    let response = execute_with_outputs(
        &address,
        "echo x > a && chmod 600 a && mkdir kept && ln a kept/b",
        &["a"],
        &[("workload-isolation-type", "none")],
    )
    .await;
    let status = response.status.expect("a status");
    assert_ne!(status.code, 0, "{status:?}");
    assert!(
        status.message.contains("closed it to others")
            && status.message.contains("more than one link"),
        "{status:?}"
    );
}

/// A launcher killed while it takes back an action's outputs (which the
/// executor cannot read before) does not fail the action: it is given
/// back, runs again, and its result has the output.
#[tokio::test]
async fn launchers_killed_while_taking_back_outputs_give_the_action_back() {
    if !common::root_available("the launchers of a root executor") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address, executor) =
        serve_with_executor(scratch.path(), "killed-take-back", "none,sandbox");
    let launchers = launchers_running(executor.child.id());
    let marks = marks(scratch.path());
    // Each run has a uid of its own: both may append, and replace `started`.
    let runs = marks.join("runs");
    std::fs::write(&runs, "").unwrap();
    std::fs::set_permissions(&runs, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let script = format!(
        "echo run >> {marks}/runs && mkdir -p out && echo made > out/result.txt \
         && chmod 600 out/result.txt && chmod 700 out && rm -f {marks}/started \
         && touch {marks}/started && {go}",
        marks = marks.display(),
        go = until_go(&marks),
    );
    let (channel, action_digest) =
        upload_with_outputs(&address, &script, &["out/result.txt"], &[]).await;
    let mut stream = execute_digest(channel, action_digest).await.unwrap();
    wait_until("the action to start", || marks.join("started").exists()).await;

    // It ends with the launchers stopped: its take-back waits on one.
    let finished = end_with_launchers_stopped(&mut stream, &launchers, &marks).await;
    assert!(!finished, "finished with the launchers stopped");
    signal_all("-KILL", &launchers);

    let response = completed(stream).await;
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    assert_eq!(
        result
            .output_files
            .iter()
            .map(|f| (f.path.as_str(), f.digest.clone()))
            .collect::<Vec<_>>(),
        [("out/result.txt", Some(digest(b"made\n")))]
    );
    assert_eq!(
        std::fs::read_to_string(marks.join("runs")).unwrap(),
        "run\nrun\n",
        "the action ran again once its take-back was lost"
    );
    executor.wait_for_log("the launcher exited while");
}

/// A work directory given relative to where the executor starts works as
/// an absolute one: its actions run as the action user (whose workspace
/// directories the launchers, which take absolute paths alone, give it).
#[tokio::test]
async fn an_executor_with_a_relative_work_dir_runs_actions() {
    if !common::root_available("the launchers of a root executor") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &[]);
    common::open_to_actions(&scratch.path().join("relative"));
    let mut command = executor_command(&address, "relative", Path::new("relative"), &[]);
    command.current_dir(scratch.path());
    let process = Process::spawn_command(command);
    process.wait_for_log("executor registered");
    let response = completed(execute(&address, common::who_runs_this()).await).await;
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    assert_eq!(result.stdout_digest, Some(digest(b"action-user\n")));
}

/// A capability set from a `/proc/PID/status` line (`CapEff:\t…`).
fn capabilities(pid: u32, task: Option<&str>, line: &str) -> u64 {
    let path = match task {
        Some(task) => format!("/proc/{pid}/task/{task}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let status = std::fs::read_to_string(&path).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .unwrap_or_else(|| panic!("no {line} in {path}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// Capability numbers (linux/capability.h).
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_PTRACE: u32 = 19;

/// A root executor, and a root server, keep only the capabilities their
/// own process needs, in every thread: nothing at all, for a server that
/// runs no actions, for an executor offering `none` and `sandbox`, and for
/// one offering `none` alone, whose actions' namespaces and bridged
/// networks the launchers make. Their launchers, which take the root-only
/// steps, keep root's, and actions still run as the action user, with
/// namespaces under `none` too, and a bridged network under `sandbox`
/// (deleted once it ends). (The rest of the suite runs under the same
/// executors: every isolation type works without what it dropped.)
#[tokio::test]
async fn a_root_executor_keeps_only_the_capabilities_it_needs() {
    if !common::root_available("the launchers of a root executor") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (server, address, process) = serve_with_executor(scratch.path(), "capable", "none,sandbox");
    let response = completed(execute(&address, common::who_runs_this()).await).await;
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    assert_eq!(result.stdout_digest, Some(digest(b"action-user\n")));
    // A bridged network, wired by the launchers, gone with its namespace.
    let response = completed(
        execute_with(
            &address,
            "grep -q eth0 /proc/net/dev && echo bridged".into(),
            &[
                ("workload-isolation-type", "sandbox"),
                ("dockerNetwork", "bridge"),
            ],
        )
        .await,
    )
    .await;
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    assert_eq!(result.stdout_digest, Some(digest(b"bridged\n")));
    wait_until("the bridged action's interface to be deleted", || {
        kiln_sandbox::network::interfaces_owned_by(process.child.id()).is_empty()
    })
    .await;
    let plain_scratch = scratch.path().join("plain");
    let (plain_server, plain_address, plain) = serve_with_executor(&plain_scratch, "plain", "none");
    let response = completed(
        execute_with(
            &plain_address,
            "echo inside".into(),
            &[("dockerNetwork", "off"), ("dockerInit", "true")],
        )
        .await,
    )
    .await;
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    assert_eq!(result.stdout_digest, Some(digest(b"inside\n")));

    let bit = |cap: u32| 1u64 << cap;
    let dropped = [
        ("CAP_CHOWN", CAP_CHOWN),
        ("CAP_DAC_OVERRIDE", CAP_DAC_OVERRIDE),
        ("CAP_FOWNER", CAP_FOWNER),
        ("CAP_KILL", CAP_KILL),
        ("CAP_SETGID", CAP_SETGID),
        ("CAP_SETUID", CAP_SETUID),
        ("CAP_SYS_MODULE", CAP_SYS_MODULE),
        ("CAP_SYS_PTRACE", CAP_SYS_PTRACE),
    ];
    for (what, pid) in [
        ("the executor offering sandbox", process.child.id()),
        ("the executor offering none", plain.child.id()),
        ("a server without an executor", server.child.id()),
        ("another server without one", plain_server.child.id()),
    ] {
        let bounding = capabilities(pid, None, "CapBnd:");
        let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|task| task.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(threads.len() > 1, "{what} runs one thread only");
        for thread in &threads {
            for set in ["CapEff:", "CapPrm:"] {
                let caps = capabilities(pid, Some(thread), set);
                assert_eq!(caps, 0, "{what}'s thread {thread} holds {caps:x} in {set}");
            }
        }
        // What it runs as root gets root's capabilities back: the
        // bounding set is whole.
        for (name, cap) in dropped {
            assert_ne!(bounding & bit(cap), 0, "{what}'s bounding set lacks {name}");
        }
        for launcher in launchers_running(pid) {
            let caps = capabilities(launcher, None, "CapEff:");
            for (name, cap) in dropped {
                assert_ne!(
                    caps & bit(cap),
                    0,
                    "{what}'s launcher lacks {name}: {caps:x}"
                );
            }
        }
    }
}

/// A root executor keeps no CAP_KILL (see the test above), yet stops its
/// actions, which run as other users: on timeout, the SIGTERM reaches the
/// action's process group (its trap runs and reports) through the
/// launchers, under `none` and `sandbox`; and under `none`, a process
/// the action left running in a session of its own dies with the
/// action's cgroup.
#[tokio::test]
async fn a_root_executor_stops_its_actions_through_the_launchers() {
    if !common::root_available("the launchers of a root executor") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address, process) =
        serve_with_executor(scratch.path(), "stopping", "none,sandbox");
    let executor_caps = capabilities(process.child.id(), None, "CapEff:");
    assert_eq!(
        executor_caps & (1 << CAP_KILL),
        0,
        "the executor holds CAP_KILL"
    );
    let marks = marks(scratch.path());
    for isolation in ["none", "sandbox"] {
        // Under sandbox the marks directory is not there: only `none`
        // records the pid of what it leaves behind.
        let left = marks.join(format!("{isolation}-left"));
        let script = format!(
            "trap 'echo got-TERM; exit 3' TERM; setsid sleep 300 & \
             [ -d {marks} ] && echo $! > {left}; sleep 300 & wait",
            marks = marks.display(),
            left = left.display(),
        );
        let stream = execute_with(
            &address,
            script,
            &[
                ("workload-isolation-type", isolation),
                ("default-timeout", "1s"),
            ],
        )
        .await;
        let response = completed(stream).await;
        let status = response.status.unwrap_or_default();
        assert_eq!(
            status.code,
            tonic::Code::DeadlineExceeded as i32,
            "{isolation}: {status:?}"
        );
        let result = response.result.expect("a result");
        assert_eq!(result.exit_code, 3, "{isolation}: the trap did not run");
        assert_eq!(
            result.stdout_digest,
            Some(digest(b"got-TERM\n")),
            "{isolation}: the SIGTERM did not reach the action"
        );
        if isolation == "none" {
            let pid: u32 = std::fs::read_to_string(&left)
                .unwrap_or_else(|e| panic!("{}: {e}", left.display()))
                .trim()
                .parse()
                .unwrap();
            // The result comes once the action's cgroup is emptied.
            assert!(
                !alive(pid),
                "none: the setsid leftover {pid} outlived its action"
            );
        }
    }
}

/// Waits until `condition` holds, failing the test after [`HANG_GUARD`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited too long for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every path under `dir`, not following symlinks.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            found.extend(walk(&entry.path()));
        }
        found.push(entry.path());
    }
    found
}

/// A root executor with `--run-as` becomes that user once its launchers
/// run: every id of its process is the user's, it holds no capability,
/// and what it writes was handed to it (its work directory, made for it,
/// and a cgroup parent of its own below root's);
/// its launchers stay root. Actions still run as the action user, under
/// `none` (with namespaces) and under `sandbox` (with a bridged network),
/// and their outputs are read. A launcher killed is replaced by one that
/// a running launcher starts (a user cannot start a root process), root
/// and the executor's child as the first ones were. With every launcher
/// gone at once, the executor stops with an error saying so, and started
/// again as before it runs actions. What still needs root in the process
/// (podman, VMs) is refused up front.
#[tokio::test]
async fn a_root_executor_run_as_a_user_of_its_own_runs_actions_through_its_launchers() {
    if !common::root_available("the launchers of a root executor") {
        return;
    }
    const USER: &str = "64000:64000";
    let scratch = tempfile::tempdir().unwrap();
    // An action given back while its executor restarts waits for it.
    let (_server, address) = serve(scratch.path(), &["--unmatched-grace", "120s"]);
    let home = scratch.path().join("run-as");
    common::open_to_actions(&home);
    // Not made by the test: the executor makes it for its user.
    let work_dir = home.join("work");
    let start = || run_as_executor(&address, "run-as", &work_dir, "none,sandbox");
    let mut process = start();
    let executor = process.child.id();
    assert_eq!(status_field(executor, "Uid:"), "64000 64000 64000 64000");
    assert_eq!(status_field(executor, "Gid:"), "64000 64000 64000 64000");
    assert_eq!(status_field(executor, "Groups:"), "");
    assert_eq!(capabilities(executor, None, "CapPrm:"), 0);
    assert_eq!(capabilities(executor, None, "CapEff:"), 0);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&work_dir).unwrap().uid(), 64000);
    // Its action cgroups' parent is its own, below root's, which root
    // executors on this host go on using.
    let cgroups = kiln_sandbox::cgroup::CgroupRoot::detect("kiln").unwrap();
    for (_, roots) in cgroups.parents() {
        assert_eq!(std::fs::metadata(roots).unwrap().uid(), 0, "{roots:?}");
        let users = roots.join("uid-64000");
        assert_eq!(std::fs::metadata(&users).unwrap().uid(), 64000, "{users:?}");
    }
    let launchers = launchers_counted(executor, run_as_launchers());
    let root = |launcher: &u32| {
        let status = std::fs::read_to_string(format!("/proc/{launcher}/status")).unwrap();
        assert!(
            status.contains("\nUid:\t0\t0\t0\t0\n"),
            "launcher {launcher}:\n{status}"
        );
    };
    launchers.iter().for_each(root);

    let run = |script: String, properties: &'static [(&'static str, &'static str)]| {
        let address = address.clone();
        async move {
            let response = completed(execute_with(&address, script, properties).await).await;
            let result = response.result.expect("a result");
            assert_eq!(result.exit_code, 0, "{properties:?}: {:?}", response.status);
            result.stdout_digest
        }
    };
    let namespaced: &[(&str, &str)] = &[("dockerNetwork", "off"), ("dockerInit", "true")];
    for properties in [&[][..], namespaced] {
        assert_eq!(
            run(common::who_runs_this(), properties).await,
            Some(digest(b"action-user\n")),
            "{properties:?}"
        );
    }
    let bridged: &[(&str, &str)] = &[
        ("workload-isolation-type", "sandbox"),
        ("dockerNetwork", "bridge"),
    ];
    let script = format!(
        "grep -q eth0 /proc/net/dev && echo bridged && {}",
        common::who_runs_this()
    );
    assert_eq!(
        run(script, bridged).await,
        Some(digest(b"bridged\naction-user\n"))
    );
    // As the action user, and as root (under an overlay, given back
    // through it).
    for root in ["false", "true"] {
        let response = execute_with_outputs(
            &address,
            "mkdir -p d && echo out > d/result && chmod 600 d/result && chmod 700 d",
            &["d/result"],
            &[
                ("workload-isolation-type", "sandbox"),
                ("dockerRunAsRoot", root),
            ],
        )
        .await;
        let result = response.result.expect("a result");
        assert_eq!(result.exit_code, 0, "root {root}: {:?}", response.status);
        assert_eq!(result.output_files.len(), 1, "{result:?}");
        assert_eq!(result.output_files[0].digest, Some(digest(b"out\n")));
    }

    // A launcher killed: one that runs starts another in its place.
    signal_all("-KILL", &launchers[..1]);
    wait_until("a launcher in place of the one killed", || {
        let now = launchers_of(executor);
        now.len() == launchers.len() && !now.contains(&launchers[0])
    })
    .await;
    let now = launchers_of(executor);
    let new: Vec<u32> = now
        .iter()
        .filter(|pid| !launchers.contains(pid))
        .copied()
        .collect();
    assert_eq!(new.len(), 1, "before {launchers:?}, now {now:?}");
    root(&new[0]);
    for properties in [&[][..], &[("workload-isolation-type", "sandbox")]] {
        assert_eq!(
            run(common::who_runs_this(), properties).await,
            Some(digest(b"action-user\n")),
            "{properties:?}"
        );
    }

    // Every launcher gone at once, with an action running: the executor
    // cannot run actions any more, nor stop that one, and stops, saying
    // why.
    let fifo = pid_fifo(scratch.path());
    let again = fifo.with_file_name("again");
    let script = format!(
        "[ -e {again} ] && exit 0; touch {again}; echo $$ > {fifo}; exec sleep 300",
        again = again.display(),
        fifo = fifo.display()
    );
    let running = execute_with(&address, script, &[]).await;
    let action = started_pid(fifo).await;
    stops_once_every_launcher_is_gone(&mut process);
    // Started again, as a supervisor would, it runs actions: what the
    // first run left (its work directory, its cgroups) is the user's, and
    // what was left running in its action cgroups is killed.
    process = start();
    wait_until("the gone executor's action to be killed", || !alive(action)).await;
    // The action was given back and runs again (finding its mark, it
    // exits at once): its client gets a result.
    let response = completed(running).await;
    assert_eq!(
        response.result.map(|r| r.exit_code),
        Some(0),
        "{:?}",
        response.status
    );
    assert_eq!(
        run(
            common::who_runs_this(),
            &[("workload-isolation-type", "sandbox")]
        )
        .await,
        Some(digest(b"action-user\n"))
    );
    drop(process);
    // Nothing is left of either run's overlay probe, whose mount leaves a
    // directory of root's.
    let probes: Vec<_> = std::fs::read_dir(work_dir.join("work"))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name())
        .filter(|name| name.to_string_lossy().starts_with("overlay-probe"))
        .collect();
    assert!(probes.is_empty(), "left: {probes:?}");

    // What an executor run as a user refuses to start with, saying why.
    let refusal = |name: &str, args: &[&str]| {
        let refused = executor_command(&address, name, &home.join(name), args)
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{name} started");
        String::from_utf8_lossy(&refused.stderr).into_owned()
    };
    // Podman (rootful, through its CLI) still needs root in the executor.
    let stderr = refusal(
        "run-as-podman",
        &["--isolation", "none,podman", "--run-as", USER],
    );
    assert!(
        stderr.contains("--run-as 64000:64000: `podman` still needs root"),
        "{stderr}"
    );
    let stderr = refusal("run-as-root", &["--isolation", "none", "--run-as", "0:0"]);
    assert!(stderr.contains("not a user of its own"), "{stderr}");
    // Nor may actions run as the executor's own user: they could reach
    // its process.
    let args = [
        "--isolation",
        "none",
        "--run-as",
        USER,
        "--action-user",
        USER,
    ];
    let stderr = refusal("run-as-action-user", &args);
    assert!(
        stderr.contains("uid 64000 is also an action user"),
        "{stderr}"
    );
}

/// A root executor with `--run-as` offering `docker` reaches the daemon
/// only through its docker gate, a root process it started before
/// becoming its user: cold and warm container actions run (a warm
/// runner's file outside the workspace is there for the next action, and
/// the runner is frozen between actions, its freezer given to the user),
/// while the executor holds no capability and cannot reach the daemon's
/// socket itself. The gate goes with the executor, its pins with it; and
/// an executor whose gate is gone stops, saying so.
#[tokio::test]
async fn a_root_executor_run_as_a_user_of_its_own_runs_docker_actions_through_its_gate() {
    if !common::root_available("a root executor's docker gate") {
        return;
    }
    common::test_images().unwrap_or_else(|error| panic!("building the test images: {error}"));
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address) = serve(scratch.path(), &[]);
    let home = scratch.path().join("run-as");
    common::open_to_actions(&home);
    let work_dir = home.join("work");
    let start = || run_as_executor(&address, "run-as-docker", &work_dir, "none,docker");
    let mut process = start();
    let executor = process.child.id();
    let uids = |pid: u32| status_field(pid, "Uid:");
    assert_eq!(uids(executor), "64000 64000 64000 64000");
    assert_eq!(capabilities(executor, None, "CapEff:"), 0);
    let gates_of = |parent: u32| children_running(parent, "docker-gate");
    let gates = gates_of(executor);
    assert_eq!(gates.len(), 1, "{gates:?}");
    let gate = gates[0];
    assert_eq!(uids(gate), "0 0 0 0");
    let gate_dir = std::path::PathBuf::from(format!("/run/kiln-docker-gate-{executor}"));
    assert!(gate_dir.join("docker.sock").exists());

    let image = (
        "container-image",
        "docker://127.0.0.1:5000/kiln-test/base:latest",
    );
    let docker = ("workload-isolation-type", "docker");
    let response =
        completed(execute_with(&address, "echo cold".into(), &[docker, image]).await).await;
    let result = response.result.as_ref().expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    assert_eq!(result.stdout_digest, Some(digest(b"cold\n")));

    // Outputs root made in the container, closed to others, are read.
    let response = execute_with_outputs(
        &address,
        "mkdir -p d && echo out > d/result && chmod 600 d/result && chmod 700 d",
        &["d/result"],
        &[docker, image],
    )
    .await;
    let result = response.result.as_ref().unwrap_or_else(|| {
        let log: Vec<String> = process.stderr.try_iter().collect();
        panic!("no result: {:?}\n{}", response.status, log.join("\n"))
    });
    assert_eq!(result.exit_code, 0, "{:?}", response.status);
    assert_eq!(result.output_files.len(), 1, "{result:?}");
    assert_eq!(result.output_files[0].digest, Some(digest(b"out\n")));

    let warm = [
        docker,
        image,
        ("recycle-runner", "true"),
        ("runner-recycling-key", "run-as-docker"),
    ];
    let first =
        completed(execute_with(&address, "echo kept > /tmp/mark; sleep 300 &".into(), &warm).await)
            .await;
    assert_eq!(
        first.result.as_ref().map(|r| r.exit_code),
        Some(0),
        "{:?}",
        first.status
    );
    // Between actions the runner is frozen, through a freezer the gate
    // gave the executor's user.
    let frozen = std::process::Command::new("sh")
        .args([
            "-c",
            "for id in $(docker ps -q --no-trunc --filter \"label=kiln.owner=$1\"); do \
             f=/sys/fs/cgroup/freezer/docker/$id/freezer.state; \
             [ -e $f ] && echo $(stat -c %u $f) $(cat $f); done",
            "sh",
            &kiln::isolation::container_owner(false, &work_dir),
        ])
        .output()
        .unwrap();
    let frozen = String::from_utf8_lossy(&frozen.stdout).into_owned();
    if std::path::Path::new("/sys/fs/cgroup/freezer").exists() {
        assert!(frozen.contains("64000 FROZEN"), "{frozen}");
    }
    let second = completed(
        execute_with(
            &address,
            "cat /tmp/mark; for c in /proc/[0-9]*/comm; do read n < $c; \
             [ \"$n\" = sleep ] && echo running && break; done; true"
                .into(),
            &warm,
        )
        .await,
    )
    .await;
    let result = second.result.as_ref().expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", second.status);
    assert_eq!(result.stdout_digest, Some(digest(b"kept\nrunning\n")));
    assert!(runner_usage(&second).warm, "{:?}", runner_usage(&second));

    // Not the daemon's socket itself: it is root's.
    let reached = std::process::Command::new("setpriv")
        .args(["--reuid", "64000", "--regid", "64000", "--clear-groups"])
        .args(["sh", "-c", "exec 3<>/var/run/docker.sock"])
        .output()
        .unwrap();
    assert!(
        !reached.status.success(),
        "the executor's user reaches dockerd itself"
    );

    // The gate goes with its executor, and its pins with it.
    drop(process);
    wait_until("the gate to end with its executor", || ended(gate)).await;
    wait_until("the gate's directory to go", || !gate_dir.exists()).await;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(gate_dir.to_str().unwrap()), "{mounts}");

    // An executor whose gate is gone stops, saying so.
    process = start();
    let gates = gates_of(process.child.id());
    assert_eq!(gates.len(), 1, "{gates:?}");
    signal_all("-KILL", &gates);
    process.wait_for_log("the docker gate ended");
    let status = wait_bounded(&mut process.child);
    assert!(!status.success(), "{status}");
}

/// A registered executor `name` offering `isolation`, started as root
/// with `--run-as 64000:64000`.
fn run_as_executor(address: &str, name: &str, work_dir: &Path, isolation: &str) -> Process {
    let process = Process::spawn_command(executor_command(
        address,
        name,
        work_dir,
        &["--isolation", isolation, "--run-as", "64000:64000"],
    ));
    process.wait_for_log("executor registered");
    process
}

/// The values of line `name` (`Uid:`, say) of process `pid`'s status,
/// one space apart.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `kiln serve --run-as`: the server and its embedded executor become
/// the user and run actions through the launchers. On one CPU it still
/// has two, so that one killed is replaced through the other; once every
/// launcher is gone it stops with an error saying why.
#[tokio::test]
async fn a_root_server_run_as_a_user_of_its_own_stops_once_its_launchers_are_gone() {
    if !common::root_available("the launchers of a root server") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let home = scratch.path().join("run-as");
    common::open_to_actions(&home);
    let data_dir = home.join("data");
    let mut command = Command::new("taskset");
    command.args(["-c", "0", env!("CARGO_BIN_EXE_kiln")]);
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--monitoring-listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--pool",
        "procs",
        "--isolation",
        "none,sandbox",
        "--run-as",
        "64000:64000",
    ]);
    let mut server = Process::spawn_command(command);
    let line = server.stdout_line_with("listening grpc://");
    let address = line["listening grpc://".len()..].trim().to_string();
    let pid = server.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("\nUid:\t64000\t64000\t64000\t64000\n"),
        "{status}"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&data_dir).unwrap().uid(), 64000);
    for isolation in ["none", "sandbox"] {
        let response = completed(
            execute_with(
                &address,
                common::who_runs_this(),
                &[("workload-isolation-type", isolation)],
            )
            .await,
        )
        .await;
        let result = response.result.expect("a result");
        assert_eq!(result.exit_code, 0, "{isolation}: {:?}", response.status);
        assert_eq!(
            result.stdout_digest,
            Some(digest(b"action-user\n")),
            "{isolation}"
        );
    }
    let launchers = launchers_counted(pid, 2);
    signal_all("-KILL", &launchers[..1]);
    wait_until("a launcher in place of the one killed", || {
        let now = launchers_of(pid);
        now.len() == 2 && !now.contains(&launchers[0])
    })
    .await;
    let response = completed(execute_with(&address, "true".into(), &[]).await).await;
    assert_eq!(
        response.result.map(|r| r.exit_code),
        Some(0),
        "{:?}",
        response.status
    );
    stops_once_every_launcher_is_gone(&mut server);
}

/// Stops every launcher of `process`, a `--run-as` server or executor,
/// then kills them (stopped first, so that none can start another before
/// it is killed too), and checks that it stops, saying why, and exits
/// with an error.
fn stops_once_every_launcher_is_gone(process: &mut Process) {
    let launchers = launchers_of(process.child.id());
    signal_all("-STOP", &launchers);
    signal_all("-KILL", &launchers);
    process.wait_for_log("every launcher has exited");
    let status = wait_bounded(&mut process.child);
    assert!(!status.success(), "{status}");
}

/// A bridged action's interface goes with its namespace once the action
/// ends; one whose namespace something else still holds (here, this
/// test) is deleted by a launcher after the bound, since the executor,
/// keeping no CAP_NET_ADMIN, cannot delete it.
#[tokio::test]
async fn an_interface_held_past_its_action_is_deleted_by_a_launcher() {
    if !common::root_available("the launchers of a root executor") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address, process) = serve_with_executor(scratch.path(), "held", "none,sandbox");
    let executor = process.child.id();
    let stream = execute_with(
        &address,
        "sleep 10".into(),
        &[
            ("workload-isolation-type", "sandbox"),
            ("dockerNetwork", "bridge"),
        ],
    )
    .await;
    // The action's namespace, opened through its first process (a child
    // of the executor in another network namespace).
    let executor_network = std::fs::read_link(format!("/proc/{executor}/ns/net")).unwrap();
    let mut held = None;
    for _ in 0..400 {
        held = children_of(executor).into_iter().find_map(|child| {
            let path = format!("/proc/{child}/ns/net");
            let network = std::fs::read_link(&path).ok()?;
            (network != executor_network)
                .then(|| std::fs::File::open(&path).ok())
                .flatten()
        });
        if held.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = held.expect("the running action's network namespace");
    let interfaces = kiln_sandbox::network::interfaces_owned_by(executor);
    assert_eq!(interfaces.len(), 1, "{interfaces:?}");

    let response = completed(stream).await;
    assert_eq!(response.result.expect("a result").exit_code, 0);
    process.wait_for_log("outlived its namespace");
    wait_until("the held interface to be deleted", || {
        kiln_sandbox::network::interfaces_owned_by(executor).is_empty()
    })
    .await;
    let failed: Vec<String> = process
        .stderr
        .try_iter()
        .filter(|line| line.contains("deleting an action's network interface"))
        .collect();
    assert_eq!(
        failed,
        Vec::<String>::new(),
        "the launcher's deletion failed"
    );
    drop(held);
}

/// The children of process `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    // Children are listed per thread: whichever thread started them.
    std::fs::read_dir(format!("/proc/{parent}/task"))
        .map(|tasks| tasks.filter_map(Result::ok).collect::<Vec<_>>())
        .unwrap_or_default()
        .iter()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[tokio::test]
async fn actions_start_through_launchers_that_hold_nothing_of_the_executor() {
    if !common::root_available("the launchers of a root executor") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (_server, address, process) =
        serve_with_executor(scratch.path(), "launched", "none,sandbox");
    let executor = process.child.id();
    let launchers = launchers_running(executor);

    // One thread each; stdio, the socket to the executor, the network
    // namespace it runs in (which a wiring returns to) and the work root
    // it holds open (every path it takes is opened beneath it), nothing
    // else of the executor's (no input being written, no client
    // connection); no environment.
    for launcher in &launchers {
        let status = std::fs::read_to_string(format!("/proc/{launcher}/status")).unwrap();
        assert!(
            status.lines().any(|line| line == "Threads:\t1"),
            "launcher {launcher} is not single-threaded:\n{status}"
        );
        let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{launcher}/fd"))
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let target = std::fs::read_link(entry.path()).unwrap();
                (
                    entry.file_name().to_str().unwrap().parse().unwrap(),
                    target.display().to_string(),
                )
            })
            .collect();
        fds.sort();
        assert_eq!(
            fds.iter().map(|(fd, _)| *fd).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5],
            "launcher {launcher}'s descriptors: {fds:?}"
        );
        assert!(fds[3].1.starts_with("socket:"), "{fds:?}");
        let own_network = std::fs::read_link(format!("/proc/{launcher}/ns/net")).unwrap();
        assert_eq!(fds[4].1, own_network.display().to_string(), "{fds:?}");
        let work_root = scratch.path().join("work/work");
        assert_eq!(fds[5].1, work_root.display().to_string(), "{fds:?}");
        assert_eq!(
            std::fs::read(format!("/proc/{launcher}/environ")).unwrap(),
            b""
        );
    }

    // Actions start through them: while they are stopped, an action
    // reaches EXECUTING and goes no further; continued, it finishes.
    let stream = execute_with_launchers_stopped(&address, &launchers, "echo started").await;
    signal_all("-CONT", &launchers);
    let response = completed(stream).await;
    assert_eq!(response.result.unwrap().exit_code, 0);

    // Killed while a start waits on them: that action is retried (the
    // executor gives it back) and runs; they are replaced as actions need
    // them, and the next actions run, under `sandbox`, `none` and
    // `dockerInit`.
    let stream = execute_with_launchers_stopped(&address, &launchers, "echo ran-after-all").await;
    signal_all("-KILL", &launchers);
    let response = completed(stream).await;
    assert_eq!(
        response.status.as_ref().map_or(0, |s| s.code),
        0,
        "{response:?}"
    );
    let result = response.result.expect("a result");
    assert_eq!(result.exit_code, 0);
    // Killed while starting it, or while wiring its network first.
    process.wait_for_log("the launcher exited while");
    for properties in [
        &[("workload-isolation-type", "sandbox")][..],
        &[("workload-isolation-type", "none")][..],
        &[
            ("workload-isolation-type", "sandbox"),
            ("dockerInit", "true"),
        ][..],
    ] {
        let response =
            completed(execute_with(&address, "echo again".into(), properties).await).await;
        assert_eq!(
            response.result.unwrap().exit_code,
            0,
            "an action with {properties:?} after the launchers were killed"
        );
    }
    let replacements = launchers_of(executor);
    assert!(!replacements.is_empty(), "no launcher was started again");
    assert!(
        replacements.iter().all(|pid| !launchers.contains(pid)),
        "a killed launcher is still listed: {replacements:?} (killed: {launchers:?})"
    );

    // Killed between starts: found dead at the next, reaped, replaced.
    signal_all("-KILL", &replacements);
    wait_until("the killed launchers to end", || {
        replacements.iter().all(|pid| ended(*pid))
    })
    .await;
    let response = completed(
        execute_with(
            &address,
            "echo once-more".into(),
            &[("workload-isolation-type", "none")],
        )
        .await,
    )
    .await;
    assert_eq!(response.result.unwrap().exit_code, 0);
    process.wait_for_log("the launcher had exited");
    let replacements = launchers_of(executor);
    assert!(!replacements.is_empty(), "no launcher was started again");

    // They end with the executor.
    drop(process);
    for _ in 0..600 {
        if replacements.iter().all(|pid| ended(*pid)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("launchers {replacements:?} outlived their executor");
}
