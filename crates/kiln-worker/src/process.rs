//! Running one child process under a deadline, shared by every isolation
//! backend: program lookup as a shell does it, the child in its own process
//! group, and the stop sequence (SIGTERM to the group, a grace period, then
//! SIGKILL to the group) on timeout or cancellation.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustix::process::kill_process_group;
pub use rustix::process::{Pid, Signal};
use tokio_util::sync::CancellationToken;

use crate::error::RunError;

/// Exit code a shell gives a command it cannot find.
pub const EXIT_COMMAND_NOT_FOUND: i32 = 127;
/// Exit code a shell gives a command it cannot execute.
pub const EXIT_CANNOT_EXECUTE: i32 = 126;

/// How long the action may run and how a stop is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall time from spawn to the polite stop.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Memory the action may use (`EstimatedMemory`, else the executor's
    /// limit); enforced by backends with cgroups or a container runtime.
    pub memory_bytes: Option<u64>,
    /// CPU time per second of wall time, in thousandths of a core
    /// (`EstimatedCPU`); a quota, enforced like `memory_bytes`.
    pub cpu_millis: Option<u64>,
    /// Most processes (and threads) the action may have at once.
    pub pids_max: Option<u64>,
}

/// Why a process was stopped by the executor rather than ending by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Timeout,
    Cancelled,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// The exit code, or 128 + signal number for a process killed by a signal.
    pub exit_code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Set when the executor stopped it (timeout or cancellation).
    pub stopped: Option<StopReason>,
    /// The kernel killed it for exceeding `Limits::memory_bytes`.
    pub memory_exceeded: bool,
}

impl ProcessOutcome {
    /// A process that ended by itself with `exit_code`.
    pub fn exited(exit_code: i32) -> ProcessOutcome {
        ProcessOutcome {
            exit_code,
            signal: None,
            stopped: None,
            memory_exceeded: false,
        }
    }
}

/// Resolves `arguments[0]` as a shell would: a name with a `/` is taken
/// relative to the working directory; a bare name is looked up in `path`
/// (the Command's `PATH`, else the executor's), whose relative entries are
/// relative to the working directory too.
pub fn resolve_program(
    program: &str,
    working_directory: &Path,
    path: Option<&str>,
) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        let candidate = working_directory.join(program);
        return candidate.exists().then_some(candidate);
    }
    let search = path
        .map(str::to_string)
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for entry in search.split(':') {
        let dir = if entry.is_empty() {
            working_directory.to_path_buf()
        } else {
            working_directory.join(entry)
        };
        let candidate = dir.join(program);
        if let Ok(metadata) = std::fs::metadata(&candidate) {
            if metadata.is_file() && metadata.permissions().mode() & 0o111 != 0 {
                return Some(candidate);
            }
        }
    }
    None
}

/// Writes a message where the action's stderr goes, for failures the
/// executor reports as the action's own (command not found).
pub fn write_stderr(stderr_path: &Path, message: &str) -> Result<(), RunError> {
    std::fs::write(stderr_path, message)
        .map_err(|e| RunError::io(format!("writing {}", stderr_path.display()), e))
}

/// The fields of `/proc/PID/stat` after the process's name, which is in
/// brackets and may hold anything: field N of proc(5) is at N - 3, so the
/// state comes first, then the parent's pid, the process group, ...
/// NotFound when there is no such process.
pub fn stat_fields(pid: u32) -> std::io::Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (_, rest) = stat.rsplit_once(')').ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: no name"),
        )
    })?;
    Ok(rest.split_whitespace().map(str::to_string).collect())
}

/// Whether process `pid` is running: it exists and is not a zombie.
pub fn is_running(pid: u32) -> bool {
    stat_fields(pid).is_ok_and(|fields| fields.first().is_some_and(|state| state != "Z"))
}

/// Runs `work` on the blocking pool; `what` names it if the task dies.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, RunError> + Send + 'static,
) -> Result<T, RunError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| RunError::Internal(format!("{what}: {e}")))?
}

/// A started process [`supervise_process`] can wait for: tokio's `Child`,
/// or one a backend started its own way (cloned into namespaces). It must
/// lead its own process group, which is what gets signalled.
#[async_trait::async_trait]
pub trait Process: Send {
    /// Its pid, which is also its process group; `None` once reaped.
    fn id(&self) -> Option<u32>;
    /// Waits until it ends and reaps it. Cancel-safe: may be called again.
    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus>;
    /// Sends `signal` (SIGTERM or SIGKILL) to `group`, the process group
    /// it leads (or led, once reaped: what is left of it). By default
    /// from this process, which may signal it: a child running as the
    /// executor's own user. A backend whose processes run as another user
    /// sends it the way it may (a root executor's launchers), and may
    /// skip a reaped one's group where nothing of it can be left (a pid
    /// namespace or cgroup ended it). ESRCH, a group already gone, is
    /// what was wanted.
    fn signal_group(&self, group: Pid, signal: Signal) {
        let _ = kill_process_group(group, signal);
    }
}

/// The process being supervised, whose group is killed when this is
/// dropped, so no child outlives the future that owns it (a dropped run,
/// a panic).
struct Supervised<P: Process> {
    child: P,
    group: Option<Pid>,
}

impl<P: Process> Supervised<P> {
    fn signal(&self, signal: Signal) {
        if let Some(group) = self.group {
            self.child.signal_group(group, signal);
        }
    }
}

impl<P: Process> Drop for Supervised<P> {
    fn drop(&mut self) {
        self.signal(Signal::KILL);
    }
}

#[async_trait::async_trait]
impl Process for tokio::process::Child {
    fn id(&self) -> Option<u32> {
        tokio::process::Child::id(self)
    }

    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        tokio::process::Child::wait(self).await
    }
}

/// Spawns `command` in a process group of its own with stdin closed, and
/// waits for it under `limits`. On timeout or cancellation the group gets
/// SIGTERM, then SIGKILL after the grace period. When the leader is gone,
/// whatever is left of its group is killed too. `stderr_path` receives the
/// reason when the program cannot be started at all.
pub async fn supervise(
    mut command: tokio::process::Command,
    program: &str,
    stderr_path: &Path,
    limits: &Limits,
    cancel: &CancellationToken,
) -> Result<ProcessOutcome, RunError> {
    command.process_group(0).stdin(Stdio::null());
    let child = match spawn_past_busy_text(&mut command).await {
        Ok(child) => child,
        Err(error) => {
            let (code, what) = match error.kind() {
                std::io::ErrorKind::NotFound => (EXIT_COMMAND_NOT_FOUND, "command not found"),
                std::io::ErrorKind::PermissionDenied => (EXIT_CANNOT_EXECUTE, "permission denied"),
                _ => return Err(RunError::io(format!("starting {program:?}"), error)),
            };
            write_stderr(stderr_path, &format!("kiln: {program}: {what} ({error})\n"))?;
            return Ok(ProcessOutcome::exited(code));
        }
    };
    supervise_process(child, program, limits, cancel).await
}

/// How often, and how far apart, a start refused with ETXTBSY is retried.
pub const BUSY_TEXT_RETRIES: u32 = 50;
/// The pause between those retries: at most 100 ms in all.
pub const BUSY_TEXT_PAUSE: Duration = Duration::from_millis(2);

/// Starts `command`, retrying while the kernel answers ETXTBSY ("text file
/// busy"). An executable is busy while any process holds it open for
/// writing, and a fork made in this process at the moment another thread
/// writes an input file (the input cache, a workspace) carries that
/// writable descriptor until the forked child execs: for those
/// microseconds, an action started from that file is refused. Bazel and
/// Go's os/exec meet the same race; a short bounded retry outlasts it.
async fn spawn_past_busy_text(
    command: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let mut retries = BUSY_TEXT_RETRIES;
    loop {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && retries > 0 => {
                retries -= 1;
                tokio::time::sleep(BUSY_TEXT_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Waits for an already started `child` (leading its own process group)
/// under `limits`, with the same stop sequence as [`supervise`].
pub async fn supervise_process(
    child: impl Process,
    program: &str,
    limits: &Limits,
    cancel: &CancellationToken,
) -> Result<ProcessOutcome, RunError> {
    let group = child.id().and_then(|id| Pid::from_raw(id as i32));
    let mut process = Supervised { child, group };
    let wait_error = |e| RunError::io(format!("waiting for {program:?}"), e);

    let stopped = tokio::select! {
        status = process.child.wait() => {
            let status = status.map_err(wait_error)?;
            process.signal(Signal::KILL);
            return Ok(outcome(status, None));
        }
        _ = tokio::time::sleep(limits.timeout) => StopReason::Timeout,
        _ = cancel.cancelled() => StopReason::Cancelled,
    };
    tracing::debug!(program, ?stopped, "stopping the process group");
    process.signal(Signal::TERM);
    let status = tokio::select! {
        status = process.child.wait() => status.map_err(wait_error)?,
        _ = tokio::time::sleep(limits.grace) => {
            process.signal(Signal::KILL);
            process.child.wait().await.map_err(wait_error)?
        }
    };
    process.signal(Signal::KILL);
    Ok(outcome(status, Some(stopped)))
}

fn outcome(status: std::process::ExitStatus, stopped: Option<StopReason>) -> ProcessOutcome {
    match (status.code(), status.signal()) {
        (Some(code), _) => ProcessOutcome {
            exit_code: code,
            signal: None,
            stopped,
            memory_exceeded: false,
        },
        (None, Some(signal)) => ProcessOutcome {
            exit_code: 128 + signal,
            signal: Some(signal),
            stopped,
            memory_exceeded: false,
        },
        (None, None) => ProcessOutcome {
            exit_code: -1,
            signal: None,
            stopped,
            memory_exceeded: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_program_busy_for_a_moment_still_starts() {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("tool");
        let mut writer = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&program)
            .unwrap();
        writer.write_all(b"#!/bin/sh\nexit 7\n").unwrap();
        // Open for writing, the file cannot be executed: this is the state
        // a fork elsewhere leaves it in until that fork execs.
        let busy = std::process::Command::new(&program).status().unwrap_err();
        assert_eq!(busy.kind(), std::io::ErrorKind::ExecutableFileBusy);
        let release = std::thread::spawn(move || {
            std::thread::sleep(BUSY_TEXT_PAUSE * 5);
            drop(writer);
        });
        let limits = Limits {
            timeout: Duration::from_secs(30),
            grace: Duration::from_secs(1),
            memory_bytes: None,
            cpu_millis: None,
            pids_max: None,
        };
        let outcome = supervise(
            tokio::process::Command::new(&program),
            "tool",
            &dir.path().join("stderr"),
            &limits,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        release.join().unwrap();
        assert_eq!(outcome, ProcessOutcome::exited(7));
    }

    #[test]
    fn programs_resolve_like_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("bin").join("tool");
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("bin").join("plain");
        std::fs::write(&plain, "not executable").unwrap();

        // With a '/': relative to the working directory, PATH not consulted.
        assert_eq!(
            resolve_program("bin/tool", dir.path(), Some("/nowhere")),
            Some(tool.clone())
        );
        assert_eq!(resolve_program("./missing", dir.path(), None), None);
        // A bare name: the given PATH, relative entries from the working directory.
        assert_eq!(
            resolve_program("tool", dir.path(), Some("/nowhere:bin")),
            Some(tool)
        );
        assert_eq!(resolve_program("plain", dir.path(), Some("bin")), None);
        assert_eq!(resolve_program("sh", dir.path(), Some("/nowhere")), None);
        // No PATH in the Command: the executor's own.
        assert!(resolve_program("sh", dir.path(), None).is_some());
        assert_eq!(resolve_program("", dir.path(), None), None);
    }
}
