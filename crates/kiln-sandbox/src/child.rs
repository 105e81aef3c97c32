//! What runs between the clone (or fork) that starts an action and the
//! action's exec: joining the cgroup, the namespaces, the new root and the
//! drop of privileges. Everything here is async-signal-safe: direct
//! syscalls over a [`Plan`] (and [`Exec`]) prepared, and allocated, before.
//!
//! [`spawn`] is the way in, called by the launcher ([`crate::launcher`])
//! or, where none is installed, by the executor itself. Two ways to start.
//! The default, [`Start::Cloned`], clones the action straight into new
//! namespaces with `CLONE_VM | CLONE_VFORK` (no copy of the caller's
//! memory); the action is PID 1. With `dockerInit`, [`Start::WithInit`]
//! forks a copy that runs [`enter`], and three processes take part: the
//! *intermediate* (that copy, the process-group leader the executor
//! supervises) joins the cgroup, unshares the pid namespace and forks
//! *init*, PID 1 of the new namespace; init builds the other namespaces and
//! the root, forks the *action* (which returns to exec), reaps orphans, and
//! hands the action's wait status back through a pipe; the intermediate
//! then ends the way the action did. Either way, when PID 1 exits the
//! kernel kills everything left in the namespace.

use std::ffi::{c_int, CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::ptr;

use kiln_worker::process::{BUSY_TEXT_PAUSE, BUSY_TEXT_RETRIES};

/// What a setup failure makes `spawn` return; the details go to the
/// action's stderr as a `kiln sandbox:` line.
pub(crate) const SETUP_FAILED: i32 = libc::ENOTRECOVERABLE;
/// Prefix of the line describing a setup failure.
pub(crate) const FAILURE_PREFIX: &str = "kiln sandbox: ";

/// One filesystem step of building the sandbox's root.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Mkdir {
        path: CString,
        mode: u32,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// An empty file to bind a file over.
    Touch {
        path: CString,
    },
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: u64,
        data: Option<CString>,
        /// Failure is ignored (e.g. masking a /proc file this kernel lacks).
        optional: bool,
    },
    /// Attaches a detached mount (`open_tree(OPEN_TREE_CLONE)`, made by
    /// the launcher) at `target`: a bind of what the launcher opened.
    AttachTree {
        tree: RawFd,
        target: CString,
    },
}

/// The network namespace of a sandboxed action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Network {
    /// The host's (a plain process only).
    Host,
    /// A new one holding only `lo`, brought up by the child (a sandbox's,
    /// or a plain process's with `dockerNetwork=off`).
    Empty,
    /// One prepared before the start (see [`crate::network`]), joined
    /// with `setns` through this descriptor.
    Join(RawFd),
}

/// Everything the child needs, prepared before the fork.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// New namespaces and root; false for a plain process (`none`,
    /// [`crate::plain`]), which only joins `cgroup_join`, drops
    /// `drop_capabilities` and takes `user`, in the host's namespaces but
    /// for a network namespace of its own with [`Network::Empty`] (and,
    /// under `dockerInit`, the pid and mount namespaces of its init).
    pub namespaces: bool,
    /// Open files that put the writer in the action's cgroup
    /// ([`crate::cgroup::Cgroup::join_fds`]).
    pub cgroup_join: Vec<RawFd>,
    pub network: Network,
    /// Host directory the new root (a tmpfs) is mounted on.
    pub new_root: CString,
    /// Steps with host paths (targets under `new_root`), before pivot_root.
    pub before_pivot: Vec<Op>,
    /// Steps inside the new root (/proc, /sys, read-only /).
    pub after_pivot: Vec<Op>,
    pub hostname: CString,
    pub working_directory: CString,
    /// `(uid, gid)` to become; `None` stays root.
    pub user: Option<(u32, u32)>,
    /// Capabilities removed from the bounding set before exec.
    pub drop_capabilities: Vec<u32>,
    /// Workspace directories the executor made, given to `user` before
    /// the clone ([`kiln_worker::CommandSpec::owned_directories`]).
    pub owned_directories: Vec<CString>,
}

/// An absolute path with no `.` or `..` component: the only paths the
/// launcher's root-only steps take.
pub(crate) fn check_plain_path(path: &CStr) -> io::Result<()> {
    let bytes = path.to_bytes();
    let plain = bytes.starts_with(b"/")
        && bytes
            .split(|b| *b == b'/')
            .all(|part| part != b"." && part != b"..");
    if plain {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a plain absolute path: {}", path.to_string_lossy()),
        ))
    }
}

/// Gives workspace `directories` to `uid`, `gid` (lchown: a symlink put
/// in a directory's place is not followed). In the launcher: before the
/// clone of the action they are for, or on its own request.
pub(crate) fn give_directories(directories: &[CString], (uid, gid): (u32, u32)) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    for dir in directories {
        check_plain_path(dir)?;
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(dir.to_bytes()));
        // The errno alone crosses the launcher's socket.
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn write_all(fd: RawFd, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid buffer of `rest.len()` bytes.
        let written = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if written <= 0 {
            return;
        }
        rest = &rest[written as usize..];
    }
}

/// `value` in decimal, in `buffer`, without allocating.
fn decimal(value: u64, buffer: &mut [u8; 20]) -> &[u8] {
    let mut start = buffer.len();
    let mut rest = value;
    loop {
        start -= 1;
        buffer[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            return &buffer[start..];
        }
    }
}

/// Reports a failed step on stderr (`kiln sandbox: STEP PATH: errno N`)
/// and returns the error `spawn` will see.
fn failure(step: &str, path: &CStr) -> io::Error {
    let code = errno();
    write_all(2, FAILURE_PREFIX.as_bytes());
    write_all(2, step.as_bytes());
    if !path.is_empty() {
        write_all(2, b" ");
        write_all(2, path.to_bytes());
    }
    write_all(2, b": errno ");
    let mut buffer = [0; 20];
    write_all(2, decimal(code as u64, &mut buffer));
    write_all(2, b"\n");
    io::Error::from_raw_os_error(SETUP_FAILED)
}

fn check(result: c_int, step: &str, path: &CStr) -> io::Result<()> {
    if result < 0 {
        Err(failure(step, path))
    } else {
        Ok(())
    }
}

fn pointer(value: &Option<CString>) -> *const libc::c_char {
    value.as_ref().map_or(ptr::null(), |v| v.as_ptr())
}

/// Moves the calling process into the action's cgroups (writing "0", the
/// writer itself, to each `cgroup.procs`). Async-signal-safe.
fn join_cgroups(plan: &Plan) -> io::Result<()> {
    for &fd in &plan.cgroup_join {
        // SAFETY: a write of a static one-byte buffer to an open descriptor.
        let written = unsafe { libc::write(fd, c"0".as_ptr().cast(), 1) };
        check(written as c_int, "joining the cgroup", c"")?;
    }
    Ok(())
}

/// Enters the prepared network namespace, if there is one: before the
/// root is built, so the fresh /sys shows that namespace's interfaces.
fn join_network(plan: &Plan) -> io::Result<()> {
    if let Network::Join(namespace) = plan.network {
        // SAFETY: setns on a descriptor the parent keeps open until the
        // action has started.
        check(
            unsafe { libc::setns(namespace, libc::CLONE_NEWNET) },
            "joining the network namespace",
            c"",
        )?;
    }
    Ok(())
}

/// `fork(2)` as the bare system call. glibc's `fork` first takes its
/// internal locks (malloc's, stdio's) for its atfork handlers; in a copy
/// of a multi-threaded caller made by [`spawn`], another thread of which
/// may have held one at the clone, that would wait forever. The copies
/// here are single-threaded and only make system calls.
fn raw_fork() -> libc::pid_t {
    // SAFETY: clone with only the exit signal set is fork: the child gets
    // a copy of this single-threaded process and returns here with 0.
    unsafe {
        libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) as libc::pid_t
    }
}

/// Closes every descriptor but `keep`.
fn close_all_except(keep: RawFd) {
    // SAFETY: close_range only closes descriptors; nothing in this process
    // uses the closed ones afterwards.
    unsafe {
        if keep > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, (keep - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0u32);
    }
}

/// Closes every descriptor above stdio but `keep`.
fn close_descriptors_above_stdio_except(keep: RawFd) {
    // SAFETY: close_range only closes descriptors of this child's own
    // table (no CLONE_FILES); nothing here uses the closed ones.
    unsafe {
        if keep > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (keep - 1) as u32, 0u32);
        }
        let above = (keep + 1).max(3);
        libc::syscall(libc::SYS_close_range, above as u32, u32::MAX, 0u32);
    }
}

/// Back to default dispositions: the executor's handlers (tokio's
/// SIGCHLD) must not run in a process that never execs.
fn reset_signals() {
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: a zeroed sigaction is SIG_DFL with no flags; invalid
        // signal numbers fail with EINVAL, which is ignored.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &action, ptr::null_mut());
        }
    }
}

/// [`Start::WithInit`]'s setup. Returns only in the action process (which
/// then execs); the intermediate and init never return.
///
/// # Safety
/// Must be called in a freshly forked, single-threaded child, with `plan`
/// fully built before the fork.
unsafe fn enter(plan: &Plan) -> io::Result<()> {
    // SAFETY (whole body): direct syscalls on buffers owned by `plan` or the
    // stack; this process is single-threaded after the fork.
    unsafe {
        // Join the cgroup first, so everything forked below is accounted.
        join_cgroups(plan)?;
        check(
            libc::unshare(libc::CLONE_NEWPID),
            "unshare(CLONE_NEWPID)",
            c"",
        )?;
        let mut status_pipe = [0; 2];
        check(
            libc::pipe2(status_pipe.as_mut_ptr(), libc::O_CLOEXEC),
            "pipe2",
            c"",
        )?;
        match raw_fork() {
            -1 => Err(failure("fork (init)", c"")),
            0 => {
                libc::close(status_pipe[0]);
                init(plan, status_pipe[1])
            }
            init_pid => {
                libc::close(status_pipe[1]);
                intermediate(init_pid, status_pipe[0])
            }
        }
    }
}

/// Waits for init and ends as the action did.
unsafe fn intermediate(init_pid: libc::pid_t, status_read: RawFd) -> ! {
    // `spawn` waits for EOF on its CLOEXEC report pipe: holding
    // it (or anything else) open here would stall it.
    close_all_except(status_read);
    reset_signals();
    // SAFETY (whole body): plain syscalls on stack buffers.
    unsafe {
        // The polite stop is for the action, which gets it as a member of
        // the process group; this process must outlive it.
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        let mut status: c_int = 0;
        loop {
            let reaped = libc::waitpid(init_pid, &mut status, 0);
            if reaped == init_pid {
                break;
            }
            if reaped < 0 && errno() != libc::EINTR {
                libc::_exit(SETUP_FAILED);
            }
        }
        let mut action_status = [0u8; 4];
        if libc::read(status_read, action_status.as_mut_ptr().cast(), 4) == 4 {
            status = c_int::from_ne_bytes(action_status);
        }
        end_like(status)
    }
}

/// Exits with `status`'s code, or dies of its signal (no core dump: this
/// process is a copy of the launcher, or of the executor without one).
unsafe fn end_like(status: c_int) -> ! {
    // SAFETY (whole body): plain syscalls on stack values.
    unsafe {
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, ptr::null_mut());
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal);
        }
        libc::_exit(SETUP_FAILED)
    }
}

/// PID 1: builds the sandbox, forks the action, reaps until it ends.
unsafe fn init(plan: &Plan, status_write: RawFd) -> io::Result<()> {
    reset_signals();
    // SAFETY (whole body): direct syscalls on C strings owned by `plan`.
    unsafe {
        // If the intermediate is killed (SIGKILL of the group), so is init,
        // and with it the namespace.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if plan.namespaces {
            // The cgroup namespace makes the action's cgroup its "/",
            // hiding the host's cgroup paths.
            let mut flags =
                libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP;
            if plan.network == Network::Empty {
                flags |= libc::CLONE_NEWNET;
            }
            check(libc::unshare(flags), "unshare", c"")?;
            join_network(plan)?;
            setup_root(plan)?;
        } else {
            setup_plain_init(plan)?;
        }
        match raw_fork() {
            -1 => Err(failure("fork (action)", c"")),
            0 => {
                libc::close(status_write);
                action(plan)
            }
            action_pid => reap(action_pid, status_write),
        }
    }
}

/// In fresh mount (and network) namespaces, as PID 1 of a fresh pid
/// namespace: the new root, /proc, hostname and loopback.
unsafe fn setup_root(plan: &Plan) -> io::Result<()> {
    // SAFETY (whole body): direct syscalls on C strings owned by `plan`.
    unsafe {
        make_mounts_private()?;
        run_ops(&plan.before_pivot)?;
        check(libc::chdir(plan.new_root.as_ptr()), "chdir", &plan.new_root)?;
        // pivot_root(".", "."), then detach the old root stacked on top: the
        // idiom from pivot_root(2) that needs no directory for the old root.
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as c_int,
            "pivot_root",
            &plan.new_root,
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "detaching the old root",
            c"",
        )?;
        check(libc::chdir(c"/".as_ptr()), "chdir", c"/")?;
        run_ops(&plan.after_pivot)?;
        check(
            libc::sethostname(plan.hostname.as_ptr(), plan.hostname.to_bytes().len()),
            "sethostname",
            &plan.hostname,
        )?;
        if plan.network == Network::Empty {
            loopback_up()?;
        }
    }
    Ok(())
}

/// Makes every mount of this (fresh) mount namespace private: nothing
/// mounted from here on propagates back to the host.
fn make_mounts_private() -> io::Result<()> {
    // SAFETY: a mount(2) call with static strings and null pointers.
    check(
        unsafe {
            libc::mount(
                ptr::null(),
                c"/".as_ptr(),
                ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                ptr::null(),
            )
        },
        "making / private",
        c"",
    )
}

/// Init of a plain process (`none` with `dockerInit`), PID 1 of a fresh
/// pid namespace: the host's root and mounts stay, but in a mount
/// namespace of its own, where a new /proc shows the new pid namespace
/// (so the action sees init as PID 1, and its own processes only); with
/// `dockerNetwork=off`, also a network namespace holding only `lo`, up.
unsafe fn setup_plain_init(plan: &Plan) -> io::Result<()> {
    let mut flags = libc::CLONE_NEWNS;
    if plan.network == Network::Empty {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare and mount with static strings and null pointers.
    unsafe {
        check(libc::unshare(flags), "unshare", c"")?;
        make_mounts_private()?;
        check(
            libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                ptr::null(),
            ),
            "mount",
            c"/proc",
        )?;
    }
    if plan.network == Network::Empty {
        loopback_up()?;
    }
    Ok(())
}

/// Init's life after the fork: reap every child, report the action's.
unsafe fn reap(action_pid: libc::pid_t, status_write: RawFd) -> ! {
    close_all_except(status_write);
    // SAFETY (whole body): plain syscalls on stack buffers.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"kiln-init".as_ptr(), 0, 0, 0);
        // Init's memory is a copy of its starter's (the launcher's, or the
        // executor's without one): keep the action (which lacks
        // CAP_SYS_PTRACE) out of it and its /proc files.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        loop {
            let mut status: c_int = 0;
            let reaped = libc::waitpid(-1, &mut status, 0);
            if reaped == action_pid {
                let bytes = status.to_ne_bytes();
                write_all(status_write, &bytes);
                libc::_exit(0);
            }
            if reaped < 0 && errno() != libc::EINTR {
                libc::_exit(SETUP_FAILED);
            }
        }
    }
}

/// The action process, before it execs: fewer privileges, its user,
/// its working directory.
unsafe fn action(plan: &Plan) -> io::Result<()> {
    // SAFETY (whole body): direct syscalls on values owned by `plan`.
    unsafe {
        for &capability in &plan.drop_capabilities {
            check(
                libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0),
                "dropping a capability",
                c"",
            )?;
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "setting no_new_privs",
            c"",
        )?;
        if let Some((uid, gid)) = plan.user {
            // The bare system calls: glibc's wrappers, in a process it
            // believes multi-threaded (a copy of one), first take a lock
            // of its thread list to change every thread's ids, a lock
            // another thread may have held at the copy.
            let gids = [gid];
            check(
                libc::syscall(libc::SYS_setgroups, 1 as libc::c_long, gids.as_ptr()) as c_int,
                "setgroups",
                c"",
            )?;
            check(libc::syscall(libc::SYS_setgid, gid) as c_int, "setgid", c"")?;
            check(libc::syscall(libc::SYS_setuid, uid) as c_int, "setuid", c"")?;
        }
        check(
            libc::chdir(plan.working_directory.as_ptr()),
            "chdir",
            &plan.working_directory,
        )?;
        // Whatever the executor left open without CLOEXEC must not reach
        // the action (Rust opens everything CLOEXEC; this is the backstop).
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
    Ok(())
}

/// `move_mount`'s flag: the source is the descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn run_ops(ops: &[Op]) -> io::Result<()> {
    for op in ops {
        // SAFETY: every pointer is a NUL-terminated string owned by `op`
        // (or null where the syscall allows it).
        unsafe {
            match op {
                Op::Mkdir { path, mode } => {
                    if libc::mkdir(path.as_ptr(), *mode) < 0 && errno() != libc::EEXIST {
                        return Err(failure("mkdir", path));
                    }
                }
                Op::Symlink { target, link } => {
                    if libc::symlink(target.as_ptr(), link.as_ptr()) < 0 && errno() != libc::EEXIST
                    {
                        return Err(failure("symlink", link));
                    }
                }
                Op::Touch { path } => {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd < 0 {
                        return Err(failure("creating", path));
                    }
                    libc::close(fd);
                }
                Op::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    data,
                    optional,
                } => {
                    let result = libc::mount(
                        pointer(source),
                        target.as_ptr(),
                        pointer(fstype),
                        *flags as libc::c_ulong,
                        pointer(data).cast(),
                    );
                    if result < 0 && !optional {
                        return Err(failure("mount", target));
                    }
                }
                Op::AttachTree { tree, target } => {
                    let result = libc::syscall(
                        libc::SYS_move_mount,
                        *tree,
                        c"".as_ptr(),
                        libc::AT_FDCWD,
                        target.as_ptr(),
                        MOVE_MOUNT_F_EMPTY_PATH,
                    );
                    if result < 0 {
                        return Err(failure("move_mount", target));
                    }
                }
            }
        }
    }
    Ok(())
}

/// `struct ifreq` with the flags member, as SIOCGIFFLAGS uses it.
#[repr(C)]
struct InterfaceFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _padding: [u8; 22],
}

/// A new network namespace has `lo`, down: bring it up so the action can
/// talk to itself.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a socket and two ioctls on a properly sized, owned ifreq.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(socket, "socket", c"")?;
        let mut request = InterfaceFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _padding: [0; 22],
        };
        request.name[..2].copy_from_slice(b"lo");
        let result = if libc::ioctl(socket, libc::SIOCGIFFLAGS as _, &mut request) < 0 {
            -1
        } else {
            request.flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(socket, libc::SIOCSIFFLAGS as _, &request)
        };
        let outcome = check(result, "bringing up", c"lo");
        libc::close(socket);
        outcome
    }
}

/// The program, arguments and environment as execve wants them, built
/// before the clone.
pub(crate) struct Exec {
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// The arguments, then the environment (`NAME=value`): what `argv` and
    /// `envp` point into (heap buffers never move).
    strings: Vec<CString>,
    /// How many of `strings` are arguments.
    arguments: usize,
}

// SAFETY: the raw pointers point into `strings`, owned by the same value
// and never mutated; sharing or sending them is as safe as the CStrings.
unsafe impl Send for Exec {}
// SAFETY: as above; nothing mutates through the pointers.
unsafe impl Sync for Exec {}

impl Exec {
    /// `program` run with `arguments` (the first is argv[0]) and exactly
    /// `environment`. Fails on a NUL byte.
    pub fn new(
        program: &std::path::Path,
        arguments: &[String],
        environment: &[(String, String)],
    ) -> io::Result<Exec> {
        use std::os::unix::ffi::OsStrExt;
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the command");
        let program = CString::new(program.as_os_str().as_bytes()).map_err(nul)?;
        let arguments: Vec<CString> = arguments
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(nul))
            .collect::<io::Result<_>>()?;
        let environment: Vec<CString> = environment
            .iter()
            .map(|(name, value)| CString::new(format!("{name}={value}")).map_err(nul))
            .collect::<io::Result<_>>()?;
        Ok(Exec::from_parts(program, arguments, environment))
    }

    /// `program` run with `arguments` (the first is argv[0]) and the
    /// `NAME=value` entries of `environment`.
    pub fn from_parts(
        program: CString,
        arguments: Vec<CString>,
        environment: Vec<CString>,
    ) -> Exec {
        let pointers = |strings: &[CString]| {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(ptr::null()))
                .collect::<Vec<_>>()
        };
        let argv = pointers(&arguments);
        let envp = pointers(&environment);
        let count = arguments.len();
        let mut strings = arguments;
        strings.extend(environment);
        Exec {
            program,
            argv,
            envp,
            strings,
            arguments: count,
        }
    }

    pub fn program(&self) -> &CStr {
        &self.program
    }

    pub fn arguments(&self) -> &[CString] {
        &self.strings[..self.arguments]
    }

    pub fn environment(&self) -> &[CString] {
        &self.strings[self.arguments..]
    }

    fn argv0(&self) -> &CStr {
        self.arguments().first().map_or(c"", |a| a.as_c_str())
    }
}

/// Descriptors the child makes its stdin, stdout and stderr.
pub(crate) struct Stdio {
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
}

/// How an action's process comes to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Cloned straight into new namespaces with `CLONE_VM | CLONE_VFORK`,
    /// as posix_spawn does: the child borrows the caller's address space
    /// until it execs, so nothing is copied, and the caller is suspended
    /// until then (a millisecond or two). The action is PID 1.
    Cloned,
    /// `dockerInit`: a copy of the caller (a fork) runs [`enter`], which
    /// makes the intermediate, init and the action.
    WithInit,
}

impl Start {
    /// `dockerInit`'s way, or the default.
    pub fn of(platform: &kiln_platform::Platform) -> Start {
        if platform.docker_init {
            Start::WithInit
        } else {
            Start::Cloned
        }
    }
}

/// Why [`spawn`] failed, and the child it leaves to reap.
#[derive(Debug)]
pub(crate) struct SpawnFailure {
    pub error: io::Error,
    /// A child that failed its setup (described on the action's stderr)
    /// and exits with [`SETUP_FAILED`]; only its parent can reap it.
    pub unreaped: Option<libc::pid_t>,
}

impl From<io::Error> for SpawnFailure {
    fn from(error: io::Error) -> SpawnFailure {
        SpawnFailure {
            error,
            unreaped: None,
        }
    }
}

struct CloneArguments<'a> {
    plan: &'a Plan,
    exec: &'a Exec,
    stdio: &'a Stdio,
    /// Write end of a CLOEXEC pipe: one byte means setup failed.
    report: RawFd,
}

const STACK_BYTES: usize = 256 << 10;

/// The stack a child of [`spawn`] runs on until it execs: a private
/// mapping with a guard page below it. The launcher keeps one for its
/// life (it starts one child at a time, and `spawn` returns only once the
/// child is done with the stack, or has its own copy of it); a caller
/// with several threads makes one per call.
pub(crate) struct Stack {
    base: *mut libc::c_void,
}

// SAFETY: the mapping is owned by the value; `spawn` takes it by `&mut`,
// so one child at a time runs on it.
unsafe impl Send for Stack {}

impl Stack {
    pub fn new() -> io::Result<Stack> {
        // SAFETY: a fresh anonymous mapping, owned by the Stack.
        unsafe {
            let base = libc::mmap(
                ptr::null_mut(),
                STACK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            libc::mprotect(base, 4096, libc::PROT_NONE);
            Ok(Stack { base })
        }
    }

    /// Its highest address, where a downward-growing stack starts.
    fn top(&mut self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is how clone
        // takes a stack.
        unsafe { self.base.cast::<u8>().add(STACK_BYTES).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used by any child.
        unsafe { libc::munmap(self.base, STACK_BYTES) };
    }
}

/// Starts the action `start`'s way and returns its pid, leading its own
/// process group, once it has exec'd: the call waits for that. With
/// `sibling`, the action is the child of the caller's parent
/// (`CLONE_PARENT`), which then waits for it and reaps it: how the
/// launcher starts actions for the executor ([`crate::launcher`]).
/// Otherwise it is the caller's child.
///
/// A setup failure (described on the action's stderr) is an error with
/// code [`SETUP_FAILED`] naming the exited child its parent must reap. A
/// program that cannot be executed is not an error: it exits 127 (126
/// when not executable), saying so on stderr.
pub(crate) fn spawn(
    plan: &Plan,
    exec: &Exec,
    stdio: &Stdio,
    start: Start,
    sibling: bool,
    stack: &mut Stack,
) -> Result<libc::pid_t, SpawnFailure> {
    if let Some(user) = plan.user {
        give_directories(&plan.owned_directories, user)?;
    }
    let mut report = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let [report_read, report_write] = report;
    let arguments = CloneArguments {
        plan,
        exec,
        stdio,
        report: report_write,
    };
    let mut flags = libc::SIGCHLD;
    if sibling {
        flags |= libc::CLONE_PARENT;
    }
    let entry: extern "C" fn(*mut libc::c_void) -> c_int = match start {
        Start::Cloned => {
            flags |= libc::CLONE_VM | libc::CLONE_VFORK;
            if plan.namespaces {
                flags |= libc::CLONE_NEWPID
                    | libc::CLONE_NEWNS
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWUTS;
            }
            // A plain process too gets a network namespace of its own for
            // `dockerNetwork=off`.
            if plan.network == Network::Empty {
                flags |= libc::CLONE_NEWNET;
            }
            clone_main
        }
        // A copy of the caller, which `enter` turns into the intermediate.
        Start::WithInit => init_main,
    };
    // SAFETY: under CLONE_VM the child runs on `stack` until it has exec'd
    // or exited (CLONE_VFORK suspends this thread until then), and
    // `arguments` outlives its use for the same reason; without CLONE_VM
    // the child has its own copy of both. All signals are blocked across
    // the clone so no handler of the caller runs in the child before it
    // resets them.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let pid = libc::clone(
            entry,
            stack.top(),
            flags,
            (&arguments as *const CloneArguments).cast_mut().cast(),
        );
        let error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, ptr::null_mut());
        libc::close(report_write);
        if pid < 0 {
            libc::close(report_read);
            return Err(error.into());
        }
        pid
    };
    let mut byte = 0u8;
    // SAFETY: reads one byte into a stack variable. The write end is closed
    // in this process; the read ends at the action's exec (which closes the
    // last copy) or at a failed setup's one byte.
    let failed = unsafe {
        let failed = loop {
            match libc::read(report_read, (&mut byte as *mut u8).cast(), 1) {
                -1 if errno() == libc::EINTR => continue,
                read => break read == 1,
            }
        };
        libc::close(report_read);
        failed
    };
    if failed {
        return Err(SpawnFailure {
            error: io::Error::from_raw_os_error(SETUP_FAILED),
            unreaped: Some(pid),
        });
    }
    Ok(pid)
}

/// Restores the signal dispositions and mask a child of [`spawn`] starts
/// with the caller's.
fn reset_signals_and_mask() {
    reset_signals();
    // SAFETY: an emptied signal set; restores delivery the parent blocked.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, ptr::null_mut());
    }
}

/// [`Start::Cloned`]'s child: sets up, then execs. Runs on its own stack
/// in the caller's address space, so it must not allocate or take locks.
extern "C" fn clone_main(arguments: *mut libc::c_void) -> c_int {
    // SAFETY: the parent passes a CloneArguments that outlives this child.
    let arguments = unsafe { &*(arguments as *const CloneArguments) };
    reset_signals_and_mask();
    // SAFETY: runs in the freshly cloned child, over a prepared plan.
    if unsafe { prepare_cloned(arguments) }.is_err() {
        write_all(arguments.report, b"!");
        return SETUP_FAILED;
    }
    exec_action(arguments)
}

/// [`Start::WithInit`]'s child, a copy of the caller: becomes the
/// intermediate (see [`enter`]); only the action returns from that, to
/// exec.
extern "C" fn init_main(arguments: *mut libc::c_void) -> c_int {
    // SAFETY: this child's copy of the parent's CloneArguments.
    let arguments = unsafe { &*(arguments as *const CloneArguments) };
    reset_signals_and_mask();
    // SAFETY: a fresh copy of the caller, single-threaded, over a plan
    // prepared before the clone.
    let entered = unsafe { stdio_and_group(arguments.stdio).and_then(|()| enter(arguments.plan)) };
    if entered.is_err() {
        write_all(arguments.report, b"!");
        return SETUP_FAILED;
    }
    exec_action(arguments)
}

/// Execs the action (never returns when that works); a program that
/// cannot be executed is reported on stderr and is the exit code.
fn exec_action(arguments: &CloneArguments) -> c_int {
    let exec = arguments.exec;
    // ETXTBSY is retried, briefly, as `kiln_worker::process::supervise`
    // does. Started by the launcher, this child's descriptors are the
    // launcher's, which never opens an input; started in the executor (no
    // launcher installed), a fork elsewhere in it may hold the just-written
    // program open for writing until that fork execs. This child's own
    // copies of the caller's descriptors (all CLOEXEC by now) are closed
    // first, so that it is never the one holding the program.
    close_descriptors_above_stdio_except(arguments.report);
    let mut retries = BUSY_TEXT_RETRIES;
    let code = loop {
        // SAFETY: NUL-terminated program and NULL-terminated argv/envp arrays.
        unsafe {
            libc::execve(
                exec.program.as_ptr(),
                exec.argv.as_ptr(),
                exec.envp.as_ptr(),
            )
        };
        let code = errno();
        if code != libc::ETXTBSY || retries == 0 {
            break code;
        }
        retries -= 1;
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: BUSY_TEXT_PAUSE.as_nanos() as libc::c_long,
        };
        // SAFETY: nanosleep is async-signal-safe and reads only `pause`.
        unsafe { libc::nanosleep(&pause, ptr::null_mut()) };
    };
    let (what, exit): (&[u8], c_int) = match code {
        libc::ENOENT | libc::ENOTDIR => (b"command not found", 127),
        libc::EACCES | libc::EPERM => (b"permission denied", 126),
        _ => (b"cannot execute", 126),
    };
    write_all(2, b"kiln: ");
    write_all(2, exec.argv0().to_bytes());
    write_all(2, b": ");
    write_all(2, what);
    write_all(2, b" in the sandbox (errno ");
    let mut buffer = [0; 20];
    write_all(2, decimal(code as u64, &mut buffer));
    write_all(2, b")\n");
    exit
}

/// The child's stdin, stdout and stderr, and a process group it leads.
unsafe fn stdio_and_group(stdio: &Stdio) -> io::Result<()> {
    // SAFETY: dup2 and setpgid on descriptors the parent keeps open until
    // this child execs.
    unsafe {
        for (from, to) in [(stdio.stdin, 0), (stdio.stdout, 1), (stdio.stderr, 2)] {
            check(libc::dup2(from, to), "dup2", c"")?;
        }
        check(libc::setpgid(0, 0), "setpgid", c"")
    }
}

/// Stdio, process group, cgroup and namespaces for the cloned child.
unsafe fn prepare_cloned(arguments: &CloneArguments) -> io::Result<()> {
    let plan = arguments.plan;
    // SAFETY (whole body): direct syscalls on descriptors and strings the
    // parent keeps alive until this child execs.
    unsafe {
        stdio_and_group(arguments.stdio)?;
        join_cgroups(plan)?;
        if plan.namespaces {
            // After joining, so the action's cgroup is its "/".
            check(
                libc::unshare(libc::CLONE_NEWCGROUP),
                "unshare(CLONE_NEWCGROUP)",
                c"",
            )?;
            join_network(plan)?;
            setup_root(plan)?;
        } else if plan.network == Network::Empty {
            loopback_up()?;
        }
        action(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_need_no_allocation() {
        let mut buffer = [0; 20];
        assert_eq!(decimal(0, &mut buffer), b"0");
        assert_eq!(decimal(4_194_304, &mut buffer), b"4194304");
        assert_eq!(decimal(u64::MAX, &mut buffer), b"18446744073709551615");
    }
}
