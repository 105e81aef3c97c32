//! [`Scheduler`]: every operation's life, from an Execute request to its
//! `ExecuteResponse`. An operation's state is a `watch` channel of
//! `google.longrunning.Operation`, so Execute, WaitExecution and
//! GetOperation all read the same value and a completion wakes them all.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicI8, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kiln_cas::wire::{digest_function, parse_digest, to_wire};
use kiln_cas::{ActionCacheStore, Storage};
use kiln_platform::{Arch, IsolationType, OsFamily, Platform, PropertySources};
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::protobuf::{Any, Timestamp};
use kiln_proto::reapi::{self, execution_stage};
use kiln_proto::rpc;
use kiln_proto::status::{self, to_rpc as to_rpc_status};
use kiln_proto::timestamp_now;
use kiln_store::{Digest, DigestFunction, Retention};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::error::SchedulerError;

const METADATA_TYPE: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata";
const RESPONSE_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";

/// The scheduler's settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Where actions without a `Pool` property go.
    pub default_pool: String,
    /// How many finished operations stay queryable (WaitExecution,
    /// GetOperation) before the oldest are forgotten.
    pub completed_operations_kept: usize,
    /// How long an action no registered executor matches waits for one to
    /// register (executors starting up) before it fails.
    pub unmatched_grace: Duration,
    /// How many times an action is started before an executor loss fails it.
    pub max_attempts: u32,
    /// What an action without `EstimatedCPU`/`EstimatedMemory` (or
    /// `EstimatedComputeUnits`) reserves on its executor. 0: nothing, only
    /// the executor's slot count bounds such actions.
    pub default_action_resources: ResourceAmount,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            default_pool: "default".into(),
            completed_operations_kept: 10_000,
            unmatched_grace: Duration::from_secs(2),
            max_attempts: 3,
            default_action_resources: ResourceAmount::default(),
        }
    }
}

/// CPU, memory and workspace disk: what an executor has in total and an
/// action reserves while it runs (PLATFORM.md "Resources").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResourceAmount {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

impl ResourceAmount {
    /// No limit: what an executor that advertises no capacity offers.
    pub const UNLIMITED: ResourceAmount = ResourceAmount {
        cpu_millis: u64::MAX,
        memory_bytes: u64::MAX,
        disk_bytes: u64::MAX,
    };

    /// What an executor with workspaces under `work_dir` offers: each
    /// amount `given`, or where it is 0, this machine's (see
    /// [`ResourceAmount::of_host`]).
    pub fn given_or_host(given: ResourceAmount, work_dir: &Path) -> ResourceAmount {
        let host = ResourceAmount::of_host(work_dir);
        let or = |given: u64, host: u64| if given == 0 { host } else { given };
        ResourceAmount {
            cpu_millis: or(given.cpu_millis, host.cpu_millis),
            memory_bytes: or(given.memory_bytes, host.memory_bytes),
            disk_bytes: or(given.disk_bytes, host.disk_bytes),
        }
    }

    /// This machine: its CPUs (1000 millis each), its physical memory, and
    /// the free space of the file system that holds `work_dir` (or its
    /// nearest existing ancestor).
    pub fn of_host(work_dir: &Path) -> ResourceAmount {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            })
            .unwrap_or(u64::MAX);
        let disk_bytes = work_dir
            .ancestors()
            .find_map(|dir| rustix::fs::statvfs(dir).ok())
            .map_or(u64::MAX, |fs| fs.f_bavail.saturating_mul(fs.f_frsize));
        ResourceAmount {
            cpu_millis: cpus * 1000,
            memory_bytes,
            disk_bytes,
        }
    }

    fn fits_in(self, available: ResourceAmount) -> bool {
        self.cpu_millis <= available.cpu_millis
            && self.memory_bytes <= available.memory_bytes
            && self.disk_bytes <= available.disk_bytes
    }

    fn max(self, other: ResourceAmount) -> ResourceAmount {
        ResourceAmount {
            cpu_millis: self.cpu_millis.max(other.cpu_millis),
            memory_bytes: self.memory_bytes.max(other.memory_bytes),
            disk_bytes: self.disk_bytes.max(other.disk_bytes),
        }
    }

    /// Takes `amount` out of `self` (it fits).
    fn take(&mut self, amount: ResourceAmount) {
        self.cpu_millis -= amount.cpu_millis;
        self.memory_bytes -= amount.memory_bytes;
        self.disk_bytes -= amount.disk_bytes;
    }

    /// Gives `amount` back to `self`.
    fn give(&mut self, amount: ResourceAmount) {
        self.cpu_millis = self.cpu_millis.saturating_add(amount.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(amount.memory_bytes);
        self.disk_bytes = self.disk_bytes.saturating_add(amount.disk_bytes);
    }
}

impl std::fmt::Display for ResourceAmount {
    /// In PLATFORM.md's terms, for error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let amount = |value: u64, unit: &str| {
            if value == u64::MAX {
                "unlimited".to_string()
            } else {
                format!("{value}{unit}")
            }
        };
        write!(
            f,
            "EstimatedCPU={} EstimatedMemory={} EstimatedFreeDiskBytes={}",
            amount(self.cpu_millis, "m"),
            amount(self.memory_bytes, "B"),
            amount(self.disk_bytes, "B")
        )
    }
}

/// How often smaller work of the same or a lower priority may pass a queued
/// action that does not fit an executor's free capacity (but would fit its
/// total) before that executor holds its capacity for it.
pub const MAX_BYPASSES: u32 = 16;

/// One executor's capacity while it runs: its total and what is free.
/// Queued actions are placed only where their reservation fits in `free`.
pub(crate) struct Capacity {
    free: Mutex<ResourceAmount>,
    /// Wakes the executor when a reservation ends.
    released: Notify,
}

impl Capacity {
    pub(crate) fn new(total: ResourceAmount) -> Arc<Capacity> {
        Arc::new(Capacity {
            free: Mutex::new(total),
            released: Notify::new(),
        })
    }
}

/// An action's share of its executor's capacity, given back on drop (the
/// action finished, was requeued, or its executor was lost).
pub(crate) struct Reservation {
    capacity: Arc<Capacity>,
    amount: ResourceAmount,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.capacity.free.lock().give(self.amount);
        self.capacity.released.notify_waiters();
    }
}

/// One queued or running execution, shared by every request merged into it.
pub struct QueuedAction {
    pub name: String,
    pub instance_name: String,
    pub action_digest: reapi::Digest,
    pub platform: Platform,
    /// The raw property sources the platform was parsed from, for remote
    /// executors (header values may be secrets: never log them).
    pub sources: PlatformSources,
    /// Stops the action (queued or running); a child of the scheduler's
    /// shutdown token.
    pub cancel: CancellationToken,
    /// How many times an executor has taken it.
    attempts: AtomicU32,
    /// How many times smaller work passed it while it did not fit its
    /// executor's free capacity (see [`MAX_BYPASSES`]).
    bypassed: AtomicU32,
    /// `execution_policy.priority`: lower runs sooner.
    priority: i32,
    /// `RequestMetadata.tool_invocation_id`: the unit of fair sharing.
    invocation_id: String,
    /// What an executor must offer to take it.
    requires: Requirement,
    /// What it reserves on its executor while it runs.
    need: ResourceAmount,
    /// Executors that could not run it (a full disk): they do not take it
    /// again while another executor may.
    refused_by: Mutex<BTreeSet<String>>,
    queue: Option<Arc<PoolQueue>>,
    queued_at: Timestamp,
    /// Whether the request allows writing the result to the Action Cache.
    cacheable: bool,
    /// `results_cache_policy` as [`Retention`] epochs: the longest any
    /// merged request asked for.
    retention: AtomicI8,
    merge_key: Option<MergeKey>,
    digest_function: i32,
    state: watch::Sender<Operation>,
}

impl QueuedAction {
    fn stage(&self) -> execution_stage::Value {
        let state = self.state.borrow();
        if state.done {
            return execution_stage::Value::Completed;
        }
        state
            .metadata
            .as_ref()
            .and_then(|any| reapi::ExecuteOperationMetadata::decode(any.value.as_slice()).ok())
            .and_then(|m| execution_stage::Value::try_from(m.stage).ok())
            .unwrap_or(execution_stage::Value::Unknown)
    }
}

/// Platform properties as received, by source.
#[derive(Clone, Default)]
pub struct PlatformSources {
    pub command: Vec<(String, String)>,
    pub action: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
}

/// What an executor offers and an action needs to match: executors are
/// indexed by it, so matching costs one map lookup whatever their number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QueueKey {
    pub pool: String,
    pub os_family: OsFamily,
    pub arch: Arch,
}

impl std::fmt::Display for QueueKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pool={} OSFamily={} Arch={}",
            self.pool,
            format!("{:?}", self.os_family).to_lowercase(),
            format!("{:?}", self.arch).to_lowercase()
        )
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct MergeKey {
    instance_name: String,
    action_digest: Digest,
}

/// The order in which a queue hands actions out: lowest
/// `execution_policy.priority` first; within a priority, invocations
/// (`tool_invocation_id`) take turns, so one large build cannot starve a
/// small one; within an invocation, FIFO. Push and pop cost O(log levels).
#[derive(Default)]
struct FairQueue {
    levels: BTreeMap<i32, Level>,
}

/// One priority level: a ring of invocations with queued actions.
#[derive(Default)]
struct Level {
    turns: VecDeque<String>,
    by_invocation: HashMap<String, VecDeque<Arc<QueuedAction>>>,
}

impl FairQueue {
    /// The priority of the action `pop` would return; `None` when empty.
    fn head_priority(&self) -> Option<i32> {
        self.levels.keys().next().copied()
    }

    /// The action `pop` would return.
    fn peek(&self) -> Option<&Arc<QueuedAction>> {
        let level = self.levels.values().next()?;
        let invocation = level.turns.front()?;
        level.by_invocation.get(invocation)?.front()
    }

    fn push(&mut self, action: Arc<QueuedAction>) {
        let level = self.levels.entry(action.priority).or_default();
        let invocation = action.invocation_id.clone();
        let queue = level.by_invocation.entry(invocation.clone()).or_default();
        if queue.is_empty() {
            level.turns.push_back(invocation);
        }
        queue.push_back(action);
    }

    fn pop(&mut self) -> Option<Arc<QueuedAction>> {
        let mut first = self.levels.first_entry()?;
        let level = first.get_mut();
        let invocation = level.turns.pop_front()?;
        let queue = level.by_invocation.get_mut(&invocation)?;
        let action = queue.pop_front();
        if queue.is_empty() {
            level.by_invocation.remove(&invocation);
        } else {
            level.turns.push_back(invocation);
        }
        if level.turns.is_empty() {
            first.remove();
        }
        action
    }
}

/// Executor-declared properties (`KEY=VALUE`): what an executor offers,
/// or what an action requires of one.
pub type Properties = BTreeMap<String, String>;

/// What an executor offers within its [`QueueKey`]: its declared
/// properties and the isolation types it can run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Offer {
    pub properties: Properties,
    pub isolation_types: BTreeSet<IsolationType>,
    /// The executor's total capacity ([`ResourceAmount::UNLIMITED`] if it
    /// advertises none).
    pub capacity: ResourceAmount,
}

impl Offer {
    /// An executor running only `none` isolation, declaring `properties`.
    pub fn none_isolation(properties: Properties, capacity: ResourceAmount) -> Offer {
        Offer::new(properties, [IsolationType::None], capacity)
    }

    /// An executor running `isolation_types`, declaring `properties`.
    pub fn new(
        properties: Properties,
        isolation_types: impl IntoIterator<Item = IsolationType>,
        capacity: ResourceAmount,
    ) -> Offer {
        Offer {
            properties,
            isolation_types: isolation_types.into_iter().collect(),
            capacity,
        }
    }

    fn describe(&self) -> String {
        let mut described: String = self
            .properties
            .iter()
            .map(|(key, value)| format!(" {key}={value}"))
            .collect();
        let types: Vec<&str> = self.isolation_types.iter().map(|t| t.name()).collect();
        described.push_str(&format!(" workload-isolation-type={}", types.join("|")));
        described
    }
}

/// What a queued action requires of an executor within its [`QueueKey`]:
/// its values of the keys some executor declares, and the isolation type
/// it asks for (`None`: the executor's default, any executor).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Requirement {
    properties: Properties,
    isolation: Option<IsolationType>,
}

impl Requirement {
    fn describe(&self) -> String {
        let mut described: String = self
            .properties
            .iter()
            .map(|(key, value)| format!(" {key}={value}"))
            .collect();
        if let Some(isolation) = self.isolation {
            described.push_str(&format!(" workload-isolation-type={}", isolation.name()));
        }
        described
    }
}

/// Why no registered executor can take an action.
enum Unmatched {
    /// None offers what it requires (properties, isolation type).
    Properties(Requirement),
    /// Some offer that, but none has the capacity it reserves; the largest
    /// capacity among them.
    TooLarge(ResourceAmount),
}

/// Whether an executor offering `offer` may run an action requiring
/// `requires`.
fn satisfies(offer: &Offer, requires: &Requirement) -> bool {
    requires
        .properties
        .iter()
        .all(|(key, value)| offer.properties.get(key) == Some(value))
        && requires
            .isolation
            .is_none_or(|isolation| offer.isolation_types.contains(&isolation))
}

/// The queue of one [`QueueKey`]. Within it, actions are grouped by the
/// declared properties they require and executors by those they offer, so
/// taking work costs the number of distinct property sets, never the number
/// of executors or of queued actions.
pub(crate) struct PoolQueue {
    inner: Mutex<PoolInner>,
    /// Wakes idle executors when work is pushed.
    pushed: Notify,
}

#[derive(Default)]
struct PoolInner {
    by_requirement: HashMap<Requirement, FairQueue>,
    /// Registered executors, counted by what they offer.
    offers: HashMap<Offer, usize>,
}

impl PoolQueue {
    fn new() -> PoolQueue {
        PoolQueue {
            inner: Mutex::new(PoolInner::default()),
            pushed: Notify::new(),
        }
    }

    fn push(&self, action: Arc<QueuedAction>) {
        self.inner
            .lock()
            .by_requirement
            .entry(action.requires.clone())
            .or_default()
            .push(action);
        self.pushed.notify_waiters();
    }

    /// The next queued action an executor offering `offers` may run and
    /// whose reservation fits in its free `capacity`, reserved; waits for
    /// one (new work or a reservation ending); `None` once `stop` fires.
    pub(crate) async fn next(
        &self,
        offers: &Offer,
        capacity: &Arc<Capacity>,
        executor: &str,
        stop: &CancellationToken,
    ) -> Option<(Arc<QueuedAction>, Reservation)> {
        loop {
            let pushed = self.pushed.notified();
            let released = capacity.released.notified();
            tokio::pin!(pushed, released);
            pushed.as_mut().enable();
            released.as_mut().enable();
            if let Some((action, reservation)) = self.try_pop(offers, capacity, executor) {
                // Cancelled while queued: already completed by CancelOperation.
                if action.cancel.is_cancelled() {
                    continue;
                }
                return Some((action, reservation));
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = pushed => {}
                _ = released => {}
            }
        }
    }

    /// Pops from the best group `offers` satisfies whose head fits in the
    /// free capacity: the one whose head has the lowest priority value.
    /// Only group heads are looked at (the cost is the number of groups,
    /// never of queued actions or executors), so a head too big for this
    /// executor's free capacity waits here for it or another executor while
    /// smaller work from other groups may pass it — [`MAX_BYPASSES`] times;
    /// then this executor takes nothing of that head's priority or lower
    /// until the head fits, so a large action is never starved by a stream
    /// of small ones.
    fn try_pop(
        &self,
        offers: &Offer,
        capacity: &Arc<Capacity>,
        executor: &str,
    ) -> Option<(Arc<QueuedAction>, Reservation)> {
        let mut inner = self.inner.lock();
        let mut free = capacity.free.lock();
        let heads: Vec<(&Arc<QueuedAction>, &Requirement)> = inner
            .by_requirement
            .iter()
            .filter(|(requires, _)| satisfies(offers, requires))
            .filter_map(|(requires, queue)| Some((queue.peek()?, requires)))
            .filter(|(head, _)| !head.refused_by.lock().contains(executor))
            .collect();
        // Heads that fit this executor's total, not what is free now.
        let waiting = || {
            heads
                .iter()
                .map(|(head, _)| head)
                .filter(|head| !head.need.fits_in(*free) && head.need.fits_in(offers.capacity))
        };
        let held_for = waiting()
            .filter(|head| head.bypassed.load(Ordering::Relaxed) >= MAX_BYPASSES)
            .map(|head| head.priority)
            .min();
        let (chosen, requires) = heads
            .iter()
            .filter(|(head, _)| head.need.fits_in(*free))
            .filter(|(head, _)| held_for.is_none_or(|held| head.priority < held))
            // Among equal priorities, a head that was passed over goes first.
            .min_by_key(|(head, _)| {
                (
                    head.priority,
                    Reverse(head.bypassed.load(Ordering::Relaxed)),
                )
            })?;
        for head in waiting().filter(|head| head.priority <= chosen.priority) {
            head.bypassed.fetch_add(1, Ordering::Relaxed);
        }
        let best = (*requires).clone();
        let queue = inner.by_requirement.get_mut(&best)?;
        let action = queue.pop()?;
        if queue.head_priority().is_none() {
            inner.by_requirement.remove(&best);
        }
        free.take(action.need);
        let reservation = Reservation {
            capacity: capacity.clone(),
            amount: action.need,
        };
        Some((action, reservation))
    }

    fn register(&self, offers: &Offer) {
        *self.inner.lock().offers.entry(offers.clone()).or_default() += 1;
    }

    fn unregister(&self, offers: &Offer) {
        let mut inner = self.inner.lock();
        if let Some(count) = inner.offers.get_mut(offers) {
            *count -= 1;
            if *count == 0 {
                inner.offers.remove(offers);
            }
        }
    }

    /// Removes and returns the queued actions no registered executor can
    /// run.
    fn drain_unservable(&self) -> Vec<Arc<QueuedAction>> {
        let mut inner = self.inner.lock();
        let unservable: Vec<Requirement> = inner
            .by_requirement
            .keys()
            .filter(|requires| {
                !inner
                    .offers
                    .keys()
                    .any(|offers| satisfies(offers, requires))
            })
            .cloned()
            .collect();
        let mut drained = Vec::new();
        for requires in unservable {
            if let Some(mut queue) = inner.by_requirement.remove(&requires) {
                while let Some(action) = queue.pop() {
                    drained.push(action);
                }
            }
        }
        drained
    }

    /// How many registered executors could run `action` (what it requires,
    /// and capacity for its reservation).
    fn executors_for(&self, action: &QueuedAction) -> usize {
        self.inner
            .lock()
            .offers
            .iter()
            .filter(|(offer, _)| {
                satisfies(offer, &action.requires) && action.need.fits_in(offer.capacity)
            })
            .map(|(_, count)| count)
            .sum()
    }

    fn has_executors(&self) -> bool {
        !self.inner.lock().offers.is_empty()
    }

    /// What an action with this platform requires here: its values of the
    /// keys some registered executor declares, and its isolation type.
    /// `Err` (with that requirement, for the error message) if no registered
    /// executor offers all of it.
    fn requirement(
        &self,
        platform: &Platform,
        need: ResourceAmount,
    ) -> Result<Requirement, Unmatched> {
        let inner = self.inner.lock();
        let requires = Requirement {
            properties: platform
                .other
                .iter()
                .filter(|(key, _)| {
                    inner
                        .offers
                        .keys()
                        .any(|offers| offers.properties.contains_key(*key))
                })
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
            isolation: platform.isolation,
        };
        let largest = inner
            .offers
            .keys()
            .filter(|offers| satisfies(offers, &requires))
            .map(|offers| offers.capacity)
            .reduce(ResourceAmount::max);
        match largest {
            None => Err(Unmatched::Properties(requires)),
            Some(_)
                if inner.offers.keys().any(|offers| {
                    satisfies(offers, &requires) && need.fits_in(offers.capacity)
                }) =>
            {
                Ok(requires)
            }
            Some(largest) => Err(Unmatched::TooLarge(largest)),
        }
    }

    fn describe_offers(&self) -> Vec<String> {
        self.inner
            .lock()
            .offers
            .keys()
            .map(Offer::describe)
            .collect()
    }
}

#[derive(Default)]
struct State {
    operations: HashMap<String, Arc<QueuedAction>>,
    in_flight: HashMap<MergeKey, Arc<QueuedAction>>,
    completed: VecDeque<String>,
    queues: HashMap<QueueKey, Arc<PoolQueue>>,
}

/// Owns the operations, the per-pool queues and the Action Cache writes.
pub struct Scheduler {
    storage: Storage,
    action_cache: ActionCacheStore,
    config: SchedulerConfig,
    state: Mutex<State>,
    shutdown: CancellationToken,
    /// Wakes requests waiting for a matching executor to register.
    registered: Notify,
    /// Itself, for the tasks it spawns.
    me: std::sync::Weak<Scheduler>,
}

/// What Execute hands back: the operation's state channel.
pub type OperationWatch = watch::Receiver<Operation>;

impl Scheduler {
    pub fn new(storage: Storage, config: SchedulerConfig) -> Arc<Scheduler> {
        Arc::new_cyclic(|me| Scheduler {
            action_cache: ActionCacheStore::new(storage.clone()),
            storage,
            config,
            state: Mutex::new(State::default()),
            shutdown: CancellationToken::new(),
            registered: Notify::new(),
            me: me.clone(),
        })
    }

    /// Cancels every queued and running action and stops the executors.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Counts one more executor offering `key` and `offers`; returns its
    /// queue.
    pub(crate) fn register_executor(&self, key: &QueueKey, offers: &Offer) -> Arc<PoolQueue> {
        let mut state = self.state.lock();
        let queue = state
            .queues
            .entry(key.clone())
            .or_insert_with(|| Arc::new(PoolQueue::new()))
            .clone();
        queue.register(offers);
        drop(state);
        self.registered.notify_waiters();
        queue
    }

    /// Counts one executor less. After the grace (for a replacement to
    /// register), queued actions no remaining executor can run fail with
    /// FAILED_PRECONDITION instead of waiting forever.
    pub(crate) fn unregister_executor(&self, key: &QueueKey, offers: &Offer) {
        let Some(queue) = self.state.lock().queues.get(key).cloned() else {
            return;
        };
        queue.unregister(offers);
        let (Some(me), Ok(runtime)) = (self.me.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let key = key.clone();
        runtime.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(me.config.unmatched_grace) => {}
                _ = me.shutdown.cancelled() => return,
            }
            let stranded = queue.drain_unservable();
            if stranded.is_empty() {
                return;
            }
            let registered = me.registered_keys();
            for action in stranded {
                let required = action.requires.describe();
                let error = SchedulerError::NoExecutor {
                    action: format!(
                        "{}/{}",
                        action.action_digest.hash, action.action_digest.size_bytes
                    ),
                    pool: key.pool.clone(),
                    unmatched: format!("{key}{required}"),
                    registered: registered.clone(),
                };
                me.complete(
                    &action,
                    reapi::ExecuteResponse {
                        status: Some(to_rpc_status(error.into())),
                        ..Default::default()
                    },
                );
            }
        });
    }

    /// Starts an execution (or joins an identical one in flight, or answers
    /// from the Action Cache). `headers` are the request's platform headers
    /// (`x-buildbuddy-platform.*`, `x-kiln-platform.*`): they override the
    /// Action's and Command's properties and are never stored or logged.
    /// `invocation_id` (the client's `tool_invocation_id`) shares the queue
    /// fairly between builds.
    pub async fn execute(
        &self,
        request: reapi::ExecuteRequest,
        headers: &[(String, String)],
        invocation_id: &str,
    ) -> Result<(Operation, OperationWatch), SchedulerError> {
        if self.shutdown.is_cancelled() {
            return Err(SchedulerError::ShuttingDown);
        }
        let function = digest_function(request.digest_function)?;
        if function != DigestFunction::Sha256 {
            return Err(SchedulerError::InvalidArgument(format!(
                "execution supports SHA256 digests only, not {}",
                function.name()
            )));
        }
        let digest = parse_digest(function, request.action_digest.as_ref(), "action_digest")?;
        let wire_digest = to_wire(&digest);
        let instance_name = request.instance_name.clone();
        let done_now = |response: reapi::ExecuteResponse| {
            self.insert_done(
                &instance_name,
                &wire_digest,
                request.digest_function,
                response,
            )
        };

        let Some(action) = self.fetch::<reapi::Action>(&digest, "action").await? else {
            return Ok(done_now(missing_response(vec![wire_digest.clone()])));
        };
        let command_digest =
            parse_digest(function, action.command_digest.as_ref(), "command_digest")?;
        let Some(command) = self
            .fetch::<reapi::Command>(&command_digest, "command")
            .await?
        else {
            return Ok(done_now(missing_response(vec![to_wire(&command_digest)])));
        };
        let sources = platform_sources(&action, &command, headers);
        let platform = Platform::parse(&PropertySources {
            command: &sources.command,
            action: &sources.action,
            headers: &sources.headers,
        })
        .map_err(|source| SchedulerError::Platform {
            action: digest.to_string(),
            source,
        })?;
        let key = QueueKey {
            pool: platform
                .pool
                .clone()
                .unwrap_or_else(|| self.config.default_pool.clone()),
            os_family: platform.os_family,
            arch: platform.arch,
        };
        let defaults = self.config.default_action_resources;
        let need = ResourceAmount {
            cpu_millis: platform.resources.cpu_millis.unwrap_or(defaults.cpu_millis),
            memory_bytes: platform
                .resources
                .memory_bytes
                .unwrap_or(defaults.memory_bytes),
            disk_bytes: platform
                .resources
                .free_disk_bytes
                .unwrap_or(defaults.disk_bytes),
        };
        let (queue, requires) = self.matching_queue(&key, &platform, need, &digest).await?;
        let pool = key.pool.clone();

        let retention = Retention::from_reapi_priority(
            request
                .results_cache_policy
                .map_or(0, |policy| policy.priority),
        );
        if !request.skip_cache_lookup {
            if let Some(result) = self.action_cache.get(&instance_name, &digest).await? {
                if !retention.is_default() {
                    if let Err(error) = self
                        .action_cache
                        .retain(&instance_name, &digest, &result, retention)
                        .await
                    {
                        tracing::warn!(action = %digest, %error, "could not apply results_cache_policy to a cached result");
                    }
                }
                return Ok(done_now(reapi::ExecuteResponse {
                    result: Some(result),
                    cached_result: true,
                    status: Some(rpc::Status::default()),
                    ..Default::default()
                }));
            }
        }

        let cacheable = !action.do_not_cache;
        let merge_key = cacheable.then(|| MergeKey {
            instance_name: instance_name.clone(),
            action_digest: digest,
        });
        let mut state = self.state.lock();
        if let Some(key) = &merge_key {
            if let Some(running) = state.in_flight.get(key) {
                tracing::debug!(action = %digest, operation = %running.name, "merged into an execution in flight");
                running
                    .retention
                    .fetch_max(retention.epochs(), Ordering::Relaxed);
                let watch = running.state.subscribe();
                let current = watch.borrow().clone();
                return Ok((current, watch));
            }
        }
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let first = Operation {
            name: name.clone(),
            metadata: Some(metadata_any(
                execution_stage::Value::Queued,
                &wire_digest,
                request.digest_function,
                None,
            )),
            done: false,
            result: None,
        };
        let (sender, receiver) = watch::channel(first.clone());
        let queued = Arc::new(QueuedAction {
            name: name.clone(),
            instance_name,
            action_digest: wire_digest,
            platform,
            sources,
            cancel: self.shutdown.child_token(),
            attempts: AtomicU32::new(0),
            bypassed: AtomicU32::new(0),
            priority: request.execution_policy.map_or(0, |policy| policy.priority),
            invocation_id: invocation_id.to_string(),
            requires,
            need,
            refused_by: Mutex::default(),
            queue: Some(queue.clone()),
            queued_at: timestamp_now(),
            cacheable,
            retention: AtomicI8::new(retention.epochs()),
            merge_key: merge_key.clone(),
            digest_function: request.digest_function,
            state: sender,
        });
        if let Some(key) = merge_key {
            state.in_flight.insert(key, queued.clone());
        }
        state.operations.insert(name.clone(), queued.clone());
        drop(state);
        tracing::debug!(action = %digest, operation = %name, %pool, "queued");
        queue.push(queued);
        Ok((first, receiver))
    }

    /// The state of operation `name`, to wait on.
    pub fn watch(&self, name: &str) -> Result<OperationWatch, SchedulerError> {
        self.state
            .lock()
            .operations
            .get(name)
            .map(|op| op.state.subscribe())
            .ok_or_else(|| SchedulerError::UnknownOperation(name.to_string()))
    }

    /// The current state of at most `limit` known operations (in no
    /// particular order).
    pub fn list(&self, limit: usize) -> Vec<Operation> {
        self.state
            .lock()
            .operations
            .values()
            .take(limit)
            .map(|op| op.state.borrow().clone())
            .collect()
    }

    /// Stops operation `name`: a queued action completes at once as
    /// CANCELLED; a running one has its process stopped (SIGTERM, grace,
    /// SIGKILL) and completes when it has exited.
    pub fn cancel(&self, name: &str) -> Result<(), SchedulerError> {
        let op = self
            .state
            .lock()
            .operations
            .get(name)
            .cloned()
            .ok_or_else(|| SchedulerError::UnknownOperation(name.to_string()))?;
        op.cancel.cancel();
        if op.stage() == execution_stage::Value::Queued {
            self.complete(
                &op,
                reapi::ExecuteResponse {
                    status: Some(rpc::Status {
                        code: tonic::Code::Cancelled as i32,
                        message: format!("operation {name} was cancelled while queued"),
                        details: vec![],
                    }),
                    ..Default::default()
                },
            );
        }
        Ok(())
    }

    /// Forgets operation `name` (it is not cancelled).
    pub fn delete(&self, name: &str) -> Result<(), SchedulerError> {
        let mut state = self.state.lock();
        state
            .operations
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| SchedulerError::UnknownOperation(name.to_string()))
    }

    /// An executor took `action`: it is EXECUTING now.
    pub(crate) fn started(&self, action: &QueuedAction) {
        action.attempts.fetch_add(1, Ordering::SeqCst);
        set_stage(action, execution_stage::Value::Executing);
    }

    /// Completes `action` with what its executor reported; writes a
    /// successful cacheable result to the Action Cache first, so a client
    /// that sees COMPLETED also finds it there.
    pub(crate) async fn finished(
        &self,
        action: &QueuedAction,
        mut result: Option<reapi::ActionResult>,
        status: rpc::Status,
        cacheable: bool,
    ) {
        if let Some(result) = result.as_mut() {
            if let Some(metadata) = result.execution_metadata.as_mut() {
                metadata.queued_timestamp = Some(action.queued_at);
            }
            if cacheable
                && action.cacheable
                && status.code == tonic::Code::Ok as i32
                && result.exit_code == 0
            {
                self.write_action_cache(action, result).await;
            }
        }
        self.complete(
            action,
            reapi::ExecuteResponse {
                result,
                cached_result: false,
                status: Some(status),
                ..Default::default()
            },
        );
    }

    async fn write_action_cache(&self, action: &QueuedAction, result: &reapi::ActionResult) {
        let Some(key) = &action.merge_key else {
            return;
        };
        if let Err(error) = self
            .action_cache
            .put(
                &action.instance_name,
                &key.action_digest,
                result,
                Retention::from_epochs(action.retention.load(Ordering::Relaxed).into()),
            )
            .await
        {
            tracing::warn!(action = %key.action_digest, %error, "could not write the action result to the Action Cache");
        }
    }

    /// Marks `action` done with `response` (once; later calls do nothing)
    /// and lets a new identical request start a fresh execution.
    fn complete(&self, action: &QueuedAction, response: reapi::ExecuteResponse) {
        let changed = action.state.send_if_modified(|op| {
            if op.done {
                return false;
            }
            op.done = true;
            op.metadata = Some(metadata_any(
                execution_stage::Value::Completed,
                &action.action_digest,
                action.digest_function,
                None,
            ));
            op.result = Some(operation::Result::Response(Any {
                type_url: RESPONSE_TYPE.into(),
                value: response.encode_to_vec(),
            }));
            true
        });
        if !changed {
            return;
        }
        let mut state = self.state.lock();
        if let Some(key) = &action.merge_key {
            if state
                .in_flight
                .get(key)
                .is_some_and(|running| running.name == action.name)
            {
                state.in_flight.remove(key);
            }
        }
        self.remember_completed(&mut state, action.name.clone());
    }

    fn remember_completed(&self, state: &mut State, name: String) {
        state.completed.push_back(name);
        while state.completed.len() > self.config.completed_operations_kept {
            if let Some(old) = state.completed.pop_front() {
                state.operations.remove(&old);
            }
        }
    }

    /// An operation that is done at once (cache hit, missing blobs).
    fn insert_done(
        &self,
        instance_name: &str,
        action_digest: &reapi::Digest,
        digest_function: i32,
        response: reapi::ExecuteResponse,
    ) -> (Operation, OperationWatch) {
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let (sender, receiver) = watch::channel(Operation {
            name: name.clone(),
            metadata: Some(metadata_any(
                execution_stage::Value::Completed,
                action_digest,
                digest_function,
                None,
            )),
            done: true,
            result: Some(operation::Result::Response(Any {
                type_url: RESPONSE_TYPE.into(),
                value: response.encode_to_vec(),
            })),
        });
        let done = Arc::new(QueuedAction {
            name: name.clone(),
            instance_name: instance_name.to_string(),
            action_digest: action_digest.clone(),
            platform: Platform::default(),
            sources: PlatformSources::default(),
            cancel: CancellationToken::new(),
            attempts: AtomicU32::new(0),
            bypassed: AtomicU32::new(0),
            priority: 0,
            invocation_id: String::new(),
            requires: Requirement::default(),
            need: ResourceAmount::default(),
            refused_by: Mutex::default(),
            queue: None,
            queued_at: timestamp_now(),
            cacheable: false,
            retention: AtomicI8::new(0),
            merge_key: None,
            digest_function,
            state: sender,
        });
        let mut state = self.state.lock();
        state.operations.insert(name.clone(), done);
        self.remember_completed(&mut state, name);
        let first = receiver.borrow().clone();
        (first, receiver)
    }

    /// The queue of executors offering `key` and the declared properties
    /// the action requires there, waiting up to the grace for a matching
    /// executor to register; else FAILED_PRECONDITION naming what is
    /// unmatched.
    async fn matching_queue(
        &self,
        key: &QueueKey,
        platform: &Platform,
        need: ResourceAmount,
        digest: &Digest,
    ) -> Result<(Arc<PoolQueue>, Requirement), SchedulerError> {
        let deadline = tokio::time::Instant::now() + self.config.unmatched_grace;
        loop {
            let registered = self.registered.notified();
            tokio::pin!(registered);
            registered.as_mut().enable();
            let queue = self.state.lock().queues.get(key).cloned();
            let unmatched = match &queue {
                Some(queue) => match queue.requirement(platform, need) {
                    Ok(requires) => return Ok((queue.clone(), requires)),
                    Err(Unmatched::Properties(unmatched)) => unmatched.describe(),
                    Err(Unmatched::TooLarge(largest)) => {
                        if tokio::time::timeout_at(deadline, registered).await.is_err() {
                            return Err(SchedulerError::TooLarge {
                                action: digest.to_string(),
                                need: need.to_string(),
                                largest: largest.to_string(),
                                key: key.to_string(),
                            });
                        }
                        continue;
                    }
                },
                None => Requirement {
                    properties: Properties::new(),
                    isolation: platform.isolation,
                }
                .describe(),
            };
            if tokio::time::timeout_at(deadline, registered).await.is_err() {
                let declared = unmatched;
                return Err(SchedulerError::NoExecutor {
                    action: digest.to_string(),
                    pool: key.pool.clone(),
                    unmatched: format!("{key}{declared}"),
                    registered: self.registered_keys(),
                });
            }
        }
    }

    fn registered_keys(&self) -> String {
        let state = self.state.lock();
        let mut keys: Vec<String> = state
            .queues
            .iter()
            .filter(|(_, queue)| queue.has_executors())
            .flat_map(|(key, queue)| {
                queue
                    .describe_offers()
                    .into_iter()
                    .map(move |offers| format!("[{key}{offers}]"))
            })
            .collect();
        keys.sort_unstable();
        if keys.is_empty() {
            "none".into()
        } else {
            keys.join(", ")
        }
    }

    /// Puts `action` back on its queue because `executor` cannot run it
    /// (its disk is full): it goes to another executor of its queue, or,
    /// once every registered one has refused it, to any again (attempts
    /// stay bounded).
    pub(crate) fn requeue_elsewhere(&self, action: &Arc<QueuedAction>, executor: &str, why: &str) {
        if let Some(queue) = &action.queue {
            let mut refused = action.refused_by.lock();
            refused.insert(executor.to_string());
            if refused.len() >= queue.executors_for(action) {
                refused.clear();
            }
        }
        self.requeue(action, why);
    }

    /// Puts `action` back on its queue after its executor was lost, or
    /// fails it once it has been started `max_attempts` times.
    pub(crate) fn requeue(&self, action: &Arc<QueuedAction>, why: &str) {
        if action.cancel.is_cancelled() {
            self.complete(
                action,
                reapi::ExecuteResponse {
                    status: Some(rpc::Status {
                        code: tonic::Code::Cancelled as i32,
                        message: format!("operation {} was cancelled", action.name),
                        details: vec![],
                    }),
                    ..Default::default()
                },
            );
            return;
        }
        let attempts = action.attempts.load(Ordering::SeqCst);
        let Some(queue) = action
            .queue
            .as_ref()
            .filter(|_| attempts < self.config.max_attempts)
        else {
            self.complete(
                action,
                reapi::ExecuteResponse {
                    status: Some(rpc::Status {
                        code: tonic::Code::Unavailable as i32,
                        message: format!(
                            "action {}/{} was started {attempts} times and its executor was lost each time (last: {why})",
                            action.action_digest.hash, action.action_digest.size_bytes
                        ),
                        details: vec![],
                    }),
                    ..Default::default()
                },
            );
            return;
        };
        tracing::info!(operation = %action.name, attempts, reason = why, "requeued");
        set_stage(action, execution_stage::Value::Queued);
        queue.push(action.clone());
    }

    /// A small proto from the CAS; `None` if absent.
    async fn fetch<M: Message + Default>(
        &self,
        digest: &Digest,
        what: &str,
    ) -> Result<Option<M>, SchedulerError> {
        let Some(blob) = self.storage.open(digest).await? else {
            return Ok(None);
        };
        let data: Bytes = blob.into_bytes().await.map_err(|e| {
            SchedulerError::Cas(kiln_cas::CasError::Internal(format!(
                "reading {what} {digest}: {e}"
            )))
        })?;
        M::decode(data).map(Some).map_err(|e| {
            SchedulerError::InvalidArgument(format!("{what} {digest} does not decode: {e}"))
        })
    }
}

fn platform_sources(
    action: &reapi::Action,
    command: &reapi::Command,
    headers: &[(String, String)],
) -> PlatformSources {
    let pairs = |platform: &Option<reapi::Platform>| -> Vec<(String, String)> {
        platform
            .iter()
            .flat_map(|p| &p.properties)
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect()
    };
    #[allow(deprecated)]
    let command_properties = pairs(&command.platform);
    PlatformSources {
        command: command_properties,
        action: pairs(&action.platform),
        headers: headers.to_vec(),
    }
}

/// FAILED_PRECONDITION with one PreconditionFailure violation per digest,
/// the answer that makes Bazel upload the blobs and retry.
fn missing_response(digests: Vec<reapi::Digest>) -> reapi::ExecuteResponse {
    reapi::ExecuteResponse {
        status: Some(to_rpc_status(status::missing_blobs(
            format!(
                "missing inputs: {}",
                digests
                    .iter()
                    .map(|d| format!("{}/{}", d.hash, d.size_bytes))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            &digests,
        ))),
        ..Default::default()
    }
}

/// Moves an operation that is not done yet to `stage`.
fn set_stage(action: &QueuedAction, stage: execution_stage::Value) {
    action.state.send_if_modified(|op| {
        if op.done {
            return false;
        }
        op.metadata = Some(metadata_any(
            stage,
            &action.action_digest,
            action.digest_function,
            None,
        ));
        true
    });
}

fn metadata_any(
    stage: execution_stage::Value,
    action_digest: &reapi::Digest,
    digest_function: i32,
    partial: Option<reapi::ExecutedActionMetadata>,
) -> Any {
    Any {
        type_url: METADATA_TYPE.into(),
        value: reapi::ExecuteOperationMetadata {
            stage: stage as i32,
            action_digest: Some(action_digest.clone()),
            partial_execution_metadata: partial,
            digest_function,
            ..Default::default()
        }
        .encode_to_vec(),
    }
}
