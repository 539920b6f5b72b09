//! agent-secrets: per-user credentials for AI-agent sandbox pods on Kubernetes, encrypted at
//! rest and injected at admission.

pub mod api;
pub mod bootstrap;
pub mod cache;
pub mod cli;
pub mod controller;
pub mod crypto;
pub mod feed;
pub mod run;
pub mod secretless;
pub mod signal;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tools;
pub mod ui;
pub mod webhook;
