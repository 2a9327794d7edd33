//! Tunnel messages from an untrusted peer: any bytes, cut anywhere, must
//! decode or fail cleanly, and what decodes must re-encode to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_shared::wire::{Decoder, Msg};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let mut d = Decoder::new();
    d.feed(&data[..split]);
    let mut msgs = Vec::new();
    let mut fed_rest = false;
    loop {
        match d.next_msg() {
            Ok(Some(m)) => msgs.push(m),
            Ok(None) if !fed_rest => {
                d.feed(&data[split..]);
                fed_rest = true;
            }
            Ok(None) | Err(_) => break,
        }
    }
    for m in msgs {
        let mut out = Vec::new();
        m.emit(&mut out);
        assert_eq!(Msg::parse(&out[4..]).as_ref(), Ok(&m));
    }
});
