//! pemworker: a PEM agent worker built for PEM servers reached through pgBouncer.
//!
//! The binary (`src/main.rs`) only parses the command line, sets up logging and maps results to
//! exit codes; everything else lives here:
//!
//! - [`agentcfg`]: agent.cfg, read with line numbers and rewritten in place.
//! - [`backoff`]: jittered exponential backoff for reconnection.
//! - [`cli`]: the command line (PEM's flag spellings) and its resolution into checked settings.
//! - [`error`]: the crate-level error, exit codes and how each failure maps onto one.
//! - [`secret`]: passwords: redacted in `Debug`, read from the environment, `~/.pgpass` or a prompt.
//! - [`mac`]: the per-agent secret and the MAC that proves which agent sent a write.
//! - [`config`]: the worker's checked configuration (agent.cfg with `-o` overrides).
//! - [`connection`]: connections to the PEM server with libpq's meanings (sslmode, root CA, client
//!   certificate) and the pool-safe statement helpers every query goes through.
//! - [`certs`]: key pairs, certificate signing requests and the private files they live in.
//! - [`logging`]: the worker's log file and stderr, at PEM's levels, reloadable.
//! - [`fsutil`]: atomic writes, backups, ownership and modes of the files we manage.
//! - [`spool`]: the on-disk queue every sample passes through on its way to the server, the
//!   samples the server refused, the state directory's lock, and `pemworker spool`.
//! - [`worker`]: the running agent: heartbeat, collector and delivery loops, reload, shutdown.
//! - [`testhooks`]: faults the integration tests inject (feature `test-hooks`; empty otherwise).
//! - [`schema`]: the reference PEM server schema (`etc/sql`) and its ordered migrations.
//! - [`monitored`]: monitored servers, pgBouncer bindings and probe settings (`--register-server`,
//!   `pooler bind`, `--enable-probe` ...).
//! - [`targets`]: the monitored servers registered from this host, the only ones that get a
//!   password, and the weakest sslmode for each.
//! - [`pooler`]: the pooled side: preparing the PEM server (and its CA), proxy agent users,
//!   pgBouncer's files and certificate.
//! - [`program`]: the names the binary answers to (`pemagent`, `pemworker`) and `--version`.
//! - [`probes`]: what the agent measures (OS, PostgreSQL, pgBouncer) and the shape of a sample.
//! - [`registration`]: registering, verifying, unregistering and migrating agents.
//! - [`fleet`]: `pemworker fleet`, many agents against a throwaway PEM server, measured.

pub mod agentcfg;
pub mod backoff;
pub mod certs;
pub mod cli;
pub mod config;
pub mod connection;
pub mod error;
pub mod fleet;
pub mod fsutil;
pub mod logging;
pub mod mac;
pub mod monitored;
pub mod pooler;
pub mod probes;
pub mod program;
pub mod registration;
pub mod sandbox;
pub mod schema;
pub mod secret;
pub mod spool;
pub mod targets;
pub mod testhooks;
pub mod worker;

pub use error::{Error, ExitCode};
