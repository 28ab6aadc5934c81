//! The only way statements reach the PEM server.
//!
//! pgBouncer 1.18 in transaction pooling cannot carry named prepared statements between
//! clients (they vanish or collide), nor any session state. So every statement here uses either
//! the simple protocol or the unnamed statement (`query_typed`), with its parameter types given
//! up front so no type lookup (itself a named statement) happens. Every call has a timeout.

use std::time::Duration;

use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Client, Row, SimpleQueryMessage};

use super::Error;

/// Longest wait for one statement; a longer silence means the connection is unusable.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A parameter and its declared type.
pub type Param<'a> = (&'a (dyn ToSql + Sync), Type);

async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|source| Error::Query {
            what: what.to_string(),
            source,
        }),
        Err(_) => Err(Error::QueryTimeout {
            what: what.to_string(),
            timeout: STATEMENT_TIMEOUT,
        }),
    }
}

/// Rows of one statement with typed parameters (unnamed statement, one round trip).
/// `what` names the step for error messages ("checking role pem_admin1").
pub async fn query(
    client: &Client,
    what: &str,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Row>, Error> {
    bounded(what, client.query_typed(sql, params)).await
}

/// The first row of a statement that always returns one (`SELECT f(...)`); no row is a
/// [`Error::Reply`], not a panic.
pub async fn query_one(
    client: &Client,
    what: &str,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Row, Error> {
    query(client, what, sql, params)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Reply {
            what: what.to_string(),
            why: "no row".into(),
        })
}

/// The first column of the one row a statement returns (`SELECT f(...)`), as `T`; a missing
/// row or column, a NULL for a non-`Option` or another type is an [`Error::Reply`].
pub async fn query_value<T: tokio_postgres::types::FromSqlOwned>(
    client: &Client,
    what: &str,
    sql: &str,
    params: &[Param<'_>],
) -> Result<T, Error> {
    get(&query_one(client, what, sql, params).await?, 0, what)
}

/// Column `idx` of a simple-protocol row as text (`None` for NULL); a missing column or text
/// that is not UTF-8 is an [`Error::Reply`], never a panic.
pub fn text<'a>(
    row: &'a tokio_postgres::SimpleQueryRow,
    idx: usize,
    what: &str,
) -> Result<Option<&'a str>, Error> {
    row.try_get(idx).map_err(|e| Error::Reply {
        what: what.to_string(),
        why: format!("column {idx}: {e}"),
    })
}

/// Column `idx` of `row` as `T`; a missing column, a NULL for a non-`Option` or another type is
/// an [`Error::Reply`] naming the step, never a panic.
pub fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize, what: &str) -> Result<T, Error> {
    row.try_get(idx).map_err(|e| Error::Reply {
        what: what.to_string(),
        why: format!("column {idx}: {e}"),
    })
}

/// At most one row.
pub async fn query_opt(
    client: &Client,
    what: &str,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Option<Row>, Error> {
    Ok(query(client, what, sql, params).await?.into_iter().next())
}

/// A statement whose rows do not matter; returns the affected row count.
pub async fn execute(
    client: &Client,
    what: &str,
    sql: &str,
    params: &[Param<'_>],
) -> Result<u64, Error> {
    bounded(what, client.execute_typed(sql, params)).await
}

/// One or more statements without parameters, in the simple protocol (DDL, BEGIN/COMMIT, and
/// anything on pgBouncer's admin console).
pub async fn batch(client: &Client, what: &str, sql: &str) -> Result<(), Error> {
    bounded(what, client.batch_execute(sql)).await
}

/// How every transaction starts. Behind a transaction pool the server session is shared, and
/// any login may set its own role defaults (`ALTER ROLE CURRENT_USER SET ...`), so nothing a
/// transaction depends on is left to the session: it asks for READ WRITE and pins, for itself
/// only, the settings another client could have poisoned. One simple-protocol message, so no
/// idle gap exists before the timeouts below apply.
pub const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED, READ WRITE; \
    SET LOCAL search_path = pg_catalog, pg_temp; \
    SET LOCAL statement_timeout = '30s'; \
    SET LOCAL lock_timeout = '10s'; \
    SET LOCAL idle_in_transaction_session_timeout = '60s'";

/// Runs `work` inside BEGIN ... COMMIT (one server connection even behind a transaction
/// pool); on any error the transaction is rolled back and the error returned. `what` names the
/// transaction in messages.
///
/// Only for a client its caller owns alone and drops when done (one-shot commands): nothing
/// stops another task's statement from landing inside the transaction, and a dropped future
/// leaves it open. Long-lived sessions use [`super::session::Transaction`].
pub async fn transaction<T, E: From<Error>>(
    client: &Client,
    what: &str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    batch(client, &format!("starting {what}"), BEGIN).await?;
    let result = match work.await {
        Ok(v) => batch(client, &format!("committing {what}"), "COMMIT")
            .await
            .map(|()| v)
            .map_err(E::from),
        Err(e) => Err(e),
    };
    if result.is_err() && !client.is_closed() {
        let _ = batch(client, &format!("rolling back {what}"), "ROLLBACK").await;
    }
    result
}

/// Simple-protocol query returning text rows (the only kind pgBouncer's console answers).
pub async fn simple_rows(
    client: &Client,
    what: &str,
    sql: &str,
) -> Result<Vec<tokio_postgres::SimpleQueryRow>, Error> {
    let msgs = bounded(what, client.simple_query(sql)).await?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect())
}
