//! What a stock guest does, with real tools in the VM namespace: SNMP over
//! UDP, ping, DNS (dig, getent) and DHCP (udhcpc) against netredir, and
//! real servers (snmpd, socat) on the client LAN. Needs root and the
//! Debian packages scripts/setup installs.

use netredir_benches::Redir;
use netredir_benches::testbed::LAN_IP;

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
    assert_eq!(st.dns, "100.77.0.53");
    let dns = format!("@{}", st.dns);
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
    let (ok, out) = vm_run(&r, "getent", &["hosts", "printer.netredir.internal"]);
    assert!(ok && out.starts_with(&vip), "getent: {out}");
    let (ok, out) = vm_run(&r, "getent", &["hosts", "files"]);
    assert!(
        ok && out.contains(&r.vip("files").unwrap().to_string()),
        "getent via search: {out}"
    );
}

#[test]
fn a_dedicated_nic_gets_its_address_by_dhcp() {
    let r = Redir::with_args("dhcp", &["--dedicated"]).unwrap();
    r.start_agent("agent", &[&format!("printer={LAN_IP}")])
        .unwrap();
    let script = r.tb.dir().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip mask=$mask dns=$dns domain=$domain routes=$staticroutes\"\nexit 0\n",
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&script).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (ok, out) = vm_run(
        &r,
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
    );
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
}
