//! SHA-256 (FIPS 180-4) for the VM agent, which hashes an action's
//! outputs in the guest so that only those the CAS lacks cross to the host.
//! The agent is built with `rustc` alone, standard library only, so it
//! cannot take a crate: this is the whole function, written from the
//! standard, with the x86 SHA extensions (`sha256rnds2`, `sha256msg1/2`)
//! when the CPU has them, which QEMU's emulation runs as one helper call
//! per instruction rather than dozens of emulated ones. The crate's tests
//! check both paths against `kiln-store`'s hashing.

/// The first 32 bits of the fractional parts of the cube roots of the
/// first 64 primes.
const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// The first 32 bits of the fractional parts of the square roots of the
/// first 8 primes.
const INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A running SHA-256: `update` with the bytes in order, then `finish`.
pub struct Sha256 {
    state: [u32; 8],
    /// Bytes not yet making a whole block.
    pending: [u8; 64],
    pending_len: usize,
    total: u64,
    extensions: bool,
}

impl Default for Sha256 {
    fn default() -> Sha256 {
        Sha256::new()
    }
}

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256 {
            state: INITIAL,
            pending: [0; 64],
            pending_len: 0,
            total: 0,
            extensions: has_extensions(),
        }
    }

    /// The same, never using the SHA extensions (to test one path against
    /// the other).
    #[cfg(not(kiln_agent))]
    pub fn portable() -> Sha256 {
        Sha256 {
            extensions: false,
            ..Sha256::new()
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total = self.total.wrapping_add(bytes.len() as u64);
        if self.pending_len > 0 {
            let take = (64 - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < 64 {
                return;
            }
            let block = self.pending;
            self.compress(&block);
            self.pending_len = 0;
        }
        let whole = bytes.len() / 64 * 64;
        if whole > 0 {
            self.compress(&bytes[..whole]);
        }
        let rest = &bytes[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The digest, as 64 lowercase hex digits.
    #[cfg(not(kiln_agent))]
    pub fn finish_hex(self) -> String {
        hex(&self.finish())
    }

    /// The digest.
    pub fn finish(mut self) -> [u8; 32] {
        let bits = self.total.wrapping_mul(8);
        let mut tail = [0u8; 128];
        tail[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
        tail[self.pending_len] = 0x80;
        let length = if self.pending_len < 56 { 64 } else { 128 };
        tail[length - 8..length].copy_from_slice(&bits.to_be_bytes());
        self.compress(&tail[..length]);
        let mut digest = [0u8; 32];
        for (bytes, word) in digest.chunks_exact_mut(4).zip(self.state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }

    /// Runs the compression function over `blocks` (a multiple of 64 bytes).
    fn compress(&mut self, blocks: &[u8]) {
        #[cfg(target_arch = "x86_64")]
        if self.extensions {
            // SAFETY: `extensions` is set only when the CPU reports the
            // SHA, SSSE3 and SSE4.1 instructions `compress_x86` uses.
            unsafe { x86::compress(&mut self.state, blocks) };
            return;
        }
        for block in blocks.chunks_exact(64) {
            compress_portable(&mut self.state, block);
        }
    }
}

/// `digest` as 64 lowercase hex digits.
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn has_extensions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("ssse3")
            && std::arch::is_x86_feature_detected!("sse4.1")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn compress_portable(state: &mut [u32; 8], block: &[u8]) {
    let mut w = [0u32; 64];
    for (t, word) in block.chunks_exact(4).enumerate() {
        w[t] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
    }
    for t in 16..64 {
        let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
        let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16]
            .wrapping_add(s0)
            .wrapping_add(w[t - 7])
            .wrapping_add(s1);
    }
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    for t in 0..64 {
        let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
        let choose = (e & f) ^ (!e & g);
        let t1 = h
            .wrapping_add(s1)
            .wrapping_add(choose)
            .wrapping_add(K[t])
            .wrapping_add(w[t]);
        let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
        let majority = (a & b) ^ (a & c) ^ (b & c);
        let t2 = s0.wrapping_add(majority);
        h = g;
        g = f;
        f = e;
        e = d.wrapping_add(t1);
        d = c;
        c = b;
        b = a;
        a = t1.wrapping_add(t2);
    }
    for (word, add) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
        *word = word.wrapping_add(add);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The compression function with the SHA extensions. They keep the
    /// working variables as two vectors, ABEF and CDGH (high lane first);
    /// each `sha256rnds2` does two rounds, and `sha256msg1`/`sha256msg2`
    /// extend the message schedule four words at a time.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn compress(state: &mut [u32; 8], blocks: &[u8]) {
        // Big-endian words from little-endian loads.
        let byte_swap = _mm_set_epi64x(0x0c0d0e0f08090a0b, 0x0405060700010203);
        let abcd = _mm_loadu_si128(state.as_ptr().cast());
        let efgh = _mm_loadu_si128(state.as_ptr().add(4).cast());
        let cdab = _mm_shuffle_epi32(abcd, 0xB1);
        let efgh = _mm_shuffle_epi32(efgh, 0x1B);
        let mut abef = _mm_alignr_epi8(cdab, efgh, 8);
        let mut cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
        for block in blocks.chunks_exact(64) {
            let (abef_before, cdgh_before) = (abef, cdgh);
            let mut w = [_mm_setzero_si128(); 4];
            for group in 0..16 {
                let words = if group < 4 {
                    let loaded = _mm_loadu_si128(block.as_ptr().add(16 * group).cast());
                    _mm_shuffle_epi8(loaded, byte_swap)
                } else {
                    // W[t-16] + σ0(W[t-15]), + W[t-7], then + σ1(W[t-2]).
                    let (oldest, older, newer, newest) = (
                        w[group % 4],
                        w[(group + 1) % 4],
                        w[(group + 2) % 4],
                        w[(group + 3) % 4],
                    );
                    let partial = _mm_sha256msg1_epu32(oldest, older);
                    let partial = _mm_add_epi32(partial, _mm_alignr_epi8(newest, newer, 4));
                    _mm_sha256msg2_epu32(partial, newest)
                };
                w[group % 4] = words;
                let constants = _mm_loadu_si128(super::K.as_ptr().add(4 * group).cast());
                let scheduled = _mm_add_epi32(words, constants);
                cdgh = _mm_sha256rnds2_epu32(cdgh, abef, scheduled);
                abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(scheduled, 0x0E));
                // Each call leaves the new ABEF in the variable named for
                // CDGH, and the old ABEF is the new CDGH: after two calls
                // the names are right again.
            }
            abef = _mm_add_epi32(abef, abef_before);
            cdgh = _mm_add_epi32(cdgh, cdgh_before);
        }
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        let abcd = _mm_blend_epi16(feba, dchg, 0xF0);
        let efgh = _mm_alignr_epi8(dchg, feba, 8);
        _mm_storeu_si128(state.as_mut_ptr().cast(), abcd);
        _mm_storeu_si128(state.as_mut_ptr().add(4).cast(), efgh);
    }
}
