//! netredir-bench: system benchmarks, each next to its reference in the
//! same run, because these machines are noisy.
//!
//! `lan`: TCP throughput guest → LAN server (iperf3), 1 and 8 streams,
//! through netredir and through the kernel routing the same namespaces
//! (the limit; it crosses the VM's NIC with `steer` attached, so it also
//! shows what the XDP program costs traffic it passes). Reports Gbit/s,
//! the ratio to the kernel path, CPU seconds per GB (each path's own
//! processes, and the whole machine; see `cpu.rs`), and the pass-through
//! cost: the kernel path with netredir attached to the VM and detached.
//!
//! `latency`: small request/response round trips (1 byte and 1 KiB) on
//! one connection, and connection set-up (connect to first echoed byte),
//! p50 and p99, through netredir and through the kernel path, and each
//! path's process CPU per 1-byte round trip.
//!
//! `wan`: Ghostscript-rendered print jobs over the project's WAN emulator
//! at three link profiles, through netredir (compression off and auto),
//! `ssh -C` and sshuttle, next to the floor (see `wan.rs`).
//!
//! Writes a Markdown report (`--out DIR`, default `results/`). `--quick`
//! runs short measurements (CI's smoke run; no thresholds are asserted).

mod cpu;
mod density;
mod plot;
mod wan;

use anyhow::{Context, Result, bail};
use netredir_benches::Redir;
use netredir_benches::testbed::{
    CLIENT_LAN_IP, CLIENT_WAN_IP, HOST_VM_IFACE, HOST_WAN_IP, LAN_IP, Netns, Testbed, wait_until,
};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str = "usage: netredir-bench [--quick] [--out DIR] [--only lan|latency|wan|density|busy]   (run as root; see README)";
const BENCHES: [&str; 5] = ["lan", "latency", "wan", "density", "busy"];

pub(crate) struct Opts {
    pub(crate) quick: bool,
    pub(crate) out: PathBuf,
    only: Option<String>,
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        quick: false,
        out: PathBuf::from("results"),
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = args.next().context("--out takes a directory")?.into(),
            "--only" => o.only = Some(args.next().context("--only takes a benchmark name")?),
            "-h" | "--help" => {
                println!(
                    "{USAGE}\n\nBenchmarks: lan (TCP throughput), latency (round trips and set-up), each through\nnetredir next to the kernel path; wan (print jobs over an emulated WAN, next to ssh -C,\nsshuttle and the floor); density (idle sessions, busy VMs, flow set-up rate, concurrent flows);\nbusy (only density's busy VMs)."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if let Some(b) = &o.only
        && !BENCHES.contains(&b.as_str())
    {
        bail!("no benchmark {b:?}; there are: {}", BENCHES.join(", "));
    }
    Ok(o)
}

fn main() {
    // Hidden: the density benchmark's holding server, run in the LAN.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--serve-hold") {
        let addr = argv.get(2).map_or("0.0.0.0:7100", String::as_str);
        if let Err(e) = density::serve_hold(addr) {
            eprintln!("netredir-bench --serve-hold: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    raise_fd_limit();
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("netredir-bench: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&opts) {
        eprintln!("netredir-bench: {e:#}");
        std::process::exit(1);
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn run(o: &Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (it creates network namespaces and attaches XDP)");
    }
    let mut report = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    writeln!(report, "# netredir benchmarks\n")?;
    writeln!(
        report,
        "- date: {}",
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    )?;
    writeln!(report, "- machine: {cpu}, {} CPUs", sh("nproc", &[]))?;
    writeln!(report, "- kernel: {}", sh("uname", &["-r"]))?;
    writeln!(report, "- netredir: {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(
        report,
        "- iperf3: {}",
        sh("iperf3", &["--version"]).lines().next().unwrap_or("")
    )?;
    writeln!(
        report,
        "- mode: {}\n",
        if o.quick { "quick" } else { "full" }
    )?;
    std::fs::create_dir_all(&o.out)?;
    let want = |b: &str| o.only.as_deref().is_none_or(|x| x == b);
    if want("lan") {
        lan(o, &mut report)?;
    }
    if want("latency") {
        latency(o, &mut report)?;
    }
    if want("wan") {
        wan::run(o, &mut report)?;
    }
    if want("density") {
        density::run(o, &mut report)?;
    }
    if o.only.as_deref() == Some("busy") {
        density::busy(o, &mut report)?;
    }
    plot::finish();
    let path = o.out.join("REPORT.md");
    std::fs::write(&path, &report)?;
    println!("{report}");
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// Takes every file descriptor the hard limit allows (many flows).
pub(crate) fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Lets the kernel route vm ↔ lan directly through host and client.
pub(crate) fn kernel_routes(tb: &Testbed) -> Result<()> {
    for ns in [&tb.host, &tb.client] {
        ns.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    }
    tb.host.run(
        "ip",
        &["route", "add", "10.202.0.0/24", "via", CLIENT_WAN_IP],
    )?;
    tb.client
        .run("ip", &["route", "add", "10.200.0.0/24", "via", HOST_WAN_IP])?;
    let _ = CLIENT_LAN_IP;
    Ok(())
}

/// One iperf3 run from namespace `from` to `dst`: Gbit/s received (the
/// omitted first second left out), and GB sent over the whole run (that
/// second included: the CPU it took is counted too).
fn iperf(
    tb: &Testbed,
    from: &Netns,
    name: &str,
    dst: &str,
    streams: u32,
    secs: u32,
) -> Result<(f64, f64)> {
    tb.spawn(&tb.lan, name, "iperf3", &["-s", "-1", "-B", LAN_IP])?;
    wait_until("iperf3 to listen", Duration::from_secs(10), || {
        tb.lan
            .run("ss", &["-Hltn", "sport = :5201"])
            .is_ok_and(|o| !o.stdout.is_empty())
    })?;
    let out = from
        .command("iperf3")
        .args([
            "-c",
            dst,
            "-J",
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-O",
            "1",
        ])
        .output()
        .context("cannot run iperf3")?;
    tb.wait_exit(name, Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 said: {}",
            text.chars().take(400).collect::<String>()
        )
    })?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no throughput in iperf3's answer: {}", v["error"]))?;
    let sent: f64 = v["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["sum"]["bytes"].as_f64())
        .sum();
    let gb = if sent > 0.0 {
        sent / 1e9
    } else {
        bps * f64::from(secs) / 8e9
    };
    Ok((bps / 1e9, gb))
}

/// slirp4netns giving namespace `ns` its network (NAT into the host's
/// sockets), with a tap of MTU `mtu`.
fn slirp4netns(tb: &Testbed, ns: &Netns, mtu: u32) -> Result<()> {
    let path = format!("/run/netns/{}", ns.name());
    tb.spawn(
        &tb.host,
        &format!("slirp4netns-{mtu}"),
        "slirp4netns",
        &[
            "--configure",
            &format!("--mtu={mtu}"),
            "--disable-host-loopback",
            "--netns-type=path",
            &path,
            "tap0",
        ],
    )?;
    wait_until(
        "slirp4netns to configure tap0",
        Duration::from_secs(10),
        || {
            ns.run("ip", &["-4", "addr", "show", "dev", "tap0"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("10.0.2.100"))
        },
    )
}

/// pasta giving namespace `ns` its network (L4 translation into the
/// host's sockets), with MTU `mtu`, addresses copied from the host's wan0.
fn pasta(tb: &Testbed, ns: &Netns, mtu: u32) -> Result<()> {
    let path = format!("/run/netns/{}", ns.name());
    let mtu_s = mtu.to_string();
    tb.spawn(
        &tb.host,
        &format!("pasta-{mtu}"),
        "pasta",
        &[
            // As root pasta would drop to nobody, who cannot enter the
            // namespace; the testbed is root's anyway.
            "--runas",
            "0:0",
            "-f",
            "-q",
            "--config-net",
            "-4",
            "-m",
            &mtu_s,
            "-i",
            "wan0",
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--netns",
            &path,
        ],
    )?;
    wait_until(
        "pasta to configure the namespace",
        Duration::from_secs(10),
        || {
            ns.run("ip", &["-4", "route", "show", "default"])
                .is_ok_and(|o| !o.stdout.is_empty())
        },
    )
}

/// One cell of the LAN table.
struct LanResult {
    gbit: f64,
    /// The whole machine's CPU seconds per GB moved.
    machine_per_gb: f64,
    /// CPU seconds per GB of each process the path runs (none for the
    /// kernel path), by name.
    procs_per_gb: Vec<(String, f64)>,
    /// Moved next to nothing, twice.
    stalled: bool,
    /// The first run stalled.
    retried: bool,
}

impl LanResult {
    /// The path's processes' CPU seconds per GB, all together, if it runs any.
    fn process_per_gb(&self) -> Option<f64> {
        (!self.procs_per_gb.is_empty()).then(|| self.procs_per_gb.iter().map(|(_, c)| c).sum())
    }

    /// `Gbit/s (process CPU s/GB / machine CPU s/GB)`, `–` for no process.
    fn cell(&self) -> String {
        if self.stalled {
            return "stalled twice".to_string();
        }
        let process = self
            .process_per_gb()
            .map_or("–".to_string(), |c| format!("{c:.1}"));
        format!(
            "{:.2} ({process} / {:.1}){}",
            self.gbit,
            self.machine_per_gb,
            if self.retried { " †" } else { "" }
        )
    }
}

/// One iperf3 run (`streams` streams for `secs` s) from `from` to `dst`,
/// charging the path the CPU of the process trees `procs` (name, pid) and
/// of the machine.
fn measure(
    tb: &Testbed,
    from: &Netns,
    name: &str,
    dst: &str,
    (streams, secs): (u32, u32),
    procs: &[(&str, u32)],
) -> Result<LanResult> {
    // A run that moved next to nothing stalled (seen with pasta): it is
    // measured once more, and reported as stalled if it stalls again.
    for attempt in 0..2 {
        let before = cpu::Sample::now(procs);
        let (gbit, gb) = iperf(tb, from, &format!("{name}-{attempt}"), dst, streams, secs)?;
        let (machine, per_proc) = before.until(&cpu::Sample::now(procs));
        let per_gb = |c: f64| if gb > 0.0 { c / gb } else { 0.0 };
        if gbit >= 0.05 || attempt == 1 {
            return Ok(LanResult {
                gbit,
                machine_per_gb: per_gb(machine),
                procs_per_gb: per_proc.into_iter().map(|(n, c)| (n, per_gb(c))).collect(),
                stalled: gbit < 0.05,
                retried: attempt == 1,
            });
        }
    }
    unreachable!("the loop returns on its second pass")
}

fn lan(o: &Opts, report: &mut String) -> Result<()> {
    let secs = if o.quick { 2 } else { 10 };
    let streams: &[u32] = if o.quick { &[1] } else { &[1, 8] };
    writeln!(
        report,
        "## LAN throughput, guest → LAN server (iperf3, {secs} s)\n"
    )?;
    writeln!(
        report,
        "Gbit/s (CPU seconds per GB moved: the path's own processes / the whole machine). The \
         processes are netredird and the agent for netredir, the slirp4netns or pasta process \
         (with any children) for the peers; the kernel path has no process of its own, so it has \
         only the machine figure. The machine figure also holds both iperf3s and the kernel's \
         packet work; the process figure holds what the kernel does on the process's behalf, \
         but not softirq work that happens to run on another task. Ratios are netredir's \
         throughput over the kernel path's and over the best peer's.\n"
    )?;
    writeln!(
        report,
        "| MTU | streams | kernel path | netredir | slirp4netns | pasta | netredir / kernel | netredir / best peer |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|")?;
    let mut behind = Vec::new();
    let mut groups = Vec::new();
    let mut split = Vec::new();
    let mut pass = Vec::new();
    let mut series: Vec<(String, Vec<f64>)> = ["kernel path", "netredir", "slirp4netns", "pasta"]
        .map(|n| (n.to_string(), Vec::new()))
        .into();
    plot::stage("lan", 2 * (1 + 4 * streams.len() as u64 + 4));
    for mtu in [1500u32, 9000] {
        crate::plot::step("lan", &format!("MTU {mtu}: building the testbed"));
        let tb = Testbed::new("bench-lan")?;
        for (ns, dev) in [(&tb.vm, "eth0"), (&tb.host, "vm0")] {
            ns.run("ip", &["link", "set", "dev", dev, "mtu", &mtu.to_string()])?;
        }
        let r = Redir::with_testbed(tb, &[])?;
        r.start_agent("agent", &[&format!("iperf={LAN_IP}:5201")])?;
        kernel_routes(&r.tb)?;
        // The peers open their sockets in the host namespace; pasta copies
        // its addresses and default route from there.
        r.tb.host
            .run("ip", &["route", "add", "default", "via", CLIENT_WAN_IP])?;
        let slirp_ns = r.tb.add_netns(&format!("slirp{mtu}"))?;
        slirp4netns(&r.tb, &slirp_ns, mtu)?;
        let pasta_ns = r.tb.add_netns(&format!("pasta{mtu}"))?;
        pasta(&r.tb, &pasta_ns, mtu)?;
        let vip = r.vip("iperf")?.to_string();
        let netredir = [
            ("netredird", r.tb.pid("netredird")?),
            ("agent", r.tb.pid("agent")?),
        ];
        let slirp_proc = [("slirp4netns", r.tb.pid(&format!("slirp4netns-{mtu}"))?)];
        let pasta_proc = [("pasta", r.tb.pid(&format!("pasta-{mtu}"))?)];
        for &n in streams {
            let tag = format!("{mtu}-{n}");
            let run = (n, secs);
            crate::plot::step("lan", &format!("MTU {mtu}, {n} stream(s): kernel path"));
            let kernel = measure(&r.tb, &r.tb.vm, &format!("iperf-k{tag}"), LAN_IP, run, &[])?;
            crate::plot::step("lan", &format!("MTU {mtu}, {n} stream(s): netredir"));
            let ours = measure(
                &r.tb,
                &r.tb.vm,
                &format!("iperf-n{tag}"),
                &vip,
                run,
                &netredir,
            )?;
            crate::plot::step("lan", &format!("MTU {mtu}, {n} stream(s): slirp4netns"));
            let slirp = measure(
                &r.tb,
                &slirp_ns,
                &format!("iperf-s{tag}"),
                LAN_IP,
                run,
                &slirp_proc,
            )?;
            crate::plot::step("lan", &format!("MTU {mtu}, {n} stream(s): pasta"));
            let pst = measure(
                &r.tb,
                &pasta_ns,
                &format!("iperf-p{tag}"),
                LAN_IP,
                run,
                &pasta_proc,
            )?;
            let (peer, best) = if slirp.gbit >= pst.gbit {
                ("slirp4netns", slirp.gbit)
            } else {
                ("pasta", pst.gbit)
            };
            writeln!(
                report,
                "| {mtu} | {n} | {} | {} | {} | {} | {:.2} | {:.2} |",
                kernel.cell(),
                ours.cell(),
                slirp.cell(),
                pst.cell(),
                ours.gbit / kernel.gbit,
                ours.gbit / best
            )?;
            if ours.gbit < best * 0.95 {
                behind.push(format!(
                    "MTU {mtu}, {n} stream(s): netredir {:.2} Gbit/s, {peer} {best:.2} Gbit/s",
                    ours.gbit
                ));
            }
            let group = format!("MTU {mtu}, {n} stream{}", if n == 1 { "" } else { "s" });
            split.push(format!(
                "{group}: {}",
                ours.procs_per_gb
                    .iter()
                    .map(|(_, c)| format!("{c:.1}"))
                    .collect::<Vec<_>>()
                    .join(" + ")
            ));
            groups.push(group);
            for (i, x) in [&kernel, &ours, &slirp, &pst].into_iter().enumerate() {
                series[i].1.push(x.gbit);
            }
        }
        wait_until("flows to drain", Duration::from_secs(10), || {
            r.status().is_ok_and(|s| s.flows == 0)
        })
        .ok();
        // Last in the MTU's loop: it detaches the VM, which nothing after needs.
        pass.push((mtu, pass_through(&r, mtu, secs)?));
    }
    writeln!(
        report,
        "\nnetredir's process CPU seconds per GB, netredird + agent: {}.",
        split.join("; ")
    )?;
    writeln!(
        report,
        "\nThe kernel path is the VM's own NIC routed by host and client straight to the LAN \
         (netredir's classifier sits on that NIC and passes those frames). slirp4netns and pasta \
         each give an equivalent namespace its network from the host namespace. The MTU is the \
         VM's NIC's (the peers' tap); the links beyond stay at 1500. netredir's binaries run in \
         the profile this benchmark was built in (`scripts/bench` uses release). † the first \
         run moved next to nothing (stalled) and this is the second; \"stalled twice\" is a path \
         that stalled both times, left out of the ratios.\n"
    )?;
    writeln!(
        report,
        "Pass-through: the VM's other traffic through the same NIC (the kernel path, 1 stream, \
         {secs} s) with netredir attached to the VM and after `netredirctl vm detach`, \
         alternated attached, detached, attached, detached; Gbit/s attached / detached per pair, \
         and the mean of the pairs' ratios (target ≥ 0.98):\n"
    )?;
    for (mtu, pairs) in &pass {
        let ratios: Vec<f64> = pairs.iter().map(|(a, d)| a / d).collect();
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        let shown: Vec<String> = pairs
            .iter()
            .zip(&ratios)
            .map(|((a, d), q)| format!("{a:.2} / {d:.2} ({q:.3})"))
            .collect();
        writeln!(
            report,
            "- MTU {mtu}: {}; mean ratio {mean:.3}",
            shown.join(", ")
        )?;
    }
    writeln!(report)?;
    plot::bars(
        &o.out.join("lan.png"),
        &plot::Bars {
            title: "LAN throughput, guest to LAN server (iperf3)".into(),
            y_label: "Gbit/s".into(),
            groups,
            series,
        },
    )?;
    writeln!(report, "![LAN throughput per path](lan.png)\n")?;
    write_behind(
        report,
        &behind,
        "netredir was ahead of both peers everywhere.",
    )
}

/// The kernel path (1 stream) with netredir attached to the VM's NIC, then
/// detached, twice (attached, detached, attached, detached, so a drift of
/// the machine shows in the pairs): the (attached, detached) Gbit/s pairs.
/// Leaves the VM detached.
fn pass_through(r: &Redir, mtu: u32, secs: u32) -> Result<Vec<(f64, f64)>> {
    let vm = HOST_VM_IFACE;
    let ctl = |args: &[&str]| -> Result<()> {
        let (ok, _, err) = netredir_benches::netredirctl(&r.control, args);
        if !ok {
            bail!("netredirctl {}: {}", args.join(" "), err.trim());
        }
        Ok(())
    };
    let mut pairs = Vec::new();
    for round in 0..2 {
        if round > 0 {
            ctl(&["vm", "attach", vm, "--iface", vm])?;
            // As in the table: the agent back online (it redials by itself).
            wait_until("the agent to reconnect", Duration::from_secs(30), || {
                r.map()
                    .is_ok_and(|m| m.iter().any(|e| e.name == "iperf" && e.state == "online"))
            })
            .unwrap_or_else(|e| eprintln!("pass-through, MTU {mtu}: {e:#}; measured without it"));
        }
        let run = (1, secs);
        crate::plot::step("lan", &format!("MTU {mtu}: pass-through, attached"));
        let a = measure(
            &r.tb,
            &r.tb.vm,
            &format!("iperf-a{mtu}-{round}"),
            LAN_IP,
            run,
            &[],
        )?;
        ctl(&["vm", "detach", vm])?;
        crate::plot::step("lan", &format!("MTU {mtu}: pass-through, detached"));
        let d = measure(
            &r.tb,
            &r.tb.vm,
            &format!("iperf-d{mtu}-{round}"),
            LAN_IP,
            run,
            &[],
        )?;
        pairs.push((a.gbit, d.gbit));
    }
    Ok(pairs)
}

/// The report's plain list of where netredir is behind a peer, or `ahead`.
pub(crate) fn write_behind(report: &mut String, behind: &[String], ahead: &str) -> Result<()> {
    if behind.is_empty() {
        writeln!(report, "{ahead}\n")?;
    } else {
        writeln!(report, "Where netredir is behind a peer (more than 5%):\n")?;
        for b in behind {
            writeln!(report, "- {b}")?;
        }
        writeln!(report)?;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Round trips of `size` bytes on one connection; sorted durations.
fn round_trips(
    addr: std::net::SocketAddr,
    size: usize,
    n: usize,
) -> std::io::Result<Vec<Duration>> {
    use std::io::{Read, Write};
    let mut s = netredir_benches::connect(addr)?;
    s.set_nodelay(true)?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

/// Connect, send one byte, get it back: the set-up a client sees.
fn setups(addr: std::net::SocketAddr, n: usize) -> std::io::Result<Vec<Duration>> {
    use std::io::{Read, Write};
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let mut s = netredir_benches::connect(addr)?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

/// The busy-poll budget of the latency table's busy-poll column: about a
/// netredir round trip, so neither daemon sleeps between a request and its
/// reply.
const BUSY_POLL_US: u32 = 200;

fn latency(o: &Opts, report: &mut String) -> Result<()> {
    plot::stage("latency", 4);
    crate::plot::step("latency", "building the testbed");
    let r = Redir::new("bench-latency")?;
    r.echo("echo", 7007)?;
    r.start_agent("agent", &[&format!("echo={LAN_IP}:7007")])?;
    kernel_routes(&r.tb)?;
    r.tb.host
        .run("ip", &["route", "add", "default", "via", CLIENT_WAN_IP])?;
    let slirp_ns = r.tb.add_netns("slirp")?;
    slirp4netns(&r.tb, &slirp_ns, 1500)?;
    let pasta_ns = r.tb.add_netns("pasta")?;
    pasta(&r.tb, &pasta_ns, 1500)?;
    let vip = r.vip("echo")?;
    // The same with busy polling in both daemons, on a testbed of its own.
    let spin = BUSY_POLL_US.to_string();
    let bp = Redir::with_args("bench-latency-bp", &["--busy-poll-us", &spin])?;
    bp.echo("echo", 7007)?;
    bp.start_agent_with(
        "agent",
        &[&format!("echo={LAN_IP}:7007")],
        &["--busy-poll-us", &spin],
    )?;
    let bp_vip = bp.vip("echo")?;
    let direct: std::net::SocketAddr = format!("{LAN_IP}:7007").parse()?;
    let ours: std::net::SocketAddr = (vip, 7007).into();
    let bp_name = format!("netredir, busy poll {BUSY_POLL_US} µs");
    let paths: [(&str, &Netns, std::net::SocketAddr); 5] = [
        ("kernel", &r.tb.vm, direct),
        ("netredir", &r.tb.vm, ours),
        ("slirp4netns", &slirp_ns, direct),
        ("pasta", &pasta_ns, direct),
        (&bp_name, &bp.tb.vm, (bp_vip, 7007).into()),
    ];
    // Each path's own processes, charged for the 1-byte round trips.
    let procs: [Vec<(&str, u32)>; 5] = [
        Vec::new(),
        vec![
            ("netredird", r.tb.pid("netredird")?),
            ("agent", r.tb.pid("agent")?),
        ],
        vec![("slirp4netns", r.tb.pid("slirp4netns-1500")?)],
        vec![("pasta", r.tb.pid("pasta-1500")?)],
        vec![
            ("netredird", bp.tb.pid("netredird")?),
            ("agent", bp.tb.pid("agent")?),
        ],
    ];
    let mut cpu_row = String::from("| 1 B request/response: process CPU µs per round trip |");
    let mut netredir_split = Vec::new();
    let (n, m) = if o.quick { (200, 30) } else { (5000, 500) };
    writeln!(report, "## Latency (p50 / p99, microseconds)\n")?;
    let mut head = String::from("| measurement |");
    let mut rule = String::from("|---|");
    for (name, _, _) in &paths {
        let _ = write!(head, " {name} |");
        rule.push_str("---|");
    }
    head.push_str(
        " netredir / kernel (p50) | netredir / best peer (p50) | busy poll / best peer (p50) |",
    );
    rule.push_str("---|---|---|");
    writeln!(report, "{head}\n{rule}")?;
    let mut groups = Vec::new();
    let mut series: Vec<(String, Vec<f64>)> = paths
        .iter()
        .map(|(n, _, _)| (n.to_string(), Vec::new()))
        .collect();
    for (i, what) in [
        "1 B request/response",
        "1 KiB request/response",
        "connect to first byte",
    ]
    .into_iter()
    .enumerate()
    {
        crate::plot::step("latency", what);
        let mut row = format!("| {what} |");
        let mut p50 = Vec::new();
        for ((name, ns, addr), procs) in paths.iter().zip(&procs) {
            let before = cpu::Sample::now(procs);
            let d = ns
                .enter(|| match i {
                    0 => round_trips(*addr, 1, n),
                    1 => round_trips(*addr, 1024, n),
                    _ => setups(*addr, m),
                })?
                .with_context(|| format!("{what} via {name} to {addr}"))?;
            if i == 0 {
                let (_, per_proc) = before.until(&cpu::Sample::now(procs));
                let us = |c: f64| c * 1e6 / n as f64;
                if per_proc.is_empty() {
                    cpu_row.push_str(" – |");
                } else {
                    let total: f64 = per_proc.iter().map(|(_, c)| us(*c)).sum();
                    let _ = write!(cpu_row, " {total:.1} |");
                }
                if *name == "netredir" {
                    netredir_split = per_proc
                        .iter()
                        .map(|(p, c)| format!("{p} {:.1}", us(*c)))
                        .collect();
                }
            }
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            let _ = write!(
                row,
                " {:.0} / {:.0} |",
                us(percentile(&d, 0.5)),
                us(percentile(&d, 0.99))
            );
            p50.push(us(percentile(&d, 0.5)).max(1.0));
        }
        groups.push(what.to_string());
        for (s, v) in series.iter_mut().zip(&p50) {
            s.1.push(*v);
        }
        let _ = write!(
            row,
            " {:.2} | {:.2} | {:.2} |",
            p50[1] / p50[0],
            p50[1] / p50[2].min(p50[3]),
            p50[4] / p50[2].min(p50[3])
        );
        writeln!(report, "{row}")?;
    }
    writeln!(report, "{cpu_row} | | |")?;
    plot::bars(
        &o.out.join("latency.png"),
        &plot::Bars {
            title: "Latency, p50".into(),
            y_label: "microseconds".into(),
            groups,
            series,
        },
    )?;
    writeln!(report, "\n![Latency p50 per path](latency.png)")?;
    writeln!(
        report,
        "\n{n} round trips per size on one connection; {m} connections for set-up (netredir holds \
         the guest's SYN until the agent has connected the real one, so set-up includes a tunnel \
         round trip; the peers answer the guest's SYN at once). \"Busy poll\": netredird and \
         the agent started with `--busy-poll-us {BUSY_POLL_US}` (each spins that long for its \
         next event before sleeping), on a testbed of their own.\n"
    )?;
    writeln!(
        report,
        "Process CPU per round trip: what the path's own processes used during the 1 B round \
         trips (netredird and the agent for netredir: {}; the slirp4netns or pasta process for \
         the peers), over the round trips; the kernel path has no process of its own. The LAN's \
         echo server and the client are left out.\n",
        netredir_split.join(", ")
    )?;
    Ok(())
}
