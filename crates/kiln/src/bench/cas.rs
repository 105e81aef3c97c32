//! `kiln bench cas`: measures a running server's CAS path against this
//! machine's single-core SHA-256 rate, which bounds any server that verifies
//! what it stores. Large blobs go through ByteStream, many small ones through
//! the batch RPCs, all over one tuned HTTP/2 connection to a loopback server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use futures::{StreamExt as _, TryStreamExt as _};
use http_body::Frame;
use http_body_util::StreamBody;
use kiln_cas::bytestream_http::{
    framed_message, read_response_data, write_request_head, MessageReader,
};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteResponse};
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    batch_update_blobs_request, digest_function, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    Digest, FindMissingBlobsRequest, GetCapabilitiesRequest,
};
use kiln_store::DigestFunction;
use prost::Message as _;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::{Service as _, ServiceExt as _};

use super::calls;
use super::data::{mix, LargeBlob, SmallBlobSet};
use super::report::{human_bytes, process_cpu_seconds, Measurement, MemorySample, Report};

const WRITE_PATH: &str = "/google.bytestream.ByteStream/Write";
const READ_PATH: &str = "/google.bytestream.ByteStream/Read";

/// Used when the server advertises no batch limit (REAPI: 0 means "no limit";
/// gRPC's usual 4 MiB message cap applies anyway).
const DEFAULT_MAX_BATCH_BYTES: u64 = 4 << 20;
/// Bytes a batch entry costs beyond its payload (digest, field tags, lengths).
const BATCH_ENTRY_OVERHEAD: u64 = 128;
/// Room left in each batch for the request's own fields.
const BATCH_HEADER_ALLOWANCE: u64 = 1024;

/// Measure a running server's CAS throughput against this machine's SHA-256
/// rate. Sizes accept `B`, `KiB`, `MiB`, `GiB` (and `K`, `M`, `G`) suffixes.
#[derive(Debug, Clone, clap::Args)]
pub struct CasBenchArgs {
    /// Server to measure: `grpc://` (or `grpcs://` for TLS) and a loopback
    /// address. Loopback only, so the numbers are the server's and not the
    /// network's.
    #[arg(long, default_value = "grpc://127.0.0.1:1985")]
    pub server: String,

    /// How to verify a `grpcs://` server (and present a client certificate).
    #[command(flatten)]
    pub tls: kiln::tls::ClientTlsArgs,

    /// File with an API key to send on every call (a server with keys
    /// needs one with cache-read and cas-write).
    #[arg(long)]
    pub api_key_file: Option<std::path::PathBuf>,

    /// REAPI instance name.
    #[arg(long, default_value = "")]
    pub instance_name: String,

    /// Size of the large blob hashed, written and read back through
    /// ByteStream; 0 skips the large-blob phases.
    #[arg(long, default_value = "1GiB", value_parser = kiln::config::parse_size)]
    pub large_size: u64,

    /// ByteStream chunk size, for both writes and the local hash. Each chunk
    /// is one gRPC message, so it must stay under the server's message limit
    /// (commonly 4 MiB including framing).
    #[arg(long, default_value = "1MiB", value_parser = kiln::config::parse_size)]
    pub chunk_size: u64,

    /// Also SHA-256 the large blob as it is read back (caps the read at the
    /// hash rate); without it only the length is checked.
    #[arg(long)]
    pub verify_read_hash: bool,

    /// Sizes of the small blobs for the batch phases, one full round each.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096", value_parser = kiln::config::parse_size)]
    pub small_size: Vec<u64>,

    /// How many small blobs per size; 0 skips the batch phases.
    #[arg(long, default_value_t = 100_000)]
    pub small_count: usize,

    /// Batch RPCs in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,

    /// Digests per FindMissingBlobs request.
    #[arg(long, default_value_t = 10_000)]
    pub find_missing_batch: usize,

    /// HTTP/2 stream and connection flow-control window.
    #[arg(long, default_value = "32MiB", value_parser = kiln::config::parse_size)]
    pub window_size: u64,

    /// Server process to sample VmRSS/VmHWM and CPU time from, around each
    /// phase.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Seed for the blob contents; by default a fresh one each run so every
    /// blob is new to the server (an existing blob would be deduplicated).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Small blobs sent and fetched one ByteStream call each (the way Bazel 4
    /// moves every blob); 0 skips these phases.
    #[arg(long, default_value_t = 20_000)]
    pub bytestream_count: usize,

    /// Size of those blobs.
    #[arg(long, default_value = "1KiB", value_parser = kiln::config::parse_size)]
    pub bytestream_size: u64,

    /// ByteStream calls in flight at once for the throughput phases (the
    /// latency phases run one at a time).
    #[arg(long, default_value_t = 16)]
    pub bytestream_concurrency: usize,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs every phase, prints the report, and fails if any RPC failed or the
/// server gave a wrong answer (missing or corrupt blobs) along the way.
pub async fn run(args: CasBenchArgs) -> anyhow::Result<()> {
    ensure!(args.chunk_size > 0, "--chunk-size must be positive");
    ensure!(args.concurrency > 0, "--concurrency must be positive");
    ensure!(
        args.find_missing_batch > 0,
        "--find-missing-batch must be positive"
    );
    let seed = args.seed.unwrap_or_else(fresh_seed);
    let channel = connect(&args).await?;
    let bench = CasBench::new(args, channel, seed).await?;
    let report = bench.run_all().await;
    report.print(bench.args.json)
}

/// One HTTP/2 connection, with windows large enough that flow control never
/// throttles a loopback transfer.
async fn connect(args: &CasBenchArgs) -> anyhow::Result<Channel> {
    let window = u32::try_from(args.window_size)
        .ok()
        .filter(|window| *window < (1 << 31))
        .context("--window-size must be below 2 GiB")?;
    let endpoint = loopback_endpoint(&args.server, &args.tls)?
        .tcp_nodelay(true)
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .max_frame_size(1 << 20)
        .connect_timeout(Duration::from_secs(5));
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.server))
}

/// The endpoint of `grpc://127.0.0.1:1985` (or `grpcs://`, with `tls`),
/// refusing anything that is not loopback.
pub(super) fn loopback_endpoint(
    server: &str,
    tls: &kiln::tls::ClientTlsArgs,
) -> anyhow::Result<Endpoint> {
    let rest = ["grpc://", "http://", "grpcs://", "https://"]
        .iter()
        .find_map(|scheme| server.strip_prefix(scheme))
        .with_context(|| {
            format!("--server {server}: expected grpc://HOST:PORT or grpcs://HOST:PORT")
        })?;
    let authority = rest.trim_end_matches('/');
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback());
    ensure!(
        loopback,
        "--server {server}: the benchmark only targets loopback addresses, \
         so it measures the server and not the network"
    );
    kiln::tls::endpoint(server, tls).with_context(|| format!("--server {server}"))
}

/// A seed no earlier run has used: the OS-keyed `RandomState`, the clock and
/// the pid, mixed.
pub(super) fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(now);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Splits `count` entries of `entry_bytes` each into consecutive batches whose
/// total stays within `budget`.
fn plan_batches(count: usize, entry_bytes: u64, budget: u64) -> anyhow::Result<Vec<Range<usize>>> {
    let usable = budget.saturating_sub(BATCH_HEADER_ALLOWANCE);
    let per_batch = usable / entry_bytes.max(1);
    ensure!(
        per_batch > 0,
        "a batch entry of {entry_bytes} bytes does not fit the server's batch limit of \
         {budget} bytes"
    );
    let per_batch = usize::try_from(per_batch).unwrap_or(usize::MAX);
    Ok((0..count)
        .step_by(per_batch)
        .map(|start| start..count.min(start + per_batch))
        .collect())
}

/// The connection, the server's limits and the report being filled in.
struct CasBench {
    args: CasBenchArgs,
    seed: u64,
    byte_stream: ByteStreamClient<super::Keyed>,
    cas: ContentAddressableStorageClient<super::Keyed>,
    key: super::WithApiKey,
    /// For the large-blob calls, framed without tonic's copies.
    channel: Channel,
    message_limit: usize,
    max_batch_bytes: u64,
}

impl CasBench {
    async fn new(args: CasBenchArgs, channel: Channel, seed: u64) -> anyhow::Result<Self> {
        let key = super::WithApiKey::read(args.api_key_file.as_deref())?;
        let capabilities = CapabilitiesClient::with_interceptor(channel.clone(), key.clone())
            .get_capabilities(GetCapabilitiesRequest {
                instance_name: args.instance_name.clone(),
            })
            .await
            .with_context(|| format!("GetCapabilities on {}", args.server))?
            .into_inner();
        let cache = capabilities
            .cache_capabilities
            .context("the server advertises no cache capabilities")?;
        let max_batch_bytes = match u64::try_from(cache.max_batch_total_size_bytes) {
            Ok(0) | Err(_) => DEFAULT_MAX_BATCH_BYTES,
            Ok(limit) => limit,
        };
        // Responses carry a whole batch; leave headroom over the advertised
        // limit so a server that fills it exactly is not rejected here.
        let message_limit = usize::try_from(max_batch_bytes.max(args.chunk_size))
            .unwrap_or(usize::MAX)
            .saturating_mul(2)
            .saturating_add(16 << 20);
        let byte_stream = ByteStreamClient::with_interceptor(channel.clone(), key.clone())
            .max_decoding_message_size(message_limit)
            .max_encoding_message_size(message_limit);
        let cas = ContentAddressableStorageClient::with_interceptor(channel.clone(), key.clone())
            .max_decoding_message_size(message_limit)
            .max_encoding_message_size(message_limit);
        Ok(Self {
            args,
            seed,
            byte_stream,
            cas,
            key,
            channel,
            message_limit,
            max_batch_bytes,
        })
    }

    async fn run_all(&self) -> Report {
        let mut report = Report {
            server_pid: self.args.server_pid,
            ..Report::default()
        };
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("model name"))
                    .map(|value| value.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cpus = std::thread::available_parallelism().map_or(0, |count| count.get());
        report.context = vec![
            ("server".into(), self.args.server.clone()),
            ("instance".into(), format!("{:?}", self.args.instance_name)),
            ("cpu".into(), format!("{cpu_model} ({cpus} cpus)")),
            ("seed".into(), self.seed.to_string()),
            (
                "chunk size".into(),
                human_bytes(self.args.chunk_size).to_string(),
            ),
            (
                "max batch".into(),
                format!(
                    "{} (from GetCapabilities)",
                    human_bytes(self.max_batch_bytes)
                ),
            ),
            ("concurrency".into(), self.args.concurrency.to_string()),
        ];
        self.sample_memory(&mut report, "start");

        // A failed RPC ends the phases that depend on it, not the run: the
        // numbers measured so far are still worth printing.
        if self.args.large_size > 0 {
            if let Err(error) = self.large_blob_phases(&mut report).await {
                report.problems.push(format!("{error:#}"));
            }
        }
        if self.args.small_count > 0 {
            for &size in &self.args.small_size {
                if let Err(error) = self.small_blob_phases(&mut report, size).await {
                    report.problems.push(format!("{error:#}"));
                }
            }
        }
        if self.args.bytestream_count > 0 {
            if let Err(error) = self.bytestream_call_phases(&mut report).await {
                report.problems.push(format!("{error:#}"));
            }
        }
        self.sample_memory(&mut report, "end");
        report
    }

    /// Small blobs, one ByteStream call each: the first tenth one call at a
    /// time (latency), the rest many at once (throughput); then read back.
    async fn bytestream_call_phases(&self, report: &mut Report) -> anyhow::Result<()> {
        let set = SmallBlobSet {
            seed: mix(self.seed ^ 0xB17E),
            size: self.args.bytestream_size,
            count: self.args.bytestream_count,
        };
        let sequential = 0..(set.count / 10).max(1).min(set.count);
        let concurrent = sequential.end..set.count;
        let upload_id = upload_id(set.seed);
        let instance = &self.args.instance_name;
        for direction in [calls::Direction::Write, calls::Direction::Read] {
            for (range, in_flight) in [
                (sequential.clone(), 1),
                (concurrent.clone(), self.args.bytestream_concurrency),
            ] {
                if range.is_empty() {
                    continue;
                }
                progress(format!(
                    "ByteStream calls: {} blobs, {in_flight} in flight",
                    range.len()
                ));
                let cpu = self.server_cpu();
                let mut measurement = calls::measure(
                    &self.byte_stream,
                    set,
                    range,
                    in_flight,
                    direction,
                    instance,
                    &upload_id,
                )
                .await?;
                measurement.server_cpu_seconds = cpu.since();
                report.measurements.push(measurement);
            }
        }
        Ok(())
    }

    fn server_cpu(&self) -> CpuClock {
        CpuClock::start(self.args.server_pid)
    }

    fn sample_memory(&self, report: &mut Report, label: &str) {
        let Some(pid) = self.args.server_pid else {
            return;
        };
        match MemorySample::read(pid, label) {
            Ok(sample) => report.memory.push(sample),
            Err(error) => report
                .problems
                .push(format!("server memory at {label}: {error:#}")),
        }
    }

    /// SHA-256 ceiling, then ByteStream Write and Read of the same blob.
    async fn large_blob_phases(&self, report: &mut Report) -> anyhow::Result<()> {
        let blob = LargeBlob::new(mix(self.seed), self.args.large_size, self.args.chunk_size);
        progress(format!("hashing {} locally", human_bytes(blob.size)));
        let to_hash = blob.clone();
        let (digest, generate, hash) =
            tokio::task::spawn_blocking(move || hash_large_blob(to_hash))
                .await
                .context("hashing task panicked")?;
        // Hashing runs on one thread: its seconds are core-seconds.
        let gib = blob.size as f64 / (1u64 << 30) as f64;
        let hash_core_seconds_per_gib = hash.seconds / gib;
        report.measurements.push(generate);
        report.measurements.push(hash);

        self.sample_memory(report, "before ByteStream write");
        progress(format!("ByteStream write of {}", digest_name(&digest)));
        let cpu = self.server_cpu();
        let mut write = self.write_large_blob(blob, &digest).await?;
        write.server_cpu_seconds = cpu.since();
        // The upload's cost as the server's CPU per GiB verified: unlike a
        // throughput ratio it does not depend on the client sharing the
        // cores.
        let upload = match write.server_cpu_seconds {
            Some(cpu) => format!(
                "{:.2} core-s of server CPU per GiB verified (SHA-256 alone here: {:.2})",
                cpu / gib,
                hash_core_seconds_per_gib
            ),
            None => "not measured: give --server-pid".to_string(),
        };
        report.context.push(("upload cpu".into(), upload));
        if let Some(cpu) = write.server_cpu_seconds {
            write.note = format!(
                "{:.2} core-s/GiB{}{}",
                cpu / gib,
                if write.note.is_empty() { "" } else { "; " },
                write.note
            );
        }
        report.measurements.push(write);
        self.sample_memory(report, "after ByteStream write");

        progress(format!("ByteStream read of {}", digest_name(&digest)));
        let cpu = self.server_cpu();
        let (mut read, problem) = self.read_large_blob(&digest).await?;
        read.server_cpu_seconds = cpu.since();
        report.measurements.push(read);
        report.problems.extend(problem);
        self.sample_memory(report, "after ByteStream read");
        Ok(())
    }

    async fn write_large_blob(
        &self,
        blob: LargeBlob,
        digest: &Digest,
    ) -> anyhow::Result<Measurement> {
        let resource_name = resource_path(
            &self.args.instance_name,
            &format!(
                "uploads/{}/blobs/{}/{}",
                upload_id(blob.seed),
                digest.hash,
                digest.size_bytes
            ),
        );
        let sent = Arc::new(AtomicU64::new(0));
        let sent_by_stream = Arc::clone(&sent);
        // Chunks are zero-copy slices of the blob's pattern, each sent after
        // its request's few header bytes as a body frame of its own, so
        // neither tonic's encoder nor anything else copies them; the stream
        // is pulled by the connection, so only the chunks in flight are
        // resident.
        let (chunk_size, size, chunk_count) = (blob.chunk_size, blob.size, blob.chunk_count());
        let frames = futures::stream::iter(0..blob.chunk_count()).flat_map(move |index| {
            let data = blob.chunk(index);
            let offset = index * chunk_size;
            let length = data.len() as u64;
            sent_by_stream.fetch_add(length, Ordering::Relaxed);
            let name = if index == 0 { &resource_name[..] } else { "" };
            let head = write_request_head(name, offset as i64, offset + length == size, data.len());
            futures::stream::iter([head, data].map(|bytes| Ok::<_, Infallible>(Frame::data(bytes))))
        });
        let started = Instant::now();
        let call = || format!("ByteStream Write of {}", digest_name(digest));
        let mut messages = self
            .call_raw(WRITE_PATH, Body::new(StreamBody::new(frames)))
            .await
            .with_context(call)?;
        let response = match messages.next().await.with_context(call)? {
            Some(message) => WriteResponse::decode(message).with_context(call)?,
            None => bail!("{}: {}", call(), messages.trailers_status()),
        };
        while messages.next().await.with_context(call)?.is_some() {}
        let status = messages.trailers_status();
        ensure!(status.code() == tonic::Code::Ok, "{}: {status}", call());
        let seconds = started.elapsed().as_secs_f64();
        ensure!(
            response.committed_size == digest.size_bytes,
            "ByteStream Write of {}: committed_size {} instead of {}",
            digest_name(digest),
            response.committed_size,
            digest.size_bytes
        );
        let sent = sent.load(Ordering::Relaxed);
        let note = if sent < size {
            format!(
                "server answered after {} of {}: blob already stored? rate is not a transfer",
                human_bytes(sent),
                human_bytes(size)
            )
        } else {
            String::new()
        };
        Ok(Measurement {
            operation: "ByteStream Write (large blob)".into(),
            count: chunk_count,
            bytes: size,
            seconds,
            note,
            server_cpu_seconds: None,
        })
    }

    /// Starts a gRPC call whose request body is `body` (framed by the
    /// caller) and returns its response messages; a trailers-only response
    /// is the call's failure.
    async fn call_raw(&self, path: &str, body: Body) -> anyhow::Result<MessageReader> {
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(body)?;
        self.key.add_to(request.headers_mut());
        let mut channel = self.channel.clone();
        let response = channel.ready().await?.call(request).await?;
        ensure!(
            response.status() == http::StatusCode::OK,
            "HTTP status {}",
            response.status()
        );
        if let Some(status) = tonic::Status::from_header_map(response.headers()) {
            bail!("{status}");
        }
        Ok(MessageReader::new(response.into_body(), self.message_limit))
    }

    /// Reads the blob back; a wrong length or hash is a problem to report, not
    /// a reason to stop the run.
    async fn read_large_blob(
        &self,
        digest: &Digest,
    ) -> anyhow::Result<(Measurement, Option<String>)> {
        let resource_name = resource_path(
            &self.args.instance_name,
            &format!("blobs/{}/{}", digest.hash, digest.size_bytes),
        );
        // Hashing runs on the blocking pool behind a bounded queue, so it
        // overlaps the transfer and a slow hash back-pressures the stream.
        let (hash_sender, hasher) = if self.args.verify_read_hash {
            let (sender, mut receiver) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
            let hasher = tokio::task::spawn_blocking(move || {
                let mut hasher = DigestFunction::Sha256.hasher();
                let mut size = 0;
                while let Some(data) = receiver.blocking_recv() {
                    hasher.update(&data);
                    size += data.len() as u64;
                }
                hasher.finish(size).hash_hex()
            });
            (Some(sender), Some(hasher))
        } else {
            (None, None)
        };

        let started = Instant::now();
        let call = || format!("ByteStream Read of {}", digest_name(digest));
        // Responses are read as slices of the frames they arrive in, not
        // copied into tonic's decode buffer first.
        let request = framed_message(&ReadRequest {
            resource_name,
            read_offset: 0,
            read_limit: 0,
        });
        let body = StreamBody::new(futures::stream::iter([Ok::<_, Infallible>(Frame::data(
            request,
        ))]));
        let mut stream = self
            .call_raw(READ_PATH, Body::new(body))
            .await
            .with_context(call)?;
        let mut received = 0u64;
        let mut messages = 0u64;
        while let Some(message) = stream.next().await.with_context(call)? {
            messages += 1;
            for data in read_response_data(message).with_context(call)? {
                received += data.len() as u64;
                if let Some(sender) = &hash_sender {
                    sender
                        .send(data)
                        .await
                        .context("read-back hasher stopped")?;
                }
            }
        }
        let status = stream.trailers_status();
        ensure!(status.code() == tonic::Code::Ok, "{}: {status}", call());
        drop(hash_sender);
        let hash = match hasher {
            Some(hasher) => Some(hasher.await.context("read-back hasher panicked")?),
            None => None,
        };
        let seconds = started.elapsed().as_secs_f64();

        let expected = digest.size_bytes as u64;
        let mut problem = None;
        let mut note = format!("{messages} messages; length verified");
        if received != expected {
            problem = Some(format!(
                "ByteStream Read of {}: got {received} bytes",
                digest_name(digest)
            ));
            note = format!("{messages} messages; WRONG LENGTH");
        } else if let Some(hash) = hash {
            if hash == digest.hash {
                note.push_str(" and sha256 verified");
            } else {
                problem = Some(format!(
                    "ByteStream Read of {}: content hashes to {hash}",
                    digest_name(digest)
                ));
                note = format!("{messages} messages; WRONG HASH");
            }
        }
        Ok((
            Measurement {
                operation: "ByteStream Read (large blob)".into(),
                count: messages,
                bytes: received,
                seconds,
                note,
                server_cpu_seconds: None,
            },
            problem,
        ))
    }

    /// BatchUpdateBlobs, FindMissingBlobs and BatchReadBlobs over a fresh set
    /// of `small_count` blobs of `size` bytes.
    async fn small_blob_phases(&self, report: &mut Report, size: u64) -> anyhow::Result<()> {
        let set = SmallBlobSet {
            seed: mix(self.seed ^ 0x5EED),
            size,
            count: self.args.small_count,
        };
        let label = human_bytes(size);
        progress(format!("hashing {} blobs of {label} locally", set.count));
        let started = Instant::now();
        let digests = tokio::task::spawn_blocking(move || {
            (0..set.count).map(|i| set.digest(i)).collect::<Vec<_>>()
        })
        .await
        .context("hashing task panicked")?;
        report.measurements.push(Measurement {
            operation: format!("local generate+sha256 ({label})"),
            count: set.count as u64,
            bytes: set.count as u64 * size,
            seconds: started.elapsed().as_secs_f64(),
            server_cpu_seconds: None,
            note: "client cost, not the server's".into(),
        });
        let digests = Arc::new(digests);
        let batches = plan_batches(set.count, size + BATCH_ENTRY_OVERHEAD, self.max_batch_bytes)?;

        progress(format!(
            "BatchUpdateBlobs of {} blobs of {label}",
            set.count
        ));
        self.sample_memory(report, &format!("before BatchUpdate ({label})"));
        let cpu = self.server_cpu();
        let mut update = self.batch_update(set, &digests, &batches).await?;
        update.server_cpu_seconds = cpu.since();
        report.measurements.push(update);
        self.sample_memory(report, &format!("after BatchUpdate ({label})"));

        progress(format!("FindMissingBlobs of {} digests", set.count));
        let cpu = self.server_cpu();
        let (mut find, missing) = self.find_missing(&digests, &label).await?;
        find.server_cpu_seconds = cpu.since();
        report.measurements.push(find);
        if missing > 0 {
            report.problems.push(format!(
                "FindMissingBlobs reported {missing} of {} just-uploaded {label} blobs missing",
                set.count
            ));
        }

        progress(format!("BatchReadBlobs of {} blobs of {label}", set.count));
        let cpu = self.server_cpu();
        let (mut read, wrong) = self.batch_read(set, &digests, &batches).await?;
        read.server_cpu_seconds = cpu.since();
        report.measurements.push(read);
        report.problems.extend(wrong);
        self.sample_memory(report, &format!("after BatchRead ({label})"));
        Ok(())
    }

    async fn batch_update(
        &self,
        set: SmallBlobSet,
        digests: &Arc<Vec<Digest>>,
        batches: &[Range<usize>],
    ) -> anyhow::Result<Measurement> {
        let started = Instant::now();
        futures::stream::iter(batches.iter().cloned())
            .map(|range| {
                let mut cas = self.cas.clone();
                let digests = Arc::clone(digests);
                let instance_name = self.args.instance_name.clone();
                async move {
                    let build_digests = Arc::clone(&digests);
                    let build_range = range.clone();
                    let requests = tokio::task::spawn_blocking(move || {
                        build_range
                            .map(|index| batch_update_blobs_request::Request {
                                digest: Some(build_digests[index].clone()),
                                data: set.contents(index),
                                compressor: 0,
                            })
                            .collect::<Vec<_>>()
                    })
                    .await
                    .context("building a batch panicked")?;
                    let response = cas
                        .batch_update_blobs(BatchUpdateBlobsRequest {
                            instance_name,
                            requests,
                            digest_function: digest_function::Value::Sha256 as i32,
                        })
                        .await
                        .with_context(|| {
                            format!("BatchUpdateBlobs of blobs {}..{}", range.start, range.end)
                        })?
                        .into_inner();
                    ensure!(
                        response.responses.len() == range.len(),
                        "BatchUpdateBlobs of blobs {}..{}: {} responses for {} blobs",
                        range.start,
                        range.end,
                        response.responses.len(),
                        range.len()
                    );
                    for entry in response.responses {
                        let status = entry.status.unwrap_or_default();
                        if status.code != 0 {
                            bail!(
                                "BatchUpdateBlobs: {} failed with code {}: {}",
                                entry
                                    .digest
                                    .as_ref()
                                    .map_or_else(|| "(no digest)".to_owned(), digest_name),
                                status.code,
                                status.message
                            );
                        }
                    }
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(self.args.concurrency)
            .try_collect::<()>()
            .await?;
        Ok(Measurement {
            operation: format!("BatchUpdateBlobs ({})", human_bytes(set.size)),
            count: set.count as u64,
            bytes: set.count as u64 * set.size,
            seconds: started.elapsed().as_secs_f64(),
            server_cpu_seconds: None,
            note: format!("{} batches", batches.len()),
        })
    }

    /// Returns the measurement and how many digests the server called missing.
    async fn find_missing(
        &self,
        digests: &Arc<Vec<Digest>>,
        label: &str,
    ) -> anyhow::Result<(Measurement, usize)> {
        let batch = self.args.find_missing_batch;
        let started = Instant::now();
        let missing = futures::stream::iter((0..digests.len()).step_by(batch))
            .map(|start| {
                let mut cas = self.cas.clone();
                let range = start..digests.len().min(start + batch);
                let blob_digests = digests[range.clone()].to_vec();
                let instance_name = self.args.instance_name.clone();
                async move {
                    let response = cas
                        .find_missing_blobs(FindMissingBlobsRequest {
                            instance_name,
                            blob_digests,
                            digest_function: digest_function::Value::Sha256 as i32,
                        })
                        .await
                        .with_context(|| {
                            format!("FindMissingBlobs of digests {}..{}", range.start, range.end)
                        })?;
                    anyhow::Ok(response.into_inner().missing_blob_digests.len())
                }
            })
            .buffer_unordered(self.args.concurrency)
            .try_fold(0, |total, missing| async move { Ok(total + missing) })
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        Ok((
            Measurement {
                operation: format!("FindMissingBlobs ({label})"),
                count: digests.len() as u64,
                bytes: 0,
                seconds,
                server_cpu_seconds: None,
                note: format!(
                    "{} per request; {missing} missing",
                    batch.min(digests.len())
                ),
            },
            missing,
        ))
    }

    /// Returns the measurement and one problem per batch with wrong answers.
    async fn batch_read(
        &self,
        set: SmallBlobSet,
        digests: &Arc<Vec<Digest>>,
        batches: &[Range<usize>],
    ) -> anyhow::Result<(Measurement, Vec<String>)> {
        let started = Instant::now();
        let problems: Vec<String> = futures::stream::iter(batches.iter().cloned())
            .map(|range| {
                let mut cas = self.cas.clone();
                let digests = Arc::clone(digests);
                let instance_name = self.args.instance_name.clone();
                async move {
                    let response = cas
                        .batch_read_blobs(BatchReadBlobsRequest {
                            instance_name,
                            digests: digests[range.clone()].to_vec(),
                            acceptable_compressors: Vec::new(),
                            digest_function: digest_function::Value::Sha256 as i32,
                        })
                        .await
                        .with_context(|| {
                            format!("BatchReadBlobs of blobs {}..{}", range.start, range.end)
                        })?
                        .into_inner();
                    tokio::task::spawn_blocking(move || {
                        verify_batch_read(set, &digests, range, response.responses)
                    })
                    .await
                    .context("verifying a batch panicked")
                }
            })
            .buffer_unordered(self.args.concurrency)
            .try_filter_map(|problem| async move { Ok(problem) })
            .try_collect()
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        let note = if problems.is_empty() {
            format!("{} batches; contents verified", batches.len())
        } else {
            format!("{} batches; {} WRONG", batches.len(), problems.len())
        };
        Ok((
            Measurement {
                operation: format!("BatchReadBlobs ({})", human_bytes(set.size)),
                count: set.count as u64,
                bytes: set.count as u64 * set.size,
                seconds,
                server_cpu_seconds: None,
                note,
            },
            problems,
        ))
    }
}

/// The server's CPU time at the start of a phase, if its pid is known.
struct CpuClock {
    pid: Option<u32>,
    started: Option<f64>,
}

impl CpuClock {
    fn start(pid: Option<u32>) -> Self {
        Self {
            pid,
            started: pid.and_then(process_cpu_seconds),
        }
    }

    /// Server CPU seconds used since `start`.
    fn since(&self) -> Option<f64> {
        Some(process_cpu_seconds(self.pid?)? - self.started?)
    }
}

/// Checks that every blob of `range` came back with an OK status and exactly
/// the bytes that were uploaded; returns a summary of what did not.
fn verify_batch_read(
    set: SmallBlobSet,
    digests: &[Digest],
    range: Range<usize>,
    responses: Vec<kiln_proto::reapi::batch_read_blobs_response::Response>,
) -> Option<String> {
    let mut by_hash: HashMap<String, (i32, String, Vec<u8>)> = responses
        .into_iter()
        .filter_map(|entry| {
            let status = entry.status.unwrap_or_default();
            Some((
                entry.digest?.hash,
                (status.code, status.message, entry.data),
            ))
        })
        .collect();
    let mut wrong = 0usize;
    let mut first = None;
    for index in range.clone() {
        let digest = &digests[index];
        let verdict = match by_hash.remove(&digest.hash) {
            None => Some("no response".to_owned()),
            Some((0, _, data)) if data == set.contents(index) => None,
            Some((0, _, data)) => Some(format!("wrong contents ({} bytes)", data.len())),
            Some((code, message, _)) => Some(format!("code {code}: {message}")),
        };
        if let Some(verdict) = verdict {
            wrong += 1;
            first.get_or_insert_with(|| format!("{}: {verdict}", digest_name(digest)));
        }
    }
    first.map(|first| {
        format!(
            "BatchReadBlobs of blobs {}..{}: {wrong} wrong, first {first}",
            range.start, range.end
        )
    })
}

/// Generates the blob once, timing generation and SHA-256 separately so the
/// hash rate is the hash alone.
fn hash_large_blob(blob: LargeBlob) -> (Digest, Measurement, Measurement) {
    let mut hasher = DigestFunction::Sha256.hasher();
    let mut generating = Duration::ZERO;
    let mut hashing = Duration::ZERO;
    for index in 0..blob.chunk_count() {
        let started = Instant::now();
        let chunk = blob.chunk(index);
        let generated = Instant::now();
        hasher.update(&chunk);
        hashing += generated.elapsed();
        generating += generated - started;
    }
    let digest = kiln_cas::wire::to_wire(&hasher.finish(blob.size));
    let measure = |operation: &str, elapsed: Duration, note: &str| Measurement {
        operation: operation.into(),
        count: blob.chunk_count(),
        bytes: blob.size,
        seconds: elapsed.as_secs_f64(),
        note: note.into(),
        server_cpu_seconds: None,
    };
    (
        digest,
        measure(
            "local generate (pattern slices)",
            generating,
            "must be far above the rates below",
        ),
        measure(
            "local sha256 (1 core)",
            hashing,
            "ceiling for verified uploads",
        ),
    )
}

fn resource_path(instance_name: &str, path: &str) -> String {
    if instance_name.is_empty() {
        path.to_owned()
    } else {
        format!("{instance_name}/{path}")
    }
}

/// A UUID-shaped upload id derived from the blob's seed.
fn upload_id(seed: u64) -> String {
    let high = mix(seed ^ 0xA11CE);
    let low = mix(high);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xFFFF,
        high & 0x0FFF,
        (low >> 48) & 0x3FFF | 0x8000,
        low & 0xFFFF_FFFF_FFFF
    )
}

fn digest_name(digest: &Digest) -> String {
    format!("{}/{}", digest.hash, digest.size_bytes)
}

fn progress(message: String) {
    eprintln!("kiln bench cas: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_budget() {
        let batches = plan_batches(10, 1000, 4000 + BATCH_HEADER_ALLOWANCE).unwrap();
        assert_eq!(batches, vec![0..4, 4..8, 8..10]);
        assert!(plan_batches(10, 5000, 4096).is_err());
    }

    #[test]
    fn only_loopback_servers() {
        let plain = kiln::tls::ClientTlsArgs::default();
        assert_eq!(
            loopback_endpoint("grpc://127.0.0.1:1985", &plain)
                .unwrap()
                .uri()
                .to_string(),
            "http://127.0.0.1:1985/"
        );
        assert!(loopback_endpoint("grpc://[::1]:1985", &plain).is_ok());
        assert!(loopback_endpoint("grpc://localhost:1985", &plain).is_ok());
        assert!(loopback_endpoint("grpc://10.0.0.1:1985", &plain).is_err());
        assert!(loopback_endpoint("grpcs://10.0.0.1:1985", &plain).is_err());
        assert_eq!(
            loopback_endpoint("grpcs://127.0.0.1:1985", &plain)
                .unwrap()
                .uri()
                .scheme_str(),
            Some("https")
        );
    }

    #[test]
    fn upload_ids_look_like_uuids() {
        let id = upload_id(42);
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(upload_id(42), upload_id(43));
    }
}
