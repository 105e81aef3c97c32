//! The executor process's side of Kiln's executor protocol: `kiln
//! executor` registers with a remote scheduler over one stream
//! ([`RemoteSession`]), heartbeats, runs the actions it is assigned with a
//! [`Worker`] and reports their results.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::{CancellationToken, Worker};
use kiln_platform::{Platform, PropertySources};
use kiln_proto::executor::executor_message::Kind as ExecutorKind;
use kiln_proto::executor::executor_service_client::ExecutorServiceClient;
use kiln_proto::executor::scheduler_message::Kind as SchedulerKind;
use kiln_proto::executor::{ActionFinished, Assignment, ExecutorMessage, Heartbeat, Register};
use kiln_proto::reapi;
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Streaming;

use kiln_auth::Credential;
use kiln_proto::status::to_rpc as to_rpc_status;
use kiln_scheduler::{ResourceAmount, SchedulerError};

use crate::local::{finished, run_action, RunRequest};

/// What an executor process offers.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Reported as `ExecutedActionMetadata.worker` (the worker's name).
    pub name: String,
    pub pool: String,
    pub os_family: String,
    pub arch: String,
    /// Properties this executor declares (`KEY=VALUE`): actions carrying
    /// KEY come here only with the same VALUE.
    pub properties: std::collections::BTreeMap<String, String>,
    /// The `workload-isolation-type`s it offers, default first.
    pub isolation_types: Vec<String>,
    /// Actions run at once.
    pub capacity: u32,
    /// CPU and memory its running actions may reserve in total (usually
    /// [`ResourceAmount::of_host`]).
    pub resources: ResourceAmount,
    pub heartbeat_interval: Duration,
    /// Presented at registration: the executor token or an API key.
    pub credential: Option<Credential>,
}

/// A registered session with a scheduler.
pub struct RemoteSession {
    config: SessionConfig,
    outbound: mpsc::Sender<ExecutorMessage>,
    inbound: Streaming<kiln_proto::executor::SchedulerMessage>,
}

impl RemoteSession {
    /// Opens the session and registers; returns once the scheduler has
    /// accepted the registration.
    pub async fn connect(
        channel: Channel,
        config: SessionConfig,
    ) -> Result<RemoteSession, SchedulerError> {
        let (outbound, receiver) = mpsc::channel(64);
        let register = ExecutorMessage {
            kind: Some(ExecutorKind::Register(Register {
                name: config.name.clone(),
                pool: config.pool.clone(),
                os_family: config.os_family.clone(),
                arch: config.arch.clone(),
                isolation_types: config.isolation_types.clone(),
                properties: config.properties.clone().into_iter().collect(),
                capacity: config.capacity,
                cpu_millis: config.resources.cpu_millis,
                memory_bytes: config.resources.memory_bytes,
                disk_bytes: config.resources.disk_bytes,
            })),
        };
        outbound
            .send(register)
            .await
            .map_err(|_| SchedulerError::ShuttingDown)?;
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
        if let Some(credential) = &config.credential {
            let (name, value) = credential.metadata();
            request.metadata_mut().insert(name, value);
        }
        let mut inbound = ExecutorServiceClient::new(channel)
            .session(request)
            .await
            .map_err(|status| registration_failed("opening the session", status))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(kiln_proto::executor::SchedulerMessage {
                kind: Some(SchedulerKind::Registered(_)),
            })) => Ok(RemoteSession {
                config,
                outbound,
                inbound,
            }),
            Ok(_) => Err(SchedulerError::Session(
                "the scheduler did not confirm the registration".into(),
            )),
            Err(status) => Err(registration_failed("registering", status)),
        }
    }

    /// Runs assignments until the scheduler ends the session or `stop`
    /// fires. Then the session is dropped at once (the scheduler requeues
    /// what ran here), running actions are cancelled, and this returns
    /// once they have stopped (each within its termination grace period):
    /// an executor never registers again, or exits, with actions of a lost
    /// session still running.
    pub async fn run(
        mut self,
        worker: Arc<Worker>,
        stop: CancellationToken,
    ) -> Result<(), SchedulerError> {
        let mut running: HashMap<String, CancellationToken> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        let (done_sender, mut done) = mpsc::channel::<(String, ActionFinished)>(64);
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        let result = loop {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = heartbeat.tick() => {
                    let beat = Heartbeat { warm_runner_keys: worker.warm_runner_keys() };
                    let beat = ExecutorMessage { kind: Some(ExecutorKind::Heartbeat(beat)) };
                    if self.outbound.send(beat).await.is_err() {
                        break Err(SchedulerError::Session("the session closed".into()));
                    }
                }
                Some((id, mut finished)) = done.recv() => {
                    running.remove(&id);
                    finished.warm_runner_keys = worker.warm_runner_keys();
                    let message = ExecutorMessage { kind: Some(ExecutorKind::Finished(finished)) };
                    if self.outbound.send(message).await.is_err() {
                        break Err(SchedulerError::Session("the session closed".into()));
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                message = self.inbound.message() => match message {
                    Ok(Some(message)) => match message.kind {
                        Some(SchedulerKind::Assignment(assignment)) => {
                            let cancel = CancellationToken::new();
                            running.insert(assignment.assignment_id.clone(), cancel.clone());
                            let worker = worker.clone();
                            let done = done_sender.clone();
                            tasks.spawn(async move {
                                let id = assignment.assignment_id.clone();
                                let finished = run_assignment(worker, assignment, cancel).await;
                                let _ = done.send((id, finished)).await;
                            });
                        }
                        Some(SchedulerKind::Cancel(cancel)) => {
                            if let Some(token) = running.get(&cancel.assignment_id) {
                                token.cancel();
                            }
                        }
                        _ => {}
                    },
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(SchedulerError::Session(format!("session: {status}"))),
                },
            }
        };
        drop(self);
        for token in running.values() {
            token.cancel();
        }
        // Finished actions have nobody to report to any more.
        drop(done);
        if !tasks.is_empty() {
            tracing::info!(
                actions = tasks.len(),
                "waiting for the running actions of the ended session to stop"
            );
        }
        while tasks.join_next().await.is_some() {}
        result
    }
}

/// A failed registration: refused for good when the scheduler rejected
/// what the executor sent, a session failure (worth retrying) otherwise.
fn registration_failed(step: &str, status: tonic::Status) -> SchedulerError {
    match status.code() {
        tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied
        | tonic::Code::InvalidArgument => {
            SchedulerError::Refused(format!("{step}: {}", status.message()))
        }
        _ => SchedulerError::Session(format!("{step}: {status}")),
    }
}

/// Runs one assignment; every failure becomes the reported status.
async fn run_assignment(
    worker: Arc<Worker>,
    assignment: Assignment,
    cancel: CancellationToken,
) -> ActionFinished {
    let pairs = |properties: &[kiln_proto::executor::Property]| -> Vec<(String, String)> {
        properties
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect()
    };
    let (command, action, headers) = (
        pairs(&assignment.command_properties),
        pairs(&assignment.action_properties),
        pairs(&assignment.header_properties),
    );
    let platform = match Platform::parse(&PropertySources {
        command: &command,
        action: &action,
        headers: &headers,
    }) {
        Ok(platform) => platform,
        Err(e) => {
            return ActionFinished {
                assignment_id: assignment.assignment_id,
                status: to_rpc_status(tonic::Status::invalid_argument(e.to_string()))
                    .encode_to_vec()
                    .into(),
                ..Default::default()
            }
        }
    };
    let action = RunRequest {
        org: assignment.org,
        instance_name: assignment.instance_name,
        action_digest: reapi::Digest {
            hash: assignment.action_hash,
            size_bytes: assignment.action_size,
        },
        platform,
        cancel,
    };
    let outcome = run_action(worker, action).await;
    let retry_elsewhere = matches!(&outcome, Err(error) if error.is_retryable_elsewhere());
    let finished = finished(outcome);
    ActionFinished {
        assignment_id: assignment.assignment_id,
        action_result: finished
            .result
            .map(|result| result.encode_to_vec().into())
            .unwrap_or_default(),
        status: finished.status.encode_to_vec().into(),
        cacheable: finished.cacheable,
        retry_elsewhere,
        ..Default::default()
    }
}
