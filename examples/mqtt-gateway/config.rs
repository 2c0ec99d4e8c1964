//! The gateway's configuration: the TOML file, its defaults and its validation.
//!
//! Every key, its default and its meaning are listed in `CONFIG.md` beside this file;
//! `gateway.example.toml` holds every key set to its default. Durations are humantime
//! strings (`"250ms"`, `"10s"`, `"1m 30s"`); `"0s"` turns an optional clock off where
//! `CONFIG.md` says so. Unknown keys are errors everywhere.
//!
//! Loading has two steps, both of which name the key on failure:
//!
//! 1. [`Config::parse`]: TOML syntax, types and unknown keys (serde, with the path of the
//!    offending key from `serde_path_to_error`);
//! 2. [`Config::validate`]: ranges and combinations, into a [`Settings`] whose values
//!    the layers' builders accept without panicking. A key's range is checked whatever
//!    its section's `enabled` says; only the checks that relate a section to another
//!    apply while both are on.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::time::Duration;

use aegis_core::ClientKey;
use aegis_layers::rate_limit::Quota;
use aegis_mqtt::inspect::{Action, InspectError, Inspector, Severity};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A configuration error: the dotted key and what is wrong with it.
#[derive(Debug)]
pub(crate) struct ConfigError {
    key: String,
    message: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config error: {}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The shortest `adaptive.interval`.
const MIN_ADAPTIVE_INTERVAL: Duration = Duration::from_millis(10);

/// A humantime duration (`"10s"`) in and out, read by [`parse_duration`].
mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};

    pub(super) use humantime_serde::serialize;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct Humantime;
        impl Visitor<'_> for Humantime {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a duration such as \"10s\" or \"1m 30s\" (at most {} digits)",
                    super::MAX_DURATION_DIGITS
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                super::parse_duration(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(Humantime)
    }
}

/// The most ASCII digits a duration holds, in all its numbers together.
///
/// humantime 2.4.0 panics on some strings instead of answering an error: it carries
/// nanoseconds over into seconds only when they are more than 1e9 (not 1e9 exactly), and
/// `Duration::new` then overflows: `"18446744073709551615s 1000000000ns"`. That needs a
/// total within a second of `u64::MAX` seconds, which these digits cannot write. Each
/// term of a duration (`"1h 30m"` has two) begins with a digit, and a term whose integer
/// part has `d` digits is less than `10^d` of its unit (a fraction adds less than one
/// unit), the longest unit being a year of 31,557,600 s. Terms of `d1, d2, ...` digits
/// (each at least 1) thus make less than `10^d1 + 10^d2 + ...` years, which is at most
/// `10^(d1 + d2 + ...)` years (`10^a + 10^b <= 2 * 10^max(a, b) <= 10^(a + b)` for `a, b
/// >= 1`). With 11 digits: less than `10^11` years, about 3.2e18 s, under `u64::MAX`
/// (1.8e19 s): every sum and carry stays in range, and an overflow beyond is humantime's
/// error. A century in seconds (`"3155760000s"`) takes 10.
const MAX_DURATION_DIGITS: usize = 11;

/// Parses a humantime duration, as the gateway parses every one (the configuration's
/// durations and rates, `POST /bans?for=`): humantime's parser, behind a count of
/// [`MAX_DURATION_DIGITS`] that keeps its overflow panic out of reach.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.bytes().filter(u8::is_ascii_digit).count() > MAX_DURATION_DIGITS {
        return Err(format!("more than {MAX_DURATION_DIGITS} digits"));
    }
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

/// The whole file. Every section and key is optional; a missing one takes its default.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) server: Server,
    pub(crate) metrics: Metrics,
    pub(crate) log: Log,
    pub(crate) proxy_protocol: ProxyProtocol,
    pub(crate) limits: Limits,
    pub(crate) slowloris: Slowloris,
    pub(crate) sniff: Sniff,
    pub(crate) mqtt: Mqtt,
    pub(crate) circuit_breaker: CircuitBreaker,
    pub(crate) adaptive: Adaptive,
    pub(crate) security: Security,
    pub(crate) auth: Auth,
    pub(crate) inspect: Inspect,
}

/// `[server]`: the listener, the upstream and the accept loop.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Server {
    pub(crate) listen: String,
    pub(crate) upstream: String,
    #[serde(with = "duration")]
    pub(crate) upstream_connect_timeout: Duration,
    pub(crate) max_connections: u64,
    #[serde(with = "duration")]
    pub(crate) drain_timeout: Duration,
    pub(crate) nodelay: bool,
    pub(crate) proxy_buffer: usize,
    pub(crate) runtime: Runtime,
}

/// `server.runtime`: how the gateway's connections are spread over the cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Runtime {
    /// tokio's multi-thread runtime: one worker per core, work stealing between them.
    WorkStealing,
    /// One current-thread runtime per core, the accepting one handing connections to
    /// the others when it serves more than its share (`aegis_core::serve::share_out`):
    /// the default, as each thread of HAProxy serves its own connections
    /// (`BENCHMARKS.md`: more sessions per second).
    #[default]
    PerCore,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:1883".into(),
            upstream: "embedded".into(),
            upstream_connect_timeout: Duration::from_secs(3),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(22),
            nodelay: true,
            proxy_buffer: 64 * 1024,
            runtime: Runtime::PerCore,
        }
    }
}

/// `[metrics]`: the HTTP endpoint with `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Metrics {
    pub(crate) enabled: bool,
    pub(crate) listen: String,
    #[serde(with = "duration")]
    pub(crate) readiness_timeout: Duration,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9090".into(),
            readiness_timeout: Duration::from_millis(500),
        }
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogFormat {
    Plain,
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Log {
    pub(crate) format: LogFormat,
    pub(crate) level: String,
    pub(crate) mask_client_addresses: bool,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Plain,
            level: "info".into(),
            mask_client_addresses: false,
        }
    }
}

/// `proxy_protocol.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HeaderMode {
    Required,
    Optional,
}

/// `[proxy_protocol]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ProxyProtocol {
    pub(crate) enabled: bool,
    pub(crate) trusted: Vec<String>,
    pub(crate) mode: HeaderMode,
    #[serde(with = "duration")]
    pub(crate) timeout: Duration,
    pub(crate) max_header_len: usize,
}

impl Default for ProxyProtocol {
    fn default() -> Self {
        Self {
            enabled: false,
            trusted: Vec::new(),
            mode: HeaderMode::Required,
            timeout: Duration::from_secs(3),
            max_header_len: 512,
        }
    }
}

/// `[limits]`: the connection rate limiter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Limits {
    pub(crate) enabled: bool,
    pub(crate) max_keys: usize,
    #[serde(with = "duration")]
    pub(crate) evict_every: Duration,
    pub(crate) ipv4_prefix: u8,
    pub(crate) ipv6_prefix: u8,
    #[serde(deserialize_with = "tier_table::global")]
    pub(crate) global: RateTier,
    #[serde(deserialize_with = "tier_table::per_ip")]
    pub(crate) per_ip: RateTier,
    #[serde(deserialize_with = "tier_table::concurrent_per_ip")]
    pub(crate) concurrent_per_ip: Concurrent,
    #[serde(deserialize_with = "tier_table::connect_per_ip")]
    pub(crate) connect_per_ip: RateTier,
    #[serde(deserialize_with = "tier_table::publish_per_client")]
    pub(crate) publish_per_client: RateTier,
    #[serde(deserialize_with = "tier_table::subscribe_per_client")]
    pub(crate) subscribe_per_client: RateTier,
    #[serde(deserialize_with = "tier_table::packets_per_client")]
    pub(crate) packets_per_client: RateTier,
    #[serde(deserialize_with = "tier_table::bytes_per_client")]
    pub(crate) bytes_per_client: RateTier,
    pub(crate) v5_publish_answer: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            enabled: true,
            max_keys: 100_000,
            evict_every: Duration::from_secs(30),
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            global: RateTier {
                enabled: false,
                rate: "1000/s".into(),
                burst: 1000,
            },
            per_ip: RateTier {
                enabled: true,
                rate: "5/s".into(),
                burst: 10,
            },
            concurrent_per_ip: Concurrent {
                enabled: true,
                max: 64,
            },
            connect_per_ip: off("30/m", 10),
            publish_per_client: off("100/s", 200),
            subscribe_per_client: off("30/m", 30),
            packets_per_client: off("200/s", 400),
            bytes_per_client: off("1048576/s", 1_048_576),
            v5_publish_answer: false,
        }
    }
}

/// A rate tier: `rate` is `"N/s"`, `"N/m"`, `"N/h"` or `"N/<duration>"` (`"1/10s"`).
/// Read from its table by [`tier_table`].
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RateTier {
    pub(crate) enabled: bool,
    pub(crate) rate: String,
    pub(crate) burst: u32,
}

/// `[limits.concurrent_per_ip]`. Read from its table by [`tier_table`].
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Concurrent {
    pub(crate) enabled: bool,
    pub(crate) max: u32,
}

/// A tier's table as written: writing it turns the tier on unless it says
/// `enabled = false`, and a key it leaves out keeps that tier's default (so
/// `[limits.per_ip]` with `enabled = false` alone turns that tier off).
mod tier_table {
    use serde::{Deserialize, Deserializer};

    use super::{Concurrent, Limits, RateTier};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Table {
        enabled: Option<bool>,
        rate: Option<String>,
        burst: Option<u32>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ConcurrentTable {
        enabled: Option<bool>,
        max: Option<u32>,
    }

    fn rate<'de, D: Deserializer<'de>>(d: D, default: RateTier) -> Result<RateTier, D::Error> {
        let t = Table::deserialize(d)?;
        Ok(RateTier {
            enabled: t.enabled.unwrap_or(true),
            rate: t.rate.unwrap_or(default.rate),
            burst: t.burst.unwrap_or(default.burst),
        })
    }

    pub(super) fn concurrent_per_ip<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Concurrent, D::Error> {
        let t = ConcurrentTable::deserialize(d)?;
        Ok(Concurrent {
            enabled: t.enabled.unwrap_or(true),
            max: t.max.unwrap_or(Limits::default().concurrent_per_ip.max),
        })
    }

    /// One reader per rate tier, each falling back on its own defaults.
    macro_rules! rate_tiers {
        ($($name:ident),*) => {$(
            pub(super) fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<RateTier, D::Error> {
                rate(d, Limits::default().$name)
            }
        )*};
    }

    rate_tiers!(
        global,
        per_ip,
        connect_per_ip,
        publish_per_client,
        subscribe_per_client,
        packets_per_client,
        bytes_per_client
    );
}

/// A tier that is off by default, with the values it takes when turned on alone.
fn off(rate: &str, burst: u32) -> RateTier {
    RateTier {
        enabled: false,
        rate: rate.into(),
        burst,
    }
}

/// `[slowloris]`: the handshake clocks. `"0s"` turns a clock off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Slowloris {
    pub(crate) enabled: bool,
    #[serde(with = "duration")]
    pub(crate) first_byte: Duration,
    #[serde(with = "duration")]
    pub(crate) idle: Duration,
    #[serde(with = "duration")]
    pub(crate) handshake: Duration,
    pub(crate) min_rate_bytes_per_sec: u32,
    #[serde(with = "duration")]
    pub(crate) min_rate_grace: Duration,
    #[serde(with = "duration")]
    pub(crate) idle_after_handshake: Duration,
    #[serde(with = "duration")]
    pub(crate) jitter: Duration,
}

impl Default for Slowloris {
    fn default() -> Self {
        Self {
            enabled: true,
            first_byte: Duration::from_secs(5),
            idle: Duration::ZERO,
            handshake: Duration::from_secs(10),
            min_rate_bytes_per_sec: 0,
            min_rate_grace: Duration::from_secs(5),
            idle_after_handshake: Duration::ZERO,
            jitter: Duration::from_millis(50),
        }
    }
}

/// What the sniffer does with a protocol that is not MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Refuse {
    /// Close at once, counted as `aegis_rejections_total{layer="sniff",reason=<protocol>}`.
    Reject,
}

/// What the sniffer does with HTTP/1 on the MQTT port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HttpPolicy {
    /// Close at once, as [`Refuse::Reject`].
    Reject,
    /// Answer `400 Bad Request` (bounded hyper server) and close.
    BadRequest,
}

/// `[sniff]`: only MQTT on the MQTT port.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Sniff {
    pub(crate) enabled: bool,
    #[serde(with = "duration")]
    pub(crate) timeout: Duration,
    pub(crate) max_prefix: usize,
    pub(crate) http: HttpPolicy,
    pub(crate) http2: Refuse,
    pub(crate) tls: Refuse,
    pub(crate) unknown: Refuse,
}

impl Default for Sniff {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout: Duration::from_secs(5),
            max_prefix: 1024,
            http: HttpPolicy::Reject,
            http2: Refuse::Reject,
            tls: Refuse::Reject,
            unknown: Refuse::Reject,
        }
    }
}

/// `mqtt.client_id_chars`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClientIdChars {
    Alphanumeric,
    AsciiGraphic,
    Any,
}

/// `mqtt.packet_rate.over`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OverRate {
    Throttle,
    Disconnect,
}

/// `[mqtt]`: strict MQTT validation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Mqtt {
    pub(crate) enabled: bool,
    #[serde(with = "duration")]
    pub(crate) connect_timeout: Duration,
    pub(crate) max_connect_size: usize,
    pub(crate) max_packet_size: usize,
    #[serde(with = "duration")]
    pub(crate) max_keep_alive: Duration,
    pub(crate) client_id_max_len: usize,
    pub(crate) client_id_chars: ClientIdChars,
    pub(crate) allow_empty_client_id: bool,
    pub(crate) enforce_keep_alive: bool,
    pub(crate) unavailable_answer: bool,
    #[serde(with = "duration")]
    pub(crate) unavailable_timeout: Duration,
    #[serde(with = "duration")]
    pub(crate) connack_timeout: Duration,
    #[serde(with = "duration")]
    pub(crate) packet_timeout: Duration,
    pub(crate) packet_rate: PacketRate,
}

impl Default for Mqtt {
    fn default() -> Self {
        Self {
            enabled: true,
            connect_timeout: aegis_mqtt::layer::DEFAULT_CONNECT_TIMEOUT,
            max_connect_size: 8 * 1024,
            max_packet_size: 256 * 1024,
            max_keep_alive: Duration::ZERO,
            client_id_max_len: 128,
            client_id_chars: ClientIdChars::AsciiGraphic,
            allow_empty_client_id: true,
            enforce_keep_alive: false,
            unavailable_answer: true,
            unavailable_timeout: aegis_mqtt::layer::Unavailable::DEFAULT_TIMEOUT,
            connack_timeout: Duration::from_secs(5),
            packet_timeout: aegis_mqtt::layer::DEFAULT_PACKET_TIMEOUT,
            packet_rate: PacketRate::default(),
        }
    }
}

/// `[mqtt.packet_rate]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct PacketRate {
    pub(crate) enabled: bool,
    pub(crate) per_second: u32,
    pub(crate) burst: u32,
    pub(crate) over: OverRate,
}

impl Default for PacketRate {
    fn default() -> Self {
        Self {
            enabled: false,
            per_second: 100,
            burst: 200,
            over: OverRate::Throttle,
        }
    }
}

/// `[circuit_breaker]` around the upstream connector.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct CircuitBreaker {
    pub(crate) enabled: bool,
    pub(crate) consecutive_failures: u32,
    #[serde(with = "duration")]
    pub(crate) open_for: Duration,
    pub(crate) half_open_permits: u32,
    pub(crate) success_threshold: u32,
    pub(crate) failure_rate: FailureRate,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 5,
            open_for: Duration::from_secs(10),
            half_open_permits: 1,
            success_threshold: 1,
            failure_rate: FailureRate::default(),
        }
    }
}

/// `[circuit_breaker.failure_rate]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct FailureRate {
    pub(crate) enabled: bool,
    pub(crate) ratio: f64,
    pub(crate) window: usize,
    pub(crate) min_calls: usize,
}

impl Default for FailureRate {
    fn default() -> Self {
        Self {
            enabled: false,
            ratio: 0.5,
            window: 20,
            min_calls: 10,
        }
    }
}

/// `adaptive.drives`: which rate-limiter tier the controller sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Drives {
    Global,
    PerIp,
}

/// `[adaptive]`: lowers the admitted connection rate when the upstream's connect P95
/// rises.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Adaptive {
    pub(crate) enabled: bool,
    pub(crate) drives: Drives,
    #[serde(with = "duration")]
    pub(crate) threshold: Duration,
    pub(crate) min_rate: u32,
    pub(crate) max_rate: u32,
    #[serde(with = "duration")]
    pub(crate) interval: Duration,
    pub(crate) min_samples: u64,
    pub(crate) reduction: f64,
    pub(crate) recovery: f64,
}

impl Default for Adaptive {
    fn default() -> Self {
        Self {
            enabled: false,
            drives: Drives::Global,
            threshold: Duration::from_millis(100),
            min_rate: 10,
            max_rate: 1000,
            interval: Duration::from_secs(1),
            min_samples: 20,
            reduction: 0.8,
            recovery: 1.1,
        }
    }
}

/// `security.ban_by`: the keys the anomaly detector bans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BanBy {
    Addr,
    Username,
    ClientId,
}

/// `[security]`: the security event log (served at `/events`), the anomaly detector and
/// bans (listed at `/bans`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Security {
    pub(crate) enabled: bool,
    pub(crate) events: usize,
    #[serde(with = "duration")]
    pub(crate) window: Duration,
    #[serde(with = "duration")]
    pub(crate) ban_for: Duration,
    pub(crate) max_connects: u32,
    pub(crate) max_auth_failures: u32,
    pub(crate) max_rejections: u32,
    pub(crate) ban_by: Vec<BanBy>,
    pub(crate) max_tracked: usize,
    pub(crate) max_bans: usize,
    /// Whether a ban also closes the open sessions it matches.
    pub(crate) close_on_ban: bool,
    /// Whether `POST /bans` and `DELETE /bans` on the metrics endpoint change bans.
    pub(crate) admin: bool,
    /// The bearer token the admin paths need; empty: none (loopback only).
    pub(crate) admin_token: Secret,
    /// Networks the detector never counts for (CIDR notation).
    pub(crate) exempt: Vec<String>,
    /// Networks refused at once (CIDR notation).
    pub(crate) deny: Vec<String>,
    /// A file of more of them, one per line.
    pub(crate) deny_file: String,
    /// Where the bans are kept across restarts; empty: nowhere.
    pub(crate) bans_file: String,
    /// How often the bans are written to `bans_file` while they change.
    #[serde(with = "duration")]
    pub(crate) bans_save_every: Duration,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            enabled: true,
            events: 1024,
            window: Duration::from_secs(60),
            ban_for: Duration::from_secs(300),
            max_connects: 0,
            max_auth_failures: 10,
            max_rejections: 100,
            ban_by: vec![BanBy::Addr],
            max_tracked: 100_000,
            max_bans: 100_000,
            close_on_ban: true,
            admin: false,
            admin_token: Secret::default(),
            exempt: Vec::new(),
            deny: Vec::new(),
            deny_file: String::new(),
            bans_file: String::new(),
            bans_save_every: Duration::from_secs(60),
        }
    }
}

/// `auth.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AuthKind {
    None,
    Http,
    File,
}

/// `[auth]`: each CONNECT's credentials checked by an HTTP service or a password file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Auth {
    pub(crate) kind: AuthKind,
    pub(crate) url: String,
    pub(crate) file: String,
    #[serde(with = "duration")]
    pub(crate) ttl: Duration,
    #[serde(with = "duration")]
    pub(crate) deny_ttl: Duration,
    #[serde(with = "duration")]
    pub(crate) timeout: Duration,
    pub(crate) max_entries: usize,
    pub(crate) max_checks_per_addr: usize,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            kind: AuthKind::None,
            url: String::new(),
            file: String::new(),
            ttl: Duration::from_secs(60),
            deny_ttl: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            max_entries: 10_000,
            max_checks_per_addr: aegis_mqtt::auth::DEFAULT_MAX_CHECKS_PER_ADDR,
        }
    }
}

/// `inspect.default_rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DefaultRules {
    Off,
    Flag,
    Block,
}

/// `[[inspect.rules]]`: a pattern over payloads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatternRule {
    pub(crate) name: String,
    pub(crate) pattern: String,
    #[serde(default = "block")]
    pub(crate) action: Action,
    #[serde(default = "high")]
    pub(crate) severity: Severity,
}

/// `[[inspect.topics]]`: topic filters for some clients.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopicAcl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) username: Option<String>,
    #[serde(default)]
    pub(crate) allow: Vec<String>,
    #[serde(default)]
    pub(crate) deny: Vec<String>,
    #[serde(default = "block")]
    pub(crate) action: Action,
    #[serde(default = "medium")]
    pub(crate) severity: Severity,
}

fn block() -> Action {
    Action::Block
}

fn high() -> Severity {
    Severity::High
}

fn medium() -> Severity {
    Severity::Medium
}

/// `[inspect]`: payload and topic rules for every PUBLISH and will message.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Inspect {
    pub(crate) enabled: bool,
    pub(crate) default_rules: DefaultRules,
    pub(crate) max_payload: usize,
    pub(crate) max_payload_action: Action,
    pub(crate) entropy_threshold: f64,
    pub(crate) entropy_min_len: usize,
    pub(crate) entropy_action: Action,
    pub(crate) rules: Vec<PatternRule>,
    pub(crate) topics: Vec<TopicAcl>,
}

impl Default for Inspect {
    fn default() -> Self {
        Self {
            enabled: true,
            default_rules: DefaultRules::Flag,
            max_payload: 0,
            max_payload_action: Action::Block,
            entropy_threshold: 0.0,
            entropy_min_len: 256,
            entropy_action: Action::Block,
            rules: Vec::new(),
            topics: Vec::new(),
        }
    }
}

/// Where the gateway proxies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upstream {
    /// The in-process broker, on a free loopback port chosen at start-up.
    Embedded,
    /// A broker at this address.
    Addr(SocketAddr),
}

/// The per-packet policy's tiers (enforced by the MQTT layer), each `None` when off.
#[derive(Debug, Clone, Default)]
pub(crate) struct PolicyQuotas {
    pub(crate) connect_per_ip: Option<Quota>,
    pub(crate) publish_per_client: Option<Quota>,
    pub(crate) subscribe_per_client: Option<Quota>,
    pub(crate) packets_per_client: Option<Quota>,
    pub(crate) bytes_per_client: Option<Quota>,
}

impl PolicyQuotas {
    pub(crate) fn any(&self) -> bool {
        self.connect_per_ip.is_some()
            || self.publish_per_client.is_some()
            || self.subscribe_per_client.is_some()
            || self.packets_per_client.is_some()
            || self.bytes_per_client.is_some()
    }
}

/// The validated configuration: everything the stack needs, in the layers' types.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) listen: SocketAddr,
    pub(crate) upstream: Upstream,
    pub(crate) metrics_listen: Option<SocketAddr>,
    pub(crate) trusted: Vec<IpNet>,
    /// `security.exempt`, parsed.
    pub(crate) exempt: Vec<ClientKey>,
    /// `security.deny` and the networks of `security.deny_file`, parsed.
    pub(crate) deny: Vec<ClientKey>,
    pub(crate) global: Option<Quota>,
    pub(crate) per_ip: Option<Quota>,
    pub(crate) policy: PolicyQuotas,
    pub(crate) max_keep_alive: Option<u16>,
    /// The compiled `[inspect]` rules, `None` when off.
    pub(crate) inspector: Option<Inspector>,
    /// The `[auth]` layer (its password file read), `None` when off.
    pub(crate) auth: Option<aegis_mqtt::auth::AuthLayer<crate::stack::Authenticator>>,
    /// The bans of `security.bans_file`, read (not yet in place); `None` when it is not
    /// set or there is no file yet.
    pub(crate) bans: Option<Vec<aegis_mqtt::security::Ban>>,
    pub(crate) raw: Config,
}

impl Config {
    /// Parses a TOML document; `origin` names it in errors (the file path).
    pub(crate) fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new(origin, one_line(&e, text)))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." {
                origin.to_string()
            } else {
                path
            };
            ConfigError::new(key, one_line(e.inner(), text))
        })
    }

    /// Every duration key within its bound ([`MAX_TIMEOUT`] for the clocks of a
    /// connection's start and of the adaptive controller,
    /// [`MAX_READINESS_TIMEOUT`](crate::metrics_http::MAX_READINESS_TIMEOUT) for the
    /// readiness probe, [`MAX_THRESHOLD`](aegis_layers::adaptive::MAX_THRESHOLD) for
    /// `adaptive.threshold`, [`MAX_DURATION`] for the others), whether its section is on or
    /// not. `security.bans_save_every` and `mqtt.max_keep_alive` have bounds of their
    /// own, checked in [`validate`](Self::validate), also whether their section is on
    /// or not.
    fn durations_in_range(&self) -> Result<(), ConfigError> {
        let hour = (MAX_TIMEOUT, "an hour (1h)");
        let probe = (
            crate::metrics_http::MAX_READINESS_TIMEOUT,
            "10s (the endpoint ends every connection after 30s)",
        );
        let year = (MAX_DURATION, "a year (1y)");
        // The controller keeps latencies up to a minute, a longer one as one minute: a
        // threshold near that could not be crossed by a stalled broker's samples, and
        // one over 85s would read them as healthy and raise the rate.
        let threshold = (
            aegis_layers::adaptive::MAX_THRESHOLD,
            "30s (latencies are kept up to a minute: a stalled upstream must read over it)",
        );
        let (s, sl, m, a, sec, au) = (
            &self.server,
            &self.slowloris,
            &self.mqtt,
            &self.adaptive,
            &self.security,
            &self.auth,
        );
        let keys = [
            // A supervisor kills a process that takes longer to stop (Kubernetes after
            // 30 s by default), and a typo such as "1y" would keep a stopping gateway
            // around for good.
            ("server.drain_timeout", s.drain_timeout, hour),
            (
                "server.upstream_connect_timeout",
                s.upstream_connect_timeout,
                hour,
            ),
            (
                "metrics.readiness_timeout",
                self.metrics.readiness_timeout,
                probe,
            ),
            ("proxy_protocol.timeout", self.proxy_protocol.timeout, hour),
            ("limits.evict_every", self.limits.evict_every, year),
            ("slowloris.first_byte", sl.first_byte, hour),
            ("slowloris.idle", sl.idle, hour),
            ("slowloris.handshake", sl.handshake, hour),
            ("slowloris.min_rate_grace", sl.min_rate_grace, hour),
            (
                "slowloris.idle_after_handshake",
                sl.idle_after_handshake,
                year,
            ),
            ("slowloris.jitter", sl.jitter, hour),
            ("sniff.timeout", self.sniff.timeout, hour),
            ("mqtt.connect_timeout", m.connect_timeout, hour),
            ("mqtt.unavailable_timeout", m.unavailable_timeout, hour),
            ("mqtt.connack_timeout", m.connack_timeout, hour),
            ("mqtt.packet_timeout", m.packet_timeout, hour),
            (
                "circuit_breaker.open_for",
                self.circuit_breaker.open_for,
                year,
            ),
            ("adaptive.threshold", a.threshold, threshold),
            ("adaptive.interval", a.interval, hour),
            ("security.window", sec.window, year),
            ("security.ban_for", sec.ban_for, year),
            ("auth.ttl", au.ttl, year),
            ("auth.deny_ttl", au.deny_ttl, year),
            ("auth.timeout", au.timeout, hour),
        ];
        for (key, d, (max, text)) in keys {
            if d > max {
                return Err(ConfigError::new(key, format!("must be at most {text}")));
            }
        }
        Ok(())
    }

    /// The configuration as a TOML document (what `--check` prints).
    pub(crate) fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    /// Checks every range and combination; returns the layers' settings.
    ///
    /// Two kinds of checks, and each block below says which it is:
    ///
    /// - a key's own range (and its relation to keys of its own section): checked
    ///   whatever the section's `enabled` says, so that `--check` refuses a bad value
    ///   before the day its section is switched on;
    /// - a relation between a section and *another* one (a burst against
    ///   `mqtt.max_packet_size`, a threshold against a timeout, a layer that needs
    ///   another): checked only while the section it constrains is on, where it means
    ///   something.
    pub(crate) fn validate(self) -> Result<Settings, ConfigError> {
        self.durations_in_range()?;
        let s = &self.server;
        let listen = resolve("server.listen", &s.listen)?;
        let upstream = if s.upstream == "embedded" {
            Upstream::Embedded
        } else {
            Upstream::Addr(resolve("server.upstream", &s.upstream)?)
        };
        if upstream == Upstream::Embedded && !listen.ip().to_canonical().is_loopback() {
            // Anyone who reaches the gateway could grow the embedded broker's memory
            // without bound (see broker.rs).
            return Err(ConfigError::new(
                "server.upstream",
                format!(
                    "\"embedded\" is for trying the gateway on loopback, and server.listen \
                     {listen} is beyond it: point server.upstream at a real broker \
                     (\"127.0.0.1:1884\", say)"
                ),
            ));
        }
        if let Upstream::Addr(addr) = upstream
            && is_own_listener(listen, addr)
        {
            // Every client would be proxied to the gateway itself: its per-address
            // limits would refuse 127.0.0.1, the detector ban it, and /readyz (which
            // reaches the listener) say ready.
            return Err(ConfigError::new(
                "server.upstream",
                format!(
                    "{addr} is the gateway's own listener (server.listen {listen}): the \
                     gateway would proxy every client to itself; point server.upstream at \
                     the broker"
                ),
            ));
        }
        positive(
            "server.upstream_connect_timeout",
            s.upstream_connect_timeout,
        )?;
        positive("server.drain_timeout", s.drain_timeout)?;
        if s.max_connections == 0 || s.max_connections > u64::from(u32::MAX) {
            return Err(ConfigError::new(
                "server.max_connections",
                format!("must be between 1 and {}", u32::MAX),
            ));
        }

        if !(8 * 1024..=16 * 1024 * 1024).contains(&s.proxy_buffer) {
            return Err(ConfigError::new(
                "server.proxy_buffer",
                "must be between 8192 and 16777216 bytes",
            ));
        }

        let metrics_listen = if self.metrics.enabled {
            Some(resolve("metrics.listen", &self.metrics.listen)?)
        } else {
            None
        };
        let token = self.security.admin_token.expose();
        if !token.is_empty() && (token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic())) {
            return Err(ConfigError::new(
                "security.admin_token",
                "must be at least 16 visible ASCII characters, no spaces",
            ));
        }
        // Bans writable by anyone who reaches the metrics endpoint: only on loopback.
        if let Some(addr) = metrics_listen.filter(|_| self.security.enabled && self.security.admin)
            && !addr.ip().to_canonical().is_loopback()
            && token.is_empty()
        {
            return Err(ConfigError::new(
                "security.admin",
                format!(
                    "the metrics endpoint listens on {addr}, beyond loopback: set \
                     security.admin_token too, or keep bans read-only"
                ),
            ));
        }
        positive("metrics.readiness_timeout", self.metrics.readiness_timeout)?;

        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError::new(
                "log.level",
                format!("not a tracing filter (\"info\", \"debug,rumqttd=warn\"): {e}"),
            )
        })?;

        let pp = &self.proxy_protocol;
        let trusted: Vec<IpNet> = networks("proxy_protocol.trusted", &pp.trusted)?;
        let exempt: Vec<ClientKey> = networks("security.exempt", &self.security.exempt)?;
        let mut deny: Vec<ClientKey> = networks("security.deny", &self.security.deny)?;
        if !self.security.deny_file.is_empty() {
            deny.extend(deny_file(&self.security.deny_file)?);
        }
        if !deny.is_empty() && !self.security.enabled {
            // A deny list that would let everyone in without a word.
            return Err(ConfigError::new(
                "security.deny",
                "needs security.enabled = true (the security layer refuses them)",
            ));
        }
        // Own ranges, whatever proxy_protocol.enabled says.
        positive("proxy_protocol.timeout", pp.timeout)?;
        if !(107..=512).contains(&pp.max_header_len) {
            return Err(ConfigError::new(
                "proxy_protocol.max_header_len",
                "must be between 107 (a v1 header) and 512",
            ));
        }
        // Only while the layer is on: with it off, no peer is trusted and an empty list
        // is the default.
        if pp.enabled && trusted.is_empty() {
            return Err(ConfigError::new(
                "proxy_protocol.trusted",
                "must list at least one network when proxy_protocol.enabled = true",
            ));
        }

        let l = &self.limits;
        // Checked even with the limits off: the security detector keys clients by them.
        at_most("limits.ipv4_prefix", l.ipv4_prefix, 32)?;
        at_most("limits.ipv6_prefix", l.ipv6_prefix, 128)?;
        if self.security.enabled && self.security.ban_by.contains(&BanBy::Addr) {
            // The detector bans a client's network by these prefixes, for rejections
            // that the per-client limits (keyed the same way) count as the client's: at
            // ipv4_prefix = 0 everyone is one client, whose ban refuses every client and
            // closes every session. No wider than what `POST /bans` may ban.
            use crate::metrics_http::{WIDEST_V4_BAN, WIDEST_V6_BAN};
            for (key, prefix, widest, family) in [
                ("limits.ipv4_prefix", l.ipv4_prefix, WIDEST_V4_BAN, "IPv4"),
                ("limits.ipv6_prefix", l.ipv6_prefix, WIDEST_V6_BAN, "IPv6"),
            ] {
                if prefix < widest {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "must be at least {widest} while security.ban_by has \"addr\": \
                             the detector would ban networks wider than an {family} \
                             /{widest} (a /0 is every client) for what one client in them \
                             did; or leave \"addr\" out of security.ban_by"
                        ),
                    ));
                }
            }
        }
        // Own ranges, whatever limits.enabled and each tier's enabled say: every tier's
        // rate and burst are read, and kept only for the tiers that are on.
        at_least("limits.max_keys", l.max_keys, 1)?;
        positive("limits.evict_every", l.evict_every)?;
        at_least("limits.concurrent_per_ip.max", l.concurrent_per_ip.max, 1)?;
        let quotas = (
            tier("limits.global", &l.global)?,
            tier("limits.per_ip", &l.per_ip)?,
            PolicyQuotas {
                connect_per_ip: tier("limits.connect_per_ip", &l.connect_per_ip)?,
                publish_per_client: tier("limits.publish_per_client", &l.publish_per_client)?,
                subscribe_per_client: tier("limits.subscribe_per_client", &l.subscribe_per_client)?,
                packets_per_client: tier("limits.packets_per_client", &l.packets_per_client)?,
                bytes_per_client: tier("limits.bytes_per_client", &l.bytes_per_client)?,
            },
        );
        let (global, per_ip, policy) = if l.enabled {
            quotas
        } else {
            (None, None, PolicyQuotas::default())
        };
        // Only while the limits are on (the tiers are kept only then): relates them to
        // the MQTT layer.
        if policy.any() && !self.mqtt.enabled {
            return Err(ConfigError::new(
                "limits",
                "the per-packet tiers (connect_per_ip, publish_per_client, ...) need mqtt.enabled = true",
            ));
        }

        let sl = &self.slowloris;
        if sl.min_rate_bytes_per_sec > 0 {
            // Own range, whatever slowloris.enabled says. A rate deadline of
            // `grace + received / rate` from the start: with no grace, a connection whose
            // first bytes are not there at its first poll is cut.
            positive("slowloris.min_rate_grace", sl.min_rate_grace)?;
        }
        if sl.enabled && !self.mqtt.enabled {
            // Only while the layer is on: relates it to the MQTT layer. Only the MQTT
            // layer marks the handshake complete: these clocks would cut every
            // connection. (`idle` is not among them: without the MQTT layer it is an idle
            // limit for the whole connection, see CONFIG.md.)
            if !sl.handshake.is_zero() {
                return Err(ConfigError::new(
                    "slowloris.handshake",
                    "needs mqtt.enabled = true (nothing else ends the handshake); set \"0s\"",
                ));
            }
            if sl.min_rate_bytes_per_sec > 0 {
                return Err(ConfigError::new(
                    "slowloris.min_rate_bytes_per_sec",
                    "needs mqtt.enabled = true (nothing else ends the handshake); set 0",
                ));
            }
            // And this one would never start.
            if !sl.idle_after_handshake.is_zero() {
                return Err(ConfigError::new(
                    "slowloris.idle_after_handshake",
                    "needs mqtt.enabled = true (nothing else ends the handshake, so it would \
                     never apply); set \"0s\"",
                ));
            }
        }

        // Own ranges, whatever sniff.enabled says.
        let sn = &self.sniff;
        positive("sniff.timeout", sn.timeout)?;
        let min = aegis_layers::sniff::MAX_DECISION_LEN;
        if !(min..=65_536).contains(&sn.max_prefix) {
            return Err(ConfigError::new(
                "sniff.max_prefix",
                format!("must be between {min} and 65536"),
            ));
        }

        let m = &self.mqtt;
        let mut max_keep_alive = None;
        // Checked even with the MQTT layer off: the embedded broker takes it as its
        // payload limit (0 would have it drop every client).
        let max_packet = aegis_mqtt::MAX_REMAINING_LENGTH + 5;
        if !(64..=max_packet).contains(&m.max_packet_size) {
            return Err(ConfigError::new(
                "mqtt.max_packet_size",
                format!("must be between 64 and {max_packet}"),
            ));
        }
        // Only while the MQTT layer and the bytes tier are on: relates the two. A packet
        // longer than the bytes tier's burst is over it for good (`check_n` refuses more
        // cells than the burst at any time): a QoS 0 one dropped without a word, a QoS
        // 1/2 one never acknowledged, resent and dropped after each reconnect. Every
        // packet the MQTT layer lets through must fit.
        if m.enabled
            && policy.bytes_per_client.is_some()
            && usize::try_from(l.bytes_per_client.burst).is_ok_and(|b| b < m.max_packet_size)
        {
            return Err(ConfigError::new(
                "limits.bytes_per_client.burst",
                format!(
                    "must be at least mqtt.max_packet_size ({}): a packet larger than the \
                     burst would never pass the tier (dropped, never acknowledged)",
                    m.max_packet_size
                ),
            ));
        }
        // Own ranges, whatever mqtt.enabled and mqtt.packet_rate.enabled say.
        positive("mqtt.connect_timeout", m.connect_timeout)?;
        positive("mqtt.packet_timeout", m.packet_timeout)?;
        if !(64..=m.max_packet_size).contains(&m.max_connect_size) {
            return Err(ConfigError::new(
                "mqtt.max_connect_size",
                "must be between 64 and mqtt.max_packet_size",
            ));
        }
        if !m.max_keep_alive.is_zero() {
            let secs = m.max_keep_alive.as_secs();
            if m.max_keep_alive.subsec_nanos() != 0 || secs > u64::from(u16::MAX) {
                return Err(ConfigError::new(
                    "mqtt.max_keep_alive",
                    "must be whole seconds, at most 65535s (\"0s\": no cap)",
                ));
            }
            if m.enabled {
                max_keep_alive = u16::try_from(secs).ok();
            }
        }
        if m.unavailable_answer {
            positive("mqtt.unavailable_timeout", m.unavailable_timeout)?;
        }
        if !(23..=65_535).contains(&m.client_id_max_len) {
            return Err(ConfigError::new(
                "mqtt.client_id_max_len",
                "must be between 23 (every server accepts 1 to 23 characters) and 65535",
            ));
        }
        at_least("mqtt.packet_rate.per_second", m.packet_rate.per_second, 1)?;
        at_least("mqtt.packet_rate.burst", m.packet_rate.burst, 1)?;

        // Own ranges, whatever circuit_breaker.enabled and failure_rate.enabled say.
        let cb = &self.circuit_breaker;
        if cb.consecutive_failures == 0 && !cb.failure_rate.enabled {
            return Err(ConfigError::new(
                "circuit_breaker.consecutive_failures",
                "must be at least 1 (0 turns it off, allowed only with circuit_breaker.failure_rate.enabled = true)",
            ));
        }
        positive("circuit_breaker.open_for", cb.open_for)?;
        at_least("circuit_breaker.half_open_permits", cb.half_open_permits, 1)?;
        at_least("circuit_breaker.success_threshold", cb.success_threshold, 1)?;
        let fr = &cb.failure_rate;
        if !(fr.ratio > 0.0 && fr.ratio <= 1.0) {
            return Err(ConfigError::new(
                "circuit_breaker.failure_rate.ratio",
                "must be in (0, 1]",
            ));
        }
        at_least("circuit_breaker.failure_rate.window", fr.window, 1)?;
        at_most(
            "circuit_breaker.failure_rate.window",
            fr.window,
            aegis_layers::circuit_breaker::MAX_WINDOW as u64,
        )?;
        if fr.min_calls == 0 || fr.min_calls > fr.window {
            return Err(ConfigError::new(
                "circuit_breaker.failure_rate.min_calls",
                "must be between 1 and circuit_breaker.failure_rate.window",
            ));
        }

        let a = &self.adaptive;
        // Own ranges, whatever adaptive.enabled says.
        positive("adaptive.threshold", a.threshold)?;
        at_least("adaptive.min_rate", a.min_rate, 1)?;
        if a.max_rate < a.min_rate {
            return Err(ConfigError::new(
                "adaptive.max_rate",
                "must be at least adaptive.min_rate",
            ));
        }
        // The controller's task wakes once an interval: a nanosecond would have it
        // spin.
        if a.interval < MIN_ADAPTIVE_INTERVAL {
            return Err(ConfigError::new(
                "adaptive.interval",
                format!(
                    "must be at least {}",
                    humantime::format_duration(MIN_ADAPTIVE_INTERVAL)
                ),
            ));
        }
        at_least("adaptive.min_samples", a.min_samples, 1)?;
        if !(a.reduction > 0.0 && a.reduction < 1.0) {
            return Err(ConfigError::new("adaptive.reduction", "must be in (0, 1)"));
        }
        if !(a.recovery > 1.0 && a.recovery.is_finite()) {
            return Err(ConfigError::new(
                "adaptive.recovery",
                "must be greater than 1",
            ));
        }
        // Only while the controller is on: relate it to [limits] and to the timeout
        // whose samples it watches (which of them depends on mqtt.enabled).
        if a.enabled {
            if !l.enabled {
                return Err(ConfigError::new(
                    "adaptive.enabled",
                    "needs limits.enabled = true: the controller drives the rate limiter",
                ));
            }
            // A timed-out call is a sample of the timeout's length (the CONNACK timeout
            // with the MQTT layer, the upstream connect timeout without it): a threshold
            // at or above it could never be crossed by a stalled upstream, the samples
            // stopping there.
            let (timeout, key) = if self.mqtt.enabled {
                (self.mqtt.connack_timeout, "mqtt.connack_timeout")
            } else {
                (
                    s.upstream_connect_timeout,
                    "server.upstream_connect_timeout",
                )
            };
            if !timeout.is_zero() && a.threshold >= timeout {
                return Err(ConfigError::new(
                    "adaptive.threshold",
                    format!(
                        "must be shorter than {key} ({}): a stalled upstream's samples are \
                         that timeout",
                        humantime::format_duration(timeout)
                    ),
                ));
            }
        }

        // Own ranges, whatever security.enabled says.
        let sec = &self.security;
        at_most("security.events", sec.events, 100_000)?;
        positive("security.window", sec.window)?;
        positive("security.ban_for", sec.ban_for)?;
        positive("security.bans_save_every", sec.bans_save_every)?;
        if sec.bans_save_every > Duration::from_secs(86_400) {
            return Err(ConfigError::new(
                "security.bans_save_every",
                "must be at most a day (1d)",
            ));
        }
        at_least("security.max_tracked", sec.max_tracked, 1)?;
        at_least("security.max_bans", sec.max_bans, 1)?;

        // auth.url is parsed and checked where the layer is built (`stack::auth`).
        let au = &self.auth;
        if au.kind == AuthKind::File && au.file.is_empty() {
            return Err(ConfigError::new(
                "auth.file",
                "must name a file of username:argon2-hash lines when auth.kind = \"file\"",
            ));
        }
        // Own range, whatever auth.kind says. Not bound by mqtt.connack_timeout: the
        // CONNACK clock restarts when the callout allows the CONNECT.
        positive("auth.timeout", au.timeout)?;
        at_least("auth.max_checks_per_addr", au.max_checks_per_addr, 1)?;
        at_most(
            "auth.max_checks_per_addr",
            au.max_checks_per_addr,
            MAX_AUTH_CHECKS_PER_ADDR,
        )?;
        // Only with an authenticator: relates it to the MQTT layer.
        if au.kind != AuthKind::None && !self.mqtt.enabled {
            return Err(ConfigError::new(
                "auth.kind",
                "needs mqtt.enabled = true (the credentials are in the CONNECT)",
            ));
        }

        let ins = &self.inspect;
        // Own ranges and rules, whatever inspect.enabled says: the rules are compiled
        // either way. Applied only while inspect is on, behind the MQTT layer (the
        // start-up line lists it when it is); a bad rule is an error all the same.
        let compiled = inspector(ins)?;
        let inspector = (ins.enabled && self.mqtt.enabled).then_some(compiled);

        // Own value, whatever security.enabled says (a start with the layer off ignores
        // the file, with a warning): read last, as a start reads it, so that `--check`
        // refuses a file or a directory that would stop the start or lose the bans.
        let bans = match self.security.bans_file.as_str() {
            "" => None,
            path => crate::bans_file::read(std::path::Path::new(path), self.security.max_bans)
                .map_err(|why| ConfigError::new("security.bans_file", format!("{path}: {why}")))?,
        };

        Ok(Settings {
            listen,
            upstream,
            metrics_listen,
            trusted,
            exempt,
            deny,
            global,
            per_ip,
            policy,
            max_keep_alive,
            inspector,
            auth: crate::stack::auth(
                &self.auth,
                aegis_layers::rate_limit::KeyBy::new(
                    self.limits.ipv4_prefix,
                    self.limits.ipv6_prefix,
                ),
            )?,
            bans,
            raw: self,
        })
    }
}

/// Compiles `[inspect]`; a bad rule names its key.
fn inspector(ins: &Inspect) -> Result<Inspector, ConfigError> {
    let mut b = Inspector::builder();
    match ins.default_rules {
        DefaultRules::Off => {}
        DefaultRules::Flag => b = b.default_rules_as(Action::Flag),
        DefaultRules::Block => b = b.default_rules_as(Action::Block),
    }
    if ins.max_payload > 0 {
        b = b.max_payload(ins.max_payload, ins.max_payload_action, Severity::Medium);
    }
    if ins.entropy_threshold != 0.0 {
        if !(ins.entropy_threshold > 0.0 && ins.entropy_threshold <= 8.0) {
            return Err(ConfigError::new(
                "inspect.entropy_threshold",
                "must be in (0, 8] bits per byte (0: off)",
            ));
        }
        at_least("inspect.entropy_min_len", ins.entropy_min_len, 1)?;
        b = b.entropy(
            ins.entropy_threshold,
            ins.entropy_min_len,
            ins.entropy_action,
            Severity::Medium,
        );
    }
    for r in &ins.rules {
        b = b.pattern(&r.name, &r.pattern, r.action, r.severity);
    }
    for (i, t) in ins.topics.iter().enumerate() {
        use aegis_mqtt::inspect::{ClientMatch, TopicRule};
        let client = match (&t.client_id, &t.username) {
            (None, None) => ClientMatch::Any,
            (Some(id), None) => ClientMatch::client_id(id),
            (None, Some(user)) => ClientMatch::username(user),
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    format!("inspect.topics[{i}]"),
                    "set client_id or username, not both",
                ));
            }
        };
        let mut rule = TopicRule::new(client).action(t.action).severity(t.severity);
        for f in &t.allow {
            rule = rule.allow(f);
        }
        for f in &t.deny {
            rule = rule.deny(f);
        }
        b = b.topics(rule);
    }
    b.build()
        .map_err(|e| ConfigError::new(inspect_key(ins, &e), e.to_string()))
}

/// The `[inspect]` key of the rule an `InspectError` names, found from the error rather
/// than by compiling every rule a second time at start-up.
fn inspect_key(ins: &Inspect, e: &InspectError) -> String {
    let rule = |i: usize| format!("inspect.rules[{i}]");
    match e {
        InspectError::Pattern { rule: name, .. } => {
            // Of the rules with that name, the first whose pattern fails alone (only on
            // this error path is a pattern compiled twice).
            let mut named = ins
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| &r.name == name);
            let first = named.clone().next().map(|(i, _)| i);
            named
                .find(|(_, r)| {
                    Inspector::builder()
                        .pattern(&r.name, &r.pattern, r.action, r.severity)
                        .build()
                        .is_err()
                })
                .map(|(i, _)| i)
                .or(first)
                .map_or_else(|| "inspect".to_owned(), rule)
        }
        InspectError::EmptyName => ins
            .rules
            .iter()
            .position(|r| r.name.is_empty())
            .map_or_else(|| "inspect".to_owned(), rule),
        InspectError::TopicFilter { filter, .. } => ins
            .topics
            .iter()
            .position(|t| t.allow.contains(filter) || t.deny.contains(filter))
            .map_or_else(|| "inspect".to_owned(), |i| format!("inspect.topics[{i}]")),
        _ => "inspect".to_owned(),
    }
}

/// A TOML error on one line: its message and where it is, without the source snippet.
fn one_line(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim_end().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{msg} (line {line})")
        }
        None => msg,
    }
}

/// An address: `IP:port`, or `host:port` resolved once at start-up, of whose addresses
/// only the first the resolver answers is kept (`CONFIG.md`, "Addresses").
fn resolve(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            ConfigError::new(
                key,
                format!("{value:?} is not an address like \"127.0.0.1:1883\""),
            )
        })
}

/// Whether a connect to `upstream` reaches the gateway's own listener at `listen`: on
/// the same port, at the same address, or at a loopback one while `listen` is a
/// wildcard (`0.0.0.0` takes IPv4 connects, `[::]` those of both families, as Linux
/// binds it by default). A wildcard upstream counts as the loopback address of its
/// family, where a connect to `0.0.0.0` or `[::]` goes. Other local addresses a wildcard
/// `listen` takes are not looked for: the host's interfaces are not enumerated.
fn is_own_listener(listen: SocketAddr, upstream: SocketAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    if listen.port() != upstream.port() || listen.port() == 0 {
        return false;
    }
    let up = match upstream.ip().to_canonical() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let listen = listen.ip().to_canonical();
    listen == up
        || (listen.is_unspecified() && up.is_loopback() && (listen.is_ipv6() || up.is_ipv4()))
}

/// A secret of the configuration: read as a string, printed by `--check` as `"(set)"`
/// (or `""` when unset), and by `Debug` as `Secret(..)`, so that no log or dump of the
/// configuration shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub(crate) struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that checks it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "(set)" })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The text of the regular file at `path`, if it holds at most `max` bytes. Anything
/// but a regular file is refused before it is opened (opening a FIFO would wait for a
/// writer); a longer file is an error, read no further than `max + 1` bytes.
pub(crate) fn read_bounded(path: &std::path::Path, max: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read as _};
    if !std::fs::metadata(path)?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("longer than {max} bytes"),
        ));
    }
    Ok(text)
}

/// The largest `security.deny_file` read.
const MAX_DENY_FILE: u64 = 64 << 20;

/// The networks of `security.deny_file`: one per line, in CIDR notation or a bare address
/// (one address), as blocklists are written; blank lines and what follows `#` or `;` are
/// skipped. The error names the line that is neither.
fn deny_file(path: &str) -> Result<Vec<ClientKey>, ConfigError> {
    let err = |why: String| ConfigError::new("security.deny_file", format!("{path}: {why}"));
    let text =
        read_bounded(std::path::Path::new(path), MAX_DENY_FILE).map_err(|e| err(e.to_string()))?;
    let mut nets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split(['#', ';']).next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let net = entry
            .parse::<ClientKey>()
            .ok()
            .or_else(|| entry.parse::<std::net::IpAddr>().ok().map(ClientKey::host));
        match net {
            Some(net) => nets.push(net),
            None => {
                return Err(err(format!(
                    "line {}: {entry:?} is not a network like \"10.0.0.0/8\" or an address",
                    i + 1
                )));
            }
        }
    }
    Ok(nets)
}

/// The networks in CIDR notation listed at `key`; the error names the one that is not.
fn networks<N: std::str::FromStr>(key: &str, list: &[String]) -> Result<Vec<N>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, net)| {
            net.parse().map_err(|_| {
                ConfigError::new(
                    format!("{key}[{i}]"),
                    format!("{net:?} is not a network like \"10.0.0.0/8\" or \"::1/128\""),
                )
            })
        })
        .collect()
}

/// The longest duration a key takes: a year (humantime's `"1y"`, 365.25 days). Far
/// longer ones overflow: tokio's `Instant + Duration` panics, and so does governor past
/// 584 years, naming no key.
const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// The longest clock of a connection's start (connect, header, handshake, CONNACK and
/// authentication timeouts) and of the adaptive controller: an hour, far beyond any
/// useful value.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The longest a rate tier takes to refill its whole burst (its interval times
/// `burst`): the rate limiter's bound, about 146 years (past it, the limiter would
/// clamp the burst; governor's arithmetic overflows past 584 years, and sums of a
/// client's state and one packet's cells past half that).
const MAX_REFILL: Duration = aegis_layers::rate_limit::MAX_BURST_REFILL;

/// [`MAX_REFILL`] in whole years of 365.25 days, for messages.
const MAX_REFILL_YEARS: u64 = MAX_REFILL.as_secs() / MAX_DURATION.as_secs();

/// The most `auth.max_checks_per_addr`: far more than any client needs in flight, yet a
/// bound on one address's share of the authenticator's queue.
const MAX_AUTH_CHECKS_PER_ADDR: u64 = 1_000;

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(ConfigError::new(key, "must be longer than 0s"))
    } else {
        Ok(())
    }
}

fn at_most(key: &str, value: impl TryInto<u64>, max: u64) -> Result<(), ConfigError> {
    let value = value.try_into().unwrap_or(u64::MAX);
    if value > max {
        Err(ConfigError::new(key, format!("must be at most {max}")))
    } else {
        Ok(())
    }
}

fn at_least(key: &str, value: impl TryInto<u64>, min: u64) -> Result<(), ConfigError> {
    let value = value.try_into().unwrap_or(u64::MAX);
    if value < min {
        Err(ConfigError::new(key, format!("must be at least {min}")))
    } else {
        Ok(())
    }
}

/// A rate tier's quota, `None` when the tier is off; its rate and burst are checked
/// either way.
fn tier(key: &str, t: &RateTier) -> Result<Option<Quota>, ConfigError> {
    let Some(burst) = NonZeroU32::new(t.burst) else {
        return Err(ConfigError::new(
            format!("{key}.burst"),
            "must be at least 1",
        ));
    };
    let period = parse_rate(&t.rate).map_err(|m| ConfigError::new(format!("{key}.rate"), m))?;
    if period
        .checked_mul(burst.get())
        .is_none_or(|refill| refill > MAX_REFILL)
    {
        return Err(ConfigError::new(
            format!("{key}.rate"),
            format!(
                "{:?} with burst {burst} takes over {MAX_REFILL_YEARS} years to refill (its interval times burst)",
                t.rate
            ),
        ));
    }
    let quota = Quota::with_period(period).ok_or_else(|| {
        ConfigError::new(
            format!("{key}.rate"),
            "must be slower than 1 per nanosecond",
        )
    })?;
    Ok(t.enabled.then(|| quota.allow_burst(burst)))
}

/// `"N/s"`, `"N/m"`, `"N/h"` or `"N/<humantime>"` into the interval between two
/// connections.
pub(crate) fn parse_rate(rate: &str) -> Result<Duration, String> {
    let bad = || format!("{rate:?} is not a rate like \"5/s\", \"100/m\" or \"1/10s\"");
    let (n, per) = rate.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    if n == 0 {
        return Err("the count must be at least 1".into());
    }
    let per = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => parse_duration(other).map_err(|_| bad())?,
    };
    if per.is_zero() {
        return Err(bad());
    }
    Ok(per / n)
}
