//! Sessions to monitored servers and pgBouncer consoles, kept open between probe rounds.
//!
//! A probe round checks out the session of its target (a monitored server, a pgBouncer
//! console), runs its probes on it and gives it back, so a target probed every ten seconds
//! costs one login in its lifetime instead of one TLS handshake and password exchange per
//! round, on both sides. A session comes back to be reused unless it broke (closed by the
//! server, a statement that timed out, a probe that failed); a lost one is replaced at the
//! next checkout. The keys of agent.cfg keep PEM's meanings:
//!
//! - `connection_lifetime`: how long an idle session is kept; 0 (PEM's default) keeps it as
//!   long as its target is probed. [`Kept::close_idle`] closes the ones idle for longer and says
//!   when the next one is due, so the collector can wake for it.
//! - `max_connections`: at most this many sessions open at once, idle ones included (0:
//!   unlimited). A round that needs a new session when all are open closes the least recently
//!   used idle session of another target; when none is idle, it waits for one to be given back.
//!
//! Connecting happens without the lock held, so a target that hangs holds up only its own round.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::{ConnectSettings, Error, connect};

/// What a session was opened with; a target whose settings changed gets a new session.
fn fingerprint(s: &ConnectSettings) -> String {
    format!(
        "{}\n{}\n{}\n{}\n{}\n{:?}\n{:?}",
        s.host, s.port, s.user, s.dbname, s.sslmode, s.root_cert, s.client_cert
    )
}

struct Idle {
    client: Client,
    fingerprint: String,
    since: Instant,
}

struct State<K> {
    idle: HashMap<K, Idle>,
    /// Sessions open: idle, checked out, or being opened.
    open: usize,
    limit: Option<usize>,
    idle_for: Option<Duration>,
}

impl<K: Eq + Hash + Clone> State<K> {
    fn expired(&self, since: Instant, now: Instant) -> bool {
        self.idle_for.is_some_and(|d| now >= since + d)
    }

    /// Closes the least recently used idle session; false when none is idle.
    fn evict_oldest(&mut self) -> bool {
        let Some(key) = self
            .idle
            .iter()
            .min_by_key(|(_, i)| i.since)
            .map(|(k, _)| k.clone())
        else {
            return false;
        };
        self.idle.remove(&key);
        self.open -= 1;
        true
    }
}

struct Inner<K> {
    state: Mutex<State<K>>,
    /// Signalled whenever a session is given back or closed.
    freed: Notify,
}

impl<K> Inner<K> {
    fn state(&self) -> MutexGuard<'_, State<K>> {
        // Never held across an await; a poisoned lock still holds consistent counts.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Kept sessions, one per target key. Cloning gives another handle to the same sessions.
pub struct Kept<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for Kept<K> {
    fn clone(&self) -> Self {
        Kept {
            inner: self.inner.clone(),
        }
    }
}

/// A place for one session being opened; given up (and another round woken) if the opening
/// fails or is cancelled.
struct Slot<K> {
    inner: Option<Arc<Inner<K>>>,
}

impl<K> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.state().open -= 1;
            inner.freed.notify_one();
        }
    }
}

impl<K: Eq + Hash + Clone + Send + 'static> Kept<K> {
    /// `limit`: max_connections (`None`: unlimited); `idle_for`: connection_lifetime
    /// (`None`: kept while the target is probed).
    pub fn new(limit: Option<usize>, idle_for: Option<Duration>) -> Kept<K> {
        Kept {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    idle: HashMap::new(),
                    open: 0,
                    limit,
                    idle_for,
                }),
                freed: Notify::new(),
            }),
        }
    }

    /// Applies changed limits (after a reload); sessions beyond them close as they come back.
    pub fn set_limits(&self, limit: Option<usize>, idle_for: Option<Duration>) {
        let mut st = self.inner.state();
        st.limit = limit;
        st.idle_for = idle_for;
        while st.limit.is_some_and(|l| st.open > l) && st.evict_oldest() {}
        drop(st);
        self.inner.freed.notify_waiters();
    }

    /// The session of `key`: its idle one if still good, else a new connection.
    pub async fn checkout(&self, key: &K, settings: &ConnectSettings) -> Result<Lease<K>, Error> {
        let fp = fingerprint(settings);
        loop {
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            // Registered before the state is looked at, so a session given back in between
            // is not missed.
            freed.as_mut().enable();
            {
                let mut st = self.inner.state();
                if let Some(idle) = st.idle.remove(key) {
                    let now = Instant::now();
                    if !idle.client.is_closed()
                        && idle.fingerprint == fp
                        && !st.expired(idle.since, now)
                    {
                        return Ok(Lease {
                            client: Some(idle.client),
                            key: key.clone(),
                            fingerprint: fp,
                            reused: true,
                            broken: false,
                            home: self.inner.clone(),
                        });
                    }
                    st.open -= 1;
                    tracing::debug!(
                        "replacing the idle session to {} ({})",
                        settings.target(),
                        if idle.client.is_closed() {
                            "closed by the server"
                        } else if idle.fingerprint != fp {
                            "its settings changed"
                        } else {
                            "connection_lifetime reached"
                        }
                    );
                }
                if st.limit.is_none_or(|l| st.open < l) || st.evict_oldest() {
                    st.open += 1;
                    break;
                }
            }
            freed.await;
        }
        let mut slot = Slot {
            inner: Some(self.inner.clone()),
        };
        let client = connect(settings).await?;
        slot.inner = None;
        Ok(Lease {
            client: Some(client),
            key: key.clone(),
            fingerprint: fp,
            reused: false,
            broken: false,
            home: self.inner.clone(),
        })
    }

    /// Closes the sessions idle for connection_lifetime; returns when the next one will be.
    pub fn close_idle(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut st = self.inner.state();
        let before = st.idle.len();
        let idle_for = st.idle_for;
        st.idle
            .retain(|_, i| idle_for.is_none_or(|d| now < i.since + d));
        let closed = before - st.idle.len();
        st.open -= closed;
        let next = idle_for.and_then(|d| st.idle.values().map(|i| i.since + d).min());
        drop(st);
        if closed > 0 {
            tracing::debug!("closed {closed} probe sessions idle for connection_lifetime");
            self.inner.freed.notify_waiters();
        }
        next
    }

    /// Closes the idle sessions of targets for which `keep` is false (no longer probed).
    pub fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        let mut st = self.inner.state();
        let before = st.idle.len();
        st.idle.retain(|k, _| keep(k));
        let closed = before - st.idle.len();
        st.open -= closed;
        drop(st);
        if closed > 0 {
            self.inner.freed.notify_waiters();
        }
    }

    /// Sessions open now (idle, in use or being opened), and how many of them are idle.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.inner.state();
        (st.open, st.idle.len())
    }
}

/// A session checked out for one round; given back when dropped, unless discarded.
pub struct Lease<K: Eq + Hash + Clone> {
    client: Option<Client>,
    key: K,
    fingerprint: String,
    reused: bool,
    broken: bool,
    home: Arc<Inner<K>>,
}

impl<K: Eq + Hash + Clone> Lease<K> {
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("held until dropped")
    }

    /// Whether the session was opened by an earlier round.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Closes the session instead of keeping it (its state after a failure is not known).
    pub fn discard(&mut self) {
        self.broken = true;
    }
}

impl<K: Eq + Hash + Clone> Drop for Lease<K> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let mut st = self.home.state();
        let over = st.limit.is_some_and(|l| st.open > l);
        if self.broken || client.is_closed() || over {
            st.open -= 1;
            drop(st);
            drop(client);
        } else {
            let idle = Idle {
                client,
                fingerprint: std::mem::take(&mut self.fingerprint),
                since: Instant::now(),
            };
            // One round per target at a time, so no other session of this key is idle; if a
            // stale one is, it goes.
            if st.idle.insert(self.key.clone(), idle).is_some() {
                st.open -= 1;
            }
        }
        self.home.freed.notify_one();
    }
}
