//! The program itself; see the crate docs.

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, PerCpuArray, XskMap};
use aya_ebpf::programs::XdpContext;
use netredir_ebpf_common::{FLAG_DHCP, MAX_QUEUES, SteerConfig, reason};

/// Written by netredird (one entry); read here on every frame.
#[map]
static CONFIG: Array<SteerConfig> = Array::with_max_entries(1, 0);

/// Written by netredird: queue index → its AF_XDP socket. Read by the
/// redirect helper.
#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

/// Written here, read by netredird: one counter per `reason`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

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

#[xdp]
pub fn steer(ctx: XdpContext) -> u32 {
    let (verdict, why) = classify(&ctx);
    count(why);
    verdict
}

#[inline(always)]
fn count(why: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(why) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *c += 1 };
    }
}

/// Bounds-checked pointer to a `T` at `off` bytes into the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    // SAFETY: ptr_at checked the two bytes are inside the frame.
    ptr_at::<[u8; 2]>(ctx, off).map(|p| u16::from_be_bytes(unsafe { *p }))
}

#[inline(always)]
fn read_addr(ctx: &XdpContext, off: usize) -> Option<u32> {
    // Network order kept: compare against the config as stored.
    // SAFETY: ptr_at checked the four bytes are inside the frame.
    ptr_at::<[u8; 4]>(ctx, off).map(|p| u32::from_ne_bytes(unsafe { *p }))
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> (u32, u32) {
    let pass = xdp_action::XDP_PASS;
    let Some(ethertype) = read_be16(ctx, 12) else {
        return (pass, reason::PASS_SHORT);
    };
    let cfg = match CONFIG.get(0) {
        Some(c) if c.mask_v4 != 0 => *c,
        _ => return (pass, reason::PASS_UNCONFIGURED),
    };
    let in_subnet = |a: u32| a & cfg.mask_v4 == cfg.subnet_v4;
    match ethertype {
        ETH_P_IP => {
            // Version/IHL byte, then destination at offset 16 of the header.
            let Some(vihl) = ptr_at::<u8>(ctx, ETH_HLEN) else {
                return (pass, reason::PASS_SHORT);
            };
            // SAFETY: ptr_at checked the byte is inside the frame.
            let vihl = unsafe { *vihl };
            if vihl >> 4 != 4 || ((vihl & 0xf) as usize) * 4 < IPV4_MIN_HLEN {
                return (pass, reason::PASS_SHORT);
            }
            let Some(dst) = read_addr(ctx, ETH_HLEN + 16) else {
                return (pass, reason::PASS_SHORT);
            };
            if in_subnet(dst) {
                return redirect(ctx, reason::REDIRECT_IPV4);
            }
            if cfg.flags & FLAG_DHCP != 0 && is_dhcp_request(ctx, (vihl & 0xf) as usize * 4) {
                return redirect(ctx, reason::REDIRECT_DHCP);
            }
            (pass, reason::PASS_IPV4_OTHER)
        }
        ETH_P_ARP => {
            if ptr_at::<[u8; ARP_LEN]>(ctx, ETH_HLEN).is_none() {
                return (pass, reason::PASS_SHORT);
            }
            let op = read_be16(ctx, ETH_HLEN + 6);
            let tpa = read_addr(ctx, ETH_HLEN + 24);
            match (op, tpa) {
                (Some(ARP_OP_REQUEST), Some(tpa)) if in_subnet(tpa) => {
                    redirect(ctx, reason::REDIRECT_ARP)
                }
                _ => (pass, reason::PASS_ARP_OTHER),
            }
        }
        ETH_P_IPV6 => classify_ipv6(ctx, &cfg),
        _ => (pass, reason::PASS_OTHER),
    }
}

/// IPv6: to the prefix, a neighbour solicitation for an address in it, or
/// (dedicated NIC) a router solicitation; the rest passes.
#[inline(always)]
fn classify_ipv6(ctx: &XdpContext, cfg: &SteerConfig) -> (u32, u32) {
    let pass = xdp_action::XDP_PASS;
    let Some(hdr) = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN) else {
        return (pass, reason::PASS_SHORT);
    };
    // SAFETY: ptr_at checked the header is inside the frame.
    let (version, next) = unsafe { ((*hdr)[0] >> 4, (*hdr)[6]) };
    if version != 6 {
        return (pass, reason::PASS_SHORT);
    }
    let prefix = u64::from_ne_bytes(cfg.prefix_v6);
    if prefix == 0 {
        return (pass, reason::PASS_IPV6);
    }
    let in_prefix = |off: usize| {
        // SAFETY: ptr_at checks the eight bytes are inside the frame.
        ptr_at::<[u8; 8]>(ctx, off).is_some_and(|p| u64::from_ne_bytes(unsafe { *p }) == prefix)
    };
    // Destination address at offset 24 of the header.
    if in_prefix(ETH_HLEN + 24) {
        return redirect(ctx, reason::REDIRECT_IPV6);
    }
    if next == IPPROTO_ICMPV6
        && let Some(t) = ptr_at::<u8>(ctx, ETH_HLEN + IPV6_HLEN)
    {
        // SAFETY: ptr_at checked the byte is inside the frame.
        let icmp_type = unsafe { *t };
        // The solicitation's target follows type, code, checksum, reserved.
        if icmp_type == ICMPV6_NEIGHBOR_SOLICIT && in_prefix(ETH_HLEN + IPV6_HLEN + 8) {
            return redirect(ctx, reason::REDIRECT_NDP);
        }
        if icmp_type == ICMPV6_ROUTER_SOLICIT && cfg.flags & FLAG_DHCP != 0 {
            return redirect(ctx, reason::REDIRECT_RS);
        }
    }
    (pass, reason::PASS_IPV6)
}

/// UDP to port 67 (a DHCP client's request), IPv4 header of `ihl` bytes.
#[inline(always)]
fn is_dhcp_request(ctx: &XdpContext, ihl: usize) -> bool {
    const IPPROTO_UDP: u8 = 17;
    const DHCP_SERVER_PORT: u16 = 67;
    let Some(proto) = ptr_at::<u8>(ctx, ETH_HLEN + 9) else {
        return false;
    };
    // SAFETY: ptr_at checked the byte is inside the frame.
    if unsafe { *proto } != IPPROTO_UDP || ihl > 60 {
        return false;
    }
    read_be16(ctx, ETH_HLEN + ihl + 2) == Some(DHCP_SERVER_PORT)
}

#[inline(always)]
fn redirect(ctx: &XdpContext, why: u32) -> (u32, u32) {
    let queue = ctx.rx_queue_index();
    // The low bits of the flags are the action when the slot is empty:
    // no socket on this queue means the kernel keeps the frame.
    match XSKS.redirect(queue, xdp_action::XDP_PASS as u64) {
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
