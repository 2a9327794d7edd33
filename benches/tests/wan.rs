//! The benchmarks' WAN emulator does what it is told: never faster than
//! the link it emulates (only lower bounds are checked: a noisy machine
//! can make it slower, never faster), and it loses frames when asked.

use netredir_benches::testbed::{CLIENT_WAN_IP, HOST_WAN_IP, Testbed, WanLink, wait_until};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn ping(tb: &Testbed, count: u32) -> String {
    let out = tb
        .host
        .command("ping")
        .args([
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "2",
            CLIENT_WAN_IP,
        ])
        .output()
        .expect("ping");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_emulated_link_has_its_delay_and_rate() {
    let link = WanLink {
        rate_mbit: 8.0,
        rtt_ms: 60.0,
        loss_pct: 0.0,
    };
    let tb = Testbed::with_wan("wan-shape", Some(link)).unwrap();
    let out = ping(&tb, 5);
    assert!(out.contains("5 received"), "{out}");
    // rtt min/avg/max/mdev = 60.2/60.4/60.6/0.1 ms
    let min: f64 = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rtt in {out}"));
    assert!(
        min >= 60.0,
        "round trip {min} ms is shorter than the link's 60 ms"
    );

    // 1 MB at 8 Mbit/s takes at least a second.
    tb.spawn(
        &tb.client,
        "sink",
        "socat",
        &["-u", "TCP-LISTEN:9000,reuseaddr", "OPEN:/dev/null"],
    )
    .unwrap();
    wait_until("the sink", Duration::from_secs(10), || {
        tb.client
            .run("ss", &["-Hltn", "sport = :9000"])
            .is_ok_and(|o| !o.stdout.is_empty())
    })
    .unwrap();
    let secs = tb
        .host
        .enter(|| {
            let t = Instant::now();
            let mut s = std::net::TcpStream::connect((CLIENT_WAN_IP, 9000))?;
            s.write_all(&vec![7u8; 1_000_000])?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
            std::io::Result::Ok(t.elapsed().as_secs_f64())
        })
        .unwrap()
        .unwrap();
    assert!(secs >= 1.0, "1 MB crossed an 8 Mbit/s link in {secs:.2} s");
    let _ = HOST_WAN_IP;
}

#[test]
fn the_emulated_link_loses_what_it_is_told_to() {
    let link = WanLink {
        rate_mbit: 100.0,
        rtt_ms: 2.0,
        loss_pct: 50.0,
    };
    let tb = Testbed::with_wan("wan-loss", Some(link)).unwrap();
    let out = ping(&tb, 40);
    let got: u32 = out
        .split(',')
        .find(|p| p.contains("received"))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {out}"));
    // Each round trip survives with probability 1/4: 40 pings, some but
    // far from all come back (the seed is fixed, so this is repeatable).
    assert!(got > 0 && got < 30, "{got} of 40 came back: {out}");
}
