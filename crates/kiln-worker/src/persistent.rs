//! Persistent workers (`persistentWorkerKey` with `recycle-runner`): a
//! long-running tool process kept in a warm runner, sent one `WorkRequest`
//! per action instead of being started for each, as Bazel does locally.
//!
//! The action's arguments are split as Bazel splits them: the flag files
//! (`@path`, `--flagfile=path`, `--flagfile path`) become the request, the
//! rest start the worker, with `--persistent_worker` appended last (a
//! wrapper script passes it on only there). The request's `arguments` are
//! the flag files' lines, expanded again where a line is itself a flag
//! file; its `inputs` are every input file, path and digest. Flag files are
//! read beneath the workspace only (`RESOLVE_BENEATH`), never through a
//! symlink leading out of it: the executor may read what the action may
//! not. The messages are written here with the field numbers of Bazel's
//! `worker_protocol.proto`; `json` sends the same as one object per line
//! with protobuf JSON names.
//!
//! A worker that exits, answers malformed, or does not answer within the
//! action's timeout fails the action ([`WorkerFailure`]), and its runner
//! is discarded, which kills it ([`WorkerProcess`]'s `Drop`).

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use kiln_platform::{PersistentWorker, WorkerProtocol};
use kiln_proto::reapi::{Digest, Directory};
use prost::Message;
use rustix::fs::{Mode, OFlags, ResolveFlags};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::Child;

use crate::error::RunError;
use crate::inputs::DirectoryMap;
use crate::isolation::CommandSpec;

/// Appended last to the arguments that start a worker.
pub const PERSISTENT_WORKER_FLAG: &str = "--persistent_worker";

/// The worker's stderr, in its runner's directory (outside the workspace,
/// kept across the runner's actions).
pub const WORKER_STDERR: &str = "worker-stderr";

/// Most bytes of one response: a bigger length prefix is malformed.
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

/// Flag files within flag files are expanded this deep at most.
const MAX_FLAG_FILE_DEPTH: usize = 8;
/// Most bytes of flag files read for one request, nested ones counted each
/// time they are expanded: a flag file naming itself a thousand times
/// cannot expand without bound.
const MAX_FLAG_FILE_BYTES: u64 = 64 << 20;

/// Lines of the worker's stderr quoted when it fails.
const STDERR_TAIL_LINES: usize = 10;

/// `blaze.worker.Input`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Input {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(bytes = "vec", tag = "2")]
    pub digest: Vec<u8>,
}

/// `blaze.worker.WorkRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkRequest {
    #[prost(string, repeated, tag = "1")]
    pub arguments: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub inputs: Vec<Input>,
    #[prost(int32, tag = "3")]
    pub request_id: i32,
    #[prost(bool, tag = "4")]
    pub cancel: bool,
    #[prost(int32, tag = "5")]
    pub verbosity: i32,
    #[prost(string, tag = "6")]
    pub sandbox_dir: String,
}

/// `blaze.worker.WorkResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkResponse {
    #[prost(int32, tag = "1")]
    pub exit_code: i32,
    #[prost(string, tag = "2")]
    pub output: String,
    #[prost(int32, tag = "3")]
    pub request_id: i32,
    #[prost(bool, tag = "4")]
    pub was_cancelled: bool,
}

/// An action's arguments, split into what starts its worker and the flag
/// files that make up each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitArguments {
    /// The non-flag-file arguments, [`PERSISTENT_WORKER_FLAG`] last.
    pub startup: Vec<String>,
    /// The flag files' paths, in order.
    pub flag_files: Vec<String>,
}

/// Whether `argument` names a flag file, and which: `@path` (not `@@`,
/// Bazel's escape, nor an external label `@repo//...`) or
/// `--flagfile=path`.
fn flag_file_of(argument: &str) -> Option<&str> {
    if let Some(path) = argument.strip_prefix("--flagfile=") {
        return Some(path);
    }
    let path = argument.strip_prefix('@')?;
    (!path.starts_with('@') && !path.contains("//") && !path.is_empty()).then_some(path)
}

/// Splits `arguments` (`arguments[0]` is the program, never a flag file);
/// an error names the key and the program when there is no flag file.
pub fn split_arguments(
    arguments: &[String],
    worker: &PersistentWorker,
) -> Result<SplitArguments, RunError> {
    let mut startup = Vec::new();
    let mut flag_files = Vec::new();
    let mut rest = arguments.iter().enumerate();
    while let Some((index, argument)) = rest.next() {
        if index == 0 {
            startup.push(argument.clone());
        } else if argument == "--flagfile" {
            match rest.next() {
                Some((_, path)) => flag_files.push(path.clone()),
                None => startup.push(argument.clone()),
            }
        } else if let Some(path) = flag_file_of(argument) {
            flag_files.push(path.to_string());
        } else {
            startup.push(argument.clone());
        }
    }
    if flag_files.is_empty() {
        return Err(RunError::InvalidArgument(format!(
            "persistentWorkerKey={:?}: the action ({}) has no flag-file argument (@path, \
             --flagfile=path or --flagfile path) to send to its worker as a WorkRequest; the \
             rule must pass its arguments in a flag file, or the action must not set \
             persistentWorkerKey with recycle-runner",
            worker.key,
            arguments.first().map_or("", String::as_str)
        )));
    }
    startup.push(PERSISTENT_WORKER_FLAG.to_string());
    Ok(SplitArguments {
        startup,
        flag_files,
    })
}

/// The request's arguments: each flag file's lines, a line that is itself
/// a flag file expanded in its place. Paths are relative to
/// `working_directory`, itself relative to `workspace`; each file is opened
/// beneath `workspace`. Blocking.
pub fn expand_flag_files(
    workspace: &Path,
    working_directory: &Path,
    flag_files: &[String],
) -> Result<Vec<String>, RunError> {
    let root = rustix::fs::open(
        workspace,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RunError::io(format!("opening {}", workspace.display()), e.into()))?;
    let mut arguments = Vec::new();
    let mut budget = MAX_FLAG_FILE_BYTES;
    for path in flag_files {
        expand_into(
            &root,
            working_directory,
            path,
            0,
            &mut budget,
            &mut arguments,
        )?;
    }
    Ok(arguments)
}

fn expand_into(
    root: &OwnedFd,
    working_directory: &Path,
    path: &str,
    depth: usize,
    budget: &mut u64,
    arguments: &mut Vec<String>,
) -> Result<(), RunError> {
    if depth >= MAX_FLAG_FILE_DEPTH {
        return Err(RunError::InvalidArgument(format!(
            "flag file {path:?}: flag files nest deeper than {MAX_FLAG_FILE_DEPTH}"
        )));
    }
    if Path::new(path).is_absolute() {
        return Err(RunError::InvalidArgument(format!(
            "flag file {path:?} is an absolute path; a persistent worker's flag files must be \
             inputs or outputs of the action, relative to its working directory"
        )));
    }
    let relative = working_directory.join(path);
    let fd = rustix::fs::openat2(
        root,
        &relative,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| {
        RunError::InvalidArgument(format!(
            "flag file {path:?} cannot be read within the workspace: {}",
            std::io::Error::from(e)
        ))
    })?;
    let too_much = || {
        RunError::InvalidArgument(format!(
            "flag file {path:?}: the request's flag files come to more than \
             {MAX_FLAG_FILE_BYTES} bytes, nested ones counted each time they are expanded"
        ))
    };
    let mut text = String::new();
    // One byte more than the budget tells a file that does not fit.
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::from(fd), *budget + 1),
        &mut text,
    )
    .map_err(|e| RunError::InvalidArgument(format!("flag file {path:?} is not UTF-8 text: {e}")))?;
    *budget = budget.checked_sub(text.len() as u64).ok_or_else(too_much)?;
    for line in text.lines() {
        match flag_file_of(line) {
            Some(nested) => expand_into(
                root,
                working_directory,
                nested,
                depth + 1,
                budget,
                arguments,
            )?,
            None => arguments.push(line.to_string()),
        }
    }
    Ok(())
}

/// Every input file of the tree under `root`, with its digest (the hash in
/// hex, as Bazel's own workers receive it), paths relative to the input
/// root.
pub fn request_inputs(directories: &DirectoryMap, root: &Digest) -> Vec<Input> {
    fn walk(directories: &DirectoryMap, directory: &Directory, prefix: &str, out: &mut Vec<Input>) {
        for file in &directory.files {
            out.push(Input {
                path: format!("{prefix}{}", file.name),
                digest: file
                    .digest
                    .as_ref()
                    .map(|d| d.hash.clone().into_bytes())
                    .unwrap_or_default(),
            });
        }
        for child in &directory.directories {
            if let Some(sub) = child.digest.as_ref().and_then(|d| directories.get(d)) {
                walk(directories, sub, &format!("{prefix}{}/", child.name), out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(directory) = directories.get(root) {
        walk(directories, directory, "", &mut out);
    }
    out
}

/// What a worker was started with: a later action whose split arguments
/// or environment differ needs another worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    pub startup: Vec<String>,
    pub environment_variables: Vec<(String, String)>,
    pub working_directory: PathBuf,
}

/// Why a worker could not serve a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerFailure {
    /// Its stdout closed: it exited (or closed it).
    Exited,
    /// What it wrote is not a response.
    Malformed(String),
    /// Writing the request failed.
    Unwritable(String),
}

impl fmt::Display for WorkerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerFailure::Exited => write!(f, "exited before answering"),
            WorkerFailure::Malformed(why) => write!(f, "answered with a malformed response: {why}"),
            WorkerFailure::Unwritable(why) => write!(f, "could not be sent the request: {why}"),
        }
    }
}

/// The worker's end of its stdin, and of its stdout.
type Requests = Box<dyn AsyncWrite + Send + Sync + Unpin>;
type Responses = Box<dyn AsyncRead + Send + Sync + Unpin>;

/// A running persistent worker: its pipes, and what kills it and all it
/// started when dropped (its process group, when it is the executor's
/// child, and the `guard` a backend keeps, such as its cgroup or the
/// container that holds it).
pub struct WorkerProcess {
    pub identity: WorkerIdentity,
    protocol: WorkerProtocol,
    /// Its pid, in the namespace it runs in (a container's, maybe).
    pid: u32,
    stdin: Requests,
    stdout: BufReader<Responses>,
    stderr_path: PathBuf,
    /// Requests answered.
    pub served: u64,
    /// The executor's child, when it is one.
    child: Option<Child>,
    guard: Option<Box<dyn Send + Sync>>,
}

impl fmt::Debug for WorkerProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerProcess")
            .field("pid", &self.pid)
            .field("served", &self.served)
            .finish()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.start_kill();
        }
        // The guard (a cgroup) goes after the group is killed. Emptying a
        // cgroup waits for its processes to die: off the async threads
        // (a runner pool drops workers under its lock).
        if let Some(guard) = self.guard.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(guard))),
                Err(_) => drop(guard),
            }
        }
    }
}

/// Where a worker is started, and with what.
#[derive(Debug, Clone)]
pub struct WorkerStart {
    pub identity: WorkerIdentity,
    pub protocol: WorkerProtocol,
    /// Its runner's directory: [`WORKER_STDERR`] goes there.
    pub runner_dir: PathBuf,
}

impl WorkerStart {
    /// Where the worker's stderr goes.
    pub fn stderr_path(&self) -> PathBuf {
        self.runner_dir.join(WORKER_STDERR)
    }

    /// The worker's stderr file, opened for appending (created if need be).
    pub fn open_stderr(&self) -> Result<std::fs::File, RunError> {
        let path = self.stderr_path();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| RunError::io(format!("creating {}", path.display()), e))
    }
}

/// Starts a worker as the executor's own user, in its own process group
/// (`none` without root; `kiln-sandbox` starts the others through its
/// launchers); `spec` gives the environment, working directory and PATH
/// lookup, `start` the arguments. A program that cannot be found is an
/// error naming it. A backend that holds more (a cgroup) adds it with
/// [`WorkerProcess::guarded_by`].
pub async fn spawn(spec: &CommandSpec, start: &WorkerStart) -> Result<WorkerProcess, RunError> {
    let arguments = &start.identity.startup;
    let (name, program) = worker_program(spec, start)?;
    let stderr = start.open_stderr()?;
    let mut command = tokio::process::Command::new(&program);
    command
        .arg0(&name)
        .args(&arguments[1..])
        .env_clear()
        .envs(spec.environment_variables.iter().cloned())
        .current_dir(&spec.working_directory)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| RunError::io(format!("starting persistent worker {name:?}"), e))?;
    let (Some(pid), Some(stdin), Some(stdout)) =
        (child.id(), child.stdin.take(), child.stdout.take())
    else {
        return Err(RunError::Internal(format!(
            "persistent worker {name:?} started without its pipes"
        )));
    };
    let mut worker = WorkerProcess::with_pipes(start, pid, Box::new(stdin), Box::new(stdout));
    worker.child = Some(child);
    Ok(worker)
}

/// The worker's program name (its first startup argument) and where it
/// is, looked up as a shell would from the action's working directory
/// and PATH; a program that cannot be found is an error naming it.
pub fn worker_program(
    spec: &CommandSpec,
    start: &WorkerStart,
) -> Result<(String, PathBuf), RunError> {
    let name = start.identity.startup.first().cloned().unwrap_or_default();
    let program =
        crate::process::resolve_program(&name, &spec.working_directory, spec.path_variable())
            .ok_or_else(|| {
                RunError::InvalidArgument(format!(
                    "persistent worker: its program {name:?} was not found (looked up as a \
                     shell would, from the action's working directory and PATH)"
                ))
            })?;
    Ok((name, program))
}

/// The pipes of a worker that is no child of the executor (started in a
/// container or a sandbox): the ends the worker gets, and the executor's.
pub fn worker_pipes() -> Result<(WorkerEnds, ExecutorEnds), RunError> {
    let pipe = || {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| RunError::Internal(format!("creating a worker's pipe: {e}")))
    };
    let ((stdin_read, stdin_write), (stdout_read, stdout_write)) = (pipe()?, pipe()?);
    Ok((
        WorkerEnds {
            stdin: stdin_read,
            stdout: stdout_write,
        },
        ExecutorEnds {
            stdin: stdin_write,
            stdout: stdout_read,
        },
    ))
}

/// A worker's ends of its pipes (close-on-exec: whatever starts it makes
/// them its stdin and stdout).
pub struct WorkerEnds {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
}

/// The executor's ends of a worker's pipes: requests go in, answers come
/// out.
pub struct ExecutorEnds {
    stdin: OwnedFd,
    stdout: OwnedFd,
}

impl ExecutorEnds {
    /// The worker started by `start`, process `pid`, on these pipes
    /// ([`WorkerProcess::with_pipes`]).
    pub fn worker(self, start: &WorkerStart, pid: u32) -> Result<WorkerProcess, RunError> {
        let watch =
            |e: std::io::Error| RunError::Internal(format!("watching a worker's pipe: {e}"));
        let stdin = tokio::net::unix::pipe::Sender::from_owned_fd(self.stdin).map_err(watch)?;
        let stdout = tokio::net::unix::pipe::Receiver::from_owned_fd(self.stdout).map_err(watch)?;
        Ok(WorkerProcess::with_pipes(
            start,
            pid,
            Box::new(stdin),
            Box::new(stdout),
        ))
    }
}

impl WorkerProcess {
    /// A worker started by `start` that reads requests from `stdin` and
    /// answers on `stdout`, and is no child of the executor: a backend
    /// that started it elsewhere (in a container) stops it through its
    /// [`WorkerProcess::guarded_by`] guard.
    pub fn with_pipes(
        start: &WorkerStart,
        pid: u32,
        stdin: Requests,
        stdout: Responses,
    ) -> WorkerProcess {
        WorkerProcess {
            identity: start.identity.clone(),
            protocol: start.protocol,
            pid,
            stdin,
            stdout: BufReader::new(stdout),
            stderr_path: start.stderr_path(),
            served: 0,
            child: None,
            guard: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Keeps `guard` (a backend's hold on the worker, such as its cgroup)
    /// until the worker is dropped.
    pub fn guarded_by(mut self, guard: Box<dyn Send + Sync>) -> WorkerProcess {
        self.guard = Some(guard);
        self
    }

    /// Sends `request` and reads the response. Not cancel-safe: a caller
    /// that stops waiting must drop the worker.
    pub async fn request(&mut self, request: &WorkRequest) -> Result<WorkResponse, WorkerFailure> {
        let bytes = match self.protocol {
            WorkerProtocol::Proto => request.encode_length_delimited_to_vec(),
            WorkerProtocol::Json => {
                let mut line = to_json(request).into_bytes();
                line.push(b'\n');
                line
            }
        };
        let written = async {
            self.stdin.write_all(&bytes).await?;
            self.stdin.flush().await
        };
        written.await.map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => WorkerFailure::Exited,
            _ => WorkerFailure::Unwritable(e.to_string()),
        })?;
        let response = match self.protocol {
            WorkerProtocol::Proto => self.read_proto().await?,
            WorkerProtocol::Json => self.read_json().await?,
        };
        self.served += 1;
        Ok(response)
    }

    async fn read_proto(&mut self) -> Result<WorkResponse, WorkerFailure> {
        let mut length: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = match self.stdout.read_u8().await {
                Ok(byte) => byte,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(if shift == 0 {
                        WorkerFailure::Exited
                    } else {
                        WorkerFailure::Malformed("stdout ended inside a length prefix".into())
                    })
                }
                Err(e) => return Err(WorkerFailure::Malformed(e.to_string())),
            };
            length |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            if shift >= 63 {
                return Err(WorkerFailure::Malformed(
                    "a length prefix over 10 bytes".into(),
                ));
            }
        }
        if length > MAX_RESPONSE_BYTES {
            return Err(WorkerFailure::Malformed(format!(
                "a length prefix of {length} bytes (at most {MAX_RESPONSE_BYTES})"
            )));
        }
        let mut body = vec![0; length as usize];
        self.stdout.read_exact(&mut body).await.map_err(|_| {
            WorkerFailure::Malformed(format!("stdout ended within a {length}-byte response"))
        })?;
        WorkResponse::decode(body.as_slice())
            .map_err(|e| WorkerFailure::Malformed(format!("not a WorkResponse: {e}")))
    }

    async fn read_json(&mut self) -> Result<WorkResponse, WorkerFailure> {
        let mut line = Vec::new();
        let read = (&mut self.stdout)
            .take(MAX_RESPONSE_BYTES)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| WorkerFailure::Malformed(e.to_string()))?;
        if read == 0 {
            return Err(WorkerFailure::Exited);
        }
        from_json(&line)
    }

    /// The last lines the worker wrote to its stderr.
    pub fn stderr_tail(&self) -> String {
        stderr_tail(&self.stderr_path)
    }
}

/// The last [`STDERR_TAIL_LINES`] lines of the file at `path` (its last
/// 4 KiB at most).
pub fn stderr_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(4096)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n")
}

/// `request` in protobuf's JSON mapping (lowerCamelCase names, bytes in
/// base64, default values left out as protobuf's printer does).
pub fn to_json(request: &WorkRequest) -> String {
    use base64::Engine;
    let mut object = serde_json::Map::new();
    object.insert("arguments".into(), request.arguments.clone().into());
    let inputs: Vec<serde_json::Value> = request
        .inputs
        .iter()
        .map(|input| {
            serde_json::json!({
                "path": input.path,
                "digest": base64::engine::general_purpose::STANDARD.encode(&input.digest),
            })
        })
        .collect();
    object.insert("inputs".into(), inputs.into());
    if request.request_id != 0 {
        object.insert("requestId".into(), request.request_id.into());
    }
    if request.cancel {
        object.insert("cancel".into(), true.into());
    }
    if request.verbosity != 0 {
        object.insert("verbosity".into(), request.verbosity.into());
    }
    if !request.sandbox_dir.is_empty() {
        object.insert("sandboxDir".into(), request.sandbox_dir.clone().into());
    }
    serde_json::Value::Object(object).to_string()
}

/// A `WorkResponse` from one JSON line; protobuf parsers accept the
/// original field names too.
pub fn from_json(line: &[u8]) -> Result<WorkResponse, WorkerFailure> {
    let malformed = |why: String| WorkerFailure::Malformed(why);
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        malformed(format!(
            "not a JSON object ({e}): {:?}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        ))
    })?;
    let object = value
        .as_object()
        .ok_or_else(|| malformed("not a JSON object".into()))?;
    let field = |camel: &str, snake: &str| object.get(camel).or_else(|| object.get(snake));
    let int = |camel: &str, snake: &str| -> Result<i32, WorkerFailure> {
        match field(camel, snake) {
            None | Some(serde_json::Value::Null) => Ok(0),
            Some(value) => value
                .as_i64()
                .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| malformed(format!("{camel} is not a 32-bit integer: {value}"))),
        }
    };
    let output = match field("output", "output") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(other) => return Err(malformed(format!("output is not a string: {other}"))),
    };
    Ok(WorkResponse {
        exit_code: int("exitCode", "exit_code")?,
        output,
        request_id: int("requestId", "request_id")?,
        was_cancelled: matches!(
            field("wasCancelled", "was_cancelled"),
            Some(serde_json::Value::Bool(true))
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> PersistentWorker {
        PersistentWorker {
            key: "javac".into(),
            protocol: WorkerProtocol::Proto,
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flag_files_form_the_request_and_the_rest_starts_the_worker() {
        let split = split_arguments(
            &strings(&[
                "tool",
                "-Xmx1g",
                "@a.params",
                "--flagfile=b",
                "--flagfile",
                "c",
                "@@literal",
                "@repo//x",
            ]),
            &worker(),
        )
        .unwrap();
        assert_eq!(
            split.startup,
            strings(&[
                "tool",
                "-Xmx1g",
                "@@literal",
                "@repo//x",
                "--persistent_worker"
            ])
        );
        assert_eq!(split.flag_files, strings(&["a.params", "b", "c"]));
    }

    #[test]
    fn an_action_without_a_flag_file_is_refused_naming_the_key_and_program() {
        let error = split_arguments(&strings(&["tool", "x"]), &worker()).unwrap_err();
        assert!(matches!(error, RunError::InvalidArgument(_)));
        let message = error.to_string();
        assert!(
            message.contains("persistentWorkerKey=\"javac\""),
            "{message}"
        );
        assert!(message.contains("(tool)"), "{message}");
    }

    #[test]
    fn flag_files_fanning_out_are_refused_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        // Seven levels, each naming the next a thousand times, within the
        // depth limit: 1000^7 lines of the last.
        for level in 0..7 {
            let line = format!("@level{}\n", level + 1);
            std::fs::write(dir.path().join(format!("level{level}")), line.repeat(1000)).unwrap();
        }
        std::fs::write(dir.path().join("level7"), "--flag\n".repeat(1000)).unwrap();
        let error = expand_flag_files(dir.path(), Path::new(""), &["level0".into()]).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&MAX_FLAG_FILE_BYTES.to_string()),
            "{message}"
        );
    }

    #[test]
    fn nested_flag_files_expand_in_place_and_none_leads_out() {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("ws");
        std::fs::create_dir_all(workspace.join("sub")).unwrap();
        std::fs::write(workspace.join("sub/a"), "one\n@b\nthree\n").unwrap();
        std::fs::write(workspace.join("sub/b"), "two\n").unwrap();
        std::fs::write(dir.path().join("secret"), "no\n").unwrap();
        std::os::unix::fs::symlink("../../secret", workspace.join("sub/out")).unwrap();
        let expanded = expand_flag_files(&workspace, Path::new("sub"), &strings(&["a"])).unwrap();
        assert_eq!(expanded, strings(&["one", "two", "three"]));
        let error = expand_flag_files(&workspace, Path::new("sub"), &strings(&["out"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("flag file \"out\""), "{error}");
        let error = expand_flag_files(&workspace, Path::new(""), &strings(&["/etc/passwd"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("absolute"), "{error}");
    }

    #[test]
    fn requests_print_as_protobuf_json_and_responses_parse_from_it() {
        let request = WorkRequest {
            arguments: strings(&["--out=x"]),
            inputs: vec![Input {
                path: "a/b".into(),
                digest: b"ab12".to_vec(),
            }],
            ..Default::default()
        };
        let value: serde_json::Value = serde_json::from_str(&to_json(&request)).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"arguments": ["--out=x"], "inputs": [{"path": "a/b", "digest": "YWIxMg=="}]})
        );
        let response = from_json(br#"{"exitCode": 3, "output": "hi", "requestId": 0}"#).unwrap();
        assert_eq!((response.exit_code, response.output.as_str()), (3, "hi"));
        assert_eq!(from_json(b"{}").unwrap(), WorkResponse::default());
        assert!(matches!(
            from_json(b"nonsense"),
            Err(WorkerFailure::Malformed(_))
        ));
        assert!(matches!(
            from_json(br#"{"exitCode": "x"}"#),
            Err(WorkerFailure::Malformed(_))
        ));
    }

    #[test]
    fn messages_use_bazels_field_numbers() {
        // WorkResponse{exit_code: 1 (field 1, varint), output: "o" (field 2)}
        let response = WorkResponse::decode(&[0x08, 0x01, 0x12, 0x01, b'o'][..]).unwrap();
        assert_eq!((response.exit_code, response.output.as_str()), (1, "o"));
        let request = WorkRequest {
            arguments: strings(&["a"]),
            inputs: vec![Input {
                path: "p".into(),
                digest: b"d".to_vec(),
            }],
            request_id: 0,
            ..Default::default()
        };
        assert_eq!(
            request.encode_to_vec(),
            vec![0x0a, 0x01, b'a', 0x12, 0x06, 0x0a, 0x01, b'p', 0x12, 0x01, b'd']
        );
    }
}
