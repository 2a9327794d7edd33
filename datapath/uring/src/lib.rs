//! An io_uring reactor in which the kernel never sees a borrowed buffer.
//!
//! Theory of operation: every submission takes its buffer (and sockaddr,
//! timespec) by value and parks it in a slot until the completion for that
//! slot arrives; the slot index is the `user_data`. The caller tags each
//! operation with its own `T` (a token saying what to do next) and gets the
//! tag and the buffer back in a [`Completion`]. Nothing is freed while the
//! kernel may still write to it: a slot is only reused after its completion,
//! and a reactor dropped with operations in flight leaks their buffers
//! rather than free memory the kernel may still touch.
//!
//! One reactor belongs to one thread (the ring is set up single-issuer);
//! other threads wake it through an eventfd the loop keeps a read on.

mod stream;

pub use stream::Stream;

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

/// user_data of completions we do not report (cancels, link timeouts).
const IGNORED: u64 = u64::MAX;

/// Names one in-flight operation, so that it can be cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(usize);

/// A finished operation: the caller's tag, the kernel's result, and
/// whatever buffer the operation owned.
#[derive(Debug)]
pub struct Completion<T> {
    /// The tag given at submission.
    pub tag: T,
    /// Non-negative on success (bytes, fd, revents), `-errno` on failure.
    pub result: i32,
    /// The operation's buffer; for a receive, its length now includes the
    /// bytes received.
    pub buf: Option<Vec<u8>>,
}

impl<T> Completion<T> {
    /// The result as an `io::Result`, for `?` and error messages.
    pub fn io_result(&self) -> io::Result<usize> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as usize)
        }
    }
}

struct Slot<T> {
    tag: T,
    buf: Option<Vec<u8>>,
    /// Where a receive started writing (the buffer's old length).
    recv_from: Option<usize>,
    addr: Option<Box<(libc::sockaddr_storage, libc::socklen_t)>>,
    ts: Option<Box<types::Timespec>>,
}

/// The ring, its in-flight operations and their buffers.
pub struct Reactor<T> {
    ring: IoUring,
    slots: Vec<Option<Slot<T>>>,
    free: Vec<usize>,
    backlog: VecDeque<squeue::Entry>,
    ready: VecDeque<cqueue::Entry>,
    in_flight: usize,
    /// How long [`Reactor::wait`] spins for a completion before it
    /// sleeps (zero: it sleeps at once).
    spin: Duration,
}

impl<T> Reactor<T> {
    /// Sets up a ring with room for `entries` submissions at once (more
    /// wait in a backlog). Call on the thread that will drive it.
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring: IoUring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            // Says when completions wait for us to enter the kernel (a
            // spinning loop must, under coop taskrun).
            .setup_taskrun_flag()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        Ok(Self {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            spin: Duration::ZERO,
        })
    }

    /// Busy polling: [`Reactor::wait`] spins up to `spin` for a completion
    /// before it sleeps. A reply that comes within it costs no sleep and
    /// wake-up (tens of microseconds each on a busy or virtualised host);
    /// the price is the CPU spent spinning.
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Spins up to `budget` until a completion is there; true if one is.
    fn spin_for(&mut self, budget: Duration) -> io::Result<bool> {
        let start = std::time::Instant::now();
        loop {
            if !self.ring.completion().is_empty() {
                return Ok(true);
            }
            if self.ring.submission().taskrun() {
                // Completions wait for us in the kernel: let them out.
                self.ring.submit()?;
                continue;
            }
            if start.elapsed() >= budget {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn slot(&mut self, slot: Slot<T>) -> usize {
        self.in_flight += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    fn push(&mut self, e: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(e);
            return;
        }
        // SAFETY: every pointer in `e` points into a slot that lives until
        // this entry's completion (see the module comment).
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.backlog.push_back(e);
        }
    }

    fn bare(tag: T) -> Slot<T> {
        Slot {
            tag,
            buf: None,
            recv_from: None,
            addr: None,
            ts: None,
        }
    }

    /// Receives into the spare capacity of `buf` (after its length).
    pub fn recv(&mut self, fd: RawFd, mut buf: Vec<u8>, tag: T) -> OpId {
        let from = buf.len();
        let room = (buf.capacity() - from).min(u32::MAX as usize) as u32;
        // The heap block of a Vec does not move when the Vec is moved.
        // SAFETY: `from <= capacity`, the pointer stays in the allocation.
        let ptr = unsafe { buf.as_mut_ptr().add(from) };
        let mut s = Self::bare(tag);
        s.buf = Some(buf);
        s.recv_from = Some(from);
        let i = self.slot(s);
        self.push(
            opcode::Recv::new(types::Fd(fd), ptr, room)
                .build()
                .user_data(i as u64),
        );
        OpId(i)
    }

    /// Like [`Reactor::recv`], but gives up with `-ECANCELED` after `timeout`.
    pub fn recv_timeout(&mut self, fd: RawFd, mut buf: Vec<u8>, timeout: Duration, tag: T) -> OpId {
        let from = buf.len();
        let room = (buf.capacity() - from).min(u32::MAX as usize) as u32;
        // SAFETY: as in `recv`.
        let ptr = unsafe { buf.as_mut_ptr().add(from) };
        let ts = Box::new(types::Timespec::from(timeout));
        let ts_ptr: *const types::Timespec = &*ts;
        let mut s = Self::bare(tag);
        s.buf = Some(buf);
        s.recv_from = Some(from);
        s.ts = Some(ts);
        let i = self.slot(s);
        self.push(
            opcode::Recv::new(types::Fd(fd), ptr, room)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(i as u64),
        );
        self.push(opcode::LinkTimeout::new(ts_ptr).build().user_data(IGNORED));
        OpId(i)
    }

    /// Reads into the spare capacity of `buf` (for eventfds and pipes).
    pub fn read(&mut self, fd: RawFd, mut buf: Vec<u8>, tag: T) -> OpId {
        let from = buf.len();
        let room = (buf.capacity() - from).min(u32::MAX as usize) as u32;
        // SAFETY: as in `recv`.
        let ptr = unsafe { buf.as_mut_ptr().add(from) };
        let mut s = Self::bare(tag);
        s.buf = Some(buf);
        s.recv_from = Some(from);
        let i = self.slot(s);
        self.push(
            opcode::Read::new(types::Fd(fd), ptr, room)
                .build()
                .user_data(i as u64),
        );
        OpId(i)
    }

    /// Sends `buf[offset..]` (never raises SIGPIPE). The completion says how
    /// much went; the caller resubmits the rest.
    pub fn send(&mut self, fd: RawFd, buf: Vec<u8>, offset: usize, tag: T) -> OpId {
        let offset = offset.min(buf.len());
        let len = (buf.len() - offset).min(u32::MAX as usize) as u32;
        // SAFETY: `offset <= len`, the pointer stays in the allocation.
        let ptr = unsafe { buf.as_ptr().add(offset) };
        let mut s = Self::bare(tag);
        s.buf = Some(buf);
        let i = self.slot(s);
        self.push(
            opcode::Send::new(types::Fd(fd), ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(i as u64),
        );
        OpId(i)
    }

    /// Accepts one connection; the result is the new fd (close-on-exec).
    pub fn accept(&mut self, fd: RawFd, tag: T) -> OpId {
        let i = self.slot(Self::bare(tag));
        self.push(
            opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(i as u64),
        );
        OpId(i)
    }

    /// Connects `fd` to `addr`, giving up with `-ECANCELED` after `timeout`.
    pub fn connect(&mut self, fd: RawFd, addr: SocketAddr, timeout: Duration, tag: T) -> OpId {
        let mut s = Self::bare(tag);
        let sa = Box::new(sockaddr(addr));
        let ts = Box::new(types::Timespec::from(timeout));
        let (sa_ptr, sa_len) = (&sa.0 as *const libc::sockaddr_storage, sa.1);
        let ts_ptr: *const types::Timespec = &*ts;
        s.addr = Some(sa);
        s.ts = Some(ts);
        let i = self.slot(s);
        self.push(
            opcode::Connect::new(types::Fd(fd), sa_ptr.cast(), sa_len)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(i as u64),
        );
        self.push(opcode::LinkTimeout::new(ts_ptr).build().user_data(IGNORED));
        OpId(i)
    }

    /// Waits until `fd` is readable; the result is the revents mask.
    pub fn poll_in(&mut self, fd: RawFd, tag: T) -> OpId {
        let i = self.slot(Self::bare(tag));
        self.push(
            opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .build()
                .user_data(i as u64),
        );
        OpId(i)
    }

    /// Completes with `-ETIME` after `after`.
    pub fn timeout(&mut self, after: Duration, tag: T) -> OpId {
        let mut s = Self::bare(tag);
        let ts = Box::new(types::Timespec::from(after));
        let ts_ptr: *const types::Timespec = &*ts;
        s.ts = Some(ts);
        let i = self.slot(s);
        self.push(opcode::Timeout::new(ts_ptr).build().user_data(i as u64));
        OpId(i)
    }

    /// Asks the kernel to end `op` early; it still completes (`-ECANCELED`).
    pub fn cancel(&mut self, op: OpId) {
        self.push(
            opcode::AsyncCancel::new(op.0 as u64)
                .build()
                .user_data(IGNORED),
        );
    }

    /// Submits what is queued and waits for at least one completion, or
    /// until `timeout` passes.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.flush_backlog()?;
        if !self.ready.is_empty() {
            self.ring.submit()?;
        } else if !self.spin.is_zero() && timeout.is_none_or(|t| !t.is_zero()) && {
            self.ring.submit()?;
            self.spin_for(timeout.map_or(self.spin, |t| t.min(self.spin)))?
        } {
            // A completion came while spinning: no sleep.
        } else {
            let r = match timeout {
                Some(t) => {
                    let ts = types::Timespec::from(t);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                None => self.ring.submit_and_wait(1),
            };
            match r {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        self.ready.extend(self.ring.completion());
        Ok(())
    }

    fn flush_backlog(&mut self) -> io::Result<()> {
        while let Some(e) = self.backlog.front() {
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission().push(e) }.is_err() {
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                    Err(e) => return Err(e),
                }
                self.ready.extend(self.ring.completion());
                continue;
            }
            self.backlog.pop_front();
        }
        Ok(())
    }

    /// The next completion gathered by [`Reactor::wait`], if any.
    pub fn next_completion(&mut self) -> Option<Completion<T>> {
        loop {
            let cqe = self.ready.pop_front()?;
            if cqe.user_data() == IGNORED {
                continue;
            }
            let i = cqe.user_data() as usize;
            let Some(slot) = self.slots.get_mut(i).and_then(Option::take) else {
                continue;
            };
            self.free.push(i);
            self.in_flight -= 1;
            let mut buf = slot.buf;
            if let (Some(b), Some(from)) = (buf.as_mut(), slot.recv_from)
                && cqe.result() > 0
            {
                // SAFETY: the kernel wrote `result` bytes after `from`,
                // within the capacity we gave it.
                unsafe { b.set_len(from + cqe.result() as usize) };
            }
            return Some(Completion {
                tag: slot.tag,
                result: cqe.result(),
                buf,
            });
        }
    }
}

impl<T> Drop for Reactor<T> {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // The kernel may still write into these until the ring is torn
            // down asynchronously: leak them rather than free them.
            mem::forget(mem::take(&mut self.slots));
        }
    }
}

/// A `sockaddr_storage` and its length for `addr`.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// An eventfd that another thread writes to wake the loop.
pub struct Waker {
    fd: RawFd,
}

impl Waker {
    /// Creates a non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall, no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }
    /// The fd the loop reads (8-byte reads).
    pub fn fd(&self) -> RawFd {
        self.fd
    }
    /// Wakes the loop; safe from any thread.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64.
        unsafe { libc::write(self.fd, (&one as *const u64).cast(), 8) };
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.fd) };
    }
}

/// Takes all the file descriptors the hard limit allows: a daemon whose
/// connections are sockets outgrows the soft default (often 1024) long
/// before its hard limit. Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        if l.rlim_cur < l.rlim_max {
            let want = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        l.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[derive(Debug, PartialEq)]
    enum Tag {
        Accept,
        Recv,
        Send,
        Timer,
        Wake,
        Connect,
    }

    fn next(r: &mut Reactor<Tag>) -> Completion<Tag> {
        loop {
            if let Some(c) = r.next_completion() {
                return c;
            }
            r.wait(Some(Duration::from_secs(5))).unwrap();
        }
    }

    #[test]
    fn accept_recv_send_round_trip_on_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut r = Reactor::new(8).unwrap();
        r.accept(l.as_raw_fd(), Tag::Accept);
        let mut client = TcpStream::connect(addr).unwrap();
        let c = next(&mut r);
        assert_eq!(c.tag, Tag::Accept);
        let fd = c.io_result().unwrap() as RawFd;
        client.write_all(b"hello").unwrap();
        r.recv(fd, Vec::with_capacity(64), Tag::Recv);
        let c = next(&mut r);
        assert_eq!((c.tag, c.buf.as_deref()), (Tag::Recv, Some(&b"hello"[..])));
        r.send(fd, b"xxworld".to_vec(), 2, Tag::Send);
        let c = next(&mut r);
        assert_eq!((c.tag, c.result), (Tag::Send, 5));
        let mut got = [0u8; 5];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"world");
        // SAFETY: closing the fd accept gave us, nothing in flight on it.
        unsafe { libc::close(fd) };
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn a_spinning_wait_returns_as_soon_as_a_completion_is_there() {
        // The spin must see a completion as it comes (under coop taskrun
        // one may also sit in the kernel until the task enters it), not
        // only after its whole budget, here 20 s.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut r = Reactor::new(8).unwrap();
        r.set_spin(Duration::from_secs(20));
        r.recv(a.as_raw_fd(), Vec::with_capacity(8), Tag::Recv);
        let start = std::time::Instant::now();
        let writer = std::thread::spawn(move || (&b).write_all(b"x").unwrap());
        let c = next(&mut r);
        assert_eq!((c.tag, c.buf.as_deref()), (Tag::Recv, Some(&b"x"[..])));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        writer.join().unwrap();
    }

    #[test]
    fn timer_waker_and_refused_connect_complete() {
        let mut r = Reactor::new(8).unwrap();
        let w = Waker::new().unwrap();
        r.read(w.fd(), Vec::with_capacity(8), Tag::Wake);
        w.wake();
        let c = next(&mut r);
        assert_eq!((c.tag, c.result), (Tag::Wake, 8));
        r.timeout(Duration::from_millis(1), Tag::Timer);
        let c = next(&mut r);
        assert_eq!((c.tag, c.result), (Tag::Timer, -libc::ETIME));
        // A port nobody listens on: refused, through the linked timeout.
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        r.connect(fd, free, Duration::from_secs(5), Tag::Connect);
        let c = next(&mut r);
        assert_eq!((c.tag, c.result), (Tag::Connect, -libc::ECONNREFUSED));
        // SAFETY: our socket, nothing in flight.
        unsafe { libc::close(fd) };
    }
}
