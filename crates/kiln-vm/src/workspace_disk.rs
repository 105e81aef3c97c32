//! An action's workspace as a disk of its VM: the staged input tree copied
//! into a fresh, sparse ext4 image by `mke2fs -d`, with the action's free
//! space (`EstimatedFreeDiskBytes`, or the executor's default) on top.
//! The guest mounts it read-write at the workspace's path; the host never
//! mounts it or parses it again: outputs come back through the guest
//! agent ([`crate::tree_stream`]).
//!
//! Why a copy per action: the input tree is a few hard-linked files in
//! the executor's cache, which no guest may change; `mke2fs -d` copies it
//! in one pass (~0.1 s for 300 files and 15 MB here), the file is sparse,
//! and the copy is gone with the VM.

use std::path::{Path, PathBuf};

use kiln_worker::RunError;

/// Blocks, inodes and directories cost more than their content: the image
/// is sized at the content times this (in percent), plus [`SLACK_BYTES`].
const CONTENT_PERCENT: u64 = 120;
/// Room for the file system's own structures on a small tree.
const SLACK_BYTES: u64 = 16 << 20;

/// Builds `image` from `workspace`, with `free_bytes` free for the action;
/// returns its size.
pub async fn build(
    mke2fs: &Path,
    workspace: &Path,
    image: &Path,
    free_bytes: u64,
) -> Result<u64, RunError> {
    let content = {
        let workspace = workspace.to_path_buf();
        tokio::task::spawn_blocking(move || tree_bytes(&workspace))
            .await
            .map_err(|e| RunError::Internal(format!("sizing the workspace: {e}")))?
            .map_err(|e| RunError::io("sizing the workspace", e))?
    };
    let size = (content.saturating_mul(CONTENT_PERCENT) / 100)
        .saturating_add(SLACK_BYTES)
        .saturating_add(free_bytes);
    // mke2fs takes the size in KiB without a unit suffix.
    let kib = size.div_ceil(1024);
    let output = tokio::process::Command::new(mke2fs)
        .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0"])
        .arg("-d")
        .arg(workspace)
        .arg(image)
        .arg(kib.to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| RunError::io(format!("running {}", mke2fs.display()), e))?;
    if !output.status.success() {
        return Err(RunError::Internal(format!(
            "building the workspace disk with {} ({}): {}",
            mke2fs.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let built = std::fs::metadata(image)
        .map_err(|e| RunError::io(format!("reading {}", image.display()), e))?;
    Ok(built.len())
}

/// Bytes of file content under `root`, each file rounded up to 4 KiB
/// blocks, plus a block per directory and symlink; hard links counted once.
fn tree_bytes(root: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut pending: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        total = total.saturating_add(4096);
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            if metadata.is_dir() {
                pending.push(entry.path());
            } else if metadata.nlink() > 1 && !seen.insert((metadata.dev(), metadata.ino())) {
                // Another link to a file counted already.
            } else {
                total = total.saturating_add(metadata.len().div_ceil(4096).max(1) * 4096);
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_disk_holds_the_tree_and_the_free_space_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("workspace");
        std::fs::create_dir_all(workspace.join("src/sub")).unwrap();
        std::fs::write(workspace.join("src/sub/input.txt"), b"input bytes").unwrap();
        let image = dir.path().join("workspace.ext4");

        let size = build(Path::new("mke2fs"), &workspace, &image, 64 << 20)
            .await
            .expect("mke2fs from e2fsprogs (scripts/install-deps.sh installs it)");

        assert!(size >= 64 << 20, "{size}");
        let cat = std::process::Command::new("debugfs")
            .args(["-R", "cat /src/sub/input.txt"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(cat.stdout, b"input bytes");
        let stats = std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(&image)
            .output()
            .unwrap();
        let stats = String::from_utf8_lossy(&stats.stdout);
        let field = |name: &str| -> u64 {
            stats
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in {stats}"))
        };
        let free = field("Free blocks:") * field("Block size:");
        assert!(free >= 64 << 20, "{free} bytes free");
    }
}
