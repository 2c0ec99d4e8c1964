//! Each known gap of mqttbytes 0.6 as a validator, and that our checks close it.
//!
//! mqttbytes is the baseline here, never the judge: every test shows what it does with the
//! bytes and what this crate does. Its UNSUBSCRIBE parser is never called (it has a `dbg!`
//! that writes to stderr); this crate parses UNSUBSCRIBE itself (`tests/packets.rs`).

mod common;

use aegis_mqtt::{Config, MqttError, Packet, validate_connect};
use bytes::BytesMut;
use common::{B, connect_v4, connect_v5, head, label, session_after, v4, v5};

fn mb_v4(b: &[u8]) -> Result<mqttbytes::v4::Packet, mqttbytes::Error> {
    mqttbytes::v4::read(&mut BytesMut::from(b), 1 << 20)
}

fn mb_v5(b: &[u8]) -> Result<mqttbytes::v5::Packet, mqttbytes::Error> {
    mqttbytes::v5::read(&mut BytesMut::from(b), 1 << 20)
}

fn ours_connect(b: &[u8]) -> Result<(), MqttError> {
    validate_connect(b, &Config::new()).map(|_| ())
}

#[test]
fn mqtt_3_1_is_refused_by_mqttbytes_and_accepted_here() {
    let f = head("MQIsdp", 3, 0x02).s("c1").frame(0x10);
    assert!(mb_v4(&f).is_err());
    assert_eq!(ours_connect(&f), Ok(()));
}

#[test]
fn connect_reserved_fixed_header_flags() {
    let mut f = connect_v4();
    f[0] = 0x1F;
    assert!(mb_v4(&f).is_ok());
    assert_eq!(label(ours_connect(&f)), "malformed");
}

#[test]
fn connect_reserved_bit() {
    let f = head("MQTT", 4, 0x03).s("c").frame(0x10);
    assert!(mb_v4(&f).is_ok());
    assert_eq!(
        ours_connect(&f),
        Err(MqttError::Malformed("CONNECT reserved flag set"))
    );
}

#[test]
fn password_without_user_name() {
    let f = head("MQTT", 4, 0x42).s("c").s("pw").frame(0x10);
    assert!(mb_v4(&f).is_ok());
    assert_eq!(
        ours_connect(&f),
        Err(MqttError::Malformed(
            "password flag without the user name flag"
        ))
    );
}

#[test]
fn trailing_bytes_after_connect() {
    let f = head("MQTT", 4, 0x02).s("c").raw(b"junk").frame(0x10);
    assert!(mb_v4(&f).is_ok());
    assert_eq!(
        ours_connect(&f),
        Err(MqttError::Malformed("bytes after the CONNECT payload"))
    );
}

#[test]
fn non_minimal_remaining_length() {
    let body = head("MQTT", 4, 0x02).s("c").0;
    let mut f = vec![0x10, 0x80 | u8::try_from(body.len()).unwrap(), 0x00];
    f.extend_from_slice(&body);
    assert!(mb_v4(&f).is_ok());
    assert_eq!(
        ours_connect(&f),
        Err(MqttError::Malformed(
            "remaining length not minimally encoded"
        ))
    );
    assert!(mb_v4(&[0xC0, 0x80, 0x00]).is_ok());
    assert_eq!(
        v4(&[0xC0, 0x80, 0x00]),
        Err(MqttError::Malformed(
            "remaining length not minimally encoded"
        ))
    );
}

#[test]
fn subscribe_reserved_flags() {
    let f = B::new().u16(1).s("a").u8(0).frame(0x80);
    assert!(mb_v4(&f).is_ok());
    assert_eq!(label(v4(&f)), "malformed");
}

#[test]
fn subscribe_packet_id_zero() {
    let f = B::new().u16(0).s("a").u8(0).frame(0x82);
    assert!(mb_v4(&f).is_ok());
    assert_eq!(v4(&f), Err(MqttError::ProtocolError("packet identifier 0")));
}

#[test]
fn subscribe_reserved_option_bits() {
    let f = B::new().u16(1).s("a").u8(0x41).frame(0x82);
    assert!(mb_v4(&f).is_ok());
    assert_eq!(label(v4(&f)), "malformed");
    let f = B::new().u16(1).props(&[]).s("a").u8(0xC1).frame(0x82);
    assert!(mb_v5(&f).is_ok());
    assert_eq!(label(v5(&f)), "malformed");
}

#[test]
fn publish_topic_with_wildcards_nul_or_empty() {
    for t in ["a/+", "a/#", "a\0b", ""] {
        let f = B::new().s(t).raw(b"x").frame(0x30);
        assert!(mb_v4(&f).is_ok(), "{t:?}");
        assert_ne!(label(v4(&f)), "ok", "{t:?}");
    }
}

#[test]
fn dup_on_qos_0() {
    let f = B::new().s("a").frame(0x38);
    assert!(mb_v4(&f).is_ok());
    assert_eq!(
        v4(&f),
        Err(MqttError::Malformed("DUP set on a QoS 0 PUBLISH"))
    );
}

#[test]
fn v5_zero_length_disconnect_is_refused_by_mqttbytes_and_accepted_here() {
    assert!(mb_v5(&[0xE0, 0x00]).is_err());
    assert_eq!(v5(&[0xE0, 0x00]), Ok(()));
}

/// A reason code and no Property Length: a Remaining Length under 2 means a Property
/// Length of 0 (5.0 §3.14.2.2.1). mqttbytes reads the missing byte as truncation.
#[test]
fn v5_disconnect_with_a_reason_code_and_no_property_length() {
    let f = [0xE0, 0x01, 0x04];
    assert!(matches!(
        mb_v5(&f),
        Err(mqttbytes::Error::InsufficientBytes(1))
    ));
    assert_eq!(
        session_after(&connect_v5()).validate(&f),
        Ok(Packet::Disconnect(0x04))
    );
}

/// The Password is Binary Data (3.1.1 §3.1.3.5, 5.0 §3.1.3.6), not a UTF-8 string:
/// mqttbytes refuses one that is not UTF-8 as if it were a topic.
#[test]
fn a_password_that_is_not_utf8_is_refused_by_mqttbytes_and_accepted_here() {
    let password = [0xFF, 0xFE, 0x00, 0xC3];
    let f4 = head("MQTT", 4, 0xC2).s("c").s("u").s(password).frame(0x10);
    assert!(matches!(mb_v4(&f4), Err(mqttbytes::Error::TopicNotUtf8)));
    let f5 = head("MQTT", 5, 0xC2)
        .props(&[])
        .s("c")
        .s("u")
        .s(password)
        .frame(0x10);
    assert!(matches!(mb_v5(&f5), Err(mqttbytes::Error::TopicNotUtf8)));
    for f in [f4, f5] {
        let connect = validate_connect(&f, &Config::new()).unwrap();
        assert_eq!(connect.username, Some("u"));
        assert_eq!(connect.password, Some(&password[..]));
    }
}

#[test]
fn v5_auth_is_unknown_to_mqttbytes_and_validated_here() {
    let c = head("MQTT", 5, 2)
        .props(&[0x15, 0, 1, b'm'])
        .s("c")
        .frame(0x10);
    let f = B::new().u8(0x18).props(&[0x15, 0, 1, b'm']).frame(0xF0);
    assert!(mb_v5(&f).is_err());
    assert_eq!(session_after(&c).validate(&f), Ok(Packet::Auth(0x18)));
}

#[test]
fn framing_never_consumes_the_buffer() {
    // mqttbytes' check() frames, and a later InsufficientBytes means the frame is gone
    // from the BytesMut; here decoding borrows a slice and the caller drains what it
    // forwards.
    let buf = [0x30u8, 0x05, 0x00, 0x01];
    let mut s = aegis_mqtt::Session::new(Config::new());
    assert!(s.next(&connect_v4()).is_ok());
    assert_eq!(s.next(&buf), Ok(aegis_mqtt::Next::NeedMore(3)));
    assert_eq!(buf, [0x30, 0x05, 0x00, 0x01]);
}
