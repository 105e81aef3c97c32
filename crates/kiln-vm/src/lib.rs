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

/// The agent's SHA-256, here only to be tested against `sha2`.
#[cfg(test)]
#[path = "../agent/sha256.rs"]
mod agent_sha256;

#[cfg(test)]
mod agent_sha256_tests {
    use super::agent_sha256::Sha256;
    use sha2::Digest;

    /// Bytes that are not all alike, so a mixed-up word shows.
    fn bytes(len: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    }

    fn expected(data: &[u8]) -> String {
        hex::encode(sha2::Sha256::digest(data))
    }

    #[test]
    fn known_answers() {
        for hasher in [Sha256::new(), Sha256::portable()] {
            assert_eq!(
                hasher.finish_hex(),
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            );
        }
        let mut abc = Sha256::portable();
        abc.update(b"abc");
        assert_eq!(
            abc.finish_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// Every length around the block and padding edges, fed whole and in
    /// uneven pieces, on both paths (the SHA extensions where this CPU has
    /// them), agrees with `sha2`.
    #[test]
    fn both_paths_agree_with_sha2_at_every_edge() {
        let lengths = (0..200).chain([447, 448, 511, 512, 1000, 4096, 65_537, 1 << 20]);
        for (seed, len) in lengths.enumerate() {
            let data = bytes(len, seed as u32);
            let want = expected(&data);
            for make in [Sha256::new, Sha256::portable] {
                let mut whole = make();
                whole.update(&data);
                assert_eq!(whole.finish_hex(), want, "{len} bytes whole");
                let mut pieces = make();
                let mut rest = data.as_slice();
                let mut step = 1;
                while !rest.is_empty() {
                    let take = step.min(rest.len());
                    pieces.update(&rest[..take]);
                    rest = &rest[take..];
                    step = step * 3 % 97 + 1;
                }
                assert_eq!(pieces.finish_hex(), want, "{len} bytes in pieces");
            }
        }
    }
}

pub use guest::{
    Ask, Guest, GuestOutcome, GuestStatus, GuestUser, Holder, Put, ReusePlan, RunRequest,
};
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
