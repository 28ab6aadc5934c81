//! Monitored servers and probe settings through pgBouncer, with a running agent.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use common::{ADMIN_PASSWORD, ADMIN_USER, TestBed, outcome, wait_for};
use pemworker::connection::pool;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

const MONITOR_PASSWORD: &str = "Monitor-S3cret!pw";

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config_dir(cfg: &Path) -> String {
    cfg.parent().unwrap().display().to_string()
}

fn run(bed: &TestBed, args: &[String], env: &[(&str, &str)]) -> (i32, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut e = vec![("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)];
    e.extend_from_slice(env);
    outcome(&bed.pemworker_env(&args, &e))
}

fn args(cfg: &Path, mode: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = mode.iter().map(|s| s.to_string()).collect();
    a.extend([
        "--pem-user".into(),
        ADMIN_USER.into(),
        "--config-dir".into(),
        config_dir(cfg),
    ]);
    a
}

fn register_server_args(cfg: &Path, user: &str, port: u16) -> Vec<String> {
    let mut a = args(cfg, &["--register-server"]);
    a.extend(
        [
            "--server-addr",
            "127.0.0.1",
            "--server-port",
            &port.to_string(),
            "--server-database",
            "postgres",
            "--server-user",
            user,
            "--asb-ssl-mode",
            "require",
            "--display-name",
            "test bed",
        ]
        .map(String::from),
    );
    a
}

async fn rows(su: &Client, sql: &str, agent: i32) -> i64 {
    pool::query(su, "count", sql, &[(&agent, Type::INT4)])
        .await
        .unwrap()[0]
        .get(0)
}

async fn server_rows(su: &Client, agent: i32) -> i64 {
    rows(
        su,
        "SELECT count(*) FROM pemhistory.server_info WHERE agent_id = $1",
        agent,
    )
    .await
}

async fn cpu_rows(su: &Client, agent: i32) -> i64 {
    rows(
        su,
        "SELECT count(*) FROM pemhistory.cpu_usage WHERE agent_id = $1",
        agent,
    )
    .await
}

fn start(bed: &TestBed, cfg: &Path) -> (Running, PathBuf) {
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let log = site.join("worker.log");
    let child = bed.start_worker(
        cfg,
        &[
            ("state_dir", site.join("state").display().to_string()),
            ("log_location", log.display().to_string()),
            ("short_wait", "2".into()),
            ("long_wait", "5".into()),
        ],
    );
    (Running(child), log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_server_is_probed_until_it_is_unregistered() {
    let bed = TestBed::start();
    let (cfg, agent) = bed.register_agent("agent");
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "monitor",
        &format!("CREATE ROLE monitor LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor"),
    )
    .await
    .unwrap();
    let cpu = args(
        &cfg,
        &[
            "--enable-probe",
            "--probe-interval",
            "2",
            "--probe-internal-name",
            "cpu_usage",
        ],
    );
    assert_eq!(run(&bed, &cpu, &[]).0, 0);
    let (mut worker, log) = start(&bed, &cfg);

    let (code, out, err) = run(
        &bed,
        &register_server_args(&cfg, "monitor", bed.pg_port),
        &[("PEM_MONITORED_SERVER_PASSWORD", MONITOR_PASSWORD)],
    );
    assert_eq!(code, 0, "{out}{err}");
    let pgpass = bed.home.join(".pgpass");
    assert_eq!(
        std::fs::metadata(&pgpass).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A shorter interval for the server's probe, set while the agent runs.
    let mut a = args(
        &cfg,
        &[
            "--set-probe-interval",
            "2",
            "--probe-internal-name",
            "server_info",
        ],
    );
    a.extend([
        "--asb-host-name".into(),
        "127.0.0.1".into(),
        "--server-port".into(),
        bed.pg_port.to_string(),
    ]);
    let (code, out, err) = run(&bed, &a, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("every 2 s"), "{out}");
    wait_for(
        "samples of the registered server",
        Duration::from_secs(15),
        || async { server_rows(&su, agent).await >= 2 },
    )
    .await;

    // No password in plain text on the PEM server, in the logs or in agent.cfg.
    let tables: Vec<String> = pool::query(
        &su,
        "tables",
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname IN ('pem', 'pemdata', 'pemhistory') AND c.relkind IN ('r', 'v')",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    assert!(tables.len() > 30);
    for t in &tables {
        let sql = format!("SELECT count(*) FROM {t} x WHERE x::text LIKE '%' || $1 || '%'");
        let n: i64 = pool::query(&su, "scan", &sql, &[(&MONITOR_PASSWORD, Type::TEXT)])
            .await
            .unwrap()[0]
            .get(0);
        assert_eq!(n, 0, "the monitored password is in {t}");
    }
    for f in [
        log.clone(),
        cfg.clone(),
        bed.pgb_run_dir.join("postgresql.log"),
        bed.pgb_run_dir.join("pgbouncer.log"),
    ] {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        assert!(
            !text.contains(MONITOR_PASSWORD),
            "the monitored password is in {}",
            f.display()
        );
    }
    assert!(
        std::fs::read_to_string(&pgpass)
            .unwrap()
            .contains(&format!("monitor:{MONITOR_PASSWORD}"))
    );

    // Unregistered: no new samples, and the agent keeps running.
    let port = bed.pg_port.to_string();
    let a = args(
        &cfg,
        &[
            "--unregister-server",
            "--asb-host-name",
            "127.0.0.1",
            "--server-port",
            &port,
        ],
    );
    let (code, out, err) = run(&bed, &a, &[]);
    assert_eq!(code, 0, "{out}{err}");
    tokio::time::sleep(Duration::from_secs(5)).await; // short_wait + a round in flight
    let before = server_rows(&su, agent).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        server_rows(&su, agent).await,
        before,
        "samples after --unregister-server"
    );
    assert!(worker.0.try_wait().unwrap().is_none(), "the agent stopped");
    let before_cpu = cpu_rows(&su, agent).await;
    wait_for(
        "the agent's own probes to go on",
        Duration::from_secs(10),
        || async { cpu_rows(&su, agent).await > before_cpu },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_disabled_enabled_and_retimed_while_the_agent_runs() {
    let bed = TestBed::start();
    let (cfg, agent) = bed.register_agent("agent");
    let su = bed.connect(&bed.superuser()).await;
    let probe = |mode: &[&str], sel: &[&str]| {
        let mut a = args(&cfg, mode);
        a.extend(sel.iter().map(|s| s.to_string()));
        run(&bed, &a, &[])
    };
    let (code, _, err) = probe(
        &["--enable-probe", "--probe-interval", "1"],
        &["--probe-internal-name", "cpu_usage"],
    );
    assert_eq!(code, 0, "{err}");
    let (_worker, _) = start(&bed, &cfg);
    wait_for(
        "cpu samples every second",
        Duration::from_secs(20),
        || async { cpu_rows(&su, agent).await >= 5 },
    )
    .await;

    // Disabled: no new samples within long_wait.
    let (code, out, err) = probe(&["--disable-probe"], &["--probe-display-name", "CPU Usage"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("disabled"), "{out}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let frozen = cpu_rows(&su, agent).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        cpu_rows(&su, agent).await,
        frozen,
        "samples of a disabled probe"
    );

    // Enabled again (by id): samples come back.
    let id: i32 = pool::query(
        &su,
        "id",
        "SELECT id FROM pem.probe WHERE internal_name = 'cpu_usage'",
        &[],
    )
    .await
    .unwrap()[0]
        .get(0);
    let (code, _, err) = probe(&["--enable-probe"], &["--probe-id", &id.to_string()]);
    assert_eq!(code, 0, "{err}");
    wait_for("cpu samples again", Duration::from_secs(10), || async {
        cpu_rows(&su, agent).await >= frozen + 3
    })
    .await;

    // A longer interval takes effect without a restart: about 3 samples in 9 s, not 9.
    let (code, _, err) = probe(
        &["--set-probe-interval", "3"],
        &["--probe-internal-name", "cpu_usage"],
    );
    assert_eq!(code, 0, "{err}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let start_count = cpu_rows(&su, agent).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    let in_nine = cpu_rows(&su, agent).await - start_count;
    assert!(
        (2..=4).contains(&in_nine),
        "{in_nine} samples in 9 s at a 3 s interval"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_records_nothing() {
    let bed = TestBed::start();
    let (cfg, _) = bed.register_agent("agent");
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "roles",
        &format!(
            "CREATE ROLE monitor LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor; \
             CREATE ROLE nobody_special LOGIN PASSWORD '{MONITOR_PASSWORD}'"
        ),
    )
    .await
    .unwrap();
    // Registered once, correctly.
    let env = [("PEM_MONITORED_SERVER_PASSWORD", MONITOR_PASSWORD)];
    let (code, _, err) = run(
        &bed,
        &register_server_args(&cfg, "monitor", bed.pg_port),
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let pgpass = bed.home.join(".pgpass");
    let state = async || -> String {
        let r: String = pool::query(
            &su,
            "state",
            "SELECT (SELECT string_agg(format('%s %s %s %s', id, server_addr, port, active), ';' ORDER BY id) FROM pem.server) || '|' || \
                    (SELECT count(*) FROM pem.agent_server_binding) || '|' || (SELECT count(*) FROM pem.probe_schedule)",
            &[],
        )
        .await
        .unwrap()[0]
            .get(0);
        format!(
            "{r}|{}",
            std::fs::read_to_string(&pgpass).unwrap_or_default()
        )
    };
    let before = state().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    /// (what, arguments, environment, exit code, part of the message)
    type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>, i32, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unreachable server",
            register_server_args(&cfg, "monitor", closed),
            env.to_vec(),
            2,
            "cannot connect to the monitored server",
        ),
        (
            "wrong monitored password",
            {
                let mut a = register_server_args(&cfg, "monitor", bed.pg_port);
                a.push("--force-registration".into());
                a
            },
            vec![("PEM_MONITORED_SERVER_PASSWORD", "wrong")],
            2,
            "password authentication failed",
        ),
        (
            "user without pg_monitor",
            {
                let mut a = register_server_args(&cfg, "nobody_special", bed.pg_port);
                a.push("--force-registration".into());
                a
            },
            env.to_vec(),
            4,
            "GRANT pg_monitor TO nobody_special",
        ),
        (
            "unknown probe",
            args(
                &cfg,
                &["--disable-probe", "--probe-internal-name", "no_such_probe"],
            ),
            vec![],
            1,
            "unknown probe \"no_such_probe\"",
        ),
        (
            "the same server twice",
            register_server_args(&cfg, "monitor", bed.pg_port),
            env.to_vec(),
            1,
            "--force-registration",
        ),
    ];
    for (name, a, e, want, says) in cases {
        let (code, out, err) = run(&bed, &a, &e);
        assert_eq!(code, want, "{name}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert_eq!(state().await, before, "{name}: something was recorded");
    }
}

/// PGSSLROOTCERT and PGSSLMODE name the PEM server's CA and mode on an agent host: with them
/// set to another CA, --register-server and the worker's probes of a monitored server go on,
/// taking TLS settings only from --asb-ssl-mode and --asb-ssl-root-cert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pem_servers_tls_variables_do_not_reach_the_monitored_server() {
    let bed = TestBed::start();
    let (cfg, agent) = bed.register_agent("agent");
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "monitor",
        &format!("CREATE ROLE monitor LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor"),
    )
    .await
    .unwrap();
    // A CA that signed nothing the bed serves, where an operator points libpq for the PEM
    // server (PEM's documentation sets PGSSLMODE for registration).
    let other = bed.home.join("other-ca.crt");
    std::fs::write(
        &other,
        pemworker::certs::Authority::generate("another CA")
            .unwrap()
            .cert_pem,
    )
    .unwrap();
    let other_s = other.display().to_string();
    let pem_env = [
        ("PEM_MONITORED_SERVER_PASSWORD", MONITOR_PASSWORD),
        ("PGSSLROOTCERT", other_s.as_str()),
        ("PGSSLMODE", "verify-full"),
    ];
    let bed_root = bed.root_crt.display().to_string();
    let with = |extra: &[&str]| {
        let mut a = register_server_args(&cfg, "monitor", bed.pg_port);
        let at = a.iter().position(|x| x == "--asb-ssl-mode").unwrap();
        a.drain(at..at + 2);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let record = cfg.parent().unwrap().join(pemworker::targets::FILE_NAME);

    // A verifying mode needs the monitored server's own root certificate: one line, nothing
    // recorded.
    let (code, out, err) = run(&bed, &with(&["--asb-ssl-mode", "verify-full"]), &pem_env);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--asb-ssl-root-cert"), "{err}");
    assert!(!record.exists());
    // The root certificate given is the one checked: the other CA did not sign the server's.
    let (code, out, err) = run(
        &bed,
        &with(&[
            "--asb-ssl-mode",
            "verify-full",
            "--asb-ssl-root-cert",
            &other_s,
        ]),
        &pem_env,
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("certificate verify failed"), "{err}");
    assert!(!record.exists());
    // require: encrypted, the chain not checked, whatever PGSSLROOTCERT and PGSSLMODE say
    // (libpq would have checked it against PGSSLROOTCERT and failed).
    let (code, out, err) = run(&bed, &with(&["--asb-ssl-mode", "require"]), &pem_env);
    assert_eq!(code, 0, "{out}{err}");
    // verify-full against the right CA, given for the monitored server alone.
    let (code, out, err) = run(
        &bed,
        &with(&[
            "--asb-ssl-mode",
            "verify-full",
            "--asb-ssl-root-cert",
            &bed_root,
            "--force-registration",
        ]),
        &pem_env,
    );
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(
        text.contains("\"verify-full\"") && text.contains(&bed_root) && !text.contains(&other_s),
        "{text}"
    );

    // The worker, with the same variables in its environment, probes the server.
    let (code, out, err) = run(
        &bed,
        &args(
            &cfg,
            &[
                "--set-probe-interval",
                "1",
                "--probe-internal-name",
                "server_info",
                "--asb-host-name",
                "127.0.0.1",
                "--server-port",
                &bed.pg_port.to_string(),
            ],
        ),
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let log = site.join("worker.log");
    let _worker = Running(bed.start_worker_env(
        &cfg,
        &[
            ("state_dir", site.join("state").display().to_string()),
            ("log_location", log.display().to_string()),
            ("short_wait", "1".into()),
        ],
        &[
            ("PGSSLROOTCERT", other_s.clone()),
            ("PGSSLMODE", "verify-full".into()),
        ],
    ));
    wait_for(
        "probes of the monitored server",
        Duration::from_secs(60),
        || async { server_rows(&su, agent).await >= 2 },
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("certificate verify failed"), "{text}");
}
