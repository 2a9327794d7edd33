//! The host side of netredir's packet path.
//!
//! A frame from the VM takes this path: the `steer` program ([`steer`];
//! XDP on a dedicated NIC, a TC classifier on a shared one) sees its
//! destination is in the virtual subnet and redirects it to the VM's
//! [`port`]: an AF_XDP socket ([`xsk`]) on a dedicated NIC, a TAP device
//! ([`tap`]) that keeps the guest's large segments whole on a shared one.
//! The daemon's io_uring loop wakes on it and hands the frame to the VM's
//! [`engine`], a sans-IO smoltcp stack that answers ARP, terminates TCP
//! and turns each connection into tunnel events. Frames the engine
//! produces go back out through the same port. Everything else the VM sends never leaves the
//! kernel's fast path.

pub mod dns;
pub mod engine;
pub mod mdns;
#[cfg(feature = "kernel")]
pub mod netlink;
#[cfg(feature = "kernel")]
pub mod port;
#[cfg(feature = "kernel")]
pub mod steer;
#[cfg(feature = "kernel")]
pub mod tap;
#[cfg(feature = "kernel")]
pub mod xsk;
