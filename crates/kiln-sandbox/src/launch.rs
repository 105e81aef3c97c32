//! What a launcher is asked to start ([`Launch`]), and the policy it
//! starts it under ([`Policy`]).
//!
//! The executor does not send a launcher the steps of a start (mounts,
//! capabilities): it names what to start, a sandbox with this workspace
//! or a plain process, and the user, network, cgroup and working
//! directory. The launcher checks that against its policy
//! ([`Enforced::check`]) and builds the steps itself ([`Planner::plan`]).
//! A launcher takes its policy from its first message, which only root
//! can send: the executor before it becomes a user of its own
//! ([`crate::run_as`]), or the launcher that started this one. So an
//! executor that became a user and is then taken over still gets only
//! what its operator allowed:
//! - a sandbox sees the host as configured (the system directories and
//!   the extra read-only paths, read-only; the hidden paths masked), and
//!   of the host's writable files only its workspace and its runner's
//!   /tmp, both under the work root;
//! - a root action in a sandbox keeps only the sandbox's capabilities;
//! - a sandbox is never in the host's network namespace;
//! - a plain process (`none`) runs as an action user, or as whom the
//!   operator lets `none` actions choose (`--none-allow-user-switch`), and
//!   a root one chosen that way keeps only the sandbox's capabilities;
//! - directories are given to an action's user only under the work root;
//! - every path is opened beneath the work root, following no symlink,
//!   and the start binds and gives what was opened
//!   ([`Enforced::take_paths`]).
//!
//! Where no launcher is installed, the calling process builds the plan
//! itself from the same [`Launch`], without checks: it is root itself.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_worker::users::ActionUsers;

use crate::child::{Network, Plan};
use crate::privileged::Confinement;
use crate::view::{c_path, Trees, View};
use rustix::fs::OFlags;
use rustix::mount::OpenTreeFlags;

/// What to start, as the executor asks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Launch {
    pub kind: Kind,
    /// Where the process starts (inside the sandbox, for one).
    pub working_directory: CString,
    /// `(uid, gid)` to become; `None` stays root.
    pub user: Option<(u32, u32)>,
    pub network: Network,
    /// Open files that put the writer in the action's cgroup
    /// ([`crate::cgroup::Cgroup::join_fds`]).
    pub cgroup_join: Vec<RawFd>,
    /// Workspace directories the executor made, given to `user` before
    /// the start ([`kiln_worker::CommandSpec::owned_directories`]).
    pub owned_directories: Vec<CString>,
    /// Whether a plain process that stays root keeps only the sandbox's
    /// capabilities (an action that chose root); a sandbox always does.
    pub drop_root_capabilities: bool,
}

/// A sandbox, or a plain process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// In the host's namespaces (but a network namespace of its own with
    /// [`Network::Empty`]) and its file system as it is.
    Plain,
    /// New namespaces on a fresh root: the policy's view of the host, with
    /// `workspace` read-write at its own path, and `runner_tmp` as /tmp
    /// (else a private tmpfs of at most `tmpfs_bytes`).
    Sandbox {
        workspace: Option<CString>,
        runner_tmp: Option<CString>,
        tmpfs_bytes: Option<u64>,
    },
}

impl Launch {
    /// A plain process in `working_directory` as `user`, joining
    /// `cgroup_join`, in the host's network.
    pub fn plain(
        working_directory: &Path,
        user: Option<(u32, u32)>,
        cgroup_join: Vec<RawFd>,
    ) -> Launch {
        Launch {
            kind: Kind::Plain,
            working_directory: path_or_root(working_directory),
            user,
            network: Network::Host,
            cgroup_join,
            owned_directories: Vec::new(),
            drop_root_capabilities: false,
        }
    }

    /// Gives `directories` to [`Launch::user`] before the start (nothing
    /// when the action stays root).
    pub fn giving(mut self, directories: &[PathBuf]) -> Launch {
        if self.user.is_some() {
            self.owned_directories = directories.iter().map(|dir| c_path(dir)).collect();
        }
        self
    }
}

/// `path` as a C string; `/` for one with a NUL byte (which no path the
/// executor makes has).
fn path_or_root(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_else(|_| c"/".to_owned())
}

/// What root allows the launchers to start, fixed before the executor
/// may become a user of its own (see the module's documentation). Built by
/// the `kiln` binary from its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The executor's work root: workspaces, runners' /tmp directories and
    /// directories given to an action's user are under it (an absolute
    /// path).
    pub work_root: PathBuf,
    /// The sandbox's view of the host
    /// ([`crate::SandboxConfig::root_mount_point`], `read_only_paths`,
    /// `hidden_paths`).
    pub root_mount_point: PathBuf,
    pub read_only_paths: Vec<PathBuf>,
    pub hidden_paths: Vec<PathBuf>,
    /// Whom plain processes run as. `One(None)`: root (an executor whose
    /// action user is root).
    pub action_users: ActionUsers,
    /// Whether plain processes may run as any user, root included
    /// (`--none-allow-user-switch`).
    pub none_allow_user_switch: bool,
    /// Whether the process runs actions at all: a server without an
    /// executor has its launchers start nothing (and its action users are
    /// not resolved).
    pub runs_actions: bool,
}

impl Policy {
    /// Whether a plain process may run as `user` (`None`: root) without
    /// the operator's leave to choose.
    fn admits(&self, user: Option<(u32, u32)>) -> bool {
        match (self.action_users, user) {
            (ActionUsers::One(None), None) => true,
            (ActionUsers::One(Some(own)), Some(user)) => own == user,
            (ActionUsers::Range { first, last }, Some((uid, gid))) => {
                (first..=last).contains(&uid) && gid == uid
            }
            _ => false,
        }
    }
}

/// Builds a [`Launch`]'s plan: the sandbox's view (for sandboxes) and the
/// capabilities a root action loses.
#[derive(Debug, Clone)]
pub(crate) struct Planner {
    view: Option<View>,
    drop_capabilities: Vec<u32>,
}

impl Planner {
    /// For plain processes alone.
    pub fn plain() -> Planner {
        Planner {
            view: None,
            drop_capabilities: crate::sandbox::dropped_capabilities(),
        }
    }

    /// For sandboxes with this view of the host, and plain processes.
    pub fn sandbox(root_mount_point: &Path, read_only: &[PathBuf], hidden: &[PathBuf]) -> Planner {
        Planner {
            view: Some(View::new(root_mount_point, read_only, hidden)),
            ..Planner::plain()
        }
    }

    /// The steps that start `launch`.
    pub fn plan(&self, launch: Launch) -> io::Result<Plan> {
        self.plan_from(launch, Trees::default())
    }

    /// The steps that start `launch`, a sandbox binding `trees` (what its
    /// launcher opened of its workspace and runner's /tmp) where given.
    pub fn plan_from(&self, launch: Launch, trees: Trees) -> io::Result<Plan> {
        let path = |c: &CString| PathBuf::from(OsStr::from_bytes(c.to_bytes()));
        let (namespaces, new_root, before_pivot, after_pivot, hostname) = match &launch.kind {
            Kind::Plain => (
                false,
                CString::default(),
                Vec::new(),
                Vec::new(),
                CString::default(),
            ),
            Kind::Sandbox {
                workspace,
                runner_tmp,
                tmpfs_bytes,
            } => {
                let view = self.view.as_ref().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::Unsupported, "no sandbox view here")
                })?;
                let (new_root, before, after) = view.with_workspace(
                    workspace.as_ref().map(path).as_deref(),
                    runner_tmp.as_ref().map(path).as_deref(),
                    *tmpfs_bytes,
                    trees,
                );
                (true, new_root, before, after, c"localhost".to_owned())
            }
        };
        let drop = namespaces || (launch.user.is_none() && launch.drop_root_capabilities);
        Ok(Plan {
            namespaces,
            cgroup_join: launch.cgroup_join,
            network: launch.network,
            new_root,
            before_pivot,
            after_pivot,
            hostname,
            working_directory: launch.working_directory,
            user: launch.user,
            drop_capabilities: if drop {
                self.drop_capabilities.clone()
            } else {
                Vec::new()
            },
            owned_directories: launch.owned_directories,
        })
    }
}

/// A launcher's policy, with what checking it takes.
#[derive(Debug)]
pub(crate) struct Enforced {
    pub policy: Policy,
    pub planner: Planner,
    /// The host's network namespace (the launcher's own), as `(st_dev,
    /// st_ino)`: no sandbox joins it.
    host_network: (u64, u64),
}

impl Enforced {
    /// `policy`, with `host_network` the launcher's own network namespace.
    pub fn new(policy: Policy, host_network: BorrowedFd) -> io::Result<Enforced> {
        let stat = rustix::fs::fstat(host_network)?;
        Ok(Enforced {
            planner: Planner::sandbox(
                &policy.root_mount_point,
                &policy.read_only_paths,
                &policy.hidden_paths,
            ),
            policy,
            host_network: (stat.st_dev, stat.st_ino),
        })
    }

    /// Checks `launch` against the policy, every path against
    /// `confinement` (the work root): PermissionDenied, saying what the
    /// policy does not allow. A plain process whose user the operator lets
    /// actions choose, and that stays root, is made to keep only the
    /// sandbox's capabilities.
    pub fn check(&self, launch: &mut Launch, confinement: &Confinement) -> io::Result<()> {
        if !self.policy.runs_actions {
            return Err(refused("any start: this process runs no actions"));
        }
        for dir in &launch.owned_directories {
            confinement.check(dir)?;
        }
        match &launch.kind {
            Kind::Sandbox {
                workspace,
                runner_tmp,
                ..
            } => {
                for path in workspace.iter().chain(runner_tmp) {
                    confinement.check(path)?;
                }
                if launch.network == Network::Host {
                    return Err(refused("a sandbox in the host's network namespace"));
                }
            }
            Kind::Plain => {
                if matches!(launch.network, Network::Join(_)) {
                    return Err(refused("a plain process joining a network namespace"));
                }
                if !self.policy.admits(launch.user) {
                    if !self.policy.none_allow_user_switch {
                        return Err(refused(&match launch.user {
                            None => "a plain process as root".to_string(),
                            Some((uid, gid)) => format!(
                                "a plain process as uid {uid}, gid {gid}, not an action user ({})",
                                self.policy.action_users
                            ),
                        }));
                    }
                    // Root that the operator lets actions choose keeps
                    // only the sandbox's capabilities.
                    launch.drop_root_capabilities = true;
                }
            }
        }
        if let Network::Join(fd) = launch.network {
            // SAFETY: the request's descriptors stay open until it is
            // answered.
            self.check_network(unsafe { BorrowedFd::borrow_raw(fd) })?;
        }
        Ok(())
    }

    /// Takes the host paths of a checked `launch` as a launcher must, by
    /// what it opens beneath the work root rather than by their names
    /// (see [`Confinement`]): gives its directories to its user now (and
    /// leaves none for the plan), and opens detached copies of a
    /// sandbox's workspace and runner /tmp, which its plan binds
    /// ([`Planner::plan_from`]). The copies stay open until the action
    /// has started.
    pub fn take_paths(
        &self,
        launch: &mut Launch,
        confinement: &Confinement,
    ) -> io::Result<(Trees, Vec<OwnedFd>)> {
        let directories = std::mem::take(&mut launch.owned_directories);
        if let Some(user) = launch.user {
            confinement.give(&directories, user)?;
        }
        let mut trees = Trees::default();
        let mut held = Vec::new();
        if let Kind::Sandbox {
            workspace,
            runner_tmp,
            ..
        } = &launch.kind
        {
            for (path, tree) in [
                (workspace, &mut trees.workspace),
                (runner_tmp, &mut trees.runner_tmp),
            ] {
                let Some(path) = path else { continue };
                let opened = confinement.open_beneath(path, OFlags::PATH | OFlags::DIRECTORY)?;
                let copy = rustix::mount::open_tree(
                    &opened,
                    c"",
                    OpenTreeFlags::OPEN_TREE_CLONE
                        | OpenTreeFlags::OPEN_TREE_CLOEXEC
                        | OpenTreeFlags::AT_EMPTY_PATH,
                )?;
                *tree = Some(copy.as_raw_fd());
                held.push(copy);
            }
        }
        Ok((trees, held))
    }

    /// Refuses a namespace to join that is not a network namespace, or is
    /// the host's.
    fn check_network(&self, namespace: BorrowedFd) -> io::Result<()> {
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        use std::os::fd::AsRawFd;
        // SAFETY: an ioctl without arguments on a descriptor we hold.
        let kind = unsafe { libc::ioctl(namespace.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(refused("joining something that is not a network namespace"));
        }
        let stat = rustix::fs::fstat(namespace)?;
        if (stat.st_dev, stat.st_ino) == self.host_network {
            return Err(refused("joining the host's network namespace"));
        }
        Ok(())
    }
}

/// The error of a start the policy does not allow.
fn refused(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("the launcher's policy does not allow {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    fn policy(action_users: ActionUsers, none_allow_user_switch: bool) -> Policy {
        Policy {
            work_root: "/work".into(),
            root_mount_point: "/run/kiln-sandbox".into(),
            read_only_paths: Vec::new(),
            hidden_paths: Vec::new(),
            action_users,
            none_allow_user_switch,
            runs_actions: true,
        }
    }

    fn enforced(policy: Policy) -> (Enforced, Confinement) {
        let host = std::fs::File::open("/proc/self/ns/net").unwrap();
        let mut confinement = Confinement::default();
        confinement.confine(&c_path(&policy.work_root)).unwrap();
        (Enforced::new(policy, host.as_fd()).unwrap(), confinement)
    }

    fn sandbox(workspace: &str) -> Launch {
        Launch {
            kind: Kind::Sandbox {
                workspace: Some(CString::new(workspace).unwrap()),
                runner_tmp: None,
                tmpfs_bytes: None,
            },
            network: Network::Empty,
            ..Launch::plain(Path::new("/work/a"), None, Vec::new())
        }
    }

    fn refusal(result: io::Result<()>) -> String {
        let error = result.expect_err("allowed");
        // Refused as not allowed, or as not a plain absolute path.
        let kinds = [io::ErrorKind::PermissionDenied, io::ErrorKind::InvalidInput];
        assert!(kinds.contains(&error.kind()), "{error}");
        error.to_string()
    }

    #[test]
    fn a_sandbox_mounts_from_the_host_only_what_is_under_the_work_root() {
        let (enforced, confinement) = enforced(policy(ActionUsers::One(Some((1000, 1000))), false));
        // As root in the sandbox: allowed, and it keeps only the
        // sandbox's capabilities.
        let mut fine = sandbox("/work/a");
        enforced.check(&mut fine, &confinement).unwrap();
        let plan = enforced.planner.plan(fine).unwrap();
        assert!(plan.namespaces);
        assert!(
            plan.drop_capabilities.contains(&21),
            "CAP_SYS_ADMIN is kept"
        );
        for workspace in ["/etc", "/work/../etc", "/workspace", "work/a"] {
            refusal(enforced.check(&mut sandbox(workspace), &confinement));
        }
        let mut tmp = sandbox("/work/a");
        tmp.kind = Kind::Sandbox {
            workspace: None,
            runner_tmp: Some(c"/root".to_owned()),
            tmpfs_bytes: None,
        };
        refusal(enforced.check(&mut tmp, &confinement));
        let mut given = sandbox("/work/a").giving(&[]);
        given.owned_directories = vec![c"/home/someone".to_owned()];
        refusal(enforced.check(&mut given, &confinement));
    }

    #[test]
    fn a_sandbox_never_shares_the_hosts_network() {
        let (enforced, confinement) = enforced(policy(ActionUsers::One(None), true));
        let mut host = sandbox("/work/a");
        host.network = Network::Host;
        assert!(refusal(enforced.check(&mut host, &confinement)).contains("host's network"));
        // Its namespace, passed as one to join, is refused too.
        let namespace = std::fs::File::open("/proc/self/ns/net").unwrap();
        let mut joined = sandbox("/work/a");
        joined.network = Network::Join(namespace.as_raw_fd());
        assert!(refusal(enforced.check(&mut joined, &confinement)).contains("host's network"));
        // And so is a descriptor that is no network namespace.
        let file = std::fs::File::open("/dev/null").unwrap();
        joined.network = Network::Join(file.as_raw_fd());
        assert!(refusal(enforced.check(&mut joined, &confinement)).contains("not a network"));
    }

    #[test]
    fn a_plain_process_runs_as_an_action_user_unless_the_operator_lets_it_choose() {
        let range = ActionUsers::Range {
            first: 5000,
            last: 5009,
        };
        let (strict, confinement) = enforced(policy(range, false));
        let plain = |user| Launch::plain(Path::new("/work/a"), user, Vec::new());
        strict
            .check(&mut plain(Some((5003, 5003))), &confinement)
            .unwrap();
        for user in [
            None,
            Some((1000, 1000)),
            Some((5003, 42)),
            Some((5010, 5010)),
        ] {
            refusal(strict.check(&mut plain(user), &confinement));
        }
        let mut joining = plain(Some((5003, 5003)));
        let namespace = std::fs::File::open("/proc/self/ns/net").unwrap();
        joining.network = Network::Join(namespace.as_raw_fd());
        refusal(strict.check(&mut joining, &confinement));

        // Where the operator lets actions choose, a root one keeps only the
        // sandbox's capabilities, whatever the executor asked.
        let (lenient, confinement) = enforced(policy(range, true));
        let mut root = plain(None);
        lenient.check(&mut root, &confinement).unwrap();
        assert!(root.drop_root_capabilities);
        assert!(lenient
            .planner
            .plan(root)
            .unwrap()
            .drop_capabilities
            .contains(&21));
        lenient
            .check(&mut plain(Some((1000, 1000))), &confinement)
            .unwrap();

        // A process that runs no actions has its launchers start nothing.
        let (none, confinement) = enforced(Policy {
            runs_actions: false,
            ..policy(range, true)
        });
        let refused = refusal(none.check(&mut plain(Some((5003, 5003))), &confinement));
        assert!(refused.contains("runs no actions"), "{refused}");
        refusal(none.check(&mut sandbox("/work/a"), &confinement));

        // An executor whose action user is root runs root actions as root.
        let (root_users, confinement) = enforced(policy(ActionUsers::One(None), false));
        let mut root = plain(None);
        root_users.check(&mut root, &confinement).unwrap();
        assert!(root_users
            .planner
            .plan(root)
            .unwrap()
            .drop_capabilities
            .is_empty());
    }
}
