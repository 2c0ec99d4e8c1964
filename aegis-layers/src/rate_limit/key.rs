//! Client keys: an address truncated to its network prefix.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The key a client is limited under: its effective address truncated to a network
/// prefix (`/32` for IPv4 and `/64` for IPv6 by default), IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`) folded to IPv4 first.
///
/// `Display` shows the network (`2001:db8:1:2::/64`); it is meant for logs, never for
/// metric labels.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClientKey {
    net: IpAddr,
    prefix: u8,
}

impl ClientKey {
    /// The network address (host bits zero).
    pub const fn network(&self) -> IpAddr {
        self.net
    }

    /// The prefix length.
    pub const fn prefix_len(&self) -> u8 {
        self.prefix
    }
}

impl Hash for ClientKey {
    /// One write of the address bits: keys are hashed on every connection (`SipHash`
    /// per write adds up), and equal keys have equal bits. The prefix length follows from
    /// the family, so it need not be hashed.
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128(match self.net {
            IpAddr::V4(v4) => u128::from(v4.to_bits()) | (1 << 127),
            IpAddr::V6(v6) => v6.to_bits(),
        });
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({self})")
    }
}

/// How addresses map to [`ClientKey`]s: the prefix lengths kept of each family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyBy {
    v4_prefix: u8,
    v6_prefix: u8,
}

impl Default for KeyBy {
    fn default() -> Self {
        Self {
            v4_prefix: 32,
            v6_prefix: 64,
        }
    }
}

impl KeyBy {
    /// Keys IPv4 clients by `/v4_prefix` and IPv6 clients by `/v6_prefix`.
    ///
    /// # Panics
    ///
    /// If `v4_prefix > 32` or `v6_prefix > 128`.
    pub const fn new(v4_prefix: u8, v6_prefix: u8) -> Self {
        assert!(v4_prefix <= 32, "an IPv4 prefix is at most 32 bits");
        assert!(v6_prefix <= 128, "an IPv6 prefix is at most 128 bits");
        Self {
            v4_prefix,
            v6_prefix,
        }
    }

    /// The IPv4 prefix length.
    pub const fn v4_prefix(&self) -> u8 {
        self.v4_prefix
    }

    /// The IPv6 prefix length.
    pub const fn v6_prefix(&self) -> u8 {
        self.v6_prefix
    }

    /// The key of `ip`.
    #[inline]
    pub fn key(&self, ip: IpAddr) -> ClientKey {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.v4_prefix))
                    .unwrap_or(0);
                ClientKey {
                    net: IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & mask)),
                    prefix: self.v4_prefix,
                }
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.v6_prefix))
                    .unwrap_or(0);
                ClientKey {
                    net: IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask)),
                    prefix: self.v6_prefix,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(by: KeyBy, s: &str) -> ClientKey {
        by.key(s.parse().unwrap())
    }

    #[test]
    fn default_prefixes_group_v6_by_64_and_keep_v4_hosts() {
        let by = KeyBy::default();
        assert_eq!(
            key(by, "2001:db8:1:2:aaaa::1"),
            key(by, "2001:db8:1:2:ffff:1:2:3")
        );
        assert_ne!(key(by, "2001:db8:1:2::1"), key(by, "2001:db8:1:3::1"));
        assert_ne!(key(by, "192.0.2.1"), key(by, "192.0.2.2"));
        assert_eq!(
            key(by, "2001:db8:1:2:aaaa::1").to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn v4_mapped_v6_folds_to_v4() {
        let by = KeyBy::default();
        assert_eq!(key(by, "::ffff:192.0.2.7"), key(by, "192.0.2.7"));
        assert_eq!(key(by, "::ffff:192.0.2.7").to_string(), "192.0.2.7/32");
    }

    #[test]
    fn prefixes_are_configurable_including_zero_and_full() {
        let by = KeyBy::new(24, 128);
        assert_eq!(key(by, "192.0.2.1"), key(by, "192.0.2.200"));
        assert_ne!(key(by, "2001:db8::1"), key(by, "2001:db8::2"));
        let all = KeyBy::new(0, 0);
        assert_eq!(key(all, "192.0.2.1"), key(all, "198.51.100.1"));
        assert_eq!(key(all, "2001:db8::1"), key(all, "2001:db9::1"));
    }
}
