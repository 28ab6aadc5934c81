//! `pemworker pooler prepare-server`: the guide's chapter 3, idempotently.
//!
//! Each step first reads the catalog and changes only what differs, so a second run reports
//! nothing to change. New roles get passwords hashed here (SCRAM), so no plain password ever
//! reaches the server's statement log.

use std::path::{Path, PathBuf};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use super::hba::{self, Source};
use super::{ADMIN_USER_PASSWORD_ENV, AUTH_USER_PASSWORD_ENV, Error, Report, new_password};
use crate::connection::{self, ConnectSettings, pool};
use crate::{fsutil, schema};

/// What to prepare, checked before any connection is made.
#[derive(Debug, Clone)]
pub struct Options {
    /// pgBouncer's `auth_user` (the guide's `pgbouncer`).
    pub auth_user: String,
    /// The non-superuser PEM admin (the guide's `pem_admin1`).
    pub admin_user: String,
    pub install_schema: bool,
    /// The server's pg_hba.conf to insert the lines into; `None` prints them.
    pub pg_hba: Option<PathBuf>,
    pub pgbouncer_from: Source,
    /// Set the passwords of existing auth and admin users again.
    pub reset_passwords: bool,
}

/// Runs every step; returns what changed and, without `pg_hba`, the lines to add by hand.
pub async fn run(
    settings: &ConnectSettings,
    opts: &Options,
) -> Result<(Report, Option<String>), Error> {
    let mut report = Report::default();
    let client = connect_or_create_database(settings, opts.install_schema, &mut report).await?;
    let target = settings.target();

    let is_super: bool = pool::query_value(
        &client,
        "checking the connecting user",
        "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
        &[],
    )
    .await?;
    if !is_super {
        return Err(Error::NotSuperuser {
            user: settings.user.clone(),
            target,
        });
    }

    if opts.install_schema {
        let applied = schema::apply(&client).await?;
        if applied.is_empty() {
            report.unchanged(format!(
                "PEM schema is at version {}",
                schema::latest_version()
            ));
        } else {
            report.changed(format!("installed PEM schema version(s) {applied:?}"));
        }
    } else if schema::installed_version(&client).await?.is_none() {
        return Err(Error::SchemaMissing {
            database: settings.dbname.clone(),
            target,
        });
    }

    ensure_role(
        &client,
        &opts.auth_user,
        false,
        AUTH_USER_PASSWORD_ENV,
        opts.reset_passwords,
        &mut report,
    )
    .await?;
    ensure_role(
        &client,
        &opts.admin_user,
        true,
        ADMIN_USER_PASSWORD_ENV,
        opts.reset_passwords,
        &mut report,
    )
    .await?;
    for group in ["pem_admin", "pem_agent_pool"] {
        ensure_membership(&client, group, &opts.admin_user, &mut report).await?;
    }
    ensure_privilege(
        &client,
        Privilege::DatabaseConnect(&settings.dbname),
        &opts.auth_user,
        &mut report,
    )
    .await?;
    ensure_privilege(
        &client,
        Privilege::SchemaUsage("pem"),
        &opts.auth_user,
        &mut report,
    )
    .await?;
    ensure_privilege(
        &client,
        Privilege::FunctionExecute(AUTH_FUNCTION),
        &opts.auth_user,
        &mut report,
    )
    .await?;

    let block = hba::server_block(
        &settings.dbname,
        &[&opts.auth_user, &opts.admin_user],
        &opts.pgbouncer_from,
    )?;
    match &opts.pg_hba {
        Some(file) => {
            edit_pg_hba(&client, file, &block, &mut report).await?;
            Ok((report, None))
        }
        None => Ok((report, Some(block))),
    }
}

/// pgBouncer's auth_query function, as the guide names it.
pub const AUTH_FUNCTION: &str = "pem.get_agent_pool_auth(text)";

async fn connect_or_create_database(
    settings: &ConnectSettings,
    create: bool,
    report: &mut Report,
) -> Result<Client, Error> {
    match connection::connect(settings).await {
        Ok(c) => Ok(c),
        Err(e) if create && e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {
            let mut admin = settings.clone();
            admin.dbname = "postgres".into();
            let client = connection::connect(&admin).await?;
            let sql = render(
                &client,
                "SELECT format('CREATE DATABASE %I', $1::text)",
                &[&settings.dbname],
            )
            .await?;
            pool::batch(
                &client,
                &format!("creating database {}", settings.dbname),
                &sql,
            )
            .await?;
            report.changed(format!("created database {}", settings.dbname));
            Ok(connection::connect(settings).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Builds a utility statement on the server with `format()`, so identifiers and literals are
/// quoted by PostgreSQL's own rules whatever the names hold.
async fn render(client: &Client, format_sql: &str, args: &[&str]) -> Result<String, Error> {
    let params: Vec<pool::Param<'_>> = args.iter().map(|a| (a as _, Type::TEXT)).collect();
    Ok(pool::query_value(client, "quoting names", format_sql, &params).await?)
}

async fn ensure_role(
    client: &Client,
    role: &str,
    createrole: bool,
    password_env: &'static str,
    reset_password: bool,
    report: &mut Report,
) -> Result<(), Error> {
    let row = pool::query_opt(
        client,
        &format!("checking role {role}"),
        "SELECT rolcanlogin, rolcreaterole FROM pg_catalog.pg_roles WHERE rolname = $1",
        &[(&role, Type::TEXT)],
    )
    .await?;
    let attrs = if createrole {
        "LOGIN CREATEROLE"
    } else {
        "LOGIN"
    };
    match row {
        None => {
            let secret = scram_secret(&new_password(role, password_env)?);
            let sql = render(
                client,
                &format!("SELECT format('CREATE ROLE %I {attrs} PASSWORD %L', $1::text, $2::text)"),
                &[role, &secret],
            )
            .await?;
            pool::batch(client, &format!("creating role {role}"), &sql).await?;
            report.changed(format!("created role {role} ({attrs})"));
        }
        Some(r) => {
            let what = format!("checking role {role}");
            let (login, cr): (bool, bool) = (pool::get(&r, 0, &what)?, pool::get(&r, 1, &what)?);
            if !login || (createrole && !cr) {
                let sql = render(
                    client,
                    &format!("SELECT format('ALTER ROLE %I {attrs}', $1::text)"),
                    &[role],
                )
                .await?;
                pool::batch(client, &format!("altering role {role}"), &sql).await?;
                report.changed(format!("gave role {role} {attrs}"));
            } else {
                report.unchanged(format!("role {role} exists with {attrs}"));
            }
            if reset_password {
                let secret = scram_secret(&new_password(role, password_env)?);
                let sql = render(
                    client,
                    "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)",
                    &[role, &secret],
                )
                .await?;
                pool::batch(client, &format!("setting the password of {role}"), &sql).await?;
                report.changed(format!("set the password of role {role}"));
            }
        }
    }
    Ok(())
}

fn scram_secret(password: &crate::secret::Secret) -> String {
    postgres_protocol::password::scram_sha_256(password.expose().as_bytes())
}

async fn ensure_membership(
    client: &Client,
    group: &str,
    member: &str,
    report: &mut Report,
) -> Result<(), Error> {
    let is_member: bool = pool::query_value(
        client,
        &format!("checking whether {member} is in {group}"),
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m \
           JOIN pg_catalog.pg_roles g ON g.oid = m.roleid \
           JOIN pg_catalog.pg_roles u ON u.oid = m.member \
          WHERE g.rolname = $1 AND u.rolname = $2)",
        &[(&group, Type::TEXT), (&member, Type::TEXT)],
    )
    .await?;
    if is_member {
        report.unchanged(format!("{member} is a member of {group}"));
    } else {
        let sql = render(
            client,
            "SELECT format('GRANT %I TO %I', $1::text, $2::text)",
            &[group, member],
        )
        .await?;
        pool::batch(client, &format!("granting {group} to {member}"), &sql).await?;
        report.changed(format!("granted {group} to {member}"));
    }
    Ok(())
}

enum Privilege<'a> {
    DatabaseConnect(&'a str),
    SchemaUsage(&'a str),
    FunctionExecute(&'a str),
}

async fn ensure_privilege(
    client: &Client,
    p: Privilege<'_>,
    grantee: &str,
    report: &mut Report,
) -> Result<(), Error> {
    // An explicit ACL entry is looked for (aclexplode), not the effective right: CONNECT is
    // granted to PUBLIC by default and may be revoked later, so the guide grants it by name.
    let (check, grant, object, label) = match p {
        Privilege::DatabaseConnect(db) => (
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database d, aclexplode(d.datacl) a \
              WHERE d.datname = $1 AND a.grantee = $2::regrole AND a.privilege_type = 'CONNECT')",
            "SELECT format('GRANT CONNECT ON DATABASE %I TO %I', $1::text, $2::text)",
            db,
            format!("CONNECT on database {db}"),
        ),
        Privilege::SchemaUsage(schema) => (
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, aclexplode(n.nspacl) a \
              WHERE n.nspname = $1 AND a.grantee = $2::regrole AND a.privilege_type = 'USAGE')",
            "SELECT format('GRANT USAGE ON SCHEMA %I TO %I', $1::text, $2::text)",
            schema,
            format!("USAGE on schema {schema}"),
        ),
        Privilege::FunctionExecute(f) => (
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_proc p, aclexplode(p.proacl) a \
              WHERE p.oid = $1::regprocedure AND a.grantee = $2::regrole AND a.privilege_type = 'EXECUTE')",
            "SELECT format('GRANT EXECUTE ON FUNCTION %s TO %I', $1::regprocedure, $2::text)",
            f,
            format!("EXECUTE on function {f}"),
        ),
    };
    let quoted_grantee = render(client, "SELECT quote_ident($1::text)", &[grantee]).await?;
    let granted: bool = pool::query_value(
        client,
        &format!("checking {label} for {grantee}"),
        check,
        &[(&object, Type::TEXT), (&quoted_grantee, Type::TEXT)],
    )
    .await?;
    if granted {
        report.unchanged(format!("{grantee} has {label}"));
    } else {
        let sql = render(client, grant, &[object, grantee]).await?;
        pool::batch(client, &format!("granting {label} to {grantee}"), &sql).await?;
        report.changed(format!("granted {label} to {grantee}"));
    }
    Ok(())
}

/// Puts `block` at the start of `file`, which must be the server's own pg_hba.conf, then
/// reloads the server and checks that it accepts every line; if it does not, the backup is
/// restored and the server reloaded again.
async fn edit_pg_hba(
    client: &Client,
    file: &Path,
    block: &str,
    report: &mut Report,
) -> Result<(), Error> {
    let server_file: String = pool::query_value(
        client,
        "reading hba_file",
        "SELECT current_setting('hba_file')",
        &[],
    )
    .await?;
    let real = match (
        std::fs::canonicalize(file),
        std::fs::canonicalize(&server_file),
    ) {
        (Ok(a), Ok(b)) if a == b => a,
        _ => {
            return Err(Error::WrongHbaFile {
                given: file.to_path_buf(),
                server_file,
            });
        }
    };
    // The real file is edited (a link pointing to it stays a link), read without following
    // links, and written as its owner would (see fsutil).
    let file = real.as_path();
    let existing = String::from_utf8(fsutil::read_regular(file)?).map_err(|e| {
        fsutil::Error::io("read", file)(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })?;
    let Some(updated) = hba::place_block(&existing, block) else {
        report.unchanged(format!(
            "{} starts with the pemworker lines",
            file.display()
        ));
        return Ok(());
    };
    let meta = std::fs::metadata(file).map_err(fsutil::Error::io("read", file))?;
    let owner = {
        use std::os::unix::fs::MetadataExt;
        fsutil::Owner {
            name: String::new(),
            uid: nix::unistd::Uid::from_raw(meta.uid()),
            gid: nix::unistd::Gid::from_raw(meta.gid()),
        }
    };
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o7777
    };
    let backup = fsutil::backup(file)?;
    fsutil::Staged::write(file, updated.as_bytes(), mode, Some(&owner))?.commit()?;
    let errors = reload_and_check(client).await?;
    if !errors.is_empty() {
        fsutil::Staged::write(file, existing.as_bytes(), mode, Some(&owner))?.commit()?;
        reload_and_check(client).await?;
        return Err(Error::HbaRejected {
            file: file.to_path_buf(),
            backup,
            errors,
        });
    }
    report.changed(format!(
        "inserted the pemworker lines at the start of {} (backup {}) and reloaded the server",
        file.display(),
        backup.display()
    ));
    Ok(())
}

/// Reloads the configuration; returns the pg_hba.conf errors the server reports ("" if none).
async fn reload_and_check(client: &Client) -> Result<String, Error> {
    let errors: String = pool::query_value(
        client,
        "checking pg_hba.conf",
        "SELECT coalesce(string_agg(format('line %s: %s', line_number, error), '; '), '') \
           FROM pg_catalog.pg_hba_file_rules WHERE error IS NOT NULL",
        &[],
    )
    .await?;
    if errors.is_empty() {
        pool::execute(
            client,
            "reloading the server configuration",
            "SELECT pg_catalog.pg_reload_conf()",
            &[],
        )
        .await?;
    }
    Ok(errors)
}
