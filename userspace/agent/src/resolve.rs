//! Names of exported resources, resolved off the event loop.
//!
//! `getaddrinfo` blocks for as long as the client's DNS takes (seconds
//! when a server does not answer); inside the event loop that would stall
//! every flow and the heartbeats. So one worker thread resolves, the loop
//! asks ([`Names::lookup`]) and never waits: an answer is kept for
//! [`TTL`], a failure for [`NEGATIVE_TTL`] (the guest gets "no route to
//! host" meanwhile, as it would from a name that does not resolve), and a
//! stale answer is used while it is refreshed.

use std::net::{IpAddr, ToSocketAddrs};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

/// How long a resolved address is used before it is looked up again.
pub const TTL: Duration = Duration::from_secs(60);
/// How long a name that did not resolve is not asked again.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// What is known of one name.
#[derive(Debug)]
struct Entry {
    host: String,
    addr: Option<IpAddr>,
    /// When the last answer (or failure) came.
    at: Option<Instant>,
    pending: bool,
}

/// The names of the exports, by export index.
pub struct Names {
    entries: Vec<Entry>,
    ask: Sender<(usize, String)>,
    answers: Receiver<(usize, Option<IpAddr>)>,
}

impl Names {
    /// Starts the resolver thread; `initial` holds each export's host and
    /// what resolving it at start gave.
    pub fn new(initial: Vec<(String, Option<IpAddr>)>, now: Instant) -> Self {
        let (ask, questions) = channel::<(usize, String)>();
        let (tell, answers) = channel();
        std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || {
                for (i, host) in questions {
                    if tell.send((i, resolve(&host))).is_err() {
                        return;
                    }
                }
            })
            .expect("cannot start the resolver thread");
        let entries = initial
            .into_iter()
            .map(|(host, addr)| Entry {
                host,
                addr,
                at: Some(now),
                pending: false,
            })
            .collect();
        Self {
            entries,
            ask,
            answers,
        }
    }

    /// The address of export `i` now, without waiting; starts a lookup in
    /// the background when the answer is missing or old.
    pub fn lookup(&mut self, i: usize, now: Instant) -> Option<IpAddr> {
        self.collect(now);
        let e = self.entries.get_mut(i)?;
        if let Ok(ip) = e.host.parse::<IpAddr>() {
            return Some(ip);
        }
        let age = e.at.map(|t| now.saturating_duration_since(t));
        let due = match (e.addr, age) {
            (_, None) => true,
            (Some(_), Some(a)) => a >= TTL,
            (None, Some(a)) => a >= NEGATIVE_TTL,
        };
        if due && !e.pending && self.ask.send((i, e.host.clone())).is_ok() {
            e.pending = true;
        }
        e.addr
    }

    /// Adds a name (a discovered resource's address, known already); its
    /// index, the export's.
    pub fn push(&mut self, host: String, addr: Option<IpAddr>, now: Instant) -> usize {
        self.entries.push(Entry {
            host,
            addr,
            at: Some(now),
            pending: false,
        });
        self.entries.len() - 1
    }

    /// Takes the answers the thread has given.
    pub fn collect(&mut self, now: Instant) {
        while let Ok((i, addr)) = self.answers.try_recv() {
            if let Some(e) = self.entries.get_mut(i) {
                e.pending = false;
                e.at = Some(now);
                match addr {
                    Some(a) => e.addr = Some(a),
                    None if e.addr.is_some() => {
                        tracing::warn!(host = %e.host, "no longer resolves; keeping the last address");
                    }
                    None => {}
                }
            }
        }
    }

    /// How many lookups are under way.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.entries.iter().filter(|e| e.pending).count()
    }
}

/// One blocking lookup: the first address `host` has.
pub fn resolve(host: &str) -> Option<IpAddr> {
    (host, 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut i| i.next())
        .map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_answer(n: &mut Names, now: Instant) {
        let t0 = Instant::now();
        while n.pending() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(30), "no answer");
            std::thread::yield_now();
            n.collect(now);
        }
    }

    #[test]
    fn a_literal_needs_no_lookup_and_a_name_is_looked_up_in_the_background() {
        let t0 = Instant::now();
        let mut n = Names::new(
            vec![("192.0.2.7".into(), None), ("localhost".into(), None)],
            t0,
        );
        assert_eq!(n.lookup(0, t0), Some("192.0.2.7".parse().unwrap()));
        assert_eq!(n.pending(), 0);
        // Failed at start: not asked again before NEGATIVE_TTL.
        assert_eq!(n.lookup(1, t0 + Duration::from_secs(1)), None);
        assert_eq!(n.pending(), 0);
        // Then asked, without waiting for the answer.
        let later = t0 + NEGATIVE_TTL;
        assert_eq!(n.lookup(1, later), None);
        assert_eq!(n.pending(), 1);
        wait_answer(&mut n, later);
        assert!(n.lookup(1, later).is_some_and(|a| a.is_loopback()));
    }

    #[test]
    fn an_old_answer_is_used_while_it_is_refreshed() {
        let t0 = Instant::now();
        let old: IpAddr = "192.0.2.1".parse().unwrap();
        let mut n = Names::new(vec![("localhost".into(), Some(old))], t0);
        assert_eq!(n.lookup(0, t0), Some(old));
        assert_eq!(n.pending(), 0);
        let later = t0 + TTL;
        assert_eq!(n.lookup(0, later), Some(old), "stale, but used");
        assert_eq!(n.pending(), 1);
        wait_answer(&mut n, later);
        assert!(n.lookup(0, later).is_some_and(|a| a.is_loopback()));
    }
}
