//! The isolation seam: how an action's command is run. One trait, one
//! implementation per isolation type (`workload-isolation-type`); `none`
//! lives here, `sandbox` in `kiln-sandbox`, `docker` and `podman` in
//! `kiln-container`. Process backends build the command their way and hand
//! it to the shared [`crate::process::supervise`], so lookup, process groups
//! and the stop sequence are written once. [`Isolations`] is the set an
//! executor offers, and picks the backend for each action.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use kiln_platform::{DockerNetwork, IsolationType, Platform};

use crate::error::RunError;
use crate::persistent::{WorkerProcess, WorkerStart};
use crate::process::{self, Limits, ProcessOutcome};
use crate::stdio::OutputPipes;
use crate::workspace::PrivilegedSteps;

/// What to run, where: everything an isolation backend needs.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// `Command.arguments`; the first is the program.
    pub arguments: Vec<String>,
    /// Exactly `Command.environment_variables`, nothing added.
    pub environment_variables: Vec<(String, String)>,
    /// The action's input root on the host.
    pub workspace: PathBuf,
    /// `workspace` joined with `Command.working_directory`.
    pub working_directory: PathBuf,
    /// Files (outside the workspace) that receive stdout and stderr.
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    /// The pipes of the worker's [`crate::stdio`] capture into those files;
    /// without one, the command writes the files directly.
    pub output: Option<OutputPipes>,
    /// The action's parsed platform (header overrides included): container
    /// image and credentials, user, network, init, workspace mode.
    pub platform: Arc<Platform>,
    /// The executor's action user (`uid`, `gid`): whom `none` and
    /// `sandbox` actions run as unless the platform says otherwise. None:
    /// the executor's own user (an executor that is not root cannot switch).
    pub action_user: Option<(u32, u32)>,
    /// Directories of the workspace the executor made for this action,
    /// which belong to the user it runs as by the time it starts, when
    /// that is not root ([`RunAs::User`]; empty otherwise). Changing an
    /// owner is root's: the backends that run actions as such a user
    /// (`none` and `sandbox` in `kiln-sandbox`) do it where they start
    /// them, in the launchers.
    pub owned_directories: Vec<PathBuf>,
    /// A warm runner's own /tmp directory on the host: `sandbox` mounts it
    /// in place of its private tmpfs, so it outlives the action; backends
    /// without a private /tmp ignore it. None: a fresh /tmp.
    pub runner_tmp: Option<PathBuf>,
    /// The Command's declared outputs, relative to `workspace`: what a
    /// backend whose action writes them elsewhere than the host's
    /// workspace (a VM's own disk) brings back into it before they are
    /// collected. Backends that run in the workspace ignore it.
    pub output_paths: Vec<PathBuf>,
    /// Each input file's digest, for a backend that copies the inputs
    /// into a disk of its own and keeps it between actions (a warm VM):
    /// set for kept runners of backends that do not see the host's
    /// workspace, None otherwise.
    pub input_digests: Option<Arc<InputDigests>>,
    /// For a backend whose guest hashes the outputs (a VM): the CAS's
    /// answer to which of them it already holds, and where the backend
    /// records those whose bytes it did not bring back. Set for backends
    /// that do not see the host's workspace.
    pub stored_outputs: Option<Arc<StoredOutputs>>,
}

/// The digest of each input file, by its path relative to the workspace
/// (`/`-separated).
pub type InputDigests = std::collections::HashMap<String, kiln_proto::reapi::Digest>;

/// Which of some digests the CAS lacks, as the action's organisation and
/// instance see it.
pub type FindMissing = Box<
    dyn Fn(
            Vec<kiln_proto::reapi::Digest>,
        )
            -> futures::future::BoxFuture<'static, Result<Vec<kiln_proto::reapi::Digest>, RunError>>
        + Send
        + Sync,
>;

/// Outputs a guest hashed whose bytes the CAS already holds: they are
/// not brought back, and the file at each one's path in the host's
/// workspace is an empty placeholder, which output collection takes the
/// recorded digest for and the file cache never adopts.
pub struct StoredOutputs {
    find_missing: FindMissing,
    stored: std::sync::Mutex<InputDigests>,
}

impl std::fmt::Debug for StoredOutputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredOutputs")
            .field("stored", &*self.stored())
            .finish_non_exhaustive()
    }
}

impl StoredOutputs {
    pub fn new(find_missing: FindMissing) -> StoredOutputs {
        StoredOutputs {
            find_missing,
            stored: Default::default(),
        }
    }

    /// Which of `digests` the CAS lacks.
    pub async fn missing(
        &self,
        digests: Vec<kiln_proto::reapi::Digest>,
    ) -> Result<Vec<kiln_proto::reapi::Digest>, RunError> {
        (self.find_missing)(digests).await
    }

    /// The output at `path` (relative to the workspace, `/`-separated)
    /// was not brought back: the CAS holds its bytes, `digest`.
    pub fn record(&self, path: String, digest: kiln_proto::reapi::Digest) {
        self.stored().insert(path, digest);
    }

    fn stored(&self) -> std::sync::MutexGuard<'_, InputDigests> {
        self.stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What was recorded, emptied for the next action.
    pub fn take(&self) -> InputDigests {
        std::mem::take(&mut *self.stored())
    }
}

impl CommandSpec {
    /// `arguments[0]` and where it resolves to, looked up as a shell would
    /// ([`process::resolve_program`]); when it cannot be found, the
    /// outcome to report instead: exit code 127, and a stderr line naming
    /// the command written to `stderr_path`.
    pub fn program(&self) -> Result<Result<(String, PathBuf), ProcessOutcome>, RunError> {
        let name = self.arguments.first().cloned().unwrap_or_default();
        match process::resolve_program(&name, &self.working_directory, self.path_variable()) {
            Some(path) => Ok(Ok((name, path))),
            None => {
                process::write_stderr(
                    &self.stderr_path,
                    &format!("kiln: {name}: command not found\n"),
                )?;
                Ok(Err(ProcessOutcome::exited(process::EXIT_COMMAND_NOT_FOUND)))
            }
        }
    }

    /// Descriptors for the command's stdout and stderr: the capture's
    /// pipes, or else the files at `stdout_path` and `stderr_path`, created.
    pub fn output_fds(&self) -> Result<(OwnedFd, OwnedFd), RunError> {
        if let Some(pipes) = &self.output {
            return pipes
                .fds()
                .map_err(|e| RunError::io("duplicating the output pipes", e));
        }
        let create = |path: &Path| {
            std::fs::File::create(path)
                .map(OwnedFd::from)
                .map_err(|e| RunError::io(format!("creating {}", path.display()), e))
        };
        Ok((create(&self.stdout_path)?, create(&self.stderr_path)?))
    }

    /// `PATH` from the Command's environment, if it sets one.
    pub fn path_variable(&self) -> Option<&str> {
        self.environment_variables
            .iter()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| value.as_str())
    }
}

/// Whom an action runs as, as far as the executor knows before it starts:
/// what decides how its inputs are laid out (see [`crate::workspace`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// This `uid`, `gid`: not root, without capabilities, and not the owner
    /// of the executor's file cache. Read-only modes keep it from changing
    /// the cache's files, so inputs can be the cache's own inodes.
    User(u32, u32),
    /// Root, a user only the image knows, or the executor's own user: it
    /// may own or override the permissions of the cache's files, so it
    /// must never see them.
    Privileged,
}

/// What a backend keeps alive in a warm runner between its actions: a
/// container with Kiln's agent as its PID 1, say. Dropping it ends it (and
/// every process in it); it lives as long as its runner is kept.
#[async_trait]
pub trait Resident: Send + Sync + std::fmt::Debug {
    /// Runs `spec` inside it, as [`Isolation::run`] would in a fresh runner.
    async fn run(
        &mut self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError>;

    /// Starts a persistent worker inside it, as
    /// [`Isolation::start_worker`] describes; it ends when dropped, or
    /// with this resident.
    async fn start_worker(
        &mut self,
        spec: &CommandSpec,
        start: &WorkerStart,
    ) -> Result<WorkerProcess, RunError>;

    /// Ends it, returning once it is gone (a drop ends it in the
    /// background): what an executor that stops waits for.
    async fn discard(self: Box<Self>) {}

    /// Freezes what runs in it while its runner waits for an action, so
    /// the processes an action left take no CPU meanwhile; undone by
    /// [`Resident::resume`] before the next action. Best effort: a
    /// resident that cannot be frozen keeps running.
    fn pause(&self) {}

    fn resume(&self) {}

    /// Memory its processes use now, in bytes (what a warm runner holds
    /// against the executor's budget for them).
    fn memory_bytes(&self) -> u64 {
        0
    }

    /// True once: when asked after the action it was started for, so
    /// false from its second action on. A runner whose resident was
    /// started for this action (the first, or a replacement for one that
    /// could not be reused) was not warm for it, whatever its directory
    /// was. Residents that are never replaced need not answer.
    fn take_fresh(&mut self) -> bool {
        false
    }

    /// The action it just ran left these output files, each's digest by
    /// its path relative to the workspace (`/`-separated), as the worker
    /// collected them: a resident that copies the workspace into a disk
    /// of its own (a warm VM) holds them for the next action's inputs.
    fn note_outputs(&mut self, _files: InputDigests) {}

    /// Itself as its concrete type, for the backend that left it (a warm
    /// VM that cannot be resumed is replaced by a fresh one, which only
    /// the backend can boot). None: nothing to look at.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}

/// Runs a command under one kind of isolation.
#[async_trait]
pub trait Isolation: Send + Sync {
    /// The `workload-isolation-type` value this backend implements.
    fn name(&self) -> &'static str;

    /// Whom an action with `platform` runs as, given the executor's
    /// `action_user` ([`CommandSpec::action_user`]). The default is the
    /// safe answer.
    fn run_as(
        &self,
        _platform: &Platform,
        _action_user: Option<(u32, u32)>,
    ) -> Result<RunAs, RunError> {
        Ok(RunAs::Privileged)
    }

    /// Whether no process of an action can outlive [`Isolation::run`] (a
    /// pid namespace or a container that is removed). Only then may the
    /// action's output files become cache entries in place: a process
    /// left behind could still write to them through an open descriptor.
    fn stops_every_process(&self) -> bool {
        false
    }

    /// Whether this backend keeps warm runners (`recycle-runner=true`): a
    /// kept action directory, and [`CommandSpec::runner_tmp`] where the
    /// backend has a private /tmp. A backend that does not runs every
    /// action in a fresh runner, and says so in the result's metadata.
    fn keeps_warm_runners(&self) -> bool {
        false
    }

    /// Whether this backend's warm runners hold processes (a container)
    /// that keep the workspace's mount from one action to the next. An
    /// overlay mounted afresh for each action would not reach them, so
    /// their inputs are copied instead ([`crate::workspace::Layout::Copied`]).
    fn runner_holds_workspace(&self) -> bool {
        false
    }

    /// Properties this backend declares of itself (`vmm=qemu-tcg`, say):
    /// the executor advertises them beside its configured ones, and each
    /// result this backend runs records them.
    fn properties(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Whether the action's processes see the host's workspace at all. A
    /// backend that copies the inputs into a disk of its own (a VM) says
    /// no: nothing it runs can reach the file cache, whoever it runs as,
    /// so the inputs are linked from the cache whatever
    /// [`Isolation::run_as`] says.
    fn sees_host_workspace(&self) -> bool {
        true
    }

    /// Runs `spec` in a kept runner. `resident` is what this backend left
    /// in the runner (None on its first action), and what it leaves for
    /// the next. A backend that keeps nothing running between actions runs
    /// it as [`Isolation::run`] does.
    async fn run_in_runner(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        _resident: &mut Option<Box<dyn Resident>>,
    ) -> Result<ProcessOutcome, RunError> {
        self.run(spec, limits, cancel).await
    }

    /// Returns once what this backend ends in the background (a dropped
    /// runner's container, say) has ended: what a stopping executor
    /// waits for after discarding its runners.
    async fn settle(&self) {}

    /// Gets ready for an action with `platform` before its clock starts:
    /// e.g. resolves and pulls its container image (with its credentials).
    /// Runs while the inputs are fetched; must return promptly once
    /// `cancel` fires. Errors name the image or property at fault.
    async fn prepare(
        &self,
        _platform: &Platform,
        _cancel: &CancellationToken,
    ) -> Result<(), RunError> {
        Ok(())
    }

    /// Runs `spec` to completion, or stops it on timeout or `cancel`. A
    /// command that cannot be found is an outcome (exit code 127 and a
    /// stderr naming it), not an error.
    async fn run(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError>;

    /// Starts a persistent worker (`persistentWorkerKey`) with `start`'s
    /// arguments, in `spec`'s working directory and environment, as the
    /// action would run; it lives until the returned process is dropped,
    /// and nothing it starts outlives it. Only backends that keep warm
    /// runners are asked. The default refuses, naming the property and
    /// the type.
    async fn start_worker(
        &self,
        _spec: &CommandSpec,
        _start: &WorkerStart,
        _limits: &Limits,
    ) -> Result<WorkerProcess, RunError> {
        Err(RunError::Unsupported(format!(
            "persistentWorkerKey: workload-isolation-type={} keeps no persistent workers in this \
             Kiln (none, sandbox, docker and podman do); use one of those, or remove recycle-runner to \
             run the action as an ordinary one",
            self.name()
        )))
    }

    /// Starts a persistent worker in a kept runner, whose `resident` is
    /// what this backend keeps in it (started here when None): as
    /// [`Isolation::start_worker`], which is what backends that keep
    /// nothing running between actions do.
    async fn start_worker_in_runner(
        &self,
        spec: &CommandSpec,
        start: &WorkerStart,
        limits: &Limits,
        _resident: &mut Option<Box<dyn Resident>>,
    ) -> Result<WorkerProcess, RunError> {
        self.start_worker(spec, start, limits).await
    }
}

/// What an action asks of `none` beyond a plain child process of the
/// executor in the host's namespaces, as `key=value`:
/// `dockerNetwork=off`, `dockerInit=true`, `dockerRunAsRoot=true`,
/// `dockerUser=…`, in that order. A backend that cannot honour one refuses
/// the action naming it rather than run it without.
pub fn beyond_plain_process(platform: &Platform) -> Vec<String> {
    let mut asked = Vec::new();
    if platform.docker_network == Some(DockerNetwork::Off) {
        asked.push("dockerNetwork=off".to_string());
    }
    if platform.docker_init {
        asked.push("dockerInit=true".to_string());
    }
    if platform.docker_run_as_root {
        asked.push("dockerRunAsRoot=true".to_string());
    }
    if let Some(user) = &platform.docker_user {
        asked.push(format!("dockerUser={user}"));
    }
    asked
}

/// `workload-isolation-type=none`: a plain child process of the executor,
/// as the executor's own user. It has no namespaces or user of its own to
/// give, so it refuses what [`beyond_plain_process`] lists
/// (FAILED_PRECONDITION), and an executor's action user; on a root
/// executor `kiln_sandbox::PlainProcess` honours them instead, starting
/// actions through the launchers.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIsolation;

impl NoIsolation {
    /// An action user needs root's steps (the workspace given to it, the
    /// switch), which are `kiln_sandbox::PlainProcess`'s, not this one's.
    fn refuse_action_user(action_user: Option<(u32, u32)>) -> Result<(), RunError> {
        match action_user {
            None | Some((0, _)) => Ok(()),
            Some((uid, gid)) => Err(RunError::Internal(format!(
                "the action user {uid}:{gid}: this none backend runs actions as the executor's \
                 own user; an executor with an action user runs them with kiln_sandbox's \
                 PlainProcess"
            ))),
        }
    }

    /// FAILED_PRECONDITION naming the first of [`beyond_plain_process`].
    fn refuse_extras(platform: &Platform) -> Result<(), RunError> {
        match beyond_plain_process(platform).first() {
            None => Ok(()),
            Some(asked) => Err(RunError::Unsupported(format!(
                "{asked}: workload-isolation-type=none runs this action as a plain child process \
                 of the executor, which cannot honour it here; use workload-isolation-type=sandbox, \
                 docker or podman, or remove the property"
            ))),
        }
    }
}

#[async_trait]
impl Isolation for NoIsolation {
    fn name(&self) -> &'static str {
        "none"
    }

    fn run_as(
        &self,
        platform: &Platform,
        action_user: Option<(u32, u32)>,
    ) -> Result<RunAs, RunError> {
        NoIsolation::refuse_extras(platform)?;
        NoIsolation::refuse_action_user(action_user)?;
        Ok(RunAs::Privileged)
    }

    async fn run(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        NoIsolation::refuse_extras(&spec.platform)?;
        NoIsolation::refuse_action_user(spec.action_user)?;
        let (program_name, program) = match spec.program()? {
            Ok(found) => found,
            Err(not_found) => return Ok(not_found),
        };
        let (stdout, stderr) = spec.output_fds()?;
        let mut command = tokio::process::Command::new(&program);
        command
            .arg0(&program_name)
            .args(&spec.arguments[1..])
            .env_clear()
            .envs(spec.environment_variables.iter().cloned())
            .current_dir(&spec.working_directory)
            .stdout(stdout)
            .stderr(stderr);
        process::supervise(command, &program_name, &spec.stderr_path, limits, cancel).await
    }

    async fn start_worker(
        &self,
        spec: &CommandSpec,
        start: &WorkerStart,
        _limits: &Limits,
    ) -> Result<WorkerProcess, RunError> {
        NoIsolation::refuse_extras(&spec.platform)?;
        NoIsolation::refuse_action_user(spec.action_user)?;
        crate::persistent::spawn(spec, start).await
    }
}

/// The isolation backends an executor offers, and the one used when an
/// action names none (`workload-isolation-type` unset); with them, what
/// takes the workspace's steps only root can take (overlays, directories
/// given to an action's user outside a start).
#[derive(Clone)]
pub struct Isolations {
    backends: Vec<Arc<dyn Isolation>>,
    default: &'static str,
    privileged_steps: Option<Arc<dyn PrivilegedSteps>>,
}

impl Isolations {
    /// A set holding `default` only, used for actions that name no type.
    pub fn new(default: Arc<dyn Isolation>) -> Isolations {
        Isolations {
            default: default.name(),
            backends: vec![default],
            privileged_steps: None,
        }
    }

    /// The workspace's root-only steps are taken by `steps` (the
    /// executor's privileged side). Without them a root executor copies
    /// the inputs of privileged actions
    /// ([`crate::workspace::InputProtection::probe`]).
    pub fn with_privileged_steps(mut self, steps: Arc<dyn PrivilegedSteps>) -> Isolations {
        self.privileged_steps = Some(steps);
        self
    }

    /// What takes the workspace's root-only steps, if anything.
    pub fn privileged_steps(&self) -> Option<Arc<dyn PrivilegedSteps>> {
        self.privileged_steps.clone()
    }

    /// Adds `backend` (replacing one of the same name).
    pub fn with(mut self, backend: Arc<dyn Isolation>) -> Isolations {
        self.backends.retain(|b| b.name() != backend.name());
        self.backends.push(backend);
        self
    }

    /// Removes backend `name`, unless it is the only one (false then). If
    /// it was the default, the first one left becomes the default.
    pub fn without(&mut self, name: &str) -> bool {
        if self.backends.len() < 2 || !self.backends.iter().any(|b| b.name() == name) {
            return false;
        }
        self.backends.retain(|b| b.name() != name);
        if self.default == name {
            self.default = self.backends[0].name();
        }
        true
    }

    /// Makes `name` the default; false (and no change) if it is not offered.
    pub fn set_default(&mut self, name: &str) -> bool {
        match self.backends.iter().find(|b| b.name() == name) {
            Some(backend) => {
                self.default = backend.name();
                true
            }
            None => false,
        }
    }

    /// The properties the offered backends declare of themselves
    /// ([`Isolation::properties`]), what the executor advertises besides
    /// its configured ones.
    pub fn properties(&self) -> std::collections::BTreeMap<String, String> {
        self.backends.iter().flat_map(|b| b.properties()).collect()
    }

    /// The offered types, the default first (what the executor advertises).
    /// [`Isolation::settle`] of every backend.
    pub async fn settle(&self) {
        for backend in &self.backends {
            backend.settle().await;
        }
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names = vec![self.default];
        names.extend(
            self.backends
                .iter()
                .map(|b| b.name())
                .filter(|n| *n != self.default),
        );
        names
    }

    /// The name of the default backend.
    pub fn default_name(&self) -> &'static str {
        self.default
    }

    /// The backend for an action with `platform`: [`Isolations::select`],
    /// and then FAILED_PRECONDITION, naming the property and the type, for
    /// what that backend would otherwise ignore. `Platform::parse` refuses
    /// these already when the action names its type; this catches the
    /// executor's default type, and `none` where this executor keeps no
    /// runners.
    pub fn select_for(&self, platform: &Platform) -> Result<&Arc<dyn Isolation>, RunError> {
        let backend = self.select(platform.isolation)?;
        let name = backend.name();
        let chosen = match platform.isolation {
            Some(_) => format!("workload-isolation-type={name}"),
            None => format!("this executor's default isolation type, {name},"),
        };
        let runs_images = IsolationType::from_name(name).is_some_and(IsolationType::runs_images);
        if let Some(image) = platform.container_image.as_ref().filter(|_| !runs_images) {
            return Err(RunError::Unsupported(format!(
                "container-image={image}: {chosen} runs the action on the host's system, not in \
                 an image; set workload-isolation-type=docker or podman (or remove \
                 container-image)"
            )));
        }
        if platform.init_dockerd && name != IsolationType::Firecracker.name() {
            return Err(RunError::Unsupported(format!(
                "init-dockerd=true: {chosen} runs no Docker daemon (only firecracker, a \
                 microVM, does); set workload-isolation-type=firecracker, or remove init-dockerd"
            )));
        }
        if platform.preserve_workspace && !backend.keeps_warm_runners() {
            let why = if name == "none" {
                " (none keeps them only on a root executor with a cgroup per action)"
            } else {
                ""
            };
            return Err(RunError::Unsupported(format!(
                "preserve-workspace=true: {chosen} keeps no warm runners on this executor{why}, \
                 so there is no workspace to preserve; use workload-isolation-type=sandbox, or \
                 remove preserve-workspace"
            )));
        }
        Ok(backend)
    }

    /// The backend for an action asking for `requested` (the default when
    /// it asks for none); FAILED_PRECONDITION naming the type otherwise.
    pub fn select(
        &self,
        requested: Option<IsolationType>,
    ) -> Result<&Arc<dyn Isolation>, RunError> {
        let name = requested.map(|r| r.name()).unwrap_or(self.default);
        self.backends
            .iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| {
                RunError::Unsupported(format!(
                    "workload-isolation-type={name} is not available on this executor (it offers {})",
                    self.names().join(", ")
                ))
            })
    }
}

impl std::fmt::Debug for Isolations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Isolations")
            .field("offered", &self.names())
            .finish()
    }
}
