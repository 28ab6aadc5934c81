//! Files we manage: written atomically (a temporary file, then rename), never overwritten without
//! a timestamped backup, with the owner and mode they must have, and safe to write as root.
//!
//! Root writes into directories other users may control (pgBouncer's directory given to its
//! service user, the PEM server's data directory owned by postgres, shared temporary
//! directories), so nothing here trusts a name it did not create itself:
//!
//! - temporary files get unpredictable names and are created exclusively (`tempfile`: O_EXCL,
//!   which never follows a link); their owner and mode are set on the open file (fchown, fchmod)
//!   before any content is written; they are renamed over the target, which replaces a link
//!   planted there instead of following it;
//! - backups are created exclusively under a fresh name and read from a regular file opened
//!   without following links;
//! - as root, every directory on the way to a written file must be one that only root or the
//!   file's future owner can change ([`check_dir`]); otherwise the write is refused with one line
//!   saying which directory and how to fix it;
//! - a directory is given a mode and an owner only when this code created it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

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
    /// Writing here would let another user redirect or replace what root writes.
    #[error("refusing to write {} as root: {why}", path.display())]
    Unsafe { path: PathBuf, why: String },
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
        Owner {
            name: user_name(uid),
            uid,
            gid: Gid::current(),
        }
    }

    /// Gives the open file `f` (at `path`, for messages) to this owner.
    fn apply(&self, f: &File, path: &Path) -> Result<(), Error> {
        // Only root may give files away; for anyone else the files are already theirs.
        if Uid::effective().is_root() || self.uid != Uid::effective() {
            std::os::unix::fs::fchown(f, Some(self.uid.as_raw()), Some(self.gid.as_raw()))
                .map_err(Error::io("set the owner of", path))?;
        }
        Ok(())
    }
}

fn user_name(uid: Uid) -> String {
    User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid {uid}"))
}

fn group_name(gid: Gid) -> String {
    Group::from_gid(gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| format!("gid {gid}"))
}

/// Who may control the directories root writes into: root itself, the user running this
/// program, and the user the written files are for.
struct Trust {
    uids: Vec<Uid>,
}

/// Groups below this id are system groups that ordinary accounts do not join (Debian and Red
/// Hat both start user groups at 1000); a directory writable by one of them (such as Ubuntu's
/// `syslog` on /var/log) is not treated as open to other users.
const FIRST_USER_GID: u32 = 1000;

impl Trust {
    /// `None` when not running as root: the checks protect root, whose writes others could
    /// redirect; an ordinary user can only harm what it could write anyway.
    fn for_owner(owner: Option<Uid>) -> Option<Trust> {
        if !Uid::effective().is_root() {
            return None;
        }
        let mut uids = vec![Uid::from_raw(0), Uid::effective()];
        uids.extend(owner);
        Some(Trust { uids })
    }

    fn owns(&self, m: &fs::Metadata) -> bool {
        self.uids.contains(&Uid::from_raw(m.uid()))
    }

    /// Why the directory's owner is someone else, if it is.
    fn foreign(&self, m: &fs::Metadata) -> Option<String> {
        (!self.owns(m)).then(|| format!("belongs to {}", user_name(Uid::from_raw(m.uid()))))
    }

    /// Why users other than its owner may add, remove or rename its entries, if they may.
    fn open(&self, m: &fs::Metadata) -> Option<String> {
        let mode = m.mode();
        if mode & 0o002 != 0 {
            return Some(format!(
                "is writable by every user (mode {:04o})",
                mode & 0o7777
            ));
        }
        if mode & 0o020 != 0 && m.gid() >= FIRST_USER_GID {
            return Some(format!(
                "is writable by group {} (mode {:04o})",
                group_name(Gid::from_raw(m.gid())),
                mode & 0o7777
            ));
        }
        None
    }

    /// Why another user could change this directory's entries, if one could.
    fn writable_by_others(&self, m: &fs::Metadata) -> Option<String> {
        self.foreign(m).or_else(|| self.open(m))
    }
}

fn absolute(p: &Path) -> Result<PathBuf, Error> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        let cwd = std::env::current_dir().map_err(Error::io("resolve", p))?;
        Ok(cwd.join(p))
    }
}

fn components(p: &Path) -> impl Iterator<Item = OsString> + '_ {
    p.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        _ => None,
    })
}

/// The result of walking a directory path: the deepest existing directory (with links
/// resolved) and the components below it that do not exist yet.
struct Walked {
    existing: PathBuf,
    missing: Vec<OsString>,
}

/// Walks `dir` from `/`, one component at a time, without trusting anything another user could
/// have changed. Every directory passed through must be controlled by `trust`, or be a sticky
/// shared directory (like /tmp) whose next entry is; a symbolic link is followed only if a
/// trusted user owns it. `file` names what is being written, for messages.
fn walk(dir: &Path, trust: &Trust, file: &Path) -> Result<Walked, Error> {
    let unsafe_ = |why: String| Error::Unsafe {
        path: file.to_path_buf(),
        why,
    };
    let lstat = |p: &Path| fs::symlink_metadata(p);
    let mut resolved = PathBuf::from("/");
    let mut here = lstat(&resolved).map_err(Error::io("read", Path::new("/")))?;
    let mut queue: VecDeque<OsString> = components(&absolute(dir)?).collect();
    let mut links = 0;
    while let Some(c) = queue.pop_front() {
        if c == ".." {
            resolved.pop();
            here = lstat(&resolved).map_err(Error::io("read", &resolved))?;
            continue;
        }
        if let Some(why) = trust.foreign(&here) {
            return Err(unsafe_(format!(
                "directory {} {why}, who could redirect this write; use a path only root{} controls",
                resolved.display(),
                owner_hint(trust)
            )));
        }
        // Entries of a directory others may write to are trusted only if a trusted user owns
        // them and the sticky bit keeps others from renaming them (/tmp).
        let shared = trust.open(&here);
        if let Some(why) = &shared {
            if here.mode() & 0o1000 == 0 {
                return Err(unsafe_(format!(
                    "directory {} {why}, so another user could redirect this write; run chmod o-w,g-w {} or use another path",
                    resolved.display(),
                    resolved.display()
                )));
            }
        }
        let next = resolved.join(&c);
        let meta = match lstat(&next) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut missing = vec![c];
                missing.extend(queue);
                return Ok(Walked {
                    existing: resolved,
                    missing,
                });
            }
            Err(e) => return Err(Error::io("read", &next)(e)),
        };
        if shared.is_some() && !trust.owns(&meta) {
            return Err(unsafe_(format!(
                "{} belongs to {} in the shared directory {}; use a path only root{} controls",
                next.display(),
                user_name(Uid::from_raw(meta.uid())),
                resolved.display(),
                owner_hint(trust)
            )));
        }
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return Err(unsafe_(format!(
                    "too many symbolic links under {}",
                    dir.display()
                )));
            }
            if !trust.owns(&meta) {
                return Err(unsafe_(format!(
                    "{} is a symbolic link owned by {}, and root does not follow links other users control; give the real path",
                    next.display(),
                    user_name(Uid::from_raw(meta.uid()))
                )));
            }
            let target = fs::read_link(&next).map_err(Error::io("read the link", &next))?;
            if target.is_absolute() {
                resolved = PathBuf::from("/");
                here = lstat(&resolved).map_err(Error::io("read", Path::new("/")))?;
            }
            for (i, t) in components(&target).enumerate() {
                queue.insert(i, t);
            }
            continue;
        }
        if !meta.is_dir() {
            return Err(Error::Io {
                what: "use the directory",
                path: next,
                source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
            });
        }
        resolved = next;
        here = meta;
    }
    // Files are written in this one itself, so the sticky bit is no protection here.
    if let Some(why) = trust.writable_by_others(&here) {
        return Err(unsafe_(format!(
            "directory {} {}, so another user could replace or redirect what root writes there; use a directory only root{} can change, or run chmod o-w,g-w {}",
            resolved.display(),
            why,
            owner_hint(trust),
            resolved.display()
        )));
    }
    Ok(Walked {
        existing: resolved,
        missing: Vec::new(),
    })
}

fn owner_hint(trust: &Trust) -> String {
    match trust.uids.iter().find(|u| !u.is_root()) {
        Some(u) => format!(" or {}", user_name(*u)),
        None => String::new(),
    }
}

/// As root, checks that `dir` exists and that only root (and `owner`, who the files are for) can
/// change it or any directory on the way to it; a no-op for other users. `file` names what is
/// about to be written, for the message.
pub fn check_dir(dir: &Path, owner: Option<Uid>, file: &Path) -> Result<(), Error> {
    let Some(trust) = Trust::for_owner(owner) else {
        return Ok(());
    };
    let w = walk(dir, &trust, file)?;
    if let Some(first) = w.missing.first() {
        return Err(Error::Io {
            what: "use the directory",
            path: w.existing.join(first),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Ok(())
}

/// `YYYYMMDDTHHMMSS` in local time, for backup names.
pub fn timestamp() -> String {
    chrono::Local::now().format("%Y%m%dT%H%M%S").to_string()
}

/// Opens `path` for reading as the regular file it must be: never through a symbolic link (or a
/// FIFO that would block), and, as root, never a file with other names (a hard link planted by
/// another user).
fn open_regular(path: &Path) -> Result<(File, fs::Metadata), Error> {
    let meta = fs::symlink_metadata(path).map_err(Error::io("read", path))?;
    let refuse = |what: &str| Error::Unsafe {
        path: path.to_path_buf(),
        why: format!(
            "{} is {what}, not a regular file; replace it with the real file",
            path.display()
        ),
    };
    if meta.file_type().is_symlink() {
        return Err(refuse("a symbolic link"));
    }
    if !meta.is_file() {
        return Err(refuse("a special file"));
    }
    if Uid::effective().is_root() && meta.nlink() > 1 {
        return Err(refuse(&format!("linked under {} names", meta.nlink())));
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags::O_NOFOLLOW | libc_flags::O_NONBLOCK)
        .open(path)
        .map_err(Error::io("read", path))?;
    let opened = f.metadata().map_err(Error::io("read", path))?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Err(refuse("changing while it is read"));
    }
    Ok((f, opened))
}

/// The open(2) flags std does not name.
mod libc_flags {
    pub const O_NOFOLLOW: i32 = nix::fcntl::OFlag::O_NOFOLLOW.bits();
    pub const O_NONBLOCK: i32 = nix::fcntl::OFlag::O_NONBLOCK.bits();
}

/// Copies `path` to `<path>.<timestamp>.bak` (a numbered suffix if that name is taken), created
/// exclusively, with the original's mode and owner, and returns the backup's path. The original
/// must be a regular file; a symbolic link is refused, not followed.
pub fn backup(path: &Path) -> Result<PathBuf, Error> {
    let (mut src, meta) = open_regular(path)?;
    if let Some(dir) = path.parent() {
        check_dir(dir, Some(Uid::from_raw(meta.uid())), path)?;
    }
    let stamp = timestamp();
    let mut n = 0;
    let (target, mut dst) = loop {
        let suffix = if n == 0 {
            format!("{stamp}.bak")
        } else {
            format!("{stamp}.{n}.bak")
        };
        let mut name = path.as_os_str().to_owned();
        name.push(".");
        name.push(suffix);
        let candidate = PathBuf::from(name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc_flags::O_NOFOLLOW)
            .open(&candidate)
        {
            Ok(f) => break (candidate, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(Error::io("back up", path)(e)),
        }
    };
    let result = (|| {
        if Uid::effective().is_root() {
            std::os::unix::fs::fchown(&dst, Some(meta.uid()), Some(meta.gid()))
                .map_err(Error::io("set the owner of", &target))?;
        }
        dst.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o777))
            .map_err(Error::io("set the mode of", &target))?;
        std::io::copy(&mut src, &mut dst).map_err(Error::io("back up", path))?;
        dst.sync_all().map_err(Error::io("back up", path))
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&target);
        return Err(e);
    }
    Ok(target)
}

/// Backs up every file of `paths` ([`backup`]), or none: each is checked to be a regular file
/// first, and the backups made are removed again if a later one fails.
pub fn backup_all<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<PathBuf>, Error> {
    for p in paths {
        open_regular(p.as_ref())?;
    }
    let mut made = Vec::new();
    for p in paths {
        match backup(p.as_ref()) {
            Ok(b) => made.push(b),
            Err(e) => {
                for b in &made {
                    let _ = fs::remove_file(b);
                }
                return Err(e);
            }
        }
    }
    Ok(made)
}

/// Reads a file that must be a regular file (never through a link), as [`backup`] does.
pub fn read_regular(path: &Path) -> Result<Vec<u8>, Error> {
    let (mut f, _) = open_regular(path)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(Error::io("read", path))?;
    Ok(data)
}

/// Makes sure `dir` exists. Missing directories are created: the last one with `mode` and
/// `owner`, the ones above it with 0755 and this program's user. An existing directory keeps its
/// mode and owner. Returns the directories created, top first (callers remove them again when
/// what they were for fails).
pub fn ensure_dir(dir: &Path, mode: u32, owner: Option<&Owner>) -> Result<Vec<PathBuf>, Error> {
    let trust = Trust::for_owner(owner.map(|o| o.uid));
    let (existing, missing) = match &trust {
        Some(t) => {
            let w = walk(dir, t, dir)?;
            (w.existing, w.missing)
        }
        None => {
            let abs = absolute(dir)?;
            let mut existing = abs.clone();
            let mut missing = Vec::new();
            while fs::symlink_metadata(&existing).is_err() {
                match existing.file_name() {
                    Some(n) => missing.insert(0, n.to_os_string()),
                    None => break,
                }
                existing.pop();
            }
            (existing, missing)
        }
    };
    let mut created = Vec::new();
    let mut path = existing;
    for (i, c) in missing.iter().enumerate() {
        if c == ".." {
            path.pop();
            continue;
        }
        path.push(c);
        let leaf = i + 1 == missing.len();
        let m = if leaf { mode } else { 0o755 };
        match fs::DirBuilder::new().mode(m).create(&path) {
            Ok(()) => {}
            // Someone else (a concurrent registration) made it meanwhile: it is not ours, and
            // the walk below decides whether it may be used.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("create directory", &path)(e)),
        }
        created.push(path.clone());
        // The mode asked for, whatever the umask; set on the open directory.
        let d = File::open(&path).map_err(Error::io("create directory", &path))?;
        d.set_permissions(fs::Permissions::from_mode(m))
            .map_err(Error::io("set the mode of", &path))?;
        if leaf {
            if let Some(o) = owner {
                o.apply(&d, &path)?;
            }
        }
    }
    if let Some(t) = &trust {
        // Whatever was created by others meanwhile, and the final directory itself.
        let w = walk(dir, t, dir)?;
        if !w.missing.is_empty() {
            return Err(Error::Io {
                what: "create directory",
                path: dir.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
    }
    Ok(created)
}

/// A file written under a temporary name next to its target, not yet visible.
#[derive(Debug)]
pub struct Staged {
    tmp: Option<tempfile::NamedTempFile>,
    target: PathBuf,
}

impl Staged {
    /// The temporary file beside `target`, created with `mode` and `owner` and empty. See the
    /// module documentation for why this is safe in directories others control.
    fn create(target: &Path, mode: u32, owner: Option<&Owner>) -> Result<Staged, Error> {
        let dir = parent(target);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::Io {
                what: "write",
                path: target.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })?;
        check_dir(dir, owner.map(|o| o.uid), target)?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(Error::io("write", target))?;
        let f = tmp.as_file();
        // Owner and mode are settled before any content exists, so no secret is ever readable
        // by anyone else, and they are set on this file, not on whatever a name points to.
        if let Some(o) = owner {
            o.apply(f, target)?;
        }
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(Error::io("set the mode of", target))?;
        Ok(Staged {
            tmp: Some(tmp),
            target: target.to_path_buf(),
        })
    }

    /// Writes `contents` to a new temporary file beside `target` with `mode` and `owner`. It
    /// reaches the disk when committed (a file that is never committed is never synced).
    pub fn write(
        target: &Path,
        contents: &[u8],
        mode: u32,
        owner: Option<&Owner>,
    ) -> Result<Staged, Error> {
        let staged = Staged::create(target, mode, owner)?;
        if let Some(tmp) = &staged.tmp {
            tmp.as_file()
                .write_all(contents)
                .map_err(Error::io("write", target))?;
        }
        Ok(staged)
    }

    /// Shows that `target` could be written as [`Staged::write`] would (the directory passes the
    /// checks and takes a new file), leaving nothing behind and syncing nothing.
    pub fn check(target: &Path, mode: u32, owner: Option<&Owner>) -> Result<(), Error> {
        Staged::create(target, mode, owner).map(drop)
    }

    /// Syncs the file, moves it into place (atomic on one file system) and syncs the directory,
    /// so the new name survives a crash. A link planted at the target's name is replaced, never
    /// followed.
    pub fn commit(self) -> Result<(), Error> {
        commit_all(vec![self])
    }
}

/// The directory a path lies in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Commits several staged files together: every file is synced first, then each is moved into
/// place in order, then each directory they went to is synced once. Stops at the first failure;
/// the files committed before it stay in place.
pub fn commit_all(staged: Vec<Staged>) -> Result<(), Error> {
    for s in &staged {
        if let Some(tmp) = &s.tmp {
            tmp.as_file()
                .sync_all()
                .map_err(Error::io("write", &s.target))?;
        }
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for mut s in staged {
        let Some(tmp) = s.tmp.take() else {
            continue;
        };
        tmp.persist(&s.target)
            .map_err(|e| Error::io("replace", &s.target)(e.error))?;
        let dir = parent(&s.target).to_path_buf();
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    for d in dirs {
        // Best effort: the file is in place either way; some file systems cannot sync a
        // directory.
        if let Ok(d) = File::open(&d) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_leaves_nothing_and_files_committed_together_are_all_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        Staged::check(&dir.path().join("a.txt"), 0o600, None).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "only sub/");
        let staged = vec![
            Staged::write(&dir.path().join("a.txt"), b"a", 0o600, None).unwrap(),
            Staged::write(&sub.join("b.txt"), b"b", 0o644, None).unwrap(),
            Staged::write(&dir.path().join("c.txt"), b"c", 0o640, None).unwrap(),
        ];
        assert!(!dir.path().join("a.txt").exists());
        commit_all(staged).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("a.txt")).unwrap(), "a");
        assert_eq!(fs::read_to_string(sub.join("b.txt")).unwrap(), "b");
        assert_eq!(
            fs::metadata(dir.path().join("c.txt"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o640
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            3,
            "no temporary file left"
        );
    }

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
        Staged::write(&target, b"two", 0o640, None)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "two");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    #[test]
    fn backup_keeps_old_content_and_never_clobbers_another_backup() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("b.cfg");
        fs::write(&target, "old").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();
        let b1 = backup(&target).unwrap();
        let b2 = backup(&target).unwrap();
        assert_ne!(b1, b2);
        assert_eq!(fs::read_to_string(&b1).unwrap(), "old");
        assert_eq!(fs::read_to_string(&b2).unwrap(), "old");
        assert_eq!(fs::metadata(&b1).unwrap().mode() & 0o777, 0o640);
    }

    #[test]
    fn a_planted_link_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let target = dir.path().join("t.cfg");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        // A backup through the link is refused ...
        let err = backup(&target).unwrap_err().to_string();
        assert!(err.contains("is a symbolic link"), "{err}");
        // ... and a write replaces the link itself.
        Staged::write(&target, b"new", 0o600, None)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(fs::symlink_metadata(&target).unwrap().is_file());
    }

    #[test]
    fn a_planted_backup_name_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let target = dir.path().join("c.cfg");
        fs::write(&target, "old").unwrap();
        let stamp = timestamp();
        for name in [format!("c.cfg.{stamp}.bak"), format!("c.cfg.{stamp}.1.bak")] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        let b = backup(&target).unwrap();
        // The clock may have moved on to the next second: either way a fresh name was used.
        assert!(fs::symlink_metadata(&b).unwrap().is_file());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn an_existing_directory_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        let created = ensure_dir(&shared, 0o700, None).unwrap();
        assert!(created.is_empty());
        assert_eq!(fs::metadata(&shared).unwrap().mode() & 0o7777, 0o755);
        let deep = shared.join("a/b");
        let created = ensure_dir(&deep, 0o700, None).unwrap();
        assert_eq!(created, vec![shared.join("a"), deep.clone()]);
        assert_eq!(fs::metadata(&deep).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            fs::metadata(shared.join("a")).unwrap().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn as_root_a_directory_others_can_write_is_refused() {
        if !Uid::effective().is_root() {
            return; // the check protects root only
        }
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Staged::write(&open.join("f"), b"x", 0o600, None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("refusing to write"), "{err}");
        assert!(err.contains("writable by every user"), "{err}");
        assert_eq!(fs::read_dir(&open).unwrap().count(), 0);
        // A directory another user owns is refused unless the file is for that user.
        let theirs = dir.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        let nobody = Owner::lookup("nobody").unwrap();
        std::os::unix::fs::chown(&theirs, Some(nobody.uid.as_raw()), None).unwrap();
        let err = Staged::write(&theirs.join("f"), b"x", 0o600, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to nobody"), "{err}");
        Staged::write(&theirs.join("f"), b"x", 0o600, Some(&nobody))
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(
            fs::metadata(theirs.join("f")).unwrap().uid(),
            nobody.uid.as_raw()
        );
    }
}
