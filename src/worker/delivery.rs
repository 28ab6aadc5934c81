//! Delivery: spooled batches to the PEM server, oldest first, one transaction per batch.
//!
//! A batch travels as one JSON text to `pem.store_samples(agent_id, sent_at, batch, mac)`, a
//! SECURITY DEFINER function (agents hold no table privileges), with a MAC made with the agent's
//! secret over the batch so no other agent can write it. The server stores each sample in its
//! own subtransaction: history rows keyed by their delivery key (a batch sent again after a lost
//! commit is stored once), latest values upserted, rows a sample no longer has pruned. A sample
//! it rejects as data comes back as (index, SQLSTATE, message) and is logged; anything else fails
//! the whole call. One unnamed statement with text parameters: safe behind pgBouncer in
//! transaction pooling.

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::connection::{Error, pool};
use crate::mac::{self, AgentKey, Kind};
use crate::probes::{ProbeSpec, Sample, Value};

const STORE: &str = "SELECT sample_index, sqlstate, message FROM pem.store_samples($1, $2, $3, $4)";

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

fn rows_json(spec: &ProbeSpec, s: &Sample) -> serde_json::Value {
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
    serde_json::Value::Array(rows)
}

/// The batch as `pem.store_samples` reads it, and the samples it holds (in its order). Samples
/// of probes this agent does not know (a newer agent's spool read by an older one) are left out
/// with a warning.
fn batch_json(samples: &[Sample]) -> (String, Vec<&Sample>) {
    let mut sent = Vec::new();
    let mut items = Vec::new();
    for s in samples {
        let Some(spec) = crate::probes::spec(&s.probe) else {
            tracing::warn!("skipping a spooled sample of unknown probe {}", s.probe);
            continue;
        };
        items.push(serde_json::json!({
            "probe": s.probe,
            "server_id": s.server_id,
            "pgbouncer": s.pgbouncer,
            "collected_at": s.collected_at.to_rfc3339(),
            "rows": rows_json(spec, s),
        }));
        sent.push(s);
    }
    (serde_json::Value::Array(items).to_string(), sent)
}

/// Stores one batch in one transaction, authenticated with `key`.
pub async fn deliver(
    client: &Client,
    agent_id: i32,
    key: Option<&AgentKey>,
    samples: &[Sample],
) -> Result<(), Error> {
    let (batch, sent) = batch_json(samples);
    if sent.is_empty() {
        return Ok(());
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
    let store = pool::query(client, &what, STORE, &params);
    let rejected = pool::transaction(client, "a delivery", store).await?;
    for row in &rejected {
        let index: i32 = pool::get(row, 0, &what)?;
        let state: String = pool::get(row, 1, &what)?;
        let message: String = pool::get(row, 2, &what)?;
        let sample = usize::try_from(index).ok().and_then(|i| sent.get(i));
        tracing::warn!(
            "the PEM server rejected a {} sample collected at {}: {message} (SQLSTATE {state}); it is not stored",
            sample.map_or("?", |s| s.probe.as_str()),
            sample.map_or_else(|| "?".to_string(), |s| s.collected_at.to_rfc3339()),
        );
    }
    Ok(())
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
        let (text, sent) = batch_json(&samples);
        assert_eq!(sent.len(), 2, "the unknown probe is left out");
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
    }
}
