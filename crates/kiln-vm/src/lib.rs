//! `workload-isolation-type=firecracker`: each action in a microVM booted
//! from its container image. The VMM is behind one seam (`vmm`), driven by
//! QEMU here (KVM where `/dev/kvm` really runs guests, TCG otherwise); a
//! static agent is the guest's PID 1 (`agent/main.rs`); container images
//! become ext4 root disks, cached by manifest digest (`image_disk`).

pub mod image_disk;
pub mod tree_stream;
pub mod workspace_disk;
