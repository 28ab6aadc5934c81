//! Delivery: spooled batches to the PEM server, oldest first, one transaction per batch.
//!
//! Each sample becomes two statements on its probe's tables: history rows inserted with
//! `ON CONFLICT (delivery_key) DO NOTHING` (so a batch delivered twice, after a commit whose
//! answer was lost, is stored once) together with an upsert of the latest values; then latest
//! rows this sample no longer has (a vanished mount point) are deleted. Rows travel as one
//! JSON parameter expanded by `jsonb_to_recordset`, so every statement is a single unnamed
//! statement with text parameters: safe behind pgBouncer in transaction pooling.
//!
//! [`store`] is the one entry point. When the server refuses a batch as data (SQLSTATE class
//! 22 or 23), the batch is stored again with a savepoint per sample, so only the samples the
//! server refuses are left out, and returned as [`Rejection`]s: the shape the PEM server's
//! `pem.store_samples` answers with, so moving to it changes this module only.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::backoff::Backoff;
use crate::spool::RejectedSample;

use crate::connection::session::{Session, Transaction};
use crate::connection::{Error, pool};
use crate::probes::{PROBES, ProbeSpec, Sample, Target, Value};

/// The statements of one probe.
#[derive(Debug)]
pub struct Statements {
    pub store: String,
    pub prune: String,
}

/// A sample the server refused as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Its position in the batch.
    pub index: usize,
    /// The server's SQLSTATE; `None` when this agent could not even send it.
    pub sqlstate: Option<String>,
    pub message: String,
}

fn build(p: &ProbeSpec) -> Statements {
    let t = p.table();
    let (ctx_cols, ctx_vals, ctx_match): (&[&str], &[&str], &str) = match p.target() {
        Target::Agent => (&[], &[], ""),
        Target::Server => (
            &["server_id"],
            &["$3::int"],
            " AND server_id IS NOT DISTINCT FROM $3::int",
        ),
        Target::Pgbouncer => (
            &["server_id", "pgbouncer"],
            &["$3::int", "$4::text"],
            " AND server_id IS NOT DISTINCT FROM $3::int AND pgbouncer IS NOT DISTINCT FROM $4::text",
        ),
    };
    let data_cols: Vec<&str> = p.columns.iter().map(|(c, _)| *c).collect();
    let recordset: Vec<String> = std::iter::once("delivery_key uuid".to_string())
        .chain(p.columns.iter().map(|(c, ty)| format!("{c} {ty}")))
        .collect();
    let mut all_cols = vec!["agent_id"];
    all_cols.extend(ctx_cols);
    all_cols.push("collected_at");
    let mut all_vals = vec!["$2::int"];
    all_vals.extend(ctx_vals);
    all_vals.push("$5::text::timestamptz");
    let conflict: Vec<&str> = std::iter::once("agent_id")
        .chain(ctx_cols.iter().copied())
        .chain(p.key.iter().copied())
        .collect();
    let updates: Vec<String> = std::iter::once("collected_at".to_string())
        .chain(
            data_cols
                .iter()
                .filter(|c| !p.key.contains(c))
                .map(|c| c.to_string()),
        )
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let store = format!(
        "WITH s AS (SELECT * FROM jsonb_to_recordset($1::text::jsonb) AS x({recordset})), \
         h AS (INSERT INTO pemhistory.{t} ({all_cols}, delivery_key, {data}) \
               SELECT {all_vals}, delivery_key, {data} FROM s ON CONFLICT (delivery_key) DO NOTHING) \
         INSERT INTO pemdata.{t} ({all_cols}, {data}) SELECT {all_vals}, {data} FROM s \
         ON CONFLICT ({conflict}) DO UPDATE SET {updates} WHERE pemdata.{t}.collected_at <= EXCLUDED.collected_at",
        recordset = recordset.join(", "),
        all_cols = all_cols.join(", "),
        all_vals = all_vals.join(", "),
        data = data_cols.join(", "),
        conflict = conflict.join(", "),
        updates = updates.join(", "),
    );
    let prune = format!(
        "DELETE FROM pemdata.{t} WHERE agent_id = $2::int{ctx_match} AND collected_at < $5::text::timestamptz"
    );
    Statements { store, prune }
}

/// Every probe's statements, built once.
pub static STATEMENTS: LazyLock<HashMap<&'static str, Statements>> =
    LazyLock::new(|| PROBES.iter().map(|p| (p.name, build(p))).collect());

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        Value::Text(s) => s.clone().into(),
    }
}

fn rows_json(spec: &ProbeSpec, s: &Sample) -> String {
    let rows: Vec<serde_json::Value> = s
        .rows
        .iter()
        .map(|(key, row)| {
            let mut m = serde_json::Map::new();
            m.insert("delivery_key".into(), key.to_string().into());
            for ((col, _), v) in spec.columns.iter().zip(row) {
                m.insert((*col).to_string(), value_json(v));
            }
            serde_json::Value::Object(m)
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// Stores one batch; returns the samples the server refused as data (all others are stored,
/// in one transaction). Any other failure stores nothing and is returned as the error.
pub async fn store(
    session: &mut Session,
    agent_id: i32,
    samples: &[Sample],
) -> Result<Vec<Rejection>, Error> {
    // Samples this agent cannot send at all (a newer agent's spool read by an older one) are
    // refused here, never skipped silently.
    let mut rejected: Vec<Rejection> = samples
        .iter()
        .enumerate()
        .filter(|(_, s)| crate::probes::spec(&s.probe).is_none())
        .map(|(index, s)| Rejection {
            index,
            sqlstate: None,
            message: format!("this agent does not know probe {}", s.probe),
        })
        .collect();
    let known: Vec<(usize, &Sample)> = samples
        .iter()
        .enumerate()
        .filter(|(_, s)| crate::probes::spec(&s.probe).is_some())
        .collect();
    if known.is_empty() {
        return Ok(rejected);
    }
    let mut tx = session.begin("a delivery").await?;
    let whole = async {
        for (_, s) in &known {
            store_sample(&mut tx, agent_id, s).await?;
        }
        Ok::<_, Error>(())
    }
    .await;
    match whole {
        Ok(()) => {
            crate::testhooks::pause_async("in-transaction").await;
            tx.commit().await?;
            return Ok(rejected);
        }
        Err(e) if e.is_data() => {
            tracing::debug!("a batch was refused as data ({e}); storing its samples one by one");
            tx.rollback().await?;
        }
        Err(e) => {
            // An open transaction is rolled back by the session before its next use.
            return Err(e);
        }
    }
    let mut tx = session.begin("a delivery, sample by sample").await?;
    for (index, s) in known {
        tx.savepoint("sample").await?;
        match store_sample(&mut tx, agent_id, s).await {
            Ok(()) => tx.release("sample").await?,
            Err(e) if e.is_data() => {
                tx.rollback_to("sample").await?;
                rejected.push(Rejection {
                    index,
                    sqlstate: e.code().map(|c| c.code().to_string()),
                    message: e.to_string(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    tx.commit().await?;
    rejected.sort_by_key(|r| r.index);
    Ok(rejected)
}

/// The statements of one sample of a known probe.
async fn store_sample(tx: &mut Transaction<'_>, agent_id: i32, s: &Sample) -> Result<(), Error> {
    let (Some(spec), Some(st)) = (
        crate::probes::spec(&s.probe),
        STATEMENTS.get(s.probe.as_str()),
    ) else {
        return Ok(());
    };
    let json = rows_json(spec, s);
    let at = s.collected_at.to_rfc3339();
    let params: [pool::Param<'_>; 5] = [
        (&json, Type::TEXT),
        (&agent_id, Type::INT4),
        (&s.server_id, Type::INT4),
        (&s.pgbouncer, Type::TEXT),
        (&at, Type::TEXT),
    ];
    let what = format!("storing a {} sample", s.probe);
    // Every parameter's type is declared, so a statement may leave some unused.
    tx.execute(&what, &st.store, &params).await?;
    tx.execute(&what, &st.prune, &params).await?;
    Ok(())
}

/// What the delivery loop does next.
enum Next {
    /// The spool is empty: wait for a batch.
    Idle,
    /// Delivery failed: try again after this long.
    RetryIn(Duration),
}

/// A delivery problem that was logged, so that it is logged once until it ends.
#[derive(Debug, Default)]
struct Outage {
    /// What kind of failure was logged (its SQLSTATE, or "connection").
    logged: Option<String>,
    since: Option<std::time::Instant>,
}

impl Outage {
    fn failed(&mut self, e: &Error, waiting: u64, max_wait: Duration) -> String {
        let kind = e
            .code()
            .map_or_else(|| "connection".to_string(), |c| c.code().to_string());
        let problem = if e.is_transient() {
            format!("delivery postponed: {e}")
        } else {
            let advice = e.advice().map(|a| format!("; {a}")).unwrap_or_default();
            format!("the PEM server refuses to store samples: {e}{advice}")
        };
        if self.logged.as_deref() != Some(kind.as_str()) {
            let line = format!(
                "{problem}; {waiting} samples stay in the spool and are sent again (at most {} s apart) until it works",
                max_wait.as_secs().max(1)
            );
            if e.is_transient() {
                tracing::warn!("{line}");
            } else {
                tracing::error!("{line}");
            }
            self.logged = Some(kind);
            self.since.get_or_insert_with(std::time::Instant::now);
        } else {
            tracing::debug!("{problem}");
        }
        problem
    }

    fn ended(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::warn!("delivery works again after {} s", since.elapsed().as_secs());
        }
        self.logged = None;
    }
}

/// Delivers spooled batches whenever some arrive, retrying with backoff after a failure, until
/// stopped. Stopped in the middle of a delivery, the transaction is dropped uncommitted and its
/// session closed; the batch stays in the spool.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let stats_file = shared.config().state_dir.join("stats.json");
    let long_wait = shared.config().long_wait;
    let min = Duration::from_secs(1).min(long_wait);
    let mut backoff = Backoff::new(min, long_wait.max(min)).expect("bounds checked above");
    let mut outage = Outage::default();
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = drain(&shared, &mut backoff, &mut outage) => next,
        };
        shared.stats.set_spool(&shared.spool.figures());
        shared
            .stats
            .write_if_changed(&stats_file, shared.spool.health())
            .await;
        match next {
            Next::Idle => tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.spooled.notified() => {}
            },
            // New batches do not cut a backoff short: the server is not asked more often
            // because the agent collects often.
            Next::RetryIn(wait) => tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            },
        }
    }
}

/// Delivers until the spool is empty or a delivery fails.
async fn drain(shared: &Shared, backoff: &mut Backoff, outage: &mut Outage) -> Next {
    loop {
        if shared.spool.figures().batches == 0 {
            return Next::Idle;
        }
        // A session first, so an outage costs no read of the spool per attempt.
        let manager = shared.pem();
        let mut session = match manager.checkout().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("delivery waits: {e}");
                shared.stats.set_connected(false);
                return Next::RetryIn(manager.retry_in().max(Duration::from_secs(1)));
            }
        };
        shared.stats.set_connected(true);
        // From here until it is completed or released, the spool does not drop this batch.
        let entry = match shared.spool.oldest().await {
            Ok(Some(e)) => e,
            Ok(None) => return Next::Idle,
            Err(e) => {
                tracing::error!("cannot read the spool: {e}");
                return Next::RetryIn(backoff.next_delay());
            }
        };
        let agent_id = shared.config().agent_id;
        match store(&mut session, agent_id, &entry.samples).await {
            Ok(refusals) => {
                drop(session);
                crate::testhooks::pause_async("after-commit").await;
                outage.ended();
                backoff.reset();
                shared.stats.set_delivery_problem(None);
                let refused: Vec<RejectedSample> = refusals
                    .into_iter()
                    .filter_map(|r| {
                        let sample = entry.samples.get(r.index)?.clone();
                        tracing::error!(
                            "the PEM server refused a {} sample collected at {} as data: {}; it is kept in the spool (pemworker spool status, then spool replay once the cause is fixed)",
                            sample.probe,
                            sample.collected_at.to_rfc3339(),
                            r.message
                        );
                        Some(RejectedSample {
                            sample,
                            sqlstate: r.sqlstate,
                            message: r.message,
                            rejected_at: chrono::Utc::now(),
                            attempts: 1,
                        })
                    })
                    .collect();
                let (n, r) = (entry.samples.len(), refused.len());
                tracing::debug!("delivered spool batch {} ({} samples)", entry.seq, n - r);
                if let Err(e) = shared.spool.complete(entry.seq, refused).await {
                    // The batch stays: delivered again, it is stored once (delivery keys).
                    tracing::error!("cannot update the spool after a delivery: {e}");
                    return Next::RetryIn(backoff.next_delay());
                }
                shared.stats.delivered(n - r);
            }
            Err(e) => {
                if !e.is_closed() {
                    // The session answered but its state after the failure is not known to
                    // be clean: it is closed rather than given to anyone else.
                    session.discard();
                }
                drop(session);
                if let Err(e) = shared.spool.release().await {
                    tracing::error!("cannot update the spool after a failed delivery: {e}");
                }
                let wait = backoff.next_delay();
                let long_wait = shared.config().long_wait;
                let problem = outage.failed(&e, shared.spool.figures().samples, long_wait);
                shared.stats.set_delivery_problem(Some(problem));
                return Next::RetryIn(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_name_the_right_tables_and_keys() {
        let disk = &STATEMENTS["disk_space"];
        assert!(disk.store.contains(
            "INSERT INTO pemhistory.disk_space (agent_id, collected_at, delivery_key, mount_point"
        ));
        assert!(
            disk.store
                .contains("ON CONFLICT (agent_id, mount_point) DO UPDATE")
        );
        assert!(!disk.store.contains("mount_point = EXCLUDED.mount_point"));
        let pools = &STATEMENTS["pgbouncer_pools"];
        assert!(
            pools
                .store
                .contains("ON CONFLICT (agent_id, server_id, pgbouncer, database, user_name)")
        );
        assert!(
            pools
                .prune
                .contains("pgbouncer IS NOT DISTINCT FROM $4::text")
        );
        let info = &STATEMENTS["server_info"];
        assert!(
            info.store
                .contains("ON CONFLICT (agent_id, server_id) DO UPDATE")
        );
        assert_eq!(STATEMENTS.len(), PROBES.len());
    }

    #[test]
    fn rows_become_named_json_fields() {
        let spec = crate::probes::spec("load_average").unwrap();
        let s = Sample::new(
            "load_average",
            None,
            None,
            vec![vec![Value::Float(0.5), Value::Int(1), Value::Null]],
        );
        let j: serde_json::Value = serde_json::from_str(&rows_json(spec, &s)).unwrap();
        assert_eq!(j[0]["one"], 0.5);
        assert_eq!(j[0]["five"], 1);
        assert!(j[0]["fifteen"].is_null());
        assert_eq!(j[0]["delivery_key"], s.rows[0].0.to_string());
    }
}
