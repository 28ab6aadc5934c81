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

/// A database or user name as one pg_hba token. Quoted always, so that names which are also
/// keywords (`all`, `replication`) or contain commas and spaces keep their literal meaning.
/// PostgreSQL's pg_hba tokenizer has no escape for a double quote, so such names are refused.
pub fn quote(name: &str) -> Result<String, Error> {
    if name.is_empty() || name.contains('"') || name.chars().any(char::is_control) {
        return Err(Error::Invalid {
            what: "name for pg_hba.conf",
            value: name.to_string(),
            why: "it must be non-empty without double quotes or control characters".into(),
        });
    }
    Ok(format!("\"{name}\""))
}

/// The lines the PEM server needs: pgBouncer's auth user and the admin user, and the pooled
/// agent users (members of pem_agent_pool) that pgBouncer logs in as with their md5 secrets.
pub fn server_block(database: &str, users: &[&str], from: &Source) -> Result<String, Error> {
    let db = quote(database)?;
    let users = users
        .iter()
        .map(|u| quote(u))
        .collect::<Result<Vec<_>, _>>()?
        .join(",");
    let (kind, addr) = match from {
        Source::Local => ("local", String::new()),
        Source::Network(c) => ("host", format!(" {c}")),
    };
    Ok(format!(
        "{BEGIN_MARK}\n\
         # pgBouncer's auth user and the PEM admin log in with passwords;\n\
         {kind} {db} {users}{addr} md5\n\
         # pgBouncer logs in as each pooled agent user with the secret its auth_query returned.\n\
         {kind} {db} +pem_agent_pool{addr} md5\n\
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
    fn quoting_refuses_what_pg_hba_cannot_express() {
        assert_eq!(quote("pem_admin1").unwrap(), "\"pem_admin1\"");
        assert_eq!(quote("all").unwrap(), "\"all\"");
        assert!(quote("a\"b").is_err());
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
        let block = server_block("pem", &["pgbouncer", "pem_admin1"], &Source::Local).unwrap();
        assert!(block.contains("local \"pem\" \"pgbouncer\",\"pem_admin1\" md5\n"));
        assert!(block.contains("local \"pem\" +pem_agent_pool md5\n"));
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
        )
        .unwrap();
        let replaced = place_block(&once, &other).unwrap();
        assert_eq!(replaced, format!("{other}{original}"));
    }
}
