//! How per-address limits (handshake slots, the login throttle) count a peer's source address:
//! an IPv4 address as itself, an IPv6 address by its /64, which one host typically holds whole
//! and could otherwise rotate through to escape any per-address limit.

use std::net::IpAddr;

/// The block `address` is counted in.
pub(crate) fn address_block(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_by_its_64_and_ipv4_as_itself() {
        let block = |text: &str| address_block(text.parse().unwrap());
        assert_eq!(block("2001:db8::1"), block("2001:db8::ffff:2"));
        assert_ne!(block("2001:db8::1"), block("2001:db8:0:1::1"));
        assert_eq!(block("10.0.0.1"), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_ne!(block("10.0.0.1"), block("10.0.0.2"));
    }
}
