//! The whole path in network namespaces: a VM namespace reaches servers in
//! a LAN namespace through netredird (XDP + AF_XDP + engine) and
//! netredir-agent. Needs root, iproute2 and socat, which CI has; the
//! binaries come from `cargo build --workspace`.

use netredir_benches::testbed::{
    HOST_VM_IFACE, HOST_VM_IP, HOST_WAN_IP, LAN_IP, TUNNEL_PORT, bin, wait_until,
};
use netredir_benches::{Redir, connect, job_bytes, sha256_hex};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_64_mib_job_arrives_byte_identical() {
    let r = Redir::new("job64").unwrap();
    let received = r.tb.dir().join("received.prn");
    r.printer_once("printer", 9100, &received).unwrap();
    r.start_agent("agent", &[&format!("printer={LAN_IP}:9100")])
        .unwrap();
    let vip = r.vip("printer").unwrap();
    let job = job_bytes(64 << 20, 64);
    // The printer closes after the job: the guest sees a clean EOF.
    r.print_whole((vip, 9100).into(), &job, "printer", &received)
        .unwrap();
    assert!(r.counter("engine.bytes_from_guest").unwrap() >= job.len() as u64);
    // The guest's stack sent large segments (TSO), and they reached the
    // engine whole, not cut to the MTU.
    let (frames, gso) = (
        r.counter("tap.frames_in").unwrap(),
        r.counter("tap.gso_in").unwrap(),
    );
    assert!(
        gso > 0 && frames < job.len() as u64 / 1500,
        "{gso} of {frames} frames were large segments"
    );
}

#[test]
fn busy_polling_daemons_carry_the_same_bytes() {
    let spin = ["--busy-poll-us", "200"];
    let r = Redir::with_args("busypoll", &spin).unwrap();
    r.echo("echo", 7007).unwrap();
    r.start_agent_with("agent", &[&format!("echo={LAN_IP}:7007")], &spin)
        .unwrap();
    let vip = r.vip("echo").unwrap();
    let data = job_bytes(256 * 1024, 5);
    let back =
        r.tb.vm
            .enter(|| -> std::io::Result<Vec<u8>> {
                let mut s = connect((vip, 7007).into())?;
                let mut back = Vec::new();
                // Request/response in small pieces: the case busy polling is for.
                for chunk in data.chunks(512) {
                    s.write_all(chunk)?;
                    let mut got = vec![0u8; chunk.len()];
                    s.read_exact(&mut got)?;
                    back.extend_from_slice(&got);
                }
                Ok(back)
            })
            .unwrap()
            .unwrap();
    assert_eq!(sha256_hex(&back), sha256_hex(&data));
}

#[test]
fn a_hundred_concurrent_connections_through_two_resources() {
    let r = Redir::new("concurrent").unwrap();
    r.digest_sink("sink", 9100).unwrap();
    r.echo("echo", 7007).unwrap();
    r.start_agent(
        "agent",
        &[
            &format!("sink={LAN_IP}:9100"),
            &format!("echo={LAN_IP}:7007"),
        ],
    )
    .unwrap();
    let sink = r.vip("sink").unwrap();
    let echo = r.vip("echo").unwrap();
    assert_ne!(sink, echo);
    let results =
        r.tb.vm
            .enter(|| {
                let handles: Vec<_> = (0..100u64)
                    .map(|i| {
                        std::thread::spawn(move || -> std::io::Result<()> {
                            let data = job_bytes(128 * 1024 + i as usize * 1000, i + 1);
                            if i % 2 == 0 {
                                let mut s = connect((sink, 9100).into())?;
                                s.write_all(&data)?;
                                s.shutdown(Shutdown::Write)?;
                                let mut answer = String::new();
                                s.read_to_string(&mut answer)?;
                                let want = sha256_hex(&data);
                                if answer.split_whitespace().next() != Some(want.as_str()) {
                                    return Err(std::io::Error::other(format!(
                                        "conn {i}: sink saw {answer:?}, sent {want}"
                                    )));
                                }
                            } else {
                                let mut s = connect((echo, 7007).into())?;
                                let mut w = s.try_clone()?;
                                let out = data.clone();
                                let writer = std::thread::spawn(move || -> std::io::Result<()> {
                                    w.write_all(&out)?;
                                    w.shutdown(Shutdown::Write)
                                });
                                let mut back = Vec::new();
                                s.read_to_end(&mut back)?;
                                writer.join().expect("writer")?;
                                if back != data {
                                    return Err(std::io::Error::other(format!(
                                        "conn {i}: echo returned {} bytes that differ",
                                        back.len()
                                    )));
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("client thread"))
                    .collect::<Vec<_>>()
            })
            .unwrap();
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of 100 failed: {failures:?}",
        failures.len()
    );
    wait_until("all flows to be freed", TIMEOUT, || {
        r.status().is_ok_and(|s| s.flows == 0)
    })
    .unwrap();
}

#[test]
fn a_port_not_exported_and_a_refusing_target_are_refused_at_once() {
    let r = Redir::new("refused").unwrap();
    r.echo("echo", 7007).unwrap();
    // 7008: exported, but nothing listens there on the LAN.
    r.start_agent(
        "agent",
        &[
            &format!("echo={LAN_IP}:7007"),
            &format!("closed={LAN_IP}:7008"),
        ],
    )
    .unwrap();
    let echo = r.vip("echo").unwrap();
    let closed = r.vip("closed").unwrap();
    let outcomes = r
        .tb
        .vm
        .enter(|| {
            [(echo, 9999), (closed, 7008)].map(|(ip, port)| {
                let t = Instant::now();
                let res = TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(5));
                (res.map(|_| ()).map_err(|e| e.kind()), t.elapsed())
            })
        })
        .unwrap();
    for ((res, took), what) in outcomes
        .into_iter()
        .zip(["port not exported", "target refuses"])
    {
        assert_eq!(res, Err(ErrorKind::ConnectionRefused), "{what}");
        assert!(
            took < Duration::from_secs(1),
            "{what}: refused after {took:?}"
        );
    }
    assert!(r.counter("engine.refused_no_resource").unwrap() >= 1);
    assert!(r.counter("engine.refused_by_agent").unwrap() >= 1);
}

#[test]
fn traffic_outside_the_subnet_still_works_with_steer_attached() {
    let r = Redir::new("outside").unwrap();
    // A server on the host's own VM-facing address: not a vIP.
    r.tb.spawn(
        &r.tb.host,
        "host-echo",
        "socat",
        &[
            "-b",
            netredir_benches::ECHO_BLOCK,
            "TCP-LISTEN:8000,reuseaddr,fork",
            "PIPE",
        ],
    )
    .unwrap();
    wait_until("host echo to listen", Duration::from_secs(10), || {
        r.tb.host
            .run("ss", &["-Hltn", "sport = :8000"])
            .is_ok_and(|o| !o.stdout.is_empty())
    })
    .unwrap();
    let before = r.counter("steer.pass_ipv4_other").unwrap();
    let data = job_bytes(256 << 10, 7);
    let back =
        r.tb.vm
            .enter(|| {
                let mut s = connect(format!("{HOST_VM_IP}:8000").parse().unwrap())?;
                let mut w = s.try_clone()?;
                let out = data.clone();
                let t = std::thread::spawn(move || {
                    w.write_all(&out)?;
                    w.shutdown(Shutdown::Write)
                });
                let mut back = Vec::new();
                s.read_to_end(&mut back)?;
                t.join().expect("writer")?;
                std::io::Result::Ok(back)
            })
            .unwrap()
            .unwrap();
    assert!(back == data, "echo through the kernel path differs");
    assert!(
        r.counter("steer.pass_ipv4_other").unwrap() > before,
        "steer saw and passed it"
    );
    assert_eq!(
        r.counter("steer.redirect_ipv4").unwrap(),
        0,
        "nothing was steered"
    );
}

#[test]
fn killing_the_agent_fails_new_connections_cleanly_and_the_daemon_lives() {
    // A short grace period: the open flow is reset two seconds after the agent died.
    let r = Redir::with_args("agentkill", &["--grace", "2"]).unwrap();
    r.echo("echo", 7007).unwrap();
    r.start_agent("agent", &[&format!("echo={LAN_IP}:7007")])
        .unwrap();
    let vip = r.vip("echo").unwrap();
    let addr: SocketAddr = (vip, 7007).into();
    // One connection open across the kill.
    let mut open =
        r.tb.vm
            .enter(|| {
                let mut s = connect(addr)?;
                s.write_all(b"ping")?;
                let mut b = [0u8; 4];
                s.read_exact(&mut b)?;
                assert_eq!(&b, b"ping");
                std::io::Result::Ok(s)
            })
            .unwrap()
            .unwrap();
    r.tb.signal("agent", libc::SIGKILL).unwrap();
    r.tb.wait_exit("agent", TIMEOUT).unwrap();
    wait_until("the resource to go offline", TIMEOUT, || {
        r.map()
            .is_ok_and(|m| m.iter().all(|e| e.state == "offline"))
    })
    .unwrap();
    // The open flow was reset, not left hanging.
    let mut b = [0u8; 1];
    // EINTR is not an answer (seen once under load): read again.
    let got = loop {
        match open.read(&mut b) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    match got {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("open flow after the agent died: {other:?}"),
    }
    let (res, took) =
        r.tb.vm
            .enter(|| {
                let t = Instant::now();
                let res = TcpStream::connect_timeout(&addr, Duration::from_secs(5));
                (res.map(|_| ()).map_err(|e| e.kind()), t.elapsed())
            })
            .unwrap();
    assert_eq!(res, Err(ErrorKind::ConnectionRefused));
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    assert!(r.tb.running("netredird"), "daemon died");
    let st = r.status().unwrap();
    assert!(!st.agent_connected);
    assert_eq!(vip, r.vip("echo").unwrap(), "the vIP stays with the name");
    // A new agent brings the resource back at the same address.
    r.start_agent("agent2", &[&format!("echo={LAN_IP}:7007")])
        .unwrap();
    assert_eq!(r.vip("echo").unwrap(), vip);
    let echoed =
        r.tb.vm
            .enter(|| {
                let mut s = connect(addr)?;
                s.write_all(b"back")?;
                let mut b = [0u8; 4];
                s.read_exact(&mut b)?;
                std::io::Result::Ok(b)
            })
            .unwrap()
            .unwrap();
    assert_eq!(&echoed, b"back");
}

#[test]
fn netredird_says_why_it_cannot_start() {
    let r = Redir::new("starterr").unwrap();
    let daemon = bin("netredird").unwrap();
    let control = r.tb.dir().join("second.sock");
    let control = control.to_string_lossy();
    let state = r.host_state().to_string_lossy().into_owned();
    let run = |iface: &str, listen: &str| {
        let out =
            r.tb.host
                .command(&daemon)
                .args([
                    "--config",
                    "/dev/null",
                    "--iface",
                    iface,
                    "--listen",
                    listen,
                    "--control",
                    &control,
                    "--state-dir",
                    &state,
                ])
                .output()
                .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run("nosuch0", "127.0.0.1:7901");
    assert_eq!(code, Some(1));
    assert!(err.contains("nosuch0: no such interface"), "{err}");
    // The first daemon holds the tunnel port.
    let (code, err) = run(HOST_VM_IFACE, &format!("{HOST_WAN_IP}:{TUNNEL_PORT}"));
    assert_eq!(code, Some(1));
    assert!(err.contains("address in use"), "{err}");
    // Bad arguments are caught by the parser with a usage line.
    let (code, err) = run(HOST_VM_IFACE, "not-an-address");
    assert_eq!(code, Some(2));
    assert!(err.contains("--listen"), "{err}");
    assert!(r.tb.running("netredird"), "the first daemon is unharmed");
    let _ = Ipv4Addr::LOCALHOST;
}

/// `ip -d link show dev IFACE` in the host namespace, or None if absent.
fn host_link(r: &Redir, iface: &str) -> Option<String> {
    let out =
        r.tb.host
            .run("ip", &["-d", "link", "show", "dev", iface])
            .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the VM's NIC still offers TCP segmentation offload.
fn vm_tso(r: &Redir) -> bool {
    let out = r.tb.vm.run("ethtool", &["-k", "eth0"]).expect("ethtool");
    String::from_utf8_lossy(&out.stdout).contains("tcp-segmentation-offload: on")
}

#[test]
fn netredird_detaches_and_cleans_up_on_sigterm() {
    // Shared NIC (the default): a TC classifier on vm0 and netredird's
    // TAP device for the VM, no XDP, so the VM keeps TSO on everything.
    let r = Redir::new("sigterm").unwrap();
    let vm0 = host_link(&r, HOST_VM_IFACE).expect("vm0");
    let idx: String = vm0.chars().take_while(char::is_ascii_digit).collect();
    let tap = format!("nr{idx}t");
    assert!(!vm0.contains("xdp"), "no XDP on a shared NIC: {vm0}");
    let tap_link = host_link(&r, &tap).expect("netredird's TAP device while running");
    assert!(
        tap_link.contains("UP") && !tap_link.contains("xdp"),
        "{tap_link}"
    );
    assert!(vm_tso(&r), "the VM's NIC lost TSO with netredir attached");
    assert!(r.control.exists());
    r.tb.signal("netredird", libc::SIGTERM).unwrap();
    let st = r.tb.wait_exit("netredird", TIMEOUT).unwrap();
    assert!(st.success(), "exit status {st:?}");
    // The kernel unregisters a TAP device when its last fd closes, which
    // can finish a moment after the process is reaped (CI saw it once).
    wait_until("the TAP device to go", Duration::from_secs(5), || {
        host_link(&r, &tap).is_none()
    })
    .expect("TAP device left behind");
    assert!(!r.control.exists(), "control socket left behind");

    // Dedicated NIC: XDP right on vm0, and gone after exit.
    let r = Redir::with_args("sigterm-dedicated", &["--dedicated"]).unwrap();
    let attached = || host_link(&r, HOST_VM_IFACE).expect("vm0").contains("xdp");
    assert!(attached(), "steer attached while running");
    let links = r.tb.host.run("ip", &["-o", "link", "show"]).unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(": nr"),
        "no pair on a dedicated NIC: {links}"
    );
    r.tb.signal("netredird", libc::SIGTERM).unwrap();
    let st = r.tb.wait_exit("netredird", TIMEOUT).unwrap();
    assert!(st.success(), "exit status {st:?}");
    assert!(!attached(), "XDP still attached after exit");
}

#[test]
fn an_unreachable_target_says_no_route_to_host() {
    let r = Redir::new("unreachable").unwrap();
    // Nothing answers ARP for 10.202.0.99 on the LAN: the agent's connect
    // fails with "no route to host" after the kernel's ARP timeout.
    r.start_agent("agent", &["ghost=10.202.0.99:9100"]).unwrap();
    let vip = r.vip("ghost").unwrap();
    let res =
        r.tb.vm
            .enter(|| {
                TcpStream::connect_timeout(&(vip, 9100).into(), Duration::from_secs(20)).map(|_| ())
            })
            .unwrap();
    // The whole error (its errno too) if it is not the one expected: seen
    // once in CI as "Uncategorized", not reproduced in isolation.
    assert!(
        matches!(&res, Err(e) if e.kind() == ErrorKind::HostUnreachable),
        "{res:?} ({:?}); status: {:?}",
        res.as_ref().err().and_then(|e| e.raw_os_error()),
        r.status().map(|s| s.counters)
    );
    assert!(r.counter("engine.refused_by_agent").unwrap() >= 1);
}

#[test]
fn netredird_tells_systemd_when_it_is_ready_and_when_it_stops() {
    // What systemd's Type=notify sees: READY=1 once the control socket
    // answers, STOPPING=1 on SIGTERM.
    let dir = std::env::temp_dir().join(format!("netredir-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let env = format!("NOTIFY_SOCKET={}", path.display());
    let r = Redir::with_env("notify", &[&env], &[]).unwrap();
    let mut b = [0u8; 512];
    let n = sock.recv(&mut b).unwrap();
    let msg = String::from_utf8_lossy(&b[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains("STATUS=serving VM"), "{msg}");
    r.tb.signal("netredird", libc::SIGTERM).unwrap();
    let n = sock.recv(&mut b).unwrap();
    assert_eq!(&b[..n], b"STOPPING=1");
    r.tb.wait_exit("netredird", Duration::from_secs(30))
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn netredird_takes_its_settings_from_a_config_file_and_flags_win() {
    let tb = netredir_benches::testbed::Testbed::new("config").unwrap();
    let control = tb.dir().join("control.sock");
    let config = tb.dir().join("netredird.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{HOST_WAN_IP}:{TUNNEL_PORT}\"\ncontrol = \"{}\"\nstate_dir = \"{}\"\n\
             subnet = \"100.99.0.0/16\"\nzone = \"file.test\"\n\n\
             [[vm]]\nname = \"alice-desktop\"\niface = \"{HOST_VM_IFACE}\"\n",
            control.display(),
            tb.dir().join("state").display()
        ),
    )
    .unwrap();
    let cfg = config.to_string_lossy().into_owned();
    let daemon = netredir_benches::testbed::bin("netredird").unwrap();
    tb.spawn(
        &tb.host,
        "netredird",
        &daemon,
        &["--config", &cfg, "--zone", "flag.test"],
    )
    .unwrap();
    let r = Redir { tb, control };
    wait_until("netredird to answer", Duration::from_secs(20), || {
        !r.tb.running("netredird") || r.status().is_ok()
    })
    .unwrap();
    let st = r
        .status()
        .unwrap_or_else(|_| panic!("{}", r.tb.log_tail("netredird")));
    assert_eq!(st.iface, HOST_VM_IFACE);
    assert_eq!(st.subnet, "100.99.0.0/16", "from the file");
    assert_eq!(st.zone, "flag.test", "the flag wins");
    // Pairing codes are for the VM the file names.
    match netredir_shared::control::request(
        &r.control,
        &netredir_shared::control::Request::Pair { vm: None },
        Duration::from_secs(5),
    )
    .unwrap()
    {
        netredir_shared::control::Response::Pair { vm, .. } => assert_eq!(vm, "alice-desktop"),
        other => panic!("{other:?}"),
    }
    // A misspelt key stops it at once, naming the file and the key.
    std::fs::write(&config, "grase = 3\n").unwrap();
    let out =
        r.tb.host
            .command(&daemon)
            .args(["--config", &cfg])
            .output()
            .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("netredird.toml") && err.contains("grase"),
        "{err}"
    );
}
