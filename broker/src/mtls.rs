//! Identity proven by the mesh: the call-out over mutual TLS, carrying the pod's workload
//! certificate (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`).
//!
//! The IMDS listener (`server.rs`) looks at a connection's first byte: a TLS handshake is
//! terminated here, anything else is plain HTTP as before, so sidecars with certificates and
//! direct callers share the one port and the one address the mesh routes to. The handshake
//! asks for a client certificate and checks that the client holds its key; whether the chain
//! is good is decided afterwards, against the roots as they are *now* (they are reloaded
//! while connections stay open), so that a bad certificate is refused with an HTTP answer
//! and a reason code (`peer-certificate-invalid`) rather than a bare TLS alert the filter
//! could only report as "broker unreachable".
//!
//! Each request then requires the verified namespace and service account to be those of the
//! pod at the caller's address (`--mtls preferred|required`); a plain connection, or TLS
//! without a certificate, is served in `preferred` and refused in `required` unless the
//! pod's namespace carries [`PLAIN_CALLERS_ANNOTATION`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use webpki::{EndEntityCert, KeyUsage};

use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::pods::{Namespace, Pod};

/// The namespace annotation that lets plain-HTTP callers (pods without a sidecar) of that
/// namespace through under `--mtls required`: `"true"`; any other value counts as absent.
pub const PLAIN_CALLERS_ANNOTATION: &str = "meshiam.io/allow-plain-callers";

/// How often the roots and the broker's own certificate are read again.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// A TLS connection's verdict is this old at most before the connection is closed after an
/// answer (and at once when the roots change), so an expired certificate or a removed root
/// stops counting on connections that never go idle.
const REVERIFY_AFTER: Duration = Duration::from_secs(10);

/// `--mtls`: what the broker asks of the call-out's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MtlsMode {
    /// Plain HTTP only (no TLS on the IMDS port); identity by source address.
    #[default]
    Off,
    /// TLS and plain HTTP on the same port: a presented certificate must be valid and name
    /// the pod at the caller's address; callers without one are served as under `off`.
    Preferred,
    /// No answer without a valid certificate naming the pod at the caller's address, except
    /// to plain callers of namespaces annotated `meshiam.io/allow-plain-callers: "true"`.
    Required,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Off => "off",
            MtlsMode::Preferred => "preferred",
            MtlsMode::Required => "required",
        }
    }
}

/// The request-time part of the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MtlsPolicy {
    pub mode: MtlsMode,
    /// The SPIFFE trust domain workload certificates must be in (`--mtls-trust-domain`).
    pub trust_domain: String,
}

impl Default for MtlsPolicy {
    fn default() -> Self {
        Self {
            mode: MtlsMode::Off,
            trust_domain: "cluster.local".into(),
        }
    }
}

/// A workload's SPIFFE identity as Istio (and SPIRE's Kubernetes workload registrar) name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`; any other shape is `None`.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !(ok(td) && ok(ns) && ok(sa)) {
            return None;
        }
        Some(Self {
            trust_domain: td.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Why a connection's certificate does not identify anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerCertError {
    /// TLS without a client certificate.
    Missing,
    /// A certificate was presented but does not hold: the detail says why.
    Invalid(String),
}

/// The mesh's root certificates, replaced as a whole when the file or directory changes.
#[derive(Debug, Default)]
pub struct TrustRoots {
    current: RwLock<Arc<RootSet>>,
}

#[derive(Debug, Default)]
struct RootSet {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    /// Bumped on every replacement: connections verified under an older set verify again.
    generation: u64,
}

impl TrustRoots {
    fn get(&self) -> Arc<RootSet> {
        self.current
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn replace(&self, anchors: Vec<rustls::pki_types::TrustAnchor<'static>>) {
        let mut g = self.current.write().unwrap_or_else(|p| p.into_inner());
        let generation = g.generation + 1;
        *g = Arc::new(RootSet {
            anchors,
            generation,
        });
    }

    pub fn len(&self) -> usize {
        self.get().anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parses PEM certificates into trust anchors; an empty set is an error (it would refuse
    /// everyone, which a half-written file should not be able to cause).
    fn parse(pem: &[u8]) -> Result<Vec<rustls::pki_types::TrustAnchor<'static>>, String> {
        let mut anchors = Vec::new();
        for der in CertificateDer::pem_slice_iter(pem) {
            let der = der.map_err(|e| format!("not PEM certificates: {e}"))?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| format!("not a usable root certificate: {e}"))?;
            anchors.push(anchor.to_owned());
        }
        if anchors.is_empty() {
            return Err("no certificate found".into());
        }
        Ok(anchors)
    }
}

/// The broker's own certificate and key (`--mtls-cert`, `--mtls-key`), reloaded on change.
#[derive(Debug, Default)]
pub struct ServerCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ServerCert {
    fn load(
        cert_pem: &[u8],
        key_pem: &[u8],
        provider: &CryptoProvider,
    ) -> Result<CertifiedKey, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--mtls-cert: not PEM certificates: {e}"))?;
        if chain.is_empty() {
            return Err("--mtls-cert: no certificate found".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| format!("--mtls-key: no PEM private key: {e}"))?;
        CertifiedKey::from_der(chain, key, provider)
            .map_err(|e| format!("--mtls-cert/--mtls-key: {e}"))
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// Asks for a client certificate, accepts the handshake with or without one, and checks
/// only that the client holds the presented certificate's key. The chain is judged per
/// request by [`TlsPeer::verify`], which can answer with a reason.
#[derive(Debug)]
struct ProofOfPossession {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ProofOfPossession {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Where the TLS material comes from (`--mtls-roots`, `--mtls-cert`, `--mtls-key`).
#[derive(Debug, Clone, PartialEq)]
pub struct MtlsFiles {
    pub roots: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything the IMDS listener needs to terminate TLS. Cheap to clone.
#[derive(Clone)]
pub struct TlsTerminator {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub roots: Arc<TrustRoots>,
    pub trust_domain: Arc<str>,
    server_cert: Arc<ServerCert>,
    provider: Arc<CryptoProvider>,
    files: MtlsFiles,
}

impl fmt::Debug for TlsTerminator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTerminator")
            .field("files", &self.files)
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl TlsTerminator {
    /// Loads the roots and the broker's certificate; any failure here stops the broker at
    /// start (later bad versions are skipped by [`TlsTerminator::watch`]).
    pub fn load(files: MtlsFiles, trust_domain: &str) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(TrustRoots::default());
        let pem = read_roots(&files.roots)?;
        roots.replace(
            TrustRoots::parse(&pem)
                .map_err(|e| format!("--mtls-roots {}: {e}", files.roots.display()))?,
        );
        let server_cert = Arc::new(ServerCert::default());
        let (cert_pem, key_pem) = read_pair(&files)?;
        let ck = ServerCert::load(&cert_pem, &key_pem, &provider)?;
        *server_cert
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(ck));

        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_client_cert_verifier(Arc::new(ProofOfPossession {
                provider: provider.clone(),
            }))
            .with_cert_resolver(server_cert.clone());
        // HTTP/1.1 only, as on the plain port. Istio's ISTIO_MUTUAL offers its own ALPN
        // names first; without a list here the server simply picks none.
        config.alpn_protocols = Vec::new();
        // Resumed sessions skip the key exchange and the certificate messages on reconnects
        // (the sidecar closes idle connections after 3 s). The client's certificate comes
        // back with the session and is verified per request as on a full handshake.
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| format!("TLS session tickets: {e}"))?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            roots,
            trust_domain: Arc::from(trust_domain),
            server_cert,
            provider,
            files,
        })
    }

    /// Polls the files every [`RELOAD_INTERVAL`]; a changed, valid set replaces the old one,
    /// an invalid one is logged and skipped (the last good one stays).
    pub async fn watch(self, metrics: Metrics) {
        let mut last_roots = read_roots(&self.files.roots).ok();
        let mut last_pair = read_pair(&self.files).ok();
        metrics.set_mtls_roots(self.roots.len());
        loop {
            tokio::time::sleep(RELOAD_INTERVAL).await;
            if let Ok(pem) = read_roots(&self.files.roots)
                && last_roots.as_ref() != Some(&pem)
            {
                match TrustRoots::parse(&pem) {
                    Ok(anchors) => {
                        tracing::info!(roots = anchors.len(), path = %self.files.roots.display(), "mTLS roots reloaded");
                        self.roots.replace(anchors);
                        metrics.mtls_reload("roots", "ok");
                        metrics.set_mtls_roots(self.roots.len());
                        last_roots = Some(pem);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, path = %self.files.roots.display(), "mTLS roots not reloaded; keeping the last good ones");
                        metrics.mtls_reload("roots", "invalid");
                        last_roots = Some(pem);
                    }
                }
            }
            if let Ok(pair) = read_pair(&self.files)
                && last_pair.as_ref() != Some(&pair)
            {
                match ServerCert::load(&pair.0, &pair.1, &self.provider) {
                    Ok(ck) => {
                        tracing::info!("broker certificate reloaded");
                        *self
                            .server_cert
                            .current
                            .write()
                            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(ck));
                        metrics.mtls_reload("certificate", "ok");
                        last_pair = Some(pair);
                    }
                    // Cert and key written one after the other: the next poll sees both.
                    Err(e) => {
                        tracing::warn!(error = %e, "broker certificate not reloaded; keeping the last good one");
                        metrics.mtls_reload("certificate", "invalid");
                        last_pair = Some(pair);
                    }
                }
            }
        }
    }

    /// What a finished handshake tells about the peer.
    pub fn peer(&self, conn: &rustls::ServerConnection) -> TlsPeer {
        TlsPeer {
            chain: conn
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
                .unwrap_or_default(),
            roots: self.roots.clone(),
            trust_domain: self.trust_domain.clone(),
            provider: self.provider.clone(),
            verdict: OnceLock::new(),
        }
    }
}

/// The roots file, or every file of the roots directory (names starting with `.` skipped:
/// a mounted ConfigMap's `..data` links), concatenated.
fn read_roots(path: &Path) -> Result<Vec<u8>, String> {
    let err = |e: std::io::Error| format!("--mtls-roots {}: {e}", path.display());
    if path.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(err)?
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        let mut all = Vec::new();
        for n in names {
            all.extend(std::fs::read(&n).map_err(err)?);
            all.push(b'\n');
        }
        Ok(all)
    } else {
        std::fs::read(path).map_err(err)
    }
}

fn read_pair(files: &MtlsFiles) -> Result<(Vec<u8>, Vec<u8>), String> {
    let cert = std::fs::read(&files.cert)
        .map_err(|e| format!("--mtls-cert {}: {e}", files.cert.display()))?;
    let key = std::fs::read(&files.key)
        .map_err(|e| format!("--mtls-key {}: {e}", files.key.display()))?;
    Ok((cert, key))
}

/// How a request's connection came in; a request extension set by the IMDS listener.
#[derive(Clone)]
pub enum Transport {
    Plain,
    Tls(Arc<TlsPeer>),
}

/// A TLS peer: its certificate chain, judged against the roots of the moment on the
/// connection's first request. The verdict holds for the connection, which is closed after
/// an answer (`connection: close`, see [`TlsPeer::due_for_reverification`]) once the roots
/// have changed or [`REVERIFY_AFTER`] has passed: the client reconnects and is judged again,
/// and no request in flight is lost to a rotation.
pub struct TlsPeer {
    chain: Vec<CertificateDer<'static>>,
    roots: Arc<TrustRoots>,
    trust_domain: Arc<str>,
    provider: Arc<CryptoProvider>,
    verdict: OnceLock<Verdict>,
}

struct Verdict {
    generation: u64,
    at: Instant,
    result: Result<SpiffeId, PeerCertError>,
}

impl TlsPeer {
    /// The peer's SPIFFE identity, if its chain leads to a current root, is valid now, is
    /// meant for client authentication, and names exactly one SPIFFE ID in the trust domain.
    pub fn verify(&self) -> Result<SpiffeId, PeerCertError> {
        self.verdict
            .get_or_init(|| {
                let roots = self.roots.get();
                Verdict {
                    generation: roots.generation,
                    at: Instant::now(),
                    result: self.verify_now(&roots),
                }
            })
            .result
            .clone()
    }

    /// True once the verdict is older than the roots or than [`REVERIFY_AFTER`]: the
    /// connection should close after its current answer.
    pub fn due_for_reverification(&self) -> bool {
        self.verdict.get().is_some_and(|v| {
            v.generation != self.roots.get().generation || v.at.elapsed() >= REVERIFY_AFTER
        })
    }

    fn verify_now(&self, roots: &RootSet) -> Result<SpiffeId, PeerCertError> {
        let Some((leaf, intermediates)) = self.chain.split_first() else {
            return Err(PeerCertError::Missing);
        };
        let invalid = |s: String| Err(PeerCertError::Invalid(s));
        let ee = match EndEntityCert::try_from(leaf) {
            Ok(ee) => ee,
            Err(e) => return invalid(format!("unreadable certificate: {e}")),
        };
        let now = UnixTime::since_unix_epoch(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        if let Err(e) = ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &roots.anchors,
            intermediates,
            now,
            KeyUsage::client_auth(),
            None,
            None,
        ) {
            return invalid(format!("chain does not verify against the mesh roots: {e}"));
        }
        let uris = match uri_sans(leaf.as_ref()) {
            Some(u) => u,
            None => return invalid("unreadable subjectAltName".into()),
        };
        let spiffe: Vec<&String> = uris.iter().filter(|u| u.starts_with("spiffe://")).collect();
        let [uri] = spiffe.as_slice() else {
            return invalid(format!(
                "{} SPIFFE IDs in the subjectAltName (want exactly one)",
                spiffe.len()
            ));
        };
        let Some(id) = SpiffeId::parse(uri) else {
            return invalid(format!(
                "SPIFFE ID {:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
                uri.chars().take(200).collect::<String>()
            ));
        };
        if id.trust_domain != *self.trust_domain {
            return invalid(format!(
                "SPIFFE ID {id} is not in trust domain {}",
                self.trust_domain
            ));
        }
        Ok(id)
    }
}

/// The request-time rule. `Ok(Some(id))`: the verified identity (for the audit line);
/// `Ok(None)`: a caller without a certificate, let through by the mode or its namespace.
pub fn check(
    policy: &MtlsPolicy,
    transport: Option<&Transport>,
    pod: &Pod,
    ns: Option<&Namespace>,
) -> Result<Option<SpiffeId>, BrokerError> {
    if policy.mode == MtlsMode::Off {
        return Ok(None);
    }
    let how = match transport {
        Some(Transport::Tls(peer)) => match peer.verify() {
            Ok(id) => {
                if id.namespace == pod.namespace && id.service_account == pod.service_account {
                    return Ok(Some(id));
                }
                return Err(BrokerError::PeerIdentityMismatch {
                    peer: id.to_string(),
                    pod: format!("{} (service account {})", pod.key(), pod.service_account),
                });
            }
            Err(PeerCertError::Invalid(detail)) => {
                return Err(BrokerError::PeerCertificateInvalid(detail));
            }
            Err(PeerCertError::Missing) => "TLS without a client certificate",
        },
        _ => "plain HTTP",
    };
    if policy.mode == MtlsMode::Preferred || plain_allowed(ns) {
        return Ok(None);
    }
    Err(BrokerError::PeerCertificateMissing(how))
}

fn plain_allowed(ns: Option<&Namespace>) -> bool {
    ns.and_then(|n| n.annotations().get(PLAIN_CALLERS_ANNOTATION))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// One DER element: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (usize::from(len0), rest)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The URI entries of a certificate's subjectAltName extension (empty when it has none);
/// `None` when the DER cannot be read. The chain has been verified before this is asked,
/// so the encoding is webpki-checked; this only walks it.
fn uri_sans(cert: &[u8]) -> Option<Vec<String>> {
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];
    let (0x30, certificate, _) = tlv(cert)? else {
        return None;
    };
    let (0x30, mut tbs, _) = tlv(certificate)? else {
        return None;
    };
    let mut out = Vec::new();
    while !tbs.is_empty() {
        let (tag, contents, rest) = tlv(tbs)?;
        tbs = rest;
        if tag != 0xa3 {
            continue;
        }
        let (0x30, mut exts, _) = tlv(contents)? else {
            return None;
        };
        while !exts.is_empty() {
            let (_, ext, rest) = tlv(exts)?;
            exts = rest;
            let (0x06, oid, mut fields) = tlv(ext)? else {
                return None;
            };
            if oid != SAN_OID {
                continue;
            }
            // critical BOOLEAN (optional), then the OCTET STRING.
            let (mut tag, mut value, _) = tlv(fields)?;
            if tag == 0x01 {
                (_, _, fields) = tlv(fields)?;
                (tag, value, _) = tlv(fields)?;
            }
            if tag != 0x04 {
                return None;
            }
            let (0x30, mut names, _) = tlv(value)? else {
                return None;
            };
            while !names.is_empty() {
                let (tag, name, rest) = tlv(names)?;
                names = rest;
                // [6] IMPLICIT IA5String: uniformResourceIdentifier.
                if tag == 0x86 {
                    out.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_of_the_kubernetes_shape_only() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/myapp").unwrap();
        assert_eq!(
            (
                id.trust_domain.as_str(),
                id.namespace.as_str(),
                id.service_account.as_str()
            ),
            ("cluster.local", "default", "myapp")
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/myapp");
        for bad in [
            "spiffe://cluster.local/ns/default/sa/myapp/extra",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/sa/myapp/ns/default",
            "spiffe://cluster.local/ns//sa/myapp",
            "spiffe:///ns/default/sa/myapp",
            "https://cluster.local/ns/default/sa/myapp",
            "spiffe://cluster.local/ns/de fault/sa/myapp",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad}");
        }
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mtls/");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}{name}")).unwrap()
    }

    fn roots(names: &[&str]) -> Arc<TrustRoots> {
        let r = Arc::new(TrustRoots::default());
        let pem: Vec<u8> = names.iter().flat_map(|n| fixture(n)).collect();
        r.replace(TrustRoots::parse(&pem).unwrap());
        r
    }

    fn peer(leaf: &str, roots: &Arc<TrustRoots>) -> TlsPeer {
        TlsPeer {
            chain: CertificateDer::pem_slice_iter(&fixture(leaf))
                .map(Result::unwrap)
                .collect(),
            roots: roots.clone(),
            trust_domain: Arc::from("cluster.local"),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            verdict: OnceLock::new(),
        }
    }

    fn pod(ns: &str, sa: &str) -> Pod {
        Pod {
            namespace: ns.into(),
            name: "p".into(),
            uid: "u".into(),
            ips: vec![],
            service_account: sa.into(),
            node: "n".into(),
            host_network: false,
            phase: crate::pods::PodPhase::Running,
            annotations: Default::default(),
        }
    }

    fn reason(r: Result<Option<SpiffeId>, BrokerError>) -> &'static str {
        match r {
            Ok(Some(_)) => "verified",
            Ok(None) => "plain-allowed",
            Err(e) => e.reason(),
        }
    }

    #[test]
    fn workload_certificates_are_verified_against_the_roots() {
        let mesh = roots(&["root.pem"]);
        let id = peer("myapp.pem", &mesh).verify().unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/myapp");
        for (leaf, why) in [
            ("foreign-myapp.pem", "chain does not verify"),
            ("other-domain.pem", "not in trust domain cluster.local"),
            ("no-spiffe.pem", "0 SPIFFE IDs"),
            ("two-spiffe.pem", "2 SPIFFE IDs"),
        ] {
            match peer(leaf, &mesh).verify() {
                Err(PeerCertError::Invalid(d)) => assert!(d.contains(why), "{leaf}: {d}"),
                other => panic!("{leaf}: {other:?}"),
            }
        }
        // Both roots trusted (a root rotation's middle step): both verify.
        let both = roots(&["root.pem", "foreign-root.pem"]);
        assert!(peer("foreign-myapp.pem", &both).verify().is_ok());
        let empty = TlsPeer {
            chain: vec![],
            ..peer("myapp.pem", &mesh)
        };
        assert_eq!(empty.verify(), Err(PeerCertError::Missing));
    }

    #[test]
    fn a_verdict_outlives_no_root_change() {
        let mesh = roots(&["root.pem"]);
        let p = peer("myapp.pem", &mesh);
        assert!(!p.due_for_reverification(), "not judged yet");
        assert!(p.verify().is_ok());
        assert!(!p.due_for_reverification());
        mesh.replace(TrustRoots::parse(&fixture("foreign-root.pem")).unwrap());
        // The connection keeps its verdict for the answer in flight, then closes.
        assert!(p.verify().is_ok());
        assert!(p.due_for_reverification());
        // Its next connection is judged by the new roots.
        assert!(matches!(
            peer("myapp.pem", &mesh).verify(),
            Err(PeerCertError::Invalid(_))
        ));
        assert!(TrustRoots::parse(b"").is_err());
        assert!(TrustRoots::parse(b"-----BEGIN CERTIFICATE-----\nnot base64\n").is_err());
    }

    #[test]
    fn the_rule_per_mode() {
        let mesh = roots(&["root.pem"]);
        let tls = |leaf| Transport::Tls(Arc::new(peer(leaf, &mesh)));
        let policy = |mode| MtlsPolicy {
            mode,
            ..MtlsPolicy::default()
        };
        let myapp = pod("default", "myapp");
        let other = pod("default", "other");
        let open = Namespace::new(
            "default",
            [(PLAIN_CALLERS_ANNOTATION.to_string(), "true".to_string())].into(),
        );
        let closed = Namespace::new("default", Default::default());
        use MtlsMode::*;
        type Case<'a> = (
            MtlsMode,
            Option<Transport>,
            &'a Pod,
            Option<&'a Namespace>,
            &'a str,
        );
        let cases: &[Case] = &[
            (
                Off,
                Some(tls("foreign-myapp.pem")),
                &myapp,
                None,
                "plain-allowed",
            ),
            (Preferred, None, &myapp, None, "plain-allowed"),
            (
                Preferred,
                Some(Transport::Plain),
                &myapp,
                Some(&closed),
                "plain-allowed",
            ),
            (Preferred, Some(tls("myapp.pem")), &myapp, None, "verified"),
            (
                Preferred,
                Some(tls("myapp.pem")),
                &other,
                None,
                "peer-identity-mismatch",
            ),
            (
                Preferred,
                Some(tls("foreign-myapp.pem")),
                &myapp,
                None,
                "peer-certificate-invalid",
            ),
            (
                Required,
                Some(Transport::Plain),
                &myapp,
                Some(&closed),
                "peer-certificate-missing",
            ),
            (Required, None, &myapp, None, "peer-certificate-missing"),
            (
                Required,
                Some(Transport::Plain),
                &myapp,
                Some(&open),
                "plain-allowed",
            ),
            (
                Required,
                Some(tls("myapp.pem")),
                &myapp,
                Some(&closed),
                "verified",
            ),
            (
                Required,
                Some(tls("myapp.pem")),
                &other,
                Some(&open),
                "peer-identity-mismatch",
            ),
            (
                Required,
                Some(tls("no-spiffe.pem")),
                &myapp,
                Some(&open),
                "peer-certificate-invalid",
            ),
        ];
        for (i, (mode, transport, pod, ns, want)) in cases.iter().enumerate() {
            let got = reason(check(&policy(*mode), transport.as_ref(), pod, *ns));
            assert_eq!(got, *want, "case {i}: {mode:?}");
        }
    }

    #[test]
    fn der_lengths_are_bounded() {
        assert_eq!(
            tlv(&[0x30, 0x02, 1, 2, 3]),
            Some((0x30, &[1u8, 2][..], &[3u8][..]))
        );
        assert_eq!(tlv(&[0x30, 0x03, 1, 2]), None);
        assert_eq!(
            tlv(&[0x30, 0x81, 0x01, 9]),
            Some((0x30, &[9u8][..], &[][..]))
        );
        assert_eq!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(tlv(&[0x30]), None);
        assert_eq!(uri_sans(&[0x30, 0x00]), None);
    }
}
