//! `kiln bench exec`: the fixed cost of remote execution. Trivial actions
//! (`/bin/true` with an argument unique to the run, so none is a cache hit)
//! are uploaded first, then executed through the REAPI Execution service:
//! one in flight for latency, many in flight for throughput. Every result is
//! checked (COMPLETED, status OK, exit code 0, not served from the cache).

use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use futures::StreamExt as _;
use kiln_cas::wire::digest_of;
use kiln_proto::longrunning::operation;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    self, batch_update_blobs_request, execution_stage, BatchUpdateBlobsRequest, Digest,
};
use prost::Message as _;

use super::cas::{fresh_seed, loopback_endpoint};
use super::report::{server_cpu_seconds, Measurement, MemorySample, Report};

/// Actions uploaded per BatchUpdateBlobs request (each is two small blobs).
const UPLOAD_BATCH: usize = 1000;

/// Measure a running server's execution latency and throughput with trivial
/// actions.
#[derive(Debug, Clone, clap::Args)]
pub struct ExecBenchArgs {
    /// Server to measure: `grpc://` (or `grpcs://` for TLS) and a loopback
    /// address.
    #[arg(long, default_value = "grpc://127.0.0.1:1985")]
    pub server: String,

    /// How to verify a `grpcs://` server.
    #[command(flatten)]
    pub tls: kiln::tls::ClientTlsArgs,

    /// File with an API key to send on every call (a server with keys
    /// needs one with cache-read, cas-write and execute).
    #[arg(long)]
    pub api_key_file: Option<std::path::PathBuf>,

    /// REAPI instance name.
    #[arg(long, default_value = "")]
    pub instance_name: String,

    /// Actions executed one at a time (latency); 0 skips the phase.
    #[arg(long, default_value_t = 500)]
    pub latency_count: usize,

    /// Actions executed with `--concurrency` in flight (throughput); 0 skips
    /// the phase.
    #[arg(long, default_value_t = 3000)]
    pub throughput_count: usize,

    /// Execute calls in flight in the throughput phase.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,

    /// Program every action runs; its one argument makes each action unique.
    #[arg(long, default_value = "/bin/true")]
    pub program: String,

    /// Pass each action's unique argument in a flag file (`@args.params`,
    /// the action's one input) instead of on its command line: the shape
    /// of a persistent worker's action (`persistentWorkerKey`).
    #[arg(long)]
    pub flag_file: bool,

    /// Have each action write its unique argument to one declared output
    /// file (`out/result`, through `/bin/sh` instead of `--program`), so
    /// that collecting, uploading and adopting an output is part of the
    /// cost measured.
    #[arg(long, conflicts_with_all = ["flag_file", "program"])]
    pub output_file: bool,

    /// Input files every action shares (`inputs/0`, `inputs/1`, …, the
    /// same in every action of a run): what a warm runner can keep from
    /// one action to the next.
    #[arg(long, default_value_t = 0)]
    pub input_files: usize,

    /// Size of each `--input-files` file (at most 3 MiB).
    #[arg(long, default_value = "1MiB", value_parser = kiln::config::parse_size)]
    pub input_file_size: u64,

    /// Platform properties put on every Action, as `KEY=VALUE`.
    #[arg(long = "property", value_parser = parse_property)]
    pub properties: Vec<(String, String)>,

    /// Server process to sample CPU time (with its launchers') and memory from.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Seed for the actions' arguments; by default a fresh one per run so no
    /// action is in the Action Cache.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

/// Runs both phases, prints the report, and fails if any action failed or was
/// answered from the cache.
pub async fn run(args: ExecBenchArgs) -> anyhow::Result<()> {
    ensure!(args.concurrency > 0, "--concurrency must be positive");
    let bench = ExecBench::connect(args).await?;
    let report = bench.run_all().await?;
    report.print(bench.args.json)
}

/// Largest `--input-file-size`, and the bytes of one upload batch of them.
const MAX_INPUT_FILE_SIZE: u64 = 3 << 20;

/// The flag file of `--flag-file` actions, in their input root.
const FLAG_FILE: &str = "args.params";

/// The output of `--output-file` actions, and the script that writes it
/// (its one argument after the script's name is the unique one); the
/// executor makes the output's parent directory, as the REAPI says.
const OUTPUT_FILE: &str = "out/result";
const OUTPUT_SCRIPT: &str = "printf '%s\\n' \"$1\" > out/result";

/// A client executing trivial actions against one server.
pub(super) struct ExecBench {
    args: ExecBenchArgs,
    seed: u64,
    cas: ContentAddressableStorageClient<super::Keyed>,
    execution: ExecutionClient<super::Keyed>,
}

impl ExecBench {
    /// Connects to `args.server`.
    pub(super) async fn connect(args: ExecBenchArgs) -> anyhow::Result<ExecBench> {
        let seed = args.seed.unwrap_or_else(fresh_seed);
        let channel = loopback_endpoint(&args.server, &args.tls)?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.server))?;
        let key = super::WithApiKey::read(args.api_key_file.as_deref())?;
        Ok(ExecBench {
            args,
            seed,
            cas: ContentAddressableStorageClient::with_interceptor(channel.clone(), key.clone()),
            execution: ExecutionClient::with_interceptor(channel, key),
        })
    }

    /// Executes actions `indices` one after another (uploaded first, not
    /// timed) and returns each one's latency; the first failure ends it.
    pub(super) async fn latencies(&self, indices: Range<usize>) -> anyhow::Result<Vec<Duration>> {
        let mut latencies = Vec::with_capacity(indices.len());
        for action_digest in self.upload(indices).await? {
            latencies.push(
                execute(
                    self.execution.clone(),
                    self.args.instance_name.clone(),
                    action_digest,
                    usize::from(self.args.output_file),
                )
                .await?
                .latency,
            );
        }
        Ok(latencies)
    }

    /// Action `index` of this run: its Command and Action, encoded.
    fn action(&self, index: usize, input_root: &Digest) -> (Vec<u8>, Vec<u8>) {
        let unique = if self.args.flag_file {
            format!("@{FLAG_FILE}")
        } else {
            self.unique_argument(index)
        };
        let command = if self.args.output_file {
            reapi::Command {
                arguments: ["/bin/sh", "-c", OUTPUT_SCRIPT, "sh", &unique]
                    .map(String::from)
                    .to_vec(),
                output_paths: vec![OUTPUT_FILE.into()],
                ..Default::default()
            }
        } else {
            reapi::Command {
                arguments: vec![self.args.program.clone(), unique],
                ..Default::default()
            }
        }
        .encode_to_vec();
        let platform = (!self.args.properties.is_empty()).then(|| reapi::Platform {
            properties: self
                .args
                .properties
                .iter()
                .map(|(name, value)| reapi::platform::Property {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
        });
        let action = reapi::Action {
            command_digest: Some(digest_of(&command)),
            input_root_digest: Some(input_root.clone()),
            platform,
            ..Default::default()
        }
        .encode_to_vec();
        (command, action)
    }

    /// The argument that makes action `index` of this run unique.
    fn unique_argument(&self, index: usize) -> String {
        format!("kiln-bench-{:016x}-{index}", self.seed)
    }

    /// Uploads the `--input-files` and their directory; its node in an
    /// input root, if there are any.
    async fn upload_shared_inputs(&self) -> anyhow::Result<Option<reapi::DirectoryNode>> {
        if self.args.input_files == 0 {
            return Ok(None);
        }
        ensure!(
            self.args.input_file_size <= MAX_INPUT_FILE_SIZE,
            "--input-file-size {} is over {MAX_INPUT_FILE_SIZE} bytes",
            self.args.input_file_size
        );
        let set = super::data::SmallBlobSet {
            seed: self.seed,
            size: self.args.input_file_size,
            count: self.args.input_files,
        };
        let mut cas = self.cas.clone();
        let mut files = Vec::with_capacity(set.count);
        let mut pending = Vec::new();
        let mut pending_bytes = 0;
        for index in 0..set.count {
            let contents = set.contents(index);
            files.push(reapi::FileNode {
                name: index.to_string(),
                digest: Some(digest_of(&contents)),
                ..Default::default()
            });
            pending_bytes += contents.len() as u64;
            pending.push(contents);
            if pending_bytes >= MAX_INPUT_FILE_SIZE {
                upload_batch(
                    &mut cas,
                    &self.args.instance_name,
                    std::mem::take(&mut pending),
                )
                .await?;
                pending_bytes = 0;
            }
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let directory = reapi::Directory {
            files,
            ..Default::default()
        }
        .encode_to_vec();
        let digest = digest_of(&directory);
        pending.push(directory);
        upload_batch(&mut cas, &self.args.instance_name, pending).await?;
        Ok(Some(reapi::DirectoryNode {
            name: "inputs".into(),
            digest: Some(digest),
        }))
    }

    /// Uploads the Commands and Actions of `indices` (and the input roots)
    /// before anything is timed; returns the Action digests.
    async fn upload(&self, indices: Range<usize>) -> anyhow::Result<Vec<Digest>> {
        let shared = self.upload_shared_inputs().await?;
        let root = reapi::Directory {
            directories: shared.clone().into_iter().collect(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut root_digest = digest_of(&root);
        let mut action_digests = Vec::with_capacity(indices.len());
        let mut pending = vec![root];
        let mut cas = self.cas.clone();
        for index in indices {
            if self.args.flag_file {
                // Each action's own input root: its flag file.
                let params = format!("{}\n", self.unique_argument(index)).into_bytes();
                let root = reapi::Directory {
                    files: vec![reapi::FileNode {
                        name: FLAG_FILE.into(),
                        digest: Some(digest_of(&params)),
                        ..Default::default()
                    }],
                    directories: shared.clone().into_iter().collect(),
                    ..Default::default()
                }
                .encode_to_vec();
                root_digest = digest_of(&root);
                pending.push(params);
                pending.push(root);
            }
            let (command, action) = self.action(index, &root_digest);
            action_digests.push(digest_of(&action));
            pending.push(command);
            pending.push(action);
            if pending.len() >= UPLOAD_BATCH * 2 {
                upload_batch(
                    &mut cas,
                    &self.args.instance_name,
                    std::mem::take(&mut pending),
                )
                .await?;
            }
        }
        upload_batch(&mut cas, &self.args.instance_name, pending).await?;
        Ok(action_digests)
    }

    async fn run_all(&self) -> anyhow::Result<Report> {
        let mut report = Report {
            server_pid: self.args.server_pid,
            ..Default::default()
        };
        report.context = vec![
            ("server".into(), self.args.server.clone()),
            ("seed".into(), format!("{:016x}", self.seed)),
            (
                "action".into(),
                if self.args.output_file {
                    format!("/bin/sh -c {OUTPUT_SCRIPT:?} sh <unique argument>")
                } else if self.args.flag_file {
                    format!(
                        "{} @{FLAG_FILE} (holding a unique argument)",
                        self.args.program
                    )
                } else {
                    format!("{} <unique argument>", self.args.program)
                },
            ),
        ];
        if self.args.input_files > 0 {
            report.context.push((
                "shared inputs".into(),
                format!(
                    "{} files of {} bytes",
                    self.args.input_files, self.args.input_file_size
                ),
            ));
        }
        if let Some(pid) = self.args.server_pid {
            report.memory.push(MemorySample::read(pid, "start")?);
        }
        let latency_end = self.args.latency_count;
        let phases = [
            (0..latency_end, 1),
            (
                latency_end..latency_end + self.args.throughput_count,
                self.args.concurrency,
            ),
        ];
        for (indices, in_flight) in phases {
            if indices.is_empty() {
                continue;
            }
            let action_digests = self.upload(indices).await?;
            let measurement = self
                .measure(action_digests, in_flight, &mut report.problems)
                .await;
            report.measurements.push(measurement);
            if let Some(pid) = self.args.server_pid {
                report.memory.push(MemorySample::read(
                    pid,
                    &format!("after {in_flight} in flight"),
                )?);
            }
        }
        Ok(report)
    }

    /// Executes every action with `in_flight` at a time.
    async fn measure(
        &self,
        action_digests: Vec<Digest>,
        in_flight: usize,
        problems: &mut Vec<String>,
    ) -> Measurement {
        let count = action_digests.len();
        let cpu_before = self.args.server_pid.and_then(server_cpu_seconds);
        let started = Instant::now();
        let outcomes: Vec<anyhow::Result<Executed>> = futures::stream::iter(action_digests)
            .map(|action_digest| {
                execute(
                    self.execution.clone(),
                    self.args.instance_name.clone(),
                    action_digest,
                    usize::from(self.args.output_file),
                )
            })
            .buffer_unordered(in_flight.max(1))
            .collect()
            .await;
        let seconds = started.elapsed().as_secs_f64();
        let cpu_seconds = self
            .args
            .server_pid
            .and_then(server_cpu_seconds)
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        let mut latencies = Vec::with_capacity(count);
        let mut warm = 0;
        for outcome in outcomes {
            match outcome {
                Ok(executed) => {
                    latencies.push(executed.latency);
                    warm += usize::from(executed.warm);
                }
                Err(error) => problems.push(format!("{error:#}")),
            }
        }
        let recycling = self
            .args
            .properties
            .iter()
            .any(|(name, value)| name == "recycle-runner" && value == "true");
        latencies.sort();
        let percentile = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        Measurement {
            operation: format!("Execute, {in_flight} in flight"),
            count: count as u64,
            bytes: 0,
            seconds,
            server_cpu_seconds: cpu_seconds,
            note: format!(
                "latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{}",
                percentile(0.50),
                percentile(0.99),
                latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
                if recycling {
                    format!(", {warm} of {} in a warm runner", latencies.len())
                } else {
                    String::new()
                }
            ),
        }
    }
}

async fn upload_batch(
    cas: &mut ContentAddressableStorageClient<super::Keyed>,
    instance_name: &str,
    blobs: Vec<Vec<u8>>,
) -> anyhow::Result<()> {
    if blobs.is_empty() {
        return Ok(());
    }
    let response = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: instance_name.to_owned(),
            requests: blobs
                .into_iter()
                .map(|data| batch_update_blobs_request::Request {
                    digest: Some(digest_of(&data)),
                    data,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .context("uploading Commands and Actions")?
        .into_inner();
    for entry in response.responses {
        let code = entry.status.map_or(0, |status| status.code);
        ensure!(code == 0, "uploading {:?}: status {code}", entry.digest);
    }
    Ok(())
}

/// What one Execute call took, and whether its runner was warm.
struct Executed {
    latency: Duration,
    warm: bool,
}

/// One Execute call, followed to its last Operation; checks the result
/// (with `output_files` output files) and returns the call's latency.
async fn execute(
    mut execution: ExecutionClient<super::Keyed>,
    instance_name: String,
    action_digest: Digest,
    output_files: usize,
) -> anyhow::Result<Executed> {
    let hash = action_digest.hash.clone();
    let started = Instant::now();
    let mut stream = execution
        .execute(reapi::ExecuteRequest {
            instance_name,
            action_digest: Some(action_digest),
            ..Default::default()
        })
        .await
        .with_context(|| format!("Execute of action {hash}"))?
        .into_inner();
    let mut last = None;
    let mut latency = None;
    // Read to the end of the stream (the server closes it after `done`)
    // rather than dropping it: a dropped stream is a client-side reset.
    while let Some(operation) = stream.next().await {
        let operation = operation.with_context(|| format!("Execute stream of action {hash}"))?;
        if operation.done && latency.is_none() {
            latency = Some(started.elapsed());
        }
        last = Some(operation);
    }
    let latency = latency.unwrap_or_else(|| started.elapsed());
    let operation = last.with_context(|| format!("action {hash}: no Operation"))?;
    ensure!(operation.done, "action {hash}: stream ended before done");
    let metadata = operation
        .metadata
        .as_ref()
        .map(|any| reapi::ExecuteOperationMetadata::decode(any.value.as_slice()))
        .transpose()?
        .unwrap_or_default();
    ensure!(
        metadata.stage == execution_stage::Value::Completed as i32,
        "action {hash}: last stage {}",
        metadata.stage
    );
    let response = match operation.result {
        Some(operation::Result::Response(any)) => {
            reapi::ExecuteResponse::decode(any.value.as_slice())?
        }
        Some(operation::Result::Error(status)) => {
            bail!("action {hash}: error {} {}", status.code, status.message)
        }
        None => bail!("action {hash}: done without a result"),
    };
    let status = response.status.unwrap_or_default();
    ensure!(
        status.code == 0,
        "action {hash}: status {} {}",
        status.code,
        status.message
    );
    ensure!(!response.cached_result, "action {hash}: served from cache");
    let exit_code = response
        .result
        .as_ref()
        .map_or(-1, |result| result.exit_code);
    ensure!(exit_code == 0, "action {hash}: exit code {exit_code}");
    let outputs = response
        .result
        .as_ref()
        .map_or(0, |result| result.output_files.len());
    ensure!(
        outputs == output_files,
        "action {hash}: {outputs} output files, expected {output_files}"
    );
    let warm = response
        .result
        .and_then(|result| result.execution_metadata)
        .into_iter()
        .flat_map(|metadata| metadata.auxiliary_metadata)
        .filter(|any| any.type_url == kiln_proto::runner::RUNNER_USAGE_TYPE)
        .filter_map(|any| kiln_proto::runner::RunnerUsage::decode(any.value.as_slice()).ok())
        .any(|usage| usage.warm);
    Ok(Executed { latency, warm })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_parse_as_key_value() {
        assert_eq!(
            parse_property("Pool=fast").unwrap(),
            ("Pool".to_owned(), "fast".to_owned())
        );
        assert!(parse_property("Pool").is_err());
    }
}
