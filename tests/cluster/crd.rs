//! The CRD alone (no webhook): what the API server itself refuses.

use super::*;

#[tokio::test]
#[ignore = "needs cluster"]
async fn crd_installs_and_is_established() {
    let client = client().await;
    install_crd(&client).await;
    let crd = Api::<CustomResourceDefinition>::all(client)
        .get("agentsecrets.agentsecrets.io")
        .await
        .unwrap();
    let managers: Vec<String> = crd
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.iter().any(|m| m == FIELD_MANAGER), "{managers:?}");
    let names = &crd.spec.names;
    assert_eq!(names.short_names.as_deref(), Some(&["asec".to_owned()][..]));
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn crd_refuses_a_plaintext_value_without_the_webhook() {
    let client = client().await;
    install_crd(&client).await;
    assert_no_foreign_agentsecret_webhook(&client).await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let api: Api<AgentSecret> = Api::namespaced(client.clone(), &ns);
    let value = unique("cluster-canary-crd-plaintext");

    let plaintext = with_value(agentsecret(&ns, "plain", "alice", "X_BEARER_TOKEN"), &value);
    let status = api_error(api.create(&PostParams::default(), &plaintext).await);
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("must never be stored in plaintext"),
        "{}",
        status.message
    );
    assert!(!status.message.contains(&value), "{}", status.message);
    // Also next to a sealed value, and by server-side apply.
    let both = with_sealed(plaintext.clone());
    let status = api_error(api.create(&PostParams::default(), &both).await);
    assert!(
        status.message.contains("must never be stored in plaintext"),
        "{}",
        status.message
    );
    let status = api_error(
        api.patch(
            "plain",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&plaintext),
        )
        .await,
    );
    assert!(
        status.message.contains("must never be stored in plaintext"),
        "{}",
        status.message
    );
    // Neither a value nor a sealed value.
    let empty = agentsecret(&ns, "empty", "alice", "X_BEARER_TOKEN");
    let status = api_error(api.create(&PostParams::default(), &empty).await);
    assert!(
        status.message.contains("spec.value is required"),
        "{}",
        status.message
    );
    assert!(
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "nothing was stored"
    );

    // A sealed value is stored; a later update adding plaintext is refused too.
    let sealed = with_sealed(agentsecret(&ns, "sealed", "alice", "X_BEARER_TOKEN"));
    api.create(&PostParams::default(), &sealed).await.unwrap();
    let status = api_error(
        api.patch(
            "sealed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"value": value}})),
        )
        .await,
    );
    assert!(
        status.message.contains("must never be stored in plaintext"),
        "{}",
        status.message
    );
    assert!(!stored_json(&client, &ns, "sealed").await.contains(&value));
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn crd_refuses_invalid_and_reserved_env_names() {
    let client = client().await;
    install_crd(&client).await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let api: Api<AgentSecret> = Api::namespaced(client.clone(), &ns);
    for (env_name, needle) in [
        ("lower", "uppercase identifier"),
        ("1ABC", "uppercase identifier"),
        ("A-B", "uppercase identifier"),
        ("PATH", "reserved"),
        ("LD_PRELOAD", "reserved"),
        ("KUBERNETES_FOO", "reserved"),
    ] {
        let object = with_sealed(agentsecret(&ns, "env", "alice", env_name));
        let status = api_error(api.create(&PostParams::default(), &object).await);
        assert_eq!(status.code, 422, "{env_name}: {status:?}");
        assert!(
            status.message.contains("spec.envName") && status.message.contains(needle),
            "{env_name}: {}",
            status.message
        );
    }
    // At the limit it is accepted; one more is refused.
    let longest = with_sealed(agentsecret(&ns, "longest", "alice", &"A".repeat(255)));
    api.create(&PostParams::default(), &longest).await.unwrap();
    let too_long = with_sealed(agentsecret(&ns, "too-long", "alice", &"A".repeat(256)));
    let status = api_error(api.create(&PostParams::default(), &too_long).await);
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("spec.envName") && status.message.contains("255"),
        "{}",
        status.message
    );
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn crd_refuses_an_owner_change_and_an_overlong_description() {
    let client = client().await;
    install_crd(&client).await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let api: Api<AgentSecret> = Api::namespaced(client.clone(), &ns);

    let mut object = with_sealed(agentsecret(
        &ns,
        "x-bearer-token",
        "alice",
        "X_BEARER_TOKEN",
    ));
    object.spec.description = Some("d".repeat(1024));
    let stored = api.create(&PostParams::default(), &object).await.unwrap();

    // By merge patch and by replace.
    let status = api_error(
        api.patch(
            "x-bearer-token",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"owner": "bob"}})),
        )
        .await,
    );
    assert_eq!(status.code, 422, "{status:?}");
    assert!(status.message.contains("immutable"), "{}", status.message);
    let mut moved = stored.clone();
    moved.spec.owner = "bob".into();
    let status = api_error(
        api.replace("x-bearer-token", &PostParams::default(), &moved)
            .await,
    );
    assert!(status.message.contains("immutable"), "{}", status.message);
    assert_eq!(api.get("x-bearer-token").await.unwrap().spec.owner, "alice");

    let mut long = with_sealed(agentsecret(&ns, "long", "alice", "LONG_DESCRIPTION"));
    long.spec.description = Some("d".repeat(1025));
    let status = api_error(api.create(&PostParams::default(), &long).await);
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("spec.description") && status.message.contains("1024"),
        "{}",
        status.message
    );
    let status = api_error(
        api.patch(
            "x-bearer-token",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"description": "d".repeat(1025)}})),
        )
        .await,
    );
    assert!(status.message.contains("1024"), "{}", status.message);
}
