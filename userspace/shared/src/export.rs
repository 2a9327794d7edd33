//! `--export NAME=HOST:PORT`: what the agent offers and where it really is.

use std::fmt;
use std::str::FromStr;

/// One exported resource as the user wrote it on the agent's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    /// Name shown in `map list`; the vIP derives from it.
    pub name: String,
    /// Host name or address of the real resource on the client LAN.
    pub host: String,
    /// TCP port of the real resource; guests reach it on the same port.
    pub port: u16,
}

/// Why an `--export` argument was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// No `=` between name and target.
    #[error("{0:?}: expected NAME=HOST:PORT, e.g. printer=192.168.1.20:9100")]
    Syntax(String),
    /// The name is empty, too long or has characters DNS would not take.
    #[error("{0:?}: a name is 1-63 letters, digits or '-', not starting with '-'")]
    BadName(String),
    /// The port is missing, zero or not a number.
    #[error("{0:?}: the port must be a number from 1 to 65535")]
    BadPort(String),
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
        let (host, port) = target
            .rsplit_once(':')
            .ok_or_else(|| ExportError::Syntax(s.into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(ExportError::Syntax(s.into()));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ExportError::BadPort(s.into()))?;
        Ok(Self {
            name: name.to_ascii_lowercase(),
            host: host.into(),
            port,
        })
    }
}

impl fmt::Display for ExportSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_and_names_what_is_wrong() {
        let e: ExportSpec = "Printer=10.0.0.5:9100".parse().unwrap();
        assert_eq!(
            (e.name.as_str(), e.host.as_str(), e.port),
            ("printer", "10.0.0.5", 9100)
        );
        assert_eq!(e.to_string(), "10.0.0.5:9100");
        let v6: ExportSpec = "p6=[fd00::5]:631".parse().unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.to_string()),
            ("fd00::5", "[fd00::5]:631".into())
        );
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
            "p=h".parse::<ExportSpec>(),
            Err(ExportError::Syntax(_))
        ));
    }
}
