//! The queues: one [`PoolQueue`] per [`QueueKey`] (pool, OS, arch), in
//! which actions wait grouped by what they require of an executor, each
//! group a [`FairQueue`] (priority, then invocations in turn, then FIFO);
//! and matching: which executor ([`Offer`]) may take which action
//! ([`Requirement`]), within its free capacity.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kiln_platform::{Arch, IsolationType, OsFamily, Platform};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::capacity::{Capacity, Reservation, ResourceAmount};
use crate::scheduler::QueuedAction;

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

    pub(crate) fn describe(&self) -> String {
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
    pub(crate) properties: Properties,
    pub(crate) isolation: Option<IsolationType>,
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
    pub(crate) fn new() -> PoolQueue {
        PoolQueue {
            inner: Mutex::new(PoolInner::default()),
            pushed: Notify::new(),
        }
    }

    pub(crate) fn push(&self, action: Arc<QueuedAction>) {
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
    /// `Err` (with that requirement, for the error message) if no registered
    /// executor offers all of it.
    pub(crate) fn requirement(
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

    pub(crate) fn describe_offers(&self) -> Vec<String> {
        self.inner
            .lock()
            .offers
            .keys()
            .map(Offer::describe)
            .collect()
    }
}
