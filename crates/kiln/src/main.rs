//! `kiln`: one binary for the whole platform. `kiln serve` runs every
//! service on one machine with embedded defaults.
#![forbid(unsafe_code)]

mod bench;
mod keys;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kiln::config::{Backend, Config, DurabilityMode, LogFormat};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: self-hosted remote build execution (REAPI v2)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (CAS, Action Cache, ByteStream, Capabilities, Execution).
    Serve(Box<ServeArgs>),
    /// Run an executor process that takes actions from a Kiln scheduler.
    Executor(Box<ExecutorArgs>),
    /// Make, list and revoke API keys (while the server runs).
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Benchmarks against a running server.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the default configuration as TOML, with every setting.
    PrintDefault,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// ByteStream and batch CAS throughput, next to the machine's SHA-256 rate.
    Cas(Box<bench::cas::CasBenchArgs>),
    /// Execute latency and throughput with trivial actions (never cache hits).
    Exec(Box<bench::exec::ExecBenchArgs>),
    /// Per-action overhead of each isolation type, next to the raw tools.
    Isolation(bench::isolation::IsolationBenchArgs),
}

#[derive(clap::Args)]
struct ExecutorArgs {
    /// The Kiln server to take work from (and whose CAS to use):
    /// `grpc://HOST:PORT`, or `grpcs://HOST:PORT` for TLS.
    #[arg(long)]
    scheduler: String,
    #[command(flatten)]
    tls: kiln::tls::ClientTlsArgs,
    /// Pool to register in.
    #[arg(long, default_value = "default")]
    pool: String,
    /// Name reported in ExecutedActionMetadata.worker (default: kiln-worker-PID).
    #[arg(long)]
    name: Option<String>,
    /// Actions run at once (0 = number of CPUs).
    #[arg(long, default_value_t = 0)]
    capacity: u32,
    /// Milli-CPUs running actions may reserve in total (their EstimatedCPU;
    /// 0 = this machine's CPUs × 1000).
    #[arg(long, default_value_t = 0)]
    cpu_millis: u64,
    /// Memory in bytes running actions may reserve in total (their
    /// EstimatedMemory; 0 = this machine's memory).
    #[arg(long, default_value_t = 0)]
    memory_bytes: u64,
    /// Disk in bytes running actions may reserve in total (their
    /// EstimatedFreeDiskBytes; 0 = the free space under the work directory
    /// at start).
    #[arg(long, default_value_t = 0)]
    disk_bytes: u64,
    /// Directory for workspaces and the local file cache.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// OSFamily this executor offers.
    #[arg(long, default_value = "linux")]
    os_family: String,
    /// Arch this executor offers (default: this machine's).
    #[arg(long)]
    arch: Option<String>,
    /// A property this executor declares, KEY=VALUE (repeatable): actions
    /// carrying KEY come here only with the same VALUE. KEY must not be a
    /// platform property Kiln interprets (those are refused).
    #[arg(long = "property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// Longest an action may run, in seconds.
    #[arg(long, default_value_t = 3600)]
    max_action_timeout_s: u64,
    /// Longest SIGTERM-to-SIGKILL grace an action gets, in seconds (its
    /// termination-grace-period is capped at this).
    #[arg(long, default_value_t = 300)]
    max_termination_grace_s: u64,
    #[arg(long, default_value_t = 5000)]
    heartbeat_interval_ms: u64,
    /// Most bytes the input file cache keeps; least recently used files go
    /// first (0 = unlimited).
    #[arg(long, default_value = "10GiB")]
    cache_size: String,
    /// File with the token the scheduler requires of executors (its
    /// `--executor-token-file`).
    #[arg(long, env = "KILN_EXECUTOR_TOKEN_FILE")]
    executor_token_file: Option<PathBuf>,
    /// File with an API key that has the register-executor capability
    /// (`kiln keys create --capability register-executor`), presented on
    /// every call instead of the executor token.
    #[arg(long, env = "KILN_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz (ready while registered) on
    /// this address, e.g. 127.0.0.1:9091; the bound address is printed on
    /// stdout as `listening http://ADDR`.
    #[arg(long)]
    monitoring_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    isolation: kiln::isolation::IsolationArgs,
    #[command(flatten)]
    inputs: kiln::config::InputLimitArgs,
    #[arg(long, value_enum, default_value = "human")]
    log_format: LogFormat,
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => {
            // The scheduler refuses these too; said here before connecting.
            kiln_scheduler::session::check_declared(key)?;
            Ok((key.to_string(), value.to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

async fn executor(args: ExecutorArgs) -> anyhow::Result<()> {
    init_logging(args.log_format, &args.log_level);
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let name = args
        .name
        .unwrap_or_else(|| format!("kiln-worker-{}", std::process::id()));
    let capacity = if args.capacity == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        args.capacity
    };
    let work_dir = args
        .work_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("kiln-worker-{name}")));
    let resources = kiln_scheduler::ResourceAmount::given_or_host(
        kiln_scheduler::ResourceAmount {
            cpu_millis: args.cpu_millis,
            memory_bytes: args.memory_bytes,
            disk_bytes: args.disk_bytes,
        },
        &work_dir,
    );
    let options = kiln::executor::ExecutorOptions {
        scheduler: args.scheduler,
        tls: args.tls,
        pool: args.pool,
        work_dir,
        name,
        capacity,
        resources,
        os_family: args.os_family,
        properties: args.properties.into_iter().collect(),
        arch: args.arch.unwrap_or_else(|| {
            match kiln_platform::Arch::host() {
                kiln_platform::Arch::Arm64 => "arm64",
                kiln_platform::Arch::Amd64 => "amd64",
            }
            .to_string()
        }),
        max_action_timeout: std::time::Duration::from_secs(args.max_action_timeout_s.max(1)),
        max_termination_grace: std::time::Duration::from_secs(args.max_termination_grace_s),
        cache_max_bytes: kiln::config::parse_size(&args.cache_size)
            .map_err(|e| anyhow::anyhow!("--cache-size: {e}"))?,
        isolation: {
            let mut settings = kiln::isolation::IsolationSettings::default();
            args.isolation.apply(&mut settings);
            settings
        },
        input_limits: {
            let mut settings = kiln::config::InputLimitSettings::default();
            args.inputs.apply(&mut settings);
            settings.limits()?
        },
        heartbeat_interval: std::time::Duration::from_millis(args.heartbeat_interval_ms.max(1)),
        monitoring_listen: args.monitoring_listen,
        credential: match (&args.executor_token_file, &args.api_key_file) {
            (Some(_), Some(_)) => anyhow::bail!(
                "give --executor-token-file (the shared fleet) or --api-key-file (an \
                 organisation's key), not both"
            ),
            (Some(path), None) => Some(kiln_auth::Credential::executor_token(
                &kiln_auth::ExecutorToken::read(path).map_err(anyhow::Error::msg)?,
            )),
            (None, Some(path)) => Some(kiln_auth::Credential::api_key(
                &kiln_auth::ApiKey::read(path).map_err(anyhow::Error::msg)?,
            )),
            (None, None) => None,
        },
    };
    let stop = kiln_worker::CancellationToken::new();
    let run = kiln::executor::run(options, stop.clone());
    tokio::pin!(run);
    tokio::select! {
        result = &mut run => return result,
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
    }
    stop.cancel();
    run.await
}

/// Every setting of the config file is also a flag; flags win.
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (see `kiln config print-default`).
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:1985 (port 0 picks one).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Directory for Kiln's data.
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// How long calls in flight may take to finish at shutdown.
    #[arg(long)]
    shutdown_grace_ms: Option<u64>,
    /// Most client connections open at once.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most concurrent calls (HTTP/2 streams) per connection.
    #[arg(long)]
    max_streams_per_connection: Option<u32>,
    /// Monitoring endpoint (metrics, health, web UI), e.g. 127.0.0.1:9090;
    /// `off` disables it.
    #[arg(long)]
    monitoring_listen: Option<String>,
    /// PEM certificate chain to serve TLS with (`grpcs://`); needs --tls-key.
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<String>,
    /// PEM CA whose client certificates executors must present to register.
    #[arg(long)]
    tls_client_ca: Option<String>,
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// tracing filter, e.g. `info` or `kiln_cas=debug`.
    #[arg(long)]
    log_level: Option<String>,
    #[arg(long, value_enum)]
    storage_backend: Option<Backend>,
    /// Largest total size of stored blobs, e.g. 10GiB.
    #[arg(long)]
    max_size: Option<String>,
    /// Memory tier size, e.g. 64MiB (0 disables it).
    #[arg(long)]
    memory_cache_size: Option<String>,
    #[arg(long)]
    memory_cache_max_blob: Option<String>,
    #[arg(long)]
    max_packed_blob: Option<String>,
    #[arg(long, value_enum)]
    durability: Option<DurabilityMode>,
    #[arg(long)]
    sync_interval_ms: Option<u64>,
    #[arg(long)]
    max_batch_total_size: Option<String>,
    /// A ByteStream Write idle this long is ended (0: never).
    #[arg(long)]
    bytestream_idle_timeout_ms: Option<u64>,
    /// Serve remote execution (Execute, Operations).
    #[arg(long)]
    execution_enabled: Option<bool>,
    /// Run actions in the server process.
    #[arg(long)]
    embedded_executor: Option<bool>,
    /// The embedded executor's pool (also the default pool).
    #[arg(long)]
    pool: Option<String>,
    /// Actions the embedded executor runs at once (0 = number of CPUs).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Longest an action may run, in seconds.
    #[arg(long)]
    max_action_timeout_s: Option<u64>,
    /// Longest termination-grace-period an action may ask for, in seconds;
    /// longer is refused.
    #[arg(long)]
    max_termination_grace_s: Option<u64>,
    /// Wait for a matching executor this long before failing an action.
    #[arg(long)]
    unmatched_grace_ms: Option<u64>,
    /// Cancel an execution no client has waited for this long (0: never).
    #[arg(long)]
    orphan_grace_ms: Option<u64>,
    /// Most operations queued or running at once (merged requests count).
    #[arg(long)]
    max_queued_executions: Option<usize>,
    /// Time beyond an action's timeout and grace after which an executor
    /// that has not finished it loses it.
    #[arg(long)]
    assignment_margin_ms: Option<u64>,
    /// Silence after which an executor process counts as lost.
    #[arg(long)]
    executor_heartbeat_timeout_ms: Option<u64>,
    /// Starts of an action before executor losses fail it.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// How long an action is left to an executor holding its runner warm.
    #[arg(long)]
    warm_runner_wait_ms: Option<u64>,
    /// Most bytes the embedded executor's file cache keeps (0 = unlimited).
    #[arg(long)]
    executor_cache_size: Option<String>,
    /// File with the token executor processes must present to register.
    #[arg(long, env = "KILN_EXECUTOR_TOKEN_FILE")]
    executor_token_file: Option<String>,
    /// Serve a non-loopback address without API keys (anyone who reaches
    /// it may read and write the cache and run actions); warned about at
    /// start-up and by /healthz and /readyz.
    #[arg(long)]
    allow_unauthenticated: bool,
    #[command(flatten)]
    isolation: kiln::isolation::IsolationArgs,
    #[command(flatten)]
    inputs: kiln::config::InputLimitArgs,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        let storage = &mut config.storage;
        let execution = &mut config.execution;
        macro_rules! set {
            ($($flag:expr => $field:expr),* $(,)?) => { $( if let Some(value) = $flag { $field = value; } )* };
        }
        set! {
            self.listen => config.listen,
            self.data_dir => config.data_dir,
            self.shutdown_grace_ms => config.shutdown_grace_ms,
            self.max_connections => config.max_connections,
            self.max_streams_per_connection => config.max_streams_per_connection,
            self.monitoring_listen => config.monitoring_listen,
            self.log_format => config.log.format,
            self.log_level => config.log.level,
            self.tls_cert => config.tls.cert,
            self.tls_key => config.tls.key,
            self.tls_client_ca => config.tls.client_ca,
            self.storage_backend => storage.backend,
            self.max_size => storage.max_size,
            self.memory_cache_size => storage.memory_cache_size,
            self.memory_cache_max_blob => storage.memory_cache_max_blob,
            self.max_packed_blob => storage.max_packed_blob,
            self.durability => storage.durability,
            self.sync_interval_ms => storage.sync_interval_ms,
            self.max_batch_total_size => storage.max_batch_total_size,
            self.bytestream_idle_timeout_ms => storage.bytestream_idle_timeout_ms,
            self.execution_enabled => execution.enabled,
            self.embedded_executor => execution.embedded_executor,
            self.pool => execution.pool,
            self.concurrency => execution.concurrency,
            self.max_action_timeout_s => execution.max_action_timeout_s,
            self.max_termination_grace_s => execution.max_termination_grace_s,
            self.unmatched_grace_ms => execution.unmatched_grace_ms,
            self.orphan_grace_ms => execution.orphan_grace_ms,
            self.max_queued_executions => execution.max_queued_executions,
            self.assignment_margin_ms => execution.assignment_margin_ms,
            self.executor_heartbeat_timeout_ms => execution.executor_heartbeat_timeout_ms,
            self.max_attempts => execution.max_attempts,
            self.warm_runner_wait_ms => execution.warm_runner_wait_ms,
            self.executor_cache_size => execution.executor_cache_size,
            self.executor_token_file => execution.executor_token_file,
            self.allow_unauthenticated.then_some(true) => config.allow_unauthenticated,
        }
        self.isolation.apply(&mut execution.isolation);
        self.inputs.apply(&mut execution.inputs);
        Ok(config)
    }
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    init_logging(config.log.format, &config.log.level);
    // Handlers go in before anyone can learn the address: a supervisor that
    // sends SIGTERM right after readiness gets a clean stop.
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let server = kiln::serve::start(&config).await?;
    tracing::info!(addr = %server.addr, data_dir = %config.data_dir.display(), "kiln serving");
    // The lines on stdout: scripts and tests read the bound addresses here,
    // the gRPC one first.
    let scheme = if server.tls { "grpcs" } else { "grpc" };
    println!("listening {scheme}://{}", server.addr);
    if let Some(monitoring) = server.monitoring_addr {
        println!("listening http://{monitoring} (web UI, /metrics, /healthz, /readyz)");
    }

    tokio::select! {
        _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    server.stop().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Executor(args) => executor(*args).await,
            Command::Keys { command } => keys::run(command),
            Command::Config {
                command: ConfigCommand::PrintDefault,
            } => {
                print!("{}", Config::default().to_toml());
                Ok(())
            }
            Command::Bench {
                command: BenchCommand::Cas(args),
            } => bench::cas::run(*args).await,
            Command::Bench {
                command: BenchCommand::Exec(args),
            } => bench::exec::run(*args).await,
            Command::Bench {
                command: BenchCommand::Isolation(args),
            } => bench::isolation::run(args).await,
        }
    })
}
