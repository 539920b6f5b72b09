//! The webhook server's resource bounds over real HTTPS: concurrent reviews get independent
//! answers; slow uploads neither hold memory beyond the configured budget nor delay a genuine
//! review; slow headers and bodies time out; past the byte budget, the review queue or the
//! connection cap, clients are turned away at once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod answers;
    pub mod client;
    pub mod fixtures;
    pub mod injections;
    pub mod keyring;
    pub mod server;
    pub mod serving;
}

use agent_secrets::crypto::Keyring;
use agent_secrets::testing::agent_secret;
use agent_secrets::webhook::server::{Limits, MAX_BODY_BYTES};
use common::answers::patched;
use common::client::{HttpsClient, trusting};
use common::fixtures::{NAMESPACE, fixture, standard_secrets, to_body};
use common::injections::{annotation, secret_values};
use common::server::{Setup, TestServer};
use common::serving::{alice_values, assert_still_serving};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::client::TlsStream;

type Connection = TlsStream<tokio::net::TcpStream>;

/// The webhook serving the standard secrets within `limits`.
async fn serve_with(limits: Limits) -> TestServer {
    TestServer::start(Setup {
        limits,
        ..Setup::default()
    })
    .await
}

/// A TLS connection speaking raw HTTP/1.1, as a misbehaving client would.
async fn connect(server: &TestServer) -> Connection {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(trusting(&server.ca_der)));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// The head of a pod review POST announcing a body of `length` bytes.
fn request_head(length: usize) -> String {
    format!(
        "POST /mutate/pods HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    )
}

/// Send the head of a review announcing the largest body, then its bytes one every 100 ms,
/// until the server gives up on it.
async fn trickle(mut connection: Connection) {
    connection
        .write_all(request_head(MAX_BODY_BYTES).as_bytes())
        .await
        .unwrap();
    loop {
        if connection.write_all(b" ").await.is_err() || connection.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The HTTP status of the answer read from `reader`, or `None` when the connection closes
/// without one.
async fn read_status(reader: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<u16> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
    let text = String::from_utf8_lossy(&received);
    text.split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_slow_uploads_do_not_delay_a_genuine_review() {
    const UPLOADS: usize = 64;
    let limits = Limits::default();
    // Memory is bounded by the configuration, whatever the uploads send: every body byte held
    // counts against one budget, and connection buffers are capped per connection.
    assert!(
        limits.max_connections > UPLOADS,
        "room for the uploads and the API server"
    );
    assert!(limits.max_buffered_body_bytes <= 16 * MAX_BODY_BYTES);
    assert!(limits.max_request_memory() <= 128 * 1024 * 1024);
    let server = TestServer::start(Setup::default()).await;

    let mut uploads = Vec::new();
    for _ in 0..UPLOADS {
        uploads.push(tokio::spawn(trickle(connect(&server).await)));
    }
    // Let every upload get its head and first bytes in.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (path, review) = fixture("pod_create_named.json");
    let started = Instant::now();
    let answer = server.review(&path, &review).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "answered after {elapsed:?}"
    );
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let pod = patched(&review["request"]["object"], &answer);
    let created = server.created();
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].metadata.name.as_deref(),
        Some(annotation(&pod, "agentsecrets.io/secret-name"))
    );
    assert_eq!(secret_values(&created[0]), alice_values());
    assert!(
        uploads.iter().all(|upload| !upload.is_finished()),
        "the uploads were still going"
    );
    for upload in uploads {
        upload.abort();
    }
}

#[tokio::test]
async fn a_body_slower_than_the_body_read_timeout_is_answered_408() {
    let server = serve_with(Limits {
        body_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let (mut reader, mut writer) = tokio::io::split(connect(&server).await);
    writer
        .write_all(request_head(MAX_BODY_BYTES).as_bytes())
        .await
        .unwrap();
    let trickling = tokio::spawn(async move {
        while writer.write_all(b" ").await.is_ok() && writer.flush().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let status = tokio::time::timeout(Duration::from_secs(3), read_status(&mut reader))
        .await
        .expect("a slow body is cut off");
    assert_eq!(status, Some(408));
    trickling.abort();
    assert_still_serving(&server, "a slow body").await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let server = serve_with(Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let mut connection = connect(&server).await;
    connection
        .write_all(
            b"POST /mutate/pods HTTP/1.1
host: loc",
        )
        .await
        .unwrap();
    connection.flush().await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(3), read_status(&mut connection))
        .await
        .expect("the server closes a connection whose headers do not arrive");
    // Hyper answers 408 or just closes; either way the connection is gone.
    assert!(matches!(closed, None | Some(408)), "{closed:?}");
    assert_still_serving(&server, "slow headers").await;
}

#[tokio::test]
async fn bodies_beyond_the_byte_budget_are_turned_away_at_once_with_503() {
    let (path, review) = fixture("pod_create_named.json");
    let body = to_body(&review);
    let server = serve_with(Limits {
        max_buffered_body_bytes: 2 * body.len(),
        ..Limits::default()
    })
    .await;
    // A client holding most of the budget with a body it does not finish.
    let mut holder = connect(&server).await;
    holder
        .write_all(request_head(10 * body.len()).as_bytes())
        .await
        .unwrap();
    holder
        .write_all(&vec![b' '; 3 * body.len() / 2])
        .await
        .unwrap();
    holder.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let (status, answer) = server.post(&path, body.clone()).await;
    assert_eq!(status, 503, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert!(server.created().is_empty());

    // Once the holder goes away, its bytes are free again.
    drop(holder);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_beyond_the_queue_are_turned_away_at_once_with_503() {
    let server = Arc::new(
        serve_with(Limits {
            max_concurrent_reviews: 1,
            max_queued_reviews: 1,
            ..Limits::default()
        })
        .await,
    );
    *server.writer.delay.lock().unwrap() = Some(Duration::from_millis(500));
    let (path, template) = fixture("pod_create_named.json");
    let send = |n: u32| {
        let server = server.clone();
        let path = path.clone();
        let mut review = template.clone();
        review["request"]["uid"] = json!(format!("0000000{n}-0000-4000-8000-000000000000"));
        tokio::spawn(async move { server.post(&path, to_body(&review)).await })
    };
    let deciding = send(1);
    tokio::time::timeout(Duration::from_secs(5), server.writer.entered.notified())
        .await
        .expect("the first review is being decided");
    let queued = send(2);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    let (status, answer) = send(3).await.unwrap();
    assert_eq!(status, 503, "{answer}");
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "turned away at once"
    );
    for review in [deciding, queued] {
        let (status, answer) = review.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
    }
    // Decided one after the other: the second shares the Secret the first created.
    assert_eq!(server.created().len(), 1);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_until_one_ends() {
    let server = serve_with(Limits {
        max_connections: 2,
        ..Limits::default()
    })
    .await;
    let first = server.client().await;
    let mut second = server.client().await;
    let (path, review) = fixture("pod_update_label.json");
    let refused = async {
        let mut third = HttpsClient::connect(server.addr, trusting(&server.ca_der)).await?;
        third.try_post(&path, to_body(&review)).await
    };
    assert!(refused.await.is_err(), "a third connection is closed");
    let (status, _) = second.post(&path, to_body(&review)).await;
    assert_eq!(status, 200, "the open connections are served");
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pod_reviews_get_independent_answers() {
    const PODS: usize = 32;
    let keyring = Keyring::generate("test-kek").unwrap();
    let value = |i: usize, which: &str| format!("canary-user-{i:02}-{which}-{:04x}", i * 7919);
    let mut secrets = standard_secrets(&keyring);
    for i in 0..PODS {
        let owner = format!("user-{i:02}");
        secrets.push(agent_secret(
            NAMESPACE,
            &format!("{owner}-api"),
            &owner,
            "SERVICE_API_KEY",
            &keyring,
            &value(i, "api"),
        ));
        secrets.push(agent_secret(
            NAMESPACE,
            &format!("{owner}-db"),
            &owner,
            "DB_PASSWORD",
            &keyring,
            &value(i, "db"),
        ));
    }
    let server = Arc::new(
        TestServer::start(Setup {
            keyring,
            secrets: Some(secrets),
            ..Setup::default()
        })
        .await,
    );
    // Each review waits on its Secret creation, so they overlap.
    *server.writer.delay.lock().unwrap() = Some(Duration::from_millis(50));

    let (path, template) = fixture("pod_create_named.json");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..PODS {
        let mut review = template.clone();
        review["request"]["uid"] = json!(format!("00000000-0000-4000-8000-{i:012}"));
        review["request"]["name"] = json!(format!("sandbox-user-{i:02}"));
        review["request"]["object"]["metadata"]["name"] = json!(format!("sandbox-user-{i:02}"));
        review["request"]["object"]["metadata"]["labels"]["agentsecrets.io/owner"] =
            json!(format!("user-{i:02}"));
        let server = server.clone();
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let answer = server.review(&path, &review).await;
            (i, review, answer)
        }));
    }
    let answers = futures::future::join_all(tasks).await;
    let elapsed = started.elapsed();
    let created = server.created();
    let mut names = std::collections::BTreeSet::new();
    for joined in answers {
        let (i, review, answer) = joined.unwrap();
        assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        let pod = patched(&review["request"]["object"], &answer);
        let secret_name = annotation(&pod, "agentsecrets.io/secret-name").to_owned();
        // Every pod has its own owner, so none shares another's Secret.
        assert!(
            names.insert(secret_name.clone()),
            "Secret name {secret_name} reused"
        );
        for entry in pod["spec"]["containers"][0]["env"].as_array().unwrap() {
            assert_eq!(
                entry["valueFrom"]["secretKeyRef"]["name"],
                secret_name.as_str()
            );
        }
        let secret = created
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(secret_name.as_str()))
            .unwrap();
        assert_eq!(
            secret_values(secret),
            BTreeMap::from([
                ("DB_PASSWORD".to_owned(), value(i, "db")),
                ("SERVICE_API_KEY".to_owned(), value(i, "api")),
            ]),
            "pod {i}"
        );
        let owner = format!("user-{i:02}");
        assert_eq!(
            secret.metadata.labels.as_ref().unwrap()["agentsecrets.io/owner"],
            owner
        );
    }
    assert_eq!(created.len(), PODS);
    // The reviews did overlap: done in far less than 32 x 50 ms.
    assert!(
        elapsed < Duration::from_millis(50 * PODS as u64),
        "{elapsed:?}"
    );
}

/// An HTTP/2 connection over TLS (ALPN `h2`), as the API server opens one.
async fn connect_h2(server: &TestServer) -> Connection {
    let mut config = trusting(&server.ca_der);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

#[tokio::test]
async fn http2_clients_are_told_the_stream_limit_and_get_their_reviews_answered() {
    let server = serve_with(Limits {
        http2_max_concurrent_streams: 3,
        ..Limits::default()
    })
    .await;
    let (mut sender, mut connection) = h2::client::handshake(connect_h2(&server).await)
        .await
        .unwrap();
    let (path, review) = fixture("pod_create_named.json");
    let request = http::Request::post(path.as_str())
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    sender = sender.ready().await.unwrap();
    let (response, mut stream) = sender.send_request(request, false).unwrap();
    stream
        .send_data(bytes::Bytes::from(to_body(&review)), true)
        .unwrap();
    // Drive the connection until the answer is in.
    let response = tokio::select! {
        response = response => response.unwrap(),
        failed = std::future::poll_fn(|cx| std::pin::Pin::new(&mut connection).poll(cx)) => {
            panic!("the connection ended first: {failed:?}")
        }
    };
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut answer = Vec::new();
    loop {
        tokio::select! {
            chunk = body.data() => match chunk {
                Some(chunk) => {
                    let chunk = chunk.unwrap();
                    let _ = body.flow_control().release_capacity(chunk.len());
                    answer.extend_from_slice(&chunk);
                }
                None => break,
            },
            _ = std::future::poll_fn(|cx| std::pin::Pin::new(&mut connection).poll(cx)) => {}
        }
    }
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let pod = patched(&review["request"]["object"], &answer);
    let references = pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["valueFrom"]["secretKeyRef"].is_object())
        .count();
    assert!(references > 0, "alice's secrets are injected: {pod}");
    // The server's SETTINGS frame, as the client holds it.
    assert_eq!(connection.max_concurrent_send_streams(), 3);
}
