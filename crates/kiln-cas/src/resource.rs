//! ByteStream resource names, as REAPI spells them:
//! `{instance}/blobs/{fn/}{hash}/{size}`,
//! `{instance}/compressed-blobs/{compressor}/{fn/}{hash}/{size}`, and the
//! upload forms `{instance}/uploads/{uuid}/...` with optional trailing metadata.

use kiln_store::{Digest, DigestFunction};

/// How the bytes of a resource travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compressor {
    Identity,
    Zstd,
}

impl Compressor {
    /// From REAPI's `Compressor.Value`.
    pub fn from_wire(value: i32) -> Option<Self> {
        match value {
            0 => Some(Compressor::Identity),
            1 => Some(Compressor::Zstd),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobResource {
    pub instance_name: String,
    /// The client's upload id, for writes (`uploads/{uuid}/...`).
    pub upload_id: Option<String>,
    pub compressor: Compressor,
    pub digest: Digest,
}

/// A resource name that does not parse, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("resource name {name:?}: {reason}")]
pub struct ResourceError {
    pub name: String,
    pub reason: String,
}

/// `name` as error messages quote it: a client can send megabytes.
pub(crate) fn abbreviated(name: &str) -> String {
    name.chars().take(300).collect()
}

const KEYWORDS: [&str; 7] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

impl BlobResource {
    pub fn parse_read(name: &str) -> Result<Self, ResourceError> {
        Self::parse(name, false)
    }

    pub fn parse_write(name: &str) -> Result<Self, ResourceError> {
        Self::parse(name, true)
    }

    fn parse(name: &str, upload: bool) -> Result<Self, ResourceError> {
        let fail = |reason: &str| ResourceError {
            name: abbreviated(name),
            reason: reason.to_string(),
        };
        let segments: Vec<&str> = name.split('/').collect();
        let start = segments
            .iter()
            .position(|s| KEYWORDS.contains(s))
            .ok_or_else(|| fail("expected a `blobs`, `compressed-blobs` or `uploads` segment"))?;
        let instance_name = segments[..start].join("/");
        let mut rest = &segments[start..];
        let mut upload_id = None;
        if upload {
            if rest.first() != Some(&"uploads") || rest.len() < 2 {
                return Err(fail(
                    "a write must name `{instance}/uploads/{uuid}/blobs/{hash}/{size}`",
                ));
            }
            // REAPI: `uuid` is a UUID the client generated for this upload.
            if uuid::Uuid::try_parse(rest[1]).is_err() {
                return Err(fail(&format!("upload id {:?} is not a UUID", rest[1])));
            }
            upload_id = Some(rest[1].to_string());
            rest = &rest[2..];
        }
        let compressor = match rest.first() {
            Some(&"blobs") => {
                rest = &rest[1..];
                Compressor::Identity
            }
            Some(&"compressed-blobs") => {
                let compressor = match rest.get(1) {
                    Some(&"zstd") => Compressor::Zstd,
                    Some(other) => {
                        return Err(fail(&format!(
                            "compressor {other:?} is not supported (supported: zstd)"
                        )))
                    }
                    None => return Err(fail("missing compressor")),
                };
                rest = &rest[2..];
                compressor
            }
            _ => return Err(fail("expected `blobs` or `compressed-blobs`")),
        };
        let function = match rest.first().and_then(|s| DigestFunction::from_name(s)) {
            Some(function) if function != DigestFunction::Sha256 => {
                rest = &rest[1..];
                function
            }
            Some(_) => {
                return Err(fail(
                    "the sha256 digest function must be omitted from resource names",
                ))
            }
            None => DigestFunction::Sha256,
        };
        let (hash, size) = match rest {
            [hash, size, ..] => (*hash, *size),
            _ => return Err(fail("expected `{hash}/{size}`")),
        };
        if !upload && rest.len() > 2 && compressor != Compressor::Identity {
            return Err(fail("unexpected segments after `{hash}/{size}`"));
        }
        let size: i64 = size
            .parse()
            .map_err(|_| fail(&format!("size {size:?} is not a non-negative integer")))?;
        let digest = Digest::parse(function, hash, size).map_err(|e| fail(&e.to_string()))?;
        Ok(BlobResource {
            instance_name,
            upload_id,
            compressor,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const UUID: &str = "3e1c6c2a-5b4f-4d2e-9a7b-0c8d1e2f3a4b";

    #[test]
    fn reads_with_and_without_instance() {
        let r = BlobResource::parse_read(&format!("blobs/{HASH}/0")).unwrap();
        assert_eq!(r.instance_name, "");
        assert_eq!(r.digest.size, 0);
        let r = BlobResource::parse_read(&format!("a/b/blobs/{HASH}/12")).unwrap();
        assert_eq!(r.instance_name, "a/b");
        assert_eq!(r.digest.size, 12);
        assert_eq!(r.compressor, Compressor::Identity);
    }

    #[test]
    fn writes_with_uuid_metadata_compression_and_function() {
        let r = BlobResource::parse_write(&format!("main/uploads/{UUID}/blobs/{HASH}/5/some/meta"))
            .unwrap();
        assert_eq!(r.instance_name, "main");
        assert_eq!(r.upload_id.as_deref(), Some(UUID));
        let r = BlobResource::parse_write(&format!(
            "uploads/{UUID}/compressed-blobs/zstd/blake3/{HASH}/5"
        ))
        .unwrap();
        assert_eq!(r.compressor, Compressor::Zstd);
        assert_eq!(r.digest.function, DigestFunction::Blake3);
    }

    #[test]
    fn rejects_bad_names_with_the_reason() {
        for (name, reason) in [
            ("nothing/here".to_string(), "segment"),
            (format!("blobs/{HASH}"), "{hash}/{size}"),
            (format!("blobs/{HASH}/-1"), "negative"),
            (format!("blobs/{HASH}/x"), "not a non-negative integer"),
            ("blobs/abc/1".to_string(), "hex"),
            (format!("compressed-blobs/lz4/{HASH}/1"), "lz4"),
        ] {
            let error = BlobResource::parse_read(&name).unwrap_err().to_string();
            assert!(error.contains(reason), "{name}: {error}");
        }
        assert!(BlobResource::parse_write(&format!("blobs/{HASH}/1")).is_err());
        for upload_id in [
            "u-1",
            "3e1c6c2a-5b4f-4d2e-9a7b",
            "",
            "3e1c6c2a5b4f4d2e9a7b0c8d1e2f3a4g",
        ] {
            let name = format!("i/uploads/{upload_id}/blobs/{HASH}/1");
            let error = BlobResource::parse_write(&name).unwrap_err().to_string();
            assert!(
                error.contains(&format!("upload id {upload_id:?} is not a UUID")),
                "{name}: {error}"
            );
        }
    }
}
