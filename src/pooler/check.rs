//! `pemworker pooler check [--fix]`: inspects a running pooled setup end to end and says, for
//! each problem, what is wrong and how to fix it; `--fix` repairs what is safe to repair.
//!
//! - the PEM server, as a superuser: the admin's and auth user's attributes and memberships,
//!   the agent roles' passwords, role-level settings and memberships, the SECURITY DEFINER
//!   functions' owners, search_path and grants, agents' table privileges, TEMPORARY for PUBLIC,
//!   and the pg_hba rules (pgBouncer's peer line; rules that admit agent users from anywhere);
//! - pgBouncer's files (`--config-dir`): modes, plain-text passwords in the user list, the
//!   admin and statistics users, session reset, the auth query, trust lines;
//! - a certificate login through pgBouncer (`--pgbouncer-port`) with a key made in memory and
//!   a certificate the server signs for a pooled agent user.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use super::hba::{self, Source};
use super::{Error, prepare};
use crate::connection::{self, ConnectSettings, pool};
use crate::{fsutil, schema};

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// A superuser session with the PEM database.
    pub server: ConnectSettings,
    /// pgBouncer's configuration directory (pgbouncer.ini and the files it names).
    pub config_dir: Option<PathBuf>,
    /// The server's pg_hba.conf, for `--fix` to put pemworker's lines first.
    pub pg_hba: Option<PathBuf>,
    /// pgBouncer's address for the certificate login: host and port.
    pub pgbouncer: Option<(String, u16)>,
    pub fix: bool,
}

/// One finding and, once `--fix` ran, whether it was repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub problem: String,
    pub fix: String,
    repair: Option<Repair>,
}

/// A repair `--fix` may make: it touches only what the finding names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Repair {
    /// Utility statements run as the superuser, in one transaction.
    Sql(String),
    /// A file's mode.
    Chmod(PathBuf, u32),
    /// The user list with plain-text passwords replaced by SCRAM verifiers of themselves.
    ScramUserlist(PathBuf),
    /// pemworker's block put first in pg_hba.conf (needs `--pg-hba`).
    HbaBlock,
}

/// Everything one run found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ok: Vec<String>,
    pub problems: Vec<Finding>,
    pub fixed: Vec<String>,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for o in &self.ok {
            writeln!(f, "ok:      {o}")?;
        }
        for x in &self.fixed {
            writeln!(f, "fixed:   {x}")?;
        }
        for p in &self.problems {
            writeln!(f, "problem: {}; fix: {}", p.problem, p.fix)?;
        }
        match self.problems.len() {
            0 => write!(f, "no problems found"),
            1 => write!(f, "1 problem"),
            n => write!(f, "{n} problems"),
        }
    }
}

struct Collector<'a> {
    out: &'a mut Outcome,
}

impl Collector<'_> {
    fn ok(&mut self, what: impl Into<String>) {
        self.out.ok.push(what.into());
    }

    fn problem(
        &mut self,
        problem: impl Into<String>,
        fix: impl Into<String>,
        repair: Option<Repair>,
    ) {
        self.out.problems.push(Finding {
            problem: problem.into(),
            fix: fix.into(),
            repair,
        });
    }
}

/// Checks, repairs with `fix`, and checks again; the outcome lists what is still wrong.
pub async fn run(opts: &Options) -> Result<Outcome, Error> {
    let client = connection::connect(&opts.server).await?;
    let first = inspect(&client, opts).await?;
    if !opts.fix || first.problems.iter().all(|p| p.repair.is_none()) {
        return Ok(first);
    }
    let fixed = repair(&client, opts, &first).await?;
    let mut again = inspect(&client, opts).await?;
    again.fixed = fixed;
    Ok(again)
}

/// The server's record of how pgBouncer reaches it.
struct PoolerConfig {
    peer: bool,
    address: Option<String>,
    auth_user: String,
    admin_user: String,
}

async fn inspect(client: &Client, opts: &Options) -> Result<Outcome, Error> {
    let mut out = Outcome::default();
    let mut c = Collector { out: &mut out };
    let target = opts.server.target();

    let what = "checking the connecting user";
    let row = pool::query_one(
        client,
        what,
        "SELECT rolsuper, current_setting('server_version_num')::int FROM pg_catalog.pg_roles WHERE rolname = current_user",
        &[],
    )
    .await?;
    if !pool::get::<bool>(&row, 0, what)? {
        return Err(Error::NotSuperuser {
            user: opts.server.user.clone(),
            target,
        });
    }
    let version: i32 = pool::get(&row, 1, what)?;
    match schema::installed_version(client).await? {
        None => {
            return Err(Error::SchemaMissing {
                database: opts.server.dbname.clone(),
                target,
            });
        }
        Some(found) if found < schema::latest_version() => {
            return Err(Error::SchemaOutdated {
                database: opts.server.dbname.clone(),
                target,
                found,
            });
        }
        Some(_) => {}
    }

    let what = "reading pem.pooler_config";
    let row = pool::query_one(
        client,
        what,
        "SELECT server_login = 'peer', pgbouncer_os_user, pgbouncer_address::text, \
                coalesce(auth_user::text, 'pgbouncer'), coalesce(admin_user::text, 'pem_admin1') \
           FROM pem.pooler_config",
        &[],
    )
    .await?;
    let cfg = PoolerConfig {
        peer: pool::get(&row, 0, what)?,
        address: pool::get(&row, 2, what)?,
        auth_user: pool::get(&row, 3, what)?,
        admin_user: pool::get(&row, 4, what)?,
    };

    check_admin_and_auth_user(client, &cfg, version, &mut c).await?;
    check_agent_roles(client, &cfg, &mut c).await?;
    check_functions_and_privileges(client, &mut c).await?;
    check_pg_hba(client, &cfg, opts, &mut c).await?;
    if let Some(dir) = &opts.config_dir {
        check_pgbouncer_files(dir, &mut c);
    }
    if let Some((host, port)) = &opts.pgbouncer {
        check_certificate_login(client, opts, host, *port, &mut c).await?;
    }
    Ok(out)
}

fn quoted(client_side: &str) -> String {
    format!("\"{}\"", client_side.replace('"', "\"\""))
}

async fn check_admin_and_auth_user(
    client: &Client,
    cfg: &PoolerConfig,
    version: i32,
    c: &mut Collector<'_>,
) -> Result<(), Error> {
    let what = "checking the admin and auth users";
    let rows = pool::query(
        client,
        what,
        "SELECT a.rolname::text, a.rolsuper, a.rolcreaterole, a.rolpassword IS NOT NULL, \
                EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m \
                         WHERE m.member = a.oid AND m.roleid = 'pem_agent_pool'::regrole) \
           FROM pg_catalog.pg_authid a WHERE a.rolname::text = ANY ($1)",
        &[(
            &vec![cfg.admin_user.clone(), cfg.auth_user.clone()],
            Type::TEXT_ARRAY,
        )],
    )
    .await?;
    let mut seen = HashMap::new();
    for r in &rows {
        let name: String = pool::get(r, 0, what)?;
        seen.insert(name.clone(), ());
        let (sup, createrole, password, pooled): (bool, bool, bool, bool) = (
            pool::get(r, 1, what)?,
            pool::get(r, 2, what)?,
            pool::get(r, 3, what)?,
            pool::get(r, 4, what)?,
        );
        let role = quoted(&name);
        if sup {
            c.problem(
                format!("{name} is a superuser"),
                format!("ALTER ROLE {role} NOSUPERUSER"),
                None,
            );
        }
        if name == cfg.admin_user {
            if createrole {
                c.problem(
                    format!(
                        "the admin {name} has CREATEROLE: {}",
                        prepare::createrole_risk(version)
                    ),
                    format!(
                        "ALTER ROLE {role} NOCREATEROLE (agent roles are made by server functions)"
                    ),
                    Some(Repair::Sql(format!("ALTER ROLE {role} NOCREATEROLE"))),
                );
            } else {
                c.ok(format!("the admin {name} has no CREATEROLE"));
            }
            if pooled {
                c.problem(
                    format!("the admin {name} is a member of pem_agent_pool, whose members pg_hba.conf admits only through pgBouncer"),
                    format!("REVOKE pem_agent_pool FROM {role}"),
                    Some(Repair::Sql(format!("REVOKE pem_agent_pool FROM {role}"))),
                );
            }
        } else if cfg.peer && password {
            c.problem(
                format!("the auth user {name} has a password, though pgBouncer logs in as it by peer: whoever learns it may run the auth query"),
                format!("ALTER ROLE {role} PASSWORD NULL"),
                Some(Repair::Sql(format!("ALTER ROLE {role} PASSWORD NULL"))),
            );
        } else if cfg.peer {
            c.ok(format!("the auth user {name} has no password"));
        }
    }
    for name in [&cfg.admin_user, &cfg.auth_user] {
        if !seen.contains_key(name) {
            c.problem(
                format!("role {name} does not exist"),
                "run pemworker pooler prepare-server".to_string(),
                None,
            );
        }
    }
    Ok(())
}

async fn check_agent_roles(
    client: &Client,
    cfg: &PoolerConfig,
    c: &mut Collector<'_>,
) -> Result<(), Error> {
    let what = "checking the agent roles";
    let rows = pool::query(
        client,
        what,
        "SELECT ar.role_name::text, a.rolpassword, a.rolpassword IS DISTINCT FROM ar.password, \
                EXISTS (SELECT 1 FROM pg_catalog.pg_db_role_setting s WHERE s.setrole = a.oid), \
                (SELECT pg_catalog.string_agg(m.roleid::regrole::text, ', ' ORDER BY 1) \
                   FROM pg_catalog.pg_auth_members m \
                  WHERE m.member = a.oid AND m.roleid NOT IN ('pem_agent'::regrole, 'pem_agent_pool'::regrole)) \
           FROM pem.agent_role ar JOIN pg_catalog.pg_authid a ON a.oid = ar.role_oid AND a.rolname = ar.role_name \
          ORDER BY 1",
        &[],
    )
    .await?;
    let mut clean = 0;
    for r in &rows {
        let name: String = pool::get(r, 0, what)?;
        let password: Option<String> = pool::get(r, 1, what)?;
        let changed: bool = pool::get(r, 2, what)?;
        let settings: bool = pool::get(r, 3, what)?;
        let extra: Option<String> = pool::get(r, 4, what)?;
        let repair = Some(Repair::Sql("SELECT pem.repair_agent_roles()".into()));
        if settings {
            c.problem(
                format!("agent user {name} has role-level settings, which every agent sharing it gets at its next login"),
                format!("ALTER ROLE {} RESET ALL (and IN DATABASE ... RESET ALL)", quoted(&name)),
                repair.clone(),
            );
        }
        if changed {
            let kind = match password.as_deref() {
                Some(p) if p.starts_with("SCRAM-SHA-256$") => {
                    "a SCRAM secret (set with ALTER ROLE ... PASSWORD): pgBouncer cannot log in with it for an agent that authenticated by certificate, and it is a password for direct logins"
                }
                Some(_) if cfg.peer => {
                    "a password, though pgBouncer logs in by peer: a key for direct logins"
                }
                Some(_) => "another secret than the one recorded for pgBouncer",
                None => "no secret, though pgBouncer logs in with the recorded md5 secret",
            };
            c.problem(
                format!("agent user {name} has {kind}"),
                "SELECT pem.repair_agent_roles() as a superuser".to_string(),
                repair.clone(),
            );
        }
        if let Some(extra) = &extra {
            c.problem(
                format!("agent user {name} is also a member of {extra}, so the auth query no longer answers for it"),
                format!("REVOKE {extra} FROM {}", quoted(&name)),
                None,
            );
        }
        if !settings && !changed && extra.is_none() {
            clean += 1;
        }
    }
    c.ok(format!(
        "{clean} of {} agent roles are plain logins without role-level settings or stray secrets",
        rows.len()
    ));
    Ok(())
}

async fn check_functions_and_privileges(
    client: &Client,
    c: &mut Collector<'_>,
) -> Result<(), Error> {
    let what = "checking the PEM server's functions";
    let rows = pool::query(
        client,
        what,
        "SELECT p.oid::regprocedure::text, o.rolname::text, o.rolsuper, \
                coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false), \
                EXISTS (SELECT 1 FROM pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) x \
                         WHERE x.grantee = 0 AND x.privilege_type = 'EXECUTE') \
           FROM pg_catalog.pg_proc p \
           JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
           JOIN pg_catalog.pg_roles o ON o.oid = p.proowner \
          WHERE n.nspname = 'pem' AND p.prosecdef ORDER BY 1",
        &[],
    )
    .await?;
    let mut bad = 0;
    for r in &rows {
        let f: String = pool::get(r, 0, what)?;
        let owner: String = pool::get(r, 1, what)?;
        let owner_super: bool = pool::get(r, 2, what)?;
        let pinned: bool = pool::get(r, 3, what)?;
        let public: bool = pool::get(r, 4, what)?;
        let writer = f.starts_with("pem.record_heartbeat(") || f.starts_with("pem.store_samples(");
        if writer && owner != "pem_writer" {
            bad += 1;
            c.problem(
                format!("{f} belongs to {owner}, not to pem_writer"),
                format!("ALTER FUNCTION {f} OWNER TO pem_writer"),
                Some(Repair::Sql(format!(
                    "ALTER FUNCTION {f} OWNER TO pem_writer"
                ))),
            );
        } else if !writer && !owner_super {
            bad += 1;
            c.problem(
                format!(
                    "SECURITY DEFINER function {f} belongs to {owner}, who can change what it does"
                ),
                format!("ALTER FUNCTION {f} OWNER TO postgres, or reinstall the schema"),
                None,
            );
        }
        if !pinned {
            bad += 1;
            c.problem(
                format!("SECURITY DEFINER function {f} does not pin search_path"),
                format!("ALTER FUNCTION {f} SET search_path = pg_catalog, pg_temp"),
                Some(Repair::Sql(format!(
                    "ALTER FUNCTION {f} SET search_path = pg_catalog, pg_temp"
                ))),
            );
        }
        if public {
            bad += 1;
            c.problem(
                format!("anybody may execute SECURITY DEFINER function {f}"),
                format!("REVOKE EXECUTE ON FUNCTION {f} FROM PUBLIC"),
                Some(Repair::Sql(format!(
                    "REVOKE EXECUTE ON FUNCTION {f} FROM PUBLIC"
                ))),
            );
        }
    }
    if bad == 0 {
        c.ok(format!(
            "{} SECURITY DEFINER functions have the right owner, a pinned search_path and no PUBLIC grant",
            rows.len()
        ));
    }

    let what = "checking the agents' table privileges";
    let rows = pool::query(
        client,
        what,
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) \
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname IN ('pem', 'pemdata', 'pemhistory') AND c.relkind IN ('r', 'v', 'p', 'm') \
            AND pg_catalog.has_table_privilege('pem_agent', c.oid, \
                  'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') \
          ORDER BY 1",
        &[],
    )
    .await?;
    let tables: Vec<String> = rows
        .iter()
        .map(|r| pool::get(r, 0, what))
        .collect::<Result<_, _>>()?;
    if tables.is_empty() {
        c.ok("agents hold no table privileges; they write through authenticated functions only");
    } else {
        let sql =
            "REVOKE ALL ON ALL TABLES IN SCHEMA pem, pemdata, pemhistory FROM pem_agent, PUBLIC";
        c.problem(
            format!(
                "agents (pem_agent) hold privileges on {}, so one agent can change or lock what others write",
                tables.join(", ")
            ),
            sql.to_string(),
            Some(Repair::Sql(sql.into())),
        );
    }

    let what = "checking TEMPORARY on the PEM database";
    let row = pool::query_one(
        client,
        what,
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database d, \
                        pg_catalog.aclexplode(coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) x \
                  WHERE d.datname = current_database() AND x.grantee = 0 AND x.privilege_type = 'TEMPORARY'), \
                pg_catalog.quote_ident(current_database())",
        &[],
    )
    .await?;
    let db: String = pool::get(&row, 1, what)?;
    if pool::get::<bool>(&row, 0, what)? {
        let sql = format!("REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC");
        c.problem(
            "anybody may create temporary tables in the PEM database, which can shadow names and outlive a pooled transaction",
            sql.clone(),
            Some(Repair::Sql(sql)),
        );
    } else {
        c.ok("PUBLIC may not create temporary tables in the PEM database");
    }
    Ok(())
}

async fn check_pg_hba(
    client: &Client,
    cfg: &PoolerConfig,
    opts: &Options,
    c: &mut Collector<'_>,
) -> Result<(), Error> {
    let what = "checking pg_hba.conf";
    let rows = pool::query(
        client,
        what,
        "SELECT line_number, type, database, user_name, coalesce(address, ''), coalesce(netmask, ''), \
                auth_method, coalesce(options, '{}') \
           FROM pg_catalog.pg_hba_file_rules WHERE error IS NULL ORDER BY line_number",
        &[],
    )
    .await?;
    let agents: Vec<String> = pool::query(
        client,
        what,
        "SELECT role_name::text FROM pem.agent_role",
        &[],
    )
    .await?
    .iter()
    .map(|r| pool::get(r, 0, what))
    .collect::<Result<_, _>>()?;
    let hba_fix = opts.pg_hba.as_ref().map(|_| Repair::HbaBlock);
    let block_fix = "put pemworker's lines first in pg_hba.conf (pemworker pooler prepare-server --pg-hba FILE, or pooler check --fix --pg-hba FILE)";
    let map = format!("map={}", hba::IDENT_MAP);
    let mut peer_line = false;
    let mut shadowed = false;
    let mut wide = Vec::new();
    for r in &rows {
        let line: i32 = pool::get(r, 0, what)?;
        let kind: String = pool::get(r, 1, what)?;
        let dbs: Vec<String> = pool::get(r, 2, what)?;
        let users: Vec<String> = pool::get(r, 3, what)?;
        let address: String = pool::get(r, 4, what)?;
        let netmask: String = pool::get(r, 5, what)?;
        let method: String = pool::get(r, 6, what)?;
        let options: Vec<String> = pool::get(r, 7, what)?;
        let for_agents = users.iter().any(|u| {
            u == "all" || u == "+pem_agent_pool" || u == "+pem_agent" || agents.contains(u)
        });
        if kind == "local"
            && method == "peer"
            && users.iter().any(|u| u == "+pem_agent_pool")
            && options.contains(&map)
        {
            peer_line = true;
        }
        if shadowed || !kind.starts_with("host") {
            continue;
        }
        if method == "reject"
            && users.iter().any(|u| u == "+pem_agent_pool")
            && dbs.iter().any(|d| d == "all")
            && address == "all"
        {
            // Our reject line: what follows cannot admit pooled agent users over TCP.
            shadowed = true;
            continue;
        }
        let anywhere = address == "all" || netmask == "0.0.0.0" || netmask == "::";
        let pem_db = dbs
            .iter()
            .any(|d| d == "all" || d == &opts.server.dbname || d == "sameuser");
        if for_agents && anywhere && pem_db && method != "reject" {
            wide.push(format!(
                "line {line} ({kind} {} {} {method})",
                dbs.join(","),
                users.join(",")
            ));
        }
    }
    if cfg.peer {
        if peer_line {
            c.ok("pg_hba.conf admits pgBouncer's peer logins for the pooled agent users");
        } else {
            c.problem(
                "pg_hba.conf has no peer line for pgBouncer and the pooled agent users",
                block_fix,
                hba_fix.clone(),
            );
        }
    }
    if wide.is_empty() {
        c.ok("no pg_hba.conf rule admits agent users from anywhere");
    } else {
        c.problem(
            format!(
                "pg_hba.conf admits agent users from anywhere: {}",
                wide.join("; ")
            ),
            block_fix,
            hba_fix,
        );
    }
    if cfg.address.as_deref().is_some_and(|a| a.ends_with("/0")) {
        c.problem(
            format!(
                "pgBouncer's address is recorded as {}, which admits agent users' md5 secrets from anywhere",
                cfg.address.as_deref().unwrap_or_default()
            ),
            "pemworker pooler prepare-server --pgbouncer-address with pgBouncer's own address",
            None,
        );
    }
    Ok(())
}

/// pgbouncer.ini as pgBouncer reads it (sections, `key = value`, `;` and `#` comments).
fn read_ini(path: &Path) -> Result<configparser::ini::Ini, String> {
    let mut ini = configparser::ini::Ini::new();
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    ini.read(text)?;
    Ok(ini)
}

fn check_mode(path: &Path, max: u32, what: &str, c: &mut Collector<'_>) {
    match std::fs::metadata(path) {
        Err(e) => c.problem(
            format!("cannot read {what} {}: {e}", path.display()),
            "rerun pemworker pooler configure".to_string(),
            None,
        ),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & !max != 0 {
                let others = if mode & 0o004 != 0 {
                    "readable by everybody"
                } else {
                    "open to its group"
                };
                c.problem(
                    format!("{what} {} is {others} (mode {mode:04o})", path.display()),
                    format!("chmod {max:04o} {}", path.display()),
                    Some(Repair::Chmod(path.to_path_buf(), max)),
                );
            } else {
                c.ok(format!("{what} {} is mode {mode:04o}", path.display()));
            }
        }
    }
}

/// The user list's entries: quoted user, quoted secret.
fn userlist_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.is_empty() || l.starts_with(';') || l.starts_with('#') {
                return None;
            }
            let mut fields = Vec::new();
            let mut rest = l;
            while let Some(start) = rest.find('"') {
                let mut value = String::new();
                let mut chars = rest[start + 1..].char_indices();
                let mut end = None;
                while let Some((i, ch)) = chars.next() {
                    if ch == '"' {
                        if rest[start + 1 + i + 1..].starts_with('"') {
                            value.push('"');
                            chars.next();
                        } else {
                            end = Some(start + 1 + i + 1);
                            break;
                        }
                    } else {
                        value.push(ch);
                    }
                }
                fields.push(value);
                rest = &rest[end?..];
            }
            (fields.len() >= 2).then(|| (fields[0].clone(), fields[1].clone()))
        })
        .collect()
}

fn is_verifier(secret: &str) -> bool {
    secret.starts_with("SCRAM-SHA-256$") || (secret.len() == 35 && secret.starts_with("md5"))
}

/// A user list entry that holds a password in plain text. The enrolment login's empty entry is
/// none: pgBouncer trusts that login over TLS, and it can do nothing but present a token.
fn is_plain_password(user: &str, secret: &str) -> bool {
    let enrolment = user == hba::ENROLMENT_USER && secret.is_empty();
    !(is_verifier(secret) || enrolment)
}

fn check_pgbouncer_files(dir: &Path, c: &mut Collector<'_>) {
    check_mode(dir, 0o700, "pgBouncer's configuration directory", c);
    let ini_path = super::bouncer::ini_path(dir);
    let ini = match read_ini(&ini_path) {
        Ok(i) => i,
        Err(e) => {
            c.problem(
                format!("cannot read {}: {e}", ini_path.display()),
                "rerun pemworker pooler configure".to_string(),
                None,
            );
            return;
        }
    };
    check_mode(&ini_path, 0o600, "pgbouncer.ini", c);
    let get = |k: &str| ini.get("pgbouncer", k).unwrap_or_default();
    let auth_file = PathBuf::from(get("auth_file"));
    let hba_file = PathBuf::from(get("auth_hba_file"));
    check_mode(&auth_file, 0o600, "the user list", c);
    if !get("auth_hba_file").is_empty() {
        check_mode(&hba_file, 0o600, "pgBouncer's HBA file", c);
    }

    let split = |v: String| -> Vec<String> {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let admins = split(get("admin_users"));
    let stats = split(get("stats_users"));
    let both: Vec<&String> = admins.iter().filter(|a| stats.contains(a)).collect();
    if both.is_empty() {
        c.ok("the admin console users are not statistics users");
    } else {
        c.problem(
            format!(
                "{} is both an admin and a statistics user of pgBouncer, so agent hosts that probe pgBouncer need the admin's password",
                both.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
            "rerun pemworker pooler configure --force with a separate --stats-user",
            None,
        );
    }
    if get("server_reset_query_always") == "1" {
        c.ok("pgBouncer resets sessions after every transaction");
    } else {
        c.problem(
            "pgBouncer does not reset sessions between transactions (server_reset_query_always), so one client's SET reaches the next",
            "set server_reset_query_always = 1 in pgbouncer.ini and RELOAD pgBouncer",
            None,
        );
    }
    check_open_files(&ini, c);
    if !get("auth_query").contains("pem.get_agent_pool_auth") {
        c.problem(
            format!(
                "pgBouncer's auth_query is {:?}, not pem.get_agent_pool_auth",
                get("auth_query")
            ),
            "auth_query = SELECT * FROM pem.get_agent_pool_auth($1)",
            None,
        );
    }
    // With the PEM database on a Unix socket pgBouncer logs in by peer and needs no password.
    let peer = ini
        .get("databases", "pem")
        .unwrap_or_default()
        .split_whitespace()
        .any(|kv| kv.strip_prefix("host=").is_some_and(|h| h.starts_with('/')));
    if let Ok(text) = std::fs::read_to_string(&auth_file) {
        let plain: Vec<String> = userlist_entries(&text)
            .into_iter()
            .filter(|(user, secret)| is_plain_password(user, secret))
            .map(|(user, _)| user)
            .collect();
        if plain.is_empty() {
            c.ok(format!(
                "{} holds no password in plain text",
                auth_file.display()
            ));
        } else if peer {
            c.problem(
                format!(
                    "{} holds the passwords of {} in plain text, though pgBouncer needs only their SCRAM verifiers",
                    auth_file.display(),
                    plain.join(", ")
                ),
                "replace each with its SCRAM-SHA-256 verifier",
                Some(Repair::ScramUserlist(auth_file.clone())),
            );
        }
    }
    if let Ok(text) = std::fs::read_to_string(&hba_file) {
        // The enrolment login is the one user pgBouncer may trust, and only over TLS: it can do
        // nothing but present a token.
        let trust: Vec<String> = text
            .lines()
            .filter(|l| {
                let l = l.trim();
                let f: Vec<&str> = l.split_whitespace().collect();
                let enrolment = f.len() == 5
                    && f[0] == "hostssl"
                    && f[2] == hba::ENROLMENT_USER
                    && f[4] == "trust";
                !l.starts_with('#')
                    && !enrolment
                    && f.last().is_some_and(|m| *m == "trust" || *m == "password")
            })
            .map(str::to_string)
            .collect();
        if !trust.is_empty() {
            c.problem(
                format!(
                    "{} admits clients without a proof: {}",
                    hba_file.display(),
                    trust.join("; ")
                ),
                "use cert for agents and scram-sha-256 for passwords",
                None,
            );
        }
    }
}

/// The open files pgBouncer needs: a socket per client (max_client_conn) and per server
/// connection (every pool at its size), and a few of its own (listening sockets, its log).
/// Returns (clients, the rest).
fn files_needed(ini: &configparser::ini::Ini) -> (u64, u64) {
    let num = |v: Option<String>| v.and_then(|v| v.trim().parse::<u64>().ok());
    let clients = num(ini.get("pgbouncer", "max_client_conn")).unwrap_or(100);
    let default_pool = num(ini.get("pgbouncer", "default_pool_size")).unwrap_or(20);
    let servers: u64 = ini
        .get_map_ref()
        .get("databases")
        .map(|dbs| {
            dbs.values()
                .map(|v| {
                    v.as_deref()
                        .unwrap_or_default()
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("pool_size="))
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(default_pool)
                })
                .sum()
        })
        .unwrap_or(default_pool);
    (clients, servers + 20)
}

/// The soft "Max open files" of a /proc/PID/limits text.
fn open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A running pgBouncer whose open-file limit is below what max_client_conn and its pools need
/// refuses clients beyond it, whatever max_client_conn says (Debian's pgbouncer.service leaves
/// systemd's default of 1024).
fn check_open_files(ini: &configparser::ini::Ini, c: &mut Collector<'_>) {
    let pid = ini
        .get("pgbouncer", "pidfile")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| t.trim().parse::<u32>().ok())
        // A pid file left behind names whatever process has the number now.
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "pgbouncer")
        });
    let Some(pid) = pid else {
        c.ok(
            "pgBouncer does not run on this host (no pid file): its open-file limit is not checked",
        );
        return;
    };
    let Some(limit) = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|t| open_file_limit(&t))
    else {
        c.ok("pgBouncer's open-file limit cannot be read here: not checked");
        return;
    };
    let (clients, rest) = files_needed(ini);
    let need = clients + rest;
    if limit >= need {
        c.ok(format!(
            "pgBouncer (pid {pid}) may open {limit} files; max_client_conn and its pools need {need}"
        ));
    } else {
        c.problem(
            format!(
                "pgBouncer (pid {pid}) may open only {limit} files, but max_client_conn and its pools need {need}: clients beyond about {} are refused",
                limit.saturating_sub(rest)
            ),
            format!(
                "raise its limit: systemctl edit pgbouncer, add [Service] LimitNOFILE={need}, then systemctl restart pgbouncer (or ulimit -n {need} where it is started)"
            ),
            None,
        );
    }
}

async fn check_certificate_login(
    client: &Client,
    opts: &Options,
    host: &str,
    port: u16,
    c: &mut Collector<'_>,
) -> Result<(), Error> {
    let what = "choosing an agent user for the certificate login";
    let row = pool::query_opt(
        client,
        what,
        "SELECT role_name::text FROM pem.agent_role \
          WHERE pg_catalog.pg_has_role(role_oid, 'pem_agent', 'MEMBER') \
          ORDER BY (agent_id IS NULL) DESC, role_name LIMIT 1",
        &[],
    )
    .await?;
    let Some(row) = row else {
        c.ok("no agent user yet: the certificate login through pgBouncer was not tried");
        return Ok(());
    };
    let user: String = pool::get(&row, 0, what)?;
    // A key that never leaves this process and a certificate the server signs for it, checked
    // as registration checks it.
    let root = opts.server.root_cert.as_deref();
    let (key, cert) = match crate::registration::obtain_certificate(client, &user, root).await {
        Ok(pair) => pair,
        Err(e) => {
            c.problem(
                format!("the server cannot sign a certificate for {user}: {e}"),
                "check the CA files and pem.ca_cert_file / pem.ca_key_file in postgresql.conf",
                None,
            );
            return Ok(());
        }
    };
    let dir = tempfile::tempdir().map_err(fsutil::Error::io("create", Path::new("/tmp")))?;
    let (crt_path, key_path) = (dir.path().join("check.crt"), dir.path().join("check.key"));
    fsutil::Staged::write(&crt_path, cert.as_bytes(), 0o600, None)?.commit()?;
    fsutil::Staged::write(&key_path, key.serialize_pem().as_bytes(), 0o600, None)?.commit()?;
    let mut s = ConnectSettings::from_env(host, port, &user, &opts.server.dbname)?;
    s.root_cert = s.root_cert.or_else(|| opts.server.root_cert.clone());
    s.client_cert = Some((crt_path, key_path));
    match connection::connect(&s).await {
        Ok(agent) => {
            let who = pool::query_one(&agent, "who am I", "SELECT current_user::text", &[])
                .await
                .and_then(|r| pool::get::<String>(&r, 0, "who am I"));
            match who {
                Ok(u) if u == user => c.ok(format!(
                    "{user} logs in through pgBouncer at {host}:{port} with a certificate"
                )),
                Ok(u) => c.problem(
                    format!("a certificate login as {user} through pgBouncer ran as {u}"),
                    "check pgBouncer's configuration",
                    None,
                ),
                Err(e) => c.problem(
                    format!("after a certificate login through pgBouncer: {e}"),
                    "check pgBouncer's log",
                    None,
                ),
            }
        }
        Err(e) => c.problem(
            format!("no certificate login through pgBouncer: {e}"),
            "check pgBouncer's hba_file, the ident map (pg_ident.conf) and pgBouncer's log",
            None,
        ),
    }
    Ok(())
}

async fn repair(client: &Client, opts: &Options, found: &Outcome) -> Result<Vec<String>, Error> {
    let mut fixed = Vec::new();
    let mut sql = Vec::new();
    let mut hba_block = false;
    for p in &found.problems {
        match &p.repair {
            None => {}
            Some(Repair::Sql(s)) => {
                if !sql.contains(s) {
                    sql.push(s.clone());
                }
                fixed.push(p.problem.clone());
            }
            Some(Repair::Chmod(path, mode)) => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                    .map_err(fsutil::Error::io("set the mode of", path))?;
                fixed.push(p.problem.clone());
            }
            Some(Repair::ScramUserlist(path)) => {
                scram_userlist(path)?;
                fixed.push(format!(
                    "{} (RELOAD pgBouncer for it to read the file again)",
                    p.problem
                ));
            }
            Some(Repair::HbaBlock) => {
                hba_block = true;
                fixed.push(p.problem.clone());
            }
        }
    }
    if !sql.is_empty() {
        let work = async {
            for s in &sql {
                pool::batch(client, s, s).await?;
            }
            Ok::<_, Error>(())
        };
        pool::transaction(client, "the repairs", work).await?;
    }
    if hba_block {
        if let Some(file) = &opts.pg_hba {
            let what = "reading pem.pooler_config";
            let row = pool::query_one(
                client,
                what,
                "SELECT coalesce(auth_user::text, 'pgbouncer'), coalesce(admin_user::text, 'pem_admin1'), \
                        pgbouncer_address::text, coalesce(pgbouncer_os_user, 'postgres') FROM pem.pooler_config",
                &[],
            )
            .await?;
            let auth: String = pool::get(&row, 0, what)?;
            let admin: String = pool::get(&row, 1, what)?;
            let from = match pool::get::<Option<String>>(&row, 2, what)? {
                Some(c) => Source::Network(c),
                None => Source::Local,
            };
            let os_user: String = pool::get(&row, 3, what)?;
            let block = hba::server_block(&opts.server.dbname, &[&auth, &admin], &from, &os_user)?;
            let mut report = super::Report::default();
            prepare::edit_pg_hba(client, file, &block, &mut report).await?;
        }
    }
    Ok(fixed)
}

/// Replaces every plain-text password in a user list with its SCRAM verifier, keeping a backup.
fn scram_userlist(path: &Path) -> Result<(), Error> {
    let text = std::fs::read_to_string(path).map_err(fsutil::Error::io("read", path))?;
    let meta = std::fs::metadata(path).map_err(fsutil::Error::io("read", path))?;
    let mut out = String::new();
    for line in text.lines() {
        match userlist_entries(line).into_iter().next() {
            Some((user, secret)) if is_plain_password(&user, &secret) => {
                let verifier = postgres_protocol::password::scram_sha_256(secret.as_bytes());
                let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
                out.push_str(&format!("{} {}\n", q(&user), q(&verifier)));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    fsutil::backup(path)?;
    let owner = {
        use std::os::unix::fs::MetadataExt;
        fsutil::Owner {
            name: String::new(),
            uid: nix::unistd::Uid::from_raw(meta.uid()),
            gid: nix::unistd::Gid::from_raw(meta.gid()),
        }
    };
    fsutil::Staged::write(path, out.as_bytes(), 0o600, Some(&owner))?.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbouncer_needs_a_file_per_client_and_server_connection() {
        let mut ini = configparser::ini::Ini::new();
        ini.read(
            "[databases]\npem = host=/run/pg port=5432 dbname=pem pool_size=80 pool_mode=transaction\n\
             * = host=/run/pg port=5432 pool_size=10\n[pgbouncer]\nmax_client_conn = 2000\n"
                .into(),
        )
        .unwrap();
        assert_eq!(files_needed(&ini), (2000, 90 + 20));
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(open_file_limit(limits), Some(1024));
        assert_eq!(open_file_limit("Max processes 10 10 processes"), None);
    }

    #[test]
    fn user_list_entries_are_read_as_pgbouncer_quotes_them() {
        let text = "\"pgbouncer\" \"a\"\"b\"\n; comment\n\"pem_admin1\" \"SCRAM-SHA-256$4096:x$y:z\"\n\"u\" \"md5abcdefabcdefabcdefabcdefabcdefab\"\n";
        let e = userlist_entries(text);
        assert_eq!(
            e,
            vec![
                ("pgbouncer".to_string(), "a\"b".to_string()),
                (
                    "pem_admin1".to_string(),
                    "SCRAM-SHA-256$4096:x$y:z".to_string()
                ),
                (
                    "u".to_string(),
                    "md5abcdefabcdefabcdefabcdefabcdefab".to_string()
                ),
            ]
        );
        assert!(!is_verifier(&e[0].1) && is_verifier(&e[1].1) && is_verifier(&e[2].1));
    }
}
