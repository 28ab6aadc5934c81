//! Faults a host inflicts on a running agent, injected for real against the real test bed: the
//! worker killed with SIGKILL again and again, its state directory full or read-only, the wall
//! clock jumping, an outage longer than the spool holds, monitored servers that stop or stop
//! resolving, and certificates that change. Each test asserts what a user observes: rows on the
//! PEM server, stats.json, log lines, exit codes.
//!
//! Some faults need root (mounting a tmpfs, a private mount namespace); those tests fail with a
//! message saying so rather than skip. The clock test needs libfaketime (Debian: faketime).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestBed, journal_keys, log_heartbeats, stored_keys, wait_for};
use pemworker::connection::pool;
use pemworker::probes::PROBES;
use pemworker::worker::stats::Snapshot;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

const LONG_WAIT: u64 = 5;

/// One registered agent and its worker process.
struct Agent {
    id: i32,
    cfg: PathBuf,
    site: PathBuf,
    state: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Extra environment (test hooks, libfaketime).
    env: Vec<(&'static str, String)>,
    /// Extra agent.cfg settings (`-o`).
    settings: Vec<(&'static str, String)>,
    /// A program (and its arguments) the worker runs under, e.g. a private mount namespace.
    wrapper: Vec<String>,
}

impl Agent {
    fn command(&self, bed: &TestBed, args: &[&str]) -> Command {
        let exe = env!("CARGO_BIN_EXE_pemworker");
        let mut c = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        c.args(args).arg("-c").arg(&self.cfg);
        let mut settings = vec![
            ("log_location", self.log.display().to_string()),
            ("short_wait", "2".into()),
            ("long_wait", LONG_WAIT.to_string()),
            ("state_dir", self.state.display().to_string()),
        ];
        settings.extend(self.settings.iter().cloned());
        for (k, v) in settings {
            c.arg("-o").arg(format!("{k}={v}"));
        }
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &bed.home)
            .env("PGSSLROOTCERT", &bed.root_crt)
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn start(&mut self, bed: &TestBed) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.site.join("worker.stderr"))
            .unwrap();
        let child = self
            .command(bed, &["-f"])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start pemworker");
        self.child = Some(child);
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.site.join("worker.stderr")).unwrap_or_default()
    }

    /// Lines of the log that contain every one of `parts`.
    fn log_lines(&self, parts: &[&str]) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(String::from)
            .collect()
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL, and the process reaped.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (bounded by the grace period plus slack).
    async fn stop(&mut self) -> i32 {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + pemworker::worker::SHUTDOWN_GRACE + Duration::from_secs(15);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "agent {} did not stop in time",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stats(&self) -> Snapshot {
        read_stats(&self.state).expect("stats.json")
    }

    /// utime + stime of the worker, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .unwrap()
            .unwrap() as f64;
        ticks as f64 / hz
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_stats(state: &Path) -> Option<Snapshot> {
    serde_json::from_slice(&std::fs::read(state.join("stats.json")).ok()?).ok()
}

/// Registers `n` agents through pgBouncer with 1-second heartbeats and agent-level probes every
/// `os_interval` seconds; binds the bed's PostgreSQL and pgBouncer to the first (probes every
/// `server_interval` s) unless that is 0.
async fn fleet(bed: &TestBed, n: usize, os_interval: i32, server_interval: i32) -> Vec<Agent> {
    let mut agents = Vec::new();
    for i in 0..n {
        let (cfg, id) = bed.register_agent(&format!("agent{i}"));
        let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
        agents.push(Agent {
            id,
            cfg,
            state: site.join("state"),
            log: site.join("worker.log"),
            site,
            child: None,
            env: Vec::new(),
            settings: Vec::new(),
            wrapper: Vec::new(),
        });
    }
    let su = bed.connect(&bed.superuser()).await;
    pool::execute(
        &su,
        "fleet",
        "WITH h AS (UPDATE pem.agent SET heartbeat_interval = 1) \
         INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
           SELECT a.id, NULL, p.id, $1, true FROM pem.agent a, pem.probe p WHERE p.target_type = 'agent'",
        &[(&os_interval, Type::INT4)],
    )
    .await
    .unwrap();
    if server_interval > 0 {
        pemworker::sandbox::bind_servers(bed, agents[0].id, &agents[0].cfg, server_interval)
            .await
            .unwrap();
    }
    agents
}

async fn history_rows(su: &Client, probe: &str, agent: i32) -> i64 {
    pool::query_one(
        su,
        "count",
        &format!("SELECT count(*) FROM pemhistory.{probe} WHERE agent_id = $1"),
        &[(&agent, Type::INT4)],
    )
    .await
    .unwrap()
    .get(0)
}

async fn server_now(su: &Client) -> String {
    pool::query_one(su, "now", "SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// The longest time between two logged heartbeats of `agent` in [from, to] (server times),
/// counting from `from` and to `to`, and the number of heartbeats.
async fn longest_heartbeat_gap(su: &Client, agent: i32, from: &str, to: &str) -> (f64, i64) {
    let row = pool::query_one(
        su,
        "gaps",
        "WITH h AS (SELECT at FROM public.heartbeat_log \
                     WHERE agent_id = $1 AND at BETWEEN $2::text::timestamptz AND $3::text::timestamptz \
                    UNION ALL SELECT $2::text::timestamptz UNION ALL SELECT $3::text::timestamptz), \
              g AS (SELECT at - lag(at) OVER (ORDER BY at) AS gap FROM h) \
         SELECT extract(epoch FROM max(gap))::float8, \
                (SELECT count(*) FROM public.heartbeat_log \
                  WHERE agent_id = $1 AND at BETWEEN $2::text::timestamptz AND $3::text::timestamptz) FROM g",
        &[(&agent, Type::INT4), (&from, Type::TEXT), (&to, Type::TEXT)],
    )
    .await
    .unwrap();
    (row.get(0), row.get(1))
}

/// Counts of keys per probe.
fn per_probe(keys: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in keys.values() {
        *m.entry(p.clone()).or_default() += 1;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// kill -9
// ---------------------------------------------------------------------------------------------

/// Where the worker can be held (test hooks) and killed.
const CRASH_POINTS: [&str; 4] = [
    // A batch written under its temporary name, not yet renamed.
    "spool-written",
    // A batch renamed and synced, not yet journaled as kept.
    "spool-kept",
    // A delivery's statements sent, its COMMIT not.
    "in-transaction",
    // A delivery committed, its batch still in the spool.
    "after-commit",
];

/// The crash points a run (the journal's lines after `skip`) is held at now: paused, not
/// resumed.
fn held_at(journal: &Path, skip: usize) -> BTreeSet<&'static str> {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let lines: Vec<&str> = text.lines().skip(skip).collect();
    CRASH_POINTS
        .iter()
        .copied()
        .filter(|p| {
            let count = |what: &str| {
                let l = format!("{what} {p}");
                lines.iter().filter(|x| **x == l).count()
            };
            count("pause") > count("resume")
        })
        .collect()
}

/// The samples kept in the spool's `rejected/` area: delivery key -> probe, each key once.
fn rejected_keys(state: &Path) -> BTreeMap<String, String> {
    let area = pemworker::spool::Rejected::at(&state.join("spool/rejected"));
    let mut keys = BTreeMap::new();
    for (_, r) in area.read_all() {
        for (key, _) in &r.sample.rows {
            assert!(
                keys.insert(key.to_string(), r.sample.probe.clone())
                    .is_none(),
                "refused row {key} kept twice"
            );
        }
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_sigkill_again_and_again_it_stores_every_sample_it_kept_exactly_once() {
    let bed = TestBed::start();
    let mut agents = fleet(&bed, 1, 1, 1).await;
    let a = &mut agents[0];
    let journal = a.site.join("journal");
    let su = bed.connect(&bed.superuser()).await;
    // The server takes process counts below a billion, and each run's first process count
    // claims two billion: every run has a sample refused as data, kept in rejected/.
    pool::batch(
        &su,
        "range",
        "ALTER TABLE pemhistory.process_count ADD CONSTRAINT total_range CHECK (total < 1000000000)",
    )
    .await
    .unwrap();
    let hooks = |pause: Option<&str>| {
        let mut h = vec![
            format!("journal={}", journal.display()),
            "bad-value=process_count:2000000000".to_string(),
        ];
        h.extend(pause.map(|p| format!("pause={p}:300000")));
        ("PEMWORKER_TEST_HOOKS", h.join(","))
    };

    // For a minute: start the worker, kill it (held at one of the crash points in turn, or at
    // a random instant, unheld), start it again.
    let started = Instant::now();
    let mut kills: BTreeMap<&str, usize> = BTreeMap::new();
    let mut runs = 0;
    while started.elapsed() < Duration::from_secs(60) {
        let lines_before = std::fs::read_to_string(&journal)
            .unwrap_or_default()
            .lines()
            .count();
        runs += 1;
        let point = match runs % (CRASH_POINTS.len() + 1) {
            0 => None,
            i => Some(CRASH_POINTS[i - 1]),
        };
        a.env = vec![hooks(point)];
        a.start(&bed);
        match point {
            None => {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(500..4000))).await;
            }
            Some(point) => {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !held_at(&journal, lines_before).contains(point) {
                    assert!(
                        Instant::now() < deadline,
                        "run {runs}: the worker never reached {point}: {}{}",
                        a.stderr(),
                        a.log_text()
                    );
                    assert!(a.is_running(), "run {runs}: {}", a.stderr());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        a.kill();
        // Where it died: the crash point it was held at, or anywhere.
        let held = held_at(&journal, lines_before);
        match point {
            Some(point) => assert_eq!(held, BTreeSet::from([point]), "run {runs}"),
            None => assert!(held.is_empty(), "run {runs}: {held:?}"),
        }
        *kills.entry(point.unwrap_or("random instant")).or_default() += 1;
    }
    eprintln!("{runs} runs killed with SIGKILL over 60 s, where: {kills:?}");
    for p in CRASH_POINTS.iter().chain(&["random instant"]) {
        assert!(kills.get(p).copied().unwrap_or(0) >= 2, "{p}: {kills:?}");
    }

    // A last run, without pauses or refused values, delivers what is left and stops cleanly.
    a.env = vec![(
        "PEMWORKER_TEST_HOOKS",
        format!("journal={}", journal.display()),
    )];
    // Not the figures a killed run left.
    let _ = std::fs::remove_file(a.state.join("stats.json"));
    a.start(&bed);
    wait_for("the spool to drain", Duration::from_secs(60), || async {
        read_stats(&a.state).is_some_and(|s| s.spooled_samples == 0 && s.delivered_samples > 0)
    })
    .await;
    assert_eq!(a.stop().await, 0, "{}", a.stderr());

    // Every row any run kept is on the server once, or in rejected/ once (the refused ones);
    // nothing else is, and nothing is in both.
    let kept = journal_keys(&journal);
    let stored = stored_keys(&su, a.id).await;
    let refused = rejected_keys(&a.state);
    let both: Vec<&String> = refused.keys().filter(|k| stored.contains_key(*k)).collect();
    let mut accounted = stored.clone();
    accounted.extend(refused.clone());
    let missing: Vec<&String> = kept
        .keys()
        .filter(|k| !accounted.contains_key(*k))
        .collect();
    let unknown: Vec<&String> = accounted
        .keys()
        .filter(|k| !kept.contains_key(*k))
        .collect();
    eprintln!(
        "kept {} rows; stored {}, refused and kept in rejected/ {}: {:?}",
        kept.len(),
        stored.len(),
        refused.len(),
        per_probe(&stored)
    );
    assert!(both.is_empty(), "stored and refused: {both:?}");
    assert!(
        missing.is_empty(),
        "kept but neither stored nor refused: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "stored or refused but never kept: {unknown:?}"
    );
    assert_eq!(per_probe(&kept), per_probe(&accounted));
    assert!(kept.len() > 100, "only {} rows kept", kept.len());
    for p in ["cpu_usage", "server_info", "pgbouncer_pools"] {
        assert!(history_rows(&su, p, a.id).await > 0, "{p}");
    }
    assert!(
        refused.len() >= 5 && refused.values().all(|p| p == "process_count"),
        "{refused:?}"
    );
    assert_eq!(a.stats().refused_samples, refused.len() as u64);
    // Nothing half-written is left.
    let left: Vec<String> = std::fs::read_dir(a.state.join("spool"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // .reuse is the last delivered batch's file, kept for the next one to be written into.
        .filter(|n| n != "rejected" && n != ".reuse")
        .collect();
    assert!(left.is_empty(), "left in the spool: {left:?}");
    let half: Vec<String> = std::fs::read_dir(a.state.join("spool/rejected"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ".lock")
        .collect();
    assert!(half.is_empty(), "left in rejected/: {half:?}");
    assert!(!a.log_text().contains("unreadable"), "{}", a.log_text());
}

// ---------------------------------------------------------------------------------------------
// A full, then a read-only state directory
// ---------------------------------------------------------------------------------------------

fn require_root(what: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{what} needs root (it mounts file systems): run the test suite as root, as CI does"
    );
}

/// A small tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir));
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    /// Remounts read-only (or read-write). A remount to read-only fails while a file is open
    /// for writing there: the worker holds none between writes, so a retry soon succeeds.
    fn remount(&self, read_only: bool) {
        let opt = if read_only {
            "remount,ro"
        } else {
            "remount,rw"
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("mount")
                .args(["-o", opt])
                .arg(&self.dir)
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mount -o {opt} {}: {}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn run(c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fills the file system of `file` up, writing to `file` until it is full.
fn fill(file: &Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .unwrap();
    let block = [0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.write_all(&block[..512]);
    let _ = f.write_all(&block[..1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_then_read_only_state_directory_loses_no_sample_while_the_server_is_reachable() {
    require_root("this test");
    let bed = TestBed::start();
    let mut agents = fleet(&bed, 1, 1, 2).await;
    let a = &mut agents[0];
    let disk = Tmpfs::mount(&a.state, "1m");
    let journal = a.site.join("journal");
    a.env.push((
        "PEMWORKER_TEST_HOOKS",
        format!("journal={}", journal.display()),
    ));
    let su = bed.connect(&bed.superuser()).await;
    log_heartbeats(&su).await;
    a.start(&bed);
    wait_for("first samples", Duration::from_secs(30), || async {
        history_rows(&su, "cpu_usage", a.id).await > 2
    })
    .await;
    let kept = || journal_keys(&journal).len();
    let t0 = server_now(&su).await;

    // Full: every write fails with ENOSPC (the filler takes back what deliveries free). The
    // spool writes a batch into the file of the last delivered one, which needs no new space
    // while the batch fits; that file goes too, so that every write needs space.
    let filler = a.state.join("filler");
    let reuse = a.state.join("spool/.reuse");
    let full_until = Instant::now() + Duration::from_secs(10);
    let kept_before = kept();
    let cpu_before = history_rows(&su, "cpu_usage", a.id).await;
    while Instant::now() < full_until {
        let _ = std::fs::remove_file(&reuse);
        fill(&filler);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu_full = history_rows(&su, "cpu_usage", a.id).await;
    assert!(
        cpu_full >= cpu_before + 7,
        "samples delivered from memory while the disk was full: {cpu_before} -> {cpu_full}"
    );
    assert!(
        kept() <= kept_before + 40,
        "spool writes while the disk was full: {} -> {}",
        kept_before,
        kept()
    );
    // Space again: spooling resumes.
    std::fs::remove_file(&filler).unwrap();
    let kept_freed = kept();
    wait_for("spooling to resume", Duration::from_secs(15), || async {
        kept() > kept_freed + 5
    })
    .await;

    // Read-only, then read-write again.
    disk.remount(true);
    let ro_until = Instant::now() + Duration::from_secs(10);
    let kept_ro = kept();
    let cpu_ro = history_rows(&su, "cpu_usage", a.id).await;
    tokio::time::sleep_until(ro_until.into()).await;
    assert_eq!(
        kept(),
        kept_ro,
        "nothing written to a read-only file system"
    );
    let cpu_after_ro = history_rows(&su, "cpu_usage", a.id).await;
    assert!(
        cpu_after_ro >= cpu_ro + 7,
        "samples delivered from memory while the disk was read-only: {cpu_ro} -> {cpu_after_ro}"
    );
    disk.remount(false);
    wait_for("spooling to resume", Duration::from_secs(15), || async {
        kept() > kept_ro + 5
    })
    .await;
    let t1 = server_now(&su).await;
    assert!(a.is_running(), "{}", a.stderr());
    assert_eq!(a.stop().await, 0, "{}", a.stderr());

    // Heartbeats never stopped.
    let (gap, beats) = longest_heartbeat_gap(&su, a.id, &t0, &t1).await;
    eprintln!(
        "heartbeats (every 1 s) over the full and read-only episodes: {beats}, longest gap {gap:.2} s"
    );
    assert!(gap <= 2.5, "a heartbeat gap of {gap:.2} s");
    // Every sample collected is stored; none dropped.
    let stats = a.stats();
    assert_eq!(stats.dropped_samples, 0, "{stats:?}");
    assert_eq!(stats.spooled_samples, 0);
    let (mut collected_all, mut stored_all) = (0, 0);
    for p in PROBES {
        let collected = stats.collected.get(p.name).map_or(0, |c| c.rows) as i64;
        let stored = history_rows(&su, p.name, a.id).await;
        assert_eq!(
            stored, collected,
            "probe {}: stored vs collected rows",
            p.name
        );
        (collected_all, stored_all) = (collected_all + collected, stored_all + stored);
    }
    eprintln!(
        "rows collected {collected_all}, stored {stored_all}; CPU samples stored while full {} (10 s), \
         while read-only {} (10 s)",
        cpu_full - cpu_before,
        cpu_after_ro - cpu_ro
    );
    // One line per episode, with the cause and the fix, and one when it ends.
    let dir = a.state.display().to_string();
    let full = a.log_lines(&["No space left on device", &dir]);
    assert_eq!(full.len(), 1, "{full:#?}");
    assert!(
        full[0].contains("free space on the file system that holds"),
        "{}",
        full[0]
    );
    let ro = a.log_lines(&["Read-only file system", &dir]);
    assert_eq!(ro.len(), 1, "{ro:#?}");
    assert!(ro[0].contains("remount it read-write"), "{}", ro[0]);
    let ended = a.log_lines(&["can be written again", "straight from memory meanwhile"]);
    assert_eq!(ended.len(), 2, "{ended:#?}");
    let lines_about_the_disk = a.log_lines(&[&dir]).len();
    assert_eq!(lines_about_the_disk, 4, "{}", a.log_text());
}

// ---------------------------------------------------------------------------------------------
// Wall-clock jumps
// ---------------------------------------------------------------------------------------------

/// libfaketime's library, or a failure saying how to install it.
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.is_file());
    found.expect(
        "libfaketime not found: install it with `apt-get install faketime` (or run scripts/install-deps)",
    )
}

/// Adds a column to a history table recording when (on the server's clock) each row arrived.
async fn number_arrivals(su: &Client, probe: &str) {
    pool::batch(
        su,
        "arrival order",
        &format!(
            "ALTER TABLE pemhistory.{probe} ADD COLUMN arrival timestamptz NOT NULL DEFAULT clock_timestamp()"
        ),
    )
    .await
    .unwrap();
}

/// The wall-clock times of `agent`'s samples of `probe`, in the order they arrived.
async fn collected_in_arrival_order(su: &Client, probe: &str, agent: i32) -> Vec<f64> {
    pool::query(
        su,
        "series",
        &format!(
            "SELECT extract(epoch FROM collected_at)::float8 FROM pemhistory.{probe} \
              WHERE agent_id = $1 ORDER BY arrival"
        ),
        &[(&agent, Type::INT4)],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_of_an_hour_neither_burst_nor_stall_the_probes() {
    let lib = libfaketime();
    let bed = TestBed::start();
    let mut agents = fleet(&bed, 1, 1, 2).await;
    let a = &mut agents[0];
    // The offset of the worker's wall clock from the real one, read at every clock call; the
    // monotonic clock is left alone.
    let offset = a.site.join("clock-offset");
    std::fs::write(&offset, "+0\n").unwrap();
    a.env.extend([
        ("LD_PRELOAD", lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE", offset.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
    ]);
    let su = bed.connect(&bed.superuser()).await;
    log_heartbeats(&su).await;
    number_arrivals(&su, "cpu_usage").await;
    number_arrivals(&su, "server_info").await;
    a.start(&bed);
    wait_for("first samples", Duration::from_secs(30), || async {
        history_rows(&su, "cpu_usage", a.id).await > 2
            && history_rows(&su, "server_info", a.id).await > 1
    })
    .await;
    let t0 = server_now(&su).await;
    let phase = Duration::from_secs(8);
    // +1 h, back (-1 h), -1 h, back (+1 h).
    for jump in ["+3600", "+0", "-3600", "+0"] {
        tokio::time::sleep(phase).await;
        std::fs::write(&offset, format!("{jump}\n")).unwrap();
    }
    tokio::time::sleep(phase).await;
    let t1 = server_now(&su).await;
    assert!(a.is_running(), "{}", a.stderr());
    assert_eq!(a.stop().await, 0, "{}", a.stderr());

    // The samples' times jump with the clock; the time between them does not change.
    for (probe, interval) in [("cpu_usage", 1.0), ("server_info", 2.0)] {
        // The first samples are start-up's (a new job runs at once, then on its slots).
        let times: Vec<f64> = collected_in_arrival_order(&su, probe, a.id)
            .await
            .into_iter()
            .skip(2)
            .collect();
        let (mut up, mut down) = (0, 0);
        let mut steps = Vec::new();
        for w in times.windows(2) {
            let mut d = w[1] - w[0];
            if d > 1800.0 {
                up += 1;
                d -= 3600.0;
            } else if d < -1800.0 {
                down += 1;
                d += 3600.0;
            }
            steps.push(d);
        }
        eprintln!(
            "{probe} every {interval} s: {} samples, jumps +1 h {up}, -1 h {down}, steps between samples {:.2}..{:.2} s",
            times.len(),
            steps.iter().cloned().fold(f64::MAX, f64::min),
            steps.iter().cloned().fold(f64::MIN, f64::max),
        );
        assert_eq!((up, down), (2, 2), "{probe}: {times:?}");
        for d in &steps {
            assert!(
                *d >= 0.3 * interval && *d <= interval + 1.5,
                "{probe}: a step of {d:.2} s between samples due every {interval} s (a burst or a stall): {steps:?}"
            );
        }
    }
    let (gap, beats) = longest_heartbeat_gap(&su, a.id, &t0, &t1).await;
    eprintln!("heartbeats (every 1 s) through the jumps: {beats}, longest gap {gap:.2} s");
    assert!(gap <= 2.5, "a heartbeat gap of {gap:.2} s");
    let stats = a.stats();
    assert_eq!(stats.dropped_samples, 0);
    assert!(
        !a.log_text().contains("certificate"),
        "TLS kept working: {}",
        a.log_text()
    );
}

// ---------------------------------------------------------------------------------------------
// An outage longer than the spool holds
// ---------------------------------------------------------------------------------------------

/// The per-probe counts of a "dropped for spool_limit" log line: `(... (probe n, probe n))`.
fn dropped_in_line(line: &str) -> BTreeMap<String, u64> {
    let inner = line
        .rsplit_once("the oldest first (")
        .and_then(|(_, r)| r.split_once(')'))
        .map_or("", |(l, _)| l);
    inner
        .split(", ")
        .filter_map(|pair| {
            let (p, n) = pair.rsplit_once(' ')?;
            Some((p.to_string(), n.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_spool_holds_drops_the_oldest_and_counts_exactly_what_is_missing()
{
    let mut bed = TestBed::start();
    let mut agents = fleet(&bed, 1, 1, 1).await;
    let a = &mut agents[0];
    a.settings.push(("spool_limit", "32kB".into()));
    let su = bed.connect(&bed.superuser()).await;
    number_arrivals(&su, "cpu_usage").await;
    a.start(&bed);
    wait_for("first samples", Duration::from_secs(30), || async {
        history_rows(&su, "cpu_usage", a.id).await > 2
    })
    .await;

    // The pooler, which is the way to the PEM server, is down for 30 s: far more than 32 kB.
    bed.stop_pgbouncer();
    let outage = Instant::now();
    wait_for("the spool to overflow", Duration::from_secs(40), || async {
        read_stats(&a.state).is_some_and(|s| s.dropped_samples > 0)
            || a.log_text().contains("spool_limit")
    })
    .await;
    tokio::time::sleep_until((outage + Duration::from_secs(30)).into()).await;
    bed.start_pgbouncer();
    wait_for("the spool to drain", Duration::from_secs(60), || async {
        read_stats(&a.state).is_some_and(|s| s.spooled_samples == 0 && s.dropped_samples > 0)
    })
    .await;
    assert_eq!(a.stop().await, 0, "{}", a.stderr());

    // What was dropped, per probe, is exactly what is missing on the server.
    let stats = a.stats();
    assert!(stats.dropped_samples > 0, "{stats:?}");
    let mut missing_samples = BTreeMap::new();
    for p in PROBES {
        let collected = stats.collected.get(p.name).cloned().unwrap_or_default();
        let dropped = stats.dropped.get(p.name).cloned().unwrap_or_default();
        let stored = history_rows(&su, p.name, a.id).await as u64;
        assert_eq!(
            collected.rows - stored,
            dropped.rows,
            "probe {}: collected {} rows, stored {stored}, dropped {}",
            p.name,
            collected.rows,
            dropped.rows
        );
        if dropped.samples > 0 {
            missing_samples.insert(p.name.to_string(), dropped.samples);
        }
        if collected.rows > 0 {
            eprintln!(
                "{}: collected {} rows, stored {stored}, dropped {}",
                p.name, collected.rows, dropped.rows
            );
        }
    }
    assert_eq!(
        missing_samples.values().sum::<u64>(),
        stats.dropped_samples,
        "{stats:?}"
    );
    // One line when it started, one when delivery worked again, with the same counts.
    let started = a.log_lines(&["is full: spool_limit (32768 bytes)"]);
    assert_eq!(started.len(), 1, "{}", a.log_text());
    assert!(started[0].contains("raise spool_limit"), "{}", started[0]);
    let ended = a.log_lines(&["were dropped for spool_limit"]);
    assert_eq!(ended.len(), 1, "{}", a.log_text());
    assert_eq!(dropped_in_line(&ended[0]), missing_samples, "{}", ended[0]);
    eprintln!("{}", ended[0]);
    // And what an operator asks for.
    let (code, out, err) =
        common::outcome(&a.command(&bed, &["spool", "status"]).output().unwrap());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "dropped (spool full, or not writable) in the worker's last run: {} (",
            stats.dropped_samples
        )) && out.contains(&format!("cpu_usage {}", missing_samples["cpu_usage"])),
        "{out}"
    );

    // The oldest went: one gap in the CPU samples, inside the outage, and everything after it
    // arrived in the order it was collected.
    let times = collected_in_arrival_order(&su, "cpu_usage", a.id).await;
    let gaps: Vec<(usize, f64)> = times
        .windows(2)
        .enumerate()
        .map(|(i, w)| (i, w[1] - w[0]))
        .filter(|(_, d)| *d > 2.5)
        .collect();
    assert_eq!(gaps.len(), 1, "one gap: {gaps:?}");
    let (at, gap) = gaps[0];
    let dropped_cpu = missing_samples["cpu_usage"] as f64;
    assert!(
        (gap - (dropped_cpu + 1.0)).abs() < 2.0,
        "the gap ({gap:.1} s) is where the {dropped_cpu} dropped CPU samples were"
    );
    assert!(
        times.len() - at > 5,
        "newer samples of the outage were kept"
    );
    assert!(
        times.windows(2).all(|w| w[1] > w[0]),
        "stored in the order collected"
    );
}

// ---------------------------------------------------------------------------------------------
// Monitored servers that stop, or whose name stops resolving
// ---------------------------------------------------------------------------------------------

/// Another PostgreSQL server for the agent to monitor, in the bed's directory, with a
/// certificate from the bed's CA for `names`; stopped when dropped.
struct Monitored {
    data: PathBuf,
    port: u16,
    pg_ctl: PathBuf,
    run_as: Option<String>,
    password: String,
}

impl Monitored {
    fn start(bed: &TestBed, name: &str, names: &[&str]) -> Monitored {
        let root = bed.root.join(name);
        let (data, socket) = (root.join("data"), root.join("run"));
        let owner = bed
            .run_as
            .as_ref()
            .map(|u| nix::unistd::User::from_name(u).unwrap().unwrap());
        for d in [&root, &data, &socket] {
            std::fs::create_dir_all(d).unwrap();
        }
        for d in [&data, &socket] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
            if let Some(u) = &owner {
                nix::unistd::chown(d, Some(u.uid), Some(u.gid)).unwrap();
            }
        }
        run(bed
            .server_command(&bed.bin_dir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-E", "UTF8", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"]));
        let (crt, key) = bed.ca.issue_server(names).unwrap();
        for (file, text) in [("server.crt", crt), ("server.key", key)] {
            let p = data.join(file);
            std::fs::write(&p, text).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some(u) = &owner {
                nix::unistd::chown(&p, Some(u.uid), Some(u.gid)).unwrap();
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             fsync = off\nshared_buffers = 16MB\nmax_connections = 20\n",
            socket.display()
        ));
        std::fs::write(&conf, text).unwrap();
        let m = Monitored {
            data,
            port,
            pg_ctl: bed.bin_dir.join("pg_ctl"),
            run_as: bed.run_as.clone(),
            password: format!("{:016x}", fastrand::u64(..)),
        };
        m.start_again();
        run(bed
            .server_command(Path::new("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&socket)
            .args([
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
            ])
            .arg(format!(
                "CREATE ROLE monitor LOGIN PASSWORD '{}' IN ROLE pg_monitor",
                m.password
            )));
        m
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut c = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(&self.pg_ctl);
                c
            }
            None => Command::new(&self.pg_ctl),
        };
        c.arg("-D").arg(&self.data).args(args).stdout(Stdio::null());
        c
    }

    fn start_again(&self) {
        // In the socket directory: the server's user may write there.
        let log = self.data.parent().unwrap().join("run/postgresql.log");
        run(self.pg_ctl(&["-w", "-t", "30", "-l"]).arg(log).arg("start"));
    }

    fn stop(&self) {
        run(&mut self.pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"]));
    }
}

impl Drop for Monitored {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["-m", "immediate", "-w", "-t", "30", "stop"])
            .stderr(Stdio::null())
            .status();
    }
}

/// Binds `m`, reached as `host`, to `agent` with its server probes every `interval` s, as
/// `--register-server` would (the PEM server's rows, this host's record, the password in
/// ~/.pgpass); returns the server id.
async fn bind_monitored(
    bed: &TestBed,
    su: &Client,
    agent: &Agent,
    m: &Monitored,
    host: &str,
    interval: i32,
) -> i32 {
    let port = i32::from(m.port);
    let id: i32 = pool::query_one(
        su,
        "binding",
        "WITH s AS (INSERT INTO pem.server (display_name, server_addr, port, database, username) \
                    VALUES ($2, $2, $3, 'postgres', 'monitor') RETURNING id), \
              b AS (INSERT INTO pem.agent_server_binding (agent_id, server_id, sslmode) SELECT $1, id, 'verify-full' FROM s), \
              p AS (INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
                    SELECT $1, s.id, p.id, $4, true FROM s, pem.probe p WHERE p.target_type = 'server') \
         SELECT id FROM s",
        &[
            (&agent.id, Type::INT4),
            (&host, Type::TEXT),
            (&port, Type::INT4),
            (&interval, Type::INT4),
        ],
    )
    .await
    .unwrap()
    .get(0);
    let targets = pemworker::targets::file_for(&agent.cfg);
    pemworker::targets::Registry::load(&targets)
        .unwrap()
        .with(pemworker::targets::Target {
            kind: pemworker::targets::Kind::Server,
            host: host.into(),
            port: m.port,
            database: "postgres".into(),
            user: "monitor".into(),
            sslmode: "verify-full".into(),
            root_cert: Some(bed.root_crt.clone()),
            efm: None,
        })
        .stage(&targets)
        .unwrap()
        .commit()
        .unwrap();
    use std::io::Write;
    let mut pgpass = std::fs::OpenOptions::new()
        .append(true)
        .open(bed.home.join(".pgpass"))
        .unwrap();
    writeln!(pgpass, "{host}:{}:*:monitor:{}", m.port, m.password).unwrap();
    id
}

/// Samples of `probe` for one server of `agent` collected in [from, to] (server times).
async fn server_samples(
    su: &Client,
    probe: &str,
    agent: i32,
    server: i32,
    from: &str,
    to: &str,
) -> i64 {
    pool::query_one(
        su,
        "samples",
        &format!(
            "SELECT count(DISTINCT collected_at) FROM pemhistory.{probe} WHERE agent_id = $1 \
               AND server_id IS NOT DISTINCT FROM $2 \
               AND collected_at BETWEEN $3::text::timestamptz AND $4::text::timestamptz"
        ),
        &[
            (&agent, Type::INT4),
            (&server, Type::INT4),
            (&from, Type::TEXT),
            (&to, Type::TEXT),
        ],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitored_servers_that_stop_or_stop_resolving_come_back_by_themselves() {
    require_root("this test (a private mount namespace for the agent's /etc/hosts)");
    let bed = TestBed::start();
    let mut agents = fleet(&bed, 1, 1, 2).await;
    let a = &mut agents[0];
    let su = bed.connect(&bed.superuser()).await;
    let bed_server: i32 = pool::query_one(
        &su,
        "bed server",
        "SELECT server_id FROM pem.agent_server_binding WHERE agent_id = $1",
        &[(&a.id, Type::INT4)],
    )
    .await
    .unwrap()
    .get(0);
    // One server that will stop, one reached by a name that will stop resolving.
    const NAME: &str = "pemfault-db.test";
    let stopping = Monitored::start(&bed, "stopping", &["127.0.0.1"]);
    let renamed = Monitored::start(&bed, "renamed", &[NAME]);
    let stopping_id = bind_monitored(&bed, &su, a, &stopping, "127.0.0.1", 2).await;
    let renamed_id = bind_monitored(&bed, &su, a, &renamed, NAME, 2).await;

    // The agent runs in a mount namespace of its own, where /etc/hosts is a file this test
    // owns and host names come from it alone; the machine's files are not touched.
    let hosts = a.site.join("hosts");
    let with_name = format!("127.0.0.1 localhost\n127.0.0.1 {NAME}\n");
    std::fs::write(&hosts, &with_name).unwrap();
    let nsswitch = a.site.join("nsswitch.conf");
    std::fs::write(
        &nsswitch,
        "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    )
    .unwrap();
    a.wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "mount --bind \"$1\" /etc/hosts && mount --bind \"$2\" /etc/nsswitch.conf && shift 2 && exec \"$@\"",
        "sh",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([hosts.display().to_string(), nsswitch.display().to_string()])
    .collect();
    log_heartbeats(&su).await;
    a.start(&bed);
    let start = server_now(&su).await;
    wait_for(
        "samples of both servers",
        Duration::from_secs(40),
        || async {
            let now = server_now(&su).await;
            server_samples(&su, "server_info", a.id, stopping_id, &start, &now).await > 0
                && server_samples(&su, "server_info", a.id, renamed_id, &start, &now).await > 0
        },
    )
    .await;

    // For a minute: one server stopped, the other's name unknown (the file is rewritten in
    // place: the bind mount holds its inode).
    let t0 = server_now(&su).await;
    stopping.stop();
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    // The agent keeps its session to a monitored server from round to round, and a session
    // outlives the name it was opened by (rightly: the server is still there). The name
    // matters when a session is opened again: here the server restarts, as when it moves.
    renamed.stop();
    renamed.start_again();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let down = a.stats().targets_down;
    assert!(
        down.get(&format!("server {stopping_id}"))
            .is_some_and(|why| why.contains("127.0.0.1")),
        "{down:?}"
    );
    assert!(
        down.get(&format!("server {renamed_id}"))
            .is_some_and(|why| why.contains(NAME)),
        "{down:?}"
    );
    tokio::time::sleep_until((outage + Duration::from_secs(60)).into()).await;
    let t1 = server_now(&su).await;
    stopping.start_again();
    std::fs::write(&hosts, &with_name).unwrap();
    wait_for(
        "both servers' samples again",
        Duration::from_secs(30),
        || async {
            let now = server_now(&su).await;
            server_samples(&su, "server_info", a.id, stopping_id, &t1, &now).await > 0
                && server_samples(&su, "server_info", a.id, renamed_id, &t1, &now).await > 0
        },
    )
    .await;
    assert!(a.is_running(), "{}", a.stderr());
    assert!(a.stats().targets_down.is_empty());
    assert_eq!(a.stop().await, 0, "{}", a.stderr());

    // Nothing else noticed: heartbeats every second, the other probes at their intervals.
    let (gap, beats) = longest_heartbeat_gap(&su, a.id, &t0, &t1).await;
    eprintln!("over the minute: {beats} heartbeats (every 1 s), longest gap {gap:.2} s");
    assert!(gap <= 2.5, "a heartbeat gap of {gap:.2} s");
    let cpu: i64 = pool::query_one(
        &su,
        "cpu",
        "SELECT count(*) FROM pemhistory.cpu_usage WHERE agent_id = $1 \
           AND collected_at BETWEEN $2::text::timestamptz AND $3::text::timestamptz",
        &[(&a.id, Type::INT4), (&t0, Type::TEXT), (&t1, Type::TEXT)],
    )
    .await
    .unwrap()
    .get(0);
    let bed_info = server_samples(&su, "server_info", a.id, bed_server, &t0, &t1).await;
    let pools: i64 = pool::query_one(
        &su,
        "pools",
        "SELECT count(DISTINCT collected_at) FROM pemhistory.pgbouncer_pools WHERE agent_id = $1 \
           AND collected_at BETWEEN $2::text::timestamptz AND $3::text::timestamptz",
        &[(&a.id, Type::INT4), (&t0, Type::TEXT), (&t1, Type::TEXT)],
    )
    .await
    .unwrap()
    .get(0);
    eprintln!(
        "over the minute: cpu {cpu} (every 1 s), bed server {bed_info} and pgBouncer {pools} (every 2 s)"
    );
    assert!(cpu >= 55, "{cpu} CPU samples in 60 s");
    assert!(
        bed_info >= 27 && pools >= 27,
        "{bed_info} server, {pools} pgBouncer samples in 60 s"
    );
    // The two servers: nothing while they were away (but a round under way when it began).
    for id in [stopping_id, renamed_id] {
        let during = pool::query_one(
            &su,
            "during",
            "SELECT count(*) FROM pemhistory.server_info WHERE agent_id = $1 AND server_id = $2 \
               AND collected_at BETWEEN $3::text::timestamptz + interval '3 s' AND $4::text::timestamptz",
            &[(&a.id, Type::INT4), (&id, Type::INT4), (&t0, Type::TEXT), (&t1, Type::TEXT)],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
        assert_eq!(during, 0, "server {id}");
    }
    // Each logged once when it went, once when it came back.
    for (id, target, why) in [
        (
            stopping_id,
            format!("127.0.0.1:{}", stopping.port),
            "cannot connect",
        ),
        (
            renamed_id,
            format!("{NAME}:{}", renamed.port),
            "failed to lookup address",
        ),
    ] {
        let what = format!("probes of server {id} ({target})");
        let went = a.log_lines(&[
            &what,
            "its samples are missing until it can be reached again",
        ]);
        assert_eq!(went.len(), 1, "{}", a.log_text());
        assert!(went[0].contains(why), "{}", went[0]);
        let back = a.log_lines(&[&what, "work again after"]);
        assert_eq!(back.len(), 1, "{}", a.log_text());
        assert_eq!(a.log_lines(&[&what]).len(), 2, "{}", a.log_text());
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates that change
// ---------------------------------------------------------------------------------------------

/// Replaces the server certificate and key PostgreSQL and pgBouncer use (the same files, in
/// place: owner and mode stay).
fn replace_server_certificate(bed: &TestBed, crt: &str, key: &str) {
    std::fs::write(bed.data_dir.join("server.crt"), crt).unwrap();
    std::fs::write(bed.data_dir.join("server.key"), key).unwrap();
}

/// The certificate a server presents on `port` (PEM), as openssl s_client sees it.
fn presented_certificate(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-starttls", "postgres"])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (apt-get install openssl)");
    let text = String::from_utf8_lossy(&out.stdout);
    let begin = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    text[begin..end].to_string()
}

fn same_pem(a: &str, b: &str) -> bool {
    let squeeze = |s: &str| s.split_whitespace().collect::<String>();
    squeeze(a) == squeeze(b)
}

/// A certificate for `key_file`'s key, signed by `ca`, that expired yesterday.
fn expired_certificate(ca: &pemworker::certs::Authority, cn: &str, key_file: &Path) -> String {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    };
    let key = KeyPair::from_pem(&std::fs::read_to_string(key_file).unwrap()).unwrap();
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem).unwrap()).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    params.signed_by(&key, &issuer).unwrap().pem()
}

/// When a log line was written (its leading RFC 3339 time), in seconds.
fn logged_at(line: &str) -> f64 {
    let stamp = line.split_whitespace().next().unwrap_or("");
    chrono::DateTime::parse_from_rfc3339(stamp)
        .map(|t| t.timestamp_micros() as f64 / 1e6)
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renewed_replaced_or_expired_under_running_agents() {
    let bed = TestBed::start();
    let mut agents = fleet(&bed, 2, 2, 2).await;
    let su = bed.connect(&bed.superuser()).await;
    log_heartbeats(&su).await;
    for (i, a) in agents.iter_mut().enumerate() {
        // Each agent has its own copy of the root certificate, as on its own host; sessions to
        // the PEM server are renewed every 2 s, so the agents keep opening new ones.
        let root = a.site.join("root.crt");
        std::fs::copy(&bed.root_crt, &root).unwrap();
        a.settings.extend([
            ("pem_ssl_root_cert", root.display().to_string()),
            ("pem_session_lifetime", "2".into()),
        ]);
        if i == 0 {
            // Its debug lines show every connection attempt.
            a.settings.push(("log_level", "debug1".into()));
        }
        a.start(&bed);
    }
    let up = server_now(&su).await;
    wait_for(
        "both agents' first samples",
        Duration::from_secs(30),
        || async {
            let now = server_now(&su).await;
            let mut ok = true;
            for a in &agents {
                ok &= longest_heartbeat_gap(&su, a.id, &up, &now).await.1 > 2
                    && history_rows(&su, "cpu_usage", a.id).await > 0;
            }
            ok
        },
    )
    .await;

    // 1. The server certificate renewed by the same CA: pgBouncer reloads, PostgreSQL too.
    let (crt, key) = bed.ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    let t0 = server_now(&su).await;
    replace_server_certificate(&bed, &crt, &key);
    bed.console("RELOAD").await;
    pool::batch(&su, "reload", "SELECT pg_reload_conf()")
        .await
        .unwrap();
    assert!(
        same_pem(&presented_certificate(bed.pgb_port), &crt),
        "pgBouncer serves the new certificate"
    );
    assert!(
        same_pem(&presented_certificate(bed.pg_port), &crt),
        "PostgreSQL serves the new certificate"
    );
    let info_before = history_rows(&su, "server_info", agents[0].id).await;
    let (cpu0, from) = (agents[1].cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let baseline = (agents[1].cpu_seconds() - cpu0) / from.elapsed().as_secs_f64() * 100.0;
    let t1 = server_now(&su).await;
    for a in &agents {
        let (gap, beats) = longest_heartbeat_gap(&su, a.id, &t0, &t1).await;
        eprintln!(
            "agent {}: server certificate renewed: {beats} heartbeats in 10 s, longest gap {gap:.2} s",
            a.id
        );
        assert!(
            gap <= 2.0,
            "agent {}: more than one heartbeat lost ({gap:.2} s)",
            a.id
        );
        assert!(a.log_lines(&["certificate"]).is_empty(), "{}", a.log_text());
    }
    assert!(
        history_rows(&su, "server_info", agents[0].id).await >= info_before + 3,
        "the monitored server is probed over its new certificate"
    );

    // 2. The CA replaced: the server's new certificate is from a CA the agents do not know
    //    (pgBouncer still accepts their certificates from the old one).
    let ca2 = pemworker::certs::Authority::generate("replacement CA").unwrap();
    let (crt2, key2) = ca2.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    let both = format!("{}{}", bed.ca.cert_pem, ca2.cert_pem);
    std::fs::write(&bed.root_crt, &both).unwrap();
    replace_server_certificate(&bed, &crt2, &key2);
    bed.console("RELOAD").await;
    let root1 = agents[1].site.join("root.crt").display().to_string();
    wait_for(
        "the agents to name the problem",
        Duration::from_secs(20),
        || async {
            agents
                .iter()
                .all(|a| !a.log_lines(&["certificate verify failed"]).is_empty())
        },
    )
    .await;
    // Over 20 s of failing: CPU (of the agent with only its own host's probes), attempts,
    // lines.
    let window = Duration::from_secs(20);
    let (cpu0, from) = (agents[1].cpu_seconds(), Instant::now());
    let logged_from = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    tokio::time::sleep(window).await;
    let cpu = (agents[1].cpu_seconds() - cpu0) / from.elapsed().as_secs_f64() * 100.0;
    let logged_to = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    let attempts: Vec<f64> = agents[0]
        .log_lines(&[
            "DEBUG",
            "PEM server: cannot connect",
            "certificate verify failed",
        ])
        .iter()
        .map(|l| logged_at(l))
        .filter(|t| (logged_from..logged_to).contains(t))
        .collect();
    eprintln!(
        "CA replaced: agent CPU {cpu:.2}% of one core over {} s (before: {baseline:.2}%); {} attempts by the other agent: {:?}",
        window.as_secs(),
        attempts.len(),
        attempts
            .windows(2)
            .map(|w| format!("{:.1} s", w[1] - w[0]))
            .collect::<Vec<_>>()
    );
    assert!(
        cpu < 3.0,
        "CPU {cpu:.2}% of one core while it cannot connect"
    );
    assert!(
        (2..=5).contains(&attempts.len()),
        "attempts every long_wait ({LONG_WAIT} s): {attempts:?}"
    );
    for w in attempts.windows(2) {
        assert!(w[1] - w[0] >= 0.85 * LONG_WAIT as f64, "{attempts:?}");
    }
    let lines = agents[1].log_lines(&["certificate"]);
    assert_eq!(lines.len(), 1, "one line: {lines:#?}");
    assert!(
        lines[0].contains("ERROR")
            && lines[0].contains(&format!(
                "is not signed by a CA in {root1} (pem_ssl_root_cert)"
            ))
            && lines[0].contains(&format!("put the new CA certificate in {root1}"))
            && lines[0].contains("every 5 s (long_wait)"),
        "{}",
        lines[0]
    );
    // The fix, as the line says: the new CA in the file. No restart.
    let fixed = server_now(&su).await;
    for a in &agents {
        std::fs::write(a.site.join("root.crt"), &both).unwrap();
    }
    wait_for(
        "heartbeats with the new CA",
        Duration::from_secs(LONG_WAIT + 10),
        || async {
            let now = server_now(&su).await;
            let mut ok = true;
            for a in &agents {
                ok &= longest_heartbeat_gap(&su, a.id, &fixed, &now).await.1 > 0;
            }
            ok
        },
    )
    .await;

    // 3. An expired agent certificate: one line naming the file and the command that renews it.
    let a1 = &mut agents[1];
    assert_eq!(a1.stop().await, 0, "{}", a1.stderr());
    let crt_file = a1.site.join(".pem/pem_agent_user1.crt");
    let key_file = a1.site.join(".pem/pem_agent_user1.key");
    std::fs::write(
        &crt_file,
        expired_certificate(&bed.ca, "pem_agent_user1", &key_file),
    )
    .unwrap();
    std::fs::write(&a1.log, "").unwrap();
    a1.start(&bed);
    let expired = format!("this agent's certificate {} expired on", crt_file.display());
    wait_for(
        "the expired certificate named",
        Duration::from_secs(20),
        || async { !a1.log_lines(&[&expired]).is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2 * LONG_WAIT)).await;
    assert!(a1.is_running(), "{}", a1.stderr());
    let lines = a1.log_lines(&["ERROR", "certificate"]);
    assert_eq!(lines.len(), 1, "one line: {lines:#?}");
    let command = lines[0]
        .split_once("get a new one with: ")
        .and_then(|(_, c)| c.split_once(" (add"))
        .map(|(c, _)| c.to_string())
        .unwrap_or_else(|| panic!("a command in: {}", lines[0]));
    assert!(
        command.starts_with("pemworker --register-agent --force-registration"),
        "{command}"
    );
    // The command works, filled in as its placeholders say; the agent takes the new
    // certificate at its next attempt and keeps its id.
    let etc = a1.cfg.parent().unwrap().display().to_string();
    let args: Vec<String> = command
        .replace("<directory of agent.cfg>", &etc)
        .replace("<a PEM admin>", common::ADMIN_USER)
        .split_whitespace()
        .skip(1)
        .map(String::from)
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", common::ADMIN_PASSWORD)]);
    let (code, stdout, stderr) = common::outcome(&out);
    assert_eq!(code, 0, "{command}: {stdout}{stderr}");
    assert!(
        std::fs::read_to_string(&a1.cfg)
            .unwrap()
            .contains(&format!("agent_id={}", a1.id))
    );
    let renewed = server_now(&su).await;
    wait_for(
        "heartbeats with the new certificate",
        Duration::from_secs(LONG_WAIT + 10),
        || async {
            let now = server_now(&su).await;
            longest_heartbeat_gap(&su, a1.id, &renewed, &now).await.1 > 0
        },
    )
    .await;
    for a in agents.iter_mut() {
        assert_eq!(a.stop().await, 0, "{}", a.stderr());
        assert_eq!(
            a.stats().spooled_samples,
            0,
            "agent {}: delivered what it kept meanwhile",
            a.id
        );
    }
}
