//! A bounded in-memory store: the hot tier in front of the disk store, or
//! the whole store for throw-away servers. Eviction approximates LRU with two
//! generations: hits move an entry to the young one, and when the young one
//! fills, the old one is dropped whole — O(1) per access, no linked list.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::digest::KeyMap;
use crate::store::BufferingWriter;
use crate::{Blob, BlobStore, BlobWriter, Key, Result, Retention, StoreError};

const SHARDS: usize = 16;

#[derive(Clone)]
pub struct MemoryStore {
    shards: Arc<[Mutex<Generations>]>,
    shard_capacity: u64,
}

#[derive(Default)]
struct Generations {
    young: KeyMap<Bytes>,
    young_bytes: u64,
    old: KeyMap<Bytes>,
}

impl Generations {
    fn get(&mut self, key: &Key, shard_capacity: u64) -> Option<Bytes> {
        if let Some(data) = self.young.get(key) {
            return Some(data.clone());
        }
        let data = self.old.remove(key)?;
        self.insert(*key, data.clone(), shard_capacity);
        Some(data)
    }

    /// The memory store's coarse reading of a [`Retention`]: a lowered one
    /// moves the blob to the old generation, dropped at the next turnover;
    /// any other counts as a use.
    fn retain(&mut self, key: &Key, retention: Retention, shard_capacity: u64) {
        if retention.epochs() >= 0 {
            self.get(key, shard_capacity);
        } else if let Some(data) = self.young.remove(key) {
            self.young_bytes -= data.len() as u64;
            self.old.insert(*key, data);
        }
    }

    fn insert(&mut self, key: Key, data: Bytes, shard_capacity: u64) {
        let len = data.len() as u64;
        if let Some(previous) = self.young.insert(key, data) {
            self.young_bytes -= previous.len() as u64;
        }
        self.old.remove(&key);
        self.young_bytes += len;
        // Each generation holds at most half of the shard's budget.
        if self.young_bytes > shard_capacity / 2 {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
    }
}

impl MemoryStore {
    /// A store holding at most about `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_capacity: (capacity / SHARDS as u64).max(1),
        }
    }

    fn shard(&self, key: &Key) -> &Mutex<Generations> {
        &self.shards[key.hash[0] as usize % SHARDS]
    }

    pub fn get_now(&self, key: &Key) -> Option<Bytes> {
        self.shard(key).lock().get(key, self.shard_capacity)
    }

    /// Stores `data`, silently declining blobs too big to be worth caching.
    pub fn insert(&self, key: Key, data: Bytes) {
        if data.len() as u64 <= self.shard_capacity / 4 {
            self.shard(&key)
                .lock()
                .insert(key, data, self.shard_capacity);
        }
    }

    fn check_fits(&self, key: &Key, size: u64) -> Result<()> {
        if size > self.shard_capacity / 4 {
            return Err(StoreError::TooLarge(format!(
                "blob {key:?} of {size} bytes exceeds what the memory store can hold"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl BlobStore for MemoryStore {
    fn usage(&self) -> crate::StoreUsage {
        let mut usage = crate::StoreUsage {
            max_bytes: self.shard_capacity * self.shards.len() as u64,
            ..Default::default()
        };
        for shard in self.shards.iter() {
            let shard = shard.lock();
            usage.entries += (shard.young.len() + shard.old.len()) as u64;
            usage.bytes += shard.young_bytes;
            usage.bytes += shard.old.values().map(|d| d.len() as u64).sum::<u64>();
        }
        usage
    }

    async fn contains(&self, keys: &[Key]) -> Result<Vec<bool>> {
        Ok(keys.iter().map(|key| self.get_now(key).is_some()).collect())
    }

    async fn get(&self, key: &Key) -> Result<Option<Blob>> {
        Ok(self.get_now(key).map(Blob::Memory))
    }

    async fn put(&self, key: Key, data: Bytes) -> Result<()> {
        self.check_fits(&key, data.len() as u64)?;
        self.insert(key, data);
        Ok(())
    }

    async fn writer(&self, key: Key, size: u64) -> Result<Box<dyn BlobWriter>> {
        self.check_fits(&key, size)?;
        let store = self.clone();
        Ok(Box::new(BufferingWriter::new(size, move |data| {
            store.insert(key, data);
            Ok(())
        })))
    }

    async fn keys_in_part(
        &self,
        part: u8,
        select: for<'k> fn(&'k Key) -> bool,
    ) -> Result<Vec<(Key, u64)>> {
        let shard = self.shards[part as usize % SHARDS].lock();
        Ok(shard
            .young
            .iter()
            .chain(shard.old.iter())
            .filter(|(key, _)| key.hash[0] == part && select(key))
            .map(|(key, data)| (*key, data.len() as u64))
            .collect())
    }

    async fn set_retention(&self, keys: &[Key], retention: Retention) -> Result<()> {
        for key in keys {
            self.shard(key)
                .lock()
                .retain(key, retention, self.shard_capacity);
        }
        Ok(())
    }
}
