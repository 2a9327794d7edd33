//! `steer`: runs on every frame the VM sends and picks out those for the
//! virtual subnet.
//!
//! A frame goes to the AF_XDP socket of its receive queue when it is IPv4
//! to an address in the subnet, or an ARP request for one; every other
//! frame gets `XDP_PASS`, untouched. Each verdict bumps one per-CPU counter
//! named in `netredir_ebpf_common::reason`. The subnet comes from the
//! `CONFIG` map; with no config the program passes everything.

// The program only exists for the BPF target; a host build (cargo build
// --workspace, clippy) sees an empty binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod steer;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
