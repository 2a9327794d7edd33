//! Frames from a hostile guest into the engine (ARP, NDP, IPv4, IPv6, TCP, UDP,
//! ICMP, DHCP, RA, DNS), with a resource exported and the agent online: never a
//! panic, and the engine's state stays bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_datapath::engine::{Engine, EngineConfig};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut cfg = EngineConfig::new(Ipv4Addr::new(100, 77, 0, 0), 16, [2, 0, 0, 0, 0, 1]);
    cfg.dhcp = true;
    cfg.max_flows = 64;
    let mut e = Engine::new(cfg, t0);
    e.set_named_resource(Ipv4Addr::new(100, 77, 1, 1), 1, "printer", vec![9100, 631], vec![161]);
    e.set_online(true, t0);
    // Frames are length-prefixed (u16) so that one input holds many.
    let mut rest = data;
    let mut i = 0u64;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let now = t0 + Duration::from_millis(i * 10);
        e.handle_frame(&rest[2..2 + n], now);
        e.poll(now);
        while e.poll_frame().is_some() {}
        while let Some(ev) = e.poll_event() {
            // Play an agent that accepts every open.
            if let netredir_datapath::engine::Event::Open { flow, .. }
            | netredir_datapath::engine::Event::OpenUdp { flow, .. } = ev
            {
                let _ = e.open_ok(flow, now);
            }
        }
        rest = &rest[2 + n..];
        i += 1;
    }
    assert!(e.flow_count() <= 64 + 1);
});
