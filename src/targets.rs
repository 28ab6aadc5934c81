//! The monitored servers and pgBouncer consoles registered from this host: the only places the
//! worker sends a monitored-server password to.
//!
//! The PEM server holds the bindings (host, port, database, user, sslmode), and whoever can
//! change them there could otherwise send the agent, with the password from its `~/.pgpass`, to
//! a host of their choosing or over a weaker sslmode. So `--register-server` (and the test bed
//! and sandbox) record here, on the agent host, what was registered: the worker connects only
//! to a binding that matches a record exactly (kind, host, port, database, user), and with the
//! stricter of the recorded sslmode and the server's (the server may ask for more, never for
//! less). A binding without a record is not probed, with one warning naming the fix.
//!
//! The record is `monitored_targets.json` beside agent.cfg (mode 0600), a JSON list written
//! with fsutil; it holds no password.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::connection::{self, ConnectSettings, SslMode};
use crate::fsutil::{self, Staged};

pub const FILE_NAME: &str = "monitored_targets.json";

/// The record beside `config_file` (agent.cfg).
pub fn file_for(config_file: &Path) -> PathBuf {
    config_file
        .parent()
        .unwrap_or(Path::new("."))
        .join(FILE_NAME)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Files(#[from] fsutil::Error),
    #[error("{}: {why}; fix or remove the file and register the servers again (--register-server)", file.display())]
    Corrupt { file: PathBuf, why: String },
}

/// What a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Server,
    Pgbouncer,
}

/// One registered target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub kind: Kind,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    /// The weakest sslmode the worker uses for it (libpq's name).
    pub sslmode: String,
    /// The root certificate its certificate was checked against at registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_cert: Option<PathBuf>,
    /// PEM's `--efm-cluster-name` / `--efm-install-path` for a server, kept with its record
    /// (EFM itself is not monitored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub efm: Option<Efm>,
}

/// A monitored server's EDB Failover Manager cluster, as `--register-server` was told it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Efm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_path: Option<PathBuf>,
}

impl Efm {
    /// `None` when neither flag was given.
    pub fn from_flags(cluster_name: Option<String>, install_path: Option<PathBuf>) -> Option<Efm> {
        (cluster_name.is_some() || install_path.is_some()).then_some(Efm {
            cluster_name,
            install_path,
        })
    }
}

impl Target {
    fn same_place(&self, other: &Target) -> bool {
        (self.kind, &self.host, self.port, &self.database, &self.user)
            == (
                other.kind,
                &other.host,
                other.port,
                &other.database,
                &other.user,
            )
    }

    fn describe(&self) -> String {
        let what = match self.kind {
            Kind::Server => "monitored server",
            Kind::Pgbouncer => "pgBouncer console",
        };
        format!(
            "{what} {}:{} (database {}, user {})",
            self.host, self.port, self.database, self.user
        )
    }
}

/// Why a binding from the PEM server gets no connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{0} is bound to this agent on the PEM server but was not registered from this host, so it is not probed and gets no password; if it is yours, register it here (pemworker --register-server)"
    )]
    NotRegistered(String),
    #[error("{what}: {why}")]
    Settings { what: String, why: String },
}

/// The parsed record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub targets: Vec<Target>,
}

impl Registry {
    /// Parses the record's text; every target's sslmode must be one libpq knows.
    pub fn parse(text: &str) -> Result<Registry, String> {
        if text.trim().is_empty() {
            return Ok(Registry::default());
        }
        let targets: Vec<Target> = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for t in &targets {
            t.sslmode
                .parse::<SslMode>()
                .map_err(|e| format!("{}: {e}", t.describe()))?;
        }
        Ok(Registry { targets })
    }

    /// The record in `file`; none yet is an empty one.
    pub fn load(file: &Path) -> Result<Registry, Error> {
        match fsutil::read_regular(file) {
            Ok(data) => {
                let text = String::from_utf8(data).map_err(|e| Error::Corrupt {
                    file: file.to_path_buf(),
                    why: e.to_string(),
                })?;
                Registry::parse(&text).map_err(|why| Error::Corrupt {
                    file: file.to_path_buf(),
                    why,
                })
            }
            Err(fsutil::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(Registry::default())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn render(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.targets).unwrap_or_else(|_| "[]".into());
        s.push('\n');
        s
    }

    /// With `t` recorded (replacing the record of the same place).
    pub fn with(&self, t: Target) -> Registry {
        let mut targets: Vec<Target> = self
            .targets
            .iter()
            .filter(|o| !o.same_place(&t))
            .cloned()
            .collect();
        targets.push(t);
        Registry { targets }
    }

    /// Without the targets of `kind` at `host:port`.
    pub fn without(&self, kind: Kind, host: &str, port: u16) -> Registry {
        Registry {
            targets: self
                .targets
                .iter()
                .filter(|t| !(t.kind == kind && t.host == host && t.port == port))
                .cloned()
                .collect(),
        }
    }

    /// Writes the record (0600) under a temporary name; [`Staged::commit`] puts it in place.
    pub fn stage(&self, file: &Path) -> Result<Staged, Error> {
        Ok(Staged::write(file, self.render().as_bytes(), 0o600, None)?)
    }

    /// How the worker reaches the target the PEM server's binding names, or why it does not:
    /// only a recorded target, with the stricter of the two sslmodes, its recorded root
    /// certificate, and the password from the agent user's password file.
    pub fn settings(
        &self,
        kind: Kind,
        host: &str,
        port: u16,
        database: &str,
        user: &str,
        server_sslmode: &str,
    ) -> Result<ConnectSettings, Refusal> {
        let wanted = Target {
            kind,
            host: host.to_string(),
            port,
            database: database.to_string(),
            user: user.to_string(),
            sslmode: String::new(),
            root_cert: None,
            efm: None,
        };
        let Some(t) = self.targets.iter().find(|t| t.same_place(&wanted)) else {
            return Err(Refusal::NotRegistered(wanted.describe()));
        };
        let settings_error = |e: connection::Error| Refusal::Settings {
            what: t.describe(),
            why: e.to_string(),
        };
        let recorded: SslMode = t.sslmode.parse().map_err(settings_error)?;
        // An unknown sslmode from the server is no reason to weaken the recorded one.
        let mode = server_sslmode
            .parse::<SslMode>()
            .map_or(recorded, |m| m.max(recorded));
        // Only what was recorded for this target: the PEM server's PGSSLROOTCERT or
        // ~/.postgresql/root.crt says nothing about a monitored server's certificate.
        if mode.verifies(false) && t.root_cert.is_none() {
            return Err(Refusal::Settings {
                what: t.describe(),
                why: format!(
                    "sslmode {mode} needs the root certificate that signed its certificate, and none was recorded; register it again with --asb-ssl-root-cert FILE"
                ),
            });
        }
        let mut s =
            ConnectSettings::monitored(host, port, user, database, mode, t.root_cert.as_deref());
        s.resolve_password(&[]);
        Ok(s)
    }
}

/// Logs a refusal once per target and process (the schedule is re-read every short_wait).
pub fn warn_once(refusal: &Refusal) {
    static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let text = refusal.to_string();
    let mut w = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if w.get_or_insert_with(HashSet::new).insert(text.clone()) {
        tracing::warn!("{text}");
    } else {
        tracing::debug!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16, sslmode: &str) -> Target {
        Target {
            kind: Kind::Server,
            host: "db1".into(),
            port,
            database: "postgres".into(),
            user: "monitor".into(),
            sslmode: sslmode.into(),
            root_cert: Some("/etc/pem/root.crt".into()),
            efm: None,
        }
    }

    #[test]
    fn only_a_recorded_place_is_reached_and_never_with_a_weaker_sslmode() {
        let r = Registry::default().with(target(5432, "verify-ca"));
        let s = r
            .settings(Kind::Server, "db1", 5432, "postgres", "monitor", "disable")
            .unwrap();
        assert_eq!(s.sslmode, SslMode::VerifyCa);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/etc/pem/root.crt")));
        let s = r
            .settings(
                Kind::Server,
                "db1",
                5432,
                "postgres",
                "monitor",
                "verify-full",
            )
            .unwrap();
        assert_eq!(
            s.sslmode,
            SslMode::VerifyFull,
            "the server may ask for more"
        );
        for (host, port, db, user) in [
            ("db2", 5432, "postgres", "monitor"),
            ("db1", 5433, "postgres", "monitor"),
            ("db1", 5432, "other", "monitor"),
            ("db1", 5432, "postgres", "postgres"),
        ] {
            let e = r
                .settings(Kind::Server, host, port, db, user, "verify-full")
                .unwrap_err();
            assert!(matches!(e, Refusal::NotRegistered(_)), "{e}");
        }
        assert!(
            r.settings(
                Kind::Pgbouncer,
                "db1",
                5432,
                "postgres",
                "monitor",
                "require"
            )
            .is_err()
        );
    }

    #[test]
    fn a_verifying_mode_without_a_recorded_root_is_refused_not_guessed() {
        let mut t = target(5432, "require");
        t.root_cert = None;
        let r = Registry::default().with(t);
        let s = r
            .settings(Kind::Server, "db1", 5432, "postgres", "monitor", "prefer")
            .unwrap();
        assert_eq!((s.sslmode, s.root_cert), (SslMode::Require, None));
        let e = r
            .settings(
                Kind::Server,
                "db1",
                5432,
                "postgres",
                "monitor",
                "verify-ca",
            )
            .unwrap_err();
        assert!(e.to_string().contains("--asb-ssl-root-cert"), "{e}");
    }

    #[test]
    fn records_round_trip_and_replace_their_place() {
        let r = Registry::default()
            .with(target(5432, "require"))
            .with(target(5433, "prefer"))
            .with(target(5432, "verify-full"));
        assert_eq!(r.targets.len(), 2);
        assert_eq!(Registry::parse(&r.render()).unwrap(), r);
        assert_eq!(r.without(Kind::Server, "db1", 5432).targets.len(), 1);
        assert!(Registry::parse("[{\"kind\":\"server\"}]").is_err());
        let bad = r.render().replace("prefer", "verify_full");
        assert!(
            Registry::parse(&bad)
                .unwrap_err()
                .contains("invalid sslmode")
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_record_text_is_read_without_a_panic(text in "\\PC{0,200}") {
                let _ = Registry::parse(&text);
            }

            #[test]
            fn a_record_reads_back_and_allows_exactly_its_place(
                host in "[a-z0-9.:-]{1,20}",
                port in 1u16..,
                database in "\\PC{1,12}",
                user in "\\PC{1,12}",
                mode in proptest::sample::select(vec!["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]),
                server in "[a-z-]{0,12}",
            ) {
                let t = Target {
                    kind: Kind::Server,
                    host: host.clone(),
                    port,
                    database: database.clone(),
                    user: user.clone(),
                    sslmode: mode.to_string(),
                    root_cert: Some("/etc/pem/root.crt".into()),
                    efm: None,
                };
                let r = Registry::parse(&Registry::default().with(t).render()).unwrap();
                let s = r.settings(Kind::Server, &host, port, &database, &user, &server).unwrap();
                prop_assert!(s.sslmode >= mode.parse::<SslMode>().unwrap());
                prop_assert!(r.settings(Kind::Server, &host, port.wrapping_add(1).max(1), &database, &user, &server).is_err() || port == u16::MAX);
                prop_assert!(r.settings(Kind::Pgbouncer, &host, port, &database, &user, &server).is_err());
            }
        }
    }
}
