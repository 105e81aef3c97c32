//! The `sandbox` backend of [`Isolation`]: probing the host once at
//! start-up, then for each action a cgroup with its limits, a mount plan
//! with its workspace, and the process started into its namespaces
//! through the launcher ([`crate::launcher`]) and handed to the shared
//! supervision ([`process::supervise_process`]).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use kiln_platform::{DockerNetwork, Platform};
use kiln_worker::persistent::{self, WorkerProcess, WorkerStart};
use kiln_worker::process::{self, Limits, ProcessOutcome};
use kiln_worker::trial::TrialAction;
use kiln_worker::{CancellationToken, CommandSpec, Isolation, RunAs, RunError};
use serde::{Deserialize, Serialize};

use crate::cgroup::{Cgroup, CgroupRoot};
use crate::child::{self, Exec, Network, Start, FAILURE_PREFIX};
use crate::cloned::{ClonedChild, Leftovers};
use crate::launch::{Kind, Launch, Planner};
use crate::launcher;
use crate::network::{ActionNetwork, Outbound};
use crate::view::c_path;

/// How the sandbox is set up on this executor (a section of the
/// executor's configuration file).
///
/// Each field is also a flag of `kiln serve` and `kiln executor` (clap
/// reads the doc comments as their help, and `kiln config print-default`
/// prints them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Cgroup that action cgroups are created under: relative to the
    /// executor's own cgroup, or absolute in the hierarchy if it starts
    /// with `/`. Default `kiln`.
    #[arg(long)]
    pub cgroup_parent: String,
    /// Extra host paths actions see read-only at the same path (a
    /// toolchain in /opt, say). Default none.
    #[arg(long = "sandbox-read-only-path")]
    pub read_only_paths: Vec<PathBuf>,
    /// Extra host paths masked inside the exposed ones (besides
    /// [`crate::HIDDEN_PATHS`]). Default none.
    #[arg(long = "sandbox-hidden-path")]
    pub hidden_paths: Vec<PathBuf>,
    /// Refuse to start without cgroup limits (memory, CPU and pids). When
    /// false, a host without them runs sandboxes unlimited, with a warning.
    /// Default true.
    #[arg(long = "sandbox-require-limits", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub require_limits: bool,
    /// Empty host directory each sandbox mounts its root on (privately, so
    /// sandboxes do not see each other's). Created by the probe. Default
    /// `/run/kiln-sandbox`.
    #[arg(long = "sandbox-root-mount-point")]
    pub root_mount_point: PathBuf,
    /// IPv4 range (at most a /30) the private networks of
    /// `dockerNetwork=bridge` actions under `sandbox` and `podman` are
    /// carved from, a /30 each: it must not overlap a network the host
    /// reaches, and every executor on one host must use the same (they
    /// share one nftables table). Default `10.213.0.0/16`.
    #[arg(long = "sandbox-network-cidr")]
    pub network_cidr: String,
    /// The nftables command (a name looked up on PATH, or a path) that
    /// installs the filtering and NAT rules of bridged networks (those of
    /// `docker` and `podman` actions too). Default `nft`.
    #[arg(long)]
    pub nft_binary: PathBuf,
}

impl Default for SandboxConfig {
    fn default() -> SandboxConfig {
        SandboxConfig {
            cgroup_parent: "kiln".into(),
            read_only_paths: Vec::new(),
            hidden_paths: Vec::new(),
            require_limits: true,
            root_mount_point: PathBuf::from("/run/kiln-sandbox"),
            network_cidr: "10.213.0.0/16".into(),
            nft_binary: PathBuf::from("nft"),
        }
    }
}

/// Capabilities a root action keeps (Docker's default set without
/// CAP_MKNOD): enough to chown and bind low ports, not to mount, trace,
/// load modules or reach devices.
const KEPT_CAPABILITIES: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// The capabilities a root action loses: all this kernel knows but
/// [`KEPT_CAPABILITIES`].
pub(crate) fn dropped_capabilities() -> Vec<u32> {
    let cap_last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(40);
    (0..=cap_last)
        .filter(|c| !KEPT_CAPABILITIES.contains(c))
        .collect()
}

/// The smallest memory limit the sandbox applies: a cloned action shares
/// the executor's memory until it execs, and the kernel's OOM killer kills
/// every process sharing the memory of its victim; a limit this size
/// cannot be reached before the exec (nothing else is charged to the
/// fresh cgroup by then).
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;

/// `workload-isolation-type=sandbox`.
#[derive(Debug)]
pub struct Sandbox {
    config: SandboxConfig,
    cgroups: Option<CgroupRoot>,
    /// Plans its actions where no launcher does.
    planner: Arc<Planner>,
    /// What `dockerNetwork=bridge` actions are wired to, or why this host
    /// cannot give them a network of their own.
    network: Result<Arc<Outbound>, String>,
}

impl Sandbox {
    /// Checks that this host can run sandboxes (root, namespaces, cgroups)
    /// by running `true` as a trial action through [`Isolation::run`],
    /// started both ways a real action can be (cloned, and with
    /// `dockerInit`), and returns the backend; or a reason a person can act
    /// on.
    pub async fn probe(config: SandboxConfig) -> Result<Sandbox, String> {
        Sandbox::probe_in(config, &std::env::temp_dir()).await
    }

    /// [`Sandbox::probe`], with the trial actions' workspaces under
    /// `trials`: the work root, on an executor with launchers (whose
    /// policy takes workspaces nowhere else).
    pub async fn probe_in(config: SandboxConfig, trials: &Path) -> Result<Sandbox, String> {
        let sandbox = tokio::task::spawn_blocking(move || Sandbox::check_host(config))
            .await
            .map_err(|e| format!("the sandbox probe panicked: {e}"))??;
        for docker_init in [false, true] {
            let mut platform = Platform::default();
            platform.docker_init = docker_init;
            let trial =
                TrialAction::under(trials, &["true"], &[("PATH", "/usr/bin:/bin")], platform)?;
            trial
                .run_on(&sandbox)
                .await
                .map_err(|reason| match docker_init {
                    true => format!("with dockerInit: {reason}"),
                    false => reason,
                })?;
        }
        Ok(sandbox)
    }

    /// The checks of the host that need no action, and the backend they
    /// allow.
    fn check_host(config: SandboxConfig) -> Result<Sandbox, String> {
        let euid = rustix::process::geteuid().as_raw();
        if !crate::launcher::root_behind() {
            return Err(format!(
                "the sandbox needs root (CAP_SYS_ADMIN for namespaces and mounts) but the executor runs as uid {euid}; \
                 rootless sandboxing through user namespaces is not implemented"
            ));
        }
        std::fs::create_dir_all(&config.root_mount_point)
            .map_err(|e| format!("creating {}: {e}", config.root_mount_point.display()))?;
        let cgroups = match CgroupRoot::detect(&config.cgroup_parent) {
            Ok(root) if root.missing().is_empty() => Some(root),
            Ok(root) if !config.require_limits => {
                tracing::warn!(missing = ?root.missing(), "some cgroup controllers are missing: those limits are not enforced");
                Some(root)
            }
            Ok(root) => {
                return Err(format!(
                    "cgroup controllers {:?} are not mounted, so those limits cannot be enforced",
                    root.missing()
                ))
            }
            Err(reason) if !config.require_limits => {
                tracing::warn!(%reason, "no cgroups: sandboxed actions run without resource limits");
                None
            }
            Err(reason) => return Err(format!("no usable cgroups: {reason}")),
        };
        if let Some(root) = &cgroups {
            root.remove_stale();
        }
        let network = Outbound::set_up(&config.network_cidr, &config.nft_binary)
            .map(Arc::new)
            .map_err(|reason| {
                tracing::warn!(%reason, "sandboxed actions cannot have a bridged network here: dockerNetwork=bridge fails, and actions that do not set dockerNetwork run without network");
                reason
            });
        let sandbox = Sandbox {
            network,
            planner: Arc::new(Planner::sandbox(
                &config.root_mount_point,
                &config.read_only_paths,
                &config.hidden_paths,
            )),
            config,
            cgroups,
        };
        Ok(sandbox)
    }

    /// Whether `dockerNetwork=bridge` actions get a network here: `Err`
    /// says why not (`nft` missing, say).
    pub fn bridge_network(&self) -> Result<(), &str> {
        self.network.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// The network of an action with `docker_network`: none but `lo` for
    /// `off`; a namespace of its own with outbound access for `bridge`, or
    /// when unset where the host allows one (else none). Never the host's.
    async fn network(
        &self,
        docker_network: Option<DockerNetwork>,
    ) -> Result<Option<ActionNetwork>, RunError> {
        let outbound = match (docker_network, &self.network) {
            (Some(DockerNetwork::Off), _) | (None, Err(_)) => return Ok(None),
            (_, Ok(outbound)) => Arc::clone(outbound),
            (Some(DockerNetwork::Bridge), Err(reason)) => {
                return Err(RunError::Unsupported(format!(
                    "dockerNetwork=bridge: this executor cannot give sandboxed actions a network of their own ({reason}); \
                     set dockerNetwork=off, or run the action elsewhere"
                )))
            }
        };
        outbound
            .connect_for_action("sandbox network")
            .await
            .map(Some)
    }

    /// Returns once the networks of ended actions are all deleted (they
    /// are deleted in the background, after the action's result).
    pub async fn networks_released(&self) {
        if let Ok(outbound) = &self.network {
            outbound.released().await;
        }
    }

    /// Where action cgroups go; `None` when running without limits.
    pub fn cgroups(&self) -> Option<&CgroupRoot> {
        self.cgroups.as_ref()
    }

    /// The configuration the sandbox was probed with.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    fn cgroup(&self, limits: &Limits) -> Result<Option<Cgroup>, RunError> {
        let Some(root) = &self.cgroups else {
            return Ok(None);
        };
        root.create(&crate::cgroup::action_cgroup_name(), limits)
            .map(Some)
            .map_err(|e| RunError::Internal(format!("sandbox cgroup: {e}")))
    }
}

/// What an action (or a persistent worker) of `spec` is started into:
/// its limits (memory at least [`MIN_MEMORY_BYTES`]), network, cgroup and
/// what a launcher is asked to start.
struct Confined {
    limits: Limits,
    network: Option<ActionNetwork>,
    cgroup: Option<Cgroup>,
    launch: Launch,
}

impl Sandbox {
    /// The user, network, cgroup and launch of `spec` under `limits`.
    async fn confine(&self, spec: &CommandSpec, limits: &Limits) -> Result<Confined, RunError> {
        let user = resolve_user(&spec.platform, spec.action_user)?;
        let limits = Limits {
            memory_bytes: limits.memory_bytes.map(|b| b.max(MIN_MEMORY_BYTES)),
            ..*limits
        };
        let network = self.network(spec.platform.docker_network).await?;
        let cgroup = self.cgroup(&limits)?;
        let launch = Launch {
            kind: Kind::Sandbox {
                workspace: Some(c_path(&spec.workspace)),
                runner_tmp: spec.runner_tmp.as_deref().map(c_path),
                tmpfs_bytes: limits.memory_bytes,
            },
            network: network
                .as_ref()
                .map_or(Network::Empty, |n| Network::Join(n.namespace())),
            cgroup_join: cgroup.as_ref().map(Cgroup::join_fds).unwrap_or_default(),
            ..Launch::plain(&spec.working_directory, user, Vec::new())
        }
        .giving(&spec.owned_directories);
        Ok(Confined {
            limits,
            network,
            cgroup,
            launch,
        })
    }
}

/// Starts the action (see [`Start`]: by default the action itself is PID
/// 1 of its namespaces, as in a container without `dockerInit`; with it,
/// an init process is PID 1, reaps orphans and lets the polite SIGTERM
/// reach the action) through the launcher, and supervises it. Also how
/// [`crate::plain`] starts a plain process as the action user.
pub(crate) async fn run_started(
    spec: &CommandSpec,
    program: &Path,
    program_name: &str,
    launch: Launch,
    planner: Arc<Planner>,
    limits: &Limits,
    cancel: &CancellationToken,
) -> Result<ProcessOutcome, RunError> {
    let start = Start::of(&spec.platform);
    let stdin = std::fs::File::open("/dev/null")
        .map_err(|e| RunError::Internal(format!("opening /dev/null: {e}")))?;
    let (stdout, stderr) = spec.output_fds()?;
    let exec = Exec::new(program, &spec.arguments, &spec.environment_variables)
        .map_err(|e| RunError::InvalidArgument(format!("{program_name}: {e}")))?;
    let namespaces = matches!(launch.kind, Kind::Sandbox { .. }) || start == Start::WithInit;
    let leftovers = Leftovers::of(&launch, start);
    let spawned = tokio::task::spawn_blocking(move || {
        let stdio = child::Stdio {
            stdin: stdin.as_raw_fd(),
            stdout: stdout.as_raw_fd(),
            stderr: stderr.as_raw_fd(),
        };
        launcher::start(launch, &planner, &exec, &stdio, start)
    })
    .await
    .map_err(|e| RunError::Internal(format!("starting {program_name:?}: {e}")))?;
    let pid = spawned.map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) if namespaces => {
                " (creating namespaces needs CAP_SYS_ADMIN: is the executor in an unprivileged container?)"
            }
            _ => "",
        };
        launcher::start_error(&format!("{program_name:?}"), e, hint)
    })?;
    let child = ClonedChild::new(pid, leftovers)
        .map_err(|e| RunError::Internal(format!("waiting for {program_name:?}: {e}")))?;
    process::supervise_process(child, program_name, limits, cancel).await
}

/// `message`, then what the child's `stderr` says of a failed setup, if
/// anything.
pub(crate) fn with_explanation(message: &str, stderr: &str) -> String {
    match explain(stderr) {
        explained if explained.is_empty() => message.to_string(),
        explained => format!("{message}: {explained}"),
    }
}

/// A setup failure line from the child, with the errno spelled out.
pub(crate) fn explain(stderr: &str) -> String {
    let Some(line) = stderr.lines().find(|l| l.starts_with(FAILURE_PREFIX)) else {
        return stderr.trim().to_string();
    };
    match line
        .rsplit_once("errno ")
        .and_then(|(_, n)| n.trim().parse::<i32>().ok())
    {
        Some(code) => format!("{line} ({})", std::io::Error::from_raw_os_error(code)),
        None => line.to_string(),
    }
}

/// Whom a sandboxed action runs as, `(uid, gid)`: root with
/// `dockerRunAsRoot`; else `dockerUser` (see [`kiln_worker::users`]);
/// else the executor's `action_user`. `None`: root.
pub fn resolve_user(
    platform: &Platform,
    action_user: Option<(u32, u32)>,
) -> Result<Option<(u32, u32)>, RunError> {
    if platform.docker_run_as_root {
        return Ok(None);
    }
    match &platform.docker_user {
        None => Ok(action_user),
        Some(user) => kiln_worker::users::resolve(user)
            .map(Some)
            .map_err(|reason| {
                RunError::InvalidArgument(format!("dockerUser: {reason} on this executor"))
            }),
    }
}

#[async_trait]
impl Isolation for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn run_as(
        &self,
        platform: &Platform,
        action_user: Option<(u32, u32)>,
    ) -> Result<RunAs, RunError> {
        Ok(match resolve_user(platform, action_user)? {
            Some((uid, gid)) if uid != 0 => RunAs::User(uid, gid),
            _ => RunAs::Privileged,
        })
    }

    /// The action is PID 1 of its own pid namespace (or its init is): when
    /// it ends, the kernel kills everything left in the namespace.
    fn stops_every_process(&self) -> bool {
        true
    }

    fn keeps_warm_runners(&self) -> bool {
        true
    }

    async fn run(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        let (program_name, program) = match spec.program()? {
            Ok(found) => found,
            Err(not_found) => return Ok(not_found),
        };
        let Confined {
            limits,
            network,
            cgroup,
            launch,
        } = self.confine(spec, limits).await?;
        let limits = &limits;
        let planner = Arc::clone(&self.planner);
        let result = run_started(
            spec,
            &program,
            &program_name,
            launch,
            planner,
            limits,
            cancel,
        )
        .await;
        // The action (PID 1 of its namespace) is gone: unwire its network.
        if let (Some(network), Ok(outbound)) = (network, &self.network) {
            outbound.release(network).await;
        }
        let mut outcome = match result {
            Ok(outcome) => outcome,
            Err(RunError::Internal(message)) => {
                let stderr = std::fs::read_to_string(&spec.stderr_path).unwrap_or_default();
                return Err(RunError::Internal(with_explanation(
                    &format!("sandbox: {message}"),
                    &stderr,
                )));
            }
            Err(other) => return Err(other),
        };
        if let Some(cgroup) = cgroup {
            outcome.memory_exceeded = outcome.exit_code != 0 && cgroup.memory_exceeded();
            cgroup.remove_off_thread().await;
        }
        Ok(outcome)
    }

    /// The worker in a sandbox of its own, set up as the action's would be
    /// (namespaces, the runner's workspace and /tmp, user, network,
    /// cgroup with the action's limits; `dockerInit` refused) but not
    /// waited for: PID 1 of its
    /// namespace, it lives across the runner's actions, whose inputs
    /// appear in the same workspace directory, until its `WorkerProcess`
    /// is dropped, which kills its namespace, then removes its cgroup and
    /// unwires its network.
    async fn start_worker(
        &self,
        spec: &CommandSpec,
        start: &WorkerStart,
        limits: &Limits,
    ) -> Result<WorkerProcess, RunError> {
        if spec.platform.docker_init {
            return Err(RunError::Unsupported(
                "dockerInit: a persistent worker under workload-isolation-type=sandbox is PID 1 \
                 of its own namespace, with no init before it; remove dockerInit, or \
                 persistentWorkerKey to run the action as an ordinary one"
                    .into(),
            ));
        }
        let Confined {
            network,
            cgroup,
            launch,
            ..
        } = self.confine(spec, limits).await?;
        let planner = Arc::clone(&self.planner);
        let (worker, child) = start_worker_process(spec, start, launch, planner).await?;
        Ok(worker.guarded_by(Box::new(SandboxedWorker {
            _child: child,
            _cgroup: cgroup,
            _network: network,
        })))
    }
}

/// Starts the persistent worker `start` as `launch` (planned by `planner`
/// where no launcher is installed),
/// on pipes of its own; the worker's stderr goes to the runner's file.
/// Returns it with its process, for the caller's guard.
pub(crate) async fn start_worker_process(
    spec: &CommandSpec,
    start: &WorkerStart,
    launch: Launch,
    planner: Arc<Planner>,
) -> Result<(WorkerProcess, ClonedChild), RunError> {
    let (name, program) = persistent::worker_program(spec, start)?;
    let exec = Exec::new(
        &program,
        &start.identity.startup,
        &spec.environment_variables,
    )
    .map_err(|e| RunError::InvalidArgument(format!("persistent worker {name:?}: {e}")))?;
    let (worker_ends, executor_ends) = persistent::worker_pipes()?;
    let stderr = start.open_stderr()?;
    let leftovers = Leftovers::of(&launch, Start::Cloned);
    let spawned = tokio::task::spawn_blocking(move || {
        let stdio = child::Stdio {
            stdin: worker_ends.stdin.as_raw_fd(),
            stdout: worker_ends.stdout.as_raw_fd(),
            stderr: stderr.as_raw_fd(),
        };
        launcher::start(launch, &planner, &exec, &stdio, Start::Cloned)
    })
    .await
    .map_err(|e| RunError::Internal(format!("starting persistent worker {name:?}: {e}")))?;
    let pid = spawned
        .map_err(|e| launcher::start_error(&format!("persistent worker {name:?}"), e, ""))?;
    let child = ClonedChild::new(pid, leftovers)
        .map_err(|e| RunError::Internal(format!("watching persistent worker {name:?}: {e}")))?;
    Ok((executor_ends.worker(start, pid as u32)?, child))
}

/// What a sandboxed persistent worker holds, released when it is dropped
/// in this order (fields drop as declared): its process, PID 1 of its
/// namespace, killed (and so everything in the namespace) and reaped;
/// then its cgroup, emptied and removed; then its network, unwired.
struct SandboxedWorker {
    _child: ClonedChild,
    _cgroup: Option<Cgroup>,
    _network: Option<ActionNetwork>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_section_has_defaults_for_every_field() {
        let empty: SandboxConfig = toml::from_str("").unwrap();
        assert_eq!(empty, SandboxConfig::default());
        let set: SandboxConfig =
            toml::from_str("cgroup_parent = \"/kiln.slice\"\nread_only_paths = [\"/opt/tools\"]\n")
                .unwrap();
        assert_eq!(set.cgroup_parent, "/kiln.slice");
        assert_eq!(set.read_only_paths, [PathBuf::from("/opt/tools")]);
        assert!(set.require_limits);
        assert!(toml::from_str::<SandboxConfig>("cgroup = \"x\"").is_err());
    }

    #[test]
    fn setup_failures_are_spelled_out() {
        let text = "something\nkiln sandbox: mount /run/x/usr: errno 2\n";
        let explained = explain(text);
        assert!(explained.starts_with("kiln sandbox: mount /run/x/usr: errno 2 ("));
        assert!(explained.contains("No such file"));
    }
}
