//! The README's deployment walk-through, run as written.
//!
//! The `sh` blocks of README.md that follow a `<!-- walkthrough -->` marker are run in one
//! shell, in order, as root, against Debian's PostgreSQL 15 and pgBouncer as their packages
//! leave a fresh machine, inside private mount, network and PID namespaces that
//! `tests/walkthrough/bed.sh` sets up (so the commands keep their paths and ports and the
//! machine running the test is left as it was). `<!-- walkthrough check -->` blocks run once
//! the PEM server holds samples of the agent's host, the monitored server and pgBouncer;
//! `<!-- walkthrough alternative -->` blocks run after that on an agent host with no
//! registration (the agent stopped, its agent.cfg and ~/.pem moved aside), followed by
//! `pemworker --verify-registration`.
//!
//! What differs from a user's machine is [`SUBSTITUTIONS`] (each must still match the README)
//! and the test bed's `systemctl` (bed.sh). The README's "The walk-through test" lists both.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// README text replaced before running, and why. Each must occur in the walk-through.
const SUBSTITUTIONS: &[(&str, &str, &str)] = &[
    (
        "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal",
        ": rustup skipped, the test suite was built with a Rust toolchain already",
        "the bed has no network, and the suite was built with Rust already",
    ),
    (
        ". \"$HOME/.cargo/env\"",
        ": no cargo environment needed",
        "rustup was not run",
    ),
    (
        "cargo build --release --locked",
        ": cargo build skipped, the test suite built this source already",
        "the suite built the binary already",
    ),
    (
        "target/release/pemworker",
        "\"$PEMWORKER_TEST_BINARY\"",
        "that build's binary",
    ),
];

/// Commands the walk-through must contain, so that losing a marker cannot make it shorter
/// unnoticed.
const REQUIRED: &[&str] = &[
    "scripts/install-deps",
    "pemworker pooler prepare-server",
    "--install-schema",
    "pemworker pooler server-certificate",
    "pemworker pooler configure",
    "systemctl restart pgbouncer",
    "pemworker pooler enrolment-token create",
    "pemworker --register-agent",
    "--enrolment-token-file",
    "pemworker --register-server",
    "pemworker pooler bind",
    "systemctl enable --now pemagent.service",
];

#[derive(Debug, Default)]
struct Walkthrough {
    steps: Vec<String>,
    checks: Vec<String>,
    alternatives: Vec<String>,
}

/// The marked blocks of `readme`, in order. A marker must be followed by a fenced `sh` block;
/// an unknown marker is an error, as is a walk-through without blocks.
fn extract(readme: &str) -> Result<Walkthrough, String> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut w = Walkthrough::default();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        let Some(kind) = line
            .strip_prefix("<!-- walkthrough")
            .and_then(|rest| rest.strip_suffix("-->"))
            .map(str::trim)
        else {
            i += 1;
            continue;
        };
        let at = i + 1;
        let fence = lines.get(at).map(|l| l.trim());
        if fence != Some("```sh") {
            return Err(format!(
                "README.md line {}: the walkthrough marker is not followed by a ```sh block",
                i + 1
            ));
        }
        let end = (at + 1..lines.len())
            .find(|&j| lines[j].trim() == "```")
            .ok_or_else(|| format!("README.md line {}: the ```sh block is not closed", at + 1))?;
        let body = lines[at + 1..end].join("\n") + "\n";
        match kind {
            "" => w.steps.push(body),
            "check" => w.checks.push(body),
            "alternative" => w.alternatives.push(body),
            other => {
                return Err(format!(
                    "README.md line {}: unknown walkthrough marker {other:?} (use walkthrough, walkthrough check or walkthrough alternative)",
                    i + 1
                ));
            }
        }
        i = end + 1;
    }
    if w.steps.is_empty() || w.checks.is_empty() || w.alternatives.is_empty() {
        return Err(format!(
            "README.md has {} walkthrough, {} check and {} alternative blocks; each kind is needed",
            w.steps.len(),
            w.checks.len(),
            w.alternatives.len()
        ));
    }
    let all = w.steps.join("");
    if let Some(missing) = REQUIRED.iter().find(|c| !all.contains(*c)) {
        return Err(format!(
            "the README's walk-through no longer contains {missing:?}"
        ));
    }
    Ok(w)
}

/// The blocks with [`SUBSTITUTIONS`] applied; each must have matched somewhere.
fn substitute(w: &mut Walkthrough) -> Result<(), String> {
    for (from, to, _) in SUBSTITUTIONS {
        let mut matched = false;
        for b in w
            .steps
            .iter_mut()
            .chain(w.checks.iter_mut())
            .chain(w.alternatives.iter_mut())
        {
            if b.contains(from) {
                matched = true;
                *b = b.replace(from, to);
            }
        }
        if !matched {
            return Err(format!(
                "the README's walk-through no longer contains {from:?}: update SUBSTITUTIONS in tests/walkthrough.rs and the table in the README"
            ));
        }
    }
    Ok(())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The whole run as one bash script: the bed, the steps (each announced on stderr, so a
/// failure names its step), the wait for samples, the checks, then the alternative.
fn script(w: &Walkthrough, repo: &Path, binary: &Path) -> String {
    let mut s = String::new();
    s.push_str("set -eo pipefail\n");
    s.push_str(&format!(
        "source {}\n",
        quote(&repo.join("tests/walkthrough/bed.sh").display().to_string())
    ));
    s.push_str(&format!(
        "PEMWORKER_TEST_BINARY={}\n",
        quote(&binary.display().to_string())
    ));
    s.push_str(&format!(
        "bed_setup \"$1\" {} \"$PEMWORKER_TEST_BINARY\"\n",
        quote(&repo.display().to_string())
    ));
    s.push_str(&format!("cd {}\n", quote(&repo.display().to_string())));
    s.push_str(
        "trap 'rc=$?; if [ $rc -ne 0 ]; then echo \"walk-through: FAILED at $STEP (exit $rc)\" >&2; bed_diagnostics >&2; fi' EXIT\n",
    );
    for (i, b) in w.steps.iter().enumerate() {
        s.push_str(&format!(
            "STEP='walk-through block {}'; echo \"walk-through: $STEP\" >&2\n{b}",
            i + 1
        ));
    }
    s.push_str(
        "STEP='waiting for samples'; echo \"walk-through: $STEP\" >&2\n\
         bed_wait bed_samples_stored 120 || bed_fail 'no samples of the host, the monitored server and pgBouncer within 120 s'\n",
    );
    for (i, b) in w.checks.iter().enumerate() {
        s.push_str(&format!(
            "STEP='check block {}'; echo \"walk-through: $STEP\" >&2\n{b}",
            i + 1
        ));
    }
    s.push_str(
        "STEP='a fresh agent host'; echo \"walk-through: $STEP\" >&2\n\
         systemctl stop pemagent.service\n\
         mv /usr/edb/pem/agent/etc/agent.cfg /root/agent.cfg.token-enrolled\n\
         mv /root/.pem /root/.pem.token-enrolled\n",
    );
    for (i, b) in w.alternatives.iter().enumerate() {
        s.push_str(&format!(
            "STEP='alternative block {}'; echo \"walk-through: $STEP\" >&2\n{b}",
            i + 1
        ));
    }
    s.push_str(
        "STEP='verifying the alternative registration'; echo \"walk-through: $STEP\" >&2\n\
         pemworker --verify-registration\n\
         echo 'walk-through: done' >&2\n",
    );
    s
}

fn require_tool(path: &str, hint: &str) {
    let found = if path.starts_with('/') {
        Path::new(path).is_file()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(path).is_file()))
            .unwrap_or(false)
            || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(path).is_file())
    };
    assert!(
        found,
        "{path} not found; install it with `{hint}` (or run scripts/install-deps)"
    );
}

#[test]
fn the_readme_walkthrough_runs_as_written_from_a_bare_postgresql_to_stored_samples() {
    for (tool, hint) in [
        ("pg_createcluster", "apt-get install postgresql-15"),
        (
            "/usr/lib/postgresql/15/bin/initdb",
            "apt-get install postgresql-15",
        ),
        ("/usr/sbin/pgbouncer", "apt-get install pgbouncer"),
        ("psql", "apt-get install postgresql-client-15"),
        ("unshare", "apt-get install util-linux"),
        ("ip", "apt-get install iproute2"),
        ("openssl", "apt-get install openssl"),
    ] {
        require_tool(tool, hint);
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_pemworker"));
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let mut w = extract(&readme).unwrap_or_else(|e| panic!("{e}"));
    substitute(&mut w).unwrap_or_else(|e| panic!("{e}"));

    let work = tempfile::tempdir().unwrap();
    let script_path = work.path().join("walkthrough.sh");
    std::fs::write(&script_path, script(&w, &repo, &binary)).unwrap();
    let state = work.path().join("state");
    std::fs::create_dir(&state).unwrap();

    // The README's commands are root's; the namespaces need root too.
    let mut cmd = if nix::unistd::Uid::effective().is_root() {
        Command::new("unshare")
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", "unshare"]);
        c
    };
    cmd.args([
        "--mount",
        "--net",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--propagation",
        "private",
        "env",
        "-i",
        "HOME=/root",
        "USER=root",
        "LOGNAME=root",
        "SHELL=/bin/bash",
        "LANG=C.UTF-8",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "bash",
    ])
    .arg(&script_path)
    .arg(&state)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());

    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .expect("run unshare (util-linux), as root or through sudo -n");
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let limit = Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > limit {
            // --kill-child: the namespace's processes go with it.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed = started.elapsed();
    let stdout = out_reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    let combined = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    match status {
        None => panic!("the walk-through did not finish within {limit:?}\n{combined}"),
        Some(s) if !s.success() => {
            if stderr.starts_with("unshare: ") {
                panic!(
                    "the walk-through runs in private mount, network and PID namespaces, which need root with CAP_SYS_ADMIN (a VM, or a privileged container)\n{combined}"
                );
            }
            if !nix::unistd::Uid::effective().is_root() && stderr.contains("sudo") {
                panic!(
                    "the walk-through runs its commands as root in private namespaces: run the suite as root or with passwordless sudo\n{combined}"
                );
            }
            panic!("the walk-through failed ({s})\n{combined}");
        }
        Some(_) => {}
    }
    for expected in [
        // Step 4 made the PEM CA on a server that had none.
        "created the PEM CA's /var/lib/postgresql/15/main/ca_key.key",
        // The worker's start line, at the default log level, through pgBouncer, with the
        // monitored server and the bound pgBouncer scheduled.
        "running as pem_agent_user1 on 127.0.0.1:6432 (through a connection pooler)",
        "on 1 monitored server",
        "on 1 pgBouncer",
        "no problems found",
        "agent 2 is registered and active",
    ] {
        assert!(
            combined.contains(expected),
            "{expected:?} not in the walk-through's output\n{combined}"
        );
    }
    assert!(stderr.contains("walk-through: done"), "{combined}");
    // The whole run, for `cargo test --test walkthrough -- --nocapture`.
    eprintln!("{combined}");
    eprintln!(
        "the README walk-through ran {} blocks, {} check and {} alternative in {:.1} s",
        w.steps.len(),
        w.checks.len(),
        w.alternatives.len(),
        elapsed.as_secs_f64()
    );
}

#[cfg(test)]
mod extraction {
    use super::*;

    const README: &str = "# x\n\n<!-- walkthrough -->\n```sh\ncurl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal\n. \"$HOME/.cargo/env\"\ncargo build --release --locked\ninstall target/release/pemworker /x\n```\n\n```sh\nnot marked\n```\n<!-- walkthrough check -->\n```sh\ncheck\n```\n<!-- walkthrough alternative -->\n```sh\nalt\n```\n";

    fn full() -> String {
        let mut r = README.to_string();
        r.push_str("<!-- walkthrough -->\n```sh\n");
        for c in REQUIRED {
            r.push_str(c);
            r.push('\n');
        }
        r.push_str("```\n");
        r
    }

    #[test]
    fn marked_blocks_only_in_order_with_the_substitutions() {
        let mut w = extract(&full()).unwrap();
        assert_eq!(w.steps.len(), 2);
        assert!(!w.steps.concat().contains("not marked"));
        assert_eq!((w.checks.len(), w.alternatives.len()), (1, 1));
        substitute(&mut w).unwrap();
        assert!(
            w.steps[0].starts_with(": rustup skipped")
                && w.steps[0].contains("\n: cargo build skipped"),
            "{}",
            w.steps[0]
        );
        assert!(w.steps[0].contains("install \"$PEMWORKER_TEST_BINARY\" /x"));
    }

    #[test]
    fn a_broken_or_thinned_walkthrough_is_an_error() {
        assert!(extract(README).unwrap_err().contains("no longer contains"));
        let unfenced = full().replacen(
            "<!-- walkthrough -->\n```sh",
            "<!-- walkthrough -->\n\n```sh",
            1,
        );
        assert!(extract(&unfenced).unwrap_err().contains("not followed"));
        let unknown = full().replacen("walkthrough check", "walkthrough maybe", 1);
        assert!(extract(&unknown).unwrap_err().contains("unknown"));
        let mut w = extract(&full().replace("cargo build --release --locked", "make")).unwrap();
        assert!(substitute(&mut w).unwrap_err().contains("SUBSTITUTIONS"));
    }
}
