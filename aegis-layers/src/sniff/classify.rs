//! The pure classifier: a decision over the bytes read so far.

/// The protocol a connection speaks, as far as its first bytes tell.
///
/// Stable labels (metrics, errors) come from [`Protocol::label`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// An MQTT CONNECT packet (any level; see [`Detection::mqtt_level`]).
    Mqtt,
    /// An HTTP/1.x request line (a known method token followed by a space).
    Http1,
    /// The HTTP/2 prior-knowledge connection preface.
    Http2,
    /// A TLS record carrying a `ClientHello`.
    Tls,
    /// A PROXY protocol header, version 1 (text) or 2 (binary).
    ProxyProtocol,
    /// Bytes that match none of the above.
    Unknown,
    /// The client sent too little before the detection timeout.
    Timeout,
}

impl Protocol {
    /// Every protocol, in label order of the metrics table.
    pub const ALL: [Protocol; 7] = [
        Protocol::Mqtt,
        Protocol::Http1,
        Protocol::Http2,
        Protocol::Tls,
        Protocol::ProxyProtocol,
        Protocol::Unknown,
        Protocol::Timeout,
    ];

    /// A stable, low-cardinality label: `mqtt`, `http1`, `http2`, `tls`, `proxy`,
    /// `unknown` or `timeout`.
    pub const fn label(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls => "tls",
            Protocol::ProxyProtocol => "proxy",
            Protocol::Unknown => "unknown",
            Protocol::Timeout => "timeout",
        }
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A set of [`Protocol`]s: what a filter allows, or what one route serves.
///
/// Build it with the constants and `|`: `Protocols::MQTT | Protocols::HTTP1`.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Default)]
pub struct Protocols(u8);

impl std::fmt::Debug for Protocols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries(
                Protocol::ALL
                    .iter()
                    .filter(|p| self.contains(**p))
                    .map(|p| p.label()),
            )
            .finish()
    }
}

impl Protocols {
    /// No protocol.
    pub const NONE: Protocols = Protocols(0);
    /// [`Protocol::Mqtt`].
    pub const MQTT: Protocols = Protocols::one(Protocol::Mqtt);
    /// [`Protocol::Http1`].
    pub const HTTP1: Protocols = Protocols::one(Protocol::Http1);
    /// [`Protocol::Http2`].
    pub const HTTP2: Protocols = Protocols::one(Protocol::Http2);
    /// [`Protocol::Tls`].
    pub const TLS: Protocols = Protocols::one(Protocol::Tls);
    /// [`Protocol::ProxyProtocol`].
    pub const PROXY_PROTOCOL: Protocols = Protocols::one(Protocol::ProxyProtocol);
    /// [`Protocol::Unknown`].
    pub const UNKNOWN: Protocols = Protocols::one(Protocol::Unknown);
    /// [`Protocol::Timeout`].
    pub const TIMEOUT: Protocols = Protocols::one(Protocol::Timeout);
    /// Both HTTP versions.
    pub const HTTP: Protocols = Protocols(Self::HTTP1.0 | Self::HTTP2.0);

    /// The set holding only `p`.
    pub const fn one(p: Protocol) -> Protocols {
        Protocols(p.bit())
    }

    /// The union of two sets.
    #[must_use]
    pub const fn union(self, other: Protocols) -> Protocols {
        Protocols(self.0 | other.0)
    }

    /// Whether `p` is in the set.
    pub const fn contains(self, p: Protocol) -> bool {
        self.0 & p.bit() != 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl From<Protocol> for Protocols {
    fn from(p: Protocol) -> Self {
        Protocols::one(p)
    }
}

impl std::ops::BitOr for Protocols {
    type Output = Protocols;
    fn bitor(self, rhs: Protocols) -> Protocols {
        self.union(rhs)
    }
}

/// A decided detection: the protocol, plus the MQTT protocol level when it is MQTT.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Detection {
    protocol: Protocol,
    mqtt_level: Option<u8>,
}

impl Detection {
    /// A detection of `protocol` with no further detail.
    pub const fn new(protocol: Protocol) -> Self {
        Self {
            protocol,
            mqtt_level: None,
        }
    }

    /// An MQTT detection with its protocol level byte (3 for `MQIsdp`, 4 for 3.1.1, 5).
    pub const fn mqtt(level: u8) -> Self {
        Self {
            protocol: Protocol::Mqtt,
            mqtt_level: Some(level),
        }
    }

    /// The protocol.
    pub const fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The MQTT protocol level from the CONNECT variable header; `None` unless the
    /// protocol is [`Protocol::Mqtt`].
    pub const fn mqtt_level(&self) -> Option<u8> {
        self.mqtt_level
    }
}

/// The result of [`classify`]: a decision, or a request for more bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Classification {
    /// The bytes so far are a prefix of at least one known header: read more.
    NeedMore,
    /// The bytes decide the protocol.
    Decided(Detection),
}

/// The longest prefix [`classify`] ever needs to decide (24 bytes: the HTTP/2 preface).
/// Any buffer at least this long is always [`Classification::Decided`].
pub const MAX_DECISION_LEN: usize = H2_PREFACE.len();

/// The HTTP/2 prior-knowledge preface (RFC 9113 §3.4): 24 bytes.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The PROXY protocol v1 header start (`PROXY ` and the family): 6 bytes.
const PROXY_V1: &[u8] = b"PROXY ";
/// The PROXY protocol v2 signature: 12 bytes.
const PROXY_V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// HTTP/1 request methods (RFC 9110 §9 and PATCH), each with its trailing space: at
/// most 8 bytes (`OPTIONS `, `CONNECT `).
const HTTP1_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// An MQTT CONNECT fixed header's first byte: packet type 1, flags 0. 1 byte.
const MQTT_CONNECT: u8 = 0x10;
/// The MQTT remaining length is a varint of at most 4 bytes.
const MQTT_MAX_VARINT: usize = 4;
/// MQTT 3.1.1 and 5 protocol name: 4 bytes (preceded by its 2-byte length).
const MQTT_NAME: &[u8] = b"MQTT";
/// MQTT 3.1 protocol name: 6 bytes (preceded by its 2-byte length).
const MQISDP_NAME: &[u8] = b"MQIsdp";
/// The smallest CONNECT variable header after the name: level, flags and keep-alive,
/// 4 bytes.
const MQTT_AFTER_NAME: usize = 4;
/// A TLS handshake record: content type 22. 1 byte.
const TLS_HANDSHAKE: u8 = 0x16;
/// The record header is 5 bytes (type, 2-byte version, 2-byte length), then the
/// handshake type: `ClientHello` is 1. 6 bytes decide.
const TLS_DECISION_LEN: usize = 6;
/// Handshake type of a `ClientHello`.
const TLS_CLIENT_HELLO: u8 = 0x01;

/// Compares `buf` with a fixed header: `Some(true)` when `buf` starts with all of it,
/// `None` when `buf` is a shorter prefix of it, `Some(false)` on a mismatch.
fn prefix_match(buf: &[u8], pattern: &[u8]) -> Option<bool> {
    let n = buf.len().min(pattern.len());
    if buf[..n] != pattern[..n] {
        Some(false)
    } else if n < pattern.len() {
        None
    } else {
        Some(true)
    }
}

/// Classifies the first bytes of a connection.
///
/// A pure function, cheap (a few byte comparisons) and total: it never panics, whatever
/// the input. It returns [`Classification::NeedMore`] only while `buf` is a proper
/// prefix of a header it knows, so any buffer of [`MAX_DECISION_LEN`] bytes or more is
/// decided.
///
/// ```
/// use aegis_layers::sniff::{classify, Classification, Detection, Protocol};
///
/// assert_eq!(classify(b"GE"), Classification::NeedMore);
/// assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Classification::Decided(Detection::new(Protocol::Http1)));
/// assert_eq!(classify(b"\x10\x0c\x00\x04MQTT\x04"), Classification::Decided(Detection::mqtt(4)));
/// assert_eq!(classify(b"SSH-2.0"), Classification::Decided(Detection::new(Protocol::Unknown)));
/// ```
pub fn classify(buf: &[u8]) -> Classification {
    let Some(&first) = buf.first() else {
        return Classification::NeedMore;
    };
    let found = match first {
        MQTT_CONNECT => classify_mqtt(buf),
        TLS_HANDSHAKE => classify_tls(buf),
        _ => classify_fixed(buf),
    };
    found.unwrap_or(Classification::Decided(Detection::new(Protocol::Unknown)))
}

/// The fixed headers: all are prefix-free among themselves, so at most one matches.
fn classify_fixed(buf: &[u8]) -> Option<Classification> {
    let mut pending = false;
    let fixed = [
        (H2_PREFACE, Protocol::Http2),
        (PROXY_V1, Protocol::ProxyProtocol),
        (PROXY_V2, Protocol::ProxyProtocol),
    ];
    let methods = HTTP1_METHODS.iter().map(|&m| (m, Protocol::Http1));
    for (pattern, protocol) in fixed.into_iter().chain(methods) {
        match prefix_match(buf, pattern) {
            Some(true) => return Some(Classification::Decided(Detection::new(protocol))),
            None => pending = true,
            Some(false) => {}
        }
    }
    pending.then_some(Classification::NeedMore)
}

fn classify_tls(buf: &[u8]) -> Option<Classification> {
    // buf[0] is the handshake content type.
    if let Some(&major) = buf.get(1)
        && major != 0x03
    {
        return None;
    }
    if let Some(&minor) = buf.get(2)
        && minor > 0x04
    {
        return None;
    }
    match buf.get(TLS_DECISION_LEN - 1) {
        None => Some(Classification::NeedMore),
        Some(&TLS_CLIENT_HELLO) => Some(Classification::Decided(Detection::new(Protocol::Tls))),
        Some(_) => None,
    }
}

fn classify_mqtt(buf: &[u8]) -> Option<Classification> {
    // Remaining length: a little-endian base-128 varint of 1 to 4 bytes.
    let mut remaining: usize = 0;
    let mut pos = 1;
    loop {
        let Some(&b) = buf.get(pos) else {
            return Some(Classification::NeedMore);
        };
        remaining |= usize::from(b & 0x7f) << (7 * (pos - 1));
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        if pos > MQTT_MAX_VARINT {
            return None; // a fifth length byte: malformed
        }
    }
    // Protocol name length (2 bytes, big-endian).
    let (Some(&hi), Some(&lo)) = (buf.get(pos), buf.get(pos + 1)) else {
        return Some(Classification::NeedMore);
    };
    let name = match u16::from_be_bytes([hi, lo]) {
        4 => MQTT_NAME,
        6 => MQISDP_NAME,
        _ => return None,
    };
    if remaining < 2 + name.len() + MQTT_AFTER_NAME {
        return None; // too short to hold a CONNECT variable header
    }
    pos += 2;
    match prefix_match(&buf[pos..], name) {
        Some(true) => {}
        None => return Some(Classification::NeedMore),
        Some(false) => return None,
    }
    pos += name.len();
    match buf.get(pos) {
        None => Some(Classification::NeedMore),
        Some(&level) => Some(Classification::Decided(Detection::mqtt(level))),
    }
}

/// Checks the classifier's invariants on one input and panics if one breaks: the
/// fuzz target's logic, also run over random inputs by the unit tests.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_invariants(data: &[u8]) {
    let whole = classify(data);
    if data.len() >= MAX_DECISION_LEN {
        assert_ne!(
            whole,
            Classification::NeedMore,
            "undecided at {} bytes",
            data.len()
        );
    }
    // A decision, once reached, never changes as more bytes arrive.
    if let Some(at) = (0..=data.len()).find(|&n| classify(&data[..n]) != Classification::NeedMore) {
        for n in at..=data.len() {
            assert_eq!(classify(&data[..n]), whole, "decision changed at {n} bytes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz target's seed corpus, replayed so that CI (stable, no fuzzer) covers it.
    #[test]
    fn fuzz_seed_corpus_keeps_the_invariants() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/sniff");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/sniff") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            check_invariants(&data);
            crate::sniff::future::check_detect(&data);
            seeds += 1;
        }
        assert!(seeds >= 10, "only {seeds} seeds in {}", dir.display());
    }

    fn decided(p: Protocol) -> Classification {
        Classification::Decided(Detection::new(p))
    }

    /// Every header the classifier knows, with its expected decision.
    fn samples() -> Vec<(&'static [u8], Classification)> {
        vec![
            (
                b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00".as_slice(),
                Classification::Decided(Detection::mqtt(4)),
            ),
            (
                b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00",
                Classification::Decided(Detection::mqtt(5)),
            ),
            (
                b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x3c",
                Classification::Decided(Detection::mqtt(3)),
            ),
            // Remaining length on 2 bytes (200).
            (
                b"\x10\xc8\x01\x00\x04MQTT\x04",
                Classification::Decided(Detection::mqtt(4)),
            ),
            (b"GET /healthz HTTP/1.1\r\n", decided(Protocol::Http1)),
            (b"POST / HTTP/1.1\r\n", decided(Protocol::Http1)),
            (b"HEAD / HTTP/1.0\r\n", decided(Protocol::Http1)),
            (b"PUT /x HTTP/1.1\r\n", decided(Protocol::Http1)),
            (b"DELETE /x HTTP/1.1\r\n", decided(Protocol::Http1)),
            (b"OPTIONS * HTTP/1.1\r\n", decided(Protocol::Http1)),
            (b"PATCH /x HTTP/1.1\r\n", decided(Protocol::Http1)),
            (b"CONNECT a:443 HTTP/1.1\r\n", decided(Protocol::Http1)),
            (b"TRACE / HTTP/1.1\r\n", decided(Protocol::Http1)),
            (H2_PREFACE, decided(Protocol::Http2)),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                decided(Protocol::Tls),
            ),
            (b"\x16\x03\x00\x00\x30\x01", decided(Protocol::Tls)),
            (
                b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
                decided(Protocol::ProxyProtocol),
            ),
            (
                b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c",
                decided(Protocol::ProxyProtocol),
            ),
        ]
    }

    #[test]
    fn every_known_header_is_decided_only_when_complete() {
        for (bytes, want) in samples() {
            assert_eq!(classify(bytes), want, "{bytes:?}");
            check_invariants(bytes);
            // The decision is reached at some length and never changes after it.
            let at = (1..=bytes.len())
                .find(|&n| classify(&bytes[..n]) != Classification::NeedMore)
                .unwrap();
            for n in at..=bytes.len() {
                assert_eq!(classify(&bytes[..n]), want, "{bytes:?} at {n}");
            }
            for n in 0..at {
                assert_eq!(
                    classify(&bytes[..n]),
                    Classification::NeedMore,
                    "{bytes:?} at {n}"
                );
            }
            assert!(at <= MAX_DECISION_LEN);
        }
    }

    #[test]
    fn garbage_and_near_misses_are_unknown() {
        for bytes in [
            b"SSH-2.0-OpenSSH\r\n".as_slice(),
            b"GETX / HTTP/1.1",
            b"get / HTTP/1.1",
            b"PRI * HTTP/1.1\r\n",
            b"PROXY2",
            b"\x16\x02\x01\x00\x10\x01",
            b"\x16\x03\x05\x00\x10\x01",
            b"\x16\x03\x03\x00\x10\x02", // ServerHello
            b"\x17\x03\x03\x00\x10",
            b"\x10\x0c\x00\x05MQTTT\x04",
            b"\x10\x0c\x00\x04MQTX\x04",
            b"\x10\x02\x00\x04MQTT\x04", // remaining length too short for a CONNECT
            b"\x10\xff\xff\xff\xff\x01", // five-byte varint
            b"\x20\x02\x00\x00",         // CONNACK
            b"\x11\x0c\x00\x04MQTT\x04", // CONNECT with reserved flags set
            b"\x00",
            b"\r\n\r\n\0\r\nQUIX",
        ] {
            assert_eq!(classify(bytes), decided(Protocol::Unknown), "{bytes:?}");
        }
    }

    #[test]
    fn never_panics_and_decides_at_the_cap_all_short_and_random_inputs() {
        for a in 0..=255u8 {
            check_invariants(&[a]);
            for b in 0..=255u8 {
                check_invariants(&[a, b]);
            }
        }
        // A tiny xorshift: deterministic, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = [0u8; 64];
        for i in 0..20_000 {
            let len = usize::try_from(next() % 64).unwrap();
            for byte in &mut buf[..len] {
                *byte = next().to_le_bytes()[0];
            }
            // Bias towards interesting first bytes so the structured parsers are hit.
            if len > 0 {
                buf[0] = [0x10, 0x16, b'P', b'\r', b'G', buf[0]][i % 6];
            }
            check_invariants(&buf[..len]);
            crate::sniff::future::check_detect(&buf[..len]);
        }
    }

    #[test]
    fn protocol_sets() {
        let set = Protocols::MQTT | Protocols::HTTP;
        assert!(set.contains(Protocol::Mqtt) && set.contains(Protocol::Http2));
        assert!(!set.contains(Protocol::Tls) && !set.contains(Protocol::Timeout));
        assert!(Protocols::NONE.is_empty());
        assert_eq!(format!("{set:?}"), r#"{"mqtt", "http1", "http2"}"#);
        let labels: Vec<_> = Protocol::ALL.iter().map(|p| p.label()).collect();
        assert_eq!(
            labels,
            [
                "mqtt", "http1", "http2", "tls", "proxy", "unknown", "timeout"
            ]
        );
    }
}
