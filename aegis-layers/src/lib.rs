//! Connection-hardening layers for Aegis byte-stream services.
//!
//! Each layer is its own module and Cargo feature, works alone around any byte-stream
//! service (a `tower::Service<I>` whose request is a connection implementing the
//! [`aegis_core::ConnParams`] params), and composes with `tower::ServiceBuilder`.
//!
//! | module | feature | what it stops |
//! |---|---|---|
//! | `rate_limit` | `rate-limit` | connection floods: global and per-client rates, concurrent connections per client |
//! | `slowloris` | `slowloris` | slow clients: first-byte, idle, total-handshake and minimum-rate deadlines |
//! | `sniff` | `sniff` | the wrong protocol on a port: classify the first bytes, filter or route |
//! | `proxy_protocol` | `proxy-protocol` | spoofed client addresses: PROXY v1/v2 headers only from trusted networks |
//! | `circuit_breaker` | `circuit-breaker` | piling onto a failing upstream: fail fast while it recovers (any tower `Service`) |
//! | `adaptive` | `adaptive` | overload: lowers the admitted rate when P95 latency rises (any tower `Service`) |
//!
//! The `full` feature (default) enables all of them.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "adaptive")]
#[cfg_attr(docsrs, doc(cfg(feature = "adaptive")))]
pub mod adaptive;
#[cfg(feature = "circuit-breaker")]
#[cfg_attr(docsrs, doc(cfg(feature = "circuit-breaker")))]
pub mod circuit_breaker;
#[cfg(feature = "proxy-protocol")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
pub mod proxy_protocol;
#[cfg(feature = "rate-limit")]
#[cfg_attr(docsrs, doc(cfg(feature = "rate-limit")))]
pub mod rate_limit;
#[cfg(feature = "slowloris")]
#[cfg_attr(docsrs, doc(cfg(feature = "slowloris")))]
pub mod slowloris;
#[cfg(feature = "sniff")]
#[cfg_attr(docsrs, doc(cfg(feature = "sniff")))]
pub mod sniff;
// The chunked in-memory stream of the sniff and PROXY protocol fuzz logic.
#[cfg(all(any(test, fuzzing), any(feature = "sniff", feature = "proxy-protocol")))]
mod chunked;
#[cfg(any(
    feature = "adaptive",
    feature = "circuit-breaker",
    feature = "rate-limit",
    feature = "sniff"
))]
mod time;
