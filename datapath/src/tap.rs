//! A TAP device per VM (shared NIC): the guest's TCP reaches the engine as
//! the large segments its stack built, not cut to the MTU.
//!
//! Why not AF_XDP here. Measured on this project's kernel (6.18, veth,
//! guest TCP through `steer_tc`'s `bpf_redirect`): into a veth pair with
//! the kernel stack on the far end, 18.7 Gbit/s, because the guest's GSO
//! segments (up to 64 KiB) stay whole; with an XDP program on the pair's
//! far end, 6.6 Gbit/s, because a veth with XDP attached cuts every
//! segment to the MTU before XDP sees it, and each 1500-byte frame then
//! costs the engine a smoltcp turn and an ACK. A TAP device opened with
//! `IFF_VNET_HDR` and TSO offloads takes the redirected segments whole
//! (the kernel does no segmentation on the way in), hands them to us with
//! a virtio-net header that says how they were offloaded, and takes our
//! frames back the same way. `steer_tc` redirects into it exactly as into
//! the pair (`tap_ifindex`), and `reflect` on its ingress sends what we
//! write out of the VM's NIC; no other program changes.
//!
//! Measured end to end before the pair went (`netredir-bench --only lan`,
//! release, one run each, same build and machine), Gbit/s, TAP vs veth
//! pair + AF_XDP: MTU 1500, 1 stream 5.73 vs 3.29, 8 streams 4.88 vs 1.67;
//! MTU 9000, 1 stream 5.76 vs 4.36, 8 streams 4.58 vs 3.56. The pair is
//! gone; a dedicated NIC keeps XDP and AF_XDP (no veth in the way there).
//!
//! Checksums: a segment the guest offloaded carries only the pseudo-header
//! sum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`); the engine verifies no guest
//! checksum anyway (a local link, see `engine.rs`), and its own frames go
//! out with full checksums and a zero header (no offload asked).
//!
//! The device is not persistent: it goes when its fd closes, so a
//! netredird that dies leaves nothing behind.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Size of the virtio-net header we ask for (`virtio_net_hdr_v1`: flags,
/// gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers).
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame the device hands us: a 64 KiB GSO segment and its
/// headers, with room to spare.
pub const MAX_FRAME: usize = 65536 + 256;
/// Bytes a receive buffer needs: a header and the largest frame.
pub const RX_BUFFER: usize = VNET_HDR_LEN + MAX_FRAME;
/// The most frames, and about the most bytes, one [`Tap::receive`] takes,
/// so one busy VM does not keep the others of its worker waiting: 64
/// frames of a veth's MTU, or 4 large segments (not 64 of them, 4 MiB).
const BATCH: usize = 64;
const BATCH_BYTES: usize = 256 * 1024;
/// `virtio_net_hdr.gso_type` for no segmentation.
const GSO_NONE: u8 = 0;

/// Counters of one VM's TAP device.
#[derive(Debug, Default, Clone, Copy)]
pub struct TapCounters {
    /// Frames read from the device.
    pub frames_in: u64,
    /// Of those, large segments the guest's stack offloaded (GSO).
    pub gso_in: u64,
    /// Frames shorter than a virtio-net header (none should be).
    pub short_in: u64,
    /// Frames written to the device.
    pub frames_out: u64,
    /// Frames the device refused (counted, then dropped).
    pub write_errors: u64,
}

/// One VM's TAP device, read and written with its virtio-net header.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// What happened on it.
    pub counters: TapCounters,
}

fn ioctl(fd: RawFd, req: libc::Ioctl, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: each caller passes a request and an argument of the kind
    // that request takes, live for the call.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Creates TAP device `name` (one queue, virtio-net headers, checksum
    /// and TSO offloads on, MTU `mtu`, non-blocking) and brings it up.
    pub fn open(name: &str, mtu: u32) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TAP name {name:?}: 1 to 15 bytes"),
            ));
        }
        // SAFETY: open(2) of a fixed NUL-terminated path.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot open /dev/net/tun: {e} (is the tun module loaded?)"),
            ));
        }
        // SAFETY: a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        let what = |step: &str, e: io::Error| io::Error::new(e.kind(), format!("{step}: {e}"));
        ioctl(fd.as_raw_fd(), libc::TUNSETIFF, (&raw mut ifr).cast())
            .map_err(|e| what(&format!("cannot create TAP device {name}"), e))?;
        let mut hdr = VNET_HDR_LEN as libc::c_int;
        ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, (&raw mut hdr).cast())
            .map_err(|e| what("TUNSETVNETHDRSZ", e))?;
        // The argument is the flags themselves, not a pointer to them.
        let offload = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            offload as usize as *mut libc::c_void,
        )
        .map_err(|e| what("TUNSETOFFLOAD", e))?;
        let tap = Self {
            fd,
            name: name.to_string(),
            counters: TapCounters::default(),
        };
        // No addresses, so no IPv6 autoconfiguration chatter either.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        crate::netlink::set_mtu(name, mtu).map_err(|e| what("set MTU", e))?;
        crate::netlink::set_up(name).map_err(|e| what("bring up", e))?;
        Ok(tap)
    }

    /// The device's fd, for polling readability.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands each frame waiting on the device (up to a batch) to `f`,
    /// read into `buf` (at least [`RX_BUFFER`] bytes) one after another;
    /// returns how many there were.
    pub fn receive(&mut self, buf: &mut [u8], mut f: impl FnMut(&[u8])) -> usize {
        debug_assert!(buf.len() >= RX_BUFFER);
        let (mut n, mut bytes) = (0, 0);
        while n < BATCH && bytes < BATCH_BYTES {
            // SAFETY: read(2) into a live buffer of its length.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 {
                // EAGAIN: nothing more now. Anything else (the device
                // going away at detach) ends the batch too.
                break;
            }
            let r = r as usize;
            n += 1;
            bytes += r;
            if r < VNET_HDR_LEN {
                self.counters.short_in += 1;
                continue;
            }
            self.counters.frames_in += 1;
            if buf[1] != GSO_NONE {
                self.counters.gso_in += 1;
            }
            f(&buf[VNET_HDR_LEN..r]);
        }
        n
    }

    /// Writes `frames` to the device (toward the VM, through `reflect`);
    /// returns how many were taken. A frame the device refuses is counted
    /// and dropped, as a NIC would; only a full device (EAGAIN) leaves the
    /// rest with the caller.
    pub fn transmit<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) -> usize {
        let hdr = [0u8; VNET_HDR_LEN];
        let mut taken = 0;
        for frame in frames {
            let iov = [
                libc::iovec {
                    iov_base: hdr.as_ptr() as *mut _,
                    iov_len: hdr.len(),
                },
                libc::iovec {
                    iov_base: frame.as_ptr() as *mut _,
                    iov_len: frame.len(),
                },
            ];
            // SAFETY: writev(2) of two live buffers.
            let r = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                self.counters.write_errors += 1;
            } else {
                self.counters.frames_out += 1;
            }
            taken += 1;
        }
        taken
    }
}
