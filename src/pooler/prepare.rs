//! `pemworker pooler prepare-server`: the guide's chapter 3, idempotently, and safer than the
//! recipe it follows (the README lists each difference).
//!
//! Each step first reads the catalog and changes only what differs, so a second run reports
//! nothing to change. New roles get passwords hashed here (SCRAM), so no plain password ever
//! reaches the server's statement log. On a server prepared by the guide's own SQL it upgrades
//! in place: the admin loses CREATEROLE (superuser-equivalent on PostgreSQL 15 and older) unless
//! `--keep-guide-createrole` says otherwise, and with pgBouncer on this host the auth user and
//! the pooled agent users lose their passwords, because pgBouncer logs in by peer.

use std::path::{Path, PathBuf};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use super::hba::{self, IDENT_MAP, Source};
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
    /// The operating-system user pgBouncer runs as, when it reaches the server over its Unix
    /// socket (`pgbouncer_from` is local): the ident map lets that user, and no other, log in
    /// as the auth user, the admin and the pooled agent users.
    pub pgbouncer_os_user: String,
    /// Set the passwords of existing auth and admin users again.
    pub reset_passwords: bool,
    /// Leave CREATEROLE on an admin that has it (the guide's literal recipe), with a warning.
    pub keep_guide_createrole: bool,
}

/// Runs every step; returns what changed and, without `pg_hba`, the lines to add by hand.
pub async fn run(
    settings: &ConnectSettings,
    opts: &Options,
) -> Result<(Report, Option<String>), Error> {
    check_os_user(&opts.pgbouncer_os_user)?;
    let mut report = Report::default();
    let client = connect_or_create_database(settings, opts.install_schema, &mut report).await?;
    let target = settings.target();

    let what = "checking the connecting user";
    let row = pool::query_one(
        &client,
        what,
        "SELECT rolsuper, current_setting('server_version_num')::int \
           FROM pg_catalog.pg_roles WHERE rolname = current_user",
        &[],
    )
    .await?;
    let is_super: bool = pool::get(&row, 0, what)?;
    let server_version: i32 = pool::get(&row, 1, what)?;
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
        install_ca(&client, &mut report).await?;
    } else {
        match schema::installed_version(&client).await? {
            None => {
                return Err(Error::SchemaMissing {
                    database: settings.dbname.clone(),
                    target,
                });
            }
            Some(found) if found < schema::latest_version() => {
                return Err(Error::SchemaOutdated {
                    database: settings.dbname.clone(),
                    target,
                    found,
                });
            }
            Some(_) => {}
        }
    }

    let local = opts.pgbouncer_from == Source::Local;
    // With peer logins the auth user needs no password, and one would only open the auth
    // query to whoever learns it.
    ensure_role(
        &client,
        &opts.auth_user,
        RolePassword::from(!local, AUTH_USER_PASSWORD_ENV),
        opts.reset_passwords,
        &mut report,
    )
    .await?;
    ensure_role(
        &client,
        &opts.admin_user,
        RolePassword::Required(ADMIN_USER_PASSWORD_ENV),
        opts.reset_passwords,
        &mut report,
    )
    .await?;
    ensure_no_createrole(
        &client,
        &opts.admin_user,
        server_version,
        opts.keep_guide_createrole,
        &mut report,
    )
    .await?;
    ensure_membership(&client, "pem_admin", &opts.admin_user, &mut report).await?;
    // The guide also makes the admin a member of pem_agent_pool. Here that gives it nothing (the
    // auth query never answers for administrators; pgBouncer knows the admin from its user
    // list), and pg_hba.conf rejects pem_agent_pool members that do not come through
    // pgBouncer, which would lock the admin out of direct logins.
    ensure_not_member(&client, "pem_agent_pool", &opts.admin_user, &mut report).await?;
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

    // The ident map first, so the peer line works the moment pg_hba.conf has it.
    configure_pooler(&client, opts, false, &mut report).await?;
    let block = hba::server_block(
        &settings.dbname,
        &[&opts.auth_user, &opts.admin_user],
        &opts.pgbouncer_from,
        &opts.pgbouncer_os_user,
    )?;
    let printed = match &opts.pg_hba {
        Some(file) => {
            edit_pg_hba(&client, file, &block, &mut report).await?;
            None
        }
        None => Some(block),
    };
    // Passwords of pooled agent users go only once PostgreSQL admits pgBouncer without them.
    let ready = !local || peer_lines_in_place(&client).await?;
    configure_pooler(&client, opts, ready, &mut report).await?;
    if !ready {
        report.unchanged(
            "pooled agent users keep their passwords until pg_hba.conf has the lines below; run prepare-server again then",
        );
    }
    Ok((report, printed))
}

/// An OS user name as pg_ident.conf and the server function accept it.
fn check_os_user(name: &str) -> Result<(), Error> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "pgBouncer OS user",
            value: name.to_string(),
            why: "give the operating-system user pgBouncer runs as, for example postgres".into(),
        })
    }
}

/// Whether the server's pg_hba.conf admits pgBouncer's peer logins for the pooled agent users
/// with our ident map.
async fn peer_lines_in_place(client: &Client) -> Result<bool, Error> {
    let what = "checking pg_hba.conf for pgBouncer's peer line";
    let map = format!("map={IDENT_MAP}");
    let row = pool::query_one(
        client,
        what,
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_hba_file_rules \
                         WHERE error IS NULL AND type = 'local' AND auth_method = 'peer' \
                           AND '+pem_agent_pool' = ANY (user_name) AND $1 = ANY (options))",
        &[(&map, Type::TEXT)],
    )
    .await?;
    Ok(pool::get(&row, 0, what)?)
}

/// Tells the server how pgBouncer reaches it (`pem.configure_pooler`), which keeps the ident
/// map and, with `align`, the pooled agent users' passwords in line with it.
async fn configure_pooler(
    client: &Client,
    opts: &Options,
    align: bool,
    report: &mut Report,
) -> Result<(), Error> {
    let login = match opts.pgbouncer_from {
        Source::Local => "peer",
        Source::Network(_) => "md5",
    };
    let os_user = (login == "peer").then_some(opts.pgbouncer_os_user.as_str());
    let address = match &opts.pgbouncer_from {
        Source::Local => None,
        Source::Network(c) => Some(c.as_str()),
    };
    let what = "recording how pgBouncer reaches the server";
    let rows = pool::query(
        client,
        what,
        "SELECT pem.configure_pooler($1, $2, $3::text::cidr, $4, $5, $6)",
        &[
            (&login, Type::TEXT),
            (&os_user, Type::TEXT),
            (&address, Type::TEXT),
            (&opts.auth_user, Type::TEXT),
            (&opts.admin_user, Type::TEXT),
            (&align, Type::BOOL),
        ],
    )
    .await?;
    for r in &rows {
        report.changed(pool::get::<String>(r, 0, what)?);
    }
    Ok(())
}

/// Makes the PEM CA where PEM's installer keeps it (the data directory), unless there is one:
/// the key is generated inside the server and never leaves it, and no file is ever replaced
/// (`etc/sql/install_ca.sql`).
async fn install_ca(client: &Client, report: &mut Report) -> Result<(), Error> {
    let what = "making the PEM CA";
    pool::batch(client, what, INSTALL_CA).await?;
    let rows = pool::query(
        client,
        what,
        "SELECT path, action FROM pg_temp.pemworker_install_ca()",
        &[],
    )
    .await?;
    for r in &rows {
        let path: String = pool::get(r, 0, what)?;
        let action: String = pool::get(r, 1, what)?;
        match action.as_str() {
            "created" => report.changed(format!("created the PEM CA's {path}")),
            "exists" => report.unchanged(format!("the PEM CA's {path} exists; kept as it is")),
            other => {
                tracing::warn!(
                    "{path} {other}: pgBouncer's client_tls_ca_file must hold the PEM CA certificate, or agents' certificates do not verify"
                );
                report.unchanged(format!("{path} {other}; kept as it is"));
            }
        }
    }
    pool::batch(client, what, "DROP FUNCTION pg_temp.pemworker_install_ca()").await?;
    Ok(())
}

/// The session-local function that makes the PEM CA.
const INSTALL_CA: &str = include_str!("../../etc/sql/install_ca.sql");

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
    let args: Vec<Option<&str>> = args.iter().copied().map(Some).collect();
    render_nullable(client, format_sql, &args).await
}

/// [`render`] where an argument may be NULL (`%L` renders it as NULL).
async fn render_nullable(
    client: &Client,
    format_sql: &str,
    args: &[Option<&str>],
) -> Result<String, Error> {
    let params: Vec<pool::Param<'_>> = args.iter().map(|a| (a as _, Type::TEXT)).collect();
    let what = "quoting names";
    let row = pool::query_one(client, what, format_sql, &params).await?;
    Ok(pool::get(&row, 0, what)?)
}

/// Whether a role needs a password, and where a new one comes from.
#[derive(Debug, Clone, Copy)]
enum RolePassword {
    Required(&'static str),
    /// None at all: an existing one is removed.
    Absent,
}

impl RolePassword {
    fn from(required: bool, env: &'static str) -> RolePassword {
        if required {
            RolePassword::Required(env)
        } else {
            RolePassword::Absent
        }
    }
}

/// A LOGIN role with or without a password, as `password` says. Never with CREATEROLE (see
/// [`ensure_no_createrole`]).
async fn ensure_role(
    client: &Client,
    role: &str,
    password: RolePassword,
    reset_password: bool,
    report: &mut Report,
) -> Result<(), Error> {
    let what = format!("checking role {role}");
    let row = pool::query_opt(
        client,
        &what,
        "SELECT a.rolcanlogin, a.rolpassword IS NOT NULL FROM pg_catalog.pg_authid a WHERE a.rolname = $1",
        &[(&role, Type::TEXT)],
    )
    .await?;
    let Some(row) = row else {
        let secret = match password {
            RolePassword::Required(env) => Some(scram_secret(&new_password(role, env)?)),
            RolePassword::Absent => None,
        };
        let sql = render_nullable(
            client,
            "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
            &[Some(role), secret.as_deref()],
        )
        .await?;
        pool::batch(client, &format!("creating role {role}"), &sql).await?;
        report.changed(match password {
            RolePassword::Required(_) => format!("created role {role} (LOGIN)"),
            RolePassword::Absent => {
                format!("created role {role} (LOGIN, no password: pgBouncer logs in as it by peer)")
            }
        });
        return Ok(());
    };
    let login: bool = pool::get(&row, 0, &what)?;
    let has_password: bool = pool::get(&row, 1, &what)?;
    if login {
        report.unchanged(format!("role {role} exists with LOGIN"));
    } else {
        let sql = render(
            client,
            "SELECT format('ALTER ROLE %I LOGIN', $1::text)",
            &[role],
        )
        .await?;
        pool::batch(client, &format!("altering role {role}"), &sql).await?;
        report.changed(format!("gave role {role} LOGIN"));
    }
    match password {
        RolePassword::Absent if has_password => {
            let sql = render(
                client,
                "SELECT format('ALTER ROLE %I PASSWORD NULL', $1::text)",
                &[role],
            )
            .await?;
            pool::batch(client, &format!("removing the password of {role}"), &sql).await?;
            report.changed(format!(
                "removed the password of {role}: pgBouncer logs in as it by peer, and a password would only open the auth query to whoever learns it"
            ));
        }
        RolePassword::Required(env) if reset_password || !has_password => {
            let secret = scram_secret(&new_password(role, env)?);
            let sql = render(
                client,
                "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)",
                &[role, &secret],
            )
            .await?;
            pool::batch(client, &format!("setting the password of {role}"), &sql).await?;
            report.changed(format!("set the password of role {role}"));
        }
        _ => {}
    }
    Ok(())
}

/// CREATEROLE on PostgreSQL 15 and older lets a role grant itself pg_execute_server_program
/// and so run programs as the server's OS user: the guide's admin is a superuser in disguise.
/// Registration needs no role rights of the admin (agent roles are made by server functions),
/// so it goes, unless the operator insists on the guide's literal recipe.
async fn ensure_no_createrole(
    client: &Client,
    role: &str,
    server_version: i32,
    keep: bool,
    report: &mut Report,
) -> Result<(), Error> {
    let what = format!("checking role {role}");
    let row = pool::query_one(
        client,
        &what,
        "SELECT rolcreaterole FROM pg_catalog.pg_roles WHERE rolname = $1",
        &[(&role, Type::TEXT)],
    )
    .await?;
    if !pool::get::<bool>(&row, 0, &what)? {
        report.unchanged(format!("role {role} has no CREATEROLE"));
        return Ok(());
    }
    let risk = createrole_risk(server_version);
    if keep {
        tracing::warn!(
            "role {role} keeps CREATEROLE as the guide's recipe has it (--keep-guide-createrole): {risk}"
        );
        report.unchanged(format!(
            "role {role} keeps CREATEROLE (--keep-guide-createrole): {risk}"
        ));
        return Ok(());
    }
    let sql = render(
        client,
        "SELECT format('ALTER ROLE %I NOCREATEROLE', $1::text)",
        &[role],
    )
    .await?;
    pool::batch(client, &format!("removing CREATEROLE from {role}"), &sql).await?;
    report.changed(format!(
        "removed CREATEROLE from {role}: {risk}; agent roles are made by server functions instead"
    ));
    Ok(())
}

/// What CREATEROLE on the admin means on this server version.
pub fn createrole_risk(server_version: i32) -> &'static str {
    if server_version < 160000 {
        "on PostgreSQL 15 and older CREATEROLE may grant any non-superuser role (pg_execute_server_program among them), so whoever has this role's password can run programs as the server's OS user, read the CA key and make itself superuser"
    } else {
        "CREATEROLE lets it create and change roles, which registration does not need"
    }
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

/// Revokes `group` from `member` if granted; `why` goes into the report.
async fn ensure_not_member(
    client: &Client,
    group: &str,
    member: &str,
    report: &mut Report,
) -> Result<(), Error> {
    let what = format!("checking whether {member} is in {group}");
    let row = pool::query_one(
        client,
        &what,
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m \
           JOIN pg_catalog.pg_roles g ON g.oid = m.roleid \
           JOIN pg_catalog.pg_roles u ON u.oid = m.member \
          WHERE g.rolname = $1 AND u.rolname = $2)",
        &[(&group, Type::TEXT), (&member, Type::TEXT)],
    )
    .await?;
    if pool::get::<bool>(&row, 0, &what)? {
        let sql = render(
            client,
            "SELECT format('REVOKE %I FROM %I', $1::text, $2::text)",
            &[group, member],
        )
        .await?;
        pool::batch(client, &format!("revoking {group} from {member}"), &sql).await?;
        report.changed(format!(
            "revoked {group} from {member}: the admin needs nothing of it, and pooled agent users may log in only through pgBouncer"
        ));
    } else {
        report.unchanged(format!("{member} is not a member of {group}"));
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
pub(crate) async fn edit_pg_hba(
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
