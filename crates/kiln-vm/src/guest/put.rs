//! The host's side of the agent's `put`: a directory of the host (a warm
//! VM's next inputs) sent as a tree stream ([`crate::tree_stream`]) on the
//! data port, which the agent writes into the emptied workspace. Files
//! the guest holds already from the last inputs, by digest, are named
//! ([`ReusePlan`]) instead of sent; the agent keeps each the last action
//! left unchanged, and answers `stale` if one was changed.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kiln_worker::isolation::InputDigests;
use tokio::io::AsyncWriteExt;

use super::{describe, field_text, frame, Guest};
use crate::VmError;

/// Bytes of tree stream per `tree` frame.
const CHUNK: usize = 256 * 1024;

/// Chunks waiting between the encoder and the port.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Which files of the inputs a guest holds the next inputs take, in place
/// of their content.
#[derive(Debug, Default, Clone)]
pub struct ReusePlan {
    /// The held inputs' paths to keep, in `KEEP` order, and whether each
    /// stays where it is.
    keep: Vec<(String, bool)>,
    /// Each next input path that takes a kept file, and its number.
    reuse: HashMap<String, u32>,
    /// Bytes of content the kept files spare the stream.
    reused_bytes: u64,
}

impl ReusePlan {
    /// Reuses, for each of `next`'s files, the held file at the same path
    /// with the same digest, or else any held file with its digest not
    /// reused yet. Empty files are sent: their record is all they cost.
    pub fn new(held: &InputDigests, next: &InputDigests) -> ReusePlan {
        let mut plan = ReusePlan::default();
        let mut by_digest: HashMap<_, Vec<&str>> = HashMap::new();
        for (path, digest) in held {
            if digest.size_bytes > 0 && next.get(path) != Some(digest) {
                by_digest.entry(digest).or_default().push(path);
            }
        }
        let mut later = Vec::new();
        for (path, digest) in next.iter().filter(|(_, d)| d.size_bytes > 0) {
            if held.get(path) == Some(digest) {
                plan.take(path, path, digest.size_bytes);
            } else {
                later.push((path, digest));
            }
        }
        for (path, digest) in later {
            if let Some(from) = by_digest.get_mut(digest).and_then(Vec::pop) {
                plan.take(path, from, digest.size_bytes);
            }
        }
        plan
    }

    fn take(&mut self, path: &str, from: &str, size: i64) {
        let index = self.keep.len() as u32;
        self.keep.push((from.to_owned(), from == path));
        self.reuse.insert(path.to_owned(), index);
        self.reused_bytes += size.max(0) as u64;
    }
}

/// What a `put` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// Bytes of tree stream sent.
    pub stream_bytes: u64,
    /// Files taken from the held inputs, and their bytes.
    pub reused_files: usize,
    pub reused_bytes: u64,
    /// A held file the plan reused that the last action changed: the
    /// workspace is incomplete, and the inputs must be sent whole.
    pub stale: Option<String>,
}

impl Guest {
    /// Empties `guest_root` in the guest and writes the tree of
    /// `host_root`'s entries into it (regular files, directories and
    /// symlinks, with their modes; symlinks are never followed), the files
    /// of `plan` taken from the inputs the guest held.
    pub async fn put(
        &self,
        guest_root: &Path,
        host_root: &Path,
        plan: ReusePlan,
    ) -> Result<Put, VmError> {
        self.put_after(guest_root, host_root, plan, false).await
    }

    /// [`Guest::ping`] then [`Guest::put`], the `put` sent without waiting
    /// for the `pong`: what a resumed warm VM needs before its next
    /// action, in one round trip.
    pub async fn ping_and_put(
        &self,
        guest_root: &Path,
        host_root: &Path,
        plan: ReusePlan,
    ) -> Result<Put, VmError> {
        self.put_after(guest_root, host_root, plan, true).await
    }

    async fn put_after(
        &self,
        guest_root: &Path,
        host_root: &Path,
        plan: ReusePlan,
        ping: bool,
    ) -> Result<Put, VmError> {
        let mut readers = self.readers.lock().await;
        if ping {
            self.send_ping().await?;
        }
        self.send(&[b"put", guest_root.as_os_str().as_bytes()])
            .await?;
        let (sender, mut chunks) = tokio::sync::mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let (reused_files, reused_bytes) = (plan.keep.len(), plan.reused_bytes);
        let encoder = {
            let host_root = host_root.to_path_buf();
            tokio::task::spawn_blocking(move || encode_tree(&host_root, &plan, sender))
        };
        let mut data = self.data_writer.lock().await;
        let mut sent = Ok(());
        while let Some(chunk) = chunks.recv().await {
            if sent.is_ok() {
                sent = data.write_all(&frame::encode(&[b"tree", &chunk])).await;
            }
        }
        let encoded = encoder
            .await
            .map_err(|e| VmError::Setup(format!("encoding the inputs panicked: {e}")))?;
        // `end` whatever failed: the agent reads up to it.
        if sent.is_ok() {
            sent = data.write_all(&frame::encode(&[b"end"])).await;
        }
        drop(data);
        sent.map_err(|e| self.error(format!("sending the inputs: {e}")))?;
        if ping {
            self.expect(&mut readers, b"pong").await?;
        }
        let answer = self.answer(&mut readers).await?;
        let stream_bytes =
            encoded.map_err(|e| VmError::Setup(format!("reading the inputs to send: {e}")))?;
        let put = |stale| Put {
            stream_bytes,
            reused_files,
            reused_bytes,
            stale,
        };
        match answer[0].as_slice() {
            b"stored" => Ok(put(None)),
            b"stale" => Ok(put(Some(field_text(&answer, 1)))),
            b"failed" => Err(self.error(format!(
                "the agent could not store the inputs: {}",
                field_text(&answer, 1)
            ))),
            _ => Err(self.error(format!("expected stored, got {}", describe(&answer)))),
        }
    }
}

/// The tree stream of `root`'s entries, in name order, as chunks: the
/// `KEEP` records of `plan` first, then the entries; the bytes sent.
fn encode_tree(
    root: &Path,
    plan: &ReusePlan,
    sender: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> std::io::Result<u64> {
    let mut names: Vec<String> = std::fs::read_dir(root)?
        .map(|entry| {
            entry?.file_name().into_string().map_err(|name| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{name:?}: a name that is not UTF-8"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    names.sort();
    let mut writer = ChunkWriter {
        sender,
        chunk: Vec::with_capacity(CHUNK),
        written: 0,
    };
    for (path, in_place) in &plan.keep {
        crate::tree_stream::encode_keep(&mut writer, path, *in_place)?;
    }
    for name in &names {
        crate::tree_stream::encode_with(&mut writer, root, name, &mut Reusing(plan))?;
    }
    crate::tree_stream::finish(&mut writer)?;
    Ok(writer.written)
}

/// A `REUSE` record for each file the plan reuses.
struct Reusing<'a>(&'a ReusePlan);

impl crate::tree_stream::EncodeHooks for Reusing<'_> {
    fn reuse(&mut self, relative: &str) -> Option<u32> {
        self.0.reuse.get(relative).copied()
    }
}

struct ChunkWriter {
    sender: tokio::sync::mpsc::Sender<Vec<u8>>,
    chunk: Vec<u8>,
    written: u64,
}

impl Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let taken = bytes.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&bytes[..taken]);
        self.written += taken as u64;
        if self.chunk.len() == CHUNK {
            self.flush()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        self.sender
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::other("the port's side stopped taking the inputs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(name: &str, size: i64) -> kiln_proto::reapi::Digest {
        kiln_proto::reapi::Digest {
            hash: format!("{name:0>64}"),
            size_bytes: size,
        }
    }

    fn inputs(files: &[(&str, &str, i64)]) -> InputDigests {
        files
            .iter()
            .map(|(path, name, size)| (path.to_string(), digest(name, *size)))
            .collect()
    }

    /// The plan's KEEP list, each with the path that reuses it, sorted.
    fn reuses(plan: &ReusePlan) -> Vec<(String, bool, String)> {
        let mut out: Vec<_> = plan
            .reuse
            .iter()
            .map(|(path, &index)| {
                let (from, in_place) = plan.keep[index as usize].clone();
                (from, in_place, path.clone())
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn held_files_are_reused_at_their_path_first_then_by_digest_each_once() {
        let held = inputs(&[
            ("same", "a", 10),
            ("moved", "b", 20),
            ("twice", "c", 30),
            ("changed", "d", 40),
            ("empty", "e", 0),
        ]);
        let next = inputs(&[
            ("same", "a", 10),
            ("elsewhere/moved", "b", 20),
            ("twice", "c", 30),
            ("copy-of-twice", "c", 30),
            ("changed", "f", 40),
            ("empty", "e", 0),
        ]);
        let plan = ReusePlan::new(&held, &next);
        assert_eq!(
            reuses(&plan),
            [
                ("moved".into(), false, "elsewhere/moved".into()),
                ("same".into(), true, "same".into()),
                ("twice".into(), true, "twice".into()),
            ]
        );
        // The second file with `c`'s digest, the changed one and the
        // empty one are sent.
        assert_eq!(plan.reused_bytes, 60);
    }

    #[test]
    fn nothing_held_reuses_nothing() {
        let next = inputs(&[("a", "a", 10)]);
        let plan = ReusePlan::new(&InputDigests::new(), &next);
        assert!(plan.keep.is_empty() && plan.reuse.is_empty());
    }
}
