//! UDP flows, ICMP echo and the vDNS: the datagram side of the engine.
//!
//! A UDP datagram to `vip:port` that the resource exports opens a flow
//! (keyed by the guest's address and port); the first datagrams wait (at
//! most [`MAX_HELD`]) until the agent has a socket, then every datagram is
//! a tunnel message each way. A flow idle for [`UDP_IDLE`] is closed. An
//! echo request to a vIP becomes an [`Event::Echo`]; the guest gets its
//! reply only if the agent's ping of the real resource got one. Datagrams
//! to the vDNS address are answered here.

use super::*;
use crate::mdns;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Repr, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
};

/// Datagrams kept per flow while the agent opens it.
pub const MAX_HELD: usize = 8;
/// A UDP flow with no datagram either way for this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Echo requests waiting for the agent's answer, per VM.
pub const MAX_ECHOES: usize = 64;
/// An echo the agent did not answer within this is forgotten.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(super) struct UdpFlow {
    pub(super) key: FlowKey,
    pub(super) open: bool,
    pub(super) held: VecDeque<Vec<u8>>,
    pub(super) last: Instant,
}

#[derive(Debug)]
pub(super) struct PendingEcho {
    pub(super) guest: IpAddress,
    pub(super) vip: IpAddress,
    pub(super) ident: u16,
    pub(super) seq_no: u16,
    pub(super) data: Vec<u8>,
    pub(super) since: Instant,
}

fn checksums() -> smoltcp::phy::ChecksumCapabilities {
    smoltcp::phy::ChecksumCapabilities::default()
}

impl Engine {
    /// A UDP datagram (`datagram`, its header included) inside IP packet
    /// `packet` from `guest` to `vip`, either family.
    pub(super) fn handle_udp(
        &mut self,
        guest: IpAddress,
        vip: IpAddress,
        datagram: &[u8],
        packet: &[u8],
        now: Instant,
    ) {
        let Ok(udp) = UdpPacket::new_checked(datagram) else {
            self.counters.malformed += 1;
            return;
        };
        let payload = udp.payload();
        let (sport, dport) = (udp.src_port(), udp.dst_port());
        if dport == mdns::MDNS_PORT && is_mdns_group(vip) {
            self.counters.mdns_packets += 1;
            match self.mdns.answer(payload, sport) {
                Ok(Some(mdns::Reply::Multicast(b))) => self.send_mdns_to(vip, &b),
                Ok(Some(mdns::Reply::Unicast(b))) => {
                    // From the vDNS address: a legacy resolver expects its
                    // answer from a unicast source.
                    let src = match vip {
                        IpAddress::Ipv4(_) => IpAddress::Ipv4(self.dns_addr()),
                        IpAddress::Ipv6(_) => IpAddress::Ipv6(self.dns_addr6()),
                    };
                    self.counters.mdns_answers += 1;
                    self.send_udp(src, mdns::MDNS_PORT, guest, sport, &b);
                }
                Ok(None) => {}
                Err(_) => self.counters.mdns_malformed += 1,
            }
            return;
        }
        if dport == 67 && matches!(vip, IpAddress::Ipv4(_)) {
            self.handle_dhcp(payload);
            return;
        }
        if dport == 53 && self.is_own(vip) {
            self.counters.dns_queries += 1;
            match self.dns.answer(payload) {
                Ok(Some(reply)) => self.send_udp(vip, 53, guest, sport, &reply),
                Ok(None) => {}
                Err(_) => self.counters.dns_malformed += 1,
            }
            return;
        }
        let key = FlowKey {
            guest: (guest, sport),
            vip: (vip, dport),
        };
        if let Some(&id) = self.udp_by_key.get(&key) {
            let f = self.udp_flows.get_mut(&id).expect("indexed");
            f.last = now;
            if f.open {
                self.queue_datagram(id, payload.to_vec());
            } else if f.held.len() < MAX_HELD {
                f.held.push_back(payload.to_vec());
            } else {
                self.counters.udp_dropped += 1;
            }
            return;
        }
        let resource = self
            .resource_at(vip)
            .filter(|r| r.udp_ports.contains(&dport))
            .map(|r| r.id);
        let Some(resource) = resource else {
            self.counters.refused_no_resource += 1;
            self.port_unreachable(packet);
            return;
        };
        if !self.online {
            self.counters.refused_offline += 1;
            self.port_unreachable(packet);
            return;
        }
        if self.flows.len() + self.udp_flows.len() >= self.cfg.max_flows {
            self.counters.refused_limit += 1;
            return;
        }
        if !self.take_token(now) {
            self.counters.refused_rate += 1;
            return;
        }
        let id = self.alloc_flow_id();
        self.udp_flows.insert(
            id,
            UdpFlow {
                key,
                open: false,
                held: VecDeque::from([payload.to_vec()]),
                last: now,
            },
        );
        self.udp_by_key.insert(key, id);
        self.counters.opens += 1;
        self.events.push_back(Event::OpenUdp {
            flow: id,
            resource,
            port: dport,
        });
    }

    /// The agent has a socket for UDP flow `flow`: held datagrams go.
    pub(super) fn udp_open_ok(&mut self, flow: FlowId, now: Instant) {
        if let Some(f) = self.udp_flows.get_mut(&flow) {
            f.open = true;
            f.last = now;
            let held: Vec<Vec<u8>> = f.held.drain(..).collect();
            for bytes in held {
                self.queue_datagram(flow, bytes);
            }
        }
    }

    /// A guest datagram for the tunnel, or dropped and counted when the
    /// tunnel is not taking them ([`MAX_QUEUED_OUT`]), as a full link would.
    fn queue_datagram(&mut self, flow: FlowId, bytes: Vec<u8>) {
        if self.queued_out + bytes.len() > MAX_QUEUED_OUT {
            self.counters.udp_dropped += 1;
            return;
        }
        self.counters.bytes_from_guest += bytes.len() as u64;
        self.queued_out += bytes.len();
        self.events.push_back(Event::Datagram { flow, bytes });
    }

    /// A datagram from the resource for the guest.
    pub fn datagram(&mut self, flow: FlowId, bytes: &[u8], now: Instant) -> Result<(), FlowError> {
        let f = self
            .udp_flows
            .get_mut(&flow)
            .ok_or(FlowError::UnknownFlow(flow))?;
        f.last = now;
        let key = f.key;
        self.counters.bytes_to_guest += bytes.len() as u64;
        self.send_udp(key.vip.0, key.vip.1, key.guest.0, key.guest.1, bytes);
        self.collect_frames();
        Ok(())
    }

    pub(super) fn remove_udp(&mut self, flow: FlowId) -> bool {
        match self.udp_flows.remove(&flow) {
            Some(f) => {
                self.udp_by_key.remove(&f.key);
                true
            }
            None => false,
        }
    }

    /// Closes idle UDP flows and forgets echoes nobody answered.
    pub(super) fn sweep_datagrams(&mut self, now: Instant) {
        let idle: Vec<FlowId> = self
            .udp_flows
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last) >= UDP_IDLE)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.remove_udp(id);
            self.events.push_back(Event::Reset { flow: id });
        }
        self.echoes
            .retain(|_, e| now.saturating_duration_since(e.since) < ECHO_TIMEOUT);
    }

    pub(super) fn handle_icmp(&mut self, ip: &Ipv4Packet<&[u8]>, now: Instant) {
        let Ok(pkt) = Icmpv4Packet::new_checked(ip.payload()) else {
            self.counters.malformed += 1;
            return;
        };
        let Ok(repr) = Icmpv4Repr::parse(&pkt, &smoltcp::phy::ChecksumCapabilities::ignored())
        else {
            self.counters.malformed += 1;
            return;
        };
        let Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        } = repr
        else {
            self.counters.unsupported += 1;
            return;
        };
        self.echo_request(PendingEcho {
            guest: IpAddress::Ipv4(ip.src_addr()),
            vip: IpAddress::Ipv4(ip.dst_addr()),
            ident,
            seq_no,
            data: data.to_vec(),
            since: now,
        });
    }

    /// An echo request to `pending.vip`, either family: ours answer at
    /// once, a resource's once the agent's ping of it came back.
    pub(super) fn echo_request(&mut self, pending: PendingEcho) {
        if self.is_own(pending.vip) {
            self.echo_reply_to(&pending);
            return;
        }
        let Some(resource) = self.resource_at(pending.vip).map(|r| r.id) else {
            self.counters.refused_no_resource += 1;
            return;
        };
        if !self.online || !self.accepting || self.echoes.len() >= MAX_ECHOES {
            self.counters.refused_offline += 1;
            return;
        }
        self.next_echo = self.next_echo.wrapping_add(1);
        let token = self.next_echo;
        let size = pending.data.len().min(u16::MAX as usize) as u16;
        self.echoes.insert(token, pending);
        self.events.push_back(Event::Echo {
            token,
            resource,
            size,
        });
    }

    /// The agent's ping of the real resource came back (`ok`) or not.
    pub fn echo_reply(&mut self, token: u32, ok: bool) {
        let Some(e) = self.echoes.remove(&token) else {
            return;
        };
        if ok {
            self.echo_reply_to(&e);
            self.collect_frames();
        }
    }

    fn echo_reply_to(&mut self, e: &PendingEcho) {
        self.counters.echo_replies += 1;
        match (e.vip, e.guest) {
            (IpAddress::Ipv4(vip), IpAddress::Ipv4(guest)) => {
                let icmp = Icmpv4Repr::EchoReply {
                    ident: e.ident,
                    seq_no: e.seq_no,
                    data: &e.data,
                };
                self.send_icmp(vip, guest, &icmp);
            }
            (IpAddress::Ipv6(vip), IpAddress::Ipv6(guest)) => {
                let icmp = Icmpv6Repr::EchoReply {
                    ident: e.ident,
                    seq_no: e.seq_no,
                    data: &e.data,
                };
                self.send_icmp6(vip, guest, 64, &icmp);
            }
            _ => {}
        }
    }

    /// Builds and queues one ICMP packet to the guest.
    fn send_icmp(&mut self, src: Ipv4Addr, dst: Ipv4Addr, icmp: &Icmpv4Repr<'_>) {
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let mut out = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut out[..]), &checksums());
        icmp.emit(
            &mut Icmpv4Packet::new_unchecked(&mut out[ip.buffer_len()..]),
            &checksums(),
        );
        self.dev.push_ip(&out);
        self.collect_frames();
    }

    /// ICMP port unreachable to the guest about IP packet `packet`.
    fn port_unreachable(&mut self, packet: &[u8]) {
        if packet.first().is_some_and(|b| b >> 4 == 6) {
            return self.unreachable6(packet, Icmpv6DstUnreachable::PortUnreachable);
        }
        let Ok(orig) = Ipv4Packet::new_checked(packet) else {
            return;
        };
        let Ok(orig_repr) = Ipv4Repr::parse(&orig, &smoltcp::phy::ChecksumCapabilities::ignored())
        else {
            return;
        };
        let quoted = &orig.payload()[..orig.payload().len().min(8)];
        let icmp = Icmpv4Repr::DstUnreachable {
            reason: Icmpv4DstUnreachable::PortUnreachable,
            header: orig_repr,
            data: quoted,
        };
        self.send_icmp(orig.dst_addr(), orig.src_addr(), &icmp);
    }

    /// ICMP host unreachable to the guest about the packet that starts
    /// with `quote` (its IP header and 8 bytes).
    pub(super) fn host_unreachable(&mut self, quote: &[u8]) {
        if quote.first().is_some_and(|b| b >> 4 == 6) {
            return self.unreachable6(quote, Icmpv6DstUnreachable::AddrUnreachable);
        }
        // The quote is cut after 8 bytes of payload, so the header's total
        // length runs past it: read the fields without the length check.
        if quote.len() < 20 {
            return;
        }
        let orig = Ipv4Packet::new_unchecked(quote);
        let hlen = usize::from(orig.header_len());
        if hlen < 20 || hlen > quote.len() {
            return;
        }
        let header = Ipv4Repr {
            src_addr: orig.src_addr(),
            dst_addr: orig.dst_addr(),
            next_header: orig.next_header(),
            payload_len: usize::from(orig.total_len()).saturating_sub(hlen),
            hop_limit: orig.hop_limit(),
        };
        let icmp = Icmpv4Repr::DstUnreachable {
            reason: Icmpv4DstUnreachable::HostUnreachable,
            header,
            data: &quote[hlen..],
        };
        self.send_icmp(orig.dst_addr(), orig.src_addr(), &icmp);
    }

    /// ICMPv6 destination unreachable to the guest about the IPv6 packet
    /// that starts with `quote`.
    fn unreachable6(&mut self, quote: &[u8], reason: Icmpv6DstUnreachable) {
        if quote.len() < 40 {
            return;
        }
        // A quote may be cut short of the payload length: no length check.
        let orig = Ipv6Packet::new_unchecked(quote);
        let header = Ipv6Repr {
            src_addr: orig.src_addr(),
            dst_addr: orig.dst_addr(),
            next_header: orig.next_header(),
            payload_len: usize::from(orig.payload_len()),
            hop_limit: orig.hop_limit(),
        };
        let data = &quote[40..quote.len().min(48)];
        let icmp = Icmpv6Repr::DstUnreachable {
            reason,
            header,
            data,
        };
        self.send_icmp6(orig.dst_addr(), orig.src_addr(), 64, &icmp);
    }

    /// Builds and queues one UDP packet to the guest (both addresses of
    /// the same family).
    /// An unsolicited mDNS answer to the guest's link, both families.
    pub(super) fn send_mdns(&mut self, payload: &[u8]) {
        self.send_mdns_to(IpAddress::Ipv4(mdns::GROUP_V4), payload);
        self.send_mdns_to(IpAddress::Ipv6(mdns::GROUP_V6), payload);
    }

    /// An mDNS answer to `group`, from the vDNS address of its family and
    /// port 5353, with the hop limit of 255 that marks it as from the link.
    pub(super) fn send_mdns_to(&mut self, group: IpAddress, payload: &[u8]) {
        let src = match group {
            IpAddress::Ipv4(_) => IpAddress::Ipv4(self.dns_addr()),
            IpAddress::Ipv6(_) => IpAddress::Ipv6(self.dns_addr6()),
        };
        self.counters.mdns_answers += 1;
        self.send_udp_hops(src, mdns::MDNS_PORT, group, mdns::MDNS_PORT, payload, 255);
    }

    pub(super) fn send_udp(
        &mut self,
        src: impl Into<IpAddress>,
        sport: u16,
        dst: impl Into<IpAddress>,
        dport: u16,
        payload: &[u8],
    ) {
        self.send_udp_hops(src, sport, dst, dport, payload, 64);
    }

    fn send_udp_hops(
        &mut self,
        src: impl Into<IpAddress>,
        sport: u16,
        dst: impl Into<IpAddress>,
        dport: u16,
        payload: &[u8],
        hop_limit: u8,
    ) {
        let (src, dst) = (src.into(), dst.into());
        let udp = UdpRepr {
            src_port: sport,
            dst_port: dport,
        };
        let udp_len = udp.header_len() + payload.len();
        let (mut out, hlen) = match (src, dst) {
            (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => {
                let ip = Ipv4Repr {
                    src_addr: s,
                    dst_addr: d,
                    next_header: IpProtocol::Udp,
                    payload_len: udp_len,
                    hop_limit,
                };
                let mut out = vec![0u8; ip.buffer_len() + udp_len];
                ip.emit(&mut Ipv4Packet::new_unchecked(&mut out[..]), &checksums());
                (out, ip.buffer_len())
            }
            (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
                let ip = Ipv6Repr {
                    src_addr: s,
                    dst_addr: d,
                    next_header: IpProtocol::Udp,
                    payload_len: udp_len,
                    hop_limit,
                };
                let mut out = vec![0u8; ip.buffer_len() + udp_len];
                ip.emit(&mut Ipv6Packet::new_unchecked(&mut out[..]));
                (out, ip.buffer_len())
            }
            _ => return,
        };
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut out[hlen..]),
            &src,
            &dst,
            payload.len(),
            |b| b.copy_from_slice(payload),
            &checksums(),
        );
        if out.len() <= self.cfg.mtu {
            self.dev.push_ip(&out);
        } else {
            // As a router on the path would: fragments the guest's stack
            // reassembles (SNMP and DNS answers can exceed the MTU).
            self.counters.udp_fragmented += 1;
            self.frag_ident = self.frag_ident.wrapping_add(1);
            let frags = fragment(&out, hlen, self.cfg.mtu, self.frag_ident);
            for f in &frags {
                self.dev.push_ip(f);
            }
        }
        self.collect_frames();
    }
}

/// Whether `addr` is the mDNS group of its family.
fn is_mdns_group(addr: IpAddress) -> bool {
    match addr {
        IpAddress::Ipv4(a) => a == mdns::GROUP_V4,
        IpAddress::Ipv6(a) => a == mdns::GROUP_V6,
    }
}

/// IP packet `packet` (header `hlen` bytes) cut into fragments of at most
/// `mtu` bytes: IPv4 by its flags and offset, IPv6 by a fragment header.
pub(super) fn fragment(packet: &[u8], hlen: usize, mtu: usize, ident: u32) -> Vec<Vec<u8>> {
    let payload = &packet[hlen..];
    let v6 = packet[0] >> 4 == 6;
    let room = if v6 { mtu - hlen - 8 } else { mtu - hlen };
    let step = room / 8 * 8;
    let mut out = Vec::new();
    for (i, chunk) in payload.chunks(step).enumerate() {
        let offset = i * step;
        let more = offset + chunk.len() < payload.len();
        let mut f = Vec::with_capacity(hlen + 8 + chunk.len());
        f.extend_from_slice(&packet[..hlen]);
        if v6 {
            let next = f[6];
            f[6] = 44; // Fragment header.
            let plen = (8 + chunk.len()) as u16;
            f[4..6].copy_from_slice(&plen.to_be_bytes());
            let off = ((offset / 8) as u16) << 3 | u16::from(more);
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&off.to_be_bytes());
            f.extend_from_slice(&ident.to_be_bytes());
            f.extend_from_slice(chunk);
        } else {
            f.extend_from_slice(chunk);
            let mut ip = Ipv4Packet::new_unchecked(&mut f[..]);
            ip.set_total_len((hlen + chunk.len()) as u16);
            ip.set_ident(ident as u16);
            ip.set_dont_frag(false);
            ip.set_more_frags(more);
            ip.set_frag_offset(offset as u16);
            ip.fill_checksum();
        }
        out.push(f);
    }
    out
}
