//! Overhead of the secretless egress proxy against a direct connection to the same upstream,
//! side by side in one run: per-request latency (p50, p99) on a kept-alive connection, the
//! cost of a new connection, and throughput with concurrent connections. Everything runs on
//! loopback: the upstream is a real hyper + rustls server, the client a real hyper client
//! over rustls; through the proxy it sends a placeholder that the proxy replaces.
//!
//! `cargo bench --bench secretless` (optional env: BENCH_REQUESTS, BENCH_SECONDS, BENCH_CONCURRENCY).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/secretless_kit/mod.rs"]
mod kit;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use kit::*;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A client on one kept-alive HTTP/1.1 connection, either straight to the upstream or through
/// the proxy.
enum Client {
    Direct(hyper::client::conn::http1::SendRequest<Full<Bytes>>, String),
    Proxied(SandboxClient),
}

impl Client {
    async fn direct(pki: &UpstreamPki, upstream: &Upstream) -> Self {
        let tcp = tokio::net::TcpStream::connect(upstream.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(ALLOWED).unwrap(), tcp)
            .await
            .unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self::Direct(sender, format!("{ALLOWED}:{}", upstream.port()))
    }

    async fn proxied(proxy: &RunningProxy, upstream: &Upstream) -> Self {
        Self::Proxied(proxy.tunnel(ALLOWED, upstream.port(), false).await)
    }

    /// One GET; returns the body length.
    async fn get(&mut self, path: &str) -> usize {
        match self {
            Self::Direct(sender, host) => {
                let req = http::Request::builder()
                    .uri(path)
                    .header("host", host.as_str())
                    .header("authorization", format!("Bearer {BEARER_VALUE}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                sender.ready().await.unwrap();
                let response = sender.send_request(req).await.unwrap();
                assert!(response.status().is_success());
                response
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .len()
            }
            Self::Proxied(client) => {
                let auth = format!("Bearer {BEARER_PH}");
                let seen = client.get(path, &[("authorization", auth.as_str())]).await;
                assert!(seen.status.is_success(), "{}", seen.body);
                seen.body.len()
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

struct Row {
    what: String,
    direct: Vec<Duration>,
    proxied: Vec<Duration>,
}

impl Row {
    fn print(&mut self) {
        self.direct.sort();
        self.proxied.sort();
        let (d50, d99) = (
            percentile(&self.direct, 0.5),
            percentile(&self.direct, 0.99),
        );
        let (p50, p99) = (
            percentile(&self.proxied, 0.5),
            percentile(&self.proxied, 0.99),
        );
        println!(
            "| {} | {} / {} | {} / {} | +{} / +{} |",
            self.what,
            micros(d50),
            micros(d99),
            micros(p50),
            micros(p99),
            micros(p50.saturating_sub(d50)),
            micros(p99.saturating_sub(d99)),
        );
    }
}

async fn latencies(
    pki: &UpstreamPki,
    upstream: &Upstream,
    proxy: &RunningProxy,
    path: &str,
    n: u64,
) -> Row {
    let mut direct = Client::direct(pki, upstream).await;
    let mut proxied = Client::proxied(proxy, upstream).await;
    // Warm up both paths (connection pools, leaf certificate, allocator).
    for _ in 0..50 {
        direct.get(path).await;
        proxied.get(path).await;
    }
    let mut row = Row {
        what: format!("GET {path}, kept-alive connection"),
        direct: Vec::new(),
        proxied: Vec::new(),
    };
    // Interleaved, so both see the same machine load.
    for _ in 0..n {
        let t = Instant::now();
        direct.get(path).await;
        row.direct.push(t.elapsed());
        let t = Instant::now();
        proxied.get(path).await;
        row.proxied.push(t.elapsed());
    }
    row
}

async fn new_connections(
    pki: &UpstreamPki,
    upstream: &Upstream,
    proxy: &RunningProxy,
    n: u64,
) -> Row {
    let mut row = Row {
        what: "new connection + first GET /".into(),
        direct: Vec::new(),
        proxied: Vec::new(),
    };
    for _ in 0..n {
        let t = Instant::now();
        Client::direct(pki, upstream).await.get("/").await;
        row.direct.push(t.elapsed());
        let t = Instant::now();
        Client::proxied(proxy, upstream).await.get("/").await;
        row.proxied.push(t.elapsed());
    }
    row
}

async fn throughput(
    pki: &UpstreamPki,
    upstream: &Upstream,
    proxy: &RunningProxy,
    proxied: bool,
    concurrency: u64,
    seconds: u64,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut client = if proxied {
            Client::proxied(proxy, upstream).await
        } else {
            Client::direct(pki, upstream).await
        };
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                client.get("/").await;
                done += 1;
            }
            done
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.unwrap();
    }
    total as f64 / seconds as f64
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would run this too: keep it short then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let n = if quick { 20 } else { env_or("BENCH_REQUESTS", 3000) };
        let seconds = if quick { 1 } else { env_or("BENCH_SECONDS", 5) };
        let concurrency = env_or("BENCH_CONCURRENCY", 16);
        let pki = UpstreamPki::new();
        let upstream = Upstream::start(&pki, false).await;
        let proxy = RunningProxy::start(&pki, standard_snapshot()).await;

        println!("secretless egress proxy vs direct, loopback, {n} requests per row");
        println!();
        println!("| request | direct p50 / p99 | via proxy p50 / p99 | overhead p50 / p99 |");
        println!("|---|---|---|---|");
        latencies(&pki, &upstream, &proxy, "/", n).await.print();
        latencies(&pki, &upstream, &proxy, "/bytes?n=65536", n)
            .await
            .print();
        new_connections(&pki, &upstream, &proxy, (n / 10).max(10))
            .await
            .print();
        println!();
        let direct = throughput(&pki, &upstream, &proxy, false, concurrency, seconds).await;
        let proxied = throughput(&pki, &upstream, &proxy, true, concurrency, seconds).await;
        println!(
            "throughput, {concurrency} kept-alive connections, GET / for {seconds} s: direct {direct:.0} req/s, via proxy {proxied:.0} req/s ({:.0} %)",
            proxied / direct * 100.0
        );
    });
}
