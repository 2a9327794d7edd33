//! The tunnel's record path (`netredir_shared::{session, link, tls}`), both
//! ends in one thread: 16 MiB of one flow as 64 KiB `Msg::Data` payloads,
//! four per record as a worker's turn gathers them, from the host's
//! `Session::send` through its `Link` (TLS 1.3, the tunnel's cipher) to
//! ciphertext, and from there through the agent's `Link` and `Session` to
//! the `Msg::Data` it hands the resource socket; the agent's acks go back.
//!
//! It first prints, once, the bytes copied per payload byte on each side,
//! counted at `memcpy`/`memmove` (see `common/copies.rs`): the payload's
//! own copies (into a TLS record, out of the TLS buffer...) plus anything
//! else that moves bytes. Compression is off: the bytes are random, which
//! `auto` sends raw as well, so this is the path bulk data takes.

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use netredir_shared::link::Link;
use netredir_shared::session::{Compression, Session, SessionConfig};
use netredir_shared::tls::{HostCheck, Identity, Tls};
use netredir_shared::wire::{MAX_DATA, Msg};
use std::hint::black_box;
use std::time::{Duration, Instant};

#[path = "common/copies.rs"]
mod copies;

/// Bytes of one flow per iteration.
const TOTAL: usize = 16 * 1024 * 1024;
/// Payloads per record (per turn of the sending worker).
const PER_TURN: usize = 4;
/// The flow every payload belongs to.
const FLOW: u32 = 1;

/// Both ends of one tunnel connection, past the handshake and preamble.
struct Tunnel {
    host: Link,
    host_session: Session,
    agent: Link,
    agent_session: Session,
}

fn connected() -> Tunnel {
    let agent_id = Identity::generate("netredir-agent").expect("agent identity");
    let host_id = Identity::generate("netredird").expect("host identity");
    let mut agent = Link::new(
        Tls::client(&agent_id, HostCheck::Pinned(host_id.fingerprint())).expect("client"),
    );
    let mut host = Link::new(Tls::server(&host_id).expect("server"));
    let mut host_session = Session::new(SessionConfig {
        compression: Compression::Off,
        ..Default::default()
    });
    let mut agent_session = Session::new(SessionConfig::default());
    agent.send_preamble(&Msg::Resume {
        session: 0,
        received: 0,
    });
    for _ in 0..10 {
        let (mut up, mut down) = (Vec::new(), Vec::new());
        agent.flush(None, &mut up);
        for m in host.receive(&up, None).expect("host receives") {
            if let Msg::Resume { .. } = m {
                host.enter_records(&mut host_session).expect("records");
                host.send_preamble(&Msg::Welcome {
                    session: 1,
                    received: 0,
                    resumed: false,
                });
            }
        }
        host.flush(None, &mut down);
        for m in agent.receive(&down, None).expect("agent receives") {
            if let Msg::Welcome { .. } = m {
                agent.enter_records(&mut agent_session).expect("records");
            }
        }
        if agent.in_records() && host.in_records() {
            return Tunnel {
                host,
                host_session,
                agent,
                agent_session,
            };
        }
    }
    panic!("handshake and preamble did not finish");
}

fn payloads() -> Vec<Vec<u8>> {
    netredir_benches::random_bytes(TOTAL, 5)
        .chunks(MAX_DATA)
        .map(<[u8]>::to_vec)
        .collect()
}

/// Bytes copied on each side, as [`transfer`] counts them.
#[derive(Default)]
struct Copied {
    sender: u64,
    receiver: u64,
}

/// Sends `payloads` from the host to the agent and returns what was copied
/// (counted only if `count`); asserts every byte arrived.
fn transfer(t: &mut Tunnel, payloads: Vec<Vec<u8>>, count: bool) -> Copied {
    let now = Instant::now();
    let mut copied = Copied::default();
    let mut delivered = 0usize;
    let mut turns = payloads.into_iter().peekable();
    let measure = |f: &mut dyn FnMut(), into: &mut u64| {
        if count {
            *into += copies::counted(f).1;
        } else {
            f();
        }
    };
    while turns.peek().is_some() {
        let mut turn: Vec<Vec<u8>> = turns.by_ref().take(PER_TURN).collect();
        let mut wire = Vec::new();
        measure(
            &mut || {
                for bytes in turn.drain(..) {
                    t.host_session.send(Msg::Data { flow: FLOW, bytes }, now);
                }
                t.host_session.flush();
                t.host.flush(Some(&mut t.host_session), &mut wire);
            },
            &mut copied.sender,
        );
        measure(
            &mut || {
                t.agent
                    .receive(&wire, Some(&mut t.agent_session))
                    .expect("valid records");
                while let Some(m) = t.agent_session.poll_msg().expect("valid records") {
                    match m {
                        Msg::Data { flow: FLOW, bytes } => delivered += black_box(bytes).len(),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            },
            &mut copied.receiver,
        );
        let mut back = Vec::new();
        t.agent_session.maybe_ack(false);
        t.agent.flush(Some(&mut t.agent_session), &mut back);
        t.host
            .receive(&back, Some(&mut t.host_session))
            .expect("valid acks");
    }
    assert_eq!(delivered, TOTAL, "every byte arrives");
    copied
}

/// Prints, once, the bytes copied per payload byte on each side.
fn copies_table(_: &mut Criterion) {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut t = connected();
    // A first pass grows the buffers the steady state reuses.
    transfer(&mut t, payloads(), false);
    let c = transfer(&mut t, payloads(), true);
    eprintln!(
        "\nrecord path, {} MiB in {} KiB Data payloads, {PER_TURN} per record, compression off\n\
         bytes copied per payload byte (memcpy + memmove):\n  \
         sender   (Session::send .. Link::flush -> ciphertext): {:.2}\n  \
         receiver (Link::receive .. Session::poll_msg -> Data): {:.2}\n",
        TOTAL >> 20,
        MAX_DATA >> 10,
        c.sender as f64 / TOTAL as f64,
        c.receiver as f64 / TOTAL as f64,
    );
}

fn bench_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("record_16MiB");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.bench_function("tls_both_ends", |b| {
        let mut t = connected();
        b.iter_batched(
            payloads,
            |p| transfer(&mut t, p, false),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = copies_table, bench_record
}
criterion_main!(benches);
