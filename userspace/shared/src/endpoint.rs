//! The tunnel endpoint, sans-IO: one value per side that owns the session
//! across connections, the current connection's [`Link`], its side of the
//! preamble, heartbeats, the grace period and resume. Both daemons drive it
//! with a thin I/O loop; neither carries a copy of this logic.
//!
//! Shaped like quinn-proto's `Connection`: no sockets, no threads, no
//! clock. The driver reports what happened (`handle_*`, `new_connection`,
//! `connection_lost`, each with `now`) and then asks what to do
//! (`poll_transmit` for ciphertext to write, `poll_timeout` for when to
//! call `handle_timeout`, `poll_event` for what the application and the
//! driver must act on), looping until each says nothing.
//!
//! ```text
//!  agent: AgentEndpoint                      host: HostHandshake ─▶ HostEndpoint (per VM)
//!  Dial ─▶ driver connects ─▶ new_connection
//!  TLS, Hello, [Pair], Resume{session, rx} ─▶ handle_bytes ─▶ AgentRequest
//!                                             daemon decides: refuse | later | accept(conn, hs)
//!  Welcome{session, rx, resumed} ◀──────────  (Welcome, resume or new session)
//!  ══════ records both ways; Ping every heartbeat; three silent ones drop the connection ══════
//!  connection lost: session kept for `grace`, Dial again after a backoff;
//!  resumed on the next connection with nothing lost or duplicated
//! ```
//!
//! # The agent: [`AgentEndpoint`]
//!
//! One per agent. It asks for a connection with [`AgentEvent::Dial`]; the
//! driver opens a TCP connection and hands its TLS over with
//! [`AgentEndpoint::new_connection`] (or reports the failure with
//! [`AgentEndpoint::connection_lost`]). It sends the preamble, and on the
//! host's answer: `Welcome` resumes the session or starts a new one
//! ([`AgentEvent::Connected`]; a new session is the application's cue to
//! announce its exports, before anything else), `Refused` is fatal
//! ([`AgentEvent::Fatal`]), `Later` closes the connection and retries
//! quietly ([`AgentEvent::Later`] once per reason). Every end of a
//! connection, whoever noticed it, is one [`AgentEvent::Disconnected`]:
//! the driver closes its socket and waits for the next `Dial`, which comes
//! after an exponential backoff (reset by each `Welcome`). A session with
//! no connection for `grace` ends ([`AgentEvent::SessionEnded`]).
//!
//! # The host: [`HostHandshake`], then [`HostEndpoint`]
//!
//! On the host the session belongs to a VM, and which VM is known only
//! once the agent has said who it is, so the endpoint comes in two parts.
//! A [`HostHandshake`] per accepted connection runs TLS and reads the
//! agent's preamble, checking only the protocol (version, order); it
//! yields an [`AgentRequest`] (this key, this name, this pairing secret,
//! wants to resume session X having received N). Admission stays in the
//! daemon: it redeems the pairing secret, picks the VM the key selects,
//! and answers with [`HostHandshake::refuse`], [`HostHandshake::later`]
//! (flush, then close the socket) or by handing the handshake to that
//! VM's [`HostEndpoint::accept`]. The `HostEndpoint` holds the VM's
//! session and the one connection that carries it (a newer one replaces
//! it), answers with `Welcome` (resumed when the session id and key match
//! and the replay buffer still holds what the agent misses), and runs
//! heartbeats and the grace period as the agent does. Connections are
//! named by the daemon's own id (`conn: u64`), so its events say which
//! socket to close.
//!
//! How netredird adopts it: `Conn` keeps its socket, buffers and id and a
//! `HostHandshake` until accepted; `on_preamble`/`vm_for`/pairing become
//! one decision on the `AgentRequest`; `HostSession`, `start_session`,
//! the heartbeat and grace parts of `timers`, and the session half of
//! `drop_conn` go, replaced by one `HostEndpoint` in each `Vm`;
//! `drain_session` becomes a loop over [`HostEndpoint::poll_event`]
//! (`Msg` to the engine, `ConnectionLost` closes that socket and takes the
//! resources offline, `SessionEnded` resets the engine), and `pump` writes
//! what [`HostEndpoint::poll_transmit`] gives to the connection it names.
//! Counters map onto the typed reasons ([`ConnLost`], [`SessionEnd`],
//! [`HandshakeError`]).
//!
//! # Time
//!
//! Every deadline derives from the `now` passed in; [`poll_timeout`]
//! (either side) is the earliest of them. `poll_event` takes no time: what
//! it must date (a connection dropped because its records were bad) uses
//! the last `now` the endpoint was given.
//!
//! [`poll_timeout`]: AgentEndpoint::poll_timeout

mod agent;
mod host;
#[cfg(test)]
mod tests;

pub use agent::{AgentConfig, AgentEndpoint, AgentEvent, Fatal};
pub use host::{
    Accepted, AgentRequest, HandshakeError, HostConfig, HostEndpoint, HostEvent, HostHandshake,
};

use crate::link::Link;
use crate::session::{Session, SessionError};
use crate::wire::Msg;
use std::fmt;
use std::time::{Duration, Instant};

/// A connection must finish TLS and the preamble within this (and an agent
/// waits this long for the host's answer).
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeats a connection may miss before it is dropped.
pub const MISSED_HEARTBEATS: u32 = 3;
/// How often idle flows' compression contexts are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Why a connection ended; the session (if any) waits for a resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnLost {
    /// Nothing arrived for [`MISSED_HEARTBEATS`] heartbeats.
    Silent,
    /// The host did not answer the preamble within [`PREAMBLE_TIMEOUT`].
    NoAnswer,
    /// The peer broke the protocol (TLS, preamble or records).
    Protocol(String),
    /// The driver reported it: end of stream, a socket error, a failed connect.
    Transport(String),
    /// A newer connection of the same agent took the session over.
    Replaced,
    /// The host said "not now"; the agent tries again later.
    Later(String),
    /// The session it carried ended.
    SessionEnded,
}

impl fmt::Display for ConnLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnLost::Silent => write!(f, "silent for {MISSED_HEARTBEATS} heartbeats"),
            ConnLost::NoAnswer => write!(f, "no answer within {}s", PREAMBLE_TIMEOUT.as_secs()),
            ConnLost::Protocol(why) | ConnLost::Transport(why) => write!(f, "{why}"),
            ConnLost::Replaced => write!(f, "replaced by a newer connection"),
            ConnLost::Later(why) => write!(f, "not now: {why}"),
            ConnLost::SessionEnded => write!(f, "its session ended"),
        }
    }
}

/// Why a session ended; its flows are over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// No connection resumed it within the grace period.
    GraceExpired,
    /// The peer started a new session instead of resuming this one.
    Replaced,
    /// The peer asked to resume, but from a point no longer held.
    CannotResume(String),
    /// The application ended it (host: unpaired, detached).
    Closed(String),
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::GraceExpired => {
                write!(f, "the tunnel did not come back within the grace period")
            }
            SessionEnd::Replaced => write!(f, "replaced by a new session"),
            SessionEnd::CannotResume(why) => write!(f, "cannot resume: {why}"),
            SessionEnd::Closed(why) => write!(f, "{why}"),
        }
    }
}

/// A connection in its record stream, with its heartbeat clock.
struct Live {
    link: Link,
    last_rx: Instant,
    last_ping: Instant,
    nonce: u64,
}

impl Live {
    fn new(link: Link, now: Instant) -> Self {
        Self {
            link,
            last_rx: now,
            last_ping: now,
            nonce: 0,
        }
    }

    /// Ciphertext from the socket into the session.
    fn receive(
        &mut self,
        bytes: &[u8],
        session: &mut Session,
        now: Instant,
    ) -> Result<(), ConnLost> {
        self.last_rx = now;
        self.link
            .receive(bytes, Some(session))
            .map(drop)
            .map_err(|e| ConnLost::Protocol(format!("protocol error: {e}")))
    }

    /// When the next ping is due or the connection counts as silent.
    fn deadline(&self, heartbeat: Duration) -> Instant {
        (self.last_ping + heartbeat).min(self.last_rx + heartbeat * MISSED_HEARTBEATS)
    }

    /// Pings when a heartbeat is due; an error if the peer went silent.
    fn tick(
        &mut self,
        now: Instant,
        heartbeat: Duration,
        session: &mut Session,
    ) -> Result<(), ConnLost> {
        if now >= self.last_rx + heartbeat * MISSED_HEARTBEATS {
            return Err(ConnLost::Silent);
        }
        if now >= self.last_ping + heartbeat {
            self.last_ping = now;
            self.nonce += 1;
            session.send_control(Msg::Ping { nonce: self.nonce });
        }
        Ok(())
    }

    /// The session's output (records closed first) as ciphertext.
    fn transmit(&mut self, session: &mut Session, out: &mut Vec<u8>) {
        session.flush();
        self.link.flush(Some(session), out);
    }
}

/// The next message for the application: pings are answered and pongs
/// dropped here; when nothing is left, an acknowledgement goes out if due.
fn next_msg(session: &mut Session) -> Result<Option<Msg>, SessionError> {
    loop {
        match session.poll_msg()? {
            Some(Msg::Ping { nonce }) => session.send_control(Msg::Pong { nonce }),
            Some(Msg::Pong { .. }) => {}
            Some(m) => return Ok(Some(m)),
            None => {
                session.maybe_ack(false);
                return Ok(None);
            }
        }
    }
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
