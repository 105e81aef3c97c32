//! The filesystem an action sees, as a list of mount steps computed on the
//! host before the fork: a tmpfs root, read-only system directories (with
//! secrets masked), a minimal /dev, private /tmp, /dev/shm and /dev/pts, fresh /proc
//! and /sys, and the action's workspace at its own path, read-write.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::child::Op;

/// Host directories every action sees, read-only (or the same symlink, on
/// merged-/usr systems).
pub const SYSTEM_PATHS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

/// Host files and directories masked inside the exposed ones: password
/// hashes, sudo rules, TLS and SSH private keys.
pub const HIDDEN_PATHS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/security/opasswd",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssl/private",
    "/etc/kiln",
];

/// Files in /etc that are often symlinks to elsewhere (/run).
const FOLLOWED_LINKS: &[&str] = &["/etc/resolv.conf", "/etc/hosts", "/etc/localtime"];

/// Device nodes bound from the host's /dev.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// /proc files that are global to the host: read-only, or masked.
const PROC_READ_ONLY: &[&str] = &[
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
];
const PROC_MASKED: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
];

const BIND: u64 = libc::MS_BIND;
const REMOUNT_READ_ONLY: u64 =
    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;

pub(crate) fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths have no NUL")
}

fn c_string(text: &str) -> CString {
    CString::new(text).expect("no NUL")
}

fn mount(
    source: Option<&str>,
    target: CString,
    fstype: Option<&str>,
    flags: u64,
    data: Option<&str>,
) -> Op {
    Op::Mount {
        source: source.map(c_string),
        target,
        fstype: fstype.map(c_string),
        flags,
        data: data.map(c_string),
        optional: false,
    }
}

fn optional(op: Op) -> Op {
    match op {
        Op::Mount {
            source,
            target,
            fstype,
            flags,
            data,
            ..
        } => Op::Mount {
            source,
            target,
            fstype,
            flags,
            data,
            optional: true,
        },
        other => other,
    }
}

/// The mount steps shared by every action, plus what each action adds.
#[derive(Debug, Clone)]
pub(crate) struct View {
    new_root: PathBuf,
    before_pivot: Vec<Op>,
    after_pivot: Vec<Op>,
    /// Directories `before_pivot` creates (so per-action steps skip them).
    created: BTreeSet<PathBuf>,
    /// Where in `before_pivot` the private /tmp is mounted (a warm
    /// runner's /tmp is bound there instead).
    tmp_mount: usize,
    /// Where in `before_pivot` the private /dev/shm is mounted.
    shm_mount: usize,
}

impl View {
    /// The shared steps: `new_root` is the (empty) host directory the root
    /// tmpfs goes on; `read_only` extra host paths to expose; `hidden`
    /// extra host paths to mask.
    pub fn new(new_root: &Path, read_only: &[PathBuf], hidden: &[PathBuf]) -> View {
        let mut view = View {
            new_root: new_root.to_path_buf(),
            before_pivot: Vec::new(),
            after_pivot: Vec::new(),
            created: BTreeSet::new(),
            tmp_mount: 0,
            shm_mount: 0,
        };
        view.before_pivot.push(mount(
            Some("tmpfs"),
            c_path(new_root),
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=755,size=1m"),
        ));
        let exposed: Vec<PathBuf> = SYSTEM_PATHS
            .iter()
            .map(PathBuf::from)
            .chain(read_only.iter().cloned())
            .collect();
        for path in &exposed {
            view.expose_read_only(path);
        }
        // systemd-resolved and friends make these symlinks into /run: expose
        // what they point to, or name resolution breaks inside.
        for link in FOLLOWED_LINKS {
            let link = Path::new(link);
            let is_link = std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink());
            if let Some(target) = is_link.then(|| std::fs::canonicalize(link).ok()).flatten() {
                if !exposed.iter().any(|e| target.starts_with(e)) {
                    view.expose_read_only(&target);
                }
            }
        }
        view.dev();
        view.private_tmpfs(Path::new("/tmp"), "mode=1777");
        view.tmp_mount = view.before_pivot.len() - 1;
        view.mkdir(Path::new("/proc"));
        view.mkdir(Path::new("/sys"));

        let mut hidden: Vec<PathBuf> = HIDDEN_PATHS
            .iter()
            .map(PathBuf::from)
            .chain(hidden.iter().cloned())
            .collect();
        if let Ok(entries) = std::fs::read_dir("/etc/ssh") {
            hidden.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().ends_with("_key")),
            );
        }
        for path in hidden {
            if exposed.iter().any(|e| path.starts_with(e)) {
                view.hide(&path);
            }
        }

        view.after_pivot.push(mount(
            Some("proc"),
            c_string("/proc"),
            Some("proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        ));
        for path in PROC_READ_ONLY {
            view.after_pivot.push(optional(mount(
                Some(path),
                c_string(path),
                None,
                BIND,
                None,
            )));
            view.after_pivot.push(optional(mount(
                None,
                c_string(path),
                None,
                REMOUNT_READ_ONLY,
                None,
            )));
        }
        for path in PROC_MASKED {
            view.after_pivot.push(optional(mount(
                Some("/dev/null"),
                c_string(path),
                None,
                BIND,
                None,
            )));
        }
        view.after_pivot.push(optional(mount(
            Some("sysfs"),
            c_string("/sys"),
            Some("sysfs"),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )));
        view.after_pivot
            .push(mount(None, c_string("/"), None, REMOUNT_READ_ONLY, None));
        view
    }

    /// `path` (absolute, on the host) under the new root.
    fn inside(&self, path: &Path) -> PathBuf {
        self.new_root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Creates `path` and its missing ancestors in the new root.
    fn mkdir(&mut self, path: &Path) {
        let mut ancestors: Vec<&Path> = path
            .ancestors()
            .filter(|a| *a != Path::new("/") && !a.as_os_str().is_empty())
            .collect();
        ancestors.reverse();
        for ancestor in ancestors {
            if self.created.insert(ancestor.to_path_buf()) {
                self.before_pivot.push(Op::Mkdir {
                    path: c_path(&self.inside(ancestor)),
                    mode: 0o755,
                });
            }
        }
    }

    fn expose_read_only(&mut self, path: &Path) {
        let Ok(metadata) = std::fs::symlink_metadata(path) else {
            return;
        };
        if let Some(parent) = path.parent() {
            self.mkdir(parent);
        }
        let target = c_path(&self.inside(path));
        if metadata.file_type().is_symlink() {
            if let Ok(link) = std::fs::read_link(path) {
                self.before_pivot.push(Op::Symlink {
                    target: c_path(&link),
                    link: target,
                });
            }
            return;
        }
        if metadata.is_dir() {
            self.mkdir(path);
        } else {
            self.before_pivot.push(Op::Touch {
                path: target.clone(),
            });
        }
        self.bind(path, target, true);
    }

    fn bind(&mut self, source: &Path, target: CString, read_only: bool) {
        self.before_pivot
            .extend(bind_steps(source, target, read_only));
    }

    fn private_tmpfs(&mut self, path: &Path, mode: &str) {
        self.mkdir(path);
        self.before_pivot.push(mount(
            Some("tmpfs"),
            c_path(&self.inside(path)),
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(mode),
        ));
    }

    /// A tmpfs /dev holding bind mounts of harmless devices, the usual
    /// symlinks, private /dev/pts and /dev/shm; then made read-only.
    fn dev(&mut self) {
        let dev = Path::new("/dev");
        self.private_tmpfs(dev, "mode=755,size=64k");
        for device in DEVICES {
            let host = dev.join(device);
            if !host.exists() {
                continue;
            }
            let target = c_path(&self.inside(&host));
            self.before_pivot.push(Op::Touch {
                path: target.clone(),
            });
            self.before_pivot.push(Op::Mount {
                source: Some(c_path(&host)),
                target,
                fstype: None,
                flags: BIND,
                data: None,
                optional: false,
            });
        }
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            self.before_pivot.push(Op::Symlink {
                target: c_string(target),
                link: c_path(&self.inside(&dev.join(link))),
            });
        }
        // Pseudo-terminals from a private devpts instance.
        self.before_pivot.push(Op::Symlink {
            target: c_string("pts/ptmx"),
            link: c_path(&self.inside(&dev.join("ptmx"))),
        });
        self.mkdir(&dev.join("pts"));
        self.mkdir(&dev.join("shm"));
        self.before_pivot.push(mount(
            None,
            c_path(&self.inside(dev)),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
            None,
        ));
        self.before_pivot.push(mount(
            Some("devpts"),
            c_path(&self.inside(&dev.join("pts"))),
            Some("devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ));
        self.before_pivot.push(mount(
            Some("tmpfs"),
            c_path(&self.inside(&dev.join("shm"))),
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ));
        self.shm_mount = self.before_pivot.len() - 1;
    }

    /// Masks a host path inside an exposed directory: files with an empty
    /// read-only device, directories with an empty read-only tmpfs.
    fn hide(&mut self, path: &Path) {
        let Ok(metadata) = std::fs::symlink_metadata(path) else {
            return;
        };
        if metadata.file_type().is_symlink() {
            return;
        }
        let target = c_path(&self.inside(path));
        if metadata.is_dir() {
            self.before_pivot.push(mount(
                Some("tmpfs"),
                target,
                Some("tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("mode=755,size=4k"),
            ));
        } else {
            self.bind(Path::new("/dev/null"), target, true);
        }
    }

    /// The complete steps for one action: the shared view plus its
    /// workspace, read-write at its own path, and a warm runner's /tmp;
    /// each bound from its tree in `trees` where given (detached copies a
    /// launcher opened), else from its path.
    pub fn with_workspace(
        &self,
        workspace: Option<&Path>,
        runner_tmp: Option<&Path>,
        tmpfs_bytes: Option<u64>,
        trees: Trees,
    ) -> (CString, Vec<Op>, Vec<Op>) {
        let mut view = self.clone();
        // The private /tmp and /dev/shm hold at most the action's memory:
        // what is written there is memory.
        if let Some(bytes) = tmpfs_bytes {
            for at in [view.tmp_mount, view.shm_mount] {
                if let Op::Mount { data, .. } = &mut view.before_pivot[at] {
                    *data = Some(c_string(&format!("mode=1777,size={bytes}")));
                }
            }
        }
        // A warm runner's /tmp takes the private tmpfs's place, before the
        // workspace that may live below /tmp is mounted.
        if let Some(tmp) = runner_tmp {
            let target = c_path(&view.inside(Path::new("/tmp")));
            let steps = bind_steps_from(tmp, trees.runner_tmp, target, false);
            view.before_pivot
                .splice(view.tmp_mount..=view.tmp_mount, steps);
        }
        if let Some(workspace) = workspace {
            view.mkdir(workspace);
            let target = c_path(&view.inside(workspace));
            let steps = bind_steps_from(workspace, trees.workspace, target, false);
            view.before_pivot.extend(steps);
        }
        (c_path(&view.new_root), view.before_pivot, view.after_pivot)
    }
}

/// Detached copies (`open_tree`) of the host directories a sandbox binds
/// read-write, opened by its launcher beneath the work root: bound as
/// they are, so that what is bound is what was checked.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Trees {
    pub workspace: Option<RawFd>,
    pub runner_tmp: Option<RawFd>,
}

/// [`bind_steps`] of `tree` when given (attached where `source` would
/// be bound), else of `source`.
fn bind_steps_from(
    source: &Path,
    tree: Option<RawFd>,
    target: CString,
    read_only: bool,
) -> [Op; 2] {
    match tree {
        Some(tree) => [
            Op::AttachTree {
                tree,
                target: target.clone(),
            },
            remount_step(target, read_only),
        ],
        None => bind_steps(source, target, read_only),
    }
}

/// Binds `source` at `target`, then remounts it nosuid and nodev, and
/// read-only if asked.
fn bind_steps(source: &Path, target: CString, read_only: bool) -> [Op; 2] {
    [
        Op::Mount {
            source: Some(c_path(source)),
            target: target.clone(),
            fstype: None,
            flags: BIND,
            data: None,
            optional: false,
        },
        remount_step(target, read_only),
    ]
}

/// Remounts the bind at `target` nosuid and nodev, and read-only if asked.
fn remount_step(target: CString, read_only: bool) -> Op {
    let flags = if read_only {
        REMOUNT_READ_ONLY
    } else {
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV
    };
    mount(None, target, None, flags, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .filter_map(|op| match op {
                Op::Mount { target, .. } => Some(target.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_workspace_is_mounted_after_the_private_tmp_it_may_live_in() {
        let view = View::new(Path::new("/run/root"), &[], &[]);
        let (root, before, after) =
            view.with_workspace(Some(Path::new("/tmp/ws/a")), None, None, Trees::default());
        assert_eq!(root.to_str().unwrap(), "/run/root");
        let mounts = targets(&before);
        let tmp = mounts.iter().position(|t| t == "/run/root/tmp").unwrap();
        let workspace = mounts
            .iter()
            .rposition(|t| t == "/run/root/tmp/ws/a")
            .unwrap();
        assert!(tmp < workspace);
        assert_eq!(mounts[0], "/run/root");
        assert_eq!(targets(&after).last().unwrap(), "/");
    }

    #[test]
    fn the_private_tmp_and_shm_hold_at_most_the_actions_memory() {
        let view = View::new(Path::new("/run/root"), &[], &[]);
        let (_, ops, _) = view.with_workspace(None, None, Some(64 << 20), Trees::default());
        let sized: Vec<String> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Mount {
                    target,
                    data: Some(data),
                    ..
                } if data.to_string_lossy().contains("size=67108864") => {
                    Some(target.to_string_lossy().into_owned())
                }
                _ => None,
            })
            .collect();
        assert_eq!(sized, ["/run/root/dev/shm", "/run/root/tmp"]);
    }

    #[test]
    fn a_warm_runners_tmp_replaces_the_private_tmpfs() {
        let view = View::new(Path::new("/run/root"), &[], &[]);
        let (_, fresh, _) = view.with_workspace(None, None, None, Trees::default());
        let (_, warm, _) =
            view.with_workspace(None, Some(Path::new("/work/a/tmp")), None, Trees::default());
        let is_tmp = |op: &&Op| matches!(op, Op::Mount { target, .. } if target.to_str() == Ok("/run/root/tmp"));
        let fstypes = |ops: &[Op]| -> Vec<Option<String>> {
            ops.iter()
                .filter(is_tmp)
                .map(|op| match op {
                    Op::Mount { fstype, source, .. } => fstype
                        .as_ref()
                        .or(source.as_ref())
                        .map(|c| c.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(fstypes(&fresh), vec![Some("tmpfs".to_string())]);
        assert_eq!(
            fstypes(&warm),
            vec![Some("/work/a/tmp".to_string()), None],
            "bound, then remounted nosuid,nodev"
        );
    }
}
