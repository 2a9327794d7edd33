//! The control API's JSON (`netredir_shared::control::{Request, Response}`)
//! from outside bytes: what netredird reads from any local client on its
//! control socket (a `Request` per line), and what netredirctl reads back
//! (a `Response`). Asserts: parsing never panics, and whatever parses
//! serializes to JSON that parses back to an equal value, and that second
//! serialization is byte-for-byte the first (a stable encoding).
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_shared::control::{Request, Response};
use serde::{Serialize, de::DeserializeOwned};
use std::fmt::Debug;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let json = serde_json::to_vec(&v).expect("a parsed value serializes");
    let again: T = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "{v:?} serialized as {:?}, which does not parse: {e}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(again, v, "round trip changed the value");
    let json2 = serde_json::to_vec(&again).expect("serializes");
    assert_eq!(json, json2, "serialization is not stable");
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Request>(data);
    round_trip::<Response>(data);
    // netredird reads one request per line: the same, line by line.
    if data.contains(&b'\n') {
        for line in data.split(|b| *b == b'\n') {
            round_trip::<Request>(line);
        }
    }
});
