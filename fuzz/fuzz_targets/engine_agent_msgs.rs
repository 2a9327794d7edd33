//! The engine driven by a hostile *agent*: a guest TCP/IP stack (smoltcp,
//! Ethernet, in memory, virtual clock) opens TCP connections (IPv4 and
//! IPv6) to an exported resource, sends and reads data, closes and aborts,
//! and sends UDP datagrams and pings (built with `smoltcp::wire`); a fuzzed
//! script plays the agent with `open_ok`, `open_err`, `data`, `window`,
//! `fin`, `reset`, `datagram` and `echo_reply` on flow ids taken from the
//! engine's events or made up, with fuzzed sizes, plus `set_online`,
//! `set_accepting` and jumps of the clock.
//!
//! Asserts: never a panic; `flow_count` never exceeds `max_flows`; frames
//! to the guest fit its MTU. And the flow-control contract, tracked from
//! the engine's own events: the engine never sends the agent more than the
//! agent granted (initial window plus `window` credits), never grants the
//! agent more than `EngineConfig::window` outstanding, never refuses data
//! within what it granted, and refuses data beyond it; it sends Data,
//! Window and Datagram events only for flows it opened; and bytes arrive
//! unchanged and in order both ways (the guest's stream at the agent, the
//! agent's stream at the guest).
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_datapath::engine::{Engine, EngineConfig, Event, FlowError, MAX_CHUNK, Refusal};
use smoltcp::iface::{Config as IfConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, Icmpv4Packet,
    Icmpv4Repr, IpAddress, IpCidr, IpEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket,
    UdpRepr,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

const ENGINE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const VIP: Ipv4Addr = Ipv4Addr::new(100, 77, 1, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(100, 77, 0, 2);
const GUEST_IP6: Ipv6Addr = Ipv6Addr::new(0xfd6e, 0x7264, 0, 0, 0, 0, 0, 2);
const MAX_FLOWS: usize = 6;
const WINDOW: u32 = 16 * 1024;
const PEER_WINDOW: u32 = 12 * 1024;
const MTU: usize = 1500;
/// Guest sockets made per input, at most.
const MAX_GUEST_SOCKETS: usize = 12;

/// The byte at `off` in the guest's stream and in the agent's stream.
fn guest_byte(off: u64) -> u8 {
    (off % 251) as u8
}
fn agent_byte(off: u64) -> u8 {
    (off % 241) as u8 ^ 0x5a
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
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
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MTU + 14;
        c
    }
}

/// What the agent knows of one TCP flow, from the engine's events.
#[derive(Default)]
struct TcpFlow {
    opened: bool,
    /// Bytes the engine granted the agent and the agent has not used.
    allowed: u64,
    /// Bytes the agent granted the engine and the engine has not used.
    credit: u32,
    fin_sent: bool,
    /// Offsets in the guest's stream (received) and the agent's (sent).
    rx_off: u64,
    tx_off: u64,
}

struct GuestSock {
    handle: SocketHandle,
    reading: bool,
    tx_off: u64,
    rx_off: u64,
}

struct Harness {
    engine: Engine,
    guest: Interface,
    wire: Wire,
    socks: SocketSet<'static>,
    guest_socks: Vec<GuestSock>,
    t0: Instant,
    elapsed: Duration,
    tcp: HashMap<u32, TcpFlow>,
    udp: HashSet<u32>,
    /// Flow ids seen, most recent last (also ended ones: an agent may be late).
    seen: Vec<u32>,
    tokens: Vec<u32>,
    next_port: u16,
}

impl Harness {
    fn now(&self) -> Instant {
        self.t0 + self.elapsed
    }

    fn smol_now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.elapsed.as_micros() as i64)
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Open { flow, .. } => {
                assert!(
                    !self.tcp.contains_key(&flow) && !self.udp.contains(&flow),
                    "flow {flow} opened twice"
                );
                self.tcp.insert(flow, TcpFlow::default());
                self.seen.push(flow);
            }
            Event::OpenUdp { flow, .. } => {
                assert!(
                    !self.tcp.contains_key(&flow) && !self.udp.contains(&flow),
                    "flow {flow} opened twice"
                );
                self.udp.insert(flow);
                self.seen.push(flow);
            }
            Event::Data { flow, bytes } => {
                assert!(
                    bytes.len() <= MAX_CHUNK,
                    "{} bytes in one Data",
                    bytes.len()
                );
                let f = self
                    .tcp
                    .get_mut(&flow)
                    .unwrap_or_else(|| panic!("Data for flow {flow}, not open"));
                assert!(f.opened, "Data for flow {flow} before OpenOk");
                assert!(
                    bytes.len() as u64 <= u64::from(f.credit),
                    "flow {flow}: engine sent {} bytes with {} of credit",
                    bytes.len(),
                    f.credit
                );
                f.credit -= bytes.len() as u32;
                for (k, b) in bytes.iter().enumerate() {
                    assert_eq!(
                        *b,
                        guest_byte(f.rx_off + k as u64),
                        "flow {flow}: guest stream corrupt at {}",
                        f.rx_off + k as u64
                    );
                }
                f.rx_off += bytes.len() as u64;
            }
            Event::Window { flow, credit } => {
                let f = self
                    .tcp
                    .get_mut(&flow)
                    .unwrap_or_else(|| panic!("Window for flow {flow}, not open"));
                assert!(f.opened, "Window for flow {flow} before OpenOk");
                f.allowed += u64::from(credit);
                assert!(
                    f.allowed <= u64::from(WINDOW),
                    "flow {flow}: agent may send {} bytes, more than the window {WINDOW}",
                    f.allowed
                );
            }
            Event::Fin { flow } => {
                assert!(
                    self.tcp.contains_key(&flow),
                    "Fin for flow {flow}, not open"
                );
            }
            Event::Reset { flow } | Event::Closed { flow } => {
                self.tcp.remove(&flow);
                self.udp.remove(&flow);
            }
            Event::Datagram { flow, bytes } => {
                assert!(
                    self.udp.contains(&flow),
                    "Datagram for UDP flow {flow}, not open"
                );
                assert!(bytes.len() <= 2000);
            }
            Event::Echo { token, .. } => self.tokens.push(token),
        }
    }

    /// Steps guest and engine until neither has anything to say.
    fn drive(&mut self) {
        let mut buf = [0u8; 4096];
        for _ in 0..64 {
            let t = self.smol_now();
            let now = self.now();
            self.guest.poll(t, &mut self.wire, &mut self.socks);
            let mut moved = false;
            while let Some(f) = self.wire.from_guest.pop_front() {
                self.engine.handle_frame(&f, now);
                moved = true;
            }
            self.engine.poll(now);
            while let Some(f) = self.engine.poll_frame() {
                assert!(f.len() <= MTU + 14, "a {}-byte frame to the guest", f.len());
                self.wire.to_guest.push_back(f);
                moved = true;
            }
            while let Some(e) = self.engine.poll_event() {
                self.event(e);
            }
            for g in &mut self.guest_socks {
                let s = self.socks.get_mut::<tcp::Socket>(g.handle);
                while g.reading && s.can_recv() {
                    let Ok(n) = s.recv_slice(&mut buf) else { break };
                    if n == 0 {
                        break;
                    }
                    for (k, b) in buf[..n].iter().enumerate() {
                        assert_eq!(
                            *b,
                            agent_byte(g.rx_off + k as u64),
                            "agent stream corrupt at {}",
                            g.rx_off + k as u64
                        );
                    }
                    g.rx_off += n as u64;
                    moved = true;
                }
            }
            assert!(
                self.engine.flow_count() <= MAX_FLOWS,
                "{} flows",
                self.engine.flow_count()
            );
            if !moved {
                return;
            }
        }
    }

    /// A flow id: one the engine announced (by index), or made up.
    fn pick_flow(&self, input: &mut Input) -> u32 {
        let sel = input.u8();
        if sel >= 0xf0 || self.seen.is_empty() {
            return match sel & 3 {
                0 => 0,
                1 => u32::MAX,
                2 => self.seen.last().map_or(1, |f| f + 1),
                _ => input.u32(),
            };
        }
        // Recent flows first.
        self.seen[self.seen.len() - 1 - usize::from(sel) % self.seen.len()]
    }

    fn guest_frame(&mut self, ip: &[u8]) {
        let eth = EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress(ENGINE_MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut out = vec![0u8; eth.buffer_len() + ip.len()];
        let mut f = EthernetFrame::new_unchecked(&mut out[..]);
        eth.emit(&mut f);
        f.payload_mut().copy_from_slice(ip);
        self.engine.handle_frame(&out, self.now());
    }

    fn guest_udp(&mut self, sport: u16, dport: u16, payload: &[u8]) {
        let udp = UdpRepr {
            src_port: sport,
            dst_port: dport,
        };
        let ip = Ipv4Repr {
            src_addr: GUEST_IP,
            dst_addr: VIP,
            next_header: IpProtocol::Udp,
            payload_len: 8 + payload.len(),
            hop_limit: 64,
        };
        let mut b = vec![0u8; ip.buffer_len() + 8 + payload.len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut b[..]), &caps);
        let hl = ip.buffer_len();
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut b[hl..]),
            &IpAddress::Ipv4(GUEST_IP),
            &IpAddress::Ipv4(VIP),
            payload.len(),
            |p| p.copy_from_slice(payload),
            &caps,
        );
        self.guest_frame(&b);
    }

    fn guest_ping(&mut self, ident: u16, seq_no: u16, data: &[u8]) {
        let icmp = Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        };
        let ip = Ipv4Repr {
            src_addr: GUEST_IP,
            dst_addr: VIP,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let mut b = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut b[..]), &caps);
        let hl = ip.buffer_len();
        icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut b[hl..]), &caps);
        self.guest_frame(&b);
    }

    fn connect(&mut self, port: u16, v6: bool) {
        if self.guest_socks.len() >= MAX_GUEST_SOCKETS {
            return;
        }
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 8 * 1024]),
            tcp::SocketBuffer::new(vec![0; 8 * 1024]),
        );
        let addr = if v6 {
            IpAddress::Ipv6(netredir_datapath::engine::vip6(
                netredir_datapath::engine::DEFAULT_PREFIX6,
                VIP,
            ))
        } else {
            IpAddress::Ipv4(VIP)
        };
        self.next_port += 1;
        if s.connect(
            self.guest.context(),
            IpEndpoint::new(addr, port),
            self.next_port,
        )
        .is_err()
        {
            return;
        }
        let handle = self.socks.add(s);
        self.guest_socks.push(GuestSock {
            handle,
            reading: true,
            tx_off: 0,
            rx_off: 0,
        });
    }

    /// The agent's `data` on `flow`, checked against the window it has.
    fn agent_data(&mut self, flow: u32, n: usize) {
        let now = self.now();
        let (off, model) = match self.tcp.get(&flow) {
            Some(f) => (f.tx_off, Some((f.opened, f.fin_sent, f.allowed))),
            None => (0, None),
        };
        let bytes: Vec<u8> = (0..n as u64).map(|k| agent_byte(off + k)).collect();
        let r = self.engine.data(flow, &bytes, now);
        if let Some((true, false, allowed)) = model {
            if n as u64 <= allowed {
                assert!(
                    r.is_ok(),
                    "flow {flow}: {n} bytes within the {allowed} granted refused: {r:?}"
                );
            } else {
                assert!(
                    matches!(r, Err(FlowError::WindowExceeded(..))),
                    "flow {flow}: {n} bytes beyond the {allowed} granted: {r:?}"
                );
            }
        }
        if r.is_ok() {
            let f = self.tcp.get_mut(&flow).unwrap_or_else(|| {
                panic!("engine took data for flow {flow}, which it never opened")
            });
            f.allowed -= n as u64;
            f.tx_off += n as u64;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let t0 = Instant::now();
    let c = input.u8();
    let mut cfg = EngineConfig::new(Ipv4Addr::new(100, 77, 0, 0), 16, ENGINE_MAC);
    cfg.window = WINDOW;
    cfg.peer_window = PEER_WINDOW;
    cfg.socket_buffer = [4096, 8192][usize::from(c & 1)];
    cfg.max_flows = MAX_FLOWS;
    cfg.max_opening = 3;
    cfg.new_flow_burst = 8;
    cfg.new_flow_rate = 4;
    cfg.dhcp = c & 2 != 0;
    let mut engine = Engine::new(cfg, t0);
    // No name: no vDNS records to build per input (the vdns target has those).
    engine.set_named_resource(VIP, 7, "", vec![9100, 631], vec![161]);
    engine.set_online(true, t0);

    let mut wire = Wire::default();
    let mut gcfg = IfConfig::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
    gcfg.random_seed = u64::from(c);
    let mut guest = Interface::new(gcfg, &mut wire, SmolInstant::ZERO);
    guest.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(GUEST_IP), 16));
        let _ = a.push(IpCidr::new(IpAddress::Ipv6(GUEST_IP6), 64));
    });
    let mut h = Harness {
        engine,
        guest,
        wire,
        socks: SocketSet::new(vec![]),
        guest_socks: Vec::new(),
        t0,
        elapsed: Duration::ZERO,
        tcp: HashMap::new(),
        udp: HashSet::new(),
        seen: Vec::new(),
        tokens: Vec::new(),
        next_port: 40000,
    };

    let mut ops = 0;
    while !input.0.is_empty() && ops < 256 {
        ops += 1;
        let op = input.u8();
        let now = h.now();
        match op % 32 {
            // The guest.
            0..=2 => {
                let sel = input.u8();
                let port = [9100, 631, 80, 9100][usize::from(sel & 3)];
                h.connect(port, sel & 4 != 0);
            }
            3..=4 => {
                let i = usize::from(input.u8());
                let n = usize::from(input.u16()) % 20_000;
                if !h.guest_socks.is_empty() {
                    let k = i % h.guest_socks.len();
                    let g = &mut h.guest_socks[k];
                    let s = h.socks.get_mut::<tcp::Socket>(g.handle);
                    let bytes: Vec<u8> = (0..n as u64).map(|j| guest_byte(g.tx_off + j)).collect();
                    if let Ok(sent) = s.send_slice(&bytes) {
                        g.tx_off += sent as u64;
                    }
                }
            }
            5 => {
                let i = usize::from(input.u8());
                if !h.guest_socks.is_empty() {
                    let k = i % h.guest_socks.len();
                    let g = &mut h.guest_socks[k];
                    g.reading = !g.reading;
                }
            }
            6 => {
                let i = usize::from(input.u8());
                if !h.guest_socks.is_empty() {
                    let k = i % h.guest_socks.len();
                    let s = h.socks.get_mut::<tcp::Socket>(h.guest_socks[k].handle);
                    if i & 0x80 != 0 {
                        s.abort();
                    } else {
                        s.close();
                    }
                }
            }
            7 => {
                let sel = input.u8();
                let n = usize::from(input.u8()) * 4;
                let payload: Vec<u8> = (0..n).map(|k| k as u8).collect();
                let dport = if sel & 1 == 0 { 161 } else { 162 };
                h.guest_udp(50000 + u16::from(sel >> 1 & 7), dport, &payload);
            }
            8 => {
                let id = input.u16();
                let n = usize::from(input.u8());
                h.guest_ping(id, id, &vec![0xa5; n]);
            }
            // The agent.
            9..=10 => {
                let flow = h.pick_flow(&mut input);
                let r = h.engine.open_ok(flow, now);
                if r.is_ok() {
                    if let Some(f) = h.tcp.get_mut(&flow) {
                        if !f.opened {
                            f.opened = true;
                            f.allowed = u64::from(WINDOW);
                            f.credit = PEER_WINDOW;
                        }
                    } else {
                        assert!(
                            h.udp.contains(&flow),
                            "OpenOk for flow {flow} accepted, never opened"
                        );
                    }
                }
            }
            11 => {
                let flow = h.pick_flow(&mut input);
                let why = match input.u8() % 3 {
                    0 => Refusal::Refused,
                    1 => Refusal::Unreachable,
                    _ => Refusal::NoAnswer,
                };
                if h.engine.open_err(flow, why, now).is_ok() {
                    h.tcp.remove(&flow);
                    h.udp.remove(&flow);
                }
            }
            12..=16 => {
                let flow = h.pick_flow(&mut input);
                let sel = input.u16();
                let allowed = h.tcp.get(&flow).map_or(0, |f| f.allowed as usize);
                // Mostly within the window (exactly all of it, or some), sometimes beyond.
                let n = match sel >> 14 {
                    0 => allowed,
                    1 => usize::from(sel & 0x3fff) % (allowed + 1),
                    2 => allowed + 1 + usize::from(sel & 0xff),
                    _ => usize::from(sel & 0x3fff) * 4,
                };
                h.agent_data(flow, n.min(MAX_CHUNK));
            }
            17..=18 => {
                let flow = h.pick_flow(&mut input);
                let credit = match input.u8() {
                    0 => u32::MAX,
                    k => u32::from(k) * 512,
                };
                if h.engine.window(flow, credit, now).is_ok()
                    && let Some(f) = h.tcp.get_mut(&flow)
                    && f.opened
                {
                    f.credit = f.credit.saturating_add(credit);
                }
            }
            19 => {
                let flow = h.pick_flow(&mut input);
                if h.engine.fin(flow, now).is_ok()
                    && let Some(f) = h.tcp.get_mut(&flow)
                {
                    f.fin_sent = true;
                }
            }
            20 => {
                let flow = h.pick_flow(&mut input);
                if h.engine.reset(flow, now).is_ok() {
                    h.tcp.remove(&flow);
                    h.udp.remove(&flow);
                }
            }
            21..=22 => {
                let flow = h.pick_flow(&mut input);
                let n = usize::from(input.u16()) % 2048;
                let r = h.engine.datagram(flow, &vec![0x42; n], now);
                if h.udp.contains(&flow) {
                    assert!(r.is_ok(), "datagram for open UDP flow {flow}: {r:?}");
                }
            }
            23 => {
                let sel = input.u8();
                let token = if h.tokens.is_empty() || sel == 0xff {
                    input.u32()
                } else {
                    h.tokens[usize::from(sel) % h.tokens.len()]
                };
                h.engine.echo_reply(token, sel & 1 == 0);
            }
            24 => {
                let online = input.u8() & 1 == 0;
                h.engine.set_online(online, now);
                if !online {
                    // Every flow is reset without a word to the agent.
                    h.tcp.clear();
                    h.udp.clear();
                }
            }
            25 => h.engine.set_accepting(input.u8() & 1 == 0),
            // Time.
            26..=29 => h.elapsed += Duration::from_millis(u64::from(input.u8()) * 20),
            30 => h.elapsed += Duration::from_secs(u64::from(input.u8())),
            _ => {}
        }
        h.drive();
    }
});
