//! What the worker has done since it started, written to `<state_dir>/stats.json` for operators
//! (and the sandbox's status view) to read: after a delivery round when something changed, and
//! at exit. Never between batches, so an idle agent does not touch the disk; not synced,
//! because it is rebuilt from scratch at every start anyway.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Counters by probe.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeCount {
    pub samples: u64,
    pub rows: u64,
}

/// The file's content.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub collected: BTreeMap<String, ProbeCount>,
    pub delivered_samples: u64,
    pub heartbeats: u64,
    pub heartbeat_failures: u64,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub connected: bool,
    pub spooled_samples: u64,
    pub dropped_samples: u64,
    /// Samples the PEM server refused as data, kept in the spool (`pemworker spool status`).
    #[serde(default)]
    pub refused_samples: u64,
    /// Why delivery is held back right now (a refusal by the PEM server and how to fix it).
    #[serde(default)]
    pub delivery_problem: Option<String>,
}

#[derive(Debug, Default)]
pub struct Stats {
    collected: Mutex<BTreeMap<String, ProbeCount>>,
    delivered: AtomicU64,
    heartbeats: AtomicU64,
    heartbeat_failures: AtomicU64,
    last_heartbeat: Mutex<Option<DateTime<Utc>>>,
    connected: AtomicBool,
    spooled: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    delivery_problem: Mutex<Option<String>>,
    /// What was written last, so an unchanged snapshot is not written again.
    written: Mutex<Vec<u8>>,
}

impl Stats {
    pub fn collected(&self, probe: &str, rows: usize) {
        let mut m = self.collected.lock().expect("stats lock");
        let c = m.entry(probe.to_string()).or_default();
        c.samples += 1;
        c.rows += rows as u64;
    }

    pub fn delivered(&self, samples: usize) {
        self.delivered.fetch_add(samples as u64, Ordering::Relaxed);
    }

    /// Samples delivered since start.
    pub fn delivered_samples(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn heartbeat(&self, ok: bool) {
        if ok {
            self.heartbeats.fetch_add(1, Ordering::Relaxed);
            *self.last_heartbeat.lock().expect("stats lock") = Some(Utc::now());
        } else {
            self.heartbeat_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    pub fn set_spool(&self, f: &crate::spool::SpoolFigures) {
        self.spooled.store(f.samples, Ordering::Relaxed);
        self.dropped.store(f.dropped, Ordering::Relaxed);
        self.refused.store(f.refused, Ordering::Relaxed);
    }

    pub fn set_delivery_problem(&self, problem: Option<String>) {
        *self.delivery_problem.lock().expect("stats lock") = problem;
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            collected: self.collected.lock().expect("stats lock").clone(),
            delivered_samples: self.delivered.load(Ordering::Relaxed),
            heartbeats: self.heartbeats.load(Ordering::Relaxed),
            heartbeat_failures: self.heartbeat_failures.load(Ordering::Relaxed),
            last_heartbeat: *self.last_heartbeat.lock().expect("stats lock"),
            connected: self.connected.load(Ordering::Relaxed),
            spooled_samples: self.spooled.load(Ordering::Relaxed),
            dropped_samples: self.dropped.load(Ordering::Relaxed),
            refused_samples: self.refused.load(Ordering::Relaxed),
            delivery_problem: self.delivery_problem.lock().expect("stats lock").clone(),
        }
    }

    /// The snapshot's bytes if they differ from what was written last.
    fn changed(&self) -> Option<Vec<u8>> {
        let data = match serde_json::to_vec_pretty(&self.snapshot()) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("cannot encode stats: {e}");
                return None;
            }
        };
        let mut written = self.written.lock().expect("stats lock");
        if *written == data {
            return None;
        }
        written.clone_from(&data);
        Some(data)
    }

    /// Replaces the stats file if the figures changed since the last write, on a blocking
    /// thread; a failure is logged, never fatal.
    pub async fn write_if_changed(&self, path: &Path) {
        let Some(data) = self.changed() else { return };
        let path = path.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || write(&path, &data)).await;
    }

    pub fn summary(&self) -> String {
        let s = self.snapshot();
        let collected: u64 = s.collected.values().map(|c| c.samples).sum();
        format!(
            "{collected} samples collected, {} delivered, {} in the spool, {} refused, {} dropped; {} heartbeats ({} failed)",
            s.delivered_samples,
            s.spooled_samples,
            s.refused_samples,
            s.dropped_samples,
            s.heartbeats,
            s.heartbeat_failures
        )
    }
}

/// Writes `data` under a temporary name and renames it into place: readers see the old or the
/// new file, never a partial one.
fn write(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("json.tmp");
    let r = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!("cannot write {}: {e}", path.display());
    }
}
