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

use crate::wire::{Decoder, FlowId, MAX_DATA, MAX_FRAME_LEN, Msg, WireError};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};
use zstd::stream::raw::{
    CParameter, DParameter, Decoder as ZDec, Encoder as ZEnc, InBuffer, Operation, OutBuffer,
};

/// Header of a record: len, seq, ack.
pub const RECORD_HEADER: usize = 4 + 8 + 8;
/// Largest record body (seq + ack + messages).
pub const MAX_RECORD: usize = MAX_FRAME_LEN + 16;
/// Most compression contexts per direction per session.
pub const MAX_CONTEXTS: usize = 64;
/// zstd window: bounds each context's memory (about 1.2 MiB to compress at
/// level 3, 0.3 MiB to decompress).
pub const WINDOW_LOG: u32 = 17;
/// A flow that sent nothing for this long gives its context back.
pub const IDLE: Duration = Duration::from_secs(10);

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
    /// Compressed data did not decompress (or exceeded its bound).
    #[error("flow {0}: compressed data is corrupt or too large")]
    Decompress(FlowId),
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
    replay: VecDeque<(u64, Vec<u8>)>,
    replay_bytes: usize,
    building: Vec<u8>,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    inbox: VecDeque<Msg>,
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
            building: Vec::new(),
            out: Vec::new(),
            inbuf: Vec::new(),
            inbox: VecDeque::new(),
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
        self.replay_bytes + self.building.len() < self.cfg.replay_limit
    }

    /// Sets how `flow`'s data is compressed (default: the session's).
    pub fn set_flow_compression(&mut self, flow: FlowId, c: Compression) {
        self.flow_mode.insert(flow, c);
    }

    /// Queues a session message; Data is compressed on the way.
    pub fn send(&mut self, msg: Msg, now: Instant) {
        let msg = match msg {
            Msg::Data { flow, bytes } => self.compress(flow, bytes, now),
            Msg::Fin { flow } => {
                self.drop_enc(flow);
                Msg::Fin { flow }
            }
            Msg::Reset { flow } => {
                self.forget_flow(flow);
                Msg::Reset { flow }
            }
            m => m,
        };
        let before = self.building.len();
        msg.emit(&mut self.building);
        if self.building.len() > MAX_FRAME_LEN {
            // Did not fit: close the record before this message.
            let tail = self.building.split_off(before);
            self.flush();
            self.building = tail;
        }
    }

    /// Sends a connection message (Hello, Resume, Ping...) right away, in
    /// a record of its own that is never replayed.
    pub fn send_control(&mut self, msg: Msg) {
        let mut body = Vec::new();
        msg.emit(&mut body);
        self.put_record(0, &body);
    }

    /// Closes the record being built (if any): it goes out and into replay.
    pub fn flush(&mut self) {
        if self.building.is_empty() {
            return;
        }
        let body = std::mem::take(&mut self.building);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.put_record(seq, &body);
        self.stats.records_sent += 1;
        self.replay_bytes += body.len();
        self.replay.push_back((seq, body));
    }

    fn put_record(&mut self, seq: u64, body: &[u8]) {
        let len = (16 + body.len()) as u32;
        self.out.extend_from_slice(&len.to_be_bytes());
        self.out.extend_from_slice(&seq.to_be_bytes());
        self.out.extend_from_slice(&self.received.to_be_bytes());
        self.out.extend_from_slice(body);
        self.ack_sent = self.received;
        self.unacked_in = 0;
        self.stats.wire_bytes_out += (RECORD_HEADER + body.len()) as u64;
    }

    /// Sends a pure acknowledgement if the peer has not heard one for a
    /// while ([`SessionConfig::ack_every`] bytes), or if `force`.
    pub fn maybe_ack(&mut self, force: bool) {
        if self.received > self.ack_sent && (force || self.unacked_in >= self.cfg.ack_every) {
            self.put_record(0, &[]);
        }
    }

    /// Takes the bytes to write to the transport.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Whether bytes are waiting for [`Session::take_output`].
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes received from the transport; messages come out of
    /// [`Session::poll_msg`].
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.stats.wire_bytes_in += bytes.len() as u64;
        self.inbuf.extend_from_slice(bytes);
        let mut pos = 0;
        let res = loop {
            let avail = &self.inbuf[pos..];
            if avail.len() < 4 {
                break Ok(());
            }
            let len = u32::from_be_bytes(avail[..4].try_into().expect("4")) as usize;
            if !(16..=MAX_RECORD).contains(&len) {
                break Err(SessionError::BadLength(len));
            }
            if avail.len() < 4 + len {
                break Ok(());
            }
            let seq = u64::from_be_bytes(avail[4..12].try_into().expect("8"));
            let ack = u64::from_be_bytes(avail[12..20].try_into().expect("8"));
            let body = avail[20..4 + len].to_vec();
            pos += 4 + len;
            if let Err(e) = self.on_ack(ack) {
                break Err(e);
            }
            if seq == 0 {
                if let Err(e) = self.unpack(&body) {
                    break Err(e);
                }
                continue;
            }
            if seq <= self.received {
                self.stats.duplicates += 1;
                continue;
            }
            if seq != self.received + 1 {
                break Err(SessionError::Gap {
                    want: self.received + 1,
                    got: seq,
                });
            }
            self.received = seq;
            self.unacked_in += body.len();
            self.stats.records_received += 1;
            if let Err(e) = self.unpack(&body) {
                break Err(e);
            }
        };
        self.inbuf.drain(..pos);
        res
    }

    fn on_ack(&mut self, ack: u64) -> Result<(), SessionError> {
        if ack >= self.next_seq {
            return Err(SessionError::BadAck(ack));
        }
        while let Some((seq, body)) = self.replay.front() {
            if *seq > ack {
                break;
            }
            self.replay_bytes -= body.len();
            self.replay.pop_front();
        }
        Ok(())
    }

    fn unpack(&mut self, body: &[u8]) -> Result<(), SessionError> {
        let mut d = Decoder::new();
        d.feed(body);
        while let Some(m) = d.next_msg()? {
            let m = match m {
                Msg::DataZ { flow, reset, bytes } => {
                    let plain = self.decompress(flow, reset, &bytes)?;
                    let st = self.flow_stats.entry(flow).or_default();
                    st.bytes_in += plain.len() as u64;
                    st.wire_in += bytes.len() as u64;
                    self.stats.data_bytes_in += plain.len() as u64;
                    self.stats.data_wire_bytes_in += bytes.len() as u64;
                    Msg::Data { flow, bytes: plain }
                }
                Msg::Data { flow, bytes } => {
                    let st = self.flow_stats.entry(flow).or_default();
                    st.bytes_in += bytes.len() as u64;
                    st.wire_in += bytes.len() as u64;
                    self.stats.data_bytes_in += bytes.len() as u64;
                    self.stats.data_wire_bytes_in += bytes.len() as u64;
                    Msg::Data { flow, bytes }
                }
                Msg::Fin { flow } => {
                    self.dec.remove(&flow);
                    Msg::Fin { flow }
                }
                Msg::Reset { flow } => {
                    self.forget_flow(flow);
                    Msg::Reset { flow }
                }
                m => m,
            };
            self.inbox.push_back(m);
        }
        if d.buffered() != 0 {
            return Err(SessionError::Wire(WireError::BadLength(d.buffered())));
        }
        Ok(())
    }

    /// The next message from the peer.
    pub fn poll_msg(&mut self) -> Option<Msg> {
        self.inbox.pop_front()
    }

    /// The transport broke: what was on its way is lost (the replay buffer
    /// still has it) and a half-received record is dropped.
    pub fn connection_lost(&mut self) {
        self.out.clear();
        self.inbuf.clear();
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
        let records: Vec<(u64, Vec<u8>)> = self.replay.iter().cloned().collect();
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

    fn drop_enc(&mut self, flow: FlowId) {
        if self.enc.remove(&flow).is_some() {
            self.enc_reset.insert(flow, true);
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

    fn compress(&mut self, flow: FlowId, bytes: Vec<u8>, now: Instant) -> Msg {
        let mode = *self.flow_mode.get(&flow).unwrap_or(&self.cfg.compression);
        let st = self.flow_stats.entry(flow).or_default();
        st.bytes_out += bytes.len() as u64;
        self.stats.data_bytes_out += bytes.len() as u64;
        let level = match mode {
            Compression::Off => None,
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
                Msg::DataZ {
                    flow,
                    reset,
                    bytes: z,
                }
            }
            Some(_) => {
                // Grew: send raw, and the stream the peer knows is now
                // missing these bytes, so the next compressed one restarts.
                self.drop_enc(flow);
                Msg::Data { flow, bytes }
            }
            None => Msg::Data { flow, bytes },
        };
        let wire = match &msg {
            Msg::DataZ { bytes, .. } | Msg::Data { bytes, .. } => bytes.len() as u64,
            _ => 0,
        };
        let st = self.flow_stats.entry(flow).or_default();
        st.wire_out += wire;
        self.stats.data_wire_bytes_out += wire;
        msg
    }

    fn decompress(&mut self, flow: FlowId, reset: bool, z: &[u8]) -> Result<Vec<u8>, SessionError> {
        if reset {
            self.dec.remove(&flow);
        }
        if !self.dec.contains_key(&flow) {
            if self.dec.len() >= MAX_CONTEXTS || !reset {
                return Err(SessionError::Decompress(flow));
            }
            let mut d = ZDec::new().map_err(|_| SessionError::Decompress(flow))?;
            d.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))
                .map_err(|_| SessionError::Decompress(flow))?;
            self.dec.insert(flow, d);
        }
        let d = self.dec.get_mut(&flow).expect("inserted");
        let mut out = vec![0u8; MAX_DATA + 1];
        let mut inb = InBuffer::around(z);
        let mut outb = OutBuffer::around(&mut out[..]);
        while inb.pos() < z.len() {
            let before = (inb.pos(), outb.pos());
            if d.run(&mut inb, &mut outb).is_err() || outb.pos() > MAX_DATA {
                self.dec.remove(&flow);
                return Err(SessionError::Decompress(flow));
            }
            if (inb.pos(), outb.pos()) == before {
                self.dec.remove(&flow);
                return Err(SessionError::Decompress(flow));
            }
        }
        // Drain what the decoder still holds for this input.
        loop {
            let before = outb.pos();
            if d.run(&mut InBuffer::around(&[]), &mut outb).is_err() || outb.pos() > MAX_DATA {
                self.dec.remove(&flow);
                return Err(SessionError::Decompress(flow));
            }
            if outb.pos() == before {
                break;
            }
        }
        let n = outb.pos();
        out.truncate(n);
        Ok(out)
    }
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
