//! The worker against a real PostgreSQL and pgBouncer: several agents share one pool in
//! transaction mode while the servers restart, pause and kill connections under them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use common::{TestBed, log_heartbeats, outcome, wait_for};
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
    /// Extra environment (test hooks, STATE_DIRECTORY).
    env: Vec<(&'static str, String)>,
    /// Whether `state` is passed as state_dir (else the agent uses its default).
    own_state: bool,
}

impl Agent {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        let mut o = vec![
            ("log_location", self.log.display().to_string()),
            ("short_wait", "2".into()),
            ("long_wait", LONG_WAIT.to_string()),
        ];
        if self.own_state {
            o.push(("state_dir", self.state.display().to_string()));
        }
        o
    }

    fn start(&mut self, bed: &TestBed) {
        self.child = Some(bed.start_worker_env(&self.cfg, &self.overrides(), &self.env));
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `pemworker spool <args>` for this agent, as an operator runs it.
    fn spool(&self, bed: &TestBed, args: &[&str]) -> (i32, String, String) {
        let mut a = vec!["spool"];
        a.extend_from_slice(args);
        let mut o = Vec::new();
        if self.own_state {
            o.push(("state_dir", self.state.display().to_string()));
        }
        let out = bed
            .agent_command(&self.cfg, &a, &o, &self.env)
            .output()
            .unwrap();
        outcome(&out)
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
            env: Vec::new(),
            own_state: true,
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
            if p.target() == Target::Agent {
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
    assert!(spooled_batches(&a.state) > 0);

    // The next start delivers them; nothing lost, nothing twice.
    bed.start_pgbouncer();
    a.start(&bed);
    wait_for("the spool to drain", Duration::from_secs(60), || async {
        spooled_batches(&a.state) == 0
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

/// Batches waiting in a state directory's spool.
fn spooled_batches(state: &Path) -> usize {
    std::fs::read_dir(state.join("spool"))
        .unwrap()
        .filter(|e| {
            let p = e.as_ref().unwrap().path();
            p.is_file() && p.extension().is_some_and(|x| x == "json")
        })
        .count()
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

// ---------------------------------------------------------------------------------------------
// Worker discipline: one owner per session, nothing set aside, one worker per spool, tasks
// that cannot die silently, a worker that sleeps until it has work.
// ---------------------------------------------------------------------------------------------

/// The role whose INSERT on a pemhistory table the delivery depends on: agents hold no table
/// privileges and write through pem.store_samples, a SECURITY DEFINER function owned by
/// pem_writer.
const WRITER_ROLE: &str = "pem_writer";

/// The longest time between two logged heartbeats of `agent` in [from, to] (server times).
async fn longest_heartbeat_gap(su: &Client, agent: i32, from: &str, to: &str) -> (f64, i64) {
    let row = pool::query_one(
        su,
        "gaps",
        "WITH h AS (SELECT at, at - lag(at) OVER (ORDER BY at) AS gap FROM public.heartbeat_log \
                     WHERE agent_id = $1 AND at BETWEEN $2::text::timestamptz AND $3::text::timestamptz) \
         SELECT coalesce(extract(epoch FROM max(gap))::float8, 0), count(*) FROM h",
        &[(&agent, Type::INT4), (&from, Type::TEXT), (&to, Type::TEXT)],
    )
    .await
    .unwrap();
    (row.get(0), row.get(1))
}

/// Stored rows equal collected rows for every probe, after the agent stopped; `less` says
/// which probe may miss how many rows.
async fn stored_exactly_once(su: &Client, a: &Agent, less: &[(&str, i64)]) {
    let stats = a.stats();
    for p in PROBES {
        let collected = stats.collected.get(p.name).map_or(0, |c| c.rows) as i64;
        let missing = less
            .iter()
            .find(|(n, _)| *n == p.name)
            .map_or(0, |(_, m)| *m);
        let stored = history_rows(su, p.name, a.id).await;
        assert_eq!(
            stored,
            collected - missing,
            "agent {} probe {}: stored vs collected rows",
            a.id,
            p.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_issued_during_a_failing_delivery_is_stored() {
    let bed = TestBed::start();
    let (mut agents, _) = fleet(&bed, 1).await;
    let a = &mut agents[0];
    let su = bed.connect(&bed.superuser()).await;
    log_heartbeats(&su).await;
    a.start(&bed);
    wait_for("first samples", Duration::from_secs(30), || async {
        history_rows(&su, "cpu_usage", a.id).await > 0
    })
    .await;

    // The next three deliveries that store CPU samples fail on the server after 3 s inside
    // their transaction; the start of each is kept in a sequence (not rolled back).
    pool::batch(
        &su,
        "fault",
        "CREATE SEQUENCE public.fault_hits; \
         CREATE SEQUENCE public.fault_at_1; CREATE SEQUENCE public.fault_at_2; CREATE SEQUENCE public.fault_at_3; \
         CREATE FUNCTION public.fault() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
           SET search_path = pg_catalog, pg_temp AS $$ DECLARE n bigint; BEGIN \
             n := nextval('public.fault_hits'); \
             IF n <= 3 THEN \
               PERFORM setval(format('public.fault_at_%s', n), (extract(epoch FROM clock_timestamp()) * 1000)::bigint); \
               PERFORM pg_sleep(3); \
               RAISE EXCEPTION 'injected delivery fault % of 3', n USING ERRCODE = 'XX000'; \
             END IF; \
             RETURN NULL; END $$; \
         CREATE TRIGGER fault BEFORE INSERT ON pemhistory.cpu_usage \
           FOR EACH STATEMENT EXECUTE FUNCTION public.fault();",
    )
    .await
    .unwrap();
    wait_for(
        "three failed deliveries",
        Duration::from_secs(60),
        || async {
            pool::query_one(&su, "hits", "SELECT last_value FROM public.fault_hits", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                > 3
        },
    )
    .await;
    for i in 1..=3 {
        let row = pool::query_one(
            &su,
            "window",
            &format!(
                "SELECT count(*) FROM public.heartbeat_log, \
                        (SELECT to_timestamp(last_value / 1000.0) AS t FROM public.fault_at_{i}) f \
                  WHERE agent_id = $1 AND at > f.t AND at < f.t + interval '3 s'"
            ),
            &[(&a.id, Type::INT4)],
        )
        .await
        .unwrap();
        let inside: i64 = row.get(0);
        eprintln!("failing delivery {i}: {inside} heartbeats stored while it ran");
        assert!(
            inside >= 1,
            "no heartbeat stored during failing delivery {i}"
        );
    }
    assert!(a.log_text().contains("injected delivery fault"));
    assert_eq!(a.stop().await, 0, "{}", a.stderr());
    stored_exactly_once(&su, a, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_privilege_sets_nothing_aside_and_is_logged_once_with_the_fix() {
    let bed = TestBed::start();
    let (mut agents, _) = fleet(&bed, 1).await;
    let a = &mut agents[0];
    let su = bed.connect(&bed.superuser()).await;
    a.start(&bed);
    wait_for("first samples", Duration::from_secs(30), || async {
        history_rows(&su, "cpu_usage", a.id).await > 0
    })
    .await;

    pool::batch(
        &su,
        "revoke",
        &format!("REVOKE INSERT ON pemhistory.cpu_usage FROM {WRITER_ROLE}"),
    )
    .await
    .unwrap();
    let revoked = std::time::Instant::now();
    wait_for(
        "the refusal shown in stats.json",
        Duration::from_secs(20),
        || async {
            std::fs::read(a.state.join("stats.json"))
                .ok()
                .and_then(|d| serde_json::from_slice::<Snapshot>(&d).ok())
                .and_then(|s| s.delivery_problem)
                .is_some_and(|p| p.contains("42501"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(revoked.elapsed())).await;
    pool::batch(
        &su,
        "grant",
        &format!("GRANT INSERT ON pemhistory.cpu_usage TO {WRITER_ROLE}"),
    )
    .await
    .unwrap();
    wait_for(
        "the spool to drain after the grant",
        Duration::from_secs(30),
        || async { spooled_batches(&a.state) == 0 },
    )
    .await;
    assert_eq!(a.stop().await, 0, "{}", a.stderr());

    let stats = a.stats();
    assert_eq!(stats.refused_samples, 0, "{stats:?}");
    assert_eq!(stats.dropped_samples, 0);
    assert_eq!(stats.delivery_problem, None);
    let refused_files = std::fs::read_dir(a.state.join("spool/rejected"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "json")
        })
        .count();
    assert_eq!(refused_files, 0, "nothing set aside");
    stored_exactly_once(&su, a, &[]).await;

    let log = a.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("permission denied"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once: {lines:#?}");
    assert!(
        lines[0].contains("42501") && lines[0].contains("grant it back on the PEM server"),
        "says what is wrong and how to fix it: {}",
        lines[0]
    );
    assert!(log.contains("delivery works again"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_refused_as_data_is_kept_shown_and_replayed() {
    let bed = TestBed::start();
    let (mut agents, _) = fleet(&bed, 1).await;
    let a = &mut agents[0];
    // The server accepts process counts below a billion; one sample claims two billion.
    a.env.push((
        "PEMWORKER_TEST_HOOKS",
        "bad-value=process_count:2000000000".into(),
    ));
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "range",
        "ALTER TABLE pemhistory.process_count ADD CONSTRAINT total_range CHECK (total < 1000000000)",
    )
    .await
    .unwrap();
    a.start(&bed);
    wait_for(
        "one refused sample and later ones stored",
        Duration::from_secs(60),
        || async {
            let refused = std::fs::read(a.state.join("stats.json"))
                .ok()
                .and_then(|d| serde_json::from_slice::<Snapshot>(&d).ok())
                .is_some_and(|s| s.refused_samples == 1);
            refused && history_rows(&su, "process_count", a.id).await >= 3
        },
    )
    .await;

    // Shown while the worker runs; a replay before the cause is fixed is refused again.
    let (code, out, err) = a.spool(&bed, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("refused by the PEM server: 1 samples"),
        "{out}"
    );
    assert!(
        out.contains("process_count")
            && out.contains("23514")
            && out.contains("violates check constraint \"total_range\""),
        "{out}"
    );
    assert!(out.contains("worker running"), "{out}");
    let (code, out, err) = a.spool(&bed, &["replay"]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(out.contains("refused again"), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");

    assert_eq!(a.stop().await, 0, "{}", a.stderr());
    // The refused sample is the only one not stored.
    stored_exactly_once(&su, a, &[("process_count", 1)]).await;

    // The administrator widens the range; the replay stores the sample.
    pool::batch(
        &su,
        "widen",
        "ALTER TABLE pemhistory.process_count DROP CONSTRAINT total_range",
    )
    .await
    .unwrap();
    let (code, out, err) = a.spool(&bed, &["replay"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stored"), "{out}");
    let (_, out, _) = a.spool(&bed, &["status"]);
    assert!(
        out.contains("refused by the PEM server: 0 samples"),
        "{out}"
    );
    stored_exactly_once(&su, a, &[]).await;
    let big: i64 = pool::query_one(
        &su,
        "big",
        "SELECT count(*) FROM pemhistory.process_count WHERE agent_id = $1 AND total = 2000000000",
        &[(&a.id, Type::INT4)],
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(big, 1, "the replayed sample is the refused one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_per_state_directory_and_one_directory_per_agent() {
    let bed = TestBed::start();
    let (mut agents, _) = fleet(&bed, 2).await;
    let su = bed.connect(&bed.superuser()).await;
    // Both agents use the default state directory, under the same base (systemd's
    // STATE_DIRECTORY), where an earlier version left one shared spool with one batch.
    let base = bed.home.join("state-base");
    std::fs::create_dir_all(base.join("spool")).unwrap();
    let legacy = pemworker::probes::Sample::new(
        "load_average",
        None,
        None,
        vec![vec![
            pemworker::probes::Value::Float(0.25),
            pemworker::probes::Value::Float(0.5),
            pemworker::probes::Value::Float(0.75),
        ]],
    );
    let legacy_key = legacy.rows[0].0.to_string();
    std::fs::write(
        base.join("spool/00000000000000000001.json"),
        serde_json::to_vec(&[&legacy]).unwrap(),
    )
    .unwrap();
    for a in agents.iter_mut() {
        a.own_state = false;
        a.state = base.join(format!("agent{}", a.id));
        a.env.push(("STATE_DIRECTORY", base.display().to_string()));
    }
    agents[0].start(&bed);
    wait_for(
        "the first agent to take over the shared spool",
        Duration::from_secs(20),
        || async { !base.join("spool").exists() },
    )
    .await;
    agents[1].start(&bed);

    // A second worker on the first agent's state directory: one line, exit 1.
    let second = bed
        .agent_command(
            &agents[0].cfg,
            &["-f"],
            &agents[0].overrides(),
            &agents[0].env,
        )
        .output()
        .unwrap();
    let (code, out, err) = outcome(&second);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("is in use by another worker")
            && err.contains(&format!("(pid {})", agents[0].pid()))
            && err.contains(&agents[0].state.display().to_string()),
        "{err}"
    );

    wait_for(
        "samples of both agents",
        Duration::from_secs(30),
        || async {
            history_rows(&su, "cpu_usage", agents[0].id).await > 2
                && history_rows(&su, "cpu_usage", agents[1].id).await > 2
        },
    )
    .await;
    for a in agents.iter_mut() {
        assert!(a.is_running(), "{}", a.stderr());
        assert_eq!(a.stop().await, 0, "{}", a.stderr());
        assert!(a.state.join("lock").exists());
    }
    let owner: i32 = pool::query_one(
        &su,
        "legacy",
        "SELECT agent_id FROM pemhistory.load_average WHERE delivery_key = $1::text::uuid",
        &[(&legacy_key, Type::TEXT)],
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(
        owner, agents[0].id,
        "the shared spool went to the agent that took it"
    );
    assert!(agents[0].log_text().contains("moved 1 spooled batches"));
    stored_exactly_once(&su, &agents[1], &[]).await;
    // The first agent stored one load_average row more than it collected: the adopted one.
    stored_exactly_once(&su, &agents[0], &[("load_average", -1)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_logged_with_its_name_and_the_rest_goes_on() {
    let bed = TestBed::start();
    let (mut agents, _) = fleet(&bed, 1).await;
    let a = &mut agents[0];
    a.env.push((
        "PEMWORKER_TEST_HOOKS",
        "panic-probe=load_average,panic-probe=session_info,panic-task=collector".into(),
    ));
    let su = bed.connect(&bed.superuser()).await;
    log_heartbeats(&su).await;
    a.start(&bed);
    wait_for("the panics in the log", Duration::from_secs(30), || async {
        let log = a.log_text();
        log.contains("task collector panicked: injected panic in task collector")
            && log.contains("probe load_average panicked: injected panic in probe load_average")
            && log.contains("probe session_info on server")
            && log.contains("task collector: started again")
    })
    .await;
    let t0 = server_now(&su).await;
    let (cpu0, db0) = (
        history_rows(&su, "cpu_usage", a.id).await,
        history_rows(&su, "database_size", a.id).await,
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let t1 = server_now(&su).await;
    assert!(a.is_running(), "{}", a.stderr());
    assert!(history_rows(&su, "cpu_usage", a.id).await > cpu0);
    assert!(history_rows(&su, "database_size", a.id).await > db0);
    let (_, beats) = longest_heartbeat_gap(&su, a.id, &t0, &t1).await;
    assert!(beats >= 3, "{beats} heartbeats in 6 s");
    assert_eq!(history_rows(&su, "load_average", a.id).await, 0);
    assert_eq!(history_rows(&su, "session_info", a.id).await, 0);
    assert_eq!(a.stop().await, 0, "{}", a.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitored_server_that_hangs_on_connect_does_not_delay_heartbeats() {
    let bed = TestBed::start();
    let (mut agents, _) = fleet(&bed, 1).await;
    let a = &mut agents[0];
    let su = bed.connect(&bed.superuser()).await;
    log_heartbeats(&su).await;
    // A "server" that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = i32::from(listener.local_addr().unwrap().port());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let hang = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(sock);
        }
    });
    pool::query(
        &su,
        "hanging server",
        "WITH s AS (INSERT INTO pem.server (display_name, server_addr, port, database, username) \
                    VALUES ('hanging', '127.0.0.1', $2, 'postgres', 'monitor') RETURNING id), \
              b AS (INSERT INTO pem.agent_server_binding (agent_id, server_id, sslmode) SELECT $1, id, 'prefer' FROM s) \
         INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
         SELECT $1, s.id, p.id, 1, true FROM s, pem.probe p WHERE p.target_type = 'server'",
        &[(&a.id, Type::INT4), (&port, Type::INT4)],
    )
    .await
    .unwrap();
    // Recorded on this host as `--register-server` would, so the agent is willing to connect.
    let targets = pemworker::targets::file_for(&a.cfg);
    pemworker::targets::Registry::load(&targets)
        .unwrap()
        .with(pemworker::targets::Target {
            kind: pemworker::targets::Kind::Server,
            host: "127.0.0.1".into(),
            port: port as u16,
            database: "postgres".into(),
            user: "monitor".into(),
            sslmode: "prefer".into(),
            root_cert: None,
            efm: None,
        })
        .stage(&targets)
        .unwrap()
        .commit()
        .unwrap();
    a.start(&bed);
    wait_for(
        "a connection to the hanging server",
        Duration::from_secs(30),
        || async { accepted.load(std::sync::atomic::Ordering::SeqCst) > 0 },
    )
    .await;
    let t0 = server_now(&su).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let t1 = server_now(&su).await;
    let (gap, beats) = longest_heartbeat_gap(&su, a.id, &t0, &t1).await;
    eprintln!(
        "heartbeats (interval 1 s) while a monitored server hangs on connect for 30 s: {beats}, longest gap {gap:.2} s"
    );
    assert!(beats >= 20, "{beats} heartbeats in 30 s");
    assert!(
        gap <= 2.0,
        "a heartbeat was delayed by more than 1 s: gap {gap:.2} s"
    );
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the agent kept trying the hanging server"
    );
    // The other monitored server goes on being probed.
    let info = history_rows(&su, "server_info", a.id).await;
    assert!(info > 0);
    assert!(a.is_running(), "{}", a.stderr());
    assert_eq!(a.stop().await, 0, "{}", a.stderr());
    hang.abort();
}

/// Context switches of every thread of `pid`, the thread ids, and the bytes it had written to
/// storage.
fn footprint(pid: u32) -> (u64, Vec<String>, u64) {
    let mut switches = 0;
    let mut threads = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        threads.push(t.file_name().to_string_lossy().into_owned());
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in status.lines() {
            if let Some(v) = l
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap();
            }
        }
    }
    threads.sort();
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let written = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (switches, threads, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_wakes_only_for_its_intervals() {
    let bed = TestBed::start();
    let (cfg, id) = bed.register_agent("idle");
    let su = bed.connect(&bed.superuser()).await;
    pool::execute(
        &su,
        "idle schedule",
        "WITH a AS (UPDATE pem.agent SET heartbeat_interval = 60 WHERE id = $1) \
         INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
         SELECT $1, NULL, p.id, 300, true FROM pem.probe p WHERE p.target_type = 'agent'",
        &[(&id, Type::INT4)],
    )
    .await
    .unwrap();
    pemworker::sandbox::bind_servers(&bed, id, &cfg, 300)
        .await
        .unwrap();
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let mut a = Agent {
        id,
        cfg: cfg.clone(),
        state: site.join("state"),
        log: site.join("worker.log"),
        child: None,
        env: Vec::new(),
        own_state: true,
    };
    // The defaults for short_wait and long_wait, as an installed agent has them.
    a.child = Some(bed.start_worker(
        &a.cfg,
        &[
            ("state_dir", a.state.display().to_string()),
            ("log_location", a.log.display().to_string()),
        ],
    ));
    wait_for(
        "the first round of every kind",
        Duration::from_secs(60),
        || async {
            history_rows(&su, "cpu_usage", id).await > 0
                && history_rows(&su, "server_info", id).await > 0
                && history_rows(&su, "pgbouncer_pools", id).await > 0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pid = a.pid();
    let (s0, threads0, w0) = footprint(pid);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let (s1, threads1, w1) = footprint(pid);
    eprintln!(
        "idle worker over 120 s (probes every 300 s, heartbeat every 60 s): {} context switches in {} threads, {} bytes written",
        s1 - s0,
        threads1.len(),
        w1 - w0
    );
    assert_eq!(
        threads0, threads1,
        "no thread started or ended, so every switch is counted"
    );
    assert!(s1 - s0 < 60, "{} context switches in 120 s", s1 - s0);
    assert_eq!(w1 - w0, 0, "disk writes between batches");
    assert!(a.is_running(), "{}", a.stderr());
    assert_eq!(a.stop().await, 0, "{}", a.stderr());
}
