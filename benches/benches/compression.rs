//! The session layer's per-flow compression (`netredir_shared::session`):
//! 16 MiB of one flow as 64 KiB `Msg::Data` chunks through `Session::send`,
//! `flush` and `take_output`, then `feed` into the peer's `Session` and
//! `poll_msg` until drained, for compression off, auto and zstd levels 1,
//! 3, 6 and 9, on a text-only PostScript job, a print job with raster, and
//! random bytes. It first prints, once, the compression ratio of each
//! payload and level to stderr, so that the default level can be chosen
//! from ratio and throughput side by side: compression is the tunnel's
//! costliest step per byte.

// Linked with memcpy wrapped (build.rs): the wrapper must be here.
#[path = "common/copies.rs"]
mod copies;

use criterion::{
    BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use netredir_shared::session::{Compression, Session, SessionConfig};
use netredir_shared::wire::{MAX_DATA, Msg};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Bytes of one flow per iteration.
const TOTAL: usize = 16 * 1024 * 1024;
/// The flow every chunk belongs to.
const FLOW: u32 = 1;

const MODES: [(&str, Compression); 6] = [
    ("off", Compression::Off),
    ("auto", Compression::Auto),
    ("zstd1", Compression::Level(1)),
    ("zstd3", Compression::Level(3)),
    ("zstd6", Compression::Level(6)),
    ("zstd9", Compression::Level(9)),
];

fn payloads() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("text_job", netredir_benches::text_job(TOTAL, 1)),
        ("raster_job", netredir_benches::job_bytes(TOTAL, 2)),
        ("random", netredir_benches::random_bytes(TOTAL, 3)),
    ]
}

fn chunks(data: &[u8]) -> Vec<Vec<u8>> {
    data.chunks(MAX_DATA).map(<[u8]>::to_vec).collect()
}

/// The two ends of a tunnel, nothing sent yet.
fn sessions(compression: Compression) -> (Session, Session) {
    let tx = Session::new(SessionConfig {
        compression,
        ..Default::default()
    });
    let rx = Session::new(SessionConfig::default());
    (tx, rx)
}

/// Sends `chunks` from `tx` to `rx` as a busy flow does, one record per
/// chunk, and returns the record bytes `tx` put out. The receiver
/// acknowledges as a real one does, so the replay buffer stays bounded.
fn transfer(tx: &mut Session, rx: &mut Session, chunks: Vec<Vec<u8>>, now: Instant) -> u64 {
    let mut wire = 0u64;
    let mut delivered = 0usize;
    for bytes in chunks {
        tx.send(Msg::Data { flow: FLOW, bytes }, now);
        tx.flush();
        let out = tx.take_output();
        wire += out.len() as u64;
        rx.feed(&out).expect("valid records");
        while let Some(m) = rx.poll_msg().expect("valid records") {
            match m {
                Msg::Data { flow: FLOW, bytes } => delivered += black_box(bytes).len(),
                other => panic!("unexpected {other:?}"),
            }
        }
        rx.maybe_ack(false);
        if rx.has_output() {
            tx.feed(&rx.take_output()).expect("valid ack");
        }
    }
    assert_eq!(delivered, TOTAL, "every byte arrives");
    wire
}

/// Prints, once, what each level buys on each payload (and a rough
/// single-pass speed; criterion's numbers below are the careful ones).
fn ratio_table(_: &mut Criterion) {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut t = String::from(
        "\ncompression ratio = data bytes / take_output bytes, 16 MiB in 64 KiB Data chunks\n",
    );
    t += &format!(
        "{:<11} {:<6} {:>8} {:>14} {:>18}\n",
        "payload", "mode", "ratio", "wire bytes", "single pass MB/s"
    );
    for (pname, data) in payloads() {
        for (mname, mode) in MODES {
            let (mut tx, mut rx) = sessions(mode);
            let c = chunks(&data);
            let start = Instant::now();
            let wire = transfer(&mut tx, &mut rx, c, start);
            let secs = start.elapsed().as_secs_f64();
            t += &format!(
                "{:<11} {:<6} {:>8.2} {:>14} {:>18.0}\n",
                pname,
                mname,
                TOTAL as f64 / wire as f64,
                wire,
                TOTAL as f64 / secs / 1e6
            );
        }
    }
    eprintln!("{t}");
}

fn bench_transfer(c: &mut Criterion) {
    for (pname, data) in payloads() {
        let mut g = c.benchmark_group(format!("session_16MiB/{pname}"));
        // An iteration takes milliseconds to a third of a second: count
        // whole iterations per sample rather than a growing number.
        g.sampling_mode(SamplingMode::Flat);
        g.throughput(Throughput::Bytes(TOTAL as u64));
        for (mname, mode) in MODES {
            g.bench_function(BenchmarkId::from_parameter(mname), |b| {
                b.iter_batched(
                    || (sessions(mode), chunks(&data)),
                    |((mut tx, mut rx), c)| transfer(&mut tx, &mut rx, c, Instant::now()),
                    BatchSize::PerIteration,
                )
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = ratio_table, bench_transfer
}
criterion_main!(benches);
