//! The host's endpoint: a handshake per connection until the daemon knows
//! which VM the agent serves, then that VM's session endpoint.

use super::{ConnLost, Live, PREAMBLE_TIMEOUT, SWEEP_EVERY, SessionEnd, earliest, next_msg};
use crate::link::{Link, LinkError};
use crate::session::{Session, SessionConfig};
use crate::tls::{Fingerprint, Tls, TlsError};
use crate::wire::{Msg, VERSION};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What an agent asked for in its preamble; the daemon decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRequest {
    /// The agent's key (its certificate's fingerprint), proven by TLS.
    pub key: Fingerprint,
    /// The name it gives itself, for logs.
    pub name: String,
    /// The secret half of a pairing code, if it brought one.
    pub pair: Option<Vec<u8>>,
    /// The session it wants to resume (0: none).
    pub session: u64,
    /// The highest record of that session it has processed.
    pub received: u64,
}

/// Why a connection ended in its handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// TLS failed (not TLS at all, an unknown or broken certificate).
    #[error("TLS handshake failed: {0}")]
    Tls(TlsError),
    /// The preamble's bytes do not parse.
    #[error("tunnel protocol error: {0}")]
    Malformed(LinkError),
    /// The agent speaks another protocol version (refused, with the reason).
    #[error("protocol version {0} (this netredird speaks {VERSION})")]
    Version(u16),
    /// The preamble's messages are out of order (refused, with the reason).
    #[error("{0}")]
    Protocol(String),
    /// TLS and the preamble did not finish within [`PREAMBLE_TIMEOUT`].
    #[error("no handshake within {PREAMBLE_TIMEOUT:?}")]
    TimedOut,
}

/// One accepted connection until its agent is admitted: TLS and the
/// agent's preamble. Errors and refusals leave an answer in
/// [`HostHandshake::poll_transmit`]: write it, then close the socket.
pub struct HostHandshake {
    link: Link,
    since: Instant,
    hello: Option<String>,
    pair: Option<Vec<u8>>,
    request: Option<AgentRequest>,
    /// Refused, told to come back later, or failed: nothing more is read.
    closing: bool,
}

impl HostHandshake {
    /// A handshake over a freshly accepted connection's TLS.
    pub fn new(tls: Tls, now: Instant) -> Self {
        Self {
            link: Link::new(tls),
            since: now,
            hello: None,
            pair: None,
            request: None,
            closing: false,
        }
    }

    /// Ciphertext from the connection. Yields the agent's request once its
    /// preamble is complete (then answer it); bytes that follow wait for
    /// [`HostEndpoint::accept`].
    pub fn handle_bytes(
        &mut self,
        bytes: &[u8],
        _now: Instant,
    ) -> Result<Option<AgentRequest>, HandshakeError> {
        if self.closing {
            return Ok(None);
        }
        let handshaking = self.link.handshaking();
        let msgs = match self.link.receive(bytes, None) {
            Ok(msgs) => msgs,
            Err(e) => {
                self.closing = true;
                return Err(match e {
                    LinkError::Tls(e) if handshaking => HandshakeError::Tls(e),
                    e => HandshakeError::Malformed(e),
                });
            }
        };
        for m in msgs {
            if let Some(req) = self.on_preamble(m)? {
                return Ok(Some(req));
            }
        }
        Ok(None)
    }

    fn on_preamble(&mut self, m: Msg) -> Result<Option<AgentRequest>, HandshakeError> {
        let Some(key) = self.link.peer() else {
            return Err(self.protocol("a message before TLS was done".into()));
        };
        match m {
            Msg::Hello { version, .. } if version != VERSION => {
                let e = HandshakeError::Version(version);
                self.refuse(&e.to_string());
                Err(e)
            }
            Msg::Hello { name, .. } => {
                self.hello = Some(name);
                Ok(None)
            }
            Msg::Pair { secret } => {
                self.pair = Some(secret);
                Ok(None)
            }
            Msg::Resume { session, received } => {
                let Some(name) = self.hello.clone() else {
                    return Err(self.protocol("Resume before Hello".into()));
                };
                let req = AgentRequest {
                    key,
                    name,
                    pair: self.pair.take(),
                    session,
                    received,
                };
                self.request = Some(req.clone());
                Ok(Some(req))
            }
            other => Err(self.protocol(format!("unexpected {other:?} in the preamble"))),
        }
    }

    /// Refuses with `why` and returns the error saying so.
    fn protocol(&mut self, why: String) -> HandshakeError {
        self.refuse(&why);
        HandshakeError::Protocol(why)
    }

    /// Refuses the agent for good, telling it why; flush, then close.
    pub fn refuse(&mut self, why: &str) {
        self.close_with(Msg::Refused { reason: why.into() });
    }

    /// Tells the agent "not now" (it tries again); flush, then close.
    pub fn later(&mut self, why: &str) {
        self.close_with(Msg::Later { reason: why.into() });
    }

    fn close_with(&mut self, last: Msg) {
        self.link.send_preamble(&last);
        self.link.close();
        self.closing = true;
    }

    /// Whether the connection is answered or failed: once its output is
    /// written, close it.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// The agent's key, once TLS has proven it.
    pub fn peer(&self) -> Option<Fingerprint> {
        self.link.peer()
    }

    /// When the time for the handshake runs out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.closing && self.request.is_none()).then_some(self.since + PREAMBLE_TIMEOUT)
    }

    /// An error once the handshake has taken too long: close the connection.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), HandshakeError> {
        if self.poll_timeout().is_some_and(|t| now >= t) {
            self.closing = true;
            return Err(HandshakeError::TimedOut);
        }
        Ok(())
    }

    /// Appends the ciphertext to write (TLS, the answer) to `out`.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        self.link.flush(None, out);
    }
}

/// What a VM's endpoint needs to know.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The configuration of each new session.
    pub session: SessionConfig,
    /// Time between pings; [`super::MISSED_HEARTBEATS`] of them in silence
    /// drop the connection.
    pub heartbeat: Duration,
    /// How long a session outlives its connection, waiting for a resume.
    pub grace: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            heartbeat: Duration::from_secs(5),
            grace: Duration::from_secs(30),
        }
    }
}

/// What the daemon acts on for one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// A message from the agent for the engine.
    Msg(Msg),
    /// Connection `conn` no longer carries the session: close its socket
    /// if still open. The session waits for a resume, up to the grace
    /// period (unless it ended too).
    ConnectionLost {
        /// The daemon's id of the connection.
        conn: u64,
        /// Why.
        why: ConnLost,
    },
    /// The session ended: every flow is over, the resources are gone.
    SessionEnded(SessionEnd),
}

/// What [`HostEndpoint::accept`] made of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The session carried on (else a new one started).
    pub resumed: bool,
    /// The session's id.
    pub session: u64,
}

struct HostSession {
    id: u64,
    session: Session,
    agent: Fingerprint,
    name: String,
    lost_at: Option<Instant>,
    reconnects: u64,
}

/// One VM's side of the tunnel: its session and the connection carrying it.
pub struct HostEndpoint {
    cfg: HostConfig,
    sess: Option<HostSession>,
    conn: Option<(u64, Live)>,
    events: VecDeque<HostEvent>,
    now: Instant,
    next_sweep: Instant,
}

impl HostEndpoint {
    /// An endpoint with no session yet.
    pub fn new(cfg: HostConfig, now: Instant) -> Self {
        Self {
            cfg,
            sess: None,
            conn: None,
            events: VecDeque::new(),
            now,
            next_sweep: now + SWEEP_EVERY,
        }
    }

    /// Takes over an admitted handshake as connection `conn`: resumes the
    /// session if the agent asked for this one (same key) and it can be,
    /// else starts a new one; answers Welcome. A connection that carried
    /// the session before is replaced.
    pub fn accept(&mut self, conn: u64, hs: HostHandshake, now: Instant) -> Accepted {
        self.now = now;
        let req = hs.request.clone().unwrap_or_else(|| AgentRequest {
            key: hs.link.peer().unwrap_or(Fingerprint([0; 32])),
            name: String::new(),
            pair: None,
            session: 0,
            received: 0,
        });
        if let Some((old, _)) = self.conn.take() {
            self.events.push_back(HostEvent::ConnectionLost {
                conn: old,
                why: ConnLost::Replaced,
            });
        }
        let mut ended = SessionEnd::Replaced;
        let mut resumed = false;
        if let Some(s) = self.sess.as_mut()
            && s.id == req.session
            && req.session != 0
            && s.agent == req.key
        {
            s.session.connection_lost();
            match s.session.resume(req.received) {
                Ok(()) => {
                    resumed = true;
                    s.lost_at = None;
                    s.reconnects += 1;
                    s.name = req.name.clone();
                }
                Err(e) => ended = SessionEnd::CannotResume(e.to_string()),
            }
        }
        if !resumed {
            if self.sess.take().is_some() {
                self.events.push_back(HostEvent::SessionEnded(ended));
            }
            self.sess = Some(HostSession {
                id: new_session_id(),
                session: Session::new(self.cfg.session.clone()),
                agent: req.key,
                name: req.name.clone(),
                lost_at: None,
                reconnects: 0,
            });
        }
        let s = self.sess.as_mut().expect("set");
        let mut link = hs.link;
        link.send_preamble(&Msg::Welcome {
            session: s.id,
            received: s.session.received(),
            resumed,
        });
        let accepted = Accepted {
            resumed,
            session: s.id,
        };
        let entered = link.enter_records(&mut s.session);
        self.conn = Some((conn, Live::new(link, now)));
        if let Err(e) = entered {
            self.drop_connection(ConnLost::Protocol(format!("protocol error: {e}")), now);
        }
        accepted
    }

    /// Ciphertext from connection `conn`; ignored unless it carries the
    /// session (bytes still arriving on a replaced one).
    pub fn handle_bytes(&mut self, conn: u64, bytes: &[u8], now: Instant) {
        self.now = now;
        let Some((c, live)) = self.conn.as_mut() else {
            return;
        };
        if *c != conn {
            return;
        }
        let s = &mut self
            .sess
            .as_mut()
            .expect("a connection has a session")
            .session;
        if let Err(why) = live.receive(bytes, s, now) {
            self.drop_connection(why, now);
        }
    }

    /// The driver lost connection `conn` (end of stream, a socket error).
    pub fn connection_lost(&mut self, conn: u64, why: impl Into<String>, now: Instant) {
        if self.connection() == Some(conn) {
            self.drop_connection(ConnLost::Transport(why.into()), now);
        }
    }

    /// Stops using the current connection (the daemon's own reason, e.g.
    /// an unexpected message); the session waits for a resume.
    pub fn drop_connection(&mut self, why: ConnLost, now: Instant) {
        self.now = now;
        let Some((conn, _)) = self.conn.take() else {
            return;
        };
        if let Some(s) = self.sess.as_mut() {
            s.session.connection_lost();
            s.lost_at = Some(now);
        }
        self.events
            .push_back(HostEvent::ConnectionLost { conn, why });
    }

    /// Ends the session now (unpaired, detached) and drops its connection.
    pub fn end_session(&mut self, why: SessionEnd, now: Instant) {
        self.drop_connection(ConnLost::SessionEnded, now);
        if self.sess.take().is_some() {
            self.events.push_back(HostEvent::SessionEnded(why));
        }
    }

    /// Runs what is due by `now`: pings, dropping a silent connection,
    /// ending a session past its grace period.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if let Some((_, live)) = self.conn.as_mut() {
            let s = &mut self
                .sess
                .as_mut()
                .expect("a connection has a session")
                .session;
            if let Err(why) = live.tick(now, self.cfg.heartbeat, s) {
                self.drop_connection(why, now);
            }
        }
        if let Some(s) = &self.sess
            && let Some(lost) = s.lost_at
            && now >= lost + self.cfg.grace
        {
            self.sess = None;
            self.events
                .push_back(HostEvent::SessionEnded(SessionEnd::GraceExpired));
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_EVERY;
            if let Some(s) = self.sess.as_mut() {
                s.session.sweep_idle(now);
            }
        }
    }

    /// When [`HostEndpoint::handle_timeout`] must run next (None: nothing
    /// to time, no session).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let s = self.sess.as_ref()?;
        let conn = self
            .conn
            .as_ref()
            .map(|(_, live)| live.deadline(self.cfg.heartbeat));
        let grace = s.lost_at.map(|t| t + self.cfg.grace);
        earliest(earliest(conn, grace), Some(self.next_sweep))
    }

    /// Appends the ciphertext to write to `out`, and says which connection
    /// it is for (None: no connection carries the session).
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> Option<u64> {
        let (conn, live) = self.conn.as_mut()?;
        let s = &mut self
            .sess
            .as_mut()
            .expect("a connection has a session")
            .session;
        live.transmit(s, out);
        Some(*conn)
    }

    /// The next thing to act on: the endpoint's events first, then the
    /// agent's messages one at a time.
    pub fn poll_event(&mut self) -> Option<HostEvent> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        let s = self.sess.as_mut()?;
        match next_msg(&mut s.session) {
            Ok(Some(m)) => Some(HostEvent::Msg(m)),
            Ok(None) => None,
            Err(e) => {
                self.drop_connection(ConnLost::Protocol(format!("protocol error: {e}")), self.now);
                self.events.pop_front()
            }
        }
    }

    /// Queues a session message for the agent; dropped without a session.
    pub fn send(&mut self, msg: Msg, now: Instant) {
        self.now = now;
        if let Some(s) = self.sess.as_mut() {
            s.session.send(msg, now);
        }
    }

    /// Whether the engine may queue more (a session with room to replay).
    pub fn can_send(&self) -> bool {
        self.sess.as_ref().is_some_and(|s| s.session.can_send())
    }

    /// The daemon's id of the connection carrying the session.
    pub fn connection(&self) -> Option<u64> {
        self.conn.as_ref().map(|(c, _)| *c)
    }

    /// The session, for its counters.
    pub fn session(&self) -> Option<&Session> {
        self.sess.as_ref().map(|s| &s.session)
    }

    /// The session, for per-flow settings.
    pub fn session_mut(&mut self) -> Option<&mut Session> {
        self.sess.as_mut().map(|s| &mut s.session)
    }

    /// The session's id (what the agent quotes to resume it).
    pub fn session_id(&self) -> Option<u64> {
        self.sess.as_ref().map(|s| s.id)
    }

    /// The key and name of the agent whose session this is.
    pub fn agent(&self) -> Option<(&Fingerprint, &str)> {
        self.sess.as_ref().map(|s| (&s.agent, s.name.as_str()))
    }

    /// Times the session resumed on a new connection.
    pub fn reconnects(&self) -> u64 {
        self.sess.as_ref().map_or(0, |s| s.reconnects)
    }

    /// Since when the session has had no connection.
    pub fn lost_at(&self) -> Option<Instant> {
        self.sess.as_ref().and_then(|s| s.lost_at)
    }
}

/// A session id no earlier session of any agent is likely to have had.
fn new_session_id() -> u64 {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 8];
    if SystemRandom::new().fill(&mut b).is_err() {
        // No OS randomness: the clock still tells sessions apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64).to_ne_bytes();
    }
    u64::from_ne_bytes(b) | 1
}
