//! The command line. Raw arguments are parsed by clap, then resolved into checked settings
//! (`resolve_*`) before any work starts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::Error;
use crate::connection::ConnectSettings;
use crate::fsutil::Owner;
use crate::pooler::{bouncer, hba, prepare};

#[derive(Debug, Parser)]
#[command(
    name = "pemworker",
    version,
    about = "PEM agent worker for PEM servers reached through pgBouncer",
    after_help = "Exit codes: 0 success, 1 bad input or configuration, 2 cannot connect or \
                  authenticate, 3 agent inactive, 4 the PEM server refused, 5 local file error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The pooled side: prepare the PEM server and configure pgBouncer (guide chapters 3-4).
    #[command(subcommand)]
    Pooler(PoolerCommand),
}

#[derive(Debug, Subcommand)]
pub enum PoolerCommand {
    /// Prepare the PEM server for pgBouncer: roles, grants, schema, pg_hba.conf lines.
    PrepareServer(PrepareServerArgs),
    /// Create a common agent user that agents log in as through pgBouncer.
    CreateProxyUser(CreateProxyUserArgs),
    /// Write pgbouncer.ini, its HBA file and user list.
    Configure(Box<ConfigureArgs>),
}

/// How to reach the PEM server, with PEM's flag names. The password comes from
/// PEM_SERVER_PASSWORD, PGPASSWORD, ~/.pgpass or a prompt; PGSSLMODE and the other libpq
/// variables keep libpq's meanings.
#[derive(Debug, Args)]
pub struct PemServerArgs {
    /// PEM server host name or address (or a Unix socket directory).
    #[arg(long = "pem-server", value_name = "HOST")]
    pub pem_server: String,
    #[arg(long = "pem-port", value_name = "PORT", default_value_t = 5432)]
    pub pem_port: u16,
    #[arg(long = "pem-user", value_name = "USER")]
    pub pem_user: String,
    #[arg(long = "pem-database", value_name = "DB", default_value = "pem")]
    pub pem_database: String,
}

#[derive(Debug, Args)]
pub struct PrepareServerArgs {
    #[command(flatten)]
    pub server: PemServerArgs,
    /// pgBouncer's auth user (password: PEMWORKER_AUTH_USER_PASSWORD or a prompt).
    #[arg(long, default_value = "pgbouncer", value_name = "USER")]
    pub auth_user: String,
    /// The PEM admin for pgBouncer (password: PEMWORKER_ADMIN_USER_PASSWORD or a prompt).
    #[arg(long, default_value = "pem_admin1", value_name = "USER")]
    pub admin_user: String,
    /// Install or upgrade the reference PEM schema (creates the database if missing).
    #[arg(long)]
    pub install_schema: bool,
    /// Insert the lines at the start of this pg_hba.conf (backup kept, server reloaded);
    /// without it the lines are printed.
    #[arg(long, value_name = "FILE")]
    pub pg_hba: Option<PathBuf>,
    /// Where pgBouncer connects from: `local` (Unix socket) or an address/CIDR.
    #[arg(long, default_value = "local", value_name = "local|CIDR")]
    pub pgbouncer_address: String,
    /// Set the passwords of existing auth and admin users again.
    #[arg(long)]
    pub reset_passwords: bool,
}

#[derive(Debug, Args)]
pub struct CreateProxyUserArgs {
    #[command(flatten)]
    pub server: PemServerArgs,
    /// The agent user to create.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct ConfigureArgs {
    /// Directory of pgbouncer.ini, hba_file and userlist.txt (made 0700).
    #[arg(long, default_value = "/etc/pgbouncer", value_name = "DIR")]
    pub config_dir: PathBuf,
    /// Operating-system user pgBouncer runs as; owns the files. Default: postgres when run as
    /// root, else the current user.
    #[arg(long, value_name = "USER")]
    pub owner: Option<String>,
    /// Host or socket directory of the PEM database server, as pgBouncer reaches it.
    #[arg(long, default_value = "/var/run/postgresql", value_name = "HOST")]
    pub pem_db_host: String,
    #[arg(long, default_value_t = 5432, value_name = "PORT")]
    pub pem_db_port: u16,
    #[arg(long, default_value = "pem", value_name = "DB")]
    pub pem_db_name: String,
    /// Password: PEMWORKER_AUTH_USER_PASSWORD or a prompt.
    #[arg(long, default_value = "pgbouncer", value_name = "USER")]
    pub auth_user: String,
    /// Admin and stats user. Password: PEMWORKER_ADMIN_USER_PASSWORD or a prompt.
    #[arg(long, default_value = "pem_admin1", value_name = "USER")]
    pub admin_user: String,
    #[arg(long, default_value_t = 80)]
    pub pool_size: u32,
    #[arg(long, default_value_t = 10)]
    pub fallback_pool_size: u32,
    #[arg(long, default_value = "*")]
    pub listen_addr: String,
    #[arg(long, default_value_t = 6432)]
    pub listen_port: u16,
    #[arg(long, value_name = "DIR")]
    pub unix_socket_dir: Option<PathBuf>,
    #[arg(long, default_value = "require", value_name = "MODE")]
    pub client_tls_sslmode: String,
    /// CA that signed the agents' certificates (the PEM server's root.crt).
    #[arg(long, value_name = "FILE")]
    pub client_tls_ca_file: PathBuf,
    #[arg(long, value_name = "FILE")]
    pub client_tls_key_file: PathBuf,
    #[arg(long, value_name = "FILE")]
    pub client_tls_cert_file: PathBuf,
    #[arg(long, default_value = "SELECT * FROM pem.get_agent_pool_auth($1)")]
    pub auth_query: String,
    #[arg(long, default_value_t = 500)]
    pub max_client_conn: u32,
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub server_idle_timeout: u32,
    #[arg(long, default_value = "DISCARD ALL")]
    pub server_reset_query: String,
    #[arg(
        long,
        default_value = "/var/log/postgresql/pgbouncer.log",
        value_name = "FILE"
    )]
    pub logfile: PathBuf,
    #[arg(
        long,
        default_value = "/var/run/postgresql/pgbouncer.pid",
        value_name = "FILE"
    )]
    pub pidfile: PathBuf,
    /// Agent user allowed to log in by certificate (repeatable; default: any member of
    /// pem_agent_pool, as auth_query decides).
    #[arg(long = "agent-user", value_name = "USER")]
    pub agent_users: Vec<String>,
    /// Network agents connect from (repeatable).
    #[arg(long = "agent-network", value_name = "CIDR", default_values_t = ["0.0.0.0/0".to_string(), "::/0".to_string()])]
    pub agent_networks: Vec<String>,
    /// Network the admin connects from (repeatable).
    #[arg(long = "admin-network", value_name = "CIDR", default_values_t = ["0.0.0.0/0".to_string(), "::/0".to_string()])]
    pub admin_networks: Vec<String>,
    /// Replace existing files (each is backed up first).
    #[arg(long)]
    pub force: bool,
    /// The pgBouncer binary whose version is checked.
    #[arg(long, default_value = "pgbouncer", value_name = "PATH")]
    pub pgbouncer_bin: String,
}

/// Connection settings for the PEM server from the flags and libpq's environment, with the
/// password from PEM_SERVER_PASSWORD, PGPASSWORD, ~/.pgpass or a prompt (in that order).
pub fn resolve_server(a: &PemServerArgs) -> Result<ConnectSettings, Error> {
    let mut s = ConnectSettings::from_env(&a.pem_server, a.pem_port, &a.pem_user, &a.pem_database)?;
    s.resolve_password(&["PEM_SERVER_PASSWORD", "PGPASSWORD"]);
    if s.password.is_none() {
        s.password =
            crate::secret::prompt(&format!("Password for {}@{}: ", a.pem_user, s.target()));
    }
    Ok(s)
}

pub fn resolve_prepare(
    a: &PrepareServerArgs,
) -> Result<(ConnectSettings, prepare::Options), Error> {
    let pgbouncer_from: hba::Source = a.pgbouncer_address.parse()?;
    let opts = prepare::Options {
        auth_user: a.auth_user.clone(),
        admin_user: a.admin_user.clone(),
        install_schema: a.install_schema,
        pg_hba: a.pg_hba.clone(),
        pgbouncer_from,
        reset_passwords: a.reset_passwords,
    };
    Ok((resolve_server(&a.server)?, opts))
}

pub fn resolve_configure(a: &ConfigureArgs) -> Result<bouncer::Settings, Error> {
    let owner = match &a.owner {
        Some(name) => Owner::lookup(name)?,
        None if nix::unistd::Uid::effective().is_root() => Owner::lookup("postgres")?,
        None => Owner::current(),
    };
    Ok(bouncer::Settings {
        config_dir: a.config_dir.clone(),
        owner,
        pem_db_host: a.pem_db_host.clone(),
        pem_db_port: a.pem_db_port,
        pem_db_name: a.pem_db_name.clone(),
        auth_user: a.auth_user.clone(),
        admin_user: a.admin_user.clone(),
        pool_size: a.pool_size,
        fallback_pool_size: a.fallback_pool_size,
        listen_addr: a.listen_addr.clone(),
        listen_port: a.listen_port,
        unix_socket_dir: a.unix_socket_dir.clone(),
        client_tls_sslmode: a.client_tls_sslmode.clone(),
        client_tls_ca_file: a.client_tls_ca_file.clone(),
        client_tls_key_file: a.client_tls_key_file.clone(),
        client_tls_cert_file: a.client_tls_cert_file.clone(),
        auth_query: a.auth_query.clone(),
        max_client_conn: a.max_client_conn,
        server_idle_timeout: a.server_idle_timeout,
        server_reset_query: a.server_reset_query.clone(),
        logfile: a.logfile.clone(),
        pidfile: a.pidfile.clone(),
        agent_users: a.agent_users.clone(),
        agent_networks: a.agent_networks.clone(),
        admin_networks: a.admin_networks.clone(),
        force: a.force,
        pgbouncer_bin: a.pgbouncer_bin.clone(),
    })
}
