//! `workload-isolation-type=none` on a root executor with an action user:
//! a plain child process (no namespaces, no new root, the host as it is)
//! that runs as the action user, started the way the sandbox starts its
//! actions, with `clone(CLONE_VM | CLONE_VFORK)`. std's `Command` forks a
//! copy of the executor whenever it must change the user, which measured
//! +0.6 ms and twice the server CPU per trivial action (BENCHMARKS.md);
//! the clone copies nothing. Without an action user it is
//! [`NoIsolation`].

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_executor::process::{Limits, ProcessOutcome};
use kiln_executor::{CancellationToken, CommandSpec, Isolation, NoIsolation, RunAs, RunError};
use kiln_platform::Platform;

use crate::child::Plan;

/// `none`, as the action user when there is one; see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainProcess;

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

    async fn run(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        let Some(user) = spec.action_user.filter(|(uid, _)| *uid != 0) else {
            return NoIsolation.run(spec, limits, cancel).await;
        };
        let (program_name, program) = match spec.program()? {
            Ok(found) => found,
            Err(not_found) => return Ok(not_found),
        };
        let plan = Plan {
            namespaces: false,
            cgroup_join: Vec::new(),
            new_network: false,
            new_root: CString::default(),
            before_pivot: Vec::new(),
            after_pivot: Vec::new(),
            hostname: CString::default(),
            working_directory: CString::new(spec.working_directory.as_os_str().as_bytes())
                .map_err(|_| {
                    RunError::InvalidArgument(format!(
                        "working directory {} has a NUL byte",
                        spec.working_directory.display()
                    ))
                })?,
            user: Some(user),
            // setuid from root to the action user clears every capability.
            drop_capabilities: Vec::new(),
        };
        crate::sandbox::run_cloned(
            spec,
            &program,
            &program_name,
            Arc::new(plan),
            limits,
            cancel,
        )
        .await
    }
}
