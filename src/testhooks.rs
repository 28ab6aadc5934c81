//! Faults the integration tests inject into a running worker: a panic in a probe or a loop, and
//! a value the PEM server must refuse. Compiled only with the `test-hooks` feature, which
//! `cargo test` turns on (Cargo.toml's dev-dependency on this crate) and release builds and
//! packages never have; without it every hook is an empty function.
//!
//! With the feature, `PEMWORKER_TEST_HOOKS` holds comma-separated directives:
//! `panic-probe=NAME` (the probe panics each time it runs), `panic-task=NAME` (the named task
//! panics once, at its start), `bad-value=PROBE:VALUE` (the first value of the probe's first
//! sample becomes VALUE, once: a value the server refuses), `journal=FILE` (a line per row kept
//! in the spool, `kept <seq> <probe> <delivery key>`, so a test can count what a worker killed
//! at any instant had collected) and `pause=POINT:MS` (the worker waits MS milliseconds at that
//! point, writing `pause POINT` and `resume POINT` to the journal, so a test can kill it there:
//! `spool-written` before a batch's rename, `spool-kept` after its sync, `in-transaction` before
//! a delivery's COMMIT, `after-commit` before its batch leaves the spool).

use crate::probes::Sample;

#[cfg(feature = "test-hooks")]
mod on {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::probes::{Sample, Value};

    fn directives() -> &'static Vec<(String, String)> {
        static D: OnceLock<Vec<(String, String)>> = OnceLock::new();
        D.get_or_init(|| {
            std::env::var("PEMWORKER_TEST_HOOKS")
                .unwrap_or_default()
                .split(',')
                .filter_map(|d| d.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect()
        })
    }

    fn wants(kind: &str, name: &str) -> bool {
        directives().iter().any(|(k, v)| k == kind && v == name)
    }

    fn bad_value(probe: &str) -> Option<&'static str> {
        directives().iter().find_map(|(k, v)| {
            let (p, value) = v.split_once(':')?;
            (k == "bad-value" && p == probe).then_some(value)
        })
    }

    pub fn probe(name: &str) {
        if wants("panic-probe", name) {
            panic!("injected panic in probe {name}");
        }
    }

    pub fn task(name: &str) {
        static DONE: AtomicBool = AtomicBool::new(false);
        if wants("panic-task", name) && !DONE.swap(true, Ordering::SeqCst) {
            panic!("injected panic in task {name}");
        }
    }

    fn journal_line(line: &str) {
        use std::io::Write;
        static FILE: OnceLock<Option<std::sync::Mutex<std::fs::File>>> = OnceLock::new();
        let file = FILE.get_or_init(|| {
            let path = directives().iter().find(|(k, _)| k == "journal")?.1.clone();
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
                .map(std::sync::Mutex::new)
        });
        if let Some(f) = file {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            // One write per line (O_APPEND): whole lines even when the process is killed.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    pub fn kept(seq: u64, samples: &[Sample]) {
        let mut text = String::new();
        for s in samples {
            for (key, _) in &s.rows {
                text.push_str(&format!("kept {seq} {} {key}\n", s.probe));
            }
        }
        if !text.is_empty() {
            journal_line(text.trim_end());
        }
    }

    fn pause_ms(point: &str) -> Option<u64> {
        directives().iter().find_map(|(k, v)| {
            let (p, ms) = v.split_once(':')?;
            (k == "pause" && p == point).then(|| ms.parse().ok())?
        })
    }

    pub fn pause(point: &str) {
        if let Some(ms) = pause_ms(point) {
            journal_line(&format!("pause {point}"));
            std::thread::sleep(std::time::Duration::from_millis(ms));
            journal_line(&format!("resume {point}"));
        }
    }

    pub async fn pause_async(point: &str) {
        if let Some(ms) = pause_ms(point) {
            journal_line(&format!("pause {point}"));
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            journal_line(&format!("resume {point}"));
        }
    }

    pub fn sample(s: &mut Sample) {
        static DONE: AtomicBool = AtomicBool::new(false);
        if let Some(value) = bad_value(&s.probe) {
            if !DONE.swap(true, Ordering::SeqCst) {
                if let Some(v) = s.rows.first_mut().and_then(|(_, r)| r.first_mut()) {
                    *v = Value::Text(value.into());
                }
            }
        }
    }
}

/// Called before a probe runs.
#[inline(always)]
pub fn probe(_name: &str) {
    #[cfg(feature = "test-hooks")]
    on::probe(_name);
}

/// Called when a supervised task starts.
#[inline(always)]
pub fn task(_name: &str) {
    #[cfg(feature = "test-hooks")]
    on::task(_name);
}

/// Called on every sample before it is spooled.
#[inline(always)]
pub fn sample(_s: &mut Sample) {
    #[cfg(feature = "test-hooks")]
    on::sample(_s);
}

/// Called when samples are kept in the spool (written and synced), with their batch's number.
#[inline(always)]
pub fn kept(_seq: u64, _samples: &[Sample]) {
    #[cfg(feature = "test-hooks")]
    on::kept(_seq, _samples);
}

/// A point where a test may hold the worker (blocking code).
#[inline(always)]
pub fn pause(_point: &str) {
    #[cfg(feature = "test-hooks")]
    on::pause(_point);
}

/// A point where a test may hold the worker (async code).
#[inline(always)]
pub async fn pause_async(_point: &str) {
    #[cfg(feature = "test-hooks")]
    on::pause_async(_point).await;
}
