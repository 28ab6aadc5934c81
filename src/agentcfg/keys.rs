//! The one table of agent.cfg keys: name, section, value kind, what registration writes, the
//! default, what the key means and whether this agent acts on it. The configuration's checks
//! ([`crate::config`]), `--check-config`, registration's agent.cfg, the sample file in
//! `packaging/` and the key table in README.md are all derived from [`KEYS`]; tests compare the
//! last two with what [`sample`] and [`markdown`] render.

/// Where a key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `[PEM/agent]`.
    Agent,
    /// `[WEBHOOK/<name>]` (PEM 10), and `[PEM/agent]` too (PEM 7-9 kept them there).
    Webhook,
    /// `[BARMAN/<id>]`.
    Barman,
}

impl Section {
    /// The section a header names, if it is one of PEM's.
    pub fn of_header(name: &str) -> Option<Section> {
        if name == super::SECTION {
            Some(Section::Agent)
        } else if name.starts_with("WEBHOOK/") {
            Some(Section::Webhook)
        } else if name.starts_with("BARMAN/") {
            Some(Section::Barman)
        } else {
            None
        }
    }

    fn title(self) -> &'static str {
        match self {
            Section::Agent => "[PEM/agent]",
            Section::Webhook => "[WEBHOOK/<name>]",
            Section::Barman => "[BARMAN/<id>]",
        }
    }
}

/// How a value is read. Each kind has one parser; config uses the same ones for its typed values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Host names, addresses or socket directories, comma-separated.
    Hosts,
    /// Ports 1-65535, comma-separated.
    Ports,
    /// A number above 0.
    Id,
    /// A number, 0 or more.
    Count,
    /// Seconds, at least the given number.
    Seconds(u64),
    /// Seconds; 0 = no limit, -1 = the default.
    Timeout,
    Bool,
    LogLevel,
    SslMode,
    /// Bytes with an optional unit (kB, MB, GB), at least 4kB.
    Size,
    /// A share: 0 or more, below 1.
    Fraction,
    /// A file or directory; relative to agent.cfg's directory.
    Path,
    Text,
}

impl Kind {
    /// What a value of this kind looks like (the README's "value" column).
    pub fn form(self) -> &'static str {
        match self {
            Kind::Hosts => "host[,host...]",
            Kind::Ports => "port[,port...]",
            Kind::Id => "number",
            Kind::Count => "number",
            Kind::Seconds(_) | Kind::Timeout => "seconds",
            Kind::Bool => "boolean",
            Kind::LogLevel => "level",
            Kind::SslMode => "sslmode",
            Kind::Size => "size",
            Kind::Fraction => "fraction",
            Kind::Path => "path",
            Kind::Text => "text",
        }
    }

    /// What a value must be, for the message about one that is not.
    pub fn expected(self) -> String {
        match self {
            Kind::Hosts => "a host name, address or socket directory (or a comma list)".into(),
            Kind::Ports => "a port number (1-65535), or a comma list of them".into(),
            Kind::Id => "a positive number".into(),
            Kind::Count => "a number (0 or more)".into(),
            Kind::Seconds(0) => "a number of seconds".into(),
            Kind::Seconds(min) => format!("a number of seconds (at least {min})"),
            Kind::Timeout => "a number of seconds (0 = no limit, -1 = the default)".into(),
            Kind::Bool => "true or false (also yes/no, on/off, 1/0)".into(),
            Kind::LogLevel => "a log level (error, warning, info, debug1, debug2)".into(),
            Kind::SslMode => {
                "an sslmode (disable, allow, prefer, require, verify-ca, verify-full)".into()
            }
            Kind::Size => "a size of at least 4kB (e.g. 64MB)".into(),
            Kind::Fraction => "a fraction from 0 up to, not including, 1 (e.g. 0.67)".into(),
            Kind::Path | Kind::Text => "text".into(),
        }
    }

    /// Whether `v` is a value of this kind.
    pub fn accepts(self, v: &str) -> bool {
        match self {
            Kind::Hosts => parse_hosts(v).is_some(),
            Kind::Ports => parse_ports(v).is_some(),
            Kind::Id => parse_id(v).is_some(),
            Kind::Count => parse_count(v).is_some(),
            Kind::Seconds(min) => parse_seconds(v, min).is_some(),
            Kind::Timeout => parse_timeout(v).is_some(),
            Kind::Bool => parse_bool(v).is_some(),
            Kind::LogLevel => crate::config::LogLevel::parse(v).is_some(),
            Kind::SslMode => v.parse::<crate::connection::SslMode>().is_ok(),
            Kind::Size => parse_size(v).is_some_and(|n| n >= 4096),
            Kind::Fraction => parse_fraction(v).is_some(),
            Kind::Path | Kind::Text => true,
        }
    }
}

/// A share of a whole: 0 or more and below 1.
pub fn parse_fraction(s: &str) -> Option<f64> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| (0.0..1.0).contains(f))
}

/// PEM's spellings of booleans, any case.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// `h1,h2,...` (blanks around commas ignored); `None` when no host is left.
pub fn parse_hosts(s: &str) -> Option<Vec<String>> {
    let hosts: Vec<String> = s
        .split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    (!hosts.is_empty()).then_some(hosts)
}

/// `p1,p2,...`, each 1-65535.
pub fn parse_ports(s: &str) -> Option<Vec<u16>> {
    s.split(',')
        .map(|p| p.trim().parse::<u16>().ok().filter(|&p| p > 0))
        .collect()
}

pub fn parse_id(s: &str) -> Option<i32> {
    s.parse::<i32>().ok().filter(|&n| n > 0)
}

pub fn parse_count(s: &str) -> Option<usize> {
    s.parse::<usize>().ok()
}

pub fn parse_seconds(s: &str, min: u64) -> Option<std::time::Duration> {
    s.parse::<u64>()
        .ok()
        .filter(|&n| n >= min)
        .map(std::time::Duration::from_secs)
}

/// connect_timeout: `Some(None)` = wait indefinitely (0), `Some(Some(d))` = at most `d`, with
/// -1 (what PEM's registration writes: not set) the default.
pub fn parse_timeout(s: &str) -> Option<Option<std::time::Duration>> {
    match s.parse::<i64>().ok()? {
        0 => Some(None),
        -1 => Some(Some(crate::config::DEFAULT_CONNECT_TIMEOUT)),
        n if n > 0 => Some(Some(std::time::Duration::from_secs(n as u64))),
        _ => None,
    }
}

/// Sizes like `64MB`, `512k`, `1G` or plain bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u64 = digits.parse().ok()?;
    let unit = s[digits.len()..].trim().to_ascii_lowercase();
    let mult = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Whether and how this agent acts on a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// PEM's key, with PEM's meaning.
    Pem,
    /// This agent's own key; PEM has none for it.
    Own,
    /// Another name PEM's documentation uses for the key named here.
    Alias(&'static str),
    /// PEM's key for something this agent does not do; a value that asks for it (not empty,
    /// not false, 0 or the default) gets one informational line naming it.
    NotImplemented(&'static str),
    /// PEM's key, accepted; whatever its value, this agent has nothing to do or say about it.
    Accepted(&'static str),
}

/// One key of agent.cfg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub section: Section,
    pub kind: Kind,
    /// What registration writes (PEM's registration writes the same), in this table's order;
    /// `None`: written only when set.
    pub written: Option<&'static str>,
    /// What applies when the key is absent (for the documentation).
    pub default: &'static str,
    pub doc: &'static str,
    pub support: Support,
}

impl Key {
    /// Whether `v` asks for nothing (empty, false, 0, the default or what registration writes),
    /// so that a key this agent does not implement needs no mention.
    pub fn is_inert(&self, v: &str) -> bool {
        v.is_empty()
            || self.written.is_some_and(|w| w.eq_ignore_ascii_case(v))
            || self.default.eq_ignore_ascii_case(v)
            || (self.kind == Kind::Bool && parse_bool(v) == Some(false))
            || (self.kind == Kind::Count && parse_count(v) == Some(0))
    }

    /// The informational line for a value of a key this agent does not implement, if any.
    pub fn note(&self, v: &str) -> Option<String> {
        match self.support {
            Support::NotImplemented(what) if !self.is_inert(v) => Some(format!(
                "{}={v}: {what} is not implemented by this agent; the key is accepted and ignored",
                self.name
            )),
            _ => None,
        }
    }
}

const fn key(
    name: &'static str,
    kind: Kind,
    written: Option<&'static str>,
    default: &'static str,
    support: Support,
    doc: &'static str,
) -> Key {
    Key {
        name,
        section: Section::Agent,
        kind,
        written,
        default,
        doc,
        support,
    }
}

const fn in_section(k: Key, section: Section) -> Key {
    Key { section, ..k }
}

const WEBHOOKS: Support = Support::NotImplemented("webhook notification");
/// A webhook endpoint's settings: enable_webhook says whether webhooks are called.
const WEBHOOK_ENDPOINT: Support = Support::Accepted("webhook notification not implemented");
const BARMAN: Support = Support::Accepted("Barman monitoring not implemented");
const ALERTS: Support = Support::NotImplemented("alert evaluation");

/// Every key, `[PEM/agent]` first in the order PEM's registration writes them (EDB's "Configuring
/// the PEM agent" pages for pgBouncer, PEM 7-10), then the keys written only when set.
pub const KEYS: &[Key] = &[
    key(
        "pem_host",
        Kind::Hosts,
        Some("127.0.0.1"),
        "127.0.0.1",
        Support::Pem,
        "The PEM server (or the pgBouncer in front of it): host name, address or Unix socket directory; a comma list (PEM 10.1) is tried in order.",
    ),
    key(
        "pem_port",
        Kind::Ports,
        Some("5432"),
        "5432",
        Support::Pem,
        "Its port; a comma list gives each host of pem_host its own port, one port applies to all (libpq's rule).",
    ),
    key(
        "agent_id",
        Kind::Id,
        Some(""),
        "set by registration",
        Support::Pem,
        "The agent's id on the PEM server.",
    ),
    key(
        "agent_user",
        Kind::Text,
        Some(""),
        "agent<ID>",
        Support::Pem,
        "The role the agent logs in as; its certificate's common name.",
    ),
    key(
        "agent_ssl_key",
        Kind::Path,
        Some(""),
        "set by registration",
        Support::Pem,
        "The agent's private key: PKCS#8 or PKCS#1 (BEGIN RSA PRIVATE KEY), unencrypted, mode 0600. A relative path is relative to agent.cfg's directory (PEM 10).",
    ),
    key(
        "agent_ssl_crt",
        Kind::Path,
        Some(""),
        "set by registration",
        Support::Pem,
        "The agent's certificate; relative paths as for agent_ssl_key.",
    ),
    key(
        "log_level",
        Kind::LogLevel,
        Some("warning"),
        "warning",
        Support::Pem,
        "error, warning, info, debug1 (or debug), debug2; any case.",
    ),
    key(
        "log_location",
        Kind::Path,
        Some("/var/log/pem/worker.log"),
        "standard error",
        Support::Pem,
        "The worker's log file.",
    ),
    key(
        "agent_log_location",
        Kind::Path,
        Some("/var/log/pem/agent.log"),
        "/var/log/pem/agent.log",
        Support::Accepted("one process, which logs to log_location"),
        "PEM's log file of its pemagent process.",
    ),
    key(
        "long_wait",
        Kind::Seconds(1),
        Some("30"),
        "30",
        Support::Pem,
        "Longest wait between attempts to reach the PEM server, and between deliveries of a postponed batch.",
    ),
    key(
        "short_wait",
        Kind::Seconds(1),
        Some("10"),
        "10",
        Support::Pem,
        "Shortest wait before the probe schedule is checked again.",
    ),
    key(
        "alert_threads",
        Kind::Count,
        Some("0"),
        "0",
        ALERTS,
        "Threads evaluating alerts, each with a session of its own (PEM: 1 on the PEM server's host).",
    ),
    key(
        "enable_smtp",
        Kind::Bool,
        Some("false"),
        "false",
        Support::NotImplemented("e-mail notification"),
        "Send e-mail notifications.",
    ),
    key(
        "enable_snmp",
        Kind::Bool,
        Some("false"),
        "false",
        Support::NotImplemented("SNMP notification"),
        "Send SNMP traps.",
    ),
    key(
        "enable_webhook",
        Kind::Bool,
        Some("false"),
        "false",
        WEBHOOKS,
        "Call webhooks.",
    ),
    key(
        "max_webhook_retries",
        Kind::Count,
        Some("3"),
        "3",
        WEBHOOKS,
        "Attempts per webhook call.",
    ),
    key(
        "allow_server_restart",
        Kind::Bool,
        Some("true"),
        "true",
        Support::Accepted("this agent never restarts a server"),
        "The agent may restart monitored servers (PEM's Audit and Log Manager, Tuning Wizard).",
    ),
    key(
        "allow_package_management",
        Kind::Bool,
        Some("false"),
        "false",
        Support::NotImplemented("package management"),
        "The agent may install packages (deprecated since PEM 8).",
    ),
    key(
        "allow_streaming_replication",
        Kind::Bool,
        Some("false"),
        "false",
        Support::NotImplemented("setting up streaming replication"),
        "The agent may set up streaming replication.",
    ),
    key(
        "max_connections",
        Kind::Count,
        Some("0"),
        "0",
        Support::Pem,
        "Sessions open to monitored servers and pgBouncer consoles at once, idle ones included; 0 = unlimited.",
    ),
    key(
        "connect_timeout",
        Kind::Timeout,
        Some("-1"),
        "-1",
        Support::Pem,
        "Seconds to wait for a session to open; 0 = wait indefinitely (PEM); -1 = 10 s here (PEM: no limit).",
    ),
    key(
        "connection_lifetime",
        Kind::Seconds(0),
        Some("0"),
        "0",
        Support::Pem,
        "Seconds an idle session to a monitored server or pgBouncer console is kept; 0 = as long as its target is probed.",
    ),
    key(
        "allow_batch_probes",
        Kind::Bool,
        Some("false"),
        "false",
        Support::NotImplemented("batch (shell script) probes"),
        "Run custom probes written as shell scripts.",
    ),
    key(
        "heartbeat_connection",
        Kind::Bool,
        Some("false"),
        "false",
        Support::Pem,
        "A session of its own for heartbeats.",
    ),
    key(
        "pem_ssl_mode",
        Kind::SslMode,
        None,
        "verify-full (PEM: require)",
        Support::Pem,
        "sslmode towards the PEM server, libpq's names in any case (PEM's verify-CA too); registration writes the mode it used.",
    ),
    key(
        "pem_ssl_root_cert",
        Kind::Path,
        None,
        "PGSSLROOTCERT, else ~/.postgresql/root.crt",
        Support::Own,
        "Root certificate(s) the PEM server's (or pgBouncer's) certificate must chain to; registration writes the one it used. PEM has no key for it: its ca_file is another CA.",
    ),
    key(
        "pem_session_lifetime",
        Kind::Seconds(0),
        None,
        "0",
        Support::Own,
        "Seconds before a session with the PEM server is renewed; 0 = never.",
    ),
    key(
        "agent_secret_file",
        Kind::Path,
        None,
        "set by registration",
        Support::Own,
        "The 0600 file with the secret that signs the agent's writes (the PEM server refuses writes without it).",
    ),
    key(
        "state_dir",
        Kind::Path,
        None,
        "agent<ID> under /var/lib/pem/agent as root, ~/.pem/state otherwise",
        Support::Own,
        "Spool and stats.json.",
    ),
    key(
        "spool_limit",
        Kind::Size,
        None,
        "64MB",
        Support::Own,
        "Largest spool on disk; past it the oldest refused samples, then the oldest batches are dropped.",
    ),
    key(
        "certificate_renewal_fraction",
        Kind::Fraction,
        None,
        "0.67",
        Support::Own,
        "Share of its lifetime after which the running worker renews its certificate; 0 = never.",
    ),
    key(
        "batch_script_dir",
        Kind::Path,
        None,
        "/tmp",
        Support::NotImplemented("running alert scripts"),
        "Where alert scripts are written.",
    ),
    key(
        "batch_script_user",
        Kind::Text,
        None,
        "none",
        Support::NotImplemented("running batch jobs and probes"),
        "The OS user batch jobs and batch probes run as.",
    ),
    key(
        "pem_agent",
        Kind::Id,
        None,
        "agent_id",
        Support::Alias("agent_id"),
        "PEM 8-10's tables name agent_id so; read when agent_id is absent.",
    ),
    key(
        "agent_conn_string",
        Kind::Text,
        None,
        "none",
        Support::NotImplemented("a connection string for the PEM session"),
        "libpq connection string of the agent's PEM session (PEM 10.4); this agent connects as pem_host, pem_port, pem_ssl_mode and agent_ssl_* say.",
    ),
    key(
        "agent_connection_string",
        Kind::Text,
        None,
        "none",
        Support::NotImplemented("a connection string for the PEM session"),
        "Another spelling of agent_conn_string on PEM 10's pages.",
    ),
    key(
        "agent_ssl_passphrase_script",
        Kind::Path,
        None,
        "none",
        Support::NotImplemented("an encrypted agent key"),
        "A script printing the passphrase of an encrypted agent key.",
    ),
    key(
        "agent_flag_dir",
        Kind::Path,
        None,
        "$TMPDIR/pem/agent-<ID>",
        Support::NotImplemented("HA takeover by flag file"),
        "Directory polled for takeover-server-<ID> files.",
    ),
    key(
        "alert_reconnect_delay",
        Kind::Seconds(0),
        None,
        "30",
        ALERTS,
        "Seconds alert threads wait after connecting (PEM 10).",
    ),
    key(
        "enable_nagios",
        Kind::Bool,
        None,
        "false",
        Support::NotImplemented("Nagios alerting"),
        "Nagios alerting.",
    ),
    key(
        "connection_custom_setup",
        Kind::Text,
        None,
        "none",
        Support::NotImplemented("custom SQL on new sessions"),
        "SQL run on each new session to a monitored server.",
    ),
    key(
        "ca_file",
        Kind::Path,
        None,
        "the platform's CA bundle",
        Support::NotImplemented("calling HTTPS endpoints (webhooks, pg-backup-api)"),
        "CA bundle for webhook and pg-backup-api endpoints (PEM 8-10). Not the PEM server's CA: that is pem_ssl_root_cert (earlier versions of this agent read ca_file for it).",
    ),
    key(
        "check_server_certificate_expiry",
        Kind::Bool,
        None,
        "true",
        Support::Accepted("read by PEM's registration only"),
        "false: registration disables PEM's certificate renewal job (PEM 10.3).",
    ),
    key(
        "skip_db_certificate",
        Kind::Bool,
        None,
        "false",
        Support::Accepted("read by PEM's registration only"),
        "true: registration makes no client certificate (PEM 10.3).",
    ),
    key(
        "pem_maxconn",
        Kind::Count,
        None,
        "0",
        Support::Accepted("only named in PEM 7-9's text; max_connections is the limit"),
        "An old name of the probe session limit.",
    ),
    in_section(
        key(
            "allow_insecure_webhooks",
            Kind::Bool,
            None,
            "false",
            WEBHOOK_ENDPOINT,
            "Webhook servers' certificates are not verified; plain HTTP allowed.",
        ),
        Section::Webhook,
    ),
    in_section(
        key(
            "webhook_ssl_key",
            Kind::Path,
            None,
            "none",
            WEBHOOK_ENDPOINT,
            "Client key for a webhook endpoint.",
        ),
        Section::Webhook,
    ),
    in_section(
        key(
            "webhook_ssl_crt",
            Kind::Path,
            None,
            "none",
            WEBHOOK_ENDPOINT,
            "Client certificate for a webhook endpoint.",
        ),
        Section::Webhook,
    ),
    in_section(
        key(
            "webhook_ssl_crl",
            Kind::Path,
            None,
            "none",
            WEBHOOK_ENDPOINT,
            "Certificate revocation list for a webhook endpoint.",
        ),
        Section::Webhook,
    ),
    in_section(
        key(
            "webhook_ssl_ca_crt",
            Kind::Path,
            None,
            "ca_file",
            WEBHOOK_ENDPOINT,
            "CA certificate for a webhook endpoint.",
        ),
        Section::Webhook,
    ),
    in_section(
        key(
            "ssl_crt",
            Kind::Path,
            None,
            "none",
            BARMAN,
            "Client certificate for the pg-backup-api endpoint.",
        ),
        Section::Barman,
    ),
    in_section(
        key(
            "ssl_key",
            Kind::Path,
            None,
            "none",
            BARMAN,
            "Client key for the pg-backup-api endpoint.",
        ),
        Section::Barman,
    ),
    in_section(
        key(
            "ssl_ca_crt",
            Kind::Path,
            None,
            "ca_file",
            BARMAN,
            "CA certificate for the pg-backup-api endpoint.",
        ),
        Section::Barman,
    ),
];

/// The key `name` as a section of kind `section` may hold it (webhook keys are also valid in
/// `[PEM/agent]`, where PEM 7-9 kept them).
pub fn find(section: Section, name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| {
        k.name == name
            && (k.section == section
                || (section == Section::Agent && k.section == Section::Webhook))
    })
}

/// The keys registration writes, in order, with their values.
pub fn written() -> impl Iterator<Item = (&'static str, &'static str)> {
    KEYS.iter().filter_map(|k| k.written.map(|w| (k.name, w)))
}

fn here(k: &Key) -> String {
    match k.support {
        Support::Pem => "yes".into(),
        Support::Own => "this agent's key".into(),
        Support::Alias(of) => format!("read as `{of}`"),
        Support::NotImplemented(what) => format!("accepted; {what} not implemented"),
        Support::Accepted(why) => format!("accepted; {why}"),
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The README's key table: one row per key, grouped by section.
pub fn markdown() -> String {
    let mut s = String::from(
        "| section | key | value | default | meaning | here |\n|---|---|---|---|---|---|\n",
    );
    for k in KEYS {
        let default = match k.written {
            Some(w) if !w.is_empty() && w != k.default => {
                format!("{} (registration writes `{w}`)", k.default)
            }
            _ => k.default.to_string(),
        };
        s.push_str(&format!(
            "| `{}` | `{}` | {} | {} | {} | {} |\n",
            k.section.title(),
            k.name,
            k.kind.form(),
            cell(&default),
            cell(k.doc),
            cell(&here(k)),
        ));
    }
    s
}

/// Wraps `text` into `# ` comment lines of at most 100 characters.
fn comment(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() + 1 + word.len() > 100 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// packaging/agent.cfg.sample: every key with its meaning; the keys registration writes with
/// their values, the others commented out.
pub fn sample() -> String {
    let mut s = String::from(
        "# Sample agent.cfg for pemworker: every key it reads or accepts, generated from the key table\n\
         # (src/agentcfg/keys.rs). `pemworker --register-agent` writes the real\n\
         # /usr/edb/pem/agent/etc/agent.cfg; this file is only a reference. Comments go on their own\n\
         # lines (a `#` after a value is part of the value). Relative paths are relative to the\n\
         # directory agent.cfg is in. Check a file with:\n\
         #   pemworker -c /usr/edb/pem/agent/etc/agent.cfg --check-config\n",
    );
    let mut section = None;
    for k in KEYS {
        let title = match k.section {
            Section::Agent => "[PEM/agent]",
            Section::Webhook => "[WEBHOOK/name]",
            Section::Barman => "[BARMAN/1]",
        };
        if section != Some(k.section) {
            s.push('\n');
            if k.section != Section::Agent {
                s.push_str(&comment(&format!(
                    "{} sections (kept as they are; see the README's key table):",
                    k.section.title()
                )));
                s.push_str(&format!("#{title}\n"));
            } else {
                s.push_str(&format!("{title}\n"));
            }
            section = Some(k.section);
        }
        let mut text = format!("{} Default: {}.", k.doc, k.default);
        match k.support {
            Support::Pem => {}
            _ => text.push_str(&format!(" Here: {}.", here(k).replace('`', ""))),
        }
        s.push_str(&comment(&format!("{}: {text}", k.name)));
        match (k.section, k.written) {
            (Section::Agent, Some(w)) => s.push_str(&format!("{}={w}\n", k.name)),
            _ => s.push_str(&format!("#{}=\n", k.name)),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of `a` and `b` as a diff (`-` only in `a`, `+` only in `b`), from their longest
    /// common subsequence.
    fn diff(a: &str, b: &str) -> String {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
        let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                lcs[i][j] = if a[i] == b[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let (mut i, mut j, mut out) = (0, 0, String::new());
        while i < a.len() || j < b.len() {
            if i < a.len() && j < b.len() && a[i] == b[j] {
                (i, j) = (i + 1, j + 1);
            } else if i == a.len() || (j < b.len() && lcs[i][j + 1] > lcs[i + 1][j]) {
                out.push_str(&format!("+{}\n", b[j]));
                j += 1;
            } else {
                out.push_str(&format!("-{}\n", a[i]));
                i += 1;
            }
        }
        out
    }

    const BEGIN: &str = "<!-- agent.cfg keys: begin (rendered from src/agentcfg/keys.rs) -->\n";
    const END: &str = "<!-- agent.cfg keys: end -->\n";

    /// With `PEMWORKER_UPDATE_GENERATED=1` the files are rewritten instead of compared.
    fn update() -> bool {
        std::env::var_os("PEMWORKER_UPDATE_GENERATED").is_some()
    }

    #[test]
    fn readme_key_table_is_the_table_in_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let start = readme
            .find(BEGIN)
            .expect("README.md has the key table's begin marker");
        let end = readme
            .find(END)
            .expect("README.md has the key table's end marker");
        let found = &readme[start + BEGIN.len()..end];
        let want = markdown();
        if update() {
            std::fs::write(
                path,
                format!("{}{want}{}", &readme[..start + BEGIN.len()], &readme[end..]),
            )
            .unwrap();
            return;
        }
        assert!(
            found == want,
            "README.md's key table differs from src/agentcfg/keys.rs (- README, + code; \
             PEMWORKER_UPDATE_GENERATED=1 cargo test --lib agentcfg rewrites it):\n{}",
            diff(found, &want)
        );
    }

    #[test]
    fn packaged_sample_is_the_table_in_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/agent.cfg.sample");
        let found = std::fs::read_to_string(path).unwrap();
        let want = sample();
        if update() {
            std::fs::write(path, want).unwrap();
            return;
        }
        assert!(
            found == want,
            "packaging/agent.cfg.sample differs from src/agentcfg/keys.rs (- file, + code; \
             PEMWORKER_UPDATE_GENERATED=1 cargo test --lib agentcfg rewrites it):\n{}",
            diff(&found, &want)
        );
    }

    #[test]
    fn the_diff_shows_what_changed() {
        assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "-b\n+x\n");
        assert_eq!(diff("a\n", "a\n"), "");
    }

    #[test]
    fn names_are_unique_per_section_and_written_keys_come_first() {
        for (i, a) in KEYS.iter().enumerate() {
            for b in &KEYS[i + 1..] {
                assert!(
                    !(a.name == b.name && a.section == b.section),
                    "{} twice",
                    a.name
                );
            }
        }
        let first_unwritten = KEYS.iter().position(|k| k.written.is_none()).unwrap();
        assert!(KEYS[first_unwritten..].iter().all(|k| k.written.is_none()));
        for k in KEYS {
            if let Some(w) = k.written.filter(|w| !w.is_empty()) {
                assert!(k.kind.accepts(w), "{} writes {w:?}", k.name);
            }
            if let Support::Alias(of) = k.support {
                assert!(
                    find(Section::Agent, of).is_some(),
                    "{} aliases {of}",
                    k.name
                );
            }
        }
    }

    #[test]
    fn value_forms() {
        for v in [
            "true", "TRUE", "True", "yes", "YES", "on", "On", "1", " true ",
        ] {
            assert_eq!(parse_bool(v), Some(true), "{v}");
        }
        for v in ["false", "FALSE", "No", "off", "OFF", "0"] {
            assert_eq!(parse_bool(v), Some(false), "{v}");
        }
        for v in ["", "maybe", "2", "yess", "t", "n"] {
            assert_eq!(parse_bool(v), None, "{v}");
        }
        assert_eq!(
            parse_hosts("h1, h2 ,h3"),
            Some(vec!["h1".into(), "h2".into(), "h3".into()])
        );
        assert_eq!(parse_hosts(" , "), None);
        assert_eq!(parse_ports("5432"), Some(vec![5432]));
        assert_eq!(parse_ports("5432, 6432"), Some(vec![5432, 6432]));
        assert_eq!(parse_ports("5432,"), None);
        assert_eq!(parse_ports("0"), None);
        assert_eq!(parse_ports("65536"), None);
        let s = std::time::Duration::from_secs;
        assert_eq!(parse_timeout("0"), Some(None), "0 = wait indefinitely");
        assert_eq!(
            parse_timeout("-1"),
            Some(Some(crate::config::DEFAULT_CONNECT_TIMEOUT))
        );
        assert_eq!(parse_timeout("15"), Some(Some(s(15))));
        assert_eq!(parse_timeout("-2"), None);
        assert_eq!(parse_seconds("0", 1), None);
        assert_eq!(parse_seconds("30", 1), Some(s(30)));
        assert_eq!(parse_size("64MB"), Some(64 << 20));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("lots"), None);
        for m in [
            "verify-CA",
            "VERIFY-FULL",
            "Require",
            "prefer",
            "disable",
            "allow",
        ] {
            assert!(Kind::SslMode.accepts(m), "{m}");
        }
        assert!(!Kind::SslMode.accepts("verify"));
        for l in ["WARNING", "Debug1", "debug", "error", "INFO", "debug2"] {
            assert!(Kind::LogLevel.accepts(l), "{l}");
        }
    }

    #[test]
    fn a_key_not_implemented_is_named_only_when_its_value_asks_for_it() {
        let k = |n| find(Section::Agent, n).unwrap();
        assert_eq!(k("enable_webhook").note("false"), None);
        assert_eq!(k("enable_webhook").note("FALSE"), None);
        assert_eq!(k("max_webhook_retries").note("3"), None);
        assert_eq!(k("alert_threads").note("0"), None);
        assert_eq!(k("agent_conn_string").note(""), None);
        assert_eq!(k("alert_reconnect_delay").note("30"), None);
        assert_eq!(k("allow_server_restart").note("false"), None);
        assert_eq!(k("allow_server_restart").note("true"), None);
        let note = k("enable_webhook").note("true").unwrap();
        assert_eq!(
            note,
            "enable_webhook=true: webhook notification is not implemented by this agent; the key is accepted and ignored"
        );
        assert!(k("enable_nagios").note("yes").is_some());
        assert!(
            k("connection_custom_setup")
                .note("SET work_mem = '4MB'")
                .is_some()
        );
        assert!(
            k("ca_file")
                .note("/etc/ssl/certs/ca-certificates.crt")
                .is_some()
        );
        assert_eq!(k("pem_host").note("elsewhere"), None);
        // Webhook keys: in [WEBHOOK/<name>] (PEM 10) and in [PEM/agent] (PEM 7-9).
        assert!(find(Section::Webhook, "webhook_ssl_crt").is_some());
        assert!(find(Section::Agent, "webhook_ssl_crt").is_some());
        assert!(find(Section::Webhook, "pem_host").is_none());
        assert!(find(Section::Barman, "ssl_ca_crt").is_some());
        assert!(find(Section::Agent, "ssl_ca_crt").is_none());
    }
}
