//! The tunnel's TLS: TLS 1.3 only, both sides authenticated by self-signed
//! certificates pinned by SHA-256 fingerprint (no CA, no names, no dates).
//!
//! - [`Identity`]: a daemon's P-256 key and self-signed certificate, created
//!   in its state directory on first start and loaded after that.
//! - [`Tls`]: one connection, sans-IO. The io_uring loop feeds it what the
//!   socket received ([`Tls::feed`]) and sends what it produces
//!   ([`Tls::take_ciphertext`]); nothing here touches a socket.
//! - [`HostCheck`] and [`PairCode`]: how the agent knows it reached the right
//!   host, before pairing (a code the host's operator gives out) and after
//!   (the pinned fingerprint).
//!
//! The host (netredird, TLS server) takes any client certificate at the TLS
//! layer and decides afterwards, from [`Tls::peer_fingerprint`], whether the
//! agent is one it paired with. The agent (TLS client) refuses the handshake
//! itself unless the host's certificate matches its [`HostCheck`]. Both
//! sides still verify the peer's handshake signature, so a peer can only
//! claim a certificate whose key it holds.

use std::fmt;
use std::fs;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// SHA-256 of a certificate's DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate, as both sides pin it.
    pub fn of(cert_der: &[u8]) -> Self {
        Self(Sha256::digest(cert_der).into())
    }

    /// Lowercase hex, 64 characters: how operators see and type it.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, TlsError> {
        let bad = || {
            TlsError::BadFingerprint(format!(
                "{s:?}: expected 64 hex digits (a SHA-256), as netredird prints it"
            ))
        };
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = hex_value(pair[0]).ok_or_else(bad)?;
            let lo = hex_value(pair[1]).ok_or_else(bad)?;
            *byte = hi << 4 | lo;
        }
        Ok(Self(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    char::from(c).to_digit(16).map(|d| d as u8)
}

/// Why TLS or the identity failed, phrased for an operator's log.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A key or certificate file (or its directory) could not be read or written.
    #[error("cannot read/write {path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: String,
        /// What the OS said.
        source: io::Error,
    },
    /// A key or certificate is unusable; the text names the file and why.
    #[error("{0}")]
    BadIdentity(String),
    /// The peer's first bytes are not TLS records at all.
    #[error("the peer does not speak TLS (garbage or plain TCP)")]
    NotTls,
    /// The agent refused the host's certificate (wrong host, or stale pin).
    #[error(
        "the host's certificate does not match the pinned fingerprint (or the pairing code): \
         refusing to connect"
    )]
    HostMismatch,
    /// Any other TLS failure, with rustls' own words.
    #[error("TLS failed: {0}")]
    Handshake(String),
    /// A fingerprint given by the operator does not parse.
    #[error("bad fingerprint: {0}")]
    BadFingerprint(String),
    /// A pairing code given by the operator does not parse.
    #[error("bad pairing code: {0}")]
    BadPairCode(String),
}

/// The error naming `path` as an unusable key or certificate.
fn bad_identity(path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError::BadIdentity(format!("{}: not a valid key/cert: {why}", path.display()))
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How long a fresh certificate says it is valid (nobody checks; ~10 years).
const VALIDITY: Duration = Duration::from_secs(3653 * 24 * 60 * 60);

/// A key and self-signed certificate, kept in a state directory.
pub struct Identity {
    /// The certificate, DER; its SHA-256 is what peers pin.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key, even in a debug log.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The daemon's identity from `<dir>/<name>.{crt,key}`, made on first use and kept so pins hold.
    ///
    /// Both files are PEM (the key PKCS#8). On first use the directory is
    /// created with mode 0700 and both files written with mode 0600 via
    /// [`write_private`]: a fresh P-256 key and a self-signed certificate
    /// with subject CN `common_name`, valid for about ten years. A loaded
    /// key must parse and belong to the certificate.
    ///
    /// The key is written before the certificate, so a crash in between
    /// leaves only a key: the next call then makes a certificate for it.
    /// A certificate without its key is an error (the identity is lost; the
    /// operator removes the certificate to start over and pairs again).
    pub fn load_or_create(dir: &Path, name: &str, common_name: &str) -> Result<Self, TlsError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(dir))?;
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        let cert_pem = read_if_exists(&cert_path)?;
        let key_pem = read_if_exists(&key_path)?;

        let key = match key_pem {
            Some(pem) => Some(PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| {
                bad_identity(&key_path, format!("{e} (expected a PKCS#8 PEM key)"))
            })?),
            None => None,
        };
        let (cert_der, key_der) = match (cert_pem, key) {
            (Some(pem), Some(key)) => {
                let cert = CertificateDer::from_pem_slice(&pem)
                    .map_err(|e| bad_identity(&cert_path, e))?;
                (cert.to_vec(), key.secret_pkcs8_der().to_vec())
            }
            (Some(_), None) => {
                return Err(bad_identity(
                    &cert_path,
                    format!(
                        "its key {} is missing (remove the certificate to make a new identity, \
                         then pair again)",
                        key_path.display()
                    ),
                ));
            }
            (None, key) => {
                let key = match key {
                    Some(key) => rcgen::KeyPair::try_from(key.secret_pkcs8_der())
                        .map_err(|e| bad_identity(&key_path, e))?,
                    None => {
                        let key = new_key()?;
                        write_private(&key_path, key.serialize_pem().as_bytes())
                            .map_err(io_error(&key_path))?;
                        key
                    }
                };
                let cert = self_signed(&key, common_name)?;
                write_private(&cert_path, cert.pem().as_bytes()).map_err(io_error(&cert_path))?;
                (cert.der().to_vec(), key.serialize_der())
            }
        };

        let id = Self { cert_der, key_der };
        // Catch a key that is not P-256/ECDSA-usable or not the cert's now,
        // with the file names, rather than at the first connection.
        id.certified_key(&provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => bad_identity(
                &key_path,
                format!("it is not the key of {}", cert_path.display()),
            ),
            rustls::Error::InvalidCertificate(_) => bad_identity(&cert_path, e),
            e => bad_identity(&key_path, e),
        })?;
        Ok(id)
    }

    /// SHA-256 of the certificate, which peers pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert_der)
    }

    /// A fresh identity held only in memory, for tests and benchmarks
    /// that must not touch the disk.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = new_key()?;
        let cert = self_signed(&key, common_name)?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(self.cert_der.clone())]
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Parses the key with `provider` and checks it matches the certificate.
    fn certified_key(&self, provider: &CryptoProvider) -> Result<CertifiedKey, rustls::Error> {
        CertifiedKey::from_der(self.cert_chain(), self.private_key(), provider)
    }
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, TlsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

fn new_key() -> Result<rcgen::KeyPair, TlsError> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TlsError::BadIdentity(format!("cannot generate a P-256 key: {e}")))
}

fn self_signed(key: &rcgen::KeyPair, common_name: &str) -> Result<rcgen::Certificate, TlsError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    // rcgen takes `time` dates; `date_time_ymd` plus std durations gets one
    // without depending on `time` here. A day back absorbs clock skew.
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    params.not_before =
        rcgen::date_time_ymd(1970, 1, 1) + since_epoch.saturating_sub(Duration::from_secs(86_400));
    params.not_after = params.not_before + VALIDITY;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.self_signed(key).map_err(|e| {
        TlsError::BadIdentity(format!(
            "cannot make a self-signed certificate for {common_name:?}: {e}"
        ))
    })
}

/// Writes a file readable only by its owner (0600), atomically.
///
/// The bytes go to a temp file of its own beside `path` (`.<name>.<pid>.<n>.tmp`,
/// created fresh with mode 0600, so that writers in several processes or
/// threads never share one), are synced, and the temp file is renamed over
/// `path`; the directory is then synced so the rename survives a crash.
/// Readers see the old file or the new one.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let create = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
    };
    let result = (|| {
        let mut file = match create() {
            // A leftover of a crashed process with the same pid: its bytes
            // and mode are not ours, start from nothing.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp)?;
                create()?
            }
            r => r?,
        };
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(dir)?.sync_all()
}

/// How the agent decides the host is the right one.
#[derive(Clone, Copy, Debug)]
pub enum HostCheck {
    /// Exactly this certificate (pinned after pairing).
    Pinned(Fingerprint),
    /// Any certificate whose fingerprint starts with these bytes (from a pairing code).
    Prefix([u8; 8]),
}

impl HostCheck {
    fn accepts(&self, fp: &Fingerprint) -> bool {
        match self {
            Self::Pinned(pin) => pin == fp,
            Self::Prefix(prefix) => fp.0.starts_with(prefix),
        }
    }
}

/// The crypto every connection uses, chosen here rather than process-wide.
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// What the client verifier returns on a mismatch, so that [`map_error`]
/// can tell it apart from every other certificate error.
#[derive(Debug)]
struct HostMismatchMarker;

impl fmt::Display for HostMismatchMarker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("host certificate does not match the pin or pairing code")
    }
}

impl std::error::Error for HostMismatchMarker {}

/// The agent's check of the host: fingerprint only, signature still verified.
#[derive(Debug)]
struct HostVerifier {
    check: HostCheck,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for HostVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.check.accepts(&Fingerprint::of(end_entity)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(HostMismatchMarker)),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The host's check of the agent at the TLS layer: a certificate is
/// required and its handshake signature verified; which certificates are
/// paired is decided by the caller from [`Tls::peer_fingerprint`].
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA to hint at: the client sends its one certificate regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Turns a rustls error into what the operator should read.
fn map_error(e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InvalidMessage(_) => TlsError::NotTls,
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if other.0.is::<HostMismatchMarker>() =>
        {
            TlsError::HostMismatch
        }
        other => TlsError::Handshake(other.to_string()),
    }
}

/// An identity rustls cannot use (only possible for one not from disk).
fn config_error(e: rustls::Error) -> TlsError {
    TlsError::BadIdentity(format!("this identity's key/cert is not usable: {e}"))
}

/// One TLS connection, sans-IO.
#[derive(Debug)]
pub struct Tls {
    conn: rustls::Connection,
    peer_closed: bool,
}

impl Tls {
    /// The host's side (netredird), which must learn which agent connected.
    ///
    /// TLS 1.3 only. A client certificate is required and its handshake
    /// signature verified, but any certificate is accepted at the TLS
    /// layer: after the handshake the caller checks
    /// [`Tls::peer_fingerprint`] against its paired agents.
    pub fn server(id: &Identity) -> Result<Self, TlsError> {
        let provider = provider();
        let key = id.certified_key(&provider).map_err(config_error)?;
        Self::server_with(provider, SingleCertAndKey::from(key))
    }

    /// The agent's side, which refuses any host but the one `check` names.
    ///
    /// TLS 1.3 only; presents `id`'s certificate. The host's end-entity
    /// certificate is judged only by its fingerprint (no CA, no name, no
    /// dates); its handshake signature is still verified. The server name
    /// sent is "netredird".
    pub fn client(id: &Identity, check: HostCheck) -> Result<Self, TlsError> {
        let provider = provider();
        let key = id.certified_key(&provider).map_err(config_error)?;
        Self::client_with(provider, SingleCertAndKey::from(key), check)
    }

    /// [`Tls::server`] presenting whatever `cert` gives (tests present
    /// certificates without their keys).
    fn server_with(provider: CryptoProvider, cert: SingleCertAndKey) -> Result<Self, TlsError> {
        let verifier = AnyClientCert {
            algorithms: provider.signature_verification_algorithms,
        };
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(cert));
        // One long-lived connection per agent: no tickets, no resumption,
        // so every connection authenticates both certificates afresh.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let conn = rustls::ServerConnection::new(Arc::new(config)).map_err(map_error)?;
        Ok(Self::new(conn.into()))
    }

    /// [`Tls::client`] presenting whatever `cert` gives.
    fn client_with(
        provider: CryptoProvider,
        cert: SingleCertAndKey,
        check: HostCheck,
    ) -> Result<Self, TlsError> {
        let verifier = HostVerifier {
            check,
            algorithms: provider.signature_verification_algorithms,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(cert));
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from("netredird").expect("a valid DNS name");
        let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(map_error)?;
        Ok(Self::new(conn.into()))
    }

    fn new(mut conn: rustls::Connection) -> Self {
        // The caller bounds what it queues; rustls must not drop any of it.
        conn.set_buffer_limit(None);
        Self {
            conn,
            peer_closed: false,
        }
    }

    /// Takes bytes as the socket delivered them and appends the plaintext they complete to `plaintext`.
    ///
    /// Any amount and any split is fine; all of `ciphertext` is consumed.
    /// A close_notify from the peer is not an error: see
    /// [`Tls::peer_closed`]; bytes after it are ignored. After an error the
    /// connection is dead, and rustls has queued an alert for the peer that
    /// [`Tls::take_ciphertext`] hands out.
    pub fn feed(&mut self, mut ciphertext: &[u8], plaintext: &mut Vec<u8>) -> Result<(), TlsError> {
        // Never call read_tls on an empty slice: rustls takes a 0-byte read
        // as the peer's EOF.
        while !ciphertext.is_empty() {
            let n = self
                .conn
                .read_tls(&mut ciphertext)
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            let state = self.conn.process_new_packets().map_err(map_error)?;
            plaintext.reserve(state.plaintext_bytes_to_read());
            match self.conn.reader().read_to_end(plaintext) {
                // Ok means end of stream, which only a close_notify gives.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(TlsError::Handshake(e.to_string())),
            }
            if state.peer_has_closed() {
                self.peer_closed = true;
            }
            if n == 0 {
                // Nothing more is read after close_notify; drop the rest.
                break;
            }
        }
        Ok(())
    }

    /// Queues plaintext for the peer; unbounded, as the caller bounds what it queues.
    ///
    /// Before the handshake ends the bytes wait inside rustls. Writing to a
    /// connection that already failed drops them; `feed` has reported why.
    pub fn write(&mut self, plaintext: &[u8]) {
        self.write_vectored(&[IoSlice::new(plaintext)]);
    }

    /// Queues the pieces in order, as [`Tls::write`] would their concatenation.
    pub fn write_vectored(&mut self, pieces: &[IoSlice<'_>]) {
        let mut owned = pieces.to_vec();
        let mut left = &mut owned[..];
        while !left.is_empty() {
            // With no buffer limit this fails only on an already failed
            // connection, whose error `feed` returned.
            match self.conn.writer().write_vectored(left) {
                Ok(0) | Err(_) => break,
                Ok(n) => IoSlice::advance_slices(&mut left, n),
            }
        }
    }

    /// Appends all ciphertext waiting to be sent (handshake, data, alerts) to `out`.
    pub fn take_ciphertext(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            // Writing into a Vec cannot fail; stop rather than spin if it did.
            match self.conn.write_tls(out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Whether the handshake is still going on (no peer fingerprint to trust yet).
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// SHA-256 of the peer's end-entity certificate once known, for the caller's pairing checks.
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        self.conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| Fingerprint::of(cert))
    }

    /// Whether the peer sent close_notify, i.e. ended the stream cleanly.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Queues a close_notify, so the peer can tell a clean end from a cut.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }
}

/// Crockford's base32 alphabet: digits and letters minus I, L, O, U.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Bytes in a pairing code: 8 of fingerprint prefix, 10 of secret.
const PAIR_CODE_BYTES: usize = 18;
/// Characters in a pairing code: 144 bits at 5 bits a character.
const PAIR_CODE_CHARS: usize = (PAIR_CODE_BYTES * 8).div_ceil(5);

/// A one-time pairing code: binds the agent to one host certificate and proves the agent was given the code by the host's operator.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PairCode {
    /// The first 8 bytes of the host certificate's fingerprint.
    pub fp_prefix: [u8; 8],
    /// The secret the agent shows the host to be let in.
    pub secret: [u8; 10],
}

impl PairCode {
    /// A fresh code for the host whose certificate has fingerprint `host`, with a secret from the OS RNG.
    pub fn generate(host: &Fingerprint) -> Self {
        use ring::rand::SecureRandom;
        let mut fp_prefix = [0u8; 8];
        fp_prefix.copy_from_slice(&host.0[..8]);
        let mut secret = [0u8; 10];
        // The OS RNG failing is not something to carry on from.
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .expect("the OS random number generator failed");
        Self { fp_prefix, secret }
    }

    fn to_bytes(self) -> [u8; PAIR_CODE_BYTES] {
        let mut bytes = [0u8; PAIR_CODE_BYTES];
        bytes[..8].copy_from_slice(&self.fp_prefix);
        bytes[8..].copy_from_slice(&self.secret);
        bytes
    }
}

impl fmt::Display for PairCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = Vec::with_capacity(PAIR_CODE_CHARS);
        let (mut acc, mut bits) = (0u16, 0u32);
        for byte in self.to_bytes() {
            acc = acc << 8 | u16::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                chars.push(CROCKFORD[usize::from(acc >> bits & 31)]);
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            chars.push(CROCKFORD[usize::from(acc << (5 - bits) & 31)]);
        }
        for (i, group) in chars.chunks(4).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            // CROCKFORD is ASCII.
            f.write_str(std::str::from_utf8(group).unwrap_or_default())?;
        }
        Ok(())
    }
}

/// The value of one Crockford base32 character; I and L read as 1, O as 0.
fn crockford_value(c: char) -> Option<u8> {
    match c.to_ascii_uppercase() {
        'I' | 'L' => Some(1),
        'O' => Some(0),
        c => CROCKFORD
            .iter()
            .position(|&a| char::from(a) == c)
            .map(|v| v as u8),
    }
}

impl FromStr for PairCode {
    type Err = TlsError;

    /// Accepts the code as printed, in any case, with or without dashes or
    /// spaces; I and L are read as 1 and O as 0 (Crockford).
    fn from_str(s: &str) -> Result<Self, TlsError> {
        let example = "like 7K2M-9XD3-… as the host printed it";
        let mut values = Vec::with_capacity(PAIR_CODE_CHARS);
        for c in s.chars().filter(|c| *c != '-' && !c.is_whitespace()) {
            let v = crockford_value(c).ok_or_else(|| {
                TlsError::BadPairCode(format!(
                    "{c:?} is not a pairing-code character (digits and letters except U), {example}"
                ))
            })?;
            values.push(v);
        }
        if values.len() != PAIR_CODE_CHARS {
            return Err(TlsError::BadPairCode(format!(
                "expected {PAIR_CODE_CHARS} letters and digits, got {}: {example}",
                values.len()
            )));
        }
        let mut bytes = [0u8; PAIR_CODE_BYTES];
        let (mut acc, mut bits, mut i) = (0u16, 0u32, 0);
        for v in values {
            acc = acc << 5 | u16::from(v);
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                bytes[i] = (acc >> bits) as u8;
                i += 1;
            }
            acc &= (1 << bits) - 1;
        }
        if acc != 0 {
            // Only the last character carries padding; a typo there shows.
            return Err(TlsError::BadPairCode(format!(
                "the last character is not one a pairing code ends with (check it), {example}"
            )));
        }
        let mut fp_prefix = [0u8; 8];
        let mut secret = [0u8; 10];
        fp_prefix.copy_from_slice(&bytes[..8]);
        secret.copy_from_slice(&bytes[8..]);
        Ok(Self { fp_prefix, secret })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn client_server() -> (Identity, Identity) {
        (
            Identity::generate("netredir-agent").unwrap(),
            Identity::generate("netredird").unwrap(),
        )
    }

    /// Moves what `from` has to send into `to`; returns how many bytes moved.
    fn pump(from: &mut Tls, to: &mut Tls, got: &mut Vec<u8>) -> Result<usize, TlsError> {
        let mut wire = Vec::new();
        from.take_ciphertext(&mut wire);
        to.feed(&wire, got)?;
        Ok(wire.len())
    }

    /// Which side failed a handshake.
    #[derive(Debug, PartialEq)]
    enum Side {
        Client,
        Server,
    }

    /// Shuttles bytes both ways until both sides are done; returns the
    /// plaintext the client and the server received on the way.
    fn handshake(
        client: &mut Tls,
        server: &mut Tls,
    ) -> Result<(Vec<u8>, Vec<u8>), (Side, TlsError)> {
        let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let up = pump(client, server, &mut to_server).map_err(|e| (Side::Server, e))?;
            let down = pump(server, client, &mut to_client).map_err(|e| (Side::Client, e))?;
            if up == 0 && down == 0 && !client.is_handshaking() && !server.is_handshaking() {
                return Ok((to_client, to_server));
            }
        }
        panic!("handshake did not finish in 10 round trips");
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Sends `msg` from `from` to `to`, feeding it in `chunk`-byte pieces.
    fn send_chunked(from: &mut Tls, to: &mut Tls, msg: &[u8], chunk: usize) -> Vec<u8> {
        from.write(msg);
        let mut wire = Vec::new();
        from.take_ciphertext(&mut wire);
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            to.feed(piece, &mut got).unwrap();
        }
        got
    }

    #[test]
    fn pinned_handshake_authenticates_both_and_carries_data() {
        let (cid, sid) = client_server();
        let mut client = Tls::client(&cid, HostCheck::Pinned(sid.fingerprint())).unwrap();
        let mut server = Tls::server(&sid).unwrap();
        assert_eq!(client.peer_fingerprint(), None);
        // Queued before the handshake: must arrive once it is done.
        client.write(b"early hello");
        let (to_client, to_server) = handshake(&mut client, &mut server).unwrap();
        assert!(to_client.is_empty());
        assert_eq!(client.peer_fingerprint(), Some(sid.fingerprint()));
        assert_eq!(server.peer_fingerprint(), Some(cid.fingerprint()));
        assert_ne!(cid.fingerprint(), sid.fingerprint());

        let mut got = to_server;
        pump(&mut client, &mut server, &mut got).unwrap();
        assert_eq!(got, b"early hello");
        assert_eq!(
            send_chunked(&mut server, &mut client, b"hi agent", 1),
            b"hi agent"
        );

        let big = pattern(1 << 20, 0x5a);
        assert_eq!(send_chunked(&mut client, &mut server, &big, 777), big);
        let big = pattern(1 << 20, 0xa5);
        assert_eq!(send_chunked(&mut server, &mut client, &big, 777), big);

        // A close_notify is reported, not an error, and data before it arrives.
        client.write(b"bye");
        client.close();
        assert!(!server.peer_closed());
        let mut got = Vec::new();
        pump(&mut client, &mut server, &mut got).unwrap();
        assert_eq!(got, b"bye");
        assert!(server.peer_closed());
        assert!(!client.peer_closed());
    }

    #[test]
    fn pairing_code_prefix_finds_the_host() {
        let (cid, sid) = client_server();
        let code = PairCode::generate(&sid.fingerprint());
        let mut client = Tls::client(&cid, HostCheck::Prefix(code.fp_prefix)).unwrap();
        let mut server = Tls::server(&sid).unwrap();
        handshake(&mut client, &mut server).unwrap();
        assert_eq!(client.peer_fingerprint(), Some(sid.fingerprint()));
        assert_eq!(server.peer_fingerprint(), Some(cid.fingerprint()));
    }

    #[test]
    fn wrong_pin_or_prefix_is_refused_on_both_sides() {
        let (cid, sid) = client_server();
        let other = Identity::generate("impostor").unwrap();
        let wrong_prefix = {
            let mut p = [0u8; 8];
            p.copy_from_slice(&sid.fingerprint().0[..8]);
            p[7] ^= 1;
            p
        };
        for check in [
            HostCheck::Pinned(other.fingerprint()),
            HostCheck::Prefix(wrong_prefix),
        ] {
            let mut client = Tls::client(&cid, check).unwrap();
            let mut server = Tls::server(&sid).unwrap();
            match handshake(&mut client, &mut server) {
                Err((Side::Client, TlsError::HostMismatch)) => {}
                other => panic!("{check:?}: expected HostMismatch, got {other:?}"),
            }
            // The client's alert makes the server fail too, rather than wait.
            let mut got = Vec::new();
            let err = pump(&mut client, &mut server, &mut got).unwrap_err();
            assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
            assert!(server.peer_fingerprint().is_none());
        }
    }

    /// A certificate presented with someone else's key: what a thief of a
    /// certificate (public, pinned) but not of its key could do.
    fn stolen_cert(victim: &Identity, thief: &Identity) -> (CryptoProvider, SingleCertAndKey) {
        let provider = provider();
        let key = provider
            .key_provider
            .load_private_key(thief.private_key())
            .unwrap();
        let liar = CertifiedKey::new(victim.cert_chain(), key);
        assert!(liar.keys_match().is_err());
        (provider, SingleCertAndKey::from(liar))
    }

    #[test]
    fn a_certificate_without_its_key_is_refused_both_ways() {
        let (cid, sid) = client_server();
        let thief = Identity::generate("thief").unwrap();

        // An agent showing a paired agent's certificate: the server fails
        // on the signature, and never reports the stolen fingerprint.
        let (provider, liar) = stolen_cert(&cid, &thief);
        let check = HostCheck::Pinned(sid.fingerprint());
        let mut client = Tls::client_with(provider, liar, check).unwrap();
        let mut server = Tls::server(&sid).unwrap();
        match handshake(&mut client, &mut server) {
            Err((Side::Server, TlsError::Handshake(_))) => {}
            other => panic!("expected the server to refuse, got {other:?}"),
        }
        assert!(server.is_handshaking());

        // A host showing the pinned host's certificate: the agent refuses.
        let (provider, liar) = stolen_cert(&sid, &thief);
        let mut server = Tls::server_with(provider, liar).unwrap();
        let mut client = Tls::client(&cid, HostCheck::Pinned(sid.fingerprint())).unwrap();
        match handshake(&mut client, &mut server) {
            Err((Side::Client, TlsError::Handshake(_))) => {}
            other => panic!("expected the client to refuse, got {other:?}"),
        }
        assert!(client.is_handshaking());
    }

    /// Deterministic "random" bytes (splitmix64), so the test cannot flake
    /// on the rare random prefix that looks like a TLS record header.
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)) as u8
            })
            .collect()
    }

    #[test]
    fn garbage_is_not_tls() {
        let (cid, sid) = client_server();
        for garbage in [b"GET / HTTP/1.1\r\n\r\n".to_vec(), noise(64)] {
            let mut server = Tls::server(&sid).unwrap();
            let err = server.feed(&garbage, &mut Vec::new()).unwrap_err();
            assert!(matches!(err, TlsError::NotTls), "{err:?}");
        }
        // And a client that reached something else than netredird.
        let mut client = Tls::client(&cid, HostCheck::Pinned(sid.fingerprint())).unwrap();
        client.take_ciphertext(&mut Vec::new());
        let err = client
            .feed(b"HTTP/1.1 400 Bad Request\r\n\r\n", &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, TlsError::NotTls), "{err:?}");
        assert!(err.to_string().contains("does not speak TLS"));
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let path = std::env::temp_dir()
                .join(format!("netredir-tls-{tag}-{}-{nanos}", std::process::id()));
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn identity_is_created_private_then_loaded_the_same() {
        let tmp = TempDir::new("identity");
        let dir = tmp.0.join("state");
        let first = Identity::load_or_create(&dir, "host", "netredird").unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("host.crt")), 0o600);
        assert_eq!(mode(&dir.join("host.key")), 0o600);
        assert!(!dir.join("host.key.tmp").exists());

        let again = Identity::load_or_create(&dir, "host", "netredird").unwrap();
        assert_eq!(again.fingerprint(), first.fingerprint());
        assert_eq!(again.key_der, first.key_der);
        assert_eq!(again.cert_der, first.cert_der);

        // The loaded identity works for TLS.
        let (cid, _) = client_server();
        let mut client = Tls::client(&cid, HostCheck::Pinned(first.fingerprint())).unwrap();
        let mut server = Tls::server(&again).unwrap();
        handshake(&mut client, &mut server).unwrap();

        // Another name in the same directory is another identity.
        let agent = Identity::load_or_create(&dir, "agent", "netredir-agent").unwrap();
        assert_ne!(agent.fingerprint(), first.fingerprint());

        // A crash between writing the key and the cert: the key is kept.
        fs::remove_file(dir.join("host.crt")).unwrap();
        let healed = Identity::load_or_create(&dir, "host", "netredird").unwrap();
        assert_eq!(healed.key_der, first.key_der);
        assert_ne!(healed.fingerprint(), first.fingerprint());
    }

    #[test]
    fn broken_identity_files_are_refused() {
        let tmp = TempDir::new("broken");
        let dir = tmp.0.clone();
        Identity::load_or_create(&dir, "host", "netredird").unwrap();
        Identity::load_or_create(&dir, "other", "netredird").unwrap();
        let key = dir.join("host.key");
        let good_key = fs::read(&key).unwrap();

        write_private(
            &key,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = Identity::load_or_create(&dir, "host", "netredird").unwrap_err();
        assert!(matches!(err, TlsError::BadIdentity(_)), "{err:?}");
        assert!(err.to_string().contains("host.key"), "{err}");

        write_private(&key, b"not a pem file at all").unwrap();
        let err = Identity::load_or_create(&dir, "host", "netredird").unwrap_err();
        assert!(matches!(err, TlsError::BadIdentity(_)), "{err:?}");

        // A well-formed key that is not the certificate's.
        fs::copy(dir.join("other.key"), &key).unwrap();
        let err = Identity::load_or_create(&dir, "host", "netredird").unwrap_err();
        assert!(matches!(err, TlsError::BadIdentity(_)), "{err:?}");
        assert!(err.to_string().contains("not the key of"), "{err}");

        // A certificate whose key is gone is not silently replaced.
        fs::remove_file(&key).unwrap();
        let err = Identity::load_or_create(&dir, "host", "netredird").unwrap_err();
        assert!(matches!(err, TlsError::BadIdentity(_)), "{err:?}");
        assert!(!key.exists());

        write_private(&key, &good_key).unwrap();
        Identity::load_or_create(&dir, "host", "netredird").unwrap();
    }

    #[test]
    fn pair_code_round_trips_in_any_case_and_spacing() {
        let fp = Fingerprint::of(b"some certificate");
        let code = PairCode::generate(&fp);
        assert_eq!(code.fp_prefix, fp.0[..8]);
        assert_ne!(code, PairCode::generate(&fp), "secrets must differ");

        let text = code.to_string();
        assert_eq!(
            text.len(),
            PAIR_CODE_CHARS + PAIR_CODE_CHARS.div_ceil(4) - 1
        );
        assert!(
            text.split('-').all(|g| (1..=4).contains(&g.len())),
            "{text}"
        );
        assert!(
            text.chars()
                .all(|c| c == '-' || CROCKFORD.contains(&(c as u8))),
            "{text}"
        );
        assert_eq!(text.parse::<PairCode>().unwrap(), code);
        assert_eq!(text.to_lowercase().parse::<PairCode>().unwrap(), code);
        assert_eq!(text.replace('-', "").parse::<PairCode>().unwrap(), code);
        assert_eq!(text.replace('-', " ").parse::<PairCode>().unwrap(), code);

        // Known value: all-zero prefix, secret ending in 1.
        let known = PairCode {
            fp_prefix: [0; 8],
            secret: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11],
        };
        let text = known.to_string();
        assert_eq!(text, "0000-0000-0000-0000-0000-0000-0001-2");
        assert_eq!(text.parse::<PairCode>().unwrap(), known);
        // Crockford reads O as 0 and I/L as 1.
        assert_eq!(
            "oooo-0000-0000-0000-0000-0000-000L-2"
                .parse::<PairCode>()
                .unwrap(),
            known
        );
    }

    #[test]
    fn bad_pair_codes_are_refused_with_a_hint() {
        let text = PairCode::generate(&Fingerprint([7; 32])).to_string();
        let bad = [
            String::new(),
            text[..text.len() - 1].to_owned(),
            format!("{text}0"),
            format!("U{}", &text[1..]),
            format!("!{}", &text[1..]),
            // The last character's spare bit must be zero.
            "0000-0000-0000-0000-0000-0000-0001-3".to_owned(),
        ];
        for s in bad {
            match s.parse::<PairCode>() {
                Err(TlsError::BadPairCode(hint)) => assert!(hint.contains("7K2M"), "{hint}"),
                other => panic!("{s:?}: expected BadPairCode, got {other:?}"),
            }
        }
    }

    #[test]
    fn fingerprint_hex_round_trips() {
        let fp = Fingerprint::of(b"cert");
        let hex = fp.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, fp.to_string());
        assert!(
            hex.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(hex.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(hex.to_uppercase().parse::<Fingerprint>().unwrap(), fp);
        // SHA-256("") is well known.
        assert_eq!(
            Fingerprint::of(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        for bad in [
            hex[..63].to_owned(),
            format!("{hex}0"),
            format!("g{}", &hex[1..]),
            String::new(),
            "+1".to_owned(),
        ] {
            assert!(
                matches!(bad.parse::<Fingerprint>(), Err(TlsError::BadFingerprint(_))),
                "{bad:?}"
            );
        }
    }
}
