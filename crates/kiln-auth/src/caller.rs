//! Who is calling: decided once per request at the edge ([`crate::AuthLayer`])
//! from the request's credential, and handed to the services in the
//! request's extensions.

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::capability::{Capabilities, Capability};
use crate::keys::{KeyError, KeyFile, KeyRing};
use crate::token::ExecutorToken;

/// The header Bazel's `--remote_header=x-buildbuddy-api-key=…` sends.
pub const API_KEY_HEADER: &str = "x-buildbuddy-api-key";

/// The header in which a caller that sees every organisation asks as one
/// of them ([`Caller::narrowed_org_of`]): an executor asking whether the
/// CAS holds a VM's outputs asks as the action's organisation, so that a
/// guest naming a digest it never had learns nothing of, and gets into its
/// result no blob of, another organisation.
pub const FOR_ORG_HEADER: &str = "x-kiln-for-org";

/// How often a running server looks at the key file for changes.
pub const KEY_FILE_POLL: Duration = Duration::from_millis(250);

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The organisation of its key; empty for open access and the shared
    /// executor fleet.
    pub org: Arc<str>,
    /// The id of its API key (not secret), if it presented one.
    pub key_id: Option<Arc<str>>,
    pub capabilities: Capabilities,
}

impl Caller {
    pub fn may(&self, capability: Capability) -> bool {
        self.capabilities.has(capability)
    }

    /// The organisation `request` was made for: its caller's, or empty
    /// (open access) when no [`crate::AuthLayer`] put a caller there.
    pub fn org_of<T>(request: &tonic::Request<T>) -> Arc<str> {
        Caller::org_or_open(request.extensions().get::<Caller>())
    }

    /// [`Caller::org_of`], narrowed to the organisation named in
    /// [`FOR_ORG_HEADER`] when the caller sees every organisation (open
    /// access, the shared fleet's executor, an in-process call). A caller
    /// of one organisation stays in its own, whatever it names: the
    /// header can only ever narrow what a caller sees.
    pub fn narrowed_org_of<T>(request: &tonic::Request<T>) -> Arc<str> {
        let org = Caller::org_of(request);
        if !org.is_empty() {
            return org;
        }
        match request
            .metadata()
            .get(FOR_ORG_HEADER)
            .and_then(|value| value.to_str().ok())
        {
            Some(named) if !named.is_empty() => Arc::from(named),
            _ => org,
        }
    }

    /// [`Caller::org_of`] for a plain HTTP request.
    pub fn org_in(extensions: &http::Extensions) -> Arc<str> {
        Caller::org_or_open(extensions.get::<Caller>())
    }

    fn org_or_open(caller: Option<&Caller>) -> Arc<str> {
        static OPEN: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
        match caller {
            Some(caller) => caller.org.clone(),
            None => OPEN.clone(),
        }
    }
}

/// Why a request is refused before it reaches a service.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No credential, or one that is not valid: UNAUTHENTICATED.
    Unauthenticated(String),
    /// A valid credential without the capability: PERMISSION_DENIED.
    PermissionDenied(String),
}

impl From<Refusal> for tonic::Status {
    fn from(refusal: Refusal) -> tonic::Status {
        match refusal {
            Refusal::Unauthenticated(message) => tonic::Status::unauthenticated(message),
            Refusal::PermissionDenied(message) => tonic::Status::permission_denied(message),
        }
    }
}

/// How the server authenticates.
pub struct AuthConfig {
    /// The data directory's key file (`kiln keys` edits it).
    pub key_file: KeyFile,
    /// The shared executor fleet's token, if the server has one.
    pub executor_token: Option<ExecutorToken>,
    /// Whether, while no key was ever made, callers without a credential are
    /// let in (with every capability but registering executors when an
    /// executor token is set): a loopback listener, or
    /// `--allow-unauthenticated`.
    pub open_without_keys: bool,
}

/// Checks each request's credential against the key file (read again when
/// it changes) and the executor token.
pub struct Authenticator {
    config: AuthConfig,
    keys: RwLock<Arc<KeyRing>>,
    stamp: Mutex<Option<FileStamp>>,
    /// Who a caller without a credential is on an open server, and who
    /// the executor token's bearer is: made once, cloned per request.
    open: Caller,
    fleet: Caller,
}

/// What tells that the key file changed: `kiln keys` renames a new file
/// over the old one, so the inode changes with every edit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified_ns: i64,
}

impl Authenticator {
    /// Reads the key file now; a file that cannot be read is an error
    /// (the server must not start with keys it cannot check).
    pub fn new(config: AuthConfig) -> Result<Arc<Authenticator>, KeyError> {
        let stamp = stamp(&config.key_file);
        let ring = config.key_file.load()?;
        let no_org: Arc<str> = "".into();
        let all = Capabilities::all();
        let open = Caller {
            org: no_org.clone(),
            key_id: None,
            capabilities: match config.executor_token {
                Some(_) => all.without(Capability::RegisterExecutor),
                None => all,
            },
        };
        let fleet = Caller {
            org: no_org,
            key_id: None,
            capabilities: [
                Capability::RegisterExecutor,
                Capability::CacheRead,
                Capability::CasWrite,
            ]
            .into_iter()
            .collect(),
        };
        Ok(Arc::new(Authenticator {
            config,
            keys: RwLock::new(Arc::new(ring)),
            stamp: Mutex::new(stamp),
            open,
            fleet,
        }))
    }

    /// Whether any key was ever made in the key file (revoked ones count).
    pub fn keys_configured(&self) -> bool {
        self.keys.read().is_configured()
    }

    /// Whether requests now need a credential.
    pub fn requires_credentials(&self) -> bool {
        !self.config.open_without_keys || self.keys.read().is_configured()
    }

    /// The caller behind `headers`: an API key (`x-buildbuddy-api-key`,
    /// `authorization: Bearer`, or a Basic password), the executor token
    /// (as a bearer), or,
    /// while the server is open, nobody in particular. Messages never
    /// repeat the credential.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Caller, Refusal> {
        let basic;
        let presented = match headers.get(API_KEY_HEADER) {
            Some(value) => value.to_str().ok().map(str::trim),
            None => match headers
                .get(crate::token::HEADER)
                .and_then(|value| value.to_str().ok())
            {
                Some(text) if text.starts_with("Basic ") => {
                    basic = basic_password(&text["Basic ".len()..]);
                    basic.as_deref()
                }
                Some(text) => Some(text.strip_prefix("Bearer ").unwrap_or(text).trim()),
                None => None,
            },
        }
        .filter(|text| !text.is_empty());
        let keys = self.keys.read().clone();
        let Some(presented) = presented else {
            if self.config.open_without_keys && !keys.is_configured() {
                return Ok(self.open.clone());
            }
            return Err(Refusal::Unauthenticated(
                "this Kiln server requires an API key: send it as the x-buildbuddy-api-key \
                 header (Bazel: --remote_header=x-buildbuddy-api-key=KEY) or as \
                 authorization: Bearer KEY"
                    .into(),
            ));
        };
        if let Some(token) = &self.config.executor_token {
            if token.accepts(presented) {
                return Ok(self.fleet.clone());
            }
        }
        if let Some(info) = keys.check(presented) {
            return Ok(Caller {
                org: info.org.as_str().into(),
                key_id: Some(info.id.as_str().into()),
                capabilities: info.capabilities,
            });
        }
        if self.config.open_without_keys
            && !keys.is_configured()
            && self.config.executor_token.is_none()
        {
            // An open server with nothing to check a credential against
            // (a .bazelrc may carry a key for another service).
            return Ok(self.open.clone());
        }
        Err(Refusal::Unauthenticated(
            "the credential sent is not a valid API key or executor token of this Kiln \
             server (unknown or revoked)"
                .into(),
        ))
    }

    /// Reads the key file again if it changed since last read. A file
    /// that has become unreadable keeps the keys last read, and says so.
    pub fn reload_if_changed(&self) {
        let now = stamp(&self.config.key_file);
        let mut seen = self.stamp.lock();
        if *seen == now {
            return;
        }
        *seen = now;
        match self.config.key_file.load() {
            Ok(ring) => {
                let active = ring.active_count();
                *self.keys.write() = Arc::new(ring);
                tracing::info!(active_keys = active, "API keys read again");
            }
            Err(error) => {
                tracing::error!(%error, "the key file cannot be read; the keys last read stay in force")
            }
        }
    }

    /// Polls the key file every [`KEY_FILE_POLL`] until the authenticator
    /// is dropped, so a revoked key stops working within that time.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Authenticator> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEY_FILE_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                me.reload_if_changed();
            }
        })
    }
}

/// The password of an `authorization: Basic` value (how a browser sends
/// what its user typed at the monitoring endpoint's prompt).
fn basic_password(encoded: &str) -> Option<String> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':')?.1.to_string())
}

fn stamp(file: &KeyFile) -> Option<FileStamp> {
    let metadata = std::fs::metadata(file.path()).ok()?;
    Some(FileStamp {
        inode: metadata.ino(),
        len: metadata.len(),
        modified_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (http::HeaderName::from_static(name), value.parse().unwrap()))
            .collect()
    }

    fn authenticator(dir: &std::path::Path, open: bool, token: bool) -> Arc<Authenticator> {
        let executor_token = token.then(|| {
            let path = dir.join("token");
            std::fs::write(&path, "fleet-token").unwrap();
            ExecutorToken::read(&path).unwrap()
        });
        Authenticator::new(AuthConfig {
            key_file: KeyFile::in_dir(dir),
            executor_token,
            open_without_keys: open,
        })
        .unwrap()
    }

    #[test]
    fn open_until_a_key_exists_then_every_request_needs_one() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path(), true, false);
        assert_eq!(
            auth.authenticate(&headers(&[])).unwrap().capabilities,
            Capabilities::all()
        );
        let (info, key) = KeyFile::in_dir(dir.path())
            .create("acme", Capabilities::DEVELOPER)
            .unwrap();
        auth.reload_if_changed();
        assert!(auth.requires_credentials());
        let refused = auth.authenticate(&headers(&[])).unwrap_err();
        assert!(matches!(refused, Refusal::Unauthenticated(_)));
        let basic = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(format!("me:{}", key.expose()))
        };
        for sent in [
            headers(&[(API_KEY_HEADER, key.expose())]),
            headers(&[("authorization", &format!("Bearer {}", key.expose()))]),
            headers(&[("authorization", &format!("Basic {basic}"))]),
        ] {
            let caller = auth.authenticate(&sent).unwrap();
            assert_eq!(caller.key_id.as_deref(), Some(info.id.as_str()));
            assert_eq!(&*caller.org, "acme");
            assert!(!caller.may(Capability::AcWrite));
        }
        let wrong = auth
            .authenticate(&headers(&[(API_KEY_HEADER, "kiln_0_0")]))
            .unwrap_err();
        let Refusal::Unauthenticated(message) = wrong else {
            panic!("{wrong:?}")
        };
        assert!(!message.contains("kiln_0_0"));

        KeyFile::in_dir(dir.path()).revoke(&info.id).unwrap();
        auth.reload_if_changed();
        assert!(auth
            .authenticate(&headers(&[(API_KEY_HEADER, key.expose())]))
            .is_err());
    }

    #[test]
    fn a_closed_server_without_keys_lets_nobody_in() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path(), false, false);
        assert!(auth.requires_credentials());
        assert!(auth.authenticate(&headers(&[])).is_err());
        assert!(auth
            .authenticate(&headers(&[(API_KEY_HEADER, "anything")]))
            .is_err());
    }

    #[test]
    fn the_executor_token_registers_executors_and_open_callers_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path(), true, true);
        let open = auth.authenticate(&headers(&[])).unwrap();
        assert!(open.may(Capability::Execute) && !open.may(Capability::RegisterExecutor));
        let fleet = auth
            .authenticate(&headers(&[("authorization", "Bearer fleet-token")]))
            .unwrap();
        assert!(fleet.may(Capability::RegisterExecutor) && fleet.may(Capability::CasWrite));
        assert!(!fleet.may(Capability::Execute) && !fleet.may(Capability::AcWrite));
        assert!(auth
            .authenticate(&headers(&[("authorization", "Bearer not-it")]))
            .is_err());
    }
}
