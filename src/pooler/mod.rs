//! The pooled side of a PEM installation (the guide's chapters 3 and 4).
//!
//! - [`prepare`]: prepares the PEM server for pgBouncer: auth user, admin user, grants, the
//!   reference schema on request, and the PEM server's pg_hba.conf lines.
//! - [`proxy_user`]: creates the common agent users pgBouncer logs in as.
//! - [`bouncer`]: writes pgBouncer's ini, HBA and user list, after checking its version.
//! - [`hba`]: renders and edits pg_hba-style lines, quoting names correctly.
//! - [`check`]: inspects a running setup end to end and repairs what is safe to repair.
//! - [`token`]: the admin's enrolment tokens, which agent hosts register with instead of its
//!   password.
//! - [`certificate`]: pgBouncer's TLS server certificate, issued from the PEM CA.

pub mod bouncer;
pub mod certificate;
pub mod check;
pub mod hba;
pub mod prepare;
pub mod proxy_user;
pub mod token;

use std::path::PathBuf;

use crate::error::{ExitCode, connection_exit_code, files_exit_code};
use crate::secret::Secret;
use crate::{connection, fsutil};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connection(#[from] connection::Error),
    #[error(transparent)]
    Files(#[from] fsutil::Error),
    #[error(
        "the PEM schema is not installed in database {database} on {target}; rerun with --install-schema or install the PEM server first"
    )]
    SchemaMissing { database: String, target: String },
    #[error(
        "the PEM schema in database {database} on {target} is at version {found}, older than this pemworker's; rerun with --install-schema to upgrade it"
    )]
    SchemaOutdated {
        database: String,
        target: String,
        found: i32,
    },
    #[error(
        "user {user} on {target} is not a superuser; prepare-server must run as one (for example postgres)"
    )]
    NotSuperuser { user: String, target: String },
    #[error("no password for new role {role}: set {env} or run on a terminal to be prompted")]
    NoPassword { role: String, env: &'static str },
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "{} is not the server's pg_hba.conf ({server_file}); pass the file the server reads or omit --pg-hba to print the lines",
        given.display()
    )]
    WrongHbaFile { given: PathBuf, server_file: String },
    #[error(
        "the server rejected the new pg_hba.conf lines ({errors}); {} was restored from {}",
        file.display(),
        backup.display()
    )]
    HbaRejected {
        file: PathBuf,
        backup: PathBuf,
        errors: String,
    },
    #[error(
        "cannot run {bin}: {source}; install pgBouncer (apt-get install pgbouncer) or pass --pgbouncer-bin"
    )]
    PgbouncerMissing {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot tell the version of {bin} from {output:?}; pass --pgbouncer-bin with a pgBouncer binary"
    )]
    PgbouncerVersionUnknown { bin: String, output: String },
    #[error(
        "pgBouncer {found} is too old: PEM agents authenticate by certificate, which needs pgBouncer 1.9 or later; upgrade pgBouncer"
    )]
    PgbouncerTooOld { found: String },
    #[error("pooler check found {0} problem(s), listed above with their fixes")]
    Findings(usize),
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Connection(e) => connection_exit_code(e),
            Error::Files(e) => files_exit_code(e),
            Error::SchemaMissing { .. }
            | Error::SchemaOutdated { .. }
            | Error::NotSuperuser { .. }
            | Error::HbaRejected { .. } => ExitCode::Server,
            Error::NoPassword { .. }
            | Error::Invalid { .. }
            | Error::WrongHbaFile { .. }
            | Error::PgbouncerMissing { .. }
            | Error::PgbouncerVersionUnknown { .. }
            | Error::PgbouncerTooOld { .. }
            | Error::Findings(_) => ExitCode::Config,
        }
    }
}

/// Environment variable holding the password of the pgBouncer auth user.
pub const AUTH_USER_PASSWORD_ENV: &str = "PEMWORKER_AUTH_USER_PASSWORD";
/// Environment variable holding the password of the pgBouncer admin user.
pub const ADMIN_USER_PASSWORD_ENV: &str = "PEMWORKER_ADMIN_USER_PASSWORD";
/// Environment variable holding the password of pgBouncer's statistics console user.
pub const STATS_USER_PASSWORD_ENV: &str = "PEMWORKER_STATS_USER_PASSWORD";

/// A password for `role` from `env`, else a terminal prompt, else an error naming `env`.
pub fn new_password(role: &str, env: &'static str) -> Result<Secret, Error> {
    crate::secret::from_env(&[env])
        .or_else(|| crate::secret::prompt(&format!("Password for {role}: ")))
        .ok_or_else(|| Error::NoPassword {
            role: role.to_string(),
            env,
        })
}

/// What one command changed, step by step, for the user to read.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<(bool, String)>,
}

impl Report {
    pub fn changed(&mut self, what: impl Into<String>) {
        self.lines.push((true, what.into()));
    }

    pub fn unchanged(&mut self, what: impl Into<String>) {
        self.lines.push((false, what.into()));
    }

    pub fn change_count(&self) -> usize {
        self.lines.iter().filter(|(c, _)| *c).count()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (changed, line) in &self.lines {
            writeln!(
                f,
                "{} {line}",
                if *changed { "changed:  " } else { "unchanged:" }
            )?;
        }
        match self.change_count() {
            0 => write!(f, "nothing to change"),
            1 => write!(f, "1 change"),
            n => write!(f, "{n} changes"),
        }
    }
}
