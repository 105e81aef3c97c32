//! `kiln`: one binary for the whole platform. `kiln serve` runs every
//! service on one machine with embedded defaults.
// One call into the C library's allocator, in `allocator`, is the
// binary's only unsafe code.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod allocator;
mod bench;
mod docker_gate;
mod keys;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use kiln::config::{Config, Flags, LogFormat};
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
    /// The process a root executor starts its actions through (started by
    /// the executor itself; not for use by hand).
    #[command(name = kiln_sandbox::launcher::SUBCOMMAND, hide = true)]
    Launcher,
    /// The process a root executor with `--run-as` reaches the Docker
    /// daemon through (started by the executor itself; not for use by
    /// hand).
    #[command(name = docker_gate::SUBCOMMAND, hide = true)]
    DockerGate(docker_gate::DockerGateArgs),
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

/// `kiln executor`'s flags: `--config`, and one flag per setting it reads
/// from the file (see `kiln::config`).
#[derive(clap::Args)]
struct ExecutorArgs {
    /// TOML config file (see `kiln config print-default`): `[executor]`,
    /// `[log]`, `[execution.isolation]` and `[execution.inputs]`.
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten, next_help_heading = "Executor")]
    executor: Flags<kiln::config::ExecutorConfig>,
    #[command(flatten, next_help_heading = "Logging")]
    log: Flags<kiln::config::LogConfig>,
    #[command(flatten, next_help_heading = "Isolation")]
    isolation: Flags<kiln::isolation::IsolationSettings>,
    #[command(flatten, next_help_heading = "Input limits")]
    inputs: Flags<kiln::config::InputLimitSettings>,
}

impl ExecutorArgs {
    /// The file's settings (or the defaults) with the flags over them,
    /// and notes about old-style keys.
    fn to_config(&self) -> anyhow::Result<(Config, Vec<String>)> {
        let (mut config, notes) = Config::read(self.config.as_deref())?;
        self.executor.apply(&mut config.executor)?;
        self.log.apply(&mut config.log)?;
        self.isolation.apply(&mut config.execution.isolation)?;
        self.inputs.apply(&mut config.execution.inputs)?;
        Ok((config, notes))
    }
}

/// A file given as a setting: None when empty.
fn file_setting(path: &str) -> Option<PathBuf> {
    Some(PathBuf::from(path)).filter(|p| !p.as_os_str().is_empty())
}

async fn executor(
    (config, notes): (Config, Vec<String>),
    launchers: Option<LaunchersGone>,
) -> anyhow::Result<()> {
    init_logging(config.log.format, &config.log.level);
    for note in notes {
        tracing::warn!("{note}");
    }
    let settings = config.executor;
    let tls = settings.tls.client()?;
    if settings.scheduler.is_empty() {
        anyhow::bail!("no scheduler: pass --scheduler grpc://HOST:PORT or set executor.scheduler");
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let name = Some(settings.name)
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("kiln-worker-{}", std::process::id()));
    let capacity = if settings.capacity == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        settings.capacity
    };
    let work_dir = Some(settings.work_dir)
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or_else(|| std::env::temp_dir().join(format!("kiln-worker-{name}")));
    let resources = kiln_scheduler::ResourceAmount::given_or_host(
        kiln_scheduler::ResourceAmount {
            cpu_millis: settings.cpu_millis,
            memory_bytes: settings.memory.bytes(),
            disk_bytes: settings.disk.bytes(),
        },
        &work_dir,
    );
    let options = kiln::executor::ExecutorOptions {
        scheduler: settings.scheduler,
        tls,
        pool: settings.pool,
        work_dir,
        name,
        capacity,
        resources,
        os_family: settings.os_family,
        properties: settings
            .properties
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect(),
        arch: Some(settings.arch)
            .filter(|arch| !arch.is_empty())
            .unwrap_or_else(|| {
                match kiln_platform::Arch::host() {
                    kiln_platform::Arch::Arm64 => "arm64",
                    kiln_platform::Arch::Amd64 => "amd64",
                }
                .to_string()
            }),
        max_action_timeout: settings
            .max_action_timeout
            .get()
            .max(std::time::Duration::from_secs(1)),
        max_termination_grace: settings.max_termination_grace.get(),
        cache_max_bytes: settings.cache_size.bytes(),
        isolation: config.execution.isolation,
        input_limits: config.execution.inputs.limits(),
        heartbeat_interval: settings
            .heartbeat_interval
            .get()
            .max(std::time::Duration::from_millis(1)),
        monitoring_listen: kiln::config::monitoring_address(&settings.monitoring_listen)?,
        credential: match (
            file_setting(&settings.executor_token_file),
            file_setting(&settings.api_key_file),
        ) {
            (Some(_), Some(_)) => anyhow::bail!(
                "give --executor-token-file (the shared fleet) or --api-key-file (an \
                 organisation's key), not both"
            ),
            (Some(path), None) => Some(kiln_auth::Credential::executor_token(
                &kiln_auth::ExecutorToken::read(&path).map_err(anyhow::Error::msg)?,
            )),
            (None, Some(path)) => Some(kiln_auth::Credential::api_key(
                &kiln_auth::ApiKey::read(&path).map_err(anyhow::Error::msg)?,
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
        reason = launchers_gone(launchers) => {
            let reason = stopping_without_launchers(&reason);
            stop.cancel();
            if tokio::time::timeout(STOP_WITHOUT_LAUNCHERS, run).await.is_err() {
                tracing::error!("stopped waiting for the executor to stop");
            }
            anyhow::bail!(reason)
        }
    }
    stop.cancel();
    run.await
}

/// What a root process that became a user of its own (`--run-as`) is
/// told when its launchers are all gone, which it cannot start again
/// (see `kiln_sandbox::launcher::keep_running`).
type LaunchersGone = tokio::sync::oneshot::Receiver<String>;

/// How long a process whose launchers are gone waits for its orderly
/// stop before it exits anyway: not for its running actions, which it
/// can no longer signal (they are killed with their cgroups when it
/// starts again), but for its session to end, which gives them back to
/// the scheduler.
const STOP_WITHOUT_LAUNCHERS: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves, with the reason, once `launchers` says they are all gone;
/// never where there is nothing to say it (a process that stays root
/// starts launchers again itself).
async fn launchers_gone(launchers: Option<LaunchersGone>) -> String {
    match launchers {
        Some(gone) => gone
            .await
            .unwrap_or_else(|_| "the thread that kept the launchers running ended".to_string()),
        None => std::future::pending().await,
    }
}

/// The error a process without launchers stops with, logged now: it
/// cannot run actions any more, and exits for a supervisor to start it
/// again, as root.
fn stopping_without_launchers(reason: &str) -> String {
    let reason = format!(
        "{reason}: stopping, since no action can run without one; start Kiln again (as root, \
         with --run-as) to get new launchers"
    );
    tracing::error!("{reason}");
    reason
}

/// `kiln serve`'s flags: `--config`, and one flag per setting of the file
/// (see `kiln::config`); flags win.
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (see `kiln config print-default`).
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Flags<Config>,
}

impl ServeArgs {
    fn to_config(&self) -> anyhow::Result<(Config, Vec<String>)> {
        let (mut config, notes) = Config::read(self.config.as_deref())?;
        self.settings.apply(&mut config)?;
        Ok((config, notes))
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

async fn serve(
    (config, notes): (Config, Vec<String>),
    launchers: Option<LaunchersGone>,
) -> anyhow::Result<()> {
    init_logging(config.log.format, &config.log.level);
    for note in notes {
        tracing::warn!("{note}");
    }
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
        reason = launchers_gone(launchers) => {
            let reason = stopping_without_launchers(&reason);
            if tokio::time::timeout(STOP_WITHOUT_LAUNCHERS, server.stop()).await.is_err() {
                tracing::error!("stopped waiting for the server to stop");
            }
            anyhow::bail!(reason)
        }
    }
    server.stop().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// A root `kiln serve` (`serving`) or `kiln executor`, still with one
/// thread: starts the launchers, this binary run as `kiln launcher` (see
/// `kiln_sandbox::launcher`), which take its root-only steps; keeps only
/// the capabilities its own process still needs ([`capability_needs`]);
/// and refuses to start with a directory or file it can no longer use.
/// With `--run-as`, it becomes that user, and what it returns says when
/// its launchers are all gone (see `kiln_sandbox::launcher::keep_running`).
fn as_root(serving: bool, config: &mut Config) -> anyhow::Result<Option<LaunchersGone>> {
    let run_as = config.execution.isolation.run_as.clone();
    // A user of its own cannot start launchers: it keeps enough for one
    // to start another in place of one that dies.
    let at_least = if run_as.is_empty() {
        1
    } else {
        kiln_sandbox::launcher::TO_KEEP_RUNNING
    };
    let policy = launch_policy(serving, config)?;
    let needs = capability_needs(serving, config)?;
    let user = if run_as.is_empty() {
        None
    } else {
        Some(prepare_for_user(
            serving,
            config,
            needs,
            policy.action_users,
        )?)
    };
    // The launchers hold the work root open from their start (see
    // `kiln_sandbox::privileged::Confinement`), so it is made first.
    if policy.runs_actions {
        make_as_started(&policy.work_root, user, needs);
    }
    let gate = match user {
        Some((uid, _)) if offers(serving, config, &["docker"]) => {
            let owner = container_owner(serving, config)?;
            Some(docker_gate::start(
                &mut config.execution.isolation,
                &owner,
                uid,
                &policy.work_root,
            )?)
        }
        _ => None,
    };
    kiln_sandbox::launcher::install(std::path::Path::new("/proc/self/exe"), at_least, &policy)?;
    if let Some((uid, gid)) = user {
        kiln_sandbox::run_as::switch_to(uid, gid)
            .map_err(|e| anyhow::anyhow!("--run-as {run_as}: switching to uid {uid}: {e}"))?;
    }
    kiln_sandbox::capabilities::keep_only(needs.capabilities()).map_err(|e| {
        anyhow::anyhow!("dropping the capabilities the executor does not need: {e}")
    })?;
    for (flag, path, directory) in used_paths(serving, config) {
        usable_as_root(flag, &path, directory)?;
    }
    if run_as.is_empty() {
        return Ok(None);
    }
    // Started once the process keeps only its capabilities, which takes
    // it being single-threaded.
    let (sender, gone) = tokio::sync::oneshot::channel();
    let sender = std::sync::Arc::new(std::sync::Mutex::new(Some(sender)));
    let tell = move |reason: String| {
        if let Some(sender) = sender.lock().ok().and_then(|mut s| s.take()) {
            let _ = sender.send(reason);
        }
    };
    if let Some(gate) = gate {
        docker_gate::watch(gate, tell.clone())?;
    }
    std::thread::Builder::new()
        .name("kiln-launchers".into())
        .spawn(move || tell(kiln_sandbox::launcher::keep_running()))?;
    Ok(Some(gone))
}

/// The `kiln.owner` of the containers of a server's embedded executor
/// (`serving`) or an executor with `config`, as it names itself once
/// started (see `kiln::isolation::container_owner`).
fn container_owner(serving: bool, config: &Config) -> anyhow::Result<String> {
    if serving {
        return Ok(kiln::isolation::container_owner(true, &config.data_dir));
    }
    anyhow::ensure!(
        !config.executor.work_dir.as_os_str().is_empty(),
        "--run-as with docker needs --work-dir: the docker gate lets the executor bind only \
         what is under it"
    );
    Ok(kiln::isolation::container_owner(
        false,
        &config.executor.work_dir,
    ))
}

/// What the launchers of a server (`serving`) or an executor with
/// `config` may start (see `kiln_sandbox::launch`): workspaces under its
/// work root, the sandbox's view of the host, plain processes as its
/// action users (or as whom `--none-allow-user-switch` lets actions
/// choose). Fixed here, while the process is root.
fn launch_policy(serving: bool, config: &Config) -> anyhow::Result<kiln_sandbox::launch::Policy> {
    let isolation = &config.execution.isolation;
    let runs_actions = runs_actions(serving, config);
    let work_root = if serving {
        kiln::config::work_root(&config.data_dir.join("execution"))
    } else {
        kiln::config::work_root(&config.executor.work_dir)
    };
    Ok(kiln_sandbox::launch::Policy {
        work_root,
        root_mount_point: isolation.sandbox.root_mount_point.clone(),
        read_only_paths: isolation.sandbox.read_only_paths.clone(),
        hidden_paths: isolation.sandbox.hidden_paths.clone(),
        // How many run at once matters only to whether the range is wide
        // enough, which the executor checks again as it starts.
        action_users: if runs_actions {
            isolation.resolve_action_users(1)?
        } else {
            kiln_worker::users::ActionUsers::One(None)
        },
        none_allow_user_switch: isolation.none_allow_user_switch,
        runs_actions,
    })
}

/// Whether a server (`serving`) or an executor with `config` runs actions
/// at all: a server without an embedded executor runs none.
fn runs_actions(serving: bool, config: &Config) -> bool {
    !serving || (config.execution.enabled && config.execution.embedded_executor)
}

/// Whether a server (`serving`) or an executor with `config` runs actions
/// of one of `types`.
fn offers(serving: bool, config: &Config, types: &[&str]) -> bool {
    runs_actions(serving, config)
        && config
            .execution
            .isolation
            .offer
            .iter()
            .any(|offered| types.contains(&offered.as_str()))
}

/// What a root process does for the user of `--run-as` before it becomes
/// that user (see `kiln_sandbox::run_as`), which it returns: refuses what
/// still needs root in the process itself (container engines, VMs, a port
/// below 1024); hands the user the action cgroups' parents and the
/// directories it writes (created if missing); installs what bridged
/// networks need of the host.
fn prepare_for_user(
    serving: bool,
    config: &mut Config,
    needs: kiln_sandbox::capabilities::Needs,
    action_users: kiln_worker::users::ActionUsers,
) -> anyhow::Result<(u32, u32)> {
    use kiln_worker::users::ActionUsers;
    let spec = config.execution.isolation.run_as.clone();
    let user = kiln_platform::DockerUser::parse("--run-as", &spec)?;
    let (uid, gid) = kiln_worker::users::resolve(&user)
        .map_err(|reason| anyhow::anyhow!("--run-as {spec}: {reason}"))?;
    anyhow::ensure!(
        uid != 0,
        "--run-as {spec}: that is root, not a user of its own"
    );
    let shared = match action_users {
        ActionUsers::One(Some((action_uid, _))) => action_uid == uid,
        ActionUsers::Range { first, last } => (first..=last).contains(&uid),
        ActionUsers::One(None) => false,
    };
    anyhow::ensure!(
        !shared,
        "--run-as {spec}: uid {uid} is also an action user ({action_users}), and actions \
         running as it could reach the executor's process and files; choose another \
         --action-user or --run-as"
    );
    for engine in ["podman", "firecracker"] {
        anyhow::ensure!(
            !offers(serving, config, &[engine]),
            "--run-as {spec}: `{engine}` still needs root in this process (its engine or VM); \
             offer only none and sandbox (--isolation none,sandbox), or leave --run-as unset"
        );
    }
    anyhow::ensure!(
        !needs.low_port,
        "--run-as {spec}: a port below 1024 needs root; listen on a higher one"
    );
    if offers(serving, config, &["none", "sandbox"]) {
        // A parent of the user's own below root's: root executors on the
        // same host keep theirs.
        let parent = &mut config.execution.isolation.sandbox.cgroup_parent;
        *parent = format!("{}/uid-{uid}", parent.trim_end_matches('/'));
        match kiln_sandbox::cgroup::CgroupRoot::detect(parent) {
            Ok(cgroups) => cgroups.give_to(uid, gid).map_err(|e| {
                anyhow::anyhow!("--run-as {spec}: handing the action cgroups to uid {uid}: {e}")
            })?,
            // Said again, with its consequence, when the backends start.
            Err(reason) => tracing::warn!(%reason, "no action cgroups to hand to --run-as"),
        }
    }
    if offers(serving, config, &["sandbox"]) {
        let sandbox = &config.execution.isolation.sandbox;
        if let Err(reason) =
            kiln_sandbox::network::prepare_host(&sandbox.network_cidr, &sandbox.nft_binary)
        {
            // The sandbox's probe says what that means for its actions.
            tracing::warn!(%reason, "preparing the host for bridged networks");
        }
    }
    for (flag, path, directory) in used_paths(serving, config) {
        if directory && !path.as_os_str().is_empty() && !path.exists() {
            std::fs::create_dir_all(&path)
                .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
            rustix::fs::chown(
                &path,
                Some(rustix::process::Uid::from_raw(uid)),
                Some(rustix::process::Gid::from_raw(gid)),
            )
            .map_err(|e| {
                anyhow::anyhow!("{flag} {}: giving it to uid {uid}: {e}", path.display())
            })?;
        }
    }
    Ok((uid, gid))
}

/// Makes `dir` (and what is missing above it) as this process will be
/// once started: `user` (`--run-as`), keeping only the capabilities of
/// `needs` (`kiln_sandbox::run_as::make_directory_as`), so that root's
/// whole power makes nothing this process would then be refused. What it
/// cannot make is left to the checks that follow ([`usable_as_root`]) to
/// name.
fn make_as_started(
    dir: &std::path::Path,
    user: Option<(u32, u32)>,
    needs: kiln_sandbox::capabilities::Needs,
) {
    if let Err(error) = kiln_sandbox::run_as::make_directory_as(dir, user, needs.capabilities()) {
        tracing::debug!(work_root = %dir.display(), %error, "could not make the work root as started");
    }
}

/// What a server (`serving`) or an executor with `config` does that takes
/// a capability: the isolation types it offers, if it runs actions (a
/// server without an embedded executor runs none), and the ports it
/// listens on.
fn capability_needs(
    serving: bool,
    config: &Config,
) -> anyhow::Result<kiln_sandbox::capabilities::Needs> {
    let offers = |types: &[&str]| offers(serving, config, types);
    let monitoring = if serving {
        &config.monitoring_listen
    } else {
        &config.executor.monitoring_listen
    };
    let mut ports = Vec::new();
    if serving {
        ports.push(config.listen.port());
    }
    ports.extend(kiln::config::monitoring_address(monitoring)?.map(|a| a.port()));
    Ok(kiln_sandbox::capabilities::Needs {
        vm_networks: offers(&["firecracker"]),
        vm_disks: offers(&["firecracker"]),
        low_port: ports.iter().any(|port| (1..1024).contains(port)),
    })
}

/// What a server (`serving`) or an executor writes (directories: true)
/// and reads (files: false), by the flag that sets each; empty when unset.
fn used_paths(serving: bool, config: &Config) -> Vec<(&'static str, PathBuf, bool)> {
    let file = |flag, setting: &str| (flag, PathBuf::from(setting), false);
    if serving {
        vec![
            ("--data-dir", config.data_dir.clone(), true),
            file("--tls-cert", &config.tls.cert),
            file("--tls-key", &config.tls.key),
            file("--tls-client-ca", &config.tls.client_ca),
            file(
                "--executor-token-file",
                &config.execution.executor_token_file,
            ),
        ]
    } else {
        let executor = &config.executor;
        vec![
            ("--work-dir", executor.work_dir.clone(), true),
            ("--tls-ca", executor.tls.ca.clone(), false),
            ("--tls-cert", executor.tls.cert.clone(), false),
            ("--tls-key", executor.tls.key.clone(), false),
            file("--executor-token-file", &executor.executor_token_file),
            file("--api-key-file", &executor.api_key_file),
        ]
    }
}

/// Refuses to start when this root process cannot use `path`, as it
/// keeps no capability to read or write past an owner and a mode: a
/// directory (or, while it does not exist, the nearest one above it) it
/// must write to, or a file it must read. Said now, with the way out,
/// rather than as a bare "permission denied" deep in start-up.
fn usable_as_root(flag: &str, path: &std::path::Path, directory: bool) -> anyhow::Result<()> {
    use rustix::fs::Access;
    use std::os::unix::fs::MetadataExt;
    if path.as_os_str().is_empty() {
        return Ok(());
    }
    let (existing, access, needs) = if directory {
        let Some(existing) = path.ancestors().find(|d| d.symlink_metadata().is_ok()) else {
            return Ok(());
        };
        (existing, Access::WRITE_OK | Access::EXEC_OK, "writable")
    } else {
        (path, Access::READ_OK, "readable")
    };
    // access(2) checks a root caller against its permitted capabilities,
    // which no longer hold CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH. A file
    // that is missing is left to the code that reads it to name.
    match rustix::fs::access(existing, access) {
        Err(rustix::io::Errno::ACCESS) => {}
        _ => return Ok(()),
    }
    let meta = existing.metadata()?;
    let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
    if !uid.is_root() {
        anyhow::bail!(
            "{flag} {}: {} (uid {}, mode {:o}) is not {needs} by uid {}, whom --run-as made \
             this process: give it to that user (chown -R {}:{} {}) or choose another",
            path.display(),
            existing.display(),
            meta.uid(),
            meta.mode() & 0o7777,
            uid.as_raw(),
            uid.as_raw(),
            gid.as_raw(),
            existing.display()
        )
    }
    anyhow::bail!(
        "{flag} {}: {} (uid {}, mode {:o}) is not {needs} by this process. Kiln running as \
         root keeps no capability to read or write past a file's owner and mode (README, \
         \"Launchers\"): give it to root (chown root: {}) or choose one root owns",
        path.display(),
        existing.display(),
        meta.uid(),
        meta.mode() & 0o7777,
        existing.display()
    )
}

fn main() -> anyhow::Result<()> {
    // Flags spelled the old way (`--sync-interval-ms 1000`) are read as the
    // settings they name.
    let args = kiln::config::migrate_flags(&Cli::command(), std::env::args_os().collect());
    let cli = Cli::parse_from(args);
    // Settings are read before any thread starts: what a root executor
    // keeps of root's capabilities depends on them.
    let mut configured = match cli.command {
        // Single-threaded, as it must stay: no runtime.
        Command::Launcher => return Ok(kiln_sandbox::launcher::serve()?),
        Command::Serve(ref args) => Some(args.to_config()?),
        Command::Executor(ref args) => Some(args.to_config()?),
        _ => None,
    };
    let mut launchers = None;
    if let Some((config, _)) = configured.as_mut() {
        if rustix::process::geteuid().is_root() {
            launchers = as_root(matches!(cli.command, Command::Serve(_)), config)?;
        }
    }
    // Servers and the benchmark client alike move blobs through buffers
    // they free as fast as they take new ones.
    allocator::keep_freed_buffers();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(_) => serve(configured.expect("read above"), launchers).await,
            Command::Executor(_) => executor(configured.expect("read above"), launchers).await,
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
            Command::Launcher => unreachable!("served above, without a runtime"),
            Command::DockerGate(args) => {
                init_logging(LogFormat::Human, "info");
                docker_gate::run(args).await
            }
        }
    })
}
