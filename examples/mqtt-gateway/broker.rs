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
//! rumqttd's router refuses a client id with `+`, `$`, `#` or `/`, and fails on it: the
//! refused connection leaves its entry in rumqttd's table of will handlers, and the next
//! CONNECT with the same id panics on that entry while holding the table's lock, which
//! poisons it, so that every later CONNECT of every client panics too (the gateway
//! answers each "server unavailable"). The gateway therefore refuses those client ids
//! itself, with CONNACK 0x02 (identifier rejected), whatever `mqtt.client_id_chars`
//! allows (`stack::EMBEDDED_REFUSED_CHARS`). With `[mqtt] enabled = false` nothing
//! checks them: the gateway then warns at start-up ([`UNCHECKED_CLIENT_IDS`]).
//! Any other failure of rumqttd's between that entry and its CONNACK leaves the entry
//! behind the same way: its router's `max_connections` (100,000 here, above the
//! gateway's `server.max_connections` by default, but a local process can connect to
//! rumqttd directly), or a CONNACK write that fails because the connection was reset
//! (reproduced directly against rumqttd: a client that sends its CONNECT and resets at
//! once; through the gateway the upstream connection is closed, not reset, and the
//! CONNACK write succeeds). So a panic of rumqttd's is not silent: it is logged through
//! `tracing` (one line a second at most), counted in
//! `aegis_embedded_broker_panics_total`, and turns `/readyz` to 503 for good
//! ([`crate::panics`]); restart the gateway.
//! rumqttd has no way to stop its threads: they end with the process.
//!
//! **For trying the gateway, not for production.** rumqttd runs here without
//! authentication, on a loopback port that any local process can connect to directly,
//! past every layer of the gateway; and it keeps a log of up to 10 segments (each of
//! 1 MiB, or of one largest packet) in memory for every topic filter subscribed to, for
//! as long as it runs, so a client's SUBSCRIBEs to many filters and its PUBLISHes to
//! many topics grow its memory without bound. The configuration therefore refuses
//! `server.listen` beyond loopback with `upstream = "embedded"`, and the gateway logs a
//! warning at start-up.
//!
//! rumqttd binds the address it is given and reports neither the port nor whether its
//! bind succeeded (its error goes to the log, target `rumqttd`, which stays on at error
//! level). So the port is a free one taken from the kernel and released, and between
//! the two another process could take it: a start-up probe that only connects would
//! then succeed against that process, and the gateway would send it every CONNECT,
//! passwords included. On Linux the start-up therefore waits until the listening socket
//! on that address is one of this process's own (`/proc/net/tcp` and `/proc/self/fd`),
//! and fails if another process holds it or rumqttd's server thread has ended. Elsewhere
//! it can only connect and check that rumqttd's thread still runs: a process that takes
//! the port before rumqttd binds it is then caught only if rumqttd's thread ends before
//! the probe connects (the residual race).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The thread that starts rumqttd and then joins its server thread.
const BROKER_THREAD: &str = "embedded-broker";

/// rumqttd's server thread, named after its listener's settings.
const SERVER_THREAD: &str = "embedded-v4";

/// rumqttd's broker id; its router's thread is `router-<id>`, [`ROUTER_THREAD`].
const ROUTER_ID: usize = 0;

/// rumqttd's router thread: `router-` and [`ROUTER_ID`].
const ROUTER_THREAD: &str = "router-0";

/// The threads the embedded broker runs on (none of the gateway's own code runs there):
/// a panic on one of them is the broker's ([`crate::panics`]).
pub(crate) const THREADS: [&str; 3] = [BROKER_THREAD, SERVER_THREAD, ROUTER_THREAD];

/// Starts the broker on a free loopback port and waits (bounded) until its own listener
/// is up there.
pub(crate) async fn start(max_payload: usize) -> Result<SocketAddr, String> {
    // rumqttd binds the address it is given and does not report the port back, so take
    // a free port from the kernel first. Another process could take it in between: see
    // the module docs.
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("embedded broker: no free loopback port: {e}"))?;

    let server = ServerSettings {
        name: SERVER_THREAD.into(),
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
        id: ROUTER_ID,
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

    let broker = std::thread::Builder::new()
        .name(BROKER_THREAD.into())
        .spawn(move || {
            // Blocks for the life of the process: it joins the server thread, which ends
            // only when its listener does (a failed bind, say, logged by rumqttd).
            match Broker::new(config).start() {
                Ok(()) => tracing::error!("embedded broker stopped: its listener ended"),
                Err(e) => tracing::error!(error = %e, "embedded broker stopped"),
            }
        })
        .map_err(|e| format!("embedded broker: cannot start its thread: {e}"))?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if broker.is_finished() {
            return Err(format!(
                "embedded broker: rumqttd stopped at start-up (its error is logged above; \
                 was {addr} taken by another process?)"
            ));
        }
        match holder(addr) {
            // This process binds nothing else there: the listener is rumqttd's.
            Holder::This => return Ok(addr),
            Holder::Other => {
                return Err(format!(
                    "embedded broker: another process took {addr} before rumqttd bound it"
                ));
            }
            Holder::Nobody => {}
            // The residual race of the module docs.
            Holder::Unknown => {
                if tokio::net::TcpStream::connect(addr).await.is_ok() && !broker.is_finished() {
                    return Ok(addr);
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("embedded broker: not listening on {addr} after 5s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Who holds the listening TCP socket on an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// This process.
    This,
    /// Another process.
    Other,
    /// Nobody listens there.
    Nobody,
    /// This system does not tell (not Linux, `/proc` not mounted, an IPv6 address).
    Unknown,
}

/// Who holds the listening socket on `addr`: the line of `/proc/net/tcp` in state
/// `LISTEN` (`0A`) for it gives the socket's inode, and `/proc/self/fd` lists this
/// process's sockets as `socket:[inode]`.
#[cfg(target_os = "linux")]
fn holder(addr: SocketAddr) -> Holder {
    let SocketAddr::V4(v4) = addr else {
        return Holder::Unknown;
    };
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return Holder::Unknown;
    };
    // The kernel prints the address as the native-endian u32 of its network-order bytes,
    // and the port as a number.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
            .then(|| fields.get(9).copied())
            .flatten()
    });
    let Some(inode) = inode else {
        return Holder::Nobody;
    };
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Holder::Unknown;
    };
    let socket = format!("socket:[{inode}]");
    let ours = fds
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|to| to.as_os_str() == socket.as_str()));
    if ours { Holder::This } else { Holder::Other }
}

#[cfg(not(target_os = "linux"))]
fn holder(_: SocketAddr) -> Holder {
    Holder::Unknown
}

/// The warning (at start-up, and beside `mqtt.enabled` in `--check`'s output) for
/// `upstream = "embedded"` with `[mqtt] enabled = false`: then nothing keeps the client
/// ids that rumqttd fails on from it (see the module docs). The combination stays
/// allowed: without the MQTT layer the gateway is a plain TCP proxy, and that is what
/// some trials want.
pub(crate) const UNCHECKED_CLIENT_IDS: &str = "upstream = \"embedded\" with mqtt.enabled = \
    false: nothing checks client ids, and one client that connects twice with a client id \
    holding +, $, # or / breaks the embedded broker for every client until the gateway is \
    restarted (rumqttd 0.20 panics on every CONNECT from then on, and /readyz answers 503); \
    turn [mqtt] on, or point server.upstream at a real broker";

/// Descriptors of this process each proxied client holds with the embedded broker: the
/// client's socket, the upstream one, and rumqttd's end of it (see [`crate::nofile`]).
pub(crate) const DESCRIPTORS_PER_CLIENT: u64 = 3;
