//! API keys and the file that keeps them: `keys.json` in the server's data
//! directory, holding each key's id, organisation, capabilities and the
//! SHA-256 of the key, never the key itself. `kiln keys` edits the file
//! while a server runs (under `keys.lock`, writing a new file and renaming
//! it over the old); the server reads it again when it changes
//! ([`crate::Authenticator`]).
//!
//! A key reads `kiln_<id>_<secret>`: the id finds the entry, and the hash
//! of the whole key is compared in constant time. The secret is 160 random
//! bits, so a plain SHA-256 cannot be reversed by guessing.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::capability::Capabilities;

/// The key file's name in the data directory.
pub const KEY_FILE: &str = "keys.json";
const LOCK_FILE: &str = "keys.lock";
const PREFIX: &str = "kiln_";

/// An API key as a client presents it. It is shown once, when created;
/// `Debug` never prints it.
pub struct ApiKey(String);

impl ApiKey {
    /// The key's text, for the one place that shows it to its owner (or
    /// sends it as a header).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A key read from a file (`kiln executor --api-key-file`): the
    /// file's content, surrounding whitespace trimmed. Errors name the
    /// file, never its content.
    pub fn read(path: &Path) -> Result<ApiKey, String> {
        let text = fs::read_to_string(path)
            .map_err(|e| format!("reading the API key file {}: {e}", path.display()))?;
        let key = text.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the API key file {} must hold one key: printable ASCII without spaces",
                path.display()
            ));
        }
        Ok(ApiKey(key.to_string()))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// What is known about a key, without the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub org: String,
    pub capabilities: Capabilities,
    pub created_unix_s: u64,
    pub revoked_unix_s: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a valid key file: {error}")]
    Corrupt { path: PathBuf, error: String },
    #[error("no key with id {0:?}")]
    NoSuchKey(String),
    #[error("{0}")]
    Invalid(String),
}

/// One line of the file.
#[derive(Serialize, Deserialize)]
struct StoredKey {
    id: String,
    org: String,
    capabilities: Vec<String>,
    sha256: String,
    created_unix_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked_unix_s: Option<u64>,
}

#[derive(Serialize, Deserialize, Default)]
struct Stored {
    keys: Vec<StoredKey>,
}

/// The active keys, as the server checks them.
#[derive(Default)]
pub struct KeyRing {
    active: HashMap<String, (KeyInfo, [u8; 32])>,
    configured: bool,
}

impl KeyRing {
    /// Whether any key was ever made here, revoked ones included. Until
    /// then a loopback server stays open; after, revoking every key
    /// leaves it closed, not open (delete the key file to reopen it).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// The key `presented` is, if it is an active one.
    pub fn check(&self, presented: &str) -> Option<&KeyInfo> {
        let id = presented.strip_prefix(PREFIX)?.split_once('_')?.0;
        let (info, hash) = self.active.get(id)?;
        let presented_hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(presented_hash.ct_eq(hash)).then_some(info)
    }
}

/// The key file of one data directory.
#[derive(Clone, Debug)]
pub struct KeyFile {
    dir: PathBuf,
}

impl KeyFile {
    pub fn in_dir(data_dir: &Path) -> KeyFile {
        KeyFile {
            dir: data_dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// The active keys; a missing file has none.
    pub fn load(&self) -> Result<KeyRing, KeyError> {
        let mut ring = KeyRing::default();
        let stored = self.read()?;
        ring.configured = !stored.keys.is_empty();
        for stored in stored.keys {
            if stored.revoked_unix_s.is_some() {
                continue;
            }
            let hash = hex::decode(&stored.sha256)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| self.corrupt(format!("key {}: a bad sha256", stored.id)))?;
            let info = self.info(&stored)?;
            ring.active.insert(stored.id, (info, hash));
        }
        Ok(ring)
    }

    /// Every key, revoked ones included, oldest first.
    pub fn list(&self) -> Result<Vec<KeyInfo>, KeyError> {
        self.read()?.keys.iter().map(|k| self.info(k)).collect()
    }

    /// Makes a key for `org` with `capabilities` (and those they imply,
    /// [`Capabilities::with_implied`]); the key is returned once and kept
    /// only as its hash.
    pub fn create(
        &self,
        org: &str,
        capabilities: Capabilities,
    ) -> Result<(KeyInfo, ApiKey), KeyError> {
        check_org(org)?;
        let capabilities = capabilities.with_implied();
        if capabilities.is_empty() {
            return Err(KeyError::Invalid(
                "a key needs at least one capability".into(),
            ));
        }
        let _lock = self.lock()?;
        let mut stored = self.read()?;
        let (id, key) = loop {
            let id = hex::encode(random::<6>());
            if stored.keys.iter().all(|k| k.id != id) {
                break (
                    id.clone(),
                    format!("{PREFIX}{id}_{}", hex::encode(random::<20>())),
                );
            }
        };
        let entry = StoredKey {
            id,
            org: org.to_string(),
            capabilities: capabilities.iter().map(|c| c.name().to_string()).collect(),
            sha256: hex::encode(Sha256::digest(key.as_bytes())),
            created_unix_s: now_unix_s(),
            revoked_unix_s: None,
        };
        let info = self.info(&entry)?;
        stored.keys.push(entry);
        self.write(&stored)?;
        Ok((info, ApiKey(key)))
    }

    /// Revokes the key `id`; a running server stops accepting it when it
    /// next reads the file (within its poll interval).
    pub fn revoke(&self, id: &str) -> Result<KeyInfo, KeyError> {
        let _lock = self.lock()?;
        let mut stored = self.read()?;
        let entry = stored
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| KeyError::NoSuchKey(id.to_string()))?;
        entry.revoked_unix_s.get_or_insert_with(now_unix_s);
        let info = self.info(entry)?;
        self.write(&stored)?;
        Ok(info)
    }

    fn info(&self, stored: &StoredKey) -> Result<KeyInfo, KeyError> {
        let capabilities = Capabilities::parse_list(&stored.capabilities.join(","))
            .map_err(|e| self.corrupt(format!("key {}: {e}", stored.id)))?;
        Ok(KeyInfo {
            id: stored.id.clone(),
            org: stored.org.clone(),
            capabilities,
            created_unix_s: stored.created_unix_s,
            revoked_unix_s: stored.revoked_unix_s,
        })
    }

    fn read(&self) -> Result<Stored, KeyError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| self.corrupt(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Stored::default()),
            Err(error) => Err(KeyError::Io { path, error }),
        }
    }

    /// Replaces the file whole: a reader sees the old or the new one.
    fn write(&self, stored: &Stored) -> Result<(), KeyError> {
        let path = self.path();
        let temporary = self.dir.join(format!("{KEY_FILE}.new"));
        let io = |error| KeyError::Io {
            path: path.clone(),
            error,
        };
        let mut text = serde_json::to_vec_pretty(stored).expect("keys serialise");
        text.push(b'\n');
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io)?;
        file.write_all(&text).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&temporary, &path).map_err(io)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)
    }

    /// Serialises `kiln keys` commands on one data directory.
    fn lock(&self) -> Result<File, KeyError> {
        let path = self.dir.join(LOCK_FILE);
        let io = |error| KeyError::Io {
            path: path.clone(),
            error,
        };
        fs::create_dir_all(&self.dir).map_err(io)?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io(e.into()))?;
        Ok(file)
    }

    fn corrupt(&self, error: String) -> KeyError {
        KeyError::Corrupt {
            path: self.path(),
            error,
        }
    }
}

/// Organisation names: 1 to 64 letters, digits, `.`, `_` or `-`.
fn check_org(org: &str) -> Result<(), KeyError> {
    let valid = (1..=64).contains(&org.len())
        && org
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(KeyError::Invalid(format!(
            "organisation {org:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
        )))
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the system's random source");
    bytes
}

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::Capability;

    #[test]
    fn a_created_key_checks_until_revoked_and_only_its_hash_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = KeyFile::in_dir(dir.path());
        assert!(!file.load().unwrap().is_configured());
        let (info, key) = file.create("acme", Capabilities::DEVELOPER).unwrap();
        assert!(key.expose().starts_with(&format!("kiln_{}_", info.id)));
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");

        let ring = file.load().unwrap();
        assert!(ring.is_configured());
        assert_eq!(ring.check(key.expose()), Some(&info));
        // One character off, another id, or no prefix: not a key.
        let mut wrong = key.expose().to_string();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert_eq!(ring.check(&wrong), None);
        assert_eq!(ring.check("kiln_000000000000_00"), None);
        assert_eq!(ring.check(""), None);

        let text = fs::read_to_string(file.path()).unwrap();
        assert!(!text.contains(key.expose()), "{text}");
        let mode = fs::metadata(file.path()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let revoked = file.revoke(&info.id).unwrap();
        assert!(revoked.revoked_unix_s.is_some());
        assert_eq!(file.load().unwrap().check(key.expose()), None);
        assert!(file.load().unwrap().is_configured());
        assert_eq!(file.list().unwrap(), vec![revoked]);
        assert!(matches!(file.revoke("nope"), Err(KeyError::NoSuchKey(_))));
    }

    #[test]
    fn keys_of_several_organisations_live_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let file = KeyFile::in_dir(dir.path());
        let (acme, _) = file.create("acme", Capabilities::all()).unwrap();
        let (globex, _) = file.create("globex", Capabilities::DEVELOPER).unwrap();
        let listed = file.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(
            (listed[0].id.as_str(), listed[0].org.as_str()),
            (acme.id.as_str(), "acme")
        );
        assert_eq!(
            (listed[1].id.as_str(), listed[1].org.as_str()),
            (globex.id.as_str(), "globex")
        );
        assert!(listed[0].capabilities.has(Capability::AcWrite));
        assert!(!listed[1].capabilities.has(Capability::AcWrite));
    }

    #[test]
    fn bad_names_and_bad_files_are_errors_that_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let file = KeyFile::in_dir(dir.path());
        for org in ["", "a b", &"x".repeat(65)] {
            assert!(
                file.create(org, Capabilities::DEVELOPER).is_err(),
                "{org:?}"
            );
        }
        fs::write(file.path(), "{not json").unwrap();
        let error = file.load().err().unwrap().to_string();
        assert!(error.contains("keys.json"), "{error}");
    }
}
