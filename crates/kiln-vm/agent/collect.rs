//! The agent's `collect ROOT ASK_FROM PATH…`: the outputs at each PATH
//! beneath ROOT, as a tree stream (`src/tree_stream.rs`) in `tree` frames
//! on the data port.
//!
//! Each regular file of at least ASK_FROM bytes (0: none) is hashed here
//! first (`sha256.rs`), and the agent asks the host whether the CAS holds
//! it: `ask SIZE SHA256_HEX` on the data port, in order with the stream,
//! and the host's `verdict 1` (held) or `verdict 0` on control. A held file
//! goes as a `STORED` record, its bytes never crossing; any other is sent
//! whole. A file that changed while it was hashed is sent whole unasked.
//! Each file sent or stored unchanged is noted ([`SentFiles`]), for the
//! next `put` to keep.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use super::frame;
use super::sha256::Sha256;
use super::store::SentFiles;
use super::tree_stream::{self, EncodeHooks};
use super::{poll_one, DataPort, Port, DRAIN_TIMEOUT, POLLIN};

/// Bytes of tree stream per `tree` frame.
const TREE_CHUNK: usize = 256 * 1024;

/// Sends the outputs `fields` (`ROOT ASK_FROM PATH…`) name, noting in
/// `sent` each file it sent or stored unchanged.
pub(super) fn collect(
    data: &mut DataPort,
    control: &mut Port,
    sent: &mut SentFiles,
    fields: &[Vec<u8>],
) -> Result<(), String> {
    let [root, ask_from, paths @ ..] = fields else {
        return Err("malformed collect request".into());
    };
    let root = Path::new(std::ffi::OsStr::from_bytes(root));
    let ask_from = std::str::from_utf8(ask_from)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or("malformed collect request: ASK_FROM")?;
    let data = RefCell::new(data);
    let mut writer = TreeWriter {
        port: &data,
        frame: Vec::with_capacity(TREE_HEADER + TREE_CHUNK),
    };
    sent.clear();
    let mut hooks = Hooks {
        port: &data,
        control,
        sent,
        ask_from,
    };
    for path in paths {
        let path = std::str::from_utf8(path).map_err(|_| "a path that is not UTF-8")?;
        tree_stream::encode_with(&mut writer, root, path, &mut hooks)
            .map_err(|e| format!("{path}: {e}"))?;
    }
    tree_stream::finish(&mut writer).map_err(|e| e.to_string())
}

/// A `tree` frame's bytes before its content.
const TREE_HEADER: usize = frame::open_length(&[b"tree"]);

/// The tree stream, cut into `tree` frames on the data port, each sent
/// once the host has taken the one before. Each frame is built in place
/// (its lengths filled in when it is full) and handed to the port without
/// a copy: under emulation every copy of the outputs counts.
struct TreeWriter<'a, 'p> {
    port: &'a RefCell<&'p mut DataPort>,
    /// The frame being filled; empty between frames.
    frame: Vec<u8>,
}

impl TreeWriter<'_, '_> {
    fn send_chunk(&mut self) -> io::Result<()> {
        if self.frame.len() <= TREE_HEADER {
            return Ok(());
        }
        frame::close(&mut self.frame, TREE_HEADER);
        let mut port = self.port.borrow_mut();
        port.send_frame(&mut self.frame);
        self.frame.clear();
        port.drain().map_err(io::Error::other)
    }
}

impl Write for TreeWriter<'_, '_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.frame.is_empty() {
            frame::open(&mut self.frame, &[b"tree"]);
        }
        let room = TREE_HEADER + TREE_CHUNK - self.frame.len();
        let taken = bytes.len().min(room);
        self.frame.extend_from_slice(&bytes[..taken]);
        if self.frame.len() == TREE_HEADER + TREE_CHUNK {
            self.send_chunk()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_chunk()
    }
}

struct Hooks<'a, 'p> {
    port: &'a RefCell<&'p mut DataPort>,
    control: &'a mut Port,
    sent: &'a mut SentFiles,
    ask_from: u64,
}

impl EncodeHooks for Hooks<'_, '_> {
    fn sent(&mut self, relative: &str, metadata: &std::fs::Metadata) {
        self.sent.insert(
            relative.to_owned(),
            (metadata.ino(), metadata.ctime(), metadata.ctime_nsec()),
        );
    }

    fn held(
        &mut self,
        _relative: &str,
        file: &mut std::fs::File,
        metadata: &std::fs::Metadata,
    ) -> io::Result<Option<[u8; 32]>> {
        if self.ask_from == 0 || metadata.len() < self.ask_from {
            return Ok(None);
        }
        let Some(sha256) = hash_unchanged(file, metadata)? else {
            return Ok(None);
        };
        let hex = super::sha256::hex(&sha256);
        {
            let mut port = self.port.borrow_mut();
            port.send(&[b"ask", metadata.len().to_string().as_bytes(), hex.as_bytes()]);
            port.drain().map_err(io::Error::other)?;
        }
        let verdict = self.verdict()?;
        Ok(verdict.then_some(sha256))
    }
}

impl Hooks<'_, '_> {
    /// The host's `verdict` on control, waited for at most
    /// [`DRAIN_TIMEOUT`].
    fn verdict(&mut self) -> io::Result<bool> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::other(format!(
                    "the host gave no verdict in {DRAIN_TIMEOUT:?}"
                )));
            }
            let wait_ms = left.as_millis().min(1000) as i32;
            if !poll_one(self.control.file.as_raw_fd(), POLLIN, wait_ms) {
                continue;
            }
            if let Some(frame) = self.control.receive().into_iter().next() {
                return match frame.first().map(Vec::as_slice) {
                    Some(b"verdict") => Ok(frame.get(1).map(Vec::as_slice) == Some(b"1")),
                    _ => Err(io::Error::other("expected a verdict from the host")),
                };
            }
        }
    }
}

/// The SHA-256 of `file` (from its start, then back there), if it did not
/// change while it was read: its ctime and size are as `metadata` says.
fn hash_unchanged(
    file: &mut std::fs::File,
    metadata: &std::fs::Metadata,
) -> io::Result<Option<[u8; 32]>> {
    use std::io::Seek;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    file.rewind()?;
    let after = file.metadata()?;
    let unchanged = (after.ctime(), after.ctime_nsec(), after.len())
        == (metadata.ctime(), metadata.ctime_nsec(), metadata.len());
    Ok(unchanged.then(|| hasher.finish()))
}
