//! The steps only root can take, taken for the worker: for a workspace
//! ([`kiln_worker::workspace::PrivilegedSteps`]), mounting and detaching
//! its overlay, giving its directories to an action's user, and taking
//! back what a finished action's user made; for an action's processes,
//! signalling the process group it leads ([`signal_group`]), which runs
//! as another user. By the launchers on a root executor, so that the
//! process holding the executor's network, CAS and file cache makes no
//! mount, changes no owner and signals no other user's process itself;
//! in the calling process where no launcher is installed (a server
//! embedded in another program, the crates' own tests).
//!
//! A launcher takes only what these steps need, and only under the work
//! root its policy names ([`Confinement`], [`crate::launch::Policy`]):
//! absolute paths of plain components (no `.` or `..`), each opened
//! beneath the work root it holds open without following any symlink,
//! the step then taken on what was opened; for a mount, a fixed file
//! system type, source and flags (`overlay`, nosuid, nodev) and options
//! from a fixed list; for a take-back, a walk through descriptors that
//! follows no symlink and leaves the directory's file system. Giving
//! directories as an action starts travels in the start request itself
//! ([`crate::launch::Launch::owned_directories`]); the request here is for an
//! action no start precedes (one served by a persistent worker already
//! running). A signal is only SIGTERM or SIGKILL, sent only to the
//! process group led by a child of the executor (an action it started and
//! has not reaped): never to a pid the executor got wrong. A cgroup is
//! emptied only if it is an action cgroup of the executor's.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_worker::workspace::{OverlayLayers, PrivilegedSteps, OVERLAY_OPTIONS};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, CWD};
use rustix::mount::{MountFlags, UnmountFlags};
use rustix::process::{Gid, Uid};

use crate::child::{check_plain_path, give_directories};
use crate::launcher;
use crate::view::c_path;

/// Takes the steps through the launchers when they are installed, else in
/// this process.
#[derive(Debug, Default)]
pub struct ThroughLaunchers;

/// What takes the workspace's root-only steps for an executor running as
/// this process does: [`ThroughLaunchers`] when it is root or has
/// launchers (see [`launcher::root_behind`]), nothing otherwise.
pub fn steps() -> Option<Arc<dyn PrivilegedSteps>> {
    launcher::root_behind().then(|| Arc::new(ThroughLaunchers) as Arc<dyn PrivilegedSteps>)
}

impl PrivilegedSteps for ThroughLaunchers {
    fn confine(&self, work_root: &Path) -> io::Result<()> {
        launcher::privileged(&Request::Confine(c_path(work_root)))
    }

    fn mount(&self, layers: &OverlayLayers, options: &str) -> io::Result<()> {
        let request = Request::mount(layers, options)?;
        let mounted = launcher::privileged(&request);
        if mounted
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionAborted)
        {
            // The launcher died with the request, perhaps after mounting.
            let _ = launcher::privileged(&Request::Detach(c_path(&layers.target)));
        }
        mounted
    }

    fn detach(&self, target: &Path) -> io::Result<()> {
        launcher::privileged(&Request::Detach(c_path(target)))
    }

    fn give(&self, directories: &[PathBuf], (uid, gid): (u32, u32)) -> io::Result<()> {
        if directories.is_empty() {
            return Ok(());
        }
        launcher::privileged(&Request::Give {
            owner: (uid, gid),
            directories: directories.iter().map(|dir| c_path(dir)).collect(),
        })
    }

    fn take_back(&self, directory: &Path, files: &[PathBuf], owner: (u32, u32)) -> io::Result<()> {
        let files = files
            .iter()
            .map(|file| {
                let relative = file.strip_prefix(directory).map_err(|_| {
                    invalid(format!(
                        "{} is not under {}",
                        file.display(),
                        directory.display()
                    ))
                })?;
                Ok(c_path(relative))
            })
            .collect::<io::Result<_>>()?;
        launcher::privileged(&Request::TakeBack {
            owner,
            directory: c_path(directory),
            files,
        })
    }
}

/// A root-only step on a workspace, as a launcher receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// Mount an overlay: `options` (one of [`OVERLAY_OPTIONS`], which the
    /// worker's probe tries), then the lower, upper and work directories
    /// and the target.
    Mount {
        options: CString,
        layers: [CString; 4],
    },
    /// Detach the mount at this path.
    Detach(CString),
    /// Give these directories to `owner` (`uid`, `gid`).
    Give {
        owner: (u32, u32),
        directories: Vec<CString>,
    },
    /// Give `directory` and every directory under it, and the regular
    /// `files` (relative to it) that have one link (or whose every link
    /// is listed), to `owner`; a listed directory has every single-link
    /// file under it given too.
    TakeBack {
        owner: (u32, u32),
        directory: CString,
        files: Vec<CString>,
    },
    /// Check that the launcher's work root is this directory (its policy
    /// fixed it: another is refused); see [`Confinement`].
    Confine(CString),
    /// Send `signal` (SIGTERM or SIGKILL) to the process group `leader`
    /// leads, `leader` being a child of the executor.
    Signal { leader: i32, signal: i32 },
    /// SIGKILL every process in this action cgroup (a v1 leaf, which has
    /// no `cgroup.kill`), one of the executor's or of one gone.
    KillCgroup(CString),
}

/// Where a launcher's privileged steps may act: nowhere until its policy
/// names the work root, and from then on only on paths under it (the
/// workspaces and directories of its starts included). So a launcher
/// changes no owner and mounts nothing elsewhere, whatever path the
/// executor's side sends it.
///
/// Naming a path under the work root is not enough: a taken-over
/// executor running as a user of its own owns the directories there, and
/// can put a symlink to anywhere in one's place. So the work root is held
/// open from the moment the policy names it (opened then, by root, before
/// anything of the executor's ran; or handed over by the launcher that
/// started this one), and every path is opened beneath that descriptor
/// without following any symlink ([`Confinement::open_beneath`]); the
/// step then acts on what was opened, not on the path again.
#[derive(Debug, Default)]
pub(crate) struct Confinement(Option<WorkRoot>);

#[derive(Debug)]
struct WorkRoot {
    path: CString,
    /// The work root held open; None if it did not exist when the policy
    /// named it (a server that runs no actions), when every step refuses.
    dir: Option<OwnedFd>,
}

impl Confinement {
    /// Checks that `path` (plain, absolute) is under the work root, or is
    /// it, by name: what [`Confinement::open_beneath`] then holds to.
    pub(crate) fn check(&self, path: &CStr) -> io::Result<()> {
        self.relative(path).map(drop)
    }

    /// `path` relative to the work root (`.` for the root itself), if it
    /// is under it by name.
    fn relative(&self, path: &CStr) -> io::Result<CString> {
        check_plain_path(path)?;
        let Some(root) = &self.0 else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "no work root given: no privileged step yet",
            ));
        };
        let bytes = path.to_bytes();
        match bytes.strip_prefix(root.path.to_bytes()) {
            Some([] | [b'/']) => Ok(c".".to_owned()),
            Some([b'/', rest @ ..]) => CString::new(rest).map_err(|_| invalid("a NUL byte")),
            _ => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not under the work root {}",
                    String::from_utf8_lossy(bytes),
                    root.path.to_string_lossy()
                ),
            )),
        }
    }

    /// Opens `path` (under the work root by name) beneath the work root's
    /// descriptor, with `flags` (plus `O_NOFOLLOW`, `O_CLOEXEC`), through
    /// no symlink at all and no `..`. A symlink on the way, wherever the
    /// executor's side put it, is refused (PermissionDenied, naming the
    /// path), so the step acts on a directory that really is under the
    /// work root.
    pub(crate) fn open_beneath(&self, path: &CStr, flags: OFlags) -> io::Result<OwnedFd> {
        let relative = self.relative(path)?;
        let root = self.0.as_ref().expect("checked by relative");
        let dir = root.dir.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "the work root {} did not exist when this launcher took its policy",
                    root.path.to_string_lossy()
                ),
            )
        })?;
        rustix::fs::openat2(
            dir,
            relative.as_c_str(),
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|errno| match errno {
            // A symlink on the way (ELOOP), in the last place (ENOTDIR,
            // asked for a directory), or a way out (EXDEV).
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR | rustix::io::Errno::XDEV => {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{}: not reached beneath the work root without a symlink ({errno}): \
                         refused",
                        path.to_string_lossy()
                    ),
                )
            }
            other => io::Error::new(
                io::Error::from(other).kind(),
                format!("{}: {other}", path.to_string_lossy()),
            ),
        })
    }

    /// Gives `directories` (each opened beneath the work root) to `uid`,
    /// `gid`.
    pub(crate) fn give(&self, directories: &[CString], (uid, gid): (u32, u32)) -> io::Result<()> {
        for directory in directories {
            let fd = self.open_beneath(directory, OFlags::PATH | OFlags::DIRECTORY)?;
            rustix::fs::chownat(
                &fd,
                c"",
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                AtFlags::EMPTY_PATH,
            )?;
        }
        Ok(())
    }

    /// Takes `root` as the work root, opening it now; a different one
    /// after it is refused (the same again is fine).
    pub(crate) fn confine(&mut self, root: &CStr) -> io::Result<()> {
        self.confine_held(root, None)
    }

    /// Takes `root` as the work root, held open as `dir` (handed over by
    /// the launcher that started this one) or, without it, opened now.
    pub(crate) fn confine_held(&mut self, root: &CStr, dir: Option<OwnedFd>) -> io::Result<()> {
        check_plain_path(root)?;
        let root = root
            .to_bytes()
            .strip_suffix(b"/")
            .unwrap_or(root.to_bytes());
        let root = CString::new(root).map_err(|_| invalid("a NUL byte"))?;
        match &self.0 {
            Some(given) if given.path != root => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("already confined to {}", given.path.to_string_lossy()),
            )),
            Some(_) => Ok(()),
            None => {
                let dir = match dir {
                    Some(dir) => Some(dir),
                    None => match rustix::fs::open(
                        root.as_c_str(),
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        Ok(dir) => Some(dir),
                        Err(rustix::io::Errno::NOENT) => None,
                        Err(e) => return Err(e.into()),
                    },
                };
                if let Some(dir) = &dir {
                    let stat = rustix::fs::fstat(dir)?;
                    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
                        return Err(invalid("a work root that is not a directory"));
                    }
                }
                self.0 = Some(WorkRoot { path: root, dir });
                Ok(())
            }
        }
    }

    /// The work root held open, for a launcher this one starts.
    pub(crate) fn held(&self) -> Option<BorrowedFd<'_>> {
        self.0.as_ref()?.dir.as_ref().map(AsFd::as_fd)
    }
}

/// `/proc/self/fd/N` for `fd`: a path that names exactly what `fd` was
/// opened on, whatever is at its old path now.
pub(crate) fn fd_path(fd: BorrowedFd<'_>) -> CString {
    use std::os::fd::AsRawFd;
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// Where what `fd` was opened on is now, as the kernel names it.
fn opened_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    std::fs::read_link(OsStr::from_bytes(fd_path(fd).as_bytes()))
}

impl Request {
    fn mount(layers: &OverlayLayers, options: &str) -> io::Result<Request> {
        let OverlayLayers {
            lower,
            upper,
            work,
            target,
        } = layers;
        Ok(Request::Mount {
            options: CString::new(options).map_err(|_| invalid("options with a NUL byte"))?,
            layers: [c_path(lower), c_path(upper), c_path(work), c_path(target)],
        })
    }

    /// Does it in a launcher: confines `confinement`, or takes the step
    /// on what it opens beneath the work root (see [`Confinement`]).
    pub(crate) fn perform_within(&self, confinement: &mut Confinement) -> io::Result<()> {
        let directory = OFlags::PATH | OFlags::DIRECTORY;
        match self {
            Request::Confine(root) => confinement.confine(root),
            // The launcher's parent is the executor, whose children the
            // actions are (they are cloned with CLONE_PARENT).
            Request::Signal { leader, signal } => {
                signal_group(*leader, *signal, rustix::process::getppid())
            }
            Request::KillCgroup(directory) => kill_cgroup(directory, rustix::process::getppid()),
            Request::Mount { options, layers } => {
                let opened = layers
                    .iter()
                    .map(|layer| confinement.open_beneath(layer, directory))
                    .collect::<io::Result<Vec<_>>>()?;
                let paths: Vec<CString> = opened.iter().map(|fd| fd_path(fd.as_fd())).collect();
                // Checked by their names, as the errors say; mounted by
                // what was opened.
                overlay_data(options, layers)?;
                mount_overlay(options, &paths[..3], &paths[3])
            }
            Request::Detach(target) => {
                let opened = confinement.open_beneath(target, directory)?;
                rustix::mount::unmount(fd_path(opened.as_fd()).as_c_str(), UnmountFlags::DETACH)
                    .map_err(io::Error::from)
            }
            Request::Give { owner, directories } => confinement.give(directories, *owner),
            Request::TakeBack {
                owner,
                directory,
                files,
            } => {
                let top =
                    confinement.open_beneath(directory, OFlags::RDONLY | OFlags::DIRECTORY)?;
                take_back(top, files, *owner)
            }
        }
    }

    /// Does it, after checking it is a workspace overlay's step and nothing
    /// else (in the calling process, where no launcher is installed, a
    /// confinement is nothing to keep). Blocking.
    pub(crate) fn perform(&self) -> io::Result<()> {
        match self {
            Request::Confine(_) => Ok(()),
            Request::Signal { leader, signal } => {
                signal_group(*leader, *signal, Some(rustix::process::getpid()))
            }
            Request::KillCgroup(directory) => {
                kill_cgroup(directory, Some(rustix::process::getpid()))
            }
            Request::Mount { options, layers } => {
                for layer in layers {
                    check_plain_path(layer)?;
                }
                mount_overlay(options, &layers[..3], &layers[3])
            }
            Request::Detach(target) => {
                check_plain_path(target)?;
                rustix::mount::unmount(target.as_c_str(), UnmountFlags::DETACH)
                    .map_err(io::Error::from)
            }
            Request::Give { owner, directories } => give_directories(directories, *owner),
            Request::TakeBack {
                owner,
                directory,
                files,
            } => {
                check_plain_path(directory)?;
                let top = rustix::fs::openat2(
                    CWD,
                    directory.as_c_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::NO_SYMLINKS,
                )?;
                take_back(top, files, *owner)
            }
        }
    }
}

/// The overlay's mount data for `layers` (lower, upper, work): each
/// layer's key and path, then `options` (one of [`OVERLAY_OPTIONS`]).
fn overlay_data(options: &CStr, layers: &[CString]) -> io::Result<CString> {
    let options = options
        .to_str()
        .ok()
        .filter(|options| OVERLAY_OPTIONS.contains(options))
        .ok_or_else(|| invalid(format!("overlay options {options:?}")))?;
    let mut data = Vec::new();
    for (key, dir) in ["lowerdir", "upperdir", "workdir"].iter().zip(layers) {
        // The option string's own separators and escape.
        if dir.as_bytes().iter().any(|b| b",:\\".contains(b)) {
            return Err(invalid(format!(
                "{} cannot be an overlay layer: its path has a ',', ':' or '\\'",
                dir.to_string_lossy()
            )));
        }
        data.extend_from_slice(key.as_bytes());
        data.push(b'=');
        data.extend_from_slice(dir.as_bytes());
        data.push(b',');
    }
    data.extend_from_slice(options.as_bytes());
    if data.last() == Some(&b',') {
        data.pop();
    }
    CString::new(data).map_err(|_| invalid("a NUL byte"))
}

/// Mounts a workspace overlay of `layers` (lower, upper, work) at
/// `target`: nosuid, nodev, `options` from [`OVERLAY_OPTIONS`].
fn mount_overlay(options: &CStr, layers: &[CString], target: &CStr) -> io::Result<()> {
    let data = overlay_data(options, layers)?;
    rustix::mount::mount(
        "kiln-workspace",
        target,
        "overlay",
        MountFlags::NOSUID | MountFlags::NODEV,
        data.as_c_str(),
    )
    .map_err(io::Error::from)
}

/// Sends `signal` to the process group `leader` leads, after checking
/// that it is a stop signal (SIGTERM or SIGKILL), that `leader` is a child
/// of `executor` (an action, alive or not yet reaped: a reaped one's pid
/// may name another process by now) and that it leads its group.
/// PermissionDenied otherwise, naming the pid; ESRCH when it is gone.
pub(crate) fn signal_group(
    leader: i32,
    signal: i32,
    executor: Option<rustix::process::Pid>,
) -> io::Result<()> {
    let refused = |why: String| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("not signalling process group {leader}: {why}"),
        )
    };
    let signal = match signal {
        libc::SIGTERM => rustix::process::Signal::TERM,
        libc::SIGKILL => rustix::process::Signal::KILL,
        other => return Err(refused(format!("signal {other} is not SIGTERM or SIGKILL"))),
    };
    let pid = rustix::process::Pid::from_raw(leader)
        .filter(|pid| !pid.is_init())
        .ok_or_else(|| refused("not a pid an action can have".into()))?;
    let fields = kiln_worker::process::stat_fields(leader as u32).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => io::Error::from_raw_os_error(libc::ESRCH),
        _ => e,
    })?;
    // After the state: the parent's pid and the process group.
    let number = |at: usize| fields.get(at).and_then(|field| field.parse::<i32>().ok());
    let (parent, group) = (number(1), number(2));
    let executor = executor.map(|pid| pid.as_raw_nonzero().get());
    if parent.is_none() || parent != executor {
        return Err(refused(format!(
            "pid {leader} is not a child of the executor (its parent is {})",
            parent.unwrap_or(0)
        )));
    }
    if group != Some(leader) {
        return Err(refused(format!(
            "pid {leader} does not lead its process group"
        )));
    }
    rustix::process::kill_process_group(pid, signal).map_err(io::Error::from)
}

/// SIGKILLs every process listed in `directory`'s `cgroup.procs`, after
/// checking that it is an action cgroup: a plain path on a cgroup file
/// system whose name is `<pid>-<n>` ([`crate::cgroup::action_cgroup_name`])
/// with `pid` the executor's, or a process's no longer running (what
/// [`crate::cgroup::CgroupRoot::remove_stale`] empties). PermissionDenied
/// otherwise, naming the directory.
/// The executor an action cgroup's directory `name` (`<pid>-<n>`, see
/// [`crate::cgroup::action_cgroup_name`]) belongs to; None for any other
/// name.
fn action_cgroup_owner(name: &[u8]) -> Option<i32> {
    let (pid, n) = std::str::from_utf8(name).ok()?.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether a file system `statfs` describes is a cgroup hierarchy (v1 or
/// v2).
// The field's and the constants' types differ between targets.
#[allow(clippy::unnecessary_cast)]
fn is_cgroup_file_system(statfs: &rustix::fs::StatFs) -> bool {
    let found = statfs.f_type as i64;
    found == libc::CGROUP_SUPER_MAGIC as i64 || found == libc::CGROUP2_SUPER_MAGIC as i64
}

/// The effective uid of process `pid`; None once it is gone.
fn uid_of(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
}

/// The executor a launcher serves, as [`join_file_as_root`] checks files
/// against it: its pid, and its uid once it is a user of its own, read
/// when first needed and kept (the switch is for good).
#[derive(Debug)]
pub(crate) struct Executor {
    pid: i32,
    user: Option<u32>,
}

impl Executor {
    pub fn new(pid: i32) -> Executor {
        Executor { pid, user: None }
    }

    /// Its uid, if it is not root.
    fn user(&mut self) -> Option<u32> {
        if self.user.is_none() {
            self.user = uid_of(self.pid).filter(|&uid| uid != 0);
        }
        self.user
    }
}

/// The file a starting action writes to, to join one of its cgroups:
/// `fd` as the executor sent it, or None to use it as it is. An executor
/// running as a user of its own (see [`crate::run_as`]) opens its action
/// cgroups' `tasks` and `cgroup.procs` as that user, and cgroup v1 refuses
/// the write of a process that is another user's (the child is root
/// until it execs). Such a file is opened again here, as root: only if
/// it is on a cgroup file system, owned by the executor's user (not
/// root), and is the join file of an action cgroup of `executor`
/// (`<pid>-<n>`). Opened through the descriptor, so it is the same file
/// whatever its path has become; PermissionDenied otherwise.
pub(crate) fn join_file_as_root(
    fd: BorrowedFd,
    executor: &mut Executor,
) -> io::Result<Option<OwnedFd>> {
    let owner = rustix::fs::fstat(fd)?.st_uid;
    if owner == 0 {
        return Ok(None);
    }
    let path = opened_path(fd)?;
    let refused = |why: &str| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("not joining {} as root: {why}", path.display()),
        )
    };
    if executor.user() != Some(owner) {
        return Err(refused("it is not the executor's user's"));
    }
    if !is_cgroup_file_system(&rustix::fs::fstatfs(fd)?) {
        return Err(refused("not on a cgroup file system"));
    }
    let join_file = path
        .file_name()
        .is_some_and(|name| name == "tasks" || name == "cgroup.procs");
    let action_cgroup = path
        .parent()
        .and_then(Path::file_name)
        .and_then(|name| action_cgroup_owner(name.as_bytes()))
        .is_some_and(|owner| owner == executor.pid);
    if !join_file || !action_cgroup {
        return Err(refused("not the join file of one of its action cgroups"));
    }
    let reopened = rustix::fs::open(
        fd_path(fd).as_c_str(),
        OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(Some(reopened))
}

pub(crate) fn kill_cgroup(
    directory: &CStr,
    executor: Option<rustix::process::Pid>,
) -> io::Result<()> {
    check_plain_path(directory)?;
    let refused = |why: &str| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("not emptying {}: {why}", directory.to_string_lossy()),
        )
    };
    let named = directory
        .to_bytes()
        .rsplit(|b| *b == b'/')
        .next()
        .and_then(action_cgroup_owner);
    let Some(owner) = named else {
        return Err(refused("not an action cgroup's name, <pid>-<n>"));
    };
    let executor = executor.map(|pid| pid.as_raw_nonzero().get());
    if Some(owner) != executor && Path::new(&format!("/proc/{owner}")).exists() {
        return Err(refused("it belongs to another running process"));
    }
    // Judged again by what was opened, not by the name sent: a symlink
    // named like an action cgroup may lead to any other.
    let opened = rustix::fs::open(
        directory,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let resolved = opened_path(opened.as_fd())?;
    let resolved_owner = resolved
        .file_name()
        .and_then(|name| action_cgroup_owner(name.as_bytes()));
    if resolved_owner != Some(owner) {
        return Err(refused(&format!(
            "it leads to {}, not an action cgroup's name",
            resolved.display()
        )));
    }
    if !is_cgroup_file_system(&rustix::fs::fstatfs(&opened)?) {
        return Err(refused("not on a cgroup file system"));
    }
    let procs = rustix::fs::openat(
        &opened,
        c"cgroup.procs",
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut listed = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(procs), &mut listed)?;
    for pid in listed
        .lines()
        .filter_map(|line| line.trim().parse::<i32>().ok())
        .filter_map(rustix::process::Pid::from_raw)
    {
        // ESRCH: gone already, as wanted.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    Ok(())
}

/// Deepest level below a taken-back directory that is walked: each level
/// holds a descriptor open in the launcher.
const TAKE_BACK_DEPTH: usize = 256;

/// Gives `directory`, each directory under it on its file system (to
/// [`TAKE_BACK_DEPTH`] levels), and each of `files` (relative to it) that
/// is a regular file with a single link to `owner`; a listed directory
/// (an output directory) has every such file under it given too, and a
/// listed file whose every link is a listed file is given as well. No
/// symlink is followed and no other file system entered, through
/// descriptors, so an action that left symlinks or swapped names reaches
/// nothing outside. A file with more than one link may also be somewhere
/// else (another action's, a host file its owner linked) and stays as it
/// is. Files that are missing or unreachable that way are left; deeper
/// levels make it an error (`ELOOP`) once the rest is done.
fn take_back(top: OwnedFd, files: &[CString], (uid, gid): (u32, u32)) -> io::Result<()> {
    let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    let ours = |stat: &rustix::fs::Stat| stat.st_uid == uid && stat.st_gid == gid;
    let beneath = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV;
    // A regular file with one link, reached from `parent` without a
    // symlink, is given; anything else is left. Returns what was found.
    let take_file = |parent: BorrowedFd<'_>, name: &CStr| -> io::Result<Option<rustix::fs::Stat>> {
        let Ok(fd) = rustix::fs::openat2(
            parent,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            beneath,
        ) else {
            return Ok(None);
        };
        let stat = rustix::fs::fstat(&fd)?;
        let single =
            FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile && stat.st_nlink == 1;
        if single && !ours(&stat) {
            rustix::fs::chownat(&fd, c"", owner.0, owner.1, AtFlags::EMPTY_PATH)?;
        }
        Ok(Some(stat))
    };
    // Listed directories: every file under them is given as well. Listed
    // files with more than one link: given if every link is a listed file
    // (an action that declared `a` and `b` and made one a link of the
    // other), once all are counted.
    let mut trees = Vec::new();
    let mut linked: Vec<LinkedOutput> = Vec::new();
    for file in files {
        let Some(stat) = take_file(top.as_fd(), file.as_c_str())? else {
            continue;
        };
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => trees.push((stat.st_dev, stat.st_ino)),
            FileType::RegularFile if stat.st_nlink > 1 && !ours(&stat) => {
                if let Some(output) = LinkedOutput::find(top.as_fd(), file, beneath)? {
                    linked.push(output);
                }
            }
            _ => {}
        }
    }
    give_linked_outputs(&linked, owner)?;
    // Depth first, one descriptor per level: each directory is taken back
    // as it is entered, then its subdirectories one at a time (and, within
    // a listed directory, its files).
    let mut too_deep = false;
    let mut walking: Vec<(Dir, bool)> = Vec::new();
    let mut entered = Some(top);
    loop {
        if let Some(dir) = entered.take() {
            let stat = rustix::fs::fstat(&dir)?;
            if !ours(&stat) {
                rustix::fs::fchown(&dir, owner.0, owner.1)?;
            }
            let with_files = walking.last().is_some_and(|(_, files)| *files)
                || trees.contains(&(stat.st_dev, stat.st_ino));
            if walking.len() < TAKE_BACK_DEPTH {
                walking.push((Dir::new(dir)?, with_files));
            } else {
                too_deep = true;
            }
        }
        let Some((level, with_files)) = walking.last_mut() else {
            break;
        };
        let on_file: Option<&OnFile<'_>> = if *with_files {
            Some(&|parent, name| take_file(parent, name).map(drop))
        } else {
            None
        };
        match next_subdirectory(level, beneath, on_file)? {
            Some(subdirectory) => entered = Some(subdirectory),
            None => {
                walking.pop();
            }
        }
    }
    if too_deep {
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    Ok(())
}

/// A listed output with more than one link, and which link it is: its
/// directory's device and inode, and its name there (two listed paths
/// that reach the same directory entry are one link).
struct LinkedOutput {
    file: OwnedFd,
    inode: (u64, u64),
    links: u64,
    link: ((u64, u64), CString),
}

impl LinkedOutput {
    /// The listed output `path` beneath `top`, opened again with its
    /// directory; None when it is not reachable that way any more.
    fn find(top: BorrowedFd<'_>, path: &CStr, resolve: ResolveFlags) -> io::Result<Option<Self>> {
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(std::ffi::OsStr::from_bytes(path.to_bytes()));
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(None);
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let directory = rustix::fs::openat2(
            top,
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        );
        let (Ok(directory), Ok(name)) = (directory, CString::new(name.as_bytes())) else {
            return Ok(None);
        };
        let Ok(file) = rustix::fs::openat2(
            directory.as_fd(),
            name.as_c_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        ) else {
            return Ok(None);
        };
        let (at, stat) = (rustix::fs::fstat(&directory)?, rustix::fs::fstat(&file)?);
        Ok(Some(LinkedOutput {
            file,
            inode: (stat.st_dev, stat.st_ino),
            links: stat.st_nlink,
            link: ((at.st_dev, at.st_ino), name),
        }))
    }
}

/// Gives each of `linked` whose every link is among them (counted by
/// distinct link, and its link count unchanged since) to `owner`; the
/// others stay, as any file a name outside may reach.
fn give_linked_outputs(
    linked: &[LinkedOutput],
    (uid, gid): (Option<Uid>, Option<Gid>),
) -> io::Result<()> {
    for (at, output) in linked.iter().enumerate() {
        if linked[..at].iter().any(|seen| seen.inode == output.inode) {
            continue;
        }
        let mut links: Vec<&((u64, u64), CString)> = linked
            .iter()
            .filter(|other| other.inode == output.inode)
            .map(|other| &other.link)
            .collect();
        links.sort();
        links.dedup();
        if links.len() as u64 == output.links
            && rustix::fs::fstat(&output.file)?.st_nlink == output.links
        {
            rustix::fs::chownat(&output.file, c"", uid, gid, AtFlags::EMPTY_PATH)?;
        }
    }
    Ok(())
}

/// What a walk does with a file it passes: given its directory and name.
type OnFile<'a> = dyn Fn(BorrowedFd<'_>, &CStr) -> io::Result<()> + 'a;

/// The next entry of `dir` that is a directory on its file system, opened;
/// None when there is none left. Each other entry passed on the way goes
/// to `on_file`, when given.
fn next_subdirectory(
    dir: &mut Dir,
    resolve: ResolveFlags,
    on_file: Option<&OnFile<'_>>,
) -> io::Result<Option<OwnedFd>> {
    while let Some(entry) = dir.next() {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let parent = dir.fd()?;
        let is_dir = match entry.file_type() {
            FileType::Directory => true,
            FileType::Unknown => rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|stat| FileType::from_raw_mode(stat.st_mode) == FileType::Directory),
            _ => false,
        };
        if !is_dir {
            if let Some(on_file) = on_file {
                if matches!(entry.file_type(), FileType::RegularFile | FileType::Unknown) {
                    on_file(parent, name)?;
                }
            }
            continue;
        }
        // A name swapped for a symlink or a mount since it was listed is
        // not entered.
        if let Ok(subdirectory) = rustix::fs::openat2(
            parent.as_fd(),
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        ) {
            return Ok(Some(subdirectory));
        }
    }
    Ok(None)
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a workspace overlay's: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stop_signals_reach_only_the_groups_of_the_executors_children() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let me = Some(rustix::process::getpid());
        let sleeper = |own_group: bool| {
            let mut command = std::process::Command::new("sleep");
            command.arg("30");
            if own_group {
                command.process_group(0);
            }
            command.spawn().unwrap()
        };
        let mut leader = sleeper(true);
        let pid = leader.id() as i32;
        for (signal, what) in [(libc::SIGSTOP, "signal 19"), (libc::SIGHUP, "signal 1")] {
            let error = signal_group(pid, signal, me).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
            assert!(error.to_string().contains(what), "{error}");
        }
        // Not the executor's child: the test's parent, and init.
        let parent = rustix::process::getppid().unwrap().as_raw_nonzero().get();
        let error = signal_group(parent, libc::SIGTERM, me).unwrap_err();
        assert!(
            error.to_string().contains("not a child of the executor"),
            "{error}"
        );
        let error = signal_group(1, libc::SIGKILL, me).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        // A child that does not lead a group of its own.
        let mut follower = sleeper(false);
        let error = signal_group(follower.id() as i32, libc::SIGKILL, me).unwrap_err();
        assert!(error.to_string().contains("does not lead"), "{error}");
        follower.kill().unwrap();
        follower.wait().unwrap();

        signal_group(pid, libc::SIGTERM, me).unwrap();
        assert_eq!(leader.wait().unwrap().signal(), Some(libc::SIGTERM));
        // Reaped: gone.
        let error = signal_group(pid, libc::SIGKILL, me).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ESRCH), "{error}");
    }

    #[test]
    fn only_the_join_files_of_a_user_executors_action_cgroups_are_opened_as_root() {
        use std::os::fd::AsFd;
        use std::os::unix::process::CommandExt as _;
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        // The executor: a process of that user's.
        const USER: u32 = 64_123;
        let user_process = || {
            std::process::Command::new("sleep")
                .arg("60")
                .uid(USER)
                .gid(USER)
                .spawn()
                .unwrap()
        };
        let (mut executor, mut another) = (user_process(), user_process());
        let pid = executor.id() as i32;
        let give = |path: &Path| std::os::unix::fs::chown(path, Some(USER), Some(USER)).unwrap();
        let refused = |file: &std::fs::File, why: &str| {
            let error = join_file_as_root(file.as_fd(), &mut Executor::new(pid)).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
            assert!(error.to_string().contains(why), "{error}");
        };

        // Root's own: used as sent.
        let roots = tempfile::NamedTempFile::new().unwrap();
        assert!(
            join_file_as_root(roots.as_file().as_fd(), &mut Executor::new(pid))
                .unwrap()
                .is_none()
        );
        // The user's, but no cgroup's.
        let dir = tempfile::tempdir().unwrap();
        let named = dir.path().join(format!("{pid}-0"));
        std::fs::create_dir(&named).unwrap();
        std::fs::write(named.join("tasks"), "").unwrap();
        give(&named.join("tasks"));
        refused(
            &std::fs::File::open(named.join("tasks")).unwrap(),
            "not on a cgroup file system",
        );
        // Another user's.
        let others = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::chown(others.path(), Some(USER + 1), None).unwrap();
        refused(others.as_file(), "not the executor's user's");

        // Cgroups handed to the user, as `--run-as` does.
        let cgroups = match crate::cgroup::CgroupRoot::detect("kiln-join-test") {
            Err(reason) if std::env::var_os("CI").is_some() => panic!("no cgroups: {reason}"),
            Err(reason) => {
                eprintln!("cgroup part skipped: {reason}");
                None
            }
            Ok(root) => Some(root),
        };
        if let Some(root) = cgroups {
            root.give_to(USER, USER).unwrap();
            for (_, parent) in root.parents() {
                let action = parent.join(format!("{pid}-7"));
                let other = parent.join("not-an-action");
                for made in [&action, &other] {
                    // Left by an earlier run that failed, perhaps.
                    let _ = std::fs::remove_dir(made);
                    std::fs::create_dir(made).unwrap();
                    give(made);
                }
                for join in ["tasks", "cgroup.procs"] {
                    let path = action.join(join);
                    if !path.exists() {
                        continue;
                    }
                    give(&path);
                    let sent = std::fs::File::open(&path).unwrap();
                    let reopened = join_file_as_root(sent.as_fd(), &mut Executor::new(pid))
                        .unwrap()
                        .unwrap();
                    let flags = rustix::fs::fcntl_getfl(&reopened).unwrap();
                    assert!(flags.contains(OFlags::WRONLY), "{path:?}: {flags:?}");
                    // Not that executor's: another process of the user's.
                    let error =
                        join_file_as_root(sent.as_fd(), &mut Executor::new(another.id() as i32))
                            .unwrap_err();
                    assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
                }
                let control = other.join("cgroup.procs");
                give(&control);
                refused(&std::fs::File::open(&control).unwrap(), "not the join file");
                for made in [&action, &other] {
                    std::fs::remove_dir(made).unwrap();
                }
                std::fs::remove_dir(parent).unwrap();
            }
        }
        for process in [&mut executor, &mut another] {
            process.kill().unwrap();
            process.wait().unwrap();
        }
    }

    #[test]
    fn only_action_cgroups_are_emptied() {
        let me = Some(rustix::process::getpid());
        let dir = tempfile::tempdir().unwrap();
        let refused = |path: &Path, why: &str| {
            let error = kill_cgroup(&c_path(path), me).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
            assert!(error.to_string().contains(why), "{error}");
        };
        refused(&dir.path().join("kiln"), "not an action cgroup's name");
        // pid 1 runs: its cgroups are not the executor's.
        refused(&dir.path().join("1-3"), "another running process");
        // The executor's name, but not a cgroup.
        let own = dir.path().join(format!("{}-3", std::process::id()));
        std::fs::create_dir(&own).unwrap();
        std::fs::write(own.join("cgroup.procs"), "1\n").unwrap();
        refused(&own, "not on a cgroup file system");
        let error = kill_cgroup(c"/sys/fs/cgroup/../1-3", me).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        // Named as the executor's, but a symlink to another cgroup (an
        // empty one made for the test, should the check ever fail).
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped the symlink to another cgroup: needs root");
            return;
        }
        let hierarchy = [
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup",
        ]
        .into_iter()
        .find(|path| rustix::fs::statfs(*path).is_ok_and(|s| is_cgroup_file_system(&s)))
        .expect("a cgroup file system");
        let other = Path::new(hierarchy).join(format!("kiln-test-{}", std::process::id()));
        std::fs::create_dir(&other).unwrap();
        let link = dir.path().join(format!("{}-4", std::process::id()));
        std::os::unix::fs::symlink(&other, &link).unwrap();
        let result = kill_cgroup(&c_path(&link), me);
        std::fs::remove_dir(&other).unwrap();
        let error = result.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        assert!(
            error.to_string().contains("not an action cgroup's name"),
            "{error}"
        );
    }

    #[test]
    fn only_a_workspace_overlays_steps_are_taken() {
        let layers = |target: &str| OverlayLayers {
            lower: "/w/a/inputs".into(),
            upper: "/w/a/upper".into(),
            work: "/w/a/overlay-work".into(),
            target: target.into(),
        };
        // Refused before any mount call (the tests need not be root).
        for target in ["relative/workspace", "/w/a/../../etc", "/w/./a", "/w/a/."] {
            let request = Request::mount(&layers(target), "").unwrap();
            let error = request.perform().unwrap_err();
            assert_eq!(
                error.kind(),
                io::ErrorKind::InvalidInput,
                "{target}: {error}"
            );
            assert!(error.to_string().contains("path: "), "{error}");
        }
        let request = Request::mount(&layers("/w/a/workspace"), "lowerdir=/etc").unwrap();
        let error = request.perform().unwrap_err();
        assert!(error.to_string().contains("options"), "{error}");
        let mut comma = layers("/w/a/workspace");
        comma.lower = "/w/a,b".into();
        let error = Request::mount(&comma, "").unwrap().perform().unwrap_err();
        assert!(error.to_string().contains("','"), "{error}");
        // Names that merely start with a dot are plain.
        assert!(check_plain_path(c"/root/.cache/kiln/work/a/workspace").is_ok());
        let error = Request::Detach(c"/w/../etc".to_owned())
            .perform()
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
    }

    #[test]
    fn a_take_back_gives_the_tree_back_and_reaches_nothing_outside_it() {
        use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
        if !rustix::process::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root, this process does not"
            );
            eprintln!("skipped: taking back needs root");
            return;
        }
        const NOBODY: (u32, u32) = (65534, 65534);
        let temp = tempfile::tempdir().unwrap();
        let give = |path: &Path| chown(path, Some(NOBODY.0), Some(NOBODY.1)).unwrap();
        // What an action's user left: directories (one it closed to
        // others), outputs, and ways out.
        let tree = temp.path().join("workspace");
        let closed = tree.join("out/closed");
        std::fs::create_dir_all(closed.join("inner")).unwrap();
        std::fs::write(closed.join("single.o"), "a").unwrap();
        std::fs::write(tree.join("out/linked.o"), "b").unwrap();
        let outside = temp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("host-file"), "c").unwrap();
        std::fs::write(outside.join("alone"), "d").unwrap();
        std::fs::hard_link(outside.join("host-file"), tree.join("out/host-link")).unwrap();
        std::fs::hard_link(tree.join("out/linked.o"), outside.join("second-name")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("out/escape")).unwrap();
        // An output directory, listed: the files under it go too; the
        // files of a directory not listed stay.
        let listed = tree.join("out/listed");
        std::fs::create_dir_all(listed.join("sub")).unwrap();
        std::fs::write(listed.join("a.o"), "e").unwrap();
        std::fs::write(listed.join("sub/b.o"), "f").unwrap();
        std::fs::write(listed.join("twice.o"), "g").unwrap();
        std::fs::hard_link(listed.join("twice.o"), outside.join("listed-link")).unwrap();
        std::os::unix::fs::symlink(outside.join("alone"), listed.join("sub/escape")).unwrap();
        // Listed files linked to each other only: given. One linked
        // outside, listed twice by two spellings: one link of two, kept.
        std::fs::write(tree.join("out/pair-a"), "i").unwrap();
        std::fs::hard_link(tree.join("out/pair-a"), tree.join("out/pair-b")).unwrap();
        std::fs::write(tree.join("out/solo"), "j").unwrap();
        std::fs::hard_link(tree.join("out/solo"), outside.join("solo-link")).unwrap();
        std::fs::create_dir(tree.join("unlisted")).unwrap();
        std::fs::write(tree.join("unlisted/c.o"), "h").unwrap();
        // Deeper than a take-back walks.
        let mut deep = tree.join("deep");
        for _ in 0..TAKE_BACK_DEPTH + 2 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        for entry in [&tree, &outside]
            .into_iter()
            .flat_map(|dir| walk(dir.as_path()))
            .chain([tree.clone(), outside.clone()])
        {
            std::os::unix::fs::lchown(&entry, Some(NOBODY.0), Some(NOBODY.1)).unwrap();
        }
        give(&closed);
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();

        let files = [
            "out/closed/single.o",
            "out/linked.o",
            "out/host-link",
            "out/escape/alone",
            "../outside/alone",
            "out/listed",
            "out/pair-a",
            "out/pair-b",
            "out/solo",
            "out/../out/solo",
            "missing",
        ]
        .map(|file| tree.join(file));
        let error = ThroughLaunchers
            .take_back(&tree, &files, (0, 0))
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ELOOP), "{error}");

        let owner = |path: &Path| {
            let meta = path.symlink_metadata().unwrap();
            (meta.uid(), meta.gid())
        };
        for dir in [&tree, &tree.join("out"), &closed, &closed.join("inner")] {
            assert_eq!(owner(dir), (0, 0), "{}", dir.display());
        }
        assert_eq!(owner(&closed.join("single.o")), (0, 0));
        for file in [
            listed.join("a.o"),
            listed.join("sub/b.o"),
            listed.join("sub"),
            tree.join("out/pair-a"),
        ] {
            assert_eq!(owner(&file), (0, 0), "{}", file.display());
        }
        // Files with a second name, files of directories not listed, and
        // everything outside, stay as they were.
        for file in [
            listed.join("twice.o"),
            listed.join("sub/escape"),
            tree.join("out/solo"),
            tree.join("unlisted/c.o"),
            tree.join("out/linked.o"),
            tree.join("out/host-link"),
            tree.join("out/escape"),
            outside.join("host-file"),
            outside.join("alone"),
            outside.clone(),
        ] {
            assert_eq!(owner(&file), NOBODY, "{}", file.display());
        }
        // The levels the walk reached are the executor's, the rest not.
        let mut level = tree.join("deep");
        for _ in 0..TAKE_BACK_DEPTH - 1 {
            level.push("d");
        }
        assert_eq!(owner(&level), (0, 0));
        assert_eq!(owner(&deep), NOBODY);
        // A directory outside the one named is refused before anything.
        let error = ThroughLaunchers
            .take_back(&tree, &[outside.join("host-file")], (0, 0))
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
    }

    #[test]
    fn a_launcher_takes_steps_under_its_work_root_alone() {
        use std::os::unix::fs::MetadataExt;
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("work");
        let inside = root.join("a/workspace");
        let beside = temp.path().join("work-beside");
        for dir in [&inside, &beside] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let give = |dir: &Path| Request::Give {
            owner: (65534, 65534),
            directories: vec![c_path(dir)],
        };
        let take_back = |dir: &Path| Request::TakeBack {
            owner: (65534, 65534),
            directory: c_path(dir),
            files: Vec::new(),
        };
        let denied = |result: io::Result<()>| {
            let error = result.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        };
        let mut confinement = Confinement::default();
        // Nothing before the work root is named.
        denied(give(&inside).perform_within(&mut confinement));
        Request::Confine(c_path(&root))
            .perform_within(&mut confinement)
            .unwrap();
        // Outside it, or beside it with a name it starts with: refused,
        // before any change.
        denied(give(&beside).perform_within(&mut confinement));
        denied(Request::Detach(c_path(temp.path())).perform_within(&mut confinement));
        denied(take_back(&beside).perform_within(&mut confinement));
        assert_ne!(beside.metadata().unwrap().uid(), 65534);
        // Another root later: refused; the same again: fine.
        denied(Request::Confine(c_path(temp.path())).perform_within(&mut confinement));
        Request::Confine(c_path(&root))
            .perform_within(&mut confinement)
            .unwrap();
        assert!(confinement.check(&c_path(&inside)).is_ok());
        assert!(confinement.check(&c_path(&root)).is_ok());
        if rustix::process::geteuid().is_root() {
            give(&inside).perform_within(&mut confinement).unwrap();
            assert_eq!(inside.metadata().unwrap().uid(), 65534);
        }
        // A path under the work root through a symlink (which a taken-over
        // executor can make there) to somewhere else: refused, whichever
        // step, before any change.
        let elsewhere = beside.join("sub");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&beside, root.join("a/escape")).unwrap();
        let through = root.join("a/escape/sub");
        denied(give(&through).perform_within(&mut confinement));
        denied(Request::Detach(c_path(&through)).perform_within(&mut confinement));
        denied(take_back(&through).perform_within(&mut confinement));
        let layers = |last: &Path| Request::Mount {
            options: CString::new(OVERLAY_OPTIONS[0]).unwrap(),
            layers: [
                c_path(&inside),
                c_path(&inside),
                c_path(&inside),
                c_path(last),
            ],
        };
        denied(layers(&through).perform_within(&mut confinement));
        assert_ne!(elsewhere.metadata().unwrap().uid(), 65534);
        assert_eq!(
            std::fs::read_dir(&elsewhere).unwrap().count(),
            0,
            "nothing mounted or made there"
        );
    }

    /// Every path under `dir`, not following symlinks.
    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                found.extend(walk(&entry.path()));
            }
            found.push(entry.path());
        }
        found
    }
}
