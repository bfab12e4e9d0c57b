//! YCSB's report format, so existing scripts read hotpot's runs:
//! `[OVERALL], RunTime(ms), …`, `[OVERALL], Throughput(ops/sec), …`, and per operation
//! `Operations`, `AverageLatency(us)`, `MinLatency(us)`, `MaxLatency(us)`, the 50th, 95th, 99th
//! and 99.9th `PercentileLatency(us)`, and `Return=OK`.

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;

/// Latencies (µs) and outcome counts of one operation type.
pub struct OperationStats {
    pub latency_us: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
}

impl OperationStats {
    pub fn new() -> OperationStats {
        OperationStats {
            latency_us: Histogram::new(3).expect("3 significant digits is valid"),
            ok: 0,
            errors: 0,
        }
    }
}

impl Default for OperationStats {
    fn default() -> Self {
        OperationStats::new()
    }
}

/// Render a run in YCSB's format. `operations` keys are YCSB's names (READ, UPDATE, …).
pub fn render(run_time_ms: u64, operations: &BTreeMap<String, OperationStats>) -> String {
    let total: u64 = operations
        .values()
        .map(|stats| stats.ok + stats.errors)
        .sum();
    let mut out = String::new();
    let _ = writeln!(out, "[OVERALL], RunTime(ms), {run_time_ms}");
    let throughput = if run_time_ms == 0 {
        0.0
    } else {
        total as f64 * 1000.0 / run_time_ms as f64
    };
    let _ = writeln!(out, "[OVERALL], Throughput(ops/sec), {throughput}");
    for (name, stats) in operations {
        let h = &stats.latency_us;
        let _ = writeln!(out, "[{name}], Operations, {}", h.len());
        let _ = writeln!(out, "[{name}], AverageLatency(us), {}", h.mean());
        let _ = writeln!(out, "[{name}], MinLatency(us), {}", h.min());
        let _ = writeln!(out, "[{name}], MaxLatency(us), {}", h.max());
        for (label, quantile) in [
            ("50th", 0.5),
            ("95th", 0.95),
            ("99th", 0.99),
            ("99.9th", 0.999),
        ] {
            let _ = writeln!(
                out,
                "[{name}], {label}PercentileLatency(us), {}",
                h.value_at_quantile(quantile)
            );
        }
        let _ = writeln!(out, "[{name}], Return=OK, {}", stats.ok);
        if stats.errors > 0 {
            let _ = writeln!(out, "[{name}], Return=ERROR, {}", stats.errors);
        }
    }
    out
}

/// Parse a report back into `(section, metric) → value`, as YCSB's scripts do.
pub fn parse(text: &str) -> Result<BTreeMap<(String, String), f64>, String> {
    let mut values = BTreeMap::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
    {
        let parts: Vec<&str> = line.splitn(3, ", ").collect();
        let [section, metric, value] = parts[..] else {
            return Err(format!(
                "line {}: expected `[SECTION], metric, value`: {line}",
                number + 1
            ));
        };
        let section = section
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .ok_or_else(|| format!("line {}: section is not in brackets: {line}", number + 1))?;
        let value: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("line {}: value is not a number: {line}", number + 1))?;
        values.insert((section.to_string(), metric.to_string()), value);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_parses_back_with_ycsb_names_and_values() {
        let mut operations = BTreeMap::new();
        let mut read = OperationStats::new();
        for latency in 1..=1000u64 {
            read.latency_us.record(latency).unwrap();
        }
        read.ok = 1000;
        operations.insert("READ".to_string(), read);
        let mut update = OperationStats::new();
        update.latency_us.record(50).unwrap();
        update.ok = 1;
        operations.insert("UPDATE".to_string(), update);
        let text = render(2000, &operations);
        let values = parse(&text).unwrap();
        let get = |section: &str, metric: &str| values[&(section.to_string(), metric.to_string())];
        assert_eq!(get("OVERALL", "RunTime(ms)"), 2000.0);
        assert_eq!(get("OVERALL", "Throughput(ops/sec)"), 500.5);
        assert_eq!(get("READ", "Operations"), 1000.0);
        assert_eq!(get("READ", "Return=OK"), 1000.0);
        assert!((get("READ", "50thPercentileLatency(us)") - 500.0).abs() <= 1.0);
        assert!((get("READ", "99.9thPercentileLatency(us)") - 999.0).abs() <= 1.0);
        assert_eq!(get("UPDATE", "MaxLatency(us)"), 50.0);
        assert!(parse("[READ] Operations 3").is_err());
    }
}
