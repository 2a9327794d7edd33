//! `wan`: real print jobs over an emulated WAN, through netredir (with
//! compression off and auto), `ssh -C` port forwarding and sshuttle, next
//! to the floor (the job's best compressed size at the link rate, plus one
//! round trip).
//!
//! The jobs are one multi-page document rendered by Ghostscript as a
//! printer driver would: PostScript (ps2write), PCL 5 (ljet4, 600 dpi) and
//! PWG raster (300 dpi, 8-bit grey), plus random bytes of the PCL job's
//! size. Each is sent from the VM to a printer sink on the client's LAN;
//! the time is from connect until the printer has closed the job (the
//! client's view), bytes on the wire are what crossed the host's WAN
//! interface both ways (headers, TLS or SSH included).

use crate::{Opts, kernel_routes};
use anyhow::{Context, Result, bail};
use netredir_benches::testbed::{CLIENT_WAN_IP, HOST_VM_IP, LAN_IP, Testbed, WanLink, wait_until};
use netredir_benches::{Redir, print_job};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The link profiles: (rate Mbit/s, round trip ms, loss %).
const PROFILES: [(f64, f64, f64); 3] = [(10.0, 40.0, 0.0), (50.0, 20.0, 0.0), (100.0, 80.0, 0.5)];
/// Where `ssh -L` listens on the host, for the guest.
const SSH_FWD_PORT: u16 = 9101;

/// One print job.
struct Job {
    name: &'static str,
    bytes: Vec<u8>,
}

/// One way to carry a job from the VM to the printer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Carrier {
    NetredirOff,
    NetredirAuto,
    SshC,
    Sshuttle,
}

impl Carrier {
    const ALL: [Carrier; 4] = [
        Carrier::NetredirOff,
        Carrier::NetredirAuto,
        Carrier::SshC,
        Carrier::Sshuttle,
    ];
    fn label(self) -> &'static str {
        match self {
            Carrier::NetredirOff => "netredir, compression off",
            Carrier::NetredirAuto => "netredir, compression auto",
            Carrier::SshC => "ssh -C",
            Carrier::Sshuttle => "sshuttle",
        }
    }
}

/// A multi-page document as an office suite would hand it to the print
/// system: text in two fonts, rules, boxes and a grey-scale figure.
fn document(pages: usize) -> String {
    const WORDS: [&str; 32] = [
        "network",
        "printer",
        "quarterly",
        "results",
        "the",
        "of",
        "and",
        "report",
        "remote",
        "desktop",
        "session",
        "virtual",
        "user",
        "office",
        "document",
        "page",
        "service",
        "customer",
        "invoice",
        "total",
        "amount",
        "due",
        "shipping",
        "address",
        "order",
        "delivery",
        "summary",
        "analysis",
        "growth",
        "region",
        "sales",
        "figure",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut word = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        WORDS[(x % WORDS.len() as u64) as usize]
    };
    let mut ps = String::from("%!PS-Adobe-3.0\n%%Pages: ");
    let _ = writeln!(ps, "{pages}");
    for page in 1..=pages {
        let _ = writeln!(ps, "%%Page: {page} {page}");
        let _ = writeln!(
            ps,
            "/Helvetica-Bold findfont 16 scalefont setfont 72 750 moveto (Quarterly report, page {page}) show"
        );
        ps.push_str("2 setlinewidth 72 740 moveto 540 740 lineto stroke\n");
        ps.push_str("/Times-Roman findfont 10 scalefont setfont\n");
        for line in 0..44 {
            let mut text = String::new();
            while text.len() < 95 {
                text.push_str(word());
                text.push(' ');
            }
            let _ = writeln!(
                ps,
                "72 {} moveto ({}) show",
                720 - line * 12,
                text.trim_end()
            );
        }
        // A figure: grey bars and a frame.
        for bar in 0..12u32 {
            let _ = writeln!(
                ps,
                "{} setgray {} 90 30 {} rectfill",
                0.2 + 0.05 * f64::from(bar),
                90 + bar * 36,
                40 + (bar as usize * 37 + page * 11) % 100
            );
        }
        ps.push_str("0 setgray 1 setlinewidth 80 80 440 160 rectstroke\nshowpage\n");
    }
    ps.push_str("%%EOF\n");
    ps
}

/// Renders `doc` with Ghostscript's `device` (and extra arguments).
fn render(dir: &Path, doc: &Path, device: &str, extra: &[&str]) -> Result<Vec<u8>> {
    let out = dir.join(format!("job.{device}"));
    let mut args = vec![
        "-q".to_string(),
        "-dSAFER".into(),
        "-dNOPAUSE".into(),
        "-dBATCH".into(),
        format!("-sDEVICE={device}"),
        format!("-sOutputFile={}", out.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(doc.display().to_string());
    let st = std::process::Command::new("gs")
        .args(&args)
        .output()
        .context("cannot run Ghostscript (gs; scripts/setup installs it)")?;
    if !st.status.success() {
        bail!(
            "gs -sDEVICE={device} failed: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    Ok(std::fs::read(&out)?)
}

fn jobs(dir: &Path, pages: usize) -> Result<Vec<Job>> {
    let doc = dir.join("document.ps");
    std::fs::write(&doc, document(pages))?;
    let ps = render(dir, &doc, "ps2write", &[])?;
    let pcl = render(dir, &doc, "ljet4", &["-r600"])?;
    let pwg = render(
        dir,
        &doc,
        "pwgraster",
        &["-r300", "-dcupsColorSpace=18", "-dcupsBitsPerColor=8"],
    )?;
    let random = netredir_benches::random_bytes(pcl.len(), 5);
    Ok(vec![
        Job {
            name: "PostScript",
            bytes: ps,
        },
        Job {
            name: "PCL 5 (600 dpi)",
            bytes: pcl,
        },
        Job {
            name: "PWG raster (300 dpi)",
            bytes: pwg,
        },
        Job {
            name: "random",
            bytes: random,
        },
    ])
}

/// Bytes that crossed the host's WAN interface, both directions.
fn wire_bytes(tb: &Testbed) -> Result<u64> {
    let out = tb
        .host
        .run("ip", &["-s", "-j", "link", "show", "dev", "wan0"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = &v[0]["stats64"];
    let n = |d: &str| s[d]["bytes"].as_u64().unwrap_or(0);
    Ok(n("rx") + n("tx"))
}

/// Sends one job to `addr` from the VM: (seconds, bytes on the wire).
fn send_job(tb: &Testbed, addr: SocketAddr, job: &[u8]) -> Result<(f64, u64)> {
    let before = wire_bytes(tb)?;
    let secs = tb
        .vm
        .enter(|| {
            let t = Instant::now();
            print_job(addr, job)?;
            std::io::Result::Ok(t.elapsed().as_secs_f64())
        })?
        .with_context(|| format!("job to {addr}"))?;
    // The last ACKs and FINs: wait for the counters to settle.
    let mut last = wire_bytes(tb)?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        let now = wire_bytes(tb)?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok((secs, last - before))
}

/// sshd on the client, `ssh -C -L` on the host, sshuttle in the VM; all
/// with a throwaway key. Returns the forwarded address for the guest.
fn ssh_peers(r: &Redir) -> Result<SocketAddr> {
    let tb = &r.tb;
    let dir = tb.dir().join("ssh");
    std::fs::create_dir_all(&dir)?;
    for key in ["host_key", "id"] {
        let p = dir.join(key);
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&p)
            .status()
            .context("cannot run ssh-keygen (openssh-client)")?;
        if !st.success() {
            bail!("ssh-keygen failed");
        }
    }
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))?;
    let conf = dir.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "ListenAddress {CLIENT_WAN_IP}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nPidFile none\nCompression yes\nAllowTcpForwarding yes\n",
            d = dir.display()
        ),
    )?;
    std::fs::create_dir_all("/run/sshd")?; // sshd's privilege separation directory
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("no sshd (openssh-server; scripts/setup installs it)")?;
    let conf_s = conf.display().to_string();
    tb.spawn(&tb.client, "sshd", sshd, &["-D", "-e", "-f", &conf_s])?;
    wait_until("sshd to listen", Duration::from_secs(10), || {
        tb.client
            .run("ss", &["-Hltn", "sport = :22"])
            .is_ok_and(|o| !o.stdout.is_empty())
    })?;
    let id = dir.join("id").display().to_string();
    let opts = [
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
    ];
    let fwd = format!("{HOST_VM_IP}:{SSH_FWD_PORT}:{LAN_IP}:9100");
    let target = format!("root@{CLIENT_WAN_IP}");
    let mut args: Vec<&str> = vec!["-C", "-N", "-i", &id, "-o", "ExitOnForwardFailure=yes"];
    args.extend_from_slice(&opts);
    args.extend_from_slice(&["-L", &fwd, &target]);
    tb.spawn(&tb.host, "ssh-fwd", "ssh", &args)?;
    wait_until("ssh -L to listen", Duration::from_secs(15), || {
        tb.host
            .run("ss", &["-Hltn", &format!("sport = :{SSH_FWD_PORT}")])
            .is_ok_and(|o| !o.stdout.is_empty())
    })
    .with_context(|| tb.log_tail("ssh-fwd"))?;
    // sshuttle in the VM takes the LAN's traffic into its ssh connection.
    let ssh_cmd = format!("ssh -i {id} {}", opts.join(" "));
    tb.spawn(
        &tb.vm,
        "sshuttle",
        "sshuttle",
        &["-r", &target, "-e", &ssh_cmd, "10.202.0.0/24"],
    )?;
    wait_until("sshuttle to connect", Duration::from_secs(30), || {
        tb.log_tail("sshuttle").contains("Connected")
    })
    .with_context(|| tb.log_tail("sshuttle"))?;
    Ok(format!("{HOST_VM_IP}:{SSH_FWD_PORT}").parse()?)
}

/// The floor: the job at zstd's best level, at the link's rate, plus one
/// round trip.
fn floor(job: &[u8], link: &WanLink) -> Result<f64> {
    let small = zstd::bulk::compress(job, 19)?.len().min(job.len());
    Ok(small as f64 * 8.0 / (link.rate_mbit * 1e6) + link.rtt_ms / 1000.0)
}

pub(crate) fn run(o: &Opts, report: &mut String) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("netredir-wan-jobs-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let n_profiles: u64 = if o.quick { 1 } else { PROFILES.len() as u64 };
    crate::plot::stage("wan", 1 + n_profiles * (1 + 4 * 4));
    crate::plot::step("wan", "rendering the print jobs with Ghostscript");
    let jobs = jobs(&scratch, if o.quick { 2 } else { 12 });
    let _ = std::fs::remove_dir_all(&scratch);
    let jobs = jobs?;
    let profiles: &[(f64, f64, f64)] = if o.quick { &PROFILES[..1] } else { &PROFILES };
    writeln!(report, "## WAN: print jobs over an emulated link\n")?;
    writeln!(
        report,
        "Jobs: a {}-page document rendered by Ghostscript. {}\n",
        if o.quick { 2 } else { 12 },
        jobs.iter()
            .map(|j| format!("{} {:.1} MB", j.name, j.bytes.len() as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let mut behind = Vec::new();
    for (profile_no, &(rate, rtt, loss)) in profiles.iter().enumerate() {
        let link = WanLink {
            rate_mbit: rate,
            rtt_ms: rtt,
            loss_pct: loss,
        };
        let title = format!("{rate} Mbit/s, {rtt} ms round trip, {loss}% loss");
        crate::plot::step("wan", &format!("{title}: building the testbed"));
        let tb = Testbed::with_wan("bench-wan", Some(link))?;
        let r = Redir::with_testbed(tb, &["--resource-compression", "raw=off"])?;
        r.tb.spawn(
            &r.tb.lan,
            "printer",
            "socat",
            &["-u", "TCP-LISTEN:9100,reuseaddr,fork", "OPEN:/dev/null"],
        )?;
        r.wait_listening(9100)?;
        r.start_agent(
            "agent",
            &[
                &format!("printer={LAN_IP}:9100"),
                &format!("raw={LAN_IP}:9100"),
            ],
        )?;
        kernel_routes(&r.tb)?;
        let ssh_addr = ssh_peers(&r)?;
        let auto: SocketAddr = (r.vip("printer")?, 9100).into();
        let off: SocketAddr = (r.vip("raw")?, 9100).into();
        let direct: SocketAddr = format!("{LAN_IP}:9100").parse()?;
        writeln!(report, "### {title}\n")?;
        writeln!(
            report,
            "Seconds to print (MB on the wire). Floor: best compressed size / rate + one round trip.\n"
        )?;
        let mut head = String::from("| job | floor s |");
        let mut rule = String::from("|---|---|");
        for p in Carrier::ALL {
            let _ = write!(head, " {} |", p.label());
            rule.push_str("---|");
        }
        head.push_str(" netredir auto / best peer |");
        rule.push_str("---|");
        writeln!(report, "{head}\n{rule}")?;
        let mut series: Vec<(String, Vec<f64>)> = std::iter::once("floor")
            .chain(Carrier::ALL.iter().map(|c| c.label()))
            .map(|n| (n.to_string(), Vec::new()))
            .collect();
        for job in &jobs {
            let fl = floor(&job.bytes, &link)?;
            series[0].1.push(fl);
            let mut row = format!("| {} | {fl:.2} |", job.name);
            let mut times = Vec::new();
            for p in Carrier::ALL {
                let addr = match p {
                    Carrier::NetredirOff => off,
                    Carrier::NetredirAuto => auto,
                    Carrier::SshC => ssh_addr,
                    Carrier::Sshuttle => direct,
                };
                crate::plot::step("wan", &format!("{title}: {} via {}", job.name, p.label()));
                let (secs, wire) = send_job(&r.tb, addr, &job.bytes)?;
                let _ = write!(row, " {secs:.2} ({:.1}) |", wire as f64 / 1e6);
                times.push((p, secs));
                series[times.len()].1.push(secs);
            }
            let ours = times
                .iter()
                .find(|(p, _)| *p == Carrier::NetredirAuto)
                .map_or(0.0, |t| t.1);
            let (peer, best) = times
                .iter()
                .filter(|(p, _)| matches!(p, Carrier::SshC | Carrier::Sshuttle))
                .fold(
                    (Carrier::SshC, f64::MAX),
                    |a, b| if b.1 < a.1 { *b } else { a },
                );
            let _ = write!(row, " {:.2} |", ours / best);
            if ours > best * 1.05 {
                behind.push(format!(
                    "{} at {title}: netredir (auto) {ours:.2} s, {} {best:.2} s",
                    job.name,
                    peer.label()
                ));
            }
            writeln!(report, "{row}")?;
        }
        let png = format!("wan-{}.png", profile_no);
        crate::plot::bars(
            &o.out.join(&png),
            &crate::plot::Bars {
                title: format!("Print job time, {title}"),
                y_label: "seconds".into(),
                groups: jobs.iter().map(|j| j.name.to_string()).collect(),
                series,
            },
        )?;
        writeln!(report, "\n![Job time per path, {title}]({png})\n")?;
    }
    crate::write_behind(
        report,
        &behind,
        "netredir with compression auto was as fast as or faster than the best peer on every job and link.",
    )
}
