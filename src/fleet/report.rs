//! What a fleet run reports: one line per second (to the CSV file) and, at the end, a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// One second of a run.
#[derive(Debug, Clone, Default)]
pub struct Second {
    pub mode: String,
    /// Since the first agent started, seconds.
    pub t: f64,
    pub agents_started: usize,
    pub agents_connected: usize,
    /// Client backends in the pem database (other than the fleet's own).
    pub backends: i64,
    /// Of those, the agents' own logins' (pooled: the pool's server connections).
    pub agent_backends: i64,
    /// pgBouncer's SHOW POOLS, summed over the pem database's pools (zero when direct).
    pub cl_active: i64,
    pub cl_waiting: i64,
    pub sv_active: i64,
    pub sv_idle: i64,
    pub maxwait_ms: f64,
    pub heartbeats: usize,
    pub hb_p50_ms: f64,
    pub hb_p99_ms: f64,
    pub hb_max_ms: f64,
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
    pub collected_per_s: f64,
    pub stored_per_s: f64,
    /// Warnings and errors so far.
    pub errors: u64,
    /// Percent of one core over the second.
    pub server_cpu: f64,
    pub pgbouncer_cpu: f64,
    pub agents_cpu: f64,
    /// Resident memory of the agents (the fleet's process, or every agent process), MiB.
    pub agents_rss_mib: f64,
}

const HEADER: &str = "mode,t_s,agents_started,agents_connected,backends,agent_backends,cl_active,cl_waiting,\
sv_active,sv_idle,maxwait_ms,heartbeats,hb_p50_ms,hb_p99_ms,hb_max_ms,delivery_p50_ms,delivery_p99_ms,\
collected_per_s,stored_per_s,errors,server_cpu_pct,pgbouncer_cpu_pct,agents_cpu_pct,agents_rss_mib";

impl Second {
    pub fn csv(&self) -> String {
        format!(
            "{},{:.1},{},{},{},{},{},{},{},{},{:.1},{},{:.2},{:.2},{:.2},{:.0},{:.0},{:.1},{:.1},{},{:.1},{:.1},{:.1},{:.1}",
            self.mode,
            self.t,
            self.agents_started,
            self.agents_connected,
            self.backends,
            self.agent_backends,
            self.cl_active,
            self.cl_waiting,
            self.sv_active,
            self.sv_idle,
            self.maxwait_ms,
            self.heartbeats,
            self.hb_p50_ms,
            self.hb_p99_ms,
            self.hb_max_ms,
            self.delivery_p50_ms,
            self.delivery_p99_ms,
            self.collected_per_s,
            self.stored_per_s,
            self.errors,
            self.server_cpu,
            self.pgbouncer_cpu,
            self.agents_cpu,
            self.agents_rss_mib,
        )
    }

    /// The progress line printed every few seconds.
    pub fn progress(&self) -> String {
        format!(
            "[{}] {:>4.0} s  agents {}/{} connected  backends {} (agents' {})  pool: cl_active {} cl_waiting {} sv_active {} sv_idle {}  \
             heartbeat p99 {:.1} ms  stored {:.0}/s  errors {}",
            self.mode,
            self.t,
            self.agents_connected,
            self.agents_started,
            self.backends,
            self.agent_backends,
            self.cl_active,
            self.cl_waiting,
            self.sv_active,
            self.sv_idle,
            self.hb_p99_ms,
            self.stored_per_s,
            self.errors
        )
    }
}

/// The per-second file: written as the run goes, so an interrupted run keeps what it measured.
pub struct Csv {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl Csv {
    /// Creates `path`, which must not exist yet (nothing is overwritten, and no link is
    /// followed, whoever runs this).
    pub fn create(path: &Path) -> std::io::Result<Csv> {
        let mut file = std::io::BufWriter::new(new_file(path)?);
        writeln!(file, "{HEADER}")?;
        Ok(Csv {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, s: &Second) {
        if writeln!(self.file, "{}", s.csv())
            .and_then(|_| self.file.flush())
            .is_err()
        {
            tracing::debug!("cannot write {}", self.path.display());
        }
    }
}

/// A new file at `path` (O_EXCL: an existing file or link there is an error).
pub fn new_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// The `q` quantile (0..=1) of `v` (sorted here), nearest rank; 0 for none.
pub fn quantile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// p50, p99 and max of `v`.
pub fn spread(v: &mut [u64]) -> (u64, u64, u64) {
    (
        quantile(v, 0.5),
        quantile(v, 0.99),
        v.iter().copied().max().unwrap_or(0),
    )
}

/// One run's outcome, as the end table shows it.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub label: String,
    pub agents: usize,
    pub duration_s: u64,
    pub ramp_s: u64,
    pub heartbeat_interval: u32,
    pub probe_interval: u32,
    pub pool_size: Option<u32>,
    pub registered: usize,
    pub registration_failed: usize,
    pub distinct_ids: usize,
    /// Registration times, ms.
    pub registration: (u64, u64, u64),
    pub registration_wall_s: f64,
    /// Over the steady phase (every agent started).
    pub connected_min: usize,
    pub backends_max: i64,
    pub agent_backends_max: i64,
    pub cl_active_max: i64,
    pub cl_waiting_max: i64,
    pub sv_active_max: i64,
    pub sv_idle_max: i64,
    pub maxwait_ms_max: f64,
    /// Heartbeat round trips over the steady phase, µs.
    pub heartbeats: u64,
    pub heartbeats_failed: u64,
    pub hb: (u64, u64, u64),
    /// Collected to stored over the steady phase, ms.
    pub delivery: (u64, u64, u64),
    pub collected_samples: u64,
    pub collected_rows: u64,
    /// Counted in the PEM server's history tables.
    pub server_samples: i64,
    pub server_rows: i64,
    pub left_in_spools: u64,
    pub stored_per_s_mean: f64,
    pub stored_per_s_max: f64,
    pub server_cpu: f64,
    pub pgbouncer_cpu: f64,
    pub agents_cpu: f64,
    pub agents_rss_mib: f64,
    /// PostgreSQL's memory (PSS of the postmaster and its processes: shared memory counted
    /// once) and pgBouncer's, MiB, at the end of the steady phase.
    pub server_mem_mib: f64,
    pub pgbouncer_mem_mib: f64,
    /// Proportional set size of the agent processes (shared pages divided among them), MiB.
    pub agents_pss_mib: Option<f64>,
    /// Whether heartbeat round trips and delivery times were seen (agents in this process).
    pub timed: bool,
    pub errors: BTreeMap<String, u64>,
    pub unregistered: usize,
    /// What stopped the run early, if something did.
    pub failed: Option<String>,
}

impl Summary {
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Every collected sample and row is in the server's history, none twice (the history
    /// tables' delivery keys are unique, so "none twice" is the count matching).
    pub fn exactly_once(&self) -> bool {
        self.left_in_spools == 0
            && self.server_rows == self.collected_rows as i64
            && self.server_samples == self.collected_samples as i64
    }

    /// No warning or error, every sample stored exactly once, and (pooled) no more of the
    /// agents' backends than pool_size.
    pub fn clean(&self) -> bool {
        self.error_total() == 0
            && self.registration_failed == 0
            && self.failed.is_none()
            && self.exactly_once()
            && self
                .pool_size
                .is_none_or(|p| self.agent_backends_max <= i64::from(p))
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let ms = |us: u64| us as f64 / 1000.0;
        let _ = writeln!(t, "== {} ==", self.label);
        let _ = writeln!(
            t,
            "{} agents, heartbeat every {} s, probes every {} s, {} s after a {} s ramp{}",
            self.agents,
            self.heartbeat_interval,
            self.probe_interval,
            self.duration_s,
            self.ramp_s,
            self.pool_size
                .map(|p| format!(", pgBouncer pool_size {p}"))
                .unwrap_or_default()
        );
        let row = |t: &mut String, k: &str, v: String| {
            let _ = writeln!(t, "  {k:<34} {v}");
        };
        row(
            &mut t,
            "registrations (all at once)",
            format!(
                "{} ok, {} failed, {} distinct ids, {:.1} s in all",
                self.registered,
                self.registration_failed,
                self.distinct_ids,
                self.registration_wall_s
            ),
        );
        row(
            &mut t,
            "registration time p50/p99/max",
            format!(
                "{} / {} / {} ms",
                self.registration.0, self.registration.1, self.registration.2
            ),
        );
        if let Some(f) = &self.failed {
            row(&mut t, "run stopped", f.clone());
        }
        row(
            &mut t,
            "agents connected (min)",
            self.connected_min.to_string(),
        );
        row(
            &mut t,
            "server backends, max",
            format!(
                "{} in all, {} of them the agents' logins",
                self.backends_max, self.agent_backends_max
            ),
        );
        if self.pool_size.is_some() {
            row(
                &mut t,
                "pgBouncer pools, max",
                format!(
                    "cl_active {}, cl_waiting {}, sv_active {}, sv_idle {}, maxwait {:.1} ms",
                    self.cl_active_max,
                    self.cl_waiting_max,
                    self.sv_active_max,
                    self.sv_idle_max,
                    self.maxwait_ms_max
                ),
            );
        }
        row(
            &mut t,
            "heartbeats",
            format!(
                "{} recorded, {} failed",
                self.heartbeats, self.heartbeats_failed
            ),
        );
        if self.timed {
            row(
                &mut t,
                "heartbeat round trip p50/p99/max",
                format!(
                    "{:.2} / {:.2} / {:.2} ms",
                    ms(self.hb.0),
                    ms(self.hb.1),
                    ms(self.hb.2)
                ),
            );
            row(
                &mut t,
                "collected -> stored p50/p99/max",
                format!(
                    "{} / {} / {} ms",
                    self.delivery.0, self.delivery.1, self.delivery.2
                ),
            );
        } else {
            row(
                &mut t,
                "heartbeat and delivery times",
                "not seen from outside the agent processes".into(),
            );
        }
        row(
            &mut t,
            "samples stored per second",
            format!(
                "{:.1} mean, {:.0} in the best second",
                self.stored_per_s_mean, self.stored_per_s_max
            ),
        );
        row(
            &mut t,
            "samples (rows) collected",
            format!("{} ({})", self.collected_samples, self.collected_rows),
        );
        row(
            &mut t,
            "samples (rows) on the server",
            format!(
                "{} ({}); {} left in spools",
                self.server_samples, self.server_rows, self.left_in_spools
            ),
        );
        row(
            &mut t,
            "every sample stored exactly once",
            if self.exactly_once() { "yes" } else { "NO" }.into(),
        );
        row(
            &mut t,
            "CPU, % of one core (mean)",
            format!(
                "PEM server {:.1}, pgBouncer {:.1}, agents {:.1}",
                self.server_cpu, self.pgbouncer_cpu, self.agents_cpu
            ),
        );
        row(
            &mut t,
            "server memory (PSS) at the end",
            format!(
                "PEM server {:.0} MiB, pgBouncer {:.1} MiB",
                self.server_mem_mib, self.pgbouncer_mem_mib
            ),
        );
        let per = |m: f64| m / self.registered.max(1) as f64;
        row(
            &mut t,
            "agents' resident memory (RSS)",
            format!(
                "{:.1} MiB, {:.2} MiB per agent",
                self.agents_rss_mib,
                per(self.agents_rss_mib)
            ),
        );
        if let Some(pss) = self.agents_pss_mib {
            row(
                &mut t,
                "agents' memory (PSS)",
                format!(
                    "{pss:.1} MiB, {:.2} MiB per agent (shared pages counted once)",
                    per(pss)
                ),
            );
        }
        if self.errors.is_empty() {
            row(&mut t, "warnings and errors", "none".into());
        } else {
            row(
                &mut t,
                "warnings and errors",
                format!("{} in all:", self.error_total()),
            );
            for (k, n) in &self.errors {
                let _ = writeln!(t, "    {n:>6}  {k}");
            }
        }
        row(&mut t, "unregistered", self.unregistered.to_string());
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(spread(&mut v), (50, 99, 100));
        assert_eq!(quantile(&mut [], 0.99), 0);
        assert_eq!(quantile(&mut [7], 0.5), 7);
    }

    #[test]
    fn a_csv_line_has_a_value_per_heading() {
        let s = Second {
            mode: "pooled".into(),
            ..Default::default()
        };
        assert_eq!(
            s.csv().split(',').count(),
            HEADER.split(',').count(),
            "{}",
            s.csv()
        );
    }

    #[test]
    fn exactly_once_needs_every_count_to_match() {
        let mut s = Summary {
            collected_samples: 10,
            collected_rows: 20,
            server_samples: 10,
            server_rows: 20,
            ..Default::default()
        };
        assert!(s.exactly_once());
        s.server_rows = 19;
        assert!(!s.exactly_once());
        s.server_rows = 20;
        s.left_in_spools = 1;
        assert!(!s.exactly_once());
    }
}
