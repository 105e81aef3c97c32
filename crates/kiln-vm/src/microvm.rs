//! The `firecracker` isolation backend: each action in a VM of its own,
//! booted from its container image (a root disk built once per image
//! digest, [`crate::image_disk`]) with its workspace as a second disk
//! ([`crate::workspace_disk`]), mounted in the guest at the workspace's
//! host path, as containers mount it. The image is resolved with the
//! action's credentials as for containers (`kiln_container::image::Images`,
//! with the disk cache as its store), and its ENTRYPOINT, ENV, WORKDIR and
//! USER apply as they do there; CMD never runs.
//!
//! Network: `dockerNetwork=off` gives the VM no network device at all.
//! Otherwise QEMU's user networking runs inside a network namespace wired
//! as a sandbox action's (`kiln_sandbox::network`): outbound only, and
//! slirp's host address (10.0.2.2) is that namespace's empty loopback,
//! never the host's.
//!
//! Outputs come back through the agent ([`crate::tree_stream`]) into the
//! host's workspace, where the worker collects them as for every type;
//! the host never parses the guest's disk. Every action boots a fresh VM,
//! killed with its files when the action ends, unless its runner is kept
//! (`recycle-runner=true`): then the VM waits, paused, for the next action
//! with its runner key ([`warm`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kiln_container::image::{ImageConfig, Images};
use kiln_container::NetworkConfig;
use kiln_platform::{DockerNetwork, DockerUser, Platform};
use kiln_proto::reapi::Digest;
use kiln_sandbox::network::{ActionNetwork, Outbound};
use kiln_worker::isolation::{CommandSpec, Isolation, Resident, RunAs, StoredOutputs};
use kiln_worker::{CancellationToken, Limits, ProcessOutcome, RunError, StopReason};

use crate::guest::{Ask, GuestOutcome, GuestStatus, GuestUser, Holder, RunRequest};
use crate::image_disk::{ImageDisk, ImageDisks, ImageDisksConfig, ImageRuntimeConfig};
use crate::qemu::{QemuConfig, QemuVmm};
use crate::tree_stream::DecodeLimits;
use crate::vmm::{Accelerator, Network, Vm, VmSpec, Vmm, WorkspaceDisk};
use crate::{workspace_disk, VmError};

mod dockerd;
pub use dockerd::DOCKERD_WAIT;
mod warm;

/// Guest memory the kernel and agent need beyond the action's own
/// (`EstimatedMemory`): added to each VM's RAM, and stated in the docs.
pub const MEMORY_OVERHEAD_BYTES: u64 = 96 << 20;

/// How the backend runs.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    pub qemu: QemuConfig,
    /// The guest kernel and its modules tree.
    pub kernel: PathBuf,
    pub modules_dir: PathBuf,
    /// Image disks: where, and the disk budget.
    pub disks: ImageDisksConfig,
    /// `mke2fs` (e2fsprogs), which builds each workspace disk.
    pub mke2fs: PathBuf,
    /// Where each VM's directory (sockets, overlay, workspace disk) is
    /// made; short, as socket paths are limited to 107 bytes.
    pub run_dir: PathBuf,
    pub images: ImageConfig,
    pub network: NetworkConfig,
    /// Guest memory of an action without `EstimatedMemory` (the overhead
    /// is added to it), vCPUs of one without `EstimatedCPU`, and free
    /// space on the workspace disk of one without `EstimatedFreeDiskBytes`.
    pub default_memory_bytes: u64,
    pub default_vcpus: u32,
    pub default_free_disk_bytes: u64,
    /// Most vCPUs one VM gets, whatever it asks.
    pub max_vcpus: u32,
    /// The longest a guest may take to boot.
    pub boot_timeout: Duration,
    /// Bounds on what a guest may send back as outputs.
    pub output_limits: DecodeLimits,
    /// Which output files the guest hashes, to send only those the CAS
    /// lacks.
    pub hash_outputs_from: HashOutputsFrom,
}

/// Which output files a guest hashes itself before sending: those the CAS
/// holds then never cross to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashOutputsFrom {
    /// [`HASH_OUTPUTS_FROM_UNDER_KVM`] under KVM; under TCG none, as
    /// hashing in an emulated guest costs more than sending the bytes.
    Auto,
    /// None: every file is sent.
    Off,
    /// Files of at least this many bytes.
    Bytes(u64),
}

/// The smallest file a guest under KVM hashes with [`HashOutputsFrom::Auto`].
/// Each file asked about costs a round trip to the guest and a CAS lookup
/// (the agent asks one file at a time); from 1 MiB that is a small part
/// of sending the bytes, and the asks of one action are at most its
/// output bytes over 1 MiB.
pub const HASH_OUTPUTS_FROM_UNDER_KVM: u64 = 1 << 20;

/// An action's network namespace, and the networks it goes back to.
type HeldNetwork = (Arc<Outbound>, ActionNetwork);

/// The backend.
pub struct Microvm {
    config: MicrovmConfig,
    vmm: QemuVmm,
    images: Images,
    disks: ImageDisks,
    network: Result<Arc<Outbound>, String>,
    /// SHA-256 of the kernel, pinned in each result's metadata.
    kernel_digest: String,
}

impl Microvm {
    /// Checks QEMU and the kernel, picks the accelerator, opens the disk
    /// cache, sets up bridged networks, then boots a VM and runs a trial
    /// action in it: the backend, or why it does not work here.
    pub async fn probe(config: MicrovmConfig) -> Result<Microvm, String> {
        let kernel_digest = file_digest(&config.kernel)
            .await
            .map_err(|e| format!("reading the guest kernel {}: {e}", config.kernel.display()))?;
        if !config.modules_dir.join("modules.dep").is_file() {
            return Err(format!(
                "no modules.dep in the guest kernel's modules directory {} \
                 (scripts/install-deps.sh unpacks and indexes them)",
                config.modules_dir.display()
            ));
        }
        std::fs::create_dir_all(&config.run_dir)
            .map_err(|e| format!("creating {}: {e}", config.run_dir.display()))?;
        let vmm = QemuVmm::new(config.qemu.clone(), &config.kernel)
            .await
            .map_err(|e| e.to_string())?;
        let disks = ImageDisks::open(config.disks.clone())?;
        let images = Images::new("firecracker", config.images.clone())?;
        let network = {
            let network = config.network.clone();
            tokio::task::spawn_blocking(move || {
                Outbound::set_up(&network.cidr, &network.nft_binary).map(Arc::new)
            })
            .await
            .map_err(|e| format!("setting up networks panicked: {e}"))?
        };
        if let Err(reason) = &network {
            tracing::warn!(
                %reason,
                "firecracker actions cannot have a network here: dockerNetwork=bridge actions \
                 fail, and actions that leave dockerNetwork unset run without network"
            );
        }
        let backend = Microvm {
            config,
            vmm,
            images,
            disks,
            network,
            kernel_digest,
        };
        backend.trial().await?;
        Ok(backend)
    }

    /// The smallest output file the guest hashes, if any.
    fn hash_outputs_from(&self) -> Option<u64> {
        match (self.config.hash_outputs_from, self.vmm.accelerator()) {
            (HashOutputsFrom::Off, _) | (HashOutputsFrom::Auto, Accelerator::QemuTcg) => None,
            (HashOutputsFrom::Auto, Accelerator::QemuKvm) => Some(HASH_OUTPUTS_FROM_UNDER_KVM),
            (HashOutputsFrom::Bytes(bytes), _) => Some(bytes.max(1)),
        }
    }

    /// `qemu-kvm` or `qemu-tcg`: what runs the VMs, advertised as the
    /// executor's `vmm` property and recorded in each result.
    pub fn vmm_name(&self) -> &'static str {
        self.vmm.accelerator().as_str()
    }

    /// Boots a VM from a root disk holding only the agent, and runs the
    /// agent in it as an action (outside PID 1 it prints its name and
    /// exits 0).
    async fn trial(&self) -> Result<(), String> {
        let dir = tempfile::Builder::new()
            .prefix("trial-")
            .tempdir_in(&self.config.run_dir)
            .map_err(|e| format!("creating the trial's directory: {e}"))?;
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&tree).map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::PermissionsExt;
            let agent = tree.join("kiln-trial");
            std::fs::write(&agent, crate::initramfs::AGENT).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
        }
        let root = dir.path().join("root.ext4");
        workspace_disk::build(&self.config.mke2fs, &tree, &root, 4 << 20)
            .await
            .map_err(|e| format!("building the trial's root disk: {e}"))?;
        let spec = VmSpec {
            kernel: self.config.kernel.clone(),
            modules_dir: self.config.modules_dir.clone(),
            boot_timeout: self.config.boot_timeout,
            memory_mib: 256,
            ..VmSpec::new("kiln-trial", &root, dir.path())
        };
        let vm = self.vmm.boot(&spec).await.map_err(|e| e.to_string())?;
        let mut stdout = Vec::new();
        let outcome = vm
            .guest()
            .run(
                &RunRequest::new(["/kiln-trial"]),
                &mut stdout,
                tokio::io::sink(),
                CancellationToken::new(),
            )
            .await
            .map_err(|e| e.to_string())?;
        vm.kill();
        if outcome.status != GuestStatus::Exited(0) {
            return Err(format!("the trial action in a VM ended with {outcome:?}"));
        }
        tracing::info!(
            vmm = self.vmm_name(),
            kernel = %self.config.kernel.display(),
            "firecracker: a trial action ran in a VM"
        );
        Ok(())
    }

    /// Whether an action with `platform` gets a network device: unless it
    /// says `dockerNetwork=off`, or leaves it unset where bridged networks
    /// could not be set up (`bridge` asked for there is refused).
    fn gives_network(&self, platform: &Platform) -> bool {
        !matches!(
            (platform.docker_network, &self.network),
            (Some(DockerNetwork::Off), _) | (None, Err(_))
        )
    }

    /// The network of an action's VM, and what holds its namespace.
    fn network_for(&self, platform: &Platform) -> Result<(Network, Option<HeldNetwork>), RunError> {
        if !self.gives_network(platform) {
            return Ok((Network::Off, None));
        }
        match &self.network {
            Ok(outbound) => {
                let namespace = outbound.connect().map_err(|e| {
                    kiln_sandbox::network::connect_failure("creating the VM's network namespace", e)
                })?;
                let network = Network::User {
                    netns: Some(namespace.path()),
                };
                Ok((network, Some((outbound.clone(), namespace))))
            }
            Err(reason) => Err(RunError::Unsupported(format!(
                "dockerNetwork=bridge: this executor cannot give VMs a network of their own \
                 ({reason}); set dockerNetwork=off, or run the action elsewhere"
            ))),
        }
    }

    async fn run_in_vm(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        image: &ImageDisk,
        dir: &Path,
        network: Network,
    ) -> Result<ProcessOutcome, RunError> {
        let vm = match self.boot_for(spec, cancel, image, dir, network).await? {
            Some(vm) => vm,
            None => return Ok(cancelled()),
        };
        let outcome = self
            .run_booted(
                vm.as_ref(),
                spec,
                limits,
                cancel,
                image,
                dir,
                &spec.output_paths,
            )
            .await;
        vm.kill();
        outcome.map(process_outcome)
    }

    /// The guest RAM (MiB) and vCPUs of a VM for an action on `platform`:
    /// its own estimates, else the VM defaults (never the executor's
    /// default limits for processes, which are sized to the whole host).
    fn vm_shape(&self, platform: &Platform) -> (u64, u32) {
        let memory = platform
            .resources
            .memory_bytes
            .unwrap_or(self.config.default_memory_bytes);
        let vcpus = platform
            .resources
            .cpu_millis
            .map_or(self.config.default_vcpus, |millis| {
                millis.div_ceil(1000).max(1) as u32
            })
            .clamp(1, self.config.max_vcpus.max(1));
        ((memory + MEMORY_OVERHEAD_BYTES).div_ceil(1 << 20), vcpus)
    }

    /// Boots the VM of `spec` in `dir`, its workspace disk built from the
    /// staged inputs; None when `cancel` fired first.
    async fn boot_for(
        &self,
        spec: &CommandSpec,
        cancel: &CancellationToken,
        image: &ImageDisk,
        dir: &Path,
        network: Network,
    ) -> Result<Option<Box<dyn Vm>>, RunError> {
        let platform = &spec.platform;
        let workspace_image = dir.join("workspace.ext4");
        let free = platform
            .resources
            .free_disk_bytes
            .unwrap_or(self.config.default_free_disk_bytes);
        workspace_disk::build(&self.config.mke2fs, &spec.workspace, &workspace_image, free).await?;
        let (memory_mib, vcpus) = self.vm_shape(platform);
        let vm_spec = VmSpec {
            kernel: self.config.kernel.clone(),
            modules_dir: self.config.modules_dir.clone(),
            workspace: Some(WorkspaceDisk {
                image: workspace_image,
                mount_at: spec.workspace.clone(),
            }),
            vcpus,
            memory_mib,
            network,
            boot_timeout: self.config.boot_timeout,
            ..VmSpec::new(vm_name(dir), &image.rootfs, dir)
        };
        tokio::select! {
            vm = self.vmm.boot(&vm_spec) => vm.map(Some).map_err(vm_error),
            _ = cancel.cancelled() => Ok(None),
        }
    }

    /// Runs `spec` in `vm`, then brings back `collected` (its outputs,
    /// relative to the workspace) unless it was cancelled: partial outputs
    /// of a timed-out action are kept, as for every type.
    #[allow(clippy::too_many_arguments)]
    async fn run_booted(
        &self,
        vm: &dyn Vm,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        image: &ImageDisk,
        dir: &Path,
        collected: &[PathBuf],
    ) -> Result<GuestOutcome, RunError> {
        if !dockerd::start_if_asked(vm, &spec.platform, &image.config, cancel).await? {
            // Cancelled while dockerd started: nothing ran.
            return Ok(GuestOutcome {
                status: GuestStatus::Signaled(9),
                timed_out: false,
                oom_killed: false,
                cancelled: true,
            });
        }
        let request = run_request(spec, limits, &image.config);
        let (stdout, stderr) = spec.output_fds()?;
        let stdout = tokio::fs::File::from_std(std::fs::File::from(stdout));
        let stderr = tokio::fs::File::from_std(std::fs::File::from(stderr));
        let started = std::time::Instant::now();
        let outcome = vm
            .guest()
            .run(&request, stdout, stderr, cancel.clone())
            .await
            .map_err(vm_error)?;
        let ran = started.elapsed();
        if !outcome.cancelled {
            self.bring_back_outputs(vm, spec, dir, collected).await?;
        }
        tracing::debug!(
            vm = vm.name(),
            run_ms = ms(ran),
            outputs_ms = ms(started.elapsed() - ran),
            "action in a VM"
        );
        Ok(outcome)
    }

    /// Writes the action's declared outputs, as the guest holds them, into
    /// the host's workspace in place of whatever was there.
    async fn bring_back_outputs(
        &self,
        vm: &dyn Vm,
        spec: &CommandSpec,
        dir: &Path,
        paths: &[PathBuf],
    ) -> Result<(), RunError> {
        if paths.is_empty() {
            return Ok(());
        }
        let stream_file = dir.join("outputs.stream");
        let holder = spec.stored_outputs.as_deref().map(CasHolder);
        let ask = holder
            .as_ref()
            .zip(self.hash_outputs_from())
            .map(|(holder, from_bytes)| Ask {
                from_bytes,
                holder: holder as &dyn Holder,
            });
        let confirmed = vm
            .guest()
            .collect(
                &spec.workspace,
                paths,
                &stream_file,
                // The stream's own headers on top of the content.
                self.config.output_limits.bytes.saturating_add(64 << 20),
                ask,
            )
            .await
            .map_err(vm_error)?;
        let workspace = spec.workspace.clone();
        let paths = paths.to_vec();
        let limits = self.config.output_limits;
        let decoded = kiln_worker::process::blocking("bringing the VM's outputs back", move || {
            let root = std::fs::File::open(&workspace)
                .map_err(|e| RunError::io(format!("opening {}", workspace.display()), e))?;
            for path in &paths {
                kiln_worker::runners::remove_beneath(&root, path)
                    .map_err(|e| RunError::io(format!("clearing {}", path.display()), e))?;
            }
            let stream = std::fs::File::open(&stream_file)
                .map_err(|e| RunError::io(format!("opening {}", stream_file.display()), e))?;
            crate::tree_stream::decode(&mut std::io::BufReader::new(stream), &workspace, limits)
                .map_err(|e| RunError::Internal(format!("the VM's outputs: {e}")))
        })
        .await?;
        if !decoded.stored.is_empty() {
            tracing::info!(
                vm = vm.name(),
                files = decoded.stored.len(),
                bytes = decoded.stored.iter().map(|(_, size, _)| size).sum::<u64>(),
                "outputs the CAS holds stayed in the VM"
            );
        }
        for (path, size, sha256) in decoded.stored {
            // Only what the host said the CAS holds, asked as this
            // action's organisation: a guest naming another digest would
            // put into the result a blob the action never had.
            let Some(stored) = spec
                .stored_outputs
                .as_ref()
                .filter(|_| confirmed.contains(&(size, sha256)))
            else {
                return Err(RunError::Internal(format!(
                    "the VM sent {path} as held by the CAS, which the host did not say"
                )));
            };
            stored.record(
                path,
                Digest {
                    hash: hex::encode(sha256),
                    size_bytes: size as i64,
                },
            );
        }
        Ok(())
    }
}

impl Microvm {
    /// The root disk of `platform`'s image (resolved with its credentials,
    /// built once per digest), leased while the value lives.
    async fn image_for(
        &self,
        platform: &Platform,
        cancel: &CancellationToken,
    ) -> Result<ImageDisk, RunError> {
        let resolved = self
            .images
            .ensure(platform, &self.disks, false, cancel)
            .await?;
        self.disks
            .disk_for(
                &resolved,
                platform.registry_credentials.as_ref(),
                self.images.is_insecure(&resolved.image.registry),
            )
            .await
    }
}

/// The agent's request for `spec`: the image's ENTRYPOINT before the
/// arguments, its ENV under the Command's, and its USER unless the
/// platform says whom to run as.
fn run_request(spec: &CommandSpec, limits: &Limits, image: &ImageRuntimeConfig) -> RunRequest {
    let platform = &spec.platform;
    let mut environment: Vec<(String, String)> = image
        .env
        .iter()
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    for (name, value) in &spec.environment_variables {
        environment.retain(|(existing, _)| existing != name);
        environment.push((name.clone(), value.clone()));
    }
    let user = if platform.docker_run_as_root {
        GuestUser::Id { uid: 0, gid: 0 }
    } else {
        match &platform.docker_user {
            Some(DockerUser::Name(name)) => GuestUser::Name(name.clone()),
            Some(DockerUser::Uid(uid)) => GuestUser::Id {
                uid: *uid,
                gid: *uid,
            },
            Some(DockerUser::UidGid(uid, gid)) => GuestUser::Id {
                uid: *uid,
                gid: *gid,
            },
            None => image_user(image.user.as_deref()),
        }
    };
    RunRequest {
        arguments: image
            .entrypoint
            .iter()
            .chain(&spec.arguments)
            .map(Into::into)
            .collect(),
        environment: environment
            .into_iter()
            .map(|(name, value)| (name.into(), value.into()))
            .collect(),
        working_directory: spec.working_directory.clone(),
        user,
        timeout: Some(limits.timeout),
        grace: limits.grace,
        memory_limit_bytes: limits.memory_bytes,
    }
}

/// The image's `USER` (`name`, `uid`, `uid:gid` or `name:group`): ids
/// as given, a name looked up in the guest; root when unset.
fn image_user(user: Option<&str>) -> GuestUser {
    let Some(user) = user.filter(|user| !user.is_empty()) else {
        return GuestUser::Id { uid: 0, gid: 0 };
    };
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    match (name.parse::<u32>(), group.map(str::parse::<u32>)) {
        (Ok(uid), None) => GuestUser::Id { uid, gid: uid },
        (Ok(uid), Some(Ok(gid))) => GuestUser::Id { uid, gid },
        _ => GuestUser::Name(name.to_string()),
    }
}

/// The outcome of an action cancelled before its VM booted.
fn cancelled() -> ProcessOutcome {
    ProcessOutcome {
        stopped: Some(StopReason::Cancelled),
        ..ProcessOutcome::exited(137)
    }
}

fn process_outcome(outcome: GuestOutcome) -> ProcessOutcome {
    let (exit_code, signal) = match outcome.status {
        GuestStatus::Exited(code) => (code, None),
        GuestStatus::Signaled(signal) => (128 + signal, Some(signal)),
    };
    ProcessOutcome {
        exit_code,
        signal,
        stopped: if outcome.cancelled {
            Some(StopReason::Cancelled)
        } else if outcome.timed_out {
            Some(StopReason::Timeout)
        } else {
            None
        },
        memory_exceeded: outcome.oom_killed,
    }
}

fn vm_error(error: VmError) -> RunError {
    RunError::Internal(error.to_string())
}

/// `kiln-vm-XXXX`, from the VM's directory name.
fn vm_name(dir: &Path) -> String {
    dir.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kiln-vm".into())
}

async fn file_digest(path: &Path) -> std::io::Result<String> {
    use sha2::Digest as _;
    let bytes = tokio::fs::read(path).await?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}

#[async_trait]
impl Isolation for Microvm {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn run_as(
        &self,
        platform: &Platform,
        _action_user: Option<(u32, u32)>,
    ) -> Result<RunAs, RunError> {
        warm::refuse_preserved_workspace(platform)?;
        Ok(RunAs::Privileged)
    }

    fn keeps_warm_runners(&self) -> bool {
        true
    }

    async fn run_in_runner(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        resident: &mut Option<Box<dyn Resident>>,
    ) -> Result<ProcessOutcome, RunError> {
        self.run_warm(spec, limits, cancel, resident).await
    }

    fn sees_host_workspace(&self) -> bool {
        false
    }

    fn properties(&self) -> Vec<(String, String)> {
        vec![("vmm".into(), self.vmm_name().into())]
    }

    fn stops_every_process(&self) -> bool {
        true
    }

    async fn prepare(
        &self,
        platform: &Platform,
        cancel: &CancellationToken,
    ) -> Result<(), RunError> {
        self.images
            .ensure(platform, &self.disks, false, cancel)
            .await
            .map(|_| ())
    }

    async fn run(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutcome, RunError> {
        let platform = &spec.platform;
        let image = self.image_for(platform, cancel).await?;
        let (network, held) = self.network_for(platform)?;
        let dir = tempfile::Builder::new()
            .prefix("vm-")
            .tempdir_in(&self.config.run_dir)
            .map_err(|e| RunError::io("creating the VM's directory", e))?;
        let outcome = self
            .run_in_vm(spec, limits, cancel, &image, dir.path(), network)
            .await;
        if let Some((outbound, namespace)) = held {
            outbound.release(namespace).await;
        }
        tracing::debug!(
            vmm = self.vmm_name(),
            kernel = %self.kernel_digest,
            image = %image.digest,
            "firecracker action ran"
        );
        outcome
    }
}

/// Milliseconds, for the log.
fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Asks the CAS, as the action's organisation, whether it holds an output
/// the guest hashed.
struct CasHolder<'a>(&'a StoredOutputs);

#[async_trait]
impl Holder for CasHolder<'_> {
    async fn holds(&self, size: u64, sha256: [u8; 32]) -> bool {
        let Ok(size_bytes) = i64::try_from(size) else {
            return false;
        };
        let digest = Digest {
            hash: hex::encode(sha256),
            size_bytes,
        };
        match self.0.missing(vec![digest]).await {
            Ok(missing) => missing.is_empty(),
            Err(error) => {
                tracing::warn!(%error, "asking the CAS for a VM's output; it is sent");
                false
            }
        }
    }
}
