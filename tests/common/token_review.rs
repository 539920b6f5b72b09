//! What kube-apiserver's TokenReview answers for a projected token bound to a pod.

use serde_json::{Value, json};

/// A TokenReview's `status` for a projected token of `namespace`'s default service account,
/// bound to the pod `pod` with `uid`, as kube-apiserver gives it.
pub fn bound_to_pod(namespace: &str, pod: &str, uid: &str) -> Value {
    json!({
        "authenticated": true,
        "audiences": [agent_secrets::api::FEED_AUDIENCE],
        "user": {
            "username": format!("system:serviceaccount:{namespace}:default"),
            "uid": "b7a1c0de-0000-4000-8000-00000000aa01",
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/credential-id": ["JTI=0b6c3f7e-1d2a-4b5c-8d9e-0f1a2b3c4d5e"],
                "authentication.kubernetes.io/node-name": ["kind-worker"],
                "authentication.kubernetes.io/node-uid": ["3c2b1a09-0000-4000-8000-00000000bb02"],
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [uid]
            }
        }
    })
}
