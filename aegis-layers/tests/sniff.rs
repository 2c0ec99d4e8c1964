//! Behaviour of the sniffing layer: every split point of every header, the timeout,
//! EOF and read errors, bounded reads of garbage, replay, params, metrics, the filter
//! and the router over real loopback sockets, and the bounded hyper adapter.
#![cfg(feature = "sniff")]

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::{find, label_of};
use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::metrics::testing::{capture, run_counting};
use aegis_core::{BoxError, ClientAddr, Conn, Handshake, LocalAddr, Param, PeerAddr};
use aegis_layers::sniff::{
    Detection, Http1, Protocol, Protocols, SNIFF_TOTAL, SniffError, SniffLayer, SniffRouter,
    Sniffed,
};
use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceExt, service_fn};

fn addr() -> SocketAddr {
    "192.0.2.10:4000".parse().unwrap()
}

fn conn<T>(io: T) -> Conn<T> {
    Conn::new(io, addr(), "127.0.0.1:1883".parse().unwrap())
}

const MQTT4: &[u8] = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";
const H2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04";

/// A whole first message of each protocol, and what it must be detected as.
fn messages() -> Vec<(&'static [u8], Detection)> {
    vec![
        (MQTT4, Detection::mqtt(4)),
        (
            b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00",
            Detection::mqtt(5),
        ),
        (
            b"\x10\x10\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x00",
            Detection::mqtt(3),
        ),
        (
            b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
            Detection::new(Protocol::Http1),
        ),
        (
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            Detection::new(Protocol::Http1),
        ),
        (
            b"PATCH /a HTTP/1.1\r\n\r\n",
            Detection::new(Protocol::Http1),
        ),
        (H2, Detection::new(Protocol::Http2)),
        (
            b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03",
            Detection::new(Protocol::Tls),
        ),
        (
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            Detection::new(Protocol::ProxyProtocol),
        ),
        (
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x00",
            Detection::new(Protocol::ProxyProtocol),
        ),
        (b"SSH-2.0-x\r\n", Detection::new(Protocol::Unknown)),
    ]
}

/// The inner service of most tests: checks the replay is byte-exact and returns the
/// detection.
async fn replay_exact<I: AsyncRead + Unpin>(
    mut io: Sniffed<I>,
    want: &'static [u8],
) -> Result<Detection, io::Error> {
    let mut got = vec![0u8; want.len()];
    io.read_exact(&mut got).await?;
    assert_eq!(got, want, "replayed bytes differ");
    Ok(io.detection())
}

const ALL: Protocols = Protocols::MQTT
    .union(Protocols::HTTP)
    .union(Protocols::TLS)
    .union(Protocols::PROXY_PROTOCOL)
    .union(Protocols::UNKNOWN);

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn every_split_point_of_every_header_is_detected_and_replayed() {
    for (msg, want) in messages() {
        for i in 1..msg.len() {
            let mock = tokio_test::io::Builder::new()
                .read(&msg[..i])
                .read(&msg[i..])
                .build();
            let svc = SniffLayer::new(ALL).layer(service_fn(move |io| replay_exact(io, msg)));
            let got = svc.oneshot(conn(mock)).await.unwrap();
            assert_eq!(got, want, "{msg:?} split at {i}");
        }
        // And one byte at a time.
        let mut b = tokio_test::io::Builder::new();
        for byte in msg {
            b.read(std::slice::from_ref(byte));
        }
        let svc = SniffLayer::new(ALL).layer(service_fn(move |io| replay_exact(io, msg)));
        assert_eq!(svc.oneshot(conn(b.build())).await.unwrap(), want, "{msg:?}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_silent_client_is_a_timeout_detection_not_an_error() {
    // Rejected when timeouts are not allowed...
    let mock = tokio_test::io::Builder::new()
        .read(b"\x10")
        .wait(Duration::from_secs(6))
        .build();
    let svc = SniffLayer::new(Protocols::MQTT)
        .timeout(Duration::from_secs(5))
        .layer(service_fn(|_io: Sniffed<_>| async {
            Ok::<_, Infallible>(())
        }));
    let start = tokio::time::Instant::now();
    let err = svc.oneshot(conn(mock)).await.unwrap_err();
    assert_eq!(label_of(&*err), ("sniff", "timeout"));
    let waited = tokio::time::Instant::now().saturating_duration_since(start);
    assert_eq!(waited, Duration::from_secs(5));

    // ...and passed on, with the partial prefix, when they are.
    let mock = tokio_test::io::Builder::new()
        .read(b"\x10")
        .wait(Duration::from_secs(6))
        .build();
    let svc = SniffLayer::new(Protocols::TIMEOUT)
        .timeout(Duration::from_secs(5))
        .layer(service_fn(|io: Sniffed<_>| async move {
            assert_eq!(io.get_ref().prefix(), b"\x10");
            Ok::<_, Infallible>(Param::<Protocol>::param(&io))
        }));
    assert_eq!(svc.oneshot(conn(mock)).await.unwrap(), Protocol::Timeout);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_timeout_is_total_not_per_read() {
    // Each byte arrives within the timeout, but the header takes longer in total.
    let mut b = tokio_test::io::Builder::new();
    for byte in &MQTT4[..6] {
        b.read(std::slice::from_ref(byte))
            .wait(Duration::from_secs(1));
    }
    let svc = SniffLayer::new(ALL | Protocols::TIMEOUT)
        .timeout(Duration::from_millis(3500))
        .layer(service_fn(|mut io: Sniffed<_>| async move {
            let (p, n) = (io.protocol(), io.get_ref().prefix().len());
            // The rest still arrives, after the prefix.
            let mut all = Vec::new();
            io.read_to_end(&mut all).await?;
            assert_eq!(all, &MQTT4[..6]);
            Ok::<_, io::Error>((p, n))
        }));
    let (p, n) = svc.oneshot(conn(b.build())).await.unwrap();
    assert_eq!(p, Protocol::Timeout);
    assert_eq!(n, 4);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn eof_and_read_errors_are_typed_errors() {
    let svc =
        SniffLayer::new(ALL | Protocols::TIMEOUT).layer(service_fn(|_io: Sniffed<_>| async {
            Ok::<_, Infallible>(())
        }));

    let mock = tokio_test::io::Builder::new().read(b"GE").build();
    let err = svc.clone().oneshot(conn(mock)).await.unwrap_err();
    assert_eq!(label_of(&*err), ("sniff", "eof"));
    assert!(matches!(
        find::<SniffError>(&*err),
        Some(SniffError::Eof(2))
    ));

    let mock = tokio_test::io::Builder::new().build();
    let err = svc.clone().oneshot(conn(mock)).await.unwrap_err();
    assert!(matches!(
        find::<SniffError>(&*err),
        Some(SniffError::Eof(0))
    ));

    let mock = tokio_test::io::Builder::new()
        .read(b"\x16")
        .read_error(io::Error::from(io::ErrorKind::ConnectionReset))
        .build();
    let err = svc.oneshot(conn(mock)).await.unwrap_err();
    assert_eq!(label_of(&*err), ("sniff", "io"));
    let Some(SniffError::Io(e)) = find::<SniffError>(&*err) else {
        panic!("{err:?}")
    };
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
}

/// An endless stream that counts the bytes it hands out: `chunk` bytes per read at most,
/// `head` first, then `fill` forever.
struct Endless {
    head: &'static [u8],
    fill: u8,
    chunk: usize,
    served: Arc<AtomicUsize>,
}

impl AsyncRead for Endless {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(self.chunk);
        let at = self.served.fetch_add(n, Ordering::Relaxed);
        for i in at..at + n {
            buf.put_slice(&[*self.head.get(i).unwrap_or(&self.fill)]);
        }
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn reads_are_bounded_by_the_cap_whatever_the_client_sends() {
    for (head, fill, chunk, cap, want, read) in [
        // A flood of garbage: one read of exactly the cap, then a decision.
        (
            b"".as_slice(),
            0xab,
            usize::MAX,
            1024,
            Protocol::Unknown,
            1024,
        ),
        // A flood after a valid preface: the same single read.
        (H2, 0, usize::MAX, 1024, Protocol::Http2, 1024),
        // A smaller cap is honoured (and never below 24 bytes).
        (H2, 0, usize::MAX, 1, Protocol::Http2, 24),
        // Byte by byte: reading stops at the deciding byte.
        (H2, 0, 1, 1024, Protocol::Http2, 24),
        (MQTT4, 0, 1, 1024, Protocol::Mqtt, 9),
        // A header that is still a prefix at every byte up to the cap of 24: the H2
        // preface is exactly 24 bytes, so a 24-byte cap still decides.
        (H2, 0, 5, 24, Protocol::Http2, 24),
    ] {
        let served = Arc::new(AtomicUsize::new(0));
        let io = Endless {
            head,
            fill,
            chunk,
            served: Arc::clone(&served),
        };
        let svc = SniffLayer::new(ALL).max_prefix(cap).layer(service_fn(
            |io: Sniffed<Conn<Endless>>| async move {
                Ok::<_, Infallible>((io.protocol(), io.get_ref().prefix().len()))
            },
        ));
        let (p, prefix) = svc.oneshot(conn(io)).await.unwrap();
        assert_eq!(p, want);
        assert_eq!(
            served.load(Ordering::Relaxed),
            read,
            "{head:?} chunk {chunk}"
        );
        assert_eq!(prefix, read);
    }
}

#[tokio::test]
async fn sniffed_forwards_params_and_vectored_writes() {
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(MQTT4).await.unwrap();
    let svc = SniffLayer::new(Protocols::MQTT).layer(service_fn(
        |mut io: Sniffed<Conn<DuplexStream>>| async move {
            assert_eq!(Param::<PeerAddr>::param(&io).0, addr());
            assert_eq!(Param::<ClientAddr>::param(&io).0, addr());
            assert_eq!(
                Param::<LocalAddr>::param(&io).0,
                "127.0.0.1:1883".parse().unwrap()
            );
            assert!(!Param::<Handshake>::param(&io).is_tracked());
            assert_eq!(Param::<Detection>::param(&io), Detection::mqtt(4));
            assert_eq!(
                io.is_write_vectored(),
                io.get_ref().get_ref().get_ref().is_write_vectored()
            );
            let bufs = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
            let n = io.write_vectored(&bufs).await?;
            io.flush().await?;
            io.shutdown().await?;
            Ok::<_, io::Error>(n)
        },
    ));
    let n = svc.oneshot(conn(server)).await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(&got[..], &b"abcd"[..n]);
}

/// Detections are counted per protocol, with handles registered once per service (not
/// once per connection).
#[test]
fn detections_and_rejections_are_counted_by_protocol() {
    let ((), snap, registered) = run_counting(false, || async {
        let svc = SniffLayer::new(Protocols::MQTT).layer(service_fn(|_io: Sniffed<_>| async {
            Ok::<_, Infallible>(())
        }));
        for msg in [
            MQTT4,
            MQTT4,
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x03\x00\x10\x01",
        ] {
            let mock = tokio_test::io::Builder::new().read(msg).build();
            let _ = svc.clone().oneshot(conn(mock)).await;
        }
    });
    let m = capture(&snap);
    assert_eq!(m.counter(SNIFF_TOTAL, &[("protocol", "mqtt")]), 2);
    assert_eq!(m.counter(SNIFF_TOTAL, &[("protocol", "http1")]), 1);
    assert_eq!(m.counter(SNIFF_TOTAL, &[("protocol", "tls")]), 1);
    let rejected = |reason| m.counter(REJECTIONS_TOTAL, &[("layer", "sniff"), ("reason", reason)]);
    assert_eq!(
        (rejected("http1"), rejected("tls"), rejected("mqtt")),
        (1, 1, 0)
    );
    // One handle per protocol label, registered at the first detection.
    assert_eq!(registered.of(SNIFF_TOTAL), Protocol::ALL.len());
}

/// Serves `accepts` connections from `listener` with `svc`, each in its own task, and
/// returns their results in order.
async fn serve_n<S>(listener: TcpListener, svc: S, accepts: usize) -> Vec<Result<(), BoxError>>
where
    S: tower::Service<Conn<TcpStream>, Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let local = listener.local_addr().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..accepts {
        let (stream, peer) = listener.accept().await.unwrap();
        tasks.push(tokio::spawn(
            svc.clone().oneshot(Conn::new(stream, peer, local)),
        ));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// An inner byte-stream service that reads the MQTT CONNECT (replayed) and answers a
/// CONNACK.
async fn connack<I: AsyncRead + AsyncWrite + Unpin>(mut io: Sniffed<I>) -> Result<(), BoxError> {
    let mut got = vec![0u8; MQTT4.len()];
    io.read_exact(&mut got).await?;
    assert_eq!(got, MQTT4);
    io.write_all(b"\x20\x02\x00\x00").await?;
    io.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn filter_over_real_sockets_serves_allowed_and_closes_the_rest() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let svc = SniffLayer::new(Protocols::MQTT).layer(service_fn(connack));
    let server = tokio::spawn(serve_n(listener, svc, 2));

    let mut mqtt = TcpStream::connect(at).await.unwrap();
    mqtt.write_all(MQTT4).await.unwrap();
    let mut reply = Vec::new();
    mqtt.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"\x20\x02\x00\x00");

    let mut http = TcpStream::connect(at).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    // Closed without a byte (a reset is also a close).
    let n = http.read_to_end(&mut reply).await.unwrap_or(0);
    assert_eq!(n, 0);

    let results = server.await.unwrap();
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(label_of(&**err), ("sniff", "http1"));
}

async fn http_get(at: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(at).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.unwrap();
    String::from_utf8(reply).unwrap()
}

fn health() -> Http1<
    impl hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = hyper::Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + Sync
    + 'static,
> {
    Http1::new(hyper::service::service_fn(
        |req: hyper::Request<hyper::body::Incoming>| async move {
            let mut res = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
            if req.uri().path() != "/healthz" {
                *res.status_mut() = hyper::StatusCode::NOT_FOUND;
            }
            Ok::<_, Infallible>(res)
        },
    ))
}

#[tokio::test]
async fn router_over_real_sockets_sends_each_protocol_to_its_service() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let router = SniffRouter::new()
        .route(Protocols::MQTT, service_fn(connack))
        .route(Protocols::HTTP1, health());
    assert_eq!(router.routed(), Protocols::MQTT | Protocols::HTTP1);
    let server = tokio::spawn(serve_n(listener, router, 3));

    let mut mqtt = TcpStream::connect(at).await.unwrap();
    mqtt.write_all(MQTT4).await.unwrap();
    let mut reply = Vec::new();
    mqtt.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"\x20\x02\x00\x00");

    let reply = http_get(
        at,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nok"), "{reply}");

    // TLS has no route: closed, labelled `tls`.
    let mut tls = TcpStream::connect(at).await.unwrap();
    tls.write_all(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03")
        .await
        .unwrap();
    let mut reply = Vec::new();
    assert_eq!(tls.read_to_end(&mut reply).await.unwrap_or(0), 0);

    let results = server.await.unwrap();
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert_eq!(
        label_of(&**results[2].as_ref().unwrap_err()),
        ("sniff", "tls")
    );
}

#[tokio::test]
async fn router_tries_routes_in_order_and_rejects_with_no_routes() {
    let router = SniffRouter::new()
        .route(Protocols::MQTT, service_fn(connack))
        .route(
            Protocols::MQTT | Protocols::UNKNOWN,
            service_fn(|_io: Sniffed<_>| async { Err::<(), BoxError>("second".into()) }),
        );
    let mock = tokio_test::io::Builder::new()
        .read(MQTT4)
        .write(b"\x20\x02\x00\x00")
        .build();
    router.clone().oneshot(conn(mock)).await.unwrap();
    let mock = tokio_test::io::Builder::new().read(b"zz").build();
    let err = router.oneshot(conn(mock)).await.unwrap_err();
    assert_eq!(err.to_string(), "second");

    let empty = SniffRouter::new();
    let mock = tokio_test::io::Builder::new().read(MQTT4).build();
    let err = empty.oneshot(conn(mock)).await.unwrap_err();
    assert_eq!(label_of(&*err), ("sniff", "mqtt"));
}

/// A duplex stream with a tracked handshake handle.
struct Tracked {
    io: DuplexStream,
    handshake: Handshake,
}

impl Param<Handshake> for Tracked {
    fn param(&self) -> Handshake {
        self.handshake.clone()
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn tracked() -> (DuplexStream, Tracked, Handshake) {
    let (client, io) = tokio::io::duplex(64 * 1024);
    let handshake = Handshake::tracked();
    let t = Tracked {
        io,
        handshake: handshake.clone(),
    };
    (client, t, handshake)
}

#[tokio::test]
async fn http_completes_the_handshake_when_headers_are_read() {
    let (mut client, io, handshake) = tracked();
    let conn = tokio::spawn(health().oneshot(io));
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    tokio::task::yield_now().await;
    assert!(!handshake.is_complete());
    client
        .write_all(b"connection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(handshake.is_complete());
    conn.await.unwrap().unwrap();
}

#[tokio::test]
async fn http_bounds_header_count_and_size() {
    // Too many headers: 431.
    let (mut client, io, _) = tracked();
    let conn = tokio::spawn(health().max_headers(4).oneshot(io));
    let mut req = b"GET /healthz HTTP/1.1\r\n".to_vec();
    for i in 0..5 {
        req.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    client.write_all(&req).await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert!(
        reply.starts_with(b"HTTP/1.1 431 "),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let err = conn.await.unwrap().unwrap_err();
    assert_eq!(label_of(&*err), ("http", "too_large"));

    // Four headers are fine.
    let (mut client, io, _) = tracked();
    let conn = tokio::spawn(health().max_headers(4).oneshot(io));
    client
        .write_all(b"GET /healthz HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 200 "));
    conn.await.unwrap().unwrap();

    // Headers over the byte budget: 431, and the server stops reading.
    let (mut client, io, _) = tracked();
    let conn = tokio::spawn(health().max_header_size(1024).oneshot(io));
    let big = format!(
        "GET /healthz HTTP/1.1\r\nx-big: {}\r\n\r\n",
        "a".repeat(2048)
    );
    client.write_all(big.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert!(
        reply.starts_with(b"HTTP/1.1 431 "),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(
        label_of(&*conn.await.unwrap().unwrap_err()),
        ("http", "too_large")
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn http_header_read_timeout_is_enforced() {
    let (mut client, io, handshake) = tracked();
    let conn = tokio::spawn(
        health()
            .header_read_timeout(Duration::from_secs(3))
            .oneshot(io),
    );
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nhost:")
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let err = conn.await.unwrap().unwrap_err();
    let waited = tokio::time::Instant::now().saturating_duration_since(start);
    assert_eq!(label_of(&*err), ("http", "header_timeout"));
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert!(!handshake.is_complete());
}

/// `Duration::MAX`, a user's "never", is no panic in hyper (which adds the timeout to
/// an `Instant`): the request is answered.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn http_header_read_timeout_of_duration_max_serves() {
    let (mut client, io, _) = tracked();
    let conn = tokio::spawn(health().header_read_timeout(Duration::MAX).oneshot(io));
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert!(
        reply.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    conn.await.unwrap().unwrap();
}

#[tokio::test]
async fn refusers_answer_and_close() {
    let (mut client, io, _) = tracked();
    let conn = tokio::spawn(Http1::bad_request().oneshot(io));
    // Keep-alive asked for, but the refuser closes anyway.
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8(reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
    assert!(reply.contains("connection: close\r\n"), "{reply}");
    conn.await.unwrap().unwrap();

    let (mut client, io, _) = tracked();
    let conn = tokio::spawn(Http1::upgrade_required("MQTT").oneshot(io));
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8(reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{reply}"
    );
    assert!(reply.contains("upgrade: MQTT\r\n"), "{reply}");
    conn.await.unwrap().unwrap();
}

#[tokio::test]
async fn poll_ready_is_the_inner_services_and_the_ready_one_is_called() {
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<Sniffed<Conn<tokio_test::io::Mock>>, (), _>(
            SniffLayer::new(Protocols::MQTT),
        );
    handle.allow(0);
    tokio_test::assert_pending!(svc.poll_ready());
    handle.allow(1);
    tokio_test::assert_ready_ok!(svc.poll_ready());
    let mock = tokio_test::io::Builder::new().read(MQTT4).build();
    // `call` without another `poll_ready`: the mock panics if the clone that was polled
    // ready is not the one called once detection is done.
    let served = tokio::spawn(svc.call(conn(mock)));
    let (io, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the service that was polled ready was not called")
        .unwrap();
    assert_eq!(io.detection(), Detection::mqtt(4));
    assert_eq!(io.get_ref().prefix(), MQTT4);
    // Drain the replayed prefix so the mock sees its script consumed.
    let mut io = io;
    let mut buf = vec![0u8; MQTT4.len()];
    io.read_exact(&mut buf).await.unwrap();
    respond.send_response(());
    served.await.unwrap().unwrap();
}
