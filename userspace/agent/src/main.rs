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

use anyhow::{Context, Result, bail};
use clap::Parser;

mod datagrams;
mod resolve;
use netredir_shared::export::ExportSpec;
use netredir_shared::link::{Link, LinkError};
use netredir_shared::session::{Compression, Session, SessionConfig};
use netredir_shared::tls::{
    Fingerprint, HostCheck, Identity, PairCode, Tls, TlsError, write_private,
};
use netredir_shared::wire::{
    AGENT_WINDOW, FlowId, HOST_WINDOW, MAX_DATA, Msg, OpenError, Proto, VERSION,
};
use netredir_uring::{Completion, OpId, Reactor};
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Exports resources on this machine's network to a VM through netredird.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// netredird's tunnel address (its --listen).
    #[arg(long, value_name = "ADDR:PORT")]
    connect: String,
    /// A resource to export, NAME=HOST:PORT; repeat for more.
    #[arg(long, value_name = "NAME=HOST:PORT", required = true)]
    export: Vec<ExportSpec>,
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
    Backoff,
    Tick,
    FlowConnect(u64),
    FlowRecv(u64),
    FlowSend(u64),
    UdpRecv(u64),
    UdpSend(u64),
    EchoSend(u64),
    EchoRecv(u64),
}

struct Export {
    spec: ExportSpec,
    compression: Option<Compression>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Preamble,
    Up,
}

struct Tunnel {
    tgen: u64,
    fd: OwnedFd,
    ops: u32,
    phase: Phase,
    link: Option<Link>,
    out: Vec<u8>,
    sending: bool,
    last_rx: Instant,
}

/// One flow to a real resource; `serial` is agent-local and never reused.
struct Flow {
    id: FlowId,
    fd: OwnedFd,
    ops: u32,
    connected: bool,
    /// Bytes we may still send the host.
    credit: u32,
    recv_op: Option<OpId>,
    eof: bool,
    to_target: VecDeque<Vec<u8>>,
    sending: bool,
    /// Bytes delivered to the resource not yet granted back.
    ungranted: u32,
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
}

struct AgentSession {
    id: u64,
    session: Session,
    lost_at: Option<Instant>,
}

struct Agent {
    args: Args,
    server: Vec<SocketAddr>,
    exports: Vec<Export>,
    /// The exports' addresses, resolved off the loop (same indices).
    names: resolve::Names,
    identity: Identity,
    pin: Option<Fingerprint>,
    pin_path: PathBuf,
    reactor: Reactor<Tag>,
    tunnel: Option<Tunnel>,
    zombies: Vec<Tunnel>,
    next_tgen: u64,
    backoff: Duration,
    waiting: bool,
    sess: Option<AgentSession>,
    flows: HashMap<u64, Flow>,
    by_id: HashMap<FlowId, u64>,
    uflows: HashMap<u64, datagrams::UFlow>,
    ubyid: HashMap<FlowId, u64>,
    echoes: HashMap<u64, datagrams::EchoOp>,
    next_serial: u64,
    /// Connects in flight per target address (one server's listen queue).
    connecting: HashMap<SocketAddr, usize>,
    /// Flows waiting for a connect slot per target address, oldest first.
    connect_queue: HashMap<SocketAddr, VecDeque<u64>>,
    /// The host's last "not now", logged once until it changes.
    later: Option<String>,
    /// The "cannot ping" warning was logged (once is enough).
    icmp_warned: bool,
    last_ping: Instant,
    fatal: Option<String>,
}

const RECV_BUF: usize = 256 * 1024;

fn run(args: Args) -> Result<()> {
    let server: Vec<SocketAddr> = args
        .connect
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --connect {}", args.connect))?
        .collect();
    if args.heartbeat == 0 {
        bail!("--heartbeat must be at least 1 second");
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
        });
    }
    let names = resolve::Names::new(initial, Instant::now());
    let identity = Identity::load_or_create(&args.state_dir, "agent", &args.name)
        .context("cannot load or create this agent's identity (--state-dir)")?;
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
    let reactor = Reactor::new(512).context("cannot set up io_uring")?;
    let mut a = Agent {
        args,
        server,
        exports,
        names,
        identity,
        pin,
        pin_path,
        reactor,
        tunnel: None,
        zombies: Vec::new(),
        next_tgen: 1,
        backoff: Duration::from_millis(100),
        waiting: false,
        sess: None,
        flows: HashMap::new(),
        by_id: HashMap::new(),
        uflows: HashMap::new(),
        ubyid: HashMap::new(),
        echoes: HashMap::new(),
        next_serial: 1,
        connecting: HashMap::new(),
        connect_queue: HashMap::new(),
        later: None,
        icmp_warned: false,
        last_ping: Instant::now(),
        fatal: None,
    };
    a.dial();
    let tick = Duration::from_secs(a.args.heartbeat).min(Duration::from_secs(1));
    a.reactor.timeout(tick, Tag::Tick);
    loop {
        a.reactor.wait(None).context("io_uring wait")?;
        let now = Instant::now();
        while let Some(c) = a.reactor.next_completion() {
            if matches!(c.tag, Tag::Tick) {
                a.reactor.timeout(tick, Tag::Tick);
                a.timers(now);
                continue;
            }
            a.complete(c, now);
        }
        if let Some(why) = a.fatal.take() {
            bail!("{why}");
        }
        a.pump(now);
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

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a live 8-byte buffer.
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if r != 8 {
        return u64::from(std::process::id());
    }
    u64::from_ne_bytes(b)
}

impl Agent {
    fn dial(&mut self) {
        let addr = self.server[0];
        let fd = match new_socket(&addr) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("cannot create socket: {e}");
                self.schedule_retry();
                return;
            }
        };
        setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        let tgen = self.next_tgen;
        self.next_tgen += 1;
        self.reactor.connect(
            fd.as_raw_fd(),
            addr,
            Duration::from_secs(5),
            Tag::TunConnect(tgen),
        );
        self.tunnel = Some(Tunnel {
            tgen,
            fd,
            ops: 1,
            phase: Phase::Connecting,
            link: None,
            out: Vec::new(),
            sending: false,
            last_rx: Instant::now(),
        });
    }

    fn schedule_retry(&mut self) {
        if self.waiting {
            return;
        }
        self.waiting = true;
        self.reactor.timeout(self.backoff, Tag::Backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
    }

    fn tunnel_for(&mut self, tgen: u64) -> Option<&mut Tunnel> {
        match &mut self.tunnel {
            Some(t) if t.tgen == tgen => Some(t),
            _ => self.zombies.iter_mut().find(|t| t.tgen == tgen),
        }
    }

    fn tun_op_done(&mut self, tgen: u64) -> bool {
        if let Some(t) = self.tunnel_for(tgen) {
            t.ops -= 1;
        }
        self.zombies.retain(|t| t.ops > 0);
        matches!(&self.tunnel, Some(t) if t.tgen == tgen)
    }

    /// The connection is gone: flows stay (the session resumes on the next
    /// one), and the agent dials again after a backoff.
    fn tunnel_lost(&mut self, why: &str, now: Instant) {
        self.close_tunnel(why, now, false);
    }

    /// [`Agent::tunnel_lost`], logging a connection that never came up
    /// only at debug level when `quiet` (said once already).
    fn close_tunnel(&mut self, why: &str, now: Instant, quiet: bool) {
        let Some(t) = self.tunnel.take() else {
            return;
        };
        if t.phase == Phase::Up {
            tracing::warn!(
                "tunnel lost: {why}; reconnecting (flows kept for {}s)",
                self.args.grace
            );
            if let Some(s) = self.sess.as_mut() {
                s.session.connection_lost();
                s.lost_at = Some(now);
            }
        } else if quiet {
            tracing::debug!("{why}; retrying in {:?}", self.backoff);
        } else {
            tracing::info!(
                "cannot reach netredird at {}: {why}; retrying in {:?}",
                self.server[0],
                self.backoff
            );
        }
        // SAFETY: shutdown(2) on our socket; pending ops then complete.
        unsafe { libc::shutdown(t.fd.as_raw_fd(), libc::SHUT_RDWR) };
        if t.ops > 0 {
            self.zombies.push(t);
        }
        self.schedule_retry();
    }

    /// The session is over: every flow closes.
    fn end_session(&mut self, why: &str) {
        if self.sess.take().is_some() {
            tracing::warn!("session ended: {why}; closing all flows");
        }
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
        if let Some(s) = self.sess.as_mut() {
            s.session.send(m, Instant::now());
        }
    }

    fn timers(&mut self, now: Instant) {
        let hb = Duration::from_secs(self.args.heartbeat);
        if let Some(t) = self.tunnel.as_ref()
            && t.phase == Phase::Up
        {
            if now.saturating_duration_since(t.last_rx) > hb * 3 {
                self.tunnel_lost("netredird silent for three heartbeats", now);
            } else if now.saturating_duration_since(self.last_ping) >= hb {
                self.last_ping = now;
                if let Some(s) = self.sess.as_mut() {
                    s.session.send_control(Msg::Ping {
                        nonce: random_u64(),
                    });
                }
            }
        }
        if let Some(t) = self.tunnel.as_ref()
            && t.phase != Phase::Up
            && now.saturating_duration_since(t.last_rx) > Duration::from_secs(10)
        {
            self.tunnel_lost("no answer within 10 s", now);
        }
        if let Some(s) = &self.sess
            && let Some(t) = s.lost_at
            && now.saturating_duration_since(t) >= Duration::from_secs(self.args.grace)
        {
            self.end_session("the tunnel did not come back within the grace period");
        }
        if let Some(s) = self.sess.as_mut() {
            s.session.sweep_idle(now);
        }
    }

    fn complete(&mut self, c: Completion<Tag>, now: Instant) {
        match c.tag {
            Tag::Tick => {}
            Tag::Backoff => {
                self.waiting = false;
                if self.tunnel.is_none() {
                    self.dial();
                }
            }
            Tag::TunConnect(tgen) => {
                if !self.tun_op_done(tgen) {
                    return;
                }
                if let Err(e) = c.io_result() {
                    let why = if c.result == -libc::ECANCELED {
                        "timed out".to_string()
                    } else {
                        e.to_string()
                    };
                    return self.tunnel_lost(&why, now);
                }
                self.connected(tgen, now);
            }
            Tag::TunRecv(tgen) => {
                if !self.tun_op_done(tgen) {
                    return;
                }
                match c.result {
                    0 => return self.tunnel_lost("netredird closed the connection", now),
                    r if r < 0 => {
                        let e = c.io_result().unwrap_err().to_string();
                        return self.tunnel_lost(&e, now);
                    }
                    _ => {}
                }
                let mut buf = c.buf.unwrap_or_default();
                self.on_tunnel_bytes(&buf, now);
                if let Some(t) = self.tunnel.as_mut()
                    && t.tgen == tgen
                {
                    buf.clear();
                    t.ops += 1;
                    let fd = t.fd.as_raw_fd();
                    self.reactor.recv(fd, buf, Tag::TunRecv(tgen));
                }
            }
            Tag::TunSend(tgen) => {
                if !self.tun_op_done(tgen) {
                    return;
                }
                let io = c.io_result();
                let mut buf = c.buf.unwrap_or_default();
                let t = self.tunnel.as_mut().expect("live");
                t.sending = false;
                match io {
                    Ok(n) if n < buf.len() => {
                        buf.drain(..n);
                        buf.extend_from_slice(&t.out);
                        t.out = buf;
                    }
                    Ok(_) => {}
                    Err(e) => self.tunnel_lost(&e.to_string(), now),
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

    /// TCP is up: start TLS and the preamble.
    fn connected(&mut self, tgen: u64, now: Instant) {
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
        let mut link = Link::new(tls);
        link.send_preamble(&Msg::Hello {
            version: VERSION,
            name: self.args.name.clone(),
        });
        if let Some(code) = &self.args.pair {
            link.send_preamble(&Msg::Pair {
                secret: code.secret.to_vec(),
            });
        }
        let (session, received) = self
            .sess
            .as_ref()
            .map_or((0, 0), |s| (s.id, s.session.received()));
        link.send_preamble(&Msg::Resume { session, received });
        let t = self.tunnel.as_mut().expect("live");
        t.link = Some(link);
        t.phase = Phase::Preamble;
        t.last_rx = now;
        t.ops += 1;
        let fd = t.fd.as_raw_fd();
        self.reactor
            .recv(fd, Vec::with_capacity(RECV_BUF), Tag::TunRecv(tgen));
        tracing::debug!(server = %self.server[0], "connected; TLS handshake");
    }

    fn on_tunnel_bytes(&mut self, bytes: &[u8], now: Instant) {
        let t = self.tunnel.as_mut().expect("live");
        t.last_rx = now;
        let up = t.phase == Phase::Up;
        let link = t.link.as_mut().expect("link after connect");
        let handshaking = link.handshaking();
        let session = if up {
            self.sess.as_mut().map(|s| &mut s.session)
        } else {
            None
        };
        match link.receive(bytes, session) {
            Ok(msgs) => {
                for m in msgs {
                    self.on_preamble(m, now);
                }
            }
            Err(LinkError::Tls(TlsError::HostMismatch)) => {
                self.fatal = Some(
                    "the host's certificate does not match the pinned one (or the pairing code): refusing to connect; if the host was reinstalled, pair again with --pair".into(),
                );
                return;
            }
            Err(e) if handshaking => {
                return self.tunnel_lost(&format!("TLS handshake failed: {e}"), now);
            }
            Err(e) => return self.tunnel_lost(&format!("protocol error: {e}"), now),
        }
        if up {
            self.drain_session(now);
        }
    }

    fn on_preamble(&mut self, m: Msg, now: Instant) {
        match m {
            Msg::Refused { reason } => {
                self.fatal = Some(format!("netredird refused this agent: {reason}"));
            }
            Msg::Later { reason } => {
                // Not now (the VM is not running): said once, then quietly
                // tried again until it is.
                if self.later.as_deref() != Some(reason.as_str()) {
                    tracing::warn!("netredird: {reason}; trying again until it is");
                    self.later = Some(reason.clone());
                }
                self.close_tunnel(&format!("not now: {reason}"), now, true);
            }
            Msg::Welcome {
                session,
                received,
                resumed,
            } => {
                let Some(t) = self.tunnel.as_mut() else {
                    return;
                };
                let host = t.link.as_ref().and_then(Link::peer);
                if self.args.pair.is_some()
                    && let Some(fp) = host
                {
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
                let mut ok = false;
                if resumed
                    && let Some(s) = self.sess.as_mut()
                    && s.id == session
                {
                    s.session.connection_lost();
                    match s.session.resume(received) {
                        Ok(()) => {
                            s.lost_at = None;
                            ok = true;
                            tracing::info!("tunnel back; session resumed, no flow lost");
                        }
                        Err(e) => tracing::warn!("cannot resume: {e}"),
                    }
                }
                if !ok {
                    if self.sess.is_some() {
                        self.end_session("netredird started a new session");
                    }
                    let mut session_obj = Session::new(SessionConfig {
                        compression: self.args.compression,
                        ..Default::default()
                    });
                    for (i, e) in self.exports.iter().enumerate() {
                        session_obj.send(
                            Msg::Export {
                                id: i as u32,
                                name: e.spec.name.clone(),
                                target: e.spec.to_string(),
                                ports: e.spec.ports.clone(),
                            },
                            now,
                        );
                    }
                    self.sess = Some(AgentSession {
                        id: session,
                        session: session_obj,
                        lost_at: None,
                    });
                    tracing::info!(server = %self.server[0], "connected to netredird; exports announced");
                }
                self.backoff = Duration::from_millis(100);
                self.later = None;
                let t = self.tunnel.as_mut().expect("live");
                let s = self.sess.as_mut().expect("set");
                if let Err(e) = t.link.as_mut().expect("link").enter_records(&mut s.session) {
                    return self.tunnel_lost(&format!("protocol error: {e}"), now);
                }
                t.phase = Phase::Up;
                self.drain_session(now);
            }
            other => tracing::warn!("unexpected {other:?} in the preamble"),
        }
    }

    fn drain_session(&mut self, now: Instant) {
        loop {
            match self.sess.as_mut().map(|s| s.session.poll_msg()) {
                None | Some(Ok(None)) => break,
                Some(Ok(Some(m))) => self.on_msg(m, now),
                Some(Err(e)) => return self.tunnel_lost(&format!("protocol error: {e}"), now),
            }
        }
        if let Some(s) = self.sess.as_mut() {
            s.session.maybe_ack(false);
        }
    }

    fn on_msg(&mut self, m: Msg, _now: Instant) {
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
                let queued: usize = f.to_target.iter().map(Vec::len).sum();
                if queued + bytes.len() + f.ungranted as usize > AGENT_WINDOW as usize {
                    tracing::warn!(flow, "host overran the flow window; resetting the flow");
                    let s = self.by_id[&flow];
                    self.send_msg(Msg::Reset { flow });
                    self.kill_flow(s, true);
                    return;
                }
                // Small writes join the last queued buffer, so that a
                // resource that does not read costs its window and no more
                // (a buffer per 1-byte message would cost ~50 bytes each).
                match f.to_target.back_mut() {
                    Some(last) if last.len() + bytes.len() <= MAX_DATA => {
                        last.extend_from_slice(&bytes);
                    }
                    _ => {
                        let mut b = Vec::with_capacity(MAX_DATA.min(bytes.len().max(4096)));
                        b.extend_from_slice(&bytes);
                        f.to_target.push_back(b);
                    }
                }
            }
            Msg::Window { flow, credit } => {
                if let Some(f) = self.flow_by_id(flow) {
                    f.credit = f.credit.saturating_add(credit);
                }
            }
            Msg::Fin { flow } => {
                if let Some(f) = self.flow_by_id(flow) {
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
            Msg::Ping { nonce } => {
                if let Some(s) = self.sess.as_mut() {
                    s.session.send_control(Msg::Pong { nonce });
                }
            }
            Msg::Pong { .. } => {}
            other => tracing::warn!("unexpected message from netredird: {other:?}"),
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
        let Some(e) = self.exports.get_mut(resource as usize) else {
            tracing::warn!(
                flow,
                resource,
                "open for a resource this agent does not export"
            );
            self.send_msg(Msg::OpenErr {
                flow,
                reason: OpenError::NotExported,
            });
            return None;
        };
        if !e.spec.allows(port, proto) {
            tracing::info!(flow, name = %e.spec.name, port, ?proto, "refused: port not exported");
            self.send_msg(Msg::OpenErr {
                flow,
                reason: OpenError::NotExported,
            });
            return None;
        }
        let Some(ip) = self.names.lookup(resource as usize, Instant::now()) else {
            tracing::warn!(flow, target = %e.spec, "cannot resolve target (yet)");
            self.send_msg(Msg::OpenErr {
                flow,
                reason: OpenError::Unreachable,
            });
            return None;
        };
        if let (Some(mode), Some(s)) = (e.compression, self.sess.as_mut()) {
            s.session.set_flow_compression(flow, mode);
        }
        Some(SocketAddr::new(ip, port))
    }

    fn open(&mut self, flow: FlowId, resource: u32, port: u16) {
        let Some(addr) = self.target(resource, port, Proto::Tcp, flow) else {
            return;
        };
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
                credit: HOST_WINDOW,
                recv_op: None,
                eof: false,
                to_target: VecDeque::new(),
                sending: false,
                ungranted: 0,
                fin_from_host: false,
                shut_wr: false,
                dead: false,
                abortive: false,
                target: addr,
                queued: Some(deadline),
            },
        );
        self.connect_queue
            .entry(addr)
            .or_default()
            .push_back(serial);
        self.start_connects(addr);
    }

    /// Starts queued connects to `addr` while fewer than
    /// `--max-connecting` are in flight. A burst of guest connections to a
    /// busy server (a listen backlog of 5) then reaches it as a steady
    /// stream, each connect starting as the one before completes, instead
    /// of SYNs that the full queue drops and that the kernel sends again
    /// only 1, 2, 4... 64 s later, until some give up.
    fn start_connects(&mut self, addr: SocketAddr) {
        let max = self.args.max_connecting.max(1);
        let now = Instant::now();
        loop {
            if self.connecting.get(&addr).copied().unwrap_or(0) >= max {
                return;
            }
            let Some(serial) = self
                .connect_queue
                .get_mut(&addr)
                .and_then(VecDeque::pop_front)
            else {
                self.connect_queue.remove(&addr);
                return;
            };
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
            *self.connecting.entry(addr).or_default() += 1;
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
            if let Some(s) = self.sess.as_mut() {
                s.session.forget_flow(f.id);
            }
        }
        if !f.dead {
            f.dead = true;
            f.abortive = abortive;
            f.to_target.clear();
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
        if let Some(n) = self.connecting.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.connecting.remove(&addr);
            }
        }
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
                self.send_msg(Msg::Fin { flow: id });
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
                f.credit -= n as u32;
                let buf = c.buf.unwrap_or_default();
                for chunk in buf.chunks(MAX_DATA) {
                    self.send_msg(Msg::Data {
                        flow: id,
                        bytes: chunk.to_vec(),
                    });
                }
            }
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
        let mut buf = c.buf.unwrap_or_default();
        match io {
            Ok(n) => {
                f.ungranted += n as u32;
                if n < buf.len() {
                    buf.drain(..n);
                    f.to_target.push_front(buf);
                }
            }
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
            && f.shut_wr
            && !f.sending
        {
            self.kill_flow(serial, false);
        }
    }

    /// Starts whatever operations the flows and the tunnel can do now.
    fn pump(&mut self, _now: Instant) {
        let can_read = self.sess.as_ref().is_some_and(|s| s.session.can_send());
        let serials: Vec<u64> = self.flows.keys().copied().collect();
        let mut grants = Vec::new();
        let mut done = Vec::new();
        for s in serials {
            let f = self.flows.get_mut(&s).expect("present");
            if f.dead || !f.connected {
                continue;
            }
            let fd = f.fd.as_raw_fd();
            if can_read && f.recv_op.is_none() && !f.eof && f.credit > 0 {
                let want = (f.credit as usize).min(RECV_BUF);
                f.ops += 1;
                f.recv_op = Some(
                    self.reactor
                        .recv(fd, Vec::with_capacity(want), Tag::FlowRecv(s)),
                );
            }
            if !f.sending {
                if let Some(buf) = f.to_target.pop_front() {
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
            if f.ungranted > 0 && (f.to_target.is_empty() || f.ungranted >= AGENT_WINDOW / 4) {
                grants.push((f.id, f.ungranted));
                f.ungranted = 0;
            }
        }
        for (flow, credit) in grants {
            self.send_msg(Msg::Window { flow, credit });
        }
        for s in done {
            self.maybe_done(s);
        }
        self.pump_udp(can_read);
        if let Some(s) = self.sess.as_mut() {
            s.session.flush();
        }
        let up = self.tunnel.as_ref().is_some_and(|t| t.phase == Phase::Up);
        if let Some(t) = self.tunnel.as_mut()
            && t.phase != Phase::Connecting
        {
            let session = if up {
                self.sess.as_mut().map(|s| &mut s.session)
            } else {
                None
            };
            let mut out = std::mem::take(&mut t.out);
            t.link.as_mut().expect("link").flush(session, &mut out);
            t.out = out;
            if !t.sending && !t.out.is_empty() {
                let out = std::mem::take(&mut t.out);
                t.sending = true;
                t.ops += 1;
                let fd = t.fd.as_raw_fd();
                let tgen = t.tgen;
                self.reactor.send(fd, out, 0, Tag::TunSend(tgen));
            }
        }
    }
}
