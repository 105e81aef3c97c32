//! Faults that must not lose data, injected into a real `kiln serve`: a
//! disk that fills up under uploads, and `kill -9` in the middle of
//! concurrent uploads. Every blob the server acknowledged is served after
//! a restart, with bytes that hash to its digest; a blob it did not
//! acknowledge may be absent, but is never served partially.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{KilnServer, Tmpfs};
use futures::StreamExt;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{self, batch_update_blobs_request};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Blobs up to this size are read back with BatchReadBlobs.
const BATCH_READ_MAX: usize = 64 << 10;

fn digest(data: &[u8]) -> reapi::Digest {
    kiln_cas::wire::digest_of(data)
}

/// `len` bytes no other seed produces.
fn blob(seed: u64, len: usize) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let tag = seed.to_le_bytes();
    let at = len.saturating_sub(tag.len());
    data[at..].copy_from_slice(&tag[..len - at]);
    data.into()
}

/// A gRPC client of one server.
#[derive(Clone)]
struct Client {
    channel: Channel,
}

impl Client {
    async fn connect(server: &KilnServer) -> Client {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", server.port))
            .unwrap()
            .connect()
            .await
            .expect("connect to kiln");
        Client { channel }
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(16 << 20)
    }

    /// BatchUpdateBlobs: the call's error, or one status per blob.
    async fn batch_upload(&self, blobs: &[Bytes]) -> Result<Vec<Status>, Status> {
        let response = self
            .cas()
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                requests: blobs
                    .iter()
                    .map(|data| batch_update_blobs_request::Request {
                        digest: Some(digest(data)),
                        data: data.to_vec(),
                        compressor: 0,
                    })
                    .collect(),
                ..Default::default()
            })
            .await?;
        Ok(response
            .into_inner()
            .responses
            .into_iter()
            .map(|r| {
                let status = r.status.unwrap_or_default();
                Status::new(Code::from(status.code), status.message)
            })
            .collect())
    }

    /// One ByteStream Write of the whole blob, in 64 KiB messages.
    async fn bytestream_upload(&self, data: &Bytes) -> Result<(), Status> {
        let d = digest(data);
        let name = format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash,
            d.size_bytes
        );
        let chunk = 64 << 10;
        let count = data.len().div_ceil(chunk).max(1);
        let requests: Vec<WriteRequest> = (0..count)
            .map(|i| WriteRequest {
                resource_name: if i == 0 { name.clone() } else { String::new() },
                write_offset: (i * chunk) as i64,
                finish_write: i + 1 == count,
                data: data.slice(i * chunk..((i + 1) * chunk).min(data.len())),
            })
            .collect();
        let committed = ByteStreamClient::new(self.channel.clone())
            .write(futures::stream::iter(requests))
            .await?
            .into_inner()
            .committed_size;
        assert_eq!(committed, data.len() as i64);
        Ok(())
    }

    /// An upload the way Bazel would send it: ByteStream for large blobs.
    async fn upload(&self, data: &Bytes) -> Result<(), Status> {
        if data.len() > BATCH_READ_MAX {
            return self.bytestream_upload(data).await;
        }
        let mut statuses = self.batch_upload(std::slice::from_ref(data)).await?;
        let status = statuses.pop().expect("one status per blob");
        match status.code() {
            Code::Ok => Ok(()),
            _ => Err(status),
        }
    }

    /// The hashes among `blobs` the server says it has.
    async fn present(&self, blobs: &[Bytes]) -> HashSet<String> {
        let mut present = HashSet::new();
        for group in blobs.chunks(10_000) {
            let digests: Vec<_> = group.iter().map(|data| digest(data)).collect();
            let missing: HashSet<String> = self
                .cas()
                .find_missing_blobs(reapi::FindMissingBlobsRequest {
                    blob_digests: digests.clone(),
                    ..Default::default()
                })
                .await
                .expect("FindMissingBlobs")
                .into_inner()
                .missing_blob_digests
                .into_iter()
                .map(|d| d.hash)
                .collect();
            present.extend(
                digests
                    .into_iter()
                    .map(|d| d.hash)
                    .filter(|h| !missing.contains(h)),
            );
        }
        present
    }

    /// Reads each blob back and checks that its bytes hash to its digest.
    /// `must_exist`: a missing blob fails the test; otherwise it is skipped.
    async fn verify(&self, blobs: &[Bytes], must_exist: bool, what: &str) {
        let present = self.present(blobs).await;
        let mut small = Vec::new();
        for data in blobs {
            let d = digest(data);
            if !present.contains(&d.hash) {
                assert!(
                    !must_exist,
                    "{what}: acknowledged blob {}/{} is missing",
                    d.hash, d.size_bytes
                );
                continue;
            }
            if data.len() <= BATCH_READ_MAX {
                small.push(d);
                continue;
            }
            let mut stream = ByteStreamClient::new(self.channel.clone())
                .max_decoding_message_size(16 << 20)
                .read(ReadRequest {
                    resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
                    read_offset: 0,
                    read_limit: 0,
                })
                .await
                .unwrap_or_else(|e| panic!("{what}: reading {}: {e}", d.hash))
                .into_inner();
            let mut read = Vec::with_capacity(data.len());
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.unwrap_or_else(|e| panic!("{what}: reading {}: {e}", d.hash));
                read.extend_from_slice(&chunk.data);
            }
            assert_eq!(
                digest(&read),
                d,
                "{what}: blob {} served with other bytes",
                d.hash
            );
        }
        for group in small.chunks(200) {
            let responses = self
                .cas()
                .batch_read_blobs(reapi::BatchReadBlobsRequest {
                    digests: group.to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("{what}: BatchReadBlobs: {e}"))
                .into_inner()
                .responses;
            for response in responses {
                let d = response.digest.expect("a digest per response");
                let code = response.status.map_or(0, |s| s.code);
                assert_eq!(code, 0, "{what}: reading {}: code {code}", d.hash);
                assert_eq!(
                    digest(&response.data),
                    d,
                    "{what}: blob {} served with other bytes",
                    d.hash
                );
            }
        }
    }
}

fn serve(data_dir: &Path, log: &Path) -> KilnServer {
    KilnServer::start(
        data_dir,
        log,
        &[
            "--execution-enabled",
            "false",
            // Reads must come from the disk store, not a memory copy.
            "--memory-cache-size",
            "0",
            // Commits (syncs, checkpoints) happen in the middle of it all.
            "--sync-interval-ms",
            "50",
        ],
    )
}

/// What a test has sent: blobs the server acknowledged, and blobs whose
/// upload failed or was cut off (the server may or may not have them).
#[derive(Default)]
struct Ledger {
    acknowledged: Vec<Bytes>,
    unacknowledged: Vec<Bytes>,
}

/// Uploads until the file system is full and uploads are refused with
/// RESOURCE_EXHAUSTED naming the store's directory. Sizes cycle so that
/// every write path fills up: blob files, packed blobs, and the journal
/// (tiny blobs, once nothing bigger fits). Bounded.
async fn fill_with_uploads(client: &Client, seed: &mut u64, ledger: &mut Ledger, store_dir: &Path) {
    let mut refused_in_a_row = 0;
    let mut refused = 0;
    for attempt in 0..20_000 {
        let len = match (refused, attempt % 3) {
            (0, 0) => 300 << 10,
            (0, 1) => 40 << 10,
            (0, _) => 4 << 10,
            _ => 100,
        };
        let data = blob(*seed, len);
        *seed += 1;
        match client.upload(&data).await {
            Ok(()) => {
                refused_in_a_row = 0;
                ledger.acknowledged.push(data);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let message = status.message();
                assert!(
                    message.contains(&store_dir.display().to_string()) && message.contains("free"),
                    "the message names the disk and its free space: {message}"
                );
                refused += 1;
                refused_in_a_row += 1;
                ledger.unacknowledged.push(data);
                // Tiny blobs keep fitting into pages already allocated for
                // a while; past this many refusals in a row, the disk is full.
                if refused_in_a_row == 200 {
                    return;
                }
            }
        }
    }
    panic!("uploads were never refused: is the file system full?");
}

/// Uploads `count` blobs that must all be acknowledged.
async fn upload_all(client: &Client, seed: &mut u64, ledger: &mut Ledger, count: usize) {
    for i in 0..count {
        let len = [300 << 10, 40 << 10, 4 << 10, 100][i % 4];
        let data = blob(*seed, len);
        *seed += 1;
        client
            .upload(&data)
            .await
            .unwrap_or_else(|e| panic!("upload of {len} bytes with room to spare: {e:?}"));
        ledger.acknowledged.push(data);
    }
}

#[tokio::test]
async fn a_full_disk_refuses_uploads_and_loses_nothing_it_acknowledged() {
    if !common::root_available(
        "a_full_disk_refuses_uploads_and_loses_nothing_it_acknowledged (mounting a small tmpfs)",
    ) {
        return;
    }
    let disk = Tmpfs::mount("24m");
    let data_dir = disk.path().join("data");
    let store_dir = data_dir.join("cas");
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("kiln.log");
    // Room given back later: a little, then a lot.
    std::fs::write(disk.path().join("reserve"), vec![0u8; 2 << 20]).unwrap();
    std::fs::write(disk.path().join("filler"), vec![0u8; 8 << 20]).unwrap();
    let mut ledger = Ledger::default();
    let mut seed = 0;

    let server = serve(&data_dir, &log);
    let client = Client::connect(&server).await;
    fill_with_uploads(&client, &mut seed, &mut ledger, &store_dir).await;
    // A little room: uploads work again (after appends that the full disk
    // cut short), until the disk is full once more.
    std::fs::remove_file(disk.path().join("reserve")).unwrap();
    upload_all(&client, &mut seed, &mut ledger, 8).await;
    fill_with_uploads(&client, &mut seed, &mut ledger, &store_dir).await;
    client
        .verify(&ledger.acknowledged, true, "before the restart")
        .await;

    // A restart on the full disk: it stops cleanly, starts again, and
    // serves everything it acknowledged.
    let status = server.terminate(Duration::from_secs(30));
    assert!(status.success(), "kiln exited with {status} on a full disk");
    let server = serve(&data_dir, &log);
    let client = Client::connect(&server).await;
    client
        .verify(&ledger.acknowledged, true, "after a restart on a full disk")
        .await;
    client
        .verify(&ledger.unacknowledged, false, "refused uploads")
        .await;
    let refused = client.upload(&blob(u64::MAX, 40 << 10)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // Room again: uploads work, and survive a kill -9.
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    upload_all(&client, &mut seed, &mut ledger, 40).await;
    server.kill();
    let server = serve(&data_dir, &log);
    let client = Client::connect(&server).await;
    client
        .verify(
            &ledger.acknowledged,
            true,
            "after freeing space and kill -9",
        )
        .await;
    client
        .verify(&ledger.unacknowledged, false, "refused uploads")
        .await;
    drop(server);
}

/// Kills `kiln serve` with SIGKILL while 16 clients upload, 20 times.
/// After each restart every blob it ever acknowledged is there and hashes
/// to its digest, and anything else it serves does too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_concurrent_uploads_loses_no_acknowledged_blob_and_serves_no_partial_one() {
    const ROUNDS: u64 = 20;
    const UPLOADERS: u64 = 16;
    let started = Instant::now();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let log = data.path().join("kiln.log");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut server = serve(&data_dir, &log);

    for round in 0..ROUNDS {
        let client = Client::connect(&server).await;
        if round > 0 {
            let (acknowledged, unacknowledged) = {
                let ledger = ledger.lock().unwrap();
                (ledger.acknowledged.clone(), ledger.unacknowledged.clone())
            };
            client
                .verify(
                    &acknowledged,
                    true,
                    &format!("after kill -9 number {round}"),
                )
                .await;
            client
                .verify(
                    &unacknowledged,
                    false,
                    &format!("after kill -9 number {round}"),
                )
                .await;
        }

        // Kill once this many uploads of the round were acknowledged: a
        // different moment each round, always with uploads in flight.
        let kill_after = 8 + (round * 29) % 90;
        let acknowledged_this_round = Arc::new(tokio::sync::Semaphore::new(0));
        let killed = Arc::new(AtomicBool::new(false));
        let uploaders: Vec<_> = (0..UPLOADERS)
            .map(|uploader| {
                let (client, ledger) = (client.clone(), ledger.clone());
                let (acknowledged_this_round, killed) =
                    (acknowledged_this_round.clone(), killed.clone());
                tokio::spawn(async move {
                    // Bounded: the kill comes long before this runs out.
                    for i in 0..10_000u64 {
                        let seed = (round << 40) | (uploader << 24) | (i << 4);
                        // Blob files, packed blobs, and batches of small ones.
                        let (blobs, outcome) = match i % 4 {
                            0 | 1 => {
                                let data =
                                    blob(seed, if i % 4 == 0 { 300 << 10 } else { 100 << 10 });
                                let outcome = client.bytestream_upload(&data).await;
                                (vec![data], outcome)
                            }
                            _ => {
                                let batch: Vec<_> = (0..4)
                                    .map(|j| blob(seed | j, 1000 + 500 * j as usize))
                                    .collect();
                                let outcome = client.batch_upload(&batch).await.map(|statuses| {
                                    assert!(
                                        statuses.iter().all(|s| s.code() == Code::Ok),
                                        "{statuses:?}"
                                    );
                                });
                                (batch, outcome)
                            }
                        };
                        match outcome {
                            Ok(()) => {
                                ledger.lock().unwrap().acknowledged.extend(blobs);
                                acknowledged_this_round.add_permits(1);
                            }
                            Err(status) => {
                                assert!(
                                    killed.load(Ordering::SeqCst),
                                    "an upload failed before the kill: {status:?}"
                                );
                                ledger.lock().unwrap().unacknowledged.extend(blobs);
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        let _ = acknowledged_this_round
            .acquire_many(kill_after as u32)
            .await
            .expect("uploads go on");
        killed.store(true, Ordering::SeqCst);
        server.kill();
        for uploader in uploaders {
            tokio::time::timeout(Duration::from_secs(30), uploader)
                .await
                .expect("an uploader notices the kill")
                .expect("an uploader panicked");
        }
        server = serve(&data_dir, &log);
    }

    let client = Client::connect(&server).await;
    let (acknowledged, unacknowledged) = {
        let ledger = ledger.lock().unwrap();
        (ledger.acknowledged.clone(), ledger.unacknowledged.clone())
    };
    client
        .verify(&acknowledged, true, "after the last restart")
        .await;
    client
        .verify(&unacknowledged, false, "after the last restart")
        .await;
    eprintln!(
        "{ROUNDS} kills: {} blobs acknowledged, {} cut off, in {:?}",
        acknowledged.len(),
        unacknowledged.len(),
        started.elapsed()
    );
}
