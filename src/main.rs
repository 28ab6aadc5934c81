//! The `pemworker` binary (also `pemagent`, PEM's daemon name, through a link: see
//! `pemworker::program`): parses the command line, sets up logging, dispatches to the library
//! and maps the outcome to an exit code (see `pemworker --help`).

use std::process::ExitCode;

use clap::error::ErrorKind;
use pemworker::cli::{self, AgentArgs, Cli, Command, Mode, PoolerCommand};
use pemworker::pooler::{bouncer, prepare, proxy_user};
use pemworker::program::Program;
use pemworker::registration::{self, migrate};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(why) = cli::spaced_option_value(&args) {
        return fail(pemworker::ExitCode::Config, why);
    }
    let cli = match Program::invoked().parse_from::<Cli, _, _>(&args) {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    let a = &cli.agent;
    let Some(command) = cli.command else {
        // The one dispatch of PEM's flat command line: one arm per mode.
        return match a.mode {
            Mode::Worker => worker_main(a, false),
            Mode::CheckConfig => worker_main(a, true),
            Mode::RegisterAgent => block_on(a, register_agent(a)),
            Mode::UnregisterAgent => block_on(a, unregister_agent(a)),
            Mode::VerifyRegistration => block_on(a, verify_registration(a)),
            Mode::MigrateToPooler => block_on(a, migrate_to_pooler(a)),
            Mode::RegisterServer => block_on(a, register_server(a)),
            Mode::UnregisterServer => block_on(a, unregister_server(a)),
            Mode::EnableProbe | Mode::DisableProbe | Mode::SetProbeInterval(_) => {
                block_on(a, change_probe(a))
            }
            Mode::RegisterBarman | Mode::UpdateBarman | Mode::UnregisterBarman => {
                fail(pemworker::ExitCode::Config, not_implemented(a.mode))
            }
        };
    };
    if let Command::Fleet(f) = &command {
        return fleet_main(f);
    }
    block_on(a, run(command))
}

/// `pemworker fleet`: its own logging (every agent's warnings and errors counted by kind).
fn fleet_main(f: &cli::FleetArgs) -> ExitCode {
    use pemworker::fleet::{self, Mode, Settings};
    let modes = match f.mode {
        cli::FleetMode::Pooled => vec![Mode::Pooled],
        cli::FleetMode::Direct => vec![Mode::Direct],
        cli::FleetMode::Both => vec![Mode::Pooled, Mode::Direct],
    };
    let settings = Settings {
        agents: f.agents,
        modes,
        duration: std::time::Duration::from_secs(f.duration),
        ramp: std::time::Duration::from_secs(f.ramp),
        heartbeat_interval: f.heartbeat_interval,
        probe_interval: f.probe_interval,
        pool_size: f.pool_size,
        processes: f.processes,
        csv: f.csv.clone(),
        plot: f.plot.clone(),
    };
    if let Err(e) = fleet::init_logging(f.log.as_deref()) {
        return fail(pemworker::ExitCode::Local, e);
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    // Ctrl-C or SIGTERM ends the run: dropping it stops and removes its servers and agents.
    let interrupted = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = fleet::run(&settings) => r,
            _ = interrupted => Err(fleet::Error::Step(
                "interrupted: the run's servers and agents are stopped and removed".into(),
            )),
        }
    });
    match outcome {
        Ok(summaries) => {
            let bad: Vec<String> = summaries
                .iter()
                .filter(|s| !s.clean())
                .map(|s| s.label.clone())
                .collect();
            if bad.is_empty() {
                ExitCode::SUCCESS
            } else {
                fail(
                    pemworker::ExitCode::Server,
                    format!(
                        "fleet run with problems (errors, or a sample not stored exactly once): {}",
                        bad.join("; ")
                    ),
                )
            }
        }
        Err(e) => {
            let code = match &e {
                fleet::Error::Usage(_) => pemworker::ExitCode::Config,
                fleet::Error::Servers(pemworker::sandbox::servers::Error::Missing { .. }) => {
                    pemworker::ExitCode::Config
                }
                fleet::Error::Connection(c) => {
                    if c.is_connect() {
                        pemworker::ExitCode::Connect
                    } else {
                        pemworker::ExitCode::Server
                    }
                }
                _ => pemworker::ExitCode::Local,
            };
            fail(code, e)
        }
    }
}

/// PEM's Barman modes: the flags parse, the work is not done here.
fn not_implemented(mode: Mode) -> String {
    format!(
        "{} is not implemented by pemworker: register pg-backup-api endpoints with PEM's own agent or web interface",
        mode.flag()
    )
}

/// The one-thread runtime management commands run on; the failure as the exit code.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            fail(
                pemworker::ExitCode::Local,
                format!("cannot start the runtime: {e}"),
            )
        })
}

/// Runs one management command on a small runtime with command-line logging, and maps its
/// outcome to an exit code.
fn block_on(
    a: &AgentArgs,
    work: impl std::future::Future<Output = Result<(), pemworker::Error>>,
) -> ExitCode {
    pemworker::logging::init_cli(a.log_level);
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), e),
    }
}

/// clap's messages span several lines; a bad command line gets one line and exit code 1.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            let text = e.render().to_string();
            let head = text.split("\n\n").next().unwrap_or(&text);
            let line = head.split_whitespace().collect::<Vec<_>>().join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!("pemworker: error: {line} (see pemworker --help)");
            ExitCode::from(pemworker::ExitCode::Config as u8)
        }
    }
}

async fn run(command: Command) -> Result<(), pemworker::Error> {
    match command {
        Command::Pooler(PoolerCommand::PrepareServer(a)) => {
            let (settings, opts) = cli::resolve_prepare(&a)?;
            let (report, lines) = prepare::run(&settings, &opts).await?;
            println!("{report}");
            if let Some(block) = lines {
                println!(
                    "\nAdd these lines at the start of pg_hba.conf on the PEM server, then reload it \
                     (or rerun with --pg-hba FILE):\n{block}"
                );
            }
        }
        Command::Pooler(PoolerCommand::CreateProxyUser(a)) => {
            let settings = cli::resolve_server(&a.server)?;
            match proxy_user::run(&settings, &a.name).await? {
                proxy_user::Outcome::Created => println!("created agent user {}", a.name),
                proxy_user::Outcome::AlreadyAgent => {
                    println!("agent user {} already exists; nothing to change", a.name)
                }
            }
        }
        Command::Sandbox(a) => {
            let settings = pemworker::sandbox::Settings {
                keep: a.keep,
                pgbouncer_port: a.pgbouncer_port,
                duration: a.duration.map(std::time::Duration::from_secs),
            };
            pemworker::sandbox::run(&settings).await?;
        }
        Command::Spool(c) => pemworker::spool::command::run(&c).await?,
        // Dispatched before this runtime starts (it sets up its own logging).
        Command::Fleet(_) => {
            return Err(pemworker::Error::Usage(
                "pemworker fleet runs on its own".into(),
            ));
        }
        Command::Pooler(PoolerCommand::EnrolmentToken(t)) => run_token(t).await?,
        Command::Pooler(PoolerCommand::Check(a)) => {
            let opts = cli::resolve_check(&a)?;
            let outcome = pemworker::pooler::check::run(&opts).await?;
            println!("{outcome}");
            if !outcome.problems.is_empty() {
                return Err(pemworker::pooler::Error::Findings(outcome.problems.len()).into());
            }
        }
        Command::Pooler(PoolerCommand::ServerCertificate(a)) => {
            let opts = cli::resolve_server_certificate(&a)?;
            let issued = pemworker::pooler::certificate::issue(&opts)?;
            for b in &issued.backups {
                println!("backup: {}", b.display());
            }
            println!(
                "issued {} for {} (valid until {}), signed by the PEM CA {}",
                opts.cert_file.display(),
                issued.names.join(", "),
                issued.not_after,
                issued.ca_subject
            );
            println!(
                "key: {} (mode 0600, owned by {})",
                opts.key_file.display(),
                opts.owner.name
            );
        }
        Command::Pooler(PoolerCommand::Bind(a)) => {
            let opts = cli::resolve_bind(&a)?;
            let r = pemworker::monitored::bind_pgbouncer(&opts).await?;
            println!(
                "pgBouncer {} ({}) {} agent {}: its pools and statistics are probed as {}",
                opts.console.target(),
                r.version,
                if r.updated {
                    "binding updated for"
                } else {
                    "bound to"
                },
                opts.agent.agent_id,
                opts.console.user
            );
            if let Some(f) = r.password_saved_in {
                println!("its password is kept only in {} (mode 0600)", f.display());
            }
        }
        Command::Pooler(PoolerCommand::Unbind(a)) => {
            let (agent, admin) = cli::resolve_unbind(&a)?;
            let user = pemworker::monitored::unbind_pgbouncer(
                &admin,
                agent.agent_id,
                &a.pgbouncer_host,
                a.pgbouncer_port,
                &pemworker::targets::file_for(&agent.path),
                &pemworker::monitored::pgpass_file(),
            )
            .await?;
            println!(
                "pgBouncer {}:{} is no longer probed by agent {}; the password of {user} is gone from this host",
                a.pgbouncer_host, a.pgbouncer_port, agent.agent_id
            );
        }
        Command::Pooler(PoolerCommand::Configure(a)) => {
            let settings = cli::resolve_configure(&a)?;
            let outcome = bouncer::configure(&settings)?;
            let (ma, mi, pa) = outcome.version;
            println!("pgBouncer {ma}.{mi}.{pa} supports certificate authentication");
            println!("{}", outcome.report);
        }
    }
    Ok(())
}

async fn run_token(t: cli::TokenCommand) -> Result<(), pemworker::Error> {
    use pemworker::pooler::token;
    match t {
        cli::TokenCommand::Create(a) => {
            let (settings, opts) = cli::resolve_token_create(&a)?;
            let made = token::create(&settings, &opts).await?;
            let what = format!(
                "enrolment token {}: {} use{}, valid until {}, agent user {}",
                made.id,
                opts.uses,
                if opts.uses == 1 { "" } else { "s" },
                made.expires_at,
                opts.agent_user
                    .as_deref()
                    .unwrap_or("agent<ID> (each its own)")
            );
            match &opts.output {
                Some(file) => println!("{what}; written to {}", file.display()),
                None => {
                    // The token alone on standard output, for TOKEN=$(...); the rest beside it.
                    eprintln!("{what}");
                    println!("{}", made.token.expose());
                }
            }
        }
        cli::TokenCommand::List(a) => {
            let settings = cli::resolve_server(&a.server)?;
            for t in token::list(&settings).await? {
                println!("{t}");
            }
        }
        cli::TokenCommand::Revoke(a) => {
            let settings = cli::resolve_server(&a.server)?;
            if token::revoke(&settings, a.id).await? {
                println!("enrolment token {} revoked", a.id);
            } else {
                return Err(pemworker::Error::Usage(format!(
                    "no valid enrolment token {} to revoke; see pemworker pooler enrolment-token list",
                    a.id
                )));
            }
        }
    }
    Ok(())
}

async fn register_agent(a: &AgentArgs) -> Result<(), pemworker::Error> {
    let opts = cli::resolve_register(a)?;
    let r = registration::register(&opts).await?;
    // EDB's tooling checks for this line.
    println!("Postgres Enterprise Manager Agent registered successfully!");
    println!(
        "agent id: {}{}",
        r.agent_id,
        match (r.kept_id, opts.agent_id) {
            (true, Some(_)) => " (as given with -o agent_id)",
            (true, None) => " (kept from the existing agent.cfg)",
            (false, _) => "",
        }
    );
    println!("agent user: {}", r.agent_user);
    println!("configuration: {}", r.config_file.display());
    println!("key: {}", r.key_file.display());
    println!("certificate: {}", r.cert_file.display());
    for b in &r.backups {
        println!("backup: {}", b.display());
    }
    for id in &r.deactivated {
        println!("marked the duplicate registration {id} inactive");
    }
    Ok(())
}

/// PEM 10.4's check: exit 0 registered and active, 1 configuration, 2 connection, 3 inactive.
async fn verify_registration(a: &AgentArgs) -> Result<(), pemworker::Error> {
    let id = registration::verify(&a.admin.config_file()).await?;
    println!("agent {id} is registered and active");
    println!("Verify registration done successfully.");
    Ok(())
}

async fn unregister_agent(a: &AgentArgs) -> Result<(), pemworker::Error> {
    let (server, file) = cli::resolve_unregister(a)?;
    let (id, backup) = registration::unregister(&server, &file).await?;
    println!(
        "agent {id} unregistered; its agent.cfg was moved to {}",
        backup.display()
    );
    Ok(())
}

async fn migrate_to_pooler(a: &AgentArgs) -> Result<(), pemworker::Error> {
    let opts = cli::resolve_migrate(a)?;
    let m = migrate::migrate(&opts).await?;
    println!(
        "agent {} now logs in through the pooler at port {} as {}",
        m.agent_id, opts.pooler_port, opts.agent_user
    );
    if m.recorded {
        println!(
            "the PEM server records {} as agent {}'s user",
            opts.agent_user, m.agent_id
        );
    }
    for b in &m.backups {
        println!("backup: {}", b.display());
    }
    if let Some((role, removed)) = &m.retired {
        if !role.is_empty() {
            println!("dropped the dedicated role {role}: its certificate logs in nowhere now");
        }
        for f in removed {
            println!("removed {}", f.display());
        }
    }
    match m.reload {
        migrate::Reload::Signalled(pid) => println!(
            "told the running worker (pid {pid}) to reload: it reconnects with the new settings"
        ),
        migrate::Reload::Failed(pid, why) => println!(
            "the running worker (pid {pid}) could not be told to reload ({why}): run systemctl reload pemagent.service, or kill -HUP {pid}"
        ),
        migrate::Reload::NotRunning(state) => println!(
            "no worker runs with {}{}; start it with systemctl start pemagent.service (or pemworker -c {}), or if one runs with another state_dir, reload it: systemctl reload pemagent.service (or kill -HUP its pid)",
            opts.config_file.display(),
            state
                .map(|d| format!(" (state directory {})", d.display()))
                .unwrap_or_default(),
            opts.config_file.display()
        ),
    }
    Ok(())
}

async fn register_server(a: &AgentArgs) -> Result<(), pemworker::Error> {
    let opts = cli::resolve_register_server(a)?;
    let r = pemworker::monitored::register_server(&opts).await?;
    // EDB's tooling checks for this line.
    println!("Database Server registered with Postgres Enterprise Manager Server successfully!");
    println!(
        "server {} {} and bound to agent {}",
        r.server_id,
        if r.updated { "updated" } else { "registered" },
        opts.agent.agent_id
    );
    if let Some(f) = r.password_saved_in {
        println!("its password is kept only in {} (mode 0600)", f.display());
    }
    Ok(())
}

async fn unregister_server(a: &AgentArgs) -> Result<(), pemworker::Error> {
    let (admin, agent_id, host, port, targets) = cli::resolve_unregister_server(a)?;
    let id =
        pemworker::monitored::unregister_server(&admin, agent_id, &host, port, &targets).await?;
    println!("server {id} ({host}:{port}) is no longer monitored by agent {agent_id}");
    Ok(())
}

async fn change_probe(a: &AgentArgs) -> Result<(), pemworker::Error> {
    let change = cli::resolve_probe_change(a)?;
    let s = pemworker::monitored::set_probe(&change).await?;
    // PEM's wording first, then the state now.
    match s.server_id {
        Some(i) => println!("INFO: Probe status updated for server (id: {i})"),
        None => println!(
            "INFO: Probe status updated for agent (id: {})",
            change.agent_id
        ),
    }
    println!(
        "probe {}{} for agent {}: {}, every {} s",
        s.probe,
        s.server_id
            .map(|i| format!(" on server {i}"))
            .unwrap_or_default(),
        change.agent_id,
        if s.enabled { "enabled" } else { "disabled" },
        s.interval
    );
    Ok(())
}

fn fail(code: pemworker::ExitCode, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("pemworker: error: {message}");
    ExitCode::from(code as u8)
}

/// `pemworker [-c agent.cfg] [-f] [--check-config]`: check the configuration, then run the
/// worker until SIGTERM or SIGINT, reloading on SIGHUP.
fn worker_main(a: &AgentArgs, check_only: bool) -> ExitCode {
    use pemworker::config::AgentConfig;
    let (path, overrides) = match cli::resolve_worker(a) {
        Ok(v) => v,
        Err(e) => return fail(e.exit_code(), e),
    };
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    let load = || AgentConfig::load(&path, &overrides);
    let (config, warnings) = match load() {
        Ok(v) => v,
        Err(problems) => {
            for p in &problems.0 {
                eprintln!("pemworker: error: {p}");
            }
            return ExitCode::from(pemworker::ExitCode::Config as u8);
        }
    };
    if check_only {
        use pemworker::config::Notice;
        for n in &warnings {
            match n {
                Notice::Warning(w) => eprintln!("pemworker: warning: {w}"),
                Notice::Info(i) => eprintln!("pemworker: note: {i}"),
            }
        }
        // The certificate and key as a session loads them.
        if let Err(p) = config.check_identity() {
            eprintln!("pemworker: error: {p}");
            return ExitCode::from(pemworker::ExitCode::Config as u8);
        }
        println!("config valid");
        return ExitCode::SUCCESS;
    }
    // Before the log writer's and the runtime's threads exist.
    pemworker::worker::memory::one_arena();
    // One worker per state directory: refused here, on the terminal, before detaching.
    let mut lock = match pemworker::spool::StateLock::acquire(&config.state_dir) {
        Ok(l) => l,
        Err(e) => return fail(e.exit_code(), e),
    };
    if !a.foreground {
        // Classic daemon: detach from the terminal. systemd runs the worker with -f instead.
        if let Err(e) = nix::unistd::daemon(false, false) {
            return fail(
                pemworker::ExitCode::Local,
                format!("cannot run in the background: {e}"),
            );
        }
        // The lock is inherited; the pid in it is now the child's.
        lock.record_pid();
    }
    let logging = match pemworker::logging::init_worker(
        config.log_level,
        config.log_location.as_deref(),
        a.foreground,
    ) {
        Ok(l) => l,
        Err(e) => return fail(pemworker::ExitCode::Local, e),
    };
    for n in &warnings {
        match n {
            pemworker::config::Notice::Warning(w) => tracing::warn!("{w}"),
            pemworker::config::Notice::Info(i) => tracing::info!("{i}"),
        }
    }
    // Blocking threads (spool and stats files, OS probes) are kept for ten minutes once
    // started, so a quiet agent does not start a thread for every batch.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .thread_keep_alive(std::time::Duration::from_secs(600))
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return fail(
                pemworker::ExitCode::Local,
                format!("cannot start the runtime: {e}"),
            );
        }
    };
    let result = runtime.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let reload = std::sync::Arc::new(tokio::sync::Notify::new());
        let signals = watch_signals(shutdown.clone(), reload.clone())?;
        let r = pemworker::worker::run(config, lock, Some(&logging), shutdown, reload, || {
            load().map(|(c, _)| c)
        })
        .await;
        signals.abort();
        r.map_err(|e| e.to_string())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            drop(logging);
            fail(pemworker::ExitCode::Local, e)
        }
    }
}

/// SIGTERM and SIGINT cancel `shutdown`; SIGHUP notifies `reload`.
fn watch_signals(
    shutdown: tokio_util::sync::CancellationToken,
    reload: std::sync::Arc<tokio::sync::Notify>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: stopping"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT: stopping"); shutdown.cancel(); }
                _ = hup.recv() => { tracing::info!("SIGHUP: reloading the configuration"); reload.notify_one(); }
            }
        }
    }))
}
