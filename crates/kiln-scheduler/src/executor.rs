//! Executors that take work from a pool's queue. [`EmbeddedExecutor`] runs
//! actions in the server's own process with `kiln_executor::ActionRunner`,
//! `concurrency` at a time; the runner reaches the CAS over gRPC, as a
//! remote executor would, so both see the same storage semantics.

use std::sync::Arc;

use kiln_executor::{ActionRunner, RunError, RunOutcome};
use tokio::task::JoinSet;

use kiln_platform::{Arch, OsFamily};

use crate::scheduler::{
    Capacity, Offer, PoolQueue, Properties, QueueKey, ResourceAmount, Scheduler,
};

/// The embedded executor's identity for the queue (one per pool).
const EMBEDDED_ID: &str = "embedded";

/// An executor living inside the server process, registered in one pool.
pub struct EmbeddedExecutor {
    scheduler: Arc<Scheduler>,
    key: QueueKey,
    offer: Offer,
    queue: Arc<PoolQueue>,
}

impl EmbeddedExecutor {
    /// Registers the executor in `pool` at once, so actions for the pool are
    /// accepted (and queued) while the runner is still being set up.
    /// It runs on this machine: `linux`, and the host's architecture;
    /// `capacity` is what its running actions may reserve in total
    /// (usually [`ResourceAmount::of_host`]); `isolation_types` are what
    /// its runner offers (see `ActionRunner::isolation_types`).
    pub fn register(
        scheduler: Arc<Scheduler>,
        pool: impl Into<String>,
        capacity: ResourceAmount,
        isolation_types: &[&str],
    ) -> EmbeddedExecutor {
        let key = QueueKey {
            pool: pool.into(),
            os_family: OsFamily::Linux,
            arch: host_arch(),
        };
        let offer = Offer::new(
            Properties::new(),
            isolation_types
                .iter()
                .filter_map(|name| kiln_platform::IsolationType::from_name(name)),
            capacity,
        );
        let queue = scheduler.register_executor(&key, &offer);
        EmbeddedExecutor {
            scheduler,
            key,
            offer,
            queue,
        }
    }

    /// Runs queued actions with `runner`, `concurrency` at a time, until the
    /// scheduler shuts down.
    pub async fn run(self, runner: Arc<ActionRunner>, concurrency: usize) {
        let mut workers = JoinSet::new();
        // Shared by the workers: a worker takes an action only if its
        // reservation fits in what the others left free.
        let capacity = Capacity::new(self.offer.capacity);
        for _ in 0..concurrency.max(1) {
            let scheduler = self.scheduler.clone();
            let queue = self.queue.clone();
            let runner = runner.clone();
            let capacity = capacity.clone();
            let offers = self.offer.clone();
            workers.spawn(async move {
                let stop = scheduler.shutdown_token().clone();
                // The reservation is held until the action is finished or
                // requeued.
                while let Some((action, _reservation)) =
                    queue.next(&offers, &capacity, EMBEDDED_ID, &stop).await
                {
                    scheduler.started(&action);
                    let request = RunRequest {
                        instance_name: action.instance_name.clone(),
                        action_digest: action.action_digest.clone(),
                        platform: action.platform.clone(),
                        cancel: action.cancel.clone(),
                    };
                    match run_action(runner.clone(), request).await {
                        // This executor cannot run it now (a full disk):
                        // another may; attempts stay bounded.
                        Err(error) if error.is_retryable_elsewhere() => {
                            scheduler.requeue_elsewhere(&action, EMBEDDED_ID, &error.to_string())
                        }
                        outcome => scheduler.finished(&action, outcome).await,
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
    }
}

impl Drop for EmbeddedExecutor {
    fn drop(&mut self) {
        self.scheduler.unregister_executor(&self.key, &self.offer);
    }
}

/// What the runner needs to run one action.
pub(crate) struct RunRequest {
    pub instance_name: String,
    pub action_digest: kiln_proto::reapi::Digest,
    pub platform: kiln_platform::Platform,
    pub cancel: kiln_executor::CancellationToken,
}

/// Runs one action as its own tokio task (the runner's future is `Send +
/// 'static` once it owns its arguments), so a panic in the runner becomes
/// an error for this action instead of taking the worker down. No thread
/// per running action: concurrency is bounded by the callers (worker count,
/// executor capacity).
pub(crate) async fn run_action(
    runner: Arc<ActionRunner>,
    action: RunRequest,
) -> Result<RunOutcome, RunError> {
    let digest = action.action_digest.clone();
    tokio::spawn(async move {
        runner
            .run(
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
            "the runner of action {}/{} panicked: {e}",
            digest.hash, digest.size_bytes
        )))
    })
}

/// The architecture this process runs on, in PLATFORM.md's terms.
pub fn host_arch() -> Arch {
    if cfg!(target_arch = "aarch64") {
        Arch::Arm64
    } else {
        Arch::Amd64
    }
}
