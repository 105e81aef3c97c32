//! How an action's input tree is laid out so that no action can change a
//! file another action will see, whatever its uid or capabilities.
//!
//! The file cache's entries are owned by the executor, read-only, and live
//! in a directory only the executor can enter. What decides the layout is
//! what the action's user could do to those inodes ([`RunAs`]):
//!
//! - [`Layout::Linked`]: an unprivileged action user (not root, no
//!   capabilities, not the cache's owner) gets the cache's own inodes,
//!   hardlinked. It may unlink or replace its links, never write to or
//!   `chmod` the files.
//! - [`Layout::Overlay`]: a privileged one (root in a sandbox or container,
//!   or a user only the image knows) gets an overlay mount as its
//!   workspace. The hardlinked tree is the read-only lower layer, mounted
//!   nowhere the action can see, and every write, `chmod` or truncation
//!   copies the file up into the action's own upper layer first. An input
//!   the action changes is changed for that action alone.
//! - [`Layout::Copied`]: the same guarantee where no overlay can be mounted
//!   (a work root that cannot hold an overlay's upper layer): copies.
//!
//! An executor that is not root runs actions as itself, the cache's owner;
//! nothing can protect the cache from them, so it links and says so at
//! start-up.
//!
//! This crate mounts nothing and changes no owner itself: the overlays are
//! mounted and detached, the directories given to an action's user, and
//! what that user made taken back, by the executor's privileged side
//! ([`PrivilegedSteps`], which `kiln-sandbox` implements through its
//! launchers; a directory is given as the action starts, in the start
//! request), named by path.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::RunError;
use crate::isolation::RunAs;

/// How one action's inputs are laid out; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Linked,
    Overlay,
    Copied,
}

/// The directories of one overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayLayers {
    /// The read-only layer: the laid-out input tree.
    pub lower: PathBuf,
    /// Where the action's writes go.
    pub upper: PathBuf,
    /// The overlay's own scratch, on `upper`'s file system.
    pub work: PathBuf,
    /// Where it is mounted: the action's workspace.
    pub target: PathBuf,
}

/// The steps on an action's workspace that only root can take (laying it
/// out, and taking back what the action's user made), by the executor's
/// privileged side: on a root executor, its launchers
/// (`kiln_sandbox::privileged`). Every call blocks.
pub trait PrivilegedSteps: Send + Sync + std::fmt::Debug {
    /// Says that every later step, and every directory given as an action
    /// starts, is under `work_root` (absolute): what the privileged side
    /// will do for this executor at all. Called once, before any other
    /// step. A privileged side fixed to another root already (launchers
    /// whose policy names it) fails it.
    fn confine(&self, work_root: &Path) -> std::io::Result<()>;

    /// Mounts `layers` (nosuid, nodev), with `options` besides the layers'
    /// directories.
    fn mount(&self, layers: &OverlayLayers, options: &str) -> std::io::Result<()>;

    /// Detaches the mount at `target`: processes still inside keep what
    /// they hold, and nothing new enters through it.
    fn detach(&self, target: &Path) -> std::io::Result<()>;

    /// Gives the workspace `directories` (made by the executor) to
    /// `owner`, the action's user, for an action no start precedes: the
    /// backends give them as they start an action
    /// ([`crate::CommandSpec::owned_directories`]).
    fn give(&self, directories: &[PathBuf], owner: (u32, u32)) -> std::io::Result<()>;

    /// Gives back to `owner`, the executor, what a finished action's user
    /// made or was given: `directory` and every directory under it, and
    /// those of `files` (under `directory`) that are regular files with a
    /// single link, so that the worker can adopt them into its file cache
    /// and empty the directory. Follows no symlink and enters no other
    /// file system; a file linked elsewhere too is left as it is.
    fn take_back(
        &self,
        directory: &Path,
        files: &[PathBuf],
        owner: (u32, u32),
    ) -> std::io::Result<()>;
}

/// What this executor can do to keep privileged actions away from the
/// cache's inodes; probed once at start-up.
#[derive(Debug, Clone)]
pub enum InputProtection {
    /// Overlay mounts work under the work root.
    Overlay(Overlays),
    /// Root, but no overlay here: privileged actions get copies.
    Copy,
    /// Not root: actions run as the cache's owner, and nothing protects it.
    Unprivileged,
}

/// Overlays as the probe found them working: who mounts them, and with
/// which options (besides the layers' directories).
#[derive(Debug, Clone)]
pub struct Overlays {
    steps: Arc<dyn PrivilegedSteps>,
    options: String,
}

impl Overlays {
    /// Mounts `layers`; detached when the result is dropped or unmounted.
    pub fn mount(&self, layers: &OverlayLayers) -> std::io::Result<OverlayMount> {
        self.steps.mount(layers, &self.options)?;
        Ok(OverlayMount {
            target: layers.target.clone(),
            steps: self.steps.clone(),
            mounted: true,
        })
    }
}

/// Overlay options tried in order: `volatile` skips the syncs of an upper
/// layer that is thrown away after the action (Linux 5.10+); `index=off`
/// keeps hardlinked lower files from needing the inode index. The
/// privileged side mounts with no other.
pub const OVERLAY_OPTIONS: &[&str] = &["volatile,index=off", "index=off", ""];

impl InputProtection {
    /// Probes what works under `work_root` (which must exist) by mounting a
    /// small overlay there through `steps`, logging the outcome. A root
    /// executor without `steps` copies.
    pub fn probe(work_root: &Path, steps: Option<Arc<dyn PrivilegedSteps>>) -> InputProtection {
        if steps.is_none() && !rustix::process::geteuid().is_root() {
            tracing::warn!(
                uid = rustix::process::geteuid().as_raw(),
                "the executor is not root: actions run as its own user, which owns the input \
                 cache and can change the files in it; run it as root to have actions run as \
                 an action user that cannot"
            );
            return InputProtection::Unprivileged;
        }
        let Some(steps) = steps else {
            tracing::warn!(
                "nothing mounts overlays for this executor: actions that run as root or as an \
                 image's user get copies of their inputs (slower)"
            );
            return InputProtection::Copy;
        };
        match probe_overlay(work_root, &*steps) {
            Ok(options) => {
                tracing::debug!(%options, "overlay workspaces available");
                InputProtection::Overlay(Overlays { steps, options })
            }
            Err(reason) => {
                tracing::warn!(
                    work_root = %work_root.display(),
                    %reason,
                    "no overlay mounts under the work root: actions that run as root or as an \
                     image's user get copies of their inputs (slower)"
                );
                InputProtection::Copy
            }
        }
    }

    /// The layout for an action whose user is `run_as`.
    pub fn layout(&self, run_as: RunAs) -> Layout {
        match (run_as, self) {
            (RunAs::User(..), _) | (RunAs::Privileged, InputProtection::Unprivileged) => {
                Layout::Linked
            }
            (RunAs::Privileged, InputProtection::Overlay(_)) => Layout::Overlay,
            (RunAs::Privileged, InputProtection::Copy) => Layout::Copied,
        }
    }
}

/// An overlay mounted as an action's workspace; unmounted (detached) when
/// dropped or by [`OverlayMount::unmount`].
#[derive(Debug)]
pub struct OverlayMount {
    target: PathBuf,
    steps: Arc<dyn PrivilegedSteps>,
    mounted: bool,
}

impl OverlayMount {
    /// Detaches the mount ([`PrivilegedSteps::detach`]). Blocking.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.mounted = false;
        self.steps.detach(&self.target)
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(error) = self.steps.detach(&self.target) {
                tracing::warn!(target = %self.target.display(), %error, "unmounting a workspace overlay");
            }
        }
    }
}

/// Mounts and unmounts one overlay under `work_root` with each option set
/// in turn; the first that works, or why none did.
fn probe_overlay(work_root: &Path, steps: &dyn PrivilegedSteps) -> Result<String, String> {
    let dir = work_root.join(format!("overlay-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let [lower, upper, work, merged] = ["lower", "upper", "work", "merged"].map(|d| dir.join(d));
    let made = [&lower, &upper, &work, &merged]
        .iter()
        .try_for_each(std::fs::create_dir_all);
    let result = match made {
        Err(e) => Err(format!("creating {}: {e}", dir.display())),
        Ok(()) => {
            let mut last = String::new();
            let mut found = None;
            let layers = OverlayLayers {
                lower,
                upper,
                work,
                target: merged,
            };
            for options in OVERLAY_OPTIONS {
                match steps.mount(&layers, options) {
                    Ok(()) => {
                        let unmounted = steps.detach(&layers.target);
                        if unmounted.is_ok() {
                            found = Some(options.to_string());
                            break;
                        }
                        last = format!("unmounting the probe: {unmounted:?}");
                    }
                    Err(e) => last = format!("mount -t overlay -o {options}: {e}"),
                }
            }
            found.ok_or(last)
        }
    };
    remove_probe(&dir, steps);
    result
}

/// Deletes the overlay probe's directory `dir`. A mount leaves one of
/// root's in its work directory (`work/work`, mode 000), which an executor
/// running as a user of its own can neither search nor delete: it takes
/// the tree back first. What cannot go is logged and left.
fn remove_probe(dir: &Path, steps: &dyn PrivilegedSteps) {
    let removed = std::fs::remove_dir_all(dir).or_else(|error| {
        match error.kind() {
            std::io::ErrorKind::NotFound => return Ok(()),
            std::io::ErrorKind::PermissionDenied => {}
            _ => return Err(error),
        }
        let own = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        steps.take_back(dir, &[], own)?;
        crate::scratch::open_to_owner(dir, 0)?;
        std::fs::remove_dir_all(dir)
    });
    if let Err(error) = removed {
        tracing::warn!(dir = %dir.display(), %error, "could not delete the overlay probe's directory");
    }
}

/// Detaches every mount below `root` (overlays a crashed executor left),
/// deepest first, through `steps`. Returns how many.
pub fn unmount_stale(root: &Path, steps: &dyn PrivilegedSteps) -> usize {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    let Ok(root) = root.canonicalize() else {
        return 0;
    };
    let mut below: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|point| point.starts_with(&root) && *point != root)
        .collect();
    below.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    below
        .iter()
        .filter(|point| match steps.detach(point) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(mount = %point.display(), %error, "could not detach a stale mount");
                false
            }
        })
        .count()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok());
            if let Some(byte) = octal {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Checks that `user` (`uid`, `gid`, no supplementary groups) may traverse
/// every directory down to `work_root`: a `none` action starts in its
/// workspace there, by path. The error names the first directory in the
/// way and what to do.
pub fn check_reachable(work_root: &Path, (uid, gid): (u32, u32)) -> Result<(), RunError> {
    use std::os::unix::fs::MetadataExt;
    let absolute = work_root.canonicalize().map_err(|e| {
        RunError::io(
            format!("resolving the work directory {}", work_root.display()),
            e,
        )
    })?;
    for dir in absolute.ancestors() {
        let meta = std::fs::metadata(dir)
            .map_err(|e| RunError::io(format!("reading {}", dir.display()), e))?;
        let mode = meta.mode();
        let search = if meta.uid() == uid {
            mode & 0o100
        } else if meta.gid() == gid {
            mode & 0o010
        } else {
            mode & 0o001
        };
        if search == 0 {
            return Err(RunError::Internal(format!(
                "the action user {uid}:{gid} cannot reach the work directory {}: {} (mode {:o}, \
                 owner {}:{}) does not let it through; give the executor a work directory every \
                 user can traverse (as under /var/lib), or choose another --action-user",
                work_root.display(),
                dir.display(),
                mode & 0o7777,
                meta.uid(),
                meta.gid()
            )));
        }
    }
    Ok(())
}

/// Who owns the directories of an action's workspace, and their mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirAccess {
    /// Each directory goes to this `uid`, `gid` (the action user's), so it
    /// can create its outputs; None: they stay the executor's. Changing
    /// an owner is root's: the executor lists them
    /// ([`crate::CommandSpec::owned_directories`]) and the backend gives
    /// them as the action starts (through the launchers).
    pub owner: Option<(u32, u32)>,
    /// 0777 with `nonroot-workspace` (a user only the image knows must
    /// write), else 0755.
    pub mode: u32,
}

impl Default for DirAccess {
    /// The executor's own directories: its owner, 0755.
    fn default() -> DirAccess {
        DirAccess {
            owner: None,
            mode: 0o755,
        }
    }
}

impl DirAccess {
    /// The access an action running as `run_as` needs.
    pub fn for_action(run_as: RunAs, nonroot_workspace: bool) -> DirAccess {
        DirAccess {
            owner: match run_as {
                RunAs::User(uid, gid) => Some((uid, gid)),
                RunAs::Privileged => None,
            },
            mode: if nonroot_workspace { 0o777 } else { 0o755 },
        }
    }

    /// Gives the directory `path` (just made by the executor) its mode,
    /// and notes it in `owned` when it is to go to [`DirAccess::owner`].
    /// Blocking.
    pub fn apply(&self, path: &Path, owned: &mut Vec<PathBuf>) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if self.owner.is_some() {
            owned.push(path.to_path_buf());
        }
        if self.mode != 0o755 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_follow_what_the_user_could_do_to_the_cache() {
        /// Never asked: choosing a layout mounts nothing.
        #[derive(Debug)]
        struct Unused;
        impl PrivilegedSteps for Unused {
            fn confine(&self, _: &Path) -> std::io::Result<()> {
                unreachable!()
            }
            fn mount(&self, _: &OverlayLayers, _: &str) -> std::io::Result<()> {
                unreachable!("a layout was chosen by mounting")
            }
            fn detach(&self, _: &Path) -> std::io::Result<()> {
                unreachable!("a layout was chosen by unmounting")
            }
            fn take_back(&self, _: &Path, _: &[PathBuf], _: (u32, u32)) -> std::io::Result<()> {
                unreachable!()
            }
            fn give(&self, _: &[PathBuf], _: (u32, u32)) -> std::io::Result<()> {
                unreachable!("a layout was chosen by giving directories")
            }
        }
        let overlay = InputProtection::Overlay(Overlays {
            steps: Arc::new(Unused),
            options: String::new(),
        });
        let unprivileged = RunAs::User(65534, 65534);
        assert_eq!(overlay.layout(unprivileged), Layout::Linked);
        assert_eq!(overlay.layout(RunAs::Privileged), Layout::Overlay);
        assert_eq!(
            InputProtection::Copy.layout(RunAs::Privileged),
            Layout::Copied
        );
        assert_eq!(
            InputProtection::Unprivileged.layout(RunAs::Privileged),
            Layout::Linked
        );
    }

    #[test]
    fn a_work_root_the_action_user_cannot_traverse_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        let work = private.join("execution/work");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let nobody = (65534, 65534);
        let error = check_reachable(&work, nobody).unwrap_err().to_string();
        assert!(
            error.contains(&format!("{} (mode 700", private.display())),
            "{error}"
        );
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o711)).unwrap();
        check_reachable(&work, nobody).unwrap();
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(
            unescape_mountinfo("/work/a\\040b\\134c"),
            PathBuf::from("/work/a b\\c")
        );
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mountinfo("/end\\04"), PathBuf::from("/end\\04"));
    }
}
