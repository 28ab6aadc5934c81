//! The crate-level error and the exit codes the binary maps it to.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | bad input or configuration: flags, names, local files, an existing file without `--force`, a directory root must not write into |
//! | 2 | cannot connect or authenticate to the PEM server (network, TLS, password, certificate) |
//! | 3 | the agent is registered but inactive (`--verify-registration`) |
//! | 4 | the PEM server refused: missing rights, missing schema, a rejected statement |
//! | 5 | a local file system operation failed |

use crate::{connection, fsutil, monitored, pooler, registration, sandbox, spool};

/// What the process exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Success = 0,
    Config = 1,
    Connect = 2,
    Inactive = 3,
    Server = 4,
    Local = 5,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connection(#[from] connection::Error),
    #[error(transparent)]
    Pooler(#[from] pooler::Error),
    #[error(transparent)]
    Files(#[from] fsutil::Error),
    #[error(transparent)]
    Registration(#[from] registration::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error(transparent)]
    Monitored(#[from] monitored::Error),
    #[error(transparent)]
    Spool(#[from] spool::Error),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Connection(e) => connection_exit_code(e),
            Error::Pooler(e) => e.exit_code(),
            Error::Files(e) => files_exit_code(e),
            Error::Registration(e) => e.exit_code(),
            Error::Sandbox(sandbox::Error::Servers(sandbox::servers::Error::Missing {
                ..
            })) => ExitCode::Config,
            Error::Sandbox(_) => ExitCode::Local,
            Error::Monitored(e) => e.exit_code(),
            Error::Spool(e) => e.exit_code(),
            Error::Usage(_) => ExitCode::Config,
        }
    }
}

pub(crate) fn connection_exit_code(e: &connection::Error) -> ExitCode {
    if e.is_config() {
        ExitCode::Config
    } else if e.is_connect() || e.is_closed() {
        ExitCode::Connect
    } else {
        ExitCode::Server
    }
}

pub(crate) fn files_exit_code(e: &fsutil::Error) -> ExitCode {
    match e {
        fsutil::Error::Exists { .. }
        | fsutil::Error::UnknownUser(_)
        | fsutil::Error::Unsafe { .. } => ExitCode::Config,
        fsutil::Error::Io { .. } => ExitCode::Local,
    }
}
