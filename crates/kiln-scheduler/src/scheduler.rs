//! [`Scheduler`]: every operation's life, from an Execute request to its
//! `ExecuteResponse`. Each Execute request gets an operation of its own
//! ([`ClientOperation`]: its name and a `watch` channel of
//! `google.longrunning.Operation`, so Execute, WaitExecution and
//! GetOperation all read the same value and a change wakes them all).
//! Identical cacheable requests in flight share one execution
//! ([`QueuedAction`]), which sends every change to each operation following
//! it; cancelling one of them detaches only its client.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicI8, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kiln_cas::wire::{digest_function, parse_digest, to_wire};
use kiln_cas::{AcScope, ActionCacheStore, Storage};
use kiln_platform::{Platform, PropertySources};
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::protobuf::{Any, Timestamp};
use kiln_proto::reapi::{self, execution_stage};
use kiln_proto::rpc;
use kiln_proto::status::{self, to_rpc as to_rpc_status};
use kiln_proto::timestamp_now;
use kiln_store::{Digest, DigestFunction, Retention};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::capacity::ResourceAmount;
use crate::error::SchedulerError;
use crate::queue::{PoolQueue, Properties, QueueKey, Requirement, Unmatched};
use crate::report::{
    outcome_of, Client, ExecutionObserver, ExecutorEntry, Outcome, Progress, Stage,
};

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
    /// How long an action whose runner key some executor holds warm is
    /// left to that executor before any other may take it.
    pub warm_runner_wait: Duration,
    /// An execution no client waits for (no Execute or WaitExecution stream
    /// open, no GetOperation) this long is cancelled. None: never.
    pub orphan_grace: Option<Duration>,
    /// Most operations queued or running at once (a request merged into
    /// an identical execution in flight counts too: it keeps an operation
    /// of its own); a request beyond is refused with RESOURCE_EXHAUSTED and
    /// a retry delay.
    pub max_queued_executions: usize,
    /// The longest an action may run (an executor clamps longer timeouts
    /// to its own, at most this), and the timeout of one that sets none.
    pub max_action_timeout: Duration,
    /// An executor that has not finished an action within its timeout
    /// plus grace plus this (for staging and upload) loses it: the action
    /// is requeued.
    pub assignment_margin: Duration,
    /// The longest `termination-grace-period` an action may ask for;
    /// longer is refused with INVALID_ARGUMENT, so no action holds its
    /// executor arbitrarily long after its timeout or cancellation.
    pub max_termination_grace: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            default_pool: "default".into(),
            completed_operations_kept: 10_000,
            unmatched_grace: Duration::from_secs(2),
            max_attempts: 3,
            default_action_resources: ResourceAmount::default(),
            warm_runner_wait: Duration::from_millis(200),
            orphan_grace: Some(Duration::from_secs(5)),
            max_queued_executions: 100_000,
            max_action_timeout: Duration::from_secs(3600),
            assignment_margin: Duration::from_secs(600),
            max_termination_grace: Duration::from_secs(300),
        }
    }
}

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
    queue: Option<Arc<PoolQueue>>,
    /// The pool, OS and architecture it was queued for (none: answered
    /// without queueing).
    pub(crate) key: Option<QueueKey>,
    queued_at: Timestamp,
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
    cacheable: bool,
    /// `results_cache_policy` as [`Retention`] epochs: the longest any
    /// merged request asked for.
    retention: AtomicI8,
    merge_key: Option<MergeKey>,
    digest_function: i32,
    followers: Mutex<Followers>,
}

/// What an execution's clients see, and which clients still follow it.
#[derive(Default)]
struct Followers {
    /// Its operation as every client sees it, but for the name (each
    /// client's is its own).
    current: Operation,
    /// The operations that follow it: the request that started it and each
    /// one merged into it, but for those their clients cancelled. Emptied
    /// when it completes, which also ends the reference cycle through
    /// [`ClientOperation::execution`].
    attached: Vec<Arc<ClientOperation>>,
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
    fn subscribe(&self) -> OperationWatch {
        *self.last_seen.lock() = std::time::Instant::now();
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
            queued_at: timestamp_now(),
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
    fn follow(
        self: &Arc<Self>,
        name: String,
        client: &Client,
        requested_at: std::time::SystemTime,
    ) -> Arc<ClientOperation> {
        let mut followers = self.followers.lock();
        let operation = Arc::new(ClientOperation {
            name: name.clone(),
            execution: self.clone(),
            client: client.clone(),
            requested_at,
            last_seen: Mutex::new(std::time::Instant::now()),
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
    fn detach(&self, operation: &ClientOperation, response: &reapi::ExecuteResponse) -> Detached {
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
        *operation.detached.lock() = Some(Arc::new(outcome_of(response)));
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
    /// attached operation, and none asked for within `grace`.
    fn orphaned(&self, grace: Duration) -> bool {
        let followers = self.followers.lock();
        !followers.current.done
            && followers.attached.iter().all(|operation| {
                operation.state.receiver_count() == 0
                    && operation.last_seen.lock().elapsed() >= grace
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

/// Most distinct blobs of one input tree the scheduler checks for an
/// organisation's Execute (the executor's own tree limits apply later).
const MAX_CHECKED_INPUT_BLOBS: usize = 2_000_000;

#[derive(Clone, PartialEq, Eq, Hash)]
struct MergeKey {
    /// The instance name and the header overrides: two requests for one
    /// digest that run it differently never share an execution.
    scope: AcScope,
    action_digest: Digest,
}

#[derive(Default)]
pub(crate) struct State {
    /// Every operation kept, by the name its client knows.
    pub(crate) operations: HashMap<String, Arc<ClientOperation>>,
    /// Cacheable executions in flight, for identical requests to join.
    in_flight: HashMap<MergeKey, Arc<QueuedAction>>,
    /// Operations done, oldest first: forgotten past
    /// `completed_operations_kept`.
    completed: VecDeque<String>,
    queues: HashMap<QueueKey, Arc<PoolQueue>>,
    /// Registered executors by id, for the operator's view.
    pub(crate) executors: HashMap<String, Arc<ExecutorEntry>>,
}

/// Owns the operations, the per-pool queues and the Action Cache writes.
pub struct Scheduler {
    storage: Storage,
    action_cache: ActionCacheStore,
    config: SchedulerConfig,
    pub(crate) state: Mutex<State>,
    /// Told of every completed execution (metrics).
    pub(crate) observer: RwLock<Option<Arc<dyn ExecutionObserver>>>,
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
            observer: RwLock::new(None),
            shutdown: CancellationToken::new(),
            registered: Notify::new(),
            me: me.clone(),
        })
    }

    /// Cancels every queued and running action and stops the executors.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// How long an executor may hold `action` before losing it.
    pub(crate) fn assignment_deadline(&self, action: &QueuedAction) -> Duration {
        action.run_time + self.config.assignment_margin
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Counts one more executor (`entry`); returns its queue.
    pub(crate) fn register_executor(&self, entry: Arc<ExecutorEntry>) -> Arc<PoolQueue> {
        let mut state = self.state.lock();
        let queue = state
            .queues
            .entry(entry.key.clone())
            .or_insert_with(|| Arc::new(PoolQueue::new(self.config.warm_runner_wait)))
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

    /// Starts an execution (or joins an identical one in flight, or answers
    /// from the Action Cache). `headers` are the request's platform headers
    /// (`x-buildbuddy-platform.*`, `x-kiln-platform.*`): they override the
    /// Action's and Command's properties and are never stored or logged.
    /// `client`'s `tool_invocation_id` (its build) shares the queue
    /// fairly between builds.
    pub async fn execute(
        &self,
        request: reapi::ExecuteRequest,
        headers: &[(String, String)],
        client: &Client,
    ) -> Result<(Operation, OperationWatch), SchedulerError> {
        let invocation_id = client.invocation_id.as_str();
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
        let done_now =
            |response: reapi::ExecuteResponse, key: Option<QueueKey>, sources: PlatformSources| {
                self.insert_done(
                    Done {
                        instance_name: &instance_name,
                        action_digest: &wire_digest,
                        digest_function: request.digest_function,
                        client,
                        key,
                        sources,
                    },
                    response,
                )
            };

        let org = client.org.as_ref();
        let Some(action) = self.fetch::<reapi::Action>(&digest, "action", org).await? else {
            return Ok(done_now(
                missing_response(vec![wire_digest.clone()]),
                None,
                PlatformSources::default(),
            ));
        };
        let command_digest =
            parse_digest(function, action.command_digest.as_ref(), "command_digest")?;
        let Some(command) = self
            .fetch::<reapi::Command>(&command_digest, "command", org)
            .await?
        else {
            return Ok(done_now(
                missing_response(vec![to_wire(&command_digest)]),
                None,
                PlatformSources::default(),
            ));
        };
        let sources = platform_sources(&action, &command, headers);
        let platform = Platform::parse(&PropertySources {
            command: &sources.command,
            action: &sources.action,
            headers: &sources.headers,
        })
        .and_then(|platform| {
            platform.check_termination_grace_period(
                self.config.max_termination_grace,
                "the server's execution.max_termination_grace",
            )?;
            Ok(platform)
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

        let retention = Retention::from_reapi_priority(
            request
                .results_cache_policy
                .map_or(0, |policy| policy.priority),
        );
        let scope = AcScope::new(client.org.clone(), instance_name.clone(), &sources.headers);
        // A cached result needs no executor: looked up before matching.
        if !request.skip_cache_lookup {
            if let Some(result) = self.action_cache.get(&scope, &digest).await? {
                if !retention.is_default() {
                    if let Err(error) = self
                        .action_cache
                        .retain(&scope, &digest, &result, retention)
                        .await
                    {
                        tracing::warn!(action = %digest, %error, "could not apply results_cache_policy to a cached result");
                    }
                }
                return Ok(done_now(
                    reapi::ExecuteResponse {
                        result: Some(result),
                        cached_result: true,
                        status: Some(rpc::Status::default()),
                        ..Default::default()
                    },
                    Some(key),
                    sources,
                ));
            }
        }

        // An organisation runs only inputs it may see: any other is
        // missing, so a client uploads it (showing it has the bytes). A
        // cached result runs nothing, so only a miss pays for the walk.
        if !org.is_empty() {
            let root = parse_digest(
                function,
                action.input_root_digest.as_ref(),
                "input_root_digest",
            )?;
            let blobs = self
                .storage
                .blobs_under(function, root, MAX_CHECKED_INPUT_BLOBS)
                .await?;
            let missing = self.storage.find_missing_for(org, &blobs).await?;
            if !missing.is_empty() {
                return Ok(done_now(
                    missing_response(missing.iter().map(to_wire).collect()),
                    Some(key),
                    sources,
                ));
            }
        }
        // `use-self-hosted-executors`: the organisation's own executors.
        let executors_of = match platform.self_hosted {
            false => Arc::from(""),
            true if client.org.is_empty() => {
                return Err(SchedulerError::Platform {
                    action: digest.to_string(),
                    source: kiln_platform::PlatformError {
                        key: "use-self-hosted-executors".into(),
                        shown: "true".into(),
                        accepted: "this request has no organisation (it was sent without an \
                                   API key), so there are no executors of its own; send an API \
                                   key, or set the property to false"
                            .into(),
                        kind: kiln_platform::PlatformErrorKind::Unsupported,
                    },
                });
            }
            true => client.org.clone(),
        };
        let (queue, requires) = self
            .matching_queue(&key, &platform, &executors_of, need, &digest)
            .await?;
        let pool = key.pool.clone();

        let timeout = action
            .timeout
            .as_ref()
            .map(|t| {
                Duration::new(
                    t.seconds.max(0) as u64,
                    t.nanos.clamp(0, 999_999_999) as u32,
                )
            })
            .filter(|t| !t.is_zero())
            .or(platform.default_timeout.filter(|t| !t.is_zero()))
            .unwrap_or(self.config.max_action_timeout)
            .min(self.config.max_action_timeout);
        let run_time = timeout
            + platform
                .termination_grace_period
                .unwrap_or(Duration::from_secs(10));
        let cacheable = !action.do_not_cache;
        let merge_key = cacheable.then_some(MergeKey {
            scope,
            action_digest: digest,
        });
        let mut state = self.state.lock();
        // Every operation not done counts, merged ones included: each is
        // kept until its execution completes.
        let in_flight = state.operations.len().saturating_sub(state.completed.len());
        if in_flight >= self.config.max_queued_executions {
            return Err(SchedulerError::Full { in_flight });
        }
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        if let Some(key) = &merge_key {
            if let Some(running) = state.in_flight.get(key).cloned() {
                tracing::debug!(action = %digest, operation = %name, execution = %running.name, "merged into an execution in flight");
                running
                    .retention
                    .fetch_max(retention.epochs(), Ordering::Relaxed);
                // Not done: completion leaves `in_flight` under this lock.
                let operation = running.follow(name.clone(), client, std::time::SystemTime::now());
                state.operations.insert(name, operation.clone());
                let watch = operation.subscribe();
                let current = watch.borrow().clone();
                return Ok((current, watch));
            }
        }
        // The same key the worker computes (`Platform::runner_key_of`).
        let runner_key = platform.recycle_runner.then(|| {
            platform
                .runner_key_of(&client.org, &instance_name)
                .short()
                .to_string()
        });
        let queued = Arc::new(QueuedAction {
            name: name.clone(),
            instance_name,
            action_digest: wire_digest.clone(),
            platform,
            sources,
            cancel: self.shutdown.child_token(),
            attempts: AtomicU32::new(0),
            bypassed: AtomicU32::new(0),
            priority: request.execution_policy.map_or(0, |policy| policy.priority),
            invocation_id: invocation_id.to_string(),
            client: client.clone(),
            requires,
            need,
            refused_by: Mutex::default(),
            queue: Some(queue.clone()),
            key: Some(key),
            queued_at: timestamp_now(),
            progress: Mutex::default(),
            enqueued: Mutex::new(std::time::Instant::now()),
            runner_key,
            run_time,
            cacheable,
            retention: AtomicI8::new(retention.epochs()),
            merge_key: merge_key.clone(),
            digest_function: request.digest_function,
            followers: Mutex::new(Followers {
                current: Operation {
                    name: name.clone(),
                    metadata: Some(metadata_any(
                        execution_stage::Value::Queued,
                        &wire_digest,
                        request.digest_function,
                        None,
                    )),
                    done: false,
                    result: None,
                },
                attached: Vec::new(),
            }),
        });
        let operation = queued.follow(name.clone(), client, queued.queued_wall());
        let watch = operation.subscribe();
        let first = watch.borrow().clone();
        if let Some(key) = merge_key {
            state.in_flight.insert(key, queued.clone());
        }
        state.operations.insert(name.clone(), operation);
        drop(state);
        tracing::debug!(action = %digest, operation = %name, %pool, "queued");
        self.cancel_when_orphaned(queued.clone());
        queue.push(queued, std::time::Instant::now());
        Ok((first, watch))
    }

    /// Cancels `action` once no client has waited for it for the orphan
    /// grace: every Execute and WaitExecution stream on each operation
    /// following it closed (the receivers of their states are gone) and no
    /// GetOperation asked. Merged requests each have their own operation,
    /// so one client leaving detaches only itself.
    fn cancel_when_orphaned(&self, action: Arc<QueuedAction>) {
        let (Some(grace), Ok(runtime)) = (
            self.config.orphan_grace,
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let me = self.me.clone();
        runtime.spawn(async move {
            loop {
                action.unwatched().await;
                if action.is_done() {
                    return;
                }
                tokio::time::sleep(grace).await;
                if action.orphaned(grace) {
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
        Ok(self.operation_of_org(name, org)?.subscribe())
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
        match execution.detach(&operation, &response) {
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
    fn cancel_execution(&self, action: &QueuedAction) {
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

    /// `executor` took `action`: it is EXECUTING now.
    pub(crate) fn started(&self, action: &QueuedAction, executor: &str) {
        action.attempts.fetch_add(1, Ordering::SeqCst);
        action.progress.lock().started = Some((std::time::SystemTime::now(), executor.to_string()));
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
            // The outputs were made for the requester's organisation: it
            // may read them, before it learns the action completed.
            if let Err(error) = self
                .action_cache
                .admit_outputs(&action.client.org, DigestFunction::Sha256, result)
                .await
            {
                tracing::warn!(operation = %action.name, %error, "could not let the organisation see the action's outputs");
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
                &key.scope,
                &key.action_digest,
                result,
                Retention::from_epochs(action.retention.load(Ordering::Relaxed).into()),
            )
            .await
        {
            tracing::warn!(action = %key.action_digest, %error, "could not write the action result to the Action Cache");
        }
    }

    /// Marks `action` done with `response` for every operation still
    /// following it (once; later calls do nothing) and lets a new identical
    /// request start a fresh execution. Both under the scheduler's lock, so
    /// a request merges only into an execution that is not done.
    fn complete(&self, action: &QueuedAction, response: reapi::ExecuteResponse) {
        let outcome = Arc::new(outcome_of(&response));
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
            observer.completed(
                &action.summary(std::time::Instant::now()),
                response.result.as_ref(),
            );
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
    fn insert_done(
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
        let name = format!("operations/{}", uuid::Uuid::new_v4());
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
            queued_at: timestamp_now(),
            progress: Mutex::new(Progress {
                started: None,
                outcome: Some(Arc::new(outcome_of(&response))),
            }),
            enqueued: Mutex::new(std::time::Instant::now()),
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
            observer.completed(
                &done.summary(std::time::Instant::now()),
                response.result.as_ref(),
            );
        }
        let operation = done.follow(name.clone(), client, done.queued_wall());
        let watch = operation.subscribe();
        let first = watch.borrow().clone();
        let mut state = self.state.lock();
        state.operations.insert(name.clone(), operation);
        self.remember_completed(&mut state, name);
        (first, watch)
    }

    /// The queue of executors offering `key` and the declared properties
    /// the action requires there, waiting up to the grace for a matching
    /// executor to register; else FAILED_PRECONDITION naming what is
    /// unmatched.
    /// `executors_of`: the organisation whose own executors must run it
    /// (empty: the shared fleet).
    async fn matching_queue(
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
        queue.push(action.clone(), std::time::Instant::now());
    }

    /// A small proto from the CAS; `None` if absent.
    /// Message `digest` from the CAS, if organisation `org` may see it.
    async fn fetch<M: Message + Default>(
        &self,
        digest: &Digest,
        what: &str,
        org: &str,
    ) -> Result<Option<M>, SchedulerError> {
        if digest.size > kiln_proto::MAX_MESSAGE_BLOB_BYTES {
            return Err(SchedulerError::InvalidArgument(format!(
                "{what} {digest} is {} bytes, over the limit of {} bytes (MAX_MESSAGE_BLOB_BYTES)",
                digest.size,
                kiln_proto::MAX_MESSAGE_BLOB_BYTES
            )));
        }
        if !org.is_empty() && !self.storage.visible_to(org, digest).await? {
            return Ok(None);
        }
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

/// What an operation answered at once is made of.
struct Done<'a> {
    instance_name: &'a str,
    action_digest: &'a reapi::Digest,
    digest_function: i32,
    client: &'a Client,
    key: Option<QueueKey>,
    sources: PlatformSources,
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

/// A response saying CANCELLED with `message`.
fn cancelled(message: String) -> reapi::ExecuteResponse {
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

/// FAILED_PRECONDITION with one PreconditionFailure violation per digest,
/// the answer that makes Bazel upload the blobs and retry.
fn missing_response(digests: Vec<reapi::Digest>) -> reapi::ExecuteResponse {
    reapi::ExecuteResponse {
        status: Some(to_rpc_status(status::missing_blobs(&digests))),
        ..Default::default()
    }
}

/// Moves an execution that is not done yet to `stage`.
fn set_stage(action: &QueuedAction, stage: execution_stage::Value) {
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

#[cfg(test)]
mod tests {
    use kiln_proto::reapi::platform::Property;
    use kiln_store::{BlobStore, MemoryStore};

    use super::*;
    use crate::local::{Finished, LocalExecutor};

    /// A scheduler keeping `kept` finished operations, over an in-memory
    /// CAS holding an action, with an embedded executor to take it; and an
    /// Execute request for that action.
    async fn scheduler_with_action(
        kept: usize,
    ) -> (Arc<Scheduler>, LocalExecutor, reapi::ExecuteRequest) {
        let store = Arc::new(MemoryStore::new(1 << 20));
        let sha256 = DigestFunction::Sha256;
        let command = reapi::Command {
            arguments: vec!["true".into()],
            ..Default::default()
        }
        .encode_to_vec();
        let command_digest = sha256.digest_of(&command);
        let arch = if cfg!(target_arch = "aarch64") {
            "arm64"
        } else {
            "amd64"
        };
        let action = reapi::Action {
            command_digest: Some(to_wire(&command_digest)),
            input_root_digest: Some(to_wire(&sha256.empty())),
            platform: Some(reapi::Platform {
                properties: vec![Property {
                    name: "Arch".into(),
                    value: arch.into(),
                }],
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let action_digest = sha256.digest_of(&action);
        store
            .put(command_digest.key(), command.into())
            .await
            .unwrap();
        store.put(action_digest.key(), action.into()).await.unwrap();
        let scheduler = Scheduler::new(
            Storage::new(store, Default::default()),
            SchedulerConfig {
                completed_operations_kept: kept,
                orphan_grace: None,
                ..Default::default()
            },
        );
        let executor = LocalExecutor::register(
            scheduler.clone(),
            "default",
            ResourceAmount::default(),
            &["none"],
            1,
        );
        let request = reapi::ExecuteRequest {
            action_digest: Some(to_wire(&action_digest)),
            ..Default::default()
        };
        (scheduler, executor, request)
    }

    #[tokio::test]
    async fn merged_and_cancelled_operations_count_against_the_completed_bound() {
        let (scheduler, executor, request) = scheduler_with_action(3).await;
        let client = Client::default();
        let mut names = Vec::new();
        let mut watches = Vec::new();
        for _ in 0..3 {
            let (first, watch) = scheduler
                .execute(request.clone(), &[], &client)
                .await
                .unwrap();
            names.push(first.name);
            watches.push(watch);
        }
        assert!(names[0] != names[1] && names[1] != names[2] && names[0] != names[2]);
        let execution = Arc::downgrade(&scheduler.state.lock().operations[&names[0]].execution);
        let lease = executor.next().await.unwrap();

        scheduler.cancel(&names[0], "").unwrap();
        assert!(
            watches[0].borrow().done,
            "the cancelled one is done at once"
        );
        assert!(!watches[1].borrow().done && !lease.cancel().is_cancelled());
        lease
            .finish(Finished {
                result: Some(reapi::ActionResult::default()),
                status: rpc::Status::default(),
                cacheable: true,
            })
            .await;
        for (watch, name) in watches.iter().zip(&names) {
            assert!(watch.borrow().done);
            assert_eq!(&watch.borrow().name, name);
        }
        assert_eq!(scheduler.state.lock().operations.len(), 3);

        // Three more (Action Cache hits now) push all three out, the
        // detached one included, and the execution with them.
        for _ in 0..3 {
            scheduler
                .execute(request.clone(), &[], &client)
                .await
                .unwrap();
        }
        let state = scheduler.state.lock();
        assert_eq!(state.operations.len(), 3);
        assert!(names
            .iter()
            .all(|name| !state.operations.contains_key(name)));
        assert!(state.in_flight.is_empty());
        assert!(
            execution.upgrade().is_none(),
            "the shared execution is freed with its last operation"
        );
    }

    #[tokio::test]
    async fn organisations_share_no_execution_operation_or_cached_result() {
        let (scheduler, executor, request) = scheduler_with_action(10).await;
        let client = |org: &str| Client {
            org: Arc::from(org),
            ..Client::default()
        };
        // The blobs were stored with open access. They belong to the
        // first organisation to use the store (see `kiln_cas::tenancy`):
        // here "other", so for acme they are blobs no one of it uploaded,
        // and missing.
        scheduler.storage.enter("other").await.unwrap();
        let (refused, _) = scheduler
            .execute(request.clone(), &[], &client("acme"))
            .await
            .unwrap();
        assert!(refused.done, "acme ran an action it never uploaded");
        let response = match refused.result {
            Some(operation::Result::Response(any)) => {
                reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            response.status.unwrap().code,
            tonic::Code::FailedPrecondition as i32
        );
        let sha256 = DigestFunction::Sha256;
        let action_digest = parse_digest(sha256, request.action_digest.as_ref(), "").unwrap();
        let action: reapi::Action = scheduler
            .fetch(&action_digest, "action", "")
            .await
            .unwrap()
            .unwrap();
        let command_digest = parse_digest(sha256, action.command_digest.as_ref(), "").unwrap();
        for org in ["acme", "other"] {
            scheduler
                .storage
                .admit(org, &[action_digest, command_digest])
                .await
                .unwrap();
        }
        let (acme, _acme_watch) = scheduler
            .execute(request.clone(), &[], &client("acme"))
            .await
            .unwrap();
        let (other, _other_watch) = scheduler
            .execute(request.clone(), &[], &client("other"))
            .await
            .unwrap();
        {
            let state = scheduler.state.lock();
            assert!(
                !Arc::ptr_eq(
                    &state.operations[&acme.name].execution,
                    &state.operations[&other.name].execution
                ),
                "two organisations' identical requests were merged"
            );
        }
        // Another organisation's operation is unknown, as a missing one is.
        for (name, org) in [
            (&acme.name, "other"),
            (&other.name, "acme"),
            (&acme.name, ""),
        ] {
            let unknown = |result: Result<(), SchedulerError>| {
                assert!(
                    matches!(result, Err(SchedulerError::UnknownOperation(_))),
                    "{name} seen by {org:?}"
                );
            };
            unknown(scheduler.watch(name, org).map(drop));
            unknown(scheduler.cancel(name, org));
            unknown(scheduler.delete(name, org));
        }
        let listed = |org| -> Vec<String> {
            let mut names: Vec<String> = scheduler
                .list(100, org)
                .into_iter()
                .map(|operation| operation.name)
                .collect();
            names.sort();
            names
        };
        let mut acme_names = vec![refused.name.clone(), acme.name.clone()];
        acme_names.sort();
        assert_eq!(listed("acme"), acme_names);
        assert_eq!(listed("other"), std::slice::from_ref(&other.name));
        assert!(listed("").is_empty());
        assert!(!scheduler.watch(&acme.name, "acme").unwrap().borrow().done);
        // The queues an organisation is shown count its own work only;
        // the operator's (metrics) count all. The shared executor is in
        // every view.
        let work = |org: Option<&str>| {
            let queues = scheduler.queues(org);
            let executors: usize = queues.iter().map(|q| q.executors).sum();
            let work: usize = queues.iter().map(|q| q.queued + q.executing).sum();
            (executors, work)
        };
        assert_eq!(work(None), (1, 2));
        assert_eq!(work(Some("acme")), (1, 1));
        assert_eq!(work(Some("other")), (1, 1));
        assert_eq!(work(Some("")), (1, 0));

        // acme's result is cached for acme only.
        let lease = executor.next().await.unwrap();
        let acme_ran = scheduler.state.lock().operations[&acme.name]
            .execution
            .stage()
            != Stage::Queued;
        lease
            .finish(Finished {
                result: Some(reapi::ActionResult::default()),
                status: rpc::Status::default(),
                cacheable: true,
            })
            .await;
        let first = if acme_ran { "acme" } else { "other" };
        let second = if first == "acme" { "other" } else { "acme" };
        let (cached, _) = scheduler
            .execute(request.clone(), &[], &client(first))
            .await
            .unwrap();
        assert!(cached.done, "{first}'s own result is served from the cache");
        let (fresh, _) = scheduler
            .execute(request.clone(), &[], &client(second))
            .await
            .unwrap();
        assert!(
            !fresh.done,
            "{second} was answered from {first}'s Action Cache entry"
        );
    }
}
