//! Virtual IPs: the one place that decides which address a resource gets.
//!
//! For now a vIP is a hash of the resource name into the subnet's host
//! range, probing forward on collision, so the same name on the same subnet
//! gets the same address on every run and every host. The low /24-sized
//! block (`.0.0`-`.0.255` of a /16) is kept for the engine itself (gateway,
//! DNS, DHCP pool) and never handed out; in smaller subnets the vDNS and
//! DHCP pool offsets are skipped one by one.

use crate::subnet::Ipv4Subnet;
use std::net::Ipv4Addr;

/// Addresses at the start of the subnet kept for infrastructure.
pub fn reserved(subnet: &Ipv4Subnet) -> u32 {
    (subnet.size() / 256).clamp(4, 256)
}

/// Offsets the engine uses whatever the subnet's size: the vDNS (`.53`)
/// and the DHCP pool (`.100`-`.250`); a vIP there would be shadowed.
pub const ENGINE_OFFSETS: [std::ops::RangeInclusive<u32>; 2] = [53..=53, 100..=250];

/// Whether offset `n` of `subnet` may be a vIP.
fn usable(subnet: &Ipv4Subnet, n: u32) -> bool {
    n >= reserved(subnet) && n < subnet.size() - 1 && !ENGINE_OFFSETS.iter().any(|r| r.contains(&n))
}

/// The vIP of `name` in `subnet`, skipping addresses `taken` says are used.
///
/// Returns `None` only when every usable address is taken.
pub fn allocate(
    subnet: &Ipv4Subnet,
    name: &str,
    taken: impl Fn(Ipv4Addr) -> bool,
) -> Option<Ipv4Addr> {
    // Offsets reserved .. size-1 (the last address is broadcast), less
    // the engine's own.
    let reserved = reserved(subnet);
    let span = u64::from(subnet.size() - reserved - 1);
    let start = fnv1a(name.as_bytes()) % span;
    (0..span)
        .map(|i| reserved + ((start + i) % span) as u32)
        .filter(|n| usable(subnet, *n))
        .map(|n| subnet.nth(n))
        .find(|ip| !taken(*ip))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn same_name_same_vip_and_never_reserved() {
        let s: Ipv4Subnet = "100.77.0.0/16".parse().unwrap();
        let a = allocate(&s, "printer", |_| false).unwrap();
        assert_eq!(a, allocate(&s, "printer", |_| false).unwrap());
        assert_ne!(a, allocate(&s, "scanner", |_| false).unwrap());
        assert!(s.contains(a));
        assert!(u32::from(a) - u32::from(s.network()) >= reserved(&s));
    }

    #[test]
    fn collisions_probe_and_a_full_subnet_says_so() {
        let s: Ipv4Subnet = "10.9.8.0/24".parse().unwrap();
        let mut taken = HashSet::new();
        let n = (0..256).filter(|n| usable(&s, *n)).count();
        assert_eq!(n, 256 - 4 - 1 - 1 - 151);
        for i in 0..n {
            let ip = allocate(&s, &format!("r{i}"), |ip| taken.contains(&ip)).unwrap();
            assert!(taken.insert(ip), "{ip} handed out twice");
            assert_ne!(ip, Ipv4Addr::new(10, 9, 8, 255), "broadcast");
            let off = ip.octets()[3];
            assert!(
                off != 53 && !(100..=250).contains(&off),
                "{ip}: the engine's"
            );
        }
        assert_eq!(allocate(&s, "one-more", |ip| taken.contains(&ip)), None);
    }
}
