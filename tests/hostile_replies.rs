//! Replies of the wrong shape from a server the agent trusts: no rows, a column short, every
//! column of another type, to each query registration makes and to every query of the running
//! worker. Nothing panics; registration fails in one line and leaves nothing behind; the
//! worker logs each malformed reply and its heartbeats go on, and once the replies are right
//! again heartbeats and samples are stored.

mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::hostile::{ALL, Hostile, Rule, Upstream};
use common::{ADMIN_PASSWORD, TestBed, outcome, wait_for};
use pemworker::connection::pool;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

async fn proxy(bed: &TestBed, identity: Option<(&Path, &Path)>) -> Hostile {
    let (cert, key) = bed.ca.issue_server(&["127.0.0.1"]).unwrap();
    let identity = identity.map(|(c, k)| (std::fs::read(c).unwrap(), std::fs::read(k).unwrap()));
    Hostile::start(
        &cert,
        &key,
        Upstream {
            port: bed.pgb_port,
            identity,
        },
    )
    .await
}

async fn agents(su: &Client) -> i64 {
    pool::query_value(su, "agents", "SELECT count(*) FROM pem.agent", &[])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_survives_every_malformed_reply() {
    let bed = TestBed::start();
    let su = bed.connect(&bed.superuser()).await;
    let hostile = proxy(&bed, None).await;
    let register = |site: &str| {
        let mut args = bed.register_args(site);
        let p = args.iter().position(|a| a == "--pem-port").unwrap() + 1;
        args[p] = hostile.port.to_string();
        // Each run gets its own agent user, so a run that got through changes no other.
        let u = args.iter().position(|a| a == "--pem-agent-user").unwrap();
        args.drain(u..u + 2);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        outcome(&bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]))
    };
    // The legitimate registration through the proxy, counting the replies it reads.
    let (code, out, err) = register("clean");
    assert_eq!(code, 0, "{out}{err}");
    let replies = hostile.count("");
    assert!(replies >= 8, "only {replies} replies");
    let mut runs = 0;
    for how in ALL {
        for n in 0..replies {
            hostile.set(Rule::Nth(n, how));
            let before = (hostile.mangled(), agents(&su).await);
            let site = format!("r{runs}");
            runs += 1;
            let (code, out, err) = register(&site);
            let mangled = hostile.mangled() > before.0;
            eprintln!(
                "{how:?} reply {n}: mangled {mangled}, exit {code}: {}",
                err.trim_end()
            );
            assert!(!err.contains("panicked"), "{how:?} {n}: {err}");
            if code == 0 {
                assert!(out.contains("registered successfully"), "{out}");
            } else {
                assert!(
                    mangled,
                    "{how:?} {n}: failed without a mangled reply: {err}"
                );
                assert_eq!(code, 4, "{how:?} {n}: {err}");
                assert_eq!(err.lines().count(), 1, "{how:?} {n}: {err}");
                assert!(
                    err.contains("unexpected reply from the server"),
                    "{how:?} {n}: {err}"
                );
                assert_eq!(
                    agents(&su).await,
                    before.1,
                    "{how:?} {n}: an agent row left"
                );
                assert!(
                    !bed.home.join(&site).exists(),
                    "{how:?} {n}: files left behind"
                );
            }
        }
    }
}

fn last_heartbeat_after(since: &str) -> String {
    format!(
        "SELECT count(*) FROM pem.agent_heartbeat WHERE agent_id = $1 AND last_heartbeat > '{since}'::timestamptz"
    )
}

async fn server_now(su: &Client) -> String {
    pool::query_value(su, "now", "SELECT now()::text", &[])
        .await
        .unwrap()
}

fn alive(child: &mut Child) -> bool {
    child.try_wait().unwrap().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_logs_malformed_replies_and_its_heartbeats_go_on() {
    let bed = TestBed::start();
    let (cfg, agent_id) = bed.register_agent("agent");
    let su = bed.connect(&bed.superuser()).await;
    pool::execute(
        &su,
        "interval",
        "UPDATE pem.agent SET heartbeat_interval = 1 WHERE id = $1",
        &[(&agent_id, Type::INT4)],
    )
    .await
    .unwrap();
    let pem = bed.home.join("agent/.pem");
    let (crt, key) = (
        pem.join("pem_agent_user1.crt"),
        pem.join("pem_agent_user1.key"),
    );
    let hostile = proxy(&bed, Some((&crt, &key))).await;
    let state = bed.home.join("agent/state");
    let mut child = bed.start_worker(
        &cfg,
        &[
            ("pem_port", hostile.port.to_string()),
            ("state_dir", state.display().to_string()),
            ("short_wait", "1".into()),
            ("long_wait", "2".into()),
        ],
    );
    let beats = || hostile.count("record_heartbeat");
    wait_for(
        "heartbeats through the proxy",
        Duration::from_secs(60),
        || async { beats() >= 3 },
    )
    .await;

    for how in ALL {
        hostile.set(Rule::Every(how));
        let (from, mangled) = (beats(), hostile.mangled());
        let started = Instant::now();
        wait_for(
            &format!("heartbeats going on with {how:?} replies"),
            Duration::from_secs(60),
            || async { beats() >= from + 4 && hostile.mangled() >= mangled + 4 },
        )
        .await;
        assert!(alive(&mut child), "{how:?}: the worker exited");
        eprintln!(
            "{how:?}: {} heartbeats in {:?}",
            beats() - from,
            started.elapsed()
        );
    }

    // Right replies again: heartbeats and samples are stored.
    let since = server_now(&su).await;
    hostile.set(Rule::Off);
    let sql = last_heartbeat_after(&since);
    wait_for("a stored heartbeat", Duration::from_secs(60), || async {
        pool::query_value::<i64>(&su, "beat", &sql, &[(&agent_id, Type::INT4)])
            .await
            .unwrap()
            == 1
    })
    .await;
    wait_for("stored samples", Duration::from_secs(60), || async {
        pool::query_value::<i64>(
            &su,
            "rows",
            "SELECT count(*) FROM pemhistory.load_average WHERE agent_id = $1",
            &[(&agent_id, Type::INT4)],
        )
        .await
        .unwrap()
            > 0
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(cfg.with_extension("stderr")).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    for what in ["recording a heartbeat", "reading the probe schedule"] {
        assert!(
            log.lines()
                .any(|l| l.contains(what) && l.contains("unexpected reply from the server")),
            "no logged malformed reply to {what}: {log}"
        );
    }
}
