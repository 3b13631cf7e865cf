//! What counts as "one address" for the per-address limits (clients, the
//! connection rate, the UDP rate): an IPv4 address alone, an IPv6 address
//! with its prefix of `limits.ipv6_prefix_len` bits. A host is given at
//! least a /64 and may pick a new address in it for every connection;
//! limits keyed by full IPv6 addresses would limit nothing. Pure.

use std::net::{IpAddr, Ipv6Addr};

/// The key `ip` is counted under: IPv4 (and IPv4-mapped IPv6) as itself,
/// IPv6 with every bit past `v6_prefix` cleared.
pub fn group(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn one_ipv6_prefix_is_one_address() {
        assert_eq!(group(ip("2001:db8:1:2:aaaa::1"), 64), ip("2001:db8:1:2::"));
        assert_eq!(
            group(ip("2001:db8:1:2:aaaa::1"), 64),
            group(ip("2001:db8:1:2:ffff:1:2:3"), 64)
        );
        assert_ne!(
            group(ip("2001:db8:1:2::1"), 64),
            group(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(group(ip("2001:db8:ff::1"), 32), ip("2001:db8::"));
        assert_eq!(group(ip("2001:db8::7"), 128), ip("2001:db8::7"));
        assert_eq!(group(ip("2001:db8::7"), 0), ip("::"));
    }

    #[test]
    fn ipv4_counts_alone_however_it_is_written() {
        assert_eq!(group(ip("192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(group(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
    }
}
