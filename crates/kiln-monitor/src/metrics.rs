//! [`Metrics`]: every Prometheus metric Kiln exports, in one registry.
//!
//! Two kinds, kept apart so the hot paths stay cheap:
//! - **event metrics** (RPCs, executions, phase times) are observed as
//!   they happen, into `prometheus-client` families whose labels are all
//!   bounded enums or names from fixed lists;
//! - **state metrics** (CAS and store counters, queues, executors,
//!   capacity, disk free) are read from the components' own counters and
//!   snapshots only when `/metrics` is scraped ([`StateCollector`]).
//!
//! No label ever carries a digest, a command line, an instance name, a
//! header value or any other unbounded or secret value.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_cas::CasCounters;
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi;
use kiln_scheduler::report::ExecutionObserver;
use kiln_scheduler::{OperationSummary, Scheduler};

use crate::http::{SharedSources, UiSources};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Labels of one RPC: its service and method, both from a fixed list
/// (anything else is `unknown`), and its status code's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub service: &'static str,
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcMethodLabels {
    pub service: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExecutionLabels {
    outcome: &'static str,
    isolation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunnerLabels {
    isolation: &'static str,
    warm: &'static str,
}

/// The isolation types a label may name; anything else is `other`.
const ISOLATION_TYPES: [&str; 5] = ["none", "sandbox", "docker", "podman", "firecracker"];

fn isolation_label(name: Option<&str>) -> &'static str {
    match name {
        None => "",
        Some(name) => ISOLATION_TYPES
            .into_iter()
            .find(|known| *known == name)
            .unwrap_or("other"),
    }
}

/// Every metric of one process, and its registry.
pub struct Metrics {
    registry: Registry,
    pub(crate) rpcs: Family<RpcLabels, Counter>,
    pub(crate) rpc_seconds: Family<RpcMethodLabels, Histogram>,
    executions: Family<ExecutionLabels, Counter>,
    phase_seconds: Family<PhaseLabels, Histogram>,
    runner_leases: Family<RunnerLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The metrics of a process serving gRPC: RPC counts and latencies,
    /// plus execution outcomes when it schedules actions.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register(
            "kiln_grpc_requests",
            "gRPC calls served, by service, method and status code",
            rpcs.clone(),
        );
        let rpc_seconds = Family::<RpcMethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 4.0, 12))
        });
        registry.register(
            "kiln_grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to the end of its response stream",
            rpc_seconds.clone(),
        );
        let executions = Family::<ExecutionLabels, Counter>::default();
        registry.register(
            "kiln_executions",
            "Executions completed, by outcome (cached, success, failed, timeout, cancelled, error) and isolation type (empty when nothing ran)",
            executions.clone(),
        );
        let phase_seconds = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 11))
        });
        registry.register(
            "kiln_execution_phase_duration_seconds",
            "Time executed actions spent in each phase: queued, input_staging, execution, output_upload",
            phase_seconds.clone(),
        );
        let runner_leases = Family::<RunnerLabels, Counter>::default();
        registry.register(
            "kiln_runner_leases",
            "Executed actions by isolation type and whether their runner was warm (reused); the warm hit ratio is warm=\"true\" over all",
            runner_leases.clone(),
        );
        Arc::new(Metrics {
            registry,
            rpcs,
            rpc_seconds,
            executions,
            phase_seconds,
            runner_leases,
        })
    }

    /// Adds metrics read at scrape time. Call before sharing the metrics.
    pub fn with_collector(mut self: Arc<Self>, collector: impl Collector) -> Arc<Self> {
        Arc::get_mut(&mut self)
            .expect("collectors are added before the metrics are shared")
            .registry
            .register_collector(Box::new(collector));
        self
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl ExecutionObserver for Metrics {
    fn completed(&self, operation: &OperationSummary, result: Option<&reapi::ActionResult>) {
        let Some(outcome) = &operation.outcome else {
            return;
        };
        let isolation = isolation_label(outcome.isolation.as_deref());
        self.executions
            .get_or_create(&ExecutionLabels {
                outcome: outcome.class.name(),
                isolation,
            })
            .inc();
        if let Some(warm) = outcome.warm {
            self.runner_leases
                .get_or_create(&RunnerLabels {
                    isolation,
                    warm: if warm { "true" } else { "false" },
                })
                .inc();
        }
        if outcome.class == kiln_scheduler::OutcomeClass::Cached {
            return; // its metadata is the original run's
        }
        let Some(metadata) = result.and_then(|r| r.execution_metadata.as_ref()) else {
            return;
        };
        for (phase, seconds) in phases(metadata) {
            if let Some(seconds) = seconds {
                self.phase_seconds
                    .get_or_create(&PhaseLabels { phase })
                    .observe(seconds);
            }
        }
    }
}

/// An executed action's phases and how long each took, when its metadata
/// has both ends.
pub(crate) fn phases(metadata: &reapi::ExecutedActionMetadata) -> [(&'static str, Option<f64>); 4] {
    let m = metadata;
    let span =
        |start: &Option<Timestamp>, end: &Option<Timestamp>| between(start.as_ref(), end.as_ref());
    [
        (
            "queued",
            span(&m.queued_timestamp, &m.worker_start_timestamp),
        ),
        (
            "input_staging",
            span(
                &m.input_fetch_start_timestamp,
                &m.input_fetch_completed_timestamp,
            ),
        ),
        (
            "execution",
            span(
                &m.execution_start_timestamp,
                &m.execution_completed_timestamp,
            ),
        ),
        (
            "output_upload",
            span(
                &m.output_upload_start_timestamp,
                &m.output_upload_completed_timestamp,
            ),
        ),
    ]
}

/// Seconds from `start` to `end`, when both are set and in order.
fn between(
    start: Option<&kiln_proto::protobuf::Timestamp>,
    end: Option<&kiln_proto::protobuf::Timestamp>,
) -> Option<f64> {
    let (start, end) = (start?, end?);
    let at = |t: &kiln_proto::protobuf::Timestamp| t.seconds as f64 + t.nanos as f64 * 1e-9;
    let seconds = at(end) - at(start);
    (seconds >= 0.0 && (start.seconds > 0 || start.nanos > 0)).then_some(seconds)
}

/// Gauges read from closures at each scrape (an executor process's
/// view); a closure answering `None` leaves its gauge out.
#[allow(clippy::type_complexity)]
pub struct GaugeFns(
    pub  Vec<(
        &'static str,
        &'static str,
        Box<dyn Fn() -> Option<i64> + Send + Sync>,
    )>,
);

impl std::fmt::Debug for GaugeFns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GaugeFns")
    }
}

impl Collector for GaugeFns {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, read) in &self.0 {
            if let Some(value) = read() {
                single(&mut encoder, name, help, ConstGauge::new(value))?;
            }
        }
        Ok(())
    }
}

/// State read from the server's components at each scrape (nothing
/// until they are attached).
pub struct StateCollector {
    pub sources: SharedSources,
    /// The directory whose file system's free space is reported.
    pub data_dir: PathBuf,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

/// Writes one metric without labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let metric_encoder = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(metric_encoder)
}

/// Writes one gauge family: a value per label set.
fn gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(free) = disk_free(&self.data_dir) {
            single(
                &mut encoder,
                "kiln_disk_free_bytes",
                "Free bytes (for unprivileged users) on the file system holding the data directory",
                ConstGauge::new(clamp(free)),
            )?;
        }
        let Some(UiSources { storage, scheduler }) = self.sources.lock().clone() else {
            return Ok(());
        };
        let counters = storage.counters();
        let count = |c: &std::sync::atomic::AtomicU64| ConstCounter::new(CasCounters::get(c));
        single(
            &mut encoder,
            "kiln_cas_written_bytes",
            "Verified blob bytes newly stored in the CAS (uploads and executors' outputs)",
            count(&counters.bytes_written),
        )?;
        single(
            &mut encoder,
            "kiln_cas_written_blobs",
            "Blobs newly stored in the CAS",
            count(&counters.blobs_written),
        )?;
        single(
            &mut encoder,
            "kiln_cas_read_bytes",
            "Blob bytes sent from the CAS (ByteStream reads, BatchReadBlobs)",
            count(&counters.bytes_read),
        )?;
        single(
            &mut encoder,
            "kiln_cas_find_missing_present",
            "Digests FindMissingBlobs was asked about that the CAS held (hits)",
            count(&counters.find_missing_present),
        )?;
        single(
            &mut encoder,
            "kiln_cas_find_missing_missing",
            "Digests FindMissingBlobs answered as missing (misses)",
            count(&counters.find_missing_missing),
        )?;
        single(
            &mut encoder,
            "kiln_action_cache_hits",
            "Action Cache lookups (GetActionResult and Execute) that found a complete result",
            count(&counters.action_cache_hits),
        )?;
        single(
            &mut encoder,
            "kiln_action_cache_misses",
            "Action Cache lookups that found no result, or one whose outputs are gone",
            count(&counters.action_cache_misses),
        )?;

        let usage = storage.store().usage();
        single(
            &mut encoder,
            "kiln_store_size_bytes",
            "Bytes the blob store holds",
            ConstGauge::new(clamp(usage.bytes)),
        )?;
        single(
            &mut encoder,
            "kiln_store_max_size_bytes",
            "The blob store's configured size limit",
            ConstGauge::new(clamp(usage.max_bytes)),
        )?;
        single(
            &mut encoder,
            "kiln_store_entries",
            "Blobs and Action Cache entries the store holds",
            ConstGauge::new(clamp(usage.entries)),
        )?;
        single(
            &mut encoder,
            "kiln_store_evicted_entries",
            "Entries evicted since start-up",
            ConstCounter::new(usage.evicted_entries),
        )?;
        single(
            &mut encoder,
            "kiln_store_evicted_bytes",
            "Bytes freed by eviction since start-up",
            ConstCounter::new(usage.evicted_bytes),
        )?;
        single(
            &mut encoder,
            "kiln_store_recent_memory_bytes",
            "Memory held for recently written large blobs, in use or free",
            ConstGauge::new(clamp(usage.recent_memory_bytes)),
        )?;
        let Some(scheduler) = &scheduler else {
            return Ok(());
        };
        encode_scheduler(&mut encoder, scheduler)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    pool: String,
    resource: &'static str,
}

/// Queue, executor and capacity gauges. Pools are operator-configured
/// names (executors declare them), so they are bounded by the fleet.
fn encode_scheduler(
    encoder: &mut DescriptorEncoder,
    scheduler: &Scheduler,
) -> Result<(), std::fmt::Error> {
    let queues = scheduler.queues(None);
    // One series per pool: a pool's queues on several OS/arch are summed.
    let mut queued: std::collections::BTreeMap<String, (i64, i64, Duration)> = Default::default();
    for queue in &queues {
        let entry = queued.entry(queue.pool.clone()).or_default();
        entry.0 += queue.queued as i64;
        entry.1 += queue.executing as i64;
        entry.2 = entry.2.max(queue.oldest_queued.unwrap_or_default());
    }
    gauges(
        encoder,
        "kiln_queue_length",
        "Actions waiting for an executor, per pool",
        queued
            .iter()
            .map(|(pool, (n, _, _))| (PoolLabels { pool: pool.clone() }, *n)),
    )?;
    gauges(
        encoder,
        "kiln_executing",
        "Actions an executor has taken and not finished, per pool",
        queued
            .iter()
            .map(|(pool, (_, n, _))| (PoolLabels { pool: pool.clone() }, *n)),
    )?;
    {
        let mut family = encoder.encode_descriptor(
            "kiln_queue_oldest_age_seconds",
            "How long the oldest queued action of each pool has waited (0 when none waits)",
            None,
            MetricType::Gauge,
        )?;
        for (pool, (_, _, age)) in &queued {
            ConstGauge::new(age.as_secs_f64())
                .encode(family.encode_family(&PoolLabels { pool: pool.clone() })?)?;
        }
    }

    let executors = scheduler.executors();
    let mut per_pool: std::collections::BTreeMap<String, PoolTotals> = Default::default();
    for executor in &executors {
        let totals = per_pool.entry(executor.pool.clone()).or_default();
        totals.executors += 1;
        totals.running += executor.running as i64;
        totals.warm += executor.warm_runners as i64;
        let cap = executor.capacity;
        let free = executor.free;
        totals.cpu += clamp(cap.cpu_millis);
        totals.memory += clamp(cap.memory_bytes);
        totals.cpu_used += clamp(cap.cpu_millis.saturating_sub(free.cpu_millis));
        totals.memory_used += clamp(cap.memory_bytes.saturating_sub(free.memory_bytes));
    }
    let pools = || per_pool.iter();
    gauges(
        encoder,
        "kiln_executors",
        "Registered executors, per pool",
        pools().map(|(pool, t)| (PoolLabels { pool: pool.clone() }, t.executors)),
    )?;
    gauges(
        encoder,
        "kiln_executor_running_actions",
        "Actions running on the pool's executors",
        pools().map(|(pool, t)| (PoolLabels { pool: pool.clone() }, t.running)),
    )?;
    gauges(
        encoder,
        "kiln_executor_warm_runners",
        "Warm runners the pool's executors hold",
        pools().map(|(pool, t)| (PoolLabels { pool: pool.clone() }, t.warm)),
    )?;
    let resources = |pool: &String, cpu: i64, memory: i64| {
        [
            (
                ResourceLabels {
                    pool: pool.clone(),
                    resource: "cpu_millis",
                },
                cpu,
            ),
            (
                ResourceLabels {
                    pool: pool.clone(),
                    resource: "memory_bytes",
                },
                memory,
            ),
        ]
    };
    gauges(
        encoder,
        "kiln_executor_capacity",
        "What the pool's executors offer in total (cpu_millis, memory_bytes)",
        pools().flat_map(|(pool, t)| resources(pool, t.cpu, t.memory)),
    )?;
    gauges(
        encoder,
        "kiln_executor_capacity_used",
        "What the actions running in the pool have reserved of it",
        pools().flat_map(|(pool, t)| resources(pool, t.cpu_used, t.memory_used)),
    )
}

#[derive(Default)]
struct PoolTotals {
    executors: i64,
    running: i64,
    warm: i64,
    cpu: i64,
    memory: i64,
    cpu_used: i64,
    memory_used: i64,
}

/// Free bytes on the file system holding `dir` (or its nearest existing
/// ancestor).
pub(crate) fn disk_free(dir: &std::path::Path) -> Option<u64> {
    let stat = dir
        .ancestors()
        .find_map(|dir| rustix::fs::statvfs(dir).ok())?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}
