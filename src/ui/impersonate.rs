//! Kubernetes calls as the signed-in user: a `tower::Service` in front of the page's shared
//! client that adds `Impersonate-User` and one `Impersonate-Group` per group to every request.
//!
//! The shared client (the page's service account, which may only impersonate) keeps its
//! connection pool and credentials; only the headers differ per user. The API server then
//! authorizes each call as that user, so RBAC and the cluster's owner-binding policy decide,
//! not the page. Building a `kube::Config` with `auth_info.impersonate` per request would
//! instead open a new connection pool (and TLS handshake) per user.

use axum::http::{HeaderName, HeaderValue, Request, Response};
use futures::future::BoxFuture;
use kube::client::Body;
use std::task::{Context, Poll};
use tower::{BoxError, Service};

/// `Impersonate-User`.
pub const IMPERSONATE_USER: HeaderName = HeaderName::from_static("impersonate-user");
/// `Impersonate-Group`, repeated per group.
pub const IMPERSONATE_GROUP: HeaderName = HeaderName::from_static("impersonate-group");

/// Who the page acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub username: HeaderValue,
    pub groups: Vec<HeaderValue>,
}

/// The shared client's service with the user's impersonation headers added.
#[derive(Clone)]
pub struct Impersonating {
    inner: kube::Client,
    principal: Principal,
}

impl Service<Request<Body>> for Impersonating {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The shared client buffers requests and is always ready to accept one.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let headers = request.headers_mut();
        // Nothing upstream may choose whom we act as: drop any impersonation header and set
        // exactly the signed-in user's.
        headers.remove(IMPERSONATE_USER);
        headers.remove(IMPERSONATE_GROUP);
        headers.remove("impersonate-uid");
        let stale: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("impersonate-extra-"))
            .cloned()
            .collect();
        for name in stale {
            headers.remove(name);
        }
        headers.insert(IMPERSONATE_USER, self.principal.username.clone());
        for group in &self.principal.groups {
            headers.append(IMPERSONATE_GROUP, group.clone());
        }
        let client = self.inner.clone();
        Box::pin(async move { client.send(request).await.map_err(BoxError::from) })
    }
}

/// A client whose every request is made as `principal`, defaulting to `namespace`.
pub fn client_as(shared: &kube::Client, principal: Principal, namespace: &str) -> kube::Client {
    kube::Client::new(
        Impersonating {
            inner: shared.clone(),
            principal,
        },
        namespace,
    )
}
