//! Warm VMs (`recycle-runner=true`): a VM whose action finished cleanly
//! stays its runner's [`Resident`], paused (QMP `stop`) while it waits, the
//! memory its QEMU holds counted against the executor's warm-runner memory
//! budget. The
//! next action with the runner's key resumes it with everything it had:
//! its processes, its root overlay (files outside the workspace).
//!
//! The workspace disk of the first boot stays attached for the VM's life.
//! Each later action's inputs reach it through the agent's `put`: the
//! workspace is emptied in the guest and the host's staged inputs are
//! streamed in ([`crate::tree_stream`]), a round trip on a running VM,
//! where a fresh disk per action would cost an `mke2fs`, a PCI hotplug
//! and a remount, with the last action's processes still holding the old
//! mount. Only what the guest lacks is streamed: the host remembers the
//! digest of each input file it gave the VM and of each output the last
//! action left there, and names those the next action shares
//! ([`ReusePlan`]) instead of sending them; the agent keeps them where
//! they are unchanged, and if one was changed, the inputs are sent
//! whole. Outputs come back with `collect`, and with them the
//! `.KILN_DO_NOT_RECYCLE` marker, so the worker sees it on the host.
//!
//! A kept VM that cannot take the next action (it died, it was booted for
//! another image digest or size) is killed and the action runs in a fresh
//! VM: never an error to the user. `preserve-workspace` is refused.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_platform::Platform;
use kiln_worker::isolation::{CommandSpec, InputDigests, Resident};
use kiln_worker::persistent::{WorkerProcess, WorkerStart};
use kiln_worker::runners::DO_NOT_RECYCLE;
use kiln_worker::{CancellationToken, Limits, ProcessOutcome, RunError};
use tokio::task::JoinHandle;

use super::{cancelled, process_outcome, HeldNetwork, Microvm};
use crate::guest::ReusePlan;
use crate::image_disk::ImageDisk;
use crate::vmm::Vm;
use crate::VmError;

/// `preserve-workspace=true` (possibly from the executor's default type,
/// which the platform's parsing cannot see): refused, naming it.
pub(super) fn refuse_preserved_workspace(platform: &Platform) -> Result<(), RunError> {
    if platform.preserve_workspace {
        return Err(RunError::Unsupported(
            "preserve-workspace=true: workload-isolation-type=firecracker keeps warm VMs \
             (recycle-runner) but not their workspaces: each action's inputs replace the last \
             action's files; remove preserve-workspace, or use sandbox, docker or podman"
                .into(),
        ));
    }
    Ok(())
}

/// What a VM was booted with that an action must share to run in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    image_digest: String,
    memory_mib: u64,
    vcpus: u32,
    network: bool,
    /// Where the workspace disk is mounted in the guest: the host path of
    /// the first action's workspace (a kept runner keeps its directory).
    workspace: PathBuf,
}

/// A kept VM and what it holds: its image disk's lease, its network
/// namespace, its directory (workspace disk, sockets, root overlay).
/// Dropping it kills the VM and removes its files.
pub(super) struct WarmVm {
    vm: Arc<dyn Vm>,
    /// The last `pause` or `resume`, applied in order in the background:
    /// [`Resident::pause`] is not async, QMP is.
    pending: parking_lot::Mutex<Option<JoinHandle<Result<(), VmError>>>>,
    shape: Shape,
    network: Option<HeldNetwork>,
    image: ImageDisk,
    dir: tempfile::TempDir,
    /// Not yet asked by [`Resident::take_fresh`].
    fresh: bool,
    /// The digest of each file of the last inputs the guest was given,
    /// and of the outputs its action left (those it holds unless they
    /// were changed since).
    inputs: parking_lot::Mutex<Option<Arc<InputDigests>>>,
}

impl std::fmt::Debug for WarmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmVm")
            .field("vm", &self.vm.name())
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl Microvm {
    /// `Isolation::run_in_runner`: the action in the runner's kept VM,
    /// resumed and given its inputs, or else in a fresh VM that is left in
    /// `resident` for the next action (the worker keeps it only after a
    /// clean action, and drops it otherwise).
    pub(super) async fn run_warm(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        resident: &mut Option<Box<dyn Resident>>,
    ) -> Result<ProcessOutcome, RunError> {
        refuse_preserved_workspace(&spec.platform)?;
        let image = self.image_for(&spec.platform, cancel).await?;
        let (memory_mib, vcpus) = self.vm_shape(&spec.platform);
        let shape = Shape {
            image_digest: image.digest.clone(),
            memory_mib,
            vcpus,
            network: self.gives_network(&spec.platform),
            workspace: spec.workspace.clone(),
        };
        if let Some(mut kept) = resident.take() {
            match kept
                .as_any_mut()
                .and_then(|any| any.downcast_mut::<WarmVm>())
            {
                Some(warm) if warm.shape == shape => {
                    let resumed = tokio::select! {
                        resumed = warm.take_inputs(spec) => resumed,
                        _ = cancel.cancelled() => return Ok(cancelled()),
                    };
                    match resumed {
                        Ok(()) => {
                            let outcome = warm.run_action(self, spec, limits, cancel).await;
                            if outcome.is_ok() {
                                *resident = Some(kept);
                            }
                            return outcome;
                        }
                        Err(error) => tracing::warn!(
                            vm = warm.vm.name(),
                            %error,
                            "a warm VM could not take the next action: it is discarded, and the \
                             action runs in a fresh VM"
                        ),
                    }
                }
                Some(warm) => tracing::info!(
                    vm = warm.vm.name(),
                    kept = ?warm.shape,
                    asked = ?shape,
                    "the warm VM was booted for another image or size: replaced by a fresh one"
                ),
                None => {
                    tracing::warn!(resident = ?kept, "a runner's resident is not a VM: replaced")
                }
            }
            kept.discard().await;
        }
        let (network, held) = self.network_for(&spec.platform)?;
        let dir = tempfile::Builder::new()
            .prefix("vm-")
            .tempdir_in(&self.config.run_dir)
            .map_err(|e| RunError::io("creating the VM's directory", e))?;
        let booted = self
            .boot_for(spec, cancel, &image, dir.path(), network)
            .await;
        let vm = match booted {
            Ok(Some(vm)) => vm,
            Ok(None) | Err(_) => {
                if let Some((outbound, namespace)) = held {
                    outbound.release(namespace).await;
                }
                return booted.map(|_| cancelled());
            }
        };
        let warm = WarmVm {
            vm: Arc::from(vm),
            pending: parking_lot::Mutex::new(None),
            shape,
            network: held,
            image,
            dir,
            fresh: true,
            inputs: parking_lot::Mutex::new(spec.input_digests.clone()),
        };
        let outcome = warm.run_action(self, spec, limits, cancel).await;
        if outcome.is_ok() {
            *resident = Some(Box::new(warm));
        } else {
            Box::new(warm).discard().await;
        }
        outcome
    }
}

impl WarmVm {
    /// Waits for the pause or resume under way, then makes sure the VM
    /// runs, sets its clock (it stopped while paused) and puts `spec`'s
    /// inputs in its emptied workspace, sending only the files it lacks.
    async fn take_inputs(&self, spec: &CommandSpec) -> Result<(), VmError> {
        let started = std::time::Instant::now();
        self.settle().await?;
        self.vm.resume().await?;
        let resumed = started.elapsed();
        let plan = {
            let held = self.inputs.lock().take();
            match (held, &spec.input_digests) {
                (Some(held), Some(next)) => ReusePlan::new(&held, next),
                _ => ReusePlan::default(),
            }
        };
        let (guest, workspace) = (self.vm.guest(), &self.shape.workspace);
        // Its clock and RNG are set before the inputs are written.
        let mut put = guest.ping_and_put(workspace, &spec.workspace, plan).await?;
        if let Some(path) = &put.stale {
            tracing::info!(
                vm = self.vm.name(),
                path,
                "the last action changed an input this one shares: all inputs are sent again"
            );
            put = guest
                .put(workspace, &spec.workspace, ReusePlan::default())
                .await?;
        }
        *self.inputs.lock() = spec.input_digests.clone();
        tracing::debug!(
            vm = self.vm.name(),
            resume_ms = super::ms(resumed),
            ping_and_put_ms = super::ms(started.elapsed() - resumed),
            sent_bytes = put.stream_bytes,
            reused_files = put.reused_files,
            reused_bytes = put.reused_bytes,
            "inputs in a warm VM"
        );
        Ok(())
    }

    /// Runs `spec` in the VM, whose workspace holds its inputs, and brings
    /// back its outputs and the do-not-recycle marker.
    async fn run_action(
        &self,
        backend: &Microvm,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        let mut collected = spec.output_paths.clone();
        collected.push(PathBuf::from(DO_NOT_RECYCLE));
        backend
            .run_booted(
                self.vm.as_ref(),
                spec,
                limits,
                cancel,
                &self.image,
                self.dir.path(),
                &collected,
            )
            .await
            .map(process_outcome)
    }

    /// Queues `pause` (or resume) behind the one under way.
    fn queue(&self, pause: bool) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let vm = self.vm.clone();
        let mut pending = self.pending.lock();
        let before = pending.take();
        *pending = Some(runtime.spawn(async move {
            if let Some(before) = before {
                before
                    .await
                    .map_err(|e| VmError::Setup(format!("pausing or resuming a VM: {e}")))??;
            }
            if pause {
                vm.pause().await
            } else {
                vm.resume().await
            }
        }));
    }

    /// The outcome of the queued pauses and resumes.
    async fn settle(&self) -> Result<(), VmError> {
        let pending = self.pending.lock().take();
        match pending {
            Some(task) => task
                .await
                .map_err(|e| VmError::Setup(format!("pausing or resuming a VM: {e}")))?,
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Resident for WarmVm {
    /// Never asked: the worker runs a VM runner's actions through
    /// `Isolation::run_in_runner`, which can replace a VM that fails.
    async fn run(
        &mut self,
        _spec: &CommandSpec,
        _limits: &Limits,
        _cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        Err(RunError::Internal(format!(
            "warm VM {}: its actions run through the firecracker backend",
            self.vm.name()
        )))
    }

    async fn start_worker(
        &mut self,
        _spec: &CommandSpec,
        _start: &WorkerStart,
    ) -> Result<WorkerProcess, RunError> {
        Err(RunError::Unsupported(
            "persistentWorkerKey: workload-isolation-type=firecracker keeps no persistent \
             workers in this Kiln (none, sandbox, docker and podman do)"
                .into(),
        ))
    }

    /// Lets a pause under way finish, then kills the VM, removes its files
    /// and releases its network.
    async fn discard(self: Box<Self>) {
        if let Err(error) = self.settle().await {
            tracing::debug!(vm = self.vm.name(), %error, "a discarded VM's last pause failed");
        }
        let WarmVm {
            vm, network, dir, ..
        } = *self;
        tracing::debug!(vm = vm.name(), workspace = %dir.path().display(), "warm VM discarded");
        drop(vm);
        if let Some((outbound, namespace)) = network {
            outbound.release(namespace).await;
        }
        drop(dir);
    }

    fn pause(&self) {
        self.queue(true);
    }

    fn resume(&self) {
        self.queue(false);
    }

    /// What its VMM process holds now (the guest RAM it touched, which a
    /// paused VM does not grow), or else all of its guest RAM. Not the
    /// guest RAM alone: that is the action's memory limit, or the
    /// executor's default one, most of which a guest never touches.
    fn memory_bytes(&self) -> u64 {
        self.vm
            .memory_in_use()
            .unwrap_or(self.shape.memory_mib << 20)
    }

    /// The guest holds the outputs too, where the action wrote them: the
    /// agent keeps each that is still as `collect` sent it.
    fn note_outputs(&mut self, files: InputDigests) {
        let mut held = self.inputs.lock();
        let mut all = held.as_deref().cloned().unwrap_or_default();
        all.extend(files);
        *held = Some(Arc::new(all));
    }

    fn take_fresh(&mut self) -> bool {
        std::mem::replace(&mut self.fresh, false)
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}
