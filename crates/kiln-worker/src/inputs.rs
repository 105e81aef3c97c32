//! Input staging: fetch an action's input tree (Directory messages level by
//! level in batched BatchReadBlobs calls, never one call per directory),
//! fill the file cache with the files it lacks (batched small blobs,
//! streamed large ones, bounded parallelism), and materialize the tree in a
//! fresh workspace by hardlinking from the cache.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use kiln_proto::reapi::{Digest, Directory};
use prost::Message;

use crate::cache::{FileCache, Pinned};
use crate::cas::CasClient;
use crate::error::{format_digest, RunError};
use crate::scratch::Scratch;
use crate::validate::check_directory;
use crate::workspace::DirAccess;

/// Parallel CAS calls while fetching inputs.
const FETCH_PARALLELISM: usize = 8;

/// Every Directory of an input tree, by digest.
pub type DirectoryMap = HashMap<Digest, Directory>;

/// Fetches message blobs (Action, Command, Directory) by digest, batched
/// or streamed by size. `None` when the CAS lacks one. A digest over
/// [`kiln_proto::MAX_MESSAGE_BLOB_BYTES`] is refused before anything is
/// read.
pub async fn fetch_blobs(
    cas: &CasClient,
    instance_name: &str,
    digests: Vec<Digest>,
) -> Result<Vec<(Digest, Option<bytes::Bytes>)>, RunError> {
    if let Some(huge) = digests
        .iter()
        .find(|d| d.size_bytes.max(0) as u64 > kiln_proto::MAX_MESSAGE_BLOB_BYTES)
    {
        return Err(RunError::InvalidArgument(format!(
            "message blob {} is {} bytes, over the limit of {} for an Action, Command or Directory",
            format_digest(huge),
            huge.size_bytes,
            kiln_proto::MAX_MESSAGE_BLOB_BYTES
        )));
    }
    let mut unique: Vec<Digest> = digests
        .into_iter()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    unique.sort_by(|a, b| a.hash.cmp(&b.hash));
    let mut results = Vec::new();
    let (small, large): (Vec<Digest>, Vec<Digest>) = unique
        .into_iter()
        .partition(|digest| cas.fits_batch(digest.size_bytes));
    let (empty, small): (Vec<Digest>, Vec<Digest>) = small.into_iter().partition(is_empty_blob);
    results.extend(empty.into_iter().map(|d| (d, Some(bytes::Bytes::new()))));
    let batches: Vec<_> = futures::stream::iter(cas.batches(small))
        .map(|batch| cas.batch_read(instance_name, batch))
        .buffer_unordered(FETCH_PARALLELISM)
        .try_collect()
        .await?;
    results.extend(batches.into_iter().flatten());
    for digest in large {
        let data = match cas.read_stream(instance_name, &digest).await? {
            None => None,
            Some(stream) => {
                let mut data = Vec::with_capacity(digest.size_bytes as usize);
                let mut stream = stream;
                loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => data.extend_from_slice(&chunk.data),
                        Ok(None) => break,
                        Err(status) => {
                            return Err(RunError::cas(
                                format!("ByteStream.Read of {}", format_digest(&digest)),
                                status,
                            ))
                        }
                    }
                }
                let data = bytes::Bytes::from(data);
                if crate::cas::digest_of(&data) != digest {
                    return Err(RunError::Internal(format!(
                        "ByteStream.Read returned data that does not match {}",
                        format_digest(&digest)
                    )));
                }
                Some(data)
            }
        };
        results.push((digest, data));
    }
    Ok(results)
}

/// How large an input tree may be, counted as it is laid out: a directory
/// the tree lists twice counts twice, so a tree whose directories fan out
/// to the same child cannot expand without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Files, symlinks and directories in all.
    pub max_entries: u64,
    /// Directory levels below the input root.
    pub max_depth: u32,
    /// Bytes of all files.
    pub max_bytes: u64,
}

impl Default for InputLimits {
    fn default() -> InputLimits {
        InputLimits {
            max_entries: 2_000_000,
            max_depth: 256,
            max_bytes: 64 << 30,
        }
    }
}

/// Fetches the whole tree under `root`, one batched round per level, and
/// checks each Directory and the tree's depth and unique size against
/// `limits` as it goes. Returns the directories found and the digests the
/// CAS lacks.
pub async fn fetch_tree(
    cas: &CasClient,
    instance_name: &str,
    root: &Digest,
    limits: &InputLimits,
) -> Result<(DirectoryMap, Vec<Digest>), RunError> {
    let mut directories = DirectoryMap::new();
    let mut missing = Vec::new();
    let mut frontier = vec![root.clone()];
    let mut depth = 0u32;
    while !frontier.is_empty() {
        if depth > limits.max_depth {
            return Err(over_limit(
                root,
                format!(
                    "is more than {} directories deep (max_input_depth)",
                    limits.max_depth
                ),
            ));
        }
        if directories.len() as u64 > limits.max_entries {
            return Err(over_limit(
                root,
                format!(
                    "has more than {} entries (max_input_entries)",
                    limits.max_entries
                ),
            ));
        }
        depth += 1;
        let wanted: Vec<Digest> = frontier
            .drain(..)
            .filter(|digest| !directories.contains_key(digest))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for (digest, data) in fetch_blobs(cas, instance_name, wanted).await? {
            let Some(data) = data else {
                missing.push(digest);
                continue;
            };
            let directory = Directory::decode(data).map_err(|e| {
                RunError::InvalidArgument(format!(
                    "directory {} is not a Directory message: {e}",
                    format_digest(&digest)
                ))
            })?;
            check_directory(&digest, &directory)?;
            frontier.extend(
                directory
                    .directories
                    .iter()
                    .filter_map(|node| node.digest.clone()),
            );
            directories.insert(digest, directory);
        }
    }
    Ok((directories, missing))
}

fn over_limit(root: &Digest, what: String) -> RunError {
    RunError::InvalidArgument(format!("the input tree {} {what}", format_digest(root)))
}

/// Checks the tree under `root` as it would be laid out against `limits`
/// (entries and bytes with every repetition counted), without expanding
/// it: each distinct directory is sized once.
pub fn check_expanded(
    directories: &DirectoryMap,
    root: &Digest,
    limits: &InputLimits,
) -> Result<(), RunError> {
    /// (entries, bytes) of one directory's subtree, saturating.
    fn size(
        directories: &DirectoryMap,
        digest: &Digest,
        memo: &mut HashMap<Digest, (u64, u64)>,
    ) -> (u64, u64) {
        if let Some(known) = memo.get(digest) {
            return *known;
        }
        let Some(directory) = directories.get(digest) else {
            return (0, 0);
        };
        let mut entries =
            (directory.files.len() + directory.symlinks.len() + directory.directories.len()) as u64;
        let mut bytes = directory
            .files
            .iter()
            .map(|f| f.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64))
            .fold(0u64, u64::saturating_add);
        for child in &directory.directories {
            let (child_entries, child_bytes) = size(
                directories,
                child.digest.as_ref().unwrap_or(&Digest::default()),
                memo,
            );
            entries = entries.saturating_add(child_entries);
            bytes = bytes.saturating_add(child_bytes);
        }
        memo.insert(digest.clone(), (entries, bytes));
        (entries, bytes)
    }
    let (entries, bytes) = size(directories, root, &mut HashMap::new());
    if entries > limits.max_entries {
        return Err(over_limit(
            root,
            format!(
                "lays out {entries} entries, over the limit of {} (max_input_entries)",
                limits.max_entries
            ),
        ));
    }
    if bytes > limits.max_bytes {
        return Err(over_limit(
            root,
            format!(
                "holds {bytes} bytes of files, over the limit of {} (max_input_bytes)",
                limits.max_bytes
            ),
        ));
    }
    Ok(())
}

/// Makes sure every (file digest, executable) of the tree is in the file
/// cache, downloading only what is absent. Returns the digests the CAS
/// lacks, and the pin that keeps the tree's entries in the cache until the
/// workspace is materialized.
pub async fn fill_cache(
    cas: &CasClient,
    cache: &Arc<FileCache>,
    instance_name: &str,
    directories: &DirectoryMap,
) -> Result<(Vec<Digest>, Pinned), RunError> {
    let mut needed: HashSet<(Digest, bool)> = HashSet::new();
    for directory in directories.values() {
        for file in &directory.files {
            if let Some(digest) = &file.digest {
                needed.insert((digest.clone(), file.is_executable));
            }
        }
    }
    let pinned = cache.pin(needed.iter().cloned());
    // Which entries exist, and which can be derived from the other
    // variant: a stat per file, so on a blocking thread.
    let lookup = cache.clone();
    let presence = tokio::task::spawn_blocking(move || {
        needed
            .into_iter()
            .map(|(digest, executable)| {
                let present = lookup.contains(&digest, executable);
                let derivable = !present && lookup.contains(&digest, !executable);
                (digest, executable, present, derivable)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| RunError::Internal(format!("checking the file cache: {e}")))?;
    let mut to_fetch: HashMap<Digest, Vec<bool>> = HashMap::new();
    for (digest, executable, present, derivable) in presence {
        if present || (derivable && cache.derive_variant(&digest, executable).await?) {
            continue;
        }
        to_fetch.entry(digest).or_default().push(executable);
    }
    let (small, large): (Vec<Digest>, Vec<Digest>) = to_fetch
        .keys()
        .cloned()
        .partition(|digest| cas.fits_batch(digest.size_bytes));
    let to_fetch = &to_fetch;
    let cache: &FileCache = cache;

    // Small files: batches in parallel, each written to the cache as it lands.
    let small_missing: Vec<Vec<Digest>> = futures::stream::iter(cas.batches(small))
        .map(|batch| async move {
            let mut missing = Vec::new();
            let (empty, batch): (Vec<Digest>, Vec<Digest>) =
                batch.into_iter().partition(is_empty_blob);
            let mut blobs: Vec<(Digest, Option<bytes::Bytes>)> = empty
                .into_iter()
                .map(|d| (d, Some(bytes::Bytes::new())))
                .collect();
            blobs.extend(cas.batch_read(instance_name, batch).await?);
            for (digest, data) in blobs {
                match data {
                    None => missing.push(digest),
                    Some(data) => insert_variants(cache, &digest, &to_fetch[&digest], data).await?,
                }
            }
            Ok::<_, RunError>(missing)
        })
        .buffer_unordered(FETCH_PARALLELISM)
        .try_collect()
        .await?;

    // Large files: streamed straight to the cache, never whole in memory.
    let large_missing: Vec<Option<Digest>> = futures::stream::iter(large)
        .map(|digest| async move {
            let Some(stream) = cas.read_stream(instance_name, &digest).await? else {
                return Ok::<_, RunError>(Some(digest));
            };
            let variants = &to_fetch[&digest];
            let context = format!("ByteStream.Read of {}", format_digest(&digest));
            let chunks = stream.map(move |chunk| {
                chunk
                    .map(|response| response.data)
                    .map_err(|status| RunError::cas(context.clone(), status))
            });
            let first = variants[0];
            match cache.insert_stream(&digest, first, chunks).await {
                Err(RunError::Cas { status, .. }) if status.code() == tonic::Code::NotFound => {
                    return Ok(Some(digest))
                }
                other => other?,
            }
            for &executable in &variants[1..] {
                cache.derive_variant(&digest, executable).await?;
            }
            Ok(None)
        })
        .buffer_unordered(FETCH_PARALLELISM)
        .try_collect()
        .await?;

    let mut missing: Vec<Digest> = small_missing.into_iter().flatten().collect();
    missing.extend(large_missing.into_iter().flatten());
    Ok((missing, pinned))
}

/// The empty blob is never fetched: every CAS has it implicitly.
fn is_empty_blob(digest: &Digest) -> bool {
    digest.size_bytes == 0 && *digest == crate::cas::digest_of(&[])
}

async fn insert_variants(
    cache: &FileCache,
    digest: &Digest,
    variants: &[bool],
    data: bytes::Bytes,
) -> Result<(), RunError> {
    cache.insert_bytes(digest, variants[0], data).await?;
    for &executable in &variants[1..] {
        cache.derive_variant(digest, executable).await?;
    }
    Ok(())
}

/// How [`materialize`] places each file and directory.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// Copy files out of the cache instead of hardlinking them (for a
    /// privileged action where no overlay can protect the cache's inodes;
    /// see [`crate::workspace`]).
    pub copy: bool,
    /// Owner and mode of each directory made.
    pub directories: DirAccess,
    /// The workspace is a warm runner's, kept with `preserve-workspace`:
    /// directories that exist are used, and whatever is at an input's path
    /// is replaced by the input.
    pub over_existing: bool,
}

/// Lays the tree out under `workspace` (which must exist and be empty,
/// unless `placement.over_existing`):
/// directories (empty ones too), files hardlinked from the cache (copied
/// where a hardlink is refused, e.g. across devices, or where `placement`
/// says so), symlinks as given. Returns the directories made that are to
/// go to the action's user ([`DirAccess::apply`]).
pub async fn materialize(
    cache: Arc<FileCache>,
    scratch: Arc<Scratch>,
    directories: Arc<DirectoryMap>,
    root: Digest,
    workspace: std::path::PathBuf,
    placement: Placement,
) -> Result<Vec<std::path::PathBuf>, RunError> {
    crate::process::blocking("materializing the input root", move || {
        let tree = Tree {
            cache: &cache,
            scratch: &scratch,
            directories: &directories,
            placement,
        };
        let mut owned = Vec::new();
        tree.materialize_directory(&root, &workspace, &mut owned)?;
        Ok(owned)
    })
    .await
}

struct Tree<'a> {
    cache: &'a FileCache,
    scratch: &'a Scratch,
    directories: &'a DirectoryMap,
    placement: Placement,
}

impl Tree<'_> {
    fn materialize_directory(
        &self,
        digest: &Digest,
        path: &Path,
        owned: &mut Vec<std::path::PathBuf>,
    ) -> Result<(), RunError> {
        let directory = self.directories.get(digest).ok_or_else(|| {
            RunError::Internal(format!(
                "directory {} was not fetched",
                format_digest(digest)
            ))
        })?;
        let over = self.placement.over_existing;
        for file in &directory.files {
            let file_digest = file.digest.clone().unwrap_or_default();
            let source = self.cache.path(&file_digest, file.is_executable);
            let target = path.join(&file.name);
            if over {
                clear_path(&target, false)?;
            }
            self.place_file(&source, &target)?;
        }
        for symlink in &directory.symlinks {
            let target = path.join(&symlink.name);
            if over {
                clear_path(&target, false)?;
            }
            std::os::unix::fs::symlink(&symlink.target, &target)
                .map_err(|e| RunError::io(format!("creating symlink {}", target.display()), e))?;
        }
        for child in &directory.directories {
            let child_path = path.join(&child.name);
            let exists = over && clear_path(&child_path, true)?;
            if !exists {
                self.scratch.make_dir(&child_path)
            } else {
                Ok(())
            }
            .and_then(|()| self.placement.directories.apply(&child_path, owned))
            .map_err(|e| RunError::io(format!("creating {}", child_path.display()), e))?;
            self.materialize_directory(
                child.digest.as_ref().unwrap_or(&Digest::default()),
                &child_path,
                owned,
            )?;
        }
        Ok(())
    }

    fn place_file(&self, source: &Path, target: &Path) -> Result<(), RunError> {
        let linked = if self.placement.copy {
            None
        } else {
            match std::fs::hard_link(source, target) {
                Ok(()) => return Ok(()),
                Err(link_error) if is_disk_full(&link_error) => {
                    return Err(RunError::io(
                        format!("linking {}", target.display()),
                        link_error,
                    ));
                }
                Err(link_error) => Some(link_error),
            }
        };
        std::fs::copy(source, target).map_err(|e| {
            let why = linked.map_or(String::new(), |l| format!(" (hardlink failed: {l})"));
            RunError::io(
                format!("copying {} to {}{why}", source.display(), target.display()),
                e,
            )
        })?;
        Ok(())
    }
}

/// Deletes whatever is at `path` (not following a symlink there), except a
/// real directory when `keep_directory`: then true says it is there.
/// `path`'s ancestors must be real directories (the walk checked them).
fn clear_path(path: &Path, keep_directory: bool) -> Result<bool, RunError> {
    let removed = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() && keep_directory => return Ok(true),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    removed.map_err(|e| RunError::io(format!("replacing {}", path.display()), e))?;
    Ok(false)
}

/// Clears, in an overlay's upper layer `upper` kept by a warm runner, what
/// would hide the tree `root` in the lower one: entries at its files' and
/// symlinks' paths, non-directories at its directories' paths, and the
/// opaque mark of a directory the previous action replaced. Blocking.
pub fn clear_shadows(
    directories: &DirectoryMap,
    root: &Digest,
    upper: &Path,
) -> Result<(), RunError> {
    let Some(directory) = directories.get(root) else {
        return Ok(());
    };
    for name in directory
        .files
        .iter()
        .map(|f| &f.name)
        .chain(directory.symlinks.iter().map(|s| &s.name))
    {
        clear_path(&upper.join(name), false)?;
    }
    for child in &directory.directories {
        let path = upper.join(&child.name);
        if clear_path(&path, true)? {
            // Absent unless the previous action replaced the directory.
            let _ = rustix::fs::lremovexattr(&path, "trusted.overlay.opaque");
            clear_shadows(
                directories,
                child.digest.as_ref().unwrap_or(&Digest::default()),
                &path,
            )?;
        }
    }
    Ok(())
}

/// Every input file's and symlink's path, relative to the input root.
pub fn file_paths(directories: &DirectoryMap, root: &Digest) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    walk_tree(
        directories,
        root,
        Path::new(""),
        &mut |prefix, directory| {
            out.extend(directory.files.iter().map(|f| prefix.join(&f.name)));
            out.extend(directory.symlinks.iter().map(|s| prefix.join(&s.name)));
        },
    );
    out
}

/// The digest of every input file, by its path relative to the input
/// root (`/`-separated): what a backend that copies the inputs into a
/// disk of its own needs to tell what it holds already.
pub fn file_digests(directories: &DirectoryMap, root: &Digest) -> crate::isolation::InputDigests {
    let mut out = crate::isolation::InputDigests::new();
    walk_tree(
        directories,
        root,
        Path::new(""),
        &mut |prefix, directory| {
            for file in &directory.files {
                if let (Some(path), Some(digest)) = (prefix.join(&file.name).to_str(), &file.digest)
                {
                    out.insert(path.to_owned(), digest.clone());
                }
            }
        },
    );
    out
}

/// Calls `visit` with each Directory of the tree at `digest` and its path.
fn walk_tree(
    directories: &DirectoryMap,
    digest: &Digest,
    prefix: &Path,
    visit: &mut dyn FnMut(&Path, &Directory),
) {
    let Some(directory) = directories.get(digest) else {
        return;
    };
    visit(prefix, directory);
    for child in &directory.directories {
        walk_tree(
            directories,
            child.digest.as_ref().unwrap_or(&Digest::default()),
            &prefix.join(&child.name),
            visit,
        );
    }
}

fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{DirectoryNode, FileNode};

    fn digest(n: u8) -> Digest {
        Digest {
            hash: format!("{n:064x}"),
            size_bytes: 1,
        }
    }

    #[test]
    fn repeated_directories_count_each_time_they_are_laid_out() {
        // root lists `leaf` three times; `leaf` holds a 1 GiB file.
        let leaf = Directory {
            files: vec![FileNode {
                name: "big".into(),
                digest: Some(Digest {
                    hash: "ab".repeat(32),
                    size_bytes: 1 << 30,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let root = Directory {
            directories: ["a", "b", "c"]
                .map(|name| DirectoryNode {
                    name: name.into(),
                    digest: Some(digest(1)),
                })
                .to_vec(),
            ..Default::default()
        };
        let tree = DirectoryMap::from([(digest(1), leaf), (digest(0), root)]);
        let limits = |entries, bytes| InputLimits {
            max_entries: entries,
            max_depth: 10,
            max_bytes: bytes,
        };
        check_expanded(&tree, &digest(0), &limits(6, 3 << 30)).unwrap();
        let error = check_expanded(&tree, &digest(0), &limits(5, 3 << 30)).unwrap_err();
        assert!(error.to_string().contains("6 entries"), "{error}");
        let error = check_expanded(&tree, &digest(0), &limits(6, (3 << 30) - 1)).unwrap_err();
        assert!(error.to_string().contains("max_input_bytes"), "{error}");
    }
}
