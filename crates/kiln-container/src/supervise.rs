//! The life of a started container, written once for both runtimes: wait
//! under the action's timeout, on timeout or cancellation stop it with the
//! grace period (the runtime sends SIGTERM, then SIGKILL), ask whether the
//! kernel killed it for memory, and make sure it is removed — also when the
//! future running it is dropped or panics ([`RemovalGuard`]).

use std::time::Duration;

use async_trait::async_trait;
use kiln_worker::{CancellationToken, Limits, ProcessOutcome, RunError, StopReason};

/// A started container, as each runtime drives it.
#[async_trait]
pub trait Container: Send {
    /// Waits until it exits; its exit code. Cancel-safe: dropped and called
    /// again, it waits again.
    async fn wait(&mut self) -> Result<i64, RunError>;
    /// Stops it: SIGTERM, and SIGKILL after `grace_seconds`.
    async fn stop(&mut self, grace_seconds: u64) -> Result<(), RunError>;
    /// Whether the kernel killed a process of it for exceeding its memory limit.
    async fn oom_killed(&mut self) -> Result<bool, RunError>;
    /// Removes it (and whatever still runs in it); a container already gone
    /// is not an error.
    async fn remove(&mut self) -> Result<(), RunError>;
}

/// Runs `container` (already started) to its end under `limits`, then
/// removes it. The runtime reports a process killed by a signal as exit
/// code 128 + signal, which is what the outcome carries.
pub async fn supervise(
    container: &mut dyn Container,
    limits: &Limits,
    grace_seconds: u64,
    cancel: &CancellationToken,
) -> Result<ProcessOutcome, RunError> {
    let waited = tokio::select! {
        code = container.wait() => Ok(code),
        _ = tokio::time::sleep(limits.timeout) => Err(StopReason::Timeout),
        _ = cancel.cancelled() => Err(StopReason::Cancelled),
    };
    let (code, stopped) = match waited {
        Ok(code) => (code?, None),
        Err(reason) => {
            tracing::debug!(?reason, grace_seconds, "stopping the container");
            if let Err(error) = container.stop(grace_seconds).await {
                tracing::warn!(%error, "could not stop a container; removing it by force");
                container.remove().await?;
            }
            // The runtime waited the grace period and killed; a bound in
            // case it cannot even do that.
            let bound = Duration::from_secs(grace_seconds + 30);
            let code = tokio::time::timeout(bound, container.wait())
                .await
                .unwrap_or(Ok(137))?;
            (code, Some(reason))
        }
    };
    let memory_exceeded = code != 0
        && limits.memory_bytes.is_some()
        && stopped.is_none()
        && container.oom_killed().await?;
    container.remove().await?;
    let exit_code = i32::try_from(code).unwrap_or(-1);
    Ok(ProcessOutcome {
        exit_code,
        signal: None,
        stopped,
        memory_exceeded,
    })
}

/// Removes a container when dropped while still armed: the action's future
/// was dropped, panicked, or failed between creating and removing it.
pub struct RemovalGuard {
    remove: Option<Box<dyn FnOnce() + Send>>,
}

impl RemovalGuard {
    /// Arms a guard that runs `remove` (which must not block: spawn) on drop.
    pub fn new(remove: impl FnOnce() + Send + 'static) -> RemovalGuard {
        RemovalGuard {
            remove: Some(Box::new(remove)),
        }
    }

    /// The container was removed the ordinary way.
    pub fn disarm(mut self) {
        self.remove = None;
    }
}

impl Drop for RemovalGuard {
    fn drop(&mut self) {
        if let Some(remove) = self.remove.take() {
            remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A container that exits with `code` after `runs_for`, or when stopped.
    struct Fake {
        code: i64,
        runs_for: Duration,
        stopped: Option<u64>,
        removed: bool,
        oom: bool,
    }

    #[async_trait]
    impl Container for Fake {
        async fn wait(&mut self) -> Result<i64, RunError> {
            if self.stopped.is_some() {
                return Ok(143);
            }
            tokio::time::sleep(self.runs_for).await;
            Ok(self.code)
        }
        async fn stop(&mut self, grace_seconds: u64) -> Result<(), RunError> {
            self.stopped = Some(grace_seconds);
            Ok(())
        }
        async fn oom_killed(&mut self) -> Result<bool, RunError> {
            Ok(self.oom)
        }
        async fn remove(&mut self) -> Result<(), RunError> {
            self.removed = true;
            Ok(())
        }
    }

    fn limits(memory: Option<u64>) -> Limits {
        Limits {
            timeout: Duration::from_secs(60),
            grace: Duration::from_secs(3),
            memory_bytes: memory,
            cpu_millis: None,
            pids_max: None,
        }
    }

    fn fake(code: i64, runs_for: Duration, oom: bool) -> Fake {
        Fake {
            code,
            runs_for,
            stopped: None,
            removed: false,
            oom,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_exit_is_reported_and_the_container_removed() {
        let mut container = fake(3, Duration::from_secs(1), false);
        let cancel = CancellationToken::new();
        let outcome = supervise(&mut container, &limits(None), 3, &cancel)
            .await
            .unwrap();
        assert_eq!(outcome.exit_code, 3);
        assert_eq!(outcome.stopped, None);
        assert!(container.removed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_stops_with_the_grace_period() {
        let mut container = fake(0, Duration::from_secs(3600), false);
        let cancel = CancellationToken::new();
        let outcome = supervise(&mut container, &limits(None), 3, &cancel)
            .await
            .unwrap();
        assert_eq!(outcome.stopped, Some(StopReason::Timeout));
        assert_eq!(container.stopped, Some(3));
        assert!(container.removed);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_and_oom_is_asked_only_under_a_limit() {
        let mut container = fake(0, Duration::from_secs(3600), false);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let outcome = supervise(&mut container, &limits(None), 1, &cancel)
            .await
            .unwrap();
        assert_eq!(outcome.stopped, Some(StopReason::Cancelled));

        let cancel = CancellationToken::new();
        let mut killed = fake(137, Duration::from_secs(1), true);
        let outcome = supervise(&mut killed, &limits(None), 1, &cancel)
            .await
            .unwrap();
        assert!(!outcome.memory_exceeded);
        let mut killed = fake(137, Duration::from_secs(1), true);
        let outcome = supervise(&mut killed, &limits(Some(1 << 20)), 1, &cancel)
            .await
            .unwrap();
        assert!(outcome.memory_exceeded);
    }

    #[test]
    fn an_armed_guard_removes_on_drop() {
        let removed = Arc::new(AtomicBool::new(false));
        let flag = removed.clone();
        drop(RemovalGuard::new(move || {
            flag.store(true, Ordering::SeqCst)
        }));
        assert!(removed.load(Ordering::SeqCst));
        let removed = Arc::new(AtomicBool::new(false));
        let flag = removed.clone();
        RemovalGuard::new(move || flag.store(true, Ordering::SeqCst)).disarm();
        assert!(!removed.load(Ordering::SeqCst));
    }
}
