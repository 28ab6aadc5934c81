//! Enrolment without the admin's password (issue 16): single-use tokens, against the real
//! PostgreSQL and pgBouncer of the test bed.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{ADMIN_PASSWORD, TestBed, agent_config, outcome};
use pemworker::connection::{self, ConnectSettings, pool};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

/// A session through pgBouncer as the enrolment login: TLS with the server verified, and no
/// credential at all.
fn enrolment_login(bed: &TestBed) -> ConnectSettings {
    let mut s = bed.direct("pem_enrolment", "");
    s.password = None;
    s.port = bed.pgb_port;
    s
}

/// Everything an enrolment could leave on the server: agents, roles, secrets, tokens' uses.
async fn recorded(bed: &TestBed) -> Vec<String> {
    let su = bed.connect(&bed.superuser()).await;
    let rows = pool::query(
        &su,
        "state",
        "SELECT format('agent %s %s %s', id, agent_user, enrolled_by_token) FROM pem.agent \
         UNION ALL SELECT format('role %s', rolname) FROM pg_roles \
         UNION ALL SELECT format('secret %s', agent_id) FROM pem.agent_secret \
         UNION ALL SELECT format('token %s %s %s', id, uses_left, last_used_at) FROM pem.enrolment_token \
         ORDER BY 1",
        &[],
    )
    .await
    .unwrap();
    rows.iter()
        .map(|r| pool::get::<String>(r, 0, "state").unwrap())
        .collect()
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        if p.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_enrols_an_agent_that_heartbeats_and_delivers_with_no_admin_password_on_its_host() {
    let bed = TestBed::start();
    let (token_id, token) = bed.make_token(
        "host1",
        &["--ttl", "10m", "--agent-user", "pem_agent_user1"],
    );
    assert_eq!(
        std::fs::metadata(&token).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The agent host's environment, for the registration and the worker: no password at all.
    let host = bed.agent_host_command();
    for (k, v) in host.get_envs() {
        let v = v
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default();
        assert!(
            !v.contains(ADMIN_PASSWORD),
            "{k:?} holds the admin's password"
        );
        assert!(!k.to_string_lossy().contains("PASSWORD"), "{k:?}");
    }
    let (code, out, err) = outcome(&bed.on_agent_host(&bed.enrol_args("host1", &token, &[])));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("Postgres Enterprise Manager Agent registered successfully!"),
        "{out}"
    );
    let cfg = bed.home.join("host1/etc/agent.cfg");
    let id = agent_config(&cfg);
    assert_eq!(id.agent_user, "pem_agent_user1");
    assert!(id.agent_secret.is_some());
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    assert!(!cfg_text.contains("pem-enrol-"), "the token in agent.cfg");

    // pem.agent says which token enrolled the agent, and when.
    let su = bed.connect(&bed.superuser()).await;
    let row = pool::query_one(
        &su,
        "agent",
        "SELECT enrolled_by_token, enrolled_at IS NOT NULL AND enrolled_at > now() - interval '5 minutes' \
           FROM pem.agent WHERE id = $1",
        &[(&id.agent_id, Type::INT4)],
    )
    .await
    .unwrap();
    assert_eq!(
        pool::get::<Option<i32>>(&row, 0, "").unwrap(),
        Some(token_id)
    );
    assert!(pool::get::<bool>(&row, 1, "").unwrap());
    // The admin's list shows the token used up, with the agent it enrolled.
    let port = bed.pgb_port.to_string();
    let list = [
        "pooler",
        "enrolment-token",
        "list",
        "--pem-server",
        "127.0.0.1",
        "--pem-port",
        &port,
        "--pem-user",
        common::ADMIN_USER,
    ];
    let (code, out, err) =
        outcome(&bed.pemworker_env(&list, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("token {token_id}: used, 0 of 1 uses left"))
            && out.contains(&format!("enrolled agents {}", id.agent_id)),
        "{out}"
    );

    // The agent heartbeats and delivers, its pgBouncer probes included.
    bed.bind_pgbouncer_fast(&cfg, id.agent_id).await;
    let site = bed.home.join("host1");
    let mut worker = bed.start_worker(
        &cfg,
        &[
            ("state_dir", site.join("state").display().to_string()),
            (
                "log_location",
                site.join("worker.log").display().to_string(),
            ),
            ("short_wait", "1".into()),
        ],
    );
    let agent = id.agent_id;
    common::wait_for(
        "heartbeats and samples",
        Duration::from_secs(60),
        || async {
            let count = |sql: &'static str| {
                let su = &su;
                async move {
                    pool::query_one(su, sql, sql, &[(&agent, Type::INT4)])
                        .await
                        .and_then(|r| pool::get::<i64>(&r, 0, sql))
                        .unwrap_or(0)
                }
            };
            count("SELECT count(*) FROM pem.agent_heartbeat WHERE agent_id = $1").await > 0
                && count("SELECT count(*) FROM pemhistory.cpu_usage WHERE agent_id = $1").await > 0
                && count("SELECT count(*) FROM pemhistory.pgbouncer_pools WHERE agent_id = $1")
                    .await
                    > 0
        },
    )
    .await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = worker.wait();

    // A token without an agent user gives the agent its own agent<ID> role.
    let (cfg2, id2) = bed.enrol_agent("host2", &[], &[]);
    let user2 = agent_config(&cfg2).agent_user;
    assert_eq!(user2, format!("agent{id2}"));
    let c = bed.agent_session(&cfg2).await;
    let who = pool::query_one(&c, "who", "SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(pool::get::<String>(&who, 0, "who").unwrap(), user2);

    // Nothing on the agent host ever held the admin's password.
    for f in files_under(&bed.home) {
        if let Ok(data) = std::fs::read(&f) {
            assert!(
                !String::from_utf8_lossy(&data).contains(ADMIN_PASSWORD),
                "the admin's password is in {}",
                f.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_in_one_line_and_record_nothing() {
    let bed = TestBed::start();
    let port = bed.pgb_port.to_string();
    let admin = |args: &[&str]| {
        let mut a = vec![
            "pooler",
            "enrolment-token",
            args[0],
            "--pem-server",
            "127.0.0.1",
            "--pem-port",
            &port,
            "--pem-user",
            common::ADMIN_USER,
        ];
        a.extend_from_slice(&args[1..]);
        outcome(&bed.pemworker_env(&a, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]))
    };

    // A used token: it enrolled one agent already.
    let (_, used) = bed.make_token("used", &["--agent-user", "pem_agent_user1"]);
    let (code, _, err) = outcome(&bed.on_agent_host(&bed.enrol_args("first", &used, &[])));
    assert_eq!(code, 0, "{err}");
    // An expired one.
    let (_, expired) = bed.make_token("expired", &["--ttl", "1s"]);
    // A revoked one.
    let (revoked_id, revoked) = bed.make_token("revoked", &[]);
    let (code, out, err) = admin(&["revoke", &revoked_id.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("revoked"), "{out}");
    // Malformed, and guessed (well formed, never made).
    let write = |name: &str, text: &str| {
        let p = bed.home.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let malformed = write("malformed.token", "let me in\n");
    let guessed = write(
        "guessed.token",
        &format!("pem-enrol-{}\n", "0123456789abcdef".repeat(4)),
    );
    // Valid tokens asked for what they do not allow.
    let (_, limited) = bed.make_token("limited", &["--agent-user", "pem_agent_user1"]);
    let (_, dedicated) = bed.make_token("dedicated", &[]);
    let readable = write("readable.token", "whatever");
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = recorded(&bed).await;
    let cases: Vec<(&str, &Path, Vec<&str>, i32, &str)> = vec![
        ("used", &used, vec![], 4, "is used up"),
        ("expired", &expired, vec![], 4, "expired at"),
        ("revoked", &revoked, vec![], 4, "was revoked"),
        (
            "malformed",
            &malformed,
            vec![],
            1,
            "malformed enrolment token",
        ),
        ("guessed", &guessed, vec![], 4, "unknown enrolment token"),
        (
            "another agent user",
            &limited,
            vec!["--pem-agent-user", "pem_agent_user2"],
            4,
            "is limited to agent user pem_agent_user1",
        ),
        (
            "a shared user on a dedicated token",
            &dedicated,
            vec!["--pem-agent-user", "pem_agent_user1"],
            4,
            "its own agent<ID> role",
        ),
        (
            "a token others can read",
            &readable,
            vec![],
            1,
            "chmod 0600",
        ),
    ];
    for (name, token, extra, want, says) in cases {
        let site = format!("case-{}", name.replace(' ', "-"));
        let (code, out, err) = outcome(&bed.on_agent_host(&bed.enrol_args(&site, token, &extra)));
        eprintln!("{name} -> exit {code}: {}", err.trim_end());
        assert_eq!(code, want, "{name}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert!(!bed.home.join(&site).exists(), "{name}: files left");
        assert_eq!(
            recorded(&bed).await,
            before,
            "{name}: something was recorded"
        );
    }

    // A request for another name, sent straight to the entry point with a token limited to
    // pem_agent_user1: refused, and the token stays unused.
    let enrol = bed.connect(&enrolment_login(&bed)).await;
    let token = std::fs::read_to_string(&limited)
        .unwrap()
        .trim()
        .to_string();
    let key = pemworker::certs::generate_key().unwrap();
    let csr = pemworker::certs::csr_pem(&key, "pem_agent_user2").unwrap();
    let e = pool::query(
        &enrol,
        "enrol",
        "SELECT * FROM pem.enrol_agent($1, NULL, 'x', 'x', $2, '{}')",
        &[(&token, Type::TEXT), (&csr, Type::TEXT)],
    )
    .await
    .expect_err("a certificate for another name");
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
    assert!(
        e.to_string()
            .contains("may only be for \"pem_agent_user1\""),
        "{e}"
    );
    assert_eq!(recorded(&bed).await, before);
    // The same token still enrols an agent as pem_agent_user1.
    let (code, out, err) = outcome(&bed.on_agent_host(&bed.enrol_args("good", &limited, &[])));
    assert_eq!(code, 0, "{out}{err}");
}

async fn denied(client: &Client, sql: &str) {
    let e = pool::batch(client, sql, sql)
        .await
        .expect_err("the enrolment login did more than enrol");
    assert_eq!(
        e.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{sql}: {e}"
    );
    let _ = pool::batch(client, "rollback", "ROLLBACK").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enrolment_login_alone_can_do_nothing_else() {
    let bed = TestBed::start();
    let (cfg, _) = bed.enrol_agent("first", &["--agent-user", "pem_agent_user1"], &[]);
    let csr = {
        let key = pemworker::certs::generate_key().unwrap();
        pemworker::certs::csr_pem(&key, "pem_agent_user1").unwrap()
    };
    let enrol = bed.connect(&enrolment_login(&bed)).await;
    let mut sqls: Vec<String> = [
        "SELECT * FROM pem.agent",
        "SELECT * FROM pem.enrolment_token",
        "SELECT * FROM pem.agent_secret",
        "SELECT * FROM pem.agent_role",
        "SELECT * FROM pemdata.cpu_usage",
        "SELECT * FROM pemhistory.cpu_usage",
        "BEGIN READ WRITE; INSERT INTO pem.agent (display_name) VALUES ('x')",
        "BEGIN READ WRITE; UPDATE pem.enrolment_token SET uses_left = 100",
        "BEGIN READ WRITE; DELETE FROM pemhistory.cpu_usage",
        "BEGIN READ WRITE; CREATE ROLE sneaky LOGIN",
        "BEGIN READ WRITE; CREATE TEMP TABLE t (x int)",
        "SELECT pem.create_proxy_agent_user('sneaky')",
        "SELECT pem.ensure_agent_user('sneaky', NULL)",
        "SELECT pem.drop_agent_user('pem_agent_user1')",
        "SELECT pem.issue_agent_secret(1)",
        "SELECT pem.unregister_agent(1)",
        "SELECT * FROM pem.create_enrolment_token('1 hour', 100, NULL, NULL, NULL)",
        "SELECT * FROM pem.enrolment_tokens()",
        "SELECT pem.revoke_enrolment_token(1)",
        "SELECT * FROM pem.record_heartbeat(1, 'v', 'now', 'mac')",
        "SELECT * FROM pem.store_samples(1, 'now', '[]', 'mac')",
        "SELECT * FROM pem.check_agent(1, 'now', 'mac')",
        "SELECT * FROM pem.agent_schedule(1)",
        "SELECT * FROM pem.agent_targets(1)",
        "SELECT * FROM pem.get_agent_pool_auth('pem_agent_user1')",
        "SELECT pem.repair_agent_roles()",
        "SELECT pem.sync_pooler_ident()",
        "SELECT * FROM pem.configure_pooler('peer', 'postgres', NULL, 'a', 'b', true)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for f in [
        "pem.sign_agent_csr($1)",
        "pem.sign_agent_certificate($1, 'pem_agent_user1')",
    ] {
        sqls.push(format!(
            "SELECT {}",
            f.replace("$1", &format!("'{}'", csr.replace('\'', "''")))
        ));
    }
    for sql in &sqls {
        denied(&enrol, sql).await;
    }
    // It logs in nowhere but through pgBouncer.
    let mut direct = enrolment_login(&bed);
    direct.port = bed.pg_port;
    let e = connection::connect(&direct)
        .await
        .expect_err("the enrolment login directly");
    assert!(e.is_connect(), "{e}");
    // What it may set on its own role is undone by the next enrolment, which works.
    pool::batch(
        &enrol,
        "poison",
        "BEGIN READ WRITE; ALTER ROLE CURRENT_USER SET default_transaction_read_only = on; \
         ALTER ROLE CURRENT_USER PASSWORD 'chosen'; COMMIT",
    )
    .await
    .unwrap();
    drop(enrol);
    bed.console("RECONNECT pem").await;
    bed.enrol_agent("second", &["--agent-user", "pem_agent_user1"], &[]);
    assert_eq!(
        bed.scalar_i64(
            "SELECT count(*) FROM pg_authid a WHERE a.rolname = 'pem_enrolment' \
               AND (a.rolpassword IS NOT NULL OR EXISTS (SELECT 1 FROM pg_db_role_setting s WHERE s.setrole = a.oid))"
        )
        .await,
        0
    );
    // And the agents it enrolled work as any other.
    let c = bed.agent_session(&cfg).await;
    pool::batch(&c, "select", "SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tokens_enrol_two_hundred_agents_in_parallel() {
    let bed = TestBed::start();
    let n = 200;
    let admin = bed.connect(&bed.admin_via_pooler()).await;
    let mut tokens = Vec::new();
    for i in 0..n {
        let row = pool::query_one(
            &admin,
            "token",
            "SELECT token_id, token FROM pem.create_enrolment_token('10 minutes', 1, 'pem_agent_user1', NULL, NULL)",
            &[],
        )
        .await
        .unwrap();
        let id: i32 = pool::get(&row, 0, "").unwrap();
        let token: String = pool::get(&row, 1, "").unwrap();
        let file = bed.home.join(format!("token{i}"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        tokens.push((id, file));
    }
    drop(admin);
    let started = Instant::now();
    let children: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, (_, file))| {
            bed.agent_host_command()
                .args(bed.enrol_args(&format!("host{i}"), file, &[]))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let (code, out, err) = outcome(&child.wait_with_output().unwrap());
        assert_eq!(code, 0, "host{i}: {out}{err}");
        ids.push(agent_config(&bed.home.join(format!("host{i}/etc/agent.cfg"))).agent_id);
    }
    eprintln!(
        "{n} parallel enrolments through pgBouncer took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), n, "distinct agent ids");
    // Each token enrolled exactly one agent and is used up.
    assert_eq!(
        bed.scalar_i64("SELECT count(DISTINCT enrolled_by_token) FROM pem.agent WHERE enrolled_by_token IS NOT NULL")
            .await,
        n as i64
    );
    assert_eq!(
        bed.scalar_i64("SELECT count(*) FROM pem.enrolment_token WHERE uses_left = 0 AND last_used_at IS NOT NULL")
            .await,
        n as i64
    );
    assert_eq!(
        bed.scalar_i64("SELECT count(*) FROM pem.agent WHERE enrolled_at IS NULL")
            .await,
        0
    );
}
