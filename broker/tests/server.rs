//! The IMDS listener's connection bounds, over real TCP on loopback: per-address and total
//! caps, the header-read timeout that closes slowloris connections, the head size limit.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use meshiam_broker::metrics::Metrics;
use meshiam_broker::server::{self, ConnLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A server with the given bounds whose one route answers the caller's address.
async fn start(limits: ConnLimits) -> (SocketAddr, Metrics) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/",
        get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
    );
    let metrics = Metrics::new();
    tokio::spawn(server::serve(
        listener,
        app,
        limits,
        metrics.clone(),
        std::future::pending(),
    ));
    (addr, metrics)
}

fn limits(per_peer: usize, total: usize, header_read_timeout: Duration) -> ConnLimits {
    ConnLimits {
        header_read_timeout,
        max_connections: total,
        max_connections_per_peer: per_peer,
    }
}

/// A connection from `from` (any 127.0.0.0/8 address works on Linux loopback).
async fn connect(server: SocketAddr, from: &str) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    s.connect(server).await.unwrap()
}

/// Sends one GET and reads the answer until the connection closes or 2 s pass.
async fn get_once(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    read_all(s).await
}

async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Holds a connection open with half a request head, as slowloris does.
async fn hold(server: SocketAddr, from: &str) -> TcpStream {
    let mut s = connect(server, from).await;
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    s
}

async fn until_metric(m: &Metrics, line: &str) {
    for _ in 0..200 {
        if m.encode().lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("metric line {line:?} never appeared:\n{}", m.encode());
}

#[tokio::test]
async fn one_address_gets_its_share_and_no_more() {
    let (addr, metrics) = start(limits(3, 100, Duration::from_secs(30))).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(hold(addr, "127.0.0.1").await);
    }
    until_metric(&metrics, "meshiam_broker_connections 3").await;

    let mut fourth = connect(addr, "127.0.0.1").await;
    let answer = get_once(&mut fourth).await;
    println!("4th connection from 127.0.0.1: {answer:?}");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("x-meshiam-reason: connection-limit"));

    // Another address is served meanwhile.
    let mut other = connect(addr, "127.0.0.2").await;
    let answer = get_once(&mut other).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("127.0.0.2"),
        "the caller's address reaches the app"
    );
    assert!(
        metrics
            .encode()
            .contains("meshiam_broker_connections_refused_total{limit=\"per-peer\"} 1")
    );

    // Closing one frees its slot.
    drop(held.pop());
    until_metric(&metrics, "meshiam_broker_connections 2").await;
    let mut again = connect(addr, "127.0.0.1").await;
    assert!(get_once(&mut again).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn the_total_cap_holds_across_addresses() {
    let (addr, metrics) = start(limits(2, 3, Duration::from_secs(30))).await;
    let _held = [
        hold(addr, "127.0.0.1").await,
        hold(addr, "127.0.0.2").await,
        hold(addr, "127.0.0.3").await,
    ];
    until_metric(&metrics, "meshiam_broker_connections 3").await;
    let mut s = connect(addr, "127.0.0.4").await;
    let answer = get_once(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        metrics
            .encode()
            .contains("meshiam_broker_connections_refused_total{limit=\"total\"} 1")
    );
}

#[tokio::test]
async fn a_head_that_never_finishes_is_closed_and_its_slot_freed() {
    let (addr, metrics) = start(limits(1, 10, Duration::from_millis(500))).await;
    let start = Instant::now();
    let mut slow = hold(addr, "127.0.0.1").await;
    // A header line now and then does not keep it open.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if slow.write_all(b"x-slow: 1\r\n").await.is_err() {
            break;
        }
    }
    let rest = read_all(&mut slow).await;
    let took = start.elapsed();
    println!("slow head closed after {took:?}, answer {rest:?}");
    assert!(
        took < Duration::from_millis(1500),
        "closed near the 500 ms timeout"
    );
    assert!(!rest.contains("200 OK"));
    until_metric(&metrics, "meshiam_broker_connections 0").await;
    let mut next = connect(addr, "127.0.0.1").await;
    assert!(get_once(&mut next).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn keep_alive_serves_several_requests_and_idles_out() {
    let (addr, metrics) = start(limits(1, 10, Duration::from_millis(500))).await;
    let mut s = connect(addr, "127.0.0.1").await;
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Idle past the timeout: the broker closes it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "closed by the broker");
    until_metric(&metrics, "meshiam_broker_connections 0").await;
}

#[tokio::test]
async fn an_oversized_head_is_refused() {
    let (addr, _) = start(limits(4, 10, Duration::from_secs(5))).await;
    let mut s = connect(addr, "127.0.0.1").await;
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(server::MAX_HEAD_BYTES + 1)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let answer = read_all(&mut s).await;
    println!("oversized head: {:?}", answer.lines().next());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}
