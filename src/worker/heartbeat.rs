//! The heartbeat loop: records `pem.record_heartbeat(agent_id)` at the interval the server
//! holds for this agent (`pem.agent.heartbeat_interval`, re-read with every beat). A failed beat
//! is logged and the loop goes on; heartbeats are liveness, so none is ever spooled.
//!
//! Each beat checks a session out for itself: it never waits behind a delivery or a schedule
//! read, and never runs inside someone else's transaction.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::connection::pool;

const BEAT: &str = "SELECT pem.record_heartbeat($1, $2), \
                           (SELECT heartbeat_interval FROM pem.agent WHERE id = $1), \
                           inet_server_port()";

const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let version = format!("pemworker {}", env!("CARGO_PKG_VERSION"));
    let mut interval = DEFAULT_INTERVAL;
    let mut warned_start = false;
    loop {
        let config = shared.config();
        let manager = shared.heartbeat_manager();
        // After a failure, the next beat comes with the next connection attempt (when that is
        // sooner): an agent that started during an outage does not wait out the default
        // interval once the server is back.
        let mut retry = None;
        match manager.checkout().await {
            Err(e) => {
                shared.stats.heartbeat(false);
                // The manager already warned about the outage itself.
                tracing::debug!("heartbeat skipped: {e}");
                retry = Some(manager.retry_in().max(Duration::from_secs(1)));
            }
            Ok(mut session) => {
                let what = "recording a heartbeat";
                let r = session
                    .query_one(
                        what,
                        BEAT,
                        &[(&config.agent_id, Type::INT4), (&version, Type::TEXT)],
                    )
                    .await
                    .and_then(|row| {
                        Ok((
                            pool::get::<bool>(&row, 0, what)?,
                            pool::get::<Option<i32>>(&row, 1, what)?,
                            pool::get::<Option<i32>>(&row, 2, what)?,
                        ))
                    });
                match r {
                    Ok((active, secs, server_port)) => {
                        shared.stats.heartbeat(active);
                        if !active {
                            tracing::error!(
                                "agent {} is not registered or inactive on the PEM server; register it again",
                                config.agent_id
                            );
                        }
                        if let Some(secs) = secs {
                            interval = Duration::from_secs(secs.max(1) as u64);
                        }
                        if !warned_start {
                            warned_start = true;
                            // Through pgBouncer the backend's port is not the one we dialled.
                            let tcp = !config.pem_hosts.iter().all(|h| h.starts_with('/'));
                            let pooled = tcp && server_port != Some(i32::from(config.pem_port));
                            if pooled {
                                tracing::info!(
                                    "connected to the PEM server through a connection pooler"
                                );
                            }
                            for w in super::startup_warnings(&config, pooled) {
                                tracing::warn!("{w}");
                            }
                        }
                    }
                    Err(e) => {
                        shared.stats.heartbeat(false);
                        tracing::warn!("heartbeat failed: {e}");
                        retry = Some(config.short_wait);
                    }
                }
            }
        }
        let wait = retry.map_or(interval, |r| r.min(interval));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
