//! pgBouncer probes: SHOW POOLS and SHOW STATS on a pgBouncer admin console.
//!
//! This module owns turning those answers into rows of the probes' columns. Columns are taken
//! by name, not position, because every pgBouncer release adds columns in the middle; a column
//! this pgBouncer does not have becomes NULL. Values stay the text pgBouncer sent: the PEM
//! server casts them to the column types. The console answers only the simple protocol.

use tokio_postgres::Client;

use super::{Collector, Error, ProbeSpec, Row, Value, spec};
use crate::connection::pool;

/// Names the console in errors; the caller knows its address, this module does not.
const TARGET: &str = "the pgbouncer console";

/// The console command of a probe, if it is a pgBouncer probe.
fn command(probe: &str) -> Option<&'static str> {
    match spec(probe)?.collector {
        Collector::Console(command) => Some(command),
        _ => None,
    }
}

/// pgBouncer's name for one of our columns; `user` is renamed in the schema because USER is
/// a reserved word.
fn source_column(column: &str) -> &str {
    match column {
        "user_name" => "user",
        other => other,
    }
}

/// For each of the probe's columns, its position in the console's answer, if present.
fn positions(probe: &ProbeSpec, names: &[&str]) -> Vec<Option<usize>> {
    probe
        .columns
        .iter()
        .map(|(col, _)| names.iter().position(|n| *n == source_column(col)))
        .collect()
}

fn to_row(positions: &[Option<usize>], values: &[Option<&str>]) -> Row {
    positions
        .iter()
        .map(|p| Value::from(p.and_then(|i| values.get(i).copied().flatten())))
        .collect()
}

/// Rows of one pgBouncer probe, in the columns of its [`ProbeSpec`].
pub async fn collect(console: &Client, probe: &str) -> Result<Vec<Row>, Error> {
    let (spec, command) = match (spec(probe), command(probe)) {
        (Some(s), Some(c)) => (s, c),
        _ => return Err(Error::Unknown(probe.to_string())),
    };
    let rows = pool::simple_rows(console, command, command)
        .await
        .map_err(|source| Error::Connection {
            probe: probe.to_string(),
            target: TARGET.to_string(),
            source,
        })?;
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    // All rows of one answer share its columns.
    let names: Vec<&str> = first.columns().iter().map(|c| c.name()).collect();
    let positions = positions(spec, &names);
    rows.iter()
        .map(|r| {
            let values = (0..r.len())
                .map(|i| pool::text(r, i, command))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Failed {
                    probe: probe.to_string(),
                    message: e.to_string(),
                })?;
            Ok(to_row(&positions, &values))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::{PROBES, Target};

    /// Column names of pgBouncer 1.18 (see the shared facts).
    const POOLS_1_18: &[&str] = &[
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ];
    const STATS_1_18: &[&str] = &[
        "database",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ];

    /// A fake answer whose value in each column is the column's name.
    fn answer(names: &[&'static str]) -> Vec<Option<&'static str>> {
        names.iter().map(|n| Some(*n)).collect()
    }

    #[test]
    fn every_pgbouncer_probe_maps_1_18_answers_to_its_columns_by_name() {
        let probes: Vec<_> = PROBES
            .iter()
            .filter(|p| p.target() == Target::Pgbouncer)
            .collect();
        assert_eq!(probes.len(), 2);
        for p in probes {
            let names = match command(p.name) {
                Some("SHOW POOLS") => POOLS_1_18,
                Some("SHOW STATS") => STATS_1_18,
                other => panic!("{}: unexpected command {other:?}", p.name),
            };
            let row = to_row(&positions(p, names), &answer(names));
            assert_eq!(row.len(), p.columns.len(), "{}", p.name);
            for ((col, _), v) in p.columns.iter().zip(&row) {
                assert_eq!(
                    v,
                    &Value::Text(source_column(col).to_string()),
                    "{}",
                    p.name
                );
            }
        }
    }

    #[test]
    fn user_becomes_user_name() {
        let p = spec("pgbouncer_pools").unwrap();
        let row = to_row(&positions(p, POOLS_1_18), &answer(POOLS_1_18));
        assert_eq!(row[1], Value::Text("user".into()));
    }

    #[test]
    fn columns_an_older_pgbouncer_lacks_are_null() {
        // 1.7-style SHOW POOLS: no sv_active_cancel, no maxwait_us; columns in another order.
        let old: &[&str] = &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "pool_mode",
        ];
        let p = spec("pgbouncer_pools").unwrap();
        let values = [
            Some("pem"),
            Some("agent1"),
            Some("1"),
            Some("0"),
            Some("2"),
            Some("3"),
            Some("4"),
            Some("0"),
            Some("0"),
            Some("0"),
            None,
        ];
        let row = to_row(&positions(p, old), &values);
        let text = |s: &str| Value::Text(s.into());
        assert_eq!(
            row,
            vec![
                text("pem"),
                text("agent1"),
                text("1"),
                text("0"),
                text("2"),
                text("3"),
                text("4"),
                Value::Null, // maxwait_us
                Value::Null, // pool_mode sent as NULL
            ]
        );
    }

    #[test]
    fn other_probes_have_no_console_command() {
        assert_eq!(command("server_info"), None);
        assert_eq!(command("cpu_usage"), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_console_answer_becomes_rows_of_the_probes_shape(
                names in proptest::collection::vec(
                    prop_oneof![
                        proptest::sample::select(POOLS_1_18.to_vec()),
                        proptest::sample::select(STATS_1_18.to_vec()),
                        "[a-z_]{0,10}".prop_map(|s| Box::leak(s.into_boxed_str()) as &str),
                    ],
                    0..20,
                ),
                rows in proptest::collection::vec(
                    proptest::collection::vec(proptest::option::of("\\PC{0,8}"), 0..25),
                    0..5,
                ),
            ) {
                for p in PROBES.iter().filter(|p| p.target() == Target::Pgbouncer) {
                    let pos = positions(p, &names);
                    for r in &rows {
                        let values: Vec<Option<&str>> = r.iter().map(Option::as_deref).collect();
                        let row = to_row(&pos, &values);
                        prop_assert_eq!(row.len(), p.columns.len());
                        // A value comes from the column of its name, or is NULL.
                        for (i, (col, _)) in p.columns.iter().enumerate() {
                            let want = names
                                .iter()
                                .position(|n| *n == source_column(col))
                                .and_then(|at| values.get(at).copied().flatten());
                            prop_assert_eq!(&row[i], &Value::from(want));
                        }
                    }
                }
            }
        }
    }
}
