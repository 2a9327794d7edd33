//! One AF_XDP socket and its UMEM: frames in from the VM, frames out to it.
//!
//! The UMEM is split in two: the first half cycles through the fill and
//! receive rings, the second half through transmit and completion. A frame
//! is always in exactly one place (kernel or one of our free lists), so the
//! bookkeeping is two `Vec<u64>` of free frame offsets.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ffi::CString;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use xdpilone::xdp::XdpDesc;
use xdpilone::{
    DeviceQueue, Errno, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User,
};

/// Size of one UMEM frame; holds a 1514-byte frame after the kernel's headroom.
pub const FRAME_SIZE: u32 = 4096;
/// Frames in the UMEM (half for receive, half for transmit).
pub const FRAMES: u32 = 4096;
const RING: u32 = 2048;

/// Why the AF_XDP socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up AF_XDP on {iface} queue {queue}: {step}: {source}")]
pub struct XskError {
    iface: String,
    queue: u32,
    step: &'static str,
    source: io::Error,
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw().abs())
}

struct Area {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Area {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: non-zero size, valid layout.
        let p = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, layout }
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// An AF_XDP socket bound to one queue of one interface.
pub struct Xsk {
    // Field order is drop order: rings and sockets before the memory.
    rx: RingRx,
    tx: RingTx,
    dev: DeviceQueue,
    user: User,
    _umem: Umem,
    area: Area,
    tx_free: Vec<u64>,
    rx_done: Vec<u64>,
    /// Times frames had to wait because the transmit ring was full.
    pub tx_full: u64,
    /// Frames dropped because they do not fit a UMEM chunk.
    pub tx_oversize: u64,
}

// SAFETY: the raw pointers refer to memory this value owns; the rings are
// only touched through &mut self.
unsafe impl Send for Xsk {}

impl Xsk {
    /// Creates the UMEM and socket, binds to `iface` queue `queue` (copy
    /// mode, so any driver works).
    pub fn open(iface: &str, queue: u32) -> Result<Self, XskError> {
        let fail = |step, source| XskError {
            iface: iface.into(),
            queue,
            step,
            source,
        };
        let area = Area::new((FRAME_SIZE * FRAMES) as usize);
        let cfg = UmemConfig {
            fill_size: RING,
            complete_size: RING,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        let slice = NonNull::slice_from_raw_parts(area.ptr, area.layout.size());
        // SAFETY: the area is page-aligned, lives in `Xsk` after the Umem.
        let umem = unsafe { Umem::new(cfg, slice) }.map_err(|e| fail("register UMEM", errno(e)))?;
        let mut info = IfInfo::invalid();
        let name = CString::new(iface)
            .map_err(|_| fail("interface name", io::ErrorKind::InvalidInput.into()))?;
        info.from_name(&name)
            .map_err(|e| fail("find interface", errno(e)))?;
        info.set_queue(queue);
        let sock =
            Socket::with_shared(&info, &umem).map_err(|e| fail("create socket", errno(e)))?;
        let mut dev = umem
            .fq_cq(&sock)
            .map_err(|e| fail("map fill/completion rings", errno(e)))?;
        let user = umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: NonZeroU32::new(RING),
                    tx_size: NonZeroU32::new(RING),
                    bind_flags: SocketConfig::XDP_BIND_COPY | SocketConfig::XDP_BIND_NEED_WAKEUP,
                },
            )
            .map_err(|e| fail("map rx/tx rings", errno(e)))?;
        let rx = user.map_rx().map_err(|e| fail("map rx ring", errno(e)))?;
        let tx = user.map_tx().map_err(|e| fail("map tx ring", errno(e)))?;
        umem.bind(&user).map_err(|e| fail("bind", errno(e)))?;
        let half = FRAMES / 2;
        let fill: Vec<u64> = (0..half).map(|i| u64::from(i * FRAME_SIZE)).collect();
        {
            let mut w = dev.fill(fill.len() as u32);
            w.insert(fill.iter().copied());
            w.commit();
        }
        let tx_free = (half..FRAMES).map(|i| u64::from(i * FRAME_SIZE)).collect();
        Ok(Self {
            rx,
            tx,
            dev,
            user,
            _umem: umem,
            area,
            tx_free,
            rx_done: Vec::new(),
            tx_full: 0,
            tx_oversize: 0,
        })
    }

    /// The socket's fd: for the XSKMAP and for polling readability.
    pub fn fd(&self) -> RawFd {
        self.user.as_raw_fd()
    }

    /// Hands every received frame to `f`, then gives the frames back to
    /// the kernel. Returns how many there were.
    pub fn receive(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let base = self.area.ptr.as_ptr();
        let mut n = 0;
        {
            let mut r = self.rx.receive(RING);
            while let Some(d) = r.read() {
                if (d.addr as usize) + (d.len as usize) <= self.area.layout.size() {
                    // SAFETY: the kernel put `len` bytes at `addr` in our
                    // UMEM (checked in bounds) and does not touch them
                    // until we return the frame through the fill ring.
                    let frame = unsafe {
                        std::slice::from_raw_parts(base.add(d.addr as usize), d.len as usize)
                    };
                    f(frame);
                }
                self.rx_done.push(d.addr & !u64::from(FRAME_SIZE - 1));
                n += 1;
            }
            r.release();
        }
        if !self.rx_done.is_empty() {
            let mut w = self.dev.fill(self.rx_done.len() as u32);
            let k = w.insert(self.rx_done.iter().copied());
            w.commit();
            drop(w);
            self.rx_done.drain(..k as usize);
        }
        n
    }

    /// Reclaims frames the kernel finished sending.
    fn reap(&mut self) {
        let mut c = self.dev.complete(RING);
        while let Some(addr) = c.read() {
            self.tx_free.push(addr & !u64::from(FRAME_SIZE - 1));
        }
        c.release();
    }

    /// Queues `frames` for the VM while there is room; returns how many
    /// were taken (the rest stay with the caller) and kicks the kernel.
    pub fn transmit<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) -> usize {
        self.reap();
        let base = self.area.ptr.as_ptr();
        // One entry per frame taken, in order: its descriptor, or None for
        // a frame too big for a UMEM chunk (dropped and counted, never cut).
        let mut plan: Vec<Option<XdpDesc>> = Vec::new();
        for frame in frames {
            if frame.len() > FRAME_SIZE as usize {
                self.tx_oversize += 1;
                plan.push(None);
                continue;
            }
            let Some(addr) = self.tx_free.pop() else {
                self.tx_full += 1;
                break;
            };
            // SAFETY: `addr` is a free transmit frame of FRAME_SIZE bytes
            // in our UMEM; the kernel owns it only once it is on the ring.
            unsafe {
                std::ptr::copy_nonoverlapping(frame.as_ptr(), base.add(addr as usize), frame.len())
            };
            plan.push(Some(XdpDesc {
                addr,
                len: frame.len() as u32,
                options: 0,
            }));
        }
        let descs: Vec<XdpDesc> = plan.iter().flatten().copied().collect();
        let mut sent = 0;
        if !descs.is_empty() {
            let mut w = self.tx.transmit(descs.len() as u32);
            sent = w.insert(descs.iter().copied()) as usize;
            w.commit();
            drop(w);
            if sent < descs.len() {
                self.tx_full += 1;
            }
            for d in &descs[sent..] {
                self.tx_free.push(d.addr);
            }
            if self.tx.needs_wakeup() {
                self.tx.wake();
            }
        }
        // Frames taken: the dropped ones, and those up to the last sent.
        let mut left = sent;
        plan.iter()
            .take_while(|d| match d {
                None => true,
                Some(_) if left > 0 => {
                    left -= 1;
                    true
                }
                Some(_) => false,
            })
            .count()
    }

    /// Whether frames are still on their way out (a kick may be needed).
    pub fn tx_pending(&self) -> bool {
        self.tx_free.len() < (FRAMES / 2) as usize
    }

    /// Kicks the kernel to send and reclaims finished frames.
    pub fn kick(&mut self) {
        if self.tx.needs_wakeup() {
            self.tx.wake();
        }
        self.reap();
    }
}
