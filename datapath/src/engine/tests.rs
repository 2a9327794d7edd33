//! Engine tests: a guest TCP/IP stack (smoltcp, Ethernet) wired to the
//! engine in memory, with a virtual clock; the test plays the agent by
//! answering the engine's events. No kernel, no sockets, deterministic.

use super::*;
use proptest::prelude::*;
use smoltcp::iface::{Config as IfConfig, Interface as Iface, SocketSet as Sockets};
use smoltcp::phy::{DeviceCapabilities as Caps, Medium as Med};
use smoltcp::wire::{ArpHardware, EthernetAddress as Mac, IpCidr as Cidr, IpEndpoint};

const ENGINE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const VIP: Ipv4Addr = Ipv4Addr::new(100, 77, 1, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(100, 77, 0, 2);
const RESOURCE: ResourceId = 7;
/// The guest's address in the IPv6 prefix (SLAAC would pick another).
const GUEST_IP6: Ipv6Addr = Ipv6Addr::new(0xfd6e, 0x7264, 0, 0, 0, 0, 0, 2);

fn vip6_of(v4: Ipv4Addr) -> Ipv6Addr {
    vip6(DEFAULT_PREFIX6, v4)
}

/// The guest's NIC: Ethernet frames both ways.
#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: VecDeque<Vec<u8>>,
}

struct GRx(Vec<u8>);
struct GTx<'a>(&'a mut VecDeque<Vec<u8>>);
impl phy::RxToken for GRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
impl phy::TxToken for GTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}
impl Device for Wire {
    type RxToken<'a> = GRx;
    type TxToken<'a> = GTx<'a>;
    fn receive(&mut self, _: SmolInstant) -> Option<(GRx, GTx<'_>)> {
        let f = self.to_guest.pop_front()?;
        Some((GRx(f), GTx(&mut self.from_guest)))
    }
    fn transmit(&mut self, _: SmolInstant) -> Option<GTx<'_>> {
        Some(GTx(&mut self.from_guest))
    }
    fn capabilities(&self) -> Caps {
        let mut c = Caps::default();
        c.medium = Med::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

struct Pair {
    engine: Engine,
    guest: Iface,
    wire: Wire,
    socks: Sockets<'static>,
    epoch: Instant,
    elapsed: Duration,
    events: Vec<Event>,
}

impl Pair {
    fn new(online: bool) -> Self {
        let epoch = Instant::now();
        let mut cfg = EngineConfig::new(Ipv4Addr::new(100, 77, 0, 0), 16, ENGINE_MAC);
        cfg.window = 64 * 1024;
        cfg.peer_window = 64 * 1024;
        cfg.socket_buffer = 64 * 1024;
        let mut engine = Engine::new(cfg, epoch);
        engine.set_resource(VIP, RESOURCE, vec![9100]);
        engine.set_online(online, epoch);
        let mut wire = Wire::default();
        let mut gcfg = IfConfig::new(HardwareAddress::Ethernet(Mac(GUEST_MAC)));
        gcfg.random_seed = 1;
        let mut guest = Iface::new(gcfg, &mut wire, SmolInstant::ZERO);
        guest.update_ip_addrs(|a| {
            a.push(Cidr::new(IpAddress::Ipv4(GUEST_IP), 16)).unwrap();
            a.push(Cidr::new(IpAddress::Ipv6(GUEST_IP6), 64)).unwrap();
        });
        Self {
            engine,
            guest,
            wire,
            socks: Sockets::new(vec![]),
            epoch,
            elapsed: Duration::ZERO,
            events: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        self.epoch + self.elapsed
    }

    fn smol_now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.elapsed.as_micros() as i64)
    }

    /// Steps both sides until neither has anything to say.
    fn drive(&mut self) {
        for _ in 0..1000 {
            let t = self.smol_now();
            self.guest.poll(t, &mut self.wire, &mut self.socks);
            let mut moved = false;
            while let Some(f) = self.wire.from_guest.pop_front() {
                self.engine.handle_frame(&f, self.now());
                moved = true;
            }
            self.engine.poll(self.now());
            while let Some(f) = self.engine.poll_frame() {
                self.wire.to_guest.push_back(f);
                moved = true;
            }
            while let Some(e) = self.engine.poll_event() {
                self.events.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("pair never went quiet");
    }

    fn advance(&mut self, d: Duration) {
        self.elapsed += d;
        self.drive();
    }

    fn connect(&mut self, port: u16, local_port: u16) -> SocketHandle {
        self.connect_to(IpAddress::Ipv4(VIP), port, local_port)
    }

    fn connect_to(&mut self, addr: IpAddress, port: u16, local_port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        );
        s.connect(
            self.guest.context(),
            IpEndpoint::new(addr, port),
            local_port,
        )
        .unwrap();
        let h = self.socks.add(s);
        self.drive();
        h
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.socks.get_mut::<tcp::Socket>(h)
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn opened_flow(&mut self) -> FlowId {
        let evs = self.take_events();
        match evs.as_slice() {
            [
                Event::Open {
                    flow,
                    resource,
                    port,
                },
            ] => {
                assert_eq!((*resource, *port), (RESOURCE, 9100));
                *flow
            }
            other => panic!("expected one Open, got {other:?}"),
        }
    }
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: Mac(GUEST_MAC),
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: Mac([0; 6]),
        target_protocol_addr: target,
    };
    let eth = EthernetRepr {
        src_addr: Mac(GUEST_MAC),
        dst_addr: Mac::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut out = vec![0u8; eth.buffer_len() + repr.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut out[..]);
    eth.emit(&mut f);
    repr.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
    out
}

#[test]
fn arp_for_a_vip_and_the_gateway_is_answered_and_nothing_else() {
    let mut p = Pair::new(true);
    let now = p.now();
    p.engine.handle_frame(&arp_request(VIP), now);
    let reply = p.engine.poll_frame().expect("ARP reply");
    let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
    assert_eq!(eth.dst_addr(), Mac(GUEST_MAC));
    let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
    match arp {
        ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } => {
            assert_eq!(operation, ArpOperation::Reply);
            assert_eq!(source_hardware_addr, Mac(ENGINE_MAC));
            assert_eq!(
                (source_protocol_addr, target_protocol_addr),
                (VIP, GUEST_IP)
            );
        }
        other => panic!("{other:?}"),
    }
    p.engine
        .handle_frame(&arp_request(Ipv4Addr::new(100, 77, 0, 1)), now);
    assert!(p.engine.poll_frame().is_some(), "gateway answered");
    p.engine
        .handle_frame(&arp_request(Ipv4Addr::new(100, 77, 9, 9)), now);
    assert!(p.engine.poll_frame().is_none(), "no resource, no answer");
    assert_eq!(p.engine.counters().arp_replies, 2);
    let _ = ArpHardware::Ethernet;
}

#[test]
fn the_syn_is_held_until_the_agent_connected() {
    let mut p = Pair::new(true);
    let h = p.connect(9100, 40000);
    let flow = p.opened_flow();
    p.advance(Duration::from_millis(500));
    assert_eq!(
        p.sock(h).state(),
        tcp::State::SynSent,
        "no SYN-ACK before OpenOk"
    );
    let now = p.now();
    p.engine.open_ok(flow, now).unwrap();
    p.drive();
    assert_eq!(p.sock(h).state(), tcp::State::Established);
    assert_eq!(p.engine.counters().opens, 1);
}

#[test]
fn open_err_and_unexported_ports_and_offline_give_rst_at_once() {
    let mut p = Pair::new(true);
    let h = p.connect(9100, 40001);
    let flow = p.opened_flow();
    let now = p.now();
    p.engine.open_err(flow, Refusal::Refused, now).unwrap();
    p.drive();
    assert_eq!(p.sock(h).state(), tcp::State::Closed, "RST from open_err");
    assert_eq!(p.engine.flow_count(), 0);

    let h = p.connect(9999, 40002);
    assert_eq!(
        p.sock(h).state(),
        tcp::State::Closed,
        "RST for a port not exported"
    );
    assert!(
        p.take_events().is_empty(),
        "no Open for a port not exported"
    );
    assert_eq!(p.engine.counters().refused_no_resource, 1);

    let mut p = Pair::new(false);
    let h = p.connect(9100, 40003);
    assert_eq!(p.sock(h).state(), tcp::State::Closed, "RST while offline");
    assert_eq!(p.engine.counters().refused_offline, 1);
}

#[test]
fn bytes_flow_both_ways_under_credits_and_close_cleanly() {
    let mut p = Pair::new(true);
    let h = p.connect(9100, 40004);
    let flow = p.opened_flow();
    let now = p.now();
    p.engine.open_ok(flow, now).unwrap();
    p.drive();
    let up: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let down: Vec<u8> = (0..150_000u32).map(|i| (i * 13 % 241) as u8).collect();
    let (mut sent_up, mut got_up, mut sent_down, mut got_down) = (0, Vec::new(), 0, Vec::new());
    let mut outstanding_credit = 64 * 1024u32; // what the agent granted the engine
    let mut agent_window = 64 * 1024usize; // what the engine granted the agent
    let mut fin_seen = false;
    for _ in 0..10_000 {
        if sent_up < up.len() && p.sock(h).can_send() {
            sent_up += p.sock(h).send_slice(&up[sent_up..]).unwrap();
        }
        if sent_up == up.len() && p.sock(h).state() == tcp::State::Established {
            p.sock(h).close();
        }
        while p.sock(h).can_recv() {
            let mut b = [0u8; 8192];
            let n = p.sock(h).recv_slice(&mut b).unwrap();
            got_down.extend_from_slice(&b[..n]);
        }
        p.advance(Duration::from_millis(1));
        let now = p.now();
        for e in p.take_events() {
            match e {
                Event::Data { flow: f, bytes } => {
                    assert_eq!(f, flow);
                    assert!(
                        bytes.len() as u32 <= outstanding_credit,
                        "engine overran its credit"
                    );
                    outstanding_credit -= bytes.len() as u32;
                    got_up.extend_from_slice(&bytes);
                }
                Event::Window { credit, .. } => agent_window += credit as usize,
                Event::Fin { .. } => fin_seen = true,
                Event::Closed { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        // The agent delivers what it got and grants it back.
        if outstanding_credit < 32 * 1024 {
            let c = 64 * 1024 - outstanding_credit;
            outstanding_credit += c;
            p.engine.window(flow, c, now).unwrap();
        }
        if sent_down < down.len() && agent_window > 0 {
            let n = agent_window.min(down.len() - sent_down).min(MAX_CHUNK);
            p.engine
                .data(flow, &down[sent_down..sent_down + n], now)
                .unwrap();
            sent_down += n;
            agent_window -= n;
            if sent_down == down.len() {
                p.engine.fin(flow, now).unwrap();
            }
        }
        if fin_seen && got_down.len() == down.len() && p.engine.flow_count() == 0 {
            break;
        }
    }
    assert!(
        got_up == up,
        "guest → agent bytes differ ({} of {})",
        got_up.len(),
        up.len()
    );
    assert!(
        got_down == down,
        "agent → guest bytes differ ({} of {})",
        got_down.len(),
        down.len()
    );
    assert!(fin_seen, "guest FIN reached the agent");
    assert_eq!(p.engine.flow_count(), 0, "flow freed after both FINs");
    assert_eq!(p.engine.counters().closed, 1);
}

#[test]
fn an_agent_overrunning_its_window_resets_only_that_flow() {
    let mut p = Pair::new(true);
    let a = p.connect(9100, 40005);
    let fa = p.opened_flow();
    let b = p.connect(9100, 40006);
    let fb = p.opened_flow();
    let now = p.now();
    p.engine.open_ok(fa, now).unwrap();
    p.engine.open_ok(fb, now).unwrap();
    p.drive();
    let big = vec![0u8; 64 * 1024];
    p.engine.data(fa, &big, now).unwrap();
    p.drive();
    // The agent may send again only what the engine granted back since.
    let granted: u32 = p
        .take_events()
        .iter()
        .map(|e| match e {
            Event::Window { flow, credit } if *flow == fa => *credit,
            _ => 0,
        })
        .sum();
    let err = p
        .engine
        .data(fa, &vec![0u8; granted as usize + 1], now)
        .unwrap_err();
    assert!(
        matches!(err, FlowError::WindowExceeded(f, _) if f == fa),
        "{err:?}"
    );
    p.drive();
    assert!(p.take_events().contains(&Event::Reset { flow: fa }));
    assert_eq!(p.sock(a).state(), tcp::State::Closed, "guest got RST");
    assert_eq!(
        p.sock(b).state(),
        tcp::State::Established,
        "the other flow lives"
    );
    assert_eq!(
        p.engine.data(fa, b"x", now),
        Err(FlowError::UnknownFlow(fa)),
        "the reset flow is gone"
    );
}

#[test]
fn a_guest_giving_up_while_opening_tells_the_agent() {
    let mut p = Pair::new(true);
    let h = p.connect(9100, 40007);
    let flow = p.opened_flow();
    p.sock(h).abort();
    p.drive();
    assert_eq!(p.take_events(), vec![Event::Reset { flow }]);
    assert_eq!(p.engine.flow_count(), 0);
    let now = p.now();
    assert_eq!(
        p.engine.open_ok(flow, now),
        Err(FlowError::UnknownFlow(flow))
    );
}

#[test]
fn going_offline_resets_every_flow() {
    let mut p = Pair::new(true);
    let h = p.connect(9100, 40008);
    let flow = p.opened_flow();
    let now = p.now();
    p.engine.open_ok(flow, now).unwrap();
    p.drive();
    p.engine.set_online(false, now);
    p.drive();
    assert_eq!(p.sock(h).state(), tcp::State::Closed);
    assert_eq!(p.engine.flow_count(), 0);
}

#[test]
fn malformed_frames_are_counted_not_fatal() {
    let mut p = Pair::new(true);
    let now = p.now();
    p.engine.handle_frame(&[1, 2, 3], now);
    let mut ip = vec![0u8; 14];
    ip[12..14].copy_from_slice(&[0x08, 0x00]);
    ip.extend_from_slice(&[0x45, 0, 0, 60, 0, 0]); // truncated IPv4
    p.engine.handle_frame(&ip, now);
    let mut arp = arp_request(VIP);
    arp.truncate(20);
    p.engine.handle_frame(&arp, now);
    assert_eq!(p.engine.counters().malformed, 3);
    assert_eq!(p.engine.counters().frames_in, 3);
}

proptest! {
    /// Any bytes, as a frame from the guest, never panic the engine.
    #[test]
    fn random_frames_never_panic(
        frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20),
        ipv4 in any::<bool>(),
    ) {
        let mut p = Pair::new(true);
        let now = p.now();
        for mut f in frames {
            if ipv4 && f.len() > 14 {
                f[12] = 0x08;
                f[13] = 0x00;
                f[14] = 0x45;
            }
            p.engine.handle_frame(&f, now);
        }
        p.engine.poll(now);
        prop_assert!(p.engine.counters().frames_in > 0);
    }
}

#[test]
fn new_flows_beyond_the_rate_limit_are_dropped_until_the_guest_tries_again() {
    let mut p = Pair::new(true);
    p.engine.cfg.new_flow_burst = 3;
    p.engine.cfg.new_flow_rate = 1;
    p.engine.tokens = 3.0;
    for port in 0..3 {
        p.connect(9100, 41000 + port);
    }
    assert_eq!(p.take_events().len(), 3, "three opens within the burst");
    let h = p.connect(9100, 41010);
    assert_eq!(
        p.sock(h).state(),
        tcp::State::SynSent,
        "the fourth SYN is dropped, not refused"
    );
    assert!(p.take_events().is_empty());
    assert_eq!(p.engine.counters().refused_rate, 1);
    // The guest sends its SYN again; by then one more token has come.
    for _ in 0..30 {
        p.advance(Duration::from_millis(100));
    }
    assert!(matches!(p.take_events().as_slice(), [Event::Open { .. }]));
    assert_eq!(p.sock(h).state(), tcp::State::SynSent, "held for the agent");
}

/// The Open events so far, in order.
fn opens(p: &mut Pair) -> Vec<FlowId> {
    p.take_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Open { flow, .. } => Some(flow),
            _ => None,
        })
        .collect()
}

#[test]
fn flows_over_the_memory_cap_connect_and_wait_in_order_for_room() {
    // Room for the buffers of two flows: all four guests' connections are
    // made (waiting costs no buffers), the third and fourth complete their
    // handshakes in order as the first two end, as in an accept queue.
    let mut p = Pair::new(true);
    p.engine.cfg.max_memory = 2 * p.engine.flow_cost();
    let g: Vec<_> = (0..4).map(|i| p.connect(9100, 40400 + i)).collect();
    let flows = opens(&mut p);
    assert_eq!(flows.len(), 4, "every connection is made");
    for &f in &flows {
        let now = p.now();
        p.engine.open_ok(f, now).unwrap();
    }
    p.drive();
    let states = |p: &mut Pair| g.iter().map(|&h| p.sock(h).state()).collect::<Vec<_>>();
    use tcp::State::{Established as E, SynSent as S};
    assert_eq!(states(&mut p), [E, E, S, S]);
    assert_eq!(p.engine.counters().open_waited, 2);
    assert_eq!(p.engine.buffer_bytes(), 2 * p.engine.flow_cost());
    // The fourth's resource talks first: its bytes wait with it.
    let now = p.now();
    p.engine.data(flows[3], b"220 ready\r\n", now).unwrap();
    p.advance(Duration::from_secs(2));
    assert_eq!(states(&mut p), [E, E, S, S], "retries change nothing");
    p.sock(g[0]).abort();
    p.drive();
    assert_eq!(states(&mut p)[1..], [E, E, S]);
    p.sock(g[1]).abort();
    p.drive();
    assert_eq!(states(&mut p)[2..], [E, E]);
    let mut got = [0u8; 64];
    let n = p.sock(g[3]).recv_slice(&mut got).unwrap();
    assert_eq!(&got[..n], b"220 ready\r\n");
    assert_eq!(p.engine.counters().refused_limit, 0);
}

#[test]
fn syns_over_the_opening_limit_are_held_in_order_and_let_in_at_once() {
    let mut p = Pair::new(true);
    p.engine.cfg.max_opening = 1;
    let g: Vec<_> = (0..3).map(|i| p.connect(9100, 40450 + i)).collect();
    let first = opens(&mut p);
    assert_eq!(first.len(), 1);
    assert_eq!(p.engine.counters().syn_waited, 2);
    // The held guests send their SYNs again: still held once each.
    p.advance(Duration::from_secs(2));
    assert!(opens(&mut p).is_empty());
    assert_eq!(p.engine.counters().syn_waited, 2);
    let mut flow = first[0];
    for (i, &h) in g.iter().enumerate() {
        let now = p.now();
        p.engine.open_ok(flow, now).unwrap();
        p.drive();
        assert_eq!(p.sock(h).state(), tcp::State::Established, "guest {i}");
        if let Some(&later) = g.get(i + 1) {
            assert_eq!(p.sock(later).state(), tcp::State::SynSent);
            // Let in when the opening flow opened, not at its next retry.
            let next = opens(&mut p);
            assert_eq!(next.len(), 1, "guest {}", i + 1);
            flow = next[0];
        }
    }
    assert_eq!(p.engine.counters().syn_dropped_opening, 0);
}

#[test]
fn waiting_flows_whose_resources_send_too_much_early_are_reset() {
    let mut p = Pair::new(true);
    p.engine.cfg.max_memory = p.engine.flow_cost();
    let _g0 = p.connect(9100, 40470);
    let g1 = p.connect(9100, 40471);
    let flows = opens(&mut p);
    for &f in &flows {
        let now = p.now();
        p.engine.open_ok(f, now).unwrap();
    }
    p.drive();
    let cap = p.engine.cfg.max_memory / 16;
    let now = p.now();
    p.engine.data(flows[1], &vec![7u8; cap + 1], now).unwrap();
    p.drive();
    assert_eq!(p.engine.counters().early_overflow, 1);
    assert!(
        p.take_events()
            .iter()
            .any(|e| matches!(e, Event::Reset { flow } if *flow == flows[1])),
        "the agent is told"
    );
    assert_eq!(p.sock(g1).state(), tcp::State::Closed, "the guest is reset");
}

mod datagrams {
    //! UDP, ICMP, DHCP and DNS with crafted frames.
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        DhcpMessageType, DhcpPacket, DhcpRepr, Icmpv4Packet, Icmpv4Repr, Ipv4Repr, UdpPacket,
        UdpRepr,
    };

    fn eth_ip(ip: Ipv4Repr, l4: &[u8]) -> Vec<u8> {
        let eth = EthernetRepr {
            src_addr: Mac(GUEST_MAC),
            dst_addr: Mac(ENGINE_MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut out = vec![0u8; eth.buffer_len() + ip.buffer_len() + l4.len()];
        let mut f = EthernetFrame::new_unchecked(&mut out[..]);
        eth.emit(&mut f);
        let p = f.payload_mut();
        ip.emit(
            &mut Ipv4Packet::new_unchecked(&mut p[..]),
            &ChecksumCapabilities::default(),
        );
        p[ip.buffer_len()..].copy_from_slice(l4);
        out
    }

    fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let udp = UdpRepr {
            src_port: sport,
            dst_port: dport,
        };
        let mut l4 = vec![0u8; udp.header_len() + payload.len()];
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut l4[..]),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        );
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: l4.len(),
            hop_limit: 64,
        };
        eth_ip(ip, &l4)
    }

    /// The UDP datagram in a frame to the guest: (src, sport, dport, payload).
    fn parse_udp(frame: &[u8]) -> Option<(Ipv4Addr, u16, u16, Vec<u8>)> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        if ip.next_header() != IpProtocol::Udp {
            return None;
        }
        let udp = UdpPacket::new_checked(ip.payload()).ok()?;
        Some((
            ip.src_addr(),
            udp.src_port(),
            udp.dst_port(),
            udp.payload().to_vec(),
        ))
    }

    fn icmp_of(frame: &[u8]) -> Option<(Ipv4Addr, Vec<u8>)> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        (ip.next_header() == IpProtocol::Icmp).then(|| (ip.src_addr(), ip.payload().to_vec()))
    }

    #[test]
    fn a_udp_flow_holds_its_first_datagram_until_the_agent_is_ready() {
        let mut p = Pair::new(true);
        p.engine
            .set_named_resource(VIP, RESOURCE, "printer", vec![9100], vec![161]);
        let now = p.now();
        p.engine
            .handle_frame(&udp_frame(GUEST_IP, VIP, 5000, 161, b"get sysDescr"), now);
        let evs: Vec<Event> = std::iter::from_fn(|| p.engine.poll_event()).collect();
        let flow = match evs.as_slice() {
            [
                Event::OpenUdp {
                    flow,
                    resource,
                    port: 161,
                },
            ] if *resource == RESOURCE => *flow,
            other => panic!("{other:?}"),
        };
        p.engine.open_ok(flow, now).unwrap();
        assert_eq!(
            p.engine.poll_event(),
            Some(Event::Datagram {
                flow,
                bytes: b"get sysDescr".to_vec()
            })
        );
        p.engine.datagram(flow, b"printer 1", now).unwrap();
        let (src, sport, dport, payload) = parse_udp(&p.engine.poll_frame().unwrap()).unwrap();
        assert_eq!(
            (src, sport, dport, payload.as_slice()),
            (VIP, 161, 5000, &b"printer 1"[..])
        );
        // Idle flows end, and the agent hears of it.
        p.engine.poll(now + UDP_IDLE);
        assert_eq!(p.engine.poll_event(), Some(Event::Reset { flow }));
        assert_eq!(p.engine.flow_count(), 0);
    }

    #[test]
    fn a_datagram_larger_than_the_mtu_reaches_the_guest_in_fragments() {
        let mut p = Pair::new(true);
        p.engine
            .set_named_resource(VIP, RESOURCE, "printer", vec![9100], vec![161]);
        let now = p.now();
        p.engine
            .handle_frame(&udp_frame(GUEST_IP, VIP, 5000, 161, b"getbulk"), now);
        let Some(Event::OpenUdp { flow, .. }) = p.engine.poll_event() else {
            panic!("no open");
        };
        p.engine.open_ok(flow, now).unwrap();
        let big: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        p.engine.datagram(flow, &big, now).unwrap();
        let frames: Vec<Vec<u8>> = std::iter::from_fn(|| p.engine.poll_frame()).collect();
        assert!(frames.len() >= 7, "{} frames", frames.len());
        let mut whole = vec![0u8; 8 + big.len()];
        let mut seen = 0;
        for (i, f) in frames.iter().enumerate() {
            assert!(f.len() <= 14 + 1500, "frame {i}: {} bytes", f.len());
            let eth = EthernetFrame::new_checked(&f[..]).unwrap();
            let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(ip.more_frags(), i + 1 < frames.len());
            let off = ip.frag_offset() as usize;
            whole[off..off + ip.payload().len()].copy_from_slice(ip.payload());
            seen += ip.payload().len();
        }
        assert_eq!(seen, whole.len(), "the fragments cover the datagram");
        let udp = UdpPacket::new_checked(&whole[..]).unwrap();
        assert_eq!(udp.payload(), &big[..]);
        assert_eq!(p.engine.counters().udp_fragmented, 1);
    }

    #[test]
    fn udp_to_a_port_not_exported_gets_port_unreachable() {
        let mut p = Pair::new(true);
        let now = p.now();
        p.engine
            .handle_frame(&udp_frame(GUEST_IP, VIP, 5000, 162, b"trap"), now);
        assert!(p.engine.poll_event().is_none());
        let (src, icmp) = icmp_of(&p.engine.poll_frame().unwrap()).unwrap();
        assert_eq!(
            (src, icmp[0], icmp[1]),
            (VIP, 3, 3),
            "destination unreachable, port"
        );
    }

    #[test]
    fn an_echo_is_answered_only_if_the_real_resource_answered() {
        let mut p = Pair::new(true);
        let now = p.now();
        let echo = |seq| {
            let icmp = Icmpv4Repr::EchoRequest {
                ident: 7,
                seq_no: seq,
                data: b"abcdefgh",
            };
            let mut l4 = vec![0u8; icmp.buffer_len()];
            icmp.emit(
                &mut Icmpv4Packet::new_unchecked(&mut l4[..]),
                &ChecksumCapabilities::default(),
            );
            let ip = Ipv4Repr {
                src_addr: GUEST_IP,
                dst_addr: VIP,
                next_header: IpProtocol::Icmp,
                payload_len: l4.len(),
                hop_limit: 64,
            };
            eth_ip(ip, &l4)
        };
        p.engine.handle_frame(&echo(1), now);
        let Some(Event::Echo {
            token,
            resource,
            size: 8,
        }) = p.engine.poll_event()
        else {
            panic!("no Echo event")
        };
        assert_eq!(resource, RESOURCE);
        p.engine.echo_reply(token, true);
        let (src, icmp) = icmp_of(&p.engine.poll_frame().unwrap()).unwrap();
        assert_eq!((src, icmp[0]), (VIP, 0), "echo reply from the vIP");
        assert_eq!(&icmp[8..], b"abcdefgh");
        p.engine.handle_frame(&echo(2), now);
        let Some(Event::Echo { token, .. }) = p.engine.poll_event() else {
            panic!("no Echo event")
        };
        p.engine.echo_reply(token, false);
        assert!(
            p.engine.poll_frame().is_none(),
            "no reply when the resource did not answer"
        );
    }

    #[test]
    fn the_vdns_answers_on_53() {
        let mut p = Pair::new(true);
        p.engine
            .set_named_resource(VIP, RESOURCE, "printer", vec![631], vec![]);
        let now = p.now();
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["printer", "netredir", "internal"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let dns = p.engine.dns_addr();
        p.engine
            .handle_frame(&udp_frame(GUEST_IP, dns, 5353, 53, &q), now);
        let (src, sport, dport, answer) = parse_udp(&p.engine.poll_frame().unwrap()).unwrap();
        assert_eq!((src, sport, dport), (dns, 53, 5353));
        assert_eq!(&answer[..2], &[0x12, 0x34]);
        assert!(
            answer.ends_with(&VIP.octets()),
            "the A record carries the vIP"
        );
        assert_eq!(p.engine.counters().dns_queries, 1);
    }

    fn dhcp(msg: DhcpMessageType, requested: Option<Ipv4Addr>) -> Vec<u8> {
        let repr = DhcpRepr {
            message_type: msg,
            transaction_id: 0xabcd,
            secs: 0,
            client_hardware_address: Mac(GUEST_MAC),
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: true,
            requested_ip: requested,
            client_identifier: Some(Mac(GUEST_MAC)),
            server_identifier: None,
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let mut body = vec![0u8; repr.buffer_len()];
        repr.emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
            .unwrap();
        udp_frame(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67, &body)
    }

    fn dhcp_reply(p: &mut Pair) -> Option<(DhcpMessageType, Ipv4Addr, Option<Ipv4Addr>)> {
        let f = p.engine.poll_frame()?;
        let (_, 67, 68, body) = parse_udp(&f)? else {
            return None;
        };
        let pkt = DhcpPacket::new_checked(&body[..]).ok()?;
        let r = DhcpRepr::parse(&pkt).ok()?;
        Some((r.message_type, r.your_ip, r.subnet_mask))
    }

    #[test]
    fn dhcp_offers_acks_and_naks_on_a_dedicated_nic_only() {
        let mut p = Pair::new(true);
        let now = p.now();
        p.engine
            .handle_frame(&dhcp(DhcpMessageType::Discover, None), now);
        assert!(
            p.engine.poll_frame().is_none(),
            "DHCP is off unless the NIC is dedicated"
        );
        p.engine.cfg.dhcp = true;
        p.engine
            .handle_frame(&dhcp(DhcpMessageType::Discover, None), now);
        let pool = Ipv4Addr::new(100, 77, 0, 100);
        assert_eq!(
            dhcp_reply(&mut p),
            Some((
                DhcpMessageType::Offer,
                pool,
                Some(Ipv4Addr::new(255, 255, 0, 0))
            ))
        );
        p.engine
            .handle_frame(&dhcp(DhcpMessageType::Request, Some(pool)), now);
        assert_eq!(
            dhcp_reply(&mut p).map(|r| (r.0, r.1)),
            Some((DhcpMessageType::Ack, pool))
        );
        p.engine.handle_frame(
            &dhcp(DhcpMessageType::Request, Some(Ipv4Addr::new(100, 77, 0, 9))),
            now,
        );
        assert_eq!(dhcp_reply(&mut p).map(|r| r.0), Some(DhcpMessageType::Nak));
        assert_eq!(p.engine.counters().dhcp_replies, 3);
    }
}

#[test]
fn an_unreachable_target_gives_icmp_host_unreachable_not_rst() {
    let mut p = Pair::new(true);
    let h = p.connect(9100, 40100);
    let flow = p.opened_flow();
    let now = p.now();
    p.engine.open_err(flow, Refusal::Unreachable, now).unwrap();
    let frame = p.engine.poll_frame().expect("an ICMP error");
    let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!(ip.next_header(), IpProtocol::Icmp);
    assert_eq!((ip.src_addr(), ip.dst_addr()), (VIP, GUEST_IP));
    assert_eq!(&ip.payload()[..2], &[3, 1], "destination unreachable, host");
    assert!(p.engine.poll_frame().is_none(), "and no RST");
    assert_eq!(p.engine.flow_count(), 0);
    assert_eq!(
        p.sock(h).state(),
        tcp::State::SynSent,
        "the guest's stack decides what to do"
    );
}

#[test]
fn a_guest_waits_for_a_slow_connect_as_long_as_the_agent_does() {
    // A resource whose queue is full answers after two minutes: the guest
    // (still trying, as Linux does for 127 s) gets its connection then,
    // not a reset from the engine's idle timeout at 120 s.
    let mut p = Pair::new(true);
    let h = p.connect(9100, 40200);
    let flow = p.opened_flow();
    for _ in 0..25 {
        p.advance(Duration::from_secs(5));
    }
    assert_eq!(p.engine.flow_count(), 1, "still waiting for the agent");
    assert_eq!(
        p.sock(h).state(),
        tcp::State::SynSent,
        "the guest still tries"
    );
    assert!(
        !p.take_events()
            .iter()
            .any(|e| matches!(e, Event::Reset { .. })),
        "the agent is not told to give up"
    );
    let now = p.now();
    p.engine.open_ok(flow, now).unwrap();
    p.drive();
    assert_eq!(p.sock(h).state(), tcp::State::Established);
}

#[test]
fn a_guest_gone_before_its_handshake_completes_is_reset_after_the_timeout() {
    let mut p = Pair::new(true);
    p.connect(9100, 40250);
    let flow = p.opened_flow();
    // The guest disappears: nothing the engine sends reaches it.
    let now = p.now();
    p.engine.open_ok(flow, now).unwrap();
    for s in 1..=30 {
        p.engine.poll(now + Duration::from_secs(5 * s));
        while p.engine.poll_frame().is_some() {}
    }
    assert_eq!(p.engine.flow_count(), 0, "the half-open flow is freed");
    let mut reset = false;
    while let Some(e) = p.engine.poll_event() {
        reset |= matches!(e, Event::Reset { flow: f } if f == flow);
    }
    assert!(reset, "and the agent told");
}

#[test]
fn a_target_that_never_answers_leaves_the_guest_to_time_out() {
    // The agent's connect timed out: the guest hears nothing (no RST, no
    // ICMP), as from a server that drops SYNs; a SYN it sends again is a
    // new attempt.
    let mut p = Pair::new(true);
    let h = p.connect(9100, 40300);
    let flow = p.opened_flow();
    let now = p.now();
    p.engine.open_err(flow, Refusal::NoAnswer, now).unwrap();
    assert!(p.engine.poll_frame().is_none(), "nothing to the guest");
    assert_eq!(p.engine.flow_count(), 0);
    p.drive();
    assert_eq!(p.sock(h).state(), tcp::State::SynSent);
    p.advance(Duration::from_secs(10));
    assert!(
        matches!(p.take_events().as_slice(), [Event::Open { .. }]),
        "the guest's next SYN opens again"
    );
}

/// IPv6: the same resources at their IPv6 vIPs.
mod ipv6 {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        Icmpv6Packet, Icmpv6Repr, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscRepr,
        RawHardwareAddress, UdpPacket, UdpRepr,
    };

    fn eth_ip6(src: Ipv6Addr, dst: Ipv6Addr, proto: IpProtocol, hop: u8, l4: &[u8]) -> Vec<u8> {
        let eth = EthernetRepr {
            src_addr: Mac(GUEST_MAC),
            dst_addr: Mac(ENGINE_MAC),
            ethertype: EthernetProtocol::Ipv6,
        };
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: proto,
            payload_len: l4.len(),
            hop_limit: hop,
        };
        let mut out = vec![0u8; eth.buffer_len() + ip.buffer_len() + l4.len()];
        let mut f = EthernetFrame::new_unchecked(&mut out[..]);
        eth.emit(&mut f);
        let p = f.payload_mut();
        ip.emit(&mut Ipv6Packet::new_unchecked(&mut p[..]));
        p[ip.buffer_len()..].copy_from_slice(l4);
        out
    }

    fn icmp6_frame(src: Ipv6Addr, dst: Ipv6Addr, hop: u8, icmp: &Icmpv6Repr) -> Vec<u8> {
        let mut l4 = vec![0u8; icmp.buffer_len()];
        icmp.emit(
            &src,
            &dst,
            &mut Icmpv6Packet::new_unchecked(&mut l4[..]),
            &ChecksumCapabilities::default(),
        );
        eth_ip6(src, dst, IpProtocol::Icmpv6, hop, &l4)
    }

    fn udp6_frame(dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let udp = UdpRepr {
            src_port: sport,
            dst_port: dport,
        };
        let mut l4 = vec![0u8; udp.header_len() + payload.len()];
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut l4[..]),
            &IpAddress::Ipv6(GUEST_IP6),
            &IpAddress::Ipv6(dst),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        );
        eth_ip6(GUEST_IP6, dst, IpProtocol::Udp, 64, &l4)
    }

    /// (src, dst, hop limit, next header, payload) of an IPv6 frame to the
    /// guest, after checking its Ethernet header.
    fn ip6_of(frame: &[u8]) -> (Ipv6Addr, Ipv6Addr, u8, IpProtocol, Vec<u8>) {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv6);
        assert_eq!(eth.src_addr(), Mac(ENGINE_MAC));
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        (
            ip.src_addr(),
            ip.dst_addr(),
            ip.hop_limit(),
            ip.next_header(),
            ip.payload().to_vec(),
        )
    }

    /// The ICMPv6 message in a frame to the guest, checksum verified.
    fn icmp6_of(frame: &[u8]) -> (Ipv6Addr, Ipv6Addr, u8, Vec<u8>) {
        let (src, dst, hop, proto, body) = ip6_of(frame);
        assert_eq!(proto, IpProtocol::Icmpv6);
        assert!(
            Icmpv6Packet::new_checked(&body[..])
                .unwrap()
                .verify_checksum(&src, &dst),
            "ICMPv6 checksum"
        );
        (src, dst, hop, body)
    }

    fn solicit(target: Ipv6Addr, hop: u8) -> Vec<u8> {
        let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: target,
            lladdr: Some(RawHardwareAddress::from(Mac(GUEST_MAC))),
        });
        let t = target.octets();
        let snm = Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        );
        icmp6_frame(GUEST_IP6, snm, hop, &ns)
    }

    #[test]
    fn tcp_over_ipv6_finds_the_vip_by_ndp_holds_the_syn_and_moves_bytes() {
        let mut p = Pair::new(true);
        let vip6 = vip6_of(VIP);
        assert_eq!(p.engine.vip6(VIP), vip6);
        assert_eq!(vip6.to_string(), "fd6e:7264::644d:101");
        let h = p.connect_to(IpAddress::Ipv6(vip6), 9100, 40600);
        assert!(
            p.engine.counters().ndp_replies >= 1,
            "the guest's NS was answered"
        );
        let flow = p.opened_flow();
        assert_eq!(p.sock(h).state(), tcp::State::SynSent, "SYN held");
        let now = p.now();
        p.engine.open_ok(flow, now).unwrap();
        p.drive();
        assert_eq!(p.sock(h).state(), tcp::State::Established);
        assert_eq!(
            p.sock(h).remote_endpoint().unwrap().addr,
            IpAddress::Ipv6(vip6)
        );
        p.sock(h).send_slice(b"hello over v6").unwrap();
        p.drive();
        let got: Vec<u8> = p
            .take_events()
            .into_iter()
            .flat_map(|e| match e {
                Event::Data { flow: f, bytes } if f == flow => bytes,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(got, b"hello over v6");
        let now = p.now();
        p.engine.data(flow, b"and back", now).unwrap();
        p.drive();
        let mut buf = [0u8; 64];
        let n = p.sock(h).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"and back");
        // Same resource, same table: one flow per family is two flows.
        assert_eq!(p.engine.flow_count(), 1);
        // (smoltcp's guest stays silent for a second after a neighbour
        // lookup before it asks for another.)
        p.advance(Duration::from_secs(2));
        p.take_events();
        p.connect(9100, 40601);
        let evs = p.take_events();
        assert!(
            matches!(
                evs.as_slice(),
                [Event::Open {
                    resource: RESOURCE,
                    port: 9100,
                    ..
                }]
            ),
            "{evs:?} {:?}",
            p.engine.counters()
        );
        assert_eq!(p.engine.flow_count(), 2);
    }

    #[test]
    fn neighbour_solicitations_are_answered_for_ours_and_vips_only() {
        let mut p = Pair::new(true);
        let now = p.now();
        let (gw, dns, vip6) = (p.engine.gateway6(), p.engine.dns_addr6(), vip6_of(VIP));
        for (target, router) in [(gw, true), (dns, false), (vip6, false)] {
            p.engine.handle_frame(&solicit(target, 255), now);
            let (src, dst, hop, body) = icmp6_of(&p.engine.poll_frame().expect("an NA"));
            assert_eq!((src, dst, hop), (target, GUEST_IP6, 255));
            let pkt = Icmpv6Packet::new_checked(&body[..]).unwrap();
            let repr = NdiscRepr::parse(&pkt).unwrap();
            let NdiscRepr::NeighborAdvert {
                flags,
                target_addr,
                lladdr,
            } = repr
            else {
                panic!("{repr:?}")
            };
            assert_eq!(target_addr, target);
            assert_eq!(lladdr, Some(RawHardwareAddress::from(Mac(ENGINE_MAC))));
            assert!(flags.contains(NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE));
            assert_eq!(flags.contains(NdiscNeighborFlags::ROUTER), router);
        }
        // The guest's own address (duplicate detection), an address that
        // is no vIP, one outside the prefix: silence.
        let other = vip6_of(Ipv4Addr::new(100, 77, 9, 9));
        for target in [GUEST_IP6, other, "fd00::1".parse().unwrap()] {
            p.engine.handle_frame(&solicit(target, 255), now);
            assert!(p.engine.poll_frame().is_none(), "{target}");
        }
        // NDP from beyond the link (hop limit not 255) is refused.
        let before = p.engine.counters().malformed;
        p.engine.handle_frame(&solicit(vip6, 64), now);
        assert!(p.engine.poll_frame().is_none());
        assert_eq!(p.engine.counters().malformed, before + 1);
        assert_eq!(p.engine.counters().ndp_replies, 3);
    }

    /// The options of a router advertisement: (type, body) in order.
    fn ra_options(body: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut opts = Vec::new();
        let mut rest = &body[16..];
        while rest.len() >= 8 {
            let len = usize::from(rest[1]) * 8;
            assert!(len >= 8 && len <= rest.len(), "option length");
            opts.push((rest[0], rest[2..len].to_vec()));
            rest = &rest[len..];
        }
        assert!(rest.is_empty());
        opts
    }

    #[test]
    fn a_router_solicitation_gets_prefix_rdnss_and_dnssl_on_a_dedicated_nic_only() {
        let rs = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit {
            lladdr: Some(RawHardwareAddress::from(Mac(GUEST_MAC))),
        });
        let ll: Ipv6Addr = "fe80::2".parse().unwrap();
        let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();

        let mut shared = Pair::new(true);
        let now = shared.now();
        shared
            .engine
            .handle_frame(&icmp6_frame(ll, all_routers, 255, &rs), now);
        shared.engine.poll(now);
        assert!(
            shared.engine.poll_frame().is_none(),
            "no RA on a shared NIC"
        );

        let mut cfg = EngineConfig::new(Ipv4Addr::new(100, 77, 0, 0), 16, ENGINE_MAC);
        cfg.dhcp = true;
        let mut e = Engine::new(cfg, now);
        e.handle_frame(&icmp6_frame(ll, all_routers, 255, &rs), now);
        let (src, dst, hop, body) = icmp6_of(&e.poll_frame().expect("an RA"));
        assert_eq!(src, e.link_local(), "RAs come from a link-local address");
        assert_eq!(src.to_string(), "fe80::ff:fe00:1");
        assert_eq!((dst, hop, body[0]), (ll, 255, 134));
        assert_eq!(
            u16::from_be_bytes([body[6], body[7]]),
            0,
            "not a default router"
        );
        let opts = ra_options(&body);
        let kinds: Vec<u8> = opts.iter().map(|o| o.0).collect();
        assert_eq!(
            kinds,
            [1, 5, 3, 25, 31],
            "lladdr, MTU, prefix, RDNSS, DNSSL"
        );
        let prefix = &opts[2].1;
        assert_eq!(prefix[0], 64);
        assert_eq!(prefix[1] & 0xc0, 0xc0, "on-link and autonomous (SLAAC)");
        assert_eq!(&prefix[14..22], &DEFAULT_PREFIX6.octets()[..8]);
        assert_eq!(
            &opts[3].1[6..],
            &e.dns_addr6().octets(),
            "RDNSS is the vDNS"
        );
        assert!(
            opts[4].1.starts_with(&[0, 0, 0, 0, 0x0e, 0x10, 8]),
            "{:?}",
            opts[4].1
        );
        assert!(opts[4].1[6..].starts_with(b"\x08netredir\x08internal\x00"));
        assert_eq!(e.counters().router_adverts, 1);

        // Unsolicited, to all nodes, every RA_INTERVAL once the guest is known.
        e.poll(now);
        let (_, dst, _, _) = icmp6_of(&e.poll_frame().expect("an unsolicited RA"));
        assert_eq!(dst, "ff02::1".parse::<Ipv6Addr>().unwrap());
        e.poll(now + Duration::from_secs(1));
        assert!(e.poll_frame().is_none());
        assert!(e.poll_delay(now).unwrap() <= ip6::RA_INTERVAL);
        e.poll(now + ip6::RA_INTERVAL);
        assert!(e.poll_frame().is_some());
    }

    fn echo6(dst: Ipv6Addr, seq: u16) -> Vec<u8> {
        let icmp = Icmpv6Repr::EchoRequest {
            ident: 9,
            seq_no: seq,
            data: b"ping6",
        };
        icmp6_frame(GUEST_IP6, dst, 64, &icmp)
    }

    #[test]
    fn echo6_is_answered_by_ours_at_once_and_for_a_vip_as_the_agent_says() {
        let mut p = Pair::new(true);
        let now = p.now();
        let gw = p.engine.gateway6();
        p.engine.handle_frame(&echo6(gw, 1), now);
        let (src, dst, _, body) = icmp6_of(&p.engine.poll_frame().expect("echo reply"));
        assert_eq!((src, dst, body[0]), (gw, GUEST_IP6, 129));
        assert_eq!(&body[8..], b"ping6");

        let vip6 = vip6_of(VIP);
        p.engine.handle_frame(&echo6(vip6, 2), now);
        let Some(Event::Echo {
            token,
            resource: RESOURCE,
            size: 5,
        }) = p.engine.poll_event()
        else {
            panic!("no Echo event")
        };
        assert!(p.engine.poll_frame().is_none(), "waits for the agent");
        p.engine.echo_reply(token, true);
        let (src, _, _, body) = icmp6_of(&p.engine.poll_frame().expect("echo reply"));
        assert_eq!((src, body[0]), (vip6, 129));
        p.engine.handle_frame(&echo6(vip6, 3), now);
        let Some(Event::Echo { token, .. }) = p.engine.poll_event() else {
            panic!("no Echo event")
        };
        p.engine.echo_reply(token, false);
        assert!(p.engine.poll_frame().is_none());
    }

    #[test]
    fn udp6_reaches_the_vdns_and_resources_and_refuses_the_rest() {
        let mut p = Pair::new(true);
        p.engine
            .set_named_resource(VIP, RESOURCE, "printer", vec![631], vec![161]);
        let now = p.now();
        let vip6 = vip6_of(VIP);
        // vDNS at ::53: AAAA of the printer is its IPv6 vIP.
        let mut q = vec![0x56, 0x78, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["printer", "netredir", "internal"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 28, 0, 1]);
        let dns = p.engine.dns_addr6();
        assert_eq!(dns.to_string(), "fd6e:7264::53");
        p.engine.handle_frame(&udp6_frame(dns, 5353, 53, &q), now);
        let (src, dst, _, proto, body) = ip6_of(&p.engine.poll_frame().expect("an answer"));
        assert_eq!((src, dst, proto), (dns, GUEST_IP6, IpProtocol::Udp));
        let udp = UdpPacket::new_checked(&body[..]).unwrap();
        assert!(udp.verify_checksum(&IpAddress::Ipv6(src), &IpAddress::Ipv6(dst)));
        assert_eq!(&udp.payload()[..2], &[0x56, 0x78]);
        assert!(
            udp.payload().ends_with(&vip6.octets()),
            "AAAA carries the vIP6"
        );

        // An exported UDP port opens a flow; the answer comes from the vIP6.
        p.engine
            .handle_frame(&udp6_frame(vip6, 5000, 161, b"get"), now);
        let Some(Event::OpenUdp {
            flow, port: 161, ..
        }) = p.engine.poll_event()
        else {
            panic!("no OpenUdp")
        };
        p.engine.open_ok(flow, now).unwrap();
        assert_eq!(
            p.engine.poll_event(),
            Some(Event::Datagram {
                flow,
                bytes: b"get".to_vec()
            })
        );
        p.engine.datagram(flow, b"sysDescr", now).unwrap();
        let (src, _, _, _, body) = ip6_of(&p.engine.poll_frame().unwrap());
        assert_eq!(src, vip6);
        assert_eq!(&body[8..], b"sysDescr");

        // A port not exported: ICMPv6 destination unreachable, port.
        p.engine
            .handle_frame(&udp6_frame(vip6, 5000, 162, b"trap"), now);
        let (src, _, _, body) = icmp6_of(&p.engine.poll_frame().unwrap());
        assert_eq!((src, body[0], body[1]), (vip6, 1, 4));
    }

    #[test]
    fn an_unreachable_ipv6_target_gives_icmpv6_address_unreachable() {
        let mut p = Pair::new(true);
        let vip6 = vip6_of(VIP);
        let h = p.connect_to(IpAddress::Ipv6(vip6), 9100, 40700);
        let flow = p.opened_flow();
        let now = p.now();
        p.engine.open_err(flow, Refusal::Unreachable, now).unwrap();
        let (src, dst, _, body) = icmp6_of(&p.engine.poll_frame().expect("an ICMPv6 error"));
        assert_eq!((src, dst), (vip6, GUEST_IP6));
        assert_eq!(&body[..2], &[1, 3], "destination unreachable, address");
        // The quote is the guest's SYN: its header and ports.
        assert_eq!(&body[8 + 24..8 + 40], &vip6.octets());
        assert_eq!(&body[8 + 40..8 + 42], &40700u16.to_be_bytes());
        assert!(p.engine.poll_frame().is_none(), "and no RST");
        assert_eq!(p.sock(h).state(), tcp::State::SynSent);
    }

    #[test]
    fn ipv6_fragments_and_junk_are_counted_not_fatal() {
        let mut p = Pair::new(true);
        let now = p.now();
        let vip6 = vip6_of(VIP);
        let frag = eth_ip6(
            GUEST_IP6,
            vip6,
            IpProtocol::Ipv6Frag,
            64,
            &[6, 0, 0, 1, 0, 0, 0, 1],
        );
        p.engine.handle_frame(&frag, now);
        assert_eq!(p.engine.counters().unsupported, 1);
        let mut short = eth_ip6(GUEST_IP6, vip6, IpProtocol::Tcp, 64, &[0; 20]);
        short.truncate(14 + 30);
        p.engine.handle_frame(&short, now);
        let bad_icmp = eth_ip6(GUEST_IP6, vip6, IpProtocol::Icmpv6, 255, &[135, 0, 0]);
        p.engine.handle_frame(&bad_icmp, now);
        assert_eq!(p.engine.counters().malformed, 2);
        assert!(p.engine.poll_frame().is_none());
    }
}
