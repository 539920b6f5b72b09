//! The webhook, served from this process and registered with the API server.

use super::*;

struct TestCa {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A CA and a serving certificate for `host` (an IP address or DNS name) signed by it.
fn issue_certificate(host: &str) -> TestCa {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "agent-secrets tests CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let mut params = CertificateParams::new(vec![host.to_owned()]).unwrap_or_else(|e| {
        panic!("{HOST_ENV}={host:?} is neither an IP address nor a DNS name: {e}")
    });
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
        .distinguished_name
        .push(DnType::CommonName, "agent-secrets tests webhook");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    TestCa {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The webhook host the API server can reach, from the environment; fails (never skips)
/// when it is not set.
fn webhook_host() -> String {
    match std::env::var(HOST_ENV) {
        Ok(host) if !host.trim().is_empty() => host.trim().to_owned(),
        _ => panic!(
            "{HOST_ENV} is not set. The webhook tests serve the webhook from this process and \
             register it with the API server, which must be able to connect back: set {HOST_ENV} \
             to this machine's address as seen from the API server (127.0.0.1 for a local \
             kube-apiserver; for kind, the docker network gateway: \
             docker network inspect kind -f '{{{{(index .IPAM.Config 0).Gateway}}}}'). \
             Optionally set {PORT_ENV} to a fixed port. See the top of tests/cluster.rs."
        ),
    }
}

/// The webhook running in this process against the real API server, registered for the
/// test's namespaces only.
pub(crate) struct Webhook {
    pub(crate) client: Client,
    pub(crate) keyring: Arc<Keyring>,
    pub(crate) index: Arc<SecretIndex>,
    namespaces: Vec<String>,
    /// Stops the webhook and the watch, deletes the namespaces and the configuration.
    _guard: Guard,
}

impl Webhook {
    /// Install the CRD, create `namespaces` namespaces, start the cache and the webhook and
    /// register it; returns once the API server calls it.
    pub(crate) async fn start(namespaces: usize) -> Self {
        Self::start_with(namespaces, |_| {}).await
    }

    /// [`Webhook::start`] with the policy changed by `configure` first.
    pub(crate) async fn start_with(namespaces: usize, configure: impl FnOnce(&mut Policy)) -> Self {
        let host = webhook_host();
        let client = client().await;
        install_crd(&client).await;
        let mut guard = Guard::default();
        let mut names = Vec::new();
        for _ in 0..namespaces {
            let ns = guard.namespace(&client).await;
            ensure_default_service_account(&client, &ns).await;
            names.push(ns);
        }

        // The cache, fed by a watch on every AgentSecret as in production.
        let index = Arc::new(SecretIndex::default());
        spawn_agentsecret_watch(&client, &index, &guard.stop);

        let keyring_handle = KeyringHandle::new(Keyring::generate("cluster-test-kek").unwrap());
        let keyring = keyring_handle.current().unwrap();
        let certs = issue_certificate(&host);
        let tls = RustlsConfig::from_pem(certs.cert_pem.into_bytes(), certs.key_pem.into_bytes())
            .await
            .unwrap();
        let port: u16 = std::env::var(PORT_ENV)
            .ok()
            .map(|p| {
                p.parse()
                    .unwrap_or_else(|_| panic!("{PORT_ENV}={p:?} is not a port"))
            })
            .unwrap_or(0);
        let listener = server::bind(([0, 0, 0, 0], port).into())
            .unwrap_or_else(|e| panic!("failed to listen on 0.0.0.0:{port}: {e}"));
        let port = listener.local_addr().unwrap().port();
        // The tests write AgentSecrets of several owners as themselves: the webhook treats
        // the test's own identity as a secret administrator (owner binding has its own tests).
        let mut policy = Policy {
            // One reuse window for a whole test: an owner's sandboxes share one Secret
            // throughout (a 5-minute window could turn between two of its pods).
            pod_secret_reuse_window: std::time::Duration::from_secs(3600),
            ..Policy::default()
        };
        policy.owner_binding.administrators = vec![agent_secrets::webhook::Principal::User(
            whoami(&client).await,
        )];
        configure(&mut policy);
        let state = AppState {
            keyring: keyring_handle,
            index: index.clone(),
            policy: Arc::new(policy),
            pod_secrets: Arc::default(),
            writer: Arc::new(KubeSecretWriter {
                client: client.clone(),
            }),
            metrics: Arc::new(Metrics::default()),
        };
        tokio::spawn(server::serve_webhook(
            listener,
            tls,
            server::webhook_router(state.clone()),
            guard.stop.clone().cancelled_owned(),
        ));
        eventually(
            "the AgentSecret cache syncs",
            Duration::from_secs(30),
            || {
                let ready = state.not_ready_reason();
                async move { ready.map_or(Ok(()), |reason| Err(reason.to_owned())) }
            },
        )
        .await;

        let authority = match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{host}]:{port}"),
            Err(_) => format!("{host}:{port}"),
        };
        let name = unique("agent-secrets-test");
        register_webhook(&client, &name, &authority, &certs.ca_pem, &names).await;
        guard.cleanups.push(Cleanup::WebhookConfiguration(name));

        let webhook = Self {
            client,
            keyring,
            index,
            namespaces: names,
            _guard: guard,
        };
        webhook.wait_until_called().await;
        webhook
    }

    pub(crate) fn ns(&self) -> &str {
        &self.namespaces[0]
    }

    fn agentsecrets(&self, ns: &str) -> Api<AgentSecret> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// The API server loads a new webhook configuration asynchronously: a server dry run of
    /// a plaintext AgentSecret is refused by the CRD until the webhook seals it.
    async fn wait_until_called(&self) {
        let api = self.agentsecrets(self.ns());
        let probe = with_value(
            agentsecret(self.ns(), "probe", "probe", "PROBE"),
            "cluster-probe-value",
        );
        let dry_run = PostParams {
            dry_run: true,
            field_manager: None,
        };
        let (api, probe, dry_run) = (&api, &probe, &dry_run);
        eventually(
            "the API server calls the webhook",
            Duration::from_secs(60),
            move || async move {
                match api.create(dry_run, probe).await {
                    Ok(object) if object.spec.value.is_none() && object.spec.sealed.is_some() => {
                        Ok(())
                    }
                    Ok(object) => Err(format!("not sealed: {:?}", object.spec)),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
    }

    /// Wait until the cache holds exactly `env_names` for `owner` in `ns`.
    pub(crate) async fn wait_for_cache(&self, ns: &str, owner: &str, env_names: &[&str]) {
        let mut expected: Vec<String> = env_names.iter().map(|s| (*s).to_owned()).collect();
        expected.sort();
        eventually(
            "the cache sees the AgentSecrets",
            Duration::from_secs(30),
            || {
                let mut cached: Vec<String> = self
                    .index
                    .owner_secrets(ns, owner)
                    .iter()
                    .map(|s| s.env_name.clone())
                    .collect();
                cached.sort();
                let result = if cached == expected {
                    Ok(())
                } else {
                    Err(format!("{ns}/{owner}: {cached:?}, expected {expected:?}"))
                };
                async move { result }
            },
        )
        .await;
    }

    /// The stored object, checked to hold no plaintext and a sealed value that opens to
    /// `value` for its namespace and owner.
    pub(crate) async fn assert_sealed(&self, ns: &str, name: &str, value: &str) -> AgentSecret {
        let text = stored_json(&self.client, ns, name).await;
        assert!(!text.contains(value), "plaintext stored in {text}");
        let object = self.agentsecrets(ns).get(name).await.unwrap();
        assert!(object.spec.value.is_none(), "{name}: spec.value stored");
        let sealed = object
            .spec
            .sealed
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no spec.sealed"));
        assert_eq!(sealed.key_id, "cluster-test-kek");
        let plain = sealed
            .open(
                &self.keyring,
                object.spec.seal_context(ns, &object.spec.constraints()),
            )
            .unwrap();
        assert_eq!(plain.expose(), value.as_bytes(), "{name}");
        object
    }
}

/// Register the webhook the way the chart does (rules, failure policy, selectors), at `url`
/// instead of a Service, and for `namespaces` only.
async fn register_webhook(
    client: &Client,
    name: &str,
    authority: &str,
    ca_pem: &str,
    namespaces: &[String],
) {
    let configuration = webhook_configuration(name, authority, ca_pem, namespaces);
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &configuration)
        .await
        .unwrap_or_else(|e| panic!("failed to register the webhook configuration {name}: {e}"));
}

/// The webhook configuration of `manifests/` (rules, failure policy, selectors, timeouts as
/// shipped), pointed at `authority` instead of the in-cluster Service and limited to
/// `namespaces`.
fn webhook_configuration(
    name: &str,
    authority: &str,
    ca_pem: &str,
    namespaces: &[String],
) -> MutatingWebhookConfiguration {
    use base64::Engine as _;
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/manifests/agent-secrets.yaml"
    ))
    .unwrap();
    let shipped = serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .find(|object| object["kind"] == "MutatingWebhookConfiguration")
        .expect("manifests/agent-secrets.yaml has a MutatingWebhookConfiguration");
    let mut configuration = shipped.clone();
    configuration["metadata"] =
        json!({"name": name, "labels": {"app.kubernetes.io/part-of": "agent-secrets-tests"}});
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    for webhook in configuration["webhooks"].as_array_mut().unwrap() {
        let path = webhook["clientConfig"]["service"]["path"]
            .as_str()
            .expect("the shipped webhooks call the Service at a path")
            .to_owned();
        webhook["clientConfig"] =
            json!({"url": format!("https://{authority}{path}"), "caBundle": ca_bundle});
        webhook["namespaceSelector"] = json!({"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}
        ]});
    }
    serde_json::from_value(configuration).unwrap()
}

#[test]
fn the_registered_webhook_keeps_the_shipped_rules_and_selectors() {
    let configuration = webhook_configuration(
        "t",
        "192.0.2.1:9443",
        "-----BEGIN CERTIFICATE-----\n",
        &["ns-a".to_owned()],
    );
    let value = serde_json::to_value(&configuration).unwrap();
    let pods = value["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "pods.agentsecrets.io")
        .unwrap();
    assert_eq!(
        pods["clientConfig"]["url"],
        "https://192.0.2.1:9443/mutate/pods"
    );
    assert_eq!(pods["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(pods["failurePolicy"], "Fail");
    assert_eq!(
        pods["objectSelector"]["matchExpressions"][0]["key"],
        "agentsecrets.io/owner"
    );
    assert_eq!(
        pods["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["ns-a"])
    );
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn no_write_path_stores_a_plaintext_value() {
    let webhook = Webhook::start(1).await;
    let ns = webhook.ns().to_owned();
    let api = webhook.agentsecrets(&ns);
    let value = |what: &str| unique(&format!("cluster-canary-{what}"));

    // (a) Client-side apply: kubectl copies the manifest, value included, into an annotation.
    let csa_value = value("client-side-apply");
    let manifest = json!({
        "apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecret",
        "metadata": {"annotations": {}, "name": "x-bearer-token", "namespace": ns},
        "spec": {"owner": "alice", "envName": "X_BEARER_TOKEN",
                 "description": "X/Twitter API Bearer Token", "value": csa_value}
    });
    let mut object: AgentSecret = serde_json::from_value(manifest.clone()).unwrap();
    object.metadata.annotations = Some(BTreeMap::from([(
        LAST_APPLIED.to_owned(),
        format!("{manifest}\n"),
    )]));
    assert!(serde_json::to_string(&object).unwrap().contains(&csa_value));
    let params = PostParams {
        dry_run: false,
        field_manager: Some("kubectl-client-side-apply".into()),
    };
    api.create(&params, &object).await.unwrap();
    let stored = webhook
        .assert_sealed(&ns, "x-bearer-token", &csa_value)
        .await;
    let annotation = stored.annotations().get(LAST_APPLIED).unwrap();
    let applied: Value = serde_json::from_str(annotation).unwrap();
    assert!(applied["spec"].get("value").is_none(), "{annotation}");
    assert_eq!(applied["spec"]["envName"], "X_BEARER_TOKEN");

    // (b) Server-side apply; applying the same value again changes nothing.
    let ssa_value = value("server-side-apply");
    let applied = json!({
        "apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecret",
        "metadata": {"name": "notion-api-key", "namespace": ns},
        "spec": {"owner": "alice", "envName": "NOTION_API_KEY", "value": ssa_value}
    });
    let ssa = PatchParams::apply("kubectl");
    api.patch("notion-api-key", &ssa, &Patch::Apply(&applied))
        .await
        .unwrap();
    let first = webhook
        .assert_sealed(&ns, "notion-api-key", &ssa_value)
        .await;
    api.patch("notion-api-key", &ssa, &Patch::Apply(&applied))
        .await
        .unwrap();
    let again = webhook
        .assert_sealed(&ns, "notion-api-key", &ssa_value)
        .await;
    assert_eq!(
        again.spec.sealed, first.spec.sealed,
        "re-applying the same value keeps the sealed value"
    );

    // (c) Plain create.
    let create_value = value("create");
    let object = with_value(
        agentsecret(&ns, "postgres-password", "bob", "POSTGRES_PASSWORD"),
        &create_value,
    );
    api.create(&PostParams::default(), &object).await.unwrap();
    let created = webhook
        .assert_sealed(&ns, "postgres-password", &create_value)
        .await;

    // (d) Replace with a manifest without the value: the stored value is kept.
    let mut replacement = agentsecret(&ns, "postgres-password", "bob", "POSTGRES_PASSWORD");
    replacement.metadata.resource_version = created.metadata.resource_version.clone();
    replacement.spec.description = Some("DB password (rotated description)".into());
    api.replace("postgres-password", &PostParams::default(), &replacement)
        .await
        .unwrap();
    let replaced = webhook
        .assert_sealed(&ns, "postgres-password", &create_value)
        .await;
    assert_eq!(replaced.spec.sealed, created.spec.sealed);
    assert_eq!(
        replaced.spec.description.as_deref(),
        Some("DB password (rotated description)")
    );

    // A merge patch bringing a new value re-seals it.
    let new_value = value("merge-patch");
    api.patch(
        "postgres-password",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"value": new_value}})),
    )
    .await
    .unwrap();
    webhook
        .assert_sealed(&ns, "postgres-password", &new_value)
        .await;

    // A server dry run is sealed in the answer and stores nothing.
    let dry_value = value("dry-run");
    let dry = api
        .create(
            &PostParams {
                dry_run: true,
                field_manager: None,
            },
            &with_value(
                agentsecret(&ns, "dry-run", "alice", "DRY_RUN_TOKEN"),
                &dry_value,
            ),
        )
        .await
        .unwrap();
    assert!(dry.spec.value.is_none() && dry.spec.sealed.is_some());
    assert!(!serde_json::to_string(&dry).unwrap().contains(&dry_value));
    assert!(api.get_opt("dry-run").await.unwrap().is_none());

    // The webhook's own refusals reach the user: a second secret with the same envName (once
    // the cache has seen the first).
    webhook
        .wait_for_cache(&ns, "alice", &["NOTION_API_KEY", "X_BEARER_TOKEN"])
        .await;
    let duplicate_value = value("duplicate");
    let status = api_error(
        api.create(
            &PostParams::default(),
            &with_value(
                agentsecret(&ns, "duplicate", "alice", "X_BEARER_TOKEN"),
                &duplicate_value,
            ),
        )
        .await,
    );
    assert!(
        !status.message.contains(&duplicate_value),
        "{}",
        status.message
    );
    assert!(
        status
            .message
            .contains("already has a secret with envName X_BEARER_TOKEN")
            && status.message.contains("x-bearer-token"),
        "{}",
        status.message
    );

    // Nothing anywhere in the namespace holds any of the values: objects, list, events.
    let everything = format!(
        "{}{}",
        serde_json::to_string(&api.list(&ListParams::default()).await.unwrap()).unwrap(),
        serde_json::to_string(
            &Api::<Event>::namespaced(webhook.client.clone(), &ns)
                .list(&ListParams::default())
                .await
                .unwrap()
        )
        .unwrap()
    );
    for plaintext in [
        &csa_value,
        &ssa_value,
        &create_value,
        &new_value,
        &dry_value,
        &duplicate_value,
    ] {
        assert!(
            !everything.contains(plaintext.as_str()),
            "{plaintext} stored"
        );
    }
}

fn pod_annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// `(name, secretKeyRef secret name)` of each env entry of the pod's first container.
fn env_refs(pod: &Pod) -> Vec<(String, Option<String>)> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| {
            let secret = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .map(|r| r.name.clone());
            (e.name.clone(), secret)
        })
        .collect()
}

fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).unwrap()))
        .collect()
}

/// Check a pod injected with `expected` (env name → value) and return its Secret's name.
async fn assert_injected(
    webhook: &Webhook,
    ns: &str,
    pod: &Pod,
    owner: &str,
    expected: &BTreeMap<String, String>,
) -> String {
    let secret_name = pod_annotation(pod, "agentsecrets.io/secret-name")
        .unwrap_or_else(|| panic!("{} was not injected: {:?}", pod.name_any(), pod.metadata))
        .to_owned();
    let names: Vec<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(
        pod_annotation(pod, "agentsecrets.io/injected"),
        Some(names.join(",").as_str())
    );
    let mut wanted = vec![("LOG_LEVEL".to_owned(), None)];
    wanted.extend(
        expected
            .keys()
            .map(|k| (k.clone(), Some(secret_name.clone()))),
    );
    assert_eq!(env_refs(pod), wanted, "{}", pod.name_any());

    let secret = Api::<Secret>::namespaced(webhook.client.clone(), ns)
        .get(&secret_name)
        .await
        .unwrap();
    assert_eq!(secret.immutable, Some(true));
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("agentsecrets.io/owner").map(String::as_str),
        Some(owner)
    );
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("agent-secrets")
    );
    assert_eq!(
        labels.get("agentsecrets.io/pod-scoped").map(String::as_str),
        Some("true")
    );
    assert_eq!(&secret_data(&secret), expected, "{secret_name}");
    secret_name
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn sandbox_pods_get_only_their_owners_secrets_by_reference() {
    let webhook = Webhook::start(2).await;
    let ns = webhook.ns().to_owned();
    let other_ns = webhook.namespaces[1].clone();
    let value = |what: &str| unique(&format!("cluster-canary-{what}"));
    let alice = BTreeMap::from([
        ("NOTION_API_KEY".to_owned(), value("alice-notion")),
        ("X_BEARER_TOKEN".to_owned(), value("alice-x")),
    ]);
    let bob = BTreeMap::from([
        ("POSTGRES_PASSWORD".to_owned(), value("bob-pg")),
        ("X_BEARER_TOKEN".to_owned(), value("bob-x")),
    ]);
    let alice_elsewhere = value("alice-other-namespace");
    let api = webhook.agentsecrets(&ns);
    for (owner, values) in [("alice", &alice), ("bob", &bob)] {
        for (env_name, plaintext) in values {
            let name = format!("{owner}-{}", env_name.to_lowercase().replace('_', "-"));
            let object = with_value(agentsecret(&ns, &name, owner, env_name), plaintext);
            api.create(&PostParams::default(), &object).await.unwrap();
        }
    }
    webhook
        .agentsecrets(&other_ns)
        .create(
            &PostParams::default(),
            &with_value(
                agentsecret(&other_ns, "alice-x", "alice", "X_BEARER_TOKEN"),
                &alice_elsewhere,
            ),
        )
        .await
        .unwrap();
    webhook
        .wait_for_cache(&ns, "alice", &["NOTION_API_KEY", "X_BEARER_TOKEN"])
        .await;
    webhook
        .wait_for_cache(&ns, "bob", &["POSTGRES_PASSWORD", "X_BEARER_TOKEN"])
        .await;
    webhook
        .wait_for_cache(&other_ns, "alice", &["X_BEARER_TOKEN"])
        .await;

    let pods: Api<Pod> = Api::namespaced(webhook.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(webhook.client.clone(), &ns);
    let pod_scoped = ListParams::default().labels("agentsecrets.io/pod-scoped=true");

    let alice_pod = pods
        .create(
            &PostParams::default(),
            &sandbox_pod("sandbox-alice", Some("alice")),
        )
        .await
        .unwrap();
    let alice_secret = assert_injected(&webhook, &ns, &alice_pod, "alice", &alice).await;

    let bob_pod = pods
        .create(
            &PostParams::default(),
            &sandbox_pod("sandbox-bob", Some("bob")),
        )
        .await
        .unwrap();
    let bob_secret = assert_injected(&webhook, &ns, &bob_pod, "bob", &bob).await;
    assert_ne!(alice_secret, bob_secret);

    // alice's next sandbox shares her Secret: its admission writes nothing.
    let alice_again = pods
        .create(
            &PostParams::default(),
            &sandbox_pod("sandbox-alice-again", Some("alice")),
        )
        .await
        .unwrap();
    assert_eq!(
        assert_injected(&webhook, &ns, &alice_again, "alice", &alice).await,
        alice_secret
    );

    // An owner without secrets, and a pod without the label, are admitted unchanged.
    for (name, owner) in [("sandbox-carol", Some("carol")), ("plain", None)] {
        let pod = pods
            .create(&PostParams::default(), &sandbox_pod(name, owner))
            .await
            .unwrap();
        assert_eq!(
            env_refs(&pod),
            vec![("LOG_LEVEL".to_owned(), None)],
            "{name}"
        );
        assert_eq!(pod_annotation(&pod, "agentsecrets.io/secret-name"), None);
    }
    // A requested secret the owner lacks denies the pod, naming it.
    let mut subset = sandbox_pod("sandbox-alice-subset", Some("alice"));
    subset.metadata.annotations = Some(BTreeMap::from([(
        "agentsecrets.io/secrets".to_owned(),
        "X_BEARER_TOKEN,POSTGRES_PASSWORD".to_owned(),
    )]));
    let status = api_error(pods.create(&PostParams::default(), &subset).await);
    assert!(
        status.message.contains("POSTGRES_PASSWORD"),
        "{}",
        status.message
    );

    // A server dry run gets the injection in its answer but creates no Secret.
    let before = secrets.list(&pod_scoped).await.unwrap().items.len();
    assert_eq!(before, 2, "one per owner");
    let dry = pods
        .create(
            &PostParams {
                dry_run: true,
                field_manager: None,
            },
            &sandbox_pod("sandbox-alice-dry-run", Some("alice")),
        )
        .await
        .unwrap();
    let dry_secret = pod_annotation(&dry, "agentsecrets.io/secret-name")
        .unwrap()
        .to_owned();
    assert_eq!(dry_secret, alice_secret, "alice's shared Secret");
    assert!(
        env_refs(&dry)
            .iter()
            .any(|(_, s)| s.as_deref() == Some(dry_secret.as_str()))
    );
    // A dry run needing a new Secret (other content) names it but creates nothing.
    let mut dry_subset = sandbox_pod("sandbox-alice-dry-subset", Some("alice"));
    dry_subset.metadata.annotations = Some(BTreeMap::from([(
        "agentsecrets.io/secrets".to_owned(),
        "X_BEARER_TOKEN".to_owned(),
    )]));
    let dry = pods
        .create(
            &PostParams {
                dry_run: true,
                field_manager: None,
            },
            &dry_subset,
        )
        .await
        .unwrap();
    let subset_secret = pod_annotation(&dry, "agentsecrets.io/secret-name").unwrap();
    assert_ne!(subset_secret, alice_secret);
    assert!(secrets.get_opt(subset_secret).await.unwrap().is_none());
    assert_eq!(secrets.list(&pod_scoped).await.unwrap().items.len(), before);
    assert!(
        pods.get_opt("sandbox-alice-dry-run")
            .await
            .unwrap()
            .is_none()
    );

    // The stored pods hold references only: no value of anyone's.
    let stored_pods =
        serde_json::to_string(&pods.list(&ListParams::default()).await.unwrap()).unwrap();
    for plaintext in alice.values().chain(bob.values()).chain([&alice_elsewhere]) {
        assert!(
            !stored_pods.contains(plaintext.as_str()),
            "{plaintext} in a pod spec"
        );
    }
    // Every pod-scoped Secret holds only its own owner's values from this namespace.
    for secret in secrets.list(&pod_scoped).await.unwrap() {
        let data = secret_data(&secret);
        let owner = secret.labels()["agentsecrets.io/owner"].clone();
        let expected = if owner == "alice" { &alice } else { &bob };
        assert_eq!(&data, expected, "{}", secret.name_any());
        assert!(!data.values().any(|v| *v == alice_elsewhere));
    }
}
