//! Logging: tracing to agent.cfg's log_location (through a non-blocking writer whose guard
//! flushes every buffered line at exit) and to stderr in the foreground, at PEM's levels, with
//! the level changeable at run time (SIGHUP).

use std::path::Path;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Registry, reload};

use crate::config::LogLevel;

/// Keeps the log writer alive; dropping it flushes what is buffered.
pub struct Logging {
    handle: reload::Handle<Targets, Registry>,
    _guard: Option<tracing_appender::non_blocking::WorkerGuard>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot open log file {path}: {source}; fix log_location in agent.cfg or the directory's permissions"
)]
pub struct Error {
    path: String,
    #[source]
    source: std::io::Error,
}

/// Opens the log file for appending the way root may: its directory created 0750 if missing
/// and checked like every directory root writes to (fsutil), the file created 0640, never
/// opened through a symbolic link, and refused unless it is a regular file (a FIFO planted
/// there would block the worker).
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let to_io = |e: crate::fsutil::Error| {
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::fsutil::ensure_dir(dir, 0o750, None).map_err(to_io)?;
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is a symbolic link, which is never followed; remove it or name the real file",
        ));
    }
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(flags.bits())
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// The filter of a log level (target=level directives, without regular expressions).
fn filter(level: LogLevel) -> Targets {
    level
        .filter()
        .parse()
        .expect("LogLevel::filter gives valid directives")
}

/// Logs for a command-line run: `level` (`-l`; default warnings and errors) on stderr
/// (`PEMWORKER_LOG` overrides).
pub fn init_cli(level: Option<LogLevel>) {
    let filter = std::env::var("PEMWORKER_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| filter(level.unwrap_or(LogLevel::Warning)));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time();
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}

/// Logs for the worker: to `file` if given, and to stderr when `stderr` is set.
pub fn init_worker(level: LogLevel, file: Option<&Path>, stderr: bool) -> Result<Logging, Error> {
    let (filter, handle) = reload::Layer::new(filter(level));
    let (file_layer, guard) = match file {
        Some(path) => {
            let f = open_log(path).map_err(|source| Error {
                path: path.display().to_string(),
                source,
            })?;
            // The default queue preallocates 128,000 slots (4 MB, a quarter of the agent's
            // footprint); a short queue that blocks when full loses no line either.
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .buffered_lines_limit(1024)
                .lossy(false)
                .finish(f);
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false);
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    // Colours only on a terminal: under systemd stderr is the journal.
    let stderr_layer = stderr.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(file_layer)
        .with(stderr_layer)
        .try_init();
    Ok(Logging {
        handle,
        _guard: guard,
    })
}

impl Logging {
    pub fn set_level(&self, level: LogLevel) {
        if let Err(e) = self.handle.reload(filter(level)) {
            tracing::warn!("cannot change the log level: {e}");
        }
    }
}
