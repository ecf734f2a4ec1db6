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
mod error;
mod listing;
mod metrics;

pub use error::ApiError;

use axum::Router;
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
}

/// The largest request body read (definitions files are the largest; RabbitMQ's default limit
/// for them is 20 MiB).
pub const REQUEST_BYTES_MAX: usize = 20 * 1024 * 1024;

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {address} for the management API: {source}")]
    Listen { address: SocketAddr, source: std::io::Error },
}

/// The running API server.
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Listens on `listen` (port 0 picks a free port) and serves the API for `management`.
    pub async fn start(listen: SocketAddr, management: Management) -> Result<HttpServer, HttpError> {
        let listener =
            TcpListener::bind(listen).await.map_err(|source| HttpError::Listen { address: listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| HttpError::Listen { address: listen, source })?;
        let state = AppState { management, listen: local_addr };
        let app: Router = api::router(state);
        let (shutdown, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let service = app.into_make_service_with_connect_info::<SocketAddr>();
            let served = axum::serve(listener, service)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the management API stopped");
            }
        });
        tracing::info!(address = %local_addr, "management API listening");
        Ok(HttpServer { local_addr, shutdown, task })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for requests in progress to finish.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        let _ = self.task.await;
    }
}
