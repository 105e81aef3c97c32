//! An unpacked tree as an ext4 image, by `mke2fs -d` (e2fsprogs): no
//! mount, no loop device, no privilege beyond reading the tree.
//!
//! Choices: no journal (the base disk is never written by a guest: each VM
//! writes a copy-on-write overlay that is thrown away, so there is nothing
//! to recover, and mke2fs skips writing the journal); no reserved blocks;
//! 4 KiB blocks. Size: the content rounded to blocks, 1/8 more for
//! directories, extent trees and group metadata, the inode tables, plus
//! `free_bytes` the guest may write outside its workspace. The file is
//! sparse, so that free space costs no host disk until a guest writes it
//! (and then in its overlay, not here).

use std::path::Path;

/// The size (bytes) and inode count of the file system for a tree of
/// `content_bytes` in `inodes` inodes, with `free_bytes` to spare.
pub(crate) fn plan(content_bytes: u64, inodes: u64, free_bytes: u64) -> (u64, u64) {
    const INODE_SIZE: u64 = 256;
    // The room for files the guest creates in the free space, at mke2fs's
    // default of an inode per 16 KiB, and at least 16384.
    let spare_inodes = (free_bytes / 16384).max(16384);
    let inode_count = inodes + inodes / 4 + spare_inodes;
    let bytes = content_bytes + content_bytes / 8 + inode_count * INODE_SIZE + free_bytes;
    let mib = 1 << 20;
    // At least 32 MiB: below that mke2fs picks other defaults (1 KiB blocks).
    (bytes.div_ceil(4 * mib).max(8) * 4 * mib, inode_count)
}

/// Runs mke2fs to make `out` (which must not exist) of `bytes` holding
/// `tree`; its stderr on failure.
pub(crate) async fn make(tree: &Path, out: &Path, bytes: u64, inodes: u64) -> Result<(), String> {
    let output = tokio::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
        .args([
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-L",
            "kiln-root",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(tree)
        .arg(out)
        .arg(format!("{}k", bytes / 1024))
        .env("LC_ALL", "C")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "mke2fs is not installed (install e2fsprogs)".to_string()
            } else {
                format!("running mke2fs: {e}")
            }
        })?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "mke2fs failed ({}): {}",
            output.status,
            stderr.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_leaves_the_free_space_and_room_for_metadata() {
        let mib = 1 << 20;
        let (bytes, inodes) = plan(100 * mib, 5000, 256 * mib);
        assert!(bytes >= 100 * mib + 256 * mib + 5000 * 256, "{bytes}");
        assert_eq!(bytes % (4 * mib), 0);
        assert_eq!(inodes, 5000 + 1250 + 16384);
        let (small, _) = plan(4096, 1, 0);
        assert_eq!(small, 32 * mib);
    }
}
