//! Root writes into directories other users control (pgBouncer's directory given to its service
//! user, the PEM server's data directory owned by postgres): links planted there by that user
//! change nothing outside the directory, and no owner or mode of anything we did not create.
//! Each attack runs against the real commands, with the legitimate flow checked in the same
//! test.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ADMIN_PASSWORD, TestBed, outcome};
use pemworker::fsutil::Owner;

/// What a file system tree looks like: per path, its kind, owner, mode and content (or link
/// target).
type Snapshot = BTreeMap<PathBuf, (char, u32, u32, u32, Vec<u8>)>;

fn snapshot(root: &Path, skip: &[&Path]) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        if skip.iter().any(|s| p == *s) {
            continue;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let (kind, content) = if m.file_type().is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            ('l', t.into_os_string().into_encoded_bytes())
        } else if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
            ('d', Vec::new())
        } else if m.is_file() {
            ('f', std::fs::read(&p).unwrap_or_default())
        } else {
            ('s', Vec::new())
        };
        out.insert(p, (kind, m.uid(), m.gid(), m.mode() & 0o7777, content));
    }
    out
}

/// Plants `name` in `dir` as a link to `target`, owned by `owner` as if that user had made it.
fn plant(dir: &Path, name: &str, target: &Path, owner: &Owner) {
    let link = dir.join(name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(target, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(owner.uid.as_raw()), Some(owner.gid.as_raw())).unwrap();
}

/// The names the old code would have used for `file`: its temporary name for the next few
/// hundred process ids, and its backup names for the next ten seconds.
fn plant_predictable_names(dir: &Path, file: &str, target: &Path, owner: &Owner) {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1);
    for pid in last + 1..last + 300 {
        plant(dir, &format!(".{file}.tmp-{pid}"), target, owner);
    }
    let now = chrono::Local::now();
    for s in 0..10 {
        let stamp = (now + chrono::Duration::seconds(s))
            .format("%Y%m%dT%H%M%S")
            .to_string();
        plant(dir, &format!("{file}.{stamp}.bak"), target, owner);
        for n in 1..4 {
            plant(dir, &format!("{file}.{stamp}.{n}.bak"), target, owner);
        }
    }
}

fn victims(dir: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join("victim.conf"), dir.join("victim.secret"));
    std::fs::write(&a, "root's file\n").unwrap();
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&b, "root's secret\n").unwrap();
    std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o600)).unwrap();
    (a, b)
}

fn configure(conf: &Path, owner: &str, force: bool) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pemworker"));
    c.args(["pooler", "configure", "--config-dir"])
        .arg(conf)
        .args(["--owner", owner])
        .args(["--client-tls-ca-file", "/etc/ssl/certs/ca.crt"])
        .args(["--client-tls-key-file", "/etc/ssl/private/server.key"])
        .args(["--client-tls-cert-file", "/etc/ssl/certs/server.crt"])
        .env("PEMWORKER_AUTH_USER_PASSWORD", "auth-secret-1")
        .env("PEMWORKER_ADMIN_USER_PASSWORD", "admin-secret-2")
        .env("PEMWORKER_STATS_USER_PASSWORD", "stats-secret-3");
    if force {
        c.arg("--force");
    }
    outcome(&c.output().unwrap())
}

fn root_only() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("these attacks are on root's writes; run the tests as root (as CI does)");
        return false;
    }
    true
}

#[test]
fn configure_for_nobody_ignores_links_nobody_planted() {
    if !root_only() {
        return;
    }
    let nobody = Owner::lookup("nobody").unwrap();
    let top = tempfile::Builder::new()
        .prefix("pemworker-attack-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (conf_victim, secret_victim) = victims(top.path());
    let conf = top.path().join("pgbouncer");

    // The legitimate flow: the directory is created for nobody, the files are nobody's 0600.
    let (code, out, err) = configure(&conf, "nobody", false);
    assert_eq!(code, 0, "{out}{err}");
    let dir_meta = std::fs::metadata(&conf).unwrap();
    assert_eq!(
        (dir_meta.uid(), dir_meta.mode() & 0o777),
        (nobody.uid.as_raw(), 0o700)
    );

    // nobody owns the directory, so it may plant anything in it: links at every name the old
    // code predicted, pointing at root's files.
    for f in ["pgbouncer.ini", "hba_file", "userlist.txt"] {
        plant_predictable_names(&conf, f, &secret_victim, &nobody);
    }
    plant(&conf, "pgbouncer.ini.bak", &conf_victim, &nobody);
    let outside = snapshot(top.path(), &[&conf]);
    let planted: Snapshot = snapshot(&conf, &[])
        .into_iter()
        .filter(|(_, v)| v.0 == 'l')
        .collect();

    let (code, out, err) = configure(&conf, "nobody", true);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        snapshot(top.path(), &[&conf]),
        outside,
        "something outside the directory changed"
    );
    let after = snapshot(&conf, &[]);
    for (p, v) in &planted {
        assert_eq!(
            after.get(p),
            Some(v),
            "planted link {} changed",
            p.display()
        );
    }
    for f in ["pgbouncer.ini", "hba_file", "userlist.txt"] {
        let (kind, uid, _, mode, content) = &after[&conf.join(f)];
        assert_eq!(
            (*kind, *uid, *mode),
            ('f', nobody.uid.as_raw(), 0o600),
            "{f}"
        );
        assert!(!content.is_empty(), "{f}");
    }
    // The backups are new regular files with the originals' owner and mode.
    let backups: Vec<_> = after
        .iter()
        .filter(|(p, v)| v.0 == 'f' && p.to_string_lossy().ends_with(".bak"))
        .collect();
    assert_eq!(backups.len(), 3, "{backups:#?}");
    for (p, (_, uid, _, mode, _)) in backups {
        assert_eq!(
            (*uid, *mode),
            (nobody.uid.as_raw(), 0o600),
            "{}",
            p.display()
        );
    }
    // The user list is the one this run wrote: the admin's SCRAM verifier (never the password).
    let userlist = std::fs::read_to_string(conf.join("userlist.txt")).unwrap();
    assert!(
        userlist.contains("\"pem_admin1\" \"SCRAM-SHA-256$")
            && !userlist.contains("admin-secret-2"),
        "{userlist}"
    );
    assert_eq!(
        std::fs::read_to_string(&secret_victim).unwrap(),
        "root's secret\n"
    );

    // nobody replaces one of the files by a link to root's secret: the run refuses in one line
    // and replaces nothing (a backup through the link would copy the secret for nobody).
    std::fs::remove_file(conf.join("userlist.txt")).unwrap();
    plant(&conf, "userlist.txt", &secret_victim, &nobody);
    let before = snapshot(top.path(), &[]);
    let (code, out, err) = configure(&conf, "nobody", true);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("userlist.txt is a symbolic link"), "{err}");
    assert_eq!(
        snapshot(top.path(), &[]),
        before,
        "the refused run changed files"
    );

    // A directory that belongs to someone else than the files' owner is refused as a whole.
    let (code, _, err) = configure(&conf, "root", true);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("belongs to nobody"), "{err}");
    assert_eq!(snapshot(top.path(), &[]), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_server_edits_pg_hba_in_the_postgres_directory_without_following_its_links() {
    if !root_only() {
        return;
    }
    let bed = TestBed::start();
    let Some(server_user) = bed.run_as.clone() else {
        return;
    };
    let postgres = Owner::lookup(&server_user).unwrap();
    let (conf_victim, secret_victim) = victims(&bed.root);
    let hba = bed.data_dir.join("pg_hba.conf");
    let hba_meta = std::fs::metadata(&hba).unwrap();

    // postgres owns the data directory; it plants links at the predictable names and takes our
    // lines out, so that the next run must write the file again.
    plant_predictable_names(&bed.data_dir, "pg_hba.conf", &secret_victim, &postgres);
    plant(&bed.data_dir, "pg_hba.conf.bak", &conf_victim, &postgres);
    let text = std::fs::read_to_string(&hba).unwrap();
    let end = text.find(pemworker::pooler::hba::END_MARK).unwrap();
    let stripped = text[end..].split_once('\n').unwrap().1.to_string();
    std::fs::write(&hba, &stripped).unwrap();
    let skip = [
        bed.data_dir.as_path(),
        bed.pgb_run_dir.as_path(),
        bed.pg_socket_dir.as_path(),
    ];
    let outside = snapshot(&bed.root, &skip);
    let planted: Snapshot = snapshot(&bed.data_dir, &[])
        .into_iter()
        .filter(|(_, v)| v.0 == 'l')
        .collect();

    let args = bed.prepare_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = outcome(&bed.pemworker(&args));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("inserted the pemworker lines"), "{out}");

    assert_eq!(
        snapshot(&bed.root, &skip),
        outside,
        "something outside the data directory changed"
    );
    let after = snapshot(&bed.data_dir, &[]);
    for (p, v) in &planted {
        assert_eq!(
            after.get(p),
            Some(v),
            "planted link {} changed",
            p.display()
        );
    }
    let m = std::fs::symlink_metadata(&hba).unwrap();
    assert!(m.is_file());
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (hba_meta.uid(), hba_meta.gid(), hba_meta.mode() & 0o7777),
        "pg_hba.conf's owner or mode changed"
    );
    let text = std::fs::read_to_string(&hba).unwrap();
    assert!(
        text.starts_with(pemworker::pooler::hba::BEGIN_MARK),
        "{text}"
    );
    let backup = after
        .iter()
        .find(|(p, v)| v.0 == 'f' && p.to_string_lossy().ends_with(".bak"))
        .expect("a backup of pg_hba.conf");
    assert_eq!(backup.1.4, stripped.as_bytes());
    assert_eq!(
        std::fs::read_to_string(&secret_victim).unwrap(),
        "root's secret\n"
    );

    // The server took the new file: pgBouncer's admin still logs in through it.
    bed.connect(&bed.admin_via_pooler()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_the_log_refuse_places_others_control() {
    if !root_only() {
        return;
    }
    let bed = TestBed::start();
    let nobody = Owner::lookup("nobody").unwrap();
    let base = bed.home.join("attack");
    std::fs::create_dir_all(&base).unwrap();

    // A shared 1777 directory as --cert-path: refused in one line, its mode untouched.
    let shared = base.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // A configuration directory nobody owns: refused too.
    let theirs = base.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(nobody.uid.as_raw()), None).unwrap();
    let good = base.join("good");
    for (cert_path, config_dir, says) in [
        (
            shared.clone(),
            good.join("etc"),
            "writable by every user (mode 1777)",
        ),
        (good.join(".pem"), theirs.clone(), "belongs to nobody"),
    ] {
        let mut args = bed.register_args("attack");
        let at = |flag: &str| args.iter().position(|a| a == flag).unwrap() + 1;
        let (c, d) = (at("--cert-path"), at("--config-dir"));
        args[c] = cert_path.display().to_string();
        args[d] = config_dir.display().to_string();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) =
            outcome(&bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]));
        assert_eq!(code, 1, "{out}{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{err}");
        assert!(
            err.starts_with("pemworker: error: refusing to write"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::metadata(&shared).unwrap().mode() & 0o7777,
        0o1777,
        "registration changed the mode of a directory it did not create"
    );
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
    assert!(!good.join(".pem").exists(), "a directory left behind");

    // The legitimate registration works, and its worker refuses a log file that is a link.
    let (cfg, _) = bed.register_agent("agent");
    let (victim, _) = victims(&base);
    let log = base.join("worker.log");
    std::os::unix::fs::symlink(&victim, &log).unwrap();
    let state = base.join("state");
    let mut child = bed.start_worker(
        &cfg,
        &[
            ("log_location", log.display().to_string()),
            ("state_dir", state.display().to_string()),
        ],
    );
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(cfg.with_extension("stderr")).unwrap();
    assert_eq!(status.code(), Some(5), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file\n");

    std::fs::remove_file(&log).unwrap();
    let mut child = bed.start_worker(
        &cfg,
        &[
            ("log_location", log.display().to_string()),
            ("state_dir", state.display().to_string()),
        ],
    );
    common::wait_for(
        "the log file",
        std::time::Duration::from_secs(30),
        || async { log.exists() },
    )
    .await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    child.wait().unwrap();
    let m = std::fs::symlink_metadata(&log).unwrap();
    assert!(m.is_file());
    assert_eq!(m.mode() & 0o037, 0, "log file mode {:o}", m.mode());
}
