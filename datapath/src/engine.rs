//! The per-VM engine: guest frames in, guest frames and tunnel events out.
//!
//! Theory of operation. A frame from the VM arrives through
//! [`Engine::handle_frame`]. ARP requests and IPv6 neighbour solicitations
//! for a vIP (or the gateway, or the vDNS) are answered here. TCP over IPv4
//! and IPv6 is handed to one smoltcp interface in any-IP mode (Ethernet is
//! stripped here, so smoltcp runs on `Medium::Ip`).
//!
//! Every resource has a vIP in the IPv4 subnet and one in the IPv6 /64
//! prefix: the IPv6 vIP is the prefix with the IPv4 vIP in its last 32 bits
//! ([`Engine::vip6`]), so both lead to the same resource and flow table.
//!
//! A SYN to `vip:port` of an exported resource creates a smoltcp socket
//! listening on exactly that endpoint, with its SYN-ACK paused, and emits
//! [`Event::Open`]: the guest's handshake is held. [`Engine::open_ok`]
//! releases the SYN-ACK; [`Engine::open_err`] aborts the socket, which
//! answers the guest with RST. A SYN the engine will not carry (no such
//! vIP, port not exported, no agent, over a limit) reaches smoltcp with no
//! socket to match, and smoltcp answers RST at once.
//!
//! Bytes move with credits: the engine reads from a socket only as much as
//! the agent has granted ([`Engine::window`]), and grants the agent more
//! ([`Event::Window`]) only as bytes it sent move into the socket's send
//! buffer. The socket's receive window is the backpressure toward the
//! guest. Per flow the engine holds at most its socket buffers plus the
//! window it granted.
//!
//! The engine never reads a clock: every entry point takes `now`, and
//! [`Engine::poll_delay`] says when to call [`Engine::poll`] again.

use crate::dns::{DnsResource, VDns};
use crate::mdns::Mdns;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet,
    TcpPacket,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Flow id, unique within one engine; the tunnel uses it as is.
pub type FlowId = u32;
/// The agent's id for a resource, as announced in its export.
pub type ResourceId = u32;

/// What the engine needs to know to serve one VM.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Network address of the virtual subnet.
    pub subnet: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The IPv6 /64 prefix (a ULA) beside the IPv4 subnet.
    pub prefix6: Ipv6Addr,
    /// MAC address the engine answers from (the host end of the VM's NIC).
    pub mac: [u8; 6],
    /// IP MTU toward the guest.
    pub mtu: usize,
    /// Bytes the agent may send on a new flow before we grant more.
    pub window: u32,
    /// Bytes we may send the agent on a new flow before it grants more.
    pub peer_window: u32,
    /// Size of each smoltcp socket buffer (receive and send).
    pub socket_buffer: usize,
    /// Most concurrent flows; SYNs beyond are dropped (the guest retries).
    pub max_flows: usize,
    /// Most flows waiting for the agent's answer (each costs its SYN and
    /// a socket without buffers here, a connecting socket at the agent);
    /// SYNs beyond wait for room (see `max_waiting`).
    pub max_opening: usize,
    /// Most SYNs held, in order of arrival, while a limit (`max_opening`,
    /// `max_flows`) is reached: each is let in as soon as a
    /// flow ends, as a server's accept queue takes connections, so that a
    /// guest waits no longer than it must (dropped, it would come back only
    /// at its next retry, 1, 2, 4... 64 s later). SYNs beyond are dropped.
    /// Each costs its SYN, not a flow's buffers.
    pub max_waiting: usize,
    /// Seed for TCP initial sequence numbers.
    pub seed: u64,
    /// DNS zone the vDNS answers for.
    pub zone: String,
    /// Serve DHCPv4 (the VM's NIC is only for netredir).
    pub dhcp: bool,
    /// Most bytes of TCP buffers (two socket buffers and a window per flow)
    /// all open flows of this VM may hold. Beyond, a flow the agent has
    /// connected waits to complete the guest's handshake until one ends;
    /// the bytes its resource sends meanwhile count against 1/16 of this.
    pub max_memory: usize,
    /// New flows per second a guest may open, sustained.
    pub new_flow_rate: u32,
    /// New flows a guest may open at once.
    pub new_flow_burst: u32,
}

impl EngineConfig {
    /// Defaults for a subnet: 256 KiB buffers and window, 4096 flows but at
    /// most 96 MiB of their buffers (128 open TCP flows), 512 waiting for
    /// the agent and 1024 SYNs for room, 200 new flows a second (bursts of
    /// 400).
    pub fn new(subnet: Ipv4Addr, prefix_len: u8, mac: [u8; 6]) -> Self {
        Self {
            subnet,
            prefix_len,
            prefix6: DEFAULT_PREFIX6,
            mac,
            mtu: 1500,
            window: 256 * 1024,
            peer_window: 1024 * 1024,
            socket_buffer: 256 * 1024,
            max_flows: 4096,
            max_opening: 512,
            max_waiting: 1024,
            seed: 0,
            zone: "netredir.internal".into(),
            dhcp: false,
            max_memory: 96 << 20,
            new_flow_rate: 200,
            new_flow_burst: 400,
        }
    }
}

/// The IPv6 /64 used unless configured: a ULA (`fd00::/8`), fixed so that
/// vIPs stay the same from run to run.
pub const DEFAULT_PREFIX6: Ipv6Addr = Ipv6Addr::new(0xfd6e, 0x7264, 0, 0, 0, 0, 0, 0);

/// What the engine wants sent through the tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Ask the agent to connect `resource:port` for `flow`.
    Open {
        /// New flow.
        flow: FlowId,
        /// Target resource.
        resource: ResourceId,
        /// Target port.
        port: u16,
    },
    /// Bytes from the guest.
    Data {
        /// The flow.
        flow: FlowId,
        /// In order, at most [`MAX_CHUNK`] bytes.
        bytes: Vec<u8>,
    },
    /// The agent may send `credit` more bytes on `flow`.
    Window {
        /// The flow.
        flow: FlowId,
        /// Extra bytes.
        credit: u32,
    },
    /// The guest closed its sending half.
    Fin {
        /// The flow.
        flow: FlowId,
    },
    /// The flow is gone (guest reset it, or it failed here).
    Reset {
        /// The flow.
        flow: FlowId,
    },
    /// Ask the agent for a UDP socket to `resource:port` for `flow`.
    OpenUdp {
        /// New flow.
        flow: FlowId,
        /// Target resource.
        resource: ResourceId,
        /// Target UDP port.
        port: u16,
    },
    /// One datagram from the guest.
    Datagram {
        /// The flow.
        flow: FlowId,
        /// Its payload.
        bytes: Vec<u8>,
    },
    /// Ask the agent to ping `resource` (the guest pinged its vIP).
    Echo {
        /// Quoted back in the answer.
        token: u32,
        /// Resource to ping.
        resource: ResourceId,
        /// Size of the guest's payload.
        size: u16,
    },
    /// The flow ended normally (both sides closed); nothing to send, but
    /// whatever the tunnel keeps for it can go.
    Closed {
        /// The flow.
        flow: FlowId,
    },
}

/// Largest [`Event::Data`] payload.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Most payload bytes of [`Event::Data`] and [`Event::Datagram`] waiting
/// for the tunnel. When the tunnel cannot take them (down, or its replay
/// buffer full), TCP stops reading from the guest (its receive window is
/// the backpressure) and UDP datagrams are dropped and counted, so what
/// the agent granted never matters to this engine's memory.
pub const MAX_QUEUED_OUT: usize = 2 * 1024 * 1024;

/// How the agent failed to open a flow; decides what the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The target refused (or the policy did): RST, "connection refused".
    Refused,
    /// The target could not be reached: ICMP host unreachable, "no route
    /// to host", as the real network would have said.
    Unreachable,
    /// The target never answered (its SYNs dropped until the agent gave
    /// up): the guest hears nothing either, so its own stack retries or
    /// times out (ETIMEDOUT), as a direct client's would.
    NoAnswer,
}

/// Why a tunnel input was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// No such flow (already closed, or never opened).
    #[error("flow {0} is not open")]
    UnknownFlow(FlowId),
    /// The agent sent more than the window we granted; the flow is reset.
    #[error("flow {0}: peer sent {1} bytes beyond its window")]
    WindowExceeded(FlowId, usize),
    /// The agent sent something out of order for the flow's state.
    #[error("flow {0}: {1} not allowed in this state")]
    BadState(FlowId, &'static str),
}

/// Counters of everything the engine decided; exposed by the control API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames handed to [`Engine::handle_frame`].
    pub frames_in: u64,
    /// Frames produced for the guest.
    pub frames_out: u64,
    /// Frames that did not parse (short, bad header).
    pub malformed: u64,
    /// Frames of protocols not carried yet (UDP, ICMP, IPv6...).
    pub unsupported: u64,
    /// ARP replies sent for vIPs.
    pub arp_replies: u64,
    /// SYNs held while the agent connects.
    pub opens: u64,
    /// SYNs refused because no resource has that vIP and port.
    pub refused_no_resource: u64,
    /// SYNs refused because no agent is connected.
    pub refused_offline: u64,
    /// SYNs refused by a flow limit.
    pub refused_limit: u64,
    /// New flows refused by the rate limit.
    pub refused_rate: u64,
    /// SYNs dropped (not refused) because [`EngineConfig::max_opening`]
    /// flows already wait for the agent and the waiting queue is full; the
    /// guest retries.
    pub syn_dropped_opening: u64,
    /// SYNs held for room under a limit ([`EngineConfig::max_waiting`]).
    pub syn_waited: u64,
    /// Held SYNs dropped because the guest stopped sending them (gone).
    pub syn_wait_expired: u64,
    /// Connected flows whose handshake waited for room under
    /// [`EngineConfig::max_memory`].
    pub open_waited: u64,
    /// Waiting flows reset because their resources together sent more
    /// than 1/16 of [`EngineConfig::max_memory`] before the guests' handshakes.
    pub early_overflow: u64,
    /// Opens the agent refused.
    pub refused_by_agent: u64,
    /// Flows reset (by the guest, the agent, or an error).
    pub resets: u64,
    /// Flows that ended normally.
    pub closed: u64,
    /// Protocol errors from the agent's side of a flow.
    pub flow_errors: u64,
    /// Payload bytes from the guest.
    pub bytes_from_guest: u64,
    /// Payload bytes to the guest.
    pub bytes_to_guest: u64,
    /// Queries to the vDNS.
    pub dns_queries: u64,
    /// vDNS queries that did not parse.
    pub dns_malformed: u64,
    /// mDNS packets from the guest to the group (questions and others').
    pub mdns_packets: u64,
    /// mDNS answers and announcements sent.
    pub mdns_answers: u64,
    /// mDNS packets that did not parse.
    pub mdns_malformed: u64,
    /// Datagrams dropped (too many held while opening).
    pub udp_dropped: u64,
    /// Of `resets`: flows whose socket closed or went back to listening
    /// by itself (a RST from the guest, or smoltcp's timeout), not by an
    /// abort here.
    pub resets_socket: u64,
    /// Datagrams to the guest larger than its MTU, sent in fragments.
    pub udp_fragmented: u64,
    /// Echo replies sent to the guest.
    pub echo_replies: u64,
    /// DHCP offers, acks and naks sent.
    pub dhcp_replies: u64,
    /// DHCP discovers with no address left to offer.
    pub dhcp_pool_empty: u64,
    /// Neighbour advertisements sent for vIPs.
    pub ndp_replies: u64,
    /// Router advertisements sent.
    pub router_adverts: u64,
}

impl Counters {
    /// Name/value pairs, for logs and the control API.
    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("frames_in", self.frames_in),
            ("frames_out", self.frames_out),
            ("malformed", self.malformed),
            ("unsupported", self.unsupported),
            ("arp_replies", self.arp_replies),
            ("opens", self.opens),
            ("refused_no_resource", self.refused_no_resource),
            ("refused_offline", self.refused_offline),
            ("refused_limit", self.refused_limit),
            ("refused_rate", self.refused_rate),
            ("syn_dropped_opening", self.syn_dropped_opening),
            ("syn_waited", self.syn_waited),
            ("syn_wait_expired", self.syn_wait_expired),
            ("open_waited", self.open_waited),
            ("early_overflow", self.early_overflow),
            ("refused_by_agent", self.refused_by_agent),
            ("resets", self.resets),
            ("closed", self.closed),
            ("flow_errors", self.flow_errors),
            ("bytes_from_guest", self.bytes_from_guest),
            ("bytes_to_guest", self.bytes_to_guest),
            ("dns_queries", self.dns_queries),
            ("dns_malformed", self.dns_malformed),
            ("mdns_packets", self.mdns_packets),
            ("mdns_answers", self.mdns_answers),
            ("mdns_malformed", self.mdns_malformed),
            ("udp_dropped", self.udp_dropped),
            ("udp_fragmented", self.udp_fragmented),
            ("resets_socket", self.resets_socket),
            ("echo_replies", self.echo_replies),
            ("dhcp_replies", self.dhcp_replies),
            ("dhcp_pool_empty", self.dhcp_pool_empty),
            ("ndp_replies", self.ndp_replies),
            ("router_adverts", self.router_adverts),
        ]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    guest: (IpAddress, u16),
    vip: (IpAddress, u16),
}

#[derive(Debug)]
struct Resource {
    id: ResourceId,
    name: String,
    ports: Vec<u16>,
    udp_ports: Vec<u16>,
    /// Ports besides 631 that carry IPP (DNS-SD's `_ipp._tcp` points there).
    ipp_ports: Vec<u16>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// SYN held, waiting for the agent.
    Opening,
    /// Agent connected; bytes flow.
    Open,
    /// Aborted; the RST goes out on the next poll, then the flow is freed.
    Dying,
}

#[derive(Debug)]
struct Flow {
    key: FlowKey,
    handle: SocketHandle,
    phase: Phase,
    /// Bytes we may still send the agent.
    credit: u32,
    /// Bytes from the agent not yet in the socket.
    to_guest: VecDeque<u8>,
    /// Bytes moved into the socket not yet granted back.
    ungranted: u32,
    /// Bytes the agent may still send: always `window - to_guest - ungranted`.
    allowed: u32,
    fin_from_agent: bool,
    fin_to_agent: bool,
    closed_socket: bool,
    /// Whether the socket's idle timeout runs (from the end of the
    /// guest's handshake on).
    timeout_set: bool,
    /// When a guest that has not finished its handshake since the agent
    /// connected counts as gone.
    handshake_by: Option<Instant>,
    /// The guest's SYN: fed to the flow's real socket once the agent has
    /// connected and memory allows, quoted if the agent cannot reach the
    /// target; dropped once the flow is open.
    syn: Vec<u8>,
    /// The agent connected; the flow waits for room under `max_memory`.
    connected: bool,
}

/// An open flow whose guest sends nothing (not even an ACK) for this long
/// is reset.
const SOCKET_TIMEOUT_SECS: u64 = 120;

/// A held SYN the guest has not sent again for this long is dropped: Linux
/// sends its last SYN 64 s before it gives up, Windows 12 s.
const WAIT_AFTER_SYN: Duration = Duration::from_secs(65);

/// Longest SYN held (IPv6 with every TCP option fits).
const MAX_HELD_SYN: usize = 160;

/// What keeps a new flow out.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// `max_opening` flows wait for the agent.
    Opening,
    /// `max_flows`.
    Flows,
    /// Earlier SYNs are held.
    Queue,
}

/// A SYN waiting for room under a limit.
#[derive(Debug)]
struct Held {
    key: FlowKey,
    syn: Vec<u8>,
    /// When the guest last sent it.
    seen: Instant,
}

/// One TCP flow as the engine holds it (see [`Engine::flow_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowState {
    /// The guest-side socket's TCP state, or `opening` / `dying`.
    pub state: String,
    /// Guest bytes the agent still takes before it grants more.
    pub credit: u32,
    /// Resource bytes the agent may still send before the guest reads.
    pub allowed: u32,
    /// Resource bytes here that the guest has not acknowledged.
    pub to_guest: u64,
    /// Guest bytes here not yet sent toward the agent.
    pub from_guest: u64,
}

/// Room kept in front of each outgoing IP packet for its Ethernet
/// header, written in place when the frame is finished.
const ETH_ROOM: usize = 14;
/// Buffers kept for reuse per direction (frames are not allocated one by
/// one once a VM is busy), and the largest kept: 16 at most of 16 KiB, so
/// a VM holds at most 512 KiB of them (48 KiB at MTU 1500); a large
/// segment's buffer (up to 64 KiB, one per 40 frames' worth) is freed.
const SPARE: usize = 16;
const SPARE_CAP: usize = 16 * 1024;

/// The smoltcp device: two queues of IP packets, and buffers for reuse.
/// Outgoing packets sit [`ETH_ROOM`] bytes into their buffer.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    rx_spare: Vec<Vec<u8>>,
    tx_spare: Vec<Vec<u8>>,
    mtu: usize,
}

/// Puts `b` back in `spare` if there is room and it is not too big.
fn keep(spare: &mut Vec<Vec<u8>>, b: Vec<u8>) {
    if spare.len() < SPARE && b.capacity() <= SPARE_CAP {
        spare.push(b);
    }
}

impl Queues {
    /// Queues a received IP packet (copied into a reused buffer).
    fn push_rx(&mut self, packet: &[u8]) {
        let mut b = self.rx_spare.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(packet);
        self.rx.push_back(b);
    }

    /// Queues an IP packet built elsewhere for the guest.
    fn push_ip(&mut self, ip: &[u8]) {
        let mut b = self.tx_spare.pop().unwrap_or_default();
        b.clear();
        b.resize(ETH_ROOM, 0);
        b.extend_from_slice(ip);
        self.tx.push_back(b);
    }
}

struct RxTok<'a>(Vec<u8>, &'a mut Vec<Vec<u8>>);
struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>, &'a mut Vec<Vec<u8>>);

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.0);
        keep(self.1, self.0);
        r
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = self.1.pop().unwrap_or_default();
        b.clear();
        b.resize(ETH_ROOM + len, 0);
        let r = f(&mut b[ETH_ROOM..]);
        self.0.push_back(b);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;
    fn receive(&mut self, _: SmolInstant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        let p = self.rx.pop_front()?;
        Some((
            RxTok(p, &mut self.rx_spare),
            TxTok(&mut self.tx, &mut self.tx_spare),
        ))
    }
    fn transmit(&mut self, _: SmolInstant) -> Option<TxTok<'_>> {
        Some(TxTok(&mut self.tx, &mut self.tx_spare))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        // Guest frames may carry offloaded (partial) checksums; they come
        // over a local link, so verify nothing and compute ours in full.
        c.checksum.ipv4 = Checksum::Tx;
        c.checksum.tcp = Checksum::Tx;
        c
    }
}

/// The device for one frame that the engine reads where it landed (the
/// port's ring or read buffer): smoltcp takes it from there, with no copy
/// into a queue first. What smoltcp sends in reply goes to the queues.
struct InPlace<'q, 'p> {
    frame: Option<&'p [u8]>,
    q: &'q mut Queues,
}

struct SliceRx<'a>(&'a [u8]);

impl phy::RxToken for SliceRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl<'p> Device for InPlace<'_, 'p> {
    type RxToken<'a>
        = SliceRx<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxTok<'a>
    where
        Self: 'a;
    fn receive(&mut self, t: SmolInstant) -> Option<(SliceRx<'_>, TxTok<'_>)> {
        let f = self.frame.take()?;
        Some((SliceRx(f), self.q.transmit(t)?))
    }
    fn transmit(&mut self, t: SmolInstant) -> Option<TxTok<'_>> {
        self.q.transmit(t)
    }
    fn capabilities(&self) -> DeviceCapabilities {
        self.q.capabilities()
    }
}

/// One VM's network as netredir sees it. A value: many can live side by side.
pub struct Engine {
    cfg: EngineConfig,
    epoch: Instant,
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    flows: BTreeMap<FlowId, Flow>,
    by_key: HashMap<FlowKey, FlowId>,
    resources: HashMap<Ipv4Addr, Resource>,
    udp_flows: BTreeMap<FlowId, udp::UdpFlow>,
    udp_by_key: HashMap<FlowKey, FlowId>,
    echoes: HashMap<u32, udp::PendingEcho>,
    next_echo: u32,
    dns: VDns,
    /// The responder for the guest's link (the same records, in `local`).
    mdns: Mdns,
    leases: dhcp::Leases,
    tokens: f64,
    tokens_at: Instant,
    online: bool,
    accepting: bool,
    next_flow: FlowId,
    guest_mac: Option<EthernetAddress>,
    /// When the next unsolicited router advertisement is due.
    next_ra: Option<Instant>,
    /// SYNs waiting for room, oldest first.
    held: VecDeque<Held>,
    /// Keys of `held`.
    held_keys: HashSet<FlowKey>,
    /// Connected flows waiting for room under `max_memory`, oldest first.
    ready: VecDeque<FlowId>,
    events: VecDeque<Event>,
    /// Payload bytes in `events` (at most [`MAX_QUEUED_OUT`]).
    queued_out: usize,
    /// A flow had bytes to read but the queue was full.
    throttled: bool,
    /// Identification of the last datagram sent in fragments.
    frag_ident: u32,
    frames: VecDeque<Vec<u8>>,
    counters: Counters,
}

impl Engine {
    /// A new engine with no resources, offline until [`Engine::set_online`].
    pub fn new(cfg: EngineConfig, now: Instant) -> Self {
        let mut dev = Queues {
            mtu: cfg.mtu,
            ..Default::default()
        };
        let mut icfg = Config::new(HardwareAddress::Ip);
        icfg.random_seed = cfg.seed;
        let mut iface = Interface::new(icfg, &mut dev, SmolInstant::ZERO);
        let gw = nth(cfg.subnet, 1);
        let gw6 = with_suffix(cfg.prefix6, 1);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(gw), cfg.prefix_len));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(gw6), 64));
        });
        iface.set_any_ip(true);
        let tokens = f64::from(cfg.new_flow_burst);
        let dns = VDns::new(&cfg.zone)
            .or_else(|_| VDns::new("netredir.internal"))
            .expect("the default zone is valid");
        Self {
            cfg,
            epoch: now,
            iface,
            dev,
            sockets: SocketSet::new(vec![]),
            flows: BTreeMap::new(),
            by_key: HashMap::new(),
            resources: HashMap::new(),
            udp_flows: BTreeMap::new(),
            udp_by_key: HashMap::new(),
            echoes: HashMap::new(),
            next_echo: 0,
            dns,
            mdns: Mdns::new(),
            leases: dhcp::Leases::default(),
            tokens,
            tokens_at: now,
            online: false,
            accepting: true,
            next_flow: 1,
            guest_mac: None,
            next_ra: None,
            held: VecDeque::new(),
            held_keys: HashSet::new(),
            ready: VecDeque::new(),
            events: VecDeque::new(),
            queued_out: 0,
            throttled: false,
            frag_ident: 0,
            frames: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    fn ts(&self, now: Instant) -> SmolInstant {
        SmolInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Where a TCP flow's bytes wait, for `netredirctl stats`: shows
    /// which side a stalled flow waits for.
    pub fn flow_state(&self, flow: FlowId) -> Option<FlowState> {
        let f = self.flows.get(&flow)?;
        let s = self.sockets.get::<tcp::Socket>(f.handle);
        let phase = match f.phase {
            Phase::Opening => "opening".to_owned(),
            Phase::Dying => "dying".to_owned(),
            Phase::Open => format!("{}", s.state()),
        };
        Some(FlowState {
            state: phase,
            credit: f.credit,
            allowed: f.allowed,
            to_guest: (f.to_guest.len() + s.send_queue()) as u64,
            from_guest: s.recv_queue() as u64,
        })
    }

    /// The resource `flow` (TCP or UDP) goes to, for per-resource
    /// accounting.
    pub fn flow_resource(&self, flow: FlowId) -> Option<ResourceId> {
        let key = match self.flows.get(&flow) {
            Some(f) => &f.key,
            None => &self.udp_flows.get(&flow)?.key,
        };
        self.resource_at(key.vip.0).map(|r| r.id)
    }

    /// Open flows (TCP and UDP) per resource.
    pub fn flows_per_resource(&self) -> BTreeMap<ResourceId, usize> {
        let mut out = BTreeMap::new();
        let keys = self
            .flows
            .values()
            .map(|f| &f.key)
            .chain(self.udp_flows.values().map(|u| &u.key));
        for k in keys {
            if let Some(r) = self.resource_at(k.vip.0) {
                *out.entry(r.id).or_insert(0) += 1;
            }
        }
        out
    }

    /// Flows open or opening.
    pub fn flow_count(&self) -> usize {
        self.flows.len() + self.udp_flows.len()
    }

    /// The engine's own address (gateway) in the subnet.
    pub fn gateway(&self) -> Ipv4Addr {
        nth(self.cfg.subnet, 1)
    }

    /// Where the guest's DNS queries go: `.53` of the subnet.
    pub fn dns_addr(&self) -> Ipv4Addr {
        nth(self.cfg.subnet, 53)
    }

    /// The engine's own IPv6 address: `::1` of the prefix.
    pub fn gateway6(&self) -> Ipv6Addr {
        with_suffix(self.cfg.prefix6, 1)
    }

    /// The vDNS over IPv6: `::53` of the prefix.
    pub fn dns_addr6(&self) -> Ipv6Addr {
        with_suffix(self.cfg.prefix6, 0x53)
    }

    /// The IPv6 vIP of the resource at IPv4 vIP `vip`.
    pub fn vip6(&self, vip: Ipv4Addr) -> Ipv6Addr {
        vip6(self.cfg.prefix6, vip)
    }

    /// The IPv4 vIP behind an IPv6 vIP, if `addr` is one in our prefix.
    fn vip4_of(&self, addr: Ipv6Addr) -> Option<Ipv4Addr> {
        let seg = addr.segments();
        let pre = self.cfg.prefix6.segments();
        (seg[..4] == pre[..4] && seg[4] == 0 && seg[5] == 0)
            .then(|| Ipv4Addr::from((u32::from(seg[6]) << 16) | u32::from(seg[7])))
    }

    /// The resource a guest reaches at `addr` (either family).
    fn resource_at(&self, addr: IpAddress) -> Option<&Resource> {
        match addr {
            IpAddress::Ipv4(a) => self.resources.get(&a),
            IpAddress::Ipv6(a) => self.resources.get(&self.vip4_of(a)?),
        }
    }

    /// Whether `addr` is the engine's own (gateway or vDNS), either family.
    fn is_own(&self, addr: IpAddress) -> bool {
        match addr {
            IpAddress::Ipv4(a) => a == self.gateway() || a == self.dns_addr(),
            IpAddress::Ipv6(a) => a == self.gateway6() || a == self.dns_addr6(),
        }
    }

    /// Makes `vip` lead to `resource`, allowing TCP to `ports`.
    pub fn set_resource(&mut self, vip: Ipv4Addr, resource: ResourceId, ports: Vec<u16>) {
        self.set_named_resource(vip, resource, "", ports, Vec::new());
    }

    /// Makes `vip` lead to `resource` called `name` (its DNS name), allowing
    /// TCP to `tcp` and UDP to `udp` ports.
    pub fn set_named_resource(
        &mut self,
        vip: Ipv4Addr,
        resource: ResourceId,
        name: &str,
        tcp: Vec<u16>,
        udp: Vec<u16>,
    ) {
        // The IPP ports stay until set_ipp_ports says otherwise: the guest's
        // caches must not see the printer go and come back on a re-export.
        let ipp_ports = self
            .resources
            .get(&vip)
            .map(|r| r.ipp_ports.clone())
            .unwrap_or_default();
        self.resources.insert(
            vip,
            Resource {
                id: resource,
                name: name.to_ascii_lowercase(),
                ports: tcp,
                udp_ports: udp,
                ipp_ports,
            },
        );
        self.update_dns();
    }

    /// Marks TCP `ports` of `vip`'s resource as IPP (its export said so),
    /// so the guest finds its printer service there.
    pub fn set_ipp_ports(&mut self, vip: Ipv4Addr, ports: Vec<u16>) {
        if let Some(r) = self.resources.get_mut(&vip)
            && r.ipp_ports != ports
        {
            r.ipp_ports = ports;
            self.update_dns();
        }
    }

    /// Forgets the resource at `vip` (it moved to another address).
    pub fn remove_resource(&mut self, vip: Ipv4Addr) {
        if self.resources.remove(&vip).is_some() {
            self.update_dns();
        }
    }

    /// Forgets every resource (the agent that exported them is gone).
    pub fn clear_resources(&mut self) {
        self.resources.clear();
        self.update_dns();
    }

    fn update_dns(&mut self) {
        let list = self
            .resources
            .iter()
            .filter(|(_, r)| !r.name.is_empty())
            .map(|(vip, r)| DnsResource {
                name: r.name.clone(),
                v4: *vip,
                v6: Some(vip6(self.cfg.prefix6, *vip)),
                tcp_ports: r.ports.clone(),
                ipp_ports: r.ipp_ports.clone(),
            })
            .collect::<Vec<_>>();
        self.dns.set_resources(list.clone());
        // The guest's link hears what came and what went.
        let mut now = Mdns::new();
        now.set_resources(list);
        let before = std::mem::replace(&mut self.mdns, now);
        let mut packets = self.mdns.goodbye(&before);
        packets.extend(self.mdns.announce_new(&before));
        for p in packets {
            self.send_mdns(&p);
        }
    }

    /// Whether an agent is there to open flows. Going offline resets every
    /// flow: the guest sees RST, memory is freed.
    pub fn set_online(&mut self, online: bool, now: Instant) {
        self.online = online;
        if !online {
            let ids: Vec<FlowId> = self.flows.keys().copied().collect();
            for id in ids {
                self.abort(id, false);
            }
            let udp: Vec<FlowId> = self.udp_flows.keys().copied().collect();
            for id in udp {
                self.remove_udp(id);
            }
            self.echoes.clear();
            // Held SYNs come again and are refused then.
            self.held.clear();
            self.held_keys.clear();
            self.ready.clear();
            self.poll(now);
        }
    }

    /// Whether the tunnel is up: off while it is down but its session may
    /// resume. New flows are still taken (their Open waits in the session
    /// and goes out on resume, so a guest connecting during a short outage
    /// gets in, as on a real network that hiccups; if the session ends
    /// instead, it gets RST); pings go unanswered meanwhile.
    pub fn set_accepting(&mut self, accepting: bool) {
        self.accepting = accepting;
    }

    /// One frame from the guest.
    pub fn handle_frame(&mut self, frame: &[u8], now: Instant) {
        self.counters.frames_in += 1;
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.counters.malformed += 1;
            return;
        };
        if eth.src_addr().is_unicast() {
            self.guest_mac = Some(eth.src_addr());
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => self.handle_arp(eth.payload()),
            EthernetProtocol::Ipv4 => self.handle_ipv4(eth.payload(), now),
            EthernetProtocol::Ipv6 => self.handle_ipv6(eth.payload(), now),
            _ => self.counters.unsupported += 1,
        }
    }

    fn handle_arp(&mut self, payload: &[u8]) {
        let Ok(pkt) = ArpPacket::new_checked(payload) else {
            self.counters.malformed += 1;
            return;
        };
        let Ok(repr) = ArpRepr::parse(&pkt) else {
            self.counters.malformed += 1;
            return;
        };
        let ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = repr
        else {
            return;
        };
        if target_protocol_addr != self.gateway()
            && target_protocol_addr != self.dns_addr()
            && !self.resources.contains_key(&target_protocol_addr)
        {
            return;
        }
        let own = EthernetAddress(self.cfg.mac);
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: own,
            source_protocol_addr: target_protocol_addr,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let eth = EthernetRepr {
            src_addr: own,
            dst_addr: source_hardware_addr,
            ethertype: EthernetProtocol::Arp,
        };
        let mut out = vec![0u8; eth.buffer_len() + reply.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut out[..]);
        eth.emit(&mut f);
        reply.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        self.counters.arp_replies += 1;
        self.counters.frames_out += 1;
        self.frames.push_back(out);
    }

    fn handle_ipv4(&mut self, payload: &[u8], now: Instant) {
        let Ok(ip) = Ipv4Packet::new_checked(payload) else {
            self.counters.malformed += 1;
            return;
        };
        if ip.version() != 4 {
            self.counters.malformed += 1;
            return;
        }
        // Trim Ethernet padding: smoltcp wants exactly the IP packet.
        let packet = &payload[..ip.total_len() as usize];
        if ip.more_frags() || ip.frag_offset() != 0 {
            self.counters.unsupported += 1;
            return;
        }
        match ip.next_header() {
            IpProtocol::Tcp => {}
            IpProtocol::Udp => {
                let (src, dst) = (ip.src_addr().into(), ip.dst_addr().into());
                return self.handle_udp(src, dst, ip.payload(), packet, now);
            }
            IpProtocol::Icmp => return self.handle_icmp(&ip, now),
            _ => {
                self.counters.unsupported += 1;
                return;
            }
        }
        self.handle_tcp(
            IpAddress::Ipv4(ip.src_addr()),
            IpAddress::Ipv4(ip.dst_addr()),
            ip.payload(),
            packet,
            now,
        );
    }

    /// A TCP segment (`segment`) inside IP packet `packet`, either family.
    fn handle_tcp(
        &mut self,
        src: IpAddress,
        dst: IpAddress,
        segment: &[u8],
        packet: &[u8],
        now: Instant,
    ) {
        let Ok(tcp) = TcpPacket::new_checked(segment) else {
            self.counters.malformed += 1;
            return;
        };
        let key = FlowKey {
            guest: (src, tcp.src_port()),
            vip: (dst, tcp.dst_port()),
        };
        let is_syn = tcp.syn() && !tcp.ack() && !tcp.rst();
        if is_syn {
            self.handle_syn(key, packet.to_vec(), now);
        } else {
            // Into smoltcp now, read where it lies, not queued for the
            // next poll: no copy, no buffer per frame. Behind frames
            // already queued (a SYN sent again), it waits its turn.
            let ts = self.ts(now);
            if self.dev.rx.is_empty() {
                let mut dev = InPlace {
                    frame: Some(packet),
                    q: &mut self.dev,
                };
                self.iface
                    .poll_ingress_single(ts, &mut dev, &mut self.sockets);
            } else {
                self.dev.push_rx(packet);
                self.iface
                    .poll_ingress_single(ts, &mut self.dev, &mut self.sockets);
            }
        }
    }

    fn handle_syn(&mut self, key: FlowKey, packet: Vec<u8>, now: Instant) {
        if let Some(&id) = self.by_key.get(&key) {
            let reused = self.flows.get(&id).is_some_and(|f| {
                let s = self.sockets.get::<tcp::Socket>(f.handle);
                matches!(s.state(), tcp::State::TimeWait | tcp::State::Closed)
            });
            if !reused {
                // A retransmitted SYN: the socket knows what to do.
                self.dev.rx.push_back(packet);
                return;
            }
            self.remove_flow(id);
        }
        if self.held_keys.contains(&key) {
            // Sent again while held: the guest is still there.
            if let Some(h) = self.held.iter_mut().find(|h| h.key == key) {
                h.seen = now;
            }
            return;
        }
        let Some(resource) = self.admit_or_refuse(key, &packet) else {
            return;
        };
        if !self.take_token(now) {
            self.counters.refused_rate += 1;
            return;
        }
        // Over a limit the SYN waits for room, as in a server's accept
        // queue, and is let in when a flow ends; with the queue full it is
        // dropped, as by a server whose queue is full: the guest's stack
        // sends it again (after 1, 2, 4... s). A RST would fail a
        // connection that a moment later would have worked. Newcomers queue
        // behind the held ones.
        let Some(limit) = self.limit_reached().or(if self.held.is_empty() {
            None
        } else {
            Some(Limit::Queue)
        }) else {
            return self.open_flow(key, resource, packet, now);
        };
        if self.held.len() < self.cfg.max_waiting && packet.len() <= MAX_HELD_SYN {
            self.counters.syn_waited += 1;
            self.held_keys.insert(key);
            self.held.push_back(Held {
                key,
                syn: packet,
                seen: now,
            });
            return;
        }
        match limit {
            Limit::Opening | Limit::Queue => self.counters.syn_dropped_opening += 1,
            Limit::Flows => self.counters.refused_limit += 1,
        }
    }

    /// The resource a SYN to `key` may open, or `None` after refusing it
    /// (no such resource, no agent: RST).
    fn admit_or_refuse(&mut self, key: FlowKey, packet: &[u8]) -> Option<ResourceId> {
        let resource = self
            .resource_at(key.vip.0)
            .filter(|r| r.ports.contains(&key.vip.1))
            .map(|r| r.id);
        let refused = if resource.is_none() {
            Some(&mut self.counters.refused_no_resource)
        } else if !self.online {
            Some(&mut self.counters.refused_offline)
        } else {
            None
        };
        if let Some(c) = refused {
            *c += 1;
            // No socket matches: smoltcp answers RST|ACK on the next poll.
            self.dev.push_rx(packet);
            return None;
        }
        resource
    }

    /// Which limit keeps a new flow out, if any.
    fn limit_reached(&self) -> Option<Limit> {
        let opening = self
            .flows
            .values()
            .filter(|f| f.phase == Phase::Opening)
            .count();
        if opening >= self.cfg.max_opening {
            Some(Limit::Opening)
        } else if self.flows.len() + self.udp_flows.len() >= self.cfg.max_flows {
            Some(Limit::Flows)
        } else {
            None
        }
    }

    /// Lets held SYNs in while there is room, oldest first; true if any
    /// left a frame to answer.
    fn admit_held(&mut self, now: Instant) -> bool {
        let mut any = false;
        // Connected flows first: their resource already waits.
        while let Some(&id) = self.ready.front() {
            let live = self
                .flows
                .get(&id)
                .is_some_and(|f| f.phase == Phase::Opening && f.connected);
            if live && !self.room_for_buffers() {
                break;
            }
            self.ready.pop_front();
            if live {
                self.start_flow(id, now);
                any = true;
            }
        }
        while let Some(front) = self.held.front() {
            if now.saturating_duration_since(front.seen) > WAIT_AFTER_SYN {
                let h = self.held.pop_front().expect("front");
                self.held_keys.remove(&h.key);
                self.counters.syn_wait_expired += 1;
                continue;
            }
            if self.limit_reached().is_some() {
                break;
            }
            let h = self.held.pop_front().expect("front");
            self.held_keys.remove(&h.key);
            any = true;
            // The resource may have gone, or the agent, since it came.
            if let Some(resource) = self.admit_or_refuse(h.key, &h.syn) {
                self.open_flow(h.key, resource, h.syn, now);
            }
        }
        any
    }

    /// A flow for SYN `packet`: its socket answers once the agent connects.
    fn open_flow(&mut self, key: FlowKey, resource: ResourceId, packet: Vec<u8>, now: Instant) {
        // While the agent connects, a socket without buffers holds the
        // guest's SYN (it takes the guest's retries and its RST if it gives
        // up): a connection that waits costs a few hundred bytes, so as
        // many as a direct client's would can wait at once. The buffers
        // come with the flow's real socket, when it opens.
        let Some(sock) = listener(key, 0) else {
            self.counters.malformed += 1;
            return;
        };
        let handle = self.sockets.add(sock);
        let id = self.alloc_flow_id();
        self.flows.insert(
            id,
            Flow {
                key,
                handle,
                phase: Phase::Opening,
                credit: 0,
                to_guest: VecDeque::new(),
                ungranted: 0,
                allowed: 0,
                fin_from_agent: false,
                fin_to_agent: false,
                closed_socket: false,
                timeout_set: false,
                handshake_by: None,
                syn: packet.clone(),
                connected: false,
            },
        );
        self.by_key.insert(key, id);
        self.feed_syn(packet, now);
        if self.sockets.get::<tcp::Socket>(handle).state() != tcp::State::SynReceived {
            self.counters.malformed += 1;
            self.remove_flow(id);
            return;
        }
        self.counters.opens += 1;
        self.events.push_back(Event::Open {
            flow: id,
            resource,
            port: key.vip.1,
        });
        self.collect_frames();
    }

    /// Only this SYN may meet a new listener: feeds it alone, now.
    fn feed_syn(&mut self, syn: Vec<u8>, now: Instant) {
        let earlier = std::mem::take(&mut self.dev.rx);
        self.dev.rx.push_back(syn);
        let ts = self.ts(now);
        self.iface.poll(ts, &mut self.dev, &mut self.sockets);
        self.dev.rx = earlier;
    }

    /// Opens connected flow `id` for the guest: its real socket, with
    /// buffers, takes the SYN and answers it.
    fn start_flow(&mut self, id: FlowId, now: Instant) {
        let Some(f) = self.flows.get_mut(&id) else {
            return;
        };
        if f.phase != Phase::Opening || !f.connected {
            return;
        }
        let Some(mut sock) = listener(f.key, self.cfg.socket_buffer) else {
            return;
        };
        sock.pause_synack(false);
        let old = std::mem::replace(&mut f.handle, self.sockets.add(sock));
        self.sockets.remove(old);
        f.phase = Phase::Open;
        f.handshake_by = Some(now + Duration::from_secs(SOCKET_TIMEOUT_SECS));
        let syn = std::mem::take(&mut f.syn);
        self.feed_syn(syn, now);
    }

    /// Bytes from resources for flows waiting for room.
    fn early_bytes(&self) -> usize {
        self.ready
            .iter()
            .filter_map(|id| self.flows.get(id))
            .filter(|f| f.phase == Phase::Opening)
            .map(|f| f.to_guest.len())
            .sum()
    }

    /// TCP flows holding buffers (open, or aborted and not yet freed).
    fn buffered_flows(&self) -> usize {
        self.flows
            .values()
            .filter(|f| f.phase != Phase::Opening)
            .count()
    }

    /// Whether memory allows one more flow its buffers.
    fn room_for_buffers(&self) -> bool {
        (self.buffered_flows() + 1) * self.flow_cost() <= self.cfg.max_memory
    }

    /// Bytes of TCP buffers the open flows may hold (the figure
    /// `max_memory` caps).
    pub fn buffer_bytes(&self) -> usize {
        self.buffered_flows() * self.flow_cost()
    }

    /// The most one TCP flow can hold: its socket buffers and its window.
    pub fn flow_cost(&self) -> usize {
        2 * self.cfg.socket_buffer + self.cfg.window as usize
    }

    /// Takes one new-flow token (token bucket: rate, burst).
    fn take_token(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.tokens_at).as_secs_f64();
        self.tokens_at = now.max(self.tokens_at);
        self.tokens = (self.tokens + dt * f64::from(self.cfg.new_flow_rate))
            .min(f64::from(self.cfg.new_flow_burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn alloc_flow_id(&mut self) -> FlowId {
        loop {
            let id = self.next_flow;
            self.next_flow = self.next_flow.wrapping_add(1).max(1);
            if !self.flows.contains_key(&id) && !self.udp_flows.contains_key(&id) {
                return id;
            }
        }
    }

    /// The agent connected `flow`: the guest's handshake completes.
    pub fn open_ok(&mut self, flow: FlowId, now: Instant) -> Result<(), FlowError> {
        if self.udp_flows.contains_key(&flow) {
            self.udp_open_ok(flow, now);
            return Ok(());
        }
        let (window, peer_window) = (self.cfg.window, self.cfg.peer_window);
        let f = self
            .flows
            .get_mut(&flow)
            .ok_or(FlowError::UnknownFlow(flow))?;
        if f.phase != Phase::Opening || f.connected {
            self.counters.flow_errors += 1;
            return Err(FlowError::BadState(flow, "OpenOk"));
        }
        f.connected = true;
        f.credit = peer_window;
        f.allowed = window;
        // With the buffers of `max_memory` all taken, the guest's handshake
        // waits for a flow to end, as a connection waits in a server's
        // accept queue; bytes the resource sends meanwhile wait here (at
        // most a window).
        if self.ready.is_empty() && self.room_for_buffers() {
            self.start_flow(flow, now);
        } else {
            self.counters.open_waited += 1;
            self.ready.push_back(flow);
        }
        self.poll(now);
        Ok(())
    }

    /// The agent could not connect `flow`: the guest gets RST.
    pub fn open_err(&mut self, flow: FlowId, why: Refusal, now: Instant) -> Result<(), FlowError> {
        if self.remove_udp(flow) {
            self.counters.refused_by_agent += 1;
            return Ok(());
        }
        let Some(f) = self.flows.get(&flow) else {
            return Err(FlowError::UnknownFlow(flow));
        };
        self.counters.refused_by_agent += 1;
        if why != Refusal::Refused && f.phase == Phase::Opening {
            // No RST: the SYN-ACK never went out, the socket just goes.
            let quote = f.syn[..f.syn.len().min(quote_len(&f.syn))].to_vec();
            self.remove_flow(flow);
            if why == Refusal::Unreachable {
                self.host_unreachable(&quote);
            }
            // Room for a held SYN.
            self.poll(now);
            return Ok(());
        }
        self.abort(flow, false);
        self.poll(now);
        Ok(())
    }

    /// Bytes from the resource for the guest.
    pub fn data(&mut self, flow: FlowId, bytes: &[u8], now: Instant) -> Result<(), FlowError> {
        let f = self
            .flows
            .get_mut(&flow)
            .ok_or(FlowError::UnknownFlow(flow))?;
        if !(f.phase == Phase::Open || f.connected) || f.fin_from_agent {
            self.counters.flow_errors += 1;
            return Err(FlowError::BadState(flow, "Data"));
        }
        if bytes.len() > f.allowed as usize {
            let over = bytes.len() - f.allowed as usize;
            self.counters.flow_errors += 1;
            self.abort(flow, true);
            self.poll(now);
            return Err(FlowError::WindowExceeded(flow, over));
        }
        let waiting = f.phase == Phase::Opening;
        if waiting && self.early_bytes() + bytes.len() > self.cfg.max_memory / 16 {
            // A resource that talks first (a banner) sends a few bytes; all
            // waiting flows together may hold 1/16 of `max_memory`.
            self.counters.early_overflow += 1;
            self.abort(flow, true);
            self.poll(now);
            return Ok(());
        }
        let f = self.flows.get_mut(&flow).expect("checked above");
        f.allowed -= bytes.len() as u32;
        f.to_guest.extend(bytes);
        self.poll(now);
        Ok(())
    }

    /// The agent may take `credit` more bytes of `flow`.
    pub fn window(&mut self, flow: FlowId, credit: u32, now: Instant) -> Result<(), FlowError> {
        let f = self
            .flows
            .get_mut(&flow)
            .ok_or(FlowError::UnknownFlow(flow))?;
        f.credit = f.credit.saturating_add(credit);
        self.poll(now);
        Ok(())
    }

    /// The resource closed its sending half: FIN to the guest once the
    /// bytes before it are delivered.
    pub fn fin(&mut self, flow: FlowId, now: Instant) -> Result<(), FlowError> {
        let f = self
            .flows
            .get_mut(&flow)
            .ok_or(FlowError::UnknownFlow(flow))?;
        if !(f.phase == Phase::Open || f.connected) {
            self.counters.flow_errors += 1;
            return Err(FlowError::BadState(flow, "Fin"));
        }
        f.fin_from_agent = true;
        self.poll(now);
        Ok(())
    }

    /// The agent aborted `flow`: RST to the guest.
    pub fn reset(&mut self, flow: FlowId, now: Instant) -> Result<(), FlowError> {
        if self.remove_udp(flow) {
            return Ok(());
        }
        if !self.flows.contains_key(&flow) {
            return Err(FlowError::UnknownFlow(flow));
        }
        self.abort(flow, false);
        self.poll(now);
        Ok(())
    }

    fn abort(&mut self, id: FlowId, tell_agent: bool) {
        let Some(f) = self.flows.get_mut(&id) else {
            return;
        };
        if f.phase == Phase::Dying {
            return;
        }
        f.phase = Phase::Dying;
        self.sockets.get_mut::<tcp::Socket>(f.handle).abort();
        self.counters.resets += 1;
        if tell_agent {
            self.events.push_back(Event::Reset { flow: id });
        }
    }

    fn remove_flow(&mut self, id: FlowId) {
        if let Some(f) = self.flows.remove(&id) {
            self.sockets.remove(f.handle);
            if self.by_key.get(&f.key) == Some(&id) {
                self.by_key.remove(&f.key);
            }
        }
    }

    /// Runs the TCP stack and moves bytes between sockets and the tunnel.
    pub fn poll(&mut self, now: Instant) {
        self.sweep_datagrams(now);
        if self.cfg.dhcp && self.guest_mac.is_some() && self.next_ra.is_none_or(|t| now >= t) {
            self.next_ra = Some(now + ip6::RA_INTERVAL);
            self.router_advert(ip6::ALL_NODES);
        }
        let ts = self.ts(now);
        self.throttled = false;
        for _ in 0..8 {
            self.iface.poll(ts, &mut self.dev, &mut self.sockets);
            let moved = self.service_flows(now);
            if !moved && self.dev.rx.is_empty() {
                break;
            }
        }
        // Aborted flows had their RST dispatched by the polls above.
        let dying: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| f.phase == Phase::Dying)
            .map(|(id, _)| *id)
            .collect();
        for id in dying {
            self.remove_flow(id);
        }
        if self.admit_held(now) {
            self.iface.poll(ts, &mut self.dev, &mut self.sockets);
        }
        self.collect_frames();
    }

    /// Moves bytes for every flow; true if anything changed that smoltcp
    /// should act on.
    fn service_flows(&mut self, now: Instant) -> bool {
        let mut moved = false;
        let mut ended = Vec::new();
        for (&id, f) in self.flows.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(f.handle);
            match f.phase {
                Phase::Dying => continue,
                Phase::Opening => {
                    // The guest gave up (RST) while the agent connects.
                    if matches!(s.state(), tcp::State::Listen | tcp::State::Closed) {
                        s.abort();
                        f.phase = Phase::Dying;
                        self.counters.resets += 1;
                        self.events.push_back(Event::Reset { flow: id });
                    }
                    continue;
                }
                Phase::Open => {}
            }
            if !f.timeout_set {
                if s.state() != tcp::State::SynReceived {
                    s.set_timeout(Some(SmolDuration::from_secs(SOCKET_TIMEOUT_SECS)));
                    f.timeout_set = true;
                } else if f.handshake_by.is_some_and(|t| now >= t) {
                    // The guest never finished its handshake: gone.
                    s.abort();
                }
            }
            // Agent → guest.
            while !f.to_guest.is_empty() && s.can_send() {
                let (a, _) = f.to_guest.as_slices();
                let Ok(n) = s.send_slice(a) else { break };
                if n == 0 {
                    break;
                }
                f.to_guest.drain(..n);
                f.ungranted += n as u32;
                self.counters.bytes_to_guest += n as u64;
                moved = true;
            }
            // A grant once a quarter of the window moved, not per write:
            // the agent still has three quarters, and a grant per response
            // would cost a message (and the agent a wake-up) per round trip.
            if f.ungranted > 0 && f.ungranted >= self.cfg.window / 4 {
                self.events.push_back(Event::Window {
                    flow: id,
                    credit: f.ungranted,
                });
                f.allowed += f.ungranted;
                f.ungranted = 0;
            }
            // Guest → agent, as far as the agent granted and the queue
            // toward the tunnel has room.
            while f.credit > 0 && s.can_recv() {
                if self.queued_out >= MAX_QUEUED_OUT {
                    self.throttled = true;
                    break;
                }
                let want = (f.credit as usize).min(MAX_CHUNK).min(s.recv_queue());
                // Straight from the socket's ring into the message (one
                // copy; the ring's free part may wrap: two pieces then).
                let mut bytes = Vec::with_capacity(want);
                while bytes.len() < want {
                    let room = want - bytes.len();
                    let got = s.recv(|b| {
                        let k = b.len().min(room);
                        bytes.extend_from_slice(&b[..k]);
                        (k, k)
                    });
                    if !matches!(got, Ok(k) if k > 0) {
                        break;
                    }
                }
                let n = bytes.len();
                if n == 0 {
                    break;
                }
                f.credit -= n as u32;
                self.counters.bytes_from_guest += n as u64;
                self.queued_out += n;
                self.events.push_back(Event::Data { flow: id, bytes });
                moved = true;
            }
            let state = s.state();
            let guest_fin = matches!(
                state,
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
            );
            if guest_fin && !f.fin_to_agent && !s.can_recv() {
                f.fin_to_agent = true;
                self.events.push_back(Event::Fin { flow: id });
            }
            if f.fin_from_agent && f.to_guest.is_empty() && !f.closed_socket {
                s.close();
                f.closed_socket = true;
                moved = true;
            }
            let done = f.fin_to_agent && f.closed_socket;
            match state {
                tcp::State::Closed | tcp::State::TimeWait if done => ended.push((id, false)),
                tcp::State::Closed => ended.push((id, true)),
                // A RST while the SYN-ACK was out puts the socket back to
                // listening: that flow is gone too.
                tcp::State::Listen => ended.push((id, true)),
                _ => {}
            }
        }
        for (id, reset) in ended {
            if reset {
                self.counters.resets += 1;
                self.counters.resets_socket += 1;
                self.events.push_back(Event::Reset { flow: id });
            } else {
                self.counters.closed += 1;
                self.events.push_back(Event::Closed { flow: id });
            }
            self.remove_flow(id);
        }
        moved
    }

    fn collect_frames(&mut self) {
        let Some(dst) = self.guest_mac else {
            // Nothing came from the guest yet, so nothing goes to it.
            self.dev.tx.clear();
            return;
        };
        while let Some(mut out) = self.dev.tx.pop_front() {
            // The Ethernet header goes into the room left for it: no copy.
            let eth = EthernetRepr {
                src_addr: EthernetAddress(self.cfg.mac),
                dst_addr: multicast_mac(&out[ETH_ROOM..]).unwrap_or(dst),
                ethertype: if out.get(ETH_ROOM).is_some_and(|b| b >> 4 == 6) {
                    EthernetProtocol::Ipv6
                } else {
                    EthernetProtocol::Ipv4
                },
            };
            eth.emit(&mut EthernetFrame::new_unchecked(&mut out[..]));
            self.counters.frames_out += 1;
            self.frames.push_back(out);
        }
    }

    /// The next frame for the guest.
    pub fn poll_frame(&mut self) -> Option<Vec<u8>> {
        self.frames.pop_front()
    }

    /// Gives back a frame from [`Engine::poll_frame`] once it is sent, for
    /// the next frame to reuse (no allocation per frame).
    pub fn recycle_frame(&mut self, frame: Vec<u8>) {
        keep(&mut self.dev.tx_spare, frame);
    }

    /// Puts back a frame the device could not take yet (it goes first).
    pub fn unpoll_frame(&mut self, frame: Vec<u8>) {
        self.frames.push_front(frame);
    }

    /// The next message for the tunnel.
    pub fn poll_event(&mut self) -> Option<Event> {
        let ev = self.events.pop_front()?;
        if let Event::Data { bytes, .. } | Event::Datagram { bytes, .. } = &ev {
            self.queued_out -= bytes.len();
        }
        Some(ev)
    }

    /// Payload bytes waiting for the tunnel.
    pub fn queued_out(&self) -> usize {
        self.queued_out
    }

    /// Whether guest bytes were left unread for want of queue room that
    /// is free now: call [`Engine::poll`] again.
    pub fn wants_poll(&self) -> bool {
        self.throttled && self.queued_out < MAX_QUEUED_OUT / 2
    }

    /// How long until [`Engine::poll`] has timer work (retransmits,
    /// timeouts); `None` if nothing is scheduled.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let ts = self.ts(now);
        let smol = self
            .iface
            .poll_delay(ts, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        let ra = self
            .next_ra
            .filter(|_| self.cfg.dhcp)
            .map(|t| t.saturating_duration_since(now));
        match (smol, ra) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The Ethernet group address of IP packet `ip`'s destination, if that is
/// a multicast group (RFC 1112 §6.4, RFC 2464 §7).
fn multicast_mac(ip: &[u8]) -> Option<EthernetAddress> {
    match ip.first()? >> 4 {
        4 => {
            let d = ip.get(16..20)?;
            (d[0] & 0xf0 == 0xe0)
                .then(|| EthernetAddress([0x01, 0x00, 0x5e, d[1] & 0x7f, d[2], d[3]]))
        }
        6 => {
            let d = ip.get(24..40)?;
            (d[0] == 0xff).then(|| EthernetAddress([0x33, 0x33, d[12], d[13], d[14], d[15]]))
        }
        _ => None,
    }
}

fn nth(net: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net).wrapping_add(n))
}

/// The address `suffix` in the /64 `prefix`.
fn with_suffix(prefix: Ipv6Addr, suffix: u64) -> Ipv6Addr {
    Ipv6Addr::from((u128::from(prefix) & !u128::from(u64::MAX)) | u128::from(suffix))
}

/// The IPv6 vIP for IPv4 vIP `vip` in the /64 `prefix`: the prefix with
/// the IPv4 address in its last 32 bits. Never `::1` or `::53` (the
/// gateway and the vDNS), as a vIP is never in `0.0.0.0/24`.
pub fn vip6(prefix: Ipv6Addr, vip: Ipv4Addr) -> Ipv6Addr {
    with_suffix(prefix, u64::from(u32::from(vip)))
}

/// How much of a packet an ICMP error quotes: its IP header and 8 bytes.
/// A socket listening for the guest's SYN to `key`, with `buffer` bytes each
/// way, holding its SYN-ACK until told.
fn listener(key: FlowKey, buffer: usize) -> Option<tcp::Socket<'static>> {
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; buffer]),
        tcp::SocketBuffer::new(vec![0u8; buffer]),
    );
    sock.set_nagle_enabled(false);
    sock.set_ack_delay(None);
    // No idle timeout while the agent connects: the guest's SYNs do not
    // count as activity to a socket holding its SYN-ACK, and it would reset
    // a guest still waiting (Linux tries for 127 s) when the agent connects
    // after 120 s. Set once the handshake is done (smoltcp counts from the
    // last segment it took: the first SYN).
    sock.set_timeout(None);
    sock.pause_synack(true);
    let listen = IpListenEndpoint {
        addr: Some(key.vip.0),
        port: key.vip.1,
    };
    sock.listen(listen).ok()?;
    Some(sock)
}

fn quote_len(packet: &[u8]) -> usize {
    match packet.first().map(|b| b >> 4) {
        Some(6) => 48,
        _ => 28,
    }
}

mod dhcp;
mod ip6;
mod udp;
pub use dhcp::{LEASE_SECS, POOL};
pub use ip6::RA_INTERVAL;
pub use udp::{MAX_HELD, UDP_IDLE};

#[cfg(test)]
mod tests;
