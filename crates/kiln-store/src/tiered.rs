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
        if blob.len() <= self.max_cached_blob {
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
