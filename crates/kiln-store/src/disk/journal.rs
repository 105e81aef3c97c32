//! The journal: an append-only log of fixed-size records, one per stored
//! blob, saying where its bytes live. It is the disk store's index on disk:
//! start-up replays it instead of scanning blob data, and a record past the
//! last checkpoint is trusted only after its data is re-verified.

use crate::digest::Namespace;
use crate::{Key, Retention};

/// Bytes per journal record.
pub const RECORD_LEN: usize = 72;

/// Where a blob's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// A byte range of a pack segment (small blobs and Action Cache entries).
    Packed { segment: u32, offset: u64 },
    /// A file of its own under `files/` (large blobs).
    File,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: Key,
    pub location: Location,
    pub len: u64,
    /// crc32c of the payload (packed blobs only; files are re-hashed).
    pub payload_crc: u32,
    /// Journals written before retention existed hold 0 here: the default.
    pub retention: Retention,
}

impl Record {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut buf = [0u8; RECORD_LEN];
        buf[0] = self.key.namespace.to_byte();
        let (kind, segment, offset) = match self.location {
            Location::Packed { segment, offset } => (1u8, segment, offset),
            Location::File => (2u8, 0, 0),
        };
        buf[1] = kind;
        buf[2] = self.retention.epochs() as u8;
        buf[4..8].copy_from_slice(&self.payload_crc.to_le_bytes());
        buf[8..40].copy_from_slice(&self.key.hash);
        buf[40..44].copy_from_slice(&segment.to_le_bytes());
        buf[44..52].copy_from_slice(&offset.to_le_bytes());
        buf[52..60].copy_from_slice(&self.len.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..64]);
        buf[64..68].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&buf);
    }

    /// Decodes one record; `None` for a torn or foreign record.
    pub fn decode(buf: &[u8]) -> Option<Record> {
        if buf.len() < RECORD_LEN {
            return None;
        }
        let stored_crc = u32::from_le_bytes(buf[64..68].try_into().ok()?);
        if crc32c::crc32c(&buf[..64]) != stored_crc {
            return None;
        }
        let namespace = Namespace::from_byte(buf[0])?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&buf[8..40]);
        let segment = u32::from_le_bytes(buf[40..44].try_into().ok()?);
        let offset = u64::from_le_bytes(buf[44..52].try_into().ok()?);
        let location = match buf[1] {
            1 => Location::Packed { segment, offset },
            2 => Location::File,
            _ => return None,
        };
        Some(Record {
            key: Key { namespace, hash },
            location,
            len: u64::from_le_bytes(buf[52..60].try_into().ok()?),
            payload_crc: u32::from_le_bytes(buf[4..8].try_into().ok()?),
            retention: Retention::from_epochs(i32::from(buf[2] as i8)),
        })
    }
}

/// The checkpoint file's content: the journal length known to be durable.
pub fn encode_checkpoint(durable_len: u64) -> [u8; 12] {
    let mut buf = [0u8; 12];
    buf[..8].copy_from_slice(&durable_len.to_le_bytes());
    let crc = crc32c::crc32c(&buf[..8]);
    buf[8..].copy_from_slice(&crc.to_le_bytes());
    buf
}

pub fn decode_checkpoint(buf: &[u8]) -> Option<u64> {
    if buf.len() != 12 || crc32c::crc32c(&buf[..8]).to_le_bytes() != buf[8..12] {
        return None;
    }
    Some(u64::from_le_bytes(buf[..8].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DigestFunction;

    #[test]
    fn records_round_trip_and_detect_tearing() {
        let record = Record {
            key: DigestFunction::Sha256.digest_of(b"hello").key(),
            location: Location::Packed {
                segment: 7,
                offset: 4096,
            },
            len: 5,
            payload_crc: crc32c::crc32c(b"hello"),
            retention: Retention::from_epochs(-3),
        };
        let mut buf = Vec::new();
        record.encode(&mut buf);
        assert_eq!(buf.len(), RECORD_LEN);
        assert_eq!(Record::decode(&buf), Some(record));
        buf[50] ^= 1;
        assert_eq!(Record::decode(&buf), None);
        assert_eq!(Record::decode(&buf[..10]), None);
    }

    #[test]
    fn checkpoints_round_trip() {
        assert_eq!(decode_checkpoint(&encode_checkpoint(123)), Some(123));
        let mut bad = encode_checkpoint(123);
        bad[0] = 9;
        assert_eq!(decode_checkpoint(&bad), None);
    }
}
