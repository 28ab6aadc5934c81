//! `--migrate-to-pooler`: moves an existing agent onto pgBouncer without a new agent id (the
//! guide's section 4.2, automated).
//!
//! The agent gets a certificate for the common agent user (signed now, or given files reused),
//! agent.cfg, key and certificate are backed up, agent.cfg is rewritten in place (agent_user
//! added, pem_port and the certificate paths changed, every other line kept), and then a login
//! through the pooler with the new settings must succeed; if it does not, agent.cfg is put back
//! and the new files removed. Then, with the PEM admin's session, the agent's row names its new
//! user; a worker running with this agent.cfg is told to reload (SIGHUP), and on request the
//! dedicated `agent<ID>` role it logged in as before is dropped and its key and certificate are
//! removed from this host, so the old credentials log in nowhere.

use std::path::{Path, PathBuf};

use tokio_postgres::types::Type;

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
    /// Drop the dedicated `agent<ID>` role the agent logged in as before, and remove its key
    /// and certificate from this host.
    pub retire_dedicated_role: bool,
}

#[derive(Debug, Clone)]
pub struct Migrated {
    pub agent_id: i32,
    pub backups: Vec<PathBuf>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The agent's row names the new user (false without the admin's session).
    pub recorded: bool,
    /// The role that was dropped and the files that were removed, with the flag.
    pub retired: Option<(String, Vec<PathBuf>)>,
    /// What happened to a running worker.
    pub reload: Reload,
}

/// Whether a worker with this agent.cfg was running, and what it was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// It was sent SIGHUP and reconnects with the new settings.
    Signalled(i32),
    /// It runs, but could not be signalled (another user's process): the reason.
    Failed(i32, String),
    /// No worker holds this agent.cfg's state directory (named when agent.cfg could be read).
    NotRunning(Option<PathBuf>),
}

pub async fn migrate(o: &Options) -> Result<Migrated, Error> {
    check_agent_user(&o.agent_user)?;
    let (mut doc, old) = AgentConfig::load_with_document(&o.config_file)?;
    let host = o
        .pem_host
        .clone()
        .unwrap_or_else(|| old.pem_host().to_string());
    let retire = match o.retire_dedicated_role {
        true => Some(retirable(o, &old)?),
        false => None,
    };

    // The admin's session: signing, the agent's row, retiring the old role.
    let admin = match &o.admin {
        Some(settings) => {
            let client = connection::connect(settings).await?;
            check_rights(&client, settings).await?;
            Some((client, settings))
        }
        None => None,
    };

    // 1. The certificate for the common agent user (and a write secret, if the agent has none).
    let mut secret_file = None;
    let (crt_path, key_path, staged) = match &o.reuse {
        Some((crt, key)) => (crt.clone(), key.clone(), Vec::new()),
        None => {
            let (client, admin) = admin.as_ref().ok_or_else(|| {
                Error::Missing("--migrate-to-pooler needs --pem-user (to have a certificate signed) or --agent-ssl-crt and --agent-ssl-key".into())
            })?;
            let (client, admin) = (client, *admin);
            let crt = super::cert_file(&o.cert_path, &o.agent_user);
            let key = super::key_file(&o.cert_path, &o.agent_user);
            refuse_existing(&crt, o.force)?;
            refuse_existing(&key, o.force)?;
            fsutil::ensure_dir(&o.cert_path, 0o700, None)?;
            super::check_key_dir(&o.cert_path)?;
            let sign = async {
                super::ensure_agent_user(client, admin, &o.agent_user, None).await?;
                let (k, c) =
                    super::obtain_certificate(client, &o.agent_user, admin.root_cert.as_deref())
                        .await?;
                // An agent registered before per-agent secrets gets one now.
                let secret = match &old.agent_secret {
                    Some(_) => None,
                    None => Some(super::issue_secret(client, old.agent_id).await?),
                };
                Ok::<_, Error>((k, c, secret))
            };
            let (k, c, secret) = pool::transaction(client, "the migration", sign).await?;
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

    // 4. The agent's row names its new user; the old dedicated role goes if asked.
    let mut backups = backups;
    let recorded = admin.is_some();
    let mut retired = None;
    if let Some((client, settings)) = &admin {
        let dropped = pool::transaction(client, "recording the agent's new user", async {
            pool::execute(
                client,
                "recording the agent's new user",
                "UPDATE pem.agent SET agent_user = $2 WHERE id = $1",
                &[(&old.agent_id, Type::INT4), (&o.agent_user, Type::TEXT)],
            )
            .await?;
            match &retire {
                Some(role) => {
                    let what = format!("dropping the dedicated role {role}");
                    let row = pool::query_one(
                        client,
                        &what,
                        "SELECT pem.drop_agent_user($1)",
                        &[(role, Type::TEXT)],
                    )
                    .await
                    .map_err(|e| super::lock_timeout(e, &what, settings))?;
                    Ok::<_, Error>(Some(pool::get::<bool>(&row, 0, &what)?))
                }
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| Error::MigrationFailed {
            code: e.exit_code(),
            what: format!(
                "agent {} now logs in through the pooler as {}, but the PEM server was not updated: {e}",
                old.agent_id, o.agent_user
            ),
            restored: format!(
                "{} keeps the new settings; run the same command again with --force-registration to finish",
                o.config_file.display()
            ),
        })?;
        if let (Some(role), Some(dropped)) = (&retire, dropped) {
            if !dropped {
                tracing::warn!(
                    "role {role} was not made by pemworker's agent-role functions (or is gone already); it was left as it is"
                );
            }
            // The old key and certificate, and the backups just made of them, leave this host.
            let old_files = [&old.agent_ssl_key, &old.agent_ssl_crt];
            let mut removed = Vec::new();
            for (orig, backup) in existing.iter().zip(backups.clone()) {
                if old_files.contains(orig) {
                    for f in [*orig, &backup] {
                        match std::fs::remove_file(f) {
                            Ok(()) => removed.push(f.clone()),
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(fsutil::Error::io("remove", f)(e).into()),
                        }
                    }
                    backups.retain(|b| b != &backup);
                }
            }
            retired = Some((if dropped { role.clone() } else { String::new() }, removed));
        }
    } else {
        tracing::warn!(
            "the PEM server still names {} as agent {}'s user (pem.agent.agent_user): give --pem-user to record the change",
            old.agent_user,
            old.agent_id
        );
    }

    // 5. A worker running with this agent.cfg reconnects with the new settings.
    let reload = reload_worker(&o.config_file);
    Ok(Migrated {
        agent_id: old.agent_id,
        backups,
        cert_file: crt_path,
        key_file: key_path,
        recorded,
        retired,
        reload,
    })
}

/// The dedicated role `--retire-dedicated-role` may drop: the `agent<ID>` role agent.cfg logged
/// in as, which is not the new agent user. Checked before anything changes.
fn retirable(o: &Options, old: &AgentConfig) -> Result<String, Error> {
    let dedicated = format!("agent{}", old.agent_id);
    let why = if o.admin.is_none() {
        Some("it needs --pem-user, the PEM admin who drops the role".to_string())
    } else if old.agent_user != dedicated {
        Some(format!(
            "agent {} logs in as {}, not as its dedicated role {dedicated}; a shared agent user is dropped only when no agent uses it (pemworker --unregister-agent)",
            old.agent_id, old.agent_user
        ))
    } else if o.agent_user == dedicated {
        Some(format!("{dedicated} is the agent user it moves to"))
    } else if o
        .reuse
        .as_ref()
        .is_some_and(|(c, k)| *c == old.agent_ssl_crt || *k == old.agent_ssl_key)
    {
        Some("the reused certificate or key is the one to retire".to_string())
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::Invalid {
            what: "--retire-dedicated-role",
            value: dedicated,
            why,
        }),
        None => Ok(dedicated),
    }
}

/// Sends SIGHUP to the worker holding the state directory of the (new) agent.cfg, if one runs.
fn reload_worker(config_file: &Path) -> Reload {
    let Ok((config, _)) = AgentConfig::load(config_file, &[]) else {
        return Reload::NotRunning(None);
    };
    let Some(pid) = crate::spool::lock::holder(&config.state_dir) else {
        return Reload::NotRunning(Some(config.state_dir));
    };
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    ) {
        Ok(()) => Reload::Signalled(pid),
        Err(e) => Reload::Failed(pid, e.desc().to_string()),
    }
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
