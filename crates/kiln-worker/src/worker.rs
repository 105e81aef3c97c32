//! [`Worker`]: runs one action given its digest, start to finish:
//! fetch and check the Action, Command and input tree, materialize the
//! workspace, run the command under the configured [`Isolation`], upload the
//! outputs, and record every phase in `ExecutedActionMetadata`.

// The legacy output_files/output_directories and the *_symlinks result
// fields are deprecated in REAPI, yet older clients still send and read them.
#![allow(deprecated)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_platform::{PersistentWorker, Platform};
use kiln_proto::reapi::{Action, ActionResult, Command, Digest, ExecutedActionMetadata};
use kiln_proto::timestamp_now;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::cache::FileCache;
use crate::cas::{CasClient, GrpcTransport, UploadSource};
use crate::error::{format_digest, RunError};
use crate::inputs;
use crate::isolation::{CommandSpec, Isolation, Isolations, Resident, StoredOutputs};
use crate::outputs;
use crate::persistent::{self, WorkerIdentity, WorkerProcess, WorkerStart};
use crate::process::{blocking, Limits, ProcessOutcome, StopReason};
use crate::runners::{self, Leftovers, RunnerKey, RunnerLimits, RunnerPool, WarmRunner};
use crate::scratch::Scratch;
use crate::stdio;
use crate::users::{ActionUser, ActionUserPool, ActionUsers};
use crate::validate::{check_output_path, check_relative_path};
use crate::workspace::{DirAccess, InputProtection, Layout, OverlayLayers, OverlayMount};

/// The executor's settings for running actions.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where per-action directories (workspace and captured output) go.
    pub work_root: PathBuf,
    /// The local file cache. Best on the same file system as `work_root`,
    /// so inputs are hardlinked rather than copied.
    pub cache_dir: PathBuf,
    /// Reported as `ExecutedActionMetadata.worker`.
    pub worker_name: String,
    /// Upper bound of any action's timeout, and the timeout of actions that
    /// set none (neither `Action.timeout` nor `default-timeout`).
    pub max_timeout: Duration,
    /// SIGTERM→SIGKILL grace when `termination-grace-period` is unset.
    pub default_grace: Duration,
    /// Upper bound of any action's grace: the scheduler refuses longer
    /// ones against its own limit; an executor caps them at its own.
    pub max_grace: Duration,
    /// Keep each action's directory after the run (for debugging).
    pub keep_workspaces: bool,
    /// Memory limit of actions without `EstimatedMemory` (None: unlimited).
    pub default_memory_bytes: Option<u64>,
    /// CPU quota of actions without `EstimatedCPU`, in milli-CPUs (None:
    /// unlimited).
    pub default_cpu_millis: Option<u64>,
    /// Most processes an action may have at once, under backends that can
    /// enforce it (a fork bomb stops here).
    pub pids_max: Option<u64>,
    /// Most bytes the file cache keeps (least recently used entries go
    /// first); None: unlimited.
    pub cache_max_bytes: Option<u64>,
    /// Whom `none` actions, and `sandbox` actions that ask for no user,
    /// run as: never the cache's owner (see [`crate::workspace`]); one user
    /// for all, or a uid of its own for each runner. Needs a root executor,
    /// and a work root every user can traverse.
    pub action_users: ActionUsers,
    /// How many warm runners (`recycle-runner=true`) are kept, and for how
    /// long.
    pub runners: RunnerLimits,
    /// How large an action's input tree may be.
    pub input_limits: inputs::InputLimits,
    /// The longest fetching an action's inputs and preparing its isolation
    /// (an image pull) may take, before its clock starts.
    pub staging_timeout: Duration,
}

impl WorkerConfig {
    /// Defaults for everything but the paths.
    pub fn new(work_root: impl Into<PathBuf>, cache_dir: impl Into<PathBuf>) -> WorkerConfig {
        WorkerConfig {
            work_root: work_root.into(),
            cache_dir: cache_dir.into(),
            worker_name: "kiln-worker".into(),
            max_timeout: Duration::from_secs(3600),
            default_grace: Duration::from_secs(10),
            max_grace: Duration::from_secs(300),
            keep_workspaces: false,
            default_memory_bytes: None,
            default_cpu_millis: None,
            pids_max: Some(16_384),
            cache_max_bytes: Some(10 << 30),
            action_users: ActionUsers::One(None),
            runners: RunnerLimits::default(),
            input_limits: inputs::InputLimits::default(),
            staging_timeout: Duration::from_secs(300),
        }
    }
}

/// The result of running an action.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The ActionResult, outputs uploaded; also for timed-out actions
    /// (with what they wrote to stdout/stderr until stopped).
    pub result: ActionResult,
    /// `ExecuteResponse.status`: OK, DEADLINE_EXCEEDED or CANCELLED.
    pub status: tonic::Status,
    /// Whether the result may go to the Action Cache: only a completed run
    /// with exit code 0 of an action without `do_not_cache`.
    pub cacheable: bool,
}

/// An action ready to run: its messages and its laid-out directories.
struct Staged {
    action: Action,
    command: Command,
    /// The input root as the action sees it (an overlay's mount point
    /// under [`Layout::Overlay`]).
    workspace: PathBuf,
    io_dir: PathBuf,
    working_path: PathBuf,
    /// Where the files the action wrote are on disk: the overlay's upper
    /// layer, else the workspace itself.
    written: PathBuf,
    /// The overlay, detached when the action is done with it.
    overlay: Option<OverlayMount>,
    /// The input tree (a warm runner with `preserve-workspace` deletes its
    /// files before the next action).
    directories: Arc<inputs::DirectoryMap>,
    input_root: Digest,
    /// The directories made that go to the action's user as it starts.
    owned_directories: Vec<PathBuf>,
}

/// How one action's workspace is set up: decided before staging from whom
/// the action runs as.
#[derive(Debug, Clone, Copy)]
struct WorkspacePlan {
    layout: Layout,
    directories: DirAccess,
    /// The workspace is a warm runner's, kept with `preserve-workspace`.
    over_existing: bool,
}

/// The runner an action runs in, as [`Worker::run`] chose it.
struct RunnerUse {
    /// `recycle-runner=true`: its key.
    key: Option<RunnerKey>,
    warm: bool,
    /// Actions it has run, this one included.
    uses: u32,
    /// Whom its actions run as, held for as long as the runner lives.
    user: ActionUser,
}

/// What [`Worker::run_in`] learnt that decides whether its runner is kept.
#[derive(Default)]
struct RunnerNotes {
    /// Exit 0, not stopped, not OOM-killed, no [`DO_NOT_RECYCLE`], and a
    /// backend that keeps warm runners.
    clean: bool,
    /// With `preserve-workspace`: what to delete before the next action.
    leftovers: Option<Leftovers>,
    /// The runner's persistent worker: the warm runner's on the way in;
    /// on the way out, one that answered and may serve the next action.
    worker: Option<WorkerProcess>,
    /// What the backend keeps running in the runner (a container), the
    /// same way in and out.
    resident: Option<Box<dyn Resident>>,
    /// The resident was started for this action: the runner was not warm.
    fresh_resident: bool,
}

/// What a persistent worker made of one request.
struct Served {
    outcome: ProcessOutcome,
    /// `WorkResponse.output`, or why the worker failed: the action's stderr.
    stderr: String,
    /// The status of an action whose worker failed it.
    failure: Option<tonic::Status>,
}

/// Runs actions: one CAS client, one file cache, the isolation backends
/// the executor offers.
pub struct Worker {
    cas: CasClient,
    cache: Arc<FileCache>,
    config: WorkerConfig,
    isolations: Isolations,
    /// Action directories, and the directories reused inside them.
    scratch: Arc<Scratch>,
    /// What keeps privileged actions away from the cache's inodes.
    protection: InputProtection,
    /// Warm runners waiting for an action with their key.
    runners: Arc<RunnerPool>,
    /// Whom runners' actions run as: each runner leases its user here.
    action_users: Arc<ActionUserPool>,
    /// Finished actions' directories being emptied after their result
    /// went out, at most one per CPU ([`Worker::empty_after_result`]).
    emptying: Arc<tokio::sync::Semaphore>,
}

impl Worker {
    /// Connects to the CAS over `transport` (reading its capabilities) and
    /// opens the file cache. `transport` is a `Channel` to a server, or a
    /// [`GrpcTransport`] over the server's own services, called in-process
    /// (the executor embedded in `kiln serve`).
    pub async fn new(
        transport: impl Into<GrpcTransport>,
        mut config: WorkerConfig,
        isolations: Isolations,
    ) -> Result<Worker, RunError> {
        // Every path handed to a launcher, a container engine or a VM is
        // built from these, and must not depend on this process's
        // directory: a relative data directory would otherwise make them
        // relative, which the launchers refuse.
        for dir in [&mut config.work_root, &mut config.cache_dir] {
            *dir = std::path::absolute(&*dir)
                .map_err(|e| RunError::io(format!("resolving {}", dir.display()), e))?;
        }
        let cas = CasClient::new(transport, "").await?;
        let cache = Arc::new(FileCache::open_limited(
            &config.cache_dir,
            config.cache_max_bytes,
        )?);
        let steps = isolations.privileged_steps();
        if let Some(steps) = &steps {
            steps.confine(&config.work_root).map_err(|e| {
                privileged_step_error(
                    format!(
                        "confining the privileged steps to {}",
                        config.work_root.display()
                    ),
                    e,
                )
            })?;
            let stale = crate::workspace::unmount_stale(&config.work_root, &**steps);
            if stale > 0 {
                tracing::info!(stale, "detached workspace overlays an earlier run left");
            }
        }
        let scratch = Scratch::open(&config.work_root)
            .map_err(|e| RunError::io(format!("preparing {}", config.work_root.display()), e))?
            .with_privileged_steps(steps.clone());
        if let Some(user) = config.action_users.any() {
            crate::workspace::check_reachable(&config.work_root, user)?;
        }
        let protection = InputProtection::probe(&config.work_root, steps);
        let runners = Arc::new(RunnerPool::new(config.runners));
        let scratch = Arc::new(scratch);
        let reclaiming = scratch.clone();
        match blocking("reclaiming action directories", move || {
            Ok(reclaiming.reclaim_leftovers())
        })
        .await?
        {
            Ok(0) => {}
            Ok(reclaimed) => {
                tracing::info!(
                    reclaimed,
                    "emptied the action directories an earlier run left"
                )
            }
            Err(error) => tracing::warn!(
                work_root = %config.work_root.display(),
                %error,
                "could not empty the action directories an earlier run left"
            ),
        }
        sweep_idle_runners(Arc::downgrade(&runners), scratch.clone());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Worker {
            emptying: Arc::new(tokio::sync::Semaphore::new(cpus)),
            runners,
            action_users: ActionUserPool::new(config.action_users),
            cas,
            cache,
            config,
            isolations,
            scratch,
            protection,
        })
    }

    /// The isolation types this worker offers, its default first.
    pub fn isolation_types(&self) -> Vec<&'static str> {
        self.isolations.names()
    }

    /// The keys of the warm runners this worker holds now, as the
    /// scheduler routes by them.
    pub fn warm_runner_keys(&self) -> Vec<String> {
        self.runners.keys()
    }

    /// The local file cache (its counters show what was downloaded).
    pub fn cache(&self) -> &FileCache {
        &self.cache
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Runs the action `action_digest` of `instance_name`. `platform` is the
    /// action's parsed platform (timeouts, grace period). Cancelling
    /// `cancel` stops the command (SIGTERM, grace, SIGKILL) and returns a
    /// CANCELLED outcome; before the command starts it returns at once.
    pub async fn run(
        &self,
        org: &str,
        instance_name: &str,
        action_digest: &Digest,
        platform: &Platform,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, RunError> {
        let mut metadata = ExecutedActionMetadata {
            worker: self.config.worker_name.clone(),
            worker_start_timestamp: Some(timestamp_now()),
            ..Default::default()
        };
        let key = platform
            .recycle_runner
            .then(|| platform.runner_key_of(org, instance_name));
        let (warm, expired) = match &key {
            Some(key) => self.runners.take(key),
            None => (None, Vec::new()),
        };
        for runner in expired {
            retire_runner(runner, self.scratch.clone()).await;
        }
        let warm = match warm {
            Some(runner) => self.ready(runner).await,
            None => None,
        };
        let was_warm = warm.is_some();
        let (action_dir, worker, resident, user, uses) = match warm {
            Some(mut warm) => {
                if let Some(resident) = &warm.resident {
                    resident.resume();
                }
                let user = std::mem::replace(&mut warm.user, ActionUser::own());
                (warm.dir, warm.worker, warm.resident, user, warm.uses)
            }
            None => {
                let user = self
                    .action_users
                    .lease()
                    .map_err(RunError::ExecutorUnavailable)?;
                (self.scratch.action_dir(), None, None, user, 0)
            }
        };
        let runner = RunnerUse {
            warm: was_warm,
            uses: uses + 1,
            key,
            user,
        };
        let mut notes = RunnerNotes {
            worker,
            resident,
            ..RunnerNotes::default()
        };
        let result = self
            .run_in(
                org,
                instance_name,
                action_digest,
                platform,
                &cancel,
                &action_dir,
                &mut metadata,
                &runner,
                &mut notes,
            )
            .await;
        let warm = runner.warm && !notes.fresh_resident;
        let RunnerUse {
            key, uses, user, ..
        } = runner;
        let kept = match (&key, result.is_ok() && notes.clean) {
            (Some(key), true) if !self.config.keep_workspaces => {
                self.keep_runner(key, action_dir, uses, user, notes).await;
                true
            }
            _ => {
                discard_worker(notes.worker.take()).await;
                if !self.config.keep_workspaces {
                    self.empty_after_result(action_dir, user).await;
                }
                false
            }
        };
        match &result {
            Ok(outcome) => tracing::info!(
                action = %format_digest(action_digest),
                exit_code = outcome.result.exit_code,
                status = ?outcome.status.code(),
                runner = key.as_ref().map_or("", RunnerKey::short),
                warm,
                kept,
                "action ran"
            ),
            Err(error) => tracing::info!(
                action = %format_digest(action_digest),
                %error,
                "action could not run"
            ),
        }
        result
    }

    /// Ends every warm runner (its persistent worker, its container) and
    /// recycles its directory, then waits for what the backends end in
    /// the background (the containers of runners dropped earlier): what a
    /// stopping executor does last, so no runner container outlives it.
    pub async fn discard_runners(&self) {
        let runners = self.runners.drain();
        if !runners.is_empty() {
            tracing::info!(runners = runners.len(), "discarding the warm runners");
        }
        // Ended here, not in the background, so no container outlives a
        // stopping executor; all at once, as each removal is mostly
        // waiting on its container engine.
        futures::future::join_all(runners.into_iter().map(|mut runner| {
            let scratch = self.scratch.clone();
            async move {
                discard_worker(runner.worker.take()).await;
                if let Some(resident) = runner.resident.take() {
                    resident.discard().await;
                }
                retire_runner(runner, scratch).await;
            }
        }))
        .await;
        self.isolations.settle().await;
    }

    /// Offers a runner whose action finished cleanly to the next action
    /// with `key`, its reset for that action running in the background
    /// ([`WarmRunner::reset`]): the result goes out without waiting for it.
    async fn keep_runner(
        &self,
        key: &RunnerKey,
        action_dir: PathBuf,
        uses: u32,
        user: ActionUser,
        mut notes: RunnerNotes,
    ) {
        let leftovers = notes.leftovers.take();
        let scratch = self.scratch.clone();
        let dir = action_dir.clone();
        let mut runner = WarmRunner::new(key.clone(), action_dir, uses);
        runner.user = user;
        runner.reset = Some(tokio::task::spawn_blocking(move || {
            runners::reset_for_reuse(&scratch, &dir, leftovers.as_ref())
        }));
        runner.worker = notes.worker.take();
        runner.resident = notes.resident.take();
        if let Some(resident) = &runner.resident {
            resident.pause();
        }
        for evicted in self.runners.put(runner) {
            retire_runner(evicted, self.scratch.clone()).await;
        }
    }

    /// `runner`, taken for an action, once its reset is done; None (and
    /// the runner retired) when the reset failed.
    async fn ready(&self, runner: WarmRunner) -> Option<WarmRunner> {
        match runner.ready().await {
            Ok(runner) => Some(runner),
            Err((runner, error)) => {
                tracing::warn!(path = %runner.dir.display(), %error, "a warm runner could not be cleaned; discarded");
                retire_runner(runner, self.scratch.clone()).await;
                None
            }
        }
    }

    /// Recycles a finished action's directory off its result's path: a
    /// later action that finds no emptied directory yet takes a new one.
    /// Past one per CPU in the background, the caller waits for it, so
    /// directories waiting to be emptied cannot pile up.
    /// Its user is given back once it is empty: nothing of it is left
    /// for the next runner with that uid to reach.
    async fn empty_after_result(&self, action_dir: PathBuf, user: ActionUser) {
        let scratch = self.scratch.clone();
        match self.emptying.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    recycle_action_dir(action_dir, scratch).await;
                    drop((permit, user));
                });
            }
            Err(_) => {
                recycle_action_dir(action_dir, scratch).await;
                drop(user);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_in(
        &self,
        org: &str,
        instance_name: &str,
        action_digest: &Digest,
        platform: &Platform,
        cancel: &CancellationToken,
        action_dir: &Path,
        metadata: &mut ExecutedActionMetadata,
        runner: &RunnerUse,
        notes: &mut RunnerNotes,
    ) -> Result<RunOutcome, RunError> {
        let isolation = self.isolations.select_for(platform)?;
        let run_as = isolation.run_as(platform, runner.user.get())?;
        let recycling = runner.key.is_some() && isolation.keeps_warm_runners();
        if runner.key.is_some() && !recycling {
            tracing::info!(
                isolation = isolation.name(),
                "recycle-runner: this isolation type runs every action in a fresh runner here"
            );
        }
        let mut usage = kiln_proto::runner::RunnerUsage {
            warm: runner.warm,
            runner_key_hash: runner.key.as_ref().map_or("", RunnerKey::short).into(),
            uses: runner.uses,
            isolation_type: isolation.name().into(),
            isolation_properties: isolation.properties().into_iter().collect(),
        };
        let usage_at = metadata.auxiliary_metadata.len();
        metadata
            .auxiliary_metadata
            .push(packed(kiln_proto::runner::RUNNER_USAGE_TYPE, &usage));
        let preserving = recycling && platform.preserve_workspace;
        let layout = match self.protection.layout(run_as) {
            // Copied into the backend's own disk: the cache is out of reach.
            _ if !isolation.sees_host_workspace() => Layout::Linked,
            // The runner's processes hold the workspace's mount across
            // actions; a fresh overlay per action would not reach them.
            Layout::Overlay if recycling && isolation.runner_holds_workspace() => Layout::Copied,
            layout => layout,
        };
        let plan = WorkspacePlan {
            layout,
            directories: DirAccess::for_action(run_as, platform.nonroot_workspace),
            over_existing: preserving && runner.warm,
        };
        // A persistent worker, where this runner is kept; without one the
        // action runs as an ordinary one, as its command line says.
        let serving = platform.persistent_worker.as_ref().filter(|_| recycling);
        if let Some(worker) = serving.filter(|_| plan.layout == Layout::Overlay) {
            return Err(RunError::Unsupported(format!(
                "persistentWorkerKey={:?}: this action would run as root or as the executor's own \
                 user, whose workspace is an overlay mounted afresh for each action, which a \
                 worker kept between actions cannot stay in; persistent workers run as the \
                 executor's action user (remove dockerRunAsRoot/dockerUser, or recycle-runner to \
                 run the action as an ordinary one)",
                worker.key
            )));
        }
        // Every kept runner has its own /tmp directory; backends with a
        // private /tmp (`sandbox`) mount it there, the others ignore it.
        let runner_tmp = if recycling {
            let tmp = action_dir.join(runners::RUNNER_TMP);
            // A warm runner's /tmp is there already.
            if !runner.warm {
                blocking("preparing the runner's /tmp", {
                    let tmp = tmp.clone();
                    move || {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::create_dir_all(&tmp)
                            .and_then(|()| {
                                std::fs::set_permissions(
                                    &tmp,
                                    std::fs::Permissions::from_mode(0o1777),
                                )
                            })
                            .map_err(|e| RunError::io(format!("creating {}", tmp.display()), e))
                    }
                })
                .await?;
            }
            Some(tmp)
        } else {
            None
        };
        metadata.input_fetch_start_timestamp = Some(timestamp_now());
        // Input staging and the backend's preparation (an image pull) run
        // together; neither counts against the timeout, both can be
        // cancelled.
        let staging_timeout = self.config.staging_timeout;
        let staged = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(cancelled_before_start(action_digest, metadata)),
            _ = tokio::time::sleep(staging_timeout) => {
                return Err(RunError::Unavailable(format!(
                    "staging action {} (its inputs and isolation) took longer than {staging_timeout:?} (staging_timeout)",
                    format_digest(action_digest)
                )));
            }
            (staged, prepared) = async {
                tokio::join!(
                    self.stage(instance_name, action_digest, plan, action_dir),
                    isolation.prepare(platform, cancel),
                )
            } => {
                let staged = staged?;
                prepared?;
                staged
            }
        };
        let Staged {
            action,
            command,
            workspace,
            io_dir,
            working_path,
            written,
            overlay,
            directories,
            input_root,
            owned_directories,
        } = staged;
        metadata.input_fetch_completed_timestamp = Some(timestamp_now());

        let (stdout_path, stderr_path) = (io_dir.join("stdout"), io_dir.join("stderr"));
        let (output, capture) = stdio::capture(&stdout_path, &stderr_path)?;
        let spec = CommandSpec {
            arguments: command.arguments.clone(),
            environment_variables: command
                .environment_variables
                .iter()
                .map(|v| (v.name.clone(), v.value.clone()))
                .collect(),
            workspace: workspace.clone(),
            working_directory: working_path.clone(),
            stdout_path,
            stderr_path,
            output: Some(output),
            platform: Arc::new(platform.clone()),
            action_user: runner.user.get(),
            owned_directories,
            runner_tmp,
            output_paths: crate::outputs::declared_paths(&command)
                .into_iter()
                .map(|path| working_path.join(path))
                .filter_map(|path| path.strip_prefix(&workspace).map(Path::to_path_buf).ok())
                .collect(),
            input_digests: (recycling && !isolation.sees_host_workspace())
                .then(|| Arc::new(inputs::file_digests(&directories, &input_root))),
            stored_outputs: (!isolation.sees_host_workspace())
                .then(|| Arc::new(self.stored_outputs(org, instance_name))),
        };
        let limits = self.limits(&action, platform);
        metadata.execution_start_timestamp = Some(timestamp_now());
        let (process, served) = match serving {
            None if recycling => (
                isolation
                    .run_in_runner(&spec, &limits, cancel, &mut notes.resident)
                    .await,
                None,
            ),
            None => (isolation.run(&spec, &limits, cancel).await, None),
            Some(worker) => {
                let working_directory = working_path
                    .strip_prefix(&workspace)
                    .unwrap_or(Path::new(""))
                    .to_path_buf();
                let request = PendingRequest {
                    command: &command,
                    workspace: &workspace,
                    working_directory,
                    directories: &directories,
                    input_root: &input_root,
                    action_dir,
                    directories_owner: plan.directories.owner,
                };
                let served = self
                    .serve(&**isolation, worker, &spec, &limits, cancel, request, notes)
                    .await;
                match served {
                    Ok(served) => (Ok(served.outcome), Some(served)),
                    Err(error) => (Err(error), None),
                }
            }
        };
        // A container or VM started for this action (the runner's first,
        // or one replacing a kept one that could not be reused): the
        // action did not find its runner warm, whatever its directory was.
        notes.fresh_resident = notes.resident.as_mut().is_some_and(|r| r.take_fresh());
        if notes.fresh_resident && usage.warm {
            usage.warm = false;
            metadata.auxiliary_metadata[usage_at] =
                packed(kiln_proto::runner::RUNNER_USAGE_TYPE, &usage);
        }
        // The command is gone (its group with it): what it printed is in
        // the pipes or already in the files.
        let captured = capture.finish().await;
        let process = process?;
        captured?;
        let mut worker_failure = None;
        if let Some(served) = served {
            if !served.stderr.is_empty() {
                let (path, text) = (spec.stderr_path.clone(), served.stderr);
                blocking("writing the worker's output", move || {
                    std::fs::write(&path, text)
                        .map_err(|e| RunError::io(format!("writing {}", path.display()), e))
                })
                .await?;
            }
            worker_failure = served.failure;
        }
        metadata.execution_completed_timestamp = Some(timestamp_now());
        if process.memory_exceeded {
            report_memory_exceeded(&spec, &limits, platform).await?;
        }

        metadata.output_upload_start_timestamp = Some(timestamp_now());
        let mut result = ActionResult::default();
        let mut blobs = Vec::new();
        let mut status = tonic::Status::ok("");
        result.exit_code = process.exit_code;
        if let Some(failure) = worker_failure {
            status = failure;
        } else {
            match process.stopped {
                Some(StopReason::Timeout) => {
                    status = tonic::Status::deadline_exceeded(format!(
                        "action {} timed out after {:?}",
                        format_digest(action_digest),
                        limits.timeout
                    ));
                }
                Some(StopReason::Cancelled) => {
                    status = tonic::Status::cancelled(format!(
                        "action {} was cancelled",
                        format_digest(action_digest)
                    ));
                }
                None => {
                    self.take_back_outputs(&command, &workspace, &working_path)
                        .await?;
                    let stored = spec
                        .stored_outputs
                        .as_ref()
                        .map(|stored| stored.take())
                        .unwrap_or_default();
                    blobs =
                        outputs::collect(&command, workspace.clone(), working_path.clone(), stored)
                            .await?
                            .fill(&mut result);
                    // A kept runner holding its own copy of the workspace
                    // (a warm VM) may give them to the next action.
                    if let Some(resident) = notes
                        .resident
                        .as_mut()
                        .filter(|_| spec.input_digests.is_some())
                    {
                        resident.note_outputs(outputs::file_digests(&blobs, &workspace));
                    }
                }
            }
        }
        let paths = [spec.stdout_path.clone(), spec.stderr_path.clone()];
        // Output files become cache entries: in place when no process of
        // the action is left to write to them, else as verified copies.
        // A kept runner never hands its inodes to the cache: a link the
        // action made to an output would outlive it there.
        let in_place = self.adopts_in_place(&**isolation) && !recycling;
        let working_directory = working_path
            .strip_prefix(&workspace)
            .unwrap_or(Path::new(""));
        // A placeholder for an output whose bytes stayed in a VM is
        // never adopted.
        let placeholders: std::collections::HashSet<&Path> = blobs
            .iter()
            .filter_map(|(_, source)| match source {
                UploadSource::Stored(path) => Some(path.as_path()),
                _ => None,
            })
            .collect();
        let adopted: Vec<_> = result
            .output_files
            .iter()
            .filter(|file| !placeholders.contains(working_path.join(&file.path).as_path()))
            .filter_map(|file| {
                let digest = file.digest.clone()?;
                let path = written.join(working_directory).join(&file.path);
                Some((path, digest, file.is_executable))
            })
            .collect();
        let cache = self.cache.clone();
        // The outputs were taken back before they were hashed
        // (`take_back_outputs`): one the executor owns alone is adopted in
        // place.
        let [stdout, stderr] = blocking(
            "adopting the outputs, hashing stdout and stderr",
            move || {
                for (path, digest, executable) in &adopted {
                    if in_place {
                        cache.adopt(path, digest, *executable);
                    } else {
                        cache.adopt_copy(path, digest, *executable);
                    }
                }
                let digest = |path: &Path| match std::fs::metadata(path) {
                    // Empty (or never written): no need to open and hash it.
                    Ok(meta) if meta.len() > 0 => outputs::hash_file(path),
                    _ => Ok(crate::cas::digest_of(&[])),
                };
                Ok([digest(&paths[0])?, digest(&paths[1])?])
            },
        )
        .await?;
        for (path, digest, field) in [
            (&spec.stdout_path, stdout, &mut result.stdout_digest),
            (&spec.stderr_path, stderr, &mut result.stderr_digest),
        ] {
            blobs.push((digest.clone(), UploadSource::File(path.clone())));
            *field = Some(digest);
        }
        self.cas.upload(instance_name, blobs).await?;
        if let Some(overlay) = overlay {
            blocking("unmounting the workspace overlay", move || {
                overlay
                    .unmount()
                    .map_err(|e| RunError::io("unmounting the workspace overlay", e))
            })
            .await?;
        }
        metadata.output_upload_completed_timestamp = Some(timestamp_now());
        metadata.worker_completed_timestamp = Some(timestamp_now());
        result.execution_metadata = Some(metadata.clone());

        let succeeded =
            status.code() == tonic::Code::Ok && result.exit_code == 0 && !process.memory_exceeded;
        let cacheable = succeeded && !action.do_not_cache;
        if recycling {
            // A worker that answered, whatever its exit code, stays warm.
            let answered =
                serving.is_some() && notes.worker.is_some() && status.code() == tonic::Code::Ok;
            notes.clean = (succeeded || answered)
                && std::fs::symlink_metadata(written.join(runners::DO_NOT_RECYCLE)).is_err();
            if notes.clean && preserving {
                let written_name = if written == workspace {
                    "workspace"
                } else {
                    "upper"
                };
                let mut paths = inputs::file_paths(&directories, &input_root);
                paths.extend(declared_outputs(&command, working_directory));
                notes.leftovers = Some(Leftovers {
                    written: written_name,
                    paths,
                    clean: runners::clean_globs(platform),
                });
            }
        }
        Ok(RunOutcome {
            result,
            status,
            cacheable,
        })
    }

    /// Sends the staged action to the runner's persistent worker (started
    /// first, when the runner has none or one started with other
    /// arguments) and waits for its answer within the action's timeout. A
    /// worker that answers is left in `notes` for the next action; one
    /// that fails is killed, and the outcome says why, naming the key.
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &self,
        isolation: &dyn Isolation,
        worker: &PersistentWorker,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        request: PendingRequest<'_>,
        notes: &mut RunnerNotes,
    ) -> Result<Served, RunError> {
        let split = persistent::split_arguments(&request.command.arguments, worker)?;
        let identity = WorkerIdentity {
            startup: split.startup,
            environment_variables: spec.environment_variables.clone(),
            working_directory: request.working_directory.clone(),
        };
        if notes
            .worker
            .as_ref()
            .is_some_and(|w| w.identity != identity)
        {
            tracing::info!(key = %worker.key, "persistent worker started with other arguments; replaced");
            discard_worker(notes.worker.take()).await;
        }
        let (workspace, working_directory, flag_files) = (
            request.workspace.to_path_buf(),
            request.working_directory,
            split.flag_files,
        );
        let arguments = blocking("reading the flag files", move || {
            persistent::expand_flag_files(&workspace, &working_directory, &flag_files)
        })
        .await?;
        let work_request = persistent::WorkRequest {
            arguments,
            inputs: persistent::request_inputs(request.directories, request.input_root),
            ..Default::default()
        };
        let mut process = match notes.worker.take() {
            // Already running: no start gives this action's directories
            // to its user, so they are given here.
            Some(process) => {
                if let Some(owner) = request.directories_owner {
                    self.give_directories(&spec.owned_directories, owner)
                        .await?;
                }
                process
            }
            None => {
                let start = WorkerStart {
                    identity,
                    protocol: worker.protocol,
                    runner_dir: request.action_dir.to_path_buf(),
                };
                isolation
                    .start_worker_in_runner(spec, &start, limits, &mut notes.resident)
                    .await?
            }
        };
        let answer = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                discard_worker(Some(process)).await;
                return Ok(Served {
                    outcome: ProcessOutcome {
                        stopped: Some(StopReason::Cancelled),
                        ..ProcessOutcome::exited(-1)
                    },
                    stderr: String::new(),
                    failure: None,
                });
            }
            _ = tokio::time::sleep(limits.timeout) => None,
            answer = process.request(&work_request) => Some(answer),
        };
        let (why, timed_out) = match answer {
            Some(Ok(response)) => {
                notes.worker = Some(process);
                return Ok(Served {
                    outcome: ProcessOutcome::exited(response.exit_code),
                    stderr: response.output,
                    failure: None,
                });
            }
            Some(Err(failure)) => (failure.to_string(), false),
            None => (
                format!(
                    "did not answer within the action's timeout of {:?}",
                    limits.timeout
                ),
                true,
            ),
        };
        let pid = process.pid();
        // Killed first, so its stderr is complete.
        discard_worker(Some(process)).await;
        let tail = persistent::stderr_tail(&request.action_dir.join(persistent::WORKER_STDERR));
        let message = format!(
            "persistent worker {:?} (pid {pid}) {why}; it was stopped, and the next action gets a \
             fresh one. Its last stderr lines:\n{tail}",
            worker.key
        );
        tracing::info!(key = %worker.key, pid, %why, "persistent worker failed an action");
        Ok(Served {
            outcome: ProcessOutcome {
                stopped: timed_out.then_some(StopReason::Timeout),
                ..ProcessOutcome::exited(1)
            },
            stderr: format!("kiln: {message}\n"),
            failure: Some(if timed_out {
                tonic::Status::deadline_exceeded(message)
            } else {
                tonic::Status::internal(message)
            }),
        })
    }

    /// Fetches and checks the Action, Command and input tree, and lays the
    /// workspace out under `action_dir`.
    async fn stage(
        &self,
        instance_name: &str,
        action_digest: &Digest,
        plan: WorkspacePlan,
        action_dir: &Path,
    ) -> Result<Staged, RunError> {
        let (action, command) = self.fetch_action(instance_name, action_digest).await?;
        let working_directory = check_command(&command)?;
        let input_root = action.input_root_digest.clone().ok_or_else(|| {
            RunError::InvalidArgument(format!(
                "action {} has no input_root_digest",
                format_digest(action_digest)
            ))
        })?;
        let limits = &self.config.input_limits;
        let (directories, mut missing) =
            inputs::fetch_tree(&self.cas, instance_name, &input_root, limits).await?;
        if missing.is_empty() {
            inputs::check_expanded(&directories, &input_root, limits)?;
        }
        let (also_missing, pinned) =
            inputs::fill_cache(&self.cas, &self.cache, instance_name, &directories).await?;
        missing.extend(also_missing);
        if !missing.is_empty() {
            return Err(RunError::MissingInputs(missing));
        }

        let workspace = action_dir.join("workspace");
        let io_dir = action_dir.join("io");
        // Under an overlay the tree is laid out as its lower layer, and the
        // action writes to the upper one.
        let overlaid = plan.layout == Layout::Overlay;
        let (tree, written) = if overlaid {
            (action_dir.join("inputs"), action_dir.join("upper"))
        } else {
            (workspace.clone(), workspace.clone())
        };
        // One trip to the blocking pool: the directories exist already when
        // the action directory is a recycled one.
        let mut dirs = vec![workspace.clone(), io_dir.clone()];
        if overlaid {
            dirs.extend([tree.clone(), written.clone()]);
        }
        // The directory the action sees as its input root (the upper
        // layer's, under an overlay) gets the action's access.
        let (access, root) = (plan.directories, written.clone());
        let mut owned_directories = blocking("preparing the workspace", move || {
            for dir in &dirs {
                std::fs::create_dir_all(dir)
                    .map_err(|e| RunError::io(format!("creating {}", dir.display()), e))?;
            }
            let mut owned = Vec::new();
            access
                .apply(&root, &mut owned)
                .map_err(|e| RunError::io(format!("preparing {}", root.display()), e))?;
            Ok(owned)
        })
        .await?;
        let directories = Arc::new(directories);
        let made = inputs::materialize(
            self.cache.clone(),
            self.scratch.clone(),
            directories.clone(),
            input_root.clone(),
            tree.clone(),
            inputs::Placement {
                copy: plan.layout == Layout::Copied,
                directories: plan.directories,
                // An overlay's lower layer is always fresh.
                over_existing: plan.over_existing && !overlaid,
            },
        )
        .await?;
        owned_directories.extend(made);
        drop(pinned);
        if plan.over_existing && overlaid {
            let (directories, root, upper) =
                (directories.clone(), input_root.clone(), written.clone());
            blocking(
                "uncovering the inputs in a warm runner's overlay",
                move || inputs::clear_shadows(&directories, &root, &upper),
            )
            .await?;
        }
        let working_in_tree = tree.join(&working_directory);
        owned_directories.extend(
            create_output_parents(
                &self.scratch,
                &command,
                &tree,
                &working_in_tree,
                plan.directories,
            )
            .await?,
        );
        // A preserved workspace was taken back to be reset
        // (`runners::reset_for_reuse`): its user gets its directories again.
        if let Some(owner) = plan.directories.owner.filter(|_| plan.over_existing) {
            let (scratch, root) = (self.scratch.clone(), written.clone());
            blocking(
                "giving a preserved workspace to the action's user",
                move || {
                    scratch.hand_over_directories(&root, owner).map_err(|e| {
                        RunError::io(format!("giving {} to the action's user", root.display()), e)
                    })
                },
            )
            .await?;
        }
        let overlay = if overlaid {
            Some(
                self.mount_overlay(action_dir, &tree, &written, &workspace)
                    .await?,
            )
        } else {
            None
        };
        let working_path = workspace.join(&working_directory);

        Ok(Staged {
            action,
            command,
            workspace,
            io_dir,
            working_path,
            written,
            overlay,
            directories,
            input_root,
            owned_directories,
        })
    }

    /// Has the launchers give what the action's user made to the executor
    /// before its outputs are read: every directory of the workspace, the
    /// declared output files and everything under the declared output
    /// directories (files with a single link; see
    /// [`PrivilegedSteps::take_back`]). The executor keeps no capability to
    /// read past a mode (`kiln-sandbox::capabilities`), and an action may
    /// close its outputs to others. Sent only when something there is not
    /// the executor's already. A launcher that died with the request gives
    /// the action back (`ExecutorUnavailable`); another failure is logged,
    /// and reading what stays closed then fails naming the output.
    ///
    /// Under an overlay (an action that runs as root, on an executor that
    /// is not: `--run-as`), through the overlay, not its upper layer: an
    /// owner changed in the upper layer alone is not what the overlay's
    /// files already looked up say, so the executor would still be
    /// refused them. The walk then lists the input tree too, but changes
    /// nothing there (the executor's already) and copies nothing up.
    async fn take_back_outputs(
        &self,
        command: &Command,
        workspace: &Path,
        working_path: &Path,
    ) -> Result<(), RunError> {
        let Some(steps) = self.isolations.privileged_steps() else {
            return Ok(());
        };
        let declared = outputs::declared_paths(command);
        if declared.is_empty() {
            return Ok(());
        }
        let files: Vec<PathBuf> = declared
            .iter()
            .map(|path| working_path.join(path))
            .collect();
        let (scratch, workspace) = (self.scratch.clone(), workspace.to_path_buf());
        let taken = tokio::task::spawn_blocking(move || {
            // What cannot even be looked at is not the executor's either.
            let foreign = |path: &Path| match path.symlink_metadata() {
                Ok(meta) => !scratch.owns(&meta),
                Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
            };
            if foreign(&workspace) || files.iter().any(|file| foreign(file)) {
                steps.take_back(&workspace, &files, scratch.owner())?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|e| RunError::Internal(format!("taking back the action's outputs: {e}")))?;
        match taken {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionAborted => Err(
                privileged_step_error("taking back the action's outputs".into(), error),
            ),
            Err(error) => {
                tracing::warn!(%error, "the action's outputs were not taken back before reading them");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Whether output files may become cache entries in place (hardlinked,
    /// see [`FileCache::adopt`]): only when no process of the action is
    /// left that could write to them through an open descriptor, or when
    /// the executor is not root and nothing protects the cache anyway.
    /// Otherwise they are copied ([`FileCache::adopt_copy`]).
    fn adopts_in_place(&self, isolation: &dyn Isolation) -> bool {
        isolation.stops_every_process() || matches!(self.protection, InputProtection::Unprivileged)
    }

    /// Gives `directories` to `owner` through the privileged side.
    async fn give_directories(
        &self,
        directories: &[PathBuf],
        owner: (u32, u32),
    ) -> Result<(), RunError> {
        let Some(steps) = self.isolations.privileged_steps() else {
            return Err(RunError::Internal(format!(
                "the workspace's directories cannot be given to {}:{}: nothing takes this \
                 executor's privileged steps",
                owner.0, owner.1
            )));
        };
        let directories = directories.to_vec();
        blocking(
            "giving the workspace's directories to the action's user",
            move || {
                steps.give(&directories, owner).map_err(|e| {
                    privileged_step_error(
                        format!(
                            "giving the workspace's directories to {}:{}",
                            owner.0, owner.1
                        ),
                        e,
                    )
                })
            },
        )
        .await
    }

    /// Mounts the overlay of `lower` at `workspace`, its upper layer
    /// `upper` (both under `action_dir`).
    async fn mount_overlay(
        &self,
        action_dir: &Path,
        lower: &Path,
        upper: &Path,
        workspace: &Path,
    ) -> Result<OverlayMount, RunError> {
        let InputProtection::Overlay(overlays) = &self.protection else {
            return Err(RunError::Internal(
                "an overlay workspace, but overlays are not available".into(),
            ));
        };
        let overlays = overlays.clone();
        let layers = OverlayLayers {
            lower: lower.to_path_buf(),
            upper: upper.to_path_buf(),
            work: action_dir.join("overlay-work"),
            target: workspace.to_path_buf(),
        };
        blocking("mounting the workspace overlay", move || {
            std::fs::create_dir_all(&layers.work)
                .map_err(|e| RunError::io(format!("creating {}", layers.work.display()), e))?;
            overlays.mount(&layers).map_err(|e| {
                privileged_step_error(
                    format!("mounting the overlay at {}", layers.target.display()),
                    e,
                )
            })
        })
        .await
    }

    /// Fetches and decodes the Action, then the Command (one batch each).
    async fn fetch_action(
        &self,
        instance_name: &str,
        action_digest: &Digest,
    ) -> Result<(Action, Command), RunError> {
        let action: Action = self
            .fetch_message(instance_name, action_digest, "action")
            .await?;
        let command_digest = action.command_digest.clone().ok_or_else(|| {
            RunError::InvalidArgument(format!(
                "action {} has no command_digest",
                format_digest(action_digest)
            ))
        })?;
        let command: Command = self
            .fetch_message(instance_name, &command_digest, "command")
            .await?;
        Ok((action, command))
    }

    async fn fetch_message<M: Message + Default>(
        &self,
        instance_name: &str,
        digest: &Digest,
        what: &str,
    ) -> Result<M, RunError> {
        let fetched = inputs::fetch_blobs(&self.cas, instance_name, vec![digest.clone()]).await?;
        let Some((_, Some(data))) = fetched.into_iter().next() else {
            return Err(RunError::MissingInputs(vec![digest.clone()]));
        };
        M::decode(data).map_err(|e| {
            RunError::InvalidArgument(format!(
                "{what} {} does not decode: {e}",
                format_digest(digest)
            ))
        })
    }

    /// What a VM's collection asks the CAS, as the action's organisation
    /// and instance, about the outputs its guest hashed.
    fn stored_outputs(&self, org: &str, instance_name: &str) -> StoredOutputs {
        let (cas, org, instance_name) =
            (self.cas.clone(), org.to_string(), instance_name.to_string());
        StoredOutputs::new(Box::new(move |digests| {
            let (cas, org, instance_name) = (cas.clone(), org.clone(), instance_name.clone());
            Box::pin(async move { cas.find_missing_as(&org, &instance_name, digests).await })
        }))
    }

    /// The timeout: `Action.timeout`, else `default-timeout`, else the
    /// configured maximum, and never above the maximum.
    fn limits(&self, action: &Action, platform: &Platform) -> Limits {
        let from_action = action
            .timeout
            .as_ref()
            .map(|t| Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
            .filter(|t| !t.is_zero());
        let timeout = from_action
            .or(platform.default_timeout.filter(|t| !t.is_zero()))
            .unwrap_or(self.config.max_timeout)
            .min(self.config.max_timeout);
        Limits {
            timeout,
            grace: platform
                .termination_grace_period
                .unwrap_or(self.config.default_grace)
                .min(self.config.max_grace),
            memory_bytes: platform
                .resources
                .memory_bytes
                .or(self.config.default_memory_bytes),
            cpu_millis: platform
                .resources
                .cpu_millis
                .or(self.config.default_cpu_millis),
            pids_max: self.config.pids_max,
        }
    }
}

/// Says in the action's stderr why it died: a bare exit code 137 would
/// leave the user guessing.
async fn report_memory_exceeded(
    spec: &CommandSpec,
    limits: &Limits,
    platform: &Platform,
) -> Result<(), RunError> {
    use tokio::io::AsyncWriteExt;
    let limit = limits.memory_bytes.unwrap_or_default();
    let source = if platform.resources.memory_bytes.is_some() {
        "its EstimatedMemory"
    } else {
        "the executor's default memory limit"
    };
    let line = format!(
        "kiln: the action was killed for exceeding its memory limit of {limit} bytes ({source}); raise EstimatedMemory if it needs more\n"
    );
    let mut file = tokio::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&spec.stderr_path)
        .await
        .map_err(|e| RunError::io(format!("opening {}", spec.stderr_path.display()), e))?;
    file.write_all(line.as_bytes())
        .await
        .map_err(|e| RunError::io(format!("writing {}", spec.stderr_path.display()), e))?;
    tracing::info!(limit, "action exceeded its memory limit");
    Ok(())
}

/// The outcome of an action cancelled while its inputs were staged.
fn cancelled_before_start(
    action_digest: &Digest,
    metadata: &mut ExecutedActionMetadata,
) -> RunOutcome {
    metadata.worker_completed_timestamp = Some(timestamp_now());
    RunOutcome {
        result: ActionResult {
            execution_metadata: Some(metadata.clone()),
            ..Default::default()
        },
        status: tonic::Status::cancelled(format!(
            "action {} was cancelled before it started",
            format_digest(action_digest)
        )),
        cacheable: false,
    }
}

/// Checks the Command's paths; returns the normalized working directory.
fn check_command(command: &Command) -> Result<String, RunError> {
    if command.arguments.is_empty() || command.arguments[0].is_empty() {
        return Err(RunError::InvalidArgument(
            "command has no arguments (arguments[0] is the program)".into(),
        ));
    }
    check_relative_path("working_directory", &command.working_directory)?;
    let working_directory = crate::validate::normalize(&command.working_directory);
    for (field, paths) in [
        ("output_paths", &command.output_paths),
        ("output_files", &command.output_files),
        ("output_directories", &command.output_directories),
    ] {
        for path in paths {
            check_output_path(field, &working_directory, path)?;
        }
    }
    Ok(working_directory)
}

/// REAPI: the server creates the parent directory of every declared output
/// (and, for legacy output_directories, the directory itself is not made).
/// An input symlink on the way must not lead the creation outside the
/// workspace. Returns those made that are to go to the action's user.
async fn create_output_parents(
    scratch: &Arc<Scratch>,
    command: &Command,
    workspace: &Path,
    working_path: &Path,
    access: DirAccess,
) -> Result<Vec<PathBuf>, RunError> {
    let all = command
        .output_paths
        .iter()
        .chain(&command.output_files)
        .chain(&command.output_directories);
    let mut parents = Vec::new();
    for path in all {
        let full = working_path.join(path);
        if !outputs::within(workspace, &full) {
            return Err(RunError::InvalidArgument(format!(
                "output {path:?} leads out of the workspace through an input symlink"
            )));
        }
        if let Some(parent) = full.parent() {
            parents.push((path.clone(), parent.to_path_buf()));
        }
    }
    if parents.is_empty() {
        return Ok(Vec::new());
    }
    let scratch = scratch.clone();
    blocking("creating the outputs' parent directories", move || {
        let mut owned = Vec::new();
        for (path, parent) in parents {
            scratch
                .make_dir_all(&parent, &access, &mut owned)
                .map_err(|e| RunError::io(format!("creating the parent of output {path:?}"), e))?;
        }
        Ok(owned)
    })
    .await
}

/// Empties a finished action's directory for a later action (see
/// [`Scratch::recycle`]).
/// The declared outputs of `command` (`output_paths`, or the legacy
/// `output_files` and `output_directories`), relative to the input root;
/// `working_directory` is relative to it too.
fn declared_outputs(command: &Command, working_directory: &Path) -> Vec<PathBuf> {
    command
        .output_paths
        .iter()
        .chain(&command.output_files)
        .chain(&command.output_directories)
        .map(|path| crate::validate::normalize(&working_directory.join(path).to_string_lossy()))
        .map(PathBuf::from)
        .collect()
}

/// `message` packed as a `google.protobuf.Any` of `type_url`.
fn packed(type_url: &str, message: &impl Message) -> kiln_proto::protobuf::Any {
    kiln_proto::protobuf::Any {
        type_url: type_url.into(),
        value: message.encode_to_vec(),
    }
}

/// What [`Worker::serve`] needs of a staged action.
struct PendingRequest<'a> {
    command: &'a Command,
    workspace: &'a Path,
    /// Relative to `workspace`.
    working_directory: PathBuf,
    directories: &'a inputs::DirectoryMap,
    input_root: &'a Digest,
    action_dir: &'a Path,
    /// Who the workspace's directories go to: the worker's user.
    directories_owner: Option<(u32, u32)>,
}

/// A failed privileged step (`context`) as the action's error: when the
/// privileged side went away with the request (a launcher that died),
/// another attempt may run the action.
fn privileged_step_error(context: String, error: std::io::Error) -> RunError {
    if error.kind() == std::io::ErrorKind::ConnectionAborted {
        RunError::ExecutorUnavailable(format!("{context}: {error}"))
    } else {
        RunError::io(context, error)
    }
}

/// Kills a persistent worker and everything it started, off the async
/// threads (a cgroup is emptied with short waits).
async fn discard_worker(worker: Option<WorkerProcess>) {
    if let Some(worker) = worker {
        let _ = tokio::task::spawn_blocking(move || drop(worker)).await;
    }
}

/// Discards warm runners idle past their timeout, once a minute, for as
/// long as the pool exists.
fn sweep_idle_runners(pool: std::sync::Weak<RunnerPool>, scratch: Arc<Scratch>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            for runner in pool.expire_idle() {
                retire_runner(runner, scratch.clone()).await;
            }
        }
    });
}

/// Ends a runner that leaves the pool (expired, pushed out, or whose
/// reset failed): waits for its reset, ends its persistent worker and what
/// its backend keeps in it, and recycles its directory.
async fn retire_runner(mut runner: WarmRunner, scratch: Arc<Scratch>) {
    if let Some(reset) = runner.reset.take() {
        let _ = reset.await;
    }
    discard_worker(runner.worker.take()).await;
    drop(runner.resident.take());
    recycle_action_dir(runner.dir, scratch).await;
}

async fn recycle_action_dir(action_dir: PathBuf, scratch: Arc<Scratch>) {
    let shown = action_dir.display().to_string();
    let outcome = tokio::task::spawn_blocking(move || scratch.recycle(action_dir)).await;
    if let Ok(Err(e)) = outcome {
        tracing::warn!(path = %shown, error = %e, "could not delete an action directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compile-time check: the future of [`Worker::run`] can be given
    /// to `tokio::spawn` (it is `Send + 'static` once its arguments are
    /// owned by the task), so executors need no thread per running action.
    /// Never called; that it compiles is the test.
    fn spawn_run(
        worker: Arc<Worker>,
        instance_name: String,
        action_digest: Digest,
        platform: Platform,
    ) -> tokio::task::JoinHandle<Result<RunOutcome, RunError>> {
        tokio::spawn(async move {
            worker
                .run(
                    "",
                    &instance_name,
                    &action_digest,
                    &platform,
                    CancellationToken::new(),
                )
                .await
        })
    }

    #[test]
    fn run_future_is_spawnable() {
        let _: fn(_, _, _, _) -> _ = spawn_run;
    }
}
