//! The agent's per-flow HTTP/IPP rewriting (`http_rewrite::HttpRewriter`)
//! on arbitrary streams, in arbitrary pieces and interleavings. The first
//! byte seeds the piece sizes, which direction each piece goes to and
//! whether IPP bodies are rewritten; the rest is the request stream, then,
//! after a "\n--\n" marker if there is one, the response stream (with no
//! marker, bit 7 of the first byte sends it all one way or the other).
//! Asserts: never a panic or a hang; `held()` never above `MAX_HELD`, and
//! nothing held after both ends; and when neither stream has a "host:"
//! (any case), both come out byte-identical: with no `Host` there is no
//! guest authority, so nothing may change.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netredir_shared::http_rewrite::{HttpRewriter, MAX_HELD};

fn has_host(b: &[u8]) -> bool {
    b.windows(5).any(|w| w.eq_ignore_ascii_case(b"host:"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, rest)) = data.split_first() else {
        return;
    };
    let (req, resp) = match rest.windows(4).position(|w| w == b"\n--\n") {
        Some(i) => (&rest[..i], &rest[i + 4..]),
        None if seed & 0x80 != 0 => (&[][..], rest),
        None => (rest, &[][..]),
    };
    let max = [1, 2, 3, 7, 16, 61, 512, usize::MAX][usize::from(seed & 7)];
    let ipp = seed & 8 != 0;
    let mut rng = u32::from(seed) | 0x9e37_7900;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        rng as usize
    };

    let mut rw = HttpRewriter::new("192.168.1.20:8631", ipp);
    let (mut q, mut s) = (req, resp);
    let (mut qo, mut so) = (Vec::new(), Vec::new());
    while !q.is_empty() || !s.is_empty() {
        let to_req = s.is_empty() || (!q.is_empty() && next() & 1 == 0);
        let side = if to_req { &mut q } else { &mut s };
        let n = if max == usize::MAX {
            side.len()
        } else {
            (1 + next() % max).min(side.len())
        };
        let (piece, after) = side.split_at(n);
        *side = after;
        if to_req {
            rw.request(piece, &mut qo);
        } else {
            rw.response(piece, &mut so);
        }
        assert!(rw.held() <= MAX_HELD, "held {} > {MAX_HELD}", rw.held());
    }
    rw.request_end(&mut qo);
    rw.response_end(&mut so);
    assert_eq!(rw.held(), 0, "held after both ends");
    if !has_host(req) && !has_host(resp) {
        assert!(qo == req, "request stream changed without a Host");
        assert!(so == resp, "response stream changed without a Host");
    }
});
