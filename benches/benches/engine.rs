//! The per-frame cost of the per-VM engine (`netredir_datapath::engine`):
//! an ARP request for a vIP through `handle_frame` + `poll`, and a guest
//! smoltcp TCP socket sending 8 MiB to a vIP port through the engine while
//! this file plays the agent (OpenOk, consume Data, grant Window credits).
//! Every frame the VM sends into the virtual subnet costs this much of the
//! daemon's one core, so it bounds what one VM can push to its printers.
//! The bulk case is reported twice: the engine's time alone, and with the
//! guest's TCP/IP stack (also smoltcp, in the same thread) added.

// Linked with memcpy wrapped (build.rs): the wrapper must be here.
#[path = "common/copies.rs"]
mod copies;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use netredir_datapath::engine::{Engine, EngineConfig, Event, FlowId, ResourceId};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpAddress, IpCidr, IpEndpoint,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counts heap allocations made while [`counted`] runs: the engine's
/// allocations per frame, read off the bulk benchmark.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes the engine copied (memcpy/memmove) inside [`counted`].
static COPIES: AtomicU64 = AtomicU64::new(0);

/// Runs `f` with its allocations and copied bytes counted (one thread:
/// the benchmark's).
fn counted<R>(f: impl FnOnce() -> R) -> R {
    COUNTING.store(true, Ordering::Relaxed);
    let (r, copied) = copies::counted(f);
    COUNTING.store(false, Ordering::Relaxed);
    COPIES.fetch_add(copied, Ordering::Relaxed);
    r
}

const ENGINE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SUBNET: Ipv4Addr = Ipv4Addr::new(100, 77, 0, 0);
const VIP: Ipv4Addr = Ipv4Addr::new(100, 77, 1, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(100, 77, 0, 2);
const RESOURCE: ResourceId = 7;
const PORT: u16 = 9100;
/// Bytes the guest sends per iteration of the bulk benchmark.
const BULK: usize = 8 * 1024 * 1024;
/// What the guest application writes, over and over.
const PATTERN: usize = 64 * 1024;
/// Virtual time per round of the in-memory link.
const STEP: Duration = Duration::from_micros(20);

/// An engine as the daemon makes it (default buffers and windows), with
/// one exported resource and an agent online.
fn engine(now: Instant) -> Engine {
    let mut e = Engine::new(EngineConfig::new(SUBNET, 16, ENGINE_MAC), now);
    e.set_resource(VIP, RESOURCE, vec![PORT]);
    e.set_online(true, now);
    e
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut out = vec![0u8; eth.buffer_len() + repr.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut out[..]);
    eth.emit(&mut f);
    repr.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
    out
}

/// The guest's NIC: Ethernet frames both ways, in memory.
#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: VecDeque<Vec<u8>>,
}

struct GRx(Vec<u8>);
struct GTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for GRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for GTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = GRx;
    type TxToken<'a> = GTx<'a>;
    fn receive(&mut self, _: SmolInstant) -> Option<(GRx, GTx<'_>)> {
        let f = self.to_guest.pop_front()?;
        Some((GRx(f), GTx(&mut self.from_guest)))
    }
    fn transmit(&mut self, _: SmolInstant) -> Option<GTx<'_>> {
        Some(GTx(&mut self.from_guest))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

/// A guest smoltcp stack wired to an engine, with a virtual clock; the
/// benchmark plays the agent.
struct Pair {
    engine: Engine,
    guest: Interface,
    wire: Wire,
    socks: SocketSet<'static>,
    epoch: Instant,
    elapsed: Duration,
    sock: SocketHandle,
    flow: FlowId,
    pattern: Vec<u8>,
    /// Data events taken so far (each one allocation for its payload).
    datas: u64,
}

impl Pair {
    /// A guest connected to `VIP:PORT`, the agent having said OpenOk.
    fn connected() -> Self {
        let epoch = Instant::now();
        let mut wire = Wire::default();
        let mut gcfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        gcfg.random_seed = 1;
        let mut guest = Interface::new(gcfg, &mut wire, SmolInstant::ZERO);
        guest.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(GUEST_IP), 16))
                .expect("one address");
        });
        // A Linux guest's default-ish socket buffers.
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        );
        s.connect(
            guest.context(),
            IpEndpoint::new(IpAddress::Ipv4(VIP), PORT),
            40000,
        )
        .expect("connect");
        let mut socks = SocketSet::new(vec![]);
        let sock = socks.add(s);
        let mut p = Self {
            engine: engine(epoch),
            guest,
            wire,
            socks,
            epoch,
            elapsed: Duration::ZERO,
            sock,
            flow: 0,
            pattern: netredir_benches::job_bytes(PATTERN, 9),
            datas: 0,
        };
        let evs = p.drive();
        p.flow = match evs.as_slice() {
            [
                Event::Open {
                    flow,
                    resource: RESOURCE,
                    port: PORT,
                },
            ] => *flow,
            other => panic!("expected one Open, got {other:?}"),
        };
        let now = p.now();
        p.engine.open_ok(p.flow, now).expect("open_ok");
        p.drive();
        assert_eq!(
            p.socks.get::<tcp::Socket>(p.sock).state(),
            tcp::State::Established
        );
        p
    }

    fn now(&self) -> Instant {
        self.epoch + self.elapsed
    }

    fn smol_now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.elapsed.as_micros() as i64)
    }

    /// Steps both sides until neither has anything to say; the events.
    fn drive(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..1000 {
            let t = self.smol_now();
            self.guest.poll(t, &mut self.wire, &mut self.socks);
            let mut moved = false;
            let now = self.now();
            while let Some(f) = self.wire.from_guest.pop_front() {
                self.engine.handle_frame(&f, now);
                moved = true;
            }
            self.engine.poll(now);
            while let Some(f) = self.engine.poll_frame() {
                self.wire.to_guest.push_back(f);
                moved = true;
            }
            events.extend(std::iter::from_fn(|| self.engine.poll_event()));
            if !moved {
                return events;
            }
        }
        panic!("pair never went quiet");
    }

    /// The guest sends `total` bytes; the agent takes every Data event at
    /// once and grants the credit back. Returns the wall time of the whole
    /// exchange and the part of it spent in the engine.
    fn pump(&mut self, total: usize) -> (Duration, Duration) {
        let start = Instant::now();
        let mut in_engine = Duration::ZERO;
        let (mut sent, mut got) = (0usize, 0usize);
        let mut stalled = 0;
        while got < total {
            let s = self.socks.get_mut::<tcp::Socket>(self.sock);
            while sent < total && s.can_send() {
                let off = sent % PATTERN;
                let n = (total - sent).min(PATTERN - off);
                let k = s
                    .send_slice(&self.pattern[off..off + n])
                    .expect("established");
                if k == 0 {
                    break;
                }
                sent += k;
            }
            self.elapsed += STEP;
            let t = self.smol_now();
            self.guest.poll(t, &mut self.wire, &mut self.socks);
            let now = self.now();
            let before = got;
            let mut frames = 0;

            let t0 = Instant::now();
            while let Some(f) = self.wire.from_guest.pop_front() {
                counted(|| self.engine.handle_frame(&f, now));
                frames += 1;
            }
            counted(|| self.engine.poll(now));
            let mut credit = 0u32;
            // (A Data event's payload is one allocation per chunk of up
            // to MAX_CHUNK bytes: per message, not per frame; not counted.)
            while let Some(e) = self.engine.poll_event() {
                match e {
                    Event::Data { flow, bytes } if flow == self.flow => {
                        self.datas += 1;
                        got += bytes.len();
                        credit += bytes.len() as u32;
                        black_box(bytes);
                    }
                    Event::Window { .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            if credit > 0 {
                counted(|| self.engine.window(self.flow, credit, now)).expect("open flow");
            }
            while let Some(f) = counted(|| self.engine.poll_frame()) {
                // The daemon sends a frame and gives it back to the
                // engine; here the guest's wire gets a copy.
                self.wire.to_guest.push_back(f.clone());
                counted(|| self.engine.recycle_frame(f));
                frames += 1;
            }
            in_engine += t0.elapsed();

            if frames == 0 && got == before {
                stalled += 1;
                assert!(
                    stalled < 10_000,
                    "transfer stalled at {got} of {total} bytes ({sent} sent)"
                );
            } else {
                stalled = 0;
            }
        }
        assert_eq!(got, total, "the agent got every byte");
        (start.elapsed(), in_engine)
    }
}

fn bench_arp(c: &mut Criterion) {
    let now = Instant::now();
    let mut e = engine(now);
    let req = arp_request(VIP);
    let mut g = c.benchmark_group("engine");
    g.sample_size(30);
    g.throughput(Throughput::Bytes(req.len() as u64));
    g.bench_function("arp_request_for_vip", |b| {
        b.iter(|| {
            e.handle_frame(black_box(&req), now);
            e.poll(now);
            let reply = e.poll_frame().expect("ARP reply");
            black_box(reply);
        })
    });
    g.finish();
}

fn bench_bulk(c: &mut Criterion) {
    let mut p = Pair::connected();
    // Reach steady state (windows open, buffers warm) before measuring,
    // and count the frames one iteration takes, to read per-frame costs.
    p.pump(BULK);
    let (fin, fout) = (
        p.engine.counters().frames_in,
        p.engine.counters().frames_out,
    );
    let (allocs, datas) = (ALLOCS.load(Ordering::Relaxed), p.datas);
    let copied = COPIES.load(Ordering::Relaxed);
    let (wall, in_engine) = p.pump(BULK);
    let copied = COPIES.load(Ordering::Relaxed) - copied;
    let datas = p.datas - datas;
    // Each Data event's payload is one allocation (per message, not per
    // frame): the rest is the frame path's.
    let allocs = (ALLOCS.load(Ordering::Relaxed) - allocs).saturating_sub(datas);
    let (fin, fout) = (
        p.engine.counters().frames_in - fin,
        p.engine.counters().frames_out - fout,
    );
    if !std::env::args().any(|a| a == "--list") {
        eprintln!(
            "\n8 MiB guest -> agent: {fin} frames from the guest, {fout} to it; \
             one pass: {:.0} ns per guest frame in the engine, {:.0} with the guest stack; \
             {allocs} heap allocations in the engine's frame path ({:.3} per frame) \
             besides one per Data message ({datas}); {:.2} bytes copied per guest byte \
             (frame to socket buffer, socket buffer to Data message)\n",
            in_engine.as_nanos() as f64 / fin as f64,
            wall.as_nanos() as f64 / fin as f64,
            allocs as f64 / (fin + fout) as f64,
            copied as f64 / BULK as f64,
        );
    }
    let mut g = c.benchmark_group("engine/guest_to_agent_8MiB");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(BULK as u64));
    g.bench_function("engine_only", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| p.pump(BULK).1).sum())
    });
    g.bench_function("engine_and_guest_stack", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| p.pump(BULK).0).sum())
    });
    g.finish();
    let c = p.engine.counters();
    assert_eq!(c.resets + c.flow_errors + c.malformed, 0, "{c:?}");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_arp, bench_bulk
}
criterion_main!(benches);
