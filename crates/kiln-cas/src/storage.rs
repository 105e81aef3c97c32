//! [`Storage`]: the REAPI view of a [`BlobStore`], shared by all storage
//! services. It owns digest verification (nothing unverified reaches the
//! store) and the empty blob (always present, never stored).

use std::sync::Arc;

use bytes::Bytes;
use kiln_store::{Blob, BlobStore, Digest, DigestFunction, Key};

use crate::counters::CasCounters;
use crate::error::{CasError, Result};
use crate::resource::Compressor;
use crate::tenancy::{Tenancy, MARKER};

/// Service limits, advertised in the capabilities where REAPI has a field.
#[derive(Clone, Debug)]
pub struct StorageLimits {
    /// Largest total of blob bytes in one BatchUpdateBlobs/BatchReadBlobs.
    pub max_batch_total_size_bytes: u64,
    /// Largest total of stdout/stderr/file bytes inlined into one ActionResult.
    pub max_inline_bytes: u64,
    /// Size of the chunks ByteStream.Read sends.
    pub read_chunk_bytes: usize,
    /// A ByteStream Write whose client sends nothing for this long is
    /// ended (DEADLINE_EXCEEDED) and its resources freed; None: never.
    pub idle_timeout: Option<std::time::Duration>,
}

impl Default for StorageLimits {
    fn default() -> Self {
        StorageLimits {
            max_batch_total_size_bytes: 4 * 1024 * 1024 - 64 * 1024,
            max_inline_bytes: 1024 * 1024,
            read_chunk_bytes: 1024 * 1024,
            idle_timeout: Some(std::time::Duration::from_secs(60)),
        }
    }
}

#[derive(Clone)]
pub struct Storage {
    pub(crate) store: Arc<dyn BlobStore>,
    pub(crate) limits: StorageLimits,
    pub(crate) counters: Arc<CasCounters>,
    tenancy: Arc<Tenancy>,
}

impl Storage {
    /// Storage over `store`, whose organisations' phase lives in memory
    /// (see [`Storage::with_tenancy`] for a store that outlives the
    /// process).
    pub fn new(store: Arc<dyn BlobStore>, limits: StorageLimits) -> Self {
        Storage {
            store,
            limits,
            counters: Arc::default(),
            tenancy: Arc::new(Tenancy::in_memory()),
        }
    }

    /// The same storage, with the organisations' phase read from and kept
    /// in `tenancy` (see [`crate::tenancy`]).
    pub fn with_tenancy(self, tenancy: Tenancy) -> Self {
        Storage {
            tenancy: Arc::new(tenancy),
            ..self
        }
    }

    /// Settles how organisation `org` sees the store. Every request of an
    /// organisation that writes to the store calls this first (the lookups
    /// and [`Storage::admit`] do it themselves): see [`crate::tenancy`]
    /// for why that order matters.
    pub async fn enter(&self, org: &str) -> Result<()> {
        self.tenancy.enter(org, &self.store).await.map(drop)
    }

    /// What the storage services did since start-up.
    pub fn counters(&self) -> &Arc<CasCounters> {
        &self.counters
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    pub fn limits(&self) -> &StorageLimits {
        &self.limits
    }

    /// The digests among `digests` the CAS lacks, in request order.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let keys: Vec<Key> = digests.iter().map(Digest::key).collect();
        let present = self
            .store
            .contains(&keys)
            .await
            .map_err(|e| CasError::store("looking up blobs", e))?;
        Ok(digests
            .iter()
            .zip(present)
            .filter(|(digest, present)| !present && !digest.is_empty_blob())
            .map(|(digest, _)| *digest)
            .collect())
    }

    /// The digests among `digests` that organisation `org` cannot see, in
    /// request order: those the CAS lacks and, once organisations need
    /// markers ([`crate::tenancy`]; never for open access, `""`), those it
    /// holds without the organisation's marker ([`Storage::admit`]).
    /// Physical copies are shared; what each organisation is told is its
    /// own.
    pub async fn find_missing_for(&self, org: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        if !self.tenancy.enter(org, &self.store).await?.check {
            return self.find_missing(digests).await;
        }
        let mut keys: Vec<Key> = digests.iter().map(Digest::key).collect();
        keys.extend(digests.iter().map(|digest| Key::membership(org, digest)));
        let present = self
            .store
            .contains(&keys)
            .await
            .map_err(|e| CasError::store("looking up blobs", e))?;
        let (blobs, markers) = present.split_at(digests.len());
        Ok(digests
            .iter()
            .zip(blobs.iter().zip(markers))
            .filter(|(digest, (blob, marker))| !(digest.is_empty_blob() || **blob && **marker))
            .map(|(digest, _)| *digest)
            .collect())
    }

    /// Lets organisation `org` see `digests` from now on (nothing to do for
    /// open access, nor while no organisation needs markers). Called once
    /// the organisation has shown it has the bytes (an upload verified
    /// against the digest) or when they were produced for it (an action's
    /// outputs).
    pub async fn admit(&self, org: &str, digests: &[Digest]) -> Result<()> {
        if digests.is_empty() || !self.tenancy.enter(org, &self.store).await?.write {
            return Ok(());
        }
        let keys: Vec<Key> = digests
            .iter()
            .filter(|digest| !digest.is_empty_blob())
            .map(|digest| Key::membership(org, digest))
            .collect();
        let present = self
            .store
            .contains(&keys)
            .await
            .map_err(|e| CasError::store("looking up organisation markers", e))?;
        let new: Vec<(Key, Bytes)> = keys
            .into_iter()
            .zip(present)
            .filter(|(_, present)| !present)
            .map(|(key, _)| (key, Bytes::from_static(MARKER)))
            .collect();
        for result in self.store.put_many(new).await {
            result.map_err(|e| CasError::store("writing organisation markers", e))?;
        }
        Ok(())
    }

    /// Whether organisation `org` may see `digest` (see
    /// [`Storage::find_missing_for`]).
    pub async fn visible_to(&self, org: &str, digest: &Digest) -> Result<bool> {
        Ok(self
            .find_missing_for(org, std::slice::from_ref(digest))
            .await?
            .is_empty())
    }

    /// Every blob of the input tree under directory `root`: its
    /// directories and files, each once (a directory listed twice is
    /// walked once), `root` included. Directories the CAS lacks are
    /// listed but not walked. At most `max` digests, else
    /// INVALID_ARGUMENT naming the limit.
    pub async fn blobs_under(
        &self,
        function: DigestFunction,
        root: Digest,
        max: usize,
    ) -> Result<Vec<Digest>> {
        let mut seen = std::collections::HashSet::from([root]);
        let mut walk = vec![root];
        let mut blobs = vec![root];
        let parse = |digest: Option<&kiln_proto::reapi::Digest>, what: &str| {
            crate::wire::parse_digest(function, digest, what)
        };
        while let Some(directory) = walk.pop() {
            let data = match self.read_small(&directory).await {
                Ok(data) => data,
                Err(CasError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let listing =
                <kiln_proto::reapi::Directory as prost::Message>::decode(data).map_err(|e| {
                    CasError::InvalidArgument(format!("blob {directory} is not a Directory: {e}"))
                })?;
            for child in &listing.directories {
                let child = parse(child.digest.as_ref(), "a DirectoryNode digest")?;
                if seen.insert(child) {
                    walk.push(child);
                    blobs.push(child);
                }
            }
            for file in &listing.files {
                let file = parse(file.digest.as_ref(), "a FileNode digest")?;
                if seen.insert(file) {
                    blobs.push(file);
                }
            }
            if blobs.len() > max {
                return Err(CasError::InvalidArgument(format!(
                    "the input tree under {root} has more than {max} distinct blobs"
                )));
            }
        }
        Ok(blobs)
    }

    pub async fn contains(&self, digest: &Digest) -> Result<bool> {
        Ok(self
            .find_missing(std::slice::from_ref(digest))
            .await?
            .is_empty())
    }

    /// Opens a blob for reading; `None` if the CAS lacks it. A stored blob
    /// whose size differs from the digest's does not match it.
    pub async fn open(&self, digest: &Digest) -> Result<Option<Blob>> {
        if digest.is_empty_blob() {
            return Ok(Some(Blob::Memory(Bytes::new())));
        }
        let blob = self
            .store
            .get(&digest.key())
            .await
            .map_err(|e| CasError::store(format_args!("reading blob {digest}"), e))?;
        Ok(blob.filter(|blob| blob.len() == digest.size))
    }

    /// A whole blob in memory, or NOT_FOUND naming it.
    pub async fn read_small(&self, digest: &Digest) -> Result<Bytes> {
        let blob = self
            .open(digest)
            .await?
            .ok_or_else(|| CasError::NotFound(format!("blob {digest} is not in the CAS")))?;
        blob.into_bytes()
            .await
            .map_err(|e| CasError::Internal(format!("reading blob {digest}: {e}")))
    }

    /// Checks `data` against `digest`, decompressing first if needed.
    pub fn verify(digest: &Digest, data: Bytes, compressor: Compressor) -> Result<Bytes> {
        let data = match compressor {
            Compressor::Identity => data,
            Compressor::Zstd => Bytes::from(decompress_bounded(digest, &data)?),
        };
        let actual = digest.function.digest_of(&data);
        if actual != *digest {
            return Err(CasError::InvalidArgument(format!(
                "blob {digest}: content does not match its digest (got {actual})"
            )));
        }
        Ok(data)
    }

    /// Verifies and stores a blob that is whole in memory.
    pub async fn put(&self, digest: &Digest, data: Bytes, compressor: Compressor) -> Result<()> {
        let data = Self::verify(digest, data, compressor)?;
        if digest.is_empty_blob() {
            return Ok(());
        }
        self.store
            .put(digest.key(), data)
            .await
            .map_err(|e| CasError::store(format_args!("storing blob {digest}"), e))?;
        self.counters.written(digest.size);
        Ok(())
    }

    /// Hashes `data` with `function` and stores it; returns its digest.
    pub async fn put_content(&self, function: DigestFunction, data: Bytes) -> Result<Digest> {
        let digest = function.digest_of(&data);
        if !digest.is_empty_blob() {
            self.store
                .put(digest.key(), data)
                .await
                .map_err(|e| CasError::store(format_args!("storing blob {digest}"), e))?;
            self.counters.written(digest.size);
        }
        Ok(digest)
    }
}

/// Most bytes reserved up front for a decompressed batch item: the rest
/// grows as data really decodes, so a declared size costs nothing.
const DECODE_RESERVE: u64 = 1 << 20;

/// `data` (one zstd stream) decompressed, streaming, to exactly
/// `digest.size` bytes: never more is decoded or held, and data that
/// decodes to more or less than declared is INVALID_ARGUMENT.
fn decompress_bounded(digest: &Digest, data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let invalid = |what: String| CasError::InvalidArgument(format!("blob {digest}: {what}"));
    let decoder = zstd::stream::read::Decoder::new(data)
        .map_err(|e| CasError::Internal(format!("starting a zstd decoder: {e}")))?;
    let mut out = Vec::with_capacity(digest.size.min(DECODE_RESERVE) as usize);
    decoder
        .take(digest.size.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| invalid(format!("invalid zstd data: {e}")))?;
    match (out.len() as u64).cmp(&digest.size) {
        std::cmp::Ordering::Equal => Ok(out),
        std::cmp::Ordering::Greater => Err(invalid(format!(
            "zstd data decodes to more than its declared {} bytes",
            digest.size
        ))),
        std::cmp::Ordering::Less => Err(invalid(format!(
            "zstd data decodes to {} bytes, not its declared {}",
            out.len(),
            digest.size
        ))),
    }
}
