//! The on-disk spool: every batch of samples is written here first and removed only once the
//! PEM server has committed it, so samples survive outages of the server, of the pooler and of
//! the agent itself. Entries are replayed oldest first. The spool is bounded: past its size
//! limit the oldest entries are dropped, counted and logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fsutil::{self, Staged};
use crate::probes::Sample;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Files(#[from] fsutil::Error),
    #[error("cannot encode samples: {0}")]
    Encode(#[from] serde_json::Error),
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
    /// seq -> (size in bytes, number of samples)
    entries: BTreeMap<u64, (u64, usize)>,
    next_seq: u64,
    /// Samples dropped because the spool was full, since start.
    pub dropped: u64,
}

const SUFFIX: &str = ".json";

impl Spool {
    /// Opens (creating) the spool in `dir`, picking up entries left by an earlier run.
    pub fn open(dir: &Path, limit: u64) -> Result<Spool, Error> {
        fsutil::ensure_dir(dir, 0o700, None)?;
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(dir).map_err(fsutil::Error::io("read directory", dir))? {
            let e = e.map_err(fsutil::Error::io("read directory", dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(seq) = name
                .strip_suffix(SUFFIX)
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            let count = read_entry(&e.path()).map_or(0, |s| s.len());
            entries.insert(seq, (size, count));
        }
        let next_seq = entries.keys().next_back().map_or(1, |s| s + 1);
        if !entries.is_empty() {
            tracing::info!(
                "spool {}: {} batches left from an earlier run",
                dir.display(),
                entries.len()
            );
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            limit,
            entries,
            next_seq,
            dropped: 0,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}{SUFFIX}"))
    }

    /// Appends a batch durably (written, synced, renamed into place).
    pub fn push(&mut self, samples: &[Sample]) -> Result<u64, Error> {
        let data = serde_json::to_vec(samples)?;
        let seq = self.next_seq;
        Staged::write(&self.path(seq), &data, 0o600, None)?.commit()?;
        self.next_seq += 1;
        self.entries.insert(seq, (data.len() as u64, samples.len()));
        while self.bytes() > self.limit && self.entries.len() > 1 {
            let (&oldest, &(_, count)) = self.entries.iter().next().expect("non-empty");
            self.remove(oldest);
            self.dropped += count as u64;
            tracing::error!(
                "spool {} is over its limit of {} bytes: dropped the oldest batch ({count} samples; {} dropped since start)",
                self.dir.display(),
                self.limit,
                self.dropped
            );
        }
        Ok(seq)
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

    /// Moves a batch the server rejected out of the way, keeping it for inspection.
    pub fn reject(&mut self, seq: u64) {
        if self.entries.remove(&seq).is_some() {
            let p = self.path(seq);
            let _ = std::fs::rename(&p, p.with_extension("rejected"));
        }
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
}

fn read_entry(p: &Path) -> Option<Vec<Sample>> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
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
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 3);
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
}
