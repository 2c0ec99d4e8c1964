//! Encoders for the packets the gateway itself sends: rejections and per-packet refusals.
//!
//! The gateway never re-encodes client packets; these are only its own answers.

use bytes::BufMut;

use crate::Version;

/// Return and reason codes used in answers.
pub mod reason {
    /// 3.1 / 3.1.1 CONNACK: unacceptable protocol version.
    pub const V3_UNACCEPTABLE_VERSION: u8 = 0x01;
    /// 3.1 / 3.1.1 CONNACK: identifier rejected.
    pub const V3_IDENTIFIER_REJECTED: u8 = 0x02;
    /// 3.1 / 3.1.1 CONNACK: server unavailable.
    pub const V3_SERVER_UNAVAILABLE: u8 = 0x03;
    /// 3.1 / 3.1.1 CONNACK: not authorized.
    pub const V3_NOT_AUTHORIZED: u8 = 0x05;
    /// 3.1.1 SUBACK: failure.
    pub const V3_SUBACK_FAILURE: u8 = 0x80;

    /// 5.0: success / normal disconnection / granted `QoS` 0.
    pub const SUCCESS: u8 = 0x00;
    /// 5.0: unspecified error.
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    /// 5.0: malformed packet.
    pub const MALFORMED_PACKET: u8 = 0x81;
    /// 5.0: protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// 5.0: implementation specific error.
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    /// 5.0: unsupported protocol version.
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    /// 5.0: client identifier not valid.
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    /// 5.0: not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// 5.0: server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    /// 5.0: server busy.
    pub const SERVER_BUSY: u8 = 0x89;
    /// 5.0 CONNACK: banned.
    pub const BANNED: u8 = 0x8A;
    /// 5.0: keep alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// 5.0: topic filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// 5.0: topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// 5.0: packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// 5.0: message rate too high.
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    /// 5.0: quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// 5.0 DISCONNECT: administrative action.
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    /// 5.0 PUBACK / PUBREC: payload format invalid.
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    /// 5.0: connection rate exceeded.
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
}

/// An MQTT 3.1 / 3.1.1 CONNACK: `20 02 00 RC` (session present 0).
pub const fn connack_v3(return_code: u8) -> [u8; 4] {
    [0x20, 0x02, 0x00, return_code]
}

/// An MQTT 5 CONNACK without properties: `20 03 00 RC 00`.
pub const fn connack_v5(reason: u8) -> [u8; 5] {
    [0x20, 0x03, 0x00, reason, 0x00]
}

/// An MQTT 5 server DISCONNECT without properties: `E0 02 RC 00`.
pub const fn disconnect_v5(reason: u8) -> [u8; 4] {
    [0xE0, 0x02, reason, 0x00]
}

/// An MQTT 5 PUBACK with a reason code and no properties: `40 04 ID ID RC 00`.
pub const fn puback_v5(packet_id: u16, reason: u8) -> [u8; 6] {
    let id = packet_id.to_be_bytes();
    [0x40, 0x04, id[0], id[1], reason, 0x00]
}

/// A SUBACK with one return or reason code per filter, in the format of `version`
/// (3.1 / 3.1.1: no properties, failure is 0x80; 5.0: an empty property list).
///
/// # Panics
///
/// If `codes` is so long that the packet would exceed the 268,435,455-byte limit.
pub fn suback<B: BufMut>(dst: &mut B, version: Version, packet_id: u16, codes: &[u8]) {
    let props = usize::from(version == Version::V5);
    let remaining = 2 + props + codes.len();
    assert!(remaining <= 268_435_455, "SUBACK too large");
    dst.put_u8(0x90);
    put_varint(dst, remaining);
    dst.put_u16(packet_id);
    if props == 1 {
        dst.put_u8(0);
    }
    dst.put_slice(codes);
}

fn put_varint<B: BufMut>(dst: &mut B, mut n: usize) {
    loop {
        #[allow(clippy::cast_possible_truncation)] // masked to 7 bits
        let mut b = (n & 0x7F) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        dst.put_u8(b);
        if n == 0 {
            break;
        }
    }
}
