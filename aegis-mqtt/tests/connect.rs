//! CONNECT validation, one test per rule.

mod common;

use aegis_mqtt::{ClientIdChars, Config, MqttError, Version, validate_connect};
use common::{B, connect_v3, connect_v4, connect_v5, head, label};

fn check(frame: &[u8]) -> Result<aegis_mqtt::Connect<'_>, MqttError> {
    validate_connect(frame, &Config::new())
}

fn err(frame: &[u8]) -> MqttError {
    check(frame).unwrap_err()
}

#[test]
fn accepts_3_1_3_1_1_and_5_0() {
    let v3 = connect_v3();
    let c = check(&v3).unwrap();
    assert_eq!(
        (c.version, c.client_id, c.clean_session),
        (Version::V3_1, "c1", true)
    );
    let v4 = connect_v4();
    let c = check(&v4).unwrap();
    assert_eq!((c.version, c.keep_alive), (Version::V3_1_1, 60));
    let v5 = connect_v5();
    assert_eq!(check(&v5).unwrap().version, Version::V5);
}

#[test]
fn accepts_a_full_connect_with_will_user_and_password() {
    let f = head("MQTT", 4, 0xEE) // user, password, will retain, will QoS 1, will, clean
        .s("dev-1")
        .s("status/dev-1")
        .s("gone")
        .s("alice")
        .s("secret")
        .frame(0x10);
    let c = check(&f).unwrap();
    let will = c.will.unwrap();
    assert_eq!(
        (will.topic, will.payload, will.qos, will.retain),
        ("status/dev-1", &b"gone"[..], 1, true)
    );
    assert_eq!(
        (c.username, c.password),
        (Some("alice"), Some(&b"secret"[..]))
    );
}

#[test]
fn protocol_name_and_level() {
    // [MQTT-3.1.2-1] unknown protocol name
    assert_eq!(
        err(&head("MQTX", 4, 2).s("c").frame(0x10)),
        MqttError::UnknownProtocol
    );
    // [MQTT-3.1.2-2] a known name with a level that does not go with it
    assert_eq!(
        err(&head("MQTT", 3, 2).s("c").frame(0x10)),
        MqttError::UnsupportedVersion { level: 3 }
    );
    assert_eq!(
        err(&head("MQTT", 6, 2).s("c").frame(0x10)),
        MqttError::UnsupportedVersion { level: 6 }
    );
    assert_eq!(
        err(&head("MQIsdp", 4, 2).s("c").frame(0x10)),
        MqttError::UnsupportedVersion { level: 4 }
    );
    assert_eq!(
        label(check(&head("MQTT", 7, 2).s("c").frame(0x10))),
        "unsupported_version"
    );
}

#[test]
fn fixed_header_flags_must_be_zero() {
    // [MQTT-2.2.2-1] / v5 [MQTT-2.1.3-1]
    let mut f = connect_v4();
    f[0] = 0x1F;
    assert_eq!(
        err(&f),
        MqttError::Malformed("reserved fixed-header flags set")
    );
    let mut f = connect_v5();
    f[0] = 0x12;
    assert_eq!(label(check(&f)), "malformed");
}

#[test]
fn first_packet_must_be_connect() {
    // [MQTT-3.1.0-1]
    assert_eq!(
        err(&[0xC0, 0x00]),
        MqttError::ProtocolError("first packet is not a CONNECT")
    );
}

#[test]
fn connect_reserved_flag_must_be_zero() {
    // [MQTT-3.1.2-3]
    for (name, level) in [("MQIsdp", 3), ("MQTT", 4)] {
        let f = head(name, level, 0x03).s("c").frame(0x10);
        assert_eq!(err(&f), MqttError::Malformed("CONNECT reserved flag set"));
    }
    let f = head("MQTT", 5, 0x03).props(&[]).s("c").frame(0x10);
    assert_eq!(err(&f), MqttError::Malformed("CONNECT reserved flag set"));
}

#[test]
fn will_qos_and_retain_need_the_will_flag() {
    // [MQTT-3.1.2-11] [MQTT-3.1.2-13] [MQTT-3.1.2-15]; v5 [MQTT-3.1.2-11] [MQTT-3.1.2-13]
    for flags in [0x02 | 0x08, 0x02 | 0x10, 0x02 | 0x20] {
        let f = head("MQTT", 4, flags).s("c").frame(0x10);
        assert_eq!(
            err(&f),
            MqttError::Malformed("will QoS or retain without the will flag")
        );
        let f = head("MQTT", 5, flags).props(&[]).s("c").frame(0x10);
        assert_eq!(
            err(&f),
            MqttError::Malformed("will QoS or retain without the will flag")
        );
    }
}

#[test]
fn will_qos_3_is_malformed() {
    // [MQTT-3.1.2-14]; v5 [MQTT-3.1.2-12]
    let f = head("MQTT", 4, 0x02 | 0x04 | 0x18)
        .s("c")
        .s("t")
        .s("m")
        .frame(0x10);
    assert_eq!(err(&f), MqttError::Malformed("will QoS 3"));
}

#[test]
fn will_fields_must_be_present_and_topic_valid() {
    // [MQTT-3.1.2-9]: the will flag needs a will topic and message
    let f = head("MQTT", 4, 0x06).s("c").frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::Malformed("packet shorter than its fields")
    );
    // [MQTT-4.7.1-1] the will topic is a topic name: no wildcards
    let f = head("MQTT", 4, 0x06).s("c").s("a/#").s("m").frame(0x10);
    assert_eq!(err(&f), MqttError::TopicName("wildcard in a topic name"));
    let f = head("MQTT", 4, 0x06).s("c").s("").s("m").frame(0x10);
    assert_eq!(err(&f), MqttError::TopicName("empty topic name"));
    // v5: will properties come first
    let f = head("MQTT", 5, 0x06)
        .props(&[])
        .s("c")
        .props(&[0x01, 0x01, 0x18, 0, 0, 0, 5])
        .s("t")
        .s("m")
        .frame(0x10);
    assert!(check(&f).is_ok());
    // v5: a CONNECT-only property in the will properties
    let f = head("MQTT", 5, 0x06)
        .props(&[])
        .s("c")
        .props(&[0x21, 0, 10])
        .s("t")
        .s("m")
        .frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::Malformed("property not valid in this packet")
    );
}

#[test]
fn password_without_user_name() {
    // [MQTT-3.1.2-22] in 3.1.1 (and 3.1); allowed in 5.0
    let f = head("MQTT", 4, 0x42).s("c").s("pw").frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::Malformed("password flag without the user name flag")
    );
    let f = head("MQIsdp", 3, 0x42).s("c").s("pw").frame(0x10);
    assert_eq!(label(check(&f)), "malformed");
    let f = head("MQTT", 5, 0x42).props(&[]).s("c").s("pw").frame(0x10);
    assert_eq!(check(&f).unwrap().password, Some(&b"pw"[..]));
}

#[test]
fn user_name_and_password_presence_follows_the_flags() {
    // [MQTT-3.1.2-19] [MQTT-3.1.2-21]: flag set, field missing
    let f = head("MQTT", 4, 0x82).s("c").frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::Malformed("packet shorter than its fields")
    );
    let f = head("MQTT", 4, 0xC2).s("c").s("u").frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::Malformed("packet shorter than its fields")
    );
    // [MQTT-3.1.2-18] [MQTT-3.1.2-20]: flag clear, field present (trailing bytes)
    let f = head("MQTT", 4, 0x02).s("c").s("u").frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::Malformed("bytes after the CONNECT payload")
    );
    // v5 [MQTT-3.1.2-16..19] the same
    let f = head("MQTT", 5, 0x02).props(&[]).s("c").s("u").frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::Malformed("bytes after the CONNECT payload")
    );
}

#[test]
fn trailing_bytes_after_the_payload() {
    // [MQTT-3.1.4-1] the CONNECT must be exactly its fields
    let f = head("MQTT", 4, 0x82).s("c").s("u").u8(0).frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::Malformed("bytes after the CONNECT payload")
    );
}

#[test]
fn keep_alive_limit() {
    let cfg = Config::new().max_keep_alive(300);
    let f = head("MQTT", 4, 2).s("c").frame(0x10); // 60 s
    assert!(validate_connect(&f, &cfg).is_ok());
    let f = B::new().s("MQTT").u8(4).u8(2).u16(301).s("c").frame(0x10);
    assert_eq!(
        validate_connect(&f, &cfg).unwrap_err(),
        MqttError::KeepAlive {
            requested: 301,
            max: 300
        }
    );
    let f = B::new().s("MQTT").u8(4).u8(2).u16(0).s("c").frame(0x10);
    assert_eq!(label(validate_connect(&f, &cfg)), "keep_alive");
    // Without a limit, 0 and 65535 pass.
    assert!(check(&f).is_ok());
}

#[test]
fn empty_client_id_rules() {
    // [MQTT-3.1.3-7] [MQTT-3.1.3-8]: 3.1.1 empty id needs clean session
    let f = head("MQTT", 4, 0x00).s("").frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::ClientId("empty client identifier without clean session")
    );
    // [MQTT-3.1.3-6]: allowed with clean session
    let f = head("MQTT", 4, 0x02).s("").frame(0x10);
    assert_eq!(check(&f).unwrap().client_id, "");
    // MQTT 3.1: 1 to 23 characters, never empty
    let f = head("MQIsdp", 3, 0x02).s("").frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::ClientId("empty client identifier in MQTT 3.1")
    );
    // v5 [MQTT-3.1.3-6]: allowed even without clean start
    let f = head("MQTT", 5, 0x00).props(&[]).s("").frame(0x10);
    assert!(check(&f).is_ok());
    // configurable
    let cfg = Config::new().allow_empty_client_id(false);
    assert_eq!(
        validate_connect(&f, &cfg).unwrap_err(),
        MqttError::ClientId("empty client identifier")
    );
}

#[test]
fn mqtt_3_1_client_ids_are_1_to_23_characters() {
    // MQTT 3.1, "Client Identifier": more than 23 characters is answered 0x02.
    let ok = head("MQIsdp", 3, 2).s("a".repeat(23)).frame(0x10);
    assert!(check(&ok).is_ok());
    let long = head("MQIsdp", 3, 2).s("a".repeat(24)).frame(0x10);
    assert_eq!(
        err(&long),
        MqttError::ClientId("client identifier over 23 characters in MQTT 3.1")
    );
    // Characters, not bytes: 23 two-byte characters pass (where any are allowed).
    let any = Config::new().client_id_chars(ClientIdChars::Any);
    let wide = head("MQIsdp", 3, 2).s("é".repeat(23)).frame(0x10);
    assert!(validate_connect(&wide, &any).is_ok());
    let wider = head("MQIsdp", 3, 2).s("é".repeat(24)).frame(0x10);
    assert_eq!(label(validate_connect(&wider, &any)), "client_id");
    // 3.1.1 and 5.0 keep the configured limit (128 by default).
    let v4 = head("MQTT", 4, 2).s("a".repeat(24)).frame(0x10);
    assert!(check(&v4).is_ok());
}

#[test]
fn a_malformed_connect_is_malformed_whatever_its_client_id_or_keep_alive() {
    // [MQTT-3.1.4-1]: a CONNECT that does not conform is closed without a CONNACK, so
    // the client id and keep-alive rules (answered with a CONNACK) wait for the whole
    // packet to be well formed.
    let trailing = |name: &str, level: u8, id: &str| {
        let mut f = head(name, level, 0x00).s(id).frame(0x10);
        f.push(0xFF);
        f[1] += 1;
        f
    };
    let bad = MqttError::Malformed("bytes after the CONNECT payload");
    assert_eq!(err(&trailing("MQTT", 4, "")), bad);
    assert_eq!(err(&trailing("MQIsdp", 3, "")), bad);
    assert_eq!(err(&trailing("MQIsdp", 3, &"a".repeat(24))), bad);
    let cfg = Config::new().max_keep_alive(30); // under the 60 s of these CONNECTs
    let f = trailing("MQTT", 4, "abc");
    assert_eq!(validate_connect(&f, &cfg).unwrap_err(), bad);
    // Well formed, the same CONNECTs are refused by those rules.
    let f = head("MQTT", 4, 0x00).s("").frame(0x10);
    assert_eq!(label(check(&f)), "client_id");
    let f = head("MQTT", 4, 0x02).s("abc").frame(0x10);
    assert_eq!(label(validate_connect(&f, &cfg)), "keep_alive");
}

#[test]
fn client_id_length_and_characters() {
    // [MQTT-3.1.3-5]: 1 to 23 alphanumerics always pass
    let ok = head("MQTT", 4, 2).s("abcdefghijklmnopqrstuvw").frame(0x10);
    let strict = Config::new()
        .client_id_chars(ClientIdChars::Alphanumeric)
        .client_id_max_len(23);
    assert!(validate_connect(&ok, &strict).is_ok());
    let long = head("MQTT", 4, 2).s("abcdefghijklmnopqrstuvwx").frame(0x10);
    assert_eq!(
        validate_connect(&long, &strict).unwrap_err(),
        MqttError::ClientId("client identifier too long")
    );
    let dash = head("MQTT", 4, 2).s("a-b").frame(0x10);
    assert_eq!(
        validate_connect(&dash, &strict).unwrap_err(),
        MqttError::ClientId("character not allowed in a client identifier")
    );
    // the length limit never goes below 23
    let tight = Config::new().client_id_max_len(4);
    assert!(validate_connect(&ok, &tight).is_ok());
    assert_eq!(label(validate_connect(&long, &tight)), "client_id");
    // default: printable ASCII
    assert!(check(&dash).is_ok());
    let space = head("MQTT", 4, 2).s("a b").frame(0x10);
    assert_eq!(label(check(&space)), "client_id");
    let any = Config::new().client_id_chars(ClientIdChars::Any);
    let uni = head("MQTT", 4, 2).s("caf\u{e9}").frame(0x10);
    assert!(validate_connect(&uni, &any).is_ok());
    let custom = Config::new().client_id_chars(ClientIdChars::Custom(|c| c.is_ascii_lowercase()));
    assert!(validate_connect(&uni, &custom).is_err());
    assert!(validate_connect(&head("MQTT", 4, 2).s("abc").frame(0x10), &custom).is_ok());
}

#[test]
fn strings_must_be_well_formed_utf8_without_nul() {
    // [MQTT-1.5.3-1] / v5 [MQTT-1.5.4-1]: ill-formed, including an encoded surrogate
    for bad in [&b"\xff"[..], b"\xed\xa0\x80", b"\xc0\x80"] {
        let f = head("MQTT", 4, 2).s(bad).frame(0x10);
        assert_eq!(err(&f), MqttError::Malformed("ill-formed UTF-8 string"));
    }
    // [MQTT-1.5.3-2] / v5 [MQTT-1.5.4-2]: U+0000, in the client id and the user name
    let f = head("MQTT", 4, 2).s("a\0b").frame(0x10);
    assert_eq!(err(&f), MqttError::Malformed("U+0000 in a UTF-8 string"));
    let f = head("MQTT", 4, 0x82).s("a").s("u\0").frame(0x10);
    assert_eq!(err(&f), MqttError::Malformed("U+0000 in a UTF-8 string"));
    // [MQTT-1.5.3-3]: a BOM is kept, not stripped or refused
    let f = head("MQTT", 4, 0x82).s("a").s("\u{feff}u").frame(0x10);
    assert_eq!(check(&f).unwrap().username, Some("\u{feff}u"));
}

#[test]
fn remaining_length_must_match() {
    let mut f = connect_v4();
    f.push(0); // one byte more than the remaining length says
    assert_eq!(label(check(&f)), "malformed");
    let f = connect_v4();
    assert_eq!(label(check(&f[..f.len() - 1])), "malformed");
}

// ---- MQTT 5 properties ----

fn v5_props(p: &[u8]) -> Result<(), MqttError> {
    let f = head("MQTT", 5, 2).props(p).s("c").frame(0x10);
    check(&f).map(|_| ())
}

#[test]
fn v5_connect_properties_accepted() {
    let props = [
        0x11, 0, 0, 0, 10, // session expiry
        0x21, 0, 20, // receive maximum
        0x27, 0, 0, 1, 0, // maximum packet size
        0x22, 0, 5, // topic alias maximum
        0x19, 1, 0x17, 0, // request response / problem information
        0x26, 0, 1, b'k', 0, 1, b'v', 0x26, 0, 1, b'k', 0, 1, b'w', // user properties, twice
        0x15, 0, 1, b'm', 0x16, 0, 2, 1, 2, // authentication method and data
    ];
    let f = head("MQTT", 5, 2).props(&props).s("c").frame(0x10);
    let c = check(&f).unwrap();
    assert_eq!((c.session_expiry, c.auth_method), (10, Some("m")));
}

#[test]
fn v5_unknown_or_misplaced_property_is_malformed() {
    // v5 §2.2.2.2: an identifier not valid for the packet is a Malformed Packet
    assert_eq!(
        v5_props(&[0x7F, 0]),
        Err(MqttError::Malformed("property not valid in this packet"))
    );
    assert_eq!(
        v5_props(&[0x23, 0, 1]),
        Err(MqttError::Malformed("property not valid in this packet"))
    );
    assert_eq!(
        v5_props(&[0x01, 0]),
        Err(MqttError::Malformed("property not valid in this packet"))
    );
}

#[test]
fn v5_duplicate_property_is_a_protocol_error() {
    // v5 §3.1.2.11: "It is a Protocol Error to include ... more than once"
    assert_eq!(
        v5_props(&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]),
        Err(MqttError::ProtocolError("property included more than once"))
    );
}

#[test]
fn v5_property_values() {
    // v5 §3.1.2.11.3 Receive Maximum 0, §3.1.2.11.4 Maximum Packet Size 0
    assert_eq!(
        v5_props(&[0x21, 0, 0]),
        Err(MqttError::ProtocolError("receive maximum of 0"))
    );
    assert_eq!(
        v5_props(&[0x27, 0, 0, 0, 0]),
        Err(MqttError::ProtocolError("maximum packet size of 0"))
    );
    // §3.1.2.11.6/7 request response / problem information other than 0 or 1
    assert_eq!(
        v5_props(&[0x17, 2]),
        Err(MqttError::ProtocolError("property value other than 0 or 1"))
    );
    assert_eq!(label(v5_props(&[0x19, 9])), "protocol_error");
    // §3.1.2.11.10 authentication data without a method
    assert_eq!(
        v5_props(&[0x16, 0, 1, 7]),
        Err(MqttError::ProtocolError(
            "authentication data without an authentication method"
        ))
    );
}

#[test]
fn v5_property_types_and_lengths() {
    // a truncated value, a length past the packet, a non-minimal property length
    assert_eq!(label(v5_props(&[0x11, 0, 0])), "malformed");
    let f = head("MQTT", 5, 2).raw(&[0x05, 0x11]).s("c").frame(0x10);
    assert_eq!(label(check(&f)), "malformed");
    let f = head("MQTT", 5, 2).raw(&[0x80, 0x00]).s("c").frame(0x10);
    assert_eq!(
        err(&f),
        MqttError::Malformed("variable byte integer not minimally encoded")
    );
    // [MQTT-1.5.7-1] both strings of a user property must be valid
    assert_eq!(
        v5_props(&[0x26, 0, 1, b'k', 0, 1, 0]),
        Err(MqttError::Malformed("U+0000 in a UTF-8 string"))
    );
    assert_eq!(
        v5_props(&[0x26, 0, 1, 0xff, 0, 1, b'v']),
        Err(MqttError::Malformed("ill-formed UTF-8 string"))
    );
}

#[test]
fn v5_will_response_topic_must_be_a_topic_name() {
    // v5 [MQTT-3.3.2-14] (will properties carry the same Response Topic)
    let f = head("MQTT", 5, 0x06)
        .props(&[])
        .s("c")
        .props(&[0x08, 0, 3, b'a', b'/', b'+'])
        .s("t")
        .s("m")
        .frame(0x10);
    assert_eq!(err(&f), MqttError::TopicName("wildcard in a topic name"));
}
