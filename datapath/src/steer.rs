//! Loading `steer`, attaching it to the VM's NIC, and talking to its maps.
//!
//! Two modes. Dedicated NIC ([`Steer::attach`]): the XDP program `steer`
//! on the host end of the VM's NIC, AF_XDP on that NIC. Shared NIC
//! ([`Steer::make_pair`], then [`Steer::attach_shared`]): a TC classifier
//! on the NIC picks the frames for the virtual subnet and moves them into
//! a veth pair netredird makes for itself, where XDP hands them to AF_XDP;
//! the engine's answers go back out of the NIC through a TC program on the
//! pair. The VM's other traffic never meets XDP (which on a veth would
//! turn off TSO for all of it).

use crate::netlink;
use aya::maps::{Array, MapData, PerCpuArray, XskMap};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfError};
use netredir_ebpf_common::{SteerConfig, reason};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

/// The compiled `steer` object, built by this crate's build script.
pub static STEER_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer"));

/// Why `steer` could not be set up, phrased so an operator can act on it.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// The interface does not exist (in this network namespace).
    #[error("cannot attach XDP to {0}: no such interface")]
    NoSuchInterface(String),
    /// Loading or attaching needs CAP_BPF/CAP_NET_ADMIN.
    #[error(
        "cannot load XDP program: permission denied (run netredird as root or with CAP_BPF and CAP_NET_ADMIN)"
    )]
    Permission,
    /// The driver has no native XDP.
    #[error(
        "cannot attach XDP to {iface} in driver mode: {source} (the driver may not support native XDP)"
    )]
    Attach {
        /// Interface.
        iface: String,
        /// What aya said.
        source: ProgramError,
    },
    /// Native XDP on a veth takes no frame larger than a page.
    #[error(
        "{iface} has MTU {mtu}: XDP on a dedicated NIC needs an MTU of at most {max} (or run without --dedicated: the shared-NIC mode takes any MTU)",
        max = MAX_XDP_MTU
    )]
    Mtu {
        /// Interface.
        iface: String,
        /// Its MTU.
        mtu: u32,
    },
    /// A TC program could not be attached.
    #[error("cannot attach the TC program {prog} to {iface}: {source}")]
    AttachTc {
        /// Program.
        prog: &'static str,
        /// Interface.
        iface: String,
        /// What aya said.
        source: ProgramError,
    },
    /// netredir's own veth pair could not be made.
    #[error("cannot set up netredir's veth pair {pair} for {iface}: {source}")]
    Pair {
        /// The pair's names.
        pair: String,
        /// The VM's NIC.
        iface: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// The object or its maps are not what this build expects.
    #[error("steer object: {0}")]
    Object(String),
    /// A map update failed.
    #[error("steer map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What aya said.
        source: aya::maps::MapError,
    },
}

/// A loaded (and maybe attached) `steer`. Dropping it detaches the
/// programs and removes the veth pair it made.
pub struct Steer {
    ebpf: Ebpf,
    config: Array<MapData, SteerConfig>,
    xsks: XskMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
    /// What was last written to `CONFIG`.
    cfg: SteerConfig,
    /// Shared NIC: netredir's veth pair (outer end, inner end).
    pair: Option<(String, String)>,
}

/// The largest MTU native XDP takes on a veth without multi-buffer
/// support (a page, less headroom and the skb's shared info). The pair
/// gets at most this; the engine's TCP MSS follows from it, so a VM NIC
/// with jumbo frames still works (its segments to vIPs are this small).
pub const MAX_XDP_MTU: u32 = 3500;

/// The programs in the object, and their kinds.
const XDP_PROGRAMS: [&str; 2] = ["steer", "steer_pair"];
const TC_PROGRAMS: [&str; 2] = ["steer_tc", "reflect"];

fn is_perm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

impl Steer {
    /// Loads the program and its maps into the kernel (not attached yet).
    pub fn load() -> Result<Self, SteerError> {
        let mut ebpf = Ebpf::load(STEER_OBJECT).map_err(|e| match &e {
            EbpfError::MapError(m) if is_perm(m) => SteerError::Permission,
            other if is_perm(other) => SteerError::Permission,
            _ => SteerError::Object(e.to_string()),
        })?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| SteerError::Object(format!("map {name} missing")))
        };
        let config = take(&mut ebpf, "CONFIG")?
            .try_into()
            .map_err(|e: aya::maps::MapError| SteerError::Object(e.to_string()))?;
        let xsks = take(&mut ebpf, "XSKS")?
            .try_into()
            .map_err(|e: aya::maps::MapError| SteerError::Object(e.to_string()))?;
        let counters = take(&mut ebpf, "COUNTERS")?
            .try_into()
            .map_err(|e: aya::maps::MapError| SteerError::Object(e.to_string()))?;
        let refused = |name: &str, e: ProgramError| {
            if is_perm(&e) {
                SteerError::Permission
            } else {
                SteerError::Object(format!("verifier refused {name}: {e}"))
            }
        };
        for name in XDP_PROGRAMS {
            xdp_program(&mut ebpf, name)?
                .load()
                .map_err(|e| refused(name, e))?;
        }
        for name in TC_PROGRAMS {
            tc_program(&mut ebpf, name)?
                .load()
                .map_err(|e| refused(name, e))?;
        }
        Ok(Self {
            ebpf,
            config,
            xsks,
            counters,
            cfg: SteerConfig::default(),
            pair: None,
        })
    }

    /// Attaches in native (driver) mode to `iface`; detached on drop.
    pub fn attach(&mut self, iface: &str) -> Result<(), SteerError> {
        if !interface_exists(iface) {
            return Err(SteerError::NoSuchInterface(iface.into()));
        }
        if let Ok(mtu) = netlink::mtu(iface)
            && mtu > MAX_XDP_MTU
        {
            return Err(SteerError::Mtu {
                iface: iface.into(),
                mtu,
            });
        }
        let prog = xdp_program(&mut self.ebpf, "steer")?;
        prog.attach(iface, XdpMode::Driver)
            .map_err(|source| match &source {
                e if is_perm(e) => SteerError::Permission,
                _ => SteerError::Attach {
                    iface: iface.into(),
                    source,
                },
            })?;
        Ok(())
    }

    /// Shared NIC, first step: makes netredir's veth pair for `nic` (its
    /// MTU up to [`MAX_XDP_MTU`], no addresses, IPv6 off, up) and returns the name of the
    /// end the AF_XDP socket binds to. A pair left by an earlier run is
    /// replaced; this one is removed on drop.
    pub fn make_pair(&mut self, nic: &str) -> Result<String, SteerError> {
        let idx = netlink::ifindex(nic).map_err(|_| SteerError::NoSuchInterface(nic.into()))?;
        let (outer, inner) = (format!("nr{idx}o"), format!("nr{idx}i"));
        let fail = |source: io::Error| SteerError::Pair {
            pair: format!("{outer}/{inner}"),
            iface: nic.into(),
            source,
        };
        if interface_exists(&outer) {
            netlink::delete_link(&outer).map_err(fail)?;
        }
        let mtu = netlink::mtu(nic).unwrap_or(1500).min(MAX_XDP_MTU);
        netlink::create_veth(&outer, &inner, mtu).map_err(fail)?;
        self.pair = Some((outer.clone(), inner.clone()));
        for end in [&outer, &inner] {
            // No addresses, so no IPv6 autoconfiguration chatter either.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{end}/disable_ipv6"), "1");
            netlink::set_up(end).map_err(fail)?;
        }
        Ok(inner)
    }

    /// Shared NIC, second step (after the AF_XDP socket is registered):
    /// `steer_pair` on the pair's inner end, `reflect` on its outer end,
    /// and last `steer_tc` on the VM's NIC. Detached on drop.
    pub fn attach_shared(&mut self, nic: &str) -> Result<(), SteerError> {
        let Some((outer, inner)) = self.pair.clone() else {
            return Err(SteerError::Object("attach_shared before make_pair".into()));
        };
        let index = |name: &str| {
            netlink::ifindex(name).map_err(|_| SteerError::NoSuchInterface(name.into()))
        };
        self.cfg.pair_ifindex = index(&outer)?;
        self.cfg.nic_ifindex = index(nic)?;
        self.write_config()?;
        xdp_program(&mut self.ebpf, "steer_pair")?
            .attach(&inner, XdpMode::Driver)
            .map_err(|source| SteerError::Attach {
                iface: inner.clone(),
                source,
            })?;
        // Before TCX (6.6) aya attaches through netlink, under a clsact
        // qdisc that must be there first: add it (it may be already).
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        for (prog, iface) in [("reflect", outer.as_str()), ("steer_tc", nic)] {
            if !tcx && let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
                tracing::debug!(iface, "clsact qdisc not added (there already?): {e}");
            }
            tc_program(&mut self.ebpf, prog)?
                .attach(iface, TcAttachType::Ingress)
                .map_err(|source| match &source {
                    e if is_perm(e) => SteerError::Permission,
                    _ => SteerError::AttachTc {
                        prog,
                        iface: iface.into(),
                        source,
                    },
                })?;
        }
        Ok(())
    }

    /// Removes netredir's veth pair now (also done on drop), taking the
    /// programs on it along: the VM's NIC keeps only the classifier, which
    /// then has nowhere to send frames and passes them all.
    pub fn remove_pair(&mut self) {
        if let Some((outer, _)) = self.pair.take() {
            self.cfg.pair_ifindex = 0;
            let _ = self.write_config();
            if let Err(e) = netlink::delete_link(&outer) {
                tracing::warn!("cannot remove netredir's veth pair {outer}: {e}");
            }
        }
    }

    /// The names of netredir's veth pair (outer, inner), in shared mode.
    pub fn pair(&self) -> Option<(&str, &str)> {
        self.pair.as_ref().map(|(o, i)| (o.as_str(), i.as_str()))
    }

    /// The dedicated-NIC program, for `BPF_PROG_TEST_RUN` in tests.
    pub fn program(&mut self) -> Result<&mut Xdp, SteerError> {
        xdp_program(&mut self.ebpf, "steer")
    }

    /// The shared-NIC classifier, for `BPF_PROG_TEST_RUN` in tests.
    pub fn tc_classifier(&mut self) -> Result<&mut SchedClassifier, SteerError> {
        tc_program(&mut self.ebpf, "steer_tc")
    }

    /// Tells `steer` which IPv4 subnet to take (and no IPv6).
    pub fn set_subnet(&mut self, network: Ipv4Addr, prefix_len: u8) -> Result<(), SteerError> {
        self.configure(network, prefix_len, None, false)
    }

    /// Tells `steer` which IPv4 subnet and IPv6 /64 (`prefix6`) to take,
    /// and whether DHCP requests and router solicitations are ours too (a
    /// NIC dedicated to netredir).
    pub fn configure(
        &mut self,
        network: Ipv4Addr,
        prefix_len: u8,
        prefix6: Option<Ipv6Addr>,
        dhcp: bool,
    ) -> Result<(), SteerError> {
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len)
        };
        self.cfg = SteerConfig {
            subnet_v4: u32::from_ne_bytes((u32::from(network) & mask).to_be_bytes()),
            mask_v4: u32::from_ne_bytes(mask.to_be_bytes()),
            flags: if dhcp {
                netredir_ebpf_common::FLAG_DHCP
            } else {
                0
            },
            _pad: 0,
            prefix_v6: prefix6.map_or([0; 8], |p| {
                let o = p.octets();
                [o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]
            }),
            ..self.cfg
        };
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), SteerError> {
        self.config
            .set(0, self.cfg, 0)
            .map_err(|source| SteerError::Map {
                map: "CONFIG",
                source,
            })
    }

    /// Sends frames of receive queue `queue` to the AF_XDP socket `fd`.
    pub fn register_xsk(&mut self, queue: u32, fd: RawFd) -> Result<(), SteerError> {
        self.xsks
            .set(queue, fd, 0)
            .map_err(|source| SteerError::Map {
                map: "XSKS",
                source,
            })
    }

    /// Counter totals over all CPUs, indexed by `reason`.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        (0..reason::COUNT)
            .map(|i| {
                let v = self
                    .counters
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (reason::NAMES[i as usize], v)
            })
            .collect()
    }
}

impl Drop for Steer {
    fn drop(&mut self) {
        // The programs detach as the object goes; the pair goes first.
        self.remove_pair();
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, SteerError> {
    ebpf.program_mut(name)
        .ok_or_else(|| SteerError::Object(format!("program {name} missing")))?
        .try_into()
        .map_err(|e: ProgramError| SteerError::Object(e.to_string()))
}

fn tc_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, SteerError> {
    ebpf.program_mut(name)
        .ok_or_else(|| SteerError::Object(format!("program {name} missing")))?
        .try_into()
        .map_err(|e: ProgramError| SteerError::Object(e.to_string()))
}

/// Whether `iface` exists in the caller's network namespace.
pub fn interface_exists(iface: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(iface) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// The MAC address of `iface`, from SIOCGIFHWADDR.
pub fn interface_mac(iface: &str) -> io::Result<[u8; 6]> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    // SAFETY: ioctl with a live ifreq of the right type.
    let r = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(err);
    }
    // SAFETY: SIOCGIFHWADDR filled ifru_hwaddr.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}
