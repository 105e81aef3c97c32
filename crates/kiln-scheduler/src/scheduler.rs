//! [`Scheduler`]: the façade that takes an Execute request to its
//! `ExecuteResponse`: it checks the request (Action and Command in the CAS,
//! platform parsed, an executor that matches), answers Action Cache hits at
//! once, queues the rest (or merges them into an identical execution in
//! flight) and completes them with what the executor reported, writing
//! cacheable results to the Action Cache first. The operations it hands out
//! live in [`crate::operation`]; the queues and matching in [`crate::queue`].

use std::sync::atomic::{AtomicI8, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kiln_cas::wire::{digest_function, parse_digest, to_wire};
use kiln_cas::{AcScope, ActionCacheStore, Storage};
use kiln_platform::{Platform, PropertySources};
use kiln_proto::longrunning::Operation;
use kiln_proto::reapi::{self, execution_stage};
use kiln_proto::rpc;
use kiln_proto::status::{self, to_rpc as to_rpc_status};
use kiln_store::{Digest, DigestFunction, Retention};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::capacity::ResourceAmount;
use crate::clock::{timestamp_of, Clock, Environment, IdGenerator};
use crate::error::SchedulerError;
use crate::operation::{
    metadata_any, set_stage, Done, Followers, MergeKey, OperationWatch, PlatformSources,
    QueuedAction, State,
};
use crate::queue::QueueKey;
use crate::report::{Client, ExecutionObserver};

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

/// Most distinct blobs of one input tree the scheduler checks for an
/// organisation's Execute (the executor's own tree limits apply later).
const MAX_CHECKED_INPUT_BLOBS: usize = 2_000_000;

/// Owns the operations, the per-pool queues and the Action Cache writes.
pub struct Scheduler {
    pub(crate) storage: Storage,
    pub(crate) action_cache: ActionCacheStore,
    pub(crate) config: SchedulerConfig,
    pub(crate) state: Mutex<State>,
    /// Told of every completed execution (metrics).
    pub(crate) observer: RwLock<Option<Arc<dyn ExecutionObserver>>>,
    pub(crate) shutdown: CancellationToken,
    /// Wakes requests waiting for a matching executor to register.
    pub(crate) registered: Notify,
    /// Where it reads the time.
    pub(crate) clock: Arc<dyn Clock>,
    /// Where operation names come from.
    pub(crate) ids: Arc<dyn IdGenerator>,
    /// Itself, for the tasks it spawns.
    pub(crate) me: std::sync::Weak<Scheduler>,
}

impl Scheduler {
    pub fn new(storage: Storage, config: SchedulerConfig) -> Arc<Scheduler> {
        Scheduler::with_environment(storage, config, Environment::default())
    }

    /// A scheduler that reads the time from `environment.clock` and names
    /// operations with `environment.ids` (tests move the clock themselves).
    pub fn with_environment(
        storage: Storage,
        config: SchedulerConfig,
        environment: Environment,
    ) -> Arc<Scheduler> {
        Arc::new_cyclic(|me| Scheduler {
            clock: environment.clock,
            ids: environment.ids,
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
        let need =
            ResourceAmount::reserved_by(&platform.resources, self.config.default_action_resources);

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
        let name = format!("operations/{}", self.ids.new_id());
        let (now, wall) = (self.clock.now(), self.clock.wall());
        if let Some(key) = &merge_key {
            if let Some(running) = state.in_flight.get(key).cloned() {
                tracing::debug!(action = %digest, operation = %name, execution = %running.name, "merged into an execution in flight");
                running
                    .retention
                    .fetch_max(retention.epochs(), Ordering::Relaxed);
                // Not done: completion leaves `in_flight` under this lock.
                let operation = running.follow(name.clone(), client, wall, now);
                state.operations.insert(name, operation.clone());
                let watch = operation.subscribe(now);
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
            queued_at: timestamp_of(wall),
            progress: Mutex::default(),
            enqueued: Mutex::new(now),
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
        let operation = queued.follow(name.clone(), client, queued.queued_wall(), now);
        let watch = operation.subscribe(now);
        let first = watch.borrow().clone();
        if let Some(key) = merge_key {
            state.in_flight.insert(key, queued.clone());
        }
        state.operations.insert(name.clone(), operation);
        drop(state);
        tracing::debug!(action = %digest, operation = %name, %pool, "queued");
        self.cancel_when_orphaned(queued.clone());
        queue.push(queued, now);
        Ok((first, watch))
    }

    /// `executor` took `action`: it is EXECUTING now.
    pub(crate) fn started(&self, action: &QueuedAction, executor: &str) {
        action.attempts.fetch_add(1, Ordering::SeqCst);
        action.progress.lock().started = Some((self.clock.wall(), executor.to_string()));
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
        status: Some(to_rpc_status(status::missing_blobs(&digests))),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use kiln_proto::longrunning::operation;
    use kiln_proto::reapi::platform::Property;
    use kiln_store::{BlobStore, MemoryStore};

    use super::*;
    use crate::clock::{ManualClock, SequentialIds};
    use crate::local::{Finished, LocalExecutor};
    use crate::report::Stage;

    /// A scheduler keeping `kept` finished operations, over an in-memory
    /// CAS holding an action, with an embedded executor to take it; and an
    /// Execute request for that action.
    async fn scheduler_with_action(
        kept: usize,
    ) -> (Arc<Scheduler>, LocalExecutor, reapi::ExecuteRequest) {
        scheduler_with_action_in(kept, Environment::default()).await
    }

    /// The same, reading the time and naming operations from `environment`.
    async fn scheduler_with_action_in(
        kept: usize,
        environment: Environment,
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
        let scheduler = Scheduler::with_environment(
            Storage::new(store, Default::default()),
            SchedulerConfig {
                completed_operations_kept: kept,
                orphan_grace: None,
                ..Default::default()
            },
            environment,
        );
        let executor = LocalExecutor::register(
            scheduler.clone(),
            "default",
            ResourceAmount::default(),
            &["none"],
            Default::default(),
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

    /// A clock the test moves, and operation names `operations/1`, `2`, …
    fn manual_environment() -> (Arc<ManualClock>, Environment) {
        let clock = ManualClock::new();
        let environment = Environment {
            clock: clock.clone(),
            ids: Arc::new(SequentialIds::default()),
        };
        (clock, environment)
    }

    #[tokio::test]
    async fn a_queued_action_shows_how_long_it_has_waited_since_it_was_last_queued() {
        let (clock, environment) = manual_environment();
        let (scheduler, executor, request) = scheduler_with_action_in(10, environment).await;
        let (first, _watch) = scheduler
            .execute(request, &[], &Client::default())
            .await
            .unwrap();
        assert_eq!(first.name, "operations/1");
        // (queued, oldest queued, the operation's own wait), as the
        // operator's queue view and operation list show them.
        let shown = || {
            let queues = scheduler.queues(None);
            assert_eq!(queues.len(), 1, "one queue: the embedded executor's");
            let operations = scheduler.operations();
            (
                queues[0].queued,
                queues[0].oldest_queued,
                operations[0].waiting,
            )
        };
        assert_eq!(shown(), (1, Some(Duration::ZERO), Some(Duration::ZERO)));
        clock.advance(Duration::from_secs(90));
        let ninety = Some(Duration::from_secs(90));
        assert_eq!(shown(), (1, ninety, ninety));

        let lease = executor.next().await.unwrap();
        assert_eq!(shown(), (0, None, None), "running, not waiting");
        clock.advance(Duration::from_secs(30));
        // Its executor's disk is full: queued again, and its wait starts
        // again from now, not from when the request came.
        lease.retry_elsewhere("no space left on device");
        clock.advance(Duration::from_secs(5));
        let five = Some(Duration::from_secs(5));
        assert_eq!(shown(), (1, five, five));
    }

    #[tokio::test]
    async fn operations_are_listed_newest_first_each_under_its_own_name() {
        let (clock, environment) = manual_environment();
        let (scheduler, _executor, request) = scheduler_with_action_in(10, environment).await;
        let mut watches = Vec::new();
        for _ in 0..3 {
            let (_, watch) = scheduler
                .execute(request.clone(), &[], &Client::default())
                .await
                .unwrap();
            watches.push(watch);
            clock.advance(Duration::from_secs(1));
        }
        let listed = scheduler.operations();
        let names: Vec<(&str, Option<&str>)> = listed
            .iter()
            .map(|s| (s.name.as_str(), s.merged_into.as_deref()))
            .collect();
        assert_eq!(
            names,
            [
                ("operations/3", Some("operations/1")),
                ("operations/2", Some("operations/1")),
                ("operations/1", None),
            ]
        );
        let arrived = |i: usize| listed[i].queued_at;
        assert_eq!(
            arrived(0).duration_since(arrived(2)).unwrap(),
            Duration::from_secs(2),
            "each request's own arrival, not its execution's"
        );
    }

    #[tokio::test]
    async fn an_execution_is_orphaned_only_when_no_client_asked_for_it_for_the_grace() {
        let (clock, environment) = manual_environment();
        let (scheduler, _executor, request) = scheduler_with_action_in(10, environment).await;
        let grace = Duration::from_secs(5);
        let (first, watch) = scheduler
            .execute(request, &[], &Client::default())
            .await
            .unwrap();
        let execution = scheduler.state.lock().operations[&first.name]
            .execution
            .clone();
        let orphaned = || execution.orphaned(grace, clock.now());

        clock.advance(grace * 2);
        assert!(!orphaned(), "its Execute stream is still open");
        drop(watch);
        assert!(orphaned(), "no stream, and no one asked for the grace");
        // A GetOperation (or WaitExecution that ends) counts as asking.
        drop(scheduler.watch(&first.name, "").unwrap());
        assert!(!orphaned());
        clock.advance(grace - Duration::from_millis(1));
        assert!(!orphaned(), "asked for within the grace");
        clock.advance(Duration::from_millis(1));
        assert!(orphaned());
    }
}
