//! End-to-end tests of the action runner: a real Kiln server in-process on
//! 127.0.0.1, real protos and files uploaded with tonic clients, real
//! processes (/bin/sh, /bin/echo, /bin/sleep) run by `Worker`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kiln::config::Config;
use kiln::serve::RunningServer;
use kiln_platform::Platform;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::ReadRequest;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    self, batch_update_blobs_request, command::EnvironmentVariable, Action, Command, Digest,
    Directory, DirectoryNode, FileNode, SymlinkNode, Tree,
};
use kiln_proto::status::PreconditionFailure;
use kiln_worker::users::ActionUsers;
use kiln_worker::{CancellationToken, Isolations, NoIsolation, RunError, Worker, WorkerConfig};
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

/// Upper bound for anything that could hang; never a pass/fail threshold.
const HANG_GUARD: Duration = Duration::from_secs(120);
/// Server batch limit, small so large blobs go through ByteStream.
const MAX_BATCH: &str = "64KiB";

fn digest(data: &[u8]) -> Digest {
    kiln_worker::cas::digest_of(data)
}

struct Harness {
    server: Option<RunningServer>,
    channel: Channel,
    dir: tempfile::TempDir,
    runner: Worker,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().to_path_buf();
        Harness::start_with(dir, work, |_| {}).await
    }

    async fn start_with(
        dir: tempfile::TempDir,
        runner_root: PathBuf,
        adjust: impl FnOnce(&mut WorkerConfig),
    ) -> Harness {
        let mut config = Config::loopback(dir.path().join("server"));
        config.storage.max_size = kiln::config::Size::gib(1);
        config.storage.max_batch_total_size = MAX_BATCH.parse().unwrap();
        let server = kiln::serve::start(&config).await.expect("server starts");
        let channel = server.connect().await.unwrap();
        let mut runner_config =
            WorkerConfig::new(runner_root.join("work"), runner_root.join("cache"));
        runner_config.worker_name = "test-worker".into();
        runner_config.max_timeout = Duration::from_secs(600);
        runner_config.default_grace = Duration::from_secs(60);
        adjust(&mut runner_config);
        // `none` as `kiln` offers it: with an action user, kiln_sandbox's
        // (which gives the workspace to that user and switches to it).
        let none: Arc<dyn kiln_worker::Isolation> = if runner_config.action_users.any().is_some() {
            Arc::new(kiln_sandbox::PlainProcess::new("kiln-worker-tests"))
        } else {
            Arc::new(NoIsolation)
        };
        let mut isolations = Isolations::new(none);
        // As `kiln` composes it: a root executor's privileged actions get
        // overlay workspaces (this process mounts them: no launchers).
        if let Some(steps) = kiln_sandbox::privileged::steps() {
            isolations = isolations.with_privileged_steps(steps);
        }
        let runner = Worker::new(channel.clone(), runner_config, isolations)
            .await
            .expect("runner starts");
        Harness {
            server: Some(server),
            channel,
            dir,
            runner,
        }
    }

    async fn stop(mut self) {
        self.server.take().unwrap().stop().await.unwrap();
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Uploads blobs: small ones batched, large ones through ByteStream.
    async fn upload(&self, blobs: &[Vec<u8>]) {
        for blob in blobs {
            if blob.len() > 32 * 1024 {
                let d = digest(blob);
                let request = kiln_proto::bytestream::WriteRequest {
                    resource_name: format!(
                        "uploads/{}/blobs/{}/{}",
                        uuid::Uuid::new_v4(),
                        d.hash,
                        d.size_bytes
                    ),
                    write_offset: 0,
                    finish_write: true,
                    data: bytes::Bytes::from(blob.clone()),
                };
                ByteStreamClient::new(self.channel.clone())
                    .write(futures::stream::iter(vec![request]))
                    .await
                    .unwrap();
                continue;
            }
            let response = self
                .cas()
                .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                    requests: vec![batch_update_blobs_request::Request {
                        digest: Some(digest(blob)),
                        data: blob.clone(),
                        compressor: 0,
                    }],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for r in response.responses {
                assert_eq!(r.status.unwrap().code, 0);
            }
        }
    }

    async fn download(&self, digest: &Digest) -> Vec<u8> {
        let mut stream = ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .read(ReadRequest {
                resource_name: format!("blobs/{}/{}", digest.hash, digest.size_bytes),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk.unwrap().data);
        }
        data
    }

    async fn run(
        &self,
        action: &Digest,
        platform: &Platform,
    ) -> Result<kiln_worker::RunOutcome, RunError> {
        self.run_cancellable(action, platform, CancellationToken::new())
            .await
    }

    async fn run_cancellable(
        &self,
        action: &Digest,
        platform: &Platform,
        cancel: CancellationToken,
    ) -> Result<kiln_worker::RunOutcome, RunError> {
        tokio::time::timeout(
            HANG_GUARD,
            self.runner.run("", "", action, platform, cancel),
        )
        .await
        .expect("the run ends")
    }

    fn work_root(&self) -> PathBuf {
        self.runner.config().work_root.clone()
    }
}

/// Collects the blobs of a test action as it is built.
#[derive(Default)]
struct Blobs(Vec<Vec<u8>>);

impl Blobs {
    fn add(&mut self, data: &[u8]) -> Digest {
        self.0.push(data.to_vec());
        digest(data)
    }

    fn message<M: Message>(&mut self, message: &M) -> Digest {
        self.add(&message.encode_to_vec())
    }

    fn file(&mut self, name: &str, data: &[u8], executable: bool) -> FileNode {
        FileNode {
            name: name.into(),
            digest: Some(self.add(data)),
            is_executable: executable,
            node_properties: None,
        }
    }

    fn directory(&mut self, name: &str, directory: &Directory) -> DirectoryNode {
        DirectoryNode {
            name: name.into(),
            digest: Some(self.message(directory)),
        }
    }

    /// An Action running `arguments` with `PATH=/bin:/usr/bin`.
    fn action(&mut self, root: &Directory, arguments: &[&str], outputs: &[&str]) -> Digest {
        let command = Command {
            arguments: arguments.iter().map(|s| s.to_string()).collect(),
            environment_variables: vec![EnvironmentVariable {
                name: "PATH".into(),
                value: "/bin:/usr/bin".into(),
            }],
            output_paths: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.action_with(root, command, None)
    }

    fn action_with(
        &mut self,
        root: &Directory,
        command: Command,
        timeout: Option<Duration>,
    ) -> Digest {
        let command_digest = self.message(&command);
        let root_digest = self.message(root);
        self.message(&Action {
            command_digest: Some(command_digest),
            input_root_digest: Some(root_digest),
            timeout: timeout.map(|t| kiln_proto::protobuf::Duration {
                seconds: t.as_secs() as i64,
                nanos: t.subsec_nanos() as i32,
            }),
            ..Default::default()
        })
    }
}

fn shell(script: &str) -> Vec<&str> {
    vec!["/bin/sh", "-c", script]
}

/// Action directories under a work root (beside its pool of spare
/// directories, `spare`).
fn action_dirs_in(work_root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(work_root)
        .map(|d| {
            d.map(|entry| entry.unwrap().path())
                .filter(|path| !path.ends_with("spare"))
                .collect()
        })
        .unwrap_or_default()
}

fn entries_of(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Parts every action directory keeps when it is emptied for reuse (root
/// runs actions of the default `none` on an overlay, whose lower and upper
/// layers are kept too).
const KEPT_PARTS: [&str; 4] = ["workspace", "io", "inputs", "upper"];

/// Whether every action directory under `work_root` is emptied for reuse:
/// nothing but its kept parts, each empty.
fn all_emptied(work_root: &Path) -> bool {
    action_dirs_in(work_root).iter().all(|kept| {
        let parts: Vec<_> = KEPT_PARTS.iter().map(|part| kept.join(part)).collect();
        let present = parts.iter().filter(|part| part.exists()).count();
        entries_of(kept) == present && parts.iter().all(|part| entries_of(part) == 0)
    })
}

/// Waits (at most a minute) until the finished actions' directories are
/// emptied, which happens after their results went out.
async fn wait_until_emptied(work_root: &Path) {
    for _ in 0..3000 {
        if all_emptied(work_root) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<_> = action_dirs_in(work_root)
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()))
        .collect();
    panic!("action directories not emptied: {left:?}");
}

const TOOL: &[u8] = b"#!/bin/sh\nset -e\ncat link > out/copy.txt\nmkdir -p out/dir/sub\ncp src/deep/b.txt out/dir/sub/b.txt\necho top > out/dir/top.txt\nln -s top.txt out/dir/top-link\ncp src/big.bin out/big.bin\ntest -d empty\ntest -f src/deep/empty.txt\ntest ! -x src/a.txt\necho stdout-text\necho stderr-text >&2\n";

/// The happy path's action: nested inputs, an executable, a symlink, an
/// empty directory, and a file large enough for ByteStream.
fn happy_action(blobs: &mut Blobs) -> (Digest, Vec<u8>) {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let deep = Directory {
        files: vec![
            blobs.file("b.txt", b"bee\n", false),
            blobs.file("empty.txt", b"", false),
        ],
        ..Default::default()
    };
    let src = Directory {
        files: vec![
            blobs.file("a.txt", b"ay\n", false),
            blobs.file("big.bin", &big, false),
        ],
        directories: vec![blobs.directory("deep", &deep)],
        ..Default::default()
    };
    let root = Directory {
        files: vec![blobs.file("tool.sh", TOOL, true)],
        directories: vec![
            blobs.directory("empty", &Directory::default()),
            blobs.directory("src", &src),
        ],
        symlinks: vec![SymlinkNode {
            name: "link".into(),
            target: "src/a.txt".into(),
            node_properties: None,
        }],
        ..Default::default()
    };
    let action = blobs.action(
        &root,
        &["./tool.sh"],
        &["out/copy.txt", "out/dir", "out/big.bin", "out/absent.txt"],
    );
    (action, big)
}

fn millis(timestamp: &Option<kiln_proto::protobuf::Timestamp>, name: &str) -> i128 {
    let t = timestamp
        .as_ref()
        .unwrap_or_else(|| panic!("{name} is set"));
    t.seconds as i128 * 1_000_000_000 + t.nanos as i128
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_runs_and_uploads_outputs() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let (action, big) = happy_action(&mut blobs);
    harness.upload(&blobs.0).await;

    let outcome = harness.run(&action, &Platform::default()).await.unwrap();
    let result = &outcome.result;
    let stderr = harness
        .download(result.stderr_digest.as_ref().unwrap())
        .await;
    assert_eq!(
        result.exit_code,
        0,
        "stderr: {}",
        String::from_utf8_lossy(&stderr)
    );
    assert_eq!(outcome.status.code(), Code::Ok);
    assert!(outcome.cacheable);
    assert_eq!(stderr, b"stderr-text\n");
    let stdout = harness
        .download(result.stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(stdout, b"stdout-text\n");

    // Files: copied through the symlink, and a large one (ByteStream both ways).
    let mut files: Vec<_> = result.output_files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0].path, "out/big.bin");
    assert_eq!(files[0].digest.as_ref(), Some(&digest(&big)));
    assert_eq!(harness.download(&digest(&big)).await, big);
    assert_eq!(files[1].path, "out/copy.txt");
    assert_eq!(files[1].digest.as_ref(), Some(&digest(b"ay\n")));
    assert!(!files[1].is_executable);

    // The directory: a Tree in the CAS with root and deduplicated children.
    assert_eq!(result.output_directories.len(), 1);
    let output_directory = &result.output_directories[0];
    assert_eq!(output_directory.path, "out/dir");
    let tree = Tree::decode(
        harness
            .download(output_directory.tree_digest.as_ref().unwrap())
            .await
            .as_slice(),
    )
    .unwrap();
    let root = tree.root.unwrap();
    assert_eq!(
        output_directory.root_directory_digest.as_ref(),
        Some(&digest(&root.encode_to_vec()))
    );
    assert_eq!(root.files.len(), 1);
    assert_eq!(root.files[0].name, "top.txt");
    assert_eq!(
        harness
            .download(root.files[0].digest.as_ref().unwrap())
            .await,
        b"top\n"
    );
    assert_eq!(root.symlinks.len(), 1);
    assert_eq!(root.symlinks[0].name, "top-link");
    assert_eq!(root.symlinks[0].target, "top.txt");
    assert_eq!(root.directories.len(), 1);
    assert_eq!(root.directories[0].name, "sub");
    assert_eq!(tree.children.len(), 1);
    let sub = &tree.children[0];
    assert_eq!(
        root.directories[0].digest.as_ref(),
        Some(&digest(&sub.encode_to_vec()))
    );
    assert_eq!(sub.files[0].name, "b.txt");
    assert_eq!(
        harness
            .download(sub.files[0].digest.as_ref().unwrap())
            .await,
        b"bee\n"
    );
    assert!(result.output_symlinks.is_empty());

    // Metadata: every phase stamped, in order; queued is the scheduler's.
    let metadata = result.execution_metadata.as_ref().unwrap();
    assert_eq!(metadata.worker, "test-worker");
    assert!(metadata.queued_timestamp.is_none());
    let order = [
        millis(&metadata.worker_start_timestamp, "worker_start"),
        millis(&metadata.input_fetch_start_timestamp, "input_fetch_start"),
        millis(
            &metadata.input_fetch_completed_timestamp,
            "input_fetch_completed",
        ),
        millis(&metadata.execution_start_timestamp, "execution_start"),
        millis(
            &metadata.execution_completed_timestamp,
            "execution_completed",
        ),
        millis(
            &metadata.output_upload_start_timestamp,
            "output_upload_start",
        ),
        millis(
            &metadata.output_upload_completed_timestamp,
            "output_upload_completed",
        ),
        millis(&metadata.worker_completed_timestamp, "worker_completed"),
    ];
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");

    // Nothing of the action is left once its directory is emptied (after
    // the result): it is either gone or kept for reuse with an empty
    // workspace and no output files.
    wait_until_emptied(&harness.work_root()).await;
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_takes_inputs_from_the_cache() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let (action, _) = happy_action(&mut blobs);
    harness.upload(&blobs.0).await;

    let first = harness.run(&action, &Platform::default()).await.unwrap();
    assert_eq!(first.result.exit_code, 0);
    let after_first = harness.runner.cache().stats();
    // tool.sh, a.txt, big.bin, b.txt, empty.txt.
    assert_eq!(after_first.blobs_filled, 5);

    let second = harness.run(&action, &Platform::default()).await.unwrap();
    assert_eq!(second.result.exit_code, 0);
    assert_eq!(harness.runner.cache().stats(), after_first);
    assert_eq!(second.result.output_files, first.result.output_files);
    harness.stop().await;
}

/// Runs an action whose root holds `bad` as a subdirectory; expects
/// INVALID_ARGUMENT naming `bad`'s digest and `entry`.
async fn expect_bad_directory(harness: &Harness, bad: Directory, entry: &str) {
    let mut blobs = Blobs::default();
    let bad_digest = blobs.message(&bad);
    let root = Directory {
        directories: vec![DirectoryNode {
            name: "d".into(),
            digest: Some(bad_digest.clone()),
        }],
        ..Default::default()
    };
    let action = blobs.action(&root, &["/bin/true"], &[]);
    harness.upload(&blobs.0).await;
    let error = harness
        .run(&action, &Platform::default())
        .await
        .expect_err("a bad directory is rejected");
    let RunError::InvalidArgument(message) = &error else {
        panic!("expected InvalidArgument, got {error:?}");
    };
    assert!(message.contains(&bad_digest.hash), "{message}");
    assert!(message.contains(&format!("{entry:?}")), "{message}");
    assert_eq!(tonic::Status::from(error).code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_directory_entries_are_rejected() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let file = |blobs: &mut Blobs, name: &str| blobs.file(name, b"x", false);
    let empty_dir = |blobs: &mut Blobs, name: &str| blobs.directory(name, &Directory::default());
    for name in ["", ".", "..", "a/b", "a\0b"] {
        let bad = Directory {
            files: vec![file(&mut blobs, name)],
            ..Default::default()
        };
        expect_bad_directory(&harness, bad, name).await;
    }
    // The same name as a file and a directory.
    let bad = Directory {
        files: vec![file(&mut blobs, "same")],
        directories: vec![empty_dir(&mut blobs, "same")],
        ..Default::default()
    };
    expect_bad_directory(&harness, bad, "same").await;
    // The same name as a directory and a symlink.
    let bad = Directory {
        directories: vec![empty_dir(&mut blobs, "same")],
        symlinks: vec![SymlinkNode {
            name: "same".into(),
            target: "x".into(),
            node_properties: None,
        }],
        ..Default::default()
    };
    expect_bad_directory(&harness, bad, "same").await;
    // Unsorted entries.
    let bad = Directory {
        files: vec![file(&mut blobs, "b"), file(&mut blobs, "a")],
        ..Default::default()
    };
    expect_bad_directory(&harness, bad, "a").await;
    // Nothing ran: the work root holds no workspace.
    assert_eq!(action_dirs_in(&harness.work_root()).len(), 0);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_are_rejected() {
    let harness = Harness::start().await;
    #[allow(deprecated)]
    let cases: Vec<(Command, &str)> = vec![
        (
            Command {
                output_paths: vec!["/etc/passwd".into()],
                ..Default::default()
            },
            "/etc/passwd",
        ),
        (
            Command {
                output_paths: vec!["a/../../escape".into()],
                ..Default::default()
            },
            "a/../../escape",
        ),
        (
            Command {
                working_directory: "sub".into(),
                output_paths: vec!["../../escape".into()],
                ..Default::default()
            },
            "../../escape",
        ),
        (
            Command {
                output_files: vec!["../legacy-file".into()],
                ..Default::default()
            },
            "../legacy-file",
        ),
        (
            Command {
                output_directories: vec!["/abs/dir".into()],
                ..Default::default()
            },
            "/abs/dir",
        ),
        (
            Command {
                working_directory: "../outside".into(),
                ..Default::default()
            },
            "../outside",
        ),
        (
            Command {
                working_directory: "/tmp".into(),
                ..Default::default()
            },
            "/tmp",
        ),
    ];
    for (mut command, path) in cases {
        command.arguments = vec!["/bin/true".into()];
        let mut blobs = Blobs::default();
        let action = blobs.action_with(&Directory::default(), command, None);
        harness.upload(&blobs.0).await;
        let error = harness
            .run(&action, &Platform::default())
            .await
            .expect_err("a bad path is rejected");
        let RunError::InvalidArgument(message) = &error else {
            panic!("expected InvalidArgument for {path}, got {error:?}");
        };
        assert!(message.contains(&format!("{path:?}")), "{message}");
    }
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_inputs_are_listed() {
    let harness = Harness::start().await;
    let mut uploaded = Blobs::default();
    let mut not_uploaded = Blobs::default();

    // A missing file, a missing subdirectory, and a present one.
    let missing_file = not_uploaded.file("gone.txt", b"never uploaded", false);
    let missing_dir = not_uploaded.directory(
        "gone",
        &Directory {
            files: vec![uploaded.file("inner", b"inner", false)],
            ..Default::default()
        },
    );
    let root = Directory {
        files: vec![
            missing_file.clone(),
            uploaded.file("here.txt", b"here", false),
        ],
        directories: vec![missing_dir.clone()],
        ..Default::default()
    };
    let action = uploaded.action(&root, &["/bin/true"], &[]);
    harness.upload(&uploaded.0).await;
    let error = harness
        .run(&action, &Platform::default())
        .await
        .expect_err("missing inputs");
    let RunError::MissingInputs(digests) = &error else {
        panic!("expected MissingInputs, got {error:?}");
    };
    let got: HashSet<Digest> = digests.iter().cloned().collect();
    let want: HashSet<Digest> = [missing_file.digest.unwrap(), missing_dir.digest.unwrap()]
        .into_iter()
        .collect();
    assert_eq!(got, want);
    assert_eq!(digests.len(), 2);

    // At the edge: FAILED_PRECONDITION with one MISSING violation per blob.
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::FailedPrecondition);
    let details = kiln_proto::rpc::Status::decode(status.details()).unwrap();
    let failure = PreconditionFailure::decode(details.details[0].value.as_slice()).unwrap();
    let subjects: HashSet<String> = failure
        .violations
        .iter()
        .map(|v| {
            assert_eq!(v.r#type, "MISSING");
            v.subject.clone()
        })
        .collect();
    let want_subjects: HashSet<String> = want
        .iter()
        .map(|d| format!("blobs/{}/{}", d.hash, d.size_bytes))
        .collect();
    assert_eq!(subjects, want_subjects);

    // A missing Action, and a missing Command.
    let mut blobs = Blobs::default();
    let absent_action = digest(b"no such action");
    let error = harness
        .run(&absent_action, &Platform::default())
        .await
        .expect_err("missing action");
    assert!(
        matches!(&error, RunError::MissingInputs(d) if d == &vec![absent_action.clone()]),
        "{error:?}"
    );
    let absent_command = digest(b"no such command");
    let action = blobs.message(&Action {
        command_digest: Some(absent_command.clone()),
        input_root_digest: Some(digest(&Directory::default().encode_to_vec())),
        ..Default::default()
    });
    harness.upload(&blobs.0).await;
    let error = harness
        .run(&action, &Platform::default())
        .await
        .expect_err("missing command");
    assert!(
        matches!(&error, RunError::MissingInputs(d) if d == &vec![absent_command.clone()]),
        "{error:?}"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_not_found_is_a_result() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let action = blobs.action(&Directory::default(), &["no-such-tool-xyz", "--flag"], &[]);
    harness.upload(&blobs.0).await;
    let outcome = harness.run(&action, &Platform::default()).await.unwrap();
    assert_eq!(outcome.status.code(), Code::Ok);
    assert_eq!(outcome.result.exit_code, 127);
    assert!(!outcome.cacheable);
    let stderr = harness
        .download(outcome.result.stderr_digest.as_ref().unwrap())
        .await;
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(stderr.contains("no-such-tool-xyz"), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_runs_with_exactly_the_command_environment() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let command = Command {
        arguments: vec!["env".into()],
        environment_variables: vec![
            EnvironmentVariable {
                name: "PATH".into(),
                value: "/usr/bin:/bin".into(),
            },
            EnvironmentVariable {
                name: "ONLY".into(),
                value: "this".into(),
            },
        ],
        ..Default::default()
    };
    let action = blobs.action_with(&Directory::default(), command, None);
    let echo = blobs.action(&Directory::default(), &["/bin/echo", "hello", "world"], &[]);
    harness.upload(&blobs.0).await;

    let outcome = harness.run(&action, &Platform::default()).await.unwrap();
    assert_eq!(outcome.result.exit_code, 0);
    let stdout = harness
        .download(outcome.result.stdout_digest.as_ref().unwrap())
        .await;
    let mut lines: Vec<&str> = std::str::from_utf8(&stdout).unwrap().lines().collect();
    lines.sort();
    assert_eq!(lines, vec!["ONLY=this", "PATH=/usr/bin:/bin"]);

    let outcome = harness.run(&echo, &Platform::default()).await.unwrap();
    let stdout = harness
        .download(outcome.result.stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(stdout, b"hello world\n");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_sends_term_then_waits_the_grace_period() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let command = Command {
        arguments: shell(
            "trap 'echo got-term; sleep 0.2; exit 3' TERM; echo started; while true; do sleep 0.05; done",
        )
        .into_iter()
        .map(String::from)
        .collect(),
        ..Default::default()
    };
    let action = blobs.action_with(&Directory::default(), command, Some(Duration::from_secs(2)));
    harness.upload(&blobs.0).await;
    let mut platform = Platform::default();
    // Far longer than the trap needs: the trap must end the script itself.
    platform.termination_grace_period = Some(Duration::from_secs(60));
    let outcome = harness.run(&action, &platform).await.unwrap();
    assert_eq!(outcome.status.code(), Code::DeadlineExceeded);
    assert!(!outcome.cacheable);
    assert_eq!(outcome.result.exit_code, 3, "the trap ran to its exit");
    let stdout = harness
        .download(outcome.result.stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        "started\ngot-term\n",
        "partial stdout is returned"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_a_process_that_ignores_term() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let command = Command {
        arguments: shell("trap '' TERM; echo started; while true; do sleep 0.05; done")
            .into_iter()
            .map(String::from)
            .collect(),
        ..Default::default()
    };
    // No Action.timeout: the platform's default-timeout applies.
    let action = blobs.action_with(&Directory::default(), command, None);
    harness.upload(&blobs.0).await;
    let mut platform = Platform::default();
    platform.default_timeout = Some(Duration::from_secs(1));
    platform.termination_grace_period = Some(Duration::from_millis(300));
    let outcome = harness.run(&action, &platform).await.unwrap();
    assert_eq!(outcome.status.code(), Code::DeadlineExceeded);
    assert_eq!(outcome.result.exit_code, 128 + 9, "killed by SIGKILL");
    let stdout = harness
        .download(outcome.result.stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(stdout, b"started\n");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_kills_the_process_group() {
    let harness = Harness::start().await;
    let fifo = harness.dir.path().join("grandchild.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let script = format!("sleep 1000 & echo $! > {}; wait", fifo.display());
    let mut blobs = Blobs::default();
    let action = blobs.action(&Directory::default(), &shell(&script), &[]);
    harness.upload(&blobs.0).await;

    let cancel = CancellationToken::new();
    let platform = Platform::default();
    let run = harness.run_cancellable(&action, &platform, cancel.clone());
    let watch = async {
        // Blocks until the script has started its grandchild.
        let fifo = fifo.clone();
        let pid: i32 = tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo))
            .await
            .unwrap()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .expect("the grandchild is alive");
        cancel.cancel();
        (pid, pidfd)
    };
    let (outcome, (pid, pidfd)) = tokio::join!(run, watch);
    let outcome = outcome.unwrap();
    assert_eq!(outcome.status.code(), Code::Cancelled);
    assert!(!outcome.cacheable);

    // A pidfd becomes readable when its process has exited.
    let exited = tokio::task::spawn_blocking(move || {
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        let limit = rustix::event::Timespec {
            tv_sec: HANG_GUARD.as_secs() as i64,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&limit)).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(exited, 1, "the grandchild exits");
    // Gone, or a zombie waiting for init to reap it: not running.
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        let state = stat.rsplit(')').next().unwrap().trim_start().chars().next();
        assert_eq!(state, Some('Z'), "{stat}");
    }
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_before_start_runs_nothing() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let action = blobs.action(&Directory::default(), &["/bin/echo", "hi"], &[]);
    harness.upload(&blobs.0).await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let outcome = harness
        .run_cancellable(&action, &Platform::default(), cancel)
        .await
        .unwrap();
    assert_eq!(outcome.status.code(), Code::Cancelled);
    assert!(!outcome.cacheable);
    assert!(outcome.result.stdout_digest.is_none(), "nothing ran");
    // Nothing was staged either.
    assert_eq!(action_dirs_in(&harness.work_root()).len(), 0);
    harness.stop().await;
}

/// Unmounts a tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_executor_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&small)
        .status();
    if !matches!(mounted, Ok(status) if status.success()) {
        eprintln!("skipped: cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)");
        return;
    }
    let _mount = Mount(small.clone());
    let harness = Harness::start_with(dir, small.clone(), |_| {}).await;
    let mut blobs = Blobs::default();
    let too_big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let root = Directory {
        files: vec![blobs.file("big", &too_big, false)],
        ..Default::default()
    };
    let action = blobs.action(&root, &["/bin/true"], &[]);
    harness.upload(&blobs.0).await;
    let error = harness
        .run(&action, &Platform::default())
        .await
        .expect_err("the disk is full");
    assert!(
        matches!(error, RunError::ExecutorUnavailable(_)),
        "{error:?}"
    );
    assert!(error.is_retryable_elsewhere());
    assert_eq!(tonic::Status::from(error).code(), Code::ResourceExhausted);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(deprecated)]
async fn legacy_outputs_and_working_directory() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let sub = Directory {
        files: vec![blobs.file("run.sh", b"#!/bin/sh\necho f > gen/file.txt\nmkdir gen/dir\necho d > gen/dir/x\nln -s file.txt gen/file-link\nln -s dir gen/dir-link\n", true)],
        ..Default::default()
    };
    let root = Directory {
        directories: vec![blobs.directory("sub", &sub)],
        ..Default::default()
    };
    let command = Command {
        arguments: vec!["./run.sh".into()],
        working_directory: "sub".into(),
        output_files: vec!["gen/file.txt".into(), "gen/file-link".into()],
        output_directories: vec!["gen/dir".into(), "gen/dir-link".into()],
        ..Default::default()
    };
    let action = blobs.action_with(&root, command, None);
    harness.upload(&blobs.0).await;
    let outcome = harness.run(&action, &Platform::default()).await.unwrap();
    let result = outcome.result;
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "gen/file.txt");
    assert_eq!(result.output_files[0].digest, Some(digest(b"f\n")));
    assert_eq!(result.output_directories.len(), 1);
    assert_eq!(result.output_directories[0].path, "gen/dir");
    assert_eq!(result.output_file_symlinks.len(), 1);
    assert_eq!(result.output_file_symlinks[0].path, "gen/file-link");
    assert_eq!(result.output_file_symlinks[0].target, "file.txt");
    assert_eq!(result.output_directory_symlinks.len(), 1);
    assert_eq!(result.output_directory_symlinks[0].target, "dir");
    assert_eq!(result.output_symlinks.len(), 2);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_symlinks_are_not_followed() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let action = blobs.action(
        &Directory::default(),
        &shell("ln -s /etc/hostname out/link"),
        &["out/link"],
    );
    harness.upload(&blobs.0).await;
    let outcome = harness.run(&action, &Platform::default()).await.unwrap();
    assert_eq!(outcome.result.exit_code, 0);
    assert!(outcome.result.output_files.is_empty());
    assert_eq!(outcome.result.output_symlinks.len(), 1);
    assert_eq!(outcome.result.output_symlinks[0].target, "/etc/hostname");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_symlink_cannot_lead_outputs_out_of_the_workspace() {
    let harness = Harness::start().await;
    let outside = harness.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut blobs = Blobs::default();
    let root = Directory {
        symlinks: vec![SymlinkNode {
            name: "out".into(),
            target: outside.display().to_string(),
            node_properties: None,
        }],
        ..Default::default()
    };
    let action = blobs.action(&root, &["/bin/true"], &["out/new/file"]);
    harness.upload(&blobs.0).await;
    let error = harness
        .run(&action, &Platform::default())
        .await
        .expect_err("an output through an escaping symlink is rejected");
    assert!(
        matches!(&error, RunError::InvalidArgument(m) if m.contains("\"out/new/file\"")),
        "{error:?}"
    );
    assert_eq!(entries_of(&outside), 0, "nothing was created outside");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_isolation_type_is_rejected() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let action = blobs.action(&Directory::default(), &["/bin/true"], &[]);
    harness.upload(&blobs.0).await;
    let mut platform = Platform::default();
    platform.isolation = Some(kiln_platform::IsolationType::Docker);
    let error = harness
        .run(&action, &platform)
        .await
        .expect_err("no docker");
    assert!(
        matches!(&error, RunError::Unsupported(m) if m.contains("workload-isolation-type=docker")),
        "{error:?}"
    );
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("workload-isolation-type=docker"));
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_dockerd_under_the_default_type_is_refused_naming_it() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let action = blobs.action(&Directory::default(), &["/bin/true"], &[]);
    harness.upload(&blobs.0).await;
    // No type named: this executor's default (none) would ignore it.
    let mut platform = Platform::default();
    platform.init_dockerd = true;
    let error = harness
        .run(&action, &platform)
        .await
        .expect_err("no dockerd under none");
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("init-dockerd=true"), "{status:?}");
    assert!(
        status.message().contains("default isolation type, none"),
        "{status:?}"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_copied_when_the_cache_is_on_another_device() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("other-device");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&small)
        .status();
    if !matches!(mounted, Ok(status) if status.success()) {
        eprintln!("skipped: cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)");
        return;
    }
    let _mount = Mount(small.clone());
    let work_root = small.join("work");
    let root = dir.path().to_path_buf();
    let harness = Harness::start_with(dir, root, |config| {
        config.work_root = work_root.clone();
        config.keep_workspaces = true;
    })
    .await;
    // The cache stays in the temp dir: hardlinks across devices fail.
    let cache_device = std::fs::metadata(&harness.runner.config().cache_dir).unwrap();
    let work_device = std::fs::metadata(&work_root).unwrap();
    {
        use std::os::unix::fs::MetadataExt;
        assert_ne!(cache_device.dev(), work_device.dev());
    }
    let mut blobs = Blobs::default();
    let (action, _) = happy_action(&mut blobs);
    harness.upload(&blobs.0).await;
    let outcome = harness.run(&action, &Platform::default()).await.unwrap();
    assert_eq!(outcome.result.exit_code, 0);
    // keep_workspaces: the action's directory is still there.
    assert_eq!(action_dirs_in(&work_root).len(), 1);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_never_exceeds_max_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let harness = Harness::start_with(dir, root, |config| {
        config.max_timeout = Duration::from_millis(500);
        config.default_grace = Duration::from_millis(100);
    })
    .await;
    let mut blobs = Blobs::default();
    let command = Command {
        arguments: vec!["/bin/sleep".into(), "1000".into()],
        ..Default::default()
    };
    let action = blobs.action_with(
        &Directory::default(),
        command,
        Some(Duration::from_secs(1000)),
    );
    harness.upload(&blobs.0).await;
    let outcome = harness.run(&action, &Platform::default()).await.unwrap();
    assert_eq!(outcome.status.code(), Code::DeadlineExceeded);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_command_path_the_executor_path_is_searched() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let command = Command {
        arguments: vec!["echo".into(), "found".into()],
        ..Default::default()
    };
    let action = blobs.action_with(&Directory::default(), command, None);
    harness.upload(&blobs.0).await;
    let outcome = harness.run(&action, &Platform::default()).await.unwrap();
    assert_eq!(outcome.result.exit_code, 0);
    let stdout = harness
        .download(outcome.result.stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(stdout, b"found\n");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_action_directory_starts_empty() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    // Leaves files behind in its workspace (none declared as outputs),
    // opens the workspace to everyone, and writes to stderr.
    let messy = blobs.action(
        &Directory::default(),
        &shell("mkdir -p left/deep && echo x > left/deep/over && echo y > stray && chmod 777 . && echo noise >&2"),
        &[],
    );
    let look = blobs.action(&Directory::default(), &shell("ls -A; stat -c %a ."), &[]);
    harness.upload(&blobs.0).await;
    let outcome = harness.run(&messy, &Platform::default()).await.unwrap();
    assert_eq!(outcome.result.exit_code, 0);
    // One action at a time, once the first one's directory is emptied:
    // the second takes it.
    wait_until_emptied(&harness.work_root()).await;
    let outcome = harness.run(&look, &Platform::default()).await.unwrap();
    assert_eq!(outcome.result.exit_code, 0);
    let stdout = harness
        .download(outcome.result.stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(String::from_utf8_lossy(&stdout), "755\n");
    let stderr = outcome.result.stderr_digest.as_ref().unwrap();
    assert_eq!(
        stderr.size_bytes, 0,
        "the first action's stderr carried over"
    );
    assert_eq!(
        action_dirs_in(&harness.work_root()).len(),
        1,
        "the directory was not reused"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_is_the_next_actions_input_without_a_fetch() {
    let harness = Harness::start().await;
    let mut blobs = Blobs::default();
    let generate = blobs.action(
        &Directory::default(),
        &shell("mkdir -p out && echo generated > out/gen.txt"),
        &["out/gen.txt"],
    );
    // The next action reads what the first one made (as a build does: the
    // client names the output's digest in the next input root).
    let root = Directory {
        files: vec![blobs.file("gen.txt", b"generated\n", false)],
        ..Default::default()
    };
    let consume = blobs.action(&root, &shell("cat gen.txt"), &[]);
    harness.upload(&blobs.0).await;

    let outcome = harness.run(&generate, &Platform::default()).await.unwrap();
    assert_eq!(outcome.result.exit_code, 0);
    let fetched = harness.runner.cache().stats().blobs_filled;
    let outcome = harness.run(&consume, &Platform::default()).await.unwrap();
    assert_eq!(outcome.result.exit_code, 0);
    let stdout = harness
        .download(outcome.result.stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(stdout, b"generated\n");
    assert_eq!(
        harness.runner.cache().stats().blobs_filled,
        fetched,
        "the output was fetched again as an input"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_limited_cache_evicts_and_fetches_again() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().to_path_buf();
    // Room for one of the two 6 KB inputs, not both.
    let harness = Harness::start_with(dir, work, |config| {
        config.cache_max_bytes = Some(10_000);
    })
    .await;
    let mut blobs = Blobs::default();
    let mut action_reading = |byte: u8| {
        let root = Directory {
            files: vec![blobs.file("input.bin", &[byte; 6000], false)],
            ..Default::default()
        };
        blobs.action(&root, &shell("wc -c < input.bin"), &[])
    };
    let first = action_reading(b'1');
    let second = action_reading(b'2');
    harness.upload(&blobs.0).await;
    let run = |action: Digest| {
        let harness = &harness;
        async move {
            let outcome = harness.run(&action, &Platform::default()).await.unwrap();
            assert_eq!(outcome.result.exit_code, 0);
            let stdout = harness
                .download(outcome.result.stdout_digest.as_ref().unwrap())
                .await;
            assert_eq!(String::from_utf8_lossy(&stdout).trim(), "6000");
        }
    };
    run(first.clone()).await;
    run(second).await;
    let stats = harness.runner.cache().stats();
    assert_eq!(stats.blobs_filled, 2);
    assert_eq!(stats.entries_evicted, 1, "{stats:?}");
    assert!(stats.bytes_held <= 10_000, "{stats:?}");
    // The first input was evicted: it is fetched again, and the action runs.
    run(first).await;
    assert_eq!(harness.runner.cache().stats().blobs_filled, 3);
    harness.stop().await;
}

/// Whether this process may switch users and mount: the input-protection
/// cases need root. Under CI, which runs as root, anything else fails.
fn running_as_root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI runs as root, this process does not"
    );
    eprintln!("skipped: {test}: needs root (switching users, overlay mounts)");
    false
}

/// Tries to change `data.txt` in place and through its cache entry, then
/// says whom it ran as and what its own copy holds.
const ATTACK: &str = "chmod 666 data.txt; echo poisoned > data.txt; \
    truncate -s 2 data.txt; chmod 666 \"$CACHE_ENTRY\"; echo poisoned > \"$CACHE_ENTRY\"; \
    echo \"$(id -u) $(cat data.txt)\"; true";

/// Runs [`ATTACK`] on an input (also on its cache entry, by path, when
/// `through_the_cache`), then an action reading the same input. Returns
/// what the attacker printed; asserts the reader and the cache entry still
/// hold the original bytes.
async fn attack_then_read(harness: &Harness, through_the_cache: bool) -> String {
    let mut blobs = Blobs::default();
    let root = Directory {
        files: vec![blobs.file("data.txt", b"original\n", false)],
        ..Default::default()
    };
    let entry = harness
        .runner
        .config()
        .cache_dir
        .join("blobs")
        .join(&digest(b"original\n").hash[..2])
        .join(format!("{}-9", digest(b"original\n").hash));
    let attack = blobs.action_with(
        &root,
        Command {
            arguments: shell(ATTACK).iter().map(|a| a.to_string()).collect(),
            environment_variables: vec![
                EnvironmentVariable {
                    name: "PATH".into(),
                    value: "/bin:/usr/bin".into(),
                },
                EnvironmentVariable {
                    name: "CACHE_ENTRY".into(),
                    value: if through_the_cache {
                        entry.display().to_string()
                    } else {
                        "/nonexistent".into()
                    },
                },
            ],
            ..Default::default()
        },
        None,
    );
    let read = blobs.action(&root, &shell("cat data.txt"), &[]);
    harness.upload(&blobs.0).await;
    let outcome = harness.run(&attack, &Platform::default()).await.unwrap();
    let said = harness
        .download(outcome.result.stdout_digest.as_ref().unwrap())
        .await;
    let outcome = harness.run(&read, &Platform::default()).await.unwrap();
    let stdout = harness
        .download(outcome.result.stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(stdout, b"original\n", "the next action got a changed input");
    assert!(entry.exists(), "no cache entry at {}", entry.display());
    assert_eq!(std::fs::read(&entry).unwrap(), b"original\n");
    String::from_utf8_lossy(&said).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_action_changes_only_its_own_copy_of_an_input() {
    if !running_as_root("a_root_action_changes_only_its_own_copy_of_an_input") {
        return;
    }
    // No action user: `none` runs as root, and its inputs are overlaid.
    // (Root on the host can reach the cache by path: under `none` only an
    // operator who sets no action user runs actions as root.)
    let harness = Harness::start().await;
    let said = attack_then_read(&harness, false).await;
    assert_eq!(said, "0 po", "root's writes did not reach its own copy");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_action_user_can_change_no_input() {
    if !running_as_root("the_action_user_can_change_no_input") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The action user must traverse down to its workspace.
    std::fs::set_permissions(
        dir.path(),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o711),
    )
    .unwrap();
    let work = dir.path().to_path_buf();
    let harness = Harness::start_with(dir, work, |config| {
        config.action_users = ActionUsers::One(Some((65534, 65534)));
    })
    .await;
    let said = attack_then_read(&harness, true).await;
    assert_eq!(said, "65534 original", "the action user changed its input");

    // Its workspace and its outputs' parents, made by the executor, are
    // given to it as it starts: it writes an output two directories down.
    let mut blobs = Blobs::default();
    let write = blobs.action(
        &Directory::default(),
        &shell("id -u > out/deep/who"),
        &["out/deep/who"],
    );
    harness.upload(&blobs.0).await;
    let outcome = harness.run(&write, &Platform::default()).await.unwrap();
    assert_eq!(outcome.result.exit_code, 0, "{:?}", outcome.status);
    let who = &outcome.result.output_files[0];
    assert_eq!(who.path, "out/deep/who");
    assert_eq!(
        harness.download(who.digest.as_ref().unwrap()).await,
        b"65534\n"
    );
    harness.stop().await;
}

/// What one `none` action learns of another running at the same time, as
/// the action user(s) `users`: `(what the first said, what the second
/// said)`. The second writes its shell's pid where the first finds it and
/// waits for it (bounded); the first then tries that process's working
/// directory (`/proc/PID/cwd`, the second's workspace), plants a file
/// there, and signals it (`kill -0`).
async fn reach_a_concurrent_action(users: ActionUsers) -> (String, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let work = dir.path().to_path_buf();
    let harness = Harness::start_with(dir, work, |config| config.action_users = users).await;
    let wait_for = |file: &str| {
        format!(
            "i=0; while [ ! -e {m}/{file} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done",
            m = marks.display()
        )
    };
    let second = format!(
        "echo $$ > {m}/pid.tmp && mv {m}/pid.tmp {m}/pid; {wait}; \
         [ -e planted ] && echo planted; id -u",
        m = marks.display(),
        wait = wait_for("done"),
    );
    let first = format!(
        "{wait}; p=$(cat {m}/pid); \
         if ls /proc/$p/cwd/ >/dev/null 2>&1; then echo cwd=reached; else echo cwd=denied; fi; \
         if (echo x > /proc/$p/cwd/planted) 2>/dev/null; then echo plant=reached; else echo plant=denied; fi; \
         if kill -0 $p 2>/dev/null; then echo signal=reached; else echo signal=denied; fi; \
         id -u; touch {m}/done",
        m = marks.display(),
        wait = wait_for("pid"),
    );
    let mut blobs = Blobs::default();
    let first = blobs.action(&Directory::default(), &shell(&first), &[]);
    let second = blobs.action(&Directory::default(), &shell(&second), &[]);
    harness.upload(&blobs.0).await;
    let platform = Platform::default();
    let (first, second) = tokio::join!(
        harness.run(&first, &platform),
        harness.run(&second, &platform)
    );
    let mut said = Vec::new();
    for outcome in [first, second] {
        let outcome = outcome.unwrap();
        assert_eq!(outcome.result.exit_code, 0, "{:?}", outcome.status);
        let stdout = harness
            .download(outcome.result.stdout_digest.as_ref().unwrap())
            .await;
        said.push(String::from_utf8(stdout).unwrap());
    }
    harness.stop().await;
    let second = said.pop().unwrap();
    (said.pop().unwrap(), second)
}

/// Under a range of action users, each running action has a uid of its
/// own: a `none` action, in the host's process and mount namespaces, can
/// neither enter another's workspace through `/proc/PID/cwd`, nor write
/// there, nor signal it. Under one action user for all (the control, as
/// `--action-user nobody` gives) it can do all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_actions_under_a_range_of_users_cannot_reach_each_other() {
    if !running_as_root("concurrent_actions_under_a_range_of_users_cannot_reach_each_other") {
        return;
    }
    let (first, second) = reach_a_concurrent_action(ActionUsers::Range {
        first: 0x7A00_0000,
        last: 0x7A00_0003,
    })
    .await;
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(
        lines[..3],
        ["cwd=denied", "plant=denied", "signal=denied"],
        "{first}"
    );
    let uid = |said: &str| -> u32 { said.lines().last().unwrap().parse().unwrap() };
    let (a, b) = (uid(&first), uid(&second));
    assert_ne!(a, b, "two running actions shared a uid");
    for uid in [a, b] {
        assert!(
            (0x7A00_0000..=0x7A00_0003).contains(&uid),
            "uid {uid} is outside the range"
        );
    }
    assert!(!second.contains("planted"), "{second}");

    let (first, second) = reach_a_concurrent_action(ActionUsers::One(Some((65534, 65534)))).await;
    assert_eq!(
        first, "cwd=reached\nplant=reached\nsignal=reached\n65534\n",
        "one user for all: the control"
    );
    assert_eq!(second, "planted\n65534\n");
}
