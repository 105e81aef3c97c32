//! `init-dockerd` for a firecracker action: before the action runs, the
//! agent starts the image's `dockerd` and waits until it answers
//! ([`crate::guest::Guest::start_dockerd`]). A daemon that cannot start or
//! does not answer within [`DOCKERD_WAIT`] fails the action with
//! FAILED_PRECONDITION, quoting its log.

use std::time::Duration;

use kiln_platform::Platform;
use kiln_worker::{CancellationToken, RunError};

use crate::guest::DockerdStart;
use crate::image_disk::ImageRuntimeConfig;
use crate::vmm::Vm;

/// The longest the agent waits for the daemon to answer.
pub const DOCKERD_WAIT: Duration = Duration::from_secs(30);

/// Where dockerd is looked for, and what it runs with, when the image
/// sets no PATH.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Starts dockerd in `vm` when `platform` asks for it: `Ok(true)` when it
/// answers (or was not asked for), `Ok(false)` when `cancel` fired
/// meanwhile.
pub(super) async fn start_if_asked(
    vm: &dyn Vm,
    platform: &Platform,
    image: &ImageRuntimeConfig,
    cancel: &CancellationToken,
) -> Result<bool, RunError> {
    if !platform.init_dockerd {
        return Ok(true);
    }
    let path = image
        .env
        .iter()
        .find_map(|pair| pair.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let started = tokio::select! {
        started = vm.guest().start_dockerd(platform.enable_dockerd_tcp, DOCKERD_WAIT, path) => {
            started.map_err(|e| RunError::Internal(e.to_string()))?
        }
        _ = cancel.cancelled() => return Ok(false),
    };
    match started {
        DockerdStart::Ready { took, modules } => {
            tracing::info!(
                ?took,
                ?modules,
                tcp = platform.enable_dockerd_tcp,
                "firecracker: dockerd answers in the VM"
            );
            Ok(true)
        }
        DockerdStart::Failed(why) => {
            Err(RunError::Unsupported(format!("init-dockerd=true: {why}")))
        }
    }
}
