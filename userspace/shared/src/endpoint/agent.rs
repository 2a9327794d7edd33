//! The agent's endpoint: it dials, runs its preamble, keeps one session
//! across connections and dials again when one is lost.

use super::{ConnLost, Live, PREAMBLE_TIMEOUT, SWEEP_EVERY, SessionEnd, earliest, next_msg};
use crate::link::{Link, LinkError};
use crate::session::{Session, SessionConfig};
use crate::tls::{Fingerprint, Tls, TlsError};
use crate::wire::{Msg, VERSION};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the agent's endpoint needs to know.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The name the agent gives itself in the host's logs (its Hello).
    pub name: String,
    /// A pairing code's secret, sent until the first Welcome pairs us.
    pub pair: Option<Vec<u8>>,
    /// The configuration of each new session.
    pub session: SessionConfig,
    /// Time between pings; [`super::MISSED_HEARTBEATS`] of them in silence
    /// drop the connection.
    pub heartbeat: Duration,
    /// How long a session outlives its connection, waiting for a resume.
    pub grace: Duration,
    /// How long to wait for a connection to be up (TCP, TLS, Welcome).
    pub preamble_timeout: Duration,
    /// First delay before dialing again; it doubles on each failure.
    pub min_backoff: Duration,
    /// Longest delay before dialing again.
    pub max_backoff: Duration,
}

impl AgentConfig {
    /// The agent's defaults, so that callers name only what they change.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            pair: None,
            session: SessionConfig::default(),
            heartbeat: Duration::from_secs(5),
            grace: Duration::from_secs(30),
            preamble_timeout: PREAMBLE_TIMEOUT,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Why the agent must stop: trying again cannot help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fatal {
    /// The host refused this agent, and said why.
    Refused(String),
    /// The host's certificate is not the pinned one (or the pairing code's).
    HostMismatch,
}

/// What the agent's driver and application act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// Open a TCP connection to the host now, then hand its TLS to
    /// [`AgentEndpoint::new_connection`] (or report the failure with
    /// [`AgentEndpoint::connection_lost`]).
    Dial,
    /// The host accepted the pairing code: keep its fingerprint as the pin
    /// (the code is not sent again).
    Paired(Fingerprint),
    /// The session is up on this connection. Not `resumed`: a new session,
    /// so announce what this agent offers now, before anything else.
    Connected {
        /// Whether the earlier session continues.
        resumed: bool,
    },
    /// A message from the host for the application.
    Msg(Msg),
    /// The connection is over (whoever noticed): close the socket if it is
    /// still open. A session is kept for the grace period; the next
    /// [`AgentEvent::Dial`] comes after `retry_in`.
    Disconnected {
        /// Why.
        why: ConnLost,
        /// Whether it had carried the session (else it never came up).
        was_up: bool,
        /// When the endpoint dials again.
        retry_in: Duration,
    },
    /// The host said "not now" for a reason it had not given before; the
    /// endpoint keeps trying quietly.
    Later(String),
    /// The session ended: every flow is over.
    SessionEnded(SessionEnd),
    /// The agent cannot go on; the endpoint does nothing more.
    Fatal(Fatal),
}

enum State {
    /// Dials at this time.
    Waiting(Instant),
    /// Asked the driver to dial at this time; no link yet.
    Dialing(Instant),
    /// TLS and the preamble, with the time of the last bytes received.
    Preamble(Link, Instant),
    /// Carrying the session.
    Up(Live),
    /// Stopped for good.
    Fatal,
}

struct AgentSession {
    id: u64,
    session: Session,
    /// When its last connection was lost (None while connected).
    lost_at: Option<Instant>,
}

/// The agent's side of the tunnel: one per agent, for its whole life.
pub struct AgentEndpoint {
    cfg: AgentConfig,
    state: State,
    sess: Option<AgentSession>,
    backoff: Duration,
    events: VecDeque<AgentEvent>,
    /// The host's last "not now", reported once until it changes.
    later: Option<String>,
    /// The latest time the driver gave.
    now: Instant,
    next_sweep: Instant,
}

impl AgentEndpoint {
    /// An endpoint that asks to dial at once.
    pub fn new(cfg: AgentConfig, now: Instant) -> Self {
        let backoff = cfg.min_backoff;
        Self {
            cfg,
            state: State::Dialing(now),
            sess: None,
            backoff,
            events: VecDeque::from([AgentEvent::Dial]),
            later: None,
            now,
            next_sweep: now + SWEEP_EVERY,
        }
    }

    /// The TCP connection asked for by [`AgentEvent::Dial`] is up; the
    /// endpoint sends its preamble over `tls`.
    pub fn new_connection(&mut self, tls: Tls, now: Instant) {
        self.now = now;
        if !matches!(self.state, State::Dialing(_)) {
            // Not asked for (stopped, or already connected): unused.
            return;
        }
        let mut link = Link::new(tls);
        link.send_preamble(&Msg::Hello {
            version: VERSION,
            name: self.cfg.name.clone(),
        });
        if let Some(secret) = &self.cfg.pair {
            link.send_preamble(&Msg::Pair {
                secret: secret.clone(),
            });
        }
        let (session, received) = self
            .sess
            .as_ref()
            .map_or((0, 0), |s| (s.id, s.session.received()));
        link.send_preamble(&Msg::Resume { session, received });
        self.state = State::Preamble(link, now);
    }

    /// Ciphertext the connection delivered.
    pub fn handle_bytes(&mut self, bytes: &[u8], now: Instant) {
        self.now = now;
        match &mut self.state {
            State::Up(live) => {
                let s = &mut self.sess.as_mut().expect("up with a session").session;
                if let Err(why) = live.receive(bytes, s, now) {
                    self.disconnect(why, now);
                }
            }
            State::Preamble(link, last_rx) => {
                *last_rx = now;
                let handshaking = link.handshaking();
                match link.receive(bytes, None) {
                    Ok(msgs) => {
                        for m in msgs {
                            self.on_preamble(m, now);
                        }
                    }
                    Err(LinkError::Tls(TlsError::HostMismatch)) => self.fatal(Fatal::HostMismatch),
                    Err(e) if handshaking => self.disconnect(
                        ConnLost::Protocol(format!("TLS handshake failed: {e}")),
                        now,
                    ),
                    Err(e) => {
                        self.disconnect(ConnLost::Protocol(format!("protocol error: {e}")), now)
                    }
                }
            }
            State::Waiting(_) | State::Dialing(_) | State::Fatal => {}
        }
    }

    /// The driver lost the connection (end of stream, a socket error) or
    /// could not make it; ignored if the endpoint already dropped it.
    pub fn connection_lost(&mut self, why: impl Into<String>, now: Instant) {
        self.now = now;
        if matches!(
            self.state,
            State::Dialing(_) | State::Preamble(..) | State::Up(_)
        ) {
            self.disconnect(ConnLost::Transport(why.into()), now);
        }
    }

    /// Runs what is due by `now`: dialing, pings, dropping a silent or
    /// unanswered connection, ending a session past its grace period.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        let hb = self.cfg.heartbeat;
        match &mut self.state {
            State::Waiting(at) if now >= *at => {
                self.state = State::Dialing(now);
                self.events.push_back(AgentEvent::Dial);
            }
            State::Dialing(since) | State::Preamble(_, since)
                if now >= *since + self.cfg.preamble_timeout =>
            {
                self.disconnect(ConnLost::NoAnswer, now);
            }
            State::Up(live) => {
                let s = &mut self.sess.as_mut().expect("up with a session").session;
                if let Err(why) = live.tick(now, hb, s) {
                    self.disconnect(why, now);
                }
            }
            _ => {}
        }
        if let Some(s) = &self.sess
            && let Some(lost) = s.lost_at
            && now >= lost + self.cfg.grace
        {
            self.end_session(SessionEnd::GraceExpired);
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_EVERY;
            if let Some(s) = self.sess.as_mut() {
                s.session.sweep_idle(now);
            }
        }
    }

    /// When [`AgentEndpoint::handle_timeout`] must run next; None once
    /// stopped.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let state = match &self.state {
            State::Waiting(at) => Some(*at),
            State::Dialing(since) | State::Preamble(_, since) => {
                Some(*since + self.cfg.preamble_timeout)
            }
            State::Up(live) => Some(live.deadline(self.cfg.heartbeat)),
            State::Fatal => return None,
        };
        let grace = self
            .sess
            .as_ref()
            .and_then(|s| s.lost_at)
            .map(|t| t + self.cfg.grace);
        let sweep = self.sess.as_ref().map(|_| self.next_sweep);
        earliest(earliest(state, grace), sweep)
    }

    /// Appends the ciphertext to write to the connection to `out`.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        match &mut self.state {
            State::Preamble(link, _) => link.flush(None, out),
            State::Up(live) => {
                let s = &mut self.sess.as_mut().expect("up with a session").session;
                live.transmit(s, out);
            }
            _ => {}
        }
    }

    /// The next thing to act on: the endpoint's events first, then the
    /// host's messages one at a time (the session unpacks a record only
    /// as they are taken).
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        let s = self.sess.as_mut()?;
        match next_msg(&mut s.session) {
            Ok(Some(m)) => Some(AgentEvent::Msg(m)),
            Ok(None) => None,
            Err(e) => {
                self.disconnect(ConnLost::Protocol(format!("protocol error: {e}")), self.now);
                self.events.pop_front()
            }
        }
    }

    /// Queues a session message for the host; dropped if there is no
    /// session (its flows are over anyway).
    pub fn send(&mut self, msg: Msg, now: Instant) {
        self.now = now;
        if let Some(s) = self.sess.as_mut() {
            s.session.send(msg, now);
        }
    }

    /// Whether the application may queue more (a session exists and its
    /// replay buffer has room); when false, stop reading from flows.
    pub fn can_send(&self) -> bool {
        self.sess.as_ref().is_some_and(|s| s.session.can_send())
    }

    /// Whether a connection carries the session now.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    /// Whether a session exists (connected or within its grace period).
    pub fn has_session(&self) -> bool {
        self.sess.is_some()
    }

    /// The session, for its counters.
    pub fn session(&self) -> Option<&Session> {
        self.sess.as_ref().map(|s| &s.session)
    }

    /// The session, for per-flow settings (compression, forgetting a flow).
    pub fn session_mut(&mut self) -> Option<&mut Session> {
        self.sess.as_mut().map(|s| &mut s.session)
    }

    fn on_preamble(&mut self, m: Msg, now: Instant) {
        match m {
            Msg::Refused { reason } => self.fatal(Fatal::Refused(reason)),
            Msg::Later { reason } => {
                if self.later.as_deref() != Some(reason.as_str()) {
                    self.later = Some(reason.clone());
                    self.events.push_back(AgentEvent::Later(reason.clone()));
                }
                self.disconnect(ConnLost::Later(reason), now);
            }
            Msg::Welcome {
                session,
                received,
                resumed,
            } => self.on_welcome(session, received, resumed, now),
            other => self.disconnect(
                ConnLost::Protocol(format!("unexpected {other:?} in the preamble")),
                now,
            ),
        }
    }

    fn on_welcome(&mut self, id: u64, received: u64, resumed: bool, now: Instant) {
        let State::Preamble(link, _) = std::mem::replace(&mut self.state, State::Fatal) else {
            unreachable!("a Welcome is read only in the preamble");
        };
        let mut link = link;
        if self.cfg.pair.take().is_some()
            && let Some(fp) = link.peer()
        {
            self.events.push_back(AgentEvent::Paired(fp));
        }
        let mut ended = SessionEnd::Replaced;
        let mut ok = false;
        if resumed
            && let Some(s) = self.sess.as_mut()
            && s.id == id
        {
            s.session.connection_lost();
            match s.session.resume(received) {
                Ok(()) => {
                    s.lost_at = None;
                    ok = true;
                }
                Err(e) => ended = SessionEnd::CannotResume(e.to_string()),
            }
        }
        if !ok {
            if self.sess.take().is_some() {
                self.events.push_back(AgentEvent::SessionEnded(ended));
            }
            self.sess = Some(AgentSession {
                id,
                session: Session::new(self.cfg.session.clone()),
                lost_at: None,
            });
        }
        self.backoff = self.cfg.min_backoff;
        self.later = None;
        let s = self.sess.as_mut().expect("set");
        if let Err(e) = link.enter_records(&mut s.session) {
            self.state = State::Up(Live::new(link, now));
            return self.disconnect(ConnLost::Protocol(format!("protocol error: {e}")), now);
        }
        self.state = State::Up(Live::new(link, now));
        self.events.push_back(AgentEvent::Connected { resumed: ok });
    }

    /// Drops the connection (if any) and schedules the next dial.
    fn disconnect(&mut self, why: ConnLost, now: Instant) {
        let was_up = matches!(self.state, State::Up(_));
        if was_up && let Some(s) = self.sess.as_mut() {
            s.session.connection_lost();
            s.lost_at = Some(now);
        }
        let retry_in = self.backoff;
        self.backoff = (self.backoff * 2).min(self.cfg.max_backoff);
        self.state = State::Waiting(now + retry_in);
        self.events.push_back(AgentEvent::Disconnected {
            why,
            was_up,
            retry_in,
        });
    }

    fn end_session(&mut self, why: SessionEnd) {
        if self.sess.take().is_some() {
            self.events.push_back(AgentEvent::SessionEnded(why));
        }
    }

    fn fatal(&mut self, why: Fatal) {
        self.state = State::Fatal;
        self.events.push_back(AgentEvent::Fatal(why));
    }
}
