//! `--discover printers`: the printers on the user's LAN become resources
//! without an `--export` each, under the user's policy
//! (`--discover-allow`, `--discover-deny`).
//!
//! DNS-SD over mDNS (the `mdns-sd` crate, its own thread and sockets):
//! the agent browses the printer and scanner service types, and each
//! resolved instance is merged into one device per address, with the
//! ports its services offer (IPP marked so the agent rewrites its `Host`,
//! eSCL as HTTP). SNMP, as CUPS's snmp backend does it, for printers
//! that do not announce themselves: a GET of `hrDeviceType.1`,
//! `sysName.0` and `prtGeneralSerialNumber.1` (community `public`) to the
//! broadcast address of each LAN this machine is on, at start and every
//! [`SNMP_EVERY`]; a device answering "printer" is exported with raw
//! printing (9100), SNMP (161/udp), and IPP (631) and LPD (515) if they
//! accept a connection. Answers are parsed by the `snmp2` crate. The loop
//! takes what was found with [`Discovery::poll`]; the threads wake it.
//! What is decided here (names, ports, policy) is plain functions, tested
//! without a network.

use netredir_shared::export::{App, ExportSpec, default_app};
use netredir_shared::wire::Proto;
use netredir_uring::Waker;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

/// How often the LANs are asked again by SNMP.
pub const SNMP_EVERY: Duration = Duration::from_secs(300);
/// How long answers to one SNMP broadcast are collected.
const SNMP_WAIT: Duration = Duration::from_secs(2);
/// `hrDeviceType.1`, `sysName.0`, `prtGeneralSerialNumber.1`.
const OID_DEVICE_TYPE: &[u32] = &[1, 3, 6, 1, 2, 1, 25, 3, 2, 1, 2, 1];
const OID_SYS_NAME: &[u32] = &[1, 3, 6, 1, 2, 1, 1, 5, 0];
const OID_SERIAL: &[u32] = &[1, 3, 6, 1, 2, 1, 43, 5, 1, 1, 17, 1];
/// `hrDevicePrinter`: what a printer's first device is.
const HR_DEVICE_PRINTER: &str = "1.3.6.1.2.1.25.3.1.5";

/// What `--discover` looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Printers and scanners announced by DNS-SD (IPP, IPPS, raw/JetDirect,
    /// LPD, eSCL).
    Printers,
}

/// A service type browsed, the port it is reached on and how the agent
/// treats it.
struct Service {
    ty: &'static str,
    app: Option<App>,
}

/// The DNS-SD types of printers and scanners (RFC 6763 names).
const SERVICES: [Service; 5] = [
    Service {
        ty: "_ipp._tcp.local.",
        app: Some(App::Ipp),
    },
    Service {
        ty: "_ipps._tcp.local.",
        app: None,
    },
    Service {
        ty: "_pdl-datastream._tcp.local.",
        app: None,
    },
    Service {
        ty: "_printer._tcp.local.",
        app: None,
    },
    Service {
        ty: "_uscan._tcp.local.",
        app: Some(App::Http),
    },
];

/// One `--discover-allow`/`--discover-deny` rule: a network, or a name
/// (the DNS-SD instance name or the resource name it becomes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Addresses in this network.
    Net(IpAddr, u8),
    /// This name, case-insensitive.
    Name(String),
}

impl FromStr for Rule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an empty rule: give a network (192.168.1.0/24) or a name".into());
        }
        if let Some((a, len)) = s.split_once('/') {
            let addr: IpAddr = a
                .parse()
                .map_err(|_| format!("{s:?}: not a network (e.g. 192.168.1.0/24)"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length is 0 to {max}"))?;
            return Ok(Rule::Net(addr, len));
        }
        if let Ok(addr) = s.parse::<IpAddr>() {
            let len = if addr.is_ipv4() { 32 } else { 128 };
            return Ok(Rule::Net(addr, len));
        }
        Ok(Rule::Name(s.to_lowercase()))
    }
}

impl Rule {
    fn matches(&self, names: &[&str], addr: IpAddr) -> bool {
        match self {
            Rule::Net(net, len) => in_net(addr, *net, *len),
            Rule::Name(n) => names.iter().any(|x| x.to_lowercase() == *n),
        }
    }
}

fn in_net(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Which found devices become resources: all (no allow rule) or those an
/// allow rule names, never one a deny rule names.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// `--discover-allow`.
    pub allow: Vec<Rule>,
    /// `--discover-deny`.
    pub deny: Vec<Rule>,
}

impl Policy {
    /// Whether a device called `names` at `addr` may be exported.
    pub fn admits(&self, names: &[&str], addr: IpAddr) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|r| r.matches(names, addr)))
            && !self.deny.iter().any(|r| r.matches(names, addr))
    }
}

/// One service instance resolved on the LAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// The instance name ("HP LaserJet 400 [A1B2C3]").
    pub instance: String,
    /// The address it is reached at.
    pub addr: IpAddr,
    /// Its port.
    pub port: u16,
    /// TCP, or UDP (SNMP's 161).
    pub proto: Proto,
    /// What the port carries, where the agent rewrites it.
    pub app: Option<App>,
    /// What identifies the device beyond its address, for its key
    /// (`dnssd:NAME`, `snmp:SERIAL`).
    pub device: String,
}

/// A resource name (a DNS label) for an instance name: lower case, runs
/// of other characters as one '-', at most 63 characters; `fallback`
/// when nothing is left.
pub fn label(instance: &str, fallback: &str) -> String {
    let mut out = String::new();
    for c in instance.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let mut out: String = out.trim_matches('-').chars().take(63).collect();
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        fallback.to_string()
    } else {
        out
    }
}

/// Most devices discovery exports: a LAN that announces more (or a
/// hostile host announcing thousands) costs no more than this.
pub const MAX_DEVICES: usize = 256;

/// The devices found so far, one per address, and the spec each becomes.
#[derive(Default)]
pub struct Devices {
    by_addr: BTreeMap<IpAddr, ExportSpec>,
}

impl Devices {
    /// Adds `i` under the policy; the device's spec when it is new or
    /// gained a port (to announce), None when nothing changed or the
    /// policy refuses it. `taken` says whether a name is another
    /// resource's already.
    pub fn add(
        &mut self,
        i: &Instance,
        policy: &Policy,
        taken: impl Fn(&str) -> bool,
    ) -> Option<ExportSpec> {
        let fallback = match i.addr {
            IpAddr::V4(a) => format!("printer-{}", a.octets()[3]),
            IpAddr::V6(a) => format!("printer-{:x}", a.segments()[7]),
        };
        if let Some(spec) = self.by_addr.get_mut(&i.addr) {
            let new_port = !spec.ports.contains(&(i.port, i.proto));
            // IPPS often shares IPP's port: whichever comes first, the
            // port is IPP's (TLS on it passes the rewrite unchanged).
            let new_app = i.app.is_some_and(|a| spec.app(i.port) != Some(a));
            if !new_port && !new_app {
                return None;
            }
            if new_port {
                spec.ports.push((i.port, i.proto));
            }
            mark(spec, i.port, i.app);
            return Some(spec.clone());
        }
        if self.by_addr.len() >= MAX_DEVICES {
            tracing::warn!(instance = %i.instance, addr = %i.addr, "discovered, but {MAX_DEVICES} devices are exported already; narrow --discover-allow");
            return None;
        }
        let base = label(&i.instance, &fallback);
        if !policy.admits(&[&i.instance, &base], i.addr) {
            tracing::info!(instance = %i.instance, addr = %i.addr, "discovered, but the policy leaves it out");
            return None;
        }
        let mut name = base.clone();
        let mut n = 2;
        while taken(&name) || self.by_addr.values().any(|s| s.name == name) {
            let suffix = format!("-{n}");
            name = format!("{}{suffix}", &base[..base.len().min(63 - suffix.len())]);
            n += 1;
        }
        let mut spec = ExportSpec {
            name,
            host: i.addr.to_string(),
            ports: vec![(i.port, i.proto)],
            marked: Vec::new(),
        };
        mark(&mut spec, i.port, i.app);
        self.by_addr.insert(i.addr, spec.clone());
        Some(spec)
    }
}

/// Marks `port` of `spec` as `app` where that is not its protocol anyway.
fn mark(spec: &mut ExportSpec, port: u16, app: Option<App>) {
    let Some(app) = app else {
        return;
    };
    spec.marked.retain(|(p, _)| *p != port);
    if default_app(port) != Some(app) {
        spec.marked.push((port, app));
    }
}

/// The browsing: mDNS-SD's daemon and the instances it resolves.
pub struct Discovery {
    found: Receiver<Instance>,
    daemon: mdns_sd::ServiceDaemon,
}

impl Discovery {
    /// Starts browsing every printer service type; `waker` wakes the
    /// loop when an instance is resolved.
    pub fn start(waker: Arc<Waker>) -> Result<Self, String> {
        let daemon = mdns_sd::ServiceDaemon::new()
            .map_err(|e| format!("cannot start mDNS discovery: {e}"))?;
        let (tx, found) = channel();
        {
            let (tx, waker) = (tx.clone(), waker.clone());
            std::thread::Builder::new()
                .name("discover-snmp".into())
                .spawn(move || snmp_rounds(tx, waker))
                .map_err(|e| format!("cannot start the SNMP discovery thread: {e}"))?;
        }
        for s in &SERVICES {
            let rx = daemon
                .browse(s.ty)
                .map_err(|e| format!("cannot browse {}: {e}", s.ty))?;
            let (tx, waker, app) = (tx.clone(), waker.clone(), s.app);
            std::thread::Builder::new()
                .name("discover".into())
                .spawn(move || forward(rx, tx, waker, app))
                .map_err(|e| format!("cannot start a discovery thread: {e}"))?;
        }
        Ok(Self { found, daemon })
    }

    /// The instances resolved since the last call.
    pub fn poll(&self) -> Vec<Instance> {
        self.found.try_iter().collect()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

/// One service type's events, as instances, to the loop.
fn forward(
    rx: mdns_sd::Receiver<mdns_sd::ServiceEvent>,
    tx: Sender<Instance>,
    waker: Arc<Waker>,
    app: Option<App>,
) {
    while let Ok(ev) = rx.recv() {
        let mdns_sd::ServiceEvent::ServiceResolved(r) = ev else {
            continue;
        };
        // IPv4 first: what a printer's own web page and the guest use. A
        // link-local IPv6 address is no use without its interface: left
        // out (an answer with only that is taken when a fuller one comes).
        let mut addrs: Vec<IpAddr> = r
            .get_addresses()
            .iter()
            .map(|a| a.to_ip_addr())
            .filter(|a| !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect();
        addrs.sort_by_key(|a| (a.is_ipv6(), *a));
        let Some(addr) = addrs.first().copied() else {
            continue;
        };
        if r.get_port() == 0 {
            continue;
        }
        let instance = r
            .get_fullname()
            .strip_suffix(r.ty_domain.as_str())
            .unwrap_or(r.get_fullname())
            .trim_end_matches('.')
            .to_string();
        let i = Instance {
            device: format!("dnssd:{instance}"),
            instance,
            addr,
            port: r.get_port(),
            proto: Proto::Tcp,
            app,
        };
        if tx.send(i).is_err() {
            return;
        }
        waker.wake();
    }
}

/// Asks every LAN by SNMP, at start and every [`SNMP_EVERY`], while the
/// loop listens.
fn snmp_rounds(tx: Sender<Instance>, waker: Arc<Waker>) {
    let mut req_id: i32 = 1;
    loop {
        let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        for bcast in broadcasts(&route) {
            req_id = req_id.wrapping_add(1);
            for i in snmp_round(bcast, req_id) {
                if tx.send(i).is_err() {
                    return;
                }
                waker.wake();
            }
        }
        std::thread::sleep(SNMP_EVERY);
    }
}

/// The broadcast address of each on-link IPv4 route of `/proc/net/route`
/// (no loopback, no host routes).
fn broadcasts(route_text: &str) -> Vec<std::net::Ipv4Addr> {
    let mut out = Vec::new();
    for r in crate::key::routes(route_text) {
        if r.gateway != 0 || r.mask == 0 || r.mask == u32::MAX {
            continue;
        }
        let b = std::net::Ipv4Addr::from(r.dest | !r.mask);
        if !b.is_loopback() && !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

/// One SNMP GET to `bcast`, and the printers that answer within
/// [`SNMP_WAIT`].
fn snmp_round(bcast: std::net::Ipv4Addr, req_id: i32) -> Vec<Instance> {
    let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return Vec::new();
    };
    if sock.set_broadcast(true).is_err() {
        return Vec::new();
    }
    let req = get_request(req_id, &[OID_DEVICE_TYPE, OID_SYS_NAME, OID_SERIAL]);
    if let Err(e) = sock.send_to(&req, (bcast, 161)) {
        tracing::debug!(%bcast, "SNMP discovery: cannot send: {e}");
        return Vec::new();
    }
    let deadline = Instant::now() + SNMP_WAIT;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            break;
        };
        match printer_answer(&buf[..n], req_id) {
            Some(p) => found.push((from.ip(), p)),
            None => tracing::debug!(%from, "SNMP discovery: an answer that is not a printer's"),
        }
    }
    tracing::debug!(%bcast, printers = found.len(), "SNMP discovery round");
    let mut out = Vec::new();
    for (addr, (name, serial)) in found {
        let fallback = format!("printer-{addr}");
        let name = name.unwrap_or(fallback);
        let device = match &serial {
            Some(s) => format!("snmp:{s}"),
            None => format!("snmp-name:{name}"),
        };
        let mut add = |port: u16, proto: Proto, app: Option<App>| {
            out.push(Instance {
                instance: name.clone(),
                addr,
                port,
                proto,
                app,
                device: device.clone(),
            })
        };
        add(9100, Proto::Tcp, None);
        add(161, Proto::Udp, None);
        // IPP and LPD where they take a connection.
        for (port, app) in [(631, Some(App::Ipp)), (515, None)] {
            let to = std::net::SocketAddr::new(addr, port);
            if std::net::TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_ok() {
                add(port, Proto::Tcp, app);
            }
        }
    }
    out
}

/// An SNMPv2c GET of `oids`, community `public` (BER; lengths stay short).
fn get_request(req_id: i32, oids: &[&[u32]]) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if body.len() < 128 {
            v.push(body.len() as u8);
        } else {
            v.push(0x82);
            v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }
    fn int(i: i32) -> Vec<u8> {
        tlv(0x02, &i.to_be_bytes())
    }
    fn oid(arcs: &[u32]) -> Vec<u8> {
        let mut b = vec![(arcs[0] * 40 + arcs[1]) as u8];
        for &a in &arcs[2..] {
            let mut chunk = vec![(a & 0x7f) as u8];
            let mut v = a >> 7;
            while v > 0 {
                chunk.push((v & 0x7f) as u8 | 0x80);
                v >>= 7;
            }
            chunk.reverse();
            b.extend(chunk);
        }
        tlv(0x06, &b)
    }
    let mut binds = Vec::new();
    for o in oids {
        let mut vb = oid(o);
        vb.extend(tlv(0x05, &[]));
        binds.extend(tlv(0x30, &vb));
    }
    let mut pdu = int(req_id);
    pdu.extend(int(0));
    pdu.extend(int(0));
    pdu.extend(tlv(0x30, &binds));
    let mut msg = int(1); // SNMPv2c
    msg.extend(tlv(0x04, b"public"));
    msg.extend(tlv(0xa0, &pdu));
    tlv(0x30, &msg)
}

/// A printer's answer to our GET `req_id`: its sysName and serial, if
/// it says its first device is a printer.
fn printer_answer(bytes: &[u8], req_id: i32) -> Option<(Option<String>, Option<String>)> {
    let pdu = snmp2::Pdu::from_bytes(bytes).ok()?;
    if pdu.message_type != snmp2::MessageType::Response || pdu.req_id != req_id {
        return None;
    }
    let text = |v: &snmp2::Value| match v {
        snmp2::Value::OctetString(s) => {
            let t = String::from_utf8_lossy(s).trim().to_string();
            (!t.is_empty()).then_some(t)
        }
        _ => None,
    };
    let (mut printer, mut name, mut serial) = (false, None, None);
    for (oid, value) in pdu.varbinds {
        let id = oid.to_id_string();
        match id.as_str() {
            "1.3.6.1.2.1.25.3.2.1.2.1" => {
                printer = matches!(&value, snmp2::Value::ObjectIdentifier(o) if o.to_id_string() == HR_DEVICE_PRINTER);
            }
            "1.3.6.1.2.1.1.5.0" => name = text(&value),
            "1.3.6.1.2.1.43.5.1.1.17.1" => serial = text(&value),
            _ => {}
        }
    }
    printer.then_some((name, serial))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, addr: &str, port: u16, app: Option<App>) -> Instance {
        Instance {
            instance: name.into(),
            addr: addr.parse().unwrap(),
            port,
            proto: Proto::Tcp,
            app,
            device: format!("dnssd:{name}"),
        }
    }

    #[test]
    fn an_snmp_get_is_what_snmpd_takes_and_a_printers_answer_is_read() {
        let req = get_request(7, &[OID_DEVICE_TYPE, OID_SYS_NAME, OID_SERIAL]);
        // Our request parses as one (the crate reads requests too).
        let pdu = snmp2::Pdu::from_bytes(&req).unwrap();
        assert_eq!(pdu.message_type, snmp2::MessageType::GetRequest);
        assert_eq!(pdu.req_id, 7);
        let ids: Vec<String> = pdu.varbinds.map(|(o, _)| o.to_id_string()).collect();
        assert_eq!(
            ids,
            [
                "1.3.6.1.2.1.25.3.2.1.2.1",
                "1.3.6.1.2.1.1.5.0",
                "1.3.6.1.2.1.43.5.1.1.17.1"
            ]
        );
        // Not an answer, or another request's: nothing.
        assert_eq!(printer_answer(&req, 7), None);
        assert_eq!(printer_answer(b"\x30\x03\x02\x01", 7), None);
        assert_eq!(printer_answer(&[], 7), None);
    }

    /// A printer's GetResponse to request `req_id` (BER, short lengths):
    /// `hrDeviceType.1` = `device`, `sysName.0` and the serial as strings.
    fn response(req_id: i32, device: &[u32], name: &str, serial: &str) -> Vec<u8> {
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut v = vec![tag, body.len() as u8];
            v.extend_from_slice(body);
            v
        }
        let oid = |arcs: &[u32]| {
            let mut b = vec![(arcs[0] * 40 + arcs[1]) as u8];
            b.extend(arcs[2..].iter().map(|a| *a as u8));
            tlv(0x06, &b)
        };
        let bind = |o: &[u32], v: Vec<u8>| {
            let mut b = oid(o);
            b.extend(v);
            tlv(0x30, &b)
        };
        let mut binds = bind(OID_DEVICE_TYPE, oid(device));
        binds.extend(bind(OID_SYS_NAME, tlv(0x04, name.as_bytes())));
        binds.extend(bind(OID_SERIAL, tlv(0x04, serial.as_bytes())));
        let mut pdu = tlv(0x02, &req_id.to_be_bytes());
        pdu.extend(tlv(0x02, &[0]));
        pdu.extend(tlv(0x02, &[0]));
        pdu.extend(tlv(0x30, &binds));
        let mut msg = tlv(0x02, &[1]);
        msg.extend(tlv(0x04, b"public"));
        msg.extend(tlv(0xa2, &pdu));
        tlv(0x30, &msg)
    }

    #[test]
    fn a_printers_answer_gives_its_name_and_serial_and_others_are_left_out() {
        let printer = [1, 3, 6, 1, 2, 1, 25, 3, 1, 5];
        let r = response(9, &printer, "office-printer", "SN12345");
        assert_eq!(
            printer_answer(&r, 9),
            Some((Some("office-printer".into()), Some("SN12345".into())))
        );
        assert_eq!(printer_answer(&r, 10), None, "another request's");
        let router = [1, 3, 6, 1, 2, 1, 25, 3, 1, 4];
        assert_eq!(printer_answer(&response(9, &router, "gw", ""), 9), None);
        let r = response(9, &printer, " ", "");
        assert_eq!(printer_answer(&r, 9), Some((None, None)), "blank names");
        // Every cut of an answer is no answer, and never a panic.
        let r = response(9, &printer, "office-printer", "SN12345");
        for cut in 0..r.len() {
            let _ = printer_answer(&r[..cut], 9);
        }
    }

    #[test]
    fn broadcasts_are_those_of_the_lans() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
            lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(
                broadcasts(route),
                vec![std::net::Ipv4Addr::new(192, 168, 1, 255)]
            );
        }
        assert!(broadcasts("").is_empty());
    }

    #[test]
    fn instance_names_become_dns_labels() {
        assert_eq!(
            label("HP LaserJet 400 [A1B2C3]", "x"),
            "hp-laserjet-400-a1b2c3"
        );
        assert_eq!(label("laser", "x"), "laser");
        assert_eq!(label("Büro Drucker", "x"), "b-ro-drucker");
        assert_eq!(label("***", "printer-7"), "printer-7");
        let long = label(&"a-".repeat(100), "x");
        assert!(long.len() <= 63 && !long.ends_with('-'), "{long}");
    }

    #[test]
    fn one_device_per_address_gathers_its_services_ports() {
        let mut d = Devices::default();
        let p = Policy::default();
        let s = d
            .add(&inst("Laser", "10.0.0.5", 631, Some(App::Ipp)), &p, |_| {
                false
            })
            .unwrap();
        assert_eq!((s.name.as_str(), s.host.as_str()), ("laser", "10.0.0.5"));
        assert_eq!(s.app(631), Some(App::Ipp));
        // Its raw port: the same device, one more port, announced again.
        let s = d
            .add(&inst("Laser", "10.0.0.5", 9100, None), &p, |_| false)
            .unwrap();
        assert_eq!(s.ports, vec![(631, Proto::Tcp), (9100, Proto::Tcp)]);
        assert_eq!(
            d.add(&inst("Laser", "10.0.0.5", 9100, None), &p, |_| false),
            None,
            "nothing new"
        );
        // Another device with the same instance name gets another name;
        // so does one whose name a user's --export has.
        let s = d
            .add(&inst("Laser", "10.0.0.6", 631, None), &p, |_| false)
            .unwrap();
        assert_eq!(s.name, "laser-2");
        let s = d
            .add(&inst("plotter", "10.0.0.7", 9100, None), &p, |n| {
                n == "plotter"
            })
            .unwrap();
        assert_eq!(s.name, "plotter-2");
        // IPPS found first on IPP's port: IPP's mark comes with IPP.
        assert!(
            d.add(&inst("office", "10.0.0.8", 8631, None), &p, |_| false)
                .is_some()
        );
        let s = d
            .add(
                &inst("office", "10.0.0.8", 8631, Some(App::Ipp)),
                &p,
                |_| false,
            )
            .unwrap();
        assert_eq!(s.to_string(), "10.0.0.8:8631/ipp");
        // IPP on a port of its own is marked, so Host is rewritten there.
        let s = d
            .add(&inst("annex", "10.0.0.9", 8631, Some(App::Ipp)), &p, |_| {
                false
            })
            .unwrap();
        assert_eq!(s.to_string(), "10.0.0.9:8631/ipp");
    }

    #[test]
    fn the_policy_admits_what_allow_names_and_never_what_deny_names() {
        let rules = |v: &[&str]| v.iter().map(|s| s.parse::<Rule>().unwrap()).collect();
        let a: IpAddr = "192.168.1.20".parse().unwrap();
        let b: IpAddr = "10.0.0.5".parse().unwrap();
        let all = Policy::default();
        assert!(all.admits(&["x"], a) && all.admits(&["x"], b));
        let lan = Policy {
            allow: rules(&["192.168.1.0/24"]),
            deny: rules(&["Boss Printer"]),
        };
        assert!(lan.admits(&["laser"], a));
        assert!(!lan.admits(&["laser"], b), "outside the allowed network");
        assert!(
            !lan.admits(&["boss printer", "boss-printer"], a),
            "denied by name"
        );
        let one = Policy {
            allow: rules(&["laser", "10.0.0.5"]),
            deny: vec![],
        };
        assert!(one.admits(&["LASER"], a) && one.admits(&["other"], b));
        assert!(!one.admits(&["other"], a));
        let mut d = Devices::default();
        assert_eq!(
            d.add(&inst("other", "192.168.1.20", 631, None), &one, |_| false),
            None
        );
        for bad in ["", "10.0.0.0/33", "zz/8", "fd00::/129"] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
        assert_eq!(
            "fd00::/8".parse::<Rule>().unwrap(),
            Rule::Net("fd00::".parse().unwrap(), 8)
        );
    }
}
