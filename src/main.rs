//! The `pemworker` binary: parses the command line, sets up logging, dispatches to the library
//! and maps the outcome to an exit code (see `pemworker --help`).

use std::process::ExitCode;

use clap::CommandFactory;
use clap::Parser;
use clap::error::ErrorKind;
use pemworker::cli::{self, AgentArgs, Cli, Command, PoolerCommand};
use pemworker::pooler::{bouncer, prepare, proxy_user};
use pemworker::registration::{self, migrate};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PEMWORKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();

    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pemworker: error: cannot start the runtime: {e}");
            return ExitCode::from(pemworker::ExitCode::Local as u8);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pemworker: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
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

async fn run(cli: Cli) -> Result<(), pemworker::Error> {
    let Some(command) = cli.command else {
        return run_agent(&cli.agent).await;
    };
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

async fn run_agent(a: &AgentArgs) -> Result<(), pemworker::Error> {
    if a.register_agent {
        let opts = cli::resolve_register(a)?;
        let r = registration::register(&opts).await?;
        println!("Postgres Enterprise Manager Agent registered successfully!");
        println!(
            "agent id: {}{}",
            r.agent_id,
            if r.kept_id {
                " (kept from the existing agent.cfg)"
            } else {
                ""
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
    } else if a.verify_registration {
        let file = cli::config_dir(a).join(pemworker::agentcfg::FILE_NAME);
        let id = registration::verify(&file).await?;
        println!("agent {id} is registered and active");
    } else if a.unregister_agent {
        let (server, file) = cli::resolve_unregister(a)?;
        let (id, backup) = registration::unregister(&server, &file).await?;
        println!(
            "agent {id} unregistered; its agent.cfg was moved to {}",
            backup.display()
        );
    } else if a.migrate_to_pooler {
        let opts = cli::resolve_migrate(a)?;
        let m = migrate::migrate(&opts).await?;
        println!(
            "agent {} now logs in through the pooler at port {} as {}",
            m.agent_id, opts.pooler_port, opts.agent_user
        );
        for b in &m.backups {
            println!("backup: {}", b.display());
        }
    } else {
        let _ = Cli::command().print_help();
        return Err(pemworker::Error::Usage(
            "nothing to do: give a mode such as --register-agent, or a subcommand".into(),
        ));
    }
    Ok(())
}
