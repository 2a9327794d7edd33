//! Session tests: two sessions joined by an in-memory transport that can
//! drop whatever is in flight, as a dying TCP connection does.

use super::*;
use proptest::prelude::*;

fn pair() -> (Session, Session) {
    (
        Session::new(SessionConfig::default()),
        Session::new(SessionConfig::default()),
    )
}

/// Moves everything from `a` to `b` and back until both are quiet.
fn exchange(a: &mut Session, b: &mut Session) {
    for _ in 0..100 {
        let (x, y) = (a.take_output(), b.take_output());
        if x.is_empty() && y.is_empty() {
            return;
        }
        b.feed(&x).unwrap();
        a.feed(&y).unwrap();
    }
    panic!("never quiet");
}

fn drain(s: &mut Session) -> Vec<Msg> {
    std::iter::from_fn(|| s.poll_msg().unwrap()).collect()
}

fn text(n: usize, seed: u8) -> Vec<u8> {
    let line = format!("72 {seed} moveto (Hello from the guest, line {seed}) show\n");
    line.bytes().cycle().take(n).collect()
}

/// A compressor as a session makes one (window within the receiver's limit).
fn encoder() -> ZEnc<'static> {
    let mut e = ZEnc::new(1).unwrap();
    e.set_parameter(CParameter::WindowLog(WINDOW_LOG)).unwrap();
    e
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn messages_arrive_in_order_and_acks_empty_the_replay_buffer() {
    let (mut a, mut b) = pair();
    let now = Instant::now();
    a.send(
        Msg::Open {
            flow: 1,
            resource: 2,
            port: 9100,
        },
        now,
    );
    a.send(
        Msg::Data {
            flow: 1,
            bytes: text(10_000, 1),
        },
        now,
    );
    a.flush();
    assert!(a.replay_bytes() > 0);
    exchange(&mut a, &mut b);
    let got = drain(&mut b);
    assert_eq!(
        got[0],
        Msg::Open {
            flow: 1,
            resource: 2,
            port: 9100
        }
    );
    assert_eq!(
        got[1],
        Msg::Data {
            flow: 1,
            bytes: text(10_000, 1)
        }
    );
    assert_eq!(b.received(), 1);
    b.maybe_ack(true);
    exchange(&mut a, &mut b);
    assert_eq!(a.replay_bytes(), 0, "acked records are released");
}

#[test]
fn compressible_data_shrinks_and_random_data_is_not_inflated() {
    let (mut a, mut b) = pair();
    let now = Instant::now();
    for i in 0..64u8 {
        a.send(
            Msg::Data {
                flow: 1,
                bytes: text(MAX_DATA, i),
            },
            now,
        );
        a.send(
            Msg::Data {
                flow: 2,
                bytes: random(MAX_DATA, u64::from(i) + 1),
            },
            now,
        );
    }
    a.flush();
    exchange(&mut a, &mut b);
    let mut got1 = Vec::new();
    let mut got2 = Vec::new();
    for m in drain(&mut b) {
        match m {
            Msg::Data { flow: 1, bytes } => got1.extend(bytes),
            Msg::Data { flow: 2, bytes } => got2.extend(bytes),
            other => panic!("{other:?}"),
        }
    }
    let want1: Vec<u8> = (0..64u8).flat_map(|i| text(MAX_DATA, i)).collect();
    let want2: Vec<u8> = (0..64u8)
        .flat_map(|i| random(MAX_DATA, u64::from(i) + 1))
        .collect();
    assert!(got1 == want1 && got2 == want2, "payload differs");
    let f1 = a.flow_stats()[&1];
    let f2 = a.flow_stats()[&2];
    assert!(
        f1.wire_out * 4 < f1.bytes_out,
        "text: {} of {}",
        f1.wire_out,
        f1.bytes_out
    );
    assert!(
        f2.wire_out <= f2.bytes_out,
        "random inflated: {} of {}",
        f2.wire_out,
        f2.bytes_out
    );
    assert_eq!(b.flow_stats()[&1].bytes_in, f1.bytes_out);
}

#[test]
fn flows_never_share_a_compression_context() {
    // A secret in flow 1 must not make flow 2's identical bytes smaller.
    let secret = text(4000, 42);
    let now = Instant::now();
    let mut alone = Session::new(SessionConfig::default());
    alone.send(
        Msg::Data {
            flow: 2,
            bytes: secret.clone(),
        },
        now,
    );
    let mut shared = Session::new(SessionConfig::default());
    shared.send(
        Msg::Data {
            flow: 1,
            bytes: secret.clone(),
        },
        now,
    );
    shared.send(
        Msg::Data {
            flow: 2,
            bytes: secret,
        },
        now,
    );
    assert_eq!(
        shared.flow_stats()[&2].wire_out,
        alone.flow_stats()[&2].wire_out
    );
}

#[test]
fn a_lost_connection_loses_nothing_after_resume() {
    let (mut a, mut b) = pair();
    let now = Instant::now();
    let mut want = Vec::new();
    for i in 0..50u8 {
        let m = Msg::Data {
            flow: 7,
            bytes: text(3000 + usize::from(i), i),
        };
        want.push(m.clone());
        a.send(m, now);
        if i % 5 == 4 {
            a.flush();
        }
    }
    a.flush();
    // Half of it gets through; the rest dies with the connection.
    let out = a.take_output();
    b.feed(&out[..out.len() / 2]).unwrap();
    a.connection_lost();
    b.connection_lost();
    // New connection: each says what it processed.
    a.resume(b.received()).unwrap();
    b.resume(a.received()).unwrap();
    exchange(&mut a, &mut b);
    assert_eq!(drain(&mut b), want);
    assert!(a.stats().records_retransmitted > 0);
}

#[test]
fn a_record_sent_again_is_acknowledged_again() {
    // b got the record and acked it, but the ack died with the connection
    // and a resumed from an older count: b must ack the copy, or a keeps
    // the record for good (found by the session_resume fuzz target).
    let (mut a, mut b) = pair();
    let now = Instant::now();
    a.send(
        Msg::Data {
            flow: 1,
            bytes: text(5000, 1),
        },
        now,
    );
    a.flush();
    b.feed(&a.take_output()).unwrap();
    assert_eq!(drain(&mut b).len(), 1);
    b.maybe_ack(true);
    let _lost = b.take_output();
    a.connection_lost();
    b.connection_lost();
    a.resume(0).unwrap();
    b.resume(a.received()).unwrap();
    b.feed(&a.take_output()).unwrap();
    assert!(drain(&mut b).is_empty(), "a copy, not delivered twice");
    assert_eq!(b.stats().duplicates, 1);
    b.maybe_ack(false);
    a.feed(&b.take_output()).unwrap();
    assert_eq!(a.replay_bytes(), 0, "the copy's ack empties a's replay");
}

#[test]
fn resuming_from_a_point_no_longer_held_is_an_error() {
    let (mut a, mut b) = pair();
    let now = Instant::now();
    a.send(Msg::Fin { flow: 1 }, now);
    a.flush();
    exchange(&mut a, &mut b);
    b.maybe_ack(true);
    exchange(&mut a, &mut b);
    // a no longer holds record 1; a peer claiming to have seen nothing cannot resume.
    assert!(matches!(
        a.resume(0),
        Err(SessionError::CannotResume { .. })
    ));
}

#[test]
fn garbage_and_lies_are_errors_not_panics() {
    let mut s = Session::new(SessionConfig::default());
    assert!(matches!(
        s.feed(&[0, 0, 0, 3, 1, 2, 3]),
        Err(SessionError::BadLength(3))
    ));
    let mut s = Session::new(SessionConfig::default());
    let mut rec = Vec::new();
    rec.extend_from_slice(&16u32.to_be_bytes());
    rec.extend_from_slice(&5u64.to_be_bytes()); // seq 5 first: a gap
    rec.extend_from_slice(&0u64.to_be_bytes());
    assert!(matches!(
        s.feed(&rec),
        Err(SessionError::Gap { want: 1, got: 5 })
    ));
    let mut s = Session::new(SessionConfig::default());
    let mut rec = Vec::new();
    rec.extend_from_slice(&16u32.to_be_bytes());
    rec.extend_from_slice(&0u64.to_be_bytes());
    rec.extend_from_slice(&9u64.to_be_bytes()); // acks what was never sent
    assert!(matches!(s.feed(&rec), Err(SessionError::BadAck(9))));
    // Corrupt compressed data.
    let mut s = Session::new(SessionConfig::default());
    let mut body = Vec::new();
    Msg::DataZ {
        flow: 1,
        reset: true,
        bytes: vec![1, 2, 3, 4, 5],
    }
    .emit(&mut body);
    let mut rec = Vec::new();
    rec.extend_from_slice(&((16 + body.len()) as u32).to_be_bytes());
    rec.extend_from_slice(&1u64.to_be_bytes());
    rec.extend_from_slice(&0u64.to_be_bytes());
    rec.extend_from_slice(&body);
    // ... fails that flow, both ways, not the link.
    s.feed(&rec).unwrap();
    assert_eq!(drain(&mut s), vec![Msg::Reset { flow: 1 }]);
    assert_eq!(s.stats().flow_errors, 1);
    assert_eq!(s.received(), 1);
    s.flush();
    let mut peer = Session::new(SessionConfig::default());
    peer.next_seq = 2; // as if it had sent record 1
    peer.feed(&s.take_output()).unwrap();
    assert_eq!(drain(&mut peer), vec![Msg::Reset { flow: 1 }]);
}

#[test]
fn a_decompression_bomb_is_refused() {
    // 1 MiB of zeros compresses to a few bytes; one message may only expand to MAX_DATA.
    let z = zcompress(&mut encoder(), &vec![0u8; 1 << 20]).unwrap();
    let mut s = Session::new(SessionConfig::default());
    assert!(s.decompress(1, true, &z, MAX_RECORD_PLAIN).is_none());
}

#[test]
fn the_replay_limit_pushes_back() {
    let mut a = Session::new(SessionConfig {
        replay_limit: 100_000,
        ..Default::default()
    });
    let now = Instant::now();
    let mut n = 0;
    while a.can_send() {
        a.send(
            Msg::Data {
                flow: 1,
                bytes: random(MAX_DATA, n + 1),
            },
            now,
        );
        a.flush();
        n += 1;
        assert!(n < 100, "never pushed back");
    }
    assert!(a.replay_bytes() >= 100_000);
}

#[test]
fn idle_flows_give_their_context_back() {
    let mut a = Session::new(SessionConfig::default());
    let mut b = Session::new(SessionConfig::default());
    let t0 = Instant::now();
    a.send(
        Msg::Data {
            flow: 1,
            bytes: text(5000, 1),
        },
        t0,
    );
    assert_eq!(a.contexts(), 1);
    a.sweep_idle(t0 + IDLE);
    assert_eq!(a.contexts(), 0);
    // The next message starts a fresh stream the peer can follow.
    a.send(
        Msg::Data {
            flow: 1,
            bytes: text(5000, 2),
        },
        t0 + IDLE,
    );
    a.flush();
    exchange(&mut a, &mut b);
    let got = drain(&mut b);
    assert_eq!(
        got,
        vec![
            Msg::Data {
                flow: 1,
                bytes: text(5000, 1)
            },
            Msg::Data {
                flow: 1,
                bytes: text(5000, 2)
            }
        ]
    );
}

/// One record of `msgs` with sequence `seq`, as a peer would send it.
fn record(seq: u64, msgs: &[Msg]) -> Vec<u8> {
    let mut body = Vec::new();
    for m in msgs {
        m.emit(&mut body);
    }
    let mut rec = Vec::new();
    rec.extend_from_slice(&((16 + body.len()) as u32).to_be_bytes());
    rec.extend_from_slice(&seq.to_be_bytes());
    rec.extend_from_slice(&0u64.to_be_bytes());
    rec.extend_from_slice(&body);
    rec
}

#[test]
fn data_for_a_flow_the_receiver_reset_is_skipped_and_the_rest_of_its_record_applies() {
    let (mut host, mut agent) = pair();
    let now = Instant::now();
    // Flow 1's compressed stream starts and reaches the agent.
    host.send(
        Msg::Data {
            flow: 1,
            bytes: text(5000, 1),
        },
        now,
    );
    host.flush();
    exchange(&mut host, &mut agent);
    assert_eq!(drain(&mut agent).len(), 1);
    // The agent resets flow 1 (its resource reset) and forgets it; the
    // host, not knowing yet, sends more of flow 1 and other flows' data.
    agent.send(Msg::Reset { flow: 1 }, now);
    host.send(
        Msg::Data {
            flow: 1,
            bytes: text(5000, 3),
        },
        now,
    );
    host.send(
        Msg::Data {
            flow: 2,
            bytes: text(3000, 4),
        },
        now,
    );
    host.send(Msg::Fin { flow: 2 }, now);
    host.send(
        Msg::Window {
            flow: 1,
            credit: 10,
        },
        now,
    );
    host.flush();
    agent.feed(&host.take_output()).unwrap();
    assert_eq!(
        drain(&mut agent),
        vec![
            Msg::Data {
                flow: 2,
                bytes: text(3000, 4)
            },
            Msg::Fin { flow: 2 }
        ]
    );
    assert_eq!(agent.stats().skipped, 2);
    assert_eq!(agent.received(), 2);
}

#[test]
fn an_invalid_record_is_not_counted_as_received() {
    let mut s = Session::new(SessionConfig::default());
    let mut rec = record(1, &[Msg::Fin { flow: 1 }]);
    rec.extend_from_slice(&[0, 0, 0, 17]);
    rec.extend_from_slice(&2u64.to_be_bytes());
    rec.extend_from_slice(&0u64.to_be_bytes());
    rec.push(0x08); // a frame cut short inside the record
    s.feed(&rec).unwrap();
    assert_eq!(s.poll_msg().unwrap(), Some(Msg::Fin { flow: 1 }));
    assert!(s.poll_msg().is_err());
    assert_eq!(s.received(), 1, "the broken record 2 must be sent again");
}

#[test]
fn both_ends_hold_the_same_contexts_however_many_flows_come_and_go() {
    let (mut a, mut b) = pair();
    let t0 = Instant::now();
    let mut t = t0;
    // Waves of 50 flows, each wave 11 s after the last (so the previous
    // wave's contexts sit idle past IDLE), 200 flows in all; some flows
    // also send data that does not compress, which restarts their stream.
    for wave in 0..4u32 {
        for f in 0..50u32 {
            let flow = wave * 50 + f;
            a.send(
                Msg::Data {
                    flow,
                    bytes: text(2000, flow as u8),
                },
                t,
            );
            if f % 7 == 0 {
                a.set_flow_compression(flow, Compression::Level(1));
                a.send(
                    Msg::Data {
                        flow,
                        bytes: random(300, u64::from(flow) + 1),
                    },
                    t,
                );
                a.send(
                    Msg::Data {
                        flow,
                        bytes: text(2000, 9),
                    },
                    t,
                );
            }
        }
        a.flush();
        exchange(&mut a, &mut b);
        let got = drain(&mut b);
        assert!(got.iter().all(|m| matches!(m, Msg::Data { .. })), "{got:?}");
        assert_eq!(b.stats().flow_errors, 0);
        assert_eq!(a.enc.len(), b.dec.len(), "wave {wave}");
        t += IDLE + Duration::from_secs(1);
        a.sweep_idle(t);
    }
    a.flush();
    exchange(&mut a, &mut b);
    assert_eq!(b.dec.len(), 0, "the receiver frees what the sender freed");
    assert!(b.contexts() <= MAX_CONTEXTS);
}

#[test]
fn a_peer_that_breaks_the_context_limit_fails_one_flow_not_the_link() {
    let mut s = Session::new(SessionConfig::default());
    let mut msgs = Vec::new();
    for flow in 0..(MAX_CONTEXTS as u32 + 1) {
        let z = zcompress(&mut encoder(), &text(1000, 1)).unwrap();
        msgs.push(Msg::DataZ {
            flow,
            reset: true,
            bytes: z,
        });
    }
    s.feed(&record(1, &msgs)).unwrap();
    let got = drain(&mut s);
    assert_eq!(got.len(), MAX_CONTEXTS + 1);
    assert_eq!(
        got[MAX_CONTEXTS],
        Msg::Reset {
            flow: MAX_CONTEXTS as u32
        }
    );
    assert_eq!(s.stats().flow_errors, 1);
}

#[test]
fn empty_data_is_not_sent() {
    // Found by the session_resume fuzz target: the peer refuses an empty
    // Data, and the refused record would come back on every resume.
    let (mut a, mut b) = pair();
    a.send(
        Msg::Data {
            flow: 1,
            bytes: Vec::new(),
        },
        Instant::now(),
    );
    a.send(Msg::Fin { flow: 1 }, Instant::now());
    a.flush();
    exchange(&mut a, &mut b);
    assert_eq!(drain(&mut b), vec![Msg::Fin { flow: 1 }]);
}

#[test]
fn a_decompressed_message_holds_only_its_own_bytes() {
    let (mut a, mut b) = pair();
    a.send(
        Msg::Data {
            flow: 1,
            bytes: text(100, 1),
        },
        Instant::now(),
    );
    a.flush();
    exchange(&mut a, &mut b);
    match b.poll_msg().unwrap() {
        Some(Msg::Data { bytes, .. }) => assert_eq!(bytes.capacity(), 100),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_record_of_tiny_bombs_inflates_to_at_most_its_cap() {
    // 64 KiB of zeros compresses to a few bytes: a hostile peer packs
    // thousands of them (each a new stream) into one 256 KiB record.
    let z = zcompress(&mut encoder(), &[0u8; MAX_DATA]).unwrap();
    let bomb = Msg::DataZ {
        flow: 1,
        reset: true,
        bytes: z,
    };
    let mut one = Vec::new();
    bomb.emit(&mut one);
    let n = (MAX_FRAME_LEN - 64) / one.len();
    let mut s = Session::new(SessionConfig::default());
    s.feed(&record(1, &vec![bomb; n])).unwrap();
    let got = drain(&mut s);
    let plain: usize = got
        .iter()
        .map(|m| match m {
            Msg::Data { bytes, .. } => bytes.len(),
            _ => 0,
        })
        .sum();
    assert!(
        n * MAX_DATA > 100 * MAX_RECORD_PLAIN,
        "a real bomb: {n} messages"
    );
    assert!(plain <= MAX_RECORD_PLAIN, "{plain} bytes");
    assert_eq!(
        plain, MAX_RECORD_PLAIN,
        "the bombs below the cap were delivered"
    );
    assert_eq!(got.last(), Some(&Msg::Reset { flow: 1 }));
    assert!(s.stats().skipped > 0);
}

#[test]
fn records_are_unpacked_one_at_a_time_and_a_sender_never_exceeds_the_cap() {
    let (mut a, mut b) = pair();
    let now = Instant::now();
    // 64 MiB of zeros: legitimate, and very compressible.
    for _ in 0..1024 {
        a.send(
            Msg::Data {
                flow: 1,
                bytes: vec![0u8; MAX_DATA],
            },
            now,
        );
    }
    a.flush();
    let out = a.take_output();
    assert!(
        out.len() < MAX_FRAME_LEN,
        "it all fits in one record's space"
    );
    b.feed(&out).unwrap();
    let held: usize = b
        .inbox
        .iter()
        .map(|m| match m {
            Msg::Data { bytes, .. } => bytes.len(),
            _ => 0,
        })
        .sum();
    assert!(held <= MAX_RECORD_PLAIN, "{held} bytes held at once");
    let mut total = 0;
    while let Some(m) = b.poll_msg().unwrap() {
        let Msg::Data { bytes, .. } = m else {
            panic!("{m:?}")
        };
        assert!(bytes.iter().all(|x| *x == 0));
        total += bytes.len();
    }
    assert_eq!(total, 1024 * MAX_DATA);
    assert_eq!(b.stats().flow_errors, 0);
}

proptest! {
    /// Any messages, any flush points, connections cut at any byte: after
    /// resumes, the peer gets every message exactly once, in order.
    #[test]
    fn resume_survives_cuts_anywhere(
        sizes in proptest::collection::vec(1usize..20_000, 1..40),
        flushes in proptest::collection::vec(any::<bool>(), 40),
        cuts in proptest::collection::vec(0.0f64..1.0, 0..4),
    ) {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        let mut want = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let bytes = if i % 3 == 0 { random(*n, i as u64 + 1) } else { text(*n, i as u8) };
            let m = Msg::Data { flow: (i % 3) as u32, bytes };
            want.push(m.clone());
            a.send(m, now);
            if flushes[i] {
                a.flush();
            }
        }
        a.flush();
        for cut in cuts {
            let out = a.take_output();
            let n = (out.len() as f64 * cut) as usize;
            b.feed(&out[..n]).unwrap();
            a.connection_lost();
            b.connection_lost();
            a.resume(b.received()).unwrap();
            b.resume(a.received()).unwrap();
        }
        exchange(&mut a, &mut b);
        prop_assert_eq!(drain(&mut b), want);
    }
}

#[test]
fn big_payloads_go_out_in_their_own_buffers_and_small_ones_are_packed() {
    let mut a = Session::new(SessionConfig {
        compression: Compression::Off,
        ..SessionConfig::default()
    });
    let big = random(4096, 7);
    let expect_big = big.clone();
    let big_ptr = big.as_ptr();
    // Small, and a big buffer that is mostly empty: both copied into the
    // packed piece, so the replay limit (which counts lengths) holds.
    let mut sparse = Vec::with_capacity(64 * 1024);
    sparse.extend_from_slice(&random(600, 8));
    a.send(
        Msg::Data {
            flow: 1,
            bytes: b"tiny".to_vec(),
        },
        Instant::now(),
    );
    a.send(
        Msg::Data {
            flow: 1,
            bytes: big,
        },
        Instant::now(),
    );
    a.send(
        Msg::Data {
            flow: 1,
            bytes: sparse.clone(),
        },
        Instant::now(),
    );
    a.flush();
    let out = a.take_output_parts();
    let slices = out.slices();
    let own: Vec<&IoSlice> = slices.iter().filter(|s| s.as_ptr() == big_ptr).collect();
    assert_eq!(own.len(), 1, "the big payload is sent from where it was");
    assert_eq!(own[0].len(), expect_big.len());
    assert!(
        slices
            .iter()
            .all(|s| s.len() < 1024 || s.as_ptr() == big_ptr),
        "the sparse buffer was packed: {:?}",
        slices.iter().map(|s| s.len()).collect::<Vec<_>>()
    );
    let mut b = Session::new(SessionConfig::default());
    b.feed(&out.to_vec()).unwrap();
    let got: Vec<Vec<u8>> = drain(&mut b)
        .into_iter()
        .map(|m| match m {
            Msg::Data { bytes, .. } => bytes,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(got, vec![b"tiny".to_vec(), expect_big, sparse]);
}
