//! A memory tier in front of a slower store. Writes go through to the slow
//! store (which stays the source of truth); small blobs are also kept in
//! memory, and small blobs read from the slow store are promoted.
//!
//! The memory tier keeps its own copy of what is written: a caller's data
//! may be a slice of a larger buffer (a received HTTP/2 frame, a whole
//! request), which a cached slice would keep alive unseen by the tier's
//! byte budget.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Blob, BlobStore, BlobWriter, Key, MemoryStore, Result, Retention};

pub struct TieredStore {
    fast: MemoryStore,
    slow: Arc<dyn BlobStore>,
    /// Blobs up to this size are cached in memory.
    max_cached_blob: u64,
}

impl TieredStore {
    pub fn new(fast: MemoryStore, slow: Arc<dyn BlobStore>, max_cached_blob: u64) -> Self {
        TieredStore {
            fast,
            slow,
            max_cached_blob,
        }
    }
}

#[async_trait]
impl BlobStore for TieredStore {
    fn usage(&self) -> crate::StoreUsage {
        // The slow store holds everything; the fast tier is a cache of it.
        self.slow.usage()
    }

    fn stopped(&self) -> Option<String> {
        self.slow.stopped()
    }

    async fn contains(&self, keys: &[Key]) -> Result<Vec<bool>> {
        // The slow store knows everything and keeps its own LRU state fresh.
        self.slow.contains(keys).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Blob>> {
        if let Some(data) = self.fast.get_now(key) {
            return Ok(Some(Blob::Memory(data)));
        }
        let Some(blob) = self.slow.get(key).await? else {
            return Ok(None);
        };
        // Pieces are in memory already, in the slow store's buffers: a
        // slice of them here would pin a whole buffer unseen by the budget.
        if blob.len() <= self.max_cached_blob && !matches!(blob, Blob::Pieces(_)) {
            let data = blob
                .into_bytes()
                .await
                .map_err(|e| crate::StoreError::io(format!("reading {key:?}"), e))?;
            self.fast.insert(*key, data.clone());
            return Ok(Some(Blob::Memory(data)));
        }
        Ok(Some(blob))
    }

    async fn put(&self, key: Key, data: Bytes) -> Result<()> {
        self.slow.put(key, data.clone()).await?;
        if data.len() as u64 <= self.max_cached_blob {
            self.fast.insert(key, Bytes::copy_from_slice(&data));
        }
        Ok(())
    }

    async fn put_many(&self, items: Vec<(Key, Bytes)>) -> Vec<Result<()>> {
        let total = items.iter().map(|(_, data)| data.len() as u64).sum();
        if self.slow.keeps_batch_in_memory(total) {
            return self.slow.put_many(items).await;
        }
        let results = self.slow.put_many(items.clone()).await;
        for ((key, data), result) in items.into_iter().zip(&results) {
            if result.is_ok() && data.len() as u64 <= self.max_cached_blob {
                self.fast.insert(key, Bytes::copy_from_slice(&data));
            }
        }
        results
    }

    async fn writer(&self, key: Key, size: u64) -> Result<Box<dyn BlobWriter>> {
        // Streamed blobs are written through; a later read promotes small ones.
        self.slow.writer(key, size).await
    }

    async fn keys_in_part(
        &self,
        part: u8,
        select: for<'k> fn(&'k Key) -> bool,
    ) -> Result<Vec<(Key, u64)>> {
        // The fast tier only caches what the slow one holds.
        self.slow.keys_in_part(part, select).await
    }

    async fn set_retention(&self, keys: &[Key], retention: Retention) -> Result<()> {
        self.fast.set_retention(keys, retention).await?;
        self.slow.set_retention(keys, retention).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::TieredStore;
    use crate::{Blob, BlobStore, DigestFunction, MemoryStore};

    #[tokio::test]
    async fn the_memory_tier_holds_its_own_copy_not_a_slice_of_the_callers_buffer() {
        let slow = Arc::new(MemoryStore::new(64 << 20));
        let store = TieredStore::new(MemoryStore::new(64 << 20), slow, 64 << 10);
        // Two blobs sliced out of one received buffer, as a batch's are.
        let received = Bytes::from((0..8192u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let (first, second) = (received.slice(..4096), received.slice(4096..));
        let keys = [&first, &second].map(|data| DigestFunction::Sha256.digest_of(data).key());
        let results = store
            .put_many(vec![(keys[0], first.clone()), (keys[1], second.clone())])
            .await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let received_range = received.as_ptr_range();
        for (key, data) in keys.iter().zip([&first, &second]) {
            let Some(Blob::Memory(cached)) = store.get(key).await.unwrap() else {
                panic!("blob {key:?} is not in the memory tier");
            };
            assert_eq!(&cached, data);
            assert!(
                !received_range.contains(&cached.as_ptr()),
                "the memory tier keeps a slice of the caller's buffer"
            );
        }
    }

    #[tokio::test]
    async fn a_batch_the_disk_store_keeps_in_memory_is_neither_copied_nor_promoted() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) =
            crate::DiskStore::open(crate::DiskStoreConfig::new(dir.path(), 1 << 30)).unwrap();
        let store = TieredStore::new(MemoryStore::new(64 << 20), Arc::new(disk), 64 << 10);
        let batch: Vec<(crate::Key, Bytes)> = (0..40u32)
            .map(|i| {
                let data = Bytes::from(vec![i as u8; 60_000]);
                (DigestFunction::Sha256.digest_of(&data).key(), data)
            })
            .collect();
        assert!(
            store.slow.keeps_batch_in_memory(40 * 60_000),
            "the test directory's file system refuses O_DIRECT: point TMPDIR at a disk"
        );
        let results = store.put_many(batch.clone()).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        for (key, data) in &batch {
            // Read twice: served from the disk store's buffers both times,
            // never copied into the memory tier.
            for _ in 0..2 {
                let blob = store.get(key).await.unwrap().expect("stored");
                assert!(matches!(blob, Blob::Pieces(_)), "{key:?} was copied");
                assert_eq!(&blob.into_bytes().await.unwrap(), data);
            }
            assert!(store.fast.get_now(key).is_none());
        }
        // A single small blob is still cached.
        let small = Bytes::from_static(b"small");
        let key = DigestFunction::Sha256.digest_of(&small).key();
        store.put(key, small.clone()).await.unwrap();
        assert_eq!(store.fast.get_now(&key), Some(small));
    }
}
