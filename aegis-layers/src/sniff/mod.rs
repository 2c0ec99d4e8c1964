//! Protocol sniffing: classify a connection's first bytes, then filter or route it.
//!
//! After linkerd2-proxy's detection: the layer reads a bounded prefix (at most
//! [`SniffLayer::max_prefix`] bytes, 1024 by default) under one total timeout (5 s by
//! default), reading again as long as the bytes are a proper prefix of a known header,
//! and classifies it with the pure function [`classify()`]:
//!
//! | [`Protocol`] | recognised by | bytes to decide |
//! |---|---|---|
//! | `Mqtt` | CONNECT: `0x10`, remaining-length varint, name `MQTT` (levels 4, 5) or `MQIsdp` (3), level byte ([`Detection::mqtt_level`]) | 9 to 14 |
//! | `Http1` | a method token and a space: `GET`, `HEAD`, `POST`, `PUT`, `DELETE`, `OPTIONS`, `PATCH`, `CONNECT`, `TRACE` | 4 to 8 |
//! | `Http2` | the prior-knowledge preface `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` | 24 |
//! | `Tls` | a handshake record (`0x16`, version `0x03 0x00..=0x04`) holding a `ClientHello` (type 1) | 6 |
//! | `ProxyProtocol` | `PROXY ` (v1) or the 12-byte v2 signature | 6 or 12 |
//! | `Unknown` | anything else, decided at the first byte that rules out every header | 1+ |
//! | `Timeout` | not enough bytes before the timeout: a result, not an error | |
//!
//! The bytes read are replayed to the inner service through [`aegis_core::Rewind`],
//! inside a [`Sniffed`] stream that also carries the [`Detection`] as a param
//! (`Param::<Protocol>` and `Param::<Detection>`) and forwards the four connection
//! params. The client closing before a decision ([`SniffError::Eof`]) and read errors
//! ([`SniffError::Io`]) are errors.
//!
//! Two ways to use it, both around any byte-stream service and composable with
//! `tower::ServiceBuilder`:
//!
//! - **Filter**: [`SniffLayer::new(allowed)`](SniffLayer::new) passes the
//!   [`Protocols`] in `allowed` to the inner service and rejects the rest with
//!   [`SniffError::NotAllowed`], labelled by the detected protocol.
//! - **Router**: [`SniffRouter`] sends each protocol to its own service (MQTT to the
//!   MQTT stack, HTTP to [`Http1`]) and rejects unrouted protocols the same way.
//!
//! [`Http1`] serves the HTTP side with hyper, bounded (header count, header bytes,
//! header read timeout); [`Http1::bad_request`] and [`Http1::upgrade_required`] are
//! ready-made refusers for ports where HTTP only exists to be told no.
//!
//! # Metrics
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_sniff_total` | counter | `protocol`: `mqtt`, `http1`, `http2`, `tls`, `proxy`, `unknown`, `timeout` | detections, allowed or not |
//! | `aegis_rejections_total` | counter | `layer="sniff"`, `reason`: a protocol label, `eof`, `io` | connections refused by the filter or the router, or lost before a decision |
//! | `aegis_rejections_total` | counter | `layer="http"`, `reason`: `header_timeout`, `too_large`, `parse` | HTTP requests refused by [`Http1`] |
//!
//! # Example
//!
//! A filter that lets only MQTT through:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! use std::time::Duration;
//! use aegis_core::{Conn, Param, error::label_of};
//! use aegis_layers::sniff::{Protocol, Protocols, SniffLayer, Sniffed};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! let svc = ServiceBuilder::new()
//!     .layer(SniffLayer::new(Protocols::MQTT).timeout(Duration::from_secs(3)))
//!     .service(service_fn(|mut io: Sniffed<Conn<DuplexStream>>| async move {
//!         assert_eq!(Param::<Protocol>::param(&io), Protocol::Mqtt);
//!         let mut first = [0u8; 1];
//!         io.read_exact(&mut first).await?; // the sniffed bytes are replayed
//!         assert_eq!(first[0], 0x10);
//!         Ok::<_, std::io::Error>(())
//!     }));
//! let addr = "127.0.0.1:1".parse()?;
//!
//! let (mut client, server) = tokio::io::duplex(64);
//! client.write_all(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00").await?;
//! svc.clone().oneshot(Conn::new(server, addr, addr)).await?;
//!
//! let (mut client, server) = tokio::io::duplex(64);
//! client.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
//! let err = svc.oneshot(Conn::new(server, addr, addr)).await.unwrap_err();
//! assert_eq!(label_of(&*err), ("sniff", "http1"));
//! # Ok(())
//! # }
//! ```
//!
//! A router: MQTT to a proxy, HTTP to a health page, everything else refused.
//!
//! ```no_run
//! use std::convert::Infallible;
//! use aegis_core::{proxy::Proxy, serve};
//! use aegis_layers::sniff::{Http1, Protocols, SniffRouter};
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper::{Request, Response, body::Incoming, service::service_fn};
//!
//! # async fn run() -> std::io::Result<()> {
//! let health = Http1::new(service_fn(|_req: Request<Incoming>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
//! }));
//! let router = SniffRouter::new()
//!     .route(Protocols::MQTT, Proxy::new("127.0.0.1:1884".parse().unwrap()))
//!     .route(Protocols::HTTP1, health);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:1883").await?;
//! serve(listener, router).await;
//! # Ok(())
//! # }
//! ```

mod classify;
pub mod error;
pub mod future;
mod http;
mod io;
mod layer;
mod router;
mod service;

use std::time::Duration;

pub use self::classify::{
    Classification, Detection, MAX_DECISION_LEN, Protocol, Protocols, classify,
};
pub use self::error::SniffError;
pub use self::http::{CompleteOnRequest, Http1, HttpError, HttpFuture, Refuse};
pub use self::io::Sniffed;
pub use self::layer::SniffLayer;
pub use self::router::{RouteFuture, Routes, SniffRouter};
pub use self::service::Sniff;

/// The fuzz target's entry point (`cargo fuzz`, built with `--cfg fuzzing`): classifies
/// `data` and checks the classifier's invariants (total, decided at
/// [`MAX_DECISION_LEN`] bytes, a decision never changes as bytes arrive), then reads it
/// as a connection's first bytes with the layer's prefix reader
/// ([`future::Detect`], over chunked reads: its cap, its decision, the replay).
#[cfg(fuzzing)]
pub mod fuzz_logic {
    /// Runs one fuzz input; panics if an invariant breaks.
    pub fn fuzz_entry(data: &[u8]) {
        super::classify::check_invariants(data);
        super::future::check_detect(data);
    }
}

/// The layer name in `aegis_rejections_total{layer}`.
pub const LAYER: &str = "sniff";

/// `aegis_sniff_total{protocol}`: detections by protocol.
pub const SNIFF_TOTAL: &str = "aegis_sniff_total";

/// The [`SNIFF_TOTAL`] counter of each protocol, in [`Protocol::ALL`]'s order (the
/// declaration order, as `Protocols`' bits), registered once per [`Sniff`] service (a
/// metrics macro call looks its key up in the recorder every time, and the Prometheus
/// recorder allocates a new handle).
#[derive(Debug)]
pub(crate) struct Detections([metrics::Counter; Protocol::ALL.len()]);

impl Detections {
    fn register() -> Self {
        Self(Protocol::ALL.map(|p| metrics::counter!(SNIFF_TOTAL, "protocol" => p.label())))
    }

    /// Counts one detection in [`SNIFF_TOTAL`].
    fn count(&self, protocol: Protocol) {
        self.0[protocol as usize].increment(1);
    }
}

/// Counts one detection with the handles of `detections`, registering them first if
/// this is its first use.
fn count_detection(detections: &aegis_core::metrics::Handles<Detections>, protocol: Protocol) {
    detections
        .get_or_register(Detections::register)
        .count(protocol);
}

/// The default detection timeout: 5 s. MQTT and HTTP clients send their first bytes at
/// once; a client silent this long is detected as [`Protocol::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The default prefix cap: 1024 bytes, as linkerd's detection buffer. One read of this
/// size takes a whole small request line or CONNECT; every decision needs at most
/// [`MAX_DECISION_LEN`] (24) bytes.
pub const DEFAULT_MAX_PREFIX: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use aegis_core::metrics::testing::{capture, run};

    /// Each protocol is counted under its own `label()`.
    #[test]
    fn each_detection_is_counted_under_its_protocol_label() {
        let ((), snap) = run(false, || async {
            let detections = aegis_core::metrics::Handles::new();
            for protocol in Protocol::ALL {
                count_detection(&detections, protocol);
            }
        });
        let got = capture(&snap);
        for protocol in Protocol::ALL {
            let labels = [("protocol", protocol.label())];
            assert_eq!(got.counter(SNIFF_TOTAL, &labels), 1, "{protocol:?}");
        }
    }
}
