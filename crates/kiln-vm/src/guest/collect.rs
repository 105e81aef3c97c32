//! The host's side of the agent's `collect`: an action's outputs, as the
//! guest holds them, written as a tree stream into a file on the host
//! ([`crate::tree_stream`] decodes it), never more than a bound. The
//! agent may first hash a large file and ask whether the CAS holds it
//! ([`Ask`]); a file the host says is held comes as a `STORED` record.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use super::{describe, field_text, Guest};
use crate::VmError;

/// Whether the CAS holds a file's bytes: what the agent asks, after
/// hashing it, of each output file of [`Ask::from_bytes`] or more.
#[async_trait::async_trait]
pub trait Holder: Send + Sync {
    /// Whether the CAS holds the blob of `size` bytes whose SHA-256 is
    /// `sha256`. An error is a no: the bytes are sent.
    async fn holds(&self, size: u64, sha256: [u8; 32]) -> bool;
}

/// Which files the agent hashes and asks about before sending.
#[derive(Clone, Copy)]
pub struct Ask<'a> {
    /// The smallest file asked about.
    pub from_bytes: u64,
    pub holder: &'a dyn Holder,
}

/// The most files one `collect` asks about: each costs the CAS a lookup,
/// and a guest could ask without end.
pub const MAX_ASKS: usize = 10_000;

/// The blobs (size, SHA-256) the host told the agent the CAS holds: the
/// only ones a `STORED` record of the stream may name.
pub type Confirmed = HashSet<(u64, [u8; 32])>;

impl Guest {
    /// Asks the agent for `paths` (relative to `root` in the guest) and
    /// writes the tree stream it answers into `into`, answering its
    /// questions with `ask` (None: it sends every file whole). More than
    /// `max_bytes` of stream is an error naming the bound.
    pub async fn collect(
        &self,
        root: &Path,
        paths: &[PathBuf],
        into: &Path,
        max_bytes: u64,
        ask: Option<Ask<'_>>,
    ) -> Result<Confirmed, VmError> {
        let mut readers = self.readers.lock().await;
        let ask_from = ask.map_or(0, |ask| ask.from_bytes.max(1)).to_string();
        let mut fields: Vec<&[u8]> =
            vec![b"collect", root.as_os_str().as_bytes(), ask_from.as_bytes()];
        fields.extend(paths.iter().map(|p| p.as_os_str().as_bytes()));
        self.send(&fields).await?;
        let mut file = tokio::fs::File::create(into)
            .await
            .map_err(|e| VmError::Output(format!("creating {}: {e}", into.display())))?;
        let mut written = 0u64;
        let mut confirmed = Confirmed::new();
        let mut asks = 0usize;
        loop {
            let frame = match readers.data.next().await {
                Ok(Some(frame)) if !frame.is_empty() => frame,
                Ok(_) => {
                    return Err(self.error("the agent's data port closed while it sent outputs"))
                }
                Err(e) => return Err(self.error(format!("reading the outputs: {e}"))),
            };
            match frame[0].as_slice() {
                b"tree" => {
                    let bytes = frame.get(1).map(Vec::as_slice).unwrap_or_default();
                    written += bytes.len() as u64;
                    if written > max_bytes {
                        return Err(VmError::Output(format!(
                            "the VM's outputs exceed {max_bytes} bytes, the limit"
                        )));
                    }
                    file.write_all(bytes)
                        .await
                        .map_err(|e| VmError::Output(format!("writing {}: {e}", into.display())))?;
                }
                b"ask" => {
                    asks += 1;
                    if asks > MAX_ASKS {
                        return Err(VmError::Output(format!(
                            "the VM asked about more than {MAX_ASKS} output files, the limit"
                        )));
                    }
                    let Some((size, sha256)) = parse_ask(&frame) else {
                        return Err(self.error(format!("a malformed ask {}", describe(&frame))));
                    };
                    let held = match ask {
                        Some(ask) => ask.holder.holds(size, sha256).await,
                        None => false,
                    };
                    if held {
                        confirmed.insert((size, sha256));
                    }
                    self.send(&[b"verdict", if held { b"1" } else { b"0" }])
                        .await?;
                }
                b"end" => break,
                _ => {
                    return Err(self.error(format!("an unexpected data frame {}", describe(&frame))))
                }
            }
        }
        file.flush()
            .await
            .map_err(|e| VmError::Output(format!("writing {}: {e}", into.display())))?;
        let answer = self.answer(&mut readers).await?;
        match answer[0].as_slice() {
            b"collected" => Ok(confirmed),
            b"failed" => Err(self.error(format!(
                "the agent could not send the outputs: {}",
                field_text(&answer, 1)
            ))),
            _ => Err(self.error(format!("expected collected, got {}", describe(&answer)))),
        }
    }
}

/// `ask SIZE SHA256_HEX`.
fn parse_ask(frame: &[Vec<u8>]) -> Option<(u64, [u8; 32])> {
    let size = std::str::from_utf8(frame.get(1)?).ok()?.parse().ok()?;
    let hex = frame.get(2)?;
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(hex, &mut sha256).ok()?;
    Some((size, sha256))
}
