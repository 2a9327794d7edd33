//! One stream socket (a tunnel connection) on the reactor, the way both
//! daemons drive theirs: at most one send in flight with the bytes behind
//! it queued (a short send's rest goes first next time), one receive at a
//! time, and a count of operations in flight so that the socket is freed
//! only once the kernel is done with it.

use crate::{Completion, Reactor};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// A stream socket with its send queue and its operations in flight.
pub struct Stream {
    fd: OwnedFd,
    ops: u32,
    out: Vec<u8>,
    sending: bool,
}

impl Stream {
    /// Takes `fd` (a connected stream socket).
    pub fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            ops: 0,
            out: Vec::new(),
            sending: false,
        }
    }

    /// The socket, for `shutdown(2)` and addresses.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The bytes waiting to be sent: append to it, then [`Stream::flush`].
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Whether bytes wait (queued, or a send in flight).
    pub fn has_output(&self) -> bool {
        self.sending || !self.out.is_empty()
    }

    /// Sends what is queued, unless a send is already in flight (its
    /// completion, [`Stream::sent`], lets the next one go).
    pub fn flush<T>(&mut self, r: &mut Reactor<T>, tag: T) {
        if self.sending || self.out.is_empty() {
            return;
        }
        let b = std::mem::take(&mut self.out);
        self.sending = true;
        self.ops += 1;
        r.send(self.fd.as_raw_fd(), b, 0, tag);
    }

    /// A send of this stream completed: how many bytes went (what did not
    /// is queued again, ahead of what came meanwhile), or why none did.
    pub fn sent<T>(&mut self, c: Completion<T>) -> io::Result<usize> {
        self.ops -= 1;
        self.sending = false;
        let n = c.io_result()?;
        let mut buf = c.buf.unwrap_or_default();
        if n < buf.len() {
            buf.drain(..n);
            buf.extend_from_slice(&self.out);
            self.out = buf;
        }
        Ok(n)
    }

    /// Starts a receive into `buf` (its spare capacity).
    pub fn recv<T>(&mut self, r: &mut Reactor<T>, buf: Vec<u8>, tag: T) {
        self.ops += 1;
        r.recv(self.fd.as_raw_fd(), buf, tag);
    }

    /// A receive of this stream completed: its result (0: the peer
    /// closed) and its buffer, for the bytes and to receive into again.
    pub fn received<T>(&mut self, c: Completion<T>) -> (io::Result<usize>, Vec<u8>) {
        self.ops -= 1;
        (c.io_result(), c.buf.unwrap_or_default())
    }

    /// Counts an operation of the caller's own on this socket (a connect),
    /// ended by [`Stream::op_done`].
    pub fn op_started(&mut self) {
        self.ops += 1;
    }

    /// See [`Stream::op_started`].
    pub fn op_done(&mut self) {
        self.ops -= 1;
    }

    /// Whether no operation is in flight: the socket may be dropped.
    pub fn idle(&self) -> bool {
        self.ops == 0
    }

    /// `shutdown(2)`: pending operations complete (with an error or EOF).
    pub fn shutdown(&self, how: libc::c_int) {
        // SAFETY: shutdown(2) on a socket we own.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), how) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::time::Duration;

    #[test]
    fn a_short_send_goes_again_first_and_receives_get_it_all_in_order() {
        let mut fds = [0; 2];
        // SAFETY: socketpair into a live array.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: fresh fds we own.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A small send buffer: a big send goes short.
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt with a live int.
        unsafe {
            libc::setsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&small as *const libc::c_int).cast(),
                4,
            )
        };
        let mut reactor = Reactor::<u8>::new(8).unwrap();
        let (mut tx, mut rx) = (Stream::new(a), Stream::new(b));
        let want: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        tx.out().extend_from_slice(&want[..200_000]);
        tx.flush(&mut reactor, 1);
        // Queued behind the send in flight, not sent beside it.
        tx.out().extend_from_slice(&want[200_000..]);
        tx.flush(&mut reactor, 1);
        rx.recv(&mut reactor, Vec::with_capacity(65536), 2);
        let mut got = Vec::new();
        let mut sends = 0;
        while got.len() < want.len() {
            reactor.wait(Some(Duration::from_secs(5))).unwrap();
            while let Some(c) = reactor.next_completion() {
                if c.tag == 1 {
                    tx.sent(c).unwrap();
                    sends += 1;
                    tx.flush(&mut reactor, 1);
                } else {
                    let (n, mut buf) = rx.received(c);
                    assert!(n.unwrap() > 0);
                    got.extend_from_slice(&buf);
                    buf.clear();
                    rx.recv(&mut reactor, buf, 2);
                }
            }
        }
        assert_eq!(got, want);
        assert!(sends >= 2, "{sends} sends");
        assert!(!tx.has_output() && tx.idle());
        assert!(!rx.idle(), "a receive is still pending");
        rx.shutdown(libc::SHUT_RDWR);
        reactor.wait(Some(Duration::from_secs(5))).unwrap();
        let c = reactor.next_completion().unwrap();
        let (n, _) = rx.received(c);
        assert_eq!(n.unwrap(), 0);
        assert!(rx.idle());
    }
}
