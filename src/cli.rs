//! The command line. Raw arguments are parsed by clap, then resolved into checked settings
//! (`resolve_*`) before any work starts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::Error;
use crate::connection::{ConnectSettings, SslMode, TlsChoice};
use crate::fsutil::Owner;
use crate::pooler::{bouncer, hba, prepare};
use crate::registration::{self, migrate};

#[derive(Debug, Parser)]
#[command(
    name = "pemworker",
    version,
    about = "PEM agent worker for PEM servers reached through pgBouncer",
    after_help = "Exit codes: 0 success, 1 bad input or configuration, 2 cannot connect or \
                  authenticate, 3 agent inactive, 4 the PEM server refused, 5 local file error."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// PEM's own command line: `pemworker --register-agent ...` and friends.
#[derive(Debug, Args)]
#[group(skip)]
#[command(group = clap::ArgGroup::new("mode").multiple(false))]
pub struct AgentArgs {
    /// Register this agent on the PEM server (usually through pgBouncer).
    #[arg(long = "register-agent", group = "mode", help_heading = "Modes")]
    pub register_agent: bool,
    /// Mark this agent inactive on the PEM server and set its agent.cfg aside.
    #[arg(long = "unregister-agent", group = "mode", help_heading = "Modes")]
    pub unregister_agent: bool,
    /// Log in as the agent and check it is registered and active (exit 0, 1, 2 or 3).
    #[arg(long = "verify-registration", group = "mode", help_heading = "Modes")]
    pub verify_registration: bool,
    /// Move an existing agent onto pgBouncer, keeping its agent id (guide section 4.2).
    #[arg(long = "migrate-to-pooler", group = "mode", help_heading = "Modes")]
    pub migrate_to_pooler: bool,

    /// PEM server (or pgBouncer) host.
    #[arg(long = "pem-server", value_name = "HOST")]
    pub pem_server: Option<String>,
    /// PEM server (or pgBouncer) port [default: 5432].
    #[arg(long = "pem-port", value_name = "PORT")]
    pub pem_port: Option<u16>,
    /// sslmode towards the PEM server (libpq's names) [default: verify-full; PEM's is require].
    #[arg(long = "pem-ssl-mode", value_name = "MODE")]
    pub pem_ssl_mode: Option<String>,
    /// Root certificate that must have signed the PEM server's (or pgBouncer's) certificate
    /// [default: PGSSLROOTCERT, else ~/.postgresql/root.crt].
    #[arg(long = "pem-ssl-root-cert", value_name = "FILE")]
    pub pem_ssl_root_cert: Option<PathBuf>,
    /// PEM admin user that registers the agent (with an enrolment token: the enrolment login,
    /// default pem_enrolment).
    #[arg(long = "pem-user", value_name = "USER")]
    pub pem_user: Option<String>,
    /// Register with the enrolment token in this file (mode 0600) instead of the admin's
    /// password; or set PEMWORKER_ENROLMENT_TOKEN. Never on the command line.
    #[arg(long = "enrolment-token-file", value_name = "FILE")]
    pub enrolment_token_file: Option<PathBuf>,
    /// Common agent user to log in as (through pgBouncer); default: a dedicated agent<ID>.
    #[arg(long = "pem-agent-user", value_name = "USER")]
    pub pem_agent_user: Option<String>,
    /// Name shown in PEM [default: the host's FQDN].
    #[arg(long = "display-name", value_name = "NAME")]
    pub display_name: Option<String>,
    /// Directory of the agent's key and certificate [default: ~/.pem].
    #[arg(long = "cert-path", value_name = "DIR")]
    pub cert_path: Option<PathBuf>,
    /// Directory of agent.cfg [default: <binary directory>/../etc].
    #[arg(long = "config-dir", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Replace an existing registration on this host (keeping its agent id; backups kept).
    #[arg(long = "force-registration")]
    pub force_registration: bool,
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    #[arg(long, value_name = "TEAM")]
    pub team: Option<String>,
    #[arg(long, value_name = "OWNER")]
    pub owner: Option<String>,
    /// Use a dedicated connection for heartbeats.
    #[arg(long = "enable-heartbeat-connection")]
    pub enable_heartbeat_connection: bool,
    /// Allow PEM to restart monitored servers through this agent.
    #[arg(long = "allow_server_restart")]
    pub allow_server_restart: bool,
    /// Allow batch probes (scripts) on this host.
    #[arg(long = "allow-batch-probes")]
    pub allow_batch_probes: bool,
    /// OS user batch probes run as.
    #[arg(long = "batch-script-user", value_name = "USER")]
    pub batch_script_user: Option<String>,
    /// Extra agent.cfg setting (repeatable).
    #[arg(short = 'o', value_name = "KEY=VALUE")]
    pub options: Vec<String>,
    /// The worker's agent.cfg [default: agent.cfg in the config directory].
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Stay in the foreground and log to stderr too (for systemd and terminals).
    #[arg(short = 'f', long = "foreground")]
    pub foreground: bool,
    /// Record a monitored server on the PEM server and bind it to this agent.
    #[arg(long = "register-server", group = "mode", help_heading = "Modes")]
    pub register_server: bool,
    /// Unbind a monitored server (--asb-host-name and --server-port) from this agent.
    #[arg(long = "unregister-server", group = "mode", help_heading = "Modes")]
    pub unregister_server: bool,
    /// Enable a probe for this agent or one of its servers (with --probe-interval: and set it).
    #[arg(long = "enable-probe", group = "mode", help_heading = "Modes")]
    pub enable_probe: bool,
    /// Disable a probe for this agent or one of its servers.
    #[arg(long = "disable-probe", group = "mode", help_heading = "Modes")]
    pub disable_probe: bool,
    /// Change a probe's interval without enabling or disabling it.
    #[arg(
        long = "set-probe-interval",
        group = "mode",
        help_heading = "Modes",
        value_name = "SECONDS"
    )]
    pub set_probe_interval: Option<u32>,

    /// Monitored server: address recorded on the PEM server.
    #[arg(
        long = "server-addr",
        value_name = "HOST",
        help_heading = "Monitored servers"
    )]
    pub server_addr: Option<String>,
    #[arg(
        long = "server-port",
        value_name = "PORT",
        help_heading = "Monitored servers"
    )]
    pub server_port: Option<u16>,
    #[arg(
        long = "server-database",
        value_name = "DB",
        help_heading = "Monitored servers"
    )]
    pub server_database: Option<String>,
    /// Monitored server user (a pg_monitor member). Password: PEM_MONITORED_SERVER_PASSWORD,
    /// ~/.pgpass or a prompt; kept only in the agent user's ~/.pgpass.
    #[arg(
        long = "server-user",
        value_name = "USER",
        help_heading = "Monitored servers"
    )]
    pub server_user: Option<String>,
    #[arg(
        long = "server-service-name",
        value_name = "NAME",
        help_heading = "Monitored servers"
    )]
    pub server_service_name: Option<String>,
    /// How this agent reaches the server, when not as recorded (host or socket directory).
    #[arg(
        long = "asb-host-name",
        value_name = "HOST",
        help_heading = "Monitored servers"
    )]
    pub asb_host_name: Option<String>,
    #[arg(
        long = "asb-host-port",
        value_name = "PORT",
        help_heading = "Monitored servers"
    )]
    pub asb_host_port: Option<u16>,
    #[arg(
        long = "asb-host-db",
        value_name = "DB",
        help_heading = "Monitored servers"
    )]
    pub asb_host_db: Option<String>,
    #[arg(
        long = "asb-host-user",
        value_name = "USER",
        help_heading = "Monitored servers"
    )]
    pub asb_host_user: Option<String>,
    /// libpq sslmode for the agent's connection [default: prefer]. Never taken from
    /// PGSSLMODE, which is the PEM server's.
    #[arg(
        long = "asb-ssl-mode",
        value_name = "MODE",
        help_heading = "Monitored servers"
    )]
    pub asb_ssl_mode: Option<String>,
    /// Root certificate that signed the monitored server's certificate (for verify-ca,
    /// verify-full, or require with the chain checked). Never taken from PGSSLROOTCERT or
    /// ~/.postgresql/root.crt, which are the PEM server's.
    #[arg(
        long = "asb-ssl-root-cert",
        value_name = "FILE",
        help_heading = "Monitored servers"
    )]
    pub asb_ssl_root_cert: Option<PathBuf>,
    #[arg(
        long = "remote-monitoring",
        value_name = "yes|no",
        help_heading = "Monitored servers"
    )]
    pub remote_monitoring: Option<String>,
    #[arg(
        long = "probe-internal-name",
        value_name = "NAME",
        help_heading = "Probes"
    )]
    pub probe_internal_name: Option<String>,
    #[arg(
        long = "probe-display-name",
        value_name = "NAME",
        help_heading = "Probes"
    )]
    pub probe_display_name: Option<String>,
    #[arg(long = "probe-id", value_name = "ID", help_heading = "Probes")]
    pub probe_id: Option<i32>,
    /// With --enable-probe / --disable-probe: also set the interval.
    #[arg(
        long = "probe-interval",
        value_name = "SECONDS",
        help_heading = "Probes"
    )]
    pub probe_interval: Option<u32>,

    /// Check agent.cfg and print "config valid" or every problem found.
    #[arg(long = "check-config", group = "mode", help_heading = "Modes")]
    pub check_config: bool,
    /// With --migrate-to-pooler: reuse this certificate for the agent user.
    #[arg(
        long = "agent-ssl-crt",
        value_name = "FILE",
        requires = "agent_ssl_key"
    )]
    pub agent_ssl_crt: Option<PathBuf>,
    /// With --migrate-to-pooler: reuse this key for the agent user.
    #[arg(
        long = "agent-ssl-key",
        value_name = "FILE",
        requires = "agent_ssl_crt"
    )]
    pub agent_ssl_key: Option<PathBuf>,
    /// With --migrate-to-pooler: once the agent logs in through the pooler, drop the dedicated
    /// agent<ID> role it logged in as before and remove that role's key and certificate here.
    #[arg(long = "retire-dedicated-role", requires = "migrate_to_pooler")]
    pub retire_dedicated_role: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The pooled side: prepare the PEM server and configure pgBouncer (guide chapters 3-4).
    #[command(subcommand)]
    Pooler(PoolerCommand),
    /// A throwaway PEM server + pgBouncer + registered agent on this machine, with a live view.
    Sandbox(SandboxArgs),
    /// The worker's spool: samples waiting for delivery and samples the PEM server refused.
    #[command(subcommand)]
    Spool(SpoolCommand),
}

#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// Show the samples waiting for delivery and the samples the PEM server refused.
    Status(SpoolArgs),
    /// Send refused samples to the PEM server again, now (all, or the numbers given).
    Replay(SpoolSelectArgs),
    /// Delete refused samples for good (--all, or the numbers given).
    Discard(SpoolSelectArgs),
}

#[derive(Debug, Args)]
pub struct SpoolArgs {
    /// The agent's agent.cfg [default: agent.cfg in the config directory].
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// agent.cfg setting for this run (repeatable), as for the worker.
    #[arg(short = 'o', value_name = "KEY=VALUE")]
    pub options: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SpoolSelectArgs {
    #[command(flatten)]
    pub spool: SpoolArgs,
    /// Every refused sample.
    #[arg(long, conflicts_with = "numbers")]
    pub all: bool,
    /// Numbers of refused samples, as `pemworker spool status` lists them.
    #[arg(value_name = "NUMBER")]
    pub numbers: Vec<u64>,
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Leave everything running and print how to connect and how to stop it.
    #[arg(long)]
    pub keep: bool,
    /// pgBouncer's port (another free one if it is taken).
    #[arg(long, default_value_t = 6432, value_name = "PORT")]
    pub pgbouncer_port: u16,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum PoolerCommand {
    /// Prepare the PEM server for pgBouncer: roles, grants, schema, pg_hba.conf lines.
    PrepareServer(Box<PrepareServerArgs>),
    /// Create a common agent user that agents log in as through pgBouncer.
    CreateProxyUser(Box<CreateProxyUserArgs>),
    /// Write pgbouncer.ini, its HBA file and user list.
    Configure(Box<ConfigureArgs>),
    /// Registration tokens: agent hosts enrol with one instead of the admin's password.
    #[command(subcommand, name = "enrolment-token")]
    EnrolmentToken(TokenCommand),
    /// Inspect the PEM server, pgBouncer's files and a certificate login through pgBouncer;
    /// print each problem with its fix; exit 1 if any is left. --fix repairs what is safe.
    Check(CheckArgs),
    /// Issue pgBouncer's TLS server certificate and key from the PEM CA (run on the PEM
    /// server's host), with the names agents dial it by.
    ServerCertificate(Box<ServerCertificateArgs>),
    /// Bind a pgBouncer to this agent, so that its pgBouncer probes run (as the statistics
    /// console user, whose password is kept only in this host's ~/.pgpass).
    Bind(Box<BindArgs>),
    /// Unbind a pgBouncer from this agent (and forget its console password here).
    Unbind(Box<UnbindArgs>),
}

#[derive(Debug, Args)]
pub struct ServerCertificateArgs {
    /// The PEM server's data directory, which holds the PEM CA (ca_certificate.crt, ca_key.key).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// A host name agents dial pgBouncer by (repeatable).
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// An address agents dial pgBouncer by (repeatable).
    #[arg(long = "ip-address", value_name = "ADDRESS")]
    pub ip_addresses: Vec<std::net::IpAddr>,
    /// Where the certificate goes (pgbouncer.ini's client_tls_cert_file).
    #[arg(long, default_value = "/etc/pgbouncer/server.crt", value_name = "FILE")]
    pub cert_file: PathBuf,
    /// Where the key goes (client_tls_key_file), mode 0600.
    #[arg(long, default_value = "/etc/pgbouncer/server.key", value_name = "FILE")]
    pub key_file: PathBuf,
    /// Operating-system user pgBouncer runs as; owns both files. Default: postgres when run as
    /// root, else the current user.
    #[arg(long, value_name = "USER")]
    pub owner: Option<String>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365, value_name = "DAYS")]
    pub days: u32,
    /// Replace existing files (each is backed up first).
    #[arg(long)]
    pub force: bool,
}

/// The agent whose bindings change (its agent.cfg) and the PEM admin who changes them.
#[derive(Debug, Args)]
pub struct AgentAdminArgs {
    /// The PEM admin. Password: PEM_SERVER_PASSWORD, PGPASSWORD, ~/.pgpass or a prompt.
    #[arg(long = "pem-user", value_name = "USER")]
    pub pem_user: String,
    /// PEM server (or pgBouncer) host [default: agent.cfg's pem_host].
    #[arg(long = "pem-server", value_name = "HOST")]
    pub pem_server: Option<String>,
    /// [default: agent.cfg's pem_port]
    #[arg(long = "pem-port", value_name = "PORT")]
    pub pem_port: Option<u16>,
    /// sslmode towards the PEM server [default: agent.cfg's pem_ssl_mode].
    #[arg(long = "pem-ssl-mode", value_name = "MODE")]
    pub pem_ssl_mode: Option<String>,
    /// [default: agent.cfg's pem_ssl_root_cert]
    #[arg(long = "pem-ssl-root-cert", value_name = "FILE")]
    pub pem_ssl_root_cert: Option<PathBuf>,
    /// Directory of agent.cfg [default: <binary directory>/../etc].
    #[arg(long = "config-dir", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BindArgs {
    /// pgBouncer's host name or address, as this agent reaches it.
    #[arg(long = "pgbouncer-host", value_name = "HOST")]
    pub pgbouncer_host: String,
    #[arg(long = "pgbouncer-port", value_name = "PORT", default_value_t = 6432)]
    pub pgbouncer_port: u16,
    /// pgBouncer's statistics console user (stats_users). Password:
    /// PEMWORKER_STATS_USER_PASSWORD, ~/.pgpass or a prompt; kept only in ~/.pgpass (0600).
    #[arg(
        long = "stats-user",
        value_name = "USER",
        default_value = "pgbouncer_stats"
    )]
    pub stats_user: String,
    /// sslmode towards pgBouncer's console.
    #[arg(
        long = "pgbouncer-ssl-mode",
        value_name = "MODE",
        default_value = "verify-full"
    )]
    pub ssl_mode: String,
    /// Root certificate that signed pgBouncer's certificate [default: agent.cfg's
    /// pem_ssl_root_cert: the PEM CA, which issues the certificate of the pgBouncer in front
    /// of the PEM server].
    #[arg(long = "pgbouncer-ssl-root-cert", value_name = "FILE")]
    pub ssl_root_cert: Option<PathBuf>,
    #[command(flatten)]
    pub agent: AgentAdminArgs,
    /// Update an existing binding.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct UnbindArgs {
    #[arg(long = "pgbouncer-host", value_name = "HOST")]
    pub pgbouncer_host: String,
    #[arg(long = "pgbouncer-port", value_name = "PORT", default_value_t = 6432)]
    pub pgbouncer_port: u16,
    #[command(flatten)]
    pub agent: AgentAdminArgs,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (once: the server keeps only its hash).
    Create(TokenCreateArgs),
    /// List the tokens with their state and the agents they enrolled.
    List(TokenServerArgs),
    /// Revoke a token so it enrols nothing more.
    Revoke(TokenRevokeArgs),
}

/// The PEM admin's session (the same flags as the other admin commands).
#[derive(Debug, Args)]
pub struct TokenServerArgs {
    #[command(flatten)]
    pub server: PemServerArgs,
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub server: PemServerArgs,
    /// How long the token is valid: 90s, 15m, 1h, 7d (at most 30d).
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub ttl: String,
    /// How many agents it may enrol.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub uses: u32,
    /// The only agent user its agents may log in as (created if missing) [default: each
    /// agent gets its own agent<ID> role].
    #[arg(long = "agent-user", value_name = "USER")]
    pub agent_user: Option<String>,
    /// The PEM group its agents are put in.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// The PEM team its agents are put in.
    #[arg(long, value_name = "TEAM")]
    pub team: Option<String>,
    /// Write the token to this new file (mode 0600) instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    #[command(flatten)]
    pub server: PemServerArgs,
    /// The token's number, as `list` shows it.
    pub id: i32,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A superuser session with the PEM database (as for prepare-server).
    #[command(flatten)]
    pub server: PemServerArgs,
    /// pgBouncer's configuration directory [default: /etc/pgbouncer, if it has a pgbouncer.ini].
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// The server's pg_hba.conf, so that --fix can put pemworker's lines first.
    #[arg(long, value_name = "FILE")]
    pub pg_hba: Option<PathBuf>,
    /// pgBouncer's host, for a certificate login through it [default: --pem-server].
    #[arg(long, value_name = "HOST")]
    pub pgbouncer_host: Option<String>,
    /// pgBouncer's port: try a certificate login through it as a pooled agent user.
    #[arg(long, value_name = "PORT")]
    pub pgbouncer_port: Option<u16>,
    /// Repair what is safe to repair (roles, grants, modes, plain-text passwords, pg_hba.conf
    /// with --pg-hba), then check again.
    #[arg(long)]
    pub fix: bool,
}

/// How to reach the PEM server, with PEM's flag names. The password comes from
/// PEM_SERVER_PASSWORD, PGPASSWORD, ~/.pgpass or a prompt; the server's certificate is verified
/// (verify-full) unless --pem-ssl-mode or PGSSLMODE says otherwise; the other libpq variables
/// keep libpq's meanings.
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
    /// sslmode towards the server (libpq's names) [default: verify-full].
    #[arg(long = "pem-ssl-mode", value_name = "MODE")]
    pub pem_ssl_mode: Option<String>,
    /// Root certificate that must have signed the server's certificate [default: PGSSLROOTCERT,
    /// else ~/.postgresql/root.crt].
    #[arg(long = "pem-ssl-root-cert", value_name = "FILE")]
    pub pem_ssl_root_cert: Option<PathBuf>,
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
    /// Where pgBouncer connects from: `local` (Unix socket, peer authentication, no
    /// passwords) or an address/CIDR (TLS).
    #[arg(long, default_value = "local", value_name = "local|CIDR")]
    pub pgbouncer_address: String,
    /// The operating-system user pgBouncer runs as (with `--pgbouncer-address local`): only it
    /// may log in over the socket as the auth user, the admin and the pooled agent users.
    #[arg(long, default_value = "postgres", value_name = "USER")]
    pub pgbouncer_os_user: String,
    /// Keep CREATEROLE on an admin that has it, as the guide's recipe does. On PostgreSQL 15
    /// and older that makes the admin superuser-equivalent; prefer the default, which removes it.
    #[arg(long)]
    pub keep_guide_createrole: bool,
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
    /// The only admin console user. Password: PEMWORKER_ADMIN_USER_PASSWORD or a prompt.
    #[arg(long, default_value = "pem_admin1", value_name = "USER")]
    pub admin_user: String,
    /// Console user for statistics only (SHOW; no PAUSE, no database login), for the agents'
    /// pgBouncer probes. Password: PEMWORKER_STATS_USER_PASSWORD or a prompt.
    #[arg(long, default_value = "pgbouncer_stats", value_name = "USER")]
    pub stats_user: String,
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
    /// CA of the PEM server's own certificate, when --pem-db-host is a TCP host: pgBouncer
    /// then logs in over TLS and verifies it [default: --client-tls-ca-file].
    #[arg(long, value_name = "FILE")]
    pub server_tls_ca_file: Option<PathBuf>,
    #[arg(long, default_value = "SELECT * FROM pem.get_agent_pool_auth($1)")]
    pub auth_query: String,
    #[arg(long, default_value_t = 500)]
    pub max_client_conn: u32,
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub server_idle_timeout: u32,
    /// Run on a server connection before the next client gets it [default: DISCARD ALL
    /// without DISCARD PLANS, which keeps the server functions' plans; see the README].
    #[arg(long, default_value = crate::pooler::bouncer::RESET_QUERY)]
    pub server_reset_query: String,
    /// Run server_reset_query after every transaction also in transaction pooling (1), so no
    /// session state passes between agents; 0 as pgBouncer's default.
    #[arg(long, default_value_t = 1, value_name = "0|1", value_parser = clap::value_parser!(u8).range(0..=1))]
    pub server_reset_query_always: u8,
    /// Seconds a client may stay idle inside a transaction (0 = no limit).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub idle_transaction_timeout: u32,
    /// Seconds before pgBouncer retries a failed server login (pgBouncer's default: 15).
    #[arg(long, default_value_t = 15, value_name = "SECONDS")]
    pub server_login_retry: u32,
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

/// `--pem-ssl-mode` and `--pem-ssl-root-cert`, checked.
fn tls_flags(mode: &Option<String>, root: &Option<PathBuf>) -> Result<TlsChoice, Error> {
    Ok(TlsChoice {
        mode: mode.as_deref().map(str::parse::<SslMode>).transpose()?,
        root_cert: root.clone(),
    })
}

/// Connection settings for the PEM server from the flags and libpq's environment, with the
/// password from PEM_SERVER_PASSWORD, PGPASSWORD, ~/.pgpass or a prompt (in that order).
pub fn resolve_server(a: &PemServerArgs) -> Result<ConnectSettings, Error> {
    resolve_server_with(a, &TlsChoice::default())
}

/// As [`resolve_server`], with `configured` (an agent.cfg's choice) below the flags.
fn resolve_server_with(
    a: &PemServerArgs,
    configured: &TlsChoice,
) -> Result<ConnectSettings, Error> {
    let mut s = ConnectSettings::from_env(&a.pem_server, a.pem_port, &a.pem_user, &a.pem_database)?;
    s.choose_tls(
        &tls_flags(&a.pem_ssl_mode, &a.pem_ssl_root_cert)?,
        configured,
    )?;
    s.resolve_password(&["PEM_SERVER_PASSWORD", "PGPASSWORD"]);
    // Over the server's Unix socket the superuser usually logs in by peer, with no password to
    // ask for; one the server does ask for comes from the variables or ~/.pgpass above.
    if s.password.is_none() && !s.is_unix_socket() {
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
        pgbouncer_os_user: a.pgbouncer_os_user.clone(),
        reset_passwords: a.reset_passwords,
        keep_guide_createrole: a.keep_guide_createrole,
    };
    Ok((resolve_server(&a.server)?, opts))
}

pub fn resolve_check(a: &CheckArgs) -> Result<crate::pooler::check::Options, Error> {
    let config_dir = a.config_dir.clone().or_else(|| {
        let d = PathBuf::from("/etc/pgbouncer");
        d.join("pgbouncer.ini").is_file().then_some(d)
    });
    let pgbouncer = a.pgbouncer_port.map(|p| {
        (
            a.pgbouncer_host
                .clone()
                .unwrap_or_else(|| a.server.pem_server.clone()),
            p,
        )
    });
    Ok(crate::pooler::check::Options {
        server: resolve_server(&a.server)?,
        config_dir,
        pg_hba: a.pg_hba.clone(),
        pgbouncer,
        fix: a.fix,
    })
}

pub fn resolve_token_create(
    a: &TokenCreateArgs,
) -> Result<(ConnectSettings, crate::pooler::token::CreateOptions), Error> {
    let opts = crate::pooler::token::CreateOptions {
        ttl: crate::pooler::token::parse_ttl(&a.ttl)?,
        uses: a.uses,
        agent_user: a.agent_user.clone(),
        group: a.group.clone(),
        team: a.team.clone(),
        output: a.output.clone(),
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
        stats_user: a.stats_user.clone(),
        pool_size: a.pool_size,
        fallback_pool_size: a.fallback_pool_size,
        listen_addr: a.listen_addr.clone(),
        listen_port: a.listen_port,
        unix_socket_dir: a.unix_socket_dir.clone(),
        client_tls_sslmode: a.client_tls_sslmode.clone(),
        client_tls_ca_file: a.client_tls_ca_file.clone(),
        client_tls_key_file: a.client_tls_key_file.clone(),
        client_tls_cert_file: a.client_tls_cert_file.clone(),
        server_tls_ca_file: a.server_tls_ca_file.clone(),
        auth_query: a.auth_query.clone(),
        max_client_conn: a.max_client_conn,
        server_idle_timeout: a.server_idle_timeout,
        server_reset_query: a.server_reset_query.clone(),
        server_reset_query_always: a.server_reset_query_always == 1,
        idle_transaction_timeout: a.idle_transaction_timeout,
        server_login_retry: a.server_login_retry,
        logfile: a.logfile.clone(),
        pidfile: a.pidfile.clone(),
        agent_users: a.agent_users.clone(),
        agent_networks: a.agent_networks.clone(),
        admin_networks: a.admin_networks.clone(),
        force: a.force,
        pgbouncer_bin: a.pgbouncer_bin.clone(),
    })
}

pub fn resolve_server_certificate(
    a: &ServerCertificateArgs,
) -> Result<crate::pooler::certificate::Options, Error> {
    let owner = match &a.owner {
        Some(name) => Owner::lookup(name)?,
        None if nix::unistd::Uid::effective().is_root() => Owner::lookup("postgres")?,
        None => Owner::current(),
    };
    Ok(crate::pooler::certificate::Options {
        data_dir: a.data_dir.clone(),
        dns_names: a.dns_names.clone(),
        ip_addresses: a.ip_addresses.clone(),
        cert_file: a.cert_file.clone(),
        key_file: a.key_file.clone(),
        owner,
        days: a.days,
        force: a.force,
    })
}

/// The agent's configuration and the PEM admin's session: host, port and TLS from agent.cfg
/// unless the flags say otherwise.
fn agent_admin(a: &AgentAdminArgs) -> Result<(crate::config::AgentConfig, ConnectSettings), Error> {
    let file = a
        .config_dir
        .clone()
        .unwrap_or_else(default_config_dir)
        .join(crate::agentcfg::FILE_NAME);
    let (_, agent) =
        crate::config::AgentConfig::load_with_document(&file).map_err(registration::Error::from)?;
    let admin = resolve_server_with(
        &PemServerArgs {
            pem_server: a
                .pem_server
                .clone()
                .unwrap_or_else(|| agent.pem_host().to_string()),
            pem_port: a.pem_port.unwrap_or(agent.pem_port),
            pem_user: a.pem_user.clone(),
            pem_database: "pem".into(),
            pem_ssl_mode: a.pem_ssl_mode.clone(),
            pem_ssl_root_cert: a.pem_ssl_root_cert.clone(),
        },
        &agent.tls_choice(),
    )?;
    Ok((agent, admin))
}

pub fn resolve_bind(a: &BindArgs) -> Result<crate::monitored::BouncerOptions, Error> {
    let sslmode: SslMode = a.ssl_mode.parse()?;
    let (agent, admin) = agent_admin(&a.agent)?;
    let root = a
        .ssl_root_cert
        .clone()
        .or_else(|| agent.tls_choice().root_cert);
    if sslmode.verifies(false) && root.is_none() {
        return Err(Error::Usage(format!(
            "--pgbouncer-ssl-mode {sslmode} needs --pgbouncer-ssl-root-cert FILE (agent.cfg has no pem_ssl_root_cert to default to)"
        )));
    }
    let console = ConnectSettings::monitored(
        &a.pgbouncer_host,
        a.pgbouncer_port,
        &a.stats_user,
        "pgbouncer",
        sslmode,
        root.as_deref(),
    );
    let pgpass = crate::monitored::pgpass_file();
    let in_pgpass = crate::secret::from_pgpass(
        &pgpass,
        &console.host,
        console.port,
        &console.dbname,
        &console.user,
    )
    .is_some();
    let password =
        crate::secret::from_env(&[crate::pooler::STATS_USER_PASSWORD_ENV]).or_else(|| {
            (!in_pgpass)
                .then(|| {
                    crate::secret::prompt(&format!(
                        "Password of pgBouncer's console user {}@{}: ",
                        console.user,
                        console.target()
                    ))
                })
                .flatten()
        });
    let mut console = console;
    if password.is_none() {
        console.password = crate::secret::from_pgpass(
            &pgpass,
            &console.host,
            console.port,
            &console.dbname,
            &console.user,
        );
    }
    Ok(crate::monitored::BouncerOptions {
        targets_file: crate::targets::file_for(&agent.path),
        admin,
        agent,
        console,
        force: a.force,
        password,
        pgpass,
    })
}

pub fn resolve_unbind(
    a: &UnbindArgs,
) -> Result<(crate::config::AgentConfig, ConnectSettings), Error> {
    agent_admin(&a.agent)
}

fn missing(flag: &str, why: &str) -> Error {
    Error::Usage(format!("missing {flag}: {why}"))
}

/// agent.cfg's directory: `--config-dir`, else `<binary directory>/../etc` as PEM installs it.
pub fn config_dir(a: &AgentArgs) -> PathBuf {
    a.config_dir.clone().unwrap_or_else(default_config_dir)
}

/// `<binary directory>/../etc`, PEM's place for agent.cfg.
fn default_config_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(|d| d.parent()).map(|d| d.join("etc")))
        .unwrap_or_else(|| PathBuf::from("/usr/edb/pem/agent/etc"))
}

fn cert_path(a: &AgentArgs) -> PathBuf {
    a.cert_path.clone().unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"))
            .join(".pem")
    })
}

/// The host's fully qualified name, as `hostname -f` finds it (the canonical name the
/// resolver gives for the host name), else the plain host name. Asked in-process: starting
/// `hostname` cost a registration 6 to 11 ms.
pub fn host_fqdn() -> String {
    let Ok(name) = nix::unistd::gethostname() else {
        return "localhost".to_string();
    };
    let name = name.to_string_lossy().into_owned();
    let hints = dns_lookup::AddrInfoHints {
        flags: nix::libc::AI_CANONNAME,
        ..Default::default()
    };
    dns_lookup::getaddrinfo(Some(&name), None, Some(hints))
        .ok()
        .and_then(|mut found| found.next()?.ok()?.canonname)
        .filter(|c| !c.is_empty())
        .unwrap_or(if name.is_empty() {
            "localhost".to_string()
        } else {
            name
        })
}

fn admin_settings(
    a: &AgentArgs,
    host: &str,
    port: u16,
    configured: &TlsChoice,
) -> Result<ConnectSettings, Error> {
    let user = a.pem_user.as_deref().ok_or_else(|| {
        missing(
            "--pem-user",
            "the PEM admin user that registers agents, for example --pem-user pem_admin1",
        )
    })?;
    resolve_server_with(
        &PemServerArgs {
            pem_server: host.to_string(),
            pem_port: port,
            pem_user: user.to_string(),
            pem_database: "pem".into(),
            pem_ssl_mode: a.pem_ssl_mode.clone(),
            pem_ssl_root_cert: a.pem_ssl_root_cert.clone(),
        },
        configured,
    )
}

fn server_host(a: &AgentArgs) -> Result<String, Error> {
    a.pem_server.clone().ok_or_else(|| {
        missing(
            "--pem-server",
            "the PEM server or pgBouncer host, for example --pem-server pem.example",
        )
    })
}

/// Environment variable that may hold an enrolment token.
pub const ENROLMENT_TOKEN_ENV: &str = "PEMWORKER_ENROLMENT_TOKEN";

/// The login that enrols agents with a token; it holds no credential of its own.
pub const ENROLMENT_USER: &str = "pem_enrolment";

/// The enrolment token, from `--enrolment-token-file` (which others must not be able to read)
/// or the environment; `None` when neither is given.
fn enrolment_token(a: &AgentArgs) -> Result<Option<crate::secret::Secret>, Error> {
    let text = match &a.enrolment_token_file {
        Some(file) => {
            use std::os::unix::fs::PermissionsExt;
            let read = |e: std::io::Error| {
                Error::Usage(format!(
                    "cannot read the enrolment token file {}: {e}",
                    file.display()
                ))
            };
            let meta = std::fs::metadata(file).map_err(read)?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(Error::Usage(format!(
                    "the enrolment token file {} has group or world access; run chmod 0600 {}",
                    file.display(),
                    file.display()
                )));
            }
            if meta.len() > 4096 {
                return Err(Error::Usage(format!(
                    "{} is not an enrolment token file (larger than 4 kB)",
                    file.display()
                )));
            }
            std::fs::read_to_string(file).map_err(read)?
        }
        None => match crate::secret::from_env(&[ENROLMENT_TOKEN_ENV]) {
            Some(s) => s.expose().to_string(),
            None => return Ok(None),
        },
    };
    let token = text.trim();
    if !crate::pooler::token::well_formed(token) {
        return Err(Error::Usage(format!(
            "malformed enrolment token: expected {} and 64 hexadecimal digits, as pemworker pooler enrolment-token create prints it",
            crate::pooler::token::PREFIX
        )));
    }
    Ok(Some(crate::secret::Secret::new(token)))
}

pub fn resolve_register(a: &AgentArgs) -> Result<registration::Options, Error> {
    // Checked first, and all before a password prompt or any connection.
    let host = server_host(a)?;
    let token = enrolment_token(a)?;
    if a.pem_user.is_none() && token.is_none() {
        return Err(missing(
            "--pem-user",
            "the PEM admin user that registers agents, for example --pem-user pem_admin1 (or enrol with --enrolment-token-file)",
        ));
    }
    if let Some(u) = &a.pem_agent_user {
        registration::check_agent_user(u)?;
    }
    let overrides = a
        .options
        .iter()
        .map(|o| registration::parse_override(o))
        .collect::<Result<Vec<_>, _>>()?;
    let port = a.pem_port.unwrap_or(5432);
    let server = match &token {
        // The enrolment login has no password; the token goes only to a verified server.
        Some(_) => {
            let user = a.pem_user.as_deref().unwrap_or(ENROLMENT_USER);
            let mut s = ConnectSettings::from_env(&host, port, user, "pem")?;
            s.choose_tls(
                &tls_flags(&a.pem_ssl_mode, &a.pem_ssl_root_cert)?,
                &TlsChoice::default(),
            )?;
            let verified = matches!(s.sslmode, SslMode::VerifyCa | SslMode::VerifyFull);
            if !verified || s.root_cert.is_none() {
                return Err(Error::Usage(
                    "an enrolment token is sent only to a server whose certificate is verified: give the PEM server's root certificate with --pem-ssl-root-cert (or PGSSLROOTCERT) and keep --pem-ssl-mode verify-full (the default) or verify-ca".into(),
                ));
            }
            s
        }
        None => admin_settings(a, &host, port, &TlsChoice::default())?,
    };
    let host_name = host_fqdn();
    Ok(registration::Options {
        server,
        token,
        agent_user: a.pem_agent_user.clone(),
        display_name: a.display_name.clone().unwrap_or_else(|| host_name.clone()),
        host_name,
        cert_path: cert_path(a),
        config_dir: config_dir(a),
        force: a.force_registration,
        group: a.group.clone(),
        team: a.team.clone(),
        owner: a.owner.clone(),
        heartbeat_connection: a.enable_heartbeat_connection,
        allow_server_restart: a.allow_server_restart.then_some(true),
        allow_batch_probes: a.allow_batch_probes,
        batch_script_user: a.batch_script_user.clone(),
        overrides,
    })
}

pub fn resolve_unregister(a: &AgentArgs) -> Result<(ConnectSettings, PathBuf), Error> {
    let (id, admin) = agent_and_admin(a)?;
    Ok((admin, id.path))
}

pub fn resolve_migrate(a: &AgentArgs) -> Result<migrate::Options, Error> {
    let file = config_dir(a).join(crate::agentcfg::FILE_NAME);
    let port = a.pem_port.ok_or_else(|| {
        missing(
            "--pem-port",
            "the pgBouncer port to move the agent to, for example --pem-port 6432",
        )
    })?;
    let agent_user = a.pem_agent_user.clone().ok_or_else(|| {
        missing(
            "--pem-agent-user",
            "the common agent user to log in as, for example --pem-agent-user pem_agent_user1",
        )
    })?;
    registration::check_agent_user(&agent_user)?;
    let reuse = a.agent_ssl_crt.clone().zip(a.agent_ssl_key.clone());
    let admin = match (&reuse, &a.pem_user) {
        (Some(_), None) => None,
        (_, Some(_)) => {
            let host = match &a.pem_server {
                Some(h) => h.clone(),
                None => crate::config::AgentConfig::load_with_document(&file)
                    .map_err(registration::Error::from)?
                    .1
                    .pem_host()
                    .to_string(),
            };
            let configured = crate::config::AgentConfig::load_with_document(&file)
                .map(|(_, c)| c.tls_choice())
                .unwrap_or_default();
            Some(admin_settings(a, &host, port, &configured)?)
        }
        (None, None) => {
            return Err(missing(
                "--pem-user",
                "a PEM admin to sign the agent user's certificate, or reuse files with --agent-ssl-crt and --agent-ssl-key",
            ));
        }
    };
    Ok(migrate::Options {
        config_file: file,
        pem_host: a.pem_server.clone(),
        pooler_port: port,
        agent_user,
        cert_path: cert_path(a),
        admin,
        reuse,
        force: a.force_registration,
        tls: tls_flags(&a.pem_ssl_mode, &a.pem_ssl_root_cert)?,
        retire_dedicated_role: a.retire_dedicated_role,
    })
}

/// The worker's agent.cfg and its `-o key=value` overrides.
pub fn resolve_worker(a: &AgentArgs) -> Result<(PathBuf, Vec<(String, String)>), Error> {
    let path = a
        .config
        .clone()
        .unwrap_or_else(|| config_dir(a).join(crate::agentcfg::FILE_NAME));
    Ok((path, overrides(&a.options)?))
}

/// agent.cfg and its `-o` overrides for `pemworker spool ...`.
pub fn resolve_spool(a: &SpoolArgs) -> Result<(PathBuf, Vec<(String, String)>), Error> {
    let path = a
        .config
        .clone()
        .unwrap_or_else(|| default_config_dir().join(crate::agentcfg::FILE_NAME));
    Ok((path, overrides(&a.options)?))
}

fn overrides(options: &[String]) -> Result<Vec<(String, String)>, Error> {
    options
        .iter()
        .map(|o| match o.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(Error::Usage(format!(
                "invalid -o option {o:?}: expected key=value, for example -o log_level=info"
            ))),
        })
        .collect()
}

/// This agent's identity (agent.cfg) and the PEM admin's session: host and port from agent.cfg
/// unless --pem-server / --pem-port say otherwise.
fn agent_and_admin(a: &AgentArgs) -> Result<(crate::config::AgentConfig, ConnectSettings), Error> {
    if a.pem_user.is_none() {
        return Err(missing(
            "--pem-user",
            "the PEM admin user, for example --pem-user pem_admin1",
        ));
    }
    let file = config_dir(a).join(crate::agentcfg::FILE_NAME);
    let (_, id) =
        crate::config::AgentConfig::load_with_document(&file).map_err(registration::Error::from)?;
    let host = a
        .pem_server
        .clone()
        .unwrap_or_else(|| id.pem_host().to_string());
    let port = a.pem_port.unwrap_or(id.pem_port);
    let admin = admin_settings(a, &host, port, &id.tls_choice())?;
    Ok((id, admin))
}

pub fn resolve_register_server(a: &AgentArgs) -> Result<crate::monitored::ServerOptions, Error> {
    use crate::monitored::{Binding, ServerOptions};
    let server_addr = a.server_addr.clone().ok_or_else(|| {
        missing(
            "--server-addr",
            "the monitored server's address, for example --server-addr db1.example",
        )
    })?;
    let server_port = a.server_port.ok_or_else(|| {
        missing(
            "--server-port",
            "the monitored server's port, for example --server-port 5432",
        )
    })?;
    let server_user = a.server_user.clone().ok_or_else(|| {
        missing(
            "--server-user",
            "a pg_monitor member on the monitored server, for example --server-user monitor",
        )
    })?;
    let server_database = a
        .server_database
        .clone()
        .unwrap_or_else(|| "postgres".into());
    let sslmode = a
        .asb_ssl_mode
        .as_deref()
        .unwrap_or("prefer")
        .parse::<crate::connection::SslMode>()?;
    if sslmode.verifies(false) && a.asb_ssl_root_cert.is_none() {
        return Err(Error::Usage(format!(
            "--asb-ssl-mode {sslmode} needs --asb-ssl-root-cert FILE, the root certificate that signed the monitored server's certificate (the PEM server's PGSSLROOTCERT is not used for it)"
        )));
    }
    if let Some(root) = &a.asb_ssl_root_cert {
        if let Err(e) = std::fs::metadata(root) {
            return Err(Error::Usage(format!(
                "cannot read --asb-ssl-root-cert {}: {e}",
                root.display()
            )));
        }
    }
    let remote_monitoring = match a.remote_monitoring.as_deref() {
        None | Some("no") => false,
        Some("yes") => true,
        Some(other) => {
            return Err(Error::Usage(format!(
                "invalid --remote-monitoring {other:?}: use yes or no"
            )));
        }
    };
    let binding = Binding {
        host: a
            .asb_host_name
            .clone()
            .unwrap_or_else(|| server_addr.clone()),
        port: a.asb_host_port.unwrap_or(server_port),
        database: a
            .asb_host_db
            .clone()
            .unwrap_or_else(|| server_database.clone()),
        user: a
            .asb_host_user
            .clone()
            .unwrap_or_else(|| server_user.clone()),
        sslmode,
        root_cert: a
            .asb_ssl_root_cert
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
    };
    let (agent, admin) = agent_and_admin(a)?;
    let targets_file = crate::targets::file_for(&agent.path);
    let pgpass = crate::monitored::pgpass_file();
    let in_pgpass = crate::secret::from_pgpass(
        &pgpass,
        &binding.host,
        binding.port,
        &binding.database,
        &binding.user,
    )
    .is_some();
    let password = crate::secret::from_env(&["PEM_MONITORED_SERVER_PASSWORD"]).or_else(|| {
        (!in_pgpass)
            .then(|| {
                crate::secret::prompt(&format!(
                    "Password for {}@{}:{}: ",
                    binding.user, binding.host, binding.port
                ))
            })
            .flatten()
    });
    Ok(ServerOptions {
        admin,
        agent,
        display_name: a
            .display_name
            .clone()
            .unwrap_or_else(|| format!("{server_addr}:{server_port}")),
        server_addr,
        server_port,
        server_database,
        server_user,
        service_name: a.server_service_name.clone(),
        binding,
        group: a.group.clone(),
        team: a.team.clone(),
        owner: a.owner.clone(),
        remote_monitoring,
        force: a.force_registration,
        password,
        pgpass,
        targets_file,
    })
}

pub fn resolve_unregister_server(
    a: &AgentArgs,
) -> Result<(ConnectSettings, i32, String, u16, PathBuf), Error> {
    let host = a.asb_host_name.clone().ok_or_else(|| {
        missing(
            "--asb-host-name",
            "the host this agent reaches the server at",
        )
    })?;
    let port = a
        .server_port
        .ok_or_else(|| missing("--server-port", "the monitored server's port"))?;
    let (agent, admin) = agent_and_admin(a)?;
    let targets_file = crate::targets::file_for(&agent.path);
    Ok((admin, agent.agent_id, host, port, targets_file))
}

pub fn resolve_probe_change(a: &AgentArgs) -> Result<crate::monitored::ProbeChange, Error> {
    use crate::monitored::ProbeSelector;
    let probe = match (&a.probe_internal_name, &a.probe_display_name, a.probe_id) {
        (Some(n), None, None) => ProbeSelector::InternalName(n.clone()),
        (None, Some(n), None) => ProbeSelector::DisplayName(n.clone()),
        (None, None, Some(i)) => ProbeSelector::Id(i),
        _ => {
            return Err(Error::Usage(
                "name the probe with exactly one of --probe-internal-name, --probe-display-name or --probe-id".into(),
            ));
        }
    };
    let server = match (&a.asb_host_name, a.server_port) {
        (Some(h), Some(p)) => Some((h.clone(), p)),
        (None, None) => None,
        _ => {
            return Err(Error::Usage(
                "give both --asb-host-name and --server-port to name a monitored server".into(),
            ));
        }
    };
    let enabled = if a.enable_probe {
        Some(true)
    } else if a.disable_probe {
        Some(false)
    } else {
        None
    };
    let interval = a.set_probe_interval.or(a.probe_interval);
    let (agent, admin) = agent_and_admin(a)?;
    Ok(crate::monitored::ProbeChange {
        admin,
        agent_id: agent.agent_id,
        probe,
        server,
        enabled,
        interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_name_is_the_one_hostname_f_prints() {
        let Ok(out) = std::process::Command::new("hostname").arg("-f").output() else {
            return; // no hostname(1) here to compare with
        };
        let expected = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !expected.is_empty() {
            assert_eq!(host_fqdn(), expected);
        } else {
            let plain = nix::unistd::gethostname().unwrap();
            assert_eq!(host_fqdn(), plain.to_string_lossy());
        }
    }
}
