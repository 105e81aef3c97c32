//! A root Kiln process switching to a user of its own (`--run-as`).
//!
//! Once its launchers run (see [`crate::launcher`]), what a root executor
//! still does as root is reached through them, so the executor itself can
//! become an ordinary user: it then owns no file of root's, can change
//! nothing outside what is that user's, and a program it runs starts with
//! no capability at all. What that takes of the host is done as root just
//! before ([`crate::cgroup::CgroupRoot::give_to`],
//! [`crate::network::prepare_host`]); the switch itself is [`switch_to`].

use std::io;
use std::path::Path;

use rustix::process::{Gid, Uid};
use rustix::thread::CapabilitySet;

/// Makes `dir` and what is missing above it as this process would as
/// `user` (None: root) keeping only the capabilities `keep`: in a child
/// that becomes that first, so that root's whole power makes nothing the
/// process will not be able to use once it has switched. Only while this
/// process has one thread.
pub fn make_directory_as(
    dir: &Path,
    user: Option<(u32, u32)>,
    keep: CapabilitySet,
) -> io::Result<()> {
    crate::capabilities::only_thread("a child can become the user")?;
    let make = || -> io::Result<()> {
        if let Some((uid, gid)) = user {
            switch_to(uid, gid)?;
        }
        crate::capabilities::keep_only(keep)?;
        std::fs::create_dir_all(dir)
    };
    // SAFETY: one thread: the child is a whole copy of this process, and
    // only changes its own credentials, makes directories and exits.
    match unsafe { libc::fork() } {
        0 => {
            let code = i32::from(make().is_err());
            // SAFETY: ends the child without the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        -1 => Err(io::Error::last_os_error()),
        child => {
            let mut status = 0;
            // SAFETY: waits for the child just forked.
            if unsafe { libc::waitpid(child, &mut status, 0) } != child {
                return Err(io::Error::last_os_error());
            }
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{} cannot be made as the process will be", dir.display()),
                ))
            }
        }
    }
}

/// Switches this process to `uid` and `gid`, with no supplementary groups,
/// for good (real, effective and saved ids): the kernel clears every
/// capability with it. Only while the process has one thread (ids
/// belong to a thread, and a new thread copies its creator's); refuses
/// otherwise.
pub fn switch_to(uid: u32, gid: u32) -> io::Result<()> {
    crate::capabilities::only_thread("the user can be switched")?;
    if uid == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "uid 0 is root, not a user of its own",
        ));
    }
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    rustix::thread::set_thread_groups(&[])?;
    rustix::thread::set_thread_res_gid(gid, gid, gid)?;
    rustix::thread::set_thread_res_uid(uid, uid, uid)?;
    let now = rustix::thread::capabilities(None)?;
    if rustix::process::geteuid() != uid
        || rustix::process::getuid() != uid
        || !now.permitted.is_empty()
    {
        return Err(io::Error::other(
            "the switch did not take: still root, or still holding capabilities",
        ));
    }
    Ok(())
}
