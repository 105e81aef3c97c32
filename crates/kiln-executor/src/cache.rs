//! The executor's local content-addressed file cache. Input files are
//! downloaded once into `cache_dir` (verified against their digest, written
//! to a temp file and renamed in, so a reader never sees a partial file) and
//! hardlinked into each action's workspace.
//!
//! Files are stored read-only, one entry per (digest, executable bit),
//! because a hardlink shares its mode with the cache entry.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_proto::reapi::Digest;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{format_digest, RunError};

/// Counters of what the cache did, for tests and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Blobs written into the cache from the CAS.
    pub blobs_filled: u64,
    /// Bytes written into the cache from the CAS.
    pub bytes_filled: u64,
}

pub struct FileCache {
    root: PathBuf,
    blobs_filled: AtomicU64,
    bytes_filled: AtomicU64,
}

impl FileCache {
    /// Opens (creating) the cache under `root`.
    pub fn open(root: &Path) -> Result<FileCache, RunError> {
        for dir in [root.join("blobs"), root.join("tmp")] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| RunError::io(format!("creating {}", dir.display()), e))?;
        }
        Ok(FileCache {
            root: root.to_path_buf(),
            blobs_filled: AtomicU64::new(0),
            bytes_filled: AtomicU64::new(0),
        })
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            blobs_filled: self.blobs_filled.load(Ordering::Relaxed),
            bytes_filled: self.bytes_filled.load(Ordering::Relaxed),
        }
    }

    /// Where the entry for `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &Digest, executable: bool) -> PathBuf {
        let prefix = digest.hash.get(..2).unwrap_or("00");
        let suffix = if executable { "-x" } else { "" };
        self.root
            .join("blobs")
            .join(prefix)
            .join(format!("{}-{}{}", digest.hash, digest.size_bytes, suffix))
    }

    /// Whether the entry exists. An entry only exists complete and verified.
    pub fn contains(&self, digest: &Digest, executable: bool) -> bool {
        self.path(digest, executable).exists()
    }

    /// Makes the (digest, executable) entry from the other variant if that
    /// one is cached, without a download. Returns whether it now exists.
    pub async fn derive_variant(
        &self,
        digest: &Digest,
        executable: bool,
    ) -> Result<bool, RunError> {
        if self.contains(digest, executable) {
            return Ok(true);
        }
        let other = self.path(digest, !executable);
        if !other.exists() {
            return Ok(false);
        }
        let temp = self.temp_path();
        tokio::fs::copy(&other, &temp)
            .await
            .map_err(|e| RunError::io(format!("copying cache entry {}", other.display()), e))?;
        self.commit(&temp, digest, executable).await?;
        Ok(true)
    }

    /// Adds a blob held in memory. The caller has verified the digest.
    pub async fn insert_bytes(
        &self,
        digest: &Digest,
        executable: bool,
        data: Bytes,
    ) -> Result<(), RunError> {
        let temp = self.temp_path();
        let write = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            file.write_all(&data).await?;
            file.flush().await
        };
        if let Err(e) = write.await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(RunError::io(
                format!("writing {} into the file cache", format_digest(digest)),
                e,
            ));
        }
        self.count(digest);
        self.commit(&temp, digest, executable).await
    }

    /// Adds a blob from a stream of chunks, hashing as it goes; rejects it
    /// unless its size and SHA-256 match `digest`.
    pub async fn insert_stream<S>(
        &self,
        digest: &Digest,
        executable: bool,
        mut chunks: S,
    ) -> Result<(), RunError>
    where
        S: Stream<Item = Result<Bytes, RunError>> + Unpin,
    {
        let temp = self.temp_path();
        let result: Result<(), RunError> = async {
            let mut file = tokio::fs::File::create(&temp)
                .await
                .map_err(|e| RunError::io(format!("creating {}", temp.display()), e))?;
            let mut hasher = Sha256::new();
            let mut size = 0i64;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                size += chunk.len() as i64;
                file.write_all(&chunk).await.map_err(|e| {
                    RunError::io(
                        format!("writing {} into the file cache", format_digest(digest)),
                        e,
                    )
                })?;
            }
            file.flush()
                .await
                .map_err(|e| RunError::io(format!("writing {}", temp.display()), e))?;
            let hash = hex::encode(hasher.finalize());
            if hash != digest.hash || size != digest.size_bytes {
                return Err(RunError::Internal(format!(
                    "ByteStream.Read of {} returned {hash}/{size}",
                    format_digest(digest)
                )));
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
        self.count(digest);
        self.commit(&temp, digest, executable).await
    }

    fn count(&self, digest: &Digest) {
        self.blobs_filled.fetch_add(1, Ordering::Relaxed);
        self.bytes_filled
            .fetch_add(digest.size_bytes as u64, Ordering::Relaxed);
    }

    fn temp_path(&self) -> PathBuf {
        self.root.join("tmp").join(uuid::Uuid::new_v4().to_string())
    }

    /// Sets the entry's final mode and renames it into place.
    async fn commit(&self, temp: &Path, digest: &Digest, executable: bool) -> Result<(), RunError> {
        use std::os::unix::fs::PermissionsExt;
        let mode = if executable { 0o555 } else { 0o444 };
        let target = self.path(digest, executable);
        let result = async {
            tokio::fs::set_permissions(temp, std::fs::Permissions::from_mode(mode)).await?;
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::rename(temp, &target).await
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(temp).await;
            return Err(RunError::io(
                format!("adding {} to the file cache", format_digest(digest)),
                e,
            ));
        }
        Ok(())
    }
}
