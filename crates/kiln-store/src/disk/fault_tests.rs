//! The disk store under real faults: a file system that fills up (a small
//! tmpfs) and one whose syncs fail (ext4 on a loop device backed by a file
//! on a tmpfs too small for it, so writeback fails the way an overcommitted
//! thin volume does). Mounting needs root: without it each test says
//! `skipped: <reason>` and passes, except under CI, where it fails.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::DigestFunction;

fn config(path: &Path) -> DiskStoreConfig {
    let mut config = DiskStoreConfig::new(path, 1 << 30);
    // Tests decide when commits happen.
    config.sync_interval = Duration::from_secs(3600);
    config
}

fn blob(seed: u64, len: usize) -> (Key, Bytes) {
    let data: Vec<u8> = (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .chain(seed.to_le_bytes())
        .collect();
    (
        DigestFunction::Sha256.digest_of(&data).key(),
        Bytes::from(data),
    )
}

async fn read(store: &DiskStore, key: &Key) -> Option<Bytes> {
    let blob = store.get(key).await.unwrap()?;
    Some(blob.into_bytes().await.unwrap())
}

/// Whether this process may mount file systems. If not, the test is
/// skipped loudly, or fails under CI (which runs as root).
fn can_mount(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let reason = format!("{test} mounts a file system: run as root");
    if std::env::var_os("CI").is_some() {
        panic!("{reason} (CI is set, and CI runs as root)");
    }
    let banner = "*".repeat(62);
    // Straight to stderr: the harness captures `eprintln!`.
    let _ = std::io::stderr()
        .write_all(format!("\n{banner}\nskipped: {reason}\n{banner}\n").as_bytes());
    false
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A file system mounted on a fresh directory; unmounted (and its loop
/// device detached) when dropped, also when the test fails.
struct Mount {
    point: PathBuf,
    loop_device: Option<String>,
    /// The tmpfs under a loop device's backing file.
    backing: Option<Box<Mount>>,
    _dir: tempfile::TempDir,
}

impl Mount {
    fn tmpfs(size: &str) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("kiln-store-test")
            .arg(dir.path()));
        Mount {
            point: dir.path().to_path_buf(),
            loop_device: None,
            backing: None,
            _dir: dir,
        }
    }

    /// ext4 of `size` on a sparse file in a tmpfs of only `backing_size`:
    /// writes succeed into the page cache, writeback past the backing
    /// size fails, and so do the syncs that wait for it.
    fn overcommitted_ext4(size: &str, backing_size: &str) -> Mount {
        let backing = Mount::tmpfs(backing_size);
        let image = backing.point.join("disk.img");
        run(Command::new("truncate").args(["-s", size]).arg(&image));
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(&image));
        let device = run(Command::new("losetup").args(["-f", "--show"]).arg(&image));
        let dir = tempfile::tempdir().unwrap();
        let mount = Mount {
            point: dir.path().to_path_buf(),
            loop_device: Some(device.clone()),
            backing: Some(Box::new(backing)),
            _dir: dir,
        };
        run(Command::new("mount")
            .args(["-o", "errors=continue"])
            .arg(&device)
            .arg(&mount.point));
        mount
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.point).status();
        if let Some(device) = &self.loop_device {
            let _ = Command::new("losetup").arg("-d").arg(device).status();
        }
        drop(self.backing.take());
    }
}

/// Fills the file system holding `dir` to the last byte with a file of
/// its own (`filler`), which a test removes to free the space again.
fn fill(filler: &Path) {
    let mut file = fs::File::create(filler).unwrap();
    for chunk in [1 << 20, 4096, 1] {
        let buf = vec![0xaau8; chunk];
        while file.write(&buf).is_ok_and(|n| n > 0) {}
    }
    let _ = file.sync_all();
}

#[tokio::test]
async fn a_disk_full_in_the_middle_of_a_journal_record_loses_no_acknowledged_blob() {
    if !can_mount("a_disk_full_in_the_middle_of_a_journal_record_loses_no_acknowledged_blob") {
        return;
    }
    let fs = Mount::tmpfs("2m");
    let root = fs.point.join("cas");
    let mut acknowledged = Vec::new();
    let mut seed = 0;
    let (store, _) = DiskStore::open(config(&root)).unwrap();
    // Tiny blobs: the segment's last page has room for many more of them
    // than the journal's, so the journal is what runs out of space, in
    // the middle of a record.
    for _ in 0..10 {
        let (key, data) = blob(seed, 8);
        seed += 1;
        store.put(key, data.clone()).await.unwrap();
        acknowledged.push((key, data));
    }
    fill(&fs.point.join("filler"));
    let mut refused = 0;
    for _ in 0..200 {
        let (key, data) = blob(seed, 8);
        seed += 1;
        match store.put(key, data.clone()).await {
            Ok(()) => acknowledged.push((key, data)),
            Err(StoreError::NoSpace { .. }) => {
                refused += 1;
                assert_eq!(read(&store, &key).await, None, "a refused blob is absent");
            }
            Err(e) => panic!("expected NoSpace, got {e}"),
        }
    }
    assert!(refused > 0, "the file system never filled up");
    assert_eq!(
        fs::metadata(root.join("journal")).unwrap().len() % RECORD_LEN as u64,
        0,
        "no partial journal record is left behind"
    );

    // Space comes back; blobs written after the fault must survive too.
    fs::remove_file(fs.point.join("filler")).unwrap();
    for _ in 0..100 {
        let (key, data) = blob(seed, 8);
        seed += 1;
        store.put(key, data.clone()).await.unwrap();
        acknowledged.push((key, data));
    }
    drop(store);

    let (store, report) = DiskStore::open(config(&root)).unwrap();
    for (key, data) in &acknowledged {
        assert_eq!(
            read(&store, key).await.as_ref(),
            Some(data),
            "acknowledged blob {key:?} lost after the restart ({report:?})"
        );
    }
}

#[tokio::test]
async fn a_store_reopens_on_a_full_disk_and_keeps_what_it_acknowledged() {
    if !can_mount("a_store_reopens_on_a_full_disk_and_keeps_what_it_acknowledged") {
        return;
    }
    let fs = Mount::tmpfs("4m");
    let root = fs.point.join("cas");
    let mut acknowledged = Vec::new();
    let (store, _) = DiskStore::open(config(&root)).unwrap();
    // Packed blobs, a blob file, and records past the last checkpoint.
    for seed in 0..50 {
        let (key, data) = blob(seed, 3000);
        store.put(key, data.clone()).await.unwrap();
        acknowledged.push((key, data));
    }
    store.flush().unwrap();
    let (key, data) = blob(1000, 600 << 10);
    let mut writer = store.writer(key, data.len() as u64).await.unwrap();
    writer.write(&data).unwrap();
    writer.commit().unwrap();
    acknowledged.push((key, data));
    for seed in 50..60 {
        let (key, data) = blob(seed, 3000);
        store.put(key, data.clone()).await.unwrap();
        acknowledged.push((key, data));
    }
    fill(&fs.point.join("filler"));
    drop(store);

    // No room for a new journal or checkpoint: the store opens anyway.
    let (store, report) = DiskStore::open(config(&root)).unwrap();
    for (key, data) in &acknowledged {
        assert_eq!(
            read(&store, key).await.as_ref(),
            Some(data),
            "acknowledged blob {key:?} lost ({report:?})"
        );
    }
    let (key, data) = blob(2000, 100 << 10);
    assert!(matches!(
        store.put(key, data).await,
        Err(StoreError::NoSpace { .. })
    ));
    drop(store);
    fs::remove_file(fs.point.join("filler")).unwrap();
    let (store, _) = DiskStore::open(config(&root)).unwrap();
    for (key, data) in &acknowledged {
        assert_eq!(read(&store, key).await.as_ref(), Some(data));
    }
    let (key, data) = blob(2001, 100 << 10);
    store.put(key, data.clone()).await.unwrap();
    assert_eq!(read(&store, &key).await, Some(data));
}
#[tokio::test]
async fn a_failed_sync_stops_the_store_and_is_never_checkpointed() {
    if !can_mount("a_failed_sync_stops_the_store_and_is_never_checkpointed") {
        return;
    }
    let fs = Mount::overcommitted_ext4("256m", "24m");
    let root = fs.point.join("cas");
    let (store, _) = DiskStore::open(config(&root)).unwrap();
    let (early_key, early) = blob(1, 5000);
    store.put(early_key, early.clone()).await.unwrap();
    store.flush().unwrap();
    let checkpoint = || journal::decode_checkpoint(&fs::read(root.join("checkpoint")).unwrap());
    let durable = checkpoint().unwrap();
    assert_eq!(durable, RECORD_LEN as u64);

    // More than the backing file system can hold: the writes land in the
    // page cache and are acknowledged; their writeback fails. (Packed
    // blobs: blob files are written with direct I/O, which fails at once.)
    for seed in 0..400 {
        let (key, data) = blob(100 + seed, 100 << 10);
        store.put(key, data).await.unwrap();
    }
    let error = store.flush().unwrap_err();
    assert!(error.to_string().contains("sync"), "{error}");

    // Stopped: nothing is acknowledged, checkpointed or served any more.
    let stopped = |e: StoreError| {
        assert!(matches!(e, StoreError::Stopped(_)), "{e}");
        assert!(e.to_string().contains("restart"), "{e}");
    };
    stopped(store.flush().unwrap_err());
    let (key, data) = blob(5000, 100);
    stopped(store.put(key, data).await.unwrap_err());
    stopped(store.writer(key, 1 << 20).await.err().unwrap());
    stopped(store.get(&early_key).await.unwrap_err());
    stopped(store.contains(&[early_key]).await.unwrap_err());
    drop(store);
    assert_eq!(checkpoint(), Some(durable), "the checkpoint never moved");
}

/// Twenty blobs of 100,000 bytes from seed `first` on: a 2 MB batch.
fn batch(first: u64) -> Vec<(Key, Bytes)> {
    (first..first + 20)
        .map(|seed| blob(seed, 100_000))
        .collect()
}

/// A store at `root` that writes large batches behind their
/// acknowledgement; fails where the file system refuses direct I/O.
fn open_writing_behind(root: &Path) -> DiskStore {
    let (store, _) = DiskStore::open(config(root)).unwrap();
    assert!(
        store.keeps_batch_in_memory(2_000_000),
        "the file system refuses O_DIRECT here: the test would not write behind"
    );
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_while_batches_are_written_behind_loses_no_acknowledged_blob() {
    if !can_mount("a_disk_full_while_batches_are_written_behind_loses_no_acknowledged_blob") {
        return;
    }
    // ext4, for direct I/O, with room for its whole image in the tmpfs
    // under it: the file system fills up, writeback never fails.
    let fs = Mount::overcommitted_ext4("96m", "192m");
    let root = fs.point.join("cas");
    let store = open_writing_behind(&root);
    let mut acknowledged = batch(0);
    for outcome in store.put_many(acknowledged.clone()).await {
        outcome.unwrap();
    }
    // Full, but for room for the journal to grow: what fails next is the
    // batches' data. The segment the first batch reserved takes them until
    // it is full; the next segment cannot reserve.
    let filler = fs.point.join("filler");
    fill(&filler);
    let file = fs::OpenOptions::new().write(true).open(&filler).unwrap();
    file.set_len(file.metadata().unwrap().len() - (256 << 10))
        .unwrap();
    file.sync_all().unwrap();
    drop(file);
    run(&mut Command::new("sync"));
    let (mut refused, mut taken_while_full) = (0, 0);
    for round in 1..40 {
        let items = batch(round * 20);
        let outcomes = store.put_many(items.clone()).await;
        match &outcomes[0] {
            Ok(()) => {
                taken_while_full += 1;
                acknowledged.extend(items)
            }
            Err(StoreError::NoSpace { .. }) => {
                refused += 1;
                for (key, _) in &items {
                    assert_eq!(read(&store, key).await, None, "a refused blob is absent");
                }
            }
            Err(e) => panic!("expected NoSpace, got {e}"),
        }
    }
    assert!(refused > 0, "the file system never filled up");
    assert!(
        taken_while_full > 0,
        "no batch went to the reserved segment"
    );
    fs::remove_file(&filler).unwrap();
    let after = batch(1000);
    for outcome in store.put_many(after.clone()).await {
        outcome.unwrap();
    }
    acknowledged.extend(after);
    drop(store);

    let (store, report) = DiskStore::open(config(&root)).unwrap();
    assert_eq!(report.dropped_invalid, 0, "{report:?}");
    for (key, data) in &acknowledged {
        assert_eq!(
            read(&store, key).await.as_ref(),
            Some(data),
            "acknowledged blob {key:?} lost after the restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_behind_stops_the_store_and_is_never_checkpointed() {
    if !can_mount("a_failed_write_behind_stops_the_store_and_is_never_checkpointed") {
        return;
    }
    let fs = Mount::overcommitted_ext4("256m", "24m");
    let root = fs.point.join("cas");
    let store = open_writing_behind(&root);
    let (early_key, early) = blob(1, 5000);
    store.put(early_key, early.clone()).await.unwrap();
    store.flush().unwrap();
    let checkpoint = || journal::decode_checkpoint(&fs::read(root.join("checkpoint")).unwrap());
    let durable = checkpoint().unwrap();

    // More than the backing file system can hold, in batches written
    // behind their acknowledgement: acknowledged, then their writes fail.
    for round in 0..20 {
        let items = batch(100 + round * 20);
        for outcome in store.put_many(items).await {
            outcome.unwrap();
        }
    }
    let error = store.flush().unwrap_err();
    assert!(
        error.to_string().contains("writing a packed batch"),
        "{error}"
    );

    // Stopped: nothing is acknowledged, checkpointed or served any more,
    // not even the blobs the recent tier still holds.
    let stopped = |e: StoreError| {
        assert!(matches!(e, StoreError::Stopped(_)), "{e}");
        assert!(e.to_string().contains("restart"), "{e}");
    };
    stopped(store.flush().unwrap_err());
    let (key, _) = blob(100, 100_000);
    stopped(store.get(&key).await.unwrap_err());
    stopped(store.get(&early_key).await.unwrap_err());
    drop(store);
    assert_eq!(checkpoint(), Some(durable), "the checkpoint never moved");
}
