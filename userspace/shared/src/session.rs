//! The tunnel's session layer, sans-IO: records, acknowledgements, replay
//! after a reconnect, and per-flow compression.
//!
//! Messages travel in records:
//!
//! ```text
//!  0      4        12       20
//!  +------+--------+--------+---------------------------------+
//!  | len  | seq    | ack    | messages (wire frames)          |
//!  +------+--------+--------+---------------------------------+
//!  len: u32, counts seq + ack + messages; seq, ack: u64 big-endian
//! ```
//!
//! Records with `seq` > 0 carry session messages (flows, exports) and are
//! numbered 1, 2, 3...; the sender keeps each one in a replay buffer until
//! the peer's `ack` (the highest sequence it has processed) covers it. A
//! connection that dies loses nothing: on the next one each side says what
//! it has processed ([`Session::resume`]) and the other sends the rest
//! again, byte for byte; the receiver drops what it has already seen.
//! Records with `seq` 0 carry connection messages (Hello, Resume, Ping...)
//! and pure acknowledgements; they are never replayed.
//!
//! A record is flushed when it is full or when the caller has nothing more
//! to add ([`Session::flush`]), never on a timer.
//!
//! `Data` is compressed per flow, never across flows (one flow's bytes
//! must not shape another's record sizes): each busy flow gets its own
//! streaming zstd context (window 2^17), created on first use and freed
//! when the flow ends or sits idle; at most [`MAX_CONTEXTS`] exist per
//! direction, flows beyond that go uncompressed. In `auto` mode payload
//! that looks incompressible (high byte entropy) is sent raw.
//!
//! No silent loss. The contexts follow one rule on both ends: the sender
//! alone decides when a context ends (Fin, Reset, or [`Msg::ZEnd`] when it
//! frees one for any other reason), so the receiver holds exactly the
//! sender's set and never more than [`MAX_CONTEXTS`]. A record is parsed
//! whole before any of it is applied, and counts as received only once
//! applied; what goes wrong inside it is a problem of one flow, never of
//! the link: messages for a flow already reset are skipped and counted,
//! and a flow whose compressed data cannot be used is reset both ways
//! (the application sees [`Msg::Reset`]). A record inflates to at most
//! [`MAX_RECORD_PLAIN`] bytes, and records are unpacked one at a time as
//! the application polls ([`Session::poll_msg`]), so a hostile peer cannot
//! make the receiver hold more than one record's worth.

use crate::wire::{FlowId, MAX_DATA, MAX_FRAME_LEN, Msg, WireError, parse_frames};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::IoSlice;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zstd::stream::raw::{
    CParameter, DParameter, Decoder as ZDec, Encoder as ZEnc, InBuffer, Operation, OutBuffer,
};

/// Header of a record: len, seq, ack.
pub const RECORD_HEADER: usize = 4 + 8 + 8;
/// Largest record body (seq + ack + messages).
pub const MAX_RECORD: usize = MAX_FRAME_LEN + 16;
/// Smallest `Data` payload that compression `auto` tries to compress.
pub const MIN_COMPRESS: usize = 64;
/// Most compression contexts per direction per session.
pub const MAX_CONTEXTS: usize = 64;
/// zstd window: bounds each context's memory (about 1.2 MiB to compress at
/// level 3, 0.3 MiB to decompress).
pub const WINDOW_LOG: u32 = 17;
/// A flow that sent nothing for this long gives its context back.
pub const IDLE: Duration = Duration::from_secs(10);
/// Most bytes the compressed data of one record may inflate to: the sender
/// closes a record before it would exceed it, the receiver resets a flow
/// whose data would.
pub const MAX_RECORD_PLAIN: usize = 4 * 1024 * 1024;
/// How many recently reset flows are remembered, so that messages still
/// in flight for them are skipped instead of misread.
pub const MAX_DEAD: usize = 4096;

/// How payload is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Never.
    Off,
    /// At [`Compression::DEFAULT_LEVEL`], skipping payload that looks
    /// incompressible.
    Auto,
    /// Always, at this zstd level.
    Level(i32),
}

impl Compression {
    /// The level `auto` uses: chosen by `benches/benches/compression.rs`,
    /// where level 1 compressed a text print job better than 3 (7.6x vs
    /// 6.5x, with a 128 KiB window) at about 1.7 Gbit/s for both ends on
    /// one core; only 8-9 compressed more, below 0.6 Gbit/s.
    pub const DEFAULT_LEVEL: i32 = 1;
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Off => write!(f, "off"),
            Compression::Auto => write!(f, "auto"),
            Compression::Level(l) => write!(f, "{l}"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Compression::Off),
            "auto" => Ok(Compression::Auto),
            n => match n.parse::<i32>() {
                Ok(l) if (1..=19).contains(&l) => Ok(Compression::Level(l)),
                _ => Err(format!("{s:?}: expected off, auto or a zstd level 1-19")),
            },
        }
    }
}

/// Why the peer's records cannot be used; the connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The record framing or a message in it is invalid.
    #[error("bad record: {0}")]
    Wire(#[from] WireError),
    /// A record length is out of range.
    #[error("record length {0} out of range")]
    BadLength(usize),
    /// A record skipped ahead (a sequence number was lost).
    #[error("record {got} arrived but {want} was expected")]
    Gap {
        /// Expected sequence.
        want: u64,
        /// Received sequence.
        got: u64,
    },
    /// The peer acknowledged a record we never sent.
    #[error("peer acknowledged record {0}, beyond what was sent")]
    BadAck(u64),
    /// The peer wants to resume from a point we no longer hold.
    #[error("cannot resume: peer has {peer}, replay starts after {have}")]
    CannotResume {
        /// What the peer says it processed.
        peer: u64,
        /// The oldest record we can still send, minus one.
        have: u64,
    },
}

/// Counters of one session, kept across reconnects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Numbered records sent (first transmissions).
    pub records_sent: u64,
    /// Numbered records received and processed.
    pub records_received: u64,
    /// Records sent again after a reconnect.
    pub records_retransmitted: u64,
    /// Record bytes handed to the transport (before TLS).
    pub wire_bytes_out: u64,
    /// Record bytes received from the transport.
    pub wire_bytes_in: u64,
    /// Payload bytes of Data before compression, sent.
    pub data_bytes_out: u64,
    /// The same after compression.
    pub data_wire_bytes_out: u64,
    /// Payload bytes of Data after decompression, received.
    pub data_bytes_in: u64,
    /// The same as received.
    pub data_wire_bytes_in: u64,
    /// Times this session resumed on a new connection.
    pub resumes: u64,
    /// Duplicate records dropped after a resume.
    pub duplicates: u64,
    /// Messages skipped because their flow was already reset (in flight
    /// when the reset crossed them).
    pub skipped: u64,
    /// Flows reset because the peer's compressed data for them could not
    /// be used (corrupt, over a limit, or a stream that never started).
    pub flow_errors: u64,
}

/// Per-flow byte counts, for `netredirctl stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Payload bytes sent.
    pub bytes_out: u64,
    /// ... of which on the wire after compression.
    pub wire_out: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// ... of which on the wire before decompression.
    pub wire_in: u64,
}

struct Enc {
    ctx: ZEnc<'static>,
    last_used: Instant,
}

/// What a session needs to know.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Bytes of unacknowledged records kept for replay; beyond it
    /// [`Session::can_send`] is false.
    pub replay_limit: usize,
    /// Default compression of flows.
    pub compression: Compression,
    /// Send a pure acknowledgement after receiving this many bytes with
    /// nothing to send back.
    pub ack_every: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            replay_limit: 8 * 1024 * 1024,
            compression: Compression::Auto,
            ack_every: 256 * 1024,
        }
    }
}

/// One side of a session.
pub struct Session {
    cfg: SessionConfig,
    next_seq: u64,
    received: u64,
    ack_sent: u64,
    unacked_in: usize,
    replay: VecDeque<(u64, Arc<Body>)>,
    replay_bytes: usize,
    building: Body,
    /// Scratch for one message's frame head (reused).
    head: Vec<u8>,
    /// Bytes the compressed messages in `building` inflate to.
    building_plain: usize,
    out: Vec<OutPart>,
    inbuf: Vec<u8>,
    /// Start of the unprocessed part of `inbuf`.
    inpos: usize,
    inbox: VecDeque<Msg>,
    /// Flows reset recently (either way), oldest first; their late
    /// messages are skipped.
    dead: HashSet<FlowId>,
    dead_order: VecDeque<FlowId>,
    /// Decompression scratch, reused: a message keeps only its own bytes.
    zscratch: Vec<u8>,
    enc: HashMap<FlowId, Enc>,
    dec: HashMap<FlowId, ZDec<'static>>,
    /// Flows whose next compressed message must start a new stream.
    enc_reset: HashMap<FlowId, bool>,
    flow_mode: HashMap<FlowId, Compression>,
    flow_stats: HashMap<FlowId, FlowStats>,
    stats: SessionStats,
}

impl Session {
    /// A new session with nothing sent or received.
    pub fn new(cfg: SessionConfig) -> Self {
        Self {
            cfg,
            next_seq: 1,
            received: 0,
            ack_sent: 0,
            unacked_in: 0,
            replay: VecDeque::new(),
            replay_bytes: 0,
            building: Body::default(),
            head: Vec::new(),
            building_plain: 0,
            out: Vec::new(),
            inbuf: Vec::new(),
            inpos: 0,
            inbox: VecDeque::new(),
            dead: HashSet::new(),
            dead_order: VecDeque::new(),
            zscratch: Vec::new(),
            enc: HashMap::new(),
            dec: HashMap::new(),
            enc_reset: HashMap::new(),
            flow_mode: HashMap::new(),
            flow_stats: HashMap::new(),
            stats: SessionStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Byte counts of the flows still open.
    pub fn flow_stats(&self) -> &HashMap<FlowId, FlowStats> {
        &self.flow_stats
    }

    /// Highest record sequence processed (what a resume quotes).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes held for replay.
    pub fn replay_bytes(&self) -> usize {
        self.replay_bytes
    }

    /// Compression contexts alive (both directions).
    pub fn contexts(&self) -> usize {
        self.enc.len() + self.dec.len()
    }

    /// Whether more session messages may be queued (the replay buffer is
    /// below its limit); when false, stop reading from flows.
    pub fn can_send(&self) -> bool {
        self.replay_bytes + self.building.len < self.cfg.replay_limit
    }

    /// Sets how `flow`'s data is compressed (default: the session's).
    pub fn set_flow_compression(&mut self, flow: FlowId, c: Compression) {
        self.flow_mode.insert(flow, c);
    }

    /// Queues a session message; Data is compressed on the way.
    pub fn send(&mut self, msg: Msg, now: Instant) {
        let msg = match msg {
            // The peer refuses an empty Data, and a refused record would be
            // replayed on every resume: there is nothing to send anyway.
            Msg::Data { bytes, .. } if bytes.is_empty() => return,
            Msg::Data { flow, bytes } => match self.compress(flow, bytes, now) {
                Some(m) => m,
                None => return,
            },
            Msg::Fin { flow } => {
                // The receiver frees its decompressor on Fin: no ZEnd.
                self.enc.remove(&flow);
                self.enc_reset.insert(flow, true);
                Msg::Fin { flow }
            }
            Msg::Reset { flow } => {
                self.forget_flow(flow);
                self.mark_dead(flow);
                Msg::Reset { flow }
            }
            m @ (Msg::Open { flow, .. } | Msg::OpenUdp { flow, .. }) => {
                // A flow id used again after a reset is a new flow (safe
                // because the engine never reuses an id while messages of
                // its earlier flow may still be in flight).
                self.dead.remove(&flow);
                m
            }
            m => m,
        };
        self.emit(msg, 0);
    }

    /// Appends `msg` to the record being built, closing the record first
    /// if it would not fit (`plain`: what a compressed message inflates to).
    fn emit(&mut self, msg: Msg, plain: usize) {
        if plain > 0 && self.building_plain + plain > MAX_RECORD_PLAIN {
            self.flush();
        }
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        let bulk = msg.emit_split(&mut head);
        let size = head.len() + bulk.as_ref().map_or(0, Vec::len);
        if self.building.len + size > MAX_FRAME_LEN {
            // Would not fit: close the record before this message.
            self.flush();
        }
        self.building.pack(&head);
        if let Some(b) = bulk {
            self.building.push_bulk(b);
        }
        self.head = head;
        self.building_plain += plain;
    }

    fn mark_dead(&mut self, flow: FlowId) {
        if self.dead.insert(flow) {
            self.dead_order.push_back(flow);
            if self.dead_order.len() > MAX_DEAD
                && let Some(old) = self.dead_order.pop_front()
            {
                self.dead.remove(&old);
            }
        }
    }

    /// Sends a connection message (Hello, Resume, Ping...) right away, in
    /// a record of its own that is never replayed.
    pub fn send_control(&mut self, msg: Msg) {
        let mut body = Vec::new();
        msg.emit(&mut body);
        self.put_head(0, body.len());
        self.out_bytes().extend_from_slice(&body);
    }

    /// Closes the record being built (if any): it goes out and into replay.
    pub fn flush(&mut self) {
        if self.building.is_empty() {
            return;
        }
        let body = Arc::new(std::mem::take(&mut self.building));
        self.building_plain = 0;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.put_record(seq, &body);
        self.stats.records_sent += 1;
        self.replay_bytes += body.len;
        self.replay.push_back((seq, body));
    }

    /// Queues record `seq` with `body`, shared with the replay buffer.
    fn put_record(&mut self, seq: u64, body: &Arc<Body>) {
        self.put_head(seq, body.len);
        self.out.push(OutPart::Body(Arc::clone(body)));
    }

    /// Queues the header of a record whose `body_len` bytes follow.
    fn put_head(&mut self, seq: u64, body_len: usize) {
        let len = (16 + body_len) as u32;
        let received = self.received;
        let out = self.out_bytes();
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&received.to_be_bytes());
        self.ack_sent = self.received;
        self.unacked_in = 0;
        self.stats.wire_bytes_out += (RECORD_HEADER + body_len) as u64;
    }

    /// The output piece that small bytes (headers, control records) go to.
    fn out_bytes(&mut self) -> &mut Vec<u8> {
        if !matches!(self.out.last(), Some(OutPart::Bytes(_))) {
            self.out.push(OutPart::Bytes(Vec::with_capacity(64)));
        }
        match self.out.last_mut() {
            Some(OutPart::Bytes(b)) => b,
            _ => unreachable!("pushed above"),
        }
    }

    /// Sends a pure acknowledgement if the peer has not heard one for a
    /// while ([`SessionConfig::ack_every`] bytes), or if `force`.
    pub fn maybe_ack(&mut self, force: bool) {
        if self.received > self.ack_sent && (force || self.unacked_in >= self.cfg.ack_every) {
            self.put_head(0, 0);
        }
    }

    /// Takes what is to be written to the transport, as the pieces it is
    /// held in (bodies shared with the replay buffer, not copied).
    pub fn take_output_parts(&mut self) -> Output {
        Output {
            parts: std::mem::take(&mut self.out),
        }
    }

    /// Takes the bytes to write to the transport, concatenated (a copy:
    /// for tests and tools; the tunnel writes [`Session::take_output_parts`]).
    pub fn take_output(&mut self) -> Vec<u8> {
        self.take_output_parts().to_vec()
    }

    /// Whether bytes are waiting for [`Session::take_output`].
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes received from the transport; messages come out of
    /// [`Session::poll_msg`], which unpacks the records one at a time.
    /// Errors mean the peer broke the protocol: drop the connection.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.feed_with(|inbuf| {
            inbuf.extend_from_slice(bytes);
            Ok::<_, SessionError>(())
        })
    }

    /// Like [`Session::feed`], with `fill` appending the bytes to the
    /// session's own buffer (TLS decrypts straight into it: no copy). If
    /// `fill` fails, what it appended is dropped and its error returned.
    pub fn feed_with<E: From<SessionError>>(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.inpos > 0 && self.inpos * 2 >= self.inbuf.len() {
            self.inbuf.drain(..self.inpos);
            self.inpos = 0;
        }
        let before = self.inbuf.len();
        if let Err(e) = fill(&mut self.inbuf) {
            self.inbuf.truncate(before);
            return Err(e);
        }
        self.stats.wire_bytes_in += (self.inbuf.len() - before) as u64;
        Ok(self.process()?)
    }

    /// Unpacks records until one yields messages (or none is complete).
    fn process(&mut self) -> Result<(), SessionError> {
        while self.inbox.is_empty() {
            let avail = &self.inbuf[self.inpos..];
            if avail.len() < 4 {
                break;
            }
            let len = u32::from_be_bytes(avail[..4].try_into().expect("4")) as usize;
            if !(16..=MAX_RECORD).contains(&len) {
                return Err(SessionError::BadLength(len));
            }
            if avail.len() < 4 + len {
                break;
            }
            let seq = u64::from_be_bytes(avail[4..12].try_into().expect("8"));
            let ack = u64::from_be_bytes(avail[12..20].try_into().expect("8"));
            // Parsed whole before any of it is applied: a record that is
            // not valid leaves no trace and is not counted as received.
            let msgs = parse_body(&avail[20..4 + len])?;
            self.on_ack(ack)?;
            if seq != 0 {
                if seq <= self.received {
                    self.inpos += 4 + len;
                    self.stats.duplicates += 1;
                    // The peer sends it again because it has not heard our
                    // ack (lost with a connection, or the peer resumed from
                    // an older count): ack again at the next chance, or its
                    // replay buffer would keep the record for good.
                    self.ack_sent = self.ack_sent.min(seq - 1);
                    self.unacked_in = self.unacked_in.max(self.cfg.ack_every);
                    continue;
                }
                if seq != self.received + 1 {
                    return Err(SessionError::Gap {
                        want: self.received + 1,
                        got: seq,
                    });
                }
            }
            self.inpos += 4 + len;
            self.apply(msgs);
            if seq != 0 {
                self.received = seq;
                self.unacked_in += len - 16;
                self.stats.records_received += 1;
            }
        }
        if self.inpos == self.inbuf.len() {
            self.inbuf.clear();
            self.inpos = 0;
        }
        Ok(())
    }

    fn on_ack(&mut self, ack: u64) -> Result<(), SessionError> {
        if ack >= self.next_seq {
            return Err(SessionError::BadAck(ack));
        }
        while let Some((seq, body)) = self.replay.front() {
            if *seq > ack {
                break;
            }
            self.replay_bytes -= body.len;
            self.replay.pop_front();
        }
        Ok(())
    }

    /// Applies one record's messages; whatever fails here fails one flow.
    fn apply(&mut self, msgs: Vec<Msg>) {
        let mut budget = MAX_RECORD_PLAIN;
        for m in msgs {
            let m = match m {
                Msg::DataZ { flow, reset, bytes } => {
                    if self.dead.contains(&flow) {
                        self.stats.skipped += 1;
                        continue;
                    }
                    let Some(plain) = self.decompress(flow, reset, &bytes, budget) else {
                        self.flow_failed(flow);
                        continue;
                    };
                    budget -= plain.len();
                    self.count_in(flow, plain.len(), bytes.len());
                    Msg::Data { flow, bytes: plain }
                }
                Msg::Data { flow, bytes } => {
                    if self.dead.contains(&flow) {
                        self.stats.skipped += 1;
                        continue;
                    }
                    self.count_in(flow, bytes.len(), bytes.len());
                    Msg::Data { flow, bytes }
                }
                Msg::ZEnd { flow } => {
                    self.dec.remove(&flow);
                    continue;
                }
                Msg::Window { flow, .. }
                | Msg::Fin { flow }
                | Msg::Datagram { flow, .. }
                | Msg::OpenOk { flow }
                | Msg::OpenErr { flow, .. }
                    if self.dead.contains(&flow) =>
                {
                    self.stats.skipped += 1;
                    continue;
                }
                Msg::Fin { flow } => {
                    self.dec.remove(&flow);
                    Msg::Fin { flow }
                }
                Msg::Reset { flow } => {
                    if !self.dead.contains(&flow) {
                        self.forget_flow(flow);
                        self.mark_dead(flow);
                    }
                    Msg::Reset { flow }
                }
                m @ (Msg::Open { flow, .. } | Msg::OpenUdp { flow, .. }) => {
                    self.dead.remove(&flow);
                    m
                }
                m => m,
            };
            self.inbox.push_back(m);
        }
    }

    /// The peer's compressed data for `flow` cannot be used: the flow is
    /// reset both ways, the link goes on.
    fn flow_failed(&mut self, flow: FlowId) {
        self.stats.flow_errors += 1;
        self.forget_flow(flow);
        self.mark_dead(flow);
        self.inbox.push_back(Msg::Reset { flow });
        self.emit(Msg::Reset { flow }, 0);
    }

    /// The next message from the peer; unpacks the next record when the
    /// last one is used up. Errors mean the peer broke the protocol: drop
    /// the connection (the record is not counted as received).
    pub fn poll_msg(&mut self) -> Result<Option<Msg>, SessionError> {
        if self.inbox.is_empty() {
            self.process()?;
        }
        Ok(self.inbox.pop_front())
    }

    /// The transport broke: what was on its way is lost (the replay buffer
    /// still has it) and a half-received record is dropped.
    pub fn connection_lost(&mut self) {
        self.out.clear();
        self.inbuf.clear();
        self.inpos = 0;
    }

    /// On a new connection, after the peer said it processed `peer_received`:
    /// drops what it has, and queues the rest of the replay buffer again.
    pub fn resume(&mut self, peer_received: u64) -> Result<(), SessionError> {
        self.on_ack(peer_received)?;
        let have = self
            .replay
            .front()
            .map_or(self.next_seq - 1, |(s, _)| s - 1);
        if peer_received < have {
            return Err(SessionError::CannotResume {
                peer: peer_received,
                have,
            });
        }
        let records: Vec<(u64, Arc<Body>)> = self.replay.iter().cloned().collect();
        for (seq, body) in records {
            self.put_record(seq, &body);
            self.stats.records_retransmitted += 1;
        }
        self.stats.resumes += 1;
        Ok(())
    }

    /// Frees compression contexts of flows idle since before `now - IDLE`.
    pub fn sweep_idle(&mut self, now: Instant) {
        let idle: Vec<FlowId> = self
            .enc
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_used) >= IDLE)
            .map(|(f, _)| *f)
            .collect();
        for f in idle {
            self.drop_enc(f);
        }
    }

    /// Frees `flow`'s compressor and tells the receiver to free its
    /// decompressor ([`Msg::ZEnd`]); the next compressed data starts anew.
    fn drop_enc(&mut self, flow: FlowId) {
        if self.enc.remove(&flow).is_some() {
            self.enc_reset.insert(flow, true);
            self.emit(Msg::ZEnd { flow }, 0);
        }
    }

    /// Forgets everything about `flow` (it ended both ways).
    pub fn forget_flow(&mut self, flow: FlowId) {
        self.enc.remove(&flow);
        self.dec.remove(&flow);
        self.enc_reset.remove(&flow);
        self.flow_mode.remove(&flow);
        self.flow_stats.remove(&flow);
    }

    /// Compresses `bytes` of `flow`: a `DataZ` goes straight into the record
    /// (None), data sent raw comes back as `Data`.
    fn compress(&mut self, flow: FlowId, bytes: Vec<u8>, now: Instant) -> Option<Msg> {
        let mode = *self.flow_mode.get(&flow).unwrap_or(&self.cfg.compression);
        let st = self.flow_stats.entry(flow).or_default();
        st.bytes_out += bytes.len() as u64;
        self.stats.data_bytes_out += bytes.len() as u64;
        let level = match mode {
            Compression::Off => None,
            // Too small to shrink (a zstd block header alone is 3 bytes),
            // and a context made for it would be dropped again at once:
            // a request's few bytes go raw, at no CPU cost. Not fed to the
            // stream either, so the peer's copy stays the same.
            Compression::Auto if bytes.len() < MIN_COMPRESS => None,
            Compression::Auto if looks_incompressible(&bytes) => None,
            Compression::Auto => Some(Compression::DEFAULT_LEVEL),
            Compression::Level(l) => Some(l),
        };
        let compressed = level.and_then(|level| {
            if !self.enc.contains_key(&flow) {
                if self.enc.len() >= MAX_CONTEXTS {
                    return None;
                }
                let mut ctx = ZEnc::new(level).ok()?;
                ctx.set_parameter(CParameter::WindowLog(WINDOW_LOG)).ok()?;
                self.enc.insert(
                    flow,
                    Enc {
                        ctx,
                        last_used: now,
                    },
                );
                self.enc_reset.insert(flow, true);
            }
            let e = self.enc.get_mut(&flow)?;
            e.last_used = now;
            match zcompress(&mut e.ctx, &bytes) {
                Some(z) => Some(z),
                None => {
                    // The context is in an unknown state: start afresh.
                    self.drop_enc(flow);
                    None
                }
            }
        });
        let msg = match compressed {
            Some(z) if z.len() < bytes.len() => {
                let reset = self.enc_reset.insert(flow, false).unwrap_or(true);
                self.count_wire_out(flow, z.len());
                let msg = Msg::DataZ {
                    flow,
                    reset,
                    bytes: z,
                };
                // Emitted here: the receiver's inflation budget counts it.
                self.emit(msg, bytes.len());
                return None;
            }
            Some(_) => {
                // Grew: send raw, and the stream the peer knows is now
                // missing these bytes, so the next compressed one restarts.
                self.drop_enc(flow);
                Msg::Data { flow, bytes }
            }
            None => Msg::Data { flow, bytes },
        };
        if let Msg::Data { bytes, .. } = &msg {
            self.count_wire_out(flow, bytes.len());
        }
        Some(msg)
    }

    /// Received payload of `flow`: `plain` bytes, `wire` on the wire.
    fn count_in(&mut self, flow: FlowId, plain: usize, wire: usize) {
        let st = self.flow_stats.entry(flow).or_default();
        st.bytes_in += plain as u64;
        st.wire_in += wire as u64;
        self.stats.data_bytes_in += plain as u64;
        self.stats.data_wire_bytes_in += wire as u64;
    }

    /// Payload of `flow` sent: `wire` bytes on the wire.
    fn count_wire_out(&mut self, flow: FlowId, wire: usize) {
        self.flow_stats.entry(flow).or_default().wire_out += wire as u64;
        self.stats.data_wire_bytes_out += wire as u64;
    }

    /// Inflates one `DataZ` of `flow` to at most `budget` (and
    /// [`MAX_DATA`]) bytes; None if it cannot be used (the flow fails).
    fn decompress(
        &mut self,
        flow: FlowId,
        reset: bool,
        z: &[u8],
        budget: usize,
    ) -> Option<Vec<u8>> {
        if reset {
            self.dec.remove(&flow);
        }
        if !self.dec.contains_key(&flow) {
            // A stream that never started, or one context too many: the
            // peer broke the one rule both ends follow.
            if self.dec.len() >= MAX_CONTEXTS || !reset {
                return None;
            }
            let mut d = ZDec::new().ok()?;
            d.set_parameter(DParameter::WindowLogMax(WINDOW_LOG)).ok()?;
            self.dec.insert(flow, d);
        }
        let limit = budget.min(MAX_DATA);
        let d = self.dec.get_mut(&flow).expect("inserted");
        if self.zscratch.len() < MAX_DATA + 1 {
            self.zscratch.resize(MAX_DATA + 1, 0);
        }
        let mut inb = InBuffer::around(z);
        let mut outb = OutBuffer::around(&mut self.zscratch[..limit + 1]);
        let mut ok = true;
        while ok && inb.pos() < z.len() {
            let before = (inb.pos(), outb.pos());
            ok = d.run(&mut inb, &mut outb).is_ok()
                && outb.pos() <= limit
                && (inb.pos(), outb.pos()) != before;
        }
        // Drain what the decoder still holds for this input.
        while ok {
            let before = outb.pos();
            ok = d.run(&mut InBuffer::around(&[]), &mut outb).is_ok() && outb.pos() <= limit;
            if outb.pos() == before {
                break;
            }
        }
        let n = outb.pos();
        if !ok {
            self.dec.remove(&flow);
            return None;
        }
        Some(self.zscratch[..n].to_vec())
    }
}

/// Payloads at least this long stay in the `Vec` they came in, as a piece
/// of their record of their own (no copy before TLS); shorter ones are
/// packed with the frame heads around them.
const BULK_MIN: usize = 512;

/// A record body as the pieces it was built from: frame heads and small
/// payloads packed together, bulk payloads in the buffers they arrived in.
/// Shared (`Arc`) between the replay buffer and the output.
#[derive(Default)]
struct Body {
    parts: Vec<Vec<u8>>,
    /// Whether the last piece is a packed one (small bytes may join it).
    packing: bool,
    len: usize,
}

impl Body {
    /// Appends small bytes to the packed piece at the end.
    fn pack(&mut self, bytes: &[u8]) {
        if !self.packing {
            self.parts.push(Vec::with_capacity(256));
            self.packing = true;
        }
        self.parts
            .last_mut()
            .expect("pushed")
            .extend_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Appends a payload: kept as its own piece if it is big and its
    /// buffer not mostly empty (the replay limit counts lengths, so a
    /// small payload in a big buffer must not be kept), else packed.
    fn push_bulk(&mut self, bytes: Vec<u8>) {
        if bytes.len() >= BULK_MIN && bytes.capacity() <= 2 * bytes.len() {
            self.len += bytes.len();
            self.parts.push(bytes);
            self.packing = false;
        } else {
            self.pack(&bytes);
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why the output is pieces: record headers and control records in
/// small buffers, record bodies shared with the replay buffer.
enum OutPart {
    Bytes(Vec<u8>),
    Body(Arc<Body>),
}

/// What a session has for the transport, as the pieces it is held in:
/// written with one vectored write, never concatenated on the way.
pub struct Output {
    parts: Vec<OutPart>,
}

impl Output {
    /// The pieces in order, for a vectored write.
    pub fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut v = Vec::with_capacity(self.parts.len() * 2);
        for p in &self.parts {
            match p {
                OutPart::Bytes(b) => v.push(IoSlice::new(b)),
                OutPart::Body(body) => v.extend(body.parts.iter().map(|b| IoSlice::new(b))),
            }
        }
        v
    }

    /// The pieces concatenated (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        self.slices()
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect()
    }
}

/// The messages of one record body, or why it is not valid.
fn parse_body(body: &[u8]) -> Result<Vec<Msg>, SessionError> {
    Ok(parse_frames(body)?)
}

/// Compresses `data` as one flushed piece of the flow's stream.
fn zcompress(ctx: &mut ZEnc<'static>, data: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; zstd::zstd_safe::compress_bound(data.len()) + 64];
    let mut inb = InBuffer::around(data);
    let mut outb = OutBuffer::around(&mut out[..]);
    while inb.pos() < data.len() {
        ctx.run(&mut inb, &mut outb).ok()?;
    }
    loop {
        if ctx.flush(&mut outb).ok()? == 0 {
            break;
        }
    }
    let n = outb.pos();
    out.truncate(n);
    Some(out)
}

/// Whether a sample of `data` has near-random byte statistics (already
/// compressed or encrypted), so compressing it would cost CPU for nothing.
pub fn looks_incompressible(data: &[u8]) -> bool {
    let sample = &data[..data.len().min(4096)];
    if sample.len() < 256 {
        return false;
    }
    let mut hist = [0u32; 256];
    for b in sample {
        hist[*b as usize] += 1;
    }
    let n = sample.len() as f64;
    let entropy: f64 = hist
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum();
    // A uniform sample of 4096 bytes measures about 7.95 bits per byte.
    entropy > 7.5 * (n.log2() / 12.0).clamp(0.66, 1.0)
}

#[cfg(test)]
mod tests;
