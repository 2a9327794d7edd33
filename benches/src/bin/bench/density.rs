//! `density`: what many VMs and many flows cost.
//!
//! - Idle sessions: N VMs on one netredird, each with its NIC and its
//!   agent, attached at runtime, paired and connected, then left idle:
//!   resident memory and CPU per VM, attach time.
//! - Busy VMs: N VMs sending at once (iperf3 each): the aggregate and how
//!   evenly one netredird shares it.
//! - Flow set-up rate: connections a second one VM opens through netredir
//!   (connect, one byte each way, close) with the new-flow limit raised.
//! - 10k concurrent flows in one VM: time to open them, and the memory of
//!   netredird and the agent while they are open. The server holding them
//!   is this benchmark itself, in the LAN (`--serve-hold`).

use crate::Opts;
use anyhow::{Context, Result, bail};
use netredir_benches::testbed::{HOST_WAN_IP, LAN_IP, TUNNEL_PORT, Testbed, bin, wait_until};
use netredir_benches::{Redir, connect};
use netredir_shared::control::{AttachSpec, Request, Response, request};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Resident set size of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// CPU seconds (user + system) `pid` has used so far.
fn cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    (t(11) + t(12)) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// N VMs on one testbed and one netredird: a NIC and an agent (its own
/// key) each, attached at runtime, paired and connected.
struct Sessions {
    tb: Testbed,
    daemon: u32,
    agents: Vec<u32>,
    /// netredird's resident memory before the first VM.
    rss0: u64,
    /// Mean time of one `vm attach`, seconds.
    attach: f64,
}

impl Sessions {
    fn start(n: usize) -> Result<Self> {
        let tb = Testbed::new("bench-density")?;
        let netredird = bin("netredird")?;
        let agent = bin("netredir-agent")?;
        let dir = tb.dir().to_path_buf();
        let control = dir.join("control.sock");
        let listen = format!("{HOST_WAN_IP}:{TUNNEL_PORT}");
        let c = control.display().to_string();
        let state = dir.join("host").display().to_string();
        let daemon = tb.spawn(
            &tb.host,
            "netredird",
            &netredird,
            &[
                "--config",
                "/dev/null",
                "--listen",
                &listen,
                "--control",
                &c,
                "--state-dir",
                &state,
                "--log",
                "warn",
            ],
        )?;
        let ask = |req: &Request| request(&control, req, Duration::from_secs(20));
        wait_until("netredird to answer", Duration::from_secs(60), || {
            ask(&Request::VmList).is_ok()
        })
        .with_context(|| tb.log_tail("netredird"))?;
        let rss0 = rss(daemon);
        let mut s = Self {
            tb,
            daemon,
            agents: Vec::new(),
            rss0,
            attach: 0.0,
        };
        let mut attaching = Duration::ZERO;
        for i in 0..n {
            let (v, e) = (format!("v{i}"), format!("e{i}"));
            s.tb.host.run(
                "ip",
                &[
                    "link",
                    "add",
                    &v,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &e,
                    "netns",
                    s.tb.vm.name(),
                ],
            )?;
            s.tb.host.run("ip", &["link", "set", &v, "up"])?;
            s.tb.vm.run("ip", &["link", "set", &e, "up"])?;
            let spec = AttachSpec {
                name: format!("vm{i}"),
                iface: v,
                dedicated: false,
                subnet: None,
                prefix6: None,
            };
            let t = Instant::now();
            match ask(&Request::VmAttach(spec))? {
                Response::Attached(_) => {}
                other => bail!("vm attach vm{i}: {other:?}"),
            }
            attaching += t.elapsed();
        }
        s.attach = attaching.as_secs_f64() / n.max(1) as f64;
        for i in 0..n {
            let code = match ask(&Request::Pair {
                vm: Some(format!("vm{i}")),
            })? {
                Response::Pair { code, .. } => code,
                other => bail!("unexpected answer {other:?}"),
            };
            let state = dir.join(format!("a{i}")).display().to_string();
            let export = format!("printer={LAN_IP}:9100");
            let pid = s.tb.spawn(
                &s.tb.client,
                &format!("agent-{i}"),
                &agent,
                &[
                    "--connect",
                    &listen,
                    "--pair",
                    &code,
                    "--state-dir",
                    &state,
                    "--export",
                    &export,
                    "--log",
                    "warn",
                ],
            )?;
            s.agents.push(pid);
        }
        for i in 0..n {
            let vm = Some(format!("vm{i}"));
            wait_until("the agent to connect", Duration::from_secs(120), || {
                matches!(
                    request(&control, &Request::Status { vm: vm.clone() }, Duration::from_secs(5)),
                    Ok(Response::Status(st)) if st.agent_connected
                )
            })
            .with_context(|| s.tb.log_tail(&format!("agent-{i}")))?;
        }
        Ok(s)
    }
}

fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

fn idle_sessions(o: &Opts, report: &mut String) -> Result<()> {
    let sizes: &[usize] = if o.quick { &[4] } else { &[1, 100, 500, 1000] };
    let window = Duration::from_secs(if o.quick { 3 } else { 10 });
    writeln!(report, "### Idle sessions\n")?;
    writeln!(
        report,
        "One netredird for all VMs (attached at runtime) and one agent per VM, paired, connected and idle ({}s window; heartbeats every 5 s). netredird's memory per VM is its growth over its memory with no VM (shared NICs: a TAP device each, no UMEM).\n",
        window.as_secs()
    )?;
    writeln!(
        report,
        "| VMs | netredird RSS MiB (with no VM) | netredird per VM KiB | agent RSS per VM MiB | CPU per VM, % of a core (both daemons) | netredird threads | attach ms per VM | start-up s |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|---|---|")?;
    let mut series: Vec<(String, Vec<f64>)> = vec![
        ("netredird".into(), Vec::new()),
        ("agent".into(), Vec::new()),
    ];
    for &n in sizes {
        crate::plot::step("density", &format!("{n} idle sessions: starting"));
        let t = Instant::now();
        let s = Sessions::start(n)?;
        let startup = t.elapsed().as_secs_f64();
        let all: Vec<u32> = std::iter::once(s.daemon)
            .chain(s.agents.iter().copied())
            .collect();
        let before: f64 = all.iter().map(|&p| cpu(p)).sum();
        std::thread::sleep(window);
        let used: f64 = all.iter().map(|&p| cpu(p)).sum::<f64>() - before;
        let d_rss = rss(s.daemon);
        let a_rss: u64 = s.agents.iter().map(|&p| rss(p)).sum();
        let threads = std::fs::read_dir(format!("/proc/{}/task", s.daemon))
            .map(|d| d.count())
            .unwrap_or(0);
        let nf = n as f64;
        let per_vm = d_rss.saturating_sub(s.rss0) as f64 / nf;
        writeln!(
            report,
            "| {n} | {:.1} ({:.1}) | {:.0} | {:.1} | {:.3} | {threads} | {:.0} | {startup:.1} |",
            mib(d_rss as f64),
            mib(s.rss0 as f64),
            per_vm / 1024.0,
            mib(a_rss as f64) / nf,
            used / window.as_secs_f64() / nf * 100.0,
            s.attach * 1000.0
        )?;
        series[0].1.push(mib(per_vm));
        series[1].1.push(mib(a_rss as f64) / nf);
        drop(s);
    }
    crate::plot::bars(
        &o.out.join("density.png"),
        &crate::plot::Bars {
            title: "Resident memory per idle VM (one netredird for all)".into(),
            y_label: "MiB".into(),
            groups: sizes.iter().map(|n| format!("{n} sessions")).collect(),
            series,
        },
    )?;
    writeln!(report, "\n![Memory per session](density.png)\n")?;
    Ok(())
}

/// Hidden mode: accept connections on `addr` and hold them, answering
/// one byte for one byte, until stdin closes. Prints "ready" when bound.
pub(crate) fn serve_hold(addr: &str) -> Result<()> {
    crate::raise_fd_limit();
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut held = Vec::new();
    std::thread::spawn(|| {
        let mut b = [0u8; 1];
        let _ = std::io::stdin().read(&mut b);
        std::process::exit(0);
    });
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {
            held.push(s);
        }
    }
    Ok(())
}

/// Opens a connection, sends a byte, reads it back.
fn touch(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = connect(addr)?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(s)
}

fn flows(o: &Opts, report: &mut String) -> Result<()> {
    let target: usize = if o.quick { 500 } else { 10_000 };
    crate::plot::step("density", "flows: building the testbed");
    let r = Redir::with_args(
        "bench-flows",
        &[
            "--max-flows",
            "20000",
            "--new-flows-per-sec",
            "100000",
            "--flow-buffer-kib",
            "16",
            "--max-buffer-mib",
            "4096",
        ],
    )?;
    // The holding server, a process of its own in the LAN.
    let me = std::env::current_exe()?;
    let hold_addr = format!("{LAN_IP}:7100");
    let mut server =
        r.tb.lan
            .command(&me)
            .args(["--serve-hold", &hold_addr])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot start the holding server")?;
    let mut line = [0u8; 6];
    server
        .stdout
        .as_mut()
        .context("no stdout")?
        .read_exact(&mut line)?;
    r.echo("echo", 7007)?;
    r.start_agent(
        "agent",
        &[
            &format!("hold={LAN_IP}:7100"),
            &format!("echo={LAN_IP}:7007"),
        ],
    )?;
    let hold: SocketAddr = (r.vip("hold")?, 7100).into();
    let echo: SocketAddr = (r.vip("echo")?, 7007).into();
    let daemon = r.tb.pid("netredird")?;
    let agent = r.tb.pid("agent")?;

    // Set-up rate: 8 connectors, connect / byte each way / close.
    let secs = if o.quick { 2.0 } else { 5.0 };
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    r.tb.vm.enter(|| {
        std::thread::scope(|sc| {
            let stop = Instant::now() + Duration::from_secs_f64(secs);
            for _ in 0..8 {
                let (done, failed) = (&done, &failed);
                sc.spawn(move || {
                    while Instant::now() < stop {
                        match touch(echo) {
                            Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                });
            }
        })
    })?;
    let rate = done.load(Ordering::Relaxed) as f64 / secs;
    crate::plot::step("density", &format!("set-up rate {rate:.0}/s"));

    // Many concurrent flows, opened by 32 connectors.
    let base = (rss(daemon), rss(agent));
    let t = Instant::now();
    let open_fail = AtomicU64::new(0);
    let held: Vec<TcpStream> = r.tb.vm.enter(|| {
        crate::raise_fd_limit();
        let per = target.div_ceil(32);
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..32)
                .map(|_| {
                    let open_fail = &open_fail;
                    sc.spawn(move || {
                        let mut v = Vec::with_capacity(per);
                        for _ in 0..per {
                            match touch(hold) {
                                Ok(s) => v.push(s),
                                Err(_) => {
                                    open_fail.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        v
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    })?;
    let open_secs = t.elapsed().as_secs_f64();
    let open = held.len();
    let flows_now = r.status()?.flows;
    let with = (rss(daemon), rss(agent));
    crate::plot::step("density", &format!("{open} flows open in {open_secs:.1}s"));
    writeln!(report, "### Flows in one VM\n")?;
    writeln!(
        report,
        "| measurement | value |\n|---|---|\n\
         | flow set-up rate (connect, 1 byte each way, close; 8 connectors) | {rate:.0} /s ({} failed) |\n\
         | concurrent flows opened (32 connectors) | {open} of {target} in {open_secs:.1} s ({} failed), {flows_now} in netredird's table |\n\
         | netredird RSS idle → with them | {:.1} → {:.1} MiB ({:.1} KiB per flow) |\n\
         | agent RSS idle → with them | {:.1} → {:.1} MiB ({:.1} KiB per flow) |\n",
        failed.load(Ordering::Relaxed),
        open_fail.load(Ordering::Relaxed),
        mib(base.0 as f64),
        mib(with.0 as f64),
        (with.0.saturating_sub(base.0)) as f64 / 1024.0 / open.max(1) as f64,
        mib(base.1 as f64),
        mib(with.1 as f64),
        (with.1.saturating_sub(base.1)) as f64 / 1024.0 / open.max(1) as f64,
    )?;
    writeln!(
        report,
        "netredird runs here with `--flow-buffer-kib 16 --max-buffer-mib 4096 --max-flows 20000 \
         --new-flows-per-sec 100000` (the defaults, 256 KiB and 96 MiB, hold 128 busy flows; 200 new flows a second).\n"
    )?;
    drop(held);
    drop(server.stdin.take());
    let _ = server.wait();
    Ok(())
}

/// Payload bytes each VM has sent so far (netredird's `vm list`), by name.
fn vm_bytes(r: &Redir) -> Result<HashMap<String, u64>> {
    match request(&r.control, &Request::VmList, Duration::from_secs(5))? {
        Response::Vms { vms } => Ok(vms
            .into_iter()
            .map(|v| (v.name, v.bytes_from_guest))
            .collect()),
        other => bail!("vm list: {other:?}"),
    }
}

/// N VMs on one netredird sending at once (iperf3, one stream each, to a
/// server of their own in the LAN): the aggregate, and how evenly it is
/// shared, measured by netredird's own byte counts over one window in
/// which every VM is sending (staggered iperf3 starts do not skew it);
/// and where the machine's CPU went in that window.
fn busy_vms(o: &Opts, report: &mut String) -> Result<()> {
    let sizes: &[usize] = if o.quick { &[2] } else { &[1, 10, 50] };
    let window = Duration::from_secs(if o.quick { 2 } else { 5 });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    writeln!(report, "### Busy VMs\n")?;
    writeln!(
        report,
        "N VMs on one netredird ({cores} workers, the default: one per core), each sending to its own iperf3 server in the LAN at once (one stream, MTU 1500), each through its own agent and tunnel. Rates are netredird's byte counts over one {window:?} window that opens 2 s after every VM is sending. CPU: cores busy in that window, of {cores}, by netredird, by the N agents, and by the rest (iperf3 clients and servers, the kernel's network processing).\n"
    )?;
    writeln!(
        report,
        "| VMs | aggregate Gbit/s | per VM min / mean / max Gbit/s | min / mean | CPU netredird / agents / rest | frames dropped at the TAP queues |"
    )?;
    writeln!(report, "|---|---|---|---|---|---|")?;
    for &n in sizes {
        crate::plot::step("density", &format!("{n} busy VMs"));
        let r = Redir::without_vm("bench-busy", &[])?;
        let mut runs = Vec::new();
        let mut agents = Vec::new();
        for k in 0..n {
            let name = format!("busy{k}");
            let ns = attach_vm(&r, k as u8 + 2, &name)?;
            let port = 5301 + k as u16;
            let p = port.to_string();
            r.tb.spawn(
                &r.tb.lan,
                &format!("iperf-{k}"),
                "iperf3",
                &["-s", "-1", "-B", LAN_IP, "-p", &p],
            )?;
            r.wait_listening(port)?;
            let state = r.tb.dir().join(format!("agent-{k}"));
            let export = format!("iperf={LAN_IP}:{port}");
            let tag = format!("agent-{k}");
            r.start_agent_for(Some(&name), &state, &tag, &[&export], &[])?;
            agents.push(r.tb.pid(&tag)?);
            let vip = r.vip_for(&name, "iperf")?;
            runs.push((ns, vip, p));
        }
        // Long enough for every client to start and the window to pass.
        let secs = window.as_secs() + 20;
        let handles: Vec<_> = runs
            .into_iter()
            .map(|(ns, vip, p)| {
                std::thread::spawn(move || -> Result<()> {
                    let out = ns
                        .command("iperf3")
                        .args(["-c", &vip.to_string(), "-p", &p, "-t", &secs.to_string()])
                        .output()
                        .context("cannot run iperf3")?;
                    if !out.status.success() {
                        bail!("iperf3: {}", String::from_utf8_lossy(&out.stderr));
                    }
                    Ok(())
                })
            })
            .collect();
        // The window opens once every VM is sending.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut before = vm_bytes(&r)?;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = vm_bytes(&r)?;
            let all = now.len() == n
                && now
                    .iter()
                    .all(|(k, v)| *v > before.get(k).copied().unwrap_or(0));
            before = now;
            if all {
                break;
            }
            if Instant::now() > deadline {
                bail!("not every VM was sending 15 s after the clients started");
            }
        }
        // The last to start leave TCP's slow start first.
        std::thread::sleep(Duration::from_secs(2));
        let before = vm_bytes(&r)?;
        let daemon = r.tb.pid("netredird")?;
        let cpu0 = (
            cpu(daemon),
            agents.iter().map(|p| cpu(*p)).sum::<f64>(),
            crate::cpu::machine(),
        );
        let t0 = Instant::now();
        std::thread::sleep(window);
        let after = vm_bytes(&r)?;
        let dt = t0.elapsed().as_secs_f64();
        let cpu1 = (
            cpu(daemon),
            agents.iter().map(|p| cpu(*p)).sum::<f64>(),
            crate::cpu::machine(),
        );
        // Frames the kernel dropped because a VM's TAP queue toward
        // netredird was full (netredird not reading fast enough).
        let dry: u64 =
            r.tb.host
                .run(
                    "sh",
                    &["-c", "cat /sys/class/net/nr*t/statistics/tx_dropped"],
                )
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter_map(|l| l.trim().parse::<u64>().ok())
                        .sum()
                })
                .unwrap_or(0);
        let rates: Vec<f64> = after
            .iter()
            .map(|(k, v)| (v - before.get(k).copied().unwrap_or(0)) as f64 * 8.0 / dt / 1e9)
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??;
        }
        let sum: f64 = rates.iter().sum();
        let mean = sum / rates.len() as f64;
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        let (d, a) = ((cpu1.0 - cpu0.0) / dt, (cpu1.1 - cpu0.1) / dt);
        let rest = ((cpu1.2 - cpu0.2) / dt - d - a).max(0.0);
        writeln!(
            report,
            "| {n} | {sum:.2} | {min:.3} / {mean:.3} / {max:.3} | {:.2} | {d:.2} / {a:.2} / {rest:.2} | {dry} |",
            min / mean
        )?;
    }
    writeln!(report)?;
    Ok(())
}

/// Attaches VM `name` on a new NIC of the testbed (number `n`).
fn attach_vm(r: &Redir, n: u8, name: &str) -> Result<netredir_benches::testbed::Netns> {
    let (ns, iface) = r.tb.add_vm(n)?;
    match request(
        &r.control,
        &Request::VmAttach(AttachSpec {
            name: name.into(),
            iface,
            dedicated: false,
            subnet: None,
            prefix6: None,
        }),
        Duration::from_secs(20),
    )? {
        Response::Attached(_) => Ok(ns),
        other => bail!("vm attach {name}: {other:?}"),
    }
}

/// VM `name`'s rate from the guest over `window`, Gbit/s, by netredird's
/// byte count.
fn vm_rate(r: &Redir, name: &str, window: Duration) -> Result<f64> {
    let b0 = vm_bytes(r)?.get(name).copied().unwrap_or(0);
    let t0 = Instant::now();
    std::thread::sleep(window);
    let b1 = vm_bytes(r)?.get(name).copied().unwrap_or(0);
    Ok((b1 - b0) as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9)
}

/// One VM floods (SYNs to an export and UDP at full rate) while another
/// sends: the other's rate next to its rate with the flooder quiet.
fn flood(o: &Opts, report: &mut String) -> Result<()> {
    crate::plot::step("density", "a flooding VM beside a busy one");
    let window = Duration::from_secs(if o.quick { 2 } else { 5 });
    let r = Redir::without_vm("bench-flood", &[])?;
    let ns_a = attach_vm(&r, 2, "flooder")?;
    let ns_b = attach_vm(&r, 3, "sender")?;
    r.echo("echo-a", 7007)?;
    r.tb.spawn(
        &r.tb.lan,
        "iperf-b",
        "iperf3",
        &["-s", "-1", "-B", LAN_IP, "-p", "5301"],
    )?;
    r.wait_listening(5301)?;
    for (vm, export) in [
        ("flooder", format!("echo={LAN_IP}:7007")),
        ("sender", format!("iperf={LAN_IP}:5301")),
    ] {
        let state = r.tb.dir().join(format!("agent-{vm}"));
        r.start_agent_for(Some(vm), &state, &format!("agent-{vm}"), &[&export], &[])?;
    }
    let vip_a = r.vip_for("flooder", "echo")?;
    let vip_b = r.vip_for("sender", "iperf")?;
    let secs = (2 * window.as_secs() + 20).to_string();
    let client = std::thread::spawn(move || -> Result<()> {
        let out = ns_b
            .command("iperf3")
            .args(["-c", &vip_b.to_string(), "-p", "5301", "-t", &secs])
            .output()
            .context("cannot run iperf3")?;
        if !out.status.success() {
            bail!("iperf3: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    });
    wait_until("the sender to send", Duration::from_secs(15), || {
        vm_bytes(&r).is_ok_and(|b| b.get("sender").copied().unwrap_or(0) > 0)
    })?;
    let alone = vm_rate(&r, "sender", window)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u64> {
            ns_a.enter(|| -> Result<u64> {
                let raw = netredir_benches::RawIp::new()?;
                let udp = std::net::UdpSocket::bind("0.0.0.0:0")?;
                let (mut sent, mut i) = (0u64, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_add(1);
                    let syn = netredir_benches::raw_syn((i % 50_000) as u16 + 10_000, vip_a, 7007);
                    sent += u64::from(raw.send(&syn, vip_a));
                    let port = 5000 + (i % 100) as u16;
                    sent += u64::from(udp.send_to(&[0u8; 512], (vip_a, port)).is_ok());
                }
                Ok(sent)
            })?
        })
    };
    let t0 = Instant::now();
    // The flood's first second (the flooder's limits filling) is not counted.
    std::thread::sleep(Duration::from_secs(1));
    let flooded = vm_rate(&r, "sender", window)?;
    stop.store(true, Ordering::Relaxed);
    let sent = flooder
        .join()
        .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    let pps = sent as f64 / t0.elapsed().as_secs_f64();
    client
        .join()
        .map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??;
    writeln!(report, "### One VM flooding beside a busy one\n")?;
    writeln!(
        report,
        "VM `flooder` sends SYNs to an export and UDP datagrams as fast as one thread can ({pps:.0} packets/s here) while VM `sender` sends to an iperf3 server through its own agent; `sender`'s rate by netredird's byte count over {window:?}, with `flooder` quiet and flooding.\n"
    )?;
    writeln!(
        report,
        "| sender alone Gbit/s | sender beside the flood Gbit/s | ratio |"
    )?;
    writeln!(report, "|---|---|---|")?;
    writeln!(
        report,
        "| {alone:.2} | {flooded:.2} | {:.2} |\n",
        flooded / alone
    )?;
    Ok(())
}

/// Only the busy VMs (`--only busy`).
pub(crate) fn busy(o: &Opts, report: &mut String) -> Result<()> {
    crate::plot::stage("density", if o.quick { 2 } else { 4 });
    writeln!(report, "## Density\n")?;
    busy_vms(o, report)?;
    flood(o, report)
}

pub(crate) fn run(o: &Opts, report: &mut String) -> Result<()> {
    let sizes = if o.quick { 1 } else { 4 };
    crate::plot::stage("density", 2 * sizes + 4);
    writeln!(report, "## Density\n")?;
    idle_sessions(o, report)?;
    busy_vms(o, report)?;
    flood(o, report)?;
    flows(o, report)?;
    Ok(())
}
