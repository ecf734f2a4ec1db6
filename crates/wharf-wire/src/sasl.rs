//! SASL responses from `connection.start-ok`: PLAIN (`\0user\0password`) and AMQPLAIN (a field
//! table without its length prefix holding `LOGIN` and `PASSWORD`), the two mechanisms stock
//! RabbitMQ clients use.

use crate::error::WireError;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{AMQPValue, FieldTable};

/// Longest username or password accepted (RabbitMQ stores them as short strings).
pub const CREDENTIAL_BYTES_MAX: usize = 255;

/// The mechanisms this server offers, in its order of preference, as announced in
/// `connection.start`.
pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

/// SASL `EXTERNAL`: the identity comes from outside AMQP (a TLS client certificate), not from the
/// response. The broker handles it; there is nothing in the response to parse.
pub const MECHANISM_EXTERNAL: &str = "EXTERNAL";

/// [`MECHANISMS`] and `EXTERNAL`, announced to a client that presented a verified certificate.
pub const MECHANISMS_WITH_EXTERNAL: &str = "PLAIN AMQPLAIN EXTERNAL";

/// A username and password taken from a SASL response.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password (never printed).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Parses a response for `mechanism`. `Ok(None)` means the mechanism is not supported.
pub fn parse_response(mechanism: &str, response: &[u8]) -> Result<Option<Credentials>, WireError> {
    match mechanism {
        "PLAIN" => parse_plain(response).map(Some),
        "AMQPLAIN" => parse_amqplain(response).map(Some),
        _ => Ok(None),
    }
}

fn checked(username: &[u8], password: &[u8], mechanism: &'static str) -> Result<Credentials, WireError> {
    let bad = WireError::BadSaslResponse { mechanism };
    if username.len() > CREDENTIAL_BYTES_MAX || password.len() > CREDENTIAL_BYTES_MAX {
        return Err(bad);
    }
    Ok(Credentials {
        username: String::from_utf8(username.to_vec()).map_err(|_| bad.clone())?,
        password: String::from_utf8(password.to_vec()).map_err(|_| bad)?,
    })
}

/// PLAIN: `[authzid] \0 authcid \0 password` (RFC 4616); the authorization id is ignored.
fn parse_plain(response: &[u8]) -> Result<Credentials, WireError> {
    let mut parts = response.split(|byte| *byte == 0);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_authzid), Some(username), Some(password), None) => checked(username, password, "PLAIN"),
        _ => Err(WireError::BadSaslResponse { mechanism: "PLAIN" }),
    }
}

fn parse_amqplain(response: &[u8]) -> Result<Credentials, WireError> {
    let bad = WireError::BadSaslResponse { mechanism: "AMQPLAIN" };
    if crate::nesting::check_table_entries(response).is_err() {
        return Err(bad);
    }
    // The response is a table's contents; give it back the length prefix the parser expects.
    let length = u32::try_from(response.len()).map_err(|_| bad.clone())?;
    let mut framed = length.to_be_bytes().to_vec();
    framed.extend_from_slice(response);
    let table: FieldTable = match parse_field_table(&framed[..]) {
        Ok(([], table)) => table,
        _ => return Err(bad),
    };
    let text = |key: &str| match table.inner().get(key) {
        Some(AMQPValue::LongString(value)) => Some(value.as_bytes().to_vec()),
        Some(AMQPValue::ShortString(value)) => Some(value.as_str().as_bytes().to_vec()),
        _ => None,
    };
    match (text("LOGIN"), text("PASSWORD")) {
        (Some(username), Some(password)) => checked(&username, &password, "AMQPLAIN"),
        _ => Err(bad),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::auth::{Credentials as ClientCredentials, SASLMechanism};

    #[test]
    fn plain_and_amqplain_as_stock_clients_send_them() {
        let client = ClientCredentials::new("guest".into(), "s3cret".into());
        for mechanism in [SASLMechanism::Plain, SASLMechanism::AMQPlain] {
            let response = client.sasl_auth_string(mechanism);
            let parsed = parse_response(&mechanism.to_string(), response.as_bytes()).unwrap().unwrap();
            assert_eq!(parsed.username, "guest");
            assert_eq!(parsed.password, "s3cret");
        }
    }

    #[test]
    fn malformed_responses_are_refused() {
        assert!(parse_response("PLAIN", b"no-nul-bytes").is_err());
        assert!(parse_response("PLAIN", b"\0a\0b\0c").is_err());
        assert!(parse_response("AMQPLAIN", b"\x05LOGIN").is_err());
        assert!(parse_response("PLAIN", &[0, 0xFF, 0xFE, 0, b'p']).is_err(), "user name must be UTF-8");
        let long = [&[0u8][..], &[b'u'; 300], &[0u8], b"p"].concat();
        assert!(parse_response("PLAIN", &long).is_err());
        assert_eq!(parse_response("EXTERNAL", b"").unwrap(), None);
    }

    #[test]
    fn an_amqplain_response_nested_too_deep_is_refused_before_it_is_parsed() {
        // LOGIN = a table nested 5,000 levels deep (the parser would recurse that far).
        let mut response = vec![5];
        response.extend(b"LOGIN");
        response.push(b'F');
        response.extend(crate::nesting::nested_tables(5_000));
        assert_eq!(parse_response("AMQPLAIN", &response), Err(WireError::BadSaslResponse { mechanism: "AMQPLAIN" }));
    }

    #[test]
    fn the_password_is_never_printed() {
        let parsed = parse_response("PLAIN", b"\0guest\0hunter2").unwrap().unwrap();
        assert!(!format!("{parsed:?}").contains("hunter2"));
    }
}
