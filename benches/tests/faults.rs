//! Faults, measured: print jobs and echo round trips through netredir
//! while the tunnel is cut again and again (its TCP connection killed on
//! the agent's side, a reset sent from the host's side, the WAN link
//! down for 2-20 s, the NAT in front of the agent forgetting its mapping
//! and giving it a new source address and port), then the agent killed
//! outright. Every flow that completes is
//! byte-identical; a flow that cannot complete ends with a reset in the
//! guest, never a clean close; both daemons stay under their memory
//! bounds. Prints the counts.
//!
//! Each fault waits until the tunnel is back and a flow has completed
//! since the last one, so every fault hits a working tunnel with flows in
//! flight. `NETREDIR_FAULTS` sets the number of faults (default 120, for
//! CI, with WAN outages of 2-4 s); with 500 or more, 50 flows of up to
//! 64 MiB run at a time and outages last 2-20 s
//! (`NETREDIR_FAULTS=1000 cargo test --test faults -- --nocapture`).

use netredir_benches::testbed::{HOST_WAN_IP, LAN_IP, TUNNEL_PORT, wait_until};
use netredir_benches::{Redir, connect, job_bytes, sha256_hex};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// What the guests saw.
#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    bytes: AtomicU64,
    /// Flows that ended with an error (reset, timeout).
    errors: AtomicU64,
    /// Flows that completed with wrong bytes, or closed cleanly short:
    /// silent loss. Must stay 0.
    lost: AtomicU64,
}

/// The addresses the client's NAT gives the agent's tunnel, in turn (on
/// the client's side of the WAN link).
const NAT_ADDRS: [&str; 3] = ["10.201.0.2", "10.201.0.3", "10.201.0.4"];

/// The NAT rule that maps the agent's tunnel to `addr` and a port of its
/// choosing.
fn snat(addr: &str) -> Vec<String> {
    let port = TUNNEL_PORT.to_string();
    let to = format!("{addr}:20000-29999");
    [
        "-o",
        "wan0",
        "-p",
        "tcp",
        "--dport",
        &port,
        "-j",
        "SNAT",
        "--to-source",
        &to,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A small xorshift for the fault schedule (deterministic per seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Connects as a guest application does, waiting as long as Linux's
/// connect does (127 s): a connection opened during an outage completes
/// when the tunnel is back.
fn guest_connect(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(120))
}

/// One flow: a job to the digest sink or a round trip through the echo
/// server; Err(text) for an error, and `lost` counted for silent loss.
fn one_flow(sink: Ipv4Addr, echo: Ipv4Addr, i: u64, len: usize, tally: &Tally) {
    let job = job_bytes(len, i + 1);
    let started = std::time::Instant::now();
    let res: std::io::Result<bool> = (|| {
        if i.is_multiple_of(2) {
            let mut s = guest_connect((sink, 9100).into())?;
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            s.set_write_timeout(Some(Duration::from_secs(120)))?;
            s.write_all(&job)?;
            s.shutdown(Shutdown::Write)?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer.split_whitespace().next() == Some(sha256_hex(&job).as_str()))
        } else {
            let mut s = guest_connect((echo, 7007).into())?;
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            s.set_write_timeout(Some(Duration::from_secs(120)))?;
            let mut w = s.try_clone()?;
            let out = job.clone();
            let writer = std::thread::spawn(move || -> std::io::Result<()> {
                w.write_all(&out)?;
                w.shutdown(Shutdown::Write)
            });
            let mut back = Vec::new();
            let read = s.read_to_end(&mut back);
            writer.join().expect("writer")?;
            read?;
            Ok(back == job)
        }
    })();
    match res {
        Ok(true) => {
            tally.completed.fetch_add(1, Ordering::SeqCst);
            tally.bytes.fetch_add(len as u64, Ordering::SeqCst);
        }
        Ok(false) => {
            eprintln!("flow {i}: completed with wrong or missing bytes");
            tally.lost.fetch_add(1, Ordering::SeqCst);
        }
        Err(e) => {
            eprintln!(
                "flow {i} ({len} bytes, {}): {e} after {:?}",
                if i.is_multiple_of(2) { "job" } else { "echo" },
                started.elapsed()
            );
            tally.errors.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
fn flows_through_a_thousand_cuts_lose_nothing() {
    let faults: u64 = std::env::var("NETREDIR_FAULTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let long = faults >= 500;
    let (workers, max_len) = if long { (50, 64 << 20) } else { (20, 4 << 20) };
    let r = Redir::with_args("faults", &["--grace", "60", "--heartbeat", "1"]).unwrap();
    r.digest_sink("sink", 9100).unwrap();
    // An echo server that waits for the echo to drain after the guest's
    // EOF (socat's default is to quit 0.5 s after it, cutting the echo
    // short while the tunnel is down).
    r.tb.spawn(
        &r.tb.lan,
        "echo",
        "socat",
        &[
            "-b",
            netredir_benches::ECHO_BLOCK,
            "-t",
            "120",
            "TCP-LISTEN:7007,reuseaddr,fork,backlog=512",
            "PIPE",
        ],
    )
    .unwrap();
    r.wait_listening(7007).unwrap();
    // A NAT in front of the agent, as on most client networks.
    for a in &NAT_ADDRS[1..] {
        r.tb.client
            .run("ip", &["addr", "add", &format!("{a}/24"), "dev", "wan0"])
            .unwrap();
    }
    let mut rule = vec!["-t", "nat", "-A", "POSTROUTING"];
    let first = snat(NAT_ADDRS[0]);
    rule.extend(first.iter().map(String::as_str));
    r.tb.client.run("iptables", &rule).unwrap();
    let mut nat = 0;
    r.start_agent_with(
        "agent",
        &[
            &format!("sink={LAN_IP}:9100"),
            &format!("echo={LAN_IP}:7007"),
        ],
        &["--heartbeat", "1", "--grace", "60"],
    )
    .unwrap();
    let sink = r.vip("sink").unwrap();
    let echo = r.vip("echo").unwrap();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    // The guests: `workers` flows at a time, each a new one when done.
    let guests = {
        let (tally, stop, seq) = (tally.clone(), stop.clone(), seq.clone());
        let vm = r.tb.vm.name().to_owned();
        std::thread::spawn(move || {
            let path = format!("/run/netns/{vm}");
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    let (tally, stop, seq, path) =
                        (tally.clone(), stop.clone(), seq.clone(), path.clone());
                    std::thread::spawn(move || {
                        let ns = std::fs::File::open(&path).expect("netns");
                        // SAFETY: setns on this thread only, with an fd we hold.
                        let rc = unsafe {
                            libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                        };
                        assert_eq!(rc, 0, "setns");
                        while !stop.load(Ordering::SeqCst) {
                            let i = seq.fetch_add(1, Ordering::SeqCst);
                            let len = 1 + (Rng(i * 7919 + 1).below(max_len as u64)) as usize;
                            one_flow(sink, echo, i, len, &tally);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("guest thread");
            }
        })
    };
    // The faults.
    let mut rng = Rng(0x5eed);
    let mut counts = [0u64; 4];
    let (mut outage_secs, mut longest) = (0u64, 0u64);
    let mut seen = std::collections::BTreeSet::new();
    let (mut rss_host, mut rss_agent) = (0u64, 0u64);
    let kill = format!("dst {HOST_WAN_IP} and dport = :{TUNNEL_PORT}");
    let mut done_before = 0;
    for _ in 0..faults {
        wait_until(
            "the tunnel to be back and a flow to complete",
            Duration::from_secs(60),
            || {
                tally.completed.load(Ordering::SeqCst) > done_before
                    && r.status().is_ok_and(|s| s.agent_connected)
            },
        )
        .unwrap();
        done_before = tally.completed.load(Ordering::SeqCst);
        // Where the tunnel comes from now, as the host sees it.
        if let Some(a) = r.status().ok().and_then(|s| s.agent_addr) {
            seen.insert(
                a.rsplit_once(':')
                    .map_or(a.clone(), |(ip, _)| ip.to_owned()),
            );
        }
        let kind = rng.below(4);
        counts[kind as usize] += 1;
        match kind {
            0 => {
                // The agent's side of the tunnel dies (ss -K: the kernel
                // closes the socket and sends RST).
                let _ = r.tb.client.run("ss", &["-K", &kill]);
            }
            1 => {
                // A reset arrives from the host's side.
                let _ =
                    r.tb.host
                        .run("ss", &["-K", &format!("sport = :{TUNNEL_PORT}")]);
            }
            2 => {
                // The WAN goes down: a silent outage, no RST anywhere.
                // Short ones TCP rides out; from 3 s on the heartbeats
                // (1 s, three missed) notice, and the agent dials again
                // into a dead link until it is back.
                let secs = if long {
                    2 + rng.below(19)
                } else {
                    2 + rng.below(3)
                };
                outage_secs += secs;
                longest = longest.max(secs);
                r.tb.client
                    .run("ip", &["link", "set", "wan0", "down"])
                    .unwrap();
                // The outage lasts its length, and one of 4 s or more
                // until the host's heartbeat has noticed it too (so a
                // long outage is one the host saw, not one it slept
                // through).
                let down = std::time::Instant::now();
                wait_until(
                    "the outage to last its length (and the host to notice a long one)",
                    Duration::from_secs(secs + 30),
                    || {
                        down.elapsed() >= Duration::from_secs(secs)
                            && (secs < 4 || r.status().is_ok_and(|s| !s.agent_connected))
                    },
                )
                .unwrap();
                r.tb.client
                    .run("ip", &["link", "set", "wan0", "up"])
                    .unwrap();
            }
            _ => {
                // NAT rebinding: the client's NAT forgets the mapping (a
                // home router restarting, a mobile link moving) and the
                // tunnel's next segment leaves from a new address and
                // port. The host answers it with RST; the agent dials
                // again, from the new address.
                nat = (nat + 1) % NAT_ADDRS.len();
                let mut rule = vec!["-t", "nat", "-R", "POSTROUTING", "1"];
                let next = snat(NAT_ADDRS[nat]);
                rule.extend(next.iter().map(String::as_str));
                r.tb.client.run("iptables", &rule).unwrap();
                let port = TUNNEL_PORT.to_string();
                // Exits 1 when nothing matched (the tunnel was between
                // connections): still a rebinding for the next one.
                let _ =
                    r.tb.client
                        .run("conntrack", &["-D", "-p", "tcp", "--dport", &port]);
            }
        }
        rss_host = rss_host.max(r.tb.rss("netredird").unwrap_or(0));
        rss_agent = rss_agent.max(r.tb.rss("agent").unwrap_or(0));
    }
    stop.store(true, Ordering::SeqCst);
    guests.join().unwrap();
    let completed = tally.completed.load(Ordering::SeqCst);
    let errors = tally.errors.load(Ordering::SeqCst);
    let lost = tally.lost.load(Ordering::SeqCst);
    let st = r.stats().unwrap().session.unwrap();
    eprintln!(
        "faults: {faults} ({} agent-side kills, {} host-side resets, {} WAN outages of {outage_secs} s in all, longest {longest} s, {} NAT rebindings); \
         flows completed: {completed} ({} MiB), errors: {errors}, silent loss: {lost}; \
         tunnel reconnects: {}; peak RSS netredird {} MiB, agent {} MiB",
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        tally.bytes.load(Ordering::SeqCst) >> 20,
        st.reconnects,
        rss_host >> 20,
        rss_agent >> 20
    );
    if errors + lost > 0 {
        let st = r.status().unwrap();
        let nonzero: Vec<_> = st.counters.iter().filter(|(_, v)| *v > 0).collect();
        eprintln!("counters: {nonzero:?}");
        for name in ["netredird", "agent"] {
            let log =
                std::fs::read_to_string(r.tb.dir().join(format!("{name}.log"))).unwrap_or_default();
            for l in log.lines().filter(|l| {
                ["WARN", "ERROR", "reset", "Reset", "failed", "overran"]
                    .iter()
                    .any(|k| l.contains(k))
            }) {
                eprintln!("{name}: {l}");
            }
        }
    }
    assert_eq!(lost, 0, "no flow may complete with wrong or missing bytes");
    // Every outage is shorter than the grace period: no flow may break.
    assert_eq!(
        errors, 0,
        "{errors} flows failed ({completed} completed) in {faults} faults"
    );
    assert!(completed >= workers as u64, "the flows moved: {completed}");
    assert!(st.reconnects >= faults / 4, "the faults hit: {st:?}");
    // The rebindings moved the tunnel: the host saw it come from each of
    // the NAT's addresses.
    assert_eq!(
        seen.len(),
        NAT_ADDRS.len(),
        "the tunnel came from {seen:?} after {} rebindings",
        counts[3]
    );
    // The stated caps (README, "Memory bounds"), for this many flows:
    // netredird's flow buffers 96 MiB (no UMEM: a TAP device), queue 2 MiB, replay
    // 8 MiB and a compression context pair (1.2 + 0.3 MiB) per busy flow
    // up to 64; the agent's window (1 MiB), receive buffer (256 KiB) and
    // join buffer (64 KiB) per flow, its replay and its contexts; 32 MiB
    // each for code, stacks and heap.
    let contexts = workers.min(64) as u64 * (3 << 19);
    let cap_host = ((96 + 2 + 8 + 32) << 20) + contexts;
    let cap_agent =
        workers as u64 * ((1 << 20) + (256 << 10) + (64 << 10)) + ((8 + 32) << 20) + contexts;
    eprintln!(
        "memory caps for {workers} flows: netredird {} MiB, agent {} MiB",
        cap_host >> 20,
        cap_agent >> 20
    );
    assert!(
        rss_host < cap_host,
        "netredird peaked at {} MiB",
        rss_host >> 20
    );
    assert!(
        rss_agent < cap_agent,
        "the agent peaked at {} MiB",
        rss_agent >> 20
    );

    // The agent killed outright: its flows cannot go on; the guests see a
    // reset once a new agent comes (a new session), never a clean close.
    let held: Vec<_> =
        r.tb.vm
            .enter(|| {
                (0..4)
                    .map(|_| {
                        let mut s = connect((echo, 7007).into()).unwrap();
                        s.write_all(b"hello").unwrap();
                        let mut b = [0u8; 5];
                        s.read_exact(&mut b).unwrap();
                        s
                    })
                    .collect()
            })
            .unwrap();
    r.tb.signal("agent", libc::SIGKILL).unwrap();
    r.start_agent_with(
        "agent2",
        &[
            &format!("sink={LAN_IP}:9100"),
            &format!("echo={LAN_IP}:7007"),
        ],
        &["--heartbeat", "1"],
    )
    .unwrap();
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("a flow of a killed agent must be reset, got {other:?}"),
        }
    }
}
