//! `--export NAME=HOST[:PORTS]`: what the agent offers and where it really is.
//!
//! A TCP port may be marked `/ipp` or `/http` (`laser=10.0.0.5:8631/ipp`):
//! the agent then rewrites the destination that the protocol carries in
//! its data (the HTTP `Host`, URIs in IPP attributes), because printers
//! refuse a name they do not know as their own. Port 631 is IPP and port
//! 80 is HTTP without a mark.

use crate::wire::Proto;
use std::fmt;
use std::str::FromStr;

/// The ports a printer usually answers on, exported when none are given:
/// raw/JetDirect, IPP and LPD over TCP, SNMP over UDP.
pub const PRINTER_PORTS: [(u16, Proto); 4] = [
    (9100, Proto::Tcp),
    (631, Proto::Tcp),
    (515, Proto::Tcp),
    (161, Proto::Udp),
];

/// What a TCP port carries, where the destination is in the data too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    /// HTTP: the `Host` header (and `Location` in answers) is rewritten.
    Http,
    /// IPP over HTTP: as HTTP, and the URIs in its attributes.
    Ipp,
}

/// The protocol a port has without a mark: IPP on 631, HTTP on 80.
pub fn default_app(port: u16) -> Option<App> {
    match port {
        631 => Some(App::Ipp),
        80 => Some(App::Http),
        _ => None,
    }
}

/// One exported resource as the user wrote it on the agent's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    /// Name shown in `map list` and in DNS; the vIP derives from it.
    pub name: String,
    /// Host name or address of the real resource on the client LAN.
    pub host: String,
    /// Ports the guest may reach; the same port on the real resource.
    pub ports: Vec<(u16, Proto)>,
    /// TCP ports marked `/ipp` or `/http` on the command line.
    pub marked: Vec<(u16, App)>,
}

impl ExportSpec {
    /// Whether the policy allows `port` over `proto`.
    pub fn allows(&self, port: u16, proto: Proto) -> bool {
        self.ports.contains(&(port, proto))
    }

    /// What TCP `port` carries, if the agent rewrites destinations in it.
    pub fn app(&self, port: u16) -> Option<App> {
        self.marked
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, a)| *a)
            .or_else(|| default_app(port))
    }

    /// The real resource's `host:port` as an HTTP `Host` names it.
    pub fn authority(&self, port: u16) -> String {
        if self.host.contains(':') {
            format!("[{}]:{port}", self.host)
        } else {
            format!("{}:{port}", self.host)
        }
    }
}

/// Why an `--export` argument was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// No `=` between name and target.
    #[error("{0:?}: expected NAME=HOST[:PORTS], e.g. printer=192.168.1.20:9100,631,161/udp")]
    Syntax(String),
    /// The name is empty, too long or has characters DNS would not take.
    #[error("{0:?}: a name is 1-63 letters, digits or '-', not starting with '-'")]
    BadName(String),
    /// A port is zero, not a number, or has an unknown protocol.
    #[error(
        "{0:?}: ports are numbers from 1 to 65535, optionally /tcp, /udp, /ipp or /http, separated by commas"
    )]
    BadPort(String),
}

/// An IPv6 literal, or a host name / IPv4 address as DNS writes them
/// (letters, digits, '.', '-', '_'): nothing a resolver or a log line
/// would misread, and what Display prints parses back.
fn valid_host(h: &str) -> bool {
    if h.contains(':') {
        return h.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !h.is_empty()
        && h.len() <= 253
        && !h.starts_with(['-', '.'])
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Exported ports and the TCP ports marked with their protocol.
type Ports = (Vec<(u16, Proto)>, Vec<(u16, App)>);

fn parse_ports(s: &str, whole: &str) -> Result<Ports, ExportError> {
    let bad = || ExportError::BadPort(whole.into());
    let mut ports = Vec::new();
    let mut marked: Vec<(u16, App)> = Vec::new();
    for item in s.split(',') {
        let (num, proto, app) = match item.split_once('/') {
            Some((n, "tcp")) => (n, Proto::Tcp, None),
            Some((n, "udp")) => (n, Proto::Udp, None),
            Some((n, "ipp")) => (n, Proto::Tcp, Some(App::Ipp)),
            Some((n, "http")) => (n, Proto::Tcp, Some(App::Http)),
            Some(_) => return Err(bad()),
            None => (item, Proto::Tcp, None),
        };
        let port: u16 = num.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        if !ports.contains(&(port, proto)) {
            ports.push((port, proto));
        }
        if let Some(app) = app {
            // The last mark of a port wins; a mark that says what the
            // port is anyway is not kept (it prints back the same).
            marked.retain(|(p, _)| *p != port);
            if default_app(port) != Some(app) {
                marked.push((port, app));
            }
        }
    }
    Ok((ports, marked))
}

impl FromStr for ExportSpec {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, target) = s
            .split_once('=')
            .ok_or_else(|| ExportError::Syntax(s.into()))?;
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && !name.starts_with('-')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !name_ok {
            return Err(ExportError::BadName(name.into()));
        }
        let (host, ports) = if let Some(rest) = target.strip_prefix('[') {
            // [v6]:PORTS or [v6]
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| ExportError::Syntax(s.into()))?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(ExportError::Syntax(s.into())),
            }
        } else if target.matches(':').count() == 1 {
            let (h, p) = target.split_once(':').expect("one colon");
            (h, Some(p))
        } else {
            // A host name, or an IPv6 literal without brackets (no ports).
            (target, None)
        };
        if !valid_host(host) {
            return Err(ExportError::Syntax(s.into()));
        }
        let (ports, marked) = match ports {
            Some(p) => parse_ports(p, s)?,
            None => (PRINTER_PORTS.to_vec(), Vec::new()),
        };
        Ok(Self {
            name: name.to_ascii_lowercase(),
            host: host.into(),
            ports,
            marked,
        })
    }
}

impl fmt::Display for ExportSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|(p, proto)| match proto {
                Proto::Tcp => match self.marked.iter().find(|(m, _)| m == p) {
                    Some((_, App::Ipp)) => format!("{p}/ipp"),
                    Some((_, App::Http)) => format!("{p}/http"),
                    None => p.to_string(),
                },
                Proto::Udp => format!("{p}/udp"),
            })
            .collect();
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, ports.join(","))
        } else {
            write!(f, "{}:{}", self.host, ports.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_that_is_not_one_is_refused_and_what_parses_prints_back() {
        // Found by the export_spec fuzz target: these used to parse, and
        // their Display did not parse back.
        for bad in [
            "r=:]:",
            "Plotter=plotte6=[f[fd00d00::5]:p",
            "p=ho st:9100",
            "p=-x:1",
        ] {
            assert!(bad.parse::<ExportSpec>().is_err(), "{bad}");
        }
        for good in [
            "p=fd00::5",
            "p=[fd00::5]:631",
            "p=printer.lan:9100",
            "p=my_host",
        ] {
            let e: ExportSpec = good.parse().unwrap();
            let again: ExportSpec = format!("{}={e}", e.name).parse().unwrap();
            assert_eq!(again, e);
        }
    }

    #[test]
    fn ports_marked_ipp_or_http_are_tcp_and_print_back() {
        let e: ExportSpec = "laser=10.0.0.5:8631/ipp,8080/http,9100".parse().unwrap();
        assert_eq!(
            e.ports,
            vec![(8631, Proto::Tcp), (8080, Proto::Tcp), (9100, Proto::Tcp)]
        );
        assert_eq!(
            (e.app(8631), e.app(8080), e.app(9100)),
            (Some(App::Ipp), Some(App::Http), None)
        );
        assert_eq!(e.to_string(), "10.0.0.5:8631/ipp,8080/http,9100");
        // 631 and 80 without a mark.
        let d: ExportSpec = "p=printer.lan:631,80,631/ipp".parse().unwrap();
        assert_eq!((d.app(631), d.app(80)), (Some(App::Ipp), Some(App::Http)));
        assert!(d.marked.is_empty(), "{d:?}");
        assert_eq!(d.authority(631), "printer.lan:631");
        let v6: ExportSpec = "p=[fd00::5]:8631/ipp".parse().unwrap();
        assert_eq!(v6.authority(8631), "[fd00::5]:8631");
        assert_eq!(format!("p={v6}").parse::<ExportSpec>().unwrap(), v6);
    }

    #[test]
    fn parses_good_and_names_what_is_wrong() {
        let e: ExportSpec = "Printer=10.0.0.5:9100".parse().unwrap();
        assert_eq!(
            (e.name.as_str(), e.host.as_str(), e.ports.clone()),
            ("printer", "10.0.0.5", vec![(9100, Proto::Tcp)])
        );
        assert_eq!(e.to_string(), "10.0.0.5:9100");
        let m: ExportSpec = "p=printer.lan:9100,631,161/udp".parse().unwrap();
        assert_eq!(
            m.ports,
            vec![(9100, Proto::Tcp), (631, Proto::Tcp), (161, Proto::Udp)]
        );
        assert!(m.allows(161, Proto::Udp) && !m.allows(161, Proto::Tcp));
        assert_eq!(m.to_string(), "printer.lan:9100,631,161/udp");
        let d: ExportSpec = "p=printer.lan".parse().unwrap();
        assert_eq!(d.ports, PRINTER_PORTS.to_vec(), "a printer's usual ports");
        let v6: ExportSpec = "p6=[fd00::5]:631".parse().unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.to_string()),
            ("fd00::5", "[fd00::5]:631".into())
        );
        let v6d: ExportSpec = "p6=fd00::5".parse().unwrap();
        assert_eq!((v6d.host.as_str(), v6d.ports.len()), ("fd00::5", 4));
        assert!(matches!(
            "nope".parse::<ExportSpec>(),
            Err(ExportError::Syntax(_))
        ));
        assert!(matches!(
            "a b=h:1".parse::<ExportSpec>(),
            Err(ExportError::BadName(_))
        ));
        assert!(matches!(
            "p=h:0".parse::<ExportSpec>(),
            Err(ExportError::BadPort(_))
        ));
        assert!(matches!(
            "p=h:x".parse::<ExportSpec>(),
            Err(ExportError::BadPort(_))
        ));
        assert!(matches!(
            "p=h:53/sctp".parse::<ExportSpec>(),
            Err(ExportError::BadPort(_))
        ));
        assert!(matches!(
            "p=:9100".parse::<ExportSpec>(),
            Err(ExportError::Syntax(_))
        ));
    }
}
