//! How the worker keeps its resident memory small.
//!
//! - One arena: glibc gives every thread that allocates an arena of its own (up to eight per
//!   core), each a separate heap that keeps its own free memory. The worker's threads are the
//!   runtime, the log writer and a few blocking threads that take turns (spool and stats files,
//!   OS probes); they allocate little and never at the same time in earnest, so one shared arena
//!   costs no contention and keeps one heap instead of several half-empty ones.
//! - Trimming after each delivery: a round allocates and frees a few hundred kilobytes (samples,
//!   JSON, TLS records); glibc returns freed memory to the system only from the top of the heap.
//!   `malloc_trim` gives back every free page, wherever it lies, once per round when the worker
//!   goes idle (a few microseconds on a heap this small).
//! - Start-up code given back: the pages of machine code, constants and symbol tables that only
//!   start-up used (argument and configuration parsing, the dynamic loader's symbol lookups,
//!   OpenSSL's initialisation of every algorithm and error string, the TLS handshakes and
//!   logins) stay mapped, and counted in RSS, until memory runs short. Once the first round is
//!   delivered, and again a minute later (after the code that runs only once early on, such as
//!   the first schedule checks), [`release_start_up_code`] unmaps the read-only file pages of
//!   the binary and its libraries; those a round needs come back at once from the page cache
//!   (the files are not read again), the others stay out. About half of the worker's RSS was such pages (README.md,
//!   "Footprint").
//!
//! All of it is Linux's and glibc's; elsewhere these functions do nothing.

/// Limits the allocator to one arena. Call before any thread is started.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before other threads
    // exist, as glibc asks for M_ARENA_MAX.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// Gives freed heap memory back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks; it has no other precondition.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Unmaps the resident pages of the binary's and the shared libraries' read-only mappings
/// (machine code, constant data, symbol tables); they are mapped again, from the page cache,
/// when next used. Only mappings of a file that are not writable and hold no private copy of
/// any page qualify: nothing in them differs from the file, so dropping them loses nothing.
/// Relocated data (whose pages are private copies) and writable mappings are left alone. What
/// the worker then uses every round stays resident.
pub fn release_start_up_code() {
    #[cfg(target_os = "linux")]
    {
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return;
        };
        for (start, end) in clean_file_mappings(&smaps) {
            // SAFETY: the range is a whole mapping of this process, of a file, not writable, with
            // no private (anonymous) page: MADV_DONTNEED drops its pages from the page tables and
            // the next access maps them from the file again, so every byte reads as before.
            unsafe {
                nix::libc::madvise(
                    start as *mut nix::libc::c_void,
                    end - start,
                    nix::libc::MADV_DONTNEED,
                );
            }
        }
    }
}

/// The (start, end) of each read-only (`r-xp` or `r--p`) mapping of a file with no anonymous
/// page, in a /proc/PID/smaps text.
fn clean_file_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    // The mapping being read, while it still qualifies.
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(anon) = line.strip_prefix("Anonymous:") {
            if anon.trim() != "0 kB" {
                current = None;
            }
            continue;
        }
        let mut f = line.split_whitespace();
        let Some((start, end)) = f.next().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            // A field line ("Rss:  12 kB"), not a mapping's.
            continue;
        };
        out.extend(current.take());
        let perms = f.next().unwrap_or("");
        let path = f.nth(3).unwrap_or("");
        if (perms == "r-xp" || perms == "r--p") && path.starts_with('/') && end > start {
            current = Some((start, end));
        }
    }
    out.extend(current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_read_only_file_mappings_are_chosen() {
        let smaps = "\
55d0c0a00000-55d0c0a80000 r--p 00000000 fe:01 1234 /usr/bin/pemworker
Rss:                 100 kB
Anonymous:             0 kB
55d0c0a80000-55d0c0f00000 r-xp 00080000 fe:01 1234 /usr/bin/pemworker
Size:               4608 kB
Anonymous:             0 kB
55d0c0f00000-55d0c0f40000 r--p 00500000 fe:01 1234 /usr/bin/pemworker
Anonymous:           256 kB
55d0c0f40000-55d0c0f80000 rw-p 00540000 fe:01 1234 /usr/bin/pemworker
Anonymous:            12 kB
55d0c1000000-55d0c1100000 rw-p 00000000 00:00 0 [heap]
Anonymous:          1024 kB
7f0000000000-7f0000100000 r-xp 00000000 00:00 0
Anonymous:             0 kB
7f0000200000-7f0000300000 r-xp 00028000 fe:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
7f0000400000-7f0000500000 r--p 00000000 fe:01 98 /usr/lib/x86_64-linux-gnu/libm.so.6
";
        assert_eq!(
            clean_file_mappings(smaps),
            [
                (0x55d0c0a00000, 0x55d0c0a80000),
                (0x55d0c0a80000, 0x55d0c0f00000),
                (0x7f0000200000, 0x7f0000300000),
                (0x7f0000400000, 0x7f0000500000),
            ],
            "code, constants and symbol tables; not relocated data, writable or anonymous memory"
        );
    }

    #[test]
    fn code_given_back_still_runs() {
        release_start_up_code();
        // Code of this binary and of libc, mapped again on use.
        let v: Vec<String> = (0..100).map(|i| format!("{i}")).collect();
        assert_eq!(v.concat().len(), 190);
        assert!(std::fs::read_to_string("/proc/self/status").is_ok());
    }
}
