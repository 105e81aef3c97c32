//! The worker embedded in `kiln serve`: takes actions from the in-process
//! scheduler ([`kiln_scheduler::local::LocalExecutor`]) and runs them with a
//! [`Worker`], `concurrency` at a time. The worker reaches the CAS over
//! gRPC, as a remote executor does, so both see the same storage semantics.

use std::sync::Arc;

use kiln_scheduler::local::{Finished, Lease, LocalExecutor};
use tokio::task::JoinSet;

use crate::{RunError, RunOutcome, Worker};

/// Connects a [`Worker`] to the scheduler in this process.
pub struct LocalSession {
    executor: Arc<LocalExecutor>,
}

impl LocalSession {
    /// `executor` is registered already, so actions are accepted (and
    /// queued) while the worker is still being set up.
    pub fn new(executor: LocalExecutor) -> LocalSession {
        LocalSession {
            executor: Arc::new(executor),
        }
    }

    /// Runs leased actions with `worker`, `concurrency` at a time, until
    /// the scheduler shuts down.
    pub async fn run(self, worker: Arc<Worker>, concurrency: usize) {
        let mut tasks = JoinSet::new();
        for _ in 0..concurrency.max(1) {
            let executor = self.executor.clone();
            let worker = worker.clone();
            tasks.spawn(async move {
                while let Some(lease) = executor.next().await {
                    run_lease(&worker, lease).await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn run_lease(worker: &Arc<Worker>, lease: Lease) {
    let request = RunRequest {
        org: lease.org().to_string(),
        instance_name: lease.instance_name().to_string(),
        action_digest: lease.action_digest().clone(),
        platform: lease.platform().clone(),
        cancel: lease.cancel().clone(),
    };
    match run_action(worker.clone(), request).await {
        Err(error) if error.is_retryable_elsewhere() => lease.retry_elsewhere(&error.to_string()),
        outcome => lease.finish(finished(outcome)).await,
    }
}

/// An outcome as the scheduler records it.
pub(crate) fn finished(outcome: Result<RunOutcome, RunError>) -> Finished {
    match outcome {
        Ok(RunOutcome {
            result,
            status,
            cacheable,
        }) => Finished {
            result: Some(result),
            status: kiln_proto::status::to_rpc(status),
            cacheable,
        },
        Err(error) => Finished {
            result: None,
            status: kiln_proto::status::to_rpc(error.into()),
            cacheable: false,
        },
    }
}

/// What the worker needs to run one action.
pub(crate) struct RunRequest {
    /// The organisation it runs for (empty: open access).
    pub org: String,
    pub instance_name: String,
    pub action_digest: kiln_proto::reapi::Digest,
    pub platform: kiln_platform::Platform,
    pub cancel: crate::CancellationToken,
}

/// Runs one action as its own tokio task (the worker's future is `Send +
/// 'static` once it owns its arguments), so a panic in the worker becomes
/// an error for this action instead of taking the session down. No thread
/// per running action: concurrency is bounded by the callers (task count,
/// executor capacity).
pub(crate) async fn run_action(
    worker: Arc<Worker>,
    action: RunRequest,
) -> Result<RunOutcome, RunError> {
    let digest = action.action_digest.clone();
    tokio::spawn(async move {
        worker
            .run(
                &action.org,
                &action.instance_name,
                &action.action_digest,
                &action.platform,
                action.cancel.clone(),
            )
            .await
    })
    .await
    .unwrap_or_else(|e| {
        Err(RunError::Internal(format!(
            "the worker running action {}/{} panicked: {e}",
            digest.hash, digest.size_bytes
        )))
    })
}
