//! [`CasCounters`]: what the storage services did since start-up, counted
//! with relaxed atomic adds on the paths themselves and read by the
//! monitoring endpoint when it is scraped. No labels, no locks: counting
//! costs the hot path one uncontended add.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct CasCounters {
    /// Verified blob bytes newly stored (BatchUpdateBlobs, ByteStream
    /// writes, executors' outputs); blobs already held are not counted.
    pub bytes_written: AtomicU64,
    /// Blobs newly stored.
    pub blobs_written: AtomicU64,
    /// Blob bytes sent (ByteStream reads, BatchReadBlobs).
    pub bytes_read: AtomicU64,
    /// Digests FindMissingBlobs was asked about that the CAS holds.
    pub find_missing_present: AtomicU64,
    /// Digests FindMissingBlobs answered as missing.
    pub find_missing_missing: AtomicU64,
    /// Action Cache lookups (GetActionResult and Execute's own) that found
    /// a complete result.
    pub action_cache_hits: AtomicU64,
    /// Action Cache lookups that found nothing, or an incomplete result.
    pub action_cache_misses: AtomicU64,
}

impl CasCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn written(&self, bytes: u64) {
        Self::add(&self.bytes_written, bytes);
        Self::add(&self.blobs_written, 1);
    }

    /// The current value of `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
