//! The agent's `put ROOT`: a warm VM's next inputs. The directory ROOT
//! (the workspace disk's mount) is emptied of the last action's files,
//! then the tree stream (`src/tree_stream.rs`) the host sends in `tree`
//! frames on the data port, up to `end`, is written into it. The host is
//! trusted here (it is the one that booted this VM), so plain `std::fs`
//! calls decode it; paths are still checked to stay beneath ROOT.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Instant;

use super::tree_stream::{read_record, Record};
use super::{frame, poll, DataPort, PollFd, DRAIN_TIMEOUT, POLLIN};

/// The workspace root's entry `mke2fs` made, which every fresh disk has.
const LOST_AND_FOUND: &str = "lost+found";

/// Empties `ROOT` and writes the stream the host sends into it. The
/// stream is always read to its `end`, whatever fails, so the data port
/// stays in step with the host.
pub(super) fn put(port: &mut DataPort, fields: &[Vec<u8>]) -> Result<(), String> {
    let mut reader = TreeReader {
        port,
        buffer: Vec::new(),
        read_buffer: vec![0; 64 * 1024],
        chunk: Vec::new(),
        at: 0,
        ended: false,
    };
    let stored = match fields.first() {
        Some(root) => {
            let root = Path::new(std::ffi::OsStr::from_bytes(root));
            empty(root)
                .map_err(|e| format!("emptying {}: {e}", root.display()))
                .and_then(|()| {
                    decode(&mut io::BufReader::with_capacity(256 * 1024, &mut reader), root)
                        .map_err(|e| format!("writing the inputs into {}: {e}", root.display()))
                })
        }
        None => Err("malformed put request".to_string()),
    };
    let skipped = reader.skip_to_end();
    stored.and(skipped.map_err(|e| format!("reading the inputs: {e}")))
}

/// Removes everything in `root` but a top-level `lost+found`.
fn empty(root: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_name() == LOST_AND_FOUND {
            continue;
        }
        let path = entry.path();
        if std::fs::symlink_metadata(&path)?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Writes the records of `input` beneath `root` (their paths were checked
/// to be plain relative ones by [`read_record`]).
fn decode(input: &mut impl Read, root: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    loop {
        match read_record(input)? {
            Record::End => return Ok(()),
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
            Record::Symlink { path, target } => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), root.join(path))?;
            }
            Record::Missing { .. } => {}
        }
    }
}

/// The bytes of the `tree` frames arriving on the (non-blocking) data
/// port, until `end`.
struct TreeReader<'a> {
    port: &'a mut DataPort,
    /// Bytes read from the port, not yet a whole frame.
    buffer: Vec<u8>,
    /// What each read of the port fills (allocated once: zeroing memory
    /// is slow under emulation).
    read_buffer: Vec<u8>,
    /// The current frame's bytes, and how many were read.
    chunk: Vec<u8>,
    at: usize,
    ended: bool,
}

impl TreeReader<'_> {
    /// The next frame into `chunk`; `ended` at `end`. Waits at most
    /// [`DRAIN_TIMEOUT`] without progress: the host sends as it asked.
    fn next_frame(&mut self) -> io::Result<()> {
        let mut last_progress = Instant::now();
        loop {
            match frame::take(&mut self.buffer) {
                Ok(Some(fields)) => {
                    match fields.first().map(Vec::as_slice) {
                        Some(b"tree") => {
                            self.chunk = fields.into_iter().nth(1).unwrap_or_default();
                            self.at = 0;
                        }
                        Some(b"end") => self.ended = true,
                        _ => return Err(io::Error::other("an unexpected frame among the inputs")),
                    }
                    return Ok(());
                }
                Ok(None) => {}
                Err(why) => return Err(io::Error::other(why)),
            }
            match self.port.file.read(&mut self.read_buffer) {
                Ok(n) if n > 0 => {
                    self.buffer.extend_from_slice(&self.read_buffer[..n]);
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
            let mut fd = [PollFd {
                fd: self.port.file.as_raw_fd(),
                events: POLLIN,
                revents: 0,
            }];
            // SAFETY: a one-element live pollfd array.
            unsafe { poll(fd.as_mut_ptr(), 1, 100) };
        }
    }

    /// Reads (and drops) what is left up to `end`.
    fn skip_to_end(&mut self) -> io::Result<()> {
        while !self.ended {
            self.next_frame()?;
        }
        Ok(())
    }
}

impl Read for TreeReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            self.next_frame()?;
        }
        let taken = out.len().min(self.chunk.len() - self.at);
        out[..taken].copy_from_slice(&self.chunk[self.at..self.at + taken]);
        self.at += taken;
        Ok(taken)
    }
}
