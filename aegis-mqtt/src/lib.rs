//! Strict MQTT 3.1 / 3.1.1 / 5.0 framing and validation for Aegis.
//!
//! A gateway in front of a broker reads each client packet, checks it against the
//! specification and forwards the client's **original bytes**; nothing is re-encoded.
//! This crate is the pure-library half of that job:
//!
//! - [`Framer`] splits a byte stream into packets from the fixed header alone, with a size
//!   cap applied before anything is buffered;
//! - [`validate_connect`] and [`Session`] validate the CONNECT and every later
//!   client packet and return zero-copy views ([`Connect`], [`Packet`]);
//! - [`MqttError`] is a typed rejection (an [`aegis_core::error::Reject`] with layer
//!   `"mqtt"`) whose [`answer`](MqttError::answer) is the version-correct CONNACK or
//!   DISCONNECT, and [`encode`] holds the encoders for those answers and for SUBACK and
//!   PUBACK refusals.
//! - `layer` (feature `layer`, on by default) puts all of this in front of a broker as a
//!   tower layer, `MqttLayer`, with an optional per-connection packet rate.
//!
//! # Example
//!
//! ```
//! use aegis_mqtt::{Answer, Config, MqttError, Session};
//!
//! let mut session = Session::new(Config::new());
//! // An MQTT 3.1.1 CONNECT with an empty client id and clean session 0.
//! let connect = [0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60, 0, 0];
//! let err = session.next(&connect).unwrap_err();
//! assert_eq!(err, MqttError::ClientId("empty client identifier without clean session"));
//! // The answer is a 3.1.1 CONNACK "identifier rejected", then close.
//! assert_eq!(session.answer(&err), Answer::ConnackV3(0x02));
//! assert_eq!(session.answer(&err).bytes(), [0x20, 0x02, 0x00, 0x02]);
//! ```
//!
//! # Why not mqttbytes
//!
//! mqttbytes 0.6 is a fine codec for a client, but it is not a validator: it accepts
//! reserved fixed-header flags, the CONNECT reserved bit, a password without a user name,
//! bytes after the CONNECT payload, non-minimal Remaining Lengths, SUBSCRIBE with packet
//! identifier 0 or reserved option bits, PUBLISH topics with wildcards, U+0000 or no
//! characters, and DUP on `QoS` 0; it refuses MQTT 3.1, a zero-length v5 DISCONNECT, a
//! v5 DISCONNECT with a reason code and no Property Length (`e0 01 04`, which 5.0
//! §3.14.2.2.1 allows: the length is 0 when the Remaining Length is under 2), AUTH, and a
//! 3.1.1 or 5.0 CONNECT whose password is not UTF-8 (as `TopicNotUtf8`: the Password is
//! Binary Data); its UNSUBSCRIBE parser writes to stderr; and it copies every string into
//! a `String`. Each of these is proven by a test in `tests/mqttbytes_gaps.rs`. This crate
//! therefore frames and validates on its own over `&[u8]`, with no allocation, and uses
//! mqttbytes only as the baseline of the benchmarks and tests (it is re-exported, hidden,
//! for `benches/mqtt.rs`).
//!
//! # Answers
//!
//! | Rejection | 3.1 / 3.1.1 at CONNECT | 5.0 at CONNECT | 3.x later | 5.0 later |
//! |---|---|---|---|---|
//! | `malformed` | close, no CONNACK [MQTT-3.1.4-1] | CONNACK 0x81 | close | DISCONNECT 0x81 |
//! | `protocol_error` | close | CONNACK 0x82 | close | DISCONNECT 0x82 |
//! | `unsupported_version` | CONNACK 0x01 [MQTT-3.1.2-2] | a level-5 CONNECT refused by [`Config::versions`]: CONNACK `20 03 00 84 00`; an unknown level (not 5, nor one of 3.x): CONNACK `20 02 00 01`, the 3.1.1 answer [MQTT-3.1.2-2] | - | - |
//! | `unknown_protocol` | close [MQTT-3.1.2-1] | close | - | - |
//! | `client_id` | CONNACK 0x02 [MQTT-3.1.3-9] | CONNACK 0x85 | - | - |
//! | `packet_too_large` | close | close (refused from the fixed header, before the version is read) | close | DISCONNECT 0x95 |
//! | `keep_alive` | close [MQTT-3.2.2-6] | CONNACK 0x83 | - | - |
//! | `topic_name` | close | CONNACK 0x90 | close | DISCONNECT 0x90 |
//! | `topic_filter` | - | - | close | DISCONNECT 0x8F |
//! | `server_limit` | - | - | - | DISCONNECT 0x9B, 0x9A, 0x94, 0xA2, 0xA1 or 0x9E ([`Limit`]) |
//! | `not_authorized` | CONNACK 0x05 | CONNACK 0x87 | close | DISCONNECT 0x87 |
//! | `server_unavailable` | CONNACK 0x03 | CONNACK 0x88 | close | DISCONNECT 0x89 |
//! | `connack_timeout` (the broker's CONNACK late) | CONNACK 0x03 | CONNACK 0x88 | close | DISCONNECT 0x89 |
//! | `upstream_closed` (the broker closed the connection before any CONNACK) | CONNACK 0x03 | CONNACK 0x88 | close | DISCONNECT 0x89 |
//! | `auth_timeout` (an MQTT 5 AUTH exchange that ends in no CONNACK in time) | CONNACK 0x05 | CONNACK 0x87 | close | DISCONNECT 0x87 |
//! | `server_busy` | CONNACK 0x03 | CONNACK 0x89 | close | DISCONNECT 0x89 |
//! | `quota_exceeded` | CONNACK 0x03 | CONNACK 0x97 | close | DISCONNECT 0x97 |
//! | `connection_rate` | CONNACK 0x03 | CONNACK 0x9F | close | DISCONNECT 0x9F |
//! | `connect_rate` | CONNACK 0x05 (the per-packet policy's CONNECT brake) | CONNACK 0x9F | close | DISCONNECT 0x9F |
//! | `connect_overflow` (the CONNECT brake's shared overflow bucket, see `layer::Policy`) | CONNACK 0x05 | CONNACK 0x9F | close | DISCONNECT 0x9F |
//! | `message_rate` | close | CONNACK 0x89 | close | DISCONNECT 0x96 |
//! | `message_overflow` (a per-client-id tier's shared overflow bucket) | close | CONNACK 0x89 | close | DISCONNECT 0x96 |
//! | `keep_alive_timeout` | close | close | close | DISCONNECT 0x8D |
//! | `packet_timeout` (a packet begun and not finished in time) | close | close | close | DISCONNECT 0x8D |
//! | `connect_timeout` (no complete CONNECT in time) | close | close | - | - |
//!
//! Proven by `tests/answers.rs`.
//!
//! "Later" is after the broker's CONNACK. A client refused after its CONNECT but before
//! any CONNACK went out gets the "at CONNECT" answer of its version (for 5.0 a CONNACK
//! instead of a DISCONNECT, which may not come before a CONNACK [MQTT-3.14.0-1]); the
//! broker's CONNACK, and the gateway's answers queued for later packets, then never go
//! out. The packets a client sends after its CONNECT are read only once the broker's
//! CONNACK has accepted it, and never after a refusing one (3.1.1 [MQTT-3.1.4-5], 5.0
//! [MQTT-3.1.4-6]; an MQTT 5 client's AUTH excepted), so the gateway's own answers to
//! later packets (a SUBACK, PUBACK or PUBREC for a dropped packet) always follow an
//! accepting CONNACK, the server's first packet [MQTT-3.2.0-1], and nothing follows a
//! refusing one (3.1.1 [MQTT-3.2.2-5], 5.0 [MQTT-3.2.2-7]).
#![doc = include_str!("conformance.md")]
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "auth")]
#[cfg_attr(docsrs, doc(cfg(feature = "auth")))]
pub mod auth;
#[cfg(any(feature = "auth", feature = "security"))]
mod bounded;
mod connect;
pub mod encode;
mod error;
mod framer;
// The `mqtt_io` fuzz target: it pauses tokio's clock, which needs tokio's `test-util`,
// on only in tests (the dev-dependencies) and with the feature `fuzz-io` that the fuzz
// crate turns on (see its module docs). Not `cfg(fuzzing)`: cargo-fuzz sets that for
// every crate, including those that fuzz themselves on top of this one.
#[cfg(any(all(feature = "inspect", test), feature = "fuzz-io"))]
mod fuzz_io;
#[cfg(feature = "inspect")]
#[cfg_attr(docsrs, doc(cfg(feature = "inspect")))]
pub mod inspect;
#[cfg(feature = "layer")]
#[cfg_attr(docsrs, doc(cfg(feature = "layer")))]
pub mod layer;
mod packet;
mod properties;
mod reader;
#[cfg(feature = "security")]
#[cfg_attr(docsrs, doc(cfg(feature = "security")))]
pub mod security;
mod session;
pub mod topic;

pub use self::connect::{Connect, Will, connect_version, validate_connect};
pub use self::error::{Answer, Limit, MqttError, Phase};
pub use self::framer::{Decoded, Frame, Framer, MAX_REMAINING_LENGTH};
pub use self::packet::{Filters, Packet, Publish};
pub use self::session::{Next, Session};

/// The baseline of `benches/mqtt.rs`, which cannot name these crates itself.
#[doc(hidden)]
pub mod __baseline {
    pub use bytes;
    pub use mqttbytes;
}

/// The protocol version a CONNECT chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Version {
    /// MQTT 3.1 (`MQIsdp`, level 3).
    V3_1,
    /// MQTT 3.1.1 (`MQTT`, level 4).
    V3_1_1,
    /// MQTT 5.0 (`MQTT`, level 5).
    V5,
}

impl Version {
    /// The protocol level byte of the CONNECT: 3, 4 or 5.
    ///
    /// ```
    /// assert_eq!(aegis_mqtt::Version::V3_1_1.level(), 4);
    /// ```
    pub const fn level(self) -> u8 {
        match self {
            Self::V3_1 => 3,
            Self::V3_1_1 => 4,
            Self::V5 => 5,
        }
    }
}

/// Which characters a client identifier may hold.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum ClientIdChars {
    /// `0-9a-zA-Z` only, the set every server must accept ([MQTT-3.1.3-5]).
    Alphanumeric,
    /// Printable ASCII without space (0x21 to 0x7E): the default.
    AsciiGraphic,
    /// Any valid MQTT string (well-formed UTF-8 without U+0000, control characters or
    /// non-characters).
    Any,
    /// A custom predicate over each character, of a valid MQTT string: it cannot let
    /// through what the string rules refuse (U+0000, control characters, non-characters).
    Custom(fn(char) -> bool),
}

impl ClientIdChars {
    fn allows(self, id: &str) -> bool {
        match self {
            Self::Alphanumeric => id.bytes().all(|b| b.is_ascii_alphanumeric()),
            Self::AsciiGraphic => id.bytes().all(|b| b.is_ascii_graphic()),
            Self::Any => true,
            Self::Custom(f) => id.chars().all(f),
        }
    }
}

/// Validation limits: cheap, `Copy` configuration.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    max_connect_size: usize,
    max_packet_size: usize,
    max_keep_alive: Option<u16>,
    client_id_max_len: usize,
    client_id_chars: ClientIdChars,
    allow_empty_client_id: bool,
    /// The versions accepted, one bit each (see [`version_bit`]).
    versions: u8,
}

/// `version`'s bit in [`Config`]'s set of accepted versions.
const fn version_bit(version: Version) -> u8 {
    match version {
        Version::V3_1 => 1,
        Version::V3_1_1 => 2,
        Version::V5 => 4,
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    /// The defaults: packets up to 8 KiB before the CONNACK and 256 KiB after, any keep-alive,
    /// client identifiers of at most 128 bytes of printable ASCII, empty identifiers
    /// allowed where the version allows them.
    pub const fn new() -> Self {
        Self {
            max_connect_size: 8 * 1024,
            max_packet_size: 256 * 1024,
            max_keep_alive: None,
            client_id_max_len: 128,
            client_id_chars: ClientIdChars::AsciiGraphic,
            allow_empty_client_id: true,
            versions: 1 | 2 | 4,
        }
    }

    /// The size cap, in bytes, of every packet before the broker's CONNACK, while the
    /// client is not known yet: the CONNECT, and what a [`Session`] is given after it
    /// before [`Session::connack_sent`]. (The layer reads nothing pipelined after the
    /// CONNECT before the broker's CONNACK, but an MQTT 5 client's AUTH packets.)
    #[must_use]
    pub const fn max_connect_size(mut self, bytes: usize) -> Self {
        self.max_connect_size = bytes;
        self
    }

    /// The size cap, in bytes, of every packet after the broker's CONNACK.
    #[must_use]
    pub const fn max_packet_size(mut self, bytes: usize) -> Self {
        self.max_packet_size = bytes;
        self
    }

    /// Refuse keep-alives over `seconds`, and 0 (no keep-alive at all).
    #[must_use]
    pub const fn max_keep_alive(mut self, seconds: u16) -> Self {
        self.max_keep_alive = Some(seconds);
        self
    }

    /// The longest client identifier accepted, in bytes; never below 23, since every
    /// server must accept 1 to 23 alphanumerics ([MQTT-3.1.3-5]). MQTT 3.1 clients are
    /// held to its own 23 characters whatever this says.
    #[must_use]
    pub const fn client_id_max_len(mut self, bytes: usize) -> Self {
        self.client_id_max_len = if bytes < 23 { 23 } else { bytes };
        self
    }

    /// The characters a client identifier may hold.
    #[must_use]
    pub const fn client_id_chars(mut self, chars: ClientIdChars) -> Self {
        self.client_id_chars = chars;
        self
    }

    /// Only `versions` are accepted (all three by default): a CONNECT of another is
    /// refused as [`MqttError::UnsupportedVersion`], with the answer its version's spec
    /// gives (CONNACK 0x01 for 3.x, 0x84 for 5.0). For a broker that speaks fewer: an
    /// MQTT 5 client is told so, where such a broker might close without a word.
    ///
    /// ```
    /// use aegis_mqtt::{Config, MqttError, Version, validate_connect};
    ///
    /// let only_311 = Config::new().versions(&[Version::V3_1_1]);
    /// // MQTT 5 CONNECT, clean start, keep-alive 60, no properties, client id "c".
    /// let v5 = [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 1, b'c'];
    /// let err = validate_connect(&v5, &only_311).unwrap_err();
    /// assert!(matches!(err, MqttError::UnsupportedVersion { level: 5 }));
    /// assert!(validate_connect(&v5, &Config::new()).is_ok());
    /// ```
    #[must_use]
    pub const fn versions(mut self, versions: &[Version]) -> Self {
        self.versions = 0;
        let mut i = 0;
        while i < versions.len() {
            self.versions |= version_bit(versions[i]);
            i += 1;
        }
        self
    }

    /// Whether `version` is accepted.
    pub const fn accepts(&self, version: Version) -> bool {
        self.versions & version_bit(version) != 0
    }

    /// Whether an empty client identifier is accepted where the version allows one
    /// (3.1.1 with clean session 1, 5.0); MQTT 3.1 never allows one.
    #[must_use]
    pub const fn allow_empty_client_id(mut self, allow: bool) -> Self {
        self.allow_empty_client_id = allow;
        self
    }
}

/// Splits a whole frame into its first byte and body, checking the Remaining Length.
fn split_frame(frame: &[u8]) -> Result<(u8, &[u8]), MqttError> {
    match Framer::new(usize::MAX).decode(frame)? {
        Decoded::Frame(f) if f.len() == frame.len() => Ok((frame[0], &frame[f.header_len()..])),
        _ => Err(MqttError::Malformed(
            "remaining length does not match the frame",
        )),
    }
}

/// The fuzz entry points, as plain functions so that tests can replay the corpora.
#[doc(hidden)]
pub mod __fuzz {
    use crate::topic::{check_topic_filter, check_topic_name};
    use crate::{
        Answer, ClientIdChars, Config, MqttError, Next, Packet, Session, Version, connect_version,
        validate_connect,
    };

    #[cfg(any(all(feature = "inspect", test), feature = "fuzz-io"))]
    pub use crate::fuzz_io::io;

    /// The configurations [`connect`] validates with, by its input's first byte (modulo
    /// their number): [`Config::new()`] first, then what the products set (written
    /// from `examples/mqtt-gateway/stack.rs`, which says so: change them together).
    pub const CONNECT_CONFIGS: [Config; 8] = [
        Config::new(),
        // The mqtt-gateway in front of its embedded broker, which speaks 3.1.1 only and
        // fails on a client id with `+`, `$`, `#` or `/`.
        Config::new()
            .versions(&[Version::V3_1_1])
            .client_id_chars(ClientIdChars::Custom(|c| {
                c.is_ascii_graphic() && !matches!(c, '+' | '$' | '#' | '/')
            })),
        Config::new().allow_empty_client_id(false),
        Config::new().client_id_chars(ClientIdChars::Alphanumeric),
        Config::new().max_keep_alive(600),
        // The mqtt-gateway's strictest settings at once, embedded broker.
        Config::new()
            .versions(&[Version::V3_1_1])
            .allow_empty_client_id(false)
            .client_id_chars(ClientIdChars::Alphanumeric)
            .client_id_max_len(23)
            .max_keep_alive(60),
        Config::new()
            .client_id_chars(ClientIdChars::Any)
            .client_id_max_len(23),
        Config::new().versions(&[Version::V5]),
    ];

    /// Takes every CONNECT that one of [`CONNECT_CONFIGS`] takes: each only narrows it.
    const WIDEST: Config = Config::new()
        .client_id_chars(ClientIdChars::Any)
        .client_id_max_len(usize::MAX);

    /// A [`connect`] input: the configuration its first byte chooses, and the CONNECT
    /// after that byte (an empty input: [`Config::new()`] and no bytes).
    pub fn connect_input(data: &[u8]) -> (Config, &[u8]) {
        match data.split_first() {
            Some((&n, frame)) => (
                CONNECT_CONFIGS[usize::from(n) % CONNECT_CONFIGS.len()],
                frame,
            ),
            None => (Config::new(), data),
        }
    }

    /// Validates the CONNECT after the first byte of `data` by a [`Session`] with the
    /// configuration that byte chooses ([`connect_input`]).
    ///
    /// # Panics
    ///
    /// If the session's first packet is not a CONNECT, an answer is longer than 5
    /// bytes, the session's version is not [`connect_version`]'s (an accepted CONNECT's
    /// version is recognised), a CONNECT accepted is refused by a configuration wider
    /// than all of [`CONNECT_CONFIGS`], or (in tests and with the feature `fuzz-sniff`)
    /// the sniffer of `aegis-layers` would not route one that configuration accepts to
    /// MQTT at its level.
    pub fn connect(data: &[u8]) {
        let (config, frame) = connect_input(data);
        // No comparison with `validate_connect(frame, &config)`: a session validates its
        // first packet by that very call, so the two cannot disagree.
        let mut session = Session::new(config);
        let result = session.validate(frame).map(|p| match p {
            Packet::Connect(c) => c,
            other => panic!("a session's first packet is a CONNECT: {other:?}"),
        });
        if let Err(e) = &result {
            let answer = session.answer(e);
            assert!(answer.bytes().len() <= 5, "answers are short: {answer:?}");
        }
        let version = connect_version(frame);
        if let Ok(c) = &result {
            assert_eq!(version, Some(c.version), "an accepted CONNECT's version");
        }
        assert_eq!(session.version(), version, "the session's version");
        let widest = validate_connect(frame, &WIDEST);
        if result.is_ok() {
            assert!(widest.is_ok(), "refused by the widest: {widest:?}");
        }
        #[cfg(any(test, feature = "fuzz-sniff"))]
        if let Ok(c) = widest {
            sniffed_as(frame, c.version);
        }
    }

    /// Asserts that the sniffer (`aegis_layers::sniff::classify`) classifies a valid
    /// CONNECT `frame` of `version` as MQTT of that level, and every prefix of it either
    /// so or undecided: otherwise a sniffing router would send a valid client elsewhere,
    /// whatever it had read of the CONNECT so far.
    #[cfg(any(test, feature = "fuzz-sniff"))]
    fn sniffed_as(frame: &[u8], version: Version) {
        use aegis_layers::sniff::{Classification, Detection, MAX_DECISION_LEN, classify};
        let mqtt = Classification::Decided(Detection::mqtt(version.level()));
        assert_eq!(classify(frame), mqtt, "a valid {version:?} CONNECT");
        // Decided by `MAX_DECISION_LEN` bytes, and never changed after (the sniffer's
        // own fuzz target checks that): the longer prefixes classify as the whole.
        for n in 0..frame.len().min(MAX_DECISION_LEN) {
            let got = classify(&frame[..n]);
            assert!(
                got == Classification::NeedMore || got == mqtt,
                "the first {n} bytes of a valid {version:?} CONNECT: {got:?}"
            );
        }
    }

    /// Feeds `data` into a framer and session in chunks whose sizes come from the first
    /// bytes of `data`, as a layer reading from a socket would, then all at once, and
    /// asserts both give the same packets and the same first error: how the bytes were
    /// split must not matter. The first byte holds the number of chunk sizes (its low
    /// three bits) and, in bit 3, whether the next 32 bytes are the body of a broker
    /// CONNACK given to the session once its CONNECT is accepted.
    ///
    /// Each packet accepted is checked as well (`feed`): a session told of the CONNACK
    /// without its limits accepts it too (a CONNACK's limits only ever refuse more), and
    /// the validated view keeps the rules (`check_view`).
    ///
    /// # Panics
    ///
    /// If the two feedings disagree, an answer is longer than 5 bytes, a packet accepted
    /// under a CONNACK's limits is refused without them, or a validated view breaks a
    /// rule.
    pub fn stream(data: &[u8]) {
        let Some((&n, data)) = data.split_first() else {
            return;
        };
        let (sizes, data) = data.split_at(usize::from(n % 8).min(data.len()));
        let (connack, data) = if n & 8 == 0 {
            (None, data)
        } else {
            let (body, rest) = data.split_at(32.min(data.len()));
            let len = u8::try_from(body.len()).unwrap_or(0);
            let mut c = vec![0x20, len];
            c.extend_from_slice(body);
            (Some(c), rest)
        };
        let chunked = feed(data, connack.as_deref(), |i| {
            sizes
                .get(i % sizes.len().max(1))
                .map_or(7, |&s| usize::from(s % 64) + 1)
        });
        let whole = feed(data, connack.as_deref(), |_| data.len());
        assert_eq!(chunked, whole, "chunked and whole feeding disagree");
    }

    /// What a session made of a stream: the length of each packet it accepted, then the
    /// first error and its answer, if any.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        packets: Vec<usize>,
        error: Option<(MqttError, Answer)>,
    }

    /// Feeds `data` to a new session in chunks of `chunk(i)` bytes for the `i`-th read,
    /// giving it `connack` once its CONNECT is accepted. A second session, `unlimited`,
    /// is fed each packet the first accepts, and told of the CONNACK without its limits
    /// ([`Session::connack_sent`]): it must accept each one too.
    fn feed(data: &[u8], connack: Option<&[u8]>, chunk: impl Fn(usize) -> usize) -> Outcome {
        let mut connack = connack;
        let config = Config::new().max_connect_size(512).max_packet_size(4096);
        let mut session = Session::new(config);
        let mut unlimited = Session::new(config);
        let mut out = Outcome {
            packets: Vec::new(),
            error: None,
        };
        let mut buf = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < data.len() {
            let end = pos.saturating_add(chunk(i)).min(data.len());
            i += 1;
            buf.extend_from_slice(&data[pos..end]);
            pos = end;
            loop {
                match session.next(&buf) {
                    Ok(Next::NeedMore(_)) => break,
                    Ok(Next::Packet { len, packet }) => {
                        check_view(&packet, session.version());
                        match unlimited.next(&buf) {
                            Ok(Next::Packet { len: n, .. }) if n == len => {}
                            other => panic!(
                                "accepted under the CONNACK's limits, not without them: \
                                 {other:?}, {packet:?}"
                            ),
                        }
                        out.packets.push(len);
                        buf.drain(..len);
                        if let Some(c) = connack.take() {
                            session.on_connack(c);
                            unlimited.connack_sent();
                        }
                    }
                    Err(e) => {
                        let answer = session.answer(&e);
                        assert!(answer.bytes().len() <= 5, "answers are short");
                        out.error = Some((e, answer));
                        return out;
                    }
                }
            }
        }
        out
    }

    /// Asserts that a validated packet's view keeps the rules the validator enforces:
    /// a PUBLISH of `QoS` 0 to 2, DUP only with `QoS` 1 or 2, a packet identifier (not
    /// 0) exactly with `QoS` 1 or 2, a topic name that [`check_topic_name`] takes or an
    /// empty one with a Topic Alias; a SUBSCRIBE or UNSUBSCRIBE with a packet identifier
    /// and at least one filter, each one [`check_topic_filter`] takes (shared ones for
    /// MQTT 5 only); acknowledgements with a packet identifier.
    fn check_view(packet: &Packet<'_>, version: Option<Version>) {
        match packet {
            Packet::Publish(p) => {
                assert!(p.qos <= 2, "PUBLISH QoS {}", p.qos);
                assert!(!p.dup || p.qos > 0, "DUP on a QoS 0 PUBLISH");
                assert_eq!(p.packet_id != 0, p.qos > 0, "PUBLISH packet id: {p:?}");
                if p.topic.is_empty() {
                    assert!(p.topic_alias.is_some(), "an empty topic without an alias");
                } else {
                    assert_eq!(check_topic_name(p.topic), Ok(()), "{p:?}");
                }
            }
            Packet::Subscribe(f) | Packet::Unsubscribe(f) => {
                assert_ne!(f.packet_id(), 0, "packet id 0: {packet:?}");
                let shared = version == Some(Version::V5);
                let mut n = 0;
                for (filter, _) in f.iter() {
                    n += 1;
                    assert!(
                        check_topic_filter(filter, shared).is_ok(),
                        "filter {filter:?} of {packet:?}"
                    );
                }
                assert!(n > 0, "no filter: {packet:?}");
            }
            Packet::PubAck(id) | Packet::PubRec(id) | Packet::PubRel(id) | Packet::PubComp(id) => {
                assert_ne!(*id, 0, "packet id 0: {packet:?}");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::__fuzz::{CONNECT_CONFIGS, connect, connect_input};
    use crate::validate_connect;

    /// The `mqtt_connect` seeds (`tests/corpus.rs` judges them by name), each under
    /// every configuration, through the fuzz entry point: here it also checks the
    /// sniffer's verdict on each CONNECT accepted, which it does only in the library's
    /// own tests and with the feature `fuzz-sniff`.
    #[test]
    fn connect_seeds_under_every_configuration() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/mqtt_connect");
        let mut accepted = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let (_, frame) = connect_input(&data);
            for (n, config) in CONNECT_CONFIGS.iter().enumerate() {
                let input = [&[u8::try_from(n).unwrap()][..], frame].concat();
                connect(&input);
                accepted += usize::from(validate_connect(frame, config).is_ok());
            }
        }
        assert!(accepted >= 20, "{accepted} CONNECTs accepted");
    }
}

/// The fuzz entry points for `cargo fuzz` (see `fuzz/`).
#[cfg(fuzzing)]
pub mod fuzz_logic {
    /// Runs the CONNECT validator on arbitrary bytes, the first choosing the
    /// configuration (see `__fuzz::connect`).
    pub fn connect(data: &[u8]) {
        crate::__fuzz::connect(data);
    }

    /// Feeds arbitrary chunks into the framer and session validator.
    pub fn stream(data: &[u8]) {
        crate::__fuzz::stream(data);
    }

    /// Drives one connection through the whole layer with a script of reads, writes,
    /// closes and clock moves (see `__fuzz::io`). Needs the feature `fuzz-io`.
    #[cfg(feature = "fuzz-io")]
    pub fn io(data: &[u8]) {
        crate::__fuzz::io(data);
    }
}
