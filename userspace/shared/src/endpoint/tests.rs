//! Endpoint tests: a host and an agent endpoint over real TLS, joined by an
//! in-memory pipe that can cut, delay and reorder connections, on a
//! virtual clock. Nothing sleeps; time moves only when both sides are idle,
//! straight to the next thing due.

use super::*;
use crate::tls::{Fingerprint, HostCheck, Identity, Tls, TlsError};
use crate::wire::{FlowId, VERSION};
use std::collections::{HashMap, VecDeque};

const HB: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(30);
const LATENCY: Duration = Duration::from_millis(10);
/// The flow the agent's test messages use, and the host's.
const AGENT_FLOW: FlowId = 1;
const HOST_FLOW: FlowId = 2;

enum Chunk {
    Bytes(Vec<u8>),
    /// The sender closed the connection (the receiver's end of stream).
    Fin,
}

/// One TCP connection of the pipe: in order within each direction, each
/// chunk with the time it arrives.
struct Wire {
    /// Agent → host.
    up: VecDeque<(Instant, Chunk)>,
    /// Host → agent.
    down: VecDeque<(Instant, Chunk)>,
    latency: Duration,
    /// The network lost it: what was in flight is gone, nothing more
    /// arrives, and nobody is told.
    cut: bool,
    host_open: bool,
}

#[derive(Clone)]
enum Policy {
    Accept,
    Later(String),
    Refuse(String),
}

struct Pair {
    base: Instant,
    now: Instant,
    agent_id: Identity,
    host_id: Identity,
    /// What the agent pins (the host's fingerprint, unless a test swaps
    /// the host).
    pin: Fingerprint,
    agent: AgentEndpoint,
    host: HostEndpoint,
    handshakes: HashMap<u64, HostHandshake>,
    wires: HashMap<u64, Wire>,
    /// The connection the agent drives.
    agent_conn: Option<u64>,
    next_conn: u64,
    /// New connections can be made.
    reachable: bool,
    policy: Policy,
    /// The pairing code's fingerprint prefix, while pairing.
    prefix: Option<[u8; 8]>,
    /// Every event but messages, with its time since `base`.
    agent_log: Vec<(Duration, AgentEvent)>,
    host_log: Vec<(Duration, HostEvent)>,
    agent_got: Vec<u64>,
    host_got: Vec<u64>,
    agent_sent: u64,
    host_sent: u64,
    requests: Vec<AgentRequest>,
    accepted: Vec<Accepted>,
    dials: usize,
    /// Chunks the host read from a connection the agent had already left
    /// (the reordering the tests mean to cover).
    stale_to_host: usize,
}

/// A Data message carrying `n` first, then text to compress.
fn numbered(flow: FlowId, n: u64, len: usize) -> Msg {
    let mut bytes = n.to_be_bytes().to_vec();
    bytes.extend(
        format!("line {n} of the print job\n")
            .bytes()
            .cycle()
            .take(len),
    );
    Msg::Data { flow, bytes }
}

fn number(m: &Msg, flow: FlowId) -> u64 {
    match m {
        Msg::Data { flow: f, bytes } if *f == flow => {
            u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
        }
        other => panic!("unexpected message {other:?}"),
    }
}

impl Pair {
    fn new() -> Self {
        Self::with(AgentConfig::new("test-agent"), HostConfig::default())
    }

    fn with(mut acfg: AgentConfig, mut hcfg: HostConfig) -> Self {
        let now = Instant::now();
        acfg.heartbeat = HB;
        acfg.grace = GRACE;
        hcfg.heartbeat = HB;
        hcfg.grace = GRACE;
        let host_id = Identity::generate("netredird").unwrap();
        let prefix = acfg.pair.as_ref().map(|_| {
            let mut p = [0u8; 8];
            p.copy_from_slice(&host_id.fingerprint().0[..8]);
            p
        });
        Self {
            base: now,
            now,
            agent_id: Identity::generate("netredir-agent").unwrap(),
            pin: host_id.fingerprint(),
            host_id,
            agent: AgentEndpoint::new(acfg, now),
            host: HostEndpoint::new(hcfg, now),
            handshakes: HashMap::new(),
            wires: HashMap::new(),
            agent_conn: None,
            next_conn: 1,
            reachable: true,
            policy: Policy::Accept,
            prefix,
            agent_log: Vec::new(),
            host_log: Vec::new(),
            agent_got: Vec::new(),
            host_got: Vec::new(),
            agent_sent: 0,
            host_sent: 0,
            requests: Vec::new(),
            accepted: Vec::new(),
            dials: 0,
            stale_to_host: 0,
        }
    }

    fn t(&self) -> Duration {
        self.now - self.base
    }

    fn dial(&mut self) {
        self.dials += 1;
        if !self.reachable {
            self.agent.connection_lost("connection refused", self.now);
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.wires.insert(
            id,
            Wire {
                up: VecDeque::new(),
                down: VecDeque::new(),
                latency: LATENCY,
                cut: false,
                host_open: true,
            },
        );
        self.handshakes.insert(
            id,
            HostHandshake::new(Tls::server(&self.host_id).unwrap(), self.now),
        );
        let check = match self.prefix {
            Some(p) => HostCheck::Prefix(p),
            None => HostCheck::Pinned(self.pin),
        };
        self.agent_conn = Some(id);
        self.agent
            .new_connection(Tls::client(&self.agent_id, check).unwrap(), self.now);
    }

    /// Queues `chunk` on connection `id`, `up` toward the host; in order
    /// behind what is already on its way.
    fn push(&mut self, id: u64, up: bool, chunk: Chunk) {
        let now = self.now;
        let Some(w) = self.wires.get_mut(&id) else {
            return;
        };
        if w.cut {
            return;
        }
        let q = if up { &mut w.up } else { &mut w.down };
        let at = q.back().map_or(now, |(t, _)| *t).max(now + w.latency);
        q.push_back((at, chunk));
    }

    fn agent_closed(&mut self) {
        if let Some(id) = self.agent_conn.take() {
            self.push(id, true, Chunk::Fin);
        }
    }

    fn host_closed(&mut self, id: u64) {
        self.push(id, false, Chunk::Fin);
        if let Some(w) = self.wires.get_mut(&id) {
            w.host_open = false;
        }
    }

    /// One round of both sides; whether anything happened.
    fn step(&mut self) -> bool {
        let mut busy = false;
        while let Some(e) = self.agent.poll_event() {
            busy = true;
            match &e {
                AgentEvent::Msg(m) => {
                    self.agent_got.push(number(m, HOST_FLOW));
                    continue;
                }
                AgentEvent::Dial => self.dial(),
                AgentEvent::Disconnected { .. } => self.agent_closed(),
                AgentEvent::Fatal(_) => self.agent_closed(),
                _ => {}
            }
            self.agent_log.push((self.t(), e));
        }
        while let Some(e) = self.host.poll_event() {
            busy = true;
            match &e {
                HostEvent::Msg(m) => {
                    self.host_got.push(number(m, AGENT_FLOW));
                    continue;
                }
                HostEvent::ConnectionLost { conn, .. } => self.host_closed(*conn),
                HostEvent::SessionEnded(_) => {}
            }
            self.host_log.push((self.t(), e));
        }
        let mut out = Vec::new();
        self.agent.poll_transmit(&mut out);
        if !out.is_empty() {
            busy = true;
            if let Some(id) = self.agent_conn {
                self.push(id, true, Chunk::Bytes(out));
            }
        }
        let ids: Vec<u64> = self.handshakes.keys().copied().collect();
        for id in ids {
            let mut out = Vec::new();
            let hs = self.handshakes.get_mut(&id).expect("listed");
            hs.poll_transmit(&mut out);
            let closing = hs.is_closing();
            if !out.is_empty() {
                busy = true;
                self.push(id, false, Chunk::Bytes(out));
            }
            if closing {
                self.handshakes.remove(&id);
                self.host_closed(id);
            }
        }
        let mut out = Vec::new();
        if let Some(id) = self.host.poll_transmit(&mut out)
            && !out.is_empty()
        {
            busy = true;
            self.push(id, false, Chunk::Bytes(out));
        }
        let ids: Vec<u64> = self.wires.keys().copied().collect();
        for id in ids {
            for up in [true, false] {
                loop {
                    let w = self.wires.get_mut(&id).expect("listed");
                    let q = if up { &mut w.up } else { &mut w.down };
                    if w.cut || q.front().is_none_or(|(t, _)| *t > self.now) {
                        break;
                    }
                    let (_, chunk) = q.pop_front().expect("checked");
                    busy = true;
                    if up {
                        self.deliver_to_host(id, chunk);
                    } else {
                        self.deliver_to_agent(id, chunk);
                    }
                }
            }
        }
        busy
    }

    fn deliver_to_host(&mut self, id: u64, chunk: Chunk) {
        if !self.wires[&id].host_open {
            return;
        }
        let now = self.now;
        if self.agent_conn != Some(id) {
            self.stale_to_host += 1;
        }
        match chunk {
            Chunk::Bytes(b) => {
                let Some(hs) = self.handshakes.get_mut(&id) else {
                    return self.host.handle_bytes(id, &b, now);
                };
                let req = match hs.handle_bytes(&b, now) {
                    Ok(Some(req)) => req,
                    Ok(None) | Err(_) => return,
                };
                self.requests.push(req);
                match self.policy.clone() {
                    Policy::Accept => {
                        let hs = self.handshakes.remove(&id).expect("present");
                        let a = self.host.accept(id, hs, now);
                        self.accepted.push(a);
                    }
                    Policy::Later(why) => hs.later(&why),
                    Policy::Refuse(why) => hs.refuse(&why),
                }
            }
            Chunk::Fin => {
                if self.handshakes.remove(&id).is_some() {
                    self.host_closed(id);
                } else {
                    self.host.connection_lost(id, "closed by the agent", now);
                }
            }
        }
    }

    fn deliver_to_agent(&mut self, id: u64, chunk: Chunk) {
        if self.agent_conn != Some(id) {
            return;
        }
        match chunk {
            Chunk::Bytes(b) => self.agent.handle_bytes(&b, self.now),
            Chunk::Fin => self.agent.connection_lost("closed by the host", self.now),
        }
    }

    /// Steps until idle, then moves the clock to the next thing due (never
    /// past `limit`) and runs the timers; false once at `limit`.
    fn advance(&mut self, limit: Instant) -> bool {
        let mut n = 0;
        while self.step() {
            n += 1;
            assert!(n < 100_000, "never idle");
        }
        let wires = self
            .wires
            .values()
            .filter(|w| !w.cut)
            .flat_map(|w| w.up.front().into_iter().chain(w.down.front()))
            .map(|(t, _)| *t)
            .min();
        let hs = self
            .handshakes
            .values()
            .filter_map(HostHandshake::poll_timeout)
            .min();
        let next = [
            wires,
            hs,
            self.agent.poll_timeout(),
            self.host.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next.filter(|t| *t <= limit) else {
            self.now = self.now.max(limit);
            return false;
        };
        self.now = self.now.max(next);
        self.timers();
        true
    }

    fn timers(&mut self) {
        let now = self.now;
        self.agent.handle_timeout(now);
        self.host.handle_timeout(now);
        for hs in self.handshakes.values_mut() {
            let _ = hs.handle_timeout(now);
        }
    }

    fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        while self.advance(limit) {}
        while self.step() {}
    }

    /// Runs until `done` holds, for at most `max` of virtual time.
    fn run_until(&mut self, what: &str, max: Duration, done: impl Fn(&Self) -> bool) {
        let limit = self.now + max;
        while !done(self) {
            assert!(
                self.advance(limit) || done(self),
                "{what}: not within {max:?} (at {:?})\nagent: {:?}\nhost: {:?}",
                self.t(),
                self.agent_log,
                self.host_log
            );
        }
        while self.step() {}
    }

    fn connected(&self) -> bool {
        self.agent.is_connected() && self.host.connection() == self.agent_conn
    }

    fn run_until_connected(&mut self) {
        self.run_until("connected", Duration::from_secs(120), Self::connected);
    }

    /// Runs until a connection other than `old` carries the session.
    fn run_until_reconnected(&mut self, old: u64) {
        self.run_until("reconnected", Duration::from_secs(120), |p| {
            p.connected() && p.agent_conn != Some(old)
        });
    }

    /// Sends `n` numbered messages each way (while each side has a session).
    fn send_both(&mut self, n: u64, len: usize) {
        for _ in 0..n {
            if self.agent.has_session() {
                let m = numbered(AGENT_FLOW, self.agent_sent, len);
                self.agent.send(m, self.now);
                self.agent_sent += 1;
            }
            if self.host.session_id().is_some() {
                let m = numbered(HOST_FLOW, self.host_sent, len);
                self.host.send(m, self.now);
                self.host_sent += 1;
            }
        }
    }

    /// The network loses the agent's current connection: in-flight bytes
    /// are gone; `tell` the ends as a reset would, or not at all.
    fn cut(&mut self, tell_agent: bool, tell_host: bool) {
        let id = self.agent_conn.expect("a connection to cut");
        self.wires.get_mut(&id).expect("wire").cut = true;
        if tell_agent {
            self.agent.connection_lost("connection reset", self.now);
        }
        if tell_host {
            self.host.connection_lost(id, "connection reset", self.now);
        }
    }

    fn agent_events(&self, f: impl Fn(&AgentEvent) -> bool) -> Vec<(Duration, AgentEvent)> {
        self.agent_log
            .iter()
            .filter(|(_, e)| f(e))
            .cloned()
            .collect()
    }

    fn host_events(&self, f: impl Fn(&HostEvent) -> bool) -> Vec<(Duration, HostEvent)> {
        self.host_log
            .iter()
            .filter(|(_, e)| f(e))
            .cloned()
            .collect()
    }

    /// Each side got exactly what the other sent, once, in order.
    fn assert_all_delivered(&self, ctx: &str) {
        let want = |n: u64| (0..n).collect::<Vec<u64>>();
        assert_eq!(self.host_got, want(self.agent_sent), "{ctx}: agent → host");
        assert_eq!(self.agent_got, want(self.host_sent), "{ctx}: host → agent");
    }
}

fn is_connected(resumed: bool) -> impl Fn(&AgentEvent) -> bool {
    move |e| *e == AgentEvent::Connected { resumed }
}

fn is_session_end(e: &AgentEvent) -> bool {
    matches!(e, AgentEvent::SessionEnded(_))
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn the_first_connection_starts_a_new_session_on_both_sides() {
    let mut p = Pair::new();
    p.run_until_connected();
    assert_eq!(p.dials, 1);
    assert_eq!(p.requests.len(), 1);
    let req = &p.requests[0];
    assert_eq!((req.session, req.received, req.pair.as_ref()), (0, 0, None));
    assert_eq!(req.name, "test-agent");
    assert_eq!(req.key, p.agent_id.fingerprint());
    assert_eq!(p.accepted.len(), 1);
    assert!(!p.accepted[0].resumed);
    assert_eq!(p.host.session_id(), Some(p.accepted[0].session));
    assert_eq!(p.agent_events(is_connected(false)).len(), 1);
    p.send_both(10, 100);
    p.run_for(Duration::from_secs(1));
    p.assert_all_delivered("no faults");
}

#[test]
fn messages_arrive_exactly_once_and_in_order_across_cuts_resumes_and_reordering() {
    let mut stale = 0;
    for seed in 1..=12u64 {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut p = Pair::new();
        p.run_until_connected();
        let mut cuts = 0;
        for round in 0..8 {
            let ctx = format!("seed {seed} round {round}");
            let n = xorshift(&mut rng) % 40 + 1;
            let len = (xorshift(&mut rng) % 3000) as usize + 10;
            p.send_both(n, len);
            // Let part of it travel: some delivered, some on the wire.
            let travel = Duration::from_millis(xorshift(&mut rng) % 30);
            p.run_for(travel);
            p.send_both(n / 2 + 1, len);
            while p.step() {}
            let old = p.agent_conn.expect("connected");
            match xorshift(&mut rng) % 5 {
                // A reset both ends see.
                0 => p.cut(true, true),
                // A silent cut: the heartbeats find it.
                1 => p.cut(false, false),
                // Only the agent notices; the host learns when the agent's
                // next connection replaces this one.
                2 => p.cut(true, false),
                // Only the host notices; the agent's heartbeat finds it.
                3 => p.cut(false, true),
                // The agent notices, but the old connection's bytes still
                // reach the host, late: after or before the new
                // connection's, as the delay falls.
                _ => {
                    let id = p.agent_conn.expect("connected");
                    let delay = Duration::from_millis(xorshift(&mut rng) % 400);
                    let w = p.wires.get_mut(&id).expect("wire");
                    for (t, _) in w.up.iter_mut() {
                        *t += delay;
                    }
                    p.agent.connection_lost("connection reset", p.now);
                }
            }
            cuts += 1;
            // More while it is down: kept, and sent once it is back.
            p.send_both(n, len);
            p.run_until_reconnected(old);
            assert!(
                p.agent_events(is_session_end).is_empty(),
                "{ctx}: {:?}",
                p.agent_log
            );
        }
        p.run_for(Duration::from_secs(2));
        p.assert_all_delivered(&format!("seed {seed}"));
        assert!(p.agent_events(is_session_end).is_empty());
        assert!(
            p.host_events(|e| matches!(e, HostEvent::SessionEnded(_)))
                .is_empty()
        );
        assert_eq!(p.agent_events(is_connected(false)).len(), 1, "seed {seed}");
        assert_eq!(
            p.agent_events(is_connected(true)).len(),
            cuts,
            "seed {seed}: every cut resumed"
        );
        assert_eq!(p.host.reconnects(), cuts as u64, "seed {seed}");
        assert!(p.accepted[1..].iter().all(|a| a.resumed));
        stale += p.stale_to_host;
    }
    assert!(stale > 0, "an old connection's bytes reached the host late");
}

#[test]
fn a_resume_after_a_cut_with_records_in_flight_loses_nothing() {
    let mut p = Pair::new();
    p.run_until_connected();
    p.send_both(200, 1000);
    // Out of both endpoints and on the wire, not delivered.
    while p.step() {}
    let id = p.agent_conn.unwrap();
    let w = &p.wires[&id];
    assert!(!w.up.is_empty() && !w.down.is_empty(), "records in flight");
    assert!(p.host_got.is_empty() && p.agent_got.is_empty());
    p.cut(true, true);
    p.run_until_connected();
    p.run_for(Duration::from_secs(1));
    p.assert_all_delivered("after the resume");
    assert!(p.accepted[1].resumed);
    let s = p.host.session().unwrap().stats();
    assert_eq!(s.resumes, 1);
    assert!(
        s.records_retransmitted > 0,
        "the host sent its records again"
    );
    assert!(
        p.agent.session().unwrap().stats().records_retransmitted > 0,
        "and so did the agent"
    );
}

#[test]
fn a_newer_connection_replaces_the_one_the_host_still_holds() {
    let mut p = Pair::new();
    p.run_until_connected();
    let old = p.agent_conn.unwrap();
    p.send_both(5, 100);
    p.cut(true, false);
    p.run_until_connected();
    assert_ne!(p.agent_conn, Some(old));
    let lost = p.host_events(|e| matches!(e, HostEvent::ConnectionLost { .. }));
    assert_eq!(
        lost.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        vec![HostEvent::ConnectionLost {
            conn: old,
            why: ConnLost::Replaced
        }]
    );
    // Bytes the replaced connection still delivers (even garbage) are
    // ignored: the new one goes on.
    let now = p.now;
    p.host
        .handle_bytes(old, b"late garbage from the old connection", now);
    assert_eq!(p.host.connection(), p.agent_conn);
    p.run_for(Duration::from_secs(1));
    p.assert_all_delivered("after the replacement");
}

#[test]
fn a_silent_connection_is_dropped_after_three_heartbeats_then_resumed() {
    let mut p = Pair::new();
    p.run_until_connected();
    // Idle for a while: the heartbeats keep it up.
    p.run_for(HB * 10);
    assert!(p.connected());
    assert!(
        p.agent_events(|e| matches!(e, AgentEvent::Disconnected { .. }))
            .is_empty()
    );
    let cut_at = p.t();
    p.cut(false, false);
    p.run_until("both ends notice", HB * 5, |p| {
        !p.agent.is_connected() && p.host.connection().is_none()
    });
    let (at, e) = p
        .agent_events(|e| matches!(e, AgentEvent::Disconnected { .. }))
        .pop()
        .unwrap();
    assert!(
        matches!(
            e,
            AgentEvent::Disconnected {
                why: ConnLost::Silent,
                was_up: true,
                ..
            }
        ),
        "{e:?}"
    );
    let waited = at - cut_at;
    assert!(
        waited >= HB * 2 && waited <= HB * 3,
        "agent dropped it after {waited:?}"
    );
    let (at, e) = p
        .host_events(|e| matches!(e, HostEvent::ConnectionLost { .. }))
        .pop()
        .unwrap();
    assert!(
        matches!(
            e,
            HostEvent::ConnectionLost {
                why: ConnLost::Silent,
                ..
            }
        ),
        "{e:?}"
    );
    let waited = at - cut_at;
    assert!(
        waited >= HB * 2 && waited <= HB * 3,
        "host dropped it after {waited:?}"
    );
    p.run_until_connected();
    assert_eq!(p.agent_events(is_connected(true)).len(), 1);
}

#[test]
fn a_session_not_resumed_within_the_grace_period_ends_on_both_sides() {
    let mut p = Pair::new();
    p.run_until_connected();
    let first = p.host.session_id().unwrap();
    p.send_both(3, 100);
    p.run_for(Duration::from_secs(1));
    p.reachable = false;
    let lost_at = p.t();
    p.cut(true, true);
    p.run_for(GRACE - Duration::from_secs(1));
    assert!(p.agent.has_session() && p.host.session_id().is_some());
    assert!(p.dials > 5, "kept dialing: {}", p.dials);
    p.run_for(Duration::from_secs(2));
    let ended = p.agent_events(is_session_end);
    assert_eq!(ended.len(), 1, "{:?}", p.agent_log);
    assert_eq!(
        ended[0].1,
        AgentEvent::SessionEnded(SessionEnd::GraceExpired)
    );
    assert_eq!(ended[0].0 - lost_at, GRACE);
    let ended = p.host_events(|e| matches!(e, HostEvent::SessionEnded(_)));
    assert_eq!(ended.len(), 1);
    assert_eq!(
        ended[0].1,
        HostEvent::SessionEnded(SessionEnd::GraceExpired)
    );
    assert_eq!(ended[0].0 - lost_at, GRACE);
    assert!(!p.agent.has_session() && p.host.session_id().is_none());
    // Back: a new session, nothing of the old one.
    p.reachable = true;
    p.run_until_connected();
    let req = p.requests.last().unwrap();
    assert_eq!((req.session, req.received), (0, 0));
    assert!(!p.accepted.last().unwrap().resumed);
    assert_ne!(p.host.session_id(), Some(first));
    assert_eq!(p.agent_events(is_connected(false)).len(), 2);
}

#[test]
fn refused_is_fatal() {
    let mut p = Pair::new();
    p.policy = Policy::Refuse("this agent is not paired with any VM here".into());
    p.run_until("fatal", Duration::from_secs(60), |p| {
        !p.agent_events(|e| matches!(e, AgentEvent::Fatal(_)))
            .is_empty()
    });
    assert_eq!(
        p.agent_events(|e| matches!(e, AgentEvent::Fatal(_)))[0].1,
        AgentEvent::Fatal(Fatal::Refused(
            "this agent is not paired with any VM here".into()
        ))
    );
    assert_eq!(p.agent.poll_timeout(), None, "nothing more to do");
    p.run_for(Duration::from_secs(60));
    assert_eq!(p.dials, 1, "never dials again");
    assert!(!p.agent.has_session() && p.host.session_id().is_none());
}

#[test]
fn later_retries_quietly_with_backoff_until_accepted() {
    let mut p = Pair::new();
    p.policy = Policy::Later("its VM is not attached on this host now".into());
    p.run_for(Duration::from_secs(30));
    assert!(p.dials >= 8, "dials {}", p.dials);
    let later = p.agent_events(|e| matches!(e, AgentEvent::Later(_)));
    assert_eq!(later.len(), 1, "said once: {later:?}");
    let delays: Vec<Duration> = p
        .agent_events(|e| matches!(e, AgentEvent::Disconnected { .. }))
        .into_iter()
        .map(|(_, e)| match e {
            AgentEvent::Disconnected {
                why: ConnLost::Later(_),
                was_up: false,
                retry_in,
            } => retry_in,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(delays[0], Duration::from_millis(100));
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    assert_eq!(*delays.last().unwrap(), Duration::from_secs(5));
    assert!(
        p.agent_events(|e| matches!(e, AgentEvent::Fatal(_)))
            .is_empty()
    );
    p.policy = Policy::Accept;
    p.run_until_connected();
    // The backoff starts again from the bottom after a Welcome.
    p.cut(true, true);
    p.run_until_connected();
    match p
        .agent_events(|e| matches!(e, AgentEvent::Disconnected { .. }))
        .pop()
        .unwrap()
        .1
    {
        AgentEvent::Disconnected { retry_in, .. } => {
            assert_eq!(retry_in, Duration::from_millis(100))
        }
        _ => unreachable!(),
    }
}

#[test]
fn a_pairing_secret_is_sent_until_the_host_welcomes_it() {
    let mut cfg = AgentConfig::new("pairing-agent");
    cfg.pair = Some(b"0123456789".to_vec());
    let mut p = Pair::with(cfg, HostConfig::default());
    p.run_until_connected();
    assert_eq!(p.requests[0].pair.as_deref(), Some(&b"0123456789"[..]));
    let paired = p.agent_events(|e| matches!(e, AgentEvent::Paired(_)));
    assert_eq!(
        paired.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        vec![AgentEvent::Paired(p.host_id.fingerprint())]
    );
    // As the agent's driver does: from now on, the pin.
    p.prefix = None;
    p.cut(true, true);
    p.run_until_connected();
    assert_eq!(p.requests[1].pair, None);
    assert_eq!(
        p.agent_events(|e| matches!(e, AgentEvent::Paired(_))).len(),
        1
    );
}

#[test]
fn a_host_that_is_not_the_pinned_one_is_fatal() {
    let mut p = Pair::new();
    p.host_id = Identity::generate("another-host").unwrap();
    p.run_until("fatal", Duration::from_secs(10), |p| {
        !p.agent_events(|e| matches!(e, AgentEvent::Fatal(_)))
            .is_empty()
    });
    assert_eq!(
        p.agent_events(|e| matches!(e, AgentEvent::Fatal(_)))[0].1,
        AgentEvent::Fatal(Fatal::HostMismatch)
    );
    assert!(p.accepted.is_empty());
}

#[test]
fn an_unanswered_preamble_is_given_up_after_its_timeout() {
    let mut p = Pair::new();
    // The host accepts TCP but never answers: its handshakes are dropped
    // before they see a byte.
    p.step();
    let id = p.agent_conn.unwrap();
    p.handshakes.remove(&id);
    p.wires.get_mut(&id).unwrap().host_open = false;
    let start = p.t();
    p.run_until("given up", Duration::from_secs(30), |p| {
        !p.agent_events(|e| matches!(e, AgentEvent::Disconnected { .. }))
            .is_empty()
    });
    let (at, e) = p.agent_log.last().unwrap().clone();
    assert_eq!(at - start, PREAMBLE_TIMEOUT);
    assert!(
        matches!(
            e,
            AgentEvent::Disconnected {
                why: ConnLost::NoAnswer,
                was_up: false,
                ..
            }
        ),
        "{e:?}"
    );
    p.run_until_connected();
}

/// A client link whose preamble is `msgs`, pumped against `hs` until quiet;
/// returns what the handshake said and the messages the client got back.
fn handshake_with(
    msgs: &[Msg],
    hs: &mut HostHandshake,
) -> (Result<Option<AgentRequest>, HandshakeError>, Vec<Msg>) {
    let agent_id = Identity::generate("netredir-agent").unwrap();
    let host_fp = hs_identity().fingerprint();
    let mut client = Link::new(Tls::client(&agent_id, HostCheck::Pinned(host_fp)).unwrap());
    for m in msgs {
        client.send_preamble(m);
    }
    let now = Instant::now();
    let mut result = Ok(None);
    let mut got = Vec::new();
    for _ in 0..10 {
        let (mut up, mut down) = (Vec::new(), Vec::new());
        client.flush(None, &mut up);
        if !up.is_empty() {
            result = hs.handle_bytes(&up, now);
            if !matches!(result, Ok(None)) {
                hs.poll_transmit(&mut down);
                got.extend(client.receive(&down, None).unwrap_or_default());
                return (result, got);
            }
        }
        hs.poll_transmit(&mut down);
        got.extend(client.receive(&down, None).unwrap());
    }
    (result, got)
}

fn hs_identity() -> &'static Identity {
    static ID: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
    ID.get_or_init(|| Identity::generate("netredird").unwrap())
}

#[test]
fn the_handshake_refuses_another_version_and_a_disordered_preamble_saying_why() {
    let now = Instant::now();
    let mut hs = HostHandshake::new(Tls::server(hs_identity()).unwrap(), now);
    let (res, got) = handshake_with(
        &[
            Msg::Hello {
                version: VERSION + 1,
                name: "future".into(),
            },
            Msg::Resume {
                session: 0,
                received: 0,
            },
        ],
        &mut hs,
    );
    assert!(matches!(res, Err(HandshakeError::Version(v)) if v == VERSION + 1));
    assert!(hs.is_closing());
    let reason = format!(
        "protocol version {} (this netredird speaks {VERSION})",
        VERSION + 1
    );
    assert_eq!(got, vec![Msg::Refused { reason }]);

    let mut hs = HostHandshake::new(Tls::server(hs_identity()).unwrap(), now);
    let (res, got) = handshake_with(
        &[Msg::Resume {
            session: 0,
            received: 0,
        }],
        &mut hs,
    );
    assert!(matches!(&res, Err(HandshakeError::Protocol(w)) if w == "Resume before Hello"));
    assert_eq!(
        got,
        vec![Msg::Refused {
            reason: "Resume before Hello".into()
        }]
    );
}

#[test]
fn the_handshake_yields_the_request_and_garbage_or_slowness_end_it() {
    let now = Instant::now();
    let mut hs = HostHandshake::new(Tls::server(hs_identity()).unwrap(), now);
    let (res, got) = handshake_with(
        &[
            Msg::Hello {
                version: VERSION,
                name: "agent@pc".into(),
            },
            Msg::Pair {
                secret: vec![7; 10],
            },
            Msg::Resume {
                session: 42,
                received: 9,
            },
        ],
        &mut hs,
    );
    let req = res.unwrap().unwrap();
    assert_eq!(req.name, "agent@pc");
    assert_eq!(req.pair, Some(vec![7; 10]));
    assert_eq!((req.session, req.received), (42, 9));
    assert_eq!(Some(req.key), hs.peer());
    assert!(
        got.is_empty(),
        "no answer before the daemon decides: {got:?}"
    );
    assert_eq!(hs.poll_timeout(), None, "decided by the daemon now");

    let mut hs = HostHandshake::new(Tls::server(hs_identity()).unwrap(), now);
    let res = hs.handle_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", now);
    assert!(
        matches!(res, Err(HandshakeError::Tls(TlsError::NotTls))),
        "{res:?}"
    );
    assert!(hs.is_closing());

    let mut hs = HostHandshake::new(Tls::server(hs_identity()).unwrap(), now);
    assert_eq!(hs.poll_timeout(), Some(now + PREAMBLE_TIMEOUT));
    assert!(hs.handle_timeout(now + PREAMBLE_TIMEOUT / 2).is_ok());
    assert!(matches!(
        hs.handle_timeout(now + PREAMBLE_TIMEOUT),
        Err(HandshakeError::TimedOut)
    ));
}

#[test]
fn ending_a_session_on_the_host_drops_its_connection_and_the_agent_starts_anew() {
    let mut p = Pair::new();
    p.run_until_connected();
    let conn = p.host.connection().unwrap();
    let now = p.now;
    p.host
        .end_session(SessionEnd::Closed("unpaired".into()), now);
    assert_eq!(
        p.host.poll_event(),
        Some(HostEvent::ConnectionLost {
            conn,
            why: ConnLost::SessionEnded
        })
    );
    assert_eq!(
        p.host.poll_event(),
        Some(HostEvent::SessionEnded(SessionEnd::Closed(
            "unpaired".into()
        )))
    );
    p.host_closed(conn);
    // The agent sees the end of stream, comes back with its old session,
    // and gets a new one: its own ends.
    p.run_until_connected();
    let req = p.requests.last().unwrap();
    assert_ne!(req.session, 0);
    assert!(!p.accepted.last().unwrap().resumed);
    assert_eq!(
        p.agent_events(is_session_end)
            .into_iter()
            .map(|(_, e)| e)
            .collect::<Vec<_>>(),
        vec![AgentEvent::SessionEnded(SessionEnd::Replaced)]
    );
    p.send_both(5, 10);
    p.run_for(Duration::from_secs(1));
    p.assert_all_delivered("new session");
}
