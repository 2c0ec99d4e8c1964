//! Validation of every client packet after the CONNECT.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::OnceLock;

use crate::error::Limit;
use crate::properties::{self, Ctx, ServerLimits};
use crate::reader::Reader;
use crate::topic::{FilterKind, check_topic_filter, check_topic_name};
use crate::{MqttError, Version};

/// A validated client packet, borrowing the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Packet<'a> {
    /// The CONNECT (only ever the first packet).
    Connect(crate::Connect<'a>),
    /// PUBLISH.
    Publish(Publish<'a>),
    /// PUBACK with its packet identifier.
    PubAck(u16),
    /// PUBREC with its packet identifier.
    PubRec(u16),
    /// PUBREL with its packet identifier.
    PubRel(u16),
    /// PUBCOMP with its packet identifier.
    PubComp(u16),
    /// SUBSCRIBE.
    Subscribe(Filters<'a>),
    /// UNSUBSCRIBE.
    Unsubscribe(Filters<'a>),
    /// PINGREQ.
    PingReq,
    /// DISCONNECT with its reason code (0 for 3.x).
    Disconnect(u8),
    /// MQTT 5 AUTH with its reason code.
    Auth(u8),
}

/// A validated PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Publish<'a> {
    /// The DUP flag.
    pub dup: bool,
    /// `QoS` 0 to 2.
    pub qos: u8,
    /// The RETAIN flag.
    pub retain: bool,
    /// The Topic Name (empty only with an MQTT 5 Topic Alias).
    pub topic: &'a str,
    /// The packet identifier (0 for `QoS` 0).
    pub packet_id: u16,
    /// MQTT 5 Topic Alias.
    pub topic_alias: Option<u16>,
    /// The application payload.
    pub payload: &'a [u8],
}

/// The validated filters of a SUBSCRIBE or UNSUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filters<'a> {
    packet_id: u16,
    with_options: bool,
    payload: &'a [u8],
}

impl<'a> Filters<'a> {
    /// The packet identifier.
    pub const fn packet_id(&self) -> u16 {
        self.packet_id
    }

    /// Each filter with its subscription options byte (0 for UNSUBSCRIBE).
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, u8)> + 'a {
        let mut r = Reader::new(self.payload);
        let with_options = self.with_options;
        std::iter::from_fn(move || {
            if r.is_empty() {
                return None;
            }
            // Validated already: these reads cannot fail.
            let filter = r.string().ok()?;
            let options = if with_options { r.u8().ok()? } else { 0 };
            Some((filter, options))
        })
    }
}

/// The MQTT 5 Authentication Method a CONNECT chose, as the session keeps it to compare
/// each AUTH's with ([MQTT-4.12.0-5], [MQTT-4.12.1-1]): a 32-bit `SipHash` of the string
/// under a key drawn at random once per process, not a copy.
///
/// Why a hash: it is four bytes, which fit in the padding the [`Session`](crate::Session)
/// already had, so no session (and no `MqttIo`, held by every connection) grows, and it
/// needs no allocation; a copy would be 16 bytes more a session (a `Box<str>`; 8 for a
/// boxed box, and two allocations), for the rare connection with enhanced
/// authentication. Its cost is that another method passes with a chance of 2^-32 per
/// AUTH; as the key is secret and random, a client cannot search for a colliding method
/// offline, each wrong guess closes its connection, and what a collision gets it is
/// what every AUTH got before this check: the broker, which leads the exchange, sees
/// the method itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AuthMethod(NonZeroU32);

impl AuthMethod {
    pub(crate) fn of(method: &str) -> Self {
        static KEY: OnceLock<RandomState> = OnceLock::new();
        let h = KEY.get_or_init(RandomState::new).hash_one(method);
        // The two halves folded together; 0, which `NonZeroU32` cannot hold, becomes 1.
        let folded = (h ^ (h >> 32)) & u64::from(u32::MAX);
        let folded = u32::try_from(folded).unwrap_or(u32::MAX);
        Self(NonZeroU32::new(folded).unwrap_or(NonZeroU32::MIN))
    }
}

/// What the validators need to know about the connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx5 {
    pub(crate) version: Version,
    pub(crate) session_expiry_zero: bool,
    /// The CONNECT's Authentication Method, if it chose one.
    pub(crate) auth_method: Option<AuthMethod>,
    /// What the broker's CONNACK announced, once seen.
    pub(crate) limits: Option<ServerLimits>,
    /// Whether the broker's CONNACK has gone to the client.
    pub(crate) connack_sent: bool,
}

/// A packet's reason codes (MQTT 5.0), split by who may send them: every code of the
/// packet's table is in `client` or `server_only`. This module validates what a client
/// sends, so a server-only code is a protocol error, `server_only_error`.
struct Codes {
    /// The codes a client may send.
    client: &'static [u8],
    /// The codes of the packet's table that only a server sends.
    server_only: &'static [u8],
    /// The refusal of a code of `server_only` from a client.
    server_only_error: &'static str,
}

/// PUBACK and PUBREC (§3.4.2.1, §3.5.2.1): all from the receiver of the PUBLISH, a client
/// too, but 0x10 No matching subscribers, "sent only by the Server".
const ACK_CODES: Codes = Codes {
    client: &[0x00, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99],
    server_only: &[0x10],
    server_only_error: "PUBACK or PUBREC reason code 0x10 (No matching subscribers) is the server's",
};
/// PUBREL and PUBCOMP (§3.6.2.1, §3.7.2.1): both codes from either side.
const REL_CODES: Codes = Codes {
    client: &[0x00, 0x92],
    server_only: &[],
    server_only_error: "",
};
/// AUTH (§3.15.2.1, Table 3-11): 0x00 Success is sent by the server, 0x18 Continue
/// authentication by either, 0x19 Re-authenticate by the client (only after the
/// CONNACK: checked in [`validate`]).
const AUTH_CODES: Codes = Codes {
    client: &[0x18, 0x19],
    server_only: &[0x00],
    server_only_error: "AUTH reason code 0x00 (Success) is the server's",
};
/// DISCONNECT (§3.14.2.1, Table 3-10), by its "Sent by" column.
const DISCONNECT_CODES: Codes = Codes {
    client: &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
    ],
    server_only: &[
        0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ],
    server_only_error: "DISCONNECT reason code only the server may send",
};

/// Validates a packet after the CONNECT, given its fixed header byte and body.
pub(crate) fn validate(first: u8, body: &[u8], ctx: Ctx5) -> Result<Packet<'_>, MqttError> {
    let v5 = ctx.version == Version::V5;
    let flags = first & 0x0F;
    let kind = first >> 4;
    let expected_flags = match kind {
        3 => return publish(flags, body, v5, ctx.limits),
        // MQTT 3.1 sets DUP (bit 3) when it sends a PUBREL, SUBSCRIBE or UNSUBSCRIBE
        // again (3.1 §2.1, "DUP"); 3.1.1 and 5.0 reserve it. QoS stays 1 either way.
        6 | 8 | 10 if ctx.version == Version::V3_1 && flags & 0x08 != 0 => 0b1010,
        6 | 8 | 10 => 0b0010,
        4 | 5 | 7 | 12 | 14 => 0,
        15 if v5 => 0,
        1 => return Err(MqttError::ProtocolError("second CONNECT")),
        2 | 9 | 11 | 13 => {
            return Err(MqttError::ProtocolError(
                "server-to-client packet type from a client",
            ));
        }
        _ => return Err(MqttError::Malformed("reserved packet type")),
    };
    if flags != expected_flags {
        return Err(MqttError::Malformed("reserved fixed-header flags set"));
    }
    let mut r = Reader::new(body);
    match kind {
        4..=7 => {
            let id = packet_id(&mut r)?;
            if v5 {
                let codes = if matches!(kind, 4 | 5) {
                    &ACK_CODES
                } else {
                    &REL_CODES
                };
                reason_and_props(&mut r, codes, Ctx::Ack)?;
            }
            end(&r)?;
            Ok(match kind {
                4 => Packet::PubAck(id),
                5 => Packet::PubRec(id),
                6 => Packet::PubRel(id),
                _ => Packet::PubComp(id),
            })
        }
        8 => subscribe(r, v5, ctx.limits).map(Packet::Subscribe),
        10 => unsubscribe(r, v5).map(Packet::Unsubscribe),
        12 => end(&r).map(|()| Packet::PingReq),
        14 => {
            let mut code = 0;
            if v5 {
                let (c, props) = reason_and_props(&mut r, &DISCONNECT_CODES, Ctx::Disconnect)?;
                if ctx.session_expiry_zero && props.session_expiry.is_some_and(|s| s != 0) {
                    return Err(MqttError::ProtocolError(
                        "non-zero session expiry in DISCONNECT after 0 in CONNECT",
                    ));
                }
                code = c;
            }
            end(&r)?;
            Ok(Packet::Disconnect(code))
        }
        _ => {
            // AUTH, MQTT 5 only.
            let Some(expected) = ctx.auth_method else {
                return Err(MqttError::ProtocolError(
                    "AUTH without an authentication method in CONNECT",
                ));
            };
            // An empty AUTH is 0x00 Success, which a client may not send: refused here.
            let (code, props) = reason_and_props(&mut r, &AUTH_CODES, Ctx::Auth)?;
            end(&r)?;
            let Some(method) = props.auth_method else {
                return Err(MqttError::ProtocolError(
                    "AUTH without an authentication method",
                ));
            };
            // [MQTT-4.12.0-5], and for a re-authentication [MQTT-4.12.1-1]: the same
            // method as the CONNECT's.
            if AuthMethod::of(method) != expected {
                return Err(MqttError::ProtocolError(
                    "AUTH with an authentication method other than the CONNECT's",
                ));
            }
            // A re-authentication starts only after the CONNACK (§4.12.1); before it, the
            // client's AUTH answers the server's, with 0x18 [MQTT-4.12.0-3].
            if code == 0x19 && !ctx.connack_sent {
                return Err(MqttError::ProtocolError(
                    "AUTH reason code 0x19 (Re-authenticate) before the CONNACK",
                ));
            }
            Ok(Packet::Auth(code))
        }
    }
}

fn packet_id(r: &mut Reader<'_>) -> Result<u16, MqttError> {
    match r.u16()? {
        0 => Err(MqttError::ProtocolError("packet identifier 0")),
        id => Ok(id),
    }
}

fn end(r: &Reader<'_>) -> Result<(), MqttError> {
    if r.is_empty() {
        Ok(())
    } else {
        Err(MqttError::Malformed(
            "remaining length does not match the packet",
        ))
    }
}

/// MQTT 5 reason code and properties, both optional at the end of a packet (an absent
/// reason code is 0x00, checked like a present one).
fn reason_and_props<'a>(
    r: &mut Reader<'a>,
    codes: &Codes,
    ctx: Ctx,
) -> Result<(u8, properties::Props<'a>), MqttError> {
    let code = if r.is_empty() { 0 } else { r.u8()? };
    if !codes.client.contains(&code) {
        return Err(MqttError::ProtocolError(
            if codes.server_only.contains(&code) {
                codes.server_only_error
            } else {
                "reason code not valid for this packet"
            },
        ));
    }
    let props = if r.is_empty() {
        properties::Props::default()
    } else {
        properties::read(r, ctx)?
    };
    Ok((code, props))
}

fn publish(
    flags: u8,
    body: &[u8],
    v5: bool,
    limits: Option<ServerLimits>,
) -> Result<Packet<'_>, MqttError> {
    let qos = (flags >> 1) & 0x03;
    let dup = flags & 0x08 != 0;
    if qos == 3 {
        return Err(MqttError::Malformed("PUBLISH QoS 3"));
    }
    if dup && qos == 0 {
        return Err(MqttError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let mut r = Reader::new(body);
    let topic = r.string()?;
    let packet_id = if qos > 0 { packet_id(&mut r)? } else { 0 };
    let topic_alias = if v5 {
        properties::read(&mut r, Ctx::Publish)?.topic_alias
    } else {
        None
    };
    match (topic.is_empty(), topic_alias.is_some()) {
        // 5.0 §3.3.2.1: the topic comes from the alias.
        (true, true) => {}
        // "It is a Protocol Error if the Topic Name is zero length and there is no Topic
        // Alias" (5.0 §3.3.2.1); 3.x closes for any invalid name.
        (true, false) if v5 => {
            return Err(MqttError::ProtocolError(
                "empty topic name without a topic alias",
            ));
        }
        _ => check_topic_name(topic)?,
    }
    if let Some(l) = limits {
        if qos > l.max_qos {
            return Err(MqttError::ServerLimit(Limit::QoS));
        }
        if flags & 0x01 != 0 && !l.retain {
            return Err(MqttError::ServerLimit(Limit::Retain));
        }
        if topic_alias.is_some_and(|a| a > l.topic_alias_max) {
            return Err(MqttError::ServerLimit(Limit::TopicAlias));
        }
    }
    Ok(Packet::Publish(Publish {
        dup,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        packet_id,
        topic_alias,
        payload: r.rest(),
    }))
}

fn subscribe(
    mut r: Reader<'_>,
    v5: bool,
    limits: Option<ServerLimits>,
) -> Result<Filters<'_>, MqttError> {
    let packet_id = packet_id(&mut r)?;
    if v5 {
        let props = properties::read(&mut r, Ctx::Subscribe)?;
        if props.subscription_id.is_some() && limits.is_some_and(|l| !l.subscription_ids) {
            return Err(MqttError::ServerLimit(Limit::SubscriptionId));
        }
    }
    let payload = r;
    if r.is_empty() {
        return Err(MqttError::ProtocolError("SUBSCRIBE without a topic filter"));
    }
    while !r.is_empty() {
        let filter = r.string()?;
        let kind = check_topic_filter(filter, v5)?;
        if let Some(l) = limits {
            if kind == FilterKind::Shared && !l.shared {
                return Err(MqttError::ServerLimit(Limit::Shared));
            }
            if !l.wildcard && filter.bytes().any(|b| b == b'+' || b == b'#') {
                return Err(MqttError::ServerLimit(Limit::Wildcard));
            }
        }
        let options = r.u8()?;
        if v5 {
            if options & 0xC0 != 0 {
                return Err(MqttError::Malformed(
                    "reserved subscription option bits set",
                ));
            }
            // §3.8.3.1: "It is a Protocol Error if the Maximum QoS field has the value 3."
            if options & 0x03 == 3 {
                return Err(MqttError::ProtocolError("subscription QoS 3"));
            }
            if (options >> 4) & 0x03 == 3 {
                return Err(MqttError::ProtocolError("retain handling 3"));
            }
            if kind == FilterKind::Shared && options & 0x04 != 0 {
                return Err(MqttError::ProtocolError(
                    "no local on a shared subscription",
                ));
            }
        } else if options > 2 {
            return Err(MqttError::Malformed(
                "requested QoS over 2 or reserved bits set",
            ));
        }
    }
    Ok(Filters {
        packet_id,
        with_options: true,
        payload: payload.rest_view(),
    })
}

fn unsubscribe(mut r: Reader<'_>, v5: bool) -> Result<Filters<'_>, MqttError> {
    let packet_id = packet_id(&mut r)?;
    if v5 {
        properties::read(&mut r, Ctx::Unsubscribe)?;
    }
    let payload = r;
    if r.is_empty() {
        return Err(MqttError::ProtocolError(
            "UNSUBSCRIBE without a topic filter",
        ));
    }
    while !r.is_empty() {
        check_topic_filter(r.string()?, v5)?;
    }
    Ok(Filters {
        packet_id,
        with_options: false,
        payload: payload.rest_view(),
    })
}
