//! The host's paired-agents file, `<state>/paired.json`, as
//! `PairStore::load(state_dir)` reads it (a file anyone with access to the
//! state directory, or a crash mid-write, may have left in any shape): the
//! fuzz bytes are written as that file in a per-process temp dir (made
//! once) and loaded. Asserts: never a panic; a file that loads is exactly
//! what serde_json reads as `Vec<PairedAgent>`, every agent in it whose
//! fingerprint is canonical hex is allowed for its VM (and for no other VM
//! unless listed), and an empty or missing file loads as no agents.
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
    let path = dir.join("paired.json");
    std::fs::write(&path, data).expect("write paired.json");
    let loaded = PairStore::load(dir);
    let parsed = serde_json::from_slice::<Vec<PairedAgent>>(data);
    match (&loaded, &parsed) {
        (Ok(_), Ok(_)) | (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) => panic!("loaded a file serde_json refuses: {e}"),
        (Err(e), Ok(_)) => panic!("refused a valid file: {e}"),
    }
    let (Ok(store), Ok(agents)) = (loaded, parsed) else {
        return;
    };
    for a in &agents {
        let Ok(fp) = a.fingerprint.parse::<Fingerprint>() else {
            continue;
        };
        if fp.to_hex() != a.fingerprint {
            // Upper-case hex: stored, but never what `redeem` writes.
            continue;
        }
        assert!(store.allows(&fp, &a.vm), "{a:?} not allowed");
        let other = format!("{}-not", a.vm);
        assert_eq!(
            store.allows(&fp, &other),
            agents
                .iter()
                .any(|b| b.fingerprint == a.fingerprint && b.vm == other),
        );
    }
    // No file at all: an empty store.
    std::fs::remove_file(&path).expect("remove paired.json");
    let empty = PairStore::load(dir).expect("a missing file is an empty store");
    if let Some(a) = agents.first()
        && let Ok(fp) = a.fingerprint.parse::<Fingerprint>()
    {
        assert!(!empty.allows(&fp, &a.vm));
    }
});
