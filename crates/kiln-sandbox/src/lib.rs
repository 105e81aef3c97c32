//! Kiln's `sandbox` isolation (`workload-isolation-type=sandbox`): each
//! action runs in its own mount, pid, IPC, UTS, cgroup and (with
//! `dockerNetwork=off`) network namespace, on a fresh root where the system
//! is read-only and only its workspace and a private /tmp are writable,
//! inside a cgroup that enforces its memory, CPU and pids limits.
//!
//! - [`sandbox`]: [`Sandbox`] (probe, and the [`kiln_worker::Isolation`]
//!   implementation) and its [`SandboxConfig`];
//! - [`cgroup`]: per-action cgroups on v1 or v2 hierarchies, usable by
//!   other backends too;
//! - [`plain`]: [`PlainProcess`], `none` as the action user, started the
//!   same cheap way (no namespaces);
//! - `view`: the filesystem an action sees, as mount steps;
//! - `child`: the code that runs between fork (or clone) and exec;
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
//! Who it runs as: `dockerUser` (name through the host's /etc/passwd, uid,
//! or uid:gid; only that group, no supplementary ones), else root with
//! Docker's default capabilities minus CAP_MKNOD, with `no_new_privs`.
//!
//! Not done: rootless operation (user namespaces), seccomp filters, a
//! bridged network (`dockerNetwork=bridge` shares the host's network
//! namespace, including its loopback services), device cgroups, disk
//! quotas (`EstimatedFreeDiskBytes`), and runner recycling (each action
//! gets a fresh sandbox). Linux only; the executor must run as root.

pub mod cgroup;
mod child;
mod cloned;
pub mod plain;
pub mod sandbox;
mod view;

pub use plain::PlainProcess;
pub use sandbox::{resolve_user, Sandbox, SandboxConfig, MIN_MEMORY_BYTES};
pub use view::{HIDDEN_PATHS, SYSTEM_PATHS};
