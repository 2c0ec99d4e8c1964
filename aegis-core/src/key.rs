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
//!
//! Some IPv6 addresses carry the IPv4 address of their client (IPv4-mapped, 6to4,
//! Teredo and NAT64 ones): they are keyed, and held by networks, as that IPv4 client;
//! see [IPv4 clients in IPv6 addresses](ClientKey#ipv4-clients-in-ipv6-addresses).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A client's network: an address truncated to a prefix (`/32` for IPv4 and `/64` for
/// IPv6 by [`KeyBy::default`]). Built by [`KeyBy::key`], which keys an IPv6 address
/// that carries an IPv4 client (IPv4-mapped, 6to4, Teredo, NAT64) as that IPv4 address (see
/// [below](#ipv4-clients-in-ipv6-addresses)), by [`ClientKey::new`] or parsed from CIDR
/// notation.
///
/// `Display` shows the network (`2001:db8:1:2::/64`); it is meant for logs, never for
/// metric labels.
///
/// # IPv4 clients in IPv6 addresses
///
/// Four kinds of IPv6 address carry the IPv4 address of the client that sent them,
/// its *IPv4 client* here:
///
/// - an IPv4-mapped address (`::ffff:192.0.2.1`, RFC 4291), a dual-stack socket's view
///   of an IPv4 client;
/// - a 6to4 address (`2002::/16`, RFC 3056): the IPv4 address of the client's site in
///   bits 16..48 (`2002:c000:0201::/48` is the site at `192.0.2.1`), then a 16-bit
///   subnet id and an interface id of the site's choosing;
/// - a Teredo address (`2001::/32`, RFC 4380): the Teredo server's IPv4 address in bits
///   32..64, flags and a port, then the client's IPv4 address (its NAT's public one),
///   every bit inverted, in the last 32 bits;
/// - an address in the NAT64 well-known prefix (`64:ff9b::/96`, RFC 6052): the IPv4
///   address in the last 32 bits, as a translator in front of an IPv6-only server
///   (SIIT-DC, RFC 7755) shows every IPv4 client.
///
/// [`KeyBy::key`] keys each of them by its IPv4 client, under the IPv4 prefix, so that a
/// client has one key whether it comes over IPv4 or through one of these. Keyed by the
/// IPv6 prefix, none of them would be told apart right: a 6to4 site picks any of its
/// 65,536 subnets, a /64 each, and would escape every per-client limit and ban by
/// rotating them; all the Teredo clients of one server share a /64
/// (`2001:0:<server>::/64`), and behind a translator every IPv4 client on the internet
/// shares `64:ff9b::/64`: one abuser among them would get all of them limited or
/// banned. This holds whatever the IPv6 prefix, even one short enough to hold all of
/// `2002::/16`: the IPv4 client is the client, as for a plain IPv4 address.
///
/// It is as much the client's as a plain IPv4 source address: the replies to a 6to4,
/// Teredo or NAT64 address go, through a relay or translator, to the IPv4 address it
/// carries, so a client that completes a TCP handshake from one receives at that IPv4
/// address. (Only the well-known NAT64 prefix is known; a network-specific one, which
/// only its operator knows, is keyed as any IPv6 network.)
///
/// [`ClientKey::contains`] (and [`NetMap`](crate::NetMap), a ban table or deny list of
/// them) agrees with the keys: **an IPv4 network holds every address whose IPv4 client
/// it holds**, and an IPv6 network holds the IPv6 addresses in it, but no IPv4-mapped
/// one (those are IPv4 addresses here). A 6to4, Teredo or NAT64 address is thus held
/// by the IPv6 networks it is in *and* by the IPv4 networks that hold its IPv4 client:
///
/// - the key of a 6to4, Teredo or NAT64 client holds its every address, so a ban of
///   that key refuses the client's next connection, from any subnet, over IPv4 too;
/// - a deny or exempt entry of an IPv4 network applies to the 6to4, Teredo and NAT64
///   clients inside it (else a denied network would only need a 6to4 relay to get
///   around its entry, and an exempt one would be banned under keys inside it);
/// - `2002::/16`, `2001::/32` and `64:ff9b::/96` still hold every 6to4, Teredo or
///   NAT64 address, a 6to4 site's `/48` its subnets, so a list can name those too; and
///   `0.0.0.0/0` holds them all, as it holds every IPv4 client.
///
/// ```
/// use aegis_core::{ClientKey, KeyBy};
///
/// let by = KeyBy::default();
/// // Two subnets of the 6to4 site at 192.0.2.1, and the site over IPv4: one client.
/// let a = by.key("2002:c000:201:1::1".parse().unwrap());
/// let b = by.key("2002:c000:201:ffff::2".parse().unwrap());
/// assert_eq!(a, b);
/// assert_eq!(a, by.key("192.0.2.1".parse().unwrap()));
/// assert_eq!(a.to_string(), "192.0.2.1/32");
/// // Two Teredo clients of the server at 192.0.2.45, behind NATs at 198.51.100.1 and
/// // 198.51.100.2 (inverted in the last 32 bits): two clients.
/// let c = by.key("2001:0:c000:22d:8000:f227:39cc:9bfe".parse().unwrap());
/// let d = by.key("2001:0:c000:22d:8000:f227:39cc:9bfd".parse().unwrap());
/// assert_eq!(c.to_string(), "198.51.100.1/32");
/// assert_eq!(d.to_string(), "198.51.100.2/32");
/// // Through a NAT64 translator, the IPv4 client in the last 32 bits.
/// let e = by.key("64:ff9b::198.51.100.3".parse().unwrap());
/// assert_eq!(e, by.key("198.51.100.3".parse().unwrap()));
///
/// let net: ClientKey = "192.0.2.0/24".parse().unwrap();
/// assert!(net.contains("2002:c000:201:1::1".parse().unwrap()));
/// let six_to_four: ClientKey = "2002::/16".parse().unwrap();
/// assert!(six_to_four.contains("2002:c000:201:1::1".parse().unwrap()));
/// ```
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
    /// `192.0.2.0/24`. A 6to4, Teredo or NAT64 network stays an IPv6 network: unlike
    /// the mapping, theirs is not one to one (`2002:c000:201::/48` holds 2^80 addresses of
    /// the site at `192.0.2.1`, and `2002::/16` is no IPv4 network; and a NAT64 network
    /// stays one so that `64:ff9b::/96` names a translator's clients, not `0.0.0.0/0`),
    /// and it holds the
    /// IPv6 addresses in it as any IPv6 network does. The IPv4 network of their IPv4
    /// clients holds them too (see [`contains`](Self::contains)).
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
    /// Exactly the address, unlike [`KeyBy::key`]: a 6to4, Teredo or NAT64 address is its own
    /// `/128`, which an IPv4 network still holds through its IPv4 client (see
    /// [`contains`](Self::contains)).
    ///
    /// ```
    /// use aegis_core::{ClientKey, KeyBy};
    ///
    /// let ip = "2002:c000:201::1".parse().unwrap();
    /// assert_eq!(ClientKey::host(ip).to_string(), "2002:c000:201::1/128");
    /// assert_eq!(KeyBy::new(32, 128).key(ip).to_string(), "192.0.2.1/32");
    /// ```
    pub const fn host(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::v4(v4, 32),
            IpAddr::V6(v6) => Self::v6(v6, 128),
        }
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

    /// Whether `ip` is in this network. An IPv4 network holds the addresses whose IPv4
    /// client it holds: IPv4 addresses, and the IPv4-mapped, 6to4, Teredo and NAT64 addresses
    /// that carry one (see [IPv4 clients in IPv6
    /// addresses](ClientKey#ipv4-clients-in-ipv6-addresses)), so that a key made by
    /// [`KeyBy::key`] holds the address it was made of. An IPv6 network holds the IPv6
    /// addresses in it (6to4, Teredo and NAT64 ones too) but no IPv4-mapped one: an IPv4
    /// address and its mapped form are the same address here, an IPv4 one, and not
    /// even `::/0` holds it (else the key `::/64` of a client at `::1` would hold every
    /// IPv4 client, their mapped forms starting with 64 zero bits).
    ///
    /// ```
    /// use aegis_core::ClientKey;
    ///
    /// let net = |s: &str| s.parse::<ClientKey>().unwrap();
    /// let six_to_four = "2002:c000:201:7::1".parse().unwrap(); // the site at 192.0.2.1
    /// assert!(net("192.0.2.0/24").contains(six_to_four));
    /// assert!(net("2002:c000:201::/48").contains(six_to_four));
    /// assert!(!net("198.51.100.0/24").contains(six_to_four));
    /// assert!(!net("::/0").contains("::ffff:192.0.2.1".parse().unwrap()));
    /// ```
    pub const fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(net), ip) => match v4_client(ip) {
                Some(v4) => same_net(Self::v4(v4, self.prefix).net, IpAddr::V4(net)),
                None => false,
            },
            (IpAddr::V6(net), IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
                same_net(Self::v6(v6, self.prefix).net, IpAddr::V6(net))
            }
            (IpAddr::V6(_), _) => false,
        }
    }

    /// For an IPv6 network of 6to4 addresses (in `2002::/16`), Teredo addresses (in
    /// `2001::/32`) or NAT64 addresses (in `64:ff9b::/96`), the IPv4 network that holds
    /// the IPv4 clients of all its addresses (`2002:c000:200::/40` gives
    /// `192.0.2.0/24`, any `/48` or longer a `/32`; a Teredo network shorter than `/97`
    /// gives `0.0.0.0/0`; `64:ff9b::c000:200/120` gives `192.0.2.0/24`); `None` for any
    /// other network. An IPv4 network holds all of this network exactly when it holds that
    /// one ([`NetMap::covering`](crate::NetMap::covering)).
    ///
    /// ```
    /// use aegis_core::ClientKey;
    ///
    /// let net = |s: &str| s.parse::<ClientKey>().unwrap();
    /// let clients = |s: &str| net(s).v4_clients().map(|n| n.to_string());
    /// assert_eq!(clients("2002:c000:200::/40").as_deref(), Some("192.0.2.0/24"));
    /// // Every client of one Teredo server, or behind a NAT64 translator, may be anyone.
    /// assert_eq!(clients("2001:0:c000:22d::/64").as_deref(), Some("0.0.0.0/0"));
    /// assert_eq!(clients("64:ff9b::/96").as_deref(), Some("0.0.0.0/0"));
    /// assert_eq!(clients("2001:db8::/32"), None);
    /// ```
    pub const fn v4_clients(&self) -> Option<Self> {
        let IpAddr::V6(v6) = self.net else {
            return None;
        };
        let bits = v6.to_bits();
        if self.prefix >= 16 && bits >> 112 == SIX_TO_FOUR {
            let kept = if self.prefix < 48 { self.prefix } else { 48 };
            Some(Self::v4(six_to_four_site(bits), kept - 16))
        } else if self.prefix >= 32 && bits >> 96 == TEREDO {
            let kept = if self.prefix > 96 { self.prefix } else { 96 };
            Some(Self::v4(teredo_client(bits), kept - 96))
        } else if self.prefix >= 96 && bits >> 32 == NAT64 {
            Some(Self::v4(nat64_client(bits), self.prefix - 96))
        } else {
            None
        }
    }

    /// Whether this is an IPv6 network that holds a whole range of addresses that carry
    /// IPv4 clients: all of 6to4 (`2002::/16`), Teredo (`2001::/32`) or the NAT64
    /// well-known prefix (`64:ff9b::/96`). Its clients may then be any IPv4 address, which
    /// [`v4_clients`](Self::v4_clients) (`None` for a network around such a range) does
    /// not say.
    ///
    /// ```
    /// use aegis_core::ClientKey;
    ///
    /// let holds = |s: &str| s.parse::<ClientKey>().unwrap().holds_v4_carrying_range();
    /// assert!(holds("64:ff9b::/64") && holds("64:ff9b::/96") && holds("2001::/32"));
    /// assert!(holds("::/0") && holds("2000::/3"));
    /// assert!(!holds("64:ff9b::/100") && !holds("2002:c000:200::/40"));
    /// assert!(!holds("2001:db8::/32") && !holds("192.0.2.0/24"));
    /// ```
    pub const fn holds_v4_carrying_range(&self) -> bool {
        // An IPv4 key "contains" these ranges' addresses by the IPv4 client they carry.
        matches!(self.net, IpAddr::V6(_))
            && (self.holds_range(SIX_TO_FOUR, 16)
                || self.holds_range(TEREDO, 32)
                || self.holds_range(NAT64, 96))
    }

    /// Whether this network holds the whole range whose first `len` bits are `first`:
    /// it is no narrower, and [`contains`](Self::contains) the range's first address.
    const fn holds_range(&self, first: u128, len: u8) -> bool {
        self.prefix <= len
            && self.contains(IpAddr::V6(Ipv6Addr::from_bits(first << (128 - len as u32))))
    }
}

/// The first 16 bits of a 6to4 address (`2002::/16`, RFC 3056).
const SIX_TO_FOUR: u128 = 0x2002;

/// The first 32 bits of a Teredo address (`2001::/32`, RFC 4380).
const TEREDO: u128 = 0x2001_0000;

/// The first 96 bits of an address in the NAT64 well-known prefix (`64:ff9b::/96`,
/// RFC 6052).
const NAT64: u128 = 0x0064_ff9b_0000_0000_0000_0000;

/// The IPv4 address of a 6to4 site: bits 16..48 of its addresses.
#[allow(clippy::cast_possible_truncation)] // keeping the low 32 bits is the point
const fn six_to_four_site(bits: u128) -> Ipv4Addr {
    Ipv4Addr::from_bits((bits >> 80) as u32)
}

/// The IPv4 address of a Teredo client: the last 32 bits of its address, inverted.
#[allow(clippy::cast_possible_truncation)] // keeping the low 32 bits is the point
const fn teredo_client(bits: u128) -> Ipv4Addr {
    Ipv4Addr::from_bits(!(bits as u32))
}

/// The IPv4 address of a NAT64 client: the last 32 bits of its address.
#[allow(clippy::cast_possible_truncation)] // keeping the low 32 bits is the point
const fn nat64_client(bits: u128) -> Ipv4Addr {
    Ipv4Addr::from_bits(bits as u32)
}

/// The IPv4 client of `ip`: itself, or the one its IPv6 address carries.
const fn v4_client(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => embedded_v4(v6),
    }
}

/// The IPv4 address an IPv4-mapped, 6to4, Teredo or NAT64 address carries (see [IPv4 clients
/// in IPv6 addresses](ClientKey#ipv4-clients-in-ipv6-addresses)).
const fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let bits = v6.to_bits();
    if bits >> 112 == SIX_TO_FOUR {
        Some(six_to_four_site(bits))
    } else if bits >> 96 == TEREDO {
        Some(teredo_client(bits))
    } else if bits >> 32 == NAT64 {
        Some(nat64_client(bits))
    } else {
        None
    }
}

/// Whether two network addresses are the same (`==` is not `const`).
const fn same_net(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a.to_bits() == b.to_bits(),
        (IpAddr::V6(a), IpAddr::V6(b)) => a.to_bits() == b.to_bits(),
        _ => false,
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

    /// The key of `ip`: its network by the IPv4 prefix if it has an IPv4 client (it is
    /// an IPv4 address, or an IPv4-mapped, 6to4, Teredo or NAT64 IPv6 address, keyed as the
    /// IPv4 address it carries: see [IPv4 clients in IPv6
    /// addresses](ClientKey#ipv4-clients-in-ipv6-addresses)), else by the IPv6 prefix.
    /// The key holds `ip` ([`ClientKey::contains`]).
    #[inline]
    pub const fn key(&self, ip: IpAddr) -> ClientKey {
        let v4 = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match embedded_v4(v6) {
                Some(v4) => v4,
                None => return ClientKey::v6(v6, self.v6_prefix),
            },
        };
        ClientKey::v4(v4, self.v4_prefix)
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
            for ip in [
                "192.0.2.77",
                "2001:db8:7:8:9::1",
                "::ffff:10.1.2.3",
                "2002:c000:24d:1::1",
                "2001:0:c000:22d:8000:f227:39cc:9bfe",
            ] {
                let ip = ip.parse().unwrap();
                assert!(by.key(ip).contains(ip), "{by:?} {ip}");
            }
        }
    }

    #[test]
    fn the_subnets_of_a_6to4_site_are_one_client_and_the_same_as_its_ipv4_address() {
        // The site at 192.0.2.1 (c000:0201) picks any of its 65,536 subnets.
        for by in [
            KeyBy::default(),
            KeyBy::new(32, 128),
            KeyBy::new(32, 48),
            KeyBy::new(32, 16),
            KeyBy::new(32, 0),
        ] {
            let v4 = key(by, "192.0.2.1");
            for ip in [
                "2002:c000:201::1",
                "2002:c000:201:1::1",
                "2002:c000:201:ffff:ffff:ffff:ffff:ffff",
            ] {
                assert_eq!(key(by, ip), v4, "{by:?} {ip}");
            }
            // Another site is another client, even with the same subnet and host.
            assert_ne!(key(by, "2002:c000:202:1::1"), v4, "{by:?}");
        }
        assert_eq!(
            key(KeyBy::default(), "2002:c000:201:1::1").to_string(),
            "192.0.2.1/32"
        );
        // Under the IPv4 prefix: sites in one /24 are one client by /24.
        let by24 = KeyBy::new(24, 64);
        assert_eq!(
            key(by24, "2002:c000:201:1::1"),
            key(by24, "2002:c000:2fe::")
        );
        assert_eq!(key(by24, "2002:c000:2fe::").to_string(), "192.0.2.0/24");
        // The ends of 2002::/16, and its neighbours, which are plain IPv6.
        let by = KeyBy::default();
        assert_eq!(key(by, "2002::").to_string(), "0.0.0.0/32");
        assert_eq!(
            key(by, "2002:ffff:ffff:ffff::").to_string(),
            "255.255.255.255/32"
        );
        assert_eq!(
            key(by, "2003:c000:201:1::1").to_string(),
            "2003:c000:201:1::/64"
        );
        assert_eq!(
            key(by, "2001:c000:201:1::1").to_string(),
            "2001:c000:201:1::/64"
        );
    }

    #[test]
    fn teredo_clients_are_keyed_by_their_own_ipv4_address_not_by_their_server() {
        // The server at 192.0.2.45 (c000:022d); clients behind 198.51.100.1 and
        // 198.51.100.2, their last 32 bits inverted (39cc:9bfe, 39cc:9bfd).
        let by = KeyBy::default();
        let a = key(by, "2001:0:c000:22d:8000:f227:39cc:9bfe");
        let b = key(by, "2001:0:c000:22d:8000:f227:39cc:9bfd");
        assert_ne!(a, b);
        assert_eq!(a, key(by, "198.51.100.1"));
        assert_eq!(b.to_string(), "198.51.100.2/32");
        // The same client through another server, port or flags: the same client.
        assert_eq!(a, key(by, "2001:0:cb00:7101:0:1:39cc:9bfe"));
        // Under the IPv4 prefix.
        let by24 = KeyBy::new(24, 64);
        assert_eq!(
            key(by24, "2001:0:c000:22d:8000:f227:39cc:9bfe"),
            key(by24, "2001:0:c000:22d:8000:f227:39cc:9b00")
        );
        // 2001::/32 only: 2001:1::/32 and the documentation prefix are plain IPv6.
        assert_eq!(
            key(by, "2001:1:c000:22d:8000:f227:39cc:9bfe").to_string(),
            "2001:1:c000:22d::/64"
        );
        assert_eq!(
            key(by, "2001:db8:c000:22d:8000:f227:39cc:9bfe").to_string(),
            "2001:db8:c000:22d::/64"
        );
        assert_eq!(
            key(by, "2001::ffff:ffff").to_string(),
            "0.0.0.0/32",
            "the end of 2001::/32"
        );
    }

    #[test]
    fn nat64_clients_are_keyed_by_the_ipv4_address_in_their_last_32_bits() {
        // Behind a translator (SIIT-DC), every IPv4 client shows in 64:ff9b::/96: by
        // the IPv6 /64 they would all be one client.
        let by = KeyBy::default();
        let a = key(by, "64:ff9b::198.51.100.1");
        assert_eq!(a, key(by, "198.51.100.1"));
        assert_eq!(a.to_string(), "198.51.100.1/32");
        assert_ne!(a, key(by, "64:ff9b::198.51.100.2"));
        assert_eq!(
            key(KeyBy::new(24, 64), "64:ff9b::198.51.100.1"),
            key(KeyBy::new(24, 64), "64:ff9b::198.51.100.200")
        );
        assert!(a.contains("64:ff9b::198.51.100.1".parse().unwrap()));
        // Only the well-known /96: its neighbours and the local-use 64:ff9b:1::/48
        // (RFC 8215, whose layout only its operator knows) are plain IPv6.
        for other in [
            "64:ff9b:0:0:0:1:c633:6401",
            "64:ff9b:1::c633:6401",
            "64:ff9a::c633:6401",
        ] {
            assert_eq!(
                key(by, other),
                ClientKey::new(other.parse().unwrap(), 64).unwrap(),
                "{other}"
            );
        }
        // Networks: an IPv4 one holds its NAT64 clients; the /96 holds them all.
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net("198.51.100.0/24").contains(ip("64:ff9b::198.51.100.9")));
        assert!(!net("198.51.101.0/24").contains(ip("64:ff9b::198.51.100.9")));
        assert!(net("64:ff9b::/96").contains(ip("64:ff9b::198.51.100.9")));
        assert_eq!(net("64:ff9b::/96").to_string(), "64:ff9b::/96");
        let clients = |s: &str| net(s).v4_clients().map(|n| n.to_string());
        assert_eq!(clients("64:ff9b::/96").as_deref(), Some("0.0.0.0/0"));
        assert_eq!(
            clients("64:ff9b::c633:6400/120").as_deref(),
            Some("198.51.100.0/24")
        );
        // Wider than the /96: not all NAT64.
        assert_eq!(clients("64:ff9b::/95"), None);
        assert_eq!(clients("64:ff9b::/64"), None);
    }

    #[test]
    fn ipv4_networks_hold_the_6to4_and_teredo_addresses_that_carry_their_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let site = ip("2002:c000:201:7::1");
        let teredo = ip("2001:0:c000:22d:8000:f227:39cc:9bfe"); // 198.51.100.1
        assert!(net("192.0.2.1/32").contains(site));
        assert!(net("192.0.2.0/24").contains(site));
        assert!(!net("192.0.2.2/32").contains(site));
        assert!(net("0.0.0.0/0").contains(site));
        assert!(net("198.51.100.0/24").contains(teredo));
        // Not the Teredo server's network: its other clients are not its doing.
        assert!(!net("192.0.2.45/32").contains(teredo));
        // IPv6 networks hold them as the IPv6 addresses they are.
        for n in [
            "2002::/16",
            "2002:c000:201::/48",
            "2002:c000:201:7::/64",
            "::/0",
        ] {
            assert!(net(n).contains(site), "{n}");
        }
        assert!(!net("2002:c000:202::/48").contains(site));
        assert!(net("2001::/32").contains(teredo));
        assert!(net("2001:0:c000:22d::/64").contains(teredo));
        // Plain IPv6 is held by no IPv4 network.
        assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(!net("0.0.0.0/0").contains(ip("2003::1")));
        // The host key of a 6to4 address is the address, held by its IPv4 client's key.
        assert_eq!(ClientKey::host(site).to_string(), "2002:c000:201:7::1/128");
        assert!(KeyBy::default().key(site).contains(site));
    }

    #[test]
    fn a_6to4_or_teredo_network_knows_the_ipv4_network_of_its_clients() {
        let clients = |s: &str| net(s).v4_clients().map(|n| n.to_string());
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(clients("2002::/16"), some("0.0.0.0/0"));
        assert_eq!(clients("2002:c000:200::/40"), some("192.0.2.0/24"));
        assert_eq!(clients("2002:c000:201::/48"), some("192.0.2.1/32"));
        assert_eq!(clients("2002:c000:201:5::/64"), some("192.0.2.1/32"));
        assert_eq!(clients("2002:c000:201:5::1/128"), some("192.0.2.1/32"));
        // Wider than 2002::/16: not all 6to4.
        assert_eq!(clients("2002::/15"), None);
        assert_eq!(clients("2000::/3"), None);
        assert_eq!(clients("::/0"), None);
        // Teredo: the client is in the last 32 bits.
        assert_eq!(clients("2001::/32"), some("0.0.0.0/0"));
        assert_eq!(clients("2001:0:c000:22d::/64"), some("0.0.0.0/0"));
        assert_eq!(
            clients("2001:0:c000:22d:8000:f227:39cc:9b00/120"),
            some("198.51.100.0/24")
        );
        assert_eq!(
            clients("2001:0:c000:22d:8000:f227:39cc:9bfe/128"),
            some("198.51.100.1/32")
        );
        assert_eq!(clients("2001::/31"), None);
        assert_eq!(clients("2001:db8::/32"), None);
        assert_eq!(clients("192.0.2.0/24"), None);
        // Exactly the IPv4 network of the clients of every address in the network.
        for n in [
            "2002:c000:200::/40",
            "2001:0:c000:22d:8000:f227:39cc:9b00/120",
        ] {
            let (n, v4) = (net(n), net(n).v4_clients().unwrap());
            for host in [0_u128, 1, 0xff, 0xffff_ffff, u128::MAX] {
                let mask = u128::MAX
                    .checked_shr(u32::from(n.prefix_len()))
                    .unwrap_or(0);
                let IpAddr::V6(base) = n.network() else {
                    unreachable!()
                };
                let ip = IpAddr::V6(Ipv6Addr::from_bits(base.to_bits() | (host & mask)));
                assert!(v4.contains(ip), "{n} {ip}");
            }
        }
    }

    #[test]
    fn cidr_notation_parses_and_anything_else_is_refused() {
        assert_eq!(net("198.51.100.7/24").to_string(), "198.51.100.0/24");
        assert_eq!(net("2001:db8::1/128").to_string(), "2001:db8::1/128");
        // 6to4 and Teredo networks stay IPv6 networks.
        assert_eq!(net("2002:c000:201::/48").to_string(), "2002:c000:201::/48");
        assert_eq!(net("2001::/32").to_string(), "2001::/32");
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

    /// [`KeyBy::key`] against the promise of its docs ("the key holds `ip`") and a
    /// reading of the address formats of its own (segments and octets, as the RFCs lay
    /// them out; networks truncated by `ipnet`), over arbitrary addresses and prefixes:
    /// an error in a prefix mask or in where a format's IPv4 client sits, which
    /// [`ClientKey::contains`] would share with the key, shows as a key other than the
    /// reference's.
    mod props {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

        use proptest::prelude::*;

        use super::super::KeyBy;

        /// The IPv4 client `ip` carries, read from its segments: itself, the last 32
        /// bits of `::ffff:0:0/96` (RFC 4291) and `64:ff9b::/96` (RFC 6052), bits
        /// 16..48 of `2002::/16` (RFC 3056), the last 32 bits inverted of `2001::/32`
        /// (RFC 4380).
        fn v4_client(ip: IpAddr) -> Option<Ipv4Addr> {
            let v6 = match ip {
                IpAddr::V4(v4) => return Some(v4),
                IpAddr::V6(v6) => v6,
            };
            let o = v6.octets();
            let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
            match v6.segments() {
                [0, 0, 0, 0, 0, 0xffff, ..] | [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(last),
                [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
                [0x2001, 0, ..] => Some(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15])),
                _ => None,
            }
        }

        /// The key `by` should give `ip`: the network and prefix length.
        fn reference(by: KeyBy, ip: IpAddr) -> (IpAddr, u8) {
            match (v4_client(ip), ip) {
                (Some(v4), _) => {
                    let net = ipnet::Ipv4Net::new(v4, by.v4_prefix()).unwrap().trunc();
                    (IpAddr::V4(net.network()), by.v4_prefix())
                }
                (None, IpAddr::V6(v6)) => {
                    let net = ipnet::Ipv6Net::new(v6, by.v6_prefix()).unwrap().trunc();
                    (IpAddr::V6(net.network()), by.v6_prefix())
                }
                (None, IpAddr::V4(_)) => unreachable!("an IPv4 address is its own client"),
            }
        }

        fn v6(bits: u128) -> IpAddr {
            IpAddr::V6(Ipv6Addr::from_bits(bits))
        }

        /// `client` as an IPv4 address, or carried in each IPv6 format, with the
        /// format's other bits (6to4 subnet and host, Teredo server, flags and port)
        /// arbitrary.
        fn carrying(client: u32) -> impl Strategy<Value = IpAddr> {
            let c = u128::from(client);
            prop_oneof![
                Just(IpAddr::V4(Ipv4Addr::from_bits(client))),
                Just(v6(0xffff << 32 | c)),
                any::<u128>().prop_map(move |r| v6(0x2002 << 112 | c << 80 | r >> 48)),
                any::<u64>().prop_map(move |r| v6(0x2001_0000 << 96
                    | u128::from(r) << 32
                    | u128::from(!client))),
                Just(v6(0x0064_ff9b << 96 | c)),
            ]
        }

        /// IPv6 addresses that carry no IPv4 client: arbitrary ones, and the
        /// neighbours of the formats that do (one bit off their prefixes).
        fn plain_v6() -> impl Strategy<Value = IpAddr> {
            prop_oneof![
                any::<u128>(),
                any::<u128>().prop_map(|r| 0x2003 << 112 | r >> 16),
                any::<u128>().prop_map(|r| 0x2000 << 112 | r >> 16),
                any::<u128>().prop_map(|r| 0x2001_0001 << 96 | r >> 32),
                any::<u128>().prop_map(|r| 0x2001_8000 << 96 | r >> 32),
                any::<u32>().prop_map(|r| 0x0064_ff9b_0000_0000_0000_0001 << 32 | u128::from(r)),
                any::<u32>().prop_map(|r| 0x0064_ff9a << 96 | u128::from(r)),
                any::<u32>().prop_map(|r| 0xfffe << 32 | u128::from(r)),
                any::<u32>().prop_map(|r| 0x1_ffff << 32 | u128::from(r)),
            ]
            .prop_map(v6)
            .prop_filter("carries no IPv4 client", |ip| v4_client(*ip).is_none())
        }

        fn any_addr() -> impl Strategy<Value = IpAddr> {
            prop_oneof![any::<u32>().prop_flat_map(carrying), plain_v6()]
        }

        /// The first `prefix` bits of a `width`-bit value set, one by one.
        fn mask(prefix: u8, width: u32) -> u128 {
            (0..u32::from(prefix)).map(|i| 1 << (width - 1 - i)).sum()
        }

        proptest! {
            /// The key holds the address it was made of (`KeyBy::key`'s docs), and is
            /// the network of the address, or of the IPv4 client it carries, by the
            /// family's prefix.
            #[test]
            fn a_key_holds_its_address_and_is_its_clients_network(
                ip in any_addr(),
                v4_prefix in 0..=32u8,
                v6_prefix in 0..=128u8,
            ) {
                let by = KeyBy::new(v4_prefix, v6_prefix);
                let key = by.key(ip);
                prop_assert!(key.contains(ip), "{key} does not hold {ip}");
                prop_assert_eq!((key.network(), key.prefix_len()), reference(by, ip));
            }

            /// Two addresses whose IPv4 clients share the IPv4 prefix get one key, in
            /// whatever format each comes; clients one bit apart within it, two keys.
            #[test]
            fn one_ipv4_network_one_key(
                (a, b, c) in (any::<u32>(), any::<u32>(), 0..=32u8, any::<u8>())
                    .prop_flat_map(|(client, other, prefix, bit)| {
                        let m = u32::try_from(mask(prefix, 32)).unwrap();
                        let same = client & m | other & !m;
                        // A bit within the prefix (the client itself at /0).
                        let apart = if prefix == 0 {
                            client
                        } else {
                            client ^ 1 << (31 - u32::from(bit % prefix))
                        };
                        (Just(prefix), carrying(client), carrying(same), carrying(apart))
                    })
                    .prop_map(|(prefix, a, b, c)| ((prefix, a), b, c)),
                v6_prefix in 0..=128u8,
            ) {
                let (prefix, a) = a;
                let by = KeyBy::new(prefix, v6_prefix);
                prop_assert_eq!(by.key(a), by.key(b), "{} and {}", a, b);
                if prefix > 0 {
                    prop_assert_ne!(by.key(a), by.key(c), "{} and {}", a, c);
                }
            }

            /// The same for IPv6 addresses that carry no IPv4 client, by the IPv6
            /// prefix.
            #[test]
            fn one_ipv6_network_one_key(
                a in plain_v6(),
                host in any::<u128>(),
                prefix in 0..=128u8,
                bit in any::<u8>(),
            ) {
                let IpAddr::V6(v6a) = a else { unreachable!() };
                let m = mask(prefix, 128);
                let b = v6(v6a.to_bits() & m | host & !m);
                let by = KeyBy::new(32, prefix);
                prop_assume!(v4_client(b).is_none());
                prop_assert_eq!(by.key(a), by.key(b), "{} and {}", a, b);
                if prefix > 0 {
                    let c = v6(v6a.to_bits() ^ 1 << (127 - u32::from(bit % prefix)));
                    if v4_client(c).is_none() {
                        prop_assert_ne!(by.key(a), by.key(c), "{} and {}", a, c);
                    }
                }
            }
        }
    }
}
