//! Faults the integration tests inject into a running worker: a panic in a probe or a loop, and
//! a value the PEM server must refuse. Compiled only with the `test-hooks` feature, which
//! `cargo test` turns on (Cargo.toml's dev-dependency on this crate) and release builds and
//! packages never have; without it every hook is an empty function.
//!
//! With the feature, `PEMWORKER_TEST_HOOKS` holds comma-separated directives:
//! `panic-probe=NAME` (the probe panics each time it runs), `panic-task=NAME` (the named task
//! panics once, at its start) and `bad-value=PROBE:VALUE` (the first value of the probe's first
//! sample becomes VALUE, once: a value the server refuses).

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
