//! A refusal while the broker is inside one of its packets: the client gets that packet
//! whole, then (5.0) the DISCONNECT, then EOF; or, if it does not read, the cut at the
//! deadline. Duplex pipes and paused time: every step is deterministic.
#![cfg(feature = "layer")]

mod common;

use std::io;
use std::time::Duration;

use aegis_core::Conn;
use aegis_core::error::BoxError;
use aegis_core::metrics::{REJECTIONS_TOTAL, testing};
use aegis_mqtt::layer::{MqttIo, MqttLayer};
use common::{B, connect_v4, connect_v5, duplex_conn, head};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

/// How long the layer waits for the broker's packet in flight (`REFUSAL_DEADLINE`).
const DEADLINE: Duration = Duration::from_secs(5);

/// A broker PUBLISH of `len` payload bytes (5.0 with an empty property list).
fn publish(v5: bool, len: usize) -> Vec<u8> {
    let b = B::new().s("t");
    let b = if v5 { b.props(&[]) } else { b };
    b.raw(&vec![7; len]).frame(0x30)
}

/// What the client and the inner service saw.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Every byte the client received, up to EOF.
    got: Vec<u8>,
    /// How the inner service's read ended.
    read: io::ErrorKind,
    /// How its write of the rest of the packet, and a whole packet after it, ended.
    write: io::ErrorKind,
}

/// The broker writes its CONNACK and the first `split` bytes of `first`; the client reads
/// them, then sends `bad`; a second later the broker writes the rest of `first` and a
/// whole `second` in one `write_all`, while the inner service keeps reading.
async fn refused_inside(
    connect: Vec<u8>,
    connack: Vec<u8>,
    first: &[u8],
    split: usize,
    second: Vec<u8>,
    bad: Vec<u8>,
) -> Outcome {
    let (mut client, server) = tokio::io::duplex(4096);
    client.write_all(&connect).await.unwrap();
    let head = [connack, first[..split].to_vec()].concat();
    let tail = [&first[split..], &second[..]].concat();
    let written = head.clone();
    let inner = service_fn(move |io: MqttIo<Conn<DuplexStream>>| {
        let (head, tail) = (written.clone(), tail.clone());
        async move {
            let (mut r, mut w) = tokio::io::split(io);
            w.write_all(&head).await?;
            let read = async {
                let mut sink = Vec::new();
                r.read_to_end(&mut sink).await.unwrap_err().kind()
            };
            let write = async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                w.write_all(&tail).await.unwrap_err().kind()
            };
            Ok::<_, BoxError>(tokio::join!(read, write))
        }
    });
    let svc = MqttLayer::default().layer(inner);
    let ended = tokio::spawn(tokio::time::timeout(
        Duration::from_secs(60),
        svc.oneshot(duplex_conn(server)),
    ));
    let mut got = vec![0; head.len()];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, head);
    client.write_all(&bad).await.unwrap();
    let (read, write) = ended
        .await
        .unwrap()
        .expect("the connection did not end")
        .unwrap();
    client.read_to_end(&mut got).await.unwrap();
    Outcome { got, read, write }
}

#[tokio::test(start_paused = true)]
async fn v5_the_brokers_packet_is_finished_then_the_disconnect_then_eof() {
    let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
    let first = publish(true, 200);
    let second = publish(true, 10);
    // A PUBLISH to "#": Topic Name invalid, DISCONNECT 0x90.
    let bad = B::new().s("#").props(&[]).frame(0x30);
    // Every split point, the fixed header's included.
    for split in 1..first.len() {
        let outcome = refused_inside(
            connect_v5(),
            connack.clone(),
            &first,
            split,
            second.clone(),
            bad.clone(),
        )
        .await;
        let expected = Outcome {
            got: [connack.clone(), first.clone(), vec![0xE0, 0x02, 0x90, 0x00]].concat(),
            read: io::ErrorKind::InvalidData,
            write: io::ErrorKind::BrokenPipe,
        };
        assert_eq!(outcome, expected, "split after {split} bytes");
    }
}

#[tokio::test(start_paused = true)]
async fn v3_the_brokers_packet_is_finished_then_eof() {
    let connack = vec![0x20, 0x02, 0x00, 0x00];
    // A two-byte Remaining Length: a split inside it too.
    let first = publish(false, 200);
    assert_eq!(&first[..3], [0x30, 0xCB, 0x01]);
    for split in [1, 2, 3, 100] {
        let outcome = refused_inside(
            connect_v4(),
            connack.clone(),
            &first,
            split,
            publish(false, 10),
            vec![0xC1, 0x00], // PINGREQ with flags: malformed
        )
        .await;
        let expected = Outcome {
            got: [connack.clone(), first.clone()].concat(),
            read: io::ErrorKind::InvalidData,
            write: io::ErrorKind::BrokenPipe,
        };
        assert_eq!(outcome, expected, "split after {split} bytes");
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_is_cut_at_the_deadline_without_a_disconnect() {
    // The pipe to the client holds 64 bytes, and the client never reads them.
    let (mut client, server) = tokio::io::duplex(64);
    let bad = B::new().s("#").props(&[]).frame(0x30);
    client
        .write_all(&[connect_v5(), bad].concat())
        .await
        .unwrap();
    let out = [vec![0x20, 0x03, 0x00, 0x00, 0x00], publish(true, 1000)].concat();
    let to_write = out.clone();
    let inner = service_fn(move |io: MqttIo<Conn<DuplexStream>>| {
        let out = to_write.clone();
        async move {
            let (mut r, mut w) = tokio::io::split(io);
            // Inside the PUBLISH when the bad packet is read.
            w.write_all(&out[..20]).await?;
            let start = Instant::now();
            let read = async {
                let mut sink = Vec::new();
                let err = r.read_to_end(&mut sink).await.unwrap_err();
                (err.kind(), Instant::now().saturating_duration_since(start))
            };
            let write = async { w.write_all(&out[20..]).await.unwrap_err().kind() };
            Ok::<_, BoxError>(tokio::join!(read, write))
        }
    });
    let svc = MqttLayer::default().layer(inner);
    let ended = tokio::time::timeout(Duration::from_secs(60), svc.oneshot(duplex_conn(server)))
        .await
        .expect("the connection did not end");
    let ((read, took), write) = ended.unwrap();
    assert_eq!(read, io::ErrorKind::InvalidData);
    assert_eq!(
        took, DEADLINE,
        "the read waits for the packet, up to the deadline"
    );
    assert_eq!(write, io::ErrorKind::BrokenPipe);
    // What the pipe took of the broker's stream, and no DISCONNECT.
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, out[..64]);
}

/// An MQTT 5 CONNECT with an Authentication Method ("m"): its AUTH packets are read
/// before the broker's CONNACK, and any other packet there is refused.
fn connect_auth() -> Vec<u8> {
    head("MQTT", 5, 0x02)
        .props(&[0x15, 0, 1, b'm'])
        .s("c")
        .frame(0x10)
}

/// The client's AUTH, Continue Authentication (0x18).
fn auth_continue() -> Vec<u8> {
    B::new().u8(0x18).props(&[0x15, 0, 1, b'm']).frame(0xF0)
}

/// A `QoS` 0 PUBLISH: before the CONNACK of an enhanced authentication, a protocol error
/// [MQTT-3.1.2-30].
fn publish_qos0() -> Vec<u8> {
    B::new().s("a").props(&[]).raw(b"x").frame(0x30)
}

/// Runs `f` on a paused runtime under a local metrics recorder; returns its output and
/// how many rejections of the MQTT layer were counted with `reason`.
fn counting<F: std::future::Future>(reason: &str, f: impl FnOnce() -> F) -> (F::Output, u64) {
    let (out, snap) = testing::run(true, f);
    let labels = [("layer", "mqtt"), ("reason", reason)];
    (out, testing::counter(&snap, REJECTIONS_TOTAL, &labels))
}

/// The client sends `client_bytes` (a CONNECT with an Authentication Method, its AUTH,
/// then a PUBLISH refused before the CONNACK) in one write. The broker reads the CONNECT,
/// writes `before` of its accepting CONNACK, reads (the AUTH, released before the
/// refusal), writes the rest of its CONNACK, and reads again: the refusal. Returns what
/// the client received, and the label of the read's error.
async fn connack_after_the_refusal(
    client_bytes: Vec<u8>,
    before: usize,
) -> (Vec<u8>, (&'static str, &'static str)) {
    const CONNACK: [u8; 5] = [0x20, 0x03, 0x00, 0x00, 0x00];
    let inner = service_fn(move |mut io: MqttIo<Conn<DuplexStream>>| async move {
        let mut buf = [0; 4096];
        let n = io.read(&mut buf).await?;
        assert_eq!(buf[..n], connect_auth());
        io.write_all(&CONNACK[..before]).await?;
        let n = io.read(&mut buf).await?;
        assert_eq!(buf[..n], auth_continue());
        io.write_all(&CONNACK[before..]).await?;
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        Ok::<_, BoxError>(aegis_core::error::label_of(&err))
    });
    through_layer(&client_bytes, inner).await
}

/// Serves one duplex connection whose client sends `client_bytes` and then reads to the
/// end, through a default `MqttLayer` over `inner` (bounded: the connection must end);
/// returns what the client received and the inner service's response.
async fn through_layer<S>(client_bytes: &[u8], inner: S) -> (Vec<u8>, S::Response)
where
    S: Service<MqttIo<Conn<DuplexStream>>, Error = BoxError> + Clone,
{
    let (mut client, server) = tokio::io::duplex(4096);
    client.write_all(client_bytes).await.unwrap();
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        MqttLayer::default()
            .layer(inner)
            .oneshot(duplex_conn(server)),
    )
    .await
    .expect("the connection did not end")
    .unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    (got, response)
}

#[test]
fn a_refusal_before_the_brokers_connack_is_a_disconnect_once_that_connack_is_out() {
    // The PUBLISH is refused while no CONNACK went out (its answer then would be CONNACK
    // 0x82), but the AUTH before it is read first, and the broker's accepting CONNACK
    // goes out before the read that returns the refusal: a second CONNACK may not
    // follow it, the DISCONNECT 0x82 does.
    let bytes = [connect_auth(), auth_continue(), publish_qos0()].concat();
    // The broker's CONNACK whole after the refusal, or begun before it (its first byte,
    // or all but its last) and finished after it.
    for before in [0, 1, 4] {
        let ((got, label), counted) = counting("protocol_error", || {
            connack_after_the_refusal(bytes.clone(), before)
        });
        assert_eq!(
            got,
            [0x20, 0x03, 0x00, 0x00, 0x00, 0xE0, 0x02, 0x82, 0x00],
            "CONNACK written {before} bytes before the refusal"
        );
        assert_eq!(label, ("mqtt", "protocol_error"));
        assert_eq!(counted, 1, "counted once");
    }
}

#[test]
fn a_refusal_inside_the_brokers_connack_is_a_disconnect_once_it_is_whole() {
    // The PUBLISH comes alone and is refused while the broker is inside its CONNACK: the
    // read waits for the CONNACK to be whole, then writes the DISCONNECT, not the CONNACK
    // the refusal would have had without one.
    let ((got, (label, late)), counted) = counting("protocol_error", || async {
        let inner = service_fn(|io: MqttIo<Conn<DuplexStream>>| async move {
            let (mut r, mut w) = tokio::io::split(io);
            let mut buf = [0; 4096];
            let n = r.read(&mut buf).await?;
            assert_eq!(buf[..n], connect_auth());
            w.write_all(&[0x20]).await?;
            let read = async {
                let err = r.read(&mut buf).await.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::InvalidData);
                aegis_core::error::label_of(&err)
            };
            let write = async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                w.write_all(&[0x03, 0x00, 0x00, 0x00]).await.unwrap();
                // Nothing after the DISCONNECT.
                w.write_all(&publish(true, 1)).await.unwrap_err().kind()
            };
            Ok::<_, BoxError>(tokio::join!(read, write))
        });
        through_layer(&[connect_auth(), publish_qos0()].concat(), inner).await
    });
    assert_eq!(got, [0x20, 0x03, 0x00, 0x00, 0x00, 0xE0, 0x02, 0x82, 0x00]);
    assert_eq!(label, ("mqtt", "protocol_error"));
    assert_eq!(late, io::ErrorKind::BrokenPipe);
    assert_eq!(counted, 1, "counted once");
}
