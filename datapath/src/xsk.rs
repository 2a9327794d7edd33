//! AF_XDP sockets sharing one UMEM: frames in from the VMs, frames out to
//! them.
//!
//! One [`Pool`] per host: a UMEM of [`Pool::new`]'s size, registered once
//! (on an AF_XDP socket bound to `lo`, which receives nothing: the kernel
//! only shares a UMEM that a bound socket owns). Each VM's [`Xsk`] is a
//! socket of its own on its NIC (or its veth pair), with its own four rings
//! (`XDP_SHARED_UMEM`, one fill and completion ring per netdev), taking
//! frames from the pool's free list and giving them back.
//!
//! An idle VM keeps [`MIN_FILL`] frames in its fill ring (64 KiB), not a
//! UMEM of its own (which was 16 MiB): a VM whose receive batches use up
//! half of its fill ring doubles its share (up to [`MAX_FILL`]), and one
//! whose batches are small halves it again as frames come back. The UMEM
//! is the bound on all of it: when the pool runs dry, a VM recycles the
//! frames it has (received frames go back to its own fill ring first), and
//! frames to send wait in the engine. Frames a VM holds in its rings are
//! tracked one by one and go back to the pool when its socket is gone.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use xdpilone::xdp::XdpDesc;
use xdpilone::{
    DeviceQueue, Errno, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User,
};

/// Size of one UMEM frame; holds a frame of up to 4 KiB (the engine's MTU
/// is at most what XDP on a veth takes).
pub const FRAME_SIZE: u32 = 4096;
/// Entries of each ring of a VM's socket (the most frames it can hold in
/// its fill ring, or have on their way out).
const RING: u32 = 512;
/// Frames an idle VM keeps in its fill ring.
pub const MIN_FILL: u32 = 16;
/// The most frames one VM keeps in its fill ring.
pub const MAX_FILL: u32 = RING;
/// The most frames one VM has on their way out.
const MAX_TX: u32 = RING / 2;

/// Why an AF_XDP socket (or the UMEM) could not be set up.
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

struct PoolInner {
    // Field order is drop order: the owner socket and the UMEM before
    // the memory.
    _owner: (DeviceQueue, User),
    umem: Mutex<Umem>,
    /// Frames in no ring.
    free: Mutex<Vec<u64>>,
    frames: u32,
    /// Sockets on the pool now.
    sockets: AtomicU32,
    /// Of those, the ones holding more than [`MIN_FILL`] (busy).
    busy: AtomicU32,
    area: Area,
}

// SAFETY: the UMEM is only used under its mutex; the area is memory this
// value owns, written only through frames a caller holds exclusively.
unsafe impl Send for PoolInner {}
// SAFETY: as above.
unsafe impl Sync for PoolInner {}

/// The host's UMEM, shared by every VM's socket; cheap to clone.
#[derive(Clone)]
pub struct Pool(Arc<PoolInner>);

impl Pool {
    /// A UMEM of `frames` frames of [`FRAME_SIZE`] bytes, registered on a
    /// socket bound to `lo` (so that sockets on other netdevs may share it).
    pub fn new(frames: u32) -> Result<Self, XskError> {
        let fail = |step, source| XskError {
            iface: "lo".into(),
            queue: 0,
            step,
            source,
        };
        let frames = frames.max(2 * MAX_FILL);
        let area = Area::new(FRAME_SIZE as usize * frames as usize);
        let cfg = UmemConfig {
            fill_size: RING,
            complete_size: RING,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        let slice = NonNull::slice_from_raw_parts(area.ptr, area.layout.size());
        // SAFETY: the area is page-aligned and lives in the pool after the Umem.
        let umem = unsafe { Umem::new(cfg, slice) }.map_err(|e| fail("register UMEM", errno(e)))?;
        let mut info = IfInfo::invalid();
        info.from_name(c"lo")
            .map_err(|e| fail("find interface", errno(e)))?;
        info.set_queue(0);
        let sock =
            Socket::with_shared(&info, &umem).map_err(|e| fail("create socket", errno(e)))?;
        let dev = umem
            .fq_cq(&sock)
            .map_err(|e| fail("map fill/completion rings", errno(e)))?;
        let user = umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: NonZeroU32::new(64),
                    tx_size: None,
                    // Every socket sharing the UMEM inherits these.
                    bind_flags: SocketConfig::XDP_BIND_COPY | SocketConfig::XDP_BIND_NEED_WAKEUP,
                },
            )
            .map_err(|e| fail("map rx ring", errno(e)))?;
        umem.bind(&user).map_err(|e| fail("bind", errno(e)))?;
        let free = (0..frames)
            .map(|i| u64::from(i) * u64::from(FRAME_SIZE))
            .collect();
        Ok(Self(Arc::new(PoolInner {
            _owner: (dev, user),
            umem: Mutex::new(umem),
            free: Mutex::new(free),
            frames,
            sockets: AtomicU32::new(0),
            busy: AtomicU32::new(0),
            area,
        })))
    }

    /// The most frames one busy socket may hold in its fill ring, and
    /// again on its way out: the frames that idle sockets do not hold,
    /// shared evenly by the busy ones. Without it the first VMs to get
    /// busy would take the whole pool and starve the rest (their frames
    /// dropped at the NIC for want of a fill ring).
    pub fn busy_share(&self) -> u32 {
        let sockets = self.0.sockets.load(Ordering::Relaxed);
        let busy = self.0.busy.load(Ordering::Relaxed).max(1);
        let spare = self.0.frames.saturating_sub(sockets * MIN_FILL);
        (spare / (2 * busy)).clamp(MIN_FILL, MAX_FILL)
    }

    /// Frames in the UMEM.
    pub fn frames(&self) -> u32 {
        self.0.frames
    }

    /// Sockets on the pool now (one per attached VM).
    pub fn sockets(&self) -> u32 {
        self.0.sockets.load(Ordering::Relaxed)
    }

    /// Frames in no VM's rings now.
    pub fn free_frames(&self) -> usize {
        self.free().len()
    }

    fn free(&self) -> MutexGuard<'_, Vec<u64>> {
        self.0.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A VM's AF_XDP socket, bound to one queue of one interface, on the
/// host's [`Pool`].
pub struct Xsk {
    /// Its socket and rings; `None` only while it is dropped.
    rings: Option<Rings>,
    pool: Pool,
    /// Frames in the fill ring or the receive ring (the kernel's, until
    /// received).
    in_fill: HashSet<u64>,
    /// Frames on their way out (transmit ring or completion ring).
    in_tx: HashSet<u64>,
    /// How many frames the fill ring should hold now.
    fill_target: u32,
    /// Times frames had to wait because the transmit ring was full (or the
    /// pool dry).
    pub tx_full: u64,
    /// Frames dropped because they do not fit a UMEM chunk.
    pub tx_oversize: u64,
    /// Times the fill ring could not be topped up: the pool was dry.
    pub pool_dry: u64,
    /// Counted among the pool's busy sockets.
    busy: bool,
}

struct Rings {
    // Field order is drop order: rings before the socket.
    rx: RingRx,
    tx: RingTx,
    dev: DeviceQueue,
    user: User,
}

// SAFETY: the rings refer to kernel memory mapped for this socket; they are
// only touched through &mut self.
unsafe impl Send for Xsk {}

impl Xsk {
    /// Creates the socket on `pool`, binds it to `iface` queue `queue`
    /// (copy mode, as the pool's owner, so any driver works) and fills its
    /// fill ring.
    pub fn open(pool: &Pool, iface: &str, queue: u32) -> Result<Self, XskError> {
        let fail = |step, source| XskError {
            iface: iface.into(),
            queue,
            step,
            source,
        };
        let mut info = IfInfo::invalid();
        let name = CString::new(iface)
            .map_err(|_| fail("interface name", io::ErrorKind::InvalidInput.into()))?;
        info.from_name(&name)
            .map_err(|e| fail("find interface", errno(e)))?;
        info.set_queue(queue);
        let sock = Socket::new(&info).map_err(|e| fail("create socket", errno(e)))?;
        let rings = {
            let umem = pool.0.umem.lock().unwrap_or_else(|e| e.into_inner());
            let dev = umem
                .fq_cq(&sock)
                .map_err(|e| fail("map fill/completion rings", errno(e)))?;
            let user = umem
                .rx_tx(
                    &sock,
                    &SocketConfig {
                        rx_size: NonZeroU32::new(RING),
                        tx_size: NonZeroU32::new(RING),
                        // A socket sharing a UMEM may not set flags: copy
                        // mode and need-wakeup come from the pool's owner.
                        bind_flags: 0,
                    },
                )
                .map_err(|e| fail("map rx/tx rings", errno(e)))?;
            let rx = user.map_rx().map_err(|e| fail("map rx ring", errno(e)))?;
            let tx = user.map_tx().map_err(|e| fail("map tx ring", errno(e)))?;
            umem.bind(&user).map_err(|e| fail("bind", errno(e)))?;
            Rings { rx, tx, dev, user }
        };
        let mut x = Self {
            rings: Some(rings),
            pool: pool.clone(),
            in_fill: HashSet::new(),
            in_tx: HashSet::new(),
            fill_target: MIN_FILL,
            tx_full: 0,
            tx_oversize: 0,
            pool_dry: 0,
            busy: false,
        };
        pool.0.sockets.fetch_add(1, Ordering::Relaxed);
        x.top_up(Vec::new());
        Ok(x)
    }

    fn rings(&mut self) -> &mut Rings {
        self.rings.as_mut().expect("open")
    }

    /// The socket's fd: for the XSKMAP and for polling readability.
    pub fn fd(&self) -> RawFd {
        self.rings.as_ref().expect("open").user.as_raw_fd()
    }

    /// The pool it takes frames from.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Frames in this VM's rings now (its share of the pool).
    pub fn frames_held(&self) -> usize {
        self.in_fill.len() + self.in_tx.len()
    }

    /// Puts `back` (frames just received) into the fill ring up to the
    /// target, takes more from the pool if short, returns the rest.
    fn top_up(&mut self, mut back: Vec<u64>) {
        let want = self.fill_target as usize;
        let have = self.in_fill.len();
        let mut give: Vec<u64> = Vec::new();
        if have < want {
            let short = want - have;
            let from_back = short.min(back.len());
            give.extend(back.drain(..from_back));
            if give.len() < short {
                let mut free = self.pool.free();
                let n = (short - give.len()).min(free.len());
                let at = free.len() - n;
                give.extend(free.drain(at..));
                if give.len() < short {
                    self.pool_dry += 1;
                }
            }
        }
        if !back.is_empty() {
            self.pool.free().extend(back);
        }
        if give.is_empty() {
            return;
        }
        let r = self.rings();
        let mut w = r.dev.fill(give.len() as u32);
        let k = w.insert(give.iter().copied()) as usize;
        w.commit();
        drop(w);
        self.in_fill.extend(give[..k].iter().copied());
        if k < give.len() {
            self.pool.free().extend(give[k..].iter().copied());
        }
    }

    /// Hands every received frame to `f`, then gives the frames back to
    /// the kernel (or the pool). Returns how many there were.
    pub fn receive(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let base = self.pool.0.area.ptr.as_ptr();
        let size = self.pool.0.area.layout.size();
        let before = self.in_fill.len();
        let mut done = Vec::new();
        {
            let r = self.rings.as_mut().expect("open");
            let mut rx = r.rx.receive(RING);
            while let Some(d) = rx.read() {
                let frame = d.addr & !u64::from(FRAME_SIZE - 1);
                if (d.addr as usize) + (d.len as usize) <= size && self.in_fill.remove(&frame) {
                    // SAFETY: the kernel put `len` bytes at `addr` in a
                    // frame of ours (checked: in bounds, given to this
                    // socket's fill ring) and does not touch it until we
                    // give it back.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(base.add(d.addr as usize), d.len as usize)
                    };
                    f(bytes);
                    done.push(frame);
                }
            }
            rx.release();
        }
        let n = done.len();
        // Busy: a batch that used half of the fill ring doubles the share
        // (up to the busy sockets' fair share of the pool); quiet: a
        // small one halves it.
        let cap = self.pool.busy_share();
        if n > 0 && 2 * n >= before {
            self.fill_target = (self.fill_target * 2).min(cap);
        } else if 8 * n < self.fill_target as usize {
            self.fill_target = (self.fill_target / 2).max(MIN_FILL);
        }
        self.fill_target = self.fill_target.min(cap);
        self.set_busy(self.fill_target > MIN_FILL);
        self.top_up(done);
        n
    }

    fn set_busy(&mut self, busy: bool) {
        if busy != self.busy {
            self.busy = busy;
            if busy {
                self.pool.0.busy.fetch_add(1, Ordering::Relaxed);
            } else {
                self.pool.0.busy.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Reclaims frames the kernel finished sending.
    fn reap(&mut self) {
        let mut back = Vec::new();
        {
            let r = self.rings();
            let mut c = r.dev.complete(RING);
            while let Some(addr) = c.read() {
                back.push(addr & !u64::from(FRAME_SIZE - 1));
            }
            c.release();
        }
        back.retain(|a| self.in_tx.remove(a));
        if !back.is_empty() {
            self.pool.free().extend(back);
        }
    }

    /// Queues `frames` for the VM while there is room; returns how many
    /// were taken (the rest stay with the caller) and kicks the kernel.
    pub fn transmit<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) -> usize {
        self.reap();
        let base = self.pool.0.area.ptr.as_ptr();
        let most = MAX_TX.min(self.pool.busy_share()) as usize;
        let room = most.saturating_sub(self.in_tx.len());
        // One entry per frame taken, in order: its descriptor, or None for
        // a frame too big for a UMEM chunk (dropped and counted, never cut).
        let mut plan: Vec<Option<XdpDesc>> = Vec::new();
        let mut taken = Vec::new();
        {
            let mut free = self.pool.free();
            for frame in frames {
                if frame.len() > FRAME_SIZE as usize {
                    self.tx_oversize += 1;
                    plan.push(None);
                    continue;
                }
                if taken.len() >= room {
                    self.tx_full += 1;
                    break;
                }
                let Some(addr) = free.pop() else {
                    self.tx_full += 1;
                    break;
                };
                // SAFETY: `addr` is a free frame of FRAME_SIZE bytes in the
                // UMEM, now ours; the kernel owns it only once it is on the
                // ring.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        frame.as_ptr(),
                        base.add(addr as usize),
                        frame.len(),
                    )
                };
                taken.push(addr);
                plan.push(Some(XdpDesc {
                    addr,
                    len: frame.len() as u32,
                    options: 0,
                }));
            }
        }
        let descs: Vec<XdpDesc> = plan.iter().flatten().copied().collect();
        let mut sent = 0;
        if !descs.is_empty() {
            let r = self.rings();
            let mut w = r.tx.transmit(descs.len() as u32);
            sent = w.insert(descs.iter().copied()) as usize;
            w.commit();
            drop(w);
            if r.tx.needs_wakeup() {
                r.tx.wake();
            }
            if sent < descs.len() {
                self.tx_full += 1;
            }
            self.in_tx.extend(descs[..sent].iter().map(|d| d.addr));
            self.pool
                .free()
                .extend(descs[sent..].iter().map(|d| d.addr));
            // In copy mode the kick sent them: take the frames back now,
            // not on a later turn (which would cost the loop a wake-up).
            self.reap();
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
        !self.in_tx.is_empty()
    }

    /// Kicks the kernel to send and reclaims finished frames.
    pub fn kick(&mut self) {
        let r = self.rings();
        if r.tx.needs_wakeup() {
            r.tx.wake();
        }
        self.reap();
    }
}

impl Drop for Xsk {
    fn drop(&mut self) {
        // The socket closes first (the kernel is done with its frames),
        // then its frames go back to the pool.
        self.rings = None;
        self.set_busy(false);
        self.pool.0.sockets.fetch_sub(1, Ordering::Relaxed);
        let mut free = self.pool.free();
        free.extend(self.in_fill.drain());
        free.extend(self.in_tx.drain());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool binds to `lo` queue 0, which takes one socket: the tests
    /// that make one take turns (they run in parallel otherwise).
    static LO: Mutex<()> = Mutex::new(());

    #[test]
    fn a_pool_shares_its_frames_and_gets_them_back() {
        // Needs AF_XDP (root): CI has it.
        let _lo = LO.lock().unwrap_or_else(|e| e.into_inner());
        let pool = Pool::new(256).unwrap();
        assert_eq!(pool.frames(), 2 * MAX_FILL, "at least two VMs' worth");
        let all = pool.free_frames();
        let x = Xsk::open(&pool, "lo", 0);
        // lo's only queue is the pool's own: a second socket there is
        // refused, and nothing is lost.
        assert!(x.is_err());
        assert_eq!(pool.free_frames(), all);
    }

    #[test]
    fn busy_sockets_share_what_idle_ones_leave_evenly() {
        // Needs AF_XDP (root): CI has it.
        let _lo = LO.lock().unwrap_or_else(|e| e.into_inner());
        let pool = Pool::new(16384).unwrap();
        let set = |sockets, busy| {
            pool.0.sockets.store(sockets, Ordering::Relaxed);
            pool.0.busy.store(busy, Ordering::Relaxed);
            pool.busy_share()
        };
        // One busy VM among 500 idle ones still gets a whole ring.
        assert_eq!(set(501, 1), MAX_FILL);
        // 50 busy VMs: fill and transmit of all fit the pool.
        let share = set(50, 50);
        assert!(share < MAX_FILL && 50 * 2 * share <= 16384, "{share}");
        assert!(share >= 150, "{share}");
        // More busy VMs than the pool can serve: each keeps the minimum.
        assert_eq!(set(4000, 4000), MIN_FILL);
        set(0, 0);
    }
}
