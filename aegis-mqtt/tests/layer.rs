//! The tower layer over real loopback sockets (and paused time for the deadline).
#![cfg(feature = "layer")]

mod common;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::{BoxError, Rejected};
use aegis_core::{Conn, Handshake, Param};
use aegis_mqtt::layer::{MqttIo, MqttLayer, PacketRate};
use aegis_mqtt::{Config, MqttError};
use common::{B, connack_accepting, connect_v4, connect_v5, head};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt, service_fn};

/// A stream with a tracked handshake, as a slowloris layer outside would give.
struct Tracked<I> {
    io: I,
    hs: Handshake,
}

impl<I> Param<Handshake> for Tracked<I> {
    fn param(&self) -> Handshake {
        self.hs.clone()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What the inner service saw: the bytes it could read, and how its reading ended.
type Seen = (Vec<u8>, Result<(), io::ErrorKind>);

/// Serves one loopback connection through the layer; returns the client side, the
/// service's result, what the inner service saw (if it was called) and the handshake.
/// The inner service writes nothing: no CONNACK (so it reads nothing after the CONNECT,
/// but for an MQTT 5 client's AUTH).
async fn serve(
    layer: MqttLayer,
    client_bytes: Vec<u8>,
) -> (Vec<u8>, Result<(), BoxError>, Option<Seen>, bool) {
    serve_with(layer, client_bytes, false).await
}

/// [`serve`], with an inner service that accepts the CONNECT first, as a broker would.
async fn serve_accepted(
    layer: MqttLayer,
    client_bytes: Vec<u8>,
) -> (Vec<u8>, Result<(), BoxError>, Option<Seen>, bool) {
    serve_with(layer, client_bytes, true).await
}

async fn serve_with(
    layer: MqttLayer,
    client_bytes: Vec<u8>,
    connack: bool,
) -> (Vec<u8>, Result<(), BoxError>, Option<Seen>, bool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::spawn(async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&client_bytes).await.unwrap();
        c.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer).await;
        answer
    });
    let (stream, peer) = listener.accept().await.unwrap();
    let hs = Handshake::tracked();
    let io = Tracked {
        io: Conn::new(stream, peer, addr),
        hs: hs.clone(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let inner = service_fn(move |mut io: MqttIo<Tracked<Conn<TcpStream>>>| {
        let tx = tx.clone();
        async move {
            if connack {
                io.write_all(&connack_accepting(&io)).await?;
            }
            let mut seen = Vec::new();
            let mut chunk = [0u8; 7]; // small reads: packets come out in pieces
            let end = loop {
                match io.read(&mut chunk).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                    Err(e) => break Err(e.kind()),
                }
            };
            tx.send((seen, end)).unwrap();
            Ok::<_, BoxError>(())
        }
    });
    let mut svc = layer.layer(inner);
    let result = svc.ready().await.unwrap().call(io).await;
    let answer = client.await.unwrap();
    (answer, result, rx.try_recv().ok(), hs.is_complete())
}

fn rejected_label(r: &Result<(), BoxError>) -> (&'static str, &'static str) {
    let e = r.as_ref().unwrap_err();
    let r = aegis_core::error::find::<Rejected>(&**e).expect("a counted rejection");
    (r.layer(), r.label())
}

#[tokio::test]
async fn accepted_connect_forwards_the_original_bytes_and_completes_the_handshake() {
    let mut bytes = connect_v4();
    let publish = B::new().s("a/b").u16(1).raw(&[9; 300]).frame(0x32);
    bytes.extend_from_slice(&publish);
    bytes.extend_from_slice(&[0xC0, 0x00, 0xE0, 0x00]);
    let (answer, result, seen, handshake) =
        serve_accepted(MqttLayer::default(), bytes.clone()).await;
    assert!(result.is_ok());
    assert_eq!(answer, CONNACK_V4);
    assert_eq!(seen, Some((bytes, Ok(()))));
    assert!(handshake);
}

#[tokio::test]
async fn v3_refused_client_id_gets_connack_0x02_and_the_inner_service_never_runs() {
    let bytes = head("MQTT", 4, 0x00).s("").frame(0x10);
    let (answer, result, seen, handshake) = serve(MqttLayer::default(), bytes).await;
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x02]);
    assert_eq!(rejected_label(&result), ("mqtt", "client_id"));
    assert!(seen.is_none());
    assert!(!handshake);
}

#[tokio::test]
async fn v3_malformed_connect_closes_without_connack() {
    let bytes = head("MQTT", 4, 0x03).s("c").frame(0x10);
    let (answer, result, seen, _) = serve(MqttLayer::default(), bytes).await;
    assert!(answer.is_empty());
    assert_eq!(rejected_label(&result), ("mqtt", "malformed"));
    assert!(seen.is_none());
}

#[tokio::test]
async fn v5_malformed_connect_gets_connack_0x81() {
    let bytes = head("MQTT", 5, 0x03).props(&[]).s("c").frame(0x10);
    let (answer, result, _, _) = serve(MqttLayer::default(), bytes).await;
    assert_eq!(answer, [0x20, 0x03, 0x00, 0x81, 0x00]);
    assert_eq!(rejected_label(&result), ("mqtt", "malformed"));
}

#[tokio::test]
async fn unsupported_level_gets_connack_0x01() {
    let bytes = head("MQTT", 6, 0x02).s("c").frame(0x10);
    let (answer, result, _, _) = serve(MqttLayer::default(), bytes).await;
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x01]);
    assert_eq!(rejected_label(&result), ("mqtt", "unsupported_version"));
}

#[tokio::test]
async fn versions_refused_by_the_config_get_their_own_versions_answer() {
    use aegis_mqtt::Version;
    let only_311 = || MqttLayer::new(Config::new().versions(&[Version::V3_1_1]));
    // MQTT 5: CONNACK 0x84 in the 5.0 format, and the inner service never runs.
    let (answer, result, seen, _) = serve(only_311(), connect_v5()).await;
    assert_eq!(answer, [0x20, 0x03, 0x00, 0x84, 0x00]);
    assert_eq!(rejected_label(&result), ("mqtt", "unsupported_version"));
    assert!(seen.is_none());
    // MQTT 3.1: CONNACK 0x01.
    let v3_1 = head("MQIsdp", 3, 0x02).s("c1").frame(0x10);
    let (answer, result, seen, _) = serve(only_311(), v3_1).await;
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x01]);
    assert_eq!(rejected_label(&result), ("mqtt", "unsupported_version"));
    assert!(seen.is_none());
    // MQTT 3.1.1 goes through.
    let (answer, result, seen, _) = serve_accepted(only_311(), connect_v4()).await;
    assert!(result.is_ok());
    assert_eq!(answer, CONNACK_V4);
    assert_eq!(seen, Some((connect_v4(), Ok(()))));
}

#[tokio::test]
async fn oversized_connect_is_refused_from_its_header() {
    // Declares ~2 MB; only the header is sent, and the layer decides at once.
    let layer = MqttLayer::new(Config::new().max_connect_size(256));
    let (answer, result, seen, _) = serve(layer, vec![0x10, 0xFF, 0xFF, 0x7F]).await;
    assert!(answer.is_empty());
    assert_eq!(rejected_label(&result), ("mqtt", "packet_too_large"));
    assert!(seen.is_none());
}

#[tokio::test]
async fn invalid_later_packet_never_reaches_the_inner_service() {
    let good = B::new().s("a/b").raw(b"ok").frame(0x30);
    let bad = B::new().s("a/#").raw(b"no").frame(0x30);
    let after = vec![0xC0, 0x00];
    let bytes = [connect_v4(), good.clone(), bad, after].concat();
    let (_, result, seen, handshake) = serve_accepted(MqttLayer::default(), bytes).await;
    assert!(result.is_ok() && handshake);
    let (got, end) = seen.unwrap();
    assert_eq!(got, [connect_v4(), good].concat());
    assert_eq!(end, Err(io::ErrorKind::InvalidData));
}

#[tokio::test]
async fn v5_later_violation_gets_a_disconnect_then_close() {
    // topic alias 0: a protocol error, DISCONNECT 0x82 after the broker's CONNACK
    let bad = B::new().s("x").props(&[0x23, 0, 0]).frame(0x30);
    let bytes = [connect_v5(), bad].concat();
    let (answer, result, seen, _) = serve_accepted(MqttLayer::default(), bytes.clone()).await;
    assert!(result.is_ok());
    assert_eq!(
        seen.unwrap(),
        (connect_v5(), Err(io::ErrorKind::InvalidData))
    );
    assert_eq!(
        answer,
        [&CONNACK_V5[..], &[0xE0, 0x02, 0x82, 0x00]].concat()
    );
    // Before any CONNACK (an MQTT 5 client with an Authentication Method sends AUTH
    // then): a CONNACK with that reason code, never a DISCONNECT [MQTT-3.14.0-1]; the
    // broker's CONNACK never goes out after it.
    let connect = head("MQTT", 5, 2)
        .props(&[0x15, 0, 1, b'm'])
        .s("c")
        .frame(0x10);
    // AUTH with reason code 0x01, which AUTH does not have: a protocol error.
    let auth = B::new().u8(0x01).props(&[0x15, 0, 1, b'm']).frame(0xF0);
    let (answer, _, seen, _) = serve(MqttLayer::default(), [connect.clone(), auth].concat()).await;
    assert_eq!(seen.unwrap(), (connect, Err(io::ErrorKind::InvalidData)));
    assert_eq!(answer, [0x20, 0x03, 0x00, 0x82, 0x00]);
}

/// An MQTT 5 CONNECT of client `c` with the Authentication Method `SCRM`.
fn connect_with_method() -> Vec<u8> {
    head("MQTT", 5, 2)
        .props(&[0x15, 0, 4, b'S', b'C', b'R', b'M'])
        .s("c")
        .frame(0x10)
}

/// An AUTH with reason code `code`, the Authentication Method `method` and one byte of
/// Authentication Data.
fn auth_with(code: u8, method: [u8; 4]) -> Vec<u8> {
    B::new()
        .u8(code)
        .props(&[&[0x15, 0, 4][..], &method, &[0x16, 0, 1, 9]].concat())
        .frame(0xF0)
}

/// An AUTH whose Authentication Method is not the CONNECT's [MQTT-4.12.0-5] never
/// reaches the broker: before the CONNACK it is answered by CONNACK 0x82; as a
/// re-authentication after it [MQTT-4.12.1-1], by DISCONNECT 0x82. The CONNECT's own
/// method goes through.
#[tokio::test]
async fn v5_auth_with_another_method_than_the_connects_never_reaches_the_inner_service() {
    let connect = connect_with_method();
    // before the broker's CONNACK
    let bytes = [connect.clone(), auth_with(0x18, *b"PLAN")].concat();
    let (answer, result, seen, _) = serve(MqttLayer::default(), bytes).await;
    assert!(result.is_ok());
    assert_eq!(
        seen.unwrap(),
        (connect.clone(), Err(io::ErrorKind::InvalidData))
    );
    assert_eq!(answer, [0x20, 0x03, 0x00, 0x82, 0x00]);
    // a re-authentication after it
    let bytes = [connect.clone(), auth_with(0x19, *b"PLAN")].concat();
    let (answer, result, seen, _) = serve_accepted(MqttLayer::default(), bytes).await;
    assert!(result.is_ok());
    assert_eq!(
        seen.unwrap(),
        (connect.clone(), Err(io::ErrorKind::InvalidData))
    );
    assert_eq!(
        answer,
        [&CONNACK_V5[..], &[0xE0, 0x02, 0x82, 0x00]].concat()
    );
    // the CONNECT's method
    let bytes = [connect, auth_with(0x19, *b"SCRM")].concat();
    let (answer, result, seen, _) = serve_accepted(MqttLayer::default(), bytes.clone()).await;
    assert!(result.is_ok());
    assert_eq!(seen.unwrap(), (bytes, Ok(())));
    assert_eq!(answer, CONNACK_V5);
}

/// An AUTH with reason code 0x19 (Re-authenticate) and the CONNECT's method, before the
/// broker's CONNACK, is refused as one with another method is: a re-authentication
/// starts only after the CONNACK (5.0 §4.12.1), and during the enhanced authentication
/// the client's AUTH is 0x18 [MQTT-4.12.0-3]. The client gets CONNACK 0x82, the AUTH never
/// reaches the inner service (the broker), and each is counted once as `protocol_error`.
/// It went on to the broker. After the CONNACK, 0x19 goes through (the test above).
#[test]
fn v5_auth_re_authenticate_before_the_connack_gets_0x82_and_never_reaches_the_inner_service() {
    let connect = connect_with_method();
    let ((), snap) = aegis_core::metrics::testing::run(false, || async {
        for refused in [auth_with(0x19, *b"SCRM"), auth_with(0x18, *b"PLAN")] {
            let bytes = [connect.clone(), refused.clone()].concat();
            let (answer, result, seen, _) = serve(MqttLayer::default(), bytes).await;
            assert!(result.is_ok());
            assert_eq!(
                seen.unwrap(),
                (connect.clone(), Err(io::ErrorKind::InvalidData)),
                "{refused:02x?}"
            );
            assert_eq!(answer, [0x20, 0x03, 0x00, 0x82, 0x00], "{refused:02x?}");
        }
    });
    let count = aegis_core::metrics::testing::capture(&snap).counter(
        aegis_core::metrics::REJECTIONS_TOTAL,
        &[("layer", "mqtt"), ("reason", "protocol_error")],
    );
    assert_eq!(count, 2);
}

/// A DISCONNECT reason code only a server may send (0x8B Server shutting down, 5.0
/// Table 3-10) from a client is a protocol error [MQTT-3.14.2-1]: DISCONNECT 0x82 after
/// the broker's CONNACK, and the broker never gets the client's DISCONNECT (it would
/// read it as the client's normal end). 0x04, a client's own code, goes through.
#[tokio::test]
async fn v5_client_disconnect_with_a_server_only_code_gets_0x82_and_never_reaches_the_inner_service()
 {
    let publish = B::new().s("a/b").props(&[]).raw(b"ok").frame(0x30);
    let shutting_down = [0xE0, 0x02, 0x8B, 0x00];
    let bytes = [connect_v5(), publish.clone(), shutting_down.to_vec()].concat();
    let (answer, result, seen, _) = serve_accepted(MqttLayer::default(), bytes).await;
    assert!(result.is_ok());
    assert_eq!(
        seen.unwrap(),
        (
            [connect_v5(), publish.clone()].concat(),
            Err(io::ErrorKind::InvalidData)
        )
    );
    assert_eq!(
        answer,
        [&CONNACK_V5[..], &[0xE0, 0x02, 0x82, 0x00]].concat()
    );
    let with_will = [0xE0, 0x02, 0x04, 0x00];
    let bytes = [connect_v5(), publish, with_will.to_vec()].concat();
    let (answer, result, seen, _) = serve_accepted(MqttLayer::default(), bytes.clone()).await;
    assert!(result.is_ok());
    assert_eq!(seen.unwrap(), (bytes, Ok(())));
    assert_eq!(answer, CONNACK_V5);
}

#[tokio::test]
async fn v3_later_violation_just_closes() {
    let bytes = [connect_v4(), vec![0xC1, 0x00]].concat();
    let (answer, _, seen, _) = serve_accepted(MqttLayer::default(), bytes).await;
    assert_eq!(seen.unwrap().1, Err(io::ErrorKind::InvalidData));
    // The broker's CONNACK, then nothing: 3.x has no DISCONNECT.
    assert_eq!(answer, CONNACK_V4);
}

/// A broker that writes `out` to the client, then reads until the stream fails, then
/// tries to write once more; returns what the client received.
async fn broker_writes(out: Vec<u8>, client_bytes: Vec<u8>) -> (Vec<u8>, io::ErrorKind) {
    let (mut client, server) = tokio::io::duplex(4096);
    client.write_all(&client_bytes).await.unwrap();
    let inner = service_fn(move |mut io: MqttIo<Conn<tokio::io::DuplexStream>>| {
        let out = out.clone();
        async move {
            io.write_all(&out).await.unwrap();
            let mut sink = Vec::new();
            let err = io.read_to_end(&mut sink).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let again = io.write_all(b"late").await.err().map(|e| e.kind());
            Ok::<_, BoxError>(again)
        }
    });
    let mut svc = MqttLayer::default().layer(inner);
    let io = Conn::new(
        server,
        "192.0.2.1:1".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let again = svc.ready().await.unwrap().call(io).await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    (got, again.unwrap_or(io::ErrorKind::Other))
}

#[tokio::test(start_paused = true)]
async fn disconnect_waits_for_a_packet_boundary_on_the_broker_side() {
    let bad = [connect_v5(), B::new().s("#").props(&[]).frame(0x30)].concat();
    // after a whole CONNACK and a whole 200-byte PUBLISH: DISCONNECT 0x90, then nothing
    let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
    let publish = B::new().s("t").props(&[]).raw(&[1; 200]).frame(0x30);
    let out = [connack.clone(), publish].concat();
    let (got, late) = broker_writes(out.clone(), bad.clone()).await;
    assert_eq!(got, [out, vec![0xE0, 0x02, 0x90, 0x00]].concat());
    assert_eq!(late, io::ErrorKind::BrokenPipe);
    // in the middle of a broker packet that is never finished: no DISCONNECT (it would
    // corrupt the stream) once the refusal's deadline passes, and nothing after it
    let partial = [connack, vec![0x30, 0x10, 0x00]].concat();
    let (got, late) = broker_writes(partial.clone(), bad).await;
    assert_eq!(got, partial);
    assert_eq!(late, io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn enhanced_auth_client_waits_for_the_connack_the_broker_writes() {
    let c = head("MQTT", 5, 2)
        .props(&[0x15, 0, 1, b'm'])
        .s("c")
        .frame(0x10);
    let publish = B::new().s("a").props(&[]).raw(b"x").frame(0x30);
    let run = |connack_first: bool| {
        let (c, publish) = (c.clone(), publish.clone());
        async move {
            let (mut client, server) = tokio::io::duplex(4096);
            client
                .write_all(&[c.clone(), publish.clone()].concat())
                .await
                .unwrap();
            // EOF for the layer; the client still reads what the broker writes.
            client.shutdown().await.unwrap();
            let inner = service_fn(
                move |mut io: MqttIo<Conn<tokio::io::DuplexStream>>| async move {
                    if connack_first {
                        io.write_all(&[0x20, 0x03, 0x00, 0x00, 0x00]).await?;
                    }
                    let mut seen = Vec::new();
                    let end = io
                        .read_to_end(&mut seen)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.kind());
                    Ok::<_, BoxError>((seen, end))
                },
            );
            let io = Conn::new(
                server,
                "192.0.2.1:1".parse().unwrap(),
                "127.0.0.1:1883".parse().unwrap(),
            );
            let seen = MqttLayer::default().layer(inner).oneshot(io).await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            (seen, got)
        }
    };
    let connack = vec![0x20, 0x03, 0x00, 0x00, 0x00];
    let accepted = ([c.clone(), publish.clone()].concat(), Ok(()));
    assert_eq!(run(true).await, (accepted, connack));
    // PUBLISH before the CONNACK: refused with CONNACK 0x82, not a DISCONNECT, which
    // may not come before a CONNACK [MQTT-3.14.0-1]
    let refused = (c.clone(), Err(io::ErrorKind::InvalidData));
    assert_eq!(
        run(false).await,
        (refused, vec![0x20, 0x03, 0x00, 0x82, 0x00])
    );
}

#[tokio::test]
async fn mqtt_io_forwards_params_and_vectored_writes() {
    let (mut client, server) = tokio::io::duplex(4096);
    client.write_all(&connect_v4()).await.unwrap();
    let peer: std::net::SocketAddr = "198.51.100.7:5555".parse().unwrap();
    let local: std::net::SocketAddr = "127.0.0.1:1883".parse().unwrap();
    let inner = service_fn(
        move |mut io: MqttIo<Conn<tokio::io::DuplexStream>>| async move {
            assert_eq!(Param::<aegis_core::PeerAddr>::param(&io).0, peer);
            assert_eq!(Param::<aegis_core::LocalAddr>::param(&io).0, local);
            assert_eq!(Param::<aegis_core::ClientAddr>::param(&io).0, peer);
            assert!(!Param::<Handshake>::param(&io).is_tracked());
            assert_eq!(io.is_write_vectored(), io.get_ref().is_write_vectored());
            let bufs = [
                io::IoSlice::new(&[0x20, 0x02]),
                io::IoSlice::new(&[0x00, 0x00]),
            ];
            let n = io.write_vectored(&bufs).await?;
            io.flush().await?;
            Ok::<_, BoxError>(n)
        },
    );
    let n = MqttLayer::default()
        .layer(inner)
        .oneshot(Conn::new(server, peer, local))
        .await
        .unwrap();
    let mut got = vec![0; n];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, [0x20, 0x02, 0x00, 0x00][..n]);
}

/// A broker that may write a CONNACK first, then reads all it can; returns what it read,
/// how its reading ended, and what the client received.
async fn connack_then_read(
    layer: MqttLayer,
    client_bytes: Vec<u8>,
    connack: Option<Vec<u8>>,
) -> (Seen, Vec<u8>) {
    let (mut client, server) = tokio::io::duplex(8192);
    client.write_all(&client_bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let inner = service_fn(move |mut io: MqttIo<Conn<tokio::io::DuplexStream>>| {
        let connack = connack.clone();
        async move {
            if let Some(connack) = connack {
                io.write_all(&connack).await?;
            }
            let mut seen = Vec::new();
            let end = io
                .read_to_end(&mut seen)
                .await
                .map(|_| ())
                .map_err(|e| e.kind());
            Ok::<_, BoxError>((seen, end))
        }
    });
    let io = Conn::new(
        server,
        "192.0.2.1:1".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let seen = layer.layer(inner).oneshot(io).await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    (seen, got)
}

#[tokio::test]
async fn the_small_cap_holds_until_the_connack() {
    let layer = MqttLayer::new(Config::new().max_connect_size(100).max_packet_size(1000));
    let big = B::new().s("t").raw(&[5; 500]).frame(0x30);
    let bytes = [connect_v4(), big].concat();
    let (seen, got) = connack_then_read(
        layer.clone(),
        bytes.clone(),
        Some(vec![0x20, 0x02, 0x00, 0x00]),
    )
    .await;
    assert_eq!(
        (seen, got),
        ((bytes.clone(), Ok(())), vec![0x20, 0x02, 0x00, 0x00])
    );
    // Before the CONNACK only an MQTT 5 client with an Authentication Method is read
    // (its AUTH packets): under the small cap, answered by CONNACK 0x95.
    let connect = head("MQTT", 5, 2)
        .props(&[0x15, 0, 1, b'm'])
        .s("c")
        .frame(0x10);
    let auth = B::new()
        .u8(0x18)
        .props(&[&[0x15, 0, 1, b'm', 0x16, 0x01, 0xF4][..], &[7; 500]].concat())
        .frame(0xF0);
    let (seen, got) = connack_then_read(layer, [connect.clone(), auth].concat(), None).await;
    assert_eq!(seen, (connect, Err(io::ErrorKind::InvalidData)));
    assert_eq!(got, [0x20, 0x03, 0x00, 0x95, 0x00]);
}

const CONNACK_V4: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
const CONNACK_V5: [u8; 5] = [0x20, 0x03, 0x00, 0x00, 0x00];

/// Serves a duplex connection whose client writes `writes` (each after its pause) and
/// whose broker accepts the CONNECT, then reads to the end; returns what the broker
/// read and how its reading ended, what the client got after the broker's CONNACK
/// (asserting that it came first), and how long it all took.
async fn rate_run(layer: MqttLayer, writes: Vec<(Duration, Vec<u8>)>) -> (Seen, Vec<u8>, Duration) {
    let (mut client, server) = tokio::io::duplex(8192);
    let client_task = tokio::spawn(async move {
        for (pause, bytes) in writes {
            tokio::time::sleep(pause).await;
            // The layer may have closed by now (a refused client).
            let _ = client.write_all(&bytes).await;
        }
        let _ = client.shutdown().await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        got
    });
    let inner = service_fn(|mut io: MqttIo<Conn<tokio::io::DuplexStream>>| async move {
        // The broker accepts the CONNECT: what the layer answers later follows it.
        io.write_all(&connack_accepting(&io)).await?;
        let mut seen = Vec::new();
        let end = io
            .read_to_end(&mut seen)
            .await
            .map(|_| ())
            .map_err(|e| e.kind());
        Ok::<_, BoxError>((seen, end))
    });
    let io = Conn::new(
        server,
        "192.0.2.1:1".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let start = tokio::time::Instant::now();
    let seen = layer.layer(inner).oneshot(io).await.unwrap();
    let took = tokio::time::Instant::now().saturating_duration_since(start);
    let got = client_task.await.unwrap();
    assert_eq!(got.first(), Some(&0x20), "the CONNACK came first: {got:?}");
    let connack = 2 + usize::from(got[1]);
    (seen, got[connack..].to_vec(), took)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn packet_rate_throttles_by_default() {
    let pings: Vec<u8> = [0xC0, 0x00].repeat(10);
    let bytes = [connect_v4(), pings].concat();
    let layer = MqttLayer::default().packet_rate(PacketRate::new(2, 2));
    let (seen, got, took) = rate_run(layer, vec![(Duration::ZERO, bytes.clone())]).await;
    // all delivered, none refused; 8 packets over the burst at 2 a second: 4 s
    assert_eq!(seen, (bytes, Ok(())));
    assert!(got.is_empty());
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_millis(4100),
        "{took:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn packet_rate_disconnect_refuses_with_0x96_and_refills() {
    let layer = MqttLayer::default().packet_rate(PacketRate::new(1, 2).disconnect());
    let ping = vec![0xC0, 0x00];
    // a burst of 2 passes, a 3rd one second later passes too (refilled)...
    let writes = vec![
        (
            Duration::ZERO,
            [connect_v5(), ping.clone(), ping.clone()].concat(),
        ),
        (Duration::from_secs(1), ping.clone()),
    ];
    let (seen, got, _) = rate_run(layer.clone(), writes).await;
    assert_eq!(seen, ([connect_v5(), ping.repeat(3)].concat(), Ok(())));
    assert!(got.is_empty());
    // ...but 3 at once do not
    let writes = vec![(Duration::ZERO, [connect_v5(), ping.repeat(3)].concat())];
    let (seen, got, _) = rate_run(layer, writes).await;
    assert_eq!(
        seen,
        (
            [connect_v5(), ping.repeat(2)].concat(),
            Err(io::ErrorKind::InvalidData)
        )
    );
    assert_eq!(got, [0xE0, 0x02, 0x96, 0x00]);
}

fn connect_v5_keep_alive(seconds: u16) -> Vec<u8> {
    B::new()
        .s("MQTT")
        .u8(5)
        .u8(2)
        .u16(seconds)
        .props(&[])
        .s("c")
        .frame(0x10)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn keep_alive_enforced_after_one_and_a_half_times() {
    let layer = MqttLayer::default().enforce_keep_alive();
    let c = connect_v5_keep_alive(10);
    // silent after the CONNECT: refused after 15 s with DISCONNECT 0x8D
    let writes = vec![
        (Duration::ZERO, c.clone()),
        (Duration::from_secs(1000), vec![]),
    ];
    let (seen, got, took) = rate_run(layer.clone(), writes).await;
    assert_eq!(seen, (c.clone(), Err(io::ErrorKind::InvalidData)));
    assert_eq!(got, [0xE0, 0x02, 0x8D, 0x00]);
    assert_eq!(took, Duration::from_secs(15));
    // each packet restarts the clock: PINGREQs at 14 s and 28 s, then silence until 43 s
    let ping = vec![0xC0, 0x00];
    let writes = vec![
        (Duration::ZERO, c.clone()),
        (Duration::from_secs(14), ping.clone()),
        (Duration::from_secs(14), ping.clone()),
        (Duration::from_secs(1000), vec![]),
    ];
    let (seen, _, took) = rate_run(layer, writes).await;
    assert_eq!(
        seen,
        (
            [c, ping.repeat(2)].concat(),
            Err(io::ErrorKind::InvalidData)
        )
    );
    assert_eq!(took, Duration::from_secs(43));
}

/// A packet begun and never finished is refused at the layer's `packet_timeout` from its
/// first byte, with no keep-alive at all: MQTT 5 gets DISCONNECT 0x8D (as for the
/// keep-alive), 3.1.1 is closed, and each is counted as `packet_timeout`. The inner
/// service never sees a byte of the packet.
#[test]
fn a_packet_not_finished_in_time_is_refused() {
    let ((), snap) = aegis_core::metrics::testing::run(true, || async {
        let timeout = Duration::from_secs(30);
        let layer = MqttLayer::default().packet_timeout(timeout);
        let v5 = B::new().s("t").props(&[]).raw(&[1; 100]).frame(0x30);
        let v4 = B::new().s("t").raw(&[1; 100]).frame(0x30);
        for (connect, publish, answer) in [
            (connect_v5_keep_alive(0), v5, vec![0xE0, 0x02, 0x8D, 0x00]),
            (connect_v4(), v4, vec![]),
        ] {
            let writes = vec![
                (Duration::ZERO, [&connect[..], &publish[..50]].concat()),
                (Duration::from_secs(1000), vec![]),
            ];
            let (seen, got, took) = rate_run(layer.clone(), writes).await;
            assert_eq!(seen, (connect, Err(io::ErrorKind::InvalidData)));
            assert_eq!(got, answer);
            assert_eq!(took, timeout);
        }
    });
    let refused = aegis_core::metrics::testing::capture(&snap).counter(
        aegis_core::metrics::REJECTIONS_TOTAL,
        &[("layer", "mqtt"), ("reason", "packet_timeout")],
    );
    assert_eq!(refused, 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn keep_alive_follows_the_connacks_server_keep_alive() {
    let (mut client, server) = tokio::io::duplex(4096);
    client.write_all(&connect_v5_keep_alive(10)).await.unwrap();
    // Server Keep Alive 2 s: refused after 3 s, not 15 s
    let connack = vec![0x20, 0x06, 0x00, 0x00, 0x03, 0x13, 0x00, 0x02];
    let sent = connack.clone();
    let inner = service_fn(move |mut io: MqttIo<Conn<tokio::io::DuplexStream>>| {
        let connack = connack.clone();
        async move {
            io.write_all(&connack).await?;
            let mut seen = Vec::new();
            let err = io.read_to_end(&mut seen).await.unwrap_err();
            Ok::<_, BoxError>(err.kind())
        }
    });
    let io = Conn::new(
        server,
        "192.0.2.1:1".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let start = tokio::time::Instant::now();
    let kind = MqttLayer::default()
        .enforce_keep_alive()
        .layer(inner)
        .oneshot(io)
        .await
        .unwrap();
    assert_eq!(kind, io::ErrorKind::InvalidData);
    assert_eq!(
        tokio::time::Instant::now().saturating_duration_since(start),
        Duration::from_secs(3)
    );
    let mut got = vec![0; sent.len() + 4];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, [sent, vec![0xE0, 0x02, 0x8D, 0x00]].concat());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn keep_alive_not_enforced_by_default_or_when_zero() {
    let ping = vec![0xC0, 0x00];
    for (layer, c) in [
        (MqttLayer::default(), connect_v5_keep_alive(10)),
        (
            MqttLayer::default().enforce_keep_alive(),
            connect_v5_keep_alive(0),
        ),
    ] {
        let writes = vec![
            (Duration::ZERO, c.clone()),
            (Duration::from_secs(100), ping.clone()),
        ];
        let (seen, got, took) = rate_run(layer, writes).await;
        assert_eq!(seen, ([c, ping.clone()].concat(), Ok(())));
        assert!(got.is_empty());
        assert_eq!(took, Duration::from_secs(100));
    }
}

#[tokio::test]
async fn the_brokers_connack_limits_bind_the_client() {
    // Maximum QoS 0 and Server Keep Alive 30 s
    let connack = vec![0x20, 0x08, 0x00, 0x00, 0x05, 0x24, 0x00, 0x13, 0x00, 0x1E];
    let qos1 = B::new().s("a").u16(1).props(&[]).frame(0x32);
    let bytes = [connect_v5(), qos1].concat();
    let (seen, got) = connack_then_read(MqttLayer::default(), bytes, Some(connack.clone())).await;
    assert_eq!(seen, (connect_v5(), Err(io::ErrorKind::InvalidData)));
    assert_eq!(got, [connack, vec![0xE0, 0x02, 0x9B, 0x00]].concat());
}

#[tokio::test(start_paused = true)]
async fn the_boundary_is_checked_when_the_disconnect_would_go_out() {
    // The bad packet is found while the good one before it is released; by the time the
    // refusal is returned, the broker is inside a packet (never finished): no DISCONNECT
    // may follow.
    let good = B::new().s("a").props(&[]).frame(0x30);
    let bad = B::new().s("#").props(&[]).frame(0x30);
    let (mut client, server) = tokio::io::duplex(4096);
    client
        .write_all(&[connect_v5(), good.clone(), bad].concat())
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let expected = [connect_v5(), good].concat();
    let inner = service_fn(move |mut io: MqttIo<Conn<tokio::io::DuplexStream>>| {
        let expected = expected.clone();
        async move {
            io.write_all(&CONNACK_V5).await?;
            let mut seen = vec![0; expected.len()];
            io.read_exact(&mut seen).await?;
            assert_eq!(seen, expected);
            io.write_all(&[0x30, 0x10, 0x00]).await?; // part of a PUBLISH
            let err = io.read_u8().await.unwrap_err();
            Ok::<_, BoxError>(err.kind())
        }
    });
    let io = Conn::new(
        server,
        "192.0.2.1:1".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    );
    let kind = MqttLayer::default().layer(inner).oneshot(io).await.unwrap();
    assert_eq!(kind, io::ErrorKind::InvalidData);
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, [&CONNACK_V5[..], &[0x30, 0x10, 0x00]].concat());
}

#[test]
fn later_rejections_are_counted() {
    let ((), snap) = aegis_core::metrics::testing::run(false, || async {
        let bytes = [
            connect_v5(),
            B::new().s("x").props(&[0x23, 0, 0]).frame(0x30),
        ]
        .concat();
        let (_, _, seen, _) = serve_accepted(MqttLayer::default(), bytes).await;
        assert_eq!(seen.unwrap().1, Err(io::ErrorKind::InvalidData));
        let bytes = head("MQTT", 4, 0x00).s("").frame(0x10);
        let (answer, ..) = serve(MqttLayer::default(), bytes).await;
        assert_eq!(answer, [0x20, 0x02, 0x00, 0x02]);
    });
    // One snapshot: reading drains every series.
    let captured = aegis_core::metrics::testing::capture(&snap);
    let count = |reason| {
        captured.counter(
            aegis_core::metrics::REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", reason)],
        )
    };
    assert_eq!(count("protocol_error"), 1);
    assert_eq!(count("client_id"), 1);
}

/// A CONNECT not complete within `connect_timeout` is a typed rejection,
/// `connect_timeout`, counted in `aegis_rejections_total{layer="mqtt"}` (and so a
/// `rejected` connection, and a rejection for a security layer around): it was a plain
/// `TimedOut` I/O error, counted nowhere. The client gets no answer (its version may
/// not be known).
#[test]
fn connect_deadline() {
    let ((err, answer), snap) = aegis_core::metrics::testing::run(true, || async {
        let (mut client, server) = tokio::io::duplex(64);
        let connect = connect_v4();
        client.write_all(&connect[..5]).await.unwrap(); // and then nothing
        let inner =
            service_fn(|_: MqttIo<Conn<tokio::io::DuplexStream>>| async { Ok::<_, BoxError>(()) });
        let mut svc = MqttLayer::default()
            .connect_timeout(Duration::from_secs(3))
            .layer(inner);
        let io = Conn::new(
            server,
            "192.0.2.1:1".parse().unwrap(),
            "127.0.0.1:1883".parse().unwrap(),
        );
        let start = tokio::time::Instant::now();
        let err = svc.ready().await.unwrap().call(io).await.unwrap_err();
        assert_eq!(
            tokio::time::Instant::now().saturating_duration_since(start),
            Duration::from_secs(3)
        );
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        (err, answer)
    });
    assert_eq!(
        aegis_core::error::label_of(&*err),
        ("mqtt", "connect_timeout"),
        "{err:?}"
    );
    assert!(answer.is_empty(), "{answer:?}");
    let counted = |reason| {
        aegis_core::metrics::testing::capture(&snap).counter(
            aegis_core::metrics::REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", reason)],
        )
    };
    assert_eq!(counted("connect_timeout"), 1);
}

/// A refused CONNECT whose answer the client does not take within `connect_timeout` is
/// counted under the refusal's own reason, not as a `connect_timeout` (nor as nothing,
/// as before: the refusal was counted only once its answer was written).
#[test]
fn a_refusal_whose_answer_is_not_taken_in_time_keeps_its_reason() {
    let (err, snap) = aegis_core::metrics::testing::run(true, || async {
        // Two bytes of room each way: the 4-byte CONNACK 0x02 never fits, as the client
        // reads nothing.
        let (mut client, server) = tokio::io::duplex(2);
        let refused = head("MQTT", 4, 0x00).s("").frame(0x10); // empty id, no clean session
        let writer = tokio::spawn(async move {
            client.write_all(&refused).await.unwrap();
            client
        });
        let inner =
            service_fn(|_: MqttIo<Conn<tokio::io::DuplexStream>>| async { Ok::<_, BoxError>(()) });
        let mut svc = MqttLayer::default()
            .connect_timeout(Duration::from_secs(3))
            .layer(inner);
        let io = Conn::new(
            server,
            "192.0.2.1:1".parse().unwrap(),
            "127.0.0.1:1883".parse().unwrap(),
        );
        let err = svc.ready().await.unwrap().call(io).await.unwrap_err();
        drop(writer.await.unwrap());
        err
    });
    assert_eq!(
        aegis_core::error::label_of(&*err),
        ("mqtt", "client_id"),
        "{err:?}"
    );
    let captured = aegis_core::metrics::testing::capture(&snap);
    let counted = |reason| {
        captured.counter(
            aegis_core::metrics::REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", reason)],
        )
    };
    assert_eq!((counted("client_id"), counted("connect_timeout")), (1, 0));
}

#[tokio::test]
async fn eof_before_connect_is_an_io_error() {
    let (answer, result, seen, _) = serve(MqttLayer::default(), connect_v4()[..4].to_vec()).await;
    assert!(answer.is_empty() && seen.is_none());
    let e = result.unwrap_err();
    assert_eq!(
        e.downcast_ref::<io::Error>().unwrap().kind(),
        io::ErrorKind::UnexpectedEof
    );
}

#[test]
fn rejection_labels_map_through_aegis_core() {
    let e: BoxError = aegis_core::error::reject(MqttError::ClientId("x")).into();
    assert_eq!(aegis_core::error::label_of(&*e), ("mqtt", "client_id"));
}

/// A CONNECT that arrives in two pieces, cut anywhere, each read on its own, is taken
/// whole: the inner service reads the CONNECT and the PUBLISH sent with its second
/// piece exactly as sent, and the handshake completes.
#[tokio::test]
async fn a_connect_in_two_pieces_is_taken_whole_wherever_it_is_cut() {
    let connect = connect_v4();
    let publish = B::new().s("a/b").raw(b"hi").frame(0x30);
    for cut in 1..connect.len() {
        let (mut client, server) = tokio::io::duplex(4096);
        let hs = Handshake::tracked();
        let io = Tracked {
            io: server,
            hs: hs.clone(),
        };
        let inner = service_fn(
            |mut io: MqttIo<Tracked<tokio::io::DuplexStream>>| async move {
                io.write_all(&CONNACK_V4).await?;
                let mut seen = Vec::new();
                io.read_to_end(&mut seen).await?;
                Ok::<_, BoxError>(seen)
            },
        );
        let mut svc = MqttLayer::default().layer(inner);
        let mut fut = std::pin::pin!(svc.ready().await.unwrap().call(io));
        client.write_all(&connect[..cut]).await.unwrap();
        // The first piece alone: read, and not enough.
        assert!(
            futures_poll_once(fut.as_mut()).await.is_none(),
            "cut at {cut}"
        );
        assert!(!hs.is_complete());
        client.write_all(&connect[cut..]).await.unwrap();
        client.write_all(&publish).await.unwrap();
        client.shutdown().await.unwrap();
        let seen = fut.await.unwrap();
        assert_eq!(seen, [&connect[..], &publish[..]].concat(), "cut at {cut}");
        assert!(hs.is_complete());
    }
}

/// Polls `f` once: its output if it is ready.
async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
    let mut f = f;
    match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut f).poll(cx))).await {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}
