//! Command-line values that come from an operator or a config file:
//! `--export NAME=HOST[:PORTS]` (`ExportSpec`), `--subnet` (`Ipv4Subnet`),
//! `--prefix6` (`Ipv6Prefix`) and `--compression` (`Compression`), all via
//! `FromStr`; and the vIP a parsed name gets in a parsed subnet
//! (`vip::allocate`). Asserts: never a panic; every parsed value keeps its
//! type's invariants (names 1-63 lower-case letters, digits or '-'; ports
//! non-zero and unique; subnets /8-/24 with host bits clear; a vIP inside
//! the subnet, past the reserved block, not the broadcast nor the engine's
//! vDNS or DHCP pool), and its Display parses back to the same value (for
//! an export, `NAME=` + Display).
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_shared::export::ExportSpec;
use netredir_shared::session::Compression;
use netredir_shared::subnet::{Ipv4Subnet, Ipv6Prefix};
use netredir_shared::vip;
use std::net::Ipv4Addr;

fn check_export(s: &str) -> Option<ExportSpec> {
    let e = s.parse::<ExportSpec>().ok()?;
    assert!((1..=63).contains(&e.name.len()), "{e:?}");
    assert!(!e.name.starts_with('-'), "{e:?}");
    assert!(
        e.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "{e:?}: name not lower-case DNS label"
    );
    assert!(!e.host.is_empty(), "{e:?}: empty host");
    assert!(!e.ports.is_empty(), "{e:?}: no ports");
    for (i, p) in e.ports.iter().enumerate() {
        assert_ne!(p.0, 0, "{e:?}: port 0");
        assert!(!e.ports[..i].contains(p), "{e:?}: duplicate port");
        assert!(e.allows(p.0, p.1));
    }
    let shown = format!("{}={e}", e.name);
    match shown.parse::<ExportSpec>() {
        Ok(again) => assert_eq!(again, e, "{s:?} -> {shown:?} -> another value"),
        Err(err) => panic!("{s:?} parsed to {e:?}, whose Display {shown:?} does not parse: {err}"),
    }
    Some(e)
}

fn check_subnet(s: &str) -> Option<Ipv4Subnet> {
    let n = s.parse::<Ipv4Subnet>().ok()?;
    assert!((8..=24).contains(&n.prefix_len()), "{n:?}");
    assert!(n.contains(n.network()));
    assert_eq!(u32::from(n.network()) & !n.mask(), 0, "{n:?}: host bits");
    assert!(n.contains(n.gateway()));
    assert_eq!(n.to_string().parse::<Ipv4Subnet>().ok(), Some(n), "{s:?}");
    Some(n)
}

fn check_prefix6(s: &str) {
    let Ok(p) = s.parse::<Ipv6Prefix>() else {
        return;
    };
    assert_eq!(u128::from(p.network()) & u128::from(u64::MAX), 0, "{p:?}");
    assert_eq!(p.to_string().parse::<Ipv6Prefix>().ok(), Some(p), "{s:?}");
}

fn check_compression(s: &str) {
    let Ok(c) = s.parse::<Compression>() else {
        return;
    };
    assert_eq!(c.to_string().parse::<Compression>().ok(), Some(c), "{s:?}");
}

fn check_vip(subnet: &Ipv4Subnet, name: &str) {
    let check = |ip: Ipv4Addr| {
        assert!(subnet.contains(ip), "{ip} outside {subnet}");
        let off = u32::from(ip) - u32::from(subnet.network());
        assert!(
            off >= vip::reserved(subnet),
            "{ip}: reserved block of {subnet}"
        );
        assert_ne!(off, subnet.size() - 1, "{ip}: broadcast of {subnet}");
        assert!(
            !vip::ENGINE_OFFSETS.iter().any(|r| r.contains(&off)),
            "{ip}: the engine's own (vDNS or DHCP pool) in {subnet}"
        );
    };
    let first = vip::allocate(subnet, name, |_| false).expect("an empty subnet has room");
    check(first);
    assert_eq!(
        vip::allocate(subnet, name, |_| false),
        Some(first),
        "not stable"
    );
    // A collision probes to another address.
    let second = vip::allocate(subnet, name, |ip| ip == first).expect("room for two");
    check(second);
    assert_ne!(second, first);
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let export = check_export(s);
    let subnet = check_subnet(s);
    check_prefix6(s);
    check_compression(s);
    // The input as "EXPORT|SUBNET" too, so both can parse at once.
    let mut subnet = subnet;
    let mut export = export;
    if let Some((a, b)) = s.split_once('|') {
        export = export.or_else(|| check_export(a));
        subnet = subnet.or_else(|| check_subnet(b));
        check_prefix6(b);
        check_compression(b);
    }
    let subnet = subnet.unwrap_or_else(|| "100.77.0.0/16".parse().expect("default"));
    let name = export.map_or_else(|| s.to_owned(), |e| e.name);
    check_vip(&subnet, &name);
});
