//! Benchmark, not a test: wall time of one `pemworker --register-agent` through pgBouncer
//! (process start, TLS login, registration transaction, key generation, signing, files).
//!
//!     cargo test --release --test bench_registration -- --ignored --nocapture

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN_PASSWORD, TestBed};

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn registration_wall_time() {
    let bed = TestBed::start();
    let runs = 40;
    let mut times: Vec<Duration> = Vec::new();
    for i in 0..=runs {
        let args = bed.register_args(&format!("bench{i}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let start = Instant::now();
        let out = bed.pemworker_env(&args, &[("PEM_SERVER_PASSWORD", ADMIN_PASSWORD)]);
        let elapsed = start.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The first run creates the agent user and warms pgBouncer's pool; report it apart.
        if i == 0 {
            println!(
                "first registration (creates the agent user): {:.1} ms (target: under 150 ms)",
                ms(elapsed)
            );
        } else {
            times.push(elapsed);
        }
    }
    times.sort();
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!(
        "registration through pgBouncer, {} runs: min {:.1} ms, median {:.1} ms, p95 {:.1} ms, max {:.1} ms (target: median at most 50 ms)",
        times.len(),
        ms(times[0]),
        ms(pct(0.5)),
        ms(pct(0.95)),
        ms(*times.last().unwrap())
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
