//! The names this binary answers to. PEM installs two programs in `/usr/edb/pem/agent/bin`:
//! `pemagent`, the daemon its unit runs (`pemagent -c agent.cfg`) and whose `--version` EDB's
//! deployment tools read, and `pemworker`, the command line. Here both are this one binary: the
//! packages install `pemagent` as a link to `pemworker`, and the name it was started as
//! (`argv[0]`) says which one it is. Both take the same arguments; the name shows in `--help`
//! and `--version`.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::LazyLock;

use clap::Parser;

/// Which of PEM's two programs this process was started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `pemworker`: the command line (and the worker, as PEM's `pemworker -c` runs it).
    Pemworker,
    /// `pemagent`: PEM's daemon name, run by `pemagent.service`.
    Pemagent,
}

/// What `--version` prints after the program's name, for both names. EDB's tools read it:
/// TPA takes `Version:` with `awk '/^Version: / { print $2 }'` and `Schema Supported:` with
/// `awk -F: '/Schema Supported:/ {print $2+0}'`; edb-ansible takes field 2 (split at `:`) of
/// the second line. So `Version:` is the second line of the output. `Version:` is this
/// program's own version, not a PEM release: tools that branch on the PEM release take their
/// oldest branch. `Schema Supported:` is the newest reference schema version this build
/// installs (`--install-schema`; recorded in the table `pem.schema_version`).
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let v = env!("CARGO_PKG_VERSION");
    format!(
        "{v}\nVersion: {v}\nSchema Supported: {}",
        crate::schema::latest_version()
    )
});

impl Program {
    /// The program named by `argv[0]`: `pemagent` when its file name is exactly that (as the
    /// packages' link and PEM's unit start it), else `pemworker`.
    pub fn from_argv0(argv0: Option<&OsStr>) -> Program {
        match argv0.and_then(|a| Path::new(a).file_name()) {
            Some(name) if name == "pemagent" => Program::Pemagent,
            _ => Program::Pemworker,
        }
    }

    /// The program this process was started as.
    pub fn invoked() -> Program {
        Program::from_argv0(std::env::args_os().next().as_deref())
    }

    pub fn name(self) -> &'static str {
        match self {
            Program::Pemworker => "pemworker",
            Program::Pemagent => "pemagent",
        }
    }

    /// Parses this process's arguments into `P` under this program's name.
    pub fn parse<P: Parser>(self) -> Result<P, clap::Error> {
        self.parse_from::<P, _, _>(std::env::args_os())
    }

    /// [`Program::parse`] of `args` (the first is the program's path, as in `argv`).
    pub fn parse_from<P, I, T>(self, args: I) -> Result<P, clap::Error>
    where
        P: Parser,
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let command = P::command()
            .name(self.name())
            .bin_name(self.name())
            .version(VERSION.as_str())
            .long_version(VERSION.as_str());
        P::from_arg_matches(&command.try_get_matches_from(args)?)
    }

    /// The text `--version` prints, for tests and documentation.
    pub fn version_text(self) -> String {
        format!("{} {}\n", self.name(), VERSION.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    /// A command line of its own, so that these tests are about the names only.
    #[derive(Debug, Parser)]
    struct Cli {
        #[arg(short = 'c')]
        config: Option<std::path::PathBuf>,
    }

    #[test]
    fn the_name_it_was_started_as_selects_the_program() {
        for (argv0, want) in [
            ("/usr/edb/pem/agent/bin/pemagent", Program::Pemagent),
            ("pemagent", Program::Pemagent),
            ("./pemagent", Program::Pemagent),
            ("/usr/edb/pem/agent/bin/pemworker", Program::Pemworker),
            ("pemworker", Program::Pemworker),
            // Only PEM's exact name: a renamed copy or a test binary is pemworker.
            ("/tmp/pemagent.old", Program::Pemworker),
            ("pemagent2", Program::Pemworker),
            ("", Program::Pemworker),
        ] {
            assert_eq!(
                Program::from_argv0(Some(OsStr::new(argv0))),
                want,
                "{argv0}"
            );
        }
        assert_eq!(Program::from_argv0(None), Program::Pemworker);
    }

    /// The lines EDB's tools read, parsed as they parse them.
    #[test]
    fn version_has_the_lines_edbs_tools_read() {
        let schema = crate::schema::latest_version().to_string();
        let version = env!("CARGO_PKG_VERSION");
        for program in [Program::Pemagent, Program::Pemworker] {
            let text = program.version_text();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 3, "{text}");
            assert_eq!(lines[0], format!("{} {version}", program.name()));
            // edb-ansible: `cut -d":" -f2 | head -n2 | tail -n1`.
            assert_eq!(lines[1].split(':').nth(1), Some(&*format!(" {version}")));
            // TPA: the second field of the line starting "Version: ".
            let tpa: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("Version: "))
                .filter_map(|l| l.split_whitespace().nth(1))
                .collect();
            assert_eq!(tpa, [version]);
            let supported: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("Schema Supported:"))
                .filter_map(|l| l.split(':').nth(1))
                .map(str::trim)
                .collect();
            assert_eq!(supported, [schema.as_str()]);
        }
    }

    #[test]
    fn version_and_help_use_the_name_it_was_started_as() {
        for program in [Program::Pemagent, Program::Pemworker] {
            for flag in ["--version", "-V"] {
                let e = program
                    .parse_from::<Cli, _, _>([program.name(), flag])
                    .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::DisplayVersion);
                assert_eq!(e.to_string(), program.version_text());
            }
            let e = program
                .parse_from::<Cli, _, _>([program.name(), "--help"])
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::DisplayHelp);
            assert!(
                e.to_string()
                    .contains(&format!("Usage: {} [OPTIONS]", program.name())),
                "{e}"
            );
        }
    }
}
