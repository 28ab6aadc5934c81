//! The only way statements reach the PEM server.
//!
//! pgBouncer 1.18 in transaction pooling cannot carry named prepared statements between
//! clients (they vanish or collide), nor any session state. So every statement here uses either
//! the simple protocol or the unnamed statement (`query_typed`), with its parameter types given
//! up front so no type lookup (itself a named statement) happens. Every call has a timeout.

use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};
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

/// Runs `work` inside BEGIN ... COMMIT (one server connection even behind a transaction
/// pool); on any error the transaction is rolled back and the error returned. `what` names the
/// transaction in messages.
pub async fn transaction<T, E: From<Error>>(
    client: &Client,
    what: &str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    batch(client, &format!("starting {what}"), "BEGIN").await?;
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
