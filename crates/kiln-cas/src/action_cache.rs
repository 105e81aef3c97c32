//! The Action Cache service. Entries are keyed by the caller's
//! organisation, instance name, platform header overrides ([`AcScope`])
//! and action digest. A hit is only served when every blob it references is still in
//! the CAS (completeness check): a client that trusts a hit must be able to
//! download all of its outputs.
//!
//! A client's `ResultsCachePolicy.priority` becomes the [`Retention`] of
//! the entry and of every blob it references, so a result and its outputs
//! are kept (or let go) together.

use std::sync::Arc;

use bytes::Bytes;
use kiln_auth::Caller;
use kiln_proto::reapi::{self, action_cache_server::ActionCache};
use kiln_store::{Digest, DigestFunction, Key, Retention};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::counters::CasCounters;
use crate::error::{CasError, Result};
use crate::resource::abbreviated;
use crate::storage::Storage;
use crate::wire::{digest_function, parse_digest};

/// Which part of the Action Cache a request reads and writes: its
/// caller's organisation, its instance name, and the identity of the platform properties it
/// overrode by header (`x-buildbuddy-platform.*`), which change how the
/// action runs without changing its digest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AcScope {
    /// The caller's organisation; empty for open access.
    pub org: Arc<str>,
    pub instance_name: String,
    pub overrides: Option<[u8; 32]>,
}

impl AcScope {
    /// The scope of a request made for `org` with `instance_name` and
    /// platform `headers` (as `kiln_platform::header_properties` gives
    /// them).
    pub fn new(org: Arc<str>, instance_name: String, headers: &[(String, String)]) -> AcScope {
        AcScope {
            org,
            instance_name,
            overrides: kiln_platform::overrides_digest(headers),
        }
    }

    fn key(&self, action: &Digest) -> Key {
        Key::action_cache(
            &self.org,
            &self.instance_name,
            self.overrides.as_ref(),
            action,
        )
    }
}

/// The request's platform headers, as `(key, value)` pairs.
pub fn platform_headers(metadata: &tonic::metadata::MetadataMap) -> Vec<(String, String)> {
    let ascii = metadata.iter().filter_map(|entry| match entry {
        tonic::metadata::KeyAndValueRef::Ascii(name, value) => {
            Some((name.as_str(), value.to_str().ok()?))
        }
        tonic::metadata::KeyAndValueRef::Binary(..) => None,
    });
    kiln_platform::header_properties(ascii)
}

pub struct ActionCacheService {
    storage: Storage,
}

impl ActionCacheService {
    pub fn new(storage: Storage) -> Self {
        ActionCacheService { storage }
    }
}

/// Reads and writes Action Cache entries; shared with the execution
/// service, which writes results of successful actions.
#[derive(Clone)]
pub struct ActionCacheStore {
    storage: Storage,
}

impl ActionCacheStore {
    pub fn new(storage: Storage) -> Self {
        ActionCacheStore { storage }
    }

    /// The stored result for `action`, if complete (counted as an Action
    /// Cache hit or miss).
    pub async fn get(
        &self,
        scope: &AcScope,
        action: &Digest,
    ) -> Result<Option<reapi::ActionResult>> {
        let found = self.lookup(scope, action).await?;
        let counters = &self.storage.counters;
        CasCounters::add(
            match found {
                Some(_) => &counters.action_cache_hits,
                None => &counters.action_cache_misses,
            },
            1,
        );
        Ok(found)
    }

    async fn lookup(
        &self,
        scope: &AcScope,
        action: &Digest,
    ) -> Result<Option<reapi::ActionResult>> {
        let key = scope.key(action);
        let Some(blob) = self.storage.store.get(&key).await.map_err(|e| {
            CasError::store(format_args!("reading the action result of {action}"), e)
        })?
        else {
            return Ok(None);
        };
        let data = blob.into_bytes().await.map_err(|e| {
            CasError::Internal(format!("reading the action result of {action}: {e}"))
        })?;
        let Ok(result) = reapi::ActionResult::decode(data) else {
            tracing::warn!(%action, "undecodable action result treated as a miss");
            return Ok(None);
        };
        let missing = self
            .missing_blobs(&scope.org, action.function, &result)
            .await?;
        if !missing.is_empty() {
            tracing::debug!(%action, missing = missing.len(), first = %missing[0], "incomplete action result treated as a miss");
            return Ok(None);
        }
        Ok(Some(result))
    }

    /// Stores `result` for `action`, with `retention` for it and its blobs.
    pub async fn put(
        &self,
        scope: &AcScope,
        action: &Digest,
        result: &reapi::ActionResult,
        retention: Retention,
    ) -> Result<()> {
        let key = scope.key(action);
        self.storage
            .store
            .put(key, Bytes::from(result.encode_to_vec()))
            .await
            .map_err(|e| {
                CasError::store(format_args!("storing the action result of {action}"), e)
            })?;
        if !retention.is_default() {
            self.retain(scope, action, result, retention).await?;
        }
        Ok(())
    }

    /// Gives the entry for `action` and every blob `result` references
    /// (output trees' files included) `retention`.
    pub async fn retain(
        &self,
        scope: &AcScope,
        action: &Digest,
        result: &reapi::ActionResult,
        retention: Retention,
    ) -> Result<()> {
        let (mut blobs, trees) = direct_references(action.function, result)?;
        blobs.extend(self.tree_files(action.function, &trees).await?);
        let mut keys = vec![scope.key(action)];
        keys.extend(blobs.iter().map(Digest::key));
        self.storage
            .store
            .set_retention(&keys, retention)
            .await
            .map_err(|e| {
                CasError::store(
                    format_args!("setting the retention of the result of {action}"),
                    e,
                )
            })
    }

    /// Every blob `result` references that organisation `org` cannot see,
    /// including the files inside output directory trees.
    async fn missing_blobs(
        &self,
        org: &str,
        function: DigestFunction,
        result: &reapi::ActionResult,
    ) -> Result<Vec<Digest>> {
        let (referenced, trees) = direct_references(function, result)?;
        let missing = self.storage.find_missing_for(org, &referenced).await?;
        if !missing.is_empty() {
            return Ok(missing);
        }
        // The trees are present: their files must be too.
        let files = self.tree_files(function, &trees).await?;
        self.storage.find_missing_for(org, &files).await
    }

    /// Lets organisation `org` see every blob `result` references (output
    /// trees' files included): the outputs of an action run for it.
    pub async fn admit_outputs(
        &self,
        org: &str,
        function: DigestFunction,
        result: &reapi::ActionResult,
    ) -> Result<()> {
        if org.is_empty() {
            return Ok(());
        }
        let (mut blobs, trees) = direct_references(function, result)?;
        blobs.extend(self.tree_files(function, &trees).await?);
        self.storage.admit(org, &blobs).await
    }

    /// The files inside the output directory trees `trees`.
    async fn tree_files(&self, function: DigestFunction, trees: &[Digest]) -> Result<Vec<Digest>> {
        let mut files = Vec::new();
        for tree in trees {
            let data = self.storage.read_small(tree).await?;
            let tree = reapi::Tree::decode(data).map_err(|e| {
                CasError::Internal(format!("output tree {tree} does not decode: {e}"))
            })?;
            for directory in tree.root.iter().chain(&tree.children) {
                for file in &directory.files {
                    files.push(parse_digest(
                        function,
                        file.digest.as_ref(),
                        "tree file digest",
                    )?);
                }
            }
        }
        Ok(files)
    }

    /// Fills `*_raw` and output file `contents` as the client asked, within
    /// the inline budget.
    pub async fn inline(
        &self,
        function: DigestFunction,
        result: &mut reapi::ActionResult,
        stdout: bool,
        stderr: bool,
        files: &[String],
    ) -> Result<()> {
        let mut budget = self.storage.limits.max_inline_bytes;
        let mut fetch = async |digest: Option<&reapi::Digest>| -> Result<Option<Vec<u8>>> {
            let Some(digest) = digest else {
                return Ok(None);
            };
            let digest = parse_digest(function, Some(digest), "digest")?;
            if digest.size > budget {
                return Ok(None);
            }
            budget -= digest.size;
            Ok(Some(self.storage.read_small(&digest).await?.to_vec()))
        };
        if stdout && result.stdout_raw.is_empty() {
            if let Some(data) = fetch(result.stdout_digest.as_ref()).await? {
                result.stdout_raw = data;
            }
        }
        if stderr && result.stderr_raw.is_empty() {
            if let Some(data) = fetch(result.stderr_digest.as_ref()).await? {
                result.stderr_raw = data;
            }
        }
        for file in result
            .output_files
            .iter_mut()
            .filter(|f| files.contains(&f.path))
        {
            if let Some(data) = fetch(file.digest.as_ref()).await? {
                file.contents = data;
            }
        }
        Ok(())
    }
}

/// The blobs `result` references directly (output files, stdout, stderr,
/// output trees), and separately the output trees.
fn direct_references(
    function: DigestFunction,
    result: &reapi::ActionResult,
) -> Result<(Vec<Digest>, Vec<Digest>)> {
    let mut referenced = Vec::new();
    let mut add = |digest: Option<&reapi::Digest>, what: &str| -> Result<()> {
        if let Some(d) = digest {
            referenced.push(parse_digest(function, Some(d), what)?);
        }
        Ok(())
    };
    for file in &result.output_files {
        add(file.digest.as_ref(), "output file digest")?;
    }
    add(result.stdout_digest.as_ref(), "stdout_digest")?;
    add(result.stderr_digest.as_ref(), "stderr_digest")?;
    let mut trees = Vec::new();
    for directory in &result.output_directories {
        trees.push(parse_digest(
            function,
            directory.tree_digest.as_ref(),
            "output directory tree_digest",
        )?);
    }
    referenced.extend_from_slice(&trees);
    Ok((referenced, trees))
}

/// REAPI's output paths are relative to the working directory, with `/`
/// as separator: a client that trusts a hit writes its outputs there, so
/// an absolute or escaping path in a shared cache would write elsewhere.
/// The deprecated symlink lists are checked too: clients before v2.1 fill
/// them, and later ones may fill them as well.
#[allow(deprecated)]
fn check_output_paths(action: &Digest, result: &reapi::ActionResult) -> Result<()> {
    let files = result
        .output_files
        .iter()
        .map(|file| ("output file", &file.path));
    let directories = result
        .output_directories
        .iter()
        .map(|directory| ("output directory", &directory.path));
    let symlinks = [
        ("output symlink", &result.output_symlinks),
        ("output file symlink", &result.output_file_symlinks),
        (
            "output directory symlink",
            &result.output_directory_symlinks,
        ),
    ]
    .into_iter()
    .flat_map(|(what, symlinks)| symlinks.iter().map(move |symlink| (what, &symlink.path)));
    for (what, path) in files.chain(directories).chain(symlinks) {
        // Only an output directory may be the working directory itself.
        let problem = match path.as_str() {
            "" if what == "output directory" => continue,
            "" => "it is empty",
            path if path.starts_with('/') => "it is absolute",
            path if path.split('/').any(|segment| segment == "..") => "it contains a `..` segment",
            path if path
                .split('/')
                .any(|segment| segment.is_empty() || segment == ".") =>
            {
                "it contains an empty or `.` segment (or ends with `/`)"
            }
            path if path.contains('\0') => "it contains a NUL character",
            _ => continue,
        };
        return Err(CasError::InvalidArgument(format!(
            "action {action}: {what} path {:?} is not a normalized relative path: {problem}",
            abbreviated(path)
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<reapi::GetActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let headers = platform_headers(request.metadata());
        let org = Caller::org_of(&request);
        let request = request.into_inner();
        let function = digest_function(request.digest_function)?;
        let action = parse_digest(function, request.action_digest.as_ref(), "action_digest")?;
        let cache = ActionCacheStore::new(self.storage.clone());
        let scope = AcScope::new(org, request.instance_name.clone(), &headers);
        let Some(mut result) = cache.get(&scope, &action).await? else {
            return Err(Status::not_found(format!(
                "no action result for action {action} in instance {:?}{}",
                request.instance_name,
                match scope.overrides {
                    Some(_) => " with these platform header overrides",
                    None => "",
                }
            )));
        };
        cache
            .inline(
                function,
                &mut result,
                request.inline_stdout,
                request.inline_stderr,
                &request.inline_output_files,
            )
            .await?;
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<reapi::UpdateActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let headers = platform_headers(request.metadata());
        let org = Caller::org_of(&request);
        let request = request.into_inner();
        let function = digest_function(request.digest_function)?;
        let action = parse_digest(function, request.action_digest.as_ref(), "action_digest")?;
        let result = request.action_result.ok_or_else(|| {
            CasError::InvalidArgument(format!("action {action}: action_result is missing"))
        })?;
        check_output_paths(&action, &result)?;
        // Malformed digests inside the result are rejected now, not at read time.
        for file in &result.output_files {
            parse_digest(
                function,
                file.digest.as_ref(),
                &format!("output file {:?} digest", file.path),
            )?;
        }
        for directory in &result.output_directories {
            parse_digest(
                function,
                directory.tree_digest.as_ref(),
                &format!("output directory {:?} tree_digest", directory.path),
            )?;
        }
        let retention = Retention::from_reapi_priority(
            request
                .results_cache_policy
                .map_or(0, |policy| policy.priority),
        );
        ActionCacheStore::new(self.storage.clone())
            .put(
                &AcScope::new(org, request.instance_name, &headers),
                &action,
                &result,
                retention,
            )
            .await?;
        Ok(Response::new(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_auth::{Caller, Capabilities};
    use kiln_store::MemoryStore;

    fn request<T>(message: T, org: &str) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(Caller {
            org: Arc::from(org),
            key_id: None,
            capabilities: Capabilities::all(),
        });
        request
    }

    #[tokio::test]
    async fn each_organisation_reads_only_its_own_action_results() {
        let storage = Storage::new(Arc::new(MemoryStore::new(1 << 20)), Default::default());
        let service = ActionCacheService::new(storage);
        let action = reapi::Digest {
            hash: "a".repeat(64),
            size_bytes: 10,
        };
        let result = reapi::ActionResult {
            exit_code: 0,
            stdout_raw: b"acme's".to_vec(),
            ..Default::default()
        };
        service
            .update_action_result(request(
                reapi::UpdateActionResultRequest {
                    action_digest: Some(action.clone()),
                    action_result: Some(result),
                    ..Default::default()
                },
                "acme",
            ))
            .await
            .unwrap();
        let get = |org| {
            service.get_action_result(request(
                reapi::GetActionResultRequest {
                    action_digest: Some(action.clone()),
                    ..Default::default()
                },
                org,
            ))
        };
        assert!(get("acme").await.is_ok());
        for org in ["other", ""] {
            let status = get(org).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::NotFound, "{org:?}");
        }
    }
}
