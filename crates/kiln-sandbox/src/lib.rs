//! Kiln's `sandbox` isolation (`workload-isolation-type=sandbox`): each
//! action runs in its own mount, pid, IPC, UTS, cgroup and network
//! namespace, on a fresh root where the system is read-only and only its
//! workspace and a private /tmp are writable, inside a cgroup that enforces
//! its memory, CPU and pids limits.
//!
//! - [`sandbox`]: [`Sandbox`] (probe, and the [`kiln_worker::Isolation`]
//!   implementation) and its [`SandboxConfig`];
//! - [`cgroup`]: per-action cgroups on v1 or v2 hierarchies, usable by
//!   other backends too;
//! - [`plain`]: [`PlainProcess`], `none` as the action user, started the
//!   same cheap way (in the host's namespaces, but for `dockerNetwork=off`
//!   and `dockerInit`, which it honours with the same child code);
//! - [`network`]: `dockerNetwork=bridge`, a private network with outbound
//!   access only (a veth pair per action, one nftables table per host),
//!   and `netlink`, the few rtnetlink requests that wire it;
//! - `view`: the filesystem an action sees, as mount steps;
//! - [`launch`]: what a launcher is asked to start, and the policy root
//!   fixes for what it starts;
//! - [`launcher`]: the process that starts actions for a root executor
//!   (`kiln launcher`) and takes its other root-only steps, and the
//!   executor's side of it;
//! - [`privileged`]: the workspace steps only root can take (overlays of
//!   actions that run privileged, directories given to an action's user
//!   and taken back from it), taken for the worker through the launchers,
//!   confined to the work root;
//! - [`pin`]: paths checked beneath a root and bind-mounted where only
//!   root writes, for the docker gate to hand to dockerd;
//! - [`capabilities`]: what a root executor's own process keeps of root's
//!   capabilities once its launchers run;
//! - `child`: the code that runs between clone (or fork) and exec;
//! - `cloned`: waiting for a cloned action through its pidfd.
//!
//! What an action sees: `/usr`, `/bin`, `/sbin`, `/lib*`, `/etc` (password
//! hashes, sudoers and TLS/SSH private keys masked) and any configured
//! paths, read-only; its workspace read-write at the same absolute path; a
//! private `/tmp`, `/dev/shm` and `/dev/pts`; `/dev/{null,zero,full,random,
//! urandom,tty}`; its own `/proc` (host-global parts read-only or masked)
//! and a read-only `/sys`. Nothing else of the host: not `/root`, `/home`,
//! `/var`, other workspaces, or the executor's cache and data.
//!
//! Who it runs as: root with `dockerRunAsRoot` (keeping Docker's default
//! capabilities minus CAP_MKNOD); else `dockerUser` (name through the
//! host's /etc/passwd, uid, or uid:gid; only that group, no supplementary
//! ones); else the executor's action user (`--action-user`: by default a
//! uid of its own for each runner; root only when that is `root`). Always
//! with `no_new_privs`; a user other than root keeps no capabilities.
//!
//! Its network: with `dockerNetwork=off`, only its own `lo`. With `bridge`
//! (or unset, where the host allows it), also `eth0`, routed through the
//! host and masqueraded: it reaches other machines (and names through the
//! host's /etc/resolv.conf, unless that names only a loopback resolver), but
//! not the host itself (loopback or any of its addresses), nor other
//! actions, nor anything over IPv6. Never the host's namespace: where
//! bridged networks cannot be set up (no `nft`, say), `bridge` is refused
//! with FAILED_PRECONDITION and unset means `off`.
//!
//! Warm runners (`recycle-runner`): the sandbox itself is made anew for
//! every action, but a kept runner's workspace and its own /tmp directory
//! (bound over the sandbox's /tmp instead of a tmpfs) carry over to the
//! next action with the same runner key.
//!
//! Not done: rootless operation (user namespaces), seccomp filters, IPv6
//! for bridged actions, device cgroups, and disk quotas
//! (`EstimatedFreeDiskBytes`). Linux only; the executor must run as
//! root, or as a user of its own that root switched to once its launchers
//! ran ([`run_as`]).

pub mod capabilities;
pub mod cgroup;
mod child;
mod cloned;
pub mod launch;
pub mod launcher;
mod netlink;
pub mod network;
pub mod pin;
pub mod plain;
pub mod privileged;
pub mod run_as;
pub mod sandbox;
mod view;

pub use plain::PlainProcess;
pub use sandbox::{resolve_user, Sandbox, SandboxConfig, MIN_MEMORY_BYTES};
pub use view::{HIDDEN_PATHS, SYSTEM_PATHS};
