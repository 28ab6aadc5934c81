//! Agent registration through pgBouncer, against a real PostgreSQL and a real pgBouncer.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{ADMIN_PASSWORD, ADMIN_USER, TestBed, outcome};
use pemworker::agentcfg::{Document, keys};
use pemworker::config::AgentConfig;
use pemworker::connection::{self, pool};
use pemworker::registration::agent_settings;
use tokio_postgres::types::Type;

/// A fresh place on "this host" for one agent's files.
struct Site {
    cert_path: PathBuf,
    config_dir: PathBuf,
}

impl Site {
    fn new(bed: &TestBed, name: &str) -> Site {
        Site {
            cert_path: bed.home.join(name).join(".pem"),
            config_dir: bed.home.join(name).join("etc"),
        }
    }

    fn config_file(&self) -> PathBuf {
        self.config_dir.join("agent.cfg")
    }

    fn dir_args(&self) -> Vec<String> {
        vec![
            "--cert-path".into(),
            self.cert_path.display().to_string(),
            "--config-dir".into(),
            self.config_dir.display().to_string(),
        ]
    }
}

fn register_args(port: u16, site: &Site, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--register-agent",
        "--pem-server",
        "127.0.0.1",
        "--pem-port",
        &port.to_string(),
        "--pem-user",
        ADMIN_USER,
    ]
    .map(String::from)
    .to_vec();
    a.extend(site.dir_args());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run(bed: &TestBed, args: &[String], env: &[(&str, &str)]) -> (i32, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut env = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "PEM_SERVER_PASSWORD") {
        env.push(("PEM_SERVER_PASSWORD", ADMIN_PASSWORD));
    }
    outcome(&bed.pemworker_env(&args, &env))
}

fn register(bed: &TestBed, site: &Site, extra: &[&str]) -> (i32, String, String) {
    run(bed, &register_args(bed.pgb_port, site, extra), &[])
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

async fn agent_rows(bed: &TestBed) -> Vec<(i32, bool, String)> {
    let su = bed.connect(&bed.superuser()).await;
    pool::query(
        &su,
        "agents",
        "SELECT id, active, display_name FROM pem.agent ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Logs in as the agent with exactly what agent.cfg says, and returns current_user.
async fn login_as_agent(config_file: &Path) -> Result<String, String> {
    let (_, id) = AgentConfig::load_with_document(config_file).map_err(|e| e.to_string())?;
    let settings = agent_settings(&id).map_err(|e| e.to_string())?;
    let client = connection::connect(&settings)
        .await
        .map_err(|e| e.to_string())?;
    let rows = pool::query(&client, "whoami", "SELECT current_user::text", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows[0].get(0))
}

fn verify(bed: &TestBed, site: &Site) -> (i32, String, String) {
    let mut a = vec!["--verify-registration".to_string()];
    a.extend(site.dir_args());
    // The agent's session takes sslmode and the root CA from agent.cfg, not from the environment.
    run(
        bed,
        &a,
        &[("PGSSLROOTCERT", "/nonexistent"), ("PGSSLMODE", "disable")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_flow_registers_through_pgbouncer() {
    let bed = TestBed::start();
    let site = Site::new(&bed, "host1");
    let (code, out, err) = register(
        &bed,
        &site,
        &[
            "--pem-agent-user",
            "pem_agent_user1",
            "--display-name",
            "Agent Name",
            "-o",
            "log_level=info",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("Postgres Enterprise Manager Agent registered successfully!"),
        "{out}"
    );

    // Files and modes.
    let key = site.cert_path.join("pem_agent_user1.key");
    let crt = site.cert_path.join("pem_agent_user1.crt");
    assert_eq!(mode(&site.cert_path), 0o700);
    assert_eq!(mode(&key), 0o600);
    assert!(crt.is_file());

    // agent.cfg: PEM's keys in PEM's order, the agent user, the pooler port, our override.
    let cfg_text = std::fs::read_to_string(site.config_file()).unwrap();
    assert!(cfg_text.starts_with("[PEM/agent]\n"), "{cfg_text}");
    let doc = Document::parse(&cfg_text);
    let keys: Vec<String> = doc.entries().iter().map(|e| e.key.to_string()).collect();
    let guide_keys: Vec<String> = keys::written().map(|(k, _)| k.to_string()).collect();
    assert_eq!(&keys[..guide_keys.len()], &guide_keys[..], "{cfg_text}");
    assert_eq!(doc.get("pem_port"), Some(bed.pgb_port.to_string().as_str()));
    assert_eq!(doc.get("pem_host"), Some("127.0.0.1"));
    assert_eq!(doc.get("agent_user"), Some("pem_agent_user1"));
    assert_eq!(
        doc.get("agent_ssl_key"),
        Some(key.display().to_string().as_str())
    );
    assert_eq!(
        doc.get("agent_ssl_crt"),
        Some(crt.display().to_string().as_str())
    );
    assert_eq!(doc.get("log_level"), Some("info"));
    // PEM's values for PEM's keys: the agent may restart servers unless told otherwise.
    assert_eq!(doc.get("allow_server_restart"), Some("true"));
    assert_eq!(doc.get("max_webhook_retries"), Some("3"));
    // The PEM server is verified as registration verified it: verify-full by default.
    assert_eq!(doc.get("pem_ssl_mode"), Some("verify-full"));
    assert_eq!(
        doc.get("pem_ssl_root_cert"),
        Some(bed.root_crt.display().to_string().as_str())
    );
    assert!(
        !cfg_text.contains(ADMIN_PASSWORD),
        "a password in agent.cfg"
    );
    let agent_id: i32 = doc.get("agent_id").unwrap().parse().unwrap();

    // The server has the row.
    let rows = agent_rows(&bed).await;
    assert_eq!(rows, vec![(agent_id, true, "Agent Name".to_string())]);

    // Our client logs in through pgBouncer with what agent.cfg says ...
    assert_eq!(
        login_as_agent(&site.config_file()).await.unwrap(),
        "pem_agent_user1"
    );
    // ... and so does libpq with the same files.
    let conninfo = bed.agent_conninfo("pem_agent_user1", &crt, &key);
    let (code, out, err) = outcome(&bed.psql(&conninfo, "SELECT current_user"));
    assert_eq!((code, out.trim()), (0, "pem_agent_user1"), "{err}");

    // --verify-registration: 0 while active, 3 once inactive.
    let (code, out, err) = verify(&bed, &site);
    assert_eq!(code, 0, "{out}{err}");
    let su = bed.connect(&bed.superuser()).await;
    pool::execute(
        &su,
        "deactivate",
        "UPDATE pem.agent SET active = false WHERE id = $1",
        &[(&agent_id, Type::INT4)],
    )
    .await
    .unwrap();
    let (code, _, err) = verify(&bed, &site);
    assert_eq!(code, 3, "{err}");

    // Without --pem-agent-user the agent gets its own agent<ID> role and files, and that role
    // logs in through pgBouncer too.
    let site2 = Site::new(&bed, "host2");
    let (code, out, err) = register(&bed, &site2, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let doc2 = Document::read(&site2.config_file()).unwrap();
    let id2 = doc2.get("agent_id").unwrap().to_string();
    let user2 = format!("agent{id2}");
    assert_eq!(doc2.get("agent_user"), Some(user2.as_str()));
    assert!(site2.cert_path.join(format!("{user2}.key")).is_file());
    assert_eq!(login_as_agent(&site2.config_file()).await.unwrap(), user2);

    // --unregister-agent: inactive on the server, agent.cfg set aside (a backup, not deleted).
    let mut a = vec![
        "--unregister-agent".to_string(),
        "--pem-user".into(),
        ADMIN_USER.into(),
    ];
    a.extend(site2.dir_args());
    let (code, out, err) = run(&bed, &a, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let id2: i32 = id2.parse().unwrap();
    assert!(
        agent_rows(&bed)
            .await
            .contains(&(id2, false, bed_host_name())),
        "{:?}",
        agent_rows(&bed).await
    );
    assert!(!site2.config_file().exists());
    let kept = std::fs::read_dir(&site2.config_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".bak")
        })
        .count();
    assert_eq!(kept, 1);
    assert_eq!(
        verify(&bed, &site2).0,
        1,
        "no agent.cfg any more: a configuration problem"
    );
}

/// The display name registration gives by default: this host's name.
fn bed_host_name() -> String {
    pemworker::cli::host_fqdn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_registrations_at_once_all_succeed_with_distinct_ids() {
    let bed = TestBed::start();
    let sites: Vec<Site> = (0..20)
        .map(|i| Site::new(&bed, &format!("host{i}")))
        .collect();
    let children: Vec<_> = sites
        .iter()
        .enumerate()
        .map(|(i, site)| {
            let name = format!("agent host {i}");
            let args = register_args(
                bed.pgb_port,
                site,
                &[
                    "--pem-agent-user",
                    "pem_agent_user1",
                    "--display-name",
                    &name,
                ],
            );
            std::process::Command::new(env!("CARGO_BIN_EXE_pemworker"))
                .args(&args)
                .env("HOME", &bed.home)
                .env("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)
                .env("PGSSLMODE", "verify-full")
                .env("PGSSLROOTCERT", &bed.root_crt)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    for (child, site) in children.into_iter().zip(&sites) {
        let (code, out, err) = outcome(&child.wait_with_output().unwrap());
        assert_eq!(code, 0, "{out}{err}");
        ids.push(
            Document::read(&site.config_file())
                .unwrap()
                .get("agent_id")
                .unwrap()
                .parse::<i32>()
                .unwrap(),
        );
    }
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 20, "{ids:?}");
    assert_eq!(agent_rows(&bed).await.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_an_agent_keeps_its_id_and_keys_and_a_wrong_port_rolls_back() {
    let bed = TestBed::start();
    // An agent registered before the pooler: directly on PostgreSQL, with its own agent<ID>.
    let site = Site::new(&bed, "old");
    let (code, out, err) = run(&bed, &register_args(bed.pg_port, &site, &[]), &[]);
    assert_eq!(code, 0, "{out}{err}");
    let mut cfg = std::fs::read_to_string(site.config_file()).unwrap();
    cfg.push_str("# a site comment\nmy_site_setting=42\n");
    std::fs::write(site.config_file(), &cfg).unwrap();
    let before = Document::parse(&cfg);
    let agent_id = before.get("agent_id").unwrap().to_string();
    let old_key = before.get("agent_ssl_key").unwrap().to_string();

    let mut args: Vec<String> = [
        "--migrate-to-pooler",
        "--pem-port",
        &bed.pgb_port.to_string(),
        "--pem-agent-user",
        "pem_agent_user1",
        "--pem-user",
        ADMIN_USER,
    ]
    .map(String::from)
    .to_vec();
    args.extend(site.dir_args());
    let (code, out, err) = run(&bed, &args, &[]);
    assert_eq!(code, 0, "{out}{err}");

    let after = Document::read(&site.config_file()).unwrap();
    assert_eq!(after.get("agent_id"), Some(agent_id.as_str()));
    assert_eq!(after.get("agent_user"), Some("pem_agent_user1"));
    assert_eq!(
        after.get("pem_port"),
        Some(bed.pgb_port.to_string().as_str())
    );
    assert_eq!(after.get("my_site_setting"), Some("42"));
    assert!(after.render().contains("# a site comment\n"));
    // Every key keeps its place; agent_user comes right after agent_id.
    let order = |d: &Document| {
        d.entries()
            .iter()
            .map(|e| e.key.to_string())
            .collect::<Vec<_>>()
    };
    let mut expected = order(&before);
    if !expected.contains(&"agent_user".to_string()) {
        let at = expected.iter().position(|k| k == "agent_id").unwrap() + 1;
        expected.insert(at, "agent_user".into());
    }
    assert_eq!(order(&after), expected);
    // Backups of agent.cfg, the old key and the old certificate.
    let backups = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".bak"))
            .collect()
    };
    let cfg_backups = backups(&site.config_dir);
    assert_eq!(cfg_backups.len(), 1);
    assert_eq!(
        std::fs::read_to_string(site.config_dir.join(&cfg_backups[0])).unwrap(),
        cfg
    );
    assert_eq!(
        backups(&site.cert_path).len(),
        2,
        "key and certificate backups"
    );
    assert!(Path::new(&old_key).exists(), "the old key is left in place");
    // Still one agent row, and the agent logs in through pgBouncer.
    assert_eq!(agent_rows(&bed).await.len(), 1);
    assert_eq!(
        login_as_agent(&site.config_file()).await.unwrap(),
        "pem_agent_user1"
    );
    assert_eq!(verify(&bed, &site).0, 0);

    // A second agent pointed at a wrong pooler port (reusing the agent user's files, as the
    // guide describes): the login check fails, agent.cfg is put back, and the error says why.
    let site2 = Site::new(&bed, "old2");
    let (code, _, err) = run(&bed, &register_args(bed.pg_port, &site2, &[]), &[]);
    assert_eq!(code, 0, "{err}");
    let cfg2 = std::fs::read_to_string(site2.config_file()).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args: Vec<String> = [
        "--migrate-to-pooler",
        "--pem-port",
        &closed.to_string(),
        "--pem-agent-user",
        "pem_agent_user1",
        "--agent-ssl-crt",
        after.get("agent_ssl_crt").unwrap(),
        "--agent-ssl-key",
        after.get("agent_ssl_key").unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(site2.dir_args());
    let (code, out, err) = run(&bed, &args, &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot log in through the pooler") && err.contains("restored"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(site2.config_file()).unwrap(), cfg2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_registration_keeps_the_agent_id_and_retires_the_duplicate() {
    let bed = TestBed::start();
    let site = Site::new(&bed, "host");
    let (code, _, err) = register(
        &bed,
        &site,
        &[
            "--pem-agent-user",
            "pem_agent_user1",
            "--display-name",
            "web1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let first = Document::read(&site.config_file())
        .unwrap()
        .get("agent_id")
        .unwrap()
        .parse::<i32>()
        .unwrap();
    // The guide's trap: a plain self-registration elsewhere on the same host makes a new id.
    let stray = Site::new(&bed, "stray");
    assert_eq!(
        register(
            &bed,
            &stray,
            &[
                "--pem-agent-user",
                "pem_agent_user1",
                "--display-name",
                "web1"
            ]
        )
        .0,
        0
    );
    let second = Document::read(&stray.config_file())
        .unwrap()
        .get("agent_id")
        .unwrap()
        .parse::<i32>()
        .unwrap();
    assert_ne!(first, second);
    // PEM 10's sections in the agent.cfg being replaced are kept.
    let sections = "[WEBHOOK/ops]\nwebhook_ssl_crt=/etc/pem/ops.crt\n[BARMAN/1]\nssl_crt=/etc/pem/barman.crt\n";
    let mut before = std::fs::read_to_string(site.config_file()).unwrap();
    before.push_str(sections);
    std::fs::write(site.config_file(), before).unwrap();

    let (code, out, err) = register(
        &bed,
        &site,
        &[
            "--pem-agent-user",
            "pem_agent_user1",
            "--display-name",
            "web1",
            "--force-registration",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        Document::read(&site.config_file()).unwrap().get("agent_id"),
        Some(first.to_string().as_str())
    );
    let after = std::fs::read_to_string(site.config_file()).unwrap();
    assert!(after.ends_with(&format!("\n\n{sections}")), "{after}");
    assert_eq!(
        agent_rows(&bed).await,
        vec![
            (first, true, "web1".to_string()),
            (second, false, "web1".to_string())
        ]
    );
    let baks = std::fs::read_dir(&site.config_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".bak")
        })
        .count();
    assert_eq!(baks, 1, "agent.cfg backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_in_one_line_with_its_exit_code_and_leaves_nothing() {
    let bed = TestBed::start();
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "plain user",
        "CREATE ROLE plain_user LOGIN PASSWORD 'plain pw'",
    )
    .await
    .unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // An existing agent.cfg that must survive untouched.
    let existing = Site::new(&bed, "existing");
    std::fs::create_dir_all(&existing.config_dir).unwrap();
    std::fs::write(existing.config_file(), "[PEM/agent]\nagent_id=7\n").unwrap();

    let agent_rows_before = agent_rows(&bed).await;
    let roles_before = bed.role_names().await;
    let agent = ["--pem-agent-user", "pem_agent_user1"];
    struct Case {
        name: &'static str,
        args: Vec<String>,
        env: Vec<(&'static str, String)>,
        code: i32,
        says: &'static str,
    }
    let site_for = |name: &str| Site::new(&bed, name);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut cases = vec![
        Case {
            name: "wrong password",
            args: register_args(bed.pgb_port, &site_for("c1"), &agent),
            env: vec![("PEM_SERVER_PASSWORD", "wrong".into())],
            code: 2,
            says: "pem_admin1",
        },
        Case {
            name: "unreachable host",
            args: {
                let mut a = register_args(bed.pgb_port, &site_for("c2"), &agent);
                a[2] = "no-such-host.invalid".into();
                a
            },
            env: vec![],
            code: 2,
            says: "no-such-host.invalid",
        },
        Case {
            name: "closed port",
            args: register_args(closed, &site_for("c3"), &agent),
            env: vec![],
            code: 2,
            says: "127.0.0.1:",
        },
        Case {
            name: "admin without pem_admin",
            args: {
                let mut a = register_args(bed.pg_port, &site_for("c4"), &agent);
                a[6] = "plain_user".into();
                a
            },
            env: vec![("PEM_SERVER_PASSWORD", "plain pw".into())],
            code: 4,
            says: "GRANT pem_admin TO plain_user",
        },
        Case {
            name: "server refuses the CSR",
            args: register_args(
                bed.pgb_port,
                &site_for("c5"),
                &["--pem-agent-user", "postgres"],
            ),
            env: vec![],
            code: 4,
            says: "not a PEM agent user",
        },
        Case {
            name: "unwritable cert path",
            args: {
                let mut a = register_args(bed.pgb_port, &site_for("c6"), &agent);
                let at = a.iter().position(|x| x == "--cert-path").unwrap() + 1;
                a[at] = "/proc/pemworker-certs".into();
                a
            },
            env: vec![],
            code: 5,
            says: "/proc/pemworker-certs",
        },
        Case {
            name: "existing agent.cfg",
            args: register_args(bed.pgb_port, &existing, &agent),
            env: vec![],
            code: 1,
            says: "--force-registration",
        },
        Case {
            name: "invalid agent user",
            args: register_args(
                bed.pgb_port,
                &site_for("c8"),
                &["--pem-agent-user", "bad name;"],
            ),
            env: vec![],
            code: 1,
            says: "agent user name",
        },
        Case {
            name: "no root certificate to verify the server with (the default verify-full)",
            args: register_args(bed.pgb_port, &site_for("c11"), &[]),
            env: vec![("PGSSLROOTCERT", String::new())],
            code: 1,
            says: "needs the root certificate that signed the server's certificate: pass --pem-ssl-root-cert FILE",
        },
        Case {
            name: "an sslmode libpq does not know",
            args: register_args(
                bed.pgb_port,
                &site_for("c12"),
                &["--pem-ssl-mode", "verify_full"],
            ),
            env: vec![],
            code: 1,
            says: "invalid sslmode \"verify_full\"",
        },
        Case {
            name: "malformed -o",
            args: register_args(bed.pgb_port, &site_for("c9"), &["-o", "log_level"]),
            env: vec![],
            code: 1,
            says: "key=value",
        },
    ];
    // The guide's own example, exactly as printed (its line breaks lost the server address and
    // --pem-agent-user), with its environment.
    let guide_site = site_for("c10");
    let mut guide_args = s(&[
        "--register-agent",
        "--pem-server",
        "pem_agent_user1",
        "--display-name",
        "Agent Name",
    ]);
    guide_args.extend(guide_site.dir_args());
    cases.push(Case {
        name: "the guide's example command",
        args: guide_args,
        env: vec![
            ("PGSSLMODE", "require".into()),
            ("PEM_SERVER_PASSWORD", "pem_admin1_password".into()),
        ],
        code: 1,
        says: "--pem-user",
    });

    for c in &cases {
        let env: Vec<(&str, &str)> = c.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, out, err) = run(&bed, &c.args, &env);
        eprintln!("{} -> exit {code}: {}", c.name, err.trim_end());
        assert_eq!(
            code, c.code,
            "{}: exit code; stdout {out} stderr {err}",
            c.name
        );
        assert_eq!(err.lines().count(), 1, "{}: one line, got {err}", c.name);
        assert!(err.contains(c.says), "{}: {err}", c.name);
        assert!(out.is_empty(), "{}: {out}", c.name);
        let site = c
            .args
            .iter()
            .position(|x| x == "--config-dir")
            .map(|i| PathBuf::from(&c.args[i + 1]))
            .unwrap();
        if site != existing.config_dir {
            assert!(!site.exists(), "{}: left {}", c.name, site.display());
            let cert =
                PathBuf::from(&c.args[c.args.iter().position(|x| x == "--cert-path").unwrap() + 1]);
            assert!(
                !cert.exists() || cert.starts_with("/proc"),
                "{}: left {}",
                c.name,
                cert.display()
            );
        }
        assert_eq!(
            agent_rows(&bed).await,
            agent_rows_before,
            "{}: agent rows",
            c.name
        );
        assert_eq!(bed.role_names().await, roles_before, "{}: roles", c.name);
    }
    assert_eq!(
        std::fs::read_to_string(existing.config_file()).unwrap(),
        "[PEM/agent]\nagent_id=7\n"
    );
}

/// Registrations take turns on pem.agent_role. One that waits longer than lock_timeout while
/// other registrations get through (many at once straight to PostgreSQL, with no pool to queue
/// them) tries again and succeeds; one behind a lock that nobody gets through fails in one
/// line (server_trust.rs, registration_is_not_held_up_by_agents_and_a_slow_lock_is_one_line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_that_waits_while_others_get_through_tries_again_and_succeeds() {
    let bed = TestBed::start();
    let holder = bed.connect(&bed.superuser()).await;
    pool::batch(
        &holder,
        "lock",
        "BEGIN; LOCK TABLE pem.agent_role IN ACCESS EXCLUSIVE MODE",
    )
    .await
    .unwrap();
    let site = Site::new(&bed, "patient");
    let args = register_args(bed.pg_port, &site, &[]);
    let started = std::time::Instant::now();
    // Meanwhile, on the runtime's other thread: another registration commits while this one
    // waits, and the lock is free again after this one's first lock_timeout (10 s).
    let su = bed.superuser();
    let others = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        let other = connection::connect(&su).await.unwrap();
        pool::batch(
            &other,
            "another registration",
            "INSERT INTO pem.agent (display_name) VALUES ('another host')",
        )
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(9)).await;
        pool::batch(&holder, "unlock", "COMMIT").await.unwrap();
    });
    let (code, out, err) = tokio::task::block_in_place(|| run(&bed, &args, &[]));
    others.await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        started.elapsed() > std::time::Duration::from_secs(10),
        "it waited past lock_timeout: {:?}",
        started.elapsed()
    );
    let cfg = Document::read(&site.config_file()).unwrap();
    let id: i32 = cfg.get("agent_id").unwrap().parse().unwrap();
    assert_eq!(
        bed.scalar_i64(&format!(
            "SELECT count(*) FROM pem.agent WHERE id = {id} AND active"
        ))
        .await,
        1
    );
}
