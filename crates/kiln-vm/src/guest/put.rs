//! The host's side of the agent's `put`: a directory of the host (a warm
//! VM's next inputs) sent as a tree stream ([`crate::tree_stream`]) on the
//! data port, which the agent writes into the emptied workspace.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tokio::io::AsyncWriteExt;

use super::{describe, field_text, frame, Guest};
use crate::VmError;

/// Bytes of tree stream per `tree` frame.
const CHUNK: usize = 256 * 1024;

/// Chunks waiting between the encoder and the port.
const CHUNKS_IN_FLIGHT: usize = 4;

impl Guest {
    /// Empties `guest_root` in the guest and writes the tree of
    /// `host_root`'s entries into it (regular files, directories and
    /// symlinks, with their modes; symlinks are never followed).
    pub async fn put(&self, guest_root: &Path, host_root: &Path) -> Result<(), VmError> {
        self.put_after(guest_root, host_root, false).await
    }

    /// [`Guest::ping`] then [`Guest::put`], the `put` sent without waiting
    /// for the `pong`: what a resumed warm VM needs before its next
    /// action, in one round trip.
    pub async fn ping_and_put(&self, guest_root: &Path, host_root: &Path) -> Result<(), VmError> {
        self.put_after(guest_root, host_root, true).await
    }

    async fn put_after(
        &self,
        guest_root: &Path,
        host_root: &Path,
        ping: bool,
    ) -> Result<(), VmError> {
        let mut readers = self.readers.lock().await;
        if ping {
            self.send_ping().await?;
        }
        self.send(&[b"put", guest_root.as_os_str().as_bytes()])
            .await?;
        let (sender, mut chunks) = tokio::sync::mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let host_root = host_root.to_path_buf();
        let encoder = tokio::task::spawn_blocking(move || encode_tree(&host_root, sender));
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
        encoded.map_err(|e| VmError::Setup(format!("reading the inputs to send: {e}")))?;
        match answer[0].as_slice() {
            b"stored" => Ok(()),
            b"failed" => Err(self.error(format!(
                "the agent could not store the inputs: {}",
                field_text(&answer, 1)
            ))),
            _ => Err(self.error(format!("expected stored, got {}", describe(&answer)))),
        }
    }
}

/// The tree stream of `root`'s entries, in name order, as chunks.
fn encode_tree(root: &Path, sender: tokio::sync::mpsc::Sender<Vec<u8>>) -> std::io::Result<()> {
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
    };
    for name in &names {
        crate::tree_stream::encode(&mut writer, root, name)?;
    }
    crate::tree_stream::finish(&mut writer)
}

struct ChunkWriter {
    sender: tokio::sync::mpsc::Sender<Vec<u8>>,
    chunk: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let taken = bytes.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&bytes[..taken]);
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
