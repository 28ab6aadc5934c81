//! Monitored servers, pgBouncer bindings and probe settings: `--register-server`,
//! `--unregister-server`, `pooler bind` and `pooler unbind`, `--enable-probe` and
//! `--disable-probe`, through the pooler like everything else, each in one server transaction.
//!
//! Where the monitored server's (or pgBouncer console's) password lives: never on the PEM
//! server (no table has a password column, and nothing here sends it there). The agent needs
//! it to log in, so it is kept only on the agent host, in the agent user's libpq password file
//! (`~/.pgpass` or `PGPASSFILE`, mode 0600, which libpq ignores if others can read it), where
//! the worker looks for it. Where peer or certificate authentication serves, no password is
//! stored at all. TLS towards them comes from their own settings (`--asb-ssl-*`,
//! `--pgbouncer-ssl-*`), never from the PEM server's libpq variables.

use std::path::{Path, PathBuf};

use tokio_postgres::types::Type;

use crate::config::AgentConfig;
use crate::connection::{self, ConnectSettings, SslMode, pool};
use crate::error::ExitCode;
use crate::fsutil::{self, Staged};
use crate::registration::{self, check_rights};
use crate::secret::Secret;
use crate::targets::{self, Kind, Registry};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Registration(#[from] registration::Error),
    #[error(transparent)]
    Connection(#[from] connection::Error),
    #[error(transparent)]
    Files(#[from] fsutil::Error),
    #[error(transparent)]
    Targets(#[from] targets::Error),
    #[error("cannot connect to the monitored server {target} as {user}: {cause}")]
    Monitored {
        target: String,
        user: String,
        cause: String,
    },
    #[error(
        "user {user} on the monitored server {target} is not a member of pg_monitor; run GRANT pg_monitor TO {user} there"
    )]
    NoMonitorRole { user: String, target: String },
    #[error(
        "server {target} is already registered (server id {id}); rerun with --force-registration to update it"
    )]
    AlreadyRegistered { target: String, id: i32 },
    #[error("no monitored server {target} is bound to agent {agent_id}")]
    NotBound { target: String, agent_id: i32 },
    #[error("unknown probe {0}; known probes: {1}")]
    UnknownProbe(String, String),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Registration(e) => e.exit_code(),
            Error::Connection(e) => crate::error::connection_exit_code(e),
            Error::Files(e) => crate::error::files_exit_code(e),
            Error::Targets(targets::Error::Files(e)) => crate::error::files_exit_code(e),
            Error::Targets(targets::Error::Corrupt { .. }) => ExitCode::Config,
            Error::Monitored { .. } => ExitCode::Connect,
            Error::NoMonitorRole { .. } => ExitCode::Server,
            Error::AlreadyRegistered { .. }
            | Error::NotBound { .. }
            | Error::UnknownProbe(..)
            | Error::Usage(_) => ExitCode::Config,
        }
    }
}

/// How the agent reaches the monitored server (PEM's "asb" values).
#[derive(Debug, Clone)]
pub struct Binding {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub sslmode: SslMode,
    /// `--asb-ssl-root-cert`: the only root certificate the server's may chain to.
    pub root_cert: Option<PathBuf>,
}

/// Everything `--register-server` needs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub admin: ConnectSettings,
    pub agent: AgentConfig,
    pub server_addr: String,
    pub server_port: u16,
    pub server_database: String,
    pub server_user: String,
    pub service_name: Option<String>,
    pub binding: Binding,
    pub display_name: String,
    pub group: Option<String>,
    pub team: Option<String>,
    pub owner: Option<String>,
    pub remote_monitoring: bool,
    pub force: bool,
    /// From PEM_MONITORED_SERVER_PASSWORD or a prompt; `None` when ~/.pgpass, peer or
    /// certificate authentication serves.
    pub password: Option<Secret>,
    /// The agent user's libpq password file.
    pub pgpass: PathBuf,
    /// The record of targets registered from this host ([`crate::targets`]).
    pub targets_file: PathBuf,
    /// PEM's EFM flags, kept in that record.
    pub efm: Option<crate::targets::Efm>,
}

/// What `--register-server` did.
#[derive(Debug, Clone)]
pub struct Registered {
    pub server_id: i32,
    pub updated: bool,
    pub password_saved_in: Option<PathBuf>,
}

/// The monitored server as the agent will reach it (with `--asb-ssl-*` only, never the PEM
/// server's libpq variables).
fn binding_settings(o: &ServerOptions) -> Result<ConnectSettings, Error> {
    let b = &o.binding;
    let mut s = ConnectSettings::monitored(
        &b.host,
        b.port,
        &b.user,
        &b.database,
        b.sslmode,
        b.root_cert.as_deref(),
    );
    s.password = o.password.clone();
    if s.password.is_none() {
        s.password = crate::secret::from_pgpass(&o.pgpass, &b.host, b.port, &b.database, &b.user);
    }
    Ok(s)
}

/// The start of a password-file line for `host:port:database:user:` (libpq's escapes).
fn pgpass_prefix(host: &str, port: u16, database: &str, user: &str) -> String {
    let esc = crate::secret::pgpass_escape;
    format!("{}:{port}:{}:{}:", esc(host), esc(database), esc(user))
}

/// `pgpass` without the line that starts with `prefix` (other lines stay as they were).
fn pgpass_without(existing: &str, prefix: &str) -> String {
    existing
        .lines()
        .filter(|l| !l.starts_with(prefix))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `pgpass` with the line for `prefix` set to `password`, replacing any line for exactly those
/// (other lines stay as they were).
fn pgpass_with(existing: &str, prefix: &str, password: &Secret) -> String {
    let mut out = pgpass_without(existing, prefix);
    out.push_str(&format!(
        "{prefix}{}\n",
        crate::secret::pgpass_escape(password.expose())
    ));
    out
}

/// The password file with `prefix` set to `password`, staged (0600) for the caller to commit.
fn stage_pgpass(file: &Path, prefix: &str, password: &Secret) -> Result<Staged, Error> {
    let existing = std::fs::read_to_string(file).unwrap_or_default();
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(fsutil::Error::io("create directory", dir))?;
    }
    Ok(Staged::write(
        file,
        pgpass_with(&existing, prefix, password).as_bytes(),
        0o600,
        None,
    )?)
}

/// Puts the agent host's part in place once the PEM server committed: the targets record, then
/// the password file if a password was given. Returns the password file then.
fn commit_local(
    target: Staged,
    pgpass: Option<Staged>,
    pgpass_file: &Path,
) -> Result<Option<PathBuf>, Error> {
    target.commit()?;
    match pgpass {
        Some(s) => {
            s.commit()?;
            Ok(Some(pgpass_file.to_path_buf()))
        }
        None => Ok(None),
    }
}

/// Checks the monitored server with the binding's settings, then records it and binds it to
/// the agent; saves a given password in the agent user's password file.
pub async fn register_server(o: &ServerOptions) -> Result<Registered, Error> {
    let settings = binding_settings(o)?;
    let target = settings.target();
    let monitored = connection::connect(&settings)
        .await
        .map_err(|e| Error::Monitored {
            target: target.clone(),
            user: settings.user.clone(),
            cause: match &e {
                connection::Error::Connect { source, .. } => connection::describe(source),
                other => other.to_string(),
            },
        })?;
    let can_monitor: bool = pool::query_value(
        &monitored,
        "checking pg_monitor",
        "SELECT pg_has_role('pg_monitor', 'MEMBER') OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
        &[],
    )
    .await?;
    if !can_monitor {
        return Err(Error::NoMonitorRole {
            user: settings.user.clone(),
            target,
        });
    }
    drop(monitored);

    // The password file is staged before the server is touched, so a failure leaves neither.
    let staged_pgpass = match &o.password {
        Some(p) => {
            let b = &o.binding;
            let prefix = pgpass_prefix(&b.host, b.port, "*", &b.user);
            Some(stage_pgpass(&o.pgpass, &prefix, p)?)
        }
        None => None,
    };

    // The record that lets the worker send this password here, and only here.
    let staged_target = Registry::load(&o.targets_file)?
        .with(targets::Target {
            kind: Kind::Server,
            host: o.binding.host.clone(),
            port: o.binding.port,
            database: o.binding.database.clone(),
            user: o.binding.user.clone(),
            sslmode: o.binding.sslmode.name().to_string(),
            root_cert: settings.root_cert.clone(),
            efm: o.efm.clone(),
        })
        .stage(&o.targets_file)?;

    let client = connection::connect(&o.admin).await?;
    check_rights(&client, &o.admin).await?;
    let (server_id, updated) = pool::transaction(
        &client,
        "the server registration",
        record_server(&client, o),
    )
    .await?;
    let password_saved_in = commit_local(staged_target, staged_pgpass, &o.pgpass)?;
    Ok(Registered {
        server_id,
        updated,
        password_saved_in,
    })
}

async fn record_server(
    client: &tokio_postgres::Client,
    o: &ServerOptions,
) -> Result<(i32, bool), Error> {
    let port = i32::from(o.server_port);
    let existing = pool::query_opt(
        client,
        "looking for the server",
        "SELECT id FROM pem.server WHERE server_addr = $1 AND port = $2 AND active FOR UPDATE",
        &[(&o.server_addr, Type::TEXT), (&port, Type::INT4)],
    )
    .await?
    .map(|r| pool::get::<i32>(&r, 0, "looking for the server"))
    .transpose()?;
    if let (Some(id), false) = (existing, o.force) {
        return Err(Error::AlreadyRegistered {
            target: format!("{}:{}", o.server_addr, o.server_port),
            id,
        });
    }
    let params: [pool::Param<'_>; 10] = [
        (&o.display_name, Type::TEXT),
        (&o.server_addr, Type::TEXT),
        (&port, Type::INT4),
        (&o.server_database, Type::TEXT),
        (&o.server_user, Type::TEXT),
        (&o.service_name, Type::TEXT),
        (&o.group, Type::TEXT),
        (&o.team, Type::TEXT),
        (&o.owner, Type::TEXT),
        (&existing, Type::INT4),
    ];
    let server_id: i32 = match existing {
        Some(_) => pool::query_value(
            client,
            "updating the server",
            "UPDATE pem.server SET display_name = $1, server_addr = $2, port = $3, database = $4, username = $5, \
                    service_name = $6, group_name = $7, team = $8, owner = $9 WHERE id = $10 RETURNING id",
            &params,
        )
    .await?,
        None => pool::query_value(
            client,
            "recording the server",
            "INSERT INTO pem.server (display_name, server_addr, port, database, username, service_name, group_name, team, owner) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            &params[..9],
        )
    .await?,
    };
    let b = &o.binding;
    let bport = i32::from(b.port);
    let sslmode = b.sslmode.name();
    pool::execute(
        client,
        "binding the server to the agent",
        "INSERT INTO pem.agent_server_binding (agent_id, server_id, host, port, database, username, sslmode, remote_monitoring) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (agent_id, server_id) DO UPDATE SET host = EXCLUDED.host, port = EXCLUDED.port, \
             database = EXCLUDED.database, username = EXCLUDED.username, sslmode = EXCLUDED.sslmode, \
             remote_monitoring = EXCLUDED.remote_monitoring",
        &[
            (&o.agent.agent_id, Type::INT4),
            (&server_id, Type::INT4),
            (&b.host, Type::TEXT),
            (&bport, Type::INT4),
            (&b.database, Type::TEXT),
            (&b.user, Type::TEXT),
            (&sslmode, Type::TEXT),
            (&o.remote_monitoring, Type::BOOL),
        ],
    )
    .await?;
    Ok((server_id, existing.is_some()))
}

/// Finds the server bound to `agent_id` that the agent reaches at `host:port`.
async fn bound_server(
    client: &tokio_postgres::Client,
    agent_id: i32,
    host: &str,
    port: u16,
) -> Result<i32, Error> {
    let port = i32::from(port);
    pool::query_opt(
        client,
        "looking for the bound server",
        "SELECT b.server_id FROM pem.agent_server_binding b JOIN pem.server s ON s.id = b.server_id \
          WHERE b.agent_id = $1 AND coalesce(b.host, s.server_addr) = $2 AND coalesce(b.port, s.port) = $3 AND s.active",
        &[(&agent_id, Type::INT4), (&host, Type::TEXT), (&port, Type::INT4)],
    )
    .await?
    .map(|r| pool::get(&r, 0, "looking for the bound server"))
    .transpose()?
    .ok_or_else(|| Error::NotBound {
        target: format!("{host}:{port}"),
        agent_id,
    })
}

/// Unbinds the server the agent reaches at `host:port`; the server is retired when no agent
/// monitors it any more. The running agent drops its probes at its next schedule read.
pub async fn unregister_server(
    admin: &ConnectSettings,
    agent_id: i32,
    host: &str,
    port: u16,
    targets_file: &Path,
) -> Result<i32, Error> {
    let staged = Registry::load(targets_file)?
        .without(Kind::Server, host, port)
        .stage(targets_file)?;
    let client = connection::connect(admin).await?;
    check_rights(&client, admin).await?;
    let work = async {
        let server_id = bound_server(&client, agent_id, host, port).await?;
        pool::execute(
            &client,
            "unbinding the server",
            "WITH s AS (DELETE FROM pem.probe_schedule WHERE agent_id = $1 AND server_id = $2) \
             DELETE FROM pem.agent_server_binding WHERE agent_id = $1 AND server_id = $2",
            &[(&agent_id, Type::INT4), (&server_id, Type::INT4)],
        )
        .await?;
        pool::execute(
            &client,
            "retiring the server",
            "UPDATE pem.server SET active = false \
              WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM pem.agent_server_binding WHERE server_id = $1)",
            &[(&server_id, Type::INT4)],
        )
        .await?;
        Ok::<_, Error>(server_id)
    };
    let id = pool::transaction(&client, "unregistering the server", work).await?;
    staged.commit()?;
    Ok(id)
}

/// Everything `pemworker pooler bind` needs.
#[derive(Debug, Clone)]
pub struct BouncerOptions {
    pub admin: ConnectSettings,
    pub agent: AgentConfig,
    /// pgBouncer's console as the agent will reach it (database pgbouncer, the statistics
    /// user, sslmode and root certificate of its own).
    pub console: ConnectSettings,
    pub force: bool,
    /// From PEMWORKER_STATS_USER_PASSWORD or a prompt; `None` when ~/.pgpass has it.
    pub password: Option<Secret>,
    pub pgpass: PathBuf,
    pub targets_file: PathBuf,
}

/// What `pemworker pooler bind` did.
#[derive(Debug, Clone)]
pub struct BouncerBound {
    pub version: String,
    pub updated: bool,
    pub password_saved_in: Option<PathBuf>,
}

/// Binds a pgBouncer to the agent so its pgBouncer probes (SHOW POOLS, SHOW STATS) run: checks
/// the console login as the agent will make it, keeps the console user's password only in the
/// agent user's password file, records the console as registered from this host, and binds it
/// on the PEM server; all or nothing.
pub async fn bind_pgbouncer(o: &BouncerOptions) -> Result<BouncerBound, Error> {
    let mut console = o.console.clone();
    if console.password.is_none() {
        console.password = o.password.clone();
    }
    let target = console.target();
    let client = connection::connect(&console)
        .await
        .map_err(|e| Error::Monitored {
            target: format!("{target} (pgBouncer's console)"),
            user: console.user.clone(),
            cause: match &e {
                connection::Error::Connect { source, .. } => connection::describe(source),
                other => other.to_string(),
            },
        })?;
    let rows = pool::simple_rows(&client, "SHOW VERSION", "SHOW VERSION").await?;
    let version = rows
        .first()
        .and_then(|r| r.get(0))
        .unwrap_or("pgBouncer")
        .to_string();
    drop(client);

    let prefix = pgpass_prefix(&console.host, console.port, &console.dbname, &console.user);
    let staged_pgpass = match &o.password {
        Some(p) => Some(stage_pgpass(&o.pgpass, &prefix, p)?),
        None => None,
    };
    let staged_target = Registry::load(&o.targets_file)?
        .with(targets::Target {
            kind: Kind::Pgbouncer,
            host: console.host.clone(),
            port: console.port,
            database: console.dbname.clone(),
            user: console.user.clone(),
            sslmode: console.sslmode.name().to_string(),
            root_cert: console.root_cert.clone(),
            efm: None,
        })
        .stage(&o.targets_file)?;

    let admin = connection::connect(&o.admin).await?;
    check_rights(&admin, &o.admin).await?;
    let port = i32::from(console.port);
    let sslmode = console.sslmode.name();
    let agent_id = o.agent.agent_id;
    let work = async {
        let what = "looking for the pgBouncer binding";
        let existing = pool::query_opt(
            &admin,
            what,
            "SELECT 1 FROM pem.agent_pgbouncer_binding WHERE agent_id = $1 AND host = $2 AND port = $3 FOR UPDATE",
            &[
                (&agent_id, Type::INT4),
                (&console.host, Type::TEXT),
                (&port, Type::INT4),
            ],
        )
        .await?
        .is_some();
        if existing && !o.force {
            return Err(Error::Usage(format!(
                "pgBouncer {target} is already bound to agent {agent_id}; rerun with --force to update it"
            )));
        }
        pool::execute(
            &admin,
            "binding pgBouncer to the agent",
            "INSERT INTO pem.agent_pgbouncer_binding (agent_id, host, port, username, sslmode) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (agent_id, host, port) DO UPDATE \
                SET username = EXCLUDED.username, sslmode = EXCLUDED.sslmode",
            &[
                (&agent_id, Type::INT4),
                (&console.host, Type::TEXT),
                (&port, Type::INT4),
                (&console.user, Type::TEXT),
                (&sslmode, Type::TEXT),
            ],
        )
        .await?;
        Ok::<_, Error>(existing)
    };
    let updated = pool::transaction(&admin, "binding pgBouncer", work).await?;
    let password_saved_in = commit_local(staged_target, staged_pgpass, &o.pgpass)?;
    Ok(BouncerBound {
        version,
        updated,
        password_saved_in,
    })
}

/// Unbinds the pgBouncer at `host:port` from the agent, removes its record on this host and its
/// console user's line from the agent user's password file. Returns the console user.
pub async fn unbind_pgbouncer(
    admin: &ConnectSettings,
    agent_id: i32,
    host: &str,
    port: u16,
    targets_file: &Path,
    pgpass: &Path,
) -> Result<String, Error> {
    let registry = Registry::load(targets_file)?;
    let recorded = registry
        .targets
        .iter()
        .find(|t| t.kind == Kind::Pgbouncer && t.host == host && t.port == port)
        .cloned();
    let staged = registry
        .without(Kind::Pgbouncer, host, port)
        .stage(targets_file)?;
    let client = connection::connect(admin).await?;
    check_rights(&client, admin).await?;
    let bport = i32::from(port);
    let user: Option<String> = pool::query_opt(
        &client,
        "unbinding pgBouncer",
        "DELETE FROM pem.agent_pgbouncer_binding WHERE agent_id = $1 AND host = $2 AND port = $3 RETURNING username::text",
        &[
            (&agent_id, Type::INT4),
            (&host, Type::TEXT),
            (&bport, Type::INT4),
        ],
    )
    .await?
    .map(|r| pool::get(&r, 0, "unbinding pgBouncer"))
    .transpose()?;
    let Some(user) = user.or_else(|| recorded.as_ref().map(|t| t.user.clone())) else {
        return Err(Error::Usage(format!(
            "no pgBouncer {host}:{port} is bound to agent {agent_id}; pemworker pooler bind binds one"
        )));
    };
    staged.commit()?;
    // The password was kept for this console only; with the binding it goes too.
    let prefix = pgpass_prefix(host, port, "pgbouncer", &user);
    if let Ok(existing) = std::fs::read_to_string(pgpass) {
        if existing.lines().any(|l| l.starts_with(&prefix)) {
            Staged::write(
                pgpass,
                pgpass_without(&existing, &prefix).as_bytes(),
                0o600,
                None,
            )?
            .commit()?;
        }
    }
    Ok(user)
}

/// Which probe `--enable-probe` / `--disable-probe` mean.
#[derive(Debug, Clone)]
pub enum ProbeSelector {
    InternalName(String),
    DisplayName(String),
    Id(i32),
}

impl std::fmt::Display for ProbeSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeSelector::InternalName(n) => write!(f, "{n:?}"),
            ProbeSelector::DisplayName(n) => write!(f, "named {n:?}"),
            ProbeSelector::Id(i) => write!(f, "with id {i}"),
        }
    }
}

/// A probe change for this agent, or for one of its servers.
#[derive(Debug, Clone)]
pub struct ProbeChange {
    pub admin: ConnectSettings,
    pub agent_id: i32,
    pub probe: ProbeSelector,
    /// The monitored server (as the agent reaches it), for server probes.
    pub server: Option<(String, u16)>,
    pub enabled: Option<bool>,
    pub interval: Option<u32>,
}

/// What a probe change left in force.
#[derive(Debug, Clone)]
pub struct ProbeSetting {
    pub probe: String,
    pub server_id: Option<i32>,
    pub interval: i32,
    pub enabled: bool,
}

pub async fn set_probe(c: &ProbeChange) -> Result<ProbeSetting, Error> {
    if c.interval == Some(0) {
        return Err(Error::Usage(
            "--probe-interval must be at least 1 second".into(),
        ));
    }
    let client = connection::connect(&c.admin).await?;
    check_rights(&client, &c.admin).await?;
    let (name, display, id): (Option<&str>, Option<&str>, Option<i32>) = match &c.probe {
        ProbeSelector::InternalName(n) => (Some(n), None, None),
        ProbeSelector::DisplayName(n) => (None, Some(n), None),
        ProbeSelector::Id(i) => (None, None, Some(*i)),
    };
    let row = pool::query_opt(
        &client,
        "looking up the probe",
        "SELECT id, internal_name, target_type FROM pem.probe \
          WHERE internal_name = $1 OR lower(display_name) = lower($2) OR id = $3",
        &[
            (&name, Type::TEXT),
            (&display, Type::TEXT),
            (&id, Type::INT4),
        ],
    )
    .await?;
    let Some(row) = row else {
        let known: Vec<String> = pool::query(
            &client,
            "listing probes",
            "SELECT internal_name FROM pem.probe ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| pool::get(r, 0, "listing probes"))
        .collect::<Result<_, _>>()?;
        return Err(Error::UnknownProbe(c.probe.to_string(), known.join(", ")));
    };
    let what = "looking up the probe";
    let (probe_id, probe, target): (i32, String, String) = (
        pool::get(&row, 0, what)?,
        pool::get(&row, 1, what)?,
        pool::get(&row, 2, what)?,
    );
    let server_id = match (target.as_str(), &c.server) {
        ("server", Some((host, port))) => {
            Some(bound_server(&client, c.agent_id, host, *port).await?)
        }
        ("server", None) => {
            let ids: Vec<i32> = pool::query(
                &client,
                "listing bound servers",
                "SELECT server_id FROM pem.agent_server_binding WHERE agent_id = $1",
                &[(&c.agent_id, Type::INT4)],
            )
            .await?
            .iter()
            .map(|r| pool::get(r, 0, "listing bound servers"))
            .collect::<Result<_, _>>()?;
            match ids.as_slice() {
                [one] => Some(*one),
                _ => {
                    return Err(Error::Usage(format!(
                        "probe {probe} runs on a monitored server and agent {} has {}; name it with --asb-host-name and --server-port",
                        c.agent_id,
                        if ids.is_empty() {
                            "none".to_string()
                        } else {
                            format!("{}", ids.len())
                        }
                    )));
                }
            }
        }
        (_, Some(_)) => {
            return Err(Error::Usage(format!(
                "probe {probe} runs on the {target}, not on a monitored server; leave out --asb-host-name and --server-port"
            )));
        }
        (_, None) => None,
    };
    let interval = c.interval.map(|i| i as i32);
    let what = "changing the probe schedule";
    let row = pool::query_one(
        &client,
        what,
        "INSERT INTO pem.probe_schedule AS ps (agent_id, server_id, probe_id, interval, enabled) \
         SELECT $1, $2, p.id, coalesce($4, p.default_interval), coalesce($5, p.enabled_by_default) \
           FROM pem.probe p WHERE p.id = $3 \
         ON CONFLICT (agent_id, server_id, probe_id) DO UPDATE \
            SET interval = coalesce($4, ps.interval), enabled = coalesce($5, ps.enabled) \
         RETURNING interval, enabled",
        &[
            (&c.agent_id, Type::INT4),
            (&server_id, Type::INT4),
            (&probe_id, Type::INT4),
            (&interval, Type::INT4),
            (&c.enabled, Type::BOOL),
        ],
    )
    .await?;
    Ok(ProbeSetting {
        probe,
        server_id,
        interval: pool::get(&row, 0, what)?,
        enabled: pool::get(&row, 1, what)?,
    })
}

/// The agent user's libpq password file: PGPASSFILE, else ~/.pgpass.
pub fn pgpass_file() -> PathBuf {
    crate::secret::pgpass_path().unwrap_or_else(|| Path::new("/root/.pgpass").to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_line_is_replaced_not_duplicated() {
        let prefix = pgpass_prefix("db1", 5432, "*", "mon:itor");
        let once = pgpass_with("other:1:*:x:y\n", &prefix, &Secret::new("p1"));
        let twice = pgpass_with(&once, &prefix, &Secret::new("p:2"));
        assert_eq!(twice, "other:1:*:x:y\ndb1:5432:*:mon\\:itor:p\\:2\n");
        assert_eq!(pgpass_without(&twice, &prefix), "other:1:*:x:y\n");
    }
}
