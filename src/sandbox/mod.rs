//! `pemworker sandbox`: a throwaway PEM installation on this machine.
//!
//! [`servers`] starts a private reference PEM server and a pgBouncer configured as the guide
//! says (through this program's own pooler commands); the command then registers an agent
//! through pgBouncer and runs the worker, showing what reaches the server.

pub mod servers;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::connection::{self, pool};
use crate::worker::stats::Snapshot;
use servers::{Options, Passwords, Servers};

/// The common agent user the sandbox registers its agent as.
pub const AGENT_USER: &str = "pem_agent_user1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Servers(#[from] servers::Error),
    #[error(transparent)]
    Connection(#[from] connection::Error),
    #[error("{0}")]
    Step(String),
}

/// What `pemworker sandbox` was asked for.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Leave everything running and exit after printing how to use and stop it.
    pub keep: bool,
    /// pgBouncer's port, as in the guide; another free one if it is taken.
    pub pgbouncer_port: u16,
    /// Stop by itself after this long (for scripted runs); `None` = until Ctrl-C.
    pub duration: Option<Duration>,
}

struct Agent {
    id: i32,
    cfg: PathBuf,
    state: PathBuf,
    child: Child,
}

/// Sets the sandbox up, then shows its status until Ctrl-C (or `duration`), then removes it.
pub async fn run(settings: &Settings) -> Result<(), Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Step(format!("cannot find this program: {e}")))?;
    let opts = Options {
        exe,
        passwords: Passwords::random(),
        pgbouncer_port: Some(settings.pgbouncer_port),
        sizes: Default::default(),
    };
    println!("starting a throwaway PEM server and pgBouncer ...");
    let mut servers = tokio::task::spawn_blocking(move || Servers::start(&opts))
        .await
        .map_err(|e| Error::Step(e.to_string()))??;
    println!(
        "PEM server (PostgreSQL) on 127.0.0.1:{}, pgBouncer on 127.0.0.1:{} (transaction pooling, certificate logins)",
        servers.pg_port, servers.pgb_port
    );
    let mut agent = register_and_start(&servers).await?;
    println!(
        "agent {} registered through pgBouncer as {AGENT_USER}; worker running (pid {})",
        agent.id,
        agent.child.id()
    );

    if settings.keep {
        servers.keep();
        println!("\nLeft running in {}:", servers.root.display());
        println!(
            "  psql as the agent:  psql \"host=127.0.0.1 port={} dbname=pem user={AGENT_USER} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}\"",
            servers.pgb_port,
            servers.root_crt.display(),
            servers
                .home
                .join(".pem")
                .join(format!("{AGENT_USER}.crt"))
                .display(),
            servers
                .home
                .join(".pem")
                .join(format!("{AGENT_USER}.key"))
                .display()
        );
        println!(
            "  psql as the admin:  PGPASSWORD='{}' psql \"host=127.0.0.1 port={} dbname=pem user={} sslmode=require\"",
            servers.passwords.admin.expose(),
            servers.pgb_port,
            servers::ADMIN_USER
        );
        println!(
            "  worker log:         {}",
            servers.root.join("agent").join("worker.log").display()
        );
        println!(
            "  stop it all:        kill {}; {}",
            agent.child.id(),
            servers.stop_instructions()
        );
        return Ok(());
    }

    let started = Instant::now();
    let interactive = std::io::stdout().is_terminal();
    let result = watch(
        &servers,
        &mut agent,
        started,
        interactive,
        settings.duration,
    )
    .await;
    println!("\nstopping the worker, pgBouncer and PostgreSQL ...");
    stop_worker(&mut agent).await;
    let root = servers.root.clone();
    tokio::task::spawn_blocking(move || drop(servers))
        .await
        .ok();
    println!("sandbox stopped; removed {}", root.display());
    result
}

async fn register_and_start(servers: &Servers) -> Result<Agent, Error> {
    let site = servers.root.join("agent");
    let cfg = site.join("etc").join(crate::agentcfg::FILE_NAME);
    // The PEM admin makes a single-use enrolment token ...
    std::fs::create_dir_all(&site).map_err(|e| Error::Step(e.to_string()))?;
    let token = site.join("enrolment.token");
    let out = servers
        .pemworker_command()
        .env("PEM_SERVER_PASSWORD", servers.passwords.admin.expose())
        .args([
            "pooler",
            "enrolment-token",
            "create",
            "--pem-server",
            "127.0.0.1",
        ])
        .arg("--pem-port")
        .arg(servers.pgb_port.to_string())
        .args([
            "--pem-user",
            servers::ADMIN_USER,
            "--ttl",
            "10m",
            "--uses",
            "1",
        ])
        .args(["--agent-user", AGENT_USER, "--output"])
        .arg(&token)
        .output()
        .map_err(|e| Error::Step(format!("cannot make an enrolment token: {e}")))?;
    if !out.status.success() {
        return Err(Error::Step(format!(
            "making an enrolment token failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // ... and the agent host registers with it alone: no password in its environment.
    let out = servers
        .agent_host_command()
        .args([
            "--register-agent",
            "--pem-server",
            "127.0.0.1",
            "--pem-port",
        ])
        .arg(servers.pgb_port.to_string())
        .arg("--enrolment-token-file")
        .arg(&token)
        .args([
            "--pem-agent-user",
            AGENT_USER,
            "--display-name",
            "sandbox agent",
        ])
        .arg("--cert-path")
        .arg(servers.home.join(".pem"))
        .arg("--config-dir")
        .arg(site.join("etc"))
        .output()
        .map_err(|e| Error::Step(format!("cannot run the registration: {e}")))?;
    let _ = std::fs::remove_file(&token);
    if !out.status.success() {
        return Err(Error::Step(format!(
            "registration failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let id = crate::agentcfg::Document::read(&cfg)
        .ok()
        .and_then(|d| d.get("agent_id").and_then(|v| v.parse::<i32>().ok()))
        .ok_or_else(|| Error::Step(format!("no agent_id in {}", cfg.display())))?;

    // Quick intervals so there is something to watch.
    let su = connection::connect(&servers.superuser()).await?;
    pool::execute(
        &su,
        "setting the agent's intervals",
        "WITH a AS (UPDATE pem.agent SET heartbeat_interval = 5 WHERE id = $1) \
         INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
         SELECT $1, NULL, p.id, 10, true FROM pem.probe p WHERE p.target_type = 'agent'",
        &[(&id, Type::INT4)],
    )
    .await?;
    bind_servers(servers, id, &cfg, 10).await?;

    let state = site.join("state");
    let stderr = std::fs::File::create(site.join("worker.stderr"))
        .map_err(|e| Error::Step(e.to_string()))?;
    let child = servers
        .agent_host_command()
        .arg("-c")
        .arg(&cfg)
        .arg("-f")
        .args(["-o", &format!("state_dir={}", state.display())])
        .args([
            "-o",
            &format!("log_location={}", site.join("worker.log").display()),
        ])
        .args(["-o", "log_level=info", "-o", "short_wait=5"])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| Error::Step(format!("cannot start the worker: {e}")))?;
    Ok(Agent {
        id,
        cfg,
        state,
        child,
    })
}

/// Binds the sandbox's own PostgreSQL (through a `monitor` login in pg_monitor) and pgBouncer
/// (through its statistics console user, never the admin) to agent `agent_id`, schedules their
/// probes every `interval` seconds, keeps the passwords those logins need in the agent's
/// `<home>/.pgpass` (never on the PEM server), and records both as registered from this host
/// beside the agent's `config_file` (see [`crate::targets`]).
/// Returns the monitored server's id.
pub async fn bind_servers(
    servers: &Servers,
    agent_id: i32,
    config_file: &Path,
    interval: i32,
) -> Result<i32, Error> {
    let su = connection::connect(&servers.superuser()).await?;
    let monitor_pw = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let create = pool::query_value::<String>(
        &su,
        "creating the monitoring login",
        "SELECT format('CREATE ROLE monitor LOGIN PASSWORD %L IN ROLE pg_monitor', $1::text)",
        &[(&monitor_pw, Type::TEXT)],
    )
    .await?;
    pool::batch(&su, "creating the monitoring login", &create).await?;
    let (pg_port, pgb_port) = (i32::from(servers.pg_port), i32::from(servers.pgb_port));
    let server_id: i32 = pool::query_value(
        &su,
        "binding the sandbox servers",
        "WITH s AS (INSERT INTO pem.server (display_name, server_addr, port, database, username) \
                    VALUES ('sandbox PostgreSQL', '127.0.0.1', $2, 'postgres', 'monitor') RETURNING id), \
              b AS (INSERT INTO pem.agent_server_binding (agent_id, server_id, sslmode) SELECT $1, id, 'verify-full' FROM s), \
              g AS (INSERT INTO pem.agent_pgbouncer_binding (agent_id, host, port, username, sslmode) \
                    VALUES ($1, '127.0.0.1', $3, $4, 'verify-full')), \
              p AS (INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
                    SELECT $1, CASE WHEN p.target_type = 'server' THEN (SELECT id FROM s) END, p.id, $5, true \
                      FROM pem.probe p WHERE p.target_type IN ('server', 'pgbouncer')) \
         SELECT id FROM s",
        &[
            (&agent_id, Type::INT4),
            (&pg_port, Type::INT4),
            (&pgb_port, Type::INT4),
            (&servers::STATS_USER, Type::TEXT),
            (&interval, Type::INT4),
        ],
    )
    .await?;
    let esc = crate::secret::pgpass_escape;
    let pgpass = servers.home.join(".pgpass");
    crate::fsutil::Staged::write(
        &pgpass,
        format!(
            "127.0.0.1:{}:*:monitor:{}\n127.0.0.1:{}:pgbouncer:{}:{}\n",
            servers.pg_port,
            esc(&monitor_pw),
            servers.pgb_port,
            servers::STATS_USER,
            esc(servers.passwords.stats.expose())
        )
        .as_bytes(),
        0o600,
        None,
    )
    .and_then(|s| s.commit())
    .map_err(|e| Error::Step(e.to_string()))?;
    let record = |kind, port, database: &str, user: &str| crate::targets::Target {
        kind,
        host: "127.0.0.1".into(),
        port,
        database: database.into(),
        user: user.into(),
        sslmode: "verify-full".into(),
        root_cert: Some(servers.root_crt.clone()),
        efm: None,
    };
    let file = crate::targets::file_for(config_file);
    crate::targets::Registry::load(&file)
        .map(|r| {
            r.with(record(
                crate::targets::Kind::Server,
                servers.pg_port,
                "postgres",
                "monitor",
            ))
            .with(record(
                crate::targets::Kind::Pgbouncer,
                servers.pgb_port,
                "pgbouncer",
                servers::STATS_USER,
            ))
        })
        .and_then(|r| r.stage(&file))
        .and_then(|s| s.commit().map_err(Into::into))
        .map_err(|e| Error::Step(e.to_string()))?;
    Ok(server_id)
}

async fn stop_worker(agent: &mut Agent) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + crate::worker::SHUTDOWN_GRACE + Duration::from_secs(5);
    while agent.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = agent.child.kill();
    let _ = agent.child.wait();
}

/// One look at the sandbox, as the status view shows it.
#[derive(Debug, Default)]
struct Status {
    heartbeats: u64,
    last_heartbeat_age: Option<f64>,
    stored: Vec<(String, i64)>,
    pool: Option<String>,
    worker: Snapshot,
}

async fn look(servers: &Servers, su: &Client, agent: &Agent) -> Status {
    let mut st = Status {
        worker: std::fs::read(agent.state.join("stats.json"))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default(),
        ..Status::default()
    };
    st.heartbeats = st.worker.heartbeats;
    if let Ok(rows) = pool::query(
        su,
        "status",
        "SELECT extract(epoch FROM now() - last_heartbeat)::float8 FROM pem.agent_heartbeat WHERE agent_id = $1",
        &[(&agent.id, Type::INT4)],
    )
    .await
    {
        st.last_heartbeat_age = rows.first().and_then(|r| r.try_get(0).ok());
    }
    let mut stored = Vec::new();
    for p in crate::probes::PROBES {
        let sql = format!(
            "SELECT count(*) FROM pemhistory.{} WHERE agent_id = $1",
            p.name
        );
        if let Ok(n) =
            pool::query_value::<i64>(su, "status", &sql, &[(&agent.id, Type::INT4)]).await
        {
            stored.push((p.name.to_string(), n));
        }
    }
    st.stored = stored;
    if let Ok(console) = connection::connect(&servers.console()).await {
        if let Ok(rows) = pool::simple_rows(&console, "SHOW POOLS", "SHOW POOLS").await {
            st.pool = rows
                .iter()
                .find(|r| {
                    r.try_get("database").ok().flatten() == Some("pem")
                        && r.try_get("user").ok().flatten() == Some(AGENT_USER)
                })
                .map(|r| {
                    format!(
                        "clients active {} waiting {}, server connections active {} idle {}, mode {}",
                        r.try_get("cl_active").ok().flatten().unwrap_or("?"),
                        r.try_get("cl_waiting").ok().flatten().unwrap_or("?"),
                        r.try_get("sv_active").ok().flatten().unwrap_or("?"),
                        r.try_get("sv_idle").ok().flatten().unwrap_or("?"),
                        r.try_get("pool_mode").ok().flatten().unwrap_or("?")
                    )
                });
        }
    }
    st
}

fn render(
    servers: &Servers,
    agent: &Agent,
    st: &Status,
    elapsed: Duration,
    interactive: bool,
) -> String {
    let rows: i64 = st.stored.iter().map(|(_, n)| n).sum();
    let hb = match st.last_heartbeat_age {
        Some(age) => format!("{} (last {:.0} s ago)", st.heartbeats, age.max(0.0)),
        None => format!("{} (none on the server yet)", st.heartbeats),
    };
    let link = if st.worker.connected {
        "connected"
    } else {
        "not connected"
    };
    if !interactive {
        return format!(
            "[{:>4} s] agent {} via pgBouncer 127.0.0.1:{}: {link} | heartbeats {hb} | stored rows {rows} | spool {}",
            elapsed.as_secs(),
            agent.id,
            servers.pgb_port,
            st.worker.spooled_samples
        );
    }
    let mut s = String::from("\x1b[2J\x1b[H");
    s.push_str(&format!(
        "pemworker sandbox  (up {} s, Ctrl-C stops and removes everything)\n\n",
        elapsed.as_secs()
    ));
    s.push_str(&format!(
        "agent {} as {AGENT_USER} via pgBouncer 127.0.0.1:{}: {link}\n",
        agent.id, servers.pgb_port
    ));
    s.push_str(&format!("heartbeats: {hb}\n"));
    s.push_str(&format!(
        "pool pem/{AGENT_USER}: {}\n",
        st.pool.as_deref().unwrap_or("no pool yet")
    ));
    s.push_str(&format!(
        "spool: {} samples waiting, {} refused by the server, {} dropped\n",
        st.worker.spooled_samples, st.worker.refused_samples, st.worker.dropped_samples
    ));
    if let Some(p) = &st.worker.delivery_problem {
        s.push_str(&format!("delivery: {p}\n"));
    }
    s.push_str(&format!("\nrows stored per probe ({rows} in all):\n"));
    for (name, n) in &st.stored {
        s.push_str(&format!("  {name:<24}{n:>8}\n"));
    }
    s
}

async fn watch(
    servers: &Servers,
    agent: &mut Agent,
    started: Instant,
    interactive: bool,
    duration: Option<Duration>,
) -> Result<(), Error> {
    let su = connection::connect(&servers.superuser()).await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_secs(if interactive { 1 } else { 5 }));
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Some(status) = agent.child.try_wait().ok().flatten() {
            let log = std::fs::read_to_string(
                agent
                    .cfg
                    .parent()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("."))
                    .join("worker.stderr"),
            )
            .unwrap_or_default();
            return Err(Error::Step(format!(
                "the worker exited ({status}): {}",
                log.trim()
            )));
        }
        let st = look(servers, &su, agent).await;
        println!(
            "{}",
            render(servers, agent, &st, started.elapsed(), interactive)
        );
        if duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
    }
}
