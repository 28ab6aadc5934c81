//! Every task of the worker, spawned by name on one tracker.
//!
//! A task that panics is logged with its name (and the panic's message and place), never lost
//! silently. The worker's loops are supervised: a loop that panics is started again after a
//! pause that doubles up to a minute, so one bad iteration cannot leave the agent without
//! heartbeats, collection or delivery. At shutdown the names of tasks still running are known.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);

/// The tracker and the names of the tasks running on it.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    running: Arc<Mutex<BTreeMap<u64, String>>>,
    next: Arc<AtomicU64>,
}

/// The text of a panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Sends panic reports to the log (with where they happened) instead of only to stderr, so
/// that a worker running in the background reports them too. Set once per process.
pub fn log_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let thread = std::thread::current();
            tracing::error!(
                "panic in thread {}{at}: {}",
                thread.name().unwrap_or("unnamed"),
                panic_message(info.payload())
            );
        }));
    });
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Spawns `fut` as the task `name`. A panic is logged with the name and the handle yields
    /// `None`.
    pub fn spawn<T: Send + 'static>(
        &self,
        name: impl Into<String>,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<Option<T>> {
        let name = name.into();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, name.clone());
        let running = self.running.clone();
        self.tracker.spawn(async move {
            let r = AssertUnwindSafe(fut).catch_unwind().await;
            running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            match r {
                Ok(v) => Some(v),
                Err(p) => {
                    tracing::error!("task {name} panicked: {}", panic_message(&*p));
                    None
                }
            }
        })
    }

    /// Runs the loop `make()` builds as the task `name` until it returns or `stop` is
    /// cancelled; a panic is logged and the loop started again.
    pub fn supervise<F, Fut>(&self, name: &'static str, stop: CancellationToken, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tasks = self.clone();
        self.spawn(name, async move {
            let mut pause = RESTART_MIN;
            loop {
                let started = std::time::Instant::now();
                let attempt = make();
                let run = tasks.spawn(name, async move {
                    crate::testhooks::task(name);
                    attempt.await
                });
                // Otherwise a panic, which `spawn` logged with the name.
                if let Ok(Some(())) = run.await {
                    return;
                }
                if stop.is_cancelled() {
                    return;
                }
                if started.elapsed() > RESTART_MAX {
                    pause = RESTART_MIN;
                }
                tracing::error!("task {name}: started again in {} s", pause.as_secs());
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RESTART_MAX);
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, String>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No more tasks after this; [`Tasks::wait`] then returns once all have ended.
    pub fn close(&self) {
        self.tracker.close();
    }

    pub async fn wait(&self) {
        self.tracker.wait().await;
    }

    /// Names of the tasks running now, sorted, each once.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }
}
