//! A small HTTP/1.1 client (hyper) for the chaos run and the tests: one request per connection,
//! bounded by a timeout.

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::net::SocketAddr;
use std::time::Duration;

/// Sends one request; returns the status code and the body.
pub async fn request(address: SocketAddr, method: &str, path: &str, body: Option<String>) -> Result<(u16, String)> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(address).await.context("connecting")?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.context("handshake")?;
        tokio::spawn(connection);
        let mut builder = hyper::Request::builder().method(method).uri(path).header("host", address.to_string());
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default()))).context("building the request")?;
        let response = sender.send_request(request).await.context("sending")?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.context("reading the body")?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.context("request timed out")?
}
