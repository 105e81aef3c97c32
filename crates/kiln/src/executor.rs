//! `kiln executor`: an executor as its own process. It reaches the CAS and
//! the scheduler on the same server (`--scheduler grpc://HOST:PORT`),
//! registers in one pool and runs what it is assigned.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_executor::{ActionRunner, CancellationToken, RunnerConfig};
use kiln_scheduler::{Worker, WorkerConfig};
use tonic::transport::Channel;

/// How an executor process runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// `grpc://HOST:PORT` of the Kiln server (scheduler and CAS).
    pub scheduler: String,
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
    pub heartbeat_interval: Duration,
    /// Most bytes the file cache keeps (0 = unlimited).
    pub cache_max_bytes: u64,
    /// Which isolation backends to offer, and their settings.
    pub isolation: crate::isolation::IsolationSettings,
    /// Presented at registration when the scheduler requires it.
    pub token: Option<kiln_scheduler::ExecutorToken>,
}

/// Connects, registers and runs assignments until `stop` fires or the
/// scheduler ends the session.
pub async fn run(options: ExecutorOptions, stop: CancellationToken) -> anyhow::Result<()> {
    let url = options
        .scheduler
        .strip_prefix("grpc://")
        .map(|rest| format!("http://{rest}"))
        .unwrap_or_else(|| options.scheduler.clone());
    let channel = Channel::from_shared(url.clone())
        .with_context(|| format!("scheduler address {}", options.scheduler))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", options.scheduler))?;
    let owner = format!("kiln-executor:{}", options.work_dir.display());
    let isolations = crate::isolation::offered(&options.isolation, &owner).await;
    let isolation_types = isolations.names().iter().map(|n| n.to_string()).collect();
    let mut runner_config = RunnerConfig::new(
        options.work_dir.join("work"),
        options.work_dir.join("cache"),
    );
    runner_config.worker_name = options.name.clone();
    runner_config.max_timeout = options.max_action_timeout;
    runner_config.cache_max_bytes = Some(options.cache_max_bytes).filter(|&b| b > 0);
    let runner = ActionRunner::new(channel.clone(), runner_config, isolations)
        .await
        .context("starting the action runner")?;
    let worker = Worker::connect(
        channel,
        WorkerConfig {
            name: options.name.clone(),
            pool: options.pool.clone(),
            os_family: options.os_family.clone(),
            arch: options.arch.clone(),
            properties: options.properties.clone(),
            isolation_types,
            capacity: options.capacity.max(1),
            resources: options.resources,
            heartbeat_interval: options.heartbeat_interval,
            token: options.token.clone(),
        },
    )
    .await
    .context("registering with the scheduler")?;
    tracing::info!(name = %options.name, pool = %options.pool, scheduler = %options.scheduler, "executor registered");
    worker.run(Arc::new(runner), stop).await?;
    Ok(())
}
