//! The capabilities a root executor keeps once its launchers run.
//!
//! The launchers take the root-only steps of starting an action and of its
//! workspace (see [`crate::launcher`], [`crate::privileged`]), so the
//! executor's own process, the one that talks to the scheduler, the CAS
//! and the file cache, needs far less than root's whole set. It keeps
//! what [`Needs`] says and drops the rest from its effective, permitted and
//! inheritable sets. What it still does as root it does as the owner of
//! root's files alone: it can read or change no file of another user (an
//! action's, or anyone's on the host) that its mode keeps from others,
//! change no owner and no mode but its own, and it cannot switch users,
//! trace processes or load modules.
//!
//! The bounding set is kept whole: the programs the executor runs as root
//! (`kiln launcher`, `podman`, `nft`, QEMU) start with root's capabilities
//! again, as they need. That makes this a guard against the executor's own
//! mistakes (a path it got wrong, a file an action made it follow), not
//! against code run inside it: that needs the executor to run as a user of
//! its own, which is where this is heading (ARCHITECTURE.md, "Where root
//! is").
//!
//! Capabilities belong to a thread, and a new thread copies its creator's.
//! [`keep_only`] is therefore called while the process has one thread,
//! before any runtime starts, and refuses otherwise.

use std::io;

pub use rustix::thread::CapabilitySet;

/// What a root process of Kiln's does itself, which decides what it keeps
/// of root's capabilities ([`Needs::capabilities`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// It starts QEMU into an action's network namespace (it offers
    /// `firecracker`). The namespaces themselves, and every other
    /// action's, are made and wired by the launchers.
    pub vm_networks: bool,
    /// It builds VM disks from image layers (it offers `firecracker`).
    pub vm_disks: bool,
    /// It listens on a port below 1024.
    pub low_port: bool,
}

impl Needs {
    /// What it keeps, each for a reason that names the code:
    /// - `SYS_ADMIN` (`vm_networks`): QEMU's `setns` into an action's
    ///   network namespace before it execs (`kiln-vm::qemu`);
    /// - `NET_BIND_SERVICE` (`low_port`): a server listening on a port
    ///   below 1024;
    /// - `vm_disks`: the executor unpacks image layers with their owners,
    ///   modes and file capabilities (`kiln-vm::image_disk`): `CHOWN`,
    ///   `FOWNER`, `FSETID`, `SETFCAP` and `DAC_OVERRIDE` (an image's
    ///   directory may be closed to its owner).
    ///
    /// So a server that runs no actions, and an executor that offers no
    /// `firecracker`, on ports above 1023, keep nothing.
    ///
    /// Never `DAC_READ_SEARCH`: what an action's user made is given to
    /// the executor through the launchers before the executor reads it
    /// (`kiln-worker`'s `take_back_outputs`). Never `KILL`: actions run as
    /// other users, and their process groups are signalled by the
    /// launchers ([`crate::launcher::signal_group`]), what is left in a
    /// cgroup killed through `cgroup.kill` or, on v1, by the launchers too.
    /// Never `NET_ADMIN`: bridged actions' namespaces are wired and
    /// unwired by the launchers ([`crate::launcher::wire`]).
    pub fn capabilities(self) -> CapabilitySet {
        let mut set = CapabilitySet::empty();
        if self.vm_networks {
            set |= CapabilitySet::SYS_ADMIN;
        }
        if self.low_port {
            set |= CapabilitySet::NET_BIND_SERVICE;
        }
        if self.vm_disks {
            set |= CapabilitySet::CHOWN
                | CapabilitySet::FOWNER
                | CapabilitySet::FSETID
                | CapabilitySet::SETFCAP
                | CapabilitySet::DAC_OVERRIDE;
        }
        set
    }
}

/// Drops every capability outside `keep` from this process's effective,
/// permitted and inheritable sets, for good. Only while the process has a
/// single thread (`EBUSY` otherwise: other threads would keep theirs).
pub fn keep_only(keep: CapabilitySet) -> io::Result<()> {
    only_thread("capabilities can be dropped")?;
    let current = rustix::thread::capabilities(None)?;
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: current.effective & keep,
            permitted: current.permitted & keep,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    Ok(())
}

/// ResourceBusy, saying that what is `doing` (e.g. "capabilities can be
/// dropped") can be done only then, unless the process has one thread:
/// credentials belong to a thread, and a new thread copies its creator's.
pub(crate) fn only_thread(doing: &str) -> io::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("{doing} only while the process has one thread; it has {threads}"),
        ));
    }
    Ok(())
}

/// This process's effective capabilities.
pub fn effective() -> io::Result<CapabilitySet> {
    Ok(rustix::thread::capabilities(None)?.effective)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_not_dropped_while_another_thread_runs() {
        let before = effective().unwrap();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || stopped.recv());
        let error = keep_only(CapabilitySet::empty()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ResourceBusy, "{error}");
        assert!(error.to_string().contains("one thread"), "{error}");
        assert_eq!(effective().unwrap(), before);
        stop.send(()).unwrap();
        other.join().unwrap().unwrap();
    }

    #[test]
    fn only_what_a_process_does_is_kept() {
        assert_eq!(Needs::default().capabilities(), CapabilitySet::empty());
        let owners = CapabilitySet::CHOWN | CapabilitySet::FOWNER | CapabilitySet::DAC_OVERRIDE;
        let vm = Needs {
            vm_networks: true,
            vm_disks: true,
            ..Needs::default()
        };
        assert!(vm
            .capabilities()
            .contains(owners | CapabilitySet::SYS_ADMIN));
        let low = Needs {
            low_port: true,
            ..Needs::default()
        };
        assert_eq!(low.capabilities(), CapabilitySet::NET_BIND_SERVICE);
        let all = Needs {
            low_port: true,
            ..vm
        };
        let never = CapabilitySet::KILL
            | CapabilitySet::NET_ADMIN
            | CapabilitySet::DAC_READ_SEARCH
            | CapabilitySet::SETUID
            | CapabilitySet::SETGID;
        assert!(!all.capabilities().intersects(never));
    }
}
