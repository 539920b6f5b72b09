//! Tests against a real Kubernetes API server (v1.30 or later: the CRD's CEL rules need it).
//! Every test is ignored by default; one command runs them all (this file and the controller
//! tests in `tests/cluster/controller.rs`):
//!
//! ```sh
//! export KUBECONFIG=$HOME/.kube/config
//! # Where the API server reaches this machine; the webhook is served from this test process
//! # on 0.0.0.0 and its certificate is issued for this host (an IP address or a DNS name):
//! #   a kube-apiserver running on this machine:  127.0.0.1
//! #   kind:      docker network inspect kind -f '{{(index .IPAM.Config 0).Gateway}}'
//! #   minikube:  minikube ssh -- getent hosts host.minikube.internal | cut -d' ' -f1
//! export AGENTSECRETS_TEST_WEBHOOK_HOST=172.18.0.1
//! # Optional: a fixed port for the webhook (default: a free port), e.g. to open a firewall.
//! # export AGENTSECRETS_TEST_WEBHOOK_PORT=9443
//! cargo test --test cluster -- --ignored --test-threads=1
//! ```
//!
//! Only the webhook tests need `AGENTSECRETS_TEST_WEBHOOK_HOST`; the CRD and controller tests
//! (`cargo test --test cluster -- --ignored --test-threads=1 crd controller::`) do not.
//!
//! The credentials need to: server-side apply the AgentSecret CRD (field manager
//! `agent-secrets-tests`; it is left installed), create and delete namespaces and
//! MutatingWebhookConfigurations, list AgentSecrets and Secrets in every namespace, and work
//! with AgentSecrets (and their status), pods, Secrets, ServiceAccounts, Leases and Events in
//! those namespaces (cluster-admin on a throwaway cluster is simplest).
//!
//! Each test works in namespaces of its own (`asec-test-…`) and deletes them, and the webhook
//! configuration it registered, when it ends, also on failure. The webhook configuration is
//! limited to the test's namespaces, so the rest of the cluster is never sent to it. The
//! agent-secrets operator itself must not be installed on the cluster: its webhook would seal
//! the plaintext the CRD tests expect the CRD to refuse. The sandbox pods created here select
//! a node label nobody has, so they stay Pending and nothing is pulled or run.
//!
//! The controller tests that run the controller do so in this process as the operator does,
//! over the whole cluster: they first check that no AgentSecret or pod-scoped Secret exists
//! outside test namespaces, and fail otherwise. The controller deletes pod-scoped Secrets
//! itself (they are never owned by a pod), so those tests need no garbage collector.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "cluster/controller.rs"]
mod controller;
#[path = "cluster/crd.rs"]
mod crd;
#[path = "common/feed.rs"]
mod feed_kit;
#[path = "cluster/harness.rs"]
mod harness;
#[path = "cluster/policies.rs"]
mod policies;
#[path = "cluster/secretless.rs"]
mod secretless;
#[path = "cluster/ui.rs"]
mod ui;
#[path = "cluster/webhook.rs"]
mod webhook;

use agent_secrets::api::{AgentSecret, AgentSecretSpec, SealedValue, SecretString};
use agent_secrets::cache::SecretIndex;
use agent_secrets::crypto::{Keyring, KeyringHandle};
use agent_secrets::telemetry::Metrics;
use agent_secrets::webhook::Policy;
use agent_secrets::webhook::server::{self, AppState, KubeSecretWriter};
use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::Status;
use kube::runtime::wait::{await_condition, conditions};

use harness::*;
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
