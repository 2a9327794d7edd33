//! Tunnel messages on the wire: a sans-IO codec.
//!
//! Every message is one frame:
//!
//! ```text
//!  0      4      5
//!  +------+------+----------------------+
//!  | len  | kind | body (len - 1 bytes) |
//!  +------+------+----------------------+
//!  len: u32 big-endian, counts kind + body, 1..=MAX_FRAME_LEN
//! ```
//!
//! Integers are big-endian, strings are a u8 length then UTF-8 bytes.
//! [`Decoder`] takes the byte stream in arbitrary pieces and yields whole
//! messages; it never buffers more than one frame beyond what it was fed,
//! and rejects a length above [`MAX_FRAME_LEN`] before reading the body.

use std::fmt;

/// Protocol version carried in [`Msg::Hello`]; bumped on incompatible change.
pub const VERSION: u16 = 3;
/// Upper bound of `len`, so that a hostile peer cannot make us buffer more.
pub const MAX_FRAME_LEN: usize = 256 * 1024;
/// Largest data payload one [`Msg::Data`] carries (fits in a frame).
pub const MAX_DATA: usize = 64 * 1024;
/// Bytes the agent may send the host on a new flow before the host grants
/// more (the host buffers them until the guest reads).
pub const HOST_WINDOW: u32 = 256 * 1024;
/// Bytes the host may send the agent on a new flow before the agent grants
/// more: large enough to fill a 100 Mbit/s link with an 80 ms round trip,
/// as a print job from the VM should.
pub const AGENT_WINDOW: u32 = 1024 * 1024;

/// Identifies a flow for the lifetime of one session; chosen by the host.
pub type FlowId = u32;
/// Identifies an exported resource; chosen by the agent.
pub type ResourceId = u32;

/// Transport protocol of an exported port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// A TCP port.
    Tcp,
    /// A UDP port.
    Udp,
}

/// Why the agent could not open a flow, so the engine can answer the guest
/// the way the real network would have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// The target refused the connection (guest sees RST).
    Refused,
    /// The target is unreachable (guest sees RST or ICMP unreachable).
    Unreachable,
    /// The export policy does not allow this resource and port.
    NotExported,
    /// The target did not answer in time.
    TimedOut,
    /// Any other local failure on the agent.
    Other,
}

/// One message of the tunnel protocol.
#[derive(Clone, PartialEq, Eq)]
pub enum Msg {
    /// First message each way: protocol version and a free-form peer name.
    Hello {
        /// Protocol version ([`VERSION`]).
        version: u16,
        /// Peer name for logs.
        name: String,
    },
    /// Agent → host: a resource the agent exports.
    Export {
        /// The agent's id for this resource.
        id: ResourceId,
        /// User-given name; the vIP derives from it.
        name: String,
        /// The real address as the user gave it, for display.
        target: String,
        /// Ports the export policy allows.
        ports: Vec<(u16, Proto)>,
        /// Found on the client's LAN (`--discover`), not named by the
        /// user: `map list` says so.
        discovered: bool,
        /// What identifies the resource (its client network and the
        /// device), whatever it is called: the host keeps its vIP by it.
        key: String,
    },
    /// Host → agent: the guest wants a connection to `resource:port`.
    Open {
        /// New flow id.
        flow: FlowId,
        /// Resource to connect to.
        resource: ResourceId,
        /// Destination port.
        port: u16,
    },
    /// Agent → host: the real connection is up.
    OpenOk {
        /// The flow.
        flow: FlowId,
    },
    /// Agent → host: the real connection failed.
    OpenErr {
        /// The flow.
        flow: FlowId,
        /// Why.
        reason: OpenError,
    },
    /// Payload bytes of a flow, in order.
    Data {
        /// The flow.
        flow: FlowId,
        /// At most [`MAX_DATA`] bytes.
        bytes: Vec<u8>,
    },
    /// The receiver delivered `credit` more bytes; the sender may send them.
    Window {
        /// The flow.
        flow: FlowId,
        /// Extra bytes allowed.
        credit: u32,
    },
    /// The sender will send no more data on this flow (half-close).
    Fin {
        /// The flow.
        flow: FlowId,
    },
    /// The flow is aborted; both sides forget it.
    Reset {
        /// The flow.
        flow: FlowId,
    },
    /// Payload bytes of a flow, compressed with the flow's own zstd stream.
    DataZ {
        /// The flow.
        flow: FlowId,
        /// The sender started a new compression stream with this message.
        reset: bool,
        /// One flushed zstd block sequence; decompresses to at most [`MAX_DATA`].
        bytes: Vec<u8>,
    },
    /// Agent → host, first on a connection: resume `session` (0: a new one).
    Resume {
        /// Session id from an earlier [`Msg::Welcome`], or 0.
        session: u64,
        /// Highest record sequence number the agent has processed.
        received: u64,
    },
    /// Host → agent: the session this connection carries.
    Welcome {
        /// Session id to quote in a later [`Msg::Resume`].
        session: u64,
        /// Highest record sequence number the host has processed.
        received: u64,
        /// Whether the earlier session continues (else everything restarts).
        resumed: bool,
    },
    /// Liveness probe; answered with [`Msg::Pong`].
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to [`Msg::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Host → agent: the connection is refused, and why (then it closes).
    Refused {
        /// For the agent's log.
        reason: String,
    },
    /// Host → agent: not now (its VM is not attached, the host is
    /// busy), and why; the agent tries again later, unlike [`Msg::Refused`].
    /// Then the connection closes.
    Later {
        /// For the agent's log.
        reason: String,
    },
    /// Agent → host: the secret half of a pairing code.
    Pair {
        /// The code's secret bytes.
        secret: Vec<u8>,
    },
    /// Host → agent: the guest sends UDP to `resource:port`; answered like
    /// [`Msg::Open`] (OpenOk / OpenErr), then datagrams flow.
    OpenUdp {
        /// New flow.
        flow: FlowId,
        /// Resource to talk to.
        resource: ResourceId,
        /// Destination UDP port.
        port: u16,
    },
    /// One UDP datagram of a flow (no credits: datagrams may be dropped).
    Datagram {
        /// The flow.
        flow: FlowId,
        /// The payload, at most [`MAX_DATA`] bytes.
        bytes: Vec<u8>,
    },
    /// Host → agent: the guest pings `resource`; the agent pings the real one.
    Echo {
        /// Matches the answer to the question.
        token: u32,
        /// Resource to ping.
        resource: ResourceId,
        /// Payload size of the guest's echo request.
        size: u16,
    },
    /// Agent → host: the real resource answered the echo (or not).
    EchoReply {
        /// The echo's token.
        token: u32,
        /// Whether a reply came in time.
        ok: bool,
    },
    /// The sender freed `flow`'s compression stream (idle, or it had to
    /// start afresh): the receiver frees its decompressor too, so both ends
    /// always hold the same set of contexts and neither can exceed the limit.
    ZEnd {
        /// The flow.
        flow: FlowId,
    },
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::Hello { version, name } => write!(f, "Hello(v{version}, {name:?})"),
            Msg::Export {
                id,
                name,
                target,
                ports,
                discovered,
                key,
            } => write!(
                f,
                "Export({id}, {name:?}, {target:?}, {ports:?}, key {key:?}{})",
                if *discovered { ", discovered" } else { "" }
            ),
            Msg::Open {
                flow,
                resource,
                port,
            } => write!(f, "Open(flow {flow}, res {resource}, port {port})"),
            Msg::OpenOk { flow } => write!(f, "OpenOk({flow})"),
            Msg::OpenErr { flow, reason } => write!(f, "OpenErr({flow}, {reason:?})"),
            Msg::Data { flow, bytes } => write!(f, "Data({flow}, {} bytes)", bytes.len()),
            Msg::Window { flow, credit } => write!(f, "Window({flow}, +{credit})"),
            Msg::Fin { flow } => write!(f, "Fin({flow})"),
            Msg::Reset { flow } => write!(f, "Reset({flow})"),
            Msg::DataZ { flow, reset, bytes } => {
                write!(f, "DataZ({flow}, reset {reset}, {} bytes)", bytes.len())
            }
            Msg::Resume { session, received } => write!(f, "Resume({session:#x}, rx {received})"),
            Msg::Welcome {
                session,
                received,
                resumed,
            } => write!(f, "Welcome({session:#x}, rx {received}, resumed {resumed})"),
            Msg::Ping { nonce } => write!(f, "Ping({nonce})"),
            Msg::Pong { nonce } => write!(f, "Pong({nonce})"),
            Msg::Refused { reason } => write!(f, "Refused({reason:?})"),
            Msg::Later { reason } => write!(f, "Later({reason:?})"),
            Msg::Pair { .. } => write!(f, "Pair(..)"),
            Msg::OpenUdp {
                flow,
                resource,
                port,
            } => write!(f, "OpenUdp(flow {flow}, res {resource}, port {port})"),
            Msg::Datagram { flow, bytes } => write!(f, "Datagram({flow}, {} bytes)", bytes.len()),
            Msg::Echo {
                token,
                resource,
                size,
            } => write!(f, "Echo({token}, res {resource}, {size} bytes)"),
            Msg::EchoReply { token, ok } => write!(f, "EchoReply({token}, ok {ok})"),
            Msg::ZEnd { flow } => write!(f, "ZEnd({flow})"),
        }
    }
}

/// Why bytes from the peer are not a valid message stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame announced a length of zero or above [`MAX_FRAME_LEN`].
    #[error("frame length {0} out of range 1..={MAX_FRAME_LEN}")]
    BadLength(usize),
    /// The message kind byte is not one we know.
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    /// The body ended before its fields did.
    #[error("message kind {0:#04x} truncated")]
    Truncated(u8),
    /// The body has bytes after its last field.
    #[error("message kind {0:#04x} has {1} trailing bytes")]
    Trailing(u8, usize),
    /// A field holds a value outside its range.
    #[error("message kind {0:#04x}: invalid field {1}")]
    BadField(u8, &'static str),
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const EXPORT: u8 = 0x02;
    pub const OPEN: u8 = 0x03;
    pub const OPEN_OK: u8 = 0x04;
    pub const OPEN_ERR: u8 = 0x05;
    pub const DATA: u8 = 0x06;
    pub const WINDOW: u8 = 0x07;
    pub const FIN: u8 = 0x08;
    pub const RESET: u8 = 0x09;
    pub const DATA_Z: u8 = 0x0a;
    pub const RESUME: u8 = 0x0b;
    pub const WELCOME: u8 = 0x0c;
    pub const PING: u8 = 0x0d;
    pub const PONG: u8 = 0x0e;
    pub const REFUSED: u8 = 0x0f;
    pub const PAIR: u8 = 0x10;
    pub const OPEN_UDP: u8 = 0x11;
    pub const DATAGRAM: u8 = 0x12;
    pub const ECHO: u8 = 0x13;
    pub const ECHO_REPLY: u8 = 0x14;
    pub const Z_END: u8 = 0x15;
    pub const LATER: u8 = 0x16;
}

const HEADER_LEN: usize = 4;

impl OpenError {
    fn to_u8(self) -> u8 {
        match self {
            OpenError::Refused => 1,
            OpenError::Unreachable => 2,
            OpenError::NotExported => 3,
            OpenError::TimedOut => 4,
            OpenError::Other => 5,
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => OpenError::Refused,
            2 => OpenError::Unreachable,
            3 => OpenError::NotExported,
            4 => OpenError::TimedOut,
            5 => OpenError::Other,
            _ => return None,
        })
    }
}

impl Msg {
    fn kind(&self) -> u8 {
        match self {
            Msg::Hello { .. } => kind::HELLO,
            Msg::Export { .. } => kind::EXPORT,
            Msg::Open { .. } => kind::OPEN,
            Msg::OpenOk { .. } => kind::OPEN_OK,
            Msg::OpenErr { .. } => kind::OPEN_ERR,
            Msg::Data { .. } => kind::DATA,
            Msg::Window { .. } => kind::WINDOW,
            Msg::Fin { .. } => kind::FIN,
            Msg::Reset { .. } => kind::RESET,
            Msg::DataZ { .. } => kind::DATA_Z,
            Msg::Resume { .. } => kind::RESUME,
            Msg::Welcome { .. } => kind::WELCOME,
            Msg::Ping { .. } => kind::PING,
            Msg::Pong { .. } => kind::PONG,
            Msg::Refused { .. } => kind::REFUSED,
            Msg::Later { .. } => kind::LATER,
            Msg::Pair { .. } => kind::PAIR,
            Msg::OpenUdp { .. } => kind::OPEN_UDP,
            Msg::Datagram { .. } => kind::DATAGRAM,
            Msg::Echo { .. } => kind::ECHO,
            Msg::EchoReply { .. } => kind::ECHO_REPLY,
            Msg::ZEnd { .. } => kind::Z_END,
        }
    }

    /// Appends this message as one frame to `out`.
    ///
    /// Strings longer than 255 bytes and data longer than [`MAX_DATA`] are
    /// the caller's bug; they are cut to fit rather than corrupting the
    /// stream.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let bulk = self.emit_head(out);
        out.extend_from_slice(bulk);
    }

    /// Like [`Msg::emit`], but a payload-carrying message's payload is not
    /// written: it is handed back as a `Vec` for the caller to send from
    /// where it already is (the frame's length counts it). The record path
    /// uses this to keep a byte from being copied on its way to TLS.
    pub fn emit_split(self, out: &mut Vec<u8>) -> Option<Vec<u8>> {
        let n = self.emit_head(out).len();
        match self {
            Msg::Data { mut bytes, .. }
            | Msg::DataZ { mut bytes, .. }
            | Msg::Datagram { mut bytes, .. } => {
                bytes.truncate(n);
                Some(bytes)
            }
            _ => None,
        }
    }

    /// Writes the frame but for its bulk payload, which it returns (empty
    /// for messages without one); the length prefix counts the payload.
    fn emit_head(&self, out: &mut Vec<u8>) -> &[u8] {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        out.push(self.kind());
        let mut bulk: &[u8] = &[];
        match self {
            Msg::Hello { version, name } => {
                out.extend_from_slice(&version.to_be_bytes());
                put_str(out, name);
            }
            Msg::Export {
                id,
                name,
                target,
                ports,
                discovered,
                key,
            } => {
                out.extend_from_slice(&id.to_be_bytes());
                put_str(out, name);
                put_str(out, target);
                let ports = &ports[..ports.len().min(255)];
                out.push(ports.len() as u8);
                for (port, proto) in ports {
                    out.extend_from_slice(&port.to_be_bytes());
                    out.push(match proto {
                        Proto::Tcp => 6,
                        Proto::Udp => 17,
                    });
                }
                out.push(u8::from(*discovered));
                put_str(out, key);
            }
            Msg::Open {
                flow,
                resource,
                port,
            } => {
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(&resource.to_be_bytes());
                out.extend_from_slice(&port.to_be_bytes());
            }
            Msg::OpenOk { flow } | Msg::Fin { flow } | Msg::Reset { flow } | Msg::ZEnd { flow } => {
                out.extend_from_slice(&flow.to_be_bytes());
            }
            Msg::OpenErr { flow, reason } => {
                out.extend_from_slice(&flow.to_be_bytes());
                out.push(reason.to_u8());
            }
            Msg::Data { flow, bytes } => {
                out.extend_from_slice(&flow.to_be_bytes());
                bulk = &bytes[..bytes.len().min(MAX_DATA)];
            }
            Msg::Window { flow, credit } => {
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(&credit.to_be_bytes());
            }
            Msg::DataZ { flow, reset, bytes } => {
                out.extend_from_slice(&flow.to_be_bytes());
                out.push(u8::from(*reset));
                bulk = &bytes[..bytes.len().min(MAX_FRAME_LEN - 6)];
            }
            Msg::Resume { session, received } => {
                out.extend_from_slice(&session.to_be_bytes());
                out.extend_from_slice(&received.to_be_bytes());
            }
            Msg::Welcome {
                session,
                received,
                resumed,
            } => {
                out.extend_from_slice(&session.to_be_bytes());
                out.extend_from_slice(&received.to_be_bytes());
                out.push(u8::from(*resumed));
            }
            Msg::Ping { nonce } | Msg::Pong { nonce } => {
                out.extend_from_slice(&nonce.to_be_bytes())
            }
            Msg::Refused { reason } | Msg::Later { reason } => put_str(out, reason),
            Msg::Pair { secret } => {
                let n = secret.len().min(255);
                out.push(n as u8);
                out.extend_from_slice(&secret[..n]);
            }
            Msg::OpenUdp {
                flow,
                resource,
                port,
            } => {
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(&resource.to_be_bytes());
                out.extend_from_slice(&port.to_be_bytes());
            }
            Msg::Datagram { flow, bytes } => {
                out.extend_from_slice(&flow.to_be_bytes());
                bulk = &bytes[..bytes.len().min(MAX_DATA)];
            }
            Msg::Echo {
                token,
                resource,
                size,
            } => {
                out.extend_from_slice(&token.to_be_bytes());
                out.extend_from_slice(&resource.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
            }
            Msg::EchoReply { token, ok } => {
                out.extend_from_slice(&token.to_be_bytes());
                out.push(u8::from(*ok));
            }
        }
        let len = (out.len() - start - HEADER_LEN + bulk.len()) as u32;
        out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        bulk
    }

    /// Parses one frame body (kind byte first), as found after the length.
    pub fn parse(body: &[u8]) -> Result<Msg, WireError> {
        let (&k, rest) = body.split_first().ok_or(WireError::BadLength(0))?;
        let mut r = Reader { buf: rest, kind: k };
        let msg = match k {
            kind::HELLO => Msg::Hello {
                version: r.u16()?,
                name: r.str()?,
            },
            kind::EXPORT => {
                let id = r.u32()?;
                let name = r.str()?;
                let target = r.str()?;
                let n = r.u8()?;
                let mut ports = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let port = r.u16()?;
                    let proto = match r.u8()? {
                        6 => Proto::Tcp,
                        17 => Proto::Udp,
                        _ => return Err(WireError::BadField(k, "proto")),
                    };
                    ports.push((port, proto));
                }
                let discovered = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::BadField(k, "discovered")),
                };
                let key = r.str()?;
                Msg::Export {
                    id,
                    name,
                    target,
                    ports,
                    discovered,
                    key,
                }
            }
            kind::OPEN => Msg::Open {
                flow: r.u32()?,
                resource: r.u32()?,
                port: r.u16()?,
            },
            kind::OPEN_OK => Msg::OpenOk { flow: r.u32()? },
            kind::OPEN_ERR => Msg::OpenErr {
                flow: r.u32()?,
                reason: OpenError::from_u8(r.u8()?).ok_or(WireError::BadField(k, "reason"))?,
            },
            kind::DATA => {
                let flow = r.u32()?;
                let bytes = r.rest();
                if bytes.is_empty() || bytes.len() > MAX_DATA {
                    return Err(WireError::BadField(k, "data length"));
                }
                Msg::Data {
                    flow,
                    bytes: bytes.to_vec(),
                }
            }
            kind::WINDOW => Msg::Window {
                flow: r.u32()?,
                credit: r.u32()?,
            },
            kind::FIN => Msg::Fin { flow: r.u32()? },
            kind::RESET => Msg::Reset { flow: r.u32()? },
            kind::Z_END => Msg::ZEnd { flow: r.u32()? },
            kind::DATA_Z => {
                let flow = r.u32()?;
                let reset = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::BadField(k, "reset flag")),
                };
                let bytes = r.rest();
                if bytes.is_empty() {
                    return Err(WireError::BadField(k, "data length"));
                }
                Msg::DataZ {
                    flow,
                    reset,
                    bytes: bytes.to_vec(),
                }
            }
            kind::RESUME => Msg::Resume {
                session: r.u64()?,
                received: r.u64()?,
            },
            kind::WELCOME => Msg::Welcome {
                session: r.u64()?,
                received: r.u64()?,
                resumed: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::BadField(k, "resumed flag")),
                },
            },
            kind::PING => Msg::Ping { nonce: r.u64()? },
            kind::PONG => Msg::Pong { nonce: r.u64()? },
            kind::REFUSED => Msg::Refused { reason: r.str()? },
            kind::LATER => Msg::Later { reason: r.str()? },
            kind::OPEN_UDP => Msg::OpenUdp {
                flow: r.u32()?,
                resource: r.u32()?,
                port: r.u16()?,
            },
            kind::DATAGRAM => {
                let flow = r.u32()?;
                let bytes = r.rest();
                if bytes.len() > MAX_DATA {
                    return Err(WireError::BadField(k, "datagram length"));
                }
                Msg::Datagram {
                    flow,
                    bytes: bytes.to_vec(),
                }
            }
            kind::ECHO => Msg::Echo {
                token: r.u32()?,
                resource: r.u32()?,
                size: r.u16()?,
            },
            kind::ECHO_REPLY => Msg::EchoReply {
                token: r.u32()?,
                ok: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::BadField(k, "ok flag")),
                },
            },
            kind::PAIR => {
                let n = r.u8()? as usize;
                Msg::Pair {
                    secret: r.take(n)?.to_vec(),
                }
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        if !r.buf.is_empty() {
            return Err(WireError::Trailing(k, r.buf.len()));
        }
        Ok(msg)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len().min(255);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.push(n as u8);
    out.extend_from_slice(&s.as_bytes()[..n]);
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: u8,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(self.kind));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::BadField(self.kind, "utf-8 string"))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// The first frame in `bytes`, as its body and the bytes it takes with
/// its length; `None` while it is incomplete. The one place a frame's
/// length is checked, for the stream [`Decoder`] and [`parse_frames`].
fn split_frame(bytes: &[u8]) -> Result<Option<(&[u8], usize)>, WireError> {
    let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*head) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(WireError::BadLength(len));
    }
    Ok(bytes
        .get(HEADER_LEN..HEADER_LEN + len)
        .map(|body| (body, HEADER_LEN + len)))
}

/// Parses a run of whole frames (a record's body) where it lies, without
/// the copy into a [`Decoder`]'s buffer; a frame cut short is an error.
pub fn parse_frames(mut bytes: &[u8]) -> Result<Vec<Msg>, WireError> {
    let mut msgs = Vec::new();
    while !bytes.is_empty() {
        let Some((body, n)) = split_frame(bytes)? else {
            return Err(WireError::BadLength(bytes.len()));
        };
        msgs.push(Msg::parse(body)?);
        bytes = &bytes[n..];
    }
    Ok(msgs)
}

/// Reassembles messages from a byte stream that arrives in arbitrary pieces.
///
/// After an error the stream is unusable (framing is lost); the caller
/// drops the connection.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    failed: bool,
}

impl Decoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes fed but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, WireError> {
        if self.failed {
            return Err(WireError::BadLength(0));
        }
        let (body, n) = match split_frame(&self.buf[self.pos..]) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                self.compact();
                return Ok(None);
            }
            Err(e) => {
                self.failed = true;
                return Err(e);
            }
        };
        let res = Msg::parse(body);
        self.pos += n;
        if res.is_err() {
            self.failed = true;
        }
        res.map(Some)
    }

    /// Gives up the bytes fed but not yet returned as messages (when the
    /// stream switches to another framing).
    pub fn take_rest(&mut self) -> Vec<u8> {
        let rest = self.buf[self.pos..].to_vec();
        self.buf.clear();
        self.pos = 0;
        rest
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Hello {
                version: VERSION,
                name: "agent-1".into(),
            },
            Msg::Export {
                id: 7,
                name: "printer".into(),
                target: "10.0.0.5:9100".into(),
                ports: vec![(9100, Proto::Tcp), (161, Proto::Udp)],
                discovered: false,
                key: "gw:02:00:00:00:00:01/host:10.0.0.5".into(),
            },
            Msg::Export {
                id: 8,
                name: "laser".into(),
                target: "10.0.0.6:631/ipp".into(),
                ports: vec![(631, Proto::Tcp)],
                discovered: true,
                key: String::new(),
            },
            Msg::Open {
                flow: 1,
                resource: 7,
                port: 9100,
            },
            Msg::OpenOk { flow: 1 },
            Msg::OpenErr {
                flow: 2,
                reason: OpenError::Refused,
            },
            Msg::Data {
                flow: 1,
                bytes: b"%!PS-Adobe".to_vec(),
            },
            Msg::Window {
                flow: 1,
                credit: 65536,
            },
            Msg::Fin { flow: 1 },
            Msg::Reset { flow: 3 },
            Msg::DataZ {
                flow: 4,
                reset: true,
                bytes: vec![0x28, 0xb5, 0x2f, 0xfd],
            },
            Msg::Resume {
                session: 0xdead_beef,
                received: 42,
            },
            Msg::Welcome {
                session: 0xdead_beef,
                received: 7,
                resumed: true,
            },
            Msg::Ping { nonce: 9 },
            Msg::Pong { nonce: 9 },
            Msg::Refused {
                reason: "not paired".into(),
            },
            Msg::Later {
                reason: "VM not attached".into(),
            },
            Msg::Pair {
                secret: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            },
            Msg::OpenUdp {
                flow: 5,
                resource: 7,
                port: 161,
            },
            Msg::Datagram {
                flow: 5,
                bytes: vec![0x30, 0x26],
            },
            Msg::Echo {
                token: 3,
                resource: 7,
                size: 56,
            },
            Msg::EchoReply { token: 3, ok: true },
        ]
    }

    #[test]
    fn open_bytes_are_as_documented() {
        let mut out = Vec::new();
        Msg::Open {
            flow: 0x0102_0304,
            resource: 9,
            port: 9100,
        }
        .emit(&mut out);
        assert_eq!(
            out,
            [0, 0, 0, 11, 0x03, 1, 2, 3, 4, 0, 0, 0, 9, 0x23, 0x8c],
            "len, kind, flow, resource, port"
        );
    }

    #[test]
    fn every_sample_round_trips() {
        for m in samples() {
            let mut out = Vec::new();
            m.emit(&mut out);
            assert_eq!(Msg::parse(&out[HEADER_LEN..]).unwrap(), m);
        }
    }

    #[test]
    fn truncated_bodies_are_errors_not_panics() {
        for m in samples() {
            let mut out = Vec::new();
            m.emit(&mut out);
            let body = &out[HEADER_LEN..];
            for cut in 1..body.len() {
                let r = Msg::parse(&body[..cut]);
                // A Data body cut after the flow id is still a valid Data.
                if matches!(
                    (&m, &r),
                    (Msg::Data { .. }, Ok(Msg::Data { .. }))
                        | (Msg::DataZ { .. }, Ok(Msg::DataZ { .. }))
                        | (Msg::Datagram { .. }, Ok(Msg::Datagram { .. }))
                ) {
                    continue;
                }
                assert!(r.is_err(), "{m:?} cut at {cut} parsed as {r:?}");
            }
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_the_body() {
        let mut d = Decoder::new();
        d.feed(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes());
        assert_eq!(d.next_msg(), Err(WireError::BadLength(MAX_FRAME_LEN + 1)));
        assert!(d.next_msg().is_err(), "a failed stream stays failed");
    }

    #[test]
    fn unknown_kind_and_trailing_bytes_are_errors() {
        assert_eq!(Msg::parse(&[0x7f]), Err(WireError::UnknownKind(0x7f)));
        assert_eq!(
            Msg::parse(&[kind::FIN, 0, 0, 0, 1, 9]),
            Err(WireError::Trailing(kind::FIN, 1))
        );
        assert_eq!(
            Msg::parse(&[kind::OPEN_ERR, 0, 0, 0, 1, 99]),
            Err(WireError::BadField(kind::OPEN_ERR, "reason"))
        );
        assert_eq!(
            Msg::parse(&[kind::DATA, 0, 0, 0, 1]),
            Err(WireError::BadField(kind::DATA, "data length"))
        );
    }

    fn arb_msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (any::<u16>(), "[a-z0-9-]{0,20}")
                .prop_map(|(version, name)| Msg::Hello { version, name }),
            (
                any::<u32>(),
                "\\PC{0,30}",
                "\\PC{0,30}",
                proptest::collection::vec((any::<u16>(), any::<bool>()), 0..8),
                any::<bool>(),
                "\\PC{0,30}",
            )
                .prop_map(|(id, name, target, ports, discovered, key)| Msg::Export {
                    id,
                    name,
                    target,
                    ports: ports
                        .into_iter()
                        .map(|(p, u)| (p, if u { Proto::Udp } else { Proto::Tcp }))
                        .collect(),
                    discovered,
                    key,
                }),
            (any::<u32>(), any::<u32>(), any::<u16>()).prop_map(|(flow, resource, port)| {
                Msg::Open {
                    flow,
                    resource,
                    port,
                }
            }),
            any::<u32>().prop_map(|flow| Msg::OpenOk { flow }),
            (any::<u32>(), 1u8..=5).prop_map(|(flow, r)| Msg::OpenErr {
                flow,
                reason: OpenError::from_u8(r).unwrap()
            }),
            (
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 1..2000)
            )
                .prop_map(|(flow, bytes)| Msg::Data { flow, bytes }),
            (any::<u32>(), any::<u32>()).prop_map(|(flow, credit)| Msg::Window { flow, credit }),
            any::<u32>().prop_map(|flow| Msg::Fin { flow }),
            any::<u32>().prop_map(|flow| Msg::ZEnd { flow }),
            any::<u32>().prop_map(|flow| Msg::Reset { flow }),
            (
                any::<u32>(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 1..500)
            )
                .prop_map(|(flow, reset, bytes)| Msg::DataZ { flow, reset, bytes }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(session, received)| Msg::Resume { session, received }),
            (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(session, received, resumed)| {
                Msg::Welcome {
                    session,
                    received,
                    resumed,
                }
            }),
            any::<u64>().prop_map(|nonce| Msg::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Msg::Pong { nonce }),
            "\\PC{0,40}".prop_map(|reason| Msg::Refused { reason }),
            "\\PC{0,40}".prop_map(|reason| Msg::Later { reason }),
            proptest::collection::vec(any::<u8>(), 0..32).prop_map(|secret| Msg::Pair { secret }),
            (any::<u32>(), any::<u32>(), any::<u16>()).prop_map(|(flow, resource, port)| {
                Msg::OpenUdp {
                    flow,
                    resource,
                    port,
                }
            }),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..600))
                .prop_map(|(flow, bytes)| Msg::Datagram { flow, bytes }),
            (any::<u32>(), any::<u32>(), any::<u16>()).prop_map(|(token, resource, size)| {
                Msg::Echo {
                    token,
                    resource,
                    size,
                }
            }),
            (any::<u32>(), any::<bool>()).prop_map(|(token, ok)| Msg::EchoReply { token, ok }),
        ]
    }

    proptest! {
        /// Any sequence of messages, cut into any pieces, comes out whole and in order.
        #[test]
        fn stream_survives_arbitrary_splits(
            msgs in proptest::collection::vec(arb_msg(), 0..20),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..30),
        ) {
            let mut stream = Vec::new();
            for m in &msgs {
                m.emit(&mut stream);
            }
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for w in points.windows(2) {
                d.feed(&stream[w[0]..w[1]]);
                while let Some(m) = d.next_msg().unwrap() {
                    got.push(m);
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(d.buffered(), 0);
        }

        /// A run of whole frames parses in place to what a decoder gives;
        /// cut anywhere inside a frame, it is an error, never a panic.
        #[test]
        fn frames_parse_in_place_as_the_decoder_does(
            msgs in proptest::collection::vec(arb_msg(), 1..20),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut stream = Vec::new();
            let mut ends = vec![0];
            for m in &msgs {
                m.emit(&mut stream);
                ends.push(stream.len());
            }
            prop_assert_eq!(parse_frames(&stream).unwrap(), msgs.clone());
            let at = cut.index(stream.len());
            let got = parse_frames(&stream[..at]);
            if ends.contains(&at) {
                prop_assert_eq!(got.unwrap(), msgs[..ends.iter().position(|e| *e == at).unwrap()].to_vec());
            } else {
                prop_assert!(got.is_err());
            }
        }

        /// Garbage never panics; the decoder either waits or fails.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut d = Decoder::new();
            d.feed(&bytes);
            for _ in 0..bytes.len() + 1 {
                match d.next_msg() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
