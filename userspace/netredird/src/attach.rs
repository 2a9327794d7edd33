//! Attaching a VM: the slow part (attaching the host's steer programs to
//! its NIC, the TAP device of a shared NIC, the AF_XDP socket of a
//! dedicated one) runs on the
//! caller's thread (main at start, a control client for `vm attach`); the
//! data path only takes the result, so the other VMs do not wait.

use crate::datapath::VmSetup;
use crate::workers::Workers;
use anyhow::{Context, Result, bail};
use netredir_datapath::port::Port;
use netredir_datapath::steer::{
    MAX_XDP_MTU, SharedSteer, Target, VmSteer, interface_exists, interface_mac,
};
use netredir_datapath::tap::Tap;
use netredir_datapath::xsk::{MIN_FILL, Pool, Xsk};
use netredir_shared::control::{AttachSpec, Response};
use netredir_shared::subnet::{Ipv4Subnet, Ipv6Prefix};
use std::sync::{Arc, Mutex};

/// What a VM gets unless its attach says otherwise (the daemon's flags).
#[derive(Clone)]
pub struct Defaults {
    /// Virtual subnet.
    pub subnet: Ipv4Subnet,
    /// Virtual IPv6 /64.
    pub prefix6: Ipv6Prefix,
    /// The host's UMEM, which every dedicated NIC's AF_XDP socket shares:
    /// made at the first such attach (it is locked in RAM, and a host of
    /// shared NICs needs none).
    pub pool: Arc<Mutex<Option<Pool>>>,
    /// Its size, in frames.
    pub umem_frames: u32,
    /// The host's steer programs, loaded once, which every VM uses.
    pub steer: SharedSteer,
}

impl Defaults {
    /// The host's UMEM, made now if this is its first use.
    fn pool(&self) -> Result<Pool> {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = p.as_ref() {
            return Ok(pool.clone());
        }
        let pool = Pool::new(self.umem_frames)
            .context("cannot set up the host's UMEM for AF_XDP (--umem-mib)")?;
        *p = Some(pool.clone());
        Ok(pool)
    }
}

/// Steer attached and the frame port (AF_XDP socket or TAP device) open for `spec`, or why not.
pub fn prepare(spec: &AttachSpec, d: &Defaults) -> Result<VmSetup> {
    let name = spec.name.trim();
    if name.is_empty() {
        bail!("a VM needs a name (the libvirt domain's name or UUID)");
    }
    if name.len() > 1024 || name.chars().any(char::is_control) {
        bail!("VM name {name:?}: at most 1024 bytes, no control characters");
    }
    let iface = spec.iface.as_str();
    if !interface_exists(iface) {
        bail!("cannot attach to {iface}: no such interface (give the host end of the VM's NIC)");
    }
    let subnet = match &spec.subnet {
        Some(s) => s
            .parse::<Ipv4Subnet>()
            .map_err(|e| anyhow::anyhow!("--subnet {s}: {e}"))?,
        None => d.subnet,
    };
    let prefix6 = match &spec.prefix6 {
        Some(s) => s
            .parse::<Ipv6Prefix>()
            .map_err(|e| anyhow::anyhow!("--prefix6 {s}: {e}"))?,
        None => d.prefix6,
    };
    let mac =
        interface_mac(iface).with_context(|| format!("cannot read the MAC address of {iface}"))?;
    // A slot of the host's programs; on any error below, dropping it
    // undoes what was done.
    let steer = VmSteer::new(&d.steer)?;
    let slot = steer.slot();
    let target = Target {
        network: subnet.network(),
        prefix_len: subnet.prefix_len(),
        prefix6: Some(prefix6.network()),
        dedicated: spec.dedicated,
    };
    let nic_mtu = netredir_datapath::netlink::mtu(iface).unwrap_or(1500);
    // A dedicated NIC takes XDP into AF_XDP while its frames fit a page.
    // Above that (jumbo frames) XDP on a veth would need multi-buffer, so
    // it takes the shared NIC's path instead: the TC classifier (with the
    // dedicated flag: DHCP and router solicitations too) into a TAP
    // device, where frames of any size, and the guest's GSO segments,
    // arrive whole.
    let xdp = spec.dedicated && nic_mtu <= MAX_XDP_MTU;
    if spec.dedicated && !xdp {
        tracing::info!(
            %iface,
            mtu = nic_mtu,
            "dedicated NIC with MTU above {MAX_XDP_MTU}: steered by the TC classifier into a TAP device (jumbo frames whole), not by XDP"
        );
    }
    let (port, mtu) = if xdp {
        let pool = d.pool()?;
        let xsk = Xsk::open(&pool, iface, 0)?;
        let mut st = steer.lock();
        st.register_xsk(slot, xsk.fd())?;
        st.attach(slot, iface, &target)?;
        (Port::Xsk(Box::new(xsk)), nic_mtu)
    } else {
        let idx = netredir_datapath::netlink::ifindex(iface)?;
        let name = format!("nr{idx}t");
        let tap = Tap::open(&name, nic_mtu)
            .with_context(|| format!("cannot set up netredir's TAP device {name} for {iface}"))?;
        steer.lock().attach_tap(slot, iface, &name, &target)?;
        (Port::Tap(tap), nic_mtu)
    };
    if let Port::Xsk(x) = &port {
        // Each VM keeps MIN_FILL frames of the shared UMEM even when idle:
        // say so before idle VMs leave the busy ones too little.
        let (frames, sockets) = (x.pool().frames(), x.pool().sockets());
        if u64::from(sockets) * u64::from(MIN_FILL) * 4 > u64::from(frames) * 3 {
            tracing::warn!(
                vms = sockets,
                umem_frames = frames,
                "the VMs' idle fill rings hold over 3/4 of the UMEM ({MIN_FILL} frames of 4 KiB each): busy VMs get little of it; raise --umem-mib (64 MiB serves about 750 VMs well)"
            );
        }
    }
    tracing::debug!(vm = %name, %iface, mtu, slot, "steer attached");
    Ok(VmSetup {
        name: name.to_string(),
        iface: iface.to_string(),
        dedicated: spec.dedicated,
        subnet,
        prefix6,
        mtu: mtu as usize,
        mac,
        steer,
        port,
    })
}

/// Attaches the VM `spec` to the running data path; the answer for the
/// control client (`Attached`, or an error saying why).
pub fn attach(spec: &AttachSpec, d: &Defaults, dp: &Workers) -> Response {
    // The cheap check first: a name or NIC in use is not worth a program load.
    if let Some(why) = dp.taken(spec.name.trim(), &spec.iface) {
        return Response::Error { message: why };
    }
    match prepare(spec, d) {
        Ok(setup) => dp.attach(setup),
        Err(e) => Response::Error {
            message: format!("{e:#}"),
        },
    }
}
