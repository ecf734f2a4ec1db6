//! Helpers for the broker's integration tests: a real broker on 127.0.0.1:0 over a temporary data
//! directory, and lapin clients connected to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use lapin::{Connection, ConnectionProperties};
use std::path::{Path, PathBuf};
use wharf_broker::{Broker, BrokerConfig};

/// A broker and the directory it keeps its data in.
pub struct TestBroker {
    pub broker: Option<Broker>,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

pub fn config(data_dir: &Path) -> BrokerConfig {
    let mut config = BrokerConfig::new(data_dir);
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    config
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let broker = Broker::start(config(&data_dir)).await.unwrap();
        TestBroker { broker: Some(broker), data_dir, _temp: Some(temp) }
    }

    pub async fn start_with(configure: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let mut config = config(&data_dir);
        configure(&mut config);
        let broker = Broker::start(config).await.unwrap();
        TestBroker { broker: Some(broker), data_dir, _temp: Some(temp) }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.broker.as_ref().unwrap().local_addr())
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default()).await.unwrap()
    }

    /// Stops the broker cleanly and starts a new one on the same data directory.
    pub async fn restart(&mut self) {
        self.broker.take().unwrap().shutdown().await;
        self.broker = Some(Broker::start(config(&self.data_dir)).await.unwrap());
    }

    pub async fn stop(mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }
}

/// The AMQP reply code carried by a lapin error, if it is a protocol error.
pub fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}
