//! `kiln`: one binary for the whole platform. `kiln serve` runs every
//! service on one machine with embedded defaults.
#![forbid(unsafe_code)]

mod bench;

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
    Serve(ServeArgs),
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
    Cas(bench::cas::CasBenchArgs),
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
            self.log_format => config.log.format,
            self.log_level => config.log.level,
            self.storage_backend => storage.backend,
            self.max_size => storage.max_size,
            self.memory_cache_size => storage.memory_cache_size,
            self.memory_cache_max_blob => storage.memory_cache_max_blob,
            self.max_packed_blob => storage.max_packed_blob,
            self.durability => storage.durability,
            self.sync_interval_ms => storage.sync_interval_ms,
            self.max_batch_total_size => storage.max_batch_total_size,
            self.execution_enabled => execution.enabled,
            self.embedded_executor => execution.embedded_executor,
            self.pool => execution.pool,
            self.concurrency => execution.concurrency,
            self.max_action_timeout_s => execution.max_action_timeout_s,
        }
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
    // The one line on stdout: scripts and tests read the bound address here.
    println!("listening grpc://{}", server.addr);

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
            Command::Serve(args) => serve(args).await,
            Command::Config {
                command: ConfigCommand::PrintDefault,
            } => {
                print!("{}", Config::default().to_toml());
                Ok(())
            }
            Command::Bench {
                command: BenchCommand::Cas(args),
            } => bench::cas::run(args).await,
        }
    })
}
