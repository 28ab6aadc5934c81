//! Registration and the worker against an impostor in the place of the PEM server: one that
//! refuses TLS, one that presents a certificate from another CA, one that asks for the password
//! in clear text. They get no password and no sample (asserted on the bytes the impostor
//! received), the user is told why in one line, and the worker keeps its samples in its spool
//! and delivers them to the real server afterwards.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::impostor::{Auth, Impostor, Tls};
use common::{ADMIN_PASSWORD, TestBed, outcome, wait_for};
use pemworker::connection::pool;
use pemworker::worker::stats::Snapshot;
use tokio_postgres::types::Type;

/// `--register-agent` with the bed's arguments, pointed at `port`, with its files under
/// `<home>/<name>`, and `extra` flags.
fn register(
    bed: &TestBed,
    name: &str,
    port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut args = bed.register_args(name);
    let p = args.iter().position(|a| a == "--pem-port").unwrap() + 1;
    args[p] = port.to_string();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut env = env.to_vec();
    env.push(("PEM_SERVER_PASSWORD", ADMIN_PASSWORD));
    outcome(&bed.pemworker_env(&args, &env))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_sends_no_password_to_an_impostor_and_says_why() {
    let bed = TestBed::start();
    let password = ADMIN_PASSWORD.as_bytes();
    let no_tls = Impostor::start(Tls::Refuse, Auth::Cleartext);
    let foreign = Impostor::start(Tls::foreign_ca(), Auth::Cleartext);
    let no_root = [("PGSSLROOTCERT", "")];
    struct Case<'a> {
        name: &'a str,
        impostor: &'a Impostor,
        extra: &'a [&'a str],
        env: &'a [(&'a str, &'a str)],
        says: &'a str,
        /// Whether the startup message (user name, database) may have reached the impostor:
        /// only where the user chose an sslmode that lets the session go on unverified.
        startup_sent: bool,
    }
    let cases = [
        Case {
            name: "refuses TLS (default verify-full)",
            impostor: &no_tls,
            extra: &[],
            env: &[],
            says: "the server does not offer TLS, which sslmode verify-full requires; nothing else was sent",
            startup_sent: false,
        },
        Case {
            name: "refuses TLS, then asks for a cleartext password (sslmode prefer chosen)",
            impostor: &no_tls,
            extra: &["--pem-ssl-mode", "prefer"],
            env: &[],
            says: "the server asked for the password in clear text, and its certificate is not verified (sslmode prefer); the password was not sent",
            startup_sent: true,
        },
        Case {
            name: "certificate from another CA (default verify-full)",
            impostor: &foreign,
            extra: &[],
            env: &[],
            says: "TLS handshake failed",
            startup_sent: false,
        },
        Case {
            name: "certificate from another CA (require with a root certificate verifies too)",
            impostor: &foreign,
            extra: &["--pem-ssl-mode", "require"],
            env: &[],
            says: "certificate verify failed",
            startup_sent: false,
        },
        Case {
            name: "asks for a cleartext password over TLS nobody verified (require, no root)",
            impostor: &foreign,
            extra: &["--pem-ssl-mode", "require"],
            env: &no_root,
            says: "the server asked for the password in clear text, and its certificate is not verified (sslmode require, no root certificate); the password was not sent",
            startup_sent: true,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let name = format!("site{i}");
        let (code, out, err) = register(&bed, &name, c.impostor.port, c.extra, c.env);
        eprintln!("{}: exit {code}: {}", c.name, err.trim_end());
        assert_eq!(code, 2, "{}: {out}{err}", c.name);
        assert_eq!(err.lines().count(), 1, "{}: {err}", c.name);
        assert!(err.contains(c.says), "{}: {err}", c.name);
        assert!(
            !c.impostor.got(password),
            "{}: the password reached the impostor",
            c.name
        );
        assert_eq!(
            c.impostor.got(b"pem_admin1"),
            c.startup_sent,
            "{}: the startup message",
            c.name
        );
        assert!(
            !bed.home.join(&name).exists(),
            "{}: files left behind",
            c.name
        );
    }
    assert!(!no_tls.got(b"sign_agent_csr") && !foreign.got(b"sign_agent_csr"));

    // The legitimate registration, through the real pgBouncer, with the same defaults.
    let (code, out, err) = register(&bed, "real", bed.pgb_port, &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
}

fn stats(state: &Path) -> Snapshot {
    std::fs::read(state.join("stats.json"))
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default()
}

async fn stop(mut child: Child) -> i32 {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    for _ in 0..300 {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    panic!("the worker did not stop within 30 s");
}

fn spool_entries(state: &Path) -> usize {
    std::fs::read_dir(state.join("spool"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
            })
            .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_sends_no_sample_to_an_impostor_and_keeps_them_in_its_spool() {
    let bed = TestBed::start();
    let (cfg, agent_id) = bed.register_agent("agent");
    let state: PathBuf = bed.home.join("agent/state");

    // Without a root certificate the default verify-full cannot work: one line, exit 1, at
    // start (not a retry loop).
    let out = Command::new(env!("CARGO_BIN_EXE_pemworker"))
        .arg("-c")
        .arg(&cfg)
        .args(["-o", "pem_ssl_root_cert=", "-f"])
        .env_clear()
        .env("HOME", &bed.home)
        .output()
        .unwrap();
    let (code, _, err) = outcome(&out);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("sslmode verify-full needs the root certificate that signed the PEM server's (or pgBouncer's) certificate: set pem_ssl_root_cert"),
        "{err}"
    );
    let base = |port: u16| {
        vec![
            ("pem_port", port.to_string()),
            ("state_dir", state.display().to_string()),
            ("short_wait", "2".to_string()),
            ("long_wait", "2".to_string()),
            ("log_level", "info".to_string()),
        ]
    };
    let no_tls = Impostor::start(Tls::Refuse, Auth::Trust);
    let foreign = Impostor::start(Tls::foreign_ca(), Auth::Trust);
    let cleartext = Impostor::start(Tls::foreign_ca(), Auth::Cleartext);
    let unverified = [
        ("pem_ssl_mode", "require".to_string()),
        ("pem_ssl_root_cert", String::new()),
    ];
    /// (what, impostor, agent.cfg overrides, PGSSLROOTCERT set, what the log says)
    type Case<'a> = (
        &'a str,
        &'a Impostor,
        &'a [(&'a str, String)],
        bool,
        &'a str,
    );
    let cases: [Case; 3] = [
        (
            "refuses TLS",
            &no_tls,
            &[],
            true,
            "the server does not offer TLS, which sslmode verify-full requires",
        ),
        (
            "certificate from another CA",
            &foreign,
            &[],
            true,
            "TLS handshake failed",
        ),
        (
            "asks for a cleartext password (require without a root certificate, chosen)",
            &cleartext,
            &unverified,
            false,
            "the server asked for the password in clear text, and its certificate is not verified",
        ),
    ];
    let mut spooled = 0;
    for (name, impostor, extra, root_env, says) in cases {
        let mut o = base(impostor.port);
        o.extend(extra.iter().cloned());
        let env = if root_env {
            vec![]
        } else {
            vec![("PGSSLROOTCERT", String::new())]
        };
        let child = bed.start_worker_env(&cfg, &o, &env);
        let log = cfg.with_extension("stderr");
        wait_for(
            &format!("{name}: the reason in the log"),
            Duration::from_secs(60),
            || async { std::fs::read_to_string(&log).is_ok_and(|l| l.contains(says)) },
        )
        .await;
        wait_for(
            &format!("{name}: samples in the spool"),
            Duration::from_secs(60),
            || async { stats(&state).spooled_samples > spooled as u64 },
        )
        .await;
        assert_eq!(stop(child).await, 0, "{name}");
        let text = std::fs::read_to_string(&log).unwrap();
        let reasons: Vec<&str> = text.lines().filter(|l| l.contains(says)).collect();
        assert!(!reasons.is_empty(), "{name}: {text}");
        assert!(!text.contains("panicked"), "{name}: {text}");
        for marker in [
            &b"pemhistory"[..],
            b"pemdata",
            b"jsonb_to_recordset",
            b"delivery_key",
            b"record_heartbeat",
            b"store_samples",
            b"agent_schedule",
        ] {
            assert!(
                !impostor.got(marker),
                "{name}: {} reached the impostor",
                String::from_utf8_lossy(marker)
            );
        }
        let s = stats(&state);
        assert!(s.spooled_samples as usize > spooled, "{name}: {s:?}");
        assert_eq!(s.delivered_samples, 0, "{name}");
        assert!(spool_entries(&state) > 0, "{name}: the spool is empty");
        spooled = s.spooled_samples as usize;
    }
    // Only where the user chose an unverified mode did the impostor even see who logs in.
    assert!(!no_tls.got(b"pem_agent_user1") && !foreign.got(b"pem_agent_user1"));
    assert!(cleartext.got(b"pem_agent_user1"));

    // The real server, with the same state directory: everything spooled is delivered.
    let child = bed.start_worker(&cfg, &base(bed.pgb_port)[1..]);
    wait_for(
        "the spool to drain into the real server",
        Duration::from_secs(90),
        || async {
            let s = stats(&state);
            s.delivered_samples >= spooled as u64 && s.spooled_samples == 0
        },
    )
    .await;
    assert_eq!(stop(child).await, 0);
    let su = bed.connect(&bed.superuser()).await;
    let stored: i64 = pool::query_one(
        &su,
        "stored",
        "SELECT count(*) FROM pemhistory.cpu_usage WHERE agent_id = $1",
        &[(&agent_id, Type::INT4)],
    )
    .await
    .unwrap()
    .get(0);
    assert!(stored >= 3, "cpu samples stored: {stored}");
}
