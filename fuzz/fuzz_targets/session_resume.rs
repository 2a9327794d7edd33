//! The session layer between two ends that both send, driven by a fuzzed
//! script: Data (compressible, noise or zeros, on up to 256 flow ids) and
//! flow messages each way, flushes, partial deliveries, pure acks, Pings,
//! lost connections with an honest resume, a virtual clock with
//! `sweep_idle`; and hostile input on top (raw bytes fed as records, forged
//! records with chosen seq/ack and fuzzed bodies, `resume(n)` with a
//! fuzzed `n`). Only the pub API of `Session` is used.
//!
//! Asserts: never a panic; `replay_bytes` stays within the replay limit
//! plus one record, and each batch of output within the replay limit plus
//! a few records. While nothing hostile was injected, also that the
//! session keeps its promise: every session message one end sends reaches
//! the other once, in order and unchanged (Data decompressed byte for
//! byte) across any number of lost connections, except messages for a flow
//! the receiver has already reset (skipped by design); no error is ever
//! raised; and once everything is delivered and acknowledged both replay
//! buffers are empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_shared::session::{Compression, MAX_RECORD, RECORD_HEADER, Session, SessionConfig};
use netredir_shared::wire::{FlowId, MAX_DATA, Msg, OpenError};
use std::collections::{HashSet, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// One end: its session and what it sent that the other has yet to see.
struct End {
    s: Session,
    /// Session messages sent, not yet received by the other end.
    sent: VecDeque<Msg>,
    /// Flows this end has reset (sent or received a Reset).
    dead: HashSet<FlowId>,
    /// Output written, not yet delivered to the other end.
    wire: Vec<u8>,
}

struct Harness {
    ends: [End; 2],
    cfg: SessionConfig,
    /// Flows either end reset: nobody sends on them again.
    retired: HashSet<FlowId>,
    /// Flow ids either end sent anything on.
    used: HashSet<FlowId>,
    tainted: bool,
    t0: Instant,
    elapsed: Duration,
}

/// Text (compresses well) and noise (`auto` sends it raw), made once.
fn sources() -> &'static (Vec<u8>, Vec<u8>) {
    static SOURCES: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    SOURCES.get_or_init(|| {
        let n = 2 * MAX_DATA + 65536;
        let mut text = Vec::with_capacity(n + 64);
        let mut i = 0u32;
        while text.len() < n {
            text.extend_from_slice(
                format!("%%Page {i}: 72 720 moveto (netredir) show\n").as_bytes(),
            );
            i += 1;
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        (text, noise)
    })
}

fn payload(kind: u8, len: usize, seed: u16) -> Vec<u8> {
    let (text, noise) = sources();
    let at = usize::from(seed);
    match kind % 3 {
        0 => text[at..at + len].to_vec(),
        1 => noise[at..at + len].to_vec(),
        _ => vec![0; len],
    }
}

fn flow_of(m: &Msg) -> Option<FlowId> {
    match m {
        Msg::Data { flow, .. }
        | Msg::Window { flow, .. }
        | Msg::Fin { flow }
        | Msg::Datagram { flow, .. }
        | Msg::OpenOk { flow }
        | Msg::OpenErr { flow, .. } => Some(*flow),
        _ => None,
    }
}

impl Harness {
    fn now(&self) -> Instant {
        self.t0 + self.elapsed
    }

    /// An honest session message from end `i`, if the flow is usable and
    /// the replay buffer has room (as a real driver checks `can_send`).
    fn send(&mut self, i: usize, m: Msg) {
        let flow = match &m {
            Msg::Data { flow, .. }
            | Msg::Window { flow, .. }
            | Msg::Fin { flow }
            | Msg::Reset { flow }
            | Msg::Datagram { flow, .. }
            | Msg::OpenOk { flow }
            | Msg::OpenErr { flow, .. }
            | Msg::Open { flow, .. } => *flow,
            _ => unreachable!("only flow messages are scripted"),
        };
        if self.retired.contains(&flow) || !self.ends[i].s.can_send() {
            return;
        }
        // The host opens a flow under an id never used before (it never
        // reuses one), so an Open never meets earlier traffic of its id.
        if matches!(m, Msg::Open { .. }) && self.used.contains(&flow) {
            return;
        }
        self.used.insert(flow);
        if let Msg::Reset { flow } = m {
            self.retired.insert(flow);
            self.ends[i].dead.insert(flow);
        }
        let now = self.now();
        self.ends[i].sent.push_back(m.clone());
        self.ends[i].s.send(m, now);
    }

    /// Moves each session's output onto its wire, checking its size.
    fn collect(&mut self) {
        let limit = self.cfg.replay_limit;
        for e in &mut self.ends {
            let out = e.s.take_output();
            let records = e.s.stats().records_sent as usize + 2;
            let bound = limit + 3 * (MAX_RECORD + 4) + RECORD_HEADER * records;
            assert!(
                out.len() <= bound,
                "{} bytes of output at once (bound {bound})",
                out.len()
            );
            e.wire.extend_from_slice(&out);
            assert!(
                e.s.replay_bytes() <= limit + MAX_RECORD,
                "replay holds {} bytes, limit {limit}",
                e.s.replay_bytes()
            );
        }
    }

    fn drop_connection(&mut self) {
        for e in &mut self.ends {
            e.s.connection_lost();
            e.wire.clear();
        }
    }

    /// What end `to` makes of `msgs` from its peer: checked against what
    /// the peer sent, unless hostile bytes went in.
    fn check_received(&mut self, to: usize, m: Msg) {
        if matches!(m, Msg::Ping { .. } | Msg::Pong { .. }) {
            return;
        }
        if self.tainted {
            return;
        }
        let from = 1 - to;
        loop {
            let Some(e) = self.ends[from].sent.pop_front() else {
                panic!("end {to} received {m:?}, which end {from} never sent");
            };
            if e == m {
                break;
            }
            // A message for a flow the receiver already reset is skipped.
            if flow_of(&e).is_some_and(|f| self.ends[to].dead.contains(&f)) {
                continue;
            }
            panic!("end {to} expected {e:?} from end {from}, got {m:?}");
        }
        if let Msg::Reset { flow } = m {
            self.ends[to].dead.insert(flow);
        }
    }

    /// Drains end `i`'s received messages; an error drops the connection.
    fn drain(&mut self, i: usize) {
        for _ in 0..100_000 {
            match self.ends[i].s.poll_msg() {
                Ok(Some(m)) => self.check_received(i, m),
                Ok(None) => return,
                Err(e) => {
                    assert!(
                        self.tainted,
                        "end {i} refused an honest peer's records: {e}"
                    );
                    self.drop_connection();
                    return;
                }
            }
        }
        panic!("end {i} yields messages without end");
    }

    /// Feeds end `to` up to `n` bytes of its peer's wire.
    fn deliver(&mut self, to: usize, n: usize) {
        let from = 1 - to;
        let n = n.min(self.ends[from].wire.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.ends[from].wire.drain(..n).collect();
        if let Err(e) = self.ends[to].s.feed(&chunk) {
            assert!(
                self.tainted,
                "end {to} refused an honest peer's records: {e}"
            );
            // Messages before the bad record still count.
            self.drain(to);
            self.drop_connection();
            return;
        }
        self.drain(to);
    }

    /// A new connection: each end tells the other what it processed.
    fn reconnect(&mut self, quoted_to_0: Option<u64>) {
        self.drop_connection();
        let rx0 = self.ends[0].s.received();
        let rx1 = self.ends[1].s.received();
        let n = quoted_to_0.unwrap_or(rx1);
        let r0 = self.ends[0].s.resume(n);
        let r1 = self.ends[1].s.resume(rx0);
        if r0.is_err() || n > rx1 {
            // Records end 1 never got may be gone: no promise left to check.
            self.tainted = true;
        }
        if !self.tainted {
            assert!(
                r0.is_ok() && r1.is_ok(),
                "honest resume failed: {r0:?} {r1:?}"
            );
        }
    }

    /// Hostile bytes into end 0, as if from end 1.
    fn inject(&mut self, bytes: &[u8]) {
        self.tainted = true;
        if self.ends[0].s.feed(bytes).is_err() {
            self.drain(0);
            self.drop_connection();
            return;
        }
        self.drain(0);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let c = input.u8();
    let cfg = SessionConfig {
        compression: [
            Compression::Auto,
            Compression::Off,
            Compression::Level(1),
            Compression::Level(3),
        ][usize::from(c & 3)],
        replay_limit: [64 << 10, 256 << 10, 1 << 20, 8 << 20][usize::from(c >> 2 & 3)],
        ack_every: [1, 4096, 64 << 10, 256 << 10][usize::from(c >> 4 & 3)],
    };
    let end = || End {
        s: Session::new(cfg.clone()),
        sent: VecDeque::new(),
        dead: HashSet::new(),
        wire: Vec::new(),
    };
    let mut h = Harness {
        ends: [end(), end()],
        cfg: cfg.clone(),
        retired: HashSet::new(),
        used: HashSet::new(),
        tainted: false,
        t0: Instant::now(),
        elapsed: Duration::ZERO,
    };

    let mut ops = 0;
    while !input.0.is_empty() && ops < 512 {
        ops += 1;
        let op = input.u8();
        let i = usize::from(op >> 7);
        match op & 0x7f {
            // Data, the common case.
            0..=39 => {
                // Flows 0-7 mostly; any of 0-255 (past MAX_CONTEXTS) when asked.
                let f = input.u8();
                let flow = FlowId::from(if f & 0x80 != 0 {
                    f.rotate_left(1)
                } else {
                    f & 7
                });
                let kind = input.u8();
                // 1..=MAX_DATA bytes (the wire format has no empty Data, and
                // the daemons never send one: 0 bytes read is a Fin); mostly
                // small, up to MAX_DATA when asked.
                let n = usize::from(input.u16());
                let len = 1 + if kind & 0x80 != 0 {
                    n % MAX_DATA
                } else {
                    n % 2048
                };
                let bytes = payload(kind, len, input.u16());
                h.send(i, Msg::Data { flow, bytes });
            }
            40..=49 => {
                let flow = FlowId::from(input.u8());
                let arg = input.u16();
                let m = match arg % 7 {
                    0 => Msg::Window {
                        flow,
                        credit: u32::from(arg) << 4,
                    },
                    1 => Msg::Fin { flow },
                    2 => Msg::Reset { flow },
                    3 => Msg::OpenOk { flow },
                    4 => Msg::OpenErr {
                        flow,
                        reason: OpenError::Refused,
                    },
                    5 => Msg::Datagram {
                        flow,
                        bytes: payload(0, usize::from(arg >> 6), arg),
                    },
                    _ => Msg::Open {
                        flow,
                        resource: 7,
                        port: 9100,
                    },
                };
                h.send(i, m);
            }
            50..=57 => h.ends[i].s.flush(),
            58..=71 => {
                let n = match input.u8() {
                    0 => usize::MAX,
                    k => usize::from(k) * 97,
                };
                h.deliver(1 - i, n);
            }
            72..=75 => h.ends[i].s.maybe_ack(op & 1 == 1),
            76..=77 => {
                let nonce = u64::from(input.u16());
                h.ends[i].s.send_control(Msg::Ping { nonce });
            }
            78..=81 => {
                h.elapsed += Duration::from_millis(u64::from(input.u8()) * 100);
                let now = h.now();
                h.ends[0].s.sweep_idle(now);
                h.ends[1].s.sweep_idle(now);
            }
            82..=87 => h.reconnect(None),
            // Hostile from here on.
            88..=89 => {
                let rx1 = h.ends[1].s.received();
                let n = match input.u8() {
                    b @ 0..=127 => rx1.saturating_sub(u64::from(b % 4)),
                    b => rx1 + u64::from(b % 4),
                };
                h.reconnect(Some(n));
            }
            90..=93 => {
                let n = usize::from(input.u8());
                let bytes = input.bytes(n).to_vec();
                h.inject(&bytes);
            }
            94..=99 => {
                // A forged record: chosen seq and ack, fuzzed messages.
                let sel = input.u8();
                let rx = h.ends[0].s.received();
                let sent = h.ends[0].s.stats().records_sent;
                let seq = match sel & 3 {
                    0 => 0,
                    1 => rx + 1,
                    2 => rx,
                    _ => u64::from(input.u8()),
                };
                let ack = match sel >> 2 & 3 {
                    0 => 0,
                    1 => sent,
                    2 => sent + 1,
                    _ => u64::from(input.u8()),
                };
                let n = usize::from(input.u8());
                let body = input.bytes(n).to_vec();
                let mut rec = Vec::with_capacity(RECORD_HEADER + body.len());
                rec.extend_from_slice(&((16 + body.len()) as u32).to_be_bytes());
                rec.extend_from_slice(&seq.to_be_bytes());
                rec.extend_from_slice(&ack.to_be_bytes());
                rec.extend_from_slice(&body);
                h.inject(&rec);
            }
            _ => {}
        }
        h.collect();
    }

    if h.tainted {
        return;
    }
    // Deliver and acknowledge everything: nothing may be missing, and the
    // replay buffers must empty.
    for _ in 0..4 {
        for i in 0..2 {
            h.ends[i].s.flush();
        }
        h.collect();
        for i in 0..2 {
            h.deliver(i, usize::MAX);
        }
        for i in 0..2 {
            h.ends[i].s.maybe_ack(true);
        }
        h.collect();
        for i in 0..2 {
            h.deliver(i, usize::MAX);
        }
    }
    for i in 0..2 {
        let to = 1 - i;
        while let Some(e) = h.ends[i].sent.pop_front() {
            assert!(
                flow_of(&e).is_some_and(|f| h.ends[to].dead.contains(&f)),
                "end {to} never received {e:?}"
            );
        }
        assert_eq!(
            h.ends[i].s.replay_bytes(),
            0,
            "end {i}: acknowledged records kept"
        );
    }
});
