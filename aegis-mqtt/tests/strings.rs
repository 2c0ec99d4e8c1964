//! The code points a sender SHOULD NOT put in a UTF-8 string and a receiver MAY close for
//! (3.1.1 §1.5.3, 5.0 §1.5.4; no normative ids): the control characters U+0001..U+001F and
//! U+007F..U+009F, and the non-characters U+FDD0..U+FDEF and U+xFFFE / U+xFFFF. mosquitto
//! closes the connection for any of them, so the library refuses them as `malformed` in
//! every string it checks, in every version; their neighbours pass.

mod common;

use aegis_mqtt::{ClientIdChars, Config, MqttError, validate_connect};
use common::{B, head, v4, v5};

const CONTROL: MqttError = MqttError::Malformed("control character in a UTF-8 string");
const NON_CHARACTER: MqttError = MqttError::Malformed("non-character in a UTF-8 string");

/// Every boundary, with what the library must say about a string holding it.
fn cases() -> Vec<(char, Result<(), MqttError>)> {
    let mut v = vec![];
    for c in [
        '\u{1}', '\u{9}', '\u{a}', '\u{d}', '\u{1f}', '\u{7f}', '\u{80}', '\u{9f}',
    ] {
        v.push((c, Err(CONTROL)));
    }
    for c in [
        '\u{fdd0}',
        '\u{fdef}',
        '\u{fffe}',
        '\u{ffff}',
        '\u{1fffe}',
        '\u{1ffff}',
        '\u{efffe}',
        '\u{10fffe}',
        '\u{10ffff}',
    ] {
        v.push((c, Err(NON_CHARACTER)));
    }
    for c in [
        ' ',
        '~',
        '\u{a0}',
        '\u{7ff}',
        '\u{800}',
        '\u{fdcf}',
        '\u{fdf0}',
        '\u{feff}',
        '\u{fffd}',
        '\u{10000}',
        '\u{1fffd}',
        '\u{20000}',
        '\u{10fffd}',
    ] {
        v.push((c, Ok(())));
    }
    v
}

/// The string `x<c>y`: the code point in the middle of others, as a client sends it.
fn with(c: char) -> String {
    format!("x{c}y")
}

/// CONNECT validation with any client id characters the string rules allow (the default
/// `AsciiGraphic` would refuse the allowed neighbours in a client id for its own reason).
fn connect(frame: &[u8]) -> Result<(), MqttError> {
    let config = Config::new().client_id_chars(ClientIdChars::Any);
    validate_connect(frame, &config).map(|_| ())
}

/// v5 property bytes: an identifier and a string.
fn prop(id: u8, s: &str) -> Vec<u8> {
    let mut p = vec![id];
    p.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
    p.extend_from_slice(s.as_bytes());
    p
}

fn user_property(name: &str, value: &str) -> Vec<u8> {
    let mut p = prop(0x26, name);
    p.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
    p.extend_from_slice(value.as_bytes());
    p
}

#[test]
fn connect_strings_refuse_control_characters_and_non_characters() {
    for (c, want) in cases() {
        let s = with(c);
        let s = s.as_str();
        let frames = [
            // client id, 3.1 / 3.1.1 / 5.0
            ("3.1 client id", head("MQIsdp", 3, 2).s(s).frame(0x10)),
            ("3.1.1 client id", head("MQTT", 4, 2).s(s).frame(0x10)),
            (
                "5.0 client id",
                head("MQTT", 5, 2).props(&[]).s(s).frame(0x10),
            ),
            // user name
            (
                "3.1.1 user name",
                head("MQTT", 4, 0x82).s("c").s(s).frame(0x10),
            ),
            (
                "5.0 user name",
                head("MQTT", 5, 0x82).props(&[]).s("c").s(s).frame(0x10),
            ),
            // will topic, 3.1 and 3.1.1
            (
                "3.1 will topic",
                head("MQIsdp", 3, 0x06).s("c").s(s).s("m").frame(0x10),
            ),
            (
                "3.1.1 will topic",
                head("MQTT", 4, 0x06).s("c").s(s).s("m").frame(0x10),
            ),
            // 5.0: user property name and value, authentication method, will properties
            (
                "5.0 user property name",
                head("MQTT", 5, 2)
                    .props(&user_property(s, "v"))
                    .s("c")
                    .frame(0x10),
            ),
            (
                "5.0 user property value",
                head("MQTT", 5, 2)
                    .props(&user_property("k", s))
                    .s("c")
                    .frame(0x10),
            ),
            (
                "5.0 authentication method",
                head("MQTT", 5, 2).props(&prop(0x15, s)).s("c").frame(0x10),
            ),
            (
                "5.0 will content type",
                head("MQTT", 5, 0x06)
                    .props(&[])
                    .s("c")
                    .props(&prop(0x03, s))
                    .s("w")
                    .s("m")
                    .frame(0x10),
            ),
        ];
        for (what, f) in frames {
            assert_eq!(connect(&f), want, "{what}, U+{:04X}", u32::from(c));
        }
    }
}

#[test]
fn later_packet_strings_refuse_control_characters_and_non_characters() {
    for (c, want) in cases() {
        let s = with(c);
        let s = s.as_str();
        let v4_frames = [
            ("3.1.1 PUBLISH topic", B::new().s(s).raw(b"x").frame(0x30)),
            (
                "3.1.1 SUBSCRIBE filter",
                B::new().u16(1).s(s).u8(0).frame(0x82),
            ),
            ("3.1.1 UNSUBSCRIBE filter", B::new().u16(1).s(s).frame(0xA2)),
        ];
        for (what, f) in v4_frames {
            assert_eq!(v4(&f), want, "{what}, U+{:04X}", u32::from(c));
        }
        let v5_frames = [
            (
                "5.0 PUBLISH topic",
                B::new().s(s).props(&[]).raw(b"x").frame(0x30),
            ),
            (
                "5.0 PUBLISH content type",
                B::new().s("a").props(&prop(0x03, s)).frame(0x30),
            ),
            (
                "5.0 PUBLISH response topic",
                B::new().s("a").props(&prop(0x08, s)).frame(0x30),
            ),
            (
                "5.0 PUBLISH user property name",
                B::new().s("a").props(&user_property(s, "v")).frame(0x30),
            ),
            (
                "5.0 PUBLISH user property value",
                B::new().s("a").props(&user_property("k", s)).frame(0x30),
            ),
            (
                "5.0 SUBSCRIBE filter",
                B::new().u16(1).props(&[]).s(s).u8(0).frame(0x82),
            ),
            (
                "5.0 UNSUBSCRIBE filter",
                B::new().u16(1).props(&[]).s(s).frame(0xA2),
            ),
            (
                "5.0 PUBACK reason string",
                B::new().u16(5).u8(0).props(&prop(0x1F, s)).frame(0x40),
            ),
            (
                "5.0 DISCONNECT reason string",
                B::new().u8(0).props(&prop(0x1F, s)).frame(0xE0),
            ),
        ];
        for (what, f) in v5_frames {
            assert_eq!(v5(&f), want, "{what}, U+{:04X}", u32::from(c));
        }
    }
}

#[test]
fn nul_keeps_its_own_message() {
    // [MQTT-1.5.3-2] / [MQTT-1.5.4-2]: a MUST NOT, told apart from the SHOULD NOTs
    let f = head("MQTT", 4, 2).s("a\0\u{1}").frame(0x10);
    assert_eq!(
        connect(&f),
        Err(MqttError::Malformed("U+0000 in a UTF-8 string"))
    );
    let f = head("MQTT", 4, 2).s("a\u{1}\0").frame(0x10);
    assert_eq!(connect(&f), Err(CONTROL));
}

/// The broker's CONNACK is read only for the limits it announces: its strings (Assigned
/// Client Identifier, Reason String, ...) are skipped, not checked, so a control
/// character in one (a tab in a reason string) does not leave the limits unenforced.
#[test]
fn the_brokers_connack_strings_do_not_unbind_its_limits() {
    for (id, s) in [
        (0x1F, &b"one\ttwo"[..]),
        (0x12, b"id\x01"),
        (0x1A, b"\xef\xbf\xbf"),
        (0x1F, b"\xff"),
    ] {
        let mut props = vec![0x24, 0]; // Maximum QoS 0
        props.push(id);
        props.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
        props.extend_from_slice(s);
        let mut session = common::session_after(&common::connect_v5());
        session.on_connack(&B::new().u8(0).u8(0).props(&props).frame(0x20));
        assert_eq!(
            session.validate(&B::new().s("a").u16(1).props(&[]).frame(0x32)),
            Err(MqttError::ServerLimit(aegis_mqtt::Limit::QoS)),
            "{id:#04x} {s:?}"
        );
    }
}
