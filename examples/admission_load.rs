//! Load test of the admission webhook over TLS, against the machine's own limit.
//!
//! Starts the real `agentsecrets run` binary in benchmark mode (synthetic cache, no cluster),
//! and a minimal axum + rustls server answering a constant "allowed" review (the baseline:
//! what TLS and HTTP alone cost here). Drives both with the same client: C keep-alive HTTPS
//! connections for a fixed time, alternating ours and baseline, and prints requests/s,
//! latency percentiles, errors, the ratio ours/baseline (median of pairwise ratios), peak RSS
//! at 10 000 and 100 000 cached AgentSecrets, and the CPU cost of re-wrapping 100 000 keys.
//!
//! Run via `bench/run.sh`, or: `cargo build --release --features bench && cargo run --release --example
//! admission_load -- --help`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::crypto::Keyring;
use agent_secrets::testing::synthetic;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Options {
    /// RUST_LOG of the server under test.
    log: String,
    connections: usize,
    duration: Duration,
    rounds: usize,
    quick: bool,
}

fn options() -> Options {
    let mut options = Options {
        log: "info".into(),
        connections: 64,
        duration: Duration::from_secs(8),
        rounds: 3,
        quick: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--connections" => options.connections = value.parse().unwrap(),
            "--seconds" => options.duration = Duration::from_secs(value.parse().unwrap()),
            "--rounds" => options.rounds = value.parse().unwrap(),
            "--log" => options.log = value,
            "--quick" => {
                options.quick = true;
                options.duration = Duration::from_secs(2);
                options.rounds = 1;
                i += 1;
                continue;
            }
            "--serve-baseline" => {
                serve_baseline(&args[i + 1], &args[i + 2], &args[i + 3], args.get(i + 4));
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!(
                    "admission_load [--connections 64] [--seconds 8] [--rounds 3] [--log info] [--quick]\n\
                     Needs target/release/agentsecrets built with the bench feature (cargo build --release --features bench)."
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    options
}

/// The baseline server: axum + rustls answering a constant review: "allowed" alone, or the
/// contents of `body_file` (one of our own answers, patch included, so the bytes on the wire
/// and through TLS are the same as ours).
fn serve_baseline(addr: &str, cert: &str, key: &str, body_file: Option<&String>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await.unwrap();
        let body = match body_file {
            Some(path) => Bytes::from(std::fs::read(path).unwrap()),
            None => Bytes::from_static(
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":true}}"#,
            ),
        };
        let app = axum::Router::new().route(
            "/mutate/pods",
            axum::routing::post(move |_body: Bytes| {
                let body = body.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], body) }
            }),
        );
        axum_server::bind_rustls(addr.parse::<SocketAddr>().unwrap(), tls)
            .serve(app.into_make_service())
            .await
            .unwrap();
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// CPU time (user + system) the server process has used so far.
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // The kernel reports in clock ticks, 100 per second on Linux.
        Duration::from_millis((ticks(11) + ticks(12)) * 10)
    }

    /// Resident and peak resident memory in MiB, from /proc.
    fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    keyring: PathBuf,
    ca_der: Vec<u8>,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let keyring = dir.path().join("keyring.yaml");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let ring = Keyring::generate("bench").unwrap();
    std::fs::write(&keyring, ring.to_yaml().unwrap().as_bytes()).unwrap();
    Files {
        ca_der: certified.cert.der().to_vec(),
        cert,
        key,
        keyring,
        _dir: dir,
    }
}

fn release_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/release/examples/admission_load -> target/release/agentsecrets
    let bin = exe.parent().unwrap().parent().unwrap().join("agentsecrets");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release --features bench` first",
        bin.display()
    );
    bin
}

async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let _ = stream
                .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await;
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response).await;
            if response.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server on {admin} did not become ready");
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}

async fn start_ours(files: &Files, owners: usize, per_owner: usize, log: &str) -> Server {
    let port = free_port();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = Command::new(release_binary())
        .args([
            "run",
            "--bench-synthetic-cache",
            &format!("{owners}x{per_owner}"),
            "--webhook-addr",
            &format!("127.0.0.1:{port}"),
            "--admin-addr",
            &admin.to_string(),
            "--tls-cert",
            files.cert.to_str().unwrap(),
            "--tls-key",
            files.key.to_str().unwrap(),
            "--keyring",
            files.keyring.to_str().unwrap(),
            // One window for the whole run, so an owner warmed up stays warm: in production
            // (5 minutes) only an owner's first sandbox of each window is cold.
            "--pod-secret-reuse-window",
            "1h",
        ])
        // Production logging is `info` (an audit line per injected pod), here to a sink.
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    wait_ready(admin).await;
    server
}

async fn start_baseline(files: &Files, body_file: Option<&std::path::Path>) -> Server {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut args = vec![
        "--serve-baseline".to_owned(),
        addr.to_string(),
        files.cert.to_str().unwrap().to_owned(),
        files.key.to_str().unwrap().to_owned(),
    ];
    args.extend(body_file.map(|p| p.to_str().unwrap().to_owned()));
    let child = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(addr).await;
    Server { child, addr }
}

/// Pod CREATE reviews for owners `user-0..`: the review a real API server sent for a sandbox
/// orchestrator's pod (tests/fixtures), moved to the benchmark namespace and owners.
fn pod_bodies(owners: usize, dry_run: bool) -> Vec<Bytes> {
    let fixture: serde_json::Value = serde_json::from_str(include_str!(
        "../tests/fixtures/admission/pod_create_by_service_account.json"
    ))
    .unwrap();
    (0..64)
        .map(|i| {
            let mut review = fixture["review"].clone();
            let request = &mut review["request"];
            request["uid"] = json!(format!("0c9a8d74-9cb7-44dd-b98e-{i:012}"));
            request["namespace"] = json!("bench");
            request["dryRun"] = json!(dry_run);
            request["object"]["metadata"]["namespace"] = json!("bench");
            request["object"]["metadata"]["labels"]["agentsecrets.io/owner"] =
                json!(format!("user-{}", (i * 7919) % owners));
            Bytes::from(serde_json::to_vec(&review).unwrap())
        })
        .collect()
}

struct LoadResult {
    /// Server CPU time per answered request, in µs.
    server_cpu_us: f64,
    requests: usize,
    errors: usize,
    seconds: f64,
    latencies_us: Vec<u32>,
}

impl LoadResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[index]) / 1000.0
    }
}

async fn load_measured(
    server: &Server,
    ca_der: &[u8],
    bodies: Arc<Vec<Bytes>>,
    connections: usize,
    duration: Duration,
    check_patch: bool,
) -> LoadResult {
    let before = server.cpu();
    let mut result = load(
        server.addr,
        ca_der,
        "/mutate/pods",
        bodies,
        connections,
        duration,
        check_patch,
    )
    .await;
    let used = server.cpu().saturating_sub(before);
    result.server_cpu_us = used.as_secs_f64() * 1e6 / result.requests.max(1) as f64;
    result
}

async fn load(
    addr: SocketAddr,
    ca_der: &[u8],
    path: &'static str,
    bodies: Arc<Vec<Bytes>>,
    connections: usize,
    duration: Duration,
    check_patch: bool,
) -> LoadResult {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let config = config.clone();
        let bodies = bodies.clone();
        tasks.push(tokio::spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(config);
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let tls = connector
                .connect(
                    rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::with_capacity(65_536);
            let mut errors = 0usize;
            let mut i = c;
            while Instant::now() < deadline {
                let body = bodies[i % bodies.len()].clone();
                i += 1;
                let request = hyper::Request::post(path)
                    .header("content-type", "application/json")
                    .header("host", "localhost")
                    .body(Full::new(body))
                    .unwrap();
                let sent = Instant::now();
                match sender.send_request(request).await {
                    Ok(response) => {
                        let ok = response.status() == 200;
                        let bytes = response.into_body().collect().await.map(|b| b.to_bytes());
                        let latency = sent.elapsed();
                        let valid = match bytes {
                            Ok(bytes) => ok && (!check_patch || memchr_patch(&bytes)),
                            Err(_) => false,
                        };
                        if valid {
                            latencies.push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut result = LoadResult {
        server_cpu_us: f64::NAN,
        requests: 0,
        errors: 0,
        seconds: 0.0,
        latencies_us: Vec::new(),
    };
    for task in tasks {
        let (latencies, errors) = task.await.unwrap();
        result.requests += latencies.len();
        result.errors += errors;
        result.latencies_us.extend(latencies);
    }
    result.seconds = start.elapsed().as_secs_f64();
    result.latencies_us.sort_unstable();
    result
}

/// One answer of `addr` to `body`.
async fn fetch_one(addr: SocketAddr, ca_der: &[u8], body: Bytes) -> Bytes {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::post("/mutate/pods")
        .header("content-type", "application/json")
        .header("host", "localhost")
        .body(Full::new(body))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

/// Our answers must carry a patch: an "allowed" without one would mean nothing was injected.
fn memchr_patch(bytes: &[u8]) -> bool {
    bytes.windows(8).any(|w| w == b"\"patch\":")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// CPU time of this thread, from /proc (nanosecond resolution).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let nanos = text
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(nanos)
}

fn rotation_cost(count: usize) -> (Duration, Duration) {
    let mut keyring = Keyring::generate("old").unwrap();
    let secrets = synthetic(&keyring, "bench", count / 20, 20).unwrap();
    keyring.add_primary("new").unwrap();
    let envelopes: Vec<_> = secrets
        .into_iter()
        .filter_map(|s| s.sealed.and_then(Result::ok))
        .collect();
    let cpu = thread_cpu();
    let wall = Instant::now();
    let mut rewrapped = 0;
    for envelope in &envelopes {
        let new = keyring.rewrap(envelope).unwrap();
        rewrapped += usize::from(new.key_id == "new");
    }
    assert_eq!(rewrapped, count);
    (thread_cpu() - cpu, wall.elapsed())
}

fn main() {
    let options = options();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(options));
}

async fn run(options: Options) {
    let files = files();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("# agent-secrets admission benchmark");
    println!(
        "machine: {cores} cores; client and servers share them; {} connections, {} s per run, {} round(s)\n",
        options.connections,
        options.duration.as_secs(),
        options.rounds
    );

    // Memory, idle, at 10 000 and 100 000 cached AgentSecrets.
    let mut memory = Vec::new();
    for (owners, per_owner) in [(500usize, 20usize), (5_000, 20)] {
        let server = start_ours(&files, owners, per_owner, &options.log).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        memory.push((owners * per_owner, server.rss_mib(), server));
    }
    let (_, _, ours) = memory.pop().unwrap();
    let (small_count, small_idle, small_server) = memory.pop().unwrap();
    let big_idle = ours.rss_mib();
    let baseline = start_baseline(&files, None).await;

    let dry = Arc::new(pod_bodies(5_000, true));
    // The second baseline answers every review with one of our own answers, byte for byte.
    let answer = fetch_one(ours.addr, &files.ca_der, dry[0].clone()).await;
    assert!(memchr_patch(&answer), "our answer carries no patch");
    let answer_file = files._dir.path().join("answer.json");
    std::fs::write(&answer_file, &answer).unwrap();
    let patch_baseline = start_baseline(&files, Some(&answer_file)).await;
    let mut patch_ratios = Vec::new();
    let create = Arc::new(pod_bodies(5_000, false));
    let mut rows = Vec::new();
    // At `options.connections` connections; `check_patch`: every answer must carry a patch.
    let measure = async |server: &Server, bodies: &Arc<Vec<Bytes>>, check_patch: bool| {
        load_measured(
            server,
            &files.ca_der,
            bodies.clone(),
            options.connections,
            options.duration,
            check_patch,
        )
        .await
    };
    // Cold: no owner has a pod-scoped Secret yet, so each review opens its 20 values.
    let cold = measure(&ours, &dry, true).await;
    rows.push((0, "ours: pod admission, dryRun, cold owner", cold));
    // Each owner's first sandbox creates its Secret (the stub writer); from then on the
    // owners are warm, as every sandbox but an owner's first of a reuse window is.
    for body in create.iter() {
        let answer = fetch_one(ours.addr, &files.ca_der, body.clone()).await;
        assert!(memchr_patch(&answer), "our answer carries no patch");
    }
    let mut throughput_ratios = Vec::new();
    let mut p99_ratios = Vec::new();
    for round in 0..options.rounds {
        let base = measure(&baseline, &dry, false).await;
        let pure = measure(&ours, &dry, true).await;
        let patch_base = measure(&patch_baseline, &dry, true).await;
        throughput_ratios.push(pure.rps() / base.rps());
        patch_ratios.push(pure.rps() / patch_base.rps());
        p99_ratios.push(pure.percentile_ms(0.99) / base.percentile_ms(0.99));
        let with_secret = measure(&ours, &create, true).await;
        rows.push((round, "baseline (constant allowed)", base));
        rows.push((
            round,
            "baseline (constant patch, our answer's bytes)",
            patch_base,
        ));
        rows.push((round, "ours: pod admission, dryRun, warm owner", pure));
        rows.push((round, "ours: pod admission, warm owner", with_secret));
    }
    let single_base = load_measured(
        &baseline,
        &files.ca_der,
        dry.clone(),
        1,
        options.duration,
        false,
    )
    .await;
    let single_ours =
        load_measured(&ours, &files.ca_der, dry.clone(), 1, options.duration, true).await;
    let loaded = ours.rss_mib();
    // The 10 000-secret server under the same load, for its peak.
    let _ = load(
        small_server.addr,
        &files.ca_der,
        "/mutate/pods",
        Arc::new(pod_bodies(500, true)),
        options.connections,
        options.duration,
        true,
    )
    .await;
    let small_loaded = small_server.rss_mib();

    println!(
        "| round | server | conns | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | server CPU µs/req |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (round, name, r) in &rows {
        println!(
            "| {} | {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.0} |",
            round + 1,
            options.connections,
            r.rps(),
            r.percentile_ms(0.5),
            r.percentile_ms(0.9),
            r.percentile_ms(0.99),
            r.percentile_ms(0.999),
            r.errors,
            r.server_cpu_us
        );
    }
    for (name, r) in [
        ("baseline (constant allowed)", &single_base),
        ("ours: pod admission, dryRun, warm owner", &single_ours),
    ] {
        println!(
            "| - | {name} | 1 | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.0} |",
            r.rps(),
            r.percentile_ms(0.5),
            r.percentile_ms(0.9),
            r.percentile_ms(0.99),
            r.percentile_ms(0.999),
            r.errors,
            r.server_cpu_us
        );
    }
    println!(
        "\nours/baseline at {} connections (median of pairwise ratios): throughput {:.2}x, p99 {:.2}x",
        options.connections,
        median(throughput_ratios),
        median(p99_ratios)
    );
    println!(
        "ours/constant-patch baseline at {} connections (answer of {} bytes): throughput {:.2}x",
        options.connections,
        answer.len(),
        median(patch_ratios)
    );
    println!(
        "ours/baseline at 1 connection: throughput {:.2}x",
        single_ours.rps() / single_base.rps()
    );

    println!("\n| AgentSecrets cached | RSS idle MiB | peak RSS under load MiB |");
    println!("|---|---|---|");
    println!(
        "| {small_count} | {:.1} | {:.1} |",
        small_idle.0, small_loaded.1
    );
    println!("| {} | {:.1} | {:.1} |", 100_000, big_idle.0, loaded.1);

    let count = if options.quick { 10_000 } else { 100_000 };
    let (cpu, wall) = rotation_cost(count);
    println!(
        "\nre-wrapping {count} data keys (no API writes): {:.3} s CPU ({:.3} s wall)",
        cpu.as_secs_f64(),
        wall.as_secs_f64()
    );
    drop(baseline);
    drop(ours);
    drop(small_server);
}
