//! What identifies a resource across runs, whatever it is called: the
//! client network it is on and the device. The host keeps each VM's vIPs
//! by this key, so the same printer on the same network keeps its address
//! on every run, a renamed export keeps it, and a printer called the same
//! on another user's network gets another.
//!
//! The network is the prefix of the route to the resource, with the MAC
//! address of the default gateway when there is one (two home LANs are
//! both `192.168.1.0/24`; their routers differ). Read from the kernel's
//! own tables (`/proc/net/route`, `/proc/net/arp`); the parsing is plain
//! functions, tested with the kernel's text.

use std::net::{IpAddr, Ipv4Addr};

/// One IPv4 route: destination, mask, gateway (0: on link), metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub dest: u32,
    /// Its mask.
    pub mask: u32,
    /// The router it goes through; 0 on the link itself.
    pub gateway: u32,
    /// The kernel takes the lowest.
    pub metric: u32,
}

/// The routes in `/proc/net/route`'s text: each address is the network-
/// order value printed as a native integer in hex.
pub fn routes(text: &str) -> Vec<Route> {
    let addr = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| u32::from(Ipv4Addr::from(v.to_ne_bytes())))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Route {
                dest: addr(f.get(1)?)?,
                gateway: addr(f.get(2)?)?,
                mask: addr(f.get(7)?)?,
                metric: f.get(6)?.parse().ok()?,
            })
        })
        .collect()
}

/// The MAC address `/proc/net/arp`'s text has for `ip`, if complete.
fn mac_of(text: &str, ip: Ipv4Addr) -> Option<String> {
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let complete = f.get(2).is_some_and(|flags| *flags != "0x0");
        (f.first()?.parse::<Ipv4Addr>().ok()? == ip && complete)
            .then(|| f.get(3).map(|m| m.to_lowercase()))
            .flatten()
            .filter(|m| m != "00:00:00:00:00:00")
    })
}

/// The network `addr` is on, from the two tables' text.
fn network(route_text: &str, arp_text: &str, addr: IpAddr) -> String {
    let a = match addr {
        IpAddr::V4(a) => a,
        // IPv6 has no /proc/net/route: the /64 names the network.
        IpAddr::V6(v6) => {
            let s = v6.segments();
            return format!("net6:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]);
        }
    };
    let rs = routes(route_text);
    let a = u32::from(a);
    // The most specific route to it.
    let best = rs
        .iter()
        .filter(|r| a & r.mask == r.dest & r.mask)
        .max_by_key(|r| r.mask.count_ones());
    let prefix = match best {
        Some(r) if r.gateway == 0 => format!(
            "{}/{}",
            Ipv4Addr::from(r.dest & r.mask),
            r.mask.count_ones()
        ),
        // Reached through a router: the router's address names it.
        Some(r) => format!("via {}", Ipv4Addr::from(r.gateway)),
        None => "unrouted".to_string(),
    };
    // The default route the kernel uses: the lowest metric.
    let gateway = rs
        .iter()
        .filter(|r| r.mask == 0 && r.gateway != 0)
        .min_by_key(|r| r.metric)
        .and_then(|r| mac_of(arp_text, Ipv4Addr::from(r.gateway)));
    match gateway {
        Some(mac) => format!("net:{prefix}@{mac}"),
        None => format!("net:{prefix}"),
    }
}

/// The key of the resource `device` (e.g. `host:10.0.0.5`,
/// `dnssd:HP LaserJet`) reached at `addr` (None: not resolved yet, the
/// device alone names it).
pub fn key(addr: Option<IpAddr>, device: &str) -> String {
    let Some(addr) = addr else {
        return device.to_string();
    };
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    format!(
        "{}/{device}",
        network(&read("/proc/net/route"), &read("/proc/net/arp"), addr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
        vpn0\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n";
    const ARP: &str = "IP address       HW type     Flags       HW address            Mask     Device\n\
        192.168.1.1      0x1         0x2         AA:BB:CC:00:11:22     *        eth0\n\
        192.168.1.20     0x1         0x0         00:00:00:00:00:00     *        eth0\n";

    // The sample text is what a little-endian kernel prints.
    #[cfg(target_endian = "little")]
    #[test]
    fn the_kernels_tables_name_the_network() {
        let r = routes(ROUTE);
        assert_eq!(r[1].dest, u32::from(Ipv4Addr::new(192, 168, 1, 0)));
        assert_eq!(r[1].mask, u32::from(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(r[0].gateway, u32::from(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(
            mac_of(ARP, Ipv4Addr::new(192, 168, 1, 1)).as_deref(),
            Some("aa:bb:cc:00:11:22")
        );
        assert_eq!(
            mac_of(ARP, Ipv4Addr::new(192, 168, 1, 20)),
            None,
            "incomplete"
        );
        let printer = "192.168.1.20".parse().unwrap();
        assert_eq!(
            network(ROUTE, ARP, printer),
            "net:192.168.1.0/24@aa:bb:cc:00:11:22"
        );
        // Another LAN with the same prefix behind another router.
        let other = ARP.replace("AA:BB:CC:00:11:22", "02:00:00:00:00:09");
        assert_ne!(
            network(ROUTE, &other, printer),
            network(ROUTE, ARP, printer)
        );
        // Beyond the default route: the router names it.
        assert_eq!(
            network(ROUTE, "", "8.8.8.8".parse().unwrap()),
            "net:via 192.168.1.1"
        );
        assert_eq!(
            network(ROUTE, "", "10.0.0.7".parse().unwrap()),
            "net:10.0.0.0/8"
        );
        assert_eq!(network("", "", printer), "net:unrouted");
        assert_eq!(
            network("", "", "fd00:1:2:3::5".parse().unwrap()),
            "net6:fd00:1:2:3::/64"
        );
        assert_eq!(key(None, "host:printer.lan"), "host:printer.lan");
    }
}
