//! The collector loop: once a second, runs the probes that are due and spools their samples.
//!
//! The schedule (`pem.agent_schedule`) and the servers and pgBouncers bound to this agent are
//! re-read every short_wait, so changes on the server take effect within that time. Until the
//! first read succeeds (the server may be down when the agent starts), the agent-level probes
//! run every minute. Agent-level probes run in the loop itself (they only read /proc); probes of
//! monitored servers and pgBouncers run in their own tasks, one per target, at most
//! max_connections at a time, each with its own connection closed after the round.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::connection::{self, ConnectSettings, SslMode, pool};
use crate::probes::{self, PROBES, ProbeSpec, Sample, Target, os::OsProbes};

/// Longest a statement on a monitored server may run.
pub const PROBE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
const FALLBACK_INTERVAL: Duration = Duration::from_secs(60);

const SCHEDULE: &str = "SELECT probe, target_type, server_id, pgbouncer, interval_seconds, enabled \
                          FROM pem.agent_schedule($1)";
// Agents hold no table privileges: what is bound to them comes from pem.agent_targets.
const SERVERS: &str = "SELECT server_id, host, port, database, username, sslmode \
                         FROM pem.agent_targets($1) WHERE target_type = 'server'";
const PGBOUNCERS: &str = "SELECT pgbouncer, host, port, username, sslmode \
                            FROM pem.agent_targets($1) WHERE target_type = 'pgbouncer'";

/// Where a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Place {
    Agent,
    Server(i32),
    Pgbouncer(String),
}

#[derive(Debug)]
struct Job {
    spec: &'static ProbeSpec,
    place: Place,
    interval: Duration,
    next_due: Instant,
}

type Key = (&'static str, Place);

/// The loop's state between ticks.
struct Schedule {
    jobs: HashMap<Key, Job>,
    servers: HashMap<i32, ConnectSettings>,
    bouncers: HashMap<String, ConnectSettings>,
    loaded: bool,
}

impl Schedule {
    fn fallback() -> Schedule {
        let now = Instant::now();
        let jobs = PROBES
            .iter()
            .filter(|p| p.target == Target::Agent)
            .map(|p| {
                let job = Job {
                    spec: p,
                    place: Place::Agent,
                    interval: FALLBACK_INTERVAL,
                    next_due: now,
                };
                ((p.name, Place::Agent), job)
            })
            .collect();
        Schedule {
            jobs,
            servers: HashMap::new(),
            bouncers: HashMap::new(),
            loaded: false,
        }
    }

    /// Replaces the jobs with the server's schedule, keeping each existing job's due time
    /// (brought forward if its interval shrank).
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
            let next_due = match self.jobs.get(&key) {
                Some(old) => old.next_due.min(now + interval),
                None => now,
            };
            jobs.insert(
                key,
                Job {
                    spec,
                    place,
                    interval,
                    next_due,
                },
            );
        }
        self.jobs = jobs;
        self.loaded = true;
    }
}

/// What one schedule read brings.
struct Fetched {
    jobs: Vec<(String, Place, Duration, bool)>,
    servers: HashMap<i32, ConnectSettings>,
    bouncers: HashMap<String, ConnectSettings>,
}

/// Reads the schedule and bindings. Runs in its own task so that a slow or paused server
/// never holds up collection.
async fn fetch(shared: &Shared) -> Result<Option<Fetched>, connection::Error> {
    let manager = shared.pem();
    let client = match manager.client().await {
        Ok(c) => c,
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
    let result = async {
        let rows = pool::query(&client, "reading the probe schedule", SCHEDULE, &id).await?;
        let servers = pool::query(&client, "reading monitored servers", SERVERS, &id).await?;
        let bouncers = pool::query(&client, "reading bound pgBouncers", PGBOUNCERS, &id).await?;
        Ok::<_, connection::Error>((rows, servers, bouncers))
    }
    .await;
    let (rows, servers, bouncers) = match result {
        Ok(r) => r,
        Err(e) => {
            manager.failed(&client, &e).await;
            return Err(e);
        }
    };
    let mut jobs = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let target: String = r.get(1);
        let place = match Target::parse(&target) {
            Some(Target::Agent) => Place::Agent,
            Some(Target::Server) => match r.get::<_, Option<i32>>(2) {
                Some(id) => Place::Server(id),
                None => continue,
            },
            Some(Target::Pgbouncer) => match r.get::<_, Option<String>>(3) {
                Some(b) => Place::Pgbouncer(b),
                None => continue,
            },
            None => continue,
        };
        let interval = Duration::from_secs(r.get::<_, i32>(4).max(1) as u64);
        jobs.push((name, place, interval, r.get::<_, bool>(5)));
    }
    let servers = servers
        .iter()
        .filter_map(|r| {
            let s = monitored(r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))?;
            Some((r.get::<_, i32>(0), s))
        })
        .collect();
    let bouncers = bouncers
        .iter()
        .filter_map(|r| {
            Some((
                r.get::<_, String>(0),
                monitored(r.get(1), r.get(2), "pgbouncer", r.get(3), r.get(4))?,
            ))
        })
        .collect();
    Ok(Some(Fetched {
        jobs,
        servers,
        bouncers,
    }))
}

/// Settings for a monitored server or pgBouncer console. The password, if one is needed,
/// comes from the agent user's ~/.pgpass (or PGPASSFILE): never from the PEM server.
fn monitored(
    host: String,
    port: i32,
    db: &str,
    user: String,
    sslmode: String,
) -> Option<ConnectSettings> {
    let port = u16::try_from(port).ok()?;
    let mut s = ConnectSettings::from_env(&host, port, &user, db).ok()?;
    s.sslmode = sslmode.parse::<SslMode>().ok()?;
    s.resolve_password(&[]);
    s.connect_timeout = PROBE_STATEMENT_TIMEOUT;
    Some(s)
}

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut sched = Schedule::fallback();
    let mut os = Some(OsProbes::new());
    let mut refresh_at = Instant::now();
    let limit = shared
        .config()
        .max_connections
        .unwrap_or(Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(limit));
    let busy: Arc<Mutex<HashSet<Place>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (fetched_tx, mut fetched_rx) = tokio::sync::mpsc::channel(1);
    let mut fetching = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if now >= refresh_at && !fetching {
            fetching = true;
            let (sh, tx) = (shared.clone(), fetched_tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(fetch(&sh).await).await;
            });
            refresh_at = now + shared.config().short_wait;
        }
        while let Ok(result) = fetched_rx.try_recv() {
            fetching = false;
            match result {
                Ok(Some(f)) => {
                    sched.merge(f.jobs);
                    sched.servers = f.servers;
                    sched.bouncers = f.bouncers;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    "{e}; keeping the {} schedule",
                    if sched.loaded { "current" } else { "default" }
                ),
            }
        }

        let mut due: HashMap<Place, Vec<&'static ProbeSpec>> = HashMap::new();
        for job in sched.jobs.values_mut() {
            if job.next_due <= now {
                due.entry(job.place.clone()).or_default().push(job.spec);
                job.next_due += job.interval;
                if job.next_due <= now {
                    job.next_due = now + job.interval;
                }
            }
        }

        if let Some(specs) = due.remove(&Place::Agent) {
            // statvfs on a hung network mount blocks: keep it off the runtime's threads.
            let mut probes = os.take().unwrap_or_default();
            let joined = tokio::task::spawn_blocking(move || {
                let samples: Vec<Sample> = specs
                    .iter()
                    .filter_map(|spec| match probes.collect(spec.name) {
                        Ok(rows) => Some(Sample::new(spec.name, None, None, rows)),
                        Err(e) => {
                            tracing::warn!("{e}");
                            None
                        }
                    })
                    .collect();
                (probes, samples)
            })
            .await;
            if let Ok((probes, samples)) = joined {
                os = Some(probes);
                shared.spool_samples(&samples);
            }
        }

        for (place, specs) in due {
            let settings = match &place {
                Place::Server(id) => sched.servers.get(id).cloned(),
                Place::Pgbouncer(b) => sched.bouncers.get(b).cloned(),
                Place::Agent => None,
            };
            let Some(settings) = settings else { continue };
            if !busy.lock().expect("busy lock").insert(place.clone()) {
                tracing::warn!("{place:?}: the previous round is still running; skipping this one");
                continue;
            }
            let (shared, permits, busy) = (shared.clone(), permits.clone(), busy.clone());
            tokio::spawn(async move {
                if let Ok(_permit) = permits.acquire().await {
                    let samples = collect_remote(&place, &settings, &specs).await;
                    shared.spool_samples(&samples);
                }
                busy.lock().expect("busy lock").remove(&place);
            });
        }
    }
}

/// One round of probes against one monitored server or pgBouncer, on one connection.
async fn collect_remote(
    place: &Place,
    settings: &ConnectSettings,
    specs: &[&'static ProbeSpec],
) -> Vec<Sample> {
    let client = match connection::connect(settings).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("probes of {}: {e}", settings.target());
            return Vec::new();
        }
    };
    let mut samples = Vec::new();
    for spec in specs {
        let result = match place {
            Place::Server(_) => {
                probes::postgres::collect(&client, spec.name, PROBE_STATEMENT_TIMEOUT).await
            }
            Place::Pgbouncer(_) => probes::pgbouncer::collect(&client, spec.name).await,
            Place::Agent => continue,
        };
        match result {
            Ok(rows) => {
                let (server_id, bouncer) = match place {
                    Place::Server(id) => (Some(*id), None),
                    Place::Pgbouncer(b) => (None, Some(b.clone())),
                    Place::Agent => (None, None),
                };
                samples.push(Sample::new(spec.name, server_id, bouncer, rows));
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
    samples
}
