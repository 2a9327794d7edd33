//! netredirctl: asks netredird over its control socket and prints the
//! answer for people (tables) or programs (`--json`); also libvirt's hook.

mod hook;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use netredir_shared::control::{
    AttachSpec, DEFAULT_CONTROL_PATH, MapEdit, MapEntry, Request, Response, request,
};
use std::path::PathBuf;
use std::time::Duration;

/// Shows and manages what netredird redirects.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// netredird's control socket (its --control).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONTROL_PATH)]
    control: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Resources and their virtual IPs.
    Map {
        #[command(subcommand)]
        cmd: MapCmd,
    },
    /// A VM's session: agent, flows, counters.
    Status {
        /// The VM (needed when several are attached).
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A one-time code that pairs an agent with a VM (give it to
    /// `netredir-agent --pair`; valid for 10 minutes).
    Pair {
        /// The VM the agent may reach; it need not be attached yet
        /// (needed unless exactly one VM is attached).
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// Print {"code": ...} instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Tunnel statistics: bytes, compression, records, reconnects, flows.
    ///
    /// Per flow: CREDIT is what the agent still takes from the guest (0:
    /// the resource is not reading), ALLOWED what the agent may still send
    /// (0: the guest is not reading), HELD IN / HELD OUT the bytes waiting
    /// here in each direction.
    Stats {
        /// The VM (needed when several are attached).
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The VMs netredird serves.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// The agents paired with the VMs: their key, name and VM.
    Pairs {
        #[command(subcommand)]
        cmd: PairsCmd,
    },
    /// The libvirt hook (`/etc/libvirt/hooks/qemu.d/netredir` runs it, the
    /// domain's XML on stdin): on `started`, attaches the domain's NIC
    /// that carries the alias `ua-netredir` (or `ua-netredir-dedicated`)
    /// under the domain's name; on `stopped`/`release`, detaches it. A
    /// failure is said on stderr and never stops the domain (exit 0).
    LibvirtHook {
        /// The domain's name (the VM's identity).
        domain: String,
        /// libvirt's operation (`started`, `stopped`, `release`, ...).
        operation: String,
        /// libvirt's sub-operation (unused).
        sub_operation: Option<String>,
        /// libvirt's extra argument (unused).
        extra: Option<String>,
    },
    /// Forgets a paired agent: it cannot connect again without a new code
    /// from `netredirctl pair`, and its session ends now (flows reset).
    Unpair {
        /// The VM the agent is paired with (needed unless exactly one VM
        /// is attached).
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// The agent's key fingerprint (hex, as `pairs list` shows it; a
        /// unique prefix of 8 digits or more will do).
        key: String,
    },
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// One row per VM: name, interface, mode, agent, flows, bytes, memory.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Starts serving a VM: its frames for the virtual subnet go to a new
    /// engine, and its paired agents may connect.
    Attach {
        /// Its stable identity: the libvirt domain's name or UUID (never
        /// the interface name, which libvirt gives anew on every boot).
        name: String,
        /// The host end of its NIC (libvirt's `vnetN`, a tap or a veth).
        #[arg(long, value_name = "IF")]
        iface: String,
        /// The NIC is only for netredir: XDP on it, DHCP and router
        /// adverts served (else a TC classifier takes only the subnet's
        /// frames and the VM's other traffic is untouched).
        #[arg(long)]
        dedicated: bool,
        /// Its virtual subnet [default: netredird's --subnet].
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        /// Its virtual IPv6 /64 [default: netredird's --prefix6].
        #[arg(long, value_name = "PREFIX/64")]
        prefix6: Option<String>,
    },
    /// Stops serving a VM: its flows are reset (the guest sees resets),
    /// its tunnel closes, its programs and TAP device are removed. Its
    /// pairings stay: attached again, its agent reconnects by itself.
    Detach {
        /// The VM's name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum PairsCmd {
    /// One row per paired agent: VM, key, name.
    List {
        /// Only the agents of this VM.
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum MapCmd {
    /// One row per resource: name, virtual IP, real address, state, and
    /// whether the agent's user exported it or the agent discovered it.
    List {
        /// The VM (needed when several are attached).
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Keep a resource at a vIP (default: the one it has), whatever else
    /// comes and goes: for configurations that name the address.
    Pin {
        /// The resource, as `map list` names it.
        name: String,
        /// The address, in the VM's subnet.
        vip: Option<String>,
        /// The VM (needed when several are attached).
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
    },
    /// Give a resource another name in the guest (DNS and mDNS), whatever
    /// the agent calls it; kept across restarts.
    Rename {
        /// Its name now.
        name: String,
        /// Its new name (a DNS label).
        new: String,
        /// The VM (needed when several are attached).
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
    },
    /// Forget a resource the agent no longer exports: its row and its
    /// kept vIP.
    Remove {
        /// The resource.
        name: String,
        /// The VM (needed when several are attached).
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
    },
}

fn main() {
    netredir_shared::docs::generate_if_requested(<Args as clap::CommandFactory>::command(), "8");
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("netredirctl: {e:#}");
        std::process::exit(1);
    }
}

fn ask(args: &Args, req: Request) -> Result<Response> {
    ask_within(args, req, 5)
}

fn ask_within(args: &Args, req: Request, secs: u64) -> Result<Response> {
    match request(&args.control, &req, Duration::from_secs(secs))? {
        Response::Error { message } => bail!("netredird: {message}"),
        r => Ok(r),
    }
}

/// Most domain XML read from stdin.
const MAX_XML: u64 = 16 << 20;

fn libvirt_hook(args: &Args, domain: &str, operation: &str) -> Result<()> {
    use std::io::Read;
    // Read all libvirt writes, whatever the operation: it expects that.
    let mut xml = String::new();
    std::io::stdin()
        .take(MAX_XML)
        .read_to_string(&mut xml)
        .map_err(|e| anyhow::anyhow!("cannot read the domain XML on stdin: {e}"))?;
    match hook::action(operation) {
        hook::Action::Nothing => Ok(()),
        hook::Action::Attach => {
            let nics = hook::nics(&xml)?;
            let Some((nic, rest)) = nics.split_first() else {
                return Ok(());
            };
            if !rest.is_empty() {
                eprintln!(
                    "netredir hook: {domain}: {} NICs are marked for netredir; attaching {} only",
                    nics.len(),
                    nic.iface
                );
            }
            let spec = AttachSpec {
                name: domain.to_string(),
                iface: nic.iface.clone(),
                dedicated: nic.dedicated,
                subnet: None,
                prefix6: None,
            };
            match ask_within(args, Request::VmAttach(spec), 20) {
                Ok(_) => {
                    println!("netredir hook: attached {domain} on {}", nic.iface);
                    Ok(())
                }
                // libvirtd reconnecting to a running domain: already there.
                Err(e) if e.to_string().contains("already attached") => Ok(()),
                Err(e) => Err(e),
            }
        }
        hook::Action::Detach => match ask(
            args,
            Request::VmDetach {
                name: domain.to_string(),
            },
        ) {
            Ok(_) => {
                println!("netredir hook: detached {domain}");
                Ok(())
            }
            // A domain without a netredir NIC was never attached.
            Err(e) if e.to_string().contains("is attached") => Ok(()),
            Err(e) => Err(e),
        },
    }
}

fn run(args: Args) -> Result<()> {
    match &args.cmd {
        Cmd::LibvirtHook {
            domain, operation, ..
        } => {
            if let Err(e) = libvirt_hook(&args, domain, operation) {
                eprintln!("netredir hook: {domain} {operation}: {e:#}");
            }
        }
        Cmd::Map {
            cmd: MapCmd::List { vm, json },
        } => {
            let Response::Map { entries } = ask(&args, Request::MapList { vm: vm.clone() })? else {
                bail!("netredird answered map list with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", table(&entries));
            }
        }
        Cmd::Map { cmd } => {
            let (vm, edit) = match cmd {
                MapCmd::List { .. } => unreachable!("handled above"),
                MapCmd::Pin { name, vip, vm } => (
                    vm,
                    MapEdit::Pin {
                        name: name.clone(),
                        vip: vip.clone(),
                    },
                ),
                MapCmd::Rename { name, new, vm } => (
                    vm,
                    MapEdit::Rename {
                        name: name.clone(),
                        new: new.clone(),
                    },
                ),
                MapCmd::Remove { name, vm } => (vm, MapEdit::Remove { name: name.clone() }),
            };
            let req = Request::MapEdit {
                vm: vm.clone(),
                edit,
            };
            let Response::Map { entries } = ask(&args, req)? else {
                bail!("netredird answered map with something else");
            };
            print!("{}", table(&entries));
        }
        Cmd::Status { vm, json } => {
            let Response::Status(st) = ask(&args, Request::Status { vm: vm.clone() })? else {
                bail!("netredird answered status with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("interface  {}", st.iface);
                println!("subnet     {} {}", st.subnet, st.prefix6);
                println!("dns        {} (zone {})", st.dns.join(" "), st.zone);
                match &st.agent_name {
                    Some(n) if st.agent_connected => match &st.agent_addr {
                        Some(a) => println!("agent      {} (connected from {a})", printable(n)),
                        None => println!("agent      {} (connected)", printable(n)),
                    },
                    _ => println!("agent      none connected"),
                }
                println!("flows      {}", st.flows);
                for (k, v) in st.counters.iter().filter(|(_, v)| *v > 0) {
                    println!("  {k:<32} {v}");
                }
            }
        }
        Cmd::Pair { vm, json } => {
            let Response::Pair {
                code,
                vm,
                host_fingerprint,
                valid_for_secs,
            } = ask(&args, Request::Pair { vm: vm.clone() })?
            else {
                bail!("netredird answered pair with something else");
            };
            if *json {
                let v = serde_json::json!({
                    "code": code,
                    "vm": vm,
                    "host_fingerprint": host_fingerprint,
                    "valid_for_secs": valid_for_secs,
                });
                println!("{v}");
            } else {
                println!("{code}");
                eprintln!(
                    "pairs one agent with VM {vm} (host key {}...), valid for {} minutes:\n  netredir-agent --connect HOST:PORT --pair {code} --export ...",
                    &host_fingerprint[..16],
                    valid_for_secs / 60
                );
            }
        }
        Cmd::Vm {
            cmd: VmCmd::List { json },
        } => {
            let Response::Vms { vms } = ask(&args, Request::VmList)? else {
                bail!("netredird answered vm list with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                println!(
                    "{:<20}  {:<10}  {:<9}  {:<20}  {:>5}  {:>12}  {:>12}  {:>9}",
                    "VM", "IFACE", "MODE", "AGENT", "FLOWS", "FROM GUEST", "TO GUEST", "BUF MIB"
                );
                for v in &vms {
                    let agent = match (&v.agent, v.agent_connected) {
                        (Some(a), true) => printable(a),
                        (Some(a), false) => format!("{} (away)", printable(a)),
                        (None, _) => "none".into(),
                    };
                    println!(
                        "{:<20}  {:<10}  {:<9}  {:<20}  {:>5}  {:>12}  {:>12}  {:>9}",
                        printable(&v.name),
                        printable(&v.iface),
                        v.mode,
                        agent,
                        v.flows,
                        v.bytes_from_guest,
                        v.bytes_to_guest,
                        v.flow_buffer_bytes >> 20
                    );
                }
            }
        }
        Cmd::Vm {
            cmd:
                VmCmd::Attach {
                    name,
                    iface,
                    dedicated,
                    subnet,
                    prefix6,
                },
        } => {
            let spec = AttachSpec {
                name: name.clone(),
                iface: iface.clone(),
                dedicated: *dedicated,
                subnet: subnet.clone(),
                prefix6: prefix6.clone(),
            };
            // Loading and attaching the programs takes a moment.
            let Response::Attached(v) = ask_within(&args, Request::VmAttach(spec), 20)? else {
                bail!("netredird answered vm attach with something else");
            };
            println!(
                "attached VM {} on {} ({}); pair its agent with `netredirctl pair --vm {}`",
                printable(&v.name),
                printable(&v.iface),
                v.mode,
                printable(&v.name)
            );
        }
        Cmd::Vm {
            cmd: VmCmd::Detach { name },
        } => {
            let Response::Detached { name, flows_reset } =
                ask(&args, Request::VmDetach { name: name.clone() })?
            else {
                bail!("netredird answered vm detach with something else");
            };
            println!(
                "detached VM {} ({flows_reset} flows reset)",
                printable(&name)
            );
        }
        Cmd::Pairs {
            cmd: PairsCmd::List { vm, json },
        } => {
            let Response::Pairs { agents } = ask(&args, Request::PairsList { vm: vm.clone() })?
            else {
                bail!("netredird answered pairs list with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&agents)?);
            } else if agents.is_empty() {
                eprintln!("no agent is paired (pair one with `netredirctl pair`)");
            } else {
                println!("{:<20}  {:<64}  NAME", "VM", "KEY");
                for a in &agents {
                    println!(
                        "{:<20}  {:<64}  {}",
                        printable(&a.vm),
                        a.fingerprint,
                        printable(&a.name)
                    );
                }
            }
        }
        Cmd::Unpair { vm, key } => {
            let req = Request::Unpair {
                vm: vm.clone(),
                key: key.clone(),
            };
            let Response::Unpaired {
                agent,
                session_ended,
            } = ask(&args, req)?
            else {
                bail!("netredird answered unpair with something else");
            };
            println!(
                "unpaired agent {} (key {}...) from VM {}{}",
                printable(&agent.name),
                &agent.fingerprint[..16.min(agent.fingerprint.len())],
                printable(&agent.vm),
                if session_ended {
                    "; its session ended, its flows were reset"
                } else {
                    ""
                }
            );
        }
        Cmd::Stats { vm, json } => {
            let Response::Stats(st) = ask(&args, Request::Stats { vm: vm.clone() })? else {
                bail!("netredird answered stats with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", stats_text(&st));
            }
        }
    }
    Ok(())
}

fn ratio(plain: u64, wire: u64) -> String {
    if wire == 0 {
        "-".into()
    } else {
        format!("{:.2}", plain as f64 / wire as f64)
    }
}

fn stats_text(st: &netredir_shared::control::Stats) -> String {
    let mut out = String::new();
    match &st.session {
        None => out.push_str("no session (no agent has connected, or its session ended)\n"),
        Some(s) => {
            out.push_str(&format!(
                "session {} with {} ({}), {} reconnects\n",
                s.id,
                printable(&s.agent),
                if s.connected {
                    "connected"
                } else {
                    "waiting for it to resume"
                },
                s.reconnects
            ));
            out.push_str(&format!(
                "  to agent    {} bytes of data, {} on the wire (ratio {})\n",
                s.data_bytes_out,
                s.data_wire_bytes_out,
                ratio(s.data_bytes_out, s.data_wire_bytes_out)
            ));
            out.push_str(&format!(
                "  from agent  {} bytes of data, {} on the wire (ratio {})\n",
                s.data_bytes_in,
                s.data_wire_bytes_in,
                ratio(s.data_bytes_in, s.data_wire_bytes_in)
            ));
            out.push_str(&format!(
                "  tunnel      {} bytes out, {} in (TLS)\n  records     {} sent, {} received, {} retransmitted; replay {} bytes; {} compression contexts\n",
                s.tunnel_bytes_out,
                s.tunnel_bytes_in,
                s.records_sent,
                s.records_received,
                s.records_retransmitted,
                s.replay_bytes,
                s.compression_contexts
            ));
        }
    }
    out.push_str(&format!(
        "refused: {} opens, {} tunnel connections\n",
        st.refused_opens, st.refused_connections
    ));
    if !st.flows.is_empty() {
        out.push_str(
            "FLOW  FROM GUEST  TO GUEST  WIRE OUT  RATIO  STATE        CREDIT   ALLOWED  HELD IN  HELD OUT\n",
        );
        for f in &st.flows {
            out.push_str(&format!(
                "{:<4}  {:>10}  {:>8}  {:>8}  {:<5}  {:<11}  {:>7}  {:>7}  {:>7}  {:>8}\n",
                f.flow,
                f.bytes_from_guest,
                f.bytes_to_guest,
                f.wire_out,
                ratio(f.bytes_from_guest, f.wire_out),
                printable(&f.state),
                f.credit,
                f.allowed,
                f.from_guest_queued,
                f.to_guest_queued
            ));
        }
    }
    out
}

/// Text the agent chose (names, targets), safe for a terminal: control
/// characters (escape sequences among them) are shown escaped, not obeyed.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn table(entries: &[MapEntry]) -> String {
    if entries.is_empty() {
        return "no resources (is an agent connected and exporting?)\n".into();
    }
    let rows: Vec<[String; 7]> = entries
        .iter()
        .map(|e| {
            let ports: Vec<String> = e.ports.iter().map(u16::to_string).collect();
            [
                printable(&e.name),
                e.vip.clone(),
                e.vip6.clone(),
                printable(&e.target),
                ports.join(","),
                e.state.clone(),
                if e.pinned {
                    format!("{}, pinned", e.source)
                } else {
                    e.source.clone()
                },
            ]
        })
        .collect();
    let head = [
        "NAME",
        "VIRTUAL IP",
        "VIRTUAL IPV6",
        "TARGET",
        "PORTS",
        "STATE",
        "SOURCE",
    ]
    .map(String::from);
    let mut w = [0usize; 7];
    for r in std::iter::once(&head).chain(&rows) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&head).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<0$}", w[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_chosen_text_cannot_drive_the_terminal() {
        assert_eq!(
            printable("laser\u{1b}]0;pwned\u{7}"),
            "laser\\u{1b}]0;pwned\\u{7}"
        );
        assert_eq!(printable("Büro-Drucker 2"), "Büro-Drucker 2");
        let t = table(&[MapEntry {
            name: "evil\u{1b}[2J".into(),
            vip: "100.77.12.34".into(),
            vip6: "fd6e:7264::644d:c22".into(),
            target: "10.0.0.5:9100\r".into(),
            ports: vec![9100],
            state: "online".into(),
            source: "export".into(),
            key: String::new(),
            pinned: false,
        }]);
        assert!(!t.contains('\u{1b}') && !t.contains('\r'), "{t:?}");
    }

    #[test]
    fn table_lines_up_columns() {
        let t = table(&[MapEntry {
            name: "printer".into(),
            vip: "100.77.12.34".into(),
            vip6: "fd6e:7264::644d:c22".into(),
            target: "10.0.0.5:9100".into(),
            ports: vec![9100],
            state: "online".into(),
            source: "export".into(),
            key: String::new(),
            pinned: false,
        }]);
        assert_eq!(
            t,
            "NAME     VIRTUAL IP    VIRTUAL IPV6         TARGET         PORTS  STATE   SOURCE\n\
             printer  100.77.12.34  fd6e:7264::644d:c22  10.0.0.5:9100  9100   online  export\n"
        );
        assert!(table(&[]).contains("no resources"));
    }
}
