//! The executor token: the shared fleet's credential, a secret an executor
//! process presents on its calls (`authorization: Bearer …`). Without one,
//! anything that can reach the server could register as an executor and be
//! handed actions, header secrets included. The token is read from a
//! file (never a command-line argument, which `ps` shows) and never appears
//! in logs, errors or `Debug` output.

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};

/// The metadata key the token travels in.
pub const HEADER: &str = "authorization";

#[derive(Clone)]
pub struct ExecutorToken(Arc<str>);

impl ExecutorToken {
    /// The token in `path`, surrounding whitespace trimmed. The error names
    /// the file, never its content.
    pub fn read(path: &Path) -> Result<ExecutorToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the executor token file {}: {e}", path.display()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!(
                "the executor token file {} is empty",
                path.display()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the executor token in {} must be printable ASCII without spaces",
                path.display()
            ));
        }
        Ok(ExecutorToken(token.into()))
    }

    /// The `authorization` value an executor sends, marked sensitive so
    /// HTTP/2 never indexes it.
    pub fn header_value(&self) -> MetadataValue<Ascii> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", self.0)
            .parse()
            .expect("the token is printable ASCII");
        value.set_sensitive(true);
        value
    }

    /// Whether `presented` (a bearer credential) is this token; the
    /// comparison takes the same time wherever the first difference is.
    pub(crate) fn accepts(&self, presented: &str) -> bool {
        bool::from(presented.as_bytes().ct_eq(self.0.as_bytes()))
    }
}

impl std::fmt::Debug for ExecutorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecutorToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> Result<ExecutorToken, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, text).unwrap();
        ExecutorToken::read(&path)
    }

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let t = token("s3cret-token\n").unwrap();
        assert!(t.accepts("s3cret-token"));
        for wrong in ["s3cret-tokem", "s3cret", "s3cret-token ", ""] {
            assert!(!t.accepts(wrong), "{wrong}");
        }
        assert_eq!(t.header_value().to_str().unwrap(), "Bearer s3cret-token");
    }

    #[test]
    fn the_token_never_shows_in_debug_or_errors() {
        let t = token("s3cret-token").unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
        let error = token("two words").unwrap_err();
        assert!(!error.contains("two") && error.contains("printable ASCII"));
        assert!(token(" \n").unwrap_err().contains("is empty"));
    }
}
