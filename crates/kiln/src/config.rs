//! Kiln's configuration: one typed tree, every setting defined once.
//!
//! A setting is one field of a section struct below (or of
//! [`crate::isolation::IsolationSettings`] and
//! [`kiln_sandbox::SandboxConfig`]), and that field is everything about
//! it:
//!
//! - its **doc comment** is the `--help` of its flag (clap reads it) and
//!   the comment above it in `kiln config print-default`
//!   ([`documented_toml`] reads it back from clap);
//! - its **type** is how it is written, in the file and on the command
//!   line alike: [`Size`] (`10GiB`), [`Period`] (`60s`, `1h30m`), enums,
//!   addresses, paths;
//! - its **default** is the section's `Default` (serde fills missing keys
//!   from it, and [`Flags`] quotes it in the flag's help);
//! - its **`#[arg(long)]`** makes it a flag of `kiln serve` (and, for the
//!   sections it shares, `kiln executor`); `long = "..."` renames the flag,
//!   boolean settings take an optional value (`--flag`, `--flag false`).
//!
//! Sections derive `serde` (the file) and `clap::Args` (the flags);
//! [`Flags`] applies the flags a user gave over a section read from the
//! file, through clap's own update (a flag that was not given leaves the
//! file's value alone). Adding a setting is adding one documented field
//! and its default; nothing else lists settings.
//!
//! Older files and flags keep working: a key or flag spelled with a unit
//! suffix (`sync_interval_ms = 1000`, `--memory-bytes 1000`) whose
//! unsuffixed name is a setting is read as that setting in that unit
//! ([`migrate_file`], [`migrate_flags`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A number of bytes, written like platform properties' sizes: `512`,
/// `4KB`, `1.5GiB` (decimal units are powers of 1000, `KiB`… of 1024). A
/// bare number in the file is bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub const fn kib(n: u64) -> Size {
        Size(n << 10)
    }
    pub const fn mib(n: u64) -> Size {
        Size(n << 20)
    }
    pub const fn gib(n: u64) -> Size {
        Size(n << 30)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(text: &str) -> Result<Size, String> {
        kiln_platform::parse_size(text).map(Size)
    }
}

impl std::fmt::Display for Size {
    /// The largest binary unit that divides it exactly: `10GiB`, `4032KiB`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.0;
        if bytes > 0 {
            for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
                if bytes.is_multiple_of(1 << shift) {
                    return write!(f, "{}{unit}", bytes >> shift);
                }
            }
        }
        write!(f, "{bytes}")
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Size, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as \"10GiB\", \"500MB\" or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Size, E> {
                text.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<Size, E> {
                Ok(Size(bytes))
            }
            fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<Size, E> {
                u64::try_from(bytes)
                    .map(Size)
                    .map_err(|_| E::custom(format!("size {bytes} is negative")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A length of time, written with its unit: `500ms`, `60s`, `15m`,
/// `1h30m`. A bare number is refused (which unit would it be?).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Period(pub std::time::Duration);

impl Period {
    pub const fn millis(n: u64) -> Period {
        Period(std::time::Duration::from_millis(n))
    }
    pub const fn secs(n: u64) -> Period {
        Period(std::time::Duration::from_secs(n))
    }
    pub fn get(self) -> std::time::Duration {
        self.0
    }
    /// None for zero: what settings whose `0s` means "never" want.
    pub fn nonzero(self) -> Option<std::time::Duration> {
        Some(self.0).filter(|d| !d.is_zero())
    }
}

impl std::str::FromStr for Period {
    type Err = String;
    fn from_str(text: &str) -> Result<Period, String> {
        kiln_platform::parse_duration(text).map(Period)
    }
}

impl std::fmt::Display for Period {
    /// Hours, minutes, seconds and milliseconds: `1h30m`, `2s`, `200ms`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.0.subsec_nanos().is_multiple_of(1_000_000) {
            return write!(f, "{}ns", self.0.as_nanos());
        }
        let mut rest = self.0.as_millis();
        if rest == 0 {
            return f.write_str("0s");
        }
        for (unit, length) in [("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)] {
            if rest >= length {
                write!(f, "{}{unit}", rest / length)?;
                rest %= length;
            }
        }
        Ok(())
    }
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Period, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Period;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration with its unit, such as \"500ms\", \"60s\" or \"1h30m\"")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Period, E> {
                text.parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Period, E> {
                Err(E::custom(format!(
                    "a duration needs its unit: write \"{n}ms\" or \"{n}s\", not {n}"
                )))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Period, E> {
                self.visit_i64(n as i64)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The flags a user gave for the settings of section `T`: a flattened
/// `Flags<T>` adds a flag per setting of `T` (none required, none with a
/// clap default), and [`Flags::apply`] writes those given over a `T` read
/// from the file.
#[derive(Clone, Debug)]
pub struct Flags<T> {
    matches: clap::ArgMatches,
    section: std::marker::PhantomData<fn() -> T>,
}

impl<T: clap::FromArgMatches> Flags<T> {
    /// Writes the flags given over `section` (leaving the rest alone).
    pub fn apply(&self, section: &mut T) -> anyhow::Result<()> {
        section.update_from_arg_matches(&self.matches)?;
        Ok(())
    }
}

impl<T: clap::Args + Default + Serialize> clap::Args for Flags<T> {
    fn augment_args(command: clap::Command) -> clap::Command {
        let before: Vec<clap::Id> = command
            .get_arguments()
            .map(|a| a.get_id().clone())
            .collect();
        // The update form: every flag optional, since the file or the
        // default provides what is not given.
        let mut command = T::augment_args_for_update(command);
        // The help says the default (a clap default would count as given,
        // and win over the file).
        let mut defaults = Vec::new();
        let table = toml::Table::try_from(T::default()).expect("settings serialize");
        leaves(&table, &mut defaults);
        let added: Vec<clap::Id> = command
            .get_arguments()
            .map(|arg| arg.get_id().clone())
            .filter(|id| !before.contains(id))
            .collect();
        for id in added {
            let arg = command
                .get_arguments()
                .find(|a| *a.get_id() == id)
                .expect("listed");
            assert!(
                arg.get_long().is_some(),
                "setting `{id}` has no --flag: give its field #[arg(long)]"
            );
            let Some((_, default)) = defaults.iter().find(|(key, _)| id == key.as_str()) else {
                continue;
            };
            let with_default = |help: Option<&clap::builder::StyledStr>| {
                help.map(|help| format!("{help} [default: {default}]"))
            };
            let help = with_default(arg.get_help());
            let long_help = with_default(arg.get_long_help());
            command = command.mut_arg(id, |arg| {
                let arg = match help {
                    Some(help) => arg.help(help),
                    None => arg,
                };
                match long_help {
                    Some(help) => arg.long_help(help),
                    None => arg,
                }
            });
        }
        command
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

/// Each setting of `table` (its sections' too) and its value as a flag
/// would take it.
fn leaves(table: &toml::Table, out: &mut Vec<(String, String)>) {
    for (key, value) in table {
        let text = match value {
            toml::Value::Table(inner) => {
                leaves(inner, out);
                continue;
            }
            toml::Value::String(text) if text.is_empty() => "\"\"".to_string(),
            toml::Value::String(text) => text.clone(),
            toml::Value::Array(items) if items.is_empty() => "none".to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map_or_else(|| item.to_string(), str::to_string)
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        out.push((key.clone(), text));
    }
}

impl<T> clap::FromArgMatches for Flags<T> {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(Flags {
            matches: matches.clone(),
            section: std::marker::PhantomData,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.matches = matches.clone();
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on. Port 0 picks a free port; the
    /// bound address is printed on stdout as `listening grpc://ADDR`
    /// (`grpcs://ADDR` with TLS).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory for all of Kiln's data. Default: `$XDG_DATA_HOME/kiln`,
    /// else `/var/lib/kiln` for root, else `$HOME/.local/share/kiln`, else
    /// `/var/lib/kiln`.
    #[arg(long, env = "KILN_DATA_DIR")]
    pub data_dir: PathBuf,
    /// On SIGTERM/SIGINT, how long calls in flight may take to finish
    /// before the server closes the remaining connections.
    #[arg(long)]
    pub shutdown_grace: Period,
    /// Most client connections open at once; one more is closed at once.
    #[arg(long)]
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams (calls) one connection may open.
    #[arg(long)]
    pub max_streams_per_connection: u32,
    /// Address of the monitoring endpoint (plain HTTP): Prometheus
    /// `/metrics`, `/healthz`, `/readyz` and the web UI at `/`. Port 0
    /// picks a free port; the bound address is printed on stdout after the
    /// gRPC one, as `listening http://ADDR`. `off` disables it. It shares
    /// the gRPC port's API keys: once one exists, everything but /healthz
    /// and /readyz needs a key with cache-read; until then keep it on
    /// loopback.
    #[arg(long)]
    pub monitoring_listen: String,
    /// Serve a non-loopback `listen` address while no API key exists
    /// (`kiln keys create`): anyone who reaches it may read and write the
    /// cache and run actions. Off, such a server refuses to start; on, it
    /// warns at start-up and in /healthz and /readyz. A loopback address
    /// is open until the first key is made either way.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_unauthenticated: bool,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub tls: TlsConfig,
    #[command(flatten)]
    pub storage: StorageConfig,
    #[command(flatten)]
    pub execution: ExecutionConfig,
    /// `kiln executor`'s own settings (not flags of `kiln serve`).
    #[arg(skip)]
    pub executor: ExecutorConfig,
}

/// TLS on the gRPC port (`listen`): with `cert` and `key` set, every
/// client (Bazel, executors) must connect with TLS (`grpcs://`); unset,
/// the port is plaintext, and then registry credentials are sent only to
/// executors on loopback.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server's certificate chain (leaf first); empty =
    /// plaintext. Needs `key`.
    #[arg(long = "tls-cert")]
    pub cert: String,
    /// PEM file with the private key of `cert`.
    #[arg(long = "tls-key")]
    pub key: String,
    /// PEM file with the CA that signs executors' client certificates.
    /// When set, an executor registers only if it presented a certificate
    /// chained to this CA (`kiln executor --tls-cert --tls-key`); other
    /// clients (Bazel) still connect without one. Empty = executors need
    /// no certificate.
    #[arg(long = "tls-client-ca")]
    pub client_ca: String,
}

/// Logging, to stderr.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`, written to stderr.
    #[arg(long = "log-format", value_enum)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `kiln_cas=debug,info`.
    /// The `RUST_LOG` environment variable wins when set.
    #[arg(long = "log-level")]
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
    /// Acknowledge writes at once; sync to disk every `sync_interval`.
    /// A machine crash may lose that window's blobs, never corrupt one.
    GroupCommit,
    /// Acknowledge a write only once it is on disk (batched with others).
    Sync,
}

/// The content-addressable store and the action cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `disk` (durable, under `data_dir/cas`, with a memory tier in front)
    /// or `memory` (lost on exit; for tests and throw-away servers).
    #[arg(long = "storage-backend", value_enum)]
    pub backend: Backend,
    /// Most bytes the store keeps on disk (or in memory, for `memory`);
    /// least recently used blobs are evicted above it. Sizes accept
    /// `B`, `K`/`KB`, `M`/`MB`, `G`/`GB`, `T`/`TB` and `KiB`…`TiB`.
    #[arg(long)]
    pub max_size: Size,
    /// Memory tier in front of the disk store, for small hot blobs (0
    /// disables it).
    #[arg(long)]
    pub memory_cache_size: Size,
    /// Blobs up to this size are cached in the memory tier.
    #[arg(long)]
    pub memory_cache_max_blob: Size,
    /// Blobs up to this size are packed into shared segment files rather
    /// than getting a file each.
    #[arg(long)]
    pub max_packed_blob: Size,
    /// Memory for the large blobs (above `max_packed_blob`) and the batches
    /// of 1 MiB or more written last, kept in the buffers they were written
    /// from, so a download right after an upload (Bazel fetching an
    /// action's outputs) comes from memory. Taken as they are written and
    /// then kept, up to this; 0 keeps none (and batches are then written
    /// through the page cache).
    #[arg(long)]
    pub recent_blob_memory: Size,
    /// `group-commit` (acknowledge writes at once, sync every
    /// `sync_interval`: a machine crash may lose that window's blobs, never
    /// corrupt one) or `sync` (acknowledge a write once it is on disk,
    /// batched with others).
    #[arg(long, value_enum)]
    pub durability: DurabilityMode,
    /// Group-commit interval.
    #[arg(long)]
    pub sync_interval: Period,
    /// Largest BatchUpdateBlobs/BatchReadBlobs payload, as advertised in
    /// the capabilities.
    #[arg(long)]
    pub max_batch_total_size: Size,
    /// A ByteStream Write whose client sends nothing this long is ended
    /// (DEADLINE_EXCEEDED; the upload stays resumable for a while) and its
    /// thread freed; 0s: never.
    #[arg(long)]
    pub bytestream_idle_timeout: Period,
}

/// Remote execution: the Execution and Operations services and the
/// executor embedded in the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutionConfig {
    /// Serve Execute/WaitExecution and Operations, and advertise execution
    /// in the capabilities. Off: Kiln is a cache only.
    #[arg(long = "execution-enabled", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enabled: bool,
    /// Run actions in the server process.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub embedded_executor: bool,
    /// The embedded executor's pool; actions without a `Pool` property go
    /// to this pool too.
    #[arg(long)]
    pub pool: String,
    /// Actions the embedded executor runs at once; 0 = the number of CPUs.
    #[arg(long)]
    pub concurrency: usize,
    /// Longest an action may run (its `Action.timeout` is clamped to it),
    /// and the timeout of actions that set none.
    #[arg(long)]
    pub max_action_timeout: Period,
    /// Longest `termination-grace-period` (SIGTERM to SIGKILL) an action
    /// may ask for: a longer one is refused with INVALID_ARGUMENT naming
    /// this limit, so no action holds an executor arbitrarily long after
    /// its timeout or cancellation. The embedded executor caps the grace
    /// at it too.
    #[arg(long)]
    pub max_termination_grace: Period,
    /// How long an action no registered executor matches (Pool, OSFamily,
    /// Arch) waits for one to register before it fails with
    /// FAILED_PRECONDITION naming what is unmatched.
    #[arg(long)]
    pub unmatched_grace: Period,
    /// An execution no client waits for (every Execute/WaitExecution
    /// stream closed, no GetOperation) this long is cancelled: Bazel's
    /// Ctrl-C, or Pants dropping the slower of cache and execution, stop
    /// the work. 0s: never.
    #[arg(long)]
    pub orphan_grace: Period,
    /// Most operations queued or running at once (a request merged into an
    /// identical execution in flight keeps an operation too, so it counts);
    /// beyond it Execute answers RESOURCE_EXHAUSTED with a retry delay.
    #[arg(long)]
    pub max_queued_executions: usize,
    /// An executor that has not finished an action within its timeout plus
    /// grace plus this (for staging and upload) loses it, and the action is
    /// requeued.
    #[arg(long)]
    pub assignment_margin: Period,
    /// An executor process silent this long (no heartbeat) is lost: its
    /// running actions are requeued.
    #[arg(long)]
    pub executor_heartbeat_timeout: Period,
    /// How many times an action is started before losing its executor
    /// fails it.
    #[arg(long)]
    pub max_attempts: u32,
    /// How long an action whose runner key an executor holds warm
    /// (`recycle-runner=true`) is left to that executor before any other
    /// may take it cold.
    #[arg(long)]
    pub warm_runner_wait: Period,
    /// Milli-CPUs the embedded executor's running actions may reserve in
    /// total (their `EstimatedCPU`); 0 = this machine's CPUs × 1000.
    #[arg(long)]
    pub cpu_millis: u64,
    /// Memory the embedded executor's running actions may reserve in total
    /// (their `EstimatedMemory`); 0 = this machine's memory.
    #[arg(long)]
    pub memory: Size,
    /// Disk the embedded executor's running actions may reserve in total
    /// (their `EstimatedFreeDiskBytes`); 0 = the free space of the file
    /// system holding `data_dir` at start.
    #[arg(long)]
    pub disk: Size,
    /// What an action without `EstimatedCPU` reserves, in milli-CPUs; 0 =
    /// nothing (only the executor's slot count bounds such actions).
    #[arg(long)]
    pub default_action_cpu_millis: u64,
    /// What an action without `EstimatedMemory` reserves.
    #[arg(long)]
    pub default_action_memory: Size,
    /// What an action without `EstimatedFreeDiskBytes` reserves.
    #[arg(long)]
    pub default_action_disk: Size,
    /// Most bytes the embedded executor's input file cache keeps (under
    /// `data_dir/execution/cache`); least recently used files go first.
    /// `0` = unlimited.
    #[arg(long)]
    pub executor_cache_size: Size,
    /// A file holding the token executor processes must present to
    /// register (`kiln executor --executor-token-file`); empty = none, and
    /// then any process that reaches `listen` may register.
    #[arg(long, env = "KILN_EXECUTOR_TOKEN_FILE")]
    pub executor_token_file: String,
    /// The isolation backends of the embedded executor, and of a `kiln
    /// executor` reading this file.
    #[command(flatten)]
    pub isolation: crate::isolation::IsolationSettings,
    /// Limits on input trees, of the embedded executor and of a `kiln
    /// executor` reading this file.
    #[command(flatten)]
    pub inputs: InputLimitSettings,
}

/// `kiln executor`: an executor as its own process (`[executor]`). It
/// also reads `[log]`, `[execution.isolation]` (with its `sandbox`) and
/// `[execution.inputs]` from the same file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutorConfig {
    /// The Kiln server to take work from (and whose CAS to use):
    /// `grpc://HOST:PORT`, or `grpcs://HOST:PORT` for TLS. Required.
    #[arg(long)]
    pub scheduler: String,
    /// Pool to register in.
    #[arg(long)]
    pub pool: String,
    /// Name reported in ExecutedActionMetadata.worker; empty:
    /// `kiln-worker-PID`.
    #[arg(long)]
    pub name: String,
    /// Actions run at once (0 = number of CPUs).
    #[arg(long)]
    pub capacity: u32,
    /// Milli-CPUs running actions may reserve in total (their EstimatedCPU;
    /// 0 = this machine's CPUs × 1000).
    #[arg(long)]
    pub cpu_millis: u64,
    /// Memory running actions may reserve in total (their EstimatedMemory;
    /// 0 = this machine's memory).
    #[arg(long)]
    pub memory: Size,
    /// Disk running actions may reserve in total (their
    /// EstimatedFreeDiskBytes; 0 = the free space under the work directory
    /// at start).
    #[arg(long)]
    pub disk: Size,
    /// Directory for workspaces and the local file cache; empty: a
    /// `kiln-worker-NAME` directory under the system's temporary directory.
    #[arg(long)]
    pub work_dir: PathBuf,
    /// OSFamily this executor offers.
    #[arg(long)]
    pub os_family: String,
    /// Arch this executor offers (`amd64`, `arm64`); empty: this machine's.
    #[arg(long)]
    pub arch: String,
    /// Properties this executor declares, `KEY=VALUE` (the flag is
    /// repeatable): actions carrying KEY come here only with the same
    /// VALUE. KEY must not be a platform property Kiln interprets (those
    /// are refused).
    #[arg(long = "property")]
    pub properties: Vec<Property>,
    /// Longest an action may run.
    #[arg(long)]
    pub max_action_timeout: Period,
    /// Longest SIGTERM-to-SIGKILL grace an action gets (its
    /// termination-grace-period is capped at this).
    #[arg(long)]
    pub max_termination_grace: Period,
    /// How often the executor tells the scheduler it is alive.
    #[arg(long)]
    pub heartbeat_interval: Period,
    /// Most bytes the input file cache keeps; least recently used files go
    /// first (0 = unlimited).
    #[arg(long)]
    pub cache_size: Size,
    /// File with the token the scheduler requires of executors (its
    /// `execution.executor_token_file`); empty: none.
    #[arg(long, env = "KILN_EXECUTOR_TOKEN_FILE")]
    pub executor_token_file: String,
    /// File with an API key that has the register-executor capability
    /// (`kiln keys create --capability register-executor`), presented on
    /// every call instead of the executor token; empty: none.
    #[arg(long, env = "KILN_API_KEY_FILE")]
    pub api_key_file: String,
    /// Serve /metrics, /healthz and /readyz (ready while registered) on
    /// this address, e.g. 127.0.0.1:9091; the bound address is printed on
    /// stdout as `listening http://ADDR`. `off`: not served.
    #[arg(long)]
    pub monitoring_listen: String,
    #[command(flatten)]
    pub tls: ExecutorTlsConfig,
}

/// How `kiln executor` reaches a `grpcs://` scheduler (`[executor.tls]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutorTlsConfig {
    /// PEM file of the CA(s) that signed a `grpcs://` server's
    /// certificate; empty: the system's roots.
    #[arg(long = "tls-ca")]
    pub ca: PathBuf,
    /// PEM client certificate, for a server that requires one of executors
    /// (its `tls.client_ca`); needs `key`.
    #[arg(long = "tls-cert")]
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    #[arg(long = "tls-key")]
    pub key: PathBuf,
}

impl ExecutorTlsConfig {
    /// These settings as the TLS client's.
    pub fn client(&self) -> anyhow::Result<crate::tls::ClientTlsArgs> {
        let given = |path: &PathBuf| Some(path.clone()).filter(|p| !p.as_os_str().is_empty());
        let tls = crate::tls::ClientTlsArgs {
            tls_ca: given(&self.ca),
            tls_cert: given(&self.cert),
            tls_key: given(&self.key),
        };
        if tls.tls_cert.is_some() != tls.tls_key.is_some() {
            anyhow::bail!(
                "a client certificate needs its key: give both --tls-cert and --tls-key \
                 (executor.tls.cert and executor.tls.key), or neither"
            );
        }
        Ok(tls)
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            scheduler: String::new(),
            pool: "default".into(),
            name: String::new(),
            capacity: 0,
            cpu_millis: 0,
            memory: Size(0),
            disk: Size(0),
            work_dir: PathBuf::new(),
            os_family: "linux".into(),
            arch: String::new(),
            properties: Vec::new(),
            max_action_timeout: Period::secs(3600),
            max_termination_grace: Period::secs(300),
            heartbeat_interval: Period::secs(5),
            cache_size: Size::gib(10),
            executor_token_file: String::new(),
            api_key_file: String::new(),
            monitoring_listen: "off".into(),
            tls: ExecutorTlsConfig::default(),
        }
    }
}

/// A property an executor declares: `KEY=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Property {
    pub key: String,
    pub value: String,
}

impl std::str::FromStr for Property {
    type Err = String;
    fn from_str(text: &str) -> Result<Property, String> {
        match text.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                // The scheduler refuses these too; said here before connecting.
                kiln_scheduler::session::check_declared(key)?;
                Ok(Property {
                    key: key.to_string(),
                    value: value.to_string(),
                })
            }
            _ => Err(format!("expected KEY=VALUE, got {text:?}")),
        }
    }
}

impl Serialize for Property {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}={}", self.key, self.value))
    }
}

impl<'de> Deserialize<'de> for Property {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Property, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            enabled: true,
            embedded_executor: true,
            pool: "default".into(),
            concurrency: 0,
            max_action_timeout: Period::secs(3600),
            max_termination_grace: Period::secs(300),
            unmatched_grace: Period::millis(2000),
            orphan_grace: Period::millis(5000),
            max_queued_executions: 100_000,
            assignment_margin: Period::secs(600),
            executor_heartbeat_timeout: Period::secs(30),
            max_attempts: 3,
            warm_runner_wait: Period::millis(200),
            cpu_millis: 0,
            memory: Size(0),
            disk: Size(0),
            default_action_cpu_millis: 0,
            default_action_memory: Size(0),
            default_action_disk: Size(0),
            executor_cache_size: Size::gib(10),
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
                memory_bytes: self.memory.bytes(),
                disk_bytes: self.disk.bytes(),
            },
            work_dir,
        )
    }

    /// What an action without estimates reserves.
    pub fn default_action_resources(&self) -> kiln_scheduler::ResourceAmount {
        kiln_scheduler::ResourceAmount {
            cpu_millis: self.default_action_cpu_millis,
            memory_bytes: self.default_action_memory.bytes(),
            disk_bytes: self.default_action_disk.bytes(),
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

/// The work root of an executor whose own directory is `dir` (`kiln
/// executor --work-dir`, or a server's `<data-dir>/execution`): where its
/// actions' workspaces go, as an absolute path, which the launchers'
/// policy takes (see `kiln_sandbox::launch`).
pub fn work_root(dir: &std::path::Path) -> PathBuf {
    let root = dir.join("work");
    std::path::absolute(&root).unwrap_or(root)
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
            shutdown_grace: Period::secs(10),
            max_connections: 4096,
            max_streams_per_connection: 1024,
            monitoring_listen: "127.0.0.1:9090".into(),
            allow_unauthenticated: false,
            log: LogConfig::default(),
            tls: TlsConfig::default(),
            storage: StorageConfig::default(),
            execution: ExecutionConfig::default(),
            executor: ExecutorConfig::default(),
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
            max_size: Size::gib(10),
            memory_cache_size: Size::mib(64),
            memory_cache_max_blob: Size::kib(64),
            max_packed_blob: Size::kib(256),
            recent_blob_memory: Size::gib(1),
            durability: DurabilityMode::GroupCommit,
            sync_interval: Period::secs(1),
            max_batch_total_size: Size::kib(4032),
            bytestream_idle_timeout: Period::secs(60),
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

    /// The config in `path` (the defaults without one).
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
        Config::read(path).map(|(config, _)| config)
    }

    /// The config in `path`, and a note for each old-style key it read
    /// (to log once logging is set up).
    pub fn read(path: Option<&std::path::Path>) -> anyhow::Result<(Config, Vec<String>)> {
        let Some(path) = path else {
            return Ok((Config::default(), Vec::new()));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config file {}: {e}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        let defaults = toml::Table::try_from(Config::default()).expect("the config serializes");
        let mut notes = Vec::new();
        migrate_file(&mut table, &defaults, "", &mut notes);
        // Parsed from text, so an error quotes the line at fault (the
        // rewritten one when an old key was rewritten).
        let text = match notes.is_empty() {
            true => text,
            false => toml::to_string(&table).expect("a table serializes"),
        };
        let config: Config = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        Ok((config, notes))
    }

    /// Every setting as TOML, each under its documentation as comments.
    pub fn to_toml(&self) -> String {
        documented_toml(self)
    }
}

/// Sizes in the config read like the platform properties' (`4KB`, `10GiB`).
pub use kiln_platform::parse_size;

/// Old spellings: a key with a unit suffix (`_ms`, `_s`, `_bytes`) and an
/// integer value, where the key without it is a setting, becomes that
/// setting in that unit (`sync_interval_ms = 1000` → `sync_interval =
/// "1000ms"`), with a note saying so.
fn migrate_file(
    table: &mut toml::Table,
    defaults: &toml::Table,
    path: &str,
    notes: &mut Vec<String>,
) {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        if let (Some(toml::Value::Table(inner)), Some(toml::Value::Table(default))) =
            (table.get_mut(&key), defaults.get(&key))
        {
            migrate_file(inner, default, &format!("{path}{key}."), notes);
            continue;
        }
        let Some(&toml::Value::Integer(n)) = table.get(&key) else {
            continue;
        };
        if defaults.contains_key(&key) {
            continue;
        }
        for (suffix, unit) in [("_ms", "ms"), ("_s", "s"), ("_bytes", "")] {
            let Some(name) = key.strip_suffix(suffix) else {
                continue;
            };
            if !defaults.contains_key(name) || table.contains_key(name) {
                continue;
            }
            let value = match unit {
                "" => toml::Value::Integer(n),
                unit => toml::Value::String(format!("{n}{unit}")),
            };
            notes.push(format!(
                "config key {path}{key} is now {path}{name} (read as {name} = {value}); \
                 the old spelling may go"
            ));
            table.remove(&key);
            table.insert(name.to_string(), value);
            break;
        }
    }
}

/// Old flags: `--X-ms N`, `--X-s N`, `--X-bytes N` (N a whole number),
/// where `--X` is a flag of the subcommand and the suffixed one is not,
/// become `--X=Nms`, `--X=Ns`, `--X=N`.
pub fn migrate_flags(
    command: &clap::Command,
    args: Vec<std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let Some(subcommand) = args
        .iter()
        .skip(1)
        .find_map(|arg| arg.to_str().and_then(|name| command.find_subcommand(name)))
    else {
        return args;
    };
    let is_flag = |name: &str| {
        subcommand.get_arguments().any(|arg| {
            arg.get_long() == Some(name) || arg.get_all_aliases().is_some_and(|a| a.contains(&name))
        })
    };
    let mut out = Vec::with_capacity(args.len());
    let mut rest = args.into_iter();
    while let Some(arg) = rest.next() {
        let Some(flag) = arg
            .to_str()
            .and_then(|a| a.strip_prefix("--"))
            .map(str::to_string)
        else {
            out.push(arg);
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None => (flag.clone(), None),
        };
        let renamed = (!is_flag(&name))
            .then(|| {
                [("-ms", "ms"), ("-s", "s"), ("-bytes", "")]
                    .into_iter()
                    .find_map(|(suffix, unit)| {
                        name.strip_suffix(suffix)
                            .filter(|new| is_flag(new))
                            .map(|new| (new.to_string(), unit))
                    })
            })
            .flatten();
        let Some((new, unit)) = renamed else {
            out.push(arg);
            continue;
        };
        let value = match inline {
            Some(value) => Some(value),
            None => rest.next().and_then(|v| v.into_string().ok()),
        };
        match value {
            Some(value) if value.parse::<u64>().is_ok() => {
                out.push(format!("--{new}={value}{unit}").into())
            }
            // Not the old form: left for clap to refuse, naming it.
            Some(value) => {
                out.push(arg);
                out.push(value.into());
            }
            None => out.push(arg),
        }
    }
    out
}

/// What the sections of the file are for (the settings' own documentation
/// comes from their fields).
fn section_doc(path: &str) -> &'static str {
    match path {
        "log" => "Logging, to stderr.",
        "tls" => {
            "TLS on the gRPC port (`listen`): with `cert` and `key` set, every client \
             (Bazel, executors) must connect with TLS (`grpcs://`); unset, the port is \
             plaintext, and then registry credentials are sent only to executors on loopback."
        }
        "storage" => "The content-addressable store and the action cache.",
        "execution" => {
            "Remote execution: the Execution and Operations services and the executor \
             embedded in the server."
        }
        "execution.isolation" => {
            "How actions are isolated, by the embedded executor and by a `kiln executor` \
             reading this file."
        }
        "execution.isolation.sandbox" => "The `sandbox` isolation type.",
        "execution.isolation.vm" => {
            "The `firecracker` isolation type: a VM per action, booted by QEMU from the \
             action's container image (offered only when listed in `offer`)."
        }
        "execution.inputs" => {
            "How large an action's input tree may be, counted as it is laid out (a directory \
             listed twice counts twice): for the embedded executor and a `kiln executor` \
             reading this file."
        }
        "executor.tls" => "How `kiln executor` reaches a `grpcs://` scheduler.",
        "executor" => {
            "`kiln executor --config FILE`: an executor as its own process. It also reads \
             [log], [execution.isolation] and [execution.inputs]; its flags override these."
        }
        _ => "",
    }
}

/// The help of each setting, as clap has it from the doc comments: for
/// `kiln serve`'s sections, and for `[executor]`.
fn setting_docs() -> [(clap::Command, &'static str); 2] {
    use clap::Args;
    [
        (
            ExecutorConfig::augment_args_for_update(clap::Command::new("kiln")),
            "executor",
        ),
        (
            Config::augment_args_for_update(clap::Command::new("kiln")),
            "",
        ),
    ]
}

/// The documentation of the setting at `path` (`storage.max_size`).
pub fn setting_doc(path: &str) -> Option<String> {
    let key = path.rsplit('.').next()?;
    let docs = setting_docs();
    let (command, _) = docs
        .iter()
        .find(|(_, prefix)| !prefix.is_empty() && path.starts_with(&format!("{prefix}.")))
        .unwrap_or(&docs[1]);
    let arg = command.get_arguments().find(|arg| arg.get_id() == key)?;
    let mut help = arg.get_long_help().or(arg.get_help())?.to_string();
    // clap drops the full stop of a one-paragraph help.
    if !help.ends_with(['.', '!', '?', ':']) {
        help.push('.');
    }
    match arg.get_long() {
        Some(long) => Some(format!("{help}\nFlag: --{long}")),
        None => Some(help),
    }
}

/// `config` as a TOML file in which each setting and section comes under
/// its documentation.
pub fn documented_toml(config: &Config) -> String {
    let table = toml::Table::try_from(config).expect("the config serializes");
    let mut out = String::from(
        "# Kiln's configuration: every setting, at its default unless said\n\
         # otherwise. `kiln serve --config FILE` and `kiln executor --config\n\
         # FILE` read it; each setting's flag wins over the file. Sizes take\n\
         # B, KB, MB, GB, TB or KiB, MiB, GiB, TiB; durations ms, s, m, h.\n",
    );
    write_table(&table, "", &mut out);
    out
}

fn write_table(table: &toml::Table, path: &str, out: &mut String) {
    for (key, value) in table.iter().filter(|(_, v)| !v.is_table()) {
        let doc = setting_doc(&format!("{path}{key}")).unwrap_or_default();
        out.push('\n');
        write_comment(&doc, out);
        out.push_str(&format!("{key} = {value}\n"));
    }
    for (key, value) in table {
        if let toml::Value::Table(inner) = value {
            let section = format!("{path}{key}");
            out.push('\n');
            write_comment(section_doc(&section), out);
            out.push_str(&format!("[{section}]\n"));
            write_table(inner, &format!("{section}."), out);
        }
    }
}

/// `text` as `# ` lines of at most 78 columns, paragraphs and line breaks
/// kept.
fn write_comment(text: &str, out: &mut String) {
    for (i, paragraph) in text.split("\n\n").enumerate() {
        if i > 0 {
            out.push_str("#\n");
        }
        for part in paragraph.lines() {
            write_wrapped(part, out);
        }
    }
}

fn write_wrapped(paragraph: &str, out: &mut String) {
    let mut line = String::from("#");
    for word in paragraph.split_whitespace() {
        if line.len() + 1 + word.len() > 78 && line.len() > 1 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    if line.len() > 1 {
        out.push_str(&line);
        out.push('\n');
    }
}

/// How large an action's input tree may be, counted as it is laid out (a
/// directory listed twice counts twice). Shared by the embedded executor
/// (`[execution.inputs]`) and `kiln executor`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct InputLimitSettings {
    /// Most files, symlinks and directories in one input tree.
    #[arg(long)]
    pub max_input_entries: u64,
    /// Most directory levels below the input root.
    #[arg(long)]
    pub max_input_depth: u32,
    /// Most bytes of files in one input tree (`64GiB`, `500MB`, ...).
    #[arg(long)]
    pub max_input_bytes: Size,
}

impl Default for InputLimitSettings {
    fn default() -> Self {
        let limits = kiln_worker::inputs::InputLimits::default();
        InputLimitSettings {
            max_input_entries: limits.max_entries,
            max_input_depth: limits.max_depth,
            max_input_bytes: Size(limits.max_bytes),
        }
    }
}

impl InputLimitSettings {
    /// The limits these settings describe.
    pub fn limits(&self) -> kiln_worker::inputs::InputLimits {
        kiln_worker::inputs::InputLimits {
            max_entries: self.max_input_entries,
            max_depth: self.max_input_depth,
            max_bytes: self.max_input_bytes.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};

    /// `kiln serve`'s shape: the file's path and the flags over it.
    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        settings: Flags<Config>,
    }

    fn with_flags(file: &str, flags: &[&str]) -> Config {
        let table: toml::Table = toml::from_str(file).unwrap();
        let mut config = Config::deserialize(table).unwrap();
        let command = Serve::augment_args(clap::Command::new("serve").no_binary_name(true));
        let matches = command.try_get_matches_from(flags).unwrap();
        let serve = Serve::from_arg_matches(&matches).unwrap();
        serve.settings.apply(&mut config).unwrap();
        config
    }

    #[test]
    fn the_printed_default_parses_back_to_the_defaults() {
        let text = Config::default().to_toml();
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed, Config::default());
        assert!(
            toml::from_str::<Config>("bogus = 1").is_err(),
            "unknown keys are rejected"
        );
    }

    #[test]
    fn every_setting_and_section_is_printed_under_its_documentation() {
        fn walk(table: &toml::Table, path: &str, text: &str) -> usize {
            let mut count = 0;
            for (key, value) in table {
                let full = format!("{path}{key}");
                match value {
                    toml::Value::Table(inner) => {
                        assert!(
                            !section_doc(&full).is_empty(),
                            "section [{full}] has no doc"
                        );
                        assert!(
                            text.contains(&format!("#\n[{full}]\n")) || {
                                let at = text.find(&format!("\n[{full}]\n")).unwrap();
                                text[..at].rsplit('\n').next().unwrap().starts_with('#')
                            }
                        );
                        count += walk(inner, &format!("{full}."), text);
                    }
                    _ => {
                        let doc = setting_doc(&full)
                            .unwrap_or_else(|| panic!("setting {full} has no documentation"));
                        assert!(doc.len() > 20, "{full}: {doc:?}");
                        count += 1;
                    }
                }
            }
            count
        }
        let text = Config::default().to_toml();
        // Each `key = value` line comes right under a comment line.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.starts_with('#') && !line.starts_with('[') && !line.is_empty() {
                assert!(
                    lines[i - 1].starts_with('#'),
                    "{line} has no comment above it"
                );
            }
        }
        let table = toml::Table::try_from(Config::default()).unwrap();
        let settings = walk(&table, "", &text);
        assert!(settings > 80, "{settings} settings");
        // The text is the flag's help.
        assert!(text.contains(
            "# Blobs up to this size are cached in the memory tier.\n# Flag: --memory-cache-max-blob\nmemory_cache_max_blob = \"64KiB\""
        ), "{text}");
    }

    #[test]
    fn sizes_and_durations_read_and_print_with_units() {
        for (text, bytes, printed) in [
            ("10GiB", 10 << 30, "10GiB"),
            ("4032KiB", 4032 << 10, "4032KiB"),
            ("1.5M", 1_500_000, "1500000"),
            ("0", 0, "0"),
        ] {
            let size: Size = text.parse().unwrap();
            assert_eq!(size.bytes(), bytes);
            assert_eq!(size.to_string(), printed);
            assert_eq!(printed.parse::<Size>().unwrap(), size);
        }
        for (text, printed) in [
            ("1h30m", "1h30m"),
            ("3600s", "1h"),
            ("2000ms", "2s"),
            ("200ms", "200ms"),
            ("0s", "0s"),
            ("90s", "1m30s"),
        ] {
            let period: Period = text.parse().unwrap();
            assert_eq!(period.to_string(), printed);
            assert_eq!(printed.parse::<Period>().unwrap(), period);
        }
        let error = toml::from_str::<Config>("[storage]\nsync_interval = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sync_interval") && error.contains("\"5ms\""),
            "{error}"
        );
        let error = toml::from_str::<Config>("[storage]\nmax_size = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("max_size") && error.contains("lots"),
            "{error}"
        );
        // A bare number of bytes is still a size.
        let config: Config = toml::from_str("[storage]\nmax_size = 1000\n").unwrap();
        assert_eq!(config.storage.max_size, Size(1000));
    }

    #[test]
    fn flags_win_over_the_file_and_leave_the_rest_alone() {
        let file = "allow_unauthenticated = true\n[storage]\nmax_size = \"1GiB\"\nsync_interval = \"3s\"\n\
                    [execution]\nenabled = false\n[execution.isolation]\noffer = [\"none\"]\n";
        let config = with_flags(file, &[]);
        assert!(config.allow_unauthenticated);
        assert!(!config.execution.enabled);
        assert_eq!(config.storage.max_size, Size::gib(1));
        let config = with_flags(
            file,
            &[
                "--max-size",
                "2GB",
                "--execution-enabled",
                "true",
                "--isolation",
                "none,sandbox",
                "--unmatched-grace",
                "1m",
                "--sandbox-root-mount-point",
                "/tmp/x",
            ],
        );
        assert_eq!(config.storage.max_size, Size(2_000_000_000));
        assert_eq!(
            config.storage.sync_interval,
            Period::secs(3),
            "not given: the file's"
        );
        assert!(
            config.allow_unauthenticated,
            "a bool not given keeps the file's"
        );
        assert!(config.execution.enabled);
        assert_eq!(config.execution.isolation.offer, ["none", "sandbox"]);
        assert_eq!(config.execution.unmatched_grace, Period::secs(60));
        assert_eq!(
            config.execution.isolation.sandbox.root_mount_point,
            PathBuf::from("/tmp/x")
        );
        // A bool flag without a value is `true`, as before.
        let config = with_flags("", &["--allow-unauthenticated"]);
        assert!(config.allow_unauthenticated);
    }

    #[test]
    fn an_executor_client_certificate_needs_its_key() {
        let tls = ExecutorTlsConfig {
            cert: "client.pem".into(),
            ..ExecutorTlsConfig::default()
        };
        let error = tls.client().unwrap_err().to_string();
        assert!(error.contains("--tls-key"), "{error}");
        let tls = ExecutorTlsConfig {
            ca: "ca.pem".into(),
            ..ExecutorTlsConfig::default()
        };
        assert_eq!(tls.client().unwrap().tls_ca, Some(PathBuf::from("ca.pem")));
    }

    #[test]
    fn old_keys_with_a_unit_suffix_are_read_as_the_new_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.toml");
        std::fs::write(
            &path,
            "shutdown_grace_ms = 2500\n[storage]\nsync_interval_ms = 500\n\
             [execution]\nmax_action_timeout_s = 60\nmemory_bytes = 1000\n\
             [execution.isolation]\nprobe_timeout_s = 5\n",
        )
        .unwrap();
        let (config, notes) = Config::read(Some(&path)).unwrap();
        assert_eq!(config.shutdown_grace, Period::millis(2500));
        assert_eq!(config.storage.sync_interval, Period::millis(500));
        assert_eq!(config.execution.max_action_timeout, Period::secs(60));
        assert_eq!(config.execution.memory, Size(1000));
        assert_eq!(config.execution.isolation.probe_timeout, Period::secs(5));
        assert_eq!(notes.len(), 5, "{notes:?}");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("storage.sync_interval_ms is now storage.sync_interval")),
            "{notes:?}"
        );
    }

    #[test]
    fn old_flags_with_a_unit_suffix_are_read_as_the_new_settings() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            command: Sub,
        }
        #[derive(clap::Subcommand)]
        enum Sub {
            Serve(Serve),
        }
        use clap::CommandFactory;
        let args = |list: &[&str]| {
            list.iter()
                .map(std::ffi::OsString::from)
                .collect::<Vec<_>>()
        };
        let migrated = migrate_flags(
            &Cli::command(),
            args(&[
                "kiln",
                "serve",
                "--unmatched-grace-ms",
                "200",
                "--probe-timeout-s=7",
                "--memory-bytes",
                "5",
                "--sync-interval-ms",
                "soon",
                "--max-size",
                "1GiB",
            ]),
        );
        assert_eq!(
            migrated,
            args(&[
                "kiln",
                "serve",
                "--unmatched-grace=200ms",
                "--probe-timeout=7s",
                "--memory=5",
                // Not the old form: left as it was, for clap to refuse.
                "--sync-interval-ms",
                "soon",
                "--max-size",
                "1GiB",
            ])
        );
    }
}
