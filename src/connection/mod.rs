//! Connections to the PEM server (usually through pgBouncer) with libpq's meanings.
//!
//! This module owns how a connection is made ([`ConnectSettings`]: host or socket directory,
//! sslmode, root CA, client certificate, timeouts, from flags and libpq's environment variables)
//! and how statements are sent ([`pool`]: only the simple protocol or the unnamed statement, so
//! every statement is safe in pgBouncer's transaction pooling). Sessions run over [`guard`]
//! streams, so no password is sent in clear text to a server that was not verified, with TLS
//! contexts built once per configuration ([`tls`]). [`manager`] hands out sessions with the PEM
//! server; [`kept`] keeps the sessions to monitored servers and pgBouncer consoles between
//! probe rounds.

pub mod guard;
pub mod kept;
pub mod manager;
pub mod pool;
pub mod session;
mod settings;
pub mod tls;

pub use settings::{ConnectSettings, DEFAULT_SSLMODE, SslMode, TlsChoice};

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// Errors of this layer. `Display` names the server and user, then the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {target} as {user}: {}", describe(source))]
    Connect {
        target: String,
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to {target} as {user}: {source}")]
    Socket {
        target: String,
        user: String,
        #[source]
        source: std::io::Error,
    },
    /// A certificate stands in the way: the server's failed verification, or the server refused
    /// this side's. Fixed by replacing a file (or the clock), not by trying again at once.
    #[error("cannot connect to {at}: {why}")]
    Certificate {
        /// `<target> as <user>`.
        at: String,
        why: String,
    },
    /// The session was refused on this side: the server is not what the settings demand.
    #[error("cannot connect to {target} as {user}: {why}")]
    Refused {
        target: String,
        user: String,
        why: String,
    },
    #[error("cannot connect to {target} as {user}: no answer within {} s", timeout.as_secs())]
    ConnectTimeout {
        target: String,
        user: String,
        timeout: Duration,
    },
    #[error("{what}: {}", describe(source))]
    Query {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what}: no answer from the server within {} s", timeout.as_secs())]
    QueryTimeout { what: String, timeout: Duration },
    #[error("cannot read {what} {}: {source}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "private key file {} has group or world access; run chmod 0600 on it (libpq refuses such keys too)",
        path.display()
    )]
    KeyPermissions { path: PathBuf },
    #[error("invalid TLS setup: {0}")]
    Tls(String),
    #[error("invalid sslmode {0:?}: use disable, allow, prefer, require, verify-ca or verify-full")]
    SslMode(String),
    /// Verification was asked for (the default) but no root certificate is configured.
    #[error(
        "sslmode {mode} for {target} needs the root certificate that signed the server's certificate: \
         pass --pem-ssl-root-cert FILE (agent.cfg: pem_ssl_root_cert) or set PGSSLROOTCERT, \
         or choose another --pem-ssl-mode (agent.cfg: pem_ssl_mode) explicitly"
    )]
    NoRootCert { mode: SslMode, target: String },
    /// The server answered, but not in the shape the statement promises (no row, a NULL or a
    /// wrong type where a value was expected): a broken or hostile server, never a panic.
    #[error("{what}: unexpected reply from the server: {why}")]
    Reply { what: String, why: String },
    /// A statement of the transaction failed earlier; it was rolled back, not committed.
    #[error("{what}: an earlier statement failed, so the transaction was rolled back")]
    Aborted { what: String },
    /// The session was given up after an earlier failure; its owner must check out another.
    #[error("the session with the server was closed after an earlier failure")]
    Unusable,
}

impl Error {
    /// True when no session was established (network, TLS, authentication).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::Socket { .. }
                | Error::Certificate { .. }
                | Error::Refused { .. }
                | Error::ConnectTimeout { .. }
                | Error::Tls(_)
        )
    }

    /// True when a certificate stands in the way (see [`Error::Certificate`]).
    pub fn is_certificate(&self) -> bool {
        matches!(self, Error::Certificate { .. })
    }

    /// True when local settings or files are wrong, so retrying cannot help.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Error::ReadFile { .. }
                | Error::KeyPermissions { .. }
                | Error::SslMode(_)
                | Error::NoRootCert { .. }
        )
    }

    /// The SQLSTATE the server answered with, if it answered.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Error::Connect { source, .. } | Error::Query { source, .. } => source.code(),
            _ => None,
        }
    }

    /// True when retrying later may succeed: the connection is gone, or the server answered
    /// with a connection, resource, operator-intervention, system or serialization error
    /// (SQLSTATE classes 08, 53, 57, 58, 40), as during restarts and pool pauses.
    pub fn is_transient(&self) -> bool {
        if self.is_connect() || self.is_closed() {
            return true;
        }
        self.code().is_some_and(|c| {
            ["08", "53", "57", "58", "40"]
                .iter()
                .any(|class| c.code().starts_with(class))
        })
    }

    /// True when the connection is gone (server or pooler restarted, pool killed).
    pub fn is_closed(&self) -> bool {
        match self {
            Error::Query { source, .. } => source.is_closed(),
            Error::QueryTimeout { .. } | Error::Unusable => true,
            _ => false,
        }
    }

    /// True when the server refused the data itself (SQLSTATE class 22, data exception, or 23,
    /// integrity constraint violation): sending the same values again cannot succeed, but other
    /// values can.
    pub fn is_data(&self) -> bool {
        self.code()
            .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
    }

    /// True when the server refused for a reason an administrator must fix on the server or in
    /// the agent's setup (a privilege, a read-only server, authentication, a missing database,
    /// function, table or column): retrying helps only once that is fixed. A write whose MAC
    /// the server does not accept (no or another per-agent secret, class 28) is one: the data
    /// is fine and waits until the agent is registered again.
    pub fn is_refused(&self) -> bool {
        self.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("28")
                || c.starts_with("42")
                || c.starts_with("3D")
                || c.starts_with("3F")
                || c == "25006"
        })
    }

    /// True when the server answered a statement by refusing the write's credentials (class 28:
    /// the MAC made with the agent's secret, a heartbeat's timestamp), not the login.
    pub fn is_write_refused(&self) -> bool {
        matches!(self, Error::Query { .. })
            && self.code().is_some_and(|c| c.code().starts_with("28"))
    }

    /// What an administrator can do about a refusal ([`Error::is_refused`]), if we know.
    pub fn advice(&self) -> Option<&'static str> {
        let code = self.code()?.code();
        Some(match code {
            "42501" => {
                "a privilege the agent needs on the PEM server is missing (revoked, or not granted \
                 after an upgrade); grant it back on the PEM server"
            }
            "25006" => {
                "the PEM server session is read-only (a standby, or default_transaction_read_only); \
                 point pem_host at the primary"
            }
            "3D000" => {
                "the PEM database does not exist on the server pem_host names; check pem_host and pem_port"
            }
            "42883" | "42P01" | "42703" | "3F000" => {
                "the PEM server's schema lacks what this agent uses; upgrade the PEM server's schema \
                 to this agent's version"
            }
            // Answered to a statement: the login worked, the write's MAC did not.
            _ if self.is_write_refused() => {
                "the PEM server does not accept this agent's write secret (agent.cfg names no \
                 agent_secret_file, or one from another registration); register the agent again \
                 with --register-agent --force-registration, which keeps its agent id"
            }
            c if c.starts_with("28") => {
                "the PEM server refused the agent's login; check agent_user, the certificate and \
                 pg_hba.conf / pgBouncer's hba file"
            }
            _ => return None,
        })
    }
}

/// A one-line description of a driver error: the server's message, SQLSTATE, detail and hint
/// when the server answered; the driver's own chain otherwise.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        // PL/Python prefixes the errors it raises; the reference server's signing function is one.
        let message = db
            .message()
            .strip_prefix("plpy.Error: ")
            .unwrap_or(db.message());
        let mut s = format!("{message} (SQLSTATE {})", db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Opens a session and spawns its connection task. The task ends when the client is dropped
/// or the server goes away; the client then reports `is_closed()`.
///
/// The socket is opened here and handed to tokio-postgres wrapped in [`guard::Guarded`], so a
/// server that asks for the password in clear text gets it only over TLS whose certificate was
/// verified (verify-ca, verify-full, or require with a root certificate). SCRAM channel binding
/// is used whenever the server offers it (tokio-postgres' default, kept).
pub async fn connect(settings: &ConnectSettings) -> Result<Client, Error> {
    let target = settings.target();
    let user = settings.user.clone();
    let watch = guard::Watch::default();
    match tokio::time::timeout(settings.connect_timeout, open(settings, &watch)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(Error::Connect { source, .. })) => Err(explain(settings, &watch, source)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::ConnectTimeout {
            target,
            user,
            timeout: settings.connect_timeout,
        }),
    }
}

async fn open(settings: &ConnectSettings, watch: &guard::Watch) -> Result<Client, Error> {
    let config = settings.to_config();
    let tls = tls::context(settings)?.session(&settings.host)?;
    let verified =
        !settings.is_unix_socket() && settings.sslmode.verifies(settings.root_cert.is_some());
    let socket = guard::Socket::open(settings)
        .await
        .map_err(|source| Error::Socket {
            target: settings.target(),
            user: settings.user.clone(),
            source,
        })?;
    let stream = guard::Guarded::socket(socket, watch.clone(), !verified);
    let tls = guard::GuardedTls::new(tls, watch.clone(), !verified);
    let (client, connection) =
        config
            .connect_raw(stream, tls)
            .await
            .map_err(|source| Error::Connect {
                target: settings.target(),
                user: settings.user.clone(),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("connection ended: {}", describe(&e));
        }
    });
    Ok(client)
}

/// When the certificate in `path` (PEM) expires, if it can be read. Read with OpenSSL, which
/// every TLS session loads anyway.
pub fn certificate_expiry(path: &std::path::Path) -> Option<chrono::DateTime<chrono::Utc>> {
    let data = std::fs::read(path).ok()?;
    let cert = openssl::x509::X509::from_pem(&data).ok()?;
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(cert.not_after()).ok()?;
    chrono::DateTime::from_timestamp(i64::from(d.days) * 86_400 + i64::from(d.secs), 0)
}

/// The command that gets this agent a new certificate (re-registration keeps the agent id).
pub fn renewal_command(settings: &ConnectSettings) -> String {
    let cert_dir = settings
        .client_cert
        .as_ref()
        .and_then(|(crt, _)| crt.parent())
        .map(|d| format!(" --cert-path {}", d.display()))
        .unwrap_or_default();
    // Agents registered without --pem-agent-user log in as their own agent<ID> role.
    let own_role = settings
        .user
        .strip_prefix("agent")
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
    let agent_user = if own_role {
        String::new()
    } else {
        format!(" --pem-agent-user {}", settings.user)
    };
    format!(
        "pemworker --register-agent --force-registration --pem-server {} --pem-port {}{agent_user}{cert_dir} \
         --config-dir <directory of agent.cfg> --pem-user <a PEM admin>",
        settings.host, settings.port
    )
}

/// A certificate problem in the user's terms: which file, and what fixes it. `detail` is the
/// TLS library's text, whose last parenthesis holds the verification's result.
fn certificate_problem(
    settings: &ConnectSettings,
    failure: guard::TlsFailure,
    detail: &str,
) -> String {
    use guard::TlsFailure;
    match failure {
        TlsFailure::ServerNotVerified => {
            let reason = detail
                .rsplit_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .map_or("no reason given", |(r, _)| r)
                .to_string();
            let root = settings.root_cert.as_ref().map_or_else(
                || "(no root certificate)".to_string(),
                |r| r.display().to_string(),
            );
            let fix = if reason.contains("expired") {
                "the server's certificate has expired: renew it on the server".to_string()
            } else if reason.contains("not yet valid") {
                "the server's certificate is not valid yet by this host's clock: check the clock (NTP)"
                    .to_string()
            } else if reason.contains("mismatch") {
                format!(
                    "the server's certificate does not name {}: set pem_host to a name it holds, or renew it \
                     with this one",
                    settings.host
                )
            } else {
                format!(
                    "the server's certificate is not signed by a CA in {root} (pem_ssl_root_cert); if the PEM \
                     server's CA was replaced, put the new CA certificate in {root}"
                )
            };
            format!("TLS handshake failed: certificate verify failed ({reason}): {fix}")
        }
        TlsFailure::ClientExpired | TlsFailure::ClientRefused => {
            let Some((crt, _)) = &settings.client_cert else {
                return format!(
                    "the server refused the TLS handshake over a certificate: {detail}"
                );
            };
            let expired = certificate_expiry(crt).filter(|at| *at <= chrono::Utc::now());
            let what = match (failure, expired) {
                (_, Some(at)) => format!(
                    "this agent's certificate {} expired on {}",
                    crt.display(),
                    at.format("%Y-%m-%d %H:%M:%S UTC")
                ),
                (TlsFailure::ClientExpired, None) => format!(
                    "the server says this agent's certificate {} has expired (check this host's clock too)",
                    crt.display()
                ),
                _ => format!(
                    "the server does not accept this agent's certificate {}: it was not issued by a CA the \
                     server trusts (was the CA replaced?), or it was revoked",
                    crt.display()
                ),
            };
            format!(
                "{what}; get a new one with: {} (add --pem-ssl-root-cert FILE if the CA changed)",
                renewal_command(settings)
            )
        }
    }
}

/// A failed attempt in the user's terms, from what the guards saw.
fn explain(
    settings: &ConnectSettings,
    watch: &guard::Watch,
    source: tokio_postgres::Error,
) -> Error {
    let seen = watch.seen();
    let mode = settings.sslmode;
    let refused = |why: String| Error::Refused {
        target: settings.target(),
        user: settings.user.clone(),
        why,
    };
    if seen.cleartext_refused {
        return refused(format!(
            "the server asked for the password in clear text, and its certificate is not verified \
             (sslmode {mode}{}); the password was not sent: use sslmode verify-full with the \
             server's root certificate, or scram-sha-256 authentication on the server",
            if settings.root_cert.is_none() && mode >= SslMode::Require {
                ", no root certificate"
            } else {
                ""
            }
        ));
    }
    if seen.password_requested && settings.password.is_none() {
        return refused(
            "the server asked for a password, and this login has none (the agent logs in with \
             its certificate): have the server (pgBouncer's hba file) authenticate it by certificate"
                .into(),
        );
    }
    if seen.tls_refused && mode >= SslMode::Require {
        return refused(format!(
            "the server does not offer TLS, which sslmode {mode} requires; nothing else was sent"
        ));
    }
    // TLS 1.3 servers judge the client's certificate after the client's handshake ended: their
    // refusal comes with the first read, in the driver's error, or (when the server's reset
    // outruns its alert) as a connection reset; then this agent's certificate, expired by its
    // own clock, is what the server refused.
    let expired_here = || {
        let (crt, _) = settings.client_cert.as_ref()?;
        (seen.tls_established
            && !seen.password_requested
            && certificate_expiry(crt).is_some_and(|at| at <= chrono::Utc::now()))
        .then_some(guard::TlsFailure::ClientExpired)
    };
    let failure = seen
        .tls_failure
        .or_else(|| guard::tls_failure(&source))
        .or_else(expired_here);
    if let Some(failure) = failure {
        let detail = seen
            .handshake_error
            .clone()
            .unwrap_or_else(|| describe(&source));
        return Error::Certificate {
            at: format!("{} as {}", settings.target(), settings.user),
            why: certificate_problem(settings, failure, &detail),
        };
    }
    if let Some(why) = seen.handshake_error {
        let checked = match (
            &settings.root_cert,
            mode.verifies(settings.root_cert.is_some()),
        ) {
            (Some(root), true) => format!(
                " (sslmode {mode}: the server's certificate must be signed by a CA in {}{})",
                root.display(),
                if mode == SslMode::VerifyFull {
                    format!(" and name {}", settings.host)
                } else {
                    String::new()
                }
            ),
            _ => String::new(),
        };
        return refused(format!("TLS handshake failed: {why}{checked}"));
    }
    Error::Connect {
        target: settings.target(),
        user: settings.user.clone(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificates_expiry_is_read_and_the_renewal_command_names_its_directory() {
        let ca = crate::certs::Authority::generate("test CA").unwrap();
        let (crt, _) = ca.issue_server(&["127.0.0.1"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.crt");
        std::fs::write(&file, crt).unwrap();
        let at = certificate_expiry(&file).unwrap();
        let want = chrono::Utc::now() + chrono::Duration::days(365);
        assert!((at - want).num_seconds().abs() < 60, "{at} vs {want}");
        assert!(certificate_expiry(&dir.path().join("missing")).is_none());

        let mut s = ConnectSettings::from_env("127.0.0.1", 6432, "pem_agent_user1", "pem").unwrap();
        s.client_cert = Some((file.clone(), dir.path().join("agent.key")));
        let command = renewal_command(&s);
        assert!(
            command.starts_with(
                "pemworker --register-agent --force-registration --pem-server 127.0.0.1 --pem-port 6432 \
                 --pem-agent-user pem_agent_user1 --cert-path "
            ),
            "{command}"
        );
        s.user = "agent12".into();
        assert!(!renewal_command(&s).contains("--pem-agent-user"));
    }
}
