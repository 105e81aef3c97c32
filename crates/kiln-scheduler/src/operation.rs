//! The operation table: every Execute request's operation
//! ([`ClientOperation`]: its name and a `watch` channel of
//! `google.longrunning.Operation`, so Execute, WaitExecution and
//! GetOperation all read the same value and a change wakes them all) and
//! the executions they follow ([`QueuedAction`]). Identical cacheable
//! requests in flight share one execution, which sends every change to each
//! operation following it; cancelling one of them detaches only its
//! client. Here too: watching, listing, cancelling and deleting operations,
//! completing an execution, forgetting the oldest finished operations, and
//! cancelling executions no client waits for any more.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicI8, AtomicU32};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kiln_cas::AcScope;
use kiln_platform::Platform;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::protobuf::{Any, Timestamp};
use kiln_proto::reapi::{self, execution_stage};
use kiln_proto::rpc;
use kiln_store::Digest;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::capacity::ResourceAmount;
use crate::clock::timestamp_of;
use crate::error::SchedulerError;
use crate::queue::{PoolQueue, QueueKey, Requirement};
use crate::report::{outcome_of, Client, ExecutorEntry, Outcome, Progress, Stage};
use crate::scheduler::Scheduler;

const METADATA_TYPE: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata";
const RESPONSE_TYPE: &str = "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";

/// One queued or running execution, shared by every request merged into it.
pub struct QueuedAction {
    /// The operation name of the request that started it: how logs and
    /// metrics name the execution. Clients never see it but as their own.
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
    pub(crate) attempts: AtomicU32,
    /// How many times smaller work passed it while it did not fit its
    /// executor's free capacity (see [`MAX_BYPASSES`]).
    pub(crate) bypassed: AtomicU32,
    /// `execution_policy.priority`: lower runs sooner.
    pub(crate) priority: i32,
    /// `RequestMetadata.tool_invocation_id`: the unit of fair sharing.
    pub(crate) invocation_id: String,
    /// Who asked for it (the request that started it, when merged).
    pub(crate) client: Client,
    /// What an executor must offer to take it.
    pub(crate) requires: Requirement,
    /// What it reserves on its executor while it runs.
    pub(crate) need: ResourceAmount,
    /// Executors that could not run it (a full disk): they do not take it
    /// again while another executor may.
    pub(crate) refused_by: Mutex<BTreeSet<String>>,
    pub(crate) queue: Option<Arc<PoolQueue>>,
    /// The pool, OS and architecture it was queued for (none: answered
    /// without queueing).
    pub(crate) key: Option<QueueKey>,
    pub(crate) queued_at: Timestamp,
    /// Which executor runs it and its outcome, for the operator's view.
    pub(crate) progress: Mutex<Progress>,
    /// When it was last queued (requeued included): warm routing leaves it
    /// to a warm executor for a while after that.
    pub(crate) enqueued: Mutex<std::time::Instant>,
    /// The first 16 hex digits of its runner key, with `recycle-runner`.
    pub(crate) runner_key: Option<String>,
    /// How long it may run once started: its timeout plus its termination
    /// grace period.
    pub(crate) run_time: Duration,
    /// Whether the request allows writing the result to the Action Cache.
    pub(crate) cacheable: bool,
    /// `results_cache_policy` as [`Retention`] epochs: the longest any
    /// merged request asked for.
    pub(crate) retention: AtomicI8,
    pub(crate) merge_key: Option<MergeKey>,
    pub(crate) digest_function: i32,
    pub(crate) followers: Mutex<Followers>,
}

/// What an execution's clients see, and which clients still follow it.
#[derive(Default)]
pub(crate) struct Followers {
    /// Its operation as every client sees it, but for the name (each
    /// client's is its own).
    pub(crate) current: Operation,
    /// The operations that follow it: the request that started it and each
    /// one merged into it, but for those their clients cancelled. Emptied
    /// when it completes, which also ends the reference cycle through
    /// [`ClientOperation::execution`].
    pub(crate) attached: Vec<Arc<ClientOperation>>,
}

/// One Execute request's operation: the name its client knows and the
/// state that client sees, following an execution it may share with
/// identical requests merged into it.
pub(crate) struct ClientOperation {
    pub(crate) name: String,
    pub(crate) execution: Arc<QueuedAction>,
    /// Who sent this request.
    pub(crate) client: Client,
    /// When this request arrived: when its execution was queued, unless it
    /// was merged into one queued earlier.
    pub(crate) requested_at: std::time::SystemTime,
    /// When a client last asked for it (WaitExecution, GetOperation).
    last_seen: Mutex<std::time::Instant>,
    /// How it ended, when its client cancelled it while other requests
    /// kept the execution running.
    pub(crate) detached: Mutex<Option<Arc<Outcome>>>,
    state: watch::Sender<Operation>,
}

impl ClientOperation {
    /// Its state, to wait on.
    pub(crate) fn subscribe(&self, now: Instant) -> OperationWatch {
        *self.last_seen.lock() = now;
        self.state.subscribe()
    }

    /// Its response, once completed.
    pub(crate) fn response(&self) -> Option<reapi::ExecuteResponse> {
        response_of(&self.state.borrow())
    }

    /// Shows its client the execution's `current` state under its own name.
    fn show(&self, current: &Operation) {
        self.state.send_replace(Operation {
            name: self.name.clone(),
            ..current.clone()
        });
    }
}

/// What cancelling one client's operation did.
enum Detached {
    /// It was done already (or detached before): nothing to cancel.
    AlreadyDone,
    /// It ended as CANCELLED; its execution goes on for other clients.
    Alone,
    /// No other client follows its execution: cancel the execution.
    Last,
}

#[cfg(test)]
impl QueuedAction {
    /// A queued action for the queue's unit tests: no operation behind it.
    pub(crate) fn for_test(
        invocation: &str,
        priority: i32,
        runner_key: Option<&str>,
        requires: Requirement,
    ) -> Arc<QueuedAction> {
        Arc::new(QueuedAction {
            name: format!("operations/{invocation}"),
            instance_name: String::new(),
            action_digest: reapi::Digest::default(),
            platform: Platform::default(),
            sources: PlatformSources::default(),
            cancel: CancellationToken::new(),
            attempts: AtomicU32::new(0),
            bypassed: AtomicU32::new(0),
            priority,
            invocation_id: invocation.to_string(),
            client: Client::default(),
            requires,
            need: ResourceAmount::default(),
            refused_by: Mutex::default(),
            queue: None,
            key: None,
            queued_at: timestamp_of(SystemTime::now()),
            progress: Mutex::default(),
            enqueued: Mutex::new(std::time::Instant::now()),
            runner_key: runner_key.map(String::from),
            run_time: Duration::ZERO,
            cacheable: false,
            retention: AtomicI8::new(0),
            merge_key: None,
            digest_function: 0,
            followers: Mutex::default(),
        })
    }
}

impl QueuedAction {
    /// When it was first queued, as wall-clock time.
    pub(crate) fn queued_wall(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + Duration::new(
                self.queued_at.seconds.max(0) as u64,
                self.queued_at.nanos.clamp(0, 999_999_999) as u32,
            )
    }

    /// A new operation named `name` for `client`'s request, following
    /// this execution from its current state on (attached unless the
    /// execution is done).
    pub(crate) fn follow(
        self: &Arc<Self>,
        name: String,
        client: &Client,
        requested_at: SystemTime,
        now: Instant,
    ) -> Arc<ClientOperation> {
        let mut followers = self.followers.lock();
        let operation = Arc::new(ClientOperation {
            name: name.clone(),
            execution: self.clone(),
            client: client.clone(),
            requested_at,
            last_seen: Mutex::new(now),
            detached: Mutex::new(None),
            state: watch::channel(Operation {
                name,
                ..followers.current.clone()
            })
            .0,
        });
        if !followers.current.done {
            followers.attached.push(operation.clone());
        }
        operation
    }

    /// Applies `change` to what its clients see, unless it is done already,
    /// and shows the result to each attached operation. `None` if nothing
    /// changed; else the operations that end with this change (every
    /// attached one once it is done, none before).
    fn publish(
        &self,
        change: impl FnOnce(&mut Operation) -> bool,
    ) -> Option<Vec<Arc<ClientOperation>>> {
        let mut followers = self.followers.lock();
        if followers.current.done || !change(&mut followers.current) {
            return None;
        }
        let followers = &mut *followers;
        for operation in &followers.attached {
            operation.show(&followers.current);
        }
        Some(if followers.current.done {
            std::mem::take(&mut followers.attached)
        } else {
            Vec::new()
        })
    }

    /// Ends `operation` alone as CANCELLED with `response` if other clients
    /// still follow this execution; else leaves it for the execution's own
    /// cancellation.
    fn detach(
        &self,
        operation: &ClientOperation,
        response: &reapi::ExecuteResponse,
        now: SystemTime,
    ) -> Detached {
        let mut followers = self.followers.lock();
        let Some(index) = followers
            .attached
            .iter()
            .position(|attached| std::ptr::eq(Arc::as_ptr(attached), operation))
        else {
            return Detached::AlreadyDone;
        };
        if followers.attached.len() == 1 {
            return Detached::Last;
        }
        followers.attached.swap_remove(index);
        *operation.detached.lock() = Some(Arc::new(outcome_of(response, now)));
        operation.show(&Operation {
            done: true,
            metadata: Some(metadata_any(
                execution_stage::Value::Completed,
                &self.action_digest,
                self.digest_function,
                None,
            )),
            result: Some(operation::Result::Response(Any {
                type_url: RESPONSE_TYPE.into(),
                value: response.encode_to_vec(),
            })),
            ..Operation::default()
        });
        Detached::Alone
    }

    /// Waits until no Execute or WaitExecution stream follows any of its
    /// attached operations (each holds a receiver of its operation's state).
    async fn unwatched(&self) {
        loop {
            let attached = self.followers.lock().attached.clone();
            for operation in &attached {
                operation.state.closed().await;
            }
            // A request merged meanwhile may have brought a new stream.
            if self.watchers() == 0 {
                return;
            }
        }
    }

    /// How many streams follow its attached operations.
    fn watchers(&self) -> usize {
        self.followers
            .lock()
            .attached
            .iter()
            .map(|operation| operation.state.receiver_count())
            .sum()
    }

    /// Whether no client has waited for it for `grace`: no stream on any
    /// attached operation, and none asked for within `grace` before `now`.
    pub(crate) fn orphaned(&self, grace: Duration, now: Instant) -> bool {
        let followers = self.followers.lock();
        !followers.current.done
            && followers.attached.iter().all(|operation| {
                operation.state.receiver_count() == 0
                    && now.saturating_duration_since(*operation.last_seen.lock()) >= grace
            })
    }

    fn is_done(&self) -> bool {
        self.followers.lock().current.done
    }
}

/// Platform properties as received, by source.
#[derive(Clone, Default)]
pub struct PlatformSources {
    pub command: Vec<(String, String)>,
    pub action: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct MergeKey {
    /// The instance name and the header overrides: two requests for one
    /// digest that run it differently never share an execution.
    pub(crate) scope: AcScope,
    pub(crate) action_digest: Digest,
}

#[derive(Default)]
pub(crate) struct State {
    /// Every operation kept, by the name its client knows.
    pub(crate) operations: HashMap<String, Arc<ClientOperation>>,
    /// Cacheable executions in flight, for identical requests to join.
    pub(crate) in_flight: HashMap<MergeKey, Arc<QueuedAction>>,
    /// Operations done, oldest first: forgotten past
    /// `completed_operations_kept`.
    pub(crate) completed: VecDeque<String>,
    pub(crate) queues: HashMap<QueueKey, Arc<PoolQueue>>,
    /// Registered executors by id, for the operator's view.
    pub(crate) executors: HashMap<String, Arc<ExecutorEntry>>,
}

/// What Execute hands back: the operation's state channel.
pub type OperationWatch = watch::Receiver<Operation>;

impl Scheduler {
    /// Cancels `action` once no client has waited for it for the orphan
    /// grace: every Execute and WaitExecution stream on each operation
    /// following it closed (the receivers of their states are gone) and no
    /// GetOperation asked. Merged requests each have their own operation,
    /// so one client leaving detaches only itself.
    pub(crate) fn cancel_when_orphaned(&self, action: Arc<QueuedAction>) {
        let (Some(grace), Ok(runtime)) = (
            self.config.orphan_grace,
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let (me, clock) = (self.me.clone(), self.clock.clone());
        runtime.spawn(async move {
            loop {
                action.unwatched().await;
                if action.is_done() {
                    return;
                }
                tokio::time::sleep(grace).await;
                if action.orphaned(grace, clock.now()) {
                    let Some(me) = me.upgrade() else { return };
                    tracing::info!(operation = %action.name, ?grace, "no client waits for the execution any more: cancelling it");
                    me.cancel_execution(&action);
                    return;
                }
                if action.is_done() {
                    return;
                }
            }
        });
    }

    /// Operation `name` if it was requested for organisation `org`; an
    /// operation of another organisation is unknown, exactly as one that
    /// does not exist.
    fn operation_of_org(
        &self,
        name: &str,
        org: &str,
    ) -> Result<Arc<ClientOperation>, SchedulerError> {
        self.state
            .lock()
            .operations
            .get(name)
            .filter(|operation| *operation.client.org == *org)
            .cloned()
            .ok_or_else(|| SchedulerError::UnknownOperation(name.to_string()))
    }

    /// The state of operation `name` of organisation `org`, to wait on.
    pub fn watch(&self, name: &str, org: &str) -> Result<OperationWatch, SchedulerError> {
        Ok(self
            .operation_of_org(name, org)?
            .subscribe(self.clock.now()))
    }

    /// The current state of at most `limit` known operations of
    /// organisation `org` (in no particular order).
    pub fn list(&self, limit: usize, org: &str) -> Vec<Operation> {
        self.state
            .lock()
            .operations
            .values()
            .filter(|operation| *operation.client.org == *org)
            .take(limit)
            .map(|operation| operation.state.borrow().clone())
            .collect()
    }

    /// Cancels operation `name` for its client. While other clients'
    /// requests merged into the same execution still follow it, only this
    /// operation ends (done, CANCELLED) and the execution goes on for them.
    /// Otherwise the execution stops: a queued action completes at once as
    /// CANCELLED; a running one has its process stopped (SIGTERM, grace,
    /// SIGKILL) and completes when it has exited.
    pub fn cancel(&self, name: &str, org: &str) -> Result<(), SchedulerError> {
        let operation = self.operation_of_org(name, org)?;
        let execution = &operation.execution;
        // REAPI, not google.longrunning, says how it ends: a cancelled
        // execution's status goes in its ExecuteResponse, never in
        // Operation.error.
        let response = cancelled(format!(
            "operation {name} was cancelled; the execution it shared with other requests goes on for them"
        ));
        match execution.detach(&operation, &response, self.clock.wall()) {
            Detached::AlreadyDone => {}
            Detached::Alone => {
                tracing::info!(operation = %name, execution = %execution.name, "cancelled one of several requests sharing an execution");
                let mut state = self.state.lock();
                self.remember_completed(&mut state, operation.name.clone());
            }
            Detached::Last => self.cancel_execution(execution),
        }
        Ok(())
    }

    /// Stops `action` for every client: a queued action completes at once
    /// as CANCELLED; a running one has its process stopped and completes
    /// when it has exited.
    pub(crate) fn cancel_execution(&self, action: &QueuedAction) {
        action.cancel.cancel();
        if action.stage() == Stage::Queued {
            self.complete(
                action,
                cancelled(format!(
                    "action {}/{} was cancelled while queued",
                    action.action_digest.hash, action.action_digest.size_bytes
                )),
            );
        }
    }

    /// Forgets operation `name` of organisation `org` (it is not
    /// cancelled).
    pub fn delete(&self, name: &str, org: &str) -> Result<(), SchedulerError> {
        let mut state = self.state.lock();
        match state.operations.get(name) {
            Some(operation) if *operation.client.org == *org => {
                state.operations.remove(name);
                Ok(())
            }
            _ => Err(SchedulerError::UnknownOperation(name.to_string())),
        }
    }

    /// Marks `action` done with `response` for every operation still
    /// following it (once; later calls do nothing) and lets a new identical
    /// request start a fresh execution. Both under the scheduler's lock, so
    /// a request merges only into an execution that is not done.
    pub(crate) fn complete(&self, action: &QueuedAction, response: reapi::ExecuteResponse) {
        let outcome = Arc::new(outcome_of(&response, self.clock.wall()));
        let metadata = metadata_any(
            execution_stage::Value::Completed,
            &action.action_digest,
            action.digest_function,
            None,
        );
        let result = operation::Result::Response(Any {
            type_url: RESPONSE_TYPE.into(),
            value: response.encode_to_vec(),
        });
        let mut state = self.state.lock();
        let Some(ended) = action.publish(|op| {
            action.progress.lock().outcome = Some(outcome);
            op.done = true;
            op.metadata = Some(metadata);
            op.result = Some(result);
            true
        }) else {
            return;
        };
        if let Some(key) = &action.merge_key {
            if state
                .in_flight
                .get(key)
                .is_some_and(|running| std::ptr::eq(Arc::as_ptr(running), action))
            {
                state.in_flight.remove(key);
            }
        }
        for operation in ended {
            self.remember_completed(&mut state, operation.name.clone());
        }
        drop(state);
        if let Some(observer) = self.observer.read().as_ref() {
            observer.completed(&action.summary(self.clock.now()), response.result.as_ref());
        }
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
    pub(crate) fn insert_done(
        &self,
        done: Done<'_>,
        response: reapi::ExecuteResponse,
    ) -> (Operation, OperationWatch) {
        let Done {
            instance_name,
            action_digest,
            digest_function,
            client,
            key,
            sources,
        } = done;
        let name = format!("operations/{}", self.ids.new_id());
        let (now, wall) = (self.clock.now(), self.clock.wall());
        let done = Arc::new(QueuedAction {
            name: name.clone(),
            instance_name: instance_name.to_string(),
            action_digest: action_digest.clone(),
            platform: Platform::default(),
            sources,
            cancel: CancellationToken::new(),
            attempts: AtomicU32::new(0),
            bypassed: AtomicU32::new(0),
            priority: 0,
            invocation_id: client.invocation_id.clone(),
            client: client.clone(),
            requires: Requirement::default(),
            need: ResourceAmount::default(),
            refused_by: Mutex::default(),
            queue: None,
            key,
            queued_at: timestamp_of(wall),
            progress: Mutex::new(Progress {
                started: None,
                outcome: Some(Arc::new(outcome_of(&response, wall))),
            }),
            enqueued: Mutex::new(now),
            runner_key: None,
            run_time: Duration::ZERO,
            cacheable: false,
            retention: AtomicI8::new(0),
            merge_key: None,
            digest_function,
            followers: Mutex::new(Followers {
                current: Operation {
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
                },
                attached: Vec::new(),
            }),
        });
        if let Some(observer) = self.observer.read().as_ref() {
            observer.completed(&done.summary(now), response.result.as_ref());
        }
        let operation = done.follow(name.clone(), client, done.queued_wall(), now);
        let watch = operation.subscribe(now);
        let first = watch.borrow().clone();
        let mut state = self.state.lock();
        state.operations.insert(name.clone(), operation);
        self.remember_completed(&mut state, name);
        (first, watch)
    }
}

/// What an operation answered at once is made of.
pub(crate) struct Done<'a> {
    pub(crate) instance_name: &'a str,
    pub(crate) action_digest: &'a reapi::Digest,
    pub(crate) digest_function: i32,
    pub(crate) client: &'a Client,
    pub(crate) key: Option<QueueKey>,
    pub(crate) sources: PlatformSources,
}

/// A response saying CANCELLED with `message`.
pub(crate) fn cancelled(message: String) -> reapi::ExecuteResponse {
    reapi::ExecuteResponse {
        status: Some(rpc::Status {
            code: tonic::Code::Cancelled as i32,
            message,
            details: vec![],
        }),
        ..Default::default()
    }
}

/// The response of `operation`, once it is done.
fn response_of(operation: &Operation) -> Option<reapi::ExecuteResponse> {
    match &operation.result {
        Some(operation::Result::Response(any)) => {
            reapi::ExecuteResponse::decode(any.value.as_slice()).ok()
        }
        _ => None,
    }
}

/// Moves an execution that is not done yet to `stage`.
pub(crate) fn set_stage(action: &QueuedAction, stage: execution_stage::Value) {
    action.publish(|op| {
        op.metadata = Some(metadata_any(
            stage,
            &action.action_digest,
            action.digest_function,
            None,
        ));
        true
    });
}

pub(crate) fn metadata_any(
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
