//! The stack the README shows, over real loopback sockets in front of a real mosquitto.
//!
//! PROXY protocol (trusting loopback) -> per-client rate limit -> slowloris deadlines ->
//! MQTT-only sniffing -> strict MQTT validation -> the upstream proxy -> mosquitto.
//! Needs `mosquitto` on the PATH or in /usr/sbin (`.ci/run` installs it).

mod common;

use std::num::NonZeroU32;
use std::time::Duration;

use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::metrics::testing::{capture, run};
use aegis_core::{proxy::Proxy, serve};
use aegis_layers::proxy_protocol::ProxyProtocolLayer;
use aegis_layers::rate_limit::{Quota, RateLimitLayer};
use aegis_layers::slowloris::SlowlorisLayer;
use aegis_layers::sniff::{Protocols, SniffLayer};
use aegis_mqtt::layer::MqttLayer;
use common::{Mosquitto, closed_silently, connect, packet, read_packet};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tower::ServiceBuilder;

fn proxy_v1(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40000 1883\r\n").into_bytes()
}

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn the_readme_stack_carries_real_mqtt_and_refuses_what_it_should() {
    // The stack serves on the test's own runtime, under a recorder of its own: the
    // rejections say which layer refused what (one capture: it drains what it reads).
    let ((), snap) = run(false, readme_stack);
    let m = capture(&snap);
    // The MQTT layer would close that HTTP request too: only the label shows the
    // sniffer's refusal.
    assert_eq!(
        m.counter(REJECTIONS_TOTAL, &[("layer", "sniff"), ("reason", "http1")]),
        1,
        "HTTP refused by the sniffer"
    );
    assert_eq!(
        m.counter(REJECTIONS_TOTAL, &[("layer", "sniff")]),
        1,
        "nothing else refused by the sniffer"
    );
    // mosquitto closes a CONNECT with the reserved flag and answers protocol level 9
    // with 0x01 as the gateway does: only the labels show that the gateway refused them.
    assert_eq!(
        m.counter(
            REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", "malformed")]
        ),
        1,
        "the reserved flag refused by the MQTT layer"
    );
    assert_eq!(
        m.counter(
            REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", "unsupported_version")]
        ),
        1,
        "protocol level 9 refused by the MQTT layer"
    );
    // mosquitto would take keep-alive 0 (no keep-alive at all): `max_keep_alive` refuses it.
    assert_eq!(
        m.counter(
            REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", "keep_alive")]
        ),
        1,
        "keep-alive 0 refused by the MQTT layer"
    );
    assert_eq!(
        m.counter(REJECTIONS_TOTAL, &[("layer", "mqtt")]),
        3,
        "nothing else refused by the MQTT layer"
    );
    assert_eq!(
        m.counter(
            REJECTIONS_TOTAL,
            &[("layer", "rate_limit"), ("reason", "per_client")]
        ),
        1,
        "the second connection claiming 203.0.113.7 refused by the rate limiter"
    );
    assert_eq!(
        m.counter(REJECTIONS_TOTAL, &[("layer", "rate_limit")]),
        1,
        "nothing else refused by the rate limiter"
    );
}

async fn readme_stack() {
    let broker = Mosquitto::start().await;
    let stack = ServiceBuilder::new()
        .layer(ProxyProtocolLayer::new(["127.0.0.1/32".parse().unwrap()]))
        .layer(
            RateLimitLayer::builder()
                .per_client(Quota::per_minute(NonZeroU32::new(1).unwrap()))
                .max_concurrent_per_client(64)
                .build(),
        )
        .layer(
            SlowlorisLayer::new()
                .first_byte_timeout(SECS(5))
                .handshake_timeout(SECS(10)),
        )
        .layer(SniffLayer::new(Protocols::MQTT))
        .layer(MqttLayer::new(aegis_mqtt::Config::new().max_keep_alive(600)).enforce_keep_alive())
        .service(Proxy::new(broker.addr()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, stack).into_future());

    // A subscriber whose balancer says it is 203.0.113.7.
    let mut sub = TcpStream::connect(addr).await.unwrap();
    sub.write_all(&[proxy_v1("203.0.113.7"), connect(4, "sub", 60)].concat())
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut sub).await.unwrap(),
        (0x20, vec![0x00, 0x00])
    );
    // SUBSCRIBE id 1, topic "t", QoS 1.
    sub.write_all(&packet(0x82, &[0x00, 0x01, 0x00, 0x01, b't', 0x01]))
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut sub).await.unwrap(),
        (0x90, vec![0x00, 0x01, 0x01])
    );

    // A publisher from another claimed address, over the same loopback socket address.
    let mut publ = TcpStream::connect(addr).await.unwrap();
    publ.write_all(&[proxy_v1("203.0.113.8"), connect(4, "pub", 60)].concat())
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut publ).await.unwrap(),
        (0x20, vec![0x00, 0x00])
    );
    // PUBLISH QoS 1, id 7, topic "t", payload "hello".
    publ.write_all(&packet(
        0x32,
        &[0x00, 0x01, b't', 0x00, 0x07, b'h', b'e', b'l', b'l', b'o'],
    ))
    .await
    .unwrap();
    assert_eq!(
        read_packet(&mut publ).await.unwrap(),
        (0x40, vec![0x00, 0x07])
    );

    // The subscriber gets the message through the whole stack, byte-exact.
    let (first, body) = timeout(SECS(5), read_packet(&mut sub))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first & 0xf6, 0x32, "a QoS 1 PUBLISH");
    assert_eq!(&body[..3], &[0x00, 0x01, b't']);
    assert_eq!(&body[5..], b"hello");

    // The rate limiter keys on the PROXY-supplied address: a second connection that
    // claims 203.0.113.7 is over its per-minute budget and closed before any CONNACK.
    let mut again = TcpStream::connect(addr).await.unwrap();
    again
        .write_all(&[proxy_v1("203.0.113.7"), connect(4, "again", 60)].concat())
        .await
        .unwrap();
    assert!(closed_silently(&mut again, SECS(5)).await);

    // HTTP on the MQTT port is refused by the sniffer (the caller checks that it was the
    // sniffer: a request as long as this one is closed silently by the MQTT layer too,
    // which reads `GE` as a PUBACK header of 69 bytes, and no PUBACK comes first).
    let mut http = TcpStream::connect(addr).await.unwrap();
    let get =
        b"GET / HTTP/1.1\r\nHost: gateway.test\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
    assert!(get.len() >= 2 + 69);
    http.write_all(&[proxy_v1("203.0.113.20"), get.to_vec()].concat())
        .await
        .unwrap();
    assert!(closed_silently(&mut http, SECS(5)).await);

    // A malformed 3.1.1 CONNECT (reserved flag bit set) is closed without a CONNACK.
    let mut bad = connect(4, "bad", 60);
    bad[9] |= 0x01;
    let mut malformed = TcpStream::connect(addr).await.unwrap();
    malformed
        .write_all(&[proxy_v1("203.0.113.21"), bad].concat())
        .await
        .unwrap();
    assert!(closed_silently(&mut malformed, SECS(5)).await);

    // An unacceptable protocol level gets the 3.1.1 CONNACK 0x01 from the gateway.
    let mut v9 = connect(4, "v9", 60);
    v9[8] = 9;
    let mut version = TcpStream::connect(addr).await.unwrap();
    version
        .write_all(&[proxy_v1("203.0.113.22"), v9].concat())
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut version).await.unwrap(),
        (0x20, vec![0x00, 0x01])
    );

    // A CONNECT without a keep-alive (0) is closed without a CONNACK: such a session,
    // silent after its CONNECT, would be held for ever.
    let mut forever = TcpStream::connect(addr).await.unwrap();
    forever
        .write_all(&[proxy_v1("203.0.113.23"), connect(4, "forever", 0)].concat())
        .await
        .unwrap();
    assert!(closed_silently(&mut forever, SECS(5)).await);

    // The first two sessions are still alive: PINGREQ / PINGRESP.
    for s in [&mut sub, &mut publ] {
        s.write_all(&[0xC0, 0x00]).await.unwrap();
        assert_eq!(read_packet(s).await.unwrap(), (0xD0, vec![]));
    }
}
