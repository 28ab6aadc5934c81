//! What a fleet run measures in its own process: every agent's heartbeats, collected and
//! stored samples (through the worker's [`Observer`] hooks) and every warning or error any
//! agent logs (through a tracing layer), gathered per second for the report.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

use crate::probes::{ProbeSpec, Row, Sample, Value};
use crate::worker::observe::Observer;

/// What happened since the last [`Meters::take_window`].
#[derive(Debug, Default)]
pub struct Window {
    /// Heartbeat round trips, microseconds.
    pub heartbeats_us: Vec<u64>,
    pub heartbeats_failed: u64,
    /// Collected to stored (committed), milliseconds, one per stored sample.
    pub delivery_ms: Vec<u64>,
    pub stored_samples: u64,
    pub collected_samples: u64,
}

/// Totals over the whole run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub collected_samples: u64,
    pub collected_rows: u64,
    pub stored_samples: u64,
    pub stored_rows: u64,
    pub heartbeats: u64,
    pub heartbeats_failed: u64,
}

#[derive(Default)]
pub struct Meters {
    /// Per agent: whether its last heartbeat was recorded.
    connected: Vec<AtomicBool>,
    window: Mutex<Window>,
    collected_samples: AtomicU64,
    collected_rows: AtomicU64,
    stored_samples: AtomicU64,
    stored_rows: AtomicU64,
    heartbeats: AtomicU64,
    heartbeats_failed: AtomicU64,
    /// Warnings and errors the agents logged, by kind (the message with its numbers and
    /// names taken out).
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Meters {
    pub fn new(agents: usize) -> Meters {
        Meters {
            connected: (0..agents).map(|_| AtomicBool::new(false)).collect(),
            ..Default::default()
        }
    }

    /// The observer for agent number `slot`.
    pub fn agent(self: &std::sync::Arc<Self>, slot: usize) -> AgentMeter {
        AgentMeter {
            slot,
            meters: self.clone(),
        }
    }

    pub fn connected(&self) -> usize {
        self.connected
            .iter()
            .filter(|c| c.load(Ordering::Relaxed))
            .count()
    }

    /// An agent that stopped is no longer connected.
    pub fn disconnected(&self, slot: usize) {
        if let Some(c) = self.connected.get(slot) {
            c.store(false, Ordering::Relaxed);
        }
    }

    pub fn take_window(&self) -> Window {
        std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn totals(&self) -> Totals {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            collected_samples: l(&self.collected_samples),
            collected_rows: l(&self.collected_rows),
            stored_samples: l(&self.stored_samples),
            stored_rows: l(&self.stored_rows),
            heartbeats: l(&self.heartbeats),
            heartbeats_failed: l(&self.heartbeats_failed),
        }
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn error_count(&self) -> u64 {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }

    fn error(&self, kind: String) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }
}

/// One agent's view of the meters: the worker's [`Observer`].
pub struct AgentMeter {
    slot: usize,
    meters: std::sync::Arc<Meters>,
}

impl Observer for AgentMeter {
    fn rows(&self, spec: &ProbeSpec) -> Vec<Row> {
        synthetic_rows(spec)
    }

    fn collected(&self, samples: &[Sample]) {
        let rows: usize = samples.iter().map(|s| s.rows.len()).sum();
        let m = &self.meters;
        m.collected_samples
            .fetch_add(samples.len() as u64, Ordering::Relaxed);
        m.collected_rows.fetch_add(rows as u64, Ordering::Relaxed);
        m.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .collected_samples += samples.len() as u64;
    }

    fn heartbeat(&self, round_trip: Duration, ok: bool) {
        let m = &self.meters;
        if let Some(c) = m.connected.get(self.slot) {
            c.store(ok, Ordering::Relaxed);
        }
        let mut w = m.window.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            m.heartbeats.fetch_add(1, Ordering::Relaxed);
            w.heartbeats_us.push(round_trip.as_micros() as u64);
        } else {
            m.heartbeats_failed.fetch_add(1, Ordering::Relaxed);
            w.heartbeats_failed += 1;
        }
    }

    fn stored(&self, samples: &[Sample]) {
        let now = chrono::Utc::now();
        let rows: usize = samples.iter().map(|s| s.rows.len()).sum();
        let m = &self.meters;
        m.stored_samples
            .fetch_add(samples.len() as u64, Ordering::Relaxed);
        m.stored_rows.fetch_add(rows as u64, Ordering::Relaxed);
        let mut w = m.window.lock().unwrap_or_else(|p| p.into_inner());
        w.stored_samples += samples.len() as u64;
        w.delivery_ms.extend(
            samples
                .iter()
                .map(|s| (now - s.collected_at).num_milliseconds().max(0) as u64),
        );
    }
}

/// How many rows a probe has on a typical host: a few mount points and interfaces, one row
/// for the others. The row shapes are the probe's own columns.
fn row_count(spec: &ProbeSpec) -> usize {
    match spec.name {
        "disk_space" => 4,
        "network_statistics" => 3,
        _ if spec.key.is_empty() => 1,
        _ => 2,
    }
}

/// Plausible values of the probe's column types; key columns differ from row to row, so the
/// server stores every row.
pub fn synthetic_rows(spec: &ProbeSpec) -> Vec<Row> {
    let n = row_count(spec);
    (0..n)
        .map(|i| {
            spec.columns
                .iter()
                .map(|(name, ty)| match *ty {
                    "double precision" => Value::Float(fastrand::f64() * 100.0),
                    "bigint" => Value::Int(fastrand::i64(0..1 << 40)),
                    "integer" => Value::Int(fastrand::i64(0..1 << 16)),
                    "boolean" => Value::Bool(false),
                    "text" if spec.key.contains(name) => Value::Text(format!("{name}{i}")),
                    "text" => Value::Text(format!("{name} of a fleet agent")),
                    _ => Value::Null,
                })
                .collect()
        })
        .collect()
}

/// Counts every warning and error logged in the process, by kind.
pub struct Counting(pub std::sync::Arc<Meters>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counting {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        self.0.error(format!("{level}: {}", kind_of(&m.0)));
    }
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

/// A message's kind: its numbers taken out, cut at its first colon (where details begin)
/// or 80 characters.
pub fn kind_of(message: &str) -> String {
    let mut out = String::new();
    let mut in_number = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    let head = out.split(": ").next().unwrap_or(&out);
    head.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::PROBES;

    #[test]
    fn synthetic_rows_have_the_probes_shapes_and_distinct_keys() {
        for spec in PROBES {
            let rows = synthetic_rows(spec);
            assert!(!rows.is_empty(), "{}", spec.name);
            for r in &rows {
                assert_eq!(r.len(), spec.columns.len(), "{}", spec.name);
            }
        }
        let disk = crate::probes::spec("disk_space").unwrap();
        let rows = synthetic_rows(disk);
        let keys: std::collections::HashSet<String> =
            rows.iter().map(|r| format!("{:?}", r[0])).collect();
        assert_eq!(keys.len(), 4);
    }

    #[test]
    fn kinds_leave_numbers_and_details_out() {
        assert_eq!(
            kind_of("heartbeat failed: connection to 127.0.0.1:6432 refused"),
            "heartbeat failed"
        );
        assert_eq!(
            kind_of("agent 17 is not registered"),
            "agent N is not registered"
        );
    }

    #[test]
    fn an_agent_meter_counts_what_it_sees() {
        let m = std::sync::Arc::new(Meters::new(2));
        let a = m.agent(1);
        let spec = crate::probes::spec("disk_space").unwrap();
        let s = Sample::new(spec.name, None, None, a.rows(spec));
        a.collected(std::slice::from_ref(&s));
        a.heartbeat(Duration::from_millis(3), true);
        a.stored(std::slice::from_ref(&s));
        assert_eq!(m.connected(), 1);
        let t = m.totals();
        assert_eq!((t.collected_samples, t.collected_rows), (1, 4));
        assert_eq!((t.stored_samples, t.stored_rows), (1, 4));
        let w = m.take_window();
        assert_eq!(w.heartbeats_us, [3000]);
        assert_eq!(w.delivery_ms.len(), 1);
        assert!(m.take_window().heartbeats_us.is_empty());
        a.heartbeat(Duration::from_millis(3), false);
        assert_eq!(m.connected(), 0);
    }
}
