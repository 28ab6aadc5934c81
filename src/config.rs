//! The worker's configuration: agent.cfg parsed, validated and turned into an immutable
//! [`AgentConfig`]. Keys are read as the key table (`agentcfg::keys`) says. Every bad value of a
//! key this agent uses is reported with its file and line, all at once; unknown keys and
//! sections are warnings; PEM's keys this agent does not implement are accepted, with one
//! informational line when their value asks for what is not implemented.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agentcfg::keys::{self, Section, Support};
use crate::agentcfg::{self, Document, Problem, Problems};
use crate::connection::{self, ConnectSettings, SslMode, TlsChoice};

/// PEM's log levels, and what each shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug1,
    Debug2,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug1" | "debug" => LogLevel::Debug1,
            "debug2" | "trace" => LogLevel::Debug2,
            _ => return None,
        })
    }

    /// A tracing filter: our own crate at this level, dependencies no noisier than warnings
    /// (their debug output is not the operator's concern unless asked with debug2).
    pub fn filter(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            // The worker's start line (worker::START_TARGET) and its certificate renewals
            // (worker::renewal::TARGET) also at the default level.
            LogLevel::Warning => "warn,pemworker::started=info,pemworker::renewed=info",
            LogLevel::Info => "warn,pemworker=info",
            LogLevel::Debug1 => "warn,pemworker=debug",
            LogLevel::Debug2 => "debug,pemworker=trace",
        }
    }
}

/// A checked agent.cfg.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub path: PathBuf,
    /// pem_host may list several hosts, tried in order.
    pub pem_hosts: Vec<String>,
    /// The first host's port.
    pub pem_port: u16,
    /// Each host's port (pem_port lists one for all, or one per host).
    pub pem_ports: Vec<u16>,
    pub agent_id: i32,
    pub agent_user: String,
    pub agent_ssl_key: PathBuf,
    pub agent_ssl_crt: PathBuf,
    /// sslmode towards the PEM server (PEM's key); `None`: PGSSLMODE, else verify-full.
    pub pem_ssl_mode: Option<SslMode>,
    /// The root certificate the PEM server's (or pgBouncer's) certificate must chain to.
    pub pem_ssl_root_cert: Option<PathBuf>,
    /// The secret every write is authenticated with (`agent_secret_file`); `None` for an agent
    /// registered before per-agent secrets, whose writes the server refuses.
    pub agent_secret: Option<crate::mac::AgentKey>,
    /// Where `agent_secret` was read from (read again when the server refuses it).
    pub agent_secret_file: Option<PathBuf>,
    pub log_level: LogLevel,
    pub log_location: Option<PathBuf>,
    pub long_wait: Duration,
    pub short_wait: Duration,
    /// Sessions open to monitored servers and pgBouncer consoles at once, idle ones included;
    /// `None` = unlimited (PEM's 0).
    pub max_connections: Option<usize>,
    /// How long opening a session may take; `None`: no limit (PEM's 0).
    pub connect_timeout: Option<Duration>,
    /// How long an idle session to a monitored server or pgBouncer console is kept (PEM's
    /// meaning); `None` = as long as its target is probed (PEM's 0).
    pub connection_lifetime: Option<Duration>,
    /// Sessions with the PEM server are renewed after this long (this agent's key; older
    /// versions read connection_lifetime for it); `None` = kept (0).
    pub pem_session_lifetime: Option<Duration>,
    pub heartbeat_connection: bool,
    pub enable_smtp: bool,
    pub enable_snmp: bool,
    pub enable_webhook: bool,
    pub state_dir: PathBuf,
    /// The directory the default state_dir lies in (`state_dir` not set): where earlier
    /// versions kept one spool for every agent of the host.
    pub shared_state_dir: Option<PathBuf>,
    pub spool_limit: u64,
    /// The share of its lifetime after which the running worker renews its certificate
    /// (`certificate_renewal_fraction`, default 2/3); `None` = never (0).
    pub certificate_renewal_fraction: Option<f64>,
}

/// Used when agent.cfg's connect_timeout is absent or -1 (what PEM's registration writes for
/// "not set", which libpq takes as no limit): an agent should not hang on a dead server unless
/// told to (connect_timeout=0, PEM's "wait indefinitely").
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SPOOL_LIMIT: u64 = 64 * 1024 * 1024;

/// Where agents keep their state by default, each in `agent<ID>` below it: systemd's
/// `$STATE_DIRECTORY` (the unit's `StateDirectory=`) when set, else `/var/lib/pem/agent` as root
/// and `~/.pem/state` for other users.
fn default_state_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY") {
        // systemd lists several directories separated by colons; ours is the first.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if first.starts_with('/') {
            return PathBuf::from(first);
        }
    }
    if nix::unistd::Uid::effective().is_root() {
        PathBuf::from("/var/lib/pem/agent")
    } else {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".pem")
            .join("state")
    }
}

/// Something to tell about a configuration that is nonetheless usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A key or section that is ignored, or a bad value of a key this agent does not use.
    Warning(String),
    /// A key PEM knows, set to ask for something this agent does not implement.
    Info(String),
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::Warning(m) | Notice::Info(m) => f.write_str(m),
        }
    }
}

impl AgentConfig {
    /// Reads and checks `path`, with `-o key=value` overrides applied first. Returns the
    /// configuration and what to tell about it (ignored keys and sections, keys this agent does
    /// not implement), or every problem found.
    pub fn load(
        path: &Path,
        overrides: &[(String, String)],
    ) -> Result<(AgentConfig, Vec<Notice>), Problems> {
        let mut doc = Document::read(path).map_err(|e| {
            Problems(vec![Problem {
                file: path.to_path_buf(),
                line: None,
                message: format!("cannot read the agent configuration: {e}"),
            }])
        })?;
        for (k, v) in overrides {
            doc.set(k, v, None);
        }
        Self::from_document(path, &doc)
    }

    /// Reads and checks `path` without overrides, returning the file too, for commands that
    /// rewrite it (migration) or only need the agent's identity (verification, servers).
    pub fn load_with_document(path: &Path) -> Result<(Document, AgentConfig), Problems> {
        let doc = Document::read(path).map_err(|e| {
            Problems(vec![Problem {
                file: path.to_path_buf(),
                line: None,
                message: format!(
                    "cannot read the agent configuration: {e}; register the agent first (--register-agent)"
                ),
            }])
        })?;
        let (c, _) = Self::from_document(path, &doc)?;
        Ok((doc, c))
    }

    /// The first configured PEM host (registration-time commands talk to it; the worker
    /// fails over along the list).
    pub fn pem_host(&self) -> &str {
        self.pem_hosts.first().map_or("127.0.0.1", String::as_str)
    }

    /// sslmode and root certificate as this agent.cfg sets them (pem_ssl_mode,
    /// pem_ssl_root_cert; PEM's ca_file is another CA's).
    pub fn tls_choice(&self) -> TlsChoice {
        TlsChoice {
            mode: self.pem_ssl_mode,
            root_cert: self.pem_ssl_root_cert.clone(),
        }
    }

    /// Session settings for each configured PEM host (with its port): the agent user with its
    /// certificate, sslmode and root certificate from agent.cfg (else libpq's PGSSLMODE and
    /// PGSSLROOTCERT, else verify-full and ~/.postgresql/root.crt).
    pub fn pem_targets(&self) -> Result<Vec<ConnectSettings>, connection::Error> {
        self.pem_hosts
            .iter()
            .zip(&self.pem_ports)
            .map(|(h, &port)| {
                let mut s = ConnectSettings::from_env(h, port, &self.agent_user, "pem")?;
                s.choose_tls(&TlsChoice::default(), &self.tls_choice())?;
                s.client_cert = Some((self.agent_ssl_crt.clone(), self.agent_ssl_key.clone()));
                // No limit (PEM's 0): a deadline beyond any wait.
                s.connect_timeout = self.connect_timeout.unwrap_or(Duration::MAX);
                s.application_name = format!("pemworker agent {}", self.agent_id);
                Ok(s)
            })
            .collect()
    }

    pub fn from_document(
        path: &Path,
        doc: &Document,
    ) -> Result<(AgentConfig, Vec<Notice>), Problems> {
        let mut problems = Vec::new();
        let mut notices = Vec::new();
        let at = |line: usize| format!("{}:{line}", path.display());
        let mut problem = |line: Option<usize>, message: String| {
            problems.push(Problem {
                file: path.to_path_buf(),
                line,
                message,
            })
        };
        if !doc.has_section() {
            problem(None, format!("no [{}] section", agentcfg::SECTION));
        }
        for (line, raw) in doc.malformed_lines() {
            problem(Some(line), format!("expected key=value, found {raw:?}"));
        }
        // Every entry of every section against the key table: unknown keys and sections are
        // warnings, bad values of keys this agent uses are problems, of keys it only accepts
        // warnings, and a key it does not implement set to ask for something one note.
        for (line, name) in doc.sections() {
            if Section::of_header(name).is_none() {
                notices.push(Notice::Warning(format!(
                    "{}: unknown section [{name}] is ignored",
                    at(line)
                )));
            }
        }
        for (section, e) in doc.all_entries() {
            let Some(section) = section else {
                notices.push(Notice::Warning(format!(
                    "{}: {} is before any section and is ignored",
                    at(e.line),
                    e.key
                )));
                continue;
            };
            let Some(sect) = Section::of_header(section) else {
                continue;
            };
            let Some(k) = keys::find(sect, e.key) else {
                let place = if sect == Section::Agent {
                    String::new()
                } else {
                    format!(" in [{section}]")
                };
                notices.push(Notice::Warning(format!(
                    "{}: unknown key {}{place} is ignored",
                    at(e.line),
                    e.key
                )));
                continue;
            };
            if !e.value.is_empty() && !k.kind.accepts(e.value) {
                let message = format!("{} {:?} is not {}", e.key, e.value, k.kind.expected());
                match k.support {
                    Support::Pem | Support::Own | Support::Alias(_) => {
                        problem(Some(e.line), message)
                    }
                    Support::NotImplemented(_) | Support::Accepted(_) => {
                        notices.push(Notice::Warning(format!(
                            "{}: {message} (this agent does not use the key)",
                            at(e.line)
                        )))
                    }
                }
            } else if let Some(note) = k.note(e.value) {
                notices.push(Notice::Info(format!("{}: {note}", at(e.line))));
            }
        }

        let entries = doc.entries();
        // The last non-empty value (a later line wins, as in PEM); an empty value is unset.
        let find = |key: &str| {
            entries
                .iter()
                .rev()
                .find(|e| e.key == key && !e.value.is_empty())
                .map(|e| (e.line, e.value))
        };
        // Values were checked above; a bad one was reported and gets the default here.
        let value = |key: &str| find(key).map(|(_, v)| v);
        // Relative paths are relative to agent.cfg's directory (PEM 10), whatever directory
        // the worker was started in (and it leaves it when it detaches).
        let dir = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let file = |key: &str| value(key).map(|v| dir.join(v));

        let pem_hosts = match doc.get("pem_host") {
            None => vec!["127.0.0.1".to_string()],
            Some(v) => keys::parse_hosts(v).unwrap_or_else(|| {
                if v.is_empty() {
                    problem(
                        entries
                            .iter()
                            .rev()
                            .find(|e| e.key == "pem_host")
                            .map(|e| e.line),
                        "pem_host is empty".into(),
                    );
                }
                vec!["127.0.0.1".to_string()]
            }),
        };
        let ports = value("pem_port")
            .and_then(keys::parse_ports)
            .unwrap_or_else(|| vec![5432]);
        let pem_ports = if ports.len() == 1 {
            vec![ports[0]; pem_hosts.len()]
        } else if ports.len() == pem_hosts.len() {
            ports
        } else {
            problem(
                find("pem_port").map(|(l, _)| l),
                format!(
                    "pem_port lists {} ports for {} hosts in pem_host; give one port for all hosts, or one per host",
                    ports.len(),
                    pem_hosts.len()
                ),
            );
            vec![ports[0]; pem_hosts.len()]
        };
        let agent_id = match find("agent_id").or_else(|| find("pem_agent")) {
            Some((_, v)) => keys::parse_id(v),
            None => {
                problem(
                    None,
                    "agent_id is missing; register the agent (--register-agent) or add it".into(),
                );
                None
            }
        };
        let mut required_file = |key: &str| match find(key) {
            Some(_) => file(key),
            None => {
                let line = entries.iter().rev().find(|e| e.key == key).map(|e| e.line);
                problem(
                    line,
                    match line {
                        Some(_) => format!("{key} is empty"),
                        None => format!(
                            "{key} is missing; register the agent (--register-agent) or add it"
                        ),
                    },
                );
                None
            }
        };
        let key = required_file("agent_ssl_key");
        let crt = required_file("agent_ssl_crt");
        let line_of = |key: &str| find(key).map(|(l, _)| l);
        if let Some(k) = &key {
            match std::fs::metadata(k) {
                Err(e) => problem(
                    line_of("agent_ssl_key"),
                    format!("agent_ssl_key {}: {e}", k.display()),
                ),
                Ok(m) if m.permissions().mode() & 0o077 != 0 => problem(
                    line_of("agent_ssl_key"),
                    format!(
                        "agent_ssl_key {} has group or world access; run chmod 0600 {}",
                        k.display(),
                        k.display()
                    ),
                ),
                Ok(_) => {}
            }
        }
        if let Some(c) = &crt {
            if let Err(e) = std::fs::metadata(c) {
                problem(
                    line_of("agent_ssl_crt"),
                    format!("agent_ssl_crt {}: {e}", c.display()),
                );
            }
        }
        let agent_secret_file = file("agent_secret_file");
        let agent_secret =
            agent_secret_file
                .as_ref()
                .and_then(|f| match crate::mac::AgentKey::load(f) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        problem(line_of("agent_secret_file"), e.to_string());
                        None
                    }
                });
        let pem_ssl_root_cert = file("pem_ssl_root_cert");
        if let Some(r) = &pem_ssl_root_cert {
            if let Err(e) = std::fs::metadata(r) {
                problem(
                    line_of("pem_ssl_root_cert"),
                    format!("pem_ssl_root_cert {}: {e}", r.display()),
                );
            }
        }
        let pem_ssl_mode = value("pem_ssl_mode").and_then(|v| v.parse::<SslMode>().ok());
        let log_level = value("log_level")
            .and_then(LogLevel::parse)
            .unwrap_or(LogLevel::Warning);
        let secs = |key: &str, min: u64, default: u64| {
            value(key)
                .and_then(|v| keys::parse_seconds(v, min))
                .unwrap_or(Duration::from_secs(default))
        };
        let long_wait = secs("long_wait", 1, 30);
        let short_wait = secs("short_wait", 1, 10);
        let max_connections = value("max_connections")
            .and_then(keys::parse_count)
            .filter(|&n| n > 0);
        let connect_timeout = value("connect_timeout")
            .and_then(keys::parse_timeout)
            .unwrap_or(Some(DEFAULT_CONNECT_TIMEOUT));
        let lifetime = |key: &str| Some(secs(key, 0, 0)).filter(|d| !d.is_zero());
        let connection_lifetime = lifetime("connection_lifetime");
        let pem_session_lifetime = lifetime("pem_session_lifetime");
        let flag = |key: &str| value(key).and_then(keys::parse_bool).unwrap_or(false);
        let spool_limit = value("spool_limit")
            .and_then(keys::parse_size)
            .filter(|&n| n >= 4096)
            .unwrap_or(DEFAULT_SPOOL_LIMIT);
        // 2/3 of its lifetime unless set; 0 = never.
        let certificate_renewal_fraction = match value("certificate_renewal_fraction") {
            None => Some(2.0 / 3.0),
            Some(v) => keys::parse_fraction(v).filter(|&f| f > 0.0),
        };
        let state_dir = file("state_dir");
        let log_location = file("log_location");
        let agent_user = value("agent_user").map(str::to_string);
        // A verifying sslmode (the default) without a root certificate cannot connect at all:
        // say so now, not at every reconnection.
        let tls = TlsChoice {
            mode: pem_ssl_mode,
            root_cert: pem_ssl_root_cert.clone(),
        };
        if let Ok(mut s) = ConnectSettings::from_env("pem", 5432, "agent", "pem") {
            let tcp = pem_hosts.iter().any(|h| !h.starts_with('/'));
            if s.choose_tls(&TlsChoice::default(), &tls).is_ok()
                && tcp
                && s.sslmode.verifies(false)
                && s.root_cert.is_none()
            {
                // Files written by earlier versions of this agent name the PEM server's CA
                // ca_file, which is PEM's key for another CA.
                let migrate = match find("ca_file") {
                    Some((line, v)) => format!(
                        "; ca_file (line {line}) is the CA of webhook and pg-backup-api endpoints, not read for the PEM server: if {v} is the PEM server's CA, as earlier versions of this agent wrote it, rename ca_file to pem_ssl_root_cert"
                    ),
                    None => String::new(),
                };
                problem(
                    line_of("pem_ssl_mode"),
                    format!(
                        "sslmode {} needs the root certificate that signed the PEM server's (or pgBouncer's) certificate: set pem_ssl_root_cert (or PGSSLROOTCERT), or choose pem_ssl_mode explicitly{migrate}",
                        s.sslmode
                    ),
                );
            }
        }

        match (agent_id, key, crt) {
            (Some(agent_id), Some(agent_ssl_key), Some(agent_ssl_crt)) if problems.is_empty() => {
                Ok((
                    AgentConfig {
                        path: path.to_path_buf(),
                        pem_port: pem_ports[0],
                        pem_hosts,
                        pem_ports,
                        agent_id,
                        agent_user: agent_user.unwrap_or_else(|| format!("agent{agent_id}")),
                        agent_ssl_key,
                        agent_ssl_crt,
                        pem_ssl_mode,
                        pem_ssl_root_cert,
                        agent_secret,
                        agent_secret_file,
                        log_level,
                        log_location,
                        long_wait,
                        short_wait,
                        max_connections,
                        connect_timeout,
                        connection_lifetime,
                        pem_session_lifetime,
                        heartbeat_connection: flag("heartbeat_connection"),
                        enable_smtp: flag("enable_smtp"),
                        enable_snmp: flag("enable_snmp"),
                        enable_webhook: flag("enable_webhook"),
                        shared_state_dir: state_dir.is_none().then(default_state_base),
                        state_dir: state_dir.unwrap_or_else(|| {
                            default_state_base().join(format!("agent{agent_id}"))
                        }),
                        spool_limit,
                        certificate_renewal_fraction,
                    },
                    notices,
                ))
            }
            _ => Err(Problems(problems)),
        }
    }

    /// Loads the agent's certificate and key as a session does (`--check-config`): a key
    /// OpenSSL cannot read, or one that does not belong to the certificate, is a problem.
    pub fn check_identity(&self) -> Result<(), Problem> {
        crate::connection::tls::check_identity(&self.agent_ssl_crt, &self.agent_ssl_key).map_err(
            |e| Problem {
                file: self.path.clone(),
                line: None,
                message: e.to_string(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agentcfg::keys::{KEYS, Key, Kind};

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_good_file_gives_typed_values() {
        let d = tempfile::tempdir().unwrap();
        let key = write(d.path(), "a.key", "k", 0o600);
        let crt = write(d.path(), "a.crt", "c", 0o644);
        let cfg = write(
            d.path(),
            "agent.cfg",
            &format!(
                "[PEM/agent]\npem_host=h1, h2\npem_port=6432\nagent_id=12\nagent_ssl_key={}\nagent_ssl_crt={}\n\
                 log_level=debug1\nlong_wait=20\nmax_connections=0\nconnect_timeout=-1\nconnection_lifetime=300\npem_session_lifetime=3600\n\
                 heartbeat_connection=true\nspool_limit=8MB\nmystery=1\npem_ssl_root_cert={}\n",
                key.display(),
                crt.display(),
                crt.display()
            ),
            0o644,
        );
        let (c, warnings) = AgentConfig::load(&cfg, &[("short_wait".into(), "3".into())]).unwrap();
        assert_eq!(c.pem_hosts, vec!["h1", "h2"]);
        assert_eq!(
            (c.pem_port, c.agent_id, c.agent_user.as_str()),
            (6432, 12, "agent12")
        );
        assert_eq!(c.log_level, LogLevel::Debug1);
        assert_eq!(
            (c.long_wait, c.short_wait),
            (Duration::from_secs(20), Duration::from_secs(3))
        );
        assert_eq!(c.max_connections, None);
        assert_eq!(c.connect_timeout, Some(DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(c.connection_lifetime, Some(Duration::from_secs(300)));
        assert_eq!(c.pem_session_lifetime, Some(Duration::from_secs(3600)));
        assert!(c.heartbeat_connection);
        assert_eq!(c.spool_limit, 8 << 20);
        assert_eq!(c.pem_ssl_mode, None, "verify-full unless chosen");
        assert_eq!(c.tls_choice().root_cert, Some(crt.clone()));
        // No state_dir: one of its own, named after the agent, under the shared base.
        let base = c
            .shared_state_dir
            .as_ref()
            .expect("default state directory");
        assert_eq!(c.state_dir, base.join("agent12"));
        let (c, _) = AgentConfig::load(&cfg, &[("state_dir".into(), "/srv/pem".into())]).unwrap();
        assert_eq!(
            (c.state_dir.as_path(), c.shared_state_dir),
            (Path::new("/srv/pem"), None)
        );
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].to_string().contains(":15: unknown key mystery"),
            "{warnings:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let key = write(d.path(), "a.key", "k", 0o644);
        let cfg = write(
            d.path(),
            "agent.cfg",
            &format!(
                "[PEM/agent]\npem_port=sixtyfour\nagent_ssl_key={}\nagent_ssl_crt=/nonexistent/a.crt\nlog_level=loud\n",
                key.display()
            ),
            0o644,
        );
        let err = AgentConfig::load(&cfg, &[]).unwrap_err();
        let msgs: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        let has = |s: &str| msgs.iter().any(|m| m.contains(s));
        assert!(
            has("agent.cfg:2: pem_port \"sixtyfour\" is not a port number"),
            "{msgs:?}"
        );
        assert!(has("agent_id is missing"), "{msgs:?}");
        assert!(
            has("agent.cfg:3: agent_ssl_key") && has("group or world access"),
            "{msgs:?}"
        );
        assert!(
            has("agent.cfg:4: agent_ssl_crt /nonexistent/a.crt"),
            "{msgs:?}"
        );
        assert!(has("agent.cfg:5: log_level \"loud\""), "{msgs:?}");
        // Unless this machine's environment provides a root certificate.
        let env_root = std::env::var_os("PGSSLROOTCERT").is_some_and(|v| !v.is_empty())
            || std::env::var_os("HOME")
                .is_some_and(|h| Path::new(&h).join(".postgresql/root.crt").exists());
        assert_eq!(
            has("agent.cfg: sslmode verify-full needs the root certificate"),
            !env_root,
            "{msgs:?}"
        );
        assert_eq!(msgs.len(), if env_root { 5 } else { 6 }, "{msgs:?}");
    }

    /// A key and certificate in `dir` (mode 0600 and 0644), and an agent.cfg there with `body`
    /// after `[PEM/agent]` and agent_id; `{key}`/`{crt}` in `body` are their absolute paths.
    fn agent_cfg(dir: &Path, body: &str) -> PathBuf {
        let key = write(dir, "a.key", "k", 0o600);
        let crt = write(dir, "a.crt", "c", 0o644);
        let body = body
            .replace("{key}", &key.display().to_string())
            .replace("{crt}", &crt.display().to_string());
        write(
            dir,
            "agent.cfg",
            &format!("[PEM/agent]\nagent_id=12\n{body}"),
            0o644,
        )
    }

    fn notices(n: &[Notice]) -> Vec<String> {
        n.iter()
            .map(|n| match n {
                Notice::Warning(w) => format!("warning: {w}"),
                Notice::Info(i) => format!("note: {i}"),
            })
            .collect()
    }

    const FILES: &str = "agent_ssl_key={key}\nagent_ssl_crt={crt}\npem_ssl_mode=require\n";

    #[test]
    fn pem_keys_and_sections_are_accepted_without_warnings() {
        let d = tempfile::tempdir().unwrap();
        // Every key of PEM 7-10 at its usual value, and PEM 10's other sections.
        let cfg = agent_cfg(
            d.path(),
            &format!(
                "{FILES}enable_nagios=false\nmax_webhook_retries=3\nalert_reconnect_delay=30\n\
                 agent_flag_dir=/tmp/pem/agent-12\nconnection_custom_setup=\npem_agent=12\n\
                 agent_conn_string=\nallow_insecure_webhooks=false\nwebhook_ssl_key=\n\
                 webhook_ssl_crt=\nwebhook_ssl_crl=\nwebhook_ssl_ca_crt=\nenable_smtp=false\n\
                 enable_snmp=false\nenable_webhook=false\nalert_threads=0\n\
                 allow_server_restart=true\nallow_package_management=false\n\
                 allow_streaming_replication=false\nallow_batch_probes=false\n\
                 batch_script_dir=/tmp\nagent_ssl_passphrase_script=\n\
                 check_server_certificate_expiry=true\nskip_db_certificate=false\n\
                 agent_log_location=/var/log/pem/agent.log\n\
                 [WEBHOOK/ops]\nwebhook_ssl_crt=ops.crt\nwebhook_ssl_key=ops.key\n\
                 webhook_ssl_ca_crt=/etc/ssl/certs/ca-certificates.crt\nallow_insecure_webhooks=false\n\
                 [BARMAN/3]\nssl_crt=barman.crt\nssl_key=barman.key\nssl_ca_crt=barman-ca.crt\n"
            ),
        );
        let (_, n) = AgentConfig::load(&cfg, &[]).unwrap();
        // One note: a flag directory asks for HA takeover, which is not implemented.
        assert_eq!(
            notices(&n),
            [format!(
                "note: {}:9: agent_flag_dir=/tmp/pem/agent-12: HA takeover by flag file is not implemented by this agent; the key is accepted and ignored",
                cfg.display()
            )]
        );
    }

    #[test]
    fn keys_not_implemented_get_one_note_and_unknown_ones_a_warning() {
        let d = tempfile::tempdir().unwrap();
        let cfg = agent_cfg(
            d.path(),
            &format!(
                "{FILES}enable_webhook=TRUE\nconnection_custom_setup=SET work_mem = '8MB'\n\
                 enable_nagios=maybe\nmystery=1\n[WEBHOOK/ops]\nwebhook_ssl_crt=a\nstray=1\n\
                 [ELSEWHERE]\nx=1\n"
            ),
        );
        let (_, n) = AgentConfig::load(&cfg, &[]).unwrap();
        let f = cfg.display();
        assert_eq!(
            notices(&n),
            [
                format!("warning: {f}:13: unknown section [ELSEWHERE] is ignored"),
                format!(
                    "note: {f}:6: enable_webhook=TRUE: webhook notification is not implemented by this agent; the key is accepted and ignored"
                ),
                format!(
                    "note: {f}:7: connection_custom_setup=SET work_mem = '8MB': custom SQL on new sessions is not implemented by this agent; the key is accepted and ignored"
                ),
                format!(
                    "warning: {f}:8: enable_nagios \"maybe\" is not true or false (also yes/no, on/off, 1/0) (this agent does not use the key)"
                ),
                format!("warning: {f}:9: unknown key mystery is ignored"),
                format!("warning: {f}:12: unknown key stray in [WEBHOOK/ops] is ignored"),
            ]
        );
    }

    #[test]
    fn every_key_of_the_table_is_accepted_and_a_bad_value_reported_by_its_use() {
        let d = tempfile::tempdir().unwrap();
        let cfg = agent_cfg(d.path(), FILES);
        let crt = d.path().join("a.crt").display().to_string();
        let key = d.path().join("a.key").display().to_string();
        let good = |k: &Key| -> String {
            match k.kind {
                Kind::Hosts => "127.0.0.1".into(),
                Kind::Ports => "5432".into(),
                Kind::Id => "12".into(),
                Kind::Count => "0".into(),
                Kind::Seconds(_) => "30".into(),
                Kind::Timeout => "5".into(),
                Kind::Bool => "false".into(),
                Kind::LogLevel => "info".into(),
                Kind::SslMode => "require".into(),
                Kind::Size => "1MB".into(),
                Kind::Fraction => "0.5".into(),
                Kind::Path if k.name == "agent_ssl_key" => key.clone(),
                Kind::Path => crt.clone(),
                Kind::Text => "x".into(),
            }
        };
        // Checked by the registration and worker tests, with a real secret.
        let in_agent = |k: &&Key| k.section != Section::Barman && k.name != "agent_secret_file";
        for k in KEYS.iter().filter(in_agent) {
            let (_, n) = AgentConfig::load(&cfg, &[(k.name.into(), good(k))])
                .unwrap_or_else(|e| panic!("{}={}: {e}", k.name, good(k)));
            assert!(
                n.iter().all(|n| matches!(n, Notice::Info(_))),
                "{}: {n:?}",
                k.name
            );
            // Any text is a host name, a path or text.
            if matches!(k.kind, Kind::Hosts | Kind::Path | Kind::Text) {
                continue;
            }
            let bad = AgentConfig::load(&cfg, &[(k.name.into(), "%bad%".into())]);
            let expected = format!("{} \"%bad%\" is not {}", k.name, k.kind.expected());
            match (k.support, bad) {
                (Support::Pem | Support::Own | Support::Alias(_), Err(e)) => {
                    assert!(e.to_string().contains(&expected), "{e}")
                }
                (Support::NotImplemented(_) | Support::Accepted(_), Ok((_, n))) => assert!(
                    matches!(&n[..], [Notice::Warning(w)] if w.contains(&expected)),
                    "{}: {n:?}",
                    k.name
                ),
                (_, other) => panic!("{}: {other:?}", k.name),
            }
        }
    }

    #[test]
    fn value_forms_are_pems_in_any_case() {
        let d = tempfile::tempdir().unwrap();
        let cfg = agent_cfg(
            d.path(),
            "agent_ssl_key={key}\nagent_ssl_crt={crt}\npem_ssl_mode=verify-CA\n\
             pem_ssl_root_cert={crt}\nheartbeat_connection=YES\nenable_smtp=Off\n\
             enable_snmp=on\nlog_level=DEBUG1\n",
        );
        let (c, _) = AgentConfig::load(&cfg, &[]).unwrap();
        assert_eq!(c.pem_ssl_mode, Some(SslMode::VerifyCa));
        assert!(c.heartbeat_connection && !c.enable_smtp && c.enable_snmp);
        assert_eq!(c.log_level, LogLevel::Debug1);
        for (v, want) in [("1", true), ("no", false), ("TRUE", true), ("0", false)] {
            let (c, _) =
                AgentConfig::load(&cfg, &[("heartbeat_connection".into(), v.into())]).unwrap();
            assert_eq!(c.heartbeat_connection, want, "{v}");
        }
        let err = AgentConfig::load(&cfg, &[("heartbeat_connection".into(), "sure".into())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("heartbeat_connection \"sure\" is not true or false"),
            "{err}"
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_directory() {
        let d = tempfile::tempdir().unwrap();
        let etc = d.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let certs = d.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        write(&certs, "agent12.key", "k", 0o600);
        write(&certs, "agent12.crt", "c", 0o644);
        let cfg = write(
            &etc,
            "agent.cfg",
            "[PEM/agent]\nagent_id=12\nagent_ssl_key=../certs/agent12.key\n\
             agent_ssl_crt=../certs/agent12.crt\npem_ssl_mode=require\nstate_dir=state\n",
            0o644,
        );
        // Loaded from elsewhere, through a relative path to the file.
        let (c, _) = AgentConfig::load(&cfg, &[]).unwrap();
        assert_eq!(c.agent_ssl_key, etc.join("../certs/agent12.key"));
        assert_eq!(c.agent_ssl_crt, etc.join("../certs/agent12.crt"));
        assert_eq!(c.state_dir, etc.join("state"));
        // A relative path that does not exist there is named as resolved.
        let err = AgentConfig::load(&cfg, &[("agent_ssl_crt".into(), "agent12.crt".into())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "agent_ssl_crt {}",
                etc.join("agent12.crt").display()
            )),
            "{err}"
        );
        // A key readable by others is refused, relative or not.
        std::fs::set_permissions(
            certs.join("agent12.key"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let err = AgentConfig::load(&cfg, &[]).unwrap_err().to_string();
        assert!(err.contains("group or world access"), "{err}");
    }

    #[test]
    fn pem_host_and_pem_port_lists_pair_up_as_in_libpq() {
        let d = tempfile::tempdir().unwrap();
        let cfg = agent_cfg(d.path(), &format!("{FILES}pem_host=h1,h2,h3\n"));
        let targets = |over: &[(&str, &str)]| {
            let over: Vec<(String, String)> = over
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            AgentConfig::load(&cfg, &over).map(|(c, _)| {
                c.pem_targets()
                    .unwrap()
                    .iter()
                    .map(|s| format!("{}:{}", s.host, s.port))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(targets(&[]).unwrap(), ["h1:5432", "h2:5432", "h3:5432"]);
        assert_eq!(
            targets(&[("pem_port", "6432")]).unwrap(),
            ["h1:6432", "h2:6432", "h3:6432"]
        );
        assert_eq!(
            targets(&[("pem_port", "5432, 6432,7432")]).unwrap(),
            ["h1:5432", "h2:6432", "h3:7432"]
        );
        let err = targets(&[("pem_port", "5432,6432")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pem_port lists 2 ports for 3 hosts in pem_host"),
            "{err}"
        );
        let err = targets(&[("pem_port", "5432,x")]).unwrap_err().to_string();
        assert!(
            err.contains("pem_port \"5432,x\" is not a port number"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn connect_timeout_zero_waits_indefinitely() {
        let d = tempfile::tempdir().unwrap();
        let cfg = agent_cfg(d.path(), FILES);
        let timeout = |v: Option<&str>| {
            let over: Vec<(String, String)> = v
                .map(|v| ("connect_timeout".into(), v.into()))
                .into_iter()
                .collect();
            let (c, _) = AgentConfig::load(&cfg, &over).unwrap();
            (
                c.connect_timeout,
                c.pem_targets().unwrap()[0].connect_timeout,
            )
        };
        assert_eq!(
            timeout(None),
            (Some(DEFAULT_CONNECT_TIMEOUT), DEFAULT_CONNECT_TIMEOUT)
        );
        assert_eq!(
            timeout(Some("-1")),
            (Some(DEFAULT_CONNECT_TIMEOUT), DEFAULT_CONNECT_TIMEOUT)
        );
        assert_eq!(
            timeout(Some("25")),
            (Some(Duration::from_secs(25)), Duration::from_secs(25))
        );
        let (none, session) = timeout(Some("0"));
        assert_eq!((none, session), (None, Duration::MAX));
        // The deadline a session is opened under: beyond any wait, and no overflow.
        assert_eq!(tokio::time::timeout(session, async { 7 }).await, Ok(7));
    }

    #[test]
    fn pem_agent_names_the_agent_id_when_agent_id_is_absent() {
        let d = tempfile::tempdir().unwrap();
        let cfg = agent_cfg(d.path(), FILES);
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("agent_id=12", "pem_agent=31");
        std::fs::write(&cfg, text).unwrap();
        let (c, n) = AgentConfig::load(&cfg, &[]).unwrap();
        assert_eq!((c.agent_id, c.agent_user.as_str()), (31, "agent31"));
        assert!(n.is_empty(), "{n:?}");
        let (c, _) = AgentConfig::load(&cfg, &[("agent_id".into(), "32".into())]).unwrap();
        assert_eq!(c.agent_id, 32, "agent_id wins");
    }

    #[test]
    fn ca_file_is_pems_https_ca_and_an_old_file_is_told_how_to_move_on() {
        let d = tempfile::tempdir().unwrap();
        let root = write(d.path(), "root.crt", "r", 0o644);
        let cfg = agent_cfg(
            d.path(),
            &format!(
                "agent_ssl_key={{key}}\nagent_ssl_crt={{crt}}\npem_ssl_mode=verify-full\nca_file={}\n",
                root.display()
            ),
        );
        let no_env_root = std::env::var_os("PGSSLROOTCERT").is_none_or(|v| v.is_empty())
            && !std::env::var_os("HOME")
                .is_some_and(|h| Path::new(&h).join(".postgresql/root.crt").exists());
        match AgentConfig::load(&cfg, &[]) {
            Err(e) => {
                assert!(no_env_root);
                let e = e.to_string();
                assert!(
                    e.contains(&format!(
                        "ca_file (line 6) is the CA of webhook and pg-backup-api endpoints, not read for the PEM server: if {} is the PEM server's CA, as earlier versions of this agent wrote it, rename ca_file to pem_ssl_root_cert",
                        root.display()
                    )),
                    "{e}"
                );
                assert_eq!(e.lines().count(), 1, "{e}");
            }
            Ok((c, _)) => {
                assert!(!no_env_root);
                assert_ne!(c.tls_choice().root_cert, Some(root.clone()));
            }
        }
        // Renamed: the PEM server's CA; ca_file (PEM's) is accepted beside it with a note, and
        // a bundle that does not exist on this host is no problem.
        let (c, n) = AgentConfig::load(
            &cfg,
            &[
                ("pem_ssl_root_cert".into(), root.display().to_string()),
                (
                    "ca_file".into(),
                    "/usr/libexec/libcurl-pem7/share/certs/ca-bundle.crt".into(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.tls_choice().root_cert, Some(root));
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(
            n[0].to_string()
                .contains("calling HTTPS endpoints (webhooks, pg-backup-api) is not implemented"),
            "{n:?}"
        );
    }
}
