//! Images, shared by the `docker` and `podman` backends: which image an
//! action runs in, its manifest digest in the registry (asked *with the
//! action's credentials*, so a private image already present locally is
//! never handed to a request that could not pull it), and making sure the
//! runtime holds `registry/repository@digest` before the action's clock
//! starts. Every run is by digest, so a moving tag cannot change an image
//! between prepare and run.
//!
//! What is shared and what is not: [`Images`] owns the metadata of the
//! local content-addressed image cache — reference + credentials → digest
//! (for a short TTL, holding only a salted hash of the credentials), which
//! digests the runtime was last seen to hold, and one pull at a time per
//! digest. The image content itself lives in each runtime's own store
//! (dockerd's, podman's), reached through [`ImageStore`].

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_platform::{
    ContainerImage, ImageReference, Platform, PropertySources, RegistryCredentials,
};
use kiln_worker::{CancellationToken, RunError};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

/// How images are resolved; part of each backend's config.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// The image of actions that name no `container-image`, as a user
    /// would write it (`docker://` optional). None: such actions fail with
    /// FAILED_PRECONDITION.
    pub default_image: Option<String>,
    /// Registries (`host` or `host:port`) spoken to over plain HTTP besides
    /// the loopback ones (`localhost`, `127.0.0.0/8`, `[::1]`), which always are.
    pub insecure_registries: Vec<String>,
    /// How long a successful resolution (reference and credentials →
    /// digest) is reused before the registry is asked again. Short: it is
    /// also how long revoked credentials keep working on this executor.
    pub resolution_ttl: Duration,
    /// Bound on one registry round trip (a resolution); past it the
    /// registry counts as unreachable.
    pub registry_timeout: Duration,
}

impl Default for ImageConfig {
    fn default() -> ImageConfig {
        ImageConfig {
            default_image: None,
            insecure_registries: Vec::new(),
            resolution_ttl: Duration::from_secs(300),
            registry_timeout: Duration::from_secs(30),
        }
    }
}

/// An image resolved to the digest the action runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// As the action (or the default) named it.
    pub image: ContainerImage,
    /// `sha256:…`, the manifest digest in the registry.
    pub digest: String,
}

impl ResolvedImage {
    /// `registry/repository@digest`, what the runtime pulls and runs.
    pub fn pinned(&self) -> String {
        format!(
            "{}/{}@{}",
            self.image.registry, self.image.repository, self.digest
        )
    }
}

/// A runtime's local image store.
#[async_trait]
pub trait ImageStore: Send + Sync {
    /// Whether the store holds `pinned` (`registry/repository@digest`).
    async fn has_image(&self, pinned: &str) -> Result<bool, RunError>;

    /// Pulls `image` by digest with `credentials`; `insecure` registries
    /// speak plain HTTP. Errors name the image and registry, never the password.
    async fn pull_image(
        &self,
        image: &ResolvedImage,
        credentials: Option<&RegistryCredentials>,
        insecure: bool,
    ) -> Result<(), RunError>;
}

/// A resolution cache key: the reference and a salted hash of the credentials.
type ResolutionKey = (String, Option<[u8; 32]>);

/// The image metadata one backend keeps (see the module comment).
pub struct Images {
    runtime: &'static str,
    config: ImageConfig,
    default_image: Option<ContainerImage>,
    /// Per-process random salt of the credential hashes.
    salt: [u8; 32],
    resolutions: parking_lot::Mutex<HashMap<ResolutionKey, (String, Instant)>>,
    /// Per pinned image: when the store was last seen to hold it. The async
    /// mutex makes concurrent prepares of one image pull it once.
    local: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Instant>>>>>,
}

impl Images {
    /// `runtime` names the backend in error messages. Fails if the default
    /// image does not parse.
    pub fn new(runtime: &'static str, config: ImageConfig) -> Result<Images, String> {
        let default_image = config
            .default_image
            .as_deref()
            .map(parse_image)
            .transpose()?;
        let mut salt = [0u8; 32];
        salt[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        salt[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Ok(Images {
            runtime,
            config,
            default_image,
            salt,
            resolutions: Default::default(),
            local: Default::default(),
        })
    }

    /// The image `platform` runs in: its `container-image`, else the default.
    pub fn image_for(&self, platform: &Platform) -> Result<ContainerImage, RunError> {
        platform
            .container_image
            .clone()
            .or_else(|| self.default_image.clone())
            .ok_or_else(|| {
                RunError::Unsupported(format!(
                    "workload-isolation-type={} needs container-image (this executor has no default image)",
                    self.runtime
                ))
            })
    }

    /// Resolves the action's image with its credentials and makes sure
    /// `store` holds it; returns what to run. `verify`: ask the store even
    /// if it held the image within the TTL (prepare does; run, right after
    /// prepare, trusts it). Returns promptly once `cancel` fires (a pull in
    /// flight is abandoned).
    pub async fn ensure(
        &self,
        platform: &Platform,
        store: &dyn ImageStore,
        verify: bool,
        cancel: &CancellationToken,
    ) -> Result<ResolvedImage, RunError> {
        let image = self.image_for(platform)?;
        let credentials = platform.registry_credentials.as_ref();
        tokio::select! {
            _ = cancel.cancelled() => Err(RunError::Internal(format!(
                "cancelled while preparing image {image}"
            ))),
            resolved = async {
                let resolved = self.resolve(&image, credentials).await?;
                self.make_local(&resolved, credentials, store, verify).await?;
                Ok(resolved)
            } => resolved,
        }
    }

    /// The digest of `image` in its registry, asked with `credentials`
    /// (reused for the TTL when the same reference and credentials asked
    /// before).
    pub async fn resolve(
        &self,
        image: &ContainerImage,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<ResolvedImage, RunError> {
        let key = (image.to_string(), credentials.map(|c| self.hash(c)));
        if let Some((digest, at)) = self.resolutions.lock().get(&key) {
            if at.elapsed() < self.config.resolution_ttl {
                return Ok(ResolvedImage {
                    image: image.clone(),
                    digest: digest.clone(),
                });
            }
        }
        let digest = self.ask_registry(image, credentials).await?;
        tracing::debug!(%image, %digest, "resolved image");
        let mut resolutions = self.resolutions.lock();
        let ttl = self.config.resolution_ttl;
        resolutions.retain(|_, (_, at)| at.elapsed() < ttl);
        resolutions.insert(key, (digest.clone(), Instant::now()));
        Ok(ResolvedImage {
            image: image.clone(),
            digest,
        })
    }

    /// Drops the note that the runtime holds `pinned` (it turned out not to:
    /// removed behind our back), so the next `ensure` looks and pulls.
    pub fn forget_local(&self, pinned: &str) {
        self.local.lock().remove(pinned);
    }

    /// Whether `registry` is spoken to over plain HTTP.
    pub fn is_insecure(&self, registry: &str) -> bool {
        is_loopback(registry)
            || self
                .config
                .insecure_registries
                .iter()
                .any(|r| r == registry)
    }

    async fn make_local(
        &self,
        resolved: &ResolvedImage,
        credentials: Option<&RegistryCredentials>,
        store: &dyn ImageStore,
        verify: bool,
    ) -> Result<(), RunError> {
        let pinned = resolved.pinned();
        let slot = self.local.lock().entry(pinned.clone()).or_default().clone();
        let mut seen = slot.lock().await;
        if !verify && seen.is_some_and(|at| at.elapsed() < self.config.resolution_ttl) {
            return Ok(());
        }
        if !store.has_image(&pinned).await? {
            tracing::info!(image = %resolved.image, %pinned, runtime = self.runtime, "pulling image");
            store
                .pull_image(
                    resolved,
                    credentials,
                    self.is_insecure(&resolved.image.registry),
                )
                .await?;
        }
        *seen = Some(Instant::now());
        Ok(())
    }

    fn hash(&self, credentials: &RegistryCredentials) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.salt);
        hasher.update((credentials.username.len() as u64).to_le_bytes());
        hasher.update(credentials.username.as_bytes());
        hasher.update(credentials.password.expose().as_bytes());
        hasher.finalize().into()
    }

    async fn ask_registry(
        &self,
        image: &ContainerImage,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<String, RunError> {
        let reference = oci_reference(image);
        // A client per resolution: oci-client remembers credentials and
        // tokens per registry, which must never serve another request.
        let client = registry_client(&image.registry, self.is_insecure(&image.registry));
        let auth = registry_auth(credentials);
        let asked = tokio::time::timeout(
            self.config.registry_timeout,
            client.fetch_manifest_digest(&reference, &auth),
        )
        .await;
        match asked {
            Err(_) => Err(RunError::Unavailable(format!(
                "registry {} did not answer within {:?} while resolving image {image}",
                image.registry, self.config.registry_timeout
            ))),
            Ok(Ok(digest)) => Ok(digest),
            Ok(Err(error)) => Err(registry_error(&error, image, credentials, "resolving")),
        }
    }
}

/// A fresh registry client for `registry` (plain HTTP when `insecure`).
/// Make one per request: oci-client remembers credentials and tokens per
/// registry, which must never serve another request.
pub fn registry_client(registry: &str, insecure: bool) -> Client {
    install_crypto_provider();
    let protocol = if insecure {
        ClientProtocol::HttpsExcept(vec![registry.to_string()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        ..Default::default()
    })
}

/// How oci-client presents `credentials` (anonymous when None).
pub fn registry_auth(credentials: Option<&RegistryCredentials>) -> RegistryAuth {
    match credentials {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.expose().to_string()),
        None => RegistryAuth::Anonymous,
    }
}

/// The distribution-API reference of `image`. Docker Hub's official
/// images live under `library/`, which users leave out.
pub fn oci_reference(image: &ContainerImage) -> Reference {
    let repository = if image.registry == "docker.io" && !image.repository.contains('/') {
        format!("library/{}", image.repository)
    } else {
        image.repository.clone()
    };
    match &image.reference {
        ImageReference::Tag(tag) => {
            Reference::with_tag(image.registry.clone(), repository, tag.clone())
        }
        ImageReference::Digest(digest) => {
            Reference::with_digest(image.registry.clone(), repository, digest.clone())
        }
    }
}

/// rustls needs one process-wide crypto provider; reqwest (under
/// oci-client) is built without one.
fn install_crypto_provider() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Err: another part of the process installed one first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Parses an image name as `container-image` does.
pub fn parse_image(text: &str) -> Result<ContainerImage, String> {
    let properties = [("container-image".to_string(), text.to_string())];
    Platform::parse(&PropertySources {
        action: &properties,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?
    .container_image
    .ok_or_else(|| format!("{text:?} names no image"))
}

/// Whether `registry` (`host`, `host:port`, `[v6]:port`) is on loopback.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        registry.rsplit_once(':').map_or(registry, |(host, _)| host)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Turns a registry error met while `doing` (`"resolving"`, `"pulling"`)
/// into FAILED_PRECONDITION (unknown image, refused credentials) or
/// UNAVAILABLE (unreachable registry), naming the image and the registry.
/// The library's own message is never shown: it could echo what was sent.
pub fn registry_error(
    error: &OciDistributionError,
    image: &ContainerImage,
    credentials: Option<&RegistryCredentials>,
    doing: &str,
) -> RunError {
    let registry = &image.registry;
    let refused = || match credentials {
        Some(c) => RunError::Unsupported(format!(
            "registry {registry} refused the credentials of user {:?} for image {image}",
            c.username
        )),
        None => RunError::Unsupported(format!(
            "registry {registry} requires credentials for image {image} \
             (set container-registry-username and container-registry-password)"
        )),
    };
    let unknown = || {
        RunError::Unsupported(format!(
            "image {image} does not exist in registry {registry}"
        ))
    };
    let unavailable = |why: &str| {
        RunError::Unavailable(format!(
            "registry {registry} is unavailable ({why}) while {doing} image {image}"
        ))
    };
    match error {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => refused(),
        OciDistributionError::ImageManifestNotFoundError(_) => unknown(),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                refused()
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::NameInvalid
                )
            }) {
                unknown()
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                unavailable("too many requests")
            } else {
                RunError::Unsupported(format!(
                    "registry {registry} rejected the request for image {image}: {:?}",
                    codes
                ))
            }
        }
        OciDistributionError::ServerError { code, .. } => match code {
            401 | 403 => refused(),
            404 => unknown(),
            429 | 500.. => unavailable(&format!("HTTP {code}")),
            _ => RunError::Unsupported(format!(
                "registry {registry} answered HTTP {code} for image {image}"
            )),
        },
        OciDistributionError::RequestError(e) if e.is_timeout() => unavailable("timed out"),
        OciDistributionError::RequestError(e) if e.is_connect() => unavailable("cannot connect"),
        OciDistributionError::RequestError(_) => unavailable("request failed"),
        OciDistributionError::DigestError(_) => RunError::Unsupported(format!(
            "registry {registry} returned a manifest for image {image} whose digest does not match"
        )),
        other => RunError::Unsupported(format!(
            "{doing} image {image} at registry {registry} failed ({})",
            kind_of(other)
        )),
    }
}

/// A credential-free name for an error kind.
fn kind_of(error: &OciDistributionError) -> &'static str {
    match error {
        OciDistributionError::RegistryNoDigestError => "the registry sent no digest",
        OciDistributionError::SpecViolationError(_) => {
            "the registry violated the distribution spec"
        }
        OciDistributionError::RegistryTokenDecodeError(_) => "the registry's token did not decode",
        OciDistributionError::UrlParseError(_) => "the reference makes no valid URL",
        _ => "unexpected registry answer",
    }
}

/// A runtime's failed pull (its message already redacted) as an error
/// naming the image and registry: refused or unknown is FAILED_PRECONDITION,
/// anything else UNAVAILABLE (the registry resolved the image a moment ago).
pub fn pull_error(runtime: &str, image: &ResolvedImage, message: &str) -> RunError {
    let what = format!(
        "{runtime} could not pull image {} ({}) from registry {}: {message}",
        image.image, image.digest, image.image.registry
    );
    let text = message.to_lowercase();
    if [
        "unauthorized",
        "denied",
        "not found",
        "manifest unknown",
        "authentication required",
    ]
    .iter()
    .any(|needle| text.contains(needle))
    {
        RunError::Unsupported(what)
    } else {
        RunError::Unavailable(what)
    }
}

/// Replaces the password, wherever it appears in `text`, by `<redacted>`:
/// for messages from runtimes that might echo what they were given.
pub fn redact(text: &str, credentials: Option<&RegistryCredentials>) -> String {
    match credentials {
        Some(c) if !c.password.expose().is_empty() => {
            text.replace(c.password.expose(), "<redacted>")
        }
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_platform::Secret;

    #[test]
    fn loopback_registries_are_recognized() {
        for registry in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5001",
            "127.3.2.1",
            "[::1]:5000",
        ] {
            assert!(is_loopback(registry), "{registry}");
        }
        for registry in [
            "docker.io",
            "ghcr.io:443",
            "10.0.0.1:5000",
            "[fe80::1]:5000",
        ] {
            assert!(!is_loopback(registry), "{registry}");
        }
    }

    #[test]
    fn docker_hub_official_images_live_under_library() {
        let busybox = parse_image("busybox:1.36").unwrap();
        assert_eq!(oci_reference(&busybox).repository(), "library/busybox");
        let owned = parse_image("docker.io/someone/tool@sha256:abc");
        assert!(owned.is_err(), "a short digest does not parse");
        let owned = parse_image("someone/tool:v1").unwrap();
        assert_eq!(oci_reference(&owned).repository(), "someone/tool");
        let local = parse_image("127.0.0.1:5000/kiln-test/base").unwrap();
        let reference = oci_reference(&local);
        assert_eq!(reference.registry(), "127.0.0.1:5000");
        assert_eq!(reference.repository(), "kiln-test/base");
        assert_eq!(reference.tag(), Some("latest"));
    }

    #[test]
    fn credentials_hash_with_a_salt_and_never_print() {
        let images = Images::new("docker", ImageConfig::default()).unwrap();
        let other = Images::new("docker", ImageConfig::default()).unwrap();
        let credentials = RegistryCredentials {
            username: "kiln".into(),
            password: Secret::new("hunter2"),
        };
        let wrong = RegistryCredentials {
            username: "kiln".into(),
            password: Secret::new("hunter3"),
        };
        assert_eq!(images.hash(&credentials), images.hash(&credentials));
        assert_ne!(images.hash(&credentials), images.hash(&wrong));
        assert_ne!(images.hash(&credentials), other.hash(&credentials));
        assert_eq!(
            redact("bad password hunter2!", Some(&credentials)),
            "bad password <redacted>!"
        );
    }

    #[test]
    fn no_image_and_no_default_is_a_failed_precondition() {
        let images = Images::new("podman", ImageConfig::default()).unwrap();
        let error = images.image_for(&Platform::default()).unwrap_err();
        assert!(matches!(&error, RunError::Unsupported(m) if m ==
            "workload-isolation-type=podman needs container-image (this executor has no default image)"));
        let images = Images::new(
            "podman",
            ImageConfig {
                default_image: Some("docker://127.0.0.1:5000/kiln-test/base:latest".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let image = images.image_for(&Platform::default()).unwrap();
        assert_eq!(image.to_string(), "127.0.0.1:5000/kiln-test/base:latest");
        assert!(Images::new(
            "podman",
            ImageConfig {
                default_image: Some("UPPER/case".into()),
                ..Default::default()
            }
        )
        .is_err());
    }
}
