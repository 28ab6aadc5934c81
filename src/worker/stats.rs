//! What the worker has done since it started, written to `<state_dir>/stats.json` after every
//! delivery round and at exit, for operators (and the sandbox's status view) to read.

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

    pub fn set_spool(&self, pending: u64, dropped: u64) {
        self.spooled.store(pending, Ordering::Relaxed);
        self.dropped.store(dropped, Ordering::Relaxed);
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
        }
    }

    /// Replaces the stats file atomically; a failure is logged, never fatal.
    pub fn write(&self, path: &Path) {
        let data = match serde_json::to_vec_pretty(&self.snapshot()) {
            Ok(d) => d,
            Err(e) => return tracing::warn!("cannot encode stats: {e}"),
        };
        if let Err(e) =
            crate::fsutil::Staged::write(path, &data, 0o644, None).and_then(|s| s.commit())
        {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }

    pub fn summary(&self) -> String {
        let s = self.snapshot();
        let collected: u64 = s.collected.values().map(|c| c.samples).sum();
        format!(
            "{collected} samples collected, {} delivered, {} in the spool, {} dropped; {} heartbeats ({} failed)",
            s.delivered_samples,
            s.spooled_samples,
            s.dropped_samples,
            s.heartbeats,
            s.heartbeat_failures
        )
    }
}
