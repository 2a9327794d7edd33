//! The virtual subnet's prefixes, as `--subnet 100.77.0.0/16` and
//! `--prefix6 fd6e:7264::/64` take them.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The virtual subnet's default: shared address space (RFC 6598), rarely
/// used on client LANs.
pub const DEFAULT_SUBNET: &str = "100.77.0.0/16";

/// The IPv6 prefix's default: a ULA /64, the same on every host so that
/// IPv6 vIPs are as stable as IPv4 ones.
pub const DEFAULT_PREFIX6: &str = "fd6e:7264::/64";

/// An IPv4 prefix with its host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Why a prefix string was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// Not of the form A.B.C.D/N.
    #[error("{0:?} is not an IPv4 prefix like 100.77.0.0/16")]
    Syntax(String),
    /// The prefix is too long to hold the gateway and any vIP.
    #[error("prefix length /{0} leaves no room for virtual IPs (use /8 to /24)")]
    TooSmall(u8),
    /// Host bits are set (a typo more often than intent).
    #[error("{0} has host bits set; did you mean {1}?")]
    HostBits(String, String),
    /// Not an IPv6 /64 (SLAAC needs exactly 64 bits of prefix).
    #[error("{0:?} is not an IPv6 /64 like fd6e:7264::/64 (SLAAC needs a /64)")]
    Not64(String),
}

/// An IPv6 /64 with its host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv6Prefix(Ipv6Addr);

impl Ipv6Prefix {
    /// The prefix as an address (host bits zero).
    pub fn network(&self) -> Ipv6Addr {
        self.0
    }
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/64", self.0)
    }
}

impl FromStr for Ipv6Prefix {
    type Err = SubnetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SubnetError::Not64(s.into());
        let (a, n) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv6Addr = a.parse().map_err(|_| bad())?;
        if n != "64" {
            return Err(bad());
        }
        let masked = Ipv6Addr::from(u128::from(ip) & !u128::from(u64::MAX));
        if masked != ip {
            return Err(SubnetError::HostBits(s.into(), format!("{masked}/64")));
        }
        Ok(Self(ip))
    }
}

impl Ipv4Subnet {
    /// Builds a prefix, checking what [`FromStr`] checks.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, SubnetError> {
        if !(8..=24).contains(&prefix_len) {
            return Err(SubnetError::TooSmall(prefix_len));
        }
        let s = Self {
            network,
            prefix_len,
        };
        let masked = Ipv4Addr::from(u32::from(network) & s.mask());
        if masked != network {
            return Err(SubnetError::HostBits(
                format!("{network}/{prefix_len}"),
                format!("{masked}/{prefix_len}"),
            ));
        }
        Ok(s)
    }
    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }
    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
    /// The netmask as a host-order integer.
    pub fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix_len)
    }
    /// Number of addresses in the prefix.
    pub fn size(&self) -> u32 {
        1u32 << (32 - self.prefix_len)
    }
    /// Whether `ip` lies in the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }
    /// The address at `offset` from the network address.
    pub fn nth(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + (offset % self.size()))
    }
    /// The engine's own address in the subnet (the first host).
    pub fn gateway(&self) -> Ipv4Addr {
        self.nth(1)
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = SubnetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, n) = s
            .split_once('/')
            .ok_or_else(|| SubnetError::Syntax(s.into()))?;
        let ip: Ipv4Addr = a.parse().map_err(|_| SubnetError::Syntax(s.into()))?;
        let n: u8 = n.parse().map_err(|_| SubnetError::Syntax(s.into()))?;
        if n > 32 {
            return Err(SubnetError::Syntax(s.into()));
        }
        Self::new(ip, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_default_and_rejects_nonsense() {
        let s: Ipv4Subnet = DEFAULT_SUBNET.parse().unwrap();
        assert_eq!(s.size(), 65536);
        assert!(s.contains("100.77.200.1".parse().unwrap()));
        assert!(!s.contains("100.78.0.1".parse().unwrap()));
        assert_eq!(s.gateway(), Ipv4Addr::new(100, 77, 0, 1));
        assert!(matches!(
            "100.77.0.1/16".parse::<Ipv4Subnet>(),
            Err(SubnetError::HostBits(..))
        ));
        assert!(matches!(
            "100.77.0.0/30".parse::<Ipv4Subnet>(),
            Err(SubnetError::TooSmall(30))
        ));
        assert!(matches!(
            "bogus".parse::<Ipv4Subnet>(),
            Err(SubnetError::Syntax(_))
        ));
        assert!(matches!(
            "1.2.3.4/99".parse::<Ipv4Subnet>(),
            Err(SubnetError::Syntax(_))
        ));
    }

    #[test]
    fn ipv6_prefixes_must_be_a_clean_64() {
        let p: Ipv6Prefix = DEFAULT_PREFIX6.parse().unwrap();
        assert_eq!(p.to_string(), DEFAULT_PREFIX6);
        assert!(matches!(
            "fd00::/48".parse::<Ipv6Prefix>(),
            Err(SubnetError::Not64(_))
        ));
        assert!(matches!(
            "fd00::1/64".parse::<Ipv6Prefix>(),
            Err(SubnetError::HostBits(..))
        ));
        assert!(matches!(
            "100.77.0.0/64".parse::<Ipv6Prefix>(),
            Err(SubnetError::Not64(_))
        ));
    }
}
