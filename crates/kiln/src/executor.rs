//! `kiln executor`: an executor as its own process. It reaches the CAS and
//! the scheduler on the same server (`--scheduler grpc://HOST:PORT`),
//! registers in one pool and runs what it is assigned.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_scheduler::SchedulerError;
use kiln_worker::cas::GrpcTransport;
use kiln_worker::{CancellationToken, RunError, Worker, WorkerConfig};
use kiln_worker::{RemoteSession, SessionConfig};
use tonic::transport::Channel;

/// How an executor process runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// `grpc://HOST:PORT` (or `grpcs://` for TLS) of the Kiln server
    /// (scheduler and CAS).
    pub scheduler: String,
    /// The CA to verify a `grpcs://` server with, and this executor's
    /// client certificate.
    pub tls: crate::tls::ClientTlsArgs,
    pub pool: String,
    /// Reported as `ExecutedActionMetadata.worker`.
    pub name: String,
    pub capacity: u32,
    /// CPU and memory running actions may reserve in total.
    pub resources: kiln_scheduler::ResourceAmount,
    /// Workspaces and the local file cache go here.
    pub work_dir: PathBuf,
    pub os_family: String,
    pub arch: String,
    /// Declared `KEY=VALUE` properties.
    pub properties: std::collections::BTreeMap<String, String>,
    pub max_action_timeout: Duration,
    /// The grace (SIGTERM to SIGKILL) of an action is capped at this.
    pub max_termination_grace: Duration,
    pub heartbeat_interval: Duration,
    /// Most bytes the file cache keeps (0 = unlimited).
    pub cache_max_bytes: u64,
    /// Which isolation backends to offer, and their settings.
    pub isolation: crate::isolation::IsolationSettings,
    /// Presented on every call to the server (registration and CAS): the
    /// executor token or an API key with `register-executor`.
    pub credential: Option<kiln_auth::Credential>,
    /// How large an action's input tree may be.
    pub input_limits: kiln_worker::inputs::InputLimits,
    /// Where to serve this executor's metrics and health, if anywhere.
    pub monitoring_listen: Option<std::net::SocketAddr>,
}

/// First and longest wait between attempts to reach the scheduler.
/// This executor's monitoring endpoint: its worker's gauges, and ready
/// while it holds a session with the scheduler.
struct ExecutorMonitor {
    readiness: Arc<kiln_monitor::Readiness>,
    worker: Arc<parking_lot::Mutex<Option<Arc<Worker>>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ExecutorMonitor {
    async fn start(address: Option<std::net::SocketAddr>) -> anyhow::Result<ExecutorMonitor> {
        let readiness = kiln_monitor::Readiness::new("not registered with the scheduler yet");
        let worker: Arc<parking_lot::Mutex<Option<Arc<Worker>>>> = Arc::default();
        let Some(address) = address else {
            return Ok(ExecutorMonitor {
                readiness,
                worker,
                task: None,
            });
        };
        let gauge = |read: fn(&Worker) -> i64| {
            let worker = worker.clone();
            Box::new(move || worker.lock().as_ref().map(|w| read(w)))
                as Box<dyn Fn() -> Option<i64> + Send + Sync>
        };
        let metrics =
            kiln_monitor::Metrics::new().with_collector(kiln_monitor::metrics::GaugeFns(vec![
                (
                    "kiln_executor_warm_runners",
                    "Warm runners this executor holds",
                    gauge(|w| w.warm_runner_keys().len() as i64),
                ),
                (
                    "kiln_executor_file_cache_bytes",
                    "Bytes this executor's input file cache holds",
                    gauge(|w| w.cache().stats().bytes_held as i64),
                ),
                (
                    "kiln_executor_file_cache_filled_bytes",
                    "Bytes fetched from the CAS into the input file cache since start-up",
                    gauge(|w| w.cache().stats().bytes_filled as i64),
                ),
            ]));
        let listener = kiln_monitor::http::bind(address).await?;
        let bound = listener.local_addr()?;
        let monitor = kiln_monitor::Monitor::for_metrics(metrics, readiness.clone());
        let task = kiln_monitor::http::serve(listener, monitor);
        println!("listening http://{bound} (/metrics, /healthz, /readyz)");
        Ok(ExecutorMonitor {
            readiness,
            worker,
            task: Some(task),
        })
    }
}

impl Drop for ExecutorMonitor {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Connects, registers and runs assignments until `stop` fires. A
/// scheduler that cannot be reached, or whose session ends (a restart, a
/// dropped connection), is retried with a growing wait, so a fleet of
/// executors outlives a restart of its server; running actions are
/// cancelled when their session is lost (the server has requeued them).
/// A registration the scheduler refuses (e.g. without its executor token)
/// ends the executor with that error.
pub async fn run(options: ExecutorOptions, stop: CancellationToken) -> anyhow::Result<()> {
    // A lazy channel connects on first use and again after a failure.
    let channel: Channel = crate::tls::endpoint(&options.scheduler, &options.tls)
        .context("--scheduler")?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    // The worker's CAS calls carry the credential too: a server with keys
    // answers nothing without one.
    let cas_transport = {
        let credential = options.credential.clone();
        GrpcTransport::from_service(tower::util::MapRequest::new(
            channel.clone(),
            move |mut request: http::Request<tonic::body::Body>| {
                if let Some(credential) = &credential {
                    credential.add_to(request.headers_mut());
                }
                request
            },
        ))
    };
    let owner = crate::isolation::container_owner(false, &options.work_dir);
    let action_users = options
        .isolation
        .resolve_action_users(options.capacity.max(1) as usize)?;
    let work_root = crate::config::work_root(&options.work_dir);
    let isolations =
        crate::isolation::offered(&options.isolation, &owner, action_users, &work_root).await?;
    let isolation_types = isolations.names().iter().map(|n| n.to_string()).collect();
    let mut worker_config = WorkerConfig::new(work_root, options.work_dir.join("cache"));
    worker_config.worker_name = options.name.clone();
    worker_config.max_timeout = options.max_action_timeout;
    worker_config.max_grace = options.max_termination_grace;
    worker_config.cache_max_bytes = Some(options.cache_max_bytes).filter(|&b| b > 0);
    worker_config.action_users = action_users;
    crate::isolation::log_action_users(action_users);
    options
        .isolation
        .apply_to(&mut worker_config, options.resources.memory_bytes)?;
    worker_config.input_limits = options.input_limits;
    let session_config = SessionConfig {
        name: options.name.clone(),
        pool: options.pool.clone(),
        os_family: options.os_family.clone(),
        arch: options.arch.clone(),
        // What the backends declare of themselves (`vmm`), under what the
        // operator configured.
        properties: isolations
            .properties()
            .into_iter()
            .chain(options.properties.clone())
            .collect(),
        isolation_types,
        capacity: options.capacity.max(1),
        resources: options.resources,
        heartbeat_interval: options.heartbeat_interval,
        credential: options.credential.clone(),
    };

    let monitor = ExecutorMonitor::start(options.monitoring_listen).await?;
    let mut worker: Option<Arc<Worker>> = None;
    let mut retry = Retry::new(&options.name);
    loop {
        let attempt = async {
            let worker = match &worker {
                Some(worker) => worker.clone(),
                // The worker asks the server for its capabilities once;
                // only that call is worth retrying (opening the local
                // cache and work directory fails the same way again).
                None => {
                    match Worker::new(
                        cas_transport.clone(),
                        worker_config.clone(),
                        isolations.clone(),
                    )
                    .await
                    {
                        Ok(worker) => Arc::new(worker),
                        // The server refused the credential: trying again
                        // cannot help.
                        Err(RunError::Cas { context, status })
                            if matches!(
                                status.code(),
                                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                            ) =>
                        {
                            return Err(Attempt::Fatal(anyhow::anyhow!(
                                "starting the worker: {context}: the server refused this \
                                 executor's credential: {}",
                                status.message()
                            )))
                        }
                        Err(e @ RunError::Cas { .. }) => {
                            return Err(Attempt::Retry(
                                anyhow::Error::new(e).context("starting the worker"),
                            ))
                        }
                        Err(e) => {
                            return Err(Attempt::Fatal(
                                anyhow::Error::new(e).context("starting the worker"),
                            ))
                        }
                    }
                }
            };
            match RemoteSession::connect(channel.clone(), session_config.clone()).await {
                Ok(session) => Ok((worker, session)),
                Err(e @ SchedulerError::Refused(_)) => Err(Attempt::Fatal(
                    anyhow::Error::new(e)
                        .context(format!("registering with {}", options.scheduler)),
                )),
                Err(e) => Err(Attempt::Retry(e.into())),
            }
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => break,
            outcome = attempt => outcome,
        };
        match outcome {
            Ok((ready, session)) => {
                worker = Some(ready.clone());
                *monitor.worker.lock() = Some(ready.clone());
                monitor.readiness.set_ready();
                retry.reset();
                tracing::info!(name = %options.name, pool = %options.pool, scheduler = %options.scheduler, "executor registered");
                let ended = session.run(ready, stop.clone()).await;
                monitor
                    .readiness
                    .set_not_ready("lost the scheduler session; registering again");
                if stop.is_cancelled() {
                    break;
                }
                match ended {
                    Ok(()) => {
                        tracing::warn!(scheduler = %options.scheduler, "the scheduler ended the session; registering again")
                    }
                    Err(e) => {
                        tracing::warn!(scheduler = %options.scheduler, error = %e, "lost the scheduler session; registering again")
                    }
                }
            }
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(e)) => {
                let wait = retry.next_wait();
                tracing::warn!(
                    scheduler = %options.scheduler,
                    error = format!("{e:#}"),
                    retry_in_ms = wait.as_millis() as u64,
                    "cannot register with the scheduler; retrying"
                );
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    if let Some(worker) = worker {
        worker.discard_runners().await;
    }
    Ok(())
}

/// Why an attempt to start serving failed.
enum Attempt {
    /// The scheduler or CAS could not be reached, or the session failed.
    Retry(anyhow::Error),
    /// Retrying cannot help: a refused registration, a local failure.
    Fatal(anyhow::Error),
}

/// Waits between attempts: doubling from [`RETRY_FIRST`] up to
/// [`RETRY_MAX`], each shortened by up to a quarter, differently per
/// executor, so a fleet does not reconnect in lockstep after a restart.
struct Retry {
    next: Duration,
    spread: u64,
}

impl Retry {
    fn new(name: &str) -> Retry {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (name, std::process::id()).hash(&mut hasher);
        Retry {
            next: RETRY_FIRST,
            spread: hasher.finish(),
        }
    }

    fn reset(&mut self) {
        self.next = RETRY_FIRST;
    }

    fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        self.spread = self.spread.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15;
        let quarter = wait.as_millis() as u64 / 4;
        wait - Duration::from_millis(self.spread % (quarter + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_waits_grow_to_the_cap_and_start_over_after_a_reset() {
        let mut retry = Retry::new("e1");
        let waits: Vec<Duration> = (0..8).map(|_| retry.next_wait()).collect();
        for (wait, full) in waits
            .iter()
            .zip([250u64, 500, 1000, 2000, 4000, 8000, 10_000, 10_000])
        {
            let full = Duration::from_millis(full);
            assert!(
                *wait <= full && *wait >= full * 3 / 4,
                "{wait:?} against {full:?}"
            );
        }
        retry.reset();
        assert!(retry.next_wait() <= RETRY_FIRST);
    }
}
