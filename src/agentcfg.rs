//! agent.cfg: PEM's agent configuration (`[PEM/agent]`, one `key=value` per line).
//!
//! Read and written by hand rather than with an INI crate because two things matter here that
//! INI crates drop: the line number of every bad key (all are reported, not just the first), and
//! rewriting a file in place (migration to the pooler) keeping its order, comments and unknown
//! keys.

use std::path::{Path, PathBuf};

pub const SECTION: &str = "PEM/agent";
pub const FILE_NAME: &str = "agent.cfg";

/// The keys of PEM's sample agent.cfg, in its order, with the defaults registration writes.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("pem_host", "127.0.0.1"),
    ("pem_port", "5432"),
    ("agent_id", ""),
    ("agent_user", ""),
    ("agent_ssl_key", ""),
    ("agent_ssl_crt", ""),
    ("log_level", "warning"),
    ("log_location", "/var/log/pem/worker.log"),
    ("agent_log_location", "/var/log/pem/agent.log"),
    ("long_wait", "30"),
    ("short_wait", "10"),
    ("alert_threads", "0"),
    ("enable_smtp", "false"),
    ("enable_snmp", "false"),
    ("allow_server_restart", "false"),
    ("allow_package_management", "false"),
    ("allow_streaming_replication", "false"),
    ("max_connections", "0"),
    ("connect_timeout", "-1"),
    ("connection_lifetime", "0"),
    ("allow_batch_probes", "false"),
    ("heartbeat_connection", "false"),
];

/// Keys agent.cfg may hold besides [`DEFAULTS`].
pub const OTHER_KEYS: &[&str] = &[
    "pem_ssl_mode",
    "pem_ssl_root_cert",
    "pem_session_lifetime",
    "agent_secret_file",
    "enable_webhook",
    "batch_script_dir",
    "batch_script_user",
    "ca_file",
    "state_dir",
    "spool_limit",
    "certificate_renewal_fraction",
];

pub fn is_known_key(key: &str) -> bool {
    DEFAULTS.iter().any(|(k, _)| *k == key) || OTHER_KEYS.contains(&key)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Section(String),
    Entry { key: String, value: String },
    Other(String),
}

/// An agent.cfg kept line by line, so rewriting it changes only the keys that are set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Document {
    lines: Vec<Line>,
}

/// A key=value entry of `[PEM/agent]` with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub line: usize,
    pub key: &'a str,
    pub value: &'a str,
}

impl Document {
    pub fn parse(text: &str) -> Document {
        let lines = text
            .lines()
            .map(|raw| {
                let t = raw.trim();
                if let Some(name) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                    Line::Section(name.trim().to_string())
                } else if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
                    Line::Other(raw.to_string())
                } else if let Some((k, v)) = t.split_once('=') {
                    Line::Entry {
                        key: k.trim().to_string(),
                        value: v.trim().to_string(),
                    }
                } else {
                    Line::Other(raw.to_string())
                }
            })
            .collect();
        Document { lines }
    }

    pub fn read(path: &Path) -> std::io::Result<Document> {
        Ok(Document::parse(&std::fs::read_to_string(path)?))
    }

    /// A new file with PEM's keys in PEM's order.
    pub fn with_defaults() -> Document {
        let mut lines = vec![Line::Section(SECTION.to_string())];
        lines.extend(DEFAULTS.iter().map(|(k, v)| Line::Entry {
            key: k.to_string(),
            value: v.to_string(),
        }));
        Document { lines }
    }

    /// Lines that are neither blank, comments, sections nor `key=value`, with their numbers.
    pub fn malformed_lines(&self) -> Vec<(usize, &str)> {
        self.lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match l {
                Line::Other(raw) => {
                    let t = raw.trim();
                    (!(t.is_empty() || t.starts_with('#') || t.starts_with(';')))
                        .then_some((i + 1, raw.as_str()))
                }
                _ => None,
            })
            .collect()
    }

    /// Whether the file has a `[PEM/agent]` section.
    pub fn has_section(&self) -> bool {
        self.lines
            .iter()
            .any(|l| matches!(l, Line::Section(s) if s == SECTION))
    }

    /// The entries of `[PEM/agent]`, in file order.
    pub fn entries(&self) -> Vec<Entry<'_>> {
        let mut inside = false;
        let mut out = Vec::new();
        for (i, l) in self.lines.iter().enumerate() {
            match l {
                Line::Section(s) => inside = s == SECTION,
                Line::Entry { key, value } if inside => out.push(Entry {
                    line: i + 1,
                    key,
                    value,
                }),
                _ => {}
            }
        }
        out
    }

    /// The last value of `key` in `[PEM/agent]` (a later line wins, as in PEM).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries()
            .into_iter()
            .rev()
            .find(|e| e.key == key)
            .map(|e| e.value)
    }

    fn section_range(&mut self) -> (usize, usize) {
        let start = match self
            .lines
            .iter()
            .position(|l| matches!(l, Line::Section(s) if s == SECTION))
        {
            Some(i) => i,
            None => {
                self.lines.push(Line::Section(SECTION.to_string()));
                self.lines.len() - 1
            }
        };
        let end = self.lines[start + 1..]
            .iter()
            .position(|l| matches!(l, Line::Section(_)))
            .map_or(self.lines.len(), |p| start + 1 + p);
        (start, end)
    }

    /// Sets `key` in place (every occurrence), or adds it after the entry `after` (or at the end
    /// of the section when `after` is absent).
    pub fn set(&mut self, key: &str, value: &str, after: Option<&str>) {
        let (start, end) = self.section_range();
        // Every occurrence in every `[PEM/agent]` section (a file may repeat the header), as
        // `get` reads them all.
        let mut found = false;
        let mut inside = false;
        for l in &mut self.lines {
            match l {
                Line::Section(s) => inside = s == SECTION,
                Line::Entry { key: k, value: v } if inside && k == key => {
                    *v = value.to_string();
                    found = true;
                }
                _ => {}
            }
        }
        if found {
            return;
        }
        let anchor = after.and_then(|a| {
            self.lines[start + 1..end]
                .iter()
                .rposition(|l| matches!(l, Line::Entry { key: k, .. } if k == a))
                .map(|p| start + 1 + p + 1)
        });
        // Without an anchor: after the section's last entry, before trailing blank lines.
        let at = anchor.unwrap_or_else(|| {
            self.lines[start + 1..end]
                .iter()
                .rposition(|l| matches!(l, Line::Entry { .. }))
                .map_or(start + 1, |p| start + 1 + p + 1)
        });
        self.lines.insert(
            at,
            Line::Entry {
                key: key.to_string(),
                value: value.to_string(),
            },
        );
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            match l {
                Line::Section(name) => s.push_str(&format!("[{name}]")),
                Line::Entry { key, value } => s.push_str(&format!("{key}={value}")),
                Line::Other(raw) => s.push_str(raw),
            }
            s.push('\n');
        }
        s
    }
}

/// One problem in agent.cfg, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// All problems of a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Problems(pub Vec<Problem>);

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# my agent\n[PEM/agent]\npem_host=10.0.0.5\npem_port=5432\nagent_id=12\n\
                          agent_ssl_key=/root/.pem/agent12.key\nagent_ssl_crt=/root/.pem/agent12.crt\n\
                          custom_thing=keep me\nlog_level=warning\n";

    #[test]
    fn rewrite_keeps_order_comments_and_unknown_keys() {
        let mut d = Document::parse(SAMPLE);
        d.set("agent_user", "pem_agent_user1", Some("agent_id"));
        d.set("pem_port", "6432", None);
        let out = d.render();
        assert_eq!(
            out,
            "# my agent\n[PEM/agent]\npem_host=10.0.0.5\npem_port=6432\nagent_id=12\nagent_user=pem_agent_user1\n\
             agent_ssl_key=/root/.pem/agent12.key\nagent_ssl_crt=/root/.pem/agent12.crt\n\
             custom_thing=keep me\nlog_level=warning\n"
        );
    }

    #[test]
    fn a_repeated_section_header_is_one_section_to_set_as_to_get() {
        let mut d = Document::parse("[PEM/agent]\npem_port=5432\n[PEM/agent]\npem_port=5433\n");
        d.set("pem_port", "6432", None);
        assert_eq!(d.get("pem_port"), Some("6432"));
        assert_eq!(
            d.render(),
            "[PEM/agent]\npem_port=6432\n[PEM/agent]\npem_port=6432\n"
        );
    }

    #[test]
    fn defaults_are_the_guides_keys_in_order() {
        let d = Document::with_defaults();
        let keys: Vec<_> = d.entries().iter().map(|e| e.key.to_string()).collect();
        assert_eq!(keys.first().map(String::as_str), Some("pem_host"));
        assert_eq!(
            keys.last().map(String::as_str),
            Some("heartbeat_connection")
        );
        assert_eq!(keys.len(), 22);
    }

    #[test]
    fn agent_user_defaults_to_the_dedicated_role() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.cfg");
        let (key, crt) = (dir.path().join("a.key"), dir.path().join("a.crt"));
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::fs::write(&crt, "c").unwrap();
        let text = SAMPLE
            .replace("/root/.pem/agent12.key", &key.display().to_string())
            .replace("/root/.pem/agent12.crt", &crt.display().to_string());
        std::fs::write(&p, format!("{text}pem_ssl_mode=require\n")).unwrap();
        let (_, id) = crate::config::AgentConfig::load_with_document(&p).unwrap();
        assert_eq!(
            (id.agent_id, id.agent_user.as_str(), id.pem_port),
            (12, "agent12", 5432)
        );
    }
}
