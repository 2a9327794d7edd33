//! Golden frames through the real `steer` program with BPF_PROG_TEST_RUN:
//! each frame, the verdict it must get and the counter that must move.
//! Needs root (CAP_BPF), which CI has.

use aya::{TestRun, TestRunOptions};
use netredir_datapath::steer::{Steer, Target};
use netredir_ebpf_common::reason;
use std::net::{Ipv4Addr, Ipv6Addr};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4_tcp(dst: Ipv4Addr) -> Vec<u8> {
    let mut ip = vec![
        0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, // ver/ihl .. proto, csum
        10, 200, 0, 2, // src
    ];
    ip.extend_from_slice(&dst.octets());
    // TCP SYN 40000 -> 9100
    ip.extend_from_slice(&[
        0x9c, 0x40, 0x23, 0x8c, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    eth(0x0800, &ip)
}

fn arp(op: u16, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 200, 0, 2]);
    a.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    a.extend_from_slice(&target.octets());
    eth(0x0806, &a)
}

fn run(steer: &mut Steer, frame: &[u8]) -> u32 {
    let prog = steer.program().expect("program");
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ..Default::default()
    })
    .expect("BPF_PROG_TEST_RUN")
    .return_value
}

fn run_tc(steer: &mut Steer, frame: &[u8]) -> u32 {
    let prog = steer.tc_classifier().expect("steer_tc");
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ..Default::default()
    })
    .expect("BPF_PROG_TEST_RUN")
    .return_value
}

/// The slot these tests give their one VM.
const SLOT: u32 = 1;

/// The ifindex of this namespace's `lo`: BPF_PROG_TEST_RUN runs programs
/// on it, so the tests configure it as their VM's interface.
fn lo() -> u32 {
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    assert!(i > 0, "no lo");
    i
}

/// Frames on `lo` are VM `SLOT`'s, with this subnet and prefix.
fn configure(
    steer: &mut Steer,
    network: Ipv4Addr,
    prefix_len: u8,
    prefix6: Option<Ipv6Addr>,
    dedicated: bool,
) {
    let t = Target {
        network,
        prefix_len,
        prefix6,
        dedicated,
    };
    steer.set_config(lo(), t.config(SLOT)).expect("config");
}

/// Counter `why` of the test's VM plus that of frames of no VM.
fn counter(steer: &Steer, why: u32) -> u64 {
    let name = reason::NAMES[why as usize];
    [0, SLOT]
        .iter()
        .map(|&slot| {
            steer
                .counters(slot)
                .into_iter()
                .find(|(k, _)| *k == name)
                .expect("counter")
                .1
        })
        .sum()
}

/// Runs `frame`, checks the verdict and that exactly counter `why` moved by one.
fn expect(steer: &mut Steer, what: &str, frame: &[u8], verdict: u32, why: u32) {
    expect_with(run, steer, what, frame, verdict, why);
}

/// [`expect`] for the shared-NIC classifier (TC verdicts).
fn expect_tc(steer: &mut Steer, what: &str, frame: &[u8], verdict: u32, why: u32) {
    expect_with(run_tc, steer, what, frame, verdict, why);
}

fn expect_with(
    run: fn(&mut Steer, &[u8]) -> u32,
    steer: &mut Steer,
    what: &str,
    frame: &[u8],
    verdict: u32,
    why: u32,
) {
    let before: Vec<u64> = (0..reason::COUNT).map(|r| counter(steer, r)).collect();
    let got = run(steer, frame);
    assert_eq!(got, verdict, "{what}: verdict");
    for r in 0..reason::COUNT {
        let delta = counter(steer, r) - before[r as usize];
        let want = u64::from(r == why);
        assert_eq!(
            delta,
            want,
            "{what}: counter {} moved by {delta}",
            reason::NAMES[r as usize]
        );
    }
}

fn unbound_xsk() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(
        fd >= 0,
        "socket(AF_XDP): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd we own.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

#[test]
fn golden_frames_get_their_verdicts_and_counters() {
    let mut steer = Steer::load().expect("load steer (needs root)");
    let vip = Ipv4Addr::new(100, 77, 4, 181);
    let outside = Ipv4Addr::new(10, 200, 0, 1);

    expect(
        &mut steer,
        "before config",
        &ipv4_tcp(vip),
        XDP_PASS,
        reason::PASS_UNCONFIGURED,
    );
    configure(&mut steer, Ipv4Addr::new(100, 77, 0, 0), 16, None, false);
    expect(
        &mut steer,
        "subnet TCP, no socket",
        &ipv4_tcp(vip),
        XDP_PASS,
        reason::NO_SOCKET,
    );

    let xsk = unbound_xsk();
    use std::os::fd::AsRawFd;
    steer
        .register_xsk(SLOT, xsk.as_raw_fd())
        .expect("XSKS insert");

    expect(
        &mut steer,
        "subnet TCP",
        &ipv4_tcp(vip),
        XDP_REDIRECT,
        reason::REDIRECT_IPV4,
    );
    expect(
        &mut steer,
        "ARP request for a vIP",
        &arp(1, vip),
        XDP_REDIRECT,
        reason::REDIRECT_ARP,
    );
    expect(
        &mut steer,
        "ARP reply about a vIP",
        &arp(2, vip),
        XDP_PASS,
        reason::PASS_ARP_OTHER,
    );
    expect(
        &mut steer,
        "ARP request outside",
        &arp(1, outside),
        XDP_PASS,
        reason::PASS_ARP_OTHER,
    );
    expect(
        &mut steer,
        "IPv4 outside",
        &ipv4_tcp(outside),
        XDP_PASS,
        reason::PASS_IPV4_OTHER,
    );
    expect(
        &mut steer,
        "IPv4 just outside the prefix",
        &ipv4_tcp(Ipv4Addr::new(100, 78, 0, 1)),
        XDP_PASS,
        reason::PASS_IPV4_OTHER,
    );
    let mut udp = ipv4_tcp(vip);
    udp[14 + 9] = 17; // UDP (SNMP, DNS) to a vIP
    expect(
        &mut steer,
        "UDP to a vIP",
        &udp,
        XDP_REDIRECT,
        reason::REDIRECT_IPV4,
    );
    let mut icmp = ipv4_tcp(vip);
    icmp[14 + 9] = 1; // ICMP echo to a vIP
    expect(
        &mut steer,
        "ICMP to a vIP",
        &icmp,
        XDP_REDIRECT,
        reason::REDIRECT_IPV4,
    );
    let mut frag = ipv4_tcp(vip);
    frag[14 + 6] = 0x20; // more fragments: the engine counts and drops it
    expect(
        &mut steer,
        "IPv4 fragment to a vIP",
        &frag,
        XDP_REDIRECT,
        reason::REDIRECT_IPV4,
    );
    // 802.1Q-tagged frames are not the VM's untagged NIC traffic: passed.
    let mut vlan = ipv4_tcp(vip);
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    expect(
        &mut steer,
        "VLAN-tagged",
        &vlan,
        XDP_PASS,
        reason::PASS_OTHER,
    );
    let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 59, 64];
    v6.extend_from_slice(&[0u8; 32]);
    expect(
        &mut steer,
        "IPv6",
        &eth(0x86dd, &v6),
        XDP_PASS,
        reason::PASS_IPV6,
    );
    expect(
        &mut steer,
        "other ethertype",
        &eth(0x88cc, &[0u8; 46]),
        XDP_PASS,
        reason::PASS_OTHER,
    );
    expect(
        &mut steer,
        "IPv4 header cut off",
        &eth(0x0800, &[0x45, 0, 0]),
        XDP_PASS,
        reason::PASS_SHORT,
    );
    expect(
        &mut steer,
        "bare Ethernet header",
        &eth(0x0800, &[]),
        XDP_PASS,
        reason::PASS_SHORT,
    );
    expect(
        &mut steer,
        "ARP cut off",
        &eth(0x0806, &[0, 1, 8, 0]),
        XDP_PASS,
        reason::PASS_SHORT,
    );
    let mut bad = ipv4_tcp(vip);
    bad[14] = 0x65; // version 6 in an IPv4 ethertype
    expect(
        &mut steer,
        "garbage version",
        &bad,
        XDP_PASS,
        reason::PASS_SHORT,
    );
    let mut ihl = ipv4_tcp(vip);
    ihl[14] = 0x43; // IHL 12 bytes
    expect(
        &mut steer,
        "IHL below 20",
        &ihl,
        XDP_PASS,
        reason::PASS_SHORT,
    );
}

fn dhcp_discover() -> Vec<u8> {
    let mut ip = vec![
        0x45, 0, 1, 12, 0, 1, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255,
    ];
    ip.extend_from_slice(&[0, 68, 0, 67, 0, 248, 0, 0]); // UDP 68 -> 67
    ip.extend_from_slice(&[1u8; 240]);
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
    f.extend_from_slice(&ip);
    f
}

/// An mDNS query from the VM to its group (`dst`), IPv4; to port
/// `port`.
fn mdns4(dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut ip = vec![
        0x45, 0, 0, 40, 0, 1, 0, 0, 255, 17, 0, 0, 10, 200, 0, 2, // .. src
    ];
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&[0x14, 0xe9]); // from 5353
    ip.extend_from_slice(&port.to_be_bytes());
    ip.extend_from_slice(&[0, 20, 0, 0]);
    ip.extend_from_slice(&[0u8; 12]);
    let mut f = vec![0x01, 0, 0x5e, 0, 0, 0xfb];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
    f.extend_from_slice(&ip);
    f
}

/// The same over IPv6, to `ff02::fb`.
fn mdns6(port: u16) -> Vec<u8> {
    let mut udp = vec![0x14, 0xe9];
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&[0, 20, 0, 0]);
    udp.extend_from_slice(&[0u8; 12]);
    ipv6("ff02::fb".parse().unwrap(), 17, 255, &udp)
}

#[test]
fn mdns_from_the_vm_goes_to_the_engine_and_other_multicast_passes() {
    let mut steer = Steer::load().expect("load steer (needs root)");
    let xsk = unbound_xsk();
    use std::os::fd::AsRawFd;
    steer
        .register_xsk(SLOT, xsk.as_raw_fd())
        .expect("XSKS insert");
    configure(
        &mut steer,
        Ipv4Addr::new(100, 77, 0, 0),
        16,
        Some("fd6e:7264::".parse().unwrap()),
        true,
    );
    let group = Ipv4Addr::new(224, 0, 0, 251);
    expect(
        &mut steer,
        "mDNS",
        &mdns4(group, 5353),
        XDP_REDIRECT,
        reason::MDNS,
    );
    expect(
        &mut steer,
        "mDNS over IPv6",
        &mdns6(5353),
        XDP_REDIRECT,
        reason::MDNS,
    );
    expect(
        &mut steer,
        "the group, another port",
        &mdns4(group, 5354),
        XDP_PASS,
        reason::PASS_IPV4_OTHER,
    );
    expect(
        &mut steer,
        "another group",
        &mdns4(Ipv4Addr::new(239, 255, 255, 250), 5353),
        XDP_PASS,
        reason::PASS_IPV4_OTHER,
    );
    expect(
        &mut steer,
        "IPv6, another port",
        &mdns6(53),
        XDP_PASS,
        reason::PASS_IPV6,
    );
}

#[test]
fn dhcp_is_steered_only_on_a_dedicated_nic() {
    let mut steer = Steer::load().expect("load steer (needs root)");
    let xsk = unbound_xsk();
    use std::os::fd::AsRawFd;
    steer
        .register_xsk(SLOT, xsk.as_raw_fd())
        .expect("XSKS insert");
    configure(&mut steer, Ipv4Addr::new(100, 77, 0, 0), 16, None, false);
    expect(
        &mut steer,
        "DHCP, shared NIC",
        &dhcp_discover(),
        XDP_PASS,
        reason::PASS_IPV4_OTHER,
    );
    configure(&mut steer, Ipv4Addr::new(100, 77, 0, 0), 16, None, true);
    expect(
        &mut steer,
        "DHCP, dedicated NIC",
        &dhcp_discover(),
        XDP_REDIRECT,
        reason::REDIRECT_DHCP,
    );
    let mut other_udp = dhcp_discover();
    other_udp[14 + 20 + 3] = 68; // to port 68: not a request
    expect(
        &mut steer,
        "UDP to 68",
        &other_udp,
        XDP_PASS,
        reason::PASS_IPV4_OTHER,
    );
}

#[test]
fn a_narrower_subnet_is_honoured() {
    let mut steer = Steer::load().expect("load steer (needs root)");
    configure(&mut steer, Ipv4Addr::new(10, 9, 8, 0), 24, None, false);
    let xsk = unbound_xsk();
    use std::os::fd::AsRawFd;
    steer
        .register_xsk(SLOT, xsk.as_raw_fd())
        .expect("XSKS insert");
    expect(
        &mut steer,
        "in /24",
        &ipv4_tcp(Ipv4Addr::new(10, 9, 8, 77)),
        XDP_REDIRECT,
        reason::REDIRECT_IPV4,
    );
    expect(
        &mut steer,
        "next /24",
        &ipv4_tcp(Ipv4Addr::new(10, 9, 9, 77)),
        XDP_PASS,
        reason::PASS_IPV4_OTHER,
    );
}

fn ipv6(dst: Ipv6Addr, next: u8, hop: u8, l4: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[next, hop]);
    ip.extend_from_slice(&"fd6e:7264::2".parse::<Ipv6Addr>().unwrap().octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(l4);
    eth(0x86dd, &ip)
}

/// ICMPv6 neighbour solicitation for `target`, to its solicited-node group.
fn ns(target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    let t = target.octets();
    let snm = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    ipv6(snm, 58, 255, &icmp)
}

#[test]
fn ipv6_to_the_prefix_and_ndp_for_it_are_steered_the_rest_passes() {
    let mut steer = Steer::load().expect("load steer (needs root)");
    let xsk = unbound_xsk();
    use std::os::fd::AsRawFd;
    steer
        .register_xsk(SLOT, xsk.as_raw_fd())
        .expect("XSKS insert");
    let prefix: Ipv6Addr = "fd6e:7264::".parse().unwrap();
    let vip6: Ipv6Addr = "fd6e:7264::644d:4b5".parse().unwrap();
    let outside: Ipv6Addr = "fd00:200::1".parse().unwrap();
    let tcp = [
        0x9c, 0x40, 0x23, 0x8c, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];
    let rs = ipv6(
        "ff02::2".parse().unwrap(),
        58,
        255,
        &[133, 0, 0, 0, 0, 0, 0, 0],
    );

    configure(&mut steer, Ipv4Addr::new(100, 77, 0, 0), 16, None, false);
    expect(
        &mut steer,
        "IPv6 with no prefix set",
        &ipv6(vip6, 6, 64, &tcp),
        XDP_PASS,
        reason::PASS_IPV6,
    );

    configure(
        &mut steer,
        Ipv4Addr::new(100, 77, 0, 0),
        16,
        Some(prefix),
        false,
    );
    expect(
        &mut steer,
        "TCP to an IPv6 vIP",
        &ipv6(vip6, 6, 64, &tcp),
        XDP_REDIRECT,
        reason::REDIRECT_IPV6,
    );
    expect(
        &mut steer,
        "UDP to the vDNS ::53",
        &ipv6("fd6e:7264::53".parse().unwrap(), 17, 64, &[0; 8]),
        XDP_REDIRECT,
        reason::REDIRECT_IPV6,
    );
    expect(
        &mut steer,
        "echo to an IPv6 vIP",
        &ipv6(vip6, 58, 64, &[128, 0, 0, 0, 0, 1, 0, 1]),
        XDP_REDIRECT,
        reason::REDIRECT_IPV6,
    );
    expect(
        &mut steer,
        "fragment to an IPv6 vIP",
        &ipv6(vip6, 44, 64, &[6, 0, 0, 1, 0, 0, 0, 1]),
        XDP_REDIRECT,
        reason::REDIRECT_IPV6,
    );
    expect(
        &mut steer,
        "NS for an IPv6 vIP",
        &ns(vip6),
        XDP_REDIRECT,
        reason::REDIRECT_NDP,
    );
    expect(
        &mut steer,
        "NS for another address",
        &ns(outside),
        XDP_PASS,
        reason::PASS_IPV6,
    );
    expect(
        &mut steer,
        "TCP outside the prefix",
        &ipv6(outside, 6, 64, &tcp),
        XDP_PASS,
        reason::PASS_IPV6,
    );
    expect(
        &mut steer,
        "the next /64",
        &ipv6("fd6e:7264:0:1::5".parse().unwrap(), 6, 64, &tcp),
        XDP_PASS,
        reason::PASS_IPV6,
    );
    expect(
        &mut steer,
        "RS on a shared NIC",
        &rs,
        XDP_PASS,
        reason::PASS_IPV6,
    );
    let mut cut = ns(vip6);
    cut.truncate(14 + 40 + 12); // the target is cut off
    expect(
        &mut steer,
        "NS cut short",
        &cut,
        XDP_PASS,
        reason::PASS_IPV6,
    );
    expect(
        &mut steer,
        "IPv6 header cut off",
        &eth(0x86dd, &[0x60, 0, 0, 0, 0, 0]),
        XDP_PASS,
        reason::PASS_SHORT,
    );
    let mut v4_in_v6 = ipv6(vip6, 6, 64, &tcp);
    v4_in_v6[14] = 0x45;
    expect(
        &mut steer,
        "version 4 in an IPv6 ethertype",
        &v4_in_v6,
        XDP_PASS,
        reason::PASS_SHORT,
    );

    configure(
        &mut steer,
        Ipv4Addr::new(100, 77, 0, 0),
        16,
        Some(prefix),
        true,
    );
    expect(
        &mut steer,
        "RS on a dedicated NIC",
        &rs,
        XDP_REDIRECT,
        reason::REDIRECT_RS,
    );
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

/// The shared-NIC classifier makes the same choices as `steer` and sends
/// ours into netredird's TAP device for the VM. In a private network
/// namespace (this test's thread only), so what it makes touches nothing
/// else.
#[test]
fn the_shared_nic_classifier_sends_ours_into_the_tap_and_passes_the_rest() {
    std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        let mut steer = Steer::load().expect("load steer (needs root)");
        let vip = Ipv4Addr::new(100, 77, 4, 181);
        let vip6: Ipv6Addr = "fd6e:7264::644d:4b5".parse().unwrap();
        let prefix: Ipv6Addr = "fd6e:7264::".parse().unwrap();
        let target = Target {
            network: Ipv4Addr::new(100, 77, 0, 0),
            prefix_len: 16,
            prefix6: Some(prefix),
            dedicated: false,
        };
        // BPF_PROG_TEST_RUN of an skb program runs on this namespace's lo.
        netredir_datapath::netlink::set_up("lo").expect("lo up");
        // A VM's NIC stand-in in this namespace.
        netredir_datapath::netlink::create_veth("vm0", "guest0", 1500).expect("veth");
        netredir_datapath::netlink::set_up("vm0").expect("up");
        assert_eq!(steer.alloc_slot().expect("slot"), SLOT);
        let tap = netredir_datapath::tap::Tap::open("nrtest0", 1500).expect("TAP device");
        steer
            .attach_tap(SLOT, "vm0", tap.name(), &target)
            .expect("attach TC");
        // What vm0 got (the device to send into, the VM's slot), on lo too.
        let vm0 = netredir_datapath::netlink::ifindex("vm0").expect("vm0");
        let t = netredir_datapath::netlink::ifindex("nrtest0").expect("tap");
        let cfg = steer.config_of(vm0).expect("vm0 configured");
        assert_eq!((cfg.slot, cfg.nic_ifindex, cfg.tap_ifindex), (SLOT, vm0, t));
        // `reflect` on the device finds the NIC to send the engine's frames out of.
        assert_eq!(steer.config_of(t), Some(cfg));
        steer.set_config(lo(), cfg).expect("config");

        expect_tc(
            &mut steer,
            "subnet TCP",
            &ipv4_tcp(vip),
            TC_ACT_REDIRECT,
            reason::REDIRECT_IPV4,
        );
        expect_tc(
            &mut steer,
            "ARP for a vIP",
            &arp(1, vip),
            TC_ACT_REDIRECT,
            reason::REDIRECT_ARP,
        );
        expect_tc(
            &mut steer,
            "NS for an IPv6 vIP",
            &ns(vip6),
            TC_ACT_REDIRECT,
            reason::REDIRECT_NDP,
        );
        let tcp6 = [
            0x9c, 0x40, 0x23, 0x8c, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
        ];
        expect_tc(
            &mut steer,
            "TCP to an IPv6 vIP",
            &ipv6(vip6, 6, 64, &tcp6),
            TC_ACT_REDIRECT,
            reason::REDIRECT_IPV6,
        );
        expect_tc(
            &mut steer,
            "IPv4 outside",
            &ipv4_tcp(Ipv4Addr::new(10, 200, 0, 1)),
            TC_ACT_OK,
            reason::PASS_IPV4_OTHER,
        );
        expect_tc(
            &mut steer,
            "ARP outside",
            &arp(1, Ipv4Addr::new(10, 200, 0, 1)),
            TC_ACT_OK,
            reason::PASS_ARP_OTHER,
        );
        expect_tc(
            &mut steer,
            "IPv6 outside",
            &ipv6("fd00:200::1".parse().unwrap(), 6, 64, &tcp6),
            TC_ACT_OK,
            reason::PASS_IPV6,
        );
        // mDNS: a copy for the engine, the frame itself goes on.
        expect_tc(
            &mut steer,
            "mDNS",
            &mdns4(Ipv4Addr::new(224, 0, 0, 251), 5353),
            TC_ACT_OK,
            reason::MDNS,
        );
        expect_tc(
            &mut steer,
            "mDNS over IPv6",
            &mdns6(5353),
            TC_ACT_OK,
            reason::MDNS,
        );
        expect_tc(
            &mut steer,
            "SSDP multicast",
            &mdns4(Ipv4Addr::new(239, 255, 255, 250), 1900),
            TC_ACT_OK,
            reason::PASS_IPV4_OTHER,
        );
        expect_tc(
            &mut steer,
            "DHCP on a shared NIC",
            &dhcp_discover(),
            TC_ACT_OK,
            reason::PASS_IPV4_OTHER,
        );
        expect_tc(
            &mut steer,
            "other ethertype",
            &eth(0x88cc, &[0u8; 46]),
            TC_ACT_OK,
            reason::PASS_OTHER,
        );
        expect_tc(
            &mut steer,
            // (The kernel refuses to test-run an skb with a cut IPv4 header.)
            "ARP cut off",
            &eth(0x0806, &[0, 1, 8, 0]),
            TC_ACT_OK,
            reason::PASS_SHORT,
        );

        // Detached: its entries are gone, and the device with its fd;
        // nothing is taken, the VM's traffic passes.
        steer.detach(SLOT);
        assert!(steer.config_of(vm0).is_none() && steer.config_of(lo()).is_none());
        assert!(steer.config_of(t).is_none());
        drop(tap);
        assert!(!netredir_datapath::steer::interface_exists("nrtest0"));
        expect_tc(
            &mut steer,
            "subnet TCP, VM detached",
            &ipv4_tcp(vip),
            TC_ACT_OK,
            reason::PASS_UNCONFIGURED,
        );
        // A config without a device (as while attaching) passes ours, counted.
        steer.set_config(lo(), target.config(SLOT)).expect("config");
        expect_tc(
            &mut steer,
            "subnet TCP, no TAP device yet",
            &ipv4_tcp(vip),
            TC_ACT_OK,
            reason::NO_SOCKET,
        );
    })
    .join()
    .expect("the test thread");
}
