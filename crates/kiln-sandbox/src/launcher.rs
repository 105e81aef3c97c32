//! Launchers: the processes that start actions on a root executor.
//!
//! `kiln launcher` is a small single-threaded process the executor starts
//! from its own binary ([`install`]: one per CPU, at least two for one
//! that becomes a user of its own), with an empty
//! environment and a Unix stream socket as its stdin. Its first message is
//! its policy ([`crate::launch::Policy`]), from root. Then the executor
//! sends one a [`Launch`] and an [`Exec`] per action (and per persistent
//! worker), the descriptors the action needs alongside (stdio, the
//! cgroup's `cgroup.procs` files, a network namespace; SCM_RIGHTS); the
//! launcher checks the launch against its policy, plans it, clones the
//! action with [`child::spawn`] and answers with its pid once it has
//! exec'd. It also takes the executor's other root-only steps that
//! have moved behind it ([`crate::privileged`]: mounting and detaching
//! workspace overlays, giving directories to an action's user and taking
//! back what it made), each checked to be that step and nothing more, and
//! under the work root its policy names alone; and it makes
//! and wires the network namespaces of bridged actions ([`wire`]).
//!
//! Why processes of their own:
//! - **Nothing of the executor reaches a starting action.** A clone copies
//!   the caller's descriptor table, and in the executor that table holds
//!   whatever its other threads have open: inputs being written to the
//!   file cache, CAS blobs, client sockets. A launcher holds its socket
//!   and stdio only, so an action never starts with a copy of an input
//!   open for writing (Bazel's ETXTBSY race: an action refused its own
//!   just-written tool) or of anything else of the executor's.
//! - **The process that serves gRPC does not fork actions.** A launcher
//!   keeps none of the executor's memory either (it is a fresh exec: no
//!   keys, tokens or registry passwords in it), and it is where the
//!   executor's root is to be confined.
//!
//! Actions are cloned with `CLONE_PARENT`: they are the executor's
//! children, so it waits for them and reads their exit status as before,
//! and a launcher never waits for anything. Their process groups run as
//! other users, whom the executor (keeping no CAP_KILL) cannot signal:
//! a stop goes through a launcher ([`signal_group`]), which signals only
//! the group of a child of the executor, and only with SIGTERM or SIGKILL;
//! what is left in a v1 action cgroup is killed the same way
//! ([`kill_cgroup`]).
//! Each launcher serves one request at a time and waits for the action's
//! exec (a sandbox's setup takes a millisecond or two), so the executor
//! sends to an idle one.
//!
//! Faults: a launcher exits when its socket closes, so it never outlives
//! the executor. If one dies (`kill -9`), a root executor notices at the
//! next request sent to it, logs the exit and starts another; an action
//! whose start was under way is given back for another attempt
//! ([`start_error`]). An executor that became a user of its own
//! ([`crate::run_as`]) cannot start a root process: [`keep_running`]
//! watches its launchers and has a running one start each replacement.
//!
//! Where no launcher is installed (the crate's own tests, a non-root
//! executor, which starts `none` actions itself), [`start`] clones in the
//! calling process.

use std::ffi::CString;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, TryLockError};

use kiln_worker::users::ActionUsers;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::child::{self, Exec, Network, Plan, SpawnFailure, Stack, Start, Stdio};
use crate::launch::{Enforced, Kind, Launch, Planner, Policy};
use crate::network;
use crate::privileged;
use crate::view::c_path;

/// The subcommand of the executor's binary that runs [`serve`].
pub const SUBCOMMAND: &str = "launcher";

/// Most descriptors one request carries: stdio, a `cgroup.procs` per
/// cgroup v1 controller, a network namespace.
const MAX_FDS: usize = 16;
/// Largest request: the kernel's own limit on arguments and environment
/// is 2 MiB by default; a plan is a few KiB.
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// Most launchers an executor keeps.
const MAX_LAUNCHERS: usize = 8;

static LAUNCHERS: OnceLock<Launchers> = OnceLock::new();

/// The policy every launcher gets as its first message
/// ([`crate::launch::Policy`]), as that message's bytes: for the launchers
/// a root executor starts again.
static POLICY_GIVEN: OnceLock<Vec<u8>> = OnceLock::new();

/// Starts the launchers from `program` (the executor's own binary, run as
/// `program launcher`), one per CPU (at most [`MAX_LAUNCHERS`]) and at
/// least `at_least`, each under `policy`, and makes [`start`] use them
/// from now on. Returns their pids. Once per process, as root: later
/// calls return the running ones' (a different policy is refused).
pub fn install(program: &Path, at_least: usize, policy: &Policy) -> io::Result<Vec<u32>> {
    let bytes = encode_policy(policy);
    if *POLICY_GIVEN.get_or_init(|| bytes.clone()) != bytes {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the launchers were installed under another policy",
        ));
    }
    if let Some(launchers) = LAUNCHERS.get() {
        return Ok(launchers.pids());
    }
    let count = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_LAUNCHERS)
        .max(at_least);
    let slots = (0..count)
        .map(|_| Connection::start(program).map(|c| Mutex::new(Some(c))))
        .collect::<io::Result<Vec<_>>>()?;
    let launchers = Launchers {
        program: program.to_path_buf(),
        slots,
        next: AtomicUsize::new(0),
    };
    if let Err(extra) = LAUNCHERS.set(launchers) {
        // Another thread installed some first: these ones go.
        for slot in extra.slots {
            if let Some(connection) = slot.into_inner().unwrap_or_else(PoisonError::into_inner) {
                connection.end();
            }
        }
    }
    Ok(LAUNCHERS.get().map(Launchers::pids).unwrap_or_default())
}

/// Whether root's steps are taken for this process: by its launchers
/// (it may itself run as a user of its own, see [`crate::run_as`]), or by
/// itself, as root.
pub fn root_behind() -> bool {
    LAUNCHERS.get().is_some() || rustix::process::geteuid().is_root()
}

/// The pids of the installed launchers; empty when none are.
pub fn pids() -> Vec<u32> {
    LAUNCHERS.get().map(Launchers::pids).unwrap_or_default()
}

/// Starts `launch` `how`: through a launcher when they are installed,
/// which checks it against its policy and plans it itself; else in this
/// process, planned by `local`. The pid returned is this process's
/// child either way. A child whose setup failed is reaped here. A
/// launcher that died with the request is `ConnectionAborted` (see
/// [`start_error`]).
pub(crate) fn start(
    launch: Launch,
    local: &Planner,
    exec: &Exec,
    stdio: &Stdio,
    how: Start,
) -> io::Result<libc::pid_t> {
    let spawned = match LAUNCHERS.get() {
        Some(launchers) => launchers.start(&launch, exec, stdio, how),
        None => local
            .plan(launch)
            .and_then(|plan| Ok((plan, Stack::new()?)))
            .map_err(SpawnFailure::from)
            .and_then(|(plan, mut stack)| child::spawn(&plan, exec, stdio, how, false, &mut stack)),
    };
    spawned.map_err(|failure| {
        if let Some(pid) = failure.unreaped {
            let mut status = 0;
            // SAFETY: reaps our own child, which has exited or is exiting
            // after its failed setup.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
        failure.error
    })
}

/// Takes a root-only step of a workspace (see [`crate::privileged`]): in a
/// launcher when they are installed, else in this process. A launcher that
/// died with the request is `ConnectionAborted`.
pub(crate) fn privileged(request: &privileged::Request) -> io::Result<()> {
    let what = match request {
        privileged::Request::Mount { .. } => "mounting a workspace overlay",
        privileged::Request::Detach(_) => "detaching a workspace overlay",
        privileged::Request::Give { .. } => "giving workspace directories to a user",
        privileged::Request::TakeBack { .. } => "taking back what an action's user made",
        privileged::Request::Confine(_) => "checking the launchers' work root",
        privileged::Request::Signal { .. } => "signalling an action's process group",
        privileged::Request::KillCgroup(_) => "killing what is left in an action cgroup",
    };
    ask(&encode_privileged(request), what).unwrap_or_else(|| request.perform())
}

/// Sends `signal` (SIGTERM or SIGKILL) to the process group of `leader`,
/// an action this process started and has not reaped (see
/// [`privileged::signal_group`]): through a launcher when they are
/// installed, since the action runs as another user and the executor
/// keeps no CAP_KILL; else from this process. An action already gone is
/// no error. Blocking, and brief: a launcher answers between starts.
pub(crate) fn signal_group(leader: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    match privileged(&privileged::Request::Signal { leader, signal }) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other,
    }
}

/// SIGKILLs every process in the action cgroup `directory` (see
/// [`privileged::kill_cgroup`]): through a launcher when they are
/// installed, else from this process. For v1 hierarchies, which have no
/// `cgroup.kill`. Blocking.
pub(crate) fn kill_cgroup(directory: &Path) -> io::Result<()> {
    privileged(&privileged::Request::KillCgroup(crate::view::c_path(
        directory,
    )))
}

/// Wires a bridged action's network namespace in a launcher (see
/// [`network::wire`], on the launcher's one thread, which then
/// returns to the host's namespace): the namespace and the index of the
/// host's end of its pair. None where no launcher is installed.
pub(crate) fn wire(base: u32, slots: u32, start: u32) -> Option<io::Result<(OwnedFd, u32)>> {
    let launchers = LAUNCHERS.get()?;
    let wired = launchers
        .call(
            &wire_request(base, slots, start),
            &[],
            "wiring a network namespace",
        )
        .map_err(|failure| failure.error)
        .and_then(|(host_index, fds)| {
            let namespace = fds
                .into_iter()
                .next()
                .ok_or_else(|| io::Error::other("the launcher answered without the namespace"))?;
            Ok((namespace, host_index as u32))
        });
    Some(wired)
}

/// Deletes a bridged action's interface `host_index` (see
/// [`network::unwire`]) through a launcher, returning once it is deleted.
/// None where no launcher is installed. Blocking: 20-40 ms, which holds
/// that launcher up; only for an interface that outlived its namespace's
/// release (see [`network::Outbound::release`]).
pub(crate) fn unwire(host_index: u32) -> Option<io::Result<()>> {
    ask(&unwire_request(host_index), "deleting a network interface")
}

/// A [`Request::Wire`]'s bytes.
fn wire_request(base: u32, slots: u32, start: u32) -> Vec<u8> {
    let mut out = Writer::default();
    out.u8(WIRE);
    out.u32(base);
    out.u32(slots);
    out.u32(start);
    out.0
}

/// A [`Request::Unwire`]'s bytes.
fn unwire_request(host_index: u32) -> Vec<u8> {
    let mut out = Writer::default();
    out.u8(UNWIRE);
    out.u32(host_index);
    out.0
}

/// Deletes, in a launcher, the interfaces of executors that are gone.
/// None where no launcher is installed.
pub(crate) fn reclaim_networks() -> Option<io::Result<()>> {
    ask(
        &[RECLAIM_NETWORKS],
        "deleting the interfaces of gone executors",
    )
}

/// Sends `request` (`what`, in errors) to a launcher and returns whether
/// it was done; None where no launcher is installed.
fn ask(request: &[u8], what: &str) -> Option<io::Result<()>> {
    let launchers = LAUNCHERS.get()?;
    Some(
        launchers
            .call(request, &[], what)
            .map(drop)
            .map_err(|failure| failure.error),
    )
}

/// Launchers a process that [`keep_running`] serves needs at least: one
/// to start another in place of one that died.
pub const TO_KEEP_RUNNING: usize = 2;

/// How long [`keep_running`] waits before trying again to start a
/// launcher it could not.
const RESTART_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// For an executor that is not root (a user of its own, see
/// [`crate::run_as`]), which cannot start a root process: keeps its
/// launchers running (install at least [`TO_KEEP_RUNNING`] of them).
/// Each one that exits is reaped, logged, and replaced by one that a
/// running launcher starts for it ([`Request::StartLauncher`]), confined
/// as the others. Returns, with
/// the reason, once none is left to start more, or at once where no
/// launcher is installed. Blocks for as long as launchers run: call it on
/// a thread of its own.
pub fn keep_running() -> String {
    let Some(launchers) = LAUNCHERS.get() else {
        return "no launcher was started".to_string();
    };
    let mut failing = false;
    loop {
        let mut missing = false;
        for slot in &launchers.slots {
            if lock(slot).is_some() {
                continue;
            }
            match launchers.start_through_another() {
                Ok(started) => {
                    tracing::warn!(pid = started.pid, "started a new launcher through another");
                    failing = false;
                    let mut slot = lock(slot);
                    match slot.as_ref() {
                        None => *slot = Some(started),
                        Some(_) => drop(started.end()),
                    }
                }
                Err(error) => {
                    missing = true;
                    if !failing {
                        tracing::error!(%error, "could not start a launcher in place of one that exited; trying again every second");
                    }
                    failing = true;
                }
            }
        }
        // Each running launcher's pidfd, copied, so that a request that
        // finds one dead meanwhile may end it.
        let watched: Vec<(usize, libc::pid_t, OwnedFd)> = (launchers.slots.iter().enumerate())
            .filter_map(|(i, slot)| {
                let slot = lock(slot);
                let current = slot.as_ref()?;
                Some((i, current.pid, current.pidfd.try_clone().ok()?))
            })
            .collect();
        if watched.is_empty() {
            return "every launcher has exited, and a process that is not root cannot start \
                    another"
                .to_string();
        }
        let mut polled: Vec<libc::pollfd> = watched
            .iter()
            .map(|(_, _, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let timeout = if missing {
            RESTART_PAUSE.as_millis() as libc::c_int
        } else {
            -1
        };
        // SAFETY: poll over descriptors `watched` keeps open.
        if unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) } < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return format!("watching the launchers: {error}");
            }
        }
        for ((i, pid, _), polled) in watched.iter().zip(&polled) {
            if polled.revents == 0 {
                continue;
            }
            let mut slot = lock(&launchers.slots[*i]);
            if slot.as_ref().is_some_and(|current| current.pid == *pid) {
                let status = slot.take().map(Connection::end).unwrap_or_default();
                tracing::error!(pid, status, "a launcher exited");
            }
        }
    }
}

/// `mutex`, locked, whether or not a thread panicked holding it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a failed [`start`] of `what` means for the action: a launcher that
/// died with the request lets another attempt run it
/// (`ExecutorUnavailable`, which the scheduler retries); anything else is
/// this executor's failure.
pub(crate) fn start_error(what: &str, error: io::Error, hint: &str) -> kiln_worker::RunError {
    failure(format!("starting {what}: {error}{hint}"), &error)
}

/// A request's failure `error`, described by `message`, as the action
/// sees it: given back for another attempt when the launcher died with
/// the request (`ConnectionAborted`), else this executor's failure.
pub(crate) fn failure(message: String, error: &io::Error) -> kiln_worker::RunError {
    if error.kind() == io::ErrorKind::ConnectionAborted {
        kiln_worker::RunError::ExecutorUnavailable(message)
    } else {
        kiln_worker::RunError::Internal(message)
    }
}

/// The executor's side: its launchers, each serving one request at a time
/// and started again when found dead. Several, so that one action's
/// setup (a sandbox's mounts, a millisecond or two, during which its
/// launcher waits for the exec) does not hold up the others' starts.
struct Launchers {
    program: PathBuf,
    /// `None` after the launcher was found dead.
    slots: Vec<Mutex<Option<Connection>>>,
    /// Which launcher to wait for when all are busy.
    next: AtomicUsize,
}

struct Connection {
    socket: UnixStream,
    /// A child of this process: one it started, or one a launcher started
    /// for it ([`Request::StartLauncher`], a sibling, so this process's
    /// child too). Reaped by [`Connection::end`] alone.
    pid: libc::pid_t,
    /// Readable once the launcher has exited: what [`keep_running`]
    /// waits on.
    pidfd: OwnedFd,
}

impl Connection {
    fn start(program: &Path) -> io::Result<Connection> {
        let (socket, theirs) = UnixStream::pair()?;
        let process = Command::new(program)
            .arg0("kiln")
            .arg(SUBCOMMAND)
            .env_clear()
            .stdin(OwnedFd::from(theirs))
            // Its own group: a terminal's ^C goes to the executor, which
            // stops cleanly, not to the launcher.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "starting the launcher ({} {SUBCOMMAND}): {e}",
                        program.display()
                    ),
                )
            })?;
        // Reaped by `end`, through its pid: the Child is not waited for.
        let started = Connection::adopt(socket, process.id() as libc::pid_t)?;
        let policy = POLICY_GIVEN.get().map(Vec::as_slice).unwrap_or_default();
        if let Err(error) = give_policy(&started.socket, policy, None) {
            let status = started.end();
            return Err(io::Error::new(
                error.kind(),
                format!("giving a new launcher its policy ({status}): {error}"),
            ));
        }
        Ok(started)
    }

    /// Takes charge of the launcher `pid`, a child of this process that
    /// serves `socket`.
    fn adopt(socket: UnixStream, pid: libc::pid_t) -> io::Result<Connection> {
        // SAFETY: pidfd_open of an unreaped child returns a new descriptor
        // (or -1), owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let error = io::Error::last_os_error();
            drop(socket);
            reap(pid);
            return Err(error);
        }
        Ok(Connection {
            socket,
            pid,
            // SAFETY: a fresh descriptor nobody else owns.
            pidfd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
        })
    }

    /// Why the launcher ended, reaping it. It exits when its socket
    /// closes; one that is stuck is killed, where this process may (as
    /// root: a user of its own cannot signal a launcher).
    fn end(self) -> String {
        drop(self.socket);
        // SAFETY: a signal to our own unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        reap(self.pid)
    }
}

/// Waits for child `pid` to exit and reaps it; its status, described.
fn reap(pid: libc::pid_t) -> String {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    // SAFETY: a blocking waitpid on our own child.
    let reaped = loop {
        match unsafe { libc::waitpid(pid, &mut status, 0) } {
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            reaped => break reaped,
        }
    };
    if reaped == pid {
        std::process::ExitStatus::from_raw(status).to_string()
    } else {
        format!("status unknown: {}", io::Error::last_os_error())
    }
}

impl Launchers {
    fn pids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter_map(|slot| {
                let slot = lock(slot);
                slot.as_ref().map(|c| c.pid as u32)
            })
            .collect()
    }

    /// A new launcher, started by a running one ([`start_sibling`]), which
    /// gave it its own policy.
    fn start_through_another(&self) -> io::Result<Connection> {
        let (pid, fds) = self
            .call(&[START_LAUNCHER], &[], "starting another launcher")
            .map_err(|failure| {
                if let Some(pid) = failure.unreaped {
                    reap(pid);
                }
                failure.error
            })?;
        let Some(socket) = fds.into_iter().next() else {
            reap(pid);
            return Err(io::Error::other(
                "the launcher answered without the new one's socket",
            ));
        };
        Connection::adopt(UnixStream::from(socket), pid)
    }

    fn start(
        &self,
        launch: &Launch,
        exec: &Exec,
        stdio: &Stdio,
        start: Start,
    ) -> Result<libc::pid_t, SpawnFailure> {
        let (request, fds) = encode(launch, exec, stdio, start);
        // SAFETY: the caller keeps these descriptors open for the call.
        let fds: Vec<BorrowedFd> = fds
            .iter()
            .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
            .collect();
        self.call(&request, &fds, "starting an action")
            .map(|(pid, _)| pid)
    }

    /// Sends `request` (with `fds`) to an idle launcher, else the next in
    /// turn, and returns its answer. `what` names the request in errors.
    fn call(
        &self,
        request: &[u8],
        fds: &[BorrowedFd],
        what: &str,
    ) -> Result<(libc::pid_t, Vec<OwnedFd>), SpawnFailure> {
        // A launcher found dead is replaced, except by an executor that is
        // not root (see `crate::run_as`), which uses the others.
        let replaceable = rustix::process::geteuid().is_root();
        let usable = |slot: &Option<Connection>| replaceable || slot.is_some();
        let idle = self.slots.iter().find_map(|slot| {
            let guard = match slot.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return None,
            };
            usable(&guard).then_some(guard)
        });
        let count = self.slots.len();
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let mut connection = idle
            .or_else(|| {
                (0..count)
                    .map(|i| lock(&self.slots[(turn + i) % count]))
                    .find(|guard| usable(guard))
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "every launcher has exited, and an executor that is not root cannot start \
                     another: it stops",
                )
            })?;
        let mut restarted = false;
        loop {
            let current = match connection.as_mut() {
                Some(current) => current,
                None if !replaceable => {
                    // Found dead by this request: a launcher this executor
                    // started would not be root.
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the launcher has exited; the others take the next requests while \
                         one of them starts another",
                    )
                    .into());
                }
                None => {
                    let started = Connection::start(&self.program)?;
                    tracing::warn!(pid = started.pid, "started a new launcher");
                    connection.insert(started)
                }
            };
            match send(&current.socket, request, fds) {
                Ok(()) => {}
                // Dead before the request: nothing was done, so a new
                // launcher may take it, once.
                Err(e) if !restarted && is_disconnect(&e) => {
                    if let Some(dead) = connection.take() {
                        let pid = dead.pid;
                        tracing::error!(pid, status = dead.end(), "the launcher had exited");
                    }
                    restarted = true;
                    continue;
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("the launcher: {e}")).into()),
            }
            return match read_reply(&current.socket) {
                Ok(reply) => reply,
                Err(e) => {
                    let ended = connection.take().map(|dead| (dead.pid, dead.end()));
                    let (pid, status) = ended.unwrap_or((0, String::new()));
                    tracing::error!(pid, status, error = %e, "the launcher exited while {what}");
                    // Not done, or (an action started) killed with its
                    // cgroup: another attempt may run the action.
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!(
                            "the launcher (pid {pid}) exited while {what} ({status}); \
                             the next request gets a new one"
                        ),
                    )
                    .into())
                }
            };
        }
    }
}

fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// The launcher's main: serves requests from stdin (the socket) until it
/// closes. Single-threaded, as it must stay: see the module's doc.
pub fn serve() -> io::Result<()> {
    // SAFETY: close_range, fcntl, open and dup2 on this process's own
    // descriptors.
    let socket = unsafe {
        // Whatever the executor's parent let it inherit, this keeps none.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let fd = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        // Stopping is the executor's business: it closes the socket.
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(signal, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, c"kiln-launcher".as_ptr(), 0, 0, 0);
        UnixStream::from(OwnedFd::from_raw_fd(fd))
    };
    // Where a wiring returns to (see `Request::Wire` below).
    let host_network = std::fs::File::open("/proc/self/ns/net")?;
    // Its parent is its executor for good (it ends when the executor
    // does): the executor's interfaces' alias, and what its join files
    // are checked against.
    let executor = rustix::process::getppid().map(|pid| pid.as_raw_nonzero().get());
    let alias = executor
        .and_then(|pid| network::alias_of(pid as u32))
        .ok_or_else(executor_gone);
    let mut executor = executor.map(privileged::Executor::new);
    let alias = || {
        alias
            .as_deref()
            .map_err(|e| io::Error::new(e.kind(), e.to_string()))
    };
    // One child at a time, so one stack for all of them.
    let mut stack = Stack::new()?;
    let mut confinement = privileged::Confinement::default();
    // The first message is the policy, from root: the executor before it
    // became a user of its own, or the launcher that started this one.
    // A launcher that starts this one hands over the work root it holds.
    let (policy_bytes, enforced) = match read_request(&socket)? {
        None => return Ok(()),
        Some((request, mut fds)) => {
            let taken = decode_policy(&request).and_then(|policy| {
                confinement.confine_held(&c_path(&policy.work_root), fds.pop())?;
                Enforced::new(policy, host_network.as_fd())
            });
            match taken {
                Ok(enforced) => {
                    write_reply(&socket, &Ok(0), None)?;
                    (request, enforced)
                }
                Err(error) => {
                    eprintln!("kiln launcher: refused its first message as a policy: {error}");
                    write_reply(&socket, &Err(error.into()), None)?;
                    return Err(io::Error::other("no policy"));
                }
            }
        }
    };
    while let Some((request, fds)) = read_request(&socket)? {
        let mut answer = None;
        let reply = match decode(&request, &fds) {
            Ok(Request::Start(mut launch, exec, stdio, start)) => {
                // Kept open until the child has exec'd.
                let mut reopened = Vec::new();
                let mut held = Vec::new();
                let planned = enforced
                    .check(&mut launch, &confinement)
                    .and_then(|()| enforced.take_paths(&mut launch, &confinement))
                    .inspect_err(|error| eprintln!("kiln launcher: refused a start: {error}"))
                    .and_then(|(trees, opened)| {
                        held = opened;
                        enforced.planner.plan_from(*launch, trees)
                    })
                    .and_then(|mut plan| {
                        let executor = executor.as_mut().ok_or_else(executor_gone)?;
                        join_files_as_root(&mut plan, &mut reopened, executor)?;
                        Ok(plan)
                    });
                planned
                    .map_err(Into::into)
                    .and_then(|plan| child::spawn(&plan, &exec, &stdio, start, true, &mut stack))
            }
            Ok(Request::Policy) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a launcher takes its policy once, as it starts",
            )
            .into()),
            Ok(Request::Privileged(step)) => step
                .perform_within(&mut confinement)
                .map(|()| 0)
                .map_err(Into::into),
            Ok(Request::Wire { base, slots, start }) => {
                // On this, the launcher's only thread (no thread to start
                // and end per wiring), which then goes back to the host's
                // namespace before anything else runs here; a launcher
                // that cannot is of no more use, and ends.
                let wired = alias().and_then(|alias| network::wire(base, slots, start, alias));
                rustix::thread::move_into_link_name_space(
                    host_network.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                wired
                    .map(|(namespace, host_index)| {
                        answer = Some(namespace);
                        host_index as libc::pid_t
                    })
                    .map_err(Into::into)
            }
            Ok(Request::Unwire { host_index }) => alias()
                .and_then(|alias| network::unwire(host_index, alias))
                .map(|()| 0)
                .map_err(Into::into),
            Ok(Request::ReclaimNetworks) => {
                network::reclaim_leftovers();
                Ok(0)
            }
            Ok(Request::StartLauncher) => {
                let held = confinement.held();
                start_sibling(&mut stack, &enforced, &policy_bytes, held).map(|(pid, socket)| {
                    answer = Some(socket);
                    pid
                })
            }
            Err(error) => Err(error.into()),
        };
        // The action has its copies; the launcher keeps none.
        drop(fds);
        write_reply(&socket, &reply, answer.as_ref())?;
    }
    Ok(())
}

/// Starts another launcher from this one's binary, as its executor would
/// ([`Connection::start`]: its own process group, an empty environment,
/// the socket as its stdin, `policy` as its first message), but as the
/// executor's child (`CLONE_PARENT`), which waits for it: how an
/// executor that is not root gets a launcher (see [`keep_running`]). Its
/// pid, and the executor's end of its socket, handed over once the new
/// launcher has taken the policy.
fn start_sibling(
    stack: &mut Stack,
    enforced: &Enforced,
    policy: &[u8],
    work_root: Option<BorrowedFd>,
) -> Result<(libc::pid_t, OwnedFd), SpawnFailure> {
    let (ours, theirs) = UnixStream::pair()?;
    let plan = (enforced.planner).plan(Launch::plain(Path::new("/"), None, Vec::new()))?;
    let exec = Exec::new(
        Path::new("/proc/self/exe"),
        &["kiln".to_string(), SUBCOMMAND.to_string()],
        &[],
    )?;
    // Its stdout and stderr are this launcher's, the executor's own.
    let stdio = Stdio {
        stdin: theirs.as_raw_fd(),
        stdout: 1,
        stderr: 2,
    };
    let pid = child::spawn(&plan, &exec, &stdio, Start::Cloned, true, stack)?;
    drop(theirs);
    if let Err(error) = give_policy(&ours, policy, work_root) {
        // The executor reaps it, as its child.
        // SAFETY: a signal to the process just started, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return Err(SpawnFailure {
            error,
            unreaped: Some(pid),
        });
    }
    Ok((pid, OwnedFd::from(ours)))
}

/// Sends a new launcher its policy, its first message, and waits for it
/// to take it; with `work_root`, the work root held open by the launcher
/// that starts this one, which the new one takes rather than opening the
/// path again (its directories may have been changed since by the
/// executor).
fn give_policy(
    socket: &UnixStream,
    policy: &[u8],
    work_root: Option<BorrowedFd>,
) -> io::Result<()> {
    send(socket, policy, work_root.as_slice())?;
    read_reply(socket)?
        .map(drop)
        .map_err(|failure| failure.error)
}

/// Replaces the cgroup join files of `plan` that the executor opened as a
/// user of its own with the same files opened as root
/// ([`privileged::join_file_as_root`]), kept in `reopened`.
fn join_files_as_root(
    plan: &mut Plan,
    reopened: &mut Vec<OwnedFd>,
    executor: &mut privileged::Executor,
) -> io::Result<()> {
    for fd in plan.cgroup_join.iter_mut() {
        // SAFETY: the request's descriptors stay open until it is answered.
        let sent = unsafe { BorrowedFd::borrow_raw(*fd) };
        if let Some(file) = privileged::join_file_as_root(sent, executor)? {
            *fd = file.as_raw_fd();
            reopened.push(file);
        }
    }
    Ok(())
}

fn executor_gone() -> io::Error {
    io::Error::other("the executor is gone")
}

/// Sends one request: its length, then its bytes, the descriptors
/// alongside the first.
fn send(socket: &UnixStream, request: &[u8], fds: &[BorrowedFd]) -> io::Result<()> {
    let length = (request.len() as u32).to_le_bytes();
    send_parts(socket, &[&length, request], fds)
}

/// Reads one request and its descriptors; `None` when the executor closed
/// the socket.
fn read_request(socket: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let (length, fds) = match receive_bytes::<4>(socket) {
        Ok(received) => received,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    let length = u32::from_le_bytes(length) as usize;
    if length > MAX_REQUEST_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a request of {length} bytes, above the {MAX_REQUEST_BYTES} allowed"),
        ));
    }
    let mut request = vec![0; length];
    (&*socket).read_exact(&mut request)?;
    Ok(Some((request, fds)))
}

/// The answer: the pid (or another number a request returns), or an errno
/// and the pid of a child that failed its setup (0 for none), which the
/// executor reaps; with `descriptor` alongside when a request returns one
/// (a network namespace).
fn write_reply(
    socket: &UnixStream,
    reply: &Result<libc::pid_t, SpawnFailure>,
    descriptor: Option<&OwnedFd>,
) -> io::Result<()> {
    let (pid, errno, unreaped) = match reply {
        Ok(pid) => (*pid, 0, 0),
        Err(failure) => (
            0,
            failure
                .error
                .raw_os_error()
                .unwrap_or(match failure.error.kind() {
                    io::ErrorKind::InvalidInput => libc::EINVAL,
                    io::ErrorKind::PermissionDenied => libc::EPERM,
                    _ => libc::EIO,
                }),
            failure.unreaped.unwrap_or(0),
        ),
    };
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&pid.to_le_bytes());
    bytes[4..8].copy_from_slice(&errno.to_le_bytes());
    bytes[8..].copy_from_slice(&unreaped.to_le_bytes());
    let fds: Vec<BorrowedFd> = descriptor.iter().map(|fd| fd.as_fd()).collect();
    send_parts(socket, &[&bytes], &fds)
}

/// The answer [`write_reply`] wrote, and the descriptors that came with it.
#[allow(clippy::type_complexity)]
fn read_reply(
    socket: &UnixStream,
) -> io::Result<Result<(libc::pid_t, Vec<OwnedFd>), SpawnFailure>> {
    let (bytes, fds) = receive_bytes::<12>(socket)?;
    let field =
        |at: usize| i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let (pid, errno, unreaped) = (field(0), field(4), field(8));
    Ok(if errno == 0 {
        Ok((pid, fds))
    } else {
        Err(SpawnFailure {
            error: io::Error::from_raw_os_error(errno),
            unreaped: (unreaped > 0).then_some(unreaped),
        })
    })
}

/// Sends `parts` one after the other, in one message where the socket's
/// buffer takes them, with `fds` alongside the first byte.
fn send_parts(socket: &UnixStream, parts: &[&[u8]], fds: &[BorrowedFd]) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let slices: Vec<IoSlice> = parts.iter().map(|part| IoSlice::new(part)).collect();
    let sent = rustix::net::sendmsg(socket, &slices, &mut control, SendFlags::NOSIGNAL)?;
    // What the first call did not take (a request larger than the
    // socket's buffer), without the descriptors already sent.
    let mut skip = sent;
    for part in parts {
        let mut remaining = &part[skip.min(part.len())..];
        skip = skip.saturating_sub(part.len());
        while !remaining.is_empty() {
            let written = rustix::net::send(socket, remaining, SendFlags::NOSIGNAL)?;
            remaining = &remaining[written..];
        }
    }
    Ok(())
}

/// Receives `N` bytes and the descriptors sent with them; EOF before the
/// first byte is `UnexpectedEof`.
fn receive_bytes<const N: usize>(socket: &UnixStream) -> io::Result<([u8; N], Vec<OwnedFd>)> {
    let mut bytes = [0u8; N];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(&mut bytes)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if received.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    (&*socket).read_exact(&mut bytes[received.bytes..])?;
    Ok((bytes, fds))
}

/// What a launcher is asked, as it decodes it.
enum Request {
    Start(Box<Launch>, Exec, Stdio, Start),
    /// A policy after the first message, which is refused.
    Policy,
    Privileged(privileged::Request),
    /// Wire a bridged action's network namespace
    /// ([`network::wire`]); answered with its host-side
    /// interface's index and the namespace's descriptor.
    Wire {
        base: u32,
        slots: u32,
        start: u32,
    },
    /// Delete a bridged action's interface ([`network::unwire`]).
    Unwire {
        host_index: u32,
    },
    /// Delete the interfaces of executors that are gone.
    ReclaimNetworks,
    /// Start another launcher for an executor that is not root
    /// ([`start_sibling`]); answered with its pid and the executor's end
    /// of its socket.
    StartLauncher,
}

/// Each request's first byte: what it asks.
const START_CLONED: u8 = 0;
const START_WITH_INIT: u8 = 1;
const MOUNT_OVERLAY: u8 = 2;
const DETACH: u8 = 3;
const GIVE: u8 = 4;
const TAKE_BACK: u8 = 5;
const CONFINE: u8 = 6;
const SIGNAL: u8 = 7;
const KILL_CGROUP: u8 = 8;
const WIRE: u8 = 9;
const UNWIRE: u8 = 10;
const RECLAIM_NETWORKS: u8 = 11;
const START_LAUNCHER: u8 = 12;
const POLICY: u8 = 13;

/// A start request's bytes, and the descriptors to send with it in the
/// order [`decode`] takes them: stdin, stdout, stderr, the cgroup's files,
/// the network namespace.
fn encode(launch: &Launch, exec: &Exec, stdio: &Stdio, start: Start) -> (Vec<u8>, Vec<RawFd>) {
    let mut fds = vec![stdio.stdin, stdio.stdout, stdio.stderr];
    fds.extend(&launch.cgroup_join);
    let mut out = Writer::default();
    out.u8(match start {
        Start::Cloned => START_CLONED,
        Start::WithInit => START_WITH_INIT,
    });
    match &launch.kind {
        Kind::Plain => out.u8(0),
        Kind::Sandbox {
            workspace,
            runner_tmp,
            tmpfs_bytes,
        } => {
            out.u8(1);
            out.optional(workspace);
            out.optional(runner_tmp);
            out.u8(tmpfs_bytes.is_some().into());
            out.u64(tmpfs_bytes.unwrap_or(0));
        }
    }
    out.u32(launch.cgroup_join.len() as u32);
    match launch.network {
        Network::Host => out.u8(0),
        Network::Empty => out.u8(1),
        Network::Join(namespace) => {
            out.u8(2);
            fds.push(namespace);
        }
    }
    out.bytes(launch.working_directory.as_bytes());
    match launch.user {
        None => out.u8(0),
        Some((uid, gid)) => {
            out.u8(1);
            out.u32(uid);
            out.u32(gid);
        }
    }
    out.u8(launch.drop_root_capabilities.into());
    out.strings(&launch.owned_directories);
    out.bytes(exec.program().to_bytes());
    out.strings(exec.arguments());
    out.strings(exec.environment());
    (out.0, fds)
}

/// A launcher's first message: its policy.
fn encode_policy(policy: &Policy) -> Vec<u8> {
    let paths = |paths: &[PathBuf]| paths.iter().map(|p| c_path(p)).collect::<Vec<_>>();
    let mut out = Writer::default();
    out.u8(POLICY);
    out.bytes(policy.work_root.as_os_str().as_bytes());
    out.bytes(policy.root_mount_point.as_os_str().as_bytes());
    out.strings(&paths(&policy.read_only_paths));
    out.strings(&paths(&policy.hidden_paths));
    match policy.action_users {
        ActionUsers::One(None) => out.u8(0),
        ActionUsers::One(Some((uid, gid))) => {
            out.u8(1);
            out.u32(uid);
            out.u32(gid);
        }
        ActionUsers::Range { first, last } => {
            out.u8(2);
            out.u32(first);
            out.u32(last);
        }
    }
    out.u8(policy.none_allow_user_switch.into());
    out.u8(policy.runs_actions.into());
    out.0
}

/// The policy [`encode_policy`] wrote; an error for any other message.
fn decode_policy(request: &[u8]) -> io::Result<Policy> {
    let mut input = Reader(request);
    if input.u8()? != POLICY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a launcher's first message must be its policy",
        ));
    }
    let path = |c: CString| PathBuf::from(std::ffi::OsString::from_vec(c.into_bytes()));
    let work_root = path(input.c_string()?);
    let root_mount_point = path(input.c_string()?);
    let read_only_paths = input.strings()?.into_iter().map(path).collect();
    let hidden_paths = input.strings()?.into_iter().map(path).collect();
    let action_users = match input.u8()? {
        0 => ActionUsers::One(None),
        1 => ActionUsers::One(Some((input.u32()?, input.u32()?))),
        _ => ActionUsers::Range {
            first: input.u32()?,
            last: input.u32()?,
        },
    };
    let none_allow_user_switch = input.u8()? != 0;
    let runs_actions = input.u8()? != 0;
    if !work_root.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the work root {} is not absolute", work_root.display()),
        ));
    }
    Ok(Policy {
        work_root,
        root_mount_point,
        read_only_paths,
        hidden_paths,
        action_users,
        none_allow_user_switch,
        runs_actions,
    })
}

/// A privileged step's bytes; it carries no descriptors.
fn encode_privileged(request: &privileged::Request) -> Vec<u8> {
    let mut out = Writer::default();
    match request {
        privileged::Request::Mount { options, layers } => {
            out.u8(MOUNT_OVERLAY);
            out.bytes(options.as_bytes());
            for layer in layers {
                out.bytes(layer.as_bytes());
            }
        }
        privileged::Request::Detach(target) => {
            out.u8(DETACH);
            out.bytes(target.as_bytes());
        }
        privileged::Request::Give {
            owner: (uid, gid),
            directories,
        } => {
            out.u8(GIVE);
            out.u32(*uid);
            out.u32(*gid);
            out.strings(directories);
        }
        privileged::Request::TakeBack {
            owner: (uid, gid),
            directory,
            files,
        } => {
            out.u8(TAKE_BACK);
            out.u32(*uid);
            out.u32(*gid);
            out.bytes(directory.as_bytes());
            out.strings(files);
        }
        privileged::Request::Confine(root) => {
            out.u8(CONFINE);
            out.bytes(root.as_bytes());
        }
        privileged::Request::Signal { leader, signal } => {
            out.u8(SIGNAL);
            out.u32(*leader as u32);
            out.u32(*signal as u32);
        }
        privileged::Request::KillCgroup(directory) => {
            out.u8(KILL_CGROUP);
            out.bytes(directory.as_bytes());
        }
    }
    out.0
}

fn decode(request: &[u8], fds: &[OwnedFd]) -> io::Result<Request> {
    let mut input = Reader(request);
    let fd = |index: usize| {
        fds.get(index).map(AsRawFd::as_raw_fd).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("descriptor {index} missing"),
            )
        })
    };
    let start = match input.u8()? {
        START_CLONED => Start::Cloned,
        START_WITH_INIT => Start::WithInit,
        WIRE => {
            return Ok(Request::Wire {
                base: input.u32()?,
                slots: input.u32()?,
                start: input.u32()?,
            })
        }
        UNWIRE => {
            return Ok(Request::Unwire {
                host_index: input.u32()?,
            })
        }
        RECLAIM_NETWORKS => return Ok(Request::ReclaimNetworks),
        START_LAUNCHER => return Ok(Request::StartLauncher),
        POLICY => return Ok(Request::Policy),
        kind => return decode_privileged(kind, &mut input).map(Request::Privileged),
    };
    let stdio = Stdio {
        stdin: fd(0)?,
        stdout: fd(1)?,
        stderr: fd(2)?,
    };
    let kind = match input.u8()? {
        0 => Kind::Plain,
        _ => Kind::Sandbox {
            workspace: input.optional()?,
            runner_tmp: input.optional()?,
            tmpfs_bytes: {
                let some = input.u8()? != 0;
                let bytes = input.u64()?;
                some.then_some(bytes)
            },
        },
    };
    let cgroups = input.u32()? as usize;
    let cgroup_join = (3..3 + cgroups).map(fd).collect::<io::Result<Vec<_>>>()?;
    let network = match input.u8()? {
        0 => Network::Host,
        1 => Network::Empty,
        _ => Network::Join(fd(3 + cgroups)?),
    };
    let working_directory = input.c_string()?;
    let user = match input.u8()? {
        0 => None,
        _ => Some((input.u32()?, input.u32()?)),
    };
    let drop_root_capabilities = input.u8()? != 0;
    let owned_directories = input.strings()?;
    let launch = Launch {
        kind,
        working_directory,
        user,
        network,
        cgroup_join,
        owned_directories,
        drop_root_capabilities,
    };
    let program = input.c_string()?;
    let arguments = input.strings()?;
    let environment = input.strings()?;
    Ok(Request::Start(
        Box::new(launch),
        Exec::from_parts(program, arguments, environment),
        stdio,
        start,
    ))
}

/// The rest of a privileged step's request, whose first byte was `kind`.
fn decode_privileged(kind: u8, input: &mut Reader) -> io::Result<privileged::Request> {
    // A struct's fields are read in the order written.
    Ok(match kind {
        MOUNT_OVERLAY => privileged::Request::Mount {
            options: input.c_string()?,
            layers: [
                input.c_string()?,
                input.c_string()?,
                input.c_string()?,
                input.c_string()?,
            ],
        },
        DETACH => privileged::Request::Detach(input.c_string()?),
        GIVE => privileged::Request::Give {
            owner: (input.u32()?, input.u32()?),
            directories: input.strings()?,
        },
        TAKE_BACK => privileged::Request::TakeBack {
            owner: (input.u32()?, input.u32()?),
            directory: input.c_string()?,
            files: input.strings()?,
        },
        CONFINE => privileged::Request::Confine(input.c_string()?),
        SIGNAL => privileged::Request::Signal {
            leader: input.u32()? as i32,
            signal: input.u32()? as i32,
        },
        KILL_CGROUP => privileged::Request::KillCgroup(input.c_string()?),
        kind => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a request of unknown kind {kind}"),
            ))
        }
    })
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, value: u8) {
        self.0.push(value);
    }

    fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn bytes(&mut self, value: &[u8]) {
        self.u32(value.len() as u32);
        self.0.extend_from_slice(value);
    }

    /// A count, then each string.
    fn strings(&mut self, values: &[CString]) {
        self.u32(values.len() as u32);
        for value in values {
            self.bytes(value.as_bytes());
        }
    }

    fn optional(&mut self, value: &Option<CString>) {
        match value {
            None => self.u8(0),
            Some(value) => {
                self.u8(1);
                self.bytes(value.as_bytes());
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, count: usize) -> io::Result<&[u8]> {
        if self.0.len() < count {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a truncated request",
            ));
        }
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> io::Result<u32> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(bytes))
    }

    fn c_string(&mut self) -> io::Result<CString> {
        let length = self.u32()? as usize;
        CString::new(self.take(length)?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a NUL byte in a string"))
    }

    fn strings(&mut self) -> io::Result<Vec<CString>> {
        (0..self.u32()?).map(|_| self.c_string()).collect()
    }

    fn optional(&mut self) -> io::Result<Option<CString>> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.c_string()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_requests_read_back_and_a_reply_carries_a_descriptor() {
        match decode(&wire_request(0x0ad5_0000, 16384, 7), &[]) {
            Ok(Request::Wire { base, slots, start }) => {
                assert_eq!((base, slots, start), (0x0ad5_0000, 16384, 7))
            }
            _ => panic!("a wire request not read back"),
        }
        match decode(&unwire_request(42), &[]) {
            Ok(Request::Unwire { host_index }) => assert_eq!(host_index, 42),
            _ => panic!("an unwire request not read back"),
        }
        assert!(matches!(
            decode(&[RECLAIM_NETWORKS], &[]),
            Ok(Request::ReclaimNetworks)
        ));

        // An answer with a descriptor, then one without.
        let (executor, launcher) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        write_reply(&launcher, &Ok(9), Some(&OwnedFd::from(file))).unwrap();
        write_reply(&launcher, &Ok(10), None).unwrap();
        let (index, fds) = read_reply(&executor).unwrap().unwrap();
        assert_eq!((index, fds.len()), (9, 1));
        let (index, fds) = read_reply(&executor).unwrap().unwrap();
        assert_eq!((index, fds.len()), (10, 0));
        drop(launcher);
        let closed = read_reply(&executor).unwrap_err();
        assert_eq!(closed.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_request_reads_back_as_it_was_written() {
        let launch = Launch {
            kind: Kind::Sandbox {
                workspace: Some(c"/work/w1".to_owned()),
                runner_tmp: Some(c"/work/w1.tmp".to_owned()),
                tmpfs_bytes: Some(64 << 20),
            },
            working_directory: c"/work/w1/pkg".to_owned(),
            user: Some((65534, 65534)),
            network: Network::Join(12),
            cgroup_join: vec![10, 11],
            owned_directories: vec![c"/work/w1".to_owned(), c"/work/w1/out".to_owned()],
            drop_root_capabilities: true,
        };
        let exec = Exec::new(
            Path::new("/bin/sh"),
            &["sh".into(), "-c".into(), "echo hi".into()],
            &[("PATH".into(), "/bin".into())],
        )
        .unwrap();
        let stdio = Stdio {
            stdin: 3,
            stdout: 4,
            stderr: 5,
        };
        let (request, fds) = encode(&launch, &exec, &stdio, Start::WithInit);
        assert_eq!(fds, [3, 4, 5, 10, 11, 12]);
        // Stand-ins for the descriptors as received: any open ones do.
        let received: Vec<OwnedFd> = (0..fds.len())
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect();
        let numbers: Vec<RawFd> = received.iter().map(AsRawFd::as_raw_fd).collect();
        let Ok(Request::Start(decoded, exec_back, stdio_back, start)) = decode(&request, &received)
        else {
            panic!("not read back as a start");
        };
        assert_eq!(start, Start::WithInit);
        assert_eq!(
            [stdio_back.stdin, stdio_back.stdout, stdio_back.stderr],
            numbers[..3]
        );
        let expected = Launch {
            cgroup_join: numbers[3..5].to_vec(),
            network: Network::Join(numbers[5]),
            ..launch.clone()
        };
        assert_eq!(*decoded, expected);
        assert_eq!(exec_back.program(), exec.program());
        assert_eq!(exec_back.arguments(), exec.arguments());
        assert_eq!(exec_back.environment(), exec.environment());

        // A plain one, in the host's network, as root.
        let plain = Launch {
            drop_root_capabilities: false,
            ..Launch::plain(Path::new("/work/w2"), None, Vec::new())
        };
        let (request, fds) = encode(&plain, &exec, &stdio, Start::Cloned);
        assert_eq!(fds, [3, 4, 5]);
        let Ok(Request::Start(decoded, ..)) = decode(&request, &received[..3]) else {
            panic!("not read back as a start");
        };
        assert_eq!(*decoded, plain);

        // A request cut short, or missing a descriptor, is refused.
        let (request, _) = encode(&launch, &exec, &stdio, Start::WithInit);
        assert!(decode(&request[..request.len() - 1], &received).is_err());
        assert!(decode(&request, &received[..5]).is_err());
    }

    #[test]
    fn a_policy_reads_back_as_it_was_written_and_only_as_a_first_message() {
        let policies = [
            Policy {
                work_root: "/var/lib/kiln/work".into(),
                root_mount_point: "/run/kiln-sandbox".into(),
                read_only_paths: vec!["/opt/tools".into()],
                hidden_paths: vec!["/etc/secret".into(), "/opt/tools/key".into()],
                action_users: ActionUsers::Range {
                    first: 2_000_000,
                    last: 2_000_999,
                },
                none_allow_user_switch: true,
                runs_actions: true,
            },
            Policy {
                work_root: "/w".into(),
                root_mount_point: "/run/k".into(),
                read_only_paths: Vec::new(),
                hidden_paths: Vec::new(),
                action_users: ActionUsers::One(Some((65534, 65534))),
                none_allow_user_switch: false,
                runs_actions: false,
            },
            Policy {
                action_users: ActionUsers::One(None),
                ..policy_for_tests()
            },
        ];
        for policy in policies {
            let bytes = encode_policy(&policy);
            assert_eq!(decode_policy(&bytes).unwrap(), policy);
            // After the first message, a policy is a request the launcher
            // refuses.
            assert!(matches!(decode(&bytes, &[]), Ok(Request::Policy)));
            assert!(decode_policy(&bytes[..bytes.len() - 1]).is_err());
        }
        // A start is no policy; nor is a relative work root.
        assert!(decode_policy(&[START_LAUNCHER]).is_err());
        let relative = Policy {
            work_root: "work".into(),
            ..policy_for_tests()
        };
        assert!(decode_policy(&encode_policy(&relative)).is_err());
    }

    /// Set when this test binary runs again as a launcher, for
    /// [`a_launcher_process_refuses_what_its_policy_does_not_allow`].
    const AS_LAUNCHER: &str = "KILN_TEST_AS_LAUNCHER";

    /// A real launcher process (this test binary, run again: its one test
    /// serves as the launcher) asked for what a taken-over executor might
    /// ask: before its policy, and against it.
    #[test]
    fn a_launcher_process_refuses_what_its_policy_does_not_allow() {
        if std::env::var_os(AS_LAUNCHER).is_some() {
            serve().unwrap();
            return;
        }
        let launcher = || {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let process = Command::new(std::env::current_exe().unwrap())
                .args([
                    "launcher::tests::a_launcher_process_refuses_what_its_policy_does_not_allow",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(AS_LAUNCHER, "1")
                .stdin(OwnedFd::from(theirs))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (ours, process)
        };
        let null = std::fs::File::open("/dev/null").unwrap();
        let stdio = Stdio {
            stdin: null.as_raw_fd(),
            stdout: null.as_raw_fd(),
            stderr: null.as_raw_fd(),
        };
        let exec = Exec::new(Path::new("/bin/true"), &["true".into()], &[]).unwrap();
        let ask = |socket: &UnixStream, launch: &Launch| {
            let (request, fds) = encode(launch, &exec, &stdio, Start::Cloned);
            // SAFETY: `null` and the test's namespace stay open meanwhile.
            let fds: Vec<BorrowedFd> = (fds.iter())
                .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
                .collect();
            send(socket, &request, &fds).unwrap();
            read_reply(socket)
                .unwrap()
                .map(|(pid, _)| pid)
                .map_err(|failure| failure.error.raw_os_error())
        };
        let work = tempfile::tempdir().unwrap();
        let workspace = work.path().join("w1");
        std::fs::create_dir(&workspace).unwrap();
        let plain = |user| Launch::plain(&workspace, user, Vec::new());

        // A start before the policy: refused, and the launcher ends.
        let (socket, mut process) = launcher();
        assert!(ask(&socket, &plain(Some((5003, 5003)))).is_err());
        assert!(!process.wait().unwrap().success());

        let (socket, process) = launcher();
        let policy = Policy {
            work_root: work.path().to_path_buf(),
            action_users: ActionUsers::Range {
                first: 5000,
                last: 5009,
            },
            ..policy_for_tests()
        };
        give_policy(&socket, &encode_policy(&policy), None).unwrap();
        let host_network = std::fs::File::open("/proc/self/ns/net").unwrap();
        let mut in_etc = Launch {
            kind: Kind::Sandbox {
                workspace: Some(c"/etc".to_owned()),
                runner_tmp: None,
                tmpfs_bytes: None,
            },
            network: Network::Empty,
            ..plain(None)
        };
        let mut in_host_network = Launch {
            kind: Kind::Sandbox {
                workspace: Some(c_path(&workspace)),
                runner_tmp: None,
                tmpfs_bytes: None,
            },
            network: Network::Join(host_network.as_raw_fd()),
            ..plain(None)
        };
        let giving_home = Launch {
            owned_directories: vec![c"/root".to_owned()],
            ..plain(Some((5003, 5003)))
        };
        for hostile in [
            &mut in_etc,
            &mut in_host_network,
            &mut plain(None),
            &mut plain(Some((1000, 1000))),
            &mut plain(Some((5003, 0))),
            &mut giving_home.clone(),
        ] {
            assert_eq!(ask(&socket, hostile), Err(Some(libc::EPERM)), "{hostile:?}");
        }
        in_host_network.network = Network::Host;
        assert_eq!(ask(&socket, &in_host_network), Err(Some(libc::EPERM)));
        // Nor does it take another policy.
        send(
            &socket,
            &encode_policy(&Policy {
                none_allow_user_switch: true,
                ..policy
            }),
            &[],
        )
        .unwrap();
        assert_eq!(
            read_reply(&socket)
                .unwrap()
                .map(drop)
                .map_err(|f| f.error.raw_os_error()),
            Err(Some(libc::EPERM))
        );
        // Under the work root by name, elsewhere through a symlink the
        // executor's side put there: refused, before any change.
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.path(), work.path().join("escape")).unwrap();
        let escape = work.path().join("escape");
        let escape_sub = escape.join("sub");
        let through_symlink = [
            Launch {
                kind: Kind::Sandbox {
                    workspace: Some(c_path(&escape)),
                    runner_tmp: None,
                    tmpfs_bytes: None,
                },
                network: Network::Empty,
                ..plain(None)
            },
            Launch {
                kind: Kind::Sandbox {
                    workspace: Some(c_path(&workspace)),
                    runner_tmp: Some(c_path(&escape_sub)),
                    tmpfs_bytes: None,
                },
                network: Network::Empty,
                ..plain(None)
            },
            plain(Some((5003, 5003))).giving(std::slice::from_ref(&escape_sub)),
        ];
        for hostile in &through_symlink {
            assert_eq!(ask(&socket, hostile), Err(Some(libc::EPERM)), "{hostile:?}");
        }
        {
            use std::os::unix::fs::MetadataExt;
            let sub = std::fs::metadata(outside.path().join("sub")).unwrap();
            assert_eq!(sub.uid(), rustix::process::geteuid().as_raw());
        }
        if rustix::process::geteuid().is_root() {
            // What the policy allows runs: as an action user, in its
            // workspace, given to it. The action is this process's child.
            let allowed = plain(Some((5003, 5003))).giving(std::slice::from_ref(&workspace));
            let pid = ask(&socket, &allowed).expect("allowed");
            let mut status = 0;
            // SAFETY: waits for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
            use std::os::unix::fs::MetadataExt;
            assert_eq!(std::fs::metadata(&workspace).unwrap().uid(), 5003);
        } else {
            eprintln!("skipped the allowed start: needs root");
        }
        drop(socket);
        let output = process.wait_with_output().unwrap();
        assert!(output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        for said in [
            "is not under the work root",
            "a sandbox in the host's network namespace",
            "joining the host's network namespace",
            "a plain process as root",
            "a plain process as uid 1000, gid 1000, not an action user",
            "a plain process as uid 5003, gid 0",
            "escape: not reached beneath the work root without a symlink",
            "escape/sub: not reached beneath the work root without a symlink",
        ] {
            assert!(stderr.contains(said), "{said:?} not in {stderr}");
        }
    }

    fn policy_for_tests() -> Policy {
        Policy {
            work_root: "/work".into(),
            root_mount_point: "/run/kiln-sandbox".into(),
            read_only_paths: Vec::new(),
            hidden_paths: Vec::new(),
            action_users: ActionUsers::Range {
                first: 1000,
                last: 1999,
            },
            none_allow_user_switch: false,
            runs_actions: true,
        }
    }

    #[test]
    fn privileged_steps_read_back_as_they_were_written() {
        let steps = [
            privileged::Request::Mount {
                options: c"index=off".to_owned(),
                layers: [
                    c"/w/a/inputs".to_owned(),
                    c"/w/a/upper".to_owned(),
                    c"/w/a/overlay-work".to_owned(),
                    c"/w/a/workspace".to_owned(),
                ],
            },
            privileged::Request::Detach(c"/w/a/workspace".to_owned()),
            privileged::Request::Give {
                owner: (65534, 65533),
                directories: vec![
                    c"/w/a/workspace".to_owned(),
                    c"/w/a/workspace/out".to_owned(),
                ],
            },
            privileged::Request::TakeBack {
                owner: (0, 0),
                directory: c"/w/a/workspace".to_owned(),
                files: vec![c"out/a.o".to_owned(), c"b".to_owned()],
            },
            privileged::Request::Confine(c"/w".to_owned()),
            privileged::Request::Signal {
                leader: 4242,
                signal: libc::SIGTERM,
            },
            privileged::Request::KillCgroup(c"/sys/fs/cgroup/pids/kiln/42-7".to_owned()),
        ];
        for step in steps {
            let request = encode_privileged(&step);
            match decode(&request, &[]) {
                Ok(Request::Privileged(back)) => assert_eq!(back, step),
                _ => panic!("{step:?} not read back"),
            }
            assert!(decode(&request[..request.len() - 1], &[]).is_err());
        }
        assert!(decode(&[9], &[]).is_err(), "an unknown kind");
    }
}
