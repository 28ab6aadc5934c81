//! Certificate renewal: once the agent's certificate has lived `certificate_renewal_fraction` of
//! its lifetime (2/3 by default), the worker makes a new key (ECDSA P-256, as registration does)
//! and a CSR for its own login, has it signed by the PEM CA through its own session
//! (`pem.renew_agent_certificate`, authenticated by the login and by the agent's secret), and
//! puts key and certificate in place: each written to a new file and synced, the previous pair
//! kept as timestamped backups, then both renamed while no TLS context is being built
//! ([`tls::replace_files`]). The sessions with the PEM server are then renewed, so the next
//! heartbeat and delivery go out with the new certificate; samples wait in the spool meanwhile as
//! they always do, and heartbeats go on.
//!
//! A failed renewal is tried again with backoff, logged once per outage with what fixes it; an
//! expired certificate cannot be renewed through the login it no longer opens, so then the
//! connection errors name the file and the command that gets a new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::connection::{self, pool, tls};
use crate::fsutil::{self, Staged};
use crate::mac::{self, Kind};

/// The tracing target of the line a renewal logs; let through at the default level (warning),
/// since a new certificate is something an operator wants to see in the log.
pub const TARGET: &str = "pemworker::renewed";

const RENEW: &str = "SELECT pem.renew_agent_certificate($1, $2, $3, $4)";

/// The longest sleep between looks at the certificate file: one replaced by hand or by a new
/// registration is noticed within this time.
const LOOK_AGAIN: Duration = Duration::from_secs(600);

const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(3600);

/// Why a renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Connection(#[from] connection::Error),
    #[error("no session with the PEM server: {0}")]
    Unavailable(String),
    #[error("cannot make a new key: {0}")]
    Key(#[from] crate::certs::Error),
    #[error("the certificate the PEM server returned is unusable: {0}")]
    Reply(String),
    #[error("the certificate in use is not from the PEM CA: {0}")]
    OtherIssuer(String),
    #[error("writing the new key and certificate was interrupted: {0}")]
    Interrupted(String),
    #[error("{0}")]
    Files(#[from] fsutil::Error),
}

/// When a certificate file's certificate starts and ends.
pub fn validity(path: &Path) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let data = std::fs::read(path).ok()?;
    let cert = openssl::x509::X509::from_pem(&data).ok()?;
    Some((asn1_time(cert.not_before())?, asn1_time(cert.not_after())?))
}

fn asn1_time(t: &openssl::asn1::Asn1TimeRef) -> Option<DateTime<Utc>> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    DateTime::from_timestamp(i64::from(d.days) * 86_400 + i64::from(d.secs), 0)
}

/// When a certificate valid from `start` to `end` is due for renewal.
pub fn due(start: DateTime<Utc>, end: DateTime<Utc>, fraction: f64) -> DateTime<Utc> {
    let life = (end - start).num_milliseconds().max(0) as f64;
    start + chrono::Duration::milliseconds((life * fraction) as i64)
}

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX).expect("valid bounds");
    // The first failure of an outage is logged with its fix; the rest at debug level.
    let mut failing = false;
    // The end of the certificate this worker was issued last: one that is due again at once
    // (the PEM CA itself ends soon, and the signer ends certificates with it) is not renewed
    // over and over.
    let mut issued: Option<DateTime<Utc>> = None;
    loop {
        let c = shared.config();
        let wait = match (c.certificate_renewal_fraction, validity(&c.agent_ssl_crt)) {
            // Renewal off, or no certificate to read (the connection errors say why).
            (None, _) | (_, None) => LOOK_AGAIN,
            (Some(fraction), Some((start, end))) => {
                let now = Utc::now();
                let at = due(start, end, fraction);
                if end <= now {
                    // Expired: this login no longer opens, so nothing to try until the file
                    // is replaced (the connection errors name the command that does).
                    c.long_wait
                } else if now < at {
                    (at - now)
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .min(LOOK_AGAIN)
                } else if issued == Some(end) {
                    (end - now)
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .min(LOOK_AGAIN)
                } else {
                    match renew(&shared, &c).await {
                        Ok(until) => {
                            backoff.reset();
                            failing = false;
                            issued = Some(until);
                            let again = validity(&c.agent_ssl_crt)
                                .is_some_and(|(s, e)| due(s, e, fraction) <= Utc::now());
                            if again {
                                tracing::warn!(
                                    "the certificate the PEM server just issued ends on {}, already past \
                                     certificate_renewal_fraction of its life: the PEM server's CA certificate \
                                     probably ends then; renew the PEM CA",
                                    until.format("%Y-%m-%d %H:%M:%S UTC")
                                );
                            }
                            tracing::info!(
                                target: TARGET,
                                "renewed this agent's certificate {}: valid until {} (the previous one ended {}); \
                                 reconnecting with it",
                                c.agent_ssl_crt.display(),
                                until.format("%Y-%m-%d %H:%M:%S UTC"),
                                end.format("%Y-%m-%d %H:%M:%S UTC")
                            );
                            Duration::ZERO
                        }
                        Err(e) => {
                            // Retried at least four times before the certificate ends.
                            let delay = backoff.next_delay().min(
                                ((end - now) / 4)
                                    .to_std()
                                    .unwrap_or(RETRY_MIN)
                                    .max(RETRY_MIN),
                            );
                            if !failing {
                                failing = true;
                                tracing::error!(
                                    "cannot renew this agent's certificate {} (it expires on {}): {e}; {}; \
                                     trying again with backoff (now in {} s)",
                                    c.agent_ssl_crt.display(),
                                    end.format("%Y-%m-%d %H:%M:%S UTC"),
                                    fix(&e, &c),
                                    delay.as_secs()
                                );
                            } else {
                                tracing::debug!("certificate renewal failed again: {e}");
                            }
                            delay
                        }
                    }
                }
            }
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What the user can do about a failed renewal.
fn fix(e: &Error, c: &AgentConfig) -> String {
    let by_hand = c
        .pem_targets()
        .ok()
        .and_then(|t| t.into_iter().next())
        .map(|t| connection::renewal_command(&t))
        .unwrap_or_else(|| "pemworker --register-agent --force-registration ...".into());
    let undefined = matches!(e, Error::Connection(ce)
        if ce.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION));
    if undefined {
        format!(
            "the PEM server's schema has no pem.renew_agent_certificate (schema version 6): upgrade it with \
             `pemworker pooler prepare-server` on the PEM server, or renew by hand with: {by_hand}"
        )
    } else if matches!(e, Error::OtherIssuer(_)) {
        "nothing was changed".into()
    } else if matches!(e, Error::Files(fsutil::Error::Io { source, .. })
        if source.raw_os_error() == Some(nix::libc::EROFS))
    {
        format!(
            "{} is on a file system mounted read-only for this worker: under systemd, add its \
             directory to ReadWritePaths= of the unit (a drop-in), or renew by hand with: {by_hand}",
            c.agent_ssl_crt.display()
        )
    } else if matches!(e, Error::Files(_)) {
        format!(
            "let this worker's user write a new key and certificate beside {} (a 0700 directory it owns), or \
             renew by hand with: {by_hand}",
            c.agent_ssl_crt.display()
        )
    } else {
        format!("if it keeps failing, renew by hand with: {by_hand}")
    }
}

/// One renewal; the new certificate's end.
async fn renew(shared: &Shared, c: &AgentConfig) -> Result<DateTime<Utc>, Error> {
    let key = crate::certs::generate_key()?;
    let csr = crate::certs::csr_pem(&key, &c.agent_user)?;
    let manager = shared.pem();
    let mut session = manager
        .checkout()
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    let sent_at = mac::now();
    let signature = mac::sign(
        c.agent_secret.as_ref(),
        Kind::Certificate,
        c.agent_id,
        &sent_at,
        &csr,
    );
    let params: [pool::Param<'_>; 4] = [
        (&c.agent_id, Type::INT4),
        (&sent_at, Type::TEXT),
        (&csr, Type::TEXT),
        (&signature, Type::TEXT),
    ];
    let what = "renewing the agent's certificate";
    let mut tx = session.begin("a certificate renewal").await?;
    let rows = tx.query(what, RENEW, &params).await?;
    tx.commit().await?;
    drop(session);
    let cert: Option<String> = rows.first().map(|r| pool::get(r, 0, what)).transpose()?;
    let cert = cert.ok_or_else(|| Error::Reply("no certificate".into()))?;
    let until = check_issued(&cert, &key, c)?;
    let (key_path, crt_path) = (c.agent_ssl_key.clone(), c.agent_ssl_crt.clone());
    let key_pem = crate::secret::Secret::new(key.serialize_pem());
    tokio::task::spawn_blocking(move || install(&key_path, key_pem.expose(), &crt_path, &cert))
        .await
        .map_err(|e| Error::Interrupted(e.to_string()))??;
    // Sessions opened from now on present the new certificate; open ones are closed when given
    // back, so none outlives the old certificate.
    manager.reset();
    if let Some(hb) = shared.heartbeat.read().expect("manager lock").as_ref() {
        hb.reset();
    }
    Ok(until)
}

/// Checks what the server returned as registration does (strict DER, this login, the new key,
/// valid now, client authentication, signed by the root certificate the agent verifies the
/// PEM server with when it has one); the certificate's end.
fn check_issued(cert: &str, key: &rcgen::KeyPair, c: &AgentConfig) -> Result<DateTime<Utc>, Error> {
    let root = c
        .pem_targets()
        .ok()
        .and_then(|t| t.into_iter().next())
        .and_then(|t| t.root_cert);
    crate::registration::cert_check::check(cert, key, &c.agent_user, root.as_deref())
        .map_err(Error::Reply)?;
    let new = openssl::x509::X509::from_pem(cert.as_bytes())
        .map_err(|e| Error::Reply(format!("not a PEM certificate: {e}")))?;
    // A certificate from another CA (PEM 10's locally issued certificates) may not be trusted
    // where this agent logs in: such a certificate is renewed where it was issued, not here.
    if let Some(old) = std::fs::read(&c.agent_ssl_crt)
        .ok()
        .and_then(|d| openssl::x509::X509::from_pem(&d).ok())
    {
        let same = old
            .issuer_name()
            .try_cmp(new.issuer_name())
            .is_ok_and(|o| o.is_eq());
        if !same {
            return Err(Error::OtherIssuer(format!(
                "{} was issued by {}, and the PEM CA is {}: renew it with the CA that issued it, or set \
                 certificate_renewal_fraction=0",
                c.agent_ssl_crt.display(),
                name_text(old.issuer_name()),
                name_text(new.issuer_name())
            )));
        }
    }
    asn1_time(new.not_after()).ok_or_else(|| Error::Reply("unreadable notAfter".into()))
}

fn name_text(name: &openssl::x509::X509NameRef) -> String {
    name.entries()
        .filter_map(|e| {
            Some(format!(
                "{}={}",
                e.object().nid().short_name().ok()?,
                e.data().to_string().ok()?
            ))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Puts the new pair in place: both staged and synced beside their targets, the old pair
/// backed up, then both renamed while no TLS context reads them.
fn install(key_path: &Path, key_pem: &str, crt_path: &Path, cert: &str) -> Result<(), Error> {
    let crt_mode = std::fs::metadata(crt_path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o644)
        .unwrap_or(0o600);
    let staged = vec![
        Staged::write(key_path, key_pem.as_bytes(), 0o600, None)?,
        Staged::write(crt_path, cert.as_bytes(), crt_mode, None)?,
    ];
    let existing: Vec<PathBuf> = [key_path, crt_path]
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .map(Path::to_path_buf)
        .collect();
    fsutil::backup_all(&existing)?;
    tls::replace_files(|| fsutil::commit_all(staged))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_is_the_fraction_of_the_lifetime() {
        let start = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let end = start + chrono::Duration::seconds(120);
        assert_eq!(
            due(start, end, 2.0 / 3.0),
            start + chrono::Duration::seconds(80)
        );
        assert_eq!(
            due(end, start, 0.5),
            end,
            "a backwards validity is due at once"
        );
    }
}
