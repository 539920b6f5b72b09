//! Sandbox start through a real API server: what a labelled sandbox pod costs the control plane
//! next to the same pod unlabelled (which the webhook never sees).
//!
//! Needs a cluster running agent-secrets (`KUBECONFIG`, or the kubectl flags below). Creates
//! `--secrets` AgentSecrets for one owner in `--namespace`, then alternates rounds of labelled
//! and unlabelled pod creation with `--creators` concurrent creators (each creating `--pods`
//! pods one after another), then single-creator rounds for latency. After each round its pods
//! are deleted and gone before the next one starts. For every round it reads the API server's
//! own metrics before and after (`/metrics`: the admission webhook durations, and the Secret
//! POSTs, PATCHes and DELETEs it served), and prints markdown tables:
//!
//! - pods/s with N creators, labelled vs unlabelled, and their ratio (median of pairwise ratios);
//! - pod POST p50 / p99 at one creator, and the labelled pod's added p99;
//! - the API server's mean `apiserver_admission_webhook_admission_duration_seconds` per webhook;
//! - Secret writes per labelled pod.
//!
//! All labelled pods belong to one owner, so they share one pod-scoped Secret per reuse window:
//! the first labelled pod of a run (and of each new window) is the owner's cold start, which
//! writes that Secret; every other one is warm and writes nothing but itself.
//!
//! The pods are never scheduled (no node needs to run them): they carry a scheduling gate
//! (`spec.schedulingGates`, Kubernetes 1.30+) and are deleted within seconds. Everything is created under the label
//! `agentsecrets.io/load-test=true`, in `-n` (default `agentsecrets-load`, created if missing);
//! `--cleanup` deletes what an interrupted run left. With `--as USER` the pods and AgentSecrets
//! are created as that user (the owner binding of the tenancy policies applies); the API
//! server's metrics are read as the kubeconfig's own identity.
//!
//! ```text
//! cargo run --release --example apiserver_load -- --namespace agentsecrets-load \
//!     [--creators 8] [--pods 40] [--rounds 3] [--latency-pods 100] [--as alice]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::api::{AgentSecret, OWNER_LABEL};
use agent_secrets::tools::cluster::ClusterArgs;
use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const LOAD_LABEL: &str = "agentsecrets.io/load-test";
const ROUND_LABEL: &str = "agentsecrets.io/load-round";
const SCHEDULING_GATE: &str = "agentsecrets.io/load-test";

#[derive(Parser, Debug)]
#[command(about = "Sandbox start through a real API server, labelled vs unlabelled pods")]
struct Options {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Owner of the AgentSecrets and of the labelled pods.
    #[arg(long, default_value = "load-owner")]
    owner: String,
    /// AgentSecrets the owner has.
    #[arg(long, default_value_t = 10)]
    secrets: usize,
    /// Concurrent creators in the throughput rounds.
    #[arg(long, default_value_t = 8)]
    creators: usize,
    /// Pods each creator creates per throughput round.
    #[arg(long, default_value_t = 40)]
    pods: usize,
    /// Throughput rounds of each kind (labelled and unlabelled alternate).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Pods per single-creator latency round (one round of each kind, alternating in halves).
    #[arg(long, default_value_t = 100)]
    latency_pods: usize,
    /// Container image of the pods (never pulled: a scheduling gate holds them back).
    #[arg(long, default_value = "busybox:1.36")]
    image: String,
    /// Only delete what an earlier run left (pods and AgentSecrets labelled as load test).
    #[arg(long)]
    cleanup: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Labelled,
    Unlabelled,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Labelled => "labelled",
            Kind::Unlabelled => "unlabelled",
        }
    }
}

/// One sample of the API server's counters that matter here.
#[derive(Default, Clone, Debug)]
struct ServerMetrics {
    /// Webhook name → (sum of seconds, count) of `admit` calls on CREATE.
    webhook: BTreeMap<String, (f64, f64)>,
    /// Verb → requests served for `secrets`.
    secret_requests: BTreeMap<String, f64>,
}

/// Labels of one exposition line: `name{a="b",c="d"} value`.
fn parse_line(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (head, ""),
    };
    let mut map = BTreeMap::new();
    for pair in labels.split("\",").filter(|p| !p.is_empty()) {
        let (key, val) = pair.split_once("=\"")?;
        map.insert(key, val.trim_end_matches('"'));
    }
    Some((name, map, value))
}

fn parse_metrics(text: &str) -> ServerMetrics {
    let mut metrics = ServerMetrics::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels, value)) = parse_line(line) else {
            continue;
        };
        match name {
            "apiserver_admission_webhook_admission_duration_seconds_sum"
            | "apiserver_admission_webhook_admission_duration_seconds_count" => {
                if labels.get("operation") != Some(&"CREATE")
                    || labels.get("type") != Some(&"admit")
                {
                    continue;
                }
                let Some(webhook) = labels.get("name") else {
                    continue;
                };
                let entry = metrics.webhook.entry((*webhook).to_owned()).or_default();
                if name.ends_with("_sum") {
                    entry.0 += value;
                } else {
                    entry.1 += value;
                }
            }
            "apiserver_request_total"
                if labels.get("resource") == Some(&"secrets")
                    && labels.get("subresource").is_none_or(|s| s.is_empty()) =>
            {
                let verb = labels.get("verb").copied().unwrap_or("?").to_owned();
                *metrics.secret_requests.entry(verb).or_default() += value;
            }
            _ => {}
        }
    }
    metrics
}

async fn scrape(client: &kube::Client) -> ServerMetrics {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    match client.request_text(request).await {
        Ok(text) => parse_metrics(&text),
        Err(error) => {
            eprintln!("cannot read the API server's /metrics ({error}); its figures are left out");
            ServerMetrics::default()
        }
    }
}

fn pod(options: &Options, kind: Kind, round: &str) -> Pod {
    let mut labels = BTreeMap::from([
        (LOAD_LABEL.to_owned(), "true".to_owned()),
        (ROUND_LABEL.to_owned(), round.to_owned()),
    ]);
    if kind == Kind::Labelled {
        labels.insert(OWNER_LABEL.to_owned(), options.owner.clone());
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "generateName": format!("load-{}-", kind.name()), "labels": labels },
        "spec": {
            // Held back from the scheduler (and so from any kubelet) on a cluster that has
            // them: only the API server's work is measured.
            "schedulingGates": [{ "name": SCHEDULING_GATE }],
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "sandbox",
                "image": options.image,
                "command": ["sh", "-c", "sleep 3600"],
                "env": [{ "name": "LOG_LEVEL", "value": "info" }],
            }],
        },
    }))
    .unwrap()
}

struct Round {
    kind: Kind,
    elapsed: Duration,
    latencies: Vec<Duration>,
    errors: usize,
    before: ServerMetrics,
    after: ServerMetrics,
}

impl Round {
    fn pods_per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn webhook_mean_ms(&self, name: &str) -> Option<f64> {
        let (sum_after, count_after) = self.after.webhook.get(name)?;
        let (sum_before, count_before) = self.before.webhook.get(name).copied().unwrap_or_default();
        let count = count_after - count_before;
        (count > 0.0).then(|| (sum_after - sum_before) / count * 1000.0)
    }

    fn secret_requests(&self, verb: &str) -> f64 {
        self.after
            .secret_requests
            .get(verb)
            .copied()
            .unwrap_or_default()
            - self
                .before
                .secret_requests
                .get(verb)
                .copied()
                .unwrap_or_default()
    }
}

async fn create_round(
    client: &kube::Client,
    metrics_client: &kube::Client,
    options: &Options,
    kind: Kind,
    creators: usize,
    per_creator: usize,
    round: &str,
) -> Round {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let before = scrape(metrics_client).await;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..creators {
        let (pods, template) = (pods.clone(), pod(options, kind, round));
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(per_creator);
            let mut errors = 0;
            for _ in 0..per_creator {
                let sent = Instant::now();
                match pods.create(&PostParams::default(), &template).await {
                    Ok(_) => latencies.push(sent.elapsed()),
                    Err(error) => {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("pod create failed: {error}");
                        }
                    }
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    while let Some(joined) = tasks.join_next().await {
        let (mut l, e) = joined.unwrap();
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = start.elapsed();
    // Let the operator's Secret writes for this round land inside this round's window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = scrape(metrics_client).await;
    delete_round(client, round).await;
    Round {
        kind,
        elapsed,
        latencies,
        errors,
        before,
        after,
    }
}

/// Delete a round's pods and wait until they are gone, so rounds do not overlap.
async fn delete_round(client: &kube::Client, round: &str) {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let selector = ListParams::default().labels(&format!("{ROUND_LABEL}={round}"));
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    if let Err(error) = pods.delete_collection(&params, &selector).await {
        eprintln!("deleting round {round}'s pods failed: {error}");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match pods.list_metadata(&selector).await {
            Ok(list) if list.items.is_empty() => return,
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    eprintln!("round {round}'s pods are not gone after 120 s; continuing");
}

async fn ensure_namespace(client: &kube::Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(name).await.unwrap().is_none() {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
    }
}

async fn ensure_secrets(client: &kube::Client, options: &Options) {
    let secrets: Api<AgentSecret> = Api::default_namespaced(client.clone());
    for i in 0..options.secrets {
        let name = format!("load-{}-{i}", options.owner);
        if secrets.get_opt(&name).await.unwrap().is_some() {
            continue;
        }
        let secret: AgentSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "agentsecrets.io/v1alpha1",
            "kind": "AgentSecret",
            "metadata": { "name": name, "labels": { LOAD_LABEL: "true" } },
            "spec": {
                "owner": options.owner,
                "envName": format!("LOAD_SECRET_{i}"),
                "description": "load test",
                "value": format!("load-test-value-{i}-{}", "x".repeat(32)),
            },
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
}

async fn cleanup(client: &kube::Client) {
    let selector = ListParams::default().labels(&format!("{LOAD_LABEL}=true"));
    let params = DeleteParams::default();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let secrets: Api<AgentSecret> = Api::default_namespaced(client.clone());
    let _ = pods.delete_collection(&params, &selector).await;
    let _ = secrets.delete_collection(&params, &selector).await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut options = Options::parse();
    if options.cluster.namespace.is_none() {
        options.cluster.namespace = Some("agentsecrets-load".into());
    }
    let connection = options.cluster.connect().await.unwrap_or_else(|error| {
        eprintln!("{error}");
        std::process::exit(2)
    });
    let client = connection.client;
    // The API server's /metrics is read as the kubeconfig's own identity: an impersonated
    // sandbox user may not read it.
    let mut own = options.cluster.clone();
    own.impersonate = None;
    own.impersonate_groups.clear();
    let metrics_client = own
        .connect()
        .await
        .map(|c| c.client)
        .unwrap_or_else(|_| client.clone());
    if options.cleanup {
        cleanup(&client).await;
        return;
    }
    ensure_namespace(&client, &connection.namespace).await;
    ensure_secrets(&client, &options).await;
    // The operator's cache sees the secrets within a second; give it a little more.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let run = std::process::id();
    let mut throughput: Vec<Round> = Vec::new();
    for i in 0..options.rounds * 2 {
        // Alternate which kind goes first, so neither always runs on a fresher server.
        let kind = if (i + i / 2) % 2 == 0 {
            Kind::Labelled
        } else {
            Kind::Unlabelled
        };
        let round = format!("{run}-t{i}");
        let result = create_round(
            &client,
            &metrics_client,
            &options,
            kind,
            options.creators,
            options.pods,
            &round,
        )
        .await;
        eprintln!(
            "round {i}: {} {:.1} pods/s ({} errors)",
            kind.name(),
            result.pods_per_second(),
            result.errors
        );
        throughput.push(result);
    }
    let mut latency: Vec<Round> = Vec::new();
    for (i, kind) in [
        Kind::Unlabelled,
        Kind::Labelled,
        Kind::Labelled,
        Kind::Unlabelled,
    ]
    .into_iter()
    .enumerate()
    {
        let round = format!("{run}-l{i}");
        let pods = options.latency_pods.div_ceil(2);
        latency.push(create_round(&client, &metrics_client, &options, kind, 1, pods, &round).await);
    }

    println!(
        "## Through the API server: {} creators × {} pods, owner has {} AgentSecrets\n",
        options.creators, options.pods, options.secrets
    );
    println!("| round | kind | pods/s | p50 | p99 | errors |");
    println!("|---|---|---|---|---|---|");
    for (i, round) in throughput.iter().enumerate() {
        let mut sorted = round.latencies.clone();
        sorted.sort();
        println!(
            "| {i} | {} | {:.1} | {} | {} | {} |",
            round.kind.name(),
            round.pods_per_second(),
            ms(percentile(&sorted, 0.5)),
            ms(percentile(&sorted, 0.99)),
            round.errors
        );
    }
    let rate = |kind: Kind| -> Vec<f64> {
        throughput
            .iter()
            .filter(|r| r.kind == kind)
            .map(Round::pods_per_second)
            .collect()
    };
    let ratios: Vec<f64> = rate(Kind::Labelled)
        .iter()
        .zip(rate(Kind::Unlabelled))
        .map(|(l, u)| l / u)
        .collect();
    println!(
        "\nlabelled / unlabelled pods/s (median of pairwise ratios): **{:.2}×**",
        median(ratios)
    );

    let collect = |kind: Kind| -> Vec<Duration> {
        let mut all: Vec<Duration> = latency
            .iter()
            .filter(|r| r.kind == kind)
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        all.sort();
        all
    };
    let (labelled, unlabelled) = (collect(Kind::Labelled), collect(Kind::Unlabelled));
    println!("\n## Pod POST latency, one creator\n");
    println!("| kind | pods | p50 | p99 |");
    println!("|---|---|---|---|");
    for (kind, sorted) in [("labelled", &labelled), ("unlabelled", &unlabelled)] {
        println!(
            "| {kind} | {} | {} | {} |",
            sorted.len(),
            ms(percentile(sorted, 0.5)),
            ms(percentile(sorted, 0.99))
        );
    }
    let added =
        percentile(&labelled, 0.99).as_secs_f64() - percentile(&unlabelled, 0.99).as_secs_f64();
    println!(
        "\nadded p99 of a labelled pod POST: **{:.1} ms**",
        added * 1000.0
    );

    println!("\n## The API server's view of the throughput rounds\n");
    let webhooks: std::collections::BTreeSet<String> = throughput
        .iter()
        .flat_map(|r| r.after.webhook.keys().cloned())
        .collect();
    println!("| round | kind | webhook | mean admission duration |");
    println!("|---|---|---|---|");
    for (i, round) in throughput.iter().enumerate() {
        for webhook in &webhooks {
            if let Some(mean) = round.webhook_mean_ms(webhook) {
                println!("| {i} | {} | {webhook} | {mean:.2} ms |", round.kind.name());
            }
        }
    }
    println!("\n| round | kind | Secret POSTs/pod | PATCHes/pod | DELETEs/pod |");
    println!("|---|---|---|---|---|");
    for (i, round) in throughput.iter().enumerate() {
        let pods = round.latencies.len().max(1) as f64;
        println!(
            "| {i} | {} | {:.2} | {:.2} | {:.2} |",
            round.kind.name(),
            round.secret_requests("POST") / pods,
            round.secret_requests("PATCH") / pods,
            round.secret_requests("DELETE") / pods,
        );
    }
    cleanup(&client).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_webhook_durations_and_secret_requests_from_the_exposition_format() {
        let text = r#"# HELP apiserver_admission_webhook_admission_duration_seconds x
apiserver_admission_webhook_admission_duration_seconds_sum{name="pods.agentsecrets.io",operation="CREATE",rejected="false",type="admit"} 1.5
apiserver_admission_webhook_admission_duration_seconds_count{name="pods.agentsecrets.io",operation="CREATE",rejected="false",type="admit"} 10
apiserver_admission_webhook_admission_duration_seconds_count{name="pods.agentsecrets.io",operation="UPDATE",rejected="false",type="admit"} 99
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="secrets",scope="resource",subresource="",verb="POST",version="v1"} 7
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="secrets",scope="resource",subresource="",verb="PATCH",version="v1"} 3
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 50
"#;
        let metrics = parse_metrics(text);
        assert_eq!(
            metrics.webhook.get("pods.agentsecrets.io"),
            Some(&(1.5, 10.0))
        );
        assert_eq!(metrics.secret_requests.get("POST"), Some(&7.0));
        assert_eq!(metrics.secret_requests.get("PATCH"), Some(&3.0));
        assert_eq!(metrics.secret_requests.len(), 2);
    }

    /// The API server's counters at its `n`th scrape: the pod webhook has admitted `10 n`
    /// pods in `2 n` seconds, and `3 n` Secrets were created.
    fn exposition(n: u32) -> String {
        let n = f64::from(n);
        format!(
            "apiserver_admission_webhook_admission_duration_seconds_sum{{name=\"pods.agentsecrets.io\",operation=\"CREATE\",rejected=\"false\",type=\"admit\"}} {}\n\
             apiserver_admission_webhook_admission_duration_seconds_count{{name=\"pods.agentsecrets.io\",operation=\"CREATE\",rejected=\"false\",type=\"admit\"}} {}\n\
             apiserver_request_total{{code=\"201\",group=\"\",resource=\"secrets\",verb=\"POST\",version=\"v1\"}} {}\n",
            2.0 * n,
            10.0 * n,
            3.0 * n
        )
    }

    /// A round against a mocked API server: the pods it creates, the requests it makes, and what
    /// it reports from the counters it scraped before and after.
    #[tokio::test(start_paused = true)]
    async fn a_round_creates_its_pods_and_reports_the_counters_between_its_scrapes() {
        use http_body_util::BodyExt as _;
        let (client, mut handle) = agent_secrets::testing::mock_client();
        let options = Options::parse_from(["apiserver_load", "--owner", "alice"]);
        let server = tokio::spawn(async move {
            let (mut scrapes, mut created, mut requests) = (0, Vec::new(), Vec::new());
            while let Some((request, send)) = handle.next_request().await {
                let line = format!("{} {}", request.method(), request.uri().path());
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let reply = match line.as_str() {
                    "GET /metrics" => {
                        scrapes += 1;
                        exposition(scrapes).into_bytes()
                    }
                    "POST /api/v1/namespaces/default/pods" => {
                        let mut pod: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        pod["metadata"]["name"] = format!("load-{}", created.len()).into();
                        created.push(pod.clone());
                        serde_json::to_vec(&pod).unwrap()
                    }
                    _ => serde_json::to_vec(&serde_json::json!({
                        "apiVersion": "v1", "kind": "List", "metadata": {}, "items": []
                    }))
                    .unwrap(),
                };
                requests.push(line);
                send.send_response(
                    http::Response::builder()
                        .status(if requests.last().unwrap().starts_with("POST") {
                            201
                        } else {
                            200
                        })
                        .body(kube::client::Body::from(reply))
                        .unwrap(),
                );
            }
            (created, requests)
        });
        let round = create_round(&client, &client, &options, Kind::Labelled, 2, 3, "r1").await;
        drop(client);
        let (created, requests) = server.await.unwrap();

        assert_eq!((round.latencies.len(), round.errors), (6, 0));
        // One scrape before and one after: 10 admissions in 2 s, 3 Secret POSTs between them.
        assert_eq!(round.webhook_mean_ms("pods.agentsecrets.io"), Some(200.0));
        assert_eq!(round.secret_requests("POST"), 3.0);
        assert_eq!(round.secret_requests("PATCH"), 0.0);
        assert_eq!(created.len(), 6);
        for pod in &created {
            let labels = &pod["metadata"]["labels"];
            assert_eq!(labels[OWNER_LABEL], "alice");
            assert_eq!(labels[ROUND_LABEL], "r1");
            assert_eq!(labels[LOAD_LABEL], "true");
            assert_eq!(pod["spec"]["schedulingGates"][0]["name"], SCHEDULING_GATE);
        }
        // Then the round's pods are deleted and their absence confirmed.
        let tail: Vec<&str> = requests[requests.len() - 3..]
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail,
            [
                "GET /metrics",
                "DELETE /api/v1/namespaces/default/pods",
                "GET /api/v1/namespaces/default/pods"
            ]
        );
    }
}
