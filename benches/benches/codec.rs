//! The tunnel's wire codec (`netredir_shared::wire`): emit and parse of a
//! full 64 KiB `Msg::Data` and of a small `Msg::Window`, and the `Decoder`
//! reassembling a stream of 1000 mixed messages fed in 1500-byte pieces.
//! Every tunnel byte goes through these, both ways, so they bound the
//! tunnel's throughput before compression or TLS are even counted.

// Linked with memcpy wrapped (build.rs): the wrapper must be here.
#[path = "common/copies.rs"]
mod copies;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use netredir_shared::wire::{Decoder, MAX_DATA, Msg};
use std::hint::black_box;
use std::time::Duration;

/// Deterministic pseudo-random numbers (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn data_msg() -> Msg {
    Msg::Data {
        flow: 7,
        bytes: netredir_benches::job_bytes(MAX_DATA, 1),
    }
}

fn window_msg() -> Msg {
    Msg::Window {
        flow: 7,
        credit: 64 * 1024,
    }
}

fn frame_of(m: &Msg) -> Vec<u8> {
    let mut out = Vec::new();
    m.emit(&mut out);
    out
}

/// 1000 messages as a busy tunnel carries them: mostly Data of every size
/// (a full chunk, an MSS, a small write), Window credits, now and then a
/// compressed chunk, an Open/OpenOk/Fin and a heartbeat.
fn mixed_stream() -> (Vec<u8>, usize) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let payload = netredir_benches::job_bytes(MAX_DATA, 2);
    let mut out = Vec::new();
    for i in 0..1000u32 {
        let flow = 1 + (rng.next() % 16) as u32;
        let m = match rng.next() % 20 {
            0..=3 => Msg::Data {
                flow,
                bytes: payload.clone(),
            },
            4..=7 => Msg::Data {
                flow,
                bytes: payload[..1460].to_vec(),
            },
            8..=9 => Msg::Data {
                flow,
                bytes: payload[..1 + (rng.next() % 512) as usize].to_vec(),
            },
            10..=15 => Msg::Window {
                flow,
                credit: 1 + (rng.next() % (256 * 1024)) as u32,
            },
            16 => Msg::DataZ {
                flow,
                reset: false,
                bytes: payload[..1 + (rng.next() % 8192) as usize].to_vec(),
            },
            17 => Msg::Open {
                flow: 1000 + i,
                resource: 3,
                port: 9100,
            },
            18 => Msg::OpenOk { flow: 1000 + i },
            _ => match i % 3 {
                0 => Msg::Fin { flow },
                1 => Msg::Ping { nonce: i.into() },
                _ => Msg::Pong { nonce: i.into() },
            },
        };
        m.emit(&mut out);
    }
    (out, 1000)
}

fn bench_emit_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    for (name, msg) in [("data_64k", data_msg()), ("window", window_msg())] {
        let frame = frame_of(&msg);
        g.throughput(Throughput::Bytes(frame.len() as u64));
        let mut out = Vec::with_capacity(frame.len());
        g.bench_function(format!("emit/{name}"), |b| {
            b.iter(|| {
                out.clear();
                black_box(&msg).emit(&mut out);
                black_box(out.len())
            })
        });
        g.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| Msg::parse(black_box(&frame[4..])).expect("valid frame"))
        });
    }
    g.finish();
}

fn bench_decoder(c: &mut Criterion) {
    let (stream, count) = mixed_stream();
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("decoder/1000_mixed_in_1500B_pieces", |b| {
        b.iter_batched_ref(
            Decoder::new,
            |d| {
                let mut n = 0;
                for piece in stream.chunks(1500) {
                    d.feed(piece);
                    while let Some(m) = d.next_msg().expect("valid stream") {
                        black_box(&m);
                        n += 1;
                    }
                }
                assert_eq!(n, count);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_emit_parse, bench_decoder
}
criterion_main!(benches);
