//! Connections to the PEM server (usually through pgBouncer) with libpq's meanings.
//!
//! This module owns how a connection is made ([`ConnectSettings`]: host or socket directory,
//! sslmode, root CA, client certificate, timeouts, from flags and libpq's environment variables)
//! and how statements are sent ([`pool`]: only the simple protocol or the unnamed statement, so
//! every statement is safe in pgBouncer's transaction pooling).

pub mod manager;
pub mod pool;
mod settings;
mod tls;

pub use settings::{ConnectSettings, SslMode};

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
    /// The server answered, but not in the shape the statement promises (no row, a NULL or a
    /// wrong type where a value was expected): a broken or hostile server, never a panic.
    #[error("{what}: unexpected reply from the server: {why}")]
    Reply { what: String, why: String },
}

impl Error {
    /// True when no session was established (network, TLS, authentication).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::ConnectTimeout { .. } | Error::Tls(_)
        )
    }

    /// True when local settings or files are wrong, so retrying cannot help.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Error::ReadFile { .. } | Error::KeyPermissions { .. } | Error::SslMode(_)
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
    /// (SQLSTATE classes 08, 53, 57, 58, 40), as during restarts and pool pauses, or refused
    /// the agent's credentials for a write (class 28: no or another per-agent secret), where
    /// the data is fine and waits for the agent to be registered again, or refused it for the
    /// session's transaction state (class 25: a transaction another task on the same session
    /// aborted, a server that turned read-only), which a new session does not have.
    pub fn is_transient(&self) -> bool {
        if self.is_connect() || self.is_closed() {
            return true;
        }
        self.code().is_some_and(|c| {
            ["08", "53", "57", "58", "40", "28", "25"]
                .iter()
                .any(|class| c.code().starts_with(class))
        })
    }

    /// True when the connection is gone (server or pooler restarted, pool killed).
    pub fn is_closed(&self) -> bool {
        match self {
            Error::Query { source, .. } => source.is_closed(),
            Error::QueryTimeout { .. } => true,
            _ => false,
        }
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
pub async fn connect(settings: &ConnectSettings) -> Result<Client, Error> {
    let config = settings.to_config();
    let tls = tls::connector(settings)?;
    let target = settings.target();
    let user = settings.user.clone();
    let attempt = config.connect(tls);
    let (client, connection) = match tokio::time::timeout(settings.connect_timeout, attempt).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(source)) => {
            return Err(Error::Connect {
                target,
                user,
                source,
            });
        }
        Err(_) => {
            return Err(Error::ConnectTimeout {
                target,
                user,
                timeout: settings.connect_timeout,
            });
        }
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("connection ended: {}", describe(&e));
        }
    });
    Ok(client)
}
