//! A refusal while the broker is inside one of its packets: the client gets that packet
//! whole, then (5.0) the DISCONNECT, then EOF; or, if it does not read, the cut at the
//! deadline. Duplex pipes and paused time: every step is deterministic.
#![cfg(feature = "layer")]

mod common;

use std::io;
use std::time::Duration;

use aegis_core::Conn;
use aegis_core::error::BoxError;
use aegis_mqtt::layer::{MqttIo, MqttLayer};
use common::{B, connect_v4, connect_v5, duplex_conn};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

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
