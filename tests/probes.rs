//! Server-level and pgBouncer probes against a real PostgreSQL 15 and a real pgBouncer 1.18.

mod common;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{SUPERUSER_PASSWORD, TestBed};
use pemworker::connection::pool;
use pemworker::probes::{self, PROBES, Row, Target, Value, pgbouncer, postgres};
use tokio_postgres::Client;

/// Longest wait for anything in these tests.
const WAIT: Duration = Duration::from_secs(20);
/// Statement timeout for probes that are expected to succeed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

const MONITOR_USER: &str = "probe_monitor";
const MONITOR_PASSWORD: &str = "monitor pw";

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {WAIT:?}"))
}

async fn sql(client: &Client, statement: &str) -> Vec<Vec<Option<String>>> {
    let rows = bounded(statement, pool::simple_rows(client, statement, statement))
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
    rows.iter()
        .map(|r| (0..r.len()).map(|i| r.get(i).map(String::from)).collect())
        .collect()
}

/// The only value of a one-row, one-column answer.
async fn scalar(client: &Client, statement: &str) -> String {
    sql(client, statement).await[0][0]
        .clone()
        .unwrap_or_else(|| panic!("{statement}: NULL"))
}

fn text(v: &Value) -> &str {
    match v {
        Value::Text(s) => s,
        other => panic!("expected text, got {other:?}"),
    }
}

fn number(v: &Value) -> f64 {
    text(v)
        .parse()
        .unwrap_or_else(|e| panic!("{v:?} is not a number: {e}"))
}

/// Runs a server-level probe and checks what every probe must satisfy: rows of the spec's
/// width holding only text and NULLs (the PEM server casts them), and unique keys.
async fn server_probe(client: &Client, probe: &str) -> Vec<Row> {
    let rows = bounded(probe, postgres::collect(client, probe, PROBE_TIMEOUT))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    check_shape(probe, &rows);
    rows
}

fn check_shape(probe: &str, rows: &[Row]) {
    let spec = probes::spec(probe).unwrap();
    let mut keys = Vec::new();
    for row in rows {
        assert_eq!(row.len(), spec.columns.len(), "{probe}: {row:?}");
        assert!(
            row.iter()
                .all(|v| matches!(v, Value::Text(_) | Value::Null)),
            "{probe}: {row:?}"
        );
        let key: Vec<&Value> = spec
            .key
            .iter()
            .map(|k| &row[spec.columns.iter().position(|(c, _)| c == k).unwrap()])
            .collect();
        assert!(!keys.contains(&key), "{probe}: duplicate key {key:?}");
        keys.push(key);
    }
    if spec.key.is_empty() {
        assert!(rows.len() <= 1, "{probe} is a single-row probe: {rows:?}");
    }
}

/// A role that has pg_monitor and nothing else, as a monitored server's agent user would.
async fn monitor_session(bed: &TestBed, superuser: &Client) -> Client {
    sql(
        superuser,
        &format!(
            "CREATE ROLE {MONITOR_USER} LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor"
        ),
    )
    .await;
    let monitor = bed
        .connect(&bed.direct(MONITOR_USER, MONITOR_PASSWORD))
        .await;
    assert_eq!(
        scalar(
            &monitor,
            "SELECT rolsuper::text FROM pg_roles WHERE rolname = current_user"
        )
        .await,
        "false"
    );
    monitor
}

/// pg_receivewal streaming from the bed, so that pg_stat_replication has a row; killed on drop.
struct WalReceiver {
    child: Child,
    log: PathBuf,
}

impl WalReceiver {
    fn start(bed: &TestBed) -> WalReceiver {
        let dir = bed.root.join("receivewal");
        std::fs::create_dir_all(&dir).unwrap();
        let log = bed.root.join("receivewal.stderr");
        let child = Command::new("pg_receivewal")
            .arg("-D")
            .arg(&dir)
            .args(["-h", "127.0.0.1", "-p", &bed.pg_port.to_string()])
            .args(["-U", "postgres", "-w", "--no-loop"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &bed.home)
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .env("PGAPPNAME", "probe_test_receiver")
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &bed.root_crt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run pg_receivewal (apt-get install postgresql-client-15)");
        WalReceiver { child, log }
    }
}

impl Drop for WalReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls a probe until `found` picks a row out of its answer; `context` says where to look
/// when none comes.
async fn wait_for_row(
    client: &Client,
    probe: &str,
    context: &str,
    found: impl Fn(&Row) -> bool,
) -> Row {
    bounded(&format!("waiting for a {probe} row ({context})"), async {
        loop {
            if let Some(row) = server_probe(client, probe).await.into_iter().find(&found) {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_probe_answers_a_pg_monitor_role_with_plausible_rows() {
    let bed = TestBed::start();
    let superuser = bed.connect(&bed.superuser()).await;
    let monitor = monitor_session(&bed, &superuser).await;

    let server_probes: Vec<&str> = PROBES
        .iter()
        .filter(|p| p.target() == Target::Server)
        .map(|p| p.name)
        .collect();
    for probe in &server_probes {
        server_probe(&monitor, probe).await;
    }

    let info = server_probe(&monitor, "server_info").await;
    let info = &info[0];
    assert!(text(&info[0]).starts_with("PostgreSQL 15"), "{info:?}");
    assert!(text(&info[1]).starts_with("20"), "ISO timestamp: {info:?}");
    assert!(number(&info[2]) >= 0.0, "{info:?}");
    assert_eq!(text(&info[3]), "false");
    assert_eq!(text(&info[4]), "200", "the bed sets max_connections = 200");

    let sizes = server_probe(&monitor, "database_size").await;
    let pem = sizes
        .iter()
        .find(|r| text(&r[0]) == "pem")
        .expect("a size for pem");
    assert!(number(&pem[1]) > 0.0, "{pem:?}");
    assert!(
        sizes.iter().all(|r| text(&r[0]) != "template0"),
        "template0 allows no connections: {sizes:?}"
    );

    // The monitor's own session is active while the probe runs.
    let sessions = server_probe(&monitor, "session_info").await;
    let active = sessions
        .iter()
        .find(|r| r[0] == Value::Text("pem".into()) && r[1] == Value::Text("active".into()))
        .unwrap_or_else(|| panic!("no active session in pem: {sessions:?}"));
    assert!(number(&active[2]) >= 1.0, "{active:?}");

    let bgwriter = server_probe(&monitor, "bgwriter_statistics").await;
    assert_eq!(bgwriter.len(), 1);
    assert!(bgwriter[0].iter().all(|v| number(v) >= 0.0), "{bgwriter:?}");

    // The probe's own transaction does not count as the oldest one.
    let xids = server_probe(&monitor, "xid_age").await;
    let names: Vec<&str> = xids.iter().map(|r| text(&r[0])).collect();
    assert!(
        names.contains(&"template0") && names.contains(&"pem"),
        "{names:?}"
    );
    for r in &xids {
        assert!(number(&r[1]) >= 0.0, "{r:?}");
        if text(&r[0]) == "template0" {
            assert_eq!(r[2], Value::Null, "nothing can run in template0: {r:?}");
        }
    }

    // A real standby connection: pg_receivewal streams WAL like one.
    let receiver = WalReceiver::start(&bed);
    let log = format!("pg_receivewal's log: {}", receiver.log.display());
    let standby = wait_for_row(&monitor, "streaming_replication", &log, |r| {
        r[0] == Value::Text("probe_test_receiver".into()) && r[2] == Value::Text("streaming".into())
    })
    .await;
    assert_eq!(text(&standby[1]), "127.0.0.1", "{standby:?}");
    assert!(text(&standby[3]).contains('/'), "an LSN: {standby:?}");
    drop(receiver);

    // A real lock conflict: one session holds a table lock, another waits for it.
    sql(&superuser, "CREATE TABLE probe_lock_target (i int)").await;
    let holder = bed.connect(&bed.superuser()).await;
    let waiter = bed.connect(&bed.superuser()).await;
    let holder_pid = scalar(&holder, "SELECT pg_backend_pid()").await;
    let waiter_pid = scalar(&waiter, "SELECT pg_backend_pid()").await;
    sql(
        &holder,
        "BEGIN; LOCK TABLE probe_lock_target IN ACCESS EXCLUSIVE MODE",
    )
    .await;
    let waiting = tokio::spawn(async move {
        let r = pool::simple_rows(
            &waiter,
            "reading the locked table",
            "SELECT count(*) FROM probe_lock_target",
        )
        .await
        .map(|rows| rows.len());
        drop(waiter);
        r
    });
    let blocked = wait_for_row(&monitor, "blocked_sessions", "a reader waits", |r| {
        text(&r[0]) == waiter_pid
    })
    .await;
    assert_eq!(text(&blocked[1]), holder_pid, "{blocked:?}");
    assert_eq!(text(&blocked[2]), "SELECT count(*) FROM probe_lock_target");
    assert!(number(&blocked[3]) >= 0.0, "{blocked:?}");
    // While the lock is held, pem has running transactions, hence an oldest one.
    let xids = server_probe(&monitor, "xid_age").await;
    let pem = xids.iter().find(|r| text(&r[0]) == "pem").unwrap();
    assert!(number(&pem[2]) > 0.0, "{pem:?}");

    sql(&holder, "COMMIT").await;
    let answer = bounded("the waiting query", waiting).await.unwrap();
    assert_eq!(answer.expect("the waiting query ends after COMMIT"), 1);
    let after = server_probe(&monitor, "blocked_sessions").await;
    assert!(after.is_empty(), "{after:?}");
    sql(&superuser, "DROP TABLE probe_lock_target").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_over_its_statement_timeout_fails_and_leaves_the_connection_clean() {
    let bed = TestBed::start();
    let superuser = bed.connect(&bed.superuser()).await;
    let monitor = monitor_session(&bed, &superuser).await;
    let monitor_pid = scalar(&monitor, "SELECT pg_backend_pid()").await;

    // pg_stat_bgwriter is a view over a function only, so locking it blocks nothing but its
    // readers: the bgwriter_statistics probe waits until its statement timeout.
    let holder = bed.connect(&bed.superuser()).await;
    sql(
        &holder,
        "BEGIN; LOCK TABLE pg_catalog.pg_stat_bgwriter IN ACCESS EXCLUSIVE MODE",
    )
    .await;
    let started = std::time::Instant::now();
    let err = bounded(
        "a probe past its timeout",
        postgres::collect(&monitor, "bgwriter_statistics", Duration::from_millis(300)),
    )
    .await
    .expect_err("the probe waits for the lock longer than its statement timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("probe bgwriter_statistics") && msg.contains("statement timeout"),
        "{msg}"
    );
    assert!(
        matches!(&err, probes::Error::Connection { source, .. }
            if source.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)),
        "{err:?}"
    );

    // The failed transaction was rolled back, and its settings went with it.
    let state = scalar(
        &superuser,
        &format!("SELECT state FROM pg_stat_activity WHERE pid = {monitor_pid}"),
    )
    .await;
    assert_eq!(state, "idle");
    assert_eq!(scalar(&monitor, "SHOW statement_timeout").await, "0");
    assert_eq!(
        scalar(&monitor, "SHOW search_path").await,
        "\"$user\", public"
    );

    sql(&holder, "ROLLBACK").await;
    let rows = server_probe(&monitor, "bgwriter_statistics").await;
    assert_eq!(rows.len(), 1);
    // A successful probe leaves no transaction open either.
    assert_eq!(
        scalar(
            &superuser,
            &format!("SELECT state FROM pg_stat_activity WHERE pid = {monitor_pid}"),
        )
        .await,
        "idle"
    );
    assert!(matches!(
        postgres::collect(&monitor, "cpu_usage", PROBE_TIMEOUT).await,
        Err(probes::Error::Unknown(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_probes_read_pools_and_stats_from_the_console() {
    let bed = TestBed::start();
    // A session through the pooler, so that pem has a pool and traffic.
    let pooled = bed.connect(&bed.admin_via_pooler()).await;
    assert_eq!(scalar(&pooled, "SELECT 1").await, "1");
    let console = {
        let mut s = bed.admin_via_pooler();
        s.dbname = "pgbouncer".into();
        bed.connect(&s).await
    };

    let pools = bounded(
        "pgbouncer_pools",
        pgbouncer::collect(&console, "pgbouncer_pools"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    check_shape("pgbouncer_pools", &pools);
    let pem = pools
        .iter()
        .find(|r| text(&r[0]) == "pem")
        .unwrap_or_else(|| panic!("no pool for pem: {pools:?}"));
    assert_eq!(text(&pem[1]), common::ADMIN_USER, "{pem:?}");
    for v in &pem[2..8] {
        assert!(number(v) >= 0.0, "{pem:?}");
    }
    assert!(
        ["session", "transaction", "statement"].contains(&text(&pem[8])),
        "{pem:?}"
    );

    let stats = bounded(
        "pgbouncer_stats",
        pgbouncer::collect(&console, "pgbouncer_stats"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    check_shape("pgbouncer_stats", &stats);
    let pem = stats
        .iter()
        .find(|r| text(&r[0]) == "pem")
        .unwrap_or_else(|| panic!("no stats for pem: {stats:?}"));
    for v in &pem[1..] {
        assert!(number(v) >= 0.0, "{pem:?}");
    }

    // The console still answers: nothing was sent in the extended protocol.
    assert!(!console.is_closed());
    assert!(matches!(
        pgbouncer::collect(&console, "server_info").await,
        Err(probes::Error::Unknown(_))
    ));
}
