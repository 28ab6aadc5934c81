//! The heartbeat loop: records `pem.record_heartbeat(agent_id, version, sent_at, mac)` at the
//! interval the server holds for this agent (`pem.agent.heartbeat_interval`, returned with every
//! beat). Each beat is its own READ WRITE transaction and carries a MAC made with the agent's
//! secret, so no other agent can beat for it. A failed beat is logged and the loop goes on;
//! heartbeats are liveness, so none is ever spooled.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::connection::pool;
use crate::mac::{self, Kind};

const BEAT: &str = "SELECT h.active, h.heartbeat_interval, pg_catalog.inet_server_port() \
                      FROM pem.record_heartbeat($1, $2, $3, $4) AS h";

const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let version = format!("pemworker {}", env!("CARGO_PKG_VERSION"));
    let mut interval = DEFAULT_INTERVAL;
    let mut warned_start = false;
    loop {
        let config = shared.config();
        let manager = shared.heartbeat_manager();
        match manager.client().await {
            Err(e) => {
                shared.stats.heartbeat(false);
                // The manager already warned about the outage itself.
                tracing::debug!("heartbeat skipped: {e}");
            }
            Ok(client) => {
                let sent_at = mac::now();
                let signature = mac::sign(
                    config.agent_secret.as_ref(),
                    Kind::Heartbeat,
                    config.agent_id,
                    &sent_at,
                    &version,
                );
                let params: [pool::Param<'_>; 4] = [
                    (&config.agent_id, Type::INT4),
                    (&version, Type::TEXT),
                    (&sent_at, Type::TEXT),
                    (&signature, Type::TEXT),
                ];
                let beat = pool::query(&client, "recording a heartbeat", BEAT, &params);
                let r = pool::transaction(&client, "a heartbeat", beat).await;
                match r {
                    Ok(rows) => {
                        let active: bool = rows[0].get(0);
                        shared.stats.heartbeat(active);
                        if !active {
                            tracing::error!(
                                "agent {} is not registered or inactive on the PEM server; register it again",
                                config.agent_id
                            );
                        }
                        if let Some(secs) = rows[0].get::<_, Option<i32>>(1) {
                            interval = Duration::from_secs(secs.max(1) as u64);
                        }
                        if !warned_start {
                            warned_start = true;
                            // Through pgBouncer the backend's port is not the one we dialled.
                            let server_port: Option<i32> = rows[0].get(2);
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
                        manager.failed(&client, &e).await;
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
