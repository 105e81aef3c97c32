//! The disk store: Kiln's durable, size-bounded blob store.
//!
//! Layout under the store's directory:
//! - `segments/NNNNNNNNNN.pack`: small blobs and Action Cache entries,
//!   appended back to back (no file per tiny blob: that is what makes
//!   200k small writes per second possible);
//! - `files/XX/NS-HASH`: large blobs, one file each, written under `tmp/`
//!   and renamed into place only after the caller verified the digest;
//! - `journal`: one fixed-size record per stored blob (see [`journal`]);
//! - `checkpoint`: how much of the journal is known to be on disk.
//!
//! Durability is group commit: every `sync_interval` (or as soon as a
//! writer waits, with [`Durability::Sync`]) a committer thread waits for
//! the batches still being written behind their acknowledgement
//! (`disk/behind.rs`), syncs the segments, blob files and directories
//! written since the last commit, then the journal, and then advances the
//! checkpoint. After a crash, journal records before the checkpoint are
//! trusted; later ones are kept only if their data re-verifies (crc32c for
//! packed blobs, the content hash for files). So a blob is either whole
//! and verified, or absent — and a torn write can never surface.
//!
//! Faults: a write that fails (a full disk) leaves no partial journal
//! record behind, so the store keeps going once there is room again. A
//! failed *sync* stops the store instead ([`StoreError::Stopped`]): Linux
//! may have dropped the pages it could not write, so retrying could
//! "succeed" without the data, and nothing the sync covered may ever be
//! checkpointed. Opening again re-verifies everything past the checkpoint.
//!
//! Eviction keeps the store under `max_size_bytes`, approximately least
//! recently used: whole old segments and cold files are dropped, and blobs
//! in a dropped segment that were used recently are first copied forward.
//! A blob's [`Retention`] shifts its recency (see there); it is journaled,
//! so it survives restarts.

mod behind;
mod direct;
pub mod journal;
mod recent;

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::watch;

use self::behind::{Landing, WriteBehind};
use self::direct::DirectFileSink;
use self::journal::{Location, Record, RECORD_LEN};
use self::recent::RecentBlobs;
use crate::aligned::{AlignedBuf, ALIGN};
use crate::digest::KeyMap;
use crate::store::BufferingWriter;
use crate::{Blob, BlobStore, BlobWriter, Key, Pieces, Result, Retention, StoreError};

/// When a write is acknowledged relative to reaching the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge once the blob is written and visible; it reaches the disk
    /// with the next group commit (at most `sync_interval` later). A crash of
    /// the machine may lose blobs of that window, never corrupt one.
    #[default]
    GroupCommit,
    /// Acknowledge only after the group commit that covers the blob.
    Sync,
}

#[derive(Clone, Debug)]
pub struct DiskStoreConfig {
    pub path: PathBuf,
    /// Upper bound for all stored bytes; eviction starts above it.
    pub max_size_bytes: u64,
    /// Blobs up to this size are appended to segments instead of getting a
    /// file of their own.
    pub max_packed_blob_bytes: u64,
    pub sync_interval: Duration,
    pub durability: Durability,
    /// The journal is rewritten once it exceeds this size and twice what its
    /// live records need.
    pub journal_compaction_min_bytes: u64,
    /// How long opening waits for the directory's lock while another store
    /// holds it: a store being closed (a restart, in this process or the
    /// previous one) lets go of it only after its final commit.
    pub lock_wait: Duration,
    /// Memory for the large blobs and large batches written last, kept in
    /// the buffers they were written from and read back from there (see
    /// [`recent`]); 0 keeps none. Taken as they are written, then kept.
    pub recent_blob_bytes: u64,
}

impl DiskStoreConfig {
    pub fn new(path: impl Into<PathBuf>, max_size_bytes: u64) -> Self {
        DiskStoreConfig {
            path: path.into(),
            max_size_bytes,
            max_packed_blob_bytes: 256 * 1024,
            sync_interval: Duration::from_secs(1),
            durability: Durability::GroupCommit,
            journal_compaction_min_bytes: 64 << 20,
            lock_wait: Duration::from_secs(5),
            recent_blob_bytes: 1 << 30,
        }
    }

    /// Segments are a small fraction of the budget so that eviction is fine
    /// grained, but big enough to amortize their creation.
    fn segment_size(&self) -> u64 {
        (self.max_size_bytes / 32).clamp(4 * self.max_packed_blob_bytes.max(1024 * 1024), 256 << 20)
    }
}

/// What start-up found, for the log.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub blobs: u64,
    pub bytes: u64,
    pub verified_after_checkpoint: u64,
    pub dropped_invalid: u64,
    pub elapsed: Duration,
}

#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: DiskStoreConfig,
    root: PathBuf,
    segment_size: u64,
    index: Index,
    segments: RwLock<BTreeMap<u32, Arc<Segment>>>,
    active: Mutex<Active>,
    journal: Mutex<JournalFile>,
    committed: watch::Sender<u64>,
    commit_lock: Mutex<()>,
    commit_wakeup: Arc<Wakeup>,
    /// Bytes on disk: all segments (as reserved) plus all blob files.
    total_bytes: AtomicU64,
    /// Logical clock for eviction: advances every `max_size / 32` bytes written.
    epoch: AtomicU32,
    bytes_this_epoch: AtomicU64,
    evicting: AtomicBool,
    /// Bytes eviction has copied forward since start-up.
    copied_forward_bytes: AtomicU64,
    /// Entries and bytes eviction has dropped since start-up.
    evicted_entries: AtomicU64,
    evicted_bytes: AtomicU64,
    /// What the next group commit must sync.
    unsynced: Mutex<Unsynced>,
    /// Set once a sync failed: why the store stopped (see [`Inner::stop`]).
    stopped: OnceLock<String>,
    /// What the checkpoint on disk may cover of the current journal: its
    /// length as of the last successful journal sync (or start-up), never
    /// past its trust limit. Compaction lowers the checkpoint to this
    /// before it switches journals.
    checkpointed: AtomicU64,
    /// Whether the last checkpoint write failed (logged once, not per commit).
    checkpoint_failing: AtomicBool,
    /// A journal compaction that failed is retried only once the journal
    /// has grown past this, so a full disk is not hit every second.
    compaction_retry_bytes: AtomicU64,
    /// Large blobs just written, in memory (none when configured off).
    recent: Option<Arc<RecentBlobs>>,
    /// Direct writes of kept batches that go on after their acknowledgement.
    behind: WriteBehind,
    _lock: File,
}

/// Files written since the last group commit. Syncing exactly these (not the
/// whole file system) keeps commits cheap on a busy machine. Directories
/// are here both when a file was renamed into one and when a file or
/// directory was created in one: a new entry is durable only once its
/// directory is synced.
#[derive(Default)]
struct Unsynced {
    segments: HashSet<u32>,
    files: Vec<Arc<File>>,
    dirs: HashSet<PathBuf>,
}

/// Wakes the committer thread early (a writer waits for durability, or the
/// store is closing).
#[derive(Default)]
struct Wakeup {
    flag: Mutex<bool>,
    condvar: Condvar,
}

impl Wakeup {
    fn wake(&self) {
        *self.flag.lock() = true;
        self.condvar.notify_one();
    }
}

struct Segment {
    id: u32,
    file: Arc<File>,
    /// Epoch in which the segment stopped taking writes (u32::MAX while active).
    sealed_epoch: AtomicU32,
    len: AtomicU64,
    /// The same file opened for direct I/O, for large batches; `None` for
    /// segments found at start (they take no writes) and where the file
    /// system refuses it.
    direct: Option<Arc<File>>,
    /// Whether blobs written to it were kept in the recent-blob tier, so a
    /// read looks there first.
    kept: AtomicBool,
    /// How far from its start the file's space is allocated for writes
    /// behind their acknowledgement (see [`reserve`]).
    reserved: AtomicU64,
}

struct Active {
    segment: Arc<Segment>,
    next_offset: u64,
}

/// One index entry. Laid out flat (no `Location` enum, whose tag would
/// cost a padded word) so it stays 32 bytes: the index holds one per blob.
#[derive(Clone, Copy)]
struct Entry {
    /// Byte offset in the segment (0 for a blob file).
    offset: u64,
    len: u64,
    /// Segment id, or [`FILE_SEGMENT`] for a blob file of its own.
    segment: u32,
    /// Epoch of the last use.
    atime: u32,
    /// The journal record's payload checksum, kept so the journal can be
    /// rewritten from the index.
    payload_crc: u32,
    retention: Retention,
}

/// `Entry::segment` of a blob stored as a file of its own.
const FILE_SEGMENT: u32 = u32::MAX;

const _: () = assert!(std::mem::size_of::<Entry>() == 32);

impl Entry {
    fn new(
        location: Location,
        len: u64,
        atime: u32,
        payload_crc: u32,
        retention: Retention,
    ) -> Entry {
        let (segment, offset) = match location {
            Location::Packed { segment, offset } => (segment, offset),
            Location::File => (FILE_SEGMENT, 0),
        };
        Entry {
            offset,
            len,
            segment,
            atime,
            payload_crc,
            retention,
        }
    }

    fn location(&self) -> Location {
        match self.segment {
            FILE_SEGMENT => Location::File,
            segment => Location::Packed {
                segment,
                offset: self.offset,
            },
        }
    }

    /// The last use shifted by the retention: what eviction orders by.
    fn recency(&self) -> u32 {
        self.atime
            .saturating_add_signed(i32::from(self.retention.epochs()))
    }

    fn record(&self, key: Key) -> Record {
        Record {
            key,
            location: self.location(),
            len: self.len,
            payload_crc: self.payload_crc,
            retention: self.retention,
        }
    }
}

/// The journal file and where appends go.
struct JournalFile {
    file: Arc<File>,
    /// Bytes in the file.
    len: u64,
    /// Bytes ever appended since start-up: only grows, also across
    /// compactions, so writers can wait for "durable up to here".
    logical: u64,
    /// Checkpoints never reach past this: the first record that failed
    /// verification at start-up, when the journal could not be rewritten
    /// without it (a full disk). Such a record must stay untrusted, or a
    /// later start would serve its bad data unverified. `u64::MAX` once
    /// the journal holds only live records.
    trust_limit: u64,
}

const INDEX_SHARDS: usize = 64;

type IndexShard = Mutex<KeyMap<Entry>>;
/// Segment files found on disk at start-up, by id, with their lengths.
type ExistingSegments = BTreeMap<u32, (Arc<File>, u64)>;
/// Blob files found on disk at start-up, with their lengths.
type ExistingFiles = HashMap<Key, u64>;

struct Index {
    shards: Box<[IndexShard]>,
}

impl Index {
    fn new() -> Self {
        Index {
            shards: (0..INDEX_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: &Key) -> &IndexShard {
        &self.shards[key.hash[0] as usize % INDEX_SHARDS]
    }

    /// Looks a key up and marks it used in `epoch`.
    fn touch(&self, key: &Key, epoch: u32) -> Option<Entry> {
        let mut shard = self.shard(key).lock();
        let entry = shard.get_mut(key)?;
        entry.atime = epoch;
        Some(*entry)
    }

    /// Inserts or replaces; returns the entry replaced.
    fn insert(&self, key: Key, entry: Entry) -> Option<Entry> {
        self.shard(&key).lock().insert(key, entry)
    }

    /// Removes `key` only if it still lives at `location`.
    fn remove_if_at(&self, key: &Key, location: Location) -> bool {
        let mut shard = self.shard(key).lock();
        match shard.get(key) {
            Some(entry) if entry.location() == location => {
                shard.remove(key);
                true
            }
            _ => false,
        }
    }

    fn snapshot(&self) -> Vec<(Key, Entry)> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            all.extend(shard.lock().iter().map(|(k, e)| (*k, *e)));
        }
        all
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// See [`BlobStore::keys_in_part`].
    fn keys_in_part(&self, part: u8, select: for<'k> fn(&'k Key) -> bool) -> Vec<(Key, u64)> {
        self.shards[part as usize % INDEX_SHARDS]
            .lock()
            .iter()
            .filter(|(key, _)| key.hash[0] == part && select(key))
            .map(|(key, entry)| (*key, entry.len))
            .collect()
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |e| StoreError::io(context, e)
}

fn segment_path(root: &Path, id: u32) -> PathBuf {
    root.join("segments").join(format!("{id:010}.pack"))
}

fn file_path(root: &Path, key: &Key) -> PathBuf {
    root.join("files")
        .join(format!("{:02x}", key.hash[0]))
        .join(key.file_name())
}

/// [`io_err`] naming the store's directory, and for a full disk how much
/// room its file system has left: what an operator needs from the message.
fn store_io_error(root: &Path, context: impl Into<String>, error: io::Error) -> StoreError {
    let context = format!("{} in {}", context.into(), root.display());
    match StoreError::io(context, error) {
        StoreError::NoSpace { context, source } => {
            let context = match rustix::fs::statvfs(root) {
                Ok(fs) => format!(
                    "{context} (its file system has {} of {} bytes free)",
                    fs.f_bavail.saturating_mul(fs.f_frsize),
                    fs.f_blocks.saturating_mul(fs.f_frsize)
                ),
                Err(_) => context,
            };
            StoreError::NoSpace { context, source }
        }
        other => other,
    }
}

/// Writes `parts` back to back at `offset`, with as few `pwritev` calls
/// as the kernel allows (at most [`MAX_WRITE_PARTS`] parts each) and no
/// copy into one buffer.
fn write_all_vectored_at(file: &File, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<io::IoSlice> = parts[first..]
            .iter()
            .take(MAX_WRITE_PARTS)
            .map(|part| io::IoSlice::new(part))
            .collect();
        let mut written = match rustix::io::pwritev(file, &slices, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => written,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += written as u64;
        // Drop what was written: whole parts, then the front of the next.
        while written > 0 {
            let part = parts[first];
            if written >= part.len() {
                written -= part.len();
                first += 1;
            } else {
                parts[first] = &part[written..];
                written = 0;
            }
        }
    }
    Ok(())
}

/// Most buffers one `pwritev` takes (Linux's `IOV_MAX`).
const MAX_WRITE_PARTS: usize = 1024;

/// [`write_all_vectored_at`] of whole buffers.
fn write_buffers_at(file: &File, buffers: &[Bytes], offset: u64) -> io::Result<()> {
    let parts: Vec<&[u8]> = buffers.iter().map(|b| &b[..]).collect();
    write_all_vectored_at(file, &parts, offset)
}

/// Batches of at least this many bytes are written to a segment with direct
/// I/O and kept in memory (see [`Inner::put_packed`]). Above
/// [`INLINE_PUT_BYTES`], so a write that waits for the device never runs
/// on an async worker.
const DIRECT_BATCH_MIN: u64 = direct::BUFFER_BYTES as u64;

/// A batch copied back to back into aligned buffers, each zero-padded to
/// a whole number of blocks.
struct AlignedBatch {
    buffers: Vec<Bytes>,
    /// Where each item starts: (buffer, offset in it).
    starts: Vec<(usize, usize)>,
    /// Every buffer's capacity (all but the last are full).
    part_len: usize,
    /// Whether the buffers are the recent tier's, to keep.
    from_tier: bool,
}

impl AlignedBatch {
    /// Copies `items` into buffers from `recent`, or, once it has none
    /// free, into buffers of the batch's own (then nothing is kept).
    fn fill(items: &[(Key, Bytes)], recent: &RecentBlobs) -> AlignedBatch {
        let from_tier = Cell::new(true);
        let next_buffer = || {
            if from_tier.get() {
                match recent.buffer() {
                    Some(buffer) => return buffer,
                    None => from_tier.set(false),
                }
            }
            AlignedBuf::new(direct::BUFFER_BYTES)
        };
        let mut buffers = vec![next_buffer()];
        let mut starts = Vec::with_capacity(items.len());
        for (_, data) in items {
            let mut data = &data[..];
            starts.push((buffers.len() - 1, buffers.last().expect("one buffer").len));
            while !data.is_empty() {
                let last = buffers.last_mut().expect("one buffer");
                if last.len == last.capacity() {
                    buffers.push(next_buffer());
                    continue;
                }
                let n = last.fill_from(data);
                data = &data[n..];
            }
        }
        let part_len = buffers[0].capacity();
        let buffers = buffers
            .into_iter()
            .map(|mut buffer| {
                buffer.len = buffer.padded().len();
                let len = buffer.len;
                buffer.into_bytes(0, len)
            })
            .collect();
        AlignedBatch {
            buffers,
            starts,
            part_len,
            from_tier: from_tier.get(),
        }
    }

    fn padded_len(&self) -> u64 {
        self.buffers.iter().map(|b| b.len() as u64).sum()
    }

    /// The content-addressed items, each as its bytes in the buffers (an
    /// Action Cache entry changes under its key: never kept).
    fn kept(&self, items: &[(Key, Bytes)]) -> Vec<(Key, Pieces)> {
        items
            .iter()
            .zip(&self.starts)
            .filter(|((key, _), _)| key.namespace.content_addressed().is_some())
            .map(|((key, data), &(first, skip))| {
                let following = (skip + data.len()).saturating_sub(1) / self.part_len;
                let last = (first + following).min(self.buffers.len() - 1);
                let parts = self.buffers[first..=last].to_vec();
                (*key, Pieces::within(parts, skip, data.len() as u64))
            })
            .collect()
    }
}

/// Makes sure the segment's bytes up to `end` are allocated, so a write
/// there cannot fail for want of space; `false` where the file system
/// cannot reserve. Reserves the whole segment at once where there is room:
/// a reservation waits for the direct writes in flight on the file, so
/// one per segment keeps uploads from waiting for the writer thread.
fn reserve(segment: &Segment, file: &File, end: u64, segment_size: u64) -> io::Result<bool> {
    if segment.reserved.load(Ordering::Acquire) >= end {
        return Ok(true);
    }
    // From the segment's start: ranges written already cost nothing, and a
    // batch below this one that has not reserved yet is covered too.
    let allocate = |len: u64| {
        rustix::fs::fallocate(file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, len)
            .map(|()| segment.reserved.fetch_max(len, Ordering::AcqRel))
    };
    match allocate(segment_size.max(end)).or_else(|_| allocate(end)) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NOSPC) => Err(io::Error::from(rustix::io::Errno::NOSPC)),
        Err(_) => Ok(false),
    }
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Options that create files only the server can read: the store's
/// directory is private already, this is the second lock.
fn private_file() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.mode(0o600);
    options
}

/// Creates a directory only the server can enter; whether it is new (and
/// so its parent must be synced before anything in it is trusted).
fn create_private_dir(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `data` to `path` so that a reader sees the old file or the new
/// one, never a mix, also after a crash. A failure before the rename
/// removes the temporary file again (on a full disk it holds the space).
fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(data)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(path.parent().expect("store paths have a parent"))
}

fn write_checkpoint(root: &Path, durable_len: u64) -> Result<()> {
    write_atomically(
        &root.join("checkpoint"),
        &journal::encode_checkpoint(durable_len),
    )
    .map_err(|e| store_io_error(root, "writing the checkpoint", e))
}

/// How replacing the journal failed.
enum ReplaceError {
    /// Nothing changed: the old journal is in place, and the checkpoint
    /// still fits it.
    Untouched(StoreError),
    /// The new journal was renamed in but its directory did not sync: after
    /// a crash either journal may be the one found. Both fit the checkpoint,
    /// but appends to the new one could vanish with it.
    Uncertain(StoreError),
}

/// Replaces the journal with `records`, whose data is durable already.
/// `durable` is how much of the current journal the checkpoint may cover.
/// A crash at any step leaves a journal that the checkpoint fits: before the
/// rename, the checkpoint is lowered to what both journals hold durably;
/// after it, raised to the new length (if that write fails, the lower value
/// stays: safe, only more to re-verify). Returns the new journal, open for
/// appends.
fn replace_journal(root: &Path, records: &[u8], durable: u64) -> Result<File, ReplaceError> {
    let path = root.join("journal");
    let tmp = root.join("journal.tmp");
    let prepared = private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(records)?;
            file.sync_all()?;
            // Appends must go to the end also after a failed one was cut off.
            OpenOptions::new().append(true).open(&tmp)
        })
        .map_err(|e| store_io_error(root, "writing a new journal", e))
        .and_then(|file| {
            write_checkpoint(root, durable.min(records.len() as u64))?;
            fs::rename(&tmp, &path)
                .map_err(|e| store_io_error(root, "moving the new journal into place", e))?;
            Ok(file)
        });
    let file = prepared.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ReplaceError::Untouched(e)
    })?;
    fsync_dir(root).map_err(|e| {
        ReplaceError::Uncertain(store_io_error(
            root,
            "syncing the new journal's directory",
            e,
        ))
    })?;
    if let Err(e) = write_checkpoint(root, records.len() as u64) {
        tracing::warn!(error = %e, "the new journal's checkpoint was not written; the next start re-verifies it");
    }
    Ok(file)
}

impl DiskStore {
    /// Opens (or creates) the store, replaying its journal. Blocking.
    pub fn open(config: DiskStoreConfig) -> Result<(DiskStore, RecoveryReport)> {
        let started = Instant::now();
        let root = config.path.clone();
        // The store is the server's alone: no other local user reads a blob
        // (or learns one exists) through the file system. Its parents keep
        // their usual modes (actions must traverse the data directory).
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        create_private_dir(&root).map_err(io_err(format!("creating {}", root.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("making {} private", root.display())))?;
        }
        for dir in ["segments", "files", "tmp"] {
            create_private_dir(&root.join(dir))
                .map_err(io_err(format!("creating {}", root.join(dir).display())))?;
        }
        let lock = private_file()
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join("LOCK"))
            .map_err(io_err(format!("creating {}/LOCK", root.display())))?;
        let waiting_since = Instant::now();
        let mut logged = false;
        loop {
            match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK)
                    if waiting_since.elapsed() < config.lock_wait =>
                {
                    if !logged {
                        tracing::info!(path = %root.display(), "waiting for the store's lock");
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(StoreError::io(
                        format!(
                            "locking {} (waited {:?}): is another kiln using this data directory?",
                            root.display(),
                            config.lock_wait
                        ),
                        e.into(),
                    ))
                }
            }
        }
        // Writes that never committed, and a journal rewrite that never
        // finished: on a full disk they hold the room the start needs.
        for entry in fs::read_dir(root.join("tmp"))
            .map_err(io_err("listing tmp/"))?
            .flatten()
        {
            let _ = fs::remove_file(entry.path());
        }
        let _ = fs::remove_file(root.join("journal.tmp"));

        let mut report = RecoveryReport::default();
        let (segments, files) = list_existing(&root)?;
        let durable_len = fs::read(root.join("checkpoint"))
            .ok()
            .and_then(|buf| journal::decode_checkpoint(&buf))
            .unwrap_or(0);
        let replay = replay_journal(&root, &segments, &files, durable_len, &mut report)?;
        let replayed = &replay.live;

        // Orphans: data no surviving record points at.
        let live_segments: HashSet<u32> = replayed
            .values()
            .filter_map(|(r, _)| match r.location {
                Location::Packed { segment, .. } => Some(segment),
                Location::File => None,
            })
            .collect();
        for (&id, _) in segments
            .iter()
            .filter(|(id, _)| !live_segments.contains(id))
        {
            let _ = fs::remove_file(segment_path(&root, id));
        }
        for (key, _) in files.iter().filter(|(key, _)| !replayed.contains_key(key)) {
            let _ = fs::remove_file(file_path(&root, key));
        }

        // Everything replayed (also what was verified past the checkpoint)
        // becomes durable; then the journal is rewritten with live records
        // only, and the checkpoint covers all of it.
        let root_dir = File::open(&root).map_err(io_err(format!("opening {}", root.display())))?;
        rustix::fs::syncfs(&root_dir).map_err(|e| StoreError::io("syncing the store", e.into()))?;
        let mut compact = Vec::with_capacity(replayed.len() * RECORD_LEN);
        let mut ordered: Vec<_> = replayed.values().collect();
        ordered.sort_by_key(|(_, position)| *position);
        for (record, _) in &ordered {
            record.encode(&mut compact);
        }
        let (journal, journal_len, trust_limit, checkpointed) =
            match replace_journal(&root, &compact, durable_len) {
                Ok(file) => (file, compact.len() as u64, u64::MAX, u64::MAX),
                Err(ReplaceError::Uncertain(e)) => return Err(e),
                // A full disk has no room for a new journal. The old one
                // serves as it is (see `JournalFile::trust_limit`); the
                // commit thread compacts it once there is room.
                Err(ReplaceError::Untouched(e)) => {
                    tracing::warn!(
                        error = %e,
                        "could not rewrite the journal at start-up; keeping it as it is"
                    );
                    let file = private_file()
                        .append(true)
                        .create(true)
                        .open(root.join("journal"))
                        .map_err(io_err("opening the journal"))?;
                    let len = file
                        .metadata()
                        .map_err(io_err("reading the journal"))?
                        .len();
                    let trust_limit = replay.trust_limit;
                    (file, len, trust_limit, durable_len.min(trust_limit))
                }
            };

        // Ages: journal order stands in for access order across a restart
        // (retention is applied on top, not baked into the order).
        const RESTART_EPOCHS: u64 = 32;
        let count = ordered.len().max(1) as u64;
        let index = Index::new();
        let mut segment_epochs: HashMap<u32, u32> = HashMap::new();
        let mut total_bytes = 0u64;
        for (i, (record, _)) in ordered.iter().enumerate() {
            let atime = (i as u64 * RESTART_EPOCHS / count) as u32;
            match record.location {
                Location::Packed { segment, .. } => {
                    let epoch = segment_epochs.entry(segment).or_default();
                    *epoch = (*epoch).max(atime);
                }
                Location::File => total_bytes += record.len,
            }
            report.blobs += 1;
            report.bytes += record.len;
            index.insert(
                record.key,
                Entry::new(
                    record.location,
                    record.len,
                    atime,
                    record.payload_crc,
                    record.retention,
                ),
            );
        }
        let mut segment_map = BTreeMap::new();
        for (&id, &(ref file, len)) in segments.iter().filter(|(id, _)| live_segments.contains(id))
        {
            total_bytes += len;
            segment_map.insert(
                id,
                Arc::new(Segment {
                    id,
                    file: file.clone(),
                    sealed_epoch: AtomicU32::new(segment_epochs.get(&id).copied().unwrap_or(0)),
                    len: AtomicU64::new(len),
                    direct: None,
                    kept: AtomicBool::new(false),
                    reserved: AtomicU64::new(0),
                }),
            );
        }
        // Past every id a record names, not only every file there is: a
        // journal kept as it is may name deleted segments, and their ids
        // must never come back with other data.
        let next_id = segments
            .keys()
            .next_back()
            .copied()
            .max(replay.max_segment)
            .map_or(1, |id| id + 1);
        let active = Self::create_segment(&root, next_id)?;
        segment_map.insert(next_id, active.clone());

        let segment_size = config.segment_size();
        let inner = Arc::new(Inner {
            segment_size,
            root,
            index,
            segments: RwLock::new(segment_map),
            active: Mutex::new(Active {
                segment: active,
                next_offset: 0,
            }),
            journal: Mutex::new(JournalFile {
                file: Arc::new(journal),
                len: journal_len,
                logical: 0,
                trust_limit,
            }),
            committed: watch::channel(0).0,
            commit_lock: Mutex::new(()),
            commit_wakeup: Arc::default(),
            total_bytes: AtomicU64::new(total_bytes),
            epoch: AtomicU32::new(RESTART_EPOCHS as u32),
            bytes_this_epoch: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
            copied_forward_bytes: AtomicU64::new(0),
            evicted_entries: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            // The active segment's directory entry is new (and so is the
            // journal's, if it had to be created where it was kept).
            unsynced: Mutex::new(Unsynced {
                dirs: HashSet::from([config.path.join("segments"), config.path.clone()]),
                ..Unsynced::default()
            }),
            stopped: OnceLock::new(),
            checkpointed: AtomicU64::new(journal_len.min(checkpointed)),
            checkpoint_failing: AtomicBool::new(false),
            compaction_retry_bytes: AtomicU64::new(0),
            recent: RecentBlobs::new(direct::BUFFER_BYTES, config.recent_blob_bytes),
            behind: WriteBehind::start().map_err(io_err("starting the store's writer thread"))?,
            _lock: lock,
            config,
        });
        let (weak, wakeup, interval) = (
            Arc::downgrade(&inner),
            inner.commit_wakeup.clone(),
            inner.config.sync_interval,
        );
        std::thread::Builder::new()
            .name("kiln-store-commit".into())
            .spawn(move || committer(weak, wakeup, interval))
            .map_err(io_err("starting the commit thread"))?;
        let store = DiskStore { inner };
        store.inner.maybe_evict();
        report.elapsed = started.elapsed();
        Ok((store, report))
    }

    /// Creates segment `id`. Its directory entry becomes durable with the
    /// next group commit, before any record naming it is checkpointed: the
    /// caller registers `segments/` as unsynced.
    fn create_segment(root: &Path, id: u32) -> Result<Arc<Segment>> {
        let path = segment_path(root, id);
        let file = private_file()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| store_io_error(root, format!("creating segment {id}"), e))?;
        // Where the file system refuses direct I/O (tmpfs), every batch
        // is written buffered.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&path)
            .ok()
            .map(Arc::new);
        Ok(Arc::new(Segment {
            id,
            file: Arc::new(file),
            sealed_epoch: AtomicU32::new(u32::MAX),
            len: AtomicU64::new(0),
            direct,
            kept: AtomicBool::new(false),
            reserved: AtomicU64::new(0),
        }))
    }

    /// Makes everything written so far durable now. Blocking.
    pub fn flush(&self) -> Result<()> {
        self.inner.commit()
    }

    /// Rewrites the journal with live records only (the commit thread does
    /// this by itself when the journal grows). Blocking; writers wait.
    pub fn compact_journal(&self) -> Result<()> {
        self.inner.compact_journal()
    }

    /// Bytes in the journal file.
    pub fn journal_bytes(&self) -> u64 {
        self.inner.journal.lock().len
    }

    /// Bytes currently held on disk.
    pub fn size_bytes(&self) -> u64 {
        self.inner.total_bytes.load(Ordering::Relaxed)
    }

    /// Number of blobs and Action Cache entries held.
    /// Bytes eviction has copied forward (rewritten) since start-up.
    pub fn copied_forward_bytes(&self) -> u64 {
        self.inner.copied_forward_bytes.load(Ordering::Relaxed)
    }

    pub fn blob_count(&self) -> usize {
        self.inner.index.len()
    }

    /// Waits, if the configured durability says so, until the journal up to
    /// `journal_end` is durable.
    async fn settle(&self, journal_end: u64) -> Result<()> {
        if self.inner.config.durability != Durability::Sync {
            return Ok(());
        }
        self.inner.commit_wakeup.wake();
        let mut committed = self.inner.committed.subscribe();
        let inner = &self.inner;
        let committed_len = *committed
            .wait_for(|len| *len >= journal_end || inner.stopped.get().is_some())
            .await
            .map_err(|_| {
                StoreError::io(
                    "waiting for the group commit",
                    io::Error::other("store closed"),
                )
            })?;
        if committed_len >= journal_end {
            Ok(())
        } else {
            // The sync that was to cover this write failed.
            self.inner.check_running()
        }
    }
}

fn list_existing(root: &Path) -> Result<(ExistingSegments, ExistingFiles)> {
    let mut segments = BTreeMap::new();
    for entry in fs::read_dir(root.join("segments"))
        .map_err(io_err("listing segments/"))?
        .flatten()
    {
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".pack"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let file = OpenOptions::new()
            .read(true)
            .open(entry.path())
            .map_err(io_err(format!("opening {}", entry.path().display())))?;
        let len = file
            .metadata()
            .map_err(io_err("reading segment size"))?
            .len();
        segments.insert(id, (Arc::new(file), len));
    }
    let mut files = HashMap::new();
    for dir in fs::read_dir(root.join("files"))
        .map_err(io_err("listing files/"))?
        .flatten()
    {
        for entry in fs::read_dir(dir.path())
            .map_err(io_err("listing files/"))?
            .flatten()
        {
            if let (Some(key), Ok(meta)) = (
                entry.file_name().to_str().and_then(Key::parse_file_name),
                entry.metadata(),
            ) {
                files.insert(key, meta.len());
            }
        }
    }
    Ok((segments, files))
}

/// What replaying the journal found.
struct Replay {
    /// The last valid record of each key, with its position.
    live: HashMap<Key, (Record, u64)>,
    /// Where the first record that failed verification starts (see
    /// [`JournalFile::trust_limit`]); `u64::MAX` if none did.
    trust_limit: u64,
    /// The highest segment id any record names, valid or not.
    max_segment: Option<u32>,
}

/// Replays the journal. Records past `durable_len` are re-verified against
/// their data. A stretch that is not a record (a torn append) is skipped
/// byte by byte until records decode again, and every record after it is
/// re-verified too, checkpoint or not: a journal damaged in the middle (by
/// an append cut short on a full disk, before Kiln cut such appends off)
/// loses only the damaged record, not everything after it.
fn replay_journal(
    root: &Path,
    segments: &ExistingSegments,
    files: &ExistingFiles,
    durable_len: u64,
    report: &mut RecoveryReport,
) -> Result<Replay> {
    let mut replay = Replay {
        live: HashMap::new(),
        trust_limit: u64::MAX,
        max_segment: None,
    };
    let mut journal = match File::open(root.join("journal")) {
        Ok(file) => io::BufReader::with_capacity(1 << 20, file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(replay),
        Err(e) => return Err(StoreError::io("opening the journal", e)),
    };
    let mut buf = [0u8; RECORD_LEN];
    // Bytes of `buf` read so far, and the journal offset of `buf[0]`.
    let (mut filled, mut position) = (0usize, 0u64);
    // Whether a torn stretch was seen, and whether `buf` starts inside one.
    let (mut torn, mut in_tear) = (false, false);
    loop {
        while filled < RECORD_LEN {
            match journal.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::io("reading the journal", e)),
            }
        }
        if filled < RECORD_LEN {
            // A torn last append: nothing after it was acknowledged.
            if filled > 0 && !in_tear {
                report.dropped_invalid += 1;
            }
            break;
        }
        let Some(record) = Record::decode(&buf) else {
            if !in_tear {
                report.dropped_invalid += 1;
                torn = true;
                in_tear = true;
            }
            buf.copy_within(1.., 0);
            filled -= 1;
            position += 1;
            continue;
        };
        in_tear = false;
        let trusted = !torn && position + RECORD_LEN as u64 <= durable_len;
        let valid = match record.location {
            Location::Packed { segment, offset } => {
                replay.max_segment = replay.max_segment.max(Some(segment));
                match segments.get(&segment) {
                    Some((file, len)) if offset + record.len <= *len => {
                        trusted || {
                            report.verified_after_checkpoint += 1;
                            let mut data = vec![0u8; record.len as usize];
                            file.read_exact_at(&mut data, offset).is_ok()
                                && crc32c::crc32c(&data) == record.payload_crc
                        }
                    }
                    _ => false,
                }
            }
            Location::File => match files.get(&record.key) {
                Some(&len) if len == record.len => {
                    trusted || {
                        report.verified_after_checkpoint += 1;
                        file_matches_key(&file_path(root, &record.key), &record.key)
                    }
                }
                _ => false,
            },
        };
        if valid {
            replay.live.insert(record.key, (record, position));
        } else {
            report.dropped_invalid += 1;
            if !trusted {
                replay.trust_limit = replay.trust_limit.min(position);
            }
        }
        filled = 0;
        position += RECORD_LEN as u64;
    }
    Ok(replay)
}

fn file_matches_key(path: &Path, key: &Key) -> bool {
    let Some(function) = key.namespace.content_addressed() else {
        return false;
    };
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let mut hasher = function.hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(_) => return false,
        }
    }
    hasher.finish(size).hash == key.hash
}

impl Inner {
    /// Stops the store after `cause`, a failure it cannot recover from
    /// while running: a failed sync (Linux may have dropped the pages it
    /// could not write, so a retry could "succeed" without the data), or a
    /// journal that is no longer what the store believes. From then on
    /// every call fails with [`StoreError::Stopped`] and no checkpoint is
    /// written, so nothing the failed sync covered is ever acknowledged as
    /// durable or trusted unverified; writers waiting for a commit are
    /// woken. Returns `cause`, for the caller that hit it.
    fn stop(&self, cause: StoreError) -> StoreError {
        let mut first = false;
        self.stopped.get_or_init(|| {
            first = true;
            format!(
                "the disk store stopped: {cause}. It takes no writes and serves nothing until \
                 kiln restarts; the restart re-verifies every write since the last checkpoint"
            )
        });
        if first {
            tracing::error!(
                path = %self.root.display(),
                error = %cause,
                "the disk store stopped: restart kiln to recover (writes since the last checkpoint are re-verified)"
            );
        }
        self.committed.send_modify(|_| {});
        cause
    }

    fn check_running(&self) -> Result<()> {
        match self.stopped.get() {
            Some(reason) => Err(StoreError::Stopped(reason.clone())),
            None => Ok(()),
        }
    }

    fn io_err(&self, context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError + '_ {
        let context = context.into();
        move |error| store_io_error(&self.root, context, error)
    }

    fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Relaxed)
    }

    fn account_written(&self, bytes: u64) {
        let per_epoch = (self.config.max_size_bytes / 32).max(1);
        if self.bytes_this_epoch.fetch_add(bytes, Ordering::Relaxed) + bytes >= per_epoch {
            self.bytes_this_epoch.store(0, Ordering::Relaxed);
            self.epoch.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lookup(&self, key: &Key) -> Option<Entry> {
        self.index.touch(key, self.epoch())
    }

    fn get_blocking(&self, key: &Key) -> Result<Option<Blob>> {
        self.check_running()?;
        let Some(entry) = self.lookup(key) else {
            return Ok(None);
        };
        match entry.location() {
            Location::Packed { segment, offset } => {
                let Some(segment) = self.segments.read().get(&segment).cloned() else {
                    return Ok(None); // evicted between the lookup and now
                };
                if segment.kept.load(Ordering::Relaxed) {
                    if let Some(pieces) = self.recent.as_ref().and_then(|r| r.get(key, entry.len)) {
                        return Ok(Some(Blob::Pieces(pieces)));
                    }
                }
                Ok(Some(Blob::File {
                    file: segment.file.clone(),
                    offset,
                    len: entry.len,
                }))
            }
            // Just written: from memory; else from the file.
            Location::File => {
                if let Some(pieces) = self.recent.as_ref().and_then(|r| r.get(key, entry.len)) {
                    return Ok(Some(Blob::Pieces(pieces)));
                }
                self.open_file(key, entry.len)
            }
        }
    }

    /// A blob file, buffered: the page cache is the hot tier for large
    /// blobs that many clients fetch (a direct read measured a steady but
    /// device-bound 0.8-0.9 GB/s here; see benchmarks/zero-copy-bytestream.md).
    fn open_file(&self, key: &Key, len: u64) -> Result<Option<Blob>> {
        match File::open(file_path(&self.root, key)) {
            Ok(file) => Ok(Some(Blob::File {
                file: Arc::new(file),
                offset: 0,
                len,
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.index.remove_if_at(key, Location::File);
                Ok(None)
            }
            Err(e) => Err(StoreError::io(format!("opening blob {key:?}"), e)),
        }
    }

    /// Appends blobs to the active segment with one write and one journal
    /// append, then makes them visible as used now. Returns the journal's end.
    ///
    /// A batch of [`DIRECT_BATCH_MIN`] bytes or more is copied into aligned
    /// buffers of the recent-blob tier, written with direct I/O and kept
    /// there for reads: on the VMs measured, the buffered write's copy into
    /// fresh page-cache pages cost more CPU than hashing the data
    /// (benchmarks/batch-update-64k.md), while a copy into buffers the tier
    /// reuses costs a fraction of it.
    fn put_packed(&self, items: &[(Key, Bytes)]) -> Result<u64> {
        let now = self.epoch();
        self.put_packed_as(items, |_| (now, Retention::DEFAULT), true)
    }

    /// The recent tier, when a new batch of `total` bytes is to be kept in
    /// it (and so written with direct I/O where the segment allows it).
    fn tier_for_batch(&self, total: u64) -> Option<&RecentBlobs> {
        self.recent.as_deref().filter(|_| total >= DIRECT_BATCH_MIN)
    }

    /// [`Inner::put_packed`] with each item's last use and retention given
    /// by `stamp(index)`: eviction copies blobs forward keeping both, and
    /// does not keep them (`fresh` false).
    fn put_packed_as(
        &self,
        items: &[(Key, Bytes)],
        stamp: impl Fn(usize) -> (u32, Retention),
        fresh: bool,
    ) -> Result<u64> {
        self.check_running()?;
        let total: u64 = items.iter().map(|(_, data)| data.len() as u64).sum();
        let keep = self.tier_for_batch(total).filter(|_| fresh);
        // A direct write starts and ends on aligned offsets, so it shares no
        // block with a buffered one; the padding is never read.
        let aligned = |offset: u64| offset.div_ceil(ALIGN as u64) * ALIGN as u64;
        let (segment, base, direct, reserved) = {
            let mut active = self.active.lock();
            if active.next_offset > 0
                && aligned(active.next_offset) + aligned(total) > self.segment_size
            {
                let id = active.segment.id + 1;
                let fresh = DiskStore::create_segment(&self.root, id)?;
                self.unsynced.lock().dirs.insert(self.root.join("segments"));
                active
                    .segment
                    .sealed_epoch
                    .store(self.epoch(), Ordering::Relaxed);
                self.segments.write().insert(id, fresh.clone());
                *active = Active {
                    segment: fresh,
                    next_offset: 0,
                };
            }
            let direct = keep.filter(|_| active.segment.direct.is_some());
            let (base, end) = match direct {
                Some(_) => (
                    aligned(active.next_offset),
                    aligned(active.next_offset) + aligned(total),
                ),
                None => (active.next_offset, active.next_offset + total),
            };
            let reserved = end - active.next_offset;
            active.next_offset = end;
            active.segment.len.fetch_add(reserved, Ordering::Relaxed);
            (active.segment.clone(), base, direct, reserved)
        };
        self.total_bytes.fetch_add(reserved, Ordering::Relaxed);
        self.account_written(reserved);

        // A failed write leaves no record, so whatever part of it landed is
        // never read; its reserved range stays a hole in the segment.
        let written = match (direct, &segment.direct) {
            (Some(recent), Some(file)) => {
                self.write_packed_direct(&segment, file, items, base, recent)
            }
            // Written from the items themselves: joining them first cost a
            // copy and, for a batch of megabytes, fresh pages to fault in.
            _ => {
                let parts: Vec<&[u8]> = items.iter().map(|(_, data)| &data[..]).collect();
                write_all_vectored_at(&segment.file, &parts, base)
            }
        };
        written
            .map_err(self.io_err(format!("appending {total} bytes to segment {}", segment.id)))?;
        self.unsynced.lock().segments.insert(segment.id);

        let mut records = Vec::with_capacity(items.len() * RECORD_LEN);
        let mut offset = base;
        let mut entries = Vec::with_capacity(items.len());
        for (i, (key, data)) in items.iter().enumerate() {
            let (atime, retention) = stamp(i);
            let entry = Entry::new(
                Location::Packed {
                    segment: segment.id,
                    offset,
                },
                data.len() as u64,
                atime,
                crc32c::crc32c(data),
                retention,
            );
            entry.record(*key).encode(&mut records);
            entries.push((*key, entry));
            offset += data.len() as u64;
        }
        let (journal_end, _) = self.append_journal(&records, &entries)?;
        self.maybe_evict();
        Ok(journal_end)
    }

    /// Writes a batch with direct I/O at `offset` (aligned) of `segment`,
    /// through `file`, its direct descriptor. A batch whose every blob the
    /// recent tier keeps is written behind its acknowledgement, once its
    /// range is reserved (see [`behind`]); any other is written now, and
    /// its content-addressed blobs kept if the tier gave the buffers.
    fn write_packed_direct(
        &self,
        segment: &Segment,
        file: &Arc<File>,
        items: &[(Key, Bytes)],
        offset: u64,
        recent: &RecentBlobs,
    ) -> io::Result<()> {
        let batch = AlignedBatch::fill(items, recent);
        let all_kept = batch.from_tier
            && items
                .iter()
                .all(|(key, _)| key.namespace.content_addressed().is_some());
        let end = offset + batch.padded_len();
        // Where the file system cannot reserve, the batch is written now.
        let behind = all_kept && reserve(segment, file, end, self.segment_size)?;
        let landing = match behind {
            true => Landing::default(),
            false => {
                write_buffers_at(file, &batch.buffers, offset)?;
                Landing::landed()
            }
        };
        if batch.from_tier {
            segment.kept.store(true, Ordering::Relaxed);
            recent.insert_many(batch.kept(items), landing.clone());
        }
        if behind {
            self.behind
                .submit(file.clone(), offset, batch.buffers, landing)?;
        }
        Ok(())
    }

    /// Marks the stored blobs among `keys` used now with `retention`, and
    /// journals each changed retention (with the next group commit).
    fn set_retention(&self, keys: &[Key], retention: Retention) -> Result<()> {
        self.check_running()?;
        let now = self.epoch();
        // Under the journal lock, like every index change that is journaled,
        // so a compaction cannot miss it.
        let mut journal = self.journal.lock();
        let mut records = Vec::new();
        for key in keys {
            let mut shard = self.index.shard(key).lock();
            let Some(entry) = shard.get_mut(key) else {
                continue;
            };
            entry.atime = now;
            if entry.retention != retention {
                entry.retention = retention;
                entry.record(*key).encode(&mut records);
            }
        }
        if !records.is_empty() {
            self.append_records(&mut journal, &records)?;
        }
        Ok(())
    }

    /// For blocking writers: with [`Durability::Sync`], commit before returning.
    fn settle_blocking(&self) -> Result<()> {
        match self.config.durability {
            Durability::Sync => self.commit(),
            Durability::GroupCommit => Ok(()),
        }
    }

    /// Appends `records` and makes `entries` visible, under one lock so a
    /// journal compaction sees every visible entry. Returns the logical
    /// journal end (for durability waits) and the entries replaced.
    fn append_journal(
        &self,
        records: &[u8],
        entries: &[(Key, Entry)],
    ) -> Result<(u64, Vec<Option<Entry>>)> {
        let mut journal = self.journal.lock();
        self.append_records(&mut journal, records)?;
        let replaced = entries
            .iter()
            .map(|(key, entry)| self.index.insert(*key, *entry))
            .collect();
        Ok((journal.logical, replaced))
    }

    /// Appends encoded records to the journal (locked by the caller);
    /// returns the new logical end. A failed append (a full disk) may have
    /// written part of them: that part is cut off again, or every later
    /// record would be misaligned and skipped at the next start. If even
    /// that fails, the journal is no longer what the store believes, and
    /// the store stops.
    fn append_records(&self, journal: &mut JournalFile, records: &[u8]) -> Result<u64> {
        self.check_running()?;
        if let Err(error) = (&*journal.file).write_all(records) {
            let error = store_io_error(
                &self.root,
                format!("appending {} bytes to the journal", records.len()),
                error,
            );
            if let Err(cut) = journal.file.set_len(journal.len) {
                return Err(self.stop(StoreError::io(
                    format!("cutting a partial record off the journal after {error}"),
                    cut,
                )));
            }
            return Err(error);
        }
        journal.len += records.len() as u64;
        journal.logical += records.len() as u64;
        Ok(journal.logical)
    }

    /// Moves a verified blob file from `tmp/` into `files/` and journals
    /// it, under the journal lock: no concurrent upload of the same blob
    /// renames over it between the two, so if the record cannot be written
    /// (a full disk) the file can go again, unless it is an earlier upload's.
    /// Returns the entry replaced.
    fn install_file(
        &self,
        key: Key,
        tmp_path: &Path,
        entry: Entry,
        record: &[u8],
    ) -> Result<Option<Entry>> {
        let path = file_path(&self.root, &key);
        let mut journal = self.journal.lock();
        let moved = self.check_running().and_then(|()| {
            fs::rename(tmp_path, &path)
                .map_err(self.io_err(format!("moving blob {key:?} into place")))
        });
        if let Err(e) = moved {
            let _ = fs::remove_file(tmp_path);
            return Err(e);
        }
        if let Err(e) = self.append_records(&mut journal, record) {
            let stored = self.index.shard(&key).lock().get(&key).map(Entry::location);
            if stored != Some(Location::File) {
                let _ = fs::remove_file(&path);
            }
            return Err(e);
        }
        Ok(self.index.insert(key, entry))
    }

    /// Syncs the data written since the last commit: segments, blob files,
    /// and the directories entries were created or renamed in. A failure
    /// stops the store: the caller must not acknowledge or checkpoint
    /// anything this sync was to cover.
    fn sync_unsynced(&self) -> Result<()> {
        let unsynced = std::mem::take(&mut *self.unsynced.lock());
        let segments: Vec<Arc<Segment>> = {
            let all = self.segments.read();
            unsynced
                .segments
                .iter()
                .filter_map(|id| all.get(id).cloned())
                .collect()
        };
        let synced = (|| {
            // Batches written behind their acknowledgement land first.
            self.behind
                .wait()
                .map_err(self.io_err("writing a packed batch"))?;
            for segment in segments {
                segment
                    .file
                    .sync_data()
                    .map_err(self.io_err(format!("syncing segment {}", segment.id)))?;
            }
            for file in &unsynced.files {
                file.sync_all()
                    .map_err(self.io_err("syncing a blob file"))?;
            }
            for dir in &unsynced.dirs {
                fsync_dir(dir).map_err(io_err(format!("syncing {}", dir.display())))?;
            }
            Ok(())
        })();
        synced.map_err(|e| self.stop(e))
    }

    /// Whether the journal holds so many replaced or evicted records that
    /// rewriting it is worth a short pause of writers.
    fn journal_needs_compaction(&self) -> bool {
        let len = self.journal.lock().len;
        let live = self.index.len() as u64 * RECORD_LEN as u64;
        len > self.config.journal_compaction_min_bytes.max(2 * live)
            && len >= self.compaction_retry_bytes.load(Ordering::Relaxed)
    }

    /// Rewrites the journal with one record per live entry. Writers wait
    /// meanwhile; everything the new journal names is synced first, so it
    /// is trusted whole. If there is no room for the new journal, the old
    /// one stays and the next attempt waits until it has grown by a quarter.
    fn compact_journal(&self) -> Result<()> {
        let started = Instant::now();
        let _serialized = self.commit_lock.lock();
        self.check_running()?;
        let mut journal = self.journal.lock();
        self.sync_unsynced()?;
        let mut live = self.index.snapshot();
        // Oldest use first: a restart reads journal order as access order.
        live.sort_by_key(|(_, entry)| entry.atime);
        let mut records = Vec::with_capacity(live.len() * RECORD_LEN);
        for (key, entry) in &live {
            entry.record(*key).encode(&mut records);
        }
        let before = journal.len;
        // What the old journal holds durably: as of the last commit, so
        // the checkpoint on disk is never above it.
        let durable = self.checkpointed.load(Ordering::Relaxed);
        let file = match replace_journal(&self.root, &records, durable) {
            Ok(file) => file,
            Err(ReplaceError::Untouched(e)) => {
                self.compaction_retry_bytes
                    .store(before + before / 4, Ordering::Relaxed);
                return Err(e);
            }
            Err(ReplaceError::Uncertain(e)) => return Err(self.stop(e)),
        };
        journal.file = Arc::new(file);
        journal.len = records.len() as u64;
        journal.trust_limit = u64::MAX;
        self.checkpointed.store(journal.len, Ordering::Relaxed);
        self.committed.send_replace(journal.logical);
        tracing::info!(
            records = live.len(),
            bytes_before = before,
            bytes_after = journal.len,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compacted the journal"
        );
        Ok(())
    }

    /// Group commit: everything appended so far reaches the disk, then the
    /// checkpoint says so. A failed sync stops the store (see
    /// [`Inner::stop`]); a failed checkpoint write does not, as the journal
    /// is durable already and an older checkpoint only means more to
    /// re-verify at the next start.
    fn commit(&self) -> Result<()> {
        let _serialized = self.commit_lock.lock();
        self.check_running()?;
        // Data of every record up to here was registered as unsynced before
        // its record was appended, so the sync below covers it.
        let (logical, file_len, trust_limit, file) = {
            let journal = self.journal.lock();
            (
                journal.logical,
                journal.len,
                journal.trust_limit,
                journal.file.clone(),
            )
        };
        if logical <= *self.committed.borrow() {
            return Ok(());
        }
        self.sync_unsynced()?;
        file.sync_data()
            .map_err(|e| self.stop(store_io_error(&self.root, "syncing the journal", e)))?;
        let checkpoint = file_len.min(trust_limit);
        self.checkpointed.store(checkpoint, Ordering::Relaxed);
        match write_checkpoint(&self.root, checkpoint) {
            Ok(()) => {
                if self.checkpoint_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the checkpoint is written again");
                }
            }
            Err(e) => {
                if !self.checkpoint_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "could not write the checkpoint; the journal is durable, and the next \
                         start re-verifies what the last checkpoint does not cover"
                    );
                }
            }
        }
        self.committed.send_replace(logical);
        Ok(())
    }

    fn maybe_evict(self: &Inner) {
        if self.total_bytes.load(Ordering::Relaxed) <= self.config.max_size_bytes {
            return;
        }
        if self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        // Evict on this thread: writers are already on blocking threads, and
        // a store over budget should push back on them.
        if let Err(e) = self.evict() {
            tracing::warn!(error = %e, "eviction failed");
        }
        self.evicting.store(false, Ordering::Release);
    }

    /// Drops the least recently used data until the store is under 90% of
    /// its budget.
    fn evict(&self) -> Result<()> {
        let started = Instant::now();
        let budget = self.config.max_size_bytes / 10 * 9;
        let total = self.total_bytes.load(Ordering::Relaxed);
        if total <= budget {
            return Ok(());
        }
        // Copying forward reads the blobs it keeps from their segment's file.
        self.behind
            .wait()
            .map_err(|e| self.stop(StoreError::io("writing a packed batch", e)))?;
        let active_id = self.active.lock().segment.id;
        let sealed: Vec<Arc<Segment>> = self
            .segments
            .read()
            .values()
            .filter(|s| s.id != active_id)
            .cloned()
            .collect();
        let mut per_segment: HashMap<u32, Vec<(Key, Entry)>> = HashMap::new();
        let mut files = Vec::new();
        for (key, entry) in self.index.snapshot() {
            match entry.location() {
                Location::Packed { segment, .. } => {
                    per_segment.entry(segment).or_default().push((key, entry))
                }
                Location::File => files.push((key, entry)),
            }
        }
        // Blobs used in the newer half of the remembered history are kept.
        let now = self.epoch();
        let oldest = sealed
            .iter()
            .map(|s| s.sealed_epoch.load(Ordering::Relaxed))
            .chain(files.iter().map(|(_, e)| e.recency()))
            .min()
            .unwrap_or(now);
        let keep_from = oldest + (now.saturating_sub(oldest)).div_ceil(2);

        enum Victim {
            Segment(Arc<Segment>),
            File(Key, u64),
        }
        let mut candidates: Vec<(u32, Victim)> = sealed
            .into_iter()
            .map(|s| (s.sealed_epoch.load(Ordering::Relaxed), Victim::Segment(s)))
            .chain(
                files
                    .into_iter()
                    .map(|(k, e)| (e.recency(), Victim::File(k, e.len))),
            )
            .collect();
        candidates.sort_by_key(|(age, _)| *age);

        let mut remaining = total;
        let (mut dropped, mut copied) = (0u64, 0u64);
        // At most what this round must free: eviction never writes more
        // than was written since the last round.
        let (copy_limit, mut copied_bytes) = (total - budget, 0u64);
        for (_, victim) in candidates {
            if remaining <= budget {
                break;
            }
            match victim {
                Victim::File(key, len) => {
                    // Under the journal lock, like `install_file`: a new
                    // upload of the same blob is either not yet renamed in
                    // (and stays) or already indexed (and this skips it).
                    let _journal = self.journal.lock();
                    if self.index.remove_if_at(&key, Location::File) {
                        let _ = fs::remove_file(file_path(&self.root, &key));
                        if let Some(recent) = &self.recent {
                            recent.remove(&key);
                        }
                        self.total_bytes.fetch_sub(len, Ordering::Relaxed);
                        remaining = remaining.saturating_sub(len);
                        dropped += 1;
                    }
                }
                Victim::Segment(segment) => {
                    let entries = per_segment.remove(&segment.id).unwrap_or_default();
                    let mut keep: Vec<_> = entries
                        .iter()
                        .filter(|(_, e)| e.recency() >= keep_from)
                        .collect();
                    // Copying forward is bounded per round, most recent
                    // first, so a store whose content is all recent or
                    // retained still frees space.
                    keep.sort_by_key(|(_, e)| std::cmp::Reverse(e.recency()));
                    let mut room = copy_limit.saturating_sub(copied_bytes);
                    keep.retain(|(_, e)| {
                        let fits = e.len <= room;
                        room = room.saturating_sub(e.len);
                        fits
                    });
                    for chunk in keep.chunks(256) {
                        let mut items = Vec::with_capacity(chunk.len());
                        let mut stamps = Vec::with_capacity(chunk.len());
                        for (key, entry) in chunk {
                            if let Location::Packed { offset, .. } = entry.location() {
                                let mut data = vec![0u8; entry.len as usize];
                                segment
                                    .file
                                    .read_exact_at(&mut data, offset)
                                    .map_err(io_err(format!("copying {key:?} forward")))?;
                                items.push((*key, Bytes::from(data)));
                                stamps.push((entry.atime, entry.retention));
                            }
                        }
                        let bytes = items.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
                        copied += items.len() as u64;
                        copied_bytes += bytes;
                        self.copied_forward_bytes
                            .fetch_add(bytes, Ordering::Relaxed);
                        remaining += bytes;
                        self.put_packed_as(&items, |i| stamps[i], false)?;
                    }
                    for (key, entry) in &entries {
                        if self.index.remove_if_at(key, entry.location()) {
                            dropped += 1;
                        }
                    }
                    self.segments.write().remove(&segment.id);
                    let _ = fs::remove_file(segment_path(&self.root, segment.id));
                    let len = segment.len.load(Ordering::Relaxed);
                    self.total_bytes.fetch_sub(len, Ordering::Relaxed);
                    remaining = remaining.saturating_sub(len);
                }
            }
        }
        self.evicted_entries.fetch_add(dropped, Ordering::Relaxed);
        self.evicted_bytes
            .fetch_add(total.saturating_sub(remaining), Ordering::Relaxed);
        tracing::info!(
            dropped,
            copied_forward = copied,
            size_bytes = self.total_bytes.load(Ordering::Relaxed),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "evicted least recently used blobs"
        );
        Ok(())
    }
}

/// The group-commit loop. It holds the store only while committing, so
/// dropping the store (which commits one last time) also ends the thread.
fn committer(inner: Weak<Inner>, wakeup: Arc<Wakeup>, interval: Duration) {
    loop {
        {
            let mut woken = wakeup.flag.lock();
            if !*woken {
                wakeup.condvar.wait_for(&mut woken, interval);
            }
            *woken = false;
        }
        let Some(store) = inner.upgrade() else { return };
        if store.stopped.get().is_some() {
            // Stopped: nothing to commit ever again (the error was logged).
        } else if let Err(e) = store.commit() {
            tracing::error!(error = %e, "group commit failed");
        } else if store.journal_needs_compaction() {
            if let Err(e) = store.compact_journal() {
                tracing::error!(error = %e, "journal compaction failed");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.stopped.get().is_some() {
            // Nothing may be committed after a failed sync.
        } else if let Err(e) = self.commit() {
            tracing::error!(error = %e, "final commit failed");
        }
        self.commit_wakeup.wake();
    }
}

/// Streams a large blob into `tmp/`; commit renames it into `files/`.
struct FileWriter {
    store: Arc<Inner>,
    key: Key,
    size: u64,
    written: u64,
    tmp_path: PathBuf,
    sink: Option<DirectFileSink>,
}

impl FileWriter {
    /// What a failed write was doing, for the error (the store's directory
    /// is added by [`store_io_error`]).
    fn writing(&self) -> String {
        let name = self.tmp_path.file_name().unwrap_or_default();
        format!(
            "writing blob {:?} to tmp/{}",
            self.key,
            name.to_string_lossy()
        )
    }
}

impl BlobWriter for FileWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        if self.written + data.len() as u64 > self.size {
            return Err(StoreError::SizeMismatch(format!(
                "received more than the announced {} bytes",
                self.size
            )));
        }
        let sink = self.sink.as_mut().expect("open until commit");
        sink.write(data)
            .map_err(|e| store_io_error(&self.store.root, self.writing(), e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<()> {
        if self.written != self.size {
            return Err(StoreError::SizeMismatch(format!(
                "received {} bytes, announced {}",
                self.written, self.size
            )));
        }
        let file = self
            .sink
            .take()
            .expect("open until commit")
            .finish(self.size)
            .map_err(|e| store_io_error(&self.store.root, self.writing(), e));
        let (file, kept) = match file {
            Ok(written) => written,
            Err(e) => {
                let _ = fs::remove_file(&self.tmp_path);
                return Err(e);
            }
        };
        let path = file_path(&self.store.root, &self.key);
        let parent = path
            .parent()
            .expect("blob files live in a fan-out directory");
        let new_dir = match create_private_dir(parent) {
            Ok(new_dir) => new_dir,
            Err(e) => {
                let _ = fs::remove_file(&self.tmp_path);
                return Err(store_io_error(
                    &self.store.root,
                    format!("creating {}", parent.display()),
                    e,
                ));
            }
        };
        {
            // Before the record exists, so the commit that makes the record
            // durable syncs all of this first.
            let mut unsynced = self.store.unsynced.lock();
            unsynced.files.push(file);
            unsynced.dirs.insert(parent.to_path_buf());
            if new_dir {
                unsynced.dirs.insert(self.store.root.join("files"));
            }
        }
        let entry = Entry::new(
            Location::File,
            self.size,
            self.store.epoch(),
            0,
            Retention::DEFAULT,
        );
        let mut record = Vec::with_capacity(RECORD_LEN);
        entry.record(self.key).encode(&mut record);
        let replaced = self
            .store
            .install_file(self.key, &self.tmp_path, entry, &record)?;
        if let (Some(recent), Some(kept)) = (&self.store.recent, kept) {
            recent.insert(self.key, kept);
        }
        // A concurrent upload of the same blob renamed over the same path:
        // the bytes on disk did not grow.
        if !replaced.is_some_and(|entry| entry.location() == Location::File) {
            self.store
                .total_bytes
                .fetch_add(self.size, Ordering::Relaxed);
        }
        self.store.account_written(self.size);
        self.store.maybe_evict();
        self.store.settle_blocking()
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if self.sink.is_some() {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// Puts of at most this many bytes run on the calling task: they only copy
/// into the page cache, cheaper than a hop to a blocking thread.
const INLINE_PUT_BYTES: u64 = 64 * 1024;

#[async_trait]
impl BlobStore for DiskStore {
    fn stopped(&self) -> Option<String> {
        self.inner.stopped.get().cloned()
    }

    fn usage(&self) -> crate::StoreUsage {
        let inner = &self.inner;
        crate::StoreUsage {
            bytes: inner.total_bytes.load(Ordering::Relaxed),
            entries: inner.index.len() as u64,
            max_bytes: inner.config.max_size_bytes,
            evicted_entries: inner.evicted_entries.load(Ordering::Relaxed),
            evicted_bytes: inner.evicted_bytes.load(Ordering::Relaxed),
            recent_memory_bytes: inner.recent.as_ref().map_or(0, |r| r.memory_bytes() as u64),
        }
    }

    async fn contains(&self, keys: &[Key]) -> Result<Vec<bool>> {
        self.inner.check_running()?;
        let epoch = self.inner.epoch();
        Ok(keys
            .iter()
            .map(|key| self.inner.index.touch(key, epoch).is_some())
            .collect())
    }

    async fn get(&self, key: &Key) -> Result<Option<Blob>> {
        self.inner.get_blocking(key)
    }

    async fn put(&self, key: Key, data: Bytes) -> Result<()> {
        self.put_many(vec![(key, data)])
            .await
            .pop()
            .expect("one result per item")
    }

    async fn put_many(&self, items: Vec<(Key, Bytes)>) -> Vec<Result<()>> {
        let count = items.len();
        let total: u64 = items.iter().map(|(_, d)| d.len() as u64).sum();
        let inner = self.inner.clone();
        let write = move || -> Result<u64> {
            let mut journal_end = 0;
            let max_batch = (inner.segment_size / 4).max(1);
            let (mut start, mut batch_bytes) = (0, 0u64);
            for i in 0..=items.len() {
                let next = items.get(i).map_or(0, |(_, d)| d.len() as u64);
                if i == items.len() || (batch_bytes > 0 && batch_bytes + next > max_batch) {
                    if start < i {
                        journal_end = inner.put_packed(&items[start..i])?;
                    }
                    start = i;
                    batch_bytes = 0;
                }
                batch_bytes += next;
            }
            Ok(journal_end)
        };
        let outcome = if total <= INLINE_PUT_BYTES {
            write()
        } else {
            tokio::task::spawn_blocking(write)
                .await
                .unwrap_or_else(|e| Err(StoreError::io("writing blobs", io::Error::other(e))))
        };
        let outcome = match outcome {
            Ok(journal_end) => self.settle(journal_end).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => (0..count).map(|_| Ok(())).collect(),
            Err(e) => (0..count).map(|_| Err(e.duplicate())).collect(),
        }
    }

    fn keeps_batch_in_memory(&self, total_bytes: u64) -> bool {
        self.inner.tier_for_batch(total_bytes).is_some()
            && self.inner.active.lock().segment.direct.is_some()
    }

    async fn writer(&self, key: Key, size: u64) -> Result<Box<dyn BlobWriter>> {
        self.inner.check_running()?;
        if size <= self.inner.config.max_packed_blob_bytes
            || key.namespace.content_addressed().is_none()
        {
            let inner = self.inner.clone();
            return Ok(Box::new(BufferingWriter::new(size, move |data| {
                inner.put_packed(&[(key, data)])?;
                inner.settle_blocking()
            })));
        }
        let tmp_path = self
            .inner
            .root
            .join("tmp")
            .join(uuid::Uuid::new_v4().to_string());
        let mut sink = DirectFileSink::create(&tmp_path).map_err(|e| {
            store_io_error(
                &self.inner.root,
                format!("creating {}", tmp_path.display()),
                e,
            )
        })?;
        if let Some(recent) = &self.inner.recent {
            sink.keep(recent.buffers());
        }
        Ok(Box::new(FileWriter {
            store: self.inner.clone(),
            key,
            size,
            written: 0,
            tmp_path,
            sink: Some(sink),
        }))
    }

    async fn keys_in_part(
        &self,
        part: u8,
        select: for<'k> fn(&'k Key) -> bool,
    ) -> Result<Vec<(Key, u64)>> {
        self.inner.check_running()?;
        Ok(self.inner.index.keys_in_part(part, select))
    }

    async fn set_retention(&self, keys: &[Key], retention: Retention) -> Result<()> {
        self.inner.set_retention(keys, retention)
    }
}

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod tests;
