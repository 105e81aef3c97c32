//! `kiln serve`: composes the configured store and the REAPI services into
//! one gRPC server, written once here from the typed config.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_auth::{AuthConfig, AuthLayer, Authenticator, ExecutorToken, KeyFile};
use kiln_cas::{
    ActionCacheService, ByteStreamHttp, ByteStreamService, CapabilitiesService, CasHttp,
    CasService, MessageLimit, MessageLimitLayer, Storage, StorageLimits, Tenancy,
};
use kiln_monitor::{Monitor, RpcMetricsLayer, UiSources};
use kiln_proto::executor::executor_service_server::ExecutorServiceServer;
use kiln_proto::longrunning::operations_server::OperationsServer;
use kiln_proto::reapi::action_cache_server::ActionCacheServer;
use kiln_proto::reapi::capabilities_server::CapabilitiesServer;
use kiln_proto::reapi::execution_server::ExecutionServer;
use kiln_scheduler::{
    execution_capabilities, ExecutionService, ExecutorSessions, LocalExecutor, OperationsService,
    Scheduler, SchedulerConfig,
};
use kiln_store::{BlobStore, DiskStore, DiskStoreConfig, Durability, MemoryStore, TieredStore};
use kiln_worker::cas::GrpcTransport;
use kiln_worker::users::ActionUsers;
use kiln_worker::{Isolations, LocalSession, Worker, WorkerConfig};
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;

use crate::config::{Backend, Config, DurabilityMode};

/// Largest gRPC message accepted or sent: a full batch plus framing. A
/// larger request is refused by [`MessageLimit`] (RESOURCE_EXHAUSTED);
/// every service's own tonic limit is the same, as a backstop.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A running server; dropping it without [`RunningServer::stop`] aborts it.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// Whether the gRPC port speaks TLS (`grpcs://`).
    pub tls: bool,
    /// Where the monitoring endpoint (metrics, health, web UI) listens.
    pub monitoring_addr: Option<SocketAddr>,
    monitor: Arc<Monitor>,
    monitoring: Option<Endpoint>,
    health: tonic_health::server::HealthReporter,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    disk: Option<DiskStore>,
    shutdown_grace: Duration,
    scheduler: Option<Arc<Scheduler>>,
    executor: Option<EmbeddedExecutor>,
}

/// How long a stopping server waits for its embedded executor to remove
/// its warm runners (their containers) once its actions have ended: apart
/// from the shutdown grace, which is the actions' own.
const RUNNER_REMOVAL_LIMIT: Duration = Duration::from_secs(60);

/// The embedded executor's task, and word from it when its actions have
/// ended (what is left then is removing its warm runners).
struct EmbeddedExecutor {
    task: tokio::task::JoinHandle<()>,
    actions_ended: oneshot::Receiver<()>,
}

impl RunningServer {
    /// A plaintext gRPC channel to this server over loopback (for tests of
    /// servers without TLS).
    pub async fn connect(&self) -> anyhow::Result<tonic::transport::Channel> {
        let endpoint = tonic::transport::Channel::from_shared(format!("http://{}", self.addr))?;
        endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.addr))
    }

    /// Stops accepting, gives calls in flight up to the shutdown grace to
    /// finish (clients that merely keep a connection open, as Bazel does,
    /// do not hold the stop up), then syncs the store.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.monitor.readiness.set_not_ready("shutting down");
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        // Running actions are stopped first, so their Execute streams end
        // and do not hold the server's stop up.
        if let Some(scheduler) = self.scheduler.take() {
            scheduler.shutdown();
        }
        if let Some(executor) = self.executor.take() {
            if tokio::time::timeout(self.shutdown_grace, executor.actions_ended)
                .await
                .is_err()
            {
                tracing::warn!("actions still running after the shutdown grace");
            } else if tokio::time::timeout(RUNNER_REMOVAL_LIMIT, executor.task)
                .await
                .is_err()
            {
                // Removing warm runner containers takes its own time (a
                // few hundred milliseconds each on a loaded machine), not
                // the actions' grace: cut short, it would leave containers
                // behind.
                tracing::warn!(
                    limit_s = RUNNER_REMOVAL_LIMIT.as_secs(),
                    "warm runners still being removed at the limit; the next start of this \
                     server removes their containers"
                );
            }
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(self.shutdown_grace, &mut self.task).await {
            Ok(joined) => joined.context("server task panicked")??,
            Err(_) => {
                tracing::warn!(
                    grace_ms = self.shutdown_grace.as_millis() as u64,
                    "connections still open after the shutdown grace; closing them"
                );
                self.task.abort();
            }
        }
        // The endpoint and the UI hold the storage (and the scheduler,
        // which holds the metrics that read them): let go of both before
        // the store is synced, so nothing keeps it open after the stop.
        self.monitor.detach();
        if let Some(mut endpoint) = self.monitoring.take() {
            endpoint.0.abort();
            let _ = (&mut endpoint.0).await;
        }
        if let Some(disk) = self.disk.take() {
            // Not fatal: what did not reach the checkpoint is re-verified
            // from the journal at the next start.
            if let Err(e) = tokio::task::spawn_blocking(move || disk.flush()).await? {
                tracing::error!(error = %e, "could not sync the store at shutdown");
            }
        }
        Ok(())
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        // Breaks the scheduler → metrics → UI sources → scheduler cycle.
        self.monitor.detach();
    }
}

/// The monitoring endpoint's task, stopped when the server is.
struct Endpoint(tokio::task::JoinHandle<()>);

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the monitoring endpoint `config` asks for, before anything
/// else, so `/readyz` can say what start-up is waiting for.
async fn start_monitoring(
    config: &Config,
    monitor: &Arc<Monitor>,
    open: bool,
) -> anyhow::Result<Option<(SocketAddr, Endpoint)>> {
    let Some(address) = crate::config::monitoring_address(&config.monitoring_listen)? else {
        return Ok(None);
    };
    let listener = kiln_monitor::http::bind(address)
        .await
        .context("set monitoring_listen (--monitoring-listen) to a free address, or `off`")?;
    let bound = listener.local_addr()?;
    if open && !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the monitoring endpoint (web UI, metrics) listens beyond loopback and no API key exists yet: anyone who reaches it sees every operation's command line");
    }
    Ok(Some((
        bound,
        Endpoint(kiln_monitor::http::serve(listener, monitor.clone())),
    )))
}

/// Builds the store the config describes. Returns the disk store too, so
/// the caller can sync it at shutdown.
pub async fn open_store(
    config: &Config,
) -> anyhow::Result<(Arc<dyn BlobStore>, Option<DiskStore>)> {
    let storage = &config.storage;
    let max_size = storage.max_size.bytes();
    match storage.backend {
        Backend::Memory => Ok((Arc::new(MemoryStore::new(max_size)), None)),
        Backend::Disk => {
            let path = config.data_dir.join("cas");
            let mut disk_config = DiskStoreConfig::new(&path, max_size);
            disk_config.max_packed_blob_bytes = storage.max_packed_blob.bytes();
            disk_config.recent_blob_bytes = storage.recent_blob_memory.bytes();
            disk_config.sync_interval = storage.sync_interval.get().max(Duration::from_millis(1));
            disk_config.durability = match storage.durability {
                DurabilityMode::GroupCommit => Durability::GroupCommit,
                DurabilityMode::Sync => Durability::Sync,
            };
            let (disk, report) = tokio::task::spawn_blocking(move || DiskStore::open(disk_config))
                .await?
                .with_context(|| format!("opening the store in {}", path.display()))?;
            tracing::info!(
                path = %path.display(),
                blobs = report.blobs,
                bytes = report.bytes,
                reverified = report.verified_after_checkpoint,
                dropped_invalid = report.dropped_invalid,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "disk store opened"
            );
            let cache_size = storage.memory_cache_size.bytes();
            let store: Arc<dyn BlobStore> = if cache_size == 0 {
                Arc::new(disk.clone())
            } else {
                Arc::new(TieredStore::new(
                    MemoryStore::new(cache_size),
                    Arc::new(disk.clone()),
                    storage.memory_cache_max_blob.bytes(),
                ))
            };
            Ok((store, Some(disk)))
        }
    }
}

/// Who may call: API keys from the data directory's key file, and the
/// executor token. A non-loopback address with no key made yet is refused
/// unless the config allows it (checked before anything is bound).
fn authenticator(
    config: &Config,
    executor_token: Option<ExecutorToken>,
) -> anyhow::Result<Arc<Authenticator>> {
    let key_file = KeyFile::in_dir(&config.data_dir);
    let loopback = config.listen.ip().is_loopback();
    let authenticator = Authenticator::new(AuthConfig {
        key_file: key_file.clone(),
        executor_token,
        open_without_keys: loopback || config.allow_unauthenticated,
    })
    .context("reading the API keys")?;
    if authenticator.keys_configured() || loopback || config.allow_unauthenticated {
        return Ok(authenticator);
    }
    anyhow::bail!(
        "refusing to serve {} without authentication: no API key exists in {}. Make one \
         (kiln keys create --data-dir {} --org NAME), listen on a loopback address, or pass \
         --allow-unauthenticated",
        config.listen,
        key_file.path().display(),
        config.data_dir.display()
    )
}

/// The warning a non-loopback server open to anyone gives, while it is.
fn unauthenticated_warning(listen: SocketAddr, authenticator: &Authenticator) -> Option<String> {
    (!listen.ip().is_loopback() && !authenticator.requires_credentials()).then(|| {
        format!(
            "serving {} without authentication (--allow-unauthenticated): anyone who reaches \
             it may read and write the cache and run actions; make an API key with kiln keys \
             create to require one",
            listen
        )
    })
}

/// Starts serving; returns once the listener is bound.
pub async fn start(config: &Config) -> anyhow::Result<RunningServer> {
    // Before anything else: a bad certificate stops the start at once.
    let tls = crate::tls::server_config(&config.tls.cert, &config.tls.key, &config.tls.client_ca)?;
    // Refusals come before anything is bound.
    let executor_token = match config.execution.executor_token_file.as_str() {
        "" => None,
        path => Some(ExecutorToken::read(Path::new(path)).map_err(anyhow::Error::msg)?),
    };
    let authenticator = authenticator(config, executor_token.clone())?;
    let monitor = Monitor::for_server(config.data_dir.clone());
    monitor.require_auth(authenticator.clone());
    let monitoring = start_monitoring(config, &monitor, !authenticator.keys_configured()).await?;
    let (store, disk) = open_store(config).await?;
    let executor_cache_bytes = config.execution.executor_cache_size.bytes();
    let limits = StorageLimits {
        max_batch_total_size_bytes: config.storage.max_batch_total_size.bytes(),
        idle_timeout: config.storage.bytestream_idle_timeout.nonzero(),
        ..StorageLimits::default()
    };
    let mut storage = Storage::new(store.clone(), limits.clone());
    if disk.is_some() {
        // Beside the store it describes: the two go together.
        let file = config.data_dir.join("cas").join("organisations");
        let tenancy = Tenancy::open(file, &*store)
            .await
            .context("reading which organisations share the store")?;
        storage = storage.with_tenancy(tenancy);
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    let open_to_the_network = unauthenticated_warning(config.listen, &authenticator);
    if let Some(warning) = &open_to_the_network {
        tracing::warn!("{warning}");
        let authenticator = authenticator.clone();
        let listen = config.listen;
        monitor.readiness.set_warning_source(Box::new(move || {
            unauthenticated_warning(listen, &authenticator)
        }));
    }
    authenticator.watch();
    if config.execution.enabled && executor_token.is_none() && open_to_the_network.is_some() {
        tracing::warn!(
            listen = %config.listen,
            "any process that reaches this address can register as an executor and receive actions: set execution.executor_token_file"
        );
    }

    let transport = kiln_scheduler::SessionTransport {
        encrypted: tls.is_some(),
        client_certificate_required: !config.tls.client_ca.is_empty(),
    };

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    // Small RPCs must not wait for Nagle or delayed ACKs.
    let incoming = crate::connections::limit(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        config.max_connections,
    );

    let scheduler = config.execution.enabled.then(|| {
        Scheduler::new(
            storage.clone(),
            SchedulerConfig {
                default_pool: config.execution.pool.clone(),
                unmatched_grace: config.execution.unmatched_grace.get(),
                max_queued_executions: config.execution.max_queued_executions.max(1),
                max_action_timeout: config
                    .execution
                    .max_action_timeout
                    .get()
                    .max(Duration::from_secs(1)),
                assignment_margin: config.execution.assignment_margin.get(),
                max_termination_grace: config.execution.max_termination_grace.get(),
                orphan_grace: config.execution.orphan_grace.nonzero(),
                max_attempts: config.execution.max_attempts.max(1),
                warm_runner_wait: config.execution.warm_runner_wait.get(),
                default_action_resources: config.execution.default_action_resources(),
                ..SchedulerConfig::default()
            },
        )
    });

    // With the endpoint off nothing reads event metrics: they are not
    // observed at all (the CAS counters stay, one relaxed add each).
    let observed = monitoring.is_some();
    if let (Some(scheduler), true) = (&scheduler, observed) {
        scheduler.set_observer(monitor.metrics.clone());
    }
    monitor.attach(UiSources {
        storage: storage.clone(),
        scheduler: scheduler.clone(),
    });

    // The storage services the network serves, built once: the embedded
    // executor calls these same objects in-process (same decoding and
    // message-size limits), not over a loopback connection.
    let capabilities = CapabilitiesServer::new(CapabilitiesService::new(
        limits,
        scheduler.as_ref().map(|_| execution_capabilities()),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // The batch calls framed without tonic's copies of the blob data.
    let cas = CasHttp::new(CasService::new(storage.clone()), MAX_MESSAGE_BYTES);
    // Write and Read framed without tonic's copies of the blob data.
    let byte_stream =
        ByteStreamHttp::new(ByteStreamService::new(storage.clone()), MAX_MESSAGE_BYTES);
    let in_process = MessageLimit::new(
        tonic::service::Routes::new(capabilities.clone())
            .add_service(cas.clone())
            .add_service(byte_stream.clone())
            .prepare(),
        MAX_MESSAGE_BYTES,
    );

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder
            .tls_config(tls.clone())
            .context("TLS settings (tls.cert, tls.key)")?;
    }
    let router = builder
        .initial_stream_window_size(Some(16 * 1024 * 1024))
        .initial_connection_window_size(Some(64 * 1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(config.max_streams_per_connection.max(1)))
        .layer(tower::util::option_layer(
            observed.then(|| RpcMetricsLayer::new(monitor.metrics.clone())),
        ))
        .layer(AuthLayer::new(authenticator))
        .layer(MessageLimitLayer::new(MAX_MESSAGE_BYTES))
        .add_service(health_service)
        .add_service(capabilities)
        .add_service(cas)
        .add_service(byte_stream)
        .add_service(
            ActionCacheServer::new(ActionCacheService::new(storage))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_optional_service(scheduler.clone().map(|scheduler| {
            ExecutionServer::new(ExecutionService::new(scheduler))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        }))
        .add_optional_service(scheduler.clone().map(|scheduler| {
            OperationsServer::new(OperationsService::new(scheduler))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        }))
        .add_optional_service(scheduler.clone().map(|scheduler| {
            ExecutorServiceServer::new(
                ExecutorSessions::new(
                    scheduler,
                    config
                        .execution
                        .executor_heartbeat_timeout
                        .get()
                        .max(Duration::from_millis(1)),
                )
                .with_transport(transport),
            )
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
        }));

    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .context("gRPC server failed")
    });
    let executor = match &scheduler {
        Some(scheduler) if config.execution.embedded_executor => {
            let owner = crate::isolation::container_owner(true, &config.data_dir);
            let action_users = config
                .execution
                .isolation
                .resolve_action_users(config.execution.effective_concurrency())?;
            let work_root = crate::config::work_root(&config.data_dir.join("execution"));
            let isolations = crate::isolation::offered(
                &config.execution.isolation,
                &owner,
                action_users,
                &work_root,
            )
            .await?;
            Some(start_embedded_executor(
                config,
                scheduler.clone(),
                GrpcTransport::from_service(in_process),
                isolations,
                executor_cache_bytes,
                action_users,
            )?)
        }
        _ => None,
    };
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    monitor.readiness.set_ready();
    let (monitoring_addr, monitoring) = match monitoring {
        Some((addr, endpoint)) => (Some(addr), Some(endpoint)),
        None => (None, None),
    };
    Ok(RunningServer {
        addr,
        tls: tls.is_some(),
        monitoring_addr,
        monitor,
        monitoring,
        health,
        stop: Some(stop),
        task,
        disk,
        shutdown_grace: config.shutdown_grace.get(),
        scheduler,
        executor,
    })
}

/// Registers the embedded executor in its pool now (so actions are
/// accepted at once) and starts it once its worker has read this server's
/// capabilities. Its worker reaches the CAS through `transport`: this
/// server's own CAS, ByteStream and Capabilities services, called
/// in-process (no loopback connection, no HTTP/2 framing).
fn start_embedded_executor(
    config: &Config,
    scheduler: Arc<Scheduler>,
    transport: GrpcTransport,
    isolations: Isolations,
    executor_cache_bytes: u64,
    action_users: ActionUsers,
) -> anyhow::Result<EmbeddedExecutor> {
    let execution = &config.execution;
    let root = config.data_dir.join("execution");
    let executor = LocalExecutor::register(
        scheduler,
        execution.pool.clone(),
        execution.effective_resources(&root),
        &isolations.names(),
        isolations.properties(),
        execution.effective_concurrency(),
    );
    let session = LocalSession::new(executor);
    let mut worker_config = WorkerConfig::new(crate::config::work_root(&root), root.join("cache"));
    worker_config.worker_name = format!("kiln-embedded/{}", execution.pool);
    worker_config.max_timeout = execution
        .max_action_timeout
        .get()
        .max(Duration::from_secs(1));
    worker_config.max_grace = execution.max_termination_grace.get();
    worker_config.cache_max_bytes = Some(executor_cache_bytes).filter(|&b| b > 0);
    worker_config.action_users = action_users;
    execution.isolation.apply_to(
        &mut worker_config,
        execution.effective_resources(&root).memory_bytes,
    )?;
    worker_config.input_limits = execution.inputs.limits();
    if let Some(user) = action_users.any() {
        // Checked here, not only by the worker, so a server whose actions
        // could not start fails to start itself, saying why.
        std::fs::create_dir_all(&worker_config.work_root)
            .with_context(|| format!("creating {}", worker_config.work_root.display()))?;
        kiln_worker::workspace::check_reachable(&worker_config.work_root, user)?;
    }
    crate::isolation::log_action_users(action_users);
    let concurrency = execution.effective_concurrency();
    let (ended, actions_ended) = oneshot::channel();
    let task = tokio::spawn(async move {
        match Worker::new(transport, worker_config, isolations).await {
            Ok(worker) => {
                let worker = Arc::new(worker);
                session.run(worker.clone(), concurrency).await;
                let _ = ended.send(());
                worker.discard_runners().await;
            }
            Err(e) => tracing::error!(error = %e, "the embedded worker could not start"),
        }
    });
    Ok(EmbeddedExecutor {
        task,
        actions_ended,
    })
}
