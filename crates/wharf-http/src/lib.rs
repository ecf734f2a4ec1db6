//! `wharf-http`: Wharf's management HTTP API, shaped like RabbitMQ's management plugin so its
//! tools (`rabbitmqadmin`, scripts, dashboards) work unchanged: the same paths, JSON field
//! names, pagination and sorting, basic authentication with RabbitMQ's user tags.
//!
//! It sits on top of `wharf-broker` and reaches the broker only through
//! [`wharf_broker::Management`]: every listing is a snapshot the broker hands over, every change
//! goes through the path a client's AMQP method takes. This crate owns HTTP and JSON only.

mod amqp_json;
mod api;
mod auth;
mod console;
mod error;
mod listing;
mod metrics;
mod sampler;
mod tls;

pub use error::ApiError;

use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::watch;
use wharf_broker::Management;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub management: Management,
    /// Where this API listens (shown in `overview`'s contexts).
    pub listen: SocketAddr,
    /// Samples of the broker's counters, for rates.
    pub samples: std::sync::Arc<sampler::Samples>,
}

/// The largest request body read (definitions files are the largest; RabbitMQ's default limit
/// for them is 20 MiB).
pub const REQUEST_BYTES_MAX: usize = 20 * 1024 * 1024;

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {address} for the management API: {source}")]
    Listen { address: SocketAddr, source: std::io::Error },
    #[error("the management API over TLS needs the broker's TLS settings (--amqps-listen, --tls-cert, --tls-key)")]
    NoTls,
}

/// The handlers' shared state, and the task sampling counters for rates.
fn state(management: Management, listen: SocketAddr) -> (AppState, tokio::task::JoinHandle<()>) {
    let samples = std::sync::Arc::new(sampler::Samples::default());
    let sampling = sampler::start(management.clone(), std::sync::Arc::clone(&samples));
    (AppState { management, listen, samples }, sampling)
}

/// Resolves once `stop` is set.
async fn stop_signal(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The running API server.
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    sampling: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Listens on `listen` (port 0 picks a free port) and serves the API for `management`.
    pub async fn start(listen: SocketAddr, management: Management) -> Result<HttpServer, HttpError> {
        let listener =
            TcpListener::bind(listen).await.map_err(|source| HttpError::Listen { address: listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| HttpError::Listen { address: listen, source })?;
        let (state, sampling) = state(management, local_addr);
        let service = api::router(state).into_make_service_with_connect_info::<tls::PeerAddr>();
        let (shutdown, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, service).with_graceful_shutdown(stop_signal(stopped)).await;
            if let Err(error) = served {
                tracing::error!(%error, "the management API stopped");
            }
        });
        tracing::info!(address = %local_addr, "management API listening");
        Ok(HttpServer { local_addr, shutdown, task, sampling })
    }

    /// Serves the API over TLS on `listen`, with the broker's TLS settings (refused without).
    pub async fn start_tls(listen: SocketAddr, management: Management) -> Result<HttpServer, HttpError> {
        if management.tls_acceptor().is_none() {
            return Err(HttpError::NoTls);
        }
        let listener =
            TcpListener::bind(listen).await.map_err(|source| HttpError::Listen { address: listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| HttpError::Listen { address: listen, source })?;
        let listener = tls::TlsListener::new(listener, management.clone())
            .map_err(|source| HttpError::Listen { address: listen, source })?;
        let (state, sampling) = state(management, local_addr);
        let service = api::router(state).into_make_service_with_connect_info::<tls::PeerAddr>();
        let (shutdown, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, service).with_graceful_shutdown(stop_signal(stopped)).await;
            if let Err(error) = served {
                tracing::error!(%error, "the management API over TLS stopped");
            }
        });
        tracing::info!(address = %local_addr, "management API listening over TLS");
        Ok(HttpServer { local_addr, shutdown, task, sampling })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for requests in progress to finish.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        let _ = self.task.await;
        // Awaited, not only aborted: the sampler holds the broker's management handle, and a
        // broker restarted on the same data directory finds it locked until that is dropped
        // (seen in CI: `Locked` on restart in policies_vhosts).
        self.sampling.abort();
        let _ = self.sampling.await;
    }
}
