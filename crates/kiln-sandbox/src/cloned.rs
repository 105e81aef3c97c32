//! The executor's handle on an action started by [`crate::launcher::start`]
//! (its child, whichever process cloned it): tokio cannot adopt a pid, so this waits
//! on a pidfd instead and implements [`kiln_worker::process::Process`]
//! for the shared supervision. Its signals go through the launchers
//! ([`crate::launcher::signal_group`]): the action runs as another user,
//! whom the executor, keeping no CAP_KILL, cannot signal itself.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use kiln_worker::process::{Pid, Process, Signal};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::launcher;

/// What ends the processes an action leaves behind once it has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leftovers {
    /// Its pid namespace (the action, or its init, is PID 1: the kernel
    /// kills the rest as it ends) or its cgroup (emptied by the caller).
    EndWithIt,
    /// Nothing but its process group, which is SIGKILLed as it ends,
    /// before it is reaped (while its pid still names the group).
    KillGroup,
}

impl Leftovers {
    /// For `launch`, started `start`'s way: a pid namespace for a sandbox
    /// or under an init, a cgroup when it joins one.
    pub fn of(launch: &crate::launch::Launch, start: crate::child::Start) -> Leftovers {
        let sandbox = matches!(launch.kind, crate::launch::Kind::Sandbox { .. });
        if sandbox || start == crate::child::Start::WithInit || !launch.cgroup_join.is_empty() {
            Leftovers::EndWithIt
        } else {
            Leftovers::KillGroup
        }
    }
}

/// A cloned child of this process, reaped through its pidfd.
#[derive(Debug)]
pub(crate) struct ClonedChild {
    pid: libc::pid_t,
    pidfd: AsyncFd<OwnedFd>,
    leftovers: Leftovers,
    status: Option<ExitStatus>,
}

impl ClonedChild {
    /// Takes charge of child `pid` (which must not be reaped elsewhere).
    pub fn new(pid: libc::pid_t, leftovers: Leftovers) -> io::Result<ClonedChild> {
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
            leftovers,
            status: None,
        })
    }

    /// Whether it has exited, leaving it unreaped.
    fn exited(&self) -> io::Result<bool> {
        // SAFETY: an all-zero siginfo_t is valid; waitid fills it in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: WNOWAIT | WNOHANG waitid on our own child: reaps nothing.
        let found = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if found < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid set si_pid (or left it zero: still running).
        Ok(unsafe { info.si_pid() } != 0)
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
            if let Some(status) = self.status {
                return Ok(status);
            }
            if self.leftovers == Leftovers::KillGroup && self.exited()? {
                signal(self.pid, Signal::KILL);
            }
            if self.try_reap()?.is_some() {
                continue;
            }
            // A pidfd turns readable when its process exits.
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    /// Only while it is not reaped: its pid is its own until then, and
    /// what is left of its group afterwards has ended with it
    /// ([`Leftovers`]).
    fn signal_group(&self, _group: Pid, signal_sent: Signal) {
        if self.status.is_none() {
            signal(self.pid, signal_sent);
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

/// Sends `signal` to the group `leader` leads, logging a failure.
fn signal(leader: libc::pid_t, signal: Signal) {
    if let Err(error) = launcher::signal_group(leader, signal.as_raw()) {
        tracing::warn!(pid = leader, ?signal, %error, "signalling an action's process group");
    }
}

/// SIGKILLs the group `pid` leads (PID 1 of its namespaces, so everything
/// in them dies) and reaps it on a thread, so no zombie is left when a run
/// is dropped.
fn reap_in_background(pid: libc::pid_t) {
    signal(pid, Signal::KILL);
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: blocking waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_worker::process::is_running as alive;

    /// A child leading its own group that starts `sleep` in that group,
    /// writes its pid into `pid_file` and exits: (the child, the sleep).
    fn leaving_a_process_behind(pid_file: &std::path::Path) -> (libc::pid_t, u32) {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("sleep 300 & echo $! > {}", pid_file.display()))
            .process_group(0)
            .spawn()
            .unwrap();
        // Reaped by the ClonedChild made from its pid, not by std.
        let pid = child.id() as libc::pid_t;
        std::mem::forget(child);
        while std::fs::read_to_string(pid_file).map_or(true, |text| !text.ends_with('\n')) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let left = std::fs::read_to_string(pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        (pid, left)
    }

    #[tokio::test]
    async fn a_group_nothing_else_ends_is_killed_as_its_leader_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (pid, left) = leaving_a_process_behind(&dir.path().join("killed"));
        let mut child = ClonedChild::new(pid, Leftovers::KillGroup).unwrap();
        assert!(child.wait().await.unwrap().success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while alive(left) {
            assert!(
                std::time::Instant::now() < deadline,
                "{left} outlived its group's leader"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }

        // The control: a group that something else ends is left alone.
        let (pid, left) = leaving_a_process_behind(&dir.path().join("kept"));
        let mut child = ClonedChild::new(pid, Leftovers::EndWithIt).unwrap();
        assert!(child.wait().await.unwrap().success());
        assert!(alive(left), "{left} was killed");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(left as libc::pid_t, libc::SIGKILL) };
    }
}
