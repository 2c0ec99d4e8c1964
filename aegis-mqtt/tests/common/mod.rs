//! Packet builders shared by the tests.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::cast_possible_truncation,
    clippy::needless_pass_by_value
)]

use aegis_core::Conn;
use aegis_mqtt::{Config, MqttError, Packet, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

/// Builds a packet body field by field.
#[derive(Debug, Default, Clone)]
pub struct B(pub Vec<u8>);

impl B {
    pub fn new() -> Self {
        Self(Vec::new())
    }
    pub fn u8(mut self, b: u8) -> Self {
        self.0.push(b);
        self
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A length-prefixed string or binary field.
    pub fn s(self, b: impl AsRef<[u8]>) -> Self {
        let b = b.as_ref();
        self.u16(u16::try_from(b.len()).unwrap()).raw(b)
    }
    pub fn varint(mut self, v: usize) -> Self {
        put_varint(&mut self.0, v);
        self
    }
    /// An MQTT 5 property list: varint length then the bytes.
    pub fn props(self, p: &[u8]) -> Self {
        self.varint(p.len()).raw(p)
    }
    /// The whole packet, with a minimally encoded remaining length.
    pub fn frame(&self, first: u8) -> Vec<u8> {
        let mut v = vec![first];
        put_varint(&mut v, self.0.len());
        v.extend_from_slice(&self.0);
        v
    }
}

pub fn put_varint(v: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n & 0x7F) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        v.push(b);
        if n == 0 {
            break;
        }
    }
}

/// The start of a CONNECT body: protocol name, level, flags, keep-alive.
pub fn head(name: &str, level: u8, flags: u8) -> B {
    B::new().s(name).u8(level).u8(flags).u16(60)
}

/// A minimal valid 3.1.1 CONNECT with client id "c1", clean session.
pub fn connect_v4() -> Vec<u8> {
    connect_v4_as("c1")
}

/// A minimal valid 5.0 CONNECT with client id "c1", clean start, no properties.
pub fn connect_v5() -> Vec<u8> {
    connect_v5_as("c1")
}

/// A minimal valid 3.1.1 CONNECT with client id `id`, clean session.
pub fn connect_v4_as(id: &str) -> Vec<u8> {
    head("MQTT", 4, 0x02).s(id).frame(0x10)
}

/// A minimal valid 5.0 CONNECT with client id `id`, clean start, no properties.
pub fn connect_v5_as(id: &str) -> Vec<u8> {
    head("MQTT", 5, 0x02).props(&[]).s(id).frame(0x10)
}

/// `n` as a `NonZeroU32` (quotas and limits).
pub fn nz(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap()
}

/// A minimal valid 3.1 CONNECT with client id "c1", clean session.
pub fn connect_v3() -> Vec<u8> {
    head("MQIsdp", 3, 0x02).s("c1").frame(0x10)
}

/// A session that has accepted `connect`.
pub fn session_after(connect: &[u8]) -> Session {
    let mut s = Session::new(Config::new());
    assert!(matches!(s.validate(connect), Ok(Packet::Connect(_))));
    s
}

/// Validates `packet` after a 3.1.1 CONNECT.
pub fn v4(packet: &[u8]) -> Result<(), MqttError> {
    session_after(&connect_v4()).validate(packet).map(|_| ())
}

/// Validates `packet` after a 5.0 CONNECT.
pub fn v5(packet: &[u8]) -> Result<(), MqttError> {
    session_after(&connect_v5()).validate(packet).map(|_| ())
}

/// The Reject label of a result's error.
pub fn label<T>(r: Result<T, MqttError>) -> &'static str {
    use aegis_core::error::Reject;
    match r {
        Ok(_) => "ok",
        Err(e) => e.label(),
    }
}

/// A client on one end of a duplex stream (`capacity` bytes each way) that writes
/// `bytes`, closes its side and reads to the end; returns the other end, and the task
/// that yields what the client read. Write and read errors are ignored: a refused
/// client may be closed at any point.
pub fn client(capacity: usize, bytes: Vec<u8>) -> (DuplexStream, JoinHandle<Vec<u8>>) {
    let (mut client, server) = tokio::io::duplex(capacity);
    let task = tokio::spawn(async move {
        let _ = client.write_all(&bytes).await;
        let _ = client.shutdown().await;
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        got
    });
    (server, task)
}

/// The gateway's end of an in-process connection, as accepted from 192.0.2.1:4000 on
/// 127.0.0.1:1883.
pub fn duplex_conn(server: DuplexStream) -> Conn<DuplexStream> {
    Conn::new(
        server,
        "192.0.2.1:4000".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    )
}

/// The broker's CONNACK accepting the client of `io`, for its version. A test broker
/// writes it before it reads on, as a real one does: until then the layer reads nothing
/// the client sent after its CONNECT.
#[cfg(feature = "layer")]
pub fn connack_accepting<I>(io: &aegis_mqtt::layer::MqttIo<I>) -> Vec<u8> {
    if io.session().version() == Some(aegis_mqtt::Version::V5) {
        vec![0x20, 0x03, 0x00, 0x00, 0x00]
    } else {
        vec![0x20, 0x02, 0x00, 0x00]
    }
}
