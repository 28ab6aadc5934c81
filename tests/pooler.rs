//! The pooler module end to end, against a real PostgreSQL and a real pgBouncer.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{ADMIN_USER, AUTH_PASSWORD, AUTH_USER, TestBed, outcome};
use pemworker::connection::{self, pool};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

fn create_proxy_user_args(bed: &TestBed, name: &str) -> Vec<String> {
    // Through pgBouncer as the PEM admin, as a DBA would run it.
    vec![
        "pooler".into(),
        "create-proxy-user".into(),
        "--pem-server".into(),
        "127.0.0.1".into(),
        "--pem-port".into(),
        bed.pgb_port.to_string(),
        "--pem-user".into(),
        ADMIN_USER.into(),
        name.into(),
    ]
}

fn create_proxy_user(bed: &TestBed, name: &str) -> (i32, String, String) {
    let args = create_proxy_user_args(bed, name);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    outcome(&bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", common::ADMIN_PASSWORD)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_user_logs_in_through_pgbouncer_with_a_signed_certificate() {
    let bed = TestBed::start();
    let (code, out, err) = create_proxy_user(&bed, "pem_agent_user1");
    assert_eq!(code, 0, "create-proxy-user: {out}{err}");
    assert!(out.contains("created agent user pem_agent_user1"), "{out}");

    let (crt, key) = bed.issue_agent_certificate("pem_agent_user1").await;
    let settings = bed.agent_via_pooler("pem_agent_user1", &crt, &key);

    // Several clients share the transaction pool; every statement goes through the pool-safe
    // helpers, so none fails the way named prepared statements do behind pgBouncer 1.18.
    let mut tasks = Vec::new();
    for i in 0..4i32 {
        let settings = settings.clone();
        tasks.push(tokio::spawn(async move {
            let client = connection::connect(&settings)
                .await
                .expect("agent login through pgBouncer");
            for j in 0..25i32 {
                let row = pool::query(
                    &client,
                    "probe",
                    "SELECT current_user::text, $1::int + $2::int",
                    &[(&i, Type::INT4), (&j, Type::INT4)],
                )
                .await
                .expect("query in transaction pooling");
                assert_eq!(row[0].get::<_, String>(0), "pem_agent_user1");
                assert_eq!(row[0].get::<_, i32>(1), i + j);
            }
            pool::batch(&client, "transaction", "BEGIN; SELECT 1; COMMIT")
                .await
                .expect("transaction");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // The pool really is in transaction mode for these logins.
    let admin_console = {
        let mut s = bed.admin_via_pooler();
        s.dbname = "pgbouncer".into();
        bed.connect(&s).await
    };
    let pools = pool::simple_rows(&admin_console, "SHOW POOLS", "SHOW POOLS")
        .await
        .unwrap();
    let agent_pool = pools
        .iter()
        .find(|r| r.get("user") == Some("pem_agent_user1"))
        .expect("a pool for pem_agent_user1");
    assert_eq!(agent_pool.get("pool_mode"), Some("transaction"));

    // libpq, an independent client, logs in with the same files.
    let conninfo = bed.agent_conninfo("pem_agent_user1", &crt, &key);
    let (code, out, err) = outcome(&bed.psql(&conninfo, "SELECT current_user"));
    assert_eq!((code, out.trim()), (0, "pem_agent_user1"), "psql: {err}");

    // The certificate is what authenticates: the same files for another user are refused.
    let (_, _, _) = create_proxy_user(&bed, "pem_agent_user2");
    let other = bed.agent_via_pooler("pem_agent_user2", &crt, &key);
    let err = connection::connect(&other)
        .await
        .expect_err("a certificate for another user");
    assert!(
        err.to_string()
            .contains("certificate authentication failed"),
        "{err}"
    );
}

#[tokio::test]
async fn auth_query_function_answers_only_for_pooled_agent_users() {
    let bed = TestBed::start();
    assert_eq!(create_proxy_user(&bed, "pem_agent_user1").0, 0);
    // pgBouncer reaches PostgreSQL by peer, so the agent user has no secret to hand out.
    assert_eq!(
        bed.auth_query("pem_agent_user1"),
        vec!["pem_agent_user1 <none>"]
    );
    for name in [
        "postgres",
        ADMIN_USER,
        AUTH_USER,
        "pem_admin",
        "pem_agent_pool",
        "no_such_user",
    ] {
        assert!(
            bed.auth_query(name).is_empty(),
            "get_agent_pool_auth answered for {name}"
        );
    }
    // The auth user's password (the guide gives it one) opens nothing: it has none any more,
    // and the password the DBA set in the environment logs in nowhere.
    let e = pemworker::connection::connect(&bed.direct(AUTH_USER, AUTH_PASSWORD))
        .await
        .expect_err("the auth user by password");
    assert!(
        e.to_string().contains("password authentication failed"),
        "{e}"
    );
}

#[tokio::test]
async fn signing_function_refuses_bad_requests() {
    let bed = TestBed::start();
    assert_eq!(create_proxy_user(&bed, "pem_agent_user1").0, 0);
    let admin = bed.connect(&bed.admin_via_pooler()).await;
    let sign = async |client: &tokio_postgres::Client, csr: &str| {
        pool::query(
            client,
            "signing",
            "SELECT pem.sign_agent_csr($1)",
            &[(&csr, Type::TEXT)],
        )
        .await
        .map(|rows| rows[0].get::<_, String>(0))
    };
    let key = pemworker::certs::generate_key().unwrap();

    let csr = pemworker::certs::csr_pem(&key, "postgres").unwrap();
    let e = sign(&admin, &csr)
        .await
        .expect_err("a certificate for postgres");
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
    assert!(e.to_string().contains("not a PEM agent user"), "{e}");

    let csr = pemworker::certs::csr_pem(&key, ADMIN_USER).unwrap();
    assert!(
        sign(&admin, &csr).await.is_err(),
        "a certificate for the admin"
    );

    let e = sign(
        &admin,
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    .await
    .expect_err("a malformed CSR");
    assert_eq!(e.code(), Some(&SqlState::INVALID_PARAMETER_VALUE), "{e}");
    assert!(e.to_string().contains("malformed"), "{e}");

    // The agent itself (no pem_admin) may not sign anything, not even for itself.
    let (crt, agent_key) = bed.issue_agent_certificate("pem_agent_user1").await;
    let agent = bed
        .connect(&bed.agent_via_pooler("pem_agent_user1", &crt, &agent_key))
        .await;
    let csr = pemworker::certs::csr_pem(&key, "pem_agent_user1").unwrap();
    let e = sign(&agent, &csr)
        .await
        .expect_err("signing without pem_admin");
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");

    // And the good case is a client certificate from the CA in the data directory.
    let pem = sign(&admin, &csr)
        .await
        .expect("the admin signs an agent CSR");
    let issued = bed.home.join("issued.crt");
    std::fs::write(&issued, pem).unwrap();
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&bed.root_crt)
        .arg(&issued)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[tokio::test]
async fn hostile_proxy_user_names_create_exactly_that_role() {
    let bed = TestBed::start();
    let su = bed.connect(&bed.superuser()).await;
    for name in [
        "Evil\"; DROP ROLE pem_admin1; --",
        "Mixed Case Agent",
        "semi;colon'quote",
        "x'); DROP ROLE pgbouncer; --",
    ] {
        let before = bed.role_names().await;
        let (code, out, err) = create_proxy_user(&bed, name);
        assert_eq!(code, 0, "create-proxy-user {name:?}: {out}{err}");
        let after = bed.role_names().await;
        let added: Vec<_> = after.iter().filter(|r| !before.contains(r)).collect();
        assert_eq!(
            added,
            vec![name],
            "exactly one new role, named exactly {name:?}"
        );
        assert!(
            before.iter().all(|r| after.contains(r)),
            "a role disappeared"
        );
        let member: bool = pool::query(
            &su,
            "membership",
            "SELECT pg_has_role($1, 'pem_agent', 'MEMBER') AND pg_has_role($1, 'pem_agent_pool', 'MEMBER')",
            &[(&name, Type::NAME)],
        )
        .await
        .unwrap()[0]
            .get(0);
        assert!(member, "{name:?} is an agent user");
    }
    // Idempotent for an agent user; a clear error for a role that is not one.
    let (code, out, _) = create_proxy_user(&bed, "Mixed Case Agent");
    assert_eq!(code, 0);
    assert!(out.contains("already exists"), "{out}");
    let (code, _, err) = create_proxy_user(&bed, "postgres");
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("not a PEM agent user") && err.lines().count() == 1,
        "{err}"
    );
}

#[tokio::test]
async fn prepare_server_is_idempotent_and_pgbouncer_runs_the_generated_files() {
    let bed = TestBed::start();

    // pgBouncer started with the generated configuration (the bed waited for it to listen)
    // and answers on its console.
    let mut console = bed.admin_via_pooler();
    console.dbname = "pgbouncer".into();
    let console = bed.connect(&console).await;
    let version = pool::simple_rows(&console, "SHOW VERSION", "SHOW VERSION")
        .await
        .unwrap();
    assert!(
        version[0].get(0).unwrap().starts_with("PgBouncer 1."),
        "{:?}",
        version[0].get(0)
    );

    // Modes and owners of what configure wrote.
    let expected_owner = match &bed.run_as {
        Some(u) => nix::unistd::User::from_name(u)
            .unwrap()
            .unwrap()
            .uid
            .as_raw(),
        None => nix::unistd::Uid::effective().as_raw(),
    };
    let dir = std::fs::metadata(&bed.pgb_dir).unwrap();
    assert_eq!(
        (dir.permissions().mode() & 0o777, dir.uid()),
        (0o700, expected_owner)
    );
    for f in ["pgbouncer.ini", "hba_file", "userlist.txt"] {
        let m = std::fs::metadata(bed.pgb_dir.join(f)).unwrap();
        assert_eq!(
            (m.permissions().mode() & 0o777, m.uid()),
            (0o600, expected_owner),
            "{f}"
        );
    }

    // pg_hba.conf starts with our lines, once.
    let hba = std::fs::read_to_string(bed.data_dir.join("pg_hba.conf")).unwrap();
    assert!(hba.starts_with(pemworker::pooler::hba::BEGIN_MARK), "{hba}");
    assert_eq!(hba.matches(pemworker::pooler::hba::BEGIN_MARK).count(), 1);

    // A second run succeeds and changes nothing.
    let before = bed.server_state().await;
    let args = bed.prepare_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = outcome(&bed.pemworker(&args));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.trim_end().ends_with("nothing to change"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("changed:")), "{out}");
    assert_eq!(bed.server_state().await, before);

    // Without --pg-hba the lines are printed for the DBA instead.
    let printed: Vec<&str> = args
        .iter()
        .copied()
        .take_while(|a| *a != "--pg-hba")
        .collect();
    let (code, out, _) = outcome(&bed.pemworker(&printed));
    assert_eq!(code, 0);
    assert!(
        out.contains(
            "local \"pem\" \"pgbouncer\",\"pem_admin1\",\"pem_enrolment\",+pem_agent_pool peer map=pemworker"
        ) && !out.contains("md5"),
        "{out}"
    );

    // configure refuses to overwrite without --force, and keeps backups with it.
    let args = bed.configure_args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ini_before = std::fs::read_to_string(bed.pgbouncer_ini()).unwrap();
    let (code, _, err) = outcome(&bed.pemworker(&args));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--force") && err.lines().count() == 1, "{err}");
    args.push("--force");
    let (code, out, err) = outcome(&bed.pemworker(&args));
    assert_eq!(code, 0, "{out}{err}");
    let backups: Vec<_> = std::fs::read_dir(&bed.pgb_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bak"))
        .collect();
    assert_eq!(backups.len(), 3, "{backups:?}");
    let ini_backup = backups
        .iter()
        .find(|b| b.starts_with("pgbouncer.ini."))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(bed.pgb_dir.join(ini_backup)).unwrap(),
        ini_before
    );
}

#[tokio::test]
async fn prepare_server_refuses_a_database_without_the_schema_and_says_how_to_fix_it() {
    let bed = TestBed::start();
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(&su, "create database", "CREATE DATABASE pem_empty")
        .await
        .unwrap();
    let mut args = bed.superuser_args();
    args.splice(0..0, ["pooler".to_string(), "prepare-server".into()]);
    args.extend(["--pem-database".into(), "pem_empty".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = outcome(&bed.pemworker(&args));
    assert_eq!(code, 4, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("pem_empty") && err.contains("--install-schema"),
        "{err}"
    );
    // Nothing was created on the way to that error.
    let roles: i64 = pool::query(
        &su,
        "roles",
        "SELECT count(*) FROM pg_roles WHERE rolname = 'pem_empty'",
        &[],
    )
    .await
    .unwrap()[0]
        .get(0);
    assert_eq!(roles, 0);

    // A wrong password is a connection failure (exit 2) in one line naming server and user.
    let (code, _, err) = outcome(&bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", "wrong")]));
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{}", bed.pg_port)) && err.contains("postgres"),
        "{err}"
    );
}

/// Debian ships no pgBouncer older than 1.9, so an old one is stood in for by a script that
/// answers `--version` as pgBouncer 1.8.1 did; what is tested is our refusal, not pgBouncer.
#[test]
fn configure_refuses_a_pgbouncer_without_certificate_auth_and_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("pgbouncer-1.8");
    std::fs::write(
        &old,
        "#!/bin/sh\necho 'PgBouncer 1.8.1'\necho 'libevent 2.1.8-stable'\n",
    )
    .unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = dir.path().join("conf");
    for (bin, code, says) in [
        (old.display().to_string(), 1, "pgBouncer 1.8.1 is too old"),
        (
            "/nonexistent/pgbouncer".to_string(),
            1,
            "apt-get install pgbouncer",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pemworker"))
            .args(["pooler", "configure", "--config-dir"])
            .arg(&conf)
            .args(["--owner", &pemworker::fsutil::Owner::current().name])
            .args(["--client-tls-ca-file", "/etc/ssl/certs/ca.crt"])
            .args(["--client-tls-key-file", "/etc/ssl/private/server.key"])
            .args(["--client-tls-cert-file", "/etc/ssl/certs/server.crt"])
            .args(["--pgbouncer-bin", &bin])
            .env("PEMWORKER_AUTH_USER_PASSWORD", "a")
            .env("PEMWORKER_ADMIN_USER_PASSWORD", "b")
            .output()
            .unwrap();
        let (got, _, err) = outcome(&out);
        assert_eq!(got, code, "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!conf.exists(), "files written despite the refusal");
    }
}
