//! The stack the README shows, over real loopback sockets in front of a real mosquitto.
//!
//! PROXY protocol (trusting loopback) -> per-client rate limit -> slowloris deadlines ->
//! MQTT-only sniffing -> strict MQTT validation -> the upstream proxy -> mosquitto.
//! Needs `mosquitto` on the PATH or in /usr/sbin (`.ci/run` installs it).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aegis_core::{proxy::Proxy, serve};
use aegis_layers::proxy_protocol::ProxyProtocolLayer;
use aegis_layers::rate_limit::{Quota, RateLimitLayer};
use aegis_layers::slowloris::SlowlorisLayer;
use aegis_layers::sniff::{Protocols, SniffLayer};
use aegis_mqtt::layer::MqttLayer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tower::ServiceBuilder;

/// A mosquitto broker on a free loopback port, killed on drop.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    _conf: PathBuf,
}

impl Mosquitto {
    async fn start() -> Self {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|p| !p.starts_with('/') || std::path::Path::new(p).exists())
            .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conf = std::env::temp_dir().join(format!("aegis-stack-mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start mosquitto ({e}): install it (apt-get install -y mosquitto) or run .ci/run")
            });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                return Self {
                    child,
                    addr,
                    _conf: conf,
                };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("mosquitto did not start listening on {addr}");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self._conf);
    }
}

/// MQTT 3.1.1 CONNECT with clean session and the given client id.
fn connect(client_id: &str) -> Vec<u8> {
    let mut v = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
    v.extend_from_slice(&u16::try_from(client_id.len()).unwrap().to_be_bytes());
    v.extend_from_slice(client_id.as_bytes());
    packet(0x10, &v)
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128, "test packets are small");
    let mut p = vec![first, u8::try_from(body.len()).unwrap()];
    p.extend_from_slice(body);
    p
}

fn proxy_v1(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40000 1883\r\n").into_bytes()
}

/// Reads one MQTT packet: (first byte, body).
async fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

/// Whether the server closed the connection without sending anything.
async fn closed_silently(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        timeout(Duration::from_secs(5), s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test]
async fn the_readme_stack_carries_real_mqtt_and_refuses_what_it_should() {
    let broker = Mosquitto::start().await;
    let stack = ServiceBuilder::new()
        .layer(ProxyProtocolLayer::new(["127.0.0.0/8".parse().unwrap()]))
        .layer(
            RateLimitLayer::builder()
                .per_client(Quota::per_minute(NonZeroU32::new(1).unwrap()))
                .build(),
        )
        .layer(
            SlowlorisLayer::new()
                .first_byte_timeout(SECS(5))
                .handshake_timeout(SECS(10)),
        )
        .layer(SniffLayer::new(Protocols::MQTT))
        .layer(MqttLayer::new(aegis_mqtt::Config::new()))
        .service(Proxy::new(broker.addr));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, stack).into_future());

    // A subscriber whose balancer says it is 203.0.113.7.
    let mut sub = TcpStream::connect(addr).await.unwrap();
    sub.write_all(&[proxy_v1("203.0.113.7"), connect("sub")].concat())
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
    publ.write_all(&[proxy_v1("203.0.113.8"), connect("pub")].concat())
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
        .write_all(&[proxy_v1("203.0.113.7"), connect("again")].concat())
        .await
        .unwrap();
    assert!(closed_silently(&mut again).await);

    // HTTP on the MQTT port is refused by the sniffer.
    let mut http = TcpStream::connect(addr).await.unwrap();
    http.write_all(&[proxy_v1("203.0.113.20"), b"GET / HTTP/1.1\r\n\r\n".to_vec()].concat())
        .await
        .unwrap();
    assert!(closed_silently(&mut http).await);

    // A malformed 3.1.1 CONNECT (reserved flag bit set) is closed without a CONNACK.
    let mut bad = connect("bad");
    bad[9] |= 0x01;
    let mut malformed = TcpStream::connect(addr).await.unwrap();
    malformed
        .write_all(&[proxy_v1("203.0.113.21"), bad].concat())
        .await
        .unwrap();
    assert!(closed_silently(&mut malformed).await);

    // An unacceptable protocol level gets the 3.1.1 CONNACK 0x01 from the gateway.
    let mut v9 = connect("v9");
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

    // The first two sessions are still alive: PINGREQ / PINGRESP.
    for s in [&mut sub, &mut publ] {
        s.write_all(&[0xC0, 0x00]).await.unwrap();
        assert_eq!(read_packet(s).await.unwrap(), (0xD0, vec![]));
    }
}
