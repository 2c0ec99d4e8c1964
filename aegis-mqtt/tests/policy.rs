//! The per-packet policy of the MQTT layer, over in-process duplex streams with tokio's
//! clock paused.
#![cfg(feature = "policy")]

mod common;

use std::io;
use std::time::Duration;

use aegis_core::error::{BoxError, label_of};
use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::{Conn, metrics::testing};
use aegis_mqtt::Config;
use aegis_mqtt::layer::policy::{KeyBy, Quota, Tier, metrics as m};
use aegis_mqtt::layer::{MqttIo, MqttLayer, Policy};
use common::{B, connect_v4_as, connect_v5_as, head, nz};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tower::{Layer, ServiceExt, service_fn};

/// A 3.1.1 `QoS` 0 PUBLISH to "t" with `payload`.
fn publish_v4(payload: &[u8]) -> Vec<u8> {
    B::new().s("t").raw(payload).frame(0x30)
}

/// An MQTT 5 PUBLISH to "t" with `QoS` `qos` and packet id `id` (none for `QoS` 0).
fn publish_v5(qos: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    let b = B::new().s("t");
    let b = if qos > 0 { b.u16(id) } else { b };
    b.props(&[]).raw(payload).frame(0x30 | (qos << 1))
}

/// A SUBSCRIBE with packet id `id` and two filters.
fn subscribe(v5: bool, id: u16) -> Vec<u8> {
    let b = B::new().u16(id);
    let b = if v5 { b.props(&[]) } else { b };
    b.s("a/b").u8(0).s("c/#").u8(1).frame(0x82)
}

const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// What the inner service saw: the bytes it could read, and how its reading ended.
type Seen = (Vec<u8>, Result<(), io::ErrorKind>);

/// One connection through the layer.
struct Run {
    /// The inner service's result: what it saw, or the layer's error if it was never
    /// called.
    seen: Result<Seen, BoxError>,
    /// Everything the client received.
    got: Vec<u8>,
}

/// Serves one duplex connection from `peer`. The client writes `writes` (each after its
/// pause) and closes its side; the broker writes `broker.0`, reads until the client's
/// end, then writes `broker.1`.
async fn run(
    layer: &MqttLayer<Policy>,
    peer: &str,
    writes: Vec<(Duration, Vec<u8>)>,
    broker: (Vec<u8>, Vec<u8>),
) -> Run {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let client_task = tokio::spawn(async move {
        for (pause, bytes) in writes {
            tokio::time::sleep(pause).await;
            // A refused client may be closed already.
            let _ = client.write_all(&bytes).await;
        }
        let _ = client.shutdown().await;
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        got
    });
    let inner = service_fn(move |mut io: MqttIo<Conn<DuplexStream>>| {
        let (before, after) = broker.clone();
        async move {
            io.write_all(&before).await?;
            let mut seen = Vec::new();
            let end = io.read_to_end(&mut seen).await.map(|_| ());
            if end.is_ok() {
                io.write_all(&after).await?;
            }
            Ok::<_, BoxError>((seen, end.map_err(|e| e.kind())))
        }
    });
    let io = Conn::new(
        server,
        peer.parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let seen = layer.clone().layer(inner).oneshot(io).await;
    Run {
        seen,
        got: client_task.await.unwrap(),
    }
}

/// All at once; the broker accepts the CONNECT ([`connack_for`]) and writes nothing
/// more.
async fn send(layer: &MqttLayer<Policy>, peer: &str, bytes: Vec<u8>) -> Run {
    let connack = connack_for(&bytes);
    run(
        layer,
        peer,
        vec![(Duration::ZERO, bytes)],
        (connack, vec![]),
    )
    .await
}

/// The broker's CONNACK accepting the CONNECT at the start of `bytes` (whose protocol
/// level is its ninth byte in these tests' short CONNECTs): the gateway's own answers
/// may only follow a CONNACK [MQTT-3.2.0-1].
fn connack_for(bytes: &[u8]) -> Vec<u8> {
    if bytes[8] == 5 {
        vec![0x20, 0x03, 0x00, 0x00, 0x00]
    } else {
        vec![0x20, 0x02, 0x00, 0x00]
    }
}

fn layer(policy: Policy) -> MqttLayer<Policy> {
    MqttLayer::new(Config::new()).policy(policy)
}

/// What the client got after the broker's CONNACK (asserting that it came first): the
/// gateway's answers.
fn after_connack(got: &[u8]) -> &[u8] {
    assert_eq!(got.first(), Some(&0x20), "the CONNACK came first: {got:?}");
    &got[2 + usize::from(got[1])..]
}

/// What the inner service read, asserting that it was called and read to a clean end.
fn forwarded(r: &Run) -> &[u8] {
    let (seen, end) = r.seen.as_ref().expect("the inner service ran");
    assert_eq!(*end, Ok(()), "the inner service read to a clean end");
    seen
}

#[tokio::test(start_paused = true)]
async fn connect_over_the_per_address_limit_gets_connack_and_never_reaches_the_inner_service() {
    let layer = layer(
        Policy::builder()
            .connect_per_addr(Quota::per_minute(nz(1)))
            .build(),
    );
    let first = send(&layer, "192.0.2.1:1000", connect_v4_as("a")).await;
    assert_eq!(forwarded(&first), connect_v4_as("a"));
    // The same address again, from another port: 3.1.1 CONNACK 0x05 "not authorized".
    let v3 = send(&layer, "192.0.2.1:1001", connect_v4_as("b")).await;
    assert_eq!(v3.got, [0x20, 0x02, 0x00, 0x05]);
    let err = v3.seen.expect_err("the inner service never ran");
    assert_eq!(label_of(&*err), ("mqtt", "connect_rate"));
    // MQTT 5: CONNACK 0x9F "connection rate exceeded"; IPv4-mapped IPv6 is the same key.
    let v5 = send(&layer, "[::ffff:192.0.2.1]:1002", connect_v5_as("c")).await;
    assert_eq!(v5.got, [0x20, 0x03, 0x00, 0x9F, 0x00]);
    assert_eq!(label_of(&*v5.seen.unwrap_err()), ("mqtt", "connect_rate"));
    // Another address has its own budget, and the budget refills.
    let other = send(&layer, "192.0.2.2:1000", connect_v4_as("d")).await;
    assert_eq!(forwarded(&other), connect_v4_as("d"));
    tokio::time::advance(Duration::from_secs(60)).await;
    let again = send(&layer, "192.0.2.1:1003", connect_v4_as("e")).await;
    assert_eq!(forwarded(&again), connect_v4_as("e"));
}

#[tokio::test(start_paused = true)]
async fn connect_addresses_are_keyed_by_prefix() {
    // One IPv6 /64 is one client by default; a /24 for IPv4 when asked.
    let layer = layer(
        Policy::builder()
            .connect_per_addr(Quota::per_minute(nz(1)))
            .key_by(KeyBy::new(24, 64))
            .build(),
    );
    assert!(
        send(&layer, "[2001:db8::1]:1", connect_v4_as("a"))
            .await
            .seen
            .is_ok()
    );
    let r = send(&layer, "[2001:db8::ffff:2]:1", connect_v4_as("a")).await;
    assert_eq!(r.got, [0x20, 0x02, 0x00, 0x05]);
    assert!(
        send(&layer, "192.0.2.1:1", connect_v4_as("a"))
            .await
            .seen
            .is_ok()
    );
    let r = send(&layer, "192.0.2.200:1", connect_v4_as("a")).await;
    assert_eq!(r.got, [0x20, 0x02, 0x00, 0x05]);
}

#[tokio::test(start_paused = true)]
async fn qos0_publish_over_the_limit_is_dropped_and_the_rest_forwarded_byte_exact() {
    let layer = layer(
        Policy::builder()
            .publish_per_client(Quota::per_second(nz(1)))
            .build(),
    );
    let (p1, p2, p3) = (publish_v4(b"one"), publish_v4(b"two"), publish_v4(b"three"));
    let writes = vec![
        (
            Duration::ZERO,
            [connect_v4_as("c1"), p1.clone(), p2, PINGREQ.to_vec()].concat(),
        ),
        // One second later the budget has refilled.
        (Duration::from_secs(1), p3.clone()),
    ];
    let broker = (connack_for(&connect_v4_as("c1")), vec![]);
    let r = run(&layer, "192.0.2.1:1", writes, broker).await;
    assert_eq!(
        forwarded(&r),
        [connect_v4_as("c1"), p1, PINGREQ.to_vec(), p3].concat()
    );
    assert!(
        after_connack(&r.got).is_empty(),
        "nothing is answered to a QoS 0 PUBLISH"
    );
}

#[tokio::test(start_paused = true)]
async fn qos1_and_qos2_over_the_limit_are_dropped_silently_by_default() {
    let layer = layer(
        Policy::builder()
            .publish_per_client(Quota::per_minute(nz(1)))
            .build(),
    );
    let ok = publish_v5(1, 1, b"a");
    let bytes = [
        connect_v5_as("c1"),
        ok.clone(),
        publish_v5(1, 2, b"b"),
        publish_v5(2, 3, b"c"),
    ]
    .concat();
    let r = send(&layer, "192.0.2.1:1", bytes).await;
    assert_eq!(forwarded(&r), [connect_v5_as("c1"), ok].concat());
    assert!(after_connack(&r.got).is_empty());
}

#[tokio::test(start_paused = true)]
async fn v5_publish_answer_sends_puback_and_pubrec_0x97() {
    let policy = Policy::builder()
        .publish_per_client(Quota::per_minute(nz(1)))
        .v5_publish_answer(true)
        .build();
    let layer = layer(policy);
    let ok = publish_v5(0, 0, b"a");
    let bytes = [
        connect_v5_as("c1"),
        ok.clone(),
        publish_v5(1, 0x1234, b"b"),
        publish_v5(2, 7, b"c"),
        publish_v5(0, 0, b"d"),
        PINGREQ.to_vec(),
    ]
    .concat();
    let r = send(&layer, "192.0.2.1:1", bytes).await;
    assert_eq!(
        forwarded(&r),
        [connect_v5_as("c1"), ok, PINGREQ.to_vec()].concat()
    );
    assert_eq!(
        after_connack(&r.got),
        [0x40, 0x03, 0x12, 0x34, 0x97, 0x50, 0x03, 0x00, 0x07, 0x97]
    );
    // MQTT 3.1.1 has no such reason code: dropped silently even with the answer on.
    let bytes = [
        connect_v4_as("c2"),
        publish_v4(b"a"),
        B::new().s("t").u16(5).raw(b"b").frame(0x32),
    ]
    .concat();
    let r = send(&layer, "192.0.2.1:1", bytes).await;
    assert_eq!(
        forwarded(&r),
        [connect_v4_as("c2"), publish_v4(b"a")].concat()
    );
    assert!(after_connack(&r.got).is_empty());
}

/// A resent `QoS` 2 PUBLISH (DUP set) over the limit gets no PUBREC 0x97: the broker
/// may hold its packet identifier from the first delivery, awaiting a PUBREL, and would
/// take the client's next PUBLISH with that identifier, freed by the PUBREC, for a
/// duplicate [MQTT-4.3.3-10]. A resent `QoS` 1 keeps its PUBACK.
#[tokio::test(start_paused = true)]
async fn v5_publish_answer_never_answers_a_resent_qos2_publish() {
    let layer = layer(
        Policy::builder()
            .publish_per_client(Quota::per_hour(nz(1)))
            .v5_publish_answer(true)
            .build(),
    );
    let ok = publish_v5(1, 1, b"a");
    let with_dup = |mut p: Vec<u8>| {
        p[0] |= 0x08;
        p
    };
    let qos2_dup = with_dup(publish_v5(2, 7, b"again"));
    assert_eq!(qos2_dup[0], 0x3C);
    let bytes = [connect_v5_as("c1"), ok.clone(), qos2_dup, PINGREQ.to_vec()].concat();
    let r = send(&layer, "192.0.2.1:1", bytes).await;
    assert_eq!(
        forwarded(&r),
        [connect_v5_as("c1"), ok, PINGREQ.to_vec()].concat(),
        "dropped, DUP or not"
    );
    assert!(
        after_connack(&r.got).is_empty(),
        "no PUBREC to a resent QoS 2 PUBLISH: {:?}",
        r.got
    );
    // Without DUP, QoS 2 still gets its PUBREC 0x97; with DUP, QoS 1 its PUBACK 0x97.
    let bytes = [
        connect_v5_as("c1"),
        publish_v5(2, 8, b"new"),
        with_dup(publish_v5(1, 9, b"again")),
    ]
    .concat();
    let r = send(&layer, "192.0.2.1:1", bytes).await;
    assert_eq!(forwarded(&r), connect_v5_as("c1"));
    assert_eq!(
        after_connack(&r.got),
        [0x50, 0x03, 0x00, 0x08, 0x97, 0x40, 0x03, 0x00, 0x09, 0x97]
    );
}

#[tokio::test(start_paused = true)]
async fn subscribe_over_the_limit_gets_a_synthesized_suback_and_is_not_forwarded() {
    let layer = layer(
        Policy::builder()
            .subscribe_per_client(Quota::per_minute(nz(1)))
            .build(),
    );
    // 3.1.1: one 0x80 per filter.
    let bytes = [
        connect_v4_as("c1"),
        subscribe(false, 1),
        subscribe(false, 2),
    ]
    .concat();
    let r = send(&layer, "192.0.2.1:1", bytes).await;
    assert_eq!(
        forwarded(&r),
        [connect_v4_as("c1"), subscribe(false, 1)].concat()
    );
    assert_eq!(after_connack(&r.got), [0x90, 0x04, 0x00, 0x02, 0x80, 0x80]);
    // 3.1: its SUBACK has no failure code, so the connection is refused.
    let connect_v31 = head("MQIsdp", 3, 0x02).s("c3").frame(0x10);
    let bytes = [
        connect_v31.clone(),
        subscribe(false, 1),
        subscribe(false, 2),
    ]
    .concat();
    let r = run(
        &layer,
        "192.0.2.1:1",
        vec![(Duration::ZERO, bytes)],
        (vec![0x20, 0x02, 0x00, 0x00], vec![]),
    )
    .await;
    let (seen, end) = r.seen.as_ref().expect("the inner service ran");
    assert_eq!(*seen, [connect_v31, subscribe(false, 1)].concat());
    assert_eq!(*end, Err(io::ErrorKind::InvalidData));
    assert!(after_connack(&r.got).is_empty(), "{:?}", r.got);
    // 5.0: an empty property list, then one 0x97 per filter.
    let bytes = [
        connect_v5_as("c2"),
        subscribe(true, 1),
        subscribe(true, 0x0102),
    ]
    .concat();
    let r = send(&layer, "192.0.2.1:1", bytes).await;
    assert_eq!(
        forwarded(&r),
        [connect_v5_as("c2"), subscribe(true, 1)].concat()
    );
    assert_eq!(
        after_connack(&r.got),
        [0x90, 0x05, 0x01, 0x02, 0x00, 0x97, 0x97]
    );
}

/// No gateway answer larger than the client's Maximum Packet Size goes out
/// [MQTT-3.1.2-24]: it is discarded [MQTT-3.1.2-25], and counted unanswered.
#[test]
fn no_answer_is_larger_than_the_clients_maximum_packet_size() {
    let ((), snap) = testing::run(true, || async {
        let layer = layer(
            Policy::builder()
                .subscribe_per_client(Quota::per_hour(nz(1)))
                .build(),
        );
        // A 5.0 CONNECT with Maximum Packet Size 20.
        let connect = |id: &str| {
            head("MQTT", 5, 0x02)
                .props(&[0x27, 0, 0, 0, 20])
                .s(id)
                .frame(0x10)
        };
        let filters = |id: u16, n: usize| {
            (0..n)
                .fold(B::new().u16(id).props(&[]), |b, _| b.s("a").u8(0))
                .frame(0x82)
        };
        // 16 filters: a SUBACK of 21 bytes, over the limit; 15 filters: 20 bytes, at it.
        for (id, n, suback_len) in [("c1", 16, 0), ("c2", 15, 20)] {
            let bytes = [connect(id), subscribe(true, 1), filters(2, n)].concat();
            let r = send(&layer, "192.0.2.1:1", bytes).await;
            assert_eq!(forwarded(&r), [connect(id), subscribe(true, 1)].concat());
            let got = after_connack(&r.got);
            assert_eq!(got.len(), suback_len, "{n} filters: {got:?}");
            if suback_len > 0 {
                assert_eq!(got[..5], [0x90, 18, 0x00, 0x02, 0x00]);
                assert!(got[5..].iter().all(|&c| c == 0x97));
            }
        }
    });
    let c = testing::capture(&snap);
    assert_eq!(c.counter(m::UNANSWERED_TOTAL, &[("packet", "suback")]), 1);
    assert_eq!(c.counter(m::SYNTHESIZED_TOTAL, &[("packet", "suback")]), 1);
}

#[tokio::test(start_paused = true)]
async fn a_publish_setting_a_topic_alias_is_refused_not_dropped() {
    let layer = layer(
        Policy::builder()
            .publish_per_client(Quota::per_minute(nz(1)))
            .v5_publish_answer(true)
            .build(),
    );
    // Alias 1 for "a", forwarded; alias 1 set again to "b", over the limit: dropped, the
    // broker would deliver the next alias-only PUBLISH to "a".
    let alias = |topic: &str, payload: &[u8]| {
        B::new()
            .s(topic)
            .props(&[0x23, 0, 1])
            .raw(payload)
            .frame(0x30)
    };
    let first = alias("a", b"x");
    let bytes = [
        connect_v5_as("c1"),
        first.clone(),
        alias("b", b"y"),
        alias("", b"z"),
    ]
    .concat();
    // CONNACK: success, Topic Alias Maximum 10.
    let connack = B::new().u8(0).u8(0).props(&[0x22, 0, 10]).frame(0x20);
    let send = |bytes| {
        run(
            &layer,
            "192.0.2.1:1",
            vec![(Duration::ZERO, bytes)],
            (connack.clone(), vec![]),
        )
    };
    let r = send(bytes).await;
    let (seen, end) = r.seen.as_ref().expect("the inner service ran");
    assert_eq!(*seen, [connect_v5_as("c1"), first].concat());
    assert_eq!(*end, Err(io::ErrorKind::InvalidData));
    assert_eq!(after_connack(&r.got), [0xE0, 0x02, 0x96, 0x00]);
    // Only using an alias, over the limit: dropped, the connection goes on.
    let bytes = [
        connect_v5_as("c2"),
        alias("a", b"x"),
        alias("", b"y"),
        PINGREQ.to_vec(),
    ]
    .concat();
    let r = send(bytes).await;
    assert_eq!(
        forwarded(&r),
        [connect_v5_as("c2"), alias("a", b"x"), PINGREQ.to_vec()].concat()
    );
}

/// The client's packets after its CONNECT are not read before the broker's CONNACK
/// accepts it (3.1.1 [MQTT-3.1.4-5], 5.0 [MQTT-3.1.4-6]): pipelined with the CONNECT, a
/// SUBSCRIBE over the limit is checked, and charged, only once that CONNACK is out, and
/// its SUBACK follows it [MQTT-3.2.0-1].
#[tokio::test(start_paused = true)]
async fn packets_after_the_connect_wait_for_the_brokers_connack() {
    let policy = Policy::builder()
        .subscribe_per_client(Quota::per_minute(nz(1)))
        .build();
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let bytes = [
        connect_v4_as("c1"),
        subscribe(false, 1),
        subscribe(false, 2),
    ]
    .concat();
    client.write_all(&bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let connack = vec![0x20, 0x02, 0x00, 0x00];
    let (p, c) = (policy.clone(), connack.clone());
    // A broker that reads the client all along and answers the CONNECT a second late.
    let inner = service_fn(move |io: MqttIo<Conn<DuplexStream>>| {
        let (policy, connack) = (p.clone(), c.clone());
        async move {
            let (mut r, mut w) = tokio::io::split(io);
            let read = async {
                let mut seen = Vec::new();
                r.read_to_end(&mut seen).await.map(|_| seen)
            };
            let write = async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                // Nothing after the CONNECT was read: nothing checked, nothing charged.
                assert_eq!(policy.tracked_keys(Tier::Subscribe), 0);
                w.write_all(&connack).await
            };
            let (seen, written) = tokio::join!(read, write);
            written?;
            Ok::<_, BoxError>(seen?)
        }
    });
    let io = Conn::new(
        server,
        "192.0.2.1:1".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let seen = layer(policy.clone())
        .layer(inner)
        .oneshot(io)
        .await
        .unwrap();
    assert_eq!(seen, [connect_v4_as("c1"), subscribe(false, 1)].concat());
    assert_eq!(policy.tracked_keys(Tier::Subscribe), 1);
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(
        got,
        [connack, vec![0x90, 0x04, 0x00, 0x02, 0x80, 0x80]].concat()
    );
}

/// When the gateway answers the CONNECT itself (the broker's CONNACK is late), nothing
/// follows that CONNACK: the packets after the CONNECT were never read, checked nor
/// answered.
#[tokio::test(start_paused = true)]
async fn the_gateways_own_connack_drops_its_queued_answers() {
    let policy = Policy::builder()
        .subscribe_per_client(Quota::per_minute(nz(1)))
        .build();
    let layer = layer(policy.clone()).connack_timeout(Duration::from_secs(5));
    let bytes = [
        connect_v4_as("c1"),
        subscribe(false, 1),
        subscribe(false, 2),
    ]
    .concat();
    // The client keeps its side open past the timeout; the broker never answers.
    let writes = vec![(Duration::ZERO, bytes), (Duration::from_secs(10), vec![])];
    let r = run(&layer, "192.0.2.1:1", writes, (vec![], vec![])).await;
    assert_eq!(r.got, [0x20, 0x02, 0x00, 0x03], "a SUBACK went out");
    assert_eq!(policy.tracked_keys(Tier::Subscribe), 0);
}

#[tokio::test(start_paused = true)]
async fn answers_wait_for_a_packet_boundary_of_the_broker() {
    let layer = layer(
        Policy::builder()
            .subscribe_per_client(Quota::per_minute(nz(1)))
            .build(),
    );
    let connack = vec![0x20, 0x02, 0x00, 0x00];
    let broker_publish = publish_v4(b"from the broker");
    let (head, tail) = broker_publish.split_at(5);
    let bytes = [
        connect_v4_as("c1"),
        subscribe(false, 1),
        subscribe(false, 2),
    ]
    .concat();
    // The broker is inside its PUBLISH while the SUBSCRIBE is dropped: the SUBACK goes
    // out only after the PUBLISH is complete.
    let broker = ([connack.clone(), head.to_vec()].concat(), tail.to_vec());
    let r = run(&layer, "192.0.2.1:1", vec![(Duration::ZERO, bytes)], broker).await;
    assert_eq!(
        forwarded(&r),
        [connect_v4_as("c1"), subscribe(false, 1)].concat()
    );
    assert_eq!(
        r.got,
        [
            connack,
            broker_publish,
            vec![0x90, 0x04, 0x00, 0x02, 0x80, 0x80]
        ]
        .concat()
    );
}

/// Nothing follows the broker's DISCONNECT [MQTT-3.14.4-1]: a SUBACK queued while the
/// broker was inside a packet is dropped when the broker's next write ends that packet
/// and sends its DISCONNECT.
#[tokio::test(start_paused = true)]
async fn no_queued_answer_follows_the_brokers_disconnect() {
    let layer = layer(
        Policy::builder()
            .subscribe_per_client(Quota::per_hour(nz(1)))
            .build(),
    );
    let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
    let broker_publish = publish_v5(0, 0, b"from the broker");
    let (head, tail) = broker_publish.split_at(5);
    let disconnect = [0xE0, 0x01, 0x8B];
    let bytes = [connect_v5_as("c1"), subscribe(true, 1), subscribe(true, 2)].concat();
    // The second SUBSCRIBE is dropped (its SUBACK 0x97 queued) while the broker is
    // inside its PUBLISH; the broker then ends the PUBLISH and disconnects, in one write.
    let broker = (
        [connack.clone(), head.to_vec()].concat(),
        [tail, &disconnect[..]].concat(),
    );
    let r = run(&layer, "192.0.2.1:1", vec![(Duration::ZERO, bytes)], broker).await;
    assert_eq!(
        forwarded(&r),
        [connect_v5_as("c1"), subscribe(true, 1)].concat()
    );
    assert!(
        r.got.ends_with(&disconnect),
        "the broker's DISCONNECT is the last packet: {:?}",
        r.got
    );
    assert_eq!(
        r.got,
        [connack, broker_publish, disconnect.to_vec()].concat()
    );
}

/// A refusal reached while the broker is inside its own DISCONNECT writes no second
/// DISCONNECT after it [MQTT-3.14.4-1].
#[tokio::test(start_paused = true)]
async fn a_refusal_inside_the_brokers_disconnect_sends_no_second_disconnect() {
    let layer = layer(Policy::builder().build());
    let (mut client, server) = tokio::io::duplex(1 << 20);
    // A PUBLISH to "#" is refused (DISCONNECT 0x90) while the broker is inside its
    // DISCONNECT.
    let bad = B::new().s("#").props(&[]).frame(0x30);
    client
        .write_all(&[connect_v5_as("c1"), bad].concat())
        .await
        .unwrap();
    let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
    let disconnect = [0xE0, 0x01, 0x8B];
    let before = [&connack[..], &disconnect[..1]].concat();
    let inner = service_fn(move |io: MqttIo<Conn<DuplexStream>>| {
        let before = before.clone();
        async move {
            let (mut r, mut w) = tokio::io::split(io);
            w.write_all(&before).await?;
            let read = async {
                let mut seen = Vec::new();
                let end = r.read_to_end(&mut seen).await.unwrap_err().kind();
                (seen, end)
            };
            let write = async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                w.write_all(&disconnect[1..]).await
            };
            let (read, written) = tokio::join!(read, write);
            written?;
            Ok::<_, BoxError>(read)
        }
    });
    let io = Conn::new(
        server,
        "192.0.2.1:1".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let (seen, end) = layer.layer(inner).oneshot(io).await.unwrap();
    assert_eq!(seen, connect_v5_as("c1"));
    assert_eq!(end, io::ErrorKind::InvalidData);
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, [connack, disconnect.to_vec()].concat());
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_per_client_id_and_shared_across_its_connections() {
    let layer = layer(
        Policy::builder()
            .publish_per_client(Quota::per_minute(nz(2)))
            .build(),
    );
    let p = publish_v4(b"x");
    let one = send(
        &layer,
        "192.0.2.1:1",
        [connect_v4_as("c1"), p.clone()].concat(),
    )
    .await;
    assert_eq!(forwarded(&one), [connect_v4_as("c1"), p.clone()].concat());
    // "c1" reconnects (from elsewhere): one PUBLISH left of its two.
    let bytes = [connect_v4_as("c1"), p.clone(), p.clone()].concat();
    let two = send(&layer, "192.0.2.9:1", bytes).await;
    assert_eq!(forwarded(&two), [connect_v4_as("c1"), p.clone()].concat());
    // "c2" has its own budget, even from the first client's address.
    let bytes = [connect_v4_as("c2"), p.clone(), p.clone()].concat();
    let other = send(&layer, "192.0.2.1:2", bytes.clone()).await;
    assert_eq!(forwarded(&other), bytes);
}

#[tokio::test(start_paused = true)]
async fn bytes_tier_counts_whole_packets_and_refuses_more_than_the_burst() {
    // 100 bytes a second, bursts of 100.
    let layer = layer(
        Policy::builder()
            .bytes_per_client(Quota::per_second(nz(100)))
            .build(),
    );
    let sixty = publish_v4(&[7; 55]);
    assert_eq!(sixty.len(), 60);
    let big = publish_v4(&[8; 100]); // 105 bytes: over the burst, always
    let writes = vec![
        (
            Duration::ZERO,
            [connect_v4_as("c1"), sixty.clone(), sixty.clone()].concat(),
        ),
        (Duration::from_secs(1), big),
        (Duration::ZERO, sixty.clone()),
    ];
    let r = run(
        &layer,
        "192.0.2.1:1",
        writes,
        (connack_for(&connect_v4_as("c1")), vec![]),
    )
    .await;
    // The second 60 find 40 left; a second later the 105 never fit, the 60 do.
    assert_eq!(
        forwarded(&r),
        [connect_v4_as("c1"), sixty.clone(), sixty].concat()
    );
}

#[tokio::test(start_paused = true)]
async fn packets_tier_refuses_pingreq_and_unsubscribe_with_message_rate() {
    let layer = layer(
        Policy::builder()
            .packets_per_client(Quota::per_minute(nz(2)))
            .build(),
    );
    let bytes = [connect_v5_as("c1"), PINGREQ.repeat(3)].concat();
    let r = send(&layer, "192.0.2.1:1", bytes).await;
    let (seen, end) = r.seen.unwrap();
    assert_eq!(seen, [connect_v5_as("c1"), PINGREQ.repeat(2)].concat());
    assert_eq!(end, Err(io::ErrorKind::InvalidData));
    assert_eq!(after_connack(&r.got), [0xE0, 0x02, 0x96, 0x00]);
    // A PUBLISH over the same tier is dropped, not refused; the PUBACK answering the
    // broker's `QoS` 1 PUBLISH is never limited.
    let puback = vec![0x40, 0x02, 0x00, 0x01];
    let broker_publish = B::new().s("t").u16(1).raw(b"m").frame(0x32);
    let bytes = [
        connect_v4_as("c2"),
        PINGREQ.to_vec(),
        publish_v4(b"a"),
        publish_v4(b"b"),
        puback.clone(),
        B::new().u16(3).s("a").frame(0xA2), // UNSUBSCRIBE: refused
    ]
    .concat();
    let before = [connack_for(&bytes), broker_publish.clone()].concat();
    let r = run(
        &layer,
        "192.0.2.1:1",
        vec![(Duration::ZERO, bytes)],
        (before, vec![]),
    )
    .await;
    let (seen, end) = r.seen.unwrap();
    assert_eq!(
        seen,
        [
            connect_v4_as("c2"),
            PINGREQ.to_vec(),
            publish_v4(b"a"),
            puback
        ]
        .concat()
    );
    assert_eq!(end, Err(io::ErrorKind::InvalidData));
    assert_eq!(
        after_connack(&r.got),
        broker_publish,
        "3.1.1 has no DISCONNECT from the server"
    );
}

/// Through the layer: the acknowledgements answering what the broker wrote to the client
/// (its `QoS` 1 and 2 PUBLISH, its PUBREC) are free, counted as its bytes go out; a
/// PUBCOMP for a PUBREL the broker never sent is charged to `packets` like a PINGREQ,
/// and over the burst (taken by one PINGREQ) refused as one: DISCONNECT 0x96, not
/// forwarded. Before, every acknowledgement went to the broker, without limit.
#[tokio::test(start_paused = true)]
async fn acks_beyond_what_the_broker_sent_are_charged_to_the_packets_tier() {
    let layer = layer(
        Policy::builder()
            .packets_per_client(Quota::per_minute(nz(1)))
            .build(),
    );
    let acks = [
        vec![0x40, 0x02, 0x00, 0x01], // PUBACK of the broker's QoS 1 PUBLISH
        vec![0x50, 0x02, 0x00, 0x02], // PUBREC of its QoS 2 PUBLISH
        vec![0x62, 0x02, 0x00, 0x09], // PUBREL for its PUBREC
    ]
    .concat();
    let bytes = [
        connect_v5_as("c3"),
        acks.clone(),
        PINGREQ.to_vec(),
        vec![0x70, 0x02, 0x00, 0x02], // PUBCOMP: no PUBREL came
    ]
    .concat();
    let broker = [
        connack_for(&bytes),
        publish_v5(1, 1, b"one"),
        publish_v5(2, 2, b"two"),
        vec![0x50, 0x02, 0x00, 0x09],
    ]
    .concat();
    let r = run(
        &layer,
        "192.0.2.1:1",
        vec![(Duration::ZERO, bytes)],
        (broker.clone(), vec![]),
    )
    .await;
    let (seen, end) = r.seen.unwrap();
    assert_eq!(seen, [connect_v5_as("c3"), acks, PINGREQ.to_vec()].concat());
    assert_eq!(end, Err(io::ErrorKind::InvalidData));
    assert_eq!(r.got, [&broker[..], &[0xE0, 0x02, 0x96, 0x00]].concat());
}

#[tokio::test(start_paused = true)]
async fn the_key_cap_bounds_the_state_and_new_clients_share_the_overflow_budget() {
    let policy = Policy::builder()
        .publish_per_client(Quota::per_hour(nz(1)))
        .max_keys(2)
        .build();
    let layer = layer(policy.clone());
    let p = publish_v4(b"x");
    let mut forwarded_publishes = Vec::new();
    for id in ["c0", "c1", "c2", "c3", "c4"] {
        let r = send(
            &layer,
            "192.0.2.1:1",
            [connect_v4_as(id), p.clone()].concat(),
        )
        .await;
        forwarded_publishes.push(forwarded(&r).len() > connect_v4_as(id).len());
    }
    // c0 and c1 are tracked; c2 takes the one overflow budget, c3 and c4 find it spent.
    assert_eq!(forwarded_publishes, [true, true, true, false, false]);
    assert_eq!(policy.tracked_keys(Tier::Publish), 2);
    // Tracked clients keep their own budget.
    let r = send(
        &layer,
        "192.0.2.1:1",
        [connect_v4_as("c0"), p.clone()].concat(),
    )
    .await;
    assert_eq!(forwarded(&r), connect_v4_as("c0"));
}

#[test]
fn drops_answers_and_refusals_are_counted() {
    let ((), snap) = testing::run(true, || async {
        let policy = Policy::builder()
            .connect_per_addr(Quota::per_hour(nz(2)))
            .publish_per_client(Quota::per_hour(nz(1)))
            .subscribe_per_client(Quota::per_hour(nz(1)))
            .bytes_per_client(Quota::per_hour(nz(10_000)))
            .v5_publish_answer(true)
            .build();
        let layer = layer(policy);
        let bytes = [
            connect_v5_as("c1"),
            publish_v5(0, 0, b"a"),
            publish_v5(0, 0, b"b"),
            publish_v5(1, 1, b"c"),
            subscribe(true, 1),
            subscribe(true, 2),
        ]
        .concat();
        let r = send(&layer, "192.0.2.1:1", bytes).await;
        assert_eq!(r.got.len(), 5 + 5 + 7);
        // A SUBSCRIBE whose SUBACK is over the answer queue's bound: dropped without
        // an answer (the CONNACK lifts the small cap before the CONNACK).
        let filters = (0..17_000).fold(B::new().u16(9).props(&[]), |b, _| b.s("a").u8(0));
        let bytes = [connect_v5_as("c2"), subscribe(true, 1), filters.frame(0x82)].concat();
        let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
        let r = run(
            &layer,
            "192.0.2.1:1",
            vec![(Duration::ZERO, bytes)],
            (connack.clone(), vec![]),
        )
        .await;
        assert_eq!(r.got, connack);
        assert_eq!(
            forwarded(&r),
            [connect_v5_as("c2"), subscribe(true, 1)].concat()
        );
        let r = send(&layer, "192.0.2.1:1", connect_v4_as("c3")).await;
        assert_eq!(r.got, [0x20, 0x02, 0x00, 0x05]);
    });
    let c = testing::capture(&snap);
    let dropped =
        |packet, reason| c.counter(m::DROPPED_TOTAL, &[("packet", packet), ("reason", reason)]);
    assert_eq!(dropped("publish", "publish_rate"), 2);
    assert_eq!(dropped("subscribe", "subscribe_rate"), 2);
    assert_eq!(c.counter(m::DROPPED_TOTAL, &[]), 4);
    assert_eq!(c.counter(m::SYNTHESIZED_TOTAL, &[("packet", "puback")]), 1);
    assert_eq!(c.counter(m::SYNTHESIZED_TOTAL, &[("packet", "suback")]), 1);
    assert_eq!(c.counter(m::SYNTHESIZED_TOTAL, &[]), 2);
    assert_eq!(c.counter(m::UNANSWERED_TOTAL, &[("packet", "suback")]), 1);
    assert_eq!(
        c.counter(
            REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", "connect_rate")]
        ),
        1
    );
}

#[test]
fn the_layer_with_a_policy_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let policy = Policy::builder()
        .publish_per_client(Quota::per_hour(nz(1)))
        .build();
    let layer = layer(policy.clone());
    let inner = service_fn(|_: MqttIo<Conn<DuplexStream>>| async { Ok::<_, BoxError>(()) });
    let (_client, server) = tokio::io::duplex(64);
    let addr = "192.0.2.1:1".parse().unwrap();
    let fut = layer
        .clone()
        .layer(inner)
        .oneshot(Conn::new(server, addr, addr));
    assert_send(&fut);
    assert_eq!(policy.quota(Tier::Publish), Some(Quota::per_hour(nz(1))));
    assert_eq!(policy.quota(Tier::Connect), None);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_inside_a_broker_packet_sends_the_queued_answer_then_the_disconnect() {
    let layer = layer(
        Policy::builder()
            .subscribe_per_client(Quota::per_minute(nz(1)))
            .build(),
    );
    let (mut client, server) = tokio::io::duplex(1 << 20);
    // The second SUBSCRIBE is dropped (its SUBACK queued), then a PUBLISH to "#" is
    // refused (DISCONNECT 0x90), all while the broker is inside its PUBLISH.
    let bad = B::new().s("#").props(&[]).frame(0x30);
    let bytes = [
        connect_v5_as("c1"),
        subscribe(true, 1),
        subscribe(true, 2),
        bad,
    ]
    .concat();
    client.write_all(&bytes).await.unwrap();
    let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
    let broker_publish = publish_v5(0, 0, b"from the broker");
    let (head, tail) = broker_publish.split_at(5);
    let before = [connack.clone(), head.to_vec()].concat();
    // The rest of the PUBLISH and one more, in one write, a second later.
    let after = [tail, &publish_v5(0, 0, b"never")[..]].concat();
    let inner = service_fn(move |io: MqttIo<Conn<DuplexStream>>| {
        let (before, after) = (before.clone(), after.clone());
        async move {
            let (mut r, mut w) = tokio::io::split(io);
            w.write_all(&before).await?;
            let read = async {
                let mut seen = Vec::new();
                let end = r.read_to_end(&mut seen).await.unwrap_err().kind();
                (seen, end)
            };
            let write = async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                w.write_all(&after).await.unwrap_err().kind()
            };
            Ok::<_, BoxError>(tokio::join!(read, write))
        }
    });
    let io = Conn::new(
        server,
        "192.0.2.1:1".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let ((seen, end), write) = layer.layer(inner).oneshot(io).await.unwrap();
    assert_eq!(seen, [connect_v5_as("c1"), subscribe(true, 1)].concat());
    assert_eq!(end, io::ErrorKind::InvalidData);
    assert_eq!(write, io::ErrorKind::BrokenPipe);
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(
        got,
        [
            connack,
            broker_publish,
            vec![0x90, 0x05, 0x00, 0x02, 0x00, 0x97, 0x97],
            vec![0xE0, 0x02, 0x90, 0x00],
        ]
        .concat()
    );
}
