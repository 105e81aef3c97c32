//! `kiln bench isolation`: what each isolation type adds to a trivial
//! action. For every type the server offers, trivial actions run one at a
//! time through the Execution service; the same run also times the raw
//! tool each type stands for (`unshare` for `sandbox`, `docker run --rm`
//! and `podman run --rm` for the containers) on the same image, so the
//! ratios come from one run on one machine. With `--warm`, each type is
//! also measured with `recycle-runner=true` (a warm runner per action
//! after the first), next to its fresh-runner figure.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};

use super::exec::{ExecBench, ExecBenchArgs};
use super::report::{Measurement, Report};

/// Measure the per-action overhead of each isolation type.
#[derive(Debug, Clone, clap::Args)]
pub struct IsolationBenchArgs {
    /// Server to measure (its executor must offer the types asked for).
    #[arg(long, default_value = "grpc://127.0.0.1:1985")]
    pub server: String,

    /// Timed actions per isolation type (after two untimed warm-ups that
    /// pull the image and fill caches).
    #[arg(long, default_value_t = 30)]
    pub actions: usize,

    /// Isolation types to measure, comma-separated; `none` is the baseline.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,sandbox,docker,podman"
    )]
    pub types: Vec<String>,

    /// Image of the container types and `firecracker`, and of the raw
    /// `run --rm` baselines.
    #[arg(long, default_value = "docker://127.0.0.1:5000/kiln-test/base:latest")]
    pub image: String,

    /// Input files every action shares (`inputs/0`, …), as `kiln bench
    /// exec --input-files`: what a warm runner keeps between actions.
    #[arg(long, default_value_t = 0)]
    pub input_files: usize,

    /// Size of each `--input-files` file (at most 3 MiB).
    #[arg(long, default_value = "1MiB", value_parser = kiln::config::parse_size)]
    pub input_file_size: u64,

    /// Also measure each type in a warm runner (`recycle-runner=true`).
    #[arg(long)]
    pub warm: bool,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Median of `samples`, in milliseconds.
fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples
        .get(samples.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The raw command a type is compared with, if any.
fn raw_baseline(kind: &str, image: &str) -> Option<Vec<String>> {
    let image = image.strip_prefix("docker://").unwrap_or(image).to_string();
    let words: &[&str] = match kind {
        "sandbox" => &[
            "unshare",
            "--mount",
            "--pid",
            "--ipc",
            "--uts",
            "--net",
            "--fork",
            "/bin/true",
        ],
        "docker" | "podman" => &[kind, "run", "--rm", "--network", "none", &image, "true"],
        _ => return None,
    };
    Some(words.iter().map(|w| w.to_string()).collect())
}

/// Runs `command` `count` times (after one untimed warm-up) and returns
/// each run's wall time; a failing run is an error naming the command.
fn time_command(command: &[String], count: usize) -> anyhow::Result<Vec<Duration>> {
    let shown = command.join(" ");
    let mut samples = Vec::with_capacity(count);
    for round in 0..=count {
        let started = Instant::now();
        let status = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("running {shown}"))?;
        let elapsed = started.elapsed();
        ensure!(status.success(), "{shown} failed: {status}");
        if round > 0 {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

pub async fn run(args: IsolationBenchArgs) -> anyhow::Result<()> {
    ensure!(args.actions > 0, "--actions must be positive");
    let mut report = Report {
        context: vec![
            ("server".into(), args.server.clone()),
            ("image".into(), args.image.clone()),
            ("actions per type".into(), args.actions.to_string()),
            (
                "shared inputs".into(),
                format!(
                    "{} files of {} bytes",
                    args.input_files, args.input_file_size
                ),
            ),
            (
                "figures".into(),
                "median per action; Execute is the client's whole call".into(),
            ),
        ],
        ..Default::default()
    };
    let mut none_ms = None;
    for kind in &args.types {
        let mut properties = vec![("workload-isolation-type".to_string(), kind.clone())];
        // `none`, the baseline, stays a plain process in the host's network
        // (as its recorded figures were measured): with `dockerNetwork=off`
        // it would pay for a network namespace of its own.
        if kind != "none" {
            properties.push(("dockerNetwork".to_string(), "off".to_string()));
        }
        if matches!(kind.as_str(), "docker" | "podman" | "firecracker") {
            properties.push(("container-image".into(), args.image.clone()));
        }
        let cold_ms = execute_trivial(&args, kind, properties.clone(), "", &mut report).await?;
        let mut note = format!("{cold_ms:.2} ms per action");
        match none_ms {
            None if kind == "none" => none_ms = Some(cold_ms),
            Some(base) => note.push_str(&format!(", {:+.2} ms over none", cold_ms - base)),
            None => {}
        }
        report.measurements.last_mut().expect("measured").note = note;
        if args.warm {
            properties.push(("recycle-runner".into(), "true".into()));
            properties.push(("runner-recycling-key".into(), "kiln-bench".into()));
            let warm_ms =
                execute_trivial(&args, kind, properties, ", warm runner", &mut report).await?;
            report.measurements.last_mut().expect("measured").note = format!(
                "{warm_ms:.2} ms per action, {:.2}x of a fresh runner",
                warm_ms / cold_ms
            );
        }
        if let Some(command) = raw_baseline(kind, &args.image) {
            let started = Instant::now();
            let mut samples = time_command(&command, args.actions)?;
            let seconds = started.elapsed().as_secs_f64();
            let raw_ms = median_ms(&mut samples);
            report
                .context
                .push((format!("raw {kind}"), command.join(" ")));
            report.measurements.push(Measurement {
                operation: format!("raw {kind}"),
                count: args.actions as u64,
                bytes: 0,
                seconds,
                server_cpu_seconds: None,
                note: format!(
                    "{raw_ms:.2} ms per run; Kiln's {kind} action is {:.2}x of it",
                    cold_ms / raw_ms
                ),
            });
        }
    }
    report.print(args.json)
}

/// Executes two untimed and then `args.actions` timed trivial actions of
/// isolation `kind` with `properties`, one at a time; records them in
/// `report` (operation `Execute, KIND{label}`) and returns the median in
/// milliseconds.
async fn execute_trivial(
    args: &IsolationBenchArgs,
    kind: &str,
    properties: Vec<(String, String)>,
    label: &str,
    report: &mut Report,
) -> anyhow::Result<f64> {
    let bench = ExecBench::connect(ExecBenchArgs {
        server: args.server.clone(),
        tls: Default::default(),
        api_key_file: None,
        instance_name: String::new(),
        latency_count: 0,
        throughput_count: 0,
        concurrency: 1,
        program: "true".into(),
        flag_file: false,
        output_file: false,
        input_files: args.input_files,
        input_file_size: args.input_file_size,
        properties,
        server_pid: None,
        seed: None,
        json: false,
    })
    .await?;
    bench
        .latencies(0..2)
        .await
        .with_context(|| format!("warming up {kind}"))?;
    let started = Instant::now();
    let mut latencies = bench
        .latencies(2..2 + args.actions)
        .await
        .with_context(|| format!("executing with workload-isolation-type={kind}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let kiln_ms = median_ms(&mut latencies);
    report.measurements.push(Measurement {
        operation: format!("Execute, {kind}{label}"),
        count: args.actions as u64,
        bytes: 0,
        seconds,
        server_cpu_seconds: None,
        note: String::new(),
    });
    Ok(kiln_ms)
}
