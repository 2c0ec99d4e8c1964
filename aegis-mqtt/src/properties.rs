//! MQTT 5 property lists (§2.2.2): known identifiers, types, duplicates, values (private).

use std::num::NonZeroU32;

use crate::MqttError;
use crate::reader::{Reader, utf8};

/// Where a property list appears; each has its own allowed identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ctx {
    Connect,
    Will,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Auth,
}

const fn bit(id: u8) -> u64 {
    1 << id
}

// Identifiers a client may send in each context (§2.2.2.2, Table 2-4). Subscription
// Identifier in PUBLISH and Server Reference in DISCONNECT are valid identifiers for the
// packet but server-only; they are listed so that they fail as protocol errors.
const CONNECT: u64 = bit(0x11)
    | bit(0x15)
    | bit(0x16)
    | bit(0x17)
    | bit(0x19)
    | bit(0x21)
    | bit(0x22)
    | bit(0x26)
    | bit(0x27);
const WILL: u64 = bit(0x01) | bit(0x02) | bit(0x03) | bit(0x08) | bit(0x09) | bit(0x18) | bit(0x26);
const PUBLISH: u64 =
    bit(0x01) | bit(0x02) | bit(0x03) | bit(0x08) | bit(0x09) | bit(0x0B) | bit(0x23) | bit(0x26);
const ACK: u64 = bit(0x1F) | bit(0x26);
const SUBSCRIBE: u64 = bit(0x0B) | bit(0x26);
const UNSUBSCRIBE: u64 = bit(0x26);
const DISCONNECT: u64 = bit(0x11) | bit(0x1C) | bit(0x1F) | bit(0x26);
const AUTH: u64 = bit(0x15) | bit(0x16) | bit(0x1F) | bit(0x26);

const USER_PROPERTY: u8 = 0x26;

/// What a property list tells the validators.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Props<'a> {
    pub(crate) session_expiry: Option<u32>,
    pub(crate) auth_method: Option<&'a str>,
    pub(crate) topic_alias: Option<u16>,
    pub(crate) subscription_id: Option<u32>,
    /// CONNECT: the Maximum Packet Size the client accepts (never 0).
    pub(crate) max_packet_size: Option<NonZeroU32>,
}

/// Reads a property length and the list after it, checking every property.
#[allow(clippy::too_many_lines)] // one arm per property identifier
pub(crate) fn read<'a>(r: &mut Reader<'a>, ctx: Ctx) -> Result<Props<'a>, MqttError> {
    let len = r.varint()? as usize;
    if len > r.len() {
        return Err(MqttError::Malformed(
            "property length past the end of the packet",
        ));
    }
    let mut list = Reader::new(r.bytes(len)?);
    let allowed = match ctx {
        Ctx::Connect => CONNECT,
        Ctx::Will => WILL,
        Ctx::Publish => PUBLISH,
        Ctx::Ack => ACK,
        Ctx::Subscribe => SUBSCRIBE,
        Ctx::Unsubscribe => UNSUBSCRIBE,
        Ctx::Disconnect => DISCONNECT,
        Ctx::Auth => AUTH,
    };
    let mut seen = 0u64;
    let mut props = Props::default();
    let mut has_auth_data = false;
    while !list.is_empty() {
        // Property identifiers are Variable Byte Integers; every defined one fits in 7 bits.
        let id = list.varint()?;
        let id = u8::try_from(id)
            .ok()
            .filter(|&id| id < 64 && allowed & bit(id) != 0)
            .ok_or(MqttError::Malformed("property not valid in this packet"))?;
        if id != USER_PROPERTY {
            if seen & bit(id) != 0 {
                return Err(MqttError::ProtocolError("property included more than once"));
            }
            seen |= bit(id);
        }
        match id {
            // Byte properties whose only values are 0 and 1.
            0x01 | 0x17 | 0x19 => {
                if list.u8()? > 1 {
                    return Err(MqttError::ProtocolError("property value other than 0 or 1"));
                }
            }
            // Four Byte Integers.
            0x02 | 0x18 => {
                list.u32()?;
            }
            0x11 => props.session_expiry = Some(list.u32()?),
            0x27 => {
                let v = NonZeroU32::new(list.u32()?)
                    .ok_or(MqttError::ProtocolError("maximum packet size of 0"))?;
                props.max_packet_size = Some(v);
            }
            // UTF-8 strings.
            0x03 | 0x1F => {
                list.string()?;
            }
            0x08 => {
                let topic = list.string()?;
                crate::topic::check_topic_name(topic)?;
            }
            0x15 => props.auth_method = Some(list.string()?),
            // Binary data.
            0x09 => {
                list.binary()?;
            }
            0x16 => {
                list.binary()?;
                has_auth_data = true;
            }
            0x0B => {
                if ctx == Ctx::Publish {
                    return Err(MqttError::ProtocolError(
                        "subscription identifier in a PUBLISH from a client",
                    ));
                }
                let v = list.varint()?;
                if v == 0 {
                    return Err(MqttError::ProtocolError("subscription identifier of 0"));
                }
                props.subscription_id = Some(v);
            }
            0x1C => {
                return Err(MqttError::ProtocolError("server reference from a client"));
            }
            0x21 => {
                if list.u16()? == 0 {
                    return Err(MqttError::ProtocolError("receive maximum of 0"));
                }
            }
            0x22 => {
                list.u16()?;
            }
            0x23 => {
                let alias = list.u16()?;
                if alias == 0 {
                    return Err(MqttError::ProtocolError("topic alias of 0"));
                }
                props.topic_alias = Some(alias);
            }
            USER_PROPERTY => {
                utf8(list.binary()?)?;
                utf8(list.binary()?)?;
            }
            _ => return Err(MqttError::Malformed("property not valid in this packet")),
        }
    }
    if has_auth_data && props.auth_method.is_none() {
        return Err(MqttError::ProtocolError(
            "authentication data without an authentication method",
        ));
    }
    Ok(props)
}

/// What an MQTT 5 CONNACK announces that binds the client (§3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // one flag per CONNACK property
pub(crate) struct ServerLimits {
    pub(crate) max_qos: u8,
    pub(crate) retain: bool,
    pub(crate) topic_alias_max: u16,
    pub(crate) max_packet_size: Option<u32>,
    pub(crate) wildcard: bool,
    pub(crate) subscription_ids: bool,
    pub(crate) shared: bool,
    pub(crate) keep_alive: Option<u16>,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_qos: 2,
            retain: true,
            topic_alias_max: 0,
            max_packet_size: None,
            wildcard: true,
            subscription_ids: true,
            shared: true,
            keep_alive: None,
        }
    }
}

/// Reads the limits from a CONNACK's body (after the fixed header); `None` if the body
/// is not a well-formed MQTT 5 CONNACK, in which case nothing is enforced.
pub(crate) fn connack_limits(body: &[u8]) -> Option<ServerLimits> {
    let mut r = Reader::new(body);
    let _flags = r.u8().ok()?;
    let _reason = r.u8().ok()?;
    let len = r.varint().ok()? as usize;
    let mut list = Reader::new(r.bytes(len).ok()?);
    let mut l = ServerLimits::default();
    while !list.is_empty() {
        match list.varint().ok()? {
            0x11 => {
                list.u32().ok()?;
            }
            0x27 => l.max_packet_size = Some(list.u32().ok()?),
            0x13 => l.keep_alive = Some(list.u16().ok()?),
            0x21 => {
                list.u16().ok()?;
            }
            0x22 => l.topic_alias_max = list.u16().ok()?,
            0x24 => l.max_qos = list.u8().ok()?.min(2),
            0x25 => l.retain = list.u8().ok()? != 0,
            0x28 => l.wildcard = list.u8().ok()? != 0,
            0x29 => l.subscription_ids = list.u8().ok()? != 0,
            0x2A => l.shared = list.u8().ok()? != 0,
            // Strings (skipped, not checked: the broker's own strings are its business,
            // and a reason string with a control character must not leave the limits
            // unenforced) and binary data, which the limits do not need.
            0x12 | 0x15 | 0x1A | 0x1C | 0x1F | 0x16 => {
                list.binary().ok()?;
            }
            0x26 => {
                list.binary().ok()?;
                list.binary().ok()?;
            }
            _ => return None,
        }
    }
    Some(l)
}
