//! Per-flow HTTP/1.x rewriting, so that a printer which checks `Host`
//! accepts a guest that addresses it by its virtual name.
//!
//! The guest reaches a resource as, say, `laser.netredir.internal:8631`;
//! the agent connects to `192.168.1.20:8631`. IPP printers (CUPS's cupsd
//! and ippeveprinter) answer a `Host` they do not know with 400 Bad Request,
//! a DNS-rebinding defence. [`HttpRewriter`] sits on one TCP flow and
//! rewrites, in requests, the `Host` header and the IPP `uri` attributes
//! that name the guest's authority to the real one; in responses,
//! `Location`, `Content-Location` and IPP `uri` attributes that name the
//! real authority back to the guest's. Where an IPP body's length changes,
//! its framing (`Content-Length`, chunked) is fixed to match.
//!
//! It runs on the agent, not in netredird: the tunnel's flow control and
//! replay count bytes as the guest sent them, so the stream crosses the
//! tunnel unchanged; and only the agent knows how it reaches the target.
//!
//! Sans-IO: bytes in, bytes out, per direction, no buffering of documents.
//! Per direction it holds back at most one head ([`MAX_HEAD`]) and one IPP
//! message's attributes (both directions together share [`MAX_IPP_ATTRS`]),
//! so [`HttpRewriter::held`] never exceeds [`MAX_HELD`]. What passes
//! unchanged: IPPS and anything else under TLS (there is no HTTP to parse),
//! bodies that are not `application/ipp` (or all of them without `ipp`),
//! anything that does not parse or exceeds a bound (counted in
//! [`RewriteStats::unparsed`]), and the rest of a flow after
//! `101 Switching Protocols` or a successful `CONNECT`.

use std::collections::VecDeque;

/// Longer heads are not HTTP we rewrite (real ones are under 1 KiB): that direction then passes unchanged.
pub const MAX_HEAD: usize = 16 * 1024;
/// IPP attributes must end within this many body bytes to be rewritten: a printer's are a few KiB, and documents are never held.
pub const MAX_IPP_ATTRS: usize = 256 * 1024;
/// The bound on [`HttpRewriter::held`]: each direction may hold a head while both share one IPP budget.
pub const MAX_HELD: usize = 2 * MAX_HEAD + MAX_IPP_ATTRS;

/// More header lines than this is not a head we rewrite.
const MAX_HEADERS: usize = 64;
/// A chunk-size line (with extensions) longer than this is malformed framing.
const MAX_CHUNK_LINE: usize = 4096;
/// Chunked trailers longer than this are malformed framing.
const MAX_TRAILERS: usize = MAX_HEAD;
/// Requests awaiting a response beyond this: responses are no longer framed.
const MAX_PIPELINE: usize = 1024;
/// IPP value tag of a `uri` (RFC 8010 section 3.5.2).
const IPP_URI: u8 = 0x45;
/// IPP end-of-attributes delimiter tag.
const IPP_END: u8 = 0x03;
/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// What one flow's rewriting did, for the agent's counters and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RewriteStats {
    /// `Host` headers given the real authority: the rewrite the printer checks for.
    pub hosts: u64,
    /// URIs moved between the authorities (IPP `uri`, `Location`, `Content-Location`), so each side sees its own.
    pub uris: u64,
    /// Messages (or a direction's rest) passed unchanged because they did not parse or exceeded a bound: rewrites that may be missing.
    pub unparsed: u64,
}

/// One flow's HTTP rewriting, both directions in one value because responses are framed and rewritten by what their requests said.
#[derive(Debug)]
pub struct HttpRewriter {
    cx: Shared,
    req: Dir,
    resp: Dir,
}

impl HttpRewriter {
    /// `real`: the authority the agent reaches the resource at, e.g. `192.168.1.20:8631` or `[fd00::5]:631` (no rewriting if it does not parse); `ipp`: rewrite URIs in `application/ipp` bodies too.
    pub fn new(real: &str, ipp: bool) -> Self {
        let real = Authority::parse(real.as_bytes());
        Self {
            cx: Shared {
                real_text: real.as_ref().map(|a| a.text().into_bytes()),
                real,
                ipp,
                guest: None,
                methods: VecDeque::new(),
                switched: false,
                seen_request: false,
                req_lost: false,
                stats: RewriteStats::default(),
            },
            req: Dir::new(true),
            resp: Dir::new(false),
        }
    }

    /// Guest -> resource bytes; appends to `out` what can go on now, holding back (bounded) what is still undecided.
    pub fn request(&mut self, input: &[u8], out: &mut Vec<u8>) {
        // TLS (IPPS, HTTPS on the same port) is not HTTP to parse, and
        // not an error: the whole flow passes unchanged, uncounted.
        if !self.cx.seen_request && input.first() == Some(&TLS_HANDSHAKE) {
            self.cx.switched = true;
        }
        if !input.is_empty() {
            self.cx.seen_request = true;
        }
        let other = self.resp.ipp_held();
        self.req.feed(&mut self.cx, other, input, out);
    }

    /// Resource -> guest bytes; appends to `out` what can go on now, holding back (bounded) what is still undecided.
    pub fn response(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let other = self.req.ipp_held();
        self.resp.feed(&mut self.cx, other, input, out);
    }

    /// The guest closed its sending side: nothing can complete what is held any more, so it goes out as it is.
    pub fn request_end(&mut self, out: &mut Vec<u8>) {
        self.req.end(&mut self.cx, out);
    }

    /// The resource closed its sending side: what is held goes out as it is, and a body to the end of the stream is complete.
    pub fn response_end(&mut self, out: &mut Vec<u8>) {
        self.resp.end(&mut self.cx, out);
    }

    /// Bytes held back now, both directions, so the flow's memory bound ([`MAX_HELD`]) can be checked.
    pub fn held(&self) -> usize {
        self.req.buf.len() + self.resp.buf.len()
    }

    /// What this flow's rewriting did so far, for the agent's counters and logs.
    pub fn stats(&self) -> RewriteStats {
        self.cx.stats
    }
}

/// What both directions of a flow need to know.
#[derive(Debug)]
struct Shared {
    real: Option<Authority>,
    /// `real` as written into `Host`.
    real_text: Option<Vec<u8>>,
    ipp: bool,
    /// The latest `Host` the guest sent: where responses' URIs go back to.
    guest: Option<Authority>,
    /// The methods of requests still awaiting their response, oldest first.
    methods: VecDeque<Method>,
    /// 101 or a CONNECT's 2xx (or TLS from the start): no more HTTP
    /// either way.
    switched: bool,
    /// A request byte came already.
    seen_request: bool,
    /// Requests are no longer followed, so responses cannot be framed.
    req_lost: bool,
    stats: RewriteStats,
}

/// What a response needs to know of its request's method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Head,
    Connect,
    Other,
}

/// One direction of the flow.
#[derive(Debug)]
struct Dir {
    req: bool,
    st: St,
    /// Held bytes, as they came in (a head, a head and IPP attributes, or
    /// a body's first bytes).
    buf: Vec<u8>,
    /// Head-end scan: 0, after LF (1), after LF CR (2).
    lf: u8,
}

#[derive(Debug)]
enum St {
    Head,
    Body(Box<Body>),
    Pass,
}

#[derive(Debug)]
struct Body {
    framing: Framing,
    /// Some while an IPP message's attributes are being collected.
    ipp: Option<Collect>,
}

#[derive(Clone, Copy, Debug)]
enum Framing {
    /// Body bytes left.
    Length(u64),
    /// An `Expect: 100-continue` request's Content-Length body, sent on as
    /// one chunk: body bytes left.
    ToChunked(u64),
    Chunked(Chunks),
    /// To the end of the stream.
    Close,
}

#[derive(Debug)]
struct Collect {
    from: Authority,
    to: Authority,
    walk: IppWalk,
    /// Content-Length body: the head is held at the start of `buf` too.
    head: Option<HeldHead>,
    /// Chunked body: the body de-chunked (`buf` holds it as it came).
    plain: Vec<u8>,
}

#[derive(Debug)]
struct HeldHead {
    len: usize,
    plan: Plan,
    cl: u64,
}

/// How to write a parsed head.
#[derive(Debug)]
struct Plan {
    lines: Vec<Line>,
    /// The value every `Host` gets.
    host: Option<Vec<u8>>,
    /// `Location` and `Content-Location` URIs naming the first move to the second.
    loc: Option<(Authority, Authority)>,
}

#[derive(Clone, Copy, Debug)]
enum ClEdit {
    Keep,
    Set(u64),
    ToChunked,
}

/// What a head says, as httparse read it.
#[derive(Debug)]
struct Info {
    method: Method,
    code: u16,
    minor: u8,
    headers: usize,
}

#[derive(Debug)]
enum Parsed {
    Partial,
    Bad,
    Done(Info),
}

/// The header fields that decide framing and rewriting.
#[derive(Debug, Default)]
struct Facts {
    host: Option<Option<Authority>>,
    cl: Option<u64>,
    cl_bad: bool,
    /// Some(whether the last coding is chunked).
    te: Option<bool>,
    ipp: bool,
    expect: bool,
    /// A content or transfer coding other than chunked: the IPP is not
    /// readable as it passes.
    coded: bool,
}

impl Facts {
    /// No IPP rewriting for a body that is coded (or an HTTP/1.0 Expect
    /// request's): it passes as it comes, counted.
    fn unreadable<T>(&self, map: Option<T>, http10: bool, cx: &mut Shared) -> Option<T> {
        if map.is_some() && (self.coded || (self.expect && http10)) {
            cx.stats.unparsed += 1;
            return None;
        }
        map
    }
}

impl Dir {
    fn new(req: bool) -> Self {
        Self {
            req,
            st: St::Head,
            buf: Vec::new(),
            lf: 0,
        }
    }

    /// The held bytes that count against the shared IPP budget.
    fn ipp_held(&self) -> usize {
        match &self.st {
            St::Body(b) => b.ipp.as_ref().map_or(0, |c| {
                let head = c.head.as_ref().map_or(0, |h| h.len);
                self.buf.len().saturating_sub(head)
            }),
            _ => 0,
        }
    }

    fn feed(&mut self, cx: &mut Shared, other: usize, mut input: &[u8], out: &mut Vec<u8>) {
        self.sync(cx, out);
        let budget = MAX_IPP_ATTRS.saturating_sub(other);
        while !input.is_empty() {
            let n = match self.st {
                St::Pass => {
                    out.extend_from_slice(input);
                    input.len()
                }
                St::Head => self.head(cx, input, out),
                St::Body(_) => self.body(cx, budget, input, out),
            };
            debug_assert!(n > 0, "no progress");
            if n == 0 {
                // Cannot happen; never spin on it.
                self.give_up_flow(cx, out);
            }
            input = input.get(n..).unwrap_or_default();
        }
    }

    /// Stop parsing when the other direction says HTTP is over.
    fn sync(&mut self, cx: &mut Shared, out: &mut Vec<u8>) {
        let stop = cx.switched || (!self.req && cx.req_lost && matches!(self.st, St::Head));
        if stop && !matches!(self.st, St::Pass) {
            self.release(cx, out);
            self.st = St::Pass;
        }
    }

    fn end(&mut self, cx: &mut Shared, out: &mut Vec<u8>) {
        if self.release(cx, out) {
            cx.stats.unparsed += 1;
        }
        self.st = St::Pass;
    }

    /// Emits whatever is held as it came; whether a message was cut short.
    fn release(&mut self, cx: &mut Shared, out: &mut Vec<u8>) -> bool {
        let cut = match &mut self.st {
            St::Body(b) => match b.ipp.take() {
                Some(c) => {
                    emit_unchanged(&c, b.framing, &self.buf, &mut cx.stats, out);
                    true
                }
                None => false,
            },
            St::Head | St::Pass => {
                out.extend_from_slice(&self.buf);
                self.buf.iter().any(|&b| b != b'\r' && b != b'\n')
            }
        };
        self.buf.clear();
        cut
    }

    /// The rest of this direction passes unchanged.
    fn give_up_flow(&mut self, cx: &mut Shared, out: &mut Vec<u8>) {
        self.release(cx, out);
        self.st = St::Pass;
        cx.stats.unparsed += 1;
        if self.req {
            cx.req_lost = true;
        }
    }

    /// This IPP message passes unchanged; its framing is still followed.
    fn give_up_ipp(&mut self, c: &Collect, framing: Framing, cx: &mut Shared, out: &mut Vec<u8>) {
        emit_unchanged(c, framing, &self.buf, &mut cx.stats, out);
        self.buf.clear();
        cx.stats.unparsed += 1;
    }

    fn next_message(&mut self, cx: &Shared) {
        self.lf = 0;
        self.buf.clear();
        self.st = if !self.req && (cx.req_lost || cx.switched) {
            St::Pass
        } else {
            St::Head
        };
    }

    /// Collects a head; returns how much of `input` it took.
    fn head(&mut self, cx: &mut Shared, input: &[u8], out: &mut Vec<u8>) -> usize {
        let room = MAX_HEAD.saturating_sub(self.buf.len());
        let look = input.get(..room).unwrap_or(input);
        let mut end = None;
        for (i, &b) in look.iter().enumerate() {
            self.lf = match (self.lf, b) {
                (1 | 2, b'\n') => {
                    end = Some(i + 1);
                    1
                }
                (_, b'\n') => 1,
                (1, b'\r') => 2,
                _ => 0,
            };
            if end.is_some() {
                break;
            }
        }
        let Some(n) = end else {
            self.buf.extend_from_slice(input);
            // Not HTTP (or too long) is better known now than after 16 KiB:
            // a peer may wait for an answer before sending more.
            if self.buf.len() >= MAX_HEAD || matches!(parse_head(self.req, &self.buf), Parsed::Bad)
            {
                self.give_up_flow(cx, out);
            }
            return input.len();
        };
        self.buf
            .extend_from_slice(input.get(..n).unwrap_or_default());
        match parse_head(self.req, &self.buf) {
            Parsed::Partial => {}
            Parsed::Bad => self.give_up_flow(cx, out),
            Parsed::Done(info) => self.on_head(cx, info, out),
        }
        n
    }

    /// A complete head is in `buf`: decide framing and rewriting.
    fn on_head(&mut self, cx: &mut Shared, info: Info, out: &mut Vec<u8>) {
        let Some(lines) = scan_lines(&self.buf).filter(|l| l.len() == info.headers) else {
            return self.give_up_flow(cx, out);
        };
        let mut f = Facts::default();
        for l in &lines {
            let v = self.buf.get(l.value.0..l.value.1).unwrap_or_default();
            match l.kind {
                Name::Host => f.host = Some(Authority::parse(v)),
                Name::ContentLength => match (parse_length(v), f.cl) {
                    (Some(n), None) => f.cl = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => f.cl_bad = true,
                },
                Name::TransferEncoding => {
                    f.te = Some(last_coding_chunked(v));
                    f.coded |= v
                        .split(|&b| b == b',')
                        .map(trim)
                        .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked"));
                }
                Name::ContentEncoding => f.coded |= !trim(v).eq_ignore_ascii_case(b"identity"),
                Name::ContentType => f.ipp = is_ipp(v),
                Name::Expect => f.expect = v.eq_ignore_ascii_case(b"100-continue"),
                Name::Location | Name::Other => {}
            }
        }
        if f.cl_bad {
            return self.give_up_flow(cx, out);
        }
        if self.req {
            let from = f.host.clone().flatten();
            if let Some(a) = &from {
                cx.guest = Some(a.clone());
            }
            if cx.methods.len() >= MAX_PIPELINE {
                cx.req_lost = true;
            } else {
                cx.methods.push_back(info.method);
            }
            let framing = match (f.te, f.cl) {
                (Some(true), _) => Some(Framing::Chunked(Chunks::START)),
                // A request whose end cannot be found.
                (Some(false), _) => return self.give_up_flow(cx, out),
                (None, Some(n)) if n > 0 => Some(Framing::Length(n)),
                _ => None,
            };
            let map = match (from, &cx.real) {
                (Some(from), Some(real))
                    if cx.ipp && f.ipp && framing.is_some() && !from.same(real) =>
                {
                    Some((from, real.clone()))
                }
                _ => None,
            };
            // HTTP/1.0 has no chunked to send an Expect body as, and its
            // head must not wait for the body either.
            let map = f.unreadable(map, info.minor == 0, cx);
            let plan = Plan {
                lines,
                host: cx.real_text.clone(),
                loc: None,
            };
            self.start_body(cx, plan, framing, map, f.expect, out);
        } else {
            let back = match (&cx.real, &cx.guest) {
                (Some(r), Some(g)) if !r.same(g) => Some((r.clone(), g.clone())),
                _ => None,
            };
            let plan = Plan {
                lines,
                host: None,
                loc: back.clone(),
            };
            if (100..200).contains(&info.code) {
                // Interim: a head only, and the request still awaits its answer.
                self.emit_head(&plan, ClEdit::Keep, cx, out);
                if info.code == 101 {
                    cx.switched = true;
                    self.st = St::Pass;
                } else {
                    self.next_message(cx);
                }
                return;
            }
            let method = cx.methods.pop_front().unwrap_or(Method::Other);
            if method == Method::Connect && (200..300).contains(&info.code) {
                self.emit_head(&plan, ClEdit::Keep, cx, out);
                cx.switched = true;
                self.st = St::Pass;
                return;
            }
            let framing = if method == Method::Head || info.code == 204 || info.code == 304 {
                None
            } else {
                match (f.te, f.cl) {
                    (Some(true), _) => Some(Framing::Chunked(Chunks::START)),
                    (Some(false), _) | (None, None) => Some(Framing::Close),
                    (None, Some(0)) => None,
                    (None, Some(n)) => Some(Framing::Length(n)),
                }
            };
            let map = back.filter(|_| cx.ipp && f.ipp && framing.is_some());
            let map = f.unreadable(map, false, cx);
            self.start_body(cx, plan, framing, map, false, out);
        }
    }

    fn start_body(
        &mut self,
        cx: &mut Shared,
        plan: Plan,
        framing: Option<Framing>,
        map: Option<(Authority, Authority)>,
        expect: bool,
        out: &mut Vec<u8>,
    ) {
        let Some(framing) = framing else {
            self.emit_head(&plan, ClEdit::Keep, cx, out);
            return self.next_message(cx);
        };
        let Some((from, to)) = map else {
            self.emit_head(&plan, ClEdit::Keep, cx, out);
            self.st = St::Body(Box::new(Body { framing, ipp: None }));
            return;
        };
        let mut c = Collect {
            from,
            to,
            walk: IppWalk::default(),
            head: None,
            plain: Vec::new(),
        };
        let framing = match framing {
            // The client waits for 100 Continue before it sends the body,
            // so the head cannot wait for the body: the length goes.
            Framing::Length(n) if expect => {
                self.emit_head(&plan, ClEdit::ToChunked, cx, out);
                Framing::ToChunked(n)
            }
            Framing::Length(n) => {
                c.head = Some(HeldHead {
                    len: self.buf.len(),
                    plan,
                    cl: n,
                });
                framing
            }
            _ => {
                self.emit_head(&plan, ClEdit::Keep, cx, out);
                framing
            }
        };
        self.st = St::Body(Box::new(Body {
            framing,
            ipp: Some(c),
        }));
    }

    fn emit_head(&mut self, plan: &Plan, cl: ClEdit, cx: &mut Shared, out: &mut Vec<u8>) {
        write_head(&self.buf, plan, cl, &mut cx.stats, out);
        self.buf.clear();
    }

    /// Body bytes; returns how much of `input` it took.
    fn body(&mut self, cx: &mut Shared, budget: usize, input: &[u8], out: &mut Vec<u8>) -> usize {
        let St::Body(mut b) = std::mem::replace(&mut self.st, St::Pass) else {
            return 0;
        };
        let (n, ended) = match b.framing {
            Framing::Length(left) | Framing::ToChunked(left) => {
                let chunked = matches!(b.framing, Framing::ToChunked(_));
                let n = usize::try_from(left).map_or(input.len(), |l| l.min(input.len()));
                let data = input.get(..n).unwrap_or_default();
                let left = left.saturating_sub(n as u64);
                b.framing = if chunked {
                    Framing::ToChunked(left)
                } else {
                    Framing::Length(left)
                };
                match b.ipp.take() {
                    None => out.extend_from_slice(data),
                    Some(mut c) => {
                        self.buf.extend_from_slice(data);
                        let at = c.head.as_ref().map_or(0, |h| h.len);
                        let body = self.buf.get(at..).unwrap_or_default();
                        let len = body.len();
                        match c.walk.advance(body) {
                            Walk::Done(end) if end <= budget => {
                                self.finish(&c, end, b.framing, cx, out);
                            }
                            Walk::More if left > 0 && len <= budget => b.ipp = Some(c),
                            _ => self.give_up_ipp(&c, b.framing, cx, out),
                        }
                    }
                }
                if left == 0 && chunked {
                    out.extend_from_slice(b"\r\n0\r\n\r\n");
                }
                (n, left == 0)
            }
            Framing::Chunked(mut dec) => {
                let piece = dec.next(input);
                b.framing = Framing::Chunked(dec);
                let (n, data, end) = match piece {
                    Piece::Frame(n) => (n, false, false),
                    Piece::Data(n) => (n, true, false),
                    Piece::End(n) => (n, false, true),
                    Piece::Bad => {
                        // Where this body ends is unknown: so is the rest.
                        if let Some(c) = b.ipp.take() {
                            emit_unchanged(&c, b.framing, &self.buf, &mut cx.stats, out);
                            self.buf.clear();
                        }
                        out.extend_from_slice(input);
                        cx.stats.unparsed += 1;
                        if self.req {
                            cx.req_lost = true;
                        }
                        return input.len();
                    }
                };
                let bytes = input.get(..n).unwrap_or_default();
                match b.ipp.take() {
                    None => out.extend_from_slice(bytes),
                    Some(mut c) => {
                        self.buf.extend_from_slice(bytes);
                        let step = if data {
                            c.plain.extend_from_slice(bytes);
                            c.walk.advance(&c.plain)
                        } else {
                            Walk::More
                        };
                        match step {
                            // The bound is on the bytes as they came, where
                            // the attributes end: the same however split.
                            Walk::Done(e)
                                if self
                                    .buf
                                    .len()
                                    .saturating_sub(c.plain.len().saturating_sub(e))
                                    <= budget =>
                            {
                                self.finish(&c, e, b.framing, cx, out);
                            }
                            Walk::More if !end && self.buf.len() <= budget => b.ipp = Some(c),
                            _ => self.give_up_ipp(&c, b.framing, cx, out),
                        }
                    }
                }
                (n, end)
            }
            Framing::Close => {
                match b.ipp.take() {
                    None => out.extend_from_slice(input),
                    Some(mut c) => {
                        self.buf.extend_from_slice(input);
                        match c.walk.advance(&self.buf) {
                            Walk::Done(e) if e <= budget => self.finish(&c, e, b.framing, cx, out),
                            Walk::More if self.buf.len() <= budget => b.ipp = Some(c),
                            _ => self.give_up_ipp(&c, b.framing, cx, out),
                        }
                    }
                }
                (input.len(), false)
            }
        };
        if ended {
            self.next_message(cx);
        } else {
            self.st = St::Body(b);
        }
        n
    }

    /// The attributes end at `end` of the body: send them rewritten (or,
    /// when no URI changed, everything held exactly as it came).
    fn finish(
        &mut self,
        c: &Collect,
        end: usize,
        framing: Framing,
        cx: &mut Shared,
        out: &mut Vec<u8>,
    ) {
        let at = c.head.as_ref().map_or(0, |h| h.len);
        let body = match framing {
            Framing::Chunked(_) => c.plain.as_slice(),
            _ => self.buf.get(at..).unwrap_or_default(),
        };
        let rest = body.get(end..).unwrap_or_default();
        let Some((attrs, n)) = rewrite_attrs(body, end, &c.from, &c.to) else {
            emit_unchanged(c, framing, &self.buf, &mut cx.stats, out);
            self.buf.clear();
            return;
        };
        let new_len = (attrs.len() + rest.len()) as u64;
        // The new Content-Length; or one chunk's size for the rewritten
        // attributes and the rest of the current chunk (or of the
        // Content-Length body), whose bytes and closing CRLF then pass as
        // they come.
        let size = match (&c.head, framing) {
            (Some(h), _) => {
                h.cl.checked_sub(body.len() as u64)
                    .and_then(|t| t.checked_add(new_len))
            }
            (None, Framing::ToChunked(left)) => new_len.checked_add(left),
            (None, Framing::Chunked(dec)) => new_len.checked_add(dec.data_left()),
            (None, Framing::Length(_) | Framing::Close) => Some(0),
        };
        let Some(size) = size else {
            return self.give_up_ipp(c, framing, cx, out);
        };
        match (&c.head, framing) {
            (Some(h), _) => {
                let head = self.buf.get(..h.len).unwrap_or_default();
                let cl = if size == h.cl {
                    ClEdit::Keep
                } else {
                    ClEdit::Set(size)
                };
                write_head(head, &h.plan, cl, &mut cx.stats, out);
            }
            (None, Framing::ToChunked(_) | Framing::Chunked(_)) => chunk_header(size, out),
            (None, Framing::Length(_) | Framing::Close) => {}
        }
        cx.stats.uris += n;
        out.extend_from_slice(&attrs);
        out.extend_from_slice(rest);
        self.buf.clear();
    }
}

/// Sends a collecting message's held bytes as they came (after its head,
/// if held; as a chunk, if the head already said chunked).
fn emit_unchanged(
    c: &Collect,
    framing: Framing,
    buf: &[u8],
    stats: &mut RewriteStats,
    out: &mut Vec<u8>,
) {
    match (&c.head, framing) {
        (Some(h), _) => {
            write_head(
                buf.get(..h.len).unwrap_or_default(),
                &h.plan,
                ClEdit::Keep,
                stats,
                out,
            );
            out.extend_from_slice(buf.get(h.len..).unwrap_or_default());
        }
        (None, Framing::ToChunked(left)) => {
            chunk_header((buf.len() as u64).saturating_add(left), out);
            out.extend_from_slice(buf);
        }
        _ => out.extend_from_slice(buf),
    }
}

fn chunk_header(size: u64, out: &mut Vec<u8>) {
    if size > 0 {
        out.extend_from_slice(format!("{size:x}\r\n").as_bytes());
    }
}

fn parse_head(req: bool, buf: &[u8]) -> Parsed {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (status, info) = if req {
        let mut r = httparse::Request::new(&mut hs);
        let status = r.parse(buf);
        let method = match r.method {
            Some("HEAD") => Method::Head,
            Some("CONNECT") => Method::Connect,
            _ => Method::Other,
        };
        let info = Info {
            method,
            code: 0,
            minor: r.version.unwrap_or(0),
            headers: r.headers.len(),
        };
        (status, info)
    } else {
        let mut r = httparse::Response::new(&mut hs);
        let status = r.parse(buf);
        let info = Info {
            method: Method::Other,
            code: r.code.unwrap_or(0),
            minor: r.version.unwrap_or(0),
            headers: r.headers.len(),
        };
        (status, info)
    };
    match status {
        Ok(httparse::Status::Complete(n)) if n == buf.len() => Parsed::Done(info),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        _ => Parsed::Bad,
    }
}

/// A header's name, where it matters here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Name {
    Host,
    ContentLength,
    TransferEncoding,
    ContentType,
    ContentEncoding,
    Expect,
    /// `Location` or `Content-Location`.
    Location,
    Other,
}

/// Where one header line lies in its head.
#[derive(Clone, Copy, Debug)]
struct Line {
    kind: Name,
    start: usize,
    /// The value without surrounding whitespace.
    value: (usize, usize),
    /// Before the line's CR LF (or LF).
    content_end: usize,
    /// After its LF.
    end: usize,
}

fn classify(name: &[u8]) -> Name {
    const NAMES: [(&[u8], Name); 8] = [
        (b"host", Name::Host),
        (b"content-length", Name::ContentLength),
        (b"transfer-encoding", Name::TransferEncoding),
        (b"content-type", Name::ContentType),
        (b"content-encoding", Name::ContentEncoding),
        (b"expect", Name::Expect),
        (b"location", Name::Location),
        (b"content-location", Name::Location),
    ];
    NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map_or(Name::Other, |(_, k)| *k)
}

/// The header lines of a head httparse accepted (which has no obs-fold).
fn scan_lines(head: &[u8]) -> Option<Vec<Line>> {
    let mut pos = 0;
    while let Some(rest) = head.get(pos..) {
        if rest.starts_with(b"\r\n") {
            pos += 2;
        } else if rest.starts_with(b"\n") {
            pos += 1;
        } else {
            break;
        }
    }
    pos += head.get(pos..)?.iter().position(|&b| b == b'\n')? + 1;
    let mut lines = Vec::new();
    loop {
        let rest = head.get(pos..)?;
        if rest.starts_with(b"\r\n") || rest.starts_with(b"\n") {
            return Some(lines);
        }
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let line = rest.get(..nl)?;
        let content = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = content.iter().position(|&b| b == b':')?;
        let raw = content.get(colon + 1..)?;
        let lead = raw.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
        let trail = raw
            .iter()
            .rev()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
        let vstart = pos + colon + 1 + lead;
        let vend = (pos + content.len()).saturating_sub(trail).max(vstart);
        lines.push(Line {
            kind: classify(content.get(..colon)?),
            start: pos,
            value: (vstart, vend),
            content_end: pos + content.len(),
            end: pos + nl + 1,
        });
        pos += nl + 1;
    }
}

/// Writes a head with `Host`, `Location`s and `Content-Length` edited as
/// `plan` and `cl` say, every other byte as it came.
fn write_head(head: &[u8], plan: &Plan, cl: ClEdit, stats: &mut RewriteStats, out: &mut Vec<u8>) {
    let mut at = 0;
    let mut te_written = false;
    for l in &plan.lines {
        let Some(value) = head.get(l.value.0..l.value.1) else {
            continue;
        };
        let (from, to, with) = match l.kind {
            Name::Host => match &plan.host {
                Some(real) if value != real.as_slice() => {
                    stats.hosts += 1;
                    (l.value.0, l.value.1, real.clone())
                }
                _ => continue,
            },
            Name::Location => match plan
                .loc
                .as_ref()
                .and_then(|(f, t)| rewrite_uri(value, f, t))
            {
                Some(new) if new.as_slice() != value => {
                    stats.uris += 1;
                    (l.value.0, l.value.1, new)
                }
                _ => continue,
            },
            Name::ContentLength => match cl {
                ClEdit::Keep => continue,
                ClEdit::Set(n) => (l.value.0, l.value.1, n.to_string().into_bytes()),
                ClEdit::ToChunked => {
                    let mut line = Vec::new();
                    if !te_written {
                        te_written = true;
                        line.extend_from_slice(b"Transfer-Encoding: chunked");
                        line.extend_from_slice(head.get(l.content_end..l.end).unwrap_or(b"\r\n"));
                    }
                    (l.start, l.end, line)
                }
            },
            _ => continue,
        };
        out.extend_from_slice(head.get(at..from).unwrap_or_default());
        out.extend_from_slice(&with);
        at = to;
    }
    out.extend_from_slice(head.get(at..).unwrap_or_default());
}

fn trim(v: &[u8]) -> &[u8] {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !ws(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !ws(b)).map_or(start, |e| e + 1);
    v.get(start..end).unwrap_or_default()
}

/// A Content-Length value; a list of equal values counts as one.
fn parse_length(v: &[u8]) -> Option<u64> {
    let mut n = None;
    for part in v.split(|&b| b == b',') {
        let p = trim(part);
        if p.is_empty() || p.len() > 19 || !p.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let x: u64 = std::str::from_utf8(p).ok()?.parse().ok()?;
        if n.is_some_and(|m| m != x) {
            return None;
        }
        n = Some(x);
    }
    n
}

fn last_coding_chunked(v: &[u8]) -> bool {
    v.rsplit(|&b| b == b',')
        .map(trim)
        .find(|p| !p.is_empty())
        .is_some_and(|p| p.eq_ignore_ascii_case(b"chunked"))
}

fn is_ipp(v: &[u8]) -> bool {
    let mime = v.split(|&b| b == b';').next().unwrap_or_default();
    trim(mime).eq_ignore_ascii_case(b"application/ipp")
}

/// A URI authority's host and port: what `Host` names and URIs are
/// compared by.
#[derive(Clone, Debug)]
struct Authority {
    /// IPv6 in brackets, as written in URIs and `Host`.
    host: String,
    port: Option<u16>,
}

impl Authority {
    /// `host[:port]`, strictly: what is written back into a URI or `Host`
    /// must not carry anything else.
    fn parse(s: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(s).ok()?;
        let (host, rest) = if let Some(inner) = s.strip_prefix('[') {
            let (inner, rest) = inner.split_once(']')?;
            let ok = !inner.is_empty()
                && inner.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b':' | b'.' | b'%' | b'-' | b'_' | b'~')
                });
            if !ok {
                return None;
            }
            (format!("[{inner}]"), rest)
        } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
            (format!("[{s}]"), "")
        } else {
            let (h, rest) = s.split_at(s.find(':').unwrap_or(s.len()));
            let ok = !h.is_empty()
                && h.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~' | b'%')
                });
            if !ok {
                return None;
            }
            (h.to_owned(), rest)
        };
        let port = match rest.strip_prefix(':') {
            None if rest.is_empty() => None,
            None => return None,
            Some("") => None,
            Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
                Some(p.parse().ok()?)
            }
            Some(_) => return None,
        };
        Some(Self { host, port })
    }

    fn same(&self, o: &Self) -> bool {
        self.host.eq_ignore_ascii_case(&o.host) && self.port == o.port
    }

    fn text(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }
}

fn default_port(scheme: &[u8]) -> Option<u16> {
    if scheme.eq_ignore_ascii_case(b"ipp") || scheme.eq_ignore_ascii_case(b"ipps") {
        Some(631)
    } else if scheme.eq_ignore_ascii_case(b"http") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case(b"https") {
        Some(443)
    } else {
        None
    }
}

/// `uri` with its host[:port] moved from `from` to `to`, if it names
/// `from` (host case-insensitively, ports after the scheme's default).
fn rewrite_uri(uri: &[u8], from: &Authority, to: &Authority) -> Option<Vec<u8>> {
    let sep = uri.windows(3).position(|w| w == b"://")?;
    let scheme = uri.get(..sep)?;
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return None;
    }
    let auth_start = sep + 3;
    let rest = uri.get(auth_start..)?;
    let auth_len = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let auth = rest.get(..auth_len)?;
    let hp_start = auth.iter().rposition(|&b| b == b'@').map_or(0, |i| i + 1);
    let named = Authority::parse(auth.get(hp_start..)?)?;
    let def = default_port(scheme);
    if !named.host.eq_ignore_ascii_case(&from.host) || named.port.or(def) != from.port.or(def) {
        return None;
    }
    let mut out = Vec::with_capacity(uri.len() + to.host.len() + 6);
    out.extend_from_slice(uri.get(..auth_start + hp_start)?);
    out.extend_from_slice(to.host.as_bytes());
    if let Some(p) = to.port.or(def)
        && (named.port.is_some() || Some(p) != def)
    {
        out.extend_from_slice(format!(":{p}").as_bytes());
    }
    out.extend_from_slice(uri.get(auth_start + auth_len..)?);
    Some(out)
}

/// Where an IPP message's attributes end, found as its bytes arrive
/// (RFC 8010 section 3.1: version, operation-id or status, request-id,
/// then groups of attributes up to the end-of-attributes tag).
#[derive(Debug)]
struct IppWalk {
    /// The next tag's offset: everything before it is whole.
    pos: usize,
    in_group: bool,
}

impl Default for IppWalk {
    fn default() -> Self {
        Self {
            pos: 8,
            in_group: false,
        }
    }
}

#[derive(Debug)]
enum Walk {
    More,
    Bad,
    /// The attributes are the first this many bytes.
    Done(usize),
}

impl IppWalk {
    fn advance(&mut self, b: &[u8]) -> Walk {
        loop {
            let Some(&tag) = b.get(self.pos) else {
                return Walk::More;
            };
            if tag == IPP_END {
                return Walk::Done(self.pos + 1);
            }
            if tag < 0x10 {
                self.in_group = true;
                self.pos += 1;
                continue;
            }
            if !self.in_group {
                return Walk::Bad;
            }
            match attr_bounds(b, self.pos) {
                Some((_, end)) => self.pos = end,
                None => return Walk::More,
            }
        }
    }
}

/// An attribute at `at` (value-tag, name-length, name, value-length,
/// value): where its value-length is and where it ends, if all there.
fn attr_bounds(b: &[u8], at: usize) -> Option<(usize, usize)> {
    let be16 = |i: usize| -> Option<usize> {
        let s = b.get(i..i.checked_add(2)?)?;
        Some(usize::from(u16::from_be_bytes([*s.first()?, *s.get(1)?])))
    };
    let name_len = be16(at.checked_add(1)?)?;
    let v_at = at.checked_add(3)?.checked_add(name_len)?;
    let end = v_at.checked_add(2)?.checked_add(be16(v_at)?)?;
    (end <= b.len()).then_some((v_at, end))
}

/// The attributes `body[..end]` with each uri value naming `from` moved to
/// `to`, and how many moved; None when none did.
fn rewrite_attrs(
    body: &[u8],
    end: usize,
    from: &Authority,
    to: &Authority,
) -> Option<(Vec<u8>, u64)> {
    let attrs = body.get(..end)?;
    let mut out = Vec::with_capacity(end + 256);
    out.extend_from_slice(attrs.get(..8)?);
    let mut pos = 8;
    let mut moved = 0;
    while pos < end {
        let tag = *attrs.get(pos)?;
        if tag < 0x10 {
            out.push(tag);
            pos += 1;
            continue;
        }
        let (v_at, a_end) = attr_bounds(attrs, pos)?;
        let value = attrs.get(v_at + 2..a_end)?;
        if tag == IPP_URI {
            let new = rewrite_uri(value, from, to).filter(|v| v.as_slice() != value);
            let len = new.as_ref().and_then(|v| u16::try_from(v.len()).ok());
            if let (Some(new), Some(len)) = (new, len) {
                out.extend_from_slice(attrs.get(pos..v_at)?);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&new);
                moved += 1;
                pos = a_end;
                continue;
            }
        }
        out.extend_from_slice(attrs.get(pos..a_end)?);
        pos = a_end;
    }
    (moved > 0).then_some((out, moved))
}

/// Chunked framing, followed as its bytes arrive (RFC 9112 section 7.1).
#[derive(Clone, Copy, Debug)]
enum Chunks {
    Size {
        size: u64,
        digits: u8,
        ext: bool,
        len: usize,
        cr: bool,
    },
    Data {
        left: u64,
    },
    /// The CRLF after a chunk's data.
    DataEnd {
        cr: bool,
    },
    Trailer {
        line: usize,
        total: usize,
        cr: bool,
    },
}

/// A run of chunked body bytes of one kind.
#[derive(Debug)]
enum Piece {
    Frame(usize),
    Data(usize),
    /// Framing that ends the message.
    End(usize),
    Bad,
}

impl Chunks {
    const START: Self = Chunks::Size {
        size: 0,
        digits: 0,
        ext: false,
        len: 0,
        cr: false,
    };

    /// Data bytes left in the current chunk.
    fn data_left(&self) -> u64 {
        match self {
            Chunks::Data { left } => *left,
            _ => 0,
        }
    }

    /// The next run of `input` (not empty): one kind, and never past the
    /// end of a chunk's data, its CRLF, a size line or the message.
    fn next(&mut self, input: &[u8]) -> Piece {
        if let Chunks::Data { left } = *self {
            let n = usize::try_from(left).map_or(input.len(), |l| l.min(input.len()));
            let left = left.saturating_sub(n as u64);
            *self = if left == 0 {
                Chunks::DataEnd { cr: false }
            } else {
                Chunks::Data { left }
            };
            return Piece::Data(n);
        }
        for (i, &b) in input.iter().enumerate() {
            match self.frame_byte(b) {
                Fb::Go => {}
                Fb::Seg => return Piece::Frame(i + 1),
                Fb::End => return Piece::End(i + 1),
                Fb::Bad => return Piece::Bad,
            }
        }
        Piece::Frame(input.len())
    }

    fn frame_byte(&mut self, b: u8) -> Fb {
        match *self {
            Chunks::Size {
                mut size,
                mut digits,
                mut ext,
                len,
                mut cr,
            } => {
                let len = len + 1;
                if len > MAX_CHUNK_LINE || (cr && b != b'\n') {
                    return Fb::Bad;
                }
                match b {
                    b'\n' => {
                        if digits == 0 {
                            return Fb::Bad;
                        }
                        *self = if size == 0 {
                            Chunks::Trailer {
                                line: 0,
                                total: 0,
                                cr: false,
                            }
                        } else {
                            Chunks::Data { left: size }
                        };
                        return Fb::Seg;
                    }
                    b'\r' => cr = true,
                    _ if !ext => match char::from(b).to_digit(16) {
                        Some(d) if digits < 16 => {
                            size = (size << 4) | u64::from(d);
                            digits += 1;
                        }
                        Some(_) => return Fb::Bad,
                        None if digits > 0 && matches!(b, b';' | b' ' | b'\t') => ext = true,
                        None => return Fb::Bad,
                    },
                    _ if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 => {}
                    _ => return Fb::Bad,
                }
                *self = Chunks::Size {
                    size,
                    digits,
                    ext,
                    len,
                    cr,
                };
                Fb::Go
            }
            Chunks::DataEnd { cr } => match b {
                b'\r' if !cr => {
                    *self = Chunks::DataEnd { cr: true };
                    Fb::Go
                }
                b'\n' => {
                    *self = Chunks::START;
                    Fb::Seg
                }
                _ => Fb::Bad,
            },
            Chunks::Trailer { line, total, cr } => {
                let total = total + 1;
                if total > MAX_TRAILERS || (cr && b != b'\n') {
                    return Fb::Bad;
                }
                *self = match b {
                    b'\n' if line == 0 => {
                        *self = Chunks::START;
                        return Fb::End;
                    }
                    b'\n' => Chunks::Trailer {
                        line: 0,
                        total,
                        cr: false,
                    },
                    b'\r' => Chunks::Trailer {
                        line,
                        total,
                        cr: true,
                    },
                    _ => Chunks::Trailer {
                        line: line + 1,
                        total,
                        cr,
                    },
                };
                Fb::Go
            }
            Chunks::Data { .. } => Fb::Bad,
        }
    }
}

/// What one framing byte did.
enum Fb {
    Go,
    Seg,
    End,
    Bad,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GUEST: &str = "laser.netredir.internal:8631";
    const REAL: &str = "192.168.1.20:8631";

    /// An IPP message as RFC 8010 lays it out.
    struct Ipp(Vec<u8>);

    impl Ipp {
        fn new(op_or_status: u16) -> Self {
            let mut v = vec![2, 0];
            v.extend_from_slice(&op_or_status.to_be_bytes());
            v.extend_from_slice(&7u32.to_be_bytes());
            Self(v)
        }
        fn group(mut self, tag: u8) -> Self {
            self.0.push(tag);
            self
        }
        fn attr(self, tag: u8, name: &str, value: &str) -> Self {
            self.attr_bytes(tag, name, value.as_bytes())
        }
        fn attr_bytes(mut self, tag: u8, name: &str, value: &[u8]) -> Self {
            self.0.push(tag);
            self.0.extend_from_slice(&(name.len() as u16).to_be_bytes());
            self.0.extend_from_slice(name.as_bytes());
            self.0
                .extend_from_slice(&(value.len() as u16).to_be_bytes());
            self.0.extend_from_slice(value);
            self
        }
        fn end(mut self) -> Vec<u8> {
            self.0.push(IPP_END);
            self.0
        }
    }

    /// get-printer-attributes naming the printer as `uri`.
    fn gpa(uri: &str) -> Vec<u8> {
        Ipp::new(0x000b)
            .group(1)
            .attr(0x47, "attributes-charset", "utf-8")
            .attr(0x48, "attributes-natural-language", "en")
            .attr(IPP_URI, "printer-uri", uri)
            .attr(0x42, "requesting-user-name", "alice")
            .attr(0x44, "requested-attributes", "printer-uri-supported")
            .attr(0x44, "", "printer-more-info")
            .end()
    }

    /// print-job's attributes naming the printer as `uri` (the document follows them).
    fn print_job(uri: &str) -> Vec<u8> {
        Ipp::new(0x0002)
            .group(1)
            .attr(0x47, "attributes-charset", "utf-8")
            .attr(0x48, "attributes-natural-language", "en")
            .attr(IPP_URI, "printer-uri", uri)
            .attr(0x42, "requesting-user-name", "alice")
            .attr(0x42, "job-name", "report")
            .attr(0x49, "document-format", "application/pdf")
            .end()
    }

    /// A printer's attributes, its own URIs naming `authority`.
    fn printer_attrs(authority: &str) -> Vec<u8> {
        Ipp::new(0x0000)
            .group(1)
            .attr(0x47, "attributes-charset", "utf-8")
            .attr(0x48, "attributes-natural-language", "en")
            .group(4)
            .attr(
                IPP_URI,
                "printer-uri-supported",
                &format!("ipp://{authority}/ipp/print"),
            )
            .attr(IPP_URI, "", &format!("ipps://{authority}/ipp/print"))
            .attr(
                IPP_URI,
                "printer-more-info",
                &format!("http://{authority}/"),
            )
            .attr(IPP_URI, "printer-icons", "http://cdn.example.com/icon.png")
            .attr(0x42, "printer-name", "laser")
            .end()
    }

    fn document(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn post(host: &str, extra: &str, body: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "POST /ipp/print HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/ipp\r\n{extra}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(body);
        v
    }

    fn ok_ipp(body: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/ipp; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(body);
        v
    }

    /// `body` as chunks cut at `cuts`, the third with an extension, and a trailer.
    fn chunked(body: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        for (i, &cut) in cuts.iter().chain([body.len()].iter()).enumerate() {
            let seg = &body[at..cut];
            let ext = if i == 2 { ";name=\"a b\"" } else { "" };
            out.extend_from_slice(format!("{:X}{ext}\r\n", seg.len()).as_bytes());
            out.extend_from_slice(seg);
            out.extend_from_slice(b"\r\n");
            at = cut;
        }
        out.extend_from_slice(b"0\r\nX-Checksum: 1\r\n\r\n");
        out
    }

    /// Every attribute as (tag, name, value), delimiters as (tag, "", ""),
    /// and what follows the end tag. Panics on anything malformed.
    fn attrs_of(b: &[u8]) -> (Vec<(u8, String, String)>, Vec<u8>) {
        let mut pos = 8;
        let mut v = Vec::new();
        loop {
            let tag = b[pos];
            if tag == IPP_END {
                return (v, b[pos + 1..].to_vec());
            }
            if tag < 0x10 {
                v.push((tag, String::new(), String::new()));
                pos += 1;
                continue;
            }
            let nl = usize::from(u16::from_be_bytes([b[pos + 1], b[pos + 2]]));
            let name = String::from_utf8_lossy(&b[pos + 3..pos + 3 + nl]).into_owned();
            let vp = pos + 3 + nl;
            let vl = usize::from(u16::from_be_bytes([b[vp], b[vp + 1]]));
            let value = String::from_utf8_lossy(&b[vp + 2..vp + 2 + vl]).into_owned();
            v.push((tag, name, value));
            pos = vp + 2 + vl;
        }
    }

    type Headers = Vec<(String, String)>;

    fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
        h.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The strictly well-framed chunked body at the start of `b`, and the bytes it took.
    fn dechunk(b: &[u8]) -> (Vec<u8>, usize) {
        let line_end = |from: usize| {
            from + b[from..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("CRLF")
        };
        let mut pos = 0;
        let mut body = Vec::new();
        loop {
            let e = line_end(pos);
            let line = std::str::from_utf8(&b[pos..e]).unwrap();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            pos = e + 2;
            if size == 0 {
                loop {
                    let e = line_end(pos);
                    let empty = e == pos;
                    pos = e + 2;
                    if empty {
                        return (body, pos);
                    }
                }
            }
            body.extend_from_slice(&b[pos..pos + size]);
            assert_eq!(
                &b[pos + size..pos + size + 2],
                b"\r\n",
                "chunk data not closed"
            );
            pos += size + 2;
        }
    }

    /// The message at the start of `b`: headers, body (de-chunked) and the
    /// bytes it took. Panics if it is not well framed.
    fn message(b: &[u8], req: bool, no_body: bool) -> (Headers, Vec<u8>, usize) {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let own = |hs: &[httparse::Header<'_>]| -> Headers {
            hs.iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8(h.value.to_vec()).unwrap(),
                    )
                })
                .collect()
        };
        let (n, h) = if req {
            let mut r = httparse::Request::new(&mut hs);
            let httparse::Status::Complete(n) = r.parse(b).unwrap() else {
                panic!("partial request head")
            };
            (n, own(r.headers))
        } else {
            let mut r = httparse::Response::new(&mut hs);
            let httparse::Status::Complete(n) = r.parse(b).unwrap() else {
                panic!("partial response head")
            };
            (n, own(r.headers))
        };
        let rest = &b[n..];
        if no_body {
            return (h, Vec::new(), n);
        }
        if header(&h, "transfer-encoding") == Some("chunked") {
            let (body, used) = dechunk(rest);
            return (h, body, n + used);
        }
        match header(&h, "content-length") {
            Some(cl) => {
                let cl: usize = cl.parse().unwrap();
                (h, rest[..cl].to_vec(), n + cl)
            }
            None if req => (h, Vec::new(), n),
            None => (h, rest.to_vec(), b.len()),
        }
    }

    /// Feeds `input` in pieces of `sizes` (cycled), checking the memory
    /// bound after each; returns the most held.
    fn feed(
        rw: &mut HttpRewriter,
        req: bool,
        input: &[u8],
        sizes: &[usize],
        out: &mut Vec<u8>,
    ) -> usize {
        let mut most = 0;
        let mut rest = input;
        for &s in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, after) = rest.split_at(s.clamp(1, rest.len()));
            if req {
                rw.request(piece, out);
            } else {
                rw.response(piece, out);
            }
            most = most.max(rw.held());
            assert!(rw.held() <= MAX_HELD, "held {} > {MAX_HELD}", rw.held());
            rest = after;
        }
        most
    }

    /// Both streams through one rewriter (requests first), then both ends.
    fn run(
        ipp: bool,
        req: &[u8],
        resp: &[u8],
        rs: &[usize],
        ss: &[usize],
    ) -> (Vec<u8>, Vec<u8>, RewriteStats) {
        let mut rw = HttpRewriter::new(REAL, ipp);
        let (mut qo, mut so) = (Vec::new(), Vec::new());
        feed(&mut rw, true, req, rs, &mut qo);
        feed(&mut rw, false, resp, ss, &mut so);
        rw.request_end(&mut qo);
        rw.response_end(&mut so);
        assert_eq!(rw.held(), 0);
        (qo, so, rw.stats())
    }

    fn guest_uri() -> String {
        format!("ipp://{GUEST}/ipp/print")
    }

    fn real_uri() -> String {
        format!("ipp://{REAL}/ipp/print")
    }

    #[test]
    fn a_request_gets_the_real_host_and_printer_uri() {
        let input = post(GUEST, "", &gpa(&guest_uri()));
        let mut rw = HttpRewriter::new(REAL, true);
        let mut out = Vec::new();
        rw.request(&input, &mut out);
        assert_eq!(rw.held(), 0, "a whole request is not held");
        let (h, body, used) = message(&out, true, false);
        assert_eq!(
            used,
            out.len(),
            "one message, framed by its new Content-Length"
        );
        assert_eq!(header(&h, "host"), Some(REAL));
        assert_eq!(
            header(&h, "content-length"),
            Some(body.len().to_string().as_str())
        );
        let (got, after) = attrs_of(&body);
        let (want, _) = attrs_of(&gpa(&guest_uri()));
        assert!(after.is_empty());
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            if w.1 == "printer-uri" {
                assert_eq!(g.2, real_uri());
            } else {
                assert_eq!(g, w, "other attributes unchanged");
            }
        }
        assert_eq!(body, gpa(&real_uri()));
        let s = rw.stats();
        assert_eq!((s.hosts, s.uris, s.unparsed), (1, 1, 0));
    }

    #[test]
    fn a_response_names_the_guest_again() {
        let mut rw = HttpRewriter::new(REAL, true);
        let mut out = Vec::new();
        rw.request(&post(GUEST, "", &gpa(&guest_uri())), &mut out);
        out.clear();
        rw.response(&ok_ipp(&printer_attrs(REAL)), &mut out);
        assert_eq!(rw.held(), 0);
        let (h, body, used) = message(&out, false, false);
        assert_eq!(used, out.len());
        assert_eq!(
            header(&h, "content-length"),
            Some(body.len().to_string().as_str())
        );
        let (got, _) = attrs_of(&body);
        let uris: Vec<(&str, &str)> = got
            .iter()
            .filter(|a| a.0 == IPP_URI)
            .map(|a| (a.1.as_str(), a.2.as_str()))
            .collect();
        assert_eq!(
            uris,
            [
                (
                    "printer-uri-supported",
                    format!("ipp://{GUEST}/ipp/print").as_str()
                ),
                ("", format!("ipps://{GUEST}/ipp/print").as_str()),
                ("printer-more-info", format!("http://{GUEST}/").as_str()),
                ("printer-icons", "http://cdn.example.com/icon.png"),
            ]
        );
        assert_eq!(body, printer_attrs(GUEST), "the rest byte-identical");
        assert_eq!(rw.stats().uris, 1 + 3);
    }

    #[test]
    fn a_chunked_print_job_keeps_its_document() {
        let attrs = print_job(&guest_uri());
        let doc = document(5000);
        let body = [attrs.as_slice(), &doc].concat();
        let in_uri = attrs.windows(5).position(|w| w == b"laser").unwrap() + 3;
        let a = attrs.len();
        // The attributes end in a 2-byte chunk, then inside a long one
        // (whose rest is still to come when they are rewritten).
        for cuts in [
            [1, 9, 30, in_uri, a - 1, a + 1, a + 700, a + 3000],
            [2, 3, 4, in_uri - 1, in_uri, a - 20, a + 2500, a + 2501],
        ] {
            let input = [
            format!(
                "POST /ipp/print HTTP/1.1\r\nHost: {GUEST}\r\nContent-Type: application/ipp\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .as_bytes(),
            &chunked(&body, &cuts),
        ]
        .concat();
            let mut rw = HttpRewriter::new(REAL, true);
            let mut out = Vec::new();
            let most = feed(&mut rw, true, &input, &[7, 3, 11], &mut out);
            assert!(most < a + 200, "held {most}: more than the attributes");
            assert_eq!(rw.held(), 0);
            let (h, got, used) = message(&out, true, false);
            assert_eq!(used, out.len(), "framing whole, trailer included");
            assert_eq!(header(&h, "host"), Some(REAL));
            assert_eq!(got, [print_job(&real_uri()).as_slice(), &doc].concat());
            assert!(out.ends_with(b"0\r\nX-Checksum: 1\r\n\r\n"));
            assert_eq!(rw.stats().uris, 1);
        }
    }

    #[test]
    fn expect_100_continue_sends_the_head_at_once() {
        let attrs = print_job(&guest_uri());
        let doc = document(2000);
        let body = [attrs.as_slice(), &doc].concat();
        let input = post(GUEST, "Expect: 100-continue\r\n", &body);
        let head_len = input.len() - body.len();
        let mut rw = HttpRewriter::new(REAL, true);
        let mut out = Vec::new();
        rw.request(&input[..head_len], &mut out);
        let mut hs = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Request::new(&mut hs);
        assert_eq!(
            r.parse(&out).unwrap(),
            httparse::Status::Complete(out.len()),
            "the whole head, now"
        );
        let names: Vec<String> = r
            .headers
            .iter()
            .map(|h| h.name.to_ascii_lowercase())
            .collect();
        assert!(
            names.contains(&"transfer-encoding".into())
                && !names.contains(&"content-length".into())
        );
        assert_eq!(rw.held(), 0);

        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        let mut back = Vec::new();
        rw.response(cont, &mut back);
        assert_eq!(back, cont);

        feed(&mut rw, true, &input[head_len..], &[100], &mut out);
        let (h, got, used) = message(&out, true, false);
        assert_eq!(used, out.len());
        assert_eq!(header(&h, "transfer-encoding"), Some("chunked"));
        assert_eq!(got, [print_job(&real_uri()).as_slice(), &doc].concat());

        let fin = ok_ipp(
            &Ipp::new(0)
                .group(1)
                .attr(IPP_URI, "job-uri", &format!("ipp://{REAL}/jobs/3"))
                .end(),
        );
        rw.response(&fin, &mut back);
        let (_, body, used) = message(&back[cont.len()..], false, false);
        assert_eq!(used, back.len() - cont.len());
        assert_eq!(attrs_of(&body).0[1].2, format!("ipp://{GUEST}/jobs/3"));
        assert_eq!(rw.stats().unparsed, 0);
    }

    #[test]
    fn keep_alive_requests_and_a_head_response() {
        let two = [
            post(GUEST, "", &gpa(&guest_uri())),
            post(GUEST, "", &print_job(&guest_uri())),
        ]
        .concat();
        let mut rw = HttpRewriter::new(REAL, true);
        let mut out = Vec::new();
        rw.request(&two, &mut out);
        let (h1, b1, u1) = message(&out, true, false);
        let (h2, b2, u2) = message(&out[u1..], true, false);
        assert_eq!(u1 + u2, out.len());
        assert_eq!(
            (header(&h1, "host"), header(&h2, "host")),
            (Some(REAL), Some(REAL))
        );
        assert_eq!((b1, b2), (gpa(&real_uri()), print_job(&real_uri())));

        // Were the HEAD response taken to have its Content-Length of body,
        // it would swallow (hold) the next response.
        let mut rw = HttpRewriter::new(REAL, true);
        let mut out = Vec::new();
        rw.request(
            format!("HEAD /ipp/print HTTP/1.1\r\nHost: {GUEST}\r\n\r\nGET /x HTTP/1.1\r\nHost: {GUEST}\r\n\r\n").as_bytes(),
            &mut out,
        );
        let head_resp =
            "HTTP/1.1 200 OK\r\nContent-Type: application/ipp\r\nContent-Length: 1234\r\n\r\n";
        let next = |a: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Location: http://{a}/x\r\n\r\nhello"
            )
        };
        let mut back = Vec::new();
        rw.response(format!("{head_resp}{}", next(REAL)).as_bytes(), &mut back);
        assert_eq!(
            String::from_utf8(back).unwrap(),
            format!("{head_resp}{}", next(GUEST))
        );
        assert_eq!(rw.held(), 0);
        assert_eq!(
            rw.stats(),
            RewriteStats {
                hosts: 2,
                uris: 1,
                unparsed: 0
            }
        );
    }

    /// Request and response streams that parse, for the split test.
    fn streams() -> Vec<(Vec<u8>, Vec<u8>)> {
        let doc = document(3000);
        let job = [print_job(&guest_uri()).as_slice(), &doc].concat();
        let chunked_job = [
            format!(
                "POST /ipp/print HTTP/1.1\r\nHost: {GUEST}\r\nContent-Type: application/ipp\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .as_bytes(),
            &chunked(&job, &[5, 40, 77, 200, 2000]),
        ]
        .concat();
        let chunked_resp = [
            &b"HTTP/1.1 200 OK\r\nContent-Type: application/ipp\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            &chunked(&printer_attrs(REAL), &[3, 50, 100]),
        ]
        .concat();
        let bad_ipp = Ipp::new(0x000b)
            .attr(IPP_URI, "printer-uri", &guest_uri())
            .end();
        vec![
            (post(GUEST, "", &gpa(&guest_uri())), ok_ipp(&printer_attrs(REAL))),
            (chunked_job, chunked_resp),
            (
                post(GUEST, "Expect: 100-continue\r\n", &job),
                [&b"HTTP/1.1 100 Continue\r\n\r\n"[..], &ok_ipp(&printer_attrs(REAL))].concat(),
            ),
            (
                [
                    format!("HEAD / HTTP/1.1\r\nHost: {GUEST}\r\n\r\n").into_bytes(),
                    post(GUEST, "", &bad_ipp),
                    post("LASER.netredir.internal:8631", "", &gpa(&guest_uri())),
                ]
                .concat(),
                [
                    format!("HTTP/1.1 200 OK\r\nContent-Length: 99\r\nLocation: http://{REAL}/\r\n\r\n").into_bytes(),
                    format!("HTTP/1.1 301 Moved\r\nLocation: https://{REAL}/admin\r\nContent-Length: 0\r\n\r\n").into_bytes(),
                    b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                ]
                .concat(),
            ),
            (
                [format!("POST / HTTP/1.0\r\nHost: {GUEST}\r\nContent-Type: application/ipp\r\nContent-Length: 9\r\n\r\n").as_bytes(), &Ipp::new(0xb).end()].concat(),
                [&b"HTTP/1.0 200 OK\r\nContent-Type: application/ipp\r\n\r\n"[..], &printer_attrs(REAL), &doc].concat(),
            ),
        ]
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_output(
            case in 0..5usize,
            rs in proptest::collection::vec(1usize..97, 1..40),
            ss in proptest::collection::vec(1usize..97, 1..40),
        ) {
            let (req, resp) = &streams()[case];
            let whole = run(true, req, resp, &[usize::MAX], &[usize::MAX]);
            let split = run(true, req, resp, &rs, &ss);
            prop_assert_eq!(&whole.0, &split.0);
            prop_assert_eq!(&whole.1, &split.1);
            prop_assert_eq!(whole.2, split.2);
            prop_assert!(whole.2.hosts > 0 && whole.2.uris > 0, "{:?}", whole.2);
        }

        #[test]
        fn without_host_anything_comes_out_as_it_went_in(
            prefix in 0..4usize,
            req in proptest::collection::vec(any::<u8>(), 0..1500),
            resp in proptest::collection::vec(any::<u8>(), 0..1500),
            rs in proptest::collection::vec(1usize..300, 1..10),
            ss in proptest::collection::vec(1usize..300, 1..10),
            ipp in any::<bool>(),
        ) {
            // Garbage, and garbage after heads that parse.
            let starts: [(&[u8], &[u8]); 4] = [
                (b"", b""),
                (b"POST / HTTP/1.1\r\nContent-Type: application/ipp\r\nContent-Length: 40\r\n\r\n\x02\x00\x00\x0b\x00\x00\x00\x01\x01",
                 b"HTTP/1.1 200 OK\r\nContent-Type: application/ipp\r\nTransfer-Encoding: chunked\r\n\r\n"),
                (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1a;x\r\n",
                 b"HTTP/1.0 200 OK\r\nContent-Type: application/ipp\r\n\r\n\x02\x00\x00\x00\x00\x00\x00\x01\x04"),
                (b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"),
            ];
            let req = [starts[prefix].0, &req].concat();
            let resp = [starts[prefix].1, &resp].concat();
            let has_host = |b: &[u8]| b.windows(5).any(|w| w.eq_ignore_ascii_case(b"host:"));
            prop_assume!(!has_host(&req) && !has_host(&resp));
            let (qo, so, stats) = run(ipp, &req, &resp, &rs, &ss);
            prop_assert_eq!(qo, req);
            prop_assert_eq!(so, resp);
            prop_assert_eq!((stats.hosts, stats.uris), (0, 0));
        }
    }

    #[test]
    fn without_host_or_matching_uri_a_flow_is_byte_identical() {
        // HTTP/1.0, no Host: nothing says what the guest called the printer.
        let req = [
            &b"POST /ipp/print HTTP/1.0\r\nContent-Type: application/ipp\r\n"[..],
            format!("Content-Length: {}\r\n\r\n", gpa(&guest_uri()).len()).as_bytes(),
            &gpa(&guest_uri()),
        ]
        .concat();
        let resp = ok_ipp(&printer_attrs(REAL));
        let (qo, so, stats) = run(true, &req, &resp, &[13], &[17]);
        assert_eq!((qo, so), (req, resp));
        assert_eq!(stats, RewriteStats::default());

        // A Host, but no URI naming it: only the Host changes.
        let other = print_job("ipp://other.example/ipp/print");
        let req = [
            format!("POST / HTTP/1.1\r\nHost: {GUEST}\r\nContent-Type: application/ipp\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes(),
            &chunked(&other, &[10, 20, 30]),
        ]
        .concat();
        let (qo, _, stats) = run(true, &req, b"", &[5], &[1]);
        let want = String::from_utf8_lossy(&req).replace(GUEST, REAL);
        assert_eq!(String::from_utf8_lossy(&qo), want);
        assert_eq!((stats.hosts, stats.uris, stats.unparsed), (1, 0, 0));
    }

    #[test]
    fn an_overlong_head_or_ipp_passes_unchanged() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: {GUEST}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        let req = [big.as_bytes(), &post(GUEST, "", &gpa(&guest_uri()))].concat();
        let mut rw = HttpRewriter::new(REAL, true);
        let mut out = Vec::new();
        let most = feed(&mut rw, true, &req, &[1000], &mut out);
        assert!(most <= MAX_HEAD);
        rw.request_end(&mut out);
        assert_eq!(out, req, "the rest of the flow passes as it came");
        assert_eq!(
            rw.stats(),
            RewriteStats {
                hosts: 0,
                uris: 0,
                unparsed: 1
            }
        );

        // Attributes past MAX_IPP_ATTRS: that message's body passes as it
        // came (its head still gets the Host), the next one is rewritten.
        let mut long = Ipp::new(0x000b).group(1);
        for _ in 0..5 {
            long = long.attr_bytes(0x30, "x-padding", &[0x55; 60_000]);
        }
        let long = long.attr(IPP_URI, "printer-uri", &guest_uri()).end();
        assert!(long.len() > MAX_IPP_ATTRS);
        let req = [post(GUEST, "", &long), post(GUEST, "", &gpa(&guest_uri()))].concat();
        let mut rw = HttpRewriter::new(REAL, true);
        let mut out = Vec::new();
        let most = feed(&mut rw, true, &req, &[4096], &mut out);
        assert!(most <= MAX_HEAD + MAX_IPP_ATTRS, "{most}");
        assert_eq!(rw.held(), 0);
        let want = [post(REAL, "", &long), post(REAL, "", &gpa(&real_uri()))].concat();
        assert!(out == want, "first body unchanged, second rewritten");
        assert_eq!(
            rw.stats(),
            RewriteStats {
                hosts: 2,
                uris: 1,
                unparsed: 1
            }
        );
    }

    #[test]
    fn malformed_framing_or_ipp_is_passed_and_counted() {
        // Bad first tag: the message passes unchanged, the next is rewritten.
        let bad = Ipp::new(0x000b)
            .attr(IPP_URI, "printer-uri", &guest_uri())
            .end();
        let req = [post(GUEST, "", &bad), post(GUEST, "", &gpa(&guest_uri()))].concat();
        let (qo, _, stats) = run(true, &req, b"", &[9], &[1]);
        assert_eq!(
            qo,
            [post(REAL, "", &bad), post(REAL, "", &gpa(&real_uri()))].concat()
        );
        assert_eq!((stats.uris, stats.unparsed), (1, 1));

        // A chunk size that is not hex: the rest of the flow passes.
        let req = [
            format!("POST / HTTP/1.1\r\nHost: {GUEST}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                .as_bytes(),
            &post(GUEST, "", &gpa(&guest_uri())),
        ]
        .concat();
        let (qo, _, stats) = run(true, &req, b"", &[6], &[1]);
        let head_len = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut want = String::from_utf8_lossy(&req[..head_len])
            .replace(GUEST, REAL)
            .into_bytes();
        want.extend_from_slice(&req[head_len..]);
        assert_eq!(qo, want);
        assert_eq!((stats.hosts, stats.unparsed), (1, 1));

        // Two differing Content-Lengths: the rest of the flow passes.
        let req = format!(
            "POST / HTTP/1.1\r\nHost: {GUEST}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
        );
        let (qo, _, stats) = run(true, req.as_bytes(), b"", &[100], &[1]);
        assert_eq!(qo, req.as_bytes());
        assert_eq!(
            stats,
            RewriteStats {
                hosts: 0,
                uris: 0,
                unparsed: 1
            }
        );
    }

    #[test]
    fn coded_bodies_and_http10_expect_pass_unchanged() {
        // gzip'd IPP cannot be read as it passes: only the Host changes.
        let body = gpa(&guest_uri());
        let req = post(GUEST, "Content-Encoding: gzip\r\n", &body);
        let (qo, _, stats) = run(true, &req, b"", &[10], &[1]);
        assert_eq!(qo, post(REAL, "Content-Encoding: gzip\r\n", &body));
        assert_eq!((stats.uris, stats.unparsed), (0, 1));

        // An HTTP/1.0 client that waits for 100 Continue must get its head
        // through before the body, and there is no chunked to send it as.
        let head = format!(
            "POST / HTTP/1.0\r\nHost: {GUEST}\r\nContent-Type: application/ipp\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut rw = HttpRewriter::new(REAL, true);
        let mut out = Vec::new();
        rw.request(head.as_bytes(), &mut out);
        assert_eq!(out, head.replace(GUEST, REAL).as_bytes());
        rw.request(&body, &mut out);
        assert!(out.ends_with(&body));
        assert_eq!(rw.held(), 0);
    }

    #[test]
    fn tls_from_the_start_passes_both_ways_uncounted() {
        let mut rw = HttpRewriter::new("192.168.1.20:631", true);
        let hello = b"\x16\x03\x01\x00\x05hello GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut out = Vec::new();
        rw.request(hello, &mut out);
        rw.response(b"\x16\x03\x03 server", &mut out);
        rw.request_end(&mut out);
        rw.response_end(&mut out);
        let mut want = hello.to_vec();
        want.extend_from_slice(b"\x16\x03\x03 server");
        assert_eq!(out, want);
        assert_eq!(rw.stats(), RewriteStats::default());
    }

    #[test]
    fn switching_protocols_ends_rewriting_both_ways() {
        let mut rw = HttpRewriter::new(REAL, true);
        let mut out = Vec::new();
        rw.request(
            format!("OPTIONS * HTTP/1.1\r\nHost: {GUEST}\r\nConnection: Upgrade\r\nUpgrade: TLS/1.2\r\n\r\n").as_bytes(),
            &mut out,
        );
        let sw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: TLS/1.2\r\n\r\n\x16\x03\x03";
        let mut back = Vec::new();
        rw.response(sw, &mut back);
        assert_eq!(back, sw);
        out.clear();
        let hello = format!("\x16\x03\x01 Host: {GUEST}\r\n\r\n");
        rw.request(hello.as_bytes(), &mut out);
        assert_eq!(out, hello.as_bytes(), "TLS after the upgrade is not HTTP");
        assert_eq!(rw.stats().hosts, 1);
    }

    #[test]
    fn uris_match_by_host_and_defaulted_port() {
        let a = |s: &str| Authority::parse(s.as_bytes()).unwrap();
        let rw = |u: &str, f: &Authority, t: &Authority| {
            rewrite_uri(u.as_bytes(), f, t).map(|v| String::from_utf8(v).unwrap())
        };
        let (g, r) = (a(GUEST), a(REAL));
        assert_eq!(
            rw("ipp://LASER.netredir.internal:8631/p", &g, &r).as_deref(),
            Some("ipp://192.168.1.20:8631/p")
        );
        assert_eq!(
            rw("ipp://u:pw@laser.netredir.internal:8631/p?q#f", &g, &r).as_deref(),
            Some("ipp://u:pw@192.168.1.20:8631/p?q#f")
        );
        assert_eq!(
            rw("ipp://laser.netredir.internal:8631", &g, &r).as_deref(),
            Some("ipp://192.168.1.20:8631")
        );
        assert_eq!(
            rw("ipp://laser.netredir.internal/p", &g, &r),
            None,
            "631 is not 8631"
        );
        assert_eq!(rw("ipp://laser.other:8631/p", &g, &r), None);
        assert_eq!(rw("ipp://laser.netredir.internal:8631x/p", &g, &r), None);
        assert_eq!(rw("urn:laser.netredir.internal:8631", &g, &r), None);

        let (g, r) = (a("laser"), a("192.168.1.20:631"));
        assert_eq!(
            rw("ipp://laser/p", &g, &r).as_deref(),
            Some("ipp://192.168.1.20/p"),
            "both the default"
        );
        assert_eq!(
            rw("ipp://laser:631/p", &g, &r).as_deref(),
            Some("ipp://192.168.1.20:631/p"),
            "kept explicit"
        );
        assert_eq!(
            rw("http://laser/p", &g, &r).as_deref(),
            Some("http://192.168.1.20:631/p"),
            "not http's default"
        );
        assert_eq!(rw("http://laser:631/p", &g, &r), None, "80 is not 631");

        let r6 = a("[FD00::5]:631");
        assert_eq!(
            rw("ipps://[fd00::5]:631/p", &r6, &g).as_deref(),
            Some("ipps://laser:631/p")
        );
        assert_eq!(a("fd00::5").text(), "[fd00::5]");
        for bad in ["", "a b", "x:y", "h\r\nX: 1", "[zz", "a:70000", "a@b"] {
            assert!(Authority::parse(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }
}
