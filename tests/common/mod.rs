//! The test bed: [`pemworker::sandbox::Servers`] (a private PostgreSQL 15 with TLS, a fresh CA
//! and the reference PEM schema, and a private pgBouncer, both configured through
//! `pemworker pooler prepare-server` and `pemworker pooler configure`), with known passwords
//! and the helpers tests need. A missing server binary is a failure with an install hint,
//! never a skip; everything is stopped and removed when the bed is dropped, also when a test
//! panics (`PEMWORKER_KEEP_TESTBED=1` keeps the directory).

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pemworker::certs;
use pemworker::connection::{self, ConnectSettings, pool};
use pemworker::sandbox::servers::{Options, Passwords, Servers};
use pemworker::secret::Secret;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

#[allow(unused_imports)]
pub use pemworker::sandbox::servers::{ADMIN_USER, AUTH_USER, STATS_USER};

pub const SUPERUSER_PASSWORD: &str = "super secret 'pw";
pub const AUTH_PASSWORD: &str = "bouncer pw \"quoted\"";
pub const ADMIN_PASSWORD: &str = "admin:pw\\1";
pub const STATS_PASSWORD: &str = "stats 'pw' #1";

pub struct TestBed {
    servers: Servers,
}

impl std::ops::Deref for TestBed {
    type Target = Servers;
    fn deref(&self) -> &Servers {
        &self.servers
    }
}

fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl TestBed {
    pub fn start() -> TestBed {
        let opts = Options {
            exe: PathBuf::from(env!("CARGO_BIN_EXE_pemworker")),
            passwords: Passwords {
                superuser: Secret::new(SUPERUSER_PASSWORD),
                auth: Secret::new(AUTH_PASSWORD),
                admin: Secret::new(ADMIN_PASSWORD),
                stats: Secret::new(STATS_PASSWORD),
            },
            pgbouncer_port: None,
        };
        let servers = Servers::start(&opts).unwrap_or_else(|e| panic!("test bed: {e}"));
        TestBed { servers }
    }

    /// Runs the built `pemworker` with the bed's environment.
    pub fn pemworker(&self, args: &[&str]) -> Output {
        self.pemworker_env(args, &[])
    }

    pub fn pemworker_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = self.servers.pemworker_command();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run pemworker")
    }

    pub fn start_pgbouncer(&mut self) {
        self.servers
            .start_pgbouncer()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn stop_pgbouncer(&mut self) {
        self.servers.stop_pgbouncer();
    }

    pub fn start_postgres(&self) {
        self.servers
            .start_postgres()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn stop_postgres(&self) {
        self.servers
            .stop_postgres()
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn direct(&self, user: &str, password: &str) -> ConnectSettings {
        self.servers.direct(user, Secret::new(password))
    }

    pub async fn connect(&self, s: &ConnectSettings) -> Client {
        connection::connect(s)
            .await
            .unwrap_or_else(|e| panic!("connect {}@{}: {e}", s.user, s.target()))
    }

    /// Every role on the server, sorted.
    pub async fn role_names(&self) -> Vec<String> {
        let su = self.connect(&self.servers.superuser()).await;
        pool::query(
            &su,
            "roles",
            "SELECT rolname::text FROM pg_roles ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    /// A libpq connection string for `user` through pgBouncer with a client certificate.
    pub fn agent_conninfo(&self, user: &str, crt: &Path, key: &Path) -> String {
        format!(
            "host=127.0.0.1 port={} dbname=pem user={user} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            self.pgb_port,
            self.root_crt.display(),
            crt.display(),
            key.display()
        )
    }

    /// Runs SQL on pgBouncer's admin console as the admin user (PAUSE, RESUME, KILL ...).
    pub async fn console(&self, sql: &str) {
        let c = self.connect(&self.servers.console()).await;
        pool::batch(&c, sql, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    /// Has the server sign a CSR for `user` (as the PEM admin, through pgBouncer) and writes
    /// the key (0600) and certificate into a private directory; returns (cert, key).
    pub async fn issue_agent_certificate(&self, user: &str) -> (PathBuf, PathBuf) {
        let admin = self.connect(&self.admin_via_pooler()).await;
        let key = certs::generate_key().unwrap();
        let csr = certs::csr_pem(&key, user).unwrap();
        let cert: String = pool::query(
            &admin,
            "signing",
            "SELECT pem.sign_agent_csr($1)",
            &[(&csr, Type::TEXT)],
        )
        .await
        .unwrap_or_else(|e| panic!("signing a CSR for {user}: {e}"))[0]
            .get(0);
        let dir = self.home.join(".pem");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let safe: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let (crt_path, key_path) = (
            dir.join(format!("{safe}.crt")),
            dir.join(format!("{safe}.key")),
        );
        std::fs::write(&crt_path, cert).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (crt_path, key_path)
    }

    /// Runs psql (libpq) with a connection string and one command; returns its output.
    pub fn psql(&self, conninfo: &str, sql: &str) -> Output {
        Command::new("psql")
            .arg(conninfo)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .expect("run psql (apt-get install postgresql-client-15)")
    }
}

/// Exit code, stdout and stderr as one value for assertions and messages.
pub fn outcome(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

impl TestBed {
    /// `--register-agent` through pgBouncer as pem_agent_user1, with the agent's files under
    /// `<home>/<name>`.
    pub fn register_args(&self, name: &str) -> Vec<String> {
        let site = self.home.join(name);
        [
            "--register-agent".to_string(),
            "--pem-server".into(),
            "127.0.0.1".into(),
            "--pem-port".into(),
            self.pgb_port.to_string(),
            "--pem-user".into(),
            ADMIN_USER.into(),
            "--pem-agent-user".into(),
            "pem_agent_user1".into(),
            "--display-name".into(),
            name.into(),
            "--cert-path".into(),
            site.join(".pem").display().to_string(),
            "--config-dir".into(),
            site.join("etc").display().to_string(),
        ]
        .to_vec()
    }

    /// Registers an agent (see [`TestBed::register_args`]); returns its agent.cfg and id.
    pub fn register_agent(&self, name: &str) -> (PathBuf, i32) {
        let site = self.home.join(name);
        let args = self.register_args(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        check(
            "register",
            self.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]),
        );
        let cfg = site.join("etc/agent.cfg");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("agent_id="))
            .and_then(|v| v.parse().ok())
            .expect("agent_id in agent.cfg");
        (cfg, id)
    }

    /// Starts `pemworker -c <cfg> -f` with the bed's environment and extra `-o` settings.
    pub fn start_worker(&self, cfg: &Path, overrides: &[(&str, String)]) -> Child {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pemworker"));
        c.arg("-c").arg(cfg).arg("-f");
        for (k, v) in overrides {
            c.arg("-o").arg(format!("{k}={v}"));
        }
        let log = std::fs::File::create(cfg.with_extension("stderr")).unwrap();
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &self.root_crt)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pemworker")
    }
}

/// Polls `f` every 200 ms until it returns true; panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
