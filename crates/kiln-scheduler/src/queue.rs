//! The queues: one [`PoolQueue`] per [`QueueKey`] (pool, OS, arch), in
//! which actions wait grouped by what they require of an executor, each
//! group a [`FairQueue`] (priority, then invocations in turn, then FIFO);
//! and matching: which executor ([`Offer`]) may take which action
//! ([`Requirement`]), within its free capacity.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_platform::{Arch, IsolationType, OsFamily, Platform};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use kiln_proto::reapi::{self, execution_stage};
use kiln_proto::rpc;
use kiln_proto::status::to_rpc as to_rpc_status;
use kiln_store::Digest;

use crate::capacity::{Capacity, Reservation, ResourceAmount};
use crate::clock::Clock;
use crate::error::SchedulerError;
use crate::operation::{cancelled, set_stage, QueuedAction};
use crate::report::ExecutorEntry;
use crate::scheduler::Scheduler;

/// How often smaller work of the same or a lower priority may pass a queued
/// action that does not fit an executor's free capacity (but would fit its
/// total) before that executor holds its capacity for it.
pub const MAX_BYPASSES: u32 = 16;

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

/// The order in which a queue hands actions out: lowest
/// `execution_policy.priority` first; within a priority, invocations
/// (`tool_invocation_id`) take turns, so one large build cannot starve a
/// small one; within an invocation, FIFO. Push and pop cost O(log levels).
#[derive(Default)]
pub(crate) struct FairQueue {
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
    /// Whether assignments may carry secrets (registry credentials) to it:
    /// the embedded executor, or a session over TLS or from loopback.
    pub receives_secrets: bool,
    /// The organisation whose own executor it is (registered with one of
    /// its keys); empty for the shared fleet (the executor token, open
    /// access, the embedded executor). It takes only that organisation's
    /// `use-self-hosted-executors` actions.
    pub org: Arc<str>,
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
            receives_secrets: false,
            org: Arc::from(""),
        }
    }

    pub(crate) fn describe(&self) -> String {
        let mut described: String = self
            .properties
            .iter()
            .map(|(key, value)| format!(" {key}={value}"))
            .collect();
        let types: Vec<&str> = self.isolation_types.iter().map(|t| t.name()).collect();
        described.push_str(&format!(" workload-isolation-type={}", types.join("|")));
        if !self.receives_secrets {
            described.push_str(" (plaintext beyond loopback: no registry credentials)");
        }
        if !self.org.is_empty() {
            described.push_str(" (the organisation's own)");
        }
        described
    }
}

/// What a queued action requires of an executor within its [`QueueKey`]:
/// its values of the keys some executor declares, and the isolation type
/// it asks for (`None`: the executor's default, any executor).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Requirement {
    pub(crate) properties: Properties,
    pub(crate) isolation: Option<IsolationType>,
    /// The action carries a registry credential, which goes only to an
    /// executor that [`Offer::receives_secrets`].
    pub(crate) secrets: bool,
    /// The organisation whose own executors must run it
    /// (`use-self-hosted-executors`); empty: the shared fleet.
    pub(crate) org: Arc<str>,
}

impl Requirement {
    pub(crate) fn describe(&self) -> String {
        let mut described: String = self
            .properties
            .iter()
            .map(|(key, value)| format!(" {key}={value}"))
            .collect();
        if let Some(isolation) = self.isolation {
            described.push_str(&format!(" workload-isolation-type={}", isolation.name()));
        }
        if !self.org.is_empty() {
            described
                .push_str(" use-self-hosted-executors=true (the organisation's own executors)");
        }
        if self.secrets {
            described.push_str(
                " with a registry credential (container-registry-password), which Kiln sends \
                 only to executors connected over TLS or from loopback",
            );
        }
        described
    }
}

/// Why no registered executor can take an action.
pub(crate) enum Unmatched {
    /// None offers what it requires (properties, isolation type).
    Properties(Requirement),
    /// Some offer that, but none has the capacity it reserves; the largest
    /// capacity among them.
    TooLarge(ResourceAmount),
}

/// Whether an executor offering `offer` may run an action requiring
/// `requires`.
pub(crate) fn satisfies(offer: &Offer, requires: &Requirement) -> bool {
    requires
        .properties
        .iter()
        .all(|(key, value)| offer.properties.get(key) == Some(value))
        && requires
            .isolation
            .is_none_or(|isolation| offer.isolation_types.contains(&isolation))
        && (!requires.secrets || offer.receives_secrets)
        && offer.org == requires.org
}

/// The queue of one [`QueueKey`]. Within it, actions are grouped by the
/// declared properties they require and executors by those they offer, so
/// taking work costs the number of distinct property sets, never the number
/// of executors or of queued actions.
///
/// Warm routing: an action with a runner key (`recycle-runner=true`) that
/// an executor holds warm, and that executor has room for it (it is
/// waiting for work), is left to it for up to `warm_wait` after it was
/// queued; any executor may take it after that, so warm routing delays
/// work by at most that wait and never starves it.
/// An executor takes the actions whose runner it holds warm before others
/// of the same priority.
pub(crate) struct PoolQueue {
    inner: Mutex<PoolInner>,
    /// Wakes idle executors when work is pushed.
    pushed: Notify,
    warm_wait: Duration,
    /// What `warm_wait` is measured by.
    clock: Arc<dyn Clock>,
}

#[derive(Default)]
struct PoolInner {
    by_requirement: HashMap<Requirement, FairQueue>,
    /// Registered executors, counted by what they offer.
    offers: HashMap<Offer, usize>,
    /// Which executors hold a warm runner of each runner key.
    warm_on: HashMap<String, HashSet<String>>,
    /// Executors waiting for work now (they have room), by id.
    waiting: HashMap<String, usize>,
}

/// Counts an executor as waiting for work while it lives.
struct Waiting<'a> {
    queue: &'a PoolQueue,
    executor: &'a str,
}

impl<'a> Waiting<'a> {
    fn new(queue: &'a PoolQueue, executor: &'a str) -> Waiting<'a> {
        *queue
            .inner
            .lock()
            .waiting
            .entry(executor.to_string())
            .or_default() += 1;
        Waiting { queue, executor }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut inner = self.queue.inner.lock();
        if let Some(count) = inner.waiting.get_mut(self.executor) {
            *count -= 1;
            if *count == 0 {
                inner.waiting.remove(self.executor);
            }
        }
    }
}

/// What [`PoolQueue::try_pop`] found.
pub(crate) enum Popped {
    Taken(Arc<QueuedAction>, Reservation),
    /// Nothing for this executor now; at `Some(instant)` an action left to
    /// a warm executor becomes its to take.
    Nothing(Option<Instant>),
}

impl PoolQueue {
    /// A queue that leaves actions to executors holding their runner warm
    /// for up to `warm_wait`.
    pub(crate) fn new(warm_wait: Duration, clock: Arc<dyn Clock>) -> PoolQueue {
        PoolQueue {
            clock,
            inner: Mutex::new(PoolInner::default()),
            pushed: Notify::new(),
            warm_wait,
        }
    }

    /// Queues `action` (again, when requeued) at `now`.
    pub(crate) fn push(&self, action: Arc<QueuedAction>, now: Instant) {
        *action.enqueued.lock() = now;
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
        let _waiting = Waiting::new(self, executor);
        loop {
            let pushed = self.pushed.notified();
            let released = capacity.released.notified();
            tokio::pin!(pushed, released);
            pushed.as_mut().enable();
            released.as_mut().enable();
            let retry_at = match self.try_pop(offers, capacity, executor, self.clock.now()) {
                Popped::Taken(action, reservation) => {
                    // Cancelled while queued: already completed by
                    // CancelOperation.
                    if action.cancel.is_cancelled() {
                        continue;
                    }
                    return Some((action, reservation));
                }
                Popped::Nothing(retry_at) => retry_at,
            };
            let left_to_warm = async {
                match retry_at {
                    Some(at) => {
                        tokio::time::sleep(at.saturating_duration_since(self.clock.now())).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = pushed => {}
                _ = released => {}
                _ = left_to_warm => {}
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
    /// of small ones. A head left to an executor holding its runner warm
    /// and waiting for work is not this executor's until `warm_wait` after
    /// it was queued;
    /// among heads of equal priority, one whose runner this executor holds
    /// warm goes first. `now` is the time (passed in, so the policy is
    /// tested without waiting).
    pub(crate) fn try_pop(
        &self,
        offers: &Offer,
        capacity: &Arc<Capacity>,
        executor: &str,
        now: Instant,
    ) -> Popped {
        let mut inner = self.inner.lock();
        let mut free = capacity.free.lock();
        let warm_on = |head: &QueuedAction| {
            head.runner_key
                .as_ref()
                .and_then(|key| inner.warm_on.get(key))
        };
        let warm_here = |head: &QueuedAction| warm_on(head).is_some_and(|on| on.contains(executor));
        let warm_elsewhere = |head: &QueuedAction| {
            warm_on(head).is_some_and(|on| {
                on.iter()
                    .any(|other| other != executor && inner.waiting.contains_key(other))
            })
        };
        let mut retry_at: Option<Instant> = None;
        let heads: Vec<(&Arc<QueuedAction>, &Requirement)> = inner
            .by_requirement
            .iter()
            .filter(|(requires, _)| satisfies(offers, requires))
            .filter_map(|(requires, queue)| Some((queue.peek()?, requires)))
            .filter(|(head, _)| !head.refused_by.lock().contains(executor))
            .filter(|(head, _)| {
                let until = *head.enqueued.lock() + self.warm_wait;
                if now < until && warm_elsewhere(head) && !warm_here(head) {
                    retry_at = Some(retry_at.map_or(until, |at| at.min(until)));
                    return false;
                }
                true
            })
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
        let Some((chosen, requires)) = heads
            .iter()
            .filter(|(head, _)| head.need.fits_in(*free))
            .filter(|(head, _)| held_for.is_none_or(|held| head.priority < held))
            // Among equal priorities, one with a warm runner here goes
            // first, then one that was passed over.
            .min_by_key(|(head, _)| {
                (
                    head.priority,
                    !warm_here(head),
                    Reverse(head.bypassed.load(Ordering::Relaxed)),
                )
            })
        else {
            return Popped::Nothing(retry_at);
        };
        for head in waiting().filter(|head| head.priority <= chosen.priority) {
            head.bypassed.fetch_add(1, Ordering::Relaxed);
        }
        let best = (*requires).clone();
        let Some(queue) = inner.by_requirement.get_mut(&best) else {
            return Popped::Nothing(retry_at);
        };
        let Some(action) = queue.pop() else {
            return Popped::Nothing(retry_at);
        };
        if queue.head_priority().is_none() {
            inner.by_requirement.remove(&best);
        }
        free.take(action.need);
        let reservation = Reservation {
            capacity: capacity.clone(),
            amount: action.need,
        };
        Popped::Taken(action, reservation)
    }

    /// Records that `executor` now holds warm runners of exactly `keys`.
    pub(crate) fn set_warm(&self, executor: &str, keys: &[String]) {
        let mut inner = self.inner.lock();
        inner.warm_on.retain(|_, on| {
            on.remove(executor);
            !on.is_empty()
        });
        for key in keys {
            inner
                .warm_on
                .entry(key.clone())
                .or_default()
                .insert(executor.to_string());
        }
    }

    pub(crate) fn register(&self, offers: &Offer) {
        *self.inner.lock().offers.entry(offers.clone()).or_default() += 1;
    }

    pub(crate) fn unregister(&self, offers: &Offer) {
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
    pub(crate) fn drain_unservable(&self) -> Vec<Arc<QueuedAction>> {
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
    pub(crate) fn executors_for(&self, action: &QueuedAction) -> usize {
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

    pub(crate) fn has_executors(&self) -> bool {
        !self.inner.lock().offers.is_empty()
    }

    /// What an action with this platform requires here: its values of the
    /// keys some registered executor declares, and its isolation type.
    /// A key that only a header spelled (lower-cased by HTTP/2) requires
    /// the declared key it equals ignoring ASCII case, unless some
    /// executor declares it exactly as it came.
    /// `Err` (with that requirement, for the error message) if no registered
    /// executor offers all of it.
    pub(crate) fn requirement(
        &self,
        platform: &Platform,
        org: &Arc<str>,
        need: ResourceAmount,
    ) -> Result<Requirement, Unmatched> {
        let inner = self.inner.lock();
        let declared: BTreeSet<&String> = inner
            .offers
            .keys()
            .flat_map(|offers| offers.properties.keys())
            .collect();
        let mut properties = Properties::new();
        for (key, value) in &platform.other {
            if declared.contains(key) {
                properties.insert(key.clone(), value.clone());
            } else if platform.spelled_by_header(key) {
                for spelled in declared.iter().filter(|d| d.eq_ignore_ascii_case(key)) {
                    properties.insert((*spelled).clone(), value.clone());
                }
            }
        }
        let requires = Requirement {
            properties,
            isolation: platform.isolation,
            secrets: platform.registry_credentials.is_some(),
            org: org.clone(),
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

    /// What the executors of the shared fleet and of organisation `org`
    /// offer (another organisation's executors are not its business).
    pub(crate) fn describe_offers(&self, org: &str) -> Vec<String> {
        self.inner
            .lock()
            .offers
            .keys()
            .filter(|offer| offer.org.is_empty() || *offer.org == *org)
            .map(Offer::describe)
            .collect()
    }
}

impl Scheduler {
    /// Counts one more executor (`entry`); returns its queue.
    pub(crate) fn register_executor(&self, entry: Arc<ExecutorEntry>) -> Arc<PoolQueue> {
        let mut state = self.state.lock();
        let queue = state
            .queues
            .entry(entry.key.clone())
            .or_insert_with(|| {
                Arc::new(PoolQueue::new(
                    self.config.warm_runner_wait,
                    self.clock.clone(),
                ))
            })
            .clone();
        queue.register(&entry.offer);
        state.executors.insert(entry.id.clone(), entry);
        drop(state);
        self.registered.notify_waiters();
        queue
    }

    /// Counts executor `id` less. After the grace (for a replacement to
    /// register), queued actions no remaining executor can run fail with
    /// FAILED_PRECONDITION instead of waiting forever.
    pub(crate) fn unregister_executor(&self, id: &str) {
        let (queue, key) = {
            let mut state = self.state.lock();
            let Some(entry) = state.executors.remove(id) else {
                return;
            };
            let Some(queue) = state.queues.get(&entry.key).cloned() else {
                return;
            };
            queue.unregister(&entry.offer);
            (queue, entry.key.clone())
        };
        let (Some(me), Ok(runtime)) = (self.me.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(me.config.unmatched_grace) => {}
                _ = me.shutdown.cancelled() => return,
            }
            let stranded = queue.drain_unservable();
            if stranded.is_empty() {
                return;
            }
            for action in stranded {
                let required = action.requires.describe();
                let registered = me.registered_keys(&action.requires.org);
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

    /// The queue of executors offering `key` and the declared properties
    /// the action requires there, waiting up to the grace for a matching
    /// executor to register; else FAILED_PRECONDITION naming what is
    /// unmatched.
    /// `executors_of`: the organisation whose own executors must run it
    /// (empty: the shared fleet).
    pub(crate) async fn matching_queue(
        &self,
        key: &QueueKey,
        platform: &Platform,
        executors_of: &Arc<str>,
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
                Some(queue) => match queue.requirement(platform, executors_of, need) {
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
                    secrets: platform.registry_credentials.is_some(),
                    org: executors_of.clone(),
                }
                .describe(),
            };
            if tokio::time::timeout_at(deadline, registered).await.is_err() {
                let declared = unmatched;
                return Err(SchedulerError::NoExecutor {
                    action: digest.to_string(),
                    pool: key.pool.clone(),
                    unmatched: format!("{key}{declared}"),
                    registered: self.registered_keys(executors_of),
                });
            }
        }
    }

    /// What the registered executors of the shared fleet and of
    /// organisation `org` offer, for an error message.
    pub(crate) fn registered_keys(&self, org: &str) -> String {
        let state = self.state.lock();
        let mut keys: Vec<String> = state
            .queues
            .iter()
            .filter(|(_, queue)| queue.has_executors())
            .flat_map(|(key, queue)| {
                queue
                    .describe_offers(org)
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
                cancelled(format!(
                    "action {}/{} was cancelled",
                    action.action_digest.hash, action.action_digest.size_bytes
                )),
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
        action.progress.lock().started = None;
        set_stage(action, execution_stage::Value::Queued);
        queue.push(action.clone(), self.clock.now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    const WAIT: Duration = Duration::from_millis(200);

    fn executor() -> (Offer, Arc<Capacity>) {
        let offer = Offer::none_isolation(Properties::new(), ResourceAmount::UNLIMITED);
        (offer, Capacity::new(ResourceAmount::UNLIMITED))
    }

    /// A group of its own: actions that name their isolation type.
    fn sandbox_group() -> Requirement {
        Requirement {
            isolation: Some(IsolationType::None),
            ..Default::default()
        }
    }

    fn taken(popped: Popped) -> Option<String> {
        match popped {
            Popped::Taken(action, _) => Some(action.invocation_id.clone()),
            Popped::Nothing(_) => None,
        }
    }

    #[test]
    fn an_action_is_left_to_its_warm_executor_for_the_wait_only() {
        let queue = PoolQueue::new(WAIT, Arc::new(SystemClock));
        let (offer, capacity) = executor();
        queue.set_warm("warm", &["k1".to_string()]);
        let waiting = Waiting::new(&queue, "warm");
        let t0 = Instant::now();
        queue.push(
            QueuedAction::for_test("a", 0, Some("k1"), Requirement::default()),
            t0,
        );
        match queue.try_pop(&offer, &capacity, "cold", t0) {
            Popped::Nothing(Some(at)) => assert_eq!(at, t0 + WAIT),
            _ => panic!("a cold executor took an action left to a warm one"),
        }
        assert_eq!(
            taken(queue.try_pop(&offer, &capacity, "warm", t0)).as_deref(),
            Some("a")
        );
        // Not taken by the warm executor in time: anyone may.
        queue.push(
            QueuedAction::for_test("b", 0, Some("k1"), Requirement::default()),
            t0,
        );
        assert!(taken(queue.try_pop(&offer, &capacity, "cold", t0 + WAIT / 2)).is_none());
        assert_eq!(
            taken(queue.try_pop(&offer, &capacity, "cold", t0 + WAIT)).as_deref(),
            Some("b")
        );
        // A warm executor busy with other work is not waited for.
        drop(waiting);
        queue.push(
            QueuedAction::for_test("c", 0, Some("k1"), Requirement::default()),
            t0,
        );
        assert_eq!(
            taken(queue.try_pop(&offer, &capacity, "cold", t0)).as_deref(),
            Some("c")
        );
    }

    #[test]
    fn keys_nobody_holds_warm_go_anywhere_and_warm_ones_go_first() {
        let queue = PoolQueue::new(WAIT, Arc::new(SystemClock));
        let (offer, capacity) = executor();
        let t0 = Instant::now();
        queue.push(
            QueuedAction::for_test("plain", 0, None, Requirement::default()),
            t0,
        );
        queue.push(
            QueuedAction::for_test("cold-key", 0, Some("k2"), Requirement::default()),
            t0,
        );
        queue.push(
            QueuedAction::for_test("warm-key", 0, Some("k1"), sandbox_group()),
            t0,
        );
        queue.push(
            QueuedAction::for_test("urgent", -1, None, Requirement::default()),
            t0,
        );
        queue.set_warm("e", &["k1".to_string()]);
        let order: Vec<String> =
            std::iter::from_fn(|| taken(queue.try_pop(&offer, &capacity, "e", t0))).collect();
        // Priority first; then, among the heads of the groups, the warm
        // one; then the rest.
        assert_eq!(order[..2], ["urgent", "warm-key"]);
        assert_eq!(order.len(), 4);
        // An executor that reports no warm runners any more is not waited for.
        let _waiting = Waiting::new(&queue, "e");
        queue.set_warm("e", &[]);
        queue.push(
            QueuedAction::for_test("again", 0, Some("k1"), Requirement::default()),
            t0,
        );
        assert_eq!(
            taken(queue.try_pop(&offer, &capacity, "other", t0)).as_deref(),
            Some("again")
        );
    }
}
