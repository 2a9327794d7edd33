//! DHCPv4 for a dedicated NIC: a stock guest (`udhcpc`, `dhclient`) gets an
//! address in the subnet, the vDNS as its DNS server, the zone as its
//! domain, and a classless route for the subnet, but no default route: the
//! guest's normal NIC keeps that.
//!
//! Leases come from offsets [`POOL`] of the subnet and stay with the
//! client's MAC for the engine's lifetime.

use super::*;
use smoltcp::wire::{DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr};

/// Offsets in the subnet handed out to guests.
pub const POOL: std::ops::RangeInclusive<u32> = 100..=250;
/// Lease time in seconds.
pub const LEASE_SECS: u32 = 3600;

/// The server's leases.
#[derive(Debug, Default)]
pub(super) struct Leases {
    by_mac: HashMap<EthernetAddress, Ipv4Addr>,
}

impl Engine {
    fn lease_for(&mut self, mac: EthernetAddress) -> Option<Ipv4Addr> {
        if let Some(ip) = self.leases.by_mac.get(&mac) {
            return Some(*ip);
        }
        let used: Vec<Ipv4Addr> = self.leases.by_mac.values().copied().collect();
        let ip = POOL
            .map(|o| nth(self.cfg.subnet, o))
            .find(|ip| !used.contains(ip) && !self.resources.contains_key(ip))?;
        self.leases.by_mac.insert(mac, ip);
        Some(ip)
    }

    /// A DHCP message from the guest (UDP to port 67).
    pub(super) fn handle_dhcp(&mut self, payload: &[u8]) {
        if !self.cfg.dhcp {
            self.counters.unsupported += 1;
            return;
        }
        let Ok(pkt) = DhcpPacket::new_checked(payload) else {
            self.counters.malformed += 1;
            return;
        };
        let Ok(req) = DhcpRepr::parse(&pkt) else {
            self.counters.malformed += 1;
            return;
        };
        let mac = req.client_hardware_address;
        let gw = self.gateway();
        let reply_type = match req.message_type {
            DhcpMessageType::Discover => match self.lease_for(mac) {
                Some(_) => DhcpMessageType::Offer,
                None => {
                    self.counters.dhcp_pool_empty += 1;
                    return;
                }
            },
            DhcpMessageType::Request => {
                if req.server_identifier.is_some_and(|s| s != gw) {
                    // The guest chose another server.
                    return;
                }
                let wanted = req.requested_ip.unwrap_or(req.client_ip);
                match self.lease_for(mac) {
                    Some(ip) if ip == wanted => DhcpMessageType::Ack,
                    _ => DhcpMessageType::Nak,
                }
            }
            DhcpMessageType::Release => {
                self.leases.by_mac.remove(&mac);
                return;
            }
            _ => return,
        };
        let yours = if reply_type == DhcpMessageType::Nak {
            Ipv4Addr::UNSPECIFIED
        } else {
            self.lease_for(mac).expect("leased above")
        };
        let mask_bits = u32::MAX << (32 - self.cfg.prefix_len);
        let mask = Ipv4Addr::from(mask_bits);
        let dns = self.dns_addr().octets();
        let zone = self.cfg.zone.clone();
        // RFC 3442: prefix length, the significant octets, then the router.
        let significant = self.cfg.prefix_len.div_ceil(8) as usize;
        let mut route = vec![self.cfg.prefix_len];
        route.extend_from_slice(&self.cfg.subnet.octets()[..significant]);
        route.extend_from_slice(&gw.octets());
        let options = [
            DhcpOption {
                kind: 6,
                data: &dns,
            },
            DhcpOption {
                kind: 15,
                data: zone.as_bytes(),
            },
            DhcpOption {
                kind: 121,
                data: &route,
            },
        ];
        let nak = reply_type == DhcpMessageType::Nak;
        let reply = DhcpRepr {
            message_type: reply_type,
            transaction_id: req.transaction_id,
            secs: 0,
            client_hardware_address: mac,
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: yours,
            server_ip: gw,
            router: None,
            subnet_mask: (!nak).then_some(mask),
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: req.broadcast,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(gw),
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: (!nak).then_some(LEASE_SECS),
            renew_duration: (!nak).then_some(LEASE_SECS / 2),
            rebind_duration: (!nak).then_some(LEASE_SECS * 7 / 8),
            additional_options: if nak { &[] } else { &options },
        };
        let mut body = vec![0u8; reply.buffer_len()];
        if reply
            .emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
            .is_err()
        {
            return;
        }
        self.counters.dhcp_replies += 1;
        // Broadcast: the client has no address yet.
        self.send_udp(gw, 67, Ipv4Addr::BROADCAST, 68, &body);
    }
}
