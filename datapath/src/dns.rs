//! The per-VM virtual DNS server ("vDNS"), sans-IO.
//!
//! The engine hands every UDP payload addressed to the DNS address to
//! [`VDns::answer`] and sends back whatever bytes it returns. The vDNS is
//! authoritative for one zone (e.g. `netredir.internal`) and for the reverse
//! names of the resources' virtual IPs, and refuses everything else: it is
//! not a recursive resolver.
//!
//! In the zone, each resource `<name>` has `A`/`AAAA` records, and each
//! printer (a resource exporting 631, 9100 or 515) is advertised with
//! DNS-SD (RFC 6763) so a guest browsing the zone finds it: browse-domain
//! PTRs, `_services._dns-sd._udp`, a PTR per service type, and per instance
//! an SRV and a TXT record.
//!
//! All DNS wire format is parsed and built with `hickory-proto`. The zone is
//! precomputed whenever the resources change, so answering is a map lookup.
//! Answers respect the UDP size limit (512 bytes, or the client's EDNS
//! payload size up to 1232): additional records are dropped first, then the
//! answers, with TC set.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Label, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// TTL of every record we serve, and the SOA minimum (negative-caching TTL).
const TTL: u32 = 30;
/// The largest response to a query without EDNS (RFC 1035).
const PLAIN_UDP_LIMIT: usize = 512;
/// The largest response we send with EDNS, whatever the client offers
/// (the DNS flag day 2020 size: no IP fragmentation on common paths).
const EDNS_LIMIT: u16 = 1232;
/// Smallest wire size of a question: root name (1) + type (2) + class (2).
const MIN_QUESTION_LEN: usize = 5;
/// Smallest wire size of a record: root name (1) + type, class, TTL, rdlength (10).
const MIN_RECORD_LEN: usize = 11;

/// A DNS-SD service type under which printers are advertised.
struct PrintService {
    /// The TCP port that makes a resource offer this service.
    port: u16,
    /// The service label (`_ipp` in `_ipp._tcp`).
    label: &'static str,
    /// IPP gets the IPP-specific TXT keys and the `_universal` subtype.
    ipp: bool,
}

/// The printer services, in the order they are listed in `_services._dns-sd._udp`.
const PRINT_SERVICES: [PrintService; 3] = [
    PrintService {
        port: 631,
        label: "_ipp",
        ipp: true,
    },
    PrintService {
        port: 9100,
        label: "_pdl-datastream",
        ipp: false,
    },
    PrintService {
        port: 515,
        label: "_printer",
        ipp: false,
    },
];

/// The document formats advertised in the IPP TXT record's `pdl` key.
const IPP_PDL: &str = "application/octet-stream,application/pdf,image/pwg-raster";

/// One resource as the guest sees it in DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsResource {
    /// Its DNS label (e.g. "printer"), so the guest finds it as `<name>.<zone>`.
    pub name: String,
    /// Its virtual IPv4 address, served as the `A` record and its reverse PTR.
    pub v4: Ipv4Addr,
    /// Its virtual IPv6 address, if any, served as `AAAA` and its reverse PTR.
    pub v6: Option<Ipv6Addr>,
    /// TCP ports; a printer is one that exports 631 (IPP), 9100 (raw/JetDirect) or 515 (LPD).
    pub tcp_ports: Vec<u16>,
    /// TCP ports that carry IPP besides 631 (an export's `/ipp` marks):
    /// the first is the one `_ipp._tcp` points at when 631 is not there.
    pub ipp_ports: Vec<u16>,
}

impl DnsResource {
    /// The port of `service` on this resource, if it offers it.
    fn port_of(&self, service: &PrintService) -> Option<u16> {
        if self.tcp_ports.contains(&service.port) {
            return Some(service.port);
        }
        if service.ipp {
            return self
                .ipp_ports
                .iter()
                .copied()
                .find(|p| self.tcp_ports.contains(p));
        }
        None
    }
}

/// Why a query got no answer at all (counted by the engine).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The payload could not be parsed as a DNS message, so nothing can be echoed back.
    #[error("malformed DNS message: {0}")]
    Malformed(String),
    /// The message is not a standard query (its opcode is not QUERY), which the vDNS does not serve.
    #[error("not a standard DNS query (opcode {opcode})")]
    NotAQuery {
        /// The opcode the message carried.
        opcode: u8,
    },
    /// The zone given to [`VDns::new`] is not a usable domain name, so no vDNS can serve it.
    #[error("invalid DNS zone {zone:?}: {reason}")]
    InvalidZone {
        /// The zone as given.
        zone: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The response could not be encoded (a bug, not the guest's fault), so nothing is sent.
    #[error("could not encode the DNS response: {0}")]
    Encode(String),
}

/// The vDNS of one VM.
pub struct VDns {
    /// The zone apex, lowercase and fully qualified.
    zone: Name,
    /// The zone's SOA record, for SOA answers and negative answers.
    soa: Record,
    /// Every name we are authoritative for and its records. Empty
    /// non-terminals inside the zone are present with no records, so they
    /// answer NODATA rather than NXDOMAIN (RFC 8020).
    names: HashMap<Name, Vec<Record>>,
}

impl VDns {
    /// A vDNS answering for `zone` (e.g. "netredir.internal"); case-insensitive; trailing dot optional.
    pub fn new(zone: &str) -> Result<Self, DnsError> {
        let invalid = |reason: String| DnsError::InvalidZone {
            zone: zone.to_owned(),
            reason,
        };
        let mut apex = Name::from_ascii(zone)
            .map_err(|e| invalid(e.to_string()))?
            .to_lowercase();
        apex.set_fqdn(true);
        if apex.is_root() {
            return Err(invalid("the root zone would capture every name".to_owned()));
        }
        let mname = subname(&apex, &["ns"]).map_err(&invalid)?;
        let rname = subname(&apex, &["hostmaster"]).map_err(&invalid)?;
        let soa = Record::from_rdata(
            apex.clone(),
            TTL,
            RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, TTL)),
        );
        let mut vdns = Self {
            zone: apex,
            soa,
            names: HashMap::new(),
        };
        vdns.set_resources(Vec::new());
        Ok(vdns)
    }

    /// Replaces the resource list (the engine calls this when exports change).
    pub fn set_resources(&mut self, resources: Vec<DnsResource>) {
        let mut names: HashMap<Name, Vec<Record>> = HashMap::new();
        let mut add = |record: Record| names.entry(record.name.clone()).or_default().push(record);
        let zone = &self.zone;

        add(self.soa.clone());
        for browse in ["b", "lb"] {
            if let Ok(owner) = subname(zone, &[browse, "_dns-sd", "_udp"]) {
                add(ptr(owner, zone.clone()));
            }
        }

        let mut seen = HashSet::new();
        let mut services_present = [false; PRINT_SERVICES.len()];
        for resource in &resources {
            // A name that is not one plain label (or repeats an earlier
            // one) cannot be served unambiguously: first valid one wins.
            let Some(label) = host_label(&resource.name) else {
                continue;
            };
            if !seen.insert(label.clone()) {
                continue;
            }
            let Ok(host) = subname(zone, &[&label]) else {
                continue;
            };
            add(Record::from_rdata(
                host.clone(),
                TTL,
                RData::A(A(resource.v4)),
            ));
            add(ptr(fqdn(Name::from(resource.v4)), host.clone()));
            if let Some(v6) = resource.v6 {
                add(Record::from_rdata(host.clone(), TTL, RData::AAAA(AAAA(v6))));
                add(ptr(fqdn(Name::from(v6)), host.clone()));
            }
            for (service, present) in PRINT_SERVICES.iter().zip(&mut services_present) {
                let Some(port) = resource.port_of(service) else {
                    continue;
                };
                let (Ok(service_type), Ok(instance)) = (
                    subname(zone, &[service.label, "_tcp"]),
                    subname(zone, &[&label, service.label, "_tcp"]),
                ) else {
                    continue;
                };
                *present = true;
                add(ptr(service_type, instance.clone()));
                if service.ipp
                    && let Ok(universal) = subname(zone, &["_universal", "_sub", "_ipp", "_tcp"])
                {
                    add(ptr(universal, instance.clone()));
                }
                add(Record::from_rdata(
                    instance.clone(),
                    TTL,
                    RData::SRV(SRV::new(0, 0, port, host.clone())),
                ));
                let mut txt = vec!["txtvers=1".to_owned(), "qtotal=1".to_owned()];
                if service.ipp {
                    txt.push("rp=ipp/print".to_owned());
                }
                txt.push(format!("ty={label}"));
                if service.ipp {
                    txt.push(format!("pdl={IPP_PDL}"));
                }
                add(Record::from_rdata(instance, TTL, RData::TXT(TXT::new(txt))));
            }
        }
        if let Ok(services) = subname(zone, &["_services", "_dns-sd", "_udp"]) {
            for (service, _) in PRINT_SERVICES
                .iter()
                .zip(services_present)
                .filter(|(_, present)| *present)
            {
                if let Ok(service_type) = subname(zone, &[service.label, "_tcp"]) {
                    add(ptr(services.clone(), service_type));
                }
            }
        }

        // Empty non-terminals: every in-zone ancestor of an owner name exists.
        let owners: Vec<Name> = names.keys().cloned().collect();
        for owner in owners {
            let mut ancestor = owner.base_name();
            while ancestor != *zone && zone.zone_of(&ancestor) {
                names.entry(ancestor.clone()).or_default();
                ancestor = ancestor.base_name();
            }
        }
        self.names = names;
    }

    /// Answers one query (a UDP payload). Ok(Some(bytes)) = the response payload; Ok(None) = nothing to send (e.g. it was a response); Err = malformed, nothing sent.
    pub fn answer(&self, query: &[u8]) -> Result<Option<Vec<u8>>, DnsError> {
        let header = Header::read(&mut BinDecoder::new(query))
            .map_err(|e| DnsError::Malformed(e.to_string()))?;
        // Never answer a response: two responders must not ping-pong.
        if header.metadata.message_type == MessageType::Response {
            return Ok(None);
        }
        if header.metadata.op_code != OpCode::Query {
            return Err(DnsError::NotAQuery {
                opcode: header.metadata.op_code.into(),
            });
        }
        // Counts that cannot fit in the payload are rejected before the
        // decoder reserves room for them.
        let counts = header.counts;
        let records = usize::from(counts.answers)
            + usize::from(counts.authorities)
            + usize::from(counts.additionals);
        let least = 12 + usize::from(counts.queries) * MIN_QUESTION_LEN + records * MIN_RECORD_LEN;
        if least > query.len() {
            return Err(DnsError::Malformed(format!(
                "header counts need at least {least} bytes, the message has {}",
                query.len()
            )));
        }
        let request = Message::from_vec(query).map_err(|e| DnsError::Malformed(e.to_string()))?;

        let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
        response.metadata = Metadata::response_from_request(&request.metadata);
        response.metadata.recursion_available = false;
        let mut limit = PLAIN_UDP_LIMIT;
        if let Some(edns) = &request.edns {
            limit = usize::from(edns.max_payload().clamp(PLAIN_UDP_LIMIT as u16, EDNS_LIMIT));
            let mut ours = Edns::new();
            ours.set_max_payload(EDNS_LIMIT).set_version(0);
            response.edns = Some(ours);
        }
        // Multiple questions: only the first is answered (and echoed).
        let Some(question) = request.queries.first() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return encode(response, limit);
        };
        response.queries.push(question.clone());
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            response.metadata.response_code = ResponseCode::BADVERS;
            return encode(response, limit);
        }
        self.resolve(question, &mut response);
        encode(response, limit)
    }

    /// The records of `name` (lowercase, fully qualified), if it exists
    /// here: what the mDNS responder answers from.
    pub(crate) fn records(&self, name: &Name) -> Option<&[Record]> {
        self.names.get(name).map(Vec::as_slice)
    }

    /// Every record of the zone, in no particular order: what the mDNS
    /// responder announces.
    pub(crate) fn all_records(&self) -> impl Iterator<Item = &Record> {
        self.names.values().flatten()
    }

    /// The zone's apex (for mDNS, `local.`).
    pub(crate) fn apex(&self) -> &Name {
        &self.zone
    }

    /// Fills in `response` (code, AA, sections) for one question.
    fn resolve(&self, question: &Query, response: &mut Message) {
        let mut qname = question.name().clone();
        qname.set_fqdn(true);
        let in_zone = self.zone.zone_of(&qname);
        let records = self.names.get(&qname);
        let class_ok = matches!(question.query_class(), DNSClass::IN | DNSClass::ANY);
        if !class_ok || (!in_zone && records.is_none()) {
            response.metadata.response_code = ResponseCode::Refused;
            return;
        }
        let qtype = question.query_type();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // Zone transfers are TCP-only and not offered anyway.
            response.metadata.response_code = ResponseCode::NotImp;
            return;
        }
        response.metadata.authoritative = true;
        let Some(records) = records else {
            response.metadata.response_code = ResponseCode::NXDomain;
            response.authorities.push(self.soa.clone());
            return;
        };
        response.answers = records
            .iter()
            .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
            .cloned()
            .collect();
        if response.answers.is_empty() {
            // NODATA; the SOA lets the guest cache it (RFC 2308).
            if in_zone {
                response.authorities.push(self.soa.clone());
            }
            return;
        }
        response.additionals = self.additionals(&response.answers);
    }

    /// The additional records for `answers`: for a PTR to a service
    /// instance, its SRV and TXT (RFC 6763 §12.1); for every SRV, the
    /// target's addresses.
    pub(crate) fn additionals(&self, answers: &[Record]) -> Vec<Record> {
        let mut out = Vec::new();
        let mut instances_done = HashSet::new();
        let mut hosts_done = HashSet::new();
        let mut srv_targets = Vec::new();
        for answer in answers {
            match &answer.data {
                RData::PTR(PTR(target)) => {
                    let Some(records) = self.names.get(target) else {
                        continue;
                    };
                    if !records.iter().any(|r| r.record_type() == RecordType::SRV)
                        || !instances_done.insert(target)
                    {
                        continue;
                    }
                    for record in records {
                        match &record.data {
                            RData::SRV(srv) => {
                                srv_targets.push(&srv.target);
                                out.push(record.clone());
                            }
                            RData::TXT(_) => out.push(record.clone()),
                            _ => {}
                        }
                    }
                }
                RData::SRV(srv) => srv_targets.push(&srv.target),
                _ => {}
            }
        }
        for target in srv_targets {
            if !hosts_done.insert(target) {
                continue;
            }
            if let Some(records) = self.names.get(target) {
                out.extend(
                    records
                        .iter()
                        .filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
                        .cloned(),
                );
            }
        }
        out
    }
}

/// Encodes `response` within `limit` bytes: drops the additional section
/// first (no TC needed, RFC 2181 §9), then the answers and authorities with
/// TC set. The header, question and OPT always fit.
fn encode(mut response: Message, limit: usize) -> Result<Option<Vec<u8>>, DnsError> {
    let to_vec = |m: &Message| m.to_vec().map_err(|e| DnsError::Encode(e.to_string()));
    let bytes = to_vec(&response)?;
    if bytes.len() <= limit {
        return Ok(Some(bytes));
    }
    if !response.additionals.is_empty() {
        response.additionals.clear();
        let bytes = to_vec(&response)?;
        if bytes.len() <= limit {
            return Ok(Some(bytes));
        }
    }
    response.answers.clear();
    response.authorities.clear();
    response.metadata.truncation = true;
    to_vec(&response).map(Some)
}

/// `labels` (leftmost first) prepended to `zone`.
fn subname(zone: &Name, labels: &[&str]) -> Result<Name, String> {
    labels.iter().rev().try_fold(zone.clone(), |name, label| {
        Label::from_ascii(label)
            .and_then(|label| name.prepend_label(label))
            .map_err(|e| e.to_string())
    })
}

/// The resource name as a lowercase LDH label, or None if it is not one.
fn host_label(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let ok = (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-');
    ok.then(|| name.to_ascii_lowercase())
}

/// `name` marked fully qualified, as every owner name in the map is.
fn fqdn(mut name: Name) -> Name {
    name.set_fqdn(true);
    name
}

/// A PTR record `owner` → `target`.
fn ptr(owner: Name, target: Name) -> Record {
    Record::from_rdata(owner, TTL, RData::PTR(PTR(target)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ZONE: &str = "netredir.internal";

    fn printer() -> DnsResource {
        DnsResource {
            name: "printer".to_owned(),
            v4: Ipv4Addr::new(100, 77, 4, 181),
            v6: Some("fd00:77::4:b5".parse().unwrap()),
            tcp_ports: vec![631, 9100],
            ipp_ports: vec![],
        }
    }

    fn nas() -> DnsResource {
        DnsResource {
            name: "nas".to_owned(),
            v4: Ipv4Addr::new(100, 77, 9, 2),
            v6: None,
            tcp_ports: vec![445],
            ipp_ports: vec![],
        }
    }

    fn vdns() -> VDns {
        let mut dns = VDns::new(ZONE).unwrap();
        dns.set_resources(vec![printer(), nas()]);
        dns
    }

    fn query_msg(name: &str, rtype: RecordType) -> Message {
        let mut msg = Message::new(0xbeef, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        msg
    }

    fn query(name: &str, rtype: RecordType) -> Vec<u8> {
        query_msg(name, rtype).to_vec().unwrap()
    }

    fn ask_bytes(dns: &VDns, bytes: &[u8]) -> Message {
        let out = dns.answer(bytes).unwrap().expect("a response");
        Message::from_vec(&out).unwrap()
    }

    fn ask(dns: &VDns, name: &str, rtype: RecordType) -> Message {
        let response = ask_bytes(dns, &query(name, rtype));
        assert_eq!(response.metadata.id, 0xbeef);
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert!(response.metadata.recursion_desired, "RD is echoed");
        assert!(!response.metadata.recursion_available);
        assert_eq!(response.queries.len(), 1);
        assert_eq!(response.queries[0].name(), &Name::from_ascii(name).unwrap());
        response
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn ptr_targets(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(PTR(target)) => Some(target.to_ascii()),
                _ => None,
            })
            .collect()
    }

    fn assert_soa_authority(response: &Message) {
        assert_eq!(response.authorities.len(), 1);
        let RData::SOA(soa) = &response.authorities[0].data else {
            panic!("authority is not an SOA: {:?}", response.authorities);
        };
        assert_eq!(response.authorities[0].name, name("netredir.internal."));
        assert_eq!(soa.mname, name("ns.netredir.internal."));
        assert_eq!(soa.rname, name("hostmaster.netredir.internal."));
        assert_eq!(soa.serial, 1);
        assert_eq!(soa.minimum, 30);
    }

    #[test]
    fn a_and_aaaa_hit() {
        let dns = vdns();
        let r = ask(&dns, "printer.netredir.internal.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(
            r.answers[0].data,
            RData::A(A(Ipv4Addr::new(100, 77, 4, 181)))
        );
        assert_eq!(r.answers[0].ttl, 30);

        let r = ask(&dns, "printer.netredir.internal.", RecordType::AAAA);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(
            r.answers[0].data,
            RData::AAAA(AAAA("fd00:77::4:b5".parse().unwrap()))
        );
    }

    #[test]
    fn aaaa_without_v6_is_nodata() {
        let dns = vdns();
        let r = ask(&dns, "nas.netredir.internal.", RecordType::AAAA);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());
        assert_soa_authority(&r);
        // Other types for an existing name: NODATA too.
        let r = ask(&dns, "nas.netredir.internal.", RecordType::MX);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn unknown_name_is_nxdomain_with_soa() {
        let dns = vdns();
        let r = ask(&dns, "scanner.netredir.internal.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());
        assert_soa_authority(&r);
    }

    #[test]
    fn apex_soa_and_empty_non_terminals() {
        let dns = vdns();
        let r = ask(&dns, "netredir.internal.", RecordType::SOA);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert!(matches!(r.answers[0].data, RData::SOA(_)));
        let r = ask(&dns, "netredir.internal.", RecordType::NS);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        // `_tcp.<zone>` holds `_ipp._tcp`: it exists without records.
        let r = ask(&dns, "_tcp.netredir.internal.", RecordType::PTR);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        // No LPD printer: `_printer._tcp` does not exist.
        let r = ask(&dns, "_printer._tcp.netredir.internal.", RecordType::PTR);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn outside_the_zone_is_refused() {
        let dns = vdns();
        for qname in ["example.com.", "internal.", "8.8.8.8.in-addr.arpa."] {
            let r = ask(&dns, qname, RecordType::A);
            assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{qname}");
            assert!(!r.metadata.authoritative);
            assert!(r.answers.is_empty() && r.authorities.is_empty());
        }
    }

    #[test]
    fn ptr_v4_and_v6() {
        let dns = vdns();
        let r = ask(&dns, "181.4.77.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(ptr_targets(&r.answers), ["printer.netredir.internal."]);

        let v6: Ipv6Addr = "fd00:77::4:b5".parse().unwrap();
        let nibbles: String = v6
            .octets()
            .iter()
            .rev()
            .map(|b| format!("{:x}.{:x}.", b & 0xf, b >> 4))
            .collect();
        let r = ask(&dns, &format!("{nibbles}ip6.arpa."), RecordType::PTR);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(ptr_targets(&r.answers), ["printer.netredir.internal."]);

        // The name is checked, not just its shape.
        let r = ask(&dns, "182.4.77.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn ipp_on_a_port_of_its_own_is_advertised_there() {
        let mut dns = VDns::new(ZONE).unwrap();
        dns.set_resources(vec![DnsResource {
            name: "laser".into(),
            tcp_ports: vec![8631, 9100],
            ipp_ports: vec![8631],
            ..printer()
        }]);
        let r = ask(&dns, &format!("laser._ipp._tcp.{ZONE}."), RecordType::SRV);
        let RData::SRV(srv) = &r.answers[0].data else {
            panic!("not an SRV: {:?}", r.answers);
        };
        assert_eq!(srv.port, 8631);
        // A mark on a port it does not export is no service.
        dns.set_resources(vec![DnsResource {
            name: "laser".into(),
            tcp_ports: vec![9100],
            ipp_ports: vec![8631],
            ..printer()
        }]);
        let r = ask(&dns, &format!("_ipp._tcp.{ZONE}."), RecordType::PTR);
        assert!(r.answers.is_empty(), "{:?}", r.answers);
    }

    #[test]
    fn dns_sd_browse_chain() {
        let dns = vdns();
        for browse in ["b", "lb"] {
            let r = ask(
                &dns,
                &format!("{browse}._dns-sd._udp.{ZONE}."),
                RecordType::PTR,
            );
            assert_eq!(ptr_targets(&r.answers), ["netredir.internal."]);
        }

        let r = ask(
            &dns,
            &format!("_services._dns-sd._udp.{ZONE}."),
            RecordType::PTR,
        );
        assert_eq!(
            ptr_targets(&r.answers),
            [
                "_ipp._tcp.netredir.internal.",
                "_pdl-datastream._tcp.netredir.internal."
            ]
        );

        for service_type in ["_ipp._tcp", "_universal._sub._ipp._tcp"] {
            let r = ask(&dns, &format!("{service_type}.{ZONE}."), RecordType::PTR);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert_eq!(
                ptr_targets(&r.answers),
                ["printer._ipp._tcp.netredir.internal."]
            );
            let types: Vec<_> = r.additionals.iter().map(Record::record_type).collect();
            assert_eq!(
                types,
                [
                    RecordType::SRV,
                    RecordType::TXT,
                    RecordType::A,
                    RecordType::AAAA
                ]
            );
        }
        let r = ask(
            &dns,
            &format!("_pdl-datastream._tcp.{ZONE}."),
            RecordType::PTR,
        );
        assert_eq!(
            ptr_targets(&r.answers),
            ["printer._pdl-datastream._tcp.netredir.internal."]
        );

        let r = ask(&dns, &format!("printer._ipp._tcp.{ZONE}."), RecordType::SRV);
        assert_eq!(r.answers.len(), 1);
        let RData::SRV(srv) = &r.answers[0].data else {
            panic!("not an SRV: {:?}", r.answers);
        };
        assert_eq!((srv.priority, srv.weight, srv.port), (0, 0, 631));
        assert_eq!(srv.target, name("printer.netredir.internal."));
        assert!(
            r.additionals.iter().any(|rec| rec.name == srv.target
                && rec.data == RData::A(A(Ipv4Addr::new(100, 77, 4, 181))))
        );

        let r = ask(&dns, &format!("printer._ipp._tcp.{ZONE}."), RecordType::TXT);
        assert_eq!(r.answers.len(), 1);
        let RData::TXT(txt) = &r.answers[0].data else {
            panic!("not a TXT: {:?}", r.answers);
        };
        let strings: Vec<&[u8]> = txt.txt_data.iter().map(|s| &s[..]).collect();
        assert_eq!(strings[0], b"txtvers=1");
        assert!(strings.contains(&&b"rp=ipp/print"[..]));
        assert!(strings.contains(&&b"ty=printer"[..]));
        assert!(strings.contains(&&b"qtotal=1"[..]));

        let r = ask(
            &dns,
            &format!("printer._pdl-datastream._tcp.{ZONE}."),
            RecordType::TXT,
        );
        let RData::TXT(txt) = &r.answers[0].data else {
            panic!("not a TXT: {:?}", r.answers);
        };
        assert_eq!(txt.txt_data.len(), 3);
        assert!(!txt.txt_data.iter().any(|s| s.starts_with(b"rp=")));
    }

    #[test]
    fn names_are_case_insensitive() {
        let dns = vdns();
        let r = ask(&dns, "PRINTER.NetRedir.Internal.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        let dns = VDns::new("NetRedir.INTERNAL.").unwrap();
        let r = ask(&dns, "netredir.internal.", RecordType::SOA);
        assert_eq!(r.answers.len(), 1);
    }

    #[test]
    fn invalid_zone_and_resources() {
        assert!(matches!(VDns::new(""), Err(DnsError::InvalidZone { .. })));
        assert!(matches!(VDns::new("."), Err(DnsError::InvalidZone { .. })));
        let mut dns = VDns::new(ZONE).unwrap();
        let bad = |n: &str| DnsResource {
            name: n.to_owned(),
            ..printer()
        };
        dns.set_resources(vec![
            bad("a.b"),
            bad(""),
            bad("-x"),
            bad(&"x".repeat(64)),
            bad("_ipp"),
        ]);
        let r = ask(
            &dns,
            &format!("_services._dns-sd._udp.{ZONE}."),
            RecordType::PTR,
        );
        assert!(r.answers.is_empty(), "{:?}", r.answers);
        let r = ask(&dns, &format!("b.{ZONE}."), RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn garbage_and_truncated_queries_are_errors() {
        let dns = vdns();
        assert!(matches!(dns.answer(&[]), Err(DnsError::Malformed(_))));
        assert!(matches!(dns.answer(&[0; 11]), Err(DnsError::Malformed(_))));
        // A header that promises 65535 questions in 12 bytes.
        let lie = [0, 1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
        assert!(matches!(dns.answer(&lie), Err(DnsError::Malformed(_))));

        let mut msg = query_msg("printer._ipp._tcp.netredir.internal.", RecordType::SRV);
        msg.set_edns(Edns::new());
        let full = msg.to_vec().unwrap();
        assert!(dns.answer(&full).unwrap().is_some());
        for len in 0..full.len() {
            assert!(
                matches!(dns.answer(&full[..len]), Err(DnsError::Malformed(_))),
                "prefix of {len} bytes"
            );
        }
    }

    /// Everything answered must be a well-formed, bounded response.
    fn check_any_input(dns: &VDns, bytes: &[u8]) {
        if let Ok(Some(out)) = dns.answer(bytes) {
            assert!(out.len() <= usize::from(EDNS_LIMIT), "{} bytes", out.len());
            let response = Message::from_vec(&out).expect("our response decodes");
            assert_eq!(response.metadata.message_type, MessageType::Response);
            assert_eq!(&out[..2], &bytes[..2], "ID echoed");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let dns = vdns();
        let seeds = [
            query("printer.netredir.internal.", RecordType::A),
            query("_ipp._tcp.netredir.internal.", RecordType::PTR),
            query("181.4.77.100.in-addr.arpa.", RecordType::PTR),
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut answered = 0;
        let mut errors = 0;
        for i in 0..20_000 {
            let bytes: Vec<u8> = if i % 2 == 0 {
                let len = (next() % 300) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                // Mutate a valid query: reaches the code past the decoder.
                let mut bytes = seeds[i % seeds.len()].clone();
                for _ in 0..=(next() % 3) {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] ^= 1 << (next() % 8);
                }
                bytes[2] &= 0x7f; // keep it a query
                bytes
            };
            match dns.answer(&bytes) {
                Ok(Some(_)) => answered += 1,
                Err(_) => errors += 1,
                Ok(None) => {}
            }
            check_any_input(&dns, &bytes);
        }
        assert!(
            answered > 100 && errors > 100,
            "{answered} answered, {errors} errors"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            check_any_input(&vdns(), &bytes);
        }
    }

    #[test]
    fn response_input_is_ignored() {
        let dns = vdns();
        let mut msg = query_msg("printer.netredir.internal.", RecordType::A);
        msg.metadata.message_type = MessageType::Response;
        assert_eq!(dns.answer(&msg.to_vec().unwrap()), Ok(None));
        // Our own answer fed back is not answered either.
        let out = dns
            .answer(&query("printer.netredir.internal.", RecordType::A))
            .unwrap()
            .unwrap();
        assert_eq!(dns.answer(&out), Ok(None));
    }

    #[test]
    fn other_opcodes_and_empty_questions() {
        let dns = vdns();
        let mut msg = query_msg("netredir.internal.", RecordType::SOA);
        msg.metadata.op_code = OpCode::Update;
        assert_eq!(
            dns.answer(&msg.to_vec().unwrap()),
            Err(DnsError::NotAQuery { opcode: 5 })
        );

        let empty = Message::new(7, MessageType::Query, OpCode::Query);
        let r = ask_bytes(&dns, &empty.to_vec().unwrap());
        assert_eq!(r.metadata.id, 7);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        assert!(r.queries.is_empty());

        let mut two = query_msg("printer.netredir.internal.", RecordType::A);
        two.add_query(Query::query(name("example.com."), RecordType::A));
        let r = ask_bytes(&dns, &two.to_vec().unwrap());
        assert_eq!(r.queries.len(), 1);
        assert_eq!(r.answers.len(), 1);
    }

    #[test]
    fn edns_is_echoed_and_bad_version_refused() {
        let dns = vdns();
        let mut msg = query_msg("printer.netredir.internal.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        msg.set_edns(edns.clone());
        let r = ask_bytes(&dns, &msg.to_vec().unwrap());
        assert_eq!(r.edns.as_ref().map(Edns::max_payload), Some(EDNS_LIMIT));
        assert_eq!(r.answers.len(), 1);

        edns.set_version(1);
        msg.set_edns(edns);
        let r = ask_bytes(&dns, &msg.to_vec().unwrap());
        // 16 is both BADVERS and BADSIG on the wire; hickory decodes it as BADSIG.
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert_eq!(r.edns.as_ref().map(Edns::version), Some(0));
        assert!(r.answers.is_empty());
    }

    fn many_printers() -> VDns {
        let mut dns = VDns::new(ZONE).unwrap();
        dns.set_resources(
            (0..40u8)
                .map(|i| DnsResource {
                    name: format!("printer{i}"),
                    v4: Ipv4Addr::new(100, 77, 1, i),
                    v6: None,
                    tcp_ports: vec![631],
                    ipp_ports: vec![],
                })
                .collect(),
        );
        dns
    }

    #[test]
    fn big_answer_without_edns_is_truncated() {
        let dns = many_printers();
        let out = dns
            .answer(&query("_ipp._tcp.netredir.internal.", RecordType::PTR))
            .unwrap()
            .unwrap();
        assert!(out.len() <= 512, "{} bytes", out.len());
        let r = Message::from_vec(&out).unwrap();
        assert!(r.metadata.truncation);
        assert!(r.answers.is_empty());
        assert_eq!(r.queries.len(), 1);
    }

    #[test]
    fn edns_allows_bigger_answers_dropping_additionals_first() {
        let dns = many_printers();
        let mut msg = query_msg("_ipp._tcp.netredir.internal.", RecordType::PTR);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        msg.set_edns(edns);
        let out = dns.answer(&msg.to_vec().unwrap()).unwrap().unwrap();
        assert!(out.len() > 512 && out.len() <= 1232, "{} bytes", out.len());
        let r = Message::from_vec(&out).unwrap();
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 40);
        assert!(r.additionals.is_empty(), "additionals dropped to fit");
    }

    #[test]
    fn set_resources_replaces() {
        let mut dns = vdns();
        dns.set_resources(vec![nas()]);
        let r = ask(&dns, "printer.netredir.internal.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = ask(&dns, "181.4.77.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        let r = ask(&dns, "nas.netredir.internal.", RecordType::A);
        assert_eq!(r.answers.len(), 1);
    }
}
