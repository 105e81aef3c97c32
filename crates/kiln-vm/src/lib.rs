//! `workload-isolation-type=firecracker`: each action in a microVM booted
//! from its container image. The VMM is behind one seam (`vmm`), driven by
//! QEMU here (KVM where `/dev/kvm` really runs guests, TCG otherwise); a
//! static agent is the guest's PID 1 (`agent/main.rs`); container images
//! become ext4 root disks, cached by manifest digest (`image_disk`).
//!
//! A Firecracker driver would be a second `Vmm`; it is not written, as no
//! real Firecracker can be tested here. The agent needs nothing QEMU-only
//! but its virtio-serial ports (Firecracker has vsock instead).

pub mod guest;
pub mod image_disk;
pub mod initramfs;
pub mod microvm;
pub mod qemu;
pub mod tree_stream;
pub mod vmm;
pub mod workspace_disk;

pub use guest::{Guest, GuestOutcome, GuestStatus, GuestUser, Put, ReusePlan, RunRequest};
pub use qemu::{AcceleratorChoice, Machine, QemuConfig, QemuVm, QemuVmm};
pub use vmm::{Accelerator, Network, Vm, VmSpec, Vmm, WorkspaceDisk};

/// What can go wrong with a VM. Messages name the VM; those about the
/// guest carry its console's last lines.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Before or around the VM: its files, QEMU's tools.
    #[error("{0}")]
    Setup(String),
    /// The guest failed to boot, or its agent stopped answering.
    #[error("VM {vm}: {message}\n--- the console's last lines ---\n{console}")]
    Guest {
        vm: String,
        message: String,
        console: String,
    },
    /// Writing the action's output on the host failed.
    #[error("writing the action's output: {0}")]
    Output(String),
    /// The VMM cannot do this.
    #[error("{0}")]
    Unsupported(String),
}
