//! A private PostgreSQL 15 (TLS on, a fresh CA in its data directory, the reference PEM schema)
//! and a private pgBouncer in front of it, both configured by running this program's own
//! `pooler prepare-server` and `pooler configure` commands. Used by `pemworker sandbox` and by
//! the integration tests.
//!
//! Everything lives in one fresh directory with its own ports; the servers run as the
//! `postgres` OS user when started as root; every wait is bounded; dropping the value stops the
//! servers and removes the directory (unless [`Servers::keep`] was called).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::certs::{self, Authority};
use crate::connection::{ConnectSettings, SslMode};
use crate::secret::Secret;

/// The auth and admin users `prepare-server` creates, under the guide's names.
pub const AUTH_USER: &str = "pgbouncer";
pub const ADMIN_USER: &str = "pem_admin1";
/// pgBouncer's statistics console user (`configure`'s default), whose password agent hosts keep
/// for their pgBouncer probes instead of the admin's.
pub const STATS_USER: &str = "pgbouncer_stats";

const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} not found; install it with `{hint}` (or run scripts/install-deps)")]
    Missing {
        what: &'static str,
        hint: &'static str,
    },
    #[error("{what} failed ({status}): {detail}")]
    Step {
        what: String,
        status: String,
        detail: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Certs(#[from] certs::Error),
    #[error("{0}")]
    Timeout(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The passwords of the users the servers are set up with. The auth user's is offered to the
/// commands but not used: pgBouncer logs in to PostgreSQL by peer.
#[derive(Debug, Clone)]
pub struct Passwords {
    pub superuser: Secret,
    pub auth: Secret,
    pub admin: Secret,
    pub stats: Secret,
}

impl Passwords {
    /// Fresh random passwords.
    pub fn random() -> Passwords {
        let r = || {
            Secret::new(format!(
                "{:016x}{:016x}",
                fastrand::u64(..),
                fastrand::u64(..)
            ))
        };
        Passwords {
            superuser: r(),
            auth: r(),
            admin: r(),
            stats: r(),
        }
    }
}

/// How to start the servers.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `pemworker` executable whose pooler commands configure the servers.
    pub exe: PathBuf,
    pub passwords: Passwords,
    /// pgBouncer's port; a free one when `None` or taken.
    pub pgbouncer_port: Option<u16>,
    /// Sizes for a fleet of agents (`pemworker fleet`); the defaults suit a handful.
    pub sizes: Sizes,
}

/// PostgreSQL's and pgBouncer's limits.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub max_connections: u32,
    /// `pooler configure --pool-size`; `None`: its default.
    pub pool_size: Option<u32>,
    /// `pooler configure --max-client-conn`; `None`: its default.
    pub max_client_conn: Option<u32>,
}

impl Default for Sizes {
    fn default() -> Sizes {
        Sizes {
            max_connections: 200,
            pool_size: None,
            max_client_conn: None,
        }
    }
}

pub struct Servers {
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub pg_socket_dir: PathBuf,
    pub pgb_dir: PathBuf,
    pub pgb_run_dir: PathBuf,
    /// HOME for the processes started here (agents' ~/.pem and ~/.pgpass).
    pub home: PathBuf,
    pub pg_port: u16,
    pub pgb_port: u16,
    pub ca: Authority,
    pub root_crt: PathBuf,
    pub bin_dir: PathBuf,
    pub pgbouncer_bin: PathBuf,
    pub exe: PathBuf,
    pub passwords: Passwords,
    pub sizes: Sizes,
    /// The OS user the servers run as: `postgres` when started as root.
    pub run_as: Option<String>,
    pgbouncer: Option<Child>,
    postgres_started: bool,
    keep: bool,
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn free_port() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free local port"))
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn pg_bin_dir() -> Result<PathBuf, Error> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    from_pg_config
        .into_iter()
        .chain([PathBuf::from("/usr/lib/postgresql/15/bin")])
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
        .ok_or(Error::Missing {
            what: "PostgreSQL server binaries (initdb, pg_ctl)",
            hint: "apt-get install postgresql-15 postgresql-plpython3-15 python3-cryptography",
        })
}

fn find_pgbouncer() -> Result<PathBuf, Error> {
    ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join("pgbouncer"))
        .find(|p| p.is_file())
        .ok_or(Error::Missing {
            what: "pgbouncer",
            hint: "apt-get install pgbouncer",
        })
}

fn check(what: &str, out: Output) -> Result<Output, Error> {
    if out.status.success() {
        return Ok(out);
    }
    let detail = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Err(Error::Step {
        what: what.to_string(),
        status: out.status.to_string(),
        detail: detail.trim().to_string(),
    })
}

impl Servers {
    /// Starts PostgreSQL, prepares it with `prepare-server --install-schema --pg-hba`, writes
    /// pgBouncer's files with `configure`, and starts pgBouncer.
    pub fn start(opts: &Options) -> Result<Servers, Error> {
        let mut s = Servers::start_postgres_only(opts)?;
        s.prepare_and_start_pgbouncer()?;
        Ok(s)
    }

    /// `prepare-server`, `configure` and pgBouncer, on a PostgreSQL started with
    /// [`Servers::start_postgres_only`] (an upgrade test prepares the server its own way first).
    pub fn prepare_and_start_pgbouncer(&mut self) -> Result<(), Error> {
        self.run_pemworker("pemworker pooler prepare-server", &self.prepare_args())?;
        self.run_pemworker("pemworker pooler configure", &self.configure_args())?;
        self.start_pgbouncer()
    }

    /// PostgreSQL with TLS and the CA in its data directory, and nothing else: no database, no
    /// schema, no pgBouncer.
    pub fn start_postgres_only(opts: &Options) -> Result<Servers, Error> {
        let bin_dir = pg_bin_dir()?;
        let pgbouncer_bin = find_pgbouncer()?;
        let run_as = is_root().then(|| "postgres".to_string());
        let root = tempfile::Builder::new()
            .prefix("pemworker-sandbox-")
            .tempdir_in("/tmp")
            .map_err(io("creating a directory in /tmp"))?
            .keep();
        let pgb_port = match opts.pgbouncer_port {
            Some(p) if port_is_free(p) => p,
            _ => free_port()?,
        };
        let mut s = Servers {
            data_dir: root.join("data"),
            pg_socket_dir: root.join("pg"),
            pgb_dir: root.join("pgbouncer"),
            pgb_run_dir: root.join("pgb-run"),
            home: root.join("home"),
            root_crt: root.join("data/root.crt"),
            root,
            pg_port: free_port()?,
            pgb_port,
            ca: Authority::generate("pemworker sandbox CA")?,
            bin_dir,
            pgbouncer_bin,
            exe: opts.exe.clone(),
            passwords: opts.passwords.clone(),
            sizes: opts.sizes.clone(),
            run_as,
            pgbouncer: None,
            postgres_started: false,
            keep: false,
        };
        s.init_postgres()?;
        Ok(s)
    }

    /// Leaves the servers running and the directory in place when this value is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    pub fn pgbouncer_pid(&self) -> Option<u32> {
        self.pgbouncer.as_ref().map(Child::id)
    }

    fn server_owned_dir(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("setting the mode of {}", dir.display())))?;
        self.give_to_server_user(dir)
    }

    fn give_to_server_user(&self, path: &Path) -> Result<(), Error> {
        if let Some(u) = &self.run_as {
            let user = nix::unistd::User::from_name(u)
                .ok()
                .flatten()
                .ok_or(Error::Missing {
                    what: "the postgres OS user",
                    hint: "apt-get install postgresql-15",
                })?;
            nix::unistd::chown(path, Some(user.uid), Some(user.gid))
                .map_err(|e| io(format!("giving {} to {u}", path.display()))(e.into()))?;
        }
        Ok(())
    }

    /// A command run as the server user.
    pub fn server_command(&self, program: &Path) -> Command {
        match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn write_server_file(&self, path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
        std::fs::write(path, contents).map_err(io(format!("writing {}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("setting the mode of {}", path.display())))?;
        self.give_to_server_user(path)
    }

    fn init_postgres(&mut self) -> Result<(), Error> {
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o755))
            .map_err(io("setting the mode of the sandbox directory"))?;
        std::fs::create_dir_all(&self.home).map_err(io("creating the sandbox home"))?;
        std::fs::set_permissions(&self.home, std::fs::Permissions::from_mode(0o700))
            .map_err(io("setting the mode of the sandbox home"))?;
        for d in [&self.data_dir, &self.pg_socket_dir, &self.pgb_run_dir] {
            self.server_owned_dir(d)?;
        }
        let pwfile = self.root.join("pwfile");
        self.write_server_file(&pwfile, self.passwords.superuser.expose(), 0o600)?;
        let out = self
            .server_command(&self.bin_dir.join("initdb"))
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres", "-E", "UTF8", "--no-sync"])
            .args(["--auth-local=scram-sha-256", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .map_err(io("running initdb"))?;
        let _ = std::fs::remove_file(&pwfile);
        check("initdb", out)?;

        // The CA where PEM keeps it (the data directory), and the server's TLS files.
        let (server_crt, server_key) = self.ca.issue_server(&["localhost", "127.0.0.1"])?;
        let files = [
            ("ca_certificate.crt", self.ca.cert_pem.as_str(), 0o644),
            ("ca_key.key", self.ca.key_pem.as_str(), 0o600),
            ("root.crt", self.ca.cert_pem.as_str(), 0o644),
            ("server.crt", server_crt.as_str(), 0o644),
            ("server.key", server_key.as_str(), 0o600),
        ];
        for (name, contents, mode) in files {
            self.write_server_file(&self.data_dir.join(name), contents, mode)?;
        }
        let conf = format!(
            "\n# pemworker sandbox\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = {}\n\
             shared_buffers = 32MB\n",
            self.pg_port,
            self.pg_socket_dir.display(),
            self.sizes.max_connections
        );
        let conf_path = self.data_dir.join("postgresql.conf");
        let mut text =
            std::fs::read_to_string(&conf_path).map_err(io("reading postgresql.conf"))?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text).map_err(io("writing postgresql.conf"))?;
        self.postgres_started = true;
        self.start_postgres()
    }

    pub fn start_postgres(&self) -> Result<(), Error> {
        let out = self
            .server_command(&self.bin_dir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t", "30", "-l"])
            .arg(self.pgb_run_dir.join("postgresql.log"))
            .arg("start")
            .stdout(Stdio::null())
            .output()
            .map_err(io("running pg_ctl start"))?;
        check("pg_ctl start", out).map(drop)
    }

    /// Stops PostgreSQL (fast shutdown) and returns once it is down.
    pub fn stop_postgres(&self) -> Result<(), Error> {
        let out = self
            .server_command(&self.bin_dir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .output()
            .map_err(io("running pg_ctl stop"))?;
        check("pg_ctl stop", out).map(drop)
    }

    /// This program with a private HOME, the servers' passwords in the environment (never on
    /// the command line) and the servers' root certificate (sslmode is verify-full by default).
    pub fn pemworker_command(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("PEM_SERVER_PASSWORD", self.passwords.superuser.expose())
            .env("PEMWORKER_AUTH_USER_PASSWORD", self.passwords.auth.expose())
            .env(
                "PEMWORKER_ADMIN_USER_PASSWORD",
                self.passwords.admin.expose(),
            )
            .env(
                "PEMWORKER_STATS_USER_PASSWORD",
                self.passwords.stats.expose(),
            )
            .env("PGSSLROOTCERT", &self.root_crt)
            .stdin(Stdio::null());
        c
    }

    /// This program as it runs on an agent host: a private HOME and the servers' root
    /// certificate to verify them (sslmode is verify-full by default), and no password of any
    /// kind in its environment.
    pub fn agent_host_command(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("PGSSLROOTCERT", &self.root_crt)
            .stdin(Stdio::null());
        c
    }

    /// Runs this program (see [`Servers::pemworker_command`]); a failure is an error with its
    /// output.
    pub fn run_pemworker(&self, what: &str, args: &[String]) -> Result<Output, Error> {
        let out = self
            .pemworker_command()
            .args(args)
            .output()
            .map_err(io(format!("running {}", self.exe.display())))?;
        check(what, out)
    }

    pub fn superuser_args(&self) -> Vec<String> {
        [
            "--pem-server",
            "127.0.0.1",
            "--pem-port",
            &self.pg_port.to_string(),
            "--pem-user",
            "postgres",
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn prepare_args(&self) -> Vec<String> {
        let mut a = vec!["pooler".to_string(), "prepare-server".into()];
        a.extend(self.superuser_args());
        a.extend(["--install-schema".into(), "--pg-hba".into()]);
        a.push(self.data_dir.join("pg_hba.conf").display().to_string());
        a.extend(["--pgbouncer-os-user".into(), self.os_user()]);
        a
    }

    /// The operating-system user both servers run as.
    pub fn os_user(&self) -> String {
        self.run_as
            .clone()
            .unwrap_or_else(|| crate::fsutil::Owner::current().name)
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
            ("--stats-user", STATS_USER.into()),
            ("--agent-network", "127.0.0.0/8".into()),
            ("--admin-network", "127.0.0.0/8".into()),
            // Back within seconds after a PostgreSQL restart, not pgBouncer's default 15.
            ("--server-login-retry", "2".into()),
        ];
        for (k, v) in pairs {
            a.push(k.into());
            a.push(v);
        }
        for (k, v) in [
            ("--pool-size", self.sizes.pool_size),
            ("--max-client-conn", self.sizes.max_client_conn),
        ] {
            if let Some(v) = v {
                a.extend([k.to_string(), v.to_string()]);
            }
        }
        a
    }

    pub fn pgbouncer_ini(&self) -> PathBuf {
        self.pgb_dir.join("pgbouncer.ini")
    }

    /// Starts pgBouncer as a child process and waits until it listens.
    pub fn start_pgbouncer(&mut self) -> Result<(), Error> {
        let log_path = self.root.join("pgbouncer.stderr");
        let log =
            std::fs::File::create(&log_path).map_err(io("creating pgBouncer's output file"))?;
        let err = log
            .try_clone()
            .map_err(io("creating pgBouncer's output file"))?;
        // Not through runuser, whose PAM session sets the login default of 1024 open files:
        // that caps pgBouncer near a thousand clients whatever max_client_conn says.
        // setpriv changes the user and keeps this process's limits.
        let mut command = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", u, "--regid", u, "--init-groups", "--"])
                    .arg(&self.pgbouncer_bin);
                c
            }
            None => Command::new(&self.pgbouncer_bin),
        };
        let child = command
            .arg(self.pgbouncer_ini())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io("starting pgbouncer"))?;
        self.pgbouncer = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.pgb_port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .pgbouncer
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.pgbouncer = None;
                return Err(Error::Step {
                    what: "pgbouncer with the generated configuration".into(),
                    status: status.to_string(),
                    detail: format!(
                        "{} {}",
                        std::fs::read_to_string(&log_path)
                            .unwrap_or_default()
                            .trim(),
                        std::fs::read_to_string(self.pgb_run_dir.join("pgbouncer.log"))
                            .unwrap_or_default()
                            .trim()
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "pgbouncer did not listen within {} s",
                    WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops pgBouncer (SIGTERM: immediate shutdown), waiting at most 30 s.
    pub fn stop_pgbouncer(&mut self) {
        if let Some(mut child) = self.pgbouncer.take() {
            // setpriv runs pgBouncer in its own place: the signal reaches it.
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

    /// A direct session with PostgreSQL as the superuser, in the pem database.
    pub fn superuser(&self) -> ConnectSettings {
        self.direct("postgres", self.passwords.superuser.clone())
    }

    /// A direct TCP session with PostgreSQL, verified TLS.
    pub fn direct(&self, user: &str, password: Secret) -> ConnectSettings {
        let mut s = self.tls_settings(self.pg_port, user);
        s.password = Some(password);
        s
    }

    /// A session through pgBouncer as the PEM admin (md5 over verified TLS).
    pub fn admin_via_pooler(&self) -> ConnectSettings {
        let mut s = self.tls_settings(self.pgb_port, ADMIN_USER);
        s.password = Some(self.passwords.admin.clone());
        s
    }

    /// The enrolment login through pgBouncer, as an agent host enrols with a token (it has no
    /// password; the token is the credential).
    pub fn enrolment_via_pooler(&self) -> ConnectSettings {
        self.tls_settings(self.pgb_port, crate::pooler::hba::ENROLMENT_USER)
    }

    /// pgBouncer's admin console as the PEM admin.
    pub fn console(&self) -> ConnectSettings {
        let mut s = self.admin_via_pooler();
        s.dbname = "pgbouncer".into();
        s
    }

    /// pgBouncer's console as the statistics user, as agents' probes log in.
    pub fn stats_console(&self) -> ConnectSettings {
        let mut s = self.tls_settings(self.pgb_port, STATS_USER);
        s.dbname = "pgbouncer".into();
        s.password = Some(self.passwords.stats.clone());
        s
    }

    /// A session through pgBouncer as an agent user, authenticated by its certificate.
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
            application_name: "pemworker-sandbox".into(),
        }
    }

    /// How to stop servers left running with [`Servers::keep`].
    pub fn stop_instructions(&self) -> String {
        let pg_ctl = format!(
            "{} -D {} stop",
            self.bin_dir.join("pg_ctl").display(),
            self.data_dir.display()
        );
        let pg_ctl = match &self.run_as {
            Some(u) => format!("runuser -u {u} -- {pg_ctl}"),
            None => pg_ctl,
        };
        format!(
            "kill $(cat {}); {pg_ctl}; rm -rf {}",
            self.pgb_run_dir.join("pgbouncer.pid").display(),
            self.root.display()
        )
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
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
            eprintln!("sandbox directory kept in {}", self.root.display());
        }
    }
}
