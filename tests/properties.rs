//! Property tests of the parsers that read what others wrote: agent.cfg, `-o key=value`, the
//! certificate the server returns, and spool files left on disk (truncated, corrupt, or not
//! ours). Each must answer every input without a panic, and keep what it must keep.
//! (`.pgpass`, pgBouncer's console answers, the authentication watch, query normalization and
//! the monitored-targets record are tested the same way in their modules.)

use std::path::Path;

use pemworker::agentcfg::Document;
use pemworker::certs::{self, Authority};
use pemworker::config::AgentConfig;
use pemworker::probes::{Sample, Value};
use pemworker::registration::{cert_check, parse_override};
use pemworker::spool::Spool;
use proptest::prelude::*;

/// Lines an agent.cfg may hold, good and bad.
fn cfg_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[PEM/agent]".to_string()),
        Just("[WEBHOOK/x]".to_string()),
        "[a-z_]{1,12}=[ -~]{0,20}",
        "(pem_port|agent_id|long_wait|connect_timeout|spool_limit|pem_ssl_mode|log_level)=[ -~]{0,10}",
        "[#;][ -~]{0,20}",
        "[ -~]{0,30}",
        "\\PC{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn agent_cfg_parses_anything_and_rewrites_only_what_is_set(
        lines in proptest::collection::vec(cfg_line(), 0..30),
        key in "[a-z_]{1,12}",
        value in "[ -~]{0,20}",
    ) {
        let text = lines.join("\n");
        let doc = Document::parse(&text);
        // Rendering is stable, and a file read back is the same document.
        let once = doc.render();
        prop_assert_eq!(Document::parse(&once).render(), once.clone());
        // Setting a key changes that key only.
        let mut changed = doc.clone();
        changed.set(&key, value.trim(), None);
        prop_assert_eq!(changed.get(&key), Some(value.trim()));
        let others = |d: &Document| -> Vec<(String, String)> {
            d.entries()
                .iter()
                .filter(|e| e.key != key)
                .map(|e| (e.key.to_string(), e.value.to_string()))
                .collect()
        };
        prop_assert_eq!(others(&changed), others(&doc));
        // Checking it never panics; a problem names the file.
        let path = Path::new("/nonexistent/agent.cfg");
        if let Err(problems) = AgentConfig::from_document(path, &doc) {
            for p in problems.0 {
                prop_assert!(p.to_string().starts_with("/nonexistent/agent.cfg"));
            }
        }
    }

    #[test]
    fn dash_o_accepts_only_one_line_settings(s in "\\PC{0,40}") {
        if let Ok((k, v)) = parse_override(&s) {
            prop_assert!(!k.is_empty());
            prop_assert!(k.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
            prop_assert!(!v.contains(['\n', '\r']));
            prop_assert!(!["agent_id", "agent_user", "agent_ssl_key", "agent_ssl_crt"].contains(&k.as_str()));
            // What is written into agent.cfg reads back as given.
            let mut d = Document::with_defaults();
            d.set(&k, &v, None);
            let back = Document::parse(&d.render());
            prop_assert_eq!(back.get(&k), Some(v.as_str()));
        }
    }

    #[test]
    fn any_text_as_a_certificate_is_refused_without_a_panic(text in "\\PC{0,300}") {
        let key = certs::generate_key().unwrap();
        prop_assert!(cert_check::check(&text, &key, "agent1", None).is_err());
        let pem = format!("-----BEGIN CERTIFICATE-----\n{text}\n-----END CERTIFICATE-----\n");
        prop_assert!(cert_check::check(&pem, &key, "agent1", None).is_err());
    }
}

/// A certificate for `user` signed by `ca`, as the server's signing function returns it.
fn signed(ca: &Authority, key: &rcgen::KeyPair, user: &str) -> String {
    let csr = certs::csr_pem(key, user).unwrap();
    let req = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).unwrap();
    req.signed_by(&issuer).unwrap().pem()
}

fn der_of(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    p.contents
}

fn pem_of(der: &[u8]) -> String {
    use std::fmt::Write;
    let b64 = base64_encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        writeln!(s, "{}", std::str::from_utf8(chunk).unwrap()).unwrap();
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_tampered_certificate_never_passes_the_check() {
    let ca = Authority::generate("test CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.crt");
    std::fs::write(&root, &ca.cert_pem).unwrap();
    let key = certs::generate_key().unwrap();
    let good = signed(&ca, &key, "agent1");
    cert_check::check(&good, &key, "agent1", Some(&root)).expect("the untouched certificate");
    assert_eq!(pem_of(&der_of(&good)), good, "the test's own PEM encoding");
    let der = der_of(&good);
    // Every single-bit flip ...
    for at in 0..der.len() {
        for bit in 0..8 {
            let mut bad = der.clone();
            bad[at] ^= 1 << bit;
            let r = cert_check::check(&pem_of(&bad), &key, "agent1", Some(&root));
            assert!(r.is_err(), "byte {at} bit {bit} passed");
        }
    }
    // ... and random byte changes.
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(512));
    runner
        .run(&(0..der.len(), 1u8..=255), |(at, flip)| {
            let mut bad = der.clone();
            bad[at] ^= flip;
            let r = cert_check::check(&pem_of(&bad), &key, "agent1", Some(&root));
            prop_assert!(r.is_err(), "byte {at} ^ {flip} passed");
            Ok(())
        })
        .unwrap();
    // Another CA's certificate, another user's, and one for another key are refused too.
    let other = Authority::generate("other CA").unwrap();
    assert!(
        cert_check::check(&signed(&other, &key, "agent1"), &key, "agent1", Some(&root)).is_err()
    );
    assert!(cert_check::check(&signed(&ca, &key, "agent2"), &key, "agent1", Some(&root)).is_err());
    let stranger = certs::generate_key().unwrap();
    assert!(cert_check::check(&good, &stranger, "agent1", Some(&root)).is_err());
}

fn sample(n: i64) -> Sample {
    Sample::new(
        "load_average",
        None,
        None,
        vec![vec![Value::Int(n), Value::Float(0.5), Value::Null]],
    )
}

/// What may lie in a spool directory besides our own entries.
#[derive(Debug, Clone)]
enum Stray {
    /// One of our entries, cut short.
    Truncated(usize),
    /// One of our entry names with other content.
    Garbage(Vec<u8>),
    /// A file that is not ours at all.
    Foreign(String, Vec<u8>),
}

fn stray() -> impl Strategy<Value = Stray> {
    prop_oneof![
        (0usize..200).prop_map(Stray::Truncated),
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(Stray::Garbage),
        (
            "[a-z0-9.]{1,20}",
            proptest::collection::vec(any::<u8>(), 0..50)
        )
            .prop_map(|(n, d)| Stray::Foreign(n, d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_spool_with_truncated_corrupt_or_foreign_files_keeps_every_good_entry(
        good in 1usize..6,
        strays in proptest::collection::vec(stray(), 0..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..good {
            spool.push(vec![sample(i as i64)]).unwrap();
        }
        drop(spool);
        let valid = std::fs::read(dir.path().join(format!("{:020}.json", 1))).unwrap();
        for (i, s) in strays.iter().enumerate() {
            let seq = 1000 + i;
            match s {
                Stray::Truncated(n) => {
                    let cut = (*n).min(valid.len().saturating_sub(1));
                    std::fs::write(dir.path().join(format!("{seq:020}.json")), &valid[..cut]).unwrap();
                }
                Stray::Garbage(d) => {
                    std::fs::write(dir.path().join(format!("{seq:020}.json")), d).unwrap();
                }
                Stray::Foreign(name, d) => {
                    let _ = std::fs::write(dir.path().join(name), d);
                }
            }
        }
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut read = Vec::new();
        while let Some(e) = spool.oldest() {
            let first = e
                .samples
                .first()
                .and_then(|s| s.rows.first())
                .and_then(|r| r.1.first().cloned());
            read.push(first);
            spool.remove(e.seq);
        }
        // Every good entry, in order, first; what follows can only be a stray that happens to
        // be a well-formed batch (the rest were set aside, not delivered).
        let want: Vec<Option<Value>> = (0..good as i64).map(|i| Some(Value::Int(i))).collect();
        prop_assert!(read.len() >= good);
        prop_assert_eq!(&read[..good], &want[..]);
        prop_assert!(spool.is_empty());
    }
}
