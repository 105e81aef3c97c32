//! The host's side of the agent's `dockerd` request (`agent/dockerd.rs`):
//! start the image's Docker daemon in the guest and wait until it answers.

use std::time::Duration;

use super::{describe, field_text, Guest};
use crate::VmError;

/// How a `dockerd` request ended, when the agent answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerdStart {
    /// The daemon answered its ping `took` after the request arrived, of
    /// which loading its kernel modules took `modules` (nothing when an
    /// earlier request loaded them).
    Ready { took: Duration, modules: Duration },
    /// It could not be started or did not answer in time: why, with the
    /// last lines of its log in the guest.
    Failed(String),
}

impl Guest {
    /// Asks the agent to start `dockerd` (found on `path`, the image's
    /// PATH) listening on /var/run/docker.sock, and on TCP port 2375 too
    /// with `tcp`, and to wait at most `wait` for it to answer. The
    /// agent serves nothing else meanwhile, so this is called before the
    /// action runs.
    pub async fn start_dockerd(
        &self,
        tcp: bool,
        wait: Duration,
        path: &str,
    ) -> Result<DockerdStart, VmError> {
        let mut readers = self.readers.lock().await;
        let tcp: &[u8] = if tcp { b"1" } else { b"0" };
        let wait_ms = wait.as_millis().to_string();
        self.send(&[b"dockerd", tcp, wait_ms.as_bytes(), path.as_bytes()])
            .await?;
        let answer = self.answer(&mut readers).await?;
        match answer[0].as_slice() {
            b"dockerd-ready" => {
                let millis = |i| Duration::from_millis(field_text(&answer, i).parse().unwrap_or(0));
                Ok(DockerdStart::Ready {
                    took: millis(1),
                    modules: millis(2),
                })
            }
            b"dockerd-failed" => Ok(DockerdStart::Failed(field_text(&answer, 1))),
            _ => Err(self.error(format!(
                "expected dockerd-ready or dockerd-failed, got {}",
                describe(&answer)
            ))),
        }
    }
}
