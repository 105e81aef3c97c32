//! Paths a root process hands to another root program (dockerd, for the
//! docker gate of a `--run-as` executor) on behalf of a user who may
//! rename, replace or symlink anything it owns.
//!
//! A path the user named is resolved now, beneath one of a few roots and
//! through no symlink at all (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`), and what was opened is
//! bind-mounted (recursively) onto a fresh entry of a directory only root
//! can write. That entry is what the other program gets: every component
//! of its path is root's, so whatever the user does to its own path
//! afterwards (swapping a directory for a symlink to `/etc`, say), the
//! program reaches what was checked. The mount goes when the [`Pin`] is
//! dropped; a pins directory left by a process that died is emptied by the
//! next one.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

/// Where pinned paths are mounted, and the roots they must lie beneath.
#[derive(Debug)]
pub struct Pins {
    /// Root's directory (mode 0711) holding one entry per pin.
    dir: PathBuf,
    roots: Vec<PinRoot>,
    next: u64,
}

#[derive(Debug)]
struct PinRoot {
    path: PathBuf,
    /// Its longest part that existed when the pins were made, opened then
    /// as the path says (symlinks followed, as a launcher opens its work
    /// root: nothing the user runs has run yet), and what is left of it.
    existing: Option<(OwnedFd, PathBuf)>,
    /// The root itself, opened the first time a path beneath it is pinned
    /// (it may not exist before): what is left of it beneath the part
    /// that existed, through no symlink. Held from then on.
    fd: Option<OwnedFd>,
}

impl PinRoot {
    fn new(path: PathBuf) -> PinRoot {
        let existing = path.ancestors().find_map(|ancestor| {
            let opened = rustix::fs::open(
                ancestor,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()?;
            let rest = path
                .strip_prefix(ancestor)
                .expect("an ancestor")
                .to_path_buf();
            Some((opened, rest))
        });
        PinRoot {
            path,
            existing,
            fd: None,
        }
    }

    /// The root, opened now if not yet.
    fn open(&mut self) -> io::Result<&OwnedFd> {
        if self.fd.is_none() {
            let (base, rest) = self
                .existing
                .as_ref()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            let rest = if rest.as_os_str().is_empty() {
                Path::new(".")
            } else {
                rest
            };
            self.fd = Some(open_without_symlinks(base.as_fd(), rest)?);
        }
        Ok(self.fd.as_ref().expect("opened above"))
    }
}

/// One path pinned: its mount point, which the mount leaves with.
#[derive(Debug)]
pub struct Pin {
    target: PathBuf,
}

impl Pin {
    /// The root-owned path that reaches what was checked.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        release(&self.target);
    }
}

impl Pins {
    /// Pins beneath `roots` (absolute), mounted under `dir`: made as
    /// root's, mode 0711, or emptied of a previous process's pins.
    pub fn new(dir: &Path, roots: Vec<PathBuf>) -> io::Result<Pins> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(dir)?;
                if !meta.is_dir() || meta.uid() != rustix::process::geteuid().as_raw() {
                    return Err(io::Error::other(format!(
                        "{}: not a directory of this process's user",
                        dir.display()
                    )));
                }
                Pins::release_all(dir);
            }
            Err(e) => return Err(e),
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
        let roots = roots.into_iter().map(PinRoot::new).collect();
        Ok(Pins {
            dir: dir.to_path_buf(),
            roots,
            next: 0,
        })
    }

    /// Releases every pin left under `dir` (by a gate that is ending).
    pub fn release_all(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                release(&entry.path());
            }
        }
    }

    /// Pins `path`, a directory or a regular file beneath one of the
    /// roots; PermissionDenied, naming it, if it is beneath none or is
    /// reached only through a symlink.
    pub fn pin(&mut self, path: &Path) -> io::Result<Pin> {
        let refused = |why: &str| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: {why}: refused", path.display()),
            )
        };
        if !path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
            return Err(refused("not a plain absolute path"));
        }
        let root = self
            .roots
            .iter_mut()
            .find(|root| path.starts_with(&root.path))
            .ok_or_else(|| refused("beneath none of the directories it may be in"))?;
        let relative = path.strip_prefix(&root.path).expect("found by prefix");
        let relative = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        let root_path = root.path.clone();
        let dir = root.open().map_err(|e| {
            refused(&format!(
                "its root {} is not reached without a symlink: {e}",
                root_path.display()
            ))
        })?;
        let opened = open_without_symlinks(dir.as_fd(), relative)
            .map_err(|e| refused(&format!("not reached without a symlink ({e})")))?;
        let kind = FileType::from_raw_mode(rustix::fs::fstat(&opened)?.st_mode);
        self.next += 1;
        let target = self.dir.join(self.next.to_string());
        match kind {
            FileType::Directory => std::fs::create_dir(&target)?,
            FileType::RegularFile => drop(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)?,
            ),
            // O_NOFOLLOW opened the link itself.
            FileType::Symlink => return Err(refused("not reached without a symlink (a link)")),
            _ => return Err(refused("neither a directory nor a regular file")),
        }
        let pin = Pin { target };
        let source = crate::privileged::fd_path(opened.as_fd());
        rustix::mount::mount_bind_recursive(source.as_c_str(), pin.target.as_path())?;
        Ok(pin)
    }
}

/// Opens `path`, relative to `dir`, as `O_PATH`, refusing a symlink
/// anywhere on the way and a way out of `dir`.
fn open_without_symlinks(dir: rustix::fd::BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat2(dir, path, flags, Mode::empty(), resolve).map_err(io::Error::from)
}

/// Detaches whatever is mounted at `target` and removes it.
fn release(target: &Path) {
    let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
    let removed = match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) => Err(e),
    };
    if let Err(error) = removed {
        if error.kind() != io::ErrorKind::NotFound {
            tracing::warn!(target = %target.display(), %error, "could not remove a pin");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn a_pinned_path_reaches_what_was_checked_whatever_happens_to_its_name() {
        if !root() {
            eprintln!("skipped: pins take root (mounts)");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let allowed = base.path().join("work");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(allowed.join("ws")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(allowed.join("ws/mine"), "mine").unwrap();
        std::fs::write(outside.join("secret"), "secret").unwrap();
        let mut pins = Pins::new(&base.path().join("pins"), vec![allowed.clone()]).unwrap();

        let pin = pins.pin(&allowed.join("ws")).unwrap();
        // The user swaps its directory for a symlink to the outside.
        std::fs::rename(allowed.join("ws"), allowed.join("old")).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("ws")).unwrap();
        assert_eq!(
            std::fs::read_to_string(pin.path().join("mine")).unwrap(),
            "mine"
        );
        assert!(!pin.path().join("secret").exists());

        // A symlink on the way, or a path outside the roots: refused.
        let through = pins.pin(&allowed.join("ws")).unwrap_err();
        assert_eq!(through.kind(), io::ErrorKind::PermissionDenied, "{through}");
        let elsewhere = pins.pin(&outside).unwrap_err();
        assert_eq!(
            elsewhere.kind(),
            io::ErrorKind::PermissionDenied,
            "{elsewhere}"
        );
        let up = pins.pin(&allowed.join("../outside")).unwrap_err();
        assert_eq!(up.kind(), io::ErrorKind::PermissionDenied, "{up}");

        let target = pin.path().to_path_buf();
        drop(pin);
        assert!(!target.exists(), "the mount point goes with the pin");
        assert!(allowed.join("old/mine").exists(), "what was pinned stays");
    }

    #[test]
    fn a_root_made_after_the_pins_is_reached_through_no_symlink() {
        if !root() {
            eprintln!("skipped: pins take root (mounts)");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let later = base.path().join("later");
        let linked = base.path().join("linked");
        let outside = base.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let mut pins = Pins::new(
            &base.path().join("pins"),
            vec![later.clone(), linked.clone()],
        )
        .unwrap();
        // Made once the pins exist, as the runners' agent directory is.
        std::fs::create_dir_all(later.join("runs")).unwrap();
        let pin = pins.pin(&later.join("runs")).unwrap();
        assert!(pin.path().is_dir());
        // One that turns out to be a symlink is refused.
        std::os::unix::fs::symlink(&outside, &linked).unwrap();
        let refused = pins.pin(&linked).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");
    }
}
