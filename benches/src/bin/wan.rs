//! netredir-wan: the benchmarks' WAN link emulator (this kernel has no
//! netem). It joins two interfaces at layer 2, like a wire, and gives each
//! direction a rate, a one-way delay, random loss and a bounded queue.
//!
//! Theory of operation. One thread per direction reads frames from its
//! interface (an AF_PACKET socket that ignores its own transmissions).
//! A frame is lost with probability `loss`; otherwise it is serialised at
//! `rate` behind the frames before it (the link is busy until
//! `link_free_at`), dropped if that backlog exceeds the queue, and sent
//! out of the other interface `delay` after its last bit left. The
//! interfaces' offloads must be off (the testbed does it), so every frame
//! is at most one MTU and carries full checksums.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: netredir-wan --a IFACE --b IFACE --rate-mbit MBIT --delay-ms MS \
[--loss PERCENT] [--queue-kib KIB] [--seed N]\n\n\
Joins IFACE a and b like a wire with, in each direction, the given rate, one-way delay,\n\
random loss and queue (default: one round trip's worth of bytes at the rate, at least 64 KiB).";

/// One direction's shape.
#[derive(Clone, Copy, Debug)]
struct Shape {
    /// Bytes per second.
    rate: f64,
    delay: Duration,
    /// Probability of loss per frame.
    loss: f64,
    /// Most bytes waiting to be serialised.
    queue: f64,
}

struct Args {
    a: String,
    b: String,
    shape: Shape,
    seed: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = None;
    let mut b = None;
    let (mut rate, mut delay, mut loss, mut queue, mut seed) = (None, None, 0.0, None, 1u64);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "-h" || k == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v = it.next().ok_or_else(|| format!("{k} takes a value"))?;
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{k}: {v:?} is not a number"))
        };
        match k.as_str() {
            "--a" => a = Some(v),
            "--b" => b = Some(v),
            "--rate-mbit" => rate = Some(num(&v)?),
            "--delay-ms" => delay = Some(num(&v)?),
            "--loss" => loss = num(&v)?,
            "--queue-kib" => queue = Some(num(&v)? * 1024.0),
            "--seed" => seed = v.parse().map_err(|_| format!("--seed: {v:?}"))?,
            _ => return Err(format!("unknown argument {k:?}")),
        }
    }
    let rate = rate.ok_or("--rate-mbit is required")? * 1e6 / 8.0;
    let delay = delay.ok_or("--delay-ms is required")?;
    if rate <= 0.0 || !(0.0..=60_000.0).contains(&delay) || !(0.0..100.0).contains(&loss) {
        return Err("rate must be > 0, delay 0..60000 ms, loss 0..100 %".into());
    }
    let bdp = rate * 2.0 * delay / 1000.0;
    Ok(Args {
        a: a.ok_or("--a is required")?,
        b: b.ok_or("--b is required")?,
        shape: Shape {
            rate,
            delay: Duration::from_secs_f64(delay / 1000.0),
            loss: loss / 100.0,
            queue: queue.unwrap_or(bdp.max(64.0 * 1024.0)),
        },
        seed,
    })
}

/// A raw socket on one interface, all protocols, not seeing its own sends.
fn packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let name = CString::new(iface).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {iface}"),
        ));
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid option pointer and length.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero sockaddr_ll is valid; the fields are set below.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = proto;
    sa.sll_ifindex = index as i32;
    // SAFETY: valid address and length.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// xorshift64*: loss decisions, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Moves frames from `from` to `to` with `shape`, forever.
fn direction(from: Arc<OwnedFd>, to: Arc<OwnedFd>, shape: Shape, seed: u64) -> io::Result<()> {
    let mut rng = Rng(seed | 1);
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut link_free_at = Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        let timeout = queue
            .front()
            .map(|(due, _)| due.saturating_duration_since(now));
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs() as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: one valid pollfd; a valid or null timespec.
        let r = unsafe { libc::ppoll(&mut pfd, 1, tsp, std::ptr::null()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        loop {
            // SAFETY: valid buffer for the call's duration.
            let n = unsafe {
                libc::recv(
                    from.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            let now = Instant::now();
            if shape.loss > 0.0 && rng.unit() < shape.loss {
                continue;
            }
            let n = n as usize;
            let start = link_free_at.max(now);
            let backlog = start.saturating_duration_since(now).as_secs_f64() * shape.rate;
            if backlog + n as f64 > shape.queue {
                continue; // tail drop, as a full router queue does
            }
            link_free_at = start + Duration::from_secs_f64(n as f64 / shape.rate);
            queue.push_back((link_free_at + shape.delay, buf[..n].to_vec()));
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, frame) = queue.pop_front().expect("checked");
            // SAFETY: valid buffer for the call's duration.
            let r = unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if r < 0 {
                let e = io::Error::last_os_error();
                // A full device queue loses the frame, as a wire would.
                if !matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                    return Err(e);
                }
            }
        }
    }
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("netredir-wan: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let open = |iface: &str| {
        packet_socket(iface).unwrap_or_else(|e| {
            eprintln!("netredir-wan: cannot open a packet socket on {iface}: {e}");
            std::process::exit(1);
        })
    };
    let a = Arc::new(open(&args.a));
    let b = Arc::new(open(&args.b));
    let s = args.shape;
    eprintln!(
        "netredir-wan: {} <-> {}: {:.1} Mbit/s, {:?} one way, {:.2}% loss, queue {:.0} KiB",
        args.a,
        args.b,
        s.rate * 8.0 / 1e6,
        s.delay,
        s.loss * 100.0,
        s.queue / 1024.0
    );
    let (a2, b2) = (a.clone(), b.clone());
    let seed = args.seed;
    let run = move |from, to, seed| {
        if let Err(e) = direction(from, to, s, seed) {
            eprintln!("netredir-wan: {e}");
            std::process::exit(1);
        }
    };
    let back = std::thread::spawn(move || run(b2, a2, seed.wrapping_mul(31)));
    run(a, b, seed);
    let _ = back.join();
}
