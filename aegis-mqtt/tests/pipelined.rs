//! Packets a client pipelines after its CONNECT, through the MQTT layer with a policy
//! and a real proxy, over loopback sockets to a broker of a few lines: nothing after
//! the CONNECT is checked, charged or forwarded before the broker's CONNACK accepts the
//! connection (3.1.1 [MQTT-3.1.4-5], 5.0 [MQTT-3.1.4-6]); after a refusing CONNACK,
//! nothing is, and the gateway writes nothing more (3.1.1 [MQTT-3.2.2-5], 5.0
//! [MQTT-3.2.2-7]).
#![cfg(feature = "policy")]

mod common;

use std::net::SocketAddr;

use aegis_core::Conn;
use aegis_core::metrics::testing::{capture, run};
use aegis_core::proxy::Proxy;
use aegis_mqtt::Config;
use aegis_mqtt::layer::policy::{Quota, Tier, metrics as m};
use aegis_mqtt::layer::{MqttLayer, Policy};
use common::{B, connect_v4_as, connect_v5_as, nz};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower::{Layer, ServiceExt};

/// A PUBLISH to "t" with `QoS` `qos` (packet id `id` if above 0) and `payload`.
fn publish(v5: bool, qos: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    let b = B::new().s("t");
    let b = if qos > 0 { b.u16(id) } else { b };
    let b = if v5 { b.props(&[]) } else { b };
    b.raw(payload).frame(0x30 | (qos << 1))
}

/// A SUBSCRIBE with packet id `id` and one filter.
fn subscribe(v5: bool, id: u16) -> Vec<u8> {
    let b = B::new().u16(id);
    let b = if v5 { b.props(&[]) } else { b };
    b.s("a/b").u8(0).frame(0x82)
}

/// Tight tiers on every client id, answering MQTT 5 `QoS` 1 and 2 over them.
fn policy() -> Policy {
    Policy::builder()
        .publish_per_client(Quota::per_minute(nz(1)))
        .subscribe_per_client(Quota::per_minute(nz(1)))
        .packets_per_client(Quota::per_minute(nz(10)))
        .bytes_per_client(Quota::per_minute(nz(200_000)))
        .v5_publish_answer(true)
        .build()
}

/// A broker for one connection on a loopback port: reads the CONNECT (`connect_len`
/// bytes), answers `connack`; after a refusing one it closes its side, as it must.
/// Either way it then reads whatever the gateway forwards, to the gateway's end, and
/// returns all it read.
async fn broker(connack: Vec<u8>, connect_len: usize) -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut seen = vec![0; connect_len];
        s.read_exact(&mut seen).await.unwrap();
        s.write_all(&connack).await.unwrap();
        if connack[3] != 0 {
            s.shutdown().await.unwrap();
        }
        s.read_to_end(&mut seen).await.unwrap();
        seen
    });
    (addr, task)
}

/// One client connection through `layer` and a proxy to `broker`, all over loopback
/// sockets: the client sends `bytes` in one write, closes its sending side and reads to
/// the end. Returns what the client read.
async fn through_gateway(layer: &MqttLayer<Policy>, broker: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = front.local_addr().unwrap();
    let mut client = TcpStream::connect(local).await.unwrap();
    let (io, peer) = front.accept().await.unwrap();
    let svc = layer.clone().layer(Proxy::new(broker));
    let conn = tokio::spawn(svc.oneshot(Conn::new(io, peer, local)));
    client.write_all(bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    let _ = conn.await.unwrap();
    got
}

/// An outsider connects with a victim's client id and a CONNECT the broker refuses
/// (3.1.1 return code 0x05, 5.0 reason code 0x87), with PUBLISH and SUBSCRIBE packets
/// pipelined behind it that the policy would drop and answer. The broker gets the CONNECT
/// and nothing else; the client gets the broker's CONNACK and nothing after it (no SUBACK,
/// no PUBACK); none of the packets is charged to the victim's tiers, whose client then
/// connects and gets its one PUBLISH through.
#[test]
fn a_connect_the_broker_refuses_charges_and_answers_nothing_sent_after_it() {
    let (policies, snap) = run(false, || async {
        let mut policies = Vec::new();
        for v5 in [false, true] {
            let policy = policy();
            let layer = MqttLayer::new(Config::new()).policy(policy.clone());
            let (connect, refusal) = if v5 {
                (connect_v5_as("victim"), vec![0x20, 0x03, 0x00, 0x87, 0x00])
            } else {
                (connect_v4_as("victim"), vec![0x20, 0x02, 0x00, 0x05])
            };
            let pipelined = [
                publish(v5, 1, 1, b"one"),
                publish(v5, 1, 2, b"two"),
                subscribe(v5, 3),
                subscribe(v5, 4),
            ]
            .concat();
            let (addr, broker_task) = broker(refusal.clone(), connect.len()).await;
            let got = through_gateway(&layer, addr, &[connect.clone(), pipelined].concat()).await;
            assert_eq!(got, refusal, "v5: {v5}: nothing after the refusing CONNACK");
            assert_eq!(
                broker_task.await.unwrap(),
                connect,
                "v5: {v5}: the broker got more than the CONNECT"
            );
            for tier in [Tier::Publish, Tier::Subscribe, Tier::Packets, Tier::Bytes] {
                assert_eq!(policy.tracked_keys(tier), 0, "v5: {v5}: {tier} charged");
            }
            // The victim's own session: its budget is whole.
            let accepted = if v5 {
                vec![0x20, 0x03, 0x00, 0x00, 0x00]
            } else {
                vec![0x20, 0x02, 0x00, 0x00]
            };
            let mine = publish(v5, 0, 0, b"mine");
            let (addr, broker_task) = broker(accepted.clone(), connect.len()).await;
            let got =
                through_gateway(&layer, addr, &[connect.clone(), mine.clone()].concat()).await;
            assert_eq!(got, accepted);
            assert_eq!(broker_task.await.unwrap(), [connect, mine].concat());
            policies.push(policy);
        }
        policies
    });
    assert_eq!(policies.len(), 2);
    let c = capture(&snap);
    assert_eq!(c.counter(m::DROPPED_TOTAL, &[]), 0, "a packet was dropped");
    assert_eq!(
        c.counter(m::SYNTHESIZED_TOTAL, &[]),
        0,
        "an answer was queued"
    );
}

/// After the broker's accepting CONNACK, the packets pipelined behind the CONNECT go to
/// the broker exactly as sent, a large one split over many reads included; only then
/// are they checked, and the gateway's answer to one over a limit follows the CONNACK.
#[tokio::test]
async fn after_an_accepting_connack_the_pipelined_packets_arrive_intact() {
    let policy = policy();
    let layer = MqttLayer::new(Config::new()).policy(policy.clone());
    let connect = connect_v5_as("c1");
    let big: Vec<u8> = (0..100_000_u32).map(|i| (i % 251) as u8).collect();
    let first = publish(true, 1, 1, &big);
    let over = publish(true, 1, 2, b"over the limit");
    let rest = [subscribe(true, 3), vec![0xC0, 0x00], vec![0xE0, 0x00]].concat();
    let bytes = [connect.clone(), first.clone(), over, rest.clone()].concat();
    let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
    let (addr, broker_task) = broker(connack.clone(), connect.len()).await;
    let got = through_gateway(&layer, addr, &bytes).await;
    // The broker's CONNACK, then the gateway's PUBACK 0x97 for the PUBLISH over the limit.
    assert_eq!(got, [connack, vec![0x40, 0x03, 0x00, 0x02, 0x97]].concat());
    assert_eq!(broker_task.await.unwrap(), [connect, first, rest].concat());
    assert_eq!(policy.tracked_keys(Tier::Publish), 1);
}
