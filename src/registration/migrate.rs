//! `--migrate-to-pooler`: moves an existing agent onto pgBouncer without a new agent id (the
//! guide's section 4.2, automated).
//!
//! The agent gets a certificate for the common agent user (signed now, or given files reused),
//! agent.cfg, key and certificate are backed up, agent.cfg is rewritten in place (agent_user
//! added, pem_port and the certificate paths changed, every other line kept), and then a login
//! through the pooler with the new settings must succeed; if it does not, agent.cfg is put back
//! and the new files removed.

use std::path::{Path, PathBuf};

use super::{Error, agent_settings, check_active, check_agent_user, check_rights, refuse_existing};
use crate::config::AgentConfig;
use crate::connection::{self, ConnectSettings, TlsChoice, pool};
use crate::error::ExitCode;
use crate::fsutil::{self, Staged};

#[derive(Debug, Clone)]
pub struct Options {
    pub config_file: PathBuf,
    /// The pooler's host; agent.cfg's pem_host when `None`.
    pub pem_host: Option<String>,
    pub pooler_port: u16,
    pub agent_user: String,
    pub cert_path: PathBuf,
    /// The PEM admin's session (to have a certificate signed); `None` when reusing files.
    pub admin: Option<ConnectSettings>,
    /// Certificate and key for the agent user, copied from elsewhere (the guide's way).
    pub reuse: Option<(PathBuf, PathBuf)>,
    pub force: bool,
    /// sslmode and root certificate given on the command line, written into agent.cfg.
    pub tls: TlsChoice,
}

#[derive(Debug, Clone)]
pub struct Migrated {
    pub agent_id: i32,
    pub backups: Vec<PathBuf>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

pub async fn migrate(o: &Options) -> Result<Migrated, Error> {
    check_agent_user(&o.agent_user)?;
    let (mut doc, old) = AgentConfig::load_with_document(&o.config_file)?;
    let host = o
        .pem_host
        .clone()
        .unwrap_or_else(|| old.pem_host().to_string());

    // 1. The certificate for the common agent user (and a write secret, if the agent has none).
    let mut secret_file = None;
    let (crt_path, key_path, staged) = match &o.reuse {
        Some((crt, key)) => (crt.clone(), key.clone(), Vec::new()),
        None => {
            let admin = o.admin.as_ref().ok_or_else(|| {
                Error::Missing("--migrate-to-pooler needs --pem-user (to have a certificate signed) or --agent-ssl-crt and --agent-ssl-key".into())
            })?;
            let crt = super::cert_file(&o.cert_path, &o.agent_user);
            let key = super::key_file(&o.cert_path, &o.agent_user);
            refuse_existing(&crt, o.force)?;
            refuse_existing(&key, o.force)?;
            fsutil::ensure_dir(&o.cert_path, 0o700, None)?;
            super::check_key_dir(&o.cert_path)?;
            let client = connection::connect(admin).await?;
            check_rights(&client, admin).await?;
            let sign = async {
                super::ensure_agent_user(&client, admin, &o.agent_user, None).await?;
                let (k, c) =
                    super::obtain_certificate(&client, &o.agent_user, admin.root_cert.as_deref())
                        .await?;
                // An agent registered before per-agent secrets gets one now.
                let secret = match &old.agent_secret {
                    Some(_) => None,
                    None => Some(super::issue_secret(&client, old.agent_id).await?),
                };
                Ok::<_, Error>((k, c, secret))
            };
            let (k, c, secret) = pool::transaction(&client, "the migration", sign).await?;
            let mut staged = vec![
                Staged::write(&key, k.serialize_pem().as_bytes(), 0o600, None)?,
                Staged::write(&crt, c.as_bytes(), 0o600, None)?,
            ];
            if let Some(secret) = secret {
                let path = crate::mac::secret_file(&o.cert_path, old.agent_id);
                staged.push(Staged::write(
                    &path,
                    secret.file_contents().expose().as_bytes(),
                    0o600,
                    None,
                )?);
                secret_file = Some(path);
            }
            (crt, key, staged)
        }
    };

    // 2. Backups of everything the guide says to keep, then the new files.
    let existing: Vec<&PathBuf> = [&o.config_file, &old.agent_ssl_key, &old.agent_ssl_crt]
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    let backups = fsutil::backup_all(&existing)?;
    let Some(config_backup) = backups.first().cloned() else {
        return Err(Error::Missing(format!(
            "{} disappeared during the migration",
            o.config_file.display()
        )));
    };
    let mut created: Vec<PathBuf> = if staged.is_empty() {
        Vec::new()
    } else {
        vec![key_path.clone(), crt_path.clone()]
    };
    created.extend(secret_file.clone());
    for s in staged {
        s.commit()?;
    }
    doc.set("agent_user", &o.agent_user, Some("agent_id"));
    doc.set("pem_host", &host, None);
    doc.set("pem_port", &o.pooler_port.to_string(), None);
    doc.set("agent_ssl_key", &key_path.display().to_string(), None);
    doc.set("agent_ssl_crt", &crt_path.display().to_string(), None);
    if let Some(m) = o.tls.mode {
        doc.set("pem_ssl_mode", m.name(), None);
    }
    if let Some(r) = &o.tls.root_cert {
        let r = std::path::absolute(r).unwrap_or_else(|_| r.clone());
        doc.set("pem_ssl_root_cert", &r.display().to_string(), None);
    }
    if let Some(p) = &secret_file {
        doc.set("agent_secret_file", &p.display().to_string(), None);
    }
    let mode = file_mode(&o.config_file);
    Staged::write(&o.config_file, doc.render().as_bytes(), mode, None)?.commit()?;

    // 3. The new settings must work before we call it done.
    if let Err(e) = verify_login(&o.config_file).await {
        let restored = restore(&o.config_file, &config_backup, &created);
        let code = e.exit_code();
        return Err(Error::MigrationFailed {
            what: format!(
                "the agent cannot log in through the pooler at {host}:{} as {} with the new settings: {e}",
                o.pooler_port, o.agent_user
            ),
            restored,
            code: if code == ExitCode::Success {
                ExitCode::Connect
            } else {
                code
            },
        });
    }
    Ok(Migrated {
        agent_id: old.agent_id,
        backups,
        cert_file: crt_path,
        key_file: key_path,
    })
}

async fn verify_login(config_file: &Path) -> Result<(), Error> {
    let (_, id) = AgentConfig::load_with_document(config_file)?;
    let settings = agent_settings(&id)?;
    let client = connection::connect(&settings).await?;
    check_active(&client, &id, &settings.target()).await
}

fn file_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map_or(0o644, |m| m.permissions().mode() & 0o7777)
}

/// Puts agent.cfg back and removes the files this migration created; says what it did.
fn restore(config_file: &Path, backup: &Path, created: &[PathBuf]) -> String {
    let put_back = std::fs::read(backup)
        .map_err(|e| e.to_string())
        .and_then(|data| {
            Staged::write(config_file, &data, file_mode(backup), None)
                .and_then(Staged::commit)
                .map_err(|e| e.to_string())
        });
    for f in created {
        let _ = std::fs::remove_file(f);
    }
    match put_back {
        Ok(()) => format!(
            "{} was restored from {}; the agent keeps its previous settings",
            config_file.display(),
            backup.display()
        ),
        Err(e) => format!(
            "restoring {} from {} failed ({e}); copy the backup back by hand",
            config_file.display(),
            backup.display()
        ),
    }
}
