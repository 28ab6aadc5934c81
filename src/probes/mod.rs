//! Probes: what the agent measures, and the shape of what it stores.
//!
//! Every probe is declared once, in [`PROBES`]: its internal name (as in `pem.probe`, and the
//! name of its tables `pemdata.<name>` / `pemhistory.<name>`), how it is collected (which also
//! says what it runs against), and its typed columns and key. Everything else (scheduling,
//! dispatch, the delivery statements) is derived from that table. Collectors return rows of
//! [`Value`]s in column order:
//!
//! - [`os`]: agent-level probes read from the local operating system;
//! - [`postgres`]: server-level probes, SQL on a monitored PostgreSQL server;
//! - [`pgbouncer`]: SHOW POOLS / SHOW STATS on a pgBouncer admin console.

pub mod os;
pub mod pgbouncer;
pub mod postgres;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One column value. Server-side, values are cast to the column's type, so a collector may hand
/// numbers from SQL probes over as text exactly as the server printed them.
///
/// Stored as the plain JSON value (null, true, 12, 0.5, "text"). Read back by a visitor that
/// takes whatever the JSON holds: serde's `untagged` would buffer every value and try each
/// variant in turn, which made reading the spool allocate several times per value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Value;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("null, a boolean, a number or a string")
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v))
            }
            // Beyond i64 only a float can hold it, as with the untagged reading before.
            fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
                Ok(i64::try_from(v).map_or(Value::Float(v as f64), Value::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Text(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Value, E> {
                Ok(Value::Text(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Value {
        v.map_or(Value::Null, |s| Value::Text(s.to_string()))
    }
}

/// One row, in the order of the probe's `columns`.
pub type Row = Vec<Value>;

/// What a probe runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Agent,
    Server,
    Pgbouncer,
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        match s {
            "agent" => Some(Target::Agent),
            "server" => Some(Target::Server),
            "pgbouncer" => Some(Target::Pgbouncer),
            _ => None,
        }
    }
}

/// How a probe is collected; the kind says what it runs against.
#[derive(Clone, Copy)]
pub enum Collector {
    /// Read from the local operating system (blocking: run it on a blocking thread).
    Os(fn(&mut os::OsProbes) -> Result<Vec<Row>, Error>),
    /// A query on a monitored PostgreSQL server selecting the probe's columns in order.
    Sql(&'static str),
    /// A command on a pgBouncer admin console.
    Console(&'static str),
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Collector::Os(_) => f.write_str("Os"),
            Collector::Sql(_) => f.write_str("Sql"),
            Collector::Console(c) => write!(f, "Console({c:?})"),
        }
    }
}

/// A probe: its name, its collector, and its storage shape. `columns` are (name, SQL type) after
/// the common columns (agent_id, server_id, pgbouncer, collected_at); `key` names the columns
/// that identify a row among one sample's rows (empty for single-row probes).
#[derive(Debug)]
pub struct ProbeSpec {
    pub name: &'static str,
    pub collector: Collector,
    pub columns: &'static [(&'static str, &'static str)],
    pub key: &'static [&'static str],
}

impl ProbeSpec {
    /// What the probe runs against, from how it is collected.
    pub const fn target(&self) -> Target {
        match self.collector {
            Collector::Os(_) => Target::Agent,
            Collector::Sql(_) => Target::Server,
            Collector::Console(_) => Target::Pgbouncer,
        }
    }

    /// The table in `pemdata` and `pemhistory`: PEM's catalogue names it after the probe.
    pub const fn table(&self) -> &'static str {
        self.name
    }
}

const F: &str = "double precision";
const B: &str = "bigint";
const I: &str = "integer";
const T: &str = "text";

/// Every probe this agent knows, matching the reference schema's catalogue.
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        name: "cpu_usage",
        collector: Collector::Os(os::OsProbes::cpu_usage),
        columns: &[
            ("user_percent", F),
            ("system_percent", F),
            ("idle_percent", F),
            ("iowait_percent", F),
            ("steal_percent", F),
        ],
        key: &[],
    },
    ProbeSpec {
        name: "memory_usage",
        collector: Collector::Os(os::OsProbes::memory_usage),
        columns: &[
            ("total_bytes", B),
            ("used_bytes", B),
            ("free_bytes", B),
            ("available_bytes", B),
            ("swap_total_bytes", B),
            ("swap_used_bytes", B),
        ],
        key: &[],
    },
    ProbeSpec {
        name: "load_average",
        collector: Collector::Os(os::OsProbes::load_average),
        columns: &[("one", F), ("five", F), ("fifteen", F)],
        key: &[],
    },
    ProbeSpec {
        name: "disk_space",
        collector: Collector::Os(os::OsProbes::disk_space),
        columns: &[
            ("mount_point", T),
            ("file_system", T),
            ("total_bytes", B),
            ("used_bytes", B),
            ("available_bytes", B),
        ],
        key: &["mount_point"],
    },
    ProbeSpec {
        name: "network_statistics",
        collector: Collector::Os(os::OsProbes::network_statistics),
        columns: &[
            ("interface_name", T),
            ("rx_bytes", B),
            ("tx_bytes", B),
            ("rx_packets", B),
            ("tx_packets", B),
            ("rx_errors", B),
            ("tx_errors", B),
        ],
        key: &["interface_name"],
    },
    ProbeSpec {
        name: "process_count",
        collector: Collector::Os(os::OsProbes::process_count),
        columns: &[("total", I), ("running", I), ("sleeping", I), ("zombie", I)],
        key: &[],
    },
    ProbeSpec {
        name: "server_info",
        collector: Collector::Sql(postgres::SERVER_INFO),
        columns: &[
            ("version", T),
            ("server_start", "timestamptz"),
            ("uptime_seconds", F),
            ("is_in_recovery", "boolean"),
            ("max_connections", I),
        ],
        key: &[],
    },
    ProbeSpec {
        name: "database_size",
        collector: Collector::Sql(postgres::DATABASE_SIZE),
        columns: &[("database_name", T), ("size_bytes", B)],
        key: &["database_name"],
    },
    ProbeSpec {
        name: "session_info",
        collector: Collector::Sql(postgres::SESSION_INFO),
        columns: &[("database_name", T), ("state", T), ("count", I)],
        key: &["database_name", "state"],
    },
    ProbeSpec {
        name: "blocked_sessions",
        collector: Collector::Sql(postgres::BLOCKED_SESSIONS),
        columns: &[
            ("blocked_pid", I),
            ("blocking_pid", I),
            ("blocked_query", T),
            ("wait_seconds", F),
        ],
        key: &["blocked_pid", "blocking_pid"],
    },
    ProbeSpec {
        name: "streaming_replication",
        collector: Collector::Sql(postgres::STREAMING_REPLICATION),
        columns: &[
            ("application_name", T),
            ("client_addr", "inet"),
            ("state", T),
            ("sent_lsn", "pg_lsn"),
            ("replay_lsn", "pg_lsn"),
            ("replay_lag_seconds", F),
        ],
        key: &["application_name", "client_addr"],
    },
    ProbeSpec {
        name: "bgwriter_statistics",
        collector: Collector::Sql(postgres::BGWRITER_STATISTICS),
        columns: &[
            ("checkpoints_timed", B),
            ("checkpoints_req", B),
            ("buffers_checkpoint", B),
            ("buffers_clean", B),
            ("buffers_backend", B),
            ("maxwritten_clean", B),
        ],
        key: &[],
    },
    ProbeSpec {
        name: "xid_age",
        collector: Collector::Sql(postgres::XID_AGE),
        columns: &[
            ("database_name", T),
            ("datfrozenxid_age", B),
            ("oldest_xact_age_seconds", F),
        ],
        key: &["database_name"],
    },
    ProbeSpec {
        name: "pgbouncer_pools",
        collector: Collector::Console("SHOW POOLS"),
        columns: &[
            ("database", T),
            ("user_name", T),
            ("cl_active", B),
            ("cl_waiting", B),
            ("sv_active", B),
            ("sv_idle", B),
            ("sv_used", B),
            ("maxwait_us", B),
            ("pool_mode", T),
        ],
        key: &["database", "user_name"],
    },
    ProbeSpec {
        name: "pgbouncer_stats",
        collector: Collector::Console("SHOW STATS"),
        columns: &[
            ("database", T),
            ("total_xact_count", B),
            ("total_query_count", B),
            ("total_received", B),
            ("total_sent", B),
            ("total_xact_time", B),
            ("total_query_time", B),
            ("total_wait_time", B),
        ],
        key: &["database"],
    },
];

pub fn spec(name: &str) -> Option<&'static ProbeSpec> {
    PROBES.iter().find(|p| p.name == name)
}

/// One execution of one probe: its rows, each with the delivery key that makes storing it
/// idempotent (the server keeps a row once however often it is delivered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub probe: String,
    pub server_id: Option<i32>,
    /// For pgBouncer probes: `host:port` of the instance.
    pub pgbouncer: Option<String>,
    pub collected_at: DateTime<Utc>,
    pub rows: Vec<(Uuid, Row)>,
}

impl Sample {
    pub fn new(
        probe: &str,
        server_id: Option<i32>,
        pgbouncer: Option<String>,
        rows: Vec<Row>,
    ) -> Sample {
        let n = rows.len();
        Sample {
            probe: probe.to_string(),
            server_id,
            pgbouncer,
            collected_at: Utc::now(),
            rows: delivery_keys(n).zip(rows).collect(),
        }
    }
}

/// `n` random (version 4) UUIDs, from one call to OpenSSL's generator: `Uuid::new_v4` asks
/// the kernel (getrandom) once per key, a system call for every row of every sample.
fn delivery_keys(n: usize) -> impl Iterator<Item = Uuid> {
    let mut bytes = vec![0u8; 16 * n];
    let random = openssl::rand::rand_bytes(&mut bytes).is_ok();
    (0..n).map(move |i| {
        if !random {
            return Uuid::new_v4();
        }
        let mut b = [0u8; 16];
        b.copy_from_slice(&bytes[16 * i..16 * (i + 1)]);
        uuid::Builder::from_random_bytes(b).into_uuid()
    })
}

/// Why a probe produced no sample this time.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("probe {probe}: {message}")]
    Failed { probe: String, message: String },
    #[error("probe {probe} against {target}: {source}")]
    Connection {
        probe: String,
        target: String,
        #[source]
        source: crate::connection::Error,
    },
    #[error("unknown probe {0}")]
    Unknown(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_gets_its_own_random_delivery_key() {
        let s = Sample::new("load_average", None, None, vec![vec![]; 50]);
        let keys: std::collections::HashSet<Uuid> = s.rows.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys.len(), 50);
        assert!(
            keys.iter()
                .all(|k| k.get_version() == Some(uuid::Version::Random))
        );
    }

    #[test]
    fn values_read_back_as_written() {
        let row: Row = vec![
            Value::Null,
            Value::Bool(true),
            Value::Int(-3),
            Value::Int(i64::MAX),
            Value::Float(0.25),
            Value::Float(1e300),
            Value::Text("a \"quoted\" 12".into()),
            Value::Text(String::new()),
        ];
        let json = serde_json::to_string(&row).unwrap();
        assert_eq!(
            json,
            r#"[null,true,-3,9223372036854775807,0.25,1e+300,"a \"quoted\" 12",""]"#
        );
        assert_eq!(serde_json::from_str::<Row>(&json).unwrap(), row);
        // Beyond i64: a float, as before.
        assert_eq!(
            serde_json::from_str::<Value>("18446744073709551615").unwrap(),
            Value::Float(u64::MAX as f64)
        );
        assert!(serde_json::from_str::<Value>("[1]").is_err());
        assert!(serde_json::from_str::<Value>("{}").is_err());
    }

    #[test]
    fn every_probe_is_in_the_reference_schema_with_its_columns() {
        let sql = include_str!("../../etc/sql/001_reference_schema.sql");
        for p in PROBES {
            let table = format!("CREATE TABLE pemdata.{} (", p.name);
            let start = sql
                .find(&table)
                .unwrap_or_else(|| panic!("no table for {}", p.name));
            let body = &sql[start..start + sql[start..].find(");").unwrap()];
            for (col, _) in p.columns {
                assert!(
                    body.lines()
                        .any(|l| l.trim_start().starts_with(&format!("{col} "))),
                    "{}.{col} missing in the schema",
                    p.name
                );
            }
            let target = match p.target() {
                Target::Agent => "'agent'",
                Target::Server => "'server'",
                Target::Pgbouncer => "'pgbouncer'",
            };
            assert!(
                sql.lines()
                    .any(|l| l.contains(&format!("('{}',", p.name)) && l.contains(target)),
                "{} not in the catalogue as {target}",
                p.name
            );
        }
    }
}
