//! Sizes and durations as users write them in platform properties and in
//! Kiln's own config: `4.5GB`, `512KiB`, `1h30m`, `500ms`.

use std::time::Duration;

/// Parses a size such as `512`, `4KB`, `1.5GiB`, `10G`. Decimal units (`K`,
/// `KB`, …) are powers of 1000, binary units (`KiB`, …) powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("size {text:?} does not start with a number"))?;
    let multiplier: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "size {text:?} has unknown unit {other:?} (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let bytes = number * multiplier;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("size {text:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration such as `500ms`, `1s`, `15m`, `1h`, `1h30m`, `2.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("duration is empty".into());
    }
    let mut total = 0f64;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("duration {text:?} is not like 500ms, 15m or 1h30m"))?;
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" => return Err(format!("duration {text:?} needs a unit (ms, s, m, h)")),
            other => {
                return Err(format!(
                    "duration {text:?} has unknown unit {other:?} (use ms, s, m, h)"
                ))
            }
        };
        total += value * seconds;
        rest = next;
    }
    if !total.is_finite() || total > 1e12 {
        return Err(format!("duration {text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_both_unit_systems() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1M"), Ok(1_000_000));
        assert_eq!(parse_size("4KB"), Ok(4000));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("4.5GB"), Ok(4_500_000_000));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert!(parse_size("lots").unwrap_err().contains("lots"));
        assert!(parse_size("5 furlongs")
            .unwrap_err()
            .contains("unknown unit"));
    }

    #[test]
    fn durations_parse_compound_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("10").unwrap_err().contains("unit"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("\"y\""));
    }
}
