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
//! attach (attaching the host's programs, the TAP device or AF_XDP
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
//! worker 0 (a garbage client cannot block a real agent), each with a
//! [`HostHandshake`]; the agent's request (its key, a pairing code, the
//! session it resumes) is decided here ([`Loop::admit`]: redeem, pick the
//! VM, refuse or "not now"), and an admitted connection moves to its VM's
//! worker (after its last operation here completes) and into the VM's
//! [`HostEndpoint`], the tunnel's sans-IO host side shared with the tests
//! in `netredir_shared::endpoint`: session, resume, heartbeats and the
//! grace period live there, this loop only moves bytes and acts on its
//! events. A paired agent that reconnects resumes the session: no byte of
//! any flow is lost. A session without a connection for `grace` is
//! dropped: every flow is reset and the resources go offline. A connection
//! that hears nothing for three heartbeats is dropped (and may be resumed).

use crate::counters::{self, DaemonCounters, VmCounters};
use crate::workers::{Entry, Mailbox, Registry};
use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use netredir_datapath::engine::{Engine, EngineConfig, Event, Refusal};
use netredir_datapath::port::Port;
use netredir_datapath::steer::VmSteer;
use netredir_shared::control::{
    FlowReport, MapEdit, MapEntry, Response, SessionReport, Stats, Status, VmInfo,
};
use netredir_shared::endpoint::{
    AgentRequest, ConnLost, HandshakeError, HostConfig, HostEndpoint, HostEvent, HostHandshake,
    SessionEnd,
};
use netredir_shared::export::{App, ExportSpec};
use netredir_shared::pairing::PairStore;
use netredir_shared::session::{Compression, SessionConfig};
use netredir_shared::subnet::{Ipv4Subnet, Ipv6Prefix};
use netredir_shared::tls::{Fingerprint, Identity, Tls, TlsError};
use netredir_shared::vip::VipTable;
use netredir_shared::wire::{Msg, OpenError, Proto};
use netredir_uring::{Completion, OpId, Reactor, Stream, Waker};
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the control plane (through [`crate::workers::Workers`]) or another
/// worker asks of a worker. A VM name is always given; the router has
/// resolved "the only VM" already.
pub enum Request {
    /// Answer with `Response::Map`.
    MapList(Option<String>, Sender<Response>),
    /// Answer with `Response::Map` after the edit (or an error).
    MapEdit(Option<String>, MapEdit, Sender<Response>),
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
    /// Its handshake done, the agent's request in it.
    conn: Conn,
    /// The VM (of the receiving worker) it selected.
    vm: u64,
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
    /// Where its frames come and go (AF_XDP socket or TAP device).
    pub port: Port,
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
    /// How long a worker spins for its next event before it sleeps.
    pub busy_poll: Duration,
    /// The host's state directory (each VM's vIPs are kept there).
    pub state_dir: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy)]
enum Tag {
    /// A VM's frame port is readable (the VM's id).
    Port(u64),
    Accept,
    Wake,
    Recv(u64),
    Send(u64),
}

const RECV_BUF: usize = 256 * 1024;
/// Receive buffer of a connection still in its handshake: TLS and the
/// preamble are a few KiB; the big buffer comes once the agent is known.
const PREAUTH_RECV_BUF: usize = 16 * 1024;
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
    /// The socket, its send queue and its operations in flight.
    stream: Stream,
    /// TLS and the agent's preamble, until the connection is admitted
    /// (then its VM's endpoint holds the link).
    hs: Option<HostHandshake>,
    phase: Phase,
    /// The VM whose session it carries (once admitted).
    vm: Option<u64>,
    /// The peer's address, for the per-address handshake limit.
    peer: Option<std::net::IpAddr>,
    /// The peer's address and port as seen here (after any NAT), for
    /// `netredirctl status`.
    addr: Option<std::net::SocketAddr>,
}

struct Resource {
    /// The name the guest finds it by (the agent's, or an operator's).
    name: String,
    /// The name the agent exports it under.
    agent_name: String,
    /// The agent's id for it in the current session.
    id: u32,
    /// What identifies it (the agent's key): its vIP is kept by it.
    key: String,
    target: String,
    /// Found by the agent's `--discover`, not named by its user.
    discovered: bool,
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
    /// Declared before `steer`, so dropped first: the socket (or TAP
    /// device) goes before its programs.
    port: Port,
    steer: VmSteer,
    /// The pending poll on `port`, cancelled at detach.
    port_op: Option<OpId>,
    engine: Engine,
    /// Its side of the tunnel: the session and the connection carrying it.
    ep: HostEndpoint,
    resources: Vec<Resource>,
    /// Each resource's vIP by its key, kept across restarts.
    vips: VipTable,
    by_id: HashMap<u32, usize>,
    pending_frames: Vec<Vec<u8>>,
    /// This VM's own counters (the daemon's are shared by the workers).
    counters: VmCounters,
    /// Per resource name: flows opened, bytes each way (kept across
    /// agent reconnects, for metrics).
    per_resource: HashMap<String, crate::metrics::ResourceTotals>,
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
    handoffs: HashMap<u64, (usize, u64)>,
    /// Tunnel connections refused before authentication, as of the last
    /// warning about them (one line per 10 s at most).
    reported_preauth: (Instant, u64),
    /// Accept waits until then (no descriptor was left).
    accept_paused: Option<Instant>,
    /// Sockets of detached VMs, kept until their cancelled poll has
    /// completed: the kernel holds the socket until then, and its frames
    /// go back to the pool only once it is closed.
    retiring: HashMap<u64, Port>,
    /// Where TAP frames are read, one after another (a 64 KiB segment
    /// and its header).
    scratch: Vec<u8>,
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
    let mut reactor = Reactor::new(256).context("cannot set up io_uring")?;
    reactor.set_spin(cfg.busy_poll);
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
        scratch: Vec::new(),
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
            if let Some(t) = vm.ep.poll_timeout() {
                delay = delay.min(t.saturating_duration_since(now));
            }
            if !vm.pending_frames.is_empty() || vm.port.tx_pending() {
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
            // Out of LISTEN now: the ring's pending accept may hold the
            // socket a little past the process's exit (io_uring tears
            // down asynchronously), and a netredird started right after
            // must be able to bind the port.
            if let Some(fd) = listen_fd {
                // SAFETY: shutdown(2) on the listener we own.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            for c in &mut l.conns {
                // SAFETY: shutdown(2) on a socket we own.
                c.stream.shutdown(libc::SHUT_RDWR);
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
        self.engine.wants_poll() && self.ep.session().is_none_or(|s| s.can_send())
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
    fn session_over(&mut self, now: Instant, why: &SessionEnd) {
        tracing::info!(vm = %self.name, "session ended: {why}; flows reset, resources offline");
        self.engine.set_online(false, now);
        self.engine.clear_resources();
        self.dirty = true;
        for r in &mut self.resources {
            r.online = false;
        }
        self.by_id.clear();
        while self.engine.poll_event().is_some() {}
    }

    /// No connection carries the session now (it may resume): new flows
    /// wait, resources show offline.
    fn tunnel_down(&mut self) {
        self.engine.set_accepting(false);
        self.dirty = true;
        for r in &mut self.resources {
            r.online = false;
        }
    }

    fn export(
        &mut self,
        id: u32,
        name: String,
        target: String,
        ports: Vec<(u16, Proto)>,
        discovered: bool,
        key: String,
    ) {
        let pick = |proto: Proto| -> Vec<u16> {
            ports
                .iter()
                .filter(|(_, p)| *p == proto)
                .map(|(p, _)| *p)
                .collect()
        };
        let (tcp, udp) = (pick(Proto::Tcp), pick(Proto::Udp));
        // An agent of an earlier version sends no key: the name is it.
        let key = if key.is_empty() { name.clone() } else { key };
        let agent_name = name;
        // The guest finds it by the name an operator gave it, if one did.
        let name = self
            .vips
            .get(&key)
            .and_then(|e| e.alias.clone())
            .unwrap_or_else(|| agent_name.clone());
        // The same resource under another name (renamed) is found by its
        // key; another resource under the same name takes over its row
        // only if nothing uses that row in this session, else it gets a
        // name of its own.
        let mut name = name;
        let idx = match self.resources.iter().position(|r| r.key == key) {
            Some(i) => Some(i),
            None => match self.resources.iter().position(|r| r.name == name) {
                Some(i) if !self.live(i) => Some(i),
                Some(_) => {
                    let base = name.clone();
                    let mut n = 2;
                    while self.resources.iter().any(|r| r.name == name) {
                        let stem: String = base.chars().take(60).collect();
                        name = format!("{stem}-{n}");
                        n += 1;
                    }
                    tracing::warn!(vm = %self.name, %base, %name, "another resource is called so in this session: this one is named apart");
                    None
                }
                None => None,
            },
        };
        let subnet = self.subnet;
        let taken = |ip: Ipv4Addr| {
            self.resources
                .iter()
                .enumerate()
                .any(|(i, r)| r.vip == ip && Some(i) != idx)
        };
        let Some((vip, changed)) = self.vips.assign(&subnet, &key, &agent_name, taken) else {
            tracing::warn!(vm = %self.name, %name, "no free vIP left in {subnet}; export ignored");
            return;
        };
        if changed && let Err(e) = self.vips.save() {
            tracing::warn!(vm = %self.name, %name, %vip, "cannot keep the vIP in the state directory ({e}): it may change at the next start");
        }
        let idx = match idx {
            Some(i) => {
                let r = &mut self.resources[i];
                if r.vip != vip {
                    self.engine.remove_resource(r.vip);
                    r.vip = vip;
                }
                if r.name != name {
                    tracing::info!(vm = %self.name, old = %r.name, new = %name, %vip, "resource renamed; its vIP stays");
                    r.name = name.clone();
                }
                r.key = key;
                r.agent_name = agent_name;
                r.id = id;
                i
            }
            None => {
                self.resources.push(Resource {
                    name: name.clone(),
                    agent_name,
                    id,
                    key,
                    target: String::new(),
                    discovered,
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
        r.discovered = discovered;
        r.ports = tcp.clone();
        r.udp_ports = udp.clone();
        r.online = true;
        tracing::info!(vm = %self.name, name = %r.name, vip = %r.vip, vip6 = %self.engine.vip6(r.vip), target = %r.target, ports = ?r.ports, "resource exported");
        self.engine.set_named_resource(r.vip, id, &r.name, tcp, udp);
        // The agent's target is its export's spec as written (it parses
        // back): ports marked /ipp are where the guest finds its printer.
        if let Ok(spec) = format!("{}={}", r.name, r.target).parse::<ExportSpec>() {
            let ipp = spec
                .ports
                .iter()
                .filter(|(p, proto)| *proto == Proto::Tcp && spec.app(*p) == Some(App::Ipp))
                .map(|(p, _)| *p)
                .collect();
            self.engine.set_ipp_ports(r.vip, ipp);
        }
        self.by_id.insert(id, idx);
    }

    /// Whether row `idx` is in the engine now (its session exported it,
    /// even if the tunnel is down for a moment).
    fn live(&self, idx: usize) -> bool {
        self.by_id.values().any(|&i| i == idx)
    }

    /// An operator's change to a row of `map list` (see [`MapEdit`]).
    fn edit(&mut self, edit: MapEdit) -> Result<(), String> {
        let name = match &edit {
            MapEdit::Pin { name, .. } | MapEdit::Rename { name, .. } | MapEdit::Remove { name } => {
                name.clone()
            }
        };
        let idx = self
            .resources
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| {
                format!(
                    "no resource {name:?} on VM {} (see `netredirctl map list`)",
                    self.name
                )
            })?;
        let key = self.resources[idx].key.clone();
        let others = |ip: Ipv4Addr, rs: &[Resource]| {
            rs.iter().enumerate().any(|(i, r)| i != idx && r.vip == ip)
        };
        match edit {
            MapEdit::Pin { vip, .. } => {
                let want = match vip {
                    Some(v) => Some(
                        v.parse::<Ipv4Addr>()
                            .map_err(|_| format!("{v:?} is not an IPv4 address"))?,
                    ),
                    None => Some(self.resources[idx].vip),
                };
                let agent_name = self.resources[idx].agent_name.clone();
                let subnet = self.subnet;
                let rs = &self.resources;
                self.vips
                    .pin(&subnet, &key, &agent_name, want, |ip| others(ip, rs))?;
            }
            MapEdit::Rename { new, .. } => {
                let new = new.trim().to_ascii_lowercase();
                let label = (1..=63).contains(&new.len())
                    && !new.starts_with('-')
                    && !new.ends_with('-')
                    && new.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if !label {
                    return Err(format!(
                        "{new:?}: a name is 1-63 letters, digits or '-', not starting or ending with '-'"
                    ));
                }
                let kept =
                    self.vips.entries().iter().any(|e| {
                        e.key != key && e.alias.as_deref().unwrap_or(e.name.as_str()) == new
                    });
                let row = self
                    .resources
                    .iter()
                    .enumerate()
                    .any(|(i, r)| i != idx && r.name == new);
                if kept || row {
                    return Err(format!("another resource is called {new}"));
                }
                self.vips.rename(&key, &new)?;
            }
            MapEdit::Remove { .. } => {
                if self.resources[idx].online {
                    return Err(format!(
                        "{name} is exported by the agent now: stop exporting it there first (remove its --export, or leave it out with --discover-deny)"
                    ));
                }
                // Offline while its session may still resume: out of the
                // engine too, so the guest stops finding it at once (the
                // agent does not announce it again on a resume).
                if self.live(idx) {
                    self.engine.remove_resource(self.resources[idx].vip);
                }
                self.vips.remove(&key);
                self.resources.remove(idx);
                self.by_id.retain(|_, i| *i != idx);
                for i in self.by_id.values_mut() {
                    if *i > idx {
                        *i -= 1;
                    }
                }
                self.vips
                    .save()
                    .map_err(|e| format!("cannot save the VM's vIPs: {e}"))?;
                return Ok(());
            }
        }
        self.vips
            .save()
            .map_err(|e| format!("cannot save the VM's vIPs: {e}"))?;
        // Apply it: a row in the engine is exported again (the engine's
        // address and names follow; online or not, as it was); another
        // takes it when it comes back.
        if self.live(idx) {
            let r = &self.resources[idx];
            let mut ports: Vec<(u16, Proto)> = r.ports.iter().map(|p| (*p, Proto::Tcp)).collect();
            ports.extend(r.udp_ports.iter().map(|p| (*p, Proto::Udp)));
            let (id, agent_name, target, discovered, online) = (
                r.id,
                r.agent_name.clone(),
                r.target.clone(),
                r.discovered,
                r.online,
            );
            self.export(id, agent_name, target, ports, discovered, key);
            if let Some(r) = self.resources.get_mut(idx) {
                r.online = online;
            }
        } else if let Some(e) = self.vips.get(&key) {
            let (vip, alias) = (e.vip, e.alias.clone());
            let r = &mut self.resources[idx];
            r.vip = vip;
            if let Some(a) = alias {
                r.name = a;
            }
        }
        self.dirty = true;
        Ok(())
    }

    /// Engine events → session messages, while the replay buffer has room.
    fn events_to_session(&mut self, cfg: &Config, now: Instant) {
        let Some(session) = self.ep.session_mut() else {
            while self.engine.poll_event().is_some() {}
            return;
        };
        while session.can_send() {
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
                Event::Closed { flow } => session.forget_flow(flow),
                Event::Open { resource, flow, .. } => {
                    if let Some(r) = self.by_id.get(&resource).map(|i| &self.resources[*i])
                        && let Some(c) = cfg.resource_compression.get(&r.name)
                    {
                        session.set_flow_compression(flow, *c);
                    }
                    session.send(to_msg(ev).expect("open"), now);
                }
                ev => {
                    if let Some(m) = to_msg(ev) {
                        session.send(m, now);
                    }
                }
            }
        }
        // Nothing more to add: the record goes now.
        session.flush();
    }

    /// Engine frames → the VM.
    fn frames_out(&mut self) {
        while let Some(f) = self.engine.poll_frame() {
            self.pending_frames.push(f);
        }
        if !self.pending_frames.is_empty() {
            let n = self
                .port
                .transmit(self.pending_frames.iter().map(|f| f.as_slice()));
            for f in self.pending_frames.drain(..n) {
                self.engine.recycle_frame(f);
            }
        } else if self.port.tx_pending() {
            self.port.kick();
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
            agent_connected: self.ep.connection().is_some(),
            agent: self.ep.agent().map(|(_, name)| name.to_string()),
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
                source: if r.discovered { "discovered" } else { "export" }.into(),
                key: r.key.clone(),
                pinned: self.vips.get(&r.key).is_some_and(|e| e.pinned),
            })
            .collect()
    }

    fn stats(&self, daemon: &DaemonCounters) -> Stats {
        let session = self.ep.session().map(|session| {
            let s = session.stats();
            SessionReport {
                id: format!("{:#x}", self.ep.session_id().unwrap_or(0)),
                agent: self
                    .ep
                    .agent()
                    .map(|(_, n)| n.to_string())
                    .unwrap_or_default(),
                connected: self.ep.connection().is_some(),
                reconnects: self.ep.reconnects(),
                records_sent: s.records_sent,
                records_received: s.records_received,
                records_retransmitted: s.records_retransmitted,
                data_bytes_out: s.data_bytes_out,
                data_wire_bytes_out: s.data_wire_bytes_out,
                data_bytes_in: s.data_bytes_in,
                data_wire_bytes_in: s.data_wire_bytes_in,
                tunnel_bytes_out: self.counters.tunnel_bytes_out,
                tunnel_bytes_in: self.counters.tunnel_bytes_in,
                replay_bytes: session.replay_bytes() as u64,
                compression_contexts: session.contexts() as u64,
            }
        });
        let mut flows: Vec<FlowReport> = self
            .ep
            .session()
            .map(|session| {
                session
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
            refused_connections: counters::get(&daemon.tunnel_refused),
        }
    }

    fn status(&self, zone: &str, daemon: &DaemonCounters, agent_addr: Option<String>) -> Status {
        let mut counters: Vec<(String, u64)> = self
            .engine
            .counters()
            .pairs()
            .into_iter()
            .map(|(k, v)| (format!("engine.{k}"), v))
            .collect();
        // This VM's own counters, then the daemon's (tunnel connections
        // before a VM is known: every VM's status shows them).
        let vm = self.counters.pairs().into_iter();
        counters.extend(vm.map(|(k, v)| (format!("vm.{k}"), v)));
        let d = daemon.pairs().into_iter();
        counters.extend(d.map(|(k, v)| (format!("daemon.{k}"), v)));
        let port = self.port.counters().into_iter();
        counters.extend(port.map(|(k, v)| (k.to_string(), v)));
        if let Some(session) = self.ep.session() {
            let s = session.stats();
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
            agent_connected: self.ep.connection().is_some(),
            agent_name: self.ep.agent().map(|(_, n)| n.to_string()),
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
    fn report(&self, zone: &str, daemon: &DaemonCounters) -> crate::metrics::VmReport {
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
            // The daemon's counters go once, not per VM.
            counters: st
                .counters
                .into_iter()
                .filter(|(k, _)| !k.starts_with("daemon."))
                .collect(),
            resources,
        }
    }
}

impl Loop {
    /// Adds one to a daemon counter.
    fn bump(&self, c: fn(&DaemonCounters) -> &AtomicU64) {
        counters::inc(c(&self.cfg.daemon));
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
            Request::MapEdit(vm, edit, reply) => {
                let r = match self.resolve(vm.as_deref()) {
                    Ok(id) => {
                        let v = self.vms.get_mut(&id).expect("resolved");
                        match v.edit(edit) {
                            Ok(()) => Response::Map {
                                entries: v.map_entries(),
                            },
                            Err(e) => error(e),
                        }
                    }
                    Err(e) => error(e),
                };
                let _ = reply.send(r);
            }
            Request::Status(vm, reply) => {
                let r = match self.resolve(vm.as_deref()) {
                    Ok(id) => {
                        let v = &self.vms[&id];
                        let addr =
                            v.ep.connection()
                                .and_then(|g| self.conns.iter().find(|c| c.cgen == g))
                                .and_then(|c| c.addr)
                                .map(|a| a.to_string());
                        let daemon = &self.cfg.daemon;
                        Response::Status(v.status(&self.cfg.zone, daemon, addr))
                    }
                    Err(e) => error(e),
                };
                let _ = reply.send(r);
            }
            Request::Stats(vm, reply) => {
                let r = match self.resolve(vm.as_deref()) {
                    Ok(id) => Response::Stats(self.vms[&id].stats(&self.cfg.daemon)),
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
                let daemon = &self.cfg.daemon;
                let vms: Vec<_> = self
                    .vms
                    .values()
                    .map(|v| v.report(&self.cfg.zone, daemon))
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
        let (vips, why) = VipTable::load_or_reset(&cfg.state_dir, &s.name);
        if let Some(why) = why {
            tracing::warn!(vm = %s.name, "cannot read the VM's vIPs: {why}");
        }
        let op = self.reactor.poll_in(s.port.fd(), Tag::Port(id));
        let vm = Vm {
            name: s.name,
            worker: self.worker,
            iface: s.iface,
            dedicated: s.dedicated,
            subnet: s.subnet,
            prefix6: s.prefix6,
            steer: s.steer,
            port: s.port,
            port_op: Some(op),
            engine: Engine::new(ecfg, now),
            ep: HostEndpoint::new(
                HostConfig {
                    session: SessionConfig {
                        replay_limit: cfg.replay_limit,
                        compression: cfg.compression,
                        ..Default::default()
                    },
                    heartbeat: cfg.heartbeat,
                    grace: cfg.grace,
                },
                now,
            ),
            resources: Vec::new(),
            vips,
            by_id: HashMap::new(),
            pending_frames: Vec::new(),
            counters: VmCounters::default(),
            per_resource: HashMap::new(),
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
        if let Some(vm) = self.vms.get_mut(&id) {
            let why = SessionEnd::Closed("the VM was detached".into());
            vm.ep.end_session(why, now);
        }
        self.drain_vm(id, now);
        let Some(mut vm) = self.vms.remove(&id) else {
            return;
        };
        self.cfg.registry.remove(&vm.name);
        // Whatever the guest still has open (a SYN held for room) is reset.
        vm.engine.set_online(false, now);
        while vm.engine.poll_event().is_some() {}
        vm.frames_out();
        for c in self.conns.iter_mut().filter(|c| c.vm == Some(id)) {
            c.vm = None;
        }
        tracing::info!(vm = %vm.name, iface = %vm.iface, "VM detached");
        let Vm {
            port,
            steer,
            port_op,
            ..
        } = vm;
        // The programs go first: nothing is steered to the socket anymore.
        drop(steer);
        match port_op {
            Some(op) => {
                self.reactor.cancel(op);
                self.retiring.insert(id, port);
            }
            None => drop(port),
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
            Tag::Port(id) => {
                if let Some(vm) = self.vms.get_mut(&id) {
                    let engine = &mut vm.engine;
                    if matches!(vm.port, Port::Tap(_)) && self.scratch.is_empty() {
                        self.scratch = vec![0; netredir_datapath::tap::RX_BUFFER];
                    }
                    vm.port
                        .receive(&mut self.scratch, |f| engine.handle_frame(f, now));
                    vm.dirty = true;
                    vm.port_op = Some(self.reactor.poll_in(vm.port.fd(), Tag::Port(id)));
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
                    if counters::get(&self.cfg.daemon.tunnel_accept_backoffs).is_multiple_of(100) {
                        tracing::warn!(
                            "accept on tunnel listener: {e}; retrying every {ACCEPT_BACKOFF:?}"
                        );
                    }
                    self.bump(|d| &d.tunnel_accept_backoffs);
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
            self.bump(|d| &d.tunnel_refused_handshake_limit);
            self.bump(|d| &d.tunnel_refused);
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
        let mut stream = Stream::new(fd);
        let buf = Vec::with_capacity(PREAUTH_RECV_BUF);
        stream.recv(&mut self.reactor, buf, Tag::Recv(cgen));
        self.conns.push(Conn {
            cgen,
            stream,
            hs: Some(HostHandshake::new(tls, now)),
            phase: Phase::Preamble,
            vm: None,
            peer,
            addr,
        });
        self.bump(|d| &d.tunnel_connections);
    }

    /// The socket of connection `cgen` failed or ended (`why`): it closes;
    /// a session it carried waits for a resume (up to `grace`).
    fn drop_conn(&mut self, cgen: u64, why: &str, now: Instant) {
        let Some(c) = self.conn(cgen) else { return };
        let vm = c.vm;
        self.close_socket(cgen);
        if let Some(id) = vm
            && let Some(v) = self.vms.get_mut(&id)
        {
            v.ep.connection_lost(cgen, why, now);
            self.drain_vm(id, now);
        }
    }

    /// Stops using a connection's socket: shut down now, freed when its
    /// operations have completed.
    fn close_socket(&mut self, cgen: u64) {
        let Some(c) = self.conn(cgen) else { return };
        if c.phase == Phase::Closing {
            return;
        }
        c.phase = Phase::Closing;
        c.stream.shutdown(libc::SHUT_RDWR);
        self.reap();
    }

    fn reap(&mut self) {
        self.conns
            .retain(|c| !(c.phase == Phase::Closing && c.stream.idle()));
    }

    /// Ends a connection in its handshake: what the handshake has to say
    /// last (a refusal, "not now") goes out before the socket shuts.
    fn close_handshake(&mut self, cgen: u64) {
        let Some(c) = self.conns.iter_mut().find(|c| c.cgen == cgen) else {
            return;
        };
        if let Some(hs) = c.hs.as_mut() {
            hs.poll_transmit(c.stream.out());
        }
        c.stream.flush(&mut self.reactor, Tag::Send(cgen));
        c.phase = Phase::Closing;
        // The read side only: the answer still goes out.
        c.stream.shutdown(libc::SHUT_RD);
        self.reap();
    }

    /// Refuses a connection in its handshake: the agent learns why, the
    /// operator reads it in the log, the counter moves.
    fn refuse(&mut self, cgen: u64, counter: fn(&DaemonCounters) -> &AtomicU64, why: &str) {
        tracing::warn!("refused tunnel connection: {why}");
        self.bump(counter);
        self.bump(|d| &d.tunnel_refused);
        if let Some(hs) = self.conn(cgen).and_then(|c| c.hs.as_mut()) {
            hs.refuse(why);
        }
        self.close_handshake(cgen);
    }

    fn on_recv(&mut self, cgen: u64, c: Completion<Tag>, now: Instant) {
        let Some(conn) = self.conns.iter_mut().find(|c| c.cgen == cgen) else {
            return;
        };
        let (io, mut buf) = conn.stream.received(c);
        if conn.phase == Phase::Closing {
            self.reap();
            return;
        }
        let n = match io {
            Ok(0) => {
                tracing::debug!(cgen, "tunnel connection closed by peer");
                return self.drop_conn(cgen, "the agent closed the connection", now);
            }
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(cgen, "tunnel recv: {e}");
                return self.drop_conn(cgen, &format!("receive: {e}"), now);
            }
        };
        counters::add(&self.cfg.daemon.tunnel_bytes_in, n as u64);
        let conn = self.conn(cgen).expect("live");
        let vm = conn.vm;
        match conn.hs.as_mut() {
            Some(hs) => match hs.handle_bytes(&buf, now) {
                Ok(Some(req)) => self.admit(cgen, req, now),
                Ok(None) => {}
                Err(e) => return self.handshake_failed(cgen, e),
            },
            None => {
                if let Some(id) = vm
                    && let Some(v) = self.vms.get_mut(&id)
                {
                    v.counters.tunnel_bytes_in += n as u64;
                    v.ep.handle_bytes(cgen, &buf, now);
                    v.dirty = true;
                    self.drain_vm(id, now);
                }
            }
        }
        if let Some(conn) = self.conns.iter_mut().find(|c| c.cgen == cgen)
            && conn.phase != Phase::Closing
            && conn.phase != Phase::Handoff
        {
            if conn.phase == Phase::Up && buf.capacity() < RECV_BUF {
                buf = Vec::with_capacity(RECV_BUF);
            }
            buf.clear();
            conn.stream.recv(&mut self.reactor, buf, Tag::Recv(cgen));
        }
    }

    /// A handshake failed: counted by why, the agent told if it can be.
    fn handshake_failed(&mut self, cgen: u64, e: HandshakeError) {
        let counter: fn(&DaemonCounters) -> &AtomicU64 = match &e {
            HandshakeError::Tls(TlsError::NotTls) => |d| &d.tunnel_refused_not_tls,
            HandshakeError::Tls(_) => |d| &d.tunnel_refused_tls,
            HandshakeError::Version(_) => |d| &d.tunnel_refused_version,
            HandshakeError::Protocol(_) | HandshakeError::Malformed(_) => {
                |d| &d.tunnel_refused_protocol
            }
            HandshakeError::TimedOut => |d| &d.tunnel_refused_slow_handshake,
        };
        match &e {
            HandshakeError::TimedOut => tracing::debug!(cgen, "{e}; closing"),
            _ => tracing::warn!("refused tunnel connection: {e}"),
        }
        self.bump(counter);
        self.bump(|d| &d.tunnel_refused);
        self.close_handshake(cgen);
    }

    fn on_send(&mut self, cgen: u64, c: Completion<Tag>) {
        let Some(conn) = self.conn(cgen) else { return };
        let vm = conn.vm;
        match conn.stream.sent(c) {
            Ok(n) => {
                counters::add(&self.cfg.daemon.tunnel_bytes_out, n as u64);
                if let Some(vm) = vm.and_then(|id| self.vms.get_mut(&id)) {
                    vm.counters.tunnel_bytes_out += n as u64;
                }
            }
            Err(e) => {
                tracing::debug!(cgen, "tunnel send: {e}");
                let now = Instant::now();
                self.drop_conn(cgen, &format!("send: {e}"), now);
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

    /// An agent's preamble is complete: redeem its pairing code, find
    /// its VM, and admit it there (here, or on the VM's worker), tell it
    /// "not now", or refuse it.
    fn admit(&mut self, cgen: u64, req: AgentRequest, now: Instant) {
        let mut paired_vm = None;
        if let Some(secret) = &req.pair {
            let (vm, redeemed) = {
                let mut pairs = self.cfg.pairs.lock().unwrap_or_else(|p| p.into_inner());
                let vm = pairs.code_vm(secret, now);
                let redeemed = match &vm {
                    Some(vm) => pairs.redeem(secret, &req.key, &req.name, vm, now),
                    None => Ok(false),
                };
                (vm, redeemed)
            };
            match redeemed {
                Ok(true) => {
                    let vm = vm.expect("redeemed");
                    tracing::info!(agent = %req.name, key = %req.key, %vm, "agent paired");
                    self.bump(|d| &d.pairings);
                    paired_vm = Some(vm);
                }
                Ok(false) => {
                    let why = "the pairing code is wrong, used or expired: get a new one with `netredirctl pair`";
                    return self.refuse(cgen, |d| &d.tunnel_refused_bad_code, why);
                }
                Err(e) => {
                    tracing::error!("cannot save the pairing: {e}");
                    let why = "the host could not save the pairing";
                    return self.refuse(cgen, |d| &d.tunnel_refused_bad_code, why);
                }
            }
        }
        match self.vm_for(&req.key, paired_vm.as_deref()) {
            Ok(Ok(e)) if e.worker == self.worker => self.accept(cgen, e.id, now),
            Ok(Ok(e)) => {
                // Its VM is on another worker: the connection goes there
                // once nothing of it is in flight here.
                self.conn(cgen).expect("live").phase = Phase::Handoff;
                self.handoffs.insert(cgen, (e.worker, e.id));
            }
            Ok(Err(why)) => {
                tracing::debug!("tunnel connection told to come back later: {why}");
                self.bump(|d| &d.tunnel_later_vm_detached);
                if let Some(hs) = self.conn(cgen).and_then(|c| c.hs.as_mut()) {
                    hs.later(&why);
                }
                self.close_handshake(cgen);
            }
            Err(why) => self.refuse(cgen, |d| &d.tunnel_refused_unpaired, &why),
        }
    }

    /// Admitted connection `cgen` goes to VM `id`'s endpoint: the session
    /// resumes or a new one starts; a connection that carried it before
    /// is replaced.
    fn accept(&mut self, cgen: u64, id: u64, now: Instant) {
        let Some(hs) = self.conn(cgen).and_then(|c| c.hs.take()) else {
            return;
        };
        let Some(vm) = self.vms.get_mut(&id) else {
            // Detached while the connection was on its way here.
            self.bump(|d| &d.tunnel_later_vm_detached);
            let c = self.conn(cgen).expect("live");
            let mut hs = hs;
            hs.later("its VM was detached just now");
            c.hs = Some(hs);
            return self.close_handshake(cgen);
        };
        let agent = hs.peer().map(|k| k.to_string()).unwrap_or_default();
        let acc = vm.ep.accept(cgen, hs, now);
        let name = vm
            .ep
            .agent()
            .map(|(_, n)| n.to_string())
            .unwrap_or_default();
        let session = format_args!("{:#x}", acc.session).to_string();
        if acc.resumed {
            tracing::info!(vm = %vm.name, agent = %name, %session, "session resumed");
        } else {
            tracing::info!(vm = %vm.name, agent = %name, key = %agent, %session, "agent connected, new session");
        }
        let c = self.conn(cgen).expect("live");
        c.phase = Phase::Up;
        c.vm = Some(id);
        // An older connection and session end first (their events come
        // before the agent's messages), then the new one is up.
        self.drain_vm(id, now);
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        if vm.ep.connection() == Some(cgen) {
            if !acc.resumed {
                vm.engine.set_online(true, now);
            }
            vm.engine.set_accepting(true);
            let live: Vec<usize> = vm.by_id.values().copied().collect();
            for i in live {
                vm.resources[i].online = true;
            }
            vm.dirty = true;
        }
    }

    /// Acts on what VM `id`'s endpoint has to say: the agent's messages
    /// to the engine, lost connections closed, an ended session's flows
    /// reset.
    fn drain_vm(&mut self, id: u64, now: Instant) {
        let mut close = Vec::new();
        if let Some(vm) = self.vms.get_mut(&id) {
            vm.dirty = true;
            while let Some(ev) = vm.ep.poll_event() {
                let m = match ev {
                    HostEvent::Msg(m) => m,
                    HostEvent::ConnectionLost { conn, why } => {
                        close.push(conn);
                        match &why {
                            ConnLost::Silent => {
                                tracing::warn!(vm = %vm.name, "agent {why}; dropping the connection");
                                vm.counters.heartbeat_timeouts += 1;
                            }
                            ConnLost::Protocol(e) => {
                                tracing::warn!(vm = %vm.name, "tunnel {e}; dropping the connection");
                                vm.counters.tunnel_protocol_errors += 1;
                            }
                            ConnLost::Replaced => {
                                tracing::info!(vm = %vm.name, "a new connection from the agent replaces the current one");
                            }
                            _ => {}
                        }
                        if vm.ep.connection().is_none() {
                            vm.tunnel_down();
                            if vm.ep.session().is_some() {
                                tracing::info!(vm = %vm.name, grace = ?self.cfg.grace, "tunnel connection lost ({why}); flows are kept while the agent resumes");
                            }
                        }
                        continue;
                    }
                    HostEvent::SessionEnded(why) => {
                        vm.session_over(now, &why);
                        continue;
                    }
                };
                let res = match m {
                    Msg::Export {
                        id,
                        name,
                        target,
                        ports,
                        discovered,
                        key,
                    } => {
                        vm.export(id, name, target, ports, discovered, key);
                        Ok(())
                    }
                    Msg::OpenOk { flow } => vm.engine.open_ok(flow, now),
                    Msg::OpenErr { flow, reason } => {
                        tracing::debug!(flow, ?reason, "agent refused open");
                        vm.counters.refused_opens += 1;
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
                    other => {
                        let why = format!("unexpected {other:?} from the agent");
                        vm.ep.drop_connection(ConnLost::Protocol(why), now);
                        continue;
                    }
                };
                if let Err(e) = res {
                    // Races (a flow the guest just reset) are normal; count them.
                    tracing::debug!("{e}");
                    vm.counters.flow_messages_ignored += 1;
                }
            }
        }
        for c in close {
            self.close_socket(c);
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
            let limit = counters::get(&self.cfg.daemon.tunnel_refused_handshake_limit);
            let slow = counters::get(&self.cfg.daemon.tunnel_refused_slow_handshake);
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
        let mut slow = Vec::new();
        for c in &mut self.conns {
            if c.phase == Phase::Preamble
                && let Some(hs) = c.hs.as_mut()
                && let Err(e) = hs.handle_timeout(now)
            {
                slow.push((c.cgen, e));
            }
        }
        for (cgen, e) in slow {
            self.handshake_failed(cgen, e);
        }
        if let Some(t) = self.accept_paused
            && now >= t
        {
            self.accept_paused = None;
            if let Some(l) = &self.listener {
                self.reactor.accept(l.as_raw_fd(), Tag::Accept);
            }
        }
        // Heartbeats, dead peers, sessions past their grace.
        let due: Vec<u64> = self
            .vms
            .iter()
            .filter(|(_, v)| v.ep.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(vm) = self.vms.get_mut(&id) {
                vm.ep.handle_timeout(now);
            }
            self.drain_vm(id, now);
        }
    }

    fn pump(&mut self, now: Instant) {
        for vm in self.vms.values_mut() {
            vm.events_to_session(&self.cfg, now);
        }
        // Session output → TLS → the connection carrying it.
        for vm in self.vms.values_mut() {
            if let Some(cgen) = vm.ep.connection()
                && let Some(c) = self.conns.iter_mut().find(|c| c.cgen == cgen)
            {
                vm.ep.poll_transmit(c.stream.out());
            }
        }
        for c in self.conns.iter_mut() {
            if c.phase == Phase::Handoff {
                continue;
            }
            if c.phase != Phase::Closing
                && let Some(hs) = c.hs.as_mut()
            {
                hs.poll_transmit(c.stream.out());
            }
            c.stream.flush(&mut self.reactor, Tag::Send(c.cgen));
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
        let vm = self.vms.get_mut(&id).expect("found");
        let live = vm.ep.agent().is_some_and(|(k, _)| k.to_hex() == key);
        if live {
            let why = SessionEnd::Closed("its agent was unpaired".into());
            vm.ep.end_session(why, now);
            self.drain_vm(id, now);
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
            if !c.stream.idle() {
                continue;
            }
            let conn = self.conns.swap_remove(i);
            let (worker, vm) = self.handoffs.remove(&cgen).expect("listed");
            let h = Handoff { conn, vm };
            if !self.peers[worker].send(Request::Conn(Box::new(h))) {
                tracing::warn!(
                    worker,
                    "data path worker is gone; closing a tunnel connection"
                );
            }
        }
    }

    /// A connection handed over by the worker that ran its handshake: it
    /// continues here with the VM's session.
    fn take_conn(&mut self, h: Handoff, now: Instant) {
        let Handoff { mut conn, vm } = h;
        let cgen = self.next_cgen;
        self.next_cgen += 1;
        conn.cgen = cgen;
        conn.phase = Phase::Preamble;
        self.conns.push(conn);
        self.accept(cgen, vm, now);
        if let Some(c) = self.conns.iter_mut().find(|c| c.cgen == cgen)
            && c.phase == Phase::Up
        {
            let buf = Vec::with_capacity(RECV_BUF);
            c.stream.recv(&mut self.reactor, buf, Tag::Recv(cgen));
        }
    }
}
