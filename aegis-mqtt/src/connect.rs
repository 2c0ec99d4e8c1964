//! CONNECT validation (MQTT 3.1, 3.1.1 and 5.0).

use std::num::NonZeroU32;

use crate::properties::{self, Ctx};
use crate::reader::Reader;
use crate::{Config, MqttError, Version, split_frame};

/// A validated CONNECT, borrowing the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Connect<'a> {
    /// The protocol version.
    pub version: Version,
    /// Clean Session (3.x) or Clean Start (5.0).
    pub clean_session: bool,
    /// The keep-alive in seconds (0: none).
    pub keep_alive: u16,
    /// The client identifier (may be empty where the version allows it).
    pub client_id: &'a str,
    /// The Will, if the Will Flag is set.
    pub will: Option<Will<'a>>,
    /// The user name, if the User Name Flag is set.
    pub username: Option<&'a str>,
    /// The password, if the Password Flag is set.
    pub password: Option<&'a [u8]>,
    /// MQTT 5 Session Expiry Interval (0 when absent).
    pub session_expiry: u32,
    /// MQTT 5 Authentication Method.
    pub auth_method: Option<&'a str>,
    /// MQTT 5 Maximum Packet Size: the largest packet, in bytes, the client accepts
    /// (`None` when absent: no limit but the protocol's).
    pub max_packet_size: Option<NonZeroU32>,
}

/// The Will of a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Will<'a> {
    /// A valid Topic Name.
    pub topic: &'a str,
    /// The Will payload.
    pub payload: &'a [u8],
    /// The Will `QoS`, 0 to 2.
    pub qos: u8,
    /// The Will Retain flag.
    pub retain: bool,
}

/// Reads only the protocol name and level of a CONNECT frame; `None` for any other
/// packet, whatever its body holds.
///
/// Used to pick the format of the answer when the CONNECT is refused further on.
pub fn connect_version(frame: &[u8]) -> Option<Version> {
    let (first, body) = split_frame(frame).ok()?;
    if first >> 4 != 1 {
        return None;
    }
    let mut r = Reader::new(body);
    let name = r.binary().ok()?;
    match (name, r.u8().ok()?) {
        (b"MQIsdp", 3) => Some(Version::V3_1),
        (b"MQTT", 4) => Some(Version::V3_1_1),
        (b"MQTT", 5) => Some(Version::V5),
        _ => None,
    }
}

/// Validates one whole CONNECT packet (fixed header included).
///
/// # Errors
///
/// The first rule broken; see the [crate docs](crate) for the list.
pub fn validate_connect<'a>(frame: &'a [u8], config: &Config) -> Result<Connect<'a>, MqttError> {
    let (first, body) = split_frame(frame)?;
    if first >> 4 != 1 {
        return Err(MqttError::ProtocolError("first packet is not a CONNECT"));
    }
    if first & 0x0F != 0 {
        return Err(MqttError::Malformed("reserved fixed-header flags set"));
    }
    let mut r = Reader::new(body);
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (name, level) {
        (b"MQIsdp", 3) => Version::V3_1,
        (b"MQTT", 4) => Version::V3_1_1,
        (b"MQTT", 5) => Version::V5,
        (b"MQIsdp" | b"MQTT", level) => return Err(MqttError::UnsupportedVersion { level }),
        _ => return Err(MqttError::UnknownProtocol),
    };
    if !config.accepts(version) {
        return Err(MqttError::UnsupportedVersion { level });
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(MqttError::Malformed("CONNECT reserved flag set"));
    }
    let clean_session = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(MqttError::Malformed("will QoS 3"));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(MqttError::Malformed(
            "will QoS or retain without the will flag",
        ));
    }
    if password_flag && !username_flag && version != Version::V5 {
        return Err(MqttError::Malformed(
            "password flag without the user name flag",
        ));
    }
    let keep_alive = r.u16()?;
    let props = if version == Version::V5 {
        properties::read(&mut r, Ctx::Connect)?
    } else {
        properties::Props::default()
    };

    let client_id = r.string()?;

    let will = if will_flag {
        if version == Version::V5 {
            properties::read(&mut r, Ctx::Will)?;
        }
        let topic = r.string()?;
        crate::topic::check_topic_name(topic)?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    if !r.is_empty() {
        return Err(MqttError::Malformed("bytes after the CONNECT payload"));
    }
    // The policy checks, which a CONNACK answers, only once the whole packet is well
    // formed: a malformed CONNECT gets no CONNACK in 3.x ([MQTT-3.1.4-1]), and 0x81
    // in 5.0, whatever its client id or keep-alive.
    if let Some(max) = config.max_keep_alive
        && (keep_alive == 0 || keep_alive > max)
    {
        return Err(MqttError::KeepAlive {
            requested: keep_alive,
            max,
        });
    }
    check_client_id(client_id, version, clean_session, config)?;
    Ok(Connect {
        version,
        clean_session,
        keep_alive,
        client_id,
        will,
        username,
        password,
        session_expiry: props.session_expiry.unwrap_or(0),
        auth_method: props.auth_method,
        max_packet_size: props.max_packet_size,
    })
}

/// The longest client id MQTT 3.1 allows, in characters.
const MQTT_3_1_MAX_CLIENT_ID: usize = 23;

fn check_client_id(
    id: &str,
    version: Version,
    clean_session: bool,
    config: &Config,
) -> Result<(), MqttError> {
    if id.is_empty() {
        return match version {
            Version::V3_1 => Err(MqttError::ClientId("empty client identifier in MQTT 3.1")),
            Version::V3_1_1 if !clean_session => Err(MqttError::ClientId(
                "empty client identifier without clean session",
            )),
            _ if !config.allow_empty_client_id => {
                Err(MqttError::ClientId("empty client identifier"))
            }
            _ => Ok(()),
        };
    }
    if id.len() > config.client_id_max_len {
        return Err(MqttError::ClientId("client identifier too long"));
    }
    // MQTT 3.1 (3.1, "Client Identifier"): 1 to 23 characters, more is answered 0x02.
    if version == Version::V3_1 && id.chars().count() > MQTT_3_1_MAX_CLIENT_ID {
        return Err(MqttError::ClientId(
            "client identifier over 23 characters in MQTT 3.1",
        ));
    }
    if !config.client_id_chars.allows(id) {
        return Err(MqttError::ClientId(
            "character not allowed in a client identifier",
        ));
    }
    Ok(())
}
