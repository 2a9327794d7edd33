//! Which agents may reach which VM: the host's list of paired agent keys,
//! and the one-time codes that add to it.
//!
//! One file per VM, `<state>/pairs/<vm>.json` (0600, written atomically
//! with a temp file of its own), so that daemons or threads serving
//! different VMs never rewrite each other's pairings. A `paired.json`
//! from before (one file for all VMs) is split into these on load.

use crate::tls::{Fingerprint, PairCode, write_private};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a pairing code stays valid.
pub const CODE_LIFETIME: Duration = Duration::from_secs(600);

/// Fewest hex digits of a key that `unpair` takes (a prefix must also be
/// unique among the VM's agents).
pub const MIN_KEY_PREFIX: usize = 8;

/// One paired agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairedAgent {
    /// SHA-256 of the agent's certificate, hex.
    pub fingerprint: String,
    /// The VM session it may reach.
    pub vm: String,
    /// The name the agent gave when pairing.
    pub name: String,
}

/// Why an agent could not be unpaired, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum UnpairError {
    /// No paired agent's key starts with that.
    #[error("no agent paired with VM {vm:?} has a key starting with {key:?}")]
    NotFound {
        /// The VM.
        vm: String,
        /// What was given.
        key: String,
    },
    /// Too short, or not hex, or more than one key starts with it.
    #[error("{0}")]
    Ambiguous(String),
    /// The VM's file could not be written.
    #[error("cannot save the pairings: {0}")]
    Io(#[from] io::Error),
}

/// The paired agents of every VM, and the codes not redeemed yet.
pub struct PairStore {
    dir: PathBuf,
    by_vm: BTreeMap<String, Vec<PairedAgent>>,
    pending: Vec<(PairCode, String, Instant)>,
}

/// Longest escaped name used as it is; longer ones are hashed (a file name
/// may have 255 bytes).
const MAX_PLAIN_NAME: usize = 200;

/// The file name for `vm`: the name itself when it is safe in a path
/// (letters, digits, `.`, `_`, `-`, not starting with `.`), else `%XX`
/// escapes, so that any libvirt domain name maps to one file; a name too
/// long for a file name becomes `~<sha256>.json` (its entries say which VM).
pub(crate) fn file_for(vm: &str) -> String {
    let mut out = String::new();
    for (i, b) in vm.bytes().enumerate() {
        let safe = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if safe {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > MAX_PLAIN_NAME {
        use sha2::Digest;
        let h = sha2::Sha256::digest(vm.as_bytes());
        out = String::from("~");
        for b in h {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out.push_str(".json");
    out
}

/// The VM whose file is named `name` (the inverse of [`file_for`]; not
/// for hashed names).
fn vm_of(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".json")?.as_bytes();
    if stem.first() == Some(&b'~') {
        return None;
    }
    let mut out = Vec::with_capacity(stem.len());
    let mut i = 0;
    while i < stem.len() {
        if stem[i] == b'%' {
            let hex = std::str::from_utf8(stem.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(stem[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

impl PairStore {
    /// Loads every VM's list (none if nothing was paired yet), splitting
    /// a `paired.json` of an earlier version into per-VM files.
    pub fn load(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join("pairs");
        let mut store = Self {
            dir,
            by_vm: BTreeMap::new(),
            pending: Vec::new(),
        };
        match std::fs::read_dir(&store.dir) {
            Ok(entries) => {
                for e in entries {
                    let path = e?.path();
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    // Temp files (`.NAME...tmp`) and anything else are not ours.
                    let hashed = name.starts_with('~') && name.ends_with(".json");
                    let plain = vm_of(name).filter(|_| !name.starts_with('.'));
                    if plain.is_none() && !hashed {
                        continue;
                    }
                    let agents: Vec<PairedAgent> = serde_json::from_slice(&std::fs::read(&path)?)
                        .map_err(|e| invalid(&path, e))?;
                    for a in agents {
                        match &plain {
                            // The file is the VM's list, whatever its entries say.
                            Some(vm) => store.add(PairedAgent {
                                vm: vm.clone(),
                                ..a
                            }),
                            // A hashed name: the entries say, if they hash to it.
                            None if file_for(&a.vm) == name => store.add(a),
                            None => {}
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let legacy = state_dir.join("paired.json");
        match std::fs::read(&legacy) {
            Ok(b) => {
                let agents: Vec<PairedAgent> =
                    serde_json::from_slice(&b).map_err(|e| invalid(&legacy, e))?;
                // An agent paired with no VM name was never let in: dropped.
                let agents: Vec<PairedAgent> =
                    agents.into_iter().filter(|a| !a.vm.is_empty()).collect();
                let vms: Vec<String> = agents.iter().map(|a| a.vm.clone()).collect();
                for a in agents {
                    store.add(a);
                }
                for vm in vms {
                    store.save(&vm)?;
                }
                std::fs::remove_file(&legacy)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    fn add(&mut self, a: PairedAgent) {
        let list = self.by_vm.entry(a.vm.clone()).or_default();
        if !list.iter().any(|b| b.fingerprint == a.fingerprint) {
            list.push(a);
        }
    }

    /// Writes `vm`'s file (removes it when the VM has no agent left).
    fn save(&self, vm: &str) -> io::Result<()> {
        let path = self.dir.join(file_for(vm));
        match self.by_vm.get(vm) {
            Some(list) if !list.is_empty() => {
                std::fs::create_dir_all(&self.dir)?;
                let json = serde_json::to_vec_pretty(list).map_err(io::Error::other)?;
                write_private(&path, &json)
            }
            _ => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// Whether the agent with this key may reach `vm`.
    pub fn allows(&self, fp: &Fingerprint, vm: &str) -> bool {
        let hex = fp.to_hex();
        self.by_vm
            .get(vm)
            .is_some_and(|l| l.iter().any(|a| a.fingerprint == hex))
    }

    /// The agents paired with `vm`, or with every VM (`None`).
    pub fn list(&self, vm: Option<&str>) -> Vec<PairedAgent> {
        self.by_vm
            .iter()
            .filter(|(v, _)| vm.is_none_or(|w| w == v.as_str()))
            .flat_map(|(_, l)| l.iter().cloned())
            .collect()
    }

    /// A new one-time code for `vm`, bound to the host key `host`.
    pub fn issue(&mut self, host: &Fingerprint, vm: &str, now: Instant) -> PairCode {
        self.pending
            .retain(|(_, _, t)| now.saturating_duration_since(*t) < CODE_LIFETIME);
        let code = PairCode::generate(host);
        self.pending.push((code, vm.to_string(), now));
        code
    }

    /// The VM a pending, unexpired code with this secret is for: a code
    /// names the VM, so the agent that redeems it need not.
    pub fn code_vm(&self, secret: &[u8], now: Instant) -> Option<String> {
        self.pending
            .iter()
            .find(|(c, _, t)| {
                c.secret.as_slice() == secret && now.saturating_duration_since(*t) < CODE_LIFETIME
            })
            .map(|(_, v, _)| v.clone())
    }

    /// Uses up the code with this secret, if one is pending for `vm`: the
    /// agent's key is added to the VM's list and saved.
    pub fn redeem(
        &mut self,
        secret: &[u8],
        fp: &Fingerprint,
        name: &str,
        vm: &str,
        now: Instant,
    ) -> io::Result<bool> {
        self.pending
            .retain(|(_, _, t)| now.saturating_duration_since(*t) < CODE_LIFETIME);
        let Some(i) = self
            .pending
            .iter()
            .position(|(c, v, _)| c.secret.as_slice() == secret && v == vm)
        else {
            return Ok(false);
        };
        self.pending.remove(i);
        if !self.allows(fp, vm) {
            self.add(PairedAgent {
                fingerprint: fp.to_hex(),
                vm: vm.to_string(),
                name: name.to_string(),
            });
            if let Err(e) = self.save(vm) {
                // Not saved, not paired: the agent must not get in on a
                // pairing the next restart forgets.
                if let Some(l) = self.by_vm.get_mut(vm) {
                    l.retain(|a| a.fingerprint != fp.to_hex());
                }
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Removes the agent of `vm` whose key is `key` (its full hex, or a
    /// unique prefix of at least [`MIN_KEY_PREFIX`] digits); returns it.
    pub fn unpair(&mut self, vm: &str, key: &str) -> Result<PairedAgent, UnpairError> {
        let key = key.trim().to_ascii_lowercase().replace(':', "");
        if key.len() < MIN_KEY_PREFIX || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(UnpairError::Ambiguous(format!(
                "{key:?} is not a key: give the agent's key fingerprint in hex (at least {MIN_KEY_PREFIX} digits, see `netredirctl pairs list`)"
            )));
        }
        let list = self.by_vm.get(vm).map(Vec::as_slice).unwrap_or_default();
        let found: Vec<usize> = list
            .iter()
            .enumerate()
            .filter(|(_, a)| a.fingerprint.starts_with(&key))
            .map(|(i, _)| i)
            .collect();
        let i = match found.as_slice() {
            [i] => *i,
            [] => {
                return Err(UnpairError::NotFound {
                    vm: vm.to_string(),
                    key,
                });
            }
            _ => {
                return Err(UnpairError::Ambiguous(format!(
                    "{} agents of VM {vm:?} have keys starting with {key:?}: give more digits",
                    found.len()
                )));
            }
        };
        let list = self.by_vm.get_mut(vm).expect("found above");
        let gone = list.remove(i);
        if let Err(e) = self.save(vm) {
            self.add(gone);
            return Err(e.into());
        }
        if self.by_vm.get(vm).is_some_and(Vec::is_empty) {
            self.by_vm.remove(vm);
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("netredir-pair-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_code_pairs_once_for_its_vm_and_the_pairing_persists() {
        let dir = scratch("once");
        let host = Fingerprint([7; 32]);
        let agent = Fingerprint([9; 32]);
        let now = Instant::now();
        let mut s = PairStore::load(&dir).unwrap();
        assert!(!s.allows(&agent, "vm1"));
        let code = s.issue(&host, "vm1", now);
        assert_eq!(code.fp_prefix, [7; 8]);
        assert_eq!(s.code_vm(&code.secret, now).as_deref(), Some("vm1"));
        assert_eq!(s.code_vm(&[0; 10], now), None);
        assert_eq!(s.code_vm(&code.secret, now + CODE_LIFETIME), None);
        assert!(
            !s.redeem(&code.secret, &agent, "a", "vm2", now).unwrap(),
            "other VM"
        );
        assert!(
            !s.redeem(&[0; 10], &agent, "a", "vm1", now).unwrap(),
            "wrong secret"
        );
        assert!(s.redeem(&code.secret, &agent, "a", "vm1", now).unwrap());
        assert!(
            !s.redeem(&code.secret, &agent, "a", "vm1", now).unwrap(),
            "one time"
        );
        let s = PairStore::load(&dir).unwrap();
        assert!(s.allows(&agent, "vm1") && !s.allows(&agent, "vm2"));
        let late = PairStore::load(&dir).unwrap().issue(&host, "vm1", now);
        let mut s2 = PairStore::load(&dir).unwrap();
        s2.pending.push((late, "vm1".into(), now));
        assert!(
            !s2.redeem(&late.secret, &agent, "a", "vm1", now + CODE_LIFETIME)
                .unwrap(),
            "expired"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stores_of_different_vms_never_overwrite_each_other() {
        // Two daemons (or threads) each pairing agents with their own VM
        // in one state dir: every pairing survives.
        let dir = scratch("two");
        let host = Fingerprint([1; 32]);
        let now = Instant::now();
        let handles: Vec<_> = ["vm-a", "vm b/ü"]
            .into_iter()
            .map(|vm| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let mut s = PairStore::load(&dir).unwrap();
                    for i in 0..20u8 {
                        let code = s.issue(&host, vm, now);
                        let fp = Fingerprint([i + u8::from(vm == "vm-a") * 100; 32]);
                        assert!(s.redeem(&code.secret, &fp, "x", vm, now).unwrap());
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let s = PairStore::load(&dir).unwrap();
        assert_eq!(s.list(Some("vm-a")).len(), 20);
        assert_eq!(s.list(Some("vm b/ü")).len(), 20);
        assert_eq!(s.list(None).len(), 40);
        let mut names: Vec<String> = std::fs::read_dir(dir.join("pairs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["vm%20b%2F%C3%BC.json", "vm-a.json"],
            "one file per VM, no temp file left"
        );
        for n in &names {
            assert_eq!(file_for(&vm_of(n).unwrap()), *n);
        }
        // A name too long for a file name (found by fuzzing) is hashed.
        let long = "x".repeat(300);
        let mut s = PairStore::load(&dir).unwrap();
        let code = s.issue(&host, &long, now);
        let fp = Fingerprint([200; 32]);
        assert!(s.redeem(&code.secret, &fp, "x", &long, now).unwrap());
        assert!(PairStore::load(&dir).unwrap().allows(&fp, &long));
        assert!(file_for(&long).starts_with('~') && file_for(&long).len() < 80);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_earlier_paired_json_is_split_per_vm() {
        let dir = scratch("legacy");
        let old = [
            PairedAgent {
                fingerprint: "aa".repeat(32),
                vm: "one".into(),
                name: "x".into(),
            },
            PairedAgent {
                fingerprint: "bb".repeat(32),
                vm: "two".into(),
                name: "y".into(),
            },
        ];
        std::fs::write(dir.join("paired.json"), serde_json::to_vec(&old).unwrap()).unwrap();
        let s = PairStore::load(&dir).unwrap();
        assert!(s.allows(&Fingerprint([0xaa; 32]), "one"));
        assert!(s.allows(&Fingerprint([0xbb; 32]), "two"));
        assert!(!dir.join("paired.json").exists());
        let s = PairStore::load(&dir).unwrap();
        assert_eq!(s.list(None), old.to_vec(), "and kept there");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unpair_takes_a_unique_key_prefix_and_persists() {
        let dir = scratch("unpair");
        let host = Fingerprint([1; 32]);
        let now = Instant::now();
        let mut s = PairStore::load(&dir).unwrap();
        for fp in [[0xab; 32], [0xac; 32]] {
            let code = s.issue(&host, "vm", now);
            assert!(
                s.redeem(&code.secret, &Fingerprint(fp), "x", "vm", now)
                    .unwrap()
            );
        }
        assert!(matches!(
            s.unpair("vm", "abab"),
            Err(UnpairError::Ambiguous(_))
        ));
        assert!(matches!(
            s.unpair("vm", "not-hex-at-all"),
            Err(UnpairError::Ambiguous(_))
        ));
        assert!(matches!(
            s.unpair("other", "abababab"),
            Err(UnpairError::NotFound { .. })
        ));
        let gone = s.unpair("vm", "AB:AB:AB:AB").unwrap();
        assert_eq!(gone.fingerprint, "ab".repeat(32));
        let s = PairStore::load(&dir).unwrap();
        assert!(!s.allows(&Fingerprint([0xab; 32]), "vm"));
        assert!(s.allows(&Fingerprint([0xac; 32]), "vm"));
        let mut s = s;
        s.unpair("vm", &"ac".repeat(32)).unwrap();
        assert!(
            !dir.join("pairs").join("vm.json").exists(),
            "the last agent gone, the file too"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
