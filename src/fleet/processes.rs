//! `pemworker fleet --processes`: the agents as real `pemworker -c agent.cfg` processes, each
//! with its own agent.cfg, state directory and log, probing this host for real: what only
//! real processes show (memory per agent, and the server's side of that many logins).
//!
//! Heartbeat round trips are not seen from here; the agents' own counts come from each one's
//! stats.json, their warnings and errors from each one's log.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

use super::report::{Csv, Second, Summary};
use super::{Error, Mode, Registered, Settings};
use crate::connection::pool;
use crate::worker::stats::Snapshot;

struct Agent {
    slot: usize,
    child: Child,
    state_dir: PathBuf,
    log: PathBuf,
}

fn spawn(a: &Registered, exe: &std::path::Path, home: &std::path::Path) -> Result<Agent, String> {
    let dir = a
        .state_dir
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let log = dir.join("worker.log");
    let stderr = std::fs::File::create(dir.join("worker.stderr")).map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .arg("-c")
        .arg(&a.config_file)
        .arg("-f")
        .args(["-o", &format!("state_dir={}", a.state_dir.display())])
        .args(["-o", &format!("log_location={}", log.display())])
        .args(["-o", "log_level=warning"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    Ok(Agent {
        slot: a.slot,
        child,
        state_dir: a.state_dir.clone(),
        log,
    })
}

fn snapshot(state_dir: &std::path::Path) -> Option<Snapshot> {
    let text = std::fs::read(state_dir.join("stats.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Warnings and errors in an agent's log, by kind.
fn log_problems(log: &std::path::Path, into: &mut BTreeMap<String, u64>) {
    let Ok(text) = std::fs::read_to_string(log) else {
        return;
    };
    for line in text.lines() {
        let level = if line.contains(" ERROR ") {
            "ERROR"
        } else if line.contains(" WARN ") {
            "WARN"
        } else {
            continue;
        };
        // "<time> LEVEL target: message"
        let message = line
            .split_once(&format!("{level} "))
            .and_then(|(_, rest)| rest.split_once(": "))
            .map_or(line, |(_, m)| m);
        *into
            .entry(format!("{level}: {}", super::meters::kind_of(message)))
            .or_default() += 1;
    }
}

pub async fn run(
    settings: &Settings,
    mode: Mode,
    mut csv: Option<&mut Csv>,
) -> Result<(Summary, Vec<Second>), Error> {
    let n = settings.agents;
    let exe = std::env::current_exe()
        .map_err(|e| Error::Step(format!("cannot find this program: {e}")))?;
    let mut run = super::prepare(settings, mode).await?;
    let (storm, ids) = (&run.storm, &run.ids);

    println!(
        "[{}] starting {} pemworker processes over {} s, then running {} s",
        mode.name(),
        storm.agents.len(),
        settings.ramp.as_secs(),
        settings.duration.as_secs()
    );
    let mut clock = super::Clock::new(settings, storm.agents.len());
    let mut agents: Vec<Agent> = Vec::with_capacity(n);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut pending = storm.agents.iter().enumerate().peekable();
    let mut seconds = Vec::new();
    let mut last_stored = 0u64;
    let mut last_collected = 0u64;
    let mut pss_max = 0f64;
    let recent = (2 * settings.heartbeat_interval + 2) as f64;
    loop {
        while let Some((_, a)) = pending.next_if(|(i, _)| clock.due(*i)) {
            match spawn(a, &exe, &run.servers.home) {
                Ok(p) => agents.push(p),
                Err(e) => {
                    *errors
                        .entry(format!("agent did not start: {e}"))
                        .or_default() += 1
                }
            }
        }
        if clock.ended() {
            break;
        }
        if !clock.wait(pending.peek().map(|(i, _)| *i)).await {
            continue;
        }
        let mut s = Second {
            mode: format!("{}-processes", mode.name()),
            t: clock.elapsed(),
            ..Default::default()
        };
        let mut agent_ticks = 0;
        let mut pss = 0.0;
        let mut stored = 0;
        let mut collected = 0;
        for a in agents.iter_mut() {
            if a.child.try_wait().ok().flatten().is_some() {
                continue;
            }
            s.agents_started += 1;
            let pid = a.child.id() as i32;
            s.agents_rss_mib += super::rss_mib(pid);
            pss += super::pss_mib(pid);
            agent_ticks += super::ticks(pid).map_or(0, |(t, _, _)| t);
            if let Some(snap) = snapshot(&a.state_dir) {
                stored += snap.delivered_samples;
                collected += snap.collected.values().map(|c| c.samples).sum::<u64>();
            }
        }
        if s.agents_started == storm.agents.len() {
            pss_max = pss_max.max(pss);
        }
        s.stored_per_s = stored.saturating_sub(last_stored) as f64;
        s.collected_per_s = collected.saturating_sub(last_collected) as f64;
        (last_stored, last_collected) = (stored.max(last_stored), collected.max(last_collected));
        let what = "counting agents with a recent heartbeat";
        if let Ok(row) = pool::query_one(
            run.watch.superuser(),
            what,
            "SELECT count(*) FROM pem.agent_heartbeat WHERE agent_id = ANY($1) \
                AND last_heartbeat > pg_catalog.now() - pg_catalog.make_interval(secs => $2)",
            &[(ids, Type::INT4_ARRAY), (&recent, Type::FLOAT8)],
        )
        .await
        {
            s.agents_connected = pool::get::<i64>(&row, 0, what).unwrap_or(0) as usize;
        }
        run.watch.read(&mut s, agent_ticks).await;
        super::record(s, &mut seconds, csv.as_deref_mut());
    }

    let memory = run.watch.memory().await;
    println!(
        "[{}] stopping the agent processes (SIGTERM) ...",
        mode.name()
    );
    for a in &agents {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + crate::worker::SHUTDOWN_GRACE + Duration::from_secs(10);
    let mut exits: BTreeMap<String, u64> = BTreeMap::new();
    for a in agents.iter_mut() {
        let status = loop {
            match a.child.try_wait() {
                Ok(Some(st)) => break Some(st),
                _ if Instant::now() >= deadline => {
                    let _ = a.child.kill();
                    break a.child.wait().ok();
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        if let Some(st) = status.filter(|st| !st.success()) {
            *exits
                .entry(format!("agent process exited with {st}"))
                .or_default() += 1;
            tracing::debug!("agent {} exited with {st}", a.slot);
        }
    }
    let agents_run = storm.agents.len();
    let summary = &mut run.summary;
    (summary.server_mem_mib, summary.pgbouncer_mem_mib) = memory;
    for a in &agents {
        log_problems(&a.log, &mut errors);
        if let Some(snap) = snapshot(&a.state_dir) {
            summary.collected_samples += snap.collected.values().map(|c| c.samples).sum::<u64>();
            summary.collected_rows += snap.collected.values().map(|c| c.rows).sum::<u64>();
            summary.left_in_spools += snap.spooled_samples;
            summary.heartbeats += snap.heartbeats;
            summary.heartbeats_failed += snap.heartbeat_failures;
        }
    }
    errors.extend(exits);
    super::fold_steady(summary, &seconds, agents_run);
    summary.agents_pss_mib = Some(pss_max);
    summary.errors.extend(errors);
    Ok((run.finish().await?, seconds))
}
