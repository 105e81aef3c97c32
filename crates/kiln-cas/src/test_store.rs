//! A memory store for unit tests that counts reads and can be made to
//! fail writes of organisation markers (a full disk, say).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use kiln_store::{Blob, BlobStore, BlobWriter, Key, MemoryStore, Namespace, Retention};

pub(crate) struct TestStore {
    inner: MemoryStore,
    /// `get` calls so far.
    pub gets: AtomicUsize,
    /// While set, writes of organisation markers fail with ENOSPC.
    pub failing_markers: AtomicBool,
}

impl TestStore {
    pub fn new() -> TestStore {
        TestStore {
            inner: MemoryStore::new(64 << 20),
            gets: AtomicUsize::new(0),
            failing_markers: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl BlobStore for TestStore {
    async fn contains(&self, keys: &[Key]) -> kiln_store::Result<Vec<bool>> {
        self.inner.contains(keys).await
    }
    async fn get(&self, key: &Key) -> kiln_store::Result<Option<Blob>> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key).await
    }
    async fn put(&self, key: Key, data: Bytes) -> kiln_store::Result<()> {
        if key.namespace == Namespace::Membership && self.failing_markers.load(Ordering::Relaxed) {
            let full = std::io::Error::from_raw_os_error(28);
            return Err(kiln_store::StoreError::io("writing a marker", full));
        }
        self.inner.put(key, data).await
    }
    async fn writer(&self, key: Key, size: u64) -> kiln_store::Result<Box<dyn BlobWriter>> {
        self.inner.writer(key, size).await
    }
    async fn keys_in_part(
        &self,
        part: u8,
        select: for<'k> fn(&'k Key) -> bool,
    ) -> kiln_store::Result<Vec<(Key, u64)>> {
        self.inner.keys_in_part(part, select).await
    }
    async fn set_retention(&self, keys: &[Key], r: Retention) -> kiln_store::Result<()> {
        self.inner.set_retention(keys, r).await
    }
}
