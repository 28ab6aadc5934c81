//! Least privilege on the pooled PEM server (issue 9): each attack is tried for real against
//! the test bed's PostgreSQL 15 and pgBouncer 1.18 and must fail, while the legitimate flow
//! (create-proxy-user, registration, the worker delivering and probing pgBouncer, unregister
//! dropping a dedicated role) keeps working on the same bed.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{
    ADMIN_PASSWORD, ADMIN_USER, AUTH_PASSWORD, AUTH_USER, STATS_PASSWORD, STATS_USER, TestBed,
    agent_config, outcome,
};
use pemworker::connection::{self, pool};
use pemworker::mac::{self, Kind};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

/// Runs `sql` and returns the error it must fail with.
async fn refused(client: &Client, sql: &str) -> connection::Error {
    match pool::batch(client, sql, sql).await {
        Ok(()) => panic!("{sql}: accepted"),
        Err(e) => e,
    }
}

fn assert_denied(e: &connection::Error, sql: &str) {
    assert_eq!(
        e.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{sql}: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_is_no_superuser_in_disguise() {
    let bed = TestBed::start();
    bed.register_agent("first");
    let su = bed.connect(&bed.superuser()).await;
    let row = pool::query_one(
        &su,
        "admin",
        "SELECT rolcreaterole, rolsuper FROM pg_roles WHERE rolname = $1",
        &[(&ADMIN_USER, Type::TEXT)],
    )
    .await
    .unwrap();
    assert_eq!(
        (
            pool::get::<bool>(&row, 0, "").unwrap(),
            pool::get::<bool>(&row, 1, "").unwrap()
        ),
        (false, false),
        "prepare-server creates the admin without CREATEROLE"
    );

    // With the admin's password, through pgBouncer and directly, the attack: grant
    // itself the roles that run programs and read files as the server's OS user, then use them.
    for settings in [
        bed.admin_via_pooler(),
        bed.direct(ADMIN_USER, ADMIN_PASSWORD),
    ] {
        let admin = bed.connect(&settings).await;
        for sql in [
            "GRANT pg_execute_server_program, pg_read_server_files TO pem_admin1",
            "GRANT pem_agent TO pem_admin1",
            "CREATE ROLE sneaky LOGIN",
            "ALTER ROLE pgbouncer PASSWORD 'chosen'",
            "ALTER ROLE pem_agent_user1 SET default_transaction_read_only = on",
            "COPY (SELECT 1) TO PROGRAM 'id'",
            "CREATE TEMP TABLE t (x int)",
        ] {
            let e = refused(&admin, sql).await;
            assert_denied(&e, sql);
        }
        let sql = "SELECT pg_read_file('ca_key.key')";
        assert_denied(&refused(&admin, sql).await, sql);
        // The role functions act on agent roles they made, and on nothing else.
        let dropped = pool::query_one(
            &admin,
            "drop",
            "SELECT pem.drop_agent_user($1)",
            &[(&AUTH_USER, Type::TEXT)],
        )
        .await
        .unwrap();
        assert!(!pool::get::<bool>(&dropped, 0, "drop").unwrap());
        let e = pool::query(
            &admin,
            "ensure",
            "SELECT pem.ensure_agent_user($1, NULL)",
            &[(&"postgres", Type::TEXT)],
        )
        .await
        .expect_err("adopting postgres as an agent user");
        assert!(e.to_string().contains("is not a PEM agent user"), "{e}");
    }
    assert!(bed.role_names().await.contains(&AUTH_USER.to_string()));
    let granted = bed
        .scalar_i64(
            "SELECT count(*) FROM pg_auth_members WHERE member = 'pem_admin1'::regrole \
               AND roleid IN ('pg_execute_server_program'::regrole, 'pg_read_server_files'::regrole)",
        )
        .await;
    assert_eq!(granted, 0);

    bed.legitimate_flow("admin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_host_needs_the_admin_password() {
    let bed = TestBed::start();
    // pgBouncer's user list holds SCRAM verifiers, no password in plain text.
    let userlist = std::fs::read_to_string(bed.pgb_dir.join("userlist.txt")).unwrap();
    for pw in [ADMIN_PASSWORD, STATS_PASSWORD, AUTH_PASSWORD] {
        assert!(!userlist.contains(pw), "a password in {userlist}");
    }
    assert_eq!(
        userlist.matches("SCRAM-SHA-256$4096:").count(),
        2,
        "{userlist}"
    );
    let ini = std::fs::read_to_string(bed.pgbouncer_ini()).unwrap();
    assert!(ini.contains(&format!("admin_users = {ADMIN_USER}\n")));
    assert!(ini.contains(&format!("stats_users = {STATS_USER}\n")));

    // The statistics user reads the console and can do nothing else.
    let stats = bed.connect(&bed.stats_console()).await;
    let pools = pool::simple_rows(&stats, "SHOW POOLS", "SHOW POOLS")
        .await
        .unwrap();
    assert!(!pools.is_empty());
    let e = pool::batch(&stats, "PAUSE", "PAUSE")
        .await
        .expect_err("PAUSE as the statistics user");
    assert!(e.to_string().contains("admin access needed"), "{e}");
    let mut pem = bed.stats_console();
    pem.dbname = "pem".into();
    let e = connection::connect(&pem)
        .await
        .expect_err("the statistics user in the PEM database");
    assert!(e.is_connect(), "{e}");
    let e = connection::connect(&bed.direct(STATS_USER, STATS_PASSWORD))
        .await
        .expect_err("the statistics user on PostgreSQL");
    assert!(e.is_connect(), "{e}");

    // A registered agent whose worker probes pgBouncer: nothing on its host holds the admin's
    // password (registration read it from the environment only).
    bed.legitimate_flow("stats").await;
    let mut files = vec![bed.home.clone()];
    let mut scanned = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if let Ok(data) = std::fs::read(&p) {
            scanned += 1;
            let text = String::from_utf8_lossy(&data);
            assert!(
                !text.contains(ADMIN_PASSWORD),
                "the admin's password is in {}",
                p.display()
            );
        }
    }
    assert!(scanned > 5, "{scanned} files scanned");
    let pgpass = std::fs::read_to_string(bed.home.join(".pgpass")).unwrap();
    assert!(pgpass.contains(STATS_USER), "{pgpass}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_users_password_is_no_skeleton_key() {
    let bed = TestBed::start();
    let (cfg, _) = bed.register_agent("first");
    let su = bed.connect(&bed.superuser()).await;

    // The auth user has no password left to steal: the one the DBA gave logs in nowhere.
    let e = connection::connect(&bed.direct(AUTH_USER, AUTH_PASSWORD))
        .await
        .expect_err("the auth user by password over TCP");
    assert!(e.is_connect(), "{e}");
    // Over the socket only pgBouncer's OS user gets in (by peer). When the test runs as that
    // very user (not as root) there is no other OS user to try it with.
    if bed.run_as.is_some() {
        let mut socket = bed.direct(AUTH_USER, AUTH_PASSWORD);
        socket.host = bed.pg_socket_dir.display().to_string();
        let e = connection::connect(&socket)
            .await
            .expect_err("the auth user by password over the socket");
        assert!(e.is_connect(), "{e}");
    }

    // As pgBouncer runs it, the auth query hands out no secret for the agent user ...
    assert_eq!(
        bed.auth_query("pem_agent_user1"),
        vec!["pem_agent_user1 <none>"]
    );
    // ... and nothing at all for pem_agent_pool members that hold more than agent rights,
    // whether made by hand or an agent user a DBA later gave more.
    pool::batch(
        &su,
        "a privileged pool member",
        "CREATE ROLE evil LOGIN PASSWORD 'evil pw'; \
         GRANT pem_agent, pem_agent_pool, pg_execute_server_program TO evil; \
         CREATE ROLE sly LOGIN PASSWORD 'sly pw'; GRANT pem_agent, pem_agent_pool TO sly",
    )
    .await
    .unwrap();
    assert!(bed.auth_query("evil").is_empty());
    assert!(
        bed.auth_query("sly").is_empty(),
        "not made by the agent functions"
    );
    pool::batch(
        &su,
        "grant",
        "GRANT pg_read_server_files TO pem_agent_user1",
    )
    .await
    .unwrap();
    assert!(bed.auth_query("pem_agent_user1").is_empty());
    let id = agent_config(&cfg);
    let mut settings = pemworker::registration::agent_settings(&id).unwrap();
    settings.root_cert = Some(bed.root_crt.clone());
    let e = connection::connect(&settings)
        .await
        .expect_err("pgBouncer logging in a privileged agent user");
    assert!(e.is_connect(), "{e}");
    pool::batch(
        &su,
        "revoke",
        "REVOKE pg_read_server_files FROM pem_agent_user1",
    )
    .await
    .unwrap();
    assert_eq!(bed.auth_query("pem_agent_user1").len(), 1);

    // Pass-the-hash: even an md5 secret on the agent user (the guide gave it one) opens no
    // login, directly or over the socket: pg_hba.conf admits pooled agent users only from
    // pgBouncer, by peer.
    pool::batch(
        &su,
        "an md5 secret",
        "SET password_encryption = 'md5'; ALTER ROLE pem_agent_user1 PASSWORD 'guide pw'",
    )
    .await
    .unwrap();
    let mut hosts = vec!["127.0.0.1".to_string()];
    if bed.run_as.is_some() {
        // Over the socket as another OS user than pgBouncer's (see above).
        hosts.push(bed.pg_socket_dir.display().to_string());
    }
    for host in hosts {
        let mut s = bed.direct("pem_agent_user1", "guide pw");
        s.host = host.clone();
        let e = connection::connect(&s)
            .await
            .expect_err("a direct login as the agent user");
        assert!(e.is_connect(), "{host}: {e}");
    }
    // A heartbeat repairs the secret an agent user is not meant to have.
    bed.legitimate_flow("auth").await;
    let left = bed
        .scalar_i64("SELECT count(*) FROM pg_authid WHERE rolname = 'pem_agent_user1' AND rolpassword IS NOT NULL")
        .await;
    assert_eq!(left, 0, "the heartbeat removed the agent user's secret");
}

/// The days a PEM certificate is valid for.
fn validity_days(pem: &str) -> i64 {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = p.parse_x509().unwrap();
    let v = cert.validity();
    (v.not_after.timestamp() - v.not_before.timestamp()) / 86_400
}

async fn sign(client: &Client, user: &str) -> Result<String, connection::Error> {
    let key = pemworker::certs::generate_key().unwrap();
    let csr = pemworker::certs::csr_pem(&key, user).unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        pool::query_one(
            client,
            "signing",
            "SELECT pem.sign_agent_csr($1)",
            &[(&csr, Type::TEXT)],
        ),
    )
    .await
    .expect("the signer answers within 30 s")?;
    pool::get(&r, 0, "signing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signer_takes_its_settings_from_the_server_configuration_only() {
    let bed = TestBed::start();
    bed.register_agent("first");
    let su = bed.connect(&bed.superuser()).await;

    // The caller's own settings are ignored: SET, a role setting, and a setting one pooled
    // session leaves behind for the next.
    let admin = bed.connect(&bed.admin_via_pooler()).await;
    pool::batch(
        &admin,
        "poison",
        "SET pem.ca_cert_file = '/dev/zero'; SET pem.ca_key_file = '/dev/zero'; \
         SET pem.agent_cert_validity_days = '3650'",
    )
    .await
    .unwrap();
    let cert = sign(&admin, "pem_agent_user1")
        .await
        .expect("signing ignores SET");
    assert!(validity_days(&cert) <= 366, "{}", validity_days(&cert));
    // PostgreSQL 15 refuses the admin a role setting of this kind; one a superuser made is
    // ignored as well.
    let sql = "ALTER ROLE pem_admin1 SET pem.agent_cert_validity_days = '3650'";
    assert_denied(&refused(&admin, sql).await, sql);
    pool::batch(&su, "role setting", sql).await.unwrap();
    drop(admin);
    let (cfg, _) = bed.register_agent("second");
    let crt = agent_config(&cfg).agent_ssl_crt;
    let days = validity_days(&std::fs::read_to_string(crt).unwrap());
    assert!(
        days <= 366,
        "a registration after the poisoning got {days} days"
    );
    pool::batch(&su, "reset", "ALTER ROLE pem_admin1 RESET ALL")
        .await
        .unwrap();

    // The server's configuration files are honoured ... (ALTER SYSTEM writes one; PostgreSQL
    // wants the custom settings known in the session first.)
    pool::batch(
        &su,
        "placeholders",
        "SET pem.ca_cert_file = ''; SET pem.agent_cert_validity_days = ''",
    )
    .await
    .unwrap();
    let admin = bed.connect(&bed.admin_via_pooler()).await;
    pool::batch(
        &su,
        "validity",
        "ALTER SYSTEM SET pem.agent_cert_validity_days = '30'",
    )
    .await
    .unwrap();
    let cert = sign(&admin, "pem_agent_user1").await.unwrap();
    assert_eq!(validity_days(&cert), 30);
    pool::batch(
        &su,
        "reset",
        "ALTER SYSTEM RESET pem.agent_cert_validity_days",
    )
    .await
    .unwrap();

    // ... but even they cannot make the signer read a device, follow a link or read a huge
    // file: each is refused at once, in one line.
    let data = bed.data_dir.display().to_string();
    let link = bed.data_dir.join("ca_link.crt");
    std::os::unix::fs::symlink(bed.data_dir.join("ca_certificate.crt"), &link).unwrap();
    let big = bed.data_dir.join("big.crt");
    std::fs::write(&big, vec![b'A'; 2 << 20]).unwrap();
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (path, says) in [
        ("/dev/zero".to_string(), "is not a regular file"),
        (link.display().to_string(), "symbolic link"),
        (big.display().to_string(), "larger than 1 MiB"),
        (format!("{data}/no_such.crt"), "No such file"),
    ] {
        pool::batch(
            &su,
            "ca file",
            &format!("ALTER SYSTEM SET pem.ca_cert_file = '{path}'"),
        )
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let e = sign(&admin, "pem_agent_user1")
            .await
            .expect_err("a CA file that is not a regular file");
        assert!(started.elapsed() < Duration::from_secs(5), "{path}");
        let text = e.to_string();
        assert!(
            text.contains(says) && text.lines().count() == 1,
            "{path}: {text}"
        );
    }
    pool::batch(&su, "reset", "ALTER SYSTEM RESET pem.ca_cert_file")
        .await
        .unwrap();
    sign(&admin, "pem_agent_user1")
        .await
        .expect("the default CA again");

    bed.legitimate_flow("signer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_not_held_up_by_agents_and_a_slow_lock_is_one_line() {
    let bed = TestBed::start();
    let (cfg, _) = bed.register_agent("first");
    // An agent takes the advisory lock the guide's function used to serialize on, in a
    // session that pgBouncer keeps for the next client; and tries the table lock.
    let agent = bed.agent_session(&cfg).await;
    pool::batch(
        &agent,
        "advisory",
        "SELECT pg_advisory_lock(hashtext('pem.create_proxy_agent_user'))",
    )
    .await
    .unwrap();
    let sql = "BEGIN; LOCK TABLE pem.agent_role IN ACCESS EXCLUSIVE MODE";
    let e = refused(&agent, sql).await;
    assert_denied(&e, sql);
    let _ = pool::batch(&agent, "rollback", "ROLLBACK").await;
    // Registrations that create agent users go on.
    let out = bed.pemworker_env(
        &[
            "pooler",
            "create-proxy-user",
            "--pem-server",
            "127.0.0.1",
            "--pem-port",
            &bed.pgb_port.to_string(),
            "--pem-user",
            ADMIN_USER,
            "pem_agent_user2",
        ],
        &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)],
    );
    assert!(out.status.success(), "{:?}", outcome(&out));

    // Only a superuser can hold the table lock; a registration waiting on it gives up after
    // lock_timeout with one line saying why, and leaves nothing behind.
    let holder = bed.connect(&bed.superuser()).await;
    pool::batch(
        &holder,
        "lock",
        "BEGIN; LOCK TABLE pem.agent_role IN ACCESS EXCLUSIVE MODE",
    )
    .await
    .unwrap();
    let agents_before = bed.scalar_i64("SELECT count(*) FROM pem.agent").await;
    let mut args = bed.register_args("blocked");
    let at = args.iter().position(|a| a == "--pem-agent-user").unwrap() + 1;
    args[at] = "pem_agent_user3".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) =
        outcome(&bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]));
    assert_eq!(code, 4, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("lock on pem.agent_role") && err.contains("try again"),
        "{err}"
    );
    assert!(!bed.home.join("blocked").exists());
    assert_eq!(
        bed.scalar_i64("SELECT count(*) FROM pem.agent").await,
        agents_before
    );
    pool::batch(&holder, "release", "ROLLBACK").await.unwrap();
    let (code, out, err) =
        outcome(&bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]));
    assert_eq!(code, 0, "{out}{err}");
    drop(agent);
}

/// A running worker with 1-second heartbeats, probes and schedule reads.
struct Worker {
    id: i32,
    state: std::path::PathBuf,
    child: std::process::Child,
}

impl Worker {
    fn start(bed: &TestBed, cfg: &std::path::Path, id: i32) -> Worker {
        let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
        let child = bed.start_worker(
            cfg,
            &[
                ("state_dir", site.join("state").display().to_string()),
                (
                    "log_location",
                    site.join("worker.log").display().to_string(),
                ),
                ("short_wait", "1".into()),
                ("long_wait", "2".into()),
            ],
        );
        Worker {
            id,
            state: site.join("state"),
            child,
        }
    }

    fn stop(mut self) -> pemworker::worker::stats::Snapshot {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "agent {} exited with {status}", self.id);
        serde_json::from_slice(&std::fs::read(self.state.join("stats.json")).unwrap()).unwrap()
    }
}

async fn server_now(bed: &TestBed) -> String {
    let su = bed.connect(&bed.superuser()).await;
    let r = pool::query_one(&su, "now", "SELECT now()::text", &[])
        .await
        .unwrap();
    pool::get(&r, 0, "now").unwrap()
}

/// Waits until each agent has a heartbeat recorded after `since`.
async fn heartbeats_after(bed: &TestBed, ids: &[i32], since: &str, what: &str) {
    let ids = ids.to_vec();
    common::wait_for(what, Duration::from_secs(30), || async {
        let su = bed.connect(&bed.superuser()).await;
        pool::query_one(
            &su,
            "heartbeats",
            "SELECT count(*) FROM pem.agent_heartbeat WHERE agent_id = ANY($1) \
               AND last_heartbeat > $2::text::timestamptz",
            &[(&ids, Type::INT4_ARRAY), (&since, Type::TEXT)],
        )
        .await
        .and_then(|r| pool::get::<i64>(&r, 0, "heartbeats"))
        .unwrap_or(0)
            == ids.len() as i64
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_cannot_poison_the_shared_login_for_the_others() {
    let bed = TestBed::start();
    // Two honest agents and an attacker, all logging in as pem_agent_user1 through pgBouncer.
    let (cfg0, id0) = bed.register_agent("honest0");
    let (cfg1, id1) = bed.register_agent("honest1");
    let (cfg2, id2) = bed.register_agent("attacker");
    bed.bind_pgbouncer_fast(&cfg0, id0).await;
    bed.bind_pgbouncer_fast(&cfg1, id1).await;
    let honest = [
        Worker::start(&bed, &cfg0, id0),
        Worker::start(&bed, &cfg1, id1),
    ];
    let start = server_now(&bed).await;
    heartbeats_after(
        &bed,
        &[id0, id1],
        &start,
        "the honest agents' first heartbeats",
    )
    .await;

    let attack_start = server_now(&bed).await;
    let me = agent_config(&cfg2);
    let key = me.agent_secret.clone().expect("the attacker's own secret");
    let attacker = bed.agent_session(&cfg2).await;

    // Session state a pooled server connection carries to the next client.
    pool::batch(
        &attacker,
        "poison the session",
        "SET default_transaction_read_only = on; SET search_path = evil; \
         SELECT pg_advisory_lock(hashtext('pem.create_proxy_agent_user'))",
    )
    .await
    .unwrap();
    // Role-level settings every agent gets at its next login, and a password of its choosing.
    pool::batch(
        &attacker,
        "poison the role",
        "BEGIN READ WRITE; \
         ALTER ROLE CURRENT_USER SET default_transaction_read_only = on; \
         ALTER ROLE CURRENT_USER SET search_path = evil; \
         ALTER ROLE CURRENT_USER PASSWORD 'attacker chosen'; COMMIT",
    )
    .await
    .unwrap();
    // Locks and writes on the data tables, temporary tables.
    for sql in [
        "BEGIN READ WRITE; LOCK TABLE pemdata.cpu_usage IN ACCESS EXCLUSIVE MODE",
        "BEGIN READ WRITE; DELETE FROM pemhistory.cpu_usage",
        "BEGIN READ WRITE; INSERT INTO pem.agent_heartbeat (agent_id, last_heartbeat) VALUES (1, now())",
        "BEGIN READ WRITE; UPDATE pem.agent SET active = false",
        "BEGIN READ WRITE; SELECT * FROM pem.agent_secret",
        "BEGIN READ WRITE; CREATE TEMP TABLE t (x int)",
    ] {
        assert_denied(&refused(&attacker, sql).await, sql);
        pool::batch(&attacker, "rollback", "ROLLBACK")
            .await
            .unwrap();
    }
    // Heartbeats and samples for another agent: with its own secret, with none, replayed,
    // stale: all refused as credentials (SQLSTATE 28000).
    let version = "attacker";
    let beat = async |agent: i32, sent_at: &str, mac: &str| {
        pool::batch(&attacker, "begin", pemworker::connection::pool::BEGIN)
            .await
            .unwrap();
        let r = pool::query(
            &attacker,
            "heartbeat",
            "SELECT * FROM pem.record_heartbeat($1, $2, $3, $4)",
            &[
                (&agent, Type::INT4),
                (&version, Type::TEXT),
                (&sent_at, Type::TEXT),
                (&mac, Type::TEXT),
            ],
        )
        .await;
        let _ = pool::batch(
            &attacker,
            "end",
            if r.is_ok() { "COMMIT" } else { "ROLLBACK" },
        )
        .await;
        r
    };
    let now = mac::now();
    for (agent, mac) in [
        (id0, key.sign(Kind::Heartbeat, id0, &now, version)),
        (id0, String::new()),
        (id1, key.sign(Kind::Heartbeat, id2, &now, version)),
    ] {
        let e = beat(agent, &now, &mac)
            .await
            .expect_err("a heartbeat as another agent");
        assert_eq!(
            e.code(),
            Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
            "{e}"
        );
    }
    let own = key.sign(Kind::Heartbeat, id2, &now, version);
    beat(id2, &now, &own)
        .await
        .expect("the attacker's own heartbeat");
    let e = beat(id2, &now, &own)
        .await
        .expect_err("the same heartbeat replayed");
    assert!(e.to_string().contains("replay"), "{e}");
    let stale = (chrono::Utc::now() - chrono::Duration::minutes(10)).to_rfc3339();
    let e = beat(
        id2,
        &stale,
        &key.sign(Kind::Heartbeat, id2, &stale, version),
    )
    .await
    .expect_err("a stale heartbeat");
    assert!(e.to_string().contains("clock"), "{e}");
    let batch = format!(
        "[{{\"probe\":\"cpu_usage\",\"collected_at\":\"{now}\",\"rows\":[{{\"delivery_key\":\"{}\",\"idle_percent\":100}}]}}]",
        uuid::Uuid::new_v4()
    );
    for agent in [id0, id1] {
        let mac = key.sign(Kind::Samples, agent, &now, &batch);
        let e = pool::query(
            &attacker,
            "samples",
            "SELECT * FROM pem.store_samples($1, $2, $3, $4)",
            &[
                (&agent, Type::INT4),
                (&now, Type::TEXT),
                (&batch, Type::TEXT),
                (&mac, Type::TEXT),
            ],
        )
        .await
        .expect_err("samples as another agent");
        assert_eq!(
            e.code(),
            Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
            "{e}"
        );
    }

    // New server connections, so the role-level settings meet fresh logins.
    bed.console("RECONNECT pem").await;
    // The chosen password logs in nowhere: not directly, not through pgBouncer.
    for s in [bed.direct("pem_agent_user1", "attacker chosen"), {
        let mut s = bed.direct("pem_agent_user1", "attacker chosen");
        s.port = bed.pgb_port;
        s
    }] {
        let e = connection::connect(&s)
            .await
            .expect_err("a login with the attacker's password");
        assert!(e.is_connect(), "{e}");
    }
    // Registration goes on (the attacker still holds its advisory lock).
    bed.register_agent("during the attack");

    // The honest agents' heartbeats repair the role; they keep beating and delivering.
    common::wait_for("the role to be repaired", Duration::from_secs(20), || async {
        bed.scalar_i64(
            "SELECT count(*) FROM pg_db_role_setting WHERE setrole = 'pem_agent_user1'::regrole",
        )
        .await
            == 0
            && bed
                .scalar_i64(
                    "SELECT count(*) FROM pg_authid WHERE rolname = 'pem_agent_user1' AND rolpassword IS NOT NULL",
                )
                .await
                == 0
    })
    .await;
    // Keep the attacker's poisoned sessions around for a while, then see the others go on.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let attack_end = server_now(&bed).await;
    heartbeats_after(
        &bed,
        &[id0, id1],
        &attack_end,
        "heartbeats after the attack",
    )
    .await;
    drop(attacker);

    let su = bed.connect(&bed.superuser()).await;
    for w in honest {
        let id = w.id;
        let stats = w.stop();
        assert_eq!(stats.heartbeat_failures, 0, "agent {id}: {stats:?}");
        assert_eq!(stats.spooled_samples, 0, "agent {id}: {stats:?}");
        for p in pemworker::probes::PROBES {
            let collected = stats.collected.get(p.name).map_or(0, |c| c.rows) as i64;
            let stored: i64 = pool::get(
                &pool::query_one(
                    &su,
                    "stored",
                    &format!(
                        "SELECT count(*) FROM pemhistory.{} WHERE agent_id = $1",
                        p.name
                    ),
                    &[(&id, Type::INT4)],
                )
                .await
                .unwrap(),
                0,
                "stored",
            )
            .unwrap();
            assert_eq!(stored, collected, "agent {id} probe {}", p.name);
        }
        let during: i64 = pool::get(
            &pool::query_one(
                &su,
                "during",
                "SELECT count(*) FROM pemhistory.cpu_usage WHERE agent_id = $1 \
                  AND collected_at BETWEEN $2::text::timestamptz AND $3::text::timestamptz",
                &[
                    (&id, Type::INT4),
                    (&attack_start, Type::TEXT),
                    (&attack_end, Type::TEXT),
                ],
            )
            .await
            .unwrap(),
            0,
            "during",
        )
        .unwrap();
        assert!(
            during >= 2,
            "agent {id}: {during} cpu samples stored from {attack_start} to {attack_end}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_server_upgrades_a_guide_prepared_server_in_place() {
    let mut bed = TestBed::start_postgres_only();
    // The previous schema version, as a PEM server of that release had it ...
    let mut postgres = bed.superuser();
    postgres.dbname = "postgres".into();
    let c = bed.connect(&postgres).await;
    pool::batch(&c, "create", "CREATE DATABASE pem")
        .await
        .unwrap();
    let su = bed.connect(&bed.superuser()).await;
    let applied = pemworker::schema::apply_up_to(&su, 2).await.unwrap();
    assert_eq!(applied, vec![1, 2]);
    // ... prepared by the guide's chapter 3, literally: a CREATEROLE admin, the grants, the
    // proxy agent user made by the guide's function, its md5 pg_hba.conf line.
    let guide = format!(
        "CREATE USER pgbouncer PASSWORD 'ANY_PASSWORD' LOGIN; \
         CREATE USER pem_admin1 PASSWORD '{}' LOGIN CREATEROLE; \
         GRANT pem_admin, pem_agent_pool TO pem_admin1; \
         GRANT CONNECT ON DATABASE pem TO pgbouncer; GRANT USAGE ON SCHEMA pem TO pgbouncer; \
         GRANT USAGE ON SCHEMA pem TO pgbouncer; \
         GRANT EXECUTE ON FUNCTION pem.get_agent_pool_auth(text) TO pgbouncer; \
         SELECT pem.create_proxy_agent_user('pem_agent_user1');",
        ADMIN_PASSWORD.replace('\'', "''")
    );
    pool::batch(&su, "the guide's SQL", &guide).await.unwrap();
    let hba = bed.data_dir.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("local pem pgbouncer,pem_admin1 md5\n{text}")).unwrap();
    pool::batch(&su, "reload", "SELECT pg_reload_conf()")
        .await
        .unwrap();

    // That admin is the superuser in disguise.
    let admin = bed.connect(&bed.direct(ADMIN_USER, ADMIN_PASSWORD)).await;
    pool::batch(
        &admin,
        "escalate",
        "GRANT pg_execute_server_program TO pem_admin1; REVOKE pg_execute_server_program FROM pem_admin1",
    )
    .await
    .expect("the guide's admin can grant itself pg_execute_server_program");
    drop(admin);

    let prepare = bed.prepare_args();
    let prepare: Vec<&str> = prepare.iter().map(String::as_str).collect();
    // With --keep-guide-createrole the recipe stays as the guide has it, and the risk is named.
    let mut keep = prepare.clone();
    keep.push("--keep-guide-createrole");
    let (code, out, err) = outcome(&bed.pemworker(&keep));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("pem_admin1 keeps CREATEROLE (--keep-guide-createrole)")
            && out.contains("pg_execute_server_program")
            && err.contains("keeps CREATEROLE"),
        "{out}{err}"
    );
    assert!(out.contains("installed PEM schema version(s) [3"), "{out}");
    assert_eq!(
        bed.scalar_i64(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'pem_admin1' AND rolcreaterole"
        )
        .await,
        1
    );

    // The upgrade proper: the risk reported and removed, the guide's secrets gone.
    let (code, out, err) = outcome(&bed.pemworker(&prepare));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("changed:   removed CREATEROLE from pem_admin1: on PostgreSQL 15 and older"),
        "{out}"
    );
    let admin = bed.connect(&bed.direct(ADMIN_USER, ADMIN_PASSWORD)).await;
    let sql = "GRANT pg_execute_server_program TO pem_admin1";
    assert_denied(&refused(&admin, sql).await, sql);
    drop(admin);
    for sql in [
        "SELECT count(*) FROM pg_authid WHERE rolname IN ('pgbouncer', 'pem_agent_user1') AND rolpassword IS NOT NULL",
        "SELECT count(*) FROM pg_auth_members WHERE member = 'pem_admin1'::regrole AND roleid = 'pem_agent_pool'::regrole",
    ] {
        assert_eq!(bed.scalar_i64(sql).await, 0, "{sql}");
    }
    assert_eq!(
        bed.scalar_i64(
            "SELECT count(*) FROM pem.agent_role WHERE role_name = 'pem_agent_user1' AND adopted"
        )
        .await,
        1,
        "the guide's agent user is adopted"
    );

    // A second run changes nothing.
    let before = bed.server_state().await;
    let (code, out, err) = outcome(&bed.pemworker(&prepare));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.trim_end().ends_with("nothing to change"), "{out}");
    assert_eq!(bed.server_state().await, before);

    // pgBouncer configured anew; the guide's agent user logs in through it and delivers.
    let configure = bed.configure_args();
    let configure: Vec<&str> = configure.iter().map(String::as_str).collect();
    let (code, out, err) = outcome(&bed.pemworker(&configure));
    assert_eq!(code, 0, "{out}{err}");
    bed.start_pgbouncer();
    bed.register_agent("after the upgrade");
    bed.legitimate_flow("upgrade").await;
}

fn check_args(bed: &TestBed, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["pooler", "check"].map(String::from).to_vec();
    a.extend(bed.superuser_args());
    for (k, v) in [
        ("--config-dir", bed.pgb_dir.display().to_string()),
        (
            "--pg-hba",
            bed.data_dir.join("pg_hba.conf").display().to_string(),
        ),
        ("--pgbouncer-host", "127.0.0.1".into()),
        ("--pgbouncer-port", bed.pgb_port.to_string()),
    ] {
        a.push(k.into());
        a.push(v);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn check(bed: &TestBed, extra: &[&str]) -> (i32, String, String) {
    let a = check_args(bed, extra);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (code, out, err) = outcome(&bed.pemworker(&a));
    // For the record (cargo test -- --nocapture).
    eprintln!("pooler check {extra:?} -> exit {code}\n{out}{err}");
    (code, out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooler_check_reports_each_problem_and_fix_repairs_it() {
    let bed = TestBed::start();
    bed.register_agent("first");
    let (code, out, err) = check(&bed, &[]);
    assert_eq!(code, 0, "a clean sandbox: {out}{err}");
    assert!(out.trim_end().ends_with("no problems found"), "{out}");
    assert!(
        out.contains("ok:      pem_agent_user1 logs in through pgBouncer at 127.0.0.1"),
        "{out}"
    );

    // The five problems.
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "break",
        "ALTER ROLE pem_admin1 CREATEROLE; \
         ALTER ROLE pem_agent_user1 SET work_mem = '64kB'; \
         SET password_encryption = 'scram-sha-256'; ALTER ROLE pem_agent_user1 PASSWORD 'x'",
    )
    .await
    .unwrap();
    let userlist = bed.pgb_dir.join("userlist.txt");
    std::fs::set_permissions(&userlist, std::fs::Permissions::from_mode(0o644)).unwrap();
    let hba = bed.data_dir.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host pem +pem_agent_pool 0.0.0.0/0 md5\n{text}"),
    )
    .unwrap();
    pool::batch(&su, "reload", "SELECT pg_reload_conf()")
        .await
        .unwrap();

    let (code, out, err) = check(&bed, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    for says in [
        "problem: the admin pem_admin1 has CREATEROLE: on PostgreSQL 15 and older",
        "problem: agent user pem_agent_user1 has role-level settings",
        "problem: agent user pem_agent_user1 has a SCRAM secret",
        "is readable by everybody (mode 0644)",
        "problem: pg_hba.conf admits agent users from anywhere: line 1 (host pem +pem_agent_pool md5)",
    ] {
        assert!(out.contains(says), "missing {says:?} in\n{out}");
    }
    assert!(
        out.lines()
            .filter(|l| l.starts_with("problem:"))
            .all(|l| l.contains("; fix: "))
    );

    let (code, out, err) = check(&bed, &["--fix"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("fixed:")).count(),
        5,
        "{out}"
    );
    let (code, out, err) = check(&bed, &[]);
    assert_eq!(code, 0, "after --fix: {out}{err}");
    assert_eq!(
        std::fs::metadata(&userlist).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(&hba)
            .unwrap()
            .starts_with(pemworker::pooler::hba::BEGIN_MARK)
    );
    for sql in [
        "SELECT count(*) FROM pg_roles WHERE rolname = 'pem_admin1' AND rolcreaterole",
        "SELECT count(*) FROM pg_db_role_setting",
        "SELECT count(*) FROM pg_authid WHERE rolname = 'pem_agent_user1' AND rolpassword IS NOT NULL",
    ] {
        assert_eq!(bed.scalar_i64(sql).await, 0, "{sql}");
    }
    bed.legitimate_flow("check").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgbouncer_on_another_host_gets_md5_secrets_only_over_tls_and_they_are_repaired() {
    // pgBouncer reaching PostgreSQL over TCP, as from another host (the bed has one address).
    let mut bed = TestBed::start_postgres_only();
    let mut prepare = bed.prepare_args();
    prepare.extend(["--pgbouncer-address".into(), "127.0.0.1".into()]);
    let prepare: Vec<&str> = prepare.iter().map(String::as_str).collect();
    let (code, out, err) = outcome(&bed.pemworker(&prepare));
    assert_eq!(code, 0, "{out}{err}");
    let hba = std::fs::read_to_string(bed.data_dir.join("pg_hba.conf")).unwrap();
    assert!(
        hba.contains("hostssl \"pem\" +pem_agent_pool 127.0.0.1/32 md5\n")
            && hba.contains(
                "hostssl \"pem\" \"pgbouncer\",\"pem_admin1\" 127.0.0.1/32 scram-sha-256\n"
            ),
        "{hba}"
    );
    let mut configure = bed.configure_args();
    let at = configure.iter().position(|a| a == "--pem-db-host").unwrap() + 1;
    configure[at] = "127.0.0.1".into();
    let configure: Vec<&str> = configure.iter().map(String::as_str).collect();
    let (code, out, err) = outcome(&bed.pemworker(&configure));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("in plain text"), "the warning: {err}");
    bed.start_pgbouncer();
    let (cfg, _) = bed.register_agent("remote");

    // The auth query hands pgBouncer the md5 secret it needs here, and the secret logs in
    // nowhere but from pgBouncer's address over TLS: not over the socket, not without TLS.
    let secret = bed.auth_query_over_tcp("pem_agent_user1").await;
    assert!(secret.starts_with("md5"), "{secret}");
    let mut plain = bed.direct("pem_agent_user1", "unknown");
    plain.sslmode = pemworker::connection::SslMode::Disable;
    let e = connection::connect(&plain)
        .await
        .expect_err("a login without TLS");
    assert!(e.to_string().contains("rejects connection"), "{e}");

    // An agent replaces the secret with a password of its own; the next heartbeat puts the
    // recorded secret back, and pgBouncer's fresh server logins go on working.
    let attacker = bed.agent_session(&cfg).await;
    pool::batch(
        &attacker,
        "password",
        "BEGIN READ WRITE; ALTER ROLE CURRENT_USER PASSWORD 'mine'; COMMIT",
    )
    .await
    .unwrap();
    drop(attacker);
    bed.legitimate_flow("remote").await;
    assert_eq!(
        bed.scalar_i64(
            "SELECT count(*) FROM pg_authid a JOIN pem.agent_role r ON r.role_oid = a.oid \
              WHERE a.rolname = 'pem_agent_user1' AND a.rolpassword = r.password AND r.password LIKE 'md5%'"
        )
        .await,
        1,
        "the recorded md5 secret is back"
    );
    bed.console("RECONNECT pem").await;
    let agent = bed.agent_session(&cfg).await;
    pool::batch(&agent, "select", "SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registered_before_secrets_is_refused_keeps_its_samples_and_is_told_the_fix() {
    let bed = TestBed::start();
    let (cfg, id) = bed.register_agent("old");
    // An agent.cfg from before per-agent secrets: no agent_secret_file.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let old: String = text
        .lines()
        .filter(|l| !l.starts_with("agent_secret_file="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&cfg, old).unwrap();
    bed.bind_pgbouncer_fast(&cfg, id).await;
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let log = site.join("worker.log");
    let worker = Worker::start(&bed, &cfg, id);
    common::wait_for(
        "the worker's log to say how to fix it",
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("names no agent_secret_file")
                && text.contains("--force-registration")
                && text.contains("failed authentication")
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = worker.stop();
    assert!(first.spooled_samples > 0, "{first:?}");
    for sql in [
        "SELECT count(*) FROM pem.agent_heartbeat",
        "SELECT count(*) FROM pemhistory.cpu_usage",
    ] {
        assert_eq!(bed.scalar_i64(sql).await, 0, "{sql}: refused writes stored");
    }

    // Registering again keeps the agent id and brings the secret; the spool is delivered.
    let mut args = bed.register_args("old");
    args.push("--force-registration".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) =
        outcome(&bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("kept from the existing agent.cfg"), "{out}");
    let again = agent_config(&cfg);
    assert_eq!(again.agent_id, id);
    assert!(again.agent_secret.is_some());
    let worker = Worker::start(&bed, &cfg, id);
    let spool = site.join("state/spool");
    common::wait_for("the spool to drain", Duration::from_secs(60), || async {
        std::fs::read_dir(&spool)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "json")
                })
                .count()
                    == 0
            })
            .unwrap_or(false)
    })
    .await;
    let second = worker.stop();
    let rows = |s: &pemworker::worker::stats::Snapshot| {
        s.collected.get("cpu_usage").map_or(0, |c| c.rows) as i64
    };
    assert_eq!(
        bed.scalar_i64("SELECT count(*) FROM pemhistory.cpu_usage")
            .await,
        rows(&first) + rows(&second),
        "every sample of both runs stored once"
    );
}
