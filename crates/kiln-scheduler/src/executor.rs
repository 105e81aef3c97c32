//! Executors that take work from a pool's queue. [`EmbeddedExecutor`] runs
//! actions in the server's own process with `kiln_executor::ActionRunner`,
//! `concurrency` at a time; the runner reaches the CAS over gRPC, as a
//! remote executor would, so both see the same storage semantics.

use std::sync::Arc;

use kiln_executor::{ActionRunner, RunError, RunOutcome};
use tokio::task::JoinSet;

use crate::scheduler::{PoolQueue, QueuedAction, Scheduler};

/// An executor living inside the server process, registered in one pool.
pub struct EmbeddedExecutor {
    scheduler: Arc<Scheduler>,
    pool: String,
    queue: Arc<PoolQueue>,
}

impl EmbeddedExecutor {
    /// Registers the executor in `pool` at once, so actions for the pool are
    /// accepted (and queued) while the runner is still being set up.
    pub fn register(scheduler: Arc<Scheduler>, pool: impl Into<String>) -> EmbeddedExecutor {
        let pool = pool.into();
        let queue = scheduler.register_executor(&pool);
        EmbeddedExecutor {
            scheduler,
            pool,
            queue,
        }
    }

    /// Runs queued actions with `runner`, `concurrency` at a time, until the
    /// scheduler shuts down.
    pub async fn run(self, runner: Arc<ActionRunner>, concurrency: usize) {
        let mut workers = JoinSet::new();
        for _ in 0..concurrency.max(1) {
            let scheduler = self.scheduler.clone();
            let queue = self.queue.clone();
            let runner = runner.clone();
            workers.spawn(async move {
                let stop = scheduler.shutdown_token().clone();
                while let Some(action) = queue.next(&stop).await {
                    scheduler.started(&action);
                    let outcome = run_on_own_thread(runner.clone(), action.clone()).await;
                    scheduler.finished(&action, outcome).await;
                }
            });
        }
        while workers.join_next().await.is_some() {}
    }
}

impl Drop for EmbeddedExecutor {
    fn drop(&mut self) {
        self.scheduler.unregister_executor(&self.pool);
    }
}

/// Runs one action on a blocking thread that drives the runner's future.
/// Why: `ActionRunner::run`'s future borrows `&str` inside stream
/// combinators, which rustc cannot prove `Send` for every lifetime, so it
/// cannot be given to `tokio::spawn`. Concurrency is bounded by the worker
/// count, so this holds at most `concurrency` blocking threads.
async fn run_on_own_thread(
    runner: Arc<ActionRunner>,
    action: Arc<QueuedAction>,
) -> Result<RunOutcome, RunError> {
    let handle = tokio::runtime::Handle::current();
    let digest = action.action_digest.clone();
    tokio::task::spawn_blocking(move || {
        handle.block_on(runner.run(
            &action.instance_name,
            &action.action_digest,
            &action.platform,
            action.cancel.clone(),
        ))
    })
    .await
    .unwrap_or_else(|e| {
        Err(RunError::Internal(format!(
            "the runner of action {}/{} panicked: {e}",
            digest.hash, digest.size_bytes
        )))
    })
}
