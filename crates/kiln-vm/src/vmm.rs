//! The VMM seam: what Kiln needs from a virtual machine monitor (boot a VM
//! from a spec, pause, resume, snapshot, restore, kill, and the channel to
//! its agent). QEMU (`qemu.rs`) is the driver tested here; a Firecracker
//! driver would be another implementation of these two traits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::guest::Guest;
use crate::VmError;

/// The Debian cloud kernel the install script unpacks.
pub const DEFAULT_KERNEL: &str = "/usr/local/lib/kiln-vm/vmlinuz";
/// Its `lib/modules/VERSION` tree.
pub const DEFAULT_MODULES_DIR: &str = "/usr/local/lib/kiln-vm/modules";

/// What runs a VM, as reported in results and advertised as the `vmm`
/// property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualisation through /dev/kvm.
    QemuKvm,
    /// QEMU's software emulation.
    QemuTcg,
}

impl Accelerator {
    /// `qemu-kvm` or `qemu-tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::QemuKvm => "qemu-kvm",
            Accelerator::QemuTcg => "qemu-tcg",
        }
    }
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The VM's network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network {
    /// No network device at all (`dockerNetwork=off`).
    Off,
    /// Outbound access through QEMU's user networking (slirp): the guest
    /// is 10.0.2.15/24, its gateway 10.0.2.2, its DNS 10.0.2.3. Slirp's
    /// 10.0.2.2 reaches the loopback of the network namespace QEMU runs
    /// in, so the caller gives one (a path such as `/run/netns/NAME` or
    /// `/proc/PID/ns/net`) whose loopback holds nothing of the host's;
    /// None runs QEMU in the caller's own namespace (tests only).
    User { netns: Option<PathBuf> },
}

/// A disk the guest mounts read-write at `mount_at`: the action's
/// workspace, readable on the host (e.g. with `debugfs`) once the VM has
/// shut down.
#[derive(Clone, Debug)]
pub struct WorkspaceDisk {
    /// A raw ext4 image file.
    pub image: PathBuf,
    /// An absolute path inside the guest.
    pub mount_at: PathBuf,
}

/// Everything a VM is booted from.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Names the VM in errors, logs and its runtime directory.
    pub name: String,
    /// The guest kernel (a bzImage).
    pub kernel: PathBuf,
    /// The kernel's `lib/modules/VERSION` tree (with `modules.dep`).
    pub modules_dir: PathBuf,
    /// The root disk: a raw ext4 image. Never written: the VM writes to a
    /// copy-on-write overlay in its runtime directory, so a cached image
    /// serves every VM.
    pub root_disk: PathBuf,
    pub workspace: Option<WorkspaceDisk>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub network: Network,
    /// The guest's hostname (empty: the kernel's default).
    pub hostname: String,
    /// Where the VM's directory (sockets, console log, disk overlay) is
    /// made; it is removed with the VM. Keep the path short: socket paths
    /// are limited to 107 bytes.
    pub runtime_dir: PathBuf,
    /// How long the guest may take from start to its agent's `ready`.
    pub boot_timeout: Duration,
}

impl VmSpec {
    /// A spec with the default kernel and modules, 1 vCPU, 512 MiB, no
    /// network and a 120 s boot timeout (software emulation is slow).
    pub fn new(name: impl Into<String>, root_disk: impl Into<PathBuf>, runtime_dir: &Path) -> Self {
        VmSpec {
            name: name.into(),
            kernel: DEFAULT_KERNEL.into(),
            modules_dir: DEFAULT_MODULES_DIR.into(),
            root_disk: root_disk.into(),
            workspace: None,
            vcpus: 1,
            memory_mib: 512,
            network: Network::Off,
            hostname: String::new(),
            runtime_dir: runtime_dir.to_path_buf(),
            boot_timeout: Duration::from_secs(120),
        }
    }
}

/// A virtual machine monitor.
#[async_trait]
pub trait Vmm: Send + Sync {
    /// What this VMM's VMs run on.
    fn accelerator(&self) -> Accelerator;

    /// Boots a VM and waits until its agent is ready (root mounted,
    /// workspace mounted, network up).
    async fn boot(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmError>;

    /// Starts a VM from a snapshot `Vm::snapshot` wrote into `snapshot_dir`
    /// for a VM of the same `spec` (its name and runtime dir may differ),
    /// and waits until its agent answers.
    async fn restore(&self, spec: &VmSpec, snapshot_dir: &Path) -> Result<Box<dyn Vm>, VmError>;
}

/// A running VM. Dropping it kills the VM and removes its runtime files.
#[async_trait]
pub trait Vm: Send + Sync {
    fn name(&self) -> &str;

    fn accelerator(&self) -> Accelerator;

    /// From start to the agent's `ready` (or its answer after a restore).
    fn boot_duration(&self) -> Duration;

    /// The channel to the guest's agent.
    fn guest(&self) -> &Guest;

    /// Stops the vCPUs; the guest's clock stops with them.
    async fn pause(&self) -> Result<(), VmError>;

    async fn resume(&self) -> Result<(), VmError>;

    /// Writes the VM's memory, devices and root disk overlay into
    /// `snapshot_dir` (created), leaving the VM paused. The workspace disk
    /// is the caller's to keep.
    async fn snapshot(&self, snapshot_dir: &Path) -> Result<(), VmError>;

    /// Flushes the guest's disks (the workspace unmounted) and stops the
    /// VM; its workspace disk may then be read on the host.
    async fn shutdown(self: Box<Self>) -> Result<(), VmError>;

    /// Stops the VM at once (as dropping it does).
    fn kill(self: Box<Self>);

    /// Host memory the VM holds now (its VMM process's resident set: the
    /// guest RAM it touched, and the VMM's own), if known.
    fn memory_in_use(&self) -> Option<u64> {
        None
    }
}
