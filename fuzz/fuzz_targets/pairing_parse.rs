//! Pairing inputs from outside: the one-time code an operator types into
//! `netredir-agent --pair` (`PairCode`'s `FromStr`), a certificate
//! fingerprint as typed or printed (`Fingerprint`'s `FromStr`), and the
//! agent's `host.pin` file, parsed the way the agent binary does it
//! (`read_to_string`, `trim`, `Fingerprint::from_str`; that glue lives in
//! `userspace/agent/src/main.rs` and is mirrored here, since only its
//! parser is a library function). Asserts: never a panic; a parsed code or
//! fingerprint displays in canonical form, that form is the input
//! normalized (case, dashes, spaces, Crockford's I/L/O), and it parses back
//! to the same value; a pin the agent writes (`"{fp}\n"`) reads back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_shared::tls::{Fingerprint, PairCode};

/// Crockford's base32 alphabet, as pairing codes use it.
const CROCKFORD: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// What a code means, character by character: no separators, upper case,
/// I and L read as 1, O as 0.
fn normalized_code(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| match c.to_ascii_uppercase() {
            'I' | 'L' => '1',
            'O' => '0',
            c => c,
        })
        .collect()
}

fn check_code(s: &str) {
    let Ok(code) = s.parse::<PairCode>() else {
        return;
    };
    let text = code.to_string();
    assert!(
        text.split('-').all(|g| (1..=4).contains(&g.len())),
        "{text:?}: groups of 1-4"
    );
    assert!(
        text.chars().all(|c| c == '-' || CROCKFORD.contains(c)),
        "{text:?}: only Crockford characters and dashes"
    );
    assert_eq!(
        normalized_code(&text),
        normalized_code(s),
        "{s:?} parsed to a code that prints as {text:?}"
    );
    assert_eq!(
        text.parse::<PairCode>().ok(),
        Some(code),
        "{text:?} does not parse back"
    );
    assert_eq!(
        text.to_lowercase().parse::<PairCode>().ok(),
        Some(code),
        "{text:?} in lower case"
    );
}

fn check_fingerprint(s: &str) {
    let Ok(fp) = s.parse::<Fingerprint>() else {
        return;
    };
    let hex = fp.to_hex();
    assert_eq!(hex, fp.to_string());
    assert_eq!(hex, s.to_ascii_lowercase(), "{s:?} is not its own hex");
    assert_eq!(hex.parse::<Fingerprint>().ok(), Some(fp));
}

/// `host.pin` as the agent reads it: UTF-8 (else the read fails), trimmed.
fn check_pin(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(fp) = text.trim().parse::<Fingerprint>() else {
        return;
    };
    // What the agent writes after pairing reads back as the same pin.
    let written = format!("{fp}\n");
    assert_eq!(written.trim().parse::<Fingerprint>().ok(), Some(fp));
}

fuzz_target!(|data: &[u8]| {
    check_pin(data);
    if let Ok(s) = std::str::from_utf8(data) {
        check_code(s);
        check_fingerprint(s);
    }
    // Also as an arbitrary byte string made text (what a terminal might pass).
    let lossy = String::from_utf8_lossy(data);
    check_code(&lossy);
    check_fingerprint(&lossy);
});
