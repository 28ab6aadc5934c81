//! Samples the PEM server refused as data, one file each, kept until an operator replays or
//! discards them. The worker adds and (past the spool's limit) drops them; `pemworker spool`
//! replays and discards them, possibly while the worker runs, so every change happens under
//! an OS lock on the area (`.lock`), held for one short operation.

use std::fs::File;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Error, SUFFIX, entry_seq};
use crate::fsutil::{self, Staged};
use crate::probes::Sample;

/// One refused sample and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedSample {
    pub sample: Sample,
    /// The server's SQLSTATE; `None` when the agent could not send it at all.
    pub sqlstate: Option<String>,
    pub message: String,
    pub rejected_at: DateTime<Utc>,
    /// Deliveries tried so far.
    pub attempts: u32,
}

/// The directory of refused samples.
#[derive(Debug, Clone)]
pub struct Rejected {
    dir: PathBuf,
}

/// The area, locked for one operation.
pub struct Locked<'a> {
    dir: &'a Path,
    _lock: nix::fcntl::Flock<File>,
}

impl Rejected {
    /// Creates the directory if needed, and removes what a writer killed half-way left (its
    /// temporary files), under the area's lock.
    pub fn open(dir: &Path) -> Result<Rejected, Error> {
        fsutil::ensure_dir(dir, 0o700, None)?;
        let area = Rejected {
            dir: dir.to_path_buf(),
        };
        if let Ok(_locked) = area.lock() {
            super::remove_temporary_files(dir);
        }
        Ok(area)
    }

    /// The area as it is, without creating it (for `pemworker spool status`).
    pub fn at(dir: &Path) -> Rejected {
        Rejected {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits for the area's lock (held by others for one short operation only).
    pub fn lock(&self) -> Result<Locked<'_>, Error> {
        let path = self.dir.join(".lock");
        // Read-only, so the area can be locked (and read) on a read-only file system.
        let file = super::lock::open_for_lock(&path).map_err(|source| Error::Lock {
            path: path.clone(),
            source,
        })?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, e)| Error::Lock {
                path,
                source: e.into(),
            },
        )?;
        Ok(Locked {
            dir: &self.dir,
            _lock: lock,
        })
    }

    /// (number, size in bytes) of every refused sample, oldest first, read without the lock (a
    /// concurrent change may hide one).
    pub fn list(&self) -> Result<Vec<(u64, u64)>, Error> {
        list(&self.dir)
    }

    /// Every refused sample with its number, oldest first, read without the lock (a concurrent
    /// change may hide one).
    pub fn read_all(&self) -> Vec<(u64, RejectedSample)> {
        list(&self.dir)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(seq, _)| Some((seq, read(&self.dir, seq).ok()?)))
            .collect()
    }
}

/// The same sample: the same probe, time and rows (by their delivery keys).
pub(crate) fn same_sample(a: &Sample, b: &Sample) -> bool {
    a.probe == b.probe
        && a.collected_at == b.collected_at
        && a.server_id == b.server_id
        && a.pgbouncer == b.pgbouncer
        && a.rows.len() == b.rows.len()
        && a.rows.iter().zip(&b.rows).all(|(x, y)| x.0 == y.0)
}

fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SUFFIX}"))
}

fn list(dir: &Path) -> Result<Vec<(u64, u64)>, Error> {
    let mut v = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(fsutil::Error::io("read directory", dir)(e).into()),
    };
    for e in entries {
        let e = e.map_err(fsutil::Error::io("read directory", dir))?;
        if let Some(seq) = entry_seq(&e.file_name().to_string_lossy()) {
            v.push((seq, e.metadata().map(|m| m.len()).unwrap_or(0)));
        }
    }
    v.sort();
    Ok(v)
}

fn read(dir: &Path, seq: u64) -> Result<RejectedSample, Error> {
    let p = path(dir, seq);
    let data = std::fs::read(&p).map_err(fsutil::Error::io("read", &p))?;
    Ok(serde_json::from_slice(&data)?)
}

impl Locked<'_> {
    /// (number, size in bytes) of every refused sample, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, u64)>, Error> {
        list(self.dir)
    }

    pub fn read(&self, seq: u64) -> Result<RejectedSample, Error> {
        read(self.dir, seq)
    }

    /// Keeps refused samples durably, numbered after the newest one. A sample already kept (the
    /// same delivery keys: its batch was delivered again after a crash between keeping it and
    /// removing the batch) is not kept twice. Returns how many were added.
    pub fn add(&mut self, samples: &[RejectedSample]) -> Result<usize, Error> {
        let kept = self.list()?;
        let first = kept.last().map_or(1, |(s, _)| s + 1);
        let known: Vec<Sample> = kept
            .iter()
            .filter_map(|(seq, _)| self.read(*seq).ok().map(|r| r.sample))
            .collect();
        let new: Vec<&RejectedSample> = samples
            .iter()
            .filter(|r| !known.iter().any(|k| same_sample(k, &r.sample)))
            .collect();
        for (seq, r) in (first..).zip(&new) {
            self.write(seq, r)?;
        }
        Ok(new.len())
    }

    /// Replaces a refused sample's record (after another refusal).
    pub fn write(&mut self, seq: u64, r: &RejectedSample) -> Result<(), Error> {
        let data = serde_json::to_vec(r)?;
        Staged::write(&path(self.dir, seq), &data, 0o600, None)?.commit()?;
        Ok(())
    }

    pub fn remove(&mut self, seq: u64) {
        let _ = std::fs::remove_file(path(self.dir, seq));
    }
}
