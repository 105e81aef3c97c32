//! Builds Kiln's agent (`agent/main.rs`), the PID 1 of warm container
//! runners, as a static executable that `src/warm.rs` embeds. It uses the
//! standard library only, so `rustc` alone builds it; static, so it runs in
//! any image whatever its C library (glibc's static `libc.a` comes with
//! `libc6-dev`, which every Rust toolchain on Debian needs to link).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "agent/main.rs";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-changed=agent/sys.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let status = Command::new(rustc)
        .args([
            "--edition=2021",
            "--crate-name=kiln_agent",
            "--crate-type=bin",
            "-Copt-level=2",
            "-Cpanic=abort",
            "-Cstrip=symbols",
            "-Ctarget-feature=+crt-static",
            "--target",
            &target,
            "-o",
        ])
        .arg(out.join("kiln-agent"))
        .arg(source)
        .status()
        .expect("running rustc for the agent");
    assert!(status.success(), "building the agent ({source}) failed");
}
