//! A secret in another session's statement on a monitored server never reaches the PEM
//! database: a blocked `ALTER ROLE ... PASSWORD 'S3cret-x'` is stored by the running worker as
//! `ALTER ROLE app PASSWORD ?`, and the string is nowhere in a dump of the PEM database, in the
//! agent's spool or in its log.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{SUPERUSER_PASSWORD, TestBed, wait_for};
use pemworker::connection::pool;
use tokio_postgres::types::Type;

const SECRET: &str = "S3cret-x";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_password_change_leaves_no_secret_in_the_pem_database() {
    let bed = TestBed::start();
    let (cfg, agent) = bed.register_agent("agent");
    pemworker::sandbox::bind_servers(&bed, agent, &cfg, 1)
        .await
        .unwrap();
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(&su, "app", "CREATE ROLE app LOGIN PASSWORD 'old-pw'")
        .await
        .unwrap();

    // One session holds the role's row in an open transaction; the next password change waits.
    let holder = bed.connect(&bed.superuser()).await;
    pool::batch(
        &holder,
        "holder",
        "BEGIN; ALTER ROLE app PASSWORD 'holder-S3cret'",
    )
    .await
    .unwrap();
    let waiter = bed.connect(&bed.superuser()).await;
    let blocked = tokio::spawn(async move {
        pool::batch(
            &waiter,
            "waiter",
            &format!("ALTER ROLE app PASSWORD '{SECRET}'"),
        )
        .await
    });

    let state = bed.home.join("agent/state");
    let log = bed.home.join("agent/worker.log");
    let mut child = bed.start_worker(
        &cfg,
        &[
            ("state_dir", state.display().to_string()),
            ("log_location", log.display().to_string()),
            ("log_level", "debug2".into()),
            ("short_wait", "1".into()),
        ],
    );
    // The legitimate flow: the blocked session is stored, its statement without the literal.
    wait_for(
        "the blocked session in pemhistory",
        Duration::from_secs(60),
        || async {
            pool::query_value::<i64>(
                &su,
                "blocked",
                "SELECT count(*) FROM pemhistory.blocked_sessions \
              WHERE agent_id = $1 AND blocked_query = 'ALTER ROLE app PASSWORD ?'",
                &[(&agent, Type::INT4)],
            )
            .await
            .unwrap()
                > 0
        },
    )
    .await;
    pool::batch(&holder, "release", "ROLLBACK").await.unwrap();
    blocked.await.unwrap().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));

    // A dump of the whole PEM database, as pg_dump sees it.
    let dump = bed
        .server_command(&bed.bin_dir.join("pg_dump"))
        .arg("-h")
        .arg(&bed.pg_socket_dir)
        .args(["-p", &bed.pg_port.to_string(), "-d", "pem"])
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .expect("run pg_dump (apt-get install postgresql-client-15)");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("ALTER ROLE app PASSWORD ?"),
        "the probe's rows are in the dump"
    );
    assert!(!dump.contains("S3cret"), "a secret in the PEM database");

    // Nor on the agent host.
    let mut files = vec![log.clone()];
    let mut todo = vec![state.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                files.push(p);
            }
        }
    }
    for f in files {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        assert!(!text.contains("S3cret"), "a secret in {}", f.display());
    }
}
