//! `steer`: runs on every frame the VM sends and picks out those for the
//! virtual subnet.
//!
//! A frame goes to its VM's AF_XDP socket when it is IPv4 to an address
//! in the subnet, or an ARP request for one (and IPv6 to the prefix, NDP
//! for it, DHCP and router solicitations on a dedicated NIC); every other
//! frame passes, untouched. Each verdict bumps one per-CPU counter of the
//! VM, named in `netredir_ebpf_common::reason`. The programs are loaded
//! once per host: the `CONFIG` map, keyed by ifindex, says which VM (and
//! subnet) an interface belongs to; an interface with no entry passes
//! everything.

// The program only exists for the BPF target; a host build (cargo build
// --workspace, clippy) sees an empty binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod steer;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
