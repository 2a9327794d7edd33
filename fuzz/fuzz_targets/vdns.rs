//! DNS queries from a hostile guest: never a panic, answers bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_datapath::dns::{DnsResource, VDns};
use std::net::Ipv4Addr;

fuzz_target!(|data: &[u8]| {
    let mut d = VDns::new("netredir.internal").expect("zone");
    d.set_resources(vec![DnsResource {
        name: "printer".into(),
        v4: Ipv4Addr::new(100, 77, 1, 1),
        v6: None,
        tcp_ports: vec![631, 9100],
    }]);
    if let Ok(Some(answer)) = d.answer(data) {
        assert!(answer.len() <= 1232);
    }
});
