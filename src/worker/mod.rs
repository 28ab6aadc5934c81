//! The worker (`pemworker -c agent.cfg`): runs until stopped.
//!
//! Three loops share one connection manager (and a second one for heartbeats when
//! heartbeat_connection is set), each spawned by name on one tracker and stopped by one token:
//!
//! - [`heartbeat`]: records a heartbeat at the agent's interval (from `pem.agent`);
//! - [`collector`]: every second runs the probes that are due, by the schedule it re-reads from
//!   the server every short_wait, and writes each batch of samples to the spool;
//! - [`delivery`] (driven from here): sends spooled batches to the server, oldest first.
//!
//! SIGHUP re-reads agent.cfg (log level and intervals at once, connection settings by
//! reconnecting); SIGTERM and SIGINT stop collecting, deliver what they can within the grace
//! period and leave the rest in the spool for the next start.

pub mod collector;
pub mod delivery;
pub mod heartbeat;
pub mod stats;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agentcfg::Problems;
use crate::config::AgentConfig;
use crate::connection;
use crate::connection::manager::Manager;
use crate::logging::Logging;
use crate::spool::{self, Spool};
use stats::Stats;

/// How long shutdown waits for pending deliveries before leaving them in the spool.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
    pem: RwLock<Arc<Manager>>,
    heartbeat: RwLock<Option<Arc<Manager>>>,
    pub spool: Mutex<Spool>,
    pub spooled: Notify,
    pub stats: Stats,
}

impl Shared {
    pub fn config(&self) -> Arc<AgentConfig> {
        self.config.read().expect("config lock").clone()
    }

    pub fn pem(&self) -> Arc<Manager> {
        self.pem.read().expect("manager lock").clone()
    }

    /// The heartbeat's manager: its own with heartbeat_connection, else the shared one.
    pub fn heartbeat_manager(&self) -> Arc<Manager> {
        self.heartbeat
            .read()
            .expect("manager lock")
            .clone()
            .unwrap_or_else(|| self.pem())
    }

    /// Writes a batch to the spool and wakes the delivery loop.
    pub fn spool_samples(&self, samples: &[crate::probes::Sample]) {
        if samples.is_empty() {
            return;
        }
        for s in samples {
            self.stats.collected(&s.probe, s.rows.len());
        }
        match self.spool.lock().expect("spool lock").push(samples) {
            Ok(_) => self.spooled.notify_one(),
            Err(e) => tracing::error!("cannot spool {} samples: {e}", samples.len()),
        }
    }
}

fn managers(c: &AgentConfig) -> Result<(Arc<Manager>, Option<Arc<Manager>>), connection::Error> {
    let targets = c.pem_targets()?;
    let pem = Arc::new(Manager::new(
        "PEM server",
        targets.clone(),
        c.connection_lifetime,
        c.long_wait,
    ));
    let hb = c.heartbeat_connection.then(|| {
        Arc::new(Manager::new(
            "heartbeat",
            targets,
            c.connection_lifetime,
            c.long_wait,
        ))
    });
    Ok((pem, hb))
}

fn connection_changed(a: &AgentConfig, b: &AgentConfig) -> bool {
    (
        &a.pem_hosts,
        a.pem_port,
        &a.agent_user,
        &a.agent_ssl_key,
        &a.agent_ssl_crt,
        &a.ca_file,
        a.connect_timeout,
    ) != (
        &b.pem_hosts,
        b.pem_port,
        &b.agent_user,
        &b.agent_ssl_key,
        &b.agent_ssl_crt,
        &b.ca_file,
        b.connect_timeout,
    ) || a.heartbeat_connection != b.heartbeat_connection
        || a.connection_lifetime != b.connection_lifetime
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

/// Runs the worker until `shutdown` is cancelled. `reload` is notified on SIGHUP and
/// `read_config` re-reads agent.cfg.
pub async fn run(
    config: AgentConfig,
    logging: Option<&Logging>,
    shutdown: CancellationToken,
    reload: Arc<Notify>,
    read_config: impl Fn() -> Result<AgentConfig, Problems>,
) -> Result<Stats, Error> {
    let spool_dir = config.state_dir.join("spool");
    let spool = Spool::open(&spool_dir, config.spool_limit).map_err(|source| Error::Spool {
        dir: spool_dir.clone(),
        source,
    })?;
    let (pem, hb) = managers(&config)?;
    let stats_file = config.state_dir.join("stats.json");
    let shared = Arc::new(Shared {
        config: RwLock::new(Arc::new(config)),
        pem: RwLock::new(pem),
        heartbeat: RwLock::new(hb),
        spool: Mutex::new(spool),
        spooled: Notify::new(),
        stats: Stats::default(),
    });
    let c = shared.config();
    tracing::info!(
        "agent {} starting: PEM server {} port {} as {}",
        c.agent_id,
        c.pem_hosts.join(","),
        c.pem_port,
        c.agent_user
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

    let tracker = TaskTracker::new();
    let collect_stop = shutdown.child_token();
    let names = Arc::new(Mutex::new(BTreeSet::new()));
    let spawn =
        |name: &'static str,
         fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            names.lock().expect("names").insert(name);
            let names = names.clone();
            tracker.spawn(async move {
                fut.await;
                names.lock().expect("names").remove(name);
            });
        };
    spawn(
        "heartbeat",
        Box::pin(heartbeat::run(shared.clone(), collect_stop.clone())),
    );
    spawn(
        "collector",
        Box::pin(collector::run(shared.clone(), collect_stop.clone())),
    );
    let delivery_stop = CancellationToken::new();
    spawn(
        "delivery",
        Box::pin(delivery_loop(
            shared.clone(),
            delivery_stop.clone(),
            stats_file.clone(),
        )),
    );
    tracker.close();

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = reload.notified() => {
                match read_config() {
                    Ok(new) => apply_reload(&shared, new, logging).await,
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
    shared.spooled.notify_one();
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    loop {
        let empty = shared.spool.lock().expect("spool lock").is_empty();
        if empty || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    delivery_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        let left: Vec<_> = names.lock().expect("names").iter().copied().collect();
        tracing::warn!("tasks still running at exit: {}", left.join(", "));
    }
    let (pending, dropped) = {
        let s = shared.spool.lock().expect("spool lock");
        (s.samples(), s.dropped)
    };
    shared.stats.set_spool(pending as u64, dropped);
    if pending > 0 {
        tracing::warn!("{pending} samples stay in the spool and are delivered at the next start");
    }
    shared.stats.write(&stats_file);
    tracing::info!("stopped: {}", shared.stats.summary());
    Ok(Arc::try_unwrap(shared).map(|s| s.stats).unwrap_or_default())
}

async fn apply_reload(shared: &Shared, new: AgentConfig, logging: Option<&Logging>) {
    let old = shared.config();
    if let Some(l) = logging {
        l.set_level(new.log_level);
    }
    let reconnect = connection_changed(&old, &new);
    if reconnect {
        match managers(&new) {
            Ok((pem, hb)) => {
                *shared.pem.write().expect("manager lock") = pem;
                *shared.heartbeat.write().expect("manager lock") = hb;
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

/// Delivers spooled batches whenever some arrive (and every short_wait, to retry after an
/// outage) until stopped.
async fn delivery_loop(shared: Arc<Shared>, stop: CancellationToken, stats_file: PathBuf) {
    loop {
        drain(&shared, &stop).await;
        {
            let s = shared.spool.lock().expect("spool lock");
            shared.stats.set_spool(s.samples() as u64, s.dropped);
        }
        shared.stats.write(&stats_file);
        let wait = shared.config().short_wait.min(Duration::from_secs(2));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.spooled.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Delivers until the spool is empty or the server is unreachable.
async fn drain(shared: &Shared, stop: &CancellationToken) {
    loop {
        if stop.is_cancelled() {
            return;
        }
        let Some(entry) = shared.spool.lock().expect("spool lock").oldest() else {
            return;
        };
        let manager = shared.pem();
        let client = match manager.client().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("delivery waits: {e}");
                shared.stats.set_connected(false);
                return;
            }
        };
        shared.stats.set_connected(true);
        let config = shared.config();
        match delivery::deliver(
            &client,
            config.agent_id,
            config.agent_secret.as_ref(),
            &entry.samples,
        )
        .await
        {
            Ok(()) => {
                tracing::debug!(
                    "delivered spool batch {} ({} samples)",
                    entry.seq,
                    entry.samples.len()
                );
                shared.spool.lock().expect("spool lock").remove(entry.seq);
                shared.stats.delivered(entry.samples.len());
            }
            Err(e) if e.is_transient() => {
                tracing::warn!("delivery of {} samples postponed: {e}", entry.samples.len());
                manager.failed(&client, &e).await;
                if !client.is_closed() {
                    // A server-side interruption (restart, pause) may leave the session usable
                    // but in an unknown state: start afresh.
                    manager.reset().await;
                }
                return;
            }
            Err(e) => {
                tracing::error!(
                    "the PEM server refused a batch of {} samples; it is kept aside in the spool as .rejected: {e}",
                    entry.samples.len()
                );
                shared.spool.lock().expect("spool lock").reject(entry.seq);
            }
        }
    }
}
