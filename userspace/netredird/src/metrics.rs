//! Prometheus metrics over HTTP (`--metrics ADDR`, off by default): per VM
//! (label `vm`) and per resource (labels `vm`, `resource`), in the text
//! exposition format.
//!
//! The values come from one snapshot the data path renders on each scrape,
//! so no registry is kept beside the daemon's own counters, and the format
//! is a few lines of text: written here rather than pulling in a
//! Prometheus client and an HTTP server crate. The HTTP side answers
//! `GET /metrics` and nothing else; requests are capped (8 KiB, 5 s, at
//! most 4 at once) so a scraper that stalls blocks nobody.

use crate::workers::Workers;
use anyhow::{Context, Result};
use netredir_shared::control::SessionReport;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// What went to and came from one resource, over the daemon's life.
#[derive(Debug, Clone, Default)]
pub struct ResourceTotals {
    /// Flows the guest opened to it.
    pub opens: u64,
    /// Payload bytes from the guest toward it.
    pub to_resource: u64,
    /// Payload bytes from it toward the guest.
    pub from_resource: u64,
}

/// One resource's row.
#[derive(Debug, Clone)]
pub struct ResourceReport {
    /// Its name, as exported.
    pub name: String,
    /// Whether its agent is connected.
    pub online: bool,
    /// Flows open to it now.
    pub flows: u64,
    /// Its totals.
    pub totals: ResourceTotals,
}

/// One VM's snapshot.
#[derive(Debug, Clone)]
pub struct VmReport {
    /// The VM's name.
    pub name: String,
    /// Whether its agent has a tunnel up.
    pub agent_connected: bool,
    /// Flows open now.
    pub flows: u64,
    /// The most the open TCP flows may hold in buffers.
    pub flow_buffer_bytes: u64,
    /// The tunnel session, if there is one.
    pub session: Option<SessionReport>,
    /// Refused or dropped new flows by reason.
    pub refusals: Vec<(&'static str, u64)>,
    /// Every named counter of `netredirctl status`.
    pub counters: Vec<(String, u64)>,
    /// Its resources.
    pub resources: Vec<ResourceReport>,
}

/// A label value as the format wants it (backslash, quote, newline escaped).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    /// A counter with one row per VM and value of `key` (`rows` of a VM).
    fn by_vm_and<'a>(
        &mut self,
        vms: &'a [VmReport],
        name: &str,
        help: &str,
        key: &str,
        rows: impl Fn(&'a VmReport) -> Vec<(&'a str, u64)>,
    ) {
        self.head(name, "counter", help);
        for v in vms {
            for (k, n) in rows(v) {
                self.line(name, &[("vm", &v.name), (key, k)], n);
            }
        }
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        let _ = writeln!(self.0, "{name}{{{}}} {v}", l.join(","));
    }
}

/// The exposition text for these VMs and this process.
pub fn render(vms: &[VmReport], daemon: &[(&str, u64)]) -> String {
    let mut o = Out(String::new());
    type Get = fn(&VmReport) -> u64;
    let gauges: [(&str, &str, Get); 3] = [
        (
            "netredir_vm_agent_connected",
            "Whether the VM's agent has a tunnel up (1) or not (0).",
            |v| u64::from(v.agent_connected),
        ),
        ("netredir_vm_flows", "Flows open now (TCP and UDP).", |v| {
            v.flows
        }),
        (
            "netredir_vm_flow_buffer_bytes",
            "The most the open TCP flows may hold in buffers.",
            |v| v.flow_buffer_bytes,
        ),
    ];
    for (name, help, get) in gauges {
        o.head(name, "gauge", help);
        for v in vms {
            o.line(name, &[("vm", &v.name)], get(v));
        }
    }
    type SGet = fn(&SessionReport) -> u64;
    let session: [(&str, &str, &str, SGet); 3] = [
        (
            "netredir_vm_tunnel_reconnects_total",
            "counter",
            "Tunnel connections that resumed the session.",
            |s| s.reconnects,
        ),
        (
            "netredir_vm_records_retransmitted_total",
            "counter",
            "Tunnel records sent again after a reconnect.",
            |s| s.records_retransmitted,
        ),
        (
            "netredir_vm_replay_bytes",
            "gauge",
            "Bytes held for replay until the agent acknowledges them.",
            |s| s.replay_bytes,
        ),
    ];
    for (name, kind, help, get) in session {
        o.head(name, kind, help);
        for v in vms {
            o.line(name, &[("vm", &v.name)], v.session.as_ref().map_or(0, get));
        }
    }
    type DGet = fn(&SessionReport) -> (u64, u64);
    let directed: [(&str, &str, DGet); 3] = [
        (
            "netredir_vm_tunnel_bytes_total",
            "TLS bytes on the tunnel, out (to the agent) and in.",
            |s| (s.tunnel_bytes_out, s.tunnel_bytes_in),
        ),
        (
            "netredir_vm_data_bytes_total",
            "Payload bytes, out (from the guest) and in (to it), uncompressed.",
            |s| (s.data_bytes_out, s.data_bytes_in),
        ),
        (
            "netredir_vm_data_wire_bytes_total",
            "The same payload as it crossed the tunnel (after compression).",
            |s| (s.data_wire_bytes_out, s.data_wire_bytes_in),
        ),
    ];
    for (name, help, get) in directed {
        o.head(name, "counter", help);
        for v in vms {
            let (out, inn) = v.session.as_ref().map_or((0, 0), get);
            o.line(name, &[("vm", &v.name), ("direction", "out")], out);
            o.line(name, &[("vm", &v.name), ("direction", "in")], inn);
        }
    }
    o.by_vm_and(
        vms,
        "netredir_vm_refusals_total",
        "New flows refused or dropped, by reason (no_resource, offline, limit, rate, opening, by_agent).",
        "reason",
        |v| v.refusals.iter().map(|(k, n)| (*k, *n)).collect(),
    );
    o.by_vm_and(
        vms,
        "netredir_vm_counter_total",
        "Every counter of `netredirctl status`, by its name there.",
        "counter",
        |v| v.counters.iter().map(|(k, n)| (k.as_str(), *n)).collect(),
    );
    type RGet = fn(&ResourceReport) -> u64;
    let per_res: [(&str, &str, &str, RGet); 3] = [
        (
            "netredir_resource_online",
            "gauge",
            "Whether the resource's agent is connected (1) or not (0).",
            |r| u64::from(r.online),
        ),
        (
            "netredir_resource_flows",
            "gauge",
            "Flows open to the resource now.",
            |r| r.flows,
        ),
        (
            "netredir_resource_flows_opened_total",
            "counter",
            "Flows the guest opened to the resource.",
            |r| r.totals.opens,
        ),
    ];
    for (name, kind, help, get) in per_res {
        o.head(name, kind, help);
        for v in vms {
            for r in &v.resources {
                o.line(name, &[("vm", &v.name), ("resource", &r.name)], get(r));
            }
        }
    }
    let name = "netredir_resource_bytes_total";
    o.head(
        name,
        "counter",
        "Payload bytes to the resource (from the guest) and from it.",
    );
    for v in vms {
        for r in &v.resources {
            let l = [("vm", v.name.as_str()), ("resource", r.name.as_str())];
            o.line(
                name,
                &[l[0], l[1], ("direction", "to_resource")],
                r.totals.to_resource,
            );
            o.line(
                name,
                &[l[0], l[1], ("direction", "from_resource")],
                r.totals.from_resource,
            );
        }
    }
    let name = "netredir_daemon_counter_total";
    o.head(
        name,
        "counter",
        "The daemon's own counters (tunnel connections before a VM is known), by name.",
    );
    for (k, n) in daemon {
        o.line(name, &[("counter", k)], *n);
    }
    let name = "netredir_process_resident_bytes";
    o.head(name, "gauge", "Resident memory of netredird.");
    let _ = writeln!(o.0, "{name} {}", resident_bytes());
    o.0
}

/// This process's resident memory (0 if /proc cannot tell).
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// Most scrapes served at once; more wait in the listen queue.
const MAX_CLIENTS: usize = 4;
/// Longest request head taken.
const MAX_REQUEST: usize = 8 * 1024;

/// Binds `addr` (at start, so that a bad address fails the start).
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .with_context(|| format!("cannot listen for metrics on {addr} (--metrics)"))
}

/// Serves `GET /metrics` on `listener` from a thread of its own.
pub fn serve(listener: TcpListener, dp: Arc<Workers>) -> Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { continue };
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                let (dp, busy) = (dp.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("metrics-client".into())
                    .spawn(move || {
                        let _ = answer(s, &dp);
                        busy.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start a metrics thread");
                }
            }
        })
        .context("cannot start the metrics thread")?;
    Ok(())
}

/// One request: `GET /metrics` gets the text, anything else an error.
fn answer(mut s: TcpStream, dp: &Workers) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(&mut s, "431 Request Header Fields Too Large", "");
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut s, "405 Method Not Allowed", "only GET\n");
    }
    if path != "/metrics" && !path.starts_with("/metrics?") {
        return respond(&mut s, "404 Not Found", "metrics are at /metrics\n");
    }
    match dp.metrics() {
        Some(text) => respond(&mut s, "200 OK", &text),
        None => respond(
            &mut s,
            "503 Service Unavailable",
            "data path did not answer in 3 s\n",
        ),
    }
}

fn respond(s: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_is_well_formed_and_labels_are_escaped() {
        let vm = VmReport {
            name: "alice \"desk\"\\1".into(),
            agent_connected: true,
            flows: 3,
            flow_buffer_bytes: 10,
            session: Some(SessionReport {
                reconnects: 2,
                tunnel_bytes_out: 5,
                ..Default::default()
            }),
            refusals: vec![("rate", 4)],
            counters: vec![("engine.frames_in".into(), 9)],
            resources: vec![ResourceReport {
                name: "printer".into(),
                online: true,
                flows: 1,
                totals: ResourceTotals {
                    opens: 7,
                    to_resource: 100,
                    from_resource: 8,
                },
            }],
        };
        let text = render(&[vm], &[("tunnel_refused", 3)]);
        let vm_label = r#"vm="alice \"desk\"\\1""#;
        for want in [
            format!("netredir_vm_agent_connected{{{vm_label}}} 1"),
            format!("netredir_vm_tunnel_reconnects_total{{{vm_label}}} 2"),
            format!("netredir_vm_tunnel_bytes_total{{{vm_label},direction=\"out\"}} 5"),
            format!("netredir_vm_refusals_total{{{vm_label},reason=\"rate\"}} 4"),
            "netredir_daemon_counter_total{counter=\"tunnel_refused\"} 3".to_string(),
            format!("netredir_resource_flows_opened_total{{{vm_label},resource=\"printer\"}} 7"),
            format!(
                "netredir_resource_bytes_total{{{vm_label},resource=\"printer\",direction=\"to_resource\"}} 100"
            ),
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "{want} missing in:\n{text}"
            );
        }
        // Every line a comment or `name{labels} value` / `name value`.
        for l in text.lines() {
            if l.starts_with("# HELP ") || l.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = l.rsplit_once(' ').expect(l);
            assert!(value.parse::<u64>().is_ok(), "{l}");
            let name = series.split('{').next().unwrap();
            assert!(
                name.starts_with("netredir_")
                    && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
        }
        // Every series has its HELP and TYPE first.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
