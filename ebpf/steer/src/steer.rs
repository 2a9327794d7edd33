//! The programs themselves; see the crate docs.
//!
//! Two attach modes (DESIGN.md, "Attach points"):
//! - dedicated NIC: `steer` (XDP, driver mode) on the host end of the VM's
//!   NIC classifies each frame and redirects ours into the AF_XDP socket;
//! - shared NIC: `steer_tc` (TC ingress) on the VM's NIC classifies the
//!   same way and `bpf_redirect`s ours into netredird's TAP device for the
//!   VM (the guest's GSO segments stay whole on the way); what the engine
//!   writes to the device comes in on its ingress, where `reflect` (TC)
//!   sends it out of the VM's NIC. The VM's other traffic never meets XDP
//!   and keeps the kernel's fast path (GRO/TSO).

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action};
use aya_ebpf::helpers::bpf_redirect;
use aya_ebpf::macros::{classifier, map, xdp};
use aya_ebpf::maps::{HashMap, PerCpuArray, XskMap};
use aya_ebpf::programs::{TcContext, XdpContext};
use netredir_ebpf_common::{FLAG_DHCP, MAX_IFACES, MAX_VMS, SteerConfig, reason};

/// Written by netredird, keyed by the ifindex a program runs on (a VM's
/// NIC, its TAP device); read here on every frame. The
/// programs are loaded once per host and serve every VM through it.
#[map]
static CONFIG: HashMap<u32, SteerConfig> = HashMap::with_max_entries(MAX_IFACES, 0);

/// Written by netredird: VM slot → its AF_XDP socket. Read by the
/// redirect helper.
#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_VMS, 0);

/// Written here, read by netredird: per VM slot, one counter per `reason`
/// (slot 0: frames on an interface with no VM).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_VMS * reason::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MIN_HLEN: usize = 20;
/// Ethernet/IPv4 ARP: htype(2) ptype(2) hlen(1) plen(1) op(2) sha(6) spa(4) tha(6) tpa(4).
const ARP_LEN: usize = 28;
const ARP_OP_REQUEST: u16 = 1;
const IPV6_HLEN: usize = 40;
const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_ROUTER_SOLICIT: u8 = 133;
const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
/// The mDNS port and groups (224.0.0.251 as read off the wire, ff02::fb).
const MDNS_PORT: u16 = 5353;
const MDNS_V4: u32 = u32::from_ne_bytes([224, 0, 0, 251]);
const MDNS_V6: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfb];
/// The most header bytes classification reads: Ethernet, IPv6, and a
/// neighbour solicitation up to its target. (IPv4 with options and UDP
/// ports is less: 14 + 60 + 4.)
const CLASSIFY_LEN: u32 = (ETH_HLEN + IPV6_HLEN + 24) as u32;

/// What classification decided for a frame.
enum Class {
    /// Ours: to the engine.
    Steer(u32),
    /// mDNS: the engine's responder answers it; on a shared NIC the
    /// kernel's path keeps it too (other hosts on the link may listen).
    Mdns,
    /// Not ours: the kernel keeps it.
    Pass(u32),
}

/// Raw packet bounds, for XDP and TC alike.
trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

/// The configuration of the interface with this ifindex, if a VM has it.
#[inline(always)]
fn config(ifindex: u32) -> Option<SteerConfig> {
    // SAFETY: a read of a map value that netredird replaces whole.
    unsafe { CONFIG.get(&ifindex) }.copied()
}

/// Dedicated NIC: classify, and ours straight into AF_XDP.
#[xdp]
pub fn steer(ctx: XdpContext) -> u32 {
    let Some(cfg) = config(ctx.ingress_ifindex() as u32) else {
        count(0, reason::PASS_UNCONFIGURED);
        return xdp_action::XDP_PASS;
    };
    let (verdict, why) = match classify(&ctx, &cfg) {
        // The VM's socket is on queue 0: frames of other queues pass.
        Class::Steer(_) if ctx.rx_queue_index() != 0 => (xdp_action::XDP_PASS, reason::NO_SOCKET),
        Class::Steer(why) => to_xsk(&ctx, cfg.slot, why),
        Class::Mdns if ctx.rx_queue_index() != 0 => (xdp_action::XDP_PASS, reason::NO_SOCKET),
        Class::Mdns => to_xsk(&ctx, cfg.slot, reason::MDNS),
        Class::Pass(why) => (xdp_action::XDP_PASS, why),
    };
    count(cfg.slot, why);
    verdict
}

/// The ifindex a TC program runs on.
#[inline(always)]
fn tc_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context's skb is valid while the program runs.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Shared NIC, on the VM's NIC (TC ingress): classify, and ours into
/// netredird's TAP device for the VM.
#[classifier]
pub fn steer_tc(ctx: TcContext) -> i32 {
    // Direct access needs the headers in the linear part of the skb.
    let Some(cfg) = config(tc_ifindex(&ctx)) else {
        count(0, reason::PASS_UNCONFIGURED);
        return TC_ACT_OK as i32;
    };
    let len = ctx.len().min(CLASSIFY_LEN);
    if ctx.pull_data(len).is_err() {
        count(cfg.slot, reason::PASS_SHORT);
        return TC_ACT_OK as i32;
    }
    match classify(&ctx, &cfg) {
        Class::Steer(why) => {
            if cfg.tap_ifindex == 0 {
                count(cfg.slot, reason::NO_SOCKET);
                return TC_ACT_OK as i32;
            }
            count(cfg.slot, why);
            // SAFETY: a helper call with plain integers.
            unsafe { bpf_redirect(cfg.tap_ifindex, 0) as i32 }
        }
        Class::Mdns => {
            if cfg.tap_ifindex != 0 && ctx.clone_redirect(cfg.tap_ifindex, 0).is_ok() {
                count(cfg.slot, reason::MDNS);
            } else {
                count(cfg.slot, reason::NO_SOCKET);
            }
            TC_ACT_OK as i32
        }
        Class::Pass(why) => {
            count(cfg.slot, why);
            TC_ACT_OK as i32
        }
    }
}

/// Shared NIC, on netredird's TAP device (TC ingress): what the engine
/// wrote goes out of the VM's NIC, to the VM.
#[classifier]
pub fn reflect(ctx: TcContext) -> i32 {
    match config(tc_ifindex(&ctx)).map_or(0, |c| c.nic_ifindex) {
        0 => TC_ACT_SHOT as i32,
        // SAFETY: a helper call with plain integers.
        nic => unsafe { bpf_redirect(nic, 0) as i32 },
    }
}

// TC_ACT_REDIRECT is what bpf_redirect returns on success.
const _: () = assert!(TC_ACT_REDIRECT == 7);

#[inline(always)]
fn count(slot: u32, why: u32) {
    if slot >= MAX_VMS || why >= reason::COUNT {
        return;
    }
    if let Some(c) = COUNTERS.get_ptr_mut(slot * reason::COUNT + why) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *c += 1 };
    }
}

/// Bounds-checked pointer to a `T` at `off` bytes into the frame.
#[inline(always)]
fn ptr_at<T, F: Frame>(ctx: &F, off: usize) -> Option<*const T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read_be16<F: Frame>(ctx: &F, off: usize) -> Option<u16> {
    // SAFETY: ptr_at checked the two bytes are inside the frame.
    ptr_at::<[u8; 2], F>(ctx, off).map(|p| u16::from_be_bytes(unsafe { *p }))
}

#[inline(always)]
fn read_addr<F: Frame>(ctx: &F, off: usize) -> Option<u32> {
    // Network order kept: compare against the config as stored.
    // SAFETY: ptr_at checked the four bytes are inside the frame.
    ptr_at::<[u8; 4], F>(ctx, off).map(|p| u32::from_ne_bytes(unsafe { *p }))
}

#[inline(always)]
fn classify<F: Frame>(ctx: &F, cfg: &SteerConfig) -> Class {
    let Some(ethertype) = read_be16(ctx, 12) else {
        return Class::Pass(reason::PASS_SHORT);
    };
    if cfg.mask_v4 == 0 {
        return Class::Pass(reason::PASS_UNCONFIGURED);
    }
    let in_subnet = |a: u32| a & cfg.mask_v4 == cfg.subnet_v4;
    match ethertype {
        ETH_P_IP => {
            // Version/IHL byte, then destination at offset 16 of the header.
            let Some(vihl) = ptr_at::<u8, F>(ctx, ETH_HLEN) else {
                return Class::Pass(reason::PASS_SHORT);
            };
            // SAFETY: ptr_at checked the byte is inside the frame.
            let vihl = unsafe { *vihl };
            if vihl >> 4 != 4 || ((vihl & 0xf) as usize) * 4 < IPV4_MIN_HLEN {
                return Class::Pass(reason::PASS_SHORT);
            }
            let Some(dst) = read_addr(ctx, ETH_HLEN + 16) else {
                return Class::Pass(reason::PASS_SHORT);
            };
            if in_subnet(dst) {
                return Class::Steer(reason::REDIRECT_IPV4);
            }
            if cfg.flags & FLAG_DHCP != 0 && is_dhcp_request(ctx, (vihl & 0xf) as usize * 4) {
                return Class::Steer(reason::REDIRECT_DHCP);
            }
            if dst == MDNS_V4 && is_udp_to(ctx, 9, (vihl & 0xf) as usize * 4, MDNS_PORT) {
                return Class::Mdns;
            }
            Class::Pass(reason::PASS_IPV4_OTHER)
        }
        ETH_P_ARP => {
            if ptr_at::<[u8; ARP_LEN], F>(ctx, ETH_HLEN).is_none() {
                return Class::Pass(reason::PASS_SHORT);
            }
            let op = read_be16(ctx, ETH_HLEN + 6);
            let tpa = read_addr(ctx, ETH_HLEN + 24);
            match (op, tpa) {
                (Some(ARP_OP_REQUEST), Some(tpa)) if in_subnet(tpa) => {
                    Class::Steer(reason::REDIRECT_ARP)
                }
                _ => Class::Pass(reason::PASS_ARP_OTHER),
            }
        }
        ETH_P_IPV6 => classify_ipv6(ctx, cfg),
        _ => Class::Pass(reason::PASS_OTHER),
    }
}

/// IPv6: to the prefix, a neighbour solicitation for an address in it, or
/// (dedicated NIC) a router solicitation; the rest passes.
#[inline(always)]
fn classify_ipv6<F: Frame>(ctx: &F, cfg: &SteerConfig) -> Class {
    let Some(hdr) = ptr_at::<[u8; IPV6_HLEN], F>(ctx, ETH_HLEN) else {
        return Class::Pass(reason::PASS_SHORT);
    };
    // SAFETY: ptr_at checked the header is inside the frame.
    let (version, next) = unsafe { ((*hdr)[0] >> 4, (*hdr)[6]) };
    if version != 6 {
        return Class::Pass(reason::PASS_SHORT);
    }
    let prefix = u64::from_ne_bytes(cfg.prefix_v6);
    if prefix == 0 {
        return Class::Pass(reason::PASS_IPV6);
    }
    let in_prefix = |off: usize| {
        // SAFETY: ptr_at checks the eight bytes are inside the frame.
        ptr_at::<[u8; 8], F>(ctx, off).is_some_and(|p| u64::from_ne_bytes(unsafe { *p }) == prefix)
    };
    // Destination address at offset 24 of the header.
    if in_prefix(ETH_HLEN + 24) {
        return Class::Steer(reason::REDIRECT_IPV6);
    }
    // SAFETY: ptr_at checks the sixteen bytes are inside the frame.
    let is_mdns_group =
        ptr_at::<[u8; 16], F>(ctx, ETH_HLEN + 24).is_some_and(|p| unsafe { *p } == MDNS_V6);
    if is_mdns_group && is_udp_to(ctx, 6, IPV6_HLEN, MDNS_PORT) {
        return Class::Mdns;
    }
    if next == IPPROTO_ICMPV6
        && let Some(t) = ptr_at::<u8, F>(ctx, ETH_HLEN + IPV6_HLEN)
    {
        // SAFETY: ptr_at checked the byte is inside the frame.
        let icmp_type = unsafe { *t };
        // The solicitation's target follows type, code, checksum, reserved.
        if icmp_type == ICMPV6_NEIGHBOR_SOLICIT && in_prefix(ETH_HLEN + IPV6_HLEN + 8) {
            return Class::Steer(reason::REDIRECT_NDP);
        }
        if icmp_type == ICMPV6_ROUTER_SOLICIT && cfg.flags & FLAG_DHCP != 0 {
            return Class::Steer(reason::REDIRECT_RS);
        }
    }
    Class::Pass(reason::PASS_IPV6)
}

/// UDP to `port`, the protocol byte at `proto_off` of the IP header and
/// the UDP header after `hlen` bytes of it (IPv6: no extension headers).
#[inline(always)]
fn is_udp_to<F: Frame>(ctx: &F, proto_off: usize, hlen: usize, port: u16) -> bool {
    const IPPROTO_UDP: u8 = 17;
    let Some(proto) = ptr_at::<u8, F>(ctx, ETH_HLEN + proto_off) else {
        return false;
    };
    // SAFETY: ptr_at checked the byte is inside the frame.
    if unsafe { *proto } != IPPROTO_UDP || hlen > 60 {
        return false;
    }
    read_be16(ctx, ETH_HLEN + hlen + 2) == Some(port)
}

/// UDP to port 67 (a DHCP client's request), IPv4 header of `ihl` bytes.
#[inline(always)]
fn is_dhcp_request<F: Frame>(ctx: &F, ihl: usize) -> bool {
    const DHCP_SERVER_PORT: u16 = 67;
    is_udp_to(ctx, 9, ihl, DHCP_SERVER_PORT)
}

/// Into VM `slot`'s AF_XDP socket, counted as `why`; passed (and counted
/// as `NO_SOCKET`) if it has none.
#[inline(always)]
fn to_xsk(_ctx: &XdpContext, slot: u32, why: u32) -> (u32, u32) {
    // The low bits of the flags are the action when the slot is empty:
    // no socket there means the kernel keeps the frame.
    match XSKS.redirect(slot, xdp_action::XDP_PASS as u64) {
        Ok(action) if action == xdp_action::XDP_REDIRECT => (action, why),
        _ => (xdp_action::XDP_PASS, reason::NO_SOCKET),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
