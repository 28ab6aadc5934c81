//! Agent-level probes: what the local operating system reports about the host the agent runs on.
//!
//! This module owns reading CPU, memory, load, disk, network and process figures, through the
//! `procfs` crate (`statvfs(3)` for disk space; process states straight from each
//! /proc/PID/stat), and turning them into rows of the probes' columns. [`OsProbes`] keeps the
//! previous CPU counters, so that `cpu_usage` describes the time since the last call rather than
//! since boot, and the processes' stat files open between rounds.
//!
//! Every call is synchronous and may touch file systems (`statvfs` on a hung network mount can
//! block), so async callers should run it on a blocking thread.

use std::collections::{BTreeMap, HashMap};

use procfs::{Current, CurrentSI, KernelStats, LoadAverage, Meminfo};

use super::{Collector, Error, Row, Value};

/// File system types that describe no storage (kernel interfaces, memory-backed or
/// auto-mount placeholders). `tmpfs` is left out on purpose: it is memory, not disk.
const PSEUDO_FILE_SYSTEMS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "fuse.gvfsd-fuse",
    "fuse.lxcfs",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// CPU time counters (clock ticks) as `cpu_usage` groups them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CpuTicks {
    user: u64,
    system: u64,
    idle: u64,
    iowait: u64,
    steal: u64,
}

impl CpuTicks {
    fn from_kernel(t: &procfs::CpuTime) -> CpuTicks {
        // guest time is already counted in user time, so it is not added again.
        CpuTicks {
            user: t.user + t.nice,
            system: t.system + t.irq.unwrap_or(0) + t.softirq.unwrap_or(0),
            idle: t.idle,
            iowait: t.iowait.unwrap_or(0),
            steal: t.steal.unwrap_or(0),
        }
    }

    /// Ticks elapsed since `earlier`. iowait may go backwards (see proc(5)), so each counter
    /// saturates at zero instead of wrapping.
    fn since(&self, earlier: &CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    fn total(&self) -> u64 {
        self.user + self.system + self.idle + self.iowait + self.steal
    }

    /// Percentages in column order; the shares of `total()`, so they sum to 100.
    fn percentages(&self) -> Row {
        let total = self.total().max(1) as f64;
        [self.user, self.system, self.idle, self.iowait, self.steal]
            .into_iter()
            .map(|t| Value::Float(t as f64 * 100.0 / total))
            .collect()
    }
}

/// Collector of the agent-level probes; keeps what `cpu_usage` needs between calls.
#[derive(Debug, Default)]
pub struct OsProbes {
    previous_cpu: Option<CpuTicks>,
    processes: ProcessFiles,
}

impl OsProbes {
    pub fn new() -> Self {
        OsProbes::default()
    }

    /// Rows of one agent-level probe, in the columns of its [`super::ProbeSpec`].
    pub fn collect(&mut self, probe: &str) -> Result<Vec<Row>, Error> {
        match super::spec(probe).map(|s| s.collector) {
            Some(Collector::Os(collect)) => collect(self),
            _ => Err(Error::Unknown(probe.to_string())),
        }
    }

    pub(super) fn cpu_usage(&mut self) -> Result<Vec<Row>, Error> {
        let stats = KernelStats::current().map_err(|e| failed("cpu_usage", "/proc/stat", e))?;
        let now = CpuTicks::from_kernel(&stats.total);
        let mut elapsed = match &self.previous_cpu {
            Some(previous) => now.since(previous),
            None => now,
        };
        // Two calls within one clock tick see no elapsed time; since-boot shares are then the
        // best figure there is, and still sum to 100.
        if elapsed.total() == 0 {
            elapsed = now;
        }
        self.previous_cpu = Some(now);
        Ok(vec![elapsed.percentages()])
    }
}

// The probes below keep no state between calls; these give them the collectors' signature.
impl OsProbes {
    pub(super) fn memory_usage(&mut self) -> Result<Vec<Row>, Error> {
        memory_usage()
    }
    pub(super) fn load_average(&mut self) -> Result<Vec<Row>, Error> {
        load_average()
    }
    pub(super) fn disk_space(&mut self) -> Result<Vec<Row>, Error> {
        disk_space()
    }
    pub(super) fn network_statistics(&mut self) -> Result<Vec<Row>, Error> {
        network_statistics()
    }
    pub(super) fn process_count(&mut self) -> Result<Vec<Row>, Error> {
        self.processes.count()
    }
}

fn failed(probe: &str, source: &str, e: impl std::fmt::Display) -> Error {
    Error::Failed {
        probe: probe.to_string(),
        message: format!("cannot read {source}: {e}"),
    }
}

/// Byte counts beyond i64 cannot occur on real hardware; saturate rather than wrap.
fn int(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn memory_usage() -> Result<Vec<Row>, Error> {
    let m = Meminfo::current().map_err(|e| failed("memory_usage", "/proc/meminfo", e))?;
    // Kernels before 3.14 have no MemAvailable; free memory is the closest lower bound.
    let available = m.mem_available.unwrap_or(m.mem_free);
    Ok(vec![vec![
        int(m.mem_total),
        int(m.mem_total.saturating_sub(available)),
        int(m.mem_free),
        int(available),
        int(m.swap_total),
        int(m.swap_total.saturating_sub(m.swap_free)),
    ]])
}

fn load_average() -> Result<Vec<Row>, Error> {
    let l = LoadAverage::current().map_err(|e| failed("load_average", "/proc/loadavg", e))?;
    // procfs parses the kernel's two decimals into f32; rounding back to them keeps 0.51 from
    // being stored as 0.5099999904632568.
    let two_decimals = |v: f32| Value::Float((f64::from(v) * 100.0).round() / 100.0);
    Ok(vec![vec![
        two_decimals(l.one),
        two_decimals(l.five),
        two_decimals(l.fifteen),
    ]])
}

fn is_storage(fs_type: &str) -> bool {
    !PSEUDO_FILE_SYSTEMS.contains(&fs_type)
}

/// procfs 0.17 decodes the octal escapes of /proc/mounts except `\040` (space), which the
/// kernel writes for spaces in mount points.
fn mount_point_path(fs_file: &str) -> String {
    fs_file.replace(r"\040", " ")
}

// statvfs field types are u64 here but 32 bits wide on some targets; u64::from serves both.
#[allow(clippy::useless_conversion)]
fn disk_space() -> Result<Vec<Row>, Error> {
    let mounts = procfs::mounts().map_err(|e| failed("disk_space", "/proc/mounts", e))?;
    // A later mount on the same point hides the earlier ones, so the last entry wins, and only
    // then are pseudo file systems dropped (statvfs would describe the one on top).
    let mut by_point: BTreeMap<String, String> = BTreeMap::new();
    for m in mounts {
        by_point.insert(mount_point_path(&m.fs_file), m.fs_vfstype);
    }
    let mut rows = Vec::new();
    for (point, fs_type) in by_point.into_iter().filter(|(_, t)| is_storage(t)) {
        // Unreadable mounts (permissions, a vanished mount, a stale network mount answering
        // with an error) are left out: one bad mount must not cost the others their figures.
        let Ok(st) = nix::sys::statvfs::statvfs(point.as_str()) else {
            continue;
        };
        let frsize = u64::from(st.fragment_size());
        let blocks = u64::from(st.blocks());
        if blocks == 0 {
            // Sizeless file systems (a pseudo type not in the list above) describe no storage.
            continue;
        }
        let free = u64::from(st.blocks_free());
        rows.push(vec![
            Value::Text(point),
            Value::Text(fs_type),
            int(blocks.saturating_mul(frsize)),
            int(blocks.saturating_sub(free).saturating_mul(frsize)),
            int(u64::from(st.blocks_available()).saturating_mul(frsize)),
        ]);
    }
    Ok(rows)
}

fn network_statistics() -> Result<Vec<Row>, Error> {
    let devices =
        procfs::net::dev_status().map_err(|e| failed("network_statistics", "/proc/net/dev", e))?;
    let mut devices: Vec<_> = devices.into_values().collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(devices
        .into_iter()
        .map(|d| {
            vec![
                Value::Text(d.name),
                int(d.recv_bytes),
                int(d.sent_bytes),
                int(d.recv_packets),
                int(d.sent_packets),
                int(d.recv_errs),
                int(d.sent_errs),
            ]
        })
        .collect())
}

#[derive(Debug, Default, PartialEq)]
struct ProcessCounts {
    total: i64,
    running: i64,
    sleeping: i64,
    zombie: i64,
}

impl ProcessCounts {
    fn row(&self) -> Vec<Row> {
        vec![vec![
            Value::Int(self.total),
            Value::Int(self.running),
            Value::Int(self.sleeping),
            Value::Int(self.zombie),
        ]]
    }

    fn add(&mut self, state: char) {
        self.total += 1;
        match state {
            'R' => self.running += 1,
            // D (uninterruptible, usually waiting for I/O) is sleeping too; I (idle kernel
            // threads) and stopped or traced processes count only in the total.
            'S' | 'D' => self.sleeping += 1,
            'Z' => self.zombie += 1,
            _ => {}
        }
    }
}

/// The state letter of a /proc/PID/stat line: the field after the command name, which is in
/// parentheses and may itself hold spaces and parentheses (so the last `)` ends it).
fn stat_state(stat: &[u8]) -> Option<char> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat.get(close + 2)
        .filter(|b| b.is_ascii_alphabetic())
        .map(|&b| char::from(b))
}

/// The /proc/PID/stat files `process_count` keeps open from one round to the next.
///
/// Opening a stat file costs the kernel a path walk and a new file each time, three times what
/// reading it again costs; kept open, it is read again from offset 0 and the kernel writes the
/// line afresh. A kept file stays tied to its process: once that exits and is reaped, reading
/// fails with ESRCH even if a new process got the same id, so a reused id is opened anew.
/// The number kept is bounded by a quarter of the open-file limit; processes beyond it are
/// opened and closed each round as before. /proc itself is listed again only when the kernel
/// has handed out a process id since the last listing (`/proc/loadavg`): otherwise no process
/// can have started, and the kept files are all there is to read.
#[derive(Debug)]
struct ProcessFiles {
    /// /proc itself, kept open too: listing it again needs only a rewind.
    proc: Option<nix::dir::Dir>,
    kept: HashMap<u32, KeptStat>,
    limit: usize,
    round: u64,
    /// /proc/loadavg, kept open: its last field is the last process id the kernel handed out.
    loadavg: Option<std::fs::File>,
    /// That id when /proc was last listed, if every process listed then is kept (none past
    /// `limit`) and /proc is this process's own pid namespace (the id is the namespace's).
    listed_at: Option<u64>,
}

#[derive(Debug)]
struct KeptStat {
    file: std::fs::File,
    seen: u64,
}

impl Default for ProcessFiles {
    fn default() -> Self {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        ProcessFiles {
            proc: None,
            kept: HashMap::new(),
            limit: usize::try_from(soft / 4).unwrap_or(usize::MAX).min(4096),
            round: 0,
            loadavg: None,
            listed_at: None,
        }
    }
}

/// Reading a process's stat file failed because the process is gone (exited between the
/// listing and the read, or reaped since the file was opened) or hidden (hidepid).
fn vanished(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
    ) || e.raw_os_error() == Some(nix::libc::ESRCH)
}

impl ProcessFiles {
    /// The last process id the kernel handed out in this pid namespace, if /proc shows it.
    fn newest_pid(&mut self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        if self.loadavg.is_none() {
            // /proc mounted from another pid namespace lists other ids than loadavg counts.
            let own = std::fs::read_link("/proc/self").ok()?;
            if own.as_os_str() != std::process::id().to_string().as_str() {
                return None;
            }
            self.loadavg = std::fs::File::open("/proc/loadavg").ok();
        }
        let mut buf = [0u8; 128];
        let n = self.loadavg.as_ref()?.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .split_ascii_whitespace()
            .last()?
            .parse()
            .ok()
    }

    /// Counts from the kept files alone: no process was made since /proc was listed, so every
    /// process there is kept, and those gone since fail with ESRCH.
    fn count_kept(&mut self, buf: &mut [u8]) -> Result<ProcessCounts, Error> {
        use std::os::unix::fs::FileExt;
        let mut counts = ProcessCounts::default();
        let mut gone = Vec::new();
        for (pid, k) in &self.kept {
            match k.file.read_at(buf, 0) {
                Ok(n) => {
                    if let Some(state) = stat_state(&buf[..n]) {
                        counts.add(state);
                    }
                }
                Err(e) if vanished(&e) => gone.push(*pid),
                Err(e) => return Err(failed("process_count", &format!("/proc/{pid}/stat"), e)),
            }
        }
        for pid in gone {
            self.kept.remove(&pid);
        }
        Ok(counts)
    }

    /// Counts processes by state from each /proc/PID/stat, reading each into one buffer:
    /// procfs would parse all 52 fields of every process into a struct, for the one letter
    /// wanted here.
    fn count(&mut self) -> Result<Vec<Row>, Error> {
        use nix::fcntl::OFlag;
        use nix::sys::stat::Mode;
        use std::os::unix::fs::FileExt;

        // The state comes within the first ~300 bytes however long the command name (at most 64).
        let mut buf = [0u8; 512];
        // Read before listing: a process made during the listing shows in the next round's.
        let newest = self.newest_pid();
        if newest.is_some() && newest == self.listed_at {
            let counts = self.count_kept(&mut buf)?;
            return Ok(counts.row());
        }
        let mut all_kept = true;

        let failed_proc = |e: nix::Error| failed("process_count", "/proc", e);
        // Taken out and put back at the end: after an error the next round opens it afresh.
        let mut proc = match self.proc.take() {
            Some(dir) => dir,
            None => nix::dir::Dir::open(
                "/proc",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(failed_proc)?,
        };
        let proc_fd = std::os::fd::AsRawFd::as_raw_fd(&proc);
        self.round += 1;
        let round = self.round;
        let mut counts = ProcessCounts::default();
        let mut path = String::with_capacity(24);
        // The iterator rewinds the directory when dropped, ready for the next round.
        for entry in proc.iter() {
            let entry = entry.map_err(failed_proc)?;
            let Some(pid) = entry
                .file_name()
                .to_str()
                .ok()
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // One read: the kernel hands the whole line over at once.
            let mut read = None;
            if let Some(k) = self.kept.get_mut(&pid) {
                match k.file.read_at(&mut buf, 0) {
                    Ok(n) => {
                        k.seen = round;
                        read = Some(n);
                    }
                    // Reaped since it was opened: the id may belong to a new process now.
                    Err(e) if vanished(&e) => {
                        self.kept.remove(&pid);
                    }
                    Err(e) => return Err(failed("process_count", &format!("/proc/{pid}/stat"), e)),
                }
            }
            if read.is_none() {
                use std::fmt::Write;
                path.clear();
                let _ = write!(path, "{pid}/stat");
                let opened = nix::fcntl::openat(
                    Some(proc_fd),
                    path.as_str(),
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map(|fd| {
                    // SAFETY: openat returned a new descriptor that nothing else owns.
                    unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                })
                .map_err(std::io::Error::from);
                match opened.and_then(|file| file.read_at(&mut buf, 0).map(|n| (file, n))) {
                    Ok((file, n)) => {
                        read = Some(n);
                        if self.kept.len() < self.limit {
                            self.kept.insert(pid, KeptStat { file, seen: round });
                        } else {
                            all_kept = false;
                        }
                    }
                    // The process exited between listing /proc and reading its stat file, or
                    // /proc is mounted with hidepid and hides it from this user.
                    Err(e) if vanished(&e) => continue,
                    Err(e) => return Err(failed("process_count", &format!("/proc/{path}"), e)),
                }
            }
            if let Some(state) = read.and_then(|n| stat_state(&buf[..n])) {
                counts.add(state);
            }
        }
        // Processes no longer listed have gone: close their files.
        self.kept.retain(|_, k| k.seen == round);
        self.proc = Some(proc);
        self.listed_at = newest.filter(|_| all_kept);
        Ok(counts.row())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::{PROBES, Target};

    fn as_float(v: &Value) -> f64 {
        match v {
            Value::Float(f) => *f,
            other => panic!("expected a float, got {other:?}"),
        }
    }

    fn as_int(v: &Value) -> i64 {
        match v {
            Value::Int(i) => *i,
            other => panic!("expected an integer, got {other:?}"),
        }
    }

    fn as_text(v: &Value) -> &str {
        match v {
            Value::Text(s) => s,
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn every_agent_probe_yields_rows_of_its_columns() {
        let mut os = OsProbes::new();
        let agent_probes: Vec<_> = PROBES
            .iter()
            .filter(|p| p.target() == Target::Agent)
            .collect();
        assert_eq!(agent_probes.len(), 6);
        for p in agent_probes {
            let rows = os
                .collect(p.name)
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert!(!rows.is_empty(), "{} returned no rows", p.name);
            for row in &rows {
                assert_eq!(row.len(), p.columns.len(), "{}: {row:?}", p.name);
            }
            if p.key.is_empty() {
                assert_eq!(rows.len(), 1, "{} is a single-row probe", p.name);
            }
        }
    }

    #[test]
    fn unknown_probe_is_refused() {
        let err = OsProbes::new().collect("server_info").unwrap_err();
        assert!(
            matches!(err, Error::Unknown(ref p) if p == "server_info"),
            "{err}"
        );
    }

    #[test]
    fn cpu_percentages_are_shares_of_the_elapsed_time() {
        let mut os = OsProbes::new();
        os.collect("cpu_usage").unwrap();
        // Burn a little CPU so that some ticks pass between the two calls.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(60);
        let mut spin = 0u64;
        while std::time::Instant::now() < until {
            spin = spin.wrapping_add(1);
        }
        std::hint::black_box(spin);
        let rows = os.collect("cpu_usage").unwrap();
        let values: Vec<f64> = rows[0].iter().map(as_float).collect();
        assert!(
            values.iter().all(|v| (0.0..=100.0).contains(v)),
            "{values:?}"
        );
        let sum: f64 = values.iter().sum();
        assert!((sum - 100.0).abs() <= 1.0, "sum {sum}: {values:?}");
    }

    #[test]
    fn cpu_ticks_saturate_and_group_as_documented() {
        let earlier = CpuTicks {
            user: 10,
            system: 10,
            idle: 10,
            iowait: 10,
            steal: 0,
        };
        let later = CpuTicks {
            user: 40,
            system: 20,
            idle: 50,
            iowait: 5, // iowait went backwards
            steal: 0,
        };
        let d = later.since(&earlier);
        assert_eq!(d.iowait, 0);
        assert_eq!(d.total(), 80);
        let p: Vec<f64> = d.percentages().iter().map(as_float).collect();
        assert_eq!(p, vec![37.5, 12.5, 50.0, 0.0, 0.0]);
        // No elapsed time at all gives zeros, never NaN.
        let zero: Vec<f64> = CpuTicks::default()
            .percentages()
            .iter()
            .map(as_float)
            .collect();
        assert!(zero.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn memory_figures_are_consistent() {
        let row = &memory_usage().unwrap()[0];
        let v: Vec<i64> = row.iter().map(as_int).collect();
        let (total, used, free, available, swap_total, swap_used) =
            (v[0], v[1], v[2], v[3], v[4], v[5]);
        assert!(total > 0, "{v:?}");
        assert!(
            used <= total && free <= total && available <= total,
            "{v:?}"
        );
        assert_eq!(used, total - available);
        assert!(swap_used <= swap_total, "{v:?}");
    }

    #[test]
    fn load_averages_are_not_negative() {
        let row = &load_average().unwrap()[0];
        assert!(row.iter().map(as_float).all(|v| v >= 0.0), "{row:?}");
    }

    #[test]
    fn disk_space_lists_real_file_systems_once_each() {
        let rows = disk_space().unwrap();
        assert!(!rows.is_empty());
        let points: Vec<&str> = rows.iter().map(|r| as_text(&r[0])).collect();
        let mut unique = points.clone();
        unique.dedup();
        assert_eq!(points, unique, "mount points are listed once each");
        let root_is_storage = procfs::mounts()
            .unwrap()
            .iter()
            .any(|m| m.fs_file == "/" && is_storage(&m.fs_vfstype));
        if root_is_storage {
            assert!(
                points.contains(&"/"),
                "no row for the root file system: {points:?}"
            );
        }
        for r in &rows {
            assert!(is_storage(as_text(&r[1])), "{r:?}");
            let (total, used, available) = (as_int(&r[2]), as_int(&r[3]), as_int(&r[4]));
            assert!(total > 0 && used <= total && available <= total, "{r:?}");
        }
    }

    #[test]
    fn pseudo_file_systems_are_not_storage() {
        for fs in ["proc", "sysfs", "tmpfs", "devtmpfs", "cgroup2", "devpts"] {
            assert!(!is_storage(fs), "{fs}");
        }
        for fs in ["ext4", "xfs", "btrfs", "overlay", "zfs", "nfs4"] {
            assert!(is_storage(fs), "{fs}");
        }
        assert_eq!(mount_point_path(r"/mnt/my\040disk"), "/mnt/my disk");
    }

    #[test]
    fn network_statistics_include_loopback() {
        let rows = network_statistics().unwrap();
        let lo = rows
            .iter()
            .find(|r| as_text(&r[0]) == "lo")
            .expect("a row for lo");
        assert!(lo[1..].iter().map(as_int).all(|v| v >= 0), "{lo:?}");
    }

    #[test]
    fn process_count_sees_this_process() {
        let row = &OsProbes::new().process_count().unwrap()[0];
        let v: Vec<i64> = row.iter().map(as_int).collect();
        let (total, running, sleeping, zombie) = (v[0], v[1], v[2], v[3]);
        assert!(total >= 1, "{v:?}");
        assert!(running + sleeping + zombie <= total, "{v:?}");
    }

    #[test]
    fn kept_stat_files_follow_a_process_until_it_is_reaped() {
        let mut files = ProcessFiles::default();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id();
        let zombies = |row: &Row| as_int(&row[3]);
        let before = files.count().unwrap().remove(0);
        assert!(
            files.kept.contains_key(&pid),
            "the child's stat file is kept"
        );
        // A process started since is seen at the next count: its id is newer than the one
        // handed out before the last listing.
        let mut second = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        files.count().unwrap();
        assert!(
            files.kept.contains_key(&second.id()),
            "a new process is seen"
        );
        second.kill().unwrap();
        second.wait().unwrap();
        // Killed but not reaped: the kept file now reads its zombie state.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let zombie_row = loop {
            let row = files.count().unwrap().remove(0);
            if zombies(&row) > zombies(&before) || std::time::Instant::now() > deadline {
                break row;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(
            zombies(&zombie_row) > zombies(&before),
            "{before:?} -> {zombie_row:?}"
        );
        assert!(files.kept.contains_key(&pid));
        // Reaped: its file is closed, and a process that gets the id later is opened anew.
        child.wait().unwrap();
        files.count().unwrap();
        assert!(
            !files.kept.contains_key(&pid),
            "the reaped child's file is closed"
        );
        assert!(files.kept.len() <= files.limit);
    }

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(stat_state(b"1 (systemd) S 0 1 1 0"), Some('S'));
        assert_eq!(stat_state(b"42 (a) R (b) Z 1 2"), Some('Z'));
        assert_eq!(stat_state(b"7 (x y)) D 1"), Some('D'));
        assert_eq!(stat_state(b"7 (x"), None);
        assert_eq!(stat_state(b"7 (x)"), None);
        assert_eq!(stat_state(b""), None);
    }

    #[test]
    fn process_states_are_counted_by_kind() {
        let mut c = ProcessCounts::default();
        for s in ['R', 'S', 'D', 'Z', 'I', 'T'] {
            c.add(s);
        }
        assert_eq!(
            c,
            ProcessCounts {
                total: 6,
                running: 1,
                sleeping: 2,
                zombie: 1
            }
        );
    }
}
