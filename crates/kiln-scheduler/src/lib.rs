//! Kiln's scheduler: the REAPI Execution service (Execute, WaitExecution)
//! and the google.longrunning Operations service, over one in-process
//! queue per pool.
//!
//! - [`scheduler`]: [`Scheduler`], which owns every operation: it checks an
//!   Execute request (Action and Command present, platform parsed, a pool
//!   that some executor serves), answers Action Cache hits at once, merges
//!   identical in-flight cacheable actions, queues the rest and completes
//!   them with the executor's result (writing cacheable results to the AC);
//! - [`executor`]: executors that take work from a pool's queue; today the
//!   embedded one, which runs actions with `kiln_executor::ActionRunner`;
//! - [`remote`]: the scheduler's side of Kiln's executor protocol (executor
//!   processes register over one stream per executor, indexed by
//!   [`scheduler::QueueKey`]: pool, OS, arch);
//! - [`worker`]: the executor process's side of that protocol;
//! - [`token`]: the shared secret executors present when they register;
//! - [`service`]: the gRPC edge (Execution and Operations);
//! - [`error`]: [`SchedulerError`], converted to `tonic::Status` at the edge.
#![forbid(unsafe_code)]

pub mod error;
pub mod executor;
pub mod remote;
pub mod scheduler;
pub mod service;
pub mod token;
pub mod worker;

pub use error::SchedulerError;
pub use executor::{host_arch, EmbeddedExecutor};
pub use remote::ExecutorSessions;
pub use scheduler::{ResourceAmount, Scheduler, SchedulerConfig, MAX_BYPASSES};
pub use service::{execution_capabilities, ExecutionService, OperationsService};
pub use token::ExecutorToken;
pub use worker::{Worker, WorkerConfig};
