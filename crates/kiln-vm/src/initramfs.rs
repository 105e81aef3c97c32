//! The VM's initramfs: an uncompressed newc cpio archive holding the agent
//! as `/init`, `/dev/console`, and the kernel modules the VM's virtio
//! devices need (the Debian cloud kernel builds them as modules), with a
//! `/modules/order` file listing them dependencies first. The modules a
//! Docker daemon needs ride along in `/modules/dockerd-order`, loaded by
//! the agent only when an action asks for `init-dockerd`. Built once per
//! (kernel, modules, agent) into a cache directory the caller gives.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::VmError;

/// The agent, built by `build.rs`.
pub const AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln-vm-agent"));

/// The modules the agent loads, by name; their dependencies (from
/// `modules.dep`) come along. PCI and MMIO transports both: loading one
/// whose bus has no devices costs nothing.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
];

/// The modules `dockerd` needs on top of [`MODULES`]: overlay for its
/// storage driver, a bridge with veth pairs for its default network, and
/// netfilter for the NAT and filter rules it writes with iptables (legacy
/// tables and nf_tables both, whichever flavour the image's iptables is).
/// Every VM carries them (2.7 MB of initramfs): 16 interleaved boots under
/// TCG took about 50 ms longer with them, within the noise, which did not
/// justify a second initramfs per VM kind.
pub const DOCKERD_MODULES: &[&str] = &[
    "overlay",
    "bridge",
    "veth",
    "br_netfilter",
    "nf_conntrack",
    "nf_nat",
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "ipt_REJECT",
    "xt_addrtype",
    "xt_conntrack",
    "xt_MASQUERADE",
    "xt_nat",
    "xt_tcpudp",
    "xt_comment",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
];

/// The initramfs for `kernel` with `modules_dir` (a `lib/modules/VERSION`
/// tree with `modules.dep`), built into `cache_dir` unless there already.
pub fn build_cached(
    kernel: &Path,
    modules_dir: &Path,
    cache_dir: &Path,
) -> Result<PathBuf, VmError> {
    let order = module_order(modules_dir)?;
    let dockerd_order = modules_after(modules_dir, DOCKERD_MODULES, &order)?;
    let mut key = Sha256::new();
    key.update(AGENT);
    let kernel_metadata = std::fs::metadata(kernel)
        .map_err(|e| VmError::Setup(format!("kernel {}: {e}", kernel.display())))?;
    key.update(kernel.as_os_str().as_encoded_bytes());
    key.update(kernel_metadata.len().to_le_bytes());
    if let Ok(modified) = kernel_metadata.modified() {
        key.update(format!("{modified:?}"));
    }
    let lists = order.iter().map(|m| ("", m));
    for (list, module) in lists.chain(dockerd_order.iter().map(|m| ("dockerd ", m))) {
        key.update(list.as_bytes());
        key.update(module.as_bytes());
        let metadata = std::fs::metadata(modules_dir.join(module))
            .map_err(|e| VmError::Setup(format!("module {module}: {e}")))?;
        key.update(metadata.len().to_le_bytes());
    }
    let digest: String = key.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let path = cache_dir.join(format!("initramfs-{}.cpio", &digest[..32]));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| VmError::Setup(format!("creating {}: {e}", cache_dir.display())))?;
    let mut archive = Cpio::default();
    archive.directory("dev");
    archive.character_device("dev/console", 5, 1);
    archive.directory("proc");
    archive.directory("sys");
    archive.directory("modules");
    archive.file("init", 0o755, AGENT);
    let mut listing = String::new();
    for (index, module) in order.iter().enumerate() {
        let bytes = std::fs::read(modules_dir.join(module))
            .map_err(|e| VmError::Setup(format!("reading module {module}: {e}")))?;
        let name = format!("modules/{index:02}-{}", file_name(module));
        archive.file(&name, 0o644, &bytes);
        listing.push_str(&format!("/{name}\n"));
    }
    archive.file("modules/order", 0o644, listing.as_bytes());
    let mut listing = String::new();
    for module in &dockerd_order {
        let bytes = std::fs::read(modules_dir.join(module))
            .map_err(|e| VmError::Setup(format!("reading module {module}: {e}")))?;
        let name = format!("dockerd-{}", file_name(module));
        archive.file(&format!("modules/{name}"), 0o644, &bytes);
        // Relative: the agent loads these after it left the initramfs,
        // through a descriptor of /modules it kept.
        listing.push_str(&format!("{name}\n"));
    }
    archive.file("modules/dockerd-order", 0o644, listing.as_bytes());
    let bytes = archive.finish();
    // Written aside and renamed: concurrent builders each write a whole
    // archive, and readers never see half of one.
    let temporary = cache_dir.join(format!(
        ".initramfs-{}.{}",
        &digest[..32],
        std::process::id()
    ));
    let written = std::fs::File::create(&temporary)
        .and_then(|mut file| file.write_all(&bytes).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&temporary, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(VmError::Setup(format!("writing {}: {e}", path.display())));
    }
    Ok(path)
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The `.ko` paths (relative to `modules_dir`) of [`MODULES`] and their
/// dependencies, each after everything it depends on.
pub fn module_order(modules_dir: &Path) -> Result<Vec<String>, VmError> {
    modules_after(modules_dir, MODULES, &[])
}

/// The `.ko` paths of `wanted` and their dependencies, dependencies first,
/// leaving out those `loaded` holds already.
pub fn modules_after(
    modules_dir: &Path,
    wanted: &[&str],
    loaded: &[String],
) -> Result<Vec<String>, VmError> {
    let dep_path = modules_dir.join("modules.dep");
    let text = std::fs::read_to_string(&dep_path)
        .map_err(|e| VmError::Setup(format!("reading {}: {e}", dep_path.display())))?;
    let dependencies: std::collections::HashMap<&str, Vec<&str>> = text
        .lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((module.trim(), deps.split_whitespace().collect()))
        })
        .collect();
    let mut order = loaded.to_vec();
    for wanted in wanted {
        let found = dependencies.keys().find(|path| {
            file_name(path)
                .strip_suffix(".ko")
                .is_some_and(|stem| stem.replace('-', "_") == *wanted)
        });
        let Some(path) = found else {
            return Err(VmError::Setup(format!(
                "module {wanted} is not in {} (is the kernel built with it as a module?)",
                dep_path.display()
            )));
        };
        visit(path, &dependencies, &mut order, 0)?;
    }
    Ok(order.split_off(loaded.len()))
}

/// Adds `module` after its dependencies (depth-first, bounded).
fn visit(
    module: &str,
    dependencies: &std::collections::HashMap<&str, Vec<&str>>,
    order: &mut Vec<String>,
    depth: usize,
) -> Result<(), VmError> {
    if depth > 64 {
        return Err(VmError::Setup(format!(
            "module dependencies too deep at {module}"
        )));
    }
    if order.iter().any(|m| m == module) {
        return Ok(());
    }
    // modules.dep lists every indirect dependency too, in an order where
    // the later ones are loaded first: visiting them deepest-first sorts
    // it out either way.
    for dependency in dependencies.get(module).into_iter().flatten() {
        visit(dependency, dependencies, order, depth + 1)?;
    }
    order.push(module.to_string());
    Ok(())
}

/// A newc ("070701") cpio archive, written in memory.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, device: (u32, u32), data: &[u8]) {
        self.next_inode += 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            device.0,
            device.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn directory(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100000 | permissions, (0, 0), data);
    }

    fn character_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_after_their_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/virtio.ko:\nkernel/virtio_ring.ko:\n\
             kernel/virtio_pci.ko: kernel/virtio_pci_legacy_dev.ko kernel/virtio_ring.ko kernel/virtio.ko\n\
             kernel/virtio_pci_legacy_dev.ko:\n\
             kernel/virtio_mmio.ko: kernel/virtio_ring.ko kernel/virtio.ko\n\
             kernel/virtio_blk.ko: kernel/virtio_ring.ko kernel/virtio.ko\n\
             kernel/virtio_console.ko: kernel/virtio_ring.ko kernel/virtio.ko\n\
             kernel/virtio_net.ko: kernel/net_failover.ko kernel/failover.ko kernel/virtio.ko\n\
             kernel/net_failover.ko: kernel/failover.ko\nkernel/failover.ko:\n",
        )
        .unwrap();
        let order = module_order(dir.path()).unwrap();
        let at = |name: &str| order.iter().position(|m| m.ends_with(name)).unwrap();
        assert!(at("/virtio.ko") < at("/virtio_pci.ko"));
        assert!(at("/virtio_pci_legacy_dev.ko") < at("/virtio_pci.ko"));
        assert!(at("/failover.ko") < at("/net_failover.ko"));
        assert!(at("/net_failover.ko") < at("/virtio_net.ko"));
        assert_eq!(order.len(), 10);
    }

    #[test]
    fn dockerd_modules_leave_out_what_boot_loads() {
        let dir = tempfile::tempdir().unwrap();
        let mut dep = String::from(
            "kernel/virtio.ko:\nkernel/virtio_pci.ko: kernel/virtio.ko\n\
             kernel/virtio_mmio.ko: kernel/virtio.ko\nkernel/virtio_blk.ko: kernel/virtio.ko\n\
             kernel/virtio_console.ko: kernel/virtio.ko\nkernel/virtio_net.ko: kernel/virtio.ko\n\
             kernel/llc.ko:\nkernel/stp.ko: kernel/llc.ko\n\
             kernel/bridge.ko: kernel/stp.ko kernel/llc.ko\n",
        );
        let rest = DOCKERD_MODULES.iter().filter(|m| **m != "bridge");
        for module in rest {
            dep.push_str(&format!("kernel/{module}.ko: kernel/virtio.ko\n"));
        }
        std::fs::write(dir.path().join("modules.dep"), dep).unwrap();
        let boot = module_order(dir.path()).unwrap();
        let dockerd = modules_after(dir.path(), DOCKERD_MODULES, &boot).unwrap();
        assert!(
            !dockerd.iter().any(|m| m == "kernel/virtio.ko"),
            "{dockerd:?}"
        );
        let at = |name: &str| dockerd.iter().position(|m| m.ends_with(name)).unwrap();
        assert!(at("/llc.ko") < at("/stp.ko") && at("/stp.ko") < at("/bridge.ko"));
        assert_eq!(dockerd.len(), DOCKERD_MODULES.len() + 2);
    }

    #[test]
    fn a_missing_module_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), "kernel/virtio.ko:\n").unwrap();
        let error = module_order(dir.path()).unwrap_err().to_string();
        assert!(error.contains("virtio_pci"), "{error}");
    }
}
