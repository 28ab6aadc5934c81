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
use crate::connection::{self, ConnectSettings, pool};
use crate::probes::{self, PROBES, ProbeSpec, Sample, Target, os::OsProbes};
use crate::targets::{self, Kind, Registry};

/// Longest a statement on a monitored server may run.
pub const PROBE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
const FALLBACK_INTERVAL: Duration = Duration::from_secs(60);

const SCHEDULE: &str = "SELECT probe, target_type, server_id, pgbouncer, interval_seconds, enabled \
                          FROM pem.agent_schedule($1)";
const SERVERS: &str = "SELECT b.server_id, coalesce(b.host, s.server_addr), coalesce(b.port, s.port), \
                              coalesce(b.database, s.database)::text, coalesce(b.username, s.username)::text, \
                              coalesce(b.sslmode, 'prefer') \
                         FROM pem.agent_server_binding b JOIN pem.server s ON s.id = b.server_id \
                        WHERE b.agent_id = $1 AND s.active";
const PGBOUNCERS: &str = "SELECT host || ':' || port::text, host, port, username::text, coalesce(sslmode, 'prefer') \
                            FROM pem.agent_pgbouncer_binding WHERE agent_id = $1";

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
    let what = "reading the probe schedule";
    let mut jobs = Vec::new();
    for r in rows {
        let name: String = pool::get(&r, 0, what)?;
        let target: String = pool::get(&r, 1, what)?;
        let place = match Target::parse(&target) {
            Some(Target::Agent) => Place::Agent,
            Some(Target::Server) => match pool::get::<Option<i32>>(&r, 2, what)? {
                Some(id) => Place::Server(id),
                None => continue,
            },
            Some(Target::Pgbouncer) => match pool::get::<Option<String>>(&r, 3, what)? {
                Some(b) => Place::Pgbouncer(b),
                None => continue,
            },
            None => continue,
        };
        let interval = Duration::from_secs(pool::get::<i32>(&r, 4, what)?.max(1) as u64);
        jobs.push((name, place, interval, pool::get::<bool>(&r, 5, what)?));
    }
    let registry = local_targets(&shared.config().path);
    let what = "reading monitored servers";
    let mut server_settings = HashMap::new();
    for r in &servers {
        if let Some(s) = monitored(
            &registry,
            Kind::Server,
            pool::get(r, 1, what)?,
            pool::get(r, 2, what)?,
            pool::get(r, 3, what)?,
            pool::get(r, 4, what)?,
            pool::get(r, 5, what)?,
        ) {
            server_settings.insert(pool::get::<i32>(r, 0, what)?, s);
        }
    }
    let servers = server_settings;
    let what = "reading bound pgBouncers";
    let mut bouncer_settings = HashMap::new();
    for r in &bouncers {
        if let Some(s) = monitored(
            &registry,
            Kind::Pgbouncer,
            pool::get(r, 1, what)?,
            pool::get(r, 2, what)?,
            "pgbouncer",
            pool::get(r, 3, what)?,
            pool::get(r, 4, what)?,
        ) {
            bouncer_settings.insert(pool::get::<String>(r, 0, what)?, s);
        }
    }
    let bouncers = bouncer_settings;
    Ok(Some(Fetched {
        jobs,
        servers,
        bouncers,
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
