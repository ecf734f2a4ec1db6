//! Who is calling: HTTP basic authentication against the broker's users ([`Caller`]), and
//! RabbitMQ's tag rules for what each may see and do:
//!
//! - `management`: the API, limited to the vhosts the user has permissions on;
//! - `policymaker`: that, and policies in those vhosts;
//! - `monitoring`: that, and every vhost, connection and channel, and the node;
//! - `administrator`: everything, users, permissions and definitions included.
//!
//! A user with none of these tags cannot use the API, and `guest` (loopback only) cannot log in
//! from elsewhere, as over AMQP. Failed logins count against the same per-address throttle as
//! AMQP's.

use crate::AppState;
use crate::error::ApiError;
use crate::tls::PeerAddr;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;

/// The longest `Authorization` header read (credentials are short; a bound before decoding).
const AUTHORIZATION_BYTES_MAX: usize = 4096;

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub tags: Vec<String>,
}

impl Caller {
    fn has(&self, tag: &str) -> bool {
        self.tags.iter().any(|own| own == tag)
    }

    pub fn is_administrator(&self) -> bool {
        self.has("administrator")
    }

    /// Sees everything (administrator or monitoring).
    pub fn is_monitor(&self) -> bool {
        self.is_administrator() || self.has("monitoring")
    }

    fn is_management(&self) -> bool {
        self.is_monitor() || self.has("policymaker") || self.has("management")
    }

    /// May change policies in a vhost it has access to (RabbitMQ's `policymaker`, or an
    /// administrator).
    pub fn is_policymaker(&self) -> bool {
        self.is_administrator() || self.has("policymaker")
    }

    pub fn require_administrator(&self) -> Result<(), ApiError> {
        if self.is_administrator() { Ok(()) } else { Err(ApiError::not_authorised("Not administrator user")) }
    }

    pub fn require_monitor(&self) -> Result<(), ApiError> {
        if self.is_monitor() { Ok(()) } else { Err(ApiError::not_authorised("Not monitor user")) }
    }

    /// Whether the user sees the vhost's objects: a monitor sees every vhost, anyone else those
    /// they have permissions on.
    pub fn sees_vhost(&self, state: &AppState, vhost: &str) -> bool {
        self.is_monitor() || state.management.can_access_vhost(&self.name, vhost)
    }

    /// 404 for a vhost that does not exist, 401 for one the user may not see.
    pub fn require_vhost(&self, state: &AppState, vhost: &str) -> Result<(), ApiError> {
        if !state.management.vhost_exists(vhost) {
            return Err(ApiError::not_found());
        }
        if self.is_administrator() || state.management.can_access_vhost(&self.name, vhost) {
            Ok(())
        } else {
            Err(ApiError::not_authorised("User not authorised to access virtual host"))
        }
    }
}

/// The user and password of a `Basic` authorization header.
fn credentials(parts: &Parts) -> Option<(String, String)> {
    let header = parts.headers.get(AUTHORIZATION)?.as_bytes();
    if header.len() > AUTHORIZATION_BYTES_MAX {
        return None;
    }
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let scripted = parts.headers.get("x-requested-with").is_some();
        let failed = || ApiError { challenge: !scripted, ..ApiError::login_failed() };
        let (user, password) = credentials(parts).ok_or_else(failed)?;
        // Without the peer (a server not started by `serve`), only loopback rules would be
        // wrong: count the caller as remote, the stricter case.
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerAddr>>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |ConnectInfo(PeerAddr(address))| address.ip());
        let found = state.management.authenticate(&user, &password, peer).ok_or_else(failed)?;
        let caller = Caller { name: found.name, tags: found.tags };
        if !caller.is_management() {
            return Err(ApiError::not_authorised("Not management user"));
        }
        Ok(caller)
    }
}
