//! An HTTPS client over one connection, as the API server would open one.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;

/// A client configuration trusting only the server certificate `ca_der`, with no client
/// certificate.
pub fn trusting(ca_der: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

pub struct HttpsClient {
    sender: SendRequest<Full<Bytes>>,
}

impl HttpsClient {
    /// Connect to `addr` (as `localhost`) over TLS with `config`, speaking HTTP/1.1.
    pub async fn connect(addr: SocketAddr, config: rustls::ClientConfig) -> Result<Self, String> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> (u16, Value) {
        self.try_post(path, body).await.unwrap()
    }

    /// POST `body`; an error when the connection fails. The answer is JSON, or the body as a
    /// JSON string when it is not JSON.
    pub async fn try_post(
        &mut self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<(u16, Value), String> {
        let request = hyper::Request::post(path)
            .header("content-type", "application/json")
            .header("host", "localhost")
            .body(Full::new(body.into()))
            .unwrap();
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }
}
