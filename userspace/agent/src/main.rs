//! netredir-agent: runs on the user's machine, exports chosen resources of
//! the user's network to their VM.
//!
//! Theory of operation. The agent dials netredird (retrying with backoff
//! until it answers), proves who it is over TLS 1.3 (its own key, the
//! host's pinned certificate; the first time, a pairing code), then opens
//! or resumes the session and announces each `--export`. For every `Open`
//! the host sends, it checks the export policy, connects to the real
//! resource and answers `OpenOk` or `OpenErr`; then it copies bytes both
//! ways under per-flow credits: it reads from a resource only as much as
//! the host has granted, and grants the host more only as bytes reach the
//! resource. Everything runs on one io_uring loop; each flow is a socket,
//! at most one receive and one send in flight, and a queue bounded by the
//! window. When the tunnel drops, flows stay open and the agent dials
//! again: the session resumes with nothing lost. Only after the grace
//! period are the flows closed.
//!
//! The tunnel itself (preamble, session, heartbeats, grace, resume,
//! backoff) is the shared [`AgentEndpoint`]; this loop only moves its
//! bytes and time: it dials when asked, feeds what the socket reads to
//! `handle_bytes`, writes what `poll_transmit` gives (one send in flight)
//! and sleeps until `poll_timeout`. The export policy, each flow's credits
//! and the connect queue are decided in [`relay`], apart from the sockets.

use anyhow::{Context, Result, bail};
use clap::Parser;

mod datagrams;
mod discover;
mod key;
mod relay;
mod resolve;
use netredir_shared::endpoint::{AgentConfig, AgentEndpoint, AgentEvent, ConnLost, Fatal};
use netredir_shared::export::{App, ExportSpec};
use netredir_shared::http_rewrite::HttpRewriter;
use netredir_shared::session::{Compression, SessionConfig};
use netredir_shared::tls::{Fingerprint, HostCheck, Identity, PairCode, Tls, write_private};
use netredir_shared::wire::{FlowId, MAX_DATA, Msg, OpenError, Proto};
use netredir_uring::{Completion, OpId, Reactor, Stream, Waker};
use relay::{Connects, Denied, Export, Exports, Relay};
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exports resources on this machine's network to a VM through netredird.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// netredird's tunnel address (its --listen).
    #[arg(long, value_name = "ADDR:PORT")]
    connect: String,
    /// A resource to export, NAME=HOST[:PORTS]; repeat for more. PORTS are
    /// comma-separated, each optionally /udp, or /ipp or /http for a TCP
    /// port whose requests name their destination (the agent rewrites
    /// `Host` and IPP's URIs to the real printer; 631 is /ipp and 80 is
    /// /http anyway). Without PORTS: 9100, 631, 515 and 161/udp.
    #[arg(
        long,
        value_name = "NAME=HOST[:PORTS]",
        required_unless_present = "discover"
    )]
    export: Vec<ExportSpec>,
    /// Also export what this agent finds on its LAN (off unless given):
    /// `printers` browses DNS-SD (mDNS) for printers and scanners; each
    /// device found becomes a resource (`map list` on the host says
    /// `discovered`), under --discover-allow and --discover-deny.
    #[arg(long, value_name = "KIND", value_enum)]
    discover: Vec<discover::Kind>,
    /// Export only the discovered devices in this network (CIDR) or with
    /// this name (repeatable; without it, every device found).
    #[arg(long, value_name = "CIDR|NAME", requires = "discover")]
    discover_allow: Vec<discover::Rule>,
    /// Never export the discovered devices in this network or with this
    /// name (repeatable; wins over --discover-allow).
    #[arg(long, value_name = "CIDR|NAME", requires = "discover")]
    discover_deny: Vec<discover::Rule>,
    /// One-time code from `netredirctl pair` on the host: pairs this agent
    /// with the host (needed once; later runs use the stored pin).
    #[arg(long, value_name = "CODE")]
    pair: Option<PairCode>,
    /// Where this agent's key and the host's pinned fingerprint are kept.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/netredir-agent")]
    state_dir: PathBuf,
    /// Name this agent gives itself in the host's logs.
    #[arg(long, default_value_t = default_name())]
    name: String,
    /// Compression of data toward the VM: off, auto or a zstd level 1-19.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    compression: Compression,
    /// Compression for one resource, NAME=MODE (repeatable).
    #[arg(long, value_name = "NAME=MODE", value_parser = parse_resource_mode)]
    resource_compression: Vec<(String, Compression)>,
    /// How long to wait for a resource to accept a connection: as long as
    /// a direct client's kernel keeps sending SYNs to a busy server (its
    /// six retries take about two minutes); the guest may give up sooner.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    connect_timeout: u64,
    /// Most connects in flight to one address and port; more wait their
    /// turn (within --connect-timeout), so that a burst of connections to a
    /// server with a short listen queue is not dropped and retried for
    /// minutes.
    #[arg(long, value_name = "N", default_value_t = 8)]
    max_connecting: usize,
    /// Busy polling: spin this many microseconds for the next event before
    /// sleeping (0: off). Saves a sleep and wake-up per message when replies
    /// come quickly (a LAN round trip), at the cost of that much CPU per
    /// message; the latency benchmark reports both.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0)]
    busy_poll_us: u64,
    /// Seconds to keep flows open while the tunnel is down.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    grace: u64,
    /// Seconds between heartbeats; three missed ones drop the connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    heartbeat: u64,
    /// Log filter (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    log: String,
}

fn parse_resource_mode(s: &str) -> Result<(String, Compression), String> {
    let (name, mode) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=MODE, e.g. scanner=off"))?;
    Ok((name.to_ascii_lowercase(), mode.parse()?))
}

fn default_name() -> String {
    let mut buf = [0u8; 64];
    // SAFETY: gethostname into a live buffer of the given size.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if r == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".into()
    };
    format!("agent@{host}")
}

fn main() {
    netredir_shared::docs::generate_if_requested(<Args as clap::CommandFactory>::command(), "1");
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Every flow is a real socket here.
    netredir_uring::raise_fd_limit();
    if let Err(e) = run(args) {
        eprintln!("netredir-agent: {e:#}");
        std::process::exit(1);
    }
}

#[derive(Debug, Clone, Copy)]
enum Tag {
    TunConnect(u64),
    TunRecv(u64),
    TunSend(u64),
    FlowConnect(u64),
    FlowRecv(u64),
    FlowSend(u64),
    UdpRecv(u64),
    UdpSend(u64),
    EchoSend(u64),
    EchoRecv(u64),
    /// The discovery thread found something.
    Wake,
}

/// The socket of one tunnel connection; all else about it is the endpoint's.
struct Tunnel {
    tgen: u64,
    /// The socket, its send queue and its operations in flight.
    stream: Stream,
    /// TCP is up and the endpoint has the connection.
    up: bool,
}

/// One flow to a real resource; `serial` is agent-local and never reused.
struct Flow {
    id: FlowId,
    fd: OwnedFd,
    ops: u32,
    connected: bool,
    relay: Relay,
    recv_op: Option<OpId>,
    eof: bool,
    sending: bool,
    fin_from_host: bool,
    shut_wr: bool,
    /// Set when the flow is over; the socket closes once no op is pending.
    dead: bool,
    /// Close with RST rather than FIN.
    abortive: bool,
    /// The address it connects to.
    target: SocketAddr,
    /// Waiting for a connect slot: when to give up.
    queued: Option<Instant>,
    /// On IPP and HTTP ports: the destination in the data, rewritten.
    rewrite: Option<Box<HttpRewriter>>,
    /// The resource closed its side; the host is told once the bytes a
    /// rewrite held for its credit are sent.
    fin_owed: bool,
}

struct Agent {
    args: Args,
    server: Vec<SocketAddr>,
    exports: Exports,
    /// The exports' addresses, resolved off the loop (same indices).
    names: resolve::Names,
    identity: Identity,
    pin: Option<Fingerprint>,
    pin_path: PathBuf,
    reactor: Reactor<Tag>,
    /// The tunnel: session, preamble, heartbeats, grace, reconnects.
    ep: AgentEndpoint,
    tunnel: Option<Tunnel>,
    /// Closed tunnel sockets whose operations have not completed yet.
    zombies: Vec<Tunnel>,
    next_tgen: u64,
    flows: HashMap<u64, Flow>,
    by_id: HashMap<FlowId, u64>,
    uflows: HashMap<u64, datagrams::UFlow>,
    ubyid: HashMap<FlowId, u64>,
    echoes: HashMap<u64, datagrams::EchoOp>,
    next_serial: u64,
    /// Connects in flight and waiting, per target address.
    connects: Connects,
    /// The "cannot ping" warning was logged (once is enough).
    icmp_warned: bool,
    /// HTTP/IPP messages passed unchanged because they did not parse.
    unparsed_http: u64,
    /// `--discover`: the browsing, what it found, the user's policy, and
    /// the eventfd it wakes the loop with.
    discovery: Option<(discover::Discovery, Arc<Waker>)>,
    devices: discover::Devices,
    policy: discover::Policy,
    fatal: Option<String>,
}

const RECV_BUF: usize = 256 * 1024;
/// How long TCP may take to connect to netredird.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes the state directory for this process, or says who has it.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    let path = dir.join("agent.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock(2) on a file we hold open.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another netredir-agent runs with --state-dir {} (the same key): run one agent per VM, each with its own state directory",
            dir.display()
        );
    }
    Ok(f)
}

fn run(args: Args) -> Result<()> {
    let server: Vec<SocketAddr> = args
        .connect
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --connect {}", args.connect))?
        .collect();
    if args.heartbeat == 0 {
        bail!("--heartbeat must be at least 1 second");
    }
    if args.busy_poll_us > 10_000 {
        bail!("--busy-poll-us must be 0 (off) to 10000");
    }
    let overrides: HashMap<String, Compression> =
        args.resource_compression.iter().cloned().collect();
    let mut exports = Vec::new();
    let mut initial = Vec::new();
    for spec in &args.export {
        if exports.iter().any(|e: &Export| e.spec.name == spec.name) {
            bail!("--export {} given twice", spec.name);
        }
        let addr = resolve::resolve(&spec.host);
        if addr.is_none() {
            tracing::warn!(name = %spec.name, target = %spec, "cannot resolve yet; will retry on use");
        }
        initial.push((spec.host.clone(), addr));
        exports.push(Export {
            spec: spec.clone(),
            compression: overrides.get(&spec.name).copied(),
            discovered: false,
            key: key::key(addr, &format!("host:{}", spec.host.to_lowercase())),
        });
    }
    // Two exports of one device (a printer and the scanner of the same
    // machine) are two resources: the later ones' keys name the export.
    for i in 0..exports.len() {
        if exports[..i]
            .iter()
            .any(|e: &Export| e.key == exports[i].key)
        {
            let name = exports[i].spec.name.clone();
            exports[i].key.push_str(&format!("#{name}"));
        }
    }
    let names = resolve::Names::new(initial, Instant::now());
    let identity = Identity::load_or_create(&args.state_dir, "agent", &args.name)
        .context("cannot load or create this agent's identity (--state-dir)")?;
    // Held until the process exits: two agents with one key would take
    // the VM's session from each other for ever.
    let _lock = lock_state_dir(&args.state_dir)?;
    let pin_path = args.state_dir.join("host.pin");
    let pin = match std::fs::read_to_string(&pin_path) {
        Ok(s) => Some(s.trim().parse::<Fingerprint>().with_context(|| {
            format!("{} is damaged; pair again with --pair", pin_path.display())
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", pin_path.display())),
    };
    if pin.is_none() && args.pair.is_none() {
        bail!(
            "this agent is not paired with a host yet: run it once with --pair CODE (get a code on the host with `netredirctl pair`)"
        );
    }
    tracing::info!(key = %identity.fingerprint(), "agent identity");
    let mut reactor = Reactor::new(512).context("cannot set up io_uring")?;
    reactor.set_spin(Duration::from_micros(args.busy_poll_us));
    let now = Instant::now();
    let ep = AgentEndpoint::new(
        AgentConfig {
            pair: args.pair.as_ref().map(|c| c.secret.to_vec()),
            session: SessionConfig {
                compression: args.compression,
                ..Default::default()
            },
            heartbeat: Duration::from_secs(args.heartbeat),
            grace: Duration::from_secs(args.grace),
            ..AgentConfig::new(args.name.clone())
        },
        now,
    );
    let connects = Connects::new(args.max_connecting);
    let policy = discover::Policy {
        allow: args.discover_allow.clone(),
        deny: args.discover_deny.clone(),
    };
    let discovery = if args.discover.is_empty() {
        None
    } else {
        let waker = Arc::new(Waker::new().context("cannot create an eventfd")?);
        let d = discover::Discovery::start(waker.clone()).map_err(anyhow::Error::msg)?;
        reactor.read(waker.fd(), Vec::with_capacity(8), Tag::Wake);
        tracing::info!("discovering printers on this LAN (DNS-SD)");
        Some((d, waker))
    };
    let mut a = Agent {
        args,
        server,
        exports: Exports::new(exports),
        names,
        identity,
        pin,
        pin_path,
        reactor,
        ep,
        tunnel: None,
        zombies: Vec::new(),
        next_tgen: 1,
        flows: HashMap::new(),
        by_id: HashMap::new(),
        uflows: HashMap::new(),
        ubyid: HashMap::new(),
        echoes: HashMap::new(),
        next_serial: 1,
        connects,
        icmp_warned: false,
        unparsed_http: 0,
        discovery,
        devices: discover::Devices::default(),
        policy,
        fatal: None,
    };
    a.events(now);
    loop {
        a.pump();
        // The endpoint says when its timers are due; nothing else needs
        // waking without a completion.
        let wait =
            a.ep.poll_timeout()
                .map(|t| t.saturating_duration_since(Instant::now()));
        a.reactor.wait(wait).context("io_uring wait")?;
        let now = Instant::now();
        while let Some(c) = a.reactor.next_completion() {
            a.complete(c, now);
        }
        a.ep.handle_timeout(now);
        a.events(now);
        if let Some(why) = a.fatal.take() {
            bail!("{why}");
        }
    }
}

fn new_socket(addr: &SocketAddr) -> std::io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt_int(fd: RawFd, level: i32, opt: i32, v: libc::c_int) {
    // SAFETY: setsockopt with a live int.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn open_error(errno: i32) -> OpenError {
    match errno {
        libc::ECONNREFUSED => OpenError::Refused,
        libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN => OpenError::Unreachable,
        libc::ECANCELED | libc::ETIMEDOUT => OpenError::TimedOut,
        _ => OpenError::Other,
    }
}

impl Agent {
    /// Acts on what the endpoint has to say: dial, close, log, and the
    /// host's messages.
    fn events(&mut self, now: Instant) {
        while let Some(e) = self.ep.poll_event() {
            match e {
                AgentEvent::Dial => self.dial(now),
                AgentEvent::Paired(fp) => {
                    if let Err(e) = write_private(&self.pin_path, format!("{fp}\n").as_bytes()) {
                        self.fatal = Some(format!(
                            "paired, but cannot save {}: {e}",
                            self.pin_path.display()
                        ));
                        return;
                    }
                    tracing::info!(host = %fp, "paired with the host; later runs need no --pair");
                    self.pin = Some(fp);
                    self.args.pair = None;
                }
                AgentEvent::Connected { resumed: true } => {
                    tracing::info!("tunnel back; session resumed, no flow lost");
                }
                AgentEvent::Connected { resumed: false } => {
                    for m in self.exports.announcements() {
                        self.ep.send(m, now);
                    }
                    tracing::info!(server = %self.server[0], "connected to netredird; exports announced");
                }
                AgentEvent::Msg(m) => self.on_msg(m),
                AgentEvent::Disconnected {
                    why,
                    was_up,
                    retry_in,
                } => {
                    self.close_tunnel();
                    let quiet = matches!(why, ConnLost::Later(_));
                    let why = match why {
                        ConnLost::Silent => "netredird silent for three heartbeats".to_string(),
                        why => why.to_string(),
                    };
                    if was_up {
                        tracing::warn!(
                            "tunnel lost: {why}; reconnecting (flows kept for {}s)",
                            self.args.grace
                        );
                    } else if quiet {
                        tracing::debug!("{why}; retrying in {retry_in:?}");
                    } else {
                        tracing::info!(
                            "cannot reach netredird at {}: {why}; retrying in {retry_in:?}",
                            self.server[0]
                        );
                    }
                }
                AgentEvent::Later(reason) => {
                    // Not now (the VM is not running): said once, then
                    // quietly tried again until it is.
                    tracing::warn!("netredird: {reason}; trying again until it is");
                }
                AgentEvent::SessionEnded(why) => self.end_session(&why.to_string()),
                AgentEvent::Fatal(Fatal::Refused(reason)) => {
                    self.fatal = Some(format!("netredird refused this agent: {reason}"));
                    return;
                }
                AgentEvent::Fatal(Fatal::HostMismatch) => {
                    self.fatal = Some(
                        "the host's certificate does not match the pinned one (or the pairing code): refusing to connect; if the host was reinstalled, pair again with --pair".into(),
                    );
                    return;
                }
            }
        }
    }

    fn dial(&mut self, now: Instant) {
        let addr = self.server[0];
        let fd = match new_socket(&addr) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("cannot create socket: {e}");
                return self.ep.connection_lost(e.to_string(), now);
            }
        };
        setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        let tgen = self.next_tgen;
        self.next_tgen += 1;
        let mut stream = Stream::new(fd);
        stream.op_started();
        self.reactor
            .connect(stream.fd(), addr, DIAL_TIMEOUT, Tag::TunConnect(tgen));
        self.tunnel = Some(Tunnel {
            tgen,
            stream,
            up: false,
        });
    }

    /// The endpoint is done with the connection: shut its socket, freed
    /// once its operations have completed.
    fn close_tunnel(&mut self) {
        let Some(t) = self.tunnel.take() else {
            return;
        };
        // Pending operations then complete.
        t.stream.shutdown(libc::SHUT_RDWR);
        if !t.stream.idle() {
            self.zombies.push(t);
        }
    }

    /// An operation of tunnel `tgen` completed: `f` takes it on the
    /// tunnel's stream (the live one, or a closed one finishing, freed once
    /// idle); the result, and whether it was the live tunnel's.
    fn on_tunnel<R>(&mut self, tgen: u64, f: impl FnOnce(&mut Stream) -> R) -> Option<(R, bool)> {
        if let Some(t) = self.tunnel.as_mut().filter(|t| t.tgen == tgen) {
            return Some((f(&mut t.stream), true));
        }
        let r = self
            .zombies
            .iter_mut()
            .find(|t| t.tgen == tgen)
            .map(|t| f(&mut t.stream));
        self.zombies.retain(|t| !t.stream.idle());
        r.map(|r| (r, false))
    }

    /// The session is over: every flow closes.
    fn end_session(&mut self, why: &str) {
        tracing::warn!("session ended: {why}; closing all flows");
        // The session that follows knows nothing of these flows.
        self.by_id.clear();
        let serials: Vec<u64> = self.flows.keys().copied().collect();
        for s in serials {
            self.kill_flow(s, true);
        }
        let udp: Vec<u64> = self.uflows.keys().copied().collect();
        for s in udp {
            self.kill_udp(s);
        }
    }

    fn send_msg(&mut self, m: Msg) {
        self.ep.send(m, Instant::now());
    }

    fn complete(&mut self, c: Completion<Tag>, now: Instant) {
        match c.tag {
            Tag::Wake => {
                if let Some((_, w)) = &self.discovery {
                    // An eventfd read takes 8 bytes: never re-arm with less.
                    let mut buf = c.buf.filter(|b| b.capacity() >= 8).unwrap_or_default();
                    buf.clear();
                    buf.reserve(8);
                    self.reactor.read(w.fd(), buf, Tag::Wake);
                }
                self.discovered(now);
            }
            Tag::TunConnect(tgen) => {
                let Some(((), true)) = self.on_tunnel(tgen, Stream::op_done) else {
                    return;
                };
                if let Err(e) = c.io_result() {
                    let why = if c.result == -libc::ECANCELED {
                        "timed out".to_string()
                    } else {
                        e.to_string()
                    };
                    self.ep.connection_lost(why, now);
                } else {
                    self.connected(now);
                }
                self.events(now);
            }
            Tag::TunRecv(tgen) => {
                let Some(((io, mut buf), true)) = self.on_tunnel(tgen, |s| s.received(c)) else {
                    return;
                };
                match io {
                    Ok(0) => self
                        .ep
                        .connection_lost("netredird closed the connection", now),
                    Err(e) => self.ep.connection_lost(e.to_string(), now),
                    Ok(_) => {
                        self.ep.handle_bytes(&buf, now);
                        if let Some(t) = self.tunnel.as_mut() {
                            buf.clear();
                            t.stream.recv(&mut self.reactor, buf, Tag::TunRecv(tgen));
                        }
                    }
                }
                self.events(now);
            }
            Tag::TunSend(tgen) => {
                let Some((sent, true)) = self.on_tunnel(tgen, |s| s.sent(c)) else {
                    return;
                };
                if let Err(e) = sent {
                    self.ep.connection_lost(e.to_string(), now);
                    self.events(now);
                }
            }
            Tag::FlowConnect(s) => self.on_flow_connect(s, c),
            Tag::FlowRecv(s) => self.on_flow_recv(s, c),
            Tag::FlowSend(s) => self.on_flow_send(s, c),
            Tag::UdpRecv(s) => self.on_udp_recv(s, c),
            Tag::UdpSend(s) => self.on_udp_send(s, c),
            Tag::EchoSend(s) => self.on_echo(s, c, false),
            Tag::EchoRecv(s) => self.on_echo(s, c, true),
        }
    }

    /// TCP is up: the endpoint starts TLS and the preamble on it.
    fn connected(&mut self, now: Instant) {
        let check = match (&self.args.pair, &self.pin) {
            (Some(code), _) => HostCheck::Prefix(code.fp_prefix),
            (None, Some(pin)) => HostCheck::Pinned(*pin),
            (None, None) => unreachable!("checked at start"),
        };
        let tls = match Tls::client(&self.identity, check) {
            Ok(t) => t,
            Err(e) => {
                self.fatal = Some(format!("cannot set up TLS: {e}"));
                return;
            }
        };
        self.ep.new_connection(tls, now);
        let t = self.tunnel.as_mut().expect("live");
        t.up = true;
        let tag = Tag::TunRecv(t.tgen);
        t.stream
            .recv(&mut self.reactor, Vec::with_capacity(RECV_BUF), tag);
        tracing::debug!(server = %self.server[0], "connected; TLS handshake");
    }

    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Open {
                flow,
                resource,
                port,
            } => self.open(flow, resource, port),
            Msg::Data { flow, bytes } => {
                let Some(f) = self.flow_by_id(flow) else {
                    return;
                };
                let taken = match f.rewrite.as_mut() {
                    Some(rw) => {
                        let mut out = Vec::with_capacity(bytes.len() + 64);
                        rw.request(&bytes, &mut out);
                        f.relay.host_data_as(out, bytes.len())
                    }
                    None => f.relay.host_data(bytes),
                };
                if taken.is_err() {
                    tracing::warn!(flow, "host overran the flow window; resetting the flow");
                    let s = self.by_id[&flow];
                    self.send_msg(Msg::Reset { flow });
                    self.kill_flow(s, true);
                }
            }
            Msg::Window { flow, credit } => {
                if let Some(f) = self.flow_by_id(flow) {
                    f.relay.window(credit);
                }
            }
            Msg::Fin { flow } => {
                if let Some(f) = self.flow_by_id(flow) {
                    if let Some(rw) = f.rewrite.as_mut() {
                        // What the rewrite still holds goes before the FIN
                        // (it stands for no tunnel bytes: never an overrun).
                        let mut out = Vec::new();
                        rw.request_end(&mut out);
                        let _ = f.relay.host_data_as(out, 0);
                    }
                    f.fin_from_host = true;
                }
            }
            Msg::Reset { flow } => {
                if let Some(&s) = self.by_id.get(&flow) {
                    self.kill_flow(s, true);
                }
                if let Some(&s) = self.ubyid.get(&flow) {
                    self.kill_udp(s);
                }
            }
            Msg::OpenUdp {
                flow,
                resource,
                port,
            } => self.open_udp(flow, resource, port),
            Msg::Datagram { flow, bytes } => self.udp_datagram(flow, bytes),
            Msg::Echo {
                token,
                resource,
                size,
            } => self.echo(token, resource, size),
            other => tracing::warn!("unexpected message from netredird: {other:?}"),
        }
    }

    /// What discovery found: new devices become exports (announced at
    /// once if a session is up), and known ones that offer more are
    /// announced again.
    fn discovered(&mut self, now: Instant) {
        let Some((d, _)) = &self.discovery else {
            return;
        };
        for i in d.poll() {
            // A device the user exported by its address is theirs.
            let host = i.addr.to_string();
            if self
                .exports
                .iter()
                .any(|e| !e.discovered && e.spec.host == host)
            {
                continue;
            }
            let exports = &self.exports;
            let taken = |n: &str| {
                exports
                    .by_name(n)
                    .and_then(|id| exports.get(id))
                    .is_some_and(|e| !e.discovered)
            };
            let Some(spec) = self.devices.add(&i, &self.policy, taken) else {
                continue;
            };
            tracing::info!(name = %spec.name, target = %spec, instance = %i.instance, "discovered");
            let id = match self.exports.by_name(&spec.name) {
                Some(id) => {
                    self.exports.set_spec(id, spec);
                    id
                }
                None => {
                    let host = spec.host.clone();
                    let compression = self
                        .args
                        .resource_compression
                        .iter()
                        .find(|(n, _)| *n == spec.name)
                        .map(|(_, c)| *c);
                    let id = self.exports.push(Export {
                        spec,
                        compression,
                        discovered: true,
                        key: key::key(Some(i.addr), &i.device),
                    });
                    let at = self.names.push(host, Some(i.addr), now);
                    debug_assert_eq!(at, id, "names and exports share indices");
                    id
                }
            };
            if self.ep.session_mut().is_some()
                && let Some(m) = self.exports.announcement(id)
            {
                self.ep.send(m, now);
            }
        }
    }

    fn flow_by_id(&mut self, id: FlowId) -> Option<&mut Flow> {
        let s = *self.by_id.get(&id)?;
        self.flows.get_mut(&s).filter(|f| !f.dead)
    }

    /// The real address for `resource:port`, if the export policy allows
    /// it; otherwise the host is told why and `None` comes back.
    pub(crate) fn target(
        &mut self,
        resource: u32,
        port: u16,
        proto: Proto,
        flow: FlowId,
    ) -> Option<SocketAddr> {
        let names = &mut self.names;
        let verdict = self
            .exports
            .target(resource, port, proto, |i| names.lookup(i, Instant::now()));
        let (addr, compression) = match verdict {
            Ok((addr, e)) => (addr, e.compression),
            Err(d) => {
                match d {
                    Denied::NoSuchResource => tracing::warn!(
                        flow,
                        resource,
                        "open for a resource this agent does not export"
                    ),
                    Denied::PortNotExported => {
                        let name = self.exports.get(resource as usize).map(|e| &e.spec.name);
                        tracing::info!(flow, ?name, port, ?proto, "refused: port not exported");
                    }
                    Denied::Unresolved => {
                        let e = self.exports.get(resource as usize).map(|e| &e.spec);
                        tracing::warn!(flow, target = ?e.map(ToString::to_string), "cannot resolve target (yet)");
                    }
                }
                self.send_msg(Msg::OpenErr {
                    flow,
                    reason: d.open_error(),
                });
                return None;
            }
        };
        if let (Some(mode), Some(s)) = (compression, self.ep.session_mut()) {
            s.set_flow_compression(flow, mode);
        }
        Some(addr)
    }

    fn open(&mut self, flow: FlowId, resource: u32, port: u16) {
        let Some(addr) = self.target(resource, port, Proto::Tcp, flow) else {
            return;
        };
        let rewrite = self.exports.get(resource as usize).and_then(|e| {
            let app = e.spec.app(port)?;
            let rw = HttpRewriter::new(&e.spec.authority(port), app == App::Ipp);
            Some(Box::new(rw))
        });
        let fd = match new_socket(&addr) {
            Ok(fd) => fd,
            Err(err) => {
                tracing::warn!(flow, "cannot create socket: {err}");
                return self.send_msg(Msg::OpenErr {
                    flow,
                    reason: OpenError::Other,
                });
            }
        };
        setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        let serial = self.next_serial;
        self.next_serial += 1;
        let deadline = Instant::now() + Duration::from_secs(self.args.connect_timeout);
        if let Some(old) = self.by_id.insert(flow, serial) {
            self.kill_flow(old, true);
            self.by_id.insert(flow, serial);
        }
        self.flows.insert(
            serial,
            Flow {
                id: flow,
                fd,
                ops: 0,
                connected: false,
                relay: Relay::new(),
                recv_op: None,
                eof: false,
                sending: false,
                fin_from_host: false,
                shut_wr: false,
                dead: false,
                abortive: false,
                target: addr,
                queued: Some(deadline),
                rewrite,
                fin_owed: false,
            },
        );
        self.connects.push(addr, serial);
        self.start_connects(addr);
    }

    /// Starts queued connects to `addr` while fewer than
    /// `--max-connecting` are in flight (see [`Connects`]).
    fn start_connects(&mut self, addr: SocketAddr) {
        let now = Instant::now();
        while let Some(serial) = self.connects.next(addr) {
            let Some(f) = self.flows.get_mut(&serial) else {
                continue;
            };
            let Some(deadline) = f.queued.take() else {
                continue;
            };
            if f.dead {
                continue;
            }
            if now >= deadline {
                let id = f.id;
                tracing::info!(flow = id, "gave up waiting to connect to the resource");
                self.send_msg(Msg::OpenErr {
                    flow: id,
                    reason: OpenError::TimedOut,
                });
                self.kill_flow(serial, false);
                continue;
            }
            f.ops += 1;
            let fd = f.fd.as_raw_fd();
            self.connects.started(addr);
            self.reactor
                .connect(fd, addr, deadline - now, Tag::FlowConnect(serial));
        }
    }

    /// Marks a flow over; its socket closes when no operation is pending.
    fn kill_flow(&mut self, serial: u64, abortive: bool) {
        let Some(f) = self.flows.get_mut(&serial) else {
            return;
        };
        if self.by_id.get(&f.id) == Some(&serial) {
            self.by_id.remove(&f.id);
            if let Some(s) = self.ep.session_mut() {
                s.forget_flow(f.id);
            }
        }
        if !f.dead {
            f.dead = true;
            f.abortive = abortive;
            f.relay.clear();
            if let Some(op) = f.recv_op {
                self.reactor.cancel(op);
            }
            // SAFETY: shutdown(2) on our socket, waking any pending op.
            unsafe { libc::shutdown(f.fd.as_raw_fd(), libc::SHUT_RD) };
        }
        self.reap(serial);
    }

    fn reap(&mut self, serial: u64) {
        let Some(f) = self.flows.get(&serial) else {
            return;
        };
        if f.dead && f.ops == 0 {
            let f = self.flows.remove(&serial).expect("present");
            if let Some(rw) = &f.rewrite {
                let st = rw.stats();
                tracing::debug!(
                    flow = f.id,
                    hosts = st.hosts,
                    uris = st.uris,
                    unparsed = st.unparsed,
                    "HTTP rewriting of the flow"
                );
                if st.unparsed > 0 {
                    self.unparsed_http += st.unparsed;
                    tracing::warn!(
                        flow = f.id,
                        target = %f.target,
                        total = self.unparsed_http,
                        "{} HTTP message(s) passed unchanged: not parsed as HTTP/IPP (or beyond the rewrite's bounds)",
                        st.unparsed
                    );
                }
            }
            if f.abortive {
                let l = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt with a live linger; close then sends RST.
                unsafe {
                    libc::setsockopt(
                        f.fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&l as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
            }
            drop(f);
        }
    }

    fn on_flow_connect(&mut self, serial: u64, c: Completion<Tag>) {
        let Some(f) = self.flows.get_mut(&serial) else {
            return;
        };
        f.ops -= 1;
        let (id, dead, addr) = (f.id, f.dead, f.target);
        self.connects.done(addr);
        self.start_connects(addr);
        let Some(f) = self.flows.get_mut(&serial) else {
            return;
        };
        if dead {
            return self.reap(serial);
        }
        if c.result < 0 {
            let reason = open_error(-c.result);
            tracing::info!(flow = id, ?reason, "cannot connect to resource");
            self.send_msg(Msg::OpenErr { flow: id, reason });
            return self.kill_flow(serial, false);
        }
        f.connected = true;
        self.send_msg(Msg::OpenOk { flow: id });
    }

    fn on_flow_recv(&mut self, serial: u64, c: Completion<Tag>) {
        let Some(f) = self.flows.get_mut(&serial) else {
            return;
        };
        f.ops -= 1;
        f.recv_op = None;
        let id = f.id;
        if f.dead {
            return self.reap(serial);
        }
        match c.result {
            0 => {
                f.eof = true;
                let mut sendable = Vec::new();
                if let Some(rw) = f.rewrite.as_mut() {
                    let mut out = Vec::new();
                    rw.response_end(&mut out);
                    sendable = f.relay.for_host(out);
                }
                let owed = f.relay.holds_for_host();
                f.fin_owed = owed;
                self.send_data(id, &sendable);
                if !owed {
                    self.send_msg(Msg::Fin { flow: id });
                }
                self.maybe_done(serial);
            }
            r if r < 0 => {
                tracing::debug!(
                    flow = id,
                    "resource connection failed: {}",
                    c.io_result().unwrap_err()
                );
                self.send_msg(Msg::Reset { flow: id });
                self.kill_flow(serial, true);
            }
            n => {
                let buf = c.buf.unwrap_or_default();
                let buf = match f.rewrite.as_mut() {
                    Some(rw) => {
                        let mut out = Vec::with_capacity(buf.len() + 64);
                        rw.response(&buf, &mut out);
                        f.relay.for_host(out)
                    }
                    None => {
                        f.relay.read(n as usize);
                        buf
                    }
                };
                self.send_data(id, &buf);
            }
        }
    }

    /// `bytes` from the resource to the host, in messages it takes.
    fn send_data(&mut self, flow: FlowId, bytes: &[u8]) {
        for chunk in bytes.chunks(MAX_DATA) {
            self.send_msg(Msg::Data {
                flow,
                bytes: chunk.to_vec(),
            });
        }
    }

    fn on_flow_send(&mut self, serial: u64, c: Completion<Tag>) {
        let Some(f) = self.flows.get_mut(&serial) else {
            return;
        };
        f.ops -= 1;
        f.sending = false;
        let id = f.id;
        if f.dead {
            return self.reap(serial);
        }
        let io = c.io_result();
        let buf = c.buf.unwrap_or_default();
        match io {
            Ok(n) => f.relay.written(n, buf),
            Err(e) => {
                tracing::debug!(flow = id, "write to resource failed: {e}");
                self.send_msg(Msg::Reset { flow: id });
                self.kill_flow(serial, true);
            }
        }
    }

    /// A flow whose both halves are closed is done.
    fn maybe_done(&mut self, serial: u64) {
        if let Some(f) = self.flows.get(&serial)
            && f.eof
            && !f.fin_owed
            && f.shut_wr
            && !f.sending
        {
            self.kill_flow(serial, false);
        }
    }

    /// Starts whatever operations the flows and the tunnel can do now.
    fn pump(&mut self) {
        let can_read = self.ep.can_send();
        let serials: Vec<u64> = self.flows.keys().copied().collect();
        let mut grants = Vec::new();
        let mut done = Vec::new();
        let mut released = Vec::new();
        for s in serials {
            let f = self.flows.get_mut(&s).expect("present");
            if f.dead || !f.connected {
                continue;
            }
            let fd = f.fd.as_raw_fd();
            let want = f.relay.read_budget(RECV_BUF);
            if can_read && f.recv_op.is_none() && !f.eof && want > 0 {
                f.ops += 1;
                f.recv_op = Some(
                    self.reactor
                        .recv(fd, Vec::with_capacity(want), Tag::FlowRecv(s)),
                );
            }
            if !f.sending {
                if let Some(buf) = f.relay.next_write() {
                    f.sending = true;
                    f.ops += 1;
                    self.reactor.send(fd, buf, 0, Tag::FlowSend(s));
                } else if f.fin_from_host && !f.shut_wr {
                    // SAFETY: shutdown(2) on our socket: FIN to the resource.
                    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
                    f.shut_wr = true;
                    done.push(s);
                }
            }
            if let Some(credit) = f.relay.take_grant() {
                grants.push((f.id, credit));
            }
            if let Some(b) = f.relay.release() {
                released.push((f.id, b));
            }
            if f.fin_owed && !f.relay.holds_for_host() {
                f.fin_owed = false;
                released.push((f.id, Vec::new()));
                done.push(s);
            }
        }
        for (flow, bytes) in released {
            if bytes.is_empty() {
                self.send_msg(Msg::Fin { flow });
            } else {
                self.send_data(flow, &bytes);
            }
        }
        for (flow, credit) in grants {
            self.send_msg(Msg::Window { flow, credit });
        }
        for s in done {
            self.maybe_done(s);
        }
        self.pump_udp(can_read);
        // The tunnel: what the endpoint has to send, one send at a time.
        if let Some(t) = self.tunnel.as_mut()
            && t.up
        {
            self.ep.poll_transmit(t.stream.out());
            t.stream.flush(&mut self.reactor, Tag::TunSend(t.tgen));
        }
    }
}
