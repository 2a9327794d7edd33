//! The data path thread: one io_uring loop for the AF_XDP socket, the
//! tunnel and the VM's engine.
//!
//! Each turn: wait for completions (or the engine's next timer), feed what
//! arrived to the engine (frames from the AF_XDP socket, messages from the
//! tunnel, requests from the control thread), then pump what the engine
//! produced: events become tunnel messages in one outgoing buffer with at
//! most one send in flight, frames go out of the AF_XDP socket.
//!
//! One agent at a time: a new connection replaces the old one (its flows
//! are reset). Operations still in flight on a replaced connection keep it
//! alive as a zombie until they complete.

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use netredir_datapath::engine::{Engine, EngineConfig, Event, Refusal};
use netredir_datapath::xsk::Xsk;
use netredir_shared::control::{MapEntry, Response, Status};
use netredir_shared::subnet::Ipv4Subnet;
use netredir_shared::vip;
use netredir_shared::wire::{Decoder, Msg, Proto, VERSION};
use netredir_uring::{Completion, Reactor, Waker};
use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the control thread (or main) asks of the data path.
pub enum Request {
    /// Answer with `Response::Map`.
    MapList(Sender<Response>),
    /// Answer with `Response::Status`.
    Status(Sender<Response>),
    /// Stop the loop.
    Shutdown,
}

/// What the loop is set up with.
pub struct Config {
    /// Interface name, for status.
    pub iface: String,
    /// The virtual subnet.
    pub subnet: Ipv4Subnet,
    /// MAC the engine answers from.
    pub mac: [u8; 6],
    /// Where agents connect.
    pub listener: TcpListener,
}

#[derive(Debug, Clone, Copy)]
enum Tag {
    Xsk,
    Accept,
    Wake,
    Recv(u64),
    Send(u64),
}

const RECV_BUF: usize = 256 * 1024;

struct Tunnel {
    tgen: u64,
    fd: OwnedFd,
    ops: u32,
    decoder: Decoder,
    out: Vec<u8>,
    sending: bool,
    hello: Option<String>,
    dead: bool,
}

struct Resource {
    name: String,
    target: String,
    ports: Vec<u16>,
    vip: Ipv4Addr,
    online: bool,
}

struct Loop {
    cfg: Config,
    reactor: Reactor<Tag>,
    xsk: Xsk,
    engine: Engine,
    tunnel: Option<Tunnel>,
    zombies: Vec<Tunnel>,
    next_tgen: u64,
    /// Resource name → its row; the vIP stays with the name.
    resources: Vec<Resource>,
    /// Agent resource id → index in `resources`, for the current agent.
    by_id: HashMap<u32, usize>,
    spare: Vec<u8>,
    pending_frames: Vec<Vec<u8>>,
    counters: HashMap<&'static str, u64>,
}

/// Runs the loop until `Request::Shutdown` or a fatal error.
pub fn run(cfg: Config, xsk: Xsk, rx: Receiver<Request>, waker: Arc<Waker>) -> Result<()> {
    let reactor = Reactor::new(256).context("cannot set up io_uring")?;
    let mut ecfg = EngineConfig::new(cfg.subnet.network(), cfg.subnet.prefix_len(), cfg.mac);
    ecfg.seed = random_seed();
    let engine = Engine::new(ecfg, Instant::now());
    let mut l = Loop {
        cfg,
        reactor,
        xsk,
        engine,
        tunnel: None,
        zombies: Vec::new(),
        next_tgen: 1,
        resources: Vec::new(),
        by_id: HashMap::new(),
        spare: Vec::new(),
        pending_frames: Vec::new(),
        counters: HashMap::new(),
    };
    let listen_fd = l.cfg.listener.as_raw_fd();
    l.reactor.poll_in(l.xsk.fd(), Tag::Xsk);
    l.reactor.accept(listen_fd, Tag::Accept);
    l.reactor.read(waker.fd(), Vec::with_capacity(8), Tag::Wake);
    loop {
        let now = Instant::now();
        let delay = l
            .engine
            .poll_delay(now)
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let delay = if l.pending_frames.is_empty() && !l.xsk.tx_pending() {
            delay
        } else {
            delay.min(Duration::from_millis(1))
        };
        l.reactor.wait(Some(delay)).context("io_uring wait")?;
        let now = Instant::now();
        while let Some(c) = l.reactor.next_completion() {
            l.complete(c, now, listen_fd, waker.fd());
        }
        let mut stop = false;
        while let Ok(req) = rx.try_recv() {
            match req {
                Request::MapList(reply) => {
                    let _ = reply.send(Response::Map {
                        entries: l.map_entries(),
                    });
                }
                Request::Status(reply) => {
                    let _ = reply.send(Response::Status(l.status()));
                }
                Request::Shutdown => stop = true,
            }
        }
        if stop {
            if let Some(t) = l.tunnel.take() {
                // SAFETY: shutdown(2) on a socket we own.
                unsafe { libc::shutdown(t.fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
            return Ok(());
        }
        l.engine.poll(now);
        l.pump();
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a live 8-byte buffer.
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if r != 8 {
        return Instant::now().elapsed().as_nanos() as u64 ^ std::process::id() as u64;
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

impl Loop {
    fn bump(&mut self, k: &'static str) {
        *self.counters.entry(k).or_default() += 1;
    }

    fn complete(&mut self, c: Completion<Tag>, now: Instant, listen_fd: RawFd, wake_fd: RawFd) {
        match c.tag {
            Tag::Xsk => {
                let engine = &mut self.engine;
                self.xsk.receive(|f| engine.handle_frame(f, now));
                self.reactor.poll_in(self.xsk.fd(), Tag::Xsk);
            }
            Tag::Wake => {
                let mut buf = c.buf.unwrap_or_default();
                buf.clear();
                self.reactor.read(wake_fd, buf, Tag::Wake);
            }
            Tag::Accept => {
                self.reactor.accept(listen_fd, Tag::Accept);
                match c.io_result() {
                    Ok(fd) => {
                        // SAFETY: accept returned a new fd that we now own.
                        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
                        self.new_tunnel(fd, now);
                    }
                    Err(e) => tracing::warn!("accept on tunnel listener: {e}"),
                }
            }
            Tag::Recv(tgen) => self.on_recv(tgen, c, now),
            Tag::Send(tgen) => self.on_send(tgen, c),
        }
    }

    fn new_tunnel(&mut self, fd: OwnedFd, now: Instant) {
        if let Some(old) = self.tunnel.take() {
            tracing::warn!("a new agent connected; dropping the previous one");
            self.retire(old, now);
        }
        set_nodelay(fd.as_raw_fd());
        let tgen = self.next_tgen;
        self.next_tgen += 1;
        let mut t = Tunnel {
            tgen,
            fd,
            ops: 1,
            decoder: Decoder::new(),
            out: Vec::new(),
            sending: false,
            hello: None,
            dead: false,
        };
        Msg::Hello {
            version: VERSION,
            name: format!("netredird {}", self.cfg.iface),
        }
        .emit(&mut t.out);
        self.reactor.recv(
            t.fd.as_raw_fd(),
            Vec::with_capacity(RECV_BUF),
            Tag::Recv(tgen),
        );
        self.tunnel = Some(t);
        self.bump("tunnel_accepts");
    }

    /// Takes the tunnel out of service: the engine goes offline (every flow
    /// reset), resources go offline, the socket is shut down.
    fn retire(&mut self, mut t: Tunnel, now: Instant) {
        t.dead = true;
        // SAFETY: shutdown(2) on our socket; pending ops complete.
        unsafe { libc::shutdown(t.fd.as_raw_fd(), libc::SHUT_RDWR) };
        self.engine.set_online(false, now);
        self.engine.clear_resources();
        for r in &mut self.resources {
            r.online = false;
        }
        self.by_id.clear();
        // Events for dead flows are of no use to anyone now.
        while self.engine.poll_event().is_some() {}
        if t.ops > 0 {
            self.zombies.push(t);
        }
    }

    fn tunnel_for(&mut self, tgen: u64) -> Option<&mut Tunnel> {
        match &mut self.tunnel {
            Some(t) if t.tgen == tgen => Some(t),
            _ => self.zombies.iter_mut().find(|t| t.tgen == tgen),
        }
    }

    fn op_done(&mut self, tgen: u64) {
        if let Some(t) = self.tunnel_for(tgen) {
            t.ops -= 1;
        }
        self.zombies.retain(|t| t.ops > 0);
    }

    fn on_recv(&mut self, tgen: u64, c: Completion<Tag>, now: Instant) {
        self.op_done(tgen);
        let live = matches!(&self.tunnel, Some(t) if t.tgen == tgen);
        if !live {
            return;
        }
        let io = c.io_result();
        let mut buf = c.buf.unwrap_or_default();
        let reason = match c.result {
            0 => Some("agent closed the tunnel".to_string()),
            r if r < 0 => Some(format!("tunnel: {}", io.unwrap_err())),
            _ => None,
        };
        if let Some(reason) = reason {
            tracing::info!("{reason}; resources offline, flows reset");
            let t = self.tunnel.take().expect("live");
            self.retire(t, now);
            return;
        }
        let t = self.tunnel.as_mut().expect("live");
        t.decoder.feed(&buf);
        let mut msgs = Vec::new();
        let mut err = None;
        loop {
            match t.decoder.next_msg() {
                Ok(Some(m)) => msgs.push(m),
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        for m in msgs {
            if let Err(why) = self.on_msg(m, now) {
                err.get_or_insert(netredir_shared::wire::WireError::BadField(0, why));
                break;
            }
        }
        if let Some(e) = err {
            tracing::warn!("tunnel protocol error: {e}; dropping the agent");
            self.bump("tunnel_protocol_errors");
            let t = self.tunnel.take().expect("live");
            self.retire(t, now);
            return;
        }
        buf.clear();
        let t = self.tunnel.as_mut().expect("live");
        t.ops += 1;
        let fd = t.fd.as_raw_fd();
        self.reactor.recv(fd, buf, Tag::Recv(tgen));
    }

    fn on_send(&mut self, tgen: u64, c: Completion<Tag>) {
        self.op_done(tgen);
        let Some(t) = self.tunnel.as_mut().filter(|t| t.tgen == tgen) else {
            return;
        };
        let io = c.io_result();
        let mut buf = c.buf.unwrap_or_default();
        match io {
            Ok(n) if n < buf.len() => {
                // Partial send: put the rest back in front of what queued since.
                buf.drain(..n);
                buf.extend_from_slice(&t.out);
                t.out = buf;
                t.sending = false;
            }
            Ok(_) => {
                t.sending = false;
                buf.clear();
                self.spare = buf;
            }
            Err(e) => {
                tracing::info!("tunnel send failed: {e}");
                t.sending = false;
                // The pending recv sees the same failure and retires it.
                // SAFETY: shutdown(2) on our socket.
                unsafe { libc::shutdown(t.fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
        }
    }

    /// Applies one message from the agent; `Err` drops the agent.
    fn on_msg(&mut self, m: Msg, now: Instant) -> Result<(), &'static str> {
        let t = self.tunnel.as_mut().expect("live");
        if t.hello.is_none() {
            let Msg::Hello { version, name } = m else {
                return Err("first message is not Hello");
            };
            if version != VERSION {
                tracing::warn!(version, "agent speaks another protocol version");
                return Err("protocol version mismatch");
            }
            tracing::info!(agent = %name, "agent connected");
            t.hello = Some(name);
            self.engine.set_online(true, now);
            return Ok(());
        }
        let res = match m {
            Msg::Export {
                id,
                name,
                target,
                ports,
            } => {
                self.export(id, name, target, ports);
                Ok(())
            }
            Msg::OpenOk { flow } => self.engine.open_ok(flow, now),
            Msg::OpenErr { flow, reason } => {
                tracing::debug!(flow, ?reason, "agent refused open");
                self.engine.open_err(flow, Refusal::Refused, now)
            }
            Msg::Data { flow, bytes } => self.engine.data(flow, &bytes, now),
            Msg::Window { flow, credit } => self.engine.window(flow, credit, now),
            Msg::Fin { flow } => self.engine.fin(flow, now),
            Msg::Reset { flow } => self.engine.reset(flow, now),
            Msg::Hello { .. } | Msg::Open { .. } => return Err("unexpected message from agent"),
        };
        if let Err(e) = res {
            // Races (a flow the guest just reset) are normal; count them.
            tracing::debug!("{e}");
            self.bump("flow_messages_ignored");
        }
        Ok(())
    }

    fn export(&mut self, id: u32, name: String, target: String, ports: Vec<(u16, Proto)>) {
        let tcp: Vec<u16> = ports
            .iter()
            .filter(|(_, p)| *p == Proto::Tcp)
            .map(|(p, _)| *p)
            .collect();
        let idx = match self.resources.iter().position(|r| r.name == name) {
            Some(i) => i,
            None => {
                let subnet = self.cfg.subnet;
                let taken = |ip: Ipv4Addr| self.resources.iter().any(|r| r.vip == ip);
                let Some(vip) = vip::allocate(&subnet, &name, taken) else {
                    tracing::warn!(%name, "no free vIP left in {subnet}; export ignored");
                    return;
                };
                self.resources.push(Resource {
                    name: name.clone(),
                    target: String::new(),
                    ports: Vec::new(),
                    vip,
                    online: false,
                });
                self.resources.len() - 1
            }
        };
        let r = &mut self.resources[idx];
        r.target = target;
        r.ports = tcp.clone();
        r.online = true;
        tracing::info!(name = %r.name, vip = %r.vip, target = %r.target, ports = ?r.ports, "resource exported");
        self.engine.set_resource(r.vip, id, tcp);
        self.by_id.insert(id, idx);
    }

    fn pump(&mut self) {
        // Engine events → tunnel messages.
        if let Some(t) = self.tunnel.as_mut().filter(|t| t.hello.is_some()) {
            while let Some(ev) = self.engine.poll_event() {
                let m = match ev {
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
                };
                m.emit(&mut t.out);
            }
            if !t.sending && !t.out.is_empty() {
                let mut next = std::mem::take(&mut self.spare);
                std::mem::swap(&mut next, &mut t.out);
                t.sending = true;
                t.ops += 1;
                let fd = t.fd.as_raw_fd();
                let tgen = t.tgen;
                self.reactor.send(fd, next, 0, Tag::Send(tgen));
            }
        } else {
            while self.engine.poll_event().is_some() {}
        }
        // Engine frames → the VM.
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

    fn map_entries(&self) -> Vec<MapEntry> {
        self.resources
            .iter()
            .map(|r| MapEntry {
                name: r.name.clone(),
                vip: r.vip.to_string(),
                target: r.target.clone(),
                ports: r.ports.clone(),
                state: if r.online { "online" } else { "offline" }.into(),
            })
            .collect()
    }

    fn status(&self) -> Status {
        let mut counters: Vec<(String, u64)> = self
            .engine
            .counters()
            .pairs()
            .into_iter()
            .map(|(k, v)| (format!("engine.{k}"), v))
            .collect();
        let mut own: Vec<_> = self
            .counters
            .iter()
            .map(|(k, v)| (format!("daemon.{k}"), *v))
            .collect();
        own.sort();
        counters.extend(own);
        counters.push(("xsk.tx_full".into(), self.xsk.tx_full));
        Status {
            iface: self.cfg.iface.clone(),
            subnet: self.cfg.subnet.to_string(),
            agent_connected: self.tunnel.as_ref().is_some_and(|t| t.hello.is_some()),
            agent_name: self.tunnel.as_ref().and_then(|t| t.hello.clone()),
            flows: self.engine.flow_count() as u64,
            counters,
        }
    }
}
