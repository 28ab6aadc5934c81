//! Every PEM command line that EDB's documentation (PEM 7 to 10) and EDB's deployment tooling
//! print (`tests/data/pem-command-lines.txt`, one per line with its source) parses, and each
//! registration and server registration among them runs against the test bed with the outcome
//! the file gives: success with PEM's success line and the server's rows, or the one-line
//! error it names.
//!
//! The lines are run as printed, with their placeholders replaced by the test bed's values:
//! - `{% for ... %}...{% endfor %}` loops render empty (no extra options); TPA's
//!   `{{ item | quote }}` renders its first loop item, `'streaming replication'`; `{{ x |
//!   default('v') }}` renders `v`; any other `{{ ... }}`, `$VAR` or `${VAR}` becomes `lineN` (N = the line's number among the runnable
//!   lines), and `<...>` loses its brackets.
//! - The program (`pemworker`, `./pemworker`, `/usr/edb/pem/agent/bin/pemworker`, ...) is this
//!   build, linked as `<site>/bin/pemworker` in a private site directory per line, which is also
//!   its HOME: PEM's default `--config-dir` (`<binary>/../etc`) is `<site>/etc` and
//!   `--cert-path` `~/.pem` is `<site>/.pem`. Absolute paths given to `--config-dir`,
//!   `--cert-path`, `-c` and `-o agent_ssl_crt/agent_ssl_key` are moved under the site.
//! - PEM server: `--pem-server` is 127.0.0.1; in PEM 10's multi-host list the printed
//!   127.0.0.1 stays and the other hosts become names that do not resolve
//!   (`nowhere-N.invalid`), so registration must find the one that answers; `--pem-port` the bed's
//!   pgBouncer, `--pem-user` the bed's PEM admin, `--pem-agent-user` the bed's pem_agent_user1;
//!   PEM_SERVER_PASSWORD is the admin's password and PGSSLROOTCERT the bed's CA (an agent host's
//!   ~/.pgpass and root certificate would serve as well); the line's other variables stay.
//! - Monitored server: `--server-addr` and `--asb-host-name` are 127.0.0.1, `--server-port`
//!   and `--asb-host-port` the bed's PostgreSQL, `--server-user` and `--asb-host-user` a
//!   pg_monitor role `monitor` (its password in PEM_MONITORED_SERVER_PASSWORD),
//!   `--server-database` and `--asb-host-db` postgres.
//! - The server knows agents 5 and 8 (PEM's pages re-register those ids with `-o agent_id`);
//!   `-o agent_ssl_crt/agent_ssl_key` files are made by PEM 10's manual recipe (`openssl
//!   genrsa`, `openssl x509 -req` with the bed's PEM CA files) for the user the line logs in as
//!   (`--pem-agent-user`, else `agent<ID>`), where the line names them.
//! - Modes that act on a registered agent (--register-server, --unregister-server,
//!   --verify-registration, --unregister-agent, --enable-probe, --disable-probe) run where an
//!   agent was registered first; --unregister-server and the probe modes also find the bed's
//!   server bound to it. After each server registration the test retires the server again, so
//!   that the next line can register it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Parser;
use common::{ADMIN_PASSWORD, ADMIN_USER, TestBed, outcome};
use pemworker::connection::pool;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

const MONITOR_PASSWORD: &str = "Monitor-S3cret!pw";
const AGENT_USER: &str = "pem_agent_user1";

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Ok,
    Fail(i32, String),
    Parse,
}

#[derive(Debug)]
struct Line {
    number: usize,
    expect: Expect,
    command: String,
    source: String,
}

fn lines() -> Vec<Line> {
    let text = include_str!("data/pem-command-lines.txt");
    let mut out = Vec::new();
    for raw in text.lines().filter(|l| l.starts_with('[')) {
        let (outcome, rest) = raw[1..].split_once("] ").expect("[OUTCOME] COMMAND");
        let (command, source) = rest.split_once(" # ").expect("COMMAND # SOURCE");
        let expect = match outcome {
            "ok" => Expect::Ok,
            "parse" => Expect::Parse,
            f => {
                let (code, text) = f
                    .strip_prefix("fail ")
                    .and_then(|f| f.split_once(": "))
                    .unwrap_or_else(|| panic!("unknown outcome {f:?}"));
                Expect::Fail(code.parse().unwrap(), text.to_string())
            }
        };
        out.push(Line {
            number: out.len() + 1,
            expect,
            command: command.to_string(),
            source: source.to_string(),
        });
    }
    out
}

/// Renders the line's template and shell placeholders (see the module documentation).
fn render(command: &str, number: usize) -> String {
    let mut s = command.to_string();
    while let Some(start) = s.find("{% for") {
        let end = s[start..].find("{% endfor %}").expect("endfor") + start;
        s.replace_range(start..end + "{% endfor %}".len(), "");
    }
    s = s.replace("{{ item | quote }}", "'streaming replication'");
    let mark = format!("line{number}");
    while let Some(start) = s.find("{{") {
        let end = s[start..].find("}}").expect("}}") + start;
        // `x|default('no')` renders its default, as for an unset variable.
        let value = s[start..end]
            .split_once("default('")
            .and_then(|(_, d)| d.split_once('\''))
            .map_or(mark.clone(), |(d, _)| d.to_string());
        s.replace_range(start..end + 2, &value);
    }
    while let Some(start) = s.find('$') {
        let end = if s[start + 1..].starts_with('{') {
            s[start..].find('}').expect("}") + start + 1
        } else {
            s[start + 1..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(s.len(), |e| e + start + 1)
        };
        s.replace_range(start..end, &mark);
    }
    s.replace(['<', '>'], "")
}

/// Splits as a POSIX shell would (quotes, backslashes), stopping at an unquoted `|`.
fn split(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    w.push(c);
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => w.extend(chars.next()),
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            '|' => break,
            c if c.is_whitespace() => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// A line ready to run: environment, program name and arguments, with the bed's values.
struct Prepared {
    env: Vec<(String, String)>,
    program: String,
    args: Vec<String>,
    config_dir: PathBuf,
    /// Files -o agent_ssl_crt/-o agent_ssl_key name, and the user they must be issued for.
    local_cert: Option<(PathBuf, PathBuf, String)>,
}

/// A printed absolute path, moved under the site.
fn under(site: &Path, printed: &str) -> PathBuf {
    site.join(printed.trim_start_matches('/').replace('/', "_"))
}

/// The bed's pgBouncer and PostgreSQL ports.
#[derive(Clone, Copy)]
struct Ports {
    pgbouncer: u16,
    postgres: u16,
}

fn prepare(ports: Ports, line: &Line, site: &Path) -> Prepared {
    let words = split(&render(&line.command, line.number));
    let mut words = words.into_iter().peekable();
    let mut env = Vec::new();
    while let Some(w) = words.next_if(|w| {
        w.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        })
    }) {
        let (k, v) = w.split_once('=').unwrap();
        env.push((k.to_string(), v.to_string()));
    }
    let program = words.next().expect("a program");
    let program = Path::new(&program)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut args = Vec::new();
    let mut config_dir = site.join("etc");
    let (mut crt, mut key, mut agent_id, mut agent_user) = (None, None, None, None);
    let value_of = |flag: &str, v: String| -> String {
        match flag {
            "--pem-server" if v.contains(',') => v
                .split(',')
                .enumerate()
                .map(|(i, h)| {
                    if h == "127.0.0.1" {
                        h.to_string()
                    } else {
                        format!("nowhere-{i}.invalid")
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
            "--pem-server" => "127.0.0.1".to_string(),
            "--pem-port" => ports.pgbouncer.to_string(),
            "--pem-user" => ADMIN_USER.to_string(),
            "--pem-agent-user" => AGENT_USER.to_string(),
            "--server-addr" | "--asb-host-name" => "127.0.0.1".to_string(),
            "--server-port" | "--asb-host-port" => ports.postgres.to_string(),
            "--server-user" | "--asb-host-user" => "monitor".to_string(),
            "--server-database" | "--asb-host-db" => "postgres".to_string(),
            "--config-dir" | "--cert-path" => under(site, &v).display().to_string(),
            _ => v,
        }
    };
    // -o file names relative to the configuration directory stay relative, as printed.
    let moved = |p: &str| {
        if Path::new(p).is_absolute() {
            under(site, p)
        } else {
            PathBuf::from(p)
        }
    };
    while let Some(w) = words.next() {
        let (flag, attached) = match w.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (w.clone(), None),
        };
        let takes_value = flag.starts_with('-')
            && !matches!(
                flag.as_str(),
                "-f" | "--help" | "--version" | "--enable-heartbeat-connection"
            )
            && !flag.starts_with("--register")
            && !flag.starts_with("--unregister")
            && !flag.starts_with("--update")
            && !matches!(
                flag.as_str(),
                "--verify-registration" | "--enable-probe" | "--disable-probe" | "--check-config"
            );
        let value = match attached {
            Some(v) => Some(v),
            None if takes_value && words.peek().is_some_and(|n| !n.starts_with("--")) => {
                words.next()
            }
            None => None,
        };
        let Some(v) = value else {
            args.push(w);
            continue;
        };
        let v = match flag.as_str() {
            "-c" | "--config-file" => {
                let file = under(site, &v);
                config_dir = file.parent().unwrap().to_path_buf();
                file.display().to_string()
            }
            "-o" => match v.split_once('=') {
                Some(("agent_ssl_crt", p)) if !p.is_empty() => {
                    let f = moved(p);
                    crt = Some(f.clone());
                    format!("agent_ssl_crt={}", f.display())
                }
                Some(("agent_ssl_key", p)) if !p.is_empty() => {
                    let f = moved(p);
                    key = Some(f.clone());
                    format!("agent_ssl_key={}", f.display())
                }
                Some(("agent_id", id)) => {
                    agent_id = Some(id.to_string());
                    v
                }
                _ => v,
            },
            f => {
                let v = value_of(f, v);
                if f == "--config-dir" {
                    config_dir = PathBuf::from(&v);
                }
                if f == "--pem-agent-user" {
                    agent_user = Some(v.clone());
                }
                v
            }
        };
        args.push(flag);
        args.push(v);
    }
    for (k, v) in [
        ("PEM_SERVER_PASSWORD", ADMIN_PASSWORD),
        ("PEM_MONITORED_SERVER_PASSWORD", MONITOR_PASSWORD),
    ] {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
    let local_cert = crt.zip(key).map(|(c, k)| {
        let user = agent_user.unwrap_or_else(|| format!("agent{}", agent_id.unwrap_or_default()));
        // Relative paths are relative to the configuration directory, as in PEM 10.
        let at = |p: PathBuf| {
            if p.is_absolute() {
                p
            } else {
                config_dir.join(p)
            }
        };
        (at(c), at(k), user)
    });
    Prepared {
        env,
        program,
        args,
        config_dir,
        local_cert,
    }
}

fn mode(args: &[String]) -> &str {
    args.iter()
        .find(|a| {
            pemworker::cli::MODES
                .iter()
                .any(|(_, long, _)| a.strip_prefix("--") == Some(long))
        })
        .map(String::as_str)
        .unwrap_or("")
}

/// The site's copy of this build: a hard link where possible.
fn install(site: &Path) -> PathBuf {
    let bin = site.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("pemworker");
    let built = Path::new(env!("CARGO_BIN_EXE_pemworker"));
    if std::fs::hard_link(built, &exe).is_err() {
        std::fs::copy(built, &exe).unwrap();
    }
    exe
}

fn run(bed: &TestBed, site: &Path, exe: &Path, p: &Prepared) -> (i32, String, String) {
    let mut c = Command::new(exe);
    c.args(&p.args)
        .current_dir(site)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", site)
        .env("PGSSLROOTCERT", &bed.root_crt)
        .stdin(Stdio::null());
    for (k, v) in &p.env {
        c.env(k, v);
    }
    outcome(&c.output().expect("run pemworker"))
}

fn agent_id_in(config_dir: &Path) -> i32 {
    let text = std::fs::read_to_string(config_dir.join("agent.cfg")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("agent_id="))
        .and_then(|v| v.trim().parse().ok())
        .expect("agent_id in agent.cfg")
}

async fn count(su: &Client, sql: &str, id: i32) -> i64 {
    pool::query(su, "count", sql, &[(&id, Type::INT4)])
        .await
        .unwrap()[0]
        .get(0)
}

/// An agent registered the usual way in `config_dir` (the line's agent host).
fn register_first(bed: &TestBed, site: &Path, exe: &Path, config_dir: &Path) -> i32 {
    let p = Prepared {
        env: vec![("PEM_SERVER_PASSWORD".into(), ADMIN_PASSWORD.into())],
        program: "pemworker".into(),
        args: [
            "--register-agent",
            "--pem-server",
            "127.0.0.1",
            "--pem-port",
            &bed.pgb_port.to_string(),
            "--pem-user",
            ADMIN_USER,
            "--pem-agent-user",
            AGENT_USER,
            "--display-name",
            "registered first",
            "--config-dir",
            &config_dir.display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
        config_dir: config_dir.to_path_buf(),
        local_cert: None,
    };
    let (code, out, err) = run(bed, site, exe, &p);
    assert_eq!(code, 0, "registering an agent first: {out}{err}");
    agent_id_in(config_dir)
}

fn bind_bed_server(bed: &TestBed, site: &Path, exe: &Path, config_dir: &Path) {
    let p = Prepared {
        env: vec![
            ("PEM_SERVER_PASSWORD".into(), ADMIN_PASSWORD.into()),
            (
                "PEM_MONITORED_SERVER_PASSWORD".into(),
                MONITOR_PASSWORD.into(),
            ),
        ],
        program: "pemworker".into(),
        args: [
            "--register-server",
            "--pem-user",
            ADMIN_USER,
            "--server-addr",
            "127.0.0.1",
            "--server-port",
            &bed.pg_port.to_string(),
            "--server-user",
            "monitor",
            "--config-dir",
            &config_dir.display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
        config_dir: config_dir.to_path_buf(),
        local_cert: None,
    };
    let (code, out, err) = run(bed, site, exe, &p);
    assert_eq!(code, 0, "binding the bed's server first: {out}{err}");
}

/// PEM 10's manual recipe (certificates/manual_cert_generation): an RSA key from `openssl
/// genrsa` (PKCS#1, as PEM's sslutils and OpenSSL 1.x write it) and a certificate for `user`
/// signed with the PEM CA's files from the server's data directory by `openssl x509 -req`.
fn issue_locally(bed: &TestBed, user: &str, crt: &Path, key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let dir = bed.home.join(format!("ca-for-{user}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_crt, ca_key, csr) = (
        dir.join("ca_certificate.crt"),
        dir.join("ca_key.key"),
        dir.join("agent.csr"),
    );
    std::fs::write(&ca_crt, &bed.ca.cert_pem).unwrap();
    std::fs::write(&ca_key, &bed.ca.key_pem).unwrap();
    for d in [crt.parent().unwrap(), key.parent().unwrap()] {
        std::fs::create_dir_all(d).unwrap();
    }
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (k, c, r) = (
        key.to_str().unwrap(),
        crt.to_str().unwrap(),
        csr.to_str().unwrap(),
    );
    openssl(&["genrsa", "-traditional", "-out", k, "2048"]);
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    openssl(&[
        "req",
        "-new",
        "-key",
        k,
        "-subj",
        &format!("/CN={user}"),
        "-out",
        r,
    ]);
    openssl(&[
        "x509",
        "-req",
        "-days",
        "365",
        "-in",
        r,
        "-CA",
        ca_crt.to_str().unwrap(),
        "-CAkey",
        ca_key.to_str().unwrap(),
        "-CAcreateserial",
        "-out",
        c,
    ]);
}

async fn retire_servers(su: &Client) {
    pool::batch(
        su,
        "retiring servers",
        "DELETE FROM pem.agent_server_binding; UPDATE pem.server SET active = false WHERE active",
    )
    .await
    .unwrap();
}

#[test]
fn every_line_is_in_the_file_with_its_source_and_parses() {
    let lines = lines();
    assert!(lines.len() >= 80, "{} lines", lines.len());
    for l in &lines {
        assert!(
            l.source.starts_with("http")
                || l.source.starts_with("EnterpriseDB/")
                || l.source.starts_with("copy of")
                || l.source.starts_with("third-party")
                || l.source.starts_with("same walkthrough"),
            "line {} has no source: {:?}",
            l.number,
            l.source
        );
        if matches!(&l.expect, Expect::Fail(_, t) if t.contains("space after")) {
            continue; // the one printed form that is a typo, refused with its fix
        }
        let ports = Ports {
            pgbouncer: 6432,
            postgres: 5432,
        };
        let p = prepare(ports, l, Path::new("/nonexistent/site"));
        let argv = std::iter::once(p.program.clone()).chain(p.args.iter().cloned());
        match pemworker::cli::Cli::try_parse_from(argv) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) => {}
            Err(e) => panic!(
                "line {} does not parse: {}\n{}",
                l.number,
                l.command,
                e.render()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_lines_of_pems_documentation_and_edbs_tooling_run_as_printed() {
    let bed = TestBed::start();
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "setup",
        &format!(
            "CREATE ROLE monitor LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor; \
             INSERT INTO pem.agent (id, display_name, active) VALUES (5, 'agent5', false), (8, 'agent8', false); \
             SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence('pem.agent', 'id'), 100)"
        ),
    )
    .await
    .unwrap();
    let mut failures = Vec::new();
    for l in lines() {
        if l.expect == Expect::Parse {
            continue;
        }
        let site = bed.home.join(format!("line{}", l.number));
        let exe = install(&site);
        let ports = Ports {
            pgbouncer: bed.pgb_port,
            postgres: bed.pg_port,
        };
        let p = prepare(ports, &l, &site);
        let m = mode(&p.args).to_string();
        let help = p.args.iter().any(|a| a == "--help");
        let needs_agent = !help
            && matches!(
                m.as_str(),
                "--register-server"
                    | "--unregister-server"
                    | "--verify-registration"
                    | "--unregister-agent"
                    | "--enable-probe"
                    | "--disable-probe"
            );
        let pre_agent = needs_agent.then(|| register_first(&bed, &site, &exe, &p.config_dir));
        if needs_agent
            && matches!(
                m.as_str(),
                "--unregister-server" | "--enable-probe" | "--disable-probe"
            )
        {
            bind_bed_server(&bed, &site, &exe, &p.config_dir);
        }
        if let Some((crt, key, user)) = &p.local_cert {
            issue_locally(&bed, user, crt, key);
        }
        let (code, out, err) = run(&bed, &site, &exe, &p);
        let shown = format!(
            "line {} ({}): {}\n  run as: {:?}\n  exit {code}\n  stdout: {out}\n  stderr: {err}",
            l.number, l.source, l.command, p.args
        );
        let problem = match &l.expect {
            Expect::Fail(want_code, text) => {
                let lines: Vec<&str> = err.lines().collect();
                if code != *want_code || lines.len() != 1 || !lines[0].contains(text.as_str()) {
                    Some(format!(
                        "expected exit {want_code} and one line with {text:?}"
                    ))
                } else {
                    None
                }
            }
            Expect::Ok if code != 0 => Some("expected success".to_string()),
            Expect::Ok if help => (!out.contains("Usage:")).then(|| "no usage".to_string()),
            Expect::Ok => match m.as_str() {
                "--register-agent" => {
                    if !out.contains("Postgres Enterprise Manager Agent registered successfully!") {
                        Some("no PEM success line".to_string())
                    } else {
                        let id = agent_id_in(&p.config_dir);
                        let active = count(
                            &su,
                            "SELECT count(*) FROM pem.agent WHERE id = $1 AND active",
                            id,
                        )
                        .await;
                        let wanted = p
                            .args
                            .iter()
                            .find_map(|a| a.strip_prefix("agent_id="))
                            .map(|v| v.parse::<i32>().unwrap());
                        let listed = p
                            .args
                            .iter()
                            .skip_while(|a| *a != "--pem-server")
                            .nth(1)
                            .filter(|h| h.contains(','))
                            .cloned();
                        let cfg = std::fs::read_to_string(p.config_dir.join("agent.cfg"))
                            .unwrap_or_default();
                        if active != 1 {
                            Some(format!("agent {id} is not active on the server"))
                        } else if listed.is_some_and(|h| !cfg.contains(&format!("pem_host={h}\n")))
                        {
                            Some("agent.cfg's pem_host is not the list given".to_string())
                        } else if wanted.is_some_and(|w| w != id) {
                            Some(format!("agent id {id}, not the one given"))
                        } else {
                            None
                        }
                    }
                }
                "--register-server" => {
                    let id = pre_agent.unwrap();
                    let bound = count(
                        &su,
                        "SELECT count(*) FROM pem.agent_server_binding WHERE agent_id = $1",
                        id,
                    )
                    .await;
                    let efm = p.args.iter().any(|a| a == "--efm-cluster-name");
                    let recorded =
                        std::fs::read_to_string(p.config_dir.join("monitored_targets.json"))
                            .unwrap_or_default();
                    retire_servers(&su).await;
                    if !out.contains(
                        "Database Server registered with Postgres Enterprise Manager Server successfully!",
                    ) {
                        Some("no PEM success line".to_string())
                    } else if bound != 1 {
                        Some(format!("{bound} bindings for agent {id}"))
                    } else if efm && !recorded.contains("\"cluster_name\"") {
                        Some("the EFM cluster name is not recorded".to_string())
                    } else {
                        None
                    }
                }
                "--verify-registration" => (!out
                    .contains("Verify registration done successfully."))
                .then(|| "no PEM success line".to_string()),
                _ => None,
            },
            Expect::Parse => None,
        };
        if matches!(
            m.as_str(),
            "--unregister-server" | "--enable-probe" | "--disable-probe"
        ) {
            retire_servers(&su).await;
        }
        if let Some(p) = problem {
            failures.push(format!("{p}\n{shown}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `--register-agent` for agent 5 with `-o agent_ssl_crt/agent_ssl_key` in `dir`.
fn local_cert_args(bed: &TestBed, site: &Path, crt: &Path, key: &Path) -> Prepared {
    Prepared {
        env: vec![("PEM_SERVER_PASSWORD".into(), ADMIN_PASSWORD.into())],
        program: "pemworker".into(),
        args: [
            "--register-agent",
            "--pem-server",
            "127.0.0.1",
            "--pem-port",
            &bed.pgb_port.to_string(),
            "--pem-user",
            ADMIN_USER,
            "--display-name",
            "agent5",
            "-o",
            "agent_id=5",
            "-o",
            &format!("agent_ssl_crt={}", crt.display()),
            "-o",
            &format!("agent_ssl_key={}", key.display()),
        ]
        .map(String::from)
        .to_vec(),
        config_dir: site.join("etc"),
        local_cert: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locally_issued_certificates_are_checked_before_the_server_is_touched() {
    use std::os::unix::fs::PermissionsExt;
    let bed = TestBed::start();
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "setup",
        "INSERT INTO pem.agent (id, display_name, active) VALUES (5, 'agent5', false); \
         SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence('pem.agent', 'id'), 100)",
    )
    .await
    .unwrap();
    let site = bed.home.join("local");
    let exe = install(&site);
    let dir = site.join("certs");
    let (crt, key) = (dir.join("agent5.crt"), dir.join("agent5.key"));
    issue_locally(&bed, "agent5", &crt, &key);
    let (other_crt, other_key) = (dir.join("agent6.crt"), dir.join("agent6.key"));
    issue_locally(&bed, "agent6", &other_crt, &other_key);
    // A certificate for agent5 from a CA that is not the PEM CA.
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let (foreign_crt, foreign_key) = (foreign.join("agent5.crt"), foreign.join("agent5.key"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .args(["-subj", "/CN=Foreign CA", "-keyout"])
        .arg(foreign.join("ca.key"))
        .arg("-out")
        .arg(foreign.join("ca.crt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&foreign_key)
            .arg("2048")
            .output()
            .unwrap()
            .status
            .success()
    );
    let csr = foreign.join("agent5.csr");
    assert!(
        Command::new("openssl")
            .args(["req", "-new", "-subj", "/CN=agent5", "-key"])
            .arg(&foreign_key)
            .arg("-out")
            .arg(&csr)
            .output()
            .unwrap()
            .status
            .success()
    );
    assert!(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "30", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(foreign.join("ca.crt"))
            .arg("-CAkey")
            .arg(foreign.join("ca.key"))
            .arg("-CAcreateserial")
            .arg("-out")
            .arg(&foreign_crt)
            .output()
            .unwrap()
            .status
            .success()
    );
    std::fs::set_permissions(&foreign_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open_key = dir.join("open.key");
    std::fs::copy(&key, &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();

    let agents = || async {
        pool::query(
            &bed.connect(&bed.superuser()).await,
            "agents",
            "SELECT count(*) FROM pem.agent WHERE active",
            &[],
        )
        .await
        .unwrap()[0]
            .get::<_, i64>(0)
    };
    for (c, k, why) in [
        (&crt, &other_key, "it is not the key of"),
        (&other_crt, &other_key, "its common name is \"agent6\""),
        (
            &foreign_crt,
            &foreign_key,
            "it was not issued by the PEM CA",
        ),
        (&crt, &open_key, "run chmod 600"),
        (&crt, &dir.join("missing.key"), "cannot read it"),
    ] {
        let (code, out, err) = run(&bed, &site, &exe, &local_cert_args(&bed, &site, c, k));
        assert_eq!(code, 1, "{why}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(why), "{why}: {err}");
        assert!(
            !site.join("etc/agent.cfg").exists(),
            "{why}: agent.cfg written"
        );
        assert_eq!(agents().await, 0, "{why}: an agent row is active");
    }
    // An id the server does not know is refused, and nothing is left.
    let mut unknown = local_cert_args(&bed, &site, &crt, &key);
    for a in unknown.args.iter_mut() {
        if a == "agent_id=5" {
            *a = "agent_id=77".into();
        }
    }
    let crt77 = dir.join("agent77.crt");
    let key77 = dir.join("agent77.key");
    issue_locally(&bed, "agent77", &crt77, &key77);
    for a in unknown.args.iter_mut() {
        *a = a
            .replace(&crt.display().to_string(), &crt77.display().to_string())
            .replace(&key.display().to_string(), &key77.display().to_string());
    }
    let (code, out, err) = run(&bed, &site, &exe, &unknown);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("agent id 77 (-o agent_id) is not registered"),
        "{err}"
    );
    assert!(!bed.role_names().await.contains(&"agent77".to_string()));
    assert!(!site.join("etc/agent.cfg").exists());

    // The legitimate flow: agent 5 registered with its own files, which are left as they were.
    let before = (std::fs::read(&crt).unwrap(), std::fs::read(&key).unwrap());
    let (code, out, err) = run(&bed, &site, &exe, &local_cert_args(&bed, &site, &crt, &key));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Postgres Enterprise Manager Agent registered successfully!"));
    assert_eq!(agent_id_in(&site.join("etc")), 5);
    let cfg = std::fs::read_to_string(site.join("etc/agent.cfg")).unwrap();
    assert!(
        cfg.contains(&format!("agent_ssl_crt={}", crt.display())),
        "{cfg}"
    );
    assert!(
        cfg.contains(&format!("agent_ssl_key={}", key.display())),
        "{cfg}"
    );
    assert_eq!(
        before,
        (std::fs::read(&crt).unwrap(), std::fs::read(&key).unwrap())
    );
    // libpq logs in through pgBouncer with the files as the agent would.
    let psql = bed.psql(
        &bed.agent_conninfo("agent5", &crt, &key),
        "SELECT current_user",
    );
    assert_eq!(
        String::from_utf8_lossy(&psql.stdout).trim(),
        "agent5",
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    // And -c FILE names that agent.cfg for the management modes.
    let mut verify = local_cert_args(&bed, &site, &crt, &key);
    verify.args = vec![
        "--verify-registration".into(),
        "-c".into(),
        site.join("etc/agent.cfg").display().to_string(),
    ];
    let (code, out, err) = run(&bed, &bed.home, &exe, &verify);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("Verify registration done successfully."),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_connection_string_from_the_environment_registers() {
    let bed = TestBed::start();
    let site = bed.home.join("conn");
    let exe = install(&site);
    let p = Prepared {
        env: vec![
            ("PEM_SERVER_PASSWORD".into(), ADMIN_PASSWORD.into()),
            (
                "PEM_REGISTRATION_CONN_STRING".into(),
                format!(
                    "host=127.0.0.1 port={} user={ADMIN_USER} dbname=postgres sslmode=verify-CA",
                    bed.pgb_port
                ),
            ),
        ],
        program: "pemworker".into(),
        args: [
            "--register-agent",
            "--pem-agent-user",
            AGENT_USER,
            "--enable-smtp",
            "true",
        ]
        .map(String::from)
        .to_vec(),
        config_dir: site.join("etc"),
        local_cert: None,
    };
    let (code, out, err) = run(&bed, &site, &exe, &p);
    assert_eq!(code, 0, "{out}{err}");
    let cfg = std::fs::read_to_string(site.join("etc/agent.cfg")).unwrap();
    assert!(cfg.contains(&format!("pem_port={}", bed.pgb_port)), "{cfg}");
    assert!(cfg.contains("pem_ssl_mode=verify-ca"), "{cfg}");
    assert!(cfg.contains("enable_smtp=true"), "{cfg}");
    // A password in the string is refused without echoing it.
    let mut with_password = p;
    with_password.env[1].1.push_str(" password=s3cret-in-argv");
    let (code, _, err) = run(&bed, &site, &exe, &with_password);
    assert_eq!(code, 1);
    assert!(
        err.contains("PEM_SERVER_PASSWORD") && !err.contains("s3cret"),
        "{err}"
    );
}
