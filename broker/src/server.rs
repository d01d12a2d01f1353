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
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::limits::{LimitHit, PeerLimiter};
use crate::metrics::Metrics;
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
    let handler = move |peer: SocketAddr, mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        app.clone()
            .oneshot(req)
            .map(|r| r.unwrap_or_else(|e| match e {}))
    };
    serve_fn(listener, handler, limits, metrics, shutdown).await;
}

/// [`serve`] with a plain function of the caller's address and the request, such as
/// [`crate::imds::Imds::call`]: no router, no request extensions, per request.
pub async fn serve_fn<H, F>(
    listener: TcpListener,
    handler: H,
    limits: ConnLimits,
    metrics: Metrics,
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
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            handler(peer, req).map(Ok::<_, Infallible>)
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let (metrics, slots) = (metrics.clone(), slots.clone());
        tokio::spawn(async move {
            // Errors here are the peer's doing (reset, header timeout, bad request).
            let _ = conn.await;
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
