//! Deterministic pseudo-random blob contents. Every byte is a function of a
//! seed, so a blob can be hashed in one pass and streamed again in a second
//! without ever being held in memory whole, and read-back can be verified by
//! regenerating what was sent.

use bytes::Bytes;
use kiln_proto::reapi::Digest;

/// SplitMix64 finaliser: turns related inputs (seed, index) into unrelated
/// generator seeds.
pub fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

/// xorshift64*: several GB/s on one core, far above any hashing or network
/// rate, so generating data never becomes what the benchmark measures.
struct Xorshift {
    state: u64,
}

impl Xorshift {
    fn new(seed: u64) -> Self {
        // The all-zero state is a fixed point of xorshift.
        Self {
            state: mix(seed) | 1,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        let mut words = buffer.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            let last = self.next_u64().to_le_bytes();
            tail.copy_from_slice(&last[..tail.len()]);
        }
    }
}

/// Bytes of pseudo-random pattern a large blob repeats.
const PATTERN_BYTES: usize = 64 << 20;

/// One large blob, produced as a sequence of chunks: a 64 MiB pseudo-random
/// pattern (from the seed) repeated. Chunks are zero-copy slices of it, so
/// the client spends its share of the machine's cores sending, not
/// generating; what the server does (hash, store) does not depend on the
/// content repeating.
#[derive(Clone, Debug)]
pub struct LargeBlob {
    pub seed: u64,
    pub size: u64,
    pub chunk_size: u64,
    pattern: Bytes,
}

impl LargeBlob {
    pub fn new(seed: u64, size: u64, chunk_size: u64) -> Self {
        let length = PATTERN_BYTES.min(size as usize).max(1);
        let mut pattern = vec![0u8; length];
        Xorshift::new(seed).fill(&mut pattern);
        LargeBlob {
            seed,
            size,
            chunk_size,
            pattern: Bytes::from(pattern),
        }
    }

    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    pub fn chunk(&self, index: u64) -> Bytes {
        let start = index * self.chunk_size;
        let length = self.chunk_size.min(self.size.saturating_sub(start)) as usize;
        let pattern_length = self.pattern.len();
        let offset = (start % pattern_length as u64) as usize;
        if offset + length <= pattern_length {
            return self.pattern.slice(offset..offset + length);
        }
        // A chunk that wraps around the pattern's end.
        let mut buffer = Vec::with_capacity(length);
        let mut at = offset;
        while buffer.len() < length {
            let take = (length - buffer.len()).min(pattern_length - at);
            buffer.extend_from_slice(&self.pattern[at..at + take]);
            at = (at + take) % pattern_length;
        }
        Bytes::from(buffer)
    }
}

/// `count` distinct small blobs of `size` bytes each.
#[derive(Clone, Copy, Debug)]
pub struct SmallBlobSet {
    pub seed: u64,
    pub size: u64,
    pub count: usize,
}

impl SmallBlobSet {
    pub fn contents(&self, index: usize) -> Vec<u8> {
        let mut buffer = vec![0u8; self.size as usize];
        Xorshift::new(self.seed ^ mix(self.size) ^ mix(index as u64).rotate_left(17))
            .fill(&mut buffer);
        // The index up front makes blobs distinct even if two seeds collided.
        let prefix = (index as u64).to_le_bytes();
        let prefix_length = prefix.len().min(buffer.len());
        buffer[..prefix_length].copy_from_slice(&prefix[..prefix_length]);
        buffer
    }

    pub fn digest(&self, index: usize) -> Digest {
        kiln_cas::wire::digest_of(&self.contents(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blob_chunks_are_deterministic_and_cover_the_size() {
        let blob = LargeBlob::new(7, 10_000, 4096);
        assert_eq!(blob.chunk_count(), 3);
        let lengths: Vec<usize> = (0..3).map(|i| blob.chunk(i).len()).collect();
        assert_eq!(lengths, [4096, 4096, 1808]);
        assert_eq!(blob.chunk(1), blob.chunk(1));
        assert_ne!(blob.chunk(0), blob.chunk(1));
        // Chunks that straddle the pattern's end wrap around it.
        let long = LargeBlob::new(7, (PATTERN_BYTES + 5000) as u64, 3000);
        let all: Vec<u8> = (0..long.chunk_count())
            .flat_map(|i| long.chunk(i).to_vec())
            .collect();
        assert_eq!(all.len(), PATTERN_BYTES + 5000);
        assert_eq!(&all[PATTERN_BYTES..], &all[..5000]);
    }

    #[test]
    fn small_blobs_are_distinct_and_reproducible() {
        let set = SmallBlobSet {
            seed: 1,
            size: 1024,
            count: 100,
        };
        assert_eq!(set.contents(5), set.contents(5));
        let hashes: std::collections::HashSet<String> =
            (0..set.count).map(|i| set.digest(i).hash).collect();
        assert_eq!(hashes.len(), set.count);
    }
}
