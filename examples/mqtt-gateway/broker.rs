//! The embedded broker: `rumqttd` in the same process, on a loopback port.
//!
//! `upstream = "embedded"` makes `cargo run --example mqtt-gateway` work on a machine
//! with no broker installed. rumqttd (pinned to 0.20.0, without TLS or websockets) runs
//! its MQTT 3.1.1 server on its own threads, each with a current-thread tokio runtime;
//! the gateway proxies to it over loopback like to any other broker, so every layer
//! applies unchanged.
//!
//! Limits of this mode, all from rumqttd 0.20: one listener speaks one protocol
//! version, and this one speaks MQTT 3.1.1 (level 4) only, so the gateway answers an
//! MQTT 5 CONNECT with CONNACK 0x84 and an MQTT 3.1 one with CONNACK 0x01 (the MQTT
//! layer's `Config::versions`; with `[mqtt] enabled = false`, rumqttd closes them
//! without a word). rumqttd also delivers a message at the subscription's `QoS`
//! rather than at the lower of the two. Point `--upstream` at a full broker (mosquitto)
//! for MQTT 5 and 3.1.
//! rumqttd has no way to stop its threads: they end with the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Starts the broker on a free loopback port and waits (bounded) until it accepts
/// connections.
pub(crate) async fn start(max_payload: usize) -> Result<SocketAddr, String> {
    // rumqttd binds the address it is given and does not report the port back, so take
    // a free port from the kernel first. Another process could take it in between; the
    // bounded wait below turns that into a start-up error.
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("embedded broker: no free loopback port: {e}"))?;

    let server = ServerSettings {
        name: "embedded-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: max_payload,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100_000,
            max_outgoing_packet_count: 200,
            // The in-memory log of each topic filter: 10 segments of 1 MiB (or of one
            // largest packet).
            max_segment_size: max_payload.max(1 << 20),
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    };

    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            // Blocks for the life of the process (it joins the server threads).
            if let Err(e) = Broker::new(config).start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| format!("embedded broker: cannot start its thread: {e}"))?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(addr);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("embedded broker: not listening on {addr} after 5s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
