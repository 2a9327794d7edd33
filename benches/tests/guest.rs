//! What a stock guest does, with real tools in the VM namespace: SNMP over
//! UDP, ping, DNS (dig, getent), DHCP (udhcpc), SLAAC and IPv6 against
//! netredir, and real servers (snmpd, socat) on the client LAN. Needs root and the
//! Debian packages scripts/setup installs.

use netredir_benches::testbed::{HOST_VM_IFACE, HOST_VM_IP6, LAN_IP, Testbed, wait_until};
use netredir_benches::{Redir, job_bytes, netredirctl};
use std::time::Duration;

fn vm_run(r: &Redir, prog: &str, args: &[&str]) -> (bool, String) {
    let out =
        r.tb.vm
            .command(prog)
            .args(args)
            .output()
            .expect("run in vm");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn snmpget_over_udp_reaches_the_real_printer() {
    let r = Redir::new("snmp").unwrap();
    r.snmpd("netredir test printer").unwrap();
    r.start_agent("agent", &[&format!("printer={LAN_IP}:9100,161/udp")])
        .unwrap();
    let vip = r.vip("printer").unwrap().to_string();
    let (ok, out) = vm_run(
        &r,
        "snmpget",
        &[
            "-v2c",
            "-c",
            "public",
            "-r",
            "2",
            "-t",
            "2",
            "-On",
            &vip,
            "1.3.6.1.2.1.1.1.0",
        ],
    );
    assert!(ok, "snmpget failed: {out}");
    assert!(out.contains("netredir test printer"), "{out}");
    // UDP to a port the export does not name: refused like a real host does.
    let (ok, out) = vm_run(
        &r,
        "snmpget",
        &[
            "-v2c",
            "-c",
            "public",
            "-r",
            "0",
            "-t",
            "1",
            &format!("{vip}:162"),
            "1.3.6.1.2.1.1.1.0",
        ],
    );
    assert!(!ok, "UDP to an unexported port answered: {out}");
}

#[test]
fn ping_answers_as_the_real_resource_does() {
    let r = Redir::new("ping").unwrap();
    // 10.202.0.99 does not exist on the LAN.
    r.start_agent(
        "agent",
        &[&format!("printer={LAN_IP}"), "ghost=10.202.0.99"],
    )
    .unwrap();
    let printer = r.vip("printer").unwrap().to_string();
    let ghost = r.vip("ghost").unwrap().to_string();
    let (ok, out) = vm_run(&r, "ping", &["-c", "2", "-W", "3", &printer]);
    assert!(ok, "ping of a live printer failed: {out}");
    let (ok, out) = vm_run(&r, "ping", &["-c", "1", "-W", "4", &ghost]);
    assert!(!ok, "ping of a dead resource answered: {out}");
    assert!(r.counter("engine.echo_replies").unwrap() >= 2);
}

#[test]
fn the_vdns_names_printers_and_their_services() {
    let r = Redir::new("dns").unwrap();
    r.start_agent(
        "agent",
        &[
            &format!("printer={LAN_IP}:9100,631"),
            &format!("files={LAN_IP}:445"),
        ],
    )
    .unwrap();
    let vip = r.vip("printer").unwrap().to_string();
    let st = r.status().unwrap();
    assert_eq!(st.dns, ["100.77.0.53", "fd6e:7264::53"]);
    let dns = format!("@{}", st.dns[0]);
    let dig = |args: &[&str]| {
        let mut a = vec![dns.as_str(), "+short", "+tries=2", "+time=2"];
        a.extend_from_slice(args);
        let (ok, out) = vm_run(&r, "dig", &a);
        assert!(ok, "dig {args:?}: {out}");
        out.trim().to_string()
    };
    assert_eq!(dig(&["printer.netredir.internal", "A"]), vip);
    assert_eq!(dig(&["-x", &vip]), "printer.netredir.internal.");
    assert_eq!(
        dig(&["_ipp._tcp.netredir.internal", "PTR"]),
        "printer._ipp._tcp.netredir.internal."
    );
    assert!(
        dig(&["printer._ipp._tcp.netredir.internal", "SRV"])
            .contains(" 631 printer.netredir.internal.")
    );
    assert_eq!(
        dig(&["_pdl-datastream._tcp.netredir.internal", "PTR"]),
        "printer._pdl-datastream._tcp.netredir.internal."
    );
    let (_, out) = vm_run(&r, "dig", &[&dns, "+tries=1", "nosuch.netredir.internal"]);
    assert!(out.contains("NXDOMAIN"), "{out}");
    let (_, out) = vm_run(&r, "dig", &[&dns, "+tries=1", "example.com"]);
    assert!(out.contains("REFUSED"), "{out}");
    // The system resolver, as any program in the guest uses it.
    r.tb.set_resolv_conf(
        &r.tb.vm,
        "nameserver 100.77.0.53\nsearch netredir.internal\n",
    )
    .unwrap();
    // `hosts` asks for IPv6 first (the guest has IPv6), `ahosts` for both.
    let vip6 = r.vip6("printer").unwrap().to_string();
    let (ok, out) = vm_run(&r, "getent", &["hosts", "printer.netredir.internal"]);
    assert!(
        ok && out.starts_with(&format!("{vip6} ")),
        "getent hosts: {out}"
    );
    let (ok, out) = vm_run(&r, "getent", &["ahosts", "printer.netredir.internal"]);
    assert!(
        ok && out.contains(&vip) && out.contains(&vip6),
        "getent ahosts: {out}"
    );
    let (ok, out) = vm_run(&r, "getent", &["ahostsv4", "files"]);
    assert!(
        ok && out.contains(&r.vip("files").unwrap().to_string()),
        "getent via search: {out}"
    );
}

/// udhcpc on the VM's eth0, once, printing what it was given.
fn udhcpc(r: &Redir) -> (bool, String) {
    let script = r.tb.dir().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip mask=$mask dns=$dns domain=$domain routes=$staticroutes\"\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    vm_run(
        r,
        "udhcpc",
        &[
            "-i",
            "eth0",
            "-f",
            "-q",
            "-n",
            "-t",
            "4",
            "-T",
            "1",
            "-s",
            &script.to_string_lossy(),
        ],
    )
}

#[test]
fn a_dedicated_nic_gets_its_address_by_dhcp() {
    let r = Redir::with_args("dhcp", &["--dedicated"]).unwrap();
    r.start_agent("agent", &[&format!("printer={LAN_IP}")])
        .unwrap();
    let (ok, out) = udhcpc(&r);
    assert!(ok, "udhcpc failed: {out}");
    assert!(out.contains("ip=100.77.0.100 "), "{out}");
    assert!(out.contains("mask=16"), "{out}");
    assert!(out.contains("dns=100.77.0.53"), "{out}");
    assert!(out.contains("domain=netredir.internal"), "{out}");
    assert!(out.contains("routes=100.77.0.0/16 100.77.0.1"), "{out}");
    assert!(
        r.counter("steer.redirect_dhcp").unwrap() >= 2,
        "discover and request were steered"
    );
    assert!(
        r.counter("engine.dhcp_replies").unwrap() >= 2,
        "offer and ack"
    );
    // IPv6: the kernel's own SLAAC takes an address in the prefix from
    // netredird's router advertisement, and no default route.
    let mut addrs = String::new();
    wait_until(
        "a SLAAC address in fd6e:7264::/64",
        Duration::from_secs(10),
        || {
            addrs = vm_run(&r, "ip", &["-6", "addr", "show", "dev", "eth0"]).1;
            addrs.lines().any(|l| {
                l.contains("inet6 fd6e:7264::")
                    && l.contains("scope global")
                    && !l.contains("tentative")
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {addrs}"));
    let (_, routes) = vm_run(&r, "ip", &["-6", "route", "show", "default"]);
    assert!(
        routes.trim().is_empty(),
        "netredird is no default router: {routes}"
    );
    assert!(r.counter("engine.router_adverts").unwrap() >= 1);
    // With that address alone, the guest reaches the printer's IPv6 vIP.
    let vip6 = r.vip6("printer").unwrap().to_string();
    let (ok, out) = vm_run(&r, "ping", &["-6", "-c", "1", "-W", "3", &vip6]);
    assert!(ok, "ping -6 from the SLAAC address: {out}");
}

#[test]
fn a_dedicated_nic_with_jumbo_frames_carries_them_whole() {
    // Above what XDP on a veth takes (3500), a dedicated NIC is steered by
    // the TC classifier into a TAP device: DHCP still answered, and the
    // guest's large segments reach the engine whole.
    let tb = Testbed::new("jumbo").unwrap();
    for (ns, dev) in [(&tb.vm, "eth0"), (&tb.host, HOST_VM_IFACE)] {
        ns.run("ip", &["link", "set", "dev", dev, "mtu", "9000"])
            .unwrap();
    }
    let r = Redir::with_testbed(tb, &["--dedicated"]).unwrap();
    let received = r.tb.dir().join("received.prn");
    r.printer_once("printer", 9100, &received).unwrap();
    r.start_agent("agent", &[&format!("printer={LAN_IP}:9100")])
        .unwrap();
    let (ok, out) = udhcpc(&r);
    assert!(ok && out.contains("ip=100.77.0.100 "), "udhcpc: {out}");
    let vip = r.vip("printer").unwrap();
    let job = job_bytes(16 << 20, 9);
    r.print_whole((vip, 9100).into(), &job, "printer", &received)
        .unwrap();
    let (frames, gso) = (
        r.counter("tap.frames_in").unwrap(),
        r.counter("tap.gso_in").unwrap(),
    );
    assert!(
        gso > 0 && frames < job.len() as u64 / 9000,
        "{gso} of {frames} frames were large segments"
    );
}

#[test]
fn ipv6_works_as_ipv4_does() {
    let r = Redir::new("ipv6").unwrap();
    let received = r.tb.dir().join("received.prn");
    r.printer_once("printer", 9100, &received).unwrap();
    r.start_agent("agent", &[&format!("printer={LAN_IP}:9100")])
        .unwrap();
    let vip = r.vip("printer").unwrap();
    let vip6 = r.vip6("printer").unwrap();
    assert_eq!(
        vip6.octets()[12..],
        vip.octets(),
        "the IPv6 vIP ends in the IPv4 one"
    );
    assert!(vip6.to_string().starts_with("fd6e:7264::"), "{vip6}");

    // dig AAAA, over both vDNS addresses.
    for server in ["@100.77.0.53", "@fd6e:7264::53"] {
        let (ok, out) = vm_run(
            &r,
            "dig",
            &[
                server,
                "+short",
                "+tries=2",
                "+time=2",
                "printer.netredir.internal",
                "AAAA",
            ],
        );
        assert!(ok, "dig {server}: {out}");
        assert_eq!(out.trim(), vip6.to_string(), "dig {server}");
    }
    let (ok, out) = vm_run(
        &r,
        "dig",
        &["@fd6e:7264::53", "+short", "-x", &vip6.to_string()],
    );
    assert!(
        ok && out.trim() == "printer.netredir.internal.",
        "reverse: {out}"
    );

    // ping -6 the vIP; and IPv6 outside the prefix still goes by the kernel.
    let (ok, out) = vm_run(&r, "ping", &["-6", "-c", "2", "-W", "3", &vip6.to_string()]);
    assert!(ok, "ping -6 of the printer: {out}");
    let (ok, out) = vm_run(&r, "ping", &["-6", "-c", "1", "-W", "3", HOST_VM_IP6]);
    assert!(ok, "ping -6 outside the prefix: {out}");

    // 64 MiB over IPv6, byte-identical.
    let job = job_bytes(64 << 20, 66);
    r.print_whole((vip6, 9100).into(), &job, "printer", &received)
        .unwrap();
    assert!(r.counter("steer.redirect_ndp").unwrap() >= 1);
    assert!(r.counter("steer.redirect_ipv6").unwrap() >= 1);
    assert!(r.counter("steer.pass_ipv6").unwrap() >= 1);
    assert!(r.counter("engine.ndp_replies").unwrap() >= 1);
}

#[test]
fn a_syn_flood_leaves_memory_bounded_and_real_connections_working() {
    use std::io::{Read, Write};
    let r = Redir::new("synflood").unwrap();
    r.echo("lan-echo", 7007).unwrap();
    r.start_agent(
        "agent",
        &[
            &format!("echo={LAN_IP}:7007"),
            &format!("printer={LAN_IP}:9100"),
        ],
    )
    .unwrap();
    let echo = r.vip("echo").unwrap();
    let printer = r.vip("printer").unwrap();
    let rss_before = r.tb.rss("netredird").unwrap();
    let sent =
        r.tb.vm
            .enter(|| {
                let raw = netredir_benches::RawIp::new().expect("raw socket");
                let mut sent = 0u32;
                for i in 0..100_000u32 {
                    // Half to random ports, half to an exported one.
                    let (dst, port) = if i % 2 == 0 {
                        (echo, (i % 60_000) as u16 + 1)
                    } else {
                        (printer, 9100)
                    };
                    let pkt = netredir_benches::raw_syn((i % 50_000) as u16 + 10_000, dst, port);
                    sent += u32::from(raw.send(&pkt, dst));
                }
                sent
            })
            .unwrap();
    assert!(sent >= 90_000, "only {sent} SYNs went out");
    // Legitimate connections work again once the flood is over.
    netredir_benches::testbed::wait_until(
        "an echo through netredir",
        std::time::Duration::from_secs(30),
        || {
            r.tb.vm
                .enter(|| -> std::io::Result<bool> {
                    let mut s = std::net::TcpStream::connect_timeout(
                        &(echo, 7007).into(),
                        std::time::Duration::from_secs(2),
                    )?;
                    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                    s.write_all(b"legit")?;
                    let mut b = [0u8; 5];
                    s.read_exact(&mut b)?;
                    Ok(&b == b"legit")
                })
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false)
        },
    )
    .unwrap();
    assert!(r.tb.running("netredird"));
    let c = |k: &str| r.counter(k).unwrap();
    assert!(
        c("engine.refused_no_resource") > 10_000,
        "SYNs to unexported ports were refused"
    );
    assert!(
        c("engine.refused_rate") + c("engine.refused_limit") + c("engine.syn_dropped_opening") > 0,
        "the limits took the rest"
    );
    let rss = r.tb.rss("netredird").unwrap();
    // The engine's cap on flow buffers (96 MiB) plus room for the rest.
    assert!(
        rss < rss_before + (128 << 20),
        "netredird grew from {} to {} MiB",
        rss_before >> 20,
        rss >> 20
    );
}

#[test]
fn a_guest_prints_by_name_to_an_ipp_everywhere_printer() {
    // ippeveprinter, as cupsd and real printers, answers 400 to a Host it
    // does not know as its own: the agent rewrites it (and the URIs in
    // the IPP attributes) on a port marked /ipp, and back in answers.
    let r = Redir::new("ippname").unwrap();
    let spool = r.tb.dir().join("ipp-spool");
    r.ippeveprinter("laser", 8631, &spool).unwrap();
    r.start_agent(
        "agent",
        &[
            &format!("laser={LAN_IP}:8631/ipp"),
            &format!("plain={LAN_IP}:8631"),
        ],
    )
    .unwrap();
    r.tb.set_resolv_conf(
        &r.tb.vm,
        "nameserver 100.77.0.53\nsearch netredir.internal\n",
    )
    .unwrap();
    let uri = "ipp://laser.netredir.internal:8631/ipp/print";
    let (ok, out) = vm_run(&r, "ipptool", &["-tv", uri, "get-printer-attributes.test"]);
    assert!(
        ok,
        "get-printer-attributes by name: {out}\nprinter: {}",
        r.tb.log_tail("laser")
    );
    let supported = format!(
        "printer-uri-supported (1setOf uri) = {uri},ipps://laser.netredir.internal:8631/ipp/print"
    );
    assert!(
        out.contains(&supported),
        "the printer's URIs name what the guest used: {out}"
    );
    assert!(
        !out.contains(LAN_IP),
        "the printer's real address reached the guest: {out}"
    );
    // The same printer without the mark: its own refusal comes through.
    let (ok, out) = vm_run(
        &r,
        "ipptool",
        &[
            "-tv",
            "ipp://plain.netredir.internal:8631/ipp/print",
            "get-printer-attributes.test",
        ],
    );
    let log = r.tb.log_tail("laser");
    assert!(
        !ok && log.contains("Bad Host: header 'plain.netredir.internal'"),
        "unrewritten Host: {out}\n{log}"
    );
    // A document, sent chunked and with a length: kept byte-identical.
    let mut doc = b"%PDF-1.4\n".to_vec();
    doc.extend(job_bytes(300 << 10, 12));
    let path = r.tb.dir().join("doc.pdf");
    std::fs::write(&path, &doc).unwrap();
    let path = path.to_string_lossy().into_owned();
    for framing in ["-c", "-L"] {
        // One job at a time: the second may find the first still
        // printing (a moment), and is sent again.
        let mut last = String::new();
        wait_until(
            &format!("print-job {framing}"),
            Duration::from_secs(20),
            || {
                let (ok, out) = vm_run(
                    &r,
                    "ipptool",
                    &["-tv", framing, "-f", &path, uri, "print-job.test"],
                );
                assert!(
                    ok || out.contains("server-error-busy"),
                    "print-job {framing}: {out}"
                );
                last = out;
                ok
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {last}"));
    }
    let mut kept = Vec::new();
    wait_until(
        "both documents in the spool",
        Duration::from_secs(20),
        || {
            kept = std::fs::read_dir(&spool)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().extension().is_some_and(|x| x == "pdf"))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            kept.len() == 2
                && kept
                    .iter()
                    .all(|p| std::fs::read(p).is_ok_and(|b| b == doc))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {kept:?}"));
}

#[test]
fn a_guest_browsing_its_link_finds_the_printer_by_mdns() {
    browse_by_mdns(Redir::new("mdns").unwrap());
}

#[test]
fn a_guest_on_a_dedicated_nic_finds_the_printer_by_mdns() {
    browse_by_mdns(Redir::with_args("mdnsx", &["--dedicated"]).unwrap());
}

/// avahi in the guest, as a stock desktop runs it: the printer is on its
/// link by mDNS, at its vIP, with nothing configured.
fn browse_by_mdns(r: Redir) {
    r.start_agent("agent", &[&format!("laser={LAN_IP}:631,9100")])
        .unwrap();
    let bus = r.avahi(&r.tb.vm).unwrap();
    let vip = r.vip("laser").unwrap().to_string();
    let line = avahi_browse(&r, &bus, "_ipp._tcp", &vip, 631);
    assert!(
        line.contains(";laser;") && line.contains(";laser.local;") && line.contains("rp=ipp/print"),
        "{line}"
    );
    let raw = avahi_browse(&r, &bus, "_pdl-datastream._tcp", &vip, 9100);
    assert!(raw.contains(";laser;"), "raw printing: {raw}");
    assert!(
        r.counter("steer.mdns").unwrap() >= 1,
        "the guest's queries were copied"
    );
    assert!(r.counter("engine.mdns_answers").unwrap() >= 1);
}

#[test]
fn a_printer_the_agent_discovers_is_exported_and_prints_by_name() {
    // No --export: the agent finds ippeveprinter's own DNS-SD
    // announcement (avahi on the LAN) and exports it, its IPP port marked
    // so that the guest prints to it by name.
    let (r, _) = discovered_laser("discover");
    let map = r.map().unwrap();
    let e = map.iter().find(|e| e.name == "laser").unwrap();
    assert_eq!(e.source, "discovered");
    assert_eq!(e.target, format!("{LAN_IP}:8631/ipp"));
    let (ok, out, _) = netredirctl(&r.control, &["map", "list"]);
    assert!(ok && out.contains("discovered"), "{out}");
    r.tb.set_resolv_conf(
        &r.tb.vm,
        "nameserver 100.77.0.53\nsearch netredir.internal\n",
    )
    .unwrap();
    let uri = "ipp://laser.netredir.internal:8631/ipp/print";
    let (ok, out) = vm_run(&r, "ipptool", &["-tv", uri, "get-printer-attributes.test"]);
    assert!(ok, "get-printer-attributes by name: {out}");
    // The guest's own mDNS browse finds it where its IPP is.
    let bus = r.avahi(&r.tb.vm).unwrap();
    let vip = r.vip("laser").unwrap().to_string();
    let line = avahi_browse(&r, &bus, "_ipp._tcp", &vip, 8631);
    assert!(line.contains(";laser.local;"), "{line}");
}

#[test]
fn a_guests_own_cups_prints_by_name_to_a_discovered_printer() {
    // The whole way, as a user would: the agent discovers the printer,
    // the guest's CUPS adds it by name as an IPP Everywhere queue and
    // prints; the printer keeps the document byte-identical.
    let (r, spool) = discovered_laser("cups");
    r.tb.set_resolv_conf(
        &r.tb.vm,
        "nameserver 100.77.0.53\nsearch netredir.internal\n",
    )
    .unwrap();
    let sock = r.cupsd(&r.tb.vm).unwrap();
    let uri = "ipp://laser.netredir.internal:8631/ipp/print";
    let (ok, out) = vm_run(
        &r,
        "lpadmin",
        &[
            "-h",
            &sock,
            "-p",
            "laser",
            "-E",
            "-v",
            uri,
            "-m",
            "everywhere",
        ],
    );
    assert!(ok, "lpadmin -m everywhere: {out}");
    let mut doc = b"%PDF-1.4\n".to_vec();
    doc.extend(job_bytes(200 << 10, 21));
    let path = r.tb.dir().join("letter.pdf");
    std::fs::write(&path, &doc).unwrap();
    let (ok, out) = vm_run(
        &r,
        "lp",
        &[
            "-h",
            &sock,
            "-d",
            "laser",
            "-o",
            "raw",
            &path.to_string_lossy(),
        ],
    );
    assert!(ok, "lp: {out}");
    let mut kept = Vec::new();
    wait_until("the job at the printer", Duration::from_secs(30), || {
        kept = std::fs::read_dir(&spool)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        kept.iter()
            .any(|p| std::fs::read(p).is_ok_and(|b| b == doc))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {kept:?}\ncupsd: {}\nprinter: {}\nagent: {}",
            r.tb.log_tail(&format!("cupsd-{}", r.tb.vm.name())),
            r.tb.log_tail("laser"),
            r.tb.log_tail("agent")
        )
    });
}

/// The resolved line of `service` at `vip:port` that avahi-browse in the
/// guest (its avahi on bus `bus`) lists. Each run stops at "all for
/// now", which may come before an answer: it asks again until one has it.
fn avahi_browse(r: &Redir, bus: &str, service: &str, vip: &str, port: u16) -> String {
    let env = format!("DBUS_SYSTEM_BUS_ADDRESS={bus}");
    let found = format!(";{vip};{port};");
    let mut out = String::new();
    wait_until(
        &format!("avahi in the guest to resolve {service}"),
        Duration::from_secs(30),
        || {
            out = vm_run(r, "env", &[&env, "avahi-browse", "-rtp", service]).1;
            out.lines()
                .any(|l| l.starts_with("=;") && l.contains(&found))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {out}"));
    out.lines()
        .find(|l| l.starts_with("=;") && l.contains(&found))
        .unwrap()
        .to_string()
}

/// A testbed with `ippeveprinter` "laser" (IPP on 8631, announced by avahi
/// on the LAN) and an agent with `--discover printers` and no `--export`,
/// once the host lists the printer online with its IPP port marked
/// (DNS-SD's `_ipps` can come before `_ipp`); and the printer's spool.
fn discovered_laser(tag: &str) -> (Redir, std::path::PathBuf) {
    let r = Redir::new(tag).unwrap();
    let spool = r.tb.dir().join("ipp-spool");
    r.ippeveprinter("laser", 8631, &spool).unwrap();
    r.start_agent_with("agent", &[], &["--discover", "printers"])
        .unwrap();
    let mut map = Vec::new();
    wait_until(
        "the printer to be discovered",
        Duration::from_secs(30),
        || {
            map = r.map().unwrap_or_default();
            map.iter().any(|e| {
                e.name == "laser"
                    && e.state == "online"
                    && e.ports.contains(&8631)
                    && e.target.ends_with("/ipp")
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {map:?}\n{}", r.tb.log_tail("agent")));
    (r, spool)
}
