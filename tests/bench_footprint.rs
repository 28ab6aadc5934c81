//! Benchmark, not a test: pemworker's footprint beside the agents DBAs run today, collectd
//! (postgresql plugin) and prometheus-postgres-exporter (scraped from here), all against one
//! private PostgreSQL 15 and pgBouncer, one agent at a time, in rounds whose order alternates so
//! that drift on a shared machine falls on all three. `scripts/bench-footprint` installs the
//! peers, builds in release, runs this and passes its flags as:
//!
//! - `PEMWORKER_BENCH_WINDOW` (s, default 120): each measured window;
//! - `PEMWORKER_BENCH_ROUNDS` (default 2): rounds, each running every agent once;
//! - `PEMWORKER_BENCH_INTERVAL` (s, default 10): every pemworker probe's and collectd's
//!   interval, and the exporter's scrape interval;
//! - `PEMWORKER_BENCH_WARMUP` (s, default 15): how long each agent runs before its window opens;
//! - `PEMWORKER_BENCH_SYSCALL_WINDOW` (s, default 60, 0 skips them): the window of the separate
//!   runs under strace that count fsyncs, kept apart so that strace never distorts CPU figures;
//! - `PEMWORKER_BENCH_COMMIT`: the commit measured, printed with the table.
//!
//! Where each figure comes from: CPU from the process's CPU clock (`clock_getcpuclockid`:
//! nanoseconds, every thread, finished ones included); RSS and threads from /proc/PID/status
//! (polled every second; the peak is VmHWM); context switches summed over
//! /proc/PID/task/*/status; disk writes from /proc/PID/io; values per interval from what each
//! agent stored (pemworker: rows x columns on the PEM server; collectd: values its csv writer
//! wrote; the exporter: sample lines per scrape); the server side is the CPU of PostgreSQL's
//! backends (live ones, plus finished ones as the postmaster's reaped-children time) and of
//! pgBouncer during the window.
//!
//!     scripts/bench-footprint [--window S] [--rounds N]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::TestBed;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pemworker::connection::pool;
use pemworker::probes::PROBES;
use tokio_postgres::types::Type;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: expected a whole number")),
        _ => default,
    }
}

struct Settings {
    window: Duration,
    rounds: usize,
    interval: u64,
    warmup: Duration,
    syscall_window: Duration,
    commit: String,
}

impl Settings {
    fn from_env() -> Settings {
        let s = Settings {
            window: Duration::from_secs(env_u64("PEMWORKER_BENCH_WINDOW", 120)),
            rounds: env_u64("PEMWORKER_BENCH_ROUNDS", 2) as usize,
            interval: env_u64("PEMWORKER_BENCH_INTERVAL", 10),
            warmup: Duration::from_secs(env_u64("PEMWORKER_BENCH_WARMUP", 15)),
            syscall_window: Duration::from_secs(env_u64("PEMWORKER_BENCH_SYSCALL_WINDOW", 60)),
            commit: std::env::var("PEMWORKER_BENCH_COMMIT").unwrap_or_else(|_| "unknown".into()),
        };
        assert!(s.rounds >= 1, "PEMWORKER_BENCH_ROUNDS must be at least 1");
        assert!(
            s.interval >= 1,
            "PEMWORKER_BENCH_INTERVAL must be at least 1"
        );
        assert!(
            s.window.as_secs() >= s.interval,
            "the window must hold at least one interval"
        );
        s
    }

    fn intervals(&self, secs: f64) -> f64 {
        secs / self.interval as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Agent {
    Pemworker,
    Collectd,
    Exporter,
}

impl Agent {
    const ALL: [Agent; 3] = [Agent::Pemworker, Agent::Collectd, Agent::Exporter];

    fn name(self) -> &'static str {
        match self {
            Agent::Pemworker => "pemworker",
            Agent::Collectd => "collectd",
            Agent::Exporter => "exporter",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What /proc and the CPU clocks say about a process.

/// CPU time of a whole process (all threads, finished ones included), in seconds.
fn cpu_seconds(pid: i32) -> Option<f64> {
    let clock = nix::time::clock_getcpuclockid(Pid::from_raw(pid)).ok()?;
    let t = nix::time::clock_gettime(clock).ok()?;
    Some(t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

/// A `key: value ...` line of a /proc file, as a number.
fn proc_value(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn status(pid: i32, key: &str) -> Option<u64> {
    proc_value(Path::new(&format!("/proc/{pid}/status")), key)
}

/// The fields of /proc/PID/stat after the command name: [0] is the state, [1] the parent.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 2..)?;
    Some(after.split_whitespace().map(String::from).collect())
}

fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// Voluntary plus involuntary context switches of each live thread.
fn switches_by_thread(pid: i32) -> HashMap<i32, u64> {
    let mut m = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return m;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let p = e.path().join("status");
        if let (Some(v), Some(n)) = (
            proc_value(&p, "voluntary_ctxt_switches:"),
            proc_value(&p, "nonvoluntary_ctxt_switches:"),
        ) {
            m.insert(tid, v + n);
        }
    }
    m
}

/// Context switches since `new`, over threads that come and go: each thread counts from its
/// first sighting (zero when born after the start) to its last.
struct Switches {
    start: HashMap<i32, u64>,
    last: HashMap<i32, u64>,
}

impl Switches {
    fn new(pid: i32) -> Switches {
        let start = switches_by_thread(pid);
        Switches {
            last: start.clone(),
            start,
        }
    }

    fn poll(&mut self, pid: i32) {
        self.last.extend(switches_by_thread(pid));
    }

    fn total(&self) -> u64 {
        self.last
            .iter()
            .map(|(tid, n)| n - self.start.get(tid).copied().unwrap_or(0).min(*n))
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// The server side: PostgreSQL's backends and pgBouncer.

/// PostgreSQL processes that run whatever the clients do; everything else the postmaster
/// starts (client backends, autovacuum workers) counts as a backend.
const AUXILIARY: &[&str] = &[
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "logical replication launcher",
    "archiver",
    "stats collector",
];

struct ServerSide {
    postmaster: i32,
    pgbouncer: i32,
    hz: f64,
}

impl ServerSide {
    fn find(bed: &TestBed) -> ServerSide {
        let first_line = |p: PathBuf| -> i32 {
            std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no pid in {}", p.display()))
        };
        ServerSide {
            postmaster: first_line(bed.data_dir.join("postmaster.pid")),
            pgbouncer: first_line(bed.pgb_run_dir.join("pgbouncer.pid")),
            hz: clock_ticks_per_second(),
        }
    }

    /// CPU seconds of every backend so far: live ones from their clocks, finished ones from
    /// the postmaster's reaped-children time.
    fn backends_cpu(&self) -> f64 {
        let mut total = 0.0;
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Some(f) = stat_fields(pid) else { continue };
            if f.get(1).and_then(|p| p.parse::<i32>().ok()) != Some(self.postmaster) {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let title = cmdline.strip_prefix("postgres: ").unwrap_or(&cmdline);
            if AUXILIARY.iter().any(|a| title.starts_with(a)) {
                continue;
            }
            total += cpu_seconds(pid).unwrap_or(0.0);
        }
        let reaped = stat_fields(self.postmaster)
            .map(|f| {
                f[13].parse::<u64>().unwrap_or(0) as f64 + f[14].parse::<u64>().unwrap_or(0) as f64
            })
            .unwrap_or(0.0);
        total + reaped / self.hz
    }

    fn pgbouncer_cpu(&self) -> f64 {
        cpu_seconds(self.pgbouncer).expect("pgBouncer is running")
    }
}

// ---------------------------------------------------------------------------------------------
// The agents.

fn find_program(name: &str, hint: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found; install it with `{hint}` (or run scripts/bench-footprint, which does)"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Sample lines of one exporter scrape, and whether it reached PostgreSQL (`pg_up 1`).
fn scrape(port: u16) -> Option<(usize, bool)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.") || !head.lines().next()?.contains(" 200") {
        return None;
    }
    let samples = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    Some((samples, body.lines().any(|l| l == "pg_up 1")))
}

/// Values collectd's csv writer wrote with a time stamp in [from, to).
fn collectd_values(dir: &Path, from: f64, to: f64) -> u64 {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            for line in std::fs::read_to_string(&p).unwrap_or_default().lines() {
                let mut fields = line.split(',');
                let Some(t) = fields.next().and_then(|t| t.parse::<f64>().ok()) else {
                    continue;
                };
                if t >= from && t < to {
                    n += fields.count() as u64;
                }
            }
        }
    }
    n
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// One agent running.
struct Running {
    agent: Agent,
    child: Child,
    log: PathBuf,
    scrape_port: Option<u16>,
    next_scrape: Instant,
    /// Lines of each scrape and when it was taken.
    scrapes: Vec<(Instant, usize)>,
}

impl Running {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until `until`, scraping the exporter when due and calling `poll` every second;
    /// an agent that exits is a failure showing its log.
    fn run_until(&mut self, until: Instant, interval: u64, mut poll: impl FnMut(i32)) {
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                panic!(
                    "{} exited ({st}): {}",
                    self.agent.name(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            if let Some(port) = self.scrape_port {
                if now >= self.next_scrape {
                    match scrape(port) {
                        Some((lines, true)) => self.scrapes.push((now, lines)),
                        Some((_, false)) => panic!(
                            "the exporter does not reach PostgreSQL (pg_up is not 1): {}",
                            std::fs::read_to_string(&self.log).unwrap_or_default()
                        ),
                        None => eprintln!("exporter scrape failed; next one in {interval} s"),
                    }
                    self.next_scrape += Duration::from_secs(interval);
                }
            }
            poll(self.pid());
            let mut next = (now + Duration::from_secs(1)).min(until);
            if self.scrape_port.is_some() {
                next = next.min(self.next_scrape);
            }
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }

    /// SIGTERM, then SIGKILL if it is still there after 20 s (pemworker delivers for up to
    /// 10 s before it exits).
    fn stop(mut self) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one window of one agent gave.
#[derive(Debug, Clone)]
struct Measured {
    secs: f64,
    cpu: f64,
    values: f64,
    rss_steady_kib: f64,
    rss_peak_kib: f64,
    threads: f64,
    write_bytes: f64,
    switches: f64,
    backends_cpu: f64,
    pgbouncer_cpu: f64,
    load: (f64, f64),
}

struct Bench {
    bed: TestBed,
    settings: Settings,
    cfg: PathBuf,
    agent_id: i32,
    monitor_password: String,
    dir: PathBuf,
    server: ServerSide,
    collectd: PathBuf,
    exporter: PathBuf,
    rt: tokio::runtime::Runtime,
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

impl Bench {
    fn setup(settings: Settings) -> Bench {
        let collectd = find_program("collectd", "apt-get install collectd-core");
        let exporter = find_program(
            "prometheus-postgres-exporter",
            "apt-get install prometheus-postgres-exporter",
        );
        let bed = TestBed::start();
        let (cfg, agent_id) = bed.register_agent("bench");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let interval = settings.interval as i32;
        rt.block_on(async {
            // The monitored PostgreSQL (the bed's own, through a `monitor` login in pg_monitor)
            // and pgBouncer, every probe of all three kinds at the interval.
            pemworker::sandbox::bind_servers(&bed, agent_id, &cfg, interval)
                .await
                .unwrap();
            let su = bed.connect(&bed.superuser()).await;
            pool::execute(
                &su,
                "scheduling the agent-level probes",
                "INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
                 SELECT $1, NULL, p.id, $2, true FROM pem.probe p WHERE p.target_type = 'agent'",
                &[(&agent_id, Type::INT4), (&interval, Type::INT4)],
            )
            .await
            .unwrap();
        });
        // bind_servers keeps the monitor login's password in the agent's ~/.pgpass; the peers
        // get the same login.
        let pgpass = std::fs::read_to_string(bed.home.join(".pgpass")).unwrap();
        let prefix = format!("127.0.0.1:{}:*:monitor:", bed.pg_port);
        let monitor_password = pgpass
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .expect("the monitor login in .pgpass")
            .to_string();
        // The peers' configurations hold the monitor login's password: private to this user.
        let dir = bed.root.join("bench");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let server = ServerSide::find(&bed);
        Bench {
            bed,
            settings,
            cfg,
            agent_id,
            monitor_password,
            dir,
            server,
            collectd,
            exporter,
            rt,
        }
    }

    fn version(&self, agent: Agent) -> String {
        let first_line = |mut c: Command| {
            c.output()
                .ok()
                .map(|o| {
                    let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
                    t.push_str(&String::from_utf8_lossy(&o.stderr));
                    t.lines().next().unwrap_or_default().trim().to_string()
                })
                .unwrap_or_default()
        };
        match agent {
            Agent::Pemworker => format!("pemworker {}", env!("CARGO_PKG_VERSION")),
            Agent::Collectd => {
                // `collectd -h` ends with "collectd 5.12.0.git, http://collectd.org/".
                let out = Command::new(&self.collectd).arg("-h").output();
                let text = out
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let v = text
                    .lines()
                    .find_map(|l| l.strip_prefix("collectd "))
                    .and_then(|l| l.split([',', ' ']).next())
                    .unwrap_or("")
                    .trim_end_matches(".git");
                format!("collectd {v} (postgresql plugin)")
            }
            Agent::Exporter => {
                let mut c = Command::new(&self.exporter);
                c.arg("--version");
                let l = first_line(c);
                let v = l.split_whitespace().nth(2).unwrap_or("");
                format!(
                    "prometheus-postgres-exporter {v} (scraped every {} s)",
                    self.settings.interval
                )
            }
        }
    }

    fn start(&self, agent: Agent, run: &str) -> Running {
        let dir = self.dir.join(run);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("output.log");
        let out = || std::fs::File::create(&log).unwrap();
        let (child, scrape_port) = match agent {
            Agent::Pemworker => {
                let child = self.bed.start_worker(
                    &self.cfg,
                    &[
                        ("state_dir", dir.join("state").display().to_string()),
                        ("log_location", log.display().to_string()),
                    ],
                );
                (child, None)
            }
            Agent::Collectd => {
                let conf = dir.join("collectd.conf");
                std::fs::write(&conf, self.collectd_conf(&dir)).unwrap();
                let child = Command::new(&self.collectd)
                    .arg("-f")
                    .arg("-C")
                    .arg(&conf)
                    .env_clear()
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                    .env("PGSSLROOTCERT", &self.bed.root_crt)
                    .stdin(Stdio::null())
                    .stdout(out())
                    .stderr(out())
                    .spawn()
                    .expect("start collectd");
                (child, None)
            }
            Agent::Exporter => {
                let port = free_port();
                let dsn = format!(
                    "postgresql://monitor:{}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
                    self.monitor_password,
                    self.bed.pg_port,
                    self.bed.root_crt.display()
                );
                let child = Command::new(&self.exporter)
                    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                    .env_clear()
                    .env("DATA_SOURCE_NAME", dsn)
                    .stdin(Stdio::null())
                    .stdout(out())
                    .stderr(out())
                    .spawn()
                    .expect("start prometheus-postgres-exporter");
                (child, Some(port))
            }
        };
        Running {
            agent,
            child,
            log,
            scrape_port,
            // Give the exporter a moment to listen before the first scrape.
            next_scrape: Instant::now() + Duration::from_secs(2),
            scrapes: Vec::new(),
        }
    }

    /// collectd as a DBA would run it for PostgreSQL: the postgresql plugin with its default
    /// queries on the monitored server, values stored by the csv writer, warnings to a file.
    fn collectd_conf(&self, dir: &Path) -> String {
        format!(
            r#"Hostname "bench"
FQDNLookup false
Interval {interval}
BaseDir "{dir}"
PIDFile "{dir}/collectd.pid"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin logfile
<Plugin logfile>
  LogLevel warning
  File "{dir}/collectd.log"
</Plugin>
LoadPlugin csv
<Plugin csv>
  DataDir "{dir}/csv"
  StoreRates false
</Plugin>
LoadPlugin postgresql
<Plugin postgresql>
  <Database postgres>
    Host "127.0.0.1"
    Port "{port}"
    User "monitor"
    Password "{password}"
    SSLMode "verify-full"
  </Database>
</Plugin>
"#,
            interval = self.settings.interval,
            dir = dir.display(),
            port = self.bed.pg_port,
            password = self.monitor_password,
        )
    }

    /// Values pemworker stored on the PEM server with a collection time in [from, to): rows
    /// times the probe's columns.
    fn pemworker_values(&self, from: SystemTime, to: SystemTime) -> u64 {
        let (from, to) = (
            chrono::DateTime::<chrono::Utc>::from(from).to_rfc3339(),
            chrono::DateTime::<chrono::Utc>::from(to).to_rfc3339(),
        );
        self.rt.block_on(async {
            let su = self.bed.connect(&self.bed.superuser()).await;
            let mut values = 0;
            for p in PROBES {
                let sql = format!(
                    "SELECT count(*) FROM pemhistory.{} WHERE agent_id = $1 \
                     AND collected_at >= $2::text::timestamptz AND collected_at < $3::text::timestamptz",
                    p.name
                );
                let row = pool::query_one(
                    &su,
                    "counting stored rows",
                    &sql,
                    &[
                        (&self.agent_id, Type::INT4),
                        (&from, Type::TEXT),
                        (&to, Type::TEXT),
                    ],
                )
                .await
                .unwrap();
                let rows: i64 = pool::get(&row, 0, "counting stored rows").unwrap();
                values += rows as u64 * p.columns.len() as u64;
            }
            values
        })
    }

    fn measure(&self, agent: Agent, run: &str) -> Measured {
        let s = &self.settings;
        let mut r = self.start(agent, run);
        r.run_until(Instant::now() + s.warmup, s.interval, |_| {});

        let pid = r.pid();
        let (wall0, t0) = (SystemTime::now(), Instant::now());
        let cpu0 = cpu_seconds(pid).unwrap();
        let io0 = proc_value(Path::new(&format!("/proc/{pid}/io")), "write_bytes:").unwrap();
        let (pg0, pgb0) = (self.server.backends_cpu(), self.server.pgbouncer_cpu());
        let mut switches = Switches::new(pid);
        let mut rss = Vec::new();
        let mut threads = 0;
        let mut load = (f64::MAX, 0.0f64);
        r.run_until(t0 + s.window, s.interval, |pid| {
            if let Some(v) = status(pid, "VmRSS:") {
                rss.push(v);
            }
            threads = threads.max(status(pid, "Threads:").unwrap_or(0));
            switches.poll(pid);
            let l = load_average();
            load = (load.0.min(l), load.1.max(l));
        });
        let cpu = cpu_seconds(pid).unwrap() - cpu0;
        let write_bytes =
            proc_value(Path::new(&format!("/proc/{pid}/io")), "write_bytes:").unwrap() - io0;
        let backends_cpu = self.server.backends_cpu() - pg0;
        let pgbouncer_cpu = self.server.pgbouncer_cpu() - pgb0;
        switches.poll(pid);
        let secs = t0.elapsed().as_secs_f64();
        let wall1 = SystemTime::now();
        let rss_peak = status(pid, "VmHWM:").unwrap_or(0);
        let in_window: Vec<usize> = r
            .scrapes
            .iter()
            .filter(|(at, _)| *at >= t0 && at.duration_since(t0).as_secs_f64() < secs)
            .map(|(_, n)| *n)
            .collect();
        r.stop();

        let values = match agent {
            Agent::Pemworker => self.pemworker_values(wall0, wall1) as f64,
            Agent::Collectd => {
                collectd_values(&self.dir.join(run).join("csv"), epoch(wall0), epoch(wall1)) as f64
            }
            Agent::Exporter => in_window.iter().sum::<usize>() as f64,
        };
        assert!(
            values > 0.0,
            "{} stored no value in the window; see {}",
            agent.name(),
            self.dir.join(run).display()
        );
        rss.sort_unstable();
        Measured {
            secs,
            cpu,
            values: match agent {
                // Per scrape, however many scrapes fell in the window.
                Agent::Exporter => values / in_window.len() as f64 * s.intervals(secs),
                _ => values,
            },
            rss_steady_kib: rss.get(rss.len() / 2).copied().unwrap_or(0) as f64,
            rss_peak_kib: rss_peak as f64,
            threads: threads as f64,
            write_bytes: write_bytes as f64,
            switches: switches.total() as f64,
            backends_cpu,
            pgbouncer_cpu,
            load,
        }
    }

    /// The server side with no agent running, over one window: (backends, pgBouncer) CPU
    /// seconds and the window's length.
    fn idle_server(&self) -> (f64, f64, f64) {
        let t0 = Instant::now();
        let (pg0, pgb0) = (self.server.backends_cpu(), self.server.pgbouncer_cpu());
        std::thread::sleep(self.settings.window);
        (
            self.server.backends_cpu() - pg0,
            self.server.pgbouncer_cpu() - pgb0,
            t0.elapsed().as_secs_f64(),
        )
    }

    /// fsync-family calls of one agent per interval over the syscall window, counted by strace
    /// in a run of its own.
    fn count_syncs(&self, agent: Agent) -> f64 {
        let (calls, _, secs) = self.traced_window(agent, &format!("{}-syscalls", agent.name()));
        calls as f64 / self.settings.intervals(secs)
    }

    /// pemworker with nothing to collect: every probe rescheduled to once a day, so that after
    /// the round at start only heartbeats and schedule checks run. Disk bytes written and
    /// fsync-family calls over the syscall window (after the warm-up), per interval.
    fn idle_disk(&self) -> (f64, f64) {
        let reschedule = |interval: i32| {
            self.rt.block_on(async {
                let su = self.bed.connect(&self.bed.superuser()).await;
                pool::execute(
                    &su,
                    "rescheduling the probes",
                    "UPDATE pem.probe_schedule SET interval = $2 WHERE agent_id = $1",
                    &[(&self.agent_id, Type::INT4), (&interval, Type::INT4)],
                )
                .await
                .unwrap();
            })
        };
        reschedule(86_400);
        let (calls, bytes, secs) = self.traced_window(Agent::Pemworker, "pemworker-idle");
        reschedule(self.settings.interval as i32);
        let intervals = self.settings.intervals(secs);
        (bytes as f64 / 1024.0 / intervals, calls as f64 / intervals)
    }

    /// One agent in a run of its own: after the warm-up, its fsync-family calls (strace) and the
    /// bytes it wrote to disk (/proc/PID/io) over the syscall window, and the window's length.
    fn traced_window(&self, agent: Agent, run: &str) -> (u64, u64, f64) {
        let s = &self.settings;
        let mut r = self.start(agent, run);
        r.run_until(Instant::now() + s.warmup, s.interval, |_| {});
        let out = self.dir.join(run).join("strace.txt");
        let io = format!("/proc/{}/io", r.pid());
        let mut strace = Command::new(find_program("strace", "apt-get install strace"))
            .args(["-f", "-c", "-qq", "-e"])
            .arg("trace=fsync,fdatasync,sync_file_range,sync,syncfs,msync")
            .arg("-o")
            .arg(&out)
            .arg("-p")
            .arg(r.pid().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start strace");
        let io0 = proc_value(Path::new(&io), "write_bytes:").unwrap();
        let t0 = Instant::now();
        r.run_until(t0 + s.syscall_window, s.interval, |_| {});
        let secs = t0.elapsed().as_secs_f64();
        let bytes = proc_value(Path::new(&io), "write_bytes:").unwrap() - io0;
        let _ = kill(Pid::from_raw(strace.id() as i32), Signal::SIGINT);
        let _ = strace.wait();
        r.stop();
        let calls = strace_calls(&std::fs::read_to_string(&out).unwrap_or_default());
        (calls, bytes, secs)
    }
}

/// The total of the "calls" column of `strace -c`: its rows are `% time, seconds, usecs/call,
/// calls, [errors,] syscall`.
fn strace_calls(summary: &str) -> u64 {
    summary
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.last()?;
            if f.len() < 5 || name == "total" || name == "syscall" {
                return None;
            }
            f[3].parse::<u64>().ok()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// The table.

struct Metric {
    name: &'static str,
    digits: usize,
    value: fn(&Measured, &Settings) -> f64,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "CPU, % of one core",
        digits: 3,
        value: |m, _| m.cpu / m.secs * 100.0,
    },
    Metric {
        name: "CPU per value, µs",
        digits: 1,
        value: |m, _| m.cpu / m.values * 1e6,
    },
    Metric {
        name: "values per interval",
        digits: 0,
        value: |m, s| m.values / s.intervals(m.secs),
    },
    Metric {
        name: "RSS steady, MiB",
        digits: 1,
        value: |m, _| m.rss_steady_kib / 1024.0,
    },
    Metric {
        name: "RSS peak (VmHWM), MiB",
        digits: 1,
        value: |m, _| m.rss_peak_kib / 1024.0,
    },
    Metric {
        name: "threads",
        digits: 0,
        value: |m, _| m.threads,
    },
    Metric {
        name: "disk writes per interval, KiB",
        digits: 1,
        value: |m, s| m.write_bytes / 1024.0 / s.intervals(m.secs),
    },
    Metric {
        name: "context switches per interval",
        digits: 0,
        value: |m, s| m.switches / s.intervals(m.secs),
    },
    Metric {
        name: "server: PostgreSQL backends CPU, % of one core",
        digits: 3,
        value: |m, _| m.backends_cpu / m.secs * 100.0,
    },
    Metric {
        name: "server: pgBouncer CPU, % of one core",
        digits: 3,
        value: |m, _| m.pgbouncer_cpu / m.secs * 100.0,
    },
];

fn fmt(v: f64, digits: usize) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    format!("{v:.digits$}")
}

/// The mean, with the range over rounds when there are several.
fn cell(vs: &[f64], digits: usize) -> String {
    let mean = vs.iter().sum::<f64>() / vs.len() as f64;
    let (lo, hi) = vs
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
    if vs.len() < 2 || fmt(lo, digits) == fmt(hi, digits) {
        fmt(mean, digits)
    } else {
        format!(
            "{} ({}–{})",
            fmt(mean, digits),
            fmt(lo, digits),
            fmt(hi, digits)
        )
    }
}

/// pemworker's value over the peer's, round by round (each pair ran back to back): the
/// median, with the range.
fn ratio_cell(pem: &[f64], peer: &[f64]) -> String {
    let mut r: Vec<f64> = pem
        .iter()
        .zip(peer)
        .filter(|(_, b)| **b > 0.0)
        .map(|(a, b)| a / b)
        .collect();
    if r.is_empty() {
        return "-".into();
    }
    r.sort_by(|a, b| a.total_cmp(b));
    let median = if r.len() % 2 == 1 {
        r[r.len() / 2]
    } else {
        (r[r.len() / 2 - 1] + r[r.len() / 2]) / 2.0
    };
    let f = |v: f64| {
        if v >= 10.0 {
            format!("{v:.0}")
        } else if v >= 1.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        }
    };
    if r.len() < 2 || f(r[0]) == f(r[r.len() - 1]) {
        format!("{}x", f(median))
    } else {
        format!("{}x ({}–{})", f(median), f(r[0]), f(r[r.len() - 1]))
    }
}

#[test]
#[ignore = "benchmark: run scripts/bench-footprint"]
fn footprint_beside_collectd_and_exporter() {
    let bench = Bench::setup(Settings::from_env());
    let s = &bench.settings;
    let labels: HashMap<Agent, String> =
        Agent::ALL.iter().map(|a| (*a, bench.version(*a))).collect();
    eprintln!(
        "footprint: {} rounds of {} s windows (+{} s warm-up) per agent, interval {} s; PostgreSQL on port {}, pgBouncer on port {}",
        s.rounds,
        s.window.as_secs(),
        s.warmup.as_secs(),
        s.interval,
        bench.bed.pg_port,
        bench.bed.pgb_port
    );

    let (idle_pg, idle_pgb, idle_secs) = bench.idle_server();
    eprintln!(
        "no agent: PostgreSQL backends {:.3}%, pgBouncer {:.3}% of a core",
        idle_pg / idle_secs * 100.0,
        idle_pgb / idle_secs * 100.0
    );
    let mut results: HashMap<Agent, Vec<Measured>> = HashMap::new();
    for round in 0..s.rounds {
        let mut order = Agent::ALL.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for agent in order {
            let m = bench.measure(agent, &format!("{}-{}", agent.name(), round + 1));
            eprintln!(
                "round {} {:<9}: CPU {:.3}% of a core, {:.0} values per interval, RSS {:.1} MiB, load {:.2}-{:.2}",
                round + 1,
                agent.name(),
                m.cpu / m.secs * 100.0,
                m.values / s.intervals(m.secs),
                m.rss_steady_kib / 1024.0,
                m.load.0,
                m.load.1
            );
            results.entry(agent).or_default().push(m);
        }
    }
    let syncs: HashMap<Agent, f64> = if s.syscall_window.is_zero() {
        HashMap::new()
    } else {
        Agent::ALL
            .iter()
            .map(|a| {
                let n = bench.count_syncs(*a);
                eprintln!(
                    "{:<9}: {n:.2} fsync-family calls per interval (strace)",
                    a.name()
                );
                (*a, n)
            })
            .collect()
    };

    let idle = (!s.syscall_window.is_zero()).then(|| {
        let (kib, syncs) = bench.idle_disk();
        eprintln!(
            "pemworker with nothing due: {kib:.2} KiB written to disk and {syncs:.2} fsync-family calls per interval"
        );
        (kib, syncs)
    });

    let loads: Vec<f64> = results
        .values()
        .flatten()
        .flat_map(|m| [m.load.0, m.load.1])
        .collect();
    let (load_lo, load_hi) = loads
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));

    let mut out = String::new();
    out.push_str(&format!(
        "\nFootprint of pemworker beside collectd and prometheus-postgres-exporter, measured on commit {}\n\
         {} rounds of {} s per agent, one agent at a time, order alternating between rounds; every probe, \
         collectd and the scrapes at {} s; one monitored PostgreSQL 15 and one pgBouncer; \
         1-minute load average {:.2}-{:.2} on {} cores during the windows. With no agent running, the \
         server side used {:.3}% (PostgreSQL backends) and {:.3}% (pgBouncer) of a core.\n\
         Numbers of one run only mean something as ratios within the same run: the machine is shared and \
         absolute figures drift between runs.\n\n",
        s.commit,
        s.rounds,
        s.window.as_secs(),
        s.interval,
        load_lo,
        load_hi,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        idle_pg / idle_secs * 100.0,
        idle_pgb / idle_secs * 100.0
    ));
    out.push_str(&format!(
        "| | {} | {} | {} | pemworker / collectd | pemworker / exporter |\n|---|---|---|---|---|---|\n",
        labels[&Agent::Pemworker],
        labels[&Agent::Collectd],
        labels[&Agent::Exporter]
    ));
    for metric in METRICS {
        let col =
            |a: Agent| -> Vec<f64> { results[&a].iter().map(|m| (metric.value)(m, s)).collect() };
        let (p, c, e) = (
            col(Agent::Pemworker),
            col(Agent::Collectd),
            col(Agent::Exporter),
        );
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            metric.name,
            cell(&p, metric.digits),
            cell(&c, metric.digits),
            cell(&e, metric.digits),
            ratio_cell(&p, &c),
            ratio_cell(&p, &e)
        ));
    }
    if !syncs.is_empty() {
        let f = |a: Agent| syncs[&a];
        out.push_str(&format!(
            "| fsyncs per interval (separate {} s runs under strace) | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            s.syscall_window.as_secs(),
            f(Agent::Pemworker),
            f(Agent::Collectd),
            f(Agent::Exporter),
            ratio_cell(&[f(Agent::Pemworker)], &[f(Agent::Collectd)]),
            ratio_cell(&[f(Agent::Pemworker)], &[f(Agent::Exporter)])
        ));
    }
    if let Some((kib, syncs)) = idle {
        out.push_str(&format!(
            "| with nothing due (every probe once a day; separate {} s run under strace): disk writes per interval, KiB | {kib:.2} | - | - | - | - |\n\
             | with nothing due: fsyncs per interval | {syncs:.2} | - | - | - | - |\n",
            s.syscall_window.as_secs()
        ));
    }
    out.push_str(
        "\nCells: mean over rounds (lowest–highest); ratios: median of the per-round ratios (range). \
         Values per interval: pemworker's rows x columns stored on the PEM server, the values collectd's \
         csv writer wrote, the exporter's sample lines per scrape. RSS steady: median of 1 s samples; \
         peak: VmHWM. Context switches: voluntary + involuntary over all threads. Disk writes: \
         /proc/PID/io write_bytes. fsyncs: fsync, fdatasync, sync_file_range, sync, syncfs and msync \
         calls. Server: CPU of PostgreSQL's backends (client backends and autovacuum workers) and of \
         pgBouncer during the window; pemworker's include storing its samples on the PEM server, which \
         is the same PostgreSQL here.\n",
    );
    println!("{out}");
}

// ---------------------------------------------------------------------------------------------
// Profiles: the same test bed and schedule, one pemworker under a profiler.

/// The process named `name` among `pid` and its descendants (heaptrack and strace run the
/// program as a child; valgrind runs it in its own process).
fn find_descendant(pid: i32, name: &str) -> Option<i32> {
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        if comm.trim() == name {
            return Some(p);
        }
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(c) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if stat_fields(c).and_then(|f| f.get(1)?.parse::<i32>().ok()) == Some(p) {
                todo.push(c);
            }
        }
    }
    None
}

/// This program under `tool`, writing the profile into `out`, with the bed's environment.
fn profiled_command(
    tool: &str,
    exe: &Path,
    out: &Path,
    bed: &TestBed,
    window_only: bool,
) -> Command {
    let wrapper: Vec<String> = match tool {
        "callgrind" => vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            format!("--instr-atstart={}", if window_only { "no" } else { "yes" }),
            format!("--callgrind-out-file={}/callgrind.out", out.display()),
        ],
        "heaptrack" => vec![
            "heaptrack".into(),
            "-o".into(),
            format!("{}/heaptrack", out.display()),
        ],
        "strace" => vec![
            "strace".into(),
            "-f".into(),
            "-tt".into(),
            "-T".into(),
            "-o".into(),
            format!("{}/strace.txt", out.display()),
        ],
        // perf attaches to the running process for the window (see profile_pemworker).
        "smaps" | "perf" => vec![],
        other => {
            panic!("unknown profiler {other}: use callgrind, heaptrack, strace, perf or smaps")
        }
    };
    std::fs::create_dir_all(out).unwrap();
    let mut c = Command::new(wrapper.first().map_or(exe.as_os_str(), |w| w.as_ref()));
    if !wrapper.is_empty() {
        c.args(&wrapper[1..]).arg(exe);
    }
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &bed.home)
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &bed.root_crt)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out.join("output.log")).unwrap())
        .stderr(std::fs::File::create(out.join("stderr.log")).unwrap());
    c
}

/// Runs one pemworker of the benchmark's setup under `PEMWORKER_BENCH_PROFILER` (callgrind,
/// heaptrack, strace or smaps) for the warm-up and one window, or, with
/// `PEMWORKER_BENCH_PROFILE_TARGET=registration`, two registrations through pgBouncer on a fresh
/// test bed: the first (which creates the agent user, on a cold pool) and the next.
/// The binary is `PEMWORKER_BENCH_PROFILE_EXE` (the `profiling` build, with symbols); the
/// output goes to `PEMWORKER_BENCH_PROFILE_DIR`. callgrind instruments the window only (not
/// start-up nor shutdown); smaps copies /proc/PID/smaps and status at the end of the window.
#[test]
#[ignore = "profile: run scripts/bench-footprint --profile TOOL"]
fn profile_pemworker() {
    let tool = std::env::var("PEMWORKER_BENCH_PROFILER").unwrap_or_else(|_| "callgrind".into());
    let exe = std::env::var("PEMWORKER_BENCH_PROFILE_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_pemworker")));
    let out = PathBuf::from(
        std::env::var("PEMWORKER_BENCH_PROFILE_DIR").expect("PEMWORKER_BENCH_PROFILE_DIR"),
    );
    if std::env::var("PEMWORKER_BENCH_PROFILE_TARGET").is_ok_and(|t| t == "registration") {
        let bed = TestBed::start();
        for run in ["first", "second"] {
            let dir = out.join(run);
            let mut c = profiled_command(&tool, &exe, &dir, &bed, false);
            let t = Instant::now();
            let st = c
                .args(bed.register_args(run))
                .env("PEM_SERVER_PASSWORD", common::ADMIN_PASSWORD)
                .status()
                .expect("run the registration");
            assert!(st.success(), "registration failed; see {}", dir.display());
            eprintln!(
                "{run} registration under {tool}: {:.0} ms; output in {}",
                t.elapsed().as_secs_f64() * 1000.0,
                dir.display()
            );
        }
        return;
    }
    let bench = Bench::setup(Settings::from_env());
    let s = &bench.settings;
    let wrapped = tool != "smaps" && tool != "perf";
    let mut c = profiled_command(&tool, &exe, &out, &bench.bed, true);

    let state = out.join("state");
    let _ = std::fs::remove_dir_all(&state);
    c.arg("-c").arg(&bench.cfg).arg("-f");
    for (k, v) in [
        ("state_dir", state.display().to_string()),
        ("log_location", out.join("worker.log").display().to_string()),
    ] {
        c.arg("-o").arg(format!("{k}={v}"));
    }
    let mut child = c.spawn().expect("start the profiled pemworker");
    // Under valgrind everything is far slower: give the first round time to finish.
    let warmup = if wrapped { s.warmup * 2 } else { s.warmup };
    std::thread::sleep(warmup);
    let pid = find_descendant(child.id() as i32, "pemworker").unwrap_or(child.id() as i32);
    let control = |on: &str| {
        let st = Command::new("callgrind_control")
            .args(["-i", on, &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .expect("callgrind_control");
        assert!(st.success(), "callgrind_control -i {on} failed");
    };
    if tool == "callgrind" {
        control("on");
    }
    let t0 = Instant::now();
    if tool == "perf" {
        // Samples user and kernel time alike (callgrind sees user instructions only, and most
        // of an agent's time per round is spent in the kernel on its behalf).
        let data = out.join("perf.data");
        let st = Command::new("perf")
            .args(["record", "-F", "4999", "-g", "-o"])
            .arg(&data)
            .args(["-p", &pid.to_string(), "--", "sleep"])
            .arg(s.window.as_secs().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("perf record (install linux-perf)");
        assert!(st.success(), "perf record failed");
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "dso,sym",
                "-g",
                "none",
                "-i",
            ])
            .arg(&data)
            .output()
            .expect("perf report");
        std::fs::write(out.join("perf-report.txt"), &report.stdout).unwrap();
    } else {
        std::thread::sleep(s.window);
    }
    if tool == "callgrind" {
        control("off");
    }
    if tool == "smaps" {
        for f in ["smaps", "smaps_rollup", "status", "maps"] {
            let _ = std::fs::copy(format!("/proc/{pid}/{f}"), out.join(f));
        }
        for e in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            eprintln!("thread {:?}: {}", e.file_name(), name.trim());
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "pemworker under {tool}: {secs:.0} s window after {} s warm-up; output in {}",
        warmup.as_secs(),
        out.display()
    );
}
