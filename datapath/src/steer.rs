//! Loading `steer` once per host, attaching it to each VM's NIC, and
//! talking to its maps (keyed by ifindex and VM slot).
//!
//! Two modes. Dedicated NIC ([`Steer::attach`]): the XDP program `steer`
//! on the host end of the VM's NIC, AF_XDP on that NIC. Shared NIC
//! ([`Steer::attach_tap`]): a TC classifier on the NIC picks the frames
//! for the virtual subnet and moves them into a TAP device netredird opens
//! for the VM ([`crate::tap`], where the guest's large segments arrive
//! whole); the engine's answers go back out of the NIC through a TC
//! program on the device. The VM's other traffic never meets XDP (which on
//! a veth would turn off TSO for all of it).

use crate::netlink;
use aya::maps::{HashMap, MapData, PerCpuArray, XskMap};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfError};
use netredir_ebpf_common::{MAX_VMS, SteerConfig, reason};
use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

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

/// `steer`, loaded once per host, serving every attached VM: each VM has a
/// slot (its AF_XDP socket in `XSKS`, its row of counters) and `CONFIG`
/// entries for its interfaces. Dropping it detaches every VM.
pub struct Steer {
    ebpf: Ebpf,
    config: HashMap<MapData, u32, SteerConfig>,
    xsks: XskMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
    vms: BTreeMap<u32, VmLinks>,
}

/// What one VM has in the kernel, to undo at detach.
#[derive(Debug, Default)]
struct VmLinks {
    /// Its `CONFIG` keys (ifindexes).
    keys: Vec<u32>,
    xdp: Vec<(&'static str, XdpLinkId)>,
    tc: Vec<(&'static str, SchedClassifierLinkId)>,
}

/// Which frames of a VM are its: the subnet, the /64, and on a dedicated
/// NIC DHCP requests and router solicitations too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// IPv4 network of the virtual subnet.
    pub network: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The virtual IPv6 /64, if any.
    pub prefix6: Option<Ipv6Addr>,
    /// The NIC is only for netredir.
    pub dedicated: bool,
}

impl Target {
    /// The map value for VM `slot` (no TAP device yet).
    pub fn config(&self, slot: u32) -> SteerConfig {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix_len.min(32))
        };
        SteerConfig {
            subnet_v4: u32::from_ne_bytes((u32::from(self.network) & mask).to_be_bytes()),
            mask_v4: u32::from_ne_bytes(mask.to_be_bytes()),
            flags: if self.dedicated {
                netredir_ebpf_common::FLAG_DHCP
            } else {
                0
            },
            slot,
            prefix_v6: self.prefix6.map_or([0; 8], |p| {
                let o = p.octets();
                [o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]
            }),
            tap_ifindex: 0,
            nic_ifindex: 0,
        }
    }
}

/// The largest MTU native XDP takes on a veth without multi-buffer
/// support (a page, less headroom and the skb's shared info): netredird
/// steers a dedicated NIC above it as a shared one (TC into a TAP device).
pub const MAX_XDP_MTU: u32 = 3500;

/// The programs in the object, and their kinds.
const XDP_PROGRAMS: [&str; 1] = ["steer"];
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
    /// Loads the programs and their maps into the kernel (nothing attached).
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
            vms: BTreeMap::new(),
        })
    }

    /// A free VM slot, taken until [`Steer::detach`].
    pub fn alloc_slot(&mut self) -> Result<u32, SteerError> {
        let slot = (1..MAX_VMS)
            .find(|s| !self.vms.contains_key(s))
            .ok_or_else(|| SteerError::Object(format!("all {} VM slots taken", MAX_VMS - 1)))?;
        self.vms.insert(slot, VmLinks::default());
        Ok(slot)
    }

    fn links(&mut self, slot: u32) -> Result<&mut VmLinks, SteerError> {
        self.vms
            .get_mut(&slot)
            .ok_or_else(|| SteerError::Object(format!("VM slot {slot} not taken")))
    }

    /// Sets what the programs do on the interface with this ifindex.
    pub fn set_config(&mut self, ifindex: u32, cfg: SteerConfig) -> Result<(), SteerError> {
        self.config
            .insert(ifindex, cfg, 0)
            .map_err(|source| SteerError::Map {
                map: "CONFIG",
                source,
            })?;
        if let Some(v) = self.vms.get_mut(&cfg.slot)
            && !v.keys.contains(&ifindex)
        {
            v.keys.push(ifindex);
        }
        Ok(())
    }

    /// Sends VM `slot`'s frames to the AF_XDP socket `fd`.
    pub fn register_xsk(&mut self, slot: u32, fd: RawFd) -> Result<(), SteerError> {
        self.xsks
            .set(slot, fd, 0)
            .map_err(|source| SteerError::Map {
                map: "XSKS",
                source,
            })
    }

    /// Dedicated NIC: `steer` in native (driver) mode on `iface`, for VM
    /// `slot`'s `target` (its socket registered first).
    pub fn attach(&mut self, slot: u32, iface: &str, target: &Target) -> Result<(), SteerError> {
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
        let idx = netlink::ifindex(iface).map_err(|_| SteerError::NoSuchInterface(iface.into()))?;
        self.links(slot)?;
        self.set_config(idx, target.config(slot))?;
        let prog = xdp_program(&mut self.ebpf, "steer")?;
        let link = prog
            .attach(iface, XdpMode::Driver)
            .map_err(|source| match &source {
                e if is_perm(e) => SteerError::Permission,
                _ => SteerError::Attach {
                    iface: iface.into(),
                    source,
                },
            })?;
        self.links(slot)?.xdp.push(("steer", link));
        Ok(())
    }

    /// Shared NIC through a TAP device (after it is open): `reflect` on the
    /// device's ingress (what the engine writes goes out of the VM's NIC),
    /// then `steer_tc` on the NIC, redirecting the VM's frames for the
    /// virtual subnet into the device. Undone at detach; the device itself
    /// goes with its fd.
    pub fn attach_tap(
        &mut self,
        slot: u32,
        nic: &str,
        tap: &str,
        target: &Target,
    ) -> Result<(), SteerError> {
        self.links(slot)?;
        let index = |name: &str| {
            netlink::ifindex(name).map_err(|_| SteerError::NoSuchInterface(name.into()))
        };
        let (t, n) = (index(tap)?, index(nic)?);
        let cfg = SteerConfig {
            tap_ifindex: t,
            nic_ifindex: n,
            ..target.config(slot)
        };
        for key in [t, n] {
            self.set_config(key, cfg)?;
        }
        self.attach_tc(slot, &[("reflect", tap), ("steer_tc", nic)])
    }

    /// Attaches TC programs at ingress, in order, for VM `slot`.
    fn attach_tc(&mut self, slot: u32, progs: &[(&'static str, &str)]) -> Result<(), SteerError> {
        // Before TCX (6.6) aya attaches through netlink, under a clsact
        // qdisc that must be there first: add it (it may be already).
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        for &(prog, iface) in progs {
            if !tcx && let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
                tracing::debug!(iface, "clsact qdisc not added (there already?): {e}");
            }
            let link = tc_program(&mut self.ebpf, prog)?
                .attach(iface, TcAttachType::Ingress)
                .map_err(|source| match &source {
                    e if is_perm(e) => SteerError::Permission,
                    _ => SteerError::AttachTc {
                        prog,
                        iface: iface.into(),
                        source,
                    },
                })?;
            self.links(slot)?.tc.push((prog, link));
        }
        Ok(())
    }

    /// Undoes everything VM `slot` has (programs off its interfaces, its
    /// map entries, counters zeroed) and frees the
    /// slot. Interfaces already gone (a stopped VM's) are no error.
    pub fn detach(&mut self, slot: u32) {
        let Some(v) = self.vms.remove(&slot) else {
            return;
        };
        for (prog, link) in v.tc {
            if let Ok(p) = tc_program(&mut self.ebpf, prog) {
                let _ = p.detach(link);
            }
        }
        for (prog, link) in v.xdp {
            if let Ok(p) = xdp_program(&mut self.ebpf, prog) {
                let _ = p.detach(link);
            }
        }
        for key in v.keys {
            let _ = self.config.remove(&key);
        }
        let _ = self.xsks.unset(slot);
        if let Ok(n) = aya::util::nr_cpus() {
            for why in 0..reason::COUNT {
                if let Ok(zeros) = aya::maps::PerCpuValues::try_from(vec![0u64; n]) {
                    let _ = self.counters.set(slot * reason::COUNT + why, zeros, 0);
                }
            }
        }
    }

    /// What the programs do on the interface with this ifindex, if set.
    pub fn config_of(&self, ifindex: u32) -> Option<SteerConfig> {
        self.config.get(&ifindex, 0).ok()
    }

    /// The dedicated-NIC program, for `BPF_PROG_TEST_RUN` in tests.
    pub fn program(&mut self) -> Result<&mut Xdp, SteerError> {
        xdp_program(&mut self.ebpf, "steer")
    }

    /// The shared-NIC classifier, for `BPF_PROG_TEST_RUN` in tests.
    pub fn tc_classifier(&mut self) -> Result<&mut SchedClassifier, SteerError> {
        tc_program(&mut self.ebpf, "steer_tc")
    }

    /// VM `slot`'s counter totals over all CPUs, indexed by `reason` (slot
    /// 0: frames on an interface of no VM).
    pub fn counters(&self, slot: u32) -> Vec<(&'static str, u64)> {
        (0..reason::COUNT)
            .map(|i| {
                let v = self
                    .counters
                    .get(&(slot * reason::COUNT + i), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (reason::NAMES[i as usize], v)
            })
            .collect()
    }
}

impl Drop for Steer {
    fn drop(&mut self) {
        // The programs detach as the object goes; each VM's go first.
        let slots: Vec<u32> = self.vms.keys().copied().collect();
        for slot in slots {
            self.detach(slot);
        }
    }
}

/// The host's `steer`, shared by the threads that attach VMs and the one
/// that detaches them.
pub type SharedSteer = Arc<Mutex<Steer>>;

/// One VM's part of the host's `steer`: its slot, detached when dropped.
pub struct VmSteer {
    steer: SharedSteer,
    slot: u32,
}

impl VmSteer {
    /// Takes a slot of `steer` for a new VM.
    pub fn new(steer: &SharedSteer) -> Result<Self, SteerError> {
        let slot = lock(steer).alloc_slot()?;
        Ok(Self {
            steer: steer.clone(),
            slot,
        })
    }

    /// Its slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The host's `steer`, locked, to set this VM up.
    pub fn lock(&self) -> MutexGuard<'_, Steer> {
        lock(&self.steer)
    }

    /// Its counters.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.lock().counters(self.slot)
    }
}

impl Drop for VmSteer {
    fn drop(&mut self) {
        self.lock().detach(self.slot);
    }
}

fn lock(s: &SharedSteer) -> MutexGuard<'_, Steer> {
    s.lock().unwrap_or_else(|e| e.into_inner())
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
