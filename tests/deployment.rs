//! The deployment commands the README's walk-through uses (tests/walkthrough.rs runs the
//! walk-through itself), at their edges: the PEM CA made once and never replaced,
//! pgBouncer's server certificate, binding and unbinding a pgBouncer, and moving a running
//! agent onto the pooler.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{
    ADMIN_PASSWORD, ADMIN_USER, STATS_PASSWORD, STATS_USER, TestBed, last_heartbeat, outcome,
    wait_for,
};
use pemworker::connection::pool;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(bed: &TestBed, args: &[String], env: &[(&str, &str)]) -> (i32, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    outcome(&bed.pemworker_env(&args, env))
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn openssl(args: &[&str]) -> (i32, String, String) {
    outcome(
        &Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl (apt-get install openssl)"),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn owner_name(p: &Path) -> String {
    let uid = std::fs::metadata(p).unwrap().uid();
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .unwrap()
        .unwrap()
        .name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_server_makes_the_pem_ca_once_and_pgbouncer_gets_a_certificate_from_it() {
    let bed = TestBed::start_postgres_only();
    // A server without a PEM CA (the bed made one for its own TLS files; it goes).
    let ca_files = ["ca_certificate.crt", "ca_key.key", "root.crt"].map(|f| bed.data_dir.join(f));
    // The server's own certificate stays, and so the root that verifies it, kept elsewhere.
    let server_root = bed.home.join("server-root.crt");
    std::fs::copy(&bed.root_crt, &server_root).unwrap();
    for f in &ca_files {
        std::fs::remove_file(f).unwrap();
    }
    let server_root = server_root.display().to_string();
    let env = [("PGSSLROOTCERT", server_root.as_str())];
    let (code, out, err) = run(&bed, &bed.prepare_args(), &env);
    assert_eq!(code, 0, "{out}{err}");
    for f in &ca_files {
        assert!(
            out.contains(&format!("created the PEM CA's {}", f.display())),
            "{out}"
        );
        assert_eq!(owner_name(f), bed.os_user());
    }
    let [cert, key, root] = &ca_files;
    assert_eq!(mode(key), 0o600);
    assert_eq!((mode(cert), mode(root)), (0o644, 0o644));
    assert_eq!(
        std::fs::read(cert).unwrap(),
        std::fs::read(root).unwrap(),
        "root.crt is the CA certificate"
    );
    let (_, text, _) = openssl(&[
        "x509",
        "-in",
        &cert.display().to_string(),
        "-noout",
        "-ext",
        "basicConstraints,keyUsage",
    ]);
    assert!(
        text.contains("CA:TRUE") && text.contains("Certificate Sign"),
        "{text}"
    );
    // The key is the certificate's.
    let pubkey = |args: &[&str]| openssl(args).1;
    assert_eq!(
        pubkey(&["pkey", "-in", &key.display().to_string(), "-pubout"]),
        pubkey(&[
            "x509",
            "-in",
            &cert.display().to_string(),
            "-noout",
            "-pubkey"
        ])
    );

    // Again: the CA is kept as it is.
    let before: Vec<Vec<u8>> = ca_files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let (code, out, err) = run(&bed, &bed.prepare_args(), &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with("nothing to change\n"), "{out}");
    assert!(out.contains("exists; kept as it is"), "{out}");
    let after: Vec<Vec<u8>> = ca_files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert_eq!(before, after);

    // pgBouncer's certificate from it, for the names agents dial.
    let dir = bed.home.join("pgbouncer-tls");
    let (crt, pkey) = (dir.join("server.crt"), dir.join("server.key"));
    let issue = |extra: &[&str]| {
        let mut a = strings(&[
            "pooler",
            "server-certificate",
            "--data-dir",
            &bed.data_dir.display().to_string(),
            "--cert-file",
            &crt.display().to_string(),
            "--key-file",
            &pkey.display().to_string(),
            "--owner",
            &bed.os_user(),
        ]);
        a.extend(strings(extra));
        run(&bed, &a, &[])
    };
    let names = ["--dns-name", "pem.example", "--ip-address", "127.0.0.1"];
    let (code, out, err) = issue(&names);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("for pem.example, 127.0.0.1"), "{out}");
    let (code, text, err) = openssl(&[
        "verify",
        "-CAfile",
        &root.display().to_string(),
        "-purpose",
        "sslserver",
        &crt.display().to_string(),
    ]);
    assert_eq!(code, 0, "{text}{err}");
    let (_, text, _) = openssl(&[
        "x509",
        "-in",
        &crt.display().to_string(),
        "-noout",
        "-ext",
        "subjectAltName,basicConstraints,extendedKeyUsage",
    ]);
    for want in [
        "DNS:pem.example",
        "IP Address:127.0.0.1",
        "CA:FALSE",
        "TLS Web Server Authentication",
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
    assert_eq!(mode(&pkey), 0o600);
    assert_eq!(
        (owner_name(&pkey), owner_name(&crt)),
        (bed.os_user(), bed.os_user())
    );
    assert_eq!(mode(&dir), 0o700);
    // libpq verifies a server with it by name and by address.
    let (_, text, _) = openssl(&[
        "verify",
        "-CAfile",
        &root.display().to_string(),
        "-verify_hostname",
        "pem.example",
        &crt.display().to_string(),
    ]);
    assert!(text.contains(": OK"), "{text}");

    // Existing files are replaced only with --force, after a backup.
    let first = std::fs::read(&crt).unwrap();
    let (code, _, err) = issue(&names);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("already exists; rerun with --force"), "{err}");
    assert_eq!(std::fs::read(&crt).unwrap(), first);
    let mut forced = names.to_vec();
    forced.push("--force");
    let (code, out, err) = issue(&forced);
    assert_eq!(code, 0, "{out}{err}");
    assert_ne!(std::fs::read(&crt).unwrap(), first);
    assert_eq!(out.matches("backup: ").count(), 2, "{out}");
    // A link planted at the key's name is not followed (and not replaced): one line, the file
    // it points to untouched.
    let victim = bed.home.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::remove_file(&pkey).unwrap();
    std::os::unix::fs::symlink(&victim, &pkey).unwrap();
    let (code, _, err) = issue(&forced);
    assert_ne!(code, 0, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(
        std::fs::symlink_metadata(&pkey)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    std::fs::remove_file(&pkey).unwrap();
    let (code, out, err) = issue(&forced);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(mode(&pkey), 0o600);
    // Bad input: one line, nothing written.
    for (extra, says) in [
        (vec!["--force"], "--dns-name NAME and/or --ip-address"),
        (vec!["--force", "--dns-name", "bad name"], "--dns-name"),
        (
            vec!["--force", "--dns-name", "x.example", "--days", "0"],
            "--days",
        ),
    ] {
        let now = std::fs::read(&crt).unwrap();
        let (code, _, err) = issue(&extra);
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(says), "{extra:?}: {err}");
        assert_eq!(std::fs::read(&crt).unwrap(), now);
    }
    let mut a = strings(&["pooler", "server-certificate", "--data-dir"]);
    a.push(bed.home.display().to_string());
    a.extend(strings(&names));
    a.extend(strings(&[
        "--cert-file",
        "/nonexistent/x.crt",
        "--key-file",
        "/nonexistent/x.key",
    ]));
    let (code, _, err) = run(&bed, &a, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("ca_certificate.crt") && err.contains("--data-dir"),
        "{err}"
    );

    // A CA with one of its two files missing is not replaced by a new one: one line, and the
    // certificate stays.
    std::fs::rename(key, bed.home.join("ca_key.key.aside")).unwrap();
    let (code, out, err) = run(&bed, &bed.prepare_args(), &env);
    assert_eq!(code, 4, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("the PEM CA is incomplete"), "{err}");
    assert!(!key.exists());
    assert_eq!(std::fs::read(cert).unwrap(), before[0]);
}

fn bind_args(bed: &TestBed, cfg: &Path, mode: &str, extra: &[&str]) -> Vec<String> {
    let mut a = strings(&[
        "pooler",
        mode,
        "--pgbouncer-host",
        "127.0.0.1",
        "--pgbouncer-port",
        &bed.pgb_port.to_string(),
        "--pem-user",
        ADMIN_USER,
        "--config-dir",
        &cfg.parent().unwrap().display().to_string(),
    ]);
    a.extend(strings(extra));
    a
}

async fn count(su: &Client, sql: &str, agent: i32) -> i64 {
    pool::query_value(su, sql, sql, &[(&agent, Type::INT4)])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_pgbouncer_is_probed_with_its_password_only_on_the_agent_host_until_unbound() {
    let bed = TestBed::start();
    let (cfg, agent) = bed.register_agent("agent");
    let su = bed.connect(&bed.superuser()).await;
    let pgpass = bed.home.join(".pgpass");
    let record = pemworker::targets::file_for(&cfg);
    let bindings = "SELECT count(*) FROM pem.agent_pgbouncer_binding WHERE agent_id = $1";
    let admin = ("PEM_SERVER_PASSWORD", ADMIN_PASSWORD);

    // A wrong console password: the login is tried first, so nothing is recorded anywhere.
    let (code, out, err) = run(
        &bed,
        &bind_args(&bed, &cfg, "bind", &[]),
        &[admin, ("PEMWORKER_STATS_USER_PASSWORD", "wrong")],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("pgBouncer's console") && err.contains(STATS_USER),
        "{err}"
    );
    assert_eq!(count(&su, bindings, agent).await, 0);
    assert!(!pgpass.exists() && !record.exists());

    let stats = ("PEMWORKER_STATS_USER_PASSWORD", STATS_PASSWORD);
    let (code, out, err) = run(&bed, &bind_args(&bed, &cfg, "bind", &[]), &[admin, stats]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("bound to agent"), "{out}");
    assert_eq!(count(&su, bindings, agent).await, 1);
    assert_eq!(mode(&pgpass), 0o600);
    let line = format!(
        "127.0.0.1:{}:pgbouncer:{STATS_USER}:{}",
        bed.pgb_port,
        pemworker::secret::pgpass_escape(STATS_PASSWORD)
    );
    assert!(std::fs::read_to_string(&pgpass).unwrap().contains(&line));
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(
        text.contains("\"pgbouncer\"")
            && text.contains("\"verify-full\"")
            && text.contains(&bed.root_crt.display().to_string())
            && !text.contains(STATS_PASSWORD),
        "{text}"
    );
    // The password is nowhere on the PEM server.
    let n: i64 = pool::query_value(
        &su,
        "scan",
        "SELECT count(*) FROM pem.agent_pgbouncer_binding b WHERE b::text LIKE '%' || $1 || '%'",
        &[(&STATS_PASSWORD, Type::TEXT)],
    )
    .await
    .unwrap();
    assert_eq!(n, 0);
    // Twice: only with --force.
    let (code, _, err) = run(&bed, &bind_args(&bed, &cfg, "bind", &[]), &[admin, stats]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("already bound") && err.contains("--force"),
        "{err}"
    );
    let (code, out, err) = run(
        &bed,
        &bind_args(&bed, &cfg, "bind", &["--force"]),
        &[admin, stats],
    );
    assert_eq!(code, 0, "{out}{err}");

    // The worker, at the default log level, says once how it runs, and probes pgBouncer
    // through the statistics user with the password from ~/.pgpass.
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let log = site.join("worker.log");
    let worker = Running(bed.start_worker(
        &cfg,
        &[
            ("state_dir", site.join("state").display().to_string()),
            ("log_location", log.display().to_string()),
            ("short_wait", "1".into()),
        ],
    ));
    let pools = "SELECT count(*) FROM pemhistory.pgbouncer_pools WHERE agent_id = $1";
    wait_for("pgBouncer samples", Duration::from_secs(60), || async {
        count(&su, pools, agent).await > 0
    })
    .await;
    wait_for("the start line", Duration::from_secs(10), || async {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("running as"))
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let start: Vec<&str> = text.lines().filter(|l| l.contains("running as")).collect();
    assert_eq!(start.len(), 1, "{text}");
    assert!(
        start[0].contains(&format!(
            "agent {agent} running as pem_agent_user1 on 127.0.0.1:{} (through a connection pooler)",
            bed.pgb_port
        )) && start[0].contains("on 1 pgBouncer"),
        "{}",
        start[0]
    );
    assert!(
        !text
            .lines()
            .any(|l| l.contains(" INFO ") && !l.contains("running as")),
        "only the start line at the default level:\n{text}"
    );
    assert!(!text.contains(STATS_PASSWORD));
    drop(worker);

    // Unbound: the binding, the record and the password go.
    let (code, out, err) = run(&bed, &bind_args(&bed, &cfg, "unbind", &[]), &[admin]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(count(&su, bindings, agent).await, 0);
    assert!(
        !std::fs::read_to_string(&pgpass)
            .unwrap()
            .contains(STATS_USER)
    );
    assert!(
        !std::fs::read_to_string(&record)
            .unwrap()
            .contains("pgbouncer")
    );
    let (code, _, err) = run(&bed, &bind_args(&bed, &cfg, "unbind", &[]), &[admin]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no pgBouncer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_moved_onto_the_pooler_reloads_and_its_dedicated_role_is_retired() {
    let bed = TestBed::start();
    // An agent registered with its own agent<ID> role, as PEM registers agents by default.
    let site = bed.home.join("old");
    let (cert_path, config_dir) = (site.join(".pem"), site.join("etc"));
    let dirs = strings(&[
        "--cert-path",
        &cert_path.display().to_string(),
        "--config-dir",
        &config_dir.display().to_string(),
    ]);
    let mut reg = strings(&[
        "--register-agent",
        "--pem-server",
        "127.0.0.1",
        "--pem-port",
        &bed.pgb_port.to_string(),
        "--pem-user",
        ADMIN_USER,
    ]);
    reg.extend(dirs.clone());
    let admin = ("PEM_SERVER_PASSWORD", ADMIN_PASSWORD);
    let (code, out, err) = run(&bed, &reg, &[admin]);
    assert_eq!(code, 0, "{out}{err}");
    let cfg = config_dir.join("agent.cfg");
    let agent = common::agent_config(&cfg).agent_id;
    let role = format!("agent{agent}");
    let old_files: Vec<PathBuf> = ["key", "crt"]
        .iter()
        .map(|e| cert_path.join(format!("{role}.{e}")))
        .collect();
    assert!(old_files.iter().all(|f| f.exists()));
    let su = bed.connect(&bed.superuser()).await;
    pool::execute(
        &su,
        "interval",
        "UPDATE pem.agent SET heartbeat_interval = 1 WHERE id = $1",
        &[(&agent, Type::INT4)],
    )
    .await
    .unwrap();
    // In agent.cfg, where the migration finds the worker's state directory (and its pid).
    let log = site.join("worker.log");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "state_dir={}\nlog_location={}\nlog_level=info\n",
        site.join("state").display(),
        log.display()
    ));
    std::fs::write(&cfg, text).unwrap();
    let worker = Running(bed.start_worker(&cfg, &[]));
    wait_for("heartbeats", Duration::from_secs(30), || async {
        last_heartbeat(&su, agent).await > 0.0
    })
    .await;

    // The flag is checked before anything changes: a shared agent user is not retired.
    let (shared_cfg, _) = bed.register_agent("shared");
    let mut bad = strings(&[
        "--migrate-to-pooler",
        "--pem-port",
        &bed.pgb_port.to_string(),
        "--pem-agent-user",
        "pem_agent_user2",
        "--pem-user",
        ADMIN_USER,
        "--retire-dedicated-role",
        "--config-dir",
        &shared_cfg.parent().unwrap().display().to_string(),
    ]);
    bad.extend(strings(&[
        "--cert-path",
        &bed.home.join("shared/.pem").display().to_string(),
    ]));
    let before = std::fs::read_to_string(&shared_cfg).unwrap();
    let (code, _, err) = run(&bed, &bad, &[admin]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not as its dedicated role"), "{err}");
    assert_eq!(std::fs::read_to_string(&shared_cfg).unwrap(), before);

    let mut migrate = strings(&[
        "--migrate-to-pooler",
        "--pem-port",
        &bed.pgb_port.to_string(),
        "--pem-agent-user",
        "pem_agent_user1",
        "--pem-user",
        ADMIN_USER,
        "--retire-dedicated-role",
    ]);
    migrate.extend(dirs);
    let (code, out, err) = run(&bed, &migrate, &[admin]);
    assert_eq!(code, 0, "{out}{err}");
    let migrated_at =
        pool::query_value::<f64>(&su, "now", "SELECT extract(epoch FROM now())::float8", &[])
            .await
            .unwrap();
    for want in [
        format!("the PEM server records pem_agent_user1 as agent {agent}'s user"),
        format!("dropped the dedicated role {role}"),
        format!("told the running worker (pid {}) to reload", worker.0.id()),
    ] {
        assert!(out.contains(&want), "{want:?} not in {out}");
    }
    // The agent's row, the role, the old key and certificate (and their backups).
    let user: String = pool::query_value(
        &su,
        "agent_user",
        "SELECT agent_user::text FROM pem.agent WHERE id = $1",
        &[(&agent, Type::INT4)],
    )
    .await
    .unwrap();
    assert_eq!(user, "pem_agent_user1");
    assert!(!bed.role_names().await.contains(&role));
    for f in &old_files {
        assert!(!f.exists(), "{} is still there", f.display());
        assert!(out.contains(&format!("removed {}", f.display())), "{out}");
    }
    let left: Vec<String> = std::fs::read_dir(&cert_path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // The write secret belongs to the agent id and stays.
    assert!(
        !left
            .iter()
            .any(|n| n.starts_with(&format!("{role}.key")) || n.starts_with(&format!("{role}.crt"))),
        "{left:?}"
    );
    assert!(left.contains(&format!("{role}.secret")), "{left:?}");
    // The running worker reloaded and heartbeats through pgBouncer as the new user (its old
    // role is gone, so no other login could do it).
    wait_for(
        "heartbeats after the move",
        Duration::from_secs(30),
        || async { last_heartbeat(&su, agent).await > migrated_at + 1.0 },
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("reconnecting with the new connection settings"),
        "{text}"
    );
    drop(worker);

    // Without a running worker the command says how to start it.
    let (code, out, err) = run(
        &bed,
        &strings(&[
            "--migrate-to-pooler",
            "--pem-port",
            &bed.pgb_port.to_string(),
            "--pem-agent-user",
            "pem_agent_user1",
            "--pem-user",
            ADMIN_USER,
            "--force-registration",
            "--cert-path",
            &cert_path.display().to_string(),
            "--config-dir",
            &config_dir.display().to_string(),
        ]),
        &[admin],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no worker runs with"), "{out}");
}
