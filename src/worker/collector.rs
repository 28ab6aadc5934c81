//! The collector loop: sleeps until the next probe is due or the schedule is to be checked,
//! runs the probes that are due and spools their samples.
//!
//! The schedule (`pem.agent_schedule`) and the servers and pgBouncers bound to this agent are
//! read at start, then checked again after short_wait; each check that finds nothing changed
//! doubles the wait, up to a minute ([`SCHEDULE_CHECK_MAX`]), and a change brings it back to
//! short_wait. So a change on the server takes effect within a minute, and an idle agent wakes
//! only for its probes, its heartbeat and these checks. Until the first read succeeds (the
//! server may be down when the agent starts), the agent-level probes run every minute.
//!
//! Every round of probes on one target (this host, a monitored server, a pgBouncer) runs in its
//! own named task on the target's kept session ([`Kept`]: reused from round to round, closed
//! after connection_lifetime idle, at most max_connections open); a target whose previous round
//! is still running (a hung server) is skipped, and never delays the others. The samples of all
//! the targets probed at one wakeup are kept in the spool together, in one write
//! ([`ROUND_WAIT`] bounds how long a slow target holds the others back; its samples are written
//! on their own after that).
//!
//! A target that cannot be reached (stopped, its name no longer resolving, a certificate it
//! no longer passes) or a probe that fails is logged once when it starts and once when it
//! ends, and listed in stats.json (`targets_down`) meanwhile; each round tries it again, so
//! its samples resume by themselves. A probe that panics is logged with its name, and the
//! other probes go on.
//!
//! Scheduling runs on the monotonic clock: a jump of the wall clock (an NTP step, a manual
//! change) neither fires probes early nor holds them back. After its first run a probe falls
//! due on whole multiples of its interval from the collector's start, so probes of related
//! intervals run at the same wakeup and their samples are written together. Sample timestamps
//! come from the wall clock, so a jump shows in the data as a jump.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::tasks::panic_message;
use crate::connection::kept::{Kept, Lease};
use crate::connection::{self, ConnectSettings, pool};
use crate::probes::{self, Collector, PROBES, ProbeSpec, Sample, Target, os::OsProbes};
use crate::targets::{self, Kind, Registry};

/// Longest a statement on a monitored server may run.
pub const PROBE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two checks of an unchanged schedule.
pub const SCHEDULE_CHECK_MAX: Duration = Duration::from_secs(60);
const FALLBACK_INTERVAL: Duration = Duration::from_secs(60);
/// How long the samples of a round wait for the round's slower targets before they are written.
pub const ROUND_WAIT: Duration = Duration::from_secs(2);

const SCHEDULE: &str = "SELECT probe, target_type, server_id, pgbouncer, interval_seconds, enabled \
                          FROM pem.agent_schedule($1)";
// Agents hold no table privileges: the monitored servers and pgBouncers bound to them come
// from pem.agent_targets.
const TARGETS: &str = "SELECT target_type, server_id, pgbouncer, host, port, database, username, sslmode \
                         FROM pem.agent_targets($1)";

/// Where a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Place {
    Agent,
    Server(i32),
    Pgbouncer(String),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Agent => f.write_str("this host"),
            Place::Server(id) => write!(f, "server {id}"),
            Place::Pgbouncer(b) => write!(f, "pgBouncer {b}"),
        }
    }
}

#[derive(Debug)]
struct Job {
    spec: &'static ProbeSpec,
    place: Place,
    interval: Duration,
    next_due: Instant,
    last_run: Option<Instant>,
}

type Key = (&'static str, Place);

/// The loop's state between wakeups.
struct Schedule {
    jobs: HashMap<Key, Job>,
    servers: HashMap<i32, ConnectSettings>,
    bouncers: HashMap<String, ConnectSettings>,
    loaded: bool,
    /// Jobs after their first run fall due at whole multiples of their interval from here, so
    /// jobs of related intervals (10 s and 60 s) fall due together: one wakeup and one spool
    /// write for them all.
    anchor: Instant,
}

impl Schedule {
    fn fallback() -> Schedule {
        let now = Instant::now();
        let jobs = PROBES
            .iter()
            .filter(|p| p.target() == Target::Agent)
            .map(|p| {
                let job = Job {
                    spec: p,
                    place: Place::Agent,
                    interval: FALLBACK_INTERVAL,
                    next_due: now,
                    last_run: None,
                };
                ((p.name, Place::Agent), job)
            })
            .collect();
        Schedule {
            jobs,
            servers: HashMap::new(),
            bouncers: HashMap::new(),
            loaded: false,
            anchor: now,
        }
    }

    /// The first instant strictly after `after` that is a whole number of `interval`s from the
    /// anchor.
    fn next_slot(&self, after: Instant, interval: Duration) -> Instant {
        Schedule::slot_after(self.anchor, after, interval)
    }

    fn slot_after(anchor: Instant, after: Instant, interval: Duration) -> Instant {
        let step = interval.as_nanos().max(1);
        let since = after.saturating_duration_since(anchor).as_nanos();
        let slots = since / step + 1;
        let offset = u64::try_from(slots.saturating_mul(step)).unwrap_or(u64::MAX);
        anchor + Duration::from_nanos(offset)
    }

    /// Replaces the jobs with the server's schedule. A job that keeps its interval keeps its
    /// due time; one whose interval changed is next due at its first slot one new interval
    /// after its last run; a new one at once.
    fn merge(&mut self, rows: Vec<(String, Place, Duration, bool)>) {
        let now = Instant::now();
        let mut jobs = HashMap::new();
        for (name, place, interval, enabled) in rows {
            let Some(spec) = probes::spec(&name) else {
                tracing::debug!(
                    "the server schedules probe {name}, which this agent does not know"
                );
                continue;
            };
            if !enabled {
                continue;
            }
            let key = (spec.name, place.clone());
            let (next_due, last_run) = match self.jobs.get(&key) {
                Some(old) if old.interval == interval => (old.next_due, old.last_run),
                Some(old) => (
                    old.last_run.map_or(now, |t| {
                        self.next_slot(t + interval - Duration::from_nanos(1), interval)
                    }),
                    old.last_run,
                ),
                None => (now, None),
            };
            jobs.insert(
                key,
                Job {
                    spec,
                    place,
                    interval,
                    next_due,
                    last_run,
                },
            );
        }
        self.jobs = jobs;
        self.loaded = true;
    }

    /// Whether a job runs at `place` and its target is known.
    fn probes(&self, place: &Place) -> bool {
        let known = match place {
            Place::Agent => true,
            Place::Server(id) => self.servers.contains_key(id),
            Place::Pgbouncer(b) => self.bouncers.contains_key(b),
        };
        known && self.jobs.values().any(|j| &j.place == place)
    }

    /// The probes that run, by place, for the start line: "14 probes scheduled: 6 on this
    /// host, 6 on 1 monitored server, 2 on 1 pgBouncer".
    fn summary(&self) -> String {
        let (mut host, mut server, mut bouncer) = (0, 0, 0);
        let mut servers = HashSet::new();
        let mut bouncers = HashSet::new();
        for job in self.jobs.values() {
            match &job.place {
                Place::Agent => host += 1,
                Place::Server(id) if self.servers.contains_key(id) => {
                    server += 1;
                    servers.insert(*id);
                }
                Place::Pgbouncer(b) if self.bouncers.contains_key(b) => {
                    bouncer += 1;
                    bouncers.insert(b.clone());
                }
                _ => {}
            }
        }
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        format!(
            "{} scheduled: {host} on this host, {server} on {}, {bouncer} on {}",
            plural(host + server + bouncer, "probe"),
            plural(servers.len(), "monitored server"),
            plural(bouncers.len(), "pgBouncer")
        )
    }

    fn next_due(&self) -> Option<Instant> {
        self.jobs.values().map(|j| j.next_due).min()
    }

    /// The jobs due at `now`, by place; each is rescheduled to its next slot after now (one
    /// interval on; a job that fell behind skips what it missed rather than catching up).
    fn take_due(&mut self, now: Instant) -> HashMap<Place, Vec<&'static ProbeSpec>> {
        let mut due: HashMap<Place, Vec<&'static ProbeSpec>> = HashMap::new();
        let anchor = self.anchor;
        for job in self.jobs.values_mut() {
            if job.next_due <= now {
                due.entry(job.place.clone()).or_default().push(job.spec);
                job.last_run = Some(now);
                job.next_due = Schedule::slot_after(anchor, now, job.interval);
            }
        }
        due
    }
}

/// What one schedule read brings.
struct Fetched {
    jobs: Vec<(String, Place, Duration, bool)>,
    servers: HashMap<i32, ConnectSettings>,
    bouncers: HashMap<String, ConnectSettings>,
    /// Everything read, as text, to tell whether anything changed.
    fingerprint: String,
}

/// Reads the schedule and bindings, on a session of its own, the two statements pipelined.
async fn fetch(shared: &Shared) -> Result<Option<Fetched>, connection::Error> {
    let manager = shared.pem();
    let mut session = match manager.checkout().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("schedule not refreshed: {e}");
            return Ok(None);
        }
    };
    let agent_id = shared.config().agent_id;
    let id = [(
        &agent_id as &(dyn tokio_postgres::types::ToSql + Sync),
        Type::INT4,
    )];
    let client = session.client().await?;
    let read = tokio::try_join!(
        pool::query(client, "reading the probe schedule", SCHEDULE, &id),
        pool::query(
            client,
            "reading monitored servers and pgBouncers",
            TARGETS,
            &id
        ),
    );
    let (rows, bound) = match read {
        Ok(r) => r,
        Err(e) => {
            session.failed(&e);
            return Err(e);
        }
    };
    drop(session);
    let mut fingerprint = String::new();
    let mut jobs = Vec::new();
    for r in &rows {
        let what = "reading the probe schedule";
        let name: String = pool::get(r, 0, what)?;
        let target: String = pool::get(r, 1, what)?;
        let server: Option<i32> = pool::get(r, 2, what)?;
        let bouncer: Option<String> = pool::get(r, 3, what)?;
        let secs: i32 = pool::get(r, 4, what)?;
        let enabled: bool = pool::get(r, 5, what)?;
        fingerprint.push_str(&format!(
            "{name}|{target}|{server:?}|{bouncer:?}|{secs}|{enabled}\n"
        ));
        let place = match (Target::parse(&target), server, bouncer) {
            (Some(Target::Agent), _, _) => Place::Agent,
            (Some(Target::Server), Some(id), _) => Place::Server(id),
            (Some(Target::Pgbouncer), _, Some(b)) => Place::Pgbouncer(b),
            _ => continue,
        };
        let interval = Duration::from_secs(secs.max(1) as u64);
        jobs.push((name, place, interval, enabled));
    }
    let registry = local_targets(&shared.config().path);
    let mut server_map = HashMap::new();
    let mut bouncer_map = HashMap::new();
    for r in &bound {
        let what = "reading monitored servers and pgBouncers";
        let target: String = pool::get(r, 0, what)?;
        let (host, port, db, user, ssl): (String, i32, String, String, String) = (
            pool::get(r, 3, what)?,
            pool::get(r, 4, what)?,
            pool::get(r, 5, what)?,
            pool::get(r, 6, what)?,
            pool::get(r, 7, what)?,
        );
        // Every binding goes through the local record: only targets registered from this
        // host are probed, never with a weaker sslmode than recorded.
        match Target::parse(&target) {
            Some(Target::Server) => {
                let id: i32 = pool::get(r, 1, what)?;
                fingerprint.push_str(&format!("s{id}|{host}|{port}|{db}|{user}|{ssl}\n"));
                if let Some(s) = monitored(&registry, Kind::Server, host, port, &db, user, ssl) {
                    server_map.insert(id, s);
                }
            }
            Some(Target::Pgbouncer) => {
                let key: String = pool::get(r, 2, what)?;
                fingerprint.push_str(&format!("b{key}|{user}|{ssl}\n"));
                // The console's database is pgbouncer, whatever the binding says.
                let db = "pgbouncer";
                if let Some(s) = monitored(&registry, Kind::Pgbouncer, host, port, db, user, ssl) {
                    bouncer_map.insert(key, s);
                }
            }
            _ => {}
        }
    }
    Ok(Some(Fetched {
        jobs,
        servers: server_map,
        bouncers: bouncer_map,
        fingerprint,
    }))
}

/// The targets registered from this host (see [`targets`]); an unreadable record is logged
/// and probes nothing.
fn local_targets(config_file: &std::path::Path) -> Registry {
    let file = targets::file_for(config_file);
    Registry::load(&file).unwrap_or_else(|e| {
        targets::warn_once(&targets::Refusal::Settings {
            what: "no monitored server is probed".into(),
            why: e.to_string(),
        });
        Registry::default()
    })
}

/// Settings for a monitored server or pgBouncer console bound on the PEM server, as the local
/// record allows them ([`Registry::settings`]): the password, if one is needed, comes from the
/// agent user's ~/.pgpass (or PGPASSFILE), never from the PEM server.
fn monitored(
    registry: &Registry,
    kind: Kind,
    host: String,
    port: i32,
    db: &str,
    user: String,
    sslmode: String,
) -> Option<ConnectSettings> {
    let port = u16::try_from(port).ok()?;
    match registry.settings(kind, &host, port, db, &user, &sslmode) {
        Ok(mut s) => {
            s.connect_timeout = PROBE_STATEMENT_TIMEOUT;
            Some(s)
        }
        Err(refusal) => {
            targets::warn_once(&refusal);
            None
        }
    }
}

/// When to check the schedule next.
struct Check {
    at: Instant,
    wait: Duration,
    fingerprint: Option<String>,
}

type FetchTask = tokio::task::JoinHandle<Option<Result<Option<Fetched>, connection::Error>>>;

/// Removes a place from the busy set when its round ends, however it ends.
struct Busy {
    set: Arc<Mutex<HashSet<Place>>>,
    place: Place,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.place);
    }
}

/// Problems of the targets probed, each logged once when it starts and once when it ends (a
/// stopped server, a name that no longer resolves, a probe that keeps failing), not at every
/// round.
#[derive(Default)]
struct Troubles(Mutex<HashMap<String, Trouble>>);

struct Trouble {
    since: Instant,
    missed: u64,
}

impl Troubles {
    /// Records a failure of `key`; true when it starts a trouble (log it), false when it goes on.
    fn failed(&self, key: &str) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(key) {
            Some(t) => {
                t.missed += 1;
                false
            }
            None => {
                m.insert(
                    key.to_string(),
                    Trouble {
                        since: Instant::now(),
                        missed: 1,
                    },
                );
                true
            }
        }
    }

    /// Records a success of `key`: the trouble it ends, if there was one.
    fn ended(&self, key: &str) -> Option<Trouble> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key)
    }
}

/// Logs what one round on a monitored server or pgBouncer says about it, once per trouble.
fn report(shared: &Shared, troubles: &Troubles, place: &Place, target: &str, round: &Remote) {
    let key = place.to_string();
    match &round.unreachable {
        Some(e) => {
            if troubles.failed(&key) {
                tracing::warn!(
                    "probes of {place} ({target}): {e}; its samples are missing until it can be reached \
                     again (tried every round; the other probes go on)"
                );
            } else {
                tracing::debug!("probes of {place} ({target}): {e}");
            }
            shared.stats.set_target_down(&key, Some(e.clone()));
        }
        None => {
            if let Some(t) = troubles.ended(&key) {
                tracing::warn!(
                    "probes of {place} ({target}) work again after {} s ({} rounds missed)",
                    t.since.elapsed().as_secs(),
                    t.missed
                );
                shared.stats.set_target_down(&key, None);
            }
        }
    }
    for (probe, failure) in &round.probes {
        let key = format!("{place}: {probe}");
        match failure {
            Some(e) => {
                if troubles.failed(&key) {
                    tracing::warn!("{e} (logged again when it works)");
                } else {
                    tracing::debug!("{e}");
                }
            }
            None => {
                if let Some(t) = troubles.ended(&key) {
                    tracing::info!(
                        "probe {probe} on {place} works again after {} s",
                        t.since.elapsed().as_secs()
                    );
                }
            }
        }
    }
}

/// Writes the samples of one round to the spool in one write: those of every target that ends
/// within [`ROUND_WAIT`]; a target that takes longer has its samples written when they come.
async fn write_round(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Vec<Sample>>) {
    let deadline = Instant::now() + ROUND_WAIT;
    let mut samples = Vec::new();
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Some(s) => samples.extend(s),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    shared.spool_samples(samples).await;
    while let Some(late) = rx.recv().await {
        shared.spool_samples(late).await;
    }
}

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut sched = Schedule::fallback();
    let os = Arc::new(Mutex::new(OsProbes::new()));
    let short_wait = shared.config().short_wait;
    let mut check = Check {
        at: Instant::now(),
        wait: short_wait,
        fingerprint: None,
    };
    let limits = |c: &crate::config::AgentConfig| (c.max_connections, c.connection_lifetime);
    let mut applied = limits(&shared.config());
    let kept: Kept<Place> = Kept::new(applied.0, applied.1);
    let busy: Arc<Mutex<HashSet<Place>>> = Arc::default();
    let troubles: Arc<Troubles> = Arc::default();
    let mut fetching: Option<FetchTask> = None;
    loop {
        let now_limits = limits(&shared.config());
        if now_limits != applied {
            kept.set_limits(now_limits.0, now_limits.1);
            applied = now_limits;
        }
        let idle_check = kept.close_idle();
        let wake = match &fetching {
            Some(_) => sched.next_due(),
            None => Some(sched.next_due().map_or(check.at, |d| d.min(check.at))),
        };
        let wake = match (wake, idle_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            joined = async { fetching.as_mut().expect("guarded").await }, if fetching.is_some() => {
                fetching = None;
                let short_wait = shared.config().short_wait;
                match joined {
                    Ok(Some(Ok(Some(f)))) => {
                        if check.fingerprint.as_ref() == Some(&f.fingerprint) {
                            check.wait = (check.wait * 2).min(SCHEDULE_CHECK_MAX.max(short_wait));
                        } else {
                            if check.fingerprint.is_some() {
                                tracing::info!("the probe schedule changed on the PEM server");
                            }
                            sched.merge(f.jobs);
                            sched.servers = f.servers;
                            sched.bouncers = f.bouncers;
                            // Sessions of targets no longer probed are not kept.
                            kept.retain(|p| sched.probes(p));
                            if check.fingerprint.is_none() {
                                shared.started_probes(sched.summary());
                            }
                            check.fingerprint = Some(f.fingerprint);
                            check.wait = short_wait;
                        }
                    }
                    Ok(Some(Ok(None))) => check.wait = short_wait,
                    Ok(Some(Err(e))) => {
                        tracing::warn!(
                            "{e}; keeping the {} schedule",
                            if sched.loaded { "current" } else { "default" }
                        );
                        check.wait = short_wait;
                    }
                    // A panic, already logged with the task's name.
                    Ok(None) | Err(_) => check.wait = short_wait,
                }
                check.at = Instant::now() + check.wait;
            }
        }
        if stop.is_cancelled() {
            // No new round once shutdown began (see `Shared::rounds`).
            return;
        }
        let now = Instant::now();
        if fetching.is_none() && now >= check.at {
            let sh = shared.clone();
            fetching = Some(
                shared
                    .tasks
                    .spawn("schedule read", async move { fetch(&sh).await }),
            );
        }

        let due = sched.take_due(now);
        if due.is_empty() {
            continue;
        }
        let (round, rx) = mpsc::unbounded_channel::<Vec<Sample>>();
        // The writer is a round too: shutdown waits for it to spool what the round collected.
        let writer = shared.rounds.track_future(write_round(shared.clone(), rx));
        shared.tasks.spawn("spool writer", writer);
        for (place, specs) in due {
            let busy_key = format!("{place}: busy");
            if !busy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(place.clone())
            {
                if troubles.failed(&busy_key) {
                    tracing::warn!(
                        "{place}: the previous round is still running; skipping rounds until it ends"
                    );
                }
                continue;
            }
            troubles.ended(&busy_key);
            let guard = Busy {
                set: busy.clone(),
                place: place.clone(),
            };
            let name = format!("probes of {place}");
            let round = round.clone();
            match &place {
                Place::Agent => {
                    let os = os.clone();
                    let observer = shared.observer.clone();
                    let task = shared.rounds.track_future(async move {
                        let _guard = guard;
                        let samples = match observer {
                            Some(o) => specs
                                .iter()
                                .map(|s| Sample::new(s.name, None, None, o.rows(s)))
                                .collect(),
                            None => collect_os(os, specs).await,
                        };
                        let _ = round.send(samples);
                    });
                    shared.tasks.spawn(name, task);
                }
                Place::Server(_) | Place::Pgbouncer(_) => {
                    let settings = match &place {
                        Place::Server(id) => sched.servers.get(id).cloned(),
                        Place::Pgbouncer(b) => sched.bouncers.get(b).cloned(),
                        Place::Agent => None,
                    };
                    let Some(settings) = settings else { continue };
                    let kept = kept.clone();
                    let (sh, troubles) = (shared.clone(), troubles.clone());
                    let task = shared.rounds.track_future(async move {
                        let _guard = guard;
                        let r = collect_remote(&kept, &place, &settings, &specs).await;
                        report(&sh, &troubles, &place, &settings.target(), &r);
                        let _ = round.send(r.samples);
                    });
                    shared.tasks.spawn(name, task);
                }
            }
        }
    }
}

/// One round of agent-level probes, on a blocking thread (statvfs on a hung network mount
/// blocks).
async fn collect_os(os: Arc<Mutex<OsProbes>>, specs: Vec<&'static ProbeSpec>) -> Vec<Sample> {
    let joined = tokio::task::spawn_blocking(move || {
        let mut os = os.lock().unwrap_or_else(|p| p.into_inner());
        let mut samples = Vec::new();
        for spec in specs {
            let Collector::Os(collect) = spec.collector else {
                continue;
            };
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                crate::testhooks::probe(spec.name);
                collect(&mut os)
            }));
            match run {
                Ok(Ok(rows)) => samples.push(Sample::new(spec.name, None, None, rows)),
                Ok(Err(e)) => tracing::warn!("{e}"),
                Err(p) => tracing::error!(
                    "probe {} panicked: {}; the other probes go on",
                    spec.name,
                    panic_message(&*p)
                ),
            }
        }
        samples
    })
    .await;
    joined.unwrap_or_default()
}

/// What one round on a monitored server or pgBouncer brought.
struct Remote {
    samples: Vec<Sample>,
    /// Why the target could not be reached (no session, or it went away during the round).
    unreachable: Option<String>,
    /// Each probe run, with why it failed (`None`: it worked).
    probes: Vec<(&'static str, Option<String>)>,
}

/// One round of probes against one monitored server or pgBouncer, on its kept session.
async fn collect_remote(
    kept: &Kept<Place>,
    place: &Place,
    settings: &ConnectSettings,
    specs: &[&'static ProbeSpec],
) -> Remote {
    let mut round = Remote {
        samples: Vec::new(),
        unreachable: None,
        probes: Vec::new(),
    };
    let mut lease = match kept.checkout(place, settings).await {
        Ok(l) => l,
        Err(e) => {
            round.unreachable = Some(e.to_string());
            return round;
        }
    };
    let (server_id, bouncer) = match place {
        Place::Server(id) => (Some(*id), None),
        Place::Pgbouncer(b) => (None, Some(b.clone())),
        Place::Agent => (None, None),
    };
    // All probes at once: tokio-postgres pipelines them on the session, so a round is one
    // exchange with the server rather than one per probe. Each is a message of its own, so one
    // failing does not touch the others.
    let mut runs = run_all(&lease, specs.iter().copied()).await;
    // A kept session the server closed while it was idle (a restart, an idle timeout) shows
    // only when used: the probes it failed get one fresh session.
    if lease.reused() && lease.client().is_closed() {
        lease.discard();
        drop(lease);
        lease = match kept.checkout(place, settings).await {
            Ok(l) => l,
            Err(e) => {
                round.unreachable = Some(e.to_string());
                return round;
            }
        };
        let failed: Vec<&'static ProbeSpec> = specs
            .iter()
            .zip(&runs)
            .filter(|(_, r)| matches!(r, Ok(Err(e)) if session_lost(e)))
            .map(|(s, _)| *s)
            .collect();
        let mut again = run_all(&lease, failed.iter().copied()).await.into_iter();
        for (spec, run) in specs.iter().zip(runs.iter_mut()) {
            if failed.iter().any(|f| std::ptr::eq(*f, *spec)) {
                if let Some(r) = again.next() {
                    *run = r;
                }
            }
        }
    }
    for (spec, run) in specs.iter().zip(runs) {
        match run {
            Ok(Ok(rows)) => {
                round
                    .samples
                    .push(Sample::new(spec.name, server_id, bouncer.clone(), rows));
                round.probes.push((spec.name, None));
            }
            Ok(Err(probes::Error::Connection { source, .. })) if source.is_closed() => {
                // The target went away during the round: the next round opens a new session.
                lease.discard();
                round.unreachable.get_or_insert_with(|| source.to_string());
            }
            Ok(Err(e)) => round.probes.push((spec.name, Some(e.to_string()))),
            Err(p) => {
                lease.discard();
                tracing::error!(
                    "probe {} on {place} panicked: {}; the other probes go on",
                    spec.name,
                    panic_message(&*p)
                )
            }
        }
    }
    round
}

/// Whether a probe failed because its session is gone (closed, or silent past the statement
/// timeout); a probe the server refused leaves the session as it was (its message's implicit
/// transaction is rolled back by the server).
fn session_lost(e: &probes::Error) -> bool {
    matches!(e, probes::Error::Connection { source, .. } if source.is_closed())
}

type Run = Result<Result<Vec<probes::Row>, probes::Error>, Box<dyn std::any::Any + Send>>;

/// The probes on one session, sent together, their results in order.
async fn run_all(
    lease: &Lease<Place>,
    specs: impl Iterator<Item = &'static ProbeSpec>,
) -> Vec<Run> {
    futures_util::future::join_all(specs.map(|spec| run_remote(lease, spec))).await
}

/// One probe on a remote session, its panic caught.
async fn run_remote(lease: &Lease<Place>, spec: &'static ProbeSpec) -> Run {
    let client = lease.client();
    AssertUnwindSafe(async {
        crate::testhooks::probe(spec.name);
        match spec.collector {
            Collector::Sql(_) => {
                probes::postgres::collect(client, spec.name, PROBE_STATEMENT_TIMEOUT).await
            }
            Collector::Console(_) => probes::pgbouncer::collect(client, spec.name).await,
            Collector::Os(_) => Err(probes::Error::Unknown(spec.name.to_string())),
        }
    })
    .catch_unwind()
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(due: &HashMap<Place, Vec<&'static ProbeSpec>>) -> Vec<String> {
        let mut v: Vec<String> = due
            .iter()
            .flat_map(|(place, specs)| specs.iter().map(move |s| format!("{}@{place}", s.name)))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn jobs_of_related_intervals_fall_due_together_and_a_late_one_does_not_catch_up() {
        let mut s = Schedule::fallback();
        let a = s.anchor;
        let secs = |x: f64| a + Duration::from_secs_f64(x);
        assert_eq!(names(&s.take_due(a)).len(), 6, "every agent probe at once");
        s.merge(vec![
            (
                "cpu_usage".into(),
                Place::Agent,
                Duration::from_secs(10),
                true,
            ),
            (
                "memory_usage".into(),
                Place::Agent,
                Duration::from_secs(60),
                true,
            ),
            (
                "server_info".into(),
                Place::Server(1),
                Duration::from_secs(20),
                true,
            ),
        ]);
        // A new job runs at once; then every job falls on whole intervals from the anchor.
        assert_eq!(names(&s.take_due(secs(0.5))), ["server_info@server 1"]);
        assert_eq!(s.next_due(), Some(secs(10.0)));
        assert_eq!(names(&s.take_due(secs(10.3))), ["cpu_usage@this host"]);
        assert_eq!(
            names(&s.take_due(secs(20.1))),
            ["cpu_usage@this host", "server_info@server 1"]
        );
        // Late by 17 s: each runs once, then back on its slots.
        assert_eq!(
            names(&s.take_due(secs(47.0))),
            ["cpu_usage@this host", "server_info@server 1"]
        );
        assert_eq!(s.next_due(), Some(secs(50.0)));
        assert!(s.take_due(secs(49.9)).is_empty());
        assert_eq!(names(&s.take_due(secs(50.0))), ["cpu_usage@this host"]);
        assert_eq!(
            names(&s.take_due(secs(60.0))),
            [
                "cpu_usage@this host",
                "memory_usage@this host",
                "server_info@server 1"
            ]
        );
    }
}
