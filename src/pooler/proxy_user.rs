//! `pemworker pooler create-proxy-user NAME`: a common agent user for pgBouncer.
//!
//! The server function `pem.create_proxy_agent_user` does the work (random md5 password,
//! memberships, quoting); this side passes the name as a parameter, never inside SQL text.

use tokio_postgres::types::Type;

use super::Error;
use crate::connection::{self, ConnectSettings, pool};

/// Whether the role was created or already was an agent user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    AlreadyAgent,
}

pub async fn run(settings: &ConnectSettings, name: &str) -> Result<Outcome, Error> {
    if name.is_empty() || name.len() > 63 {
        return Err(Error::Invalid {
            what: "agent user name",
            value: name.to_string(),
            why: "it must be 1 to 63 bytes long".into(),
        });
    }
    let client = connection::connect(settings).await?;
    let existed: bool = pool::query_value(
        &client,
        &format!("checking role {name}"),
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
        &[(&name, Type::TEXT)],
    )
    .await?;
    pool::execute(
        &client,
        &format!("creating agent user {name}"),
        "SELECT pem.create_proxy_agent_user($1::varchar)",
        &[(&name, Type::TEXT)],
    )
    .await?;
    Ok(if existed {
        Outcome::AlreadyAgent
    } else {
        Outcome::Created
    })
}
