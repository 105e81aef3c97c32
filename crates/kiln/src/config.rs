//! Kiln's configuration: one typed tree, every field documented and
//! defaulted, read from an optional TOML file and overridden by flags.
//! `kiln config print-default` prints it all.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on. Port 0 picks a free port; the
    /// bound address is printed on stdout as `listening grpc://ADDR`
    /// (`grpcs://ADDR` with TLS).
    pub listen: SocketAddr,
    /// Directory for all of Kiln's data. Default: `$XDG_DATA_HOME/kiln`,
    /// else `/var/lib/kiln` for root, else `$HOME/.local/share/kiln`, else
    /// `/var/lib/kiln`.
    pub data_dir: PathBuf,
    /// On SIGTERM/SIGINT, how long calls in flight may take to finish
    /// before the server closes the remaining connections.
    pub shutdown_grace_ms: u64,
    /// Most client connections open at once; one more is closed at once.
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams (calls) one connection may open.
    pub max_streams_per_connection: u32,
    /// Address of the monitoring endpoint (plain HTTP): Prometheus
    /// `/metrics`, `/healthz`, `/readyz` and the web UI at `/`. Port 0
    /// picks a free port; the bound address is printed on stdout after the
    /// gRPC one, as `listening http://ADDR`. `off` disables it. It shares
    /// the gRPC port's API keys: once one exists, everything but /healthz
    /// and /readyz needs a key with cache-read; until then keep it on
    /// loopback.
    pub monitoring_listen: String,
    /// Serve a non-loopback `listen` address while no API key exists
    /// (`kiln keys create`): anyone who reaches it may read and write the
    /// cache and run actions. Off, such a server refuses to start; on, it
    /// warns at start-up and in /healthz and /readyz. A loopback address
    /// is open until the first key is made either way.
    pub allow_unauthenticated: bool,
    pub log: LogConfig,
    pub tls: TlsConfig,
    pub storage: StorageConfig,
    pub execution: ExecutionConfig,
}

/// TLS on the gRPC port (`listen`): with `cert` and `key` set, every
/// client (Bazel, executors) must connect with TLS (`grpcs://`); unset,
/// the port is plaintext, and then registry credentials are sent only to
/// executors on loopback.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server's certificate chain (leaf first); empty =
    /// plaintext.
    pub cert: String,
    /// PEM file with the private key of `cert`.
    pub key: String,
    /// PEM file with the CA that signs executors' client certificates.
    /// When set, an executor registers only if it presented a certificate
    /// chained to this CA (`kiln executor --tls-cert --tls-key`); other
    /// clients (Bazel) still connect without one. Empty = executors need
    /// no certificate.
    pub client_ca: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`, written to stderr.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `kiln_cas=debug,info`.
    /// The `RUST_LOG` environment variable wins when set.
    pub level: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Durable store under `data_dir/cas`, with a memory tier in front.
    Disk,
    /// Memory only: everything is lost on exit. For tests and throw-away servers.
    Memory,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityMode {
    /// Acknowledge writes at once; sync to disk every `sync_interval_ms`.
    /// A machine crash may lose that window's blobs, never corrupt one.
    GroupCommit,
    /// Acknowledge a write only once it is on disk (batched with others).
    Sync,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub backend: Backend,
    /// Most bytes the store keeps on disk (or in memory, for `memory`);
    /// least recently used blobs are evicted above it. Sizes accept
    /// `B`, `K`/`KB`, `M`/`MB`, `G`/`GB`, `T`/`TB` and `KiB`…`TiB`.
    pub max_size: String,
    /// Memory tier in front of the disk store, for small hot blobs.
    pub memory_cache_size: String,
    /// Blobs up to this size are cached in the memory tier.
    pub memory_cache_max_blob: String,
    /// Blobs up to this size are packed into shared segment files rather
    /// than getting a file each.
    pub max_packed_blob: String,
    pub durability: DurabilityMode,
    /// Group-commit interval.
    pub sync_interval_ms: u64,
    /// Largest BatchUpdateBlobs/BatchReadBlobs payload, as advertised in
    /// the capabilities.
    pub max_batch_total_size: String,
    /// A ByteStream Write whose client sends nothing this long is ended
    /// (DEADLINE_EXCEEDED; the upload stays resumable for a while) and its
    /// thread freed; 0: never.
    pub bytestream_idle_timeout_ms: u64,
}

/// Remote execution: the Execution and Operations services and the
/// executor embedded in the server.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutionConfig {
    /// Serve Execute/WaitExecution and Operations, and advertise execution
    /// in the capabilities. Off: Kiln is a cache only.
    pub enabled: bool,
    /// Run actions in the server process (with `none` isolation).
    pub embedded_executor: bool,
    /// The embedded executor's pool; actions without a `Pool` property go
    /// to this pool too.
    pub pool: String,
    /// Actions the embedded executor runs at once; 0 = the number of CPUs.
    pub concurrency: usize,
    /// Longest an action may run (its `Action.timeout` is clamped to it),
    /// and the timeout of actions that set none.
    pub max_action_timeout_s: u64,
    /// Longest `termination-grace-period` (SIGTERM to SIGKILL) an action
    /// may ask for, in seconds: a longer one is refused with
    /// INVALID_ARGUMENT naming this limit, so no action holds an executor
    /// arbitrarily long after its timeout or cancellation. The embedded
    /// executor caps the grace at it too.
    pub max_termination_grace_s: u64,
    /// How long an action no registered executor matches (Pool, OSFamily,
    /// Arch) waits for one to register before it fails with
    /// FAILED_PRECONDITION naming what is unmatched.
    pub unmatched_grace_ms: u64,
    /// An execution no client waits for (every Execute/WaitExecution
    /// stream closed, no GetOperation) this long is cancelled: Bazel's
    /// Ctrl-C, or Pants dropping the slower of cache and execution, stop
    /// the work. 0: never.
    pub orphan_grace_ms: u64,
    /// Most operations queued or running at once (a request merged into an
    /// identical execution in flight keeps an operation too, so it counts);
    /// beyond it Execute answers RESOURCE_EXHAUSTED with a retry delay.
    pub max_queued_executions: usize,
    /// An executor that has not finished an action within its timeout plus
    /// grace plus this many milliseconds (for staging and upload) loses
    /// it, and the action is requeued.
    pub assignment_margin_ms: u64,
    /// An executor process silent this long (no heartbeat) is lost: its
    /// running actions are requeued.
    pub executor_heartbeat_timeout_ms: u64,
    /// How many times an action is started before losing its executor
    /// fails it.
    pub max_attempts: u32,
    /// How long an action whose runner key an executor holds warm
    /// (`recycle-runner=true`) is left to that executor before any other
    /// may take it cold.
    pub warm_runner_wait_ms: u64,
    /// Milli-CPUs the embedded executor's running actions may reserve in
    /// total (their `EstimatedCPU`); 0 = this machine's CPUs × 1000.
    pub cpu_millis: u64,
    /// Bytes of memory the embedded executor's running actions may reserve
    /// in total (their `EstimatedMemory`); 0 = this machine's memory.
    pub memory_bytes: u64,
    /// Bytes of disk the embedded executor's running actions may reserve in
    /// total (their `EstimatedFreeDiskBytes`); 0 = the free space of the
    /// file system holding `data_dir` at start.
    pub disk_bytes: u64,
    /// What an action without `EstimatedCPU` reserves, in milli-CPUs; 0 =
    /// nothing (only the executor's slot count bounds such actions).
    pub default_action_cpu_millis: u64,
    /// What an action without `EstimatedMemory` reserves, in bytes.
    pub default_action_memory_bytes: u64,
    /// What an action without `EstimatedFreeDiskBytes` reserves, in bytes.
    pub default_action_disk_bytes: u64,
    /// Most bytes the embedded executor's input file cache keeps (under
    /// `data_dir/execution/cache`); least recently used files go first.
    /// `0` = unlimited.
    pub executor_cache_size: String,
    /// A file holding the token executor processes must present to
    /// register (`kiln executor --executor-token-file`); empty = none, and
    /// then any process that reaches `listen` may register.
    pub executor_token_file: String,
    /// The embedded executor's isolation backends.
    pub isolation: crate::isolation::IsolationSettings,
    /// The embedded executor's limits on input trees.
    pub inputs: InputLimitSettings,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            enabled: true,
            embedded_executor: true,
            pool: "default".into(),
            concurrency: 0,
            max_action_timeout_s: 3600,
            max_termination_grace_s: 300,
            unmatched_grace_ms: 2000,
            orphan_grace_ms: 5000,
            max_queued_executions: 100_000,
            assignment_margin_ms: 600_000,
            executor_heartbeat_timeout_ms: 30_000,
            max_attempts: 3,
            warm_runner_wait_ms: 200,
            cpu_millis: 0,
            memory_bytes: 0,
            disk_bytes: 0,
            default_action_cpu_millis: 0,
            default_action_memory_bytes: 0,
            default_action_disk_bytes: 0,
            executor_cache_size: "10GiB".into(),
            executor_token_file: String::new(),
            isolation: Default::default(),
            inputs: Default::default(),
        }
    }
}

impl ExecutionConfig {
    /// The embedded executor's capacity, with 0 resolved to this machine's
    /// (disk: the free space under `work_dir`).
    pub fn effective_resources(
        &self,
        work_dir: &std::path::Path,
    ) -> kiln_scheduler::ResourceAmount {
        kiln_scheduler::ResourceAmount::given_or_host(
            kiln_scheduler::ResourceAmount {
                cpu_millis: self.cpu_millis,
                memory_bytes: self.memory_bytes,
                disk_bytes: self.disk_bytes,
            },
            work_dir,
        )
    }

    /// What an action without estimates reserves.
    pub fn default_action_resources(&self) -> kiln_scheduler::ResourceAmount {
        kiln_scheduler::ResourceAmount {
            cpu_millis: self.default_action_cpu_millis,
            memory_bytes: self.default_action_memory_bytes,
            disk_bytes: self.default_action_disk_bytes,
        }
    }

    /// `concurrency`, with 0 resolved to the number of CPUs.
    pub fn effective_concurrency(&self) -> usize {
        if self.concurrency > 0 {
            return self.concurrency;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// A `monitoring_listen` value: an address, or `None` for `off`.
pub fn monitoring_address(value: &str) -> anyhow::Result<Option<SocketAddr>> {
    match value.trim() {
        "off" | "" => Ok(None),
        address => address.parse().map(Some).map_err(|e| {
            anyhow::anyhow!("monitoring_listen {address:?} is not an address such as 127.0.0.1:9090, nor `off`: {e}")
        }),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:1985".parse().expect("valid address"),
            data_dir: default_data_dir(),
            shutdown_grace_ms: 10_000,
            max_connections: 4096,
            max_streams_per_connection: 1024,
            monitoring_listen: "127.0.0.1:9090".into(),
            allow_unauthenticated: false,
            log: LogConfig::default(),
            tls: TlsConfig::default(),
            storage: StorageConfig::default(),
            execution: ExecutionConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Disk,
            max_size: "10GiB".into(),
            memory_cache_size: "64MiB".into(),
            memory_cache_max_blob: "64KiB".into(),
            max_packed_blob: "256KiB".into(),
            durability: DurabilityMode::GroupCommit,
            sync_interval_ms: 1000,
            max_batch_total_size: "4032KiB".into(),
            bytestream_idle_timeout_ms: 60_000,
        }
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kiln");
    }
    // Root's home is private (0700 on Debian), and a root server's actions
    // run as an unprivileged action user that must reach its workspaces.
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/kiln");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/share/kiln");
    }
    PathBuf::from("/var/lib/kiln")
}

impl Config {
    /// A server on a free loopback port keeping its data in `data_dir`, with
    /// every other setting at its default: what tests and benchmarks start.
    pub fn loopback(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            monitoring_listen: "127.0.0.1:0".into(),
            data_dir: data_dir.into(),
            ..Config::default()
        }
    }

    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }
}

/// Sizes in the config read like the platform properties' (`4KB`, `10GiB`).
pub use kiln_platform::parse_size;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_round_trips_through_toml() {
        let text = Config::default().to_toml();
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed.listen, Config::default().listen);
        assert!(
            toml::from_str::<Config>("bogus = 1").is_err(),
            "unknown keys are rejected"
        );
    }
}

/// How large an action's input tree may be, counted as it is laid out (a
/// directory listed twice counts twice). Shared by the embedded executor
/// (`[execution.inputs]`) and `kiln executor`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputLimitSettings {
    /// Most files, symlinks and directories in one input tree.
    pub max_input_entries: u64,
    /// Most directory levels below the input root.
    pub max_input_depth: u32,
    /// Most bytes of files in one input tree (`64GiB`, `500MB`, ...).
    pub max_input_bytes: String,
}

impl Default for InputLimitSettings {
    fn default() -> Self {
        let limits = kiln_worker::inputs::InputLimits::default();
        InputLimitSettings {
            max_input_entries: limits.max_entries,
            max_input_depth: limits.max_depth,
            max_input_bytes: format!("{}GiB", limits.max_bytes >> 30),
        }
    }
}

impl InputLimitSettings {
    /// The limits, or an error naming the setting that does not parse.
    pub fn limits(&self) -> anyhow::Result<kiln_worker::inputs::InputLimits> {
        Ok(kiln_worker::inputs::InputLimits {
            max_entries: self.max_input_entries,
            max_depth: self.max_input_depth,
            max_bytes: parse_size(&self.max_input_bytes)
                .map_err(|e| anyhow::anyhow!("max_input_bytes: {e}"))?,
        })
    }
}

/// Flags overriding [`InputLimitSettings`], shared by `kiln serve` and
/// `kiln executor`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct InputLimitArgs {
    /// Most files, symlinks and directories in one input tree.
    #[arg(long)]
    pub max_input_entries: Option<u64>,
    /// Most directory levels below an input root.
    #[arg(long)]
    pub max_input_depth: Option<u32>,
    /// Most bytes of files in one input tree.
    #[arg(long)]
    pub max_input_bytes: Option<String>,
}

impl InputLimitArgs {
    /// Writes the given flags over `settings`.
    pub fn apply(self, settings: &mut InputLimitSettings) {
        if let Some(entries) = self.max_input_entries {
            settings.max_input_entries = entries;
        }
        if let Some(depth) = self.max_input_depth {
            settings.max_input_depth = depth;
        }
        if let Some(bytes) = self.max_input_bytes {
            settings.max_input_bytes = bytes;
        }
    }
}
