//! The on-disk spool: every batch of samples is written here first and removed only once the
//! PEM server has committed it, so samples survive outages of the server, of the pooler and of
//! the agent itself. Entries are replayed oldest first.
//!
//! Layout of a state directory (one per agent; [`lock`] makes sure only one worker uses it):
//!
//! - `spool/<seq>.json`: a batch waiting for delivery;
//! - `spool/rejected/<seq>.json`: one sample the PEM server refused as data, with the server's
//!   SQLSTATE and message, kept until an operator replays or discards it (`pemworker spool`);
//! - `lock`: the worker's lock, holding its pid; `stats.json`: see `worker::stats`.
//!
//! The spool is bounded: past `spool_limit` (pending and refused samples together) the oldest
//! refused samples go first, then the oldest batches; each drop is counted and logged.
//! All of it is blocking file I/O: the worker reaches it through [`SpoolHandle`], which runs
//! every operation on a blocking thread.

pub mod command;
pub mod lock;
pub mod rejected;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use lock::StateLock;
pub use rejected::{Rejected, RejectedSample};

use crate::fsutil::{self, Staged};
use crate::probes::Sample;

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
}

/// One spooled batch.
#[derive(Debug)]
pub struct Entry {
    pub seq: u64,
    pub samples: Vec<Sample>,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limit: u64,
    rejected: Rejected,
    /// seq -> (size in bytes, number of samples)
    entries: BTreeMap<u64, (u64, usize)>,
    next_seq: u64,
    /// Samples dropped because the spool was full, since start.
    pub dropped: u64,
    /// Refused samples dropped because the spool was full, since start.
    pub dropped_refused: u64,
    /// Refused samples kept, as of the last operation that looked.
    pub refused: u64,
}

const SUFFIX: &str = ".json";

/// A spool entry's sequence number, from its file name.
pub(crate) fn entry_seq(name: &str) -> Option<u64> {
    name.strip_suffix(SUFFIX)
        .and_then(|s| s.parse::<u64>().ok())
}

impl Spool {
    /// Opens (creating) the spool in `dir`, picking up entries left by an earlier run. Batches an
    /// earlier version set aside whole (`<seq>.rejected`) are queued again: delivery now refuses
    /// single samples, never batches.
    pub fn open(dir: &Path, limit: u64) -> Result<Spool, Error> {
        fsutil::ensure_dir(dir, 0o700, None)?;
        let rejected = Rejected::open(&dir.join("rejected"))?;
        let mut entries = BTreeMap::new();
        let mut set_aside = Vec::new();
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
            let Some(seq) = entry_seq(&name) else {
                continue;
            };
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            let count = read_entry(&e.path()).map_or(0, |s| s.len());
            entries.insert(seq, (size, count));
        }
        let mut next_seq = entries.keys().next_back().map_or(1, |s| s + 1);
        set_aside.sort();
        for (_, path) in &set_aside {
            if let Some(samples) = read_entry(path) {
                let target = dir.join(format!("{next_seq:020}{SUFFIX}"));
                std::fs::rename(path, &target).map_err(fsutil::Error::io("queue again", path))?;
                let size = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
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
        let refused = rejected.lock()?.list()?.len() as u64;
        Ok(Spool {
            dir: dir.to_path_buf(),
            limit,
            rejected,
            entries,
            next_seq,
            dropped: 0,
            dropped_refused: 0,
            refused,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}{SUFFIX}"))
    }

    /// Appends a batch durably (written, synced, renamed into place), then keeps the spool within
    /// its limit.
    pub fn push(&mut self, samples: &[Sample]) -> Result<u64, Error> {
        let data = serde_json::to_vec(samples)?;
        let seq = self.next_seq;
        Staged::write(&self.path(seq), &data, 0o600, None)?.commit()?;
        self.next_seq += 1;
        self.entries.insert(seq, (data.len() as u64, samples.len()));
        self.enforce_limit()?;
        Ok(seq)
    }

    /// Drops the oldest refused samples, then the oldest batches (never the newest one), until
    /// the spool fits its limit.
    fn enforce_limit(&mut self) -> Result<(), Error> {
        let pending: u64 = self.bytes();
        let rejected = self.rejected.clone();
        let mut area = rejected.lock()?;
        let mut refused = area.list()?;
        self.refused = refused.len() as u64;
        let mut refused_bytes: u64 = refused.iter().map(|(_, b)| b).sum();
        let mut pending = pending;
        while pending + refused_bytes > self.limit {
            if let Some((seq, bytes)) = refused.first().copied() {
                area.remove(seq);
                refused.remove(0);
                refused_bytes -= bytes;
                self.dropped_refused += 1;
                self.refused = refused.len() as u64;
                tracing::error!(
                    "spool {} is over its limit of {} bytes: dropped the oldest refused sample ({} dropped since start)",
                    self.dir.display(),
                    self.limit,
                    self.dropped_refused
                );
            } else if self.entries.len() > 1 {
                let (&oldest, &(bytes, count)) = self.entries.iter().next().expect("non-empty");
                self.remove(oldest);
                pending -= bytes;
                self.dropped += count as u64;
                tracing::error!(
                    "spool {} is over its limit of {} bytes: dropped the oldest batch ({count} samples; {} dropped since start)",
                    self.dir.display(),
                    self.limit,
                    self.dropped
                );
            } else {
                break;
            }
        }
        Ok(())
    }

    /// The oldest batch. An unreadable entry is moved aside (`.corrupt`) and skipped.
    pub fn oldest(&mut self) -> Option<Entry> {
        while let Some((&seq, _)) = self.entries.iter().next() {
            let p = self.path(seq);
            match read_entry(&p) {
                Some(samples) => return Some(Entry { seq, samples }),
                None => {
                    tracing::error!("spool entry {} is unreadable; moved aside", p.display());
                    let _ = std::fs::rename(&p, p.with_extension("corrupt"));
                    self.entries.remove(&seq);
                }
            }
        }
        None
    }

    /// Removes a delivered batch.
    pub fn remove(&mut self, seq: u64) {
        if self.entries.remove(&seq).is_some() {
            let _ = std::fs::remove_file(self.path(seq));
        }
    }

    /// Ends a delivered batch: the samples the server refused are kept (durably, first), then
    /// the batch goes.
    pub fn complete(&mut self, seq: u64, refused: Vec<RejectedSample>) -> Result<(), Error> {
        if !refused.is_empty() {
            let rejected = self.rejected.clone();
            let mut area = rejected.lock()?;
            area.add(&refused)?;
            self.refused = area.list()?.len() as u64;
        }
        self.remove(seq);
        if !refused.is_empty() {
            self.enforce_limit()?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.entries.values().map(|(b, _)| b).sum()
    }

    /// Samples waiting in the spool.
    pub fn samples(&self) -> usize {
        self.entries.values().map(|(_, n)| n).sum()
    }

    /// The refused-sample area.
    pub fn rejected(&self) -> &Rejected {
        &self.rejected
    }
}

pub(crate) fn read_entry(p: &Path) -> Option<Vec<Sample>> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// The spool's figures as of its last operation, readable without waiting for it.
#[derive(Debug, Default)]
struct Figures {
    samples: AtomicU64,
    batches: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
}

/// What [`SpoolHandle::figures`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolFigures {
    pub samples: u64,
    pub batches: u64,
    /// Pending and refused samples dropped for the limit since start.
    pub dropped: u64,
    pub refused: u64,
}

/// The worker's access to its spool: every operation runs on a blocking thread (the files are
/// written with fsync), so the runtime's thread never waits for the disk; the figures are kept
/// in atomics, so reading them never waits for an operation.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    spool: Arc<Mutex<Spool>>,
    figures: Arc<Figures>,
}

impl SpoolHandle {
    pub fn new(spool: Spool) -> SpoolHandle {
        let h = SpoolHandle {
            spool: Arc::new(Mutex::new(spool)),
            figures: Arc::default(),
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
        self.run(move |s| s.push(&samples)).await?
    }

    pub async fn oldest(&self) -> Result<Option<Entry>, Error> {
        self.run(|s| s.oldest()).await
    }

    pub async fn complete(&self, seq: u64, refused: Vec<RejectedSample>) -> Result<(), Error> {
        self.run(move |s| s.complete(seq, refused)).await?
    }

    pub fn figures(&self) -> SpoolFigures {
        let f = &self.figures;
        SpoolFigures {
            samples: f.samples.load(Ordering::Relaxed),
            batches: f.batches.load(Ordering::Relaxed),
            dropped: f.dropped.load(Ordering::Relaxed),
            refused: f.refused.load(Ordering::Relaxed),
        }
    }
}

fn publish(f: &Figures, s: &Spool) {
    f.samples.store(s.samples() as u64, Ordering::Relaxed);
    f.batches.store(s.len() as u64, Ordering::Relaxed);
    f.dropped
        .store(s.dropped + s.dropped_refused, Ordering::Relaxed);
    f.refused.store(s.refused, Ordering::Relaxed);
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

    #[test]
    fn entries_survive_a_restart_in_order() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        let a = s.push(&[sample(1)]).unwrap();
        let b = s.push(&[sample(2), sample(3)]).unwrap();
        assert!(a < b);
        drop(s);
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        assert_eq!((s.len(), s.samples()), (2, 3));
        let first = s.oldest().unwrap();
        assert_eq!(first.seq, a);
        assert_eq!(first.samples[0].rows[0].1[0], Value::Int(1));
        s.remove(a);
        assert_eq!(s.oldest().unwrap().samples.len(), 2);
        let c = s.push(&[sample(4)]).unwrap();
        assert!(c > b, "sequence continues after a restart");
    }

    #[test]
    fn over_the_limit_the_oldest_go_and_are_counted() {
        let d = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&[sample(1)]).unwrap().len() as u64;
        let mut s = Spool::open(d.path(), one * 3).unwrap();
        for i in 0..5 {
            s.push(&[sample(i)]).unwrap();
        }
        assert!(s.bytes() <= one * 3);
        assert_eq!(s.dropped, 2);
        assert_eq!(s.len(), 3);
        let left = std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| entry_seq(&e.as_ref().unwrap().file_name().to_string_lossy()).is_some())
            .count();
        assert_eq!(left, 3);
    }

    fn refused(n: i64) -> RejectedSample {
        RejectedSample {
            sample: sample(n),
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
        let a = s.push(&[sample(1), sample(2)]).unwrap();
        s.complete(a, vec![refused(2)]).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.refused, 1);
        drop(s);
        let s = Spool::open(d.path(), 1 << 20).unwrap();
        assert_eq!(s.refused, 1);
        let all = s.rejected().read_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.sample.rows[0].1[0], Value::Int(2));
        assert_eq!(all[0].1.sqlstate.as_deref(), Some("22003"));
    }

    #[test]
    fn past_the_limit_refused_samples_go_before_pending_batches() {
        let d = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&[sample(1)]).unwrap().len() as u64;
        let mut s = Spool::open(d.path(), one * 4).unwrap();
        let a = s.push(&[sample(1)]).unwrap();
        s.complete(a, vec![refused(1)]).unwrap();
        assert_eq!(s.refused, 1);
        for i in 0..4 {
            s.push(&[sample(i)]).unwrap();
        }
        assert_eq!(s.refused, 0, "the refused sample went first");
        assert_eq!(s.dropped_refused, 1);
        assert_eq!(s.dropped, 0);
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
    fn a_corrupt_entry_is_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::open(d.path(), 1 << 20).unwrap();
        let a = s.push(&[sample(1)]).unwrap();
        s.push(&[sample(2)]).unwrap();
        std::fs::write(s.path(a), b"not json").unwrap();
        assert_ne!(s.oldest().unwrap().seq, a);
        assert!(s.path(a).with_extension("corrupt").exists());
    }

    /// What the spool must do, as plain collections.
    #[derive(Debug, Clone)]
    enum Op {
        /// A batch of samples with these values.
        Push(Vec<i64>),
        /// The oldest batch delivered; the samples at these positions refused.
        Deliver(Vec<usize>),
        /// The worker restarts.
        Reopen,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => proptest::collection::vec(0i64..1000, 1..4).prop_map(Op::Push),
            2 => proptest::collection::vec(0usize..4, 0..2).prop_map(Op::Deliver),
            1 => Just(Op::Reopen),
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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Random push / deliver (with refusals) / reopen sequences against an in-memory model:
        /// batches come out oldest first, as pushed; refused samples are kept, in order, across
        /// restarts; nothing is lost or duplicated.
        #[test]
        fn the_spool_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..40)) {
            let d = tempfile::tempdir().unwrap();
            let mut s = Spool::open(d.path(), 1 << 30).unwrap();
            let mut pending: std::collections::VecDeque<Vec<i64>> = Default::default();
            let mut refused: Vec<i64> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(v) => {
                        let batch: Vec<Sample> = v.iter().map(|&n| sample(n)).collect();
                        s.push(&batch).unwrap();
                        pending.push_back(v);
                    }
                    Op::Deliver(positions) => {
                        let got = s.oldest();
                        let want = pending.pop_front();
                        proptest::prop_assert_eq!(got.as_ref().map(|e| values(&e.samples)), want.clone());
                        if let (Some(e), Some(want)) = (got, want) {
                            let mut positions: Vec<usize> =
                                positions.into_iter().filter(|&p| p < want.len()).collect();
                            positions.sort();
                            positions.dedup();
                            let kept: Vec<RejectedSample> = positions
                                .iter()
                                .map(|&p| RejectedSample { sample: e.samples[p].clone(), ..refused_record() })
                                .collect();
                            refused.extend(positions.iter().map(|&p| want[p]));
                            s.complete(e.seq, kept).unwrap();
                        }
                    }
                    Op::Reopen => {
                        drop(s);
                        s = Spool::open(d.path(), 1 << 30).unwrap();
                    }
                }
                proptest::prop_assert_eq!(s.len(), pending.len());
                proptest::prop_assert_eq!(s.samples(), pending.iter().map(Vec::len).sum::<usize>());
                proptest::prop_assert_eq!(s.refused as usize, refused.len());
                let on_disk: Vec<i64> = s
                    .rejected()
                    .read_all()
                    .iter()
                    .map(|(_, r)| values(std::slice::from_ref(&r.sample))[0])
                    .collect();
                proptest::prop_assert_eq!(&on_disk, &refused);
            }
        }

        /// Under a small limit the spool never exceeds it (but for the newest batch), and every
        /// pushed sample is either still there or counted as dropped.
        #[test]
        fn past_its_limit_the_spool_drops_and_counts(sizes in proptest::collection::vec(1usize..4, 1..30)) {
            let d = tempfile::tempdir().unwrap();
            let one = serde_json::to_vec(&[sample(1)]).unwrap().len() as u64;
            let limit = one * 5;
            let mut s = Spool::open(d.path(), limit).unwrap();
            let mut pushed = 0u64;
            for n in sizes {
                let batch: Vec<Sample> = (0..n as i64).map(sample).collect();
                s.push(&batch).unwrap();
                pushed += n as u64;
                proptest::prop_assert!(s.bytes() <= limit || s.len() == 1);
                proptest::prop_assert_eq!(s.samples() as u64 + s.dropped, pushed);
            }
        }
    }

    fn refused_record() -> RejectedSample {
        refused(0)
    }
}
