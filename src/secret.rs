//! Passwords: a type that never prints its value, and the places a password may come from.
//!
//! Passwords never come from argv (visible in `ps`); they come from the environment, a
//! `.pgpass` file or an interactive prompt.

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// A password or other secret. `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The first non-empty environment variable among `names`.
pub fn from_env(names: &[&str]) -> Option<Secret> {
    names
        .iter()
        .filter_map(|n| std::env::var(n).ok())
        .find(|v| !v.is_empty())
        .map(Secret)
}

/// Asks on the terminal, if there is one. `None` when standard input is not a terminal
/// (daemons, CI) so callers can say which variable to set instead.
pub fn prompt(question: &str) -> Option<Secret> {
    if !std::io::stdin().is_terminal() {
        return None;
    }
    rpassword::prompt_password(question)
        .ok()
        .filter(|p| !p.is_empty())
        .map(Secret)
}

/// Where libpq looks for the password file: `PGPASSFILE`, else `~/.pgpass`.
pub fn pgpass_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGPASSFILE") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass"))
}

/// Looks up a password in a libpq password file (`host:port:database:user:password`, `*`
/// wildcards, `\` escapes). Written by hand because the format is five fields and no crate
/// for it is better kept than these lines. Like libpq, a file readable by group or others is
/// ignored, and a Unix-socket host matches `localhost`.
pub fn from_pgpass(
    file: &Path,
    host: &str,
    port: u16,
    database: &str,
    user: &str,
) -> Option<Secret> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access and is ignored; run chmod 0600 {}",
            file.display(),
            file.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    let host = if host.starts_with('/') {
        "localhost"
    } else {
        host
    };
    let port = port.to_string();
    lookup_pgpass(&text, [host, &port, database, user])
}

/// A field as a password file line holds it (`:` and `\\` escaped), the inverse of the
/// parsing below.
pub fn pgpass_escape(field: &str) -> String {
    field.replace('\\', "\\\\").replace(':', "\\:")
}

fn lookup_pgpass(text: &str, wanted: [&str; 4]) -> Option<Secret> {
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = fields[..4]
            .iter()
            .zip(wanted)
            .all(|(f, w)| f == "*" || f == w);
        if matches {
            return Some(Secret(fields[4..].join(":")));
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("non-empty").push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => fields.last_mut().expect("non-empty").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn pgpass_wildcards_and_escapes() {
        let text = "# comment\n\
                    db.example:5432:pem:other:nope\n\
                    *:6432:pem:pem_admin1:pa\\:ss\\\\word\n";
        let got = lookup_pgpass(text, ["db.example", "6432", "pem", "pem_admin1"]);
        assert_eq!(got.unwrap().expose(), "pa:ss\\word");
        assert!(lookup_pgpass(text, ["db.example", "5432", "pem", "pem_admin1"]).is_none());
    }

    #[test]
    fn escaping_is_the_inverse_of_parsing() {
        let pw = "a:b\\c";
        let line = format!("h:1:*:{}:{}\n", pgpass_escape("u:x"), pgpass_escape(pw));
        assert_eq!(
            lookup_pgpass(&line, ["h", "1", "d", "u:x"])
                .unwrap()
                .expose(),
            pw
        );
    }

    #[test]
    fn pgpass_first_match_wins() {
        let text = "*:*:*:u:first\n*:*:*:u:second\n";
        assert_eq!(
            lookup_pgpass(text, ["h", "1", "d", "u"]).unwrap().expose(),
            "first"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_file_is_read_without_a_panic(text in "\\PC{0,300}", a in "\\PC{0,10}") {
                let _ = lookup_pgpass(&text, [&a, "5432", "pem", &a]);
            }

            #[test]
            fn written_fields_read_back_exactly(
                fields in proptest::collection::vec("[ -~]{1,12}", 5),
                other in "[a-z]{1,8}",
            ) {
                let [host, port, db, user, password] = [0, 1, 2, 3, 4].map(|i| fields[i].as_str());
                let line = format!(
                    "{}:{}:{}:{}:{}\n",
                    pgpass_escape(host),
                    pgpass_escape(port),
                    pgpass_escape(db),
                    pgpass_escape(user),
                    pgpass_escape(password)
                );
                // A comment or blank line is never read as an entry, so the field must not start one.
                prop_assume!(!host.trim_start().starts_with('#') && !line.trim().is_empty());
                let text = format!("# before\n{other}:1:x:y:z\n{line}");
                let got = lookup_pgpass(&text, [host, port, db, user]);
                prop_assert_eq!(got.map(|s| s.expose().to_string()), Some(password.to_string()));
            }
        }
    }
}
