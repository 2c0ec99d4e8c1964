//! Per-packet policy: rate tiers per client address and per client id, with the answer
//! MQTT expects for each packet over a limit.
//!
//! A [`Policy`] is a set of optional tiers, each a GCRA [`Quota`] over
//! [`KeyedLimiter`]s (the machinery of `aegis_layers::rate_limit`: bounded keys, idle
//! keys evicted, tokio's clock). Attach it with
//! [`MqttLayer::policy`](super::MqttLayer::policy); its limiters are shared by every
//! connection of the layer, so a client id that reconnects keeps what it has used.
//!
//! | tier | builder | key | counts | over the limit |
//! |---|---|---|---|---|
//! | `connect` | [`connect_per_addr`](PolicyBuilder::connect_per_addr) | client address ([`KeyBy`]) | valid CONNECTs | CONNACK `20 02 00 05` (3.x) / `20 03 00 9F 00` (5.0), close (`connect_rate`) |
//! | `publish` | [`publish_per_client`](PolicyBuilder::publish_per_client) | client id | PUBLISH | dropped (see below) |
//! | `subscribe` | [`subscribe_per_client`](PolicyBuilder::subscribe_per_client) | client id | SUBSCRIBE | SUBACK from the gateway, 0x80 (3.1.1) / 0x97 (5.0) per filter, not forwarded; 3.1, whose SUBACK has no failure code: close (`message_rate`) |
//! | `packets` | [`packets_per_client`](PolicyBuilder::packets_per_client) | client id | PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PINGREQ; PUBACK, PUBREC, PUBREL, PUBCOMP beyond the [acknowledgement credit](#acknowledgements) | as above; UNSUBSCRIBE, PINGREQ and acknowledgements: close (`message_rate`, 5.0: DISCONNECT 0x96) |
//! | `bytes` | [`bytes_per_client`](PolicyBuilder::bytes_per_client) | client id | the whole packet's length, in cells | as for `packets` |
//!
//! A PUBLISH over a limit never reaches the inner service: `QoS` 0 is just dropped;
//! `QoS` 1 and 2 are dropped without acknowledgement (the client sends it again, with
//! DUP, after it reconnects), or, for MQTT 5 with
//! [`v5_publish_answer`](PolicyBuilder::v5_publish_answer), answered by the gateway with
//! PUBACK `40 03 ID ID 97` (`QoS` 1) or PUBREC `50 03 ID ID 97` (`QoS` 2), reason 0x97
//! "quota exceeded", which ends that message's flow. A `QoS` 2 PUBLISH with DUP set is
//! never answered, even then: the broker may still hold its packet identifier from the
//! first delivery, awaiting a PUBREL, and would take the client's next PUBLISH with that
//! identifier, freed by a failure PUBREC, for a duplicate and never deliver it
//! [MQTT-4.3.3-10]; it is dropped as a 3.x one is (DUP does not get a PUBLISH past the
//! limit). Each `QoS` 1 or 2 PUBLISH
//! dropped without an answer holds one of the client's in-flight slots (a 3.x client
//! library's in-flight limit, MQTT 5's Receive Maximum) until it reconnects: after as
//! many drops as that window (often 10 to 20), the client sends no more `QoS` 1 or 2
//! messages, and nothing tells it why. For MQTT 5 clients, turn on
//! `v5_publish_answer`; for 3.x, keep the publish tier's burst above what a client
//! legitimately sends. Dropping without an answer deviates from 3.1.1 [MQTT-3.3.5-2]
//! (acknowledge positively or close the connection) and 5.0 [MQTT-4.3.2-4] (answer
//! with a PUBACK): see [Deviations](crate#deviations).
//!
//! An MQTT 5 PUBLISH that *sets* a Topic Alias (a topic name and an alias) is never
//! dropped: the broker would not learn the alias, and would deliver the client's next
//! PUBLISH on it to the alias's old topic (or end the connection for an unknown
//! alias). Over a limit it ends the connection instead (`message_rate`, DISCONNECT
//! 0x96); blocked by inspection too (`not_authorized` or `payload_blocked`, DISCONNECT
//! 0x87). A PUBLISH that only uses an alias is dropped as any other. Every other packet
//! is forwarded byte-exact. DISCONNECT and AUTH are never limited and count in no tier:
//! they end the session or answer the broker's authentication.
//!
//! # Acknowledgements
//!
//! A PUBACK, PUBREC, PUBREL or PUBCOMP that answers the broker is never limited either,
//! and counts in no tier. Each connection keeps an acknowledgement credit: one per
//! `QoS` 1 or 2 PUBLISH, PUBREC and PUBREL that the broker has written to the client
//! (the packets a client answers with PUBACK or PUBREC, PUBREL, PUBCOMP), counted as
//! the layer writes them, at most 65,535 (packet identifiers are 16-bit). An
//! acknowledgement within the credit takes one. One beyond it answers nothing the
//! broker sent on this connection (an identifier never used, say: each costs the broker
//! a lookup, often a PUBREL or PUBCOMP back, and a warning in its log), and is charged to
//! `packets` and `bytes` like a PINGREQ, and refused as one over them (`message_rate`;
//! MQTT 5: DISCONNECT 0x96). Charged, not refused outright: after a reconnect a client
//! rightly sends again the PUBREL of a `QoS` 2 message whose PUBREC came on its previous
//! connection. The credit is kept only with a `packets` or `bytes` tier; without one,
//! acknowledgements are forwarded uncounted, as any packet no tier limits.
//!
//! With `PolicyBuilder::inspect` (feature `inspect`), a PUBLISH within the
//! tiers is then inspected, and so is the will of each CONNECT; a blocked PUBLISH gets
//! the answers above (MQTT 5 reason 0x87 for a topic rule, 0x99 for a payload rule).
//!
//! A packet is checked against its type's tier, then `packets`, then `bytes`; the first
//! tier over its limit decides, and the tiers checked before it have counted the packet.
//! A packet larger than the `bytes` burst is always over the limit. The CONNECT counts
//! only in the `connect` tier.
//!
//! # Keys
//!
//! The `connect` tier keys on the effective client address
//! ([`aegis_core::ClientAddr`]: the peer, or what a trusted PROXY header said), folded
//! and truncated exactly as the connection rate limiter does ([`KeyBy`]: IPv4-mapped,
//! 6to4, Teredo and NAT64 IPv6 addresses folded to the IPv4 address they carry, other IPv6
//! addresses by `/64`). The other tiers key on the CONNECT's client id; a
//! client with an empty id (which the broker names) is keyed on its address instead.
//!
//! Each tier tracks at most [`max_keys`](PolicyBuilder::max_keys) keys (100,000 by
//! default); a new key beyond the cap shares one overflow budget until idle keys are
//! evicted (every [`evict_every`](PolicyBuilder::evict_every), 30 s by default), as in
//! `aegis_layers::rate_limit`. A key idle past an eviction is new again. A refusal by
//! that shared budget gets the same answer as the tier's own, but its own label:
//! `connect_overflow` for the `connect` tier, `message_overflow` where the others
//! close the connection (a dropped packet keeps its tier's reason in
//! `aegis_mqtt_dropped_total`). Others' flood may have drained that budget, so
//! `aegis_mqtt::security` counts neither toward a ban.
//!
//! # Answers from the gateway
//!
//! The packets after a CONNECT are checked, and counted in the tiers, only once the
//! broker's CONNACK has accepted the connection (the layer does not read them before):
//! a client whose CONNECT the broker refuses (a wrong password under someone else's
//! client id, say) charges nothing to that id, however many packets it pipelined behind
//! the CONNECT.
//!
//! The gateway's own SUBACK, PUBACK and PUBREC go out after the broker's CONNACK and
//! between two of the broker's packets, as the layer's DISCONNECT does: they wait in a queue of at most
//! [`MAX_QUEUED_ANSWERS`] bytes while the broker is inside a packet, and are written at
//! the connection's next read or write. Once the broker's DISCONNECT has started going
//! out, the queued answers are dropped and none is written after it [MQTT-3.14.4-1]
//! (nor the layer's own DISCONNECT). A client whose answers overflow the queue is over
//! any sane limit: its packet is dropped without an answer and counted in
//! `aegis_mqtt_unanswered_total`. So is one whose answer would be larger than the
//! Maximum Packet Size of its MQTT 5 CONNECT: the server may not send it
//! [MQTT-3.1.2-24], and discards it instead [MQTT-3.1.2-25].
//!
//! # Metrics
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_rejections_total` | counter | `layer="mqtt"`, `reason`: `connect_rate`, `message_rate`; `connect_overflow`, `message_overflow` for a key beyond `max_keys` refused by the shared overflow budget (see [Keys](#keys)) | connections refused by the policy |
//! | `aegis_mqtt_dropped_total` | counter | `packet`: `publish`, `subscribe`; `reason`: `publish_rate`, `subscribe_rate`, `packet_rate`, `byte_rate`, `inspection` | packets kept from the broker |
//! | `aegis_mqtt_inspection_total` | counter | `rule`, `action` | with `PolicyBuilder::inspect`: see the `inspect` module |
//! | `aegis_mqtt_synthesized_total` | counter | `packet`: `suback`, `puback`, `pubrec` | answers written by the gateway |
//! | `aegis_mqtt_unanswered_total` | counter | `packet`: `suback`, `puback`, `pubrec` | answers not sent because the queue was full, or larger than the client's Maximum Packet Size |
//! | `aegis_rate_limit_keys` and friends | | `limiter`: `mqtt_connect`, `mqtt_publish`, `mqtt_subscribe`, `mqtt_packets`, `mqtt_bytes` | the tiers' state, see `aegis_layers::rate_limit` |
//!
//! Each refusal and drop is also a `tracing` event at debug level with the client id and
//! client address, which are never metric labels.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use aegis_core::ClientAddr;
use aegis_layers::rate_limit::{ClientKey, DEFAULT_EVICT_EVERY, DEFAULT_MAX_KEYS, KeyedLimiter};
use bytes::Buf;

pub use aegis_layers::rate_limit::{KeyBy, Quota};

use super::{Answers, Verdict};
#[cfg(feature = "inspect")]
use crate::inspect::{self, Inspector};
use crate::{Connect, MqttError, Packet, Version, encode};

/// The most bytes of gateway answers (SUBACK, PUBACK, PUBREC) one connection queues
/// while the broker is inside a packet: hundreds of small answers, or one SUBACK for
/// 16,000 filters.
pub const MAX_QUEUED_ANSWERS: usize = 16 * 1024;

/// Rate tiers per client address and per client id, shared by every connection of the
/// layer. See the [module docs](self).
///
/// Cheap to clone: clones share the limiters.
#[derive(Debug, Clone)]
pub struct Policy {
    tiers: Arc<Tiers>,
}

#[derive(Debug)]
struct Tiers {
    key_by: KeyBy,
    connect: Option<KeyedLimiter<ClientKey>>,
    publish: Option<KeyedLimiter<IdKey>>,
    subscribe: Option<KeyedLimiter<IdKey>>,
    packets: Option<KeyedLimiter<IdKey>>,
    bytes: Option<KeyedLimiter<IdKey>>,
    v5_publish_answer: bool,
    #[cfg(feature = "inspect")]
    inspector: Option<Inspector>,
}

impl Tiers {
    /// The first tier over its limit for a packet of `len` bytes from `key` (the packet
    /// type's own tier, if any, then `packets`, then `bytes`), and whether its shared
    /// overflow bucket (the key not tracked) refused rather than the key's own budget.
    /// Each tier is checked only when those before it let the packet through.
    fn first_over(
        &self,
        key: &IdKey,
        own: Option<(Tier, &Option<KeyedLimiter<IdKey>>)>,
        len: usize,
    ) -> Option<(Tier, bool)> {
        own.and_then(|(tier, limiter)| Some((tier, limiter.as_ref()?.check(key).err()?.overflow())))
            .or_else(|| {
                let over = self.packets.as_ref()?.check(key).err()?;
                Some((Tier::Packets, over.overflow()))
            })
            .or_else(|| {
                let l = self.bytes.as_ref()?;
                match u32::try_from(len).ok().and_then(NonZeroU32::new) {
                    Some(n) => Some((Tier::Bytes, l.check_n(key, n).err()?.overflow())),
                    // Past `u32` cells: over any burst.
                    None => Some((Tier::Bytes, false)),
                }
            })
    }
}

/// What the per-client tiers key on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IdKey {
    Id(Arc<str>),
    /// An empty client id: the client's address.
    Anonymous(ClientKey),
}

/// Builds a [`Policy`]; every tier is off until set.
#[derive(Debug, Clone)]
#[must_use]
pub struct PolicyBuilder {
    key_by: KeyBy,
    connect: Option<Quota>,
    publish: Option<Quota>,
    subscribe: Option<Quota>,
    packets: Option<Quota>,
    bytes: Option<Quota>,
    max_keys: usize,
    evict_every: Duration,
    v5_publish_answer: bool,
    #[cfg(feature = "inspect")]
    inspector: Option<Inspector>,
}

/// A tier of a [`Policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Tier {
    /// CONNECTs per client address.
    Connect,
    /// PUBLISH packets per client id.
    Publish,
    /// SUBSCRIBE packets per client id.
    Subscribe,
    /// Packets per client id.
    Packets,
    /// Bytes per client id.
    Bytes,
}

impl Tier {
    /// The stable reason label of a packet over this tier: `connect_rate`,
    /// `publish_rate`, `subscribe_rate`, `packet_rate` or `byte_rate`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect_rate",
            Self::Publish => "publish_rate",
            Self::Subscribe => "subscribe_rate",
            Self::Packets => "packet_rate",
            Self::Bytes => "byte_rate",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
            Self::Packets => "packets",
            Self::Bytes => "bytes",
        })
    }
}

/// A packet over one of the policy's tiers, dropped (and perhaps answered by the
/// gateway) rather than forwarded.
///
/// [`label`](Self::label) is its reason in `aegis_mqtt_dropped_total`; `Display` names
/// the packet and the tier, never the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{packet} over the {tier} limit")]
pub struct OverLimit {
    tier: Tier,
    packet: &'static str,
}

impl OverLimit {
    /// The tier whose limit the packet was over.
    pub const fn tier(&self) -> Tier {
        self.tier
    }

    /// The packet's label: `publish` or `subscribe`.
    pub const fn packet(&self) -> &'static str {
        self.packet
    }

    /// The stable reason label (the tier's [`label`](Tier::label)).
    pub const fn label(&self) -> &'static str {
        self.tier.label()
    }
}

impl Policy {
    /// A builder with every tier off.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder {
            key_by: KeyBy::default(),
            connect: None,
            publish: None,
            subscribe: None,
            packets: None,
            bytes: None,
            max_keys: DEFAULT_MAX_KEYS,
            evict_every: DEFAULT_EVICT_EVERY,
            v5_publish_answer: false,
            #[cfg(feature = "inspect")]
            inspector: None,
        }
    }

    /// The payload inspector, if one is attached.
    #[cfg(feature = "inspect")]
    #[cfg_attr(docsrs, doc(cfg(feature = "inspect")))]
    pub fn inspector(&self) -> Option<&Inspector> {
        self.tiers.inspector.as_ref()
    }

    /// The keys `tier` tracks now (0 for a tier that is off).
    pub fn tracked_keys(&self, tier: Tier) -> usize {
        let t = &*self.tiers;
        match tier {
            Tier::Connect => t.connect.as_ref().map_or(0, KeyedLimiter::len),
            Tier::Publish => t.publish.as_ref().map_or(0, KeyedLimiter::len),
            Tier::Subscribe => t.subscribe.as_ref().map_or(0, KeyedLimiter::len),
            Tier::Packets => t.packets.as_ref().map_or(0, KeyedLimiter::len),
            Tier::Bytes => t.bytes.as_ref().map_or(0, KeyedLimiter::len),
        }
    }

    /// The quota of `tier`, `None` when it is off.
    pub fn quota(&self, tier: Tier) -> Option<Quota> {
        let t = &*self.tiers;
        match tier {
            Tier::Connect => t.connect.as_ref().map(KeyedLimiter::quota),
            Tier::Publish => t.publish.as_ref().map(KeyedLimiter::quota),
            Tier::Subscribe => t.subscribe.as_ref().map(KeyedLimiter::quota),
            Tier::Packets => t.packets.as_ref().map(KeyedLimiter::quota),
            Tier::Bytes => t.bytes.as_ref().map(KeyedLimiter::quota),
        }
    }
}

impl PolicyBuilder {
    /// Limits valid CONNECTs per client address (a brute-force brake); a client over
    /// it gets CONNACK 0x05 (3.x) or 0x9F (5.0) and is closed, its CONNECT never reaching
    /// the inner service.
    pub fn connect_per_addr(mut self, quota: Quota) -> Self {
        self.connect = Some(quota);
        self
    }

    /// How client addresses map to keys of the `connect` tier (default: IPv4 by `/32`,
    /// IPv6 by `/64`, an IPv4-mapped, 6to4, Teredo or NAT64 address as the IPv4 address
    /// it carries); also the key of a client with an empty client id.
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.key_by = key_by;
        self
    }

    /// Limits PUBLISH packets per client id.
    pub fn publish_per_client(mut self, quota: Quota) -> Self {
        self.publish = Some(quota);
        self
    }

    /// Limits SUBSCRIBE packets per client id.
    pub fn subscribe_per_client(mut self, quota: Quota) -> Self {
        self.subscribe = Some(quota);
        self
    }

    /// Limits PUBLISH, SUBSCRIBE, UNSUBSCRIBE and PINGREQ packets together, per client
    /// id, and the acknowledgements that answer nothing the broker sent (see
    /// [Acknowledgements](self#acknowledgements)).
    pub fn packets_per_client(mut self, quota: Quota) -> Self {
        self.packets = Some(quota);
        self
    }

    /// Limits the bytes of the same packets as
    /// [`packets_per_client`](Self::packets_per_client), per client id: one cell per
    /// byte of the whole packet. A packet larger than the burst is always over.
    pub fn bytes_per_client(mut self, quota: Quota) -> Self {
        self.bytes = Some(quota);
        self
    }

    /// Whether an MQTT 5 `QoS` 1 or 2 PUBLISH over a limit gets a PUBACK or PUBREC with
    /// reason 0x97 from the gateway (default `false`: dropped without acknowledgement).
    /// A `QoS` 2 PUBLISH with DUP set is dropped without a PUBREC either way (see the
    /// [module docs](self)).
    pub fn v5_publish_answer(mut self, answer: bool) -> Self {
        self.v5_publish_answer = answer;
        self
    }

    /// Inspects each PUBLISH that passes the rate tiers, and the will of each CONNECT,
    /// with `inspector` (see the [`crate::inspect`] module): a blocked
    /// PUBLISH is dropped with the answers of a rate-limited one (MQTT 5 reason 0x87
    /// for a topic rule, 0x99 for a payload rule), a blocked will refuses the CONNECT.
    #[cfg(feature = "inspect")]
    #[cfg_attr(docsrs, doc(cfg(feature = "inspect")))]
    pub fn inspect(mut self, inspector: Inspector) -> Self {
        self.inspector = Some(inspector);
        self
    }

    /// The most keys each tier tracks (default 100,000).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// How often each tier forgets its idle keys (default every 30 s, as
    /// [`KeyedLimiter::evict_every`]); forgetting a key whose budget is whole changes no
    /// decision.
    ///
    /// # Panics
    ///
    /// If `every` is zero.
    pub fn evict_every(mut self, every: Duration) -> Self {
        assert!(!every.is_zero(), "eviction interval must be positive");
        self.evict_every = every;
        self
    }

    /// Builds the policy; its limiters start on first use.
    pub fn build(self) -> Policy {
        let keyed = |q: Option<Quota>, name| {
            q.map(|q| KeyedLimiter::new(q, self.max_keys, name).evict_every(self.evict_every))
        };
        Policy {
            tiers: Arc::new(Tiers {
                key_by: self.key_by,
                connect: self.connect.map(|q| {
                    KeyedLimiter::new(q, self.max_keys, "mqtt_connect")
                        .evict_every(self.evict_every)
                }),
                publish: keyed(self.publish, "mqtt_publish"),
                subscribe: keyed(self.subscribe, "mqtt_subscribe"),
                packets: keyed(self.packets, "mqtt_packets"),
                bytes: keyed(self.bytes, "mqtt_bytes"),
                v5_publish_answer: self.v5_publish_answer,
                #[cfg(feature = "inspect")]
                inspector: self.inspector,
            }),
        }
    }
}

/// The metric names of the policy (see the [module docs](self#metrics)).
pub mod metrics {
    /// `aegis_mqtt_dropped_total{packet, reason}`: packets kept from the broker.
    pub const DROPPED_TOTAL: &str = "aegis_mqtt_dropped_total";
    /// `aegis_mqtt_synthesized_total{packet}`: answers written by the gateway.
    pub const SYNTHESIZED_TOTAL: &str = "aegis_mqtt_synthesized_total";
    /// `aegis_mqtt_unanswered_total{packet}`: answers not sent, the queue being full or
    /// the answer larger than the client's Maximum Packet Size.
    pub const UNANSWERED_TOTAL: &str = "aegis_mqtt_unanswered_total";

    pub(super) fn dropped(packet: &'static str, reason: &'static str) {
        metrics::counter!(DROPPED_TOTAL, "packet" => packet, "reason" => reason).increment(1);
    }

    pub(super) fn synthesized(packet: &'static str) {
        metrics::counter!(SYNTHESIZED_TOTAL, "packet" => packet).increment(1);
    }

    pub(super) fn unanswered(packet: &'static str) {
        metrics::counter!(UNANSWERED_TOTAL, "packet" => packet).increment(1);
    }
}

/// The policy bound to one connection: its client address, then its client id.
#[derive(Debug)]
pub(crate) struct ConnPolicy {
    policy: Policy,
    addr: ClientAddr,
    /// Set once the CONNECT is accepted.
    key: Option<IdKey>,
    version: Version,
    /// The CONNECT's MQTT 5 Maximum Packet Size: no gateway answer larger than it is
    /// sent [MQTT-3.1.2-24].
    max_packet_size: Option<NonZeroU32>,
    /// Gateway answers not written yet: whole packets, at most [`MAX_QUEUED_ANSWERS`].
    answers: Answers,
    /// How many acknowledgements the client owes the broker: one per `QoS` 1 or 2
    /// PUBLISH, PUBREC and PUBREL the broker has written to it (counted by the layer
    /// through `ack_credit()`, saturating: a connection has at most 65,535
    /// packet identifiers in flight). A PUBACK, PUBREC, PUBREL or PUBCOMP within it takes
    /// one and is free; one beyond it answers nothing and is charged to the `packets`
    /// and `bytes` tiers.
    ack_credit: u16,
    /// The CONNECT's username, kept only for an inspector.
    #[cfg(feature = "inspect")]
    username: Option<Box<str>>,
    /// The Topic Aliases of the PUBLISH packets forwarded, kept only for topic rules.
    #[cfg(feature = "inspect")]
    aliases: Aliases,
}

/// The most bytes one connection's [`Aliases`] holds, each alias counted as its topic
/// plus [`ALIAS_ENTRY_BYTES`]: an alias set beyond it is not recorded, and a PUBLISH
/// using it is blocked as `topic_acl`.
#[cfg(feature = "inspect")]
const MAX_ALIAS_BYTES: usize = 64 * 1024;

/// What an alias costs beyond its topic's bytes: its map slot and the topic's own
/// allocation. Without it, 65,535 one-byte topics would pass a bound meant for 64 KiB.
#[cfg(feature = "inspect")]
const ALIAS_ENTRY_BYTES: usize = 48;

/// MQTT 5 Topic Aliases as the broker knows them: only those of forwarded PUBLISH
/// packets, at most [`MAX_ALIAS_BYTES`] of them. Boxed on first use: most connections
/// never set an alias, and the table would otherwise sit in every connection's state.
#[cfg(feature = "inspect")]
#[derive(Debug, Default)]
struct Aliases(Option<Box<AliasMap>>);

#[cfg(feature = "inspect")]
#[derive(Debug, Default)]
struct AliasMap {
    map: std::collections::HashMap<u16, Box<str>>,
    bytes: usize,
}

#[cfg(feature = "inspect")]
impl Aliases {
    fn get(&self, alias: u16) -> Option<&str> {
        self.0.as_ref()?.map.get(&alias).map(|t| &**t)
    }

    /// Records `alias` for `topic` (the broker replaces an alias that is set again);
    /// over the bound, forgets it instead, so that a later use is blocked.
    fn set(&mut self, alias: u16, topic: &str) {
        if self.get(alias) == Some(topic) {
            return;
        }
        let a = self.0.get_or_insert_with(Box::default);
        if let Some(old) = a.map.remove(&alias) {
            a.bytes -= old.len() + ALIAS_ENTRY_BYTES;
        }
        let cost = topic.len() + ALIAS_ENTRY_BYTES;
        if a.bytes + cost <= MAX_ALIAS_BYTES {
            a.bytes += cost;
            a.map.insert(alias, Box::from(topic));
        }
    }
}

impl ConnPolicy {
    pub(crate) fn new(policy: Policy, addr: ClientAddr) -> Self {
        Self {
            policy,
            addr,
            key: None,
            version: Version::V3_1_1,
            max_packet_size: None,
            answers: None,
            ack_credit: 0,
            #[cfg(feature = "inspect")]
            username: None,
            #[cfg(feature = "inspect")]
            aliases: Aliases::default(),
        }
    }

    /// Checks an accepted CONNECT against the `connect` tier, learns the client id, and
    /// inspects the will. `id` is the client id, shared with the security layer.
    pub(crate) fn on_connect(
        &mut self,
        connect: &Connect<'_>,
        id: &mut super::SharedId<'_>,
    ) -> Result<(), MqttError> {
        let (client_id, version) = (connect.client_id, connect.version);
        let tiers = &*self.policy.tiers;
        let ip = self.addr.0.ip();
        self.version = version;
        self.max_packet_size = connect.max_packet_size;
        if let Some(limiter) = &tiers.connect
            && let Err(over) = limiter.check(&tiers.key_by.key(ip))
        {
            // An address not tracked, refused by the overflow bucket that every such
            // address shares, is told apart: others' CONNECTs may have drained it.
            let refusal = if over.overflow() {
                MqttError::ConnectOverflow
            } else {
                MqttError::ConnectRate
            };
            tracing::debug!(
                client_id = ?client_id,
                client_addr = %self.addr,
                reason = aegis_core::error::Reject::label(&refusal),
                "mqtt CONNECT over the policy's connect rate"
            );
            return Err(refusal);
        }
        self.key = Some(if client_id.is_empty() {
            IdKey::Anonymous(tiers.key_by.key(ip))
        } else {
            IdKey::Id(id.get())
        });
        #[cfg(feature = "inspect")]
        if let Some(inspector) = &tiers.inspector {
            self.username = connect.username.map(Box::from);
            if let Some(will) = &connect.will {
                let msg = inspect::Message {
                    client_id,
                    username: connect.username,
                    topic: will.topic,
                    payload: will.payload,
                };
                let what = || {
                    format!(
                        "will to {:?} in CONNECT, {} bytes, QoS {}",
                        will.topic,
                        will.payload.len(),
                        will.qos
                    )
                };
                if settle(&inspector.inspect(&msg), self.addr, client_id, what) {
                    // Reported here as a block: the security layer need not report
                    // the refusal again.
                    crate::security::mark_reported();
                    return Err(MqttError::PayloadBlocked);
                }
            }
        }
        Ok(())
    }

    /// Checks a validated packet of `len` bytes after the CONNECT: forward it, drop it
    /// (queueing the gateway's answer, if any), or refuse the connection.
    pub(crate) fn check(&mut self, packet: &Packet<'_>, len: usize) -> Verdict {
        let Some(key) = &self.key else {
            return Verdict::Forward;
        };
        let tiers = &*self.policy.tiers;
        let (name, own) = match packet {
            Packet::Publish(_) => ("publish", Some((Tier::Publish, &tiers.publish))),
            Packet::Subscribe(_) => ("subscribe", Some((Tier::Subscribe, &tiers.subscribe))),
            Packet::Unsubscribe(_) => ("unsubscribe", None),
            Packet::PingReq => ("pingreq", None),
            // An answer to a packet of the broker's is free; one to nothing (an identifier
            // never used, say) costs the broker a lookup, often a reply and a log line,
            // and is charged as any other packet.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_)
                if self.ack_credit > 0 =>
            {
                self.ack_credit -= 1;
                return Verdict::Forward;
            }
            Packet::PubAck(_) => ("puback", None),
            Packet::PubRec(_) => ("pubrec", None),
            Packet::PubRel(_) => ("pubrel", None),
            Packet::PubComp(_) => ("pubcomp", None),
            _ => return Verdict::Forward,
        };
        let Some((over, overflow)) = tiers.first_over(key, own, len) else {
            #[cfg(feature = "inspect")]
            if let Packet::Publish(p) = packet {
                return self.inspect_publish(p);
            }
            return Verdict::Forward;
        };
        // Where the packet cannot be dropped, the connection is refused; by the overflow
        // bucket, that is no measure of this client's rate.
        let refusal = if overflow {
            MqttError::MessageOverflow
        } else {
            MqttError::MessageRate
        };
        let client_id = match key {
            IdKey::Id(id) => &**id,
            IdKey::Anonymous(_) => "",
        };
        let client_addr = self.addr;
        if let Some(why) = cannot_drop(packet, self.version) {
            tracing::debug!(
                client_id = ?client_id,
                client_addr = %client_addr,
                reason = over.label(),
                overflow,
                "mqtt {why} over the policy's limits: refused"
            );
            return Verdict::Refuse(refusal);
        }
        let answer = match packet {
            Packet::Publish(p) => {
                let v5_answer = tiers.v5_publish_answer && self.version == Version::V5;
                pub_answer(v5_answer, p, encode::reason::QUOTA_EXCEEDED)
                    .map(|(kind, bytes)| (kind, bytes.to_vec()))
            }
            Packet::Subscribe(filters) => {
                let code = if self.version == Version::V5 {
                    encode::reason::QUOTA_EXCEEDED
                } else {
                    encode::reason::V3_SUBACK_FAILURE
                };
                let codes = vec![code; filters.iter().count()];
                let mut suback = Vec::with_capacity(codes.len() + 8);
                encode::suback(&mut suback, self.version, filters.packet_id(), &codes);
                Some(("suback", suback))
            }
            _ => {
                tracing::debug!(
                    client_id = ?client_id,
                    client_addr = %client_addr,
                    packet = name,
                    reason = over.label(),
                    overflow,
                    "mqtt client over the policy's packet limits"
                );
                return Verdict::Refuse(refusal);
            }
        };
        let over = OverLimit {
            tier: over,
            packet: name,
        };
        metrics::dropped(name, over.label());
        tracing::debug!(
            client_id = ?client_id,
            client_addr = %client_addr,
            error = %over,
            reason = over.label(),
            overflow,
            "mqtt packet dropped by policy"
        );
        if let Some((kind, bytes)) = answer {
            queue_answer(&mut self.answers, self.max_packet_size, kind, &bytes);
        }
        Verdict::Drop
    }

    /// Inspects a PUBLISH within the rate tiers: forward it (passed or flagged) or drop
    /// it (blocked), queueing the answer of an MQTT 5 `QoS` 1 or 2 if asked to.
    #[cfg(feature = "inspect")]
    fn inspect_publish(&mut self, p: &crate::Publish<'_>) -> Verdict {
        let Self {
            policy,
            addr,
            key,
            version,
            max_packet_size,
            answers,
            ack_credit: _,
            username,
            aliases,
        } = self;
        let tiers = &*policy.tiers;
        let Some(inspector) = &tiers.inspector else {
            return Verdict::Forward;
        };
        let client_id = match key {
            Some(IdKey::Id(id)) => &**id,
            _ => "",
        };
        let topics = inspector.has_topic_rules();
        // An empty topic name comes with an MQTT 5 Topic Alias (the session checks).
        let topic = if p.topic.is_empty() {
            p.topic_alias.and_then(|a| aliases.get(a))
        } else {
            Some(p.topic)
        };
        let what = || {
            let topic = topic.unwrap_or("(unknown topic alias)");
            format!(
                "PUBLISH to {topic:?}, {} bytes, QoS {}",
                p.payload.len(),
                p.qos
            )
        };
        let outcome = match topic {
            None if topics => inspect::Outcome::Blocked(inspector.unknown_alias()),
            topic => inspector.inspect(&inspect::Message {
                client_id,
                username: username.as_deref(),
                topic: topic.unwrap_or(""),
                payload: p.payload,
            }),
        };
        if !settle(&outcome, *addr, client_id, what) {
            if let (true, Some(alias), false) = (topics, p.topic_alias, p.topic.is_empty()) {
                aliases.set(alias, p.topic);
            }
            return Verdict::Forward;
        }
        let by_topic = outcome
            .blocked_by()
            .is_some_and(|hit| !hit.kind().is_payload());
        if sets_alias(p) {
            // Reported here as a block: the security layer need not report the refusal
            // again.
            crate::security::mark_reported();
            return Verdict::Refuse(if by_topic {
                MqttError::NotAuthorized
            } else {
                MqttError::PayloadBlocked
            });
        }
        metrics::dropped("publish", "inspection");
        let reason = if by_topic {
            encode::reason::NOT_AUTHORIZED
        } else {
            encode::reason::PAYLOAD_FORMAT_INVALID
        };
        let v5_answer = tiers.v5_publish_answer && *version == Version::V5;
        if let Some((kind, bytes)) = pub_answer(v5_answer, p, reason) {
            queue_answer(answers, *max_packet_size, kind, &bytes);
        }
        Verdict::Drop
    }

    /// The gateway's answers waiting to be written.
    pub(crate) fn answers(&mut self) -> &mut Answers {
        &mut self.answers
    }

    /// The acknowledgement credit, for the layer to add one per `QoS` 1 or 2 PUBLISH,
    /// PUBREC and PUBREL the broker writes to the client; `None` without a `packets` or
    /// `bytes` tier, which are all an acknowledgement beyond it is charged to (nothing
    /// is counted then).
    pub(crate) fn ack_credit(&mut self) -> Option<&mut u16> {
        let tiers = &*self.policy.tiers;
        (tiers.packets.is_some() || tiers.bytes.is_some()).then_some(&mut self.ack_credit)
    }
}

/// An MQTT 5 PUBACK (`0x40`) or PUBREC (`0x50`) with a reason code (0x97 quota
/// exceeded, 0x87 not authorized, 0x99 payload format invalid) and no Property Length: a
/// Remaining Length under 4 means no properties (5.0 §3.4.2.2, §3.5.2.2).
const fn pub_refusal(first: u8, packet_id: u16, reason: u8) -> [u8; 5] {
    let id = packet_id.to_be_bytes();
    [first, 0x03, id[0], id[1], reason]
}

/// Why `packet`, over a limit, cannot be dropped with an answer and must end the
/// connection instead, if it cannot: MQTT 3.1's SUBACK has no failure code (0x80 came
/// with 3.1.1), and a PUBLISH that sets a Topic Alias must reach the broker
/// ([`sets_alias`]).
fn cannot_drop(packet: &Packet<'_>, version: Version) -> Option<&'static str> {
    match packet {
        Packet::Subscribe(_) if version == Version::V3_1 => Some("3.1 SUBSCRIBE"),
        Packet::Publish(p) if sets_alias(p) => Some("PUBLISH setting a topic alias"),
        _ => None,
    }
}

/// Whether `p` sets an MQTT 5 Topic Alias (a topic name with an alias). Such a PUBLISH
/// is never dropped: the broker would not learn the alias and would deliver the
/// client's next PUBLISH on it (an empty topic name) to the alias's old topic, or end
/// the connection for an unknown alias. Over a limit or blocked, it ends the
/// connection instead.
fn sets_alias(p: &crate::Publish<'_>) -> bool {
    p.topic_alias.is_some() && !p.topic.is_empty()
}

/// The gateway's answer to a dropped PUBLISH, if any: with `v5_answer`, a PUBACK
/// (`QoS` 1) or PUBREC (`QoS` 2) with `reason`; `QoS` 0 gets none. Without `v5_answer`
/// (3.x, or MQTT 5 by default) a `QoS` 1 or 2 gets none either, a deviation from 3.1.1
/// [MQTT-3.3.5-2] and 5.0 [MQTT-4.3.2-4] (see [Deviations](crate#deviations)).
///
/// A `QoS` 2 PUBLISH with DUP set gets none either: the broker may hold its packet
/// identifier from the first delivery, awaiting a PUBREL. A failure PUBREC would free
/// the identifier for the client (5.0 §4.3.3), and the broker would take the client's
/// next, different PUBLISH with that identifier for a duplicate and never deliver it
/// [MQTT-4.3.3-10]. A `QoS` 1 PUBLISH with DUP keeps its PUBACK: the broker keeps no
/// state for an inbound `QoS` 1 identifier.
fn pub_answer(
    v5_answer: bool,
    p: &crate::Publish<'_>,
    reason: u8,
) -> Option<(&'static str, [u8; 5])> {
    match p.qos {
        1 if v5_answer => Some(("puback", pub_refusal(0x40, p.packet_id, reason))),
        2 if v5_answer && !p.dup => Some(("pubrec", pub_refusal(0x50, p.packet_id, reason))),
        _ => None,
    }
}

/// Queues a gateway answer, or counts it unanswered when the queue is full or the answer
/// is larger than the client's Maximum Packet Size `max` (the server discards such a
/// packet [MQTT-3.1.2-25]).
fn queue_answer(answers: &mut Answers, max: Option<NonZeroU32>, kind: &'static str, bytes: &[u8]) {
    let queued = answers.as_ref().map_or(0, |q| q.len());
    let too_large =
        max.is_some_and(|max| u32::try_from(bytes.len()).map_or(true, |n| n > max.get()));
    if !too_large && queued + bytes.len() <= MAX_QUEUED_ANSWERS {
        answers
            .get_or_insert_with(Box::default)
            .extend_from_slice(bytes);
        metrics::synthesized(kind);
    } else {
        metrics::unanswered(kind);
    }
}

/// Counts, reports and logs what inspection decided about a message (`what` describes
/// it, never with its payload); `true` when it is blocked.
#[cfg(feature = "inspect")]
fn settle(
    outcome: &inspect::Outcome<'_>,
    addr: ClientAddr,
    client_id: &str,
    what: impl Fn() -> String,
) -> bool {
    use crate::security::{EventKind, Report, report};
    let (hits, kind) = match outcome {
        inspect::Outcome::Pass => return false,
        inspect::Outcome::Flagged(hits) => (&hits[..], EventKind::Flag),
        inspect::Outcome::Blocked(hit) => (std::slice::from_ref(hit), EventKind::Block),
    };
    for hit in hits {
        inspect::metrics::count(hit);
        let details = what();
        tracing::debug!(
            client_id = ?client_id,
            client_addr = %addr,
            rule = hit.rule(),
            action = hit.action().label(),
            severity = ?hit.severity(),
            details = %details,
            "mqtt message matched an inspection rule"
        );
        report(Report {
            layer: "inspect",
            kind,
            severity: hit.severity(),
            rule: Some(hit.rule()),
            details,
        });
    }
    kind == EventKind::Block
}

/// Consumes `n` written bytes of the answers, letting go of the buffer once empty.
pub(crate) fn written(answers: &mut Answers, n: usize) {
    if let Some(q) = answers {
        q.advance(n);
        if q.is_empty() {
            *answers = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::SharedId;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    /// A CONNECT with just a client id and a version.
    pub(crate) fn connect(client_id: &str, version: Version) -> Connect<'_> {
        Connect {
            version,
            clean_session: true,
            keep_alive: 60,
            client_id,
            will: None,
            username: None,
            password: None,
            session_expiry: 0,
            auth_method: None,
            max_packet_size: None,
        }
    }

    #[test]
    fn labels_are_stable() {
        let labels = [
            Tier::Connect,
            Tier::Publish,
            Tier::Subscribe,
            Tier::Packets,
            Tier::Bytes,
        ]
        .map(Tier::label);
        assert_eq!(
            labels,
            [
                "connect_rate",
                "publish_rate",
                "subscribe_rate",
                "packet_rate",
                "byte_rate"
            ]
        );
        let over = OverLimit {
            tier: Tier::Bytes,
            packet: "publish",
        };
        assert_eq!(over.to_string(), "publish over the bytes limit");
        assert_eq!(over.label(), "byte_rate");
    }

    #[test]
    fn connect_rate_answers_per_version_and_phase() {
        use aegis_core::error::Reject;

        use crate::Phase;
        let e = MqttError::ConnectRate;
        assert_eq!(e.label(), "connect_rate");
        let at_connect = |v| e.answer(Phase::Connect(Some(v))).bytes();
        assert_eq!(at_connect(Version::V3_1), [0x20, 0x02, 0x00, 0x05]);
        assert_eq!(at_connect(Version::V3_1_1), [0x20, 0x02, 0x00, 0x05]);
        assert_eq!(at_connect(Version::V5), [0x20, 0x03, 0x00, 0x9F, 0x00]);
        assert!(e.answer(Phase::Connect(None)).bytes().is_empty());
        let later = |v| e.answer(Phase::Connected(v)).bytes();
        assert_eq!(later(Version::V5), [0xE0, 0x02, 0x9F, 0x00]);
        assert!(later(Version::V3_1_1).is_empty());
    }

    /// With `max_keys` reached, a new address's CONNECT and a new client id's packet
    /// are limited in the tier's shared overflow bucket; refused there, they are
    /// `connect_overflow` and `message_overflow` (answered as `connect_rate` and
    /// `message_rate`), which a ban detector does not count. A tracked key over its own
    /// budget is still `connect_rate` / `message_rate`. Before, both were the latter.
    #[tokio::test(start_paused = true)]
    async fn overflow_refusals_are_told_apart_and_answered_as_the_rate_refusals() {
        use aegis_core::error::Reject;

        use crate::Phase;
        let policy = Policy::builder()
            .connect_per_addr(Quota::per_minute(nz(1)))
            .packets_per_client(Quota::per_minute(nz(1)))
            .max_keys(1)
            .build();
        let connected = |addr: &str, id: &'static str| {
            let mut c = ConnPolicy::new(policy.clone(), ClientAddr(addr.parse().unwrap()));
            let r = c.on_connect(&connect(id, Version::V5), &mut SharedId::new(id));
            (c, r)
        };
        // The one slot of each tier goes to 192.0.2.1 and to client id "a".
        let (mut a, r) = connected("192.0.2.1:1", "a");
        assert_eq!(r, Ok(()));
        assert!(matches!(a.check(&Packet::PingReq, 2), Verdict::Forward));
        // A new address: the overflow bucket's one CONNECT, then it is drained.
        let (mut b, r) = connected("192.0.2.2:1", "b");
        assert_eq!(r, Ok(()));
        assert_eq!(
            connected("192.0.2.3:1", "c").1,
            Err(MqttError::ConnectOverflow)
        );
        // The tracked address over its own budget.
        assert_eq!(connected("192.0.2.1:2", "d").1, Err(MqttError::ConnectRate));
        // Client id "b" is not tracked: its packets share the overflow bucket.
        assert!(matches!(b.check(&Packet::PingReq, 2), Verdict::Forward));
        assert!(matches!(
            b.check(&Packet::PingReq, 2),
            Verdict::Refuse(MqttError::MessageOverflow)
        ));
        assert!(matches!(
            a.check(&Packet::PingReq, 2),
            Verdict::Refuse(MqttError::MessageRate)
        ));
        assert_eq!(policy.tracked_keys(Tier::Connect), 1);
        assert_eq!(policy.tracked_keys(Tier::Packets), 1);
        // Labelled apart, answered alike.
        assert_eq!(MqttError::ConnectOverflow.label(), "connect_overflow");
        assert_eq!(MqttError::MessageOverflow.label(), "message_overflow");
        for v in [Version::V3_1, Version::V3_1_1, Version::V5] {
            for phase in [Phase::Connect(Some(v)), Phase::Connected(v)] {
                let pairs = [
                    (MqttError::ConnectOverflow, MqttError::ConnectRate),
                    (MqttError::MessageOverflow, MqttError::MessageRate),
                ];
                for (overflow, rate) in pairs {
                    assert_eq!(
                        overflow.answer(phase),
                        rate.answer(phase),
                        "{v:?} {phase:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn pub_refusals_have_remaining_length_3() {
        assert_eq!(
            pub_refusal(0x40, 0x1234, 0x97),
            [0x40, 0x03, 0x12, 0x34, 0x97]
        );
        assert_eq!(pub_refusal(0x50, 7, 0x87), [0x50, 0x03, 0x00, 0x07, 0x87]);
    }

    #[tokio::test(start_paused = true)]
    async fn every_tier_forgets_idle_keys_as_often_as_told() {
        let tiers = [Tier::Connect, Tier::Packets];
        let tracked = |p: &Policy| tiers.map(|t| p.tracked_keys(t));
        let addr = ClientAddr("192.0.2.9:1000".parse().unwrap());
        for (every, kept_at_31s) in [(None, false), (Some(Duration::from_secs(3600)), true)] {
            let mut b = Policy::builder()
                .connect_per_addr(Quota::per_second(nz(1)))
                .packets_per_client(Quota::per_second(nz(1)));
            if let Some(every) = every {
                b = b.evict_every(every);
            }
            let policy = b.build();
            let mut conn = ConnPolicy::new(policy.clone(), addr);
            let id = connect("c", Version::V3_1_1);
            assert_eq!(conn.on_connect(&id, &mut SharedId::new("c")), Ok(()));
            assert!(matches!(conn.check(&Packet::PingReq, 2), Verdict::Forward));
            assert_eq!(tracked(&policy), [1, 1]);
            // Idle after a second; the default pass runs at 30 s.
            tokio::time::sleep(Duration::from_secs(31)).await;
            let kept = if kept_at_31s { [1, 1] } else { [0, 0] };
            assert_eq!(tracked(&policy), kept, "every {every:?}");
            tokio::time::sleep(Duration::from_secs(3600)).await;
            assert_eq!(tracked(&policy), [0, 0], "every {every:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn empty_client_ids_key_on_the_address_and_mapped_v6_folds() {
        let policy = Policy::builder()
            .connect_per_addr(Quota::per_minute(nz(1)))
            .packets_per_client(Quota::per_minute(nz(1)))
            .build();
        let v4 = ClientAddr("192.0.2.9:1000".parse().unwrap());
        let mapped = ClientAddr("[::ffff:192.0.2.9]:2000".parse().unwrap());
        let mut a = ConnPolicy::new(policy.clone(), v4);
        assert_eq!(
            a.on_connect(&connect("", Version::V5), &mut SharedId::new("")),
            Ok(())
        );
        // The same address through an IPv4-mapped IPv6 socket is the same key.
        let mut b = ConnPolicy::new(policy.clone(), mapped);
        assert_eq!(
            b.on_connect(&connect("", Version::V5), &mut SharedId::new("")),
            Err(MqttError::ConnectRate)
        );
        assert!(matches!(a.check(&Packet::PingReq, 2), Verdict::Forward));
        // Another anonymous connection from that address shares the budget.
        let mut c = ConnPolicy::new(policy.clone(), v4);
        c.version = Version::V5;
        c.key = Some(IdKey::Anonymous(KeyBy::default().key(v4.0.ip())));
        assert!(matches!(
            c.check(&Packet::PingReq, 2),
            Verdict::Refuse(MqttError::MessageRate)
        ));
        assert_eq!(policy.tracked_keys(Tier::Connect), 1);
        assert_eq!(policy.tracked_keys(Tier::Packets), 1);
        assert_eq!(policy.tracked_keys(Tier::Publish), 0);
        assert_eq!(policy.quota(Tier::Publish), None);
    }

    #[cfg(feature = "inspect")]
    #[test]
    fn aliases_are_bounded_by_entries_not_only_topic_bytes() {
        let mut a = Aliases::default();
        assert!(
            a.0.is_none() && a.get(1).is_none(),
            "no table until an alias is set"
        );
        for alias in 1..=u16::MAX {
            a.set(alias, "t");
        }
        let most = MAX_ALIAS_BYTES / (1 + ALIAS_ENTRY_BYTES);
        let m = a.0.as_ref().unwrap();
        assert_eq!(m.map.len(), most);
        assert!(m.bytes <= MAX_ALIAS_BYTES);
        // Setting a recorded alias again, to a longer topic, frees its old cost first.
        a.set(1, "longer");
        assert_eq!(a.get(1), Some("longer"));
        assert!(a.0.as_ref().unwrap().bytes <= MAX_ALIAS_BYTES);
    }

    /// The acknowledgements that answer the broker's packets (within the credit that
    /// the layer counts from them) are free; one beyond the credit (an identifier the
    /// broker never used) is charged to `packets` and `bytes` as a PINGREQ is, and
    /// refused as a PINGREQ over them is. DISCONNECT and AUTH are never limited. Before,
    /// every acknowledgement was forwarded free: 100,000 PUBRECs for unused identifiers
    /// went to the broker past a `packets` burst of 5.
    #[test]
    fn acks_within_the_credit_are_free_and_beyond_it_charged() {
        use crate::Phase;
        let policy = Policy::builder()
            .packets_per_client(Quota::per_hour(nz(2)))
            .bytes_per_client(Quota::per_hour(nz(1000)))
            .build();
        let conn = |id: &str| {
            let mut p = ConnPolicy::new(policy.clone(), ClientAddr("192.0.2.1:1".parse().unwrap()));
            p.key = Some(IdKey::Id(Arc::from(id)));
            p
        };
        let acks = [
            Packet::PubAck(1),
            Packet::PubRec(2),
            Packet::PubRel(3),
            Packet::PubComp(4),
        ];
        // Credit for four of the broker's packets: four acknowledgements, uncharged.
        let mut a = conn("a");
        *a.ack_credit().unwrap() += 4;
        for packet in &acks {
            assert!(matches!(a.check(packet, 4), Verdict::Forward));
        }
        assert_eq!(a.ack_credit, 0);
        // The burst is whole: two PINGREQs pass.
        assert!(matches!(a.check(&Packet::PingReq, 2), Verdict::Forward));
        assert!(matches!(a.check(&Packet::PingReq, 2), Verdict::Forward));
        // No credit left, nor budget: every acknowledgement is refused, as a PINGREQ,
        // while DISCONNECT and AUTH still pass.
        for packet in &acks {
            match a.check(packet, 4) {
                Verdict::Refuse(e) => {
                    assert_eq!(e, MqttError::MessageRate);
                    assert_eq!(
                        e.answer(Phase::Connected(Version::V5)).bytes(),
                        [0xE0, 0x02, 0x96, 0x00]
                    );
                    assert!(
                        e.answer(Phase::Connected(Version::V3_1_1))
                            .bytes()
                            .is_empty()
                    );
                }
                v => panic!("{packet:?} beyond the credit and the burst: {v:?}"),
            }
        }
        assert!(matches!(a.check(&Packet::PingReq, 2), Verdict::Refuse(_)));
        for packet in [Packet::Disconnect(0), Packet::Auth(0x18)] {
            assert!(matches!(a.check(&packet, 4), Verdict::Forward));
        }
        // Without credit, acknowledgements take the burst (a resumed session's PUBREL is
        // charged, not refused): two pass, then no PINGREQ does.
        let mut b = conn("b");
        assert!(matches!(b.check(&Packet::PubRel(7), 4), Verdict::Forward));
        assert!(matches!(b.check(&Packet::PubRel(8), 4), Verdict::Forward));
        assert!(matches!(b.check(&Packet::PingReq, 2), Verdict::Refuse(_)));
        // Charged to `bytes` too: within the packets burst, over the bytes one.
        let mut c = conn("c");
        assert!(matches!(
            c.check(&Packet::PubAck(1), 1001),
            Verdict::Refuse(_)
        ));
    }

    /// Without a `packets` or `bytes` tier nothing is counted, and acknowledgements stay
    /// free: the other tiers do not count them.
    #[test]
    fn without_packets_or_bytes_tiers_acks_are_not_counted() {
        let policy = Policy::builder()
            .publish_per_client(Quota::per_hour(nz(1)))
            .subscribe_per_client(Quota::per_hour(nz(1)))
            .build();
        let mut p = ConnPolicy::new(policy, ClientAddr("192.0.2.1:1".parse().unwrap()));
        p.key = Some(IdKey::Id(Arc::from("c")));
        assert!(p.ack_credit().is_none());
        for id in 1..=1000 {
            assert!(matches!(p.check(&Packet::PubRec(id), 4), Verdict::Forward));
        }
    }
}
