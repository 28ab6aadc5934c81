//! The test bed: a private PostgreSQL 15 (TLS on, a fresh CA in its data directory, the
//! reference PEM schema) and a private pgBouncer in front of it, both configured through
//! `pemworker pooler prepare-server` and `pemworker pooler configure`, so every test exercises
//! the pooler module end to end.
//!
//! Each bed has its own ports and directories, runs the servers as the `postgres` OS user when
//! the tests run as root, bounds every wait, and stops everything when dropped (also when a
//! test panics). A missing server binary is a failure with an install hint, never a skip.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pemworker::certs::{self, Authority};
use pemworker::connection::{self, ConnectSettings, SslMode, pool};
use pemworker::secret::Secret;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

pub const SUPERUSER_PASSWORD: &str = "super secret 'pw";
pub const AUTH_PASSWORD: &str = "bouncer pw \"quoted\"";
pub const ADMIN_PASSWORD: &str = "admin:pw\\1";
pub const AUTH_USER: &str = "pgbouncer";
pub const ADMIN_USER: &str = "pem_admin1";

const WAIT: Duration = Duration::from_secs(30);

pub struct TestBed {
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub pg_socket_dir: PathBuf,
    pub pgb_dir: PathBuf,
    pub pgb_run_dir: PathBuf,
    pub home: PathBuf,
    pub pg_port: u16,
    pub pgb_port: u16,
    pub ca: Authority,
    pub root_crt: PathBuf,
    bin_dir: PathBuf,
    pgbouncer_bin: PathBuf,
    pgbouncer: Option<Child>,
    postgres_started: bool,
    /// The OS user the servers run as: `postgres` when tests run as root.
    pub run_as: Option<String>,
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

fn pg_bin_dir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let candidates = from_pg_config
        .into_iter()
        .chain([PathBuf::from("/usr/lib/postgresql/15/bin")]);
    for dir in candidates {
        if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
            return dir;
        }
    }
    panic!(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them with \
         `apt-get install postgresql-15` (bash .ci/run does this)"
    );
}

fn pgbouncer_bin() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join("pgbouncer");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "pgbouncer not found; install it with `apt-get install pgbouncer` (bash .ci/run does this)"
    );
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
    /// Starts PostgreSQL, prepares it with `prepare-server --install-schema --pg-hba`, writes
    /// pgBouncer's files with `configure`, and starts pgBouncer.
    pub fn start() -> TestBed {
        let bin_dir = pg_bin_dir();
        let pgbouncer_bin = pgbouncer_bin();
        let run_as = is_root().then(|| "postgres".to_string());
        let root = tempfile::Builder::new()
            .prefix("pemworker-test-")
            .tempdir_in("/tmp")
            .expect("temporary directory")
            .keep();
        let mut bed = TestBed {
            data_dir: root.join("data"),
            pg_socket_dir: root.join("pg"),
            pgb_dir: root.join("pgbouncer"),
            pgb_run_dir: root.join("pgb-run"),
            home: root.join("home"),
            root_crt: root.join("data/root.crt"),
            root,
            pg_port: free_port(),
            pgb_port: free_port(),
            ca: Authority::generate("pemworker test CA").expect("CA"),
            bin_dir,
            pgbouncer_bin,
            pgbouncer: None,
            postgres_started: false,
            run_as,
        };
        bed.init_postgres();
        bed.prepare_server();
        bed.configure_pgbouncer();
        bed.start_pgbouncer();
        bed
    }

    fn server_owned_dir(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        self.give_to_server_user(dir);
    }

    fn give_to_server_user(&self, path: &Path) {
        if let Some(u) = &self.run_as {
            let user = nix::unistd::User::from_name(u)
                .unwrap()
                .expect("the postgres OS user");
            nix::unistd::chown(path, Some(user.uid), Some(user.gid)).unwrap();
        }
    }

    /// A command run as the server user.
    fn server_command(&self, program: &Path) -> Command {
        match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn write_server_file(&self, path: &Path, contents: &str, mode: u32) {
        std::fs::write(path, contents).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        self.give_to_server_user(path);
    }

    fn init_postgres(&mut self) {
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(&self.home).unwrap();
        std::fs::set_permissions(&self.home, std::fs::Permissions::from_mode(0o700)).unwrap();
        self.server_owned_dir(&self.data_dir.clone());
        self.server_owned_dir(&self.pg_socket_dir.clone());
        self.server_owned_dir(&self.pgb_run_dir.clone());
        let pwfile = self.root.join("pwfile");
        self.write_server_file(&pwfile, SUPERUSER_PASSWORD, 0o600);
        check(
            "initdb",
            self.server_command(&self.bin_dir.join("initdb"))
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-U", "postgres", "-E", "UTF8", "--no-sync"])
                .args(["--auth-local=scram-sha-256", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display()))
                .output()
                .expect("run initdb"),
        );
        std::fs::remove_file(&pwfile).unwrap();

        // The CA where PEM keeps it (the data directory), and the server's TLS files.
        let (server_crt, server_key) = self.ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
        let files = [
            ("ca_certificate.crt", self.ca.cert_pem.as_str(), 0o644),
            ("ca_key.key", self.ca.key_pem.as_str(), 0o600),
            ("root.crt", self.ca.cert_pem.as_str(), 0o644),
            ("server.crt", server_crt.as_str(), 0o644),
            ("server.key", server_key.as_str(), 0o600),
        ];
        for (name, contents, mode) in files {
            self.write_server_file(&self.data_dir.join(name), contents, mode);
        }
        let conf = format!(
            "\n# test bed\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n\
             shared_buffers = 32MB\n",
            self.pg_port,
            self.pg_socket_dir.display()
        );
        let conf_path = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_path, text).unwrap();
        self.postgres_started = true;
        check(
            "pg_ctl start",
            self.server_command(&self.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-w", "-t", "30", "-l"])
                .arg(self.pgb_run_dir.join("postgresql.log"))
                .arg("start")
                .stdout(Stdio::null())
                .output()
                .expect("run pg_ctl"),
        );
    }

    /// Runs the built `pemworker` with a private HOME and the test bed's passwords in the
    /// environment (never on the command line).
    pub fn pemworker(&self, args: &[&str]) -> Output {
        self.pemworker_env(args, &[])
    }

    pub fn pemworker_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pemworker"));
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("PEM_SERVER_PASSWORD", SUPERUSER_PASSWORD)
            .env("PEMWORKER_AUTH_USER_PASSWORD", AUTH_PASSWORD)
            .env("PEMWORKER_ADMIN_USER_PASSWORD", ADMIN_PASSWORD)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &self.root_crt)
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run pemworker")
    }

    pub fn superuser_args(&self) -> Vec<String> {
        vec![
            "--pem-server".into(),
            "127.0.0.1".into(),
            "--pem-port".into(),
            self.pg_port.to_string(),
            "--pem-user".into(),
            "postgres".into(),
        ]
    }

    pub fn prepare_args(&self) -> Vec<String> {
        let mut a = vec!["pooler".to_string(), "prepare-server".into()];
        a.extend(self.superuser_args());
        a.extend(["--install-schema".into(), "--pg-hba".into()]);
        a.push(self.data_dir.join("pg_hba.conf").display().to_string());
        a
    }

    fn prepare_server(&self) {
        let args = self.prepare_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        check("pemworker pooler prepare-server", self.pemworker(&args));
    }

    pub fn configure_args(&self) -> Vec<String> {
        let d = |p: &Path| p.display().to_string();
        let mut a: Vec<String> = ["pooler", "configure", "--config-dir"]
            .map(String::from)
            .to_vec();
        a.push(d(&self.pgb_dir));
        if let Some(u) = &self.run_as {
            a.extend(["--owner".into(), u.clone()]);
        }
        let pairs = [
            ("--pem-db-host", d(&self.pg_socket_dir)),
            ("--pem-db-port", self.pg_port.to_string()),
            ("--listen-addr", "127.0.0.1".into()),
            ("--listen-port", self.pgb_port.to_string()),
            ("--unix-socket-dir", d(&self.pgb_run_dir)),
            ("--logfile", d(&self.pgb_run_dir.join("pgbouncer.log"))),
            ("--pidfile", d(&self.pgb_run_dir.join("pgbouncer.pid"))),
            ("--client-tls-ca-file", d(&self.data_dir.join("root.crt"))),
            (
                "--client-tls-key-file",
                d(&self.data_dir.join("server.key")),
            ),
            (
                "--client-tls-cert-file",
                d(&self.data_dir.join("server.crt")),
            ),
            ("--pgbouncer-bin", d(&self.pgbouncer_bin)),
            ("--agent-network", "127.0.0.0/8".into()),
            ("--admin-network", "127.0.0.0/8".into()),
        ];
        for (k, v) in pairs {
            a.push(k.into());
            a.push(v);
        }
        a
    }

    fn configure_pgbouncer(&self) {
        let args = self.configure_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        check("pemworker pooler configure", self.pemworker(&args));
    }

    pub fn pgbouncer_ini(&self) -> PathBuf {
        self.pgb_dir.join("pgbouncer.ini")
    }

    /// Starts pgBouncer in the foreground (so it dies with the bed) and waits until it listens.
    pub fn start_pgbouncer(&mut self) {
        let log = std::fs::File::create(self.root.join("pgbouncer.stderr")).unwrap();
        let child = self
            .server_command(&self.pgbouncer_bin.clone())
            .arg(self.pgbouncer_ini())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pgbouncer");
        self.pgbouncer = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.pgb_port)).is_ok() {
                return;
            }
            if let Some(status) = self.pgbouncer.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "pgbouncer exited ({status}) with the generated configuration:\n{}\n{}",
                    std::fs::read_to_string(self.root.join("pgbouncer.stderr")).unwrap_or_default(),
                    std::fs::read_to_string(self.pgb_run_dir.join("pgbouncer.log"))
                        .unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop_pgbouncer(&mut self) {
        if let Some(mut child) = self.pgbouncer.take() {
            // runuser forwards SIGTERM to pgBouncer (immediate shutdown).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + WAIT;
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Settings for a direct session with PostgreSQL as the superuser.
    pub fn superuser(&self) -> ConnectSettings {
        let mut s = self.direct("postgres", SUPERUSER_PASSWORD);
        s.dbname = "pem".into();
        s
    }

    /// Direct TCP session with PostgreSQL, verified TLS.
    pub fn direct(&self, user: &str, password: &str) -> ConnectSettings {
        let mut s = self.tls_settings(self.pg_port, user);
        s.password = Some(Secret::new(password));
        s
    }

    /// Session through pgBouncer as the PEM admin (md5 over verified TLS).
    pub fn admin_via_pooler(&self) -> ConnectSettings {
        let mut s = self.tls_settings(self.pgb_port, ADMIN_USER);
        s.password = Some(Secret::new(ADMIN_PASSWORD));
        s
    }

    /// Session through pgBouncer as an agent user, authenticated by its certificate.
    pub fn agent_via_pooler(&self, user: &str, cert: &Path, key: &Path) -> ConnectSettings {
        let mut s = self.tls_settings(self.pgb_port, user);
        s.client_cert = Some((cert.to_path_buf(), key.to_path_buf()));
        s
    }

    fn tls_settings(&self, port: u16, user: &str) -> ConnectSettings {
        ConnectSettings {
            host: "127.0.0.1".into(),
            port,
            user: user.into(),
            dbname: "pem".into(),
            password: None,
            sslmode: SslMode::VerifyFull,
            root_cert: Some(self.root_crt.clone()),
            client_cert: None,
            connect_timeout: Duration::from_secs(10),
            application_name: "pemworker-tests".into(),
        }
    }

    pub async fn connect(&self, s: &ConnectSettings) -> Client {
        connection::connect(s)
            .await
            .unwrap_or_else(|e| panic!("connect {}@{}: {e}", s.user, s.target()))
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

impl Drop for TestBed {
    fn drop(&mut self) {
        self.stop_pgbouncer();
        if self.postgres_started {
            let _ = self
                .server_command(&self.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if std::env::var_os("PEMWORKER_KEEP_TESTBED").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        } else {
            eprintln!("test bed kept in {}", self.root.display());
        }
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
    /// Registers an agent through pgBouncer as pem_agent_user1 with its files under
    /// `<home>/<name>`; returns its agent.cfg and agent id.
    pub fn register_agent(&self, name: &str) -> (PathBuf, i32) {
        let site = self.home.join(name);
        let args = [
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
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = check(
            "register",
            self.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]),
        );
        let _ = out;
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
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pemworker")
    }

    /// Runs SQL on pgBouncer's admin console as the admin user (PAUSE, RESUME, KILL ...).
    pub async fn console(&self, sql: &str) {
        let mut s = self.admin_via_pooler();
        s.dbname = "pgbouncer".into();
        let c = self.connect(&s).await;
        pool::batch(&c, sql, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Stops PostgreSQL (fast) and returns once it is down.
    pub fn stop_postgres(&self) {
        check(
            "pg_ctl stop",
            self.server_command(&self.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "fast", "-w", "-t", "30", "stop"])
                .stdout(Stdio::null())
                .output()
                .unwrap(),
        );
    }

    pub fn start_postgres(&self) {
        check(
            "pg_ctl start",
            self.server_command(&self.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-w", "-t", "30", "-l"])
                .arg(self.pgb_run_dir.join("postgresql.log"))
                .arg("start")
                .stdout(Stdio::null())
                .output()
                .unwrap(),
        );
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
