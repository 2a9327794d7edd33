//! One tunnel connection's plaintext from the peer, through TLS, into a
//! `Link` (userspace/shared/src/link.rs): preamble messages (Hello, Pair,
//! Resume / Welcome, Refused...) followed by session records, written by
//! the peer in fuzzed pieces and delivered in fuzzed reads (several writes
//! in one read, a write cut anywhere), to the host's Link (from an agent)
//! or the agent's Link (from a host). The receiver enters the record
//! stream as the daemons do, as soon as the preamble's last message shows
//! up, or a few reads later. The two TLS ends do a real handshake in
//! memory per input, with identities made once per process. A second mode
//! feeds the raw bytes as ciphertext to a fresh Link, as from a peer that
//! does not speak TLS.
//!
//! Asserts: never a panic; an honest TLS peer never causes a TLS error;
//! and the handoff is exact: the Link returns the same preamble messages
//! (and fails on the same bad one) as one `Decoder` fed the whole stream
//! at once, and the session it hands the rest to yields the same messages
//! and the same error as a `Session` fed the rest in one piece - however
//! the bytes were cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_shared::link::{Link, LinkError};
use netredir_shared::session::{Session, SessionConfig, SessionError};
use netredir_shared::tls::{Fingerprint, HostCheck, Identity, Tls};
use netredir_shared::wire::{Decoder, Msg};
use std::sync::OnceLock;

struct Ids {
    agent: Identity,
    host: Identity,
    host_fp: Fingerprint,
}

/// Both identities, made once per process in a temp dir (then removed).
fn ids() -> &'static Ids {
    static IDS: OnceLock<Ids> = OnceLock::new();
    IDS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("netredir-fuzz-link-{}", std::process::id()));
        let agent =
            Identity::load_or_create(&dir, "agent", "netredir-agent").expect("agent identity");
        let host = Identity::load_or_create(&dir, "host", "netredird").expect("host identity");
        let _ = std::fs::remove_dir_all(&dir);
        let host_fp = host.fingerprint();
        Ids {
            agent,
            host,
            host_fp,
        }
    })
}

fn ends_preamble(m: &Msg) -> bool {
    matches!(
        m,
        Msg::Resume { .. } | Msg::Welcome { .. } | Msg::Refused { .. } | Msg::Later { .. }
    )
}

/// What a receiver makes of a byte stream: preamble messages, whether the
/// preamble failed, whether it ended; then the records' messages and the
/// session's error, if any.
#[derive(Debug, PartialEq, Default)]
struct Outcome {
    preamble: Vec<Msg>,
    preamble_failed: bool,
    preamble_over: bool,
    records: Vec<Msg>,
    error: Option<SessionError>,
}

/// Drains a session's messages into `out`; false if it failed.
fn drain(s: &mut Session, out: &mut Outcome) -> bool {
    for _ in 0..1_000_000 {
        match s.poll_msg() {
            Ok(Some(m)) => out.records.push(m),
            Ok(None) => return true,
            Err(e) => {
                fail(out, e);
                return false;
            }
        }
    }
    panic!("a session yields messages without end");
}

/// Keeps the first error: after one, a poll may well repeat it.
fn fail(out: &mut Outcome, e: SessionError) {
    if out.error.is_none() {
        out.error = Some(e);
    }
}

/// The reference: the whole plaintext at once, through a Decoder and a Session.
fn reference(plain: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    let mut d = Decoder::new();
    d.feed(plain);
    loop {
        match d.next_msg() {
            Ok(Some(m)) => {
                let end = ends_preamble(&m);
                out.preamble.push(m);
                if end {
                    out.preamble_over = true;
                    break;
                }
            }
            Ok(None) => return out,
            Err(_) => {
                out.preamble_failed = true;
                return out;
            }
        }
    }
    let rest = d.take_rest();
    let mut s = Session::new(SessionConfig::default());
    if !rest.is_empty()
        && let Err(e) = s.feed(&rest)
    {
        fail(&mut out, e);
    }
    // As a driver does after an error too: what came before still counts.
    drain(&mut s, &mut out);
    out
}

/// Handshake between the Link under test and the peer's raw TLS.
fn handshake(link: &mut Link, peer: &mut Tls) {
    for _ in 0..10 {
        let (mut up, mut down) = (Vec::new(), Vec::new());
        link.flush(None, &mut up);
        let mut plain = Vec::new();
        peer.feed(&up, &mut plain).expect("peer: honest handshake");
        assert!(plain.is_empty());
        peer.take_ciphertext(&mut down);
        let got = link.receive(&down, None).expect("link: honest handshake");
        assert!(got.is_empty(), "messages during the handshake: {got:?}");
        if up.is_empty() && down.is_empty() && !link.handshaking() && !peer.is_handshaking() {
            return;
        }
    }
    panic!("handshake did not finish");
}

struct Rx {
    link: Link,
    session: Session,
    out: Outcome,
    /// Reads left before entering the records once the preamble ended.
    delay: Option<u8>,
    dead: bool,
}

impl Rx {
    fn receive(&mut self, cipher: &[u8]) {
        if self.dead || cipher.is_empty() {
            return;
        }
        let in_records = self.link.in_records();
        let res = self
            .link
            .receive(cipher, in_records.then_some(&mut self.session));
        match res {
            Ok(msgs) => {
                assert!(
                    msgs.is_empty() || !self.out.preamble_over,
                    "preamble messages after the preamble: {msgs:?}"
                );
                for m in msgs {
                    assert!(
                        !self.out.preamble_over,
                        "{m:?} after the preamble's last message"
                    );
                    if ends_preamble(&m) {
                        self.out.preamble_over = true;
                    }
                    self.out.preamble.push(m);
                }
            }
            Err(LinkError::Wire(_)) => {
                assert!(!in_records);
                self.out.preamble_failed = true;
                self.dead = true;
                return;
            }
            Err(LinkError::Session(e)) => {
                assert!(in_records);
                fail(&mut self.out, e);
                drain(&mut self.session, &mut self.out);
                self.dead = true;
                return;
            }
            Err(LinkError::Tls(e)) => panic!("TLS error from an honest peer: {e}"),
        }
        if in_records {
            if !drain(&mut self.session, &mut self.out) {
                self.dead = true;
            }
        } else if self.out.preamble_over {
            self.maybe_enter();
        }
    }

    fn maybe_enter(&mut self) {
        match self.delay {
            Some(0) => {}
            Some(n) => {
                self.delay = Some(n - 1);
                return;
            }
            None => return,
        }
        self.delay = None;
        if let Err(e) = self.link.enter_records(&mut self.session) {
            let LinkError::Session(e) = e else {
                panic!("enter_records: {e}");
            };
            fail(&mut self.out, e);
            drain(&mut self.session, &mut self.out);
            self.dead = true;
            return;
        }
        assert!(self.link.in_records());
        if !drain(&mut self.session, &mut self.out) {
            self.dead = true;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let ids = ids();
    if flags & 0x80 != 0 {
        // Not TLS at all, or TLS garbage, to a fresh host Link.
        let mut link = Link::new(Tls::server(&ids.host).expect("server"));
        let mut s = Session::new(SessionConfig::default());
        for piece in rest.chunks(usize::from(flags & 0x3f) + 1) {
            let in_records = link.in_records();
            if link.receive(piece, in_records.then_some(&mut s)).is_err() {
                break;
            }
        }
        let mut out = Vec::new();
        link.flush(None, &mut out);
        return;
    }
    let to_host = flags & 1 == 0;
    let (mut link, mut peer) = if to_host {
        (
            Link::new(Tls::server(&ids.host).expect("server")),
            Tls::client(&ids.agent, HostCheck::Pinned(ids.host_fp)).expect("client"),
        )
    } else {
        (
            Link::new(Tls::client(&ids.agent, HostCheck::Pinned(ids.host_fp)).expect("client")),
            Tls::server(&ids.host).expect("server"),
        )
    };
    handshake(&mut link, &mut peer);
    assert!(link.peer().is_some());

    let mut rx = Rx {
        link,
        session: Session::new(SessionConfig::default()),
        out: Outcome::default(),
        delay: Some(flags >> 1 & 3),
        dead: false,
    };
    // Writes: [hdr][len u16][bytes]; hdr bit 0: hold the ciphertext for
    // the next read; bits 1-2: size of the reads it is cut into.
    let mut plain_all = Vec::new();
    let mut held = Vec::new();
    let mut input = rest;
    while input.len() >= 3 {
        let hdr = input[0];
        let n = usize::from(u16::from_be_bytes([input[1], input[2]])).min(input.len() - 3);
        let piece = &input[3..3 + n];
        input = &input[3 + n..];
        plain_all.extend_from_slice(piece);
        peer.write(piece);
        peer.take_ciphertext(&mut held);
        if hdr & 1 == 1 {
            continue;
        }
        let cut = [usize::MAX, 1, 7, 300][usize::from(hdr >> 1 & 3)];
        let wire = std::mem::take(&mut held);
        for chunk in wire.chunks(cut.min(wire.len()).max(1)) {
            rx.receive(chunk);
        }
    }
    // Whatever is left, then the preamble's end if it was still delayed.
    if !held.is_empty() {
        rx.receive(&std::mem::take(&mut held));
    }
    if !rx.dead && rx.out.preamble_over && !rx.link.in_records() {
        rx.delay = Some(0);
        rx.maybe_enter();
    }

    let want = reference(&plain_all);
    if rx.out.preamble_failed {
        // The failing receive's own messages are dropped with it.
        assert!(
            want.preamble_failed,
            "link failed a preamble the decoder takes: {want:?}"
        );
        assert!(
            want.preamble.starts_with(&rx.out.preamble),
            "{:?} vs {:?}",
            rx.out,
            want
        );
        return;
    }
    assert_eq!(rx.out, want, "the link's view differs from the reference");
});
