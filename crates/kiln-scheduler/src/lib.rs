//! Kiln's scheduler: the REAPI Execution service (Execute, WaitExecution)
//! and the google.longrunning Operations service, over one in-process
//! queue per pool. It never runs an action itself: executors take them.
//!
//! - [`scheduler`]: [`Scheduler`], the façade of the Execute flow: it checks
//!   an Execute request (Action and Command present, platform parsed, a
//!   pool that some executor serves), answers Action Cache hits at once,
//!   queues the rest or merges them into an identical execution in flight,
//!   and completes them with the executor's result (writing cacheable
//!   results to the AC);
//! - [`operation`]: the operation table: each request's operation, the
//!   execution it follows (shared by merged requests), watching, listing,
//!   cancelling and deleting operations, and forgetting old ones;
//! - [`queue`]: the per-pool queues, fair share and matching of actions to
//!   executors, executors registering and leaving, requeueing;
//! - [`capacity`]: what executors have and running actions reserve;
//! - [`clock`]: the time and operation ids the scheduler reads, injected
//!   ([`Environment`]), so its policies are unit-tested with a clock the
//!   test moves;
//! - [`report`]: snapshots of executors, queues and operations, and the
//!   [`report::ExecutionObserver`] hook, for the operator's view;
//! - [`session`]: the scheduler's side of Kiln's executor protocol
//!   ([`ExecutorSessions`]: executor processes register over one stream
//!   each, indexed by [`queue::QueueKey`]: pool, OS, arch);
//! - [`local`]: the executor inside the server's process
//!   ([`local::LocalExecutor`]), which leases actions to the embedded worker;
//! - [`service`]: the gRPC edge (Execution and Operations);
//! - [`error`]: [`SchedulerError`], converted to `tonic::Status` at the edge.
//!
//! The worker side (the executor process's session, the embedded worker,
//! running actions) is `kiln-worker`, which depends on this crate's public
//! API; nothing here depends on it.
#![forbid(unsafe_code)]

pub mod capacity;
pub mod clock;
pub mod error;
pub mod local;
pub mod operation;
pub mod queue;
pub mod report;
pub mod scheduler;
pub mod service;
pub mod session;

pub use capacity::ResourceAmount;
pub use clock::{Clock, Environment, IdGenerator, RandomIds, SystemClock};
pub use error::SchedulerError;
pub use local::LocalExecutor;
pub use queue::MAX_BYPASSES;
pub use report::{Client, ExecutionObserver, OperationSummary, OutcomeClass, Stage};
pub use scheduler::{Scheduler, SchedulerConfig};
pub use service::{execution_capabilities, ExecutionService, OperationsService};
pub use session::{ExecutorSessions, SessionTransport};
