//! The test bed: [`pemworker::sandbox::Servers`] (a private PostgreSQL 15 with TLS, a fresh CA
//! and the reference PEM schema, and a private pgBouncer, both configured through
//! `pemworker pooler prepare-server` and `pemworker pooler configure`), with known passwords
//! and the helpers tests need. A missing server binary is a failure with an install hint,
//! never a skip; everything is stopped and removed when the bed is dropped, also when a test
//! panics (`PEMWORKER_KEEP_TESTBED=1` keeps the directory).

#![allow(dead_code)]

pub mod hostile;
pub mod impostor;

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

fn options() -> Options {
    Options {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_pemworker")),
        passwords: Passwords {
            superuser: Secret::new(SUPERUSER_PASSWORD),
            auth: Secret::new(AUTH_PASSWORD),
            admin: Secret::new(ADMIN_PASSWORD),
            stats: Secret::new(STATS_PASSWORD),
        },
        pgbouncer_port: None,
        sizes: Default::default(),
    }
}

impl TestBed {
    pub fn start() -> TestBed {
        let servers = Servers::start(&options()).unwrap_or_else(|e| panic!("test bed: {e}"));
        TestBed { servers }
    }

    /// PostgreSQL only: no database, schema, roles or pgBouncer yet (see
    /// [`TestBed::prepare_and_start_pgbouncer`]).
    pub fn start_postgres_only() -> TestBed {
        let servers =
            Servers::start_postgres_only(&options()).unwrap_or_else(|e| panic!("test bed: {e}"));
        TestBed { servers }
    }

    /// This program's prepare-server and configure, then pgBouncer.
    pub fn prepare_and_start_pgbouncer(&mut self) {
        self.servers
            .prepare_and_start_pgbouncer()
            .unwrap_or_else(|e| panic!("test bed: {e}"));
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
        self.start_worker_env(cfg, overrides, &[])
    }

    /// [`TestBed::start_worker`] with extra environment variables; stdout and stderr go to
    /// `<cfg>.stderr`.
    pub fn start_worker_env(
        &self,
        cfg: &Path,
        overrides: &[(&str, String)],
        env: &[(&str, String)],
    ) -> Child {
        let log = std::fs::File::create(cfg.with_extension("stderr")).unwrap();
        self.agent_command(cfg, &["-f"], overrides, env)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pemworker")
    }

    /// `pemworker <args> -c <cfg> [-o k=v ...]` with the agent's environment (the bed's HOME and
    /// its root certificate in PGSSLROOTCERT; the sslmode is the default, verify-full) and `env`
    /// (an empty value removes a variable's effect, as in libpq).
    pub fn agent_command(
        &self,
        cfg: &Path,
        args: &[&str],
        overrides: &[(&str, String)],
        env: &[(&str, String)],
    ) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pemworker"));
        c.args(args).arg("-c").arg(cfg);
        for (k, v) in overrides {
            c.arg("-o").arg(format!("{k}={v}"));
        }
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("PGSSLROOTCERT", &self.root_crt)
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c
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

/// An agent's identity and secret, from its agent.cfg.
pub fn agent_config(cfg: &Path) -> pemworker::config::AgentConfig {
    pemworker::config::AgentConfig::load_with_document(cfg)
        .unwrap_or_else(|e| panic!("{}: {e}", cfg.display()))
        .1
}

impl TestBed {
    /// A session through pgBouncer with the agent's own certificate, as its worker opens it.
    pub async fn agent_session(&self, cfg: &Path) -> Client {
        let id = agent_config(cfg);
        let mut s = pemworker::registration::agent_settings(&id).unwrap();
        s.root_cert = Some(self.root_crt.clone());
        self.connect(&s).await
    }

    /// One value from the server as the superuser.
    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        let su = self.connect(&self.superuser()).await;
        pool::query_one(&su, sql, sql, &[])
            .await
            .and_then(|r| pool::get::<i64>(&r, 0, sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Binds the bed's pgBouncer to an agent through the statistics console user (whose
    /// password goes into the agent host's ~/.pgpass, and which is recorded as registered from
    /// the agent host beside its agent.cfg `cfg`, see pemworker::targets), with 1-second
    /// heartbeats and 1-second OS and pgBouncer probes.
    pub async fn bind_pgbouncer_fast(&self, cfg: &Path, agent_id: i32) {
        let su = self.connect(&self.superuser()).await;
        let port = i32::from(self.pgb_port);
        pool::execute(
            &su,
            "binding pgBouncer",
            "WITH a AS (UPDATE pem.agent SET heartbeat_interval = 1 WHERE id = $1), \
                  g AS (INSERT INTO pem.agent_pgbouncer_binding (agent_id, host, port, username, sslmode) \
                        VALUES ($1, '127.0.0.1', $2, $3, 'verify-full') ON CONFLICT DO NOTHING) \
             INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
             SELECT $1, NULL, p.id, 1, true FROM pem.probe p WHERE p.target_type IN ('agent', 'pgbouncer') \
             ON CONFLICT DO NOTHING",
            &[
                (&agent_id, Type::INT4),
                (&port, Type::INT4),
                (&STATS_USER, Type::TEXT),
            ],
        )
        .await
        .unwrap();
        let pgpass = self.home.join(".pgpass");
        let line = format!(
            "127.0.0.1:{}:pgbouncer:{STATS_USER}:{}\n",
            self.pgb_port,
            pemworker::secret::pgpass_escape(STATS_PASSWORD)
        );
        let mut text = std::fs::read_to_string(&pgpass).unwrap_or_default();
        if !text.contains(&line) {
            text.push_str(&line);
            std::fs::write(&pgpass, text).unwrap();
            std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        self.record_target(
            cfg,
            pemworker::targets::Kind::Pgbouncer,
            self.pgb_port,
            "pgbouncer",
            STATS_USER,
        );
    }

    /// Records a monitored server or pgBouncer console on the bed's host as registered from
    /// it (as `--register-server` would), beside the agent's `cfg`, verified with the bed's
    /// root certificate.
    pub fn record_target(
        &self,
        cfg: &Path,
        kind: pemworker::targets::Kind,
        port: u16,
        database: &str,
        user: &str,
    ) {
        let file = pemworker::targets::file_for(cfg);
        pemworker::targets::Registry::load(&file)
            .unwrap()
            .with(pemworker::targets::Target {
                kind,
                host: "127.0.0.1".into(),
                port,
                database: database.into(),
                user: user.into(),
                sslmode: "verify-full".into(),
                root_cert: Some(self.root_crt.clone()),
                efm: None,
            })
            .stage(&file)
            .unwrap()
            .commit()
            .unwrap();
    }

    /// The legitimate flow every attack test checks on the same bed: create-proxy-user through
    /// pgBouncer as the admin, a registration through pgBouncer as that user, whose worker
    /// heartbeats and delivers OS samples and pgBouncer probes (through the statistics user),
    /// and a registration with a dedicated agent<ID> role that --unregister-agent drops again.
    pub async fn legitimate_flow(&self, tag: &str) {
        let user = format!("pem_agent_{tag}");
        let args = [
            "pooler",
            "create-proxy-user",
            "--pem-server",
            "127.0.0.1",
            "--pem-port",
            &self.pgb_port.to_string(),
            "--pem-user",
            ADMIN_USER,
            &user,
        ];
        let out = self.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]);
        check("create-proxy-user", out);

        let mut reg = self.register_args(&format!("{tag}-pooled"));
        let at = reg.iter().position(|a| a == "--pem-agent-user").unwrap() + 1;
        reg[at] = user.clone();
        let reg: Vec<&str> = reg.iter().map(String::as_str).collect();
        check(
            "register",
            self.pemworker_env(&reg, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]),
        );
        let cfg = self.home.join(format!("{tag}-pooled/etc/agent.cfg"));
        let id = agent_config(&cfg).agent_id;
        self.bind_pgbouncer_fast(&cfg, id).await;
        let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
        let mut worker = self.start_worker(
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
        let su = self.connect(&self.superuser()).await;
        let stored = async |sql: &str| -> i64 {
            pool::query_one(&su, sql, sql, &[(&id, Type::INT4)])
                .await
                .and_then(|r| pool::get::<i64>(&r, 0, sql))
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let cpu = stored("SELECT count(*) FROM pemhistory.cpu_usage WHERE agent_id = $1").await;
            let pools =
                stored("SELECT count(*) FROM pemhistory.pgbouncer_pools WHERE agent_id = $1").await;
            let beats =
                stored("SELECT count(*) FROM pem.agent_heartbeat WHERE agent_id = $1").await;
            if cpu > 0 && pools > 0 && beats > 0 {
                break;
            }
            if Instant::now() > deadline {
                let _ = worker.kill();
                panic!(
                    "legitimate flow ({tag}): agent {id} stored cpu {cpu}, pgbouncer_pools {pools}, heartbeats {beats}; log: {}",
                    std::fs::read_to_string(site.join("worker.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = worker.wait();

        let (dedicated_cfg, dedicated_id) = {
            let mut reg = self.register_args(&format!("{tag}-dedicated"));
            let at = reg.iter().position(|a| a == "--pem-agent-user").unwrap();
            reg.drain(at..at + 2);
            let reg: Vec<&str> = reg.iter().map(String::as_str).collect();
            check(
                "register with a dedicated role",
                self.pemworker_env(&reg, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]),
            );
            let cfg = self.home.join(format!("{tag}-dedicated/etc/agent.cfg"));
            let id = agent_config(&cfg).agent_id;
            (cfg, id)
        };
        let role = format!("agent{dedicated_id}");
        assert!(self.role_names().await.contains(&role));
        // The dedicated role logs in through pgBouncer with its certificate.
        let agent = self.agent_session(&dedicated_cfg).await;
        let who = pool::query_one(&agent, "who", "SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(pool::get::<String>(&who, 0, "who").unwrap(), role);
        let out = self.pemworker_env(
            &[
                "--unregister-agent",
                "--pem-user",
                ADMIN_USER,
                "--config-dir",
                &dedicated_cfg.parent().unwrap().display().to_string(),
            ],
            &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)],
        );
        check("unregister", out);
        assert!(
            !self.role_names().await.contains(&role),
            "--unregister-agent dropped {role}"
        );
    }
}

impl TestBed {
    /// Runs the auth query exactly as pgBouncer does: as its auth user, over the server's Unix
    /// socket, as the OS user pgBouncer runs as (peer authentication, no password).
    pub fn auth_query(&self, name: &str) -> Vec<String> {
        use std::io::Write;
        let mut child = self
            .server_command(&self.bin_dir.join("psql"))
            .arg(format!(
                "host={} port={} dbname=pem user={AUTH_USER}",
                self.pg_socket_dir.display(),
                self.pg_port
            ))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v"])
            .arg(format!("name={name}"))
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(
                b"SELECT usename || ' ' || coalesce(passwd, '<none>') FROM pem.get_agent_pool_auth(:'name');\n",
            )
            .unwrap();
        let (code, out, err) = outcome(&child.wait_with_output().unwrap());
        assert_eq!(code, 0, "auth query for {name}: {err}");
        out.lines().map(str::to_string).collect()
    }
}

impl TestBed {
    /// What a second `prepare-server` run could change: roles, their secrets and settings,
    /// grants, the schema version, how pgBouncer logs in, pg_hba.conf, pg_ident.conf and
    /// their backups.
    pub async fn server_state(&self) -> (Vec<String>, String, Vec<String>) {
        let su = self.connect(&self.superuser()).await;
        let rows = pool::query(
            &su,
            "state",
            "SELECT format('%s %s %s %s', rolname, rolcanlogin, rolcreaterole, rolpassword) FROM pg_authid \
             UNION ALL SELECT format('member %s of %s', member::regrole, roleid::regrole) FROM pg_auth_members \
             UNION ALL SELECT format('setting %s %s %s', setrole, setdatabase, setconfig) FROM pg_db_role_setting \
             UNION ALL SELECT format('db acl %s', datacl) FROM pg_database WHERE datname = 'pem' \
             UNION ALL SELECT format('schema acl %s', nspacl) FROM pg_namespace WHERE nspname = 'pem' \
             UNION ALL SELECT format('proc acl %s', proacl) FROM pg_proc WHERE oid = 'pem.get_agent_pool_auth(text)'::regprocedure \
             UNION ALL SELECT format('schema version %s', version) FROM pem.schema_version \
             UNION ALL SELECT format('pooler %s', c) FROM pem.pooler_config c \
             UNION ALL SELECT format('agent role %s', r) FROM pem.agent_role r \
             UNION ALL SELECT format('ident %s', pg_read_file(current_setting('ident_file'))) \
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
        let hba = std::fs::read_to_string(self.data_dir.join("pg_hba.conf")).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(&self.data_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("pg_hba.conf") || n.starts_with("pg_ident.conf"))
            .collect();
        files.sort();
        (rows.iter().map(|r| r.get(0)).collect(), hba, files)
    }
}

impl TestBed {
    /// The auth query as a pgBouncer on another host runs it: over TCP with TLS, as the auth
    /// user with its password. Returns the secret handed out for `name`.
    pub async fn auth_query_over_tcp(&self, name: &str) -> String {
        let auth = self.connect(&self.direct(AUTH_USER, AUTH_PASSWORD)).await;
        let row = pool::query_one(
            &auth,
            "auth query",
            "SELECT passwd FROM pem.get_agent_pool_auth($1)",
            &[(&name, Type::TEXT)],
        )
        .await
        .unwrap();
        pool::get::<Option<String>>(&row, 0, "auth query")
            .unwrap()
            .unwrap_or_default()
    }
}

impl TestBed {
    /// As the PEM admin (its password in its own environment), makes an enrolment token with
    /// `extra` options and writes it to `<home>/<name>.token` (0600); returns the token's id and
    /// file.
    pub fn make_token(&self, name: &str, extra: &[&str]) -> (i32, PathBuf) {
        let file = self.home.join(format!("{name}.token"));
        let port = self.pgb_port.to_string();
        let mut args = vec![
            "pooler",
            "enrolment-token",
            "create",
            "--pem-server",
            "127.0.0.1",
            "--pem-port",
            &port,
            "--pem-user",
            ADMIN_USER,
        ];
        args.extend_from_slice(extra);
        let out_file = file.display().to_string();
        args.extend(["--output", &out_file]);
        let out = check(
            "enrolment-token create",
            self.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text
            .strip_prefix("enrolment token ")
            .and_then(|t| t.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no token id in {text}"));
        (id, file)
    }

    /// `--register-agent` through pgBouncer with an enrolment token, files under
    /// `<home>/<name>`, and `extra` flags.
    pub fn enrol_args(&self, name: &str, token: &Path, extra: &[&str]) -> Vec<String> {
        let site = self.home.join(name);
        let mut a: Vec<String> = [
            "--register-agent".to_string(),
            "--pem-server".into(),
            "127.0.0.1".into(),
            "--pem-port".into(),
            self.pgb_port.to_string(),
            "--enrolment-token-file".into(),
            token.display().to_string(),
            "--display-name".into(),
            name.into(),
            "--cert-path".into(),
            site.join(".pem").display().to_string(),
            "--config-dir".into(),
            site.join("etc").display().to_string(),
        ]
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Runs this program as an agent host does: no password of any kind in its environment.
    pub fn on_agent_host(&self, args: &[String]) -> Output {
        self.agent_host_command()
            .args(args)
            .output()
            .expect("run pemworker")
    }

    /// Enrols an agent with a fresh single-use token for `extra` token options; returns its
    /// agent.cfg and id.
    pub fn enrol_agent(
        &self,
        name: &str,
        token_options: &[&str],
        extra: &[&str],
    ) -> (PathBuf, i32) {
        let (_, token) = self.make_token(name, token_options);
        check(
            "enrolment",
            self.on_agent_host(&self.enrol_args(name, &token, extra)),
        );
        let cfg = self.home.join(name).join("etc/agent.cfg");
        let id = agent_config(&cfg).agent_id;
        (cfg, id)
    }
}

/// Records every heartbeat with the clock time it was written (pem.agent_heartbeat keeps only
/// the last one).
pub async fn log_heartbeats(su: &Client) {
    pool::batch(
        su,
        "heartbeat log",
        "CREATE TABLE public.heartbeat_log (agent_id int, at timestamptz); \
         CREATE FUNCTION public.log_heartbeat() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
           SET search_path = pg_catalog, pg_temp AS $$ BEGIN \
             INSERT INTO public.heartbeat_log VALUES (NEW.agent_id, clock_timestamp()); RETURN NULL; END $$; \
         CREATE TRIGGER log_heartbeat AFTER INSERT OR UPDATE ON pem.agent_heartbeat \
           FOR EACH ROW EXECUTE FUNCTION public.log_heartbeat();",
    )
    .await
    .unwrap();
}

/// The agent's last heartbeat on the server, in seconds since the epoch (0 before the first).
pub async fn last_heartbeat(su: &Client, agent: i32) -> f64 {
    pool::query_opt(
        su,
        "heartbeat",
        "SELECT extract(epoch FROM last_heartbeat)::float8 FROM pem.agent_heartbeat WHERE agent_id = $1",
        &[(&agent, Type::INT4)],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
    .unwrap_or(0.0)
}

/// Delivery key -> probe of every sample row stored for `agent`; a key stored twice fails.
pub async fn stored_keys(su: &Client, agent: i32) -> std::collections::BTreeMap<String, String> {
    let mut keys = std::collections::BTreeMap::new();
    for p in pemworker::probes::PROBES {
        let rows = pool::query(
            su,
            "keys",
            &format!(
                "SELECT delivery_key::text FROM pemhistory.{} WHERE agent_id = $1",
                p.name
            ),
            &[(&agent, Type::INT4)],
        )
        .await
        .unwrap();
        for r in rows {
            let key: String = r.get(0);
            assert!(
                keys.insert(key.clone(), p.name.to_string()).is_none(),
                "delivery key {key} stored twice"
            );
        }
    }
    keys
}

/// Delivery key -> probe of every row the worker kept in its spool, from the test hooks'
/// journal (`PEMWORKER_TEST_HOOKS=journal=FILE`).
pub fn journal_keys(journal: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(journal)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            (f.next()? == "kept").then_some(())?;
            let (_seq, probe, key) = (f.next()?, f.next()?, f.next()?);
            Some((key.to_string(), probe.to_string()))
        })
        .collect()
}
