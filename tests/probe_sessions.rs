//! Sessions to monitored servers and pgBouncer consoles are kept between probe rounds, with
//! PEM's meanings of connection_lifetime (how long an idle one is kept) and max_connections (how
//! many may be open), and a lost one is replaced.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use common::{TestBed, wait_for};
use pemworker::connection::pool;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(bed: &TestBed, cfg: &Path, extra: &[(&str, &str)]) -> (Running, PathBuf) {
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let log = site.join("worker.log");
    let mut o = vec![
        ("state_dir", site.join("state").display().to_string()),
        ("log_location", log.display().to_string()),
        ("short_wait", "2".into()),
        ("long_wait", "5".into()),
        ("log_level", "debug1".into()),
    ];
    o.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    (Running(bed.start_worker(cfg, &o)), log)
}

/// Backends of the monitoring login (the agent's probe sessions): pid and start time.
async fn monitor_backends(su: &Client) -> BTreeSet<(i32, String)> {
    pool::query(
        su,
        "monitor sessions",
        "SELECT pid, backend_start::text FROM pg_stat_activity WHERE usename = 'monitor'",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The test's own console session, told apart from the agent's by its application name.
async fn console(bed: &TestBed) -> Client {
    let mut s = pemworker::sandbox::servers::Servers::console(bed);
    s.application_name = "probe_sessions test".into();
    bed.connect(&s).await
}

/// Clients of pgBouncer's console other than the test's own: address, port and when each
/// connected.
async fn console_clients(console: &Client) -> BTreeSet<String> {
    pool::simple_rows(console, "SHOW CLIENTS", "SHOW CLIENTS")
        .await
        .unwrap()
        .iter()
        .filter(|r| {
            r.get("database") == Some("pgbouncer")
                && r.get("application_name") != Some("probe_sessions test")
        })
        .map(|r| {
            format!(
                "{}:{} since {}",
                r.get("addr").unwrap_or_default(),
                r.get("port").unwrap_or_default(),
                r.get("connect_time").unwrap_or_default()
            )
        })
        .collect()
}

async fn count(su: &Client, table: &str, agent: i32) -> i64 {
    pool::query_value(
        su,
        "count",
        &format!("SELECT count(*) FROM pemhistory.{table} WHERE agent_id = $1"),
        &[(&agent, Type::INT4)],
    )
    .await
    .unwrap()
}

/// Waits until `n` more samples of `table` were stored.
async fn rounds(su: &Client, table: &str, agent: i32, n: i64) {
    let from = count(su, table, agent).await;
    wait_for(
        &format!("{n} more {table} samples"),
        Duration::from_secs(60),
        || async { count(su, table, agent).await >= from + n },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_sessions_are_kept_between_rounds_and_replaced_when_lost() {
    let bed = TestBed::start();
    let (cfg, agent) = bed.register_agent("kept");
    pemworker::sandbox::bind_servers(&bed, agent, &cfg, 1)
        .await
        .unwrap();
    let su = bed.connect(&bed.superuser()).await;
    let console = console(&bed).await;
    let (_worker, log) = start(&bed, &cfg, &[]);
    rounds(&su, "server_info", agent, 2).await;
    rounds(&su, "pgbouncer_pools", agent, 2).await;

    // One login to each target served every round since.
    let backends = monitor_backends(&su).await;
    assert_eq!(backends.len(), 1, "{backends:?}");
    let clients = console_clients(&console).await;
    assert_eq!(clients.len(), 1, "{clients:?}");
    rounds(&su, "server_info", agent, 4).await;
    rounds(&su, "pgbouncer_stats", agent, 2).await;
    assert_eq!(monitor_backends(&su).await, backends);
    assert_eq!(console_clients(&console).await, clients);

    // A session the server ends is replaced, and the rounds go on.
    let (pid, _) = backends.iter().next().unwrap().clone();
    let ended: bool = pool::query_value(
        &su,
        "terminate",
        "SELECT pg_terminate_backend($1)",
        &[(&pid, Type::INT4)],
    )
    .await
    .unwrap();
    assert!(ended);
    rounds(&su, "server_info", agent, 3).await;
    rounds(&su, "pgbouncer_pools", agent, 2).await;
    let now = monitor_backends(&su).await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert!(!now.iter().any(|(p, _)| *p == pid), "{now:?}");
    assert_eq!(console_clients(&console).await.len(), 1);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_close_after_connection_lifetime_and_max_connections_bounds_them() {
    let bed = TestBed::start();
    let (cfg, agent) = bed.register_agent("bounded");
    pemworker::sandbox::bind_servers(&bed, agent, &cfg, 3)
        .await
        .unwrap();
    let su = bed.connect(&bed.superuser()).await;
    let (_worker, log) = start(
        &bed,
        &cfg,
        &[("connection_lifetime", "1"), ("max_connections", "1")],
    );
    // Both targets are probed, one session at a time.
    rounds(&su, "server_info", agent, 2).await;
    rounds(&su, "pgbouncer_stats", agent, 2).await;
    // Between rounds (every 3 s) the monitored server's session is closed after 1 s idle.
    wait_for(
        "the idle probe session to be closed",
        Duration::from_secs(30),
        || async { monitor_backends(&su).await.is_empty() },
    )
    .await;
    rounds(&su, "server_info", agent, 2).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        text.contains("probe sessions idle for connection_lifetime")
            || text.contains("connection_lifetime reached"),
        "{text}"
    );
}
