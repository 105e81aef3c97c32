//! `workload-isolation-type=docker`: each action in a fresh container of
//! its image, created, attached, started, waited for and removed through
//! the Docker Engine API (bollard, on the daemon's unix socket, API 1.41).
//! Output is streamed from the attach connection into the action's files.
//! `dockerNetwork=bridge` actions run on Kiln's own isolated bridge
//! network ([`crate::network`]), never the daemon's default one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountType};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker as Client};
use futures::StreamExt;
use kiln_platform::{Platform, RegistryCredentials};
use kiln_worker::persistent::{WorkerProcess, WorkerStart};
use kiln_worker::{
    CancellationToken, CommandSpec, Isolation, Limits, ProcessOutcome, Resident, RunError,
};
use tokio::io::AsyncWriteExt;

use crate::image::{pull_error, redact, ImageConfig, ImageStore, Images, ResolvedImage};
use crate::network::{NetworkConfig, DOCKER_NETWORK};
use crate::params::{owner_and_sweep, Network, RunParameters, OWNER_LABEL};
use crate::supervise::{supervise, Container, RemovalGuard};
use crate::trial::TrialRuntime;
use crate::warm::{self, AgentFile, Removal, RunnerContainer, StartsRunners};

/// The Engine API version Kiln speaks (Docker 20.10).
pub(crate) const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// How the `docker` backend reaches its daemon and resolves images.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// The daemon's unix socket.
    pub socket: PathBuf,
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
    /// The executor's work root, where the probe's trial workspace goes
    /// (None: the temporary directory).
    pub work_root: Option<PathBuf>,
    /// Whether `socket` is a docker gate's ([`crate::gate`]), which set up
    /// the bridge network as root: this process only checks it is there.
    pub gated: bool,
}

impl Default for DockerConfig {
    fn default() -> DockerConfig {
        DockerConfig {
            socket: "/var/run/docker.sock".into(),
            images: ImageConfig::default(),
            owner: None,
            network: NetworkConfig::default(),
            work_root: None,
            gated: false,
        }
    }
}

/// The `docker` isolation backend.
pub struct Docker {
    client: Client,
    images: Images,
    /// Whether `dockerNetwork=bridge` actions get Kiln's isolated network
    /// (its subnet), or why not.
    bridge: Result<String, String>,
    /// The `kiln.owner` label of this backend's containers.
    owner: String,
    /// The agent mounted into warm runner containers ([`crate::warm`]).
    agent: AgentFile,
    /// Where the probe's trial workspace goes.
    work_root: Option<PathBuf>,
}

impl Docker {
    /// Connects to the daemon and checks it can run containers (ping, API
    /// version, a runtime in `docker info`), then runs a trial container
    /// ([`crate::trial`]); a human reason when it cannot.
    pub async fn probe(config: DockerConfig) -> Result<Docker, String> {
        let socket = config.socket.display().to_string();
        if !config.socket.exists() {
            return Err(format!("docker: no daemon socket at {socket}"));
        }
        // Requests that legitimately last (a stop waiting out its grace,
        // a pull) have their own bounds; this one only guards the client.
        let client = Client::connect_with_socket(&socket, 7 * 24 * 3600, &API_VERSION)
            .map_err(|e| format!("docker: cannot use {socket}: {e}"))?;
        let answer = |what: &str, e: bollard::errors::Error| {
            format!("docker: the daemon at {socket} does not answer {what}: {e}")
        };
        let bounded = Duration::from_secs(10);
        tokio::time::timeout(bounded, client.ping())
            .await
            .map_err(|_| format!("docker: the daemon at {socket} does not answer a ping"))?
            .map_err(|e| answer("a ping", e))?;
        let version = tokio::time::timeout(bounded, client.version())
            .await
            .map_err(|_| format!("docker: the daemon at {socket} does not answer /version"))?
            .map_err(|e| answer("/version", e))?;
        let api = version.api_version.unwrap_or_default();
        if !api_at_least(&api, &API_VERSION) {
            return Err(format!(
                "docker: the daemon at {socket} speaks Engine API {api}, Kiln needs {API_VERSION}"
            ));
        }
        let info = tokio::time::timeout(bounded, client.info())
            .await
            .map_err(|_| format!("docker: the daemon at {socket} does not answer /info"))?
            .map_err(|e| answer("/info", e))?;
        let runtime = info.default_runtime.clone().unwrap_or_default();
        let has_runtime = info
            .runtimes
            .as_ref()
            .is_some_and(|runtimes| runtimes.contains_key(&runtime));
        if !has_runtime {
            return Err(format!(
                "docker: the daemon at {socket} has no usable default runtime ({runtime:?})"
            ));
        }
        let bridge = if config.gated {
            crate::network::gated_docker(&client).await
        } else {
            crate::network::set_up_docker(&client, &config.network.nft_binary).await
        };
        if let Err(reason) = &bridge {
            tracing::warn!(
                socket,
                %reason,
                "docker actions cannot have an isolated network here: dockerNetwork=bridge actions fail, and actions that leave dockerNetwork unset run without network"
            );
        }
        let images = Images::new("docker", config.images).map_err(|e| format!("docker: {e}"))?;
        let (owner, sweep) = owner_and_sweep(config.owner.as_deref());
        let agent =
            AgentFile::write().map_err(|e| format!("docker: writing the runners' agent: {e}"))?;
        let docker = Docker {
            client,
            images,
            bridge,
            owner,
            agent,
            work_root: config.work_root,
        };
        if sweep {
            docker.remove_leftovers().await?;
        }
        crate::trial::run_trial(&docker).await?;
        tracing::info!(
            socket,
            api = %api,
            server = version.version.as_deref().unwrap_or("?"),
            runtime,
            network = docker.bridge.as_deref().unwrap_or("none"),
            "docker isolation available"
        );
        Ok(docker)
    }

    /// Whether `dockerNetwork=bridge` actions get an isolated network
    /// here: `Err` says why not (`nft` missing, say).
    pub fn bridge_network(&self) -> Result<(), &str> {
        self.bridge.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// The image metadata this backend keeps.
    pub fn images(&self) -> &Images {
        &self.images
    }

    async fn remove_leftovers(&self) -> Result<(), String> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{OWNER_LABEL}={}", self.owner)],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let leftovers = self
            .client
            .list_containers(Some(options))
            .await
            .map_err(|e| format!("docker: cannot list containers: {e}"))?;
        for container in leftovers {
            let Some(id) = container.id else { continue };
            tracing::info!(id, names = ?container.names, "removing a leftover container");
            if let Err(error) = self
                .client
                .remove_container(&id, Some(force_remove()))
                .await
            {
                tracing::warn!(id, %error, "could not remove a leftover container");
            }
        }
        Ok(())
    }

    fn create_body(params: &RunParameters) -> ContainerCreateBody {
        let workspace = params.workspace.display().to_string();
        let to_i64 = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        ContainerCreateBody {
            image: Some(params.image.clone()),
            // Cmd only: the image's ENTRYPOINT stays and receives the arguments.
            cmd: Some(params.command.clone()),
            env: Some(params.environment.clone()),
            working_dir: Some(params.working_directory.display().to_string()),
            user: params.user.clone(),
            labels: Some(params.labels.iter().cloned().collect()),
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            open_stdin: Some(false),
            host_config: Some(HostConfig {
                mounts: Some(vec![Mount {
                    typ: Some(MountType::BIND),
                    source: Some(workspace.clone()),
                    target: Some(workspace),
                    read_only: Some(false),
                    ..Default::default()
                }]),
                network_mode: Some(
                    match params.network {
                        Network::None => "none",
                        Network::Bridge => DOCKER_NETWORK,
                    }
                    .into(),
                ),
                init: Some(params.init),
                memory: params.memory_bytes.map(to_i64),
                // Equal to the memory limit: no swap on top of it.
                memory_swap: params.memory_bytes.map(to_i64),
                nano_cpus: params.nano_cpus.map(to_i64),
                pids_limit: params.pids_max.map(to_i64),
                // Output is read from the attach stream; a log file would
                // copy it to disk a second time.
                log_config: Some(HostConfigLogConfig {
                    typ: Some("none".into()),
                    config: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Removes container `id` in the background (a runner's, or an action's
/// whose run was dropped), saying why if the daemon refuses: a container
/// left behind is swept only at the executor's next start.
async fn remove_logged(client: &Client, id: &str) {
    match client.remove_container(id, Some(force_remove())).await {
        // 404: gone already; 409: its removal is under way.
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }) => {}
        Err(error) => tracing::warn!(
            container = id,
            error = %daemon_error(&error, None),
            "docker could not remove a container"
        ),
    }
}

fn force_remove() -> bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build()
}

/// Whether the daemon's `api` (`1.41`) is at least `wanted`.
fn api_at_least(api: &str, wanted: &ClientVersion) -> bool {
    let mut parts = api.split('.').map(|p| p.parse::<usize>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (wanted.major_version, wanted.minor_version)
}

/// A daemon error, with the password (should it echo it) redacted.
fn daemon_error(
    error: &bollard::errors::Error,
    credentials: Option<&RegistryCredentials>,
) -> String {
    let message = match error {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        bollard::errors::Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    };
    redact(&message, credentials)
}

#[async_trait]
impl ImageStore for Docker {
    async fn has_image(&self, pinned: &str) -> Result<bool, RunError> {
        match self.client.inspect_image(pinned).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(error) => Err(RunError::Internal(format!(
                "docker: inspecting image {pinned}: {}",
                daemon_error(&error, None)
            ))),
        }
    }

    async fn pull_image(
        &self,
        image: &ResolvedImage,
        credentials: Option<&RegistryCredentials>,
        _insecure: bool,
    ) -> Result<(), RunError> {
        // dockerd decides by itself which registries speak plain HTTP
        // (loopback ones and its --insecure-registry list).
        let options = CreateImageOptionsBuilder::default()
            .from_image(&format!(
                "{}/{}",
                image.image.registry, image.image.repository
            ))
            .tag(&image.digest)
            .build();
        let docker_credentials = credentials.map(|c| DockerCredentials {
            username: Some(c.username.clone()),
            password: Some(c.password.expose().to_string()),
            serveraddress: Some(image.image.registry.clone()),
            ..Default::default()
        });
        let mut progress = self
            .client
            .create_image(Some(options), None, docker_credentials);
        while let Some(item) = progress.next().await {
            if let Err(error) = item {
                return Err(pull_error(
                    "docker",
                    image,
                    &daemon_error(&error, credentials),
                ));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl TrialRuntime for Docker {
    fn runtime_name(&self) -> &'static str {
        "docker"
    }

    fn trial_dir(&self) -> Option<&Path> {
        self.work_root.as_deref()
    }

    async fn import_rootfs(&self, reference: &str, rootfs: Vec<u8>) -> Result<(), String> {
        let (repository, tag) = reference.rsplit_once(':').unwrap_or((reference, "latest"));
        let options = CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repository)
            .tag(tag)
            .build();
        let mut progress =
            self.client
                .create_image(Some(options), Some(bollard::body_full(rootfs.into())), None);
        while let Some(item) = progress.next().await {
            item.map_err(|error| daemon_error(&error, None))?;
        }
        Ok(())
    }

    async fn run_local(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        reference: &str,
    ) -> Result<ProcessOutcome, RunError> {
        self.run_container(spec, limits, cancel, reference, None)
            .await
    }
}

/// One action's container on the daemon.
struct DockerContainer {
    client: Client,
    id: String,
}

#[async_trait]
impl Container for DockerContainer {
    async fn wait(&mut self) -> Result<i64, RunError> {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut waited = self.client.wait_container(&self.id, Some(options));
        match waited.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            // bollard turns a non-zero exit into an error.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(error)) => Err(RunError::Internal(format!(
                "docker: waiting for container {}: {}",
                self.id,
                daemon_error(&error, None)
            ))),
            None => Err(RunError::Internal(format!(
                "docker: waiting for container {}: no answer",
                self.id
            ))),
        }
    }

    async fn stop(&mut self, grace_seconds: u64) -> Result<(), RunError> {
        let options = StopContainerOptionsBuilder::default()
            .t(i32::try_from(grace_seconds).unwrap_or(i32::MAX))
            .build();
        match self.client.stop_container(&self.id, Some(options)).await {
            // 304: already stopped.
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(error) => Err(RunError::Internal(format!(
                "docker: stopping container {}: {}",
                self.id,
                daemon_error(&error, None)
            ))),
        }
    }

    async fn oom_killed(&mut self) -> Result<bool, RunError> {
        let inspected = self
            .client
            .inspect_container(&self.id, None)
            .await
            .map_err(|e| {
                RunError::Internal(format!(
                    "docker: inspecting container {}: {}",
                    self.id,
                    daemon_error(&e, None)
                ))
            })?;
        Ok(inspected
            .state
            .and_then(|state| state.oom_killed)
            .unwrap_or(false))
    }

    async fn remove(&mut self) -> Result<(), RunError> {
        match self
            .client
            .remove_container(&self.id, Some(force_remove()))
            .await
        {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            // 409: removal already in progress.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(error) => Err(RunError::Internal(format!(
                "docker: removing container {}: {}",
                self.id,
                daemon_error(&error, None)
            ))),
        }
    }
}

/// Copies the attach stream's stdout and stderr frames into the files.
async fn copy_output(
    mut output: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
    >,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
) -> Result<(), RunError> {
    let open = |path: &Path| {
        let path = path.to_path_buf();
        async move {
            tokio::fs::File::create(&path)
                .await
                .map(tokio::io::BufWriter::new)
                .map_err(|e| RunError::Internal(format!("creating {}: {e}", path.display())))
        }
    };
    let mut stdout = open(&stdout_path).await?;
    let mut stderr = open(&stderr_path).await?;
    let write_error = |path: &Path, e: std::io::Error| {
        RunError::Internal(format!("writing {}: {e}", path.display()))
    };
    while let Some(frame) = output.next().await {
        match frame {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => stdout
                .write_all(&message)
                .await
                .map_err(|e| write_error(&stdout_path, e))?,
            Ok(LogOutput::StdErr { message }) => stderr
                .write_all(&message)
                .await
                .map_err(|e| write_error(&stderr_path, e))?,
            Ok(LogOutput::StdIn { .. }) => {}
            Err(error) => {
                tracing::debug!(%error, "attach stream ended with an error");
                break;
            }
        }
    }
    stdout
        .flush()
        .await
        .map_err(|e| write_error(&stdout_path, e))?;
    stderr
        .flush()
        .await
        .map_err(|e| write_error(&stderr_path, e))?;
    Ok(())
}

#[async_trait]
impl Isolation for Docker {
    fn name(&self) -> &'static str {
        "docker"
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
        self.images
            .ensure(platform, self, true, cancel)
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
        self.run_container(spec, limits, cancel, &image.pinned(), Some(&image))
            .await
    }
}

#[async_trait]
impl StartsRunners for Docker {
    /// Starts a warm runner's container for `spec`: its image and
    /// parameters, with the agent as its command ([`crate::warm`]).
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
        let params = RunParameters::new(spec, limits, &pinned, self.bridge_network(), &self.owner)?;
        let inspected = self.client.inspect_image(&pinned).await.map_err(|e| {
            RunError::Internal(format!(
                "docker: inspecting image {}: {}",
                image.image,
                daemon_error(&e, None)
            ))
        })?;
        let entrypoint = inspected
            .config
            .and_then(|config| config.entrypoint)
            .unwrap_or_default();
        let dir = self.agent.runner_dir(&params.name)?;
        let mut body = Docker::create_body(&params);
        body.entrypoint = Some(warm::agent_command());
        body.cmd = None;
        // The image's environment is the agent's; each action's own is
        // laid over it by the agent.
        body.env = None;
        body.attach_stdout = Some(false);
        body.attach_stderr = Some(false);
        if let Some(mounts) = body.host_config.as_mut().and_then(|h| h.mounts.as_mut()) {
            mounts.extend([
                Mount {
                    typ: Some(MountType::BIND),
                    source: Some(self.agent.path().display().to_string()),
                    target: Some(warm::AGENT_PATH.into()),
                    read_only: Some(true),
                    ..Default::default()
                },
                Mount {
                    typ: Some(MountType::BIND),
                    source: Some(dir.path().display().to_string()),
                    target: Some(warm::AGENT_DIR.into()),
                    read_only: Some(false),
                    ..Default::default()
                },
            ]);
        }
        let options = CreateContainerOptionsBuilder::default()
            .name(&params.name)
            .build();
        let created = self
            .client
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                RunError::Internal(format!(
                    "docker: creating a runner container of {}: {}",
                    image.image,
                    daemon_error(&e, None)
                ))
            })?;
        let client = self.client.clone();
        let id = created.id.clone();
        let removal = Removal::new(move || async move {
            remove_logged(&client, &id).await;
        });
        self.client
            .start_container(&created.id, None)
            .await
            .map_err(|e| {
                RunError::Internal(format!(
                    "docker: starting runner container {}: {}",
                    params.name,
                    daemon_error(&e, None)
                ))
            })?;
        let pid = self
            .client
            .inspect_container(&created.id, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|state| state.pid)
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|pid| *pid > 0)
            .ok_or_else(|| {
                RunError::Internal(format!(
                    "docker: runner container {} has no process",
                    params.name
                ))
            })?;
        RunnerContainer::connect(params.name, pid, dir, entrypoint, removal).await
    }
}

impl Docker {
    /// Runs `spec` in a new container of `image`, a reference the daemon
    /// holds; `pulled`: the registry image it is, pulled again should the
    /// daemon have lost it (None: a local image, the probe's).
    async fn run_container(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        image: &str,
        pulled: Option<&ResolvedImage>,
    ) -> Result<ProcessOutcome, RunError> {
        let params = RunParameters::new(spec, limits, image, self.bridge_network(), &self.owner)?;
        let options = CreateContainerOptionsBuilder::default()
            .name(&params.name)
            .build();
        let body = Docker::create_body(&params);
        let mut created = self
            .client
            .create_container(Some(options.clone()), body.clone())
            .await;
        if let (
            Some(pulled),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }),
        ) = (pulled, &created)
        {
            // The image went away since it was last seen (an image prune):
            // pull it again, and try once more.
            tracing::info!(image = %pulled.image, "image gone from the daemon; pulling it again");
            self.images
                .ensure(&spec.platform, self, true, cancel)
                .await?;
            created = self.client.create_container(Some(options), body).await;
        }
        let created = created.map_err(|e| {
            let shown = pulled.map_or_else(|| image.to_string(), |p| p.image.to_string());
            RunError::Internal(format!(
                "docker: creating a container of {shown}: {}",
                daemon_error(&e, None)
            ))
        })?;
        let client = self.client.clone();
        let id = created.id.clone();
        let guard = RemovalGuard::new(move || {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    remove_logged(&client, &id).await;
                });
            }
        });
        let mut container = DockerContainer {
            client: self.client.clone(),
            id: created.id,
        };

        // Attached before the start, so no output is missed.
        let attach = AttachContainerOptionsBuilder::default()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .build();
        let attached = self
            .client
            .attach_container(&container.id, Some(attach))
            .await
            .map_err(|e| {
                RunError::Internal(format!(
                    "docker: attaching to container {}: {}",
                    container.id,
                    daemon_error(&e, None)
                ))
            })?;
        let copy = tokio::spawn(copy_output(
            attached.output,
            spec.stdout_path.clone(),
            spec.stderr_path.clone(),
        ));
        if let Err(error) = self.client.start_container(&container.id, None).await {
            let message = daemon_error(&error, None);
            container.remove().await?;
            guard.disarm();
            let _ = copy.await;
            // The daemon could not start the command (not found, not
            // executable): the action's failure, reported like a shell would.
            let (exit_code, what) = if message.contains("no such file or directory")
                || message.contains("executable file not found")
            {
                (
                    kiln_worker::process::EXIT_COMMAND_NOT_FOUND,
                    "command not found",
                )
            } else if message.contains("permission denied") {
                (
                    kiln_worker::process::EXIT_CANNOT_EXECUTE,
                    "permission denied",
                )
            } else {
                return Err(RunError::Internal(format!(
                    "docker: starting container {}: {message}",
                    params.name
                )));
            };
            kiln_worker::process::write_stderr(
                &spec.stderr_path,
                &format!("kiln: {}: {what} ({message})\n", params.command[0]),
            )?;
            return Ok(ProcessOutcome::exited(exit_code));
        }
        let outcome = supervise(
            &mut container,
            limits,
            RunParameters::grace_seconds(limits),
            cancel,
        )
        .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                // The guard removes the container, which ends the copy.
                copy.abort();
                return Err(error);
            }
        };
        guard.disarm();
        match copy.await {
            Ok(Ok(())) => Ok(outcome),
            Ok(Err(error)) => Err(error),
            Err(error) => Err(RunError::Internal(format!(
                "docker: copying the output of container {}: {error}",
                params.name
            ))),
        }
    }
}
