//! The reference PEM server schema and its migrations.
//!
//! The real PEM server is proprietary; `etc/sql` holds the subset agents talk to, named as PEM
//! names it. Migrations are applied in version order, in one transaction, holding a lock on
//! `pem.schema_version` (so two installers cannot interleave; an agent cannot take it, unlike an
//! advisory lock), and recorded in `pem.schema_version`; applying again is a no-op.

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::connection::{Error, pool};

/// One schema version.
#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "reference PEM server schema: roles, agent registry, probes, auth and signing functions",
        sql: include_str!("../etc/sql/001_reference_schema.sql"),
    },
    Migration {
        version: 2,
        description: "worker: heartbeats, effective schedules, pgBouncer bindings",
        sql: include_str!("../etc/sql/002_worker.sql"),
    },
    Migration {
        version: 3,
        description: "server trust: agents write only through authenticated functions, agent roles without CREATEROLE",
        sql: include_str!("../etc/sql/003_server_trust.sql"),
    },
    Migration {
        version: 4,
        description: "enrolment tokens: registration without the admin's password",
        sql: include_str!("../etc/sql/004_enrolment.sql"),
    },
    Migration {
        version: 5,
        description: "agent users: concurrent registrations naming one agent user all succeed",
        sql: include_str!("../etc/sql/005_concurrent_agent_users.sql"),
    },
    Migration {
        version: 6,
        description: "certificate renewal: an agent has its own certificate renewed through its own login",
        sql: include_str!("../etc/sql/006_certificate_renewal.sql"),
    },
];

/// The newest version this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Creates the version table if needed and locks it: installers wait for each other, and
/// nobody without rights on the table (an agent) can hold them up.
const BOOTSTRAP: &str = "
CREATE SCHEMA IF NOT EXISTS pem;
CREATE TABLE IF NOT EXISTS pem.schema_version (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
LOCK TABLE pem.schema_version IN SHARE ROW EXCLUSIVE MODE;";

/// The installed version, or `None` when the schema is absent.
pub async fn installed_version(client: &Client) -> Result<Option<i32>, Error> {
    let what = "reading the PEM schema version";
    let exists: bool = pool::query_value(
        client,
        what,
        "SELECT to_regclass('pem.schema_version') IS NOT NULL",
        &[],
    )
    .await?;
    if !exists {
        return Ok(None);
    }
    pool::query_value::<Option<i32>>(
        client,
        what,
        "SELECT max(version) FROM pem.schema_version",
        &[],
    )
    .await
}

/// Applies every missing migration; returns the versions applied (empty when up to date).
pub async fn apply(client: &Client) -> Result<Vec<i32>, Error> {
    apply_up_to(client, latest_version()).await
}

/// Applies the missing migrations up to and including `version` (tests install an older
/// schema to check upgrades).
pub async fn apply_up_to(client: &Client, version: i32) -> Result<Vec<i32>, Error> {
    pool::transaction(
        client,
        "the schema installation",
        apply_in_transaction(client, version),
    )
    .await
}

async fn apply_in_transaction(client: &Client, up_to: i32) -> Result<Vec<i32>, Error> {
    pool::batch(client, "creating pem.schema_version", BOOTSTRAP).await?;
    let current: i32 = pool::query_value(
        client,
        "reading the PEM schema version",
        "SELECT coalesce(max(version), 0) FROM pem.schema_version",
        &[],
    )
    .await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.version > current && m.version <= up_to)
    {
        let what = format!(
            "applying PEM schema version {} ({})",
            m.version, m.description
        );
        pool::batch(client, &what, m.sql).await?;
        pool::execute(
            client,
            &what,
            "INSERT INTO pem.schema_version (version, description) VALUES ($1, $2)",
            &[(&m.version, Type::INT4), (&m.description, Type::TEXT)],
        )
        .await?;
        applied.push(m.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_strictly_ordered_and_hold_no_transaction_control() {
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last, "version {} out of order", m.version);
            last = m.version;
            let upper = m.sql.to_uppercase();
            for word in ["\nBEGIN;", "\nCOMMIT;", "\nROLLBACK;"] {
                assert!(
                    !upper.contains(word),
                    "migration {} contains {word:?}",
                    m.version
                );
            }
        }
    }
}
