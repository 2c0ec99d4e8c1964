//! `MqttLayer::connack_latency`: each connection reports its CONNECT to CONNACK round
//! trip through the broker once; a CONNACK the gateway writes itself reports nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aegis_core::Conn;
use aegis_core::proxy::Proxy;
use aegis_core::testing::dead_port;
use aegis_mqtt::Config;
use aegis_mqtt::layer::{ConnackLatency, MqttIo, MqttLayer, Unavailable};
use common::{connect_v4, connect_v5, duplex_conn};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tower::{Layer, ServiceExt, service_fn};

fn recorder() -> (Arc<Mutex<Vec<Duration>>>, ConnackLatency) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    (seen, ConnackLatency::new(move |d| sink.lock().push(d)))
}

/// A broker that reads the CONNECT, takes `delay` to answer with `connack`, then sends
/// a PINGRESP (not a CONNACK: must not be reported again) and reads to the end.
async fn broker(
    mut io: MqttIo<Conn<DuplexStream>>,
    connect_len: usize,
    delay: Duration,
    connack: &'static [u8],
) -> std::io::Result<()> {
    let mut connect = vec![0; connect_len];
    io.read_exact(&mut connect).await?;
    tokio::time::sleep(delay).await;
    io.write_all(connack).await?;
    io.write_all(&[0xD0, 0x00]).await?;
    let mut rest = Vec::new();
    io.read_to_end(&mut rest).await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_broker_round_trip_is_reported_once_per_connection() {
    let (seen, latency) = recorder();
    let layer = MqttLayer::new(Config::new()).connack_latency(latency);
    for (connect, delay, connack) in [
        (connect_v4(), 40, &[0x20, 0x02, 0x00, 0x00][..]),
        (connect_v5(), 7, &[0x20, 0x03, 0x00, 0x00, 0x00][..]),
    ] {
        let len = connect.len();
        let svc = layer.clone().layer(service_fn(move |io| {
            broker(io, len, Duration::from_millis(delay), connack)
        }));
        let (mut client, server) = tokio::io::duplex(1024);
        let io = duplex_conn(server);
        let conn = tokio::spawn(svc.oneshot(io));
        client.write_all(&connect).await.unwrap();
        let mut got = vec![0; connack.len() + 2];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..connack.len()], connack);
        drop(client);
        conn.await.unwrap().unwrap();
    }
    assert_eq!(
        *seen.lock(),
        [Duration::from_millis(40), Duration::from_millis(7)]
    );
}

#[tokio::test]
async fn the_gateways_own_unavailable_connack_is_not_a_round_trip() {
    let (seen, latency) = recorder();
    // Held to the end: the front listener below cannot get the port.
    let (_dead, refused) = dead_port();
    let svc = MqttLayer::new(Config::new())
        .connack_latency(latency)
        .layer(Proxy::new(refused).on_connect_error(Unavailable::new()));
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let (io, peer) = front.accept().await.unwrap();
    client.write_all(&connect_v4()).await.unwrap();
    // Bounded: a gateway that kept the connection open fails here rather than hangs.
    let (got, res) = timeout(Duration::from_secs(10), async {
        tokio::join!(
            async {
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                got
            },
            svc.oneshot(Conn::new(io, peer, addr))
        )
    })
    .await
    .expect("the unavailable CONNACK and the close within 10 s");
    assert_eq!(got, [0x20, 0x02, 0x00, 0x03]);
    assert!(res.is_err());
    assert!(seen.lock().is_empty(), "reported {:?}", seen.lock());
}
