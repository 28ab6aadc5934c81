//! One worker per state directory, and a state directory per agent.
//!
//! A worker holds an OS lock (`flock`) on `<state_dir>/lock` for as long as it runs, with its
//! pid written in the file; a second worker on the same directory is refused with the holder's
//! pid. The kernel releases the lock when the process ends, however it ends.
//!
//! Without `state_dir` in agent.cfg each agent gets `<base>/agent<ID>`, so several agents on
//! one host never share a spool. Earlier versions kept one spool directly in `<base>`; the
//! first agent to start with the default moves it into its own directory.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::{Error, SUFFIX, entry_seq};
use crate::fsutil;

/// The lock of a state directory, held until dropped.
#[derive(Debug)]
pub struct StateLock {
    dir: PathBuf,
    /// Held for the lock it carries.
    _file: Flock<File>,
}

impl StateLock {
    /// Creates `dir` (0700) if needed and locks it, or says who holds it.
    ///
    /// The lock is held on a descriptor open for reading only, and the pid is written through
    /// another one closed at once: a worker keeps nothing open for writing in its state
    /// directory between writes, so the file system can be remounted read-only under it.
    pub fn acquire(dir: &Path) -> Result<StateLock, Error> {
        fsutil::ensure_dir(dir, 0o700, None)?;
        let path = dir.join("lock");
        let file = open_for_lock(&path).map_err(|source| Error::Lock {
            path: path.clone(),
            source,
        })?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(Error::Locked {
                    dir: dir.to_path_buf(),
                    pid: read_pid(&mut f),
                });
            }
            Err((_, e)) => {
                return Err(Error::Lock {
                    path,
                    source: e.into(),
                });
            }
        };
        write_pid(&path);
        Ok(StateLock {
            dir: dir.to_path_buf(),
            _file: file,
        })
    }

    /// Writes this process's pid again (after detaching into the background, which forks).
    pub fn record_pid(&mut self) {
        write_pid(&self.dir.join("lock"));
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Opens (creating, 0600, never through a link) a lock file for reading; on a read-only file
/// system an existing one opens all the same.
pub(crate) fn open_for_lock(path: &Path) -> std::io::Result<File> {
    let read_only = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
    };
    match read_only() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(path);
            match created {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            read_only()
        }
        r => r,
    }
}

/// Writes the pid in place, then cuts what an earlier, longer pid left: the file is never
/// emptied first, so a full disk cannot leave it without a pid. Best effort.
fn write_pid(path: &Path) {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
    else {
        return;
    };
    let line = format!("{}\n", std::process::id());
    if f.write_all(line.as_bytes()).is_ok() {
        let _ = f.set_len(line.len() as u64);
    }
}

fn read_pid(f: &mut File) -> Option<i32> {
    let mut s = String::new();
    f.rewind().ok()?;
    f.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The pid of the worker running on `dir`, if one is (for `pemworker spool status`; never
/// takes the lock, so a worker starting meanwhile is not disturbed).
pub fn holder(dir: &Path) -> Option<i32> {
    let mut f = File::open(dir.join("lock")).ok()?;
    let pid = read_pid(&mut f)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).ok()?;
    // A pid reused by another program is not a worker.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    comm.trim().starts_with("pemworker").then_some(pid)
}

/// Moves the spool an earlier version kept in the shared `base` directory into `dir` (this
/// agent's default state directory), under a lock on `base` so agents starting together move it
/// once. Returns the number of batches moved.
pub fn adopt_shared_spool(base: &Path, dir: &Path) -> Result<usize, Error> {
    let legacy = base.join("spool");
    if !legacy.is_dir() {
        return Ok(0);
    }
    let base_file = File::open(base).map_err(fsutil::Error::io("open", base))?;
    let _lock = Flock::lock(base_file, FlockArg::LockExclusive).map_err(|(_, e)| Error::Lock {
        path: base.to_path_buf(),
        source: e.into(),
    })?;
    if !legacy.is_dir() {
        return Ok(0);
    }
    let target = dir.join("spool");
    fsutil::ensure_dir(&target, 0o700, None)?;
    let mut next = std::fs::read_dir(&target)
        .map_err(fsutil::Error::io("read directory", &target))?
        .filter_map(|e| entry_seq(&e.ok()?.file_name().to_string_lossy()))
        .max()
        .map_or(1, |s| s + 1);
    let mut names: Vec<(u64, PathBuf, String)> = Vec::new();
    for e in std::fs::read_dir(&legacy).map_err(fsutil::Error::io("read directory", &legacy))? {
        let e = e.map_err(fsutil::Error::io("read directory", &legacy))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let seq = name
            .split_once('.')
            .and_then(|(n, _)| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            names.push((seq, e.path(), name));
        }
    }
    names.sort();
    let mut moved = 0;
    for (_, from, name) in names {
        // Batches keep their order after this agent's own; files set aside keep their kind.
        let suffix = name.split_once('.').map_or("", |(_, s)| s);
        let to = target.join(format!("{next:020}.{suffix}"));
        std::fs::rename(&from, &to).map_err(fsutil::Error::io("move", &from))?;
        if format!(".{suffix}") == SUFFIX {
            moved += 1;
        }
        next += 1;
    }
    if let Ok(d) = File::open(&target) {
        let _ = d.sync_all();
    }
    // Anything else there (temporary files of a crash) stays for inspection.
    let _ = std::fs::remove_dir(&legacy);
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(d.path()).unwrap();
        let err = StateLock::acquire(d.path()).unwrap_err();
        assert!(
            matches!(err, Error::Locked { pid: Some(p), .. } if p == std::process::id() as i32),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("is in use by another worker (pid"), "{msg}");
        assert!(!msg.contains('\n'));
        drop(first);
        StateLock::acquire(d.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn a_shared_spool_moves_into_the_agents_directory_after_its_own_batches() {
        let base = tempfile::tempdir().unwrap();
        let legacy = base.path().join("spool");
        std::fs::create_dir(&legacy).unwrap();
        std::fs::write(legacy.join("00000000000000000001.json"), "[1]").unwrap();
        std::fs::write(legacy.join("00000000000000000002.rejected"), "[2]").unwrap();
        let mine = base.path().join("agent7");
        std::fs::create_dir_all(mine.join("spool")).unwrap();
        std::fs::write(mine.join("spool/00000000000000000005.json"), "[5]").unwrap();
        assert_eq!(adopt_shared_spool(base.path(), &mine).unwrap(), 1);
        assert!(!legacy.exists());
        let read = |n: &str| std::fs::read_to_string(mine.join("spool").join(n)).unwrap();
        assert_eq!(read("00000000000000000006.json"), "[1]");
        assert_eq!(read("00000000000000000007.rejected"), "[2]");
        assert_eq!(adopt_shared_spool(base.path(), &mine).unwrap(), 0);
    }
}
