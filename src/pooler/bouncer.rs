//! `pemworker pooler configure`: pgBouncer's ini, HBA file and user list (the guide's
//! chapter 4), written all together or not at all.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{ADMIN_USER_PASSWORD_ENV, AUTH_USER_PASSWORD_ENV, Error, Report, hba};
use crate::fsutil::{self, Owner, Staged};
use crate::secret::Secret;

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
    pub pool_size: u32,
    pub fallback_pool_size: u32,
    pub listen_addr: String,
    pub listen_port: u16,
    pub unix_socket_dir: Option<PathBuf>,
    pub client_tls_sslmode: String,
    pub client_tls_ca_file: PathBuf,
    pub client_tls_key_file: PathBuf,
    pub client_tls_cert_file: PathBuf,
    pub auth_query: String,
    pub max_client_conn: u32,
    pub server_idle_timeout: u32,
    pub server_reset_query: String,
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
fn userlist_line(user: &str, password: &Secret) -> String {
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    format!("{} {}\n", q(user), q(password.expose()))
}

/// Renders the three files. Pure, so it is tested without a pgBouncer.
pub fn render(
    s: &Settings,
    auth_password: &Secret,
    admin_password: &Secret,
) -> Result<Rendered, Error> {
    let host = connstr_value("PEM database host", &s.pem_db_host)?;
    let db = connstr_value("PEM database name", &s.pem_db_name)?;
    let auth_user = pgbouncer_user("auth user", &s.auth_user)?;
    let admin = pgbouncer_user("admin user", &s.admin_user)?;
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
         admin_users = {admin}\n\
         stats_users = {admin}\n\
         server_reset_query = {reset}\n\
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
         # The admin console over the Unix socket, with passwords from the user list.\n",
    );
    hba_text.push_str("local pgbouncer all md5\n");
    hba_text.push_str("# The PEM admin, by password, to the console and the PEM database.\n");
    for net in &s.admin_networks {
        hba_text.push_str(&format!(
            "host pgbouncer,{db} {admin} {} md5\n",
            hba::cidr(net)?
        ));
    }
    hba_text.push_str("# PEM agents, by TLS client certificate whose CN is the agent user.\n");
    for net in &s.agent_networks {
        hba_text.push_str(&format!("hostssl {db} {agents} {} cert\n", hba::cidr(net)?));
    }

    let mut userlist = userlist_line(&auth_user, auth_password);
    userlist.push_str(&userlist_line(&admin, admin_password));
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
    let placeholder = Secret::new("x");
    render(s, &placeholder, &placeholder)?;
    let auth_password = super::new_password(&s.auth_user, AUTH_USER_PASSWORD_ENV)?;
    let admin_password = super::new_password(&s.admin_user, ADMIN_USER_PASSWORD_ENV)?;
    let rendered = render(s, &auth_password, &admin_password)?;

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
            pool_size: 80,
            fallback_pool_size: 10,
            listen_addr: "*".into(),
            listen_port: 6432,
            unix_socket_dir: None,
            client_tls_sslmode: "require".into(),
            client_tls_ca_file: "/srv/pem/root.crt".into(),
            client_tls_key_file: "/srv/pem/server.key".into(),
            client_tls_cert_file: "/srv/pem/server.crt".into(),
            auth_query: "SELECT * FROM pem.get_agent_pool_auth($1)".into(),
            max_client_conn: 500,
            server_idle_timeout: 60,
            server_reset_query: "DISCARD ALL".into(),
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

    #[test]
    fn renders_the_guides_settings() {
        let r = render(&settings(), &Secret::new("a\"b"), &Secret::new("c")).unwrap();
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
            "stats_users = pem_admin1",
            "server_reset_query = DISCARD ALL",
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
                .contains("host pgbouncer,pem pem_admin1 0.0.0.0/0 md5\n")
        );
        assert!(r.hba.contains("hostssl pem all 0.0.0.0/0 cert\n"));
        assert_eq!(
            r.userlist,
            "\"pgbouncer\" \"a\"\"b\"\n\"pem_admin1\" \"c\"\n"
        );
    }

    #[test]
    fn refuses_values_that_would_break_the_files() {
        let p = Secret::new("p");
        let mut s = settings();
        s.pem_db_host = "db host".into();
        assert!(render(&s, &p, &p).is_err());
        let mut s = settings();
        s.admin_user = "admin,postgres".into();
        assert!(render(&s, &p, &p).is_err());
        let mut s = settings();
        s.server_reset_query = "DISCARD ALL\nadmin_users = evil".into();
        assert!(render(&s, &p, &p).is_err());
        let mut s = settings();
        s.client_tls_sslmode = "disable".into();
        assert!(render(&s, &p, &p).is_err());
        let mut s = settings();
        s.agent_networks = vec!["agents.example".into()];
        assert!(render(&s, &p, &p).is_err());
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
