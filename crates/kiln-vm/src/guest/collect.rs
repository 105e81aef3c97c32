//! The host's side of the agent's `collect`: an action's outputs, as the
//! guest holds them, written as a tree stream into a file on the host
//! ([`crate::tree_stream`] decodes it), never more than a bound.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use super::{describe, field_text, Guest};
use crate::VmError;

impl Guest {
    /// Asks the agent for `paths` (relative to `root` in the guest) and
    /// writes the tree stream it answers into `into`. More than
    /// `max_bytes` of stream is an error naming the bound.
    pub async fn collect(
        &self,
        root: &Path,
        paths: &[PathBuf],
        into: &Path,
        max_bytes: u64,
    ) -> Result<(), VmError> {
        let mut readers = self.readers.lock().await;
        let mut fields: Vec<&[u8]> = vec![b"collect", root.as_os_str().as_bytes()];
        fields.extend(paths.iter().map(|p| p.as_os_str().as_bytes()));
        self.send(&fields).await?;
        let mut file = tokio::fs::File::create(into)
            .await
            .map_err(|e| VmError::Output(format!("creating {}: {e}", into.display())))?;
        let mut written = 0u64;
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
            b"collected" => Ok(()),
            b"failed" => Err(self.error(format!(
                "the agent could not send the outputs: {}",
                field_text(&answer, 1)
            ))),
            _ => Err(self.error(format!("expected collected, got {}", describe(&answer)))),
        }
    }
}
