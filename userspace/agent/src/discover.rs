//! `--discover printers`: the printers on the user's LAN become resources
//! without an `--export` each, under the user's policy
//! (`--discover-allow`, `--discover-deny`).
//!
//! DNS-SD over mDNS (the `mdns-sd` crate, its own thread and sockets):
//! the agent browses the printer and scanner service types, and each
//! resolved instance is merged into one device per address, with the
//! ports its services offer (IPP marked so the agent rewrites its `Host`,
//! eSCL as HTTP). The loop takes what was found with [`Discovery::poll`];
//! the browsing thread wakes it. What is decided here (names, ports,
//! policy) is plain functions, tested without a network.

use netredir_shared::export::{App, ExportSpec, default_app};
use netredir_shared::wire::Proto;
use netredir_uring::Waker;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

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
    /// What the port carries, where the agent rewrites it.
    pub app: Option<App>,
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
            let new_port = !spec.ports.contains(&(i.port, Proto::Tcp));
            // IPPS often shares IPP's port: whichever comes first, the
            // port is IPP's (TLS on it passes the rewrite unchanged).
            let new_app = i.app.is_some_and(|a| spec.app(i.port) != Some(a));
            if !new_port && !new_app {
                return None;
            }
            if new_port {
                spec.ports.push((i.port, Proto::Tcp));
            }
            mark(spec, i.port, i.app);
            return Some(spec.clone());
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
            ports: vec![(i.port, Proto::Tcp)],
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
        // IPv4 first: what a printer's own web page and the guest use.
        let mut addrs: Vec<IpAddr> = r.get_addresses().iter().map(|a| a.to_ip_addr()).collect();
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
            instance,
            addr,
            port: r.get_port(),
            app,
        };
        if tx.send(i).is_err() {
            return;
        }
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, addr: &str, port: u16, app: Option<App>) -> Instance {
        Instance {
            instance: name.into(),
            addr: addr.parse().unwrap(),
            port,
            app,
        }
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
