//! What the scheduler tells its operators: snapshots of the registered
//! executors, the queues and the operations it keeps (for the web UI and
//! the metrics' gauges), and [`ExecutionObserver`], told of every finished
//! execution (for the metrics' counters and histograms). Nothing here
//! changes scheduling; every snapshot is taken under the scheduler's lock
//! in one pass and owns its data.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kiln_platform::IsolationType;
use kiln_proto::reapi;
use parking_lot::Mutex;
use prost::Message;

use crate::capacity::{Capacity, ResourceAmount};
use crate::operation::{ClientOperation, QueuedAction};
use crate::queue::{satisfies, Offer, QueueKey};
use crate::scheduler::Scheduler;

/// Told of each execution as it completes: run, failed, cancelled or
/// answered from the cache. Called on the completing task: keep it cheap.
pub trait ExecutionObserver: Send + Sync + 'static {
    fn completed(&self, operation: &OperationSummary, result: Option<&reapi::ActionResult>);
}

/// Who asked for an execution: the organisation of its credential (empty
/// for open access), and from the request's RequestMetadata the build
/// (`tool_invocation_id`), the target and the action's mnemonic. The
/// client chooses these strings, so each is cut to 256 bytes.
#[derive(Clone, Debug, Default)]
pub struct Client {
    /// Operations, merges and Action Cache entries are kept apart by it.
    pub org: Arc<str>,
    pub invocation_id: String,
    pub target_id: String,
    pub mnemonic: String,
}

impl Client {
    pub fn new(
        org: Arc<str>,
        invocation_id: String,
        target_id: String,
        mnemonic: String,
    ) -> Client {
        Client {
            org,
            invocation_id: cut(invocation_id),
            target_id: cut(target_id),
            mnemonic: cut(mnemonic),
        }
    }
}

/// `text` cut to at most 256 bytes, at a character boundary.
fn cut(mut text: String) -> String {
    const MAX: usize = 256;
    if text.len() > MAX {
        let mut end = MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Where an operation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Queued,
    Executing,
    Completed,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::Executing => "executing",
            Stage::Completed => "completed",
        }
    }
}

/// How a completed operation ended, in a few bounded classes (a metric
/// label and a UI filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutcomeClass {
    /// Answered from the Action Cache.
    Cached,
    /// Ran and exited 0.
    Success,
    /// Ran and exited non-zero.
    Failed,
    /// Its timeout was reached.
    Timeout,
    Cancelled,
    /// Did not run to an exit code: missing inputs, no executor, an
    /// executor error.
    Error,
}

impl OutcomeClass {
    pub const ALL: [OutcomeClass; 6] = [
        OutcomeClass::Cached,
        OutcomeClass::Success,
        OutcomeClass::Failed,
        OutcomeClass::Timeout,
        OutcomeClass::Cancelled,
        OutcomeClass::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OutcomeClass::Cached => "cached",
            OutcomeClass::Success => "success",
            OutcomeClass::Failed => "failed",
            OutcomeClass::Timeout => "timeout",
            OutcomeClass::Cancelled => "cancelled",
            OutcomeClass::Error => "error",
        }
    }

    pub fn from_name(name: &str) -> Option<OutcomeClass> {
        OutcomeClass::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// The end of an operation, as its response said.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub class: OutcomeClass,
    pub finished_at: SystemTime,
    /// The response's `google.rpc.Code`.
    pub code: i32,
    /// The status message (empty on success).
    pub message: String,
    pub exit_code: Option<i32>,
    /// The worker that ran it, as its result's metadata names it.
    pub worker: String,
    /// Its isolation type and whether its runner was warm, from the
    /// result's `kiln.runner.v1.RunnerUsage`.
    pub isolation: Option<String>,
    pub warm: Option<bool>,
}

/// What [`Scheduler`] records of an operation as it moves.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    /// When an executor took it (the latest attempt), and which.
    pub(crate) started: Option<(SystemTime, String)>,
    pub(crate) outcome: Option<Arc<Outcome>>,
}

/// One operation, for lists and metrics: one client's request (in lists)
/// or one execution, named after the request that started it (told to
/// [`ExecutionObserver`]).
#[derive(Clone, Debug)]
pub struct OperationSummary {
    pub name: String,
    /// The organisation it was requested for (empty for open access): the
    /// UI shows a caller only its own organisation's operations.
    pub org: Arc<str>,
    /// For a request merged into an execution another request started:
    /// that request's operation name. The execution's executor, attempts
    /// and outcome are shared; this request's own are its name, client,
    /// `queued_at` (when it arrived) and, if its client cancelled it while
    /// the execution went on, its outcome.
    pub merged_into: Option<String>,
    pub instance_name: String,
    pub action_digest: reapi::Digest,
    /// Empty for an operation answered without queueing.
    pub pool: String,
    /// `RequestMetadata.tool_invocation_id`: the build it belongs to.
    pub invocation_id: String,
    /// `RequestMetadata.target_id` and `action_mnemonic` (e.g.
    /// `//app:lib`, `CppCompile`); empty when the client sent none.
    pub target_id: String,
    pub mnemonic: String,
    pub stage: Stage,
    pub queued_at: SystemTime,
    /// How long it has waited in the queue (queued ones only).
    pub waiting: Option<Duration>,
    pub started: Option<(SystemTime, String)>,
    /// The isolation type it asked for.
    pub requested_isolation: Option<IsolationType>,
    pub attempts: u32,
    pub outcome: Option<Arc<Outcome>>,
}

/// One operation in full, for its page.
pub struct OperationDetail {
    pub summary: OperationSummary,
    /// Platform properties by source. Header values are never returned:
    /// they may carry credentials (`x-buildbuddy-platform.*`).
    pub command_properties: Vec<(String, String)>,
    pub action_properties: Vec<(String, String)>,
    pub header_property_names: Vec<String>,
    /// The completed response.
    pub response: Option<reapi::ExecuteResponse>,
    /// Why a queued operation has not been taken yet.
    pub why_queued: Option<String>,
}

/// One registered executor.
#[derive(Clone, Debug)]
pub struct ExecutorSnapshot {
    pub name: String,
    /// The organisation whose own executor it is; empty for the shared
    /// fleet. The UI shows a caller the fleet and its own.
    pub org: Arc<str>,
    pub pool: String,
    pub os_family: String,
    pub arch: String,
    pub properties: BTreeMap<String, String>,
    pub isolation_types: Vec<String>,
    /// The server's own executor (`kiln serve`'s embedded worker).
    pub embedded: bool,
    pub slots: usize,
    pub running: usize,
    pub capacity: ResourceAmount,
    pub free: ResourceAmount,
    pub registered_at: SystemTime,
    pub last_seen: SystemTime,
    /// Runner keys it holds warm.
    pub warm_runners: usize,
}

/// One queue: a pool on one OS and architecture.
#[derive(Clone, Debug)]
pub struct QueueSnapshot {
    pub pool: String,
    pub key: String,
    pub queued: usize,
    pub executing: usize,
    pub oldest_queued: Option<Duration>,
    pub executors: usize,
}

/// The scheduler's record of a registered executor; dropping it (the
/// session ended) removes it from snapshots.
pub(crate) struct ExecutorEntry {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) key: QueueKey,
    pub(crate) offer: Offer,
    pub(crate) embedded: bool,
    pub(crate) slots: usize,
    pub(crate) capacity: Arc<Capacity>,
    pub(crate) registered_at: SystemTime,
    pub(crate) last_seen: Mutex<SystemTime>,
    pub(crate) running: AtomicUsize,
    pub(crate) warm_runners: AtomicUsize,
}

/// Counts one action as running on an executor while it lives.
pub(crate) struct RunningOn(Arc<ExecutorEntry>);

impl RunningOn {
    pub(crate) fn new(entry: &Arc<ExecutorEntry>) -> RunningOn {
        entry.running.fetch_add(1, Ordering::Relaxed);
        RunningOn(entry.clone())
    }
}

impl Drop for RunningOn {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ExecutorEntry {
    /// A newly registered executor, seen now, running nothing.
    pub(crate) fn new(
        id: String,
        name: String,
        key: QueueKey,
        offer: Offer,
        embedded: bool,
        slots: usize,
        capacity: Arc<Capacity>,
    ) -> Arc<ExecutorEntry> {
        let now = SystemTime::now();
        Arc::new(ExecutorEntry {
            id,
            name,
            key,
            offer,
            embedded,
            slots,
            capacity,
            registered_at: now,
            last_seen: Mutex::new(now),
            running: AtomicUsize::new(0),
            warm_runners: AtomicUsize::new(0),
        })
    }

    pub(crate) fn seen(&self) {
        *self.last_seen.lock() = SystemTime::now();
    }

    fn snapshot(&self) -> ExecutorSnapshot {
        ExecutorSnapshot {
            name: self.name.clone(),
            org: self.offer.org.clone(),
            pool: self.key.pool.clone(),
            os_family: format!("{:?}", self.key.os_family).to_lowercase(),
            arch: format!("{:?}", self.key.arch).to_lowercase(),
            properties: self.offer.properties.clone(),
            isolation_types: self
                .offer
                .isolation_types
                .iter()
                .map(|t| t.name().to_string())
                .collect(),
            embedded: self.embedded,
            slots: self.slots,
            running: self.running.load(Ordering::Relaxed),
            capacity: self.offer.capacity,
            free: *self.capacity.free.lock(),
            registered_at: self.registered_at,
            // The embedded executor lives in this process: it is seen now.
            last_seen: if self.embedded {
                SystemTime::now()
            } else {
                *self.last_seen.lock()
            },
            warm_runners: self.warm_runners.load(Ordering::Relaxed),
        }
    }
}

impl QueuedAction {
    /// Where it is: from what the scheduler recorded, never by decoding
    /// the operation's metadata.
    pub(crate) fn stage(&self) -> Stage {
        Self::stage_of(&self.progress.lock())
    }

    fn stage_of(progress: &Progress) -> Stage {
        match (&progress.outcome, &progress.started) {
            (Some(_), _) => Stage::Completed,
            (None, Some(_)) => Stage::Executing,
            (None, None) => Stage::Queued,
        }
    }

    pub(crate) fn summary(&self, now: Instant) -> OperationSummary {
        let progress = self.progress.lock().clone();
        let stage = Self::stage_of(&progress);
        OperationSummary {
            name: self.name.clone(),
            org: self.client.org.clone(),
            merged_into: None,
            instance_name: self.instance_name.clone(),
            action_digest: self.action_digest.clone(),
            pool: self
                .key
                .as_ref()
                .map_or_else(String::new, |k| k.pool.clone()),
            invocation_id: self.invocation_id.clone(),
            target_id: self.client.target_id.clone(),
            mnemonic: self.client.mnemonic.clone(),
            stage,
            queued_at: self.queued_wall(),
            waiting: (stage == Stage::Queued)
                .then(|| now.saturating_duration_since(*self.enqueued.lock())),
            started: progress.started,
            requested_isolation: self.platform.isolation,
            attempts: self.attempts.load(Ordering::Relaxed),
            outcome: progress.outcome,
        }
    }
}

impl ClientOperation {
    /// This request's view of its execution.
    pub(crate) fn summary(&self, now: Instant) -> OperationSummary {
        let mut summary = self.execution.summary(now);
        if summary.name != self.name {
            summary.merged_into = Some(std::mem::replace(&mut summary.name, self.name.clone()));
        }
        summary.invocation_id = self.client.invocation_id.clone();
        summary.target_id = self.client.target_id.clone();
        summary.mnemonic = self.client.mnemonic.clone();
        summary.queued_at = self.requested_at;
        if let Some(outcome) = self.detached.lock().clone() {
            summary.stage = Stage::Completed;
            summary.waiting = None;
            summary.outcome = Some(outcome);
        }
        summary
    }
}

/// The outcome `response` describes.
pub(crate) fn outcome_of(response: &reapi::ExecuteResponse, finished_at: SystemTime) -> Outcome {
    let code = response.status.as_ref().map_or(0, |s| s.code);
    let message = response
        .status
        .as_ref()
        .map_or_else(String::new, |s| s.message.clone());
    let result = response.result.as_ref();
    let exit_code = result.map(|r| r.exit_code);
    let class = if response.cached_result {
        OutcomeClass::Cached
    } else if code == tonic::Code::DeadlineExceeded as i32 {
        OutcomeClass::Timeout
    } else if code == tonic::Code::Cancelled as i32 {
        OutcomeClass::Cancelled
    } else if code != 0 || result.is_none() {
        OutcomeClass::Error
    } else if exit_code == Some(0) {
        OutcomeClass::Success
    } else {
        OutcomeClass::Failed
    };
    let metadata = result.and_then(|r| r.execution_metadata.as_ref());
    let usage = metadata.and_then(|m| {
        m.auxiliary_metadata
            .iter()
            .find(|any| any.type_url == kiln_proto::runner::RUNNER_USAGE_TYPE)
            .and_then(|any| kiln_proto::runner::RunnerUsage::decode(any.value.as_slice()).ok())
    });
    Outcome {
        class,
        finished_at,
        code,
        message,
        exit_code,
        worker: metadata.map_or_else(String::new, |m| m.worker.clone()),
        isolation: usage
            .as_ref()
            .map(|u| u.isolation_type.clone())
            .filter(|t| !t.is_empty()),
        warm: usage.map(|u| u.warm),
    }
}

impl Scheduler {
    /// Every registered executor, by pool then name.
    pub fn executors(&self) -> Vec<ExecutorSnapshot> {
        let mut executors: Vec<ExecutorSnapshot> = self
            .state
            .lock()
            .executors
            .values()
            .map(|entry| entry.snapshot())
            .collect();
        executors.sort_by(|a, b| (&a.pool, &a.name).cmp(&(&b.pool, &b.name)));
        executors
    }

    /// Every queue with executors or work, by key: all of them (`None`,
    /// for the operator's metrics), or what organisation `Some(org)` may
    /// see (its own executions, and the shared fleet's executors and its
    /// own).
    pub fn queues(&self, org: Option<&str>) -> Vec<QueueSnapshot> {
        let now = self.clock.now();
        let state = self.state.lock();
        let mut queues: BTreeMap<String, QueueSnapshot> = BTreeMap::new();
        let shown = |owner: &str| org.is_none_or(|org| owner == org);
        for executor in state.executors.values() {
            let owner = &executor.offer.org;
            if owner.is_empty() || shown(owner) {
                queue_entry(&mut queues, &executor.key).executors += 1;
            }
        }
        // Each execution once, however many requests follow it.
        let mut seen = std::collections::HashSet::new();
        for operation in state.operations.values() {
            let action = &operation.execution;
            if !shown(&operation.client.org) || !seen.insert(Arc::as_ptr(action)) {
                continue;
            }
            let Some(key) = &action.key else { continue };
            let progress = action.progress.lock();
            if progress.outcome.is_some() {
                continue;
            }
            let queue = queue_entry(&mut queues, key);
            if progress.started.is_some() {
                queue.executing += 1;
            } else {
                queue.queued += 1;
                let waited = now.saturating_duration_since(*action.enqueued.lock());
                queue.oldest_queued = queue.oldest_queued.max(Some(waited));
            }
        }
        queues.into_values().collect()
    }

    /// Every operation kept (in flight, and the most recent completed
    /// ones), newest first: one per Execute request, so a request merged
    /// into another's execution is listed under its own name and client
    /// (with [`OperationSummary::merged_into`] naming the other).
    pub fn operations(&self) -> Vec<OperationSummary> {
        let now = self.clock.now();
        let operations: Vec<Arc<ClientOperation>> =
            self.state.lock().operations.values().cloned().collect();
        let mut summaries: Vec<OperationSummary> = operations
            .iter()
            .map(|operation| operation.summary(now))
            .collect();
        summaries.sort_by_key(|s| std::cmp::Reverse(s.queued_at));
        summaries
    }

    /// Operation `name` in full; `None` if it is not kept.
    pub fn operation(&self, name: &str) -> Option<OperationDetail> {
        let operation = self.state.lock().operations.get(name).cloned()?;
        let summary = operation.summary(self.clock.now());
        let response = operation.response();
        let action = &operation.execution;
        let why_queued = (summary.stage == Stage::Queued).then(|| self.why_queued(action));
        Some(OperationDetail {
            summary,
            command_properties: action.sources.command.clone(),
            action_properties: action.sources.action.clone(),
            header_property_names: action
                .sources
                .headers
                .iter()
                .map(|(name, _)| name.clone())
                .collect(),
            response,
            why_queued,
        })
    }

    /// Why no executor has taken `action` yet, in an operator's words.
    fn why_queued(&self, action: &QueuedAction) -> String {
        let Some(key) = &action.key else {
            return "it is not queued".into();
        };
        let same_key: Vec<Arc<ExecutorEntry>> = self
            .state
            .lock()
            .executors
            .values()
            .filter(|e| &e.key == key)
            .cloned()
            .collect();
        let matching: Vec<&Arc<ExecutorEntry>> = same_key
            .iter()
            .filter(|e| satisfies(&e.offer, &action.requires))
            .collect();
        let wants = format!("{key}{}", action.requires.describe());
        if matching.is_empty() {
            return format!(
                "no executor matches: it needs [{wants}], and {} registered executor(s) serve {key}; registered: {}",
                same_key.len(),
                self.registered_keys(&action.requires.org)
            );
        }
        let fits_when_idle = matching
            .iter()
            .any(|e| action.need.fits_in(e.offer.capacity));
        if !fits_when_idle {
            return format!(
                "no matching executor is large enough: it reserves {} and the {} matching executor(s) have at most {}",
                action.need,
                matching.len(),
                matching
                    .iter()
                    .map(|e| e.offer.capacity)
                    .fold(ResourceAmount::default(), ResourceAmount::max)
            );
        }
        let fits_now = matching
            .iter()
            .any(|e| action.need.fits_in(*e.capacity.free.lock()));
        let running: usize = matching
            .iter()
            .map(|e| e.running.load(Ordering::Relaxed))
            .sum();
        let slots: usize = matching.iter().map(|e| e.slots).sum();
        if !fits_now {
            format!(
                "no capacity: {} matching executor(s) run {running} action(s) and none has {} free",
                matching.len(),
                action.need
            )
        } else if action.runner_key.is_some() && running < slots {
            "left for a moment to an executor that holds its runner warm (warm_runner_wait_ms)"
                .into()
        } else {
            format!(
                "waiting for a free slot: {} matching executor(s) run {running} action(s) in {slots} slot(s); earlier or fairer-shared work goes first",
                matching.len()
            )
        }
    }

    /// Tells `observer` of every execution that completes from now on.
    pub fn set_observer(&self, observer: Arc<dyn ExecutionObserver>) {
        *self.observer.write() = Some(observer);
    }
}

fn queue_entry<'a>(
    queues: &'a mut BTreeMap<String, QueueSnapshot>,
    key: &QueueKey,
) -> &'a mut QueueSnapshot {
    queues
        .entry(key.to_string())
        .or_insert_with(|| QueueSnapshot {
            pool: key.pool.clone(),
            key: key.to_string(),
            queued: 0,
            executing: 0,
            oldest_queued: None,
            executors: 0,
        })
}
