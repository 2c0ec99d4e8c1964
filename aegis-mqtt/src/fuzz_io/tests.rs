//! The seed corpus of `mqtt_io` (`fuzz/corpus/mqtt_io`), written by [`seeds`] and
//! replayed here; and what each seed is meant to reach.

use std::path::PathBuf;

use super::{io, logged};

/// A script for [`io`], operation by operation (see the module docs for the format).
struct Script(Vec<u8>);

impl Script {
    /// Setup bytes 0 and 1; both pipes 4096 bytes unless `sizes` says otherwise.
    fn new(flags: u8, sizes: u8) -> Self {
        Self(vec![flags, sizes])
    }

    fn write(mut self, kind: u8, bytes: &[u8]) -> Self {
        for chunk in bytes.chunks(255) {
            self.0.push(kind);
            self.0.push(u8::try_from(chunk.len()).unwrap());
            self.0.extend_from_slice(chunk);
        }
        self
    }

    fn client(self, bytes: &[u8]) -> Self {
        self.write(0, bytes)
    }

    fn broker(self, bytes: &[u8]) -> Self {
        self.write(1, bytes)
    }

    fn op(mut self, kind: u8, arg: u8) -> Self {
        self.0.push(kind | arg << 3);
        self
    }

    /// Sleeps `(arg % 4 + 1) * 10^(arg / 4)` ms.
    fn sleep(self, arg: u8) -> Self {
        self.op(4, arg)
    }

    /// Reads both sides.
    fn read(self) -> Self {
        self.op(5, 0)
    }

    fn close_client(self) -> Self {
        self.op(6, 0)
    }

    fn close_broker(self) -> Self {
        self.op(6, 1)
    }

    fn drop_client(self) -> Self {
        self.op(6, 2)
    }

    fn drop_broker(self) -> Self {
        self.op(6, 3)
    }
}

/// Setup byte 1: both pipes 4096 bytes each way.
const BIG: u8 = 0x0F;

/// Sleep arguments.
const MS_10: u8 = 4;
const MS_100: u8 = 8;
const S_1: u8 = 12;
const S_2: u8 = 13;
const S_10: u8 = 16;

/// A packet: `first`, the Remaining Length, `body`.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let b = u8::try_from(n % 128).unwrap();
        n /= 128;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string.
fn s(text: &str) -> Vec<u8> {
    let mut out = u16::try_from(text.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// A CONNECT of `level` (3: MQTT 3.1, 4: 3.1.1, 5: 5.0), clean session.
fn connect(level: u8, keep_alive: u16, id: &str) -> Vec<u8> {
    let mut body = s(if level == 3 { "MQIsdp" } else { "MQTT" });
    body.extend_from_slice(&[level, 0x02]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&s(id));
    frame(0x10, &body)
}

/// A 3.x CONNACK, accepted.
const CONNACK_V3: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// A 5.0 CONNACK, accepted, Topic Alias Maximum 10.
const CONNACK_V5: [u8; 8] = [0x20, 0x06, 0x00, 0x00, 0x03, 0x22, 0x00, 0x0a];

/// A SUBSCRIBE of `filter` at `QoS` 1.
fn subscribe(v5: bool, id: u16, filter: &str) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(&s(filter));
    body.push(1);
    frame(0x82, &body)
}

/// The broker's SUBACK granting `QoS` 1.
fn suback(v5: bool, id: u16) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    body.push(1);
    frame(0x90, &body)
}

/// A PUBLISH of `payload` to `topic` at `qos` (`id` its packet identifier), with MQTT 5
/// `props` (none for 3.x).
fn publish(v5: bool, topic: &str, qos: u8, id: u16, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = s(topic);
    if qos > 0 {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if v5 {
        body.push(u8::try_from(props.len()).unwrap());
        body.extend_from_slice(props);
    }
    body.extend_from_slice(payload);
    frame(0x30 | qos << 1, &body)
}

fn puback(id: u16) -> Vec<u8> {
    frame(0x40, &id.to_be_bytes())
}

const PINGREQ: [u8; 2] = [0xC0, 0x00];
const PINGRESP: [u8; 2] = [0xD0, 0x00];
const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// A whole session of `level`: CONNECT, CONNACK, SUBSCRIBE, SUBACK, PUBLISH both ways,
/// PING, DISCONNECT, each side reading as it goes.
fn session(level: u8, flags: u8, sizes: u8) -> Script {
    let v5 = level == 5;
    let connack: &[u8] = if v5 { &CONNACK_V5 } else { &CONNACK_V3 };
    Script::new(flags, sizes)
        .client(&connect(level, 60, "c1"))
        .read()
        .broker(connack)
        .read()
        .client(&subscribe(v5, 1, "a/+"))
        .read()
        .broker(&suback(v5, 1))
        .read()
        .client(&publish(v5, "a/b", 0, 0, &[], b"hello"))
        .client(&publish(v5, "a/b", 1, 2, &[], b"world"))
        .read()
        .broker(&puback(2))
        .broker(&publish(v5, "a/b", 0, 0, &[], b"hello"))
        .read()
        .sleep(S_1)
        .client(&PINGREQ)
        .read()
        .broker(&PINGRESP)
        .read()
        .client(&DISCONNECT)
        .close_client()
        .read()
        .close_broker()
}

/// The committed seeds: name and bytes.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = vec![
        ("v31_session", session(3, 0, BIG).0),
        ("v311_session", session(4, 0, BIG).0),
        ("v5_session", session(5, 0, BIG).0),
        // The same through the small copier, 16-byte buffers, and 64-byte pipes.
        ("v311_small_copy", session(4, 0x40, 0x25).0),
        ("v5_small_copy", session(5, 0x40, 0x25).0),
    ];
    out.extend(policy_seeds());
    out.extend(timer_seeds());
    out.extend(refusal_seeds());
    out
}

/// Seeds with a per-packet policy or a packet rate.
fn policy_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // MQTT 5 under the policy with inspection: PUBLISH over the rate and blocked ones
    // get the gateway's PUBACK, a third SUBSCRIBE its SUBACK, a topic alias is set and
    // used.
    let alias = [0x23, 0x00, 0x01];
    let mut s = Script::new(0x81, BIG)
        .client(&connect(5, 60, "c1"))
        .read()
        .broker(&CONNACK_V5)
        .read();
    for id in 1..=4 {
        s = s.client(&publish(true, "a/b", 1, id, &[], b"burst"));
    }
    s = s.read().sleep(S_2);
    s = s
        .client(&publish(true, "deny/x", 1, 5, &[], b"topic"))
        .client(&publish(true, "a/b", 1, 6, &[], b"so evil"))
        .read()
        .sleep(S_2)
        .client(&publish(true, "a/c", 0, 0, &alias, b"set"))
        .client(&publish(true, "", 0, 0, &alias, b"use"))
        .read()
        .sleep(S_2);
    for id in 10..13 {
        s = s.client(&subscribe(true, id, "a/#"));
    }
    s = s.read().close_client().read().close_broker();
    out.push(("v5_policy_inspect", s.0));
    out.push(("v5_policy_alias_set_again", alias_set_again()));

    // MQTT 3.1.1 under the policy and a throttling packet rate: a burst of PINGREQs
    // released over time, through the small copier (16-byte buffers).
    let mut s = Script::new(0x51, 0x2F)
        .client(&connect(4, 60, "c1"))
        .read()
        .broker(&CONNACK_V3)
        .read();
    for _ in 0..12 {
        s = s.client(&PINGREQ);
    }
    s = s
        .read()
        .sleep(MS_100)
        .read()
        .sleep(S_1)
        .read()
        .sleep(S_2)
        .read();
    out.push(("v311_policy_rate", s.close_client().read().close_broker().0));

    // A refusing packet rate: MQTT 5 DISCONNECT 0x96.
    let mut s = Script::new(0x30, BIG)
        .client(&connect(5, 60, "c1"))
        .read()
        .broker(&CONNACK_V5)
        .read();
    for _ in 0..5 {
        s = s.client(&PINGREQ);
    }
    out.push(("v5_rate_disconnect", s.read().sleep(MS_10).read().0));

    // Over the policy's limits with packets it may not drop: a third PUBLISH within the
    // second that sets a topic alias (MQTT 5: DISCONNECT 0x96), and a ninth PINGREQ
    // (3.1.1: closed).
    let mut s = Script::new(0x01, BIG)
        .client(&connect(5, 60, "c1"))
        .broker(&CONNACK_V5)
        .read();
    for _ in 0..3 {
        s = s.client(&publish(true, "a/b", 0, 0, &[0x23, 0x00, 0x01], b"set"));
    }
    out.push(("v5_policy_refuses_alias", s.read().0));
    let mut s = Script::new(0x01, BIG)
        .client(&connect(4, 60, "c1"))
        .broker(&CONNACK_V3)
        .read();
    for _ in 0..9 {
        s = s.client(&PINGREQ);
    }
    out.push(("v311_policy_refuses_ping", s.read().0));
    out
}

/// MQTT 5 under the policy with inspection: topic alias 1 set to `a/c` and used, then
/// set again to `deny/x` (refused: the broker would have learnt it), then used. A
/// second between two PUBLISH packets keeps them within the rate.
fn alias_set_again() -> Vec<u8> {
    let alias = [0x23, 0x00, 0x01];
    Script::new(0x81, BIG)
        .client(&connect(5, 60, "c1"))
        .read()
        .broker(&CONNACK_V5)
        .read()
        .client(&publish(true, "a/c", 0, 0, &alias, b"set"))
        .sleep(S_1)
        .client(&publish(true, "", 0, 0, &alias, b"use"))
        .sleep(S_1)
        .client(&publish(true, "deny/x", 0, 0, &alias, b"set again"))
        .sleep(S_1)
        .client(&publish(true, "", 0, 0, &alias, b"use again"))
        .read()
        .close_client()
        .read()
        .close_broker()
        .0
}

/// Seeds for the CONNACK timeout and the keep-alive.
fn timer_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // A stalled broker: no CONNACK within 50 ms.
    let s = Script::new(0x08, 0x8F)
        .client(&connect(5, 60, "c1"))
        .read()
        .sleep(MS_100)
        .read();
    out.push(("v5_connack_timeout", s.0));

    // A silent client: keep-alive 1 s, enforced.
    let s = Script::new(0x02, BIG)
        .client(&connect(4, 1, "c1"))
        .read()
        .broker(&CONNACK_V3)
        .read()
        .sleep(S_2)
        .read();
    out.push(("v311_keep_alive", s.0));
    out
}

/// Seeds of refusals, of a CONNECT in pieces, and of sides that go away.
fn refusal_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // The client goes away with the gateway's SUBACK queued, and the broker's PUBLISH
    // on its way; then the broker goes away while the client is still there.
    let mut s = Script::new(0x01, BIG)
        .client(&connect(5, 60, "c1"))
        .broker(&CONNACK_V5)
        .read();
    for id in 1..=3 {
        s = s.client(&subscribe(true, id, "a/#"));
    }
    let s = s
        .drop_client()
        .broker(&publish(true, "a/b", 0, 0, &[], b"gone"))
        .read();
    out.push(("v5_client_gone", s.0));
    let s = Script::new(0x00, BIG)
        .client(&connect(4, 60, "c1"))
        .broker(&CONNACK_V3)
        .read()
        .drop_broker()
        .client(&PINGREQ)
        .read();
    out.push(("v311_broker_gone", s.0));

    // A malformed packet while the broker is inside a packet: the DISCONNECT waits
    // for the packet's end.
    let pubd = publish(true, "a/b", 0, 0, &[], b"from the broker");
    let s = Script::new(0x00, BIG)
        .client(&connect(5, 60, "c1"))
        .read()
        .broker(&CONNACK_V5)
        .broker(&pubd[..6])
        .read()
        .client(&[0xC1, 0x00])
        .read()
        .sleep(MS_100)
        .broker(&pubd[6..])
        .read()
        .sleep(S_10)
        .read();
    out.push(("v5_refusal_mid_packet", s.0));

    // A CONNECT one byte at a time through 8-byte pipes.
    let mut s = Script::new(0x00, 0x00);
    for b in connect(4, 60, "chunked") {
        s = s.client(&[b]).read();
    }
    out.push(("v311_chunked", s.broker(&CONNACK_V3).read().0));

    // Small size caps: a PUBLISH over 512 bytes after the CONNACK.
    let s = Script::new(0x04, BIG)
        .client(&connect(5, 60, "c1"))
        .read()
        .broker(&CONNACK_V5)
        .read()
        .client(&publish(true, "a/b", 0, 0, &[], &[7; 600]))
        .read();
    out.push(("v5_too_large", s.0));

    // A SUBSCRIBE with reserved fixed-header flags (0x80, not 0x82) after the CONNACK:
    // refused, the broker hears the CONNECT only.
    let mut sub = subscribe(false, 1, "a/+");
    sub[0] = 0x80;
    let s = Script::new(0, BIG)
        .client(&connect(4, 60, "c1"))
        .read()
        .broker(&CONNACK_V3)
        .read()
        .client(&sub)
        .read();
    out.push(("bad_sub_flags", s.0));

    // A refused CONNECT (unknown protocol level): the broker hears nothing.
    out.push((
        "bad_connect_level",
        Script::new(0, BIG).client(&connect(6, 60, "c1")).read().0,
    ));
    out
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/mqtt_io")
}

/// Writes the seeds: `cargo test -p aegis-mqtt --lib fuzz_io -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus/mqtt_io"]
fn write_seeds() {
    aegis_core::testing::write_seeds(&corpus_dir(), &seeds());
}

/// The committed seeds are the generator's.
#[test]
fn committed_seeds_are_the_generators() {
    aegis_core::testing::assert_seeds_committed(&corpus_dir(), &seeds());
}

/// Every file of the corpus (the seeds, and inputs the fuzzer found, named `regress_*`)
/// runs through the fuzz entry point without breaking a property.
#[test]
fn corpus_replays() {
    let mut n = 0;
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let path = entry.unwrap().path();
        io(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n >= seeds().len());
}

/// Runs `data` on a thread: whether it ended within 10 s of real time. The connection
/// of a hang never ends: the thread is left spinning.
fn ends_in_time(data: Vec<u8>) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        io(&data);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok()
}

/// Found by the fuzzer: a throttled client whose bucket refills to a float epsilon
/// under one token (0.1 + 0.18 * 5 = 0.9999999999999999) made `Bucket::poll_take`
/// (`layer/rate.rs`) wait `Duration::from_secs_f64(2.2e-17)`, zero: the sleep was due at
/// once, on tokio's paused clock no time passed, and the loop never returned. Three
/// PINGREQs spend the burst of 3 at 5 a second, the fourth comes 20 ms later. (Found
/// before the client's packets waited for the broker's CONNACK; the broker now accepts
/// first, so that the bucket is reached.)
#[test]
fn a_throttled_client_a_float_epsilon_short_of_a_token() {
    let data = Script::new(0x10, BIG)
        .client(&connect(4, 60, "c1"))
        .broker(&CONNACK_V3)
        .client(&[PINGREQ; 3].concat())
        .op(7, 5) // jump 20 ms
        .client(&PINGREQ)
        .0;
    assert!(ends_in_time(data), "the task spins in Bucket::poll_take");
}

/// Found by the fuzzer: a refused MQTT 5 client that does not read (its 64-byte pipe is
/// full) while the broker has one more byte for it, after a packet boundary. The
/// refusal's DISCONNECT waited for room in the client's pipe; the proxy's write of the
/// broker's byte found the boundary, and `MqttIo::writable` (`layer/io.rs`) woke the
/// read, which parked again: the task woke itself for ever. On tokio's paused clock no
/// time passed and the refusal deadline never came; on a real clock the task spun a
/// core until it did (5 s).
#[test]
fn a_refused_client_that_does_not_read() {
    let mut from_broker = CONNACK_V5.to_vec();
    from_broker.extend(publish(true, "t", 0, 0, &[], &[7; 50]));
    assert_eq!(from_broker.len(), 64);
    from_broker.push(0xC0);
    let data = Script::new(0x00, 0x0D) // client pipe 64 bytes, broker pipe 4096
        .client(&connect(5, 60, "c1"))
        .broker(&from_broker)
        .client(&[0x00, 0x00]) // malformed
        .sleep(MS_100)
        .0;
    assert!(ends_in_time(data), "the task wakes itself for ever");
}

/// Each seed reaches what it is named for: the gateway's answers are the ones expected.
#[test]
fn seeds_reach_what_they_are_named_for() {
    let run = |name: &str| {
        let (_, bytes) = seeds().into_iter().find(|(n, _)| *n == name).unwrap();
        logged(&bytes).unwrap()
    };
    for name in [
        "v31_session",
        "v311_session",
        "v5_session",
        "v311_small_copy",
    ] {
        let log = run(name);
        assert!(log.sent.ends_with(&DISCONNECT), "{name}");
        assert_eq!(log.to_broker, log.sent, "{name}");
        assert_eq!(log.to_client, log.from_broker, "{name}");
    }
    let log = run("v5_policy_inspect");
    for answer in [
        &[0x40, 0x03, 0x00, 0x03, 0x97][..],   // PUBACK: quota exceeded
        &[0x40, 0x03, 0x00, 0x05, 0x87],       // not authorized (topic rule)
        &[0x40, 0x03, 0x00, 0x06, 0x99],       // payload format invalid (pattern)
        &[0x90, 0x04, 0x00, 0x0c, 0x00, 0x97], // SUBACK: quota exceeded
    ] {
        assert!(
            log.to_client.windows(answer.len()).any(|w| w == answer),
            "{answer:02x?}"
        );
    }
    assert!(log.to_broker.ends_with(&subscribe(true, 11, "a/#")));
    assert_eq!(run("v311_policy_rate").to_broker.len(), 16 + 12 * 2);
    assert!(
        run("v5_rate_disconnect")
            .to_client
            .ends_with(&[0xE0, 0x02, 0x96, 0x00])
    );
    let log = run("v5_policy_refuses_alias");
    assert!(log.to_client.ends_with(&[0xE0, 0x02, 0x96, 0x00]));
    assert_eq!(log.to_broker.len(), log.sent.len() - 14); // all but the third PUBLISH
    let log = run("v5_policy_alias_set_again");
    assert_eq!(
        log.to_client,
        [&CONNACK_V5[..], &[0xE0, 0x02, 0x87, 0x00]].concat()
    );
    let set_again = publish(true, "deny/x", 0, 0, &[0x23, 0x00, 0x01], b"set again");
    let at = log
        .sent
        .windows(set_again.len())
        .position(|w| w == set_again);
    assert_eq!(
        Some(log.to_broker.len()),
        at,
        "all before the PUBLISH to deny/x"
    );
    let log = run("v311_policy_refuses_ping");
    assert_eq!(log.to_client, CONNACK_V3);
    assert_eq!(log.to_broker.len(), 16 + 8 * 2);
    assert_eq!(
        run("v5_connack_timeout").to_client,
        [0x20, 0x03, 0x00, 0x88, 0x00]
    );
    let log = run("v5_refusal_mid_packet");
    assert_eq!(
        log.to_client,
        [&log.from_broker[..], &[0xE0, 0x02, 0x81, 0x00]].concat()
    );
    assert!(
        run("v5_too_large")
            .to_client
            .ends_with(&[0xE0, 0x02, 0x95, 0x00])
    );
    let log = run("bad_sub_flags");
    assert_eq!(log.to_broker, connect(4, 60, "c1"));
    assert_eq!(log.to_client, CONNACK_V3);
    let log = run("bad_connect_level");
    assert!(log.to_broker.is_empty());
    assert_eq!(log.to_client, [0x20, 0x02, 0x00, 0x01]);
}

/// The checks catch what they are for.
mod checks {
    use super::super::{delivered, forwarded, validated};
    use crate::{Config, Version};

    #[test]
    #[should_panic(expected = "where the client's next packet is")]
    fn an_altered_byte() {
        forwarded(
            &[0xC0, 0x00, 0xC0, 0x00],
            &[0xC0, 0x00, 0xC1, 0x00],
            false,
            true,
        );
    }

    #[test]
    #[should_panic(expected = "not whole packets")]
    fn an_altered_byte_with_a_policy() {
        forwarded(
            &[0xC0, 0x00, 0xC0, 0x00],
            &[0xC0, 0x00, 0xC1, 0x00],
            true,
            true,
        );
    }

    #[test]
    #[should_panic(expected = "where the client's next packet is")]
    fn a_dropped_packet_without_a_policy() {
        forwarded(
            &[0x10, 0x00, 0xC0, 0x01, 0x00, 0xC0, 0x00],
            &[0x10, 0x00, 0xC0, 0x00],
            false,
            true,
        );
    }

    #[test]
    fn a_dropped_packet_with_a_policy() {
        forwarded(
            &[0x10, 0x00, 0xC0, 0x01, 0x00, 0xC0, 0x00],
            &[0x10, 0x00, 0xC0, 0x00],
            true,
            true,
        );
    }

    /// Part of a packet, once the layer gave all it had.
    #[test]
    #[should_panic(expected = "where the client's next packet is")]
    fn part_of_a_packet() {
        forwarded(&[0x10, 0x00, 0xC0, 0x00], &[0x10, 0x00, 0xC0], false, true);
    }

    /// Part of a packet, when the proxy stopped reading in it.
    #[test]
    fn part_of_a_packet_read() {
        forwarded(&[0x10, 0x00, 0xC0, 0x00], &[0x10, 0x00, 0xC0], false, false);
    }

    /// Packets the session takes, the last cut short.
    #[test]
    fn valid_packets() {
        let sub = super::subscribe(false, 1, "a/+");
        let bytes = [&super::connect(4, 60, "c1")[..], &sub, &sub[..5]].concat();
        validated(Config::new(), &bytes, false);
    }

    #[test]
    #[should_panic(expected = "a session refuses")]
    fn a_packet_the_session_refuses() {
        let mut sub = super::subscribe(false, 1, "a/+");
        sub[0] = 0x80;
        validated(
            Config::new(),
            &[&super::connect(4, 60, "c1")[..], &sub].concat(),
            false,
        );
    }

    /// An MQTT 5 CONNECT, then `packets`.
    fn v5(packets: &[Vec<u8>]) -> Vec<u8> {
        [&[super::connect(5, 60, "c1")][..], packets]
            .concat()
            .concat()
    }

    /// An MQTT 5 PUBLISH to `topic` with topic alias `alias`, if any.
    fn publish(topic: &str, alias: Option<u8>, payload: &[u8]) -> Vec<u8> {
        let props = alias.map_or(vec![], |a| vec![0x23, 0x00, a]);
        super::publish(true, topic, 0, 0, &props, payload)
    }

    /// What the inspection rules let through: a topic alias set and used, set again and
    /// used, payloads of 256 bytes, `ev il`, `xxx` (a flag only), a will to `a/w`.
    #[test]
    fn packets_that_keep_the_rules() {
        let bytes = v5(&[
            publish("a/c", Some(1), b"set"),
            publish("", Some(1), &[b'e'; 256]),
            publish("a/d", Some(1), b"ev il"),
            publish("", Some(1), b"xxx"),
            publish("a/b", None, b"EVI"),
        ]);
        validated(Config::new(), &bytes, true);
        let mut will = super::s("MQTT");
        will.extend_from_slice(&[4, 0x06, 0, 60]);
        for field in ["c1", "a/w", "gone"] {
            will.extend_from_slice(&super::s(field));
        }
        validated(Config::new(), &super::frame(0x10, &will), true);
    }

    /// The rules are checked only with `inspected`.
    #[test]
    fn without_inspection_anything_valid_passes() {
        let bytes = v5(&[publish("deny/x", None, b"evil"), publish("", Some(9), b"")]);
        validated(Config::new(), &bytes, false);
    }

    /// The bypass a policy would leave if it looked a PUBLISH's topic up by its alias
    /// while the PUBLISH sets the alias again: the broker delivers it to `deny/x`.
    #[test]
    #[should_panic(expected = r#"to "deny/x", which deny("deny/#") blocks"#)]
    fn an_alias_set_again_to_a_denied_topic() {
        let bytes = v5(&[
            publish("a/c", Some(1), b"set"),
            publish("deny/x", Some(1), b"set again"),
        ]);
        validated(Config::new(), &bytes, true);
    }

    /// A policy that took an empty topic name for the topic, ignoring the alias.
    #[test]
    #[should_panic(expected = "the broker does not know it")]
    fn an_alias_never_set() {
        let bytes = v5(&[publish("a/c", Some(1), b"set"), publish("", Some(2), b"")]);
        validated(Config::new(), &bytes, true);
    }

    #[test]
    #[should_panic(expected = r#"to "a/c" whose payload matches"#)]
    fn a_blocked_payload_on_an_alias() {
        let bytes = v5(&[
            publish("a/c", Some(1), b"set"),
            publish("", Some(1), b"so EvIl"),
        ]);
        validated(Config::new(), &bytes, true);
    }

    #[test]
    #[should_panic(expected = "a payload of 257 bytes, over the blocking cap of 256")]
    fn a_payload_over_the_cap() {
        validated(Config::new(), &v5(&[publish("a/b", None, &[0; 257])]), true);
    }

    #[test]
    #[should_panic(expected = r##"to "$SYS/x", which allow("#") does not cover"##)]
    fn a_dollar_topic() {
        validated(Config::new(), &v5(&[publish("$SYS/x", None, b"")]), true);
    }

    #[test]
    #[should_panic(expected = r#"the will of a CONNECT to "deny""#)]
    fn a_will_to_a_denied_topic() {
        let mut connect = super::s("MQTT");
        connect.extend_from_slice(&[4, 0x06, 0, 60]);
        for field in ["c1", "deny", "gone"] {
            connect.extend_from_slice(&super::s(field));
        }
        validated(Config::new(), &super::frame(0x10, &connect), true);
    }

    /// The check's reading of `(?i)evil` (ASCII letters in any case) is the inspector's.
    #[test]
    fn the_pattern_reading_is_the_regexs() {
        let re = regex::bytes::Regex::new("(?i)evil").unwrap();
        for payload in [
            "evil",
            "EVIL",
            "eVIl",
            "ev il",
            "evıl",
            "evİl",
            "ｅvil",
            "evi\u{17f}",
            "e\u{301}vil",
        ] {
            let ascii = payload
                .as_bytes()
                .windows(4)
                .any(|w| w.eq_ignore_ascii_case(b"evil"));
            assert_eq!(re.is_match(payload.as_bytes()), ascii, "{payload:?}");
        }
    }

    const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
    const PUBLISH: [u8; 7] = [0x30, 0x05, 0x00, 0x01, b't', b'h', b'i'];
    const DISCONNECT: [u8; 4] = [0xE0, 0x02, 0x81, 0x00];

    #[test]
    fn answers_between_packets() {
        let written = [&CONNACK[..], &PUBLISH].concat();
        let v5 = Some(Version::V5);
        delivered(&written, &[&written[..], &DISCONNECT].concat(), v5, false);
        // Cut short anywhere.
        for n in 0..written.len() {
            delivered(&written, &written[..n], v5, false);
        }
        let suback = [0x90, 0x04, 0x00, 0x01, 0x00, 0x97];
        let answered = [&CONNACK[..], &suback, &PUBLISH, &suback[..3]].concat();
        delivered(&written, &answered, v5, true);
        delivered(&PUBLISH, &[0x20, 0x03, 0x00, 0x88, 0x00], v5, false);
    }

    #[test]
    #[should_panic(expected = "where the broker's next bytes are")]
    fn an_answer_inside_a_packet() {
        let written = [&CONNACK[..], &PUBLISH].concat();
        let cut = [&written[..6], &DISCONNECT].concat();
        delivered(&written, &cut, Some(Version::V5), false);
    }

    #[test]
    #[should_panic(expected = "where the broker's next bytes are")]
    fn an_answer_before_the_connack() {
        delivered(
            &[],
            &[0x90, 0x03, 0x00, 0x01, 0x80],
            Some(Version::V3_1_1),
            true,
        );
    }

    #[test]
    #[should_panic(expected = "where the broker's next bytes are")]
    fn a_disconnect_to_a_3x_client() {
        delivered(
            &CONNACK,
            &[&CONNACK[..], &[0xE0, 0x00]].concat(),
            Some(Version::V3_1_1),
            false,
        );
    }

    #[test]
    #[should_panic(expected = "ended the connection")]
    fn bytes_after_the_gateways_connack() {
        let own = [0x20, 0x03, 0x00, 0x88, 0x00];
        delivered(
            &PUBLISH,
            &[&own[..], &PUBLISH].concat(),
            Some(Version::V5),
            false,
        );
    }
}
