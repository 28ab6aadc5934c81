//! `pemworker fleet`: many agents against one throwaway PEM server, through pgBouncer or
//! directly, measured.
//!
//! Each run starts its own PostgreSQL 15 with the reference schema and a pgBouncer configured
//! by this program's pooler commands ([`crate::sandbox::servers`]), then:
//!
//! 1. registers N agents all at once with the real registration code (pooled: each with its
//!    own single-use enrolment token, through pgBouncer, as the common agent user; direct: with
//!    the PEM admin, each as its own `agent<ID>` role, straight to PostgreSQL, which then admits
//!    them by certificate);
//! 2. sets their heartbeat interval and probe schedule on the server, as a DBA would;
//! 3. runs them in this process, started evenly over the ramp, each with the real connection
//!    manager, heartbeat, spool and delivery (only the values of the agent-level probes are
//!    made up, with the probes' own row shapes: see [`meters::synthetic_rows`]); with
//!    `--processes`, as N real `pemworker -c agent.cfg` processes instead ([`processes`]);
//! 4. every second records what the agents see (heartbeat round trips, collected-to-stored
//!    times, samples stored, warnings and errors) and what the servers show (pg_stat_activity,
//!    SHOW POOLS, their CPU), to the CSV file and the progress lines;
//! 5. stops the agents (each delivers what it holds, as at a service stop), counts their rows
//!    in the server's history tables against what they collected, unregisters them, and prints
//!    the table; `--plot` draws backends and heartbeat p99 against agents for every run.

pub mod meters;
pub mod plot;
pub mod processes;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::Client;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::connection::{self, ConnectSettings, pool};
use crate::registration;
use crate::sandbox::servers::{self, Options, Passwords, Servers, Sizes};
use crate::secret::Secret;
use meters::Meters;
use report::{Csv, Second, Summary};

/// The common agent user pooled agents log in as.
pub const AGENT_USER: &str = "pem_agent_user1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through pgBouncer (transaction pooling), as the guide sets it up.
    Pooled,
    /// Straight to PostgreSQL, one login per agent, as PEM without a pooler.
    Direct,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pooled => "pooled",
            Mode::Direct => "direct",
        }
    }
}

/// What `pemworker fleet` was asked for.
#[derive(Debug, Clone)]
pub struct Settings {
    pub agents: usize,
    pub modes: Vec<Mode>,
    /// How long every agent runs once all have started.
    pub duration: Duration,
    /// Agents start evenly spread over this.
    pub ramp: Duration,
    pub heartbeat_interval: u32,
    pub probe_interval: u32,
    /// pgBouncer's pool_size for the pem database.
    pub pool_size: u32,
    /// Real `pemworker` processes instead of agents in this process.
    pub processes: bool,
    pub csv: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Servers(#[from] servers::Error),
    #[error(transparent)]
    Connection(#[from] connection::Error),
    #[error("{0}")]
    Step(String),
    #[error(transparent)]
    Plot(#[from] plot::Error),
    #[error("{0}")]
    Usage(String),
}

/// Runs every mode asked for, one after the other, each on fresh servers; prints each run's
/// table, and draws the plot. Fails (exit code 4) when a pooled run was not clean: an error,
/// a sample not stored exactly once, or more agent backends than pool_size.
pub async fn run(settings: &Settings) -> Result<Vec<Summary>, Error> {
    check(settings)?;
    raise_fd_limit(settings.agents);
    let mut csv = match &settings.csv {
        Some(p) => Some(Csv::create(p).map_err(|e| new_file_error(p, e))?),
        None => None,
    };
    let mut summaries = Vec::new();
    let mut series = Vec::new();
    for &mode in &settings.modes {
        let (summary, seconds) = if settings.processes {
            processes::run(settings, mode, csv.as_mut()).await?
        } else {
            run_in_process(settings, mode, csv.as_mut()).await?
        };
        println!("\n{}", summary.table());
        series.push(plot::Series {
            label: summary.label.clone(),
            points: seconds
                .iter()
                .filter(|s| s.agents_connected > 0)
                .map(|s| plot::Point {
                    agents: s.agents_connected as f64,
                    backends: s.agent_backends as f64,
                    heartbeat_p99_ms: s.hb_p99_ms,
                })
                .collect(),
        });
        summaries.push(summary);
    }
    if let Some(p) = &settings.plot {
        let title = format!(
            "{} agents, heartbeat {} s, probes {} s",
            settings.agents, settings.heartbeat_interval, settings.probe_interval
        );
        plot::draw(p, &title, &series)?;
        println!("plot: {}", p.display());
    }
    if let Some(p) = &settings.csv {
        println!("per-second figures: {}", p.display());
    }
    Ok(summaries)
}

fn new_file_error(p: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        Error::Usage(format!(
            "{} already exists: give a new file name (nothing is overwritten)",
            p.display()
        ))
    } else {
        Error::Step(format!("cannot create {}: {e}", p.display()))
    }
}

fn check(s: &Settings) -> Result<(), Error> {
    if s.agents == 0 || s.agents > 10_000 {
        return Err(Error::Usage(format!(
            "--agents {}: give 1 to 10000 agents",
            s.agents
        )));
    }
    if !(1..=3600).contains(&s.heartbeat_interval) || !(1..=3600).contains(&s.probe_interval) {
        return Err(Error::Usage(
            "--heartbeat-interval and --probe-interval are seconds from 1 to 3600".into(),
        ));
    }
    if s.pool_size == 0 {
        return Err(Error::Usage("--pool-size must be at least 1".into()));
    }
    if let Some(p) = &s.plot {
        if p.extension().is_none_or(|e| !e.eq_ignore_ascii_case("svg")) {
            return Err(Error::Usage(format!(
                "--plot {}: the chart is written as SVG; give a file name ending in .svg",
                p.display()
            )));
        }
        // Before the runs, not after them: a chart that cannot be written there says so now.
        crate::fsutil::Staged::check(p, 0o644, None)
            .map_err(|e| Error::Usage(format!("--plot {}: {e}", p.display())))?;
    }
    if s.modes.is_empty() {
        return Err(Error::Usage("--mode: give pooled, direct or both".into()));
    }
    Ok(())
}

/// Each agent holds a session or two, a spool file and its lock: the soft limit on open
/// files goes up to the hard one (pgBouncer, started from here, inherits it too).
fn raise_fd_limit(agents: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
        let need = (agents as u64) * 4 + 256;
        if hard < need {
            eprintln!(
                "pemworker fleet: note: the open-file limit is {hard}; {agents} agents may need {need} (raise it with ulimit -n)"
            );
        }
    }
}

/// The servers of one run, sized for the fleet: PostgreSQL with room for two sessions per
/// agent when they connect directly, pgBouncer with pool_size and room for every agent's
/// client connections.
pub(crate) async fn start_servers(settings: &Settings, mode: Mode) -> Result<Servers, Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Step(format!("cannot find this program: {e}")))?;
    let n = settings.agents as u32;
    let sizes = Sizes {
        max_connections: match mode {
            Mode::Direct => (2 * n + 100).max(200),
            Mode::Pooled => 200,
        },
        pool_size: Some(settings.pool_size),
        // Each agent keeps one session, and opens a second when its loops overlap.
        max_client_conn: Some((2 * n + 100).max(500)),
    };
    let opts = Options {
        exe,
        passwords: Passwords::random(),
        pgbouncer_port: None,
        sizes,
    };
    let servers = tokio::task::spawn_blocking(move || Servers::start(&opts))
        .await
        .map_err(|e| Error::Step(e.to_string()))??;
    if mode == Mode::Direct {
        admit_direct_agents(&servers).await?;
    }
    Ok(servers)
}

/// PEM without a pooler: agents log in to PostgreSQL itself by certificate. The line goes
/// before the block `prepare-server` keeps, which sends agent users to pgBouncer only.
async fn admit_direct_agents(servers: &Servers) -> Result<(), Error> {
    let hba = servers.data_dir.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba)
        .map_err(|e| Error::Step(format!("cannot read {}: {e}", hba.display())))?;
    let line = "# pemworker fleet, direct run: agents log in to PostgreSQL by certificate\n\
                hostssl pem +pem_agent 127.0.0.1/32 cert\n";
    std::fs::write(&hba, format!("{line}{text}"))
        .map_err(|e| Error::Step(format!("cannot write {}: {e}", hba.display())))?;
    let su = connection::connect(&servers.superuser()).await?;
    pool::execute(
        &su,
        "reloading pg_hba.conf",
        "SELECT pg_catalog.pg_reload_conf()",
        &[],
    )
    .await?;
    Ok(())
}

/// One registered agent.
pub(crate) struct Registered {
    pub slot: usize,
    pub agent_id: i32,
    pub config_file: PathBuf,
    pub state_dir: PathBuf,
}

/// What the registration storm gave.
pub(crate) struct Storm {
    pub agents: Vec<Registered>,
    pub failed: BTreeMap<String, u64>,
    pub times_ms: Vec<u64>,
    pub wall: Duration,
}

fn admin_direct(servers: &Servers) -> ConnectSettings {
    servers.direct(servers::ADMIN_USER, servers.passwords.admin.clone())
}

/// Registers `n` agents at once, each in its own directory under the run's root, with the
/// real registration code.
pub(crate) async fn register_all(servers: &Servers, n: usize, mode: Mode) -> Result<Storm, Error> {
    let root = servers.root.join("agents");
    std::fs::create_dir_all(&root).map_err(|e| Error::Step(format!("{}: {e}", root.display())))?;
    // Pooled agents enrol with a token each, made beforehand by the admin (as a DBA hands
    // them out); direct ones register with the admin's password, as PEM always did.
    let tokens: Vec<Option<Secret>> = match mode {
        Mode::Pooled => {
            let admin = connection::connect(&admin_direct(servers)).await?;
            let mut t = Vec::with_capacity(n);
            for _ in 0..n {
                let row = pool::query_one(
                    &admin,
                    "creating an enrolment token",
                    "SELECT token FROM pem.create_enrolment_token(make_interval(mins => 30), 1, $1, 'fleet', NULL)",
                    &[(&AGENT_USER, Type::TEXT)],
                )
                .await?;
                t.push(Some(Secret::new(pool::get::<String>(
                    &row,
                    0,
                    "creating an enrolment token",
                )?)));
            }
            t
        }
        Mode::Direct => vec![None; n],
    };
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (slot, token) in tokens.into_iter().enumerate() {
        let dir = root.join(format!("agent{slot:05}"));
        let server = match mode {
            Mode::Pooled => servers.enrolment_via_pooler(),
            Mode::Direct => admin_direct(servers),
        };
        let opts = registration::Options {
            server,
            token,
            agent_user: (mode == Mode::Pooled).then(|| AGENT_USER.to_string()),
            display_name: format!("fleet agent {slot}"),
            host_name: format!("fleet-{slot:05}.invalid"),
            cert_path: dir.join("pem"),
            config_dir: dir.join("etc"),
            force: false,
            group: Some("fleet".into()),
            team: None,
            owner: None,
            heartbeat_connection: false,
            allow_server_restart: Some(false),
            allow_batch_probes: false,
            batch_script_user: None,
            pem_hosts: Vec::new(),
            agent_id: None,
            local_cert: None,
            overrides: Vec::new(),
        };
        set.spawn(async move {
            let t = Instant::now();
            let r = registration::register(&opts).await;
            (slot, dir, t.elapsed(), r)
        });
    }
    let mut storm = Storm {
        agents: Vec::with_capacity(n),
        failed: BTreeMap::new(),
        times_ms: Vec::with_capacity(n),
        wall: Duration::ZERO,
    };
    while let Some(joined) = set.join_next().await {
        let (slot, dir, took, r) = joined.map_err(|e| Error::Step(e.to_string()))?;
        storm.times_ms.push(took.as_millis() as u64);
        match r {
            Ok(reg) => storm.agents.push(Registered {
                slot,
                agent_id: reg.agent_id,
                config_file: reg.config_file,
                state_dir: dir.join("state"),
            }),
            Err(e) => {
                *storm
                    .failed
                    .entry(meters::kind_of(&e.to_string()))
                    .or_default() += 1
            }
        }
    }
    storm.wall = started.elapsed();
    storm.agents.sort_by_key(|a| a.slot);
    Ok(storm)
}

/// The run's intervals, on the server: the agents' heartbeat interval and their agent-level
/// probes' schedule.
pub(crate) async fn set_intervals(
    su: &Client,
    ids: &[i32],
    heartbeat: u32,
    probes: u32,
) -> Result<(), Error> {
    let (hb, pr) = (heartbeat as i32, probes as i32);
    pool::execute(
        su,
        "setting the agents' heartbeat interval",
        "UPDATE pem.agent SET heartbeat_interval = $2 WHERE id = ANY($1)",
        &[(&ids, Type::INT4_ARRAY), (&hb, Type::INT4)],
    )
    .await?;
    pool::execute(
        su,
        "setting the agents' probe schedule",
        "INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
         SELECT a, NULL, p.id, $2, true FROM pg_catalog.unnest($1::integer[]) AS a, pem.probe p \
          WHERE p.target_type = 'agent'",
        &[(&ids, Type::INT4_ARRAY), (&pr, Type::INT4)],
    )
    .await?;
    Ok(())
}

/// Samples and rows of `ids` in the server's history tables (agent-level probes).
pub(crate) async fn server_counts(su: &Client, ids: &[i32]) -> Result<(i64, i64), Error> {
    let mut samples = 0;
    let mut rows = 0;
    for spec in crate::probes::PROBES
        .iter()
        .filter(|p| p.target() == crate::probes::Target::Agent)
    {
        let sql = format!(
            "SELECT count(DISTINCT (agent_id, collected_at)), count(*) FROM pemhistory.{} WHERE agent_id = ANY($1)",
            spec.table()
        );
        let what = "counting stored samples";
        let row = pool::query_one(su, what, &sql, &[(&ids, Type::INT4_ARRAY)]).await?;
        samples += pool::get::<i64>(&row, 0, what)?;
        rows += pool::get::<i64>(&row, 1, what)?;
    }
    Ok((samples, rows))
}

/// Unregisters the agents (as the admin, one session), returning how many.
pub(crate) async fn unregister_all(servers: &Servers, ids: &[i32]) -> Result<usize, Error> {
    let admin = connection::connect(&admin_direct(servers)).await?;
    let mut n = 0;
    for id in ids {
        let r = pool::query_opt(
            &admin,
            "unregistering an agent",
            "SELECT dropped_role FROM pem.unregister_agent($1)",
            &[(id, Type::INT4)],
        )
        .await?;
        n += usize::from(r.is_some());
    }
    Ok(n)
}

/// What the servers show, read every second.
pub(crate) struct Watch {
    su: Client,
    console: Option<Client>,
    agent_users: Vec<String>,
    postmaster: Option<i32>,
    pgbouncer: Option<i32>,
    last: Option<(Instant, Ticks)>,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ticks {
    server: u64,
    pgbouncer: u64,
    agents: u64,
}

/// CPU ticks of a process: (its own, its waited-for children's).
fn ticks(pid: i32) -> Option<(u64, u64, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let ppid = f.get(1)?.parse::<i32>().ok()?;
    Some((n(11)? + n(12)?, n(13)? + n(14)?, ppid))
}

/// CPU ticks of `parent` and every process it started, live or ended, and with `memory` the
/// memory (PSS, MiB) of `parent` and its live children.
pub(crate) fn tree_usage(parent: i32, memory: bool) -> (u64, Option<f64>) {
    let Some((own, ended, _)) = ticks(parent) else {
        return (0, None);
    };
    let mut total = own + ended;
    let mut pss = memory.then(|| pss_mib(parent));
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some((t, _, ppid)) = ticks(pid) {
                if ppid == parent {
                    total += t;
                    if let Some(m) = pss.as_mut() {
                        *m += pss_mib(pid);
                    }
                }
            }
        }
    }
    (total, pss)
}

fn pid_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Proportional set size of a process (its share of every page it maps), MiB.
pub(crate) fn pss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident memory of a process, MiB.
pub(crate) fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

impl Watch {
    pub(crate) async fn new(
        servers: &Servers,
        mode: Mode,
        agent_users: Vec<String>,
    ) -> Result<Watch, Error> {
        let su = connection::connect(&servers.superuser()).await?;
        let console = match mode {
            Mode::Pooled => Some(connection::connect(&servers.console()).await?),
            Mode::Direct => None,
        };
        Ok(Watch {
            su,
            console,
            agent_users,
            postmaster: pid_file(&servers.data_dir.join("postmaster.pid")),
            pgbouncer: pid_file(&servers.pgb_run_dir.join("pgbouncer.pid")),
            last: None,
        })
    }

    /// PostgreSQL's and pgBouncer's memory now (PSS, MiB). Read once, at the end of the
    /// steady phase: PSS makes the kernel walk every process's page tables, about a
    /// millisecond per PostgreSQL backend, which read every second would slow the agents.
    pub(crate) async fn memory(&self) -> (f64, f64) {
        let (postmaster, pgbouncer) = (self.postmaster, self.pgbouncer);
        tokio::task::spawn_blocking(move || {
            let server = postmaster
                .and_then(|p| tree_usage(p, true).1)
                .unwrap_or_default();
            (server, pgbouncer.map_or(0.0, pss_mib))
        })
        .await
        .unwrap_or_default()
    }

    pub(crate) fn superuser(&self) -> &Client {
        &self.su
    }

    /// Fills in the servers' side of `s`; `agents_ticks` is the agents' CPU so far.
    pub(crate) async fn read(&mut self, s: &mut Second, agents_ticks: u64) {
        let what = "counting backends";
        let users = &self.agent_users;
        match pool::query_one(
            &self.su,
            what,
            "SELECT count(*), count(*) FILTER (WHERE usename = ANY($1)) FROM pg_catalog.pg_stat_activity \
              WHERE datname = 'pem' AND backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()",
            &[(users, Type::TEXT_ARRAY)],
        )
        .await
        {
            Ok(row) => {
                s.backends = pool::get::<i64>(&row, 0, what).unwrap_or(-1);
                s.agent_backends = pool::get::<i64>(&row, 1, what).unwrap_or(-1);
            }
            Err(e) => tracing::debug!("{e}"),
        }
        if let Some(c) = &self.console {
            if let Ok(msgs) = c.simple_query("SHOW POOLS").await {
                for m in msgs {
                    let tokio_postgres::SimpleQueryMessage::Row(r) = m else {
                        continue;
                    };
                    if r.get("database") != Some("pem") {
                        continue;
                    }
                    let n = |k: &str| {
                        r.get(k)
                            .and_then(|v| v.parse::<i64>().ok())
                            .unwrap_or_default()
                    };
                    s.cl_active += n("cl_active");
                    s.cl_waiting += n("cl_waiting");
                    s.sv_active += n("sv_active");
                    s.sv_idle += n("sv_idle");
                    let wait = n("maxwait") as f64 * 1000.0 + n("maxwait_us") as f64 / 1000.0;
                    s.maxwait_ms = s.maxwait_ms.max(wait);
                }
            }
        }
        // /proc is read on a blocking thread: with a backend per agent it is a thousand files
        // and more, which would hold up the agents running on this thread.
        let (postmaster, pgbouncer) = (self.postmaster, self.pgbouncer);
        let (server, _) = tokio::task::spawn_blocking(move || {
            postmaster.map_or((0, None), |p| tree_usage(p, false))
        })
        .await
        .unwrap_or_default();
        let now = Instant::now();
        let t = Ticks {
            server,
            pgbouncer: pgbouncer.and_then(ticks).map_or(0, |(own, _, _)| own),
            agents: agents_ticks,
        };
        if let Some((at, last)) = self.last {
            let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .ok()
                .flatten()
                .unwrap_or(100) as f64;
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 / hz / secs * 100.0;
            s.server_cpu = pct(t.server, last.server);
            s.pgbouncer_cpu = pct(t.pgbouncer, last.pgbouncer);
            s.agents_cpu = pct(t.agents, last.agents);
        }
        self.last = Some((now, t));
    }
}

/// Folds the per-second figures of the steady phase (every agent started) into `sum`.
pub(crate) fn fold_steady(sum: &mut Summary, seconds: &[Second], agents: usize) {
    let steady: Vec<&Second> = seconds
        .iter()
        .filter(|s| s.agents_started == agents)
        .collect();
    let n = steady.len().max(1) as f64;
    sum.connected_min = steady.iter().map(|s| s.agents_connected).min().unwrap_or(0);
    sum.backends_max = steady.iter().map(|s| s.backends).max().unwrap_or(0);
    sum.agent_backends_max = steady.iter().map(|s| s.agent_backends).max().unwrap_or(0);
    sum.cl_active_max = steady.iter().map(|s| s.cl_active).max().unwrap_or(0);
    sum.cl_waiting_max = steady.iter().map(|s| s.cl_waiting).max().unwrap_or(0);
    sum.sv_active_max = steady.iter().map(|s| s.sv_active).max().unwrap_or(0);
    sum.sv_idle_max = steady.iter().map(|s| s.sv_idle).max().unwrap_or(0);
    sum.maxwait_ms_max = steady.iter().map(|s| s.maxwait_ms).fold(0.0, f64::max);
    sum.stored_per_s_mean = steady.iter().map(|s| s.stored_per_s).sum::<f64>() / n;
    sum.stored_per_s_max = steady.iter().map(|s| s.stored_per_s).fold(0.0, f64::max);
    sum.server_cpu = steady.iter().map(|s| s.server_cpu).sum::<f64>() / n;
    sum.pgbouncer_cpu = steady.iter().map(|s| s.pgbouncer_cpu).sum::<f64>() / n;
    sum.agents_cpu = steady.iter().map(|s| s.agents_cpu).sum::<f64>() / n;
    sum.agents_rss_mib = steady.iter().map(|s| s.agents_rss_mib).fold(0.0, f64::max);
}

pub(crate) fn label(settings: &Settings, mode: Mode) -> String {
    let how = if settings.processes {
        "agent processes"
    } else {
        "agents in one process"
    };
    match mode {
        Mode::Pooled => format!(
            "pooled: {} {how} through pgBouncer (pool_size {})",
            settings.agents, settings.pool_size
        ),
        Mode::Direct => format!("direct: {} {how} straight to PostgreSQL", settings.agents),
    }
}

pub(crate) fn new_summary(settings: &Settings, mode: Mode, storm: &Storm) -> Summary {
    let mut times = storm.times_ms.clone();
    let mut ids: Vec<i32> = storm.agents.iter().map(|a| a.agent_id).collect();
    ids.sort_unstable();
    ids.dedup();
    Summary {
        label: label(settings, mode),
        agents: settings.agents,
        duration_s: settings.duration.as_secs(),
        ramp_s: settings.ramp.as_secs(),
        heartbeat_interval: settings.heartbeat_interval,
        probe_interval: settings.probe_interval,
        pool_size: (mode == Mode::Pooled).then_some(settings.pool_size),
        registered: storm.agents.len(),
        registration_failed: storm.failed.values().sum::<u64>() as usize,
        distinct_ids: ids.len(),
        registration: report::spread(&mut times),
        registration_wall_s: storm.wall.as_secs_f64(),
        ..Default::default()
    }
}

/// The agents' logins: the common user when pooled, each agent's own role when direct.
pub(crate) fn agent_users(mode: Mode, ids: &[i32]) -> Vec<String> {
    match mode {
        Mode::Pooled => vec![AGENT_USER.to_string()],
        Mode::Direct => ids.iter().map(|id| format!("agent{id}")).collect(),
    }
}

/// A run up to its agents: servers started, agents registered and their intervals set, the
/// summary begun (with the registration storm), the servers watched.
pub(crate) struct Prepared {
    pub servers: Servers,
    pub storm: Storm,
    pub summary: Summary,
    pub ids: Vec<i32>,
    pub watch: Watch,
}

pub(crate) async fn prepare(settings: &Settings, mode: Mode) -> Result<Prepared, Error> {
    let n = settings.agents;
    println!(
        "[{}] starting a throwaway PEM server{} ...",
        mode.name(),
        if mode == Mode::Pooled {
            " and pgBouncer"
        } else {
            ""
        }
    );
    let servers = start_servers(settings, mode).await?;
    println!(
        "[{}] registering {n} agents at once {} ...",
        mode.name(),
        match mode {
            Mode::Pooled => "through pgBouncer with enrolment tokens",
            Mode::Direct => "straight to PostgreSQL",
        }
    );
    let storm = register_all(&servers, n, mode).await?;
    let mut summary = new_summary(settings, mode, &storm);
    for (k, v) in &storm.failed {
        summary
            .errors
            .insert(format!("registration failed: {k}"), *v);
    }
    let ids: Vec<i32> = storm.agents.iter().map(|a| a.agent_id).collect();
    let watch = Watch::new(&servers, mode, agent_users(mode, &ids)).await?;
    set_intervals(
        watch.superuser(),
        &ids,
        settings.heartbeat_interval,
        settings.probe_interval,
    )
    .await?;
    Ok(Prepared {
        servers,
        storm,
        summary,
        ids,
        watch,
    })
}

impl Prepared {
    /// After the agents stopped: counts their samples on the server, unregisters them, stops
    /// and removes the servers; the summary, complete.
    pub(crate) async fn finish(self) -> Result<Summary, Error> {
        let Prepared {
            servers,
            mut summary,
            ids,
            watch,
            ..
        } = self;
        (summary.server_samples, summary.server_rows) =
            server_counts(watch.superuser(), &ids).await?;
        summary.unregistered = unregister_all(&servers, &ids).await?;
        drop(watch);
        tokio::task::spawn_blocking(move || drop(servers))
            .await
            .ok();
        Ok(summary)
    }
}

/// Keeps one second's figures: in the CSV file, on the progress line every ten seconds, and
/// for the end table.
pub(crate) fn record(s: Second, seconds: &mut Vec<Second>, csv: Option<&mut Csv>) {
    if let Some(c) = csv {
        c.write(&s);
    }
    if seconds.len() % 10 == 9 {
        println!("{}", s.progress());
    }
    seconds.push(s);
}

/// One run with the agents in this process.
async fn run_in_process(
    settings: &Settings,
    mode: Mode,
    mut csv: Option<&mut Csv>,
) -> Result<(Summary, Vec<Second>), Error> {
    let n = settings.agents;
    let mut run = prepare(settings, mode).await?;
    let storm = &run.storm;
    let meters = Arc::new(Meters::new(n));
    LOG_METERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(meters.clone());
    let stop = CancellationToken::new();
    let mut agents = tokio::task::JoinSet::new();
    let mut clock = Clock::new(settings, storm.agents.len());
    let mut pending = storm.agents.iter().enumerate().peekable();
    let mut seconds: Vec<Second> = Vec::new();
    let mut steady_hb: Vec<u64> = Vec::new();
    let mut steady_delivery: Vec<u64> = Vec::new();
    let mut launched = 0usize;
    let mut failed_to_start: BTreeMap<String, u64> = BTreeMap::new();
    println!(
        "[{}] running {} agents for {} s after a {} s ramp",
        mode.name(),
        storm.agents.len(),
        settings.duration.as_secs(),
        settings.ramp.as_secs()
    );
    loop {
        // Start the agents whose time has come.
        while let Some((_, a)) = pending.next_if(|(i, _)| clock.due(*i)) {
            match start_agent(a, meters.clone(), stop.child_token(), &mut agents) {
                Ok(()) => launched += 1,
                Err(e) => *failed_to_start.entry(meters::kind_of(&e)).or_default() += 1,
            }
        }
        if clock.ended() {
            break;
        }
        if !clock.wait(pending.peek().map(|(i, _)| *i)).await {
            continue;
        }
        let mut w = meters.take_window();
        let mut s = Second {
            mode: mode.name().into(),
            t: clock.elapsed(),
            agents_started: launched,
            agents_connected: meters.connected(),
            heartbeats: w.heartbeats_us.len(),
            collected_per_s: w.collected_samples as f64,
            stored_per_s: w.stored_samples as f64,
            errors: meters.error_count(),
            agents_rss_mib: rss_mib(std::process::id() as i32),
            ..Default::default()
        };
        let (p50, p99, max) = report::spread(&mut w.heartbeats_us);
        (s.hb_p50_ms, s.hb_p99_ms, s.hb_max_ms) =
            (p50 as f64 / 1e3, p99 as f64 / 1e3, max as f64 / 1e3);
        let (d50, d99, _) = report::spread(&mut w.delivery_ms);
        (s.delivery_p50_ms, s.delivery_p99_ms) = (d50 as f64, d99 as f64);
        let own = ticks(std::process::id() as i32).map_or(0, |(t, _, _)| t);
        run.watch.read(&mut s, own).await;
        if launched == storm.agents.len() {
            steady_hb.extend(w.heartbeats_us);
            steady_delivery.extend(w.delivery_ms);
        }
        record(s, &mut seconds, csv.as_deref_mut());
    }

    let memory = run.watch.memory().await;
    // Stop: each agent delivers what it holds, as at a service stop.
    println!("[{}] stopping the agents ...", mode.name());
    stop.cancel();
    let mut left = 0u64;
    while let Some(j) = agents.join_next().await {
        match j {
            Ok((slot, Ok(snapshot))) => {
                meters.disconnected(slot);
                left += snapshot.spooled_samples;
            }
            Ok((slot, Err(e))) => {
                meters.disconnected(slot);
                *failed_to_start.entry(meters::kind_of(&e)).or_default() += 1;
            }
            Err(e) => *failed_to_start.entry(e.to_string()).or_default() += 1,
        }
    }
    LOG_METERS.lock().unwrap_or_else(|p| p.into_inner()).take();

    let totals = meters.totals();
    let agents_run = storm.agents.len();
    let summary = &mut run.summary;
    (summary.server_mem_mib, summary.pgbouncer_mem_mib) = memory;
    fold_steady(summary, &seconds, agents_run);
    summary.heartbeats = totals.heartbeats;
    summary.heartbeats_failed = totals.heartbeats_failed;
    summary.timed = true;
    summary.hb = report::spread(&mut steady_hb);
    summary.delivery = report::spread(&mut steady_delivery);
    summary.collected_samples = totals.collected_samples;
    summary.collected_rows = totals.collected_rows;
    summary.left_in_spools = left;
    summary.errors.extend(meters.errors());
    for (k, v) in failed_to_start {
        summary.errors.insert(format!("agent did not run: {k}"), v);
    }
    Ok((run.finish().await?, seconds))
}

/// A run's timetable: agents start evenly over the ramp, then all run for the duration; the
/// figures are read once a second.
pub(crate) struct Clock {
    started: Instant,
    spacing: Duration,
    end_at: Instant,
    next_tick: Instant,
}

impl Clock {
    pub(crate) fn new(settings: &Settings, agents: usize) -> Clock {
        let started = Instant::now();
        Clock {
            started,
            spacing: settings.ramp / agents.max(1) as u32,
            end_at: started + settings.ramp + settings.duration,
            next_tick: started + Duration::from_secs(1),
        }
    }

    fn start_of(&self, agent: usize) -> Instant {
        self.started + self.spacing * agent as u32
    }

    /// Whether agent number `agent` (in start order) is due to start.
    pub(crate) fn due(&self, agent: usize) -> bool {
        self.start_of(agent) <= Instant::now()
    }

    pub(crate) fn ended(&self) -> bool {
        Instant::now() >= self.end_at
    }

    /// Seconds since the first agent started.
    pub(crate) fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Sleeps until agent `next` is due to start, the next second or the end, whichever comes
    /// first; true when a second has passed (its figures are to be read).
    pub(crate) async fn wait(&mut self, next: Option<usize>) -> bool {
        let wake = next
            .map_or(self.next_tick, |i| self.start_of(i).min(self.next_tick))
            .min(self.end_at);
        tokio::time::sleep_until(wake.into()).await;
        if Instant::now() < self.next_tick {
            return false;
        }
        self.next_tick += Duration::from_secs(1);
        true
    }
}

type AgentResult = (usize, Result<crate::worker::stats::Snapshot, String>);

/// Starts one agent's worker in this process.
fn start_agent(
    a: &Registered,
    meters: Arc<Meters>,
    stop: CancellationToken,
    set: &mut tokio::task::JoinSet<AgentResult>,
) -> Result<(), String> {
    let overrides = vec![("state_dir".to_string(), a.state_dir.display().to_string())];
    let (config, _) = AgentConfig::load(&a.config_file, &overrides).map_err(|e| e.to_string())?;
    let lock = crate::spool::StateLock::acquire(&a.state_dir).map_err(|e| e.to_string())?;
    let path = a.config_file.clone();
    let slot = a.slot;
    let observer: Arc<dyn crate::worker::observe::Observer> = Arc::new(meters.agent(slot));
    set.spawn(async move {
        let r = crate::worker::run_observed(
            config,
            lock,
            None,
            stop,
            Arc::new(Notify::new()),
            move || AgentConfig::load(&path, &overrides).map(|(c, _)| c),
            Some(observer),
        )
        .await
        .map_err(|e| e.to_string());
        (slot, r)
    });
    Ok(())
}

/// The meters the log layer counts into, while a run goes on.
static LOG_METERS: std::sync::Mutex<Option<Arc<Meters>>> = std::sync::Mutex::new(None);

/// The fleet's log: warnings and errors of every agent to `file` (when given), each counted
/// by kind for the run going on.
pub fn init_logging(file: Option<&Path>) -> Result<(), Error> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    let fmt = match file {
        Some(p) => {
            let f = report::new_file(p).map_err(|e| new_file_error(p, e))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::sync::Mutex::new(f))
                    .with_ansi(false)
                    .with_filter(tracing_subscriber::filter::LevelFilter::WARN),
            )
        }
        None => None,
    };
    let subscriber = tracing_subscriber::registry().with(fmt).with(Forward);
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| Error::Step(format!("cannot set up logging: {e}")))
}

/// Passes events to the current run's meters.
struct Forward;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Forward {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        *meta.level() <= tracing::Level::WARN
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let m = LOG_METERS.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(m) = m {
            meters::Counting(m).on_event(event, ctx);
        }
    }
}
