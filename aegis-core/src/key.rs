//! Client keys: an address truncated to its network prefix.
//!
//! Rate limiters and ban tables keep state per client. Keyed by the whole address, an
//! IPv6 client escapes them with the next address of its /64 (a subscriber usually gets
//! a whole /64, often a /56 or /48); keyed by a network, it cannot. [`KeyBy`] says how
//! many bits of each family make a client, and [`ClientKey`] is the network it gives.
//!
//! ```
//! use aegis_core::{ClientKey, KeyBy};
//!
//! let by = KeyBy::new(32, 56);
//! let a = by.key("2001:db8:0:12::1".parse().unwrap());
//! let b = by.key("2001:db8:0:34:aaaa::7".parse().unwrap());
//! assert_eq!(a, b);
//! assert_eq!(a.to_string(), "2001:db8::/56");
//!
//! // A network in CIDR notation: host bits are cleared.
//! let net: ClientKey = "198.51.100.7/24".parse().unwrap();
//! assert_eq!(net.to_string(), "198.51.100.0/24");
//! assert!(net.contains("198.51.100.200".parse().unwrap()));
//! assert!(net.contains("::ffff:198.51.100.1".parse().unwrap()));
//! assert!(!net.contains("198.51.101.1".parse().unwrap()));
//! ```

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A client's network: an address truncated to a prefix (`/32` for IPv4 and `/64` for
/// IPv6 by [`KeyBy::default`]), IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) folded to
/// IPv4 first. Built by [`KeyBy::key`], [`ClientKey::new`] or parsed from CIDR notation.
///
/// `Display` shows the network (`2001:db8:1:2::/64`); it is meant for logs, never for
/// metric labels.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClientKey {
    net: IpAddr,
    prefix: u8,
}

impl ClientKey {
    /// The network of `ip` that keeps its first `prefix` bits; `None` when `prefix` is
    /// longer than the address (over 32 for IPv4, over 128 for IPv6).
    ///
    /// An IPv4-mapped IPv6 address is taken as its IPv4 address when the prefix keeps
    /// all 96 mapping bits, so that one network has one key: `::ffff:192.0.2.0/120` is
    /// `192.0.2.0/24`.
    pub const fn new(ip: IpAddr, prefix: u8) -> Option<Self> {
        match ip {
            IpAddr::V4(v4) if prefix <= 32 => Some(Self::v4(v4, prefix)),
            IpAddr::V6(v6) if prefix <= 128 => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => Some(Self::v4(v4, prefix - 96)),
                _ => Some(Self::v6(v6, prefix)),
            },
            IpAddr::V4(_) | IpAddr::V6(_) => None,
        }
    }

    /// `ip` alone: `/32` or `/128` (an IPv4-mapped IPv6 address as its IPv4 address).
    pub const fn host(ip: IpAddr) -> Self {
        KeyBy::new(32, 128).key(ip)
    }

    /// `prefix` must be at most 32.
    const fn v4(ip: Ipv4Addr, prefix: u8) -> Self {
        let mask = match u32::MAX.checked_shl(32 - prefix as u32) {
            Some(mask) => mask,
            None => 0,
        };
        Self {
            net: IpAddr::V4(Ipv4Addr::from_bits(ip.to_bits() & mask)),
            prefix,
        }
    }

    /// `prefix` must be at most 128.
    const fn v6(ip: Ipv6Addr, prefix: u8) -> Self {
        let mask = match u128::MAX.checked_shl(128 - prefix as u32) {
            Some(mask) => mask,
            None => 0,
        };
        Self {
            net: IpAddr::V6(Ipv6Addr::from_bits(ip.to_bits() & mask)),
            prefix,
        }
    }

    /// The network address (host bits zero).
    pub const fn network(&self) -> IpAddr {
        self.net
    }

    /// The prefix length.
    pub const fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether the key is one whole address (`/32` or `/128`).
    pub const fn is_host(&self) -> bool {
        match self.net {
            IpAddr::V4(_) => self.prefix == 32,
            IpAddr::V6(_) => self.prefix == 128,
        }
    }

    /// Whether `ip` is in this network. An IPv4 address and its IPv4-mapped IPv6 form
    /// are the same address here, an IPv4 one: an IPv6 network holds no IPv4 address,
    /// not even `::/0` (else the key `::/64` of a client at `::1` would hold every
    /// IPv4 client, their mapped forms starting with 64 zero bits).
    pub const fn contains(&self, ip: IpAddr) -> bool {
        let within = match (ip.to_canonical(), self.net) {
            (IpAddr::V4(ip), IpAddr::V4(_)) => Self::v4(ip, self.prefix),
            (IpAddr::V6(ip), IpAddr::V6(_)) => Self::v6(ip, self.prefix),
            (IpAddr::V4(_) | IpAddr::V6(_), _) => return false,
        };
        match (within.net, self.net) {
            (IpAddr::V4(a), IpAddr::V4(b)) => a.to_bits() == b.to_bits(),
            (IpAddr::V6(a), IpAddr::V6(b)) => a.to_bits() == b.to_bits(),
            _ => false,
        }
    }
}

impl Hash for ClientKey {
    /// One write of the address bits: keys are hashed on every connection (`SipHash`
    /// per write adds up). Keys made by one [`KeyBy`] have one prefix length per family,
    /// so their bits tell them apart; keys of other lengths over the same bits only
    /// share a hash.
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

/// A network in CIDR notation (`198.51.100.0/24`, `2001:db8::/48`), parsed by
/// [`ipnet`]. Host bits are cleared, as [`ClientKey::new`] does: `198.51.100.7/24` is
/// `198.51.100.0/24`. A bare address is refused; it says no prefix.
impl FromStr for ClientKey {
    type Err = ParseClientKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let net: ipnet::IpNet = s.parse().map_err(|_| ParseClientKeyError(()))?;
        Self::new(net.addr(), net.prefix_len()).ok_or(ParseClientKeyError(()))
    }
}

/// A string that is not a network in CIDR notation (see [`ClientKey`]'s `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a network in CIDR notation (such as 192.0.2.0/24 or 2001:db8::/48)")]
pub struct ParseClientKeyError(());

/// How addresses map to [`ClientKey`]s: the prefix lengths kept of each family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyBy {
    v4_prefix: u8,
    v6_prefix: u8,
}

impl Default for KeyBy {
    /// IPv4 clients by `/32`, IPv6 clients by `/64`.
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

    /// The key of `ip` (an IPv4-mapped address keyed as IPv4).
    #[inline]
    pub const fn key(&self, ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::v4(v4, self.v4_prefix),
            IpAddr::V6(v6) => ClientKey::v6(v6, self.v6_prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(by: KeyBy, s: &str) -> ClientKey {
        by.key(s.parse().unwrap())
    }

    fn net(s: &str) -> ClientKey {
        s.parse().unwrap()
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
        assert_eq!(net("::ffff:192.0.2.7/120"), net("192.0.2.0/24"));
        // Shorter than the mapping, an IPv6 network, which holds no IPv4 address: the
        // key of `::1` (`::/64`) must not hold every IPv4 client.
        let mapped = net("::ffff:0:0/95");
        assert_eq!(mapped.to_string(), "::fffe:0:0/95");
        let v4 = "192.0.2.1".parse().unwrap();
        assert!(!mapped.contains(v4));
        assert!(!KeyBy::default().key("::1".parse().unwrap()).contains(v4));
        assert!(!net("::/0").contains("::ffff:192.0.2.1".parse().unwrap()));
        assert!(net("::/0").contains("::1".parse().unwrap()));
        assert!(!net("0.0.0.0/0").contains("2001:db8::1".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("::ffff:192.0.2.1".parse().unwrap()));
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

    #[test]
    fn a_network_contains_exactly_its_addresses() {
        let n = net("2001:db8:0:100::/56");
        assert!(n.contains("2001:db8:0:1ff:ffff::1".parse().unwrap()));
        assert!(!n.contains("2001:db8:0:200::".parse().unwrap()));
        assert!(net("::/0").contains("2001:db8::1".parse().unwrap()));
        assert!(net("192.0.2.7/32").contains("192.0.2.7".parse().unwrap()));
        assert!(!net("192.0.2.7/32").contains("192.0.2.8".parse().unwrap()));
        for by in [KeyBy::default(), KeyBy::new(20, 48), KeyBy::new(0, 128)] {
            for ip in ["192.0.2.77", "2001:db8:7:8:9::1", "::ffff:10.1.2.3"] {
                let ip = ip.parse().unwrap();
                assert!(by.key(ip).contains(ip), "{by:?} {ip}");
            }
        }
    }

    #[test]
    fn cidr_notation_parses_and_anything_else_is_refused() {
        assert_eq!(net("198.51.100.7/24").to_string(), "198.51.100.0/24");
        assert_eq!(net("2001:db8::1/128").to_string(), "2001:db8::1/128");
        assert!(net("2001:db8::1/128").is_host());
        assert!(!net("2001:db8::/127").is_host());
        assert_eq!(ClientKey::new("192.0.2.1".parse().unwrap(), 33), None);
        assert_eq!(ClientKey::new("::1".parse().unwrap(), 129), None);
        for bad in [
            "192.0.2.1",
            "192.0.2.0/33",
            "2001:db8::/129",
            "/24",
            "x/8",
            "",
        ] {
            let err = bad.parse::<ClientKey>().unwrap_err();
            assert!(err.to_string().contains("CIDR"), "{bad}: {err}");
        }
    }
}
