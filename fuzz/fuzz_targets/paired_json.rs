//! The host's pairing files as `PairStore::load(state_dir)` reads them
//! (files anyone with access to the state directory, or a crash mid-write,
//! may have left in any shape): the fuzz bytes are written as one VM's
//! file, `<state>/pairs/fuzz.json`, then as an earlier version's
//! `<state>/paired.json`, in a per-process temp dir (made once) and
//! loaded. Asserts: never a panic; a file that loads is exactly what
//! serde_json reads as `Vec<PairedAgent>`; every agent in a VM's file
//! whose fingerprint is canonical hex is allowed for that VM and no other;
//! every agent of a `paired.json` for its own VM, also after the file was
//! split into per-VM files and loaded again; no files, no agents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_shared::pairing::{PairStore, PairedAgent};
use netredir_shared::tls::Fingerprint;
use std::path::PathBuf;
use std::sync::OnceLock;

const PREFIX: &str = "netredir-fuzz-paired-";

/// This process's state directory, made once.
fn state_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        // Those of earlier runs (the fuzzer exits without dropping statics).
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
                    continue;
                };
                if !std::path::Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = state_dir();
    let pairs = dir.join("pairs");
    let _ = std::fs::remove_dir_all(&pairs);
    let parsed = serde_json::from_slice::<Vec<PairedAgent>>(data);
    let canonical = |a: &PairedAgent| {
        a.fingerprint
            .parse::<Fingerprint>()
            .ok()
            .filter(|fp| fp.to_hex() == a.fingerprint)
    };

    // One VM's file: its agents are that VM's, whatever their entries say.
    std::fs::create_dir_all(&pairs).expect("pairs dir");
    std::fs::write(pairs.join("fuzz.json"), data).expect("write pairs/fuzz.json");
    let loaded = PairStore::load(dir);
    match (&loaded, &parsed) {
        (Ok(_), Ok(_)) | (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) => panic!("loaded a file serde_json refuses: {e}"),
        (Err(e), Ok(_)) => panic!("refused a valid file: {e}"),
    }
    if let (Ok(store), Ok(agents)) = (&loaded, &parsed) {
        for a in agents {
            // Upper-case hex is stored but never what `redeem` writes.
            let Some(fp) = canonical(a) else { continue };
            assert!(store.allows(&fp, "fuzz"), "{a:?} not allowed");
            assert!(!store.allows(&fp, "fuzz-not"), "{a:?} allowed elsewhere");
        }
    }
    std::fs::remove_dir_all(&pairs).expect("remove pairs");

    // An earlier version's one file: split per VM, then gone.
    let legacy = dir.join("paired.json");
    std::fs::write(&legacy, data).expect("write paired.json");
    let loaded = PairStore::load(dir);
    match (&loaded, &parsed) {
        (Ok(_), Ok(_)) | (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) => panic!("loaded a paired.json serde_json refuses: {e}"),
        (Err(e), Ok(_)) => panic!("refused a valid paired.json: {e}"),
    }
    if let (Ok(store), Ok(agents)) = (loaded, &parsed) {
        assert!(!legacy.exists(), "paired.json is split and removed");
        let again = PairStore::load(dir).expect("the split files load");
        for a in agents {
            // No VM name: never let in, dropped in the split.
            let Some(fp) = canonical(a).filter(|_| !a.vm.is_empty()) else {
                continue;
            };
            assert!(store.allows(&fp, &a.vm), "{a:?} not allowed");
            assert!(again.allows(&fp, &a.vm), "{a:?} lost in the split");
            let other = format!("{}-not", a.vm);
            let listed = agents
                .iter()
                .any(|b| b.fingerprint == a.fingerprint && b.vm == other);
            assert_eq!(again.allows(&fp, &other), listed);
        }
    }
    let _ = std::fs::remove_file(&legacy);
    let _ = std::fs::remove_dir_all(&pairs);
    // No files at all: an empty store.
    let empty = PairStore::load(dir).expect("no files is an empty store");
    assert!(empty.list(None).is_empty());
});
