//! The packages as an administrator installs them: the .deb installed with dpkg, `pemagent`
//! (PEM's daemon name) run from it as PEM's documentation, its unit and EDB's deployment tools
//! run it, dpkg refusing to keep it beside EDB's `edb-pem-agent`, and the .rpm's declared
//! conflict.
//!
//! The packages are what `scripts/package` builds (a release build, then cargo-deb and
//! cargo-generate-rpm: minutes the first time), built once per run of this file; set
//! `PEMWORKER_DEB` and `PEMWORKER_RPM` to test packages built already. dpkg runs as root (through
//! `sudo -n` otherwise) in private mount and PID namespaces where /usr, /var and /etc are
//! overlays on a tmpfs, so the machine's package database and files are left as they were. The
//! network is the machine's: the installed agent reaches the test bed.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{TestBed, last_heartbeat, wait_for};
use pemworker::connection::pool;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

const BIN: &str = "/usr/edb/pem/agent/bin";
const UNIT: &str = "/lib/systemd/system/pemagent.service";

struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
}

/// The packages under test, built once (see the module doc).
fn packages() -> &'static Packages {
    static PACKAGES: OnceLock<Result<Packages, String>> = OnceLock::new();
    PACKAGES
        .get_or_init(build_packages)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn build_packages() -> Result<Packages, String> {
    if let (Some(deb), Some(rpm)) = (
        std::env::var_os("PEMWORKER_DEB"),
        std::env::var_os("PEMWORKER_RPM"),
    ) {
        return Ok(Packages {
            deb: deb.into(),
            rpm: rpm.into(),
        });
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(repo.join("scripts/package"));
    // What cargo set for this test process describes this crate; build scripts that watch
    // these names (ring's) would see them change and rebuild the release build each time.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "OUT_DIR",
            ]
            .contains(&&*k)
        {
            cmd.env_remove(&*k);
        }
    }
    let out = cmd
        .current_dir(repo)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run scripts/package: {e}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if !out.status.success() {
        return Err(format!(
            "scripts/package failed ({}); it needs the packages scripts/install-deps installs and cargo install rights\n{stdout}\n{stderr}",
            out.status
        ));
    }
    // Its last lines: "deb: PATH (N kB)" and "rpm: PATH (N kB)".
    let path = |kind: &str| {
        stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("{kind}: ")))
            .and_then(|l| l.split(" (").next())
            .map(|p| repo.join(p))
            .ok_or_else(|| format!("scripts/package did not name the .{kind}\n{stdout}"))
    };
    Ok(Packages {
        deb: path("deb")?,
        rpm: path("rpm")?,
    })
}

/// What each namespace starts with: /usr, /var and /etc as overlays on a tmpfs (dpkg's
/// database and everything it installs live there), PEM's directories empty, and no systemd
/// to reach. Fails when this machine has pemworker or edb-pem-agent installed, which would be
/// in the namespace's package database too.
const PRELUDE: &str = r#"set -euo pipefail
out=$1
mount -t tmpfs -o mode=0700 pemworker-packages "$out/ns"
for d in usr var etc; do
    mkdir -p "$out/ns/$d/upper" "$out/ns/$d/work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$out/ns/$d/upper,workdir=$out/ns/$d/work" "/$d"
done
for d in /usr/edb /var/lib/pem /var/log/pem /var/lib/pemworker; do
    mkdir -p "$d"
    mount -t tmpfs -o mode=0755 pemworker-packages "$d"
done
rm -f /lib/systemd/system/pemagent.service /usr/lib/systemd/system/pemagent.service
if [ -d /run/systemd ]; then mount -t tmpfs -o mode=0755 no-systemd /run/systemd; fi
for p in pemworker edb-pem-agent; do
    s=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    case "$s" in ""|not-installed) ;; *) echo "this machine has the $p package ($s); purge it or run the test elsewhere" >&2; exit 3 ;; esac
done
bin=/usr/edb/pem/agent/bin
# Waits up to 120 s for the file $1 that the test writes.
await() { for ((i = 0; i < 600; i++)); do [ -e "$1" ] && return 0; sleep 0.2; done; echo "timed out waiting for $1" >&2; exit 4; }
"#;

/// Runs `script` after [`PRELUDE`] in the namespaces, with `$1` = `dir` (where it leaves what
/// the test reads; `dir/ns` is its tmpfs) and the environment `env` only.
fn in_namespaces(dir: &Path, script: &str, env: &[(&str, String)]) -> Child {
    std::fs::create_dir_all(dir.join("ns")).unwrap();
    let file = dir.join("script.sh");
    std::fs::write(&file, format!("{PRELUDE}{script}")).unwrap();
    let mut cmd = if nix::unistd::Uid::effective().is_root() {
        Command::new("unshare")
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", "unshare"]);
        c
    };
    cmd.args([
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--propagation",
        "private",
        "env",
        "-i",
        "LANG=C.UTF-8",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]);
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg("bash")
        .arg(&file)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unshare (util-linux) as root, or through sudo -n")
}

/// Waits for `child` (at most `limit`) and returns its exit code and output; panics with the
/// output when it does not finish.
fn finish(mut child: Child, limit: Duration) -> (i32, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("not finished within {limit:?}: {}", output(&mut child));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.code().unwrap_or(-1), output(&mut child))
}

fn output(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut s);
    }
    s.push_str("--- stderr\n");
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// The namespaces' processes go when their first one does.
struct Namespaces(Option<Child>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

/// What `--version` prints under `name`.
fn version_text(name: &str) -> String {
    format!(
        "{name} {v}\nVersion: {v}\nSchema Supported: {}\n",
        pemworker::schema::latest_version(),
        v = env!("CARGO_PKG_VERSION")
    )
}

async fn server_now(su: &Client) -> f64 {
    pool::query_value(su, "now", "SELECT extract(epoch FROM now())::float8", &[])
        .await
        .unwrap()
}

async fn wait_file(dir: &Path, name: &str, ns: &mut Namespaces) {
    let path = dir.join(name);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        if let Some(status) = ns.0.as_mut().unwrap().try_wait().unwrap() {
            let mut c = ns.0.take().unwrap();
            panic!(
                "the namespace's script ended ({status}) before {name}: {}",
                output(&mut c)
            );
        }
        assert!(Instant::now() < deadline, "timed out waiting for {name}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `pemagent --version` and `pemagent -c agent.cfg` from the installed .deb: the lines EDB's
/// tools read, parsed with their own commands; the agent started as PEM's documentation starts
/// it (it detaches) and as the installed unit's ExecStart= starts it, heartbeating each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pemagent_from_the_installed_deb_answers_edbs_tools_and_runs_the_agent() {
    let packages = packages();
    let bed = TestBed::start();
    let (cfg, agent) = bed.register_agent("agent");
    let su = bed.connect(&bed.superuser()).await;
    pool::execute(
        &su,
        "interval",
        "UPDATE pem.agent SET heartbeat_interval = 1 WHERE id = $1",
        &[(&agent, Type::INT4)],
    )
    .await
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // The agent's log where the test can read it; everything else as the package has it
    // (the state in /var/lib/pem/agent, which postinst made).
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "log_location={}\nlog_level=info\n",
        dir.join("worker.log").display()
    ));
    std::fs::write(&cfg, text).unwrap();

    let script = r#"
dpkg -i "$DEB" >"$out/dpkg.log" 2>&1
readlink "$bin/pemagent" >"$out/link"
"$bin/pemagent" --version >"$out/pemagent-version"
"$bin/pemworker" --version >"$out/pemworker-version"
# EDB's deployment tools, with their own command lines: TPA (the Version: line, and
# Schema Supported:) and edb-ansible (field 2 of line 2).
"$bin/pemagent" --version | awk '/^Version: / { print $2 }' >"$out/tpa-version"
"$bin/pemagent" --version | awk -F: '/Schema Supported:/ {print $2+0}' >"$out/tpa-schema"
"$bin/pemagent" --version|cut -d":" -f2|head -n2|tail -n1 >"$out/edb-ansible-version"
systemd-analyze verify /lib/systemd/system/pemagent.service >"$out/verify" 2>&1 || echo "exit $?" >>"$out/verify"
exec_start=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/pemagent.service)
echo "$exec_start" >"$out/exec-start"

# PEM's documented command line: it detaches, and runs as pemagent.
rc=0; "$bin/pemagent" -c "$CFG" >"$out/daemon.out" 2>&1 || rc=$?
echo "$rc" >"$out/daemon.rc"
for ((i = 0; i < 50; i++)); do pid=$(pgrep -x pemagent || true); [ -n "$pid" ] && break; sleep 0.1; done
echo "$pid" >"$out/daemon.pid"
touch "$out/daemon-started"
await "$out/stop-daemon"
kill -TERM "$pid"
for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid" 2>/dev/null; then echo "pemagent (pid $pid) did not stop" >&2; exit 5; fi

# The unit's command line, with agent.cfg where the unit has it.
cp -p "$CFG" /usr/edb/pem/agent/etc/agent.cfg
$exec_start >"$out/unit.journal" 2>&1 &
touch "$out/unit-started"
wait
"#;
    let env = [
        ("DEB", packages.deb.display().to_string()),
        ("CFG", cfg.display().to_string()),
        ("HOME", bed.home.display().to_string()),
        ("PGSSLROOTCERT", bed.root_crt.display().to_string()),
    ];
    let before = server_now(&su).await;
    let mut ns = Namespaces(Some(in_namespaces(dir, script, &env)));
    wait_file(dir, "daemon-started", &mut ns).await;

    assert_eq!(read(dir, "link"), "pemworker\n");
    assert_eq!(read(dir, "pemagent-version"), version_text("pemagent"));
    assert_eq!(read(dir, "pemworker-version"), version_text("pemworker"));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(read(dir, "tpa-version"), format!("{version}\n"));
    assert_eq!(
        read(dir, "tpa-schema"),
        format!("{}\n", pemworker::schema::latest_version())
    );
    assert_eq!(read(dir, "edb-ansible-version"), format!(" {version}\n"));
    assert_eq!(read(dir, "verify"), "", "systemd-analyze verify {UNIT}");
    assert_eq!(
        read(dir, "exec-start"),
        format!("{BIN}/pemagent -c /usr/edb/pem/agent/etc/agent.cfg -f\n")
    );
    assert_eq!(
        read(dir, "daemon.rc"),
        "0\n",
        "pemagent -c: {}",
        read(dir, "daemon.out")
    );
    let pid = read(dir, "daemon.pid");
    assert_eq!(
        pid.lines().count(),
        1,
        "one detached process named pemagent: {pid:?}"
    );

    wait_for(
        "heartbeats from pemagent -c agent.cfg",
        Duration::from_secs(60),
        || async { last_heartbeat(&su, agent).await > before },
    )
    .await;
    std::fs::write(dir.join("stop-daemon"), "").unwrap();
    wait_file(dir, "unit-started", &mut ns).await;
    let stopped = server_now(&su).await;
    wait_for(
        "heartbeats from the unit's ExecStart=",
        Duration::from_secs(60),
        || async { last_heartbeat(&su, agent).await > stopped + 1.0 },
    )
    .await;
    let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
    assert_eq!(
        log.matches("running as").count(),
        2,
        "each start says once how it runs:\n{log}"
    );
}

/// A stand-in for EDB's agent package: `edb-pem-agent` with the paths this package ships (its
/// programs print "EDB"), the unit under `unit_dir`.
fn dummy_edb_package(dir: &Path, unit_dir: &str) -> PathBuf {
    let root = dir.join(format!("edb-pem-agent{}", unit_dir.replace('/', "-")));
    let write = |rel: &str, text: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write(
        "DEBIAN/control",
        "Package: edb-pem-agent\nVersion: 10.0.0-1\nArchitecture: all\n\
         Maintainer: test <test@example.org>\nDescription: stand-in for EDB's PEM agent package\n",
        0o644,
    );
    for program in ["pemagent", "pemworker"] {
        write(
            &format!("usr/edb/pem/agent/bin/{program}"),
            "#!/bin/sh\necho EDB\n",
            0o755,
        );
    }
    write(
        "usr/edb/pem/agent/etc/agent.cfg.sample",
        "[PEM/agent]\n",
        0o644,
    );
    write(
        &format!("{unit_dir}/pemagent.service"),
        "[Service]\nExecStart=/usr/edb/pem/agent/bin/pemagent -c /usr/edb/pem/agent/etc/agent.cfg\n",
        0o644,
    );
    let deb = dir.join(format!(
        "{}.deb",
        root.file_name().unwrap().to_string_lossy()
    ));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&root)
        .arg(&deb)
        .output()
        .expect("run dpkg-deb (apt-get install dpkg)");
    assert!(out.status.success(), "dpkg-deb: {out:?}");
    deb
}

/// Installs `first` then `second` in fresh namespaces, with a registered agent's agent.cfg in
/// place before; returns both exit codes, dpkg's messages and what is installed after.
fn install_in_order(first: &Path, second: &Path) -> (String, String) {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let script = r#"
mkdir -p /usr/edb/pem/agent/etc
printf '[PEM/agent]\nagent_id=8\n' >/usr/edb/pem/agent/etc/agent.cfg
rc=0; dpkg -i "$FIRST" >"$out/first.log" 2>&1 || rc=$?; echo "first: $rc"
rc=0; dpkg -i "$SECOND" >"$out/second.log" 2>&1 || rc=$?; echo "second: $rc"
for p in pemworker edb-pem-agent; do
    echo "$p: $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || echo not-installed)"
done
echo "dpkg --verify pemworker: [$(dpkg --verify pemworker 2>&1)]"
echo "pemagent: $("$bin/pemagent" --version | head -n1)"
echo "pemworker: $("$bin/pemworker" --version | head -n1)"
echo "link: $(readlink "$bin/pemagent")"
echo "unit: $(sed -n 's/^ExecStart=//p' /lib/systemd/system/pemagent.service)"
echo "agent.cfg: $(tr '\n' ' ' </usr/edb/pem/agent/etc/agent.cfg)"
"#;
    let env = [
        ("FIRST", first.display().to_string()),
        ("SECOND", second.display().to_string()),
    ];
    let (code, out) = finish(in_namespaces(dir, script, &env), Duration::from_secs(120));
    assert_eq!(code, 0, "{out}");
    let logs = format!("{}{}", read(dir, "first.log"), read(dir, "second.log"));
    (out, logs)
}

/// What the machine has when pemworker is installed and intact (whichever came first).
fn assert_pemworker_intact(out: &str) {
    let version = env!("CARGO_PKG_VERSION");
    for line in [
        "pemworker: installed".to_string(),
        "edb-pem-agent: not-installed".into(),
        "dpkg --verify pemworker: []".into(),
        format!("pemagent: pemagent {version}"),
        format!("pemworker: pemworker {version}"),
        "link: pemworker".into(),
        format!("unit: {BIN}/pemagent -c /usr/edb/pem/agent/etc/agent.cfg -f"),
        // A registered agent's agent.cfg (no package's file) is never touched.
        "agent.cfg: [PEM/agent] agent_id=8 ".into(),
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} not in\n{out}");
    }
}

/// pemworker installed, then EDB's package: dpkg refuses it (pemworker's Conflicts), and
/// pemworker's files are as it installed them.
#[test]
fn dpkg_refuses_edb_pem_agent_beside_the_installed_pemworker() {
    let work = tempfile::tempdir().unwrap();
    let edb = dummy_edb_package(work.path(), "lib/systemd/system");
    let (out, logs) = install_in_order(&packages().deb, &edb);
    assert!(out.contains("first: 0\nsecond: 1\n"), "{out}\n{logs}");
    assert!(
        logs.contains("pemworker conflicts with edb-pem-agent")
            && logs.contains("conflicting packages - not installing edb-pem-agent"),
        "{logs}"
    );
    assert_pemworker_intact(&out);
}

/// EDB's package installed, then pemworker: the two are never installed together. dpkg
/// removes EDB's package in favour of pemworker (Conflicts + Replaces: pemworker replaces it,
/// as apt also proposes before it asks), and the shared paths are pemworker's.
#[test]
fn installing_pemworker_over_edb_pem_agent_replaces_it_and_never_keeps_both() {
    let work = tempfile::tempdir().unwrap();
    let edb = dummy_edb_package(work.path(), "lib/systemd/system");
    let (out, logs) = install_in_order(&edb, &packages().deb);
    assert!(out.contains("first: 0\nsecond: 0\n"), "{out}\n{logs}");
    assert!(
        logs.contains("will remove edb-pem-agent in favour of pemworker"),
        "{logs}"
    );
    assert_pemworker_intact(&out);
}

/// EDB's unit under /usr/lib/systemd/system while this package's is under /lib/systemd/system,
/// one directory on a merged-/usr system: removing EDB's package deletes the file both name,
/// and postinst puts pemworker's back.
#[test]
fn replacing_edb_pem_agent_keeps_the_unit_when_its_unit_was_under_usr_lib() {
    let work = tempfile::tempdir().unwrap();
    let edb = dummy_edb_package(work.path(), "usr/lib/systemd/system");
    let (out, logs) = install_in_order(&edb, &packages().deb);
    assert!(out.contains("first: 0\nsecond: 0\n"), "{out}\n{logs}");
    assert_pemworker_intact(&out);
}

/// The .deb's and .rpm's declared relations with EDB's package, and the .rpm's `pemagent`.
#[test]
fn the_packages_declare_the_conflict_with_edb_pem_agent() {
    let p = packages();
    let field = |name: &str| {
        let out = Command::new("dpkg-deb")
            .arg("-f")
            .arg(&p.deb)
            .arg(name)
            .output()
            .expect("run dpkg-deb");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(field("Conflicts"), "edb-pem-agent");
    assert_eq!(field("Replaces"), "edb-pem-agent");
    assert_eq!(field("Provides"), "");

    let rpm = |args: &[&str]| {
        let out = Command::new("rpm")
            .args(args)
            .arg(&p.rpm)
            .output()
            .expect("run rpm (apt-get install rpm)");
        assert!(out.status.success(), "rpm {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(rpm(&["-qp", "--conflicts"]), "edb-pem-agent\n");
    assert_eq!(rpm(&["-qp", "--obsoletes"]), "");
    let files = rpm(&["-qlp"]);
    for f in [
        "/usr/edb/pem/agent/bin/pemagent",
        "/usr/edb/pem/agent/bin/pemworker",
        "/usr/lib/systemd/system/pemagent.service",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} not in\n{files}");
    }

    // The .rpm's pemagent, unpacked, is PEM's daemon name too.
    let work = tempfile::tempdir().unwrap();
    let rpm_copy = work.path().join("p.rpm");
    std::fs::copy(&p.rpm, &rpm_copy).unwrap();
    let out = Command::new("rpm2archive")
        .arg(&rpm_copy)
        .output()
        .expect("run rpm2archive (apt-get install rpm)");
    assert!(out.status.success(), "rpm2archive: {out:?}");
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(work.path().join("p.rpm.tgz"))
        .arg("-C")
        .arg(work.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {out:?}");
    let out = Command::new(work.path().join("usr/edb/pem/agent/bin/pemagent"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        version_text("pemagent")
    );
}

/// A stand-in for EDB's agent .rpm: `edb-pem-agent` with the paths this package ships.
fn dummy_edb_rpm(dir: &Path) -> PathBuf {
    let spec = dir.join("edb-pem-agent.spec");
    std::fs::write(
        &spec,
        "Name: edb-pem-agent\nVersion: 10.0.0\nRelease: 1\nSummary: stand-in for EDB's PEM agent\n\
         License: none\nBuildArch: noarch\n%description\nstand-in\n%install\n\
         mkdir -p %{buildroot}/usr/edb/pem/agent/bin\n\
         printf '#!/bin/sh\\necho EDB\\n' > %{buildroot}/usr/edb/pem/agent/bin/pemagent\n\
         cp %{buildroot}/usr/edb/pem/agent/bin/pemagent %{buildroot}/usr/edb/pem/agent/bin/pemworker\n\
         %files\n%attr(0755,root,root) /usr/edb/pem/agent/bin/pemagent\n\
         %attr(0755,root,root) /usr/edb/pem/agent/bin/pemworker\n",
    )
    .unwrap();
    let out = Command::new("rpmbuild")
        .arg("--define")
        .arg(format!("_topdir {}", dir.join("top").display()))
        .arg("-bb")
        .arg(&spec)
        .output()
        .expect("run rpmbuild (apt-get install rpm)");
    assert!(out.status.success(), "rpmbuild: {out:?}");
    dir.join("top/RPMS/noarch/edb-pem-agent-10.0.0-1.noarch.rpm")
}

/// rpm, with a package database of its own: the first package recorded as installed
/// (`--justdb --nodeps`: this Debian machine's libraries are not in an rpm database), then
/// the second tried (`--test`). Returns rpm's exit code and messages.
fn rpm_second_beside_first(dir: &Path, first: &Path, second: &Path) -> (i32, String) {
    let db = dir.join(format!(
        "rpmdb-{}",
        first.file_name().unwrap().to_string_lossy()
    ));
    let rpm = |args: &[&str], pkg: Option<&Path>| {
        let mut c = Command::new("rpm");
        c.arg("--dbpath").arg(&db).args(args);
        if let Some(p) = pkg {
            c.arg(p);
        }
        common::outcome(&c.output().expect("run rpm (apt-get install rpm)"))
    };
    let (code, _, err) = rpm(&["--initdb"], None);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = rpm(&["-i", "--justdb", "--nodeps"], Some(first));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = rpm(&["-i", "--test"], Some(second));
    (code, err)
}

/// rpm refuses either package while the other is installed: pemworker's Conflicts.
#[test]
fn rpm_refuses_pemworker_and_edb_pem_agent_together_in_either_order() {
    let p = packages();
    let work = tempfile::tempdir().unwrap();
    let edb = dummy_edb_rpm(work.path());
    let name = format!("pemworker-{}-1.x86_64", env!("CARGO_PKG_VERSION"));
    let (code, err) = rpm_second_beside_first(work.path(), &p.rpm, &edb);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains(&format!("edb-pem-agent conflicts with (installed) {name}")),
        "{err}"
    );
    // The other way round rpm also lists the libraries this machine's (empty) rpm database
    // lacks; the conflict is among them.
    let (code, err) = rpm_second_beside_first(work.path(), &edb, &p.rpm);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.lines()
            .any(|l| l.trim() == format!("edb-pem-agent conflicts with {name}")),
        "{err}"
    );
}
