//! An agent.cfg as PEM 10 and its tooling write it, against the test bed: PEM's registration
//! keys and values, the keys PEM knows that this agent does not implement, a PKCS#1 RSA agent
//! key made with `openssl genrsa -traditional` and signed by the PEM CA with `openssl x509
//! -req` (EDB's manual certificate recipe), certificate paths relative to the configuration
//! directory, a `[WEBHOOK/...]` and a `[BARMAN/...]` section, `connect_timeout=0`, a
//! `pem_host`/`pem_port` pair of lists and PEM's value spellings. `--check-config` passes it
//! with no warning, and the worker runs with it from another directory: its heartbeats are
//! stored on the PEM server.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{TestBed, outcome, wait_for};
use pemworker::connection::pool;
use tokio_postgres::types::Type;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cfg_as_pem_10_writes_it_passes_check_config_and_runs() {
    let bed = TestBed::start();
    // The agent's row, role and secret come from a registration; everything else is replaced
    // by what PEM 10 and its tooling write.
    let (cfg, id) = bed.register_agent("pem10");
    let registered = common::agent_config(&cfg);
    let secret = registered
        .agent_secret_file
        .clone()
        .expect("registration writes agent_secret_file");
    std::fs::remove_file(&registered.agent_ssl_key).unwrap();
    std::fs::remove_file(&registered.agent_ssl_crt).unwrap();

    // EDB's manual recipe: genrsa, a CSR for the agent user, x509 -req with the PEM CA of the
    // server's data directory.
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let certs = site.join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (key, csr, crt) = (
        certs.join("pem_agent_user1.key"),
        certs.join("pem_agent_user1.csr"),
        certs.join("pem_agent_user1.crt"),
    );
    let p = |p: &Path| p.display().to_string();
    openssl(&["genrsa", "-traditional", "-out", &p(&key), "2048"]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    openssl(&[
        "req",
        "-new",
        "-key",
        &p(&key),
        "-subj",
        "/CN=pem_agent_user1",
        "-out",
        &p(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-days",
        "365",
        "-in",
        &p(&csr),
        "-CA",
        &p(&bed.data_dir.join("ca_certificate.crt")),
        "-CAkey",
        &p(&bed.data_dir.join("ca_key.key")),
        "-set_serial",
        "4242",
        "-out",
        &p(&crt),
    ]);
    let key_text = std::fs::read_to_string(&key).unwrap();
    assert!(
        key_text.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "openssl genrsa -traditional writes PKCS#1: {key_text:.40}"
    );

    // The first host:port refuses connections; the second is the bed's pgBouncer.
    let log = site.join("worker.log");
    let text = format!(
        "[PEM/agent]\n\
         pem_host=127.0.0.1,127.0.0.1\n\
         pem_port={dead},{pgb}\n\
         agent_id={id}\n\
         agent_user=pem_agent_user1\n\
         agent_ssl_key=../certs/pem_agent_user1.key\n\
         agent_ssl_crt=../certs/pem_agent_user1.crt\n\
         log_level=WARNING\n\
         log_location={log}\n\
         agent_log_location=/var/log/pem/agent.log\n\
         long_wait=30\n\
         short_wait=10\n\
         alert_threads=0\n\
         enable_smtp=false\n\
         enable_snmp=False\n\
         enable_webhook=false\n\
         max_webhook_retries=3\n\
         allow_server_restart=TRUE\n\
         allow_package_management=false\n\
         allow_streaming_replication=false\n\
         max_connections=0\n\
         connect_timeout=0\n\
         connection_lifetime=0\n\
         allow_batch_probes=false\n\
         heartbeat_connection=no\n\
         enable_nagios=false\n\
         alert_reconnect_delay=30\n\
         connection_custom_setup=\n\
         agent_conn_string=\n\
         pem_ssl_mode=verify-CA\n\
         allow_insecure_webhooks=false\n\
         ca_file=/etc/ssl/certs/ca-certificates.crt\n\
         agent_secret_file={secret}\n\
         \n\
         [WEBHOOK/ops-alerts]\n\
         webhook_ssl_crt=../certs/webhook.crt\n\
         webhook_ssl_key=../certs/webhook.key\n\
         webhook_ssl_ca_crt=/etc/ssl/certs/ca-certificates.crt\n\
         allow_insecure_webhooks=false\n\
         \n\
         [BARMAN/1]\n\
         ssl_crt=/root/.pem/barman.crt\n\
         ssl_key=/root/.pem/barman.key\n\
         ssl_ca_crt=/root/.pem/barman-ca.crt\n",
        dead = closed_port(),
        pgb = bed.pgb_port,
        log = log.display(),
        secret = secret.display(),
    );
    std::fs::write(&cfg, &text).unwrap();

    // --check-config: valid, nothing to warn about; one note, for ca_file (the CA of webhook and
    // pg-backup-api endpoints, which this agent does not call).
    let out = bed
        .agent_command(&cfg, &["--check-config"], &[], &[])
        .current_dir("/")
        .output()
        .unwrap();
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!((code, stdout.as_str()), (0, "config valid\n"), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "pemworker: note: {}:{}: ca_file=/etc/ssl/certs/ca-certificates.crt: calling HTTPS endpoints (webhooks, pg-backup-api) is not implemented by this agent; the key is accepted and ignored\n",
            cfg.display(),
            text.lines()
                .position(|l| l.starts_with("ca_file="))
                .unwrap()
                + 1
        )
    );

    // The worker, started in another directory, finds its files and logs in with the RSA key.
    let su = bed.connect(&bed.superuser()).await;
    pool::execute(
        &su,
        "heartbeat interval",
        "UPDATE pem.agent SET heartbeat_interval = 1 WHERE id = $1",
        &[(&id, Type::INT4)],
    )
    .await
    .unwrap();
    let since: String = pool::query(&su, "now", "SELECT now()::text", &[])
        .await
        .unwrap()[0]
        .get(0);
    let stderr_file = cfg.with_extension("stderr");
    let mut child = bed
        .agent_command(&cfg, &["-f"], &[], &[])
        .current_dir("/")
        .stdout(std::fs::File::create(&stderr_file).unwrap())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .expect("start pemworker");
    let heartbeats = || async {
        pool::query(
            &su,
            "heartbeats",
            "SELECT count(*) FROM pem.agent_heartbeat WHERE agent_id = $1 AND last_heartbeat > $2::text::timestamptz",
            &[(&id, Type::INT4), (&since, Type::TEXT)],
        )
        .await
        .map(|r| r[0].get::<_, i64>(0))
        .unwrap_or(0)
    };
    let running = |child: &mut std::process::Child| child.try_wait().unwrap().is_none();
    wait_for(
        "a heartbeat from the PEM 10 agent.cfg",
        Duration::from_secs(60),
        || {
            let alive = running(&mut child);
            let output = if alive {
                String::new()
            } else {
                std::fs::read_to_string(&stderr_file).unwrap_or_default()
            };
            async move {
                assert!(alive, "the worker stopped: {output}");
                heartbeats().await > 0
            }
        },
    )
    .await;
    // And it goes on beating.
    let first: String = pool::query(
        &su,
        "last",
        "SELECT last_heartbeat::text FROM pem.agent_heartbeat WHERE agent_id = $1",
        &[(&id, Type::INT4)],
    )
    .await
    .unwrap()[0]
        .get(0);
    wait_for("a later heartbeat", Duration::from_secs(30), || async {
        pool::query(
            &su,
            "later",
            "SELECT count(*) FROM pem.agent_heartbeat WHERE agent_id = $1 AND last_heartbeat > $2::text::timestamptz",
            &[(&id, Type::INT4), (&first, Type::TEXT)],
        )
        .await
        .map(|r| r[0].get::<_, i64>(0) > 0)
        .unwrap_or(false)
    })
    .await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&stderr_file).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    for text in [&stderr, &logged] {
        assert!(
            !text.contains("unknown key") && !text.contains("unknown section"),
            "{text}"
        );
    }
    // The file is left as it was.
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), text);
}

#[test]
fn an_old_agent_cfg_naming_the_pem_ca_ca_file_is_told_to_rename_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("agent3.key");
    std::fs::write(&key, "k").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.path().join("agent3.crt"), "c").unwrap();
    std::fs::write(dir.path().join("root.crt"), "r").unwrap();
    let cfg = dir.path().join("agent.cfg");
    std::fs::write(
        &cfg,
        "[PEM/agent]\npem_host=pem.example.org\npem_port=6432\nagent_id=3\n\
         agent_ssl_key=agent3.key\nagent_ssl_crt=agent3.crt\nca_file=root.crt\n",
    )
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pemworker"))
        .args(["--check-config", "-c"])
        .arg(&cfg)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .output()
        .unwrap();
    let (code, _, stderr) = outcome(&out);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(
            "ca_file (line 7) is the CA of webhook and pg-backup-api endpoints, not read for the PEM server"
        ) && stderr.contains("rename ca_file to pem_ssl_root_cert"),
        "{stderr}"
    );
}
