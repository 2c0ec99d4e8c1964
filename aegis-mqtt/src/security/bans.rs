//! The ban table and the anomaly detector.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aegis_core::{ClientKey, KeyBy, NetMap};
use serde::ser::{Serialize, SerializeStruct, Serializer};
use tokio::time::Instant;

use super::events::{MAX_NAME, bounded, rfc3339};
use crate::bounded::Bounded;

/// What a ban applies to.
///
/// An address key is a network ([`ClientKey`]): a ban of `198.51.100.0/24` refuses and
/// closes every address in it, a ban of `192.0.2.7/32` that one address. The detector
/// counts and bans each client's network as the [`Security`](super::Security) keys it
/// ([`SecurityBuilder::key_by`](super::SecurityBuilder::key_by): IPv4 by /32 and IPv6
/// by /64 by default, as the rate limiter does): a subscriber gets at least a whole /64
/// and can send from any address in it, so counting and banning one IPv6 address at a
/// time would be evaded by the next one. An IPv6 address that carries its client's
/// IPv4 address (IPv4-mapped, 6to4, Teredo, NAT64) is counted and banned as that IPv4 address
/// (see [IPv4 clients in IPv6
/// addresses](aegis_core::ClientKey#ipv4-clients-in-ipv6-addresses)). Client ids and
/// usernames are keyed byte for byte (no case folding: `Admin` and `admin` are two
/// keys, even behind an authenticator that takes them for one account), and those
/// longer than 256 bytes on their first 256 bytes.
///
/// `Display` is `addr:192.0.2.1/32`, `addr:2001:db8:1:2::/64`, `username:"bob"` or
/// `client_id:"c1"` (Debug-quoted: the names are the client's own text). Serialized as
/// an object with two strings: `{"key":"addr","value":"192.0.2.1/32"}` (`key` is
/// `addr`, `username` or `client_id`).
///
/// An IPv6 network holds no IPv4 address, IPv4-mapped ones included (which are IPv4
/// addresses here): a ban of `::/64`, the key of a client at `::1`, refuses no IPv4
/// client. An IPv4 network holds the 6to4, Teredo and NAT64 addresses that carry an
/// address in it ([`ClientKey::contains`]): a ban of `192.0.2.1/32` refuses the 6to4 site at
/// `192.0.2.1` from any of its subnets (`2002:c000:201::/48`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BanKey {
    /// A client network (see [`BanKey::addr`] for a client's network by the default
    /// prefixes, and [`Security::addr_key`](super::Security::addr_key) by the
    /// `Security`'s own).
    Addr(ClientKey),
    /// A CONNECT's username.
    Username(Arc<str>),
    /// A CONNECT's client id.
    ClientId(Arc<str>),
}

impl BanKey {
    /// The key's kind, as in its JSON form and the `key` label of
    /// `aegis_security_bans_total`: `addr`, `username` or `client_id`.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Addr(_) => "addr",
            Self::Username(_) => "username",
            Self::ClientId(_) => "client_id",
        }
    }

    /// The network of `ip` by the default prefixes ([`KeyBy::default`]): an IPv4
    /// address itself (an IPv4-mapped, 6to4, Teredo or NAT64 one the IPv4 address
    /// it carries), any other IPv6 address its /64.
    ///
    /// ```
    /// use aegis_mqtt::security::BanKey;
    ///
    /// let key = BanKey::addr("2001:db8:1:2:aaaa::7".parse().unwrap());
    /// assert_eq!(key, BanKey::Addr("2001:db8:1:2::/64".parse().unwrap()));
    /// assert_eq!(key.to_string(), "addr:2001:db8:1:2::/64");
    /// assert_eq!(
    ///     BanKey::addr("::ffff:192.0.2.1".parse().unwrap()).to_string(),
    ///     "addr:192.0.2.1/32"
    /// );
    /// // The 6to4 site at 192.0.2.1, from any of its subnets.
    /// assert_eq!(
    ///     BanKey::addr("2002:c000:201:7::1".parse().unwrap()).to_string(),
    ///     "addr:192.0.2.1/32"
    /// );
    /// ```
    pub fn addr(ip: IpAddr) -> Self {
        Self::Addr(KeyBy::default().key(ip))
    }

    /// The key of `ip` alone (`/32` or `/128`): what a connection's address is checked
    /// as, a ban of any network that holds it refusing it.
    pub(super) const fn host(ip: IpAddr) -> Self {
        Self::Addr(ClientKey::host(ip))
    }

    /// A username key (cut to 256 bytes).
    pub fn username(name: &str) -> Self {
        Self::Username(Arc::from(bounded(name, MAX_NAME)))
    }

    /// A client id key (cut to 256 bytes).
    pub fn client_id(id: &str) -> Self {
        Self::ClientId(Arc::from(bounded(id, MAX_NAME)))
    }

    /// The key's value in its JSON form: the network with its prefix (`192.0.2.7/32`
    /// too: a bare address could be read as the client's network by another prefix) or
    /// the name.
    fn value(&self) -> Cow<'_, str> {
        match self {
            Self::Addr(net) => Cow::Owned(net.to_string()),
            Self::Username(n) | Self::ClientId(n) => Cow::Borrowed(n),
        }
    }

    /// The key as stored: names cut to 256 bytes (a network is kept as built).
    pub(super) fn normalized(self) -> Self {
        match self {
            Self::Username(n) if n.len() > MAX_NAME => Self::username(&n),
            Self::ClientId(n) if n.len() > MAX_NAME => Self::client_id(&n),
            other => other,
        }
    }
}

impl fmt::Display for BanKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(_) => write!(f, "addr:{}", self.value()),
            Self::Username(n) => write!(f, "username:{n:?}"),
            Self::ClientId(n) => write!(f, "client_id:{n:?}"),
        }
    }
}

impl Serialize for BanKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("BanKey", 2)?;
        st.serialize_field("key", self.kind())?;
        st.serialize_field("value", &self.value())?;
        st.end()
    }
}

/// A ban in force, as [`Security::bans`](super::Security::bans) lists it.
///
/// Serialized as `{"key":"addr","value":"192.0.2.1/32","until":"2026-01-01T00:05:00.000Z",
/// "remaining_secs":299,"reason":"connects"}` (`value` ends in the prefix:
/// `192.0.2.1/32`, `2001:db8:1:2::/64`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ban {
    /// What is banned.
    pub key: BanKey,
    /// When it ends (wall clock, computed when the ban was put in place).
    pub until: SystemTime,
    /// How long it still lasts.
    pub remaining: Duration,
    /// Why: `connects`, `auth_failures`, `rejections` (the detector) or `manual` (the
    /// handle).
    pub reason: &'static str,
}

impl Serialize for Ban {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Ban", 5)?;
        st.serialize_field("key", self.key.kind())?;
        st.serialize_field("value", &self.key.value())?;
        st.serialize_field("until", &rfc3339(self.until))?;
        st.serialize_field("remaining_secs", &self.remaining.as_secs())?;
        st.serialize_field("reason", self.reason)?;
        st.end()
    }
}

/// A ban in its JSON form, read back.
#[derive(serde::Deserialize)]
struct BanRecord<'a> {
    /// What was left when the record was written: the most that can be left now, time
    /// only going forward (absent from records written by hand).
    #[serde(default)]
    remaining_secs: Option<u64>,
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(borrow)]
    value: Cow<'a, str>,
    #[serde(borrow)]
    until: Cow<'a, str>,
    #[serde(borrow)]
    reason: Cow<'a, str>,
}

/// Reads a ban back from the JSON its `Serialize` writes (as `/bans` lists it), to be
/// put in place again by [`Security::restore`](super::Security::restore).
/// `remaining` is counted from now to `until` (zero if it has passed), and is at most the
/// record's `remaining_secs` when it has one: a host whose wall clock is behind when it
/// reads the file (no hardware clock, NTP not yet synced) must not stretch a 5-minute
/// ban into days. An address key
/// must be a network in CIDR notation (as it is written); a name longer than 256 bytes
/// is cut, as the handle cuts it; `reason` must be one of the four.
impl<'de> serde::Deserialize<'de> for Ban {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let r = BanRecord::deserialize(d)?;
        let key = match &*r.key {
            "addr" => BanKey::Addr(r.value.parse().map_err(D::Error::custom)?),
            "username" => BanKey::username(&r.value),
            "client_id" => BanKey::client_id(&r.value),
            other => {
                return Err(D::Error::custom(format_args!(
                    "key {other:?} is not addr, username or client_id"
                )));
            }
        };
        let until = humantime::parse_rfc3339(&r.until).map_err(D::Error::custom)?;
        let reason = [
            Cause::Connects,
            Cause::AuthFailures,
            Cause::Rejections,
            Cause::Manual,
        ]
        .into_iter()
        .map(Cause::as_str)
        .find(|c| *c == r.reason)
        .ok_or_else(|| D::Error::custom(format_args!("reason {:?} is unknown", r.reason)))?;
        Ok(Self {
            key,
            until,
            remaining: until
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .min(r.remaining_secs.map_or(Duration::MAX, Duration::from_secs)),
            reason,
        })
    }
}

/// Which keys the detector bans on (client addresses only by default, [`BanKeys::ADDR`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // three independent switches
pub struct BanKeys {
    /// Client addresses.
    pub addr: bool,
    /// CONNECT usernames.
    pub username: bool,
    /// CONNECT client ids.
    pub client_id: bool,
}

impl BanKeys {
    /// All three keys.
    pub const ALL: Self = Self {
        addr: true,
        username: true,
        client_id: true,
    };

    /// Client addresses only: the default. Usernames and client ids are the client's
    /// claims, made before any authentication, so any client could get someone else's
    /// banned (and their open sessions closed) by failing with them.
    pub const ADDR: Self = Self {
        addr: true,
        username: false,
        client_id: false,
    };

    /// No key: the detector only counts nothing and bans nothing.
    pub const NONE: Self = Self {
        addr: false,
        username: false,
        client_id: false,
    };

    pub(super) const fn allows(self, key: &BanKey) -> bool {
        match key {
            BanKey::Addr(_) => self.addr,
            BanKey::Username(_) => self.username,
            BanKey::ClientId(_) => self.client_id,
        }
    }
}

impl Default for BanKeys {
    fn default() -> Self {
        Self::ADDR
    }
}

/// What the detector counts, and why a ban was put in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    Connects,
    AuthFailures,
    Rejections,
    Manual,
}

impl Cause {
    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Self::Connects => "connects",
            Self::AuthFailures => "auth_failures",
            Self::Rejections => "rejections",
            Self::Manual => "manual",
        }
    }
}

/// The longest a ban lasts: a century (a longer one is cut to it, whatever a caller or a
/// restored file asks for).
pub const MAX_BAN: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `now + d`, `d` cut to [`MAX_BAN`] (or `now` if even that overflows).
pub(super) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(MAX_BAN)).unwrap_or(now)
}

#[derive(Debug)]
struct Entry {
    until: Instant,
    wall: SystemTime,
    reason: &'static str,
    /// Orders bans that end at the same instant.
    id: u64,
    /// When a refusal under this ban was last logged as an event.
    logged: Option<Instant>,
    /// Refusals under this ban not logged since then.
    quiet: u64,
}

/// At most one event per ban per this long for the refusals it causes: a banned client
/// that reconnects in a loop must not push every other event out of the log.
pub(super) const REFUSAL_EVENT_EVERY: Duration = Duration::from_secs(1);

/// A refusal under a ban, as [`BanTable::refusal`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// No ban of that key is in force.
    NotBanned,
    /// Banned; log this refusal, with the count of refusals not logged before it.
    Log { quiet: u64 },
    /// Banned; a refusal was logged less than [`REFUSAL_EVENT_EVERY`] ago.
    Quiet,
}

/// What [`BanTable::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Inserted {
    /// The ban is in place: new, replacing the key's old one, or lengthening it.
    Placed,
    /// The key's ban in force already lasts as long or longer, and is by hand or by the
    /// detector as it was: a detector's ban changed nothing.
    Stands,
    /// The table takes no ban (`max` is 0, or a detector's ban finds only bans by hand).
    Refused,
}

#[cfg(test)]
impl Inserted {
    /// Whether the key is banned for at least as long as asked now.
    pub(super) const fn in_force(self) -> bool {
        !matches!(self, Self::Refused)
    }
}

/// The bans in force: the network bans in a [`NetMap`], the name bans in a map, and
/// their keys ordered by expiry, the detector's and those by hand apart (to purge, and
/// to evict the soonest-ending ban of either kind, in `O(log n)`).
///
/// An address is banned by any network ban that holds it: the `NetMap` finds the
/// narrowest with one lookup per prefix length in use in its family (one, for the
/// detector's bans alone), not one per ban.
#[derive(Debug)]
pub(super) struct BanTable {
    max: usize,
    nets: NetMap<Entry>,
    names: HashMap<BanKey, Entry>,
    /// By expiry: `[detector bans, bans by hand]` (see [`expiry_kind`]).
    by_expiry: [BTreeMap<(Instant, u64), BanKey>; EXPIRY_CLASSES],
    next_id: u64,
}

/// Which of [`BanTable::by_expiry`] a ban with `reason` is in: 0 for the detector's,
/// 1 for bans by hand ([`Cause::Manual`]).
fn expiry_kind(reason: &str) -> usize {
    usize::from(reason == Cause::Manual.as_str())
}

impl BanTable {
    pub(super) fn new(max: usize) -> Self {
        Self {
            max,
            nets: NetMap::new(),
            names: HashMap::new(),
            by_expiry: [BTreeMap::new(), BTreeMap::new()],
            next_id: 0,
        }
    }

    /// The entry of `key` itself.
    fn get_mut(&mut self, key: &BanKey) -> Option<&mut Entry> {
        match key {
            BanKey::Addr(net) => self.nets.get_mut(net),
            names => self.names.get_mut(names),
        }
    }

    /// Removes `key`'s entry (not from `by_expiry`).
    fn take(&mut self, key: &BanKey) -> Option<Entry> {
        match key {
            BanKey::Addr(net) => self.nets.remove(net),
            names => self.names.remove(names),
        }
    }

    /// The ban in force that applies to `key`: the key itself for a name; for a network,
    /// the narrowest network ban that holds all of it (itself included).
    fn covering(&self, key: &BanKey) -> Option<BanKey> {
        match key {
            BanKey::Addr(net) => self.nets.covering(net).map(BanKey::Addr),
            names => self.names.contains_key(names).then(|| names.clone()),
        }
    }

    /// Drops the bans that ended by `now`.
    fn purge(&mut self, now: Instant) {
        for kind in 0..self.by_expiry.len() {
            while let Some(first) = self.by_expiry[kind].first_entry() {
                if first.key().0 > now {
                    break;
                }
                let key = first.remove();
                self.take(&key);
            }
        }
    }

    /// Forgets `old`'s place in the expiry order.
    fn unindex(&mut self, old: &Entry) {
        self.by_expiry[expiry_kind(old.reason)].remove(&(old.until, old.id));
    }

    /// Bans `key` for `d` from `now` with `reason`. When the table is full, a ban makes
    /// room (see [`evict_for`](Self::evict_for)); [`Inserted::Refused`] when the table
    /// takes it not: `max` is 0, or a detector's ban finds only bans by hand.
    ///
    /// A ban of a key that is banned already: one by hand ([`Cause::Manual`]) replaces
    /// the old ban, whatever either's end (the operator's word is the last); a detector's
    /// never shortens the old ban nor moves one by hand into the detector's class. It
    /// stands aside ([`Inserted::Stands`]) when the old ban ends as late or later, and
    /// otherwise lengthens it, a ban by hand staying one (`manual`, in its class).
    pub(super) fn insert(
        &mut self,
        key: BanKey,
        now: Instant,
        d: Duration,
        mut reason: &'static str,
    ) -> Inserted {
        self.purge(now);
        if self.max == 0 {
            return Inserted::Refused;
        }
        let until = later(now, d);
        let by_hand = reason == Cause::Manual.as_str();
        if !by_hand && self.get_mut(&key).is_some_and(|old| old.until >= until) {
            return Inserted::Stands;
        }
        if let Some(old) = self.take(&key) {
            if !by_hand && old.reason == Cause::Manual.as_str() {
                reason = old.reason;
            }
            self.unindex(&old);
        } else if self.len() >= self.max && !self.evict_for(reason) {
            return Inserted::Refused;
        }
        let wall = SystemTime::now()
            .checked_add(until.saturating_duration_since(now))
            .unwrap_or_else(SystemTime::now);
        self.next_id += 1;
        let id = self.next_id;
        self.by_expiry[expiry_kind(reason)].insert((until, id), key.clone());
        let entry = Entry {
            until,
            wall,
            reason,
            id,
            logged: None,
            quiet: 0,
        };
        match key {
            BanKey::Addr(net) => self.nets.insert(net, entry),
            names => self.names.insert(names, entry),
        };
        Inserted::Placed
    }

    /// Makes room for a ban with `reason` in the full table; `false` if there is none for
    /// it. The ban that ends soonest goes, but bans by hand ([`Cause::Manual`]) go only
    /// for another ban by hand: a flood of detector bans (an attacker earning bans from
    /// many addresses on purpose) cannot push an operator's out. Each eviction is counted
    /// in `aegis_security_bans_evicted_total`.
    fn evict_for(&mut self, reason: &'static str) -> bool {
        // The detector's first; those by hand only for one by hand.
        let kinds = 0..=expiry_kind(reason);
        let Some((_, evicted)) = kinds
            .into_iter()
            .find_map(|k| self.by_expiry[k].pop_first())
        else {
            return false;
        };
        self.take(&evicted);
        super::metrics::evicted();
        true
    }

    /// Whether `key` is banned (a network by any ban that holds it, see
    /// [`covering`](Self::covering)), and if so whether this refusal is logged (see
    /// [`REFUSAL_EVENT_EVERY`]).
    pub(super) fn refusal(&mut self, key: &BanKey, now: Instant) -> Refusal {
        self.purge(now);
        let Some(entry) = self.covering(key).and_then(|k| self.get_mut(&k)) else {
            return Refusal::NotBanned;
        };
        match entry.logged {
            Some(at) if now.saturating_duration_since(at) < REFUSAL_EVENT_EVERY => {
                entry.quiet += 1;
                Refusal::Quiet
            }
            _ => {
                entry.logged = Some(now);
                Refusal::Log {
                    quiet: std::mem::take(&mut entry.quiet),
                }
            }
        }
    }

    /// Lifts the ban of `key` (that key's own, not a wider network's); `false` if there
    /// was none in force.
    pub(super) fn remove(&mut self, key: &BanKey, now: Instant) -> bool {
        self.purge(now);
        match self.take(key) {
            Some(old) => {
                self.unindex(&old);
                true
            }
            None => false,
        }
    }

    /// Whether `key` is banned: a name by its own ban, a network by any ban that holds
    /// all of it.
    pub(super) fn contains(&mut self, key: &BanKey, now: Instant) -> bool {
        self.purge(now);
        self.covering(key).is_some()
    }

    /// The bans in force, copied, in no order, under one hold of the table: the
    /// reference [`Security::bans`](super::Security::bans) copies the same bans in runs of
    /// [`LIST_RUN`], letting the lock go between them.
    #[cfg(test)]
    pub(super) fn list(&mut self, now: Instant) -> Listed {
        self.list_last(now, usize::MAX).0
    }

    /// The `limit` bans in force that end last, copied, in no order, and how many are in
    /// force, under one hold of the table (the reference of
    /// [`Security::bans_ending_last`](super::Security::bans_ending_last)).
    #[cfg(test)]
    pub(super) fn list_last(&mut self, now: Instant, limit: usize) -> (Listed, usize) {
        let mut some = Vec::new();
        for class in 0..EXPIRY_CLASSES {
            if let Some(start) = self.start_of_last(now, class, limit) {
                self.copy_run(now, class, Bound::Included(start), limit, &mut some);
            }
        }
        (Listed(some), self.len())
    }

    /// Where the `limit` bans of expiry class `class` that end last begin in its order
    /// (its first ban when it has no more than `limit`); `None` when it has none or
    /// `limit` is 0. Walks `limit` places of the order, copying nothing.
    pub(super) fn start_of_last(
        &mut self,
        now: Instant,
        class: usize,
        limit: usize,
    ) -> Option<(Instant, u64)> {
        self.purge(now);
        let order = &self.by_expiry[class];
        match limit {
            0 => None,
            l if l >= order.len() => order.keys().next().copied(),
            l => order.keys().nth_back(l - 1).copied(),
        }
    }

    /// Copies into `out` the bans of expiry class `class` from `from` on in its order,
    /// at most `max`, each with its place; returns the place of the last one looked at
    /// and how many were (fewer than `max`: the class has no more).
    pub(super) fn copy_run(
        &mut self,
        now: Instant,
        class: usize,
        from: Bound<(Instant, u64)>,
        max: usize,
        out: &mut Vec<((Instant, u64), Ban)>,
    ) -> (Option<(Instant, u64)>, usize) {
        self.purge(now);
        let (mut last, mut looked) = (None, 0);
        for (&at, key) in self.by_expiry[class]
            .range((from, Bound::Unbounded))
            .take(max)
        {
            (last, looked) = (Some(at), looked + 1);
            if let Some(ban) = self.copy(key, at.0, now) {
                out.push((at, ban));
            }
        }
        (last, looked)
    }

    /// The ban of `key`, ending at `until`, as listed.
    fn copy(&self, key: &BanKey, until: Instant, now: Instant) -> Option<Ban> {
        let e = match key {
            BanKey::Addr(net) => self.nets.get(net),
            names => self.names.get(names),
        }?;
        Some(Ban {
            key: key.clone(),
            until: e.wall,
            remaining: until.saturating_duration_since(now),
            reason: e.reason,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.nets.len() + self.names.len()
    }
}

/// Bans copied from the table, each with its place in the order of their ends.
#[derive(Debug, Default)]
pub(super) struct Listed(pub(super) Vec<((Instant, u64), Ban)>);

impl Listed {
    /// The bans, the soonest-ending first (bans that end at the same instant, in the
    /// order they were put in place), each key once: copied in runs with the lock let go
    /// between them, a ban lengthened or replaced meanwhile can be copied at its old
    /// place and at its new one, and only the new one, which ends later, is kept.
    /// Outside the table's lock.
    pub(super) fn soonest_first(self) -> Vec<Ban> {
        let mut all = self.0;
        // Each class's bans come in runs in order: a stable sort merges them.
        all.sort_by_key(|(at, _)| *at);
        let mut seen = std::collections::HashSet::with_capacity(all.len());
        let mut kept: Vec<Ban> = all
            .into_iter()
            .rev()
            .filter_map(|(_, ban)| seen.insert(ban.key.clone()).then_some(ban))
            .collect();
        kept.reverse();
        kept
    }
}

/// How many bans a listing ([`Security::bans`](super::Security::bans),
/// [`Security::bans_ending_last`](super::Security::bans_ending_last)) copies per hold of
/// the ban table's lock, which every connection's and every CONNECT's ban check takes:
/// copying a full table of 100,000 at once held it for some 50 ms.
pub(super) const LIST_RUN: usize = 512;

/// The number of expiry classes ([`expiry_kind`]).
pub(super) const EXPIRY_CLASSES: usize = 2;

/// The detector's thresholds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Thresholds {
    pub(super) window: Duration,
    pub(super) connects: Option<u32>,
    pub(super) auth_failures: Option<u32>,
    pub(super) rejections: Option<u32>,
}

impl Thresholds {
    pub(super) const fn of(&self, cause: Cause) -> Option<u32> {
        match cause {
            Cause::Connects => self.connects,
            Cause::AuthFailures => self.auth_failures,
            Cause::Rejections => self.rejections,
            Cause::Manual => None,
        }
    }
}

#[derive(Debug)]
struct Counts {
    start: Instant,
    connects: u32,
    auth_failures: u32,
    rejections: u32,
}

/// What [`Detector::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recorded {
    /// Nothing to count (no threshold for this cause).
    Off,
    /// Counted, under the threshold.
    Counted,
    /// Over the threshold: the key's window is reset and the key must be banned.
    Crossed(u32),
    /// The detector is full: the key is not tracked.
    Untracked,
}

/// Fixed-window counters per key, at most `max` keys of each class: IPv4 networks, IPv6
/// networks, names (client ids and usernames). Apart, so that keys that cost an attacker
/// nothing (IPv6 /64s from one allocation, names) cannot fill the detector and leave a
/// new IPv4 address (a brute force, say) uncounted.
#[derive(Debug)]
pub(super) struct Detector {
    max: usize,
    maps: [Bounded<BanKey, Counts>; 3],
}

impl Detector {
    pub(super) fn new(max: usize) -> Self {
        Self {
            max,
            maps: Default::default(),
        }
    }

    /// The map of `key`'s class.
    fn map(&mut self, key: &BanKey) -> &mut Bounded<BanKey, Counts> {
        let class = match key {
            BanKey::Addr(net) if net.network().is_ipv4() => 0,
            BanKey::Addr(_) => 1,
            BanKey::Username(_) | BanKey::ClientId(_) => 2,
        };
        &mut self.maps[class]
    }

    pub(super) fn record(
        &mut self,
        t: &Thresholds,
        key: &BanKey,
        cause: Cause,
        now: Instant,
    ) -> Recorded {
        let Some(threshold) = t.of(cause) else {
            return Recorded::Off;
        };
        let window = t.window;
        let max = self.max;
        let map = self.map(key);
        if !map.map.contains_key(key)
            && !map.room(max, now, |c| {
                now.saturating_duration_since(c.start) < window
            })
        {
            return Recorded::Untracked;
        }
        let counts = map.map.entry(key.clone()).or_insert(Counts {
            start: now,
            connects: 0,
            auth_failures: 0,
            rejections: 0,
        });
        if now.saturating_duration_since(counts.start) >= t.window {
            *counts = Counts {
                start: now,
                connects: 0,
                auth_failures: 0,
                rejections: 0,
            };
        }
        let n = match cause {
            Cause::Connects => &mut counts.connects,
            Cause::AuthFailures => &mut counts.auth_failures,
            Cause::Rejections | Cause::Manual => &mut counts.rejections,
        };
        *n = n.saturating_add(1);
        if *n > threshold {
            map.map.remove(key);
            Recorded::Crossed(threshold)
        } else {
            Recorded::Counted
        }
    }

    pub(super) fn len(&self) -> usize {
        self.maps.iter().map(|m| m.map.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> BanKey {
        BanKey::addr(s.parse().unwrap())
    }

    fn net(s: &str) -> BanKey {
        BanKey::Addr(s.parse().unwrap())
    }

    /// Copied in runs, a ban lengthened between two runs is copied at its old place and
    /// at its new one; the list keeps it once, with its new end.
    #[tokio::test(start_paused = true)]
    async fn a_ban_lengthened_between_runs_is_listed_once_with_its_new_end() {
        let mut t = BanTable::new(10);
        let now = Instant::now();
        for (ip, secs) in [("192.0.2.1", 10), ("192.0.2.2", 20), ("192.0.2.3", 30)] {
            assert!(
                t.insert(addr(ip), now, Duration::from_secs(secs), "manual")
                    .in_force()
            );
        }
        let class = expiry_kind("manual");
        let mut out = Vec::new();
        let (last, looked) = t.copy_run(now, class, Bound::Unbounded, 1, &mut out);
        assert_eq!(looked, 1);
        // The first copied is lengthened past the others before the next run.
        assert!(
            t.insert(addr("192.0.2.1"), now, Duration::from_secs(40), "manual")
                .in_force()
        );
        let (_, looked) = t.copy_run(now, class, Bound::Excluded(last.unwrap()), 10, &mut out);
        assert_eq!(
            looked, 3,
            "the rest, and the lengthened ban at its new place"
        );
        assert_eq!(out.len(), 4);
        let listed: Vec<_> = Listed(out)
            .soonest_first()
            .into_iter()
            .map(|b| (b.key.to_string(), b.remaining.as_secs()))
            .collect();
        assert_eq!(
            listed,
            [
                ("addr:192.0.2.2/32".to_string(), 20),
                ("addr:192.0.2.3/32".to_string(), 30),
                ("addr:192.0.2.1/32".to_string(), 40),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_evicts_the_ban_that_ends_soonest() {
        let mut t = BanTable::new(2);
        let now = Instant::now();
        assert!(
            t.insert(addr("192.0.2.1"), now, Duration::from_secs(30), "manual")
                .in_force()
        );
        assert!(
            t.insert(addr("192.0.2.2"), now, Duration::from_secs(10), "manual")
                .in_force()
        );
        assert!(
            t.insert(addr("192.0.2.3"), now, Duration::from_secs(20), "manual")
                .in_force()
        );
        assert_eq!(t.len(), 2);
        assert!(!t.contains(&addr("192.0.2.2"), now));
        assert!(t.contains(&addr("192.0.2.1"), now));
        // Re-banning a key replaces its ban, without evicting anyone.
        assert!(
            t.insert(addr("192.0.2.3"), now, Duration::from_secs(40), "manual")
                .in_force()
        );
        assert_eq!(t.len(), 2);
        let later = now + Duration::from_secs(30);
        assert_eq!(t.list(later).soonest_first().len(), 1);
        assert!(t.remove(&addr("192.0.2.3"), later));
        assert!(!t.remove(&addr("192.0.2.3"), later));
        assert_eq!(t.len(), 0);
        let mut none = BanTable::new(0);
        assert!(
            !none
                .insert(addr("192.0.2.1"), now, Duration::from_secs(1), "manual")
                .in_force()
        );
    }

    /// The list is the soonest-ending first across both classes (the detector's and
    /// bans by hand, each kept in its own order), names and networks alike, ended bans
    /// left out; bans that end together in the order they were put in place.
    #[tokio::test(start_paused = true)]
    async fn the_list_is_the_soonest_ending_first_across_both_classes() {
        let mut t = BanTable::new(100);
        let now = Instant::now();
        let s = Duration::from_secs;
        let bans = [
            (addr("192.0.2.1"), 50, "manual"),
            (net("198.51.100.0/24"), 10, "connects"),
            (BanKey::client_id("c1"), 40, "rejections"),
            (BanKey::username("u1"), 5, "manual"),
            (addr("192.0.2.2"), 30, "manual"),
            (addr("192.0.2.3"), 1, "auth_failures"),
            (BanKey::username("u2"), 30, "connects"),
            (addr("192.0.2.4"), 20, "manual"),
        ];
        for (key, secs, reason) in &bans {
            assert!(t.insert(key.clone(), now, s(*secs), reason).in_force());
        }
        let later = now + s(2);
        let listed: Vec<_> = t
            .list(later)
            .soonest_first()
            .into_iter()
            .map(|b| (b.key.to_string(), b.remaining.as_secs(), b.reason))
            .collect();
        assert_eq!(
            listed,
            [
                ("username:\"u1\"".to_string(), 3, "manual"),
                ("addr:198.51.100.0/24".to_string(), 8, "connects"),
                ("addr:192.0.2.4/32".to_string(), 18, "manual"),
                ("addr:192.0.2.2/32".to_string(), 28, "manual"),
                ("username:\"u2\"".to_string(), 28, "connects"),
                ("client_id:\"c1\"".to_string(), 38, "rejections"),
                ("addr:192.0.2.1/32".to_string(), 48, "manual"),
            ]
        );
        // The last `limit` of them, whatever the limit, copying only as many of each
        // class.
        for limit in 0..=9 {
            let (last, total) = t.list_last(later, limit);
            assert!(
                last.0.len() <= 2 * limit,
                "limit {limit}: copied {}",
                last.0.len()
            );
            let mut last: Vec<_> = last
                .soonest_first()
                .into_iter()
                .map(|b| (b.key.to_string(), b.remaining.as_secs(), b.reason))
                .collect();
            last.drain(..last.len().saturating_sub(limit));
            assert_eq!(
                last,
                listed[listed.len().saturating_sub(limit)..],
                "limit {limit}"
            );
            assert_eq!(total, 7, "limit {limit}");
        }
    }

    /// A detector's ban of a key banned already never shortens its ban nor makes a ban
    /// by hand a detector's; a ban by hand replaces any, a shorter one too.
    #[tokio::test(start_paused = true)]
    async fn a_detector_ban_never_shortens_or_reclassifies_a_ban_of_its_key() {
        let mut t = BanTable::new(10);
        let now = Instant::now();
        let (week, five) = (Duration::from_secs(7 * 86_400), Duration::from_secs(300));
        let key = addr("192.0.2.7");
        let ban = |t: &mut BanTable| {
            let b = t.list(now).soonest_first().pop().unwrap();
            (b.remaining, b.reason)
        };
        assert_eq!(t.insert(key.clone(), now, week, "manual"), Inserted::Placed);
        assert_eq!(
            t.insert(key.clone(), now, five, "rejections"),
            Inserted::Stands
        );
        assert_eq!(ban(&mut t), (week, "manual"));
        assert_eq!(
            t.by_expiry[0].len(),
            0,
            "a ban by hand in the detector's class"
        );
        // A detector's ban that ends later lengthens a short ban by hand, which stays one.
        assert_eq!(
            t.insert(key.clone(), now, Duration::from_secs(60), "manual"),
            Inserted::Placed
        );
        assert_eq!(
            t.insert(key.clone(), now, five, "connects"),
            Inserted::Placed
        );
        assert_eq!(ban(&mut t), (five, "manual"));
        assert_eq!(
            (t.by_expiry[0].len(), t.by_expiry[1].len(), t.len()),
            (0, 1, 1)
        );
        // Between the detector's own bans, the later end stands.
        let other = addr("192.0.2.8");
        t.insert(other.clone(), now, week, "auth_failures");
        assert_eq!(
            t.insert(other.clone(), now, five, "rejections"),
            Inserted::Stands
        );
        let b = t.list(now).soonest_first().pop().unwrap();
        assert_eq!(
            (b.key, b.remaining, b.reason),
            (other, week, "auth_failures")
        );
        // The operator's word is the last: a shorter ban by hand replaces the detector's.
        assert_eq!(
            t.insert(key.clone(), now, Duration::from_secs(10), "manual"),
            Inserted::Placed
        );
        assert_eq!(
            t.list(now).soonest_first()[0].remaining,
            Duration::from_secs(10)
        );
        assert_eq!(t.len(), 2);
    }

    /// Detector bans never push out bans by hand, whenever these end; bans by hand push
    /// out detector bans first.
    #[test]
    fn a_flood_of_detector_bans_cannot_evict_bans_by_hand() {
        let ((), snap) = aegis_core::metrics::testing::run(true, || async {
            let mut t = BanTable::new(3);
            let now = Instant::now();
            let s = Duration::from_secs;
            assert!(t.insert(addr("192.0.2.1"), now, s(10), "manual").in_force());
            assert!(
                t.insert(addr("192.0.2.2"), now, s(20), "connects")
                    .in_force()
            );
            assert!(t.insert(addr("192.0.2.3"), now, s(30), "manual").in_force());
            // A detector ban evicts the detector's, though a manual one ends sooner.
            assert!(
                t.insert(addr("198.51.100.1"), now, s(300), "auth_failures")
                    .in_force()
            );
            assert!(t.contains(&addr("192.0.2.1"), now));
            assert!(!t.contains(&addr("192.0.2.2"), now));
            // A thousand more detector bans: they push out each other, never a manual one.
            for i in 0..1000u32 {
                let key = BanKey::addr(std::net::Ipv4Addr::from(0xCB00_7100 + i).into());
                t.insert(key, now, s(300), "rejections");
            }
            assert!(t.contains(&addr("192.0.2.1"), now) && t.contains(&addr("192.0.2.3"), now));
            assert_eq!(t.len(), 3);
            // A manual ban pushes out the one detector ban left, then the soonest manual.
            assert!(t.insert(addr("192.0.2.4"), now, s(40), "manual").in_force());
            let manual: Vec<_> = t
                .list(now)
                .soonest_first()
                .into_iter()
                .map(|b| b.key.to_string())
                .collect();
            assert_eq!(
                manual,
                [
                    "addr:192.0.2.1/32",
                    "addr:192.0.2.3/32",
                    "addr:192.0.2.4/32"
                ]
            );
            // Full of bans by hand: a detector ban is not put in place; another by hand is.
            assert!(
                !t.insert(addr("198.51.100.2"), now, s(300), "connects")
                    .in_force()
            );
            assert!(t.insert(addr("192.0.2.5"), now, s(50), "manual").in_force());
            assert!(!t.contains(&addr("192.0.2.1"), now));
        });
        let evicted = aegis_core::metrics::testing::capture(&snap)
            .counter(super::super::metrics::BANS_EVICTED_TOTAL, &[]);
        assert_eq!(evicted, 1 + 1000 + 1 + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_detector_purges_at_most_once_a_second() {
        let t = Thresholds {
            window: Duration::from_millis(100),
            connects: Some(10),
            auth_failures: None,
            rejections: None,
        };
        let mut d = Detector::new(1);
        let now = Instant::now();
        assert_eq!(
            d.record(&t, &addr("192.0.2.1"), Cause::Connects, now),
            Recorded::Counted
        );
        assert_eq!(
            d.record(&t, &addr("192.0.2.1"), Cause::AuthFailures, now),
            Recorded::Off
        );
        // Full, nothing expired: the scan happens and finds nothing.
        assert_eq!(
            d.record(&t, &addr("192.0.2.2"), Cause::Connects, now),
            Recorded::Untracked
        );
        // The window ended, but the last scan was less than a second ago.
        let soon = now + Duration::from_millis(200);
        assert_eq!(
            d.record(&t, &addr("192.0.2.2"), Cause::Connects, soon),
            Recorded::Untracked
        );
        let next = now + crate::bounded::PURGE_EVERY;
        assert_eq!(
            d.record(&t, &addr("192.0.2.2"), Cause::Connects, next),
            Recorded::Counted
        );
        assert_eq!(d.len(), 1);
    }

    /// IPv4 networks, IPv6 networks and names each have their own `max`: a detector full
    /// of IPv6 /64s or names still counts a new IPv4 address.
    #[tokio::test(start_paused = true)]
    async fn each_class_of_keys_has_its_own_room() {
        let t = Thresholds {
            window: Duration::from_secs(60),
            connects: Some(1),
            auth_failures: None,
            rejections: None,
        };
        let mut d = Detector::new(2);
        let now = Instant::now();
        for i in 0..10u16 {
            let v6 = BanKey::addr(std::net::Ipv6Addr::new(0x2001, 0xdb8, i, 0, 0, 0, 0, 1).into());
            d.record(&t, &v6, Cause::Connects, now);
            d.record(
                &t,
                &BanKey::client_id(&format!("c{i}")),
                Cause::Connects,
                now,
            );
        }
        assert_eq!(d.len(), 4);
        let v4 = addr("192.0.2.1");
        assert_eq!(d.record(&t, &v4, Cause::Connects, now), Recorded::Counted);
        assert_eq!(
            d.record(&t, &v4, Cause::Connects, now),
            Recorded::Crossed(1)
        );
        // Each class is still bounded.
        let other = BanKey::addr("2001:db8:ff::1".parse().unwrap());
        assert_eq!(
            d.record(&t, &other, Cause::Connects, now),
            Recorded::Untracked
        );
    }

    #[test]
    fn keys_fold_mapped_addresses_and_display_quoted() {
        assert_eq!(addr("::ffff:192.0.2.1"), addr("192.0.2.1"));
        assert_eq!(
            BanKey::client_id("a\"b").to_string(),
            "client_id:\"a\\\"b\""
        );
        assert_eq!(addr("2001:db8::1"), net("2001:db8::/64"));
        assert_eq!(
            addr("2001:db8:1:2:ffff:ffff:ffff:ffff"),
            net("2001:db8:1:2::/64")
        );
        assert_eq!(addr("2001:db8::").to_string(), "addr:2001:db8::/64");
        // Always with the prefix.
        assert_eq!(addr("::ffff:192.0.2.1").to_string(), "addr:192.0.2.1/32");
        assert_eq!(net("2001:db8::1/128").to_string(), "addr:2001:db8::1/128");
        assert_eq!(net("192.0.2.0/24").to_string(), "addr:192.0.2.0/24");
        let long = "x".repeat(1000);
        assert_eq!(
            BanKey::Username(Arc::from(long.as_str())).normalized(),
            BanKey::username(&long[..256])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_network_ban_holds_its_addresses_and_is_lifted_alone() {
        let host = |s: &str| BanKey::host(s.parse().unwrap());
        let banned = |t: &mut BanTable, s: &str| t.refusal(&host(s), Instant::now());
        let mut t = BanTable::new(10);
        let now = Instant::now();
        let d = Duration::from_secs(60);
        assert!(
            t.insert(net("198.51.100.0/24"), now, d, "manual")
                .in_force()
        );
        assert!(t.insert(net("2001:db8::/48"), now, d, "manual").in_force());
        assert!(
            t.insert(addr("192.0.2.7"), now, Duration::from_secs(5), "manual")
                .in_force()
        );
        assert!(t.insert(net("::/64"), now, d, "manual").in_force());
        assert_eq!(t.nets.lengths(), 4);
        assert_eq!(banned(&mut t, "198.51.100.9"), Refusal::Log { quiet: 0 });
        assert_eq!(banned(&mut t, "::ffff:198.51.100.10"), Refusal::Quiet);
        assert_eq!(
            banned(&mut t, "2001:db8:0:ffff::1"),
            Refusal::Log { quiet: 0 }
        );
        assert_eq!(banned(&mut t, "2001:db8:1::1"), Refusal::NotBanned);
        assert_eq!(banned(&mut t, "192.0.2.7"), Refusal::Log { quiet: 0 });
        // `::/64` (the key of `::1`) holds no IPv4 address, mapped or not.
        assert_eq!(banned(&mut t, "192.0.2.8"), Refusal::NotBanned);
        assert_eq!(banned(&mut t, "::ffff:192.0.2.8"), Refusal::NotBanned);
        assert_eq!(banned(&mut t, "::2"), Refusal::Log { quiet: 0 });
        assert!(t.remove(&net("::/64"), now));
        // A network is banned when a ban holds all of it.
        assert!(t.contains(&net("198.51.100.128/25"), now));
        assert!(!t.contains(&net("198.51.0.0/16"), now));
        assert!(t.contains(&net("2001:db8:0:100::/56"), now));
        // Lifting a network's ban lifts only that one.
        assert!(!t.remove(&host("198.51.100.9"), now));
        assert!(t.remove(&net("198.51.100.0/24"), now));
        assert_eq!(banned(&mut t, "198.51.100.9"), Refusal::NotBanned);
        // Ended bans leave the counts with the map.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(banned(&mut t, "192.0.2.7"), Refusal::NotBanned);
        assert_eq!((t.nets.lengths(), t.nets.len()), (1, 1));
        assert_eq!(t.len(), 1);
        // So do replaced and evicted ones.
        let mut small = BanTable::new(1);
        assert!(small.insert(net("10.0.0.0/8"), now, d, "manual").in_force());
        assert!(small.insert(net("10.0.0.0/8"), now, d, "manual").in_force());
        assert_eq!((small.nets.lengths(), small.nets.len()), (1, 1));
        assert!(
            small
                .insert(BanKey::username("u"), now, d, "manual")
                .in_force()
        );
        assert_eq!(small.nets.lengths(), 0);
        assert_eq!(small.refusal(&host("10.1.2.3"), now), Refusal::NotBanned);
    }

    #[tokio::test(start_paused = true)]
    async fn a_6to4_or_teredo_client_is_banned_by_its_ipv4_key_from_any_of_its_addresses() {
        let host = |s: &str| BanKey::host(s.parse().unwrap());
        let banned = |t: &mut BanTable, s: &str| t.refusal(&host(s), Instant::now());
        let mut t = BanTable::new(10);
        let (now, d) = (Instant::now(), Duration::from_secs(60));
        // The detector's key of the 6to4 site at 203.0.113.5, and of a Teredo client
        // behind 198.51.100.1.
        let site = addr("2002:cb00:7105:1::1");
        assert_eq!(site, net("203.0.113.5/32"));
        assert!(t.insert(site, now, d, "connects").in_force());
        let teredo = addr("2001:0:c000:22d:8000:f227:39cc:9bfe");
        assert_eq!(teredo, net("198.51.100.1/32"));
        assert!(t.insert(teredo, now, d, "connects").in_force());
        for refused in [
            "2002:cb00:7105:1::2",
            "2002:cb00:7105:ffff::1",
            "203.0.113.5",
            "::ffff:203.0.113.5",
            "2001:0:cb00:7101:0:1:39cc:9bfe",
            "198.51.100.1",
        ] {
            assert_ne!(banned(&mut t, refused), Refusal::NotBanned, "{refused}");
        }
        // The next site, and another client of the same Teredo server.
        for served in [
            "2002:cb00:7106:1::1",
            "203.0.113.6",
            "2001:0:c000:22d:8000:f227:39cc:9bfd",
        ] {
            assert_eq!(banned(&mut t, served), Refusal::NotBanned, "{served}");
        }
        // A network of the site's subnets is banned whole; one of two sites is not.
        assert!(t.contains(&net("2002:cb00:7105::/48"), now));
        assert!(!t.contains(&net("2002:cb00:7104::/47"), now));
    }

    /// An address from a small pool (so that bans and probes meet): IPv4 `10.0.a.b`,
    /// the same as IPv4-mapped IPv6, as a 6to4 address (of the site's subnet `b`) or
    /// as a Teredo address, or IPv6 `2001:db8::a:b` and `::a:b` (the latter in the 64
    /// zero bits that IPv4-mapped addresses start with).
    fn pooled(kind: u8, a: u8, b: u8) -> IpAddr {
        let (a, b) = (a % 4, b % 4);
        let v4 = std::net::Ipv4Addr::new(10, 0, a, b);
        let inverted = !v4.to_bits();
        match kind % 6 {
            0 => IpAddr::V4(v4),
            1 => IpAddr::V6(v4.to_ipv6_mapped()),
            2 => format!("2002:a00:{a:02x}{b:02x}:{b}::1").parse().unwrap(),
            3 => format!(
                "2001:0:c000:22d:8000:f227:{:x}:{:x}",
                inverted >> 16,
                inverted & 0xffff
            )
            .parse()
            .unwrap(),
            4 => format!("2001:db8::{a}:{b}").parse().unwrap(),
            _ => format!("::{a}:{b}").parse().unwrap(),
        }
    }

    proptest::proptest! {
        /// The table's lookup (one per prefix length in use) agrees with asking every
        /// ban whether it holds the address, through bans put in place and lifted.
        #[test]
        fn an_address_is_banned_exactly_when_a_ban_holds_it(
            bans in proptest::collection::vec((0..6u8, 0..4u8, 0..4u8, 0..=128u8), 0..12),
            lifted in proptest::collection::vec(0..12usize, 0..4),
            probes in proptest::collection::vec((0..6u8, 0..4u8, 0..4u8), 1..16),
        ) {
            let now = Instant::now();
            let mut t = BanTable::new(100);
            let mut held = Vec::new();
            for (kind, a, b, len) in bans {
                // Lengths in each family's range, crowded at the ends where masks break.
                let ip = pooled(kind, a, b);
                let len = if ip.to_canonical().is_ipv4() { len % 33 } else { len };
                let net = ClientKey::new(ip.to_canonical(), len).unwrap();
                t.insert(BanKey::Addr(net), now, Duration::from_secs(60), "manual");
                held.push(net);
            }
            for i in lifted {
                if let Some(net) = held.get(i).copied() {
                    t.remove(&BanKey::Addr(net), now);
                    held.retain(|n| *n != net);
                }
            }
            proptest::prop_assert_eq!(t.nets.len(), t.len());
            for (kind, a, b) in probes {
                let ip = pooled(kind, a, b);
                let expected = held.iter().any(|n| n.contains(ip));
                proptest::prop_assert_eq!(
                    t.refusal(&BanKey::host(ip), now) != Refusal::NotBanned,
                    expected,
                    "{} against {:?}", ip, held
                );
            }
        }
    }
}
