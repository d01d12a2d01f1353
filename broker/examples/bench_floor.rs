//! The floor for the broker throughput benchmark (bench/, BENCHMARKS.md): the smallest hyper
//! HTTP/1.1 server, on the same tokio runtime the broker uses, answering every request with
//! one fixed body. Whatever the broker does beyond this (routing, the caller's pod, the role
//! policy, the credential cache, rendering) is the difference the benchmark measures.
//!
//!     cargo run --release --example bench_floor -- 127.0.0.1:9000 body.json [content-type]

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

// The same allocator as the broker's, so the floor differs from the broker only in what the
// broker does (src/main.rs).
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(body_file)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: bench_floor LISTEN_ADDR BODY_FILE [CONTENT_TYPE]");
    };
    let content_type = args.next().unwrap_or_else(|| "application/json".into());
    let listen: SocketAddr = listen.parse()?;
    let body = Bytes::from(std::fs::read(&body_file)?);

    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("bench_floor listening on {listen}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let content_type = content_type.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                let response = Response::builder()
                    .header("content-type", content_type.as_str())
                    .body(Full::new(body.clone()));
                async move { Ok::<_, Infallible>(response.unwrap_or_default()) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
