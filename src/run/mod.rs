//! `agentsecrets run`: wire the keyring, the AgentSecret cache, the webhook and admin servers
//! and the controller together, and shut them all down on SIGTERM.

mod args;

pub use args::{BootstrapArgs, PolicyArgs, RunArgs, operator_username, parse_duration};

use anyhow::Context as _;
use axum_server::tls_rustls::RustlsConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::cache::{
    PodSecretIndex, SecretIndex, sandbox_scopes, watch_agentsecrets, watch_pod_secrets,
};
use crate::controller::lease::Elector;
use crate::controller::{Context, Settings, run_controller_while_leader};
use crate::crypto::KeyringHandle;
use crate::telemetry::Metrics;
use crate::webhook::server::{self, AppState, KubeSecretWriter};
use crate::webhook::tls::{ClientCertificates, TlsFiles};

/// The webhook's TLS configuration once both files exist and load, checked every 2 s; `None`
/// when stopped first.
async fn wait_for_tls(files: &TlsFiles, stop: &CancellationToken) -> Option<RustlsConfig> {
    let mut waited = 0u32;
    loop {
        match files.server_config() {
            Ok(config) => return Some(RustlsConfig::from_config(Arc::new(config))),
            Err(error) => {
                // Once at first, then every 30 s: the file appears when the kubelet projects
                // the Secret, usually within a minute of its creation.
                if waited.is_multiple_of(15) {
                    tracing::info!(
                        cert = %files.cert.display(),
                        %error,
                        "waiting for the webhook's serving certificate"
                    );
                }
            }
        }
        waited += 1;
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// The shortest `--pod-secret-reuse-window`.
const MIN_POD_SECRET_REUSE_WINDOW: std::time::Duration = crate::api::POD_REQUEST_TIMEOUT;

/// Run the operator until SIGTERM.
pub async fn run_operator(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        webhook_addr,
        admin_addr,
        tls_cert,
        tls_key,
        client_ca,
        keyring,
        policy,
        pod_secret_reuse_window,
        rotation_rate,
        lease_name,
        lease_namespace,
        lease_duration,
        identity,
        max_concurrent_reconciles,
        watch_failure_grace,
        sandbox_namespaces,
        reload_interval,
        bootstrap,
        #[cfg(feature = "bench")]
        bench_synthetic_cache,
        log_format,
        feed_listen,
        feed_max_streams,
    } = args;
    // Benchmark builds only: a synthetic cache instead of a cluster.
    #[cfg(feature = "bench")]
    let synthetic = bench_synthetic_cache;
    #[cfg(not(feature = "bench"))]
    let synthetic: Option<(usize, usize)> = None;
    let sandbox_scopes = sandbox_scopes(&sandbox_namespaces);
    let identity = identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("agentsecrets-{}", std::process::id()));
    crate::telemetry::init_logging(log_format);
    // Shorter, nearly every sandbox would write a Secret, and a reinvoked admission could fall
    // two windows after the first call.
    anyhow::ensure!(
        pod_secret_reuse_window >= MIN_POD_SECRET_REUSE_WINDOW,
        "--pod-secret-reuse-window must be at least {}s (the API server's request timeout)",
        MIN_POD_SECRET_REUSE_WINDOW.as_secs()
    );
    let policy = Arc::new(crate::webhook::Policy {
        pod_secret_reuse_window,
        ..policy.policy(operator_username())?
    });
    // The feed serves sidecar pods only where the webhook injects them.
    let feed_namespaces = crate::feed::Namespaces {
        excluded: policy.excluded_namespaces.clone(),
        only: sandbox_scopes
            .iter()
            .filter_map(|scope| match scope {
                crate::cache::WatchScope::Namespace(namespace) => Some(namespace.clone()),
                crate::cache::WatchScope::Cluster => None,
            })
            .collect(),
    };
    if policy.allowed_principals.is_empty() {
        tracing::warn!(
            "no --allowed-principals: anyone who may create pods can label one for any owner in their namespace"
        );
    }

    let client = match synthetic {
        Some(_) => None,
        None => Some(
            kube::Client::try_default()
                .await
                .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?,
        ),
    };
    let webhook_listener = server::bind(webhook_addr)
        .with_context(|| format!("failed to listen on {webhook_addr}"))?;
    // The feed needs the API server (TokenReview, pods): off in benchmark mode.
    let feed_listener = match (feed_listen, &client) {
        (crate::feed::FeedListen::On(addr), Some(_)) => {
            Some(server::bind(addr).with_context(|| format!("failed to listen on {addr}"))?)
        }
        _ => None,
    };
    let admin_listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("failed to listen on {admin_addr}"))?;

    let stop = CancellationToken::new();
    let keyring_handle = KeyringHandle::default();
    let index = Arc::new(SecretIndex::with_watch_failure_grace(watch_failure_grace));
    let metrics = Arc::new(Metrics::default());
    let pod_secrets = Arc::new(PodSecretIndex::default());
    #[cfg(feature = "bench")]
    if let Some((owners, per_owner)) = synthetic {
        let ring = crate::crypto::Keyring::load(&keyring)?;
        index.replace_all(crate::testing::synthetic(
            &ring, "bench", owners, per_owner,
        )?);
        keyring_handle.replace(ring);
        tracing::warn!(
            secrets = index.len(),
            "benchmark mode: synthetic cache, no cluster, pod-scoped Secrets are discarded"
        );
    }
    let writer: Arc<dyn server::SecretWriter> = match &client {
        Some(client) => Arc::new(KubeSecretWriter {
            client: client.clone(),
        }),
        #[cfg(feature = "bench")]
        None => Arc::new(crate::testing::DiscardingWriter),
        #[cfg(not(feature = "bench"))]
        None => anyhow::bail!("no Kubernetes client is configured"),
    };
    let state = AppState {
        keyring: keyring_handle.clone(),
        index: index.clone(),
        policy,
        writer,
        metrics,
        pod_secrets: pod_secrets.clone(),
    };

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(client) = client.clone() {
        let plan = crate::bootstrap::Plan::from_args(&bootstrap, &lease_namespace);
        if !plan.is_empty() {
            let stop = stop.clone();
            tasks.spawn(async move {
                crate::bootstrap::maintain(client, plan, stop.cancelled_owned()).await;
                Ok(())
            });
        }
    }
    // The serving certificate may not exist yet: on a first install this process generates it
    // (above) and the kubelet then projects the Secret into the pod. Until it is loaded the
    // webhook does not serve and the replica is not ready.
    let tls_loaded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        let failures = state.metrics.keyring_reload_failures.clone();
        tasks.spawn(async move {
            keyring_handle
                .watch_file(keyring, reload_interval, failures, stop.cancelled_owned())
                .await;
            Ok(())
        });
    }

    if let Some(client) = client.clone() {
        let stop = stop.clone();
        tasks.spawn(async move {
            watch_agentsecrets(client, index, stop).await;
            Ok(())
        });
    }
    if let Some(client) = client.clone() {
        for scope in sandbox_scopes.clone() {
            let (client, pod_secrets, stop) = (client.clone(), pod_secrets.clone(), stop.clone());
            tasks.spawn(async move {
                watch_pod_secrets(client, scope, pod_secrets, stop).await;
                Ok(())
            });
        }
    }
    if let (Some(listener), Some(client)) = (feed_listener, client.clone()) {
        // Its own TLS configuration: the webhook's may require the API server's client
        // certificate, which a sandbox's proxy does not have.
        let (cert, key, stop) = (tls_cert.clone(), tls_key.clone(), stop.clone());
        let feed = crate::feed::FeedState::new(
            client,
            state.index.clone(),
            state.keyring.clone(),
            crate::feed::FeedSettings {
                max_streams: feed_max_streams as usize,
                namespaces: feed_namespaces,
                ..crate::feed::FeedSettings::default()
            },
            state.metrics.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            let files = TlsFiles {
                cert,
                key,
                client_ca: None,
                client_certificates: ClientCertificates::Required,
            };
            let Some(tls) = wait_for_tls(&files, &stop).await else {
                return Ok(());
            };
            // The webhook's watcher of the same files reports their expiry and failed
            // reloads; this one must not count them twice.
            let reload = server::watch_tls_files(
                tls.clone(),
                files,
                reload_interval,
                None,
                stop.clone().cancelled_owned(),
            );
            let serve = crate::feed::serve_feed(listener, tls, feed, stop.cancelled_owned());
            let (served, ()) = tokio::join!(serve, reload);
            served.context("feed server failed")
        });
    }
    {
        let stop = stop.clone();
        let router = server::webhook_router(state.clone());
        let tls_loaded = tls_loaded.clone();
        let metrics = state.metrics.clone();
        tasks.spawn(async move {
            let files = TlsFiles {
                cert: tls_cert,
                key: tls_key,
                client_ca,
                client_certificates: ClientCertificates::Required,
            };
            let Some(tls) = wait_for_tls(&files, &stop).await else {
                return Ok(());
            };
            tls_loaded.store(true, std::sync::atomic::Ordering::Release);
            let reload = server::watch_tls_files(
                tls.clone(),
                files,
                reload_interval,
                Some(metrics),
                stop.clone().cancelled_owned(),
            );
            let serve =
                server::serve_webhook(webhook_listener, tls, router, stop.cancelled_owned());
            let (served, ()) = tokio::join!(serve, reload);
            served.context("webhook server failed")
        });
    }
    {
        let stop = stop.clone();
        let router = server::admin_router(state.clone()).layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let tls_loaded = tls_loaded.load(std::sync::atomic::Ordering::Acquire);
                async move {
                    if request.uri().path() == "/readyz" && !tls_loaded {
                        use axum::response::IntoResponse as _;
                        return (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "the webhook's serving certificate is not loaded yet",
                        )
                            .into_response();
                    }
                    next.run(request).await
                }
            },
        ));
        tasks.spawn(async move {
            server::serve_admin(admin_listener, router, stop.cancelled_owned())
                .await
                .context("admin server failed")
        });
    }
    // Only the Lease holder reconciles and writes; every replica serves admission.
    if let Some(client) = client {
        let elector = Elector {
            api: kube::Api::namespaced(client.clone(), &lease_namespace),
            name: lease_name,
            identity: identity.clone(),
            duration: lease_duration,
        };
        let ctx = Arc::new(Context::new(
            client,
            state.keyring.clone(),
            state.index.clone(),
            state.metrics.clone(),
            Settings {
                rewrap_per_second: rotation_rate,
                pod_secret_reuse_window,
                max_concurrent_reconciles,
                sandbox_scopes,
                reporter_instance: Some(identity),
            },
        ));
        let stop = stop.clone();
        tasks.spawn(async move {
            run_controller_while_leader(ctx, elector, stop)
                .await
                .context("leader election stopped")
        });
    }
    tracing::info!(%webhook_addr, %admin_addr, "agent-secrets started");

    let mut result = Ok(());
    tokio::select! {
        () = crate::signal::termination() => tracing::info!("termination signal received; shutting down"),
        Some(joined) = tasks.join_next() => {
            // A task ended before shutdown: that is a failure of the whole process.
            result = match joined {
                Ok(Ok(())) => Err(anyhow::anyhow!("a background task stopped unexpectedly")),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("a background task panicked: {e}")),
            };
        }
    }
    stop.cancel();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "task failed during shutdown");
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(e) => tracing::error!(error = %e, "task panicked during shutdown"),
        }
    }
    tracing::info!("agent-secrets stopped");
    result
}
