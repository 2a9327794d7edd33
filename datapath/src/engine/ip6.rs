//! IPv6 toward the guest: neighbour discovery for the engine's addresses
//! and every IPv6 vIP, router advertisements on a dedicated NIC (SLAAC in
//! the /64, the vDNS by RDNSS, the zone by DNSSL, no default route), echo,
//! and TCP/UDP handed to the same paths as IPv4.

use super::udp::PendingEcho;
use super::*;
use smoltcp::wire::{
    Icmpv6Packet, Icmpv6Repr, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscPrefixInfoFlags,
    NdiscPrefixInformation, NdiscRepr, NdiscRouterFlags, RawHardwareAddress,
};

/// Unsolicited router advertisements on a dedicated NIC come this often
/// (a guest that missed the answer to its solicitation still configures).
pub const RA_INTERVAL: Duration = Duration::from_secs(60);
/// Valid lifetime of the prefix and of the RDNSS/DNSSL options.
const RA_VALID_SECS: u32 = 3600;
/// Preferred lifetime of the prefix.
const RA_PREFERRED_SECS: u32 = 1800;
/// RDNSS option type (RFC 8106).
const OPT_RDNSS: u8 = 25;
/// DNSSL option type (RFC 8106).
const OPT_DNSSL: u8 = 31;

/// The all-nodes multicast address.
pub(super) const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

fn checksums() -> smoltcp::phy::ChecksumCapabilities {
    smoltcp::phy::ChecksumCapabilities::default()
}

impl Engine {
    /// The engine's link-local address, from its MAC (EUI-64): routers
    /// advertise from one.
    pub fn link_local(&self) -> Ipv6Addr {
        let m = self.cfg.mac;
        Ipv6Addr::new(
            0xfe80,
            0,
            0,
            0,
            u16::from_be_bytes([m[0] ^ 2, m[1]]),
            u16::from_be_bytes([m[2], 0xff]),
            u16::from_be_bytes([0xfe, m[3]]),
            u16::from_be_bytes([m[4], m[5]]),
        )
    }

    pub(super) fn handle_ipv6(&mut self, payload: &[u8], now: Instant) {
        let Ok(ip) = Ipv6Packet::new_checked(payload) else {
            self.counters.malformed += 1;
            return;
        };
        if ip.version() != 6 {
            self.counters.malformed += 1;
            return;
        }
        // Trim Ethernet padding: smoltcp wants exactly the IP packet.
        let packet = &payload[..40 + usize::from(ip.payload_len())];
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        match ip.next_header() {
            IpProtocol::Tcp => {
                self.handle_tcp(src.into(), dst.into(), ip.payload(), packet, now);
            }
            IpProtocol::Udp => {
                self.handle_udp(src.into(), dst.into(), ip.payload(), packet, now);
            }
            IpProtocol::Icmpv6 => self.handle_icmp6(&ip, now),
            // Extension headers (fragments among them) are not carried.
            _ => self.counters.unsupported += 1,
        }
    }

    fn handle_icmp6(&mut self, ip: &Ipv6Packet<&[u8]>, now: Instant) {
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let Ok(pkt) = Icmpv6Packet::new_checked(ip.payload()) else {
            self.counters.malformed += 1;
            return;
        };
        let Ok(repr) = Icmpv6Repr::parse(
            &src,
            &dst,
            &pkt,
            &smoltcp::phy::ChecksumCapabilities::ignored(),
        ) else {
            self.counters.malformed += 1;
            return;
        };
        match repr {
            Icmpv6Repr::EchoRequest {
                ident,
                seq_no,
                data,
            } if !dst.is_multicast() => self.echo_request(PendingEcho {
                guest: src.into(),
                vip: dst.into(),
                ident,
                seq_no,
                data: data.to_vec(),
                since: now,
            }),
            // Neighbour discovery only from the link itself (RFC 4861 7.1).
            Icmpv6Repr::Ndisc(_) if ip.hop_limit() != 255 => self.counters.malformed += 1,
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr, .. }) => {
                self.neighbor_solicit(src, target_addr)
            }
            Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { .. }) if self.cfg.dhcp => {
                let to = if src.is_unspecified() { ALL_NODES } else { src };
                self.router_advert(to);
            }
            _ => self.counters.unsupported += 1,
        }
    }

    /// Answers a neighbour solicitation for one of our addresses or a vIP.
    fn neighbor_solicit(&mut self, src: Ipv6Addr, target: Ipv6Addr) {
        let gateway = target == self.gateway6();
        if !gateway && !self.is_own(target.into()) && self.resource_at(target.into()).is_none() {
            // The guest's own addresses (duplicate detection) and the rest.
            return;
        }
        let mut flags = NdiscNeighborFlags::OVERRIDE;
        let dst = if src.is_unspecified() {
            ALL_NODES
        } else {
            flags |= NdiscNeighborFlags::SOLICITED;
            src
        };
        if gateway {
            flags |= NdiscNeighborFlags::ROUTER;
        }
        let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags,
            target_addr: target,
            lladdr: Some(RawHardwareAddress::from(EthernetAddress(self.cfg.mac))),
        });
        self.counters.ndp_replies += 1;
        self.send_icmp6(target, dst, 255, &na);
    }

    /// A router advertisement to `to`: the prefix on-link and for SLAAC,
    /// the MTU, the vDNS and the zone; router lifetime 0, so the guest
    /// takes no default route from us.
    pub(super) fn router_advert(&mut self, to: Ipv6Addr) {
        let ra = Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
            hop_limit: 64,
            flags: NdiscRouterFlags::empty(),
            router_lifetime: SmolDuration::ZERO,
            reachable_time: SmolDuration::ZERO,
            retrans_time: SmolDuration::ZERO,
            lladdr: Some(RawHardwareAddress::from(EthernetAddress(self.cfg.mac))),
            mtu: Some(self.cfg.mtu as u32),
            prefix_info: Some(NdiscPrefixInformation {
                prefix_len: 64,
                flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
                valid_lifetime: SmolDuration::from_secs(u64::from(RA_VALID_SECS)),
                preferred_lifetime: SmolDuration::from_secs(u64::from(RA_PREFERRED_SECS)),
                prefix: self.cfg.prefix6,
            }),
        });
        // RDNSS and DNSSL go after smoltcp's options; the checksum is
        // filled again over the whole message.
        let mut extra = Vec::with_capacity(64);
        extra.extend_from_slice(&[OPT_RDNSS, 3, 0, 0]);
        extra.extend_from_slice(&RA_VALID_SECS.to_be_bytes());
        extra.extend_from_slice(&self.dns_addr6().octets());
        let mut names = Vec::new();
        for label in self.cfg.zone.trim_end_matches('.').split('.') {
            names.push(label.len() as u8);
            names.extend_from_slice(label.as_bytes());
        }
        names.push(0);
        let dnssl_len = (8 + names.len()).div_ceil(8) * 8;
        extra.extend_from_slice(&[OPT_DNSSL, (dnssl_len / 8) as u8, 0, 0]);
        extra.extend_from_slice(&RA_VALID_SECS.to_be_bytes());
        extra.extend_from_slice(&names);
        extra.resize(24 + dnssl_len, 0);

        let src = self.link_local();
        let icmp_len = ra.buffer_len() + extra.len();
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: to,
            next_header: IpProtocol::Icmpv6,
            payload_len: icmp_len,
            hop_limit: 255,
        };
        let mut out = vec![0u8; ip.buffer_len() + icmp_len];
        ip.emit(&mut Ipv6Packet::new_unchecked(&mut out[..]));
        let body = &mut out[ip.buffer_len()..];
        ra.emit(
            &src,
            &to,
            &mut Icmpv6Packet::new_unchecked(&mut body[..icmp_len - extra.len()]),
            &checksums(),
        );
        body[icmp_len - extra.len()..].copy_from_slice(&extra);
        Icmpv6Packet::new_unchecked(&mut body[..]).fill_checksum(&src, &to);
        self.counters.router_adverts += 1;
        self.dev.push_ip(&out);
        self.collect_frames();
    }

    /// Builds and queues one ICMPv6 message to the guest.
    pub(super) fn send_icmp6(
        &mut self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
        icmp: &Icmpv6Repr<'_>,
    ) {
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmpv6,
            payload_len: icmp.buffer_len(),
            hop_limit,
        };
        let mut out = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
        ip.emit(&mut Ipv6Packet::new_unchecked(&mut out[..]));
        icmp.emit(
            &src,
            &dst,
            &mut Icmpv6Packet::new_unchecked(&mut out[ip.buffer_len()..]),
            &checksums(),
        );
        self.dev.push_ip(&out);
        self.collect_frames();
    }
}
