//! End-to-end tests of remote execution: a whole `kiln serve` in-process on
//! 127.0.0.1 (scheduler and embedded executor as `kiln::serve` composes
//! them), driven by real tonic clients, running real processes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kiln::config::{Backend, Config, Period, Size};
use kiln::serve::RunningServer;
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::{operation, CancelOperationRequest, GetOperationRequest, Operation};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    self, batch_update_blobs_request, execution_stage, Action, Command, Digest, Directory,
    ExecuteRequest, ExecuteResponse, FileNode,
};
use kiln_proto::status::PreconditionFailure;
use kiln_scheduler::ResourceAmount;
use kiln_worker::{CancellationToken, Isolations, NoIsolation, Worker, WorkerConfig};
use kiln_worker::{RemoteSession, SessionConfig};
use prost::Message;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

/// Upper bound for anything that could hang; never a pass/fail threshold.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn digest(data: &[u8]) -> Digest {
    kiln_cas::wire::digest_of(data)
}

struct Harness {
    server: Option<RunningServer>,
    channel: Channel,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::loopback(dir.path().join("server"));
        config.storage.backend = Backend::Memory;
        config.storage.max_size = Size::gib(1);
        config.execution.pool = "default".into();
        config.execution.concurrency = 4;
        // Executors in these tests register before their actions are sent;
        // an unmatched action need not wait long.
        config.execution.unmatched_grace = Period::millis(200);
        // Scheduling is under test here, not isolation: the embedded
        // executor offers `none` only (and skips probing the others).
        config.execution.isolation.offer = vec!["none".into()];
        config.shutdown_grace = Period::secs(30);
        adjust(&mut config);
        let server = kiln::serve::start(&config).await.expect("server starts");
        let channel = server.connect().await.unwrap();
        Harness {
            server: Some(server),
            channel,
            dir,
        }
    }

    async fn stop(mut self) {
        self.server.take().unwrap().stop().await.unwrap();
    }

    /// Starts an executor (the `kiln executor` protocol, in-process) in
    /// `pool`; returns once it is registered. Cancelling the token drops
    /// its session at once, as a killed process would.
    async fn start_executor(
        &self,
        name: &str,
        pool: &str,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        self.start_executor_with(name, pool, &[]).await
    }

    async fn start_executor_with(
        &self,
        name: &str,
        pool: &str,
        properties: &[(&str, &str)],
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let host = ResourceAmount::of_host(self.dir.path());
        self.start_executor_sized(name, pool, properties, host, 2)
            .await
    }

    /// An executor advertising `resources` and running up to `slots`
    /// actions at once.
    async fn start_executor_sized(
        &self,
        name: &str,
        pool: &str,
        properties: &[(&str, &str)],
        resources: ResourceAmount,
        slots: u32,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let root = self.dir.path().join(name);
        let mut runner_config = WorkerConfig::new(root.join("work"), root.join("cache"));
        runner_config.worker_name = name.to_string();
        runner_config.default_grace = Duration::from_secs(5);
        let runner = Worker::new(
            self.channel.clone(),
            runner_config,
            Isolations::new(Arc::new(NoIsolation)),
        )
        .await
        .unwrap();
        let worker = RemoteSession::connect(
            self.channel.clone(),
            SessionConfig {
                name: name.to_string(),
                pool: pool.to_string(),
                os_family: "linux".into(),
                arch: "amd64".into(),
                properties: properties
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                isolation_types: vec!["none".into()],
                capacity: slots,
                resources,
                heartbeat_interval: Duration::from_secs(1),
                credential: None,
            },
        )
        .await
        .expect("the executor registers");
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let _ = worker.run(Arc::new(runner), stop).await;
            }
        });
        (stop, task)
    }

    /// Paths for an action that holds its executor until released: FIFOs
    /// `started` (it writes there once running) and `gate` (it waits to
    /// read), and a plain file `order` that actions append their names to.
    fn gate_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let scratch = self.scratch();
        let (started, gate, order) = (
            scratch.join("started"),
            scratch.join("gate"),
            self.shared_file("order"),
        );
        mkfifo(&started);
        mkfifo(&gate);
        (started, gate, order)
    }

    /// An empty file in [`Harness::scratch`] that every action may append
    /// to: each runs as a uid of its own when the tests run as root.
    fn shared_file(&self, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.scratch().join(name);
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        path
    }

    /// A directory outside every workspace where actions leave marks for
    /// the test: writable by all, as the embedded executor runs actions as
    /// its action users when the tests run as root.
    fn scratch(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join("scratch");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        path
    }

    async fn upload(&self, blobs: &[Vec<u8>]) {
        let response = ContentAddressableStorageClient::new(self.channel.clone())
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                requests: blobs
                    .iter()
                    .map(|data| batch_update_blobs_request::Request {
                        digest: Some(digest(data)),
                        data: data.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for r in response.responses {
            assert_eq!(r.status.unwrap_or_default().code, 0);
        }
    }

    /// Uploads an action running `arguments` with `inputs` (name, content)
    /// at the root; returns its digest.
    async fn action(&self, spec: ActionSpec) -> Digest {
        let mut blobs = Vec::new();
        let mut files: Vec<FileNode> = spec
            .inputs
            .iter()
            .map(|(name, content)| FileNode {
                name: name.to_string(),
                digest: Some(digest(content)),
                is_executable: false,
                ..Default::default()
            })
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        for (_, content) in &spec.inputs {
            if !spec.withhold_inputs {
                blobs.push(content.clone());
            }
        }
        let root = Directory {
            files,
            ..Default::default()
        }
        .encode_to_vec();
        let command = Command {
            arguments: spec.arguments.iter().map(|a| a.to_string()).collect(),
            output_paths: spec.outputs.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
        .encode_to_vec();
        let action = Action {
            command_digest: Some(digest(&command)),
            input_root_digest: Some(digest(&root)),
            do_not_cache: spec.do_not_cache,
            platform: Some(reapi::Platform {
                properties: spec
                    .properties
                    .iter()
                    .map(|(name, value)| reapi::platform::Property {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let action_digest = digest(&action);
        blobs.extend([root, command, action]);
        self.upload(&blobs).await;
        action_digest
    }

    fn execution(&self) -> ExecutionClient<Channel> {
        ExecutionClient::new(self.channel.clone())
    }

    fn operations(&self) -> OperationsClient<Channel> {
        OperationsClient::new(self.channel.clone())
    }

    async fn start_execute(
        &self,
        action_digest: &Digest,
        skip_cache_lookup: bool,
        headers: &[(&'static str, &str)],
    ) -> Result<Streaming<Operation>, tonic::Status> {
        self.start_execute_as(action_digest, skip_cache_lookup, headers, "", 0)
            .await
    }

    /// Execute as invocation `invocation_id` (RequestMetadata header) with
    /// `execution_policy.priority`.
    async fn start_execute_as(
        &self,
        action_digest: &Digest,
        skip_cache_lookup: bool,
        headers: &[(&'static str, &str)],
        invocation_id: &str,
        priority: i32,
    ) -> Result<Streaming<Operation>, tonic::Status> {
        let mut request = tonic::Request::new(ExecuteRequest {
            action_digest: Some(action_digest.clone()),
            skip_cache_lookup,
            execution_policy: Some(reapi::ExecutionPolicy { priority }),
            ..Default::default()
        });
        if !invocation_id.is_empty() {
            let metadata = reapi::RequestMetadata {
                tool_invocation_id: invocation_id.to_string(),
                ..Default::default()
            };
            request.metadata_mut().insert_bin(
                "build.bazel.remote.execution.v2.requestmetadata-bin",
                tonic::metadata::MetadataValue::from_bytes(&metadata.encode_to_vec()),
            );
        }
        for (name, value) in headers {
            request.metadata_mut().insert(*name, value.parse().unwrap());
        }
        self.execution()
            .execute(request)
            .await
            .map(|r| r.into_inner())
    }

    async fn execute(&self, action_digest: &Digest, skip_cache_lookup: bool) -> ExecuteResponse {
        let stream = self
            .start_execute(action_digest, skip_cache_lookup, &[])
            .await
            .expect("Execute is accepted");
        finish(stream).await.1
    }

    async fn cached(&self, action_digest: &Digest) -> Result<reapi::ActionResult, tonic::Status> {
        ActionCacheClient::new(self.channel.clone())
            .get_action_result(reapi::GetActionResultRequest {
                action_digest: Some(action_digest.clone()),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }
}

#[derive(Default)]
struct ActionSpec {
    arguments: Vec<&'static str>,
    outputs: Vec<&'static str>,
    inputs: Vec<(&'static str, Vec<u8>)>,
    withhold_inputs: bool,
    do_not_cache: bool,
    properties: Vec<(&'static str, &'static str)>,
}

fn sh(script: &str) -> Vec<&'static str> {
    vec![
        "/bin/sh",
        "-c",
        Box::leak(script.to_string().into_boxed_str()),
    ]
}

fn stage(operation: &Operation) -> execution_stage::Value {
    let metadata = reapi::ExecuteOperationMetadata::decode(
        operation.metadata.as_ref().unwrap().value.as_slice(),
    )
    .unwrap();
    execution_stage::Value::try_from(metadata.stage).unwrap()
}

fn response(operation: &Operation) -> ExecuteResponse {
    match operation
        .result
        .as_ref()
        .expect("a done operation has a result")
    {
        operation::Result::Response(any) => ExecuteResponse::decode(any.value.as_slice()).unwrap(),
        operation::Result::Error(status) => panic!("operation error {status:?}"),
    }
}

/// Reads an operation stream to its end: every stage seen and the response.
/// Every operation it carries has the same name.
async fn finish(
    mut stream: Streaming<Operation>,
) -> (Vec<execution_stage::Value>, ExecuteResponse) {
    let mut stages = Vec::new();
    let mut last: Option<Operation> = None;
    while let Some(operation) = tokio::time::timeout(HANG_GUARD, stream.next())
        .await
        .expect("operation stream hangs")
    {
        let operation = operation.expect("stream item");
        if let Some(last) = &last {
            assert_eq!(operation.name, last.name, "one stream, one operation name");
        }
        stages.push(stage(&operation));
        last = Some(operation);
    }
    let last = last.expect("at least one operation");
    assert!(last.done, "the stream ends with the done operation");
    (stages, response(&last))
}

/// Reads the stream until the operation is EXECUTING; returns its name.
async fn until_executing(stream: &mut Streaming<Operation>) -> String {
    loop {
        let operation = tokio::time::timeout(HANG_GUARD, stream.next())
            .await
            .expect("operation stream hangs")
            .expect("stream ends before EXECUTING")
            .unwrap();
        assert!(!operation.done, "finished before it was seen running");
        if stage(&operation) == execution_stage::Value::Executing {
            return operation.name;
        }
    }
}

fn mkfifo(path: &Path) {
    // Read or written by actions running as the action user.
    let status = std::process::Command::new("mkfifo")
        .args(["-m", "0666"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Blocks (off the async threads) until the action opens the FIFO for
/// writing, then returns what it wrote.
async fn read_fifo(path: PathBuf) -> String {
    tokio::time::timeout(
        HANG_GUARD,
        tokio::task::spawn_blocking(move || std::fs::read_to_string(path).unwrap()),
    )
    .await
    .expect("the action never wrote the FIFO")
    .unwrap()
}

#[tokio::test]
async fn an_action_runs_and_its_result_lands_in_the_action_cache() {
    let harness = Harness::start().await;
    let action = harness
        .action(ActionSpec {
            arguments: sh("cat in.txt > out.txt; echo to-stdout"),
            inputs: vec![("in.txt", b"hello\n".to_vec())],
            outputs: vec!["out.txt"],
            ..Default::default()
        })
        .await;
    let stream = harness.start_execute(&action, false, &[]).await.unwrap();
    let (stages, response) = finish(stream).await;
    assert_eq!(stages.last(), Some(&execution_stage::Value::Completed));
    let mut sorted = stages.clone();
    sorted.sort();
    assert_eq!(stages, sorted, "stages only move forward: {stages:?}");
    assert_eq!(stages[0], execution_stage::Value::Queued);
    assert_eq!(response.status.unwrap_or_default().code, 0);
    assert!(!response.cached_result);
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "out.txt");
    assert_eq!(result.output_files[0].digest, Some(digest(b"hello\n")));
    assert_eq!(result.stdout_digest, Some(digest(b"to-stdout\n")));
    let metadata = result.execution_metadata.clone().unwrap();
    assert_eq!(metadata.worker, "kiln-embedded/default");
    let queued = metadata.queued_timestamp.expect("queued_timestamp is set");
    let started = metadata.worker_start_timestamp.unwrap();
    assert!((queued.seconds, queued.nanos) <= (started.seconds, started.nanos));

    let cached = harness.cached(&action).await.expect("the result is cached");
    assert_eq!(cached.output_files, result.output_files);
    assert_eq!(cached.execution_metadata, result.execution_metadata);

    let again = harness.execute(&action, false).await;
    assert!(again.cached_result, "a second Execute is a cache hit");
    assert_eq!(again.result.unwrap().output_files, result.output_files);

    let rerun = harness.execute(&action, true).await;
    assert!(!rerun.cached_result, "skip_cache_lookup runs it again");
    let rerun_metadata = rerun.result.unwrap().execution_metadata.unwrap();
    assert_ne!(
        rerun_metadata.worker_start_timestamp,
        metadata.worker_start_timestamp
    );
    harness.stop().await;
}

#[tokio::test]
async fn do_not_cache_and_failures_are_not_cached() {
    let harness = Harness::start().await;
    let uncached = harness
        .action(ActionSpec {
            arguments: vec!["/bin/echo", "uncached"],
            do_not_cache: true,
            ..Default::default()
        })
        .await;
    let first = harness.execute(&uncached, false).await;
    assert_eq!(first.result.unwrap().exit_code, 0);
    assert_eq!(
        harness.cached(&uncached).await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(!harness.execute(&uncached, false).await.cached_result);

    let failing = harness
        .action(ActionSpec {
            arguments: sh("exit 3"),
            ..Default::default()
        })
        .await;
    let failed = harness.execute(&failing, false).await;
    assert_eq!(failed.result.unwrap().exit_code, 3);
    assert_eq!(
        harness.cached(&failing).await.unwrap_err().code(),
        Code::NotFound
    );
    harness.stop().await;
}

#[tokio::test]
async fn missing_inputs_are_failed_precondition_naming_each_digest() {
    let harness = Harness::start().await;
    let first = b"never uploaded 1".to_vec();
    let second = b"never uploaded 2".to_vec();
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            inputs: vec![("a", first.clone()), ("b", second.clone())],
            withhold_inputs: true,
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, false).await;
    let status = response.status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    let mut subjects = Vec::new();
    for detail in &status.details {
        assert_eq!(
            detail.type_url,
            "type.googleapis.com/google.rpc.PreconditionFailure"
        );
        let failure = PreconditionFailure::decode(detail.value.as_slice()).unwrap();
        for violation in failure.violations {
            assert_eq!(violation.r#type, "MISSING");
            subjects.push(violation.subject);
        }
    }
    subjects.sort();
    let mut expected: Vec<String> = [digest(&first), digest(&second)]
        .iter()
        .map(|d| format!("blobs/{}/{}", d.hash, d.size_bytes))
        .collect();
    expected.sort();
    assert_eq!(subjects, expected);

    // An Action that is not in the CAS at all is named the same way.
    let absent = digest(b"no such action");
    let response = harness.execute(&absent, false).await;
    let status = response.status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    let failure = PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
    assert_eq!(
        failure.violations[0].subject,
        format!("blobs/{}/{}", absent.hash, absent.size_bytes)
    );
    harness.stop().await;
}

#[tokio::test]
async fn a_malformed_property_is_invalid_argument_naming_it() {
    let harness = Harness::start().await;
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("EstimatedMemory", "lots")],
            ..Default::default()
        })
        .await;
    let error = harness
        .start_execute(&action, false, &[])
        .await
        .expect_err("rejected before queueing");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("EstimatedMemory"), "{error}");
    assert!(error.message().contains("lots"), "{error}");

    // The same through a header.
    let plain = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            ..Default::default()
        })
        .await;
    let error = harness
        .start_execute(
            &plain,
            false,
            &[("x-buildbuddy-platform.osfamily", "plan9")],
        )
        .await
        .expect_err("rejected before queueing");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("OSFamily"), "{error}");
    assert!(error.message().contains("plan9"), "{error}");
    harness.stop().await;
}

#[tokio::test]
async fn a_pool_header_overrides_the_action_pool() {
    let harness = Harness::start().await;
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/echo", "pooled"],
            properties: vec![("Pool", "gpu")],
            ..Default::default()
        })
        .await;
    let error = harness
        .start_execute(&action, false, &[])
        .await
        .expect_err("no executor serves pool gpu");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(error.message().contains("gpu"), "{error}");

    for header in ["x-buildbuddy-platform.pool", "x-kiln-platform.pool"] {
        let stream = harness
            .start_execute(&action, true, &[(header, "default")])
            .await
            .expect("the header sends it to the default pool");
        let (_, response) = finish(stream).await;
        assert_eq!(response.status.unwrap_or_default().code, 0);
        assert_eq!(response.result.unwrap().exit_code, 0);
    }
    harness.stop().await;
}

#[tokio::test]
async fn wait_execution_follows_a_running_action_and_cancel_kills_it() {
    let harness = Harness::start().await;
    let fifo = harness.scratch().join("pid");
    mkfifo(&fifo);
    let action = harness
        .action(ActionSpec {
            arguments: sh(&format!("echo $$ > {}; exec sleep 600", fifo.display())),
            ..Default::default()
        })
        .await;
    let mut stream = harness.start_execute(&action, false, &[]).await.unwrap();
    let name = until_executing(&mut stream).await;
    let pid: u32 = read_fifo(fifo).await.trim().parse().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    let mut waiting = harness
        .execution()
        .wait_execution(reapi::WaitExecutionRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    let current = waiting.next().await.unwrap().unwrap();
    assert_eq!(current.name, name);
    assert_eq!(stage(&current), execution_stage::Value::Executing);
    let listed = harness
        .operations()
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!listed.done);

    harness
        .operations()
        .cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let (_, waited) = finish(waiting).await;
    assert_eq!(waited.status.unwrap().code, Code::Cancelled as i32);
    let (_, executed) = finish(stream).await;
    assert_eq!(executed.status.unwrap().code, Code::Cancelled as i32);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the cancelled process {pid} is gone"
    );
    assert_eq!(
        harness.cached(&action).await.unwrap_err().code(),
        Code::NotFound
    );
    harness.stop().await;
}

#[tokio::test]
async fn identical_concurrent_executes_run_once() {
    let harness = Harness::start().await;
    let scratch = harness.scratch();
    let gate = scratch.join("gate");
    mkfifo(&gate);
    let count = harness.shared_file("count");
    let action = harness
        .action(ActionSpec {
            arguments: sh(&format!(
                "echo run >> {}; cat {} > /dev/null",
                count.display(),
                gate.display()
            )),
            ..Default::default()
        })
        .await;
    let mut first = harness.start_execute(&action, false, &[]).await.unwrap();
    let first_name = until_executing(&mut first).await;
    let mut second = harness.start_execute(&action, false, &[]).await.unwrap();
    let joined = second.next().await.unwrap().unwrap();
    assert_eq!(
        stage(&joined),
        execution_stage::Value::Executing,
        "the second Execute joins the first's execution"
    );
    assert_ne!(
        joined.name, first_name,
        "each request has an operation of its own"
    );

    // Let the action finish: open the gate (blocks until the action reads).
    tokio::time::timeout(
        HANG_GUARD,
        tokio::task::spawn_blocking(move || std::fs::write(gate, b"go\n").unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let (_, a) = finish(first).await;
    let (_, b) = finish(second).await;
    assert_eq!(a, b);
    assert_eq!(a.result.unwrap().exit_code, 0);
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "run\n");
    harness.stop().await;
}

impl Harness {
    async fn get_operation(&self, name: &str) -> Operation {
        self.operations()
            .get_operation(GetOperationRequest {
                name: name.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn cancel_operation(&self, name: &str) {
        self.operations()
            .cancel_operation(CancelOperationRequest {
                name: name.to_string(),
            })
            .await
            .unwrap();
    }

    /// The web UI's page at `path`: its HTTP status and body.
    async fn ui_page(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.server.as_ref().unwrap().monitoring_addr.unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: ui\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(HANG_GUARD, stream.read_to_end(&mut response))
            .await
            .expect("the UI never answered")
            .unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, text)
    }
}

/// Whether process `pid` is still alive (and not a zombie).
fn alive(pid: u32) -> bool {
    kiln_worker::process::is_running(pid)
}

#[tokio::test]
async fn cancelling_one_of_two_merged_requests_detaches_only_that_client() {
    let harness = Harness::start().await;
    let (started, gate, _) = harness.gate_files();
    let action = harness
        .action(ActionSpec {
            arguments: sh(&format!(
                "echo up > {}; cat {} > /dev/null; echo finished",
                started.display(),
                gate.display()
            )),
            ..Default::default()
        })
        .await;
    let mut leaving = harness.start_execute(&action, false, &[]).await.unwrap();
    let leaving_name = until_executing(&mut leaving).await;
    read_fifo(started).await;
    let mut staying = harness.start_execute(&action, false, &[]).await.unwrap();
    let joined = staying.next().await.unwrap().unwrap();
    let staying_name = joined.name.clone();
    assert_ne!(staying_name, leaving_name);
    assert_eq!(stage(&joined), execution_stage::Value::Executing);

    harness.cancel_operation(&leaving_name).await;
    // The cancelling client's stream ends with its operation done, CANCELLED.
    let (_, cancelled) = finish(leaving).await;
    assert_eq!(cancelled.status.unwrap().code, Code::Cancelled as i32);
    // The operation is not deleted: asked for by name, it says the same.
    let asked = harness.get_operation(&leaving_name).await;
    assert_eq!(asked.name, leaving_name);
    assert!(asked.done);
    assert_eq!(
        response(&asked).status.unwrap().code,
        Code::Cancelled as i32
    );
    let waited = harness
        .execution()
        .wait_execution(reapi::WaitExecutionRequest {
            name: leaving_name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (_, waited) = finish(waited).await;
    assert_eq!(waited.status.unwrap().code, Code::Cancelled as i32);
    // The other client's operation still runs.
    let other = harness.get_operation(&staying_name).await;
    assert_eq!(other.name, staying_name);
    assert!(!other.done);
    assert_eq!(stage(&other), execution_stage::Value::Executing);

    // The process is still there: writing the gate blocks until it reads.
    tokio::time::timeout(
        HANG_GUARD,
        tokio::task::spawn_blocking(move || std::fs::write(gate, b"go\n").unwrap()),
    )
    .await
    .expect("the shared action no longer reads its gate")
    .unwrap();
    let (_, result) = finish(staying).await;
    assert_eq!(result.status.clone().unwrap_or_default().code, 0);
    let result = result.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        result.stdout_digest,
        Some(digest(b"finished\n")),
        "the action ran to its end"
    );
    assert_eq!(harness.cached(&action).await.unwrap(), result);

    // Each request has its page in the UI, by its own name.
    let id = |name: &str| name.trim_start_matches("operations/").to_string();
    let (status, page) = harness
        .ui_page(&format!("/operation/{}", id(&staying_name)))
        .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(&staying_name) && page.contains("merged into"));
    let (status, page) = harness
        .ui_page(&format!("/operation/{}", id(&leaving_name)))
        .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("goes on for them"), "{page}");
    harness.stop().await;
}

#[tokio::test]
async fn when_every_merged_request_is_cancelled_the_action_is_stopped() {
    let harness = Harness::start().await;
    let scratch = harness.scratch();
    let fifo = scratch.join("pid");
    mkfifo(&fifo);
    let end = scratch.join("reached-the-end");
    let action = harness
        .action(ActionSpec {
            arguments: sh(&format!(
                "echo $$ > {}; sleep 600; touch {}",
                fifo.display(),
                end.display()
            )),
            ..Default::default()
        })
        .await;
    let mut first = harness.start_execute(&action, false, &[]).await.unwrap();
    let first_name = until_executing(&mut first).await;
    let pid: u32 = read_fifo(fifo).await.trim().parse().unwrap();
    let mut second = harness.start_execute(&action, false, &[]).await.unwrap();
    let second_name = second.next().await.unwrap().unwrap().name;
    assert_ne!(first_name, second_name);

    harness.cancel_operation(&first_name).await;
    let (_, cancelled) = finish(first).await;
    assert_eq!(cancelled.status.unwrap().code, Code::Cancelled as i32);
    assert!(
        alive(pid),
        "one of two requests cancelled stopped the action"
    );
    assert!(!harness.get_operation(&second_name).await.done);

    harness.cancel_operation(&second_name).await;
    // The last request's operation completes once the process has stopped.
    let (_, cancelled) = finish(second).await;
    assert_eq!(cancelled.status.unwrap().code, Code::Cancelled as i32);
    assert!(
        !alive(pid),
        "the action {pid} of cancelled requests still runs"
    );
    assert!(!end.exists());
    assert_eq!(
        harness.cached(&action).await.unwrap_err().code(),
        Code::NotFound
    );
    harness.stop().await;
}

#[tokio::test]
async fn a_merged_request_cancelled_and_the_other_gone_stops_the_action() {
    let harness =
        Harness::start_with(|config| config.execution.orphan_grace = Period::millis(200)).await;
    let fifo = harness.scratch().join("pid");
    mkfifo(&fifo);
    let action = harness
        .action(ActionSpec {
            arguments: sh(&format!("echo $$ > {}; exec sleep 600", fifo.display())),
            ..Default::default()
        })
        .await;
    let mut cancelling = harness.start_execute(&action, false, &[]).await.unwrap();
    let cancelling_name = until_executing(&mut cancelling).await;
    let pid: u32 = read_fifo(fifo).await.trim().parse().unwrap();
    let mut leaving = harness.start_execute(&action, false, &[]).await.unwrap();
    leaving.next().await.unwrap().unwrap();

    harness.cancel_operation(&cancelling_name).await;
    let (_, cancelled) = finish(cancelling).await;
    assert_eq!(cancelled.status.unwrap().code, Code::Cancelled as i32);
    assert!(alive(pid), "the other request still follows the action");
    // The other client goes away: no one waits any more.
    drop(leaving);
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the action no client waits for (pid {pid}) still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    harness.stop().await;
}

#[tokio::test]
async fn executors_take_only_actions_of_their_pool() {
    let harness = Harness::start().await;
    let (stop_alpha, alpha) = harness.start_executor("exec-alpha", "alpha").await;
    let (stop_beta, beta) = harness.start_executor("exec-beta", "beta").await;
    for round in 0..3 {
        for (pool, worker) in [
            ("alpha", "exec-alpha"),
            ("beta", "exec-beta"),
            ("default", "kiln-embedded/default"),
        ] {
            let pool_property: &'static str = Box::leak(pool.to_string().into_boxed_str());
            let action = harness
                .action(ActionSpec {
                    arguments: sh(&format!("echo {pool} {round}")),
                    properties: vec![("Pool", pool_property)],
                    ..Default::default()
                })
                .await;
            let response = harness.execute(&action, false).await;
            assert_eq!(response.status.unwrap_or_default().code, 0);
            let result = response.result.unwrap();
            assert_eq!(
                result.stdout_digest,
                Some(digest(format!("{pool} {round}\n").as_bytes()))
            );
            assert_eq!(
                result.execution_metadata.unwrap().worker,
                worker,
                "pool {pool}"
            );
        }
    }

    // Nothing offers this pool, or this OS: fail fast, naming it.
    for (key, value) in [("Pool", "nowhere"), ("OSFamily", "darwin")] {
        let action = harness
            .action(ActionSpec {
                arguments: vec!["/bin/true"],
                properties: vec![(key, value)],
                ..Default::default()
            })
            .await;
        let error = harness
            .start_execute(&action, false, &[])
            .await
            .expect_err("no executor matches");
        assert_eq!(error.code(), Code::FailedPrecondition);
        assert!(
            error.message().contains(&format!("{key}={value}")),
            "{error}"
        );
    }
    stop_alpha.cancel();
    stop_beta.cancel();
    alpha.await.unwrap();
    beta.await.unwrap();
    harness.stop().await;
}

#[tokio::test]
async fn an_action_whose_executor_dies_completes_on_another() {
    let harness = Harness::start().await;
    let scratch = harness.scratch();
    let fifo = scratch.join("started");
    mkfifo(&fifo);
    let marker = scratch.join("marker");
    let action = harness
        .action(ActionSpec {
            arguments: sh(&format!(
                "if [ -e {marker} ]; then echo second run; else touch {marker}; echo $$ > {fifo}; exec sleep 600; fi",
                marker = marker.display(),
                fifo = fifo.display()
            )),
            properties: vec![("Pool", "gamma")],
            ..Default::default()
        })
        .await;
    let (stop_first, first) = harness.start_executor("exec-first", "gamma").await;
    let mut stream = harness.start_execute(&action, false, &[]).await.unwrap();
    until_executing(&mut stream).await;
    // The first executor has started it.
    let first_pid: u32 = read_fifo(fifo).await.trim().parse().unwrap();

    let (stop_second, second) = harness.start_executor("exec-second", "gamma").await;
    // "Kill" the first executor: its session drops mid-action.
    stop_first.cancel();
    first.await.unwrap();

    let (_, response) = finish(stream).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.stdout_digest, Some(digest(b"second run\n")));
    assert_eq!(result.execution_metadata.unwrap().worker, "exec-second");
    assert!(
        harness.cached(&action).await.is_ok(),
        "the result is cached"
    );
    assert!(first_pid > 0);
    stop_second.cancel();
    second.await.unwrap();
    harness.stop().await;
}

#[tokio::test]
async fn priority_first_then_invocations_take_turns() {
    // One slot, so the queue's order is the execution order.
    let harness = Harness::start_with(|config| config.execution.concurrency = 1).await;
    let scratch = harness.scratch();
    let gate = scratch.join("gate");
    mkfifo(&gate);
    let order = harness.shared_file("order");
    let blocker = harness
        .action(ActionSpec {
            arguments: sh(&format!("cat {} > /dev/null", gate.display())),
            ..Default::default()
        })
        .await;
    let mut blocked = harness.start_execute(&blocker, false, &[]).await.unwrap();
    until_executing(&mut blocked).await;

    // Queued behind the blocker: a big build (3 actions), a small one (1),
    // and one urgent action.
    let mut streams = Vec::new();
    for (label, invocation, priority) in [
        ("big-1", "big-build", 0),
        ("big-2", "big-build", 0),
        ("big-3", "big-build", 0),
        ("small-1", "small-build", 0),
        ("urgent", "other-build", -5),
    ] {
        let action = harness
            .action(ActionSpec {
                arguments: sh(&format!("echo {label} >> {}", order.display())),
                ..Default::default()
            })
            .await;
        let mut stream = harness
            .start_execute_as(&action, false, &[], invocation, priority)
            .await
            .unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(stage(&first), execution_stage::Value::Queued, "{label}");
        streams.push(stream);
    }
    tokio::time::timeout(
        HANG_GUARD,
        tokio::task::spawn_blocking(move || std::fs::write(gate, b"go\n").unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    finish(blocked).await;
    for stream in streams {
        let (_, response) = finish(stream).await;
        assert_eq!(response.result.unwrap().exit_code, 0);
    }
    assert_eq!(
        std::fs::read_to_string(&order).unwrap(),
        "urgent\nbig-1\nsmall-1\nbig-2\nbig-3\n",
        "lower priority value first; then the two builds alternate"
    );
    harness.stop().await;
}

#[tokio::test]
async fn declared_properties_restrict_only_actions_that_carry_them() {
    let harness = Harness::start().await;
    let (stop_gpu, gpu) = harness
        .start_executor_with("exec-gpu", "accel", &[("gpu", "a100")])
        .await;
    let (stop_plain, plain) = harness.start_executor("exec-plain", "accel").await;
    for round in 0..6 {
        let wants_gpu: &'static str = Box::leak(format!("echo gpu {round}").into_boxed_str());
        let action = harness
            .action(ActionSpec {
                arguments: vec!["/bin/sh", "-c", wants_gpu],
                properties: vec![("Pool", "accel"), ("gpu", "a100"), ("ISA", "x86-64-v3")],
                ..Default::default()
            })
            .await;
        let response = harness.execute(&action, false).await;
        let worker = response.result.unwrap().execution_metadata.unwrap().worker;
        assert_eq!(worker, "exec-gpu", "gpu=a100 is declared only by exec-gpu");

        // Without the declared key, the action is not restricted: it runs
        // (an undeclared key such as ISA never restricts).
        let anywhere: &'static str = Box::leak(format!("echo anywhere {round}").into_boxed_str());
        let action = harness
            .action(ActionSpec {
                arguments: vec!["/bin/sh", "-c", anywhere],
                properties: vec![("Pool", "accel"), ("ISA", "x86-64-v3")],
                ..Default::default()
            })
            .await;
        let response = harness.execute(&action, false).await;
        assert_eq!(response.result.unwrap().exit_code, 0);
    }

    // A value no executor declares fails fast, naming it.
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("Pool", "accel"), ("gpu", "h100")],
            ..Default::default()
        })
        .await;
    let error = harness
        .start_execute(&action, false, &[])
        .await
        .expect_err("no executor declares gpu=h100");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(error.message().contains("gpu=h100"), "{error}");
    stop_gpu.cancel();
    stop_plain.cancel();
    gpu.await.unwrap();
    plain.await.unwrap();
    harness.stop().await;
}

#[tokio::test]
async fn a_registry_password_header_is_never_echoed_or_stored() {
    let harness = Harness::start().await;
    let secret = "hunter2-do-not-leak";
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/echo", "ok"],
            ..Default::default()
        })
        .await;
    let headers = [
        ("x-buildbuddy-platform.container-registry-username", "me"),
        ("x-buildbuddy-platform.container-registry-password", secret),
    ];
    let stream = harness
        .start_execute(&action, false, &headers)
        .await
        .unwrap();
    let (_, response) = finish(stream).await;
    assert_eq!(response.status.clone().unwrap_or_default().code, 0);
    let leaked = |bytes: &[u8]| bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
    assert!(!leaked(&response.encode_to_vec()), "in the ExecuteResponse");
    let cached = harness.cached(&action).await.unwrap();
    assert!(!leaked(&cached.encode_to_vec()), "in the Action Cache");
    let listed = harness
        .operations()
        .list_operations(kiln_proto::longrunning::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!leaked(&listed.encode_to_vec()), "in ListOperations");

    // Next to a malformed property, the error names that one, not the secret.
    let headers = [
        ("x-buildbuddy-platform.container-registry-password", secret),
        ("x-buildbuddy-platform.estimatedcpu", "many"),
    ];
    let error = harness
        .start_execute(&action, true, &headers)
        .await
        .expect_err("EstimatedCPU=many is malformed");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("EstimatedCPU"), "{error}");
    assert!(!error.message().contains(secret), "{error}");
    harness.stop().await;
}

#[tokio::test]
async fn actions_left_without_any_executor_fail_instead_of_waiting_forever() {
    let harness = Harness::start().await;
    let (stop, executor) = harness.start_executor("exec-lonely", "lonely").await;
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/sleep", "600"],
            properties: vec![("Pool", "lonely")],
            ..Default::default()
        })
        .await;
    let mut stream = harness.start_execute(&action, false, &[]).await.unwrap();
    until_executing(&mut stream).await;
    // The pool's only executor goes away: its action is requeued, then,
    // with nobody left to run it, fails naming the pool.
    stop.cancel();
    executor.await.unwrap();
    let (stages, response) = finish(stream).await;
    assert!(
        stages.contains(&execution_stage::Value::Queued),
        "{stages:?}"
    );
    let status = response.status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    assert!(status.message.contains("Pool=lonely"), "{}", status.message);
    harness.stop().await;
}

#[tokio::test]
async fn an_isolation_type_no_executor_offers_fails_fast_naming_it() {
    let harness = Harness::start().await;
    // Both the embedded executor and a remote one run only `none`.
    let (stop, executor) = harness.start_executor("exec-none", "default").await;
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("workload-isolation-type", "docker")],
            ..Default::default()
        })
        .await;
    let error = harness
        .start_execute(&action, false, &[])
        .await
        .expect_err("no executor runs docker");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains("workload-isolation-type=docker"),
        "{error}"
    );
    // An isolation type the executors do offer runs.
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("workload-isolation-type", "none")],
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, false).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    assert_eq!(response.result.unwrap().exit_code, 0);
    stop.cancel();
    executor.await.unwrap();
    harness.stop().await;
}

const ONE_CPU: ResourceAmount = ResourceAmount {
    cpu_millis: 1000,
    memory_bytes: 4 << 30,
    disk_bytes: 1 << 30,
};

#[tokio::test]
async fn two_one_cpu_actions_on_a_one_cpu_executor_run_one_after_the_other() {
    two_actions_too_large_together_run_one_after_the_other("EstimatedCPU", ["1", "1000m", "0"])
        .await;
}

#[tokio::test]
async fn two_actions_needing_most_of_the_disk_run_one_after_the_other() {
    two_actions_too_large_together_run_one_after_the_other(
        "EstimatedFreeDiskBytes",
        ["600MB", "600000000", "0"],
    )
    .await;
}

/// Two actions each reserving more than half of one executor's `property`
/// (`values`: first, second, and a third action reserving nothing).
async fn two_actions_too_large_together_run_one_after_the_other(
    property: &'static str,
    values: [&'static str; 3],
) {
    let harness = Harness::start().await;
    // Three slots, one CPU and 1 GiB of disk: only the reservation can keep
    // the second action waiting. It also declares lane=side, so an action
    // reserving nothing can be queued in a group of its own.
    let (stop, executor) = harness
        .start_executor_sized("exec-1cpu", "one-cpu", &[("lane", "side")], ONE_CPU, 3)
        .await;
    let (started, gate, order) = harness.gate_files();
    let first = harness
        .action(ActionSpec {
            arguments: sh(&format!(
                "echo first-start >> {order}; echo up > {started}; cat {gate} > /dev/null; echo first-end >> {order}",
                order = order.display(),
                started = started.display(),
                gate = gate.display()
            )),
            properties: vec![("Pool", "one-cpu"), (property, values[0])],
            ..Default::default()
        })
        .await;
    let second = harness
        .action(ActionSpec {
            arguments: sh(&format!("echo second >> {}", order.display())),
            properties: vec![("Pool", "one-cpu"), (property, values[1])],
            ..Default::default()
        })
        .await;
    let side = harness
        .action(ActionSpec {
            arguments: sh(&format!("echo side >> {}", order.display())),
            properties: vec![("Pool", "one-cpu"), ("lane", "side"), (property, values[2])],
            ..Default::default()
        })
        .await;

    let first_stream = harness.start_execute(&first, false, &[]).await.unwrap();
    assert_eq!(read_fifo(started.clone()).await, "up\n");
    // The first action holds more than half of the resource.
    let mut second_stream = harness.start_execute(&second, false, &[]).await.unwrap();
    let queued = second_stream.next().await.unwrap().unwrap();
    assert_eq!(stage(&queued), execution_stage::Value::Queued);
    // An action reserving nothing, queued after the second one, fits and runs
    // to completion while the second waits: the executor had a free slot
    // and looked at the queue, yet did not start the second.
    let (_, side_response) = finish(harness.start_execute(&side, false, &[]).await.unwrap()).await;
    assert_eq!(side_response.result.unwrap().exit_code, 0);
    let second_state = harness
        .operations()
        .get_operation(GetOperationRequest {
            name: queued.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stage(&second_state), execution_stage::Value::Queued);

    tokio::task::spawn_blocking(move || std::fs::write(gate, b"go\n").unwrap())
        .await
        .unwrap();
    let (_, first_response) = finish(first_stream).await;
    assert_eq!(first_response.result.unwrap().exit_code, 0);
    let (_, second_response) = finish(second_stream).await;
    assert_eq!(second_response.result.unwrap().exit_code, 0);
    assert_eq!(
        std::fs::read_to_string(&order).unwrap(),
        "first-start\nside\nfirst-end\nsecond\n",
        "the second {property}={} action started only after the first ended",
        values[1]
    );
    stop.cancel();
    executor.await.unwrap();
    harness.stop().await;
}

#[tokio::test]
async fn an_action_larger_than_every_executor_fails_fast_naming_its_estimate() {
    let harness = Harness::start().await;
    let (stop, executor) = harness
        .start_executor_sized("exec-small", "small", &[], ONE_CPU, 2)
        .await;
    for (property, value, named) in [
        ("EstimatedCPU", "2", "EstimatedCPU=2000m"),
        ("EstimatedMemory", "1TB", "EstimatedMemory=1000000000000B"),
        (
            "EstimatedFreeDiskBytes",
            "2GiB",
            "EstimatedFreeDiskBytes=2147483648B",
        ),
    ] {
        let action = harness
            .action(ActionSpec {
                arguments: vec!["/bin/true"],
                properties: vec![("Pool", "small"), (property, value)],
                ..Default::default()
            })
            .await;
        let error = harness
            .start_execute(&action, false, &[])
            .await
            .expect_err("no executor is that large");
        assert_eq!(error.code(), Code::FailedPrecondition);
        assert!(error.message().contains(named), "{error}");
        let largest = format!(
            "the largest offers EstimatedCPU=1000m EstimatedMemory={}B EstimatedFreeDiskBytes={}B",
            4u64 << 30,
            1u64 << 30
        );
        assert!(error.message().contains(&largest), "{error}");
    }
    // One that fits runs.
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![
                ("Pool", "small"),
                ("EstimatedCPU", "1"),
                ("EstimatedMemory", "1GB"),
                ("EstimatedFreeDiskBytes", "1GB"),
            ],
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, false).await;
    assert_eq!(response.result.unwrap().exit_code, 0);
    stop.cancel();
    executor.await.unwrap();
    harness.stop().await;
}

/// Unmounts a tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn an_executor_out_of_disk_sends_the_action_elsewhere() {
    let harness = Harness::start().await;
    // exec-full works on a 256 KiB tmpfs; the action's input is 1 MB.
    let full_root = harness.dir.path().join("exec-full");
    std::fs::create_dir_all(&full_root).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&full_root)
        .status();
    if !matches!(mounted, Ok(status) if status.success()) {
        eprintln!(
            "SKIPPED an_executor_out_of_disk_sends_the_action_elsewhere: cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)"
        );
        harness.stop().await;
        return;
    }
    let _mount = Mount(full_root);
    // exec-good has one slot, kept busy by a blocker only it may run
    // (lane=good), so the first executor free for the action is exec-full.
    let (stop_good, good) = harness
        .start_executor_sized(
            "exec-good",
            "disk",
            &[("lane", "good")],
            ResourceAmount::of_host(harness.dir.path()),
            1,
        )
        .await;
    let gate = harness.scratch().join("gate");
    mkfifo(&gate);
    let blocker = harness
        .action(ActionSpec {
            arguments: sh(&format!("cat {} > /dev/null", gate.display())),
            properties: vec![("Pool", "disk"), ("lane", "good")],
            ..Default::default()
        })
        .await;
    let mut blocked = harness.start_execute(&blocker, false, &[]).await.unwrap();
    until_executing(&mut blocked).await;
    let (stop_full, full) = harness.start_executor("exec-full", "disk").await;

    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/sh", "-c", "wc -c < big"],
            inputs: vec![("big", big)],
            properties: vec![("Pool", "disk")],
            ..Default::default()
        })
        .await;
    let mut stream = harness.start_execute(&action, false, &[]).await.unwrap();
    // Any change after the first state, or EXECUTING, means an executor
    // took it: only exec-full has a free slot.
    let mut seen = 0;
    loop {
        let operation = tokio::time::timeout(HANG_GUARD, stream.next())
            .await
            .expect("operation stream hangs")
            .expect("stream ends early")
            .unwrap();
        seen += 1;
        if stage(&operation) == execution_stage::Value::Executing || seen >= 2 {
            break;
        }
    }
    tokio::task::spawn_blocking(move || std::fs::write(gate, b"go\n").unwrap())
        .await
        .unwrap();
    finish(blocked).await;
    let (_, response) = finish(stream).await;
    assert_eq!(
        response.status.clone().unwrap_or_default().code,
        0,
        "{:?}",
        response.status
    );
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        result.execution_metadata.unwrap().worker,
        "exec-good",
        "the action left the executor whose disk is full"
    );
    stop_good.cancel();
    stop_full.cancel();
    good.await.unwrap();
    full.await.unwrap();
    harness.stop().await;
}

/// The embedded executor reaches the server's CAS in-process (no loopback
/// connection). With a batch limit of 256 KiB, its 3 MiB input is read
/// and its 6 MiB output written through ByteStream on that in-process
/// path: both must stream through the same services a client talks to.
#[tokio::test]
async fn the_embedded_executor_streams_large_inputs_and_outputs_in_process() {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    use kiln_proto::bytestream::{ReadRequest, WriteRequest};

    let harness = Harness::start_with(|config| {
        config.storage.max_batch_total_size = Size::kib(256);
    })
    .await;
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let big_digest = digest(&big);
    let mut bytestream = ByteStreamClient::new(harness.channel.clone());
    let resource_name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid_like(),
        big_digest.hash,
        big_digest.size_bytes
    );
    let requests: Vec<WriteRequest> = big
        .chunks(512 * 1024)
        .enumerate()
        .map(|(i, chunk)| WriteRequest {
            resource_name: if i == 0 {
                resource_name.clone()
            } else {
                String::new()
            },
            write_offset: (i * 512 * 1024) as i64,
            finish_write: (i + 1) * 512 * 1024 >= big.len(),
            data: chunk.to_vec().into(),
        })
        .collect();
    let committed = bytestream
        .write(futures::stream::iter(requests))
        .await
        .expect("the large input uploads")
        .into_inner()
        .committed_size;
    assert_eq!(committed, big.len() as i64);

    let action = harness
        .action(ActionSpec {
            arguments: sh("cat in.bin in.bin > out.bin"),
            inputs: vec![("in.bin", big.clone())],
            withhold_inputs: true,
            outputs: vec!["out.bin"],
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, true).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        result.execution_metadata.unwrap().worker,
        "kiln-embedded/default"
    );
    let doubled = [big.as_slice(), big.as_slice()].concat();
    let out_digest = digest(&doubled);
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].digest, Some(out_digest.clone()));

    let mut read = bytestream
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", out_digest.hash, out_digest.size_bytes),
            ..Default::default()
        })
        .await
        .expect("the output was stored")
        .into_inner();
    let mut stored = Vec::new();
    while let Some(chunk) = read.next().await {
        stored.extend_from_slice(&chunk.unwrap().data);
    }
    assert!(
        stored == doubled,
        "the stored output is the action's output"
    );
    harness.stop().await;
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        nanos as u32,
        nanos & 0xffff_ffff_ffff
    )
}

#[tokio::test]
async fn results_cache_policy_keeps_a_result_through_eviction() {
    let budget: u64 = 16 << 20;
    let harness = Harness::start_with(|config| {
        config.storage.backend = Backend::Disk;
        config.storage.max_size = Size(budget);
    })
    .await;
    // Two actions with distinct 512 KiB outputs; one asks that its result
    // be kept longer (REAPI: a lower priority value).
    let output_len = 512 << 10;
    let mut actions = Vec::new();
    for (script, priority) in [
        ("yes kept | head -c 524288 > out", -64),
        ("yes plain | head -c 524288 > out", 0),
    ] {
        let action = harness
            .action(ActionSpec {
                arguments: sh(script),
                outputs: vec!["out"],
                ..Default::default()
            })
            .await;
        let stream = harness
            .execution()
            .execute(ExecuteRequest {
                action_digest: Some(action.clone()),
                results_cache_policy: Some(reapi::ResultsCachePolicy { priority }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let result = finish(stream).await.1.result.unwrap();
        assert_eq!(
            result.output_files[0].digest.as_ref().unwrap().size_bytes,
            output_len
        );
        actions.push(action);
    }
    // A third asks for it only in a request merged into an execution that
    // is already running with the default priority.
    let (started, gate, _) = harness.gate_files();
    let merged = harness
        .action(ActionSpec {
            arguments: sh(&format!(
                "echo up > {}; cat {} > /dev/null; yes merged | head -c 524288 > out",
                started.display(),
                gate.display()
            )),
            outputs: vec!["out"],
            ..Default::default()
        })
        .await;
    let execute = |priority: i32| {
        let mut client = harness.execution();
        let request = ExecuteRequest {
            action_digest: Some(merged.clone()),
            results_cache_policy: Some(reapi::ResultsCachePolicy { priority }),
            ..Default::default()
        };
        async move { client.execute(request).await.unwrap().into_inner() }
    };
    let first = execute(0).await;
    assert_eq!(read_fifo(started).await, "up\n");
    let second = execute(-64).await;
    tokio::task::spawn_blocking(move || std::fs::write(gate, b"go\n").unwrap())
        .await
        .unwrap();
    let (first, second) = (finish(first).await.1, finish(second).await.1);
    assert_eq!(first.result, second.result, "one execution for both");
    actions.push(merged);

    // One and a half store sizes of other blobs push them all out, unless
    // the retention holds.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..(3 * budget / 2 / output_len as u64) {
        let blob: Vec<u8> = (0..output_len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        harness.upload(&[blob]).await;
    }
    let kept = harness.execute(&actions[0], false).await;
    assert!(
        kept.cached_result,
        "the retained result is still a cache hit"
    );
    let plain = harness.execute(&actions[1], false).await;
    assert!(
        !plain.cached_result,
        "the default result was evicted and runs again"
    );
    // (Looked up, not executed: run again, it would wait on its gate.)
    let merged = harness.cached(&actions[2]).await;
    assert!(
        merged.is_ok(),
        "the merged request's retention applies to the shared result: {merged:?}"
    );
    harness.stop().await;
}

#[tokio::test]
async fn a_large_action_is_not_starved_by_a_stream_of_small_ones() {
    let harness = Harness::start().await;
    let (stop, executor) = harness
        .start_executor_sized("exec-1cpu", "one-cpu", &[("lane", "side")], ONE_CPU, 3)
        .await;
    let (started, gate, order) = harness.gate_files();
    let action = async |script: String, lane: bool, cpu: &'static str| {
        let mut properties = vec![("Pool", "one-cpu"), ("EstimatedCPU", cpu)];
        if lane {
            properties.push(("lane", "side"));
        }
        harness
            .action(ActionSpec {
                arguments: sh(&script),
                properties,
                ..Default::default()
            })
            .await
    };
    let order_path = order.display().to_string();
    // A holds 600m until the gate opens; B needs the whole CPU.
    let a = action(
        format!(
            "echo a-start >> {order_path}; echo up > {}; cat {} > /dev/null; echo a-end >> {order_path}",
            started.display(),
            gate.display()
        ),
        false,
        "600m",
    )
    .await;
    let b = action(format!("echo b >> {order_path}"), false, "1").await;
    let a_stream = harness.start_execute(&a, false, &[]).await.unwrap();
    assert_eq!(read_fifo(started.clone()).await, "up\n");
    let mut b_stream = harness.start_execute(&b, false, &[]).await.unwrap();
    let queued = b_stream.next().await.unwrap().unwrap();
    assert_eq!(stage(&queued), execution_stage::Value::Queued);

    // Small actions fit next to A and pass B, each one to completion, as
    // many times as the scheduler allows.
    for i in 0..kiln_scheduler::MAX_BYPASSES {
        let small = action(format!("echo small-{i} >> {order_path}"), true, "400m").await;
        let (_, response) = finish(harness.start_execute(&small, false, &[]).await.unwrap()).await;
        assert_eq!(response.result.unwrap().exit_code, 0);
    }
    // The next one would fit too, but now the executor holds its CPU for B.
    let last = action(format!("echo small-last >> {order_path}"), true, "400m").await;
    let last_stream = harness.start_execute(&last, false, &[]).await.unwrap();
    tokio::task::spawn_blocking(move || std::fs::write(gate, b"go\n").unwrap())
        .await
        .unwrap();
    for stream in [a_stream, b_stream, last_stream] {
        assert_eq!(finish(stream).await.1.result.unwrap().exit_code, 0);
    }
    let lines: Vec<String> = std::fs::read_to_string(&order)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let at = |line: &str| lines.iter().position(|l| l == line).unwrap();
    assert_eq!(
        at("small-0"),
        1,
        "small actions passed B at first: {lines:?}"
    );
    assert!(
        at("a-end") < at("b") && at("b") < at("small-last"),
        "B ran as soon as A freed the CPU, before the next small action: {lines:?}"
    );
    stop.cancel();
    executor.await.unwrap();
    harness.stop().await;
}

/// Executes `action` (a cache miss), expecting the call itself to fail.
async fn refused(
    harness: &Harness,
    action: &Digest,
    headers: &[(&'static str, &str)],
) -> tonic::Status {
    harness
        .start_execute(action, true, headers)
        .await
        .expect_err("refused before queueing")
}

#[tokio::test]
async fn features_kiln_does_not_have_are_refused_before_queueing() {
    let harness = Harness::start().await;
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("use-self-hosted-executors", "true")],
            ..Default::default()
        })
        .await;
    let error = refused(&harness, &action, &[]).await;
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(
        error
            .message()
            .contains("use-self-hosted-executors=\"true\""),
        "{error}"
    );
    assert!(error.message().contains("no organisation"), "{error}");
    // Values that ask for nothing run.
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![
                ("use-self-hosted-executors", "false"),
                ("init-dockerd", "false"),
                ("enable-dockerd-tcp", "false"),
            ],
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, true).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    harness.stop().await;
}

#[tokio::test]
async fn dockerd_outside_a_microvm_is_refused_before_queueing() {
    let harness = Harness::start().await;
    for key in ["init-dockerd", "enable-dockerd-tcp"] {
        let action = harness
            .action(ActionSpec {
                arguments: vec!["/bin/true"],
                properties: vec![("workload-isolation-type", "sandbox"), (key, "true")],
                ..Default::default()
            })
            .await;
        let error = refused(&harness, &action, &[]).await;
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(
            error.message().contains(&format!("{key}=\"true\"")),
            "{error}"
        );
        assert!(
            error.message().contains("workload-isolation-type=sandbox"),
            "{error}"
        );
    }
    // Through a header too (as Bazel's --remote_exec_header sends it).
    let in_docker = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("workload-isolation-type", "docker")],
            ..Default::default()
        })
        .await;
    let error = refused(
        &harness,
        &in_docker,
        &[("x-buildbuddy-platform.init-dockerd", "true")],
    )
    .await;
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("init-dockerd"), "{error}");
    assert!(
        error.message().contains("workload-isolation-type=docker"),
        "{error}"
    );
    harness.stop().await;
}

#[tokio::test]
async fn an_image_is_refused_where_the_action_would_run_on_the_host() {
    let harness = Harness::start().await;
    let image = "docker://127.0.0.1:5000/kiln-test/base:latest";
    // Named together with a type that runs on the host: refused on the call.
    for isolation in ["none", "sandbox"] {
        let action = harness
            .action(ActionSpec {
                arguments: vec!["/bin/true"],
                properties: vec![
                    ("workload-isolation-type", isolation),
                    ("container-image", image),
                ],
                ..Default::default()
            })
            .await;
        let error = refused(&harness, &action, &[]).await;
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(error.message().contains("container-image="), "{error}");
        assert!(
            error.message().contains(&format!(
                "workload-isolation-type={isolation} runs the action on the host"
            )),
            "{error}"
        );
    }
    // Without a type, the executor's default decides: here `none`, which
    // says so in the response instead of running on the host.
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("container-image", image)],
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, false).await;
    let status = response.status.unwrap_or_default();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(
        status
            .message
            .contains("container-image=127.0.0.1:5000/kiln-test/base:latest"),
        "{}",
        status.message
    );
    assert!(
        status
            .message
            .contains("this executor's default isolation type, none,"),
        "{}",
        status.message
    );
    assert_eq!(
        harness.cached(&action).await.unwrap_err().code(),
        Code::NotFound
    );
    // `none` as the image means no image.
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("container-image", "none")],
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, false).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    harness.stop().await;
}

#[tokio::test]
async fn a_preserved_workspace_is_refused_where_no_runner_is_kept() {
    let harness = Harness::start().await;
    // A type that never keeps runners: refused on the call.
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![
                ("workload-isolation-type", "firecracker"),
                ("recycle-runner", "true"),
                ("preserve-workspace", "true"),
            ],
            ..Default::default()
        })
        .await;
    let error = refused(&harness, &action, &[]).await;
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(
        error.message().contains("preserve-workspace=\"true\""),
        "{error}"
    );
    assert!(
        error
            .message()
            .contains("workload-isolation-type=firecracker"),
        "{error}"
    );

    // `none` keeps runners only where the executor can stop every process
    // of an action; this executor's plain `none` cannot.
    let (stop, executor) = harness.start_executor("exec-cold", "cold").await;
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![
                ("Pool", "cold"),
                ("recycle-runner", "true"),
                ("preserve-workspace", "true"),
            ],
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, false).await;
    let status = response.status.unwrap_or_default();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(
        status.message.starts_with("preserve-workspace=true:"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("none, keeps no warm runners"),
        "{}",
        status.message
    );
    // recycle-runner alone is a hint: the action runs in a fresh runner.
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("Pool", "cold"), ("recycle-runner", "true")],
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, false).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    stop.cancel();
    executor.await.unwrap();
    harness.stop().await;
}

#[tokio::test]
async fn a_header_overrides_an_unknown_key_whatever_its_case() {
    let harness = Harness::start().await;
    let (stop, executor) = harness
        .start_executor_with("exec-avx2", "isa", &[("ISA", "avx2")])
        .await;
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/echo", "isa"],
            properties: vec![("Pool", "isa"), ("ISA", "sse")],
            ..Default::default()
        })
        .await;
    let error = refused(&harness, &action, &[]).await;
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains("ISA=sse"), "{error}");
    // `x-buildbuddy-platform.ISA` arrives as `…isa` and still replaces `ISA`.
    let stream = harness
        .start_execute(&action, true, &[("x-buildbuddy-platform.isa", "avx2")])
        .await
        .expect("the header's ISA=avx2 matches the executor");
    let (_, response) = finish(stream).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    let worker = response.result.unwrap().execution_metadata.unwrap().worker;
    assert_eq!(worker, "exec-avx2");

    // A key only the header names matches the executor's declared spelling.
    let plain = harness
        .action(ActionSpec {
            arguments: vec!["/bin/echo", "isa-from-header"],
            properties: vec![("Pool", "isa")],
            ..Default::default()
        })
        .await;
    let error = refused(&harness, &plain, &[("x-kiln-platform.isa", "sse")]).await;
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains("ISA=sse"), "{error}");
    let stream = harness
        .start_execute(&plain, true, &[("x-kiln-platform.isa", "avx2")])
        .await
        .expect("isa=avx2 from a header matches the declared ISA=avx2");
    let (_, response) = finish(stream).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    stop.cancel();
    executor.await.unwrap();
    harness.stop().await;
}

#[tokio::test]
async fn an_executor_cannot_declare_a_property_kiln_interprets() {
    let harness = Harness::start().await;
    for (key, hint) in [
        ("OSFamily", "--os-family"),
        ("pool", "--pool"),
        ("dockerNetwork", "keys Kiln does not interpret"),
    ] {
        let error = match RemoteSession::connect(
            harness.channel.clone(),
            SessionConfig {
                name: "exec-declares".into(),
                pool: "default".into(),
                os_family: "linux".into(),
                arch: "amd64".into(),
                properties: [(key.to_string(), "x".to_string())].into_iter().collect(),
                isolation_types: vec!["none".into()],
                capacity: 1,
                resources: ResourceAmount::UNLIMITED,
                heartbeat_interval: Duration::from_secs(1),
                credential: None,
            },
        )
        .await
        {
            Ok(_) => panic!("{key} was accepted as a declared property"),
            Err(error) => error,
        };
        assert!(
            matches!(error, kiln_scheduler::SchedulerError::Refused(_)),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&format!("declared property {key}:")),
            "{message}"
        );
        assert!(message.contains(hint), "{message}");
    }
    harness.stop().await;
}

#[tokio::test]
async fn a_grace_period_above_the_limit_is_refused_naming_it() {
    let harness = Harness::start_with(|config| {
        config.execution.max_termination_grace = Period::secs(60);
    })
    .await;
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("termination-grace-period", "1h")],
            ..Default::default()
        })
        .await;
    let error = refused(&harness, &action, &[]).await;
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(
        error.message().contains("termination-grace-period=\"1h\""),
        "{error}"
    );
    assert!(error.message().contains("at most 60s"), "{error}");
    assert!(
        error.message().contains("execution.max_termination_grace"),
        "{error}"
    );
    let action = harness
        .action(ActionSpec {
            arguments: vec!["/bin/true"],
            properties: vec![("termination-grace-period", "1m")],
            ..Default::default()
        })
        .await;
    let response = harness.execute(&action, false).await;
    assert_eq!(response.status.unwrap_or_default().code, 0);
    harness.stop().await;
}
