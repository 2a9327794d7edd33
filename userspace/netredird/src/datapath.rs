//! A data path worker: one io_uring loop for its share of the attached
//! VMs (their AF_XDP sockets, engines, sessions and tunnel connections);
//! worker 0 also accepts agents and runs their handshakes, then hands each
//! connection to its VM's worker (see [`crate::workers`]).
//!
//! Each turn: wait for completions (or the next timer), feed what arrived
//! to the engines (frames from each VM's AF_XDP socket), to the links
//! (ciphertext from agents) and to the sessions (records), answer control
//! requests (attach and detach among them), then pump: each VM's engine
//! events become its session's messages (while the replay buffer has
//! room), session output goes through TLS to the socket with at most one
//! send in flight per connection, engine frames go out of the VM's AF_XDP
//! socket.
//!
//! VMs: any number attach and detach at runtime. The expensive part of an
//! attach (attaching the host's programs, the veth pair, the AF_XDP
//! socket) is done by the caller on its own thread; the loop only takes
//! the result, so attaching one VM does not stall the others. Detach
//! resets the VM's flows (the RSTs go out first), ends its session and
//! drops its programs.
//!
//! Tunnels: one per (agent, VM), all on one listen address. The agent's
//! paired key selects the VM: a VM is one user's desktop, its agent runs on
//! that user's machine, and a tunnel per VM keeps each session's replay
//! buffer, flow control, resume and fate separate (one VM's detach or
//! flood never stalls another's tunnel). An agent key paired with several
//! attached VMs is refused for now with a clear message (run one agent per
//! VM); a Hello naming the VM is the planned way past that.
//!
//! Connections: any number may be in their TLS handshake or preamble on
//! worker 0 (a garbage client cannot block a real agent); once the
//! agent's Resume has named its VM the connection moves to the VM's
//! worker (after its last operation here completes), where one per VM carries its
//! session. A paired agent that reconnects resumes the session: no byte of
//! any flow is lost. A session without a connection for `grace` is
//! dropped: every flow is reset and the resources go offline. A connection
//! that hears nothing for three heartbeats is dropped (and may be resumed).

use crate::workers::{DaemonCounters, Entry, Mailbox, Registry};
use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use netredir_datapath::engine::{Engine, EngineConfig, Event, Refusal};
use netredir_datapath::steer::VmSteer;
use netredir_datapath::xsk::Xsk;
use netredir_shared::control::{
    FlowReport, MapEntry, Response, SessionReport, Stats, Status, VmInfo,
};
use netredir_shared::link::{Link, LinkError};
use netredir_shared::pairing::PairStore;
use netredir_shared::session::{Compression, Session, SessionConfig};
use netredir_shared::subnet::{Ipv4Subnet, Ipv6Prefix};
use netredir_shared::tls::{Fingerprint, Identity, Tls, TlsError};
use netredir_shared::vip;
use netredir_shared::wire::{Msg, OpenError, Proto, VERSION};
use netredir_uring::{Completion, OpId, Reactor, Waker};
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the control plane (through [`crate::workers::Workers`]) or another
/// worker asks of a worker. A VM name is always given; the router has
/// resolved "the only VM" already.
pub enum Request {
    /// Answer with `Response::Map`.
    MapList(Option<String>, Sender<Response>),
    /// Answer with `Response::Status`.
    Status(Option<String>, Sender<Response>),
    /// Answer with `Response::Stats`.
    Stats(Option<String>, Sender<Response>),
    /// Answer with `Response::Vms` (this worker's VMs).
    VmList(Sender<Response>),
    /// Take a prepared VM; answer with `Response::Attached` (or an error,
    /// the setup dropped: its programs detach).
    Attach(Box<VmSetup>, Sender<Response>),
    /// Answer with `Response::Detached` (or an error).
    Detach(String, Sender<Response>),
    /// The agent with this key (hex) was unpaired from this VM: end its
    /// session if it has one; answer whether it had.
    EndSession(String, String, Sender<bool>),
    /// An agent's connection whose preamble selected a VM of this worker
    /// (from worker 0, which accepts and authenticates).
    Conn(Box<Handoff>),
    /// Answer with this worker's VMs' metrics.
    Metrics(Sender<Vec<crate::metrics::VmReport>>),
    /// Stop the loop.
    Shutdown,
}

/// A connection handed from the worker that ran its preamble to the worker
/// of the VM it selected, with its TLS state and unsent bytes.
pub struct Handoff {
    conn: Conn,
    resume: Resume,
}

/// What an agent's preamble asked for: VM `vm`'s session `want` (0 for a
/// new one), having received `received` of its records.
struct Resume {
    vm: u64,
    fp: Fingerprint,
    name: String,
    want: u64,
    received: u64,
}

/// A VM ready to attach: its steer programs attached to its NIC and its
/// AF_XDP socket open and registered (made off the data path thread).
pub struct VmSetup {
    /// Its stable identity (pairings are bound to it).
    pub name: String,
    /// The host end of its NIC.
    pub iface: String,
    /// Whether the NIC is only for netredir (DHCP served).
    pub dedicated: bool,
    /// The virtual subnet.
    pub subnet: Ipv4Subnet,
    /// The virtual IPv6 /64.
    pub prefix6: Ipv6Prefix,
    /// IP MTU toward the guest.
    pub mtu: usize,
    /// MAC the engine answers from.
    pub mac: [u8; 6],
    /// Its slot of the host's programs (detached when dropped).
    pub steer: VmSteer,
    /// Its AF_XDP socket.
    pub xsk: Xsk,
}

/// What the workers are set up with: what all VMs share.
#[derive(Clone)]
pub struct Config {
    /// The host's key and certificate.
    pub identity: Arc<Identity>,
    /// Paired agents (the control plane changes them too).
    pub pairs: Arc<Mutex<PairStore>>,
    /// Every worker's attached VMs.
    pub registry: Arc<Registry>,
    /// The daemon's own counters.
    pub daemon: Arc<DaemonCounters>,
    /// Default compression toward the agent.
    pub compression: Compression,
    /// Per-resource compression overrides.
    pub resource_compression: HashMap<String, Compression>,
    /// How long a session survives without a connection.
    pub grace: Duration,
    /// Interval of heartbeats; three missed ones drop the connection.
    pub heartbeat: Duration,
    /// Replay buffer limit per session.
    pub replay_limit: usize,
    /// DNS zone of the vDNS.
    pub zone: String,
    /// Most concurrent flows per VM.
    pub max_flows: usize,
    /// New flows per second per VM (bursts of twice as many).
    pub new_flows_per_sec: u32,
    /// Bytes of buffer per TCP flow and direction.
    pub flow_buffer: usize,
    /// Most bytes all TCP flows' buffers of one VM may take.
    pub max_buffer: usize,
}

#[derive(Debug, Clone, Copy)]
enum Tag {
    /// A VM's AF_XDP socket is readable (the VM's id).
    Xsk(u64),
    Accept,
    Wake,
    Recv(u64),
    Send(u64),
}

const RECV_BUF: usize = 256 * 1024;
/// Receive buffer of a connection still in its handshake: TLS and the
/// preamble are a few KiB; the big buffer comes once the agent is known.
const PREAUTH_RECV_BUF: usize = 16 * 1024;
/// A connection must finish TLS and its preamble within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections in their handshake at once; more are closed at once
/// (unauthenticated peers must not hold the daemon's memory or fds).
const MAX_PREAUTH: usize = 64;
/// ... and from one address.
const MAX_PREAUTH_PER_ADDR: usize = 16;
/// An engine with nothing scheduled still runs this often (UDP flows and
/// held SYNs expire on its polls).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// With no descriptor left to accept with, try again after this (not in
/// a busy loop).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Preamble,
    /// Its preamble selected a VM of another worker: it goes there once
    /// no operation on it is in flight here.
    Handoff,
    Up,
    Closing,
}

struct Conn {
    cgen: u64,
    fd: OwnedFd,
    ops: u32,
    link: Link,
    out: Vec<u8>,
    sending: bool,
    since: Instant,
    last_rx: Instant,
    phase: Phase,
    hello: Option<String>,
    /// The VM a pairing code on this connection was for.
    paired_vm: Option<String>,
    /// The VM whose session it carries (once it has one).
    vm: Option<u64>,
    /// The peer's address, for the per-address handshake limit.
    peer: Option<std::net::IpAddr>,
    /// The peer's address and port as seen here (after any NAT), for
    /// `netredirctl status`.
    addr: Option<std::net::SocketAddr>,
}

struct HostSession {
    id: u64,
    session: Session,
    agent_fp: Fingerprint,
    agent: String,
    /// When the last connection was lost (None while connected).
    lost_at: Option<Instant>,
    reconnects: u64,
}

struct Resource {
    name: String,
    target: String,
    ports: Vec<u16>,
    udp_ports: Vec<u16>,
    vip: Ipv4Addr,
    online: bool,
}

/// One attached VM: its engine, its socket, its session.
struct Vm {
    name: String,
    /// The worker serving it.
    worker: usize,
    iface: String,
    dedicated: bool,
    subnet: Ipv4Subnet,
    prefix6: Ipv6Prefix,
    /// Declared before `steer`, so dropped first: the socket goes before
    /// its programs and veth pair.
    xsk: Xsk,
    steer: VmSteer,
    /// The pending poll on `xsk`, cancelled at detach.
    xsk_op: Option<OpId>,
    engine: Engine,
    /// The connection carrying the session.
    active: Option<u64>,
    hs: Option<HostSession>,
    resources: Vec<Resource>,
    by_id: HashMap<u32, usize>,
    pending_frames: Vec<Vec<u8>>,
    /// This VM's counters (the daemon's own are in [`Loop`]).
    counters: HashMap<&'static str, u64>,
    /// Per resource name: flows opened, bytes each way (kept across
    /// agent reconnects, for metrics).
    per_resource: HashMap<String, crate::metrics::ResourceTotals>,
    last_ping: Instant,
    /// Refusals and malformed frames as of the last warning about them.
    reported: (Instant, [u64; 4]),
    /// Its engine took input since its last poll (frames, messages, a
    /// session change): poll it this turn.
    dirty: bool,
    /// When its engine has timer work (retransmits, timeouts) next.
    poll_at: Instant,
}

struct Loop {
    /// This worker's index.
    worker: usize,
    cfg: Config,
    reactor: Reactor<Tag>,
    /// Where agents connect (worker 0 only).
    listener: Option<TcpListener>,
    /// Every worker's mailbox (for handing connections over).
    peers: Vec<Mailbox>,
    vms: BTreeMap<u64, Vm>,
    conns: Vec<Conn>,
    next_cgen: u64,
    /// Connections waiting to go to another worker: (worker, what it
    /// needs to take them), by connection.
    handoffs: HashMap<u64, (usize, Resume)>,
    /// Tunnel connections refused before authentication, as of the last
    /// warning about them (one line per 10 s at most).
    reported_preauth: (Instant, u64),
    /// Accept waits until then (no descriptor was left).
    accept_paused: Option<Instant>,
    /// Sockets of detached VMs, kept until their cancelled poll has
    /// completed: the kernel holds the socket until then, and its frames
    /// go back to the pool only once it is closed.
    retiring: HashMap<u64, Xsk>,
}

/// Runs worker `worker` until `Request::Shutdown` or a fatal error;
/// `listener` (worker 0's) accepts agents.
pub fn run(
    worker: usize,
    cfg: Config,
    listener: Option<TcpListener>,
    rx: Receiver<Request>,
    waker: Arc<Waker>,
    peers: Vec<Mailbox>,
) -> Result<()> {
    let reactor = Reactor::new(256).context("cannot set up io_uring")?;
    let mut l = Loop {
        worker,
        cfg,
        reactor,
        listener,
        peers,
        vms: BTreeMap::new(),
        conns: Vec::new(),
        next_cgen: 1,
        handoffs: HashMap::new(),
        reported_preauth: (Instant::now(), 0),
        accept_paused: None,
        retiring: HashMap::new(),
    };
    let listen_fd = l.listener.as_ref().map(|l| l.as_raw_fd());
    if let Some(fd) = listen_fd {
        l.reactor.accept(fd, Tag::Accept);
    }
    l.reactor.read(waker.fd(), Vec::with_capacity(8), Tag::Wake);
    loop {
        let now = Instant::now();
        let mut delay = Duration::from_secs(1);
        for vm in l.vms.values_mut() {
            delay = delay.min(vm.poll_at.saturating_duration_since(now));
            if !vm.pending_frames.is_empty() || vm.xsk.tx_pending() {
                delay = delay.min(Duration::from_millis(1));
            }
            if vm.wants_poll() {
                delay = Duration::ZERO;
            }
        }
        if let Some(t) = l.accept_paused {
            delay = delay.min(t.saturating_duration_since(now));
        }
        l.reactor.wait(Some(delay)).context("io_uring wait")?;
        let now = Instant::now();
        while let Some(c) = l.reactor.next_completion() {
            l.complete(c, now, listen_fd, waker.fd());
        }
        let mut stop = false;
        while let Ok(req) = rx.try_recv() {
            if l.request(req, now) {
                stop = true;
            }
        }
        if stop {
            for c in &mut l.conns {
                // SAFETY: shutdown(2) on a socket we own.
                unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
            let ids: Vec<u64> = l.vms.keys().copied().collect();
            for id in ids {
                l.detach(id, now);
            }
            return Ok(());
        }
        l.hand_off();
        l.timers(now);
        // Only the VMs with something to do: one VM's traffic wakes the
        // loop often, and the others' engines need not run each time.
        for vm in l.vms.values_mut() {
            if vm.dirty || now >= vm.poll_at || vm.wants_poll() {
                vm.engine.poll(now);
                vm.dirty = false;
                vm.poll_at = now
                    + vm.engine
                        .poll_delay(now)
                        .unwrap_or(IDLE_POLL)
                        .min(IDLE_POLL);
            }
        }
        l.pump(now);
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a live 8-byte buffer.
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if r != 8 {
        return Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id());
    }
    u64::from_ne_bytes(b)
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a live int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn to_msg(ev: Event) -> Option<Msg> {
    Some(match ev {
        Event::Open {
            flow,
            resource,
            port,
        } => Msg::Open {
            flow,
            resource,
            port,
        },
        Event::Data { flow, bytes } => Msg::Data { flow, bytes },
        Event::Window { flow, credit } => Msg::Window { flow, credit },
        Event::Fin { flow } => Msg::Fin { flow },
        Event::Reset { flow } => Msg::Reset { flow },
        Event::OpenUdp {
            flow,
            resource,
            port,
        } => Msg::OpenUdp {
            flow,
            resource,
            port,
        },
        Event::Datagram { flow, bytes } => Msg::Datagram { flow, bytes },
        Event::Echo {
            token,
            resource,
            size,
        } => Msg::Echo {
            token,
            resource,
            size,
        },
        Event::Closed { .. } => return None,
    })
}

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

impl Vm {
    /// Guest bytes wait in the sockets for room toward the tunnel, and
    /// there is room now: read them without waiting for a frame.
    fn wants_poll(&self) -> bool {
        self.engine.wants_poll() && self.hs.as_ref().is_none_or(|h| h.session.can_send())
    }

    fn bump(&mut self, k: &'static str) {
        *self.counters.entry(k).or_default() += 1;
    }

    fn counter(&self, k: &str) -> u64 {
        self.counters.get(k).copied().unwrap_or(0)
    }

    /// Adds to the totals of the resource `flow` goes to.
    fn account(&mut self, flow: u32, f: impl FnOnce(&mut crate::metrics::ResourceTotals)) {
        let Some(id) = self.engine.flow_resource(flow) else {
            return;
        };
        let Some(r) = self.by_id.get(&id).map(|i| &self.resources[*i]) else {
            return;
        };
        if let Some(t) = self.per_resource.get_mut(&r.name) {
            f(t);
        } else {
            let mut t = crate::metrics::ResourceTotals::default();
            f(&mut t);
            self.per_resource.insert(r.name.clone(), t);
        }
    }

    /// The session is over: every flow reset, resources offline.
    fn end_session(&mut self, now: Instant, why: &str) {
        if let Some(hs) = self.hs.take() {
            tracing::info!(
                vm = %self.name,
                session = format_args!("{:#x}", hs.id),
                "session ended: {why}; flows reset, resources offline"
            );
        }
        self.engine.set_online(false, now);
        self.engine.clear_resources();
        self.dirty = true;
        for r in &mut self.resources {
            r.online = false;
        }
        self.by_id.clear();
        while self.engine.poll_event().is_some() {}
    }

    fn export(&mut self, id: u32, name: String, target: String, ports: Vec<(u16, Proto)>) {
        let pick = |proto: Proto| -> Vec<u16> {
            ports
                .iter()
                .filter(|(_, p)| *p == proto)
                .map(|(p, _)| *p)
                .collect()
        };
        let (tcp, udp) = (pick(Proto::Tcp), pick(Proto::Udp));
        let idx = match self.resources.iter().position(|r| r.name == name) {
            Some(i) => i,
            None => {
                let subnet = self.subnet;
                let taken = |ip: Ipv4Addr| self.resources.iter().any(|r| r.vip == ip);
                let Some(vip) = vip::allocate(&subnet, &name, taken) else {
                    tracing::warn!(vm = %self.name, %name, "no free vIP left in {subnet}; export ignored");
                    return;
                };
                self.resources.push(Resource {
                    name: name.clone(),
                    target: String::new(),
                    ports: Vec::new(),
                    udp_ports: Vec::new(),
                    vip,
                    online: false,
                });
                self.resources.len() - 1
            }
        };
        let r = &mut self.resources[idx];
        r.target = target;
        r.ports = tcp.clone();
        r.udp_ports = udp.clone();
        r.online = true;
        tracing::info!(vm = %self.name, name = %r.name, vip = %r.vip, vip6 = %self.engine.vip6(r.vip), target = %r.target, ports = ?r.ports, "resource exported");
        self.engine.set_named_resource(r.vip, id, &r.name, tcp, udp);
        self.by_id.insert(id, idx);
    }

    /// Engine events → session messages, while the replay buffer has room.
    fn events_to_session(&mut self, cfg: &Config, now: Instant) {
        let Some(h) = self.hs.as_mut() else {
            while self.engine.poll_event().is_some() {}
            return;
        };
        while h.session.can_send() {
            let Some(ev) = self.engine.poll_event() else {
                break;
            };
            let acct = match &ev {
                Event::Open { resource, .. } | Event::OpenUdp { resource, .. } => {
                    Some((*resource, 1, 0))
                }
                Event::Data { flow, bytes } | Event::Datagram { flow, bytes } => self
                    .engine
                    .flow_resource(*flow)
                    .map(|r| (r, 0, bytes.len() as u64)),
                _ => None,
            };
            if let Some((rid, opens, n)) = acct
                && let Some(r) = self.by_id.get(&rid).map(|i| &self.resources[*i])
            {
                if !self.per_resource.contains_key(&r.name) {
                    self.per_resource.insert(r.name.clone(), Default::default());
                }
                let t = self.per_resource.get_mut(&r.name).expect("inserted");
                t.opens += opens;
                t.to_resource += n;
            }
            match ev {
                Event::Closed { flow } => h.session.forget_flow(flow),
                Event::Open { resource, flow, .. } => {
                    if let Some(r) = self.by_id.get(&resource).map(|i| &self.resources[*i])
                        && let Some(c) = cfg.resource_compression.get(&r.name)
                    {
                        h.session.set_flow_compression(flow, *c);
                    }
                    h.session.send(to_msg(ev).expect("open"), now);
                }
                ev => {
                    if let Some(m) = to_msg(ev) {
                        h.session.send(m, now);
                    }
                }
            }
        }
        // Nothing more to add: the record goes now.
        h.session.flush();
    }

    /// Engine frames → the VM.
    fn frames_out(&mut self) {
        while let Some(f) = self.engine.poll_frame() {
            self.pending_frames.push(f);
        }
        if !self.pending_frames.is_empty() {
            let n = self
                .xsk
                .transmit(self.pending_frames.iter().map(|f| f.as_slice()));
            self.pending_frames.drain(..n);
        } else if self.xsk.tx_pending() {
            self.xsk.kick();
        }
    }

    /// This VM's row of `vm list`.
    fn info(&self) -> VmInfo {
        let e = self.engine.counters();
        VmInfo {
            name: self.name.clone(),
            iface: self.iface.clone(),
            mode: if self.dedicated {
                "dedicated"
            } else {
                "shared"
            }
            .into(),
            agent_connected: self.active.is_some(),
            agent: self.hs.as_ref().map(|h| h.agent.clone()),
            flows: self.engine.flow_count() as u64,
            bytes_from_guest: e.bytes_from_guest,
            bytes_to_guest: e.bytes_to_guest,
            flow_buffer_bytes: self.engine.buffer_bytes() as u64,
            worker: self.worker as u32,
        }
    }

    fn map_entries(&self) -> Vec<MapEntry> {
        self.resources
            .iter()
            .map(|r| MapEntry {
                name: r.name.clone(),
                vip: r.vip.to_string(),
                vip6: self.engine.vip6(r.vip).to_string(),
                target: r.target.clone(),
                ports: r.ports.clone(),
                state: if r.online { "online" } else { "offline" }.into(),
            })
            .collect()
    }

    fn stats(&self, daemon: &BTreeMap<&'static str, u64>) -> Stats {
        let session = self.hs.as_ref().map(|h| {
            let s = h.session.stats();
            SessionReport {
                id: format!("{:#x}", h.id),
                agent: h.agent.clone(),
                connected: self.active.is_some(),
                reconnects: h.reconnects,
                records_sent: s.records_sent,
                records_received: s.records_received,
                records_retransmitted: s.records_retransmitted,
                data_bytes_out: s.data_bytes_out,
                data_wire_bytes_out: s.data_wire_bytes_out,
                data_bytes_in: s.data_bytes_in,
                data_wire_bytes_in: s.data_wire_bytes_in,
                tunnel_bytes_out: self.counter("tunnel_bytes_out"),
                tunnel_bytes_in: self.counter("tunnel_bytes_in"),
                replay_bytes: h.session.replay_bytes() as u64,
                compression_contexts: h.session.contexts() as u64,
            }
        });
        let mut flows: Vec<FlowReport> = self
            .hs
            .as_ref()
            .map(|h| {
                h.session
                    .flow_stats()
                    .iter()
                    .map(|(f, s)| {
                        let st = self.engine.flow_state(*f);
                        FlowReport {
                            flow: *f,
                            bytes_from_guest: s.bytes_out,
                            bytes_to_guest: s.bytes_in,
                            wire_out: s.wire_out,
                            wire_in: s.wire_in,
                            state: st.as_ref().map(|s| s.state.clone()).unwrap_or_default(),
                            credit: st.as_ref().map_or(0, |s| u64::from(s.credit)),
                            allowed: st.as_ref().map_or(0, |s| u64::from(s.allowed)),
                            to_guest_queued: st.as_ref().map_or(0, |s| s.to_guest),
                            from_guest_queued: st.as_ref().map_or(0, |s| s.from_guest),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        flows.sort_by_key(|f| f.flow);
        let e = self.engine.counters();
        Stats {
            session,
            flows,
            refused_opens: e.refused_by_agent
                + e.refused_no_resource
                + e.refused_offline
                + e.refused_limit,
            refused_connections: daemon.get("tunnel_refused").copied().unwrap_or(0)
                + self.counter("tunnel_refused"),
        }
    }

    fn status(
        &self,
        zone: &str,
        daemon: &BTreeMap<&'static str, u64>,
        agent_addr: Option<String>,
    ) -> Status {
        let mut counters: Vec<(String, u64)> = self
            .engine
            .counters()
            .pairs()
            .into_iter()
            .map(|(k, v)| (format!("engine.{k}"), v))
            .collect();
        // The daemon's counters, with this VM's in place of its own keys.
        let mut own: BTreeMap<&str, u64> = daemon.iter().map(|(k, v)| (*k, *v)).collect();
        own.extend(self.counters.iter().map(|(k, v)| (*k, *v)));
        counters.extend(own.into_iter().map(|(k, v)| (format!("daemon.{k}"), v)));
        counters.push(("xsk.tx_full".into(), self.xsk.tx_full));
        counters.push(("xsk.tx_oversize".into(), self.xsk.tx_oversize));
        counters.push(("xsk.frames_held".into(), self.xsk.frames_held() as u64));
        counters.push(("xsk.pool_dry".into(), self.xsk.pool_dry));
        let pool = self.xsk.pool();
        counters.push(("umem.frames".into(), u64::from(pool.frames())));
        counters.push(("umem.frames_free".into(), pool.free_frames() as u64));
        if let Some(h) = &self.hs {
            let s = h.session.stats();
            counters.push(("session.skipped".into(), s.skipped));
            counters.push(("session.flow_errors".into(), s.flow_errors));
            counters.push(("session.duplicates".into(), s.duplicates));
        }
        counters.extend(
            self.steer
                .counters()
                .into_iter()
                .map(|(k, v)| (format!("steer.{k}"), v)),
        );
        Status {
            iface: self.iface.clone(),
            subnet: self.subnet.to_string(),
            agent_connected: self.active.is_some(),
            agent_name: self.hs.as_ref().map(|h| h.agent.clone()),
            agent_addr,
            flows: self.engine.flow_count() as u64,
            prefix6: self.prefix6.to_string(),
            dns: vec![
                self.engine.dns_addr().to_string(),
                self.engine.dns_addr6().to_string(),
            ],
            zone: zone.to_string(),
            counters,
        }
    }

    /// This VM's metrics snapshot.
    fn report(&self, zone: &str, daemon: &BTreeMap<&'static str, u64>) -> crate::metrics::VmReport {
        let st = self.status(zone, daemon, None);
        let stats = self.stats(daemon);
        let e = self.engine.counters();
        let open = self.engine.flows_per_resource();
        let resources = self
            .resources
            .iter()
            .map(|r| {
                let t = self.per_resource.get(&r.name).cloned().unwrap_or_default();
                let id = self
                    .by_id
                    .iter()
                    .find(|(_, i)| self.resources[**i].name == r.name);
                let flows = id.and_then(|(id, _)| open.get(id)).copied().unwrap_or(0);
                crate::metrics::ResourceReport {
                    name: r.name.clone(),
                    online: r.online,
                    flows: flows as u64,
                    totals: t,
                }
            })
            .collect::<Vec<_>>();
        crate::metrics::VmReport {
            name: self.name.clone(),
            agent_connected: st.agent_connected,
            flows: st.flows,
            flow_buffer_bytes: self.engine.buffer_bytes() as u64,
            session: stats.session,
            refusals: vec![
                ("no_resource", e.refused_no_resource),
                ("offline", e.refused_offline),
                ("limit", e.refused_limit),
                ("rate", e.refused_rate),
                ("opening", e.syn_dropped_opening),
                ("by_agent", e.refused_by_agent),
            ],
            counters: st.counters,
            resources,
        }
    }
}

impl Loop {
    fn bump(&self, k: &'static str) {
        self.cfg.daemon.add(k, 1);
    }

    fn add(&self, k: &'static str, n: u64) {
        self.cfg.daemon.add(k, n);
    }

    fn counter(&self, k: &str) -> u64 {
        self.cfg.daemon.get(k)
    }

    fn conn(&mut self, cgen: u64) -> Option<&mut Conn> {
        self.conns.iter_mut().find(|c| c.cgen == cgen)
    }

    /// The VM a request names, or the only one attached.
    fn resolve(&self, vm: Option<&str>) -> Result<u64, String> {
        match vm {
            Some(name) => self
                .vms
                .iter()
                .find(|(_, v)| v.name == name)
                .map(|(id, _)| *id)
                .ok_or_else(|| format!("no VM {name:?} is attached (see `netredirctl vm list`)")),
            None => match self.vms.keys().collect::<Vec<_>>().as_slice() {
                [id] => Ok(**id),
                [] => Err(
                    "no VM is attached: attach one with `netredirctl vm attach NAME --iface IF`"
                        .into(),
                ),
                _ => Err(format!(
                    "{} VMs are attached: say which with --vm NAME (see `netredirctl vm list`)",
                    self.vms.len()
                )),
            },
        }
    }

    /// Answers one request; true to stop the loop.
    fn request(&mut self, req: Request, now: Instant) -> bool {
        match req {
            Request::MapList(vm, reply) => {
                let r = match self.resolve(vm.as_deref()) {
                    Ok(id) => Response::Map {
                        entries: self.vms[&id].map_entries(),
                    },
                    Err(e) => error(e),
                };
                let _ = reply.send(r);
            }
            Request::Status(vm, reply) => {
                let r = match self.resolve(vm.as_deref()) {
                    Ok(id) => {
                        let v = &self.vms[&id];
                        let addr = v
                            .active
                            .and_then(|g| self.conns.iter().find(|c| c.cgen == g))
                            .and_then(|c| c.addr)
                            .map(|a| a.to_string());
                        let daemon = self.cfg.daemon.snapshot();
                        Response::Status(v.status(&self.cfg.zone, &daemon, addr))
                    }
                    Err(e) => error(e),
                };
                let _ = reply.send(r);
            }
            Request::Stats(vm, reply) => {
                let r = match self.resolve(vm.as_deref()) {
                    Ok(id) => Response::Stats(self.vms[&id].stats(&self.cfg.daemon.snapshot())),
                    Err(e) => error(e),
                };
                let _ = reply.send(r);
            }
            Request::VmList(reply) => {
                let _ = reply.send(Response::Vms {
                    vms: self.vms.values().map(Vm::info).collect(),
                });
            }
            Request::Attach(setup, reply) => {
                let _ = reply.send(self.attach(*setup, now));
            }
            Request::Detach(name, reply) => {
                let r = match self.resolve(Some(&name)) {
                    Ok(id) => {
                        let flows = self.vms[&id].engine.flow_count() as u64;
                        self.detach(id, now);
                        Response::Detached {
                            name,
                            flows_reset: flows,
                        }
                    }
                    Err(e) => error(e),
                };
                let _ = reply.send(r);
            }
            Request::EndSession(name, key, reply) => {
                let _ = reply.send(self.end_agent_session(&name, &key, now));
            }
            Request::Conn(h) => self.take_conn(*h, now),
            Request::Metrics(reply) => {
                let daemon = self.cfg.daemon.snapshot();
                let vms: Vec<_> = self
                    .vms
                    .values()
                    .map(|v| v.report(&self.cfg.zone, &daemon))
                    .collect();
                let _ = reply.send(vms);
            }
            Request::Shutdown => return true,
        }
        false
    }

    /// Takes a prepared VM: a new engine, its socket polled.
    fn attach(&mut self, s: VmSetup, now: Instant) -> Response {
        let id = self.cfg.registry.next_id();
        let entry = Entry {
            worker: self.worker,
            id,
            iface: s.iface.clone(),
        };
        if let Err(why) = self.cfg.registry.insert(&s.name, entry) {
            return error(why);
        }
        let cfg = &self.cfg;
        let mut ecfg = EngineConfig::new(s.subnet.network(), s.subnet.prefix_len(), s.mac);
        ecfg.prefix6 = s.prefix6.network();
        ecfg.mtu = s.mtu;
        ecfg.max_flows = cfg.max_flows;
        ecfg.new_flow_rate = cfg.new_flows_per_sec;
        ecfg.new_flow_burst = cfg.new_flows_per_sec.saturating_mul(2);
        ecfg.socket_buffer = cfg.flow_buffer;
        // The windows are the protocol's: the agent sends HOST_WINDOW before
        // our first grant and takes AGENT_WINDOW before its own.
        ecfg.window = netredir_shared::wire::HOST_WINDOW;
        ecfg.peer_window = netredir_shared::wire::AGENT_WINDOW;
        ecfg.max_memory = cfg.max_buffer;
        ecfg.seed = random_u64();
        ecfg.dhcp = s.dedicated;
        ecfg.zone = cfg.zone.clone();
        let op = self.reactor.poll_in(s.xsk.fd(), Tag::Xsk(id));
        let vm = Vm {
            name: s.name,
            worker: self.worker,
            iface: s.iface,
            dedicated: s.dedicated,
            subnet: s.subnet,
            prefix6: s.prefix6,
            steer: s.steer,
            xsk: s.xsk,
            xsk_op: Some(op),
            engine: Engine::new(ecfg, now),
            active: None,
            hs: None,
            resources: Vec::new(),
            by_id: HashMap::new(),
            pending_frames: Vec::new(),
            counters: HashMap::new(),
            per_resource: HashMap::new(),
            last_ping: now,
            reported: (now, [0; 4]),
            dirty: true,
            poll_at: now,
        };
        tracing::info!(vm = %vm.name, iface = %vm.iface, mode = if vm.dedicated { "dedicated" } else { "shared" }, subnet = %vm.subnet, worker = self.worker, "VM attached; waiting for its agent");
        let info = vm.info();
        self.vms.insert(id, vm);
        Response::Attached(info)
    }

    /// Lets a VM go: its guest sees its flows reset (sent before the
    /// socket closes), its tunnel closes, its programs are removed.
    fn detach(&mut self, id: u64, now: Instant) {
        if let Some(a) = self.vms.get(&id).and_then(|v| v.active) {
            self.drop_conn(a, now);
        }
        let Some(mut vm) = self.vms.remove(&id) else {
            return;
        };
        self.cfg.registry.remove(&vm.name);
        vm.end_session(now, "the VM was detached");
        vm.frames_out();
        for c in self.conns.iter_mut().filter(|c| c.vm == Some(id)) {
            c.vm = None;
        }
        tracing::info!(vm = %vm.name, iface = %vm.iface, "VM detached");
        let Vm {
            xsk, steer, xsk_op, ..
        } = vm;
        // The programs go first: nothing is steered to the socket anymore.
        drop(steer);
        match xsk_op {
            Some(op) => {
                self.reactor.cancel(op);
                self.retiring.insert(id, xsk);
            }
            None => drop(xsk),
        }
    }

    fn complete(
        &mut self,
        c: Completion<Tag>,
        now: Instant,
        listen_fd: Option<RawFd>,
        wake_fd: RawFd,
    ) {
        match c.tag {
            Tag::Xsk(id) => {
                if let Some(vm) = self.vms.get_mut(&id) {
                    let engine = &mut vm.engine;
                    vm.xsk.receive(|f| engine.handle_frame(f, now));
                    vm.dirty = true;
                    vm.xsk_op = Some(self.reactor.poll_in(vm.xsk.fd(), Tag::Xsk(id)));
                } else {
                    // A detached VM's poll, cancelled: its socket may go.
                    self.retiring.remove(&id);
                }
            }
            Tag::Wake => {
                let mut buf = c.buf.unwrap_or_default();
                buf.clear();
                self.reactor.read(wake_fd, buf, Tag::Wake);
            }
            Tag::Accept => match c.io_result() {
                Ok(fd) => {
                    if let Some(l) = listen_fd {
                        self.reactor.accept(l, Tag::Accept);
                    }
                    // SAFETY: accept returned a new fd that we now own.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
                    self.new_conn(fd, now);
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    // The connection waits in the backlog; retrying at once
                    // would spin. Handshakes time out and give fds back.
                    if self.counter("tunnel_accept_backoffs").is_multiple_of(100) {
                        tracing::warn!(
                            "accept on tunnel listener: {e}; retrying every {ACCEPT_BACKOFF:?}"
                        );
                    }
                    self.bump("tunnel_accept_backoffs");
                    self.accept_paused = Some(now + ACCEPT_BACKOFF);
                }
                Err(e) => {
                    if let Some(l) = listen_fd {
                        self.reactor.accept(l, Tag::Accept);
                    }
                    tracing::warn!("accept on tunnel listener: {e}");
                }
            },
            Tag::Recv(cgen) => self.on_recv(cgen, c, now),
            Tag::Send(cgen) => self.on_send(cgen, c),
        }
    }

    fn new_conn(&mut self, fd: OwnedFd, now: Instant) {
        let sock = std::net::TcpStream::from(fd);
        let addr = sock.peer_addr().ok();
        let peer = addr.map(|a| a.ip());
        let fd = OwnedFd::from(sock);
        let preauth = self.conns.iter().filter(|c| c.phase == Phase::Preamble);
        let (total, same) = preauth.fold((0, 0), |(t, s), c| {
            (t + 1, s + usize::from(peer.is_some() && c.peer == peer))
        });
        if total >= MAX_PREAUTH || same >= MAX_PREAUTH_PER_ADDR {
            // Closed at once (fd dropped): the peer sees a reset.
            tracing::debug!(?peer, total, same, "too many tunnel handshakes; closing");
            self.bump("tunnel_refused_handshake_limit");
            self.bump("tunnel_refused");
            return;
        }
        let tls = match Tls::server(&self.cfg.identity) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("cannot set up TLS: {e}");
                return;
            }
        };
        set_nodelay(fd.as_raw_fd());
        let cgen = self.next_cgen;
        self.next_cgen += 1;
        self.reactor.recv(
            fd.as_raw_fd(),
            Vec::with_capacity(PREAUTH_RECV_BUF),
            Tag::Recv(cgen),
        );
        self.conns.push(Conn {
            cgen,
            fd,
            ops: 1,
            link: Link::new(tls),
            out: Vec::new(),
            sending: false,
            since: now,
            last_rx: now,
            phase: Phase::Preamble,
            hello: None,
            paired_vm: None,
            vm: None,
            peer,
            addr,
        });
        self.bump("tunnel_connections");
    }

    /// Stops using a connection: shut down now, freed when its operations
    /// have completed. If it carried a session, the session waits for a
    /// resume (up to `grace`).
    fn drop_conn(&mut self, cgen: u64, now: Instant) {
        let grace = self.cfg.grace;
        let Some(c) = self.conn(cgen) else { return };
        if c.phase == Phase::Closing {
            return;
        }
        c.phase = Phase::Closing;
        // SAFETY: shutdown(2) on our socket; pending ops complete.
        unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(vm) = c.vm.and_then(|id| self.vms.get_mut(&id))
            && vm.active == Some(cgen)
        {
            vm.active = None;
            vm.engine.set_accepting(false);
            vm.dirty = true;
            for r in &mut vm.resources {
                r.online = false;
            }
            if let Some(hs) = &mut vm.hs {
                hs.session.connection_lost();
                hs.lost_at = Some(now);
                tracing::info!(
                    vm = %vm.name,
                    ?grace,
                    "tunnel connection lost; flows are kept while the agent resumes"
                );
            }
        }
        self.reap();
    }

    fn reap(&mut self) {
        self.conns
            .retain(|c| !(c.phase == Phase::Closing && c.ops == 0));
    }

    /// Refuses a connection in its preamble: the agent learns why, the
    /// operator reads it in the log, the counter moves.
    fn refuse(&mut self, cgen: u64, counter: &'static str, why: &str) {
        tracing::warn!("refused tunnel connection: {why}");
        self.bump(counter);
        self.bump("tunnel_refused");
        self.close_preamble(
            cgen,
            Msg::Refused {
                reason: why.to_string(),
            },
        );
    }

    /// Ends a connection in its preamble with `last` (a refusal, or "not
    /// now"), sent before the socket shuts.
    fn close_preamble(&mut self, cgen: u64, last: Msg) {
        if let Some(c) = self.conn(cgen) {
            c.link.send_preamble(&last);
            c.link.close();
            let mut out = std::mem::take(&mut c.out);
            c.link.flush(None, &mut out);
            c.out = out;
            // Let the refusal go out before the socket shuts.
            let fd = c.fd.as_raw_fd();
            if !c.sending && !c.out.is_empty() {
                let b = std::mem::take(&mut c.out);
                c.ops += 1;
                c.sending = true;
                self.reactor.send(fd, b, 0, Tag::Send(cgen));
            }
            if let Some(c) = self.conn(cgen) {
                c.phase = Phase::Closing;
                // SAFETY: shutdown(2) of the read side only.
                unsafe { libc::shutdown(fd, libc::SHUT_RD) };
            }
        }
    }

    /// The VM whose session connection `cgen` carries, if it does.
    fn active_vm(&self, cgen: u64) -> Option<u64> {
        let id = self.conns.iter().find(|c| c.cgen == cgen)?.vm?;
        (self.vms.get(&id)?.active == Some(cgen)).then_some(id)
    }

    fn on_recv(&mut self, cgen: u64, c: Completion<Tag>, now: Instant) {
        let io = c.io_result();
        let Some(conn) = self.conn(cgen) else { return };
        conn.ops -= 1;
        if conn.phase == Phase::Closing {
            self.reap();
            return;
        }
        let mut buf = c.buf.unwrap_or_default();
        let n = match io {
            Ok(0) => {
                tracing::debug!(cgen, "tunnel connection closed by peer");
                return self.drop_conn(cgen, now);
            }
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(cgen, "tunnel recv: {e}");
                return self.drop_conn(cgen, now);
            }
        };
        self.add("tunnel_bytes_in", n as u64);
        let active = self.active_vm(cgen);
        let conn = self
            .conns
            .iter_mut()
            .find(|c| c.cgen == cgen)
            .expect("live");
        conn.last_rx = now;
        let was_handshaking = conn.link.handshaking();
        if let Some(vm) = conn.vm.and_then(|id| self.vms.get_mut(&id)) {
            *vm.counters.entry("tunnel_bytes_in").or_default() += n as u64;
        }
        let session = active
            .and_then(|id| self.vms.get_mut(&id))
            .and_then(|v| v.hs.as_mut())
            .map(|h| &mut h.session);
        let res = conn.link.receive(&buf, session);
        match res {
            Ok(msgs) => {
                for m in msgs {
                    self.on_preamble(cgen, m, now);
                }
            }
            Err(LinkError::Tls(e)) if was_handshaking => {
                let counter = match e {
                    TlsError::NotTls => "tunnel_refused_not_tls",
                    _ => "tunnel_refused_tls",
                };
                tracing::warn!("refused tunnel connection: TLS handshake failed: {e}");
                self.bump(counter);
                self.bump("tunnel_refused");
                return self.drop_conn(cgen, now);
            }
            Err(e) => {
                tracing::warn!("tunnel protocol error: {e}; dropping the connection");
                self.bump("tunnel_protocol_errors");
                return self.drop_conn(cgen, now);
            }
        }
        if let Some(id) = active {
            self.drain_session(id, now);
        }
        if let Some(conn) = self.conn(cgen)
            && conn.phase != Phase::Closing
            && conn.phase != Phase::Handoff
        {
            if conn.phase == Phase::Up && buf.capacity() < RECV_BUF {
                buf = Vec::with_capacity(RECV_BUF);
            }
            buf.clear();
            conn.ops += 1;
            let fd = conn.fd.as_raw_fd();
            self.reactor.recv(fd, buf, Tag::Recv(cgen));
        }
    }

    fn on_send(&mut self, cgen: u64, c: Completion<Tag>) {
        let io = c.io_result();
        let Some(conn) = self.conn(cgen) else { return };
        conn.ops -= 1;
        conn.sending = false;
        let mut buf = c.buf.unwrap_or_default();
        match io {
            Ok(n) => {
                self.add("tunnel_bytes_out", n as u64);
                let conn = self
                    .conns
                    .iter_mut()
                    .find(|c| c.cgen == cgen)
                    .expect("live");
                if let Some(vm) = conn.vm.and_then(|id| self.vms.get_mut(&id)) {
                    *vm.counters.entry("tunnel_bytes_out").or_default() += n as u64;
                }
                if n < buf.len() {
                    buf.drain(..n);
                    buf.extend_from_slice(&conn.out);
                    conn.out = buf;
                }
            }
            Err(e) => {
                tracing::debug!(cgen, "tunnel send: {e}");
                let now = Instant::now();
                self.drop_conn(cgen, now);
            }
        }
        self.reap();
    }

    /// The attached VM an agent with key `fp` reaches, or why none:
    /// `Ok(Err(why))` for "not now" (its VM is not attached: the agent
    /// tries again), `Err(why)` for "never" (refused).
    fn vm_for(
        &self,
        fp: &Fingerprint,
        paired_vm: Option<&str>,
    ) -> Result<Result<Entry, String>, String> {
        let key = &fp.to_hex()[..16];
        if let Some(name) = paired_vm {
            return Ok(self.cfg.registry.get(name).ok_or_else(|| {
                format!("paired with VM {name}, which is not attached on this host now")
            }));
        }
        let pairs = self.cfg.pairs.lock().unwrap_or_else(|p| p.into_inner());
        let mine: Vec<(String, Entry)> = self
            .cfg
            .registry
            .all()
            .into_iter()
            .filter(|(name, _)| pairs.allows(fp, name))
            .collect();
        match mine.as_slice() {
            [(_, e)] => Ok(Ok(e.clone())),
            [] => {
                let paired: Vec<String> = pairs
                    .list(None)
                    .into_iter()
                    .filter(|a| a.fingerprint == fp.to_hex())
                    .map(|a| a.vm)
                    .collect();
                if paired.is_empty() {
                    Err(format!(
                        "this agent (key {key}) is not paired with any VM here: run netredir-agent once with --pair CODE (from `netredirctl pair --vm NAME` on the host)"
                    ))
                } else {
                    Ok(Err(format!(
                        "VM {} (paired with this agent) is not attached on this host now",
                        paired.join(", ")
                    )))
                }
            }
            several => Err(format!(
                "this agent (key {key}) is paired with several attached VMs ({}): run one agent per VM, each with its own --state-dir",
                several
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// A preamble message on connection `cgen`.
    fn on_preamble(&mut self, cgen: u64, m: Msg, now: Instant) {
        let Some(conn) = self.conn(cgen) else { return };
        if conn.phase != Phase::Preamble {
            return;
        }
        let Some(fp) = conn.link.peer() else { return };
        match m {
            Msg::Hello { version, name } => {
                if version != VERSION {
                    let why =
                        format!("protocol version {version} (this netredird speaks {VERSION})");
                    return self.refuse(cgen, "tunnel_refused_version", &why);
                }
                conn.hello = Some(name);
            }
            Msg::Pair { secret } => {
                let name = conn.hello.clone().unwrap_or_default();
                let (vm, redeemed) = {
                    let mut pairs = self.cfg.pairs.lock().unwrap_or_else(|p| p.into_inner());
                    let vm = pairs.code_vm(&secret, now);
                    let redeemed = match &vm {
                        Some(vm) => pairs.redeem(&secret, &fp, &name, vm, now),
                        None => Ok(false),
                    };
                    (vm, redeemed)
                };
                match redeemed {
                    Ok(true) => {
                        let vm = vm.expect("redeemed");
                        tracing::info!(agent = %name, key = %fp, %vm, "agent paired");
                        self.bump("pairings");
                        if let Some(c) = self.conn(cgen) {
                            c.paired_vm = Some(vm);
                        }
                    }
                    Ok(false) => {
                        let why = "the pairing code is wrong, used or expired: get a new one with `netredirctl pair`";
                        self.refuse(cgen, "tunnel_refused_bad_code", why)
                    }
                    Err(e) => {
                        tracing::error!("cannot save the pairing: {e}");
                        self.refuse(
                            cgen,
                            "tunnel_refused_bad_code",
                            "the host could not save the pairing",
                        )
                    }
                }
            }
            Msg::Resume { session, received } => {
                let Some(name) = conn.hello.clone() else {
                    return self.refuse(cgen, "tunnel_refused_protocol", "Resume before Hello");
                };
                let paired_vm = conn.paired_vm.clone();
                match self.vm_for(&fp, paired_vm.as_deref()) {
                    Ok(Ok(e)) if e.worker == self.worker => {
                        self.start_session(cgen, e.id, fp, name, session, received, now)
                    }
                    Ok(Ok(e)) => {
                        // Its VM is on another worker: the connection goes
                        // there once nothing of it is in flight here.
                        let conn = self.conn(cgen).expect("live");
                        conn.phase = Phase::Handoff;
                        let meta = Resume {
                            vm: e.id,
                            fp,
                            name,
                            want: session,
                            received,
                        };
                        self.handoffs.insert(cgen, (e.worker, meta));
                    }
                    Ok(Err(why)) => {
                        tracing::debug!("tunnel connection told to come back later: {why}");
                        self.bump("tunnel_later_vm_detached");
                        self.close_preamble(cgen, Msg::Later { reason: why });
                    }
                    Err(why) => self.refuse(cgen, "tunnel_refused_unpaired", &why),
                }
            }
            other => {
                let why = format!("unexpected {other:?} in the preamble");
                self.refuse(cgen, "tunnel_refused_protocol", &why);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_session(
        &mut self,
        cgen: u64,
        id: u64,
        fp: Fingerprint,
        name: String,
        want: u64,
        received: u64,
        now: Instant,
    ) {
        if !self.vms.contains_key(&id) {
            // Detached while the connection was on its way here.
            self.bump("tunnel_later_vm_detached");
            let reason = "its VM was detached just now".to_string();
            return self.close_preamble(cgen, Msg::Later { reason });
        }
        // One connection carries the session: a newer one replaces it.
        if let Some(old) = self.vms[&id].active
            && old != cgen
        {
            tracing::info!(vm = %self.vms[&id].name, "a new connection from the agent replaces the current one");
            self.drop_conn(old, now);
        }
        let (replay_limit, compression) = (self.cfg.replay_limit, self.cfg.compression);
        let vm = self.vms.get_mut(&id).expect("attached");
        let resumable = vm
            .hs
            .as_ref()
            .is_some_and(|h| h.id == want && want != 0 && h.agent_fp == fp);
        let mut resumed = false;
        if resumable {
            let hs = vm.hs.as_mut().expect("checked");
            hs.session.connection_lost();
            match hs.session.resume(received) {
                Ok(()) => {
                    resumed = true;
                    hs.lost_at = None;
                    hs.reconnects += 1;
                    hs.agent = name.clone();
                    tracing::info!(vm = %vm.name, agent = %name, session = format_args!("{:#x}", hs.id), "session resumed");
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.name, "cannot resume the session: {e}; starting a new one")
                }
            }
        }
        vm.dirty = true;
        if resumed {
            vm.engine.set_accepting(true);
            let live: Vec<usize> = vm.by_id.values().copied().collect();
            for i in live {
                vm.resources[i].online = true;
            }
        } else {
            if vm.hs.is_some() {
                vm.end_session(now, "replaced by a new session");
            }
            let sid = random_u64() | 1;
            vm.hs = Some(HostSession {
                id: sid,
                session: Session::new(SessionConfig {
                    replay_limit,
                    compression,
                    ..Default::default()
                }),
                agent_fp: fp,
                agent: name.clone(),
                lost_at: None,
                reconnects: 0,
            });
            vm.engine.set_online(true, now);
            vm.engine.set_accepting(true);
            tracing::info!(vm = %vm.name, agent = %name, session = format_args!("{sid:#x}"), "agent connected, new session");
        }
        let hs = vm.hs.as_mut().expect("set");
        let welcome = Msg::Welcome {
            session: hs.id,
            received: hs.session.received(),
            resumed,
        };
        let conn = self
            .conns
            .iter_mut()
            .find(|c| c.cgen == cgen)
            .expect("live");
        conn.link.send_preamble(&welcome);
        if let Err(e) = conn.link.enter_records(&mut hs.session) {
            tracing::warn!("tunnel protocol error right after the preamble: {e}");
            return self.drop_conn(cgen, now);
        }
        conn.phase = Phase::Up;
        conn.vm = Some(id);
        vm.active = Some(cgen);
        self.drain_session(id, now);
    }

    /// Applies the session's messages from VM `id`'s agent.
    fn drain_session(&mut self, id: u64, now: Instant) {
        let mut drop_active = false;
        if let Some(vm) = self.vms.get_mut(&id) {
            vm.dirty = true;
            loop {
                let m = match vm.hs.as_mut().map(|h| h.session.poll_msg()) {
                    None | Some(Ok(None)) => break,
                    Some(Ok(Some(m))) => m,
                    Some(Err(e)) => {
                        tracing::warn!(vm = %vm.name, "tunnel protocol error: {e}; dropping the connection");
                        vm.bump("tunnel_protocol_errors");
                        drop_active = true;
                        break;
                    }
                };
                let res = match m {
                    Msg::Export {
                        id,
                        name,
                        target,
                        ports,
                    } => {
                        vm.export(id, name, target, ports);
                        Ok(())
                    }
                    Msg::OpenOk { flow } => vm.engine.open_ok(flow, now),
                    Msg::OpenErr { flow, reason } => {
                        tracing::debug!(flow, ?reason, "agent refused open");
                        vm.bump("refused_opens");
                        let why = match reason {
                            OpenError::Unreachable => Refusal::Unreachable,
                            OpenError::TimedOut => Refusal::NoAnswer,
                            _ => Refusal::Refused,
                        };
                        vm.engine.open_err(flow, why, now)
                    }
                    Msg::Data { flow, bytes } => {
                        vm.account(flow, |t| t.from_resource += bytes.len() as u64);
                        vm.engine.data(flow, &bytes, now)
                    }
                    Msg::Datagram { flow, bytes } => {
                        vm.account(flow, |t| t.from_resource += bytes.len() as u64);
                        vm.engine.datagram(flow, &bytes, now)
                    }
                    Msg::EchoReply { token, ok } => {
                        vm.engine.echo_reply(token, ok);
                        Ok(())
                    }
                    Msg::Window { flow, credit } => vm.engine.window(flow, credit, now),
                    Msg::Fin { flow } => vm.engine.fin(flow, now),
                    Msg::Reset { flow } => vm.engine.reset(flow, now),
                    Msg::Ping { nonce } => {
                        if let Some(h) = vm.hs.as_mut() {
                            h.session.send_control(Msg::Pong { nonce });
                        }
                        Ok(())
                    }
                    Msg::Pong { .. } => Ok(()),
                    other => {
                        tracing::warn!(vm = %vm.name, "unexpected {other:?} from the agent; dropping the connection");
                        vm.bump("tunnel_protocol_errors");
                        drop_active = true;
                        break;
                    }
                };
                if let Err(e) = res {
                    // Races (a flow the guest just reset) are normal; count them.
                    tracing::debug!("{e}");
                    vm.bump("flow_messages_ignored");
                }
            }
            if let Some(h) = vm.hs.as_mut() {
                h.session.maybe_ack(false);
            }
        }
        if drop_active && let Some(a) = self.vms.get(&id).and_then(|v| v.active) {
            self.drop_conn(a, now);
        }
    }

    fn timers(&mut self, now: Instant) {
        // What a hostile or broken guest does shows in one line per 10 s
        // and VM, not one per frame.
        for vm in self.vms.values_mut() {
            if now.saturating_duration_since(vm.reported.0) < Duration::from_secs(10) {
                continue;
            }
            let c = vm.engine.counters();
            let cur = [c.refused_limit, c.refused_rate, c.malformed, c.unsupported];
            let d: Vec<u64> = cur.iter().zip(vm.reported.1).map(|(a, b)| a - b).collect();
            if d.iter().any(|x| *x > 0) {
                tracing::warn!(
                    vm = %vm.name,
                    over_flow_limits = d[0],
                    over_rate_limit = d[1],
                    malformed = d[2],
                    unsupported = d[3],
                    "guest traffic refused or dropped in the last 10 s"
                );
            }
            vm.reported = (now, cur);
        }
        if now.saturating_duration_since(self.reported_preauth.0) >= Duration::from_secs(10) {
            let limit = self.counter("tunnel_refused_handshake_limit");
            let slow = self.counter("tunnel_refused_slow_handshake");
            if limit + slow > self.reported_preauth.1 {
                tracing::warn!(
                    handshake_limit = limit,
                    no_handshake_in_time = slow,
                    "tunnel connections closed before authentication (totals)"
                );
            }
            self.reported_preauth = (now, limit + slow);
        }
        // Handshakes that take too long (or never start) are dropped.
        let slow: Vec<u64> = self
            .conns
            .iter()
            .filter(|c| {
                c.phase == Phase::Preamble
                    && now.saturating_duration_since(c.since) > HANDSHAKE_TIMEOUT
            })
            .map(|c| c.cgen)
            .collect();
        for cgen in slow {
            tracing::debug!(cgen, "no handshake within {HANDSHAKE_TIMEOUT:?}; closing");
            self.bump("tunnel_refused_slow_handshake");
            self.bump("tunnel_refused");
            self.drop_conn(cgen, now);
        }
        if let Some(t) = self.accept_paused
            && now >= t
        {
            self.accept_paused = None;
            if let Some(l) = &self.listener {
                self.reactor.accept(l.as_raw_fd(), Tag::Accept);
            }
        }
        // Heartbeats, and dead peers.
        let (heartbeat, grace) = (self.cfg.heartbeat, self.cfg.grace);
        let mut silent_conns = Vec::new();
        for vm in self.vms.values_mut() {
            if let Some(a) = vm.active {
                let silent = self
                    .conns
                    .iter()
                    .find(|c| c.cgen == a)
                    .map(|c| now.saturating_duration_since(c.last_rx))
                    .unwrap_or_default();
                if silent > heartbeat * 3 {
                    tracing::warn!(
                        vm = %vm.name,
                        ?silent,
                        "agent silent for three heartbeats; dropping the connection"
                    );
                    vm.bump("heartbeat_timeouts");
                    silent_conns.push(a);
                } else if now.saturating_duration_since(vm.last_ping) >= heartbeat {
                    vm.last_ping = now;
                    if let Some(h) = vm.hs.as_mut() {
                        h.session.send_control(Msg::Ping {
                            nonce: random_u64(),
                        });
                    }
                }
            }
        }
        for a in silent_conns {
            self.drop_conn(a, now);
        }
        for vm in self.vms.values_mut() {
            // A session nobody resumed within the grace period ends.
            if let Some(h) = &vm.hs
                && let Some(t) = h.lost_at
                && now.saturating_duration_since(t) >= grace
            {
                vm.end_session(now, "the agent did not come back within the grace period");
            }
            if let Some(h) = vm.hs.as_mut() {
                h.session.sweep_idle(now);
            }
        }
    }

    fn pump(&mut self, now: Instant) {
        for vm in self.vms.values_mut() {
            vm.events_to_session(&self.cfg, now);
        }
        // Session and preamble output → TLS → sockets.
        for c in self.conns.iter_mut() {
            if (c.phase == Phase::Closing && c.out.is_empty()) || c.phase == Phase::Handoff {
                continue;
            }
            let session =
                c.vm.and_then(|id| self.vms.get_mut(&id))
                    .filter(|v| v.active == Some(c.cgen))
                    .and_then(|v| v.hs.as_mut())
                    .map(|h| &mut h.session);
            let mut out = std::mem::take(&mut c.out);
            if c.phase != Phase::Closing {
                c.link.flush(session, &mut out);
            }
            c.out = out;
            if !c.sending && !c.out.is_empty() {
                let b = std::mem::take(&mut c.out);
                c.sending = true;
                c.ops += 1;
                self.reactor.send(c.fd.as_raw_fd(), b, 0, Tag::Send(c.cgen));
            }
        }
        for vm in self.vms.values_mut() {
            vm.frames_out();
        }
    }

    /// The agent with key `key` (hex) of VM `name` was unpaired: its
    /// session ends now (true if it had one).
    fn end_agent_session(&mut self, name: &str, key: &str, now: Instant) -> bool {
        let Some(id) = self
            .vms
            .iter()
            .find(|(_, v)| v.name == name)
            .map(|(id, _)| *id)
        else {
            return false;
        };
        let live = self.vms[&id]
            .hs
            .as_ref()
            .is_some_and(|h| h.agent_fp.to_hex() == key);
        if live {
            if let Some(c) = self.vms[&id].active {
                self.drop_conn(c, now);
            }
            if let Some(vm) = self.vms.get_mut(&id) {
                vm.end_session(now, "its agent was unpaired");
            }
        }
        live
    }

    /// Sends the connections waiting for another worker there, once
    /// nothing of theirs is in flight here.
    fn hand_off(&mut self) {
        if self.handoffs.is_empty() {
            return;
        }
        let waiting: Vec<u64> = self.handoffs.keys().copied().collect();
        for cgen in waiting {
            let Some(i) = self.conns.iter().position(|c| c.cgen == cgen) else {
                self.handoffs.remove(&cgen);
                continue;
            };
            let c = &self.conns[i];
            if c.phase != Phase::Handoff {
                // Dropped meanwhile (a failed send).
                self.handoffs.remove(&cgen);
                continue;
            }
            if c.ops > 0 {
                continue;
            }
            let conn = self.conns.swap_remove(i);
            let (worker, resume) = self.handoffs.remove(&cgen).expect("listed");
            let h = Handoff { conn, resume };
            if !self.peers[worker].send(Request::Conn(Box::new(h))) {
                tracing::warn!(
                    worker,
                    "data path worker is gone; closing a tunnel connection"
                );
            }
        }
    }

    /// A connection handed over by the worker that ran its preamble: it
    /// continues here with the VM's session.
    fn take_conn(&mut self, h: Handoff, now: Instant) {
        let Handoff { mut conn, resume } = h;
        let cgen = self.next_cgen;
        self.next_cgen += 1;
        conn.cgen = cgen;
        conn.phase = Phase::Preamble;
        let fd = conn.fd.as_raw_fd();
        self.conns.push(conn);
        let Resume {
            vm,
            fp,
            name,
            want,
            received,
        } = resume;
        self.start_session(cgen, vm, fp, name, want, received, now);
        if let Some(c) = self.conn(cgen)
            && c.phase == Phase::Up
        {
            c.ops += 1;
            self.reactor
                .recv(fd, Vec::with_capacity(RECV_BUF), Tag::Recv(cgen));
        }
    }
}
