//! pg_hba-style lines, for PostgreSQL's pg_hba.conf and pgBouncer's auth_hba_file.

use super::Error;

/// First and last line of the block `prepare-server` manages in pg_hba.conf.
pub const BEGIN_MARK: &str = "# BEGIN pemworker: PEM server access for pgBouncer";
pub const END_MARK: &str = "# END pemworker";

/// Where pgBouncer reaches the PEM server from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The Unix socket (`local` lines), as in the guide.
    Local,
    /// TCP from an address or network in CIDR form (`host` lines).
    Network(String),
}

impl std::str::FromStr for Source {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s == "local" {
            Ok(Source::Local)
        } else {
            Ok(Source::Network(cidr(s)?))
        }
    }
}

/// Checks an address or `address/prefix` and returns it in CIDR form (a bare address gets
/// /32 or /128). Both PostgreSQL and pgBouncer 1.18 accept only addresses, not host names.
pub fn cidr(s: &str) -> Result<String, Error> {
    let invalid = |why: &str| Error::Invalid {
        what: "network",
        value: s.to_string(),
        why: why.to_string(),
    };
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = addr.parse().map_err(|_| {
        invalid("expected an IP address or network such as 10.0.0.0/8 (host names are not allowed)")
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|&p| p <= max)
            .ok_or_else(|| invalid(&format!("the prefix length must be 0 to {max}")))?,
        None => max,
    };
    Ok(format!("{ip}/{prefix}"))
}

/// A database or user name as one pg_hba (or pg_ident) token. Quoted always, so that names
/// which are also keywords (`all`, `replication`) or contain commas and spaces keep their
/// literal meaning; a double quote inside is written twice, as PostgreSQL's tokenizer reads it.
/// Line breaks and other control characters cannot be written and are refused.
pub fn quote(name: &str) -> Result<String, Error> {
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(Error::Invalid {
            what: "name for pg_hba.conf",
            value: name.to_string(),
            why: "it must be non-empty without control characters".into(),
        });
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// The ident map (pg_ident.conf) the server keeps for pgBouncer's peer logins.
pub const IDENT_MAP: &str = "pemworker";

/// The login agent hosts enrol through with a token (migration 4); it holds no credential.
pub const ENROLMENT_USER: &str = "pem_enrolment";

/// The lines the PEM server needs so that pgBouncer, and only pgBouncer, logs in as its auth
/// user, the PEM admin and the pooled agent users (members of pem_agent_pool).
///
/// From the Unix socket (`Source::Local`) by peer with the ident map the server keeps (one line
/// per role, PostgreSQL 15 cannot map to a group), so no password is involved at all; from
/// another host over TLS, the auth user and admin by SCRAM and the agent users by the md5
/// secret the auth query returns. Either way pooled agent users are rejected everywhere else,
/// so a password an agent sets for its own role opens nothing. The enrolment login is admitted
/// like the pooled agent users, and only over the socket: enrolment with a token needs pgBouncer
/// on the PEM server's host.
pub fn server_block(
    database: &str,
    users: &[&str],
    from: &Source,
    os_user: &str,
) -> Result<String, Error> {
    let db = quote(database)?;
    let users = users
        .iter()
        .map(|u| quote(u))
        .collect::<Result<Vec<_>, _>>()?
        .join(",");
    let access = match from {
        Source::Local => format!(
            "# pgBouncer logs in over this socket as OS user {os_user} (peer, ident map {IDENT_MAP}):\n\
             # no password is involved for its auth user, the PEM admin or the pooled agent users.\n\
             local {db} {users},\"{ENROLMENT_USER}\",+pem_agent_pool peer map={IDENT_MAP}\n"
        ),
        Source::Network(c) => format!(
            "# pgBouncer at {c} logs in over TLS: its auth user and the PEM admin by password, the\n\
             # pooled agent users with the md5 secret its auth query returns.\n\
             hostssl {db} {users} {c} scram-sha-256\n\
             hostssl {db} +pem_agent_pool {c} md5\n"
        ),
    };
    Ok(format!(
        "{BEGIN_MARK}\n\
         {access}\
         # Pooled agent users and the enrolment login reach PostgreSQL through pgBouncer only.\n\
         local all +pem_agent_pool,\"{ENROLMENT_USER}\" reject\n\
         host all +pem_agent_pool,\"{ENROLMENT_USER}\" all reject\n\
         {END_MARK}\n"
    ))
}

/// `existing` with `block` at its start, replacing an earlier managed block wherever it is.
/// `None` when the file already holds exactly this block at its start.
pub fn place_block(existing: &str, block: &str) -> Option<String> {
    if existing.starts_with(block) {
        return None;
    }
    let mut rest = String::with_capacity(existing.len());
    let mut inside = false;
    for line in existing.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == BEGIN_MARK {
            inside = true;
        } else if inside && bare == END_MARK {
            inside = false;
        } else if !inside {
            rest.push_str(line);
        }
    }
    Some(format!("{block}{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_names_literal_and_refuses_line_breaks() {
        assert_eq!(quote("pem_admin1").unwrap(), "\"pem_admin1\"");
        assert_eq!(quote("all").unwrap(), "\"all\"");
        assert_eq!(quote("a\"b").unwrap(), "\"a\"\"b\"");
        assert!(quote("a\nb").is_err());
        assert!(quote("").is_err());
    }

    #[test]
    fn cidr_accepts_addresses_and_refuses_host_names() {
        assert_eq!(cidr("10.0.0.5").unwrap(), "10.0.0.5/32");
        assert_eq!(cidr("10.0.0.0/8").unwrap(), "10.0.0.0/8");
        assert_eq!(cidr("::1").unwrap(), "::1/128");
        assert!(cidr("10.0.0.0/33").is_err());
        let e = cidr("pgbouncer.example").unwrap_err().to_string();
        assert!(e.contains("host names"), "{e}");
    }

    #[test]
    fn block_goes_first_once_and_replaces_an_old_one() {
        let block = server_block(
            "pem",
            &["pgbouncer", "pem_admin1"],
            &Source::Local,
            "postgres",
        )
        .unwrap();
        assert!(block.contains(
            "local \"pem\" \"pgbouncer\",\"pem_admin1\",\"pem_enrolment\",+pem_agent_pool peer map=pemworker\n"
        ));
        assert!(block.contains("host all +pem_agent_pool,\"pem_enrolment\" all reject\n"));
        assert!(!block.contains("md5"), "{block}");
        let original = "# comment\nlocal all postgres peer\n";
        let once = place_block(original, &block).unwrap();
        assert!(once.starts_with(&block) && once.ends_with(original));
        assert_eq!(
            place_block(&once, &block),
            None,
            "second run must change nothing"
        );
        let other = server_block(
            "pem",
            &["pgb2", "pem_admin1"],
            &Source::Network("10.1.0.0/16".into()),
            "postgres",
        )
        .unwrap();
        assert!(other.contains("hostssl \"pem\" +pem_agent_pool 10.1.0.0/16 md5\n"));
        assert!(
            other.contains("hostssl \"pem\" \"pgb2\",\"pem_admin1\" 10.1.0.0/16 scram-sha-256\n")
        );
        let replaced = place_block(&once, &other).unwrap();
        assert_eq!(replaced, format!("{other}{original}"));
    }
}
