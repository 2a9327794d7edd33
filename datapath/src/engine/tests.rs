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
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        );
        s.connect(
            self.guest.context(),
            IpEndpoint::new(IpAddress::Ipv4(VIP), port),
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
fn new_flows_beyond_the_rate_limit_get_rst() {
    let mut p = Pair::new(true);
    p.engine.cfg.new_flow_burst = 3;
    p.engine.cfg.new_flow_rate = 1;
    p.engine.tokens = 3.0;
    for port in 0..3 {
        p.connect(9100, 41000 + port);
    }
    assert_eq!(p.take_events().len(), 3, "three opens within the burst");
    let h = p.connect(9100, 41010);
    assert_eq!(p.sock(h).state(), tcp::State::Closed, "the fourth gets RST");
    assert_eq!(p.engine.counters().refused_rate, 1);
    // A second later one more token has come.
    p.advance(Duration::from_millis(1100));
    p.connect(9100, 41011);
    assert!(matches!(p.take_events().as_slice(), [Event::Open { .. }]));
}
