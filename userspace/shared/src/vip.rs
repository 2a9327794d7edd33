//! Virtual IPs: the one place that decides which address a resource gets.
//!
//! A vIP is a hash of the resource's key into the subnet's host range,
//! probing forward on collision. The key is what identifies the resource
//! itself, not what it is called: the agent derives it from the client
//! network it is on and the device (see the agent's `key` module), so the
//! same printer on the same network gets the same address on every run
//! and every host, and another printer with the same name elsewhere gets
//! another. Each VM's allocations are kept on the host ([`VipTable`]), so
//! an address, once given, stays with its resource whatever else comes
//! and goes. The low /24-sized block (`.0.0`-`.0.255` of a /16) is kept
//! for the engine itself (gateway, DNS, DHCP pool) and never handed out;
//! in smaller subnets the vDNS and DHCP pool offsets are skipped one by
//! one.

use crate::subnet::Ipv4Subnet;
use serde::{Deserialize, Serialize};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Addresses at the start of the subnet kept for infrastructure.
pub fn reserved(subnet: &Ipv4Subnet) -> u32 {
    (subnet.size() / 256).clamp(4, 256)
}

/// Offsets the engine uses whatever the subnet's size: the vDNS (`.53`)
/// and the DHCP pool (`.100`-`.250`); a vIP there would be shadowed.
pub const ENGINE_OFFSETS: [std::ops::RangeInclusive<u32>; 2] = [53..=53, 100..=250];

/// Whether offset `n` of `subnet` may be a vIP.
fn usable(subnet: &Ipv4Subnet, n: u32) -> bool {
    n >= reserved(subnet) && n < subnet.size() - 1 && !ENGINE_OFFSETS.iter().any(|r| r.contains(&n))
}

/// The vIP of `name` in `subnet`, skipping addresses `taken` says are used.
///
/// Returns `None` only when every usable address is taken.
pub fn allocate(
    subnet: &Ipv4Subnet,
    name: &str,
    taken: impl Fn(Ipv4Addr) -> bool,
) -> Option<Ipv4Addr> {
    // Offsets reserved .. size-1 (the last address is broadcast), less
    // the engine's own.
    let reserved = reserved(subnet);
    let span = u64::from(subnet.size() - reserved - 1);
    let start = fnv1a(name.as_bytes()) % span;
    (0..span)
        .map(|i| reserved + ((start + i) % span) as u32)
        .filter(|n| usable(subnet, *n))
        .map(|n| subnet.nth(n))
        .find(|ip| !taken(*ip))
}

/// One resource's address as the host keeps it for a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipEntry {
    /// What identifies the resource (the agent's key for it).
    pub key: String,
    /// The name it was last exported under (for the operator reading the file).
    pub name: String,
    /// Its address.
    pub vip: Ipv4Addr,
    /// An operator chose the address (`map pin`).
    #[serde(default)]
    pub pinned: bool,
    /// The name the guest finds it by, if an operator renamed it
    /// (`map rename`); else the agent's.
    #[serde(default)]
    pub alias: Option<String>,
}

/// Most entries a VM's table keeps: beyond, the oldest one that is not
/// pinned and not in use makes room (a LAN announcing thousands of
/// printers must not grow it for ever).
pub const MAX_ENTRIES: usize = 4096;

/// One VM's vIPs, kept in the host's state directory
/// (`vips/<vm>.json`) so that they survive restarts of both daemons.
#[derive(Debug, Default)]
pub struct VipTable {
    path: Option<PathBuf>,
    entries: Vec<VipEntry>,
}

impl VipTable {
    /// VM `vm`'s table under `state_dir` (empty when there is none yet).
    pub fn load(state_dir: &Path, vm: &str) -> io::Result<Self> {
        let path = state_dir.join("vips").join(crate::pairing::file_for(vm));
        let entries = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path: Some(path),
            entries,
        })
    }

    /// VM `vm`'s table; when its file cannot be read, an empty one that
    /// will replace it (the damaged file is kept beside it, `.bad`), and
    /// why, for the log.
    pub fn load_or_reset(state_dir: &Path, vm: &str) -> (Self, Option<String>) {
        match Self::load(state_dir, vm) {
            Ok(t) => (t, None),
            Err(e) => {
                let path = state_dir.join("vips").join(crate::pairing::file_for(vm));
                let mut bad = path.clone().into_os_string();
                bad.push(".bad");
                let kept = std::fs::rename(&path, &bad).is_ok();
                let why = format!(
                    "{e}; its vIPs are allocated anew{}",
                    if kept {
                        format!(" (the old file is {})", Path::new(&bad).display())
                    } else {
                        String::new()
                    }
                );
                (
                    Self {
                        path: Some(path),
                        entries: Vec::new(),
                    },
                    Some(why),
                )
            }
        }
    }

    /// The address of the resource `key` (exported as `name`) in
    /// `subnet`: the one it had, if that is still in the subnet and not
    /// `taken` by another; else a new one, kept. Whether the table
    /// changed comes with it (save it then). None: the subnet is full.
    pub fn assign(
        &mut self,
        subnet: &Ipv4Subnet,
        key: &str,
        name: &str,
        taken: impl Fn(Ipv4Addr) -> bool,
    ) -> Option<(Ipv4Addr, bool)> {
        if let Some(e) = self.entries.iter_mut().find(|e| e.key == key)
            && subnet.contains(e.vip)
            && !taken(e.vip)
        {
            let renamed = e.name != name;
            e.name = name.to_string();
            return Some((e.vip, renamed));
        }
        // A new address: not one another resource of this VM holds,
        // even while it is offline.
        let held = |ip: Ipv4Addr| self.entries.iter().any(|e| e.vip == ip && e.key != key);
        let vip = allocate(subnet, key, |ip| taken(ip) || held(ip))?;
        let alias = self
            .entries
            .iter()
            .find(|e| e.key == key)
            .and_then(|e| e.alias.clone());
        self.entries.retain(|e| e.key != key);
        if self.entries.len() >= MAX_ENTRIES
            && let Some(i) = self.entries.iter().position(|e| !e.pinned && !taken(e.vip))
        {
            self.entries.remove(i);
        }
        self.entries.push(VipEntry {
            key: key.to_string(),
            name: name.to_string(),
            vip,
            pinned: false,
            alias,
        });
        Some((vip, true))
    }

    /// The kept entry of `key`, if any.
    pub fn get(&self, key: &str) -> Option<&VipEntry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// Pins the resource `key` (named `name`) at `vip`, or where it is
    /// (None); `taken` says which addresses other resources have.
    pub fn pin(
        &mut self,
        subnet: &Ipv4Subnet,
        key: &str,
        name: &str,
        vip: Option<Ipv4Addr>,
        taken: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<Ipv4Addr, String> {
        let vip = match vip {
            Some(ip) => {
                if !subnet.contains(ip) {
                    return Err(format!("{ip} is not in the VM's subnet {subnet}"));
                }
                let off = u32::from(ip) - u32::from(subnet.network());
                if !usable(subnet, off) {
                    return Err(format!(
                        "{ip} is kept for the engine (gateway, vDNS, DHCP pool) or is the broadcast address"
                    ));
                }
                if taken(ip) || self.entries.iter().any(|e| e.vip == ip && e.key != key) {
                    return Err(format!("{ip} is another resource's"));
                }
                ip
            }
            None => self
                .get(key)
                .map(|e| e.vip)
                .ok_or_else(|| format!("{name} has no vIP yet"))?,
        };
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(e) => {
                e.vip = vip;
                e.pinned = true;
            }
            None => self.entries.push(VipEntry {
                key: key.to_string(),
                name: name.to_string(),
                vip,
                pinned: true,
                alias: None,
            }),
        }
        Ok(vip)
    }

    /// The guest finds the resource `key` as `alias` from now on.
    pub fn rename(&mut self, key: &str, alias: &str) -> Result<(), String> {
        let e = self
            .entries
            .iter_mut()
            .find(|e| e.key == key)
            .ok_or("no such resource")?;
        e.alias = Some(alias.to_string());
        Ok(())
    }

    /// Forgets the resource `key` (its address may go to another).
    pub fn remove(&mut self, key: &str) {
        self.entries.retain(|e| e.key != key);
    }

    /// Writes the table to its file (atomically, through a temp file).
    pub fn save(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_vec_pretty(&self.entries).map_err(io::Error::other)?;
        crate::tls::write_private(path, &json)
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[VipEntry] {
        &self.entries
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn same_name_same_vip_and_never_reserved() {
        let s: Ipv4Subnet = "100.77.0.0/16".parse().unwrap();
        let a = allocate(&s, "printer", |_| false).unwrap();
        assert_eq!(a, allocate(&s, "printer", |_| false).unwrap());
        assert_ne!(a, allocate(&s, "scanner", |_| false).unwrap());
        assert!(s.contains(a));
        assert!(u32::from(a) - u32::from(s.network()) >= reserved(&s));
    }

    #[test]
    fn a_resource_keeps_its_address_across_restarts_and_renames() {
        let dir = std::env::temp_dir().join(format!("netredir-vips-{}", std::process::id()));
        let s: Ipv4Subnet = "100.77.0.0/16".parse().unwrap();
        let mut t = VipTable::load(&dir, "desk-1").unwrap();
        let (a, changed) = t
            .assign(&s, "net-1/host:10.0.0.5", "printer", |_| false)
            .unwrap();
        assert!(changed);
        // Another printer whose key hashes where the first one is: the
        // first keeps its address, the other probes on.
        let (b, _) = t
            .assign(&s, "net-2/host:10.0.0.5", "printer", |ip| ip == a)
            .unwrap();
        assert_ne!(a, b, "the same name on another network");
        t.save().unwrap();
        let mut again = VipTable::load(&dir, "desk-1").unwrap();
        assert_eq!(again.entries(), t.entries());
        // Renamed, and the address of an offline resource is not given
        // to a newcomer.
        assert_eq!(
            again.assign(&s, "net-1/host:10.0.0.5", "laser", |_| false),
            Some((a, true))
        );
        let c = allocate(&s, "newcomer", |_| false).unwrap();
        let (d, _) = again.assign(&s, "newcomer", "x", |_| false).unwrap();
        assert_eq!(c, d);
        for e in again.entries() {
            if e.key != "newcomer" {
                assert_ne!(e.vip, d);
            }
        }
        // A damaged file: an empty table that replaces it, the file kept.
        std::fs::write(dir.join("vips/desk-3.json"), b"{not json").unwrap();
        let (mut t3, why) = VipTable::load_or_reset(&dir, "desk-3");
        assert!(why.is_some_and(|w| w.contains("desk-3.json.bad")));
        t3.assign(&s, "k", "x", |_| false).unwrap();
        t3.save().unwrap();
        assert_eq!(VipTable::load(&dir, "desk-3").unwrap().entries().len(), 1);
        // Another VM has a table of its own.
        assert!(VipTable::load(&dir, "desk-2").unwrap().entries().is_empty());
        // Pinned elsewhere and renamed: kept so, across a reload.
        let want = Ipv4Addr::new(100, 77, 9, 9);
        assert_eq!(
            again.pin(&s, "net-1/host:10.0.0.5", "laser", Some(want), |_| false),
            Ok(want)
        );
        assert!(
            again
                .pin(&s, "net-2/host:10.0.0.5", "printer", Some(want), |_| false)
                .is_err(),
            "another's"
        );
        assert!(
            again
                .pin(&s, "k", "x", Some(Ipv4Addr::new(100, 77, 0, 53)), |_| false)
                .is_err()
        );
        assert!(
            again
                .pin(&s, "k", "x", Some(Ipv4Addr::new(10, 0, 0, 1)), |_| false)
                .is_err()
        );
        again.rename("net-1/host:10.0.0.5", "office").unwrap();
        again.save().unwrap();
        let mut third = VipTable::load(&dir, "desk-1").unwrap();
        assert_eq!(
            third.assign(&s, "net-1/host:10.0.0.5", "laser", |_| false),
            Some((want, false))
        );
        let e = third.get("net-1/host:10.0.0.5").unwrap();
        assert!(e.pinned && e.alias.as_deref() == Some("office"));
        third.remove("net-1/host:10.0.0.5");
        assert!(third.get("net-1/host:10.0.0.5").is_none());
        // Moved out of the subnet (the VM's subnet changed): a new address.
        let small: Ipv4Subnet = "10.9.8.0/24".parse().unwrap();
        let (e, changed) = again
            .assign(&small, "net-1/host:10.0.0.5", "laser", |_| false)
            .unwrap();
        assert!(changed && small.contains(e));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_table_is_bounded_and_makes_room_from_its_oldest_unused_entry() {
        let s: Ipv4Subnet = "100.77.0.0/16".parse().unwrap();
        let mut t = VipTable::default();
        t.assign(&s, "first", "a", |_| false).unwrap();
        t.pin(&s, "first", "a", None, |_| false).unwrap();
        t.assign(&s, "second", "b", |_| false).unwrap();
        for i in 0..MAX_ENTRIES {
            t.assign(&s, &format!("k{i}"), "x", |_| false).unwrap();
            assert!(t.entries().len() <= MAX_ENTRIES);
        }
        assert!(t.get("first").is_some(), "pinned");
        assert!(t.get("second").is_none(), "the oldest unused went");
    }

    #[test]
    fn collisions_probe_and_a_full_subnet_says_so() {
        let s: Ipv4Subnet = "10.9.8.0/24".parse().unwrap();
        let mut taken = HashSet::new();
        let n = (0..256).filter(|n| usable(&s, *n)).count();
        assert_eq!(n, 256 - 4 - 1 - 1 - 151);
        for i in 0..n {
            let ip = allocate(&s, &format!("r{i}"), |ip| taken.contains(&ip)).unwrap();
            assert!(taken.insert(ip), "{ip} handed out twice");
            assert_ne!(ip, Ipv4Addr::new(10, 9, 8, 255), "broadcast");
            let off = ip.octets()[3];
            assert!(
                off != 53 && !(100..=250).contains(&off),
                "{ip}: the engine's"
            );
        }
        assert_eq!(allocate(&s, "one-more", |ip| taken.contains(&ip)), None);
    }
}
