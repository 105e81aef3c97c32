//! Output collection after the run: the declared outputs that exist become
//! OutputFile / OutputDirectory (with a Tree) / OutputSymlink entries, and
//! every blob they reference is listed for upload. Symlinks are never
//! followed; missing outputs are simply absent.

// The legacy output_files/output_directories and the *_symlinks result
// fields are deprecated in REAPI, yet older clients still send and read them.
#![allow(deprecated)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kiln_proto::reapi::{
    self, Command, Digest, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile,
    OutputSymlink, SymlinkNode, Tree,
};
use kiln_store::DigestFunction;
use prost::Message;

use crate::cas::{digest_of, UploadSource};
use crate::error::RunError;

/// The output part of an ActionResult, and the blobs it references.
#[derive(Debug, Default)]
pub struct CollectedOutputs {
    pub output_files: Vec<OutputFile>,
    pub output_directories: Vec<OutputDirectory>,
    pub output_symlinks: Vec<OutputSymlink>,
    pub output_file_symlinks: Vec<OutputSymlink>,
    pub output_directory_symlinks: Vec<OutputSymlink>,
    pub blobs: Vec<(Digest, UploadSource)>,
}

impl CollectedOutputs {
    /// Moves the outputs into `result`.
    pub fn fill(self, result: &mut reapi::ActionResult) -> Vec<(Digest, UploadSource)> {
        result.output_files = self.output_files;
        result.output_directories = self.output_directories;
        result.output_symlinks = self.output_symlinks;
        result.output_file_symlinks = self.output_file_symlinks;
        result.output_directory_symlinks = self.output_directory_symlinks;
        self.blobs
    }
}

/// The digest of each output file among `blobs`, by its path relative to
/// `workspace` (`/`-separated).
pub fn file_digests(
    blobs: &[(Digest, UploadSource)],
    workspace: &Path,
) -> crate::isolation::InputDigests {
    blobs
        .iter()
        .filter_map(|(digest, source)| match source {
            UploadSource::File(path) | UploadSource::Stored(path) => {
                let relative = path.strip_prefix(workspace).ok()?.to_str()?;
                Some((relative.to_owned(), digest.clone()))
            }
            UploadSource::Bytes(_) => None,
        })
        .collect()
}

/// What a declared path is expected to be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Declared {
    /// `output_paths` (REAPI v2.1+): whatever is there.
    Any,
    /// Legacy `output_files`.
    File,
    /// Legacy `output_directories`.
    Directory,
}

/// The Command's declared output paths, relative to its working
/// directory: `output_paths`, or else the legacy files and directories.
fn declared(command: &Command) -> Vec<(String, Declared)> {
    if !command.output_paths.is_empty() {
        command
            .output_paths
            .iter()
            .map(|p| (p.clone(), Declared::Any))
            .collect()
    } else {
        command
            .output_files
            .iter()
            .map(|p| (p.clone(), Declared::File))
            .chain(
                command
                    .output_directories
                    .iter()
                    .map(|p| (p.clone(), Declared::Directory)),
            )
            .collect()
    }
}

/// The Command's declared output paths, relative to its working
/// directory, whatever each is declared as: what a backend whose action
/// writes them somewhere else than the host's workspace (a VM's disk)
/// brings back before they are collected.
pub fn declared_paths(command: &Command) -> Vec<String> {
    declared(command)
        .into_iter()
        .map(|(path, _)| path)
        .collect()
}

/// Collects the Command's outputs below `working_directory` (on a blocking
/// thread: this hashes every output file). `stored`: outputs (by path
/// relative to `workspace`) whose bytes the CAS holds and a VM kept, each
/// an empty placeholder here ([`crate::isolation::StoredOutputs`]): their
/// digests are taken as given, and they are listed as
/// [`UploadSource::Stored`].
pub async fn collect(
    command: &Command,
    workspace: PathBuf,
    working_directory: PathBuf,
    stored: crate::isolation::InputDigests,
) -> Result<CollectedOutputs, RunError> {
    let declared = declared(command);
    crate::process::blocking("collecting outputs", move || {
        let mut collected = CollectedOutputs::default();
        let files = FileDigests {
            workspace: &workspace,
            stored: &stored,
        };
        for (path, kind) in declared {
            if !within(&workspace, &working_directory.join(&path)) {
                // A symlink in the output's parents leads out of the
                // workspace: not the action's output to report.
                tracing::warn!(path, "output path leaves the workspace through a symlink");
                continue;
            }
            collect_one(&working_directory, &path, kind, &files, &mut collected)?;
        }
        Ok(collected)
    })
    .await
}

/// How an output file gets its digest: hashed here, or, for a placeholder
/// of a stored output, as recorded.
struct FileDigests<'a> {
    workspace: &'a Path,
    stored: &'a crate::isolation::InputDigests,
}

impl FileDigests<'_> {
    fn of(&self, full: PathBuf) -> Result<(Digest, UploadSource), RunError> {
        let recorded = full
            .strip_prefix(self.workspace)
            .ok()
            .and_then(Path::to_str)
            .and_then(|relative| self.stored.get(relative));
        match recorded {
            Some(digest) => Ok((digest.clone(), UploadSource::Stored(full))),
            None => Ok((hash_file(&full)?, UploadSource::File(full))),
        }
    }
}

/// Whether `path`'s parent, with symlinks resolved, is inside `workspace`.
/// (The last component itself may be a symlink: that is an OutputSymlink.)
pub fn within(workspace: &Path, path: &Path) -> bool {
    let Ok(root) = workspace.canonicalize() else {
        return false;
    };
    // The deepest ancestor that exists decides where the path really goes.
    let mut ancestor = path.parent();
    while let Some(candidate) = ancestor {
        if let Ok(real) = candidate.canonicalize() {
            return real.starts_with(&root);
        }
        ancestor = candidate.parent();
    }
    false
}

fn collect_one(
    working_directory: &Path,
    path: &str,
    kind: Declared,
    files: &FileDigests,
    collected: &mut CollectedOutputs,
) -> Result<(), RunError> {
    let full = working_directory.join(path);
    let metadata = match std::fs::symlink_metadata(&full) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Ok(()),
        Err(e) => return Err(RunError::io(format!("output {path:?}"), e)),
    };
    let file_type = metadata.file_type();
    if file_type.is_symlink() {
        let target = read_link(&full, path)?;
        let symlink = OutputSymlink {
            path: path.to_string(),
            target,
            node_properties: None,
        };
        match kind {
            Declared::Any => collected.output_symlinks.push(symlink),
            Declared::File => {
                collected.output_file_symlinks.push(symlink.clone());
                collected.output_symlinks.push(symlink);
            }
            Declared::Directory => {
                collected.output_directory_symlinks.push(symlink.clone());
                collected.output_symlinks.push(symlink);
            }
        }
    } else if file_type.is_file() && kind != Declared::Directory {
        let (digest, source) = files.of(full)?;
        collected.output_files.push(OutputFile {
            path: path.to_string(),
            digest: Some(digest.clone()),
            is_executable: is_executable(&metadata),
            contents: Vec::new(),
            node_properties: None,
        });
        collected.blobs.push((digest, source));
    } else if file_type.is_dir() && kind != Declared::File {
        let mut children = HashMap::new();
        let root = build_directory(&full, files, &mut children, &mut collected.blobs)?;
        let root_digest = digest_of(&root.encode_to_vec());
        let mut children: Vec<(Digest, Directory)> = children.into_iter().collect();
        children.sort_by(|a, b| a.0.hash.cmp(&b.0.hash));
        let tree = Tree {
            root: Some(root),
            children: children.into_iter().map(|(_, d)| d).collect(),
        };
        let tree_bytes = Bytes::from(tree.encode_to_vec());
        let tree_digest = digest_of(&tree_bytes);
        collected
            .blobs
            .push((tree_digest.clone(), UploadSource::Bytes(tree_bytes)));
        collected.output_directories.push(OutputDirectory {
            path: path.to_string(),
            tree_digest: Some(tree_digest),
            is_topologically_sorted: false,
            root_directory_digest: Some(root_digest),
        });
    }
    // Anything else (a file where a directory was declared, a socket) is
    // not an output of the declared kind: absent, like a missing one.
    Ok(())
}

/// Builds the Directory message for `path`; every descendant Directory goes
/// into `children` by digest (deduplicated), every file into `blobs`.
fn build_directory(
    path: &Path,
    files: &FileDigests,
    children: &mut HashMap<Digest, Directory>,
    blobs: &mut Vec<(Digest, UploadSource)>,
) -> Result<Directory, RunError> {
    let mut directory = Directory::default();
    let entries = opened_as_owner(path, 0o500, |p| std::fs::read_dir(p))
        .map_err(|e| RunError::io(format!("listing {}", path.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| RunError::io(format!("listing {}", path.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let full = entry.path();
        let metadata = std::fs::symlink_metadata(&full)
            .map_err(|e| RunError::io(format!("stat {}", full.display()), e))?;
        let file_type = metadata.file_type();
        if file_type.is_symlink() {
            directory.symlinks.push(SymlinkNode {
                name,
                target: read_link(&full, &full.display().to_string())?,
                node_properties: None,
            });
        } else if file_type.is_file() {
            let (digest, source) = files.of(full)?;
            directory.files.push(FileNode {
                name,
                digest: Some(digest.clone()),
                is_executable: is_executable(&metadata),
                node_properties: None,
            });
            blobs.push((digest, source));
        } else if file_type.is_dir() {
            let child = build_directory(&full, files, children, blobs)?;
            let bytes = child.encode_to_vec();
            let digest = digest_of(&bytes);
            children.insert(digest.clone(), child);
            directory.directories.push(DirectoryNode {
                name,
                digest: Some(digest),
            });
        }
    }
    directory.files.sort_by(|a, b| a.name.cmp(&b.name));
    directory.directories.sort_by(|a, b| a.name.cmp(&b.name));
    directory.symlinks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(directory)
}

fn read_link(full: &Path, what: &str) -> Result<String, RunError> {
    std::fs::read_link(full)
        .map(|target| target.to_string_lossy().into_owned())
        .map_err(|e| RunError::io(format!("reading symlink {what}"), e))
}

fn is_executable(metadata: &std::fs::Metadata) -> bool {
    metadata.permissions().mode() & 0o111 != 0
}

/// `open(path)`, for an output the executor must read. One it owns but
/// closed to its owner (an action running as root may leave mode 000;
/// one taken back from the action's user keeps its mode) gets the owner's
/// `bits` added and is opened again: the executor holds no capability to
/// read past a mode (`kiln-sandbox::capabilities`). One of another user's
/// that stays closed (a file with a name that is no declared output is
/// never taken back) is an error that says so.
pub fn opened_as_owner<T>(
    path: &Path,
    bits: u32,
    open: impl Fn(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    match open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let metadata = std::fs::symlink_metadata(path)?;
            if metadata.uid() != rustix::process::geteuid().as_raw() {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "{e}: the action's user (uid {}) closed it to others, and it was not \
                         given to the executor (a file with more than one link is given only \
                         when each of its names is a declared output)",
                        metadata.uid()
                    ),
                ));
            }
            let mode = metadata.permissions().mode();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | bits))?;
            open(path)
        }
        other => other,
    }
}

/// The SHA-256 digest of a file, read in chunks.
pub fn hash_file(path: &Path) -> Result<Digest, RunError> {
    let mut file = opened_as_owner(path, 0o400, |p| std::fs::File::open(p))
        .map_err(|e| RunError::io(format!("opening {}", path.display()), e))?;
    hash_copy(&mut file, &mut std::io::sink())
        .map_err(|e| RunError::io(format!("reading {}", path.display()), e))
}

/// The SHA-256 digest of what `reader` yields, read in chunks, each also
/// written to `sink` (a copy hashed in the same pass).
pub fn hash_copy(reader: &mut impl Read, sink: &mut impl Write) -> std::io::Result<Digest> {
    let mut hasher = DigestFunction::Sha256.hasher();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        sink.write_all(&buffer[..n])?;
        size += n as u64;
    }
    Ok(kiln_cas::wire::to_wire(&hasher.finish(size)))
}
