//! Version-correct answers and the exact bytes of every encoder.

mod common;

use aegis_core::error::Reject;
use aegis_mqtt::encode::{self, reason};
use aegis_mqtt::{Answer, Config, Limit, MqttError, Phase, Session, Version};
use common::{B, connect_v4, connect_v5, head, session_after};

#[test]
fn encoders_exact_bytes() {
    assert_eq!(encode::connack_v3(0x01), [0x20, 0x02, 0x00, 0x01]);
    assert_eq!(encode::connack_v5(0x85), [0x20, 0x03, 0x00, 0x85, 0x00]);
    assert_eq!(encode::disconnect_v5(0x8D), [0xE0, 0x02, 0x8D, 0x00]);
    assert_eq!(
        encode::puback_v5(0x1234, 0x97),
        [0x40, 0x04, 0x12, 0x34, 0x97, 0x00]
    );
    let mut v = Vec::new();
    encode::suback(
        &mut v,
        Version::V3_1_1,
        10,
        &[0x00, reason::V3_SUBACK_FAILURE, 0x02],
    );
    assert_eq!(v, [0x90, 0x05, 0x00, 0x0A, 0x00, 0x80, 0x02]);
    let mut v = Vec::new();
    encode::suback(&mut v, Version::V5, 10, &[0x01, 0x97, 0x87, 0x8F]);
    assert_eq!(v, [0x90, 0x07, 0x00, 0x0A, 0x00, 0x01, 0x97, 0x87, 0x8F]);
    // a SUBACK for 200 filters needs a two-byte remaining length
    let mut v = Vec::new();
    encode::suback(&mut v, Version::V3_1_1, 1, &[0; 200]);
    assert_eq!(&v[..5], [0x90, 0xCA, 0x01, 0x00, 0x01]);
    assert_eq!(v.len(), 3 + 202);
}

#[test]
fn encoded_answers_parse_with_mqttbytes() {
    use bytes::BytesMut;
    let mut b = BytesMut::from(&encode::connack_v3(0x02)[..]);
    assert!(matches!(
        mqttbytes::v4::read(&mut b, 100),
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    let mut b = BytesMut::from(&encode::connack_v5(0x87)[..]);
    assert!(matches!(
        mqttbytes::v5::read(&mut b, 100),
        Ok(mqttbytes::v5::Packet::ConnAck(_))
    ));
    let mut b = BytesMut::new();
    encode::suback(&mut b, Version::V5, 3, &[0x00, 0x97]);
    assert!(matches!(
        mqttbytes::v5::read(&mut b, 100),
        Ok(mqttbytes::v5::Packet::SubAck(_))
    ));
}

fn at_connect(v: Option<Version>, e: MqttError) -> Vec<u8> {
    e.answer(Phase::Connect(v)).bytes()
}

#[test]
fn v3_connect_answers() {
    let v = Some(Version::V3_1_1);
    // [MQTT-3.1.4-1] malformed: close without CONNACK
    assert_eq!(at_connect(v, MqttError::Malformed("x")), Vec::<u8>::new());
    assert_eq!(
        at_connect(v, MqttError::ProtocolError("x")),
        Vec::<u8>::new()
    );
    // [MQTT-3.1.2-2] unsupported level
    assert_eq!(
        at_connect(None, MqttError::UnsupportedVersion { level: 6 }),
        [0x20, 0x02, 0x00, 0x01]
    );
    // [MQTT-3.1.3-9] identifier rejected
    assert_eq!(
        at_connect(v, MqttError::ClientId("x")),
        [0x20, 0x02, 0x00, 0x02]
    );
    assert_eq!(
        at_connect(Some(Version::V3_1), MqttError::ClientId("x")),
        [0x20, 0x02, 0x00, 0x02]
    );
    assert_eq!(
        at_connect(v, MqttError::ServerUnavailable),
        [0x20, 0x02, 0x00, 0x03]
    );
    assert_eq!(
        at_connect(v, MqttError::UpstreamClosed),
        [0x20, 0x02, 0x00, 0x03]
    );
    assert_eq!(
        at_connect(v, MqttError::ServerBusy),
        [0x20, 0x02, 0x00, 0x03]
    );
    assert_eq!(
        at_connect(v, MqttError::NotAuthorized),
        [0x20, 0x02, 0x00, 0x05]
    );
    // The policy's CONNECT brake, over the client's own budget or the shared overflow
    // bucket: "not authorized", which a client does not retry blindly.
    for e in [MqttError::ConnectRate, MqttError::ConnectOverflow] {
        assert_eq!(at_connect(v, e), [0x20, 0x02, 0x00, 0x05], "{e:?}");
    }
    // A message rate has no 3.x CONNACK code: close.
    for e in [MqttError::MessageRate, MqttError::MessageOverflow] {
        assert_eq!(at_connect(v, e), Vec::<u8>::new(), "{e:?}");
    }
    // Only MQTT 5 has an AUTH exchange to time out; 3.x would get "not authorized".
    assert_eq!(
        at_connect(v, MqttError::AuthTimeout),
        [0x20, 0x02, 0x00, 0x05]
    );
    // [MQTT-3.2.2-6] no return code fits: close
    assert_eq!(
        at_connect(
            v,
            MqttError::KeepAlive {
                requested: 0,
                max: 60
            }
        ),
        Vec::<u8>::new()
    );
    assert_eq!(
        at_connect(v, MqttError::PacketTooLarge { size: 9, max: 8 }),
        Vec::<u8>::new()
    );
    assert_eq!(
        at_connect(None, MqttError::UnknownProtocol),
        Vec::<u8>::new()
    );
    assert_eq!(
        at_connect(None, MqttError::Malformed("x")),
        Vec::<u8>::new()
    );
    // No complete CONNECT in time: close, whatever the version.
    for version in [None, v] {
        assert_eq!(
            at_connect(version, MqttError::ConnectTimeout),
            Vec::<u8>::new()
        );
    }
}

#[test]
fn v5_connect_answers() {
    let v = Some(Version::V5);
    let cases = [
        (MqttError::Malformed("x"), 0x81),
        (MqttError::ProtocolError("x"), 0x82),
        (MqttError::ClientId("x"), 0x85),
        (MqttError::NotAuthorized, 0x87),
        (MqttError::AuthTimeout, 0x87),
        (MqttError::ServerUnavailable, 0x88),
        (MqttError::UpstreamClosed, 0x88),
        (MqttError::ServerBusy, 0x89),
        (MqttError::PacketTooLarge { size: 9, max: 8 }, 0x95),
        (MqttError::QuotaExceeded, 0x97),
        (MqttError::ConnectionRate, 0x9F),
        (MqttError::ConnectRate, 0x9F),
        (MqttError::ConnectOverflow, 0x9F),
        (MqttError::MessageOverflow, 0x89),
        (MqttError::TopicName("x"), 0x90),
        (
            MqttError::KeepAlive {
                requested: 0,
                max: 9,
            },
            0x83,
        ),
    ];
    for (e, rc) in cases {
        assert_eq!(at_connect(v, e), [0x20, 0x03, 0x00, rc, 0x00], "{e:?}");
    }
    assert_eq!(at_connect(v, MqttError::UnknownProtocol), Vec::<u8>::new());
    // A timeout of the client's own: no CONNACK code fits (before the broker's CONNACK
    // an MQTT 5 client may only be inside an AUTH packet).
    assert_eq!(at_connect(v, MqttError::PacketTimeout), Vec::<u8>::new());
    assert_eq!(at_connect(v, MqttError::ConnectTimeout), Vec::<u8>::new());
}

#[test]
fn answers_after_connect() {
    for v in [Version::V3_1, Version::V3_1_1] {
        assert_eq!(
            MqttError::Malformed("x").answer(Phase::Connected(v)),
            Answer::Close
        );
        for e in [MqttError::MessageRate, MqttError::MessageOverflow] {
            assert_eq!(e.answer(Phase::Connected(v)), Answer::Close);
        }
        assert_eq!(
            MqttError::PacketTimeout.answer(Phase::Connected(v)),
            Answer::Close
        );
    }
    let cases = [
        (MqttError::Malformed("x"), 0x81),
        (MqttError::ProtocolError("x"), 0x82),
        (MqttError::KeepAliveTimeout, 0x8D),
        (MqttError::PacketTimeout, 0x8D),
        (MqttError::TopicFilter("x"), 0x8F),
        (MqttError::TopicName("x"), 0x90),
        (MqttError::PacketTooLarge { size: 9, max: 8 }, 0x95),
        (MqttError::MessageRate, 0x96),
        (MqttError::MessageOverflow, 0x96),
        (MqttError::ConnectOverflow, 0x9F),
        (MqttError::QuotaExceeded, 0x97),
        (MqttError::NotAuthorized, 0x87),
        (MqttError::AuthTimeout, 0x87),
        (MqttError::ServerBusy, 0x89),
        // 0x88 (server unavailable) is not a DISCONNECT reason code.
        (MqttError::UpstreamClosed, 0x89),
        (MqttError::ServerLimit(Limit::QoS), 0x9B),
        (MqttError::ServerLimit(Limit::Retain), 0x9A),
        (MqttError::ServerLimit(Limit::TopicAlias), 0x94),
        (MqttError::ServerLimit(Limit::Wildcard), 0xA2),
        (MqttError::ServerLimit(Limit::SubscriptionId), 0xA1),
        (MqttError::ServerLimit(Limit::Shared), 0x9E),
    ];
    for (e, rc) in cases {
        assert_eq!(
            e.answer(Phase::Connected(Version::V5)).bytes(),
            [0xE0, 0x02, rc, 0x00],
            "{e:?}"
        );
    }
}

#[test]
fn session_picks_the_phase_and_version() {
    // a v5 CONNECT refused past its protocol level answers in v5
    let mut s = Session::new(Config::new());
    let f = head("MQTT", 5, 0x03).props(&[]).s("c").frame(0x10);
    let e = s.validate(&f).unwrap_err();
    assert_eq!(s.version(), Some(Version::V5));
    assert_eq!(s.answer(&e).bytes(), [0x20, 0x03, 0x00, 0x81, 0x00]);
    // a malformed 3.1.1 CONNECT closes without CONNACK
    let mut s = Session::new(Config::new());
    let f = head("MQTT", 4, 0x03).s("c").frame(0x10);
    let e = s.validate(&f).unwrap_err();
    assert_eq!(s.answer(&e), Answer::Close);
    // ... even one whose client id breaks a rule ([MQTT-3.1.4-1]): an empty id without
    // clean session, then a byte past the payload
    let mut s = Session::new(Config::new());
    let f = [
        0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x00, 0x00, 0x3C, 0x00, 0x00, 0xFF,
    ];
    let e = s.validate(&f).unwrap_err();
    assert_eq!(s.answer(&e), Answer::Close, "{e:?}");
    // a first packet that is no CONNECT has no version, whatever its body: a PUBLISH to
    // topic "MQTT" whose payload starts with 5 is closed, not answered a v5 CONNACK
    let mut s = Session::new(Config::new());
    let e = s
        .validate(&[0x30, 0x07, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05])
        .unwrap_err();
    assert_eq!((s.version(), s.answer(&e)), (None, Answer::Close), "{e:?}");
    // after a v5 CONNECT and the broker's CONNACK: DISCONNECT; after a 3.1.1 one: close
    let mut s = session_after(&connect_v5());
    s.connack_sent();
    let e = s
        .validate(&B::new().s("#").props(&[]).frame(0x30))
        .unwrap_err();
    assert_eq!(s.answer(&e), Answer::DisconnectV5(0x90));
    let mut s = session_after(&connect_v4());
    s.connack_sent();
    let e = s.validate(&[0xC1, 0x00]).unwrap_err();
    assert_eq!(s.phase(), Phase::Connected(Version::V3_1_1));
    assert_eq!(s.answer(&e), Answer::Close);
    // after a v5 CONNECT but before any CONNACK went out: a CONNACK, never a DISCONNECT,
    // which may not come first [MQTT-3.14.0-1]. An AUTH with a reason code AUTH may not
    // carry (0x07), in an enhanced authentication:
    let connect = head("MQTT", 5, 0x02)
        .props(&[0x15, 0x00, 0x01, b'm'])
        .s("c")
        .frame(0x10);
    let mut s = session_after(&connect);
    let e = s.validate(&[0xF0, 0x02, 0x07, 0x00]).unwrap_err();
    assert!(matches!(e, MqttError::ProtocolError(_)), "{e:?}");
    assert_eq!(s.phase(), Phase::Connect(Some(Version::V5)));
    assert_eq!(s.answer(&e), Answer::ConnackV5(0x82));
    // ... and the same refusal once the CONNACK is out: DISCONNECT
    s.connack_sent();
    assert_eq!(s.phase(), Phase::Connected(Version::V5));
    assert_eq!(s.answer(&e), Answer::DisconnectV5(0x82));
    // a CONNECT too large for the cap, before any version is known: close
    let mut s = Session::new(Config::new().max_connect_size(10));
    let e = s.next(&[0x10, 0x7F]).unwrap_err();
    assert_eq!(
        (s.phase(), s.answer(&e)),
        (Phase::Connect(None), Answer::Close)
    );
    // even a whole 5.0 CONNECT, its protocol name and level buffered: the framer refuses
    // it from its fixed header, before the version is read, so no CONNACK 0x95
    let v5 = head("MQTT", 5, 0x02)
        .props(&[])
        .s("c".repeat(20))
        .frame(0x10);
    let mut s = Session::new(Config::new().max_connect_size(v5.len() - 1));
    let e = s.next(&v5).unwrap_err();
    assert!(matches!(e, MqttError::PacketTooLarge { .. }), "{e:?}");
    assert_eq!(
        (s.version(), s.phase(), s.answer(&e)),
        (None, Phase::Connect(None), Answer::Close)
    );
}

#[test]
fn labels_are_stable_and_the_layer_is_mqtt() {
    let cases: [(MqttError, &str); 25] = [
        (MqttError::ServerLimit(Limit::QoS), "server_limit"),
        (MqttError::Malformed("x"), "malformed"),
        (MqttError::ProtocolError("x"), "protocol_error"),
        (
            MqttError::UnsupportedVersion { level: 9 },
            "unsupported_version",
        ),
        (MqttError::UnknownProtocol, "unknown_protocol"),
        (MqttError::ClientId("x"), "client_id"),
        (
            MqttError::PacketTooLarge { size: 1, max: 0 },
            "packet_too_large",
        ),
        (
            MqttError::KeepAlive {
                requested: 1,
                max: 0,
            },
            "keep_alive",
        ),
        (MqttError::TopicName("x"), "topic_name"),
        (MqttError::TopicFilter("x"), "topic_filter"),
        (MqttError::NotAuthorized, "not_authorized"),
        (MqttError::ServerUnavailable, "server_unavailable"),
        (MqttError::ConnackTimeout, "connack_timeout"),
        (MqttError::UpstreamClosed, "upstream_closed"),
        (MqttError::AuthTimeout, "auth_timeout"),
        (MqttError::ServerBusy, "server_busy"),
        (MqttError::QuotaExceeded, "quota_exceeded"),
        (MqttError::ConnectionRate, "connection_rate"),
        (MqttError::ConnectRate, "connect_rate"),
        (MqttError::ConnectOverflow, "connect_overflow"),
        (MqttError::MessageRate, "message_rate"),
        (MqttError::MessageOverflow, "message_overflow"),
        (MqttError::KeepAliveTimeout, "keep_alive_timeout"),
        (MqttError::PacketTimeout, "packet_timeout"),
        (MqttError::ConnectTimeout, "connect_timeout"),
    ];
    for (e, l) in cases {
        assert_eq!((e.layer(), e.label()), ("mqtt", l));
    }
    let boxed: aegis_core::error::BoxError =
        aegis_core::error::reject(MqttError::Malformed("x")).into();
    assert_eq!(aegis_core::error::label_of(&*boxed), ("mqtt", "malformed"));
    assert_eq!(boxed.to_string(), "malformed packet: x");
}
