//! The ContentAddressableStorage service: existence checks, batched reads
//! and writes of small blobs, and whole-tree fetches (GetTree).

use std::collections::HashSet;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use kiln_auth::Caller;
use kiln_proto::cas_batch;
use kiln_proto::reapi::{
    self, batch_update_blobs_response,
    content_addressable_storage_server::ContentAddressableStorage,
};
use kiln_store::{Digest, DigestFunction};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::counters::CasCounters;
use crate::error::{CasError, Result};
use crate::resource::Compressor;
use crate::storage::Storage;
use crate::wire::{digest_function, parse_digest, to_wire};

/// Directories per GetTree page when the client does not say.
const DEFAULT_TREE_PAGE: usize = 1000;

pub struct CasService {
    storage: Storage,
    trees: TreeCache,
}

impl CasService {
    pub fn new(storage: Storage) -> Self {
        CasService {
            storage,
            trees: TreeCache::default(),
        }
    }
}

/// Most bytes of directories [`TreeCache`] keeps.
const TREE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Complete trees recently walked by GetTree, by root digest, so a client
/// that pages through a tree with `page_token` (one call per page) costs
/// one walk, not one per page. Only trees with every directory present
/// are kept: a content-addressed tree that is complete never changes.
/// Bounded by [`TREE_CACHE_BYTES`], least recently built first out.
/// A complete tree: its directories, breadth first.
type Tree = std::sync::Arc<Vec<reapi::Directory>>;

#[derive(Default)]
struct TreeCache {
    /// Root, tree, encoded bytes; oldest first.
    trees: parking_lot::Mutex<std::collections::VecDeque<(Digest, Tree, usize)>>,
}

impl TreeCache {
    fn get(&self, root: &Digest) -> Option<Tree> {
        self.trees
            .lock()
            .iter()
            .find(|(digest, _, _)| digest == root)
            .map(|(_, tree, _)| tree.clone())
    }

    fn put(&self, root: Digest, tree: Tree) {
        let bytes: usize = tree.iter().map(Message::encoded_len).sum();
        if bytes > TREE_CACHE_BYTES / 4 {
            return;
        }
        let mut trees = self.trees.lock();
        trees.retain(|(digest, _, _)| *digest != root);
        trees.push_back((root, tree, bytes));
        let mut total: usize = trees.iter().map(|(_, _, b)| b).sum();
        while total > TREE_CACHE_BYTES {
            let Some((_, _, b)) = trees.pop_front() else {
                break;
            };
            total -= b;
        }
    }
}

fn ok_status() -> Option<kiln_proto::rpc::Status> {
    Some(kiln_proto::rpc::Status::default())
}

impl CasService {
    async fn find_missing(
        &self,
        request: reapi::FindMissingBlobsRequest,
        org: &str,
    ) -> Result<reapi::FindMissingBlobsResponse> {
        let function = digest_function(request.digest_function)?;
        let digests = request
            .blob_digests
            .iter()
            .map(|d| parse_digest(function, Some(d), "blob_digests entry"))
            .collect::<Result<Vec<_>>>()?;
        let missing = self.storage.find_missing_for(org, &digests).await?;
        let counters = &self.storage.counters;
        CasCounters::add(&counters.find_missing_missing, missing.len() as u64);
        CasCounters::add(
            &counters.find_missing_present,
            (digests.len() - missing.len()) as u64,
        );
        Ok(reapi::FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(to_wire).collect(),
        })
    }

    /// BatchUpdateBlobs, its blobs' data held as received (see
    /// [`crate::cas_http`]).
    pub(crate) async fn batch_update(
        &self,
        request: cas_batch::BatchUpdateBlobsRequest,
        org: &str,
    ) -> Result<reapi::BatchUpdateBlobsResponse> {
        // Before anything is stored: see `crate::tenancy`.
        self.storage.enter(org).await?;
        let function = digest_function(request.digest_function)?;
        let limit = self.storage.limits.max_batch_total_size_bytes;
        let total: u64 = request.requests.iter().map(|r| r.data.len() as u64).sum();
        if total > limit {
            return Err(CasError::InvalidArgument(format!(
                "BatchUpdateBlobs carries {total} bytes, over the limit of {limit} (max_batch_total_size_bytes); use ByteStream.Write for large blobs"
            )));
        }
        // What compressed items decode to counts too: declared sizes,
        // summed without wrapping.
        let declared = request
            .requests
            .iter()
            .map(|r| r.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64))
            .try_fold(0u64, u64::checked_add);
        if declared.is_none_or(|declared| declared > limit) {
            return Err(CasError::InvalidArgument(format!(
                "BatchUpdateBlobs declares blobs of {} bytes in all, over the limit of {limit} (max_batch_total_size_bytes); use ByteStream.Write for large blobs",
                declared.map_or("more than 2^64".to_string(), |d| d.to_string())
            )));
        }
        let mut responses = Vec::with_capacity(request.requests.len());
        let mut verified: Vec<(usize, Digest, Bytes)> = Vec::with_capacity(request.requests.len());
        for item in request.requests {
            let outcome =
                parse_digest(function, item.digest.as_ref(), "digest").and_then(|digest| {
                    let compressor = Compressor::from_wire(item.compressor).ok_or_else(|| {
                        CasError::InvalidArgument(format!(
                            "blob {digest}: compressor {} is not supported",
                            item.compressor
                        ))
                    })?;
                    let data = Storage::verify(&digest, item.data, compressor)?;
                    Ok((digest, data))
                });
            responses.push(batch_update_blobs_response::Response {
                digest: item.digest,
                status: match &outcome {
                    Ok(_) => ok_status(),
                    Err(e) => Some(e.to_rpc_status()),
                },
            });
            if let Ok((digest, data)) = outcome {
                if !digest.is_empty_blob() {
                    verified.push((responses.len() - 1, digest, data));
                }
            }
        }
        // Blobs the CAS already holds are not written again; the caller
        // sent their bytes all the same, so its organisation may see them.
        let mut admitted: Vec<Digest> = verified.iter().map(|(_, d, _)| *d).collect();
        let missing: HashSet<Digest> = self
            .storage
            .find_missing(&admitted)
            .await?
            .into_iter()
            .collect();
        verified.retain(|(_, digest, _)| missing.contains(digest));
        let (slots, items): (Vec<(usize, Digest)>, Vec<_>) = verified
            .into_iter()
            .map(|(slot, digest, data)| ((slot, digest), (digest.key(), data)))
            .unzip();
        let results = self.storage.store.put_many(items).await;
        for ((slot, digest), result) in slots.into_iter().zip(results) {
            match result {
                Ok(()) => self.storage.counters.written(digest.size),
                Err(e) => {
                    admitted.retain(|d| *d != digest);
                    responses[slot].status = Some(
                        CasError::store(format_args!("storing blob {digest}"), e).to_rpc_status(),
                    )
                }
            }
        }
        self.storage.admit(org, &admitted).await?;
        Ok(reapi::BatchUpdateBlobsResponse { responses })
    }

    /// BatchReadBlobs, each blob's data as the store handed it out.
    pub(crate) async fn batch_read(
        &self,
        request: reapi::BatchReadBlobsRequest,
        org: &str,
    ) -> Result<cas_batch::BatchReadBlobsResponse> {
        let function = digest_function(request.digest_function)?;
        let digests = request
            .digests
            .iter()
            .map(|d| parse_digest(function, Some(d), "digests entry"))
            .collect::<Result<Vec<_>>>()?;
        // Summed without wrapping: sizes come from the client.
        let total = digests
            .iter()
            .map(|d| d.size)
            .try_fold(0u64, u64::checked_add);
        let limit = self.storage.limits.max_batch_total_size_bytes;
        if total.is_none_or(|total| total > limit) {
            return Err(CasError::InvalidArgument(format!(
                "BatchReadBlobs asks for {} bytes, over the limit of {limit} (max_batch_total_size_bytes); use ByteStream.Read for large blobs",
                total.map_or("more than 2^64".to_string(), |t| t.to_string())
            )));
        }
        // Another organisation's blob is missing, as an absent one is.
        let hidden: HashSet<Digest> = match org {
            "" => HashSet::new(),
            org => self
                .storage
                .find_missing_for(org, &digests)
                .await?
                .into_iter()
                .collect(),
        };
        let mut responses = Vec::with_capacity(digests.len());
        for (digest, wire) in digests.iter().zip(request.digests) {
            let read = match hidden.contains(digest) {
                true => Err(CasError::NotFound(format!(
                    "blob {digest} is not in the CAS"
                ))),
                false => self.storage.read_small(digest).await,
            };
            let (data, status) = match read {
                Ok(data) => {
                    CasCounters::add(&self.storage.counters.bytes_read, data.len() as u64);
                    (data, ok_status())
                }
                Err(e) => (Bytes::new(), Some(e.to_rpc_status())),
            };
            responses.push(cas_batch::batch_read_blobs_response::Response {
                digest: Some(wire),
                data,
                compressor: 0,
                status,
            });
        }
        Ok(cas_batch::BatchReadBlobsResponse { responses })
    }

    /// All directories under `root`, breadth first, each once, from the
    /// cache when it holds the tree.
    /// For an organisation (not open access), the walk sees only the
    /// directories it may, and is not cached.
    async fn cached_tree(&self, function: DigestFunction, root: Digest, org: &str) -> Result<Tree> {
        if !org.is_empty() {
            let (directories, _) = self.tree(function, root, org).await?;
            return Ok(std::sync::Arc::new(directories));
        }
        if let Some(tree) = self.trees.get(&root) {
            return Ok(tree);
        }
        let (directories, complete) = self.tree(function, root, org).await?;
        let tree = std::sync::Arc::new(directories);
        if complete {
            self.trees.put(root, tree.clone());
        }
        Ok(tree)
    }

    /// All directories under `root`, breadth first, each once, and whether
    /// all were there. Directories missing from the CAS are left out, as
    /// REAPI allows; a missing root is NOT_FOUND.
    async fn tree(
        &self,
        function: DigestFunction,
        root: Digest,
        org: &str,
    ) -> Result<(Vec<reapi::Directory>, bool)> {
        let mut complete = true;
        let mut seen = HashSet::from([root]);
        let mut queue = std::collections::VecDeque::from([root]);
        let mut directories = Vec::new();
        while let Some(digest) = queue.pop_front() {
            let read = if org.is_empty() || self.storage.visible_to(org, &digest).await? {
                self.storage.read_small(&digest).await
            } else {
                Err(CasError::NotFound(format!(
                    "blob {digest} is not in the CAS"
                )))
            };
            let data = match read {
                Ok(data) => data,
                Err(CasError::NotFound(_)) if digest == root => {
                    return Err(CasError::NotFound(format!(
                        "GetTree: root directory {root} is not in the CAS"
                    )))
                }
                Err(CasError::NotFound(_)) => {
                    complete = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let directory = reapi::Directory::decode(data).map_err(|e| {
                CasError::InvalidArgument(format!("blob {digest} is not a Directory: {e}"))
            })?;
            for child in &directory.directories {
                let child =
                    parse_digest(function, child.digest.as_ref(), "a DirectoryNode digest")?;
                if seen.insert(child) {
                    queue.push_back(child);
                }
            }
            directories.push(directory);
        }
        Ok((directories, complete))
    }
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<reapi::GetTreeResponse, Status>> + Send>>;
type ChunkMappingStream =
    Pin<Box<dyn Stream<Item = Result<reapi::GetChunkMappingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        // An executor asks as the action's organisation whether the CAS
        // holds what a VM's guest says its outputs are.
        let org = Caller::narrowed_org_of(&request);
        Ok(Response::new(
            self.find_missing(request.into_inner(), &org).await?,
        ))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        // Reached for compressed messages and callers without
        // `crate::cas_http`; the data moves over without a copy.
        let org = Caller::org_of(&request);
        let request = request.into_inner();
        let request = cas_batch::BatchUpdateBlobsRequest {
            instance_name: request.instance_name,
            requests: request
                .requests
                .into_iter()
                .map(|item| cas_batch::batch_update_blobs_request::Request {
                    digest: item.digest,
                    data: Bytes::from(item.data),
                    compressor: item.compressor,
                })
                .collect(),
            digest_function: request.digest_function,
        };
        Ok(Response::new(self.batch_update(request, &org).await?))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        // Reached for compressed messages and callers without
        // `crate::cas_http`, which encode REAPI's own type.
        let org = Caller::org_of(&request);
        let response = self.batch_read(request.into_inner(), &org).await?;
        Ok(Response::new(reapi::BatchReadBlobsResponse {
            responses: response
                .responses
                .into_iter()
                .map(|item| reapi::batch_read_blobs_response::Response {
                    digest: item.digest,
                    data: Vec::from(item.data),
                    compressor: item.compressor,
                    status: item.status,
                })
                .collect(),
        }))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<TreeStream>, Status> {
        let org = Caller::org_of(&request);
        let request = request.into_inner();
        let function = digest_function(request.digest_function)?;
        let root = parse_digest(function, request.root_digest.as_ref(), "root_digest")?;
        let start: usize = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().map_err(|_| {
                CasError::InvalidArgument(format!(
                    "page_token {:?} was not issued by this server",
                    request.page_token
                ))
            })?
        };
        let page_size = match request.page_size {
            size if size > 0 => size as usize,
            _ => DEFAULT_TREE_PAGE,
        };
        let directories = self.cached_tree(function, root, &org).await?;
        if start > directories.len() {
            return Err(CasError::InvalidArgument(format!(
                "page_token {start} is past the end of tree {root}"
            ))
            .into());
        }
        // One response per page; paging tokens let a client resume later.
        let mut pages = Vec::new();
        let mut offset = start;
        loop {
            let end = (offset + page_size).min(directories.len());
            pages.push(Ok(reapi::GetTreeResponse {
                directories: directories[offset..end].to_vec(),
                next_page_token: if end < directories.len() {
                    end.to_string()
                } else {
                    String::new()
                },
            }));
            offset = end;
            if offset >= directories.len() {
                break;
            }
        }
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }

    async fn split_blob(
        &self,
        _request: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        Err(CasError::Unimplemented(
            "SplitBlob is not supported (split_blob_support is false)".into(),
        )
        .into())
    }

    type GetChunkMappingStream = ChunkMappingStream;

    async fn get_chunk_mapping(
        &self,
        _request: Request<reapi::GetChunkMappingRequest>,
    ) -> Result<Response<ChunkMappingStream>, Status> {
        Err(CasError::Unimplemented("GetChunkMapping is not supported".into()).into())
    }

    async fn splice_blob(
        &self,
        _request: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        Err(CasError::Unimplemented(
            "SpliceBlob is not supported (splice_blob_support is false)".into(),
        )
        .into())
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<tonic::Streaming<reapi::RegisterChunkMappingRequest>>,
    ) -> Result<Response<reapi::RegisterChunkMappingResponse>, Status> {
        Err(CasError::Unimplemented("RegisterChunkMapping is not supported".into()).into())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use futures::StreamExt;
    use kiln_store::MemoryStore;

    use super::*;
    use crate::storage::StorageLimits;

    #[tokio::test]
    async fn paging_through_a_tree_walks_it_once() {
        let store = Arc::new(crate::test_store::TestStore::new());
        let storage = Storage::new(store.clone(), StorageLimits::default());
        // A chain of 50 directories, each holding the next.
        let mut child: Option<reapi::Directory> = None;
        let mut root = Digest::parse(DigestFunction::Sha256, &"0".repeat(64), 0).unwrap();
        for level in 0..50 {
            let mut directory = reapi::Directory::default();
            if let Some(child) = child.take() {
                let data = child.encode_to_vec();
                let digest = storage
                    .put_content(DigestFunction::Sha256, Bytes::from(data))
                    .await
                    .unwrap();
                directory.directories.push(reapi::DirectoryNode {
                    name: format!("d{level}"),
                    digest: Some(to_wire(&digest)),
                });
            }
            child = Some(directory);
        }
        if let Some(top) = child {
            root = storage
                .put_content(DigestFunction::Sha256, Bytes::from(top.encode_to_vec()))
                .await
                .unwrap();
        }
        let service = CasService::new(storage);
        let mut token = String::new();
        let mut seen = 0;
        loop {
            let request = reapi::GetTreeRequest {
                root_digest: Some(to_wire(&root)),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            };
            let mut stream = service
                .get_tree(Request::new(request))
                .await
                .unwrap()
                .into_inner();
            // One page per call, as a client paging with tokens reads it.
            let page = stream.next().await.unwrap().unwrap();
            seen += page.directories.len();
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        assert_eq!(seen, 50);
        let gets = store.gets.load(Ordering::Relaxed);
        assert!(
            gets <= 50,
            "50 one-page calls read {gets} blobs: the tree was walked again per page"
        );
    }

    #[tokio::test]
    async fn get_tree_shows_an_organisation_only_its_directories() {
        let storage = Storage::new(
            Arc::new(MemoryStore::new(1 << 20)),
            StorageLimits::default(),
        );
        // Both organisations arrive before anything is stored, so the
        // store keeps markers from the start (see `crate::tenancy`).
        storage.enter("acme").await.unwrap();
        storage.enter("globex").await.unwrap();
        let put = |directory: reapi::Directory| {
            let storage = storage.clone();
            async move {
                let data = Bytes::from(directory.encode_to_vec());
                storage
                    .put_content(DigestFunction::Sha256, data)
                    .await
                    .unwrap()
            }
        };
        let node = |name: &str, digest: &Digest| reapi::DirectoryNode {
            name: name.into(),
            digest: Some(to_wire(digest)),
        };
        let theirs = put(reapi::Directory {
            files: vec![reapi::FileNode {
                name: "secret".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
        let mine = put(reapi::Directory::default()).await;
        let root = put(reapi::Directory {
            directories: vec![node("mine", &mine), node("theirs", &theirs)],
            ..Default::default()
        })
        .await;
        storage.admit("acme", &[root, mine]).await.unwrap();
        storage.admit("globex", &[theirs]).await.unwrap();
        let service = CasService::new(storage);
        let tree_as = |org: &str| {
            let mut request = Request::new(reapi::GetTreeRequest {
                root_digest: Some(to_wire(&root)),
                ..Default::default()
            });
            request.extensions_mut().insert(kiln_auth::Caller {
                org: Arc::from(org),
                key_id: None,
                capabilities: kiln_auth::Capabilities::all(),
            });
            service.get_tree(request)
        };
        // acme sees its root and its own child; globex's is left out as
        // a missing directory is.
        let mut stream = tree_as("acme").await.unwrap().into_inner();
        let page = stream.next().await.unwrap().unwrap();
        assert_eq!(page.directories.len(), 2, "{page:?}");
        assert!(page
            .directories
            .iter()
            .all(|directory| directory.files.is_empty()));
        // globex holds a child but not the root: NOT_FOUND.
        let status = match tree_as("globex").await {
            Err(status) => status,
            Ok(response) => response.into_inner().next().await.unwrap().unwrap_err(),
        };
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        // Open access sees the whole tree.
        let mut stream = tree_as("").await.unwrap().into_inner();
        assert_eq!(stream.next().await.unwrap().unwrap().directories.len(), 3);
    }
}
