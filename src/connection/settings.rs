use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Error;
use crate::secret::Secret;

/// libpq's sslmode. tokio-postgres knows only disable/prefer/require; certificate checking is
/// the TLS connector's, configured from this value in `tls.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(Error::SslMode(other.to_string())),
        })
    }
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

/// Used when neither a flag nor PGCONNECT_TIMEOUT says otherwise: libpq waits forever, an agent
/// must not.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl ConnectSettings {
    /// Settings for `user@host:port/dbname` with libpq's environment applied: PGSSLMODE
    /// (default prefer), PGSSLROOTCERT (default `~/.postgresql/root.crt` when it exists),
    /// PGSSLCERT/PGSSLKEY, PGCONNECT_TIMEOUT and PGAPPNAME.
    pub fn from_env(host: &str, port: u16, user: &str, dbname: &str) -> Result<Self, Error> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let sslmode = match env("PGSSLMODE") {
            Some(m) => m.parse()?,
            None => SslMode::Prefer,
        };
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let default_file = |name: &str| {
            home.as_ref()
                .map(|h| h.join(".postgresql").join(name))
                .filter(|p| p.exists())
        };
        let root_cert = env("PGSSLROOTCERT")
            .map(PathBuf::from)
            .or_else(|| default_file("root.crt"));
        let client_cert = match (env("PGSSLCERT"), env("PGSSLKEY")) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            _ => None,
        };
        let connect_timeout = env("PGCONNECT_TIMEOUT")
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        Ok(ConnectSettings {
            host: host.to_string(),
            port,
            user: user.to_string(),
            dbname: dbname.to_string(),
            password: None,
            sslmode,
            root_cert,
            client_cert,
            connect_timeout,
            application_name: env("PGAPPNAME").unwrap_or_else(|| "pemworker".to_string()),
        })
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
        ] {
            assert_eq!(s.parse::<SslMode>().unwrap(), m);
        }
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
