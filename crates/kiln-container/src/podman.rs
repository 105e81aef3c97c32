//! `workload-isolation-type=podman`: each action in a fresh container of
//! its image, run by the `podman` CLI in the foreground with the action's
//! output files as its stdout and stderr (no terminal, nothing buffered
//! here). Credentials reach `podman pull` in a private temporary authfile,
//! never on a command line. `dockerNetwork=bridge` actions join a network
//! namespace wired as a sandbox action's (`--network ns:PATH`, see
//! [`crate::network`]), never podman's default network.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use kiln_platform::{Platform, RegistryCredentials};
use kiln_sandbox::network::{ActionNetwork, Outbound};
use kiln_worker::persistent::{WorkerProcess, WorkerStart};
use kiln_worker::{
    CancellationToken, CommandSpec, Isolation, Limits, ProcessOutcome, Resident, RunError,
};
use std::io::Write as _;

use crate::image::{pull_error, redact, ImageConfig, ImageStore, Images, ResolvedImage};
use crate::network::NetworkConfig;
use crate::params::{owner_and_sweep, Network, RunParameters, OWNER_LABEL};
use crate::supervise::{supervise, Container, RemovalGuard};
use crate::trial::TrialRuntime;
use crate::warm::{self, AgentFile, Removal, RunnerContainer, StartsRunners};

/// How the `podman` backend finds its CLI and resolves images.
#[derive(Debug, Clone)]
pub struct PodmanConfig {
    /// The `podman` binary (looked up in `PATH` when it has no `/`).
    pub binary: PathBuf,
    /// Images: default image, insecure registries, resolution TTL.
    pub images: ImageConfig,
    /// Who this executor is on the daemon: its containers carry the label
    /// `kiln.owner=<owner>`, and at probe the containers of the same owner
    /// that a previous process left behind are removed. Executors sharing
    /// a daemon need distinct owners (e.g. their worker names). None: a
    /// random owner per process, and no sweep.
    pub owner: Option<String>,
    /// How `dockerNetwork=bridge` actions are isolated.
    pub network: NetworkConfig,
}

impl Default for PodmanConfig {
    fn default() -> PodmanConfig {
        PodmanConfig {
            binary: "podman".into(),
            images: ImageConfig::default(),
            owner: None,
            network: NetworkConfig::default(),
        }
    }
}

/// The `podman` isolation backend.
pub struct Podman {
    binary: PathBuf,
    images: Images,
    /// What `dockerNetwork=bridge` actions' namespaces are wired to, or
    /// why this host cannot give them one.
    network: Result<Arc<Outbound>, String>,
    /// How an OOM kill is told apart from any other SIGKILL.
    oom_check: OomCheck,
    /// The `kiln.owner` label of this backend's containers.
    owner: String,
    /// `--ulimit` values every container gets (see [`ContainerUlimits`]).
    ulimits: ContainerUlimits,
    /// The working directory of every podman command: conmon writes a file
    /// named `oom` into it when a container is killed for memory, which
    /// must not land wherever the executor was started.
    cwd: tempfile::TempDir,
    /// The agent mounted into warm runner containers ([`crate::warm`]).
    agent: AgentFile,
}

/// The nofile and nproc limits of each container, both always passed.
///
/// Rootful podman 4.3 asks its OCI runtime for nofile and nproc of 1048576
/// unless told otherwise, and root without `CAP_SYS_RESOURCE` (as on
/// virtualised hosts like the ones Kiln's CI uses) cannot raise a limit past
/// its own hard limit, so every container then fails to start ("error
/// setting rlimit type 7"). So each container asks for no more than this
/// process has. Both are passed because a `--ulimit` on the command line
/// replaces podman's configured list as a whole, and the one left out
/// would go back to 1048576.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContainerUlimits {
    nofile: u64,
    nproc: u64,
}

/// What a container asks for when the host allows more: podman's own
/// defaults for nofile, and for nproc the most conmon and runc were
/// measured to be given here (32768).
const NOFILE_CEILING: u64 = 1_048_576;
const NPROC_CEILING: u64 = 32_768;

impl ContainerUlimits {
    /// The limits that fit this process: its hard limits, capped by the
    /// kernel's `nr_open` and `pid_max` and the ceilings above.
    fn of_this_process() -> ContainerUlimits {
        use rustix::process::{getrlimit, Resource};
        let hard = |resource| getrlimit(resource).maximum.unwrap_or(u64::MAX);
        let sysctl = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        };
        ContainerUlimits {
            nofile: hard(Resource::Nofile)
                .min(sysctl("/proc/sys/fs/nr_open"))
                .min(NOFILE_CEILING),
            nproc: hard(Resource::Nproc)
                .min(sysctl("/proc/sys/kernel/pid_max"))
                .min(NPROC_CEILING),
        }
    }

    fn arguments(&self) -> [String; 2] {
        [
            format!("--ulimit=nofile={0}:{0}", self.nofile),
            format!("--ulimit=nproc={0}:{0}", self.nproc),
        ]
    }
}

/// How the backend learns that the kernel killed an action for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OomCheck {
    /// `podman inspect` (conmon watches the container's cgroup): the
    /// container must outlive its exit, so no `--rm`.
    Inspect,
    /// cgroup v1 with podman managing cgroups itself, where conmon misses
    /// OOM kills: the container runs under a parent cgroup of Kiln's
    /// (`/sys/fs/cgroup/memory/kiln/<name>`), which survives the
    /// container; a SIGKILL while that parent's peak usage reached the
    /// limit was the OOM killer.
    CgroupV1Peak,
}

/// Where `OomCheck::CgroupV1Peak` puts each action's parent cgroup.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_PARENT: &str = "kiln";

impl Podman {
    /// Checks the CLI answers (`podman version`, then `podman info` for its
    /// OCI runtime), then runs a trial container ([`crate::trial`]); a
    /// human reason when it cannot run containers.
    pub async fn probe(config: PodmanConfig) -> Result<Podman, String> {
        let binary = config.binary.clone();
        let shown = binary.display().to_string();
        let images = Images::new("podman", config.images).map_err(|e| format!("podman: {e}"))?;
        let (owner, sweep) = owner_and_sweep(config.owner.as_deref());
        let podman = Podman {
            binary,
            images,
            network: Err("not probed yet".into()),
            oom_check: OomCheck::Inspect,
            owner,
            ulimits: ContainerUlimits::of_this_process(),
            cwd: tempfile::Builder::new()
                .prefix("kiln-podman-")
                .tempdir()
                .map_err(|e| format!("podman: creating its working directory: {e}"))?,
            agent: AgentFile::write()
                .map_err(|e| format!("podman: writing the runners' agent: {e}"))?,
        };
        // What does not depend on another answer is done at once: `info`
        // alone takes ~0.4 s. The sweep must end before the trial starts
        // (the trial's container carries the owner's label).
        let outbound = config.network.clone();
        let (version, info, network, swept, trial_image) = tokio::join!(
            podman.output(&["version", "--format", "{{.Client.Version}}"]),
            podman.output(&[
                "info",
                "--format",
                "{{.Host.OCIRuntime.Name}} {{.Host.CgroupsVersion}} {{.Host.CgroupManager}}",
            ]),
            tokio::task::spawn_blocking(move || {
                Outbound::set_up(&outbound.cidr, &outbound.nft_binary).map(Arc::new)
            }),
            async {
                match sweep {
                    true => podman.remove_leftovers().await,
                    false => Ok(()),
                }
            },
            crate::trial::trial_image(&podman),
        );
        let version = version.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("podman: no binary {shown}"),
            _ => format!("podman: cannot run {shown}: {e}"),
        })?;
        if !version.status.success() {
            return Err(format!(
                "podman: `{shown} version` failed: {}",
                String::from_utf8_lossy(&version.stderr).trim()
            ));
        }
        let info = info.map_err(|e| format!("podman: cannot run {shown} info: {e}"))?;
        if !info.status.success() {
            return Err(format!(
                "podman: `{shown} info` failed: {}",
                String::from_utf8_lossy(&info.stderr).trim()
            ));
        }
        let network = network.unwrap_or_else(|e| Err(format!("setting up networks panicked: {e}")));
        if let Err(reason) = &network {
            tracing::warn!(
                binary = shown,
                %reason,
                "podman actions cannot have an isolated network here: dockerNetwork=bridge actions fail, and actions that leave dockerNetwork unset run without network"
            );
        }
        let info_text = String::from_utf8_lossy(&info.stdout).to_string();
        let mut fields = info_text.split_whitespace();
        let runtime = fields.next().unwrap_or_default().to_string();
        let oom_check = match (fields.next(), fields.next()) {
            (Some("v1"), Some("cgroupfs")) if Path::new(CGROUP_ROOT).join("memory").is_dir() => {
                OomCheck::CgroupV1Peak
            }
            _ => OomCheck::Inspect,
        };
        swept?;
        let trial_image = trial_image?;
        let podman = Podman {
            network,
            oom_check,
            ..podman
        };
        if podman.oom_check == OomCheck::CgroupV1Peak {
            remove_stale_cgroups();
        }
        crate::trial::run_trial_in(&podman, trial_image.as_deref()).await?;
        tracing::info!(
            binary = shown,
            version = %String::from_utf8_lossy(&version.stdout).trim(),
            runtime,
            ?oom_check,
            nofile = podman.ulimits.nofile,
            nproc = podman.ulimits.nproc,
            "podman isolation available"
        );
        Ok(podman)
    }

    /// Whether `dockerNetwork=bridge` actions get an isolated network
    /// here: `Err` says why not (`nft` missing, say).
    pub fn bridge_network(&self) -> Result<(), &str> {
        self.network.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// Returns once the networks of ended actions are all deleted (they
    /// are deleted in the background, after the action's result).
    pub async fn networks_released(&self) {
        if let Ok(outbound) = &self.network {
            outbound.released().await;
        }
    }

    /// A namespace for one bridged action.
    async fn action_network(&self) -> Result<ActionNetwork, RunError> {
        let outbound = match &self.network {
            Ok(outbound) => Arc::clone(outbound),
            Err(reason) => return Err(RunError::Internal(format!("podman: {reason}"))),
        };
        outbound.connect_for_action("podman: action network").await
    }

    /// The image metadata this backend keeps.
    pub fn images(&self) -> &Images {
        &self.images
    }

    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .stdin(Stdio::null())
            .current_dir(self.cwd.path())
            .kill_on_drop(true);
        command
    }

    async fn output(&self, args: &[&str]) -> std::io::Result<Output> {
        self.command().args(args).output().await
    }

    /// Runs podman with `args`; its output, or an error naming `what`.
    async fn checked(&self, args: &[&str], what: &str) -> Result<Output, RunError> {
        let output = self
            .output(args)
            .await
            .map_err(|e| RunError::Internal(format!("podman: {what}: {e}")))?;
        if !output.status.success() {
            return Err(RunError::Internal(format!(
                "podman: {what}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(output)
    }

    async fn remove_leftovers(&self) -> Result<(), String> {
        let filter = format!("label={OWNER_LABEL}={}", self.owner);
        let listed = self
            .checked(
                &["ps", "-a", "-q", "--filter", &filter],
                "listing containers",
            )
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&listed.stdout).to_string();
        let ids: Vec<&str> = text.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(());
        }
        tracing::info!(?ids, "removing leftover containers");
        let mut args = vec!["rm", "-f", "-t", "0", "--ignore"];
        args.extend(ids);
        if let Err(error) = self.checked(&args, "removing leftover containers").await {
            tracing::warn!(%error, "could not remove leftover containers");
        }
        Ok(())
    }

    /// `namespace`: the pinned namespace of a bridged action.
    fn run_arguments(
        params: &RunParameters,
        ulimits: ContainerUlimits,
        auto_remove: bool,
        cgroup_parent: Option<&str>,
        namespace: Option<&Path>,
    ) -> Vec<String> {
        let workspace = params.workspace.display();
        let mut args: Vec<String> = vec![
            "run".into(),
            format!("--name={}", params.name),
            format!("--label={}={}", params.labels[0].0, params.labels[0].1),
            format!("--label={}={}", params.labels[1].0, params.labels[1].1),
            // Prepare pulled it, with the action's credentials.
            "--pull=never".into(),
            format!("--volume={workspace}:{workspace}:rw"),
            format!("--workdir={}", params.working_directory.display()),
            // Output goes straight to the files; no second copy in a log.
            "--log-driver=none".into(),
            match (params.network, namespace) {
                (Network::Bridge, Some(path)) => format!("--network=ns:{}", path.display()),
                _ => "--network=none".into(),
            },
        ];
        if auto_remove {
            args.push("--rm".into());
        }
        if let Some(parent) = cgroup_parent {
            args.push(format!("--cgroup-parent={parent}"));
        }
        args.extend(params.environment.iter().map(|e| format!("--env={e}")));
        if let Some(user) = &params.user {
            args.push(format!("--user={user}"));
        }
        if params.init {
            args.push("--init".into());
        }
        if let Some(memory) = params.memory_bytes {
            args.push(format!("--memory={memory}b"));
            // Equal to the memory limit: no swap on top of it.
            args.push(format!("--memory-swap={memory}b"));
        }
        if let Some(nano) = params.nano_cpus {
            let millis = nano / 1_000_000;
            args.push(format!("--cpus={}.{:03}", millis / 1000, millis % 1000));
        }
        if let Some(pids) = params.pids_max {
            args.push(format!("--pids-limit={pids}"));
        }
        args.extend(ulimits.arguments());
        args.push(params.image.clone());
        args.extend(params.command.iter().cloned());
        args
    }
}

#[async_trait]
impl ImageStore for Podman {
    async fn has_image(&self, pinned: &str) -> Result<bool, RunError> {
        let output = self
            .output(&["image", "exists", pinned])
            .await
            .map_err(|e| RunError::Internal(format!("podman: looking up image {pinned}: {e}")))?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(RunError::Internal(format!(
                "podman: looking up image {pinned}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))),
        }
    }

    async fn pull_image(
        &self,
        image: &ResolvedImage,
        credentials: Option<&RegistryCredentials>,
        insecure: bool,
    ) -> Result<(), RunError> {
        // Always an authfile of our own: with no credentials an empty one,
        // so credentials podman may have stored never stand in.
        let authfile = write_authfile(&image.image.registry, credentials)?;
        let authfile_path = authfile.path().display().to_string();
        let pinned = image.pinned();
        let mut args = vec!["pull", "-q", "--authfile", &authfile_path];
        if insecure {
            args.push("--tls-verify=false");
        }
        args.push(&pinned);
        let output = self.output(&args).await.map_err(|e| {
            RunError::Internal(format!("podman: pulling image {}: {e}", image.image))
        })?;
        drop(authfile);
        if output.status.success() {
            return Ok(());
        }
        let message = redact(String::from_utf8_lossy(&output.stderr).trim(), credentials);
        Err(pull_error("podman", image, &message))
    }
}

#[async_trait]
impl TrialRuntime for Podman {
    fn runtime_name(&self) -> &'static str {
        "podman"
    }

    async fn import_rootfs(&self, reference: &str, rootfs: Vec<u8>) -> Result<(), String> {
        use tokio::io::AsyncWriteExt as _;
        let mut child = self
            .command()
            .args(["import", "--quiet", "-", reference])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let write = async move {
            let written = stdin.write_all(&rootfs).await;
            drop(stdin);
            written
        };
        let (written, output) = tokio::join!(write, child.wait_with_output());
        let output = output.map_err(|e| format!("waiting for podman import: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        written.map_err(|e| format!("writing the image to podman import: {e}"))
    }

    async fn run_local(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        reference: &str,
    ) -> Result<ProcessOutcome, RunError> {
        self.run_once(spec, limits, cancel, reference, true).await
    }
}

/// A containers-auth.json holding `credentials` for `registry`, in a file
/// only root can read, deleted when dropped.
fn write_authfile(
    registry: &str,
    credentials: Option<&RegistryCredentials>,
) -> Result<tempfile::NamedTempFile, RunError> {
    let auths = match credentials {
        Some(c) => {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                c.username,
                c.password.expose()
            ));
            serde_json::json!({ registry: { "auth": auth } })
        }
        None => serde_json::json!({}),
    };
    let content = serde_json::json!({ "auths": auths }).to_string();
    // NamedTempFile creates it with mode 0600.
    let mut file = tempfile::Builder::new()
        .prefix("kiln-podman-auth-")
        .suffix(".json")
        .tempfile()
        .map_err(|e| RunError::Internal(format!("podman: creating an authfile: {e}")))?;
    file.write_all(content.as_bytes())
        .and_then(|()| file.flush())
        .map_err(|e| RunError::Internal(format!("podman: writing an authfile: {e}")))?;
    Ok(file)
}

/// One action's `podman run`, in the foreground.
struct PodmanContainer {
    binary: PathBuf,
    name: String,
    child: tokio::process::Child,
    /// Started with `--rm`: podman removes it once it exits by itself.
    auto_remove: bool,
    exited: bool,
    stopped: bool,
    /// The memory limit and Kiln's parent cgroup (`kiln/<name>`), under
    /// [`OomCheck::CgroupV1Peak`].
    cgroup_peak: Option<(u64, String)>,
    /// The task still removing that cgroup after `remove`, if any.
    cgroup_removal: Option<tokio::task::JoinHandle<()>>,
}

/// Removes the parent cgroup `relative` (and the `conmon` group podman puts
/// in it) from every v1 hierarchy; true when none is left. A group still
/// in use (conmon outliving `podman run` by a moment) stays.
fn try_remove_cgroup(relative: &str) -> bool {
    let Ok(hierarchies) = std::fs::read_dir(CGROUP_ROOT) else {
        return true;
    };
    let mut removed = true;
    for hierarchy in hierarchies.flatten() {
        let dir = hierarchy.path().join(relative);
        let _ = std::fs::remove_dir(dir.join("conmon"));
        if let Err(error) = std::fs::remove_dir(&dir) {
            if error.kind() != std::io::ErrorKind::NotFound {
                removed = false;
            }
        }
    }
    removed
}

/// Removes the parent cgroup `relative`, retrying in the background for a
/// few seconds while conmon still sits in it; the retrying task, if one
/// was needed.
fn remove_cgroup(relative: &str) -> Option<tokio::task::JoinHandle<()>> {
    if try_remove_cgroup(relative) {
        return None;
    }
    let relative = relative.to_string();
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    Some(runtime.spawn(async move {
        let mut delay = Duration::from_millis(50);
        for _ in 0..8 {
            tokio::time::sleep(delay).await;
            if try_remove_cgroup(&relative) {
                return;
            }
            delay *= 2;
        }
        tracing::warn!(cgroup = relative, "could not remove an action's cgroup");
    }))
}

/// Removes the per-action parent cgroups under `kiln/` that are empty and
/// older than a minute (never one a starting container is about to use):
/// what an executor that died left behind.
fn remove_stale_cgroups() {
    let Ok(entries) = std::fs::read_dir(Path::new(CGROUP_ROOT).join("memory").join(CGROUP_PARENT))
    else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .ok()
            .filter(|m| m.is_dir())
            .and_then(|m| m.modified().ok())
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60));
        let name = entry.file_name().to_string_lossy().to_string();
        if stale && name.starts_with("kiln-") {
            try_remove_cgroup(&format!("{CGROUP_PARENT}/{name}"));
        }
    }
}

/// How many times a container's removal is tried before it is left to
/// the next start's sweep.
const REMOVAL_ATTEMPTS: u32 = 3;

/// Removes container `name` (`podman rm -f`), trying again after a pause
/// when podman fails, and saying what it answered: a container left
/// behind is swept only at the executor's next start.
async fn remove_container(binary: &Path, name: &str) {
    for attempt in 1..=REMOVAL_ATTEMPTS {
        let output = tokio::process::Command::new(binary)
            .args(["rm", "-f", "-t", "0", "--ignore", name])
            .stdin(Stdio::null())
            .output()
            .await;
        let said = match output {
            Ok(output) if output.status.success() => return,
            Ok(output) => format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => error.to_string(),
        };
        tracing::warn!(container = name, attempt, answer = %said, "podman could not remove a container");
        if attempt < REMOVAL_ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
        }
    }
}

impl PodmanContainer {
    async fn podman(&self, args: &[&str]) -> Result<Output, RunError> {
        tokio::process::Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| RunError::Internal(format!("podman {}: {e}", args[0])))
    }
}

#[async_trait]
impl Container for PodmanContainer {
    async fn wait(&mut self) -> Result<i64, RunError> {
        let status = self.child.wait().await.map_err(|e| {
            RunError::Internal(format!("podman: waiting for container {}: {e}", self.name))
        })?;
        self.exited = true;
        use std::os::unix::process::ExitStatusExt;
        Ok(match (status.code(), status.signal()) {
            (Some(code), _) => i64::from(code),
            (None, Some(signal)) => 128 + i64::from(signal),
            (None, None) => -1,
        })
    }

    async fn stop(&mut self, grace_seconds: u64) -> Result<(), RunError> {
        self.stopped = true;
        let grace = grace_seconds.to_string();
        let output = self
            .podman(&["stop", "--ignore", "-t", &grace, &self.name])
            .await?;
        if !output.status.success() {
            return Err(RunError::Internal(format!(
                "podman: stopping container {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    async fn oom_killed(&mut self) -> Result<bool, RunError> {
        if let Some((limit, relative)) = &self.cgroup_peak {
            let peak_file = Path::new(CGROUP_ROOT)
                .join("memory")
                .join(relative)
                .join("memory.max_usage_in_bytes");
            let peak = std::fs::read_to_string(&peak_file)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .unwrap_or(0);
            return Ok(peak >= *limit);
        }
        let output = self
            .podman(&["inspect", "--format", "{{.State.OOMKilled}}", &self.name])
            .await?;
        if !output.status.success() {
            return Err(RunError::Internal(format!(
                "podman: inspecting container {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim() == "true")
    }

    async fn remove(&mut self) -> Result<(), RunError> {
        if !(self.auto_remove && self.exited && !self.stopped) {
            let output = self
                .podman(&["rm", "-f", "-t", "0", "--ignore", &self.name])
                .await?;
            if !output.status.success() {
                return Err(RunError::Internal(format!(
                    "podman: removing container {}: {}",
                    self.name,
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
        }
        if let Some((_, relative)) = &self.cgroup_peak {
            self.cgroup_removal = remove_cgroup(relative);
        }
        Ok(())
    }
}

#[async_trait]
impl Isolation for Podman {
    fn name(&self) -> &'static str {
        "podman"
    }

    /// The container's processes end with its PID 1 (its own pid
    /// namespace), and the container is removed before `run` returns.
    /// `run_as` keeps the default: the image's user, or root, is
    /// privileged as far as the executor knows.
    fn stops_every_process(&self) -> bool {
        true
    }

    /// A warm runner is a container with Kiln's agent ([`crate::warm`]).
    async fn settle(&self) {
        crate::warm::settle_removals().await;
    }

    fn keeps_warm_runners(&self) -> bool {
        true
    }

    fn runner_holds_workspace(&self) -> bool {
        true
    }

    async fn run_in_runner(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        resident: &mut Option<Box<dyn Resident>>,
    ) -> Result<ProcessOutcome, RunError> {
        warm::run_in_runner(self, spec, limits, cancel, resident).await
    }

    async fn start_worker_in_runner(
        &self,
        spec: &CommandSpec,
        start: &WorkerStart,
        limits: &Limits,
        resident: &mut Option<Box<dyn Resident>>,
    ) -> Result<WorkerProcess, RunError> {
        warm::start_worker_in_runner(self, spec, start, limits, resident).await
    }

    async fn prepare(
        &self,
        platform: &Platform,
        cancel: &CancellationToken,
    ) -> Result<(), RunError> {
        // The registry is asked (with this action's credentials) unless the
        // same credentials resolved it within the TTL; whether podman holds
        // the image is taken from memory within the TTL too: a `podman image
        // exists` per action would cost ~30 ms, and `run` recovers if the
        // image was removed meanwhile.
        self.images
            .ensure(platform, self, false, cancel)
            .await
            .map(|_| ())
    }

    async fn run(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        let image = self
            .images
            .ensure(&spec.platform, self, false, cancel)
            .await?;
        let pinned = image.pinned();
        let outcome = self.run_once(spec, limits, cancel, &pinned, false).await?;
        // 125: podman itself failed, e.g. because the image we believed it
        // held was removed behind our back. Then pull and run once more.
        if outcome.exit_code == 125 && outcome.stopped.is_none() && !self.has_image(&pinned).await?
        {
            tracing::warn!(%pinned, "podman lost the image; pulling it again");
            self.images.forget_local(&pinned);
            let image = self
                .images
                .ensure(&spec.platform, self, true, cancel)
                .await?;
            return self
                .run_once(spec, limits, cancel, &image.pinned(), false)
                .await;
        }
        Ok(outcome)
    }
}

#[async_trait]
impl StartsRunners for Podman {
    /// Starts a warm runner's container for `spec` (`podman run -d`): its
    /// image and parameters, with the agent as its command
    /// ([`crate::warm`]). A bridged runner keeps its network namespace for
    /// as long as the container lives.
    async fn start_runner(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<RunnerContainer, RunError> {
        let image = self
            .images
            .ensure(&spec.platform, self, false, cancel)
            .await?;
        let pinned = image.pinned();
        let mut params =
            RunParameters::new(spec, limits, &pinned, self.bridge_network(), &self.owner)?;
        // The image's environment is the agent's; each action's own is laid
        // over it by the agent.
        params.environment.clear();
        params.command = warm::agent_command().split_off(1);
        let inspected = self
            .checked(
                &[
                    "image",
                    "inspect",
                    "--format",
                    "{{json .Config.Entrypoint}}",
                    &pinned,
                ],
                &format!("inspecting image {}", image.image),
            )
            .await?;
        let entrypoint: Vec<String> =
            serde_json::from_slice::<Option<Vec<String>>>(&inspected.stdout)
                .ok()
                .flatten()
                .unwrap_or_default();
        let dir = self.agent.runner_dir(&params.name)?;
        let network = match params.network {
            Network::Bridge => Some(self.action_network().await?),
            Network::None => None,
        };
        let mut args = Podman::run_arguments(
            &params,
            self.ulimits,
            false,
            None,
            network.as_ref().map(ActionNetwork::path).as_deref(),
        );
        args.splice(
            1..1,
            [
                "--detach".to_string(),
                format!("--entrypoint={}", warm::AGENT_PATH),
                format!(
                    "--volume={}:{}:ro",
                    self.agent.path().display(),
                    warm::AGENT_PATH
                ),
                format!("--volume={}:{}:rw", dir.path().display(), warm::AGENT_DIR),
            ],
        );
        let binary = self.binary.clone();
        let name = params.name.clone();
        let outbound = self.network.as_ref().ok().cloned();
        let removal = Removal::new(move || async move {
            remove_container(&binary, &name).await;
            if let (Some(network), Some(outbound)) = (network, outbound) {
                outbound.release(network).await;
            }
        });
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.checked(&args, &format!("starting runner container {}", params.name))
            .await?;
        let inspected = self
            .checked(
                &["inspect", "--format", "{{.State.Pid}}", &params.name],
                &format!("inspecting runner container {}", params.name),
            )
            .await?;
        let pid = String::from_utf8_lossy(&inspected.stdout)
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|pid| *pid > 0)
            .ok_or_else(|| {
                RunError::Internal(format!(
                    "podman: runner container {} has no process",
                    params.name
                ))
            })?;
        RunnerContainer::connect(params.name, pid, dir, entrypoint, removal).await
    }
}

impl Podman {
    /// One `podman run` of the action in `image`, a reference podman holds.
    /// `settle`: return only once the container's cgroup is gone too (the
    /// probe's trial, so a process stopped right after start-up leaves
    /// nothing); an action leaves that to a background task instead.
    async fn run_once(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        image: &str,
        settle: bool,
    ) -> Result<ProcessOutcome, RunError> {
        let params = RunParameters::new(spec, limits, image, self.bridge_network(), &self.owner)?;
        let network = match params.network {
            Network::Bridge => Some(self.action_network().await?),
            Network::None => None,
        };
        // `--rm` saves a `podman rm` (a third of a trivial action's time);
        // only telling an OOM kill by `podman inspect` needs the container
        // to outlive its exit.
        let cgroup_peak = match (params.memory_bytes, self.oom_check) {
            (Some(limit), OomCheck::CgroupV1Peak) => {
                Some((limit, format!("{CGROUP_PARENT}/{}", params.name)))
            }
            _ => None,
        };
        let auto_remove = params.memory_bytes.is_none() || cgroup_peak.is_some();
        let (stdout, stderr) = spec.output_fds()?;
        let child = self
            .command()
            .args(Podman::run_arguments(
                &params,
                self.ulimits,
                auto_remove,
                cgroup_peak
                    .as_ref()
                    .map(|(_, relative)| format!("/{relative}"))
                    .as_deref(),
                network.as_ref().map(ActionNetwork::path).as_deref(),
            ))
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                RunError::Internal(format!("podman: starting {}: {e}", self.binary.display()))
            })?;
        let binary = self.binary.clone();
        let name = params.name.clone();
        let cgroup = cgroup_peak.as_ref().map(|(_, relative)| relative.clone());
        let guard = RemovalGuard::new(move || {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    remove_container(&binary, &name).await;
                    if let Some(relative) = cgroup {
                        let _ = remove_cgroup(&relative);
                    }
                });
            }
        });
        let mut container = PodmanContainer {
            binary: self.binary.clone(),
            name: params.name.clone(),
            child,
            auto_remove,
            exited: false,
            stopped: false,
            cgroup_peak,
            cgroup_removal: None,
        };
        let outcome = supervise(
            &mut container,
            limits,
            RunParameters::grace_seconds(limits),
            cancel,
        )
        .await;
        if outcome.is_ok() {
            // supervise removed it; on an error the guard does.
            guard.disarm();
        }
        if let (true, Some(removal)) = (settle, container.cgroup_removal.take()) {
            let _ = removal.await;
        }
        if let (Some(network), Ok(outbound)) = (network, &self.network) {
            // The container is gone (supervise removed it, or it was started
            // with --rm and has exited); on an error the guard removes it
            // soon, and the namespace then has no process left in it anyway.
            outbound.release(network).await;
        }
        outcome
    }
}
