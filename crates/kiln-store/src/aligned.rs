//! Memory aligned for direct I/O, recycled through a small pool so that hot
//! paths do not fault in fresh pages for every buffer. (Large `Vec`s come
//! from `mmap` and go back on free; on the VMs measured, faulting their
//! pages in again cost more than the copy into them.)
//!
//! Safe code only: a `Vec` is over-allocated and used from its first
//! aligned address on (its heap block does not move when the `Vec` does).

use std::sync::Arc;

use parking_lot::Mutex;

/// Direct I/O needs addresses, offsets and lengths aligned to the device's
/// logical block size; 4 KiB covers every common device.
pub const ALIGN: usize = 4096;

/// Buffers kept for reuse, and the largest kept.
const POOL_BUFFERS: usize = 16;
const POOL_MAX_CAPACITY: usize = 8 << 20;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    capacity: usize,
    /// Bytes of data, from the aligned start.
    pub len: usize,
    /// The [`BufferPool`] the buffer returns to; the shared pool when none.
    home: Option<Arc<BufferPool>>,
}

/// Buffers of one size, at most `limit_bytes` of them, that go back to the
/// pool when dropped and are never handed back to the system: memory that
/// stays faulted in, for a tier that is filled again and again.
pub struct BufferPool {
    buffer_bytes: usize,
    limit_bytes: usize,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: Vec<Vec<u8>>,
    /// Buffers made so far (free or in use).
    made: usize,
}

impl BufferPool {
    pub fn new(buffer_bytes: usize, limit_bytes: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            buffer_bytes: buffer_bytes.div_ceil(ALIGN) * ALIGN,
            limit_bytes,
            state: Mutex::default(),
        })
    }

    /// A free buffer, or a new one while the pool is under its limit.
    pub fn take(self: &Arc<Self>) -> Option<AlignedBuf> {
        let raw = {
            let mut state = self.state.lock();
            match state.free.pop() {
                Some(raw) => raw,
                None if (state.made + 1) * self.buffer_bytes <= self.limit_bytes => {
                    state.made += 1;
                    Vec::new() // allocated below, outside the lock
                }
                None => return None,
            }
        };
        let raw = match raw.is_empty() {
            true => vec![0u8; self.buffer_bytes + ALIGN],
            false => raw,
        };
        Some(AlignedBuf::from_raw(
            raw,
            self.buffer_bytes,
            Some(self.clone()),
        ))
    }

    /// Bytes of buffers made (free or in use): what the pool holds of memory.
    pub fn made_bytes(&self) -> usize {
        self.state.lock().made * self.buffer_bytes
    }
}

impl AlignedBuf {
    /// A buffer of at least `capacity` bytes (rounded up to [`ALIGN`]).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.div_ceil(ALIGN) * ALIGN;
        let reused = {
            let mut pool = POOL.lock();
            pool.iter()
                .position(|raw| raw.len() >= capacity + ALIGN)
                .map(|i| pool.swap_remove(i))
        };
        let raw = reused.unwrap_or_else(|| vec![0u8; capacity + ALIGN]);
        AlignedBuf::from_raw(raw, capacity, None)
    }

    fn from_raw(raw: Vec<u8>, capacity: usize, home: Option<Arc<BufferPool>>) -> Self {
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            raw,
            start,
            capacity,
            len: 0,
            home,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The unfilled part.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.raw[self.start + self.len..self.start + self.capacity]
    }

    /// Appends as much of `data` as fits; returns how much that was.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(data.len());
        spare[..n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// The data, zero-padded to a whole number of aligned blocks.
    pub fn padded(&mut self) -> &[u8] {
        let padded = self.len.div_ceil(ALIGN) * ALIGN;
        self.raw[self.start + self.len..self.start + padded].fill(0);
        &self.raw[self.start..self.start + padded]
    }
}

/// A filled range of a pooled buffer, handed out as `Bytes` without a copy;
/// the buffer returns to the pool when the last `Bytes` is dropped.
struct PooledRange {
    buf: AlignedBuf,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for PooledRange {
    fn as_ref(&self) -> &[u8] {
        let from = self.buf.start + self.start;
        &self.buf.raw[from..from + self.len]
    }
}

impl AlignedBuf {
    /// Bytes `start..start + len` of the filled data, zero-copy.
    pub fn into_bytes(self, start: usize, len: usize) -> bytes::Bytes {
        assert!(start + len <= self.len, "a range within the data");
        bytes::Bytes::from_owner(PooledRange {
            buf: self,
            start,
            len,
        })
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(home) = &self.home {
            home.state.lock().free.push(std::mem::take(&mut self.raw));
            return;
        }
        if self.raw.len() <= POOL_MAX_CAPACITY + ALIGN {
            let mut pool = POOL.lock();
            if pool.len() < POOL_BUFFERS {
                pool.push(std::mem::take(&mut self.raw));
            }
        }
    }
}
