//! The composition of `examples/mqtt-and-health.rs` over real loopback sockets: one
//! port behind `aegis_core::serve`, a `SniffRouter` sending MQTT to `Proxy` (a plain TCP
//! upstream here) and HTTP/1 to a bounded hyper health page.
#![cfg(feature = "sniff")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use aegis_core::proxy::Proxy;
use aegis_core::serve;
use aegis_layers::sniff::{Http1, Protocols, SniffRouter};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// As in the example.
async fn health(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = if req.uri().path() == "/healthz" {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::NOT_FOUND, "not found")
    };
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    Ok(res)
}

/// Starts the example's composition on an ephemeral port; returns its address and a
/// sender that stops it.
async fn start(upstream: SocketAddr) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let router = SniffRouter::new()
        .timeout(Duration::from_secs(5))
        .route(
            Protocols::MQTT,
            Proxy::new(upstream).connect_timeout(Duration::from_secs(3)),
        )
        .route(
            Protocols::HTTP1,
            Http1::new(service_fn(health))
                .max_headers(32)
                .header_read_timeout(Duration::from_secs(5)),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        serve(listener, router)
            .drain_timeout(Duration::from_secs(5))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    (at, stop)
}

/// A CONNECT (MQTT 3.1.1, client id "aegis") followed by a PUBLISH and a DISCONNECT.
const MQTT_SESSION: &[u8] = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05aegis\
\x30\x0b\x00\x04demohello\xe0\x00";

#[tokio::test]
async fn health_page_and_mqtt_proxy_share_one_port() {
    // A plain TCP upstream that records every byte and answers a CONNACK.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let received = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let mut first = vec![0u8; 19];
        s.read_exact(&mut first).await.unwrap();
        s.write_all(b"\x20\x02\x00\x00").await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        first.extend_from_slice(&rest);
        first
    });
    let (at, stop) = start(upstream_addr).await;

    // HTTP: GET /healthz is answered by the health page.
    let mut http = TcpStream::connect(at).await.unwrap();
    http.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    http.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nok"), "{reply}");

    // MQTT: the session reaches the upstream byte for byte, sniffed prefix included,
    // and the upstream's CONNACK comes back.
    let mut mqtt = TcpStream::connect(at).await.unwrap();
    mqtt.write_all(&MQTT_SESSION[..19]).await.unwrap();
    let mut connack = [0u8; 4];
    mqtt.read_exact(&mut connack).await.unwrap();
    assert_eq!(&connack, b"\x20\x02\x00\x00");
    mqtt.write_all(&MQTT_SESSION[19..]).await.unwrap();
    mqtt.shutdown().await.unwrap();
    assert_eq!(received.await.unwrap(), MQTT_SESSION);

    // Anything else is closed without a byte.
    let mut tls = TcpStream::connect(at).await.unwrap();
    tls.write_all(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(tls.read_to_end(&mut buf).await.unwrap_or(0), 0);

    stop.send(()).unwrap();
}
