//! Kiln's `sandbox` isolation (`workload-isolation-type=sandbox`): each
//! action runs in its own mount, pid, IPC, UTS and (with `dockerNetwork=off`)
//! network namespace, on a fresh root where the system is read-only and
//! only its workspace and a private /tmp are writable, inside a cgroup that
//! enforces its memory, CPU and pids limits.
//!
//! - [`sandbox`]: [`Sandbox`] (probe, and the [`kiln_executor::Isolation`]
//!   implementation) and its [`SandboxConfig`];
//! - [`cgroup`]: per-action cgroups on v1 or v2 hierarchies, usable by
//!   other backends too;
//! - `view`: the filesystem an action sees, as mount steps;
//! - `child`: the code that runs between fork (or clone) and exec;
//! - `cloned`: waiting for a cloned action through its pidfd.
//!
//! Linux only; the executor must run as root.

pub mod cgroup;
mod child;
mod cloned;
pub mod sandbox;
mod view;

pub use sandbox::{resolve_user, Sandbox, SandboxConfig, MIN_MEMORY_BYTES};
pub use view::{HIDDEN_PATHS, SYSTEM_PATHS};
