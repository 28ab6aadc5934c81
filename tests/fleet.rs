//! `pemworker fleet`, short: 20 agents for 20 s through pgBouncer (pool_size 5) and then
//! directly, on the command's own throwaway servers. Its accounting must hold: every sample the
//! agents collected is in the server's history tables once, the agents' logins never hold more
//! server backends than pool_size, nothing is logged as a warning or error; the per-second CSV
//! and the plot are written. (The benchmark figures come from longer runs: README, "Fleet".)

use std::collections::HashMap;
use std::process::Command;

const AGENTS: usize = 20;
const POOL_SIZE: i64 = 5;

/// The value after `key` on the table line that starts with it (after two spaces).
fn table_value<'a>(table: &'a str, section: &str, key: &str) -> &'a str {
    let body = table
        .split("== ")
        .find(|s| s.starts_with(section))
        .unwrap_or_else(|| panic!("no {section} table in:\n{table}"));
    body.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key:?} in the {section} table:\n{body}"))
}

/// "240 (440)" or "240 (440); 0 left in spools" -> (240, 440, left)
fn counts(v: &str) -> (u64, u64, u64) {
    let (samples, rest) = v.split_once(" (").unwrap();
    let (rows, rest) = rest.split_once(')').unwrap();
    let left = rest
        .trim_start_matches("; ")
        .split_whitespace()
        .next()
        .map_or(0, |n| n.parse().unwrap());
    (samples.parse().unwrap(), rows.parse().unwrap(), left)
}

#[test]
fn twenty_agents_for_twenty_seconds_store_every_sample_once_within_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("fleet.csv");
    let plot = dir.path().join("fleet.svg");
    let log = dir.path().join("fleet.log");
    let out = Command::new(env!("CARGO_BIN_EXE_pemworker"))
        .args(["fleet", "--agents", &AGENTS.to_string(), "--mode", "both"])
        .args(["--duration", "20", "--ramp", "4"])
        .args(["--heartbeat-interval", "2", "--probe-interval", "2"])
        .args(["--pool-size", &POOL_SIZE.to_string()])
        .arg("--csv")
        .arg(&csv)
        .arg("--plot")
        .arg(&plot)
        .arg("--log")
        .arg(&log)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{stderr}\nlog:\n{}",
        out.status,
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    for section in ["pooled", "direct"] {
        let regs = table_value(&stdout, section, "registrations (all at once)");
        assert!(
            regs.starts_with(&format!("{AGENTS} ok, 0 failed, {AGENTS} distinct ids")),
            "{section}: {regs}"
        );
        let (collected, collected_rows, _) =
            counts(table_value(&stdout, section, "samples (rows) collected"));
        let (stored, stored_rows, left) = counts(table_value(
            &stdout,
            section,
            "samples (rows) on the server",
        ));
        // Six agent-level probes every 2 s for at least 20 s, per agent.
        let floor = (AGENTS * 6 * 10) as u64;
        assert!(collected >= floor, "{section}: {collected} < {floor}");
        assert_eq!(
            (stored, stored_rows),
            (collected, collected_rows),
            "{section}"
        );
        assert_eq!(left, 0, "{section}");
        assert_eq!(
            table_value(&stdout, section, "every sample stored exactly once"),
            "yes"
        );
        assert_eq!(
            table_value(&stdout, section, "warnings and errors"),
            "none",
            "{section}"
        );
        assert_eq!(
            table_value(&stdout, section, "unregistered"),
            AGENTS.to_string()
        );
    }

    // The per-second file: every agent connected at some point, the pooled agents' backends
    // within pool_size, the direct ones at least one per agent.
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let mut max_backends: HashMap<String, i64> = HashMap::new();
    let mut max_connected: HashMap<String, usize> = HashMap::new();
    let mut heartbeats = 0usize;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), header.len(), "{line}");
        let mode = f[col("mode")].to_string();
        let b: i64 = f[col("agent_backends")].parse().unwrap();
        let c: usize = f[col("agents_connected")].parse().unwrap();
        heartbeats += f[col("heartbeats")].parse::<usize>().unwrap();
        assert_eq!(f[col("errors")], "0", "{line}");
        let m = max_backends.entry(mode.clone()).or_default();
        *m = (*m).max(b);
        let m = max_connected.entry(mode).or_default();
        *m = (*m).max(c);
    }
    assert_eq!(max_connected["pooled"], AGENTS, "{text}");
    assert_eq!(max_connected["direct"], AGENTS, "{text}");
    assert!(
        (1..=POOL_SIZE).contains(&max_backends["pooled"]),
        "pooled agents held {} backends with pool_size {POOL_SIZE}",
        max_backends["pooled"]
    );
    assert!(
        max_backends["direct"] >= AGENTS as i64,
        "direct agents held only {} backends",
        max_backends["direct"]
    );
    assert!(heartbeats >= AGENTS * 2 * 10, "{heartbeats} heartbeats");

    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.trim_start().starts_with("<svg") || svg.trim_start().starts_with("<?xml"));
    assert!(svg.contains("pooled") && svg.contains("direct"));
}
