//! The stream in which a guest sends an action's outputs to the host.
//!
//! Inside a VM an action writes its outputs to a disk of the VM's own; the
//! host asks the guest agent for the declared output paths, and the agent
//! answers with this stream, which the host writes back into the action's
//! workspace before the ordinary output collection hashes and uploads it.
//! The guest is hostile (whatever ran in it may have taken over its
//! kernel), so the host never parses the guest's file system: it reads
//! only this stream, and [`decode`] writes nothing but beneath the
//! destination, never through a symlink, never over something it did not
//! just create, and no more than its limits.
//!
//! Records, all integers little-endian:
//! - `DIR path mode`, `FILE path mode size bytes…`, `SYMLINK path target`:
//!   an entry, its parent sent before it;
//! - `MISSING path`: a declared output the action did not write;
//! - `STORED path mode size sha256`: a file whose bytes are not sent, as
//!   the host said the CAS holds them (the agent asked, naming the file's
//!   SHA-256, 32 bytes here): [`decode`] writes an empty placeholder and
//!   reports it, for the host to check it named that digest;
//! - `END`: the last record.
//!
//! The host's stream of a warm VM's next inputs (the agent's `put`) has
//! two more, which the host's [`decode`] refuses:
//! - `KEEP path in_place`, all of them before any entry: a file of the
//!   last inputs, to be kept for this stream if the last action left it as
//!   it was put (the `n`th `KEEP` is number `n`, from 0), where it is
//!   (`in_place` 1: its `REUSE` has its path) or moved aside (0);
//! - `REUSE path mode index`: an entry whose content is kept file `index`.
//!
//! `path` and `target` are a `u16` length and bytes; `mode` and `index` a
//! `u32`, `size` a `u64`, `in_place` a byte, `sha256` 32 bytes. Paths are relative,
//! `/`-separated, with no empty, `.` or `..` component.
//!
//! The encoding half ([`encode`]) and the record reader ([`read_record`])
//! use only `std`: the guest agent, built with `rustc` alone, includes
//! this file, and reads with it the inputs the host sends a warm VM.

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub const END: u8 = 0;
pub const DIR: u8 = 1;
pub const FILE: u8 = 2;
pub const SYMLINK: u8 = 3;
pub const MISSING: u8 = 4;
pub const KEEP: u8 = 5;
pub const REUSE: u8 = 6;
pub const STORED: u8 = 7;

/// Longest path or symlink target in a record.
pub const MAX_PATH: usize = 4096;

/// Writes the records of `relative` (a declared output, relative to
/// `root`) and, for a directory, of everything beneath it. Symlinks are
/// sent as symlinks, never followed; other kinds of files (sockets,
/// devices, fifos) are left out.
#[cfg(not(kiln_agent))]
pub fn encode(out: &mut impl Write, root: &Path, relative: &str) -> io::Result<()> {
    encode_with(out, root, relative, &mut NoHooks)
}

/// What [`encode_with`] asks of, and tells, its caller along the way.
pub trait EncodeHooks {
    /// The number of a kept file whose `REUSE` record stands in for the
    /// content of the file at `relative`, if any.
    fn reuse(&mut self, _relative: &str) -> Option<u32> {
        None
    }

    /// The file at `relative` was sent whole, and did not change while it
    /// was read (its inode's ctime was the same before and after).
    fn sent(&mut self, _relative: &str, _metadata: &std::fs::Metadata) {}

    /// The SHA-256 of the file at `relative` (open as `file`, `metadata`
    /// its state when opened) if the receiver already holds its bytes,
    /// which are then not sent; None to send them.
    fn held(
        &mut self,
        _relative: &str,
        _file: &mut std::fs::File,
        _metadata: &std::fs::Metadata,
    ) -> io::Result<Option<[u8; 32]>> {
        Ok(None)
    }
}

#[cfg(not(kiln_agent))]
struct NoHooks;
#[cfg(not(kiln_agent))]
impl EncodeHooks for NoHooks {}

/// [`encode`], with the caller's [`EncodeHooks`].
pub fn encode_with(
    out: &mut impl Write,
    root: &Path,
    relative: &str,
    hooks: &mut dyn EncodeHooks,
) -> io::Result<()> {
    let path = root.join(relative);
    let metadata = match std::fs::symlink_metadata(&path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            out.write_all(&[MISSING])?;
            return write_bytes(out, relative.as_bytes());
        }
        Err(e) => return Err(e),
    };
    encode_entry(out, &path, relative, &metadata, hooks)
}

/// A `KEEP` record: the file at `relative` in the guest's last inputs,
/// reused at the same path if `in_place`.
#[cfg(not(kiln_agent))]
pub fn encode_keep(out: &mut impl Write, relative: &str, in_place: bool) -> io::Result<()> {
    out.write_all(&[KEEP])?;
    write_bytes(out, relative.as_bytes())?;
    out.write_all(&[u8::from(in_place)])
}

/// Ends the stream.
pub fn finish(out: &mut impl Write) -> io::Result<()> {
    out.write_all(&[END])?;
    out.flush()
}

fn encode_entry(
    out: &mut impl Write,
    path: &Path,
    relative: &str,
    metadata: &std::fs::Metadata,
    hooks: &mut dyn EncodeHooks,
) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = metadata.permissions().mode() & 0o7777;
    let kind = metadata.file_type();
    if kind.is_symlink() {
        out.write_all(&[SYMLINK])?;
        write_bytes(out, relative.as_bytes())?;
        write_bytes(out, std::fs::read_link(path)?.as_os_str().as_bytes())
    } else if kind.is_dir() {
        out.write_all(&[DIR])?;
        write_bytes(out, relative.as_bytes())?;
        out.write_all(&mode.to_le_bytes())?;
        let mut names: Vec<_> = std::fs::read_dir(path)?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let Some(name) = name.to_str() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{relative}: a name that is not UTF-8"),
                ));
            };
            let child = path.join(name);
            let metadata = std::fs::symlink_metadata(&child)?;
            encode_entry(out, &child, &format!("{relative}/{name}"), &metadata, hooks)?;
        }
        Ok(())
    } else if let Some(index) = kind.is_file().then(|| hooks.reuse(relative)).flatten() {
        out.write_all(&[REUSE])?;
        write_bytes(out, relative.as_bytes())?;
        out.write_all(&mode.to_le_bytes())?;
        out.write_all(&index.to_le_bytes())
    } else if kind.is_file() {
        use std::os::unix::fs::MetadataExt;
        let mut file = std::fs::File::open(path)?;
        let before = file.metadata()?;
        let size = before.len();
        if let Some(sha256) = hooks.held(relative, &mut file, &before)? {
            out.write_all(&[STORED])?;
            write_bytes(out, relative.as_bytes())?;
            out.write_all(&mode.to_le_bytes())?;
            out.write_all(&size.to_le_bytes())?;
            out.write_all(&sha256)?;
            hooks.sent(relative, &before);
            return Ok(());
        }
        out.write_all(&[FILE])?;
        write_bytes(out, relative.as_bytes())?;
        out.write_all(&mode.to_le_bytes())?;
        out.write_all(&size.to_le_bytes())?;
        // Exactly `size` bytes, or the stream is cut: a file that shrinks
        // while it is read must not shift the records after it.
        let copied = io::copy(&mut (&mut file).take(size), out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{relative}: shrank from {size} to {copied} bytes while it was sent"),
            ));
        }
        let after = file.metadata()?;
        if (after.ctime(), after.ctime_nsec()) == (before.ctime(), before.ctime_nsec()) {
            hooks.sent(relative, &after);
        }
        Ok(())
    } else {
        Ok(())
    }
}

fn write_bytes(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let length = u16::try_from(bytes.len())
        .ok()
        .filter(|&length| usize::from(length) <= MAX_PATH)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a path of {} bytes, over {MAX_PATH}", bytes.len()),
            )
        })?;
    out.write_all(&length.to_le_bytes())?;
    out.write_all(bytes)
}

/// One record's header, as [`read_record`] reads it. A `File`'s `size`
/// bytes of content follow it in the stream, for the caller to read.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    End,
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        size: u64,
    },
    Symlink {
        path: String,
        target: Vec<u8>,
    },
    Missing {
        path: String,
    },
    Keep {
        path: String,
        in_place: bool,
    },
    Reuse {
        path: String,
        mode: u32,
        index: u32,
    },
    Stored {
        path: String,
        mode: u32,
        size: u64,
        sha256: [u8; 32],
    },
}

/// Reads the next record's header: what both the host's [`decode`] and
/// the agent's `put` read, each writing it its own way. Refuses an
/// unknown kind, a path or target over [`MAX_PATH`], and a path that is
/// not plain (see the module comment). Modes keep their permission bits
/// only.
pub fn read_record(input: &mut impl Read) -> io::Result<Record> {
    let kind = read_array::<1>(input)?[0];
    if kind == END {
        return Ok(Record::End);
    }
    let path = read_path(input)?;
    Ok(match kind {
        DIR => Record::Dir {
            path,
            mode: u32::from_le_bytes(read_array(input)?) & 0o7777,
        },
        FILE => Record::File {
            path,
            mode: u32::from_le_bytes(read_array(input)?) & 0o7777,
            size: u64::from_le_bytes(read_array(input)?),
        },
        SYMLINK => Record::Symlink {
            path,
            target: read_bytes(input)?,
        },
        MISSING => Record::Missing { path },
        KEEP => Record::Keep {
            path,
            in_place: read_array::<1>(input)?[0] != 0,
        },
        REUSE => Record::Reuse {
            path,
            mode: u32::from_le_bytes(read_array(input)?) & 0o7777,
            index: u32::from_le_bytes(read_array(input)?),
        },
        STORED => Record::Stored {
            path,
            mode: u32::from_le_bytes(read_array(input)?) & 0o7777,
            size: u64::from_le_bytes(read_array(input)?),
            sha256: read_array(input)?,
        },
        other => return Err(invalid(format!("an unknown record kind {other}"))),
    })
}

fn read_path(input: &mut impl Read) -> io::Result<String> {
    let bytes = read_bytes(input)?;
    let path = String::from_utf8(bytes).map_err(|_| invalid("a path that is not UTF-8"))?;
    let plain = !path.is_empty()
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != ".." && !part.contains('\0'));
    if plain {
        Ok(path)
    } else {
        Err(invalid(format!("{path:?} is not a plain relative path")))
    }
}

fn read_bytes(input: &mut impl Read) -> io::Result<Vec<u8>> {
    let length = usize::from(u16::from_le_bytes(read_array(input)?));
    if length > MAX_PATH {
        return Err(invalid(format!(
            "a path of {length} bytes, over {MAX_PATH}"
        )));
    }
    let mut bytes = vec![0; length];
    input.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn read_array<const N: usize>(input: &mut impl Read) -> io::Result<[u8; N]> {
    let mut bytes = [0; N];
    input.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

#[cfg(not(kiln_agent))]
pub use decoding::*;

#[cfg(not(kiln_agent))]
mod decoding {
    use super::*;
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::os::fd::{AsFd, OwnedFd};

    /// How much one stream may write.
    #[derive(Debug, Clone, Copy)]
    pub struct DecodeLimits {
        /// Entries (files, directories, symlinks).
        pub entries: u64,
        /// Bytes of file content.
        pub bytes: u64,
    }

    /// What a stream held.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub struct Decoded {
        pub entries: u64,
        pub bytes: u64,
        /// Declared outputs the action did not write.
        pub missing: Vec<String>,
        /// Files not sent (`STORED`), each an empty placeholder now: path,
        /// size and SHA-256.
        pub stored: Vec<(String, u64, [u8; 32])>,
    }

    /// Writes the entries of the stream beneath `dest` (see the module
    /// comment). Fails on the first malformed record, a path that is not
    /// a plain relative one, an entry that exists already, a parent that
    /// is not a directory the stream made or found beneath `dest`, or a
    /// limit passed; what it wrote so far stays.
    pub fn decode(input: &mut impl Read, dest: &Path, limits: DecodeLimits) -> io::Result<Decoded> {
        let root = rustix::fs::open(
            dest,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut decoded = Decoded::default();
        loop {
            match read_record(input)? {
                Record::End => return Ok(decoded),
                Record::Missing { path } => decoded.missing.push(path),
                Record::Keep { path, .. } | Record::Reuse { path, .. } => {
                    return Err(invalid(format!(
                        "{path}: a KEEP or REUSE record, which only the host sends"
                    )))
                }
                Record::Dir { path, mode } => {
                    let (parent, name) = admit(&root, &path, limits, &mut decoded)?;
                    rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(mode | 0o700))
                        .map_err(|e| at(&path, e.into()))?;
                }
                Record::Stored {
                    path,
                    mode,
                    size,
                    sha256,
                } => {
                    let (parent, name) = admit(&root, &path, limits, &mut decoded)?;
                    let file = create_file(&parent, name, mode).map_err(|e| at(&path, e))?;
                    rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))?;
                    decoded.stored.push((path, size, sha256));
                }
                Record::File { path, mode, size } => {
                    let (parent, name) = admit(&root, &path, limits, &mut decoded)?;
                    decoded.bytes = decoded.bytes.saturating_add(size);
                    if decoded.bytes > limits.bytes {
                        return Err(invalid(format!(
                            "the outputs hold more than {} bytes, the limit",
                            limits.bytes
                        )));
                    }
                    let mut file = create_file(&parent, name, mode).map_err(|e| at(&path, e))?;
                    let copied = io::copy(&mut input.take(size), &mut file)?;
                    if copied != size {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("{path}: the stream ended {copied} bytes into {size}"),
                        ));
                    }
                    // The mode as sent, past the umask.
                    rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))?;
                }
                Record::Symlink { path, target } => {
                    let (parent, name) = admit(&root, &path, limits, &mut decoded)?;
                    rustix::fs::symlinkat(std::ffi::OsStr::from_bytes(&target), &parent, name)
                        .map_err(|e| at(&path, e.into()))?;
                }
            }
        }
    }

    /// A new file `name` in `parent`, never over anything, never through
    /// a symlink.
    fn create_file(parent: &OwnedFd, name: &str, mode: u32) -> io::Result<std::fs::File> {
        let file = rustix::fs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode | 0o600),
        )?;
        Ok(std::fs::File::from(file))
    }

    /// Counts entry `path` against the limits; its parent directory and
    /// its name.
    fn admit<'p>(
        root: &OwnedFd,
        path: &'p str,
        limits: DecodeLimits,
        decoded: &mut Decoded,
    ) -> io::Result<(OwnedFd, &'p str)> {
        decoded.entries += 1;
        if decoded.entries > limits.entries {
            return Err(invalid(format!(
                "the outputs hold more than {} entries, the limit",
                limits.entries
            )));
        }
        parent_of(root, path)
    }

    /// The directory that holds `path` beneath `root`, reached without
    /// following any symlink, and `path`'s last component.
    fn parent_of<'p>(root: &OwnedFd, path: &'p str) -> io::Result<(OwnedFd, &'p str)> {
        let (parent, name) = match path.rsplit_once('/') {
            Some((parent, name)) => (parent, name),
            None => (".", path),
        };
        let parent = rustix::fs::openat2(
            root.as_fd(),
            parent,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| at(path, e.into()))?;
        Ok((parent, name))
    }

    fn at(path: &str, error: io::Error) -> io::Error {
        io::Error::new(error.kind(), format!("{path}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const LIMITS: DecodeLimits = DecodeLimits {
        entries: 1000,
        bytes: 1 << 20,
    };

    fn round_trip(source: &Path, outputs: &[&str], dest: &Path) -> io::Result<Decoded> {
        let mut stream = Vec::new();
        for output in outputs {
            encode(&mut stream, source, output)?;
        }
        finish(&mut stream)?;
        decode(&mut stream.as_slice(), dest, LIMITS)
    }

    #[test]
    fn a_tree_arrives_as_it_was_with_modes_and_symlinks_and_missing_outputs_named() {
        let source = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(source.path().join("out/sub")).unwrap();
        std::fs::write(source.path().join("out/sub/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            source.path().join("out/sub/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(source.path().join("single"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", source.path().join("out/link")).unwrap();

        let decoded = round_trip(source.path(), &["out", "single", "absent"], dest.path()).unwrap();

        assert_eq!(decoded.missing, vec!["absent".to_string()]);
        assert_eq!(decoded.entries, 5);
        assert_eq!(
            std::fs::read(dest.path().join("out/sub/tool")).unwrap(),
            b"#!/bin/sh\n"
        );
        let mode = std::fs::metadata(dest.path().join("out/sub/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(std::fs::read(dest.path().join("single")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(dest.path().join("out/link")).unwrap(),
            Path::new("/etc/passwd")
        );
    }

    fn record(kind: u8, path: &str) -> Vec<u8> {
        let mut bytes = vec![kind];
        bytes.extend((path.len() as u16).to_le_bytes());
        bytes.extend(path.as_bytes());
        bytes
    }

    fn file(path: &str, content: &[u8]) -> Vec<u8> {
        let mut bytes = record(FILE, path);
        bytes.extend(0o644u32.to_le_bytes());
        bytes.extend((content.len() as u64).to_le_bytes());
        bytes.extend(content);
        bytes
    }

    #[test]
    fn a_hostile_stream_writes_nothing_outside_its_destination() {
        let outside = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"original").unwrap();

        // Through a symlink the stream made itself.
        let mut through_symlink = record(SYMLINK, "escape");
        let target = outside.path().to_str().unwrap();
        through_symlink.extend((target.len() as u16).to_le_bytes());
        through_symlink.extend(target.as_bytes());
        through_symlink.extend(file("escape/victim", b"changed"));
        through_symlink.push(END);
        assert!(decode(&mut through_symlink.as_slice(), dest.path(), LIMITS).is_err());

        // Dot-dot, absolute and empty components.
        for path in ["../victim", "/victim", "a//b", "./x", ""] {
            let mut stream = file(path, b"changed");
            stream.push(END);
            let error = decode(&mut stream.as_slice(), dest.path(), LIMITS).unwrap_err();
            assert!(error.to_string().contains("plain relative path"), "{error}");
        }

        // The host's records for a warm VM's inputs, from a guest.
        let mut keep = record(KEEP, "victim");
        keep.extend([1, END]);
        let error = decode(&mut keep.as_slice(), dest.path(), LIMITS).unwrap_err();
        assert!(error.to_string().contains("only the host sends"), "{error}");

        // The same name twice: the second never replaces or follows the first.
        let mut twice = record(SYMLINK, "twice");
        let victim_path = victim.to_str().unwrap();
        twice.extend((victim_path.len() as u16).to_le_bytes());
        twice.extend(victim_path.as_bytes());
        twice.extend(file("twice", b"changed"));
        twice.push(END);
        assert!(decode(&mut twice.as_slice(), dest.path(), LIMITS).is_err());

        assert_eq!(std::fs::read(&victim).unwrap(), b"original");
    }

    #[test]
    fn limits_and_truncation_are_errors_naming_them() {
        let dest = tempfile::tempdir().unwrap();
        let mut big = file("big", &[7; 100]);
        big.push(END);
        let error = decode(
            &mut big.as_slice(),
            dest.path(),
            DecodeLimits {
                entries: 10,
                bytes: 99,
            },
        )
        .unwrap_err();
        assert!(error.to_string().contains("99 bytes"), "{error}");

        let dest = tempfile::tempdir().unwrap();
        let mut cut = file("cut", &[7; 100]);
        cut.truncate(cut.len() - 10);
        let error = decode(&mut cut.as_slice(), dest.path(), LIMITS).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
    }

    /// A file the hooks say the receiver holds goes as `STORED`: no bytes,
    /// an empty placeholder with its mode, reported with the size and
    /// hash the hooks gave; the others arrive whole, and the file that was
    /// asked about is read again from its start when it is sent.
    #[test]
    fn a_held_file_arrives_as_a_placeholder_and_is_reported() {
        struct HoldBig(Vec<String>);
        impl EncodeHooks for HoldBig {
            fn held(
                &mut self,
                relative: &str,
                file: &mut std::fs::File,
                metadata: &std::fs::Metadata,
            ) -> io::Result<Option<[u8; 32]>> {
                self.0.push(relative.to_string());
                // Read it all, as a hasher would.
                io::copy(file, &mut io::sink())?;
                use std::io::Seek;
                file.rewind()?;
                Ok((metadata.len() >= 1000).then_some([9; 32]))
            }
        }
        let source = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(source.path().join("out")).unwrap();
        std::fs::write(source.path().join("out/big"), vec![1u8; 5000]).unwrap();
        std::fs::set_permissions(
            source.path().join("out/big"),
            std::fs::Permissions::from_mode(0o751),
        )
        .unwrap();
        std::fs::write(source.path().join("out/small"), b"small").unwrap();
        let mut hooks = HoldBig(Vec::new());
        let mut stream = Vec::new();
        encode_with(&mut stream, source.path(), "out", &mut hooks).unwrap();
        finish(&mut stream).unwrap();
        assert!(stream.len() < 1000, "the held file's bytes were sent");
        assert_eq!(hooks.0, ["out/big", "out/small"]);

        let decoded = decode(&mut stream.as_slice(), dest.path(), LIMITS).unwrap();
        assert_eq!(decoded.stored, vec![("out/big".to_string(), 5000, [9; 32])]);
        assert_eq!(decoded.bytes, 5, "only the small file's bytes count");
        let placeholder = std::fs::metadata(dest.path().join("out/big")).unwrap();
        assert_eq!(placeholder.len(), 0);
        assert_eq!(placeholder.permissions().mode() & 0o777, 0o751);
        assert_eq!(
            std::fs::read(dest.path().join("out/small")).unwrap(),
            b"small"
        );
    }
}
