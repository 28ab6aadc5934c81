//! The command line. Raw arguments are parsed by clap, then resolved into checked settings
//! (`resolve_*`) before any work starts. PEM's flat command line selects one [`Mode`] (declared
//! once, in [`MODES`]) and takes PEM's flags in PEM's value forms; pemworker's own tools are
//! subcommands ([`Command`]).

use std::path::{Path, PathBuf};

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
#[command(args_conflicts_with_subcommands = true, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// What one run of `pemworker` does. Declared once, in [`MODES`]; the flags, their help, the
/// one-mode-at-a-time rule and the dispatch in `main` all come from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No mode flag: run the worker (`pemworker -c agent.cfg`).
    Worker,
    CheckConfig,
    RegisterAgent,
    UnregisterAgent,
    VerifyRegistration,
    MigrateToPooler,
    RegisterServer,
    UnregisterServer,
    EnableProbe,
    DisableProbe,
    /// `--set-probe-interval SECONDS`.
    SetProbeInterval(u32),
    RegisterBarman,
    UpdateBarman,
    UnregisterBarman,
}

/// Every mode flag: the mode, its long name and its help line.
pub const MODES: &[(Mode, &str, &str)] = &[
    (
        Mode::RegisterAgent,
        "register-agent",
        "Register this agent on the PEM server (usually through pgBouncer).",
    ),
    (
        Mode::UnregisterAgent,
        "unregister-agent",
        "Mark this agent inactive on the PEM server and set its agent.cfg aside.",
    ),
    (
        Mode::VerifyRegistration,
        "verify-registration",
        "Log in as the agent and check it is registered and active (exit 0, 1 config, 2 connection, 3 inactive).",
    ),
    (
        Mode::MigrateToPooler,
        "migrate-to-pooler",
        "Move an existing agent onto pgBouncer, keeping its agent id (guide section 4.2).",
    ),
    (
        Mode::RegisterServer,
        "register-server",
        "Record a monitored server on the PEM server and bind it to this agent.",
    ),
    (
        Mode::UnregisterServer,
        "unregister-server",
        "Unbind a monitored server (--asb-host-name, or PEM 7's --server-addr, and --server-port) from this agent.",
    ),
    (
        Mode::EnableProbe,
        "enable-probe",
        "Enable a probe for this agent or one of its servers (with --probe-interval: and set it).",
    ),
    (
        Mode::DisableProbe,
        "disable-probe",
        "Disable a probe for this agent or one of its servers.",
    ),
    (
        Mode::CheckConfig,
        "check-config",
        "Check agent.cfg and print \"config valid\" or every problem found.",
    ),
    (
        Mode::RegisterBarman,
        "register-barman",
        "PEM's Barman (pg-backup-api) registration: accepted, not implemented (exit 1).",
    ),
    (
        Mode::UpdateBarman,
        "update-barman",
        "PEM's Barman update: accepted, not implemented (exit 1).",
    ),
    (
        Mode::UnregisterBarman,
        "unregister-barman",
        "PEM's Barman removal: accepted, not implemented (exit 1).",
    ),
];

const SET_PROBE_INTERVAL: &str = "set-probe-interval";

impl Mode {
    /// The flag that selects this mode, as a user types it.
    pub fn flag(self) -> String {
        match self {
            Mode::Worker => "-c agent.cfg".into(),
            Mode::SetProbeInterval(_) => format!("--{SET_PROBE_INTERVAL}"),
            m => MODES
                .iter()
                .find(|(mode, ..)| *mode == m)
                .map(|(_, long, _)| format!("--{long}"))
                .unwrap_or_default(),
        }
    }
}

impl clap::FromArgMatches for Mode {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        if let Some((mode, ..)) = MODES.iter().find(|(_, long, _)| m.get_flag(long)) {
            return Ok(*mode);
        }
        Ok(match m.get_one::<u32>(SET_PROBE_INTERVAL) {
            Some(s) => Mode::SetProbeInterval(*s),
            None => Mode::Worker,
        })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for Mode {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        use clap::{Arg, ArgAction, ArgGroup};
        let cmd = MODES.iter().fold(cmd, |cmd, (_, long, help)| {
            cmd.arg(
                Arg::new(*long)
                    .long(*long)
                    .action(ArgAction::SetTrue)
                    .help(*help)
                    .help_heading("Modes"),
            )
        });
        let ids = MODES
            .iter()
            .map(|(_, long, _)| *long)
            .chain([SET_PROBE_INTERVAL]);
        cmd.arg(
            Arg::new(SET_PROBE_INTERVAL)
                .long(SET_PROBE_INTERVAL)
                .value_name("SECONDS")
                .value_parser(clap::value_parser!(u32))
                .help("Change a probe's interval without enabling or disabling it.")
                .help_heading("Modes"),
        )
        .group(ArgGroup::new("mode").args(ids).multiple(false))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// PEM's yes/no values, as its documentation and EDB's tooling spell them: `true`/`false`,
/// `yes`/`no`, `on`/`off`, `1`/`0`, in any case. A flag given without a value means true.
pub fn pem_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" | "t" | "y" => Ok(true),
        "false" | "no" | "off" | "0" | "f" | "n" => Ok(false),
        _ => Err(format!("expected true or false (or yes, no), not {s:?}")),
    }
}

/// PEM's log levels (`-l DEBUG1`, `-l WARNING`, any case), onto ours.
pub fn pem_log_level(s: &str) -> Result<crate::config::LogLevel, String> {
    use crate::config::LogLevel;
    match s.trim().to_ascii_lowercase().as_str() {
        "debug3" | "debug4" | "debug5" => Ok(LogLevel::Debug2),
        "notice" | "log" => Ok(LogLevel::Info),
        "fatal" | "panic" | "critical" => Ok(LogLevel::Error),
        other => LogLevel::parse(other).ok_or_else(|| {
            format!("expected ERROR, WARNING, INFO, DEBUG1 or DEBUG2 (any case), not {s:?}")
        }),
    }
}

/// agent.cfg's spelling of a level, for `-l` given to the worker.
fn level_name(l: crate::config::LogLevel) -> &'static str {
    use crate::config::LogLevel;
    match l {
        LogLevel::Error => "error",
        LogLevel::Warning => "warning",
        LogLevel::Info => "info",
        LogLevel::Debug1 => "debug1",
        LogLevel::Debug2 => "debug2",
    }
}

/// PEM's certificate pages print `-o agent_ssl_crt= agent.crt` (a space after `=`), which
/// leaves the file name as a stray argument; this names the fix instead of clap's message.
pub fn spaced_option_value(args: &[std::ffi::OsString]) -> Option<String> {
    args.windows(3).find_map(|w| {
        let (o, kv, next) = (w[0].to_str()?, w[1].to_str()?, w[2].to_str()?);
        (o == "-o" && kv.ends_with('=') && !next.starts_with('-'))
            .then(|| format!("-o {kv} {next}: remove the space after =, as in -o {kv}{next}"))
    })
}

/// PEM's own command line: `pemworker --register-agent ...` and friends.
#[derive(Debug, Args)]
#[group(skip)]
pub struct AgentArgs {
    #[command(flatten)]
    pub mode: Mode,
    /// The PEM server, its admin and this agent's agent.cfg (shared with `pooler bind`).
    #[command(flatten)]
    pub admin: AgentAdminArgs,

    /// Log level for this run: PEM's ERROR, WARNING, INFO, DEBUG1, DEBUG2 (any case).
    #[arg(short = 'l', long = "log-level", value_name = "LEVEL", value_parser = pem_log_level)]
    pub log_level: Option<crate::config::LogLevel>,
    /// Register with the enrolment token in this file (mode 0600) instead of the admin's
    /// password; or set PEMWORKER_ENROLMENT_TOKEN. Never on the command line.
    #[arg(long = "enrolment-token-file", value_name = "FILE")]
    pub enrolment_token_file: Option<PathBuf>,
    /// PEM 10.4's registration connection (libpq key=value or URI; dbname is always pem); or
    /// set PEM_REGISTRATION_CONN_STRING. Put its password in PEM_SERVER_PASSWORD, not here.
    #[arg(
        long = "pem-registration-conn-string",
        value_name = "CONNINFO",
        env = "PEM_REGISTRATION_CONN_STRING",
        hide_env_values = true
    )]
    pub pem_registration_conn_string: Option<String>,
    /// Common agent user to log in as (through pgBouncer); default: a dedicated agent<ID>.
    #[arg(long = "pem-agent-user", value_name = "USER")]
    pub pem_agent_user: Option<String>,
    /// Name shown in PEM [default: the host's FQDN].
    #[arg(long = "display-name", value_name = "NAME")]
    pub display_name: Option<String>,
    /// Directory of the agent's key and certificate [default: ~/.pem].
    #[arg(long = "cert-path", value_name = "DIR")]
    pub cert_path: Option<PathBuf>,
    /// Replace an existing registration on this host (keeping its agent id; backups kept)
    /// [default: no, as PEM 10].
    #[arg(long = "force-registration", value_name = "yes|no", num_args = 0..=1,
          default_missing_value = "true", value_parser = pem_bool)]
    pub force_registration: Option<bool>,
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Role the agent (or server) is restricted to ("" = none).
    #[arg(long, value_name = "TEAM")]
    pub team: Option<String>,
    /// Owner ("" = the --pem-user).
    #[arg(long, value_name = "OWNER")]
    pub owner: Option<String>,
    /// PEM 10's cluster in the object tree: accepted; this PEM server has no clusters (ignored).
    #[arg(long = "cluster-name", value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// PEM 10.3's agent profile: accepted; profiles are not implemented (ignored).
    #[arg(long = "profile-id", value_name = "ID")]
    pub profile_id: Option<i64>,
    /// PEM 10.3's agent profile by name: accepted; profiles are not implemented (ignored).
    #[arg(long = "profile-name", value_name = "NAME")]
    pub profile_name: Option<String>,
    /// Use a dedicated connection for heartbeats [default: false].
    #[arg(long = "enable-heartbeat-connection", value_name = "true|false", num_args = 0..=1,
          default_missing_value = "true", value_parser = pem_bool)]
    pub enable_heartbeat_connection: Option<bool>,
    /// Allow PEM to restart monitored servers through this agent [default: true, as PEM].
    #[arg(long = "allow_server_restart", alias = "allow-server-restart", value_name = "true|false",
          num_args = 0..=1, default_missing_value = "true", value_parser = pem_bool)]
    pub allow_server_restart: Option<bool>,
    /// Allow batch probes (scripts) on this host [default: false].
    #[arg(long = "allow-batch-probes", alias = "allow_batch_probes", value_name = "true|false",
          num_args = 0..=1, default_missing_value = "true", value_parser = pem_bool)]
    pub allow_batch_probes: Option<bool>,
    /// agent.cfg's enable_smtp [default: false]; this agent sends no e-mail (stored only).
    #[arg(long = "enable-smtp", value_name = "true|false", num_args = 0..=1,
          default_missing_value = "true", value_parser = pem_bool)]
    pub enable_smtp: Option<bool>,
    /// agent.cfg's enable_snmp [default: false]; this agent sends no SNMP traps (stored only).
    #[arg(long = "enable-snmp", value_name = "true|false", num_args = 0..=1,
          default_missing_value = "true", value_parser = pem_bool)]
    pub enable_snmp: Option<bool>,
    /// agent.cfg's enable_webhook [default: false]; this agent calls no webhooks (stored only).
    #[arg(long = "enable-webhook", value_name = "true|false", num_args = 0..=1,
          default_missing_value = "true", value_parser = pem_bool)]
    pub enable_webhook: Option<bool>,
    /// agent.cfg's max_webhook_retries [default: 3] (stored only, as --enable-webhook).
    #[arg(long = "max-webhook-retries", value_name = "N")]
    pub max_webhook_retries: Option<u32>,
    /// OS user batch probes run as.
    #[arg(long = "batch-script-user", value_name = "USER")]
    pub batch_script_user: Option<String>,
    /// agent.cfg setting (repeatable; -okey=value too). With --register-agent: -o agent_id=N
    /// re-registers agent N; -o agent_ssl_crt=F -o agent_ssl_key=F use existing files (signed
    /// by the PEM CA, relative to --config-dir) instead of a new key.
    #[arg(short = 'o', value_name = "KEY=VALUE")]
    pub options: Vec<String>,
    /// Stay in the foreground and log to stderr too (for systemd and terminals).
    #[arg(short = 'f', long = "foreground")]
    pub foreground: bool,

    /// Monitored server: address recorded on the PEM server ("" = the local Unix socket).
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
    /// libpq sslmode for the agent's connection, any case (verify-CA) [default: prefer]. Never
    /// taken from PGSSLMODE, which is the PEM server's.
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
        value_parser = pem_bool,
        help_heading = "Monitored servers"
    )]
    pub remote_monitoring: Option<bool>,
    /// EFM cluster name: stored with the server's record on this host; EFM is not monitored.
    #[arg(
        long = "efm-cluster-name",
        value_name = "NAME",
        help_heading = "Monitored servers"
    )]
    pub efm_cluster_name: Option<String>,
    /// EFM installation directory: stored as --efm-cluster-name; EFM is not monitored.
    #[arg(
        long = "efm-install-path",
        value_name = "DIR",
        help_heading = "Monitored servers"
    )]
    pub efm_install_path: Option<PathBuf>,
    /// PEM 10's cluster manager (efm|patroni): accepted; cluster managers are not monitored.
    #[arg(
        long = "replication-solution",
        value_name = "efm|patroni",
        help_heading = "Monitored servers"
    )]
    pub replication_solution: Option<String>,
    /// Patroni settings (PEM 10.1): accepted; Patroni is not monitored (ignored).
    #[arg(
        long = "patroni-cluster-name",
        value_name = "NAME",
        help_heading = "Monitored servers"
    )]
    pub patroni_cluster_name: Option<String>,
    #[arg(
        long = "patroni-install-path",
        value_name = "DIR",
        help_heading = "Monitored servers"
    )]
    pub patroni_install_path: Option<PathBuf>,
    #[arg(
        long = "patroni-config-path",
        value_name = "FILE",
        help_heading = "Monitored servers"
    )]
    pub patroni_config_path: Option<PathBuf>,
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
    #[arg(long = "retire-dedicated-role", requires = "migrate-to-pooler")]
    pub retire_dedicated_role: bool,

    #[command(flatten)]
    pub barman: BarmanArgs,
}

/// PEM's Barman (pg-backup-api) options, accepted so that its command lines parse; the modes
/// that use them are not implemented.
#[derive(Debug, Args)]
#[command(next_help_heading = "Barman (not implemented)")]
pub struct BarmanArgs {
    #[arg(long = "api-url", value_name = "URL")]
    pub api_url: Option<String>,
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    #[arg(long = "probe-execution-frequency", value_name = "SECONDS")]
    pub probe_execution_frequency: Option<u32>,
    #[arg(long = "heartbeat-interval", value_name = "SECONDS")]
    pub heartbeat_interval: Option<u32>,
    #[arg(long = "ssl-crt", value_name = "FILE")]
    pub ssl_crt: Option<PathBuf>,
    #[arg(long = "ssl-key", value_name = "FILE")]
    pub ssl_key: Option<PathBuf>,
    #[arg(long = "ssl-ca-cert", alias = "ssl-ca-crt", value_name = "FILE")]
    pub ssl_ca_cert: Option<PathBuf>,
    #[arg(long, value_name = "BARMAN_ID")]
    pub id: Option<i32>,
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
    /// Many agents against a throwaway PEM server, through pgBouncer and directly, measured:
    /// backends, pool figures, heartbeat round trips, delivery, CPU, errors; a table, a CSV
    /// and a plot.
    Fleet(FleetArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FleetMode {
    Pooled,
    Direct,
    Both,
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    /// How many agents.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub agents: usize,
    /// Through pgBouncer, straight to PostgreSQL, or both (one after the other, each on
    /// fresh servers).
    #[arg(long, value_enum, default_value_t = FleetMode::Both)]
    pub mode: FleetMode,
    /// How long every agent runs once all have started, seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub duration: u64,
    /// Agents start evenly spread over this many seconds.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub ramp: u64,
    /// The agents' heartbeat interval, set on the PEM server.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub heartbeat_interval: u32,
    /// The interval of the agents' probes, set on the PEM server.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub probe_interval: u32,
    /// pgBouncer's pool_size for the pem database.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub pool_size: u32,
    /// Run the agents as real pemworker processes (memory per agent) instead of in this
    /// process.
    #[arg(long)]
    pub processes: bool,
    /// Write the per-second figures of every run here.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Draw server backends and heartbeat p99 against agents running, every run on one chart
    /// (.svg).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Write the agents' warnings and errors here.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
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
    #[arg(
        short = 'c',
        long = "config-file",
        alias = "config",
        value_name = "FILE"
    )]
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

/// The PEM server, the admin who changes it, and this agent's agent.cfg: one declaration for
/// PEM's flat command line and for `pooler bind`/`unbind`. Host, port and TLS default to
/// agent.cfg's where the mode reads one.
#[derive(Debug, Args)]
pub struct AgentAdminArgs {
    /// PEM admin user. Password: PEM_SERVER_PASSWORD, PGPASSWORD, ~/.pgpass or a prompt (with
    /// an enrolment token: the enrolment login, default pem_enrolment).
    #[arg(long = "pem-user", value_name = "USER")]
    pub pem_user: Option<String>,
    /// PEM server (or pgBouncer) host [default: agent.cfg's pem_host].
    #[arg(long = "pem-server", value_name = "HOST")]
    pub pem_server: Option<String>,
    /// PEM server (or pgBouncer) port [default: agent.cfg's pem_port, else 5432].
    #[arg(long = "pem-port", value_name = "PORT")]
    pub pem_port: Option<u16>,
    /// sslmode towards the PEM server, libpq's names in any case (verify-CA) [default:
    /// agent.cfg's, else verify-full; PEM's default is require, which does not verify].
    #[arg(long = "pem-ssl-mode", value_name = "MODE")]
    pub pem_ssl_mode: Option<String>,
    /// Root certificate that must have signed the PEM server's (or pgBouncer's) certificate
    /// [default: agent.cfg's pem_ssl_root_cert, PGSSLROOTCERT, else ~/.postgresql/root.crt].
    #[arg(long = "pem-ssl-root-cert", value_name = "FILE")]
    pub pem_ssl_root_cert: Option<PathBuf>,
    /// Directory of agent.cfg [default: <binary directory>/../etc].
    #[arg(long = "config-dir", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// agent.cfg itself, for the worker and every mode that reads it [default: agent.cfg in
    /// the config directory].
    #[arg(
        short = 'c',
        long = "config-file",
        alias = "config",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
}

impl AgentAdminArgs {
    /// agent.cfg: `-c FILE`, else `agent.cfg` in `--config-dir` (or PEM's default directory).
    pub fn config_file(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| {
            self.config_dir
                .clone()
                .unwrap_or_else(default_config_dir)
                .join(crate::agentcfg::FILE_NAME)
        })
    }
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
    if a.pem_user.is_none() {
        return Err(missing(
            "--pem-user",
            "the PEM admin user, for example --pem-user pem_admin1",
        ));
    }
    let file = a.config_file();
    let (_, agent) =
        crate::config::AgentConfig::load_with_document(&file).map_err(registration::Error::from)?;
    let host = a
        .pem_server
        .clone()
        .unwrap_or_else(|| agent.pem_host().to_string());
    let port = a.pem_port.unwrap_or(agent.pem_port);
    let admin = admin_settings(a, &host, port, &agent.tls_choice())?;
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

/// agent.cfg's directory: that of `-c FILE`, else `--config-dir`, else
/// `<binary directory>/../etc` as PEM installs it.
pub fn config_dir(a: &AgentArgs) -> PathBuf {
    match &a.admin.config {
        Some(file) => file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
        None => a
            .admin
            .config_dir
            .clone()
            .unwrap_or_else(default_config_dir),
    }
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
    a: &AgentAdminArgs,
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

/// PEM flags this agent accepts but does not act on: one note each on stderr, so a command
/// line from PEM's documentation or EDB's tooling runs and says what it skipped.
fn note_ignored(a: &AgentArgs) {
    let mut notes = Vec::new();
    if a.cluster_name.is_some() {
        notes.push("--cluster-name: this PEM server has no clusters in its object tree; ignored");
    }
    if a.profile_id.is_some() || a.profile_name.is_some() {
        notes.push("--profile-id/--profile-name: agent profiles are not implemented; ignored");
    }
    if a.replication_solution.is_some()
        || a.patroni_cluster_name.is_some()
        || a.patroni_install_path.is_some()
        || a.patroni_config_path.is_some()
    {
        notes.push(
            "--replication-solution/--patroni-*: cluster managers are not monitored; ignored",
        );
    }
    for n in notes {
        eprintln!("pemworker: note: {n}");
    }
}

/// `--team ""` and `--owner ""` (what EDB's tooling renders for an unset value) mean none.
fn non_empty(v: &Option<String>) -> Option<String> {
    v.clone().filter(|s| !s.trim().is_empty())
}

/// PEM 10.4's `--pem-registration-conn-string` (or PEM_REGISTRATION_CONN_STRING), read into
/// the flags it stands for: host, port, user, sslmode, sslrootcert. Its dbname is ignored (the
/// registration always uses pem), as PEM does.
#[derive(Debug, Default, PartialEq)]
struct Conninfo {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<PathBuf>,
}

fn parse_conninfo(s: &str) -> Result<Conninfo, Error> {
    let bad = |why: &str| {
        Error::Usage(format!(
            "invalid --pem-registration-conn-string: {why}; use key=value pairs (host=pem.example port=5432 user=pem_admin1) or a postgresql:// URI"
        ))
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    let s = s.trim();
    if let Some(rest) = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
    {
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, _db) = main.split_once('/').unwrap_or((main, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if let Some(u) = userinfo {
            if u.contains(':') {
                pairs.push(("password".into(), String::new()));
            }
            let user = u.split(':').next().unwrap_or("");
            if !user.is_empty() {
                pairs.push(("user".into(), user.to_string()));
            }
        }
        let (h, p) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (h, Some(p)),
            _ => (hostport, None),
        };
        if !h.is_empty() {
            pairs.push(("host".into(), h.trim_matches(['[', ']']).to_string()));
        }
        if let Some(p) = p {
            pairs.push(("port".into(), p.to_string()));
        }
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad("a URI parameter without ="))?;
            pairs.push((k.to_string(), v.to_string()));
        }
    } else {
        let mut chars = s.chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek().is_none() {
                break;
            }
            let key: String = chars
                .by_ref()
                .take_while(|c| *c != '=')
                .collect::<String>()
                .trim()
                .to_string();
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            let mut value = String::new();
            if chars.peek() == Some(&'\'') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('\\') => value.extend(chars.next()),
                        Some('\'') => break,
                        Some(c) => value.push(c),
                        None => return Err(bad("an unterminated quoted value")),
                    }
                }
            } else {
                while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                    value.push(c);
                }
            }
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(bad("a value without key="));
            }
            pairs.push((key, value));
        }
    }
    let mut c = Conninfo::default();
    for (k, v) in pairs {
        match k.as_str() {
            "host" | "hostaddr" => c.host = Some(v),
            "port" => {
                c.port = Some(
                    v.parse()
                        .map_err(|_| bad(&format!("port {v:?} is not a port number")))?,
                )
            }
            "user" => c.user = Some(v),
            "sslmode" => c.sslmode = Some(v),
            "sslrootcert" => c.sslrootcert = Some(PathBuf::from(v)),
            "password" | "sslpassword" => {
                return Err(Error::Usage(
                    "--pem-registration-conn-string carries a password; put it in PEM_SERVER_PASSWORD or ~/.pgpass instead (pemworker keeps secrets out of its arguments)".into(),
                ));
            }
            // dbname is forced to pem and target_session_attrs to read-write, as PEM does;
            // libpq's other keywords come from the environment as usual.
            _ => {}
        }
    }
    Ok(c)
}

/// The agent.cfg keys `--register-agent` sets from PEM's flags (written as given, like -o).
fn flag_settings(a: &AgentArgs) -> Vec<(String, String)> {
    let b = |v: bool| if v { "true" } else { "false" }.to_string();
    let mut out = Vec::new();
    for (key, v) in [
        ("enable_smtp", a.enable_smtp),
        ("enable_snmp", a.enable_snmp),
        ("enable_webhook", a.enable_webhook),
    ] {
        if let Some(v) = v {
            out.push((key.to_string(), b(v)));
        }
    }
    if let Some(n) = a.max_webhook_retries {
        out.push(("max_webhook_retries".to_string(), n.to_string()));
    }
    out
}

/// `-o` for `--register-agent`: PEM's `agent_id`, `agent_ssl_crt` and `agent_ssl_key` taken
/// out (registration acts on them), every other key checked and kept for agent.cfg.
struct RegisterOverrides {
    agent_id: Option<i32>,
    ssl_crt: Option<PathBuf>,
    ssl_key: Option<PathBuf>,
    rest: Vec<(String, String)>,
}

fn register_overrides(options: &[String]) -> Result<RegisterOverrides, Error> {
    let mut o = RegisterOverrides {
        agent_id: None,
        ssl_crt: None,
        ssl_key: None,
        rest: Vec::new(),
    };
    for opt in options {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => ("", ""),
        };
        let empty = |key: &str| {
            Error::Usage(format!(
                "-o {key}= has no value; write -o {key}=FILE with no space after ="
            ))
        };
        match k {
            "agent_id" | "pem_agent" => {
                let id = v.parse::<i32>().ok().filter(|i| *i > 0).ok_or_else(|| {
                    Error::Usage(format!(
                        "invalid -o {k}={v}: an agent id is a positive integer, for example -o agent_id=8"
                    ))
                })?;
                o.agent_id = Some(id);
            }
            "agent_ssl_crt" if v.is_empty() => return Err(empty(k)),
            "agent_ssl_key" if v.is_empty() => return Err(empty(k)),
            "agent_ssl_crt" => o.ssl_crt = Some(PathBuf::from(v)),
            "agent_ssl_key" => o.ssl_key = Some(PathBuf::from(v)),
            _ => o.rest.push(registration::parse_override(opt)?),
        }
    }
    Ok(o)
}

pub fn resolve_register(a: &AgentArgs) -> Result<registration::Options, Error> {
    // Checked first, and all before a password prompt or any connection.
    let conninfo = a
        .pem_registration_conn_string
        .as_deref()
        .map(parse_conninfo)
        .transpose()?
        .unwrap_or_default();
    let mut admin_flags = AgentAdminArgs {
        pem_user: conninfo.user.clone().or_else(|| a.admin.pem_user.clone()),
        pem_server: conninfo.host.clone().or_else(|| a.admin.pem_server.clone()),
        pem_port: conninfo.port.or(a.admin.pem_port),
        pem_ssl_mode: conninfo
            .sslmode
            .clone()
            .or_else(|| a.admin.pem_ssl_mode.clone()),
        pem_ssl_root_cert: conninfo
            .sslrootcert
            .clone()
            .or_else(|| a.admin.pem_ssl_root_cert.clone()),
        config_dir: a.admin.config_dir.clone(),
        config: a.admin.config.clone(),
    };
    let hosts = admin_flags.pem_server.clone().ok_or_else(|| {
        missing(
            "--pem-server",
            "the PEM server or pgBouncer host, for example --pem-server pem.example",
        )
    })?;
    // PEM 10.1's multi-host form: 'h1,h2,h3', each tried for the one that accepts writes.
    let pem_hosts: Vec<String> = hosts
        .split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    let host = pem_hosts.first().cloned().ok_or_else(|| {
        missing(
            "--pem-server",
            "the PEM server or pgBouncer host, for example --pem-server pem.example",
        )
    })?;
    let pem_hosts = if pem_hosts.len() > 1 {
        pem_hosts
    } else {
        Vec::new()
    };
    if let Some(file) = &a.admin.config {
        if file.file_name() != Some(std::ffi::OsStr::new(crate::agentcfg::FILE_NAME)) {
            return Err(Error::Usage(format!(
                "--register-agent writes agent.cfg: -c {} must name a file called agent.cfg (or use --config-dir DIR)",
                file.display()
            )));
        }
    }
    let token = enrolment_token(a)?;
    if admin_flags.pem_user.is_none() && token.is_none() {
        return Err(missing(
            "--pem-user",
            "the PEM admin user that registers agents, for example --pem-user pem_admin1 (or enrol with --enrolment-token-file)",
        ));
    }
    if let Some(u) = &a.pem_agent_user {
        registration::check_agent_user(u)?;
    }
    let o = register_overrides(&a.options)?;
    if o.agent_id.is_some() && token.is_some() {
        return Err(Error::Usage(
            "-o agent_id cannot be used with an enrolment token: the token's server picks the id"
                .into(),
        ));
    }
    let mut overrides = flag_settings(a);
    overrides.extend(o.rest);
    let config_dir = config_dir(a);
    let local_cert = match (&o.ssl_crt, &o.ssl_key) {
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::Usage(
                "give both -o agent_ssl_crt=FILE and -o agent_ssl_key=FILE to register with existing files".into(),
            ));
        }
        (Some(crt), Some(key)) => {
            if token.is_some() {
                return Err(Error::Usage(
                    "-o agent_ssl_crt/agent_ssl_key cannot be used with an enrolment token: the token's server signs a new key".into(),
                ));
            }
            // PEM 10: "absolute or relative to the agent config directory"; stored absolute.
            let at = |p: &PathBuf| {
                let p = if p.is_absolute() {
                    p.clone()
                } else {
                    config_dir.join(p)
                };
                std::path::absolute(&p).unwrap_or(p)
            };
            Some((at(crt), at(key)))
        }
    };
    if local_cert.is_some() && a.pem_agent_user.is_none() && o.agent_id.is_none() {
        return Err(Error::Usage(
            "-o agent_ssl_crt names a certificate for a user: give --pem-agent-user USER (its common name) or -o agent_id=N (for agent<N>)".into(),
        ));
    }
    note_ignored(a);
    let port = admin_flags.pem_port.unwrap_or(5432);
    let server = match &token {
        // The enrolment login has no password; the token goes only to a verified server.
        Some(_) => {
            let user = admin_flags.pem_user.as_deref().unwrap_or(ENROLMENT_USER);
            let mut s = ConnectSettings::from_env(&host, port, user, "pem")?;
            s.choose_tls(
                &tls_flags(&admin_flags.pem_ssl_mode, &admin_flags.pem_ssl_root_cert)?,
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
        None => {
            admin_flags.pem_port = Some(port);
            admin_settings(&admin_flags, &host, port, &TlsChoice::default())?
        }
    };
    if let Some((crt, key)) = &local_cert {
        let user = a
            .pem_agent_user
            .clone()
            .unwrap_or_else(|| format!("agent{}", o.agent_id.unwrap_or_default()));
        registration::cert_check::check_files(crt, key, &user, server.root_cert.as_deref())?;
    }
    let host_name = host_fqdn();
    Ok(registration::Options {
        server,
        token,
        agent_user: a.pem_agent_user.clone(),
        display_name: a.display_name.clone().unwrap_or_else(|| host_name.clone()),
        host_name,
        cert_path: cert_path(a),
        config_dir,
        force: a.force_registration.unwrap_or(false),
        group: non_empty(&a.group),
        team: non_empty(&a.team),
        owner: non_empty(&a.owner),
        heartbeat_connection: a.enable_heartbeat_connection.unwrap_or(false),
        allow_server_restart: a.allow_server_restart,
        allow_batch_probes: a.allow_batch_probes.unwrap_or(false),
        batch_script_user: a.batch_script_user.clone(),
        pem_hosts,
        agent_id: o.agent_id,
        local_cert,
        overrides,
    })
}

pub fn resolve_unregister(a: &AgentArgs) -> Result<(ConnectSettings, PathBuf), Error> {
    let (id, admin) = agent_and_admin(a)?;
    Ok((admin, id.path))
}

pub fn resolve_migrate(a: &AgentArgs) -> Result<migrate::Options, Error> {
    let file = a.admin.config_file();
    let port = a.admin.pem_port.ok_or_else(|| {
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
    let admin = match (&reuse, &a.admin.pem_user) {
        (Some(_), None) => None,
        (_, Some(_)) => {
            let host = match &a.admin.pem_server {
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
            Some(admin_settings(&a.admin, &host, port, &configured)?)
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
        pem_host: a.admin.pem_server.clone(),
        pooler_port: port,
        agent_user,
        cert_path: cert_path(a),
        admin,
        reuse,
        force: a.force_registration.unwrap_or(false),
        tls: tls_flags(&a.admin.pem_ssl_mode, &a.admin.pem_ssl_root_cert)?,
        retire_dedicated_role: a.retire_dedicated_role,
    })
}

/// The worker's agent.cfg and its `-o key=value` overrides (`-l LEVEL` last, so it wins).
pub fn resolve_worker(a: &AgentArgs) -> Result<(PathBuf, Vec<(String, String)>), Error> {
    let mut o = overrides(&a.options)?;
    if let Some(level) = a.log_level {
        o.push(("log_level".to_string(), level_name(level).to_string()));
    }
    Ok((a.admin.config_file(), o))
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

/// This agent's identity (agent.cfg: `-c FILE` or in `--config-dir`) and the PEM admin's
/// session: host and port from agent.cfg unless --pem-server / --pem-port say otherwise.
fn agent_and_admin(a: &AgentArgs) -> Result<(crate::config::AgentConfig, ConnectSettings), Error> {
    agent_admin(&a.admin)
}

/// PEM's blank `--server-addr ""`: the server's default Unix socket directory (Debian's and
/// EDB's packages use /var/run/postgresql; libpq's built-in default is /tmp).
fn local_socket_dir() -> String {
    ["/var/run/postgresql", "/run/postgresql"]
        .into_iter()
        .find(|d| Path::new(d).is_dir())
        .unwrap_or("/tmp")
        .to_string()
}

pub fn resolve_register_server(a: &AgentArgs) -> Result<crate::monitored::ServerOptions, Error> {
    use crate::monitored::{Binding, ServerOptions};
    let server_addr = a.server_addr.clone().ok_or_else(|| {
        missing(
            "--server-addr",
            "the monitored server's address, for example --server-addr db1.example",
        )
    })?;
    let server_addr = if server_addr.trim().is_empty() {
        local_socket_dir()
    } else {
        server_addr
    };
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
    note_ignored(a);
    let binding = Binding {
        host: a
            .asb_host_name
            .clone()
            .filter(|h| !h.trim().is_empty())
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
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| format!("{server_addr}:{server_port}")),
        server_addr,
        server_port,
        server_database,
        server_user,
        service_name: a.server_service_name.clone(),
        binding,
        group: non_empty(&a.group),
        team: non_empty(&a.team),
        owner: non_empty(&a.owner),
        remote_monitoring: a.remote_monitoring.unwrap_or(false),
        force: a.force_registration.unwrap_or(false),
        password,
        pgpass,
        targets_file,
        efm: crate::targets::Efm::from_flags(
            a.efm_cluster_name.clone(),
            a.efm_install_path.clone(),
        ),
    })
}

/// `--unregister-server`: the server as this agent reaches it, named by PEM 10.2's
/// `--asb-host-name` or, as PEM 7 to 10.1 did, by `--server-addr` ("" = the local socket).
pub fn resolve_unregister_server(
    a: &AgentArgs,
) -> Result<(ConnectSettings, i32, String, u16, PathBuf), Error> {
    let host = match (&a.asb_host_name, &a.server_addr) {
        (Some(h), _) if !h.trim().is_empty() => h.clone(),
        (_, Some(h)) if !h.trim().is_empty() => h.clone(),
        (_, Some(_)) => local_socket_dir(),
        _ => {
            return Err(missing(
                "--asb-host-name",
                "the host this agent reaches the server at (PEM 7's --server-addr also works)",
            ));
        }
    };
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
    let (enabled, interval) = match a.mode {
        Mode::EnableProbe => (Some(true), a.probe_interval),
        Mode::DisableProbe => (Some(false), a.probe_interval),
        Mode::SetProbeInterval(s) => (None, Some(s)),
        other => {
            return Err(Error::Usage(format!(
                "{} does not change probes",
                other.flag()
            )));
        }
    };
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
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pemworker").chain(args.iter().copied()))
    }

    fn agent(args: &[&str]) -> AgentArgs {
        parse(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .agent
    }

    #[test]
    fn each_mode_flag_selects_its_mode_and_two_modes_are_refused() {
        assert_eq!(agent(&[]).mode, Mode::Worker);
        for (mode, long, _) in MODES {
            assert_eq!(agent(&[&format!("--{long}")]).mode, *mode);
            assert_eq!(mode.flag(), format!("--{long}"));
        }
        assert_eq!(
            agent(&["--set-probe-interval", "30"]).mode,
            Mode::SetProbeInterval(30)
        );
        let e = parse(&["--register-agent", "--unregister-agent"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn switches_take_pems_value_forms() {
        for (args, want) in [
            (&["--allow_server_restart"][..], Some(true)),
            (&["--allow_server_restart", "true"][..], Some(true)),
            (&["--allow_server_restart", "FALSE"][..], Some(false)),
            (&["--allow_server_restart=no"][..], Some(false)),
            (&["--allow-server-restart", "Yes"][..], Some(true)),
            (&[][..], None),
        ] {
            assert_eq!(agent(args).allow_server_restart, want, "{args:?}");
        }
        let a = agent(&[
            "--register-agent",
            "--force-registration",
            "yes",
            "--enable-smtp=true",
            "--enable-snmp",
            "TRUE",
            "--enable-webhook",
            "--enable-heartbeat-connection",
            "--allow-batch-probes",
            "true",
            "-l",
            "DEBUG1",
        ]);
        assert_eq!(a.force_registration, Some(true));
        assert_eq!(
            (a.enable_smtp, a.enable_snmp, a.enable_webhook),
            (Some(true), Some(true), Some(true))
        );
        assert_eq!(a.enable_heartbeat_connection, Some(true));
        assert_eq!(a.allow_batch_probes, Some(true));
        assert_eq!(a.log_level, Some(crate::config::LogLevel::Debug1));
        let e = parse(&["--force-registration", "maybe"]).unwrap_err();
        assert!(e.to_string().contains("expected true or false"), "{e}");
    }

    #[test]
    fn l_sets_the_workers_log_level_over_o() {
        let a = agent(&[
            "-c",
            "/etc/a/agent.cfg",
            "-o",
            "log_level=error",
            "-l",
            "DEBUG1",
        ]);
        let (file, o) = resolve_worker(&a).unwrap();
        assert_eq!(file, Path::new("/etc/a/agent.cfg"));
        assert_eq!(
            o,
            [
                ("log_level".to_string(), "error".to_string()),
                ("log_level".to_string(), "debug1".to_string())
            ]
        );
    }

    #[test]
    fn pem_levels_map_onto_ours() {
        use crate::config::LogLevel;
        for (pem, ours) in [
            ("WARNING", LogLevel::Warning),
            ("warning", LogLevel::Warning),
            ("ERROR", LogLevel::Error),
            ("INFO", LogLevel::Info),
            ("NOTICE", LogLevel::Info),
            ("DEBUG1", LogLevel::Debug1),
            ("DEBUG2", LogLevel::Debug2),
            ("DEBUG5", LogLevel::Debug2),
        ] {
            assert_eq!(pem_log_level(pem), Ok(ours), "{pem}");
        }
        assert!(pem_log_level("LOUD").is_err());
    }

    #[test]
    fn o_repeats_and_attaches_and_a_repeated_option_takes_the_last_value() {
        let a = agent(&[
            "-oagent_conn_string=host=x",
            "-o",
            "agent_id=8",
            "--pem-user",
            "a",
            "--pem-user",
            "b",
        ]);
        assert_eq!(a.options, ["agent_conn_string=host=x", "agent_id=8"]);
        assert_eq!(a.admin.pem_user.as_deref(), Some("b"));
        let o = register_overrides(&a.options).unwrap();
        assert_eq!(o.agent_id, Some(8));
        assert_eq!(o.rest, [("agent_conn_string".into(), "host=x".into())]);
        for bad in ["agent_id=x", "agent_id=0", "agent_ssl_crt="] {
            assert!(register_overrides(&[bad.to_string()]).is_err(), "{bad}");
        }
        let args: Vec<std::ffi::OsString> = ["pemworker", "-o", "agent_ssl_crt=", "agent.crt"]
            .map(Into::into)
            .to_vec();
        assert_eq!(
            spaced_option_value(&args).as_deref(),
            Some(
                "-o agent_ssl_crt= agent.crt: remove the space after =, as in -o agent_ssl_crt=agent.crt"
            )
        );
    }

    #[test]
    fn config_file_names_agent_cfg_for_every_mode() {
        for flag in ["-c", "--config-file", "--config"] {
            let a = agent(&["--verify-registration", flag, "/etc/x/agent.cfg"]);
            assert_eq!(a.admin.config_file(), Path::new("/etc/x/agent.cfg"));
            assert_eq!(config_dir(&a), Path::new("/etc/x"));
        }
        let a = agent(&["--verify-registration", "--config-dir", "/opt/etc"]);
        assert_eq!(a.admin.config_file(), Path::new("/opt/etc/agent.cfg"));
    }

    #[test]
    fn registration_conn_strings_in_both_forms() {
        let c = parse_conninfo(
            "host=pem.example port=6432 user=pem_admin1 dbname=postgres sslmode=verify-CA sslrootcert='/etc/pem root.crt'",
        )
        .unwrap();
        assert_eq!(
            c,
            Conninfo {
                host: Some("pem.example".into()),
                port: Some(6432),
                user: Some("pem_admin1".into()),
                sslmode: Some("verify-CA".into()),
                sslrootcert: Some("/etc/pem root.crt".into()),
            }
        );
        let u =
            parse_conninfo("postgresql://pem_admin1@pem.example:6432/pem?sslmode=require").unwrap();
        assert_eq!(u.host.as_deref(), Some("pem.example"));
        assert_eq!(u.port, Some(6432));
        assert_eq!(u.user.as_deref(), Some("pem_admin1"));
        assert_eq!(u.sslmode.as_deref(), Some("require"));
        for secret in ["host=x password=s3cret", "postgresql://u:s3cret@x/pem"] {
            let e = parse_conninfo(secret).unwrap_err().to_string();
            assert!(
                e.contains("PEM_SERVER_PASSWORD") && !e.contains("s3cret"),
                "{e}"
            );
        }
        assert!(parse_conninfo("host=x port=many").is_err());
        // PEM's documentation spells libpq's sslmodes in capitals.
        assert_eq!("verify-CA".parse::<SslMode>().unwrap(), SslMode::VerifyCa);
        assert_eq!(
            "Verify-Full".parse::<SslMode>().unwrap(),
            SslMode::VerifyFull
        );
    }

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
