//! DNS queries from a hostile guest, to the vDNS and to the mDNS
//! responder (as a multicast querier and as a legacy one): never a panic,
//! answers bounded (1232 bytes for the vDNS, one Ethernet frame for mDNS),
//! and no answer to an answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_datapath::dns::{DnsResource, VDns};
use netredir_datapath::mdns::{MDNS_PORT, Mdns, Reply};
use std::net::Ipv4Addr;

fuzz_target!(|data: &[u8]| {
    let printer = DnsResource {
        name: "printer".into(),
        v4: Ipv4Addr::new(100, 77, 1, 1),
        v6: None,
        tcp_ports: vec![631, 9100],
        ipp_ports: vec![],
    };
    let mut d = VDns::new("netredir.internal").expect("zone");
    d.set_resources(vec![printer.clone()]);
    if let Ok(Some(answer)) = d.answer(data) {
        assert!(answer.len() <= 1232);
    }
    let mut m = Mdns::new();
    m.set_resources(vec![printer]);
    let is_response = data.get(2).is_some_and(|b| b & 0x80 != 0);
    for port in [MDNS_PORT, 40000] {
        match m.answer(data, port) {
            Ok(Some(Reply::Multicast(b) | Reply::Unicast(b))) => {
                assert!(!is_response, "answered an answer");
                assert!(b.len() <= 1440, "{} bytes", b.len());
            }
            Ok(None) | Err(_) => {}
        }
    }
});
