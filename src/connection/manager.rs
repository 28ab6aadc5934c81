//! The connection manager: sessions with the PEM server, each checked out by one owner.
//!
//! [`Manager::checkout`] hands out an idle session or opens a new one, so a loop never waits
//! behind another loop's statement or transaction: a heartbeat issued while a delivery holds
//! a session gets a second session (a session to pgBouncer costs no server backend). Sessions
//! come back when their [`Session`] is dropped, unless they are broken, still in a transaction,
//! older than pem_session_lifetime, or the manager was reset meanwhile; those are closed.
//!
//! Connecting happens without any lock held, so a slow host stalls only the loop that asked.
//! Hosts are tried in order, starting with the one that served last; when all fail, checkouts
//! fail at once until a jittered exponential backoff (capped at long_wait) has passed. A
//! certificate problem (the server's certificate from another CA, this agent's expired) is
//! fixed by replacing a file, not by time: it is retried every long_wait from the start. The
//! outage is logged once (again if its cause changes), and its end once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::session::Session;
use super::{ConnectSettings, Error, connect};
use crate::backoff::Backoff;

/// Idle sessions kept for reuse; more are closed when given back. Three loops talk to the PEM
/// server (heartbeat, schedule, delivery), each for a few milliseconds a round, so they rarely
/// overlap: one kept session serves them all, and the one an overlap opens is closed again.
/// Keeping one per loop would hold three server backends per agent when agents connect
/// directly, and three client connections per agent in pgBouncer (measured with `pemworker
/// fleet`: README, "Fleet").
const MAX_IDLE: usize = 1;

/// Why no session is available right now.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("waiting {} s before reconnecting to the PEM server (last error: {last})", .wait.as_secs())]
    Backoff { wait: Duration, last: String },
    #[error(transparent)]
    Connect(#[from] Error),
}

struct State {
    idle: Vec<(Client, Instant)>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    last_error: String,
    /// Which host served last; reconnection starts with it.
    preferred: usize,
    /// Bumped by `reset`: sessions checked out before are closed when given back.
    generation: u64,
    /// An outage was logged and its end was not yet.
    down: bool,
    /// Per target, what the outage's last line about it said: a certificate problem or not.
    logged: HashMap<usize, bool>,
    /// During an outage, a loop is trying to connect for all.
    probing: bool,
}

struct Inner {
    name: &'static str,
    targets: Vec<ConnectSettings>,
    lifetime: Option<Duration>,
    /// long_wait: the longest wait between attempts, and the wait after a certificate problem.
    max_wait: Duration,
    state: Mutex<State>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across an await or a panic-prone call; a poisoned one still
        // holds consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expired(&self, opened: Instant) -> bool {
        self.lifetime.is_some_and(|l| opened.elapsed() >= l)
    }
}

/// Ends a loop's attempt to connect for all, however the attempt ends (a cancelled future too).
struct Probing<'a>(&'a Inner);

impl Drop for Probing<'_> {
    fn drop(&mut self) {
        self.0.state().probing = false;
    }
}

/// Where a checked-out session returns.
pub(super) struct Home {
    inner: Arc<Inner>,
    generation: u64,
}

impl Home {
    pub(super) fn give_back(self, client: Client, opened: Instant, reusable: bool) {
        let mut st = self.inner.state();
        if reusable
            && self.generation == st.generation
            && !self.inner.expired(opened)
            && st.idle.len() < MAX_IDLE
        {
            st.idle.push((client, opened));
        } else {
            drop(st);
            tracing::debug!("{}: closing a session", self.inner.name);
            drop(client);
        }
    }
}

/// Sessions with the PEM server. Cloning gives another handle to the same sessions.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
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
            inner: Arc::new(Inner {
                name,
                targets,
                lifetime,
                max_wait,
                state: Mutex::new(State {
                    idle: Vec::new(),
                    backoff,
                    retry_at: None,
                    last_error: String::new(),
                    preferred: 0,
                    generation: 0,
                    down: false,
                    logged: HashMap::new(),
                    probing: false,
                }),
            }),
        }
    }

    fn session(&self, client: Client, opened: Instant, generation: u64) -> Session {
        let mut s = Session::with_opened(client, opened);
        s.home = Some(Home {
            inner: self.inner.clone(),
            generation,
        });
        s
    }

    /// A session for the caller alone: an idle one, or a new connection.
    pub async fn checkout(&self) -> Result<Session, Unavailable> {
        let (preferred, generation, probing) = {
            let mut st = self.inner.state();
            while let Some((client, opened)) = st.idle.pop() {
                if client.is_closed() || self.inner.expired(opened) {
                    tracing::debug!(
                        "{}: replacing an idle session ({})",
                        self.inner.name,
                        if client.is_closed() {
                            "closed"
                        } else {
                            "lifetime reached"
                        }
                    );
                    continue;
                }
                let generation = st.generation;
                drop(st);
                return Ok(self.session(client, opened, generation));
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
            // During an outage one loop tries for all: the others wait for its outcome rather
            // than knock at the same moment.
            if st.down && st.probing {
                return Err(Unavailable::Backoff {
                    wait: Duration::ZERO,
                    last: st.last_error.clone(),
                });
            }
            let probing = st.down;
            st.probing |= probing;
            (st.preferred, st.generation, probing)
        };
        let _probe = probing.then(|| Probing(&self.inner));

        // No lock from here to the end of the attempts: other loops go on meanwhile.
        let n = self.inner.targets.len();
        let mut last = None;
        for i in 0..n {
            let idx = (preferred + i) % n;
            let t = &self.inner.targets[idx];
            match connect(t).await {
                Ok(client) => {
                    let mut st = self.inner.state();
                    if st.down {
                        tracing::info!("{}: connected to {} again", self.inner.name, t.target());
                    } else {
                        tracing::debug!("{}: connected to {}", self.inner.name, t.target());
                    }
                    st.down = false;
                    st.logged.clear();
                    st.retry_at = None;
                    st.preferred = idx;
                    st.backoff.reset();
                    drop(st);
                    return Ok(self.session(client, Instant::now(), generation));
                }
                Err(e) => {
                    let mut st = self.inner.state();
                    // Once per outage, and again when its cause changes; the retries that follow
                    // are routine.
                    let certificate = e.is_certificate();
                    if st.logged.insert(idx, certificate) == Some(certificate) {
                        tracing::debug!("{}: {e}", self.inner.name);
                    } else if certificate {
                        tracing::error!(
                            "{}: {e}; trying again every {} s (long_wait)",
                            self.inner.name,
                            self.inner.max_wait.as_secs()
                        );
                    } else {
                        tracing::warn!("{}: {e}", self.inner.name);
                    }
                    last = Some(e);
                }
            }
        }
        let e = last.expect("at least one target");
        let mut st = self.inner.state();
        st.down = true;
        // Two loops failing at once move the backoff on once.
        if st.retry_at.is_none_or(|at| at <= Instant::now()) {
            let wait = if e.is_certificate() {
                // Jittered a little, so agents cut off together do not come back in lockstep.
                self.inner.max_wait.mul_f64(0.9 + fastrand::f64() * 0.1)
            } else {
                st.backoff.next_delay()
            };
            st.retry_at = Some(Instant::now() + wait);
        }
        st.last_error = e.to_string();
        Err(Unavailable::Connect(e))
    }

    /// How long until the next connection attempt is allowed (zero when it is now).
    pub fn retry_in(&self) -> Duration {
        self.inner.state().retry_at.map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(Instant::now())
        })
    }

    /// Closes the idle sessions; sessions checked out now are closed when given back (after a
    /// reload changed the settings, or at shutdown).
    pub fn reset(&self) {
        let idle = {
            let mut st = self.inner.state();
            st.generation += 1;
            st.retry_at = None;
            st.backoff.reset();
            std::mem::take(&mut st.idle)
        };
        drop(idle);
    }

    /// Sessions waiting for their next owner.
    pub fn idle_sessions(&self) -> usize {
        self.inner.state().idle.len()
    }

    pub fn targets(&self) -> &[ConnectSettings] {
        &self.inner.targets
    }
}
