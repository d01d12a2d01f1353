//! The IMDS listener with `--mtls` (issue 15), over real TCP on loopback: TLS and plain
//! HTTP on one port, the client certificate reaching the request, and the connection caps
//! and timeout holding before and during the handshake.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::routing::get;
use meshiam_broker::metrics::Metrics;
use meshiam_broker::mtls::{MtlsFiles, TlsTerminator, Transport};
use meshiam_broker::server::{self, ConnLimits};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mtls")
        .join(name)
}

/// A TLS-terminating server whose one route says how the connection came in.
async fn start(limits: ConnLimits) -> (SocketAddr, Metrics) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = TlsTerminator::load(
        MtlsFiles {
            roots: fixture("root.pem"),
            cert: fixture("broker.pem"),
            key: fixture("broker-key.pem"),
        },
        "cluster.local",
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/",
        get(|req: Request| async move {
            match req.extensions().get::<Transport>() {
                Some(Transport::Tls(peer)) => match peer.verify() {
                    Ok(id) => id.to_string(),
                    Err(e) => format!("tls {e:?}"),
                },
                Some(Transport::Plain) => "plain extension".to_string(),
                // A plain connection's requests carry no transport (server::serve_fn).
                None => "plain".to_string(),
            }
        }),
    );
    let metrics = Metrics::new();
    tokio::spawn(server::serve_with_tls(
        listener,
        app,
        limits,
        metrics.clone(),
        Some(tls),
        std::future::pending(),
    ));
    (addr, metrics)
}

/// The broker's certificate names a SPIFFE ID, not an address: the sidecar checks that ID,
/// these tests check the broker's side only.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn tls_get(addr: SocketAddr, with_cert: bool) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = if with_cert {
        let chain = CertificateDer::pem_file_iter(fixture("myapp.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(fixture("myapp-key.pem")).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = connector
        .connect(ServerName::try_from("meshiam-broker").unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn limits(per_peer: usize, header_read_timeout: Duration) -> ConnLimits {
    ConnLimits {
        header_read_timeout,
        max_connections: 16,
        max_connections_per_peer: per_peer,
    }
}

#[tokio::test]
async fn tls_and_plain_share_the_port_and_the_certificate_reaches_the_request() {
    let (addr, metrics) = start(limits(8, Duration::from_secs(2))).await;
    let answer = tls_get(addr, true).await;
    assert!(
        answer.starts_with("HTTP/1.1 200")
            && answer.ends_with("spiffe://cluster.local/ns/default/sa/myapp"),
        "{answer}"
    );
    let answer = tls_get(addr, false).await;
    assert!(answer.ends_with("tls Missing"), "{answer}");
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), plain.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).ends_with("plain"));
    let text = metrics.encode();
    assert!(
        text.contains("meshiam_broker_mtls_connections_total{result=\"tls\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("meshiam_broker_mtls_connections_total{result=\"plain\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_stalled_handshake_holds_its_slot_only_until_the_timeout() {
    let (addr, metrics) = start(limits(1, Duration::from_secs(1))).await;
    // The first byte of a handshake, then nothing.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The address's one slot is taken: a second connection is refused at once.
    let mut second = TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), second.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).contains("x-meshiam-reason: connection-limit"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // The stalled one is closed by the timeout, and its slot freed.
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), stalled.read(&mut buf))
        .await
        .expect("the stalled handshake was not closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(t0.elapsed() < Duration::from_millis(1500));
    for _ in 0..100 {
        if metrics
            .encode()
            .contains("meshiam_broker_mtls_connections_total{result=\"handshake-timeout\"} 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        metrics
            .encode()
            .contains("meshiam_broker_mtls_connections_total{result=\"handshake-timeout\"} 1")
    );
    assert!(tls_get(addr, true).await.starts_with("HTTP/1.1 200"));
}
