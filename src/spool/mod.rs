//! The spool: every round of samples is kept here until the PEM server has committed it, so
//! samples survive outages of the server, of the pooler and of the agent itself (killed at any
//! instant, even with SIGKILL). Batches are delivered oldest first.
//!
//! Layout of a state directory (one per agent; [`lock`] makes sure only one worker uses it):
//!
//! - `spool/<seq>.json`: a batch waiting for delivery;
//! - `spool/.reuse`: the file of the last delivered batch, which the next batch is written into
//!   (never read as a batch);
//! - `spool/rejected/<seq>.json`: one sample the PEM server refused as data, with the server's
//!   SQLSTATE and message, kept until an operator replays or discards it (`pemworker spool`);
//! - `lock`: the worker's lock, holding its pid; `stats.json`: see `worker::stats`.
//!
//! **What survives what.** A batch is written under a temporary name, renamed into place and
//! synced: one write and one fsync per collection round (on journaling file systems the sync
//! of the file also makes its rename durable). A worker killed before the rename leaves a
//! temporary file, removed at the next start; after it, a complete batch. A batch is removed
//! only after the server committed it; a kill in between has it delivered again at the next
//! start, and the delivery keys make the server store it once. Samples the server refused are
//! kept before their batch is removed, and a refused sample kept already is not kept twice.
//! Removals are not synced: a removal lost in a power cut only means a batch sent again.
//!
//! **A state directory that cannot be written** (full, read-only, no permission): batches are
//! held in memory instead ([`HELD_LIMIT`] at most, the oldest dropped past it) and delivered
//! from there; [`Health`] logs the episode once, with the cause and the fix, and its end. The
//! next round that can be written writes the held batches first, in order, and spooling goes on
//! as before. Held batches are lost if the worker stops before they are delivered or written:
//! counted and logged.
//!
//! **Past `spool_limit`** (pending and refused samples together) the oldest refused samples go
//! first, then the oldest batches, never the newest one nor the one being delivered (the limit
//! waits for that delivery). Every dropped sample is counted per
//! probe (`stats.json`), and each episode is logged twice: when the first sample is dropped
//! (the cause and the fix), and when delivery works again (what was dropped, per probe).
//!
//! All of it is blocking file I/O: the worker reaches it through [`SpoolHandle`], which runs
//! every operation on a blocking thread.

pub mod command;
pub mod lock;
pub mod rejected;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub use lock::StateLock;
pub use rejected::{Rejected, RejectedSample};

use crate::fsutil;
use crate::probes::Sample;
use crate::worker::stats::ProbeCount;

/// The most the batches held in memory may take while the spool cannot be written.
pub const HELD_LIMIT: u64 = 1 << 20;

/// A cause of unwritable-state-directory episodes logged within this long of the last one is
/// not logged again: a disk that fills and frees by turns gives one line, not one per turn.
const QUIET: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Files(#[from] fsutil::Error),
    #[error("cannot encode samples: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(
        "state directory {} is in use by another worker{}; stop it, or give this agent its own state_dir in agent.cfg",
        dir.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { dir: PathBuf, pid: Option<i32> },
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool operation interrupted: {0}")]
    Interrupted(String),
    #[error(
        "{0} refused sample(s) were refused again and stay in the spool; see pemworker spool status"
    )]
    StillRefused(usize),
}

impl Error {
    pub fn exit_code(&self) -> crate::ExitCode {
        match self {
            Error::Files(e) => crate::error::files_exit_code(e),
            Error::Locked { .. } => crate::ExitCode::Config,
            Error::StillRefused(_) => crate::ExitCode::Server,
            Error::Encode(_) | Error::Lock { .. } | Error::Interrupted(_) => crate::ExitCode::Local,
        }
    }

    /// The operating system's error underneath, if a file operation failed.
    fn io(&self) -> Option<&std::io::Error> {
        match self {
            Error::Files(fsutil::Error::Io { source, .. }) | Error::Lock { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// One spooled batch.
#[derive(Debug)]
pub struct Entry {
    pub seq: u64,
    pub samples: Vec<Sample>,
}

/// A batch held in memory because the spool could not be written.
#[derive(Debug)]
struct Held {
    bytes: u64,
    samples: Vec<Sample>,
}

/// Why samples were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The spool was over spool_limit.
    Limit,
    /// They could not be written, and not held in memory either.
    Unwritable,
}

/// A spool_limit episode: from the first sample dropped for the limit to the next delivery.
#[derive(Debug)]
struct Overflow {
    since: Instant,
    by_probe: BTreeMap<String, u64>,
}

/// What the refused-sample area holds, as of the last look.
#[derive(Debug, Default)]
struct RefusedFigures {
    count: u64,
    bytes: u64,
    /// The area's modification time when it was counted: when it is unchanged, so are they.
    seen: Option<SystemTime>,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limit: u64,
    rejected: Rejected,
    /// Batches on disk: seq -> (size in bytes, number of samples).
    entries: BTreeMap<u64, (u64, usize)>,
    /// Batches held in memory (the spool could not be written), by seq.
    held: BTreeMap<u64, Held>,
    /// Delivered batches whose files could not be removed yet (a read-only file system).
    stale: BTreeSet<u64>,
    next_seq: u64,
    refused: RefusedFigures,
    /// Samples dropped since start, by probe (for the limit, or because they could not be kept).
    dropped: BTreeMap<String, ProbeCount>,
    overflow: Option<Overflow>,
    health: Health,
    /// The newest batch being delivered ([`Spool::oldest`] or [`Spool::oldest_batches`] to
    /// [`Spool::complete`] or [`Spool::release`]); it and every older batch are in flight, never
    /// dropped for the limit, which waits for their delivery instead.
    delivering: Option<u64>,
    /// A delivered batch's file is kept under [`REUSE`] to hold the next batch (see
    /// [`Spool::write_entry`]); whether that file is there.
    reusable: bool,
    /// Unit tests: every batch write fails with this errno, as on a full or read-only disk.
    #[cfg(test)]
    fail_writes: Option<i32>,
}

const SUFFIX: &str = ".json";

/// The delivered batch's file kept for the next batch to be written into (hidden, never read
/// as a batch).
pub(crate) const REUSE: &str = ".reuse";

/// A spool entry's sequence number, from its file name.
pub(crate) fn entry_seq(name: &str) -> Option<u64> {
    name.strip_suffix(SUFFIX)
        .and_then(|s| s.parse::<u64>().ok())
}

/// Removes the temporary files of writes a killed worker left half-done in `dir` (hidden names
/// ending in `.tmp`; nothing else writes them there).
pub(crate) fn remove_temporary_files(dir: &Path) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    for e in list.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") && e.path().is_file() {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::debug!("removed {}, left by an interrupted write", name),
                Err(err) => tracing::debug!("cannot remove {name}: {err}"),
            }
        }
    }
}

impl Spool {
    /// Opens (creating) the spool in `dir`, picking up entries left by an earlier run and removing
    /// the temporary files of an interrupted write. Batches an earlier version set aside whole
    /// (`<seq>.rejected`) are queued again: delivery now refuses single samples, never batches.
    pub fn open(dir: &Path, limit: u64) -> Result<Spool, Error> {
        fsutil::ensure_dir(dir, 0o700, None)?;
        let rejected = Rejected::open(&dir.join("rejected"))?;
        remove_temporary_files(dir);
        let mut entries = BTreeMap::new();
        let mut set_aside = Vec::new();
        let mut highest = 0;
        for e in std::fs::read_dir(dir).map_err(fsutil::Error::io("read directory", dir))? {
            let e = e.map_err(fsutil::Error::io("read directory", dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(seq) = name
                .strip_suffix(".rejected")
                .and_then(|s| s.parse::<u64>().ok())
            {
                set_aside.push((seq, e.path()));
                continue;
            }
            if let Some(seq) = name
                .strip_suffix(".corrupt")
                .and_then(|s| s.parse::<u64>().ok())
            {
                // Never reused, so a later corrupt entry does not replace this one.
                highest = highest.max(seq);
                continue;
            }
            let Some(seq) = entry_seq(&name) else {
                continue;
            };
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            let samples = read_entry(&e.path());
            if let Some(s) = &samples {
                // What an earlier run kept, for the tests' accounting.
                crate::testhooks::kept(seq, s);
            }
            entries.insert(seq, (size, samples.map_or(0, |s| s.len())));
        }
        highest = highest.max(entries.keys().next_back().copied().unwrap_or(0));
        let mut next_seq = highest + 1;
        set_aside.sort();
        for (_, path) in &set_aside {
            if let Some(samples) = read_entry(path) {
                let target = dir.join(format!("{next_seq:020}{SUFFIX}"));
                std::fs::rename(path, &target).map_err(fsutil::Error::io("queue again", path))?;
                let size = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
                crate::testhooks::kept(next_seq, &samples);
                entries.insert(next_seq, (size, samples.len()));
                next_seq += 1;
            }
        }
        if !set_aside.is_empty() {
            tracing::warn!(
                "spool {}: {} batches an earlier version set aside are queued for delivery again",
                dir.display(),
                set_aside.len()
            );
        }
        if !entries.is_empty() {
            tracing::info!(
                "spool {}: {} batches left from an earlier run",
                dir.display(),
                entries.len()
            );
        }
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            limit,
            rejected,
            entries,
            held: BTreeMap::new(),
            stale: BTreeSet::new(),
            next_seq,
            refused: RefusedFigures::default(),
            dropped: BTreeMap::new(),
            overflow: None,
            health: Health::default(),
            delivering: None,
            reusable: std::fs::symlink_metadata(dir.join(REUSE)).is_ok_and(|m| m.is_file()),
            #[cfg(test)]
            fail_writes: None,
        };
        spool.refresh_refused();
        Ok(spool)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}{SUFFIX}"))
    }

    /// Writes one batch: under a temporary name, renamed into place, then synced (one fsync,
    /// which on journaling file systems also makes the rename durable). A failure leaves nothing
    /// behind.
    ///
    /// The file of the last delivered batch, kept as [`REUSE`], is written over rather than a
    /// new file made: a new file and the removal of the delivered one cost the file system an
    /// inode and blocks allocated and freed every round (with `discard`, a synchronous trim of
    /// the device), about a sixth of the worker's CPU time. What is left of the old content
    /// past the new batch becomes spaces, which JSON ignores.
    fn write_entry(&mut self, seq: u64, data: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(errno) = self.fail_writes {
            return Err(std::io::Error::from_raw_os_error(errno));
        }
        let target = self.path(seq);
        let tmp = self.dir.join(format!(".{seq:020}{SUFFIX}.tmp"));
        let reused = self.reusable && std::fs::rename(self.dir.join(REUSE), &tmp).is_ok();
        self.reusable = false;
        if !reused {
            let _ = std::fs::remove_file(&tmp);
        }
        let written = (|| {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).custom_flags(nix::libc::O_NOFOLLOW);
            if !reused {
                options.create_new(true).mode(0o600);
            }
            let mut f = options.open(&tmp)?;
            f.write_all(data)?;
            if reused {
                let len = f.metadata()?.len();
                let tail = len.saturating_sub(data.len() as u64);
                // Far larger (a backlog batch was delivered last): give the blocks back.
                if tail > data.len() as u64 + 65_536 {
                    f.set_len(data.len() as u64)?;
                } else if tail > 0 {
                    f.write_all(&vec![b' '; tail as usize])?;
                }
            }
            crate::testhooks::pause("spool-written");
            std::fs::rename(&tmp, &target)?;
            f.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&target);
        }
        written
    }

    /// Keeps a batch: written to disk, or held in memory when the spool cannot be written (then
    /// the health says so, once per episode). Batches held earlier are written first, in order.
    /// Then keeps the spool within its limits.
    pub fn push(&mut self, samples: Vec<Sample>) -> Result<u64, Error> {
        let data = serde_json::to_vec(&samples)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.held.insert(
            seq,
            Held {
                bytes: data.len() as u64,
                samples,
            },
        );
        self.flush(Some((seq, data)));
        self.enforce_limit();
        Ok(seq)
    }

    /// Writes the held batches to disk, oldest first, until one cannot be written. `fresh` is
    /// the encoding of one of them, when it is at hand.
    fn flush(&mut self, mut fresh: Option<(u64, Vec<u8>)>) {
        let mut wrote = false;
        while let Some((&seq, held)) = self.held.iter().next() {
            let data = match fresh.take_if(|(s, _)| *s == seq) {
                Some((_, d)) => d,
                None => match serde_json::to_vec(&held.samples) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!("cannot encode a held batch: {e}");
                        break;
                    }
                },
            };
            match self.write_entry(seq, &data) {
                Ok(()) => {
                    let held = self.held.remove(&seq).expect("just seen");
                    crate::testhooks::pause("spool-kept");
                    crate::testhooks::kept(seq, &held.samples);
                    self.entries
                        .insert(seq, (data.len() as u64, held.samples.len()));
                    wrote = true;
                }
                Err(e) => {
                    self.health.failed(&self.dir, "a spool batch", &e);
                    break;
                }
            }
        }
        if wrote {
            self.health.succeeded(&self.dir);
            self.remove_stale();
        }
    }

    /// Removes the files of delivered batches that could not be removed before.
    fn remove_stale(&mut self) {
        let stale = std::mem::take(&mut self.stale);
        for seq in stale {
            self.remove_file(seq);
        }
    }

    /// Removes a batch's file, or keeps it for the next batch to be written into; one that
    /// cannot be removed now is removed later.
    fn remove_file(&mut self, seq: u64) {
        if !self.reusable && std::fs::rename(self.path(seq), self.dir.join(REUSE)).is_ok() {
            self.reusable = true;
            return;
        }
        match std::fs::remove_file(self.path(seq)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!("cannot remove {}: {e}", self.path(seq).display());
                self.stale.insert(seq);
            }
        }
    }

    fn held_bytes(&self) -> u64 {
        self.held.values().map(|h| h.bytes).sum()
    }

    /// Counts the refused samples again if the area changed since it was last counted (an
    /// operator's replay or discard, or our own add).
    fn refresh_refused(&mut self) {
        let seen = std::fs::metadata(self.rejected.dir())
            .and_then(|m| m.modified())
            .ok();
        if seen.is_some() && seen == self.refused.seen {
            return;
        }
        let list = self.rejected.list().unwrap_or_default();
        self.refused = RefusedFigures {
            count: list.len() as u64,
            bytes: list.iter().map(|(_, b)| b).sum(),
            seen,
        };
    }

    /// Keeps the held batches within [`HELD_LIMIT`], then everything within spool_limit: the
    /// oldest refused samples go first, then the oldest batches (never the newest one).
    fn enforce_limit(&mut self) {
        while self.held_bytes() > HELD_LIMIT && self.held.len() > 1 {
            let (_, held) = self.held.pop_first().expect("more than one");
            self.count_dropped(&held.samples, Cause::Unwritable);
        }
        self.refresh_refused();
        while self.bytes() + self.held_bytes() + self.refused.bytes > self.limit {
            if self.refused.count > 0 {
                if !self.drop_oldest_refused() {
                    break;
                }
            } else if self.entries.len() + self.held.len() > 1 && !self.oldest_is_delivering() {
                self.drop_oldest_batch();
            } else {
                break;
            }
        }
    }

    /// Drops the oldest refused sample; false if the area cannot be changed now.
    fn drop_oldest_refused(&mut self) -> bool {
        let rejected = self.rejected.clone();
        let Ok(area) = rejected.lock() else {
            return false;
        };
        let Some((seq, _)) = area.list().ok().and_then(|l| l.first().copied()) else {
            drop(area);
            self.refused.seen = None;
            self.refresh_refused();
            return self.refused.count > 0;
        };
        let sample = area.read(seq).ok().map(|r| r.sample);
        if std::fs::remove_file(rejected.dir().join(format!("{seq:020}{SUFFIX}"))).is_err() {
            return false;
        }
        drop(area);
        self.refused.seen = None;
        self.refresh_refused();
        match sample {
            Some(s) => self.count_dropped(std::slice::from_ref(&s), Cause::Limit),
            None => self.count_unreadable(1),
        }
        true
    }

    fn oldest_seq(&self) -> Option<u64> {
        match (self.entries.keys().next(), self.held.keys().next()) {
            (None, None) => None,
            (Some(&d), Some(&h)) if h < d => Some(h),
            (Some(&d), _) => Some(d),
            (None, Some(&h)) => Some(h),
        }
    }

    /// The oldest batch is being delivered: it is not dropped (a delivery in flight would store
    /// a batch counted as dropped), and nothing newer is dropped before it.
    fn oldest_is_delivering(&self) -> bool {
        match (self.delivering, self.oldest_seq()) {
            (Some(newest), Some(oldest)) => oldest <= newest,
            _ => false,
        }
    }

    /// Drops the oldest batch, on disk or held.
    fn drop_oldest_batch(&mut self) {
        let Some(seq) = self.oldest_seq() else {
            return;
        };
        if let Some(held) = self.held.remove(&seq) {
            self.count_dropped(&held.samples, Cause::Limit);
        } else if let Some((_, count)) = self.entries.remove(&seq) {
            let samples = read_entry(&self.path(seq));
            self.remove_file(seq);
            match samples {
                Some(s) => self.count_dropped(&s, Cause::Limit),
                None => self.count_unreadable(count as u64),
            }
        }
    }

    fn count_unreadable(&mut self, samples: u64) {
        let c = self.dropped.entry("(unreadable)".into()).or_default();
        c.samples += samples;
    }

    /// Counts dropped samples per probe, and logs the start of their episode.
    fn count_dropped(&mut self, samples: &[Sample], cause: Cause) {
        for s in samples {
            let c = self.dropped.entry(s.probe.clone()).or_default();
            c.samples += 1;
            c.rows += s.rows.len() as u64;
        }
        match cause {
            Cause::Unwritable => self.health.dropped(samples.len() as u64),
            Cause::Limit => {
                let overflow = self.overflow.get_or_insert_with(|| {
                    tracing::error!(
                        "spool {} is full: spool_limit ({} bytes) is taken by samples the PEM server has not \
                         received yet, so the oldest are dropped to make room (counted per probe in stats.json, \
                         and logged once more when delivery works again); raise spool_limit in agent.cfg to keep \
                         a longer outage",
                        self.dir.display(),
                        self.limit
                    );
                    Overflow {
                        since: Instant::now(),
                        by_probe: BTreeMap::new(),
                    }
                });
                for s in samples {
                    *overflow.by_probe.entry(s.probe.clone()).or_default() += 1;
                }
            }
        }
    }

    /// Ends a spool_limit episode (delivery works again, or the worker stops), logging what it
    /// dropped.
    fn end_overflow(&mut self) {
        if let Some(o) = self.overflow.take() {
            let total: u64 = o.by_probe.values().sum();
            let per_probe: Vec<String> =
                o.by_probe.iter().map(|(p, n)| format!("{p} {n}")).collect();
            tracing::warn!(
                "spool {}: {total} samples were dropped for spool_limit over {} s, the oldest first ({}); the \
                 rest are delivered",
                self.dir.display(),
                o.since.elapsed().as_secs(),
                per_probe.join(", ")
            );
        }
    }

    /// The oldest batch, on disk or held. An unreadable entry is moved aside (`.corrupt`) and
    /// skipped.
    pub fn oldest(&mut self) -> Option<Entry> {
        self.oldest_batches(0).pop()
    }

    /// The oldest batches, oldest first: at least one (when there is one), and more while their
    /// samples come to at most `max_samples` in all. They are in flight until
    /// [`Spool::complete`] (each) or [`Spool::release`] (all).
    pub fn oldest_batches(&mut self, max_samples: usize) -> Vec<Entry> {
        self.delivering = None;
        let mut out: Vec<Entry> = Vec::new();
        let mut samples = 0;
        let mut after: Option<u64> = None;
        loop {
            let Some(seq) = self.seq_after(after) else {
                return out;
            };
            let n = self
                .held
                .get(&seq)
                .map(|h| h.samples.len())
                .or_else(|| self.entries.get(&seq).map(|(_, n)| *n))
                .unwrap_or(0);
            if !out.is_empty() && samples + n > max_samples {
                return out;
            }
            after = Some(seq);
            if let Some(h) = self.held.get(&seq) {
                samples += n;
                self.delivering = Some(seq);
                out.push(Entry {
                    seq,
                    samples: h.samples.clone(),
                });
                continue;
            }
            let p = self.path(seq);
            match read_entry(&p) {
                Some(batch) => {
                    samples += batch.len();
                    self.delivering = Some(seq);
                    out.push(Entry {
                        seq,
                        samples: batch,
                    });
                }
                None => {
                    tracing::error!("spool entry {} is unreadable; moved aside", p.display());
                    let _ = std::fs::rename(&p, p.with_extension("corrupt"));
                    self.entries.remove(&seq);
                }
            }
        }
    }

    /// The oldest batch newer than `after` (the oldest of all for `None`), on disk or held.
    fn seq_after(&self, after: Option<u64>) -> Option<u64> {
        let Some(a) = after else {
            return self.oldest_seq();
        };
        let range = (std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded);
        match (
            self.entries.range(range).next().map(|(k, _)| *k),
            self.held.range(range).next().map(|(k, _)| *k),
        ) {
            (Some(d), Some(h)) => Some(d.min(h)),
            (d, h) => d.or(h),
        }
    }

    /// Removes a delivered batch.
    pub fn remove(&mut self, seq: u64) {
        if let Some(h) = self.held.remove(&seq) {
            self.health.delivered_from_memory(h.samples.len() as u64);
        } else if self.entries.remove(&seq).is_some() {
            self.remove_file(seq);
        }
    }

    /// The batch [`Spool::oldest`] returned was not delivered; it may be dropped again.
    pub fn release(&mut self) {
        self.delivering = None;
        self.enforce_limit();
    }

    /// Ends a delivered batch: the samples the server refused are kept first (unless kept
    /// already), then the batch goes. Refused samples that cannot be written are counted as
    /// dropped. A delivery ends a spool_limit episode.
    pub fn complete(&mut self, seq: u64, refused: Vec<RejectedSample>) {
        if !refused.is_empty() {
            let kept = self.rejected.lock().and_then(|mut a| a.add(&refused));
            match kept {
                Ok(_) => {
                    self.refused.seen = None;
                    self.refresh_refused();
                }
                Err(e) => {
                    match e.io() {
                        Some(io) => self.health.failed(&self.dir, "refused samples", io),
                        None => tracing::error!("cannot keep refused samples: {e}"),
                    }
                    let samples: Vec<Sample> = refused.into_iter().map(|r| r.sample).collect();
                    self.count_dropped(&samples, Cause::Unwritable);
                }
            }
        }
        self.remove(seq);
        // The batches still in flight (newer ones of the same delivery) stay protected.
        if self.delivering.is_some_and(|newest| seq >= newest) {
            self.delivering = None;
        }
        self.end_overflow();
        self.enforce_limit();
    }

    /// At exit: held batches are written if the spool can be written now; the rest are lost with
    /// the process, counted and logged. A spool_limit episode still going on is logged.
    pub fn finish(&mut self) {
        if !self.held.is_empty() {
            self.flush(None);
        }
        if !self.held.is_empty() {
            let lost: Vec<Sample> = std::mem::take(&mut self.held)
                .into_values()
                .flat_map(|h| h.samples)
                .collect();
            tracing::error!(
                "{} samples held in memory could not be written to {} and are lost with this process (counted in stats.json)",
                lost.len(),
                self.dir.display()
            );
            self.count_dropped(&lost, Cause::Unwritable);
        }
        self.end_overflow();
    }

    /// Batches waiting, on disk and held.
    pub fn len(&self) -> usize {
        self.entries.len() + self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the batches on disk.
    pub fn bytes(&self) -> u64 {
        self.entries.values().map(|(b, _)| b).sum()
    }

    /// Samples waiting for delivery, on disk and held.
    pub fn samples(&self) -> usize {
        self.entries.values().map(|(_, n)| n).sum::<usize>() + self.held_samples()
    }

    /// Samples held in memory.
    pub fn held_samples(&self) -> usize {
        self.held.values().map(|h| h.samples.len()).sum()
    }

    /// Refused samples kept, as of the last look.
    pub fn refused(&self) -> u64 {
        self.refused.count
    }

    /// Samples dropped since start, by probe.
    pub fn dropped(&self) -> &BTreeMap<String, ProbeCount> {
        &self.dropped
    }

    /// Samples dropped since start.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().map(|c| c.samples).sum()
    }

    /// The refused-sample area.
    pub fn rejected(&self) -> &Rejected {
        &self.rejected
    }

    /// Whether the state directory can be written, shared with whoever else writes there.
    pub fn health(&self) -> &Health {
        &self.health
    }
}

pub(crate) fn read_entry(p: &Path) -> Option<Vec<Sample>> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// Whether the state directory can be written. The spool and the stats file report their
/// writes here, so a full or read-only disk is logged once per episode, whichever noticed it
/// first: the cause and the fix when it starts, and when it ends what was delivered straight
/// from memory meanwhile and what could not be kept.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<HealthState>>);

#[derive(Debug, Default)]
struct HealthState {
    episode: Option<Unwritable>,
    /// When an episode was last logged, by cause (errno).
    logged: HashMap<i32, Instant>,
}

#[derive(Debug)]
struct Unwritable {
    since: Instant,
    errno: i32,
    logged: bool,
    from_memory: u64,
    dropped: u64,
}

/// What to do about a write that failed with `e` in `dir`.
fn fix(e: &std::io::Error, dir: &Path) -> String {
    use nix::errno::Errno;
    let dir = dir.display();
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOSPC) => format!("free space on the file system that holds {dir}"),
        Some(Errno::EDQUOT) => format!(
            "raise the disk quota of the agent's user on the file system that holds {dir}, or free space there"
        ),
        Some(Errno::EROFS) => {
            format!("the file system that holds {dir} is read-only: remount it read-write")
        }
        Some(Errno::EACCES | Errno::EPERM) => {
            format!("give the agent's user write access to {dir}")
        }
        Some(Errno::EIO) => format!("the disk that holds {dir} reports I/O errors: check it"),
        _ => format!("make sure the agent's user can write to {dir}"),
    }
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write of `what` in `dir` failed with `e`.
    pub fn failed(&self, dir: &Path, what: &str, e: &std::io::Error) {
        let errno = e.raw_os_error().unwrap_or(-1);
        let mut st = self.state();
        if st.episode.as_ref().is_some_and(|ep| ep.errno == errno) {
            tracing::debug!("cannot write {what} in {}: {e}", dir.display());
            return;
        }
        let quiet = st.logged.get(&errno).is_some_and(|t| t.elapsed() < QUIET);
        if quiet {
            tracing::debug!("cannot write {what} in {}: {e}", dir.display());
        } else {
            tracing::error!(
                "cannot write {what} in {}: {e}; {}. Until it can be written, samples go to the PEM server \
                 straight from memory (at most {} KiB are held; past that the oldest are dropped and \
                 counted in stats.json); heartbeats go on",
                dir.display(),
                fix(e, dir),
                HELD_LIMIT >> 10
            );
            st.logged.insert(errno, Instant::now());
        }
        let (from_memory, dropped) = st
            .episode
            .take()
            .map_or((0, 0), |ep| (ep.from_memory, ep.dropped));
        st.episode = Some(Unwritable {
            since: Instant::now(),
            errno,
            logged: !quiet,
            from_memory,
            dropped,
        });
    }

    /// A write in `dir` succeeded: an episode ends.
    pub fn succeeded(&self, dir: &Path) {
        let Some(ep) = self.state().episode.take() else {
            return;
        };
        let dropped = if ep.dropped > 0 {
            format!(
                ", and {} could not be kept and were dropped (counted in stats.json)",
                ep.dropped
            )
        } else {
            String::new()
        };
        let line = format!(
            "{} can be written again after {} s; spooling as before: {} samples went to the PEM server \
             straight from memory meanwhile{dropped}",
            dir.display(),
            ep.since.elapsed().as_secs(),
            ep.from_memory
        );
        if ep.logged {
            tracing::warn!("{line}");
        } else {
            tracing::debug!("{line}");
        }
    }

    /// True while the state directory cannot be written.
    pub fn failing(&self) -> bool {
        self.state().episode.is_some()
    }

    fn delivered_from_memory(&self, samples: u64) {
        if let Some(ep) = self.state().episode.as_mut() {
            ep.from_memory += samples;
        }
    }

    fn dropped(&self, samples: u64) {
        if let Some(ep) = self.state().episode.as_mut() {
            ep.dropped += samples;
        }
    }
}

/// The spool's figures as of its last operation, readable without waiting for it.
#[derive(Debug, Default)]
struct Figures {
    samples: AtomicU64,
    batches: AtomicU64,
    held: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    dropped_by_probe: Mutex<BTreeMap<String, ProbeCount>>,
}

/// What [`SpoolHandle::figures`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpoolFigures {
    pub samples: u64,
    pub batches: u64,
    /// Samples held in memory (the spool cannot be written).
    pub held: u64,
    /// Samples dropped since start (for the limit, or because they could not be kept).
    pub dropped: u64,
    pub refused: u64,
    pub dropped_by_probe: BTreeMap<String, ProbeCount>,
}

/// The worker's access to its spool: every operation runs on a blocking thread (the files are
/// written with fsync), so the runtime's thread never waits for the disk; the figures are kept
/// aside, so reading them never waits for an operation.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    spool: Arc<Mutex<Spool>>,
    figures: Arc<Figures>,
    health: Health,
}

impl SpoolHandle {
    pub fn new(spool: Spool) -> SpoolHandle {
        let health = spool.health.clone();
        let h = SpoolHandle {
            spool: Arc::new(Mutex::new(spool)),
            figures: Arc::default(),
            health,
        };
        let s = h.spool.lock().unwrap_or_else(|p| p.into_inner());
        publish(&h.figures, &s);
        drop(s);
        h
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Spool) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (spool, figures) = (self.spool.clone(), self.figures.clone());
        tokio::task::spawn_blocking(move || {
            let mut s = spool.lock().unwrap_or_else(|p| p.into_inner());
            let r = f(&mut s);
            publish(&figures, &s);
            r
        })
        .await
        .map_err(|e| Error::Interrupted(e.to_string()))
    }

    pub async fn push(&self, samples: Vec<Sample>) -> Result<u64, Error> {
        self.run(move |s| s.push(samples)).await?
    }

    pub async fn oldest(&self) -> Result<Option<Entry>, Error> {
        self.run(|s| s.oldest()).await
    }

    /// See [`Spool::oldest_batches`].
    pub async fn oldest_batches(&self, max_samples: usize) -> Result<Vec<Entry>, Error> {
        self.run(move |s| s.oldest_batches(max_samples)).await
    }

    /// Ends every batch of one delivery (see [`Spool::complete`]), in one trip to the spool.
    pub async fn complete_all(&self, done: Vec<(u64, Vec<RejectedSample>)>) -> Result<(), Error> {
        self.run(move |s| {
            for (seq, refused) in done {
                s.complete(seq, refused);
            }
        })
        .await
    }

    pub async fn complete(&self, seq: u64, refused: Vec<RejectedSample>) -> Result<(), Error> {
        self.run(move |s| s.complete(seq, refused)).await
    }

    pub async fn release(&self) -> Result<(), Error> {
        self.run(|s| s.release()).await
    }

    pub async fn finish(&self) -> Result<(), Error> {
        self.run(|s| s.finish()).await
    }

    pub fn figures(&self) -> SpoolFigures {
        let f = &self.figures;
        SpoolFigures {
            samples: f.samples.load(Ordering::Relaxed),
            batches: f.batches.load(Ordering::Relaxed),
            held: f.held.load(Ordering::Relaxed),
            dropped: f.dropped.load(Ordering::Relaxed),
            refused: f.refused.load(Ordering::Relaxed),
            dropped_by_probe: f
                .dropped_by_probe
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }
}

fn publish(f: &Figures, s: &Spool) {
    f.samples.store(s.samples() as u64, Ordering::Relaxed);
    f.batches.store(s.len() as u64, Ordering::Relaxed);
    f.held.store(s.held_samples() as u64, Ordering::Relaxed);
    f.refused.store(s.refused(), Ordering::Relaxed);
    let dropped = s.dropped_total();
    if f.dropped.swap(dropped, Ordering::Relaxed) != dropped {
        *f.dropped_by_probe.lock().unwrap_or_else(|p| p.into_inner()) = s.dropped().clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::Value;

    fn sample(n: i64) -> Sample {
        Sample::new(
            "load_average",
            None,
            None,
            vec![vec![Value::Int(n), Value::Float(0.5), Value::Null]],
        )
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "rejected" && n != REUSE)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_delivered_batchs_file_holds_the_next_batch_and_reads_back_after_a_restart() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 30).unwrap();
        let big = s.push((0..50).map(sample).collect()).unwrap();
        let inode = std::fs::metadata(s.path(big)).unwrap().ino();
        let e = s.oldest().unwrap();
        s.complete(e.seq, Vec::new());
        assert!(files(d.path()).is_empty());
        assert!(d.path().join(REUSE).is_file());
        // The next, shorter batch goes into the same file, its tail blanked.
        let small = s.push(vec![sample(7)]).unwrap();
        assert!(!d.path().join(REUSE).exists());
        assert_eq!(files(d.path()), vec![format!("{small:020}.json")]);
        let meta = std::fs::metadata(s.path(small)).unwrap();
        assert_eq!(
            meta.ino(),
            inode,
            "the delivered batch's file was written over"
        );
        assert_eq!(meta.mode() & 0o777, 0o600);
        drop(s);
        let mut again = Spool::open(d.path(), 1 << 30).unwrap();
        let e = again.oldest().unwrap();
        assert_eq!(e.seq, small);
        assert_eq!(e.samples.len(), 1);
        assert_eq!(e.samples[0].rows[0].1[0], Value::Int(7));
        // After a restart the kept file is found and used again.
        again.complete(e.seq, Vec::new());
        drop(again);
        let mut third = Spool::open(d.path(), 1 << 30).unwrap();
        let next = third.push(vec![sample(8)]).unwrap();
        assert_eq!(std::fs::metadata(third.path(next)).unwrap().ino(), inode);
        assert_eq!(
            third.oldest().unwrap().samples[0].rows[0].1[0],
            Value::Int(8)
        );
    }

    #[test]
    fn entries_survive_a_restart_in_order() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        let a = s.push(vec![sample(1)]).unwrap();
        let b = s.push(vec![sample(2), sample(3)]).unwrap();
        assert!(a < b);
        drop(s);
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        assert_eq!((s.len(), s.samples()), (2, 3));
        let first = s.oldest().unwrap();
        assert_eq!(first.seq, a);
        assert_eq!(first.samples[0].rows[0].1[0], Value::Int(1));
        s.remove(a);
        assert_eq!(s.oldest().unwrap().samples.len(), 2);
        let c = s.push(vec![sample(4)]).unwrap();
        assert!(c > b, "sequence continues after a restart");
    }

    #[test]
    fn an_interrupted_write_leaves_only_a_temporary_file_removed_at_the_next_start() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        s.push(vec![sample(1)]).unwrap();
        drop(s);
        // What a worker killed between writing and renaming leaves.
        std::fs::write(d.path().join(".00000000000000000002.json.tmp"), b"[{\"pro").unwrap();
        let s = Spool::open(d.path(), 1 << 20).unwrap();
        assert_eq!(files(d.path()), vec!["00000000000000000001.json"]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn over_the_limit_the_oldest_go_and_are_counted_per_probe() {
        let d = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&[sample(1)]).unwrap().len() as u64;
        let mut s = Spool::open(d.path(), one * 3).unwrap();
        for i in 0..5 {
            s.push(vec![sample(i)]).unwrap();
        }
        assert!(s.bytes() <= one * 3);
        assert_eq!(s.dropped_total(), 2);
        assert_eq!(
            s.dropped()["load_average"],
            ProbeCount {
                samples: 2,
                rows: 2
            }
        );
        assert_eq!(s.len(), 3);
        assert_eq!(files(d.path()).len(), 3);
        let oldest = s.oldest().unwrap();
        assert_eq!(
            oldest.samples[0].rows[0].1[0],
            Value::Int(2),
            "the oldest went"
        );
        // A delivery ends the episode; the counts stay.
        s.complete(oldest.seq, Vec::new());
        assert!(s.overflow.is_none());
        assert_eq!(s.dropped_total(), 2);
    }

    #[test]
    fn a_backlog_goes_several_whole_batches_at_a_time_and_none_of_them_is_dropped_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&[sample(1)]).unwrap().len() as u64;
        let mut s = Spool::open(d.path(), one * 8).unwrap();
        for i in 0..3 {
            s.push(vec![sample(2 * i), sample(2 * i + 1)]).unwrap();
        }
        // Whole batches only, oldest first: two of two samples fit in five, the third does not.
        let taken = s.oldest_batches(5);
        assert_eq!(
            taken.iter().map(|e| e.samples.len()).collect::<Vec<_>>(),
            [2, 2]
        );
        assert_eq!(taken[0].samples[0].rows[0].1[0], Value::Int(0));
        assert_eq!(taken[1].samples[0].rows[0].1[0], Value::Int(2));
        // One batch is taken even when it alone is over the bound.
        assert_eq!(s.oldest_batches(1).len(), 1);
        let taken = s.oldest_batches(5);
        // Over the limit meanwhile: neither batch in flight is dropped, the limit waits.
        for i in 6..9 {
            s.push(vec![sample(i)]).unwrap();
        }
        assert_eq!(s.dropped_total(), 0);
        // Completing the first leaves the second protected; completing both lets the limit act.
        s.complete(taken[0].seq, Vec::new());
        assert_eq!(s.dropped_total(), 0);
        assert_eq!(s.oldest_seq(), Some(taken[1].seq));
        s.complete(taken[1].seq, Vec::new());
        assert_eq!(s.len(), 4);
        assert_eq!(
            s.oldest_batches(100)
                .iter()
                .map(|e| e.samples.len())
                .sum::<usize>(),
            5
        );
    }

    #[test]
    fn the_batch_being_delivered_is_not_dropped_and_nothing_newer_goes_before_it() {
        let d = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&[sample(1)]).unwrap().len() as u64;
        let mut s = Spool::open(d.path(), one * 3).unwrap();
        for i in 0..3 {
            s.push(vec![sample(i)]).unwrap();
        }
        let delivering = s.oldest().unwrap();
        s.push(vec![sample(3)]).unwrap();
        s.push(vec![sample(4)]).unwrap();
        assert_eq!((s.len(), s.dropped_total()), (5, 0), "the limit waits");
        // Stored: it goes, and the limit drops the oldest of the rest.
        s.complete(delivering.seq, Vec::new());
        assert_eq!((s.len(), s.dropped_total()), (3, 1));
        assert_eq!(s.oldest().unwrap().samples[0].rows[0].1[0], Value::Int(2));
        // Not delivered after all: it may go.
        s.release();
        s.push(vec![sample(5)]).unwrap();
        assert_eq!((s.len(), s.dropped_total()), (3, 2));
        assert_eq!(s.oldest().unwrap().samples[0].rows[0].1[0], Value::Int(3));
    }

    fn refused(n: i64) -> RejectedSample {
        refused_sample(sample(n))
    }

    fn refused_sample(sample: Sample) -> RejectedSample {
        RejectedSample {
            sample,
            sqlstate: Some("22003".into()),
            message: "integer out of range".into(),
            rejected_at: chrono::Utc::now(),
            attempts: 1,
        }
    }

    #[test]
    fn refused_samples_are_kept_counted_and_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        let a = s.push(vec![sample(1), sample(2)]).unwrap();
        s.complete(a, vec![refused(2)]);
        assert!(s.is_empty());
        assert_eq!(s.refused(), 1);
        drop(s);
        let s = Spool::open(d.path(), 1 << 20).unwrap();
        assert_eq!(s.refused(), 1);
        let all = s.rejected().read_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.sample.rows[0].1[0], Value::Int(2));
        assert_eq!(all[0].1.sqlstate.as_deref(), Some("22003"));
    }

    #[test]
    fn a_batch_delivered_again_after_a_crash_does_not_keep_its_refused_sample_twice() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        s.push(vec![sample(1), sample(2)]).unwrap();
        let e = s.oldest().unwrap();
        let bad = refused_sample(e.samples[1].clone());
        // Killed after keeping the refused sample, before removing its batch.
        s.rejected()
            .lock()
            .unwrap()
            .add(std::slice::from_ref(&bad))
            .unwrap();
        drop(s);
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        let again = s.oldest().unwrap();
        assert_eq!(again.seq, e.seq, "the batch is delivered again");
        s.complete(again.seq, vec![refused_sample(again.samples[1].clone())]);
        assert_eq!(s.rejected().read_all().len(), 1);
        assert_eq!(s.refused(), 1);
    }

    #[test]
    fn past_the_limit_refused_samples_go_before_pending_batches() {
        let d = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&[sample(1)]).unwrap().len() as u64;
        let mut s = Spool::open(d.path(), one * 4).unwrap();
        let a = s.push(vec![sample(1)]).unwrap();
        s.complete(a, vec![refused(1)]);
        assert_eq!(s.refused(), 1);
        for i in 0..4 {
            s.push(vec![sample(i)]).unwrap();
        }
        assert_eq!(s.refused(), 0, "the refused sample went first");
        assert_eq!(s.dropped_total(), 1);
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn batches_an_earlier_version_set_aside_are_queued_again() {
        let d = tempfile::tempdir().unwrap();
        let data = serde_json::to_vec(&[sample(7)]).unwrap();
        std::fs::write(d.path().join("00000000000000000003.rejected"), &data).unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.oldest().unwrap().samples[0].rows[0].1[0], Value::Int(7));
    }

    #[test]
    fn a_corrupt_entry_is_set_aside_and_its_number_never_reused() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        let a = s.push(vec![sample(1)]).unwrap();
        std::fs::write(s.path(a), b"not json").unwrap();
        assert!(s.oldest().is_none());
        assert!(s.path(a).with_extension("corrupt").exists());
        drop(s);
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        assert!(s.push(vec![sample(2)]).unwrap() > a);
    }

    #[test]
    fn an_unwritable_spool_holds_batches_in_memory_and_writes_them_first_when_it_can() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        s.push(vec![sample(1)]).unwrap();
        s.fail_writes = Some(nix::libc::ENOSPC);
        s.push(vec![sample(2)]).unwrap();
        let held = s.push(vec![sample(3)]).unwrap();
        assert!(s.health().failing());
        assert_eq!((s.len(), s.held_samples()), (3, 2));
        assert_eq!(files(d.path()).len(), 1, "nothing half-written left");
        // Delivered from memory, in order.
        let first = s.oldest().unwrap();
        assert_eq!(first.samples[0].rows[0].1[0], Value::Int(1));
        s.complete(first.seq, Vec::new());
        let second = s.oldest().unwrap();
        assert_eq!(second.samples[0].rows[0].1[0], Value::Int(2));
        s.complete(second.seq, Vec::new());
        // Space again: the held batch is written before the new one.
        s.fail_writes = None;
        let new = s.push(vec![sample(4)]).unwrap();
        assert!(!s.health().failing());
        assert_eq!(s.held_samples(), 0);
        assert_eq!(
            files(d.path()),
            vec![format!("{held:020}.json"), format!("{new:020}.json")]
        );
        assert_eq!(s.dropped_total(), 0);
    }

    #[test]
    fn held_batches_past_their_limit_or_at_exit_are_counted_as_dropped() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 30).unwrap();
        s.fail_writes = Some(nix::libc::EROFS);
        let big: Vec<Sample> = (0..2000).map(sample).collect();
        let per_batch = big.len() as u64;
        let mut pushed = 0;
        while s.held_bytes() + 100_000 < HELD_LIMIT * 2 && pushed < 40 {
            s.push(big.clone()).unwrap();
            pushed += 1;
        }
        assert!(s.held_bytes() <= HELD_LIMIT);
        let dropped = s.dropped_total();
        assert!(dropped > 0);
        assert_eq!(dropped + s.held_samples() as u64, pushed * per_batch);
        s.finish();
        assert_eq!(s.dropped_total(), pushed * per_batch);
        assert!(s.is_empty());
    }

    #[test]
    fn a_delivered_batch_that_cannot_be_removed_yet_is_removed_once_the_spool_can_be_written() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        let a = s.push(vec![sample(1)]).unwrap();
        // As on a read-only file system: the removal fails.
        s.stale.insert(a);
        s.entries.remove(&a);
        assert_eq!(files(d.path()).len(), 1);
        s.push(vec![sample(2)]).unwrap();
        assert_eq!(files(d.path()).len(), 1, "the delivered batch's file went");
        assert!(s.stale.is_empty());
    }

    /// What the spool must do, as plain collections.
    #[derive(Debug, Clone)]
    enum Op {
        /// A batch of samples with these values.
        Push(Vec<i64>),
        /// The oldest batch delivered; the samples at these positions refused.
        Deliver(Vec<usize>),
        /// The oldest batch delivered with these samples refused, and the worker killed after
        /// keeping them, before removing the batch.
        CrashAfterKeepingRefused(Vec<usize>),
        /// The worker restarts.
        Reopen,
        /// The disk fills up, or frees again.
        Disk(bool),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => proptest::collection::vec(0i64..1000, 1..4).prop_map(Op::Push),
            2 => proptest::collection::vec(0usize..4, 0..2).prop_map(Op::Deliver),
            1 => proptest::collection::vec(0usize..4, 1..2).prop_map(Op::CrashAfterKeepingRefused),
            1 => Just(Op::Reopen),
            1 => any::<bool>().prop_map(Op::Disk),
        ]
    }

    fn values(samples: &[Sample]) -> Vec<i64> {
        samples
            .iter()
            .map(|s| match s.rows[0].1[0] {
                Value::Int(i) => i,
                ref v => panic!("{v:?}"),
            })
            .collect()
    }

    /// A pending batch in the model.
    #[derive(Debug, Clone)]
    struct Pending {
        values: Vec<i64>,
        /// Written to disk (else held in memory, and lost if the worker stops).
        durable: bool,
        /// Positions the server refuses, once it was tried.
        refuses: Option<Vec<usize>>,
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Random push / deliver (with refusals) / crash / reopen / full-disk sequences against an
        /// in-memory model: batches come out oldest first, as pushed; refused samples are kept
        /// once, in order, across restarts; batches held in memory while the disk is full are
        /// written once it is not, or lost only with the process; nothing is duplicated.
        #[test]
        fn the_spool_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..40)) {
            let d = tempfile::tempdir().unwrap();
            let mut s = Spool::open(d.path(), 1 << 30).unwrap();
            let mut pending: std::collections::VecDeque<Pending> = Default::default();
            let mut refused: Vec<i64> = Vec::new();
            let mut full = false;
            for op in ops {
                match op {
                    Op::Push(v) => {
                        let batch: Vec<Sample> = v.iter().map(|&n| sample(n)).collect();
                        s.push(batch).unwrap();
                        if !full {
                            for p in pending.iter_mut() {
                                p.durable = true;
                            }
                        }
                        pending.push_back(Pending { values: v, durable: !full, refuses: None });
                    }
                    Op::Deliver(positions) | Op::CrashAfterKeepingRefused(positions) if pending.is_empty() => {
                        proptest::prop_assert!(s.oldest().is_none());
                        let _ = positions;
                    }
                    Op::Deliver(positions) => {
                        let e = s.oldest().unwrap();
                        let want = pending.pop_front().unwrap();
                        proptest::prop_assert_eq!(values(&e.samples), want.values.clone());
                        let positions = want.refuses.clone().unwrap_or(positions);
                        let mut positions: Vec<usize> =
                            positions.into_iter().filter(|&p| p < want.values.len()).collect();
                        positions.sort();
                        positions.dedup();
                        let kept: Vec<RejectedSample> = positions
                            .iter()
                            .map(|&p| refused_sample(e.samples[p].clone()))
                            .collect();
                        if want.refuses.is_none() {
                            refused.extend(positions.iter().map(|&p| want.values[p]));
                        }
                        s.complete(e.seq, kept);
                    }
                    Op::CrashAfterKeepingRefused(positions) => {
                        if full {
                            continue;
                        }
                        let e = s.oldest().unwrap();
                        let front = pending.front_mut().unwrap();
                        let mut positions: Vec<usize> =
                            positions.into_iter().filter(|&p| p < front.values.len()).collect();
                        positions.sort();
                        positions.dedup();
                        let positions = front.refuses.clone().unwrap_or(positions);
                        let kept: Vec<RejectedSample> = positions
                            .iter()
                            .map(|&p| refused_sample(e.samples[p].clone()))
                            .collect();
                        let added = s.rejected().lock().unwrap().add(&kept).unwrap();
                        if front.refuses.is_none() {
                            refused.extend(positions.iter().map(|&p| front.values[p]));
                            proptest::prop_assert_eq!(added, kept.len());
                        } else {
                            proptest::prop_assert_eq!(added, 0);
                        }
                        front.refuses = Some(positions);
                        drop(s);
                        // Killed: what was only held is gone with the process.
                        pending.retain(|p| p.durable);
                        s = Spool::open(d.path(), 1 << 30).unwrap();
                        full = false;
                    }
                    Op::Reopen => {
                        drop(s);
                        pending.retain(|p| p.durable);
                        s = Spool::open(d.path(), 1 << 30).unwrap();
                        full = false;
                    }
                    Op::Disk(free) => {
                        full = !free;
                        s.fail_writes = full.then_some(nix::libc::ENOSPC);
                    }
                }
                proptest::prop_assert_eq!(s.len(), pending.len());
                proptest::prop_assert_eq!(s.samples(), pending.iter().map(|p| p.values.len()).sum::<usize>());
                proptest::prop_assert_eq!(s.refused() as usize, refused.len());
                let on_disk: Vec<i64> = s
                    .rejected()
                    .read_all()
                    .iter()
                    .map(|(_, r)| values(std::slice::from_ref(&r.sample))[0])
                    .collect();
                proptest::prop_assert_eq!(&on_disk, &refused);
                proptest::prop_assert_eq!(s.dropped_total(), 0);
            }
        }

        /// Under a small limit the spool never exceeds it (but for the newest batch), and every
        /// pushed sample is either still there or counted as dropped, per probe.
        #[test]
        fn past_its_limit_the_spool_drops_and_counts(sizes in proptest::collection::vec(1usize..4, 1..30)) {
            let d = tempfile::tempdir().unwrap();
            let one = serde_json::to_vec(&[sample(1)]).unwrap().len() as u64;
            let limit = one * 5;
            let mut s = Spool::open(d.path(), limit).unwrap();
            let mut pushed = 0u64;
            for n in sizes {
                let batch: Vec<Sample> = (0..n as i64).map(sample).collect();
                s.push(batch).unwrap();
                pushed += n as u64;
                proptest::prop_assert!(s.bytes() <= limit || s.len() == 1);
                proptest::prop_assert_eq!(s.samples() as u64 + s.dropped_total(), pushed);
                proptest::prop_assert_eq!(
                    s.dropped().get("load_average").map_or(0, |c| c.rows),
                    s.dropped_total()
                );
            }
        }
    }
}
