//! Records from an untrusted peer (framing, sequence numbers, acks,
//! compressed data): never a panic, never unbounded output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_shared::session::{Session, SessionConfig};
use netredir_shared::wire::MAX_DATA;

fuzz_target!(|data: &[u8]| {
    let mut s = Session::new(SessionConfig::default());
    for chunk in data.chunks(97) {
        if s.feed(chunk).is_err() {
            break;
        }
    }
    while let Ok(Some(m)) = s.poll_msg() {
        if let netredir_shared::wire::Msg::Data { bytes, .. } = m {
            assert!(bytes.len() <= MAX_DATA + 1);
        }
    }
});
