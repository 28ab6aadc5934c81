//! Proof of which agent sent a write. Many agents share one login through pgBouncer, so the
//! login says nothing about the agent id a heartbeat or a batch of samples carries. Registration
//! gives each agent a 32-byte secret (kept on the agent host in a 0600 file that agent.cfg names
//! with `agent_secret_file`, and on the server where only its definer functions read it), and
//! every write carries HMAC-SHA256 (hex) of `"<kind>\n<agent_id>\n<sent_at>\n<payload>"`, which
//! the server's `pem.authenticate_agent` checks.

use std::fmt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What a MAC covers; the server refuses a MAC made for another kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Heartbeat,
    Samples,
    Verify,
    /// A certificate renewal: the payload is the CSR.
    Certificate,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Heartbeat => "heartbeat",
            Kind::Samples => "samples",
            Kind::Verify => "verify",
            Kind::Certificate => "certificate",
        }
    }
}

/// Why an agent's secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the agent secret file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the agent secret file {} has group or world access; run chmod 0600 {}",
        path.display(),
        path.display()
    )]
    Permissions { path: PathBuf },
    #[error(
        "the agent secret file {} does not hold a secret (64 hexadecimal digits); register the agent again with --register-agent --force-registration",
        path.display()
    )]
    Malformed { path: PathBuf },
}

/// An agent's write secret. Never printed; compared in full.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentKey([u8; 32]);

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentKey(<redacted>)")
    }
}

impl AgentKey {
    /// The key from its hex form (as the server hands it out and the file keeps it).
    pub fn from_hex(text: &str) -> Option<AgentKey> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(AgentKey(bytes.try_into().ok()?))
    }

    /// Reads a secret file, refusing one that others may read (as libpq refuses such keys) and
    /// a symbolic link in its place.
    pub fn load(path: &Path) -> Result<AgentKey, Error> {
        let read = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::Permissions {
                path: path.to_path_buf(),
            });
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(&file, 256), &mut text)
            .map_err(read)?;
        AgentKey::from_hex(&text).ok_or_else(|| Error::Malformed {
            path: path.to_path_buf(),
        })
    }

    /// The file's contents: the hex key and a newline.
    pub fn file_contents(&self) -> crate::secret::Secret {
        crate::secret::Secret::new(format!("{}\n", hex::encode(self.0)))
    }

    /// HMAC-SHA256 (lowercase hex) of one message.
    pub fn sign(&self, kind: Kind, agent_id: i32, sent_at: &str, payload: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(kind.as_str().as_bytes());
        mac.update(b"\n");
        mac.update(agent_id.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(sent_at.as_bytes());
        mac.update(b"\n");
        mac.update(payload.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The MAC of a message, or an empty one without a key (an agent registered before secrets):
/// the server then refuses the write and says how to fix it, and the samples stay spooled.
pub fn sign(
    key: Option<&AgentKey>,
    kind: Kind,
    agent_id: i32,
    sent_at: &str,
    payload: &str,
) -> String {
    key.map(|k| k.sign(kind, agent_id, sent_at, payload))
        .unwrap_or_default()
}

/// Now, as the server reads it (`sent_at`): RFC 3339 with microseconds.
pub fn now() -> String {
    timestamp(chrono::Utc::now())
}

/// `at` as messages carry it.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Where registration keeps an agent's secret: beside its key, named after the agent id.
pub fn secret_file(cert_path: &Path, agent_id: i32) -> PathBuf {
    cert_path.join(format!("agent{agent_id}.secret"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_matches_a_known_hmac_sha256_vector() {
        // A 32-byte key of 0x0b and the message "heartbeat\n7\nt\nv", as Python's hmac module
        // (and the server's pgcrypto) compute it.
        let key = AgentKey([0x0b; 32]);
        assert_eq!(
            key.sign(Kind::Heartbeat, 7, "t", "v"),
            "60b1b5a87a6d7a7cd05a7bb8bee15d5f6b8ba97d8daebc0ea9d85130e7ec25a5"
        );
        assert_ne!(
            key.sign(Kind::Samples, 7, "t", "v"),
            key.sign(Kind::Heartbeat, 7, "t", "v")
        );
        assert_eq!(sign(None, Kind::Samples, 7, "t", "v"), "");
    }

    #[test]
    fn secret_files_are_private_and_well_formed() {
        let d = tempfile::tempdir().unwrap();
        let key = AgentKey([7; 32]);
        let p = d.path().join("agent1.secret");
        std::fs::write(&p, key.file_contents().expose()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(AgentKey::load(&p).unwrap(), key);
        assert!(!format!("{key:?}").contains("07"));

        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(AgentKey::load(&p), Err(Error::Permissions { .. })));

        let bad = d.path().join("bad.secret");
        std::fs::write(&bad, "not hex\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(AgentKey::load(&bad), Err(Error::Malformed { .. })));

        let link = d.path().join("link.secret");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(AgentKey::load(&link), Err(Error::Read { .. })));
    }
}
