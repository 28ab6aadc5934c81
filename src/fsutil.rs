//! Files we manage: written atomically (temporary name, then rename), never overwritten without
//! a timestamped backup, with the owner and mode they must have.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} already exists; rerun with {flag} to replace it (a backup is kept)", path.display())]
    Exists { path: PathBuf, flag: &'static str },
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "unknown operating system user {0:?}: create it or pass the user that runs the service"
    )]
    UnknownUser(String),
}

impl Error {
    pub fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
        move |source| Error::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An operating-system user that must own files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

impl Owner {
    pub fn lookup(name: &str) -> Result<Owner, Error> {
        match User::from_name(name) {
            Ok(Some(u)) => Ok(Owner {
                name: u.name,
                uid: u.uid,
                gid: u.gid,
            }),
            _ => Err(Error::UnknownUser(name.to_string())),
        }
    }

    pub fn current() -> Owner {
        let uid = Uid::current();
        let name = User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        Owner {
            name,
            uid,
            gid: Gid::current(),
        }
    }

    fn apply(&self, path: &Path) -> Result<(), Error> {
        // Only root may give files away; for anyone else the files are already theirs.
        if Uid::effective().is_root() || self.uid != Uid::effective() {
            nix::unistd::chown(path, Some(self.uid), Some(self.gid))
                .map_err(|e| Error::io("set the owner of", path)(e.into()))?;
        }
        Ok(())
    }
}

/// `YYYYMMDDTHHMMSS` in local time, for backup names.
pub fn timestamp() -> String {
    chrono::Local::now().format("%Y%m%dT%H%M%S").to_string()
}

/// Copies `path` to `<path>.<timestamp>.bak` (a numbered suffix if that exists), keeping its
/// mode and owner, and returns the backup's path.
pub fn backup(path: &Path) -> Result<PathBuf, Error> {
    let stamp = timestamp();
    let mut n = 0;
    let target = loop {
        let suffix = if n == 0 {
            format!("{stamp}.bak")
        } else {
            format!("{stamp}.{n}.bak")
        };
        let mut name = path.as_os_str().to_owned();
        name.push(".");
        name.push(suffix);
        let candidate = PathBuf::from(name);
        if !candidate.exists() {
            break candidate;
        }
        n += 1;
    };
    let meta = fs::metadata(path).map_err(Error::io("read", path))?;
    fs::copy(path, &target).map_err(Error::io("back up", path))?;
    let _ = nix::unistd::chown(
        &target,
        Some(Uid::from_raw(meta.uid())),
        Some(Gid::from_raw(meta.gid())),
    );
    Ok(target)
}

/// Creates `dir` (and parents) if needed, then gives it `mode` and `owner`.
pub fn ensure_dir(dir: &Path, mode: u32, owner: Option<&Owner>) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(Error::io("set the mode of", dir))?;
    if let Some(o) = owner {
        o.apply(dir)?;
    }
    Ok(())
}

/// A file written under a temporary name next to its target, not yet visible.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    target: PathBuf,
}

impl Staged {
    /// Writes `contents` to a temporary file beside `target` with `mode` and `owner`, synced.
    pub fn write(
        target: &Path,
        contents: &[u8],
        mode: u32,
        owner: Option<&Owner>,
    ) -> Result<Staged, Error> {
        let dir = target.parent().unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let staged = Staged {
            tmp,
            target: target.to_path_buf(),
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&staged.tmp)
            .map_err(Error::io("write", target))?;
        // The mode is set before any content exists, so no secret is ever readable by others.
        fs::set_permissions(&staged.tmp, fs::Permissions::from_mode(mode))
            .map_err(Error::io("set the mode of", target))?;
        if let Some(o) = owner {
            o.apply(&staged.tmp)?;
        }
        f.write_all(contents).map_err(Error::io("write", target))?;
        f.sync_all().map_err(Error::io("write", target))?;
        Ok(staged)
    }

    /// Moves the file into place (atomic on one file system).
    pub fn commit(mut self) -> Result<(), Error> {
        let tmp = std::mem::take(&mut self.tmp);
        fs::rename(&tmp, &self.target).map_err(Error::io("replace", &self.target))?;
        if let Some(dir) = self.target.parent() {
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_file_is_invisible_until_commit_and_gone_if_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.txt");
        let s = Staged::write(&target, b"one", 0o600, None).unwrap();
        assert!(!target.exists());
        drop(s);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temporary file left behind"
        );
        Staged::write(&target, b"two", 0o600, None)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "two");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn backup_keeps_old_content_and_never_clobbers_another_backup() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("b.cfg");
        fs::write(&target, "old").unwrap();
        let b1 = backup(&target).unwrap();
        let b2 = backup(&target).unwrap();
        assert_ne!(b1, b2);
        assert_eq!(fs::read_to_string(&b1).unwrap(), "old");
        assert_eq!(fs::read_to_string(&b2).unwrap(), "old");
    }
}
