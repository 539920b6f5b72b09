//! The webhook server's resource bounds: connections, header and body read time, buffered
//! body bytes, HTTP/2 streams and reviews in progress.
//!
//! The order matters for a server that must answer the API server within its webhook timeout
//! while anyone who can reach the port may connect: bodies are received concurrently (only
//! their bytes are bounded, so clients trickling a body hold little and time out), and only a
//! complete body waits for one of the few slots that decide reviews. A slow upload therefore
//! never holds a slot a genuine review needs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

/// Largest AdmissionReview body accepted: the API server's own request body limit (3 MiB,
/// kube-apiserver `--max-request-body-bytes`'s default). The reviews sent here carry a pod
/// CREATE (one object, which arrived in a request of at most that size) or AgentSecrets,
/// whose spec is bounded by the CRD schema and whose metadata by the API server's 256 KiB
/// annotation limit, so a genuine review, even an UPDATE with its old object, fits.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// The webhook server's bounds. [`Limits::default`] is what `run` serves with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most open connections; beyond it a new connection is closed at once (the API server
    /// retries on another one), so idle or slow clients cannot exhaust file descriptors.
    pub max_connections: usize,
    /// Time to complete the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time to receive a request's headers on HTTP/1.1. Hyper also applies it to an idle
    /// keep-alive connection waiting for its next request.
    pub header_read_timeout: Duration,
    /// Largest HTTP/1.1 read buffer (request line and headers) and HTTP/2 header list.
    pub max_header_bytes: usize,
    /// Time to receive a whole body once its headers have arrived. The API server sends a
    /// review at once; only a slow or malicious client takes longer.
    pub body_read_timeout: Duration,
    /// Most body bytes held at once, over all requests (received or in review); beyond it a
    /// request is answered 503 at once. This bounds the memory bodies can take whatever the
    /// number of connections.
    pub max_buffered_body_bytes: usize,
    /// Most reviews being decided at once (each may wait on the API server to create a
    /// pod-scoped Secret).
    pub max_concurrent_reviews: usize,
    /// Most complete reviews waiting for one of those slots; beyond it a review is answered
    /// 503 at once rather than queued past the API server's timeout.
    pub max_queued_reviews: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of a connection (and of each stream): body bytes a client
    /// may send ahead of the handler reading them.
    pub http2_window_bytes: u32,
    /// How often an idle HTTP/2 connection is pinged, and how long the answer may take before
    /// the connection is closed.
    pub http2_keep_alive_interval: Duration,
    pub http2_keep_alive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // The API servers keep a few connections each (HTTP/2 multiplexes reviews).
            max_connections: 256,
            tls_handshake_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            body_read_timeout: Duration::from_secs(5),
            // Sixteen reviews of the largest size; a genuine review is a few kB.
            max_buffered_body_bytes: 16 * MAX_BODY_BYTES,
            max_concurrent_reviews: 64,
            max_queued_reviews: 256,
            http2_max_concurrent_streams: 64,
            http2_window_bytes: 256 * 1024,
            http2_keep_alive_interval: Duration::from_secs(20),
            http2_keep_alive_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// The bound on memory held by request bodies and connection buffers, in bytes: what the
    /// limits promise whatever clients send. (TLS session buffers, tens of kB per connection
    /// in rustls, come on top, bounded by [`Limits::max_connections`].)
    pub fn max_request_memory(&self) -> usize {
        let per_connection = self.max_header_bytes.max(self.http2_window_bytes as usize);
        self.max_buffered_body_bytes
            .saturating_add(self.max_connections.saturating_mul(per_connection))
    }
}

/// What the review handlers share to honour the limits.
#[derive(Debug)]
pub(crate) struct Gates {
    pub body_bytes: Semaphore,
    pub body_read_timeout: Duration,
    /// Reviews deciding or queued: `max_concurrent_reviews + max_queued_reviews` permits.
    admitted: Semaphore,
    deciding: Semaphore,
}

impl Gates {
    pub fn new(limits: &Limits) -> Self {
        Self {
            body_bytes: Semaphore::new(limits.max_buffered_body_bytes.min(Semaphore::MAX_PERMITS)),
            body_read_timeout: limits.body_read_timeout,
            admitted: Semaphore::new(
                limits
                    .max_concurrent_reviews
                    .saturating_add(limits.max_queued_reviews)
                    .min(Semaphore::MAX_PERMITS),
            ),
            deciding: Semaphore::new(limits.max_concurrent_reviews.min(Semaphore::MAX_PERMITS)),
        }
    }

    /// Wait for a slot to decide a review, or `None` at once when too many wait already.
    pub async fn decide_slot(&self) -> Option<(SemaphorePermit<'_>, SemaphorePermit<'_>)> {
        let queued = self.admitted.try_acquire().ok()?;
        let deciding = self.deciding.acquire().await.ok()?;
        Some((queued, deciding))
    }
}

/// Body bytes a request holds against [`Gates::body_bytes`], given back when it is dropped.
#[derive(Debug)]
pub(crate) struct BodyCharge<'a> {
    budget: &'a Semaphore,
    bytes: usize,
}

impl<'a> BodyCharge<'a> {
    pub fn new(budget: &'a Semaphore) -> Self {
        Self { budget, bytes: 0 }
    }

    /// Take `bytes` more, or `false` when the budget does not have them.
    pub fn add(&mut self, bytes: usize) -> bool {
        let Ok(count) = u32::try_from(bytes) else {
            return false;
        };
        match self.budget.try_acquire_many(count) {
            Ok(permit) => {
                permit.forget();
                self.bytes += bytes;
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for BodyCharge<'_> {
    fn drop(&mut self) {
        self.budget.add_permits(self.bytes);
    }
}

/// An acceptor that admits at most [`Limits::max_connections`] connections; the one past it is
/// closed at once.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
}

impl ConnectionLimit {
    pub fn new(max_connections: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
        }
    }
}

impl<I, S> axum_server::accept::Accept<I, S> for ConnectionLimit
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    type Stream = Counted<I>;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Counted<I>, S)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        std::future::ready(match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok((
                Counted {
                    stream,
                    _permit: permit,
                },
                service,
            )),
            // Dropping the stream closes the connection.
            Err(_) => Err(io::Error::other("connection limit reached")),
        })
    }
}

/// A connection counted against [`ConnectionLimit`] for as long as it is open.
#[derive(Debug)]
pub struct Counted<I> {
    stream: I,
    _permit: OwnedSemaphorePermit,
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_charge_is_given_back_when_dropped() {
        let budget = Semaphore::new(10);
        let mut charge = BodyCharge::new(&budget);
        assert!(charge.add(6));
        assert!(!charge.add(5), "only 4 bytes are left");
        assert!(charge.add(4));
        assert_eq!(budget.available_permits(), 0);
        drop(charge);
        assert_eq!(budget.available_permits(), 10);
    }

    #[tokio::test]
    async fn reviews_past_the_queue_are_turned_away_at_once() {
        let gates = Gates::new(&Limits {
            max_concurrent_reviews: 1,
            max_queued_reviews: 1,
            ..Limits::default()
        });
        let first = gates.decide_slot().await;
        assert!(first.is_some());
        // The second waits for the first's slot; a third finds the queue full.
        let second = gates.decide_slot();
        tokio::pin!(second);
        assert!(futures::poll!(second.as_mut()).is_pending());
        assert!(gates.decide_slot().await.is_none());
        drop(first);
        assert!(second.await.is_some());
    }

    #[test]
    fn the_default_limits_bound_request_memory_and_admit_the_api_servers_largest_body() {
        let limits = Limits::default();
        assert_eq!(MAX_BODY_BYTES, 3 * 1024 * 1024);
        assert!(limits.max_buffered_body_bytes >= MAX_BODY_BYTES);
        // Bodies and connection buffers together stay within a small container's memory.
        assert!(limits.max_request_memory() <= 128 * 1024 * 1024);
    }
}
