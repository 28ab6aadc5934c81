//! Benchmark, not a test: what the server-side write path costs.
//!
//! - `pem.store_samples` for one minute's batch of an agent at the default schedule with one
//!   monitored server and one pgBouncer (15 samples), measured inside the server
//!   (pg_stat_user_functions), in one session whose plans are warm;
//! - heartbeat and delivery transactions through pgBouncer as the worker sends them, with
//!   `server_reset_query_always` 0 and 1 (DISCARD ALL, which also drops the session's cached
//!   plans, and a reset without DISCARD PLANS), to price resetting sessions between agents.
//!
//!     cargo test --release --test bench_server -- --ignored --nocapture

mod common;

use std::time::{Duration, Instant};

use common::{TestBed, agent_config};
use pemworker::connection::pool;
use pemworker::mac::{self, AgentKey, Kind};
use pemworker::probes::{PROBES, Sample, Target, Value};
use tokio_postgres::Client;
use tokio_postgres::types::Type;

/// One sample per probe, with plausible row counts (disks, interfaces, databases, sessions).
fn minute_batch() -> String {
    let samples: Vec<serde_json::Value> = PROBES
        .iter()
        .map(|p| {
            let rows = match p.name {
                "disk_space" | "network_statistics" | "database_size" | "xid_age" => 4,
                "session_info" => 6,
                "blocked_sessions" | "streaming_replication" => 0,
                _ => 1,
            };
            let rows: Vec<Vec<Value>> = (0..rows)
                .map(|i| {
                    p.columns
                        .iter()
                        .map(|(c, ty)| match *ty {
                            "text" => Value::Text(format!("{c}{i}")),
                            "double precision" => Value::Float(1.5),
                            "bigint" | "integer" => Value::Int(42),
                            "boolean" => Value::Bool(false),
                            "timestamptz" => Value::Text("2025-01-01T00:00:00Z".into()),
                            "inet" => Value::Text(format!("10.0.0.{i}")),
                            "pg_lsn" => Value::Text("0/16B3748".into()),
                            _ => Value::Null,
                        })
                        .collect()
                })
                .collect();
            let (server, bouncer) = match p.target() {
                Target::Agent => (None, None),
                Target::Server => (None, None),
                Target::Pgbouncer => (None, Some("127.0.0.1:6432".to_string())),
            };
            let s = Sample::new(p.name, server, bouncer, rows);
            serde_json::json!({
                "probe": s.probe,
                "server_id": s.server_id,
                "pgbouncer": s.pgbouncer,
                "collected_at": s.collected_at.to_rfc3339(),
                "rows": s.rows.iter().map(|(k, r)| {
                    let mut m = serde_json::Map::new();
                    m.insert("delivery_key".into(), k.to_string().into());
                    for ((c, _), v) in p.columns.iter().zip(r) {
                        m.insert((*c).into(), serde_json::to_value(v).unwrap());
                    }
                    serde_json::Value::Object(m)
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::Value::Array(samples).to_string()
}

/// A fresh batch (new delivery keys) each time, as the agent sends them.
fn fresh(batch: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(batch).unwrap();
    for s in v.as_array_mut().unwrap() {
        for r in s["rows"].as_array_mut().unwrap() {
            r["delivery_key"] = uuid::Uuid::new_v4().to_string().into();
        }
    }
    v.to_string()
}

async fn store(client: &Client, id: i32, key: &AgentKey, batch: &str) {
    let sent_at = mac::now();
    let signature = key.sign(Kind::Samples, id, &sent_at, batch);
    let params: [pool::Param<'_>; 4] = [
        (&id, Type::INT4),
        (&sent_at, Type::TEXT),
        (&batch, Type::TEXT),
        (&signature, Type::TEXT),
    ];
    let q = pool::query(
        client,
        "store",
        "SELECT * FROM pem.store_samples($1, $2, $3, $4)",
        &params,
    );
    let rejected = pool::transaction(client, "a delivery", q).await.unwrap();
    assert!(rejected.is_empty(), "{} samples rejected", rejected.len());
}

async fn heartbeat(client: &Client, id: i32, key: &AgentKey) {
    let version = "bench";
    let sent_at = mac::now();
    let signature = key.sign(Kind::Heartbeat, id, &sent_at, version);
    let params: [pool::Param<'_>; 4] = [
        (&id, Type::INT4),
        (&version, Type::TEXT),
        (&sent_at, Type::TEXT),
        (&signature, Type::TEXT),
    ];
    let q = pool::query(
        client,
        "beat",
        "SELECT * FROM pem.record_heartbeat($1, $2, $3, $4)",
        &params,
    );
    pool::transaction(client, "a heartbeat", q).await.unwrap();
}

fn summary(mut t: Vec<Duration>) -> String {
    t.sort();
    let at = |p: f64| t[((t.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
    format!("median {:.2} ms, p99 {:.2} ms", at(0.5), at(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn server_write_path() {
    let bed = TestBed::start();
    let (cfg, id) = bed.register_agent("bench");
    let key = agent_config(&cfg).agent_secret.unwrap();
    let batch = minute_batch();
    let rows: usize = serde_json::from_str::<serde_json::Value>(&batch)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rows"].as_array().unwrap().len())
        .sum();

    // Inside the server: one session, warm plans, as a pooled server connection has them.
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(&su, "track", "SET track_functions = 'pl'")
        .await
        .unwrap();
    for _ in 0..20 {
        store(&su, id, &key, &fresh(&batch)).await;
    }
    pool::batch(
        &su,
        "flush",
        "SELECT pg_stat_force_next_flush(); SELECT pg_stat_reset()",
    )
    .await
    .unwrap();
    let n = 300;
    for _ in 0..n {
        store(&su, id, &key, &fresh(&batch)).await;
    }
    pool::batch(&su, "flush", "SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let row = pool::query_one(
        &su,
        "stats",
        "SELECT sum(calls)::bigint, (sum(total_time) FILTER (WHERE funcname = 'store_samples'))::float8, \
                (sum(total_time) FILTER (WHERE funcname = 'authenticate_agent'))::float8 \
           FROM pg_stat_user_functions WHERE schemaname = 'pem' AND funcname IN ('store_samples', 'authenticate_agent')",
        &[],
    )
    .await
    .unwrap();
    let total: f64 = pool::get(&row, 1, "stats").unwrap();
    let mac_time: f64 = pool::get(&row, 2, "stats").unwrap();
    println!(
        "pem.store_samples, one minute's batch ({} samples, {rows} rows), warm session, {n} calls: \
         {:.3} ms per batch inside the server (of which {:.3} ms checking the MAC)",
        PROBES.len(),
        total / n as f64,
        mac_time / n as f64
    );

    // Through pgBouncer, as the worker sends them, with each session reset policy.
    for (always, reset) in [
        ("0", "DISCARD ALL"),
        ("1", "DISCARD ALL"),
        ("1", pemworker::pooler::bouncer::RESET_QUERY),
    ] {
        bed.console(&format!("SET server_reset_query_always = {always}"))
            .await;
        bed.console(&format!(
            "SET server_reset_query = '{}'",
            reset.replace('\'', "''")
        ))
        .await;
        bed.console("RECONNECT pem").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let agent = bed.agent_session(&cfg).await;
        for _ in 0..20 {
            heartbeat(&agent, id, &key).await;
            store(&agent, id, &key, &fresh(&batch)).await;
        }
        let mut beats = Vec::new();
        for _ in 0..500 {
            let t = Instant::now();
            heartbeat(&agent, id, &key).await;
            beats.push(t.elapsed());
        }
        let mut stores = Vec::new();
        for _ in 0..200 {
            let b = fresh(&batch);
            let t = Instant::now();
            store(&agent, id, &key, &b).await;
            stores.push(t.elapsed());
        }
        let label = if reset == "DISCARD ALL" {
            "DISCARD ALL"
        } else {
            "configure's reset: DISCARD ALL without DISCARD PLANS"
        };
        println!(
            "through pgBouncer, server_reset_query_always = {always} ({label}): heartbeat transaction {}; delivery of one minute's batch {}",
            summary(beats),
            summary(stores)
        );
    }
}
