//! Deciding a login, the same way for AMQP, MQTT and the management interface: a user from a
//! name and password, or from a verified client certificate's common name (no password asked:
//! the configured CA vouched, as RabbitMQ's `EXTERNAL` and MQTT `ssl_cert_login` do); refused
//! while the source address is throttled after repeated failures, and for a loopback-only user
//! (`guest`) connecting from elsewhere. Each protocol words the refusal its own way.

use crate::config::User;
use crate::core::Core;
use std::net::IpAddr;

/// Who a client says it is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Credentials<'a> {
    Password {
        user: &'a str,
        password: &'a [u8],
    },
    /// The common name of a client certificate the TLS handshake verified.
    Certificate(&'a str),
}

impl Credentials<'_> {
    /// The user name tried.
    pub fn user(&self) -> &str {
        match self {
            Credentials::Password { user, .. } => user,
            Credentials::Certificate(name) => name,
        }
    }
}

/// Why a login was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Too many failed logins from this address lately.
    Throttled,
    /// No such user, or the wrong password.
    BadCredentials,
    /// The user may only connect from loopback.
    LoopbackOnly(String),
}

/// Decides a login from `peer`; the user, or why not. Failures and successes count for the
/// throttle.
pub(crate) fn log_in(core: &Core, credentials: Credentials<'_>, peer: IpAddr) -> Result<User, Refused> {
    let throttle = &core.login_throttle;
    let tried = credentials.user();
    if throttle.is_throttled(peer, tried, core.now_ms()) {
        return Err(Refused::Throttled);
    }
    match decide(core.access.user(tried), credentials, peer) {
        Ok(user) => {
            throttle.record_success(peer, tried);
            Ok(user)
        }
        Err(refused) => {
            throttle.record_failure(peer, tried, core.now_ms());
            Err(refused)
        }
    }
}

/// The decision itself, for `found` (the user the credentials name, if there is one).
pub(crate) fn decide(found: Option<User>, credentials: Credentials<'_>, peer: IpAddr) -> Result<User, Refused> {
    let admitted = found.filter(|user| match credentials {
        Credentials::Password { password, .. } => user.password.verify(password),
        Credentials::Certificate(_) => true,
    });
    match admitted {
        None => Err(Refused::BadCredentials),
        Some(user) if user.loopback_only && !peer.is_loopback() => Err(Refused::LoopbackOnly(user.name)),
        Some(user) => Ok(user),
    }
}
