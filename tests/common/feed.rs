//! The operator's value feed in tests: its serving certificate, and what kube-apiserver's
//! TokenReview answers for a projected token bound to a pod.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// The feed's serving certificate for 127.0.0.1 and key, as PEM files in a directory, and the
/// CA that signed it (what the webhook hands the proxy sidecar).
pub struct FeedTls {
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn feed_tls(dir: &Path) -> FeedTls {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    FeedTls {
        ca_pem: ca_cert.pem(),
        cert: cert_path,
        key: key_path,
    }
}

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
