//! The one seam every storage backend implements: [`BlobStore`]. Features
//! (a memory tier, later sharding, replication, existence caching) are
//! wrappers that hold another `BlobStore`, composed once at start-up.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::aligned::AlignedBuf;
use crate::{Key, Result, StoreError};

/// A readable blob: bytes in memory, whole or in [`Pieces`], or a byte
/// range of an open file (the file stays readable even if the store evicts
/// it meanwhile).
#[derive(Clone, Debug)]
pub enum Blob {
    Memory(Bytes),
    Pieces(Pieces),
    File {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
}

/// A blob in memory in consecutive pieces of one length (the last may be
/// shorter), from some offset in the first: a large blob kept in the
/// buffers it was written from, or a packed one in the buffers of its batch.
#[derive(Clone, Debug)]
pub struct Pieces {
    parts: Arc<[Bytes]>,
    part_len: usize,
    /// Where the blob starts in the first part.
    skip: usize,
    len: u64,
}

impl Pieces {
    /// The whole of `parts`, which must all be equally long but the last,
    /// which may be shorter and not empty.
    pub fn new(parts: Vec<Bytes>) -> Self {
        let len = parts.iter().map(|part| part.len() as u64).sum();
        Pieces::within(parts, 0, len)
    }

    /// Bytes `skip..skip + len` of `parts` (as [`Pieces::new`] takes them).
    pub fn within(parts: Vec<Bytes>, skip: usize, len: u64) -> Self {
        let part_len = parts.first().map_or(1, Bytes::len).max(1);
        debug_assert!(parts.iter().rev().skip(1).all(|p| p.len() == part_len));
        debug_assert!(
            skip as u64 + len <= parts.iter().map(|part| part.len() as u64).sum::<u64>(),
            "a range within the parts"
        );
        Pieces {
            parts: parts.into(),
            part_len,
            skip,
            len,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many bytes from `at` (within the blob) to the end of its piece.
    fn to_piece_end(&self, at: u64) -> u64 {
        let part_len = self.part_len as u64;
        (part_len - (self.skip as u64 + at) % part_len).min(self.len - at)
    }

    /// The bytes from `at` to the end of the piece holding `at`, at most
    /// `max`: zero-copy.
    fn slice_from(&self, at: u64, max: u64) -> Bytes {
        let from = self.skip as u64 + at;
        let part = &self.parts[(from / self.part_len as u64) as usize];
        let within = (from % self.part_len as u64) as usize;
        part.slice(within..within + self.to_piece_end(at).min(max) as usize)
    }
}

impl Blob {
    pub fn len(&self) -> u64 {
        match self {
            Blob::Memory(bytes) => bytes.len() as u64,
            Blob::Pieces(pieces) => pieces.len,
            Blob::File { len, .. } => *len,
        }
    }

    /// How many bytes from `offset` on one [`Blob::read_range`] hands out
    /// without copying: up to the end of a piece for [`Blob::Pieces`], the
    /// rest of the blob otherwise.
    pub fn contiguous_len(&self, offset: u64) -> u64 {
        let rest = self.len().saturating_sub(offset);
        match self {
            Blob::Pieces(pieces) if rest > 0 => pieces.to_piece_end(offset),
            _ => rest,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `len` bytes starting at `offset` within the blob. Blocking for
    /// file-backed blobs: call from a blocking context for large ranges.
    pub fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Bytes> {
        let end = offset.saturating_add(len).min(self.len());
        let offset = offset.min(end);
        match self {
            Blob::Memory(bytes) => Ok(bytes.slice(offset as usize..end as usize)),
            Blob::Pieces(pieces) => {
                let first = pieces.slice_from(offset, end - offset);
                if first.len() as u64 == end - offset {
                    return Ok(first);
                }
                let mut joined = BytesMut::with_capacity((end - offset) as usize);
                let mut at = offset;
                while at < end {
                    let part = pieces.slice_from(at, end - at);
                    at += part.len() as u64;
                    joined.extend_from_slice(&part);
                }
                Ok(joined.freeze())
            }
            Blob::File {
                file, offset: base, ..
            } => {
                let want = (end - offset) as usize;
                if want > POOLED_READ_BYTES {
                    // Large reads land in a recycled buffer (see `aligned`).
                    let mut buf = AlignedBuf::new(want);
                    while buf.len < want {
                        let filled = buf.len;
                        let spare = &mut buf.spare()[..want - filled];
                        let read = file.read_at(spare, base + offset + filled as u64)?;
                        if read == 0 {
                            return Err(early_end(want - buf.len));
                        }
                        buf.len += read;
                    }
                    return Ok(buf.into_bytes(0, want));
                }
                // Read into spare capacity: no zero-fill of memory the read
                // overwrites anyway.
                let mut buf = Vec::with_capacity(want);
                while buf.len() < want {
                    let at = base + offset + buf.len() as u64;
                    let read =
                        rustix::io::pread(&**file, rustix::buffer::spare_capacity(&mut buf), at)?;
                    if read == 0 {
                        return Err(early_end(want - buf.len()));
                    }
                }
                Ok(Bytes::from(buf))
            }
        }
    }

    /// The whole blob in memory. Only for blobs known to be small.
    pub async fn into_bytes(self) -> std::io::Result<Bytes> {
        match self {
            Blob::Memory(bytes) => Ok(bytes),
            Blob::Pieces(_) => self.read_range(0, self.len()),
            Blob::File { len, .. } if len <= 64 * 1024 => self.read_range(0, len),
            file_blob => {
                tokio::task::spawn_blocking(move || file_blob.read_range(0, file_blob.len()))
                    .await
                    .map_err(std::io::Error::other)?
            }
        }
    }
}

/// Reads larger than this use pooled buffers instead of fresh allocations.
const POOLED_READ_BYTES: usize = 256 * 1024;

fn early_end(missing: usize) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("blob file ends {missing} bytes early"),
    )
}

/// A blob being written piece by piece. Blocking: drive it from a blocking
/// thread. Dropping it without [`BlobWriter::commit`] discards everything
/// written, so a failed or abandoned upload never becomes visible.
pub trait BlobWriter: Send {
    fn write(&mut self, data: &[u8]) -> Result<()>;
    /// Makes the blob visible. The caller has already verified its content.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// How long a blob is kept under eviction pressure, relative to others:
/// Kiln's reading of REAPI's `ResultsCachePolicy.priority`.
///
/// Stores evict approximately least recently used. A retention shifts a
/// blob's recency by `epochs()` steps of the store's eviction clock (the
/// disk store's clock advances every 1/32 of its size written): a positive
/// shift keeps it as if it had been used that much later, a negative one
/// lets it go as if used that much earlier. Every later use is shifted the
/// same way, and the shift survives restarts. It is bounded, so even the
/// most retained blob is evicted eventually if it stays unused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Retention(i8);

impl Retention {
    /// The server default (REAPI priority 0).
    pub const DEFAULT: Retention = Retention(0);
    /// The largest shift either way, in epochs: two store sizes of writes
    /// for the disk store (whose whole content spans about 32 epochs).
    pub const MAX_EPOCHS: i8 = 64;

    /// A shift of `epochs`, clamped to ±[`Retention::MAX_EPOCHS`].
    pub fn from_epochs(epochs: i32) -> Retention {
        let max = i32::from(Self::MAX_EPOCHS);
        Retention(epochs.clamp(-max, max) as i8)
    }

    /// REAPI's `ResultsCachePolicy.priority`: lower means kept longer, 0 is
    /// the server's default. Priority `p` shifts by `-p` epochs, clamped.
    pub fn from_reapi_priority(priority: i32) -> Retention {
        Retention::from_epochs(priority.saturating_neg())
    }

    pub fn epochs(self) -> i8 {
        self.0
    }

    pub fn is_default(self) -> bool {
        self.0 == 0
    }
}

/// Storage of immutable blobs (CAS) and replaceable entries (Action Cache)
/// by [`Key`]. Callers verify content before writing; stores never see a
/// blob whose digest does not match.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// For each key, whether the store holds it. Counts as an access for
    /// eviction, as clients ask just before relying on a blob.
    async fn contains(&self, keys: &[Key]) -> Result<Vec<bool>>;

    async fn get(&self, key: &Key) -> Result<Option<Blob>>;

    /// Stores a blob that is already whole in memory.
    async fn put(&self, key: Key, data: Bytes) -> Result<()>;

    /// Stores many blobs; one result per item, in order. Backends override
    /// it to write a batch in one go.
    async fn put_many(&self, items: Vec<(Key, Bytes)>) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(items.len());
        for (key, data) in items {
            results.push(self.put(key, data).await);
        }
        results
    }

    /// Whether the store itself keeps a [`BlobStore::put_many`] batch of
    /// `total_bytes` in memory once written (its content-addressed blobs,
    /// while it has room), so a cache in front of it need not copy it.
    fn keeps_batch_in_memory(&self, _total_bytes: u64) -> bool {
        false
    }

    /// Starts a streaming write of a blob of `size` bytes.
    async fn writer(&self, key: Key, size: u64) -> Result<Box<dyn BlobWriter>>;

    /// The stored keys whose first hash byte is `part` and that `select`
    /// keeps, each with its stored length. Walking parts 0 to 255 lists
    /// the whole store a part at a time: for one-off migrations, never
    /// for a request. Does not count as a use.
    async fn keys_in_part(
        &self,
        part: u8,
        select: for<'k> fn(&'k Key) -> bool,
    ) -> Result<Vec<(Key, u64)>>;

    /// Gives the stored blobs among `keys` this [`Retention`] (replacing
    /// any earlier one) and counts it as a use. Absent keys are skipped.
    async fn set_retention(&self, keys: &[Key], retention: Retention) -> Result<()>;

    /// What the store holds and has evicted, for monitoring. Cheap: read
    /// from counters, never by walking the store.
    fn usage(&self) -> StoreUsage {
        StoreUsage::default()
    }

    /// Why the store has stopped taking writes and serving (a failed
    /// sync), if it has; `None` while it works.
    fn stopped(&self) -> Option<String> {
        None
    }
}

/// A store's size and evictions since start-up ([`BlobStore::usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Bytes held (on disk: including what is reserved for segments).
    pub bytes: u64,
    /// Blobs and Action Cache entries held.
    pub entries: u64,
    /// The configured size limit.
    pub max_bytes: u64,
    /// Entries evicted since start-up.
    pub evicted_entries: u64,
    /// Bytes freed by eviction since start-up.
    pub evicted_bytes: u64,
    /// Memory held for recently written large blobs (the disk store's
    /// `recent_blob_bytes`), in use or free for the next.
    pub recent_memory_bytes: u64,
}

/// A writer that gathers the blob in memory and hands it to `finish`:
/// the natural writer for small blobs and memory stores.
pub struct BufferingWriter<F: FnOnce(Bytes) -> Result<()> + Send> {
    buf: BytesMut,
    size: u64,
    finish: Option<F>,
}

impl<F: FnOnce(Bytes) -> Result<()> + Send> BufferingWriter<F> {
    pub fn new(size: u64, finish: F) -> Self {
        BufferingWriter {
            buf: BytesMut::with_capacity(size as usize),
            size,
            finish: Some(finish),
        }
    }
}

impl<F: FnOnce(Bytes) -> Result<()> + Send> BlobWriter for BufferingWriter<F> {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        if self.buf.len() as u64 + data.len() as u64 > self.size {
            return Err(StoreError::SizeMismatch(format!(
                "received more than the announced {} bytes",
                self.size
            )));
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<()> {
        if self.buf.len() as u64 != self.size {
            return Err(StoreError::SizeMismatch(format!(
                "received {} bytes, announced {}",
                self.buf.len(),
                self.size
            )));
        }
        let finish = self.finish.take().expect("commit runs once");
        finish(std::mem::take(&mut self.buf).freeze())
    }
}
