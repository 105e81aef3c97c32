//! The scheduler's side of Kiln's executor protocol
//! (`kiln.executor.v1.ExecutorService.Session`): one long-lived stream per
//! executor process. The executor registers (pool, OS, arch, isolation
//! types, properties, slots, CPU, memory and disk); who may register is
//! decided before the stream reaches here (kiln-auth's layer requires the
//! `register-executor` capability: the executor token or such an API
//! key). The session then hands it queued actions of its [`QueueKey`] while it has
//! free slots, forwards cancellations, and completes operations with the
//! results it reports. A stream that ends, fails or goes silent past the
//! heartbeat timeout requeues the executor's running actions.
//!
//! Secrets travel with assignments (registry credentials): a session over
//! plaintext from a non-loopback peer never receives one, and the action
//! fails instead ([`SessionTransport`]). With client certificates
//! required, a session without one is refused at registration.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kiln_auth::Caller;
use kiln_platform::{Platform, PropertySources};
use kiln_proto::executor::executor_message::Kind as ExecutorKind;
use kiln_proto::executor::executor_service_server::ExecutorService;
use kiln_proto::executor::scheduler_message::Kind as SchedulerKind;
use kiln_proto::executor::{
    Assignment, Cancel, ExecutorMessage, Property, Register, Registered, SchedulerMessage,
};
use kiln_proto::{reapi, rpc};
use prost::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, Streaming};

use crate::capacity::{Capacity, Reservation, ResourceAmount};
use crate::operation::QueuedAction;
use crate::queue::{Offer, PoolQueue, QueueKey};
use crate::report::{ExecutorEntry, RunningOn};
use crate::scheduler::Scheduler;

/// Serves executor sessions for one [`Scheduler`].
pub struct ExecutorSessions {
    scheduler: Arc<Scheduler>,
    heartbeat_timeout: Duration,
    transport: SessionTransport,
}

/// What the server's gRPC port guarantees about the connections sessions
/// arrive on.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionTransport {
    /// The port speaks TLS: what a session carries cannot be read on the
    /// way. Without it, secrets go only to executors on loopback.
    pub encrypted: bool,
    /// Executors must present a client certificate. The TLS layer has
    /// verified any certificate presented against the configured CA, but
    /// lets clients without one through (Bazel needs none); the session
    /// refuses those.
    pub client_certificate_required: bool,
}

/// Whether the session `request` arrived on may carry secrets: TLS, or a
/// loopback peer (the bytes never leave the machine). An unknown peer
/// counts as remote.
fn secrets_allowed<T>(transport: &SessionTransport, request: &Request<T>) -> bool {
    transport.encrypted
        || request
            .remote_addr()
            .is_some_and(|peer| peer.ip().to_canonical().is_loopback())
}

impl ExecutorSessions {
    /// `heartbeat_timeout`: silence after which an executor counts as lost.
    pub fn new(scheduler: Arc<Scheduler>, heartbeat_timeout: Duration) -> Self {
        ExecutorSessions {
            scheduler,
            heartbeat_timeout,
            transport: SessionTransport::default(),
        }
    }

    /// What the connections sessions arrive on guarantee (default:
    /// plaintext, no client certificates).
    pub fn with_transport(mut self, transport: SessionTransport) -> Self {
        self.transport = transport;
        self
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<SchedulerMessage, Status>> + Send>>;

/// The queue key an executor's registration offers; INVALID_ARGUMENT for
/// an OS or architecture `docs/platform-properties.md` does not know.
fn offered_key(register: &Register) -> Result<QueueKey, Status> {
    if register.pool.is_empty() {
        return Err(Status::invalid_argument(
            "executor registration without a pool",
        ));
    }
    let properties = [
        ("OSFamily".to_string(), register.os_family.clone()),
        ("Arch".to_string(), register.arch.clone()),
    ];
    let platform = Platform::parse(&PropertySources {
        action: &properties,
        ..Default::default()
    })
    .map_err(|e| Status::invalid_argument(format!("executor {}: {e}", register.name)))?;
    Ok(QueueKey {
        pool: register.pool.clone(),
        os_family: platform.os_family,
        arch: platform.arch,
    })
}

/// What a registration offers within its key: declared properties and
/// isolation types (as `docs/platform-properties.md` names them; none
/// listed means `none`). INVALID_ARGUMENT for an isolation type it does
/// not know, and for a declared property that is one of the contract's
/// keys ([`check_declared`]).
fn offer_of(register: &Register) -> Result<Offer, Status> {
    for key in register.properties.keys() {
        check_declared(key)
            .map_err(|e| Status::invalid_argument(format!("executor {}: {e}", register.name)))?;
    }
    // 0: not advertised (an older executor), no limit.
    let advertised = |amount: u64| if amount == 0 { u64::MAX } else { amount };
    let mut offer = Offer {
        properties: register.properties.clone().into_iter().collect(),
        isolation_types: Default::default(),
        capacity: ResourceAmount {
            cpu_millis: advertised(register.cpu_millis),
            memory_bytes: advertised(register.memory_bytes),
            disk_bytes: advertised(register.disk_bytes),
        },
        // Set from the connection and its credential by the caller.
        receives_secrets: false,
        org: Arc::from(""),
    };
    for name in &register.isolation_types {
        let property = [("workload-isolation-type".to_string(), name.clone())];
        let platform = Platform::parse(&PropertySources {
            action: &property,
            ..Default::default()
        })
        .map_err(|e| Status::invalid_argument(format!("executor {}: {e}", register.name)))?;
        offer.isolation_types.extend(platform.isolation);
    }
    if offer.isolation_types.is_empty() {
        offer
            .isolation_types
            .insert(kiln_platform::IsolationType::None);
    }
    Ok(offer)
}

/// Refuses a declared property `key` that names (ignoring ASCII case) a
/// key of `docs/platform-properties.md`: Kiln matches those its own way
/// (`Pool`, `OSFamily`, `Arch` and `workload-isolation-type` through the
/// registration's own fields) or not at all, so the declaration would
/// have no effect on placement.
pub fn check_declared(key: &str) -> Result<(), String> {
    match kiln_platform::known_key_ignoring_case(key) {
        None => Ok(()),
        Some(known) => {
            let instead = match known {
                "Pool" => "register with --pool instead",
                "OSFamily" => "register with --os-family instead",
                "Arch" => "register with --arch instead",
                "workload-isolation-type" => "offer isolation types with --isolation instead",
                _ => "executors declare only keys Kiln does not interpret",
            };
            Err(format!(
                "declared property {key}: {known} is a platform property Kiln interprets \
                 itself, so declaring it would not restrict which actions come here; {instead}"
            ))
        }
    }
}

#[tonic::async_trait]
impl ExecutorService for ExecutorSessions {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<ExecutorMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        if self.transport.client_certificate_required
            && request.peer_certs().is_none_or(|chain| chain.is_empty())
        {
            let peer = request
                .remote_addr()
                .map_or_else(|| "unknown".to_string(), |addr| addr.to_string());
            tracing::warn!(%peer, "executor registration refused: no client certificate");
            return Err(Status::unauthenticated(
                "this Kiln server accepts executors only with a client certificate \
                 signed by its tls.client_ca (kiln executor --tls-cert PEM --tls-key PEM)",
            ));
        }
        let secrets_allowed = secrets_allowed(&self.transport, &request);
        // Registered with an organisation's key: that organisation's own
        // executor, for its `use-self-hosted-executors` actions only.
        let org = Caller::org_of(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.heartbeat_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no registration from the executor"))??;
        let Some(ExecutorMessage {
            kind: Some(ExecutorKind::Register(register)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of a session must be Register",
            ));
        };
        let key = offered_key(&register)?;
        let mut offers = offer_of(&register)?;
        offers.receives_secrets = secrets_allowed;
        offers.org = org;
        let executor_id = uuid::Uuid::new_v4().to_string();
        let (outbound, receiver) = mpsc::channel(64);
        let _ = outbound
            .send(Ok(SchedulerMessage {
                kind: Some(SchedulerKind::Registered(Registered {
                    executor_id: executor_id.clone(),
                })),
            }))
            .await;
        let capacity = Capacity::new(offers.capacity);
        let slots = register.capacity.max(1) as usize;
        let entry = ExecutorEntry::new(
            executor_id.clone(),
            register.name.clone(),
            key.clone(),
            offers.clone(),
            false,
            slots,
            capacity.clone(),
        );
        let queue = self.scheduler.register_executor(entry.clone());
        tracing::info!(executor = %register.name, %key, properties = ?register.properties, isolation_types = ?register.isolation_types, slots = register.capacity, cpu_millis = register.cpu_millis, memory_bytes = register.memory_bytes, disk_bytes = register.disk_bytes, "executor registered");
        let session = Session {
            scheduler: self.scheduler.clone(),
            name: register.name.clone(),
            executor_id: executor_id.clone(),
            capacity,
            offers,
            queue,
            slots: Arc::new(Semaphore::new(slots)),
            entry,
            running: HashMap::new(),
            outbound,
            heartbeat_timeout: self.heartbeat_timeout,
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

/// An action assigned to the session's executor.
struct Running {
    action: Arc<QueuedAction>,
    _slot: OwnedSemaphorePermit,
    /// Its share of the executor's capacity, until it ends or is requeued.
    _reservation: Reservation,
    forward_cancel: tokio::task::JoinHandle<()>,
    /// Past this the executor loses the action (it heartbeats, yet never
    /// finishes it).
    deadline: tokio::time::Instant,
    _counted: RunningOn,
}

/// One connected executor.
struct Session {
    scheduler: Arc<Scheduler>,
    name: String,
    /// Unique per session: what the queue knows this executor by.
    executor_id: String,
    offers: Offer,
    capacity: Arc<Capacity>,
    queue: Arc<PoolQueue>,
    slots: Arc<Semaphore>,
    running: HashMap<String, Running>,
    outbound: mpsc::Sender<Result<SchedulerMessage, Status>>,
    heartbeat_timeout: Duration,
    /// What the scheduler shows of this executor.
    entry: Arc<ExecutorEntry>,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<ExecutorMessage>) {
        let stop = self.scheduler.shutdown_token().clone();
        let why = loop {
            let slots = self.slots.clone();
            let queue = self.queue.clone();
            let offers = &self.offers;
            let capacity = &self.capacity;
            let executor_id = &self.executor_id;
            let next = async {
                let slot = slots.acquire_owned().await.ok()?;
                let (action, reservation) =
                    queue.next(offers, capacity, executor_id, &stop).await?;
                Some((slot, action, reservation))
            };
            let earliest = self.running.values().map(|r| r.deadline).min();
            let overdue = async {
                match earliest {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = overdue => self.take_back_overdue().await,
                assigned = next => {
                    let Some((slot, action, reservation)) = assigned else { break "the scheduler stopped" };
                    if !self.assign(slot, action, reservation).await {
                        break "the stream to the executor closed";
                    }
                }
                message = tokio::time::timeout(self.heartbeat_timeout, inbound.message()) => {
                    match message {
                        Err(_) => break "no heartbeat within the timeout",
                        Ok(Err(_)) | Ok(Ok(None)) => break "the executor's stream ended",
                        Ok(Ok(Some(message))) => self.received(message).await,
                    }
                }
            }
        };
        tracing::info!(executor = %self.name, reason = why, running = self.running.len(), "executor lost");
        // Requeued before unregistering, so the check for actions nobody
        // can run any more sees them.
        for (_, running) in self.running.drain() {
            running.forward_cancel.abort();
            self.scheduler
                .requeue(&running.action, &format!("executor {}: {why}", self.name));
        }
        self.queue.set_warm(&self.executor_id, &[]);
        self.scheduler.unregister_executor(&self.executor_id);
    }

    fn set_warm(&self, keys: &[String]) {
        self.queue.set_warm(&self.executor_id, keys);
        self.entry.warm_runners.store(keys.len(), Ordering::Relaxed);
    }

    /// Sends `action` to the executor; false if the stream is gone (the
    /// action is then requeued).
    async fn assign(
        &mut self,
        slot: OwnedSemaphorePermit,
        action: Arc<QueuedAction>,
        reservation: Reservation,
    ) -> bool {
        // The queue gives this session no action with a secret unless its
        // offer receives secrets (`queue::satisfies`); this guard keeps a
        // secret from ever crossing a plaintext remote connection anyway.
        if !self.offers.receives_secrets && action.platform.registry_credentials.is_some() {
            // The slot and the reservation are freed with this call.
            tracing::warn!(executor = %self.name, operation = %action.name, "not sending a registry credential over plaintext to a non-loopback executor: action failed");
            let message = format!(
                "executor {} is connected over plaintext gRPC from beyond loopback, and this \
                 action carries a registry credential (container-registry-password), which \
                 Kiln sends to executors only over TLS or loopback: serve with --tls-cert and \
                 --tls-key, and connect executors with grpcs://",
                self.name
            );
            let status = rpc::Status {
                code: tonic::Code::FailedPrecondition as i32,
                message,
                details: vec![],
            };
            self.scheduler.finished(&action, None, status, false).await;
            return true;
        }
        let assignment_id = uuid::Uuid::new_v4().to_string();
        self.scheduler.started(&action, &self.name);
        let properties = |pairs: &[(String, String)]| -> Vec<Property> {
            pairs
                .iter()
                .map(|(name, value)| Property {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect()
        };
        let message = SchedulerMessage {
            kind: Some(SchedulerKind::Assignment(Assignment {
                assignment_id: assignment_id.clone(),
                instance_name: action.instance_name.clone(),
                action_hash: action.action_digest.hash.clone(),
                action_size: action.action_digest.size_bytes,
                command_properties: properties(&action.sources.command),
                action_properties: properties(&action.sources.action),
                header_properties: properties(&action.sources.headers),
                org: action.client.org.to_string(),
            })),
        };
        if self.outbound.send(Ok(message)).await.is_err() {
            self.scheduler
                .requeue(&action, &format!("executor {}: stream closed", self.name));
            return false;
        }
        let forward_cancel = {
            let cancel = action.cancel.clone();
            let outbound = self.outbound.clone();
            let assignment_id = assignment_id.clone();
            tokio::spawn(async move {
                cancel.cancelled().await;
                let _ = outbound
                    .send(Ok(SchedulerMessage {
                        kind: Some(SchedulerKind::Cancel(Cancel { assignment_id })),
                    }))
                    .await;
            })
        };
        let deadline = tokio::time::Instant::now() + self.scheduler.assignment_deadline(&action);
        self.running.insert(
            assignment_id,
            Running {
                action,
                _slot: slot,
                _reservation: reservation,
                forward_cancel,
                deadline,
                _counted: RunningOn::new(&self.entry),
            },
        );
        true
    }

    /// Requeues the actions the executor holds past their deadline, and
    /// tells it to stop them.
    async fn take_back_overdue(&mut self) {
        let now = tokio::time::Instant::now();
        let overdue: Vec<String> = self
            .running
            .iter()
            .filter(|(_, running)| running.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for assignment_id in overdue {
            let Some(running) = self.running.remove(&assignment_id) else {
                continue;
            };
            running.forward_cancel.abort();
            let allowed = self.scheduler.assignment_deadline(&running.action);
            tracing::warn!(executor = %self.name, operation = %running.action.name, ?allowed, "the executor did not finish an action in its timeout, grace and margin: requeued");
            let _ = self
                .outbound
                .send(Ok(SchedulerMessage {
                    kind: Some(SchedulerKind::Cancel(Cancel { assignment_id })),
                }))
                .await;
            // Elsewhere: this executor does not get it again while another
            // may take it.
            self.scheduler.requeue_elsewhere(
                &running.action,
                &self.executor_id,
                &format!(
                    "executor {} did not finish it within {allowed:?} (timeout, grace and margin)",
                    self.name
                ),
            );
        }
    }

    async fn received(&mut self, message: ExecutorMessage) {
        self.entry.seen();
        let finished = match message.kind {
            Some(ExecutorKind::Finished(finished)) => finished,
            Some(ExecutorKind::Heartbeat(beat)) => {
                self.set_warm(&beat.warm_runner_keys);
                return;
            }
            _ => return,
        };
        self.set_warm(&finished.warm_runner_keys);
        let Some(running) = self.running.remove(&finished.assignment_id) else {
            tracing::warn!(executor = %self.name, assignment = %finished.assignment_id, "result for an unknown assignment");
            return;
        };
        running.forward_cancel.abort();
        if finished.retry_elsewhere {
            self.scheduler.requeue_elsewhere(
                &running.action,
                &self.executor_id,
                &format!("executor {} could not run it", self.name),
            );
            return;
        }
        let result = (!finished.action_result.is_empty())
            .then(|| reapi::ActionResult::decode(finished.action_result.clone()).ok())
            .flatten();
        let status = rpc::Status::decode(finished.status.clone()).unwrap_or_else(|e| rpc::Status {
            code: tonic::Code::Internal as i32,
            message: format!("executor {} sent an undecodable status: {e}", self.name),
            details: vec![],
        });
        self.scheduler
            .finished(&running.action, result, status, finished.cacheable)
            .await;
    }
}
