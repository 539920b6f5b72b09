//! CSRF protection: a signed double-submit token tied to the user.
//!
//! The browser holds a random nonce in a `__Host-` cookie (Secure, HttpOnly, SameSite=Strict).
//! Every form (and the JSON API's `X-CSRF-Token` header) carries
//! `nonce.expiry.HMAC-SHA256(key, user, nonce, expiry)`. A write is accepted only when the
//! token's nonce equals the cookie's, its MAC verifies for the signed-in user and it has not
//! expired. A cross-site page can neither read the cookie nor forge the MAC, and a token
//! issued to one user is useless to another (the proxy, not the cookie, says who the user is).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom as _, SystemRandom};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::UiError;
use axum::http;

/// Name of the nonce cookie. `__Host-` makes the browser refuse it unless Secure, Path=/ and
/// without Domain, so a sibling subdomain cannot plant one.
pub const COOKIE: &str = "__Host-agentsecrets-csrf";
/// Form field carrying the token.
pub const FORM_FIELD: &str = "csrf_token";
/// Header carrying the token on JSON writes.
pub const HEADER: &str = "x-csrf-token";
/// How long a token stays valid: a working day, so a form left open still submits.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);

const NONCE_BYTES: usize = 24;

/// The key tokens are signed with.
pub struct CsrfKey {
    key: hmac::Key,
    random: SystemRandom,
}

impl std::fmt::Debug for CsrfKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CsrfKey(<redacted>)")
    }
}

/// Why a token is refused (never shown in detail to the client, only logged by kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    CookieMismatch,
    Expired,
    BadSignature,
}

impl CsrfKey {
    /// A key from at least 32 bytes of secret material (e.g. a mounted Secret shared by the
    /// replicas, so that a token from one replica verifies on another).
    pub fn from_bytes(material: &[u8]) -> Result<Self, UiError> {
        if material.len() < 32 {
            return Err(UiError::CsrfKey(
                "the CSRF key must be at least 32 bytes".into(),
            ));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, material),
            random: SystemRandom::new(),
        })
    }

    /// A fresh random key (tokens then verify only on this process).
    pub fn generate() -> Result<Self, UiError> {
        let mut material = zeroize::Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(material.as_mut())
            .map_err(|_| UiError::CsrfKey("failed to read OS randomness".into()))?;
        Self::from_bytes(material.as_ref())
    }

    /// A new random nonce for the cookie.
    pub fn new_nonce(&self) -> Result<String, UiError> {
        let mut nonce = [0u8; NONCE_BYTES];
        self.random
            .fill(&mut nonce)
            .map_err(|_| UiError::CsrfKey("failed to read OS randomness".into()))?;
        Ok(URL_SAFE_NO_PAD.encode(nonce))
    }

    /// Whether `nonce` looks like one this server issued (so a planted garbage cookie is
    /// replaced rather than echoed into forms).
    pub fn is_nonce(nonce: &str) -> bool {
        URL_SAFE_NO_PAD
            .decode(nonce)
            .is_ok_and(|b| b.len() == NONCE_BYTES)
    }

    /// The token for `user` bound to the cookie's `nonce`.
    pub fn token(&self, user: &str, nonce: &str, now: SystemTime) -> String {
        let expiry = (now + LIFETIME)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let tag = hmac::sign(&self.key, &message(user, nonce, expiry));
        format!("{nonce}.{expiry}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Check `token` for `user` against the cookie's nonce.
    pub fn verify(
        &self,
        user: &str,
        cookie_nonce: Option<&str>,
        token: Option<&str>,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        let (Some(cookie_nonce), Some(token)) = (cookie_nonce, token) else {
            return Err(Refusal::Missing);
        };
        let mut parts = token.splitn(3, '.');
        let (Some(nonce), Some(expiry), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed);
        };
        let expiry: u64 = expiry.parse().map_err(|_| Refusal::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| Refusal::Malformed)?;
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            nonce.as_bytes(),
            cookie_nonce.as_bytes(),
        )) {
            return Err(Refusal::CookieMismatch);
        }
        hmac::verify(&self.key, &message(user, nonce, expiry), &tag)
            .map_err(|_| Refusal::BadSignature)?;
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now >= expiry {
            return Err(Refusal::Expired);
        }
        Ok(())
    }
}

fn message(user: &str, nonce: &str, expiry: u64) -> Vec<u8> {
    // Length-prefixed fields: no choice of user and nonce can collide with another.
    let mut out = b"agentsecrets-ui-csrf-v1".to_vec();
    for field in [user.as_bytes(), nonce.as_bytes()] {
        out.extend_from_slice(&(field.len() as u64).to_be_bytes());
        out.extend_from_slice(field);
    }
    out.extend_from_slice(&expiry.to_be_bytes());
    out
}

/// The `Set-Cookie` value for `nonce`.
pub fn set_cookie(nonce: &str) -> String {
    format!(
        "{COOKIE}={nonce}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        LIFETIME.as_secs()
    )
}

/// The nonce cookie from a request's `Cookie` headers.
pub fn cookie_nonce(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|value| CsrfKey::is_nonce(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_only_for_its_user_its_cookie_and_before_expiry() {
        let key = CsrfKey::generate().unwrap();
        let now = SystemTime::now();
        let nonce = key.new_nonce().unwrap();
        let token = key.token("alice", &nonce, now);
        assert_eq!(key.verify("alice", Some(&nonce), Some(&token), now), Ok(()));
        assert_eq!(
            key.verify("bob", Some(&nonce), Some(&token), now),
            Err(Refusal::BadSignature)
        );
        let other = key.new_nonce().unwrap();
        assert_eq!(
            key.verify("alice", Some(&other), Some(&token), now),
            Err(Refusal::CookieMismatch)
        );
        assert_eq!(
            key.verify("alice", None, Some(&token), now),
            Err(Refusal::Missing)
        );
        assert_eq!(
            key.verify("alice", Some(&nonce), None, now),
            Err(Refusal::Missing)
        );
        assert_eq!(
            key.verify("alice", Some(&nonce), Some(&token), now + LIFETIME),
            Err(Refusal::Expired)
        );
        assert_eq!(
            key.verify("alice", Some(&nonce), Some("x.y"), now),
            Err(Refusal::Malformed)
        );
        let other_key = CsrfKey::generate().unwrap();
        assert_eq!(
            other_key.verify("alice", Some(&nonce), Some(&token), now),
            Err(Refusal::BadSignature)
        );
        // A forged later expiry does not verify.
        let (head, tag) = token.rsplit_once('.').unwrap();
        let (n, _) = head.split_once('.').unwrap();
        let forged = format!("{n}.99999999999.{tag}");
        assert_eq!(
            key.verify("alice", Some(&nonce), Some(&forged), now),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn the_cookie_is_read_back_and_foreign_values_are_ignored() {
        let key = CsrfKey::generate().unwrap();
        let nonce = key.new_nonce().unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            format!("a=b; {COOKIE}={nonce}; c=d").parse().unwrap(),
        );
        assert_eq!(cookie_nonce(&headers), Some(nonce));
        headers.insert(
            http::header::COOKIE,
            format!("{COOKIE}=<script>").parse().unwrap(),
        );
        assert_eq!(cookie_nonce(&headers), None);
        assert!(set_cookie("n").contains("Secure; HttpOnly; SameSite=Strict"));
        assert!(CsrfKey::from_bytes(b"short").is_err());
    }
}
