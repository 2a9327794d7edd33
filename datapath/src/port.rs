//! Where a VM's frames enter and leave netredird: an AF_XDP socket (a
//! dedicated NIC) or a TAP device (a shared NIC; see [`crate::tap`] for
//! why not AF_XDP there too).

use crate::tap::Tap;
use crate::xsk::Xsk;
use std::os::fd::RawFd;

/// One VM's frame port.
pub enum Port {
    /// An AF_XDP socket on the host's shared UMEM (boxed: it is much
    /// larger than a TAP device's handle).
    Xsk(Box<Xsk>),
    /// A TAP device with virtio-net headers.
    Tap(Tap),
}

impl Port {
    /// The fd to poll for frames from the VM.
    pub fn fd(&self) -> RawFd {
        match self {
            Port::Xsk(x) => x.fd(),
            Port::Tap(t) => t.fd(),
        }
    }

    /// Hands each frame from the VM that is waiting (a batch at most) to
    /// `f`; `scratch` is the worker's receive buffer for a TAP device
    /// (AF_XDP frames are read where they landed). Returns how many.
    pub fn receive(&mut self, scratch: &mut [u8], f: impl FnMut(&[u8])) -> usize {
        match self {
            Port::Xsk(x) => x.receive(f),
            Port::Tap(t) => t.receive(scratch, f),
        }
    }

    /// Sends `frames` to the VM while there is room; returns how many
    /// were taken (the rest stay with the caller).
    pub fn transmit<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) -> usize {
        match self {
            Port::Xsk(x) => x.transmit(frames),
            Port::Tap(t) => t.transmit(frames),
        }
    }

    /// Whether frames are still on their way out (a kick may be needed).
    pub fn tx_pending(&self) -> bool {
        match self {
            Port::Xsk(x) => x.tx_pending(),
            Port::Tap(_) => false,
        }
    }

    /// Kicks the kernel to send what is queued.
    pub fn kick(&mut self) {
        if let Port::Xsk(x) = self {
            x.kick();
        }
    }

    /// The port's counters, named for `status` and the metrics.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        match self {
            Port::Xsk(x) => {
                let pool = x.pool();
                vec![
                    ("xsk.tx_full", x.tx_full),
                    ("xsk.tx_oversize", x.tx_oversize),
                    ("xsk.frames_held", x.frames_held() as u64),
                    ("xsk.pool_dry", x.pool_dry),
                    ("umem.frames", u64::from(pool.frames())),
                    ("umem.frames_free", pool.free_frames() as u64),
                ]
            }
            Port::Tap(t) => {
                let c = t.counters;
                vec![
                    ("tap.frames_in", c.frames_in),
                    ("tap.gso_in", c.gso_in),
                    ("tap.short_in", c.short_in),
                    ("tap.frames_out", c.frames_out),
                    ("tap.write_errors", c.write_errors),
                ]
            }
        }
    }
}
