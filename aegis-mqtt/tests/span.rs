//! A refusal's log line names the client: the MQTT layer records the CONNECT's client id
//! in the `conn` span of `aegis_core::serve`, which already has the peer address.
//!
//! Alone in its own test binary: tracing caches each callsite's interest process-wide,
//! and a test running in parallel without a subscriber could hide the span from this one.

use std::future::IntoFuture;

use aegis_core::testing::capture_logs;
use aegis_core::{Conn, serve};
use aegis_mqtt::Config;
use aegis_mqtt::layer::{MqttIo, MqttLayer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tower::{Layer, service_fn};

#[test]
fn a_refused_packet_is_logged_with_the_peer_and_the_client_id() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (client, text) = capture_logs(tracing::Level::DEBUG, || {
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            // The inner service stands for the broker: it accepts the CONNECT, then reads
            // until the layer refuses.
            let broker = service_fn(|mut io: MqttIo<Conn<TcpStream>>| async move {
                io.write_all(&[0x20, 0x02, 0x00, 0x00]).await?;
                let mut seen = Vec::new();
                io.read_to_end(&mut seen).await.map(|_| ())
            });
            let svc = MqttLayer::new(Config::new()).layer(broker);
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let server = tokio::spawn(
                serve(listener, svc)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .into_future(),
            );
            let mut s = TcpStream::connect(addr).await.unwrap();
            let client = s.local_addr().unwrap();
            // CONNECT (3.1.1, client id `dev"42`: the log must quote it), then a SUBSCRIBE
            // with packet id 0, which [MQTT-2.3.1-1] forbids.
            let mut connect = vec![
                0x10, 0x12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 6,
            ];
            connect.extend_from_slice(b"dev\"42");
            s.write_all(&connect).await.unwrap();
            s.write_all(&[0x82, 0x06, 0, 0, 0, 1, b'a', 0])
                .await
                .unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            stop_tx.send(()).unwrap();
            assert!(server.await.unwrap().drained());
            client
        })
    });
    let line = text
        .lines()
        .find(|l| l.contains("connection rejected") && l.contains("layer=\"mqtt\""))
        .unwrap_or_else(|| panic!("no MQTT rejection event in:\n{text}"));
    assert!(line.contains(&format!("peer={client}")), "{line}");
    assert!(line.contains(r#"client_id="dev\"42""#), "{line}");
}
