//! The IMDS listener: accepts connections under per-address and node-wide caps, and serves
//! HTTP/1.1 with a bound on how long a request head may take.
//!
//! Why not `axum::serve`: it holds every connection as long as the peer likes. A pod that
//! opens thousands of connections and sends a header line now and then (slowloris) would
//! hold them all, and their buffers, until the broker is OOM-killed — taking credentials
//! away from every pod on the node. Here:
//! - a connection past `--max-connections-per-peer` (from one address) or
//!   `--max-connections` (in all) gets `503` with `x-meshiam-reason: connection-limit` and
//!   is closed at once, costing the broker one accept and one small write;
//! - a request head must arrive whole within `--header-read-timeout`. The clock runs from
//!   when the broker starts waiting for the head, on a new connection and again between
//!   keep-alive requests, so it is also the idle keep-alive limit;
//! - a request head is at most [`MAX_HEAD_BYTES`] (`431` past it), so a held connection
//!   costs a few KiB, not hyper's default ~400 KiB of buffer.
//!
//! The time a parsed request may take is `--request-timeout` (the router's layer).
//!
//! With `--mtls preferred|required` the same port also terminates TLS (see `mtls.rs`): the
//! first byte tells a TLS handshake (`0x16`) from a plain request. The connection's slot is
//! taken before that, and the wait for the first byte and the whole handshake share one
//! `--header-read-timeout`, so a peer that connects and stalls costs what a slowloris does.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use futures::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::limits::{LimitHit, PeerLimiter};
use crate::metrics::Metrics;
use crate::mtls::{TlsTerminator, Transport};
use crate::pods::canonical;

/// The largest request head (request line and headers) the IMDS listener reads. IMDS
/// requests are a path and a few short headers; Envoy's call-out with its headers is well
/// under 2 KiB.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// How long open connections may take to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);

/// The connection bounds (`--header-read-timeout`, `--max-connections`,
/// `--max-connections-per-peer`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 2048,
            max_connections_per_peer: 64,
        }
    }
}

/// What a refused connection is told before it is closed.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain\r\n\
x-meshiam-reason: connection-limit\r\n\
connection: close\r\n\
content-length: 33\r\n\
\r\n\
too many connections, retry later";

/// Serves `app` on `listener` until `shutdown` completes, then lets open connections finish
/// for up to 10 s. The caller's address reaches `app` as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    serve_with_tls(listener, app, limits, metrics, None, shutdown).await;
}

/// [`serve`], terminating TLS on connections that begin with a handshake when `tls` is set
/// (a TLS connection's requests carry its [`Transport`] as an extension).
pub async fn serve_with_tls(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    metrics: Metrics,
    tls: Option<TlsTerminator>,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |peer: SocketAddr, mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        app.clone()
            .oneshot(req)
            .map(|r| r.unwrap_or_else(|e| match e {}))
    };
    serve_fn(listener, handler, limits, metrics, tls, shutdown).await;
}

/// [`serve_with_tls`] with a plain function of the caller's address and the request, such as
/// [`crate::imds::Imds::call`]: no router in between. A TLS connection's requests carry its
/// [`Transport`] as an extension; a plain connection's carry none.
pub async fn serve_fn<H, F>(
    listener: TcpListener,
    handler: H,
    limits: ConnLimits,
    metrics: Metrics,
    tls: Option<TlsTerminator>,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(SocketAddr, hyper::Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let slots = PeerLimiter::new(limits.max_connections_per_peer, limits.max_connections);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let refusals = RefusalLog::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or a peer gone before accept: keep serving
                    // the connections we have, try again shortly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let ip = canonical(peer.ip());
        let permit = match slots.try_acquire(ip) {
            Ok(p) => p,
            Err(hit) => {
                metrics.connection_refused(hit.as_str());
                refusals.note(ip, hit);
                refuse(&stream);
                continue;
            }
        };
        metrics.set_connections(slots.in_use());
        let (handler, http, watcher) = (handler.clone(), http.clone(), graceful.watcher());
        let (metrics, slots, tls) = (metrics.clone(), slots.clone(), tls.clone());
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let conn = Conn {
                handler,
                http,
                watcher,
                peer,
            };
            match tls {
                None => conn.serve(stream, Transport::Plain).await,
                Some(tls) => {
                    match tokio::time::timeout(handshake_timeout, begin(stream, &tls)).await {
                        Ok(Ok(Begun::Plain(stream))) => {
                            metrics.mtls_connection("plain");
                            conn.serve(stream, Transport::Plain).await;
                        }
                        Ok(Ok(Begun::Tls(stream))) => {
                            metrics.mtls_connection("tls");
                            let peer = tls.peer(stream.get_ref().1);
                            conn.serve(stream, Transport::Tls(std::sync::Arc::new(peer)))
                                .await;
                        }
                        Ok(Err(e)) => {
                            metrics.mtls_connection("handshake-failed");
                            tracing::debug!(caller = %ip, error = %e, "TLS handshake failed");
                        }
                        Err(_) => metrics.mtls_connection("handshake-timeout"),
                    }
                }
            }
            drop(permit);
            metrics.set_connections(slots.in_use());
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN) => {
            tracing::warn!("connections still open after the drain time; closing them");
        }
    }
}

enum Begun {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Waits for the first byte: a TLS handshake record (`0x16`) is answered with the handshake,
/// anything else is left for the HTTP parser.
async fn begin(stream: TcpStream, tls: &TlsTerminator) -> std::io::Result<Begun> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    if n == 1 && first[0] == 0x16 {
        // TLS writes a response as several records; without this, Nagle holds the later
        // ones until the peer acknowledges the first (measured: +1 ms per call-out).
        let _ = stream.set_nodelay(true);
        let s = tls.acceptor.accept(stream).await?;
        Ok(Begun::Tls(Box::new(s)))
    } else {
        Ok(Begun::Plain(stream))
    }
}

/// One accepted connection's HTTP side.
struct Conn<H> {
    handler: H,
    http: hyper::server::conn::http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    peer: SocketAddr,
}

impl<H, F> Conn<H>
where
    H: Fn(SocketAddr, hyper::Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    async fn serve<I>(self, io: I, transport: Transport)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            handler,
            http,
            watcher,
            peer,
        } = self;
        let tls = matches!(transport, Transport::Tls(_));
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            // Plain requests carry nothing: the handler takes no extension as plain.
            if tls {
                req.extensions_mut().insert(transport.clone());
            }
            handler(peer, req).map(Ok::<_, Infallible>)
        });
        // Errors here are the peer's doing (reset, header timeout, bad request).
        let _ = watcher
            .watch(http.serve_connection(TokioIo::new(io), service))
            .await;
    }
}

/// Tells a refused peer why, without waiting on it: a fresh socket's send buffer takes the
/// few bytes at once; if not, the peer just sees the close.
fn refuse(stream: &TcpStream) {
    // Read what already arrived, so closing does not turn into a reset that could discard
    // the answer at the peer.
    let mut sink = [0u8; 4096];
    let _ = stream.try_read(&mut sink);
    let _ = stream.try_write(REFUSED);
}

/// Logs refused connections at most once every 10 s, with the count since the last line,
/// so a flood of them cannot flood the log.
#[derive(Default)]
struct RefusalLog {
    since_ms: AtomicU64,
    count: AtomicU64,
    started: std::sync::OnceLock<Instant>,
}

impl RefusalLog {
    fn note(&self, ip: IpAddr, hit: LimitHit) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let start = self.started.get_or_init(Instant::now);
        let now_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.since_ms.load(Ordering::Relaxed);
        if n == 1 || now_ms.saturating_sub(last) >= 10_000 {
            self.since_ms.store(now_ms, Ordering::Relaxed);
            self.count.store(0, Ordering::Relaxed);
            tracing::warn!(
                caller = %ip,
                limit = hit.as_str(),
                refused = n,
                "connections refused: limit reached (count since the last such line)"
            );
        }
    }
}
