//! The workspace steps only root can take, taken for the worker
//! ([`kiln_worker::workspace::PrivilegedSteps`]): mounting and detaching
//! workspace overlays, and giving workspace directories to an action's
//! user. By the launchers on a root executor, so that the process holding
//! the executor's network, CAS and file cache makes no mount and changes
//! no owner itself; in the calling process where no launcher is installed
//! (a server embedded in another program, the crates' own tests).
//!
//! A launcher takes only what these steps need: absolute paths of plain
//! components (no `.` or `..`); for a mount, a fixed file system type,
//! source and flags (`overlay`, nosuid, nodev) and options from a fixed
//! list; for a directory, `lchown` (a symlink in its place is not
//! followed). Giving directories as an action starts travels in the start
//! request itself ([`crate::child::Plan::owned_directories`]); the request
//! here is for an action no start precedes (one served by a persistent
//! worker already running).

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_worker::workspace::{OverlayLayers, PrivilegedSteps, OVERLAY_OPTIONS};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::child::{check_plain_path, give_directories};
use crate::launcher;
use crate::view::c_path;

/// Takes the steps through the launchers when they are installed, else in
/// this process.
#[derive(Debug, Default)]
pub struct ThroughLaunchers;

/// What takes the workspace's root-only steps for an executor running as
/// this process does: [`ThroughLaunchers`] when it is root, nothing
/// otherwise.
pub fn steps() -> Option<Arc<dyn PrivilegedSteps>> {
    rustix::process::geteuid()
        .is_root()
        .then(|| Arc::new(ThroughLaunchers) as Arc<dyn PrivilegedSteps>)
}

impl PrivilegedSteps for ThroughLaunchers {
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

    /// Does it, after checking it is a workspace overlay's step and nothing
    /// else. Blocking: one mount or umount call.
    pub(crate) fn perform(&self) -> io::Result<()> {
        match self {
            Request::Mount { options, layers } => {
                for layer in layers {
                    check_plain_path(layer)?;
                }
                let options = options
                    .to_str()
                    .ok()
                    .filter(|options| OVERLAY_OPTIONS.contains(options))
                    .ok_or_else(|| invalid(format!("overlay options {options:?}")))?;
                let [lower, upper, work, target] = layers;
                let mut data = Vec::new();
                for (key, dir) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
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
                let data = CString::new(data).map_err(|_| invalid("a NUL byte"))?;
                rustix::mount::mount(
                    "kiln-workspace",
                    target.as_c_str(),
                    "overlay",
                    MountFlags::NOSUID | MountFlags::NODEV,
                    data.as_c_str(),
                )
                .map_err(io::Error::from)
            }
            Request::Detach(target) => {
                check_plain_path(target)?;
                rustix::mount::unmount(target.as_c_str(), UnmountFlags::DETACH)
                    .map_err(io::Error::from)
            }
            Request::Give { owner, directories } => give_directories(directories, *owner),
        }
    }
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
}
