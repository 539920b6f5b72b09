//! The operator's value feed for secretless pods: an HTTPS endpoint (`GET /v1/feed`) from which
//! a pod's egress proxy sidecar streams the values of its owner's secretless-capable secrets,
//! authenticated with the pod's projected service-account token (audience
//! [`FEED_AUDIENCE`], bound to the pod). One JSON line per full snapshot whenever it changes,
//! a heartbeat line every 2 s, and the stream ends when the token expires or after 10 min; the
//! proxy reconnects with a freshly read token and fails closed when lines stop arriving.
//!
//! The decisions (who the token is, whether the pod is a secretless sandbox and of whom, what
//! it gets) are pure functions in [`decide`]; [`server`] does the I/O. See docs/secretless.md.

pub mod decide;
pub mod server;

use std::time::Duration;

pub use decide::{Admitted, Namespaces, PodIdentity, Refusal};
pub use server::{FeedSettings, FeedState, feed_router, serve_feed};

// Names shared with the webhook's pod shape (the contract of secretless mode).
pub use crate::api::{
    EGRESS_ANNOTATION, FEED_AUDIENCE, FEED_PATH, FEED_TOKEN_VOLUME, MODE_ANNOTATION,
    PROXY_CA_VOLUME, PROXY_CONTAINER_NAME, PROXY_EGRESS_ENV, PROXY_FEED_CA_ENV, PROXY_OWNER_ENV,
    PROXY_PLACEHOLDERS_ENV,
};

/// Default address of the feed listener.
pub const DEFAULT_FEED_LISTEN: &str = "0.0.0.0:8444";
/// A heartbeat line is sent this often, so the proxy can tell a quiet stream from a dead one.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// How often a stream looks at the AgentSecret cache for a change of its pod's set.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Longest life of one stream: the pod and its token are checked again at each reconnect.
pub const MAX_STREAM: Duration = Duration::from_secs(600);
/// Default cap on concurrent streams (one per running secretless pod per replica).
pub const DEFAULT_MAX_STREAMS: u32 = 1024;
/// The proxy fails closed when no line arrived for this long.
pub const STALE_AFTER: Duration = Duration::from_secs(8);
/// The feed stops vouching once the AgentSecret watch has failed for this long, so that a
/// deletion it cannot see stops being substituted within this + [`STALE_AFTER`] = 10 s.
pub const WATCH_FAILURE_GRACE: Duration = Duration::from_secs(2);
/// The heartbeat line.
pub const HEARTBEAT_LINE: &[u8] = b"{}\n";

/// `--feed-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedListen {
    Off,
    On(std::net::SocketAddr),
}

/// Parses `--feed-listen`.
pub fn parse_feed_listen(text: &str) -> Result<FeedListen, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(FeedListen::Off);
    }
    text.trim()
        .parse()
        .map(FeedListen::On)
        .map_err(|_| format!("{text:?} is neither an address (e.g. 0.0.0.0:8444) nor off"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_listen_is_an_address_or_off() {
        assert_eq!(parse_feed_listen("off"), Ok(FeedListen::Off));
        assert_eq!(parse_feed_listen("OFF"), Ok(FeedListen::Off));
        assert_eq!(
            parse_feed_listen(DEFAULT_FEED_LISTEN),
            Ok(FeedListen::On("0.0.0.0:8444".parse().unwrap()))
        );
        assert!(parse_feed_listen("8444").is_err());
        assert!(parse_feed_listen("").is_err());
    }
}
