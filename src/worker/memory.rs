//! How the worker uses glibc's allocator, for a small steady footprint.
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
//!
//! Both are glibc's; elsewhere they do nothing.

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
