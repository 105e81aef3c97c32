//! The agent's `put ROOT`: a warm VM's next inputs. The directory ROOT
//! (the workspace disk's mount) is emptied of the last action's files,
//! then the tree stream (`src/tree_stream.rs`) the host sends in `tree`
//! frames on the data port, up to `end`, is written into it. The host is
//! trusted here (it is the one that booted this VM), so plain `std::fs`
//! calls decode it; paths are still checked to stay beneath ROOT.
//!
//! Files of the last inputs the host names in `KEEP` records are kept
//! (where they are, or moved aside and then into place by their `REUSE`
//! records) instead of being sent again, if the last action left each as
//! it was put: a regular file with one link, beneath real directories,
//! whose inode has not changed since that action started. Any change to
//! a file (a write, a truncation, a chmod or chown, a rename or link onto
//! its path) sets its ctime to the time of the change, which no process
//! can set back, so a ctime before the action's start is a file the
//! action never touched. The start is read from the coarse clock the
//! kernel stamps ctimes with, and an action starts only once that clock
//! has passed the end of the put before it ([`action_start`]), so the
//! put's own changes are always before it. A file the action wrote is
//! kept if it is still the inode `collect` sent, with the ctime it had
//! then (the host holds its digest as one of the action's outputs): only
//! a process the action left running can change it after that, and such
//! a process can change the next action's files anyway. A `REUSE` of a
//! file that was not kept makes the answer `stale PATH`: the host sends
//! everything again.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::tree_stream::{read_record, Record};
use super::{frame, poll_one, DataPort, DRAIN_TIMEOUT, POLLIN};

/// The workspace root's entry `mke2fs` made, which every fresh disk has.
const LOST_AND_FOUND: &str = "lost+found";

/// Where kept files wait, numbered, between the emptying and their
/// `REUSE`: in `lost+found`, on the same file system and never part of
/// the inputs.
const KEPT: &str = "lost+found/kiln-kept";

/// The longest an action's start waits for the coarse clock to pass the
/// end of the put before it: a few ticks.
const TICK_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// The files a `collect` sent whole, by path beneath its root: their
/// inode and ctime (seconds, nanoseconds) while they were read.
pub(super) type SentFiles = HashMap<String, (u64, i64, i64)>;

/// What a `put` did, when it did not fail.
pub(super) struct Stored {
    /// A `REUSE` named this path's file, which the last action changed
    /// (None: every entry is in place).
    pub stale: Option<String>,
    /// Whether it wrote, moved or changed the mode of a file: one a later
    /// put may keep, whose ctime the next action's start must be past.
    pub touched_files: bool,
}

/// Empties `ROOT` and writes the stream the host sends into it, keeping
/// the files `KEEP` names that the last action, started at `last_start`
/// (seconds and nanoseconds of the real-time clock; None: no action ran,
/// nothing is kept), left unchanged. The stream is always read to its
/// `end`, whatever fails, so the data port stays in step with the host.
pub(super) fn put(
    port: &mut DataPort,
    fields: &[Vec<u8>],
    last_start: Option<(i64, i64)>,
    collected: &SentFiles,
) -> Result<Stored, String> {
    let mut buffer = std::mem::take(&mut port.inbox);
    if buffer.is_empty() {
        buffer = vec![0; FIRST_READ_BUFFER];
    }
    let mut reader = TreeReader {
        port,
        buffer,
        start: 0,
        filled: 0,
        at: 0,
        chunk_end: 0,
        ended: false,
    };
    let stored = match fields.first() {
        Some(root) => {
            let root = Path::new(std::ffi::OsStr::from_bytes(root));
            let mut input = io::BufReader::with_capacity(256 * 1024, &mut reader);
            store(&mut input, root, last_start, collected)
                .map_err(|e| format!("writing the inputs into {}: {e}", root.display()))
        }
        None => Err("malformed put request".to_string()),
    };
    let skipped = reader.skip_to_end();
    stored.and_then(|stored| {
        skipped
            .map(|()| stored)
            .map_err(|e| format!("reading the inputs: {e}"))
    })
}

/// A file a `KEEP` record named, once checked.
enum Kept {
    /// Changed by the last action (or not there): not kept.
    Stale,
    /// Kept where it is, at this path, with these permission bits.
    InPlace(String, u32),
    /// Kept in the aside directory, under its number.
    Aside,
}

/// Keeps the `KEEP` files that are unchanged, empties `root` of the rest
/// and writes the rest of the stream into it.
fn store(
    input: &mut impl Read,
    root: &Path,
    last_start: Option<(i64, i64)>,
    collected: &SentFiles,
) -> io::Result<Stored> {
    use std::os::unix::fs::PermissionsExt;
    let kept_dir = root.join(KEPT);
    let mut kept_dir_made = false;
    let mut kept = Vec::new();
    // The files kept in place and their ancestors, relative to `root`.
    let mut staying = HashSet::new();
    let mut real_dirs = HashSet::new();
    let mut record = read_record(input)?;
    while let Record::Keep { path, in_place } = &record {
        let aside = kept_dir.join(kept.len().to_string());
        let mode = unchanged(root, path, last_start, collected, &mut real_dirs);
        kept.push(if mode.is_none() {
            Kept::Stale
        } else if let (true, Some(mode)) = (*in_place, mode) {
            staying.extend(Path::new(path).ancestors().map(Path::to_path_buf));
            Kept::InPlace(path.clone(), mode)
        } else if (kept_dir_made || make_kept_dir(root).is_ok())
            && std::fs::rename(root.join(path), &aside).is_ok()
        {
            kept_dir_made = true;
            Kept::Aside
        } else {
            Kept::Stale
        });
        record = read_record(input)?;
    }
    empty(root, Path::new(""), &staying)?;
    let mut stale = None;
    let mut touched_files = false;
    loop {
        touched_files |= matches!(record, Record::File { .. });
        match record {
            Record::End => break,
            Record::Dir { path, mode } => {
                let path = root.join(path);
                match std::fs::create_dir(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
            Record::File { path, mode, size } => {
                let mut file = std::fs::File::create(root.join(path))?;
                let copied = io::copy(&mut input.take(size), &mut file)?;
                if copied != size {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            }
            Record::Reuse { path, mode, index } => {
                let target = root.join(&path);
                let had = match kept.get(index as usize) {
                    Some(Kept::InPlace(at, had)) if *at == path => *had,
                    Some(Kept::Aside) => {
                        std::fs::rename(kept_dir.join(index.to_string()), &target)?;
                        touched_files = true;
                        std::fs::symlink_metadata(&target)?.permissions().mode() & 0o7777
                    }
                    _ => {
                        stale.get_or_insert(path);
                        record = read_record(input)?;
                        continue;
                    }
                };
                // A chmod sets the ctime: only when the mode differs.
                if had != mode {
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
                    touched_files = true;
                }
            }
            Record::Symlink { path, target } => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), root.join(path))?;
            }
            Record::Missing { .. } | Record::Keep { .. } | Record::Stored { .. } => {
                return Err(io::Error::other("a record out of place among the inputs"))
            }
        }
        record = read_record(input)?;
    }
    if kept_dir_made {
        remove_all(&kept_dir)?;
    }
    Ok(Stored {
        stale,
        touched_files,
    })
}

/// Makes the (empty) directory kept files wait in, in a `lost+found`
/// that is a real directory (the last action may have replaced it).
fn make_kept_dir(root: &Path) -> io::Result<()> {
    let lost_and_found = root.join(LOST_AND_FOUND);
    if !std::fs::symlink_metadata(&lost_and_found).is_ok_and(|m| m.is_dir()) {
        let _ = std::fs::remove_file(&lost_and_found);
        std::fs::create_dir(&lost_and_found)?;
    }
    let kept_dir = root.join(KEPT);
    remove_all(&kept_dir)?;
    std::fs::create_dir(&kept_dir)
}

/// Whether `root`'s `path` is as the last put left it, the last action
/// having started at `last_start`, or as the last collect sent it (see
/// the module comment): its permission bits if it is.
fn unchanged(
    root: &Path,
    path: &str,
    last_start: Option<(i64, i64)>,
    collected: &SentFiles,
    real_dirs: &mut HashSet<PathBuf>,
) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    // Each ancestor a directory, not a symlink to one (checked in order,
    // so none is reached through a symlink).
    let mut parent = PathBuf::new();
    for part in Path::new(path).parent().into_iter().flat_map(Path::components) {
        parent.push(part);
        if real_dirs.contains(&parent) {
            continue;
        }
        match std::fs::symlink_metadata(root.join(&parent)) {
            Ok(metadata) if metadata.file_type().is_dir() => {
                real_dirs.insert(parent.clone());
            }
            _ => return None,
        }
    }
    let metadata = std::fs::symlink_metadata(root.join(path)).ok()?;
    let ctime = (metadata.ctime(), metadata.ctime_nsec());
    let as_put = last_start.is_some_and(|start| ctime < start);
    let as_sent = collected.get(path) == Some(&(metadata.ino(), ctime.0, ctime.1));
    (metadata.file_type().is_file() && metadata.nlink() == 1 && (as_put || as_sent))
        .then(|| metadata.permissions().mode() & 0o7777)
}

/// The coarse clock's time at which an action starts after a `put` that
/// ended at `put_end` (None: no put since the last action): one tick
/// past `put_end`, waited for, so that every file time the put set is
/// before it. None if the clock does not pass it within a few ticks:
/// then the next put keeps nothing.
pub(super) fn action_start(
    put_end: Option<(i64, i64)>,
    coarse_now: fn() -> (i64, i64),
) -> Option<(i64, i64)> {
    let Some(put_end) = put_end else {
        return Some(coarse_now());
    };
    let deadline = Instant::now() + TICK_WAIT;
    loop {
        let now = coarse_now();
        if now > put_end {
            return Some(now);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// Removes `path` and everything beneath it, if it is there.
fn remove_all(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes everything in `root`'s directory `relative` but a top-level
/// `lost+found` and the files in `staying` (and the directories that lead
/// to them, emptied of all else).
fn empty(root: &Path, relative: &Path, staying: &HashSet<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(root.join(relative))? {
        let entry = entry?;
        let name = entry.file_name();
        if relative.as_os_str().is_empty() && name == LOST_AND_FOUND {
            continue;
        }
        let path = relative.join(&name);
        // Not followed: a symlink is removed as one.
        let is_dir = entry.file_type()?.is_dir();
        if staying.contains(&path) {
            if is_dir {
                empty(root, &path, staying)?;
            }
        } else if is_dir {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// What the first `put` reads the data port into: an empty put's frames
/// (zeroing memory is slow under emulation).
const FIRST_READ_BUFFER: usize = 64 << 10;

/// What the buffer grows to for a frame larger than it: several of the
/// host's `tree` frames.
const GROWN_READ_BUFFER: usize = 1 << 20;

/// The bytes of the `tree` frames arriving on the (non-blocking) data
/// port, until `end`. Frames are read into one buffer and their content
/// is read from there: under emulation every copy of the inputs counts.
struct TreeReader<'a> {
    port: &'a mut DataPort,
    /// Bytes read from the port, up to `filled`; frames not yet parsed
    /// start at `start`. The port's own (`DataPort::inbox`), kept from one
    /// put to the next (zeroing memory is slow under emulation), grown
    /// only for a frame larger than it.
    buffer: Vec<u8>,
    start: usize,
    filled: usize,
    /// The current frame's content in `buffer`, read up to `at`.
    at: usize,
    chunk_end: usize,
    ended: bool,
}

impl TreeReader<'_> {
    /// The next frame's content; `ended` at `end`. Waits at most
    /// [`DRAIN_TIMEOUT`] without progress: the host sends as it asked.
    fn next_frame(&mut self) -> io::Result<()> {
        let mut last_progress = Instant::now();
        loop {
            let available = self.filled - self.start;
            let mut needed = 4;
            if let Some(length) = frame::body_length(&self.buffer[self.start..self.filled])
                .map_err(io::Error::other)?
            {
                needed = 4 + length;
                if available >= needed {
                    let body = self.start + 4..self.start + needed;
                    self.start = body.end;
                    return self.take_frame(body);
                }
            }
            if self.buffer.len() - self.start < needed {
                // The frame does not fit from where it starts: move it
                // to the front, and grow for one larger than the buffer.
                self.buffer.copy_within(self.start..self.filled, 0);
                self.filled = available;
                self.start = 0;
                if self.buffer.len() < needed {
                    self.buffer.resize(needed.max(GROWN_READ_BUFFER), 0);
                }
            }
            match self.port.file.read(&mut self.buffer[self.filled..]) {
                Ok(n) if n > 0 => {
                    self.filled += n;
                    last_progress = Instant::now();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                _ => {}
            }
            if last_progress.elapsed() > DRAIN_TIMEOUT {
                return Err(io::Error::other(format!(
                    "the host sent nothing for {DRAIN_TIMEOUT:?}"
                )));
            }
            poll_one(self.port.file.as_raw_fd(), POLLIN, 100);
        }
    }

    /// The frame whose body is `body` in the buffer: `tree CONTENT`
    /// (its content is read next) or `end`.
    fn take_frame(&mut self, body: std::ops::Range<usize>) -> io::Result<()> {
        let malformed = || io::Error::other("a malformed frame among the inputs");
        let fields = frame::field_ranges(&self.buffer[body.clone()]).ok_or_else(malformed)?;
        let field = |i: usize| fields.get(i).map(|f| body.start + f.start..body.start + f.end);
        let name = field(0).ok_or_else(malformed)?;
        match &self.buffer[name] {
            b"tree" => {
                let content = field(1).ok_or_else(malformed)?;
                (self.at, self.chunk_end) = (content.start, content.end);
            }
            b"end" => self.ended = true,
            _ => return Err(io::Error::other("an unexpected frame among the inputs")),
        }
        Ok(())
    }

    /// Reads (and drops) what is left up to `end`.
    fn skip_to_end(&mut self) -> io::Result<()> {
        while !self.ended {
            self.next_frame()?;
        }
        Ok(())
    }
}

impl Drop for TreeReader<'_> {
    fn drop(&mut self) {
        self.port.inbox = std::mem::take(&mut self.buffer);
    }
}

impl Read for TreeReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk_end {
            if self.ended {
                return Ok(0);
            }
            self.next_frame()?;
        }
        let taken = out.len().min(self.chunk_end - self.at);
        out[..taken].copy_from_slice(&self.buffer[self.at..self.at + taken]);
        self.at += taken;
        Ok(taken)
    }
}
