//! `workload-isolation-type=none` on a root executor: a plain child
//! process (no new root, the host's file system as it is) that runs as
//! the action user, inside a cgroup of its own that is emptied (SIGKILL)
//! when the action ends, so nothing it started, `setsid` daemons
//! included, outlives it. It is started the way the sandbox starts its
//! actions, with `clone(CLONE_VM | CLONE_VFORK)`: std's `Command` forks a
//! copy of the executor whenever it must change the user, which measured
//! +0.6 ms and 2.5x the server CPU per trivial action
//! (benchmarks/action-user-overlay.md).
//!
//! What an action asks beyond that is honoured the sandbox's way, or
//! refused (FAILED_PRECONDITION naming the property): `dockerNetwork=off`
//! gives it a network namespace holding only `lo`; `dockerInit` runs
//! Kiln's init as PID 1 of a pid namespace of its own (with a /proc that
//! shows it); `dockerRunAsRoot` and `dockerUser` are honoured only where
//! the operator allows `none` actions to choose their user. Without root
//! (no action user, no cgroups, no namespaces) it is [`NoIsolation`],
//! which refuses all four.

use std::sync::Arc;

use async_trait::async_trait;
use kiln_platform::{DockerNetwork, Platform};
use kiln_worker::persistent::{WorkerProcess, WorkerStart};
use kiln_worker::process::{Limits, ProcessOutcome};
use kiln_worker::trial::TrialAction;
use kiln_worker::{
    beyond_plain_process, CancellationToken, CommandSpec, Isolation, NoIsolation, RunAs, RunError,
};

use crate::cgroup::{action_cgroup_name, CgroupRoot};
use crate::child::Network;
use crate::launch::{Launch, Planner};

/// `none`; see the module documentation.
#[derive(Debug)]
pub struct PlainProcess {
    /// Whether root's steps are taken for the executor (by its launchers,
    /// or by itself as root, see [`crate::launcher::root_behind`]): only
    /// then can an action have namespaces or another user.
    root_behind: bool,
    /// Where each action's cgroup goes; None where cgroups cannot be made
    /// (not root): then processes an action leaves behind can outlive it.
    cgroups: Option<CgroupRoot>,
    /// Whether actions may choose their user (`dockerRunAsRoot`,
    /// `dockerUser`); see [`PlainProcess::allowing_user_switch`].
    allow_user_switch: bool,
    /// Plans its actions where no launcher does.
    planner: Arc<Planner>,
    /// Whom the trial of [`PlainProcess::probe_namespaces`] runs as.
    trial_user: Option<(u32, u32)>,
    /// Why `dockerNetwork=off` and `dockerInit` cannot work here (their
    /// trial failed, see [`PlainProcess::probe_namespaces`]); Ok when they
    /// can, or were not tried.
    namespaces: Result<(), String>,
}

impl PlainProcess {
    /// A cgroup of its own for an action or a worker (`what`), when the
    /// executor has cgroups: only the pids limit (in the one hierarchy
    /// kept for tracking), which bounds what killing the cgroup must
    /// catch; `none` enforces no memory or CPU estimate.
    fn pids_cgroup(
        &self,
        limits: &Limits,
        what: &str,
    ) -> Result<Option<crate::cgroup::Cgroup>, RunError> {
        let Some(root) = &self.cgroups else {
            return Ok(None);
        };
        let limits = Limits {
            memory_bytes: None,
            cpu_millis: None,
            ..*limits
        };
        root.create(&action_cgroup_name(), &limits)
            .map(Some)
            .map_err(|e| RunError::Internal(format!("none: {what} cgroup: {e}")))
    }

    /// `none` with a cgroup per action under `cgroup_parent` (as the
    /// sandbox's, see [`crate::SandboxConfig::cgroup_parent`]) when this
    /// executor can make them; says why not otherwise. Actions may not
    /// choose their user.
    pub fn new(cgroup_parent: &str) -> PlainProcess {
        let root_behind = crate::launcher::root_behind();
        let mut plain = PlainProcess {
            root_behind,
            cgroups: None,
            allow_user_switch: false,
            planner: Arc::new(Planner::plain()),
            trial_user: None,
            namespaces: Ok(()),
        };
        if !root_behind {
            return plain;
        }
        match CgroupRoot::detect(cgroup_parent) {
            Ok(cgroups) => plain.cgroups = Some(cgroups.tracking_only()),
            Err(reason) => tracing::warn!(
                %reason,
                "no cgroups for none actions: what an action leaves running can outlive it"
            ),
        }
        plain
    }

    /// Lets actions choose whom they run as with `dockerRunAsRoot` or
    /// `dockerUser` (resolved as under `sandbox`, see
    /// [`crate::resolve_user`]), where `allowed`. A root action then keeps
    /// the sandbox's root capabilities, and is root on the host: its inputs
    /// are overlaid, but nothing keeps it from the rest of the machine.
    /// Refused (FAILED_PRECONDITION) where not allowed, the default.
    pub fn allowing_user_switch(mut self, allowed: bool) -> PlainProcess {
        self.allow_user_switch = allowed;
        self
    }

    /// Runs the trial of [`PlainProcess::probe_namespaces`] as `user`, an
    /// action user (None: root), as the launchers' policy wants it.
    pub fn trying_as(mut self, user: Option<(u32, u32)>) -> PlainProcess {
        self.trial_user = user;
        self
    }

    /// Runs, on a root executor, a trial action (`true`) with
    /// `dockerNetwork=off` and `dockerInit` through [`Isolation::run`], as
    /// the other backends' probes do. Where it fails (a root without
    /// CAP_SYS_ADMIN, say), such actions are refused, FAILED_PRECONDITION
    /// with the trial's reason, instead of failing as they start; plain
    /// `none` actions run as before. Once, at start-up.
    pub async fn probe_namespaces(mut self) -> PlainProcess {
        if !self.root_behind {
            return self;
        }
        let mut platform = Platform::default();
        platform.docker_network = Some(DockerNetwork::Off);
        platform.docker_init = true;
        let verdict = match TrialAction::new(&["true"], &[("PATH", "/usr/bin:/bin")], platform) {
            Ok(mut trial) => {
                // As an action would run: as an action user, whom its
                // workspace is not given to.
                trial.spec.action_user = self.trial_user;
                trial.spec.working_directory = "/".into();
                trial.run_on(&self).await
            }
            Err(reason) => Err(reason),
        };
        if let Err(reason) = verdict {
            tracing::warn!(
                %reason,
                "none actions cannot have namespaces here: dockerNetwork=off and dockerInit are refused under none"
            );
            self.namespaces = Err(reason);
        }
        self
    }

    /// Whom an action with `platform` runs as (`None`: root), or
    /// FAILED_PRECONDITION naming the property this executor cannot honour.
    fn user(
        &self,
        platform: &Platform,
        action_user: Option<(u32, u32)>,
    ) -> Result<Option<(u32, u32)>, RunError> {
        if !self.root_behind {
            if let Some(asked) = beyond_plain_process(platform).first() {
                return Err(RunError::Unsupported(format!(
                    "{asked}: workload-isolation-type=none honours it only on a root executor (a \
                     network namespace, an init or another user needs root), and this one runs as \
                     uid {}; use workload-isolation-type=docker or podman, a root executor, or \
                     remove the property",
                    rustix::process::geteuid().as_raw()
                )));
            }
            return Ok(action_user);
        }
        if let Err(reason) = &self.namespaces {
            let asked = [
                (
                    platform.docker_network == Some(DockerNetwork::Off),
                    "dockerNetwork=off",
                ),
                (platform.docker_init, "dockerInit=true"),
            ];
            if let Some((_, property)) = asked.into_iter().find(|(asked, _)| *asked) {
                return Err(RunError::Unsupported(format!(
                    "{property}: workload-isolation-type=none cannot give actions namespaces of \
                     their own on this executor ({reason}); use workload-isolation-type=sandbox, \
                     docker or podman, or remove the property"
                )));
            }
        }
        let chosen = if platform.docker_run_as_root {
            Some("dockerRunAsRoot=true".to_string())
        } else {
            platform
                .docker_user
                .as_ref()
                .map(|u| format!("dockerUser={u}"))
        };
        match chosen {
            None => Ok(action_user.filter(|(uid, _)| *uid != 0)),
            Some(property) if !self.allow_user_switch => Err(RunError::Unsupported(format!(
                "{property}: workload-isolation-type=none runs actions as the executor's action \
                 user, and this executor does not let them choose another (its operator can allow \
                 it: --none-allow-user-switch on kiln serve or kiln executor, or \
                 execution.isolation.none_allow_user_switch in kiln serve's config); use \
                 workload-isolation-type=sandbox, docker or podman, or remove the property"
            ))),
            Some(_) => Ok(crate::resolve_user(platform, action_user)?.filter(|(uid, _)| *uid != 0)),
        }
    }
}

#[async_trait]
impl Isolation for PlainProcess {
    fn name(&self) -> &'static str {
        "none"
    }

    fn run_as(
        &self,
        platform: &Platform,
        action_user: Option<(u32, u32)>,
    ) -> Result<RunAs, RunError> {
        Ok(match self.user(platform, action_user)? {
            Some((uid, gid)) => RunAs::User(uid, gid),
            None => RunAs::Privileged,
        })
    }

    /// With a cgroup per action, nothing an action started survives it.
    fn stops_every_process(&self) -> bool {
        self.cgroups.is_some()
    }

    /// Only where nothing an action started can reach into the next one.
    fn keeps_warm_runners(&self) -> bool {
        self.stops_every_process()
    }

    async fn run(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        let platform = &spec.platform;
        let user = self.user(platform, spec.action_user)?;
        let chose_root =
            user.is_none() && (platform.docker_run_as_root || platform.docker_user.is_some());
        let network = match platform.docker_network {
            Some(DockerNetwork::Off) => Network::Empty,
            _ => Network::Host,
        };
        let plain =
            user.is_none() && !chose_root && network == Network::Host && !platform.docker_init;
        if !self.root_behind || (plain && self.cgroups.is_none()) {
            return NoIsolation.run(spec, limits, cancel).await;
        }
        let (program_name, program) = match spec.program()? {
            Ok(found) => found,
            Err(not_found) => return Ok(not_found),
        };
        let cgroup = self.pids_cgroup(limits, "action")?;
        let launch = Launch {
            network,
            drop_root_capabilities: chose_root,
            ..Launch::plain(
                &spec.working_directory,
                user,
                cgroup.as_ref().map(|c| c.join_fds()).unwrap_or_default(),
            )
        }
        .giving(&spec.owned_directories);
        let outcome = crate::sandbox::run_started(
            spec,
            &program,
            &program_name,
            launch,
            Arc::clone(&self.planner),
            limits,
            cancel,
        )
        .await;
        if let Some(cgroup) = cgroup {
            // Whatever the action left running dies here.
            cgroup.remove_off_thread().await;
        }
        outcome.map_err(|error| match error {
            RunError::Internal(message) => {
                let stderr = std::fs::read_to_string(&spec.stderr_path).unwrap_or_default();
                RunError::Internal(crate::sandbox::with_explanation(
                    &format!("none: {message}"),
                    &stderr,
                ))
            }
            other => other,
        })
    }

    /// The worker runs as the action would, in a cgroup of its own that
    /// lives as long as it does. Only a plain `none` action: a worker in a
    /// network namespace or under an init is not kept.
    async fn start_worker(
        &self,
        spec: &CommandSpec,
        start: &WorkerStart,
        limits: &Limits,
    ) -> Result<WorkerProcess, RunError> {
        let platform = &spec.platform;
        let user = self.user(platform, spec.action_user)?;
        if !self.root_behind {
            return NoIsolation.start_worker(spec, start, limits).await;
        }
        if let Some(asked) = beyond_plain_process(platform).first() {
            return Err(RunError::Unsupported(format!(
                "{asked}: persistent workers (persistentWorkerKey with recycle-runner) run as \
                 plain processes under workload-isolation-type=none in this Kiln; remove the \
                 property, or recycle-runner to run the action as an ordinary one"
            )));
        }
        let cgroup = self.pids_cgroup(limits, "worker")?;
        let launch = Launch::plain(
            &spec.working_directory,
            user,
            cgroup.as_ref().map(|c| c.join_fds()).unwrap_or_default(),
        )
        .giving(&spec.owned_directories);
        let planner = Arc::clone(&self.planner);
        let (worker, child) =
            crate::sandbox::start_worker_process(spec, start, launch, planner).await?;
        Ok(worker.guarded_by(Box::new(PlainWorker {
            child,
            _cgroup: cgroup,
        })))
    }
}

/// What a plain persistent worker holds. Dropped, it kills the worker's
/// process group first (the worker leads it, and is not reaped yet, so
/// the group is still its own); then, as fields drop in order, the worker
/// is reaped and its cgroup, catching anything that left the group,
/// emptied and removed.
struct PlainWorker {
    child: crate::cloned::ClonedChild,
    _cgroup: Option<crate::cgroup::Cgroup>,
}

impl Drop for PlainWorker {
    fn drop(&mut self) {
        use kiln_worker::process::{Pid, Process, Signal};
        if let Some(pid) = self.child.id().and_then(|pid| Pid::from_raw(pid as i32)) {
            self.child.signal_group(pid, Signal::KILL);
        }
    }
}
