//! The connection manager: the one owner of a session with the PEM server.
//!
//! Callers ask for the client, use it, and report a failure that means the connection is gone;
//! the next request reconnects. Reconnection tries each configured host in order and, when all
//! fail, waits a jittered exponential backoff capped at long_wait; while waiting, requests fail
//! at once instead of piling up. A session older than connection_lifetime is replaced.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::{ConnectSettings, Error, connect};
use crate::backoff::Backoff;

/// Why no client is available right now.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("waiting {} s before reconnecting to the PEM server (last error: {last})", .wait.as_secs())]
    Backoff { wait: Duration, last: String },
    #[error(transparent)]
    Connect(#[from] Error),
}

struct State {
    client: Option<(Arc<Client>, Instant)>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    last_error: String,
    /// Which host served last; reconnection starts with it.
    preferred: usize,
}

pub struct Manager {
    name: &'static str,
    targets: Vec<ConnectSettings>,
    lifetime: Option<Duration>,
    state: Mutex<State>,
}

impl Manager {
    /// `targets` are tried in order; `max_wait` caps the backoff (long_wait).
    pub fn new(
        name: &'static str,
        targets: Vec<ConnectSettings>,
        lifetime: Option<Duration>,
        max_wait: Duration,
    ) -> Manager {
        let min = Duration::from_secs(1).min(max_wait.max(Duration::from_millis(100)));
        let backoff = Backoff::new(min, max_wait.max(min)).expect("bounds checked above");
        Manager {
            name,
            targets,
            lifetime,
            state: Mutex::new(State {
                client: None,
                backoff,
                retry_at: None,
                last_error: String::new(),
                preferred: 0,
            }),
        }
    }

    /// A live client, connecting if needed.
    pub async fn client(&self) -> Result<Arc<Client>, Unavailable> {
        let mut st = self.state.lock().await;
        if let Some((c, since)) = &st.client {
            let expired = self.lifetime.is_some_and(|l| since.elapsed() >= l);
            if !c.is_closed() && !expired {
                return Ok(c.clone());
            }
            tracing::debug!(
                "{}: replacing the connection ({})",
                self.name,
                if expired {
                    "lifetime reached"
                } else {
                    "closed"
                }
            );
            st.client = None;
        }
        if let Some(at) = st.retry_at {
            let now = Instant::now();
            if at > now {
                return Err(Unavailable::Backoff {
                    wait: at - now,
                    last: st.last_error.clone(),
                });
            }
        }
        let n = self.targets.len();
        let mut last = None;
        for i in 0..n {
            let idx = (st.preferred + i) % n;
            let t = &self.targets[idx];
            match connect(t).await {
                Ok(c) => {
                    if st.retry_at.is_some() {
                        tracing::info!("{}: connected to {} again", self.name, t.target());
                    } else {
                        tracing::debug!("{}: connected to {}", self.name, t.target());
                    }
                    let c = Arc::new(c);
                    st.client = Some((c.clone(), Instant::now()));
                    st.retry_at = None;
                    st.preferred = idx;
                    st.backoff.reset();
                    return Ok(c);
                }
                Err(e) => {
                    // Warn once per outage; the retries that follow are routine.
                    if st.retry_at.is_none() {
                        tracing::warn!("{}: {e}", self.name);
                    } else {
                        tracing::debug!("{}: {e}", self.name);
                    }
                    last = Some(e);
                }
            }
        }
        let e = last.expect("at least one target");
        let wait = st.backoff.next_delay();
        st.retry_at = Some(Instant::now() + wait);
        st.last_error = e.to_string();
        Err(Unavailable::Connect(e))
    }

    /// Reports that a statement failed. A failure that means the session is unusable drops it,
    /// so the next request reconnects.
    pub async fn failed(&self, client: &Arc<Client>, e: &Error) {
        if e.is_closed() || e.is_connect() || client.is_closed() {
            let mut st = self.state.lock().await;
            if st
                .client
                .as_ref()
                .is_some_and(|(c, _)| Arc::ptr_eq(c, client))
            {
                tracing::info!("{}: connection lost: {e}", self.name);
                st.client = None;
            }
        }
    }

    /// Drops the session (after a reload changed the settings, or at shutdown).
    pub async fn reset(&self) {
        let mut st = self.state.lock().await;
        st.client = None;
        st.retry_at = None;
        st.backoff.reset();
    }

    pub fn targets(&self) -> &[ConnectSettings] {
        &self.targets
    }
}
