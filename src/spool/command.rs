//! `pemworker spool status | replay | discard -c agent.cfg`: what the worker keeps on disk, for
//! operators. It works whether the worker runs or not: it never takes the worker's lock, and
//! changes refused samples only under the area's own lock, as the worker does.

use std::path::Path;

use crate::cli::{SpoolArgs, SpoolCommand, SpoolSelectArgs};
use crate::config::AgentConfig;
use crate::connection::manager::{Manager, Unavailable};
use crate::spool::{self, Error, Rejected, RejectedSample};
use crate::worker::delivery;
use crate::worker::stats::Snapshot;

fn load(a: &SpoolArgs) -> Result<AgentConfig, crate::Error> {
    let (path, overrides) = crate::cli::resolve_spool(a)?;
    AgentConfig::load(&path, &overrides)
        .map(|(c, _)| c)
        .map_err(|p| crate::Error::Usage(p.to_string()))
}

pub async fn run(cmd: &SpoolCommand) -> Result<(), crate::Error> {
    match cmd {
        SpoolCommand::Status(a) => status(&load(a)?),
        SpoolCommand::Replay(a) => replay(&load(&a.spool)?, a).await,
        SpoolCommand::Discard(a) => discard(&load(&a.spool)?, a),
    }
}

fn rejected(c: &AgentConfig) -> Rejected {
    Rejected::at(&c.state_dir.join("spool").join("rejected"))
}

fn describe(seq: u64, r: &RejectedSample) -> String {
    let s = &r.sample;
    let target = match (&s.server_id, &s.pgbouncer) {
        (Some(id), _) => format!(" on server {id}"),
        (None, Some(b)) => format!(" on pgBouncer {b}"),
        _ => String::new(),
    };
    format!(
        "#{seq} {}{target}, collected {}, {} rows",
        s.probe,
        s.collected_at.format("%Y-%m-%d %H:%M:%S UTC"),
        s.rows.len()
    )
}

fn reason(r: &RejectedSample) -> String {
    match &r.sqlstate {
        Some(code) if !r.message.contains(code.as_str()) => {
            format!("{} (SQLSTATE {code})", r.message)
        }
        _ => r.message.clone(),
    }
}

fn status(c: &AgentConfig) -> Result<(), crate::Error> {
    let dir = &c.state_dir;
    println!(
        "state directory {}: {}",
        dir.display(),
        match spool::lock::holder(dir) {
            Some(pid) => format!("worker running (pid {pid})"),
            None => "no worker running".into(),
        }
    );
    let spool_dir = dir.join("spool");
    let (mut batches, mut samples, mut bytes) = (0u64, 0u64, 0u64);
    if let Ok(entries) = std::fs::read_dir(&spool_dir) {
        for e in entries.flatten() {
            if spool::entry_seq(&e.file_name().to_string_lossy()).is_none() {
                continue;
            }
            // A batch delivered meanwhile is simply not counted.
            if let Some(s) = spool::read_entry(&e.path()) {
                batches += 1;
                samples += s.len() as u64;
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    println!("waiting for delivery: {samples} samples in {batches} batches ({bytes} bytes)");
    let refused = rejected(c).read_all();
    println!("refused by the PEM server: {} samples", refused.len());
    for (seq, r) in &refused {
        println!("  {}: {}", describe(*seq, r), reason(r));
    }
    if let Ok(data) = std::fs::read(dir.join("stats.json")) {
        if let Ok(s) = serde_json::from_slice::<Snapshot>(&data) {
            let per_probe: Vec<String> = s
                .dropped
                .iter()
                .map(|(p, c)| format!("{p} {}", c.samples))
                .collect();
            println!(
                "dropped (spool full, or not writable) in the worker's last run: {}{}",
                s.dropped_samples,
                if per_probe.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", per_probe.join(", "))
                }
            );
            if s.held_samples > 0 {
                println!(
                    "held in memory (the spool cannot be written): {} samples",
                    s.held_samples
                );
            }
            if let Some(p) = s.delivery_problem {
                println!("delivery problem: {p}");
            }
        }
    }
    if !refused.is_empty() {
        println!(
            "fix the cause on the PEM server, then: pemworker spool replay -c {} (or discard them: pemworker spool discard --all -c {})",
            c.path.display(),
            c.path.display()
        );
    }
    Ok(())
}

fn selected(area: &spool::rejected::Locked<'_>, a: &SpoolSelectArgs) -> Result<Vec<u64>, Error> {
    let all: Vec<u64> = area.list()?.into_iter().map(|(s, _)| s).collect();
    if a.numbers.is_empty() {
        return Ok(all);
    }
    Ok(a.numbers
        .iter()
        .copied()
        .filter(|n| all.contains(n))
        .collect())
}

async fn replay(c: &AgentConfig, a: &SpoolSelectArgs) -> Result<(), crate::Error> {
    let area = rejected(c);
    if !area.dir().is_dir() {
        println!("no refused samples in {}", area.dir().display());
        return Ok(());
    }
    let mut locked = area.lock()?;
    let seqs = selected(&locked, a)?;
    if seqs.is_empty() {
        println!("no refused samples to replay");
        return Ok(());
    }
    let records: Vec<(u64, RejectedSample)> = seqs
        .into_iter()
        .map(|s| Ok((s, locked.read(s)?)))
        .collect::<Result<_, Error>>()?;
    let manager = Manager::new("PEM server", c.pem_targets()?, None, c.long_wait);
    let mut session = manager.checkout().await.map_err(|e| match e {
        Unavailable::Connect(e) => crate::Error::Connection(e),
        other => crate::Error::Usage(other.to_string()),
    })?;
    let samples: Vec<_> = records.iter().map(|(_, r)| r.sample.clone()).collect();
    // As the worker delivers: pem.store_samples, with this agent's MAC.
    let refusals =
        delivery::store(&mut session, c.agent_id, c.agent_secret.as_ref(), &samples).await?;
    let mut again = 0;
    for (i, (seq, mut r)) in records.into_iter().enumerate() {
        match refusals.iter().find(|x| x.index == i) {
            None => {
                locked.remove(seq);
                println!("{}: stored", describe(seq, &r));
            }
            Some(x) => {
                again += 1;
                r.attempts += 1;
                r.sqlstate = x.sqlstate.clone();
                r.message = x.message.clone();
                r.rejected_at = chrono::Utc::now();
                locked.write(seq, &r)?;
                println!("{}: refused again: {}", describe(seq, &r), reason(&r));
            }
        }
    }
    if again > 0 {
        return Err(Error::StillRefused(again).into());
    }
    Ok(())
}

fn discard(c: &AgentConfig, a: &SpoolSelectArgs) -> Result<(), crate::Error> {
    if !a.all && a.numbers.is_empty() {
        return Err(crate::Error::Usage(
            "say which refused samples to delete: --all, or their numbers from pemworker spool status".into(),
        ));
    }
    let area = rejected(c);
    if !area.dir().is_dir() {
        println!("no refused samples in {}", area.dir().display());
        return Ok(());
    }
    let mut locked = area.lock()?;
    let seqs = selected(&locked, a)?;
    for s in &seqs {
        locked.remove(*s);
    }
    println!(
        "deleted {} refused samples from {}",
        seqs.len(),
        display(area.dir())
    );
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
