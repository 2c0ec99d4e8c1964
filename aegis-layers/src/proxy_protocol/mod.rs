//! PROXY protocol v1/v2: the real client address behind a load balancer, believed only
//! from trusted proxies.
//!
//! A TCP load balancer (`HAProxy`, AWS NLB, a Kubernetes ingress) hides the client: the
//! server sees the balancer's address. With the [PROXY protocol] the balancer starts
//! each connection with a short header that carries the original source and
//! destination. This layer reads that header, consumes it, and hands the inner service
//! a [`ProxiedIo`] whose [`ClientAddr`](aegis_core::ClientAddr) is the original client,
//! so that rate limits, bans and logs outside *and* inside apply to the real client.
//! The bytes after the header reach the inner service byte for byte.
//!
//! [PROXY protocol]: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
//!
//! # Trust model
//!
//! A PROXY header is a claim written by whoever opened the connection. Believing it
//! from anyone would let every client pick its own address (and dodge per-client
//! limits or frame another client). So the header is only ever read from peers inside
//! the configured trusted networks ([`ProxyProtocolLayer::new`]), matched against the
//! socket's [`PeerAddr`](aegis_core::PeerAddr) with IPv4-mapped IPv6 folded to IPv4.
//! Any other peer is passed on at once, before a byte is read: it is its own client,
//! and whatever keys on the client address inside this layer (bans, rate limits,
//! per-client connection caps) applies to it from the start, not after a wait for
//! bytes that may never come:
//!
//! | peer | first bytes | result |
//! |---|---|---|
//! | trusted | a valid header | accepted; client = header source (`LOCAL`/`UNKNOWN`: the peer) |
//! | trusted | no header | rejected `missing` ([`HeaderMode::Required`], the default) or passed on, client = peer ([`HeaderMode::Optional`], which lets such a peer's clients send a header of their own: read its warning) |
//! | trusted | silence past the deadline, or EOF before any byte | rejected `timeout` or `eof` ([`HeaderMode::Required`]) or passed on, client = peer ([`HeaderMode::Optional`]) |
//! | trusted | a bad, long, slow or cut-off header (a strict prefix of a signature included) | rejected `invalid`, `too_long`, `timeout` or `eof`, in either mode |
//! | untrusted | anything, a PROXY header included, or nothing yet | passed on at once, unread: client = peer, every byte the inner service's |
//!
//! A PROXY header from an untrusted peer is thus neither believed nor refused here: it
//! reaches the inner service as the first bytes of the connection, where a protocol
//! layer refuses it as it refuses any other bytes that are not its protocol (the
//! sniff layer, `aegis_layers::sniff`, classifies it as `proxy`; an MQTT or HTTP parser sees
//! a malformed first packet or request). An inner service that forwards bytes unread
//! (a plain TCP proxy) forwards it too: a server behind it must not believe PROXY
//! headers from this host unless this host writes one of its own first.
//!
//! `LOCAL` commands (v2) and `UNKNOWN` lines (v1), which balancers send for their own
//! health checks, are accepted and keep the peer as the client; so are v2 headers of
//! the `UNSPEC` and `UNIX` families, which carry no IP address. A source written as an
//! IPv4-mapped IPv6 address is folded to IPv4.
//!
//! The layer reads the first bytes of every trusted peer's connection, so it suits
//! protocols where the client speaks first (MQTT, HTTP, TLS). Put it outermost, right inside the accept loop:
//! before anything that keys on the client address, and before the slowloris layer
//! (`aegis_layers::slowloris`), so that the layers between the two see that layer's cuts
//! with the real client's address. The header is then read under this layer's own
//! deadline (see [Limits](#limits)), not under the slowloris clocks, which start once
//! it is read; the slowloris module docs say what each order of the two costs.
//!
//! # Limits
//!
//! - **Deadline**: a trusted peer has 3 s ([`timeout`](ProxyProtocolLayer::timeout)) to
//!   deliver its header, counted from the first read that has to wait. A trusted peer
//!   that has sent nothing in [`HeaderMode::Optional`] is not cut off: at the deadline
//!   it is passed on. An untrusted peer is never waited on (see [Trust
//!   model](#trust-model)); use the slowloris layer for client deadlines.
//! - **Length**: a v1 header is at most 107 bytes (the specification's maximum); a v2
//!   header at most 512 bytes in total ([`max_header_len`](ProxyProtocolLayer::max_header_len)),
//!   checked from its 16-byte fixed part before the rest is read. The read buffer
//!   starts at 128 bytes and never grows beyond the cap.
//! - **Strictness**: a v2 `PROXY` header must have well-formed TLVs; they are exposed
//!   through [`ProxyHeader::tlvs`] and [`ProxyHeader::tlv`].
//!
//! # Rejections and metrics
//!
//! Rejections are counted in `aegis_rejections_total{layer="proxy_protocol", reason}`:
//!
//! | reason | meaning |
//! |---|---|
//! | `missing` | a trusted peer sent no header ([`HeaderMode::Required`]) |
//! | `timeout` | a trusted peer's header was not complete within the deadline (in [`HeaderMode::Optional`], only once it has started) |
//! | `too_long` | the header is longer than the cap |
//! | `invalid` | the header is malformed |
//! | `eof` | a trusted peer closed before a complete header (plain TCP health checks land here, in [`HeaderMode::Required`]) |
//! | `io` | reading the header failed |
//!
//! Accepted connections are counted in `aegis_proxy_protocol_connections_total{outcome}`
//! ([`CONNECTIONS_TOTAL`]): `proxied_v1` and `proxied_v2` (client address replaced),
//! `local` (a header without a client address: `LOCAL`, `UNKNOWN`, `UNSPEC`, `UNIX`),
//! `passthrough` (no header: every untrusted peer, and a trusted one without a header
//! in [`HeaderMode::Optional`]).
//!
//! # Example
//!
//! ```
//! use aegis_core::{ClientAddr, Conn, Param};
//! use aegis_layers::proxy_protocol::{ProxiedIo, ProxyProtocolLayer};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! // Trust the load balancer, and nobody else.
//! let layer = ProxyProtocolLayer::new(["10.1.2.3/32".parse()?]);
//! let svc = layer.layer(service_fn(|mut io: ProxiedIo<Conn<DuplexStream>>| async move {
//!     let client = Param::<ClientAddr>::param(&io);
//!     let mut data = String::new();
//!     io.read_to_string(&mut data).await?;
//!     Ok::<_, std::io::Error>((client, data))
//! }));
//!
//! // A connection from the balancer at 10.1.2.3, carrying a v1 header, then data.
//! let (mut lb, server) = tokio::io::duplex(256);
//! lb.write_all(b"PROXY TCP4 203.0.113.7 10.1.2.3 51000 1883\r\nhello").await?;
//! drop(lb);
//! let conn = Conn::new(server, "10.1.2.3:40000".parse()?, "10.1.2.4:1883".parse()?);
//! let (client, data) = svc.oneshot(conn).await?;
//! assert_eq!(client.to_string(), "203.0.113.7:51000");
//! assert_eq!(data, "hello");
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

pub mod error;
pub mod future;
mod header;
mod io;
mod layer;
mod service;

pub use self::error::ProxyProtocolError;
pub use self::header::{ProxyHeader, Tlvs};
pub use self::io::ProxiedIo;
pub use self::layer::{HeaderMode, ProxyProtocolLayer};
pub use self::service::ProxyProtocol;

/// The layer name in `aegis_rejections_total{layer}`.
pub const LAYER: &str = "proxy_protocol";

/// `aegis_proxy_protocol_connections_total{outcome}`: accepted connections by outcome.
pub const CONNECTIONS_TOTAL: &str = "aegis_proxy_protocol_connections_total";

/// The default deadline for a trusted peer's header: a balancer writes it at once, in
/// the first segment, so seconds are generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// The default cap on a v2 header, fixed part included: room for IPv6 addresses (36
/// bytes) and the TLVs balancers send (AWS NLB's VPC endpoint id, GCP's PSC ids, an
/// authority), with a margin.
pub const DEFAULT_MAX_HEADER_LEN: usize = 512;

fn count(header: Option<&ProxyHeader>) {
    let outcome = match header {
        None => "passthrough",
        Some(h) if h.source().is_none() => "local",
        Some(h) if h.version() == 1 => "proxied_v1",
        Some(_) => "proxied_v2",
    };
    metrics::counter!(CONNECTIONS_TOTAL, "outcome" => outcome).increment(1);
}

/// The entry point of the `proxy_protocol` fuzz target: the pure header parser, and the
/// layer's header reader over the same bytes.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz_logic {
    /// Parses `data` under a few caps, reads it as a connection's first bytes, and
    /// panics if an invariant breaks.
    pub fn fuzz_entry(data: &[u8]) {
        super::check_invariants(data);
        super::check_read_header(data);
    }
}

/// The caps the invariants are checked under: none, the v1 limit, the default, no cap.
#[cfg(any(test, fuzzing))]
const FUZZ_CAPS: [usize; 4] = [0, 107, DEFAULT_MAX_HEADER_LEN, usize::MAX];

/// Checks the header parser's invariants on one input and panics if one breaks: the
/// fuzz target's logic, also run over the seed corpus by the unit tests.
///
/// - it never panics, whatever the input and the cap;
/// - a parsed header lies within the input and within its cap, and parsing exactly its
///   bytes gives the same header;
/// - a decision (a header or an error), once reached on a prefix, never changes as more
///   bytes arrive, and a strict prefix of a parsed header is never refused.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_invariants(data: &[u8]) {
    /// Checks every prefix only for inputs this short (quadratic work).
    const PREFIX_LIMIT: usize = 2048;
    for max in FUZZ_CAPS {
        let whole = ProxyHeader::parse(data, max);
        if let Ok(Some((header, len))) = &whole {
            assert!(
                *len <= data.len(),
                "header of {len} bytes in {}",
                data.len()
            );
            let cap = if data.starts_with(header::V1_SIGNATURE) {
                header::V1_MAX_LEN
            } else {
                max
            };
            assert!(*len <= cap, "header of {len} bytes over the cap {cap}");
            match ProxyHeader::parse(&data[..*len], max) {
                Ok(Some((again, n))) => assert!(again == *header && n == *len),
                other => panic!("the header's own bytes parse as {other:?}"),
            }
        }
        if data.len() > PREFIX_LIMIT {
            continue;
        }
        let decided =
            |r: &Result<Option<(ProxyHeader, usize)>, ProxyProtocolError>| !matches!(r, Ok(None));
        if let Some(at) = (0..=data.len()).find(|&n| decided(&ProxyHeader::parse(&data[..n], max)))
        {
            let first = ProxyHeader::parse(&data[..at], max);
            match (&first, &whole) {
                (Ok(Some(a)), Ok(Some(b))) => assert!(a == b, "header changed: {a:?} then {b:?}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "error changed"),
                (a, b) => panic!(
                    "decision changed: {a:?} at {at} bytes, {b:?} at {}",
                    data.len()
                ),
            }
        }
    }
}

/// What [`future::ReadHeader`] must make of a connection that sends `data` and closes,
/// by the pure parser's decision on all of it (a decision never changes as bytes arrive,
/// [`check_invariants`]): the header and its length, `None` to pass the connection on
/// untouched, or the error.
#[cfg(any(test, fuzzing))]
fn expected_read(
    data: &[u8],
    peer: std::net::IpAddr,
    trusted: bool,
    mode: HeaderMode,
    max_len: usize,
) -> Result<Option<(ProxyHeader, usize)>, ProxyProtocolError> {
    use self::header::{Parse, Refused};
    if !trusted {
        // Passed on unread, whatever it sends.
        return Ok(None);
    }
    match header::parse(data, max_len) {
        Parse::Header(_) => ProxyHeader::parse(data, max_len),
        Parse::NotProxy => match mode {
            HeaderMode::Optional => Ok(None),
            HeaderMode::Required => Err(ProxyProtocolError::Missing(peer)),
        },
        Parse::Refused(Refused::TooLong) => Err(ProxyProtocolError::TooLong(
            if data.starts_with(header::V1_SIGNATURE) {
                header::V1_MAX_LEN
            } else {
                max_len
            },
        )),
        Parse::Refused(Refused::Invalid(why)) => Err(ProxyProtocolError::Invalid(why)),
        Parse::Incomplete { .. } if data.is_empty() && mode == HeaderMode::Optional => Ok(None),
        Parse::Incomplete { .. } => Err(ProxyProtocolError::Eof(data.len())),
    }
}

/// Drives the layer's header reader ([`future::ReadHeader`]) over `data` as a
/// connection's bytes, in chunks of several schedules (whole, byte by byte, sizes taken
/// from the input), from a trusted peer (header required or optional, under the
/// smallest, the default and the largest cap) and an untrusted one, and panics if an
/// invariant breaks: the fuzz target's logic, also run over the seed corpus by the unit
/// tests.
///
/// - it decides within the bytes there are, without waiting (the stream never does);
/// - its buffer never exceeds the cap, and it never reads into a full one (that read
///   would look like EOF);
/// - its decision is the pure parser's on all of `data` ([`expected_read`]);
/// - the bytes after the header (all of them with no header) are replayed exactly by
///   the [`ProxiedIo`] the inner service gets.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_read_header(data: &[u8]) {
    use self::header::{V1_MAX_LEN, V2_MAX_LEN};

    let peer: std::net::IpAddr = [10, 0, 0, 1].into();
    let network: ipnet::IpNet = "10.0.0.0/8".parse().expect("a network");
    let mut configs = Vec::new();
    for max_header_len in [V1_MAX_LEN, DEFAULT_MAX_HEADER_LEN, V2_MAX_LEN] {
        for mode in [HeaderMode::Required, HeaderMode::Optional] {
            configs.push(layer::Config {
                trusted: [network].into(),
                mode,
                timeout: DEFAULT_TIMEOUT,
                max_header_len,
            });
        }
    }
    configs.push(layer::Config {
        trusted: [].into(),
        mode: HeaderMode::Required,
        timeout: DEFAULT_TIMEOUT,
        max_header_len: DEFAULT_MAX_HEADER_LEN,
    });
    for config in &configs {
        let trusted = config.trusts(peer);
        let expected = expected_read(data, peer, trusted, config.mode, config.max_header_len);
        let setup = || {
            format!(
                "trusted {trusted}, {:?}, cap {}",
                config.mode, config.max_header_len
            )
        };
        crate::chunked::drive(data, config.max_header_len, setup, |io, run| {
            let got = run.poll(future::ReadHeader::new(io, peer, config));
            match (got, &expected) {
                (Ok((header, rest, io)), Ok(want)) => {
                    let skip = match (&header, want) {
                        (None, None) => 0,
                        (Some(h), Some((w, len))) if h == w => *len,
                        (h, w) => panic!("read {h:?}, the parser says {w:?} ({})", run.what()),
                    };
                    run.replays(ProxiedIo::new(header, rest, io), &data[skip..]);
                }
                (Err(e), Err(want)) => {
                    assert_eq!(e.to_string(), want.to_string(), "({})", run.what());
                }
                (got, want) => panic!(
                    "read {:?}, the parser says {want:?} ({})",
                    got.map(|(h, rest, _)| (h, rest)),
                    run.what()
                ),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz target's seed corpus, replayed so that CI (stable, no fuzzer) covers it.
    #[test]
    fn fuzz_seed_corpus_keeps_the_invariants() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/proxy_protocol");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/proxy_protocol") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            super::check_invariants(&data);
            super::check_read_header(&data);
            seeds += 1;
        }
        assert!(seeds >= 10, "only {seeds} seeds in {}", dir.display());
    }

    /// The invariants hold on every prefix and every one-byte corruption of each seed: a
    /// stable stand-in for a short fuzzing run.
    #[test]
    fn invariants_hold_on_mutated_seeds() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/proxy_protocol");
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/proxy_protocol") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            for i in 0..data.len().min(64) {
                for flip in [0x01, 0x20, 0x80, 0xFF] {
                    let mut m = data.clone();
                    m[i] ^= flip;
                    super::check_invariants(&m);
                    super::check_read_header(&m);
                }
            }
        }
    }
}
