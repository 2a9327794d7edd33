//! netredir-demo: prints a job from a VM to a printer on the user's LAN,
//! through netredir, on a throwaway testbed of network namespaces.
//!
//! It builds the testbed, starts a raw JetDirect printer (socat on TCP
//! 9100) in `lan`, netredird in `host` with `steer` on the VM's NIC,
//! netredir-agent in `client`, sends a generated job from `vm` to the
//! printer's virtual IP with socat, checks that the printer got exactly
//! those bytes, prints a summary and removes the testbed, also on Ctrl-C.

use anyhow::{Context, Result, bail};
use netredir_benches::testbed::{LAN_IP, bin};
use netredir_benches::{Redir, job_bytes, sha256_hex};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: netredir-demo [--size MIB]   (run as root; see README)";

fn main() {
    let mut size_mib: usize = 32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => match args.next().and_then(|v| v.parse().ok()) {
                Some(v) if (1..=4096).contains(&v) => size_mib = v,
                _ => {
                    eprintln!("--size takes a number of MiB from 1 to 4096\n{USAGE}");
                    std::process::exit(2);
                }
            },
            "-h" | "--help" => {
                println!(
                    "{USAGE}\n\nPrints a generated job (default 32 MiB) from a VM namespace to a\nprinter namespace through netredird and netredir-agent, checks it\narrived byte-identical, and cleans up."
                );
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("netredir-demo: needs root (it creates network namespaces and attaches XDP)");
        std::process::exit(1);
    }
    // Ctrl-C and SIGTERM are taken by this thread; the demo runs on another.
    // SAFETY: signal mask set before any thread starts, so all inherit it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let slot: Arc<Mutex<Option<Arc<Redir>>>> = Arc::default();
    let worker_slot = slot.clone();
    let worker = std::thread::spawn(move || demo(size_mib, &worker_slot));
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        // SAFETY: valid set and timespec.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        if sig > 0 {
            eprintln!("\ninterrupted: removing the testbed");
            if let Some(r) = slot.lock().expect("slot").take() {
                r.tb.cleanup();
            }
            std::process::exit(130);
        }
        if worker.is_finished() {
            break;
        }
    }
    match worker.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("netredir-demo: {e:#}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("netredir-demo: the demo thread panicked");
            std::process::exit(1);
        }
    }
}

fn step(s: &str) {
    println!("==> {s}");
}

fn demo(size_mib: usize, slot: &Mutex<Option<Arc<Redir>>>) -> Result<()> {
    step("building the testbed: namespaces vm, host, client, lan");
    let r = Arc::new(Redir::new("demo").context("cannot start netredird")?);
    *slot.lock().expect("slot") = Some(r.clone());
    let result = run(&r, size_mib);
    // The only other owner is the slot; drop both so the testbed goes now.
    slot.lock().expect("slot").take();
    match Arc::try_unwrap(r) {
        Ok(r) => drop(r),
        Err(r) => r.tb.cleanup(),
    }
    if result.is_ok() {
        step("testbed removed");
    }
    result
}

fn run(r: &Redir, size_mib: usize) -> Result<()> {
    let dir = r.tb.dir().to_owned();
    let received = dir.join("printer-received.prn");
    step(&format!(
        "printer: raw JetDirect sink on {LAN_IP}:9100 (socat) in lan"
    ));
    r.printer_once("printer", 9100, &received)?;
    step(
        "netredird is up in host; pairing netredir-agent in client (netredirctl pair) and starting it",
    );
    r.start_agent("agent", &[&format!("printer={LAN_IP}:9100")])?;
    let vip = r.vip("printer")?;
    let map = std::process::Command::new(bin("netredirctl")?)
        .args(["--control", &r.control.to_string_lossy(), "map", "list"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&map.stdout));

    let len = size_mib * 1024 * 1024;
    let job = job_bytes(len, 0x5eed);
    let job_path = dir.join("job.prn");
    std::fs::write(&job_path, &job)?;
    let want = sha256_hex(&job);
    step(&format!(
        "printing a {size_mib} MiB job from vm to {vip}:9100 (socat)"
    ));
    let started = Instant::now();
    let out =
        r.tb.vm
            .command("socat")
            .args([
                "-u",
                &format!("OPEN:{}", job_path.display()),
                &format!("TCP:{vip}:9100"),
            ])
            .output()
            .context("cannot run socat in vm")?;
    if !out.status.success() {
        bail!(
            "socat in vm failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    r.tb.wait_exit("printer", Duration::from_secs(60))?;
    let elapsed = started.elapsed();
    let got = std::fs::read(&received).context("the printer wrote nothing")?;
    let tunnel = r
        .stats()?
        .session
        .map(|s| (s.data_bytes_out, s.tunnel_bytes_out));
    let have = sha256_hex(&got);
    let secs = elapsed.as_secs_f64();
    println!();
    println!("  job        {} bytes, sha256 {}", job.len(), &want[..16]);
    println!("  printer    {} bytes, sha256 {}", got.len(), &have[..16]);
    println!("  time       {:.3} s", secs);
    println!(
        "  throughput {:.1} MiB/s ({:.2} Gbit/s)",
        len as f64 / secs / (1024.0 * 1024.0),
        len as f64 * 8.0 / secs / 1e9
    );
    if let Some((data, wire)) = tunnel {
        println!(
            "  tunnel     {wire} bytes of TLS for {data} bytes of data (compression ratio {:.2})",
            data as f64 / wire.max(1) as f64
        );
    }
    println!("  mapping    printer = {vip} -> {LAN_IP}:9100");
    println!();
    if have != want {
        bail!("the printer received different bytes than were printed");
    }
    step("the printer received exactly the job (sha256 match)");
    Ok(())
}
