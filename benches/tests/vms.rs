//! Many VMs on one netredird, attached and detached at runtime, in
//! namespaces: each VM with its own agent (one per VM, own key) and
//! printer; a detach resets only that VM's flows; a re-attached VM keeps
//! its vIPs and its agent comes back without pairing again. Needs root,
//! iproute2 and socat (CI has them).

use netredir_benches::testbed::{CLIENT_LAN_IP, LAN_IP, bin, wait_until};
use netredir_benches::{Redir, job_bytes, print_job, sha256_hex};
use netredir_shared::control::VmInfo;
use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Runs `netredirctl ARGS` against `r`'s daemon: (ok, stdout, stderr).
fn ctl(r: &Redir, args: &[&str]) -> (bool, String, String) {
    netredir_benches::netredirctl(&r.control, args)
}

/// VM `vm`'s own agent (its own key, state dir and log `agent-VM`),
/// paired with it and connected, exporting `exports`.
fn agent_for(r: &Redir, vm: &str, exports: &[&str]) {
    let name = format!("agent-{vm}");
    r.start_agent_for(Some(vm), &r.tb.dir().join(&name), &name, exports, &[])
        .unwrap();
}

fn vms(r: &Redir) -> Vec<VmInfo> {
    let (ok, json, err) = ctl(r, &["vm", "list", "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&json).unwrap()
}

#[test]
fn two_vms_on_one_daemon_print_at_once_and_a_detach_touches_only_its_own() {
    // VM desk-a on vm0 from the command line; desk-b attached at runtime.
    let r = Redir::with_args("vms", &["--vm", "desk-a"]).unwrap();
    let (vm_b, if_b) = r.tb.add_vm(2).unwrap();
    let (ok, out, err) = ctl(&r, &["vm", "attach", "desk-b", "--iface", &if_b]);
    assert!(ok && out.contains("attached VM desk-b"), "{out}{err}");
    let (ok, _, err) = ctl(&r, &["vm", "attach", "desk-b", "--iface", &if_b]);
    assert!(!ok && err.contains("already attached"), "{err}");
    let names: Vec<String> = vms(&r).into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["desk-a", "desk-b"]);
    // With two VMs, a command must say which.
    let (ok, _, err) = ctl(&r, &["status"]);
    assert!(!ok && err.contains("2 VMs are attached"), "{err}");

    r.digest_sink("sink-a", 9100).unwrap();
    r.digest_sink("sink-b", 9101).unwrap();
    agent_for(&r, "desk-a", &[&format!("pa={LAN_IP}:9100")]);
    // desk-b's agent also exports a printer that takes a connection and
    // then never reads (for the detach below).
    let stuck =
        r.tb.lan
            .enter(|| TcpListener::bind((LAN_IP, 9102)))
            .unwrap()
            .unwrap();
    let hold = std::thread::spawn(move || stuck.accept().map(|(s, _)| s));
    let exports_b = [format!("pb={LAN_IP}:9101"), format!("stuck={LAN_IP}:9102")];
    let exports_b: Vec<&str> = exports_b.iter().map(String::as_str).collect();
    agent_for(&r, "desk-b", &exports_b);
    let vip_a = r.vip_for("desk-a", "pa").unwrap();
    let vip_b = r.vip_for("desk-b", "pb").unwrap();
    let vip_stuck = r.vip_for("desk-b", "stuck").unwrap();
    assert!(vms(&r).iter().all(|v| v.agent_connected));
    // A VM sees only its own resources.
    assert!(
        r.map_for(Some("desk-a"))
            .unwrap()
            .iter()
            .all(|e| e.name == "pa")
    );

    // Both print 8 MiB at once, each through its own engine and tunnel.
    let (job_a, job_b) = (job_bytes(8 << 20, 1), job_bytes(8 << 20, 2));
    let want = [sha256_hex(&job_a), sha256_hex(&job_b)];
    let ta = {
        let (ns, job) = (r.tb.vm.clone(), job_a.clone());
        std::thread::spawn(move || ns.enter(|| print_job((vip_a, 9100).into(), &job)).unwrap())
    };
    let got_b = vm_b
        .enter(|| print_job((vip_b, 9101).into(), &job_b))
        .unwrap()
        .unwrap();
    let got_a = ta.join().unwrap().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got_a).split(' ').next(),
        Some(want[0].as_str())
    );
    assert_eq!(
        String::from_utf8_lossy(&got_b).split(' ').next(),
        Some(want[1].as_str())
    );

    // One netredird, no thread per VM.
    let pid = r.tb.pid("netredird").unwrap();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(threads <= 6, "{threads} threads");

    // Detach desk-b in the middle of a job to a printer that stopped
    // reading: its guest sees a reset; desk-a's job meanwhile prints whole.
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    let tb = {
        let job = job_bytes(64 << 20, 3);
        let ns = vm_b.clone();
        std::thread::spawn(move || {
            ns.enter(|| -> std::io::Result<()> {
                let mut s = netredir_benches::connect((vip_stuck, 9102).into())?;
                for chunk in job.chunks(64 * 1024) {
                    s.write_all(chunk)?;
                    w.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
                s.shutdown(Shutdown::Write)
            })
            .unwrap()
        })
    };
    wait_until(
        "desk-b's job to be under way",
        Duration::from_secs(30),
        || written.load(Ordering::SeqCst) >= 1 << 20,
    )
    .unwrap();
    let _held = hold.join().unwrap().unwrap();
    let ta = {
        let (ns, job) = (r.tb.vm.clone(), job_a.clone());
        std::thread::spawn(move || ns.enter(|| print_job((vip_a, 9100).into(), &job)).unwrap())
    };
    let (ok, out, err) = ctl(&r, &["vm", "detach", "desk-b"]);
    assert!(ok && out.contains("detached VM desk-b"), "{out}{err}");
    let e = tb.join().unwrap().expect_err("desk-b's job must fail");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "desk-b's guest sees a reset: {e}"
    );
    let got_a = ta.join().unwrap().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got_a).split(' ').next(),
        Some(want[0].as_str())
    );
    let names: Vec<String> = vms(&r).into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["desk-a"]);
    assert!(r.map_for(Some("desk-b")).is_err());
    // Its agent tries again and is told "not now", with why.
    let agent_log = r.tb.dir().join("agent-desk-b.log");
    wait_until("desk-b's agent to be told", Duration::from_secs(20), || {
        std::fs::read_to_string(&agent_log)
            .is_ok_and(|l| l.contains("not attached on this host now"))
    })
    .unwrap();

    // Attached again: same vIP, and its agent (told "not now" meanwhile)
    // comes back by itself, without a new pairing.
    let (ok, _, err) = ctl(&r, &["vm", "attach", "desk-b", "--iface", &if_b]);
    assert!(ok, "{err}");
    wait_until(
        "desk-b's agent to come back",
        Duration::from_secs(30),
        || {
            r.map_for(Some("desk-b"))
                .is_ok_and(|m| m.iter().any(|e| e.name == "pb" && e.state == "online"))
        },
    )
    .unwrap();
    assert_eq!(r.vip_for("desk-b", "pb").unwrap(), vip_b);
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert_eq!(
        log.matches("paired with the host").count(),
        1,
        "paired once"
    );
    let got_b = vm_b
        .enter(|| print_job((vip_b, 9101).into(), &job_b))
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got_b).split(' ').next(),
        Some(want[1].as_str())
    );
}

/// Runs the libvirt hook as libvirtd does: `netredirctl libvirt-hook
/// DOMAIN OP SUBOP EXTRA` with `xml` on stdin; (exit ok, stdout, stderr).
fn hook(r: &Redir, domain: &str, op: &str, xml: &str) -> (bool, String, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin("netredirctl").unwrap())
        .arg("--control")
        .arg(&r.control)
        .args(["libvirt-hook", domain, op, "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn domain_xml(name: &str, dev: &str, alias: &str) -> String {
    format!(
        "<domain type='kvm' id='3'><name>{name}</name><devices>\
         <interface type='network'><target dev='{dev}'/><alias name='{alias}'/></interface>\
         </devices></domain>"
    )
}

#[test]
fn the_libvirt_hook_attaches_a_started_domain_and_detaches_it_when_it_stops() {
    let r = Redir::without_vm("hook", &[]).unwrap();
    assert!(vms(&r).is_empty());
    let (ok, _, err) = ctl(&r, &["status"]);
    assert!(!ok && err.contains("no VM is attached"), "{err}");
    // A domain without a netredir NIC: nothing happens.
    let plain = domain_xml("other", "vm0", "net0");
    let (ok, out, err) = hook(&r, "other", "started", &plain);
    assert!(ok && out.is_empty() && err.is_empty(), "{out}{err}");
    assert!(vms(&r).is_empty());
    // The desktop starts: attached under its domain name, on its vnet.
    let xml = domain_xml("desk-c", "vm0", "ua-netredir");
    let (ok, out, err) = hook(&r, "desk-c", "started", &xml);
    assert!(ok && out.contains("attached desk-c on vm0"), "{out}{err}");
    let v = vms(&r);
    assert_eq!(
        (
            v.len(),
            v[0].name.as_str(),
            v[0].iface.as_str(),
            v[0].mode.as_str()
        ),
        (1, "desk-c", "vm0", "shared")
    );
    // It works end to end.
    r.echo("lan-echo", 7007).unwrap();
    r.start_agent("agent", &[&format!("echo={LAN_IP}:7007")])
        .unwrap();
    let vip = r.vip("echo").unwrap();
    let back =
        r.tb.vm
            .enter(|| print_job((vip, 7007).into(), b"via the hook"))
            .unwrap()
            .unwrap();
    assert_eq!(back, b"via the hook");
    // libvirtd restarting finds it running: no change, no error.
    let (ok, _, err) = hook(&r, "desk-c", "reconnect", &xml);
    assert!(ok && err.is_empty(), "{err}");
    assert_eq!(vms(&r).len(), 1);
    // It stops: detached; stopping again (or release) is quiet.
    let (ok, out, err) = hook(&r, "desk-c", "stopped", &xml);
    assert!(ok && out.contains("detached desk-c"), "{out}{err}");
    assert!(vms(&r).is_empty());
    let (ok, _, err) = hook(&r, "desk-c", "release", &xml);
    assert!(ok && err.is_empty(), "{err}");
    // A failure is said, and never fails the domain's start.
    let (ok, _, err) = hook(&r, "desk-d", "started", "<domain");
    assert!(ok && err.contains("does not parse"), "{err}");
    let missing = domain_xml("desk-e", "vnet-none", "ua-netredir");
    let (ok, _, err) = hook(&r, "desk-e", "started", &missing);
    assert!(ok && err.contains("no such interface"), "{err}");
    assert!(vms(&r).is_empty());
}

#[test]
fn twenty_vms_print_at_once_each_through_its_own_agent() {
    // Three workers on any machine: the VMs spread over them, and each
    // agent's connection is handed from the worker that accepts it to
    // its VM's.
    let r = Redir::without_vm("vms20", &["--workers", "3"]).unwrap();
    let mut guests = Vec::new();
    for n in 2..22u8 {
        let (ns, iface) = r.tb.add_vm(n).unwrap();
        let name = format!("desk-{n}");
        let (ok, _, err) = ctl(&r, &["vm", "attach", &name, "--iface", &iface]);
        assert!(ok, "{name}: {err}");
        let port = 9000 + u16::from(n);
        r.digest_sink(&format!("sink-{n}"), port).unwrap();
        let export = format!("p{n}={LAN_IP}:{port}");
        agent_for(&r, &name, &[&export]);
        let vip = r.vip_for(&name, &format!("p{n}")).unwrap();
        guests.push((ns, vip, port, job_bytes(8 << 20, u64::from(n))));
    }
    let v = vms(&r);
    assert_eq!(v.len(), 20);
    assert!(v.iter().all(|v| v.agent_connected), "{v:?}");
    for w in 0..3 {
        let n = v.iter().filter(|v| v.worker == w).count();
        assert!((6..=7).contains(&n), "worker {w} serves {n} VMs: {v:?}");
    }
    let handles: Vec<_> = guests
        .into_iter()
        .map(|(ns, vip, port, job)| {
            std::thread::spawn(move || {
                let got = ns
                    .enter(|| print_job((vip, port).into(), &job))
                    .unwrap()
                    .unwrap();
                (
                    String::from_utf8_lossy(&got)
                        .split(' ')
                        .next()
                        .map(str::to_string),
                    sha256_hex(&job),
                )
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (got, want) = h.join().unwrap();
        assert_eq!(got.as_deref(), Some(want.as_str()), "VM {i}'s job");
    }
    // One process, the workers and a fixed few threads (main, control),
    // whatever the number of VMs.
    let pid = r.tb.pid("netredird").unwrap();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(threads <= 3 + 3, "{threads} threads");
}

#[test]
fn a_restarted_netredird_keeps_pairings_and_vips_and_its_agents_come_back() {
    let r = Redir::with_args("restart", &["--vm", "desk-r"]).unwrap();
    r.digest_sink("sink", 9100).unwrap();
    r.start_agent("agent", &[&format!("p={LAN_IP}:9100")])
        .unwrap();
    let vip = r.vip("p").unwrap();
    let job = job_bytes(1 << 20, 7);
    let want = sha256_hex(&job);
    let print = |r: &Redir| {
        let got =
            r.tb.vm
                .enter(|| print_job((vip, 9100).into(), &job))
                .unwrap()
                .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got).split(' ').next(),
            Some(want.as_str())
        );
    };
    print(&r);
    r.tb.signal("netredird", libc::SIGTERM).unwrap();
    r.tb.wait_exit("netredird", Duration::from_secs(30))
        .unwrap();
    r.restart_daemon("netredird-2", &["--vm", "desk-r"])
        .unwrap();
    // The agent dials again by itself and is let in on its pairing.
    wait_until("the agent to come back", Duration::from_secs(30), || {
        r.map()
            .is_ok_and(|m| m.iter().any(|e| e.name == "p" && e.state == "online"))
    })
    .unwrap();
    assert_eq!(r.vip("p").unwrap(), vip, "the same vIP");
    let log = std::fs::read_to_string(r.tb.dir().join("agent.log")).unwrap();
    assert_eq!(
        log.matches("paired with the host").count(),
        1,
        "paired once"
    );
    print(&r);
}

#[test]
fn one_vms_flood_does_not_stop_another_vms_print_job() {
    // desk-a floods SYNs and UDP at full rate while desk-b prints 64 MiB:
    // desk-b's job arrives whole, desk-a's limits take the flood, and
    // desk-a works again afterwards. (How fast desk-b goes meanwhile is
    // for the density benchmark, not a test.)
    let r = Redir::with_args("vmflood", &["--vm", "desk-a"]).unwrap();
    let (vm_b, if_b) = r.tb.add_vm(2).unwrap();
    let (ok, _, err) = ctl(&r, &["vm", "attach", "desk-b", "--iface", &if_b]);
    assert!(ok, "{err}");
    r.echo("echo-a", 7007).unwrap();
    r.digest_sink("sink-b", 9101).unwrap();
    agent_for(&r, "desk-a", &[&format!("echo={LAN_IP}:7007")]);
    agent_for(&r, "desk-b", &[&format!("pb={LAN_IP}:9101")]);
    let vip_a = r.vip_for("desk-a", "echo").unwrap();
    let vip_b = r.vip_for("desk-b", "pb").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (ns, stop) = (r.tb.vm.clone(), stop.clone());
        std::thread::spawn(move || {
            ns.enter(|| {
                let raw = netredir_benches::RawIp::new().expect("raw socket");
                let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                let mut sent = 0u64;
                let mut i = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    i = i.wrapping_add(1);
                    let pkt = netredir_benches::raw_syn((i % 50_000) as u16 + 10_000, vip_a, 7007);
                    sent += u64::from(raw.send(&pkt, vip_a));
                    sent += u64::from(
                        udp.send_to(&[0u8; 512], (vip_a, 5000 + (i % 100) as u16))
                            .is_ok(),
                    );
                }
                sent
            })
            .unwrap()
        })
    };
    let job = job_bytes(64 << 20, 9);
    let got = vm_b
        .enter(|| print_job((vip_b, 9101).into(), &job))
        .unwrap()
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    let sent = flood.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got).split(' ').next(),
        Some(sha256_hex(&job).as_str()),
        "desk-b's job whole"
    );
    assert!(sent > 1000, "the flood ran: {sent} packets");
    let st = match netredir_shared::control::request(
        &r.control,
        &netredir_shared::control::Request::Status {
            vm: Some("desk-a".into()),
        },
        Duration::from_secs(5),
    )
    .unwrap()
    {
        netredir_shared::control::Response::Status(st) => st,
        other => panic!("{other:?}"),
    };
    let c = |k: &str| {
        st.counters
            .iter()
            .find(|(n, _)| n == k)
            .map_or(0, |(_, v)| *v)
    };
    assert!(
        c("engine.refused_rate")
            + c("engine.refused_limit")
            + c("engine.syn_dropped_opening")
            + c("engine.syn_waited")
            > 0,
        "desk-a's limits took the flood: {:?}",
        st.counters
    );
    // desk-a still works once its flood is over.
    wait_until("desk-a to answer again", Duration::from_secs(60), || {
        r.tb.vm
            .enter(|| print_job((vip_a, 7007).into(), b"after the flood"))
            .ok()
            .and_then(Result::ok)
            .is_some_and(|b| b == b"after the flood")
    })
    .unwrap();
}

#[test]
fn a_resource_keeps_its_vip_when_renamed_and_a_namesake_gets_another() {
    // A vIP goes with the device on its network (the agent's key), not
    // with the name the user gave it, and the host keeps it.
    let r = Redir::with_args("vipkey", &["--vm", "desk-k"]).unwrap();
    r.start_agent("agent", &[&format!("printer={LAN_IP}:9100")])
        .unwrap();
    let vip = r.vip("printer").unwrap();
    let stop = |name: &str| {
        r.tb.signal(name, libc::SIGTERM).unwrap();
        r.tb.wait_exit(name, Duration::from_secs(30)).unwrap();
    };
    stop("agent");
    // Renamed by the user: the same printer keeps its address.
    r.start_agent("agent-2", &[&format!("laser={LAN_IP}:9100")])
        .unwrap();
    assert_eq!(r.vip("laser").unwrap(), vip, "renamed, same vIP");
    stop("agent-2");
    // Another device takes that name: another address; the printer,
    // back under its first name, gets its own again.
    r.start_agent(
        "agent-3",
        &[
            &format!("laser={CLIENT_LAN_IP}:9100"),
            &format!("printer={LAN_IP}:9100"),
        ],
    )
    .unwrap();
    assert_ne!(r.vip("laser").unwrap(), vip, "a namesake");
    assert_eq!(r.vip("printer").unwrap(), vip);
    let kept = std::fs::read_to_string(r.host_state().join("vips/desk-k.json")).unwrap();
    assert!(kept.contains(&format!("\"{vip}\"")), "{kept}");

    // An operator pins the printer where a configuration names it and
    // renames it for the guest; both hold across a daemon restart.
    let (ok, out, err) = ctl(&r, &["map", "pin", "printer", "100.77.9.9"]);
    assert!(ok && out.contains("export, pinned"), "{out}{err}");
    let (ok, _, err) = ctl(&r, &["map", "pin", "laser", "100.77.9.9"]);
    assert!(!ok && err.contains("another resource's"), "{err}");
    let (ok, _, err) = ctl(&r, &["map", "rename", "printer", "office"]);
    assert!(ok, "{err}");
    let pinned: std::net::Ipv4Addr = "100.77.9.9".parse().unwrap();
    assert_eq!(r.vip("office").unwrap(), pinned);
    let (_, dig) = {
        let out =
            r.tb.vm
                .run(
                    "dig",
                    &["@100.77.0.53", "+short", "office.netredir.internal"],
                )
                .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(
        dig.trim(),
        "100.77.9.9",
        "the guest finds it by its new name"
    );
    let (ok, _, err) = ctl(&r, &["map", "remove", "office"]);
    assert!(!ok && err.contains("exported by the agent now"), "{err}");
    r.tb.signal("netredird", libc::SIGTERM).unwrap();
    r.tb.wait_exit("netredird", Duration::from_secs(30))
        .unwrap();
    r.restart_daemon("netredird-2", &["--vm", "desk-k"])
        .unwrap();
    wait_until("the agent to come back", Duration::from_secs(30), || {
        r.map()
            .is_ok_and(|m| m.iter().any(|e| e.name == "office" && e.state == "online"))
    })
    .unwrap();
    assert_eq!(r.vip("office").unwrap(), pinned);
    // The agent gone, a resource it no longer exports is forgotten.
    stop("agent-3");
    wait_until("its resources offline", Duration::from_secs(30), || {
        r.map()
            .is_ok_and(|m| m.iter().all(|e| e.state == "offline"))
    })
    .unwrap();
    let (ok, out, err) = ctl(&r, &["map", "remove", "laser"]);
    assert!(
        ok && !out.contains("laser") && out.contains("office"),
        "{out}{err}"
    );
    let kept = std::fs::read_to_string(r.host_state().join("vips/desk-k.json")).unwrap();
    assert!(!kept.contains(&format!("host:{CLIENT_LAN_IP}")), "{kept}");
}
