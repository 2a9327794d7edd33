//! Which agents may reach which VM: the host's list of paired agent keys,
//! and the one-time codes that add to it.

use crate::tls::{Fingerprint, PairCode, write_private};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a pairing code stays valid.
pub const CODE_LIFETIME: Duration = Duration::from_secs(600);

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

/// The paired agents, kept in `<state>/paired.json` (0600).
pub struct PairStore {
    path: PathBuf,
    agents: Vec<PairedAgent>,
    pending: Vec<(PairCode, String, Instant)>,
}

impl PairStore {
    /// Loads the list (empty if the file does not exist yet).
    pub fn load(state_dir: &Path) -> std::io::Result<Self> {
        let path = state_dir.join("paired.json");
        let agents = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            agents,
            pending: Vec::new(),
        })
    }

    /// Whether the agent with this key may reach `vm`.
    pub fn allows(&self, fp: &Fingerprint, vm: &str) -> bool {
        let hex = fp.to_hex();
        self.agents
            .iter()
            .any(|a| a.fingerprint == hex && a.vm == vm)
    }

    /// A new one-time code for `vm`, bound to the host key `host`.
    pub fn issue(&mut self, host: &Fingerprint, vm: &str, now: Instant) -> PairCode {
        self.pending
            .retain(|(_, _, t)| now.saturating_duration_since(*t) < CODE_LIFETIME);
        let code = PairCode::generate(host);
        self.pending.push((code, vm.to_string(), now));
        code
    }

    /// Uses up the code with this secret, if one is pending for `vm`: the
    /// agent's key is added to the list and saved.
    pub fn redeem(
        &mut self,
        secret: &[u8],
        fp: &Fingerprint,
        name: &str,
        vm: &str,
        now: Instant,
    ) -> std::io::Result<bool> {
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
            self.agents.push(PairedAgent {
                fingerprint: fp.to_hex(),
                vm: vm.to_string(),
                name: name.to_string(),
            });
            let json = serde_json::to_vec_pretty(&self.agents).map_err(std::io::Error::other)?;
            write_private(&self.path, &json)?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_pairs_once_for_its_vm_and_the_pairing_persists() {
        let dir = std::env::temp_dir().join(format!("netredir-pair-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let host = Fingerprint([7; 32]);
        let agent = Fingerprint([9; 32]);
        let now = Instant::now();
        let mut s = PairStore::load(&dir).unwrap();
        assert!(!s.allows(&agent, "vm1"));
        let code = s.issue(&host, "vm1", now);
        assert_eq!(code.fp_prefix, [7; 8]);
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
}
