//! The few rtnetlink requests the shared-NIC mode needs: make a veth
//! pair, bring a link up, delete a link. Plain `NETLINK_ROUTE` messages,
//! each acknowledged, so a failure comes back as the kernel's errno.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
/// `struct ifinfomsg`: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = 16;

/// The ifindex of `name`, or an error saying it does not exist.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name}"),
        )),
        i => Ok(i),
    }
}

/// The MTU of `name`.
pub fn mtu(name: &str) -> io::Result<u32> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))?;
    s.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("MTU of {name}: {s:?}")))
}

/// Creates the veth pair `a` ⇄ `b` with MTU `mtu`, both down.
pub fn create_veth(a: &str, b: &str, mtu: u32) -> io::Result<()> {
    let mut peer = ifinfomsg(0, 0, 0);
    attr(&mut peer, IFLA_IFNAME, &cstr(b));
    attr(&mut peer, IFLA_MTU, &mtu.to_ne_bytes());
    let mut data = Vec::new();
    attr(&mut data, VETH_INFO_PEER | NLA_F_NESTED, &peer);
    let mut info = Vec::new();
    attr(&mut info, IFLA_INFO_KIND, b"veth\0");
    attr(&mut info, IFLA_INFO_DATA | NLA_F_NESTED, &data);
    let mut body = ifinfomsg(0, 0, 0);
    attr(&mut body, IFLA_IFNAME, &cstr(a));
    attr(&mut body, IFLA_MTU, &mtu.to_ne_bytes());
    attr(&mut body, IFLA_LINKINFO | NLA_F_NESTED, &info);
    request(
        libc::RTM_NEWLINK,
        libc::NLM_F_CREATE | libc::NLM_F_EXCL,
        &body,
    )
}

/// Brings link `name` up.
pub fn set_up(name: &str) -> io::Result<()> {
    let idx = ifindex(name)?;
    let up = libc::IFF_UP as u32;
    request(libc::RTM_NEWLINK, 0, &ifinfomsg(idx, up, up))
}

/// Sets link `name`'s MTU.
pub fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let idx = ifindex(name)?;
    let mut body = ifinfomsg(idx, 0, 0);
    attr(&mut body, IFLA_MTU, &mtu.to_ne_bytes());
    request(libc::RTM_NEWLINK, 0, &body)
}

/// Deletes link `name` (a veth takes its peer along).
pub fn delete_link(name: &str) -> io::Result<()> {
    let idx = ifindex(name)?;
    request(libc::RTM_DELLINK, 0, &ifinfomsg(idx, 0, 0))
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut m = vec![0u8; IFINFOMSG_LEN];
    m[0] = libc::AF_UNSPEC as u8;
    m[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

/// Appends one attribute (`struct rtattr` and its payload, 4-aligned).
fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Sends one request and waits for its acknowledgement.
fn request(kind: u16, flags: i32, body: &[u8]) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let seq = 1u32;
    let len = 16 + body.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | flags) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    // SAFETY: an all-zero sockaddr_nl addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: valid buffer and address for the call's duration.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    loop {
        // SAFETY: valid buffer for the call's duration.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= 16 {
            let mlen = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let mtype = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
            let mseq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
            if mlen < 16 || mlen > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink answer",
                ));
            }
            if mtype == libc::NLMSG_ERROR as u16 && mseq == seq && mlen >= 20 {
                let errno = i32::from_ne_bytes(rest[16..20].try_into().expect("4 bytes"));
                return match errno {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
            rest = &rest[mlen.next_multiple_of(4).min(rest.len())..];
        }
    }
}
