//! `workload-isolation-type=none` on a root executor: a plain child
//! process (no namespaces, no new root, the host as it is) that runs as
//! the action user, inside a cgroup of its own that is emptied (SIGKILL)
//! when the action ends, so nothing it started, `setsid` daemons
//! included, outlives it. It is started the way the sandbox starts its
//! actions, with `clone(CLONE_VM | CLONE_VFORK)`: std's `Command` forks a
//! copy of the executor whenever it must change the user, which measured
//! +0.6 ms and 2.5x the server CPU per trivial action
//! (benchmarks/action-user-overlay.md).
//! Without root (no action user, no cgroups) it is [`NoIsolation`].

use std::sync::Arc;

use async_trait::async_trait;
use kiln_platform::Platform;
use kiln_worker::process::{Limits, ProcessOutcome};
use kiln_worker::{CancellationToken, CommandSpec, Isolation, NoIsolation, RunAs, RunError};

use crate::cgroup::{action_cgroup_name, CgroupRoot};
use crate::child::Plan;

/// `none`; see the module documentation.
#[derive(Debug, Default)]
pub struct PlainProcess {
    /// Where each action's cgroup goes; None where cgroups cannot be made
    /// (not root): then processes an action leaves behind can outlive it.
    cgroups: Option<CgroupRoot>,
}

impl PlainProcess {
    /// `none` with a cgroup per action under `cgroup_parent` (as the
    /// sandbox's, see [`crate::SandboxConfig::cgroup_parent`]) when this
    /// executor can make them; says why not otherwise.
    pub fn new(cgroup_parent: &str) -> PlainProcess {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return PlainProcess::default();
        }
        match CgroupRoot::detect(cgroup_parent) {
            Ok(cgroups) => PlainProcess {
                cgroups: Some(cgroups.tracking_only()),
            },
            Err(reason) => {
                tracing::warn!(
                    %reason,
                    "no cgroups for none actions: what an action leaves running can outlive it"
                );
                PlainProcess::default()
            }
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
        NoIsolation.run_as(platform, action_user)
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
        let user = spec.action_user.filter(|(uid, _)| *uid != 0);
        if user.is_none() && self.cgroups.is_none() {
            return NoIsolation.run(spec, limits, cancel).await;
        }
        let (program_name, program) = match spec.program()? {
            Ok(found) => found,
            Err(not_found) => return Ok(not_found),
        };
        // Only the pids limit (in the one hierarchy kept for tracking),
        // which bounds what killing the cgroup must catch: `none` enforces
        // no memory or CPU estimate.
        let cgroup = match &self.cgroups {
            None => None,
            Some(root) => Some(
                root.create(
                    &action_cgroup_name(),
                    &Limits {
                        memory_bytes: None,
                        cpu_millis: None,
                        ..*limits
                    },
                )
                .map_err(|e| RunError::Internal(format!("none: action cgroup: {e}")))?,
            ),
        };
        let plan = Plan::plain(
            &spec.working_directory,
            user,
            cgroup.as_ref().map(|c| c.join_fds()).unwrap_or_default(),
        );
        let outcome = crate::sandbox::run_cloned(
            spec,
            &program,
            &program_name,
            Arc::new(plan),
            limits,
            cancel,
        )
        .await;
        if let Some(cgroup) = cgroup {
            // Whatever the action left running dies here.
            cgroup.remove_off_thread().await;
        }
        outcome
    }
}
