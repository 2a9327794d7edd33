//! The agent's datagram side: UDP flows to real resources and the pings
//! that answer the guest's pings of a vIP.
//!
//! A UDP flow is a connected UDP socket with one receive always in flight
//! and a short queue of datagrams to send; it ends when the host says so
//! (idle timeout there) or the session ends. A ping is an unprivileged
//! ICMP socket: one echo request, one receive with a timeout, one answer.

use super::*;

/// Datagrams queued toward one resource; more are dropped (UDP may).
pub const MAX_QUEUED: usize = 64;
/// How long the real resource has to answer a ping.
pub const ECHO_WAIT: Duration = Duration::from_secs(2);

/// One UDP flow.
pub struct UFlow {
    pub id: FlowId,
    pub fd: OwnedFd,
    pub ops: u32,
    pub receiving: bool,
    pub queue: VecDeque<Vec<u8>>,
    pub sending: bool,
    pub dead: bool,
}

/// One ping in progress.
pub struct EchoOp {
    pub token: u32,
    /// Kept open until both operations on it completed.
    pub _fd: OwnedFd,
    pub ops: u32,
    pub answered: bool,
    /// A raw ICMP socket (no ping socket allowed): what it receives must be
    /// checked to be an echo reply.
    pub raw: bool,
}

fn dgram_socket(addr: &SocketAddr, protocol: i32) -> std::io::Result<OwnedFd> {
    icmp_or_udp_socket(addr, libc::SOCK_DGRAM, protocol)
}

/// A socket of `kind` connected to `addr` (datagram, or raw for ICMP).
fn icmp_or_udp_socket(addr: &SocketAddr, kind: i32, protocol: i32) -> std::io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (sa, len) = netredir_uring::sockaddr(*addr);
    // SAFETY: connect(2) of a datagram socket: no I/O, returns at once.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

impl Agent {
    pub(crate) fn open_udp(&mut self, flow: FlowId, resource: u32, port: u16) {
        let Some(addr) = self.target(resource, port, Proto::Udp, flow) else {
            return;
        };
        let fd = match dgram_socket(&addr, 0) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::info!(flow, %addr, "cannot open UDP socket: {e}");
                return self.send_msg(Msg::OpenErr {
                    flow,
                    reason: open_error(e.raw_os_error().unwrap_or(0)),
                });
            }
        };
        let serial = self.next_serial;
        self.next_serial += 1;
        if let Some(old) = self.ubyid.insert(flow, serial) {
            self.kill_udp(old);
            self.ubyid.insert(flow, serial);
        }
        self.uflows.insert(
            serial,
            UFlow {
                id: flow,
                fd,
                ops: 0,
                receiving: false,
                queue: VecDeque::new(),
                sending: false,
                dead: false,
            },
        );
        self.send_msg(Msg::OpenOk { flow });
    }

    pub(crate) fn udp_datagram(&mut self, flow: FlowId, bytes: Vec<u8>) {
        let Some(&s) = self.ubyid.get(&flow) else {
            return;
        };
        let Some(f) = self.uflows.get_mut(&s) else {
            return;
        };
        if f.queue.len() < MAX_QUEUED {
            f.queue.push_back(bytes);
        }
    }

    pub(crate) fn kill_udp(&mut self, serial: u64) {
        let Some(f) = self.uflows.get_mut(&serial) else {
            return;
        };
        if self.ubyid.get(&f.id) == Some(&serial) {
            self.ubyid.remove(&f.id);
        }
        f.dead = true;
        f.queue.clear();
        // SAFETY: shutdown(2) wakes a pending receive on our socket.
        unsafe { libc::shutdown(f.fd.as_raw_fd(), libc::SHUT_RDWR) };
        if f.ops == 0 {
            self.uflows.remove(&serial);
        }
    }

    pub(crate) fn on_udp_recv(&mut self, serial: u64, c: Completion<Tag>) {
        let Some(f) = self.uflows.get_mut(&serial) else {
            return;
        };
        f.ops -= 1;
        f.receiving = false;
        let id = f.id;
        if f.dead {
            if f.ops == 0 {
                self.uflows.remove(&serial);
            }
            return;
        }
        match c.result {
            r if r >= 0 => {
                let bytes = c.buf.unwrap_or_default();
                self.send_msg(Msg::Datagram { flow: id, bytes });
            }
            // An ICMP error from the resource (port unreachable...): keep going.
            r if -r == libc::ECONNREFUSED => {}
            _ => {
                self.send_msg(Msg::Reset { flow: id });
                self.kill_udp(serial);
            }
        }
    }

    pub(crate) fn on_udp_send(&mut self, serial: u64, _c: Completion<Tag>) {
        let Some(f) = self.uflows.get_mut(&serial) else {
            return;
        };
        f.ops -= 1;
        f.sending = false;
        if f.dead && f.ops == 0 {
            self.uflows.remove(&serial);
        }
    }

    pub(crate) fn pump_udp(&mut self, can_read: bool) {
        for (&s, f) in self.uflows.iter_mut() {
            if f.dead {
                continue;
            }
            let fd = f.fd.as_raw_fd();
            if can_read && !f.receiving {
                f.receiving = true;
                f.ops += 1;
                self.reactor
                    .recv(fd, Vec::with_capacity(MAX_DATA), Tag::UdpRecv(s));
            }
            if !f.sending
                && let Some(d) = f.queue.pop_front()
            {
                f.sending = true;
                f.ops += 1;
                self.reactor.send(fd, d, 0, Tag::UdpSend(s));
            }
        }
    }

    pub(crate) fn echo(&mut self, token: u32, resource: u32, size: u16) {
        if self.exports.get(resource as usize).is_none() {
            return self.send_msg(Msg::EchoReply { token, ok: false });
        }
        let Some(ip) = self.names.lookup(resource as usize, Instant::now()) else {
            return self.send_msg(Msg::EchoReply { token, ok: false });
        };
        let addr = SocketAddr::new(ip, 0);
        let proto = if addr.is_ipv4() {
            libc::IPPROTO_ICMP
        } else {
            libc::IPPROTO_ICMPV6
        };
        // A ping socket if this user may have one (net.ipv4.ping_group_range),
        // else a raw socket if the agent has CAP_NET_RAW.
        let (fd, is_raw) = match dgram_socket(&addr, proto) {
            Ok(fd) => (fd, false),
            Err(ping_err) => match icmp_or_udp_socket(&addr, libc::SOCK_RAW, proto) {
                Ok(fd) => (fd, true),
                Err(raw_err) => {
                    if !self.icmp_warned {
                        self.icmp_warned = true;
                        tracing::warn!(
                            "cannot ping resources: no ICMP ping socket ({ping_err}; allow this user's group in net.ipv4.ping_group_range) and no raw socket ({raw_err}; give the agent CAP_NET_RAW); pings to vIPs go unanswered"
                        );
                    }
                    return self.send_msg(Msg::EchoReply { token, ok: false });
                }
            },
        };
        // Echo request: type 8 (or 128 for v6), code 0; the kernel fills
        // the identifier and checksum of a ping socket (and the checksum of
        // a raw ICMPv6 one); a raw ICMPv4 request carries its own.
        let mut req = vec![0u8; 8 + usize::from(size).min(1024)];
        req[0] = if addr.is_ipv4() { 8 } else { 128 };
        req[4..6].copy_from_slice(&(std::process::id() as u16).to_be_bytes());
        req[6..8].copy_from_slice(&(token as u16).to_be_bytes());
        if is_raw && addr.is_ipv4() {
            let sum = icmp_checksum(&req);
            req[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let raw = fd.as_raw_fd();
        self.reactor.send(raw, req, 0, Tag::EchoSend(serial));
        self.reactor.recv_timeout(
            raw,
            Vec::with_capacity(2048),
            ECHO_WAIT,
            Tag::EchoRecv(serial),
        );
        self.echoes.insert(
            serial,
            EchoOp {
                token,
                _fd: fd,
                ops: 2,
                answered: false,
                raw: is_raw,
            },
        );
    }

    pub(crate) fn on_echo(&mut self, serial: u64, c: Completion<Tag>, is_recv: bool) {
        let Some(e) = self.echoes.get_mut(&serial) else {
            return;
        };
        e.ops -= 1;
        let token = e.token;
        let reply = if is_recv && !e.answered {
            e.answered = true;
            let got = c.buf.as_deref().unwrap_or_default();
            Some(c.result > 0 && (!e.raw || is_echo_reply(got)))
        } else if !is_recv && c.result < 0 && !e.answered {
            e.answered = true;
            Some(false)
        } else {
            None
        };
        if e.ops == 0 {
            self.echoes.remove(&serial);
        }
        if let Some(ok) = reply {
            self.send_msg(Msg::EchoReply { token, ok });
        }
    }
}

/// The Internet checksum of an ICMPv4 message (its checksum field zero).
fn icmp_checksum(msg: &[u8]) -> u16 {
    let mut sum: u32 = msg
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether what a raw ICMP socket received is an echo reply: IPv4 comes
/// with its IP header (type after it, 0), ICMPv6 without (type 129).
fn is_echo_reply(got: &[u8]) -> bool {
    match got.first() {
        Some(b) if b >> 4 == 4 => {
            let ihl = usize::from(b & 0x0f) * 4;
            got.get(ihl) == Some(&0)
        }
        Some(129) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_echo_request_carries_a_valid_checksum_and_replies_are_recognised() {
        let mut req = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'a', b'b', b'c'];
        let sum = icmp_checksum(&req);
        req[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            icmp_checksum(&req),
            0,
            "a message with its checksum sums to 0"
        );
        let mut v4 = vec![0x45u8; 20];
        v4.extend_from_slice(&[0, 0, 0, 0]);
        assert!(is_echo_reply(&v4));
        v4[20] = 3; // destination unreachable
        assert!(!is_echo_reply(&v4));
        assert!(is_echo_reply(&[129, 0, 0, 0]));
        assert!(!is_echo_reply(&[1, 4, 0, 0]));
        assert!(!is_echo_reply(&[]));
    }
}
