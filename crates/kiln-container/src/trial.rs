//! The trial container each backend starts when it is probed: `/true` in a
//! one-file image, run through the same create / start / supervise /
//! remove code as an action's container, so a runtime that answers every
//! question but cannot start a container (its OCI runtime refusing the
//! rlimits, a missing cgroup controller) is not offered.
//!
//! The image is made here, offline: no registry, no base image, nothing of
//! the host. Its one file is a static executable of 129 bytes (132 on
//! aarch64) that calls `exit_group(0)`, assembled below for the host's
//! architecture; the rootfs tar is imported once (Docker's
//! `/images/create?fromSrc=-`, `podman import`) as
//! `localhost/kiln-probe:<hash of the tar>` and kept, so later start-ups
//! only run it. Pulling the configured default image
//! instead would make start-up wait for a registry (and drop the backend
//! when the registry is down), and the image's own entrypoint could make
//! the trial fail for reasons that are not the runtime's.

use async_trait::async_trait;
use kiln_platform::Platform;
use kiln_worker::trial::TrialAction;
use kiln_worker::{CancellationToken, CommandSpec, Limits, ProcessOutcome, RunError};
use sha2::{Digest as _, Sha256};

use crate::image::ImageStore;

/// The repository of the trial image in each runtime's local store.
pub const TRIAL_REPOSITORY: &str = "localhost/kiln-probe";

/// Where the program sits in the trial image, and what the trial runs.
const PROGRAM: &str = "true";

/// The trial image of this host's architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialImage {
    /// `localhost/kiln-probe:<first 12 hex digits of the tar's SHA-256>`.
    pub reference: String,
    /// A tar of the image's root file system: `/true` alone.
    pub rootfs: Vec<u8>,
}

impl TrialImage {
    /// The trial image for `arch` (as `std::env::consts::ARCH` names it);
    /// None for an architecture without a trial program here.
    pub fn for_arch(arch: &str) -> Option<TrialImage> {
        let rootfs = one_file_tar(PROGRAM, 0o755, &exit_zero_program(arch)?);
        let hash = hex::encode(Sha256::digest(&rootfs));
        Some(TrialImage {
            reference: format!("{TRIAL_REPOSITORY}:{}", &hash[..12]),
            rootfs,
        })
    }
}

/// What a runtime offers the trial.
#[async_trait]
pub(crate) trait TrialRuntime: ImageStore {
    /// The backend's name, prefixed to failure reasons.
    fn runtime_name(&self) -> &'static str;

    /// Where the trial's workspace goes: the executor's work root, where
    /// a docker gate lets binds come from; None: the temporary directory.
    fn trial_dir(&self) -> Option<&std::path::Path> {
        None
    }

    /// Imports `rootfs` (a tar of a root file system) as the local image
    /// `reference`.
    async fn import_rootfs(&self, reference: &str, rootfs: Vec<u8>) -> Result<(), String>;

    /// Runs `spec` in a new container of the local image `reference`, as
    /// an action's container is run once its image is there.
    async fn run_local(
        &self,
        spec: &CommandSpec,
        limits: &Limits,
        cancel: &CancellationToken,
        reference: &str,
    ) -> Result<ProcessOutcome, RunError>;
}

/// Imports the trial image unless the runtime holds it, and runs `/true`
/// in it as a trial action; a reason naming the runtime when that fails.
pub(crate) async fn run_trial(runtime: &dyn TrialRuntime) -> Result<(), String> {
    let image = trial_image(runtime).await?;
    run_trial_in(runtime, image.as_deref()).await
}

/// Makes sure the runtime holds the trial image of this host's
/// architecture; its reference, or None where there is no trial program.
pub(crate) async fn trial_image(runtime: &dyn TrialRuntime) -> Result<Option<String>, String> {
    let name = runtime.runtime_name();
    let Some(image) = TrialImage::for_arch(std::env::consts::ARCH) else {
        return Ok(None);
    };
    let reference = image.reference;
    let held = runtime
        .has_image(&reference)
        .await
        .map_err(|e| format!("{name}: looking up the trial image {reference}: {e}"))?;
    if !held {
        tracing::info!(runtime = name, image = %reference, "importing the trial image");
        runtime
            .import_rootfs(&reference, image.rootfs)
            .await
            .map_err(|e| format!("{name}: importing the trial image {reference}: {e}"))?;
    }
    Ok(Some(reference))
}

/// Runs `/true` as a trial action in a container of `image` (from
/// [`trial_image`]; None: no trial, with a warning).
pub(crate) async fn run_trial_in(
    runtime: &dyn TrialRuntime,
    image: Option<&str>,
) -> Result<(), String> {
    let name = runtime.runtime_name();
    let Some(reference) = image else {
        tracing::warn!(
            runtime = name,
            arch = std::env::consts::ARCH,
            "no trial container for this architecture: the runtime is offered on its answers alone"
        );
        return Ok(());
    };
    let program = format!("/{PROGRAM}");
    let arguments = [program.as_str()];
    let trial = match runtime.trial_dir() {
        Some(dir) => TrialAction::under(dir, &arguments, &[], Platform::default())?,
        None => TrialAction::new(&arguments, &[], Platform::default())?,
    };
    let outcome = runtime
        .run_local(
            &trial.spec,
            &trial.limits,
            &CancellationToken::new(),
            reference,
        )
        .await;
    trial
        .verdict(outcome)
        .map_err(|reason| format!("{name}: {reason} (image {reference})"))
}

/// A static ELF executable for `arch` that exits 0 at once: an ELF header,
/// one loadable segment (the whole file, read and execute), and three
/// instructions setting up and making the `exit_group(0)` system call.
fn exit_zero_program(arch: &str) -> Option<Vec<u8>> {
    // (e_machine, code)
    let (machine, code): (u16, &[u8]) = match arch {
        // xor edi, edi; mov eax, 231 (exit_group); syscall
        "x86_64" => (62, &[0x31, 0xff, 0xb8, 0xe7, 0, 0, 0, 0x0f, 0x05]),
        // mov x0, #0; mov x8, #94 (exit_group); svc #0
        "aarch64" => (
            183,
            &[
                0x00, 0x00, 0x80, 0xd2, 0xc8, 0x0b, 0x80, 0xd2, 0x01, 0x00, 0x00, 0xd4,
            ],
        ),
        _ => return None,
    };
    const BASE: u64 = 0x40_0000;
    const ELF_HEADER: u16 = 64;
    const PROGRAM_HEADER: u16 = 56;
    let code_offset = u64::from(ELF_HEADER + PROGRAM_HEADER);
    let size = code_offset + code.len() as u64;
    let mut elf = Vec::with_capacity(size as usize);
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: executable
    elf.extend_from_slice(&machine.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(BASE + code_offset).to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(ELF_HEADER).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&ELF_HEADER.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&PROGRAM_HEADER.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: read, execute
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1_0000u64.to_le_bytes()); // p_align: 64 KiB pages too
    elf.extend_from_slice(code);
    debug_assert_eq!(elf.len() as u64, size);
    Some(elf)
}

/// A ustar archive holding one regular file `name` (owned by root, mtime
/// 0, so the same content always makes the same bytes).
fn one_file_tar(name: &str, mode: u32, content: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    let mut put = |offset: usize, field: &[u8]| {
        header[offset..offset + field.len()].copy_from_slice(field);
    };
    put(0, name.as_bytes());
    put(100, format!("{mode:07o}\0").as_bytes());
    put(108, b"0000000\0"); // uid
    put(116, b"0000000\0"); // gid
    put(124, format!("{:011o}\0", content.len()).as_bytes());
    put(136, b"00000000000\0"); // mtime
    put(148, b"        "); // the checksum counts itself as spaces
    put(156, b"0"); // a regular file
    put(257, b"ustar\0");
    put(263, b"00");
    put(265, b"root");
    put(297, b"root");
    let checksum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
    let mut tar = header.to_vec();
    tar.extend_from_slice(content);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    // The end of the archive: two empty blocks.
    tar.resize(tar.len() + 1024, 0);
    tar
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_trial_program_runs_and_exits_zero_on_this_host() {
        let Some(program) = exit_zero_program(std::env::consts::ARCH) else {
            return eprintln!("skipped: no trial program for {}", std::env::consts::ARCH);
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("true");
        std::fs::write(&path, &program).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Other tests of this binary fork while the file above is open for
        // writing, and their children hold it until they exec: ETXTBSY for
        // a moment. Retried as the executor retries it.
        let mut retries = kiln_worker::process::BUSY_TEXT_RETRIES;
        let status = loop {
            match std::process::Command::new(&path).status() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && retries > 0 => {
                    retries -= 1;
                    std::thread::sleep(kiln_worker::process::BUSY_TEXT_PAUSE);
                }
                status => break status.unwrap(),
            }
        };
        assert!(status.success(), "{status}");
    }

    #[test]
    fn the_trial_image_is_a_tar_that_tar_reads_back() {
        let image = TrialImage::for_arch("aarch64").unwrap();
        assert!(image.reference.starts_with("localhost/kiln-probe:"));
        assert_eq!(image.rootfs.len() % 512, 0);
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("rootfs.tar");
        std::fs::write(&archive, &image.rootfs).unwrap();
        let listed = std::process::Command::new("tar")
            .args(["-tvf"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let listing = String::from_utf8_lossy(&listed.stdout);
        assert!(listing.starts_with("-rwxr-xr-x root/root"), "{listing}");
        assert!(listing.trim_end().ends_with(" true"), "{listing}");
        assert_eq!(listing.lines().count(), 1, "{listing}");
        let extracted = dir.path().join("root");
        std::fs::create_dir(&extracted).unwrap();
        let unpacked = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&extracted)
            .status()
            .unwrap();
        assert!(unpacked.success());
        assert_eq!(
            std::fs::read(extracted.join("true")).unwrap(),
            exit_zero_program("aarch64").unwrap()
        );
    }

    #[test]
    fn the_same_program_makes_the_same_image_and_each_architecture_its_own() {
        let x86 = TrialImage::for_arch("x86_64").unwrap();
        assert_eq!(Some(&x86), TrialImage::for_arch("x86_64").as_ref());
        assert_ne!(
            x86.reference,
            TrialImage::for_arch("aarch64").unwrap().reference
        );
        assert_eq!(TrialImage::for_arch("mips"), None);
        assert_eq!(exit_zero_program("x86_64").unwrap().len(), 129);
        assert_eq!(exit_zero_program("aarch64").unwrap().len(), 132);
    }
}
