//! The scheduler's side of an executor in the server's own process (the
//! embedded worker of `kiln serve`): it registers in one pool like a
//! remote executor, and takes queued actions as [`Lease`]s that it finishes
//! with its result. This is the whole interface: the worker that runs the
//! actions lives in `kiln-worker` and sees none of the queue's internals.

use std::sync::Arc;

use kiln_platform::{Arch, IsolationType, OsFamily, Platform};
use kiln_proto::{reapi, rpc};
use tokio_util::sync::CancellationToken;

use crate::capacity::{Capacity, Reservation, ResourceAmount};
use crate::operation::QueuedAction;
use crate::queue::{Offer, PoolQueue, Properties, QueueKey};
use crate::report::{ExecutorEntry, RunningOn};
use crate::scheduler::Scheduler;

/// The embedded executor's identity for the queue (one per pool).
const LOCAL_ID: &str = "embedded";

/// An executor living inside the server process, registered in one pool,
/// with `capacity` that its leased actions share.
pub struct LocalExecutor {
    scheduler: Arc<Scheduler>,
    offer: Offer,
    queue: Arc<PoolQueue>,
    capacity: Arc<Capacity>,
    entry: Arc<ExecutorEntry>,
}

impl LocalExecutor {
    /// Registers the executor in `pool` at once, so actions for the pool are
    /// accepted (and queued) while its worker is still being set up. It
    /// runs on this machine (`linux`, the host's architecture); `capacity`
    /// is what its running actions may reserve in total (usually
    /// [`ResourceAmount::of_host`]); it offers `isolation_types` and
    /// declares `properties` (what its backends say of themselves); its
    /// worker runs at most `slots` actions at once.
    pub fn register(
        scheduler: Arc<Scheduler>,
        pool: impl Into<String>,
        capacity: ResourceAmount,
        isolation_types: &[&str],
        properties: Properties,
        slots: usize,
    ) -> LocalExecutor {
        let key = QueueKey {
            pool: pool.into(),
            os_family: OsFamily::Linux,
            arch: Arch::host(),
        };
        // In process: an assignment never crosses a connection.
        let offer = Offer {
            receives_secrets: true,
            ..Offer::new(
                properties,
                isolation_types
                    .iter()
                    .filter_map(|name| IsolationType::from_name(name)),
                capacity,
            )
        };
        let total = capacity;
        let capacity = Capacity::new(total);
        let entry = ExecutorEntry::new(
            format!("{LOCAL_ID}/{}", key.pool),
            format!("kiln-embedded/{}", key.pool),
            key,
            offer.clone(),
            true,
            slots,
            capacity.clone(),
        );
        let queue = scheduler.register_executor(entry.clone());
        LocalExecutor {
            scheduler,
            offer,
            queue,
            capacity,
            entry,
        }
    }

    /// The next queued action that fits in the free capacity, now
    /// EXECUTING; waits for one; `None` once the scheduler shuts down.
    /// Its reservation is held until the lease is finished or dropped.
    pub async fn next(&self) -> Option<Lease> {
        let stop = self.scheduler.shutdown_token();
        let (action, reservation) = self
            .queue
            .next(&self.offer, &self.capacity, LOCAL_ID, stop)
            .await?;
        self.scheduler.started(&action, &self.entry.name);
        Some(Lease {
            scheduler: self.scheduler.clone(),
            action,
            _reservation: reservation,
            _counted: RunningOn::new(&self.entry),
        })
    }
}

impl Drop for LocalExecutor {
    fn drop(&mut self) {
        self.scheduler.unregister_executor(&self.entry.id);
    }
}

/// One action taken by a [`LocalExecutor`]. Dropping it unfinished leaves
/// the operation EXECUTING until the scheduler shuts down: finish it.
pub struct Lease {
    scheduler: Arc<Scheduler>,
    action: Arc<QueuedAction>,
    _reservation: Reservation,
    _counted: RunningOn,
}

/// What an executor reports for an action it ran: the `ExecuteResponse`'s
/// result and status, and whether the result may go to the Action Cache.
pub struct Finished {
    pub result: Option<reapi::ActionResult>,
    pub status: rpc::Status,
    pub cacheable: bool,
}

impl Lease {
    pub fn instance_name(&self) -> &str {
        &self.action.instance_name
    }

    /// The organisation the action runs for (empty: open access).
    pub fn org(&self) -> &str {
        &self.action.client.org
    }

    pub fn action_digest(&self) -> &reapi::Digest {
        &self.action.action_digest
    }

    pub fn platform(&self) -> &Platform {
        &self.action.platform
    }

    /// Fires when the operation is cancelled or the scheduler shuts down.
    pub fn cancel(&self) -> &CancellationToken {
        &self.action.cancel
    }

    /// Completes the operation (writing a cacheable success to the AC).
    pub async fn finish(self, finished: Finished) {
        self.scheduler
            .finished(
                &self.action,
                finished.result,
                finished.status,
                finished.cacheable,
            )
            .await
    }

    /// This executor cannot run the action now (a full disk): another may
    /// take it; attempts stay bounded.
    pub fn retry_elsewhere(self, why: &str) {
        self.scheduler
            .requeue_elsewhere(&self.action, LOCAL_ID, why)
    }
}
