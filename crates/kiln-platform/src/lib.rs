//! The platform-property contract (`docs/platform-properties.md`), parsed
//! once into typed values. Everything past this crate sees [`Platform`],
//! never the raw strings: the scheduler matches on it, executors and
//! isolation backends read it, and [`Platform::runner_key`] decides
//! warm-runner reuse.
//!
//! Sources, lowest precedence first: `Command.platform` (older clients),
//! `Action.platform`, then request headers `x-buildbuddy-platform.KEY` and
//! `x-kiln-platform.KEY`. Header values are how users pass secrets, so the
//! registry password is a [`Secret`] that never prints, and the runner key
//! holds only its hash.
#![forbid(unsafe_code)]

pub mod units;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

pub use units::{parse_duration, parse_size};

/// Header prefixes that override platform properties.
pub const HEADER_PREFIXES: [&str; 2] = ["x-buildbuddy-platform.", "x-kiln-platform."];

/// Every key `docs/platform-properties.md` defines, spelled as users write
/// them.
pub const KNOWN_KEYS: [&str; 27] = [
    "Pool",
    "OSFamily",
    "Arch",
    "use-self-hosted-executors",
    "workload-isolation-type",
    "recycle-runner",
    "preserve-workspace",
    "clean-workspace-inputs",
    "nonroot-workspace",
    "runner-recycling-key",
    "EstimatedCPU",
    "EstimatedMemory",
    "EstimatedComputeUnits",
    "EstimatedFreeDiskBytes",
    "default-timeout",
    "termination-grace-period",
    "persistentWorkerKey",
    "persistentWorkerProtocol",
    "container-image",
    "container-registry-username",
    "container-registry-password",
    "dockerUser",
    "dockerInit",
    "dockerRunAsRoot",
    "dockerNetwork",
    "init-dockerd",
    "enable-dockerd-tcp",
];

/// Keys whose values are secrets: never logged, echoed or stored.
const SECRET_KEYS: [&str; 1] = ["container-registry-password"];

/// The identity that platform header overrides (`header_properties`)
/// add to an action: a SHA-256 over the overriding pairs, sorted, or
/// `None` without any. The registry credentials are left out: they decide
/// who may pull an image, not what runs, and a secret never becomes part
/// of a key. The Action Cache and the merging of identical executions
/// are partitioned by it, so a result run in one image never answers a
/// request that asked for another.
pub fn overrides_digest(headers: &[(String, String)]) -> Option<[u8; 32]> {
    let mut pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(key, _)| !CREDENTIAL_KEYS.contains(&key.as_str()))
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    pairs.sort_unstable();
    let mut hash = Sha256::new();
    hash.update(b"kiln-header-overrides-v1\0");
    for (key, value) in pairs {
        for part in [key, value] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
    }
    Some(hash.finalize().into())
}

/// Keys that carry registry credentials.
const CREDENTIAL_KEYS: [&str; 2] = ["container-registry-username", "container-registry-password"];

/// Whether property `key`'s value is a secret, to be shown redacted.
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
}

/// A property refused before the action is queued: a malformed value, a
/// combination that means nothing, or a value this Kiln cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("platform property {key}={shown:?} is {}: {accepted}", .kind.adjective())]
pub struct PlatformError {
    pub key: String,
    /// The value as given, or `<redacted>` for secrets.
    pub shown: String,
    /// What the key accepts, or why the value is refused and what to do.
    pub accepted: String,
    pub kind: PlatformErrorKind,
}

/// Why a property was refused, which decides the gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformErrorKind {
    /// A malformed value, or a combination that contradicts itself:
    /// `INVALID_ARGUMENT`.
    Invalid,
    /// A well-formed value this Kiln does not implement (yet), so it
    /// cannot do what the property asks: `FAILED_PRECONDITION`.
    Unsupported,
}

impl PlatformErrorKind {
    fn adjective(self) -> &'static str {
        match self {
            PlatformErrorKind::Invalid => "invalid",
            PlatformErrorKind::Unsupported => "not supported",
        }
    }
}

/// A string that never prints. Compare and hash it; do not log it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it (a registry login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum OsFamily {
    #[default]
    Linux,
    Darwin,
    Windows,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Arch {
    #[default]
    Amd64,
    Arm64,
}

impl Arch {
    /// The architecture this process runs on.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IsolationType {
    None,
    Sandbox,
    Podman,
    Docker,
    Firecracker,
}

impl IsolationType {
    pub fn name(self) -> &'static str {
        match self {
            IsolationType::None => "none",
            IsolationType::Sandbox => "sandbox",
            IsolationType::Podman => "podman",
            IsolationType::Docker => "docker",
            IsolationType::Firecracker => "firecracker",
        }
    }

    /// Every type, in the order of `docs/platform-properties.md`.
    pub const ALL: [IsolationType; 5] = [
        IsolationType::None,
        IsolationType::Sandbox,
        IsolationType::Podman,
        IsolationType::Docker,
        IsolationType::Firecracker,
    ];

    /// The type named `name` (a `workload-isolation-type` value).
    pub fn from_name(name: &str) -> Option<IsolationType> {
        IsolationType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether actions of this type run in `container-image` (the others
    /// run on the host's system).
    pub fn runs_images(self) -> bool {
        matches!(
            self,
            IsolationType::Docker | IsolationType::Podman | IsolationType::Firecracker
        )
    }

    /// Whether this type may preserve a warm runner's workspace on some
    /// executor (`none` only where the executor can stop every process of
    /// an action). `firecracker` keeps warm VMs, but each action's inputs
    /// replace the last action's workspace.
    pub fn may_keep_warm_runners(self) -> bool {
        matches!(
            self,
            IsolationType::None
                | IsolationType::Sandbox
                | IsolationType::Docker
                | IsolationType::Podman
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DockerNetwork {
    Off,
    #[default]
    Bridge,
}

/// `persistentWorkerProtocol`: how requests reach a persistent worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WorkerProtocol {
    /// Varint-length-delimited `WorkRequest`/`WorkResponse` protobufs.
    #[default]
    Proto,
    /// One JSON object per line, protobuf JSON names.
    Json,
}

/// `persistentWorkerKey` and its protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistentWorker {
    pub key: String,
    pub protocol: WorkerProtocol,
}

/// `dockerUser`: a name, a uid, or `uid:gid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DockerUser {
    Name(String),
    Uid(u32),
    UidGid(u32, u32),
}

impl DockerUser {
    /// Parses a user the way `dockerUser` is parsed (also for settings
    /// that name a user, such as the executor's action user); errors name
    /// `key`.
    pub fn parse(key: &str, value: &str) -> Result<DockerUser, PlatformError> {
        parse_docker_user(key, value)
    }
}

/// As the property is written: `name`, `uid` or `uid:gid`.
impl fmt::Display for DockerUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DockerUser::Name(name) => f.write_str(name),
            DockerUser::Uid(uid) => write!(f, "{uid}"),
            DockerUser::UidGid(uid, gid) => write!(f, "{uid}:{gid}"),
        }
    }
}

/// What an image reference names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageReference {
    Tag(String),
    /// `sha256:<64 hex>`.
    Digest(String),
}

/// A parsed `container-image`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerImage {
    /// Registry host (and port); `docker.io` when the name has none.
    pub registry: String,
    pub repository: String,
    pub reference: ImageReference,
}

impl fmt::Display for ContainerImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            ImageReference::Tag(tag) => write!(f, "{}/{}:{}", self.registry, self.repository, tag),
            ImageReference::Digest(digest) => {
                write!(f, "{}/{}@{}", self.registry, self.repository, digest)
            }
        }
    }
}

/// Registry credentials from properties or headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: Secret,
}

/// What the action expects to use; the scheduler reserves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Resources {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub free_disk_bytes: Option<u64>,
}

/// One compute unit is 1 CPU and 2.5 GB of memory.
const COMPUTE_UNIT_MILLIS: u64 = 1000;
const COMPUTE_UNIT_BYTES: u64 = 2_500_000_000;

/// The typed platform of one action.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Platform {
    /// `None`: the default pool.
    pub pool: Option<String>,
    /// `use-self-hosted-executors`: only executors the caller's
    /// organisation registered with its own key may run the action.
    pub self_hosted: bool,
    pub os_family: OsFamily,
    pub arch: Arch,
    /// `None`: the executor's configured default.
    pub isolation: Option<IsolationType>,
    pub recycle_runner: bool,
    pub preserve_workspace: bool,
    pub clean_workspace_inputs: Vec<String>,
    pub nonroot_workspace: bool,
    pub runner_recycling_key: Option<String>,
    pub resources: Resources,
    pub default_timeout: Option<Duration>,
    pub termination_grace_period: Option<Duration>,
    pub container_image: Option<ContainerImage>,
    pub registry_credentials: Option<RegistryCredentials>,
    pub docker_user: Option<DockerUser>,
    pub docker_init: bool,
    pub docker_run_as_root: bool,
    /// `None`: not set (or empty), which means `bridge` where the runtime
    /// has a bridge network.
    pub docker_network: Option<DockerNetwork>,
    /// `init-dockerd`: a Docker daemon starts inside the action's microVM
    /// before the action (`firecracker` only).
    pub init_dockerd: bool,
    /// `enable-dockerd-tcp`: that daemon also listens on TCP port 2375
    /// inside the VM (with `init-dockerd` only).
    pub enable_dockerd_tcp: bool,
    /// `persistentWorkerKey` (non-empty) and `persistentWorkerProtocol`:
    /// with `recycle-runner`, the action is a request to a long-running
    /// worker of that key; without, an ordinary action.
    pub persistent_worker: Option<PersistentWorker>,
    /// Keys `docs/platform-properties.md` does not define: carried along,
    /// and constraining placement only where an executor declares them.
    pub other: BTreeMap<String, String>,
    /// The keys of `other` spelled by a header alone (so lower-case: HTTP/2
    /// lower-cases header names), which executors' declared keys match
    /// ignoring ASCII case.
    spelled_by_headers: BTreeSet<String>,
    /// Every effective property (secrets hashed), for the runner key.
    effective: BTreeMap<String, String>,
}

/// The raw properties of one request, from all sources.
#[derive(Clone, Debug, Default)]
pub struct PropertySources<'a> {
    /// `Command.platform` (older clients put the platform here).
    pub command: &'a [(String, String)],
    /// `Action.platform`: wins over the command's.
    pub action: &'a [(String, String)],
    /// gRPC request headers (names lower-case, as HTTP/2 delivers them).
    pub headers: &'a [(String, String)],
}

/// The key of `docs/platform-properties.md` that `key` spells, ignoring
/// ASCII case.
pub fn known_key_ignoring_case(key: &str) -> Option<&'static str> {
    KNOWN_KEYS
        .iter()
        .find(|known| known.eq_ignore_ascii_case(key))
        .copied()
}

/// The canonical spelling of a key: header names arrive lower-cased, so a
/// known key matches case-insensitively there; other sources are exact.
fn canonical_header_key(lowercase: &str) -> String {
    known_key_ignoring_case(lowercase).map_or_else(|| lowercase.to_string(), str::to_string)
}

/// The platform keys carried by request headers, in the order given.
pub fn header_properties<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, String)> {
    headers
        .into_iter()
        .filter_map(|(name, value)| {
            // Most headers carry no prefix: only those are lower-cased.
            HEADER_PREFIXES.iter().find_map(|prefix| {
                let head = name.get(..prefix.len())?;
                head.eq_ignore_ascii_case(prefix).then(|| {
                    let key = name[prefix.len()..].to_ascii_lowercase();
                    (canonical_header_key(&key), value.to_string())
                })
            })
        })
        .collect()
}

fn refused(kind: PlatformErrorKind, key: &str, value: &str, accepted: &str) -> PlatformError {
    let shown = if SECRET_KEYS.contains(&key) {
        "<redacted>".to_string()
    } else {
        value.chars().take(200).collect()
    };
    PlatformError {
        key: key.to_string(),
        shown,
        accepted: accepted.to_string(),
        kind,
    }
}

fn invalid(key: &str, value: &str, accepted: &str) -> PlatformError {
    refused(PlatformErrorKind::Invalid, key, value, accepted)
}

fn unsupported(key: &str, value: &str, why: &str) -> PlatformError {
    refused(PlatformErrorKind::Unsupported, key, value, why)
}

/// A Docker daemon runs only inside a microVM: `init-dockerd` and
/// `enable-dockerd-tcp` with another isolation type would be ignored, so
/// they are refused (the executor's default type is checked where it
/// runs); the TCP listener is the daemon's, so it needs `init-dockerd`.
fn check_dockerd(
    platform: &Platform,
    merged: &BTreeMap<String, String>,
) -> Result<(), PlatformError> {
    let value = |key: &str| merged.get(key).map_or("", String::as_str).to_string();
    for (key, wanted) in [
        ("init-dockerd", platform.init_dockerd),
        ("enable-dockerd-tcp", platform.enable_dockerd_tcp),
    ] {
        match platform.isolation {
            Some(isolation) if wanted && isolation != IsolationType::Firecracker => {
                return Err(invalid(
                    key,
                    &value(key),
                    &format!(
                        "a Docker daemon runs only inside a microVM, and \
                         workload-isolation-type={} runs none; set \
                         workload-isolation-type=firecracker, or remove {key}",
                        isolation.name()
                    ),
                ));
            }
            _ => {}
        }
    }
    if platform.enable_dockerd_tcp && !platform.init_dockerd {
        return Err(invalid(
            "enable-dockerd-tcp",
            &value("enable-dockerd-tcp"),
            "opens the TCP port of the Docker daemon init-dockerd starts: set init-dockerd=true too",
        ));
    }
    Ok(())
}

fn parse_bool(key: &str, value: &str) -> Result<bool, PlatformError> {
    match value.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(key, value, "expected true or false")),
    }
}

fn non_empty(key: &str, value: &str) -> Result<String, PlatformError> {
    if value.trim().is_empty() {
        return Err(invalid(key, value, "expected a non-empty value"));
    }
    Ok(value.to_string())
}

/// Splits a comma-separated glob list, leaving commas inside `{a,b}`
/// alternatives and `[...]` classes alone.
fn split_globs(list: &str) -> Vec<&str> {
    let (mut parts, mut start, mut braces, mut in_class) = (Vec::new(), 0, 0usize, false);
    for (i, c) in list.char_indices() {
        match c {
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            '{' if !in_class => braces += 1,
            '}' if !in_class => braces = braces.saturating_sub(1),
            ',' if !in_class && braces == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts
}

fn parse_cpu_millis(key: &str, value: &str) -> Result<u64, PlatformError> {
    let accepted = "expected CPU cores such as 2, 0.5 or 4000m";
    let millis = match value.trim().strip_suffix('m') {
        Some(millis) => millis
            .parse::<u64>()
            .map_err(|_| invalid(key, value, accepted))?,
        None => {
            let cores: f64 = value
                .trim()
                .parse()
                .map_err(|_| invalid(key, value, accepted))?;
            if !cores.is_finite() || !(0.0..=1e6).contains(&cores) {
                return Err(invalid(key, value, accepted));
            }
            (cores * 1000.0).round() as u64
        }
    };
    Ok(millis)
}

fn parse_platform_size(key: &str, value: &str) -> Result<u64, PlatformError> {
    units::parse_size(value).map_err(|_| {
        invalid(
            key,
            value,
            "expected a size such as 1M, 2GB or 4.5GB (B, K/KB, M/MB, G/GB, T/TB, or KiB to TiB)",
        )
    })
}

fn parse_platform_duration(key: &str, value: &str) -> Result<Duration, PlatformError> {
    units::parse_duration(value).map_err(|_| {
        invalid(
            key,
            value,
            "expected a duration such as 500ms, 1s, 15m, 1h or 1h30m",
        )
    })
}

fn parse_image(key: &str, value: &str) -> Result<ContainerImage, PlatformError> {
    let accepted =
        "expected docker://REGISTRY/NAME:TAG or docker://REGISTRY/NAME@sha256:<64 hex digits>";
    let name = value.strip_prefix("docker://").unwrap_or(value);
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(key, value, accepted));
    }
    let (rest, reference) = match name.split_once('@') {
        Some((rest, digest)) => {
            let hex = digest
                .strip_prefix("sha256:")
                .ok_or_else(|| invalid(key, value, accepted))?;
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(invalid(key, value, accepted));
            }
            (rest, ImageReference::Digest(digest.to_string()))
        }
        None => {
            // A tag follows the last ':' after the last '/' (a ':' before it is a port).
            let last_slash = name.rfind('/').map_or(0, |i| i + 1);
            match name[last_slash..].rfind(':') {
                Some(i) => (
                    &name[..last_slash + i],
                    ImageReference::Tag(name[last_slash + i + 1..].to_string()),
                ),
                None => (name, ImageReference::Tag("latest".to_string())),
            }
        }
    };
    if let ImageReference::Tag(tag) = &reference {
        let valid_tag = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid_tag {
            return Err(invalid(key, value, accepted));
        }
    }
    let (registry, repository) = match rest.split_once('/') {
        Some((first, path))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), path.to_string())
        }
        _ => ("docker.io".to_string(), rest.to_string()),
    };
    let valid_repository = !repository.is_empty()
        && repository.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
    if !valid_repository || registry.is_empty() {
        return Err(invalid(key, value, accepted));
    }
    Ok(ContainerImage {
        registry,
        repository,
        reference,
    })
}

fn parse_docker_user(key: &str, value: &str) -> Result<DockerUser, PlatformError> {
    let accepted = "expected a user name, a uid, or uid:gid";
    if value.is_empty() || value.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(key, value, accepted));
    }
    if let Some((uid, gid)) = value.split_once(':') {
        if let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse()) {
            return Ok(DockerUser::UidGid(uid, gid));
        }
        if uid.is_empty() || gid.is_empty() {
            return Err(invalid(key, value, accepted));
        }
        return Ok(DockerUser::Name(value.to_string()));
    }
    Ok(value
        .parse()
        .map_or_else(|_| DockerUser::Name(value.to_string()), DockerUser::Uid))
}

impl Platform {
    /// Merges the sources (headers over action over command) and parses
    /// every known key. The first malformed value is the error.
    pub fn parse(sources: &PropertySources<'_>) -> Result<Platform, PlatformError> {
        let mut merged: BTreeMap<String, String> = BTreeMap::new();
        // Later sources win key by key.
        for (key, value) in sources.command.iter().chain(sources.action) {
            merged.insert(key.clone(), value.clone());
        }
        let mut spelled_by_headers = BTreeSet::new();
        for (key, value) in sources.headers {
            // A known key arrives in its own spelling (`header_properties`).
            // Any other key lost its case on the way (HTTP/2 lower-cases
            // header names), so it overrides every key of the Action or
            // Command that equals it ignoring ASCII case, in their spelling;
            // with none, it stays as it came.
            let known = KNOWN_KEYS.contains(&key.as_str());
            let respelled: Vec<String> = if known {
                Vec::new()
            } else {
                merged
                    .keys()
                    .filter(|other| {
                        other.eq_ignore_ascii_case(key) && !KNOWN_KEYS.contains(&other.as_str())
                    })
                    .cloned()
                    .collect()
            };
            if respelled.is_empty() {
                if !known {
                    spelled_by_headers.insert(key.clone());
                }
                merged.insert(key.clone(), value.clone());
            } else {
                for other in respelled {
                    merged.insert(other, value.clone());
                }
            }
        }

        let mut platform = Platform {
            spelled_by_headers,
            ..Platform::default()
        };
        let mut compute_units = None;
        let (mut cpu, mut memory) = (None, None);
        let (mut username, mut password) = (None, None);
        let (mut worker_key, mut worker_protocol) = (None, None);
        for (key, value) in &merged {
            let v = value.as_str();
            match key.as_str() {
                "Pool" => platform.pool = Some(non_empty(key, v)?),
                "OSFamily" => {
                    platform.os_family = match v.to_ascii_lowercase().as_str() {
                        "linux" => OsFamily::Linux,
                        "darwin" => OsFamily::Darwin,
                        "windows" => OsFamily::Windows,
                        _ => return Err(invalid(key, v, "expected linux, darwin or windows")),
                    }
                }
                "Arch" => {
                    platform.arch = match v.to_ascii_lowercase().as_str() {
                        "amd64" | "x86_64" => Arch::Amd64,
                        "arm64" | "aarch64" => Arch::Arm64,
                        _ => {
                            return Err(invalid(
                                key,
                                v,
                                "expected amd64 or arm64 (x86_64 and aarch64 are aliases)",
                            ))
                        }
                    }
                }
                "use-self-hosted-executors" => platform.self_hosted = parse_bool(key, v)?,
                "workload-isolation-type" => {
                    platform.isolation = Some(match v.to_ascii_lowercase().as_str() {
                        "none" => IsolationType::None,
                        "sandbox" => IsolationType::Sandbox,
                        "podman" => IsolationType::Podman,
                        "docker" => IsolationType::Docker,
                        "firecracker" => IsolationType::Firecracker,
                        _ => {
                            return Err(invalid(
                                key,
                                v,
                                "expected none, sandbox, podman, docker or firecracker",
                            ))
                        }
                    })
                }
                "recycle-runner" => platform.recycle_runner = parse_bool(key, v)?,
                "preserve-workspace" => platform.preserve_workspace = parse_bool(key, v)?,
                "clean-workspace-inputs" => {
                    let mut patterns = Vec::new();
                    for pattern in split_globs(v)
                        .into_iter()
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                    {
                        globset::Glob::new(pattern).map_err(|e| {
                            invalid(
                                key,
                                v,
                                &format!("expected comma-separated globs; {pattern:?}: {e}"),
                            )
                        })?;
                        patterns.push(pattern.to_string());
                    }
                    platform.clean_workspace_inputs = patterns;
                }
                "nonroot-workspace" => platform.nonroot_workspace = parse_bool(key, v)?,
                "runner-recycling-key" => platform.runner_recycling_key = Some(v.to_string()),
                "EstimatedCPU" => cpu = Some(parse_cpu_millis(key, v)?),
                "EstimatedMemory" => memory = Some(parse_platform_size(key, v)?),
                "EstimatedComputeUnits" => {
                    let units: f64 = v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|u: &f64| u.is_finite() && *u >= 0.0 && *u <= 1e6)
                        .ok_or_else(|| {
                            invalid(key, v, "expected a number of compute units such as 1 or 9")
                        })?;
                    compute_units = Some(units);
                }
                "EstimatedFreeDiskBytes" => {
                    platform.resources.free_disk_bytes = Some(parse_platform_size(key, v)?)
                }
                "default-timeout" => {
                    platform.default_timeout = Some(parse_platform_duration(key, v)?)
                }
                "termination-grace-period" => {
                    platform.termination_grace_period = Some(parse_platform_duration(key, v)?)
                }
                // Bazel adds persistentWorkerKey to worker-capable spawns
                // with --experimental_remote_mark_tool_inputs.
                "persistentWorkerKey" => {
                    worker_key = Some(v.to_string()).filter(|k| !k.is_empty());
                }
                "persistentWorkerProtocol" => {
                    worker_protocol = match v.to_ascii_lowercase().as_str() {
                        "" => None,
                        "proto" => Some(WorkerProtocol::Proto),
                        "json" => Some(WorkerProtocol::Json),
                        _ => return Err(invalid(key, v, "expected proto or json")),
                    }
                }
                "container-image" => {
                    platform.container_image = if v.is_empty() || v == "none" {
                        None
                    } else {
                        Some(parse_image(key, v)?)
                    }
                }
                "container-registry-username" => username = Some(v.to_string()),
                "container-registry-password" => password = Some(Secret::new(v)),
                "dockerUser" => platform.docker_user = Some(parse_docker_user(key, v)?),
                "dockerInit" => platform.docker_init = parse_bool(key, v)?,
                "dockerRunAsRoot" => platform.docker_run_as_root = parse_bool(key, v)?,
                "dockerNetwork" => {
                    platform.docker_network = match v.to_ascii_lowercase().as_str() {
                        "off" => Some(DockerNetwork::Off),
                        "bridge" => Some(DockerNetwork::Bridge),
                        "" => None,
                        _ => return Err(invalid(key, v, "expected off or bridge")),
                    }
                }
                "init-dockerd" => platform.init_dockerd = parse_bool(key, v)?,
                "enable-dockerd-tcp" => platform.enable_dockerd_tcp = parse_bool(key, v)?,
                _ => {
                    platform.other.insert(key.clone(), value.clone());
                }
            }
        }
        match (worker_key, worker_protocol) {
            (Some(key), protocol) => {
                platform.persistent_worker = Some(PersistentWorker {
                    key,
                    protocol: protocol.unwrap_or_default(),
                })
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "persistentWorkerProtocol",
                    merged
                        .get("persistentWorkerProtocol")
                        .map_or("", String::as_str),
                    "says how to talk to a persistent worker: set persistentWorkerKey too",
                ))
            }
            (None, None) => {}
        }
        // Options of a warm runner mean nothing without one: refused rather
        // than ignored.
        if platform.preserve_workspace && !platform.recycle_runner {
            return Err(invalid(
                "preserve-workspace",
                "true",
                "a workspace is preserved only in a warm runner: set recycle-runner=true too",
            ));
        }
        if !platform.clean_workspace_inputs.is_empty() && !platform.preserve_workspace {
            return Err(invalid(
                "clean-workspace-inputs",
                &platform.clean_workspace_inputs.join(","),
                "cleans a preserved workspace: set preserve-workspace=true and recycle-runner=true too",
            ));
        }
        // Isolation types known never to keep a workspace between actions
        // (those that depend on the executor are checked where it runs).
        if let Some(isolation) = platform.isolation.filter(|_| platform.preserve_workspace) {
            if isolation == IsolationType::Firecracker {
                return Err(unsupported(
                    "preserve-workspace",
                    "true",
                    "workload-isolation-type=firecracker keeps warm VMs (recycle-runner) but \
                     not their workspaces: each action's inputs replace the last action's \
                     files; remove preserve-workspace, or use sandbox, docker or podman",
                ));
            }
            if !isolation.may_keep_warm_runners() {
                return Err(unsupported(
                    "preserve-workspace",
                    "true",
                    &format!(
                        "workload-isolation-type={} runs every action in a fresh runner in this \
                         Kiln, so there is no workspace to preserve; use \
                         workload-isolation-type=sandbox, docker or podman, or remove \
                         preserve-workspace",
                        isolation.name()
                    ),
                ));
            }
        }
        // Persistent workers live in the warm runners of `none`, `sandbox`
        // (in a sandbox of their own), `docker` and `podman`; a VM runner
        // keeps none.
        if let (Some(worker), Some(isolation)) = (&platform.persistent_worker, platform.isolation) {
            let kept = matches!(
                isolation,
                IsolationType::None
                    | IsolationType::Sandbox
                    | IsolationType::Docker
                    | IsolationType::Podman
            );
            if platform.recycle_runner && !kept {
                return Err(unsupported(
                    "persistentWorkerKey",
                    &worker.key,
                    &format!(
                        "workload-isolation-type={} keeps no persistent workers in this Kiln \
                         (none, sandbox, docker and podman do); use one of those, or remove \
                         recycle-runner to run the action as an ordinary one",
                        isolation.name()
                    ),
                ));
            }
        }
        // An image asked for where the action runs on the host's system
        // would be ignored: refused instead.
        if let (Some(isolation), Some(image)) = (platform.isolation, merged.get("container-image"))
        {
            if platform.container_image.is_some() && !isolation.runs_images() {
                return Err(invalid(
                    "container-image",
                    image,
                    &format!(
                        "workload-isolation-type={} runs the action on the host's system, not in \
                         an image; set workload-isolation-type=docker or podman, or remove \
                         container-image (none or an empty value mean no image)",
                        isolation.name()
                    ),
                ));
            }
        }
        check_dockerd(&platform, &merged)?;
        // Explicit estimates win over the compute-unit shorthand.
        let units_cpu = compute_units.map(|u| (u * COMPUTE_UNIT_MILLIS as f64).round() as u64);
        let units_memory = compute_units.map(|u| (u * COMPUTE_UNIT_BYTES as f64).round() as u64);
        platform.resources.cpu_millis = cpu.or(units_cpu);
        platform.resources.memory_bytes = memory.or(units_memory);
        match (username, password) {
            (Some(username), Some(password)) => {
                platform.registry_credentials = Some(RegistryCredentials { username, password })
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(invalid(
                    "container-registry-password",
                    "",
                    "container-registry-username is set, so the password must be too",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "container-registry-username",
                    "",
                    "container-registry-password is set, so the username must be too",
                ))
            }
        }
        platform.effective = merged
            .into_iter()
            .map(|(key, value)| {
                if SECRET_KEYS.contains(&key.as_str()) {
                    let hashed = hex::encode(Sha256::digest(value.as_bytes()));
                    (key, format!("sha256:{hashed}"))
                } else {
                    (key, value)
                }
            })
            .collect();
        Ok(platform)
    }

    /// Decides warm-runner reuse: the isolation type, the image, every
    /// property (header overrides and the recycling key included; secrets
    /// only as hashes), the organisation and the instance name. Equal keys
    /// may share a runner.
    pub fn runner_key(&self, organisation: &str, instance_name: &str) -> String {
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(b"kiln-runner-key-v2");
        field(organisation.as_bytes());
        field(instance_name.as_bytes());
        field(self.isolation.map_or("", IsolationType::name).as_bytes());
        field(
            self.container_image
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
                .as_bytes(),
        );
        for (key, value) in &self.effective {
            field(key.as_bytes());
            field(value.as_bytes());
        }
        hex::encode(hasher.finalize())
    }

    /// [`Platform::runner_key`] as a value that also gives its short form.
    pub fn runner_key_of(&self, organisation: &str, instance_name: &str) -> RunnerKey {
        RunnerKey {
            key: self.runner_key(organisation, instance_name),
        }
    }

    /// Refuses a `termination-grace-period` longer than `max`, the
    /// server's limit (`setting` names it for the error), so an action
    /// cannot hold its executor arbitrarily long after its timeout or
    /// cancellation.
    pub fn check_termination_grace_period(
        &self,
        max: Duration,
        setting: &str,
    ) -> Result<(), PlatformError> {
        match self.termination_grace_period {
            Some(grace) if grace > max => {
                let key = "termination-grace-period";
                let value = self.effective.get(key).map_or("", String::as_str);
                Err(invalid(
                    key,
                    value,
                    &format!(
                        "at most {max:?} is allowed here ({setting}): the grace holds an \
                         executor after the action's timeout or cancellation"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Whether `key` (of [`Platform::other`]) was spelled by a header alone,
    /// so lower-cased on the way: executors' declared keys match it
    /// ignoring ASCII case.
    pub fn spelled_by_header(&self, key: &str) -> bool {
        self.spelled_by_headers.contains(key)
    }

    /// The effective properties with secrets replaced by their hashes: safe
    /// to log or show.
    pub fn redacted_properties(&self) -> &BTreeMap<String, String> {
        &self.effective
    }
}

/// The key that decides which actions may share a warm runner
/// ([`Platform::runner_key`]): the worker's pool compares whole keys, and
/// executors report, and the scheduler routes by, [`RunnerKey::short`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunnerKey {
    key: String,
}

impl RunnerKey {
    /// Its first 16 hex digits: what logs, result metadata and warm
    /// routing use.
    pub fn short(&self) -> &str {
        &self.key[..16.min(self.key.len())]
    }
}

#[cfg(test)]
mod tests;
