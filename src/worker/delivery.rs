//! Delivery: spooled batches to the PEM server, oldest first, one transaction per batch.
//!
//! Each sample becomes two statements on its probe's tables: history rows inserted with
//! `ON CONFLICT (delivery_key) DO NOTHING` (so a batch delivered twice, after a commit whose
//! answer was lost, is stored once) together with an upsert of the latest values; then latest
//! rows this sample no longer has (a vanished mount point) are deleted. Rows travel as one
//! JSON parameter expanded by `jsonb_to_recordset`, so every statement is a single unnamed
//! statement with text parameters: safe behind pgBouncer in transaction pooling.

use std::collections::HashMap;
use std::sync::LazyLock;

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::connection::{Error, pool};
use crate::probes::{PROBES, ProbeSpec, Sample, Target, Value};

/// The statements of one probe.
#[derive(Debug)]
pub struct Statements {
    pub store: String,
    pub prune: String,
}

fn build(p: &ProbeSpec) -> Statements {
    let t = p.name;
    let (ctx_cols, ctx_vals, ctx_match): (&[&str], &[&str], &str) = match p.target {
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

/// Stores one batch in one transaction. Samples of unknown probes are skipped with a warning
/// (a newer agent's spool read by an older one).
pub async fn deliver(client: &Client, agent_id: i32, samples: &[Sample]) -> Result<(), Error> {
    let work = async {
        for s in samples {
            let (Some(spec), Some(st)) = (
                crate::probes::spec(&s.probe),
                STATEMENTS.get(s.probe.as_str()),
            ) else {
                tracing::warn!("skipping a spooled sample of unknown probe {}", s.probe);
                continue;
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
            pool::execute(client, &what, &st.store, &params).await?;
            pool::execute(client, &what, &st.prune, &params).await?;
        }
        Ok(())
    };
    pool::transaction(client, "a delivery", work).await
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
