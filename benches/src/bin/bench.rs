//! netredir-bench: system benchmarks, each next to its reference in the
//! same run, because these machines are noisy.
//!
//! `lan`: TCP throughput guest → LAN server (iperf3), 1 and 8 streams,
//! through netredir and through the kernel routing the same namespaces
//! (the limit; it crosses the VM's NIC with `steer` attached, so it also
//! shows what the XDP program costs traffic it passes). Reports Gbit/s,
//! the ratio to the kernel path, and netredir's CPU seconds per GB.
//!
//! `latency`: small request/response round trips (1 byte and 1 KiB) on
//! one connection, and connection set-up (connect to first echoed byte),
//! p50 and p99, through netredir and through the kernel path.
//!
//! Writes a Markdown report (`--out DIR`, default `results/`). `--quick`
//! runs short measurements (CI's smoke run; no thresholds are asserted).

use anyhow::{Context, Result, bail};
use netredir_benches::Redir;
use netredir_benches::testbed::{
    CLIENT_LAN_IP, CLIENT_WAN_IP, HOST_WAN_IP, LAN_IP, Testbed, wait_until,
};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str =
    "usage: netredir-bench [--quick] [--out DIR] [--only lan|latency]   (run as root; see README)";
const BENCHES: [&str; 2] = ["lan", "latency"];

struct Opts {
    quick: bool,
    out: PathBuf,
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
                    "{USAGE}\n\nBenchmarks: lan (TCP throughput), latency (round trips and set-up),\neach through netredir next to the kernel path."
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
    let want = |b: &str| o.only.as_deref().is_none_or(|x| x == b);
    if want("lan") {
        lan(o, &mut report)?;
    }
    if want("latency") {
        latency(o, &mut report)?;
    }
    std::fs::create_dir_all(&o.out)?;
    let path = o.out.join("REPORT.md");
    std::fs::write(&path, &report)?;
    println!("{report}");
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Lets the kernel route vm ↔ lan directly through host and client.
fn kernel_routes(tb: &Testbed) -> Result<()> {
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

/// One iperf3 run from the VM to `dst`; Gbit/s received.
fn iperf(r: &Redir, name: &str, dst: &str, streams: u32, secs: u32) -> Result<f64> {
    r.tb.spawn(&r.tb.lan, name, "iperf3", &["-s", "-1", "-B", LAN_IP])?;
    r.wait_listening(5201)?;
    let out =
        r.tb.vm
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
            .context("cannot run iperf3 in vm")?;
    r.tb.wait_exit(name, Duration::from_secs(30))?;
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
    Ok(bps / 1e9)
}

fn lan(o: &Opts, report: &mut String) -> Result<()> {
    eprintln!("[lan] building the testbed");
    let r = Redir::new("bench-lan")?;
    r.start_agent("agent", &[&format!("iperf={LAN_IP}:5201")])?;
    kernel_routes(&r.tb)?;
    let vip = r.vip("iperf")?.to_string();
    let secs = if o.quick { 2 } else { 10 };
    let daemon = r.tb.pid("netredird")?;
    let agent = r.tb.pid("agent")?;
    writeln!(
        report,
        "## LAN throughput, guest → LAN server (iperf3, MTU 1500, {secs} s)\n"
    )?;
    writeln!(
        report,
        "| streams | kernel path Gbit/s | netredir Gbit/s | netredir / kernel | netredir CPU s per GB |"
    )?;
    writeln!(report, "|---|---|---|---|---|")?;
    let mut run = 0;
    for streams in [1u32, 8] {
        run += 1;
        eprintln!("[lan] {streams} stream(s): kernel path");
        let kernel = iperf(&r, &format!("iperf-k{run}"), LAN_IP, streams, secs)?;
        eprintln!("[lan] {streams} stream(s): netredir");
        let before = cpu_secs(daemon) + cpu_secs(agent);
        let ours = iperf(&r, &format!("iperf-n{run}"), &vip, streams, secs)?;
        let cpu = cpu_secs(daemon) + cpu_secs(agent) - before;
        let gb = ours * f64::from(secs) / 8.0;
        writeln!(
            report,
            "| {streams} | {kernel:.2} | {ours:.2} | {:.2} | {:.2} |",
            ours / kernel,
            if gb > 0.0 { cpu / gb } else { 0.0 }
        )?;
        eprintln!(
            "[lan] {streams} stream(s): kernel {kernel:.2} Gbit/s, netredir {ours:.2} Gbit/s"
        );
    }
    writeln!(
        report,
        "\nThe kernel path crosses the same VM NIC with `steer` attached (it passes those frames), \
         then host and client route to the LAN. netredir's CPU is netredird's plus the agent's, \
         built in the profile this benchmark runs from (`scripts/bench` uses release). Peers (slirp4netns, pasta), MTU 9000, \
         latency, WAN and density are not measured yet.\n"
    )?;
    wait_until("flows to drain", Duration::from_secs(10), || {
        r.status().is_ok_and(|s| s.flows == 0)
    })
    .ok();
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

fn latency(o: &Opts, report: &mut String) -> Result<()> {
    eprintln!("[latency] building the testbed");
    let r = Redir::new("bench-latency")?;
    r.echo("echo", 7007)?;
    r.start_agent("agent", &[&format!("echo={LAN_IP}:7007")])?;
    kernel_routes(&r.tb)?;
    let vip = r.vip("echo")?;
    let kernel: std::net::SocketAddr = format!("{LAN_IP}:7007").parse()?;
    let ours: std::net::SocketAddr = (vip, 7007).into();
    let (n, m) = if o.quick { (200, 30) } else { (5000, 500) };
    writeln!(report, "## Latency (p50 / p99, microseconds)\n")?;
    writeln!(
        report,
        "| measurement | kernel p50 | kernel p99 | netredir p50 | netredir p99 | netredir / kernel (p50) |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    for (i, name) in [
        "1 B request/response",
        "1 KiB request/response",
        "connect to first byte",
    ]
    .into_iter()
    .enumerate()
    {
        let run = |addr| -> Result<Vec<Duration>> {
            r.tb.vm
                .enter(|| match i {
                    0 => round_trips(addr, 1, n),
                    1 => round_trips(addr, 1024, n),
                    _ => setups(addr, m),
                })?
                .with_context(|| format!("{name} to {addr}"))
        };
        eprintln!("[latency] {name}");
        let k = run(kernel)?;
        let v = run(ours)?;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            report,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            us(percentile(&k, 0.5)),
            us(percentile(&k, 0.99)),
            us(percentile(&v, 0.5)),
            us(percentile(&v, 0.99)),
            us(percentile(&v, 0.5)) / us(percentile(&k, 0.5)).max(1.0)
        )?;
    }
    writeln!(
        report,
        "\n{n} round trips per size on one connection; {m} connections for set-up (netredir holds \
         the guest's SYN until the agent has connected the real one, so set-up includes a tunnel \
         round trip).\n"
    )?;
    Ok(())
}
