use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::DigestFunction;

fn config(path: &Path, max: u64) -> DiskStoreConfig {
    let mut config = DiskStoreConfig::new(path, max);
    // Tests decide when commits happen.
    config.sync_interval = Duration::from_secs(3600);
    config
}

fn blob(seed: u64, len: usize) -> (Key, Bytes) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
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

/// Copies a store's directory while it is open: what a crash would leave.
fn crash_snapshot(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            crash_snapshot(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

async fn write_streaming(store: &DiskStore, key: Key, data: &Bytes) {
    let mut writer = store.writer(key, data.len() as u64).await.unwrap();
    for chunk in data.chunks(100_000) {
        writer.write(chunk).unwrap();
    }
    writer.commit().unwrap();
}

#[tokio::test]
async fn the_store_directory_is_private_to_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cas");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    let (store, _) = DiskStore::open(config(&root, 1 << 30)).unwrap();
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700, "{:o}", mode(&root));
    // Private all the way down, should the top directory's mode change.
    let small = blob(1, 1000);
    store.put(small.0, small.1).await.unwrap();
    let large = blob(2, 1 << 20);
    write_streaming(&store, large.0, &large.1).await;
    store.flush().unwrap();
    for dir in ["segments", "files", "tmp"] {
        assert_eq!(mode(&root.join(dir)), 0o700, "{dir}");
    }
    let large_path = file_path(&root, &large.0);
    assert_eq!(mode(large_path.parent().unwrap()), 0o700);
    assert_eq!(mode(&large_path), 0o600);
    for file in ["journal", "checkpoint", "LOCK", "segments/0000000001.pack"] {
        assert_eq!(mode(&root.join(file)), 0o600, "{file}");
    }
}

#[tokio::test]
async fn new_segments_and_fan_out_directories_are_synced_by_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    let unsynced_dirs =
        |store: &DiskStore| -> HashSet<PathBuf> { store.inner.unsynced.lock().dirs.clone() };
    let segments = dir.path().join("segments");
    // The active segment is created at start-up; the first commit that
    // has a record to make durable syncs its directory first.
    assert!(unsynced_dirs(&store).contains(&segments));
    let first = blob(1000, 10);
    store.put(first.0, first.1).await.unwrap();
    store.flush().unwrap();
    assert!(unsynced_dirs(&store).is_empty());

    // Filling a segment creates the next one.
    let mut seed = 0;
    while store.inner.active.lock().segment.id == 1 {
        let item = blob(seed, 200 << 10);
        seed += 1;
        store.put(item.0, item.1).await.unwrap();
    }
    assert!(unsynced_dirs(&store).contains(&segments));
    store.flush().unwrap();

    // A blob file in a fan-out directory of its own: both directories.
    let large = blob(99, 1 << 20);
    write_streaming(&store, large.0, &large.1).await;
    let fan_out = file_path(dir.path(), &large.0)
        .parent()
        .unwrap()
        .to_path_buf();
    let dirs = unsynced_dirs(&store);
    assert!(dirs.contains(&fan_out), "{dirs:?}");
    assert!(dirs.contains(&dir.path().join("files")), "{dirs:?}");
    store.flush().unwrap();
    assert!(unsynced_dirs(&store).is_empty());
}

#[tokio::test]
async fn blobs_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let small: Vec<_> = (0..50).map(|i| blob(i, 1000 + i as usize)).collect();
    let large = blob(999, 3 << 20);
    {
        let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
        for result in store.put_many(small.clone()).await {
            result.unwrap();
        }
        write_streaming(&store, large.0, &large.1).await;
        assert_eq!(read(&store, &large.0).await.as_ref(), Some(&large.1));
    }
    let (store, report) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    assert_eq!(report.blobs, 51);
    assert_eq!(report.dropped_invalid, 0);
    for (key, data) in &small {
        assert_eq!(read(&store, key).await.as_ref(), Some(data));
    }
    assert_eq!(read(&store, &large.0).await.as_ref(), Some(&large.1));
}

#[tokio::test]
async fn a_crash_keeps_uncommitted_blobs_only_if_they_verify() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = tempfile::tempdir().unwrap();
    let committed = blob(1, 4000);
    let intact = blob(2, 4000);
    let torn = blob(3, 4000);
    let torn_large = blob(4, 2 << 20);
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    store.put(committed.0, committed.1.clone()).await.unwrap();
    store.flush().unwrap();
    store.put(intact.0, intact.1.clone()).await.unwrap();
    store.put(torn.0, torn.1.clone()).await.unwrap();
    write_streaming(&store, torn_large.0, &torn_large.1).await;
    crash_snapshot(dir.path(), snapshot.path());
    drop(store);

    // The crash tore the last small blob's data and the large file's tail,
    // and left half a journal record behind.
    let segment = fs::read_dir(snapshot.path().join("segments"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max()
        .unwrap();
    let len = fs::metadata(&segment).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let large_path = file_path(snapshot.path(), &torn_large.0);
    OpenOptions::new()
        .write(true)
        .open(&large_path)
        .unwrap()
        .set_len((1 << 20) + 5)
        .unwrap();
    let mut journal = OpenOptions::new()
        .append(true)
        .open(snapshot.path().join("journal"))
        .unwrap();
    journal.write_all(&[7u8; RECORD_LEN / 2]).unwrap();
    drop(journal);

    let (store, report) = DiskStore::open(config(snapshot.path(), 1 << 30)).unwrap();
    assert_eq!(
        read(&store, &committed.0).await.as_ref(),
        Some(&committed.1)
    );
    assert_eq!(read(&store, &intact.0).await.as_ref(), Some(&intact.1));
    assert_eq!(
        read(&store, &torn.0).await,
        None,
        "a torn blob must not surface"
    );
    assert_eq!(
        read(&store, &torn_large.0).await,
        None,
        "a torn file must not surface"
    );
    assert!(report.dropped_invalid >= 2, "{report:?}");
    assert!(!large_path.exists(), "the torn file is removed");
}

#[tokio::test]
async fn a_journal_torn_in_the_middle_loses_only_the_torn_record() {
    // What an append cut short by a full disk left behind before Kiln cut
    // such appends off again: later records no longer on record boundaries.
    let dir = tempfile::tempdir().unwrap();
    let snapshot = tempfile::tempdir().unwrap();
    let mut stored: Vec<_> = (0..40).map(|i| blob(i, 2000)).collect();
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    for (key, data) in &stored[..20] {
        store.put(*key, data.clone()).await.unwrap();
    }
    store.flush().unwrap();
    for (key, data) in &stored[20..] {
        store.put(*key, data.clone()).await.unwrap();
    }
    let large = blob(1000, 1 << 20);
    write_streaming(&store, large.0, &large.1).await;
    stored.push(large);
    crash_snapshot(dir.path(), snapshot.path());
    drop(store);

    // Half a record inside the checkpointed part, and one past it.
    let journal_path = snapshot.path().join("journal");
    let mut journal = fs::read(&journal_path).unwrap();
    let torn = [0x5au8; RECORD_LEN / 2];
    journal.splice(30 * RECORD_LEN..30 * RECORD_LEN, torn);
    journal.splice(10 * RECORD_LEN..10 * RECORD_LEN, torn);
    fs::write(&journal_path, journal).unwrap();

    let (store, report) = DiskStore::open(config(snapshot.path(), 1 << 30)).unwrap();
    for (key, data) in &stored {
        assert_eq!(read(&store, key).await.as_ref(), Some(data), "{report:?}");
    }
    assert_eq!(report.dropped_invalid, 2, "{report:?}");
    assert!(
        report.verified_after_checkpoint >= 31,
        "records after a tear are re-verified: {report:?}"
    );
    // The journal was rewritten clean: the next start trusts it again.
    drop(store);
    let (_store, report) = DiskStore::open(config(snapshot.path(), 1 << 30)).unwrap();
    assert_eq!(report.blobs, stored.len() as u64);
    assert_eq!(report.dropped_invalid, 0, "{report:?}");
    assert_eq!(report.verified_after_checkpoint, 0, "{report:?}");
}

#[tokio::test]
async fn a_journal_kept_as_it_is_never_comes_to_trust_a_record_that_failed_verification() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = tempfile::tempdir().unwrap();
    let [early, corrupt, late, after] = [1, 2, 3, 4].map(|i| blob(i, 3000));
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    store.put(early.0, early.1.clone()).await.unwrap();
    store.flush().unwrap();
    store.put(corrupt.0, corrupt.1.clone()).await.unwrap();
    store.put(late.0, late.1.clone()).await.unwrap();
    crash_snapshot(dir.path(), snapshot.path());
    drop(store);

    // The crash lost the middle blob's data (not its length), and the start
    // has no room to rewrite the journal (here: `journal.tmp` cannot be
    // created), so it keeps the journal with that record in it.
    let segment = snapshot.path().join("segments/0000000001.pack");
    let file = OpenOptions::new().write(true).open(&segment).unwrap();
    file.write_all_at(&[0u8; 100], 3000 + 10).unwrap();
    drop(file);
    fs::create_dir(snapshot.path().join("journal.tmp")).unwrap();
    let (store, report) = DiskStore::open(config(snapshot.path(), 1 << 30)).unwrap();
    assert_eq!(report.dropped_invalid, 1, "{report:?}");
    assert_eq!(read(&store, &corrupt.0).await, None);
    // Commits go on, but their checkpoints stop short of that record.
    store.put(after.0, after.1.clone()).await.unwrap();
    store.flush().unwrap();
    drop(store);

    for _ in 0..2 {
        let (store, _) = DiskStore::open(config(snapshot.path(), 1 << 30)).unwrap();
        assert_eq!(read(&store, &corrupt.0).await, None, "bad data surfaced");
        for (key, data) in [&early, &late, &after] {
            assert_eq!(read(&store, key).await.as_ref(), Some(data));
        }
        drop(store);
        // The second time round there is room, and the journal is rewritten.
        fs::remove_dir(snapshot.path().join("journal.tmp")).ok();
    }
}

#[tokio::test]
async fn an_abandoned_write_leaves_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    let (key, data) = blob(5, 2 << 20);
    let mut writer = store.writer(key, data.len() as u64).await.unwrap();
    writer.write(&data[..1 << 20]).unwrap();
    drop(writer);
    assert!(store.get(&key).await.unwrap().is_none());
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

    let mut short = store.writer(key, data.len() as u64).await.unwrap();
    short.write(&data[..10]).unwrap();
    assert!(matches!(short.commit(), Err(StoreError::SizeMismatch(_))));
    assert!(store.get(&key).await.unwrap().is_none());
}

#[tokio::test]
async fn eviction_keeps_the_store_under_budget_and_spares_recent_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 64 << 20;
    let (store, _) = DiskStore::open(config(dir.path(), budget)).unwrap();
    let hot = blob(10_000, 8192);
    store.put(hot.0, hot.1.clone()).await.unwrap();
    let mut written = Vec::new();
    for i in 0..(3 * budget / 65536) {
        let item = blob(i, 65536);
        store.put(item.0, item.1.clone()).await.unwrap();
        written.push(item.0);
        // The hot blob is used all along, so eviction must keep it.
        if i % 64 == 0 {
            assert_eq!(store.contains(&[hot.0]).await.unwrap(), vec![true]);
        }
        assert!(
            store.size_bytes() <= budget + (4 << 20),
            "{} over budget",
            store.size_bytes()
        );
    }
    assert_eq!(read(&store, &hot.0).await.as_ref(), Some(&hot.1));
    let present = store.contains(&written).await.unwrap();
    assert!(!present[0], "the oldest cold blob is evicted");
    assert!(present[present.len() - 1], "the newest blob is kept");
    // What the index claims is really there.
    for (key, present) in written.iter().zip(present) {
        if present {
            assert!(store.get(key).await.unwrap().is_some());
        }
    }
    drop(store);
    let (store, _) = DiskStore::open(config(dir.path(), budget)).unwrap();
    assert!(store.size_bytes() <= budget);
    assert_eq!(read(&store, &hot.0).await.as_ref(), Some(&hot.1));
}

#[tokio::test]
async fn action_cache_entries_are_replaced_and_the_last_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let action = DigestFunction::Sha256.digest_of(b"action");
    let key = Key::action_cache("", "", None, &action);
    {
        let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
        store.put(key, Bytes::from_static(b"first")).await.unwrap();
        store.put(key, Bytes::from_static(b"second")).await.unwrap();
        assert_eq!(read(&store, &key).await.unwrap(), "second");
    }
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    assert_eq!(read(&store, &key).await.unwrap(), "second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_of_one_blob_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    let (key, data) = blob(42, 3 << 20);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, data) = (store.clone(), data.clone());
            tokio::task::spawn_blocking(move || {
                let mut writer =
                    futures_lite_block_on(store.writer(key, data.len() as u64)).unwrap();
                for chunk in data.chunks(65536) {
                    writer.write(chunk).unwrap();
                }
                writer.commit().unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(read(&store, &key).await.as_ref(), Some(&data));
    assert_eq!(
        store.size_bytes(),
        data.len() as u64,
        "one copy is accounted"
    );
    drop(store);
    let (store, report) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    assert_eq!(report.blobs, 1);
    assert_eq!(read(&store, &key).await.as_ref(), Some(&data));
}

fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(future)
}

#[tokio::test]
async fn sync_durability_commits_before_acknowledging() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 1 << 30);
    config.durability = Durability::Sync;
    let (store, _) = DiskStore::open(config).unwrap();
    let item = blob(7, 1000);
    store.put(item.0, item.1.clone()).await.unwrap();
    let checkpoint = fs::read(dir.path().join("checkpoint")).unwrap();
    let durable = journal::decode_checkpoint(&checkpoint).unwrap();
    assert_eq!(
        durable,
        fs::metadata(dir.path().join("journal")).unwrap().len()
    );
}

#[tokio::test]
async fn a_second_server_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    let mut second = config(dir.path(), 1 << 30);
    second.lock_wait = Duration::from_millis(100);
    let error = DiskStore::open(second).err().unwrap();
    assert!(error.to_string().contains("another kiln"), "{error}");
}

#[tokio::test]
async fn opening_waits_for_a_store_that_is_closing() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    let (key, data) = blob(1, 1000);
    first.put(key, data.clone()).await.unwrap();
    // The first store goes away while the second is already waiting.
    let closing = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(first);
    });
    let (second, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    closing.join().unwrap();
    assert_eq!(read(&second, &key).await, Some(data));
}

#[tokio::test]
async fn the_journal_is_compacted_and_stays_trustworthy() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = tempfile::tempdir().unwrap();
    let action = DigestFunction::Sha256.digest_of(b"action");
    let key = Key::action_cache("", "", None, &action);
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    let kept = blob(1, 3000);
    store.put(kept.0, kept.1.clone()).await.unwrap();
    // Replacing one entry many times grows the journal, not the live set.
    for i in 0..500u32 {
        store
            .put(key, Bytes::from(format!("result {i}")))
            .await
            .unwrap();
    }
    assert_eq!(store.journal_bytes(), 501 * RECORD_LEN as u64);
    store.compact_journal().unwrap();
    assert_eq!(store.journal_bytes(), 2 * RECORD_LEN as u64);
    // Writes go on after the compaction, and a crash keeps all of it.
    let after = blob(2, 5000);
    store.put(after.0, after.1.clone()).await.unwrap();
    crash_snapshot(dir.path(), snapshot.path());
    drop(store);
    for path in [dir.path(), snapshot.path()] {
        let (store, report) = DiskStore::open(config(path, 1 << 30)).unwrap();
        assert_eq!(report.dropped_invalid, 0, "{report:?}");
        assert_eq!(read(&store, &key).await.unwrap(), "result 499");
        assert_eq!(read(&store, &kept.0).await.as_ref(), Some(&kept.1));
        assert_eq!(read(&store, &after.0).await.as_ref(), Some(&after.1));
    }
}

/// Whether the store holds `key`, without counting as a use (which
/// `contains` and `get` do, and which would reorder eviction).
fn holds(store: &DiskStore, key: &Key) -> bool {
    store.inner.index.shard(key).lock().contains_key(key)
}

/// Writes fresh blobs of `len` bytes until `until(store, written so far)`
/// says stop; bounded by three store sizes of writes. Returns their keys.
async fn fill_until(
    store: &DiskStore,
    seed: &mut u64,
    len: usize,
    until: impl Fn(&DiskStore, usize) -> bool,
) -> Vec<Key> {
    let mut written = Vec::new();
    let limit = 3 * store.inner.config.max_size_bytes / len as u64;
    while !until(store, written.len()) {
        assert!((written.len() as u64) < limit, "eviction never got there");
        let (key, data) = blob(*seed, len);
        *seed += 1;
        if len as u64 > store.inner.config.max_packed_blob_bytes {
            write_streaming(store, key, &data).await;
        } else {
            store.put(key, data).await.unwrap();
        }
        written.push(key);
    }
    written
}

#[tokio::test]
async fn retention_reorders_eviction_of_files_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 64 << 20;
    let (store, _) = DiskStore::open(config(dir.path(), budget)).unwrap();
    let mut seed = 1;
    let mb = 1 << 20;
    // Twenty default blobs, then three more that differ only in retention.
    let early = fill_until(&store, &mut seed, mb, |_, n| n == 20).await;
    let [kept, plain, lowered] = [9_001, 9_002, 9_003].map(|s| blob(s, mb));
    for (key, data) in [&kept, &plain, &lowered] {
        write_streaming(&store, *key, data).await;
    }
    store
        .set_retention(&[kept.0], Retention::from_reapi_priority(-64))
        .await
        .unwrap();
    store
        .set_retention(&[lowered.0], Retention::from_reapi_priority(64))
        .await
        .unwrap();

    // The lowered blob goes first, before older blobs of default retention.
    fill_until(&store, &mut seed, mb, |s, _| !holds(s, &lowered.0)).await;
    assert!(
        holds(&store, &plain.0),
        "the default blob outlives the lowered one"
    );
    assert!(
        holds(&store, early.last().unwrap()),
        "older default blobs outlive the lowered one"
    );
    // The retained blob outlives the default one written with it.
    fill_until(&store, &mut seed, mb, |s, _| !holds(s, &plain.0)).await;
    assert!(
        holds(&store, &kept.0),
        "the retained blob outlives the default one"
    );

    // The retention is journaled: after a restart the retained blob still
    // outlives blobs that were used after it.
    let before_restart = fill_until(&store, &mut seed, mb, |_, n| n == 4).await;
    drop(store);
    let (store, _) = DiskStore::open(config(dir.path(), budget)).unwrap();
    let newest = *before_restart.last().unwrap();
    assert!(holds(&store, &newest) && holds(&store, &kept.0));
    fill_until(&store, &mut seed, mb, |s, _| !holds(s, &newest)).await;
    assert!(holds(&store, &kept.0), "the retention survived the restart");
    assert_eq!(read(&store, &kept.0).await.as_ref(), Some(&kept.1));
}

#[tokio::test]
async fn retained_small_blobs_are_copied_forward_when_their_segment_goes() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 64 << 20;
    let (store, _) = DiskStore::open(config(dir.path(), budget)).unwrap();
    let [kept, plain] = [9_001, 9_002].map(|s| blob(s, 4096));
    store.put(kept.0, kept.1.clone()).await.unwrap();
    store.put(plain.0, plain.1.clone()).await.unwrap();
    store
        .set_retention(&[kept.0], Retention::from_reapi_priority(-64))
        .await
        .unwrap();
    let first_home = store.inner.index.shard(&kept.0).lock()[&kept.0].location();

    let mut seed = 1;
    fill_until(&store, &mut seed, 64 << 10, |s, _| !holds(s, &plain.0)).await;
    assert!(
        holds(&store, &kept.0),
        "the retained blob outlives its segment"
    );
    let entry = store.inner.index.shard(&kept.0).lock()[&kept.0];
    assert!(entry.location() != first_home, "it was copied forward");
    assert_eq!(entry.retention, Retention::from_reapi_priority(-64));
    assert_eq!(read(&store, &kept.0).await.as_ref(), Some(&kept.1));
}

#[tokio::test]
async fn a_store_of_only_retained_blobs_keeps_its_budget_without_rewriting_itself() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 64 << 20;
    let (store, _) = DiskStore::open(config(dir.path(), budget)).unwrap();
    let retained = Retention::from_reapi_priority(-64);
    let count = 3 * budget / 65536;
    for seed in 0..count {
        let (key, data) = blob(seed, 65536);
        store.put(key, data).await.unwrap();
        store.set_retention(&[key], retained).await.unwrap();
        assert!(
            store.size_bytes() <= budget + (8 << 20),
            "{} over budget",
            store.size_bytes()
        );
    }
    // Eviction copies retained blobs forward, but never rewrites more than
    // was written.
    let written = count * 65536;
    assert!(
        store.copied_forward_bytes() <= written,
        "eviction copied {} bytes forward for {written} written",
        store.copied_forward_bytes()
    );
}

#[test]
fn many_parts_are_written_back_to_back_at_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let file = File::create(dir.path().join("f")).unwrap();
    // More parts than one pwritev takes, with empty and odd-sized ones.
    let parts: Vec<Vec<u8>> = (0..2500usize)
        .map(|i| vec![(i % 251) as u8; (i * 37) % 1000])
        .collect();
    let slices: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
    write_all_vectored_at(&file, &slices, 100).unwrap();
    let written = fs::read(dir.path().join("f")).unwrap();
    assert_eq!(&written[..100], &[0u8; 100][..]);
    assert_eq!(written[100..], parts.concat());
}

const MIB: usize = 1 << 20;

/// A store's config with `bytes` of recent-blob memory.
fn with_recent(path: &Path, bytes: usize) -> DiskStoreConfig {
    let mut config = config(path, 1 << 30);
    config.recent_blob_bytes = bytes as u64;
    config
}

/// Whether `store` serves `key` from memory, and what it serves.
async fn read_kept(store: &DiskStore, key: &Key) -> (bool, Bytes) {
    let blob = store.get(key).await.unwrap().expect("stored");
    let in_memory = matches!(blob, Blob::Pieces(_));
    (in_memory, blob.into_bytes().await.unwrap())
}

#[tokio::test]
async fn a_large_blob_just_written_is_read_back_from_memory_and_after_a_restart_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (key, data) = blob(41, 5 * MIB + 4321);
    {
        let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
        write_streaming(&store, key, &data).await;
        assert_eq!(read_kept(&store, &key).await, (true, data.clone()));
        // Ranges within a piece, across pieces, and at the very end.
        let blob = store.get(&key).await.unwrap().unwrap();
        for (at, len) in [
            (10, 100),
            (MIB - 3, 7),
            (2 * MIB - 1, 3 * MIB),
            (5 * MIB, 4321),
        ] {
            let got = blob.read_range(at as u64, len as u64).unwrap();
            assert_eq!(got, data.slice(at..at + len), "range {at}+{len}");
        }
        assert_eq!(blob.contiguous_len(MIB as u64 - 3), 3);
        assert!(store.usage().recent_memory_bytes >= data.len() as u64);
        store.flush().unwrap();
    }
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    assert_eq!(read_kept(&store, &key).await, (false, data));
    assert_eq!(store.usage().recent_memory_bytes, 0);
}

#[tokio::test]
async fn recent_blobs_stay_within_their_memory_and_give_way_to_newer_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = DiskStore::open(with_recent(dir.path(), 5 * MIB)).unwrap();
    let blobs: Vec<_> = (0..4).map(|i| blob(50 + i, 2 * MIB + 1)).collect();
    // Three buffers each: the tier holds one of them at a time.
    for (i, (key, data)) in blobs.iter().enumerate() {
        write_streaming(&store, *key, data).await;
        assert_eq!(
            read_kept(&store, key).await,
            (true, data.clone()),
            "blob {i}"
        );
        if i > 0 {
            let (older, older_data) = &blobs[i - 1];
            assert_eq!(read_kept(&store, older).await, (false, older_data.clone()));
        }
        assert!(store.usage().recent_memory_bytes <= 5 * MIB as u64);
    }
    // A blob too large for the whole tier is written and served from disk.
    let (huge, huge_data) = blob(60, 6 * MIB);
    write_streaming(&store, huge, &huge_data).await;
    assert_eq!(read_kept(&store, &huge).await, (false, huge_data));
    // And the next one that fits is kept again: the huge one gave its
    // buffers back.
    let (next, next_data) = blob(61, MIB + 1);
    write_streaming(&store, next, &next_data).await;
    assert_eq!(read_kept(&store, &next).await, (true, next_data));
}

#[tokio::test]
async fn a_recent_blob_being_read_keeps_its_bytes_while_newer_writes_need_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = DiskStore::open(with_recent(dir.path(), 3 * MIB)).unwrap();
    let (first, first_data) = blob(70, 2 * MIB + 1);
    write_streaming(&store, first, &first_data).await;
    let reading = store.get(&first).await.unwrap().unwrap();
    assert!(matches!(reading, Blob::Pieces(_)));
    // The next write finds the memory held by the read: it is not kept,
    // and the blob being read is intact.
    let (second, second_data) = blob(71, 2 * MIB + 1);
    write_streaming(&store, second, &second_data).await;
    assert_eq!(read_kept(&store, &second).await, (false, second_data));
    assert_eq!(reading.into_bytes().await.unwrap(), first_data);
    // Once the read is over, its memory serves the next write.
    let (third, third_data) = blob(72, 2 * MIB + 1);
    write_streaming(&store, third, &third_data).await;
    assert_eq!(read_kept(&store, &third).await, (true, third_data));
    // An upload given up on gives its memory back too.
    let (fourth, fourth_data) = blob(73, 2 * MIB + 1);
    let mut abandoned = store
        .writer(fourth, fourth_data.len() as u64)
        .await
        .unwrap();
    abandoned.write(&fourth_data[..2 * MIB]).unwrap();
    drop(abandoned);
    assert!(store.get(&fourth).await.unwrap().is_none());
    write_streaming(&store, fourth, &fourth_data).await;
    assert_eq!(read_kept(&store, &fourth).await, (true, fourth_data));
}

/// Fails, rather than testing the buffered path instead, where the test
/// directory's file system refuses direct I/O (tmpfs).
fn assert_direct_segments(store: &DiskStore) {
    assert!(
        store.inner.active.lock().segment.direct.is_some(),
        "the test directory's file system refuses O_DIRECT: point TMPDIR at a disk"
    );
}

#[tokio::test]
async fn a_large_batch_of_small_blobs_is_read_back_from_memory_and_after_a_restart_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    // Odd sizes, so blobs straddle the 1 MiB buffers, after a small blob
    // that leaves the segment's end unaligned.
    let before = blob(80, 1000);
    let mut batch: Vec<_> = (0..40).map(|i| blob(81 + i, 100_003)).collect();
    let action = DigestFunction::Sha256.digest_of(b"action");
    let result = (
        Key::action_cache("", "", None, &action),
        Bytes::from_static(b"a result"),
    );
    batch.insert(17, result.clone());
    let after = blob(130, 1000);
    {
        let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
        assert_direct_segments(&store);
        store.put(before.0, before.1.clone()).await.unwrap();
        for outcome in store.put_many(batch.clone()).await {
            outcome.unwrap();
        }
        store.put(after.0, after.1.clone()).await.unwrap();
        for (key, data) in batch.iter().filter(|(key, _)| *key != result.0) {
            assert_eq!(read_kept(&store, key).await, (true, data.clone()));
        }
        // An Action Cache entry is replaced in place: never kept.
        assert_eq!(
            read_kept(&store, &result.0).await,
            (false, result.1.clone())
        );
        for (key, data) in [&before, &after] {
            assert_eq!(read_kept(&store, key).await, (false, data.clone()));
        }
        // The batch fills its buffers from their start: the 11th blob
        // crosses the first one's end `at` bytes in.
        let (key, data) = &batch[10];
        let blob = store.get(key).await.unwrap().unwrap();
        let at = MIB - 10 * 100_003;
        assert_eq!(blob.contiguous_len(at as u64 - 1), 1);
        assert_eq!(blob.contiguous_len(at as u64), (100_003 - at) as u64);
        assert_eq!(
            blob.read_range(at as u64 - 5, 10).unwrap(),
            data.slice(at - 5..at + 5)
        );
        store.flush().unwrap();
    }
    let (store, report) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    assert_eq!(report.dropped_invalid, 0);
    for (key, data) in batch.iter().chain([&before, &after]) {
        assert_eq!(read_kept(&store, key).await, (false, data.clone()));
    }
}

#[tokio::test]
async fn a_batch_the_recent_tier_cannot_hold_is_written_and_served_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = DiskStore::open(with_recent(dir.path(), 2 * MIB)).unwrap();
    assert_direct_segments(&store);
    let large: Vec<_> = (0..30).map(|i| blob(140 + i, 100_000)).collect();
    for outcome in store.put_many(large.clone()).await {
        outcome.unwrap();
    }
    for (key, data) in &large {
        assert_eq!(read_kept(&store, key).await, (false, data.clone()));
    }
    // The buffers it took went back: the next batch that fits is kept.
    let fits: Vec<_> = (0..15).map(|i| blob(180 + i, 100_000)).collect();
    for outcome in store.put_many(fits.clone()).await {
        outcome.unwrap();
    }
    for (key, data) in &fits {
        assert_eq!(read_kept(&store, key).await, (true, data.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The writer thread is held on purpose; nothing awaited takes its lock.
#[allow(clippy::await_holding_lock)]
async fn a_batch_written_behind_its_acknowledgement_is_served_from_memory_until_it_lands() {
    let dir = tempfile::tempdir().unwrap();
    let config = with_recent(dir.path(), 3 * MIB);
    let (store, _) = DiskStore::open(config.clone()).unwrap();
    assert_direct_segments(&store);
    let first: Vec<_> = (0..20).map(|i| blob(200 + i, 100_000)).collect();
    let second: Vec<_> = (0..20).map(|i| blob(230 + i, 100_000)).collect();
    {
        // The writer thread is held: nothing written behind lands.
        let held = store.inner.behind.hold();
        for outcome in store.put_many(first.clone()).await {
            outcome.unwrap();
        }
        for (key, data) in &first {
            assert_eq!(read_kept(&store, key).await, (true, data.clone()));
        }
        // The tier's third buffer is free, the first two hold a batch that
        // has not landed: the next batch is written now and not kept, and
        // the first stays in memory.
        for outcome in store.put_many(second.clone()).await {
            outcome.unwrap();
        }
        for (key, data) in &second {
            assert_eq!(read_kept(&store, key).await, (false, data.clone()));
        }
        for (key, data) in &first {
            assert_eq!(read_kept(&store, key).await, (true, data.clone()));
        }
        // A commit waits for the batch in flight.
        let committing = {
            let inner = store.inner.clone();
            std::thread::spawn(move || inner.commit())
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !committing.is_finished(),
            "committed before the batch landed"
        );
        drop(held);
        committing.join().unwrap().unwrap();
    }
    drop(store);
    let (store, report) = DiskStore::open(config).unwrap();
    assert_eq!(report.dropped_invalid, 0);
    for (key, data) in first.iter().chain(&second) {
        assert_eq!(read_kept(&store, key).await, (false, data.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The writer thread is held on purpose; nothing awaited takes its lock.
#[allow(clippy::await_holding_lock)]
async fn a_crash_before_a_batch_lands_loses_that_batch_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = tempfile::tempdir().unwrap();
    let (store, _) = DiskStore::open(config(dir.path(), 1 << 30)).unwrap();
    assert_direct_segments(&store);
    let landed: Vec<_> = (0..20).map(|i| blob(260 + i, 100_000)).collect();
    let in_flight: Vec<_> = (0..20).map(|i| blob(290 + i, 100_000)).collect();
    for outcome in store.put_many(landed.clone()).await {
        outcome.unwrap();
    }
    store.flush().unwrap();
    {
        let _held = store.inner.behind.hold();
        for outcome in store.put_many(in_flight.clone()).await {
            outcome.unwrap();
        }
        // What a crash now leaves: the journal names the batch, its range
        // is reserved but holds nothing yet.
        crash_snapshot(dir.path(), snapshot.path());
    }
    drop(store);
    let (store, report) = DiskStore::open(config(snapshot.path(), 1 << 30)).unwrap();
    assert_eq!(report.dropped_invalid, in_flight.len() as u64, "{report:?}");
    for (key, data) in &landed {
        assert_eq!(read(&store, key).await.as_ref(), Some(data));
    }
    for (key, _) in &in_flight {
        assert_eq!(
            read(&store, key).await,
            None,
            "a blob that never landed surfaced"
        );
    }
}
