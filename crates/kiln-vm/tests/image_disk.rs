//! Container images into VM disks, against the real registry of the test
//! services (127.0.0.1:5000, `scripts/services.sh start`): images are made
//! here, layer by layer, pushed, then turned into disks whose contents are
//! read back with `debugfs` (no mount needed).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln_container::image::{parse_image, registry_client};
use kiln_container::{ImageConfig, Images, ResolvedImage};
use kiln_platform::{Platform, PropertySources, RegistryCredentials, Secret};
use kiln_vm::image_disk::{ImageDisks, ImageDisksConfig};
use kiln_worker::{CancellationToken, RunError};
use oci_client::client::{Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;

const REGISTRY: &str = "127.0.0.1:5000";
const GIB: u64 = 1 << 30;
const CAP_NET_RAW_EP: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn registry_must_answer() {
    let answered = std::net::TcpStream::connect_timeout(
        &REGISTRY.parse().unwrap(),
        std::time::Duration::from_secs(2),
    );
    assert!(
        answered.is_ok(),
        "the test registry {REGISTRY} does not answer: run scripts/services.sh start"
    );
    for tool in ["mke2fs", "debugfs"] {
        let found = Command::new(tool).arg("-V").output();
        assert!(found.is_ok(), "{tool} is missing: install e2fsprogs");
    }
}

// ---- layers ----

struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_size(size);
        header.set_mtime(1_700_000_000);
        header
    }

    fn dir(mut self, path: &str, mode: u32) -> Layer {
        let mut header = Layer::header(tar::EntryType::Directory, mode, 0, 0);
        self.0
            .append_data(&mut header, path, std::io::empty())
            .unwrap();
        self
    }

    fn file(mut self, path: &str, mode: u32, uid: u64, content: &[u8]) -> Layer {
        let mut header = Layer::header(tar::EntryType::Regular, mode, uid, content.len() as u64);
        self.0.append_data(&mut header, path, content).unwrap();
        self
    }

    /// A file with extended attributes (pax `SCHILY.xattr.*`).
    fn file_with_xattrs(mut self, path: &str, content: &[u8], xattrs: &[(&str, &[u8])]) -> Layer {
        let keys: Vec<String> = xattrs
            .iter()
            .map(|(name, _)| format!("SCHILY.xattr.{name}"))
            .collect();
        self.0
            .append_pax_extensions(
                keys.iter()
                    .map(String::as_str)
                    .zip(xattrs.iter().map(|x| x.1)),
            )
            .unwrap();
        self.file(path, 0o755, 0, content)
    }

    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Layer {
        let mut header = Layer::header(kind, 0o777, 0, 0);
        self.0.append_link(&mut header, path, target).unwrap();
        self
    }

    fn device(mut self, path: &str) -> Layer {
        let mut header = Layer::header(tar::EntryType::Char, 0o666, 0, 0);
        header.set_device_major(1).unwrap();
        header.set_device_minor(3).unwrap();
        self.0
            .append_data(&mut header, path, std::io::empty())
            .unwrap();
        self
    }

    /// An entry whose name the tar writer would refuse (`../x`).
    fn raw_file(mut self, name: &[u8], content: &[u8]) -> Layer {
        let mut header = Layer::header(tar::EntryType::Regular, 0o644, 0, content.len() as u64);
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_cksum();
        self.0.append(&header, content).unwrap();
        self
    }

    fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }

    fn gzip(self) -> ImageLayer {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&self.tar()).unwrap();
        ImageLayer::oci_v1_gzip(encoder.finish().unwrap(), None)
    }

    fn zstd(self) -> ImageLayer {
        let compressed = zstd::encode_all(&self.tar()[..], 3).unwrap();
        ImageLayer::new(
            compressed,
            "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            None,
        )
    }

    fn plain(self) -> ImageLayer {
        ImageLayer::oci_v1(self.tar(), None)
    }
}

/// Pushes an image of `layers` as `127.0.0.1:5000/kiln-test/vm-disk-<name>`
/// and returns it resolved.
async fn push(name: &str, layers: Vec<ImageLayer>, config: serde_json::Value) -> ResolvedImage {
    let repository = format!("kiln-test/vm-disk-{name}");
    let reference = Reference::with_tag(REGISTRY.into(), repository.clone(), "latest".into());
    let document = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    let client = registry_client(REGISTRY, true);
    client
        .push(
            &reference,
            &layers,
            Config::oci_v1(serde_json::to_vec(&document).unwrap(), None),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("pushing {repository}: {e}"));
    let digest = client
        .fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
        .await
        .unwrap();
    ResolvedImage {
        image: parse_image(&format!("{REGISTRY}/{repository}:latest")).unwrap(),
        digest,
    }
}

/// A small image of its own content, for the cache tests.
async fn small_image(name: &str) -> ResolvedImage {
    let layer = Layer::new().file(&format!("{name}.txt"), 0o644, 0, name.as_bytes());
    push(name, vec![layer.gzip()], serde_json::json!({})).await
}

fn cache(dir: &Path, budget: u64) -> ImageDisks {
    ImageDisks::open(ImageDisksConfig::new(dir, budget)).unwrap()
}

// ---- reading disks back ----

fn debugfs(disk: &Path, request: &str) -> String {
    let output = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(disk)
        .output()
        .expect("debugfs runs");
    assert!(output.status.success(), "debugfs {request}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    inode: u64,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// `debugfs ls -l` of `dir`, without `.` and `..`.
fn list(disk: &Path, dir: &str) -> BTreeMap<String, Listed> {
    let mut listed = BTreeMap::new();
    for line in debugfs(disk, &format!("ls -l {dir}")).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 {
            continue;
        }
        let name = fields[8..].join(" ");
        if name == "." || name == ".." {
            continue;
        }
        listed.insert(
            name,
            Listed {
                inode: fields[0].parse().unwrap(),
                mode: u32::from_str_radix(fields[1], 8).unwrap(),
                uid: fields[3].parse().unwrap(),
                gid: fields[4].parse().unwrap(),
            },
        );
    }
    listed
}

fn names(disk: &Path, dir: &str) -> BTreeSet<String> {
    list(disk, dir).into_keys().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Every path under `dir` whose file name is `name`.
fn find_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(children) = std::fs::read_dir(&dir) else {
            continue;
        };
        for child in children.flatten() {
            let path = child.path();
            if child.file_name() == name {
                found.push(path.clone());
            }
            if child.file_type().unwrap().is_dir() {
                pending.push(path);
            }
        }
    }
    found
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layered_image_becomes_a_disk_holding_exactly_the_merged_tree() {
    registry_must_answer();
    let lower = Layer::new()
        .dir("etc", 0o755)
        .file("etc/gone", 0o644, 0, b"lower\n")
        .dir("opaque", 0o755)
        .file("opaque/old.txt", 0o644, 0, b"old\n")
        .dir("opaque/sub", 0o755)
        .file("opaque/sub/deep.txt", 0o644, 0, b"deep\n")
        .dir("stale", 0o755)
        .file("stale/x", 0o644, 0, b"x\n")
        .dir("bin", 0o755)
        .file("bin/tool", 0o755, 1000, b"#!/bin/sh\necho tool\n")
        .file("keep.txt", 0o644, 0, b"kept\n");
    let upper = Layer::new()
        .file("etc/.wh.gone", 0o644, 0, b"")
        .file(".wh.stale", 0o644, 0, b"")
        .dir("opaque", 0o750)
        .file("opaque/.wh..wh..opq", 0o644, 0, b"")
        .file("opaque/new.txt", 0o644, 0, b"new\n")
        .link(tar::EntryType::Symlink, "etc/link", "../bin/tool")
        .link(tar::EntryType::Link, "bin/tool-again", "bin/tool")
        .file("bin/suid", 0o4755, 0, b"suid\n")
        .file_with_xattrs(
            "bin/ping",
            b"ping\n",
            &[
                // cap_net_raw+ep, as vfs_cap_data revision 2.
                ("security.capability", &CAP_NET_RAW_EP),
                ("user.kiln", b"yes"),
                ("trusted.overlay.opaque", b"y"),
            ],
        )
        .file("keep.txt", 0o600, 0, b"kept, upper\n")
        .device("dev/null");
    let top = Layer::new().file("./late.txt", 0o644, 0, b"late\n");
    let config = serde_json::json!({
        "Entrypoint": ["/bin/tool", "--flag"],
        "Cmd": ["ignored"],
        "Env": ["PATH=/bin", "GREETING=hello"],
        "WorkingDir": "/opaque",
        "User": "1000:1000",
    });
    let resolved = push(
        "layered",
        vec![lower.gzip(), upper.zstd(), top.plain()],
        config,
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let disks = cache(dir.path(), 4 * GIB);
    let disk = disks.disk_for(&resolved, None, true).await.unwrap();
    let rootfs = &disk.rootfs;
    assert_eq!(disks.builds(), 1);
    fsck_clean(rootfs);

    // lost+found is mke2fs's; the device node is left out, its parent kept.
    assert_eq!(
        names(rootfs, "/"),
        set(&[
            "bin",
            "dev",
            "etc",
            "keep.txt",
            "late.txt",
            "lost+found",
            "opaque"
        ])
    );
    assert_eq!(names(rootfs, "/dev"), set(&[]));
    assert_eq!(names(rootfs, "/etc"), set(&["link"]), "etc/gone whited out");
    assert_eq!(
        names(rootfs, "/opaque"),
        set(&["new.txt"]),
        "opaque dropped lower entries"
    );
    assert_eq!(list(rootfs, "/")["opaque"].mode, 0o40750);
    let bin = list(rootfs, "/bin");
    assert_eq!(
        names(rootfs, "/bin"),
        set(&["ping", "suid", "tool", "tool-again"])
    );
    let attributes = debugfs(rootfs, "ea_list /bin/ping");
    assert!(
        attributes.contains("user.kiln (3) = \"yes\""),
        "{attributes}"
    );
    assert!(
        attributes.contains("security.capability (20)"),
        "{attributes}"
    );
    assert!(!attributes.contains("trusted"), "{attributes}");
    assert_eq!(
        (bin["tool"].mode, bin["tool"].uid, bin["tool"].gid),
        (0o100755, 1000, 1000)
    );
    assert_eq!(bin["tool"].inode, bin["tool-again"].inode, "a hard link");
    assert_eq!(bin["suid"].mode, 0o104755);
    assert_eq!(list(rootfs, "/")["keep.txt"].mode, 0o100600);
    assert_eq!(debugfs(rootfs, "cat /keep.txt"), "kept, upper\n");
    assert_eq!(debugfs(rootfs, "cat /opaque/new.txt"), "new\n");
    assert_eq!(debugfs(rootfs, "cat /late.txt"), "late\n");
    assert_eq!(debugfs(rootfs, "cat /etc/link"), "", "cat does not follow");
    let link = debugfs(rootfs, "stat /etc/link");
    assert!(link.contains("Type: symlink"), "{link}");
    assert!(link.contains("\"../bin/tool\""), "{link}");

    assert_eq!(disk.config.entrypoint, ["/bin/tool", "--flag"]);
    assert_eq!(disk.config.env, ["PATH=/bin", "GREETING=hello"]);
    assert_eq!(disk.config.working_dir.as_deref(), Some("/opaque"));
    assert_eq!(disk.config.user.as_deref(), Some("1000:1000"));

    // Cached: served with the registry unreachable, nothing rebuilt.
    let mut elsewhere = resolved.clone();
    elsewhere.image.registry = "127.0.0.1:9".into();
    let again = disks.disk_for(&elsewhere, None, true).await.unwrap();
    assert_eq!(again.rootfs, disk.rootfs);
    assert_eq!(again.config, disk.config);
    assert_eq!(disks.builds(), 1);

    // And after a restart of the executor, from the same directory.
    drop((disk, again, disks));
    let reopened = cache(dir.path(), 4 * GIB);
    let kept = reopened.disk_for(&elsewhere, None, true).await.unwrap();
    assert_eq!(reopened.builds(), 0);
    assert_eq!(debugfs(&kept.rootfs, "cat /late.txt"), "late\n");
    assert_eq!(kept.config.user.as_deref(), Some("1000:1000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_resolves_with_the_action_properties_and_the_cache_is_its_store() {
    registry_must_answer();
    let resolved = small_image("store").await;
    let dir = tempfile::tempdir().unwrap();
    let disks = cache(dir.path(), 4 * GIB);
    let images = Images::new("firecracker", ImageConfig::default()).unwrap();
    let properties = [(
        "container-image".to_string(),
        format!("docker://{REGISTRY}/kiln-test/vm-disk-store:latest"),
    )];
    let platform = Platform::parse(&PropertySources {
        action: &properties,
        ..Default::default()
    })
    .unwrap();
    let cancel = CancellationToken::new();
    let ensured = images
        .ensure(&platform, &disks, true, &cancel)
        .await
        .unwrap();
    assert_eq!(ensured.digest, resolved.digest);
    assert!(disks.contains(&resolved.digest));
    assert_eq!(disks.builds(), 1);
    images
        .ensure(&platform, &disks, true, &cancel)
        .await
        .unwrap();
    let disk = disks.disk_for(&ensured, None, true).await.unwrap();
    assert_eq!(
        disks.builds(),
        1,
        "the second ensure and the lease found the disk"
    );
    assert_eq!(debugfs(&disk.rootfs, "cat /store.txt"), "store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_image_build_it_once() {
    registry_must_answer();
    let resolved = small_image("concurrent").await;
    let dir = tempfile::tempdir().unwrap();
    let disks = cache(dir.path(), 4 * GIB);
    let requests = (0..6).map(|_| disks.disk_for(&resolved, None, true));
    let leased = futures::future::join_all(requests).await;
    let leased: Vec<_> = leased.into_iter().map(Result::unwrap).collect();
    assert_eq!(disks.builds(), 1);
    assert!(leased.iter().all(|d| d.rootfs == leased[0].rootfs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_a_small_budget_spares_the_disks_in_use() {
    registry_must_answer();
    let a = small_image("evict-a").await;
    let b = small_image("evict-b").await;
    let c = small_image("evict-c").await;
    let dir = tempfile::tempdir().unwrap();
    // Room for the images' files, smaller than any one disk: every build
    // evicts all it may.
    let disks = cache(dir.path(), 64 << 10);
    let in_use = disks.disk_for(&a, None, true).await.unwrap();
    drop(disks.disk_for(&b, None, true).await.unwrap());
    assert!(disks.contains(&a.digest) && disks.contains(&b.digest));
    drop(disks.disk_for(&c, None, true).await.unwrap());
    assert!(disks.contains(&a.digest), "a is in use");
    assert!(in_use.rootfs.exists());
    assert!(
        !disks.contains(&b.digest),
        "b was the least recently used disk not in use"
    );
    assert!(disks.contains(&c.digest), "c was just built");
    assert_eq!(debugfs(&in_use.rootfs, "cat /evict-a.txt"), "evict-a");

    let a_rootfs = in_use.rootfs.clone();
    drop(in_use);
    let b_again = disks.disk_for(&b, None, true).await.unwrap();
    assert!(!disks.contains(&a.digest) && !disks.contains(&c.digest));
    assert!(!a_rootfs.exists(), "an evicted disk is deleted");
    assert_eq!(disks.builds(), 4, "b was built again");
    assert_eq!(
        disks.total_bytes(),
        b_again
            .rootfs
            .metadata()
            .map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.blocks() * 512
            })
            .unwrap()
            + std::fs::metadata(b_again.rootfs.with_file_name("image.json"))
                .unwrap()
                .len()
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("disks")).unwrap().count(),
        1,
        "one disk left on the host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_write_nothing_outside_the_image() {
    registry_must_answer();
    let dir = tempfile::tempdir().unwrap();
    let disks = cache(dir.path(), 4 * GIB);
    let victim = tempfile::tempdir().unwrap();

    // `..` in a name: refused, naming the image and the entry.
    let climbing = Layer::new().raw_file(b"../escape.txt", b"out\n");
    let resolved = push(
        "hostile-dotdot",
        vec![climbing.gzip()],
        serde_json::json!({}),
    )
    .await;
    let error = disks.disk_for(&resolved, None, true).await.unwrap_err();
    let RunError::Unsupported(message) = &error else {
        panic!("{error:?}");
    };
    assert!(
        message.contains("kiln-test/vm-disk-hostile-dotdot"),
        "{message}"
    );
    assert!(message.contains("../escape.txt"), "{message}");
    assert!(find_named(dir.path().parent().unwrap(), "escape.txt").is_empty());

    // A whiteout of `..`: refused (it would delete the unpack root's parent).
    let whiteout = Layer::new().file("a/.wh...", 0o644, 0, b"");
    let resolved = push(
        "hostile-whiteout",
        vec![whiteout.gzip()],
        serde_json::json!({}),
    )
    .await;
    let error = disks.disk_for(&resolved, None, true).await.unwrap_err();
    assert!(
        matches!(&error, RunError::Unsupported(m) if m.contains("whites out")),
        "{error:?}"
    );

    // Through symlinks (absolute, and climbing): contained in the image.
    let victim_path = victim.path().to_str().unwrap().to_string();
    let first = Layer::new()
        .link(tar::EntryType::Symlink, "out", &victim_path)
        .link(tar::EntryType::Symlink, "up", "../../../../../../../..");
    let second = Layer::new()
        .file("out/pwned", 0o644, 0, b"absolute\n")
        .file("up/pwned-up", 0o644, 0, b"climbing\n")
        .link(tar::EntryType::Link, "hard", "up/pwned-up");
    let resolved = push(
        "hostile-symlinks",
        vec![first.gzip(), second.gzip()],
        serde_json::json!({}),
    )
    .await;
    let disk = disks.disk_for(&resolved, None, true).await.unwrap();
    assert_eq!(std::fs::read_dir(victim.path()).unwrap().count(), 0);
    assert!(find_named(Path::new("/tmp"), "pwned-up").is_empty());
    assert!(find_named(Path::new("/tmp"), "pwned").is_empty());
    assert_eq!(
        debugfs(&disk.rootfs, &format!("cat {victim_path}/pwned")),
        "absolute\n"
    );
    assert_eq!(debugfs(&disk.rootfs, "cat /pwned-up"), "climbing\n");
    assert_eq!(debugfs(&disk.rootfs, "cat /hard"), "climbing\n");

    // A hard link through the symlink to a host file: resolved in the
    // image, where it does not exist, so refused (not a copy of the host's).
    std::fs::write(victim.path().join("secret"), b"host secret\n").unwrap();
    let stealing = Layer::new().link(tar::EntryType::Link, "stolen", "out/secret");
    let symlink = Layer::new().link(tar::EntryType::Symlink, "out", &victim_path);
    let resolved = push(
        "hostile-hardlink",
        vec![symlink.gzip(), stealing.gzip()],
        serde_json::json!({}),
    )
    .await;
    let error = disks.disk_for(&resolved, None, true).await.unwrap_err();
    assert!(
        matches!(&error, RunError::Unsupported(m) if m.contains("\"stolen\"") && m.contains("does not exist")),
        "{error:?}"
    );

    // Nothing of the refused builds is left.
    assert_eq!(
        std::fs::read_dir(dir.path().join("building"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("disks")).unwrap().count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_errors_name_the_image_and_registry() {
    registry_must_answer();
    let dir = tempfile::tempdir().unwrap();
    let disks = cache(dir.path(), 4 * GIB);
    let missing = ResolvedImage {
        image: parse_image(&format!("{REGISTRY}/kiln-test/vm-disk-missing:latest")).unwrap(),
        digest: format!("sha256:{}", "0".repeat(64)),
    };
    let error = disks.disk_for(&missing, None, true).await.unwrap_err();
    let RunError::Unsupported(message) = &error else {
        panic!("an unknown image is a failed precondition: {error:?}");
    };
    assert!(message.contains("kiln-test/vm-disk-missing"), "{message}");
    assert!(message.contains(REGISTRY), "{message}");

    let unreachable = ResolvedImage {
        image: parse_image("127.0.0.1:9/kiln-test/vm-disk-nowhere:latest").unwrap(),
        digest: format!("sha256:{}", "1".repeat(64)),
    };
    let error = disks.disk_for(&unreachable, None, true).await.unwrap_err();
    let RunError::Unavailable(message) = &error else {
        panic!("an unreachable registry is unavailable: {error:?}");
    };
    assert!(message.contains("127.0.0.1:9"), "{message}");
    assert!(message.contains("kiln-test/vm-disk-nowhere"), "{message}");
    assert_eq!(disks.builds(), 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("building"))
            .unwrap()
            .count(),
        0
    );
}

/// Runs `tests/images/build.sh` (fast when the registries hold the current
/// images); `name:tag` → manifest digest.
fn test_images() -> BTreeMap<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/images/build.sh");
    let built = Command::new("bash").arg(&script).output().unwrap();
    assert!(
        built.status.success(),
        "{} failed (scripts/services.sh start first): {}",
        script.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    String::from_utf8(built.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let (name, digest) = line.split_once('@')?;
            Some((name.to_string(), digest.to_string()))
        })
        .collect()
}

fn resolved(images: &BTreeMap<String, String>, name: &str) -> ResolvedImage {
    ResolvedImage {
        image: parse_image(name).unwrap(),
        digest: images
            .get(name)
            .unwrap_or_else(|| panic!("build.sh made no {name}"))
            .clone(),
    }
}

fn fsck_clean(disk: &Path) {
    let checked = Command::new("e2fsck")
        .arg("-fn")
        .arg(disk)
        .output()
        .unwrap();
    assert!(checked.status.success(), "e2fsck: {checked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_test_images_become_disks_with_their_config() {
    registry_must_answer();
    let images = test_images();
    let dir = tempfile::tempdir().unwrap();
    let disks = cache(dir.path(), 4 * GIB);

    let base = resolved(&images, "127.0.0.1:5000/kiln-test/base:latest");
    let disk = disks.disk_for(&base, None, true).await.unwrap();
    fsck_clean(&disk.rootfs);
    let root = list(&disk.rootfs, "/");
    assert_eq!(root["tmp"].mode, 0o41777);
    assert!(debugfs(&disk.rootfs, "cat /etc/passwd").contains("builder:x:1000:1000:"));
    let sh = debugfs(&disk.rootfs, "stat /bin/sh");
    assert!(sh.contains("Type: symlink"), "{sh}");
    let busybox = debugfs(&disk.rootfs, "stat /bin/busybox");
    assert!(
        busybox.contains("Type: regular") && busybox.contains("Mode:  0755"),
        "{busybox}"
    );
    assert_eq!(disk.config.entrypoint, Vec::<String>::new());
    assert!(
        disk.config.env.iter().any(|v| v.starts_with("PATH=")),
        "{:?}",
        disk.config
    );
    assert_eq!(disk.config.user, None);

    let nonroot = resolved(&images, "127.0.0.1:5000/kiln-test/nonroot:latest");
    let disk = disks.disk_for(&nonroot, None, true).await.unwrap();
    assert_eq!(disk.config.user.as_deref(), Some("1000:1000"));
    let entrypoint = resolved(&images, "127.0.0.1:5000/kiln-test/entrypoint:latest");
    let disk = disks.disk_for(&entrypoint, None, true).await.unwrap();
    assert_eq!(disk.config.entrypoint, ["/entrypoint.sh"]);
    assert!(debugfs(&disk.rootfs, "cat /entrypoint.sh").contains("exec \"$@\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_image_is_pulled_with_the_credentials_and_refused_without() {
    registry_must_answer();
    let images = test_images();
    let private = resolved(&images, "127.0.0.1:5001/kiln-test/private:latest");
    let credentials = |password: &str| RegistryCredentials {
        username: "kiln".into(),
        password: Secret::new(password),
    };

    let dir = tempfile::tempdir().unwrap();
    let disks = cache(dir.path(), 4 * GIB);
    let wrong = credentials("Wrong-Password-1");
    let error = disks
        .disk_for(&private, Some(&wrong), true)
        .await
        .unwrap_err();
    let RunError::Unsupported(message) = &error else {
        panic!("refused credentials are a failed precondition: {error:?}");
    };
    assert!(message.contains("kiln-test/private"), "{message}");
    assert!(message.contains("\"kiln\""), "{message}");
    assert!(!message.contains("Wrong-Password-1"), "{message}");
    let error = disks.disk_for(&private, None, true).await.unwrap_err();
    assert!(
        matches!(&error, RunError::Unsupported(m) if m.contains("requires credentials")),
        "{error:?}"
    );

    let right = credentials("Kiln-Test-Secret-7f3a9c");
    let disk = disks.disk_for(&private, Some(&right), true).await.unwrap();
    assert!(debugfs(&disk.rootfs, "cat /etc/passwd").contains("builder"));
    assert_eq!(disks.builds(), 1);
}

/// Not a pass/fail test: the time to turn a ~100 MB image (half random,
/// half text, two gzip layers) into a disk, cold and cached. Run with
/// `cargo test -p kiln-vm --test image_disk -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, printed"]
async fn measure_a_100_mb_image() {
    registry_must_answer();
    // The build's own log line splits the time: pull, unpack, mkfs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("kiln_vm=info")
        .with_test_writer()
        .try_init();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let text: Vec<u8> = b"fn main() { println!(\"hello, kiln\"); }\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    let mut binaries = Layer::new().dir("usr", 0o755).dir("usr/lib", 0o755);
    for i in 0..50 {
        binaries = binaries.file(&format!("usr/lib/lib{i}.so"), 0o755, 0, &random(1 << 20));
    }
    let mut sources = Layer::new().dir("src", 0o755);
    for i in 0..2000 {
        sources = sources.file(&format!("src/file{i}.rs"), 0o644, 0, &text[..25 << 10]);
    }
    let pushed = Instant::now();
    let resolved = push(
        "measure-100mb",
        vec![binaries.gzip(), sources.gzip()],
        serde_json::json!({}),
    )
    .await;
    println!("pushed in {:?}", pushed.elapsed());
    let dir = tempfile::tempdir().unwrap();
    let disks = cache(dir.path(), 4 * GIB);
    let cold = Instant::now();
    let disk = disks.disk_for(&resolved, None, true).await.unwrap();
    let cold = cold.elapsed();
    let cached = Instant::now();
    let again = disks.disk_for(&resolved, None, true).await.unwrap();
    let cached = cached.elapsed();
    let apparent = std::fs::metadata(&disk.rootfs).unwrap().len();
    println!(
        "100 MB image (50 x 1 MiB random + 2000 x 25 KiB text): cold {cold:?}, cached {cached:?}; \
         disk {} MiB apparent, {} MiB allocated",
        apparent >> 20,
        disks.total_bytes() >> 20
    );
    drop((disk, again));
}
