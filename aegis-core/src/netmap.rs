//! A map keyed by networks, looked up by address.

use std::collections::HashMap;
use std::collections::hash_map;
use std::fmt;
use std::net::IpAddr;

use crate::ClientKey;

/// A map from networks ([`ClientKey`]s) to values, that finds the network holding an
/// address: a ban list, an allow or deny list of any size.
///
/// It counts its networks by family and prefix length, so that finding the one that
/// holds an address costs one hash lookup per length in use in that family (one, for
/// networks of one length, such as a rate limiter's or a detector's keys), not one per
/// network. The narrowest network that holds the address is the one found, an IPv4
/// network before an IPv6 one. It holds what [`ClientKey::contains`] says: an IPv6
/// network holds no IPv4 address, IPv4-mapped ones included, and an IPv4 network holds
/// the 6to4, Teredo and NAT64 addresses that carry an IPv4 address in it (see [IPv4 clients in
/// IPv6 addresses](crate::ClientKey#ipv4-clients-in-ipv6-addresses)); for those, a
/// lookup costs one per length in use in either family.
///
/// ```
/// use aegis_core::{ClientKey, NetMap};
///
/// let mut deny = NetMap::new();
/// deny.insert("198.51.100.0/24".parse::<ClientKey>().unwrap(), "abuse");
/// deny.insert("198.51.100.7/32".parse::<ClientKey>().unwrap(), "scanner");
/// let (net, why) = deny.holding("198.51.100.7".parse().unwrap()).unwrap();
/// assert_eq!((net.to_string().as_str(), *why), ("198.51.100.7/32", "scanner"));
/// assert_eq!(deny.holding("198.51.100.8".parse().unwrap()).unwrap().1, &"abuse");
/// assert!(deny.holding("198.51.101.1".parse().unwrap()).is_none());
/// // The 6to4 site at 198.51.100.7, from any of its subnets.
/// assert_eq!(deny.holding("2002:c633:6407:9::1".parse().unwrap()).unwrap().1, &"scanner");
/// ```
#[derive(Clone)]
pub struct NetMap<V> {
    map: HashMap<ClientKey, V>,
    /// `(is IPv6, prefix length, networks)`, IPv4 first, then the longest prefix first.
    lengths: Vec<(bool, u8, usize)>,
}

impl<V> Default for NetMap<V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            lengths: Vec::new(),
        }
    }
}

impl<V: fmt::Debug> fmt::Debug for NetMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.map.iter()).finish()
    }
}

impl<V> NetMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one more (`add`) or one fewer network of `net`'s family and length.
    fn count(&mut self, net: &ClientKey, add: bool) {
        let rank = |v6: bool, len: u8| (v6, u8::MAX - len);
        let (v6, len) = (net.network().is_ipv6(), net.prefix_len());
        let i = self
            .lengths
            .partition_point(|&(v, l, _)| rank(v, l) < rank(v6, len));
        match self.lengths.get_mut(i) {
            Some(n) if (n.0, n.1) == (v6, len) => {
                if add {
                    n.2 += 1;
                } else {
                    n.2 -= 1;
                    if n.2 == 0 {
                        self.lengths.remove(i);
                    }
                }
            }
            _ if add => self.lengths.insert(i, (v6, len, 1)),
            _ => debug_assert!(false, "a network was not counted"),
        }
    }

    /// Puts `value` at `net`, returning the value it replaces.
    pub fn insert(&mut self, net: ClientKey, value: V) -> Option<V> {
        let old = self.map.insert(net, value);
        if old.is_none() {
            self.count(&net, true);
        }
        old
    }

    /// Takes the value at `net` (that network's own, not a wider one's).
    pub fn remove(&mut self, net: &ClientKey) -> Option<V> {
        let old = self.map.remove(net)?;
        self.count(net, false);
        Some(old)
    }

    /// The value at `net` itself.
    pub fn get(&self, net: &ClientKey) -> Option<&V> {
        self.map.get(net)
    }

    /// The value at `net` itself, mutably.
    pub fn get_mut(&mut self, net: &ClientKey) -> Option<&mut V> {
        self.map.get_mut(net)
    }

    /// The narrowest network in the map that holds all of `net` (`net` itself
    /// included), an IPv4 network first: one that holds `net`, or, for a network of 6to4
    /// or Teredo addresses, one that holds the IPv4 clients of all of them
    /// (`192.0.2.0/24` holds all of `2002:c000:201::/48`).
    pub fn covering(&self, net: &ClientKey) -> Option<ClientKey> {
        let v4 = if net.network().is_ipv4() {
            Some(*net)
        } else {
            net.v4_clients()
        };
        let v6 = net.network().is_ipv6().then_some(*net);
        self.lengths.iter().find_map(|&(is_v6, len, _)| {
            let within = if is_v6 { v6 } else { v4 }?;
            if len > within.prefix_len() {
                return None;
            }
            let candidate = ClientKey::new(within.network(), len)?;
            self.map.contains_key(&candidate).then_some(candidate)
        })
    }

    /// The narrowest network in the map that holds `ip`, and its value.
    #[inline]
    pub fn holding(&self, ip: IpAddr) -> Option<(&ClientKey, &V)> {
        // The common case of an empty deny or allow list: not even the host key.
        if self.lengths.is_empty() {
            return None;
        }
        let host = ClientKey::host(ip);
        let net = self.covering(&host)?;
        self.map.get_key_value(&net)
    }

    /// Whether a network in the map holds `ip`.
    #[inline]
    pub fn holds(&self, ip: IpAddr) -> bool {
        self.holding(ip).is_some()
    }

    /// How many networks the map holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the map holds no network.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The networks and their values, in no order.
    pub fn iter(&self) -> hash_map::Iter<'_, ClientKey, V> {
        self.map.iter()
    }

    /// How many prefix lengths are in use (each costs a lookup of an address).
    pub fn lengths(&self) -> usize {
        self.lengths.len()
    }
}

impl<'a, V> IntoIterator for &'a NetMap<V> {
    type Item = (&'a ClientKey, &'a V);
    type IntoIter = hash_map::Iter<'a, ClientKey, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl<V> FromIterator<(ClientKey, V)> for NetMap<V> {
    fn from_iter<I: IntoIterator<Item = (ClientKey, V)>>(iter: I) -> Self {
        let mut map = Self::new();
        map.extend(iter);
        map
    }
}

impl<V> Extend<(ClientKey, V)> for NetMap<V> {
    fn extend<I: IntoIterator<Item = (ClientKey, V)>>(&mut self, iter: I) {
        for (net, value) in iter {
            self.insert(net, value);
        }
    }
}

impl FromIterator<ClientKey> for NetMap<()> {
    fn from_iter<I: IntoIterator<Item = ClientKey>>(iter: I) -> Self {
        iter.into_iter().map(|net| (net, ())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> ClientKey {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lengths_follow_inserts_and_removes_and_the_narrowest_is_found() {
        let mut m = NetMap::new();
        assert_eq!(m.insert(net("10.0.0.0/8"), 8), None);
        assert_eq!(m.insert(net("10.1.0.0/16"), 16), None);
        assert_eq!(m.insert(net("10.1.0.0/16"), 17), Some(16));
        assert_eq!(m.insert(net("::/64"), 64), None);
        assert_eq!(m.lengths, [(false, 16, 1), (false, 8, 1), (true, 64, 1)]);
        assert_eq!(m.holding(ip("10.1.2.3")).map(|(_, v)| *v), Some(17));
        assert_eq!(m.holding(ip("10.2.2.3")).map(|(_, v)| *v), Some(8));
        assert_eq!(m.holding(ip("::ffff:10.2.2.3")).map(|(_, v)| *v), Some(8));
        // ::/64 holds ::1 but no IPv4 address, mapped or not.
        assert!(m.holds(ip("::1")));
        assert!(!m.holds(ip("11.0.0.1")));
        assert_eq!(m.covering(&net("10.1.128.0/17")), Some(net("10.1.0.0/16")));
        assert_eq!(m.covering(&net("10.0.0.0/7")), None);
        assert_eq!(m.remove(&net("10.1.0.0/16")), Some(17));
        assert_eq!(m.remove(&net("10.1.0.0/16")), None);
        assert_eq!(m.holding(ip("10.1.2.3")).map(|(_, v)| *v), Some(8));
        assert_eq!(m.lengths(), 2);
        let all: NetMap<()> = [net("0.0.0.0/0"), net("::/0")].into_iter().collect();
        assert!(all.holds(ip("192.0.2.1")) && all.holds(ip("2001:db8::1")));
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn a_6to4_or_teredo_address_is_found_by_its_ipv4_client_and_as_itself() {
        let mut m = NetMap::new();
        m.insert(net("192.0.2.1/32"), "site");
        m.insert(net("198.51.100.0/24"), "nat");
        m.insert(net("2002:c000:202::/48"), "v6 site");
        m.insert(net("2001:0:cb00:7101::/64"), "teredo server");
        let at = |s: &str| m.holding(ip(s)).map(|(_, v)| *v);
        // Every subnet of the site at 192.0.2.1; and the site over IPv4.
        assert_eq!(at("2002:c000:201:1::1"), Some("site"));
        assert_eq!(at("2002:c000:201:ffff::2"), Some("site"));
        assert_eq!(at("192.0.2.1"), Some("site"));
        // A Teredo client behind 198.51.100.1, through two servers: its NAT's network
        // first (an IPv4 network before an IPv6 one), then the server's /64.
        assert_eq!(at("2001:0:c000:22d:8000:f227:39cc:9bfe"), Some("nat"));
        assert_eq!(at("2001:0:cb00:7101:8000:f227:39cc:9bfe"), Some("nat"));
        assert_eq!(
            at("2001:0:cb00:7101:8000:f227:ffff:fffe"),
            Some("teredo server")
        );
        // A NAT64 client, by the IPv4 address in its last 32 bits.
        assert_eq!(at("64:ff9b::198.51.100.77"), Some("nat"));
        assert_eq!(at("64:ff9b::192.0.2.1"), Some("site"));
        // An IPv6 network of the map holds its 6to4 addresses as IPv6 addresses.
        assert_eq!(at("2002:c000:202:9::1"), Some("v6 site"));
        assert_eq!(at("192.0.2.2"), None);
        assert_eq!(at("2002:c000:203::1"), None);
        assert_eq!(at("2003:c000:201::1"), None);
        // A network is covered when all its addresses are.
        assert_eq!(
            m.covering(&net("2002:c000:201::/48")),
            Some(net("192.0.2.1/32"))
        );
        assert_eq!(m.covering(&net("2002:c000:200::/40")), None);
        assert_eq!(
            m.covering(&net("2001:0:c000:22d:8000:f227:39cc:9b00/120")),
            Some(net("198.51.100.0/24"))
        );
        assert_eq!(m.covering(&net("2001:0:c000:22d::/64")), None);
        assert_eq!(
            m.covering(&net("2002:c000:202:1::/64")),
            Some(net("2002:c000:202::/48"))
        );
    }

    /// Addresses of every kind, around the same few IPv4 addresses.
    const POOL: [&str; 12] = [
        "192.0.2.1",
        "192.0.2.2",
        "198.51.100.1",
        "::ffff:192.0.2.1",
        "2002:c000:201::1",
        "2002:c000:201:ffff::1",
        "2002:c000:202::1",
        "2001:0:c000:22d:8000:f227:3fff:fdfe",
        "2001:0:c000:22d:8000:f227:39cc:9bfe",
        "2001:0:cb00:7101::3fff:fdfe",
        "2001:db8::1",
        "::1",
    ];

    #[test]
    fn a_lookup_agrees_with_contains_for_every_length() {
        for at in POOL {
            let host = ClientKey::host(ip(at));
            let max = if host.network().is_ipv4() { 32 } else { 128 };
            for len in 0..=max {
                let n = ClientKey::new(host.network(), len).unwrap();
                let m: NetMap<()> = [n].into_iter().collect();
                for probe in POOL {
                    assert_eq!(m.holds(ip(probe)), n.contains(ip(probe)), "{n} {probe}");
                }
            }
        }
    }
}
