//! Server-level probes: SQL run on a monitored PostgreSQL server (12 or later).
//!
//! This module owns the probe queries and how they run. Each query is a named constant that
//! selects exactly its probe's columns, in order, under the column names; every value is cast to
//! text because the PEM server casts it to the column's type on insert. The queries need no
//! superuser: membership in `pg_monitor` is enough.
//!
//! A probe is one simple-protocol message (safe behind any pooler) of several statements, which
//! the server runs as one implicit transaction: it sets a local statement timeout, so a slow or
//! blocked probe is cancelled by the server itself, and leaves no setting behind; a failure rolls
//! the transaction back at the end of the message, with nothing for the agent to clean up. So the
//! probes of one round can be sent together on one session without affecting each other.

mod normalize;

use std::time::Duration;

use tokio_postgres::Client;

use super::{Collector, Error, ProbeSpec, Row, Value, spec};
use crate::connection::pool;

/// Names the monitored server in errors; the caller knows its address, this module does not.
const TARGET: &str = "the monitored server";

/// Settings for the probe's transaction only (`SET LOCAL`). The catalogs come first so that
/// objects in the monitored databases cannot shadow them, and timestamps are printed in ISO
/// style whatever the server's DateStyle, so the PEM server reads them unambiguously.
const TRANSACTION_SETTINGS: &str =
    "SET LOCAL search_path = pg_catalog, pg_temp; SET LOCAL DateStyle = 'ISO, YMD'";

pub(super) const SERVER_INFO: &str = "
SELECT version()::text AS version,
       pg_postmaster_start_time()::text AS server_start,
       extract(epoch FROM now() - pg_postmaster_start_time())::text AS uptime_seconds,
       pg_is_in_recovery()::text AS is_in_recovery,
       current_setting('max_connections')::text AS max_connections";

/// Databases that cannot be connected to (template0) have no size worth showing; datconnlimit
/// -2 marks a database whose DROP was interrupted (15.4 and later), which cannot be sized.
pub(super) const DATABASE_SIZE: &str = "
SELECT d.datname::text AS database_name,
       pg_database_size(d.oid)::text AS size_bytes
  FROM pg_database AS d
 WHERE d.datallowconn AND d.datconnlimit <> -2
 ORDER BY d.datname";

/// All backends, background processes included (NULL database and state): GROUP BY treats
/// NULLs as equal, so each (database_name, state) pair occurs once.
pub(super) const SESSION_INFO: &str = "
SELECT a.datname::text AS database_name,
       a.state::text AS state,
       count(*)::text AS count
  FROM pg_stat_activity AS a
 GROUP BY a.datname, a.state
 ORDER BY a.datname, a.state";

/// pg_blocking_pids() is costly (it locks the lock manager), so it runs only for sessions that
/// wait on a lock. It may list a pid twice (parallel query), hence DISTINCT ON. The statement
/// text is stored without its literals (see STATEMENT_COLUMNS).
pub(super) const BLOCKED_SESSIONS: &str = "
SELECT DISTINCT ON (a.pid, b.pid)
       a.pid::text AS blocked_pid,
       b.pid::text AS blocking_pid,
       left(a.query, 1024) AS blocked_query,
       extract(epoch FROM clock_timestamp() - coalesce(a.state_change, a.query_start))::text
           AS wait_seconds
  FROM pg_stat_activity AS a
 CROSS JOIN LATERAL unnest(pg_blocking_pids(a.pid)) AS b(pid)
 WHERE a.wait_event_type = 'Lock'
 ORDER BY a.pid, b.pid";

/// One row per (application_name, client_addr), the newest connection winning; host() prints
/// the address without the /32 that a text cast of inet would add.
pub(super) const STREAMING_REPLICATION: &str = "
SELECT DISTINCT ON (r.application_name, r.client_addr)
       r.application_name::text AS application_name,
       host(r.client_addr) AS client_addr,
       r.state::text AS state,
       r.sent_lsn::text AS sent_lsn,
       r.replay_lsn::text AS replay_lsn,
       extract(epoch FROM r.replay_lag)::text AS replay_lag_seconds
  FROM pg_stat_replication AS r
 ORDER BY r.application_name, r.client_addr, r.backend_start DESC";

/// PostgreSQL 17 moved the checkpoint counters to pg_stat_checkpointer and dropped
/// buffers_backend; this query covers 12 to 16.
pub(super) const BGWRITER_STATISTICS: &str = "
SELECT b.checkpoints_timed::text AS checkpoints_timed,
       b.checkpoints_req::text AS checkpoints_req,
       b.buffers_checkpoint::text AS buffers_checkpoint,
       b.buffers_clean::text AS buffers_clean,
       b.buffers_backend::text AS buffers_backend,
       b.maxwritten_clean::text AS maxwritten_clean
  FROM pg_stat_bgwriter AS b";

/// Every database, template0 included: wraparound concerns them all. The probe's own
/// transaction is not counted as the oldest one.
pub(super) const XID_AGE: &str = "
SELECT d.datname::text AS database_name,
       age(d.datfrozenxid)::text AS datfrozenxid_age,
       (SELECT extract(epoch FROM clock_timestamp() - min(a.xact_start))
          FROM pg_stat_activity AS a
         WHERE a.datid = d.oid AND a.pid <> pg_backend_pid())::text AS oldest_xact_age_seconds
  FROM pg_database AS d
 ORDER BY d.datname";

/// The probe's spec and query, or `Unknown` for anything that is not a server-level probe.
fn probe_query(probe: &str) -> Result<(&'static ProbeSpec, &'static str), Error> {
    match spec(probe) {
        Some(
            s @ ProbeSpec {
                collector: Collector::Sql(sql),
                ..
            },
        ) => Ok((s, sql)),
        _ => Err(Error::Unknown(probe.to_string())),
    }
}

/// The whole simple-protocol message: the settings, then the query, in the message's implicit
/// transaction (PostgreSQL 10 and later). 0 would disable the timeout, so the shortest is 1 ms.
fn message(sql: &str, statement_timeout: Duration) -> String {
    let ms = statement_timeout.as_millis().clamp(1, i32::MAX as u128);
    format!(
        "SET LOCAL statement_timeout = {ms}; {TRANSACTION_SETTINGS}; {}",
        sql.trim()
    )
}

/// Columns that hold another session's statement text: stored only with their literals and
/// comments removed ([`normalize`]), since a statement may carry a password or other secret.
const STATEMENT_COLUMNS: &[(&str, &str)] = &[("blocked_sessions", "blocked_query")];

/// Removes the literals of every statement-text column of `row`.
fn scrub(probe: &ProbeSpec, row: &mut Row) {
    for (p, column) in STATEMENT_COLUMNS {
        if *p != probe.name {
            continue;
        }
        let at = probe.columns.iter().position(|(c, _)| c == column);
        if let Some(Value::Text(t)) = at.and_then(|i| row.get_mut(i)) {
            *t = normalize::normalize(t);
        }
    }
}

/// One result row as the probe's row. The names must be the spec's columns in order, so a query
/// that drifted from its spec fails loudly instead of storing values in the wrong columns.
fn to_row(probe: &ProbeSpec, names: &[&str], values: Vec<Option<&str>>) -> Result<Row, Error> {
    let expected = probe.columns.iter().map(|(name, _)| *name);
    if !expected.eq(names.iter().copied()) {
        return Err(Error::Failed {
            probe: probe.name.to_string(),
            message: format!(
                "query returned columns {names:?}, expected {:?}",
                probe.columns.iter().map(|(n, _)| n).collect::<Vec<_>>()
            ),
        });
    }
    Ok(values.into_iter().map(Value::from).collect())
}

/// Rows of one server-level probe, in the columns of its [`ProbeSpec`]. The server cancels the
/// query after `statement_timeout`; the connection is then still usable, with no transaction
/// left open.
pub async fn collect(
    client: &Client,
    probe: &str,
    statement_timeout: Duration,
) -> Result<Vec<Row>, Error> {
    let (spec, sql) = probe_query(probe)?;
    let rows = pool::simple_rows(
        client,
        "running the probe query",
        &message(sql, statement_timeout),
    )
    .await
    .map_err(|source| Error::Connection {
        probe: probe.to_string(),
        target: TARGET.to_string(),
        source,
    })?;
    rows.iter()
        .map(|r| {
            let names: Vec<&str> = r.columns().iter().map(|c| c.name()).collect();
            let values = (0..r.len())
                .map(|i| pool::text(r, i, probe))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Failed {
                    probe: probe.to_string(),
                    message: e.to_string(),
                })?;
            let mut row = to_row(spec, &names, values)?;
            scrub(spec, &mut row);
            Ok(row)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::{PROBES, Target};

    fn server_probes() -> impl Iterator<Item = &'static ProbeSpec> {
        PROBES.iter().filter(|p| p.target() == Target::Server)
    }

    #[test]
    fn every_server_probe_has_a_query_selecting_its_columns_in_order() {
        assert_eq!(server_probes().count(), 7);
        for p in server_probes() {
            let (s, sql) = probe_query(p.name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.name, p.name);
            let mut from = 0;
            for (col, _) in p.columns {
                let alias = format!("AS {col}");
                let at = sql[from..]
                    .find(&alias)
                    .unwrap_or_else(|| panic!("{}: no `{alias}` after offset {from}", p.name));
                from += at + alias.len();
            }
        }
    }

    #[test]
    fn every_server_probe_row_has_its_columns() {
        for p in server_probes() {
            let names: Vec<&str> = p.columns.iter().map(|(n, _)| *n).collect();
            let mut values = vec![Some("1"); names.len()];
            values[0] = None;
            let row = to_row(p, &names, values).unwrap();
            assert_eq!(row.len(), p.columns.len(), "{}", p.name);
            assert_eq!(row[0], Value::Null);
            assert_eq!(row[1], Value::Text("1".into()));
        }
    }

    #[test]
    fn a_row_with_other_columns_is_refused_naming_the_probe() {
        let p = spec("database_size").unwrap();
        let err = to_row(p, &["size_bytes", "database_name"], vec![None, None]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("probe database_size: query returned columns"),
            "{msg}"
        );
        let err = to_row(p, &["database_name"], vec![None]).unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{err}");
    }

    #[test]
    fn statement_text_is_stored_without_its_literals() {
        let p = spec("blocked_sessions").unwrap();
        let names: Vec<&str> = p.columns.iter().map(|(n, _)| *n).collect();
        let mut row = to_row(
            p,
            &names,
            vec![
                Some("1"),
                Some("2"),
                Some("ALTER ROLE app PASSWORD 'S3cret-x'"),
                Some("0.5"),
            ],
        )
        .unwrap();
        scrub(p, &mut row);
        assert_eq!(row[2], Value::Text("ALTER ROLE app PASSWORD ?".into()));
        assert!(STATEMENT_COLUMNS.iter().all(|(probe, col)| {
            spec(probe).is_some_and(|s| s.columns.iter().any(|(c, _)| c == col))
        }));
    }

    #[test]
    fn other_probes_are_unknown_here() {
        for name in ["cpu_usage", "pgbouncer_pools", "no_such_probe"] {
            assert!(
                matches!(probe_query(name), Err(Error::Unknown(ref n)) if n == name),
                "{name}"
            );
        }
    }

    #[test]
    fn the_query_runs_in_one_message_with_a_local_timeout() {
        let t = message(SERVER_INFO, Duration::from_millis(2500));
        assert!(t.starts_with("SET LOCAL statement_timeout = 2500; "), "{t}");
        assert!(t.ends_with("AS max_connections"), "{t}");
        // Zero would switch the timeout off.
        assert!(message(SERVER_INFO, Duration::ZERO).contains("statement_timeout = 1;"));
        assert!(
            message(SERVER_INFO, Duration::from_secs(u64::MAX))
                .contains(&format!("statement_timeout = {};", i32::MAX))
        );
    }
}
