//! `pemworker pooler server-certificate`: pgBouncer's TLS server certificate and key, issued
//! from the PEM CA, with the names agents verify.
//!
//! Agents check pgBouncer with sslmode verify-full against the PEM CA's root certificate, so
//! pgBouncer needs a certificate from that CA naming every host name and address agents dial
//! (a host dialled by address needs an IP subject alternative name). The CA is read from the
//! PEM server's data directory, where PEM keeps it (`ca_certificate.crt`, `ca_key.key`), so
//! this runs on the PEM server's host, as root or as the server's OS user. The new key is made
//! here and written only to its file: 0600, owned by the user pgBouncer runs as, never through
//! a link (see fsutil); existing files are replaced only with `--force`, after a backup.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::Error;
use crate::certs::Authority;
use crate::fsutil::{self, Owner, Staged};

/// What to issue, checked before any file is read.
#[derive(Debug, Clone)]
pub struct Options {
    /// The PEM server's data directory (its CA files).
    pub data_dir: PathBuf,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The operating-system user pgBouncer runs as; owns both files.
    pub owner: Owner,
    pub days: u32,
    pub force: bool,
}

/// What was issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub names: Vec<String>,
    pub not_after: String,
    pub ca_subject: String,
    pub backups: Vec<PathBuf>,
}

/// The PEM CA's files in a data directory, as PEM names them.
pub fn ca_files(data_dir: &Path) -> (PathBuf, PathBuf) {
    (
        data_dir.join("ca_certificate.crt"),
        data_dir.join("ca_key.key"),
    )
}

/// Longest validity offered: agents are told of an expired certificate in one line, a
/// forgotten one valid for decades is a key nobody rotates.
pub const MAX_DAYS: u32 = 3650;

fn invalid(what: &'static str, value: impl Into<String>, why: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        value: value.into(),
        why: why.into(),
    }
}

/// The subject alternative names, DNS names first: the first name is also the CommonName.
fn names(o: &Options) -> Result<Vec<String>, Error> {
    if o.dns_names.is_empty() && o.ip_addresses.is_empty() {
        return Err(invalid(
            "certificate names",
            "",
            "give every name agents dial pgBouncer by: --dns-name NAME and/or --ip-address ADDRESS (repeatable)",
        ));
    }
    let mut out = Vec::new();
    for n in &o.dns_names {
        let ok = !n.is_empty()
            && n.len() <= 253
            && n.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && (label == "*"
                        || label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !ok || n.parse::<IpAddr>().is_ok() {
            return Err(invalid(
                "--dns-name",
                n.as_str(),
                "a host name of letters, digits and hyphens in dot-separated labels (give addresses with --ip-address)",
            ));
        }
        out.push(n.to_ascii_lowercase());
    }
    out.extend(o.ip_addresses.iter().map(IpAddr::to_string));
    out.dedup();
    Ok(out)
}

/// Issues the certificate and writes both files; nothing is written if any step fails.
pub fn issue(o: &Options) -> Result<Issued, Error> {
    let names = names(o)?;
    if o.days == 0 || o.days > MAX_DAYS {
        return Err(invalid(
            "--days",
            o.days.to_string(),
            format!("give 1 to {MAX_DAYS} days"),
        ));
    }
    for (flag, p) in [("--cert-file", &o.cert_file), ("--key-file", &o.key_file)] {
        if !p.is_absolute() {
            return Err(invalid(
                flag,
                p.display().to_string(),
                "give an absolute path (pgBouncer's configuration names it)",
            ));
        }
    }
    if o.cert_file == o.key_file {
        return Err(invalid(
            "--key-file",
            o.key_file.display().to_string(),
            "the key and the certificate need files of their own",
        ));
    }
    if !o.force {
        for p in [&o.cert_file, &o.key_file] {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(fsutil::Error::Exists {
                    path: p.clone(),
                    flag: "--force",
                }
                .into());
            }
        }
    }

    let (ca_cert_path, ca_key_path) = ca_files(&o.data_dir);
    let read = |p: &Path| -> Result<String, Error> {
        let bytes = fsutil::read_regular(p).map_err(|e| {
            invalid(
                "PEM CA file",
                p.display().to_string(),
                format!(
                    "{e}; --data-dir must be the PEM server's data directory, where pemworker pooler prepare-server --install-schema (or PEM's installer) made the CA"
                ),
            )
        })?;
        String::from_utf8(bytes)
            .map_err(|_| invalid("PEM CA file", p.display().to_string(), "not PEM text"))
    };
    let ca = Authority {
        cert_pem: read(&ca_cert_path)?,
        key_pem: read(&ca_key_path)?,
    };
    let ca_subject = check_ca(&ca.cert_pem, &ca_cert_path)?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (cert_pem, key_pem) = ca.issue_server_for(&refs, o.days).map_err(|e| {
        invalid(
            "PEM CA",
            ca_key_path.display().to_string(),
            format!("{e} (the key must be unencrypted PKCS#8, BEGIN PRIVATE KEY; convert one with openssl pkcs8 -topk8 -nocrypt)"),
        )
    })?;
    let not_after = check_issued(&cert_pem, &ca.cert_pem)?;

    for p in [&o.cert_file, &o.key_file] {
        if let Some(dir) = p.parent() {
            fsutil::ensure_dir(dir, 0o700, Some(&o.owner))?;
        }
    }
    let staged = [
        Staged::write(&o.key_file, key_pem.as_bytes(), 0o600, Some(&o.owner))?,
        Staged::write(&o.cert_file, cert_pem.as_bytes(), 0o644, Some(&o.owner))?,
    ];
    let existing: Vec<&PathBuf> = [&o.key_file, &o.cert_file]
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    let backups = fsutil::backup_all(&existing)?;
    for s in staged {
        s.commit()?;
    }
    Ok(Issued {
        names,
        not_after,
        ca_subject,
        backups,
    })
}

/// The CA certificate must be a CA that is valid now; returns its subject.
fn check_ca(pem: &str, path: &Path) -> Result<String, Error> {
    let bad = |why: String| invalid("PEM CA certificate", path.display().to_string(), why);
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
    let cert = der
        .parse_x509()
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    if !cert.is_ca() {
        return Err(bad(
            "it is not a CA certificate (basicConstraints CA:TRUE)".into()
        ));
    }
    if !cert.validity().is_valid() {
        return Err(bad(format!(
            "it is not valid now (valid {} to {}); the PEM CA must be renewed first",
            cert.validity().not_before,
            cert.validity().not_after
        )));
    }
    Ok(cert.subject().to_string())
}

/// The new certificate must verify against the CA; returns when it expires.
fn check_issued(cert_pem: &str, ca_pem: &str) -> Result<String, Error> {
    let parse = |pem: &str| -> Option<Vec<u8>> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .ok()
            .map(|(_, p)| p.contents)
    };
    let (Some(cert_der), Some(ca_der)) = (parse(cert_pem), parse(ca_pem)) else {
        return Err(invalid("issued certificate", "", "cannot be read back"));
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| invalid("issued certificate", "", e.to_string()))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| invalid("issued certificate", "", e.to_string()))?;
    cert.verify_signature(Some(ca.public_key())).map_err(|e| {
        invalid(
            "issued certificate",
            "",
            format!("its signature does not verify with the CA's key ({e}): ca_key.key does not belong to ca_certificate.crt"),
        )
    })?;
    Ok(cert.validity().not_after.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dns: &[&str], ips: &[&str]) -> Options {
        Options {
            data_dir: "/nonexistent".into(),
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ip_addresses: ips.iter().map(|s| s.parse().unwrap()).collect(),
            cert_file: "/etc/pgbouncer/server.crt".into(),
            key_file: "/etc/pgbouncer/server.key".into(),
            owner: Owner::current(),
            days: 365,
            force: false,
        }
    }

    #[test]
    fn names_are_checked_dns_first() {
        assert_eq!(
            names(&options(
                &["PEM.example", "localhost"],
                &["127.0.0.1", "::1"]
            ))
            .unwrap(),
            ["pem.example", "localhost", "127.0.0.1", "::1"]
        );
        assert!(names(&options(&[], &[])).is_err());
        for bad in ["", "a b", "-x.example", "a..b", "10.0.0.1", "x_y.example"] {
            assert!(names(&options(&[bad], &[])).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn issued_certificates_verify_and_a_foreign_key_is_caught() {
        let ca = Authority::generate("test CA").unwrap();
        let (cert, _) = ca
            .issue_server_for(&["pem.example", "127.0.0.1"], 30)
            .unwrap();
        check_issued(&cert, &ca.cert_pem).unwrap();
        let other = Authority::generate("other CA").unwrap();
        assert!(check_issued(&cert, &other.cert_pem).is_err());
        check_ca(&ca.cert_pem, Path::new("ca.crt")).unwrap();
        assert!(
            check_ca(&cert, Path::new("server.crt")).is_err(),
            "a leaf is no CA"
        );
    }
}
