//! The executor's handle on an action started by [`crate::launcher::start`]
//! (its child, whichever process cloned it): tokio cannot adopt a pid, so this waits
//! on a pidfd instead and implements [`kiln_worker::process::Process`]
//! for the shared supervision.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use kiln_worker::process::Process;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A cloned child of this process, reaped through its pidfd.
#[derive(Debug)]
pub(crate) struct ClonedChild {
    pid: libc::pid_t,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl ClonedChild {
    /// Takes charge of child `pid` (which must not be reaped elsewhere).
    pub fn new(pid: libc::pid_t) -> io::Result<ClonedChild> {
        // SAFETY: pidfd_open returns a new descriptor (or -1), owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let error = io::Error::last_os_error();
            reap_in_background(pid);
            return Err(error);
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns; the OwnedFd
        // keeps it open, unchanged, for as long as the AsyncFd holds it.
        let pidfd = unsafe {
            let fd = OwnedFd::from_raw_fd(fd as i32);
            AsyncFd::register_with_interest(fd, Interest::READABLE)
        };
        let pidfd = match pidfd {
            Ok(pidfd) => pidfd,
            Err(error) => {
                reap_in_background(pid);
                return Err(error.into());
            }
        };
        Ok(ClonedChild {
            pid,
            pidfd,
            status: None,
        })
    }

    fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            let mut status = 0;
            // SAFETY: WNOHANG waitpid on our own child.
            match unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) } {
                0 => {}
                pid if pid == self.pid => self.status = Some(ExitStatus::from_raw(status)),
                _ => return Err(io::Error::last_os_error()),
            }
        }
        Ok(self.status)
    }
}

#[async_trait::async_trait]
impl Process for ClonedChild {
    fn id(&self) -> Option<u32> {
        self.status.is_none().then_some(self.pid as u32)
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_reap()? {
                return Ok(status);
            }
            // A pidfd turns readable when its process exits.
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }
}

impl Drop for ClonedChild {
    fn drop(&mut self) {
        if self.status.is_none() {
            reap_in_background(self.pid);
        }
    }
}

/// SIGKILLs `pid` (PID 1 of its namespaces, so everything in them dies)
/// and reaps it on a thread, so no zombie is left when a run is dropped.
fn reap_in_background(pid: libc::pid_t) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: blocking waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    });
}
