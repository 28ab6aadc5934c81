//! The heartbeat loop: records `pem.record_heartbeat(agent_id, version, sent_at, mac)` at the
//! interval the server holds for this agent (`pem.agent.heartbeat_interval`, returned with every
//! beat). Each beat carries a MAC made with the agent's secret, so no other agent can beat for
//! it. A failed beat is logged and the loop goes on; heartbeats are liveness, so none is ever
//! spooled.
//!
//! Each beat checks a session out for itself and is its own READ WRITE transaction on it: it
//! never waits behind a delivery or a schedule read, and never runs inside someone else's
//! transaction.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::clock::SentAt;
use crate::connection::session::Session;
use crate::connection::{Error, pool};
use crate::mac::{self, AgentKey, Kind};

const BEAT: &str = "SELECT h.active, h.heartbeat_interval, pg_catalog.inet_server_port() \
                      FROM pem.record_heartbeat($1, $2, $3, $4) AS h";

const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// What the server answered to one beat.
struct Beat {
    active: bool,
    interval: Option<i32>,
    server_port: Option<i32>,
}

/// One heartbeat in its own transaction on `session`.
async fn beat(
    session: &mut Session,
    agent_id: i32,
    key: Option<&AgentKey>,
    version: &str,
    sent_at: &str,
) -> Result<Beat, Error> {
    let signature = mac::sign(key, Kind::Heartbeat, agent_id, sent_at, version);
    let params: [pool::Param<'_>; 4] = [
        (&agent_id, Type::INT4),
        (&version, Type::TEXT),
        (&sent_at, Type::TEXT),
        (&signature, Type::TEXT),
    ];
    let what = "recording a heartbeat";
    let mut tx = session.begin("a heartbeat").await?;
    let rows = tx.query(what, BEAT, &params).await?;
    tx.commit().await?;
    let row = rows.first().ok_or_else(|| Error::Reply {
        what: what.to_string(),
        why: "no row".into(),
    })?;
    Ok(Beat {
        active: pool::get(row, 0, what)?,
        interval: pool::get(row, 1, what)?,
        server_port: pool::get(row, 2, what)?,
    })
}

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let version = format!("pemworker {}", env!("CARGO_PKG_VERSION"));
    let mut interval = DEFAULT_INTERVAL;
    let mut warned_start = false;
    // The SQLSTATE of a refusal already logged with its fix, so a refused agent (no or another
    // write secret) says so once, not at every beat.
    let mut refused: Option<String> = None;
    // Stamps that a step of the wall clock does not make look stale or replayed.
    let mut clock = SentAt::default();
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
                let (stamp, made) = clock.next();
                let began = std::time::Instant::now();
                let r = beat(
                    &mut session,
                    config.agent_id,
                    config.agent_secret.as_ref(),
                    &version,
                    &mac::timestamp(stamp),
                )
                .await;
                if let Some(o) = &shared.observer {
                    o.heartbeat(began.elapsed(), r.as_ref().is_ok_and(|b| b.active));
                }
                match r {
                    Ok(b) => {
                        clock.accepted(stamp, made);
                        refused = None;
                        shared.stats.heartbeat(b.active);
                        if !b.active {
                            tracing::error!(
                                "agent {} is not registered or inactive on the PEM server; register it again",
                                config.agent_id
                            );
                        }
                        if let Some(secs) = b.interval {
                            interval = Duration::from_secs(secs.max(1) as u64);
                        }
                        if !warned_start {
                            warned_start = true;
                            // Through pgBouncer the backend's port is not the one we dialled.
                            let tcp = !config.pem_hosts.iter().all(|h| h.starts_with('/'));
                            let pooled = tcp
                                && !b.server_port.is_some_and(|p| {
                                    config.pem_ports.iter().any(|&q| i32::from(q) == p)
                                });
                            shared.started_through(pooled);
                            for w in super::startup_warnings(&config, pooled) {
                                tracing::warn!("{w}");
                            }
                        }
                    }
                    Err(e) if e.is_write_refused() && shared.reread_secret() => {
                        shared.stats.heartbeat(false);
                        tracing::debug!("heartbeat refused: {e}; trying the new secret");
                        retry = Some(Duration::ZERO);
                    }
                    Err(e) if e.is_refused() => {
                        clock.refused();
                        shared.stats.heartbeat(false);
                        let code = e.code().map(|c| c.code().to_string());
                        if refused != code {
                            let advice = e.advice().map(|a| format!("; {a}")).unwrap_or_default();
                            tracing::error!("heartbeat refused: {e}{advice}");
                            refused = code;
                        } else {
                            tracing::debug!("heartbeat refused: {e}");
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
