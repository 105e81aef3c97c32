//! Warm container runners (`recycle-runner=true` under `docker` and
//! `podman`): one container per runner, started once with Kiln's agent
//! (`agent/main.rs`, embedded here as a static executable) as its
//! command, and kept for the next action with the same runner key. Each
//! action is then started by the agent inside the container, over a Unix
//! socket, without the container engine: a warm action costs a fork and
//! an exec, not a `docker exec` (~50 ms here) or a new container.
//!
//! What a runner container keeps between actions: everything outside the
//! workspace (its writable layer: `/tmp`, installed packages) and every
//! process an action left running (a database a test started, say),
//! frozen through the container's freezer cgroup while the runner waits
//! and thawed for its next action. The workspace itself is the runner's
//! directory on the host, bind-mounted at the same path and emptied or
//! preserved between actions by the executor (`kiln_worker::runners`).
//!
//! The socket is made by the agent in a directory of the runner's own,
//! bind-mounted into the container; the executor connects once, right
//! after the start, and the agent removes the socket and takes no other
//! connection. Every action of the runner goes over that one connection,
//! so nothing an action later does to that directory (a symlink in place
//! of the socket, say) is ever followed by the executor. The action's
//! stdout and stderr are the executor's capture pipes, passed with the
//! request (SCM_RIGHTS).
//!
//! Timeout and cancellation: SIGTERM to the action's process group, SIGKILL
//! after the grace; a runner whose action was stopped, failed or was
//! OOM-killed is not kept, and dropping a [`RunnerContainer`] removes its
//! container.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kiln_worker::persistent::{WorkerProcess, WorkerStart};
use kiln_worker::{
    CancellationToken, CommandSpec, Limits, ProcessOutcome, Resident, RunError, StopReason,
};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::UnixStream;

/// The agent, built by `build.rs`.
const AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln-agent"));

/// Where the agent is mounted in a runner container (read-only).
pub const AGENT_PATH: &str = "/.kiln/agent";
/// Where the runner's socket directory is mounted in its container.
pub const AGENT_DIR: &str = "/.kiln/run";
/// The socket's name in that directory.
const SOCKET: &str = "agent.sock";

/// How long a new runner container's agent may take to listen.
const AGENT_START: Duration = Duration::from_secs(30);
/// How long after SIGKILL the agent may take to answer.
const KILL_ANSWER: Duration = Duration::from_secs(30);
/// A frame larger than this from the agent is a broken agent.
const MAX_ANSWER: usize = 64 * 1024;

/// The agent's executable on the host, and the runners' socket
/// directories beside it, in a directory only the executor's user (root)
/// can enter: no process of the host (a `none` action as the action user,
/// say) can reach a runner's socket directory, though that directory must
/// be writable by whatever user its container runs as.
///
/// The directory is named after the agent's content and the user
/// (`$TMPDIR/kiln-agent-UID-HASH`), so every executor process of one build
/// shares one copy and none leaves a copy of its own behind. One that
/// exists already is used only if it is a real directory of this user
/// that no one else may enter.
#[derive(Debug)]
pub struct AgentFile {
    dir: PathBuf,
    path: PathBuf,
}

impl AgentFile {
    pub fn write() -> std::io::Result<AgentFile> {
        AgentFile::write_in(&std::env::temp_dir())
    }

    /// The directory [`AgentFile::write`] uses for a process of `uid`:
    /// what a docker gate lets that process bind (see [`crate::gate`]).
    pub fn dir_for(uid: u32) -> PathBuf {
        AgentFile::dir_in(&std::env::temp_dir(), uid)
    }

    fn dir_in(base: &Path, uid: u32) -> PathBuf {
        use sha2::Digest as _;
        let hash = hex::encode(&sha2::Sha256::digest(AGENT)[..8]);
        base.join(format!("kiln-agent-{uid}-{hash}"))
    }

    fn write_in(base: &Path) -> std::io::Result<AgentFile> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let uid = rustix::process::geteuid().as_raw();
        let dir = AgentFile::dir_in(base, uid);
        match std::fs::create_dir(&dir) {
            Ok(()) => std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let meta = std::fs::symlink_metadata(&dir)?;
        if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
            return Err(std::io::Error::other(format!(
                "{} is not a directory of uid {uid} closed to other users; remove it",
                dir.display()
            )));
        }
        let path = dir.join("agent");
        if std::fs::read(&path).ok().as_deref() != Some(AGENT) {
            let temporary = dir.join(format!("agent.{}.tmp", std::process::id()));
            std::fs::write(&temporary, AGENT)?;
            std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o555))?;
            std::fs::rename(&temporary, &path)?;
        }
        std::fs::create_dir_all(dir.join("runs"))?;
        Ok(AgentFile { dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new runner container `name`'s socket directory (empty, writable
    /// by any user its image runs as), mounted at [`AGENT_DIR`].
    pub fn runner_dir(&self, name: &str) -> Result<RunnerDir, RunError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir.join("runs").join(name);
        std::fs::create_dir(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)))
            .map_err(|e| RunError::Internal(format!("creating {}: {e}", dir.display())))?;
        Ok(RunnerDir(dir))
    }
}

/// A runner's socket directory on the host; deleted when dropped.
#[derive(Debug)]
pub struct RunnerDir(PathBuf);

impl RunnerDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunnerDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's command line in the container: its socket.
pub fn agent_command() -> Vec<String> {
    vec![AGENT_PATH.into(), format!("{AGENT_DIR}/{SOCKET}")]
}

/// A runner's container, connected to its agent.
pub struct RunnerContainer {
    /// The container's name, for messages.
    name: String,
    stream: UnixStream,
    /// Bytes read from the agent that are not yet a whole frame.
    received: Vec<u8>,
    /// The image's ENTRYPOINT, put before each action's arguments (as a
    /// fresh container would).
    entrypoint: Vec<String>,
    /// The container's memory cgroup file counting OOM kills, if found.
    oom_events: Option<PathBuf>,
    /// The container's freezer, if found: it is frozen between actions.
    freezer: Option<Freezer>,
    /// Removes the container (and releases what it held).
    removal: Removal,
    /// Not yet asked by [`Resident::take_fresh`].
    fresh: bool,
    _dir: RunnerDir,
}

/// How a runner's container is removed: now ([`Removal::now`]), or in
/// the background when dropped.
pub struct Removal(Option<RemoveFn>);

type RemoveFn = Box<
    dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;

impl Removal {
    pub fn new<F, R>(remove: F) -> Removal
    where
        F: FnOnce() -> R + Send + Sync + 'static,
        R: std::future::Future<Output = ()> + Send + 'static,
    {
        Removal(Some(Box::new(move || Box::pin(remove()))))
    }

    /// Removes it, returning once it is gone.
    pub async fn now(mut self) {
        if let Some(remove) = self.0.take() {
            remove().await;
        }
    }
}

impl Drop for Removal {
    /// Removes it in the background, counted in [`removals_finished`].
    fn drop(&mut self) {
        if let Some(remove) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let pending = PendingRemoval::new();
                    drop(runtime.spawn(async move {
                        remove().await;
                        drop(pending);
                    }))
                }
                Err(_) => tracing::warn!("a runner container outlived the runtime; the next start of this executor removes it"),
            }
        }
    }
}

/// [`removals_finished`] within a minute, warning if some are still going
/// (the next start of the executor sweeps them).
pub async fn settle_removals() {
    if !removals_finished(Duration::from_secs(60)).await {
        tracing::warn!(
            "runner containers still being removed after a minute; the next start of this \
             executor removes what is left"
        );
    }
}

/// Containers being removed in the background (their runners dropped:
/// a failed action's, an evicted or expired one), in this process.
static BACKGROUND_REMOVALS: AtomicUsize = AtomicUsize::new(0);
static REMOVALS_DONE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// One of [`BACKGROUND_REMOVALS`], until dropped: when its removal ends,
/// or when its task is dropped unfinished (its runtime shut down).
struct PendingRemoval;

impl PendingRemoval {
    fn new() -> PendingRemoval {
        BACKGROUND_REMOVALS.fetch_add(1, Ordering::SeqCst);
        PendingRemoval
    }
}

impl Drop for PendingRemoval {
    fn drop(&mut self) {
        if BACKGROUND_REMOVALS.fetch_sub(1, Ordering::SeqCst) == 1 {
            REMOVALS_DONE.notify_waiters();
        }
    }
}

/// Returns once no runner container of this process is being removed in
/// the background, or after `limit`: what a stopping executor waits for,
/// so the containers of runners dropped just before it stopped do not
/// outlive it. False if some were still going at the limit.
pub async fn removals_finished(limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        loop {
            let done = REMOVALS_DONE.notified();
            if BACKGROUND_REMOVALS.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    })
    .await
    .is_ok()
}

impl std::fmt::Debug for RunnerContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerContainer")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for RunnerContainer {
    /// A frozen container is thawed first: its processes must be able to
    /// die when the engine removes it.
    fn drop(&mut self) {
        self.resume();
    }
}

/// A container's freezer cgroup: `freezer.state` under cgroup v1,
/// `cgroup.freeze` under v2. Written directly, not through the engine
/// (`docker pause` is a daemon round trip), and the engine does not know:
/// [`RunnerContainer`] thaws before it is removed.
#[derive(Debug)]
pub(crate) struct Freezer {
    file: PathBuf,
    v2: bool,
}

impl Freezer {
    /// The freezer of process `pid`'s cgroup, if this host has one.
    fn of(pid: u32) -> Option<Freezer> {
        cgroup_file(pid, "freezer", "freezer.state", "cgroup.freeze")
            .map(|(file, v2)| Freezer { file, v2 })
    }

    /// The file that freezes process `pid`'s cgroup: what a docker gate
    /// gives an executor that is not root (see [`crate::gate`]).
    pub(crate) fn file_of(pid: u32) -> Option<PathBuf> {
        Freezer::of(pid).map(|freezer| freezer.file)
    }

    fn set(&self, frozen: bool) {
        let value = match (self.v2, frozen) {
            (true, true) => "1",
            (true, false) => "0",
            (false, true) => "FROZEN",
            (false, false) => "THAWED",
        };
        if let Err(error) = std::fs::write(&self.file, value) {
            tracing::debug!(file = %self.file.display(), %error, "could not set a runner container's freezer");
        }
    }
}

/// What the agent answered about an action or a worker.
enum Answer {
    Exited(i32),
    Signaled(i32),
    /// A worker was started with this pid (in the container).
    Started(u32),
}

/// A backend whose warm runners are containers: how it starts one for
/// `spec` (its image and parameters, the agent as its command). The rest
/// of the runner's life is [`RunnerContainer`]'s, the same for both.
#[async_trait]
pub trait StartsRunners: Send + Sync {
    async fn start_runner(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<RunnerContainer, RunError>;
}

/// The runner in `resident`, started by `backend` when there is none yet.
async fn started<'r>(
    backend: &dyn StartsRunners,
    resident: &'r mut Option<Box<dyn Resident>>,
    spec: &CommandSpec,
    limits: &Limits,
    cancel: &CancellationToken,
) -> Result<&'r mut Box<dyn Resident>, RunError> {
    Ok(match resident {
        Some(runner) => runner,
        None => resident.insert(Box::new(backend.start_runner(spec, limits, cancel).await?)),
    })
}

/// `Isolation::run_in_runner` of a container backend: the action in the
/// runner's container, started first when the runner has none.
pub async fn run_in_runner(
    backend: &dyn StartsRunners,
    spec: &CommandSpec,
    limits: &Limits,
    cancel: &CancellationToken,
    resident: &mut Option<Box<dyn Resident>>,
) -> Result<ProcessOutcome, RunError> {
    started(backend, resident, spec, limits, cancel)
        .await?
        .run(spec, limits, cancel)
        .await
}

/// `Isolation::start_worker_in_runner` of a container backend: the
/// worker in the runner's container, started first when the runner has
/// none (its image was pulled in `prepare`).
pub async fn start_worker_in_runner(
    backend: &dyn StartsRunners,
    spec: &CommandSpec,
    start: &WorkerStart,
    limits: &Limits,
    resident: &mut Option<Box<dyn Resident>>,
) -> Result<WorkerProcess, RunError> {
    let cancel = CancellationToken::new();
    started(backend, resident, spec, limits, &cancel)
        .await?
        .start_worker(spec, start)
        .await
}

/// Kills a worker the agent started (its process group) when dropped,
/// over a duplicate of the runner's connection: a short frame on a
/// connection no one else writes to meanwhile (a runner serves one action
/// at a time).
struct WorkerKill {
    connection: std::os::unix::net::UnixStream,
    pid: u32,
}

impl Drop for WorkerKill {
    fn drop(&mut self) {
        use std::io::Write as _;
        let frame = encode(&[b"kill", self.pid.to_string().as_bytes()]);
        if let Err(error) = (&self.connection).write_all(&frame) {
            tracing::debug!(pid = self.pid, %error, "could not ask the agent to kill a worker");
        }
    }
}

impl RunnerContainer {
    /// Connects to the agent of container `name` (host pid `pid`), whose
    /// socket directory on the host is `dir`. `removal` removes the
    /// container when the runner is discarded, or at once if connecting
    /// fails.
    pub async fn connect(
        name: String,
        pid: u32,
        dir: RunnerDir,
        entrypoint: Vec<String>,
        removal: Removal,
    ) -> Result<RunnerContainer, RunError> {
        let shown = dir.path().join(SOCKET);
        // Through the directory's descriptor: its path may be longer than
        // a socket address can hold (108 bytes).
        let dir_fd = std::fs::File::open(dir.path())
            .map_err(|e| RunError::Internal(format!("opening {}: {e}", shown.display())))?;
        let socket = format!("/proc/self/fd/{}/{SOCKET}", dir_fd.as_raw_fd());
        let deadline = tokio::time::Instant::now() + AGENT_START;
        let mut pause = Duration::from_millis(1);
        let stream = loop {
            let error = match UnixStream::connect(&socket).await {
                Ok(stream) => break stream,
                Err(error) => error,
            };
            // Not there yet, or not listening yet: the agent is starting.
            let starting = matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            );
            let alive = Path::new(&format!("/proc/{pid}")).exists();
            if !starting || !alive || tokio::time::Instant::now() >= deadline {
                // `removal` is dropped on the way out: the container goes.
                return Err(RunError::Internal(format!(
                    "runner container {name}: its agent did not listen at {} ({error}){}",
                    shown.display(),
                    if alive {
                        ""
                    } else {
                        "; the container has ended"
                    }
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        };
        drop(dir_fd);
        Ok(RunnerContainer {
            name,
            stream,
            received: Vec::new(),
            entrypoint,
            oom_events: oom_events_file(pid),
            freezer: Freezer::of(pid),
            removal,
            fresh: true,
            _dir: dir,
        })
    }

    /// Sends `fields` as one frame, with `fds` alongside its first byte.
    async fn send(&self, fields: &[&[u8]], fds: &[OwnedFd]) -> std::io::Result<()> {
        let frame = encode(fields);
        let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut sent = self
            .stream
            .async_io(Interest::WRITABLE, || {
                let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
                if !borrowed.is_empty()
                    && !control.push(rustix::net::SendAncillaryMessage::ScmRights(&borrowed))
                {
                    return Err(std::io::Error::other("too many descriptors"));
                }
                rustix::net::sendmsg(
                    &self.stream,
                    &[IoSlice::new(&frame)],
                    &mut control,
                    rustix::net::SendFlags::NOSIGNAL,
                )
                .map_err(std::io::Error::from)
            })
            .await?;
        while sent < frame.len() {
            let written = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    rustix::net::send(
                        &self.stream,
                        &frame[sent..],
                        rustix::net::SendFlags::NOSIGNAL,
                    )
                    .map_err(std::io::Error::from)
                })
                .await?;
            sent += written;
        }
        Ok(())
    }

    /// The agent's next answer. Cancel-safe: what was read stays buffered.
    async fn answer(&mut self) -> Result<Answer, RunError> {
        loop {
            if let Some(fields) = self.take_frame()? {
                let text = |at: usize| {
                    fields
                        .get(at)
                        .map(|f| String::from_utf8_lossy(f).to_string())
                        .unwrap_or_default()
                };
                let number = |at: usize| text(at).parse::<i32>().ok();
                return match (text(0).as_str(), number(1)) {
                    ("exited", Some(code)) => Ok(Answer::Exited(code)),
                    ("signaled", Some(signal)) => Ok(Answer::Signaled(signal)),
                    ("started", Some(pid)) if pid > 0 => Ok(Answer::Started(pid as u32)),
                    ("failed", _) => Err(RunError::Internal(format!(
                        "runner container {}: its agent could not start the action: {}",
                        self.name,
                        text(1)
                    ))),
                    _ => Err(self.broken("an answer it does not understand")),
                };
            }
            let read = self
                .stream
                .read_buf(&mut self.received)
                .await
                .map_err(|e| self.broken(&format!("reading its answer: {e}")))?;
            if read == 0 {
                return Err(self.broken("the container ended during the action"));
            }
        }
    }

    fn take_frame(&mut self) -> Result<Option<Vec<Vec<u8>>>, RunError> {
        let Some(header) = self.received.get(..4) else {
            return Ok(None);
        };
        let length = u32::from_le_bytes(header.try_into().expect("four bytes")) as usize;
        if length > MAX_ANSWER {
            return Err(self.broken("an oversized answer"));
        }
        if self.received.len() < 4 + length {
            return Ok(None);
        }
        let body: Vec<u8> = self.received.drain(..4 + length).skip(4).collect();
        decode(&body)
            .map(Some)
            .ok_or_else(|| self.broken("a malformed answer"))
    }

    fn broken(&self, what: &str) -> RunError {
        RunError::Internal(format!("runner container {}: agent: {what}", self.name))
    }

    /// OOM kills in the container's memory cgroup so far.
    fn oom_kills(&self) -> u64 {
        let Some(path) = &self.oom_events else {
            return 0;
        };
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    async fn signal(&self, signal: i32) -> Result<(), RunError> {
        self.send(&[b"signal", signal.to_string().as_bytes()], &[])
            .await
            .map_err(|e| self.broken(&format!("sending signal {signal}: {e}")))
    }
}

#[async_trait]
impl Resident for RunnerContainer {
    async fn run(
        &mut self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        let (stdout, stderr) = spec.output_fds()?;
        let command = self.command_fields(
            &spec.working_directory,
            &spec.arguments,
            &spec.environment_variables,
        );
        let mut fields: Vec<&[u8]> = vec![b"run"];
        fields.extend(command.iter().map(Vec::as_slice));
        // Only an action with a memory limit can be OOM-killed by it.
        let watch_oom = limits.memory_bytes.is_some();
        let oom_before = if watch_oom { self.oom_kills() } else { 0 };
        self.send(&fields, &[stdout, stderr])
            .await
            .map_err(|e| self.broken(&format!("sending the action: {e}")))?;
        let waited = tokio::select! {
            answer = self.answer() => Ok(answer),
            _ = tokio::time::sleep(limits.timeout) => Err(StopReason::Timeout),
            _ = cancel.cancelled() => Err(StopReason::Cancelled),
        };
        let (answer, stopped) = match waited {
            Ok(answer) => (answer, None),
            Err(reason) => {
                self.signal(15).await?;
                let answer = match tokio::time::timeout(limits.grace, self.answer()).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        self.signal(9).await?;
                        tokio::time::timeout(KILL_ANSWER, self.answer())
                            .await
                            .map_err(|_| self.broken("no answer after SIGKILL"))?
                    }
                };
                (answer, Some(reason))
            }
        };
        let memory_exceeded = watch_oom && self.oom_kills() > oom_before;
        let answer = match answer {
            Ok(answer) => answer,
            // The agent itself was killed for memory: the action's doing.
            Err(_) if memory_exceeded => Answer::Signaled(9),
            Err(error) => return Err(error),
        };
        let (exit_code, signal) = match answer {
            Answer::Exited(code) => (code, None),
            Answer::Signaled(signal) => (128 + signal, Some(signal)),
            Answer::Started(_) => return Err(self.broken("a worker's answer to an action")),
        };
        Ok(ProcessOutcome {
            exit_code,
            signal,
            stopped,
            memory_exceeded: memory_exceeded && stopped.is_none() && exit_code != 0,
        })
    }

    async fn discard(mut self: Box<Self>) {
        self.resume();
        let removal = std::mem::replace(&mut self.removal, Removal(None));
        removal.now().await;
    }

    fn pause(&self) {
        if let Some(freezer) = &self.freezer {
            freezer.set(true);
        }
    }

    fn resume(&self) {
        if let Some(freezer) = &self.freezer {
            freezer.set(false);
        }
    }

    fn take_fresh(&mut self) -> bool {
        std::mem::replace(&mut self.fresh, false)
    }

    /// The container's memory cgroup usage (page cache included, as the
    /// kernel charges it to the container).
    fn memory_bytes(&self) -> u64 {
        let Some(events) = &self.oom_events else {
            return 0;
        };
        let usage = match events.file_name().and_then(|n| n.to_str()) {
            Some("memory.events") => "memory.current",
            _ => "memory.usage_in_bytes",
        };
        events
            .parent()
            .and_then(|dir| std::fs::read_to_string(dir.join(usage)).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The worker runs as the container's actions do (its user, its
    /// image's ENTRYPOINT before the arguments), with pipes of the
    /// executor's as its stdin and stdout and the runner's worker-stderr
    /// file as its stderr; the agent does not wait for it.
    async fn start_worker(
        &mut self,
        spec: &CommandSpec,
        start: &WorkerStart,
    ) -> Result<WorkerProcess, RunError> {
        let (worker_ends, executor_ends) = kiln_worker::persistent::worker_pipes()?;
        let stderr = OwnedFd::from(start.open_stderr()?);
        let command = self.command_fields(
            &spec.working_directory,
            &start.identity.startup,
            &spec.environment_variables,
        );
        let mut fields: Vec<&[u8]> = vec![b"start"];
        fields.extend(command.iter().map(Vec::as_slice));
        self.send(&fields, &[worker_ends.stdin, worker_ends.stdout, stderr])
            .await
            .map_err(|e| self.broken(&format!("sending the worker: {e}")))?;
        let name = start.identity.startup.first().cloned().unwrap_or_default();
        let pid = match self.answer().await? {
            Answer::Started(pid) => pid,
            Answer::Exited(_) | Answer::Signaled(_) => {
                return Err(RunError::InvalidArgument(format!(
                    "persistent worker {name:?} could not be started in runner container {}: {}",
                    self.name,
                    kiln_worker::persistent::stderr_tail(&start.stderr_path())
                )))
            }
        };
        let connection =
            self.stream.as_fd().try_clone_to_owned().map_err(|e| {
                RunError::Internal(format!("duplicating the agent's connection: {e}"))
            })?;
        let kill = WorkerKill {
            connection: std::os::unix::net::UnixStream::from(connection),
            pid,
        };
        Ok(executor_ends.worker(start, pid)?.guarded_by(Box::new(kill)))
    }
}

impl RunnerContainer {
    /// A `run` or `start` frame's fields after its name: the working
    /// directory, the image's ENTRYPOINT and `arguments`, and
    /// `environment`.
    fn command_fields(
        &self,
        working_directory: &Path,
        arguments: &[String],
        environment: &[(String, String)],
    ) -> Vec<Vec<u8>> {
        let mut fields = vec![
            working_directory.as_os_str().as_bytes().to_vec(),
            (self.entrypoint.len() + arguments.len())
                .to_string()
                .into_bytes(),
        ];
        fields.extend(
            self.entrypoint
                .iter()
                .chain(arguments)
                .map(|a| a.as_bytes().to_vec()),
        );
        fields.extend(
            environment
                .iter()
                .map(|(name, value)| format!("{name}={value}").into_bytes()),
        );
        fields
    }
}

fn encode(fields: &[&[u8]]) -> Vec<u8> {
    let size: usize = fields.iter().map(|f| 4 + f.len()).sum();
    let mut frame = Vec::with_capacity(4 + size);
    frame.extend_from_slice(&(size as u32).to_le_bytes());
    for field in fields {
        frame.extend_from_slice(&(field.len() as u32).to_le_bytes());
        frame.extend_from_slice(field);
    }
    frame
}

fn decode(body: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut fields = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let size = u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize;
        fields.push(body.get(at + 4..at + 4 + size)?.to_vec());
        at += 4 + size;
    }
    Some(fields)
}

/// The file counting OOM kills in the memory cgroup of process `pid`:
/// `memory.oom_control` under cgroup v1, `memory.events` under v2.
fn oom_events_file(pid: u32) -> Option<PathBuf> {
    cgroup_file(pid, "memory", "memory.oom_control", "memory.events").map(|(file, _)| file)
}

/// A file of process `pid`'s cgroup for `controller`: `v1_file` in the
/// controller's v1 hierarchy, or else `v2_file` in the unified one, if it
/// exists; and whether it is the v2 one.
fn cgroup_file(
    pid: u32,
    controller: &str,
    v1_file: &str,
    v2_file: &str,
) -> Option<(PathBuf, bool)> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let relative = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == controller) {
            let file = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(relative)
                .join(v1_file);
            return file.exists().then_some((file, false));
        }
        if controllers.is_empty() {
            let file = Path::new("/sys/fs/cgroup").join(relative).join(v2_file);
            if file.exists() {
                return Some((file, true));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_agent_is_shared_and_never_taken_from_a_directory_others_may_enter() {
        let base = tempfile::tempdir().unwrap();
        let first = AgentFile::write_in(base.path()).unwrap();
        assert_eq!(std::fs::read(first.path()).unwrap(), AGENT);
        let second = AgentFile::write_in(base.path()).unwrap();
        assert_eq!(second.path(), first.path(), "one copy per build");
        let runner = second.runner_dir("kiln-test").unwrap();
        assert!(runner.path().is_dir());
        let gone = runner.path().to_path_buf();
        drop(runner);
        assert!(!gone.exists(), "a runner's directory goes with it");

        // Opened to others (as someone else's planted directory would be):
        // refused, naming it.
        let dir = first.path().parent().unwrap().to_path_buf();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = AgentFile::write_in(base.path()).unwrap_err().to_string();
        assert!(error.contains(&dir.display().to_string()), "{error}");
    }
}
