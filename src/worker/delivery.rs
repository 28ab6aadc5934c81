//! Delivery: spooled batches to the PEM server, oldest first, one transaction per batch.
//!
//! A batch travels as one JSON text to `pem.store_samples(agent_id, sent_at, batch, mac)`, a
//! SECURITY DEFINER function (agents hold no table privileges), with a MAC made with the agent's
//! secret over the batch so no other agent can write it. The server stores each sample in its
//! own subtransaction: history rows keyed by their delivery key (a batch sent again after a lost
//! commit is stored once), latest values upserted, rows a sample no longer has pruned. A sample
//! it rejects as data comes back as (index, SQLSTATE, message); anything else (a MAC it does not
//! accept, a missing privilege, a read-only server) fails the whole call and stores nothing.
//! One unnamed statement with text parameters, in a transaction of the delivery's own session
//! ([`crate::connection::session::Transaction`]): safe behind pgBouncer in transaction pooling.
//!
//! [`store`] is the one entry point, for the delivery loop and for `pemworker spool replay`
//! alike. The loop keeps the samples the server rejected in the spool's `rejected/` area and
//! keeps any batch that failed as a whole, retrying it with backoff.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::backoff::Backoff;
use crate::spool::RejectedSample;

use crate::connection::session::Session;
use crate::connection::{Error, pool};
use crate::mac::{self, AgentKey, Kind};
use crate::probes::{ProbeSpec, Sample, Value};

/// The most samples one delivery sends, when the spool holds several batches: a backlog (after
/// an outage, or while the server falls behind) goes in a few large transactions rather than
/// one per round, which costs the PEM server and pgBouncer a fraction per sample (README,
/// "Fleet"). One round's batch is never split.
pub const MAX_DELIVERY_SAMPLES: usize = 500;

const STORE: &str = "SELECT sample_index, sqlstate, message FROM pem.store_samples($1, $2, $3, $4)";

/// A sample the server refused as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Its position in the batch.
    pub index: usize,
    /// The server's SQLSTATE; `None` when this agent could not even send it.
    pub sqlstate: Option<String>,
    pub message: String,
}

/// One row as `pem.store_samples` reads it: its delivery key and each column by name.
struct RowJson<'a> {
    spec: &'a ProbeSpec,
    key: &'a uuid::Uuid,
    row: &'a [Value],
}

impl serde::Serialize for RowJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.row.len() + 1))?;
        m.serialize_entry("delivery_key", self.key)?;
        for ((col, _), v) in self.spec.columns.iter().zip(self.row) {
            // serde_json writes a non-finite float as null, which the server stores as NULL.
            m.serialize_entry(col, v)?;
        }
        m.end()
    }
}

/// One sample of a known probe as `pem.store_samples` reads it.
struct SampleJson<'a> {
    spec: &'a ProbeSpec,
    sample: &'a Sample,
}

impl serde::Serialize for SampleJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (spec, sample) = (self.spec, self.sample);
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("probe", &sample.probe)?;
        m.serialize_entry("server_id", &sample.server_id)?;
        m.serialize_entry("pgbouncer", &sample.pgbouncer)?;
        m.serialize_entry("collected_at", &sample.collected_at.to_rfc3339())?;
        m.serialize_entry("rows", &RowsJson { spec, sample })?;
        m.end()
    }
}

/// A sample's rows as a JSON array.
struct RowsJson<'a> {
    spec: &'a ProbeSpec,
    sample: &'a Sample,
}

impl serde::Serialize for RowsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let spec = self.spec;
        s.collect_seq(
            self.sample
                .rows
                .iter()
                .map(|(key, row)| RowJson { spec, key, row }),
        )
    }
}

/// The batch as `pem.store_samples` reads it, and the positions in `samples` of the samples it
/// holds (in its order). Samples of probes this agent does not know (a newer agent's spool read
/// by an older one) cannot be sent at all: they are returned as refused here, never skipped
/// silently. The JSON is written straight into the statement's text, without a map per row.
fn batch_json(samples: &[Sample]) -> (String, Vec<usize>, Vec<Rejection>) {
    let mut items = Vec::with_capacity(samples.len());
    let mut sent = Vec::with_capacity(samples.len());
    let mut refused = Vec::new();
    for (index, s) in samples.iter().enumerate() {
        let Some(spec) = crate::probes::spec(&s.probe) else {
            refused.push(Rejection {
                index,
                sqlstate: None,
                message: format!("this agent does not know probe {}", s.probe),
            });
            continue;
        };
        items.push(SampleJson { spec, sample: s });
        sent.push(index);
    }
    let values: usize = items
        .iter()
        .map(|i| i.sample.rows.len() * (i.spec.columns.len() + 1))
        .sum();
    let mut out = Vec::with_capacity(128 * items.len() + 48 * values);
    serde_json::to_writer(&mut out, &items).expect("serializing to memory cannot fail");
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    (text, sent, refused)
}

/// Stores one batch with `pem.store_samples`, authenticated with `key` (without one, the
/// server refuses the call, and says how to fix it); returns the samples refused as data,
/// by their position in `samples`. All others are stored, in one transaction. Any other
/// failure stores nothing and is returned as the error.
pub async fn store(
    session: &mut Session,
    agent_id: i32,
    key: Option<&AgentKey>,
    samples: &[Sample],
) -> Result<Vec<Rejection>, Error> {
    let (batch, sent, mut rejected) = batch_json(samples);
    if sent.is_empty() {
        return Ok(rejected);
    }
    let sent_at = mac::now();
    let signature = mac::sign(key, Kind::Samples, agent_id, &sent_at, &batch);
    let what = format!("storing a batch of {} samples", sent.len());
    let params: [pool::Param<'_>; 4] = [
        (&agent_id, Type::INT4),
        (&sent_at, Type::TEXT),
        (&batch, Type::TEXT),
        (&signature, Type::TEXT),
    ];
    let (tx, rows) = session
        .begin_with("a delivery", &what, STORE, &params)
        .await?;
    // Read before committing: a reply that does not say which samples were refused stores
    // nothing (the transaction is dropped, and the session closed), and the batch stays.
    rejected.extend(refusals(&rows, &sent, &what)?);
    crate::testhooks::pause_async("in-transaction").await;
    tx.commit().await?;
    rejected.sort_by_key(|r| r.index);
    Ok(rejected)
}

/// The server's rows as [`Rejection`]s of `samples`, whose positions the batch's `sent` holds.
fn refusals(
    rows: &[tokio_postgres::Row],
    sent: &[usize],
    what: &str,
) -> Result<Vec<Rejection>, Error> {
    let mut out: Vec<Rejection> = Vec::with_capacity(rows.len());
    for row in rows {
        let at: i32 = pool::get(row, 0, what)?;
        let sqlstate: Option<String> = pool::get(row, 1, what)?;
        let message: Option<String> = pool::get(row, 2, what)?;
        let index = usize::try_from(at)
            .ok()
            .and_then(|i| sent.get(i).copied())
            .filter(|i| out.iter().all(|r| r.index != *i))
            .ok_or_else(|| Error::Reply {
                what: what.to_string(),
                why: format!("sample {at} refused, in a batch of {} samples", sent.len()),
            })?;
        out.push(Rejection {
            index,
            sqlstate,
            message: message.unwrap_or_default(),
        });
    }
    Ok(out)
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
    // When the clean code pages are next given back: after the first delivered round (start-up
    // is over), and once more a minute later, when the loops that start only after the first
    // round (schedule checks, the first heartbeats' follow-ups, renewal) have run once too.
    let mut code_release: Option<Option<std::time::Instant>> = Some(None);
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
        // In a fleet run, the process is shared by many agents: what it gives back is the
        // fleet's business, not each agent's.
        if let (Next::Idle, None) = (&next, &shared.observer) {
            // The round's samples are stored: what it allocated goes back to the system.
            super::memory::trim();
            if let Some(due) = code_release
                && shared.stats.delivered_samples() > 0
                && due.is_none_or(|at| std::time::Instant::now() >= at)
            {
                // What runs from now on is mapped again as it runs.
                super::memory::release_start_up_code();
                code_release = due
                    .is_none()
                    .then(|| Some(std::time::Instant::now() + Duration::from_secs(60)));
            }
        }
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
        // From here until they are completed or released, the spool does not drop these
        // batches. Usually one; after an outage, or when the server falls behind, the backlog
        // goes several batches to a transaction.
        let entries = match shared.spool.oldest_batches(MAX_DELIVERY_SAMPLES).await {
            Ok(e) if e.is_empty() => return Next::Idle,
            Ok(e) => e,
            Err(e) => {
                tracing::error!("cannot read the spool: {e}");
                return Next::RetryIn(backoff.next_delay());
            }
        };
        // Each batch by its sequence number and its number of samples, in delivery order.
        let mut batches: Vec<(u64, usize)> = Vec::with_capacity(entries.len());
        let mut samples: Vec<Sample> = Vec::new();
        for e in entries {
            batches.push((e.seq, e.samples.len()));
            if samples.is_empty() {
                samples = e.samples;
            } else {
                samples.extend(e.samples);
            }
        }
        let config = shared.config();
        let key = config.agent_secret.as_ref();
        match store(&mut session, config.agent_id, key, &samples).await {
            Ok(refusals) => {
                drop(session);
                crate::testhooks::pause_async("after-commit").await;
                outage.ended();
                backoff.reset();
                shared.stats.set_delivery_problem(None);
                // Refusals by position in the delivery; each goes back to its own batch.
                let mut refused_at: Vec<Option<Rejection>> =
                    (0..samples.len()).map(|_| None).collect();
                for r in refusals {
                    if let Some(slot) = refused_at.get_mut(r.index) {
                        *slot = Some(r);
                    }
                }
                let mut done = Vec::with_capacity(batches.len());
                let mut stored = Vec::new();
                let (n, mut r) = (samples.len(), 0);
                let mut all = samples.into_iter().zip(refused_at);
                for &(seq, count) in &batches {
                    let mut refused = Vec::new();
                    for (sample, refusal) in all.by_ref().take(count) {
                        let Some(refusal) = refusal else {
                            if shared.observer.is_some() {
                                stored.push(sample);
                            }
                            continue;
                        };
                        tracing::error!(
                            "the PEM server refused a {} sample collected at {} as data: {}; it is kept in the spool (pemworker spool status, then spool replay once the cause is fixed)",
                            sample.probe,
                            sample.collected_at.to_rfc3339(),
                            refusal.message
                        );
                        refused.push(RejectedSample {
                            sample,
                            sqlstate: refusal.sqlstate,
                            message: refusal.message,
                            rejected_at: chrono::Utc::now(),
                            attempts: 1,
                        });
                    }
                    r += refused.len();
                    done.push((seq, refused));
                }
                if let Some(o) = &shared.observer {
                    o.stored(&stored);
                }
                tracing::debug!(
                    "delivered spool batches {:?} ({} samples)",
                    batches.iter().map(|(seq, _)| seq).collect::<Vec<_>>(),
                    n - r
                );
                if let Err(e) = shared.spool.complete_all(done).await {
                    // The batches stay: delivered again, they are stored once (delivery keys).
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
                if e.is_write_refused() && shared.reread_secret() {
                    tracing::debug!("delivery refused: {e}; trying the new secret");
                    continue;
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
    fn a_batch_names_each_sample_and_its_columns() {
        let load = Sample::new(
            "load_average",
            None,
            None,
            vec![vec![Value::Float(0.5), Value::Int(1), Value::Null]],
        );
        let pools = Sample::new(
            "pgbouncer_pools",
            None,
            Some("127.0.0.1:6432".into()),
            vec![vec![Value::Text("pem".into()), Value::Text("u".into())]],
        );
        let unknown = Sample::new("from_the_future", None, None, vec![]);
        let samples = [load.clone(), unknown, pools];
        let (text, sent, refused) = batch_json(&samples);
        assert_eq!(sent, [0, 2], "the unknown probe is left out");
        assert_eq!(refused.len(), 1, "and refused, not skipped silently");
        assert_eq!(refused[0].index, 1);
        assert_eq!(refused[0].sqlstate, None);
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j[0]["probe"], "load_average");
        assert!(j[0]["server_id"].is_null());
        assert_eq!(j[0]["rows"][0]["one"], 0.5);
        assert_eq!(j[0]["rows"][0]["five"], 1);
        assert!(j[0]["rows"][0]["fifteen"].is_null());
        assert_eq!(j[0]["rows"][0]["delivery_key"], load.rows[0].0.to_string());
        assert_eq!(
            j[0]["collected_at"].as_str().unwrap(),
            load.collected_at.to_rfc3339()
        );
        assert_eq!(j[1]["probe"], "pgbouncer_pools");
        assert_eq!(j[1]["pgbouncer"], "127.0.0.1:6432");
        assert_eq!(j[1]["rows"][0]["user_name"], "u");
        let odd = Sample::new(
            "load_average",
            None,
            None,
            vec![vec![
                Value::Float(f64::NAN),
                Value::Text("x\"y".into()),
                Value::Bool(true),
            ]],
        );
        let (text, _, _) = batch_json(&[odd]);
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(j[0]["rows"][0]["one"].is_null());
        assert_eq!(j[0]["rows"][0]["five"], "x\"y");
        assert_eq!(j[0]["rows"][0]["fifteen"], true);
    }
}
