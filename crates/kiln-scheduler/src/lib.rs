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
//! - [`service`]: the gRPC edge (Execution and Operations);
//! - [`error`]: [`SchedulerError`], converted to `tonic::Status` at the edge.
#![forbid(unsafe_code)]

pub mod error;
pub mod executor;
pub mod scheduler;
pub mod service;

pub use error::SchedulerError;
pub use executor::EmbeddedExecutor;
pub use scheduler::{Scheduler, SchedulerConfig};
pub use service::{execution_capabilities, ExecutionService, OperationsService};
