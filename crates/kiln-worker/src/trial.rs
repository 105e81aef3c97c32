//! The trial action an isolation backend runs when it is probed at
//! start-up: a trivial command (`true`) run through the backend's own
//! `run`, with a workspace, output files and limits like a real action's.
//! Checking that a daemon answers is not enough: a runtime can answer every
//! question and still fail to start any container (an OCI runtime refusing
//! the rlimits it is given, a missing cgroup controller). Written once here
//! so every backend judges its trial, and explains a failure, the same way.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_platform::Platform;

use crate::error::RunError;
use crate::isolation::{CommandSpec, Isolation};
use crate::process::{Limits, ProcessOutcome, StopReason};
use crate::CancellationToken;

/// The limits of a trial action: a real action's kinds of limits (so
/// cgroups and runtime flags are set up as they will be), small values.
/// 64 MiB is the smallest memory limit every backend accepts with room.
const TRIAL_LIMITS: Limits = Limits {
    timeout: Duration::from_secs(10),
    grace: Duration::from_secs(1),
    memory_bytes: Some(64 << 20),
    cpu_millis: Some(1000),
    pids_max: Some(16),
};

/// At most this much of the trial's stderr goes into a failure reason.
const STDERR_SHOWN: usize = 2000;

/// One trial action: its directory (workspace and output files, removed
/// when dropped), the command and the limits it runs under.
pub struct TrialAction {
    _dir: tempfile::TempDir,
    pub spec: CommandSpec,
    pub limits: Limits,
}

impl TrialAction {
    /// A trial running `arguments` with `environment` under `platform`, in
    /// a fresh workspace under the system's temporary directory.
    pub fn new(
        arguments: &[&str],
        environment: &[(&str, &str)],
        platform: Platform,
    ) -> Result<TrialAction, String> {
        TrialAction::under(&std::env::temp_dir(), arguments, environment, platform)
    }

    /// [`TrialAction::new`], in a fresh workspace under `directory`
    /// (created if missing): where an executor's launchers take
    /// workspaces, its work root.
    pub fn under(
        directory: &std::path::Path,
        arguments: &[&str],
        environment: &[(&str, &str)],
        platform: Platform,
    ) -> Result<TrialAction, String> {
        std::fs::create_dir_all(directory)
            .map_err(|e| format!("creating {}: {e}", directory.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("kiln-trial-")
            .tempdir_in(directory)
            .map_err(|e| format!("creating the trial action's directory: {e}"))?;
        let workspace = dir.path().join("workspace");
        std::fs::create_dir(&workspace)
            .map_err(|e| format!("creating {}: {e}", workspace.display()))?;
        let spec = CommandSpec {
            arguments: arguments.iter().map(|a| a.to_string()).collect(),
            environment_variables: environment
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            working_directory: workspace.clone(),
            workspace,
            stdout_path: dir.path().join("stdout"),
            stderr_path: dir.path().join("stderr"),
            output: None,
            platform: Arc::new(platform),
            action_user: None,
            runner_tmp: None,
            output_paths: Vec::new(),
            owned_directories: Vec::new(),
            input_digests: None,
            stored_outputs: None,
        };
        Ok(TrialAction {
            _dir: dir,
            spec,
            limits: TRIAL_LIMITS,
        })
    }

    /// What `outcome` says about the backend: fine when the command exited
    /// 0, else why not, with what the command (or the runtime starting it)
    /// wrote to stderr.
    pub fn verdict(&self, outcome: Result<ProcessOutcome, RunError>) -> Result<(), String> {
        let command = format!("`{}`", self.spec.arguments.join(" "));
        let problem = match outcome {
            Ok(outcome) if outcome.exit_code == 0 && outcome.stopped.is_none() => return Ok(()),
            Ok(ProcessOutcome {
                stopped: Some(StopReason::Timeout),
                ..
            }) => format!(
                "the trial action {command} did not finish within {:?}",
                self.limits.timeout
            ),
            Ok(ProcessOutcome {
                memory_exceeded: true,
                ..
            }) => format!(
                "the trial action {command} was killed for exceeding {} MiB of memory",
                self.limits.memory_bytes.unwrap_or(0) >> 20
            ),
            Ok(outcome) => format!(
                "the trial action {command} failed with exit code {}",
                outcome.exit_code
            ),
            Err(error) => format!("the trial action {command} could not run: {error}"),
        };
        match stderr_tail(&self.spec.stderr_path) {
            // A backend may have put the stderr into its error already.
            Some(stderr) if !problem.contains(stderr.lines().next().unwrap_or_default()) => {
                Err(format!("{problem}; its stderr: {stderr}"))
            }
            _ => Err(problem),
        }
    }

    /// Runs the trial through `backend`'s own `run` and judges it (see
    /// [`TrialAction::verdict`]).
    pub async fn run_on(&self, backend: &dyn Isolation) -> Result<(), String> {
        let cancel = CancellationToken::new();
        self.verdict(backend.run(&self.spec, &self.limits, &cancel).await)
    }
}

/// The end of the file at `path`, trimmed, if it holds anything.
fn stderr_tail(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let start = text
        .char_indices()
        .map(|(index, _)| index)
        .find(|&index| text.len() - index <= STDERR_SHOWN)
        .unwrap_or(0);
    Some(text[start..].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoIsolation;

    #[tokio::test]
    async fn a_command_that_exits_zero_passes() {
        let trial =
            TrialAction::new(&["true"], &[("PATH", "/usr/bin:/bin")], Platform::default()).unwrap();
        trial.run_on(&NoIsolation).await.unwrap();
    }

    #[tokio::test]
    async fn a_failure_is_explained_with_the_commands_stderr() {
        let trial = TrialAction::new(
            &[
                "sh",
                "-c",
                "echo 'runc: error setting rlimit type 7' >&2; exit 126",
            ],
            &[("PATH", "/usr/bin:/bin")],
            Platform::default(),
        )
        .unwrap();
        let reason = trial.run_on(&NoIsolation).await.unwrap_err();
        assert!(reason.contains("failed with exit code 126"), "{reason}");
        assert!(reason.contains("error setting rlimit type 7"), "{reason}");
    }

    #[tokio::test]
    async fn a_command_that_cannot_be_found_is_named() {
        let trial = TrialAction::new(&["no-such-command-here"], &[], Platform::default()).unwrap();
        let reason = trial.run_on(&NoIsolation).await.unwrap_err();
        assert!(reason.contains("exit code 127"), "{reason}");
        assert!(reason.contains("no-such-command-here"), "{reason}");
    }

    #[test]
    fn a_long_stderr_is_cut_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        std::fs::write(&path, format!("{}the end\n", "é".repeat(3 * STDERR_SHOWN))).unwrap();
        let tail = stderr_tail(&path).unwrap();
        assert!(tail.len() <= STDERR_SHOWN);
        assert!(tail.ends_with("the end"));
        std::fs::write(&path, "\n  \n").unwrap();
        assert_eq!(stderr_tail(&path), None);
    }
}
