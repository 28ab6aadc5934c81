//! The worker's configuration: agent.cfg parsed, validated and turned into an immutable
//! [`AgentConfig`]. Every bad key is reported with its file and line, all at once; unknown keys
//! are warnings, not errors.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    pub pem_port: u16,
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
    /// The older name of the root certificate, read when pem_ssl_root_cert is not set.
    pub ca_file: Option<PathBuf>,
    pub log_level: LogLevel,
    pub log_location: Option<PathBuf>,
    pub long_wait: Duration,
    pub short_wait: Duration,
    /// Sessions open to monitored servers and pgBouncer consoles at once, idle ones included;
    /// `None` = unlimited (PEM's 0).
    pub max_connections: Option<usize>,
    pub connect_timeout: Duration,
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

/// Used when agent.cfg's connect_timeout is -1 or 0 (PEM's "no timeout"): an agent must not
/// hang on a dead server.
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

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Sizes like `64MB`, `512k`, `1G` or plain bytes.
fn parse_size(s: &str) -> Option<u64> {
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

impl AgentConfig {
    /// Reads and checks `path`, with `-o key=value` overrides applied first. Returns the
    /// configuration and warnings (unknown keys), or every problem found.
    pub fn load(
        path: &Path,
        overrides: &[(String, String)],
    ) -> Result<(AgentConfig, Vec<String>), Problems> {
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

    /// sslmode and root certificate as this agent.cfg sets them (pem_ssl_root_cert, else the
    /// older ca_file).
    pub fn tls_choice(&self) -> TlsChoice {
        TlsChoice {
            mode: self.pem_ssl_mode,
            root_cert: self
                .pem_ssl_root_cert
                .clone()
                .or_else(|| self.ca_file.clone()),
        }
    }

    /// Session settings for each configured PEM host: the agent user with its certificate,
    /// sslmode and root certificate from agent.cfg (else libpq's PGSSLMODE and PGSSLROOTCERT,
    /// else verify-full and ~/.postgresql/root.crt).
    pub fn pem_targets(&self) -> Result<Vec<ConnectSettings>, connection::Error> {
        self.pem_hosts
            .iter()
            .map(|h| {
                let mut s = ConnectSettings::from_env(h, self.pem_port, &self.agent_user, "pem")?;
                s.choose_tls(&TlsChoice::default(), &self.tls_choice())?;
                s.client_cert = Some((self.agent_ssl_crt.clone(), self.agent_ssl_key.clone()));
                s.connect_timeout = self.connect_timeout;
                s.application_name = format!("pemworker agent {}", self.agent_id);
                Ok(s)
            })
            .collect()
    }

    pub fn from_document(
        path: &Path,
        doc: &Document,
    ) -> Result<(AgentConfig, Vec<String>), Problems> {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
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
        let entries = doc.entries();
        for e in &entries {
            if !agentcfg::is_known_key(e.key) {
                warnings.push(format!(
                    "{}:{}: unknown key {} is ignored",
                    path.display(),
                    e.line,
                    e.key
                ));
            }
        }
        let find = |key: &str| {
            entries
                .iter()
                .rev()
                .find(|e| e.key == key)
                .map(|e| (e.line, e.value))
        };

        macro_rules! parsed {
            ($key:literal, $default:expr, $parse:expr, $what:literal) => {
                match find($key) {
                    None => $default,
                    Some((line, v)) => match $parse(v) {
                        Some(x) => x,
                        None => {
                            problem(Some(line), format!("{} {v:?} is not {}", $key, $what));
                            $default
                        }
                    },
                }
            };
        }
        macro_rules! required {
            ($key:literal) => {
                match find($key) {
                    Some((line, v)) if !v.is_empty() => Some((line, v.to_string())),
                    Some((line, _)) => {
                        problem(Some(line), format!("{} is empty", $key));
                        None
                    }
                    None => {
                        problem(
                            None,
                            format!(
                                "{} is missing; register the agent (--register-agent) or add it",
                                $key
                            ),
                        );
                        None
                    }
                }
            };
        }

        let pem_hosts: Vec<String> = find("pem_host")
            .map(|(_, v)| {
                v.split(',')
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_else(|| vec!["127.0.0.1".to_string()]);
        if pem_hosts.is_empty() {
            problem(find("pem_host").map(|(l, _)| l), "pem_host is empty".into());
        }
        let pem_port = parsed!(
            "pem_port",
            5432,
            |v: &str| v.parse::<u16>().ok().filter(|&p| p > 0),
            "a port number (1-65535)"
        );
        let agent_id = required!("agent_id").and_then(|(line, v)| match v.parse::<i32>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                problem(
                    Some(line),
                    format!("agent_id {v:?} is not a positive number"),
                );
                None
            }
        });
        let key = required!("agent_ssl_key").map(|(l, v)| (l, PathBuf::from(v)));
        let crt = required!("agent_ssl_crt").map(|(l, v)| (l, PathBuf::from(v)));
        if let Some((line, k)) = &key {
            match std::fs::metadata(k) {
                Err(e) => problem(Some(*line), format!("agent_ssl_key {}: {e}", k.display())),
                Ok(m) if m.permissions().mode() & 0o077 != 0 => problem(
                    Some(*line),
                    format!(
                        "agent_ssl_key {} has group or world access; run chmod 0600 {}",
                        k.display(),
                        k.display()
                    ),
                ),
                Ok(_) => {}
            }
        }
        if let Some((line, c)) = &crt {
            if let Err(e) = std::fs::metadata(c) {
                problem(Some(*line), format!("agent_ssl_crt {}: {e}", c.display()));
            }
        }
        let agent_secret_file = find("agent_secret_file")
            .filter(|(_, v)| !v.is_empty())
            .map(|(_, v)| PathBuf::from(v));
        let agent_secret = find("agent_secret_file")
            .filter(|(_, v)| !v.is_empty())
            .and_then(|(line, v)| match crate::mac::AgentKey::load(Path::new(v)) {
                Ok(k) => Some(k),
                Err(e) => {
                    problem(Some(line), e.to_string());
                    None
                }
            });
        let mut existing_file = |key: &str| {
            find(key).filter(|(_, v)| !v.is_empty()).map(|(line, v)| {
                if let Err(e) = std::fs::metadata(v) {
                    problem(Some(line), format!("{key} {v}: {e}"));
                }
                PathBuf::from(v)
            })
        };
        let ca_file = existing_file("ca_file");
        let pem_ssl_root_cert = existing_file("pem_ssl_root_cert");
        let pem_ssl_mode = match find("pem_ssl_mode").filter(|(_, v)| !v.is_empty()) {
            None => None,
            Some((line, v)) => match v.parse::<SslMode>() {
                Ok(m) => Some(m),
                Err(e) => {
                    problem(Some(line), format!("pem_ssl_mode: {e}"));
                    None
                }
            },
        };
        let log_level = parsed!(
            "log_level",
            LogLevel::Warning,
            LogLevel::parse,
            "a log level (error, warning, info, debug1, debug2)"
        );
        let secs = |min: u64| {
            move |v: &str| {
                v.parse::<u64>()
                    .ok()
                    .filter(|&n| n >= min)
                    .map(Duration::from_secs)
            }
        };
        let long_wait = parsed!(
            "long_wait",
            Duration::from_secs(30),
            secs(1),
            "a number of seconds (at least 1)"
        );
        let short_wait = parsed!(
            "short_wait",
            Duration::from_secs(10),
            secs(1),
            "a number of seconds (at least 1)"
        );
        let max_connections = parsed!(
            "max_connections",
            None,
            |v: &str| v.parse::<usize>().ok().map(|n| (n > 0).then_some(n)),
            "a number (0 = unlimited)"
        );
        let connect_timeout = parsed!(
            "connect_timeout",
            DEFAULT_CONNECT_TIMEOUT,
            |v: &str| v.parse::<i64>().ok().filter(|&n| n >= -1).map(|n| {
                if n <= 0 {
                    DEFAULT_CONNECT_TIMEOUT
                } else {
                    Duration::from_secs(n as u64)
                }
            }),
            "a number of seconds (-1 = default)"
        );
        let lifetime = |v: &str| {
            v.parse::<u64>()
                .ok()
                .map(|n| (n > 0).then(|| Duration::from_secs(n)))
        };
        let connection_lifetime = parsed!(
            "connection_lifetime",
            None,
            lifetime,
            "a number of seconds (0 = unlimited)"
        );
        let pem_session_lifetime = parsed!(
            "pem_session_lifetime",
            None,
            lifetime,
            "a number of seconds (0 = unlimited)"
        );
        let flag =
            |key: &'static str, problem: &mut dyn FnMut(Option<usize>, String)| match find(key) {
                None => false,
                Some((line, v)) => parse_bool(v).unwrap_or_else(|| {
                    problem(Some(line), format!("{key} {v:?} is not true or false"));
                    false
                }),
            };
        let heartbeat_connection = flag("heartbeat_connection", &mut problem);
        let enable_smtp = flag("enable_smtp", &mut problem);
        let enable_snmp = flag("enable_snmp", &mut problem);
        let enable_webhook = flag("enable_webhook", &mut problem);
        let spool_limit = parsed!(
            "spool_limit",
            DEFAULT_SPOOL_LIMIT,
            |v: &str| parse_size(v).filter(|&n| n >= 4096),
            "a size of at least 4kB (e.g. 64MB)"
        );
        let certificate_renewal_fraction = parsed!(
            "certificate_renewal_fraction",
            Some(2.0 / 3.0),
            |v: &str| v
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..1.0).contains(f))
                .map(|f| (f > 0.0).then_some(f)),
            "a fraction from 0 (never renew) up to, not including, 1 (e.g. 0.67)"
        );
        let state_dir = find("state_dir")
            .filter(|(_, v)| !v.is_empty())
            .map(|(_, v)| PathBuf::from(v));
        let log_location = find("log_location")
            .filter(|(_, v)| !v.is_empty())
            .map(|(_, v)| PathBuf::from(v));
        let agent_user = find("agent_user")
            .filter(|(_, v)| !v.is_empty())
            .map(|(_, v)| v.to_string());
        // A verifying sslmode (the default) without a root certificate cannot connect at all:
        // say so now, not at every reconnection.
        let tls = TlsChoice {
            mode: pem_ssl_mode,
            root_cert: pem_ssl_root_cert.clone().or_else(|| ca_file.clone()),
        };
        if let Ok(mut s) = ConnectSettings::from_env("pem", pem_port, "agent", "pem") {
            let tcp = pem_hosts.iter().any(|h| !h.starts_with('/'));
            if s.choose_tls(&TlsChoice::default(), &tls).is_ok()
                && tcp
                && s.sslmode.verifies(false)
                && s.root_cert.is_none()
            {
                problem(
                    find("pem_ssl_mode").map(|(l, _)| l),
                    format!(
                        "sslmode {} needs the root certificate that signed the PEM server's (or pgBouncer's) certificate: set pem_ssl_root_cert (or PGSSLROOTCERT), or choose pem_ssl_mode explicitly",
                        s.sslmode
                    ),
                );
            }
        }

        match (agent_id, key, crt) {
            (Some(agent_id), Some((_, agent_ssl_key)), Some((_, agent_ssl_crt)))
                if problems.is_empty() =>
            {
                Ok((
                    AgentConfig {
                        path: path.to_path_buf(),
                        pem_hosts,
                        pem_port,
                        agent_id,
                        agent_user: agent_user.unwrap_or_else(|| format!("agent{agent_id}")),
                        agent_ssl_key,
                        agent_ssl_crt,
                        pem_ssl_mode,
                        pem_ssl_root_cert,
                        agent_secret,
                        agent_secret_file,
                        ca_file,
                        log_level,
                        log_location,
                        long_wait,
                        short_wait,
                        max_connections,
                        connect_timeout,
                        connection_lifetime,
                        pem_session_lifetime,
                        heartbeat_connection,
                        enable_smtp,
                        enable_snmp,
                        enable_webhook,
                        shared_state_dir: state_dir.is_none().then(default_state_base),
                        state_dir: state_dir.unwrap_or_else(|| {
                            default_state_base().join(format!("agent{agent_id}"))
                        }),
                        spool_limit,
                        certificate_renewal_fraction,
                    },
                    warnings,
                ))
            }
            _ => Err(Problems(problems)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
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
            warnings[0].contains(":15: unknown key mystery"),
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

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MB"), Some(64 << 20));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("lots"), None);
    }
}
