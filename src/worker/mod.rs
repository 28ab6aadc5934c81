//! The worker (`pemworker -c agent.cfg`): runs until stopped.
//!
//! Four loops, each a supervised task on one tracker ([`tasks`]), stopped by one token:
//!
//! - [`heartbeat`]: records a heartbeat at the agent's interval (from `pem.agent`);
//! - [`collector`]: sleeps until the next probe is due (or the schedule is to be checked), runs
//!   the probes that are due, each target in its own named task, and spools their samples;
//! - [`delivery`]: sleeps until a batch is spooled, then sends the spool to the server, oldest
//!   first; after a failure it retries with backoff;
//! - [`renewal`]: sleeps until the agent's certificate is due for renewal, then has a new one
//!   signed through its own session and reconnects with it.
//!
//! Each loop checks its own session out of the connection manager, so none waits behind
//! another's statement or transaction. Disk work (spool, stats) runs on blocking threads.
//! The allocator keeps one arena and gives freed memory back after each delivery ([`memory`]).
//! SIGHUP re-reads agent.cfg (log level and intervals at once, connection settings by
//! reconnecting); SIGTERM and SIGINT stop collecting (rounds already running finish and spool
//! their samples), deliver what they can within the grace period and leave the rest in the
//! spool for the next start.

pub mod clock;
pub mod collector;
pub mod delivery;
pub mod heartbeat;
pub mod memory;
pub mod observe;
pub mod renewal;
pub mod stats;
pub mod tasks;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agentcfg::Problems;
use crate::config::AgentConfig;
use crate::connection;
use crate::connection::manager::Manager;
use crate::logging::Logging;
use crate::probes::Sample;
use crate::spool::{self, Spool, SpoolHandle, StateLock};
use stats::Stats;
use tasks::Tasks;

/// How long shutdown waits for pending deliveries before leaving them in the spool.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long shutdown waits, within [`SHUTDOWN_GRACE`], for probe rounds already running to
/// spool what they collected; a round stuck longer (a monitored server that hangs) is
/// abandoned rather than holding the exit up.
const ROUND_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] Problems),
    #[error(transparent)]
    Connection(#[from] connection::Error),
    #[error("cannot open the spool in {}: {source}", dir.display())]
    Spool {
        dir: PathBuf,
        #[source]
        source: spool::Error,
    },
}

/// State the loops share. Reload swaps the configuration and, when connection settings
/// changed, the managers.
pub struct Shared {
    config: RwLock<Arc<AgentConfig>>,
    pem: RwLock<Manager>,
    heartbeat: RwLock<Option<Manager>>,
    pub spool: SpoolHandle,
    /// Notified when a batch was spooled.
    pub spooled: Notify,
    pub stats: Stats,
    pub tasks: Tasks,
    /// The probe rounds running now (each also a task on `tasks`), so that shutdown can let
    /// them spool what they collected before it delivers.
    pub rounds: TaskTracker,
    /// What the start line says, gathered from the first heartbeat and schedule read.
    start_line: std::sync::Mutex<StartLine>,
    /// A fleet run's observer ([`observe`]); `None` for a worker of its own.
    pub observer: Option<Arc<dyn observe::Observer>>,
}

/// The tracing target of the line a worker logs once it runs. The default level (warning)
/// lets it through too, so a healthy worker in the foreground is not silent.
pub const START_TARGET: &str = "pemworker::started";

/// The parts of the start line; logged once both are known.
#[derive(Debug, Default)]
struct StartLine {
    pooled: Option<bool>,
    probes: Option<String>,
    logged: bool,
}

impl Shared {
    pub fn config(&self) -> Arc<AgentConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// After the PEM server refused this agent's write credentials: takes its secret file again
    /// if it holds another secret than the one in use (the agent was registered again with
    /// --force-registration, which issues a new secret, while this worker ran, for example to
    /// renew its certificate). True when it did, so the refused write can be tried again now.
    pub fn reread_secret(&self) -> bool {
        let c = self.config();
        let Some(path) = &c.agent_secret_file else {
            return false;
        };
        match crate::mac::AgentKey::load(path) {
            Ok(key) if c.agent_secret.as_ref() != Some(&key) => {
                let mut new = (*c).clone();
                new.agent_secret = Some(key);
                *self.config.write().expect("config lock") = Arc::new(new);
                tracing::warn!(
                    "{} holds a new secret (the agent was registered again): using it from now on",
                    path.display()
                );
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::debug!("{e}");
                false
            }
        }
    }

    pub fn pem(&self) -> Manager {
        self.pem.read().expect("manager lock").clone()
    }

    /// The heartbeat's manager: its own with heartbeat_connection, else the shared one (which
    /// opens another session when the first is busy).
    pub fn heartbeat_manager(&self) -> Manager {
        self.heartbeat
            .read()
            .expect("manager lock")
            .clone()
            .unwrap_or_else(|| self.pem())
    }

    /// The first heartbeat's finding: whether the PEM server is reached through a pooler.
    pub fn started_through(&self, pooled: bool) {
        self.start_line_part(|l| l.pooled = Some(pooled));
    }

    /// The first schedule read's finding: what is probed where.
    pub fn started_probes(&self, probes: String) {
        self.start_line_part(|l| l.probes = Some(probes));
    }

    fn start_line_part(&self, set: impl FnOnce(&mut StartLine)) {
        let mut line = self.start_line.lock().unwrap_or_else(|p| p.into_inner());
        set(&mut line);
        if line.logged {
            return;
        }
        let (Some(pooled), Some(probes)) = (line.pooled, &line.probes) else {
            return;
        };
        let c = self.config();
        tracing::info!(
            target: START_TARGET,
            "agent {} running as {} on {}:{} ({}); {probes}",
            c.agent_id,
            c.agent_user,
            c.pem_hosts.join(","),
            c.pem_port,
            if pooled {
                "through a connection pooler"
            } else {
                "directly to the PEM server"
            },
        );
        line.logged = true;
    }

    /// Keeps a round's samples in the spool (on disk, or held in memory when it cannot be
    /// written) and wakes the delivery loop.
    pub async fn spool_samples(&self, mut samples: Vec<Sample>) {
        if samples.is_empty() {
            return;
        }
        for s in &mut samples {
            crate::testhooks::sample(s);
            self.stats.collected(&s.probe, s.rows.len());
        }
        if let Some(o) = &self.observer {
            o.collected(&samples);
        }
        let n = samples.len();
        match self.spool.push(samples).await {
            Ok(_) => self.spooled.notify_one(),
            Err(e) => tracing::error!("cannot spool {n} samples: {e}"),
        }
    }
}

fn managers(c: &AgentConfig) -> Result<(Manager, Option<Manager>), connection::Error> {
    let targets = c.pem_targets()?;
    let pem = Manager::new(
        "PEM server",
        targets.clone(),
        c.pem_session_lifetime,
        c.long_wait,
    );
    let hb = c
        .heartbeat_connection
        .then(|| Manager::new("heartbeat", targets, c.pem_session_lifetime, c.long_wait));
    Ok((pem, hb))
}

fn connection_changed(a: &AgentConfig, b: &AgentConfig) -> bool {
    (
        &a.pem_hosts,
        a.pem_port,
        &a.agent_user,
        &a.agent_ssl_key,
        &a.agent_ssl_crt,
        a.tls_choice(),
        a.connect_timeout,
    ) != (
        &b.pem_hosts,
        b.pem_port,
        &b.agent_user,
        &b.agent_ssl_key,
        &b.agent_ssl_crt,
        b.tls_choice(),
        b.connect_timeout,
    ) || a.heartbeat_connection != b.heartbeat_connection
        || a.pem_session_lifetime != b.pem_session_lifetime
        || a.long_wait != b.long_wait
}

/// Warnings about settings that cannot work as asked; logged once at start.
pub fn startup_warnings(c: &AgentConfig, behind_pooler: bool) -> Vec<String> {
    let mut w = Vec::new();
    if behind_pooler {
        for (on, what) in [
            (c.enable_smtp, "enable_smtp"),
            (c.enable_snmp, "enable_snmp"),
            (c.enable_webhook, "enable_webhook"),
        ] {
            if on {
                w.push(format!(
                    "{what} is set, but this agent reaches the PEM server through a transaction pooler, where \
                     LISTEN/NOTIFY cannot work: this agent sends no such notifications; run a notification agent \
                     connected directly to the PEM server"
                ));
            }
        }
    }
    w
}

/// Opens the spool (after taking over a spool an earlier version kept in the shared default
/// directory), on a blocking thread.
async fn open_spool(config: &AgentConfig) -> Result<Spool, Error> {
    let (base, dir, limit) = (
        config.shared_state_dir.clone(),
        config.state_dir.clone(),
        config.spool_limit,
    );
    let spool_dir = dir.join("spool");
    let opened = tokio::task::spawn_blocking(move || {
        if let Some(base) = base {
            match spool::lock::adopt_shared_spool(&base, &dir) {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    "moved {n} spooled batches from the shared state directory {} into this agent's {}",
                    base.display(),
                    dir.display()
                ),
                Err(e) => tracing::error!(
                    "cannot move the spool of the shared state directory {} into {}: {e}",
                    base.display(),
                    dir.display()
                ),
            }
        }
        Spool::open(&dir.join("spool"), limit)
    })
    .await
    .map_err(|e| spool::Error::Interrupted(e.to_string()));
    opened.and_then(|r| r).map_err(|source| Error::Spool {
        dir: spool_dir,
        source,
    })
}

/// Runs the worker until `shutdown` is cancelled. `lock` is the state directory's lock (held
/// until this returns); `reload` is notified on SIGHUP and `read_config` re-reads agent.cfg.
pub async fn run(
    config: AgentConfig,
    lock: StateLock,
    logging: Option<&Logging>,
    shutdown: CancellationToken,
    reload: Arc<Notify>,
    read_config: impl Fn() -> Result<AgentConfig, Problems>,
) -> Result<stats::Snapshot, Error> {
    run_observed(config, lock, logging, shutdown, reload, read_config, None).await
}

/// [`run`], with a fleet run's observer (see [`observe`]).
pub async fn run_observed(
    config: AgentConfig,
    lock: StateLock,
    logging: Option<&Logging>,
    shutdown: CancellationToken,
    reload: Arc<Notify>,
    read_config: impl Fn() -> Result<AgentConfig, Problems>,
    observer: Option<Arc<dyn observe::Observer>>,
) -> Result<stats::Snapshot, Error> {
    tasks::log_panics();
    let spool = open_spool(&config).await?;
    let (pem, hb) = managers(&config)?;
    let stats_file = config.state_dir.join("stats.json");
    let shared = Arc::new(Shared {
        config: RwLock::new(Arc::new(config)),
        pem: RwLock::new(pem),
        heartbeat: RwLock::new(hb),
        spool: SpoolHandle::new(spool),
        spooled: Notify::new(),
        stats: Stats::default(),
        tasks: Tasks::new(),
        rounds: TaskTracker::new(),
        start_line: Default::default(),
        observer,
    });
    let c = shared.config();
    tracing::info!(
        "agent {} starting: PEM server {} port {} as {}; state in {}",
        c.agent_id,
        c.pem_hosts.join(","),
        c.pem_port,
        c.agent_user,
        lock.dir().display()
    );
    if c.agent_secret.is_none() {
        tracing::error!(
            "{} names no agent_secret_file: agent {} was registered before per-agent secrets, so the PEM server \
             refuses its heartbeats and samples (they stay in the spool); register it again with \
             --register-agent --force-registration, which keeps agent id {}",
            c.path.display(),
            c.agent_id,
            c.agent_id
        );
    }

    warn_of_expiry(&c);

    let tasks = shared.tasks.clone();
    let collect_stop = shutdown.child_token();
    let delivery_stop = CancellationToken::new();
    {
        let (sh, stop) = (shared.clone(), collect_stop.clone());
        tasks.supervise("heartbeat", stop.clone(), move || {
            heartbeat::run(sh.clone(), stop.clone())
        });
    }
    {
        let (sh, stop) = (shared.clone(), collect_stop.clone());
        tasks.supervise("collector", stop.clone(), move || {
            collector::run(sh.clone(), stop.clone())
        });
    }
    {
        let (sh, stop) = (shared.clone(), collect_stop.clone());
        tasks.supervise("certificate renewal", stop.clone(), move || {
            renewal::run(sh.clone(), stop.clone())
        });
    }
    {
        let (sh, stop) = (shared.clone(), delivery_stop.clone());
        tasks.supervise("delivery", stop.clone(), move || {
            delivery::run(sh.clone(), stop.clone())
        });
    }
    tasks.close();

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = reload.notified() => {
                match read_config() {
                    Ok(new) => apply_reload(&shared, new, logging),
                    Err(problems) => tracing::error!("reload refused, keeping the running configuration: {problems}"),
                }
            }
        }
    }

    // Stop collecting, then give delivery the grace period to empty the spool.
    tracing::info!(
        "stopping: delivering pending samples (up to {} s)",
        SHUTDOWN_GRACE.as_secs()
    );
    collect_stop.cancel();
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    // Probe rounds already running finish and spool what they collected, which is then
    // delivered now rather than at the next start.
    shared.rounds.close();
    let _ = tokio::time::timeout(ROUND_GRACE, shared.rounds.wait()).await;
    shared.spooled.notify_one();
    while shared.spool.figures().batches > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A delivery still running is cancelled: its transaction is never committed, and its
    // session is closed, so the server rolls it back; the batch stays in the spool.
    delivery_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "tasks still running at exit: {}",
            tasks.running().join(", ")
        );
    }
    // Samples held in memory are written now if they can be; those that cannot are counted.
    if let Err(e) = shared.spool.finish().await {
        tracing::error!("cannot close the spool: {e}");
    }
    let figures = shared.spool.figures();
    shared.stats.set_spool(&figures);
    if figures.samples > 0 {
        tracing::warn!(
            "{} samples stay in the spool and are delivered at the next start",
            figures.samples
        );
    }
    shared
        .stats
        .write_if_changed(&stats_file, shared.spool.health())
        .await;
    tracing::info!("stopped: {}", shared.stats.summary());
    drop(lock);
    Ok(shared.stats.snapshot())
}

/// How long before its certificate expires the agent starts saying so.
const EXPIRY_WARNING: chrono::Duration = chrono::Duration::days(30);

/// Warns when the agent's certificate expires soon and the worker does not renew it itself
/// (`certificate_renewal_fraction=0`; once it has expired, the connection attempts say so, naming
/// the file and the command that renews it).
fn warn_of_expiry(c: &AgentConfig) {
    if c.certificate_renewal_fraction.is_some() {
        return;
    }
    let Some(at) = connection::certificate_expiry(&c.agent_ssl_crt) else {
        return;
    };
    let left = at - chrono::Utc::now();
    if left > chrono::Duration::zero() && left < EXPIRY_WARNING {
        if let Some(target) = c.pem_targets().ok().and_then(|t| t.into_iter().next()) {
            tracing::warn!(
                "this agent's certificate {} expires on {} (in {} days); get a new one before then with: {}",
                c.agent_ssl_crt.display(),
                at.format("%Y-%m-%d %H:%M:%S UTC"),
                left.num_days(),
                connection::renewal_command(&target)
            );
        }
    }
}

fn apply_reload(shared: &Shared, new: AgentConfig, logging: Option<&Logging>) {
    let old = shared.config();
    if let Some(l) = logging {
        l.set_level(new.log_level);
    }
    if (&old.state_dir, old.spool_limit) != (&new.state_dir, new.spool_limit) {
        tracing::warn!(
            "state_dir and spool_limit changes take effect at the next start of the worker"
        );
    }
    let reconnect = connection_changed(&old, &new);
    if reconnect {
        match managers(&new) {
            Ok((pem, hb)) => {
                let old_pem =
                    std::mem::replace(&mut *shared.pem.write().expect("manager lock"), pem);
                let old_hb =
                    std::mem::replace(&mut *shared.heartbeat.write().expect("manager lock"), hb);
                old_pem.reset();
                if let Some(h) = old_hb {
                    h.reset();
                }
            }
            Err(e) => {
                tracing::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        }
    }
    tracing::info!(
        "reloaded {}: log level {:?}{}",
        new.path.display(),
        new.log_level,
        if reconnect {
            "; reconnecting with the new connection settings"
        } else {
            ""
        }
    );
    *shared.config.write().expect("config lock") = Arc::new(new);
}
