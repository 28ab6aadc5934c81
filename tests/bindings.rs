//! The PEM server decides which registered server the agent probes, not where the agent sends
//! the server's password: a binding changed on the PEM server to another host, port or user gets
//! no connection at all, and `sslmode=disable` there does not weaken the TLS recorded when the
//! server was registered from the agent host. The legitimate probes go on in the same test.

mod common;

use std::time::Duration;

use common::impostor::{Auth, Impostor, Tls};
use common::{ADMIN_PASSWORD, ADMIN_USER, TestBed, outcome, wait_for};
use pemworker::connection::pool;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

const MONITOR_PASSWORD: &str = "m0nitor-S3cret";

fn cli(bed: &TestBed, cfg: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut a = args.to_vec();
    let dir = cfg.parent().unwrap().display().to_string();
    a.extend(["--pem-user", ADMIN_USER, "--config-dir", &dir]);
    outcome(&bed.pemworker_env(
        &a,
        &[
            ("PEM_SERVER_PASSWORD", ADMIN_PASSWORD),
            ("PEM_MONITORED_SERVER_PASSWORD", MONITOR_PASSWORD),
        ],
    ))
}

async fn server_rows(su: &Client, agent: i32) -> i64 {
    pool::query_value(
        su,
        "rows",
        "SELECT count(*) FROM pemhistory.server_info WHERE agent_id = $1",
        &[(&agent, Type::INT4)],
    )
    .await
    .unwrap()
}

async fn set_binding(su: &Client, agent: i32, assignment: &str) {
    pool::execute(
        su,
        "binding",
        &format!("UPDATE pem.agent_server_binding SET {assignment} WHERE agent_id = $1"),
        &[(&agent, Type::INT4)],
    )
    .await
    .unwrap();
}

fn log_has(log: &std::path::Path, text: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|l| l.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_changed_on_the_server_gets_no_password() {
    let bed = TestBed::start();
    let (cfg, agent) = bed.register_agent("agent");
    let su = bed.connect(&bed.superuser()).await;
    for sql in [
        format!("CREATE ROLE monitor LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor"),
        "ALTER SYSTEM SET log_connections = on".into(),
        "SELECT pg_reload_conf()".into(),
    ] {
        pool::batch(&su, "setup", &sql).await.unwrap();
    }
    let port = bed.pg_port.to_string();
    let root = bed.root_crt.display().to_string();
    let (code, out, err) = cli(
        &bed,
        &cfg,
        &[
            "--register-server",
            "--server-addr",
            "127.0.0.1",
            "--server-port",
            &port,
            "--server-database",
            "postgres",
            "--server-user",
            "monitor",
            "--asb-ssl-mode",
            "verify-full",
            "--asb-ssl-root-cert",
            &root,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let record = cfg.parent().unwrap().join(pemworker::targets::FILE_NAME);
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(
        text.contains("\"verify-full\"") && !text.contains(MONITOR_PASSWORD),
        "{text}"
    );
    let (code, out, err) = cli(
        &bed,
        &cfg,
        &[
            "--set-probe-interval",
            "1",
            "--probe-internal-name",
            "server_info",
            "--asb-host-name",
            "127.0.0.1",
            "--server-port",
            &port,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");

    let state = bed.home.join("agent/state");
    let log = bed.home.join("agent/worker.log");
    let mut child = bed.start_worker(
        &cfg,
        &[
            ("state_dir", state.display().to_string()),
            ("log_location", log.display().to_string()),
            ("log_level", "info".into()),
            ("short_wait", "1".into()),
        ],
    );
    // The legitimate flow: the registered server is probed.
    wait_for(
        "probes of the registered server",
        Duration::from_secs(60),
        || async { server_rows(&su, agent).await >= 2 },
    )
    .await;

    // Another port: an impostor that would take the password in clear text. Not a byte
    // reaches it.
    let impostor = Impostor::start(Tls::Refuse, Auth::Cleartext);
    set_binding(&su, agent, &format!("port = {}", impostor.port)).await;
    let refused = format!(
        "monitored server 127.0.0.1:{} (database postgres, user monitor) is bound to this agent on the PEM server but was not registered from this host",
        impostor.port
    );
    wait_for(
        "the refusal of another port",
        Duration::from_secs(30),
        || async { log_has(&log, &refused) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        impostor.received().is_empty(),
        "the agent connected to the impostor"
    );

    // Another host name for the same server, and another user: not registered either.
    for (assignment, place) in [
        (
            format!("port = {port}, host = 'localhost'"),
            format!("localhost:{port} (database postgres, user monitor)"),
        ),
        (
            "host = '127.0.0.1', username = 'postgres'".to_string(),
            format!("127.0.0.1:{port} (database postgres, user postgres)"),
        ),
    ] {
        set_binding(&su, agent, &assignment).await;
        wait_for(
            &format!("the refusal of {place}"),
            Duration::from_secs(30),
            || async {
                log_has(
                    &log,
                    &format!("monitored server {place} is bound to this agent"),
                )
            },
        )
        .await;
    }

    // sslmode=disable on the server: the agent keeps the verify-full it recorded, and the
    // probes go on, over TLS.
    set_binding(&su, agent, "username = 'monitor', sslmode = 'disable'").await;
    let pg_log = bed.pgb_run_dir.join("postgresql.log");
    let seen = std::fs::read_to_string(&pg_log).unwrap().len();
    let before = server_rows(&su, agent).await;
    wait_for(
        "probes after sslmode=disable",
        Duration::from_secs(60),
        || async { server_rows(&su, agent).await >= before + 2 },
    )
    .await;
    let text = std::fs::read_to_string(&pg_log).unwrap();
    let logins: Vec<&str> = text[seen..]
        .lines()
        .filter(|l| l.contains("connection authorized: user=monitor"))
        .collect();
    assert!(!logins.is_empty(), "no login of monitor logged");
    for l in &logins {
        assert!(l.contains("SSL enabled"), "a login without TLS: {l}");
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
    let worker_log = std::fs::read_to_string(&log).unwrap();
    assert!(!worker_log.contains(MONITOR_PASSWORD));
    // One warning per refused place, not one per schedule read.
    assert_eq!(worker_log.matches(&refused).count(), 1, "{worker_log}");
}
