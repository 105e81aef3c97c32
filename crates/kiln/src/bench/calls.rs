//! Per-call cost of ByteStream on small blobs. Bazel 4 moves every blob,
//! however small, through one ByteStream call each, so the fixed cost of a
//! call matters as much as bulk throughput: measured one call at a time
//! (latency) and many at once (throughput).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use futures::StreamExt as _;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};

use super::data::SmallBlobSet;
use super::report::{human_bytes, Measurement};

/// Which way the blobs travel.
#[derive(Clone, Copy)]
pub enum Direction {
    Write,
    Read,
}

/// One ByteStream call for blob `index` of `set`; returns its latency.
async fn call(
    mut client: ByteStreamClient<super::Keyed>,
    set: SmallBlobSet,
    index: usize,
    direction: Direction,
    instance_name: &str,
    upload_id: &str,
) -> anyhow::Result<Duration> {
    let data = Bytes::from(set.contents(index));
    let digest = set.digest(index);
    let prefix = if instance_name.is_empty() {
        String::new()
    } else {
        format!("{instance_name}/")
    };
    let started = Instant::now();
    match direction {
        Direction::Write => {
            let name = format!(
                "{prefix}uploads/{upload_id}/blobs/{}/{}",
                digest.hash, digest.size_bytes
            );
            let request = WriteRequest {
                resource_name: name,
                write_offset: 0,
                finish_write: true,
                data,
            };
            let response = client
                .write(futures::stream::iter([request]))
                .await
                .with_context(|| format!("ByteStream Write of small blob {index}"))?;
            ensure!(response.into_inner().committed_size == digest.size_bytes);
        }
        Direction::Read => {
            let name = format!("{prefix}blobs/{}/{}", digest.hash, digest.size_bytes);
            let mut stream = client
                .read(ReadRequest {
                    resource_name: name,
                    read_offset: 0,
                    read_limit: 0,
                })
                .await
                .with_context(|| format!("ByteStream Read of small blob {index}"))?
                .into_inner();
            let mut received = Vec::new();
            while let Some(response) = stream.next().await {
                received.extend_from_slice(&response?.data);
            }
            ensure!(
                received == data,
                "ByteStream Read of small blob {index}: wrong content"
            );
        }
    }
    Ok(started.elapsed())
}

/// Runs `indices` with `in_flight` calls at a time and reports rate and
/// latency percentiles.
pub async fn measure(
    client: &ByteStreamClient<super::Keyed>,
    set: SmallBlobSet,
    indices: std::ops::Range<usize>,
    in_flight: usize,
    direction: Direction,
    instance_name: &str,
    upload_id: &str,
) -> anyhow::Result<Measurement> {
    let count = indices.len();
    let started = Instant::now();
    let mut latencies: Vec<Duration> = futures::stream::iter(indices)
        .map(|index| {
            call(
                client.clone(),
                set,
                index,
                direction,
                instance_name,
                upload_id,
            )
        })
        .buffer_unordered(in_flight.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let verb = match direction {
        Direction::Write => "Write",
        Direction::Read => "Read",
    };
    Ok(Measurement {
        operation: format!(
            "ByteStream {verb} ({}), {in_flight} in flight",
            human_bytes(set.size)
        ),
        count: count as u64,
        bytes: count as u64 * set.size,
        seconds,
        server_cpu_seconds: None,
        note: format!(
            "one call per blob; latency p50 {:.0} us, p99 {:.0} us",
            percentile(0.50),
            percentile(0.99)
        ),
    })
}
