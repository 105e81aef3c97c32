//! End-to-end tests of the REAPI storage services: a whole server started
//! in-process on 127.0.0.1, driven by real tonic clients over gRPC.

use std::path::Path;

use bytes::Bytes;
use futures::StreamExt;
use kiln::config::{Backend, Config, Size};
use kiln::serve::RunningServer;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{self, batch_update_blobs_request};
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

struct Harness {
    server: Option<RunningServer>,
    channel: Channel,
    _dir: Option<tempfile::TempDir>,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut harness = Harness::start_in(dir.path(), |_| {}).await;
        harness._dir = Some(dir);
        harness
    }

    async fn start_in(data_dir: &Path, adjust: impl FnOnce(&mut Config)) -> Harness {
        let mut config = Config::loopback(data_dir.to_path_buf());
        config.storage.max_size = Size::gib(1);
        adjust(&mut config);
        let server = kiln::serve::start(&config).await.expect("server starts");
        let channel = server.connect().await.unwrap();
        Harness {
            server: Some(server),
            channel,
            _dir: None,
        }
    }

    async fn stop(mut self) {
        self.server.take().unwrap().stop().await.unwrap();
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
    }

    fn action_cache(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
    }

    async fn upload_batch(&self, blobs: &[&[u8]]) {
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
            .await
            .unwrap()
            .into_inner();
        for r in response.responses {
            assert_eq!(r.status.unwrap().code, 0);
        }
    }

    async fn missing(&self, digests: Vec<reapi::Digest>) -> Vec<reapi::Digest> {
        self.cas()
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                blob_digests: digests,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests
    }

    async fn write(&self, name: &str, chunks: Vec<Bytes>) -> Result<i64, tonic::Status> {
        let mut offset = 0;
        let count = chunks.len();
        let requests: Vec<WriteRequest> = chunks
            .into_iter()
            .enumerate()
            .map(|(i, data)| {
                let request = WriteRequest {
                    resource_name: if i == 0 {
                        name.to_string()
                    } else {
                        String::new()
                    },
                    write_offset: offset,
                    finish_write: i + 1 == count,
                    data: data.clone(),
                };
                offset += data.len() as i64;
                request
            })
            .collect();
        self.bytestream()
            .write(futures::stream::iter(requests))
            .await
            .map(|r| r.into_inner().committed_size)
    }

    async fn read(&self, name: &str, offset: i64, limit: i64) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .bytestream()
            .read(ReadRequest {
                resource_name: name.to_string(),
                read_offset: offset,
                read_limit: limit,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?.data);
        }
        Ok(out)
    }
}

fn digest(data: &[u8]) -> reapi::Digest {
    kiln_cas::wire::digest_of(data)
}

fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn chunks(data: &Bytes, size: usize) -> Vec<Bytes> {
    (0..data.len())
        .step_by(size)
        .map(|at| data.slice(at..(at + size).min(data.len())))
        .collect()
}

fn blob_name(data: &[u8]) -> String {
    let d = digest(data);
    format!("blobs/{}/{}", d.hash, d.size_bytes)
}

fn upload_name(data: &[u8]) -> String {
    format!("uploads/{}/{}", uuid(), blob_name(data))
}

fn uuid() -> String {
    format!("{:032x}", rand_u128())
}

fn rand_u128() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) as u128;
    (std::process::id() as u128) << 64 | n
}

#[tokio::test]
async fn capabilities_describe_the_storage_server() {
    let harness = Harness::start().await;
    let caps = CapabilitiesClient::new(harness.channel.clone())
        .get_capabilities(reapi::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert!(cache
        .digest_functions
        .contains(&(reapi::digest_function::Value::Sha256 as i32)));
    assert!(cache
        .digest_functions
        .contains(&(reapi::digest_function::Value::Blake3 as i32)));
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert!(cache.max_batch_total_size_bytes > 1 << 20);
    assert!(cache
        .supported_compressors
        .contains(&(reapi::compressor::Value::Zstd as i32)));
    let range = &cache.cache_priority_capabilities.unwrap().priorities[0];
    assert!(
        range.min_priority < 0 && range.max_priority > 0,
        "results_cache_policy priorities both ways: {range:?}"
    );
    let execution = caps
        .execution_capabilities
        .expect("execution is on by default");
    assert!(execution.exec_enabled);
    let sha256 = reapi::digest_function::Value::Sha256 as i32;
    assert_eq!(
        execution.digest_function, sha256,
        "Bazel 4 reads this field"
    );
    assert_eq!(execution.digest_functions, vec![sha256]);
    assert_eq!(caps.high_api_version.unwrap().minor, 3);
}

#[tokio::test]
async fn find_missing_reports_only_absent_blobs_and_never_the_empty_one() {
    let harness = Harness::start().await;
    harness.upload_batch(&[b"present"]).await;
    let missing = harness
        .missing(vec![digest(b"present"), digest(b"absent"), digest(b"")])
        .await;
    assert_eq!(missing, vec![digest(b"absent")]);

    let error = harness
        .cas()
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: vec![reapi::Digest {
                hash: "xyz".into(),
                size_bytes: 3,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("xyz"), "{}", error.message());
}

#[tokio::test]
async fn batch_update_verifies_each_blob_and_stores_nothing_wrong() {
    let harness = Harness::start().await;
    let good = b"good blob".to_vec();
    let mut lying = digest(b"claimed content");
    lying.size_bytes = 5;
    let response = harness
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![
                batch_update_blobs_request::Request {
                    digest: Some(digest(&good)),
                    data: good.clone(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(lying.clone()),
                    data: b"other".to_vec(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(digest(b"zz")),
                    data: b"zz".to_vec(),
                    compressor: 7,
                },
                batch_update_blobs_request::Request {
                    digest: Some(digest(b"compressed")),
                    data: zstd::bulk::compress(b"compressed", 3).unwrap(),
                    compressor: reapi::compressor::Value::Zstd as i32,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(
        codes,
        vec![
            0,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            0
        ]
    );
    let message = &response.responses[1].status.as_ref().unwrap().message;
    assert!(
        message.contains(&lying.hash) && message.contains("does not match"),
        "{message}"
    );
    assert!(response.responses[2]
        .status
        .as_ref()
        .unwrap()
        .message
        .contains("compressor 7"));
    assert_eq!(
        harness
            .missing(vec![lying.clone(), digest(b"zz")])
            .await
            .len(),
        2
    );
    assert!(harness
        .missing(vec![digest(&good), digest(b"compressed")])
        .await
        .is_empty());
}

#[tokio::test]
async fn zstd_bombs_are_refused_and_the_server_keeps_serving() {
    let harness = Harness::start().await;
    // 64 MiB of zeros: a few KiB compressed.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
    assert!(bomb.len() < 64 << 10);
    let item = |size: i64| batch_update_blobs_request::Request {
        digest: Some(reapi::Digest {
            hash: digest(b"not really").hash,
            size_bytes: size,
        }),
        data: bomb.clone(),
        compressor: reapi::compressor::Value::Zstd as i32,
    };
    // Declared small: decoding stops past the declared size.
    let response = harness
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![item(1024)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = response.responses[0].status.clone().unwrap();
    assert_eq!(status.code, Code::InvalidArgument as i32);
    assert!(
        status.message.contains("more than its declared 1024 bytes"),
        "{}",
        status.message
    );
    // Declared huge (a terabyte; and sizes whose sum wraps u64): refused
    // by the batch limit before anything is decoded or allocated.
    for sizes in [vec![1i64 << 40], vec![i64::MAX, i64::MAX, 4]] {
        let error = harness
            .cas()
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                requests: sizes.iter().map(|&size| item(size)).collect(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{sizes:?}");
        assert!(
            error.message().contains("max_batch_total_size_bytes"),
            "{}",
            error.message()
        );
    }
    let error = harness
        .cas()
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: vec![
                reapi::Digest {
                    hash: digest(b"a").hash,
                    size_bytes: i64::MAX,
                },
                reapi::Digest {
                    hash: digest(b"b").hash,
                    size_bytes: i64::MAX,
                },
                reapi::Digest {
                    hash: digest(b"c").hash,
                    size_bytes: 4,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    // Through ByteStream too: the stream decodes no further than declared.
    let name = format!(
        "uploads/{}/compressed-blobs/zstd/{}/1024",
        uuid(),
        digest(b"not really").hash
    );
    let error = harness
        .write(&name, vec![Bytes::from(bomb.clone())])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{}", error.message());
    // Still serving.
    let good = b"after the bombs".to_vec();
    harness
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest(&good)),
                data: good.clone(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(harness.missing(vec![digest(&good)]).await.is_empty());
}

#[tokio::test]
async fn batches_over_the_advertised_limit_are_rejected() {
    let harness = Harness::start().await;
    let big = vec![7u8; 3 << 20];
    let request = |data: &Vec<u8>| batch_update_blobs_request::Request {
        digest: Some(digest(data)),
        data: data.clone(),
        compressor: 0,
    };
    let error = harness
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![request(&big), request(&big)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("max_batch_total_size_bytes"),
        "{}",
        error.message()
    );

    let error = harness
        .cas()
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: vec![digest(&big), digest(&big)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn batch_read_returns_blobs_and_names_the_missing_ones() {
    let harness = Harness::start().await;
    harness.upload_batch(&[b"one", b"two"]).await;
    let response = harness
        .cas()
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: vec![digest(b"one"), digest(b"nope"), digest(b""), digest(b"two")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(i32, Vec<u8>)> = response
        .responses
        .iter()
        .map(|r| (r.status.as_ref().unwrap().code, r.data.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, b"one".to_vec()),
            (Code::NotFound as i32, vec![]),
            (0, vec![]),
            (0, b"two".to_vec())
        ]
    );
    assert!(response.responses[1]
        .status
        .as_ref()
        .unwrap()
        .message
        .contains(&digest(b"nope").hash));
}

#[tokio::test]
async fn bytestream_round_trips_large_blobs_with_ranges() {
    let harness = Harness::start().await;
    let data = pseudo_random(5 << 20, 11);
    let committed = harness
        .write(&upload_name(&data), chunks(&data, 64 * 1024))
        .await
        .unwrap();
    assert_eq!(committed, data.len() as i64);
    let name = blob_name(&data);
    assert_eq!(harness.read(&name, 0, 0).await.unwrap(), data.to_vec());
    assert_eq!(
        harness.read(&name, 1000, 5000).await.unwrap(),
        data[1000..6000].to_vec()
    );
    // Across the 1 MiB pieces a just-written blob is kept in.
    let from = (1 << 20) - 100;
    assert_eq!(
        harness.read(&name, from as i64, 3 << 20).await.unwrap(),
        data[from..from + (3 << 20)].to_vec()
    );
    assert_eq!(
        harness
            .read(&name, data.len() as i64 - 10, 0)
            .await
            .unwrap(),
        data[data.len() - 10..].to_vec()
    );
    // A second upload of the same blob completes at once.
    let again = harness
        .write(&upload_name(&data), chunks(&data, 1 << 20)[..1].to_vec())
        .await
        .unwrap();
    assert_eq!(again, data.len() as i64);
    // Instance names prefix resource names; the CAS is shared across them.
    assert_eq!(
        harness
            .read(&format!("some/instance/{name}"), 0, 10)
            .await
            .unwrap(),
        data[..10].to_vec()
    );
}

#[tokio::test]
async fn bytestream_rejects_bad_names_wrong_content_and_bad_offsets() {
    let harness = Harness::start().await;
    let error = harness.read("not-a-resource", 0, 0).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("not-a-resource"));

    let absent = pseudo_random(100, 3);
    let error = harness.read(&blob_name(&absent), 0, 0).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(
        error.message().contains(&digest(&absent).hash),
        "{}",
        error.message()
    );

    harness.upload_batch(&[b"0123456789"]).await;
    let error = harness
        .read(&blob_name(b"0123456789"), 11, 0)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::OutOfRange);
    assert!(
        error.message().contains("read_offset 11"),
        "{}",
        error.message()
    );

    for size in [1000usize, 3 << 20] {
        let data = pseudo_random(size, 5);
        let mut wrong = data.to_vec();
        wrong[size / 2] ^= 1;
        let name = upload_name(&data);
        let error = harness
            .write(&name, chunks(&Bytes::from(wrong), 256 * 1024))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(
            error.message().contains(&digest(&data).hash),
            "{}",
            error.message()
        );
        assert_eq!(
            harness.missing(vec![digest(&data)]).await.len(),
            1,
            "nothing stored"
        );

        let error = harness
            .write(&name, vec![data.slice(..size / 2)])
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
    }

    let data = pseudo_random(1000, 9);
    let error = harness
        .bytestream()
        .write(futures::stream::iter(vec![
            WriteRequest {
                resource_name: upload_name(&data),
                write_offset: 0,
                finish_write: false,
                data: data.slice(..10),
            },
            WriteRequest {
                resource_name: String::new(),
                write_offset: 500,
                finish_write: true,
                data: data.slice(10..),
            },
        ]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("write_offset 500"),
        "{}",
        error.message()
    );

    let error = harness
        .write(
            &format!(
                "uploads/{}/compressed-blobs/lz4/{}",
                uuid(),
                &blob_name(&data)[6..]
            ),
            vec![data.clone()],
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("lz4"));
}

#[tokio::test]
async fn read_offsets_outside_the_blob_are_out_of_range_and_negative_limits_invalid() {
    let harness = Harness::start().await;
    let data = b"0123456789";
    harness.upload_batch(&[data]).await;
    let name = blob_name(data);
    let hash = digest(data).hash;
    for offset in [-1, 11, i64::MAX] {
        let error = harness.read(&name, offset, 0).await.unwrap_err();
        assert_eq!(error.code(), Code::OutOfRange, "offset {offset}: {error:?}");
        assert!(
            error.message().contains(&format!("read_offset {offset}"))
                && error.message().contains(&hash),
            "{}",
            error.message()
        );
    }
    // The end of the blob is a valid offset that reads nothing.
    assert!(harness.read(&name, 10, 0).await.unwrap().is_empty());
    let error = harness.read(&name, 0, -1).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(
        error.message().contains("read_limit -1") && error.message().contains(&hash),
        "{}",
        error.message()
    );
}

#[tokio::test]
async fn an_upload_id_that_is_not_a_uuid_is_invalid_and_named() {
    let harness = Harness::start().await;
    let data = Bytes::from_static(b"uploaded under a bad id");
    for upload_id in ["not-a-uuid", "1234"] {
        let name = format!("uploads/{upload_id}/{}", blob_name(&data));
        let error = harness.write(&name, vec![data.clone()]).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(
            error
                .message()
                .contains(&format!("upload id {upload_id:?} is not a UUID")),
            "{}",
            error.message()
        );
        let error = harness
            .bytestream()
            .query_write_status(QueryWriteStatusRequest {
                resource_name: name,
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(error.message().contains(upload_id), "{}", error.message());
    }
    assert_eq!(harness.missing(vec![digest(&data)]).await.len(), 1);
    // Hyphenated, as Bazel sends it.
    let name = format!("uploads/{}/{}", uuid_hyphenated(), blob_name(&data));
    harness.write(&name, vec![data.clone()]).await.unwrap();
}

fn uuid_hyphenated() -> String {
    let simple = uuid();
    format!(
        "{}-{}-{}-{}-{}",
        &simple[..8],
        &simple[8..12],
        &simple[12..16],
        &simple[16..20],
        &simple[20..]
    )
}

#[tokio::test]
async fn a_write_stream_whose_resource_name_changes_is_invalid() {
    let harness = Harness::start().await;
    for size in [1000usize, 3 << 20] {
        let data = pseudo_random(size, 17);
        let other = pseudo_random(size, 19);
        let name = upload_name(&data);
        let half = size / 2;
        let request = |resource_name: String, at: usize, end: usize| WriteRequest {
            resource_name,
            write_offset: at as i64,
            finish_write: end == size,
            data: data.slice(at..end),
        };
        // Repeating the name is allowed; naming another resource is not.
        for later_name in [
            upload_name(&other),
            format!("uploads/{}/{}", uuid(), blob_name(&data)),
        ] {
            let error = harness
                .bytestream()
                .write(futures::stream::iter(vec![
                    request(name.clone(), 0, half / 2),
                    request(name.clone(), half / 2, half),
                    request(later_name.clone(), half, size),
                ]))
                .await
                .unwrap_err();
            assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
            assert!(
                error.message().contains(&later_name) && error.message().contains(&name),
                "{}",
                error.message()
            );
            assert_eq!(harness.missing(vec![digest(&data)]).await.len(), 1);
        }
        let committed = harness
            .bytestream()
            .write(futures::stream::iter(vec![
                request(name.clone(), 0, half),
                request(name.clone(), half, size),
            ]))
            .await
            .unwrap()
            .into_inner()
            .committed_size;
        assert_eq!(committed, size as i64);
    }
}

#[tokio::test]
async fn bytestream_speaks_zstd_both_ways() {
    let harness = Harness::start().await;
    for size in [5000usize, 3 << 20] {
        let data = Bytes::from(b"kiln ".repeat(size / 5));
        let d = digest(&data);
        let compressed = Bytes::from(zstd::bulk::compress(&data, 3).unwrap());
        let name = format!(
            "uploads/{}/compressed-blobs/zstd/{}/{}",
            uuid(),
            d.hash,
            d.size_bytes
        );
        assert_eq!(
            harness
                .write(&name, chunks(&compressed, 1000))
                .await
                .unwrap(),
            -1
        );
        let read = harness
            .read(
                &format!("compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes),
                0,
                0,
            )
            .await
            .unwrap();
        assert_eq!(zstd::stream::decode_all(&read[..]).unwrap(), data.to_vec());
        assert_eq!(
            harness.read(&blob_name(&data), 0, 0).await.unwrap(),
            data.to_vec()
        );
    }
}

#[tokio::test]
async fn interrupted_uploads_resume_from_the_committed_offset() {
    let harness = Harness::start().await;
    for size in [600 * 1024usize, 4 << 20] {
        let data = pseudo_random(size, size as u64);
        let name = upload_name(&data);
        let half = size / 2;
        // The client sends half and then the stream ends without finishing.
        let error = harness
            .bytestream()
            .write(futures::stream::iter(vec![WriteRequest {
                resource_name: name.clone(),
                write_offset: 0,
                finish_write: false,
                data: data.slice(..half),
            }]))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        let status = harness
            .bytestream()
            .query_write_status(QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (status.committed_size, status.complete),
            (half as i64, false)
        );
        let committed = harness
            .bytestream()
            .write(futures::stream::iter(vec![WriteRequest {
                resource_name: name.clone(),
                write_offset: half as i64,
                finish_write: true,
                data: data.slice(half..),
            }]))
            .await
            .unwrap()
            .into_inner()
            .committed_size;
        assert_eq!(committed, size as i64);
        assert_eq!(
            harness.read(&blob_name(&data), 0, 0).await.unwrap(),
            data.to_vec()
        );
        let status = harness
            .bytestream()
            .query_write_status(QueryWriteStatusRequest {
                resource_name: name,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(status.complete);
    }
}

#[tokio::test]
async fn query_write_status_of_an_upload_never_started_is_not_found() {
    let harness = Harness::start().await;
    let data = pseudo_random(1000, 13);
    let name = upload_name(&data);
    let error = harness
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    assert!(error.message().contains(&name), "{}", error.message());
    // Once the blob is stored, the same name reports it complete.
    harness.write(&name, vec![data.clone()]).await.unwrap();
    let status = harness
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.committed_size, status.complete),
        (data.len() as i64, true)
    );
}

#[tokio::test]
async fn a_client_gone_mid_upload_leaves_nothing_visible() {
    let harness = Harness::start().await;
    let data = pseudo_random(4 << 20, 41);
    let name = upload_name(&data);
    // The upload has a connection of its own, dropped with the call after
    // the first chunk has been handed to it.
    let channel = harness.server.as_ref().unwrap().connect().await.unwrap();
    let (handed_over, first_sent) = tokio::sync::oneshot::channel();
    let first = WriteRequest {
        resource_name: name.clone(),
        write_offset: 0,
        finish_write: false,
        data: data.slice(..1 << 20),
    };
    let requests = futures::stream::iter([first]).chain(futures::stream::once(async move {
        let _ = handed_over.send(());
        futures::future::pending::<WriteRequest>().await
    }));
    let upload = tokio::spawn(async move { ByteStreamClient::new(channel).write(requests).await });
    first_sent.await.unwrap();
    upload.abort();
    assert!(upload.await.unwrap_err().is_cancelled());
    assert_eq!(harness.missing(vec![digest(&data)]).await.len(), 1);
    // Sent again from the start, the blob is stored whole.
    assert_eq!(
        harness.write(&name, chunks(&data, 1 << 20)).await.unwrap(),
        data.len() as i64
    );
    assert!(harness.missing(vec![digest(&data)]).await.is_empty());
    assert_eq!(
        harness.read(&blob_name(&data), 0, 0).await.unwrap(),
        data.to_vec()
    );
}

#[tokio::test]
async fn a_bytestream_message_over_the_limit_is_refused() {
    let harness = Harness::start().await;
    // 20 MiB in one WriteRequest: over the server's 16 MiB message limit.
    let big = pseudo_random(20 << 20, 7);
    let error = harness
        .write(&upload_name(&big), vec![big.clone()])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(error.message().contains("limit"), "{}", error.message());
    assert_eq!(harness.missing(vec![digest(&big)]).await.len(), 1);
    let small = Bytes::from_static(b"still serving");
    harness
        .write(&upload_name(&small), vec![small.clone()])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_of_one_blob_all_succeed() {
    let harness = Harness::start().await;
    let data = pseudo_random(3 << 20, 77);
    let uploads =
        (0..6).map(|_| harness.write_owned(upload_name(&data), chunks(&data, 128 * 1024)));
    for result in futures::future::join_all(uploads).await {
        assert_eq!(result.unwrap(), data.len() as i64);
    }
    assert_eq!(
        harness.read(&blob_name(&data), 0, 0).await.unwrap(),
        data.to_vec()
    );
}

impl Harness {
    async fn write_owned(&self, name: String, chunks: Vec<Bytes>) -> Result<i64, tonic::Status> {
        self.write(&name, chunks).await
    }
}

fn output_file(path: &str, data: &[u8]) -> reapi::OutputFile {
    reapi::OutputFile {
        path: path.into(),
        digest: Some(digest(data)),
        is_executable: false,
        contents: vec![],
        node_properties: None,
    }
}

#[tokio::test]
async fn the_action_cache_serves_only_complete_results() {
    let harness = Harness::start().await;
    harness
        .upload_batch(&[b"output bytes", b"hello on stdout"])
        .await;
    let action = digest(b"an action");
    let result = reapi::ActionResult {
        output_files: vec![output_file("out/a.txt", b"output bytes")],
        stdout_digest: Some(digest(b"hello on stdout")),
        exit_code: 0,
        ..Default::default()
    };
    harness
        .action_cache()
        .update_action_result(reapi::UpdateActionResultRequest {
            instance_name: "main".into(),
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = harness
        .action_cache()
        .get_action_result(reapi::GetActionResultRequest {
            instance_name: "main".into(),
            action_digest: Some(action.clone()),
            inline_stdout: true,
            inline_output_files: vec!["out/a.txt".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stdout_raw, b"hello on stdout");
    assert_eq!(got.output_files[0].contents, b"output bytes");

    // Another instance name is another Action Cache.
    let error = harness
        .action_cache()
        .get_action_result(reapi::GetActionResultRequest {
            instance_name: "other".into(),
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(error.message().contains(&action.hash));

    // A result whose output is not in the CAS is a miss, never a hit.
    let broken_action = digest(b"another action");
    harness
        .action_cache()
        .update_action_result(reapi::UpdateActionResultRequest {
            instance_name: "main".into(),
            action_digest: Some(broken_action.clone()),
            action_result: Some(reapi::ActionResult {
                output_files: vec![output_file("gone", b"never uploaded")],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let error = harness
        .action_cache()
        .get_action_result(reapi::GetActionResultRequest {
            instance_name: "main".into(),
            action_digest: Some(broken_action),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);

    // Output directories: the tree and every file in it must be present.
    let file_in_tree = b"file inside a tree";
    let tree = reapi::Tree {
        root: Some(reapi::Directory {
            files: vec![reapi::FileNode {
                name: "f".into(),
                digest: Some(digest(file_in_tree)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    };
    let tree_bytes = tree.encode_to_vec();
    harness.upload_batch(&[&tree_bytes]).await;
    let tree_action = digest(b"tree action");
    harness
        .action_cache()
        .update_action_result(reapi::UpdateActionResultRequest {
            action_digest: Some(tree_action.clone()),
            action_result: Some(reapi::ActionResult {
                output_directories: vec![reapi::OutputDirectory {
                    path: "dir".into(),
                    tree_digest: Some(digest(&tree_bytes)),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let get = || {
        let mut client = harness.action_cache();
        let request = reapi::GetActionResultRequest {
            action_digest: Some(tree_action.clone()),
            ..Default::default()
        };
        async move { client.get_action_result(request).await }
    };
    assert_eq!(get().await.unwrap_err().code(), Code::NotFound);
    harness.upload_batch(&[file_in_tree]).await;
    assert!(get().await.is_ok());

    let error = harness
        .action_cache()
        .update_action_result(reapi::UpdateActionResultRequest {
            action_digest: Some(reapi::Digest {
                hash: "short".into(),
                size_bytes: 1,
            }),
            action_result: Some(reapi::ActionResult::default()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("short"));
}

#[tokio::test]
#[allow(deprecated)] // output_file_symlinks and output_directory_symlinks
async fn update_action_result_refuses_output_paths_that_are_not_normalized_and_relative() {
    let harness = Harness::start().await;
    let action = digest(b"an action with odd outputs");
    let update = async |result: reapi::ActionResult| {
        harness
            .action_cache()
            .update_action_result(reapi::UpdateActionResultRequest {
                action_digest: Some(action.clone()),
                action_result: Some(result),
                ..Default::default()
            })
            .await
    };
    let symlink = |path: &str| reapi::OutputSymlink {
        path: path.into(),
        target: "target".into(),
        ..Default::default()
    };
    let directory = |path: &str| reapi::OutputDirectory {
        path: path.into(),
        tree_digest: Some(digest(b"a tree")),
        ..Default::default()
    };
    let bad_paths = [
        "/etc/passwd",
        "../outside",
        "out/../../outside",
        "out/..",
        "out//a",
        "./out",
        "out/./a",
        "out/",
    ];
    for path in bad_paths {
        for (what, result) in [
            (
                "output file",
                reapi::ActionResult {
                    output_files: vec![output_file(path, b"x")],
                    ..Default::default()
                },
            ),
            (
                "output directory",
                reapi::ActionResult {
                    output_directories: vec![directory(path)],
                    ..Default::default()
                },
            ),
            (
                "output symlink",
                reapi::ActionResult {
                    output_symlinks: vec![symlink(path)],
                    ..Default::default()
                },
            ),
            (
                "output file symlink",
                reapi::ActionResult {
                    output_file_symlinks: vec![symlink(path)],
                    ..Default::default()
                },
            ),
            (
                "output directory symlink",
                reapi::ActionResult {
                    output_directory_symlinks: vec![symlink(path)],
                    ..Default::default()
                },
            ),
        ] {
            let error = update(result).await.unwrap_err();
            assert_eq!(error.code(), Code::InvalidArgument, "{what} {path:?}");
            assert!(
                error.message().contains(&format!("{what} path {path:?}"))
                    && error.message().contains(&action.hash),
                "{}",
                error.message()
            );
        }
    }
    let error = update(reapi::ActionResult {
        output_files: vec![output_file("", b"x")],
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("empty"), "{}", error.message());
    // Normalized relative paths are fine, and an output directory may be
    // the working directory itself; symlink targets are not output paths.
    update(reapi::ActionResult {
        output_files: vec![output_file("out/a.txt", b"x"), output_file("b..c", b"y")],
        output_directories: vec![directory(""), directory("gen/dir")],
        output_symlinks: vec![reapi::OutputSymlink {
            path: "out/link".into(),
            target: "../elsewhere/target".into(),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn get_tree_pages_through_a_directory_tree() {
    let harness = Harness::start().await;
    // root -> 5 children, each with a distinct file.
    let mut children = Vec::new();
    for i in 0..5 {
        let child = reapi::Directory {
            files: vec![reapi::FileNode {
                name: format!("f{i}"),
                digest: Some(digest(format!("content {i}").as_bytes())),
                ..Default::default()
            }],
            ..Default::default()
        };
        children.push(child.encode_to_vec());
    }
    let root = reapi::Directory {
        directories: children
            .iter()
            .enumerate()
            .map(|(i, c)| reapi::DirectoryNode {
                name: format!("d{i}"),
                digest: Some(digest(c)),
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut all: Vec<&[u8]> = children.iter().map(|c| c.as_slice()).collect();
    all.push(&root);
    harness.upload_batch(&all).await;

    let mut token = String::new();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let mut stream = harness
            .cas()
            .get_tree(reapi::GetTreeRequest {
                root_digest: Some(digest(&root)),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        pages += 1;
        seen.extend(first.directories);
        token = first.next_page_token;
        if token.is_empty() {
            break;
        }
        assert!(pages < 10, "paging must end");
    }
    assert_eq!(seen.len(), 6);
    assert_eq!(pages, 3);
    assert_eq!(seen[0].encode_to_vec(), root);
}

#[tokio::test]
async fn get_tree_of_a_missing_root_is_not_found_and_of_a_partial_tree_returns_what_is_there() {
    let harness = Harness::start().await;
    let absent_child = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "never uploaded".into(),
            digest: Some(digest(b"whatever")),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let root = reapi::Directory {
        directories: vec![reapi::DirectoryNode {
            name: "child".into(),
            digest: Some(digest(&absent_child)),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let get_tree = async |root: &[u8]| {
        let mut stream = harness
            .cas()
            .get_tree(reapi::GetTreeRequest {
                root_digest: Some(digest(root)),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut directories = Vec::new();
        while let Some(page) = stream.next().await {
            directories.extend(page?.directories);
        }
        Ok::<_, tonic::Status>(directories)
    };
    let error = get_tree(&root).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    assert!(
        error.message().contains(&digest(&root).hash),
        "{}",
        error.message()
    );
    // With the root stored, the missing child is left out.
    harness.upload_batch(&[&root]).await;
    let directories = get_tree(&root).await.unwrap();
    assert_eq!(directories.len(), 1);
    assert_eq!(directories[0].encode_to_vec(), root);
}

#[tokio::test]
async fn blobs_and_results_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(2 << 20, 4);
    let harness = Harness::start_in(dir.path(), |_| {}).await;
    harness.upload_batch(&[b"small and durable"]).await;
    harness
        .write(&upload_name(&data), chunks(&data, 1 << 20))
        .await
        .unwrap();
    harness.stop().await;

    let harness = Harness::start_in(dir.path(), |_| {}).await;
    assert!(harness
        .missing(vec![digest(b"small and durable"), digest(&data)])
        .await
        .is_empty());
    assert_eq!(
        harness.read(&blob_name(&data), 0, 0).await.unwrap(),
        data.to_vec()
    );
    harness.stop().await;
}

/// A data directory on a tiny tmpfs: writes must fail with
/// RESOURCE_EXHAUSTED and leave no partial blob behind.
#[tokio::test]
async fn a_full_disk_gives_resource_exhausted_and_no_partial_blob() {
    let dir = tempfile::tempdir().unwrap();
    let mount = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=3m",
            "kiln-test-full",
            dir.path().to_str().unwrap(),
        ])
        .output();
    match mount {
        Ok(out) if out.status.success() => {}
        other => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root and must be able to mount a tmpfs: {other:?}"
            );
            eprintln!("skipped: cannot mount a small tmpfs to fill ({other:?}); run as root");
            return;
        }
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());

    let harness = Harness::start_in(dir.path(), |config| {
        config.storage.memory_cache_size = Size(0);
    })
    .await;
    let big = pseudo_random(5 << 20, 99);
    let error = harness
        .write(&upload_name(&big), chunks(&big, 256 * 1024))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains(&digest(&big).hash),
        "{}",
        error.message()
    );
    assert_eq!(harness.missing(vec![digest(&big)]).await.len(), 1);
    let leftovers = std::fs::read_dir(dir.path().join("cas/tmp"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "the partial upload was removed");

    // Small blobs packed into segments fail the same way.
    let mut error = None;
    for i in 0..100u64 {
        let blob = pseudo_random(200 * 1024, i);
        if let Err(e) = harness.write(&upload_name(&blob), vec![blob.clone()]).await {
            assert_eq!(harness.missing(vec![digest(&blob)]).await.len(), 1);
            error = Some(e);
            break;
        }
    }
    let error = error.expect("a 3 MiB disk fills up");
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    harness.stop().await;
}

#[tokio::test]
async fn the_memory_backend_serves_the_same_api() {
    let dir = tempfile::tempdir().unwrap();
    let harness = Harness::start_in(dir.path(), |config| {
        config.storage.backend = Backend::Memory
    })
    .await;
    let data = pseudo_random(2 << 20, 8);
    harness
        .write(&upload_name(&data), chunks(&data, 1 << 20))
        .await
        .unwrap();
    assert_eq!(
        harness.read(&blob_name(&data), 0, 0).await.unwrap(),
        data.to_vec()
    );
    assert!(!dir.path().join("cas").exists(), "nothing on disk");
}

/// Sends raw bytes as a request message, to test what a malformed proto
/// does to the server.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}

#[tokio::test]
async fn a_malformed_proto_is_refused_and_the_server_keeps_serving() {
    let harness = Harness::start().await;
    let mut grpc = tonic::client::Grpc::new(harness.channel.clone());
    grpc.ready().await.unwrap();
    // Field 1 declared as a length-delimited string running past the end.
    let garbage = vec![0x0a, 0xff, 0xff, 0x03, 0x01];
    let error = grpc
        .unary(
            tonic::Request::new(garbage),
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
                .parse()
                .unwrap(),
            RawCodec,
        )
        .await
        .unwrap_err();
    // gRPC's status-code guide assigns INTERNAL to undecodable requests.
    assert_eq!(error.code(), Code::Internal, "{error:?}");
    assert!(error.message().contains("decode"), "{}", error.message());
    harness.upload_batch(&[b"still fine"]).await;
    assert!(harness
        .missing(vec![digest(b"still fine")])
        .await
        .is_empty());
}

#[tokio::test]
async fn a_request_over_the_message_limit_is_refused_before_it_is_buffered() {
    let harness = Harness::start().await;
    // 20 MiB in one message: over the server's 16 MiB gRPC message limit.
    let big = vec![1u8; 20 << 20];
    let error = harness
        .cas()
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest(&big)),
                data: big.clone(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    // gRPC's status-code guide: a message over the limit is
    // RESOURCE_EXHAUSTED (tonic's own check would say OUT_OF_RANGE).
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("BatchUpdateBlobs")
            && error
                .message()
                .contains(&format!("limit of {} bytes", 16 << 20)),
        "{}",
        error.message()
    );
    assert_eq!(harness.missing(vec![digest(&big)]).await.len(), 1);
    harness.upload_batch(&[b"still serving"]).await;
    // The same for every service, and for ByteStream calls tonic decodes.
    let error = harness
        .action_cache()
        .update_action_result(reapi::UpdateActionResultRequest {
            action_digest: Some(digest(b"a big result")),
            action_result: Some(reapi::ActionResult {
                stdout_raw: big.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("UpdateActionResult"),
        "{}",
        error.message()
    );
    let error = harness
        .bytestream()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: "x".repeat(20 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    let error = CapabilitiesClient::new(harness.channel.clone())
        .get_capabilities(reapi::GetCapabilitiesRequest {
            instance_name: "x".repeat(20 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
}

#[tokio::test]
async fn results_cache_policy_priority_keeps_a_result_and_its_outputs_longer() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 16 << 20;
    let harness = Harness::start_in(dir.path(), |config| {
        config.storage.max_size = Size(budget as u64);
    })
    .await;
    let blob_len = 512 << 10;
    let upload = async |seed: u64| {
        let data = pseudo_random(blob_len, seed);
        harness
            .write(&upload_name(&data), chunks(&data, 128 << 10))
            .await
            .unwrap();
        data
    };
    // Two results written together, each with one output; one asks for
    // the longest retention REAPI's priority can express here.
    let mut results = Vec::new();
    // (`pseudo_random` seeds: odd, as it sets the low bit.)
    for (seed, priority) in [(1, -64), (3, 0)] {
        let output = upload(seed).await;
        let action = digest(format!("action {seed}").as_bytes());
        harness
            .action_cache()
            .update_action_result(reapi::UpdateActionResultRequest {
                action_digest: Some(action.clone()),
                action_result: Some(reapi::ActionResult {
                    output_files: vec![output_file("out", &output)],
                    ..Default::default()
                }),
                results_cache_policy: Some(reapi::ResultsCachePolicy { priority }),
                ..Default::default()
            })
            .await
            .unwrap();
        results.push(action);
    }
    // Then one and a half store sizes of other blobs, none of them read
    // back (a read would count as a use).
    for seed in 0..(3 * budget / 2 / blob_len) as u64 {
        upload(1_001 + 2 * seed).await;
    }
    let lookup = async |action: &reapi::Digest| {
        harness
            .action_cache()
            .get_action_result(reapi::GetActionResultRequest {
                action_digest: Some(action.clone()),
                ..Default::default()
            })
            .await
    };
    assert_eq!(
        lookup(&results[1]).await.unwrap_err().code(),
        Code::NotFound,
        "the default-priority result was evicted"
    );
    let kept = lookup(&results[0])
        .await
        .expect("the retained result is a hit")
        .into_inner();
    let output = kept.output_files[0].digest.clone().unwrap();
    let name = format!("blobs/{}/{}", output.hash, output.size_bytes);
    assert_eq!(
        harness.read(&name, 0, 0).await.unwrap(),
        pseudo_random(blob_len, 1)
    );
    harness.stop().await;
}
