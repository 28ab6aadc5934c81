use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Error;
use crate::secret::Secret;

/// libpq's sslmode, weakest first (so `max` is the stricter of two). tokio-postgres knows only
/// disable/prefer/require; certificate checking is the TLS connector's, configured from this
/// value in `tls.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// What the agent uses unless told otherwise: the server's certificate must chain to the
/// configured root and name the host dialled (libpq's default is prefer, which falls back to
/// plain text).
pub const DEFAULT_SSLMODE: SslMode = SslMode::VerifyFull;

impl SslMode {
    /// libpq's name.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a session in this mode has checked the server's certificate against a root,
    /// given whether a root certificate is configured (libpq's `require` verifies the chain
    /// when one is).
    pub fn verifies(self, has_root: bool) -> bool {
        match self {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => has_root,
            _ => false,
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SslMode {
    type Err = Error;
    /// libpq's names, in any case (PEM's documentation spells `verify-CA`).
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return Err(Error::SslMode(s.to_string())),
        })
    }
}

/// A choice of sslmode and root certificate from one source (the command line, agent.cfg).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsChoice {
    pub mode: Option<SslMode>,
    pub root_cert: Option<PathBuf>,
}

/// Everything needed to open one session, resolved and checked before any network work.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// Host name, IP address, or a Unix socket directory (starts with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    /// CA certificates that verify the server (libpq's sslrootcert).
    pub root_cert: Option<PathBuf>,
    /// Client certificate and PKCS#8 key (libpq's sslcert / sslkey).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub connect_timeout: Duration,
    pub application_name: String,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Used when neither a flag nor PGCONNECT_TIMEOUT says otherwise: libpq waits forever, an agent
/// must not.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl ConnectSettings {
    /// Settings for `user@host:port/dbname` with libpq's environment applied: PGSSLMODE
    /// (default verify-full), PGSSLROOTCERT (default `~/.postgresql/root.crt` when it exists),
    /// PGSSLCERT/PGSSLKEY, PGCONNECT_TIMEOUT and PGAPPNAME.
    pub fn from_env(host: &str, port: u16, user: &str, dbname: &str) -> Result<Self, Error> {
        let client_cert = match (env("PGSSLCERT"), env("PGSSLKEY")) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            _ => None,
        };
        let connect_timeout = env("PGCONNECT_TIMEOUT")
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let mut s = ConnectSettings {
            host: host.to_string(),
            port,
            user: user.to_string(),
            dbname: dbname.to_string(),
            password: None,
            sslmode: DEFAULT_SSLMODE,
            root_cert: None,
            client_cert,
            connect_timeout,
            application_name: env("PGAPPNAME").unwrap_or_else(|| "pemworker".to_string()),
        };
        s.choose_tls(&TlsChoice::default(), &TlsChoice::default())?;
        Ok(s)
    }

    /// Settings for a monitored server or pgBouncer console: sslmode and root certificate are
    /// exactly the ones given (`--asb-ssl-mode`, `--asb-ssl-root-cert`, or what the targets
    /// record holds), never libpq's PGSSLMODE, PGSSLROOTCERT, PGSSLCERT/PGSSLKEY or
    /// `~/.postgresql/root.crt`: on an agent host those name the PEM server's, whose CA has
    /// nothing to say about a monitored server.
    pub fn monitored(
        host: &str,
        port: u16,
        user: &str,
        dbname: &str,
        sslmode: SslMode,
        root_cert: Option<&Path>,
    ) -> Self {
        let connect_timeout = env("PGCONNECT_TIMEOUT")
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        ConnectSettings {
            host: host.to_string(),
            port,
            user: user.to_string(),
            dbname: dbname.to_string(),
            password: None,
            sslmode,
            root_cert: root_cert
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
            client_cert: None,
            connect_timeout,
            application_name: env("PGAPPNAME").unwrap_or_else(|| "pemworker".to_string()),
        }
    }

    /// Sets sslmode and the root certificate from, in this order: the command line
    /// (`explicit`), the agent's configuration (`configured`, libpq's connection parameters),
    /// libpq's variables (PGSSLMODE, PGSSLROOTCERT), and the defaults (verify-full,
    /// `~/.postgresql/root.crt` if it exists). A relative root certificate path is made
    /// absolute, so that what registration writes into agent.cfg works from any directory.
    pub fn choose_tls(
        &mut self,
        explicit: &TlsChoice,
        configured: &TlsChoice,
    ) -> Result<(), Error> {
        self.sslmode = match explicit.mode.or(configured.mode) {
            Some(m) => m,
            None => match env("PGSSLMODE") {
                Some(m) => m.parse()?,
                None => DEFAULT_SSLMODE,
            },
        };
        let home = std::env::var_os("HOME").map(PathBuf::from);
        self.root_cert = explicit
            .root_cert
            .clone()
            .or_else(|| configured.root_cert.clone())
            .or_else(|| env("PGSSLROOTCERT").map(PathBuf::from))
            .or_else(|| {
                home.map(|h| h.join(".postgresql").join("root.crt"))
                    .filter(|p| p.exists())
            })
            .map(|p| std::path::absolute(&p).unwrap_or(p));
        Ok(())
    }

    /// `host:port` (or the socket path) for messages.
    pub fn target(&self) -> String {
        if self.is_unix_socket() {
            format!("{}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Fills in the password from `env_names`, then the password file, as libpq would.
    pub fn resolve_password(&mut self, env_names: &[&str]) {
        if self.password.is_some() {
            return;
        }
        self.password = crate::secret::from_env(env_names).or_else(|| {
            crate::secret::pgpass_path().and_then(|f| {
                crate::secret::from_pgpass(&f, &self.host, self.port, &self.dbname, &self.user)
            })
        });
    }

    pub(super) fn to_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        if self.is_unix_socket() {
            c.host_path(Path::new(&self.host));
        } else {
            c.host(&self.host);
        }
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout);
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        // TLS is never negotiated on a Unix socket, as in libpq.
        c.ssl_mode(match self.sslmode {
            _ if self.is_unix_socket() => tokio_postgres::config::SslMode::Disable,
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_names_are_libpq_names() {
        for (s, m) in [
            ("disable", SslMode::Disable),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
            ("verify-CA", SslMode::VerifyCa),
            ("VERIFY-FULL", SslMode::VerifyFull),
        ] {
            assert_eq!(s.parse::<SslMode>().unwrap(), m);
        }
        assert!(SslMode::Disable < SslMode::Prefer && SslMode::Require < SslMode::VerifyCa);
        assert_eq!(
            SslMode::VerifyCa.name().parse::<SslMode>().unwrap(),
            SslMode::VerifyCa
        );
        let err = "verify_full".parse::<SslMode>().unwrap_err().to_string();
        assert!(err.contains("verify-full"), "{err}");
    }

    #[test]
    fn socket_target_names_the_socket_file() {
        let mut s = ConnectSettings::from_env("/run/pg", 5433, "u", "pem").unwrap();
        assert_eq!(s.target(), "/run/pg/.s.PGSQL.5433");
        s.host = "db1".into();
        assert_eq!(s.target(), "db1:5433");
    }
}
