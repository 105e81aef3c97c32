//! What a benchmark run found, and how it is shown: an aligned table for
//! people, JSON for scripts. Also samples a server process's memory from
//! `/proc`, since bounded memory under load is part of what is measured.

use std::fmt::Write as _;

const MEGABYTE: f64 = 1_000_000.0;

/// One timed operation.
#[derive(Debug)]
pub struct Measurement {
    pub operation: String,
    /// Blobs, digests or chunks handled.
    pub count: u64,
    /// Payload bytes moved or hashed.
    pub bytes: u64,
    pub seconds: f64,
    /// CPU time (user + system) the server process used meanwhile, when its
    /// pid is known: tells a CPU-bound server from one waiting on I/O.
    pub server_cpu_seconds: Option<f64>,
    pub note: String,
}

impl Measurement {
    pub fn items_per_second(&self) -> f64 {
        per_second(self.count as f64, self.seconds)
    }

    pub fn megabytes_per_second(&self) -> f64 {
        per_second(self.bytes as f64 / MEGABYTE, self.seconds)
    }
}

fn per_second(amount: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        amount / seconds
    } else {
        0.0
    }
}

/// Total CPU time (user + system, all threads) of a process, from
/// `/proc/PID/stat`. Linux reports it in `USER_HZ` ticks, which is 100 on
/// every architecture Kiln runs on.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    // utime and stime are fields 14 and 15.
    let fields = kiln_worker::process::stat_fields(pid).ok()?;
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((user + system) as f64 / USER_HZ)
}

/// CPU time of server `pid` and of its launchers (`kiln launcher`, the
/// processes a root executor starts actions through, see
/// `kiln_sandbox::launcher`), which do the server's share of starting
/// each action. The actions' own time is in none of them.
pub fn server_cpu_seconds(pid: u32) -> Option<f64> {
    let own = process_cpu_seconds(pid)?;
    // Children are listed per thread: whichever thread started it.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let launchers: f64 = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .filter_map(|child| child.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/comm"))
                .is_ok_and(|name| name.trim_end() == "kiln-launcher")
        })
        .filter_map(process_cpu_seconds)
        .sum();
    Some(own + launchers)
}

/// A process's resident memory, from `/proc/PID/status`.
#[derive(Debug)]
pub struct MemorySample {
    pub label: String,
    /// `VmRSS`: resident now.
    pub resident_bytes: u64,
    /// `VmHWM`: the most that was ever resident.
    pub peak_resident_bytes: u64,
}

impl MemorySample {
    pub fn read(pid: u32, label: &str) -> anyhow::Result<Self> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path)
            .map_err(|error| anyhow::anyhow!("reading {path}: {error}"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|value| value.trim().strip_suffix("kB"))
                .and_then(|kilobytes| kilobytes.trim().parse::<u64>().ok())
                .map(|kilobytes| kilobytes * 1024)
                .ok_or_else(|| anyhow::anyhow!("{path} has no {name} line"))
        };
        Ok(Self {
            label: label.to_owned(),
            resident_bytes: field("VmRSS")?,
            peak_resident_bytes: field("VmHWM")?,
        })
    }
}

/// Everything one run found, in the order it was measured.
#[derive(Debug, Default)]
pub struct Report {
    /// Facts about the setup, printed as `key: value` above the table.
    pub context: Vec<(String, String)>,
    pub measurements: Vec<Measurement>,
    pub server_pid: Option<u32>,
    pub memory: Vec<MemorySample>,
    /// Failed RPCs and wrong answers (missing or corrupt blobs); any of these
    /// fail the run after the numbers are printed.
    pub problems: Vec<String>,
}

impl Report {
    /// Prints the report (a table, or JSON) and fails the command if the
    /// server gave any wrong answer along the way.
    pub fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            print!("{}", self.json());
        } else {
            print!("{}", self.table());
        }
        anyhow::ensure!(
            self.problems.is_empty(),
            "{} problem(s) with the server's answers; see PROBLEMS above",
            self.problems.len()
        );
        Ok(())
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        for (key, value) in &self.context {
            let _ = writeln!(out, "{key:<12} {value}");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<34} {:>9} {:>11} {:>9} {:>12} {:>10} {:>9}  note",
            "operation", "count", "bytes", "seconds", "items/s", "MB/s", "srv cpu s"
        );
        for m in &self.measurements {
            let server_cpu = m
                .server_cpu_seconds
                .map_or_else(|| "-".to_owned(), |seconds| format!("{seconds:.2}"));
            let _ = writeln!(
                out,
                "{:<34} {:>9} {:>11} {:>9.3} {:>12.0} {:>10.1} {:>9}  {}",
                m.operation,
                m.count,
                human_bytes(m.bytes),
                m.seconds,
                m.items_per_second(),
                m.megabytes_per_second(),
                server_cpu,
                m.note
            );
        }
        let _ = writeln!(out, "(MB = 10^6 bytes)");
        if let Some(pid) = self.server_pid {
            let _ = writeln!(out, "\nserver memory (pid {pid})");
            for sample in &self.memory {
                let _ = writeln!(
                    out,
                    "  {:<32} VmRSS {:>11}   VmHWM {:>11}",
                    sample.label,
                    human_bytes(sample.resident_bytes),
                    human_bytes(sample.peak_resident_bytes)
                );
            }
        }
        if !self.problems.is_empty() {
            let _ = writeln!(out, "\nPROBLEMS");
            for problem in &self.problems {
                let _ = writeln!(out, "  {problem}");
            }
        }
        out
    }

    pub fn json(&self) -> String {
        let mut out = String::from("{\n  \"context\": {");
        for (index, (key, value)) in self.context.iter().enumerate() {
            let separator = if index == 0 { "" } else { "," };
            let _ = write!(out, "{separator}\n    {}: {}", quote(key), quote(value));
        }
        out.push_str("\n  },\n  \"measurements\": [");
        for (index, m) in self.measurements.iter().enumerate() {
            let separator = if index == 0 { "" } else { "," };
            let _ = write!(
                out,
                "{separator}\n    {{\"operation\": {}, \"count\": {}, \"bytes\": {}, \
                 \"seconds\": {:.6}, \"items_per_second\": {:.1}, \
                 \"megabytes_per_second\": {:.1}, \"server_cpu_seconds\": {}, \
                 \"note\": {}}}",
                quote(&m.operation),
                m.count,
                m.bytes,
                m.seconds,
                m.items_per_second(),
                m.megabytes_per_second(),
                m.server_cpu_seconds
                    .map_or_else(|| "null".to_owned(), |seconds| format!("{seconds:.2}")),
                quote(&m.note)
            );
        }
        out.push_str("\n  ],\n  \"server_pid\": ");
        match self.server_pid {
            Some(pid) => {
                let _ = write!(out, "{pid}");
            }
            None => out.push_str("null"),
        }
        out.push_str(",\n  \"server_memory\": [");
        for (index, sample) in self.memory.iter().enumerate() {
            let separator = if index == 0 { "" } else { "," };
            let _ = write!(
                out,
                "{separator}\n    {{\"label\": {}, \"vm_rss_bytes\": {}, \"vm_hwm_bytes\": {}}}",
                quote(&sample.label),
                sample.resident_bytes,
                sample.peak_resident_bytes
            );
        }
        out.push_str("\n  ],\n  \"problems\": [");
        for (index, problem) in self.problems.iter().enumerate() {
            let separator = if index == 0 { "" } else { "," };
            let _ = write!(out, "{separator}\n    {}", quote(problem));
        }
        out.push_str("\n  ]\n}\n");
        out
    }
}

/// `1.00 GiB`, `4.00 KiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            character if (character as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", character as u32);
            }
            character => out.push(character),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4096), "4.00 KiB");
        assert_eq!(human_bytes(1 << 30), "1.00 GiB");
    }

    #[test]
    fn json_escapes_strings() {
        assert_eq!(quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn reads_own_cpu_time() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(30) {}
        assert!(process_cpu_seconds(std::process::id()).unwrap() > 0.0);
    }

    #[test]
    fn reads_own_memory() {
        let sample = MemorySample::read(std::process::id(), "self").unwrap();
        assert!(sample.resident_bytes > 0);
        assert!(sample.peak_resident_bytes >= sample.resident_bytes);
    }
}
