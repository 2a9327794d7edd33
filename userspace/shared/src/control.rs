//! The control API: one JSON request per line on a unix socket, one JSON
//! answer per line back. `netredird` serves it; `netredirctl` and the tests
//! are its clients.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Where `netredird` serves the control API unless told otherwise.
pub const DEFAULT_CONTROL_PATH: &str = "/run/netredir/control.sock";

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The resource ↔ vIP table of a VM.
    MapList {
        /// The VM (optional when one is attached).
        #[serde(default)]
        vm: Option<String>,
    },
    /// Changes a resource's row: its vIP pinned, its name for the guest,
    /// or the row of one no longer exported forgotten; answered with the
    /// table as it is then.
    MapEdit {
        /// The VM (optional when one is attached).
        #[serde(default)]
        vm: Option<String>,
        /// What to change.
        edit: MapEdit,
    },
    /// A VM's session state and counters.
    Status {
        /// The VM (optional when one is attached).
        #[serde(default)]
        vm: Option<String>,
    },
    /// A one-time pairing code for an agent.
    Pair {
        /// The VM the agent may reach (optional when one is attached).
        vm: Option<String>,
    },
    /// A VM's tunnel and per-flow statistics.
    Stats {
        /// The VM (optional when one is attached).
        #[serde(default)]
        vm: Option<String>,
    },
    /// The VMs this daemon serves.
    VmList,
    /// Starts serving a VM: steer its NIC's frames for the virtual subnet
    /// to a new engine; its paired agents may connect.
    VmAttach(AttachSpec),
    /// Stops serving a VM: its flows are reset, its programs removed.
    VmDetach {
        /// The VM's name.
        name: String,
    },
    /// The agents paired with a VM (or with every VM).
    PairsList {
        /// Only this VM's.
        vm: Option<String>,
    },
    /// Forgets a paired agent: it cannot connect again without a new
    /// code, and its current session ends (its flows are reset).
    Unpair {
        /// The VM (default: the daemon's).
        vm: Option<String>,
        /// The agent's key fingerprint, hex, or a unique prefix of it.
        key: String,
    },
}

/// A change to one resource of `map list`, named by its name there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MapEdit {
    /// Keep the resource at `vip` (default: where it is now), whatever
    /// else comes: an operator's configuration may name the address.
    Pin {
        /// The resource.
        name: String,
        /// The address, inside the VM's subnet.
        #[serde(default)]
        vip: Option<String>,
    },
    /// The guest finds the resource as `new` (its DNS and mDNS name),
    /// whatever the agent calls it.
    Rename {
        /// The resource.
        name: String,
        /// Its new name: a DNS label.
        new: String,
    },
    /// Forget a resource no longer exported: its row and its kept vIP.
    Remove {
        /// The resource.
        name: String,
    },
}

/// A VM to attach: its identity and its NIC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachSpec {
    /// Its stable identity (the libvirt domain's name or UUID); pairings
    /// are bound to it.
    pub name: String,
    /// The host end of its NIC (`vnet3`, a tap or a veth).
    pub iface: String,
    /// The NIC is only for netredir: XDP on it, DHCP and router adverts
    /// served (else a TC classifier takes only the subnet's frames).
    #[serde(default)]
    pub dedicated: bool,
    /// Virtual subnet (default: the daemon's `--subnet`).
    #[serde(default)]
    pub subnet: Option<String>,
    /// Virtual IPv6 /64 (default: the daemon's `--prefix6`).
    #[serde(default)]
    pub prefix6: Option<String>,
}

/// Tunnel counters of the current session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionReport {
    /// Session id (hex).
    pub id: String,
    /// The agent's name.
    pub agent: String,
    /// Whether a connection carries it right now.
    pub connected: bool,
    /// Connections after the first that resumed it.
    pub reconnects: u64,
    /// Records sent (first transmissions).
    pub records_sent: u64,
    /// Records received.
    pub records_received: u64,
    /// Records sent again after reconnects.
    pub records_retransmitted: u64,
    /// Data payload bytes toward the agent, before compression.
    pub data_bytes_out: u64,
    /// The same after compression.
    pub data_wire_bytes_out: u64,
    /// Data payload bytes from the agent, after decompression.
    pub data_bytes_in: u64,
    /// The same as received.
    pub data_wire_bytes_in: u64,
    /// TLS bytes sent on the tunnel socket (all connections).
    pub tunnel_bytes_out: u64,
    /// TLS bytes received on the tunnel socket (all connections).
    pub tunnel_bytes_in: u64,
    /// Bytes held for replay now.
    pub replay_bytes: u64,
    /// Compression contexts alive now.
    pub compression_contexts: u64,
}

/// One open flow.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowReport {
    /// Flow id.
    pub flow: u32,
    /// Bytes the guest sent.
    pub bytes_from_guest: u64,
    /// Bytes the guest received.
    pub bytes_to_guest: u64,
    /// Tunnel bytes for the guest's bytes (after compression).
    pub wire_out: u64,
    /// Tunnel bytes for the bytes to the guest (before decompression).
    pub wire_in: u64,
    /// The guest-side TCP state (`Established`, `CloseWait`...), empty
    /// for UDP: with the fields below, it says which side a slow flow
    /// waits for.
    #[serde(default)]
    pub state: String,
    /// Guest bytes the agent takes before it grants more (0: the
    /// resource is not reading).
    #[serde(default)]
    pub credit: u64,
    /// Resource bytes the agent may send before the guest reads more (0:
    /// the guest is not reading).
    #[serde(default)]
    pub allowed: u64,
    /// Resource bytes held for the guest, not yet acknowledged by it.
    #[serde(default)]
    pub to_guest_queued: u64,
    /// Guest bytes held, not yet sent toward the agent.
    #[serde(default)]
    pub from_guest_queued: u64,
}

/// Answer to [`Request::Stats`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// The session, if there is one.
    pub session: Option<SessionReport>,
    /// Open flows.
    pub flows: Vec<FlowReport>,
    /// Opens the agent or the host refused.
    pub refused_opens: u64,
    /// Tunnel connections refused (not TLS, not paired, bad code).
    pub refused_connections: u64,
}

/// One row of `vm list`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfo {
    /// The VM's name (its stable identity: the libvirt domain).
    pub name: String,
    /// The host end of its NIC.
    pub iface: String,
    /// `shared` (TC classifier) or `dedicated` (XDP, DHCP).
    pub mode: String,
    /// Whether its agent has a tunnel up.
    pub agent_connected: bool,
    /// The agent's name, if one ever connected.
    pub agent: Option<String>,
    /// Flows open now.
    pub flows: u64,
    /// Payload bytes from the guest and to it.
    pub bytes_from_guest: u64,
    /// See `bytes_from_guest`.
    pub bytes_to_guest: u64,
    /// The most its open TCP flows may hold in buffers.
    pub flow_buffer_bytes: u64,
    /// The data path worker (thread) that serves it.
    #[serde(default)]
    pub worker: u32,
}

/// One row of `map list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapEntry {
    /// Resource name as the agent exported it.
    pub name: String,
    /// Its address inside the VM.
    pub vip: String,
    /// Its IPv6 address inside the VM.
    pub vip6: String,
    /// The real address, as the agent reported it.
    pub target: String,
    /// Ports the guest may use.
    pub ports: Vec<u16>,
    /// `online` while the exporting agent is connected, else `offline`.
    pub state: String,
    /// `export` (the user named it with `--export`) or `discovered` (the
    /// agent found it on its LAN with `--discover`).
    #[serde(default = "export_source")]
    pub source: String,
    /// What identifies it (its client network and the device): its vIP
    /// is kept by it.
    #[serde(default)]
    pub key: String,
    /// Its vIP was pinned by an operator (`map pin`).
    #[serde(default)]
    pub pinned: bool,
}

/// What an entry from a daemon without `source` was.
fn export_source() -> String {
    "export".into()
}

/// Counters and state of the daemon's one session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Interface the steer program is attached to.
    pub iface: String,
    /// The virtual subnet.
    pub subnet: String,
    /// Whether an agent is connected.
    pub agent_connected: bool,
    /// Name the agent gave in its Hello.
    pub agent_name: Option<String>,
    /// Where the connected agent's tunnel comes from (after any NAT): a
    /// change means the agent's network moved.
    #[serde(default)]
    pub agent_addr: Option<String>,
    /// Open flows.
    pub flows: u64,
    /// The virtual IPv6 /64.
    pub prefix6: String,
    /// Addresses of the vDNS: IPv4 in the subnet, IPv6 in the prefix.
    pub dns: Vec<String>,
    /// The DNS zone resources are named in.
    pub zone: String,
    /// Named counters (frames, bytes, refusals, errors).
    pub counters: Vec<(String, u64)>,
}

/// What the server answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::MapList`].
    Map {
        /// The rows.
        entries: Vec<MapEntry>,
    },
    /// Answer to [`Request::Status`].
    Status(Status),
    /// Answer to [`Request::Pair`].
    Pair {
        /// The code to give `netredir-agent --pair`.
        code: String,
        /// The VM it pairs with.
        vm: String,
        /// The host's certificate fingerprint the code is bound to.
        host_fingerprint: String,
        /// Seconds the code stays valid.
        valid_for_secs: u64,
    },
    /// Answer to [`Request::Stats`].
    Stats(Stats),
    /// Answer to [`Request::VmList`].
    Vms {
        /// One row per VM.
        vms: Vec<VmInfo>,
    },
    /// Answer to [`Request::VmAttach`]: the new VM's row.
    Attached(VmInfo),
    /// Answer to [`Request::VmDetach`].
    Detached {
        /// The VM.
        name: String,
        /// Its flows that were reset.
        flows_reset: u64,
    },
    /// Answer to [`Request::PairsList`].
    Pairs {
        /// The paired agents.
        agents: Vec<crate::pairing::PairedAgent>,
    },
    /// Answer to [`Request::Unpair`].
    Unpaired {
        /// The agent that was removed.
        agent: crate::pairing::PairedAgent,
        /// Whether its session was live and has been ended.
        session_ended: bool,
    },
    /// The request could not be served.
    Error {
        /// Why, for a human.
        message: String,
    },
}

/// Why a control request failed, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket is not there or nobody listens.
    #[error("cannot reach netredird at {path}: {source} (is it running, and is --control right?)")]
    Connect {
        /// Socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("control connection to {path} failed: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The daemon answered something we cannot read.
    #[error("netredird sent an answer this netredirctl does not understand: {0}")]
    Protocol(String),
}

/// Sends one request and waits (at most `timeout`) for its answer.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let p = path.display().to_string();
    let io = |source| ControlError::Io {
        path: p.clone(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: p.clone(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ControlError::Protocol(format!("{e}: {answer:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_have_stable_json() {
        assert_eq!(
            serde_json::to_string(&Request::MapList { vm: None }).unwrap(),
            r#"{"cmd":"map_list","vm":null}"#
        );
        // A client from before VMs were named still gets answers.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status { vm: None }
        );
        let attach = Request::VmAttach(AttachSpec {
            name: "desk-7".into(),
            iface: "vnet3".into(),
            dedicated: false,
            subnet: None,
            prefix6: None,
        });
        let s = serde_json::to_string(&attach).unwrap();
        assert!(
            s.starts_with(r#"{"cmd":"vm_attach","name":"desk-7","iface":"vnet3""#),
            "{s}"
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), attach);
        let r = Response::Map {
            entries: vec![MapEntry {
                name: "p".into(),
                vip: "100.77.1.2".into(),
                vip6: "fd6e:7264::644d:102".into(),
                target: "10.0.0.5:9100".into(),
                ports: vec![9100],
                state: "online".into(),
                source: "discovered".into(),
                key: "net:10.0.0.0/24/dnssd:p".into(),
                pinned: true,
            }],
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(
            s.starts_with(r#"{"reply":"map","entries":[{"name":"p","vip":"100.77.1.2""#),
            "{s}"
        );
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), r);
    }
}
