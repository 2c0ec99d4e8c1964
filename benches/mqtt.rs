//! The MQTT codec: CONNECT validation and PUBLISH framing + validation, each against a
//! plain `mqttbytes::v4::read` of the same bytes in the same run.
//!
//! ```text
//! cargo bench -p benches --bench mqtt
//! ```
//!
//! - **CONNECT**: a typical MQTT 3.1.1 CONNECT (client id, keep-alive, user name and
//!   password, 61 bytes). Goal: under 200 ns. mqttbytes is measured on a fresh `BytesMut`
//!   per iteration (built outside the timing), since `read` consumes it.
//! - **PUBLISH stream**: 1,000 `QoS` 0 PUBLISH packets of 36 bytes (topic `sensors/0042/temp`,
//!   15-byte payload) back to back in one buffer, framed and validated by a connected
//!   [`Session`]; throughput in packets per second. Goal: at least 5 million per second
//!   per core.
//! - **Layer read path**: the same 1,000 PUBLISH packets after a CONNECT, read to the end
//!   by an inner service through `MqttLayer` and its `MqttIo` over a `tokio::io::duplex`
//!   (64 KiB), against the same service reading the bare duplex: the cost of the layer
//!   per packet, IO included. Each writes a CONNACK first, as a broker does (the layer
//!   reads nothing after the CONNECT before it). `mqtt_layer_policy` adds a per-packet `Policy` (PUBLISH,
//!   packets and bytes per client id, quotas never reached): the cost of its three
//!   keyed-limiter checks per packet.

use std::hint::black_box;
use std::time::Duration;

use aegis_core::Conn;
use aegis_mqtt::__baseline::bytes::BytesMut;
use aegis_mqtt::__baseline::mqttbytes;
use aegis_mqtt::layer::policy::{Policy, Quota};
use aegis_mqtt::layer::{MqttIo, MqttLayer};
use aegis_mqtt::{Config, Next, Session, validate_connect};
use criterion::{BatchSize, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tower::{Layer, ServiceExt, service_fn};

const PUBLISHES: usize = 1_000;

fn string(v: &mut Vec<u8>, s: &[u8]) {
    v.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
    v.extend_from_slice(s);
}

fn connect() -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 60]); // level, user + password + clean, 60 s
    string(&mut body, b"sensor-0042-kitchen");
    string(&mut body, b"device-user");
    string(&mut body, b"s3cr3t-passw0rd");
    let mut f = vec![0x10, u8::try_from(body.len()).unwrap()];
    f.extend_from_slice(&body);
    f
}

fn publish() -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"sensors/0042/temp");
    body.extend_from_slice(b"{\"t\":21.5,\"h\":4");
    let mut f = vec![0x30, u8::try_from(body.len()).unwrap()];
    f.extend_from_slice(&body);
    f
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let connect = connect();
    let config = Config::new().max_keep_alive(600);
    assert!(validate_connect(&connect, &config).is_ok());
    assert!(mqttbytes::v4::read(&mut BytesMut::from(&connect[..]), 1 << 16).is_ok());
    let mut g = c.benchmark_group("mqtt_connect");
    g.bench_function("aegis_validate_connect", |b| {
        b.iter(|| validate_connect(black_box(&connect), &config).is_ok());
    });
    g.bench_function("mqttbytes_v4_read", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&connect[..]),
            |buf| mqttbytes::v4::read(buf, 1 << 16).is_ok(),
            BatchSize::SmallInput,
        );
    });
    g.finish();

    let one = publish();
    let stream = one.repeat(PUBLISHES);
    let mut connected = Session::new(Config::new());
    connected.validate(&connect).unwrap();
    let mut g = c.benchmark_group("mqtt_publish_stream");
    g.throughput(Throughput::Elements(PUBLISHES as u64));
    g.bench_function("aegis_session", |b| {
        b.iter(|| {
            let mut s = connected.clone();
            let mut buf = black_box(&stream[..]);
            let mut n = 0;
            while let Ok(Next::Packet { len, .. }) = s.next(buf) {
                buf = &buf[len..];
                n += 1;
            }
            assert_eq!(n, PUBLISHES);
        });
    });
    g.bench_function("mqttbytes_v4_read", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&stream[..]),
            |buf| {
                let mut n = 0;
                while !buf.is_empty() {
                    mqttbytes::v4::read(buf, 1 << 16).unwrap();
                    n += 1;
                }
                assert_eq!(n, PUBLISHES);
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let session_bytes = [&connect[..], &stream[..]].concat();
    let mut g = c.benchmark_group("mqtt_layer_read");
    g.throughput(Throughput::Elements(PUBLISHES as u64));
    g.bench_function("bare_duplex", |b| {
        b.iter(|| rt.block_on(read_all(&session_bytes, Through::Bare)));
    });
    g.bench_function("mqtt_layer", |b| {
        b.iter(|| {
            rt.block_on(read_all(
                &session_bytes,
                Through::Layer(&MqttLayer::default()),
            ))
        });
    });
    // Built once: its limiters are shared by every connection, as in a server.
    let lots = std::num::NonZeroU32::new(u32::MAX).unwrap();
    let policy = Policy::builder()
        .publish_per_client(Quota::per_second(lots))
        .packets_per_client(Quota::per_second(lots))
        .bytes_per_client(Quota::per_second(lots))
        .build();
    let with_policy = MqttLayer::default().policy(policy);
    g.bench_function("mqtt_layer_policy", |b| {
        b.iter(|| rt.block_on(read_all(&session_bytes, Through::Policy(&with_policy))));
    });
    g.finish();
    c.final_summary();
}

/// How `read_all` reads.
enum Through<'a> {
    Bare,
    Layer(&'a MqttLayer),
    Policy(&'a MqttLayer<Policy>),
}

/// The broker's CONNACK: the layer reads nothing after the CONNECT before it.
const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// Writes `bytes` into a duplex and reads them all back, through a layer or not; the
/// reader writes a CONNACK first, as a broker does.
async fn read_all(bytes: &[u8], through: Through<'_>) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    client.write_all(bytes).await.unwrap();
    // EOF for the reader; the client stays, to take the CONNACK.
    client.shutdown().await.unwrap();
    let addr = "127.0.0.1:1883".parse().unwrap();
    let mut io = Conn::new(server, addr, addr);
    let inner = service_fn(|mut io: MqttIo<Conn<DuplexStream>>| async move {
        io.write_all(&CONNACK).await?;
        drain(&mut io, &mut vec![0u8; 16 * 1024]).await
    });
    let n = match through {
        Through::Bare => {
            io.write_all(&CONNACK).await.unwrap();
            drain(&mut io, &mut vec![0u8; 16 * 1024]).await.unwrap()
        }
        Through::Layer(layer) => layer.layer(inner).oneshot(io).await.unwrap(),
        Through::Policy(layer) => layer.layer(inner).oneshot(io).await.unwrap(),
    };
    assert_eq!(n, bytes.len());
    drop(client);
}

async fn drain<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut [u8],
) -> Result<usize, std::io::Error> {
    let mut total = 0;
    loop {
        match io.read(buf).await? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}
