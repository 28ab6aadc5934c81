//! Agent registration on the PEM server, usually through pgBouncer.
//!
//! - [`register`] (`--register-agent`): one server transaction registers the agent row, makes
//!   sure its agent user exists and has a CSR signed; files are staged beside their targets
//!   and moved into place only once the server committed, so a failure at any step leaves no
//!   row, no role and no file behind.
//! - [`verify`] (`--verify-registration`) and [`unregister`] (`--unregister-agent`).
//! - [`migrate`] (`--migrate-to-pooler`): the guide's section 4.2 for an existing agent.

pub mod cert_check;
pub mod migrate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::KeyPair;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::agentcfg::{self, Document};
use crate::certs;
use crate::config::AgentConfig;
use crate::connection::{self, ConnectSettings, pool};
use crate::error::{ExitCode, connection_exit_code, files_exit_code};
use crate::fsutil::{self, Staged};
use crate::mac::AgentKey;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connection(#[from] connection::Error),
    #[error(transparent)]
    Files(#[from] fsutil::Error),
    #[error(transparent)]
    Certs(#[from] certs::Error),
    #[error(transparent)]
    Config(#[from] agentcfg::Problems),
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Missing(String),
    #[error(
        "the PEM schema is not installed in database {database} on {target}; install the PEM server (or run pemworker pooler prepare-server --install-schema)"
    )]
    SchemaMissing { database: String, target: String },
    #[error("user {user} on {target} cannot register agents: {missing}")]
    MissingRight {
        user: String,
        target: String,
        missing: String,
    },
    #[error("the PEM server returned an unusable certificate for {agent_user}: {why}")]
    BadCertificate { agent_user: String, why: String },
    #[error(
        "agent {agent_id} is not registered on {target}; register it again with --register-agent --force-registration"
    )]
    NotRegistered { agent_id: i32, target: String },
    #[error("agent {agent_id} is registered on {target} but inactive")]
    Inactive { agent_id: i32, target: String },
    #[error(
        "the PEM schema in database {database} on {target} is older than this pemworker; upgrade it with pemworker pooler prepare-server --install-schema"
    )]
    SchemaOutdated { database: String, target: String },
    #[error(
        "{what} on {target} gave up waiting for a lock on pem.agent_role (lock_timeout), held by another registration or role change; try again when it is done"
    )]
    LockTimeout { what: String, target: String },
    #[error(
        "{} names no agent_secret_file: agent {agent_id} was registered before per-agent secrets; register it again with --register-agent --force-registration (it keeps agent id {agent_id})",
        config_file.display()
    )]
    NoSecret { agent_id: i32, config_file: PathBuf },
    #[error(
        "agent {agent_id} is enrolled on the PEM server, but {cause}; ask the PEM admin to unregister agent {agent_id}, then enrol again with a new token"
    )]
    EnrolledWithoutFiles { agent_id: i32, cause: fsutil::Error },
    #[error(
        "agent id {agent_id} (-o agent_id) is not registered on {target}; -o agent_id re-registers an existing agent, so drop it to register a new agent (the server picks its id)"
    )]
    UnknownAgentId { agent_id: i32, target: String },
    #[error("{what}; {restored}")]
    MigrationFailed {
        what: String,
        restored: String,
        code: ExitCode,
    },
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Connection(e) => connection_exit_code(e),
            Error::Files(e) => files_exit_code(e),
            Error::Certs(_) => ExitCode::Local,
            Error::Config(_)
            | Error::Invalid { .. }
            | Error::Missing(_)
            | Error::NotRegistered { .. }
            | Error::UnknownAgentId { .. }
            | Error::NoSecret { .. } => ExitCode::Config,
            Error::SchemaMissing { .. }
            | Error::SchemaOutdated { .. }
            | Error::MissingRight { .. }
            | Error::BadCertificate { .. }
            | Error::LockTimeout { .. } => ExitCode::Server,
            Error::Inactive { .. } => ExitCode::Inactive,
            Error::EnrolledWithoutFiles { cause, .. } => files_exit_code(cause),
            Error::MigrationFailed { code, .. } => *code,
        }
    }
}

/// Checks an agent user name: it names a role, two files and an entry in pgBouncer's HBA file,
/// so it must be plain.
pub fn check_agent_user(name: &str) -> Result<(), Error> {
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-$".contains(c));
    if !ok_first || !ok_rest || name.len() > 63 || name.starts_with("pg_") {
        return Err(Error::Invalid {
            what: "agent user name",
            value: name.to_string(),
            why: "use 1 to 63 letters, digits, _ . - or $, starting with a letter or _ (not pg_)"
                .into(),
        });
    }
    Ok(())
}

/// Parses `-o key=value`.
pub fn parse_override(s: &str) -> Result<(String, String), Error> {
    let invalid = |why: &str| Error::Invalid {
        what: "-o option",
        value: s.to_string(),
        why: why.to_string(),
    };
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| invalid("expected key=value, for example -o log_level=info"))?;
    let k = k.trim();
    if k.is_empty()
        || !k
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(invalid("the key must be lowercase letters, digits and _"));
    }
    if v.contains(['\n', '\r']) {
        return Err(invalid("the value must be one line"));
    }
    if ["agent_id", "agent_user", "agent_ssl_key", "agent_ssl_crt"].contains(&k) {
        return Err(invalid("registration sets this key itself"));
    }
    if !agentcfg::is_known_key(k) {
        tracing::warn!("-o {k}: not a key PEM's agent knows; it is written to agent.cfg as given");
    }
    Ok((k.to_string(), v.trim().to_string()))
}

/// Everything `--register-agent` needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// The PEM admin's session, or with `token` the enrolment login's (host and port as
    /// agent.cfg will hold them).
    pub server: ConnectSettings,
    /// An enrolment token: registration without the admin's password.
    pub token: Option<crate::secret::Secret>,
    pub agent_user: Option<String>,
    pub display_name: String,
    pub host_name: String,
    pub cert_path: PathBuf,
    pub config_dir: PathBuf,
    pub force: bool,
    pub group: Option<String>,
    pub team: Option<String>,
    pub owner: Option<String>,
    pub heartbeat_connection: bool,
    /// `None`: what the key table says registration writes (PEM's default, true).
    pub allow_server_restart: Option<bool>,
    pub allow_batch_probes: bool,
    pub batch_script_user: Option<String>,
    /// PEM 10.1's `--pem-server 'h1,h2,h3'`: every host, tried in order for one that accepts
    /// writes, and all written to agent.cfg's pem_host; empty for one host (`server.host`).
    pub pem_hosts: Vec<String>,
    /// PEM's `-o agent_id=N`: re-register agent N (which the server must know) with its id.
    pub agent_id: Option<i32>,
    /// PEM's `-o agent_ssl_crt=... -o agent_ssl_key=...` (absolute, checked by
    /// [`cert_check::check_files`]): use these files instead of a new key and certificate.
    pub local_cert: Option<(PathBuf, PathBuf)>,
    pub overrides: Vec<(String, String)>,
}

impl Options {
    /// Whether monitored servers may be restarted by the agent, as agent.cfg and the server
    /// record it.
    pub fn allow_server_restart(&self) -> bool {
        self.allow_server_restart.unwrap_or_else(|| {
            agentcfg::keys::find(agentcfg::Section::Agent, "allow_server_restart")
                .and_then(|k| k.written)
                .and_then(agentcfg::keys::parse_bool)
                .unwrap_or(true)
        })
    }
}

/// What a registration produced.
#[derive(Debug, Clone)]
pub struct Registered {
    pub agent_id: i32,
    pub agent_user: String,
    pub config_file: PathBuf,
    pub key_file: PathBuf,
    pub cert_file: PathBuf,
    pub backups: Vec<PathBuf>,
    pub kept_id: bool,
    pub deactivated: Vec<i32>,
}

pub fn key_file(cert_path: &Path, agent_user: &str) -> PathBuf {
    cert_path.join(format!("{agent_user}.key"))
}

pub fn cert_file(cert_path: &Path, agent_user: &str) -> PathBuf {
    cert_path.join(format!("{agent_user}.crt"))
}

/// Directories created by this run, removed again (if still empty) unless kept.
struct CreatedDirs(Vec<PathBuf>);

impl CreatedDirs {
    /// Makes sure `dir` exists (created with `mode` if missing; an existing one is left as it
    /// is) and remembers what was created.
    fn ensure(&mut self, dir: &Path, mode: u32) -> Result<(), fsutil::Error> {
        self.0.extend(fsutil::ensure_dir(dir, mode, None)?);
        Ok(())
    }

    fn keep(mut self) {
        self.0.clear();
    }
}

/// The agent's key will live in `dir`: a directory that others may add files to or rename
/// files in could swap the key or certificate under the agent, so it is refused (root gets the
/// same answer, with the owner checked too, from fsutil).
fn check_key_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)
        .map_err(fsutil::Error::io("read", dir))?
        .permissions()
        .mode();
    if mode & 0o022 != 0 {
        return Err(Error::Invalid {
            what: "--cert-path",
            value: dir.display().to_string(),
            why: format!(
                "the directory is writable by group or others (mode {:04o}), who could replace the agent's key; use a directory only you can write to (a new one is created 0700)",
                mode & 0o7777
            ),
        });
    }
    Ok(())
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Fails with the `--force-registration` hint when `path` exists and force is off.
fn refuse_existing(path: &Path, force: bool) -> Result<(), Error> {
    if path.exists() && !force {
        return Err(fsutil::Error::Exists {
            path: path.to_path_buf(),
            flag: "--force-registration",
        }
        .into());
    }
    Ok(())
}

/// Checks that the connected user may register agents, naming the missing right. Only the
/// catalogs are read until membership in pem_admin is known, since a user without it may not
/// even look inside schema pem.
pub(crate) async fn check_rights(client: &Client, settings: &ConnectSettings) -> Result<(), Error> {
    let target = settings.target();
    let user = &settings.user;
    let what = "checking the registering user's rights";
    let row = pool::query_one(
        client,
        what,
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                         WHERE n.nspname = 'pem' AND c.relname = 'agent'), \
                EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pem_admin') \
                AND pg_catalog.pg_has_role('pem_admin', 'MEMBER')",
        &[],
    )
    .await?;
    if !pool::get::<bool>(&row, 0, what)? {
        return Err(Error::SchemaMissing {
            database: settings.dbname.clone(),
            target,
        });
    }
    let missing = |m: String| Error::MissingRight {
        user: user.clone(),
        target: target.clone(),
        missing: m,
    };
    if !pool::get::<bool>(&row, 1, what)? {
        return Err(missing(format!(
            "not a member of pem_admin (run GRANT pem_admin TO {user} on the PEM server)"
        )));
    }
    // One round trip: whether the schema has the functions this build calls (an older one
    // gets the upgrade advice, not "function does not exist"), and the rights on them.
    let what = "checking the registering user's rights";
    let row = pool::query_one(
        client,
        what,
        "SELECT pg_catalog.to_regprocedure('pem.ensure_agent_user(text,integer)') IS NOT NULL, \
                has_table_privilege('pem.agent', 'INSERT, UPDATE'), \
                has_function_privilege('pem.sign_agent_csr(text)', 'EXECUTE'), \
                CASE WHEN pg_catalog.to_regprocedure('pem.ensure_agent_user(text,integer)') IS NOT NULL THEN \
                     has_function_privilege('pem.ensure_agent_user(text, integer)', 'EXECUTE') \
                      AND has_function_privilege('pem.issue_agent_secret(integer)', 'EXECUTE') \
                      AND has_function_privilege('pem.unregister_agent(integer)', 'EXECUTE') END",
        &[],
    )
    .await?;
    if !pool::get::<bool>(&row, 0, what)? {
        return Err(Error::SchemaOutdated {
            database: settings.dbname.clone(),
            target,
        });
    }
    for (i, right) in [
        (1, "no INSERT or UPDATE on pem.agent"),
        (2, "no EXECUTE on pem.sign_agent_csr(text)"),
        (
            3,
            "no EXECUTE on pem.ensure_agent_user, pem.issue_agent_secret or pem.unregister_agent",
        ),
    ] {
        if !pool::get::<bool>(&row, i, what)? {
            return Err(missing(format!(
                "{right} (grant it to pem_admin on the PEM server)"
            )));
        }
    }
    Ok(())
}

/// Makes sure `agent_user` exists as an agent user; true when this call created it. The server
/// function serializes creators with a table lock no agent can take, so concurrent
/// registrations never race on CREATE ROLE or GRANT (PEM's "tuple concurrently updated"), and
/// a lock held too long is a one-line error rather than a hang.
pub(crate) async fn ensure_agent_user(
    client: &Client,
    settings: &ConnectSettings,
    agent_user: &str,
    dedicated_to: Option<i32>,
) -> Result<bool, Error> {
    let what = format!("creating agent user {agent_user}");
    let row = pool::query_one(
        client,
        &what,
        "SELECT pem.ensure_agent_user($1, $2)",
        &[(&agent_user, Type::TEXT), (&dedicated_to, Type::INT4)],
    )
    .await
    .map_err(|e| lock_timeout(e, &what, settings))?;
    Ok(pool::get(&row, 0, &what)?)
}

/// How many times a registration that waited its turn longer than lock_timeout tries again,
/// provided other registrations got through meanwhile.
const LOCK_RETRIES: u32 = 30;

/// How many agents the server has registered, and the newest id: changes whenever a
/// registration commits. `None` when it cannot be read.
async fn registrations_so_far(client: &Client) -> Option<(i64, i32)> {
    let row = pool::query_one(
        client,
        "counting registrations",
        "SELECT count(*), coalesce(max(id), 0) FROM pem.agent",
        &[],
    )
    .await
    .ok()?;
    Some((row.try_get(0).ok()?, row.try_get(1).ok()?))
}

/// A lock wait over lock_timeout (SQLSTATE 55P03) as the one-line error that says so.
fn lock_timeout(e: connection::Error, what: &str, settings: &ConnectSettings) -> Error {
    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
        Error::LockTimeout {
            what: what.to_string(),
            target: settings.target(),
        }
    } else {
        e.into()
    }
}

/// A new write secret for the agent (replacing any earlier one), made by the server.
pub(crate) async fn issue_secret(client: &Client, agent_id: i32) -> Result<AgentKey, Error> {
    let what = format!("making the write secret of agent {agent_id}");
    let row = pool::query_one(
        client,
        &what,
        "SELECT pem.issue_agent_secret($1)",
        &[(&agent_id, Type::INT4)],
    )
    .await?;
    let hex: String = pool::get(&row, 0, &what)?;
    AgentKey::from_hex(&hex).ok_or_else(|| {
        connection::Error::Reply {
            what,
            why: "not a 32-byte secret in hexadecimal".into(),
        }
        .into()
    })
}

/// Generates a key, has the server sign a CSR for `agent_user`, and checks the result.
pub(crate) async fn obtain_certificate(
    client: &Client,
    agent_user: &str,
    root_cert: Option<&Path>,
) -> Result<(KeyPair, String), Error> {
    let key = certs::generate_key()?;
    let csr = certs::csr_pem(&key, agent_user)?;
    let what = format!("signing the certificate of {agent_user}");
    let row = pool::query_one(
        client,
        &what,
        "SELECT pem.sign_agent_csr($1)",
        &[(&csr, Type::TEXT)],
    )
    .await?;
    let cert: String = pool::get(&row, 0, &what)?;
    cert_check::check(&cert, &key, agent_user, root_cert).map_err(|why| Error::BadCertificate {
        agent_user: agent_user.to_string(),
        why,
    })?;
    Ok((key, cert))
}

/// Registers the agent; see the module documentation for the all-or-nothing order.
pub async fn register(opts: &Options) -> Result<Registered, Error> {
    if let Some(u) = &opts.agent_user {
        check_agent_user(u)?;
    }
    let config_file = opts.config_dir.join(agentcfg::FILE_NAME);
    refuse_existing(&config_file, opts.force)?;
    // With --force-registration the agent keeps the id its agent.cfg already has.
    let previous_id = if let Some(id) = opts.agent_id {
        Some(id)
    } else if config_file.exists() {
        Document::read(&config_file)
            .ok()
            .and_then(|d| d.get("agent_id").and_then(|v| v.parse::<i32>().ok()))
    } else {
        None
    };
    if let (Some(u), None) = (&opts.agent_user, &opts.local_cert) {
        refuse_existing(&key_file(&opts.cert_path, u), opts.force)?;
        refuse_existing(&cert_file(&opts.cert_path, u), opts.force)?;
    }
    let mut dirs = CreatedDirs(Vec::new());
    dirs.ensure(&opts.cert_path, 0o700)?;
    check_key_dir(&opts.cert_path)?;
    dirs.ensure(&opts.config_dir, 0o755)?;
    // Prove both directories writable before the server is touched.
    Staged::check(&key_file(&opts.cert_path, "probe"), 0o600, None)?;
    Staged::check(&config_file, 0o644, None)?;

    let client = connect_writable(&opts.server, &opts.pem_hosts).await?;
    match &opts.token {
        None => check_rights(&client, &opts.server).await?,
        Some(_) => check_enrolment(&client, &opts.server).await?,
    }

    // Registrations take their turn on pem.agent_role. Many at once straight to PostgreSQL
    // (no pool to queue them) can wait longer than lock_timeout while every one ahead makes
    // progress: such a registration tries again, as long as others are seen registering.
    // A lock that someone holds without any registration getting through is reported at once.
    let mut progress = match opts.token {
        None => registrations_so_far(&client).await,
        Some(_) => None,
    };
    let mut retries = 0;
    let (registered, created_role, staged) = loop {
        let work = async {
            let e = match &opts.token {
                None => with_admin(&client, opts, previous_id).await?,
                Some(token) => with_token(&client, opts, token).await?,
            };
            stage(opts, &config_file, e)
        };
        match pool::transaction(&client, "the registration", work).await {
            Err(e @ Error::LockTimeout { .. }) => {
                let now = match progress {
                    Some(_) => registrations_so_far(&client).await,
                    None => None,
                };
                if now.is_none() || now == progress || retries >= LOCK_RETRIES {
                    return Err(e);
                }
                retries += 1;
                tracing::info!(
                    "other registrations went first while this one waited for its turn; trying again ({retries} of at most {LOCK_RETRIES})"
                );
                progress = now;
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..500))).await;
            }
            r => break r?,
        }
    };

    if let Err(e) = fsutil::commit_all(staged.into_iter().map(|(_, s)| s).collect()) {
        if opts.token.is_some() {
            // The enrolment login may undo nothing; say what is left.
            return Err(Error::EnrolledWithoutFiles {
                agent_id: registered.agent_id,
                cause: e,
            });
        }
        let role = created_role.then_some(registered.agent_user.as_str());
        undo_registration(&client, registered.agent_id, registered.kept_id, role).await;
        return Err(e.into());
    }
    dirs.keep();
    Ok(registered)
}

/// The first of `hosts` (or `server`'s one host) that accepts a session and writes, as libpq's
/// `target_session_attrs=read-write` picks it; the last host's error if none does.
async fn connect_writable(server: &ConnectSettings, hosts: &[String]) -> Result<Client, Error> {
    if hosts.len() < 2 {
        return Ok(connection::connect(server).await?);
    }
    let mut last = None;
    for host in hosts {
        let mut s = server.clone();
        s.host = host.clone();
        match connection::connect(&s).await {
            Ok(client) => {
                let standby: bool = pool::query_value(
                    &client,
                    "checking for a standby",
                    "SELECT pg_catalog.pg_is_in_recovery()",
                    &[],
                )
                .await?;
                if !standby {
                    return Ok(client);
                }
                tracing::info!("{} is a standby; trying the next PEM host", s.target());
            }
            Err(e) => {
                tracing::info!("{e}; trying the next PEM host");
                last = Some(e);
            }
        }
    }
    Err(match last {
        Some(e) => e.into(),
        None => Error::Missing(format!(
            "every PEM host of {} is a standby; registration needs the primary",
            hosts.join(",")
        )),
    })
}

/// What the server side of a registration produced.
struct Enrolled {
    agent_id: i32,
    agent_user: String,
    kept_id: bool,
    created_role: bool,
    /// The new key and certificate; `None` when the registration uses the local files.
    files: Option<(KeyPair, String)>,
    secret: AgentKey,
    deactivated: Vec<i32>,
}

/// The admin's registration: the agent row, its user, certificate and secret, each by its own
/// statement in the caller's transaction.
async fn with_admin(
    client: &Client,
    opts: &Options,
    previous_id: Option<i32>,
) -> Result<Enrolled, Error> {
    let (agent_id, kept_id) = upsert_agent(client, opts, previous_id).await?;
    let agent_user = opts
        .agent_user
        .clone()
        .unwrap_or_else(|| format!("agent{agent_id}"));
    pool::execute(
        client,
        "recording the agent user",
        "UPDATE pem.agent SET agent_user = $2 WHERE id = $1",
        &[(&agent_id, Type::INT4), (&agent_user, Type::TEXT)],
    )
    .await?;
    let dedicated = opts.agent_user.is_none().then_some(agent_id);
    let created_role = ensure_agent_user(client, &opts.server, &agent_user, dedicated).await?;
    let files = match &opts.local_cert {
        // Checked before the server was touched (cert_check::check_files).
        Some(_) => None,
        None => {
            Some(obtain_certificate(client, &agent_user, opts.server.root_cert.as_deref()).await?)
        }
    };
    let secret = issue_secret(client, agent_id).await?;
    let deactivated = if kept_id {
        deactivate_duplicates(client, agent_id, opts).await?
    } else {
        Vec::new()
    };
    Ok(Enrolled {
        agent_id,
        agent_user,
        kept_id,
        created_role,
        files,
        secret,
        deactivated,
    })
}

/// The login a token enrols through must find the entry point; a server too old to have it
/// gets the same one-line advice as the admin's path.
async fn check_enrolment(client: &Client, settings: &ConnectSettings) -> Result<(), Error> {
    let what = "looking for the enrolment function";
    let row = pool::query_one(
        client,
        what,
        "SELECT pg_catalog.to_regprocedure('pem.enrol_agent(text,text,text,text,text,jsonb)') IS NOT NULL",
        &[],
    )
    .await?;
    if pool::get::<bool>(&row, 0, what)? {
        Ok(())
    } else {
        Err(Error::SchemaOutdated {
            database: settings.dbname.clone(),
            target: settings.target(),
        })
    }
}

/// Enrolment with a token: one call to the server's single entry point, which checks the
/// token, registers the agent, makes its user if needed, signs the CSR only for that user and
/// hands out the write secret. The CSR names the agent user asked for, or just "agent" when the
/// token decides (its agent user, or a dedicated agent<ID> role whose id the server picks).
async fn with_token(
    client: &Client,
    opts: &Options,
    token: &crate::secret::Secret,
) -> Result<Enrolled, Error> {
    let key = certs::generate_key()?;
    let csr = certs::csr_pem(&key, opts.agent_user.as_deref().unwrap_or("agent"))?;
    let details = serde_json::json!({
        "group": opts.group,
        "team": opts.team,
        "owner": opts.owner,
        "allow_server_restart": opts.allow_server_restart(),
        "allow_batch_probes": opts.allow_batch_probes,
        "batch_script_user": opts.batch_script_user,
        "heartbeat_connection": opts.heartbeat_connection,
    })
    .to_string();
    let token = token.expose();
    let what = "enrolling the agent with the token";
    let row = pool::query_one(
        client,
        what,
        "SELECT agent_id, agent_user, certificate, secret \
           FROM pem.enrol_agent($1, $2, $3, $4, $5, $6::text::jsonb)",
        &[
            (&token, Type::TEXT),
            (&opts.agent_user, Type::TEXT),
            (&opts.display_name, Type::TEXT),
            (&opts.host_name, Type::TEXT),
            (&csr, Type::TEXT),
            (&details, Type::TEXT),
        ],
    )
    .await?;
    let agent_id: i32 = pool::get(&row, 0, what)?;
    let agent_user: String = pool::get(&row, 1, what)?;
    let cert: String = pool::get(&row, 2, what)?;
    let secret_hex: String = pool::get(&row, 3, what)?;
    cert_check::check(&cert, &key, &agent_user, opts.server.root_cert.as_deref()).map_err(
        |why| Error::BadCertificate {
            agent_user: agent_user.clone(),
            why,
        },
    )?;
    let secret = AgentKey::from_hex(&secret_hex).ok_or_else(|| connection::Error::Reply {
        what: what.to_string(),
        why: "the write secret is not 32 bytes in hexadecimal".into(),
    })?;
    Ok(Enrolled {
        agent_id,
        agent_user,
        kept_id: false,
        created_role: false,
        files: Some((key, cert)),
        secret,
        deactivated: Vec::new(),
    })
}

type StagedFiles = Vec<(PathBuf, Staged)>;

/// Every file of the registration, staged beside its target (existing ones backed up), for the
/// caller to move into place once the server committed.
fn stage(
    opts: &Options,
    config_file: &Path,
    e: Enrolled,
) -> Result<(Registered, bool, StagedFiles), Error> {
    let (crt_path, key_path) = match &opts.local_cert {
        Some((crt, key)) => (crt.clone(), key.clone()),
        None => (
            cert_file(&opts.cert_path, &e.agent_user),
            key_file(&opts.cert_path, &e.agent_user),
        ),
    };
    let secret_path = crate::mac::secret_file(&opts.cert_path, e.agent_id);
    if opts.agent_user.is_none() && e.files.is_some() {
        refuse_existing(&key_path, opts.force)?;
        refuse_existing(&crt_path, opts.force)?;
    }
    refuse_existing(&secret_path, opts.force)?;
    let cfg = agent_config(
        opts,
        e.agent_id,
        &e.agent_user,
        &key_path,
        &crt_path,
        &secret_path,
    );
    let mut staged = vec![(
        secret_path.clone(),
        Staged::write(
            &secret_path,
            e.secret.file_contents().expose().as_bytes(),
            0o600,
            None,
        )?,
    )];
    if let Some((key, cert)) = &e.files {
        staged.push((
            key_path.clone(),
            Staged::write(&key_path, key.serialize_pem().as_bytes(), 0o600, None)?,
        ));
        staged.push((
            crt_path.clone(),
            Staged::write(&crt_path, cert.as_bytes(), 0o600, None)?,
        ));
    }
    staged.push((
        config_file.to_path_buf(),
        Staged::write(config_file, cfg.render().as_bytes(), 0o644, None)?,
    ));
    let existing: Vec<&PathBuf> = staged
        .iter()
        .map(|(p, _)| p)
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    let backups = fsutil::backup_all(&existing)?;
    let registered = Registered {
        agent_id: e.agent_id,
        agent_user: e.agent_user,
        config_file: config_file.to_path_buf(),
        key_file: key_path,
        cert_file: crt_path,
        backups,
        kept_id: e.kept_id,
        deactivated: e.deactivated,
    };
    Ok((registered, e.created_role, staged))
}

/// Inserts the agent row, or with a previous id that the server knows, updates and reactivates
/// it. Returns the id and whether it was kept.
async fn upsert_agent(
    client: &Client,
    o: &Options,
    previous: Option<i32>,
) -> Result<(i32, bool), Error> {
    let allow_server_restart = o.allow_server_restart();
    let params: [pool::Param<'_>; 10] = [
        (&o.display_name, Type::TEXT),
        (&o.host_name, Type::TEXT),
        (&o.group, Type::TEXT),
        (&o.team, Type::TEXT),
        (&o.owner, Type::TEXT),
        (&allow_server_restart, Type::BOOL),
        (&o.allow_batch_probes, Type::BOOL),
        (&o.batch_script_user, Type::TEXT),
        (&o.heartbeat_connection, Type::BOOL),
        (&previous, Type::INT4),
    ];
    let row = pool::query_opt(
        client,
        "registering the agent",
        "UPDATE pem.agent SET display_name = $1, host_name = $2, group_name = $3, team = $4, owner = $5, \
                allow_server_restart = $6, allow_batch_probes = $7, batch_script_user = $8, \
                heartbeat_connection = $9, active = true, unregistered_at = NULL \
          WHERE id = $10 RETURNING id",
        &params,
    )
    .await?;
    if let Some(r) = row {
        return Ok((pool::get(&r, 0, "registering the agent")?, true));
    }
    if let Some(agent_id) = o.agent_id {
        return Err(Error::UnknownAgentId {
            agent_id,
            target: o.server.target(),
        });
    }
    if let Some(id) = previous {
        tracing::warn!(
            "agent id {id} from the existing agent.cfg is unknown to the PEM server; registering a new agent"
        );
    }
    let id: i32 = pool::query_value(
        client,
        "registering the agent",
        "INSERT INTO pem.agent (display_name, host_name, group_name, team, owner, allow_server_restart, \
                                allow_batch_probes, batch_script_user, heartbeat_connection) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        &params[..9],
    )
    .await?;
    Ok((id, false))
}

/// Unregisters other active registrations of the same host and display name (inactive, no
/// write secret, dedicated role dropped): the row a plain re-registration would have left for
/// the DBA to disable by hand.
async fn deactivate_duplicates(client: &Client, keep: i32, o: &Options) -> Result<Vec<i32>, Error> {
    let what = "deactivating duplicate registrations";
    let rows = pool::query(
        client,
        what,
        "SELECT id FROM pem.agent \
          WHERE active AND id <> $1 AND host_name = $2 AND display_name = $3 ORDER BY id",
        &[
            (&keep, Type::INT4),
            (&o.host_name, Type::TEXT),
            (&o.display_name, Type::TEXT),
        ],
    )
    .await?;
    let mut ids = Vec::new();
    for r in &rows {
        let id: i32 = pool::get(r, 0, what)?;
        pool::execute(
            client,
            what,
            "SELECT pem.unregister_agent($1)",
            &[(&id, Type::INT4)],
        )
        .await?;
        ids.push(id);
    }
    Ok(ids)
}

/// Best effort after the server committed but a file could not be put in place.
async fn undo_registration(
    client: &Client,
    agent_id: i32,
    kept_id: bool,
    created_role: Option<&str>,
) {
    if !kept_id {
        let _ = pool::execute(
            client,
            "undoing the registration",
            "DELETE FROM pem.agent WHERE id = $1",
            &[(&agent_id, Type::INT4)],
        )
        .await;
    }
    if let Some(role) = created_role {
        let _ = pool::execute(
            client,
            "undoing the agent user",
            "SELECT pem.drop_agent_user($1)",
            &[(&role, Type::TEXT)],
        )
        .await;
    }
}

fn agent_config(
    o: &Options,
    agent_id: i32,
    agent_user: &str,
    key: &Path,
    crt: &Path,
    secret: &Path,
) -> Document {
    let mut d = Document::with_defaults();
    let b = |v: bool| if v { "true" } else { "false" };
    let hosts = if o.pem_hosts.is_empty() {
        o.server.host.clone()
    } else {
        o.pem_hosts.join(",")
    };
    d.set("pem_host", &hosts, None);
    d.set("pem_port", &o.server.port.to_string(), None);
    d.set("agent_id", &agent_id.to_string(), None);
    d.set("agent_user", agent_user, None);
    d.set("agent_ssl_key", &key.display().to_string(), None);
    d.set("agent_ssl_crt", &crt.display().to_string(), None);
    d.set("agent_secret_file", &secret.display().to_string(), None);
    d.set("allow_server_restart", b(o.allow_server_restart()), None);
    d.set("allow_batch_probes", b(o.allow_batch_probes), None);
    d.set("heartbeat_connection", b(o.heartbeat_connection), None);
    if let Some(u) = &o.batch_script_user {
        d.set("batch_script_user", u, None);
    }
    // The agent verifies the PEM server as this registration did.
    d.set("pem_ssl_mode", o.server.sslmode.name(), None);
    if let Some(root) = &o.server.root_cert {
        d.set("pem_ssl_root_cert", &root.display().to_string(), None);
    }
    for (k, v) in &o.overrides {
        d.set(k, v, None);
    }
    // A registration over an existing agent.cfg keeps its webhook and Barman sections.
    if let Ok(old) = Document::read(&o.config_dir.join(agentcfg::FILE_NAME)) {
        d.append_sections(&old, |s| {
            matches!(
                agentcfg::Section::of_header(s),
                Some(agentcfg::Section::Webhook | agentcfg::Section::Barman)
            )
        });
    }
    d
}

/// The agent's own session with the first configured PEM host, as the worker opens it.
pub fn agent_settings(c: &AgentConfig) -> Result<ConnectSettings, Error> {
    Ok(c.pem_targets()?.swap_remove(0))
}

/// Whether the agent of this agent.cfg can log in with its own certificate and is active.
pub async fn verify(config_file: &Path) -> Result<i32, Error> {
    let (_, id) = AgentConfig::load_with_document(config_file)?;
    let settings = agent_settings(&id)?;
    let client = connection::connect(&settings).await?;
    check_active(&client, &id, &settings.target()).await?;
    Ok(id.agent_id)
}

pub(crate) async fn check_active(
    client: &Client,
    id: &AgentConfig,
    target: &str,
) -> Result<(), Error> {
    let Some(key) = id.agent_secret.as_ref() else {
        return Err(Error::NoSecret {
            agent_id: id.agent_id,
            config_file: id.path.clone(),
        });
    };
    let sent_at = crate::mac::now();
    let signature = key.sign(crate::mac::Kind::Verify, id.agent_id, &sent_at, "");
    let what = "reading the agent's registration";
    let row = pool::query_opt(
        client,
        what,
        "SELECT active FROM pem.check_agent($1, $2, $3)",
        &[
            (&id.agent_id, Type::INT4),
            (&sent_at, Type::TEXT),
            (&signature, Type::TEXT),
        ],
    )
    .await?;
    match row.map(|r| pool::get::<bool>(&r, 0, what)).transpose()? {
        Some(true) => Ok(()),
        Some(false) => Err(Error::Inactive {
            agent_id: id.agent_id,
            target: target.to_string(),
        }),
        None => Err(Error::NotRegistered {
            agent_id: id.agent_id,
            target: target.to_string(),
        }),
    }
}

/// Marks the agent of this agent.cfg inactive on the server (as `server`'s admin user) and
/// moves agent.cfg aside to a timestamped backup, so the worker no longer starts with it.
pub async fn unregister(
    server: &ConnectSettings,
    config_file: &Path,
) -> Result<(i32, PathBuf), Error> {
    let (_, id) = AgentConfig::load_with_document(config_file)?;
    let client = connection::connect(server).await?;
    check_rights(&client, server).await?;
    let what = "unregistering the agent";
    let row = pool::query_opt(
        &client,
        what,
        "SELECT dropped_role FROM pem.unregister_agent($1)",
        &[(&id.agent_id, Type::INT4)],
    )
    .await
    .map_err(|e| lock_timeout(e, what, server))?;
    let Some(row) = row else {
        return Err(Error::NotRegistered {
            agent_id: id.agent_id,
            target: server.target(),
        });
    };
    if let Some(role) = pool::get::<Option<String>>(&row, 0, what)? {
        tracing::info!("dropped the dedicated agent role {role}");
    }
    let backup = fsutil::backup(config_file)?;
    std::fs::remove_file(config_file).map_err(fsutil::Error::io("remove", config_file))?;
    Ok((id.agent_id, backup))
}
