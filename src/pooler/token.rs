//! `pemworker pooler enrolment-token create|list|revoke`: registration tokens the PEM admin
//! hands to agent hosts instead of its password.
//!
//! The server makes the token (256 random bits) and keeps only its SHA-256, expiry, remaining
//! uses and constraints (an agent user, a group, a team); the token is shown once.

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::types::Type;

use super::Error;
use crate::connection::{self, ConnectSettings, pool};
use crate::fsutil::{self, Staged};
use crate::secret::Secret;

/// How a token looks: a prefix that says what it is, then 64 hexadecimal digits.
pub const PREFIX: &str = "pem-enrol-";

/// Whether `text` has a token's shape (checked before anything is sent).
pub fn well_formed(text: &str) -> bool {
    text.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == 64
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// `90s`, `15m`, `1h`, `7d` (or plain seconds).
pub fn parse_ttl(text: &str) -> Result<Duration, Error> {
    let invalid = || Error::Invalid {
        what: "token lifetime",
        value: text.to_string(),
        why: "use a number with s, m, h or d, for example 1h (at most 30d)".into(),
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split].parse().map_err(|_| invalid())?;
    let unit = match &t[split..] {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(invalid()),
    };
    let secs = n.checked_mul(unit).ok_or_else(invalid)?;
    if secs == 0 || secs > 30 * 86_400 {
        return Err(invalid());
    }
    Ok(Duration::from_secs(secs))
}

/// What a new token allows.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub ttl: Duration,
    pub uses: u32,
    /// The only agent user an agent enrolled with it may log in as (made if missing); `None`:
    /// each agent gets its own `agent<ID>` role.
    pub agent_user: Option<String>,
    pub group: Option<String>,
    pub team: Option<String>,
    /// Write the token to this file (0600) instead of standard output.
    pub output: Option<PathBuf>,
}

/// A token as `create` made it.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: i32,
    pub token: Secret,
    pub expires_at: String,
}

pub async fn create(settings: &ConnectSettings, o: &CreateOptions) -> Result<Created, Error> {
    if let Some(u) = &o.agent_user {
        crate::registration::check_agent_user(u).map_err(|e| Error::Invalid {
            what: "agent user",
            value: u.clone(),
            why: e.to_string(),
        })?;
    }
    if o.uses == 0 || o.uses > 10_000 {
        return Err(Error::Invalid {
            what: "number of uses",
            value: o.uses.to_string(),
            why: "it must be 1 to 10000".into(),
        });
    }
    if let Some(out) = &o.output {
        if out.exists() {
            return Err(fsutil::Error::Exists {
                path: out.clone(),
                flag: "another --output",
            }
            .into());
        }
    }
    let client = connection::connect(settings).await?;
    let secs = o.ttl.as_secs() as f64;
    let uses = o.uses as i32;
    let what = "creating an enrolment token";
    let row = pool::query_one(
        &client,
        what,
        "SELECT token_id, token, to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
           FROM pem.create_enrolment_token(make_interval(secs => $1), $2, $3, $4, $5)",
        &[
            (&secs, Type::FLOAT8),
            (&uses, Type::INT4),
            (&o.agent_user, Type::TEXT),
            (&o.group, Type::TEXT),
            (&o.team, Type::TEXT),
        ],
    )
    .await?;
    let created = Created {
        id: pool::get(&row, 0, what)?,
        token: Secret::new(pool::get::<String>(&row, 1, what)?),
        expires_at: pool::get(&row, 2, what)?,
    };
    if let Some(out) = &o.output {
        let text = format!("{}\n", created.token.expose());
        Staged::write(out, text.as_bytes(), 0o600, None)?.commit()?;
    }
    Ok(created)
}

/// One line of `list`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: i32,
    pub state: String,
    pub created: String,
    pub created_by: String,
    pub expires: String,
    pub uses: String,
    pub agent_user: Option<String>,
    pub group: Option<String>,
    pub team: Option<String>,
    pub agents: Vec<i32>,
}

pub async fn list(settings: &ConnectSettings) -> Result<Vec<Listed>, Error> {
    let client = connection::connect(settings).await?;
    let what = "listing enrolment tokens";
    let fmt = "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'";
    let rows = pool::query(
        &client,
        what,
        &format!(
            "SELECT token_id, state, to_char(created_at AT TIME ZONE 'UTC', {fmt}), created_by::text, \
                    to_char(expires_at AT TIME ZONE 'UTC', {fmt}), uses_left || ' of ' || uses_allowed, \
                    agent_user::text, group_name, team, coalesce(enrolled_agents, '{{}}') \
               FROM pem.enrolment_tokens()"
        ),
        &[],
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Listed {
                id: pool::get(r, 0, what)?,
                state: pool::get(r, 1, what)?,
                created: pool::get(r, 2, what)?,
                created_by: pool::get(r, 3, what)?,
                expires: pool::get(r, 4, what)?,
                uses: pool::get(r, 5, what)?,
                agent_user: pool::get(r, 6, what)?,
                group: pool::get(r, 7, what)?,
                team: pool::get(r, 8, what)?,
                agents: pool::get(r, 9, what)?,
            })
        })
        .collect()
}

impl std::fmt::Display for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "token {}: {}, {} uses left, expires {}, made {} by {}, agent user {}",
            self.id,
            self.state,
            self.uses,
            self.expires,
            self.created,
            self.created_by,
            self.agent_user.as_deref().unwrap_or("agent<ID>")
        )?;
        if let Some(g) = &self.group {
            write!(f, ", group {g}")?;
        }
        if let Some(t) = &self.team {
            write!(f, ", team {t}")?;
        }
        if !self.agents.is_empty() {
            let ids: Vec<String> = self.agents.iter().map(i32::to_string).collect();
            write!(f, ", enrolled agents {}", ids.join(", "))?;
        }
        Ok(())
    }
}

/// Revokes a token; false when it did not exist or was revoked already.
pub async fn revoke(settings: &ConnectSettings, id: i32) -> Result<bool, Error> {
    let client = connection::connect(settings).await?;
    let what = "revoking an enrolment token";
    let row = pool::query_opt(
        &client,
        what,
        "SELECT pem.revoke_enrolment_token($1)",
        &[(&id, Type::INT4)],
    )
    .await?;
    Ok(match row {
        Some(r) => pool::get::<Option<bool>>(&r, 0, what)?.unwrap_or(false),
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_and_token_shapes() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_ttl("120").unwrap(), Duration::from_secs(120));
        for bad in ["", "0s", "1w", "31d", "h", "-1m"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        let good = format!("{PREFIX}{}", "ab".repeat(32));
        assert!(well_formed(&good));
        assert!(!well_formed(&good[..good.len() - 1]));
        assert!(!well_formed(&good.to_uppercase()));
        assert!(!well_formed(&format!("x{good}")));
    }
}
