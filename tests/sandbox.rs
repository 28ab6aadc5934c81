//! `pemworker sandbox`, run as a new user would: it must come up and show heartbeats and
//! stored samples within 60 s, and Ctrl-C must stop everything and remove its files.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
fn the_sandbox_shows_heartbeats_and_stored_samples_and_cleans_up() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pemworker"))
        .arg("sandbox")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut up = false;
    while started.elapsed() < Duration::from_secs(90) {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) else {
            if let Some(s) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                panic!("sandbox exited early ({s}): {}\n{err}", seen.join("\n"));
            }
            continue;
        };
        seen.push(line.clone());
        // "[  10 s] agent 1 via pgBouncer 127.0.0.1:6432: connected | heartbeats 2 (last 3 s ago) | stored rows 28 | spool 0"
        let number_after = |key: &str| -> Option<u64> {
            line.split(key)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        if line.contains("via pgBouncer")
            && line.contains(": connected")
            && line.contains("(last ")
            && number_after("heartbeats ").is_some_and(|n| n > 0)
            && number_after("stored rows ").is_some_and(|n| n > 0)
        {
            up = true;
            break;
        }
    }
    assert!(
        up,
        "no heartbeats and samples within the time limit:\n{}",
        seen.join("\n")
    );
    let elapsed: u64 = seen
        .last()
        .and_then(|l| {
            l.trim_start_matches('[')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(elapsed <= 60, "took {elapsed} s");

    // Ctrl-C stops it and removes everything.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the sandbox did not stop after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.push(line);
    }
    assert!(status.success(), "{status}\n{}", seen.join("\n"));
    let dir = seen
        .iter()
        .find_map(|l| l.strip_prefix("sandbox stopped; removed "))
        .unwrap_or_else(|| panic!("no removal line:\n{}", seen.join("\n")));
    assert!(!std::path::Path::new(dir).exists(), "{dir} is still there");
}
