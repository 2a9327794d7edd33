//! One tunnel connection, sans-IO: TLS, then a short preamble of plain
//! messages, then the session's record stream.
//!
//! ```text
//!  agent                                   host
//!  ── TLS 1.3 handshake (both certificates pinned) ──
//!  Hello, [Pair], Resume{session, received}  ─▶
//!                                          ◀─  Welcome{session, received, resumed} | Refused
//!  ═════════ records (see session) both ways from here ═════════
//! ```
//!
//! The driver feeds ciphertext in with [`Link::receive`] and writes out
//! whatever [`Link::flush`] gives it; the link never touches a socket.

use crate::session::{Session, SessionError};
use crate::tls::{Fingerprint, Tls, TlsError};
use crate::wire::{Decoder, Msg, WireError};

/// Why a connection must be dropped.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TLS failed (handshake, pinning, garbage).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A preamble message was malformed.
    #[error("bad preamble: {0}")]
    Wire(#[from] WireError),
    /// The record stream was malformed.
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// A connection's TLS and framing state.
pub struct Link {
    tls: Tls,
    preamble: Option<Decoder>,
    plain: Vec<u8>,
}

impl Link {
    /// A link over a fresh TLS connection, starting in the preamble.
    pub fn new(tls: Tls) -> Self {
        Self {
            tls,
            preamble: Some(Decoder::new()),
            plain: Vec::new(),
        }
    }

    /// Whether the TLS handshake is still going on.
    pub fn handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    /// The peer's certificate fingerprint, once the handshake is done.
    pub fn peer(&self) -> Option<Fingerprint> {
        self.tls.peer_fingerprint()
    }

    /// Whether the peer closed TLS cleanly.
    pub fn peer_closed(&self) -> bool {
        self.tls.peer_closed()
    }

    /// Whether the record stream has started.
    pub fn in_records(&self) -> bool {
        self.preamble.is_none()
    }

    /// Ciphertext from the socket. In the preamble, returns the messages
    /// that arrived; afterwards bytes go to `session` and this returns
    /// nothing (read them with `session.poll_msg()`).
    pub fn receive(
        &mut self,
        cipher: &[u8],
        session: Option<&mut Session>,
    ) -> Result<Vec<Msg>, LinkError> {
        self.plain.clear();
        self.tls.feed(cipher, &mut self.plain)?;
        match &mut self.preamble {
            Some(d) => {
                d.feed(&self.plain);
                let mut msgs = Vec::new();
                while let Some(m) = d.next_msg()? {
                    msgs.push(m);
                }
                Ok(msgs)
            }
            None => {
                if let Some(s) = session {
                    s.feed(&self.plain)?;
                }
                Ok(Vec::new())
            }
        }
    }

    /// Queues a preamble message.
    pub fn send_preamble(&mut self, m: &Msg) {
        let mut b = Vec::new();
        m.emit(&mut b);
        self.tls.write(&b);
    }

    /// Ends the preamble: bytes that arrived after it belong to `session`.
    pub fn enter_records(&mut self, session: &mut Session) -> Result<(), LinkError> {
        if let Some(mut d) = self.preamble.take() {
            let rest = d.take_rest();
            if !rest.is_empty() {
                session.feed(&rest)?;
            }
        }
        Ok(())
    }

    /// Moves the session's output (if in records) into TLS and appends the
    /// ciphertext to send to `out`.
    pub fn flush(&mut self, session: Option<&mut Session>, out: &mut Vec<u8>) {
        if self.preamble.is_none()
            && let Some(s) = session
            && s.has_output()
        {
            let b = s.take_output();
            self.tls.write(&b);
        }
        self.tls.take_ciphertext(out);
    }

    /// Queues a TLS close_notify.
    pub fn close(&mut self) {
        self.tls.close();
    }
}
