//! The executor's scratch space under its work root: one directory per
//! running action, and the directories reused between actions.
//!
//! On ext4, creating an inode is the expensive part of laying out a
//! workspace: without a journal the allocator skips every inode deleted in
//! the last 60 s (6 min while its table block is dirty), looking each one up,
//! so on a busy executor every `mkdir` scans past the previous actions'
//! deleted directories. Nothing here is deleted on the hot path that can be
//! kept instead:
//!
//! - a finished action's directory is emptied and handed to a later action;
//! - the directories inside its workspace are emptied and parked in a pool
//!   (`<work root>/spare`), from which later workspaces take theirs with a
//!   `rename` instead of a `mkdir`.
//!
//! A reused directory is indistinguishable from a fresh one: it is empty,
//! owned by the executor and has mode 0755. What an action's user made or
//! was given is taken back by the privileged side
//! ([`PrivilegedSteps::take_back`]); a directory that cannot be made the
//! executor's is deleted instead.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::workspace::{DirAccess, PrivilegedSteps};

/// Most emptied action directories kept for reuse.
const SPARE_ACTION_DIRS: usize = 64;
/// Most emptied workspace directories kept for reuse.
const SPARE_DIRS: usize = 4096;
/// The mode of a directory the executor makes (`mkdir` under umask 022).
const DIR_MODE: u32 = 0o755;
/// What an emptied action directory keeps (see [`crate::workspace`] for the
/// overlay's layers).
const KEPT_IN_ACTION_DIR: [&str; 4] = ["workspace", "io", "inputs", "upper"];

pub struct Scratch {
    root: PathBuf,
    spare_root: PathBuf,
    action_dirs: Mutex<Vec<PathBuf>>,
    spare_dirs: Mutex<Vec<PathBuf>>,
    next_spare: AtomicU64,
    owner: u32,
    group: u32,
    steps: Option<Arc<dyn PrivilegedSteps>>,
}

impl Scratch {
    /// Opens the scratch space under `root`, creating it. Spare directories
    /// left by an earlier run are deleted.
    pub fn open(root: &Path) -> std::io::Result<Scratch> {
        std::fs::create_dir_all(root)?;
        // Traversable, not listable: an action finds its own workspace by
        // path, never the names of the others'.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
        let spare_root = root.join("spare");
        match std::fs::remove_dir_all(&spare_root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir(&spare_root)?;
        Ok(Scratch {
            root: root.to_path_buf(),
            spare_root,
            action_dirs: Mutex::default(),
            spare_dirs: Mutex::default(),
            next_spare: AtomicU64::new(0),
            owner: rustix::process::geteuid().as_raw(),
            group: rustix::process::getegid().as_raw(),
            steps: None,
        })
    }

    /// Has `steps` take back the directories an action's user made or was
    /// given, which the executor could not empty itself.
    pub fn with_privileged_steps(mut self, steps: Option<Arc<dyn PrivilegedSteps>>) -> Scratch {
        self.steps = steps;
        self
    }

    /// The executor's own user and group: what [`PrivilegedSteps::take_back`]
    /// gives an action's leftovers to.
    pub fn owner(&self) -> (u32, u32) {
        (self.owner, self.group)
    }

    /// Hands `dir` and every directory under it (not the files) to
    /// `owner` through the privileged side, where there is one: to the
    /// executor, so that it can delete and link in a warm runner's
    /// preserved workspace, which its action's user made; and back to that
    /// user, before the next action there. Without privileged steps (a
    /// non-root executor: everything is its own) nothing to do.
    pub fn hand_over_directories(&self, dir: &Path, owner: (u32, u32)) -> std::io::Result<()> {
        match &self.steps {
            Some(steps) => steps.take_back(dir, &[], owner),
            None => Ok(()),
        }
    }

    /// Whether a file with `metadata` is the executor's (user and group).
    pub fn owns(&self, metadata: &std::fs::Metadata) -> bool {
        metadata.uid() == self.owner && metadata.gid() == self.group
    }

    /// A directory for one action: an emptied one, or a new (not yet
    /// created) path under the root.
    pub fn action_dir(&self) -> PathBuf {
        let spare = self.action_dirs.lock().expect("scratch lock").pop();
        spare.unwrap_or_else(|| self.root.join(uuid::Uuid::new_v4().simple().to_string()))
    }

    /// Creates the directory `path` (its parent must exist), from the pool
    /// when it has one. Fails like `mkdir` when `path` exists.
    pub fn make_dir(&self, path: &Path) -> std::io::Result<()> {
        let spare = self.spare_dirs.lock().expect("scratch lock").pop();
        if let Some(spare) = spare {
            // rename(2) would silently replace an empty directory at `path`;
            // mkdir semantics say it must fail, so look first.
            if path.symlink_metadata().is_err() && std::fs::rename(&spare, path).is_ok() {
                return Ok(());
            }
            self.spare_dirs.lock().expect("scratch lock").push(spare);
        }
        std::fs::create_dir(path)
    }

    /// Like `std::fs::create_dir_all`, with the missing directories taken
    /// from the pool and given `access` ([`DirAccess::apply`], noting
    /// them in `owned`).
    pub fn make_dir_all(
        &self,
        path: &Path,
        access: &DirAccess,
        owned: &mut Vec<PathBuf>,
    ) -> std::io::Result<()> {
        if path.is_dir() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            self.make_dir_all(parent, access, owned)?;
        }
        match self.make_dir(path) {
            Err(_) if path.is_dir() => Ok(()),
            Err(e) => Err(e),
            Ok(()) => access.apply(path, owned),
        }
    }

    /// Empties a finished action's directory and keeps it for a later
    /// action; its subdirectories go to the pool. A directory that cannot
    /// be emptied, or one more than the pool keeps, is deleted instead.
    /// Blocking.
    pub fn recycle(&self, action_dir: PathBuf) -> std::io::Result<()> {
        let keep = self.action_dirs.lock().expect("scratch lock").len() < SPARE_ACTION_DIRS
            && self.empty_action_dir(&action_dir, &[]).is_ok();
        if keep {
            self.action_dirs
                .lock()
                .expect("scratch lock")
                .push(action_dir);
            return Ok(());
        }
        match self.remove_tree(&action_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes everything in `action_dir` but the directories every action
    /// has (its workspace, its io, and an overlay's lower and upper
    /// layers), and empties those. Entries named in `untouched` (what a
    /// warm runner keeps) are left as they are. Files are unlinked, not
    /// truncated: a process that escaped its group would otherwise write
    /// into a later action's output. Blocking.
    pub fn empty_action_dir(&self, action_dir: &Path, untouched: &[&str]) -> std::io::Result<()> {
        for entry in std::fs::read_dir(action_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if untouched.iter().any(|kept| name == *kept) {
                continue;
            }
            if KEPT_IN_ACTION_DIR.iter().any(|kept| name == *kept) && entry.file_type()?.is_dir() {
                let path = entry.path();
                if !self.reset(&path, &entry.metadata()?)? {
                    return Err(std::io::Error::other(format!(
                        "{} cannot be given back to the executor",
                        path.display()
                    )));
                }
                self.empty(&path)?;
                continue;
            }
            if entry.file_type()?.is_dir() {
                self.remove_tree(&entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// Empties `dir`, parking its subdirectories (emptied in turn).
    fn empty(&self, dir: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            // The entry's own type: a symlink to a directory is a file here.
            if entry.file_type()?.is_dir() {
                let ours = self.reset(&path, &entry.metadata()?)?;
                self.empty(&path)?;
                self.park(path, ours)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Deletes the directory `path` and everything under it. What the
    /// executor cannot delete in (directories an action's user made, as in
    /// a warm sandbox runner's /tmp; its own closed ones, as overlayfs
    /// leaves its work directory's `work` at mode 0) is taken back through
    /// the privileged side and opened to it first: the executor holds no
    /// capability to write past an owner or a mode
    /// (`kiln-sandbox::capabilities`). Blocking.
    fn remove_tree(&self, path: &Path) -> std::io::Result<()> {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                self.hand_over_directories(path, self.owner())?;
                open_to_owner(path, 0)?;
                std::fs::remove_dir_all(path)
            }
            other => other,
        }
    }

    /// Makes the directory `path` the executor's again, mode 0755: one
    /// given to the action user or made by the action goes back to the
    /// executor, with everything under it, through the privileged side;
    /// and an action may have changed its mode. False when it cannot be
    /// made the executor's.
    fn reset(&self, path: &Path, metadata: &std::fs::Metadata) -> std::io::Result<bool> {
        let mut ours = self.owns(metadata);
        if !ours && self.steps.is_some() {
            if let Err(error) = self.hand_over_directories(path, self.owner()) {
                tracing::debug!(path = %path.display(), %error, "taking back a directory");
            }
            ours = path.symlink_metadata().is_ok_and(|meta| self.owns(&meta));
        }
        if ours && metadata.mode() & 0o7777 != DIR_MODE {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))?;
        }
        Ok(ours)
    }

    /// Moves the empty directory `dir` (mode 0755 if `ours`) to the pool,
    /// or deletes it when the pool is full or the directory is not the
    /// executor's own.
    fn park(&self, dir: PathBuf, ours: bool) -> std::io::Result<()> {
        let full = self.spare_dirs.lock().expect("scratch lock").len() >= SPARE_DIRS;
        if full || !ours {
            return std::fs::remove_dir(&dir);
        }
        let spare = self
            .spare_root
            .join(self.next_spare.fetch_add(1, Ordering::Relaxed).to_string());
        std::fs::rename(&dir, &spare)?;
        self.spare_dirs.lock().expect("scratch lock").push(spare);
        Ok(())
    }

    /// Empties the action directories an earlier run of the executor left
    /// (killed, or stopped while emptying them after their results) and
    /// keeps them for reuse or deletes them, as [`Scratch::recycle`] does;
    /// one that cannot be is logged and left. Returns how many there were.
    /// Blocking.
    pub fn reclaim_leftovers(&self) -> std::io::Result<usize> {
        use std::os::unix::ffi::OsStrExt;
        let mut reclaimed = 0;
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name();
            // Named as [`Scratch::action_dir`] names them.
            let action_dir = name.len() == 32
                && name.as_bytes().iter().all(u8::is_ascii_hexdigit)
                && entry.file_type()?.is_dir();
            if action_dir {
                if let Err(error) = self.recycle(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), %error, "could not empty an action directory an earlier run left");
                }
                reclaimed += 1;
            }
        }
        Ok(reclaimed)
    }

    /// Directories in the pool now.
    pub fn spare_dirs(&self) -> usize {
        self.spare_dirs.lock().expect("scratch lock").len()
    }
}

/// How deep [`open_to_owner`] goes: as deep as an action's tree may be.
const OPEN_DEPTH: usize = 256;

/// Gives the owner (the executor) read, write and search on `dir` and
/// each directory under it that it owns and lacks them on.
pub(crate) fn open_to_owner(dir: &Path, depth: usize) -> std::io::Result<()> {
    let metadata = dir.symlink_metadata()?;
    if !metadata.is_dir() || depth > OPEN_DEPTH {
        return Ok(());
    }
    if metadata.uid() == rustix::process::geteuid().as_raw() && metadata.mode() & 0o700 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            open_to_owner(&entry.path(), depth + 1)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(root: &Path) {
        std::fs::create_dir_all(root.join("workspace/a/b")).unwrap();
        std::fs::create_dir_all(root.join("io")).unwrap();
        std::fs::write(root.join("workspace/a/b/file"), "x").unwrap();
        std::fs::write(root.join("workspace/top"), "y").unwrap();
        std::os::unix::fs::symlink("a", root.join("workspace/link")).unwrap();
        std::fs::write(root.join("io/stdout"), "out").unwrap();
    }

    /// A scratch space whose one action directory held [`layout`] and was
    /// recycled.
    fn recycled_once() -> (tempfile::TempDir, Scratch, PathBuf) {
        let temp = tempfile::tempdir().unwrap();
        let scratch = Scratch::open(temp.path()).unwrap();
        let action_dir = scratch.action_dir();
        layout(&action_dir);
        scratch.recycle(action_dir.clone()).unwrap();
        (temp, scratch, action_dir)
    }

    #[test]
    fn a_recycled_action_dir_is_empty_and_its_subdirectories_are_reused() {
        let temp = tempfile::tempdir().unwrap();
        let scratch = Scratch::open(temp.path()).unwrap();
        let action_dir = scratch.action_dir();
        layout(&action_dir);
        std::fs::set_permissions(
            action_dir.join("workspace/a"),
            std::fs::Permissions::from_mode(0o500),
        )
        .unwrap();
        scratch.recycle(action_dir.clone()).unwrap();

        // The next action gets the same directory back, empty.
        assert_eq!(scratch.action_dir(), action_dir);
        for dir in ["workspace", "io"] {
            let left: Vec<_> = std::fs::read_dir(action_dir.join(dir)).unwrap().collect();
            assert!(left.is_empty(), "{dir} still holds {left:?}");
        }
        // `a` and `a/b` are in the pool; a new directory is one of them,
        // empty and with the usual mode.
        assert_eq!(scratch.spare_dirs(), 2);
        let fresh = action_dir.join("workspace/fresh");
        scratch.make_dir(&fresh).unwrap();
        assert_eq!(scratch.spare_dirs(), 1);
        assert_eq!(std::fs::read_dir(&fresh).unwrap().count(), 0);
        assert_eq!(fresh.metadata().unwrap().mode() & 0o7777, DIR_MODE);
    }

    #[test]
    fn make_dir_fails_like_mkdir_on_an_existing_path_and_keeps_the_spare() {
        let (_temp, scratch, action_dir) = recycled_once();
        let spares = scratch.spare_dirs();

        let workspace = action_dir.join("workspace");
        std::fs::create_dir(workspace.join("taken")).unwrap();
        std::fs::write(workspace.join("file"), "z").unwrap();
        for existing in ["taken", "file"] {
            let error = scratch.make_dir(&workspace.join(existing)).unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);
        }
        assert_eq!(scratch.spare_dirs(), spares);
        assert_eq!(
            std::fs::read_dir(workspace.join("taken")).unwrap().count(),
            0
        );
    }

    #[test]
    fn make_dir_all_builds_a_path_from_spares_and_tolerates_existing_parts() {
        let (_temp, scratch, action_dir) = recycled_once();

        let deep = action_dir.join("workspace/x/y/z");
        let mut owned = Vec::new();
        scratch
            .make_dir_all(&deep, &DirAccess::default(), &mut owned)
            .unwrap();
        assert!(deep.is_dir());
        scratch
            .make_dir_all(&deep, &DirAccess::default(), &mut owned)
            .unwrap();
        assert_eq!(owned, Vec::<PathBuf>::new(), "no owner to give them to");
        assert_eq!(scratch.spare_dirs(), 0, "both spares were used");
    }

    #[test]
    fn action_dirs_an_earlier_run_left_are_emptied_for_reuse() {
        let temp = tempfile::tempdir().unwrap();
        let earlier = Scratch::open(temp.path()).unwrap();
        let left = earlier.action_dir();
        layout(&left);
        std::fs::write(temp.path().join("not-an-action-dir"), "z").unwrap();
        drop(earlier);

        let scratch = Scratch::open(temp.path()).unwrap();
        assert_eq!(scratch.reclaim_leftovers().unwrap(), 1);
        assert_eq!(scratch.action_dir(), left);
        for dir in ["workspace", "io"] {
            assert_eq!(std::fs::read_dir(left.join(dir)).unwrap().count(), 0);
        }
        assert!(temp.path().join("not-an-action-dir").exists());
    }

    #[test]
    fn spares_of_an_earlier_run_are_deleted_at_open() {
        let temp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(temp.path().join("spare/7/leftover")).unwrap();
        let scratch = Scratch::open(temp.path()).unwrap();
        assert_eq!(scratch.spare_dirs(), 0);
        assert_eq!(
            std::fs::read_dir(temp.path().join("spare"))
                .unwrap()
                .count(),
            0
        );
    }
}
