//! What the worker has done since it started, written to `<state_dir>/stats.json` for operators
//! (and the sandbox's status view) to read: after a delivery round when something changed, and
//! at exit. Never between batches, so an idle agent does not touch the disk; not synced,
//! because it is rebuilt from scratch at every start anyway. A write that fails (a full or
//! read-only disk) is reported to the state directory's [`Health`], which logs it once per
//! episode, and tried again after the next delivery.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::spool::Health;

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
    /// Of the spooled samples, those held in memory because the spool cannot be written.
    #[serde(default)]
    pub held_samples: u64,
    pub dropped_samples: u64,
    /// Samples dropped (past spool_limit, or not kept while the spool could not be written), by
    /// probe: what is missing on the PEM server.
    #[serde(default)]
    pub dropped: BTreeMap<String, ProbeCount>,
    /// Samples the PEM server refused as data, kept in the spool (`pemworker spool status`).
    #[serde(default)]
    pub refused_samples: u64,
    /// Why delivery is held back right now (a refusal by the PEM server and how to fix it).
    #[serde(default)]
    pub delivery_problem: Option<String>,
    /// Monitored servers and pgBouncers that cannot be probed right now, and why.
    #[serde(default)]
    pub targets_down: BTreeMap<String, String>,
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
    held: AtomicU64,
    dropped: AtomicU64,
    dropped_by_probe: Mutex<BTreeMap<String, ProbeCount>>,
    refused: AtomicU64,
    delivery_problem: Mutex<Option<String>>,
    targets_down: Mutex<BTreeMap<String, String>>,
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
        self.held.store(f.held, Ordering::Relaxed);
        if self.dropped.swap(f.dropped, Ordering::Relaxed) != f.dropped {
            f.dropped_by_probe
                .clone_into(&mut self.dropped_by_probe.lock().expect("stats lock"));
        }
        self.refused.store(f.refused, Ordering::Relaxed);
    }

    /// Records that a monitored server or pgBouncer cannot be probed (`Some(why)`), or can again.
    pub fn set_target_down(&self, target: &str, why: Option<String>) {
        let mut m = self.targets_down.lock().expect("stats lock");
        match why {
            Some(w) => {
                m.insert(target.to_string(), w);
            }
            None => {
                m.remove(target);
            }
        }
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
            held_samples: self.held.load(Ordering::Relaxed),
            dropped_samples: self.dropped.load(Ordering::Relaxed),
            dropped: self.dropped_by_probe.lock().expect("stats lock").clone(),
            refused_samples: self.refused.load(Ordering::Relaxed),
            delivery_problem: self.delivery_problem.lock().expect("stats lock").clone(),
            targets_down: self.targets_down.lock().expect("stats lock").clone(),
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
    /// thread; a failure goes to `health` (logged once per episode) and the file is written
    /// again next time, never fatal.
    pub async fn write_if_changed(&self, path: &Path, health: &Health) {
        let Some(data) = self.changed() else { return };
        let path = path.to_path_buf();
        let written = tokio::task::spawn_blocking(move || {
            let r = write(&path, &data);
            (path, r)
        })
        .await;
        if let Ok((path, Err(e))) = written {
            self.written.lock().expect("stats lock").clear();
            let dir = path.parent().unwrap_or(Path::new("."));
            health.failed(dir, "stats.json", &e);
        }
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

/// Writes `data` under a temporary name and swaps it into place: readers see the old or the
/// new file, never a partial one.
///
/// The two files trade places (`RENAME_EXCHANGE`) rather than the new one replacing the old:
/// the old one is then written over the next time. A rename over the old file frees its inode
/// and blocks every round, and a new file allocates them again, which on a file system mounted
/// with `discard` also trims the device synchronously: several percent of the worker's CPU.
/// Where the file system cannot exchange, a plain rename does.
fn write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(data)?;
        f.set_len(data.len() as u64)?;
        drop(f);
        let exchanged = nix::fcntl::renameat2(
            None,
            &tmp,
            None,
            path,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        );
        match exchanged {
            Ok(()) => Ok(()),
            // No file to exchange with yet, or a file system that cannot exchange.
            Err(_) => std::fs::rename(&tmp, path),
        }
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}
