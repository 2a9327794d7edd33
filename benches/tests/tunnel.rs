//! The tunnel in namespaces: pairing and refusals, compression on the
//! wire, survival of killed connections, and isolation of a stalled flow.
//! Needs root, iproute2 (ss) and socat, which CI has.

use netredir_benches::testbed::{CLIENT_WAN_IP, HOST_WAN_IP, LAN_IP, TUNNEL_PORT, bin, wait_until};
use netredir_benches::{Redir, connect, random_bytes, sha256_hex, text_job};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn echo_once(r: &Redir, port: u16, msg: &[u8]) -> Vec<u8> {
    let vip = r.vip("echo").unwrap();
    r.tb.vm
        .enter(|| {
            let mut s = connect((vip, port).into())?;
            s.write_all(msg)?;
            let mut b = vec![0u8; msg.len()];
            s.read_exact(&mut b)?;
            std::io::Result::Ok(b)
        })
        .unwrap()
        .unwrap()
}

/// Sends `job` from the VM to a fresh one-job printer; returns the TLS
/// bytes the host sent meanwhile, after checking the printer got the job.
fn print_and_measure(r: &Redir, name: &str, job: &[u8]) -> u64 {
    let received = r.tb.dir().join(format!("{name}.prn"));
    r.printer_once(name, 9100, &received).unwrap();
    let vip = r.vip("printer").unwrap();
    let before = r.stats_tunnel_out();
    r.tb.vm
        .enter(|| {
            let mut s = connect((vip, 9100).into())?;
            s.write_all(job)?;
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)
        })
        .unwrap()
        .unwrap();
    assert!(r.tb.wait_exit(name, TIMEOUT).unwrap().success());
    let got = std::fs::read(&received).unwrap();
    assert!(
        sha256_hex(&got) == sha256_hex(job),
        "{name}: the printer got other bytes"
    );
    r.stats_tunnel_out() - before
}

trait StatsExt {
    fn stats_tunnel_out(&self) -> u64;
    fn reconnects(&self) -> u64;
}

impl StatsExt for Redir {
    fn stats_tunnel_out(&self) -> u64 {
        self.stats()
            .unwrap()
            .session
            .map_or(0, |s| s.tunnel_bytes_out)
    }
    fn reconnects(&self) -> u64 {
        self.stats().unwrap().session.map_or(0, |s| s.reconnects)
    }
}

#[test]
fn pairing_once_then_reconnecting_without_a_code() {
    let r = Redir::new("pairing").unwrap();
    r.echo("lan-echo", 7007).unwrap();
    r.start_agent("agent1", &[&format!("echo={LAN_IP}:7007")])
        .unwrap();
    assert!(r.tb.log_tail("agent1").contains("paired with the host"));
    for f in ["host.key", "host.crt"] {
        assert_eq!(mode(&r.host_state().join(f)), 0o600, "host {f}");
    }
    // One pairing file per VM.
    let vm = r.status().unwrap().iface;
    let pairs = r.host_state().join("pairs").join(format!("{vm}.json"));
    assert_eq!(mode(&pairs), 0o600, "{}", pairs.display());
    for f in ["agent.key", "agent.crt", "host.pin"] {
        assert_eq!(mode(&r.agent_state().join(f)), 0o600, "agent {f}");
    }
    assert_eq!(echo_once(&r, 7007, b"one"), b"one");
    // A second agent on the same state (the same key) is refused at start:
    // the two would take the VM's session from each other.
    let connect = format!("{HOST_WAN_IP}:{TUNNEL_PORT}");
    let state = r.agent_state();
    let second =
        r.tb.client
            .command(bin("netredir-agent").unwrap())
            .args([
                "--connect",
                &connect,
                "--export",
                &format!("echo={LAN_IP}:7007"),
            ])
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(
        err.contains("another netredir-agent runs with --state-dir"),
        "{err}"
    );
    r.tb.signal("agent1", libc::SIGTERM).unwrap();
    r.tb.wait_exit("agent1", TIMEOUT).unwrap();
    // The pin is there now: start_agent passes no --pair.
    r.start_agent("agent2", &[&format!("echo={LAN_IP}:7007")])
        .unwrap();
    assert!(!r.tb.log_tail("agent2").contains("paired with the host"));
    assert_eq!(echo_once(&r, 7007, b"two"), b"two");
}

#[test]
fn an_unpaired_agent_loses_its_session_and_cannot_come_back() {
    let r = Redir::new("unpair").unwrap();
    r.echo("lan-echo", 7007).unwrap();
    r.start_agent("agent", &[&format!("echo={LAN_IP}:7007")])
        .unwrap();
    assert_eq!(echo_once(&r, 7007, b"one"), b"one");
    let ctl = |args: &[&str]| netredir_benches::netredirctl(&r.control, args);
    let vms = || {
        let (ok, json, err) = ctl(&["vm", "list", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<Vec<netredir_shared::control::VmInfo>>(&json).unwrap()
    };
    let before = vms();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].mode, "shared");
    assert!(before[0].agent_connected, "{before:?}");
    let (ok, json, err) = ctl(&["pairs", "list", "--json"]);
    assert!(ok, "{err}");
    let agents: Vec<netredir_shared::pairing::PairedAgent> = serde_json::from_str(&json).unwrap();
    assert_eq!(agents.len(), 1, "{json}");
    let key = &agents[0].fingerprint;
    let (ok, _, err) = ctl(&["unpair", "1234"]);
    assert!(!ok && err.contains("at least 8"), "{err}");
    let (ok, out, err) = ctl(&["unpair", &key[..12]]);
    assert!(ok, "{err}");
    assert!(out.contains("its session ended"), "{out}");
    // The agent is dropped; its next connection is refused, and it says
    // why and stops.
    r.tb.wait_exit("agent", TIMEOUT).unwrap();
    let log = r.tb.log_tail("agent");
    assert!(log.contains("is not paired with any VM here"), "{log}");
    assert!(!r.status().unwrap().agent_connected);
    assert!(!vms()[0].agent_connected);
    let (ok, json, _) = ctl(&["pairs", "list", "--json"]);
    assert!(ok && json.trim() == "[]", "{json}");
    let (ok, _, err) = ctl(&["unpair", key]);
    assert!(!ok && err.contains("no agent paired"), "{err}");
}

/// `GET path` against the metrics endpoint in the host namespace: status
/// line and body.
fn scrape(r: &Redir, path: &str) -> (String, String) {
    r.tb.host
        .enter(|| -> std::io::Result<(String, String)> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", 9901))?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut all = String::new();
            s.read_to_string(&mut all)?;
            let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
            Ok((
                head.lines().next().unwrap_or("").to_owned(),
                body.to_owned(),
            ))
        })
        .unwrap()
        .unwrap()
}

/// The value of the series `series` (name and labels as rendered).
fn metric(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_flows_and_bytes_per_vm_and_resource() {
    let r = Redir::with_args("metrics", &["--metrics", "127.0.0.1:9901"]).unwrap();
    let vm = r.status().unwrap().iface;
    let (status, body) = scrape(&r, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        metric(
            &body,
            &format!("netredir_vm_agent_connected{{vm=\"{vm}\"}}")
        ),
        Some(0),
        "{body}"
    );
    r.start_agent("agent", &[&format!("printer={LAN_IP}:9100")])
        .unwrap();
    let job = text_job(300_000, 3);
    print_and_measure(&r, "p1", &job);
    print_and_measure(&r, "p2", &job);
    let (_, body) = scrape(&r, "/metrics");
    let res = format!("vm=\"{vm}\",resource=\"printer\"");
    assert_eq!(
        metric(
            &body,
            &format!("netredir_vm_agent_connected{{vm=\"{vm}\"}}")
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &body,
            &format!("netredir_resource_flows_opened_total{{{res}}}")
        ),
        Some(2),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            &format!("netredir_resource_bytes_total{{{res},direction=\"to_resource\"}}")
        ),
        Some(2 * job.len() as u64)
    );
    assert_eq!(
        metric(&body, &format!("netredir_resource_online{{{res}}}")),
        Some(1)
    );
    assert!(
        metric(
            &body,
            &format!("netredir_vm_data_bytes_total{{vm=\"{vm}\",direction=\"out\"}}")
        ) >= Some(2 * job.len() as u64)
    );
    assert!(metric(&body, "netredir_process_resident_bytes").is_some_and(|b| b > 1 << 20));
    let (status, _) = scrape(&r, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn unpaired_agents_bad_codes_and_garbage_are_refused() {
    let r = Redir::new("refusals").unwrap();
    r.echo("lan-echo", 7007).unwrap();
    r.start_agent("good", &[&format!("echo={LAN_IP}:7007")])
        .unwrap();
    let agent = bin("netredir-agent").unwrap();
    let connect_to = format!("{HOST_WAN_IP}:{TUNNEL_PORT}");
    let export = format!("x={LAN_IP}:7007");
    let run_agent = |state: &Path, extra: &[&str]| {
        let st = state.to_string_lossy().into_owned();
        let mut args = vec![
            "--connect",
            &connect_to,
            "--state-dir",
            &st,
            "--export",
            &export,
        ];
        args.extend_from_slice(extra);
        let out = r.tb.client.command(&agent).args(&args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Never paired: it says so and does not even dial.
    let fresh = r.tb.dir().join("fresh");
    let (code, err) = run_agent(&fresh, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not paired with a host yet"), "{err}");

    // Knows the host (a copied pin) but its own key was never paired.
    let intruder = r.tb.dir().join("intruder");
    std::fs::create_dir_all(&intruder).unwrap();
    std::fs::copy(r.agent_state().join("host.pin"), intruder.join("host.pin")).unwrap();
    let (code, err) = run_agent(&intruder, &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("refused this agent") && err.contains("not paired"),
        "{err}"
    );

    // A code with the right host but a wrong secret.
    let good = r.pair_code().unwrap();
    let mut bad: Vec<char> = good.chars().collect();
    let i = bad.len() - 6;
    bad[i] = if bad[i] == 'A' { 'B' } else { 'A' };
    let bad: String = bad.into_iter().collect();
    let (code, err) = run_agent(&r.tb.dir().join("guesser"), &["--pair", &bad]);
    assert_eq!(code, Some(1));
    assert!(err.contains("pairing code is wrong"), "{err}");

    // Not TLS at all.
    let reply =
        r.tb.client
            .enter(|| {
                let mut s = connect(connect_to.parse().unwrap())?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
                let mut b = Vec::new();
                match s.read_to_end(&mut b) {
                    Ok(_) => Ok(b),
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(b),
                    Err(e) => Err(e),
                }
            })
            .unwrap()
            .unwrap();
    assert!(
        !String::from_utf8_lossy(&reply).contains("echo"),
        "learns nothing"
    );

    assert!(r.counter("daemon.tunnel_refused_unpaired").unwrap() >= 1);
    assert!(r.counter("daemon.tunnel_refused_bad_code").unwrap() >= 1);
    assert!(r.counter("daemon.tunnel_refused_not_tls").unwrap() >= 1);
    assert!(r.tb.running("netredird"));
    assert_eq!(
        echo_once(&r, 7007, b"still here"),
        b"still here",
        "the paired agent is unharmed"
    );
    let _ = CLIENT_WAN_IP;
}

#[test]
fn compressible_jobs_shrink_on_the_wire_and_random_ones_do_not_grow() {
    let r = Redir::new("compress").unwrap();
    // The printer must be exported before the agent starts; a one-job
    // printer is started per job below, so export a port that is reused.
    r.start_agent("agent", &[&format!("printer={LAN_IP}:9100")])
        .unwrap();
    let len = 64 << 20;
    let text = text_job(len, 3);
    let wire = print_and_measure(&r, "printer-text", &text);
    assert!(
        wire * 4 <= len as u64,
        "text job: {wire} bytes on the wire for {len}"
    );
    let random = random_bytes(len, 99);
    let wire = print_and_measure(&r, "printer-random", &random);
    assert!(
        wire <= len as u64 + len as u64 / 100,
        "random job: {wire} bytes on the wire for {len}"
    );
}

#[test]
fn the_tunnel_killed_three_times_mid_job_loses_nothing() {
    let r = Redir::new("killed").unwrap();
    let received = r.tb.dir().join("received.prn");
    r.printer_once("printer", 9100, &received).unwrap();
    r.start_agent("agent", &[&format!("printer={LAN_IP}:9100")])
        .unwrap();
    let vip = r.vip("printer").unwrap();
    let job = random_bytes(64 << 20, 5);
    let quarter = job.len() / 4;
    let s =
        r.tb.vm
            .enter(|| connect((vip, 9100).into()))
            .unwrap()
            .unwrap();
    let (to_test, from_writer) = std::sync::mpsc::channel::<usize>();
    let (to_writer, go) = std::sync::mpsc::channel::<()>();
    let mut w = s.try_clone().unwrap();
    let data = job.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for k in 0..4 {
            w.write_all(&data[k * quarter..(k + 1) * quarter])?;
            to_test.send(k).expect("test");
            if k < 3 {
                go.recv().expect("go");
            }
        }
        w.shutdown(Shutdown::Write)
    });
    for k in 0..3 {
        assert_eq!(from_writer.recv_timeout(TIMEOUT).unwrap(), k);
        // Kill the agent's tunnel socket while the quarter is in flight.
        r.tb.client
            .run(
                "ss",
                &[
                    "-K",
                    "dst",
                    HOST_WAN_IP,
                    "dport",
                    "=",
                    &TUNNEL_PORT.to_string(),
                ],
            )
            .unwrap();
        wait_until("the session to resume", TIMEOUT, || {
            r.reconnects() > k as u64
        })
        .unwrap();
        to_writer.send(()).unwrap();
    }
    assert_eq!(from_writer.recv_timeout(TIMEOUT).unwrap(), 3);
    writer.join().unwrap().unwrap();
    let mut rest = Vec::new();
    let mut s = s;
    s.read_to_end(&mut rest).unwrap();
    assert!(r.tb.wait_exit("printer", TIMEOUT).unwrap().success());
    let got = std::fs::read(&received).unwrap();
    assert_eq!(got.len(), job.len());
    assert!(
        sha256_hex(&got) == sha256_hex(&job),
        "bytes lost, duplicated or reordered"
    );
    let st = r.stats().unwrap().session.unwrap();
    assert!(st.reconnects >= 3, "{st:?}");
}

/// Resident memory the agent may use with one stalled flow and one busy
/// one: per flow its window and buffers, the replay buffer (8 MiB),
/// compression contexts, code and heap.
const DAEMON_RSS_BOUND: u64 = 96 << 20;
/// The same for netredird, which also has per flow two socket buffers and
/// a window (no UMEM: a shared NIC's frames come through a TAP device).
const HOST_RSS_BOUND: u64 = DAEMON_RSS_BOUND + (8 << 20);

#[test]
fn a_stalled_printer_does_not_hold_up_another_flow_and_memory_stays_bounded() {
    let r = Redir::new("stalled").unwrap();
    // A printer that takes the connection and never reads it.
    r.tb.spawn(
        &r.tb.lan,
        "stuck",
        "socat",
        &["-u", "TCP-LISTEN:9101,reuseaddr", "SYSTEM:sleep 3600"],
    )
    .unwrap();
    r.wait_listening(9101).unwrap();
    let received = r.tb.dir().join("received.prn");
    r.printer_once("printer", 9100, &received).unwrap();
    r.start_agent(
        "agent",
        &[
            &format!("stuck={LAN_IP}:9101"),
            &format!("printer={LAN_IP}:9100"),
        ],
    )
    .unwrap();
    let stuck = r.vip("stuck").unwrap();
    let printer = r.vip("printer").unwrap();
    // Fill the stalled flow until the guest can write no more.
    let stalled =
        r.tb.vm
            .enter(|| connect((stuck, 9101).into()))
            .unwrap()
            .unwrap();
    stalled
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut sw = stalled.try_clone().unwrap();
    let junk = random_bytes(1 << 20, 11);
    let mut stuck_bytes = 0usize;
    loop {
        match sw.write(&junk) {
            Ok(n) => stuck_bytes += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("stalled flow: {e}"),
        }
        assert!(stuck_bytes < 64 << 20, "the stalled flow never pushed back");
    }
    // The other flow moves a whole job meanwhile.
    let job = random_bytes(64 << 20, 12);
    r.tb.vm
        .enter(|| {
            let mut s = connect((printer, 9100).into())?;
            s.write_all(&job)?;
            s.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)
        })
        .unwrap()
        .unwrap();
    assert!(r.tb.wait_exit("printer", TIMEOUT).unwrap().success());
    let got = std::fs::read(&received).unwrap();
    assert!(
        sha256_hex(&got) == sha256_hex(&job),
        "the busy flow lost bytes"
    );
    let rss = r.tb.rss("netredird").unwrap();
    assert!(rss < HOST_RSS_BOUND, "netredird uses {} MiB", rss >> 20);
    let agent_rss = r.tb.rss("agent").unwrap();
    assert!(
        agent_rss < DAEMON_RSS_BOUND,
        "netredir-agent uses {} MiB",
        agent_rss >> 20
    );
    // The stalled flow is still there, neither lost nor grown.
    assert!(r.status().unwrap().flows >= 1);
    stalled.shutdown(Shutdown::Both).unwrap();
    eprintln!(
        "stalled flow took {stuck_bytes} bytes; netredird RSS {} KiB, agent {} KiB",
        rss >> 10,
        agent_rss >> 10
    );
}

/// A guest that does not read yet while a server pushes megabytes at it:
/// the agent sends only what the host's window takes, the rest waits on
/// the client side, and once the guest reads everything arrives, with no
/// flow reset (the agent once assumed a larger window than the host gave).
#[test]
fn a_download_to_a_guest_that_reads_late_arrives_whole() {
    let r = Redir::new("download").unwrap();
    let data = random_bytes(4 << 20, 9);
    let file = r.tb.dir().join("download.bin");
    std::fs::write(&file, &data).unwrap();
    let source = format!("OPEN:{}", file.display());
    r.tb.spawn(
        &r.tb.lan,
        "server",
        "socat",
        &["-u", &source, "TCP-LISTEN:9200,reuseaddr"],
    )
    .unwrap();
    r.wait_listening(9200).unwrap();
    r.start_agent("agent", &[&format!("files={LAN_IP}:9200")])
        .unwrap();
    let vip = r.vip("files").unwrap();
    let mut s =
        r.tb.vm
            .enter(|| connect((vip, 9200).into()))
            .unwrap()
            .unwrap();
    // Not reading: the socket toward the guest fills, and more waits.
    wait_until("bytes for the guest to pile up", TIMEOUT, || {
        r.counter("engine.bytes_to_guest").unwrap_or(0) >= 128 * 1024
    })
    .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), data.len(), "length");
    assert_eq!(sha256_hex(&got), sha256_hex(&data), "content");
    assert_eq!(r.counter("engine.flow_errors").unwrap(), 0);
    assert_eq!(r.counter("engine.resets").unwrap(), 0);
}
