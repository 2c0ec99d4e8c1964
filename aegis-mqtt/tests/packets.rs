//! Every client packet after the CONNECT, one test per rule.

mod common;

use aegis_mqtt::{Answer, Config, Limit, MqttError, Next, Packet, Session};
use common::{B, connect_v3, connect_v4, connect_v5, head, label, session_after, v4, v5};

const MAL_FLAGS: MqttError = MqttError::Malformed("reserved fixed-header flags set");
const ID0: MqttError = MqttError::ProtocolError("packet identifier 0");

#[test]
fn publish_valid_qos_0_1_2() {
    let mut s = session_after(&connect_v4());
    let f = B::new().s("a/b").raw(b"hello").frame(0x31);
    let Packet::Publish(p) = s.validate(&f).unwrap() else {
        panic!()
    };
    assert_eq!(
        (p.topic, p.qos, p.retain, p.packet_id, p.payload),
        ("a/b", 0, true, 0, &b"hello"[..])
    );
    let f = B::new().s("a").u16(7).raw(b"x").frame(0x3A); // DUP, QoS 1
    let Packet::Publish(p) = s.validate(&f).unwrap() else {
        panic!()
    };
    assert_eq!(
        (p.dup, p.qos, p.packet_id, p.payload),
        (true, 1, 7, &b"x"[..])
    );
    let f = B::new().s("a").u16(8).frame(0x34);
    assert!(matches!(s.validate(&f), Ok(Packet::Publish(p)) if p.qos == 2 && p.payload.is_empty()));
}

#[test]
fn publish_flags() {
    // [MQTT-3.3.1-4] QoS 3; [MQTT-3.3.1-2] DUP on QoS 0 (same numbers in 5.0)
    let f = B::new().s("a").u16(1).frame(0x36);
    assert_eq!(v4(&f), Err(MqttError::Malformed("PUBLISH QoS 3")));
    assert_eq!(v5(&f), Err(MqttError::Malformed("PUBLISH QoS 3")));
    let f = B::new().s("a").frame(0x38);
    assert_eq!(
        v4(&f),
        Err(MqttError::Malformed("DUP set on a QoS 0 PUBLISH"))
    );
    assert_eq!(
        v5(&f),
        Err(MqttError::Malformed("DUP set on a QoS 0 PUBLISH"))
    );
}

#[test]
fn publish_topic_name() {
    // [MQTT-3.3.2-2] / [MQTT-4.7.1-1] no wildcards
    for t in ["a/+", "#", "a/#", "+"] {
        let f = B::new().s(t).frame(0x30);
        assert_eq!(
            v4(&f),
            Err(MqttError::TopicName("wildcard in a topic name")),
            "{t}"
        );
        assert_eq!(
            label(v5(&B::new().s(t).props(&[]).frame(0x30))),
            "topic_name"
        );
    }
    // [MQTT-4.7.3-1] at least one character
    assert_eq!(
        v4(&B::new().s("").frame(0x30)),
        Err(MqttError::TopicName("empty topic name"))
    );
    // ... 5.0 without a Topic Alias: "a Protocol Error" (§3.3.2.1), DISCONNECT 0x82
    let mut s = session_after(&connect_v5());
    s.connack_sent();
    let e = s
        .validate(&B::new().s("").props(&[]).frame(0x30))
        .unwrap_err();
    assert_eq!(
        e,
        MqttError::ProtocolError("empty topic name without a topic alias")
    );
    assert_eq!(s.answer(&e), Answer::DisconnectV5(0x82));
    // [MQTT-4.7.3-2] / [MQTT-1.5.3-2] no U+0000
    assert_eq!(
        v4(&B::new().s("a\0").frame(0x30)),
        Err(MqttError::Malformed("U+0000 in a UTF-8 string"))
    );
    // [MQTT-3.3.2-1] UTF-8
    assert_eq!(label(v4(&B::new().s(b"\xc3").frame(0x30))), "malformed");
    // '$' topics and spaces are valid names
    assert_eq!(v4(&B::new().s("$SYS/x y").frame(0x30)), Ok(()));
}

#[test]
fn publish_packet_id_nonzero() {
    // [MQTT-2.3.1-1] / v5 [MQTT-2.2.1-3]
    assert_eq!(v4(&B::new().s("a").u16(0).frame(0x32)), Err(ID0));
    assert_eq!(v5(&B::new().s("a").u16(0).props(&[]).frame(0x34)), Err(ID0));
    // QoS 1 without room for the id
    assert_eq!(label(v4(&B::new().s("a").u8(1).frame(0x32))), "malformed");
}

#[test]
fn v5_publish_properties() {
    let mut s = session_after(&connect_v5());
    let props = [
        0x01, 1, 0x02, 0, 0, 0, 9, 0x03, 0, 1, b'j', 0x08, 0, 1, b'r', 0x09, 0, 1, 5, 0x23, 0, 3,
    ];
    let f = B::new().s("a").u16(1).props(&props).raw(b"p").frame(0x32);
    let Packet::Publish(p) = s.validate(&f).unwrap() else {
        panic!()
    };
    assert_eq!((p.topic_alias, p.payload), (Some(3), &b"p"[..]));
    // an empty topic is allowed with a topic alias
    let f = B::new().s("").props(&[0x23, 0, 3]).frame(0x30);
    assert!(matches!(s.validate(&f), Ok(Packet::Publish(p)) if p.topic.is_empty()));
}

#[test]
fn v5_publish_property_rules() {
    // [MQTT-3.3.2-8] topic alias 0
    assert_eq!(
        v5(&B::new().s("a").props(&[0x23, 0, 0]).frame(0x30)),
        Err(MqttError::ProtocolError("topic alias of 0"))
    );
    // [MQTT-3.3.4-6] no subscription identifier from a client
    assert_eq!(
        v5(&B::new().s("a").props(&[0x0B, 1]).frame(0x30)),
        Err(MqttError::ProtocolError(
            "subscription identifier in a PUBLISH from a client"
        ))
    );
    // [MQTT-3.3.2-14] response topic without wildcards
    assert_eq!(
        v5(&B::new().s("a").props(&[0x08, 0, 1, b'#']).frame(0x30)),
        Err(MqttError::TopicName("wildcard in a topic name"))
    );
    // payload format indicator 0 or 1; a CONNECT-only property
    assert_eq!(
        label(v5(&B::new().s("a").props(&[0x01, 2]).frame(0x30))),
        "protocol_error"
    );
    assert_eq!(
        label(v5(&B::new().s("a").props(&[0x11, 0, 0, 0, 1]).frame(0x30))),
        "malformed"
    );
    // duplicate
    assert_eq!(
        v5(&B::new()
            .s("a")
            .props(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 1])
            .frame(0x30)),
        Err(MqttError::ProtocolError("property included more than once"))
    );
    // a property length past the end
    assert_eq!(
        label(v5(&B::new().s("a").raw(&[9, 1]).frame(0x30))),
        "malformed"
    );
}

#[test]
fn acks_v4() {
    for first in [0x40, 0x50, 0x62, 0x70] {
        assert_eq!(v4(&B::new().u16(5).frame(first)), Ok(()), "{first:#x}");
        // remaining length must be 2
        assert_eq!(
            v4(&B::new().u16(5).u8(0).frame(first)),
            Err(MqttError::Malformed(
                "remaining length does not match the packet"
            ))
        );
        assert_eq!(label(v4(&B::new().u8(5).frame(first))), "malformed");
        // packet id 0
        assert_eq!(v4(&B::new().u16(0).frame(first)), Err(ID0));
    }
    // [MQTT-2.2.2-1] flags: PUBACK/PUBREC/PUBCOMP 0, PUBREL 0b0010 ([MQTT-3.6.1-1])
    for first in [0x41, 0x58, 0x60, 0x63, 0x72] {
        assert_eq!(
            v4(&B::new().u16(5).frame(first)),
            Err(MAL_FLAGS),
            "{first:#x}"
        );
    }
}

#[test]
fn acks_v5() {
    for first in [0x40, 0x50, 0x62, 0x70] {
        assert_eq!(v5(&B::new().u16(5).frame(first)), Ok(()));
        assert_eq!(v5(&B::new().u16(5).u8(0).frame(first)), Ok(()));
        assert_eq!(
            v5(&B::new()
                .u16(5)
                .u8(0)
                .props(&[0x1F, 0, 1, b'r'])
                .frame(first)),
            Ok(())
        );
        assert_eq!(v5(&B::new().u16(0).u8(0).frame(first)), Err(ID0));
        // [MQTT-3.4.2-1] [MQTT-3.5.2-1] [MQTT-3.6.2-1] [MQTT-3.7.2-1] reason codes
        assert_eq!(
            v5(&B::new().u16(5).u8(0x01).frame(first)),
            Err(MqttError::ProtocolError(
                "reason code not valid for this packet"
            ))
        );
        assert_eq!(
            label(v5(&B::new().u16(5).u8(0).props(&[0x26]).frame(first))),
            "malformed"
        );
        assert_eq!(
            label(v5(&B::new().u16(5).u8(0).props(&[0x0B, 1]).frame(first))),
            "malformed"
        );
    }
    // 0x10 is in the PUBACK and PUBREC tables, but not the PUBREL one
    assert_eq!(
        label(v5(&B::new().u16(5).u8(0x10).frame(0x62))),
        "protocol_error"
    );
    assert_eq!(v5(&B::new().u16(5).u8(0x92).frame(0x62)), Ok(()));
}

#[test]
fn acks_v5_reason_codes_a_client_may_send() {
    // §3.4.2.1 / §3.5.2.1: every PUBACK and PUBREC code but 0x10 may come from the
    // receiver of a PUBLISH, a client too
    for first in [0x40, 0x50] {
        for code in [0x00, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99] {
            assert_eq!(
                v5(&B::new().u16(5).u8(code).props(&[]).frame(first)),
                Ok(()),
                "{first:#04x} {code:#04x}"
            );
        }
        // 0x10 No matching subscribers: "This is sent only by the Server"
        assert_eq!(
            v5(&B::new().u16(5).u8(0x10).frame(first)),
            Err(MqttError::ProtocolError(
                "PUBACK or PUBREC reason code 0x10 (No matching subscribers) is the server's"
            )),
            "{first:#04x}"
        );
    }
}

#[test]
fn subscribe_v4() {
    let mut s = session_after(&connect_v4());
    let f = B::new().u16(3).s("a/+/b").u8(1).s("#").u8(2).frame(0x82);
    let Packet::Subscribe(subs) = s.validate(&f).unwrap() else {
        panic!()
    };
    assert_eq!(subs.packet_id(), 3);
    assert_eq!(subs.iter().collect::<Vec<_>>(), [("a/+/b", 1), ("#", 2)]);
    // [MQTT-3.8.1-1] flags 0b0010
    assert_eq!(
        v4(&B::new().u16(3).s("a").u8(0).frame(0x80)),
        Err(MAL_FLAGS)
    );
    // [MQTT-2.3.1-1] packet id 0
    assert_eq!(v4(&B::new().u16(0).s("a").u8(0).frame(0x82)), Err(ID0));
    // [MQTT-3.8.3-3] at least one filter
    assert_eq!(
        v4(&B::new().u16(1).frame(0x82)),
        Err(MqttError::ProtocolError("SUBSCRIBE without a topic filter"))
    );
    // [MQTT-3-8.3-4] requested QoS 3 or reserved bits
    for opt in [3, 4, 0x80] {
        assert_eq!(
            v4(&B::new().u16(1).s("a").u8(opt).frame(0x82)),
            Err(MqttError::Malformed(
                "requested QoS over 2 or reserved bits set"
            ))
        );
    }
    // a filter without its options byte
    assert_eq!(label(v4(&B::new().u16(1).s("a").frame(0x82))), "malformed");
}

#[test]
fn topic_filters() {
    // [MQTT-4.7.1-2] '#' last and alone; [MQTT-4.7.1-3] '+' alone; [MQTT-4.7.3-1] not empty
    let cases = [
        ("a/#/b", "'#' not the last level"),
        ("a#", "'#' not alone in its level"),
        ("a/b#", "'#' not alone in its level"),
        ("a+", "'+' not alone in its level"),
        ("a/+b/c", "'+' not alone in its level"),
        ("", "empty topic filter"),
    ];
    for (filter, why) in cases {
        assert_eq!(
            v4(&B::new().u16(1).s(filter).u8(0).frame(0x82)),
            Err(MqttError::TopicFilter(why)),
            "{filter}"
        );
        assert_eq!(
            v4(&B::new().u16(1).s(filter).frame(0xA2)),
            Err(MqttError::TopicFilter(why)),
            "{filter}"
        );
    }
    for ok in ["#", "+", "+/+", "a/+/#", "/", "//", "$SYS/#", "a/b"] {
        assert_eq!(v4(&B::new().u16(1).s(ok).u8(0).frame(0x82)), Ok(()), "{ok}");
    }
}

#[test]
fn subscribe_v5_options() {
    let f = B::new()
        .u16(1)
        .props(&[0x0B, 5])
        .s("a/#")
        .u8(0x2E)
        .s("$share/g/b")
        .u8(0x02)
        .frame(0x82);
    assert_eq!(v5(&f), Ok(()));
    // [MQTT-1.5.5-1] the Subscription Identifier, a Variable Byte Integer, minimally
    // encoded: 1 in two bytes is malformed
    assert_eq!(
        v5(&B::new()
            .u16(1)
            .props(&[0x0B, 0x81, 0x00])
            .s("a")
            .u8(0)
            .frame(0x82)),
        Err(MqttError::Malformed(
            "variable byte integer not minimally encoded"
        ))
    );
    // [MQTT-3.8.3-5] reserved bits
    assert_eq!(
        v5(&B::new().u16(1).props(&[]).s("a").u8(0x40).frame(0x82)),
        Err(MqttError::Malformed(
            "reserved subscription option bits set"
        ))
    );
    // §3.8.3.1 "It is a Protocol Error if the Maximum QoS field has the value 3": the
    // client gets DISCONNECT 0x82 (once the broker's CONNACK is out)
    let mut s = session_after(&connect_v5());
    s.connack_sent();
    let e = s
        .validate(&B::new().u16(1).props(&[]).s("a").u8(3).frame(0x82))
        .unwrap_err();
    assert_eq!(e, MqttError::ProtocolError("subscription QoS 3"));
    assert_eq!(s.answer(&e).bytes(), [0xE0, 0x02, 0x82, 0x00]);
    // §3.8.3.1 retain handling 3 is a protocol error
    assert_eq!(
        v5(&B::new().u16(1).props(&[]).s("a").u8(0x30).frame(0x82)),
        Err(MqttError::ProtocolError("retain handling 3"))
    );
    // [MQTT-3.8.3-4] no local on a shared subscription
    assert_eq!(
        v5(&B::new()
            .u16(1)
            .props(&[])
            .s("$share/g/a")
            .u8(0x04)
            .frame(0x82)),
        Err(MqttError::ProtocolError(
            "no local on a shared subscription"
        ))
    );
    // v4 has no shared subscriptions: the same bytes are a plain filter there
    assert_eq!(
        v4(&B::new().u16(1).s("$share/g/a").u8(0x00).frame(0x82)),
        Ok(())
    );
    // [MQTT-3.8.3-2] at least one filter; subscription identifier 0
    assert_eq!(
        label(v5(&B::new().u16(1).props(&[]).frame(0x82))),
        "protocol_error"
    );
    assert_eq!(
        v5(&B::new().u16(1).props(&[0x0B, 0]).s("a").u8(0).frame(0x82)),
        Err(MqttError::ProtocolError("subscription identifier of 0"))
    );
}

#[test]
fn shared_subscription_names() {
    // [MQTT-4.8.2-1] share name non-empty without wildcards; [MQTT-4.8.2-2] then '/' and a filter
    for (f, why) in [
        ("$share//a", "invalid share name"),
        ("$share/g+/a", "invalid share name"),
        ("$share/#/a", "invalid share name"),
        ("$share/g", "shared subscription without a filter"),
        ("$share/g/", "empty topic filter"),
        ("$share/g/a#", "'#' not alone in its level"),
    ] {
        assert_eq!(
            v5(&B::new().u16(1).props(&[]).s(f).u8(0).frame(0x82)),
            Err(MqttError::TopicFilter(why)),
            "{f}"
        );
    }
}

#[test]
fn unsubscribe() {
    let mut s = session_after(&connect_v4());
    let f = B::new().u16(9).s("a/+").s("b").frame(0xA2);
    let Packet::Unsubscribe(u) = s.validate(&f).unwrap() else {
        panic!()
    };
    assert_eq!(
        (u.packet_id(), u.iter().collect::<Vec<_>>()),
        (9, vec![("a/+", 0), ("b", 0)])
    );
    // [MQTT-3.10.1-1] flags
    assert_eq!(v4(&B::new().u16(9).s("a").frame(0xA0)), Err(MAL_FLAGS));
    // packet id 0; [MQTT-3.10.3-2] at least one filter
    assert_eq!(v4(&B::new().u16(0).s("a").frame(0xA2)), Err(ID0));
    assert_eq!(
        v4(&B::new().u16(1).frame(0xA2)),
        Err(MqttError::ProtocolError(
            "UNSUBSCRIBE without a topic filter"
        ))
    );
    // v5: user properties only
    assert_eq!(
        v5(&B::new()
            .u16(1)
            .props(&[0x26, 0, 1, b'k', 0, 0])
            .s("a")
            .frame(0xA2)),
        Ok(())
    );
    assert_eq!(
        label(v5(&B::new().u16(1).props(&[0x0B, 1]).s("a").frame(0xA2))),
        "malformed"
    );
    assert_eq!(
        label(v5(&B::new().u16(1).props(&[]).frame(0xA2))),
        "protocol_error"
    );
}

#[test]
fn pingreq() {
    assert_eq!(v4(&[0xC0, 0x00]), Ok(()));
    assert_eq!(v5(&[0xC0, 0x00]), Ok(()));
    assert_eq!(v4(&[0xC1, 0x00]), Err(MAL_FLAGS));
    assert_eq!(
        v4(&[0xC0, 0x01, 0x00]),
        Err(MqttError::Malformed(
            "remaining length does not match the packet"
        ))
    );
}

#[test]
fn disconnect_v4() {
    assert_eq!(v4(&[0xE0, 0x00]), Ok(()));
    // [MQTT-3.14.1-1]
    assert_eq!(v4(&[0xE2, 0x00]), Err(MAL_FLAGS));
    assert_eq!(label(v4(&[0xE0, 0x01, 0x00])), "malformed");
}

#[test]
fn disconnect_v5() {
    assert_eq!(v5(&[0xE0, 0x00]), Ok(()));
    assert_eq!(v5(&[0xE0, 0x01, 0x04]), Ok(()));
    assert_eq!(
        v5(&B::new().u8(0).props(&[0x1F, 0, 1, b'x']).frame(0xE0)),
        Ok(())
    );
    // [MQTT-3.14.2-1] reason codes
    assert_eq!(label(v5(&[0xE0, 0x01, 0x05])), "protocol_error");
    // server reference is server-only
    assert_eq!(
        v5(&B::new().u8(0x00).props(&[0x1C, 0, 1, b's']).frame(0xE0)),
        Err(MqttError::ProtocolError("server reference from a client"))
    );
    // §3.14.2.2.2: session expiry 0 in CONNECT, non-zero in DISCONNECT
    let f = B::new().u8(0).props(&[0x11, 0, 0, 0, 5]).frame(0xE0);
    assert_eq!(
        v5(&f),
        Err(MqttError::ProtocolError(
            "non-zero session expiry in DISCONNECT after 0 in CONNECT"
        ))
    );
    let c = head("MQTT", 5, 2)
        .props(&[0x11, 0, 0, 0, 9])
        .s("c")
        .frame(0x10);
    assert!(session_after(&c).validate(&f).is_ok());
}

#[test]
fn disconnect_v5_reason_codes_by_sender() {
    // [MQTT-3.14.2-1], Table 3-10's "Sent by" column: a client may send these ...
    let client = [
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
    ];
    for code in client {
        assert_eq!(v5(&[0xE0, 0x01, code]), Ok(()), "{code:#04x}");
        assert_eq!(
            session_after(&connect_v5()).validate(&[0xE0, 0x02, code, 0x00]),
            Ok(Packet::Disconnect(code)),
            "{code:#04x}"
        );
    }
    // ... and these only the server
    let server = [
        0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];
    for code in server {
        assert_eq!(
            v5(&B::new().u8(code).props(&[]).frame(0xE0)),
            Err(MqttError::ProtocolError(
                "DISCONNECT reason code only the server may send"
            )),
            "{code:#04x}"
        );
    }
    // the rest of the byte is in neither column
    for code in 0..=u8::MAX {
        if !client.contains(&code) && !server.contains(&code) {
            assert_eq!(
                v5(&[0xE0, 0x01, code]),
                Err(MqttError::ProtocolError(
                    "reason code not valid for this packet"
                )),
                "{code:#04x}"
            );
        }
    }
}

#[test]
fn nothing_after_disconnect() {
    // [MQTT-3.14.4-1]
    let mut s = session_after(&connect_v4());
    assert_eq!(s.validate(&[0xE0, 0x00]), Ok(Packet::Disconnect(0)));
    assert_eq!(
        s.validate(&[0xC0, 0x00]),
        Err(MqttError::ProtocolError("packet after DISCONNECT"))
    );
}

/// A client's AUTH 0x19 (Re-authenticate) before the CONNACK.
const RE_AUTH_BEFORE_CONNACK: MqttError =
    MqttError::ProtocolError("AUTH reason code 0x19 (Re-authenticate) before the CONNACK");

#[test]
fn auth_v5() {
    let c = head("MQTT", 5, 2)
        .props(&[0x15, 0, 1, b'm'])
        .s("c")
        .frame(0x10);
    let mut s = session_after(&c);
    let f = B::new()
        .u8(0x18)
        .props(&[0x15, 0, 1, b'm', 0x16, 0, 1, 1])
        .frame(0xF0);
    assert_eq!(s.validate(&f), Ok(Packet::Auth(0x18)));
    // [MQTT-3.15.1-1] flags
    let mut bad = f.clone();
    bad[0] = 0xF1;
    assert_eq!(session_after(&c).validate(&bad), Err(MAL_FLAGS));
    // [MQTT-3.15.2-1] reason codes
    let f = B::new().u8(0x01).props(&[0x15, 0, 1, b'm']).frame(0xF0);
    assert_eq!(label(session_after(&c).validate(&f)), "protocol_error");
    // Table 3-11: 0x18 from either side, 0x19 from the client, 0x00 (Success) from
    // the server alone, also when it is implied by an empty AUTH. 0x19 (Re-authenticate)
    // only after the CONNACK (§4.12.1); before it, the client's AUTH continues the
    // exchange, 0x18 [MQTT-4.12.0-3]
    let f = B::new().u8(0x19).props(&[0x15, 0, 1, b'm']).frame(0xF0);
    assert_eq!(session_after(&c).validate(&f), Err(RE_AUTH_BEFORE_CONNACK));
    let mut s = session_after(&c);
    s.connack_sent();
    assert_eq!(s.validate(&f), Ok(Packet::Auth(0x19)));
    let success = MqttError::ProtocolError("AUTH reason code 0x00 (Success) is the server's");
    let f = B::new().u8(0x00).props(&[0x15, 0, 1, b'm']).frame(0xF0);
    assert_eq!(session_after(&c).validate(&f), Err(success));
    assert_eq!(session_after(&c).validate(&[0xF0, 0x00]), Err(success));
    // §3.15.2.2.2 the method must be there
    let f = B::new().u8(0x18).props(&[]).frame(0xF0);
    assert_eq!(
        session_after(&c).validate(&f),
        Err(MqttError::ProtocolError(
            "AUTH without an authentication method"
        ))
    );
    // §4.12 no AUTH unless the CONNECT chose an authentication method
    let f = B::new().u8(0x18).props(&[0x15, 0, 1, b'm']).frame(0xF0);
    assert_eq!(
        v5(&f),
        Err(MqttError::ProtocolError(
            "AUTH without an authentication method in CONNECT"
        ))
    );
    // type 15 is reserved before 5.0
    assert_eq!(v4(&f), Err(MqttError::Malformed("reserved packet type")));
}

#[test]
fn only_auth_or_disconnect_before_connack_with_enhanced_auth() {
    // v5 [MQTT-3.1.2-30]
    let c = head("MQTT", 5, 2)
        .props(&[0x15, 0, 1, b'm'])
        .s("c")
        .frame(0x10);
    let auth = B::new().u8(0x18).props(&[0x15, 0, 1, b'm']).frame(0xF0);
    let publish = B::new().s("a").props(&[]).frame(0x30);
    let mut s = session_after(&c);
    assert_eq!(s.validate(&auth), Ok(Packet::Auth(0x18)));
    assert_eq!(
        s.validate(&publish),
        Err(MqttError::ProtocolError(
            "packet other than AUTH or DISCONNECT before CONNACK"
        ))
    );
    let mut s = session_after(&c);
    assert_eq!(s.validate(&[0xE0, 0x00]), Ok(Packet::Disconnect(0)));
    let mut s = session_after(&c);
    s.connack_sent();
    assert!(s.validate(&publish).is_ok());
    // re-authentication after CONNACK
    assert_eq!(s.validate(&auth), Ok(Packet::Auth(0x18)));
    // without an authentication method, nothing waits for the CONNACK
    assert!(session_after(&connect_v5()).validate(&publish).is_ok());
}

/// [MQTT-4.12.0-5]: with an Authentication Method in the CONNECT, every AUTH carries
/// that same method; [MQTT-4.12.1-1]: a re-authentication after the CONNACK too. The
/// value is compared exactly (no case folding, no prefix), and a refusal closes the
/// session like any other AUTH violation.
#[test]
fn auth_method_must_be_the_connects() {
    const OTHER: MqttError =
        MqttError::ProtocolError("AUTH with an authentication method other than the CONNECT's");
    let c = head("MQTT", 5, 2)
        .props(&[&[0x15, 0, 11][..], b"SCRAM-SHA-1"].concat())
        .s("c")
        .frame(0x10);
    let auth = |code: u8, method: &str| {
        let mut props = vec![0x15];
        props.extend_from_slice(&u16::try_from(method.len()).unwrap().to_be_bytes());
        props.extend_from_slice(method.as_bytes());
        props.extend_from_slice(&[0x16, 0, 2, 7, 7]);
        B::new().u8(code).props(&props).frame(0xF0)
    };
    // before the CONNACK: the same method goes through, any other is refused
    let mut s = session_after(&c);
    assert_eq!(
        s.validate(&auth(0x18, "SCRAM-SHA-1")),
        Ok(Packet::Auth(0x18))
    );
    assert_eq!(
        s.validate(&auth(0x18, "SCRAM-SHA-1")),
        Ok(Packet::Auth(0x18))
    );
    for other in [
        "SCRAM-SHA-256",
        "scram-sha-1",
        "SCRAM-SHA-",
        "SCRAM-SHA-11",
        "",
        "m",
    ] {
        let mut s = session_after(&c);
        assert_eq!(s.validate(&auth(0x18, other)), Err(OTHER), "{other:?}");
        assert_eq!(
            label(s.validate(&auth(0x18, "SCRAM-SHA-1"))),
            "protocol_error"
        );
        // the session stays closed, with the same error
        assert_eq!(s.validate(&auth(0x18, "SCRAM-SHA-1")), Err(OTHER));
    }
    // ... and so is a re-authentication with the same method, which may only come after
    // the CONNACK (§4.12.1): during the exchange the client's AUTH is 0x18
    // [MQTT-4.12.0-3]
    let mut s = session_after(&c);
    assert_eq!(
        s.validate(&auth(0x18, "SCRAM-SHA-1")),
        Ok(Packet::Auth(0x18))
    );
    assert_eq!(
        s.validate(&auth(0x19, "SCRAM-SHA-1")),
        Err(RE_AUTH_BEFORE_CONNACK)
    );
    assert_eq!(
        s.validate(&auth(0x18, "SCRAM-SHA-1")),
        Err(RE_AUTH_BEFORE_CONNACK)
    );
    // after the CONNACK, a re-authentication [MQTT-4.12.1-1]
    let mut s = session_after(&c);
    s.connack_sent();
    assert_eq!(
        s.validate(&auth(0x19, "SCRAM-SHA-1")),
        Ok(Packet::Auth(0x19))
    );
    assert_eq!(
        s.validate(&auth(0x18, "SCRAM-SHA-1")),
        Ok(Packet::Auth(0x18))
    );
    assert_eq!(s.validate(&auth(0x19, "SCRAM-SHA-256")), Err(OTHER));
    // each session keeps its own CONNECT's method
    let c2 = head("MQTT", 5, 2)
        .props(&[&[0x15, 0, 13][..], b"SCRAM-SHA-256"].concat())
        .s("c")
        .frame(0x10);
    let mut s = session_after(&c2);
    assert_eq!(
        s.validate(&auth(0x18, "SCRAM-SHA-256")),
        Ok(Packet::Auth(0x18))
    );
    assert_eq!(
        session_after(&c2).validate(&auth(0x18, "SCRAM-SHA-1")),
        Err(OTHER)
    );
    // an empty method in the CONNECT is a method: only an empty one matches it
    let c3 = head("MQTT", 5, 2).props(&[0x15, 0, 0]).s("c").frame(0x10);
    assert_eq!(
        session_after(&c3).validate(&auth(0x18, "")),
        Ok(Packet::Auth(0x18))
    );
    assert_eq!(session_after(&c3).validate(&auth(0x18, "m")), Err(OTHER));
}

/// A v5 session whose broker answered with this CONNACK property list.
fn after_connack(props: &[u8]) -> Session {
    let mut s = session_after(&connect_v5());
    s.on_connack(&B::new().u8(0).u8(0).props(props).frame(0x20));
    s
}

#[test]
fn connack_limits_bind_the_client() {
    let props = [
        0x24, 1, // Maximum QoS 1
        0x25, 0, // Retain Available 0
        0x22, 0, 5, // Topic Alias Maximum 5
        0x28, 0, 0x29, 0, 0x2A, 0, // no wildcard, subscription id or shared subscriptions
        0x27, 0, 0, 0, 100, // Maximum Packet Size 100
        0x13, 0, 30, // Server Keep Alive 30
        0x1F, 0, 2, b'o', b'k', 0x26, 0, 1, b'k', 0, 1, b'v', // reason string, user property
    ];
    let s = after_connack(&props);
    assert_eq!(s.keep_alive(), 30);
    let check = |p: &[u8]| after_connack(&props).validate(p).map(|_| ());
    // [MQTT-3.2.2-11]
    assert_eq!(
        check(&B::new().s("a").u16(1).props(&[]).frame(0x34)),
        Err(MqttError::ServerLimit(Limit::QoS))
    );
    assert_eq!(
        check(&B::new().s("a").u16(1).props(&[]).frame(0x32)),
        Ok(())
    );
    // [MQTT-3.2.2-14]
    assert_eq!(
        check(&B::new().s("a").props(&[]).frame(0x31)),
        Err(MqttError::ServerLimit(Limit::Retain))
    );
    // [MQTT-3.2.2-17]
    assert_eq!(
        check(&B::new().s("a").props(&[0x23, 0, 6]).frame(0x30)),
        Err(MqttError::ServerLimit(Limit::TopicAlias))
    );
    assert_eq!(
        check(&B::new().s("a").props(&[0x23, 0, 5]).frame(0x30)),
        Ok(())
    );
    // §3.2.2.3.11 to §3.2.2.3.13
    let sub = |f: &str, props: &[u8]| B::new().u16(1).props(props).s(f).u8(0).frame(0x82);
    assert_eq!(
        check(&sub("a/+", &[])),
        Err(MqttError::ServerLimit(Limit::Wildcard))
    );
    assert_eq!(
        check(&sub("#", &[])),
        Err(MqttError::ServerLimit(Limit::Wildcard))
    );
    assert_eq!(
        check(&sub("$share/g/a", &[])),
        Err(MqttError::ServerLimit(Limit::Shared))
    );
    assert_eq!(
        check(&sub("a", &[0x0B, 1])),
        Err(MqttError::ServerLimit(Limit::SubscriptionId))
    );
    assert_eq!(check(&sub("a/b", &[])), Ok(()));
    // §3.2.2.3.6 Maximum Packet Size: the smaller cap wins
    assert_eq!(s.framer().max_packet_size(), 100);
    let big = B::new().s("a").props(&[]).raw(&[0; 100]).frame(0x30);
    assert_eq!(label(after_connack(&props).next(&big)), "packet_too_large");
}

#[test]
fn connack_defaults_and_what_announces_nothing() {
    // [MQTT-3.2.2-18]: no Topic Alias Maximum means no topic alias at all
    let alias = B::new().s("a").props(&[0x23, 0, 1]).frame(0x30);
    assert_eq!(
        after_connack(&[]).validate(&alias),
        Err(MqttError::ServerLimit(Limit::TopicAlias))
    );
    // defaults allow QoS 2, retain, wildcards
    assert!(
        after_connack(&[])
            .validate(&B::new().s("a").u16(1).props(&[]).frame(0x35))
            .is_ok()
    );
    assert_eq!(after_connack(&[]).keep_alive(), 60);
    // a CONNACK that cannot be read, or none seen: nothing is enforced
    let mut s = session_after(&connect_v5());
    s.on_connack(&[0x20, 0x05, 0x00, 0x00, 0x02, 0x7F, 0x00]);
    assert!(s.validate(&alias).is_ok());
    let mut s = session_after(&connect_v5());
    s.connack_sent();
    assert!(s.validate(&alias).is_ok());
    // 3.1.1 CONNACKs carry no limits
    let mut s = session_after(&connect_v4());
    s.on_connack(&[0x20, 0x02, 0x00, 0x00]);
    assert!(s.validate(&B::new().s("a").u16(1).frame(0x35)).is_ok());
}

#[test]
fn packet_types_from_a_client() {
    // [MQTT-3.1.0-2] a second CONNECT
    assert_eq!(
        v4(&connect_v4()),
        Err(MqttError::ProtocolError("second CONNECT"))
    );
    assert_eq!(
        v5(&connect_v5()),
        Err(MqttError::ProtocolError("second CONNECT"))
    );
    // server-to-client types
    for first in [0x20, 0x90, 0xB0, 0xD0] {
        assert_eq!(
            v4(&[first, 0x00]),
            Err(MqttError::ProtocolError(
                "server-to-client packet type from a client"
            ))
        );
    }
    // type 0 is reserved
    assert_eq!(
        v4(&[0x00, 0x00]),
        Err(MqttError::Malformed("reserved packet type"))
    );
}

#[test]
fn mqtt_3_1_sessions_follow_3_1_1_packet_rules() {
    let mut s = session_after(&connect_v3());
    assert!(
        s.validate(&B::new().u16(1).s("a").u8(1).frame(0x82))
            .is_ok()
    );
    assert_eq!(
        s.validate(&B::new().s("a/#").frame(0x30)),
        Err(MqttError::TopicName("wildcard in a topic name"))
    );
}

#[test]
fn mqtt_3_1_allows_dup_on_resent_pubrel_subscribe_unsubscribe() {
    // MQTT 3.1 §2.1: DUP is set when a PUBREL, SUBSCRIBE or UNSUBSCRIBE is re-delivered.
    let pubrel = [0x6A, 0x02, 0x00, 0x01];
    let subscribe = [0x8A, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00];
    let unsubscribe = [0xAA, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'];
    let mut s = session_after(&connect_v3());
    assert_eq!(s.validate(&pubrel), Ok(Packet::PubRel(1)));
    let Ok(Packet::Subscribe(f)) = s.validate(&subscribe) else {
        panic!()
    };
    assert_eq!(f.iter().collect::<Vec<_>>(), [("a", 0)]);
    assert!(matches!(
        s.validate(&unsubscribe),
        Ok(Packet::Unsubscribe(_))
    ));
    // Through `next`, as a layer frames them.
    let bytes = [&pubrel[..], &subscribe, &unsubscribe].concat();
    let mut s = session_after(&connect_v3());
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let Ok(Next::Packet { len, .. }) = s.next(rest) else {
            panic!("{rest:02x?}")
        };
        rest = &rest[len..];
    }
    // The other bits stay as 3.1.1 has them: QoS 1, no RETAIN.
    for first in [0x68, 0x6C, 0x6B, 0x88, 0x8E, 0xAB, 0xA8] {
        let frame = B::new().u16(1).s("a").frame(first);
        let r = session_after(&connect_v3()).validate(&frame);
        assert_eq!(r, Err(MAL_FLAGS), "{first:#x}");
    }
    // 3.1.1 and 5.0 reserve the bit.
    for packet in [&pubrel[..], &subscribe, &unsubscribe] {
        assert_eq!(v4(packet), Err(MAL_FLAGS), "{packet:02x?}");
        assert_eq!(v5(packet), Err(MAL_FLAGS), "{packet:02x?}");
    }
    let v5_subscribe = B::new().u16(1).props(&[]).s("a").u8(0).frame(0x8A);
    assert_eq!(v5(&v5_subscribe), Err(MAL_FLAGS));
}

#[test]
fn a_failed_session_stays_failed() {
    let mut s = session_after(&connect_v4());
    assert!(s.validate(&[0xC1, 0x00]).is_err());
    assert_eq!(s.validate(&[0xC0, 0x00]), Err(MAL_FLAGS));
    assert_eq!(s.next(&[0xC0, 0x00]), Err(MAL_FLAGS));
}

#[test]
fn size_caps_before_and_after_connack() {
    let mut s = Session::new(Config::new().max_connect_size(20).max_packet_size(40));
    // a CONNECT over 20 bytes is refused from its header
    let big = head("MQTT", 4, 2).s("0123456789abc").frame(0x10);
    assert_eq!(
        s.clone().next(&big[..2]),
        Err(MqttError::PacketTooLarge { size: 27, max: 20 })
    );
    let c = connect_v4();
    assert!(matches!(
        s.next(&c),
        Ok(Next::Packet {
            packet: Packet::Connect(_),
            ..
        })
    ));
    let p = B::new().s("t").raw(&[0; 30]).frame(0x30); // 35 bytes
    // before the CONNACK, the small cap still holds
    assert_eq!(
        s.clone().next(&p[..2]),
        Err(MqttError::PacketTooLarge { size: 35, max: 20 })
    );
    s.connack_sent();
    assert!(matches!(
        s.clone().next(&p),
        Ok(Next::Packet { len: 35, .. })
    ));
    let p = B::new().s("t").raw(&[0; 40]).frame(0x30);
    assert_eq!(label(s.next(&p[..2])), "packet_too_large");
}
