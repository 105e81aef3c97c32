//! Conversions between REAPI wire digests and Kiln's typed ones: the one
//! place a `kiln_store::Digest` becomes a `reapi::Digest` (and back), so
//! every crate that hashes bytes for the wire hashes them with
//! `kiln_store::DigestFunction` and converts them here.

use kiln_proto::reapi;
use kiln_store::{Digest, DigestFunction};

use crate::error::{CasError, Result};

/// The digest function a request asks for: its `digest_function` field, or
/// SHA-256 when unset (the REAPI default for 64-hex-character hashes).
pub fn digest_function(value: i32) -> Result<DigestFunction> {
    match reapi::digest_function::Value::try_from(value) {
        Ok(reapi::digest_function::Value::Unknown) | Ok(reapi::digest_function::Value::Sha256) => {
            Ok(DigestFunction::Sha256)
        }
        Ok(reapi::digest_function::Value::Blake3) => Ok(DigestFunction::Blake3),
        _ => Err(CasError::InvalidArgument(format!(
            "digest function {value} is not supported (supported: SHA256, BLAKE3)"
        ))),
    }
}

pub fn digest_function_to_wire(function: DigestFunction) -> i32 {
    match function {
        DigestFunction::Sha256 => reapi::digest_function::Value::Sha256 as i32,
        DigestFunction::Blake3 => reapi::digest_function::Value::Blake3 as i32,
    }
}

/// Parses a wire digest; `field` names where it came from for the error.
pub fn parse_digest(
    function: DigestFunction,
    digest: Option<&reapi::Digest>,
    field: &str,
) -> Result<Digest> {
    let digest = digest.ok_or_else(|| CasError::InvalidArgument(format!("{field} is missing")))?;
    Digest::parse(function, &digest.hash, digest.size_bytes).map_err(|e| {
        CasError::InvalidArgument(format!(
            "{field} {}/{} is malformed: {e}",
            digest.hash.chars().take(80).collect::<String>(),
            digest.size_bytes
        ))
    })
}

pub fn to_wire(digest: &Digest) -> reapi::Digest {
    reapi::Digest {
        hash: digest.hash_hex(),
        size_bytes: digest.size as i64,
    }
}

/// The SHA-256 wire digest of `data`: what executors, `kiln bench` and tests
/// name the blobs they write by (SHA-256 is the REAPI default).
pub fn digest_of(data: &[u8]) -> reapi::Digest {
    to_wire(&DigestFunction::Sha256.digest_of(data))
}
