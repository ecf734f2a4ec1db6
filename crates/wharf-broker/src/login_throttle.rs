//! Failed logins, throttled per source address and user name: after
//! `FAILED_LOGINS_PER_ADDRESS_MAX` failures for one user from one address within
//! `FAILED_LOGIN_WINDOW_MS`, further logins as that user from there are refused without looking
//! at the password until the window has passed, so a password cannot be guessed online at the
//! speed of the network. Keyed by user as well as address, so a client with a stale password does
//! not lock out every other account behind the same address, and a success as one user does not
//! clear another's failures; IPv6 addresses count by their /64, which one host can rotate
//! through. Time is the broker's clock, so tests cross the window by advancing it.

use crate::peer_address::address_block;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Failed logins one address may have within a window.
pub(crate) const FAILED_LOGINS_PER_ADDRESS_MAX: u32 = 10;

/// The window failed logins are counted in, in milliseconds.
pub(crate) const FAILED_LOGIN_WINDOW_MS: u64 = 60_000;

/// Most addresses tracked at once: beyond it, the one whose window began longest ago is
/// forgotten (the map cannot grow without bound however many addresses fail).
const ADDRESSES_TRACKED_MAX: usize = 10_000;

/// Failed logins by source address.
#[derive(Debug, Default)]
pub(crate) struct LoginThrottle {
    failures: Mutex<HashMap<Source, Failures>>,
}

/// Who failed: where from (an IPv6 address by its /64) and as whom.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Source {
    address: IpAddr,
    user: String,
}

impl Source {
    fn new(address: IpAddr, user: &str) -> Source {
        let address = address_block(address);
        // Names are AMQP short strings; a longer one cannot log in anyway.
        let user = user.chars().take(255).collect();
        Source { address, user }
    }
}

/// One address's failures in its current window.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    window_start_ms: u64,
}

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Source, Failures>> {
        self.failures.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether logins as `user` from `address` are refused at `now_ms`.
    pub fn is_throttled(&self, address: IpAddr, user: &str, now_ms: u64) -> bool {
        self.lock().get(&Source::new(address, user)).is_some_and(|failures| {
            failures.count >= FAILED_LOGINS_PER_ADDRESS_MAX
                && now_ms < failures.window_start_ms.saturating_add(FAILED_LOGIN_WINDOW_MS)
        })
    }

    /// A login as `user` from `address` failed at `now_ms`.
    pub fn record_failure(&self, address: IpAddr, user: &str, now_ms: u64) {
        let address = Source::new(address, user);
        let mut failures = self.lock();
        if !failures.contains_key(&address) && failures.len() >= ADDRESSES_TRACKED_MAX {
            failures.retain(|_, tracked| now_ms < tracked.window_start_ms.saturating_add(FAILED_LOGIN_WINDOW_MS));
            if failures.len() >= ADDRESSES_TRACKED_MAX
                && let Some(oldest) =
                    failures.iter().min_by_key(|(_, tracked)| tracked.window_start_ms).map(|(source, _)| source.clone())
            {
                failures.remove(&oldest);
            }
        }
        let entry = failures.entry(address).or_insert(Failures { count: 0, window_start_ms: now_ms });
        if now_ms >= entry.window_start_ms.saturating_add(FAILED_LOGIN_WINDOW_MS) {
            *entry = Failures { count: 0, window_start_ms: now_ms };
        }
        entry.count = entry.count.saturating_add(1);
    }

    /// A login as `user` from `address` succeeded: its failures are forgotten.
    pub fn record_success(&self, address: IpAddr, user: &str) {
        self.lock().remove(&Source::new(address, user));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_throttled_after_its_failures_until_the_window_passes() {
        let throttle = LoginThrottle::default();
        let attacker: IpAddr = "10.0.0.1".parse().unwrap();
        let neighbour: IpAddr = "10.0.0.2".parse().unwrap();
        for attempt in 0..FAILED_LOGINS_PER_ADDRESS_MAX {
            assert!(!throttle.is_throttled(attacker, "admin", 1_000), "attempt {attempt} is still heard");
            throttle.record_failure(attacker, "admin", 1_000);
        }
        assert!(throttle.is_throttled(attacker, "admin", 1_000));
        assert!(!throttle.is_throttled(neighbour, "admin", 1_000), "per address");
        assert!(!throttle.is_throttled(attacker, "orders", 1_000), "per user");
        assert!(throttle.is_throttled(attacker, "admin", 1_000 + FAILED_LOGIN_WINDOW_MS - 1));
        assert!(!throttle.is_throttled(attacker, "admin", 1_000 + FAILED_LOGIN_WINDOW_MS));
        throttle.record_failure(attacker, "admin", 1_000 + FAILED_LOGIN_WINDOW_MS);
        assert!(!throttle.is_throttled(attacker, "admin", 1_000 + FAILED_LOGIN_WINDOW_MS), "a new window starts over");
    }

    #[test]
    fn only_a_success_as_the_same_user_forgets_failures_and_the_map_stays_bounded() {
        let throttle = LoginThrottle::default();
        let address: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..FAILED_LOGINS_PER_ADDRESS_MAX - 1 {
            throttle.record_failure(address, "admin", 0);
        }
        throttle.record_success(address, "someone-else");
        throttle.record_failure(address, "admin", 0);
        assert!(throttle.is_throttled(address, "admin", 0), "another account's success clears nothing");
        throttle.record_success(address, "admin");
        assert!(!throttle.is_throttled(address, "admin", 0));
        // Addresses of one IPv6 /64 count together.
        let first: IpAddr = "2001:db8::1".parse().unwrap();
        let second: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..FAILED_LOGINS_PER_ADDRESS_MAX {
            throttle.record_failure(first, "admin", 0);
        }
        assert!(throttle.is_throttled(second, "admin", 0));
        for index in 0..(ADDRESSES_TRACKED_MAX as u32 + 10) {
            throttle.record_failure(IpAddr::from(index.to_be_bytes()), "admin", u64::from(index));
        }
        assert!(throttle.lock().len() <= ADDRESSES_TRACKED_MAX);
    }
}
