//! Applying an image's layers, lowest first, to one host directory so it
//! holds the tree a container of the image would see: whiteouts
//! (`.wh.NAME`, `.wh..wh..opq`) delete from lower layers only, modes,
//! owners, symlinks and hard links are kept, and so are the extended
//! attributes `security.capability` (file capabilities) and `user.*` of
//! files and directories, which `mke2fs -d` copies into the disk. Device
//! nodes and FIFOs are skipped (the guest's `/dev` is a devtmpfs), and so
//! are other attributes (SELinux labels, ACLs) and modification times of
//! anything but regular files.
//!
//! The image is hostile. An entry naming `..` is refused; every parent of
//! an entry is resolved *inside* the unpack root, as the guest will see
//! it: a symlink among the parents is followed with the root as `/` and
//! `..` stopping at the root, so `link -> /etc` then `link/x` writes the
//! image's `/etc/x`, never the host's. The entry itself is never followed
//! (an existing one is replaced). Only this process writes the root while
//! unpacking, so a check is not raced by the image.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Symlinks followed while resolving one path before it counts as a loop
/// (Linux's own bound).
const MAX_SYMLINK_HOPS: u32 = 40;

/// Why a layer could not be applied.
#[derive(Debug)]
pub(crate) enum UnpackError {
    /// The layer is malformed or tries to escape the root: the image's fault.
    Refused(String),
    /// The layers hold more file content than `max_bytes`.
    TooBig(u64),
    /// Local I/O failed (`context`, error).
    Io(String, io::Error),
}

fn io_error(context: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> UnpackError {
    move |error| UnpackError::Io(context(), error)
}

/// What the unpacked tree holds, for sizing its file system.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    /// Bytes of regular-file content written (an overwritten file counts twice).
    pub content_bytes: u64,
    /// Device nodes and FIFOs left out.
    pub skipped: u64,
    /// Extended attributes left out (not kept, or refused by the host).
    pub skipped_xattrs: u64,
}

/// Applies the layer in `file` (tar; gzip or zstd compressed, told by its
/// first bytes) to `root`.
pub(crate) fn apply_layer_file(
    root: &Path,
    file: &Path,
    totals: &mut Totals,
    max_bytes: u64,
) -> Result<(), UnpackError> {
    let mut reader = BufReader::with_capacity(
        1 << 20,
        fs::File::open(file).map_err(io_error(|| format!("opening {}", file.display())))?,
    );
    let magic = {
        use std::io::BufRead as _;
        let buffer = reader
            .fill_buf()
            .map_err(io_error(|| format!("reading {}", file.display())))?;
        buffer[..buffer.len().min(4)].to_vec()
    };
    if magic.starts_with(&[0x1f, 0x8b]) {
        apply_layer(
            root,
            flate2::read::MultiGzDecoder::new(reader),
            totals,
            max_bytes,
        )
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = zstd::stream::read::Decoder::with_buffer(reader)
            .map_err(io_error(|| "starting zstd".to_string()))?;
        apply_layer(root, decoder, totals, max_bytes)
    } else {
        apply_layer(root, reader, totals, max_bytes)
    }
}

/// Applies one uncompressed layer tar to `root`.
pub(crate) fn apply_layer(
    root: &Path,
    layer: impl Read,
    totals: &mut Totals,
    max_bytes: u64,
) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(layer);
    // Host paths this layer wrote: its whiteouts spare them.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let entries = archive
        .entries()
        .map_err(io_error(|| "reading the layer".to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| UnpackError::Refused(format!("a bad tar entry: {e}")))?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let mut components = relative_components(Path::new(OsStr::from_bytes(&raw)))
            .map_err(|why| UnpackError::Refused(format!("entry {shown:?} {why}")))?;
        let Some(name) = components.pop() else {
            continue; // the root itself
        };
        let parent =
            resolve_dir(root, components, Some(&mut written)).map_err(|e| with_entry(e, &shown))?;
        let name_bytes = name.as_bytes();
        if name_bytes == b".wh..wh..opq" {
            clear_lower(&parent, &written)
                .map_err(io_error(|| format!("making {shown:?} opaque")))?;
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(UnpackError::Refused(format!(
                    "entry {shown:?} whites out no name"
                )));
            }
            let target = parent.join(OsStr::from_bytes(hidden));
            if !written.contains(&target) {
                remove_any(&target).map_err(io_error(|| format!("applying whiteout {shown:?}")))?;
            }
            continue;
        }
        let host = parent.join(&name);
        write_entry(root, &mut entry, &host, &mut written, totals, max_bytes)
            .map_err(|e| with_entry(e, &shown))?;
    }
    Ok(())
}

fn with_entry(error: UnpackError, shown: &str) -> UnpackError {
    match error {
        UnpackError::Refused(why) => UnpackError::Refused(format!("entry {shown:?}: {why}")),
        UnpackError::Io(context, e) => UnpackError::Io(format!("entry {shown:?}: {context}"), e),
        too_big => too_big,
    }
}

fn write_entry(
    root: &Path,
    entry: &mut tar::Entry<'_, impl Read>,
    host: &Path,
    written: &mut HashSet<PathBuf>,
    totals: &mut Totals,
    max_bytes: u64,
) -> Result<(), UnpackError> {
    let xattrs = xattrs_of(entry, totals)?;
    let header = entry.header();
    let kind = header.entry_type();
    let mode = header.mode().unwrap_or(0o644) & 0o7777;
    let uid = owner_id(header.uid())?;
    let gid = owner_id(header.gid())?;
    let mtime = header.mtime().ok();
    let existing = fs::symlink_metadata(host).ok();
    let io = |what: &'static str| io_error(move || what.to_string());
    use tar::EntryType as T;
    match kind {
        T::Directory => {
            if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                remove_any(host).map_err(io("replacing"))?;
                fs::create_dir(host).map_err(io("creating the directory"))?;
            }
            set_owner_and_mode(host, uid, gid, mode)?;
            set_xattrs(host, &xattrs, totals);
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            remove_any(host).map_err(io("replacing"))?;
            if totals.content_bytes.saturating_add(entry.size()) > max_bytes {
                return Err(UnpackError::TooBig(max_bytes));
            }
            // create_new: O_EXCL, so an entry name is never followed.
            let mut file = fs::File::options()
                .write(true)
                .create_new(true)
                .open(host)
                .map_err(io("creating the file"))?;
            let copied = io::copy(entry, &mut file).map_err(io("writing the file"))?;
            totals.content_bytes = totals.content_bytes.saturating_add(copied);
            if let Some(seconds) = mtime {
                let when = SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
                file.set_modified(when).map_err(io("setting mtime"))?;
            }
            drop(file);
            set_owner_and_mode(host, uid, gid, mode)?;
            set_xattrs(host, &xattrs, totals);
        }
        T::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| UnpackError::Refused("a symlink without a target".into()))?
                .into_owned();
            remove_any(host).map_err(io("replacing"))?;
            std::os::unix::fs::symlink(OsStr::from_bytes(&target), host)
                .map_err(io("creating the symlink"))?;
            std::os::unix::fs::lchown(host, Some(uid), Some(gid)).map_err(io("chown"))?;
        }
        T::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| UnpackError::Refused("a hard link without a target".into()))?
                .into_owned();
            let mut components = relative_components(Path::new(OsStr::from_bytes(&target)))
                .map_err(|why| UnpackError::Refused(format!("hard link target {why}")))?;
            let Some(name) = components.pop() else {
                return Err(UnpackError::Refused("a hard link to the root".into()));
            };
            let source = resolve_dir(root, components, None)?.join(name);
            match fs::symlink_metadata(&source) {
                Ok(metadata) if metadata.is_dir() => {
                    return Err(UnpackError::Refused("a hard link to a directory".into()))
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(UnpackError::Refused(
                        "a hard link to a path that does not exist".into(),
                    ))
                }
            }
            if source != host {
                remove_any(host).map_err(io("replacing"))?;
                // linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                fs::hard_link(&source, host).map_err(io("creating the hard link"))?;
            }
        }
        T::Char | T::Block | T::Fifo => {
            totals.skipped += 1;
            return Ok(());
        }
        // Pax and GNU long-name headers are consumed by the tar reader;
        // anything else has no place in a root file system.
        _ => return Ok(()),
    }
    written.insert(host.to_path_buf());
    Ok(())
}

/// The extended attributes (pax `SCHILY.xattr.NAME`) an entry carries
/// that are kept; the others are counted in `totals`.
fn xattrs_of(
    entry: &mut tar::Entry<'_, impl Read>,
    totals: &mut Totals,
) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
    let mut kept = Vec::new();
    let Some(extensions) = entry
        .pax_extensions()
        .map_err(|e| UnpackError::Refused(format!("bad pax extensions: {e}")))?
    else {
        return Ok(kept);
    };
    for extension in extensions {
        let extension =
            extension.map_err(|e| UnpackError::Refused(format!("a bad pax extension: {e}")))?;
        let Ok(key) = extension.key() else {
            continue;
        };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
            continue;
        };
        if name == "security.capability" || name.starts_with("user.") {
            kept.push((name.to_string(), extension.value_bytes().to_vec()));
        } else {
            totals.skipped_xattrs += 1;
        }
    }
    Ok(kept)
}

/// After chown: chown clears `security.capability`. A host file system
/// that refuses one only loses that attribute (counted), not the build.
fn set_xattrs(host: &Path, xattrs: &[(String, Vec<u8>)], totals: &mut Totals) {
    for (name, value) in xattrs {
        if rustix::fs::lsetxattr(host, name.as_str(), value, rustix::fs::XattrFlags::empty())
            .is_err()
        {
            totals.skipped_xattrs += 1;
        }
    }
}

fn owner_id(id: io::Result<u64>) -> Result<u32, UnpackError> {
    id.ok()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| UnpackError::Refused("an owner id that is not a 32-bit number".into()))
}

/// chown before chmod: chown clears set-id bits.
fn set_owner_and_mode(host: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), UnpackError> {
    std::os::unix::fs::lchown(host, Some(uid), Some(gid))
        .map_err(io_error(|| "chown (building VM disks needs root)".into()))?;
    fs::set_permissions(host, fs::Permissions::from_mode(mode)).map_err(io_error(|| "chmod".into()))
}

/// The normal components of an entry's path; a leading `/` or `./` is
/// dropped, `..` refused.
fn relative_components(path: &Path) -> Result<Vec<OsString>, &'static str> {
    let mut components = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => components.push(name.to_os_string()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("climbs out with `..`"),
            Component::Prefix(_) => return Err("has a prefix"),
        }
    }
    Ok(components)
}

/// The host directory that `components` name under `root`, symlinks among
/// them resolved inside `root` (see the module comment). With `written`,
/// missing directories are created (mode 0755, root's) and noted there;
/// without, a missing one is refused.
fn resolve_dir(
    root: &Path,
    components: Vec<OsString>,
    mut written: Option<&mut HashSet<PathBuf>>,
) -> Result<PathBuf, UnpackError> {
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: VecDeque<OsString> = components.into();
    let mut hops = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        if name == "." || name.is_empty() {
            continue;
        }
        let host = join(root, &resolved).join(&name);
        match fs::symlink_metadata(&host) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(UnpackError::Refused("too many levels of symlinks".into()));
                }
                let target =
                    fs::read_link(&host).map_err(io_error(|| "reading a symlink".into()))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut next: VecDeque<OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_os_string()),
                        Component::ParentDir => Some(OsString::from("..")),
                        _ => None,
                    })
                    .collect();
                next.extend(pending);
                pending = next;
            }
            Ok(metadata) if metadata.is_dir() => resolved.push(name),
            Ok(_) => {
                return Err(UnpackError::Refused(format!(
                    "a parent, {:?}, is not a directory",
                    join(Path::new("/"), &resolved).join(&name)
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let Some(written) = written.as_deref_mut() else {
                    return Err(UnpackError::Refused("a path that does not exist".into()));
                };
                fs::create_dir(&host).map_err(io_error(|| "creating a parent".into()))?;
                written.insert(host);
                resolved.push(name);
            }
            Err(e) => return Err(UnpackError::Io("looking up a parent".into(), e)),
        }
    }
    Ok(join(root, &resolved))
}

fn join(root: &Path, components: &[OsString]) -> PathBuf {
    let mut path = root.to_path_buf();
    path.extend(components);
    path
}

/// Removes whatever `host` is (never following it); nothing there is fine.
fn remove_any(host: &Path) -> io::Result<()> {
    match fs::symlink_metadata(host) {
        Ok(metadata) if metadata.is_dir() => fs::remove_dir_all(host),
        Ok(_) => fs::remove_file(host),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes `dir` opaque: removes what lower layers put in it, keeping what
/// this layer wrote (`written`).
fn clear_lower(dir: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    if !fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    for child in fs::read_dir(dir)? {
        let child = child?;
        let path = child.path();
        if !written.contains(&path) {
            remove_any(&path)?;
        } else if child.file_type()?.is_dir() {
            clear_lower(&path, written)?;
        }
    }
    Ok(())
}

/// What an unpacked tree needs of a file system: bytes in 4 KiB blocks
/// (each file and directory rounded up) and inodes.
pub(crate) fn measure(root: &Path) -> io::Result<(u64, u64)> {
    const BLOCK: u64 = 4096;
    let mut bytes = 0u64;
    let mut inodes = 1u64;
    let mut seen_links: HashSet<u64> = HashSet::new();
    let mut pending = vec![root.to_path_buf()];
    bytes += BLOCK;
    while let Some(dir) = pending.pop() {
        for child in fs::read_dir(&dir)? {
            let child = child?;
            let metadata = child.metadata()?; // lstat: DirEntry never follows
            if metadata.nlink() > 1 && !metadata.is_dir() && !seen_links.insert(metadata.ino()) {
                continue;
            }
            inodes += 1;
            // Symlinks of up to 59 bytes live in the inode.
            if !(metadata.file_type().is_symlink() && metadata.len() < 60) {
                bytes += metadata.len().div_ceil(BLOCK).max(1) * BLOCK;
            }
            if metadata.is_dir() {
                pending.push(child.path());
            }
        }
    }
    Ok((bytes, inodes))
}
