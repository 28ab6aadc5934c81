//! Certificate renewal against the real test bed: the server's `pem.renew_agent_certificate`
//! refusing every way of getting a certificate one should not have (and signing the legitimate
//! request in the same test), a running worker renewing a certificate issued for two minutes
//! without losing a heartbeat or a sample, and the error an expired certificate gets.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{TestBed, journal_keys, log_heartbeats, stored_keys, wait_for};
use openssl::x509::extension::{BasicConstraints, KeyUsage};
use pemworker::connection::{Error, pool};
use pemworker::mac::{self, AgentKey, Kind};
use pemworker::worker::renewal;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

const RENEW: &str = "SELECT pem.renew_agent_certificate($1, $2, $3, $4)";

/// Registers an agent logging in as `user`; returns its agent.cfg and id.
fn register(bed: &TestBed, name: &str, user: &str) -> (PathBuf, i32) {
    let site = bed.home.join(name);
    let args: Vec<String> = bed
        .register_args(name)
        .into_iter()
        .map(|a| {
            if a == "pem_agent_user1" {
                user.into()
            } else {
                a
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", common::ADMIN_PASSWORD)]);
    let (code, stdout, stderr) = common::outcome(&out);
    assert_eq!(code, 0, "register {name}: {stdout}{stderr}");
    let cfg = site.join("etc/agent.cfg");
    (cfg.clone(), common::agent_config(&cfg).agent_id)
}

/// A CSR for a new ECDSA key, with `cn`, optionally asking for CA:TRUE and certificate signing.
fn csr(cn: &str, ask_for_ca: bool) -> String {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::{X509NameBuilder, X509ReqBuilder};
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let mut req = X509ReqBuilder::new().unwrap();
    req.set_subject_name(&name.build()).unwrap();
    req.set_pubkey(&key).unwrap();
    if ask_for_ca {
        let mut ext = openssl::stack::Stack::new().unwrap();
        ext.push(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        ext.push(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        req.add_extensions(&ext).unwrap();
    }
    req.sign(&key, openssl::hash::MessageDigest::sha256())
        .unwrap();
    String::from_utf8(req.build().to_pem().unwrap()).unwrap()
}

/// Calls the renewal function as an agent would: `id` and a MAC made with `secret` over `csr`.
async fn renew(
    client: &Client,
    id: i32,
    secret: &AgentKey,
    csr: &str,
    mac_over: &str,
) -> Result<String, Error> {
    let sent_at = mac::now();
    let signature = secret.sign(Kind::Certificate, id, &sent_at, mac_over);
    let rows = pool::query(
        client,
        "renewing",
        RENEW,
        &[
            (&id, Type::INT4),
            (&sent_at, Type::TEXT),
            (&csr, Type::TEXT),
            (&signature, Type::TEXT),
        ],
    )
    .await?;
    Ok(rows[0].get(0))
}

fn refused_with(r: Result<String, Error>, code: &SqlState, what: &str) -> String {
    match r {
        Ok(cert) => panic!("{what}: signed:\n{cert}"),
        Err(e) => {
            assert_eq!(e.code(), Some(code), "{what}: {e}");
            e.to_string()
        }
    }
}

/// `openssl verify` of `crt` against the bed's CA, and the certificate's text.
fn openssl_verify(bed: &TestBed, crt: &Path) -> String {
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(&bed.root_crt)
        .arg(crt)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl verify {}: {}{}",
        crt.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(crt)
        .output()
        .unwrap();
    String::from_utf8_lossy(&text.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_only_its_own_certificate_and_never_a_ca() {
    let bed = TestBed::start();
    let (cfg_a, id_a) = register(&bed, "a", "pem_agent_user1");
    let (cfg_b, id_b) = register(&bed, "b", "pem_agent_user2");
    let secret_a = common::agent_config(&cfg_a).agent_secret.unwrap();
    let secret_b = common::agent_config(&cfg_b).agent_secret.unwrap();
    // Agent A's own session: its certificate login through pgBouncer.
    let a = bed.agent_session(&cfg_a).await;
    let own = csr("pem_agent_user1", false);

    // 1. Another agent's name, with A's own id and secret.
    let other = csr("pem_agent_user2", false);
    let e = refused_with(
        renew(&a, id_a, &secret_a, &other, &other).await,
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "a certificate for another agent's login",
    );
    assert!(e.contains("may only renew its own"), "{e}");
    // ... nor a name no agent has, nor the admin's.
    for cn in ["postgres", common::ADMIN_USER, "agent"] {
        let r = csr(cn, false);
        refused_with(
            renew(&a, id_a, &secret_a, &r, &r).await,
            &SqlState::INSUFFICIENT_PRIVILEGE,
            cn,
        );
    }
    // 2. Another agent's id with A's secret.
    refused_with(
        renew(&a, id_b, &secret_a, &own, &own).await,
        &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "another agent's id with this agent's secret",
    );
    // 3. Another agent's id with that agent's (stolen) secret, from A's login: for either name.
    for r in [&own, &other] {
        let e = refused_with(
            renew(&a, id_b, &secret_b, r, r).await,
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "another agent's secret from this agent's login",
        );
        assert!(e.contains("is not the agent user of agent"), "{e}");
    }
    // 4. A CA certificate request for its own name.
    let ca = csr("pem_agent_user1", true);
    let e = refused_with(
        renew(&a, id_a, &secret_a, &ca, &ca).await,
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "a CA certificate request",
    );
    assert!(e.contains("CA certificate request"), "{e}");
    // 5. A MAC made over another CSR than the one sent.
    refused_with(
        renew(&a, id_a, &secret_a, &own, &other).await,
        &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "a MAC over another request",
    );
    // 6. Not an agent: the PEM admin may not call it at all.
    let admin = bed.connect(&bed.admin_via_pooler()).await;
    refused_with(
        renew(&admin, id_a, &secret_a, &own, &own).await,
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "the admin",
    );

    // The legitimate renewal, in the same session: a leaf certificate for A's login, from the
    // PEM CA, that logs in through pgBouncer (psql with it, an independent client).
    let cert = renew(&a, id_a, &secret_a, &own, &own)
        .await
        .unwrap_or_else(|e| panic!("the legitimate renewal: {e}"));
    let dir = bed.home.join("renewed");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let crt = dir.join("a.crt");
    std::fs::write(&crt, &cert).unwrap();
    let text = openssl_verify(&bed, &crt);
    assert!(text.contains("Subject: CN = pem_agent_user1"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    // Through the worker's own code path: key and CSR made as the worker makes them.
    let key = pemworker::certs::generate_key().unwrap();
    let worker_csr = pemworker::certs::csr_pem(&key, "pem_agent_user1").unwrap();
    let cert = renew(&a, id_a, &secret_a, &worker_csr, &worker_csr)
        .await
        .unwrap();
    std::fs::write(&crt, &cert).unwrap();
    let key_file = dir.join("a.key");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = bed.psql(
        &bed.agent_conninfo("pem_agent_user1", &crt, &key_file),
        "SELECT current_user",
    );
    let (code, stdout, stderr) = common::outcome(&out);
    assert_eq!((code, stdout.trim()), (0, "pem_agent_user1"), "{stderr}");

    // Only the two legitimate renewals were recorded, both for agent A's login.
    let su = bed.connect(&bed.superuser()).await;
    let rows = pool::query(
        &su,
        "renewals",
        "SELECT agent_id, login::text FROM pem.agent_certificate_renewal ORDER BY id",
        &[],
    )
    .await
    .unwrap();
    let seen: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        seen,
        vec![
            (id_a, "pem_agent_user1".to_string()),
            (id_a, "pem_agent_user1".to_string())
        ]
    );
    // Agent B renews its own through its own login.
    let b = bed.agent_session(&cfg_b).await;
    let r = csr("pem_agent_user2", false);
    renew(&b, id_b, &secret_b, &r, &r)
        .await
        .unwrap_or_else(|e| panic!("agent B's own renewal: {e}"));
}

/// A certificate for `key_file`'s key and `cn`, signed by the bed's CA, valid from now for
/// `seconds`.
fn short_certificate(bed: &TestBed, cn: &str, key_file: &Path, seconds: i64) -> String {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let key = KeyPair::from_pem(&std::fs::read_to_string(key_file).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(
        &bed.ca.cert_pem,
        KeyPair::from_pem(&bed.ca.key_pem).unwrap(),
    )
    .unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::seconds(seconds);
    params.signed_by(&key, &issuer).unwrap().pem()
}

/// A worker for `cfg` with 1-second heartbeats' settings; its log and state beside agent.cfg.
fn start_worker(bed: &TestBed, cfg: &Path, journal: &Path, extra: &[(&str, String)]) -> Child {
    let site = cfg.parent().unwrap().parent().unwrap();
    let mut settings = vec![
        (
            "log_location",
            site.join("worker.log").display().to_string(),
        ),
        ("short_wait", "2".into()),
        ("long_wait", "5".into()),
        ("state_dir", site.join("state").display().to_string()),
        // Sessions are opened anew every 2 s: once the first certificate has expired, every
        // session is one the renewed certificate opened.
        ("pem_session_lifetime", "2".into()),
    ];
    settings.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    bed.start_worker_env(
        cfg,
        &settings,
        &[(
            "PEMWORKER_TEST_HOOKS",
            format!("journal={}", journal.display()),
        )],
    )
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
    let _ = child.kill();
    panic!("the worker did not stop within 30 s");
}

async fn server_now(su: &Client) -> String {
    pool::query_one(su, "now", "SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// The longest time between two heartbeats of `agent` in [from, to], and their number.
async fn longest_heartbeat_gap(su: &Client, agent: i32, from: &str, to: &str) -> (f64, i64) {
    let row = pool::query_one(
        su,
        "gaps",
        "WITH h AS (SELECT at FROM public.heartbeat_log \
                     WHERE agent_id = $1 AND at BETWEEN $2::text::timestamptz AND $3::text::timestamptz \
                    UNION ALL SELECT $2::text::timestamptz UNION ALL SELECT $3::text::timestamptz), \
              g AS (SELECT at - lag(at) OVER (ORDER BY at) AS gap FROM h) \
         SELECT extract(epoch FROM max(gap))::float8, \
                (SELECT count(*) FROM public.heartbeat_log \
                  WHERE agent_id = $1 AND at BETWEEN $2::text::timestamptz AND $3::text::timestamptz) FROM g",
        &[(&agent, Type::INT4), (&from, Type::TEXT), (&to, Type::TEXT)],
    )
    .await
    .unwrap();
    (row.get(0), row.get(1))
}

/// Heartbeats every second and the agent-level probes every 2 s for `id`.
async fn fast_schedule(su: &Client, id: i32) {
    pool::execute(
        su,
        "schedule",
        "WITH h AS (UPDATE pem.agent SET heartbeat_interval = 1 WHERE id = $1) \
         INSERT INTO pem.probe_schedule (agent_id, server_id, probe_id, interval, enabled) \
           SELECT $1, NULL, p.id, 2, true FROM pem.probe p WHERE p.target_type = 'agent'",
        &[(&id, Type::INT4)],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_minute_certificate_is_renewed_by_the_running_worker_with_no_lost_heartbeat_or_sample()
 {
    const LIFETIME: i64 = 120;
    let bed = TestBed::start();
    let (cfg, id) = bed.register_agent("agent");
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let (crt, key) = (
        site.join(".pem/pem_agent_user1.crt"),
        site.join(".pem/pem_agent_user1.key"),
    );
    let su = bed.connect(&bed.superuser()).await;
    log_heartbeats(&su).await;
    fast_schedule(&su, id).await;
    // The bed's CA issues the agent a certificate for two minutes.
    std::fs::write(
        &crt,
        short_certificate(&bed, "pem_agent_user1", &key, LIFETIME),
    )
    .unwrap();
    let (start, end) = renewal::validity(&crt).unwrap();
    assert_eq!((end - start).num_seconds(), LIFETIME);
    let old_key = std::fs::read(&key).unwrap();

    let journal = site.join("journal");
    let from = server_now(&su).await;
    let worker = start_worker(&bed, &cfg, &journal, &[]);
    let log = site.join("worker.log");

    // Renewed before it expires (due at 2/3 of its lifetime).
    wait_for(
        "the certificate renewed",
        Duration::from_secs(LIFETIME as u64),
        || async { renewal::validity(&crt).is_some_and(|(_, new_end)| new_end > end) },
    )
    .await;
    let renewed_at = chrono::Utc::now();
    assert!(renewed_at < end, "renewed at {renewed_at}, after {end}");
    let due = renewal::due(start, end, 2.0 / 3.0);
    assert!(
        renewed_at >= due,
        "renewed at {renewed_at}, before 2/3 of the lifetime ({due})"
    );
    let (_, new_end) = renewal::validity(&crt).unwrap();
    eprintln!("renewed at {renewed_at}: {end} -> {new_end}");
    assert!(new_end > end + chrono::Duration::days(300), "{new_end}");
    assert_ne!(std::fs::read(&key).unwrap(), old_key, "a new key");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(key.parent().unwrap()), 0o700);
    // The previous pair is kept as a backup.
    let backups: Vec<String> = std::fs::read_dir(key.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bak"))
        .collect();
    for prefix in ["pem_agent_user1.key.", "pem_agent_user1.crt."] {
        assert!(
            backups.iter().any(|b| b.starts_with(prefix)),
            "{prefix}*.bak in {backups:?}"
        );
    }
    // The new certificate verifies against the PEM CA with an independent client.
    let text = openssl_verify(&bed, &crt);
    assert!(text.contains("Subject: CN = pem_agent_user1"), "{text}");

    // Past the first certificate's end, by enough for many sessions opened with the new one.
    let past = (end - chrono::Utc::now()).num_milliseconds().max(0) as u64 + 20_000;
    tokio::time::sleep(Duration::from_millis(past)).await;
    let to = server_now(&su).await;
    let (gap, beats) = longest_heartbeat_gap(&su, id, &from, &to).await;
    eprintln!("{beats} heartbeats, longest gap {gap:.2} s");
    // Heartbeats every second; the first comes after start-up.
    assert!(gap <= 1.0 + 3.0, "a heartbeat lost: a gap of {gap:.2} s");
    let recent = server_now(&su).await;
    wait_for(
        "a heartbeat after expiry",
        Duration::from_secs(5),
        || async {
            longest_heartbeat_gap(&su, id, &recent, &server_now(&su).await)
                .await
                .1
                > 0
        },
    )
    .await;

    // ... and delivering.
    let before = stored_keys(&su, id).await.len();
    wait_for(
        "samples stored after expiry",
        Duration::from_secs(10),
        || async { stored_keys(&su, id).await.len() > before },
    )
    .await;

    assert_eq!(stop(worker).await, 0);
    let collected = journal_keys(&journal);
    let stored = stored_keys(&su, id).await;
    eprintln!(
        "{} rows collected, {} stored",
        collected.len(),
        stored.len()
    );
    assert!(collected.len() > 50, "{} rows", collected.len());
    assert_eq!(stored, collected, "stored == collected");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("renewed this agent's certificate"), "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_gets_one_line_naming_the_file_and_the_command_that_fixes_it() {
    let bed = TestBed::start();
    let (cfg, _) = bed.register_agent("agent");
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let (crt, key) = (
        site.join(".pem/pem_agent_user1.crt"),
        site.join(".pem/pem_agent_user1.key"),
    );
    // Ended a second after it began, a while ago.
    std::fs::write(&crt, short_certificate(&bed, "pem_agent_user1", &key, 1)).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let journal = site.join("journal");
    let worker = start_worker(&bed, &cfg, &journal, &[]);
    let log = site.join("worker.log");
    let expired = format!("this agent's certificate {} expired on", crt.display());
    wait_for(
        "the expired certificate named",
        Duration::from_secs(20),
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&expired)
        },
    )
    .await;
    // Several attempts later, still one line, and no renewal attempted with it.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(stop(worker).await, 0);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("certificate"))
        .collect();
    assert_eq!(lines.len(), 1, "one line: {lines:#?}");
    assert!(
        lines[0].contains(&format!(
            "get a new one with: pemworker --register-agent --force-registration --pem-server 127.0.0.1 --pem-port {} \
             --pem-agent-user pem_agent_user1 --cert-path {}",
            bed.pgb_port,
            crt.parent().unwrap().display()
        )),
        "{}",
        lines[0]
    );
    assert!(!text.contains("cannot renew"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_renewal_is_logged_once_with_its_fix_and_retried_until_it_works() {
    const LIFETIME: i64 = 90;
    let bed = TestBed::start();
    let (cfg, id) = bed.register_agent("agent");
    let site = cfg.parent().unwrap().parent().unwrap().to_path_buf();
    let (crt, key) = (
        site.join(".pem/pem_agent_user1.crt"),
        site.join(".pem/pem_agent_user1.key"),
    );
    let su = bed.connect(&bed.superuser()).await;
    fast_schedule(&su, id).await;
    // The server refuses renewals for now.
    let grant = "ON FUNCTION pem.renew_agent_certificate(integer, text, text, text)";
    pool::batch(
        &su,
        "revoke",
        &format!("REVOKE EXECUTE {grant} FROM pem_agent"),
    )
    .await
    .unwrap();
    std::fs::write(
        &crt,
        short_certificate(&bed, "pem_agent_user1", &key, LIFETIME),
    )
    .unwrap();
    let (start, end) = renewal::validity(&crt).unwrap();
    let journal = site.join("journal");
    // Due after a sixth of its lifetime (15 s).
    let worker = start_worker(
        &bed,
        &cfg,
        &journal,
        &[("certificate_renewal_fraction", "0.1667".into())],
    );
    let log = site.join("worker.log");
    let due = renewal::due(start, end, 0.1667);
    // Past the first attempt and a few retries.
    let until = (due - chrono::Utc::now()).num_milliseconds().max(0) as u64 + 25_000;
    tokio::time::sleep(Duration::from_millis(until)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("cannot renew"))
        .collect();
    assert_eq!(lines.len(), 1, "one line for the outage: {text}");
    assert!(
        lines[0].contains("ERROR")
            && lines[0].contains(&crt.display().to_string())
            && lines[0].contains("permission denied for function renew_agent_certificate")
            && lines[0]
                .contains("renew by hand with: pemworker --register-agent --force-registration")
            && lines[0].contains("trying again with backoff"),
        "{}",
        lines[0]
    );
    assert_eq!(renewal::validity(&crt).unwrap().1, end, "nothing changed");

    // Fixed on the server: the next retry renews it, before it expires.
    pool::batch(&su, "grant", &format!("GRANT EXECUTE {grant} TO pem_agent"))
        .await
        .unwrap();
    wait_for(
        "the certificate renewed",
        Duration::from_secs(LIFETIME as u64),
        || async { renewal::validity(&crt).is_some_and(|(_, new_end)| new_end > end) },
    )
    .await;
    assert!(chrono::Utc::now() < end, "renewed before it expired");
    openssl_verify(&bed, &crt);
    assert_eq!(stop(worker).await, 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.lines().filter(|l| l.contains("cannot renew")).count(),
        1,
        "{text}"
    );
    assert!(text.contains("renewed this agent's certificate"), "{text}");
}
