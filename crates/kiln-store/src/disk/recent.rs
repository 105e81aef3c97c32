//! Blobs just written with direct I/O, kept in memory in the buffers they
//! were written from, so that reading one back (Bazel downloads an action's
//! outputs right after the executor uploads them) needs neither the disk
//! nor a copy: large blobs, and the blobs of large batches packed into a
//! segment (several blobs share a buffer then, and it returns to the pool
//! once the last of them is dropped from here).
//!
//! The buffers come from one [`BufferPool`] of at most the configured
//! bytes, which never gives memory back to the system: on the VMs measured,
//! faulting fresh pages in costs about as much CPU as hashing the data
//! (benchmarks/recent-blobs.md), so a tier filled again and again must
//! reuse the memory it already has. A write that needs a buffer when the
//! pool is spent makes the least recently used blobs here give theirs back
//! (a blob still being read keeps its buffers until the read ends); when
//! writes under way hold the whole pool, the write goes on without keeping.
//! The file on disk stays the blob's home: this is a cache of it. A blob
//! whose write goes on behind its acknowledgement ([`super::behind`]) is
//! its only copy until the write lands, so it is never given up before.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::behind::Landing;
use super::direct::BufferSource;
use crate::aligned::{AlignedBuf, BufferPool};
use crate::{Key, Pieces};

pub(super) struct RecentBlobs {
    pool: Arc<BufferPool>,
    index: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    blobs: HashMap<Key, (u64, Pieces, Landing)>,
    /// Last use → key, oldest first.
    by_use: BTreeMap<u64, Key>,
    clock: u64,
}

impl Index {
    fn remove(&mut self, key: &Key) -> Option<Pieces> {
        let (used, pieces, _) = self.blobs.remove(key)?;
        self.by_use.remove(&used);
        Some(pieces)
    }

    fn insert(&mut self, key: Key, pieces: Pieces, landing: Landing) {
        // The index may name the replaced blob's place a moment longer: if
        // its write has not landed, the new entry stays held until it has
        // (writes land in order, so the later of the two is enough).
        let landing = match self.blobs.get(&key) {
            Some((_, _, old)) if !old.has_landed() && landing.has_landed() => old.clone(),
            _ => landing,
        };
        self.remove(&key);
        self.clock += 1;
        self.by_use.insert(self.clock, key);
        self.blobs.insert(key, (self.clock, pieces, landing));
    }

    /// Gives up the least recently used blob, unless its write has not
    /// landed; `None` when there is none to give up.
    fn give_up_oldest(&mut self) -> Option<Pieces> {
        let (_, key) = self.by_use.first_key_value()?;
        let key = *key;
        if !self.blobs.get(&key)?.2.has_landed() {
            return None;
        }
        self.remove(&key)
    }

    /// The blob under `key`, if it is `len` bytes long, marked used now.
    fn use_now(&mut self, key: &Key, len: u64) -> Option<Pieces> {
        let (used, pieces, _) = self.blobs.get_mut(key)?;
        if pieces.len() != len {
            return None;
        }
        self.by_use.remove(used);
        self.clock += 1;
        *used = self.clock;
        self.by_use.insert(self.clock, *key);
        Some(pieces.clone())
    }
}

impl RecentBlobs {
    /// A tier of at most `limit_bytes` of buffers of `buffer_bytes`; `None`
    /// when the limit holds no buffer.
    pub(super) fn new(buffer_bytes: usize, limit_bytes: u64) -> Option<Arc<Self>> {
        let limit_bytes = usize::try_from(limit_bytes).unwrap_or(usize::MAX);
        (limit_bytes >= buffer_bytes).then(|| {
            Arc::new(RecentBlobs {
                pool: BufferPool::new(buffer_bytes, limit_bytes),
                index: Mutex::default(),
            })
        })
    }

    /// Buffers for a blob being written: from the pool, else given back by
    /// the least recently used blobs here.
    pub(super) fn buffers(self: &Arc<Self>) -> BufferSource {
        let recent = self.clone();
        Box::new(move || recent.buffer())
    }

    /// A buffer from the pool, else given back by the least recently used
    /// blobs here; `None` when writes and reads under way hold them all.
    pub(super) fn buffer(&self) -> Option<AlignedBuf> {
        loop {
            if let Some(buffer) = self.pool.take() {
                return Some(buffer);
            }
            // Dropped outside the lock: the buffers go back to the pool. The
            // oldest not landed yet means writes in flight hold the rest.
            let oldest = self.index.lock().give_up_oldest()?;
            drop(oldest);
        }
    }

    /// Keeps a blob just written, replacing what was kept under its key.
    pub(super) fn insert(&self, key: Key, parts: Vec<Bytes>) {
        self.insert_many(vec![(key, Pieces::new(parts))], Landing::landed());
    }

    /// Keeps blobs of one batch, written or being written (`landing`),
    /// under one lock.
    pub(super) fn insert_many(&self, blobs: Vec<(Key, Pieces)>, landing: Landing) {
        let mut index = self.index.lock();
        for (key, pieces) in blobs {
            index.insert(key, pieces, landing.clone());
        }
    }

    /// Forgets `key` (its blob was replaced without being kept, or dropped).
    pub(super) fn remove(&self, key: &Key) {
        let removed = self.index.lock().remove(key);
        drop(removed);
    }

    /// The blob kept under `key`, if it is `len` bytes long; a use.
    pub(super) fn get(&self, key: &Key, len: u64) -> Option<Pieces> {
        self.index.lock().use_now(key, len)
    }

    /// Bytes of memory the tier holds (its pool's buffers, in use or free).
    pub(super) fn memory_bytes(&self) -> usize {
        self.pool.made_bytes()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{Index, Landing};
    use crate::{DigestFunction, Pieces};

    #[test]
    fn a_blob_replaced_before_its_write_landed_stays_held_until_it_has() {
        let mut index = Index::default();
        let key = DigestFunction::Sha256.digest_of(b"blob").key();
        let pieces = || Pieces::new(vec![Bytes::from_static(b"blob")]);
        let first = Landing::default();
        index.insert(key, pieces(), first.clone());
        assert!(
            index.give_up_oldest().is_none(),
            "a blob not landed was given up"
        );
        // Written again, at once: the index may still name the first place.
        index.insert(key, pieces(), Landing::landed());
        assert!(
            index.give_up_oldest().is_none(),
            "the replacement was given up before the first write landed"
        );
        first.land();
        assert!(index.give_up_oldest().is_some());
    }
}
