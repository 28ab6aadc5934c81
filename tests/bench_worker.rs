//! Benchmark, not a test: the worker's footprint at the default schedule with one monitored
//! server and one pgBouncer bound, over 60 s, and the heartbeat round trip through pgBouncer.
//!
//!     cargo test --release --test bench_worker -- --ignored --nocapture

mod common;

use std::time::{Duration, Instant};

use common::TestBed;
use pemworker::config::AgentConfig;
use pemworker::connection::pool;
use pemworker::mac::{self, Kind};
use pemworker::registration::agent_settings;
use tokio_postgres::types::Type;

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn worker_footprint_and_heartbeat_round_trip() {
    let bed = TestBed::start();
    let (cfg, agent_id) = bed.register_agent("bench");
    let su = bed.connect(&bed.superuser()).await;
    // One monitored server and one pgBouncer, at the catalogue's default intervals.
    pemworker::sandbox::bind_servers(&bed, agent_id, &cfg, 60)
        .await
        .unwrap();
    pool::execute(
        &su,
        "defaults",
        "DELETE FROM pem.probe_schedule WHERE agent_id = $1",
        &[(&agent_id, Type::INT4)],
    )
    .await
    .unwrap();

    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let mut child = bed.start_worker(
        &cfg,
        &[
            ("state_dir", site.join("state").display().to_string()),
            (
                "log_location",
                site.join("worker.log").display().to_string(),
            ),
        ],
    );
    let pid = child.id();
    // Let start-up pass (first connections, first round of every probe), then measure.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid);
    let mut peak = 0;
    while t0.elapsed() < Duration::from_secs(60) {
        peak = peak.max(proc_field(pid, "status", "VmRSS:").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ticks = cpu_ticks(pid) - c0;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    let cpu_pct = ticks as f64 / hz / t0.elapsed().as_secs_f64() * 100.0;
    let rss_end = proc_field(pid, "status", "VmRSS:").unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    let samples: i64 = pool::query(
        &su,
        "n",
        "SELECT count(*) FROM pemhistory.server_info WHERE agent_id = $1",
        &[(&agent_id, Type::INT4)],
    )
    .await
    .unwrap()[0]
        .get(0);
    assert!(samples > 0, "the monitored server was probed");
    println!(
        "worker over 60 s (default schedule, 1 monitored server, 1 pgBouncer): RSS peak {:.1} MiB, at end {:.1} MiB; CPU {:.2}% of one core (targets: < 16 MiB, < 0.5%)",
        peak as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        cpu_pct
    );

    // Heartbeat round trip through pgBouncer, as the agent sends it: its own READ WRITE
    // transaction, authenticated with the agent's secret.
    let (_, id) = AgentConfig::load_with_document(&cfg).unwrap();
    let key = id.agent_secret.clone().expect("the agent's secret");
    let mut s = agent_settings(&id).unwrap();
    s.root_cert = Some(bed.root_crt.clone());
    let client = bed.connect(&s).await;
    let version = "bench".to_string();
    let mut times = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        let sent_at = mac::now();
        let signature = key.sign(Kind::Heartbeat, agent_id, &sent_at, &version);
        let params: [pool::Param<'_>; 4] = [
            (&agent_id, Type::INT4),
            (&version, Type::TEXT),
            (&sent_at, Type::TEXT),
            (&signature, Type::TEXT),
        ];
        let beat = pool::query(
            &client,
            "heartbeat",
            "SELECT * FROM pem.record_heartbeat($1, $2, $3, $4)",
            &params,
        );
        pool::transaction(&client, "a heartbeat", beat)
            .await
            .unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "heartbeat round trip through pgBouncer (BEGIN, record_heartbeat, COMMIT), 1000 beats: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}
