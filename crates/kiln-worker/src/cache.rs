//! The executor's local content-addressed file cache. Input files are
//! downloaded once into `cache_dir` (verified against their digest, written
//! to a temp file and renamed in, so a reader never sees a partial file) and
//! hardlinked into each action's workspace.
//!
//! Files are stored read-only, one entry per (digest, executable bit),
//! because a hardlink shares its mode with the cache entry. A finished
//! action's output files are *adopted*: hardlinked in as entries, so a
//! later action that takes one as input finds it cached, and emptying the
//! workspace frees no inode (see [`crate::scratch`]).
//!
//! With a size limit, the least recently used entries are deleted once the
//! cache grows past it (down to 90% of it), except entries *pinned* by an
//! action being staged: between finding an entry present and linking it
//! into the workspace, nothing may take it away. A deleted entry that a
//! running action has linked stays readable there (the link holds it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_proto::reapi::Digest;
use kiln_store::DigestFunction;
use tokio::io::AsyncWriteExt;

use crate::error::{format_digest, RunError};

/// Counters of what the cache did, for tests and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Blobs written into the cache from the CAS.
    pub blobs_filled: u64,
    /// Bytes written into the cache from the CAS.
    pub bytes_filled: u64,
    /// Entries deleted to stay under the size limit.
    pub entries_evicted: u64,
    /// Bytes the cache holds now.
    pub bytes_held: u64,
}

pub struct FileCache {
    root: PathBuf,
    /// Most bytes kept; None: unlimited.
    max_bytes: Option<u64>,
    blobs_filled: AtomicU64,
    bytes_filled: AtomicU64,
    entries_evicted: AtomicU64,
    index: Mutex<Index>,
}

/// What the cache holds, for the size limit.
#[derive(Default)]
struct Index {
    entries: HashMap<PathBuf, Entry>,
    bytes: u64,
    /// Advances on every use: entries with the smallest `used` go first.
    clock: u64,
    /// Entries an action is staging from, with how many actions.
    pins: HashMap<PathBuf, usize>,
}

struct Entry {
    size: u64,
    used: u64,
}

/// Keeps entries from eviction until dropped.
pub struct Pinned {
    cache: Arc<FileCache>,
    paths: Vec<PathBuf>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut index = self.cache.index.lock().expect("cache index lock");
        for path in &self.paths {
            if let Some(count) = index.pins.get_mut(path) {
                *count -= 1;
                if *count == 0 {
                    index.pins.remove(path);
                }
            }
        }
    }
}

impl FileCache {
    /// Opens (creating) the cache under `root`, unlimited in size.
    pub fn open(root: &Path) -> Result<FileCache, RunError> {
        FileCache::open_limited(root, None)
    }

    /// Opens (creating) the cache under `root`, keeping at most `max_bytes`
    /// (None: unlimited). Entries left by an earlier run are counted, the
    /// oldest first to go.
    pub fn open_limited(root: &Path, max_bytes: Option<u64>) -> Result<FileCache, RunError> {
        for dir in [root.join("blobs"), root.join("tmp")] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| RunError::io(format!("creating {}", dir.display()), e))?;
        }
        // The executor's alone: no action finds an entry by its path.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| RunError::io(format!("making {} private", root.display()), e))?;
        }
        // A temp file is a download a crash interrupted: never an entry.
        if let Ok(stale) = std::fs::read_dir(root.join("tmp")) {
            for entry in stale.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let cache = FileCache {
            root: root.to_path_buf(),
            max_bytes,
            blobs_filled: AtomicU64::new(0),
            bytes_filled: AtomicU64::new(0),
            entries_evicted: AtomicU64::new(0),
            index: Mutex::new(Index::default()),
        };
        let mut found = Vec::new();
        for shard in std::fs::read_dir(root.join("blobs"))
            .map_err(|e| RunError::io(format!("reading {}", root.display()), e))?
            .flatten()
        {
            for entry in std::fs::read_dir(shard.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(meta) = entry.metadata() {
                    let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                    found.push((modified, entry.path(), meta.len()));
                }
            }
        }
        found.sort();
        {
            let mut index = cache.index.lock().expect("cache index lock");
            for (_, path, size) in found {
                index.add(path, size);
            }
        }
        cache.evict();
        Ok(cache)
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            blobs_filled: self.blobs_filled.load(Ordering::Relaxed),
            bytes_filled: self.bytes_filled.load(Ordering::Relaxed),
            entries_evicted: self.entries_evicted.load(Ordering::Relaxed),
            bytes_held: self.index.lock().expect("cache index lock").bytes,
        }
    }

    /// Keeps the entries of `files` (digest, executable) from eviction
    /// until the returned guard is dropped; pin before looking entries up.
    pub fn pin(self: &Arc<Self>, files: impl IntoIterator<Item = (Digest, bool)>) -> Pinned {
        let paths: Vec<PathBuf> = files
            .into_iter()
            .map(|(digest, executable)| self.path(&digest, executable))
            .collect();
        let mut index = self.index.lock().expect("cache index lock");
        for path in &paths {
            *index.pins.entry(path.clone()).or_default() += 1;
        }
        Pinned {
            cache: self.clone(),
            paths,
        }
    }

    /// Deletes the least recently used unpinned entries while the cache is
    /// over its limit, down to 90% of it.
    fn evict(&self) {
        let Some(max) = self.max_bytes else {
            return;
        };
        let victims = {
            let mut index = self.index.lock().expect("cache index lock");
            if index.bytes <= max {
                return;
            }
            let low_water = max / 10 * 9;
            let mut candidates: Vec<(u64, PathBuf, u64)> = index
                .entries
                .iter()
                .filter(|(path, _)| !index.pins.contains_key(*path))
                .map(|(path, entry)| (entry.used, path.clone(), entry.size))
                .collect();
            candidates.sort_unstable();
            let mut victims = Vec::new();
            for (_, path, size) in candidates {
                if index.bytes <= low_water {
                    break;
                }
                index.entries.remove(&path);
                index.bytes -= size;
                victims.push(path);
            }
            victims
        };
        for path in victims {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    self.entries_evicted.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not evict a file cache entry")
                }
            }
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

    /// Whether the entry exists (and marks it used). An entry only exists
    /// complete and verified.
    pub fn contains(&self, digest: &Digest, executable: bool) -> bool {
        let path = self.path(digest, executable);
        let exists = path.exists();
        if exists {
            let mut index = self.index.lock().expect("cache index lock");
            index.clock += 1;
            let now = index.clock;
            if let Some(entry) = index.entries.get_mut(&path) {
                entry.used = now;
            }
        }
        exists
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
            let mut hasher = DigestFunction::Sha256.hasher();
            let mut size = 0u64;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
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
            let received = kiln_cas::wire::to_wire(&hasher.finish(size));
            if received != *digest {
                return Err(RunError::Internal(format!(
                    "ByteStream.Read of {} returned {}",
                    format_digest(digest),
                    format_digest(&received)
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

    /// Makes the output file at `source`, which a finished action left
    /// and the worker hashed to `digest` once the action's processes were
    /// gone, the entry for (digest, executable) by a hardlink; the file
    /// becomes read-only. A file the executor does not own alone (another
    /// user's, which the privileged side did not take back, or one linked
    /// elsewhere too) is copied instead ([`FileCache::adopt_copy`]).
    /// Nothing happens when the entry exists or the file cannot be linked
    /// (another file system). Blocking.
    pub fn adopt(&self, source: &Path, digest: &Digest, executable: bool) {
        let target = self.path(digest, executable);
        if target.exists() {
            return;
        }
        // An entry belongs to the executor: an action user that owned it
        // could make it writable again. And it is the only name of its
        // inode: a second link is a way to write to it, for whoever made
        // that link (another action running as the same user, say).
        if !owned_alone(source) {
            return self.adopt_copy(source, digest, executable);
        }
        if install(source, &target, executable, |from, to| {
            std::fs::hard_link(from, to)
        })
        .is_ok()
        {
            self.record(target, digest);
        }
    }

    /// Makes a copy of the output file at `source` the entry for (digest,
    /// executable), hashing what it copies: for the outputs of an action
    /// whose processes may outlive it and could still write to `source`
    /// (see [`FileCache::adopt`] for the in-place way). A copy whose bytes
    /// no longer match `digest` is dropped, as is anything that is not a
    /// regular file. Blocking.
    pub fn adopt_copy(&self, source: &Path, digest: &Digest, executable: bool) {
        let target = self.path(digest, executable);
        if target.exists() {
            return;
        }
        let temp = self.temp_path();
        let copied = copy_verified(source, &temp, digest).and_then(|()| {
            install(&temp, &target, executable, |from, to| {
                std::fs::rename(from, to)
            })
        });
        match copied {
            Ok(()) => self.record(target, digest),
            Err(_) => {
                let _ = std::fs::remove_file(&temp);
            }
        }
    }

    /// Sets the entry's final mode and renames it into place.
    async fn commit(&self, temp: &Path, digest: &Digest, executable: bool) -> Result<(), RunError> {
        let target = self.path(digest, executable);
        let (temp, placed) = (temp.to_path_buf(), target.clone());
        let installed = crate::process::blocking("adding to the file cache", move || {
            let installed = install(&temp, &placed, executable, |from, to| {
                std::fs::rename(from, to)
            });
            if installed.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            Ok(installed)
        })
        .await?;
        // The message is written only when it is needed: this runs for
        // every fetched input.
        installed.map_err(|e| {
            RunError::io(
                format!("adding {} to the file cache", format_digest(digest)),
                e,
            )
        })?;
        self.record(target, digest);
        Ok(())
    }

    /// Counts a new entry, evicting past the limit.
    fn record(&self, target: PathBuf, digest: &Digest) {
        self.index
            .lock()
            .expect("cache index lock")
            .add(target, digest.size_bytes.max(0) as u64);
        self.evict();
    }
}

/// Copies the regular file `source` (not followed if a symlink, and not
/// waited on if the action swapped in a FIFO) to `target`, failing unless
/// what was copied hashes to `digest`.
fn copy_verified(source: &Path, target: &Path, digest: &Digest) -> std::io::Result<()> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt;
    let mut input = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32)
        .open(source)?;
    if !input.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut output = std::fs::File::create(target)?;
    if crate::outputs::hash_copy(&mut input, &mut output)? != *digest {
        return Err(std::io::Error::other("changed since it was hashed"));
    }
    Ok(())
}

/// Whether `file` (not followed if a symlink) is a regular file the
/// executor owns, with no other link. Blocking.
fn owned_alone(file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.symlink_metadata().is_ok_and(|meta| {
        meta.is_file()
            && meta.nlink() == 1
            && meta.uid() == rustix::process::geteuid().as_raw()
            && meta.gid() == rustix::process::getegid().as_raw()
    })
}

/// Gives `file` an entry's read-only mode, then `place`s it as `target` (a
/// rename or a hardlink), making the shard directory on its first entry.
/// Blocking.
fn install(
    file: &Path,
    target: &Path,
    executable: bool,
    place: fn(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if executable { 0o555 } else { 0o444 };
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode))?;
    match place(file, target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            place(file, target)
        }
        other => other,
    }
}

impl Index {
    /// Records `path` as just used (replacing an earlier record of it).
    fn add(&mut self, path: PathBuf, size: u64) {
        self.clock += 1;
        let used = self.clock;
        if let Some(old) = self.entries.insert(path, Entry { size, used }) {
            self.bytes -= old.size;
        }
        self.bytes += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(byte: u8, size: usize) -> (Digest, Bytes) {
        let data = vec![byte; size];
        let digest = crate::cas::digest_of(&data);
        (digest, Bytes::from(data))
    }

    #[tokio::test]
    async fn the_least_recently_used_unpinned_entries_go_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(FileCache::open_limited(dir.path(), Some(3000)).unwrap());
        let (a, a_data) = blob(b'a', 900);
        let (b, b_data) = blob(b'b', 900);
        let (c, c_data) = blob(b'c', 900);
        let (d, d_data) = blob(b'd', 900);
        cache.insert_bytes(&a, false, a_data).await.unwrap();
        cache.insert_bytes(&b, false, b_data).await.unwrap();
        cache.insert_bytes(&c, false, c_data).await.unwrap();
        assert_eq!(cache.stats().bytes_held, 2700);
        // `a` is used again and `b` is pinned: `c` is the one to go.
        assert!(cache.contains(&a, false));
        let pinned = cache.pin([(b.clone(), false)]);
        cache.insert_bytes(&d, false, d_data).await.unwrap();
        assert!(cache.contains(&a, false));
        assert!(cache.contains(&b, false));
        assert!(!cache.contains(&c, false), "c should have been evicted");
        assert!(cache.contains(&d, false));
        assert_eq!(cache.stats().entries_evicted, 1);
        // 3,600 bytes went over the limit; evicting `c` reached 90% of it.
        assert_eq!(cache.stats().bytes_held, 2700);
        drop(pinned);

        // Reopened with a smaller limit, what an earlier run left is
        // counted and trimmed (down to 90% of the limit).
        drop(cache);
        let cache = FileCache::open_limited(dir.path(), Some(2000)).unwrap();
        assert!(cache.stats().bytes_held <= 1800, "{:?}", cache.stats());
        let left = [&a, &b, &d]
            .iter()
            .filter(|digest| cache.path(digest, false).exists())
            .count();
        assert_eq!(left, 2);
    }

    #[test]
    fn an_adopted_output_is_a_read_only_entry_sharing_its_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(&dir.path().join("cache")).unwrap();
        let (digest, data) = blob(7, 100);
        let output = dir.path().join("output.bin");
        std::fs::write(&output, &data).unwrap();
        cache.adopt(&output, &digest, false);
        let entry = cache.path(&digest, false);
        assert!(cache.contains(&digest, false));
        assert!(!cache.contains(&digest, true), "only the variant adopted");
        let (entry_meta, output_meta) = (entry.metadata().unwrap(), output.metadata().unwrap());
        assert_eq!(entry_meta.ino(), output_meta.ino());
        assert_eq!(entry_meta.mode() & 0o777, 0o444);
        assert_eq!(cache.stats().bytes_held, 100);
        // Adopting the same content again leaves the entry alone.
        let again = dir.path().join("again.bin");
        std::fs::write(&again, &data).unwrap();
        cache.adopt(&again, &digest, false);
        assert_eq!(entry.metadata().unwrap().ino(), output_meta.ino());
        assert_eq!(cache.stats().bytes_held, 100);
    }

    #[test]
    fn an_output_linked_elsewhere_too_is_adopted_as_a_copy() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(&dir.path().join("cache")).unwrap();
        let (digest, data) = blob(9, 100);
        // Whoever holds the second name could write to the entry through it.
        let output = dir.path().join("output.bin");
        std::fs::write(&output, &data).unwrap();
        std::fs::hard_link(&output, dir.path().join("elsewhere")).unwrap();
        cache.adopt(&output, &digest, false);
        let entry = cache.path(&digest, false).metadata().unwrap();
        assert_ne!(entry.ino(), output.metadata().unwrap().ino());
        assert_eq!(entry.nlink(), 1);
        assert_eq!(std::fs::read(cache.path(&digest, false)).unwrap(), data);
        assert_eq!(
            output.metadata().unwrap().mode() & 0o222,
            0o200,
            "the output is left as it was"
        );
    }

    #[tokio::test]
    async fn an_unlimited_cache_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FileCache::open(dir.path()).unwrap();
        for byte in 0..20u8 {
            let (digest, data) = blob(byte, 1000);
            cache.insert_bytes(&digest, false, data).await.unwrap();
        }
        assert_eq!(cache.stats().bytes_held, 20_000);
        assert_eq!(cache.stats().entries_evicted, 0);
    }
}
