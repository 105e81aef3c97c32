//! The isolation seam: how an action's command is run. One trait, one
//! implementation per isolation type (`workload-isolation-type`); only
//! `none` exists today. Backends build the command their way and hand it to
//! the shared [`crate::process::supervise`], so lookup, process groups and
//! the stop sequence are written once.

use std::path::PathBuf;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::RunError;
use crate::process::{self, Limits, ProcessOutcome};

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
}

impl CommandSpec {
    /// `PATH` from the Command's environment, if it sets one.
    pub fn path_variable(&self) -> Option<&str> {
        self.environment_variables
            .iter()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| value.as_str())
    }
}

/// Runs a command under one kind of isolation.
#[async_trait]
pub trait Isolation: Send + Sync {
    /// The `workload-isolation-type` value this backend implements.
    fn name(&self) -> &'static str;

    /// Runs `spec` to completion, or stops it on timeout or `cancel`. A
    /// command that cannot be found is an outcome (exit code 127 and a
    /// stderr naming it), not an error.
    async fn run(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError>;
}

/// `workload-isolation-type=none`: a plain child process of the executor.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIsolation;

#[async_trait]
impl Isolation for NoIsolation {
    fn name(&self) -> &'static str {
        "none"
    }

    async fn run(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        let program_name = spec.arguments.first().cloned().unwrap_or_default();
        let Some(program) =
            process::resolve_program(&program_name, &spec.working_directory, spec.path_variable())
        else {
            process::write_stderr(
                &spec.stderr_path,
                &format!("kiln: {program_name}: command not found\n"),
            )?;
            return Ok(ProcessOutcome {
                exit_code: process::EXIT_COMMAND_NOT_FOUND,
                signal: None,
                stopped: None,
            });
        };
        let (stdout, stderr) = process::output_stdio(&spec.stdout_path, &spec.stderr_path)?;
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
}
