//! CPU accounting around a measurement: the whole machine's busy time
//! (what a path makes the machine do, the kernel's share included) and
//! each path's own processes' time (what the path itself costs, which the
//! machine figure mixes with iperf3, the echo server and everything else).
//!
//! A process's time is that of its whole tree: every thread (live or
//! exited), every live descendant and every reaped one, so a peer that
//! forks its worker, or an `ip netns exec` that would fork before exec,
//! is still charged in full. Packet work the kernel does in softirq is
//! charged to whatever runs at that moment, so only the machine figure is
//! sure to hold it.

use std::collections::HashMap;

/// Clock ticks per second: the unit of /proc/stat and /proc/PID/stat.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Busy CPU seconds of the whole machine so far (all CPUs, /proc/stat):
/// every path is charged everything it makes the machine do.
pub(crate) fn machine() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle, iowait.
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    busy / ticks_per_sec()
}

/// The fields of /proc/PID/stat after the command name (`state` is 0).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: it ends at the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

const PPID: usize = 1;
const UTIME: usize = 11;
const CUTIME: usize = 13;

/// CPU seconds of process `pid`'s threads, live and exited: utime+stime
/// of /proc/PID/stat, read from its CPU clock for nanoseconds instead of
/// ticks (a round trip costs microseconds; a tick is 10 ms).
fn process_clock(pid: u32, fields: &[u64]) -> f64 {
    let mut id: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls only write the clockid_t and timespec we own.
    let ok = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut id) == 0
            && libc::clock_gettime(id, &mut ts) == 0
    };
    if ok {
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    } else {
        let t = |i: usize| fields.get(i).copied().unwrap_or(0) as f64;
        (t(UTIME) + t(UTIME + 1)) / ticks_per_sec()
    }
}

/// CPU seconds process `pid` and its descendants have used so far; 0 if
/// it is gone.
pub(crate) fn tree(pid: u32) -> f64 {
    let mut stats: HashMap<u32, Vec<u64>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse().ok())
                && let Some(f) = stat_fields(p)
            {
                stats.insert(p, f);
            }
        }
    }
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&p, f) in &stats {
        if let Some(&pp) = f.get(PPID) {
            children.entry(pp as u32).or_default().push(p);
        }
    }
    let mut total = 0.0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Some(f) = stats.get(&p) else { continue };
        let reaped = f.get(CUTIME).copied().unwrap_or(0) + f.get(CUTIME + 1).copied().unwrap_or(0);
        total += process_clock(p, f) + reaped as f64 / ticks_per_sec();
        todo.extend(children.get(&p).into_iter().flatten());
    }
    total
}

/// A moment's CPU totals: the machine's and each named process tree's.
pub(crate) struct Sample {
    machine: f64,
    procs: Vec<(String, f64)>,
}

impl Sample {
    /// Takes one now for the process trees `procs` (name, pid).
    pub(crate) fn now(procs: &[(&str, u32)]) -> Self {
        Self {
            machine: machine(),
            procs: procs
                .iter()
                .map(|&(n, pid)| (n.to_string(), tree(pid)))
                .collect(),
        }
    }

    /// CPU seconds from `self` to `later`: the machine's, and each
    /// process's by name.
    pub(crate) fn until(&self, later: &Sample) -> (f64, Vec<(String, f64)>) {
        (
            later.machine - self.machine,
            self.procs
                .iter()
                .zip(&later.procs)
                .map(|((n, a), (_, b))| (n.clone(), b - a))
                .collect(),
        )
    }
}
