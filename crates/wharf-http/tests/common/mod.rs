//! The management API's test harness: a broker on 127.0.0.1:0 with users of every tag, the API
//! on another free port, lapin connections to the broker, and a blocking HTTP client (ureq) run
//! off the async workers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use std::path::Path;
use wharf_broker::{Broker, BrokerConfig, Permission, User};
use wharf_http::HttpServer;

pub struct Harness {
    pub broker: Option<Broker>,
    pub http: Option<HttpServer>,
    pub data_dir: std::path::PathBuf,
    _temp: tempfile::TempDir,
}

pub fn config(data_dir: &Path) -> BrokerConfig {
    let mut config = BrokerConfig::new(data_dir);
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    let tagged =
        |name: &str, tag: &str| User { tags: vec![tag.to_owned()], ..User::with_password(name, "secret", false) };
    config.users.push(tagged("watcher", "monitoring"));
    config.users.push(tagged("bob", "management"));
    config.users.push(User::with_password("plain", "secret", false));
    config.vhosts.push("other".into());
    config.permissions.push(Permission::full("bob", "/"));
    config.permissions.push(Permission::full("guest", "other"));
    config
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut BrokerConfig)) -> Harness {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let mut config = config(&data_dir);
        configure(&mut config);
        let broker = Broker::start(config).await.unwrap();
        let http = HttpServer::start("127.0.0.1:0".parse().unwrap(), broker.management()).await.unwrap();
        Harness { broker: Some(broker), http: Some(http), data_dir, _temp: temp }
    }

    pub fn api(&self, user: &str, password: &str) -> Api {
        let base = format!("http://{}", self.http.as_ref().unwrap().local_addr());
        Api { base, user: user.to_owned(), password: password.to_owned() }
    }

    pub fn guest(&self) -> Api {
        self.api("guest", "guest")
    }

    pub async fn amqp(&self, name: &str) -> Connection {
        let url = format!("amqp://guest:guest@{}/%2f", self.broker.as_ref().unwrap().local_addr());
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        Connection::connect(&url, properties).await.unwrap()
    }

    /// Stops the API and the broker cleanly and starts both again on the same data directory
    /// (the API on a new port).
    pub async fn restart(&mut self) {
        self.http.take().unwrap().shutdown().await;
        self.broker.take().unwrap().shutdown().await;
        let broker = Broker::start(config(&self.data_dir)).await.unwrap();
        self.http = Some(HttpServer::start("127.0.0.1:0".parse().unwrap(), broker.management()).await.unwrap());
        self.broker = Some(broker);
    }

    pub fn amqp_url(&self, user: &str, password: &str) -> String {
        format!("amqp://{user}:{password}@{}/%2f", self.broker.as_ref().unwrap().local_addr())
    }

    pub async fn stop(mut self) {
        self.http.take().unwrap().shutdown().await;
        self.broker.take().unwrap().shutdown().await;
    }
}

/// An answer: status, one header, and the body as JSON (`Null` when empty).
pub struct Answer {
    pub status: u16,
    pub www_authenticate: Option<String>,
    pub location: Option<String>,
    pub body: Value,
}

/// A blocking HTTP client for one user, run off the async workers.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub user: String,
    pub password: String,
}

impl Api {
    pub async fn call(&self, method: &'static str, path: &str, body: Option<Value>) -> Answer {
        let api = self.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || api.call_blocking(method, &path, body)).await.unwrap()
    }

    pub fn call_blocking(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let url = format!("{}{path}", self.base);
        let credentials = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:{}", self.user, self.password),
        );
        let authorization = format!("Basic {credentials}");
        let response = match (method, body) {
            ("GET", _) => agent.get(&url).header("authorization", &authorization).call(),
            ("DELETE", _) => agent.delete(&url).header("authorization", &authorization).call(),
            ("PUT", body) => {
                agent.put(&url).header("authorization", &authorization).send_json(body.unwrap_or(json!({})))
            }
            ("POST", body) => {
                agent.post(&url).header("authorization", &authorization).send_json(body.unwrap_or(json!({})))
            }
            (other, _) => panic!("no method {other}"),
        };
        let mut response = response.unwrap();
        let header = |name: &str| response.headers().get(name).map(|value| value.to_str().unwrap().to_owned());
        let www_authenticate = header("www-authenticate");
        let location = header("location");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
        Answer { status, www_authenticate, location, body }
    }

    /// A GET answered with text (`/metrics`): status, content type, body.
    pub async fn get_text(&self, path: &str) -> (u16, String, String) {
        let url = format!("{}{path}", self.base);
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let mut response = agent.get(&url).call().unwrap();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|value| value.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let status = response.status().as_u16();
            (status, content_type, response.body_mut().read_to_string().unwrap())
        })
        .await
        .unwrap()
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Answer {
        self.call("PUT", path, Some(body)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call("POST", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.call("DELETE", path, None).await
    }
}

pub fn names(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|item| item["name"].as_str().unwrap().to_owned()).collect()
}
