//! How the UI writes sizes, durations, times and query values.

use std::time::{Duration, SystemTime};

/// `bytes` in binary units: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration at a useful precision: `850 µs`, `12.3 ms`, `4.2 s`, `3 min 5 s`.
pub fn duration(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 1000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{:.1} ms", micros as f64 / 1000.0)
    } else if d.as_secs() < 120 {
        format!("{:.1} s", d.as_secs_f64())
    } else if d.as_secs() < 7200 {
        format!("{} min {} s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{} h {} min", d.as_secs() / 3600, d.as_secs() / 60 % 60)
    }
}

/// How long ago `at` was: `3 s ago`.
pub fn since(at: SystemTime) -> String {
    let ago = SystemTime::now().duration_since(at).unwrap_or_default();
    if ago.as_secs() < 1 {
        "just now".into()
    } else if ago.as_secs() < 120 {
        format!("{} s ago", ago.as_secs())
    } else if ago.as_secs() < 7200 {
        format!("{} min ago", ago.as_secs() / 60)
    } else {
        format!("{} h ago", ago.as_secs() / 3600)
    }
}

/// `at` in UTC, to the second (RFC 3339).
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// `value` escaped for a URL's query string.
pub fn query_escape(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_micros(850)), "850 µs");
        assert_eq!(duration(Duration::from_millis(12)), "12.0 ms");
        assert_eq!(duration(Duration::from_secs(185)), "3 min 5 s");
        assert_eq!(query_escape("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }
}
