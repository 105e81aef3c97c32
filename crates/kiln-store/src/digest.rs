//! Content digests and store keys. A [`Digest`] is what REAPI clients name a
//! blob by; a [`Key`] is what a store indexes by (a digest's hash, or an
//! Action Cache slot), packed into a small `Copy` value so indexes stay cheap.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hash};

use sha2::Digest as _;

/// Hash functions Kiln accepts. Both produce 32-byte hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    Sha256,
    Blake3,
}

impl DigestFunction {
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// The lower-case name used in resource names (`blobs/blake3/...`).
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(DigestFunction::Sha256),
            "blake3" => Some(DigestFunction::Blake3),
            _ => None,
        }
    }

    /// A streaming hasher for this function.
    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// Hashes `data` in one call.
    pub fn digest_of(self, data: &[u8]) -> Digest {
        let mut hasher = self.hasher();
        hasher.update(data);
        hasher.finish(data.len() as u64)
    }

    /// The digest of the empty blob, which every store holds implicitly.
    pub fn empty(self) -> Digest {
        self.digest_of(&[])
    }
}

/// An incremental hasher over one of the [`DigestFunction`]s.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// Finishes the hash; `size` is the number of bytes that were fed.
    pub fn finish(self, size: u64) -> Digest {
        let (function, hash) = match self {
            Hasher::Sha256(h) => (DigestFunction::Sha256, h.finalize().into()),
            Hasher::Blake3(h) => (DigestFunction::Blake3, *h.finalize().as_bytes()),
        };
        Digest {
            function,
            hash,
            size,
        }
    }
}

/// A blob's identity: hash function, hash and size in bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    pub function: DigestFunction,
    pub hash: [u8; 32],
    pub size: u64,
}

/// Why a digest in a request could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestParseError {
    #[error("hash {hash:?} is not {expected} lower-case hex characters")]
    BadHash { hash: String, expected: usize },
    #[error("size {0} is negative")]
    NegativeSize(i64),
    #[error("size {0:?} is not a non-negative integer")]
    BadSize(String),
}

impl Digest {
    /// Parses a hex hash and a size as they arrive on the wire.
    pub fn parse(
        function: DigestFunction,
        hash_hex: &str,
        size: i64,
    ) -> Result<Self, DigestParseError> {
        if size < 0 {
            return Err(DigestParseError::NegativeSize(size));
        }
        let Some(hash) = decode_lower_hex32(hash_hex.as_bytes()) else {
            return Err(DigestParseError::BadHash {
                hash: hash_hex.chars().take(80).collect(),
                expected: 64,
            });
        };
        Ok(Digest {
            function,
            hash,
            size: size as u64,
        })
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == self.function.empty()
    }

    /// The store key this blob lives under.
    pub fn key(&self) -> Key {
        Key {
            namespace: Namespace::Cas(self.function),
            hash: self.hash,
        }
    }
}

/// Lower-case hex digit values; 0xff marks anything else (REAPI hashes are
/// lower-case only).
const HEX_VALUES: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// Decodes 64 lower-case hex characters. This runs for every digest of
/// every request, so it is a table lookup per character and nothing more.
fn decode_lower_hex32(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut invalid = 0u8;
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let (high, low) = (HEX_VALUES[pair[0] as usize], HEX_VALUES[pair[1] as usize]);
        invalid |= high | low;
        *byte = (high << 4) | (low & 0x0f);
    }
    // Valid digits are < 16, so any 0xff marker sets the high bits.
    (invalid & 0xf0 == 0).then_some(out)
}

impl fmt::Display for Digest {
    /// `hash/size`, as REAPI resource names spell a digest (non-SHA-256
    /// digests are prefixed with their function's name).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.function {
            DigestFunction::Sha256 => write!(f, "{}/{}", self.hash_hex(), self.size),
            other => write!(f, "{}/{}/{}", other.name(), self.hash_hex(), self.size),
        }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Which keyspace a [`Key`] belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespace {
    /// Content-addressed blobs; the key's hash is the content's hash.
    Cas(DigestFunction),
    /// Action Cache entries; the key's hash is [`Key::action_cache`]'s.
    ActionCache,
    /// Markers that an organisation may see a CAS blob; the key's hash is
    /// [`Key::membership`]'s.
    Membership,
}

impl Namespace {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Namespace::Cas(DigestFunction::Sha256) => 1,
            Namespace::Cas(DigestFunction::Blake3) => 2,
            Namespace::ActionCache => 3,
            Namespace::Membership => 4,
        }
    }

    pub(crate) fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Namespace::Cas(DigestFunction::Sha256)),
            2 => Some(Namespace::Cas(DigestFunction::Blake3)),
            3 => Some(Namespace::ActionCache),
            4 => Some(Namespace::Membership),
            _ => None,
        }
    }

    /// Whether entries are named by their content (and can be re-verified).
    pub fn content_addressed(self) -> Option<DigestFunction> {
        match self {
            Namespace::Cas(function) => Some(function),
            Namespace::ActionCache | Namespace::Membership => None,
        }
    }
}

/// What a store indexes by: 33 bytes, `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub namespace: Namespace,
    pub hash: [u8; 32],
}

impl Key {
    /// The Action Cache slot for `action` within organisation `org` (empty
    /// for open access), `instance_name` and, when the request overrode
    /// platform properties by header, the digest of those `overrides`. All
    /// three partition the Action Cache. Without an organisation or
    /// overrides the slot is what it always was; each adds a tagged,
    /// length-prefixed field to what is hashed, so no instance name can
    /// reach another's slot.
    pub fn action_cache(
        org: &str,
        instance_name: &str,
        overrides: Option<&[u8; 32]>,
        action: &Digest,
    ) -> Key {
        let mut h = sha2::Sha256::new();
        h.update(b"kiln-ac-v1\0");
        h.update((instance_name.len() as u64).to_le_bytes());
        h.update(instance_name.as_bytes());
        h.update([Namespace::Cas(action.function).to_byte()]);
        h.update(action.hash);
        h.update(action.size.to_le_bytes());
        if let Some(overrides) = overrides {
            h.update([1]);
            h.update(overrides);
        }
        if !org.is_empty() {
            h.update([2]);
            h.update((org.len() as u64).to_le_bytes());
            h.update(org.as_bytes());
        }
        Key {
            namespace: Namespace::ActionCache,
            hash: h.finalize().into(),
        }
    }

    /// The marker that organisation `org` may see CAS blob `blob`: the blob
    /// is stored once, however many organisations hold it, and each sees it
    /// only through its own marker.
    pub fn membership(org: &str, blob: &Digest) -> Key {
        let mut h = sha2::Sha256::new();
        h.update(b"kiln-member-v1\0");
        h.update((org.len() as u64).to_le_bytes());
        h.update(org.as_bytes());
        h.update([Namespace::Cas(blob.function).to_byte()]);
        h.update(blob.hash);
        h.update(blob.size.to_le_bytes());
        Key {
            namespace: Namespace::Membership,
            hash: h.finalize().into(),
        }
    }

    /// A file-name-safe spelling: `NN-hex`.
    pub fn file_name(&self) -> String {
        format!("{}-{}", self.namespace.to_byte(), hex::encode(self.hash))
    }

    pub fn parse_file_name(name: &str) -> Option<Key> {
        let (ns, hash_hex) = name.split_once('-')?;
        let namespace = Namespace::from_byte(ns.parse().ok()?)?;
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hash_hex, &mut hash).ok()?;
        Some(Key { namespace, hash })
    }
}

/// A key's hash bytes are already uniformly distributed: hashing them again
/// (SipHash, per lookup) would be wasted work on the hottest paths.
impl Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let word = u64::from_le_bytes(self.hash[8..16].try_into().expect("8 bytes"));
        state.write_u64(word ^ self.namespace.to_byte() as u64);
    }
}

/// The hasher for [`KeyMap`]: passes [`Key`]'s pre-mixed word through.
#[derive(Default)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 ^= value;
    }
}

/// A hash map keyed by [`Key`], without rehashing the key.
pub type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}:{}", self.namespace, hex::encode(self.hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_sha256_is_the_well_known_digest() {
        let empty = DigestFunction::Sha256.empty();
        assert_eq!(
            empty.hash_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(empty.is_empty_blob());
    }

    #[test]
    fn parse_rejects_bad_hex_and_negative_sizes() {
        let good = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(Digest::parse(DigestFunction::Sha256, good, 0).is_ok());
        assert!(matches!(
            Digest::parse(DigestFunction::Sha256, &good.to_uppercase(), 0),
            Err(DigestParseError::BadHash { .. })
        ));
        assert!(matches!(
            Digest::parse(DigestFunction::Sha256, &good[1..], 0),
            Err(DigestParseError::BadHash { .. })
        ));
        assert_eq!(
            Digest::parse(DigestFunction::Sha256, good, -1),
            Err(DigestParseError::NegativeSize(-1))
        );
    }

    #[test]
    fn hex_decoding_accepts_exactly_lower_case_hex() {
        let hash: String = (0..32).map(|i| format!("{:02x}", i * 8 + 1)).collect();
        let decoded = decode_lower_hex32(hash.as_bytes()).unwrap();
        assert_eq!(hex::encode(decoded), hash);
        for bad in ["g", "G", "A", " ", "/"] {
            let mut text = hash.clone();
            text.replace_range(10..11, bad);
            assert_eq!(decode_lower_hex32(text.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn action_cache_keys_differ_by_instance() {
        let d = DigestFunction::Sha256.digest_of(b"action");
        assert_ne!(
            Key::action_cache("", "a", None, &d),
            Key::action_cache("", "b", None, &d)
        );
        assert_eq!(
            Key::action_cache("", "a", None, &d),
            Key::action_cache("", "a", None, &d)
        );
        let overrides = [7u8; 32];
        assert_ne!(
            Key::action_cache("", "a", Some(&overrides), &d),
            Key::action_cache("", "a", None, &d)
        );
        assert_ne!(
            Key::action_cache("", "a", Some(&overrides), &d),
            Key::action_cache("", "a", Some(&[8u8; 32]), &d)
        );
    }

    #[test]
    fn action_cache_keys_differ_by_organisation() {
        let d = DigestFunction::Sha256.digest_of(b"action");
        let of = |org| Key::action_cache(org, "a", None, &d);
        assert_ne!(of("acme"), of(""));
        assert_ne!(of("acme"), of("other"));
        assert_eq!(of("acme"), of("acme"));
        // The organisation cannot be forged through the instance name.
        assert_ne!(of("acme"), Key::action_cache("", "a\u{2}acme", None, &d));
    }

    #[test]
    fn file_names_round_trip() {
        let key = DigestFunction::Blake3.digest_of(b"x").key();
        assert_eq!(Key::parse_file_name(&key.file_name()), Some(key));
    }
}
