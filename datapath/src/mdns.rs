//! The per-VM mDNS responder (RFC 6762, DNS-SD over it by RFC 6763),
//! sans-IO: a guest that browses its link (avahi, CUPS's dnssd backend,
//! Windows, macOS) finds the exported printers with nothing configured.
//!
//! The engine hands it every UDP payload the guest sends to the mDNS group
//! (`224.0.0.251` / `ff02::fb`, port 5353) and sends back what it returns:
//! to the group from port 5353 (every querier on the link learns at
//! once, and a multicast answer is accepted from any source, which an
//! answer from a vIP needs: it is not on the guest's link), or, to a
//! "legacy" querier (a source port other than 5353, RFC 6762 §6.7), to
//! it directly with its ID and question. On attach and whenever the
//! resources change, [`Mdns::announce`] makes the unsolicited answer that
//! tells listening caches, and [`Mdns::goodbye`] the TTL-0 one for what
//! went away.
//!
//! The records are the vDNS's own ([`VDns`]), for the zone `local`:
//! `NAME.local` A/AAAA, and per printer service (`_ipp._tcp`,
//! `_pdl-datastream._tcp`, `_printer._tcp`) the PTR, SRV and TXT. It
//! answers only names it has (mDNS sends no negative answers), never the
//! zone's SOA or browse-domain records (`local.` is nobody's zone), and
//! leaves out answers the querier says it knows (known-answer
//! suppression, §7.1). Wire format by `hickory-proto`, as the vDNS.

use crate::dns::{DnsError, DnsResource, VDns};
use hickory_proto::op::{Header, Message, MessageType, OpCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The mDNS port, source and destination of every multicast answer.
pub const MDNS_PORT: u16 = 5353;
/// The IPv4 mDNS group.
pub const GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
/// The IPv6 mDNS group (link-local scope).
pub const GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb);
/// TTL of records that name a host (A, AAAA, SRV), RFC 6762 §10.
const TTL_HOST: u32 = 120;
/// TTL of the others (PTR, TXT).
const TTL_OTHER: u32 = 4500;
/// The most a legacy (unicast) answer's records may be cached (§6.7).
const TTL_LEGACY: u32 = 10;
/// The largest answer: an Ethernet MTU's worth, no fragments (§17).
const MAX_ANSWER: usize = 1440;

/// Where an answer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// To the group, from port 5353.
    Multicast(Vec<u8>),
    /// To the querier's own address and port (a legacy resolver).
    Unicast(Vec<u8>),
}

/// The responder of one VM.
pub struct Mdns {
    zone: VDns,
}

impl Default for Mdns {
    fn default() -> Self {
        Self::new()
    }
}

impl Mdns {
    /// A responder with no resources yet.
    pub fn new() -> Self {
        Self {
            zone: VDns::new("local").expect("local is a valid zone"),
        }
    }

    /// Replaces the resources (the engine calls this when exports change).
    pub fn set_resources(&mut self, resources: Vec<DnsResource>) {
        self.zone.set_resources(resources);
    }

    /// Answers one packet from the guest to the group, sent from
    /// `src_port`. Ok(None): nothing to say (an answer, or questions about
    /// names not ours); Err: not a DNS query at all.
    pub fn answer(&self, packet: &[u8], src_port: u16) -> Result<Option<Reply>, DnsError> {
        let header = Header::read(&mut BinDecoder::new(packet))
            .map_err(|e| DnsError::Malformed(e.to_string()))?;
        // Answers (another responder's, or our own looped back) are not
        // questions: never answer them.
        if header.metadata.message_type == MessageType::Response {
            return Ok(None);
        }
        if header.metadata.op_code != OpCode::Query {
            return Err(DnsError::NotAQuery {
                opcode: header.metadata.op_code.into(),
            });
        }
        let query = Message::from_vec(packet).map_err(|e| DnsError::Malformed(e.to_string()))?;
        let legacy = src_port != MDNS_PORT;
        // A legacy querier gets its question back: only the first is
        // answered (as the vDNS does), so the answer stays one frame.
        let questions = if legacy {
            &query.queries[..query.queries.len().min(1)]
        } else {
            &query.queries[..]
        };
        let mut answers: Vec<Record> = Vec::new();
        for q in questions {
            if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
                continue;
            }
            let mut qname = q.name().to_lowercase();
            qname.set_fqdn(true);
            let Some(records) = self.zone.records(&qname) else {
                continue;
            };
            let qtype = q.query_type();
            for r in records {
                if !self.serves(r) || !(qtype == RecordType::ANY || r.record_type() == qtype) {
                    continue;
                }
                if known(&query.answers, r) || answers.contains(r) {
                    continue;
                }
                answers.push(r.clone());
            }
        }
        if answers.is_empty() {
            return Ok(None);
        }
        let additionals: Vec<Record> = self
            .zone
            .additionals(&answers)
            .into_iter()
            .filter(|r| !answers.contains(r) && !known(&query.answers, r))
            .collect();
        let mut m = Message::new(0, MessageType::Response, OpCode::Query);
        m.metadata.authoritative = true;
        if legacy {
            // §6.7: its ID and question back, short TTLs, no cache-flush.
            m.metadata.id = query.metadata.id;
            m.queries = questions.to_vec();
        }
        m.answers = answers
            .into_iter()
            .map(|r| mdns_record(r, legacy))
            .collect();
        m.additionals = additionals
            .into_iter()
            .map(|r| mdns_record(r, legacy))
            .collect();
        let bytes = encode(m)?;
        Ok(Some(if legacy {
            Reply::Unicast(bytes)
        } else {
            Reply::Multicast(bytes)
        }))
    }

    /// The unsolicited answers that announce every record (when a guest
    /// may have missed them), in as many packets as it takes.
    pub fn announce(&self) -> Vec<Vec<u8>> {
        packets(self.lacking(None), false)
    }

    /// The unsolicited answers for the records this has and `before` had
    /// not: a printer that came is announced.
    pub fn announce_new(&self, before: &Mdns) -> Vec<Vec<u8>> {
        packets(self.lacking(Some(before)), false)
    }

    /// The goodbyes (TTL 0) for the records `before` had and this has
    /// not: caches forget a printer that went away at once.
    pub fn goodbye(&self, before: &Mdns) -> Vec<Vec<u8>> {
        packets(before.lacking(Some(self)), true)
    }

    /// The records served here that `other` (if any) does not serve.
    fn lacking(&self, other: Option<&Mdns>) -> Vec<Record> {
        self.zone
            .all_records()
            .filter(|r| self.serves(r))
            .filter(|r| {
                other.is_none_or(|o| {
                    o.zone
                        .records(&r.name)
                        .is_none_or(|rs| !rs.iter().any(|x| x.data == r.data))
                })
            })
            .cloned()
            .collect()
    }

    /// Whether `r` is one mDNS answers: not the zone's SOA nor the
    /// unicast browse-domain pointers to it.
    fn serves(&self, r: &Record) -> bool {
        match &r.data {
            RData::SOA(_) => false,
            RData::PTR(p) => p.0 != *self.zone.apex(),
            _ => true,
        }
    }
}

/// Unsolicited answers carrying `records` (TTL 0 for a goodbye), each
/// within an Ethernet frame, in a stable order.
fn packets(records: Vec<Record>, goodbye: bool) -> Vec<Vec<u8>> {
    let mut records: Vec<Record> = records
        .into_iter()
        .map(|r| {
            let mut r = mdns_record(r, false);
            if goodbye {
                r.ttl = 0;
            }
            r
        })
        .collect();
    records.sort_by(|a, b| {
        (a.name.to_ascii(), u16::from(a.record_type()))
            .cmp(&(b.name.to_ascii(), u16::from(b.record_type())))
    });
    let mut out = Vec::new();
    let mut packet: Vec<Record> = Vec::new();
    for r in records {
        packet.push(r);
        if encoded_len(&packet) > MAX_ANSWER && packet.len() > 1 {
            let last = packet.pop().expect("two at least");
            out.extend(encode(response(std::mem::take(&mut packet))).ok());
            packet.push(last);
        }
    }
    if !packet.is_empty() {
        out.extend(encode(response(packet)).ok());
    }
    out
}

/// `r` is in the querier's known answers with at least half its TTL left
/// (§7.1): it has it, no need to send it.
fn known(known: &[Record], r: &Record) -> bool {
    let ttl = ttl_of(r);
    known.iter().any(|k| {
        k.record_type() == r.record_type()
            && k.name == r.name
            && k.data == r.data
            && k.ttl >= ttl / 2
    })
}

fn ttl_of(r: &Record) -> u32 {
    match r.record_type() {
        RecordType::A | RecordType::AAAA | RecordType::SRV => TTL_HOST,
        _ => TTL_OTHER,
    }
}

/// `r` as mDNS sends it: its TTL, and the cache-flush bit on records only
/// we own (all but the shared PTRs of a service type, §10.2).
fn mdns_record(mut r: Record, legacy: bool) -> Record {
    r.ttl = if legacy {
        TTL_LEGACY.min(ttl_of(&r))
    } else {
        ttl_of(&r)
    };
    r.mdns_cache_flush = !legacy && r.record_type() != RecordType::PTR;
    r
}

/// An unsolicited answer carrying `answers`.
fn response(answers: Vec<Record>) -> Message {
    let mut m = Message::new(0, MessageType::Response, OpCode::Query);
    m.metadata.authoritative = true;
    m.answers = answers;
    m
}

fn encoded_len(answers: &[Record]) -> usize {
    response(answers.to_vec())
        .to_vec()
        .map_or(usize::MAX, |b| b.len())
}

/// `m` on the wire, its additional records left out if it would not fit
/// an Ethernet frame (they are a courtesy; the querier asks again).
fn encode(mut m: Message) -> Result<Vec<u8>, DnsError> {
    let to_vec = |m: &Message| m.to_vec().map_err(|e| DnsError::Encode(e.to_string()));
    let bytes = to_vec(&m)?;
    if bytes.len() <= MAX_ANSWER || m.additionals.is_empty() {
        return Ok(bytes);
    }
    m.additionals.clear();
    to_vec(&m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::{A, PTR};

    fn name(s: &str) -> Option<Name> {
        Name::from_ascii(s).ok()
    }

    fn printer() -> DnsResource {
        DnsResource {
            name: "laser".into(),
            v4: Ipv4Addr::new(100, 77, 33, 40),
            v6: Some("fd6e:7264::644d:2128".parse().unwrap()),
            tcp_ports: vec![631, 9100],
            ipp_ports: vec![],
        }
    }

    fn mdns() -> Mdns {
        let mut m = Mdns::new();
        m.set_resources(vec![printer()]);
        m
    }

    fn query(questions: &[(&str, RecordType)], known: Vec<Record>) -> Vec<u8> {
        let mut m = Message::new(0, MessageType::Query, OpCode::Query);
        for (n, t) in questions {
            m.queries.push(Query::query(name(n).unwrap(), *t));
        }
        m.answers = known;
        m.to_vec().unwrap()
    }

    fn multicast(r: Option<Reply>) -> Message {
        match r {
            Some(Reply::Multicast(b)) => Message::from_vec(&b).unwrap(),
            other => panic!("not a multicast answer: {other:?}"),
        }
    }

    fn names(rs: &[Record]) -> Vec<(String, RecordType)> {
        rs.iter()
            .map(|r| (r.name.to_ascii(), r.record_type()))
            .collect()
    }

    #[test]
    fn a_browse_finds_the_printer_with_its_srv_txt_and_addresses() {
        let m = mdns();
        let a = multicast(
            m.answer(
                &query(&[("_ipp._tcp.local.", RecordType::PTR)], vec![]),
                5353,
            )
            .unwrap(),
        );
        assert_eq!(a.metadata.id, 0);
        assert!(a.metadata.authoritative && a.queries.is_empty());
        assert_eq!(
            names(&a.answers),
            vec![("_ipp._tcp.local.".into(), RecordType::PTR)]
        );
        let RData::PTR(PTR(target)) = &a.answers[0].data else {
            panic!()
        };
        assert_eq!(target.to_ascii(), "laser._ipp._tcp.local.");
        assert_eq!(a.answers[0].ttl, TTL_OTHER);
        assert!(!a.answers[0].mdns_cache_flush, "a shared PTR");
        let extra = names(&a.additionals);
        for want in [
            ("laser._ipp._tcp.local.", RecordType::SRV),
            ("laser._ipp._tcp.local.", RecordType::TXT),
            ("laser.local.", RecordType::A),
            ("laser.local.", RecordType::AAAA),
        ] {
            assert!(
                extra.contains(&(want.0.into(), want.1)),
                "{want:?} in {extra:?}"
            );
        }
        let a_rec = a
            .additionals
            .iter()
            .find(|r| r.record_type() == RecordType::A)
            .unwrap();
        assert_eq!(a_rec.data, RData::A(A(printer().v4)));
        assert!(a_rec.mdns_cache_flush && a_rec.ttl == TTL_HOST);
    }

    #[test]
    fn names_not_ours_and_answers_get_no_answer() {
        let m = mdns();
        for q in [
            ("other.local.", RecordType::A),
            ("_http._tcp.local.", RecordType::PTR),
            ("local.", RecordType::SOA),
            ("b._dns-sd._udp.local.", RecordType::PTR),
        ] {
            assert_eq!(m.answer(&query(&[q], vec![]), 5353).unwrap(), None, "{q:?}");
        }
        // An answer packet (another responder's, or ours looped back).
        let announce = &m.announce()[0];
        assert_eq!(m.answer(announce, 5353).unwrap(), None);
        assert!(m.answer(b"\x00\x01", 5353).is_err());
    }

    #[test]
    fn several_questions_are_answered_together_and_known_answers_left_out() {
        let m = mdns();
        let a = multicast(
            m.answer(
                &query(
                    &[
                        ("laser.local.", RecordType::A),
                        ("laser.local.", RecordType::AAAA),
                    ],
                    vec![],
                ),
                5353,
            )
            .unwrap(),
        );
        assert_eq!(a.answers.len(), 2);
        // The querier knows the A record with most of its TTL left.
        let mut knew = Record::from_rdata(
            name("laser.local.").unwrap(),
            TTL_HOST,
            RData::A(A(printer().v4)),
        );
        knew.dns_class = DNSClass::IN;
        let a = m
            .answer(
                &query(&[("laser.local.", RecordType::A)], vec![knew.clone()]),
                5353,
            )
            .unwrap();
        assert_eq!(a, None, "nothing it does not know");
        // With less than half of it left, it gets it again.
        knew.ttl = TTL_HOST / 2 - 1;
        let a = multicast(
            m.answer(&query(&[("laser.local.", RecordType::A)], vec![knew]), 5353)
                .unwrap(),
        );
        assert_eq!(a.answers.len(), 1);
    }

    #[test]
    fn a_legacy_querier_gets_a_unicast_answer_with_its_id_and_question() {
        let m = mdns();
        let mut q = Message::from_vec(&query(&[("laser.local.", RecordType::A)], vec![])).unwrap();
        q.metadata.id = 4242;
        let Some(Reply::Unicast(b)) = m.answer(&q.to_vec().unwrap(), 40000).unwrap() else {
            panic!("not unicast")
        };
        let a = Message::from_vec(&b).unwrap();
        assert_eq!(a.metadata.id, 4242);
        assert_eq!(a.queries.len(), 1);
        assert!(
            a.answers
                .iter()
                .all(|r| r.ttl <= TTL_LEGACY && !r.mdns_cache_flush)
        );
    }

    #[test]
    fn announcements_carry_every_record_and_goodbyes_what_went() {
        let m = mdns();
        let packets = m.announce();
        assert!(!packets.is_empty());
        let all: Vec<Record> = packets
            .iter()
            .flat_map(|p| Message::from_vec(p).unwrap().answers)
            .collect();
        let n = names(&all);
        for want in [
            ("_ipp._tcp.local.", RecordType::PTR),
            ("_pdl-datastream._tcp.local.", RecordType::PTR),
            ("laser._ipp._tcp.local.", RecordType::SRV),
            ("laser.local.", RecordType::A),
        ] {
            assert!(n.contains(&(want.0.into(), want.1)), "{want:?}");
        }
        assert!(!n.iter().any(|(_, t)| *t == RecordType::SOA));
        assert!(packets.iter().all(|p| p.len() <= MAX_ANSWER));
        assert_eq!(Mdns::new().announce(), Vec::<Vec<u8>>::new());
        // The printer goes: goodbyes with TTL 0 for all of its records.
        let gone = Mdns::new().goodbye(&m);
        let bye: Vec<Record> = gone
            .iter()
            .flat_map(|p| Message::from_vec(p).unwrap().answers)
            .collect();
        assert_eq!(bye.len(), all.len());
        assert!(bye.iter().all(|r| r.ttl == 0));
        // Nothing changed: no goodbye, nothing new.
        assert!(mdns().goodbye(&m).is_empty());
        assert!(mdns().announce_new(&m).is_empty());
        // A second printer comes: only its records are announced.
        let mut two = mdns();
        let mut p2 = printer();
        p2.name = "plotter".into();
        p2.v4 = Ipv4Addr::new(100, 77, 9, 9);
        two.set_resources(vec![printer(), p2]);
        let new: Vec<Record> = two
            .announce_new(&m)
            .iter()
            .flat_map(|p| Message::from_vec(p).unwrap().answers)
            .collect();
        assert!(!new.is_empty());
        assert!(
            new.iter().all(|r| r.name.to_ascii().contains("plotter")
                || matches!(&r.data, RData::PTR(PTR(t)) if t.to_ascii().contains("plotter"))),
            "{new:?}"
        );
    }

    #[test]
    fn many_printers_announce_in_packets_that_fit_a_frame() {
        let mut m = Mdns::new();
        m.set_resources(
            (0..40)
                .map(|i| DnsResource {
                    name: format!("printer-{i}"),
                    v4: Ipv4Addr::new(100, 77, 1, i),
                    v6: None,
                    tcp_ports: vec![631, 9100, 515],
                    ipp_ports: vec![],
                })
                .collect(),
        );
        let packets = m.announce();
        assert!(packets.len() > 1);
        assert!(packets.iter().all(|p| p.len() <= MAX_ANSWER));
        let count: usize = packets
            .iter()
            .map(|p| Message::from_vec(p).unwrap().answers.len())
            .sum();
        assert_eq!(count, m.zone.all_records().filter(|r| m.serves(r)).count());
    }
}
