//! The agent's decisions, apart from its sockets, so that tests can hold
//! them to account: the export policy's answer to an `Open`, each TCP
//! flow's credits and its queue toward the resource, and the per-address
//! queue of connects.

use netredir_shared::export::ExportSpec;
use netredir_shared::session::Compression;
use netredir_shared::wire::{AGENT_WINDOW, HOST_WINDOW, Msg, OpenError, Proto};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

/// One `--export`, with its compression override.
#[derive(Debug)]
pub struct Export {
    /// What the user gave.
    pub spec: ExportSpec,
    /// `--resource-compression` for it, if any.
    pub compression: Option<Compression>,
    /// Found on the LAN (`--discover`), not named by the user.
    pub discovered: bool,
    /// What identifies it across runs (see the `key` module).
    pub key: String,
}

/// The export policy: the host reaches these resources and ports, and
/// nothing else. A resource's id is its index.
pub struct Exports(Vec<Export>);

/// Why the policy says no to an `Open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No export has this id.
    NoSuchResource,
    /// The export does not include this port (and protocol).
    PortNotExported,
    /// Its name does not resolve (yet).
    Unresolved,
}

impl Denied {
    /// What the host is told, so the guest gets what a real network says.
    pub fn open_error(self) -> OpenError {
        match self {
            Denied::NoSuchResource | Denied::PortNotExported => OpenError::NotExported,
            Denied::Unresolved => OpenError::Unreachable,
        }
    }
}

impl Exports {
    /// The policy of these exports, in the order given.
    pub fn new(list: Vec<Export>) -> Self {
        Self(list)
    }

    /// Export `i` (its resource id), if there is one.
    pub fn get(&self, i: usize) -> Option<&Export> {
        self.0.get(i)
    }

    /// The `Export` messages that announce them to a new session.
    pub fn announcements(&self) -> Vec<Msg> {
        (0..self.0.len())
            .filter_map(|i| self.announcement(i))
            .collect()
    }

    /// The `Export` message of export `i`.
    pub fn announcement(&self, i: usize) -> Option<Msg> {
        let e = self.0.get(i)?;
        Some(Msg::Export {
            id: i as u32,
            name: e.spec.name.clone(),
            target: e.spec.to_string(),
            ports: e.spec.ports.clone(),
            discovered: e.discovered,
            key: e.key.clone(),
        })
    }

    /// Adds `e` (a discovered resource); its id.
    pub fn push(&mut self, e: Export) -> usize {
        self.0.push(e);
        self.0.len() - 1
    }

    /// Replaces export `i`'s spec (a discovered device offers more).
    pub fn set_spec(&mut self, i: usize, spec: ExportSpec) {
        if let Some(e) = self.0.get_mut(i) {
            e.spec = spec;
        }
    }

    /// Export `i`, if there is one.
    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.0.iter()
    }

    /// The id of the export named `name`, if there is one.
    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|e| e.spec.name == name)
    }

    /// Where an `Open` of `resource:port` over `proto` goes, if the policy
    /// allows it; `lookup` gives the export's address (None: not resolved).
    pub fn target(
        &self,
        resource: u32,
        port: u16,
        proto: Proto,
        lookup: impl FnOnce(usize) -> Option<IpAddr>,
    ) -> Result<(SocketAddr, &Export), Denied> {
        let e = self
            .0
            .get(resource as usize)
            .ok_or(Denied::NoSuchResource)?;
        if !e.spec.allows(port, proto) {
            return Err(Denied::PortNotExported);
        }
        let ip = lookup(resource as usize).ok_or(Denied::Unresolved)?;
        Ok((SocketAddr::new(ip, port), e))
    }
}

/// The host sent more than the window it was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overrun;

/// One TCP flow's bytes and credits: what the agent may read from the
/// resource for the host, and what the host sent that the resource has not
/// taken yet. The host may have [`AGENT_WINDOW`] bytes unacknowledged; the
/// agent grants them back as the resource takes them.
///
/// Credits count bytes as they cross the tunnel. Where the agent rewrites
/// a flow (HTTP `Host`), what it writes to the resource is not what the
/// host sent: each queued buffer carries the tunnel bytes it stands for,
/// granted back when it is written; and what a rewrite made longer than
/// the host's credit waits here for more.
pub struct Relay {
    /// Bytes we may still send the host.
    credit: u32,
    /// Buffers for the resource, oldest first, each with the tunnel bytes
    /// it stands for.
    to_target: VecDeque<(Vec<u8>, u32)>,
    /// Tunnel bytes queued.
    queued: usize,
    /// Tunnel bytes of the buffer a send has, not completed yet.
    in_flight: usize,
    /// Tunnel bytes the resource took, not granted back yet.
    ungranted: u32,
    /// Rewritten bytes for the host beyond its credit.
    to_host: Vec<u8>,
}

impl Default for Relay {
    fn default() -> Self {
        Self::new()
    }
}

/// Payloads this long or longer are written from their own buffer; shorter
/// ones are gathered into buffers of this size.
const JOIN_MAX: usize = 4096;

impl Relay {
    /// A new flow: the host grants us [`HOST_WINDOW`] at the start.
    pub fn new() -> Self {
        Self {
            credit: HOST_WINDOW,
            to_target: VecDeque::new(),
            queued: 0,
            in_flight: 0,
            ungranted: 0,
            to_host: Vec::new(),
        }
    }

    /// Data from the host for the resource. A big payload is written from
    /// the buffer it arrived in (no copy); small ones join the last queued
    /// buffer while it has room, so that a resource that does not read
    /// costs its window and no more (a buffer per 1-byte message would
    /// cost ~50 bytes each). Beyond the window, the host broke its side:
    /// reset.
    pub fn host_data(&mut self, bytes: Vec<u8>) -> Result<(), Overrun> {
        let n = bytes.len();
        self.host_data_as(bytes, n)
    }

    /// `cost` bytes from the host, to be written to the resource as
    /// `bytes` (rewritten: longer, shorter, or nothing yet).
    pub fn host_data_as(&mut self, bytes: Vec<u8>, cost: usize) -> Result<(), Overrun> {
        let held = self.queued + self.in_flight + self.ungranted as usize;
        if held + cost > AGENT_WINDOW as usize {
            return Err(Overrun);
        }
        // Within the window, so it fits a u32.
        let c = cost as u32;
        self.queued += cost;
        if bytes.len() >= JOIN_MAX {
            self.to_target.push_back((bytes, c));
            return Ok(());
        }
        match self.to_target.back_mut() {
            // Only into room already there: growing a big buffer would
            // copy it.
            Some((last, lc)) if last.capacity() - last.len() >= bytes.len() => {
                last.extend_from_slice(&bytes);
                *lc += c;
            }
            _ if bytes.is_empty() => {
                // Nothing to write (a rewrite holds it): its bytes are
                // the resource's as soon as what came before is.
                self.queued -= cost;
                if self.in_flight > 0 {
                    self.in_flight += cost;
                } else {
                    self.ungranted += c;
                }
            }
            _ => {
                let mut b = Vec::with_capacity(JOIN_MAX);
                b.extend_from_slice(&bytes);
                self.to_target.push_back((b, c));
            }
        }
        Ok(())
    }

    /// The host granted `credit` more bytes.
    pub fn window(&mut self, credit: u32) {
        self.credit = self.credit.saturating_add(credit);
    }

    /// How much to read from the resource now, at most `max` (0: wait for
    /// the host's credit).
    pub fn read_budget(&self, max: usize) -> usize {
        if !self.to_host.is_empty() {
            return 0;
        }
        (self.credit as usize).min(max)
    }

    /// `n` bytes were read from the resource for the host.
    pub fn read(&mut self, n: usize) {
        self.credit = self.credit.saturating_sub(n as u32);
    }

    /// Rewritten bytes from the resource: what may go to the host now;
    /// the rest waits for [`Relay::release`].
    pub fn for_host(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        if !self.to_host.is_empty() {
            self.to_host.extend_from_slice(&bytes);
            return self.release().unwrap_or_default();
        }
        let now = bytes.len().min(self.credit as usize);
        self.credit -= now as u32;
        if now < bytes.len() {
            self.to_host = bytes.split_off(now);
        }
        bytes
    }

    /// Held bytes for the host that its credit now allows, if any.
    pub fn release(&mut self) -> Option<Vec<u8>> {
        let now = self.to_host.len().min(self.credit as usize);
        if now == 0 {
            return None;
        }
        self.credit -= now as u32;
        let rest = self.to_host.split_off(now);
        Some(std::mem::replace(&mut self.to_host, rest))
    }

    /// Whether bytes for the host wait for its credit.
    pub fn holds_for_host(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// The next buffer to write to the resource (one write at a time).
    pub fn next_write(&mut self) -> Option<Vec<u8>> {
        let (b, cost) = self.to_target.pop_front()?;
        self.queued -= cost as usize;
        self.in_flight += cost as usize;
        Some(b)
    }

    /// A write of `buf` took `n` bytes; the rest goes first next time.
    /// What is left keeps as many tunnel bytes as it has bytes (at most
    /// what the buffer stood for); the others are granted back.
    pub fn written(&mut self, n: usize, mut buf: Vec<u8>) {
        let cost = std::mem::take(&mut self.in_flight);
        let left = (buf.len() - n.min(buf.len())).min(cost);
        self.ungranted += (cost - left) as u32;
        if n < buf.len() {
            buf.drain(..n);
            self.queued += left;
            self.to_target.push_front((buf, left as u32));
        }
    }

    /// Credit to grant the host now, if any: once a quarter of the window
    /// is waiting. Not sooner: the host still has three quarters of it,
    /// and a grant per write (a request's few bytes) would cost a message,
    /// and the host a wake-up, per round trip.
    pub fn take_grant(&mut self) -> Option<u32> {
        if self.ungranted >= AGENT_WINDOW / 4 {
            return Some(std::mem::take(&mut self.ungranted));
        }
        None
    }

    /// Whether nothing waits to be written.
    #[cfg(test)]
    pub fn is_drained(&self) -> bool {
        self.to_target.is_empty()
    }

    /// Bytes the flow holds in memory (queued and being written).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.queued + self.in_flight
    }

    /// The flow is over: drop what it held.
    pub fn clear(&mut self) {
        self.to_target.clear();
        self.queued = 0;
        self.to_host = Vec::new();
    }
}

/// Connects to one server at a time, `max` in flight per address: a burst
/// of guest connections to a busy server (a listen backlog of 5) reaches
/// it as a steady stream, each connect starting as the one before
/// completes, instead of SYNs that the full queue drops and that the
/// kernel sends again only 1, 2, 4... 64 s later, until some give up.
pub struct Connects {
    max: usize,
    in_flight: HashMap<SocketAddr, usize>,
    queue: HashMap<SocketAddr, VecDeque<u64>>,
}

impl Connects {
    /// At most `max` (at least one) connects in flight per address.
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            in_flight: HashMap::new(),
            queue: HashMap::new(),
        }
    }

    /// Queues flow `serial`'s connect to `addr`, behind the earlier ones.
    pub fn push(&mut self, addr: SocketAddr, serial: u64) {
        self.queue.entry(addr).or_default().push_back(serial);
    }

    /// The next queued flow for `addr` if a slot is free; call
    /// [`Connects::started`] if it does start.
    pub fn next(&mut self, addr: SocketAddr) -> Option<u64> {
        if self.in_flight(addr) >= self.max {
            return None;
        }
        let q = self.queue.get_mut(&addr)?;
        let s = q.pop_front();
        if q.is_empty() {
            self.queue.remove(&addr);
        }
        s
    }

    /// A connect to `addr` is in flight.
    pub fn started(&mut self, addr: SocketAddr) {
        *self.in_flight.entry(addr).or_default() += 1;
    }

    /// A connect to `addr` completed (either way): its slot is free.
    pub fn done(&mut self, addr: SocketAddr) {
        if let Some(n) = self.in_flight.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&addr);
            }
        }
    }

    /// Connects to `addr` in flight.
    pub fn in_flight(&self, addr: SocketAddr) -> usize {
        self.in_flight.get(&addr).copied().unwrap_or(0)
    }

    /// Flows waiting for a slot for `addr`.
    #[cfg(test)]
    pub fn waiting(&self, addr: SocketAddr) -> usize {
        self.queue.get(&addr).map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netredir_shared::wire::MAX_DATA;
    use std::net::Ipv4Addr;

    fn exports() -> Exports {
        let spec = |s: &str| s.parse::<ExportSpec>().unwrap();
        Exports::new(vec![
            Export {
                spec: spec("printer=printer.lan:9100,631,161/udp"),
                compression: None,
                discovered: false,
                key: "net:10.0.0.0/24/host:printer.lan".into(),
            },
            Export {
                spec: spec("scanner=10.0.0.9:8080"),
                compression: Some(Compression::Off),
                discovered: true,
                key: "net:10.0.0.0/24/dnssd:scanner".into(),
            },
        ])
    }

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));

    #[test]
    fn the_policy_allows_exactly_the_exported_resources_and_ports() {
        let ex = exports();
        let ok = ex.target(0, 9100, Proto::Tcp, |i| {
            assert_eq!(i, 0);
            Some(IP)
        });
        let (addr, e) = ok.unwrap();
        assert_eq!(addr, SocketAddr::new(IP, 9100));
        assert_eq!(e.spec.name, "printer");
        assert_eq!(
            ex.target(0, 161, Proto::Udp, |_| Some(IP))
                .unwrap()
                .0
                .port(),
            161
        );
        let (_, e) = ex.target(1, 8080, Proto::Tcp, |_| Some(IP)).unwrap();
        assert_eq!(e.compression, Some(Compression::Off));
        let denied = |r, p, proto| ex.target(r, p, proto, |_| Some(IP)).err();
        // Unexported port, a port exported for the other protocol, and
        // a resource that does not exist: NotExported, never a connect.
        assert_eq!(denied(0, 22, Proto::Tcp), Some(Denied::PortNotExported));
        assert_eq!(denied(0, 161, Proto::Tcp), Some(Denied::PortNotExported));
        assert_eq!(denied(0, 9100, Proto::Udp), Some(Denied::PortNotExported));
        assert_eq!(denied(2, 9100, Proto::Tcp), Some(Denied::NoSuchResource));
        assert_eq!(
            denied(u32::MAX, 9100, Proto::Tcp),
            Some(Denied::NoSuchResource)
        );
        for d in [Denied::PortNotExported, Denied::NoSuchResource] {
            assert_eq!(d.open_error(), OpenError::NotExported);
        }
        // Allowed, but its name does not resolve: unreachable.
        let d = ex.target(0, 631, Proto::Tcp, |_| None).unwrap_err();
        assert_eq!(d, Denied::Unresolved);
        assert_eq!(d.open_error(), OpenError::Unreachable);
        // The policy is not asked for an address it refuses anyway.
        let e = ex.target(0, 22, Proto::Tcp, |_| panic!("looked up"));
        assert!(e.is_err());
    }

    #[test]
    fn exports_are_announced_by_index() {
        let a = exports().announcements();
        assert_eq!(a.len(), 2);
        match &a[1] {
            Msg::Export {
                id,
                name,
                target,
                ports,
                discovered,
                key,
            } => {
                assert!(*discovered);
                assert_eq!(key, "net:10.0.0.0/24/dnssd:scanner");
                assert_eq!((*id, name.as_str()), (1, "scanner"));
                assert_eq!(target, "10.0.0.9:8080");
                assert_eq!(ports, &vec![(8080, Proto::Tcp)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_from_the_resource_stay_within_the_hosts_credit() {
        let mut r = Relay::new();
        assert_eq!(r.read_budget(usize::MAX), HOST_WINDOW as usize);
        assert_eq!(r.read_budget(1000), 1000);
        r.read(HOST_WINDOW as usize - 10);
        assert_eq!(r.read_budget(1000), 10);
        r.read(10);
        assert_eq!(r.read_budget(1000), 0, "no credit: no read");
        r.window(500);
        assert_eq!(r.read_budget(1000), 500);
        r.window(u32::MAX);
        assert_eq!(r.read_budget(usize::MAX), u32::MAX as usize, "saturates");
    }

    #[test]
    fn the_host_may_hold_one_window_and_is_granted_it_back_as_the_resource_takes_it() {
        let mut r = Relay::new();
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..AGENT_WINDOW as usize / chunk.len() {
            r.host_data(chunk.clone()).unwrap();
        }
        assert_eq!(r.held(), AGENT_WINDOW as usize);
        assert_eq!(
            r.host_data(b"x".to_vec()),
            Err(Overrun),
            "one byte over the window"
        );
        // The resource takes a whole buffer, then half of one.
        let b = r.next_write().unwrap();
        assert_eq!(b.len(), MAX_DATA);
        // In flight still counts against the window.
        assert_eq!(r.host_data(b"x".to_vec()), Err(Overrun));
        r.written(b.len(), b);
        assert_eq!(
            r.take_grant(),
            None,
            "a quarter window not reached, queue not empty"
        );
        let b = r.next_write().unwrap();
        r.written(1000, b);
        assert_eq!(r.held(), AGENT_WINDOW as usize - MAX_DATA - 1000);
        // Written but not granted back yet still counts.
        assert_eq!(r.host_data(b"x".to_vec()), Err(Overrun));
        // The rest of a short write goes first.
        let b = r.next_write().unwrap();
        assert_eq!(b.len(), MAX_DATA - 1000);
        r.written(b.len(), b);
        while let Some(b) = r.next_write() {
            let n = b.len();
            r.written(n, b);
            if let Some(g) = r.take_grant() {
                assert!(g >= AGENT_WINDOW / 4, "grants come in large pieces: {g}");
                // Granted: the host may send that much again.
                r.host_data(vec![1u8; g as usize]).unwrap();
                assert_eq!(r.host_data(b"x".to_vec()), Err(Overrun));
                break;
            }
        }
    }

    #[test]
    fn a_big_payload_is_written_from_the_buffer_it_came_in() {
        let mut r = Relay::new();
        r.host_data(b"hi".to_vec()).unwrap();
        let big = vec![5u8; 60_000];
        let at = big.as_ptr();
        r.host_data(big).unwrap();
        r.host_data(b"after".to_vec()).unwrap();
        assert_eq!(r.next_write().unwrap(), b"hi");
        let b = r.next_write().unwrap();
        assert_eq!((b.as_ptr(), b.len()), (at, 60_000), "not copied");
        assert_eq!(r.next_write().unwrap(), b"after", "not appended to it");
        assert!(r.next_write().is_none());
    }

    #[test]
    fn grants_wait_for_a_quarter_of_the_window_and_small_writes_share_a_buffer() {
        let mut r = Relay::new();
        for _ in 0..100 {
            r.host_data(b"a".to_vec()).unwrap();
        }
        let b = r.next_write().unwrap();
        assert_eq!(b.len(), 100, "a hundred 1-byte messages, one buffer");
        assert!(r.next_write().is_none());
        r.written(100, b);
        assert!(r.is_drained());
        assert_eq!(
            r.take_grant(),
            None,
            "no grant (no message) per small write"
        );
        assert_eq!(r.held(), 0);
        // The rest of a quarter of the window, written: one grant of all.
        let rest = vec![7u8; AGENT_WINDOW as usize / 4 - 100];
        r.host_data(rest).unwrap();
        while let Some(b) = r.next_write() {
            let n = b.len();
            r.written(n, b);
        }
        assert_eq!(r.take_grant(), Some(AGENT_WINDOW / 4));
        assert_eq!(r.take_grant(), None, "granted once");
    }

    #[test]
    fn rewritten_bytes_are_granted_back_as_the_tunnel_bytes_they_stand_for() {
        // A rewrite that makes 10 bytes of 30, holds 20 back, then lets
        // out 50: the host is granted exactly the 60 it sent, however
        // the writes split.
        let mut r = Relay::new();
        r.host_data_as(vec![1; 10], 30).unwrap();
        r.host_data_as(Vec::new(), 20).unwrap();
        r.host_data_as(vec![2; 50], 10).unwrap();
        assert_eq!(r.held(), 60, "tunnel bytes");
        let b = r.next_write().unwrap();
        assert_eq!(b.len(), 60, "small writes still share a buffer");
        r.written(7, b);
        let b = r.next_write().unwrap();
        assert_eq!(b.len(), 53);
        r.written(53, b);
        assert!(r.is_drained());
        assert_eq!(r.held(), 0);
        // Nothing written yet and nothing queued: a held-back piece is
        // the resource's at once.
        r.host_data_as(Vec::new(), 5).unwrap();
        let rest = vec![3u8; AGENT_WINDOW as usize / 4];
        r.host_data_as(rest, AGENT_WINDOW as usize / 4 - 65)
            .unwrap();
        let b = r.next_write().unwrap();
        let n = b.len();
        r.written(n, b);
        assert_eq!(r.take_grant(), Some(AGENT_WINDOW / 4));
        // The window still holds in tunnel bytes.
        r.host_data_as(vec![0; 10], AGENT_WINDOW as usize).unwrap();
        assert_eq!(r.host_data_as(Vec::new(), 1), Err(Overrun));
    }

    #[test]
    fn bytes_a_rewrite_made_longer_wait_for_the_hosts_credit() {
        let mut r = Relay::new();
        r.read(HOST_WINDOW as usize - 100);
        let sent = r.for_host(vec![9u8; 150]);
        assert_eq!(sent.len(), 100, "the credit left");
        assert!(r.holds_for_host());
        assert_eq!(r.read_budget(1000), 0, "no read while bytes wait");
        assert_eq!(r.release(), None, "no credit");
        // More arrives behind them (the end of the stream): in order.
        assert!(r.for_host(vec![8u8; 5]).is_empty());
        r.window(30);
        assert_eq!(r.release().unwrap(), vec![9u8; 30]);
        r.window(1000);
        let mut rest = r.release().unwrap();
        assert_eq!(rest.split_off(20), vec![8u8; 5]);
        assert_eq!(rest, vec![9u8; 20]);
        assert!(!r.holds_for_host());
        assert_eq!(r.read_budget(10_000), 1000 - 25);
    }

    #[test]
    fn connects_to_one_address_wait_their_turn_in_order() {
        let a: SocketAddr = "10.0.0.5:9100".parse().unwrap();
        let b: SocketAddr = "10.0.0.6:9100".parse().unwrap();
        let mut c = Connects::new(2);
        for s in 1..=5 {
            c.push(a, s);
        }
        c.push(b, 9);
        let mut started = Vec::new();
        while let Some(s) = c.next(a) {
            c.started(a);
            started.push(s);
        }
        assert_eq!(started, vec![1, 2], "two in flight at most");
        assert_eq!((c.in_flight(a), c.waiting(a)), (2, 3));
        // Another address has slots of its own.
        assert_eq!(c.next(b), Some(9));
        c.started(b);
        // One completes: the next in line starts, no more.
        c.done(a);
        assert_eq!(c.next(a), Some(3));
        c.started(a);
        assert_eq!(c.next(a), None);
        // A queued flow that is gone by its turn is skipped by the caller
        // without taking a slot.
        c.done(a);
        assert_eq!(c.next(a), Some(4));
        assert_eq!(c.next(a), Some(5));
        c.started(a);
        assert_eq!(c.next(a), None);
        assert_eq!(c.waiting(a), 0);
        c.done(a);
        c.done(a);
        assert_eq!(c.in_flight(a), 0);
        assert_eq!(Connects::new(0).max, 1, "at least one");
    }
}
