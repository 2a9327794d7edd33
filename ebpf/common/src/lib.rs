//! The ABI shared by the `steer` XDP program and userspace: the layout of
//! every map value and the meaning of every counter index, defined once.
#![no_std]

/// Value of the `CONFIG` hash map, keyed by the ifindex a program runs
/// on: which frames `steer` (or `steer_tc`, on a shared NIC) takes for
/// which VM, and where the shared-NIC programs send them. The programs are
/// loaded once per host; each attached VM has entries for its NIC (and,
/// on a shared NIC, for its TAP device).
///
/// Written by netredird when a VM attaches; read on every frame. Addresses are in network byte order as they
/// appear on the wire, so the program compares without swapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// IPv4 network address of the virtual subnet (network order).
    pub subnet_v4: u32,
    /// Its netmask (network order); zero means "steer nothing".
    pub mask_v4: u32,
    /// [`FLAG_DHCP`] and later flags.
    pub flags: u32,
    /// The VM's slot: its AF_XDP socket's index in `XSKS` and its row of
    /// `COUNTERS` (1 to [`MAX_VMS`] - 1; 0 is frames of no VM).
    pub slot: u32,
    /// The IPv6 /64 prefix of the virtual subnet (its first 8 bytes as on
    /// the wire); all zero means "steer no IPv6".
    pub prefix_v6: [u8; 8],
    /// Shared NIC: the ifindex of netredird's TAP device for the VM, that
    /// `steer_tc` sends the VM's frames for us into (0: not in shared mode).
    pub tap_ifindex: u32,
    /// Shared NIC: the ifindex of the VM's NIC, where `reflect` sends the
    /// engine's frames out.
    pub nic_ifindex: u32,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only integers, no padding holes.
unsafe impl aya::Pod for SteerConfig {}

/// In [`SteerConfig::flags`]: the NIC is only for netredir, so DHCP
/// requests (UDP to port 67, any destination) and IPv6 router
/// solicitations go to netredird too.
pub const FLAG_DHCP: u32 = 1;

/// VM slots: the `XSKS` map's capacity (one AF_XDP socket per VM) and
/// `COUNTERS`' rows.
pub const MAX_VMS: u32 = 4096;

/// Capacity of `CONFIG`: up to three interfaces per VM.
pub const MAX_IFACES: u32 = 3 * MAX_VMS;

/// Why `steer` gave a frame the verdict it gave; one per-CPU counter each.
///
/// Every verdict is counted under exactly one reason.
pub mod reason {
    /// IPv4 frame to the virtual subnet, redirected to AF_XDP.
    pub const REDIRECT_IPV4: u32 = 0;
    /// ARP request for an address in the subnet, redirected.
    pub const REDIRECT_ARP: u32 = 1;
    /// Frame for us, but no AF_XDP socket on this queue: passed.
    pub const NO_SOCKET: u32 = 2;
    /// IPv4 to an address outside the subnet: passed.
    pub const PASS_IPV4_OTHER: u32 = 3;
    /// IPv6 outside the prefix (and not NDP for it): passed.
    pub const PASS_IPV6: u32 = 4;
    /// ARP not asking for a subnet address: passed.
    pub const PASS_ARP_OTHER: u32 = 5;
    /// Any other ethertype: passed.
    pub const PASS_OTHER: u32 = 6;
    /// Too short or malformed for the headers its ethertype promises: passed.
    pub const PASS_SHORT: u32 = 7;
    /// No configuration written yet: passed.
    pub const PASS_UNCONFIGURED: u32 = 8;
    /// DHCP request on a dedicated NIC, redirected.
    pub const REDIRECT_DHCP: u32 = 9;
    /// IPv6 to the virtual prefix, redirected.
    pub const REDIRECT_IPV6: u32 = 10;
    /// Neighbour solicitation for an address in the prefix, redirected.
    pub const REDIRECT_NDP: u32 = 11;
    /// Router solicitation on a dedicated NIC, redirected.
    pub const REDIRECT_RS: u32 = 12;
    /// mDNS from the VM (UDP 5353 to its group): a copy for the engine's
    /// responder on a shared NIC (the kernel keeps the frame), the frame
    /// itself on a dedicated one.
    pub const MDNS: u32 = 13;
    /// Number of reasons (size of the counter array).
    pub const COUNT: u32 = 14;

    /// Human names, indexed by reason, for logs and the control API.
    pub const NAMES: [&str; COUNT as usize] = [
        "redirect_ipv4",
        "redirect_arp",
        "no_socket",
        "pass_ipv4_other",
        "pass_ipv6",
        "pass_arp_other",
        "pass_other",
        "pass_short",
        "pass_unconfigured",
        "redirect_dhcp",
        "redirect_ipv6",
        "redirect_ndp",
        "redirect_rs",
        "mdns",
    ];
}
