//! The worker against a real PostgreSQL and pgBouncer: several agents share one pool in
//! transaction mode while the servers restart, pause and kill connections under them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use common::{TestBed, outcome, wait_for};
use pemworker::connection::pool;
use pemworker::probes::{PROBES, Target};
use pemworker::worker::stats::Snapshot;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

const LONG_WAIT: u64 = 5;

struct Agent {
    id: i32,
    cfg: PathBuf,
    state: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        vec![
            ("state_dir", self.state.display().to_string()),
            ("log_location", self.log.display().to_string()),
            ("short_wait", "2".into()),
            ("long_wait", LONG_WAIT.to_string()),
        ]
    }

    fn start(&mut self, bed: &TestBed) {
        self.child = Some(bed.start_worker(&self.cfg, &self.overrides()));
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// SIGTERM, then the exit status (bounded by the grace period plus slack).
    async fn stop(&mut self) -> i32 {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline =
            std::time::Instant::now() + pemworker::worker::SHUTDOWN_GRACE + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "agent {} did not stop in time",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stats(&self) -> Snapshot {
        serde_json::from_slice(&std::fs::read(self.state.join("stats.json")).unwrap()).unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.cfg.with_extension("stderr")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Registers `n` agents through pgBouncer, gives them 1-second heartbeats and OS probes, and
/// binds the bed's PostgreSQL and pgBouncer to the first (as the sandbox does).
async fn fleet(bed: &TestBed, n: usize) -> (Vec<Agent>, i32) {
    let mut agents = Vec::new();
    for i in 0..n {
        let (cfg, id) = bed.register_agent(&format!("agent{i}"));
        let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
        agents.push(Agent {
            id,
            cfg,
            state: site.join("state"),
            log: site.join("worker.log"),
            child: None,
        });
    }
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "fleet",
        "UPDATE pem.agent SET heartbeat_interval = 1; \
         INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
           SELECT a.id, NULL, p.id, 1, true FROM pem.agent a, pem.probe p WHERE p.target_type = 'agent';",
    )
    .await
    .unwrap();
    let server_id = pemworker::sandbox::bind_servers(bed, agents[0].id, &agents[0].cfg, 2)
        .await
        .unwrap();
    (agents, server_id)
}

async fn count(su: &Client, sql: &str, agent: i32) -> i64 {
    pool::query(su, "count", sql, &[(&agent, Type::INT4)])
        .await
        .unwrap()[0]
        .get(0)
}

async fn history_rows(su: &Client, probe: &str, agent: i32) -> i64 {
    count(
        su,
        &format!("SELECT count(*) FROM pemhistory.{probe} WHERE agent_id = $1"),
        agent,
    )
    .await
}

async fn server_now(su: &Client) -> String {
    pool::query(su, "now", "SELECT now()::text", &[])
        .await
        .unwrap()[0]
        .get(0)
}

/// Waits until every agent has sent a heartbeat after `since` (server time).
async fn heartbeats_after(
    bed: &TestBed,
    agents: &[Agent],
    since: &str,
    limit: Duration,
    what: &str,
) {
    let ids: Vec<i32> = agents.iter().map(|a| a.id).collect();
    let started = std::time::Instant::now();
    wait_for(what, limit, || async {
        let Ok(su) = pemworker::connection::connect(&bed.superuser()).await else {
            return false;
        };
        let n: i64 = pool::query(
            &su,
            "heartbeats",
            "SELECT count(*) FROM pem.agent_heartbeat WHERE agent_id = ANY($1) AND last_heartbeat > $2::text::timestamptz",
            &[(&ids, Type::INT4_ARRAY), (&since, Type::TEXT)],
        )
        .await
        .map(|r| r[0].get(0))
        .unwrap_or(0);
        n == ids.len() as i64
    })
    .await;
    // The time is printed for the record (cargo test -- --nocapture).
    eprintln!(
        "{what}: every agent's heartbeat after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_deliver_every_sample_exactly_once_across_outages() {
    let mut bed = TestBed::start();
    let (mut agents, server_id) = fleet(&bed, 3).await;
    for a in agents.iter_mut() {
        a.start(&bed);
    }
    let su = bed.connect(&bed.superuser()).await;

    // Samples of every kind arrive: OS, PostgreSQL (through the binding) and pgBouncer.
    let first = agents[0].id;
    let with_rows: Vec<&str> = PROBES
        .iter()
        .map(|p| p.name)
        .filter(|p| !["blocked_sessions", "streaming_replication"].contains(p))
        .collect();
    wait_for(
        "samples of every probe kind",
        Duration::from_secs(60),
        || async {
            for p in &with_rows {
                if history_rows(&su, p, first).await == 0 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let start = server_now(&su).await;
    heartbeats_after(
        &bed,
        &agents,
        &start,
        Duration::from_secs(10),
        "heartbeats of every agent",
    )
    .await;
    let down: i64 = pool::query(
        &su,
        "status",
        "SELECT count(*) FROM pem.agent_status WHERE is_down",
        &[],
    )
    .await
    .unwrap()[0]
        .get(0);
    assert_eq!(down, 0);

    // Plausible values.
    let row = &pool::query(
        &su,
        "cpu",
        "SELECT user_percent + system_percent + idle_percent + iowait_percent + steal_percent FROM pemdata.cpu_usage WHERE agent_id = $1",
        &[(&first, Type::INT4)],
    )
    .await
    .unwrap()[0];
    let total: f64 = row.get(0);
    assert!(
        (total - 100.0).abs() < 2.0,
        "cpu percentages sum to {total}"
    );
    let mem: i64 = count(
        &su,
        "SELECT total_bytes FROM pemdata.memory_usage WHERE agent_id = $1",
        first,
    )
    .await;
    assert!(mem > 64 << 20, "memory total {mem}");
    let version: String = pool::query(
        &su,
        "version",
        "SELECT version FROM pemdata.server_info WHERE agent_id = $1 AND server_id = $2",
        &[(&first, Type::INT4), (&server_id, Type::INT4)],
    )
    .await
    .unwrap()[0]
        .get(0);
    assert!(version.starts_with("PostgreSQL 15"), "{version}");
    let pem_size: i64 = count(
        &su,
        "SELECT size_bytes FROM pemdata.database_size WHERE agent_id = $1 AND database_name = 'pem'",
        first,
    )
    .await;
    assert!(pem_size > 1 << 20, "pem database size {pem_size}");
    let pools: i64 = count(
        &su,
        "SELECT count(*) FROM pemdata.pgbouncer_pools WHERE agent_id = $1 AND database = 'pem' AND user_name = 'pem_agent_user1'",
        first,
    )
    .await;
    assert_eq!(pools, 1, "SHOW POOLS row for the agents' pool");
    drop(su);

    // Reconnected within long_wait, seen as a heartbeat (1 s interval) after the outage ends.
    let limit = Duration::from_secs(LONG_WAIT + 2);
    // 1. pgBouncer restarts.
    bed.stop_pgbouncer();
    tokio::time::sleep(Duration::from_secs(4)).await;
    bed.start_pgbouncer();
    let su = bed.connect(&bed.superuser()).await;
    let up = server_now(&su).await;
    drop(su);
    heartbeats_after(
        &bed,
        &agents,
        &up,
        limit,
        "reconnection after a pgBouncer restart",
    )
    .await;

    // 2. PostgreSQL restarts. pgBouncer itself holds new logins back for server_login_retry
    //    after a failed server login (2 s in the test bed), which adds to the agents' time.
    bed.stop_postgres();
    tokio::time::sleep(Duration::from_secs(4)).await;
    bed.start_postgres();
    let su = bed.connect(&bed.superuser()).await;
    let up = server_now(&su).await;
    heartbeats_after(
        &bed,
        &agents,
        &up,
        limit + Duration::from_secs(2),
        "reconnection after a PostgreSQL restart",
    )
    .await;

    // 3. The pool is paused for 30 s.
    bed.console("PAUSE pem").await;
    let pause_start = server_now(&su).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let pause_end = server_now(&su).await;
    bed.console("RESUME pem").await;
    heartbeats_after(
        &bed,
        &agents,
        &pause_end,
        limit,
        "reconnection after PAUSE/RESUME",
    )
    .await;

    // 4. The database is killed on the console (new logins wait for RESUME).
    bed.console("KILL pem").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    bed.console("RESUME pem").await;
    let up = server_now(&su).await;
    heartbeats_after(&bed, &agents, &up, limit, "reconnection after KILL").await;

    for a in agents.iter_mut() {
        assert!(a.is_running(), "agent {} died: {}", a.id, a.stderr());
    }
    // Stop gracefully; then what each agent collected is on the server exactly once.
    for a in agents.iter_mut() {
        assert_eq!(a.stop().await, 0, "agent {} exit: {}", a.id, a.stderr());
    }
    for a in &agents {
        let stats = a.stats();
        assert_eq!(stats.spooled_samples, 0, "agent {}: spool left", a.id);
        assert_eq!(stats.dropped_samples, 0);
        for p in PROBES {
            let collected = stats.collected.get(p.name).map_or(0, |c| c.rows) as i64;
            let stored = history_rows(&su, p.name, a.id).await;
            assert_eq!(
                stored, collected,
                "agent {} probe {}: stored vs collected rows",
                a.id, p.name
            );
            if p.target == Target::Agent {
                assert!(
                    collected >= 40,
                    "agent {} collected only {collected} {} rows",
                    a.id,
                    p.name
                );
            }
        }
        // Samples taken while the pool was paused were delivered too.
        let during: i64 = pool::query(
            &su,
            "during pause",
            "SELECT count(*) FROM pemhistory.cpu_usage WHERE agent_id = $1 \
              AND collected_at BETWEEN $2::text::timestamptz AND $3::text::timestamptz",
            &[
                (&a.id, Type::INT4),
                (&pause_start, Type::TEXT),
                (&pause_end, Type::TEXT),
            ],
        )
        .await
        .unwrap()[0]
            .get(0);
        assert!(
            during >= 25,
            "agent {}: {during} cpu samples during the 30 s pause",
            a.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_log_level_and_sigterm_saves_the_spool() {
    let mut bed = TestBed::start();
    let (mut agents, _) = fleet(&bed, 1).await;
    let a = &mut agents[0];
    // A pem_host list whose first host does not resolve: the agent fails over to the second.
    // And SMTP notifications asked for behind a transaction pooler: a start-up warning.
    let mut cfg = std::fs::read_to_string(&a.cfg).unwrap();
    cfg = cfg.replace(
        "pem_host=127.0.0.1",
        "pem_host=no-such-host.invalid,127.0.0.1",
    );
    assert!(cfg.contains("no-such-host.invalid"), "{cfg}");
    cfg.push_str("enable_smtp=true\n");
    std::fs::write(&a.cfg, cfg).unwrap();
    a.start(&bed);
    let su = bed.connect(&bed.superuser()).await;
    wait_for("first samples", Duration::from_secs(30), || async {
        history_rows(&su, "cpu_usage", a.id).await > 2
    })
    .await;
    let log = || std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(!log().contains("DEBUG"), "debug lines at log_level=warning");
    wait_for("the LISTEN/NOTIFY warning", Duration::from_secs(10), || async {
        log().contains("enable_smtp is set, but this agent reaches the PEM server through a transaction pooler")
    })
    .await;

    // SIGHUP: the new level applies without a restart.
    let mut cfg = std::fs::read_to_string(&a.cfg).unwrap();
    cfg.push_str("log_level=debug1\n");
    std::fs::write(&a.cfg, cfg).unwrap();
    let pid = a.child.as_ref().unwrap().id();
    a.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(
        "debug lines after SIGHUP",
        Duration::from_secs(10),
        || async { log().contains("DEBUG") },
    )
    .await;
    assert!(a.is_running());
    assert_eq!(a.child.as_ref().unwrap().id(), pid);

    // SIGTERM while the pooler is down: exit 0 in time, samples saved in the spool.
    bed.stop_pgbouncer();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(a.stop().await, 0, "{}", a.stderr());
    let first_run = a.stats();
    assert!(first_run.spooled_samples > 0, "{first_run:?}");
    let spooled = std::fs::read_dir(a.state.join("spool")).unwrap().count();
    assert!(spooled > 0);

    // The next start delivers them; nothing lost, nothing twice.
    bed.start_pgbouncer();
    a.start(&bed);
    wait_for("the spool to drain", Duration::from_secs(60), || async {
        std::fs::read_dir(a.state.join("spool"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "json")
            })
            .count()
            == 0
    })
    .await;
    assert_eq!(a.stop().await, 0);
    let second_run = a.stats();
    let rows = |s: &Snapshot, p: &str| s.collected.get(p).map_or(0, |c| c.rows) as i64;
    for p in ["cpu_usage", "memory_usage", "load_average"] {
        let stored = history_rows(&su, p, a.id).await;
        assert_eq!(stored, rows(&first_run, p) + rows(&second_run, p), "{p}");
    }
}

fn write_mode(p: &Path, text: &str, mode: u32) {
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_bad_agent_cfg_gets_one_error_per_problem_and_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("agent.key");
    write_mode(&key, "not really a key", 0o644);
    let cfg = dir.path().join("agent.cfg");
    write_mode(
        &cfg,
        &format!(
            "[PEM/agent]\npem_host=127.0.0.1\npem_port=sixty-four\nagent_ssl_key={}\nagent_ssl_crt={}\npem_ssl_mode=require\n",
            key.display(),
            dir.path().join("missing.crt").display()
        ),
        0o644,
    );
    for extra in [&["--check-config"][..], &["-f"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pemworker"))
            .arg("-c")
            .arg(&cfg)
            .args(extra)
            .output()
            .unwrap();
        let (code, stdout, stderr) = outcome(&out);
        assert_eq!(code, 1, "{stdout}{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 4, "{stderr}");
        let has = |s: &str| lines.iter().any(|l| l.contains(s));
        assert!(
            has("agent.cfg:3: pem_port \"sixty-four\" is not a port number"),
            "{stderr}"
        );
        assert!(has("agent_id is missing"), "{stderr}");
        assert!(
            has("agent.cfg:4: agent_ssl_key") && has("group or world access"),
            "{stderr}"
        );
        assert!(
            has("agent.cfg:5: agent_ssl_crt") && has("missing.crt"),
            "{stderr}"
        );
    }
}
