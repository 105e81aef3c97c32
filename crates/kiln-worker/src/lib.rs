//! Kiln's worker: what runs on an executor. It holds the executor's
//! session with a scheduler and runs *one* action at a time per task,
//! given its digest. The scheduler that decides which action runs where is
//! `kiln-scheduler`; this crate uses its public API only.
//!
//! - [`session`]: [`RemoteSession`], the `kiln executor` process's session
//!   with a remote scheduler (register, heartbeat, run, report);
//! - [`local`]: [`LocalSession`], the embedded worker of `kiln serve`,
//!   leasing actions from the scheduler in the same process;
//! - [`cas`]: the CAS client (batched small blobs, streamed large ones);
//! - [`cache`]: the local content-addressed file cache inputs are linked from;
//! - [`inputs`]: fetching, checking and materializing the input tree;
//! - [`validate`]: directory-entry and path checks before anything runs;
//! - [`isolation`]: the [`Isolation`] seam, its `none` backend, and
//!   [`Isolations`], the set an executor offers;
//! - [`trial`]: the trivial action each backend runs when it is probed;
//! - [`process`]: the child-process supervision every backend shares
//!   (process group, timeout, SIGTERM → grace → SIGKILL);
//! - [`outputs`]: turning the declared outputs into ActionResult entries;
//! - [`stdio`]: the pipes an action's stdout and stderr go through, drained
//!   into files that exist only when the action printed something;
//! - [`persistent`]: persistent workers kept in warm runners, and their
//!   `WorkRequest`/`WorkResponse` protocol (`proto` and `json`);
//! - [`runners`]: warm runners (`recycle-runner`), kept by runner key;
//! - [`scratch`]: action directories, and the directories reused inside them;
//! - [`workspace`]: how inputs are laid out so no action can change the
//!   cache (linked, overlaid or copied); the steps only root can take
//!   (overlay mounts, owners given and taken back) are the executor's
//!   privileged side's (`PrivilegedSteps`);
//! - [`users`]: user names and uids from the host's /etc/passwd;
//! - [`worker`]: [`Worker`], which runs one action by composing the above.
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
pub mod local;
pub mod outputs;
pub mod persistent;
pub mod process;
pub mod runners;
pub mod scratch;
pub mod session;
pub mod stdio;
pub mod trial;
pub mod users;
pub mod validate;
pub mod worker;
pub mod workspace;

pub use error::RunError;
pub use isolation::{
    beyond_plain_process, CommandSpec, Isolation, Isolations, NoIsolation, Resident, RunAs,
};
pub use local::LocalSession;
pub use process::{Limits, ProcessOutcome, StopReason};
pub use session::{RemoteSession, SessionConfig};
pub use tokio_util::sync::CancellationToken;
pub use worker::{RunOutcome, Worker, WorkerConfig};
