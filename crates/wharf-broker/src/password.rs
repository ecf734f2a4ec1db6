//! Passwords at rest: a user's password is held only as a salted hash, in RabbitMQ's formats, so
//! a user exported from RabbitMQ (`password_hash` and `hashing_algorithm` in its definitions) logs
//! in unchanged, and a user created here can be exported to RabbitMQ.
//!
//! RabbitMQ's format: `base64(salt ‖ digest(salt ‖ password))` with a 4-byte salt, the digest being
//! SHA-256 (`rabbit_password_hashing_sha256`, RabbitMQ's default and ours for new users),
//! SHA-512 (`rabbit_password_hashing_sha512`) or MD5 (`rabbit_password_hashing_md5`, accepted only
//! to import old users). Decision: new users get SHA-256 rather than a slow hash such as Argon2,
//! because definitions exported from Wharf must load into RabbitMQ and back; failed logins are
//! throttled per address (`LoginThrottle`), which is what slows online guessing.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use md5::Md5;
use sha2::{Digest, Sha256, Sha512};
use std::hash::{BuildHasher, Hasher};

/// Bytes of salt in front of the digest (RabbitMQ's choice).
const SALT_BYTES: usize = 4;

/// A password hashing algorithm, by RabbitMQ's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashingAlgorithm {
    /// `rabbit_password_hashing_sha256`.
    Sha256,
    /// `rabbit_password_hashing_sha512`.
    Sha512,
    /// `rabbit_password_hashing_md5`.
    Md5,
}

impl HashingAlgorithm {
    /// The algorithm RabbitMQ's name denotes.
    pub fn parse(name: &str) -> Result<Self, PasswordError> {
        match name {
            "rabbit_password_hashing_sha256" => Ok(HashingAlgorithm::Sha256),
            "rabbit_password_hashing_sha512" => Ok(HashingAlgorithm::Sha512),
            "rabbit_password_hashing_md5" => Ok(HashingAlgorithm::Md5),
            other => Err(PasswordError::UnknownAlgorithm(other.to_owned())),
        }
    }

    /// RabbitMQ's name for it.
    pub fn name(self) -> &'static str {
        match self {
            HashingAlgorithm::Sha256 => "rabbit_password_hashing_sha256",
            HashingAlgorithm::Sha512 => "rabbit_password_hashing_sha512",
            HashingAlgorithm::Md5 => "rabbit_password_hashing_md5",
        }
    }

    fn digest(self, salt: &[u8], password: &[u8]) -> Vec<u8> {
        match self {
            HashingAlgorithm::Sha256 => Sha256::new().chain_update(salt).chain_update(password).finalize().to_vec(),
            HashingAlgorithm::Sha512 => Sha512::new().chain_update(salt).chain_update(password).finalize().to_vec(),
            HashingAlgorithm::Md5 => Md5::new().chain_update(salt).chain_update(password).finalize().to_vec(),
        }
    }

    fn digest_bytes(self) -> usize {
        match self {
            HashingAlgorithm::Sha256 => 32,
            HashingAlgorithm::Sha512 => 64,
            HashingAlgorithm::Md5 => 16,
        }
    }
}

/// Why a stored password hash was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// Not one of RabbitMQ's algorithm names.
    #[error(
        "unknown hashing_algorithm '{0}' (expected rabbit_password_hashing_sha256, rabbit_password_hashing_sha512 or rabbit_password_hashing_md5)"
    )]
    UnknownAlgorithm(String),
    /// Not base64, or not a salt and a digest of the algorithm's length.
    #[error("password_hash is not a base64 salt and {algorithm} digest")]
    Malformed {
        /// The algorithm it was read for.
        algorithm: &'static str,
    },
}

/// A salted password hash.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    algorithm: HashingAlgorithm,
    salt: [u8; SALT_BYTES],
    digest: Vec<u8>,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("PasswordHash").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

impl PasswordHash {
    /// Hashes a new password with SHA-256 and a fresh salt.
    pub fn new(password: &str) -> Self {
        let salt = fresh_salt();
        let algorithm = HashingAlgorithm::Sha256;
        PasswordHash { algorithm, salt, digest: algorithm.digest(&salt, password.as_bytes()) }
    }

    /// No password at all: nothing verifies against it (RabbitMQ's user with an empty
    /// `password_hash`, which only a certificate login can authenticate).
    pub fn unusable() -> Self {
        PasswordHash { algorithm: HashingAlgorithm::Sha256, salt: [0; SALT_BYTES], digest: Vec::new() }
    }

    /// Reads a hash as RabbitMQ exports it (`password_hash`, `hashing_algorithm`).
    pub fn from_rabbitmq(password_hash: &str, hashing_algorithm: &str) -> Result<Self, PasswordError> {
        let algorithm = HashingAlgorithm::parse(hashing_algorithm)?;
        let malformed = PasswordError::Malformed { algorithm: algorithm.name() };
        let bytes = STANDARD.decode(password_hash.trim()).map_err(|_| malformed.clone())?;
        if bytes.len() != SALT_BYTES + algorithm.digest_bytes() {
            return Err(malformed);
        }
        let mut salt = [0u8; SALT_BYTES];
        salt.copy_from_slice(&bytes[..SALT_BYTES]);
        Ok(PasswordHash { algorithm, salt, digest: bytes[SALT_BYTES..].to_vec() })
    }

    /// The hash as RabbitMQ exports it: (`password_hash`, `hashing_algorithm`).
    pub fn to_rabbitmq(&self) -> (String, &'static str) {
        if self.digest.is_empty() {
            return (String::new(), self.algorithm.name());
        }
        let mut bytes = self.salt.to_vec();
        bytes.extend_from_slice(&self.digest);
        (STANDARD.encode(bytes), self.algorithm.name())
    }

    /// Whether `password` is the one hashed, compared in constant time.
    pub fn verify(&self, password: &[u8]) -> bool {
        if self.digest.is_empty() {
            return false;
        }
        constant_time_equal(&self.algorithm.digest(&self.salt, password), &self.digest)
    }
}

/// Four unpredictable bytes from the operating system's randomness (std seeds each `RandomState`
/// from it; a salt needs to be unique, not secret).
fn fresh_salt() -> [u8; SALT_BYTES] {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    let random = hasher.finish().to_le_bytes();
    [random[0], random[1], random[2], random[3]]
}

/// Compares secrets without an early exit, so timing does not reveal how much matched.
fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    let mut difference = left.len() ^ right.len();
    for (index, byte) in left.iter().enumerate() {
        difference |= usize::from(byte ^ right.get(index).copied().unwrap_or(0));
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RabbitMQ's documented example: the password `test12` with the salt `908DC60A`.
    const RABBITMQ_SHA256_TEST12: &str = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR";

    #[test]
    fn a_hash_exported_by_rabbitmq_verifies_its_password_and_exports_back_unchanged() {
        let hash = PasswordHash::from_rabbitmq(RABBITMQ_SHA256_TEST12, "rabbit_password_hashing_sha256").unwrap();
        assert!(hash.verify(b"test12"));
        assert!(!hash.verify(b"test13"));
        assert!(!hash.verify(b""));
        assert_eq!(hash.to_rabbitmq(), (RABBITMQ_SHA256_TEST12.to_owned(), "rabbit_password_hashing_sha256"));
    }

    #[test]
    fn sha512_and_md5_hashes_in_rabbitmqs_format_verify() {
        // The same salt and password, hashed with the other two algorithms.
        let sha512 = "kI3GChuNuIYf8lRbCCxZjgjKwsY19ns6+uFO0zcXRBGA/XGJPYD8OWMy7EB8TaOmAzjP2azv84GbINYwX2cDWb4DHnc=";
        let md5 = "kI3GChNpte2FApYFXScl+0dIluk=";
        for (hash, algorithm) in [(sha512, "rabbit_password_hashing_sha512"), (md5, "rabbit_password_hashing_md5")] {
            let hash = PasswordHash::from_rabbitmq(hash, algorithm).unwrap();
            assert!(hash.verify(b"test12"), "{algorithm}");
            assert!(!hash.verify(b"test1"), "{algorithm}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(constant_time_equal(b"secret", b"secret"));
        assert!(!constant_time_equal(b"secret", b"secre"));
        assert!(!constant_time_equal(b"secret", b"secreT"));
        assert!(!constant_time_equal(b"", b"x"));
    }

    #[test]
    fn new_hashes_are_salted_sha256_and_bad_input_is_refused_with_the_reason() {
        let first = PasswordHash::new("s3cret");
        let second = PasswordHash::new("s3cret");
        assert!(first.verify(b"s3cret") && second.verify(b"s3cret"));
        assert_ne!(first.to_rabbitmq().0, second.to_rabbitmq().0, "each hash has its own salt");
        assert_eq!(first.to_rabbitmq().1, "rabbit_password_hashing_sha256");
        assert!(!format!("{first:?}").contains(&first.to_rabbitmq().0), "the hash is never printed");
        assert!(matches!(
            PasswordHash::from_rabbitmq("xx", "rabbit_password_hashing_sha256"),
            Err(PasswordError::Malformed { .. })
        ));
        assert!(matches!(
            PasswordHash::from_rabbitmq(RABBITMQ_SHA256_TEST12, "rabbit_password_hashing_md5"),
            Err(PasswordError::Malformed { .. })
        ));
        assert_eq!(
            PasswordHash::from_rabbitmq(RABBITMQ_SHA256_TEST12, "bcrypt"),
            Err(PasswordError::UnknownAlgorithm("bcrypt".into()))
        );
    }
}
