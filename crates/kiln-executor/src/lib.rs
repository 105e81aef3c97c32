//! Kiln's action runner: the part of REAPI execution that runs *one*
//! action given its digest. The scheduler that decides which action runs
//! where lives elsewhere; this crate owns what happens on the executor:
//!
//! - [`cas`]: the CAS client (batched small blobs, streamed large ones);
//! - [`cache`]: the local content-addressed file cache inputs are linked from;
//! - [`inputs`]: fetching, checking and materializing the input tree;
//! - [`validate`]: directory-entry and path checks before anything runs;
//! - [`isolation`]: the [`Isolation`] seam, its `none` backend, and
//!   [`Isolations`], the set an executor offers;
//! - [`process`]: the child-process supervision every backend shares
//!   (process group, timeout, SIGTERM → grace → SIGKILL);
//! - [`outputs`]: turning the declared outputs into ActionResult entries;
//! - [`stdio`]: the pipes an action's stdout and stderr go through, drained
//!   into files that exist only when the action printed something;
//! - [`scratch`]: action directories, and the directories reused inside them;
//! - [`workspace`]: how inputs are laid out so no action can change the
//!   cache (linked, overlaid or copied), and the overlay mounts;
//! - [`users`]: user names and uids from the host's /etc/passwd;
//! - [`runner`]: [`ActionRunner`], which composes the above.
//!
//! Errors are one type, [`RunError`], converted to a `tonic::Status` at the
//! edge. [`RunError::ExecutorUnavailable`] (a full disk) means "retry on
//! another executor", not "the action is broken".
#![forbid(unsafe_code)]

pub mod cache;
pub mod cas;
pub mod error;
pub mod inputs;
pub mod isolation;
pub mod outputs;
pub mod process;
pub mod runner;
pub mod scratch;
pub mod stdio;
pub mod users;
pub mod validate;
pub mod workspace;

pub use error::RunError;
pub use isolation::{CommandSpec, Isolation, Isolations, NoIsolation, RunAs};
pub use process::{Limits, ProcessOutcome, StopReason};
pub use runner::{ActionRunner, RunOutcome, RunnerConfig};
pub use tokio_util::sync::CancellationToken;
