//! Builds Kiln's VM agent (`agent/main.rs`), PID 1 of every microVM, as a
//! static executable that `src/initramfs.rs` embeds. Standard library only,
//! so `rustc` alone builds it; static, so it needs nothing from the guest
//! (glibc's static `libc.a` comes with `libc6-dev`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "agent/main.rs";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-changed=agent/frame.rs");
    println!("cargo:rerun-if-changed=agent/dockerd.rs");
    println!("cargo:rerun-if-changed=agent/store.rs");
    println!("cargo:rerun-if-changed=agent/collect.rs");
    println!("cargo:rerun-if-changed=agent/sha256.rs");
    println!("cargo:rerun-if-changed=src/tree_stream.rs");
    println!("cargo:rerun-if-changed=../kiln-container/agent/sys.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let status = Command::new(rustc)
        .args([
            "--edition=2021",
            "--crate-name=kiln_vm_agent",
            "--crate-type=bin",
            "-Copt-level=2",
            "-Cpanic=abort",
            "-Cstrip=symbols",
            "-Ctarget-feature=+crt-static",
            // The crate's std-only modules it includes leave their
            // host-only halves out.
            "--cfg=kiln_agent",
            "--target",
            &target,
            "-o",
        ])
        .arg(out.join("kiln-vm-agent"))
        .arg(source)
        .status()
        .expect("running rustc for the VM agent");
    assert!(status.success(), "building the VM agent ({source}) failed");
}
