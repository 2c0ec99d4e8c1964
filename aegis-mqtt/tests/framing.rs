//! Framing: size caps, Remaining Length rules, every split point, random input.

mod common;

use aegis_mqtt::{Config, Decoded, Framer, MqttError, Next, Packet, Session};
use common::{B, connect_v5, head};

fn frame_len(d: Decoded) -> usize {
    match d {
        Decoded::Frame(f) => f.len(),
        Decoded::NeedMore(n) => panic!("need {n} more"),
    }
}

#[test]
fn need_more_then_frame() {
    let f = Framer::new(1 << 20);
    assert_eq!(f.decode(&[]), Ok(Decoded::NeedMore(2)));
    assert_eq!(f.decode(&[0x30]), Ok(Decoded::NeedMore(1)));
    assert_eq!(f.decode(&[0x30, 0x03, b'a']), Ok(Decoded::NeedMore(2)));
    assert_eq!(f.decode(&[0x30, 0x80]), Ok(Decoded::NeedMore(1)));
    let Ok(Decoded::Frame(fr)) = f.decode(&[0x32, 0x00, 0xFF]) else {
        panic!()
    };
    assert_eq!(
        (fr.len(), fr.header_len(), fr.packet_type(), fr.flags()),
        (2, 2, 3, 2)
    );
    // 128 bytes of remaining length take two bytes
    let mut p = vec![0x30, 0x80, 0x01];
    p.resize(131, 0);
    assert_eq!(frame_len(f.decode(&p).unwrap()), 131);
}

#[test]
fn remaining_length_must_be_minimal() {
    // [MQTT-1.5.5-1] (v5) and 3.1.1 §2.2.3: 0x80 0x00 encodes 0 in two bytes
    let f = Framer::new(1 << 20);
    assert_eq!(
        f.decode(&[0xC0, 0x80, 0x00]),
        Err(MqttError::Malformed(
            "remaining length not minimally encoded"
        ))
    );
    assert_eq!(
        f.decode(&[0x30, 0x81, 0x80, 0x00]),
        Err(MqttError::Malformed(
            "remaining length not minimally encoded"
        ))
    );
}

#[test]
fn remaining_length_at_most_four_bytes() {
    let f = Framer::new(usize::MAX);
    assert_eq!(
        f.decode(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
        Err(MqttError::Malformed(
            "remaining length longer than four bytes"
        ))
    );
    // the largest legal value is accepted as a header
    assert_eq!(
        f.decode(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]),
        Ok(Decoded::NeedMore(268_435_455))
    );
}

/// At a realistic cap, the size bound (which fires on a continuation byte) used to
/// come before the Remaining Length's own rules: a length of five bytes or a
/// non-minimal one of three or more was refused as too large, and an MQTT 5 client got
/// DISCONNECT 0x95 instead of 0x81.
#[test]
fn malformed_remaining_length_under_a_realistic_cap() {
    let malformed_long = Err(MqttError::Malformed(
        "remaining length longer than four bytes",
    ));
    let non_minimal = Err(MqttError::Malformed(
        "remaining length not minimally encoded",
    ));
    let f = Framer::new(256 * 1024);
    assert_eq!(
        f.decode(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
        malformed_long
    );
    // A fourth byte with its top bit set already shows a fifth.
    assert_eq!(f.decode(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF]), malformed_long);
    assert_eq!(f.decode(&[0x30, 0x80, 0x80, 0x80, 0x00]), non_minimal);
    assert_eq!(f.decode(&[0x30, 0xFF, 0xFF, 0x00]), non_minimal);
    // The small pre-CONNACK cap of the fuzz configurations: two bytes are enough.
    assert_eq!(Framer::new(128).decode(&[0x30, 0x80, 0x00]), non_minimal);
    // A valid length over the cap is still too large, from its header alone.
    assert_eq!(
        f.decode(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]),
        Err(MqttError::PacketTooLarge {
            size: 268_435_460,
            max: 256 * 1024
        })
    );
    // Until the length is complete, its verdict waits: the next byte may make it
    // malformed. At most three more bytes, never the body.
    assert_eq!(
        f.decode(&[0x30, 0xFF, 0xFF, 0xFF]),
        Ok(Decoded::NeedMore(1))
    );

    // What the client is told: MQTT 5 DISCONNECT 0x81 (malformed), not 0x95.
    let mut s = Session::new(Config::new());
    let connect = connect_v5();
    assert!(matches!(
        s.next(&connect),
        Ok(Next::Packet {
            packet: Packet::Connect(_),
            ..
        })
    ));
    s.connack_sent();
    let e = s.next(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).unwrap_err();
    assert_eq!(s.answer(&e).bytes(), [0xE0, 0x02, 0x81, 0x00]);
}

#[test]
fn too_large_is_refused_from_the_header_before_buffering() {
    let f = Framer::new(100);
    // 98 bytes of body plus 2 of header: exactly the cap
    assert_eq!(f.decode(&[0x30, 98]), Ok(Decoded::NeedMore(98)));
    assert_eq!(
        f.decode(&[0x30, 99]),
        Err(MqttError::PacketTooLarge {
            size: 101,
            max: 100
        })
    );
    // refused as soon as the Remaining Length is complete, never waiting for (or
    // allocating) the declared length; a continuation bit alone is no verdict yet (the
    // next byte may make the length malformed)
    assert_eq!(f.decode(&[0x30, 0x80]), Ok(Decoded::NeedMore(1)));
    assert_eq!(
        f.decode(&[0x30, 0x80, 0x01]),
        Err(MqttError::PacketTooLarge {
            size: 131,
            max: 100
        })
    );
    let f = Framer::new(10_000);
    assert_eq!(f.decode(&[0x30, 0xFF, 0xFF]), Ok(Decoded::NeedMore(1)));
    assert_eq!(
        f.decode(&[0x30, 0xFF, 0xFF, 0x01]),
        Err(MqttError::PacketTooLarge {
            size: 32_771,
            max: 10_000
        })
    );
}

fn stream() -> (Vec<u8>, Vec<(usize, u8)>) {
    let parts = [
        head("MQTT", 5, 0xC2)
            .props(&[0x21, 0, 10])
            .s("dev")
            .s("u")
            .s("p")
            .frame(0x10),
        B::new().s("a/b").props(&[]).raw(b"hello").frame(0x30),
        B::new()
            .s("a/b")
            .u16(1)
            .props(&[0x23, 0, 1])
            .raw(&[7; 200])
            .frame(0x32), // 2-byte length
        B::new().u16(2).props(&[]).s("x/#").u8(1).frame(0x82),
        B::new().u16(1).frame(0x40),
        vec![0xC0, 0x00],
        B::new().u16(3).props(&[]).s("x/#").frame(0xA2),
        vec![0xE0, 0x00],
    ];
    let expected = parts.iter().map(|p| (p.len(), p[0] >> 4)).collect();
    (parts.concat(), expected)
}

/// Feeds `chunks` into a session as a layer would and returns (length, type) per packet.
fn run(chunks: &[&[u8]]) -> Vec<(usize, u8)> {
    let mut s = Session::new(Config::new());
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match s.next(&buf).unwrap() {
                Next::NeedMore(n) => {
                    assert!(n >= 1);
                    break;
                }
                Next::Packet { len, packet } => {
                    let t = match packet {
                        Packet::Connect(_) => 1,
                        Packet::Publish(_) => 3,
                        Packet::PubAck(_) => 4,
                        Packet::Subscribe(_) => 8,
                        Packet::Unsubscribe(_) => 10,
                        Packet::PingReq => 12,
                        Packet::Disconnect(_) => 14,
                        _ => 0,
                    };
                    out.push((len, t));
                    buf.drain(..len);
                }
            }
        }
    }
    assert!(buf.is_empty());
    out
}

#[test]
fn one_byte_at_a_time() {
    let (bytes, expected) = stream();
    let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(run(&chunks), expected);
}

#[test]
fn every_split_point() {
    let (bytes, expected) = stream();
    for i in 0..=bytes.len() {
        let (a, b) = bytes.split_at(i);
        assert_eq!(run(&[a, b]), expected, "split at {i}");
    }
    assert_eq!(run(&[&bytes]), expected);
}

/// A tiny xorshift so the test needs no new dependency.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

#[test]
fn random_input_never_panics() {
    let (valid, _) = stream();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut outcomes = [0usize; 2];
    // MQTT_RANDOM_INPUTS=2000000 for a deeper run.
    let inputs = std::env::var("MQTT_RANDOM_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    for i in 0..inputs {
        let data: Vec<u8> = if i % 2 == 0 {
            let n = usize::from(rng.byte() % 64);
            (0..n).map(|_| rng.byte()).collect()
        } else {
            // a valid stream with a few bytes flipped, cut at a random point
            let mut v = valid.clone();
            for _ in 0..=rng.byte() % 4 {
                let at = usize::try_from(rng.next() % v.len() as u64).unwrap();
                v[at] = rng.byte();
            }
            v.truncate(usize::try_from(rng.next() % v.len() as u64).unwrap() + 1);
            v
        };
        aegis_mqtt::__fuzz::connect(&data);
        aegis_mqtt::__fuzz::stream(&data);
        let _ = aegis_mqtt::validate_connect(&data, &Config::new());
        let mut s = Session::new(Config::new());
        outcomes[usize::from(s.next(&data).is_ok())] += 1;
    }
    // both outcomes were exercised
    assert!(outcomes[0] > 100 && outcomes[1] > 100, "{outcomes:?}");
}
