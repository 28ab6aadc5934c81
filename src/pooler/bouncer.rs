//! `pemworker pooler configure`: pgBouncer's ini, HBA file and user list (the guide's
//! chapter 4), written all together or not at all.
//!
//! Safer than the guide's files: the admin is the only admin console user and a separate
//! statistics user (SHOW only, no database login) serves the agents' pgBouncer probes, so no
//! agent host needs the admin's password; with the PEM database on this host's Unix socket,
//! pgBouncer logs in to PostgreSQL by peer, so the user list holds only SCRAM verifiers (enough
//! to check the passwords clients give) and no password in plain text; session state is reset
//! after every transaction; a client idle in a transaction is disconnected.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{
    ADMIN_USER_PASSWORD_ENV, AUTH_USER_PASSWORD_ENV, Error, Report, STATS_USER_PASSWORD_ENV, hba,
};
use crate::fsutil::{self, Owner, Staged};
use crate::secret::Secret;

/// What pgBouncer runs on a server connection after every transaction (with
/// `server_reset_query_always`): DISCARD ALL without DISCARD PLANS. Everything a client can
/// leave behind for the next (settings, prepared statements, cursors, LISTEN, advisory locks,
/// temporary objects, sequence state, SET ROLE/SESSION AUTHORIZATION) is undone, but the
/// plans of the server functions agents call stay cached: DISCARD PLANS made every delivery
/// re-plan them, 2.7 times as slow (`cargo test --release --test bench_server -- --ignored`).
pub const RESET_QUERY: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; \
DEALLOCATE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// The oldest pgBouncer with certificate authentication (`auth_type = cert` / hba `cert`).
pub const MIN_VERSION: (u32, u32) = (1, 9);

/// Every setting of the generated files; each has a flag.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config_dir: PathBuf,
    pub owner: Owner,
    pub pem_db_host: String,
    pub pem_db_port: u16,
    pub pem_db_name: String,
    pub auth_user: String,
    pub admin_user: String,
    /// The console user for statistics only (`stats_users`), whose password agent hosts keep.
    pub stats_user: String,
    pub pool_size: u32,
    pub fallback_pool_size: u32,
    pub listen_addr: String,
    pub listen_port: u16,
    pub unix_socket_dir: Option<PathBuf>,
    pub client_tls_sslmode: String,
    pub client_tls_ca_file: PathBuf,
    pub client_tls_key_file: PathBuf,
    pub client_tls_cert_file: PathBuf,
    /// CA of the PEM server's certificate, when pgBouncer reaches it over TCP (verify-full);
    /// `None` = `client_tls_ca_file`.
    pub server_tls_ca_file: Option<PathBuf>,
    pub auth_query: String,
    pub max_client_conn: u32,
    pub server_idle_timeout: u32,
    pub server_reset_query: String,
    /// Reset sessions after every transaction, not only in session pooling.
    pub server_reset_query_always: bool,
    /// Seconds a client may stay idle inside a transaction before pgBouncer disconnects it
    /// (0 = never): bounds how long one client can hold a server connection and its locks.
    pub idle_transaction_timeout: u32,
    /// Seconds pgBouncer waits after a failed server login before trying again; while it
    /// waits, agents cannot log in, so it bounds how soon they are back after a server restart.
    pub server_login_retry: u32,
    pub logfile: PathBuf,
    pub pidfile: PathBuf,
    /// Agent users allowed to log in by certificate; empty means every user (`all`), leaving
    /// the choice to auth_query, which only answers for members of pem_agent_pool.
    pub agent_users: Vec<String>,
    pub agent_networks: Vec<String>,
    pub admin_networks: Vec<String>,
    pub force: bool,
    pub pgbouncer_bin: String,
}

/// How pgBouncer logs in to PostgreSQL, from where the PEM database is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerLogin {
    /// Over the Unix socket by peer (prepare-server's ident map): no password at all.
    Peer,
    /// Over TCP with passwords, which the user list must then hold in plain text.
    Password,
}

impl Settings {
    pub fn server_login(&self) -> ServerLogin {
        if self.pem_db_host.starts_with('/') {
            ServerLogin::Peer
        } else {
            ServerLogin::Password
        }
    }
}

/// The passwords the user list is made from.
#[derive(Debug, Clone)]
pub struct Passwords {
    /// Only needed when pgBouncer logs in to PostgreSQL with passwords.
    pub auth: Option<Secret>,
    pub admin: Secret,
    pub stats: Secret,
}

/// The three files, rendered.
#[derive(Debug)]
pub struct Rendered {
    pub ini: String,
    pub hba: String,
    pub userlist: String,
}

/// What `configure` did.
#[derive(Debug)]
pub struct Outcome {
    pub version: (u32, u32, u32),
    pub report: Report,
}

pub fn ini_path(dir: &Path) -> PathBuf {
    dir.join("pgbouncer.ini")
}
pub fn hba_path(dir: &Path) -> PathBuf {
    dir.join("hba_file")
}
pub fn userlist_path(dir: &Path) -> PathBuf {
    dir.join("userlist.txt")
}

/// The installed pgBouncer's version, from `<bin> --version` ("PgBouncer 1.18.0").
pub fn installed_version(bin: &str) -> Result<(u32, u32, u32), Error> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|source| Error::PgbouncerMissing {
            bin: bin.to_string(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_version(&text).ok_or_else(|| Error::PgbouncerVersionUnknown {
        bin: bin.to_string(),
        output: text.lines().next().unwrap_or("").to_string(),
    })
}

fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let first = text.lines().next()?;
    let v = first
        .strip_prefix("PgBouncer ")
        .or_else(|| first.strip_prefix("pgbouncer version "))?;
    let mut parts = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

fn invalid(what: &'static str, value: &str, why: &str) -> Error {
    Error::Invalid {
        what,
        value: value.to_string(),
        why: why.to_string(),
    }
}

/// A value inside a `[databases]` connection string: pgBouncer splits it on spaces and has no
/// escape worth relying on, so only plain characters are allowed.
fn connstr_value(what: &'static str, v: &str) -> Result<String, Error> {
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@".contains(c))
    {
        return Err(invalid(
            what,
            v,
            "only letters, digits and _ - . / : @ are allowed here",
        ));
    }
    Ok(v.to_string())
}

/// A user name in pgBouncer's ini lists and HBA file (comma and space separated, no quoting).
fn pgbouncer_user(what: &'static str, v: &str) -> Result<String, Error> {
    if v.is_empty()
        || v.len() > 63
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.$".contains(c))
    {
        return Err(invalid(
            what,
            v,
            "pgBouncer's files need 1 to 63 letters, digits, _ - . or $",
        ));
    }
    Ok(v.to_string())
}

/// Any other ini value: one line, no leading or trailing blanks.
fn ini_value(what: &'static str, v: &str) -> Result<String, Error> {
    if v.chars().any(char::is_control) || v.trim() != v || v.is_empty() {
        return Err(invalid(
            what,
            v,
            "it must be one non-empty line without surrounding blanks",
        ));
    }
    Ok(v.to_string())
}

fn path_value(what: &'static str, p: &Path) -> Result<String, Error> {
    if !p.is_absolute() {
        return Err(invalid(
            what,
            &p.display().to_string(),
            "give an absolute path",
        ));
    }
    ini_value(what, &p.display().to_string())
}

/// A user list line: both fields double-quoted, a quote inside doubled.
fn userlist_line(user: &str, password: &str) -> String {
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    format!("{} {}\n", q(user), q(password))
}

/// A SCRAM-SHA-256 verifier of `password`: all pgBouncer needs to check a client's password,
/// and no password to whoever reads the file.
fn scram(password: &Secret) -> String {
    postgres_protocol::password::scram_sha_256(password.expose().as_bytes())
}

/// Renders the three files. Pure, so it is tested without a pgBouncer.
pub fn render(s: &Settings, passwords: &Passwords) -> Result<Rendered, Error> {
    let host = connstr_value("PEM database host", &s.pem_db_host)?;
    let db = connstr_value("PEM database name", &s.pem_db_name)?;
    let auth_user = pgbouncer_user("auth user", &s.auth_user)?;
    let admin = pgbouncer_user("admin user", &s.admin_user)?;
    let stats = pgbouncer_user("statistics user", &s.stats_user)?;
    if stats == admin {
        return Err(invalid(
            "statistics user",
            &stats,
            "it must not be the admin: agent hosts keep its password",
        ));
    }
    if !["require", "verify-ca", "verify-full"].contains(&s.client_tls_sslmode.as_str()) {
        return Err(invalid(
            "client_tls_sslmode",
            &s.client_tls_sslmode,
            "agents log in by certificate, so use require, verify-ca or verify-full",
        ));
    }
    if s.pool_size == 0 || s.fallback_pool_size == 0 {
        return Err(invalid(
            "pool size",
            "0",
            "a pool needs at least one server connection",
        ));
    }
    let port = s.pem_db_port;
    let mut ini = format!(
        "; Written by `pemworker pooler configure`: pgBouncer in front of the PEM server.\n\
         [databases]\n\
         ; PEM agents share this pool in transaction mode; auth_user looks up their secrets.\n\
         {db} = host={host} port={port} dbname={db} auth_user={auth_user} pool_size={pool} pool_mode=transaction\n\
         ; Any other database name leads to the PEM database too.\n\
         * = host={host} port={port} dbname={db} auth_user={auth_user} pool_size={fallback}\n\
         \n\
         [pgbouncer]\n\
         logfile = {logfile}\n\
         pidfile = {pidfile}\n\
         listen_addr = {listen_addr}\n\
         listen_port = {listen_port}\n",
        pool = s.pool_size,
        fallback = s.fallback_pool_size,
        logfile = path_value("logfile", &s.logfile)?,
        pidfile = path_value("pidfile", &s.pidfile)?,
        listen_addr = ini_value("listen address", &s.listen_addr)?,
        listen_port = s.listen_port,
    );
    if let Some(dir) = &s.unix_socket_dir {
        ini.push_str(&format!(
            "unix_socket_dir = {}\n",
            path_value("unix socket directory", dir)?
        ));
    }
    if s.server_login() == ServerLogin::Password {
        // pg_hba.conf admits pgBouncer from its address over TLS only (hostssl).
        ini.push_str(&format!(
            "; pgBouncer logs in to the PEM database over TCP: by TLS, with the server verified.\n\
             server_tls_sslmode = verify-full\n\
             server_tls_ca_file = {}\n",
            path_value(
                "server_tls_ca_file",
                s.server_tls_ca_file
                    .as_ref()
                    .unwrap_or(&s.client_tls_ca_file)
            )?
        ));
    }
    ini.push_str(&format!(
        "; Agents authenticate with client certificates signed by the PEM server's CA.\n\
         client_tls_sslmode = {sslmode}\n\
         client_tls_ca_file = {ca}\n\
         client_tls_key_file = {key}\n\
         client_tls_cert_file = {cert}\n\
         auth_type = hba\n\
         auth_file = {auth_file}\n\
         auth_hba_file = {hba_file}\n\
         auth_user = {auth_user}\n\
         auth_query = {auth_query}\n\
         ; Only the PEM admin may PAUSE or RELOAD; agents' probes use the statistics user.\n\
         admin_users = {admin}\n\
         stats_users = {stats}\n\
         server_reset_query = {reset}\n\
         ; Also in transaction pooling: no session state (SET, advisory locks) passes to the next client.\n\
         server_reset_query_always = {reset_always}\n\
         ; A client idle inside a transaction holds a server connection and its locks: not for long.\n\
         idle_transaction_timeout = {idle_tx}\n\
         max_client_conn = {max_client_conn}\n\
         ; Close server connections idle this long, so the pool shrinks after a peak.\n\
         server_idle_timeout = {idle}\n\
         ; After a failed server login (the PEM server restarting) wait this long before the next.\n\
         server_login_retry = {login_retry}\n\
         ; Sent by some drivers; meaningless to the pool.\n\
         ignore_startup_parameters = extra_float_digits\n",
        sslmode = s.client_tls_sslmode,
        ca = path_value("client_tls_ca_file", &s.client_tls_ca_file)?,
        key = path_value("client_tls_key_file", &s.client_tls_key_file)?,
        cert = path_value("client_tls_cert_file", &s.client_tls_cert_file)?,
        auth_file = path_value("auth file", &userlist_path(&s.config_dir))?,
        hba_file = path_value("HBA file", &hba_path(&s.config_dir))?,
        auth_query = ini_value("auth_query", &s.auth_query)?,
        reset = ini_value("server_reset_query", &s.server_reset_query)?,
        reset_always = u8::from(s.server_reset_query_always),
        idle_tx = s.idle_transaction_timeout,
        max_client_conn = s.max_client_conn,
        idle = s.server_idle_timeout,
        login_retry = s.server_login_retry,
    ));

    let agents = if s.agent_users.is_empty() {
        "all".to_string()
    } else {
        s.agent_users
            .iter()
            .map(|u| pgbouncer_user("agent user", u))
            .collect::<Result<Vec<_>, _>>()?
            .join(",")
    };
    let mut hba_text = String::from(
        "# Written by `pemworker pooler configure`. First match wins.\n\
         # The admin console over the Unix socket, by password (SCRAM), for the admin and the\n\
         # statistics user.\n",
    );
    hba_text.push_str(&format!("local pgbouncer {admin},{stats} scram-sha-256\n"));
    hba_text
        .push_str("# The PEM admin, over TLS by password, to the console and the PEM database.\n");
    for net in &s.admin_networks {
        hba_text.push_str(&format!(
            "hostssl pgbouncer,{db} {admin} {} scram-sha-256\n",
            hba::cidr(net)?
        ));
    }
    hba_text.push_str(
        "# The statistics user for the agents' pgBouncer probes: the console only (SHOW).\n",
    );
    for net in &s.agent_networks {
        hba_text.push_str(&format!(
            "hostssl pgbouncer {stats} {} scram-sha-256\n",
            hba::cidr(net)?
        ));
    }
    if s.server_login() == ServerLogin::Peer {
        // A host that enrols has no credential yet: the token it passes is checked inside the
        // one function this login may call. TLS only, so the host verifies whom it gives it to.
        hba_text.push_str(
            "# Agent hosts enrolling with a token (the login may only call pem.enrol_agent).\n",
        );
        for net in &s.agent_networks {
            hba_text.push_str(&format!(
                "hostssl {db} {} {} trust\n",
                hba::ENROLMENT_USER,
                hba::cidr(net)?
            ));
        }
    }
    hba_text.push_str("# PEM agents, by TLS client certificate whose CN is the agent user.\n");
    for net in &s.agent_networks {
        hba_text.push_str(&format!("hostssl {db} {agents} {} cert\n", hba::cidr(net)?));
    }

    // pgBouncer checks client passwords against SCRAM verifiers. It needs a password in plain
    // text only to log in to PostgreSQL itself, which by peer it does not.
    let mut userlist = String::new();
    if s.server_login() == ServerLogin::Password {
        let auth = passwords.auth.as_ref().ok_or_else(|| {
            invalid(
                "auth user password",
                &auth_user,
                "pgBouncer logs in to the PEM database over TCP and needs it",
            )
        })?;
        userlist.push_str(&userlist_line(&auth_user, auth.expose()));
        userlist.push_str(&userlist_line(&admin, passwords.admin.expose()));
    } else {
        userlist.push_str(&userlist_line(&admin, &scram(&passwords.admin)));
        // Known to pgBouncer, with no password: its HBA line trusts it over TLS.
        userlist.push_str(&userlist_line(hba::ENROLMENT_USER, ""));
    }
    userlist.push_str(&userlist_line(&stats, &scram(&passwords.stats)));
    Ok(Rendered {
        ini,
        hba: hba_text,
        userlist,
    })
}

/// Checks the installed pgBouncer, then writes the three files: all are staged first, existing
/// ones are backed up only with `force`, and nothing is replaced if any step fails.
pub fn configure(s: &Settings) -> Result<Outcome, Error> {
    let version = installed_version(&s.pgbouncer_bin)?;
    if (version.0, version.1) < MIN_VERSION {
        return Err(Error::PgbouncerTooOld {
            found: format!("{}.{}.{}", version.0, version.1, version.2),
        });
    }
    let targets = [
        ini_path(&s.config_dir),
        hba_path(&s.config_dir),
        userlist_path(&s.config_dir),
    ];
    let existing: Vec<&PathBuf> = targets.iter().filter(|p| p.exists()).collect();
    if !s.force {
        if let Some(first) = existing.first() {
            return Err(fsutil::Error::Exists {
                path: (*first).clone(),
                flag: "--force",
            }
            .into());
        }
    }
    // Validate everything before asking for passwords or touching the disk.
    let placeholder = Passwords {
        auth: Some(Secret::new("x")),
        admin: Secret::new("x"),
        stats: Secret::new("x"),
    };
    render(s, &placeholder)?;
    let passwords = Passwords {
        auth: match s.server_login() {
            ServerLogin::Password => {
                Some(super::new_password(&s.auth_user, AUTH_USER_PASSWORD_ENV)?)
            }
            ServerLogin::Peer => None,
        },
        admin: super::new_password(&s.admin_user, ADMIN_USER_PASSWORD_ENV)?,
        stats: super::new_password(&s.stats_user, STATS_USER_PASSWORD_ENV)?,
    };
    let rendered = render(s, &passwords)?;

    let mut report = Report::default();
    // A directory that exists already keeps its mode and owner: it may be shared with files
    // that are not ours.
    if fsutil::ensure_dir(&s.config_dir, 0o700, Some(&s.owner))?.is_empty() {
        report.unchanged(format!(
            "{} exists; its mode and owner are left as they are",
            s.config_dir.display()
        ));
    } else {
        report.changed(format!(
            "created {} (mode 0700, owned by {})",
            s.config_dir.display(),
            s.owner.name
        ));
    }
    let contents = [&rendered.ini, &rendered.hba, &rendered.userlist];
    let staged = targets
        .iter()
        .zip(contents)
        .map(|(t, c)| Staged::write(t, c.as_bytes(), 0o600, Some(&s.owner)))
        .collect::<Result<Vec<_>, _>>()?;
    for (p, b) in existing.iter().zip(fsutil::backup_all(&existing)?) {
        report.changed(format!("backed up {} to {}", p.display(), b.display()));
    }
    for (t, st) in targets.iter().zip(staged) {
        st.commit()?;
        report.changed(format!("wrote {} (mode 0600)", t.display()));
    }
    if s.server_login() == ServerLogin::Password {
        tracing::warn!(
            "pgBouncer logs in to the PEM database over TCP, so {} holds the passwords of {} and {} in plain text; with pgBouncer on the PEM server's host, give --pem-db-host the socket directory instead",
            userlist_path(&s.config_dir).display(),
            s.auth_user,
            s.admin_user
        );
    }
    for (what, p) in [("logfile", &s.logfile), ("pidfile", &s.pidfile)] {
        if p.parent().is_some_and(|d| !d.is_dir()) {
            tracing::warn!(
                "the directory of {what} {} does not exist; create it before starting pgBouncer",
                p.display()
            );
        }
    }
    Ok(Outcome { version, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            config_dir: "/etc/pgbouncer".into(),
            owner: Owner::current(),
            pem_db_host: "/var/run/postgresql".into(),
            pem_db_port: 5432,
            pem_db_name: "pem".into(),
            auth_user: "pgbouncer".into(),
            admin_user: "pem_admin1".into(),
            stats_user: "pgbouncer_stats".into(),
            pool_size: 80,
            fallback_pool_size: 10,
            listen_addr: "*".into(),
            listen_port: 6432,
            unix_socket_dir: None,
            client_tls_sslmode: "require".into(),
            client_tls_ca_file: "/srv/pem/root.crt".into(),
            client_tls_key_file: "/srv/pem/server.key".into(),
            client_tls_cert_file: "/srv/pem/server.crt".into(),
            server_tls_ca_file: None,
            auth_query: "SELECT * FROM pem.get_agent_pool_auth($1)".into(),
            max_client_conn: 500,
            server_idle_timeout: 60,
            server_reset_query: RESET_QUERY.into(),
            server_reset_query_always: true,
            idle_transaction_timeout: 60,
            server_login_retry: 15,
            logfile: "/var/log/postgresql/pgbouncer.log".into(),
            pidfile: "/var/run/postgresql/pgbouncer.pid".into(),
            agent_users: vec![],
            agent_networks: vec!["0.0.0.0/0".into()],
            admin_networks: vec!["0.0.0.0/0".into()],
            force: false,
            pgbouncer_bin: "pgbouncer".into(),
        }
    }

    fn passwords() -> Passwords {
        Passwords {
            auth: Some(Secret::new("a\"b")),
            admin: Secret::new("admin pw"),
            stats: Secret::new("stats pw"),
        }
    }

    #[test]
    fn renders_the_guides_settings() {
        let r = render(&settings(), &passwords()).unwrap();
        assert!(r.ini.contains(
            "pem = host=/var/run/postgresql port=5432 dbname=pem auth_user=pgbouncer pool_size=80 pool_mode=transaction\n"
        ));
        assert!(r.ini.contains(
            "* = host=/var/run/postgresql port=5432 dbname=pem auth_user=pgbouncer pool_size=10\n"
        ));
        for line in [
            "auth_type = hba",
            "auth_query = SELECT * FROM pem.get_agent_pool_auth($1)",
            "admin_users = pem_admin1",
            "stats_users = pgbouncer_stats",
            "server_reset_query = CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES",
            "server_reset_query_always = 1",
            "idle_transaction_timeout = 60",
            "max_client_conn = 500",
            "server_idle_timeout = 60",
            "server_login_retry = 15",
            "client_tls_sslmode = require",
            "auth_file = /etc/pgbouncer/userlist.txt",
        ] {
            assert!(
                r.ini.lines().any(|l| l == line),
                "missing {line:?} in\n{}",
                r.ini
            );
        }
        assert!(
            r.hba
                .contains("hostssl pgbouncer,pem pem_admin1 0.0.0.0/0 scram-sha-256\n")
        );
        assert!(
            r.hba
                .contains("hostssl pgbouncer pgbouncer_stats 0.0.0.0/0 scram-sha-256\n")
        );
        assert!(r.hba.contains("hostssl pem all 0.0.0.0/0 cert\n"));
        assert!(!r.hba.contains("pem pgbouncer_stats"), "{}", r.hba);
    }

    #[test]
    fn with_peer_logins_the_user_list_holds_no_password() {
        let r = render(&settings(), &passwords()).unwrap();
        let lines: Vec<&str> = r.userlist.lines().collect();
        assert_eq!(lines.len(), 3, "{}", r.userlist);
        assert!(lines[0].starts_with("\"pem_admin1\" \"SCRAM-SHA-256$4096:"));
        assert_eq!(lines[1], "\"pem_enrolment\" \"\"");
        assert!(lines[2].starts_with("\"pgbouncer_stats\" \"SCRAM-SHA-256$4096:"));
        assert!(
            r.hba
                .contains("hostssl pem pem_enrolment 0.0.0.0/0 trust\n")
        );
        for pw in ["admin pw", "stats pw", "a\"b"] {
            assert!(!r.userlist.contains(pw), "{pw} in {}", r.userlist);
        }
        // Over TCP pgBouncer needs the auth user's and the admin's own passwords.
        let mut tcp = settings();
        tcp.pem_db_host = "10.0.0.1".into();
        let r = render(&tcp, &passwords()).unwrap();
        assert!(r.ini.contains(
            "server_tls_sslmode = verify-full\nserver_tls_ca_file = /srv/pem/root.crt\n"
        ));
        assert!(r.userlist.starts_with(
            "\"pgbouncer\" \"a\"\"b\"\n\"pem_admin1\" \"admin pw\"\n\"pgbouncer_stats\" \"SCRAM-SHA-256$"
        ));
    }

    #[test]
    fn refuses_values_that_would_break_the_files() {
        let p = passwords();
        let mut s = settings();
        s.pem_db_host = "db host".into();
        assert!(render(&s, &p).is_err());
        let mut s = settings();
        s.admin_user = "admin,postgres".into();
        assert!(render(&s, &p).is_err());
        let mut s = settings();
        s.server_reset_query = "DISCARD ALL\nadmin_users = evil".into();
        assert!(render(&s, &p).is_err());
        let mut s = settings();
        s.client_tls_sslmode = "disable".into();
        assert!(render(&s, &p).is_err());
        let mut s = settings();
        s.agent_networks = vec!["agents.example".into()];
        assert!(render(&s, &p).is_err());
        let mut s = settings();
        s.stats_user = s.admin_user.clone();
        assert!(render(&s, &p).is_err());
    }

    #[test]
    fn version_parsing() {
        assert_eq!(
            parse_version("PgBouncer 1.18.0\nlibevent 2.1.12\n"),
            Some((1, 18, 0))
        );
        assert_eq!(parse_version("PgBouncer 1.8.1"), Some((1, 8, 1)));
        assert!((1, 8) < MIN_VERSION && (1, 18) >= MIN_VERSION);
        assert_eq!(parse_version("something else"), None);
    }
}
