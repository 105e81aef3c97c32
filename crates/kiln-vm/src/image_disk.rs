//! Container images as VM root disks: [`ImageDisks`] pulls an image's
//! layers by manifest digest (with the action's credentials, as the
//! container backends do), unpacks them ([`unpack`]), makes an ext4 disk
//! of the tree ([`ext4`]) and keeps it, with the image's ENTRYPOINT, ENV,
//! WORKDIR and USER, under a byte budget.
//!
//! It is an [`ImageStore`], so [`kiln_container::Images`] resolves the
//! action's image and calls it exactly as it calls dockerd's or podman's
//! store. Each digest is built once however many actions ask at the same
//! time; a disk is handed out with a lease ([`ImageDisk`]) and is never
//! evicted while one is held, so a running VM's base disk stays put.
//!
//! On disk, under the configured directory: `disks/<algorithm>-<hex>/`
//! holds `rootfs.ext4` and `image.json` ([`ImageRuntimeConfig`]); builds
//! happen in `building/` and are renamed into place whole, so a failed or
//! abandoned build leaves nothing in `disks/` (and `building/` is emptied
//! on open).

mod ext4;
mod unpack;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{StreamExt as _, TryStreamExt as _};
use kiln_container::image::{
    oci_reference, registry_auth, registry_client, registry_error, ImageStore, ResolvedImage,
};
use kiln_platform::{ImageReference, RegistryCredentials};
use kiln_worker::RunError;
use oci_client::manifest::OciDescriptor;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;

/// The disk's file name in its directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// The image config's file name in its directory.
pub const CONFIG_FILE: &str = "image.json";

/// Layers downloaded at once per build.
const PARALLEL_LAYER_PULLS: usize = 3;

/// Where and how big the disk cache is.
#[derive(Debug, Clone)]
pub struct ImageDisksConfig {
    /// The cache's directory (created if missing; Kiln's alone).
    pub dir: PathBuf,
    /// Bound on the host bytes the cached disks occupy (allocated blocks:
    /// disks are sparse), enforced after each build: least recently used
    /// disks go first; disks in use are never evicted, so the cache can
    /// exceed this while they run. An image whose files alone exceed it is
    /// refused.
    pub budget_bytes: u64,
    /// Free space in each disk's file system beyond the image's content:
    /// what an action may write outside its workspace. Costs no host disk
    /// until written (the file is sparse, and guests write their overlay).
    pub free_bytes: u64,
    /// Bound on one whole pull (manifest, config and layers).
    pub pull_timeout: Duration,
}

impl ImageDisksConfig {
    /// A cache in `dir` of `budget_bytes`, with 256 MiB free per disk and a
    /// 10-minute pull bound.
    pub fn new(dir: impl Into<PathBuf>, budget_bytes: u64) -> ImageDisksConfig {
        ImageDisksConfig {
            dir: dir.into(),
            budget_bytes,
            free_bytes: 256 << 20,
            pull_timeout: Duration::from_secs(600),
        }
    }
}

/// What of the image's config applies to the action, as for containers.
/// (CMD does not: the action's arguments are the command.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRuntimeConfig {
    /// ENTRYPOINT, prefixed to the action's arguments; empty: none.
    pub entrypoint: Vec<String>,
    /// ENV, `NAME=value` each; the action's own variables win.
    pub env: Vec<String>,
    /// WORKDIR; None: unset (the action runs in its workspace anyway).
    pub working_dir: Option<String>,
    /// USER (`name`, `uid`, `uid:gid`, …); None: root.
    pub user: Option<String>,
}

impl ImageRuntimeConfig {
    /// Reads the fields from an OCI / Docker image config document.
    pub fn from_image_config(json: &str) -> Result<ImageRuntimeConfig, String> {
        let document: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("the image config is not JSON: {e}"))?;
        let config = &document["config"];
        let strings = |field: &str| -> Result<Vec<String>, String> {
            match &config[field] {
                serde_json::Value::Null => Ok(Vec::new()),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| format!("the image config's {field} holds a non-string"))
                    })
                    .collect(),
                _ => Err(format!("the image config's {field} is not a list")),
            }
        };
        let text = |field: &str| match &config[field] {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        Ok(ImageRuntimeConfig {
            entrypoint: strings("Entrypoint")?,
            env: strings("Env")?,
            working_dir: text("WorkingDir"),
            user: text("User"),
        })
    }
}

/// A cached disk, leased: it is not evicted until this is dropped. A VM
/// holds it for as long as it runs on (an overlay of) `rootfs`.
#[derive(Debug)]
pub struct ImageDisk {
    /// The manifest digest it was built from.
    pub digest: String,
    /// The ext4 image; read-only for everyone (put a copy-on-write overlay on it).
    pub rootfs: PathBuf,
    /// The image's ENTRYPOINT, ENV, WORKDIR and USER.
    pub config: ImageRuntimeConfig,
    _lease: Lease,
}

#[derive(Debug)]
struct Lease {
    state: Arc<parking_lot::Mutex<State>>,
    digest: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(entry) = self.state.lock().entries.get_mut(&self.digest) {
            entry.leases -= 1;
        }
    }
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// The use counter that orders entries for eviction.
    clock: u64,
    /// Sum of the entries' bytes.
    total: u64,
}

#[derive(Debug)]
struct Entry {
    bytes: u64,
    last_used: u64,
    leases: usize,
    config: ImageRuntimeConfig,
}

/// The VM disk cache (see the module comment).
pub struct ImageDisks {
    config: ImageDisksConfig,
    disks_dir: PathBuf,
    building_dir: PathBuf,
    state: Arc<parking_lot::Mutex<State>>,
    /// One build at a time per digest. Slots are kept (a few bytes per
    /// digest ever built): dropping one while a caller waits on it would
    /// let a second build of the digest start.
    builds_in_flight: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    builds: AtomicU64,
}

impl ImageDisks {
    /// Opens (creating) the cache in `config.dir`: the disks already there
    /// are kept, oldest first in line for eviction; leftovers of builds are
    /// removed.
    pub fn open(config: ImageDisksConfig) -> Result<ImageDisks, String> {
        let disks_dir = config.dir.join("disks");
        let building_dir = config.dir.join("building");
        let context = |what: &str, path: &Path, e: io::Error| {
            format!("VM disk cache: {what} {}: {e}", path.display())
        };
        if building_dir.exists() {
            std::fs::remove_dir_all(&building_dir)
                .map_err(|e| context("emptying", &building_dir, e))?;
        }
        for dir in [&disks_dir, &building_dir] {
            std::fs::create_dir_all(dir).map_err(|e| context("creating", dir, e))?;
        }
        let mut found = Vec::new();
        for child in std::fs::read_dir(&disks_dir).map_err(|e| context("reading", &disks_dir, e))? {
            let path = child.map_err(|e| context("reading", &disks_dir, e))?.path();
            match load_entry(&path) {
                Some((digest, entry, mtime)) => found.push((mtime, digest, entry)),
                None => {
                    tracing::warn!(path = %path.display(), "removing an incomplete VM disk");
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        found.sort_by_key(|(mtime, _, _)| *mtime);
        let mut state = State::default();
        for (_, digest, mut entry) in found {
            state.clock += 1;
            entry.last_used = state.clock;
            state.total += entry.bytes;
            state.entries.insert(digest, entry);
        }
        let disks = ImageDisks {
            config,
            disks_dir,
            building_dir,
            state: Arc::new(parking_lot::Mutex::new(state)),
            builds_in_flight: Default::default(),
            builds: AtomicU64::new(0),
        };
        for path in disks.evict(None) {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(disks)
    }

    /// How many disks this cache built (pulled and made) since it opened.
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// Host bytes the cached disks occupy.
    pub fn total_bytes(&self) -> u64 {
        self.state.lock().total
    }

    /// Whether the disk of `digest` is cached.
    pub fn contains(&self, digest: &str) -> bool {
        self.state.lock().entries.contains_key(digest)
    }

    /// The disk of `resolved`, leased: from the cache, else pulled from its
    /// registry with `credentials` (plain HTTP when `insecure`) and built;
    /// concurrent callers for one digest wait for the one build. Errors
    /// name the image and registry.
    pub async fn disk_for(
        &self,
        resolved: &ResolvedImage,
        credentials: Option<&RegistryCredentials>,
        insecure: bool,
    ) -> Result<ImageDisk, RunError> {
        let digest = &resolved.digest;
        let name = dir_name(digest).ok_or_else(|| {
            RunError::Unsupported(format!(
                "image {} has an unusable digest {digest:?}",
                resolved.image
            ))
        })?;
        if let Some(disk) = self.lease(digest) {
            return Ok(disk);
        }
        let slot = self
            .builds_in_flight
            .lock()
            .entry(digest.clone())
            .or_default()
            .clone();
        let _building = slot.lock().await;
        if let Some(disk) = self.lease(digest) {
            return Ok(disk);
        }
        let (bytes, config) = self.build(resolved, credentials, insecure, &name).await?;
        let disk = {
            let mut state = self.state.lock();
            state.clock += 1;
            state.total += bytes;
            let last_used = state.clock;
            state.entries.insert(
                digest.clone(),
                Entry {
                    bytes,
                    last_used,
                    leases: 0,
                    config,
                },
            );
            drop(state);
            self.lease(digest)
                .expect("inserted just now, under the build slot")
        };
        let evicted = self.evict(Some(digest));
        if !evicted.is_empty() {
            remove_dirs(evicted).await;
        }
        Ok(disk)
    }

    fn lease(&self, digest: &str) -> Option<ImageDisk> {
        let mut state = self.state.lock();
        state.clock += 1;
        let now = state.clock;
        let entry = state.entries.get_mut(digest)?;
        entry.leases += 1;
        entry.last_used = now;
        let dir = self.disks_dir.join(dir_name(digest)?);
        Some(ImageDisk {
            digest: digest.to_string(),
            rootfs: dir.join(ROOTFS_FILE),
            config: entry.config.clone(),
            _lease: Lease {
                state: self.state.clone(),
                digest: digest.to_string(),
            },
        })
    }

    /// Takes least recently used, unleased disks (never `keep`) out of the
    /// cache until it fits its budget; returns their directories, moved
    /// aside (so a new build of the same digest cannot collide) for the
    /// caller to delete.
    fn evict(&self, keep: Option<&str>) -> Vec<PathBuf> {
        let mut state = self.state.lock();
        let mut evicted = Vec::new();
        while state.total > self.config.budget_bytes {
            let victim = state
                .entries
                .iter()
                .filter(|(digest, entry)| entry.leases == 0 && Some(digest.as_str()) != keep)
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(digest, _)| digest.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    total = state.total,
                    budget = self.config.budget_bytes,
                    "VM disk cache over budget: every disk is in use"
                );
                break;
            };
            let entry = state.entries.remove(&victim).expect("just found");
            state.total -= entry.bytes;
            let Some(name) = dir_name(&victim) else {
                continue;
            };
            let from = self.disks_dir.join(&name);
            let aside = self
                .building_dir
                .join(format!("evicted-{name}-{}", state.clock));
            match std::fs::rename(&from, &aside) {
                Ok(()) => evicted.push(aside),
                Err(e) => tracing::warn!(path = %from.display(), "evicting a VM disk: {e}"),
            }
            tracing::info!(digest = %victim, bytes = entry.bytes, "evicted a VM disk");
        }
        evicted
    }

    /// Pulls and builds the disk of `resolved` into `disks/<name>`; its
    /// host bytes and runtime config.
    async fn build(
        &self,
        resolved: &ResolvedImage,
        credentials: Option<&RegistryCredentials>,
        insecure: bool,
        name: &str,
    ) -> Result<(u64, ImageRuntimeConfig), RunError> {
        let image = &resolved.image;
        let what = || {
            format!(
                "image {image} ({}) from registry {}",
                resolved.digest, image.registry
            )
        };
        let local = |doing: &str, e: io::Error| local_error(&format!("{}: {doing}", what()), e);
        let started = Instant::now();
        let work = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&self.building_dir)
            .map_err(|e| local("making a build directory", e))?;

        // Pull: manifest and config, then the layers into files.
        let mut pinned = image.clone();
        pinned.reference = ImageReference::Digest(resolved.digest.clone());
        let reference = oci_reference(&pinned);
        let client = registry_client(&image.registry, insecure);
        let auth = registry_auth(credentials);
        let pull = async {
            let (manifest, _, config_json) = client
                .pull_manifest_and_config(&reference, &auth)
                .await
                .map_err(|e| registry_error(&e, image, credentials, "pulling"))?;
            for layer in &manifest.layers {
                if !is_tar_layer(&layer.media_type) {
                    return Err(RunError::Unsupported(format!(
                        "{}: layer {} has media type {:?}, which is not a tar layer",
                        what(),
                        layer.digest,
                        layer.media_type
                    )));
                }
            }
            // Owned descriptors: a borrowed one trips a higher-ranked
            // lifetime bound of the stream combinators under async-trait.
            let layers: Vec<OciDescriptor> = manifest.layers.clone();
            let files: Vec<PathBuf> = futures::stream::iter(layers.into_iter().enumerate())
                .map(|(index, layer)| {
                    let path = work.path().join(format!("layer-{index}"));
                    let client = &client;
                    let reference = &reference;
                    async move {
                        pull_layer(client, reference, &layer, &path).await.map_err(
                            |e| match e {
                                LayerPull::Registry(e) => {
                                    registry_error(&e, image, credentials, "pulling")
                                }
                                LayerPull::Local(e) => {
                                    local(&format!("saving layer {}", layer.digest), e)
                                }
                            },
                        )?;
                        Ok::<_, RunError>(path)
                    }
                })
                .buffered(PARALLEL_LAYER_PULLS)
                .try_collect()
                .await?;
            let layer_digests: Vec<String> =
                manifest.layers.iter().map(|l| l.digest.clone()).collect();
            Ok::<_, RunError>((config_json, files, layer_digests))
        };
        let (config_json, layer_files, layer_digests) =
            tokio::time::timeout(self.config.pull_timeout, pull)
                .await
                .map_err(|_| {
                    RunError::Unavailable(format!(
                        "{}: the pull did not finish within {:?}",
                        what(),
                        self.config.pull_timeout
                    ))
                })??;
        let config = ImageRuntimeConfig::from_image_config(&config_json)
            .map_err(|why| RunError::Unsupported(format!("{}: {why}", what())))?;
        let pulled = started.elapsed();

        // Unpack, off the async threads.
        let tree = work.path().join("tree");
        let max_bytes = self.config.budget_bytes;
        let unpacked = {
            let tree = tree.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir(&tree)
                    .map_err(|e| (None, unpack::UnpackError::Io("creating the tree".into(), e)))?;
                let mut totals = unpack::Totals::default();
                for (index, file) in layer_files.iter().enumerate() {
                    unpack::apply_layer_file(&tree, file, &mut totals, max_bytes)
                        .map_err(|e| (Some(index), e))?;
                    // The compressed layer is no longer needed.
                    let _ = std::fs::remove_file(file);
                }
                let (bytes, inodes) = unpack::measure(&tree).map_err(|e| {
                    (
                        None,
                        unpack::UnpackError::Io("measuring the tree".into(), e),
                    )
                })?;
                Ok((totals, bytes, inodes))
            })
            .await
            .map_err(|e| RunError::Internal(format!("{}: the unpack task failed: {e}", what())))?
        };
        let (totals, content_bytes, inodes) = unpacked.map_err(|(index, error)| {
            let layer = index
                .map(|i| format!("layer {}: ", layer_digests[i]))
                .unwrap_or_default();
            match error {
                unpack::UnpackError::Refused(why) => {
                    RunError::Unsupported(format!("{}: {layer}refused: {why}", what()))
                }
                unpack::UnpackError::TooBig(max) => RunError::Unsupported(format!(
                    "{}: its files exceed this executor's VM disk budget of {max} bytes",
                    what()
                )),
                unpack::UnpackError::Io(context, e) => {
                    local(&format!("{layer}unpacking: {context}"), e)
                }
            }
        })?;
        if totals.skipped > 0 || totals.skipped_xattrs > 0 {
            tracing::debug!(
                image = %image,
                device_nodes = totals.skipped,
                xattrs = totals.skipped_xattrs,
                "left device nodes, FIFOs and extended attributes out of a VM disk"
            );
        }
        let unpacked_at = started.elapsed();

        // The file system, then the directory renamed into place.
        let staged = work.path().join("disk");
        tokio::fs::create_dir(&staged)
            .await
            .map_err(|e| local("making the disk directory", e))?;
        let rootfs = staged.join(ROOTFS_FILE);
        let (mut size, inode_count) = ext4::plan(content_bytes, inodes, self.config.free_bytes);
        if let Err(first) = ext4::make(&tree, &rootfs, size, inode_count).await {
            // The plan's slack can fall short for odd trees (huge
            // directories, many hard links): once more with half again.
            tracing::warn!(image = %image, "mke2fs failed, retrying larger: {first}");
            let _ = tokio::fs::remove_file(&rootfs).await;
            size += size / 2;
            ext4::make(&tree, &rootfs, size, inode_count)
                .await
                .map_err(|why| RunError::Internal(format!("{}: making its disk: {why}", what())))?;
        }
        set_read_only(&rootfs)
            .await
            .map_err(|e| local("making the disk read-only", e))?;
        let json = serde_json::to_vec_pretty(&config).expect("plain data serializes");
        tokio::fs::write(staged.join(CONFIG_FILE), &json)
            .await
            .map_err(|e| local("writing its config", e))?;
        let allocated = tokio::fs::metadata(&rootfs)
            .await
            .map_err(|e| local("measuring the disk", e))?
            .blocks()
            * 512
            + json.len() as u64;
        let target = self.disks_dir.join(name);
        // Left over from an earlier process whose entry did not load.
        let _ = tokio::fs::remove_dir_all(&target).await;
        tokio::fs::rename(&staged, &target)
            .await
            .map_err(|e| local("moving the disk into the cache", e))?;
        self.builds.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            image = %image,
            digest = %resolved.digest,
            content_bytes,
            disk_bytes = size,
            allocated_bytes = allocated,
            pull_ms = pulled.as_millis() as u64,
            unpack_ms = (unpacked_at - pulled).as_millis() as u64,
            mkfs_ms = (started.elapsed() - unpacked_at).as_millis() as u64,
            "built a VM disk"
        );
        // The unpacked tree can be large: deleted off the async threads.
        let _ = tokio::task::spawn_blocking(move || drop(work)).await;
        Ok((allocated, config))
    }
}

#[async_trait]
impl ImageStore for ImageDisks {
    /// Whether the disk of `pinned`'s digest is cached.
    async fn has_image(&self, pinned: &str) -> Result<bool, RunError> {
        Ok(pinned
            .rsplit_once('@')
            .is_some_and(|(_, digest)| self.contains(digest)))
    }

    /// Builds the disk (see [`ImageDisks::disk_for`]) without keeping a lease.
    async fn pull_image(
        &self,
        image: &ResolvedImage,
        credentials: Option<&RegistryCredentials>,
        insecure: bool,
    ) -> Result<(), RunError> {
        self.disk_for(image, credentials, insecure).await.map(drop)
    }
}

enum LayerPull {
    Registry(oci_client::errors::OciDistributionError),
    Local(io::Error),
}

/// Downloads one layer into `path`; oci-client checks its digest.
async fn pull_layer(
    client: &oci_client::Client,
    reference: &oci_client::Reference,
    layer: &OciDescriptor,
    path: &Path,
) -> Result<(), LayerPull> {
    let file = tokio::fs::File::create(path)
        .await
        .map_err(LayerPull::Local)?;
    let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
    client
        .pull_blob(reference, layer, &mut writer)
        .await
        .map_err(|e| match e {
            oci_client::errors::OciDistributionError::IoError(e) => LayerPull::Local(e),
            other => LayerPull::Registry(other),
        })?;
    writer.shutdown().await.map_err(LayerPull::Local)
}

/// Whether a layer of `media_type` is a (possibly compressed) tar; the
/// compression itself is told from the bytes.
fn is_tar_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.v1.tar")
        || media_type.starts_with("application/vnd.docker.image.rootfs.diff.tar")
}

/// `sha256:<hex>` → `sha256-<hex>`; None for anything that is not a plain
/// `algorithm:hex` digest (so it can never name another path).
fn dir_name(digest: &str) -> Option<String> {
    let (algorithm, hex) = digest.split_once(':')?;
    let algorithm_ok = !algorithm.is_empty()
        && algorithm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let hex_ok = hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    (algorithm_ok && hex_ok).then(|| format!("{algorithm}-{hex}"))
}

/// Reads a cached disk's directory back: its digest, entry and mtime.
fn load_entry(dir: &Path) -> Option<(String, Entry, std::time::SystemTime)> {
    let name = dir.file_name()?.to_str()?;
    let (algorithm, hex) = name.split_once('-')?;
    let digest = format!("{algorithm}:{hex}");
    if dir_name(&digest).as_deref() != Some(name) {
        return None;
    }
    let json = std::fs::read(dir.join(CONFIG_FILE)).ok()?;
    let config: ImageRuntimeConfig = serde_json::from_slice(&json).ok()?;
    let rootfs = std::fs::symlink_metadata(dir.join(ROOTFS_FILE)).ok()?;
    if !rootfs.is_file() {
        return None;
    }
    let entry = Entry {
        bytes: rootfs.blocks() * 512 + json.len() as u64,
        last_used: 0,
        leases: 0,
        config,
    };
    Some((digest, entry, rootfs.modified().ok()?))
}

async fn set_read_only(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).await
}

async fn remove_dirs(dirs: Vec<PathBuf>) {
    let _ = tokio::task::spawn_blocking(move || {
        for dir in dirs {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), "removing an evicted VM disk: {e}");
            }
        }
    })
    .await;
}

/// A local I/O failure while building: a full disk makes the executor
/// unavailable (another may have room), anything else is internal.
fn local_error(context: &str, error: io::Error) -> RunError {
    if matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) {
        RunError::ExecutorUnavailable(format!("building the VM disk of {context}: {error}"))
    } else {
        RunError::Internal(format!("building the VM disk of {context}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_name_directories_and_nothing_else() {
        let hex = "a".repeat(64);
        assert_eq!(
            dir_name(&format!("sha256:{hex}")),
            Some(format!("sha256-{hex}"))
        );
        assert_eq!(dir_name("sha256:../../etc"), None);
        assert_eq!(dir_name(&format!("SHA/256:{hex}")), None);
        assert_eq!(dir_name("sha256:abc"), None);
    }

    #[test]
    fn the_runtime_config_comes_from_the_image_config_and_cmd_is_ignored() {
        let json = r#"{"architecture":"amd64","os":"linux","config":{
            "Entrypoint":["/bin/tini","--"],"Cmd":["sh"],"Env":["PATH=/usr/bin","A=b"],
            "WorkingDir":"/src","User":"1000:1000"}}"#;
        let config = ImageRuntimeConfig::from_image_config(json).unwrap();
        assert_eq!(config.entrypoint, ["/bin/tini", "--"]);
        assert_eq!(config.env, ["PATH=/usr/bin", "A=b"]);
        assert_eq!(config.working_dir.as_deref(), Some("/src"));
        assert_eq!(config.user.as_deref(), Some("1000:1000"));
        let bare = ImageRuntimeConfig::from_image_config(
            r#"{"config":{"Entrypoint":null,"WorkingDir":""}}"#,
        )
        .unwrap();
        assert_eq!(bare, ImageRuntimeConfig::default());
        assert!(ImageRuntimeConfig::from_image_config(r#"{"config":{"Env":"x"}}"#).is_err());
    }
}
