//! Security events, anomaly detection and bans.
//!
//! A [`Security`] is one shared, cheap-to-clone handle over three things:
//!
//! - a **ban table**: client addresses, CONNECT usernames and client ids, each banned
//!   until a deadline, listed, added and lifted at run time through the handle
//!   ([`Security::bans`], [`Security::ban`], [`Security::unban`]);
//! - an **anomaly detector** (after EMQX's flapping detection): per client address,
//!   username and client id, fixed windows of [`window`](SecurityBuilder::window) that
//!   count connects, authentication failures and rejections (blocked messages count as
//!   rejections). A key over a threshold is banned for
//!   [`ban_for`](SecurityBuilder::ban_for), a `ban` event is emitted and its window starts
//!   again. Every threshold is off by default;
//! - a **security event log**: every rejection, block, flag, ban and authentication
//!   failure becomes an [`Event`], emitted through `tracing` and kept in a bounded ring
//!   ([`Security::events`]) that an operator endpoint can serve as JSON (each `Event`
//!   and [`Ban`] is `serde::Serialize`).
//!
//! [`SecurityLayer`] puts a `Security` in front of a byte-stream service. For each
//! connection it:
//!
//! 1. refuses an address of the [deny list](SecurityBuilder::deny) at once, before
//!    anything is read, with [`SecurityError::Denied`] (counted, not logged), and a
//!    banned client address at once, before anything is read: the stream is
//!    dropped (which closes it), the error is [`SecurityError::Banned`]
//!    (`aegis_rejections_total{layer="security", reason="banned"}`) and a `rejection`
//!    event with rule `banned` is logged: at most one a second per ban, the next one
//!    saying how many refusals went unlogged, so that a banned client reconnecting in a
//!    loop cannot push every other event out of the log (each refusal is still counted);
//! 2. counts a connect for the address; a connect that crosses
//!    [`max_connects`](SecurityBuilder::max_connects) bans the address and is refused
//!    too;
//! 3. runs the inner service inside the connection's security context (a tokio
//!    task-local): the MQTT layer's CONNECT check refuses a banned client id or username
//!    (MQTT 3.x: CONNACK `20 02 00 05`, 5.0: `20 03 00 8A 00`), and the layers inside
//!    (the MQTT layer, authentication, inspection) report their events with the
//!    connection's address, client id and username;
//! 4. when the inner service fails with a rejection that no layer inside reported itself
//!    (`mqtt`'s `malformed`, a rate limit's refusal, ...), logs a `rejection` event whose
//!    rule is the reason label and counts it toward the detector, for the address and
//!    the client id and username when known. Errors that are not rejections (IO errors,
//!    a broker that cannot be reached) are not events.
//!
//! Refusals that are not the client's doing (`server_unavailable`, `connack_timeout`,
//! `upstream_closed`: the broker closed the connection before its CONNACK,
//! `server_busy`, `auth_error`: the authenticator could not decide; any refusal of the
//! `circuit_breaker` layer: its circuit is open; the `rate_limit` layer's `global`
//! tier, which every client shares; its `overflow`, the shared bucket every client
//! beyond its `max_keys` is limited in, which others' flood drains (and likewise the
//! MQTT policy's `connect_overflow` and `message_overflow`); and its
//! `per_client` tier with
//! [`count_per_client_rate(false)`](SecurityBuilder::count_per_client_rate), when an
//! adaptive controller sets that rate for the broker's sake) are logged with severity
//! `low` but never counted
//! toward the detector: a broker or authenticator outage, or a flood from others, must
//! not ban every client. So is `auth_timeout`, an MQTT 5 enhanced authentication that
//! ended in no CONNACK in time: the client may have stalled it, or the broker, and the
//! gateway cannot tell which (it is not counted as a broker failure either). So is the
//! `sniff` layer's `eof` and `io`: a connection closed or reset before its first bytes
//! were classified (a TCP health check that connects and closes, behind the same NAT as
//! real clients), which the MQTT layer, without the sniffer, sees as an IO error, no
//! rejection at all. For the
//! same reason an `auth_failure` event whose rule says
//! the authenticator failed (`timeout`, `unavailable`, `status`, `invalid`, `failed`) is
//! logged but not counted; only a denial (rule `denied`) counts as an authentication
//! failure, and so does the auth layer's `too_many_checks` (an address with more
//! checks in flight than the auth layer's `max_checks_per_addr`: a flood of new
//! credentials, the client's doing). A denial is the auth layer's (`aegis_mqtt::auth`, layer `auth`), or the broker's
//! own: its CONNACK refusing the client's login (3.x return code 4 or 5, 5.0 reason
//! code 0x86, 0x87 or 0x8C), reported by the MQTT layer (layer `mqtt`), so that a
//! brute force through a gateway that leaves authentication to the broker counts too
//! (see [the MQTT layer](crate::layer)).
//!
//! # Where it goes
//!
//! The `SecurityLayer` must sit **outside the MQTT layer** (whose CONNECT check and
//! rejections need its context) and **inside any PROXY-protocol layer**, so that the
//! client address it bans and counts is the real client's, not the load balancer's:
//!
//! ```text
//! ServiceBuilder::new()
//!     .layer(ProxyProtocolLayer::...)          // the real client address, first
//!     .layer(SecurityLayer::new(sec.clone()))  // address bans: before any MQTT parsing
//!     .layer(MqttLayer::new(config))           // client id and username bans, at CONNECT
//!     .service(proxy)
//! ```
//!
//! Refusals at the CONNECT under a client id or username ban are logged at most once a
//! second per ban in the same way, the next event saying how many went unlogged
//! (details `banned (4 more refusals in the last 1s not logged)`).
//!
//! A ban, by the detector or through the handle, also **closes the open connections it
//! matches** (as EMQX kicks a banned client): those from the banned address, and those
//! whose CONNECT gave the banned client id or username. Each is ended as soon as its task
//! runs, its stream and its broker connection dropped (closed), with the error
//! [`SecurityError::ClosedByBan`]
//! (`aegis_rejections_total{layer="security", reason="closed_by_ban"}`), and the `ban`
//! event says how many it closed. The connection whose own CONNECT or denied login
//! crossed a threshold is not closed but answered, by its CONNACK refusal; one whose
//! blocked messages did is closed with the others. An address ban closes every session
//! from its network, all the clients behind one NAT included, and an IPv6 one every
//! session from its /64 by default (one subscriber's network, a whole LAN of devices
//! with their own addresses; see [Client networks](#client-networks)): keep the
//! detector to the keys you trust
//! ([`ban_by`](SecurityBuilder::ban_by)). A ban costs one pass over
//! the open connections, under a lock that a connection also takes when it starts and
//! when it ends: about 2.5 ns per open connection for an address ban (23 us with 9,000
//! open, `cargo bench -p benches --bench security`). Each open connection costs a slot
//! among them. [`close_on_ban(false)`](SecurityBuilder::close_on_ban) leaves open
//! connections alone.
//!
//! New connections are refused as before: address bans apply before the first byte is
//! read; username and client id bans apply at the CONNECT (those keys are not known
//! before).
//!
//! Usernames and client ids are the client's own claims, checked before any
//! authentication: a client could get someone else's username banned by failing to log
//! in with it. So the detector counts and bans client addresses only by default;
//! [`ban_by`](SecurityBuilder::ban_by) adds usernames and client ids, with that risk.
//! Manual bans of any key apply either way. An empty client id (which MQTT lets the
//! broker assign) is never counted by the detector.
//!
//! Usernames and client ids are keyed **byte for byte**, as the CONNECT gave them: no
//! case folding, no Unicode normalization. An authenticator that folds case (LDAP,
//! Active Directory) takes `Admin`, `admin` and `aDmin` for one account, but they are
//! three keys here: a brute force of that account that varies the case of its username
//! is counted as one account per spelling (so it takes a threshold per spelling), and a
//! ban of `admin` refuses neither `Admin` nor its sessions. Count client addresses too
//! (the default) against such an attacker.
//!
//! A key banned again: a ban through the handle ([`Security::ban`]) replaces the key's
//! ban in force, whatever either's end (the operator's word is the last, a shorter ban
//! included). A detector's ban never shortens it, nor turns a ban by hand into a
//! detector's (which a full table evicts first, see [Bounds](#bounds)): it lengthens
//! the ban when it ends later, a ban by hand staying `manual`, and otherwise changes
//! nothing (no `ban` event, nothing counted in `aegis_security_bans_total`). So an
//! address banned by hand for a week, whose open sessions
//! ([`close_on_ban(false)`](SecurityBuilder::close_on_ban)) go on crossing a threshold,
//! stays banned for the week.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! use std::time::Duration;
//! use aegis_core::Conn;
//! use aegis_mqtt::Config;
//! use aegis_mqtt::layer::{MqttIo, MqttLayer};
//! use aegis_mqtt::security::{BanKey, Security, SecurityLayer};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! let sec = Security::builder()
//!     .max_connects(20) // more than 20 connects a minute from one address: a 5 min ban
//!     .build();
//! // An operator bans a client id at run time.
//! sec.ban(BanKey::client_id("thermostat-7"), Duration::from_secs(600));
//! assert!(sec.is_banned(&BanKey::client_id("thermostat-7")));
//!
//! let broker = service_fn(|_: MqttIo<Conn<DuplexStream>>| async { Ok::<_, std::io::Error>(()) });
//! let svc = SecurityLayer::new(sec.clone()).layer(MqttLayer::new(Config::new()).layer(broker));
//!
//! let (mut client, server) = tokio::io::duplex(1024);
//! let io = Conn::new(server, "192.0.2.1:4000".parse()?, "127.0.0.1:1883".parse()?);
//! let conn = tokio::spawn(svc.oneshot(io));
//! // A 3.1.1 CONNECT with client id "thermostat-7".
//! let mut connect = vec![0x10, 0x18, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 12];
//! connect.extend_from_slice(b"thermostat-7");
//! client.write_all(&connect).await?;
//! let mut answer = Vec::new();
//! client.read_to_end(&mut answer).await?;
//! assert_eq!(answer, [0x20, 0x02, 0x00, 0x05]); // CONNACK: not authorized
//! let err = conn.await?.unwrap_err();
//! assert_eq!(aegis_core::error::label_of(&*err), ("mqtt", "banned"));
//!
//! // The event log has the ban and the refusal, newest last.
//! let events = sec.events(10);
//! assert_eq!(events.len(), 2);
//! assert_eq!(events[1].rule.as_deref(), Some("banned"));
//! assert_eq!(events[1].client_id.as_deref(), Some("thermostat-7"));
//! # Ok(())
//! # }
//! ```
//!
//! # Events
//!
//! Each [`Event`] serializes (serde) to one JSON object with always the same ten fields:
//!
//! | Field | Type | Meaning |
//! |---|---|---|
//! | `seq` | number | 1 for the first event of this `Security`, then one more each time |
//! | `time` | string | RFC 3339 UTC with milliseconds, e.g. `"2026-11-26T01:02:03.456Z"` |
//! | `layer` | string | the reporting layer: `security`, `mqtt`, `auth`, `inspect`, ... |
//! | `kind` | string | `rejection`, `block`, `flag`, `ban` or `auth_failure` |
//! | `severity` | string | `low`, `medium`, `high` or `critical` |
//! | `client_addr` | string or null | the effective client address, `"192.0.2.1:4000"` |
//! | `client_id` | string or null | the CONNECT's client id, once read (raw text, JSON-escaped) |
//! | `username` | string or null | the CONNECT's username, if any |
//! | `rule` | string or null | a rejection's reason label, an inspection rule's name, or a ban's cause (`connects`, `auth_failures`, `rejections`, `manual`) |
//! | `details` | string | a description, at most 256 bytes, control characters escaped |
//!
//! Client ids, usernames and rule names are cut to 256 bytes.
//! [`Security::events`] returns the latest events **oldest first** (newest last); the log
//! keeps [`events_capacity`](SecurityBuilder::events_capacity) events (1024 by default)
//! and drops the oldest. At most [`EVENTS_PER_SECOND`] events of one kind (the same
//! `layer`, `kind` and `rule`) a second are kept and logged; the others are counted in
//! `aegis_security_events_total` and `aegis_security_events_suppressed_total`, and the
//! next one kept says in its `details` how many were left out. So a flood of one kind
//! (an attacker's malformed packets, every device reconnecting while the broker is
//! down) neither writes a log line per connection nor pushes the other events out of
//! the log.
//!
//! Every event is also a `tracing` event with target `aegis::security` and message
//! `security event`, at `INFO` for severities `low` and `medium` and at `WARN` for `high`
//! and `critical`, with the fields `seq`, `kind`, `layer`, `severity`, `client_addr`,
//! `client_id` and `username` (Debug-quoted: they are the client's own text; absent when
//! unknown), `rule` (absent when none) and `details`.
//!
//! A rejection is logged as severity `medium`, or `high` for `banned`. A ban event is
//! `high`; its `client_addr`, `client_id` and `username` are those of the connection that
//! crossed the threshold (none for a ban through the handle).
//!
//! # Metrics
//!
//! | Metric | Type | Labels |
//! |---|---|---|
//! | `aegis_security_events_total` | counter | `kind`, `layer`, `severity` |
//! | `aegis_security_bans` | gauge | (the bans in force, set when the table changes) |
//! | `aegis_security_bans_total` | counter | `key` (`addr`, `username`, `client_id`), `cause` (`connects`, `auth_failures`, `rejections`, `manual`) |
//! | `aegis_security_untracked_total` | counter | (keys the full detector could not count) |
//! | `aegis_security_bans_evicted_total` | counter | (bans pushed out of the full table before their end) |
//! | `aegis_security_events_suppressed_total` | counter | (events over their kind's rate: counted, not kept or logged) |
//!
//! Refusals are also counted by `aegis_rejections_total{layer, reason}` as everywhere;
//! an open connection a ban closes as `{layer="security", reason="closed_by_ban"}`.
//!
//! # Bounds
//!
//! - The ban table holds at most [`max_bans`](SecurityBuilder::max_bans) bans (100,000 by
//!   default). Ended bans vanish (they are dropped as the table is used, in `O(log n)`
//!   each); when the table is full, a new ban evicts **the ban that ends soonest**
//!   (`aegis_security_bans_evicted_total`), but a ban by hand only for another ban by
//!   hand: a detector's ban that finds the table full of them is not put in place. So an
//!   attacker who earns bans from many addresses on purpose can push out detector bans
//!   (their own earlier ones too), never an operator's; size `max_bans` for the
//!   addresses you expect to ban. [`Security::bans`] lists them all: it holds the
//!   table's lock (which each connection's ban check takes) only to copy them, sorts
//!   them after, and is best called off the async runtime (`spawn_blocking`) on a large
//!   table.
//! - The detector tracks at most [`max_tracked`](SecurityBuilder::max_tracked) keys
//!   (100,000 by default) of each class: IPv4 networks, IPv6 networks, names (client
//!   ids and usernames); it only tracks keys for thresholds that are set. When a class
//!   is full it drops its keys whose window ended, at most once a second (so a full
//!   detector costs no `O(n)` scan per connection); when it is still full, new keys of
//!   that class are not tracked (`aegis_security_untracked_total`) until room is made.
//!   The classes are apart so that keys that cost an attacker nothing (IPv6 /64s out of
//!   one allocation, names) cannot leave a new IPv4 address uncounted.
//! - The event log holds at most `events_capacity` events, each bounded as above.
//! - The open connections a ban closes are kept one slot each (their context, which
//!   the connection holds anyway), as many as the accept loop serves at once.
//!
//! # Client networks
//!
//! The detector counts, and bans, each client address as its network by
//! [`key_by`](SecurityBuilder::key_by): IPv4 by /32 and IPv6 by /64 by default, as the
//! rate limiter keys clients. So every address of a /64 is counted together, and a ban
//! refuses and closes them together. An IPv6 address that carries its client's IPv4
//! address (IPv4-mapped, 6to4 in `2002::/16`, Teredo in `2001::/32`, NAT64 in
//! `64:ff9b::/96`) is keyed as that IPv4 address: a 6to4 site cannot rotate its 65,536
//! subnets past the detector, the Teredo clients of one server, or the IPv4 clients
//! behind one translator, are not banned together for one of them, and a ban of
//! such a client's key also refuses it over IPv4, and from any of its subnets (see
//! [IPv4 clients in IPv6 addresses](aegis_core::ClientKey#ipv4-clients-in-ipv6-addresses)).
//! A ban through the handle can be of any network ([`BanKey::Addr`] holds an
//! [`aegis_core::ClientKey`]): a connection is refused, and closed, when any ban holds
//! its address ([`ClientKey::contains`]: an IPv4 network holds the 6to4, Teredo and
//! NAT64 addresses that carry an address in it). Connections from
//! [`exempt`](SecurityBuilder::exempt) networks (your own health checks, an office's
//! NAT) count toward no ban.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime};

use aegis_core::NetMap;
use aegis_core::error::{Reject, Rejected, find};
use atomic_waker::AtomicWaker;
use parking_lot::Mutex;
use slab::Slab;
use tokio::time::Instant;

use crate::layer::SharedId;
use crate::{Connect, MqttError};

mod bans;
mod error;
mod events;
mod future;
mod layer;
mod service;

pub use self::bans::{Ban, BanKey, BanKeys, MAX_BAN};
use self::bans::{
    BanTable, Cause, Detector, Inserted, REFUSAL_EVENT_EVERY, Recorded, Refusal, Thresholds,
};
pub use self::error::SecurityError;
pub use self::events::{EVENTS_PER_SECOND, Event};
use self::events::{EventLog, MAX_NAME, bounded};
pub use self::future::ResponseFuture;
pub use self::layer::SecurityLayer;
pub use self::service::SecurityService;
/// Client networks, as [`BanKey::Addr`] holds them and [`SecurityBuilder::key_by`] makes
/// them (from `aegis_core`, where the rate limiter's come from too).
pub use aegis_core::{ClientKey, KeyBy};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// A connection refused by a layer.
    Rejection,
    /// A message blocked by an inspection rule.
    Block,
    /// A message flagged (and forwarded) by an inspection rule.
    Flag,
    /// A ban was put in place.
    Ban,
    /// An authenticator denied a CONNECT, or could not decide.
    AuthFailure,
}

impl EventKind {
    /// The kind as in the JSON and the `kind` metric label: `rejection`, `block`, `flag`,
    /// `ban` or `auth_failure`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Rejection => "rejection",
            Self::Block => "block",
            Self::Flag => "flag",
            Self::Ban => "ban",
            Self::AuthFailure => "auth_failure",
        }
    }
}

/// How bad it is.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Likely abuse.
    #[default]
    Medium,
    /// Abuse.
    High,
    /// An attack.
    Critical,
}

impl Severity {
    /// The severity as in the JSON and the `severity` metric label: `low`, `medium`,
    /// `high` or `critical`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// A security event reported from inside a connection; the connection's client address
/// and ids are added by [`report`].
#[derive(Debug)]
pub(crate) struct Report<'a> {
    pub(crate) layer: &'static str,
    pub(crate) kind: EventKind,
    pub(crate) severity: Severity,
    /// The rule that decided (an inspection rule's name, a rejection's reason).
    pub(crate) rule: Option<&'a str>,
    pub(crate) details: String,
}

/// Emits `report` for the current connection through the `Security` of the
/// `SecurityLayer` it runs under (a no-op outside one): a `tracing` event, the bounded
/// log, and, for auth failures, blocks and rejections, the anomaly detector.
#[allow(dead_code)] // called by the features that report events (auth, inspect)
pub(crate) fn report(report: Report<'_>) {
    let _ = CTX.try_with(|ctx| ctx.report(report));
}

/// Marks the current connection's end as reported (the `SecurityLayer` does not report
/// its rejection again).
#[allow(dead_code)] // called by the features that report events (auth, inspect)
pub(crate) fn mark_reported() {
    let _ = CTX.try_with(|ctx| ctx.reported.store(true, Ordering::Relaxed));
}

/// Called by the MQTT layer with each accepted CONNECT: records the client id and
/// username for the connection's later events, counts the CONNECT toward the detector,
/// and refuses a banned client address, client id or username ([`MqttError::Banned`]).
pub(crate) fn on_connect(connect: &Connect<'_>, id: &mut SharedId<'_>) -> Result<(), MqttError> {
    CTX.try_with(|ctx| ctx.on_connect(connect, id))
        .unwrap_or(Ok(()))
}

tokio::task_local! {
    /// The security context of the connection being served.
    static CTX: Arc<ConnCtx>;
}

/// The metric names of the security module (see the [module docs](self#metrics)).
pub mod metrics {
    use super::Event;

    /// `aegis_security_events_total{kind, layer, severity}`: security events.
    pub const EVENTS_TOTAL: &str = "aegis_security_events_total";
    /// `aegis_security_bans`: the bans in force.
    pub const BANS: &str = "aegis_security_bans";
    /// `aegis_security_bans_total{key, cause}`: bans put in place.
    pub const BANS_TOTAL: &str = "aegis_security_bans_total";
    /// `aegis_security_untracked_total`: counts the full detector could not make.
    pub const UNTRACKED_TOTAL: &str = "aegis_security_untracked_total";
    /// `aegis_security_events_suppressed_total`: events over their kind's rate, counted
    /// but neither kept in the log nor logged.
    pub const EVENTS_SUPPRESSED_TOTAL: &str = "aegis_security_events_suppressed_total";
    /// `aegis_security_bans_evicted_total`: bans pushed out of the full table before
    /// their end.
    pub const BANS_EVICTED_TOTAL: &str = "aegis_security_bans_evicted_total";

    pub(super) fn event(e: &Event) {
        metrics::counter!(
            EVENTS_TOTAL,
            "kind" => e.kind.as_str(),
            "layer" => e.layer,
            "severity" => e.severity.as_str()
        )
        .increment(1);
    }

    pub(super) fn bans(len: usize) {
        metrics::gauge!(BANS).set(u32::try_from(len).map_or(f64::from(u32::MAX), f64::from));
    }

    pub(super) fn banned(key: &'static str, cause: &'static str) {
        metrics::counter!(BANS_TOTAL, "key" => key, "cause" => cause).increment(1);
    }

    pub(super) fn untracked() {
        metrics::counter!(UNTRACKED_TOTAL).increment(1);
    }

    pub(super) fn evicted() {
        metrics::counter!(BANS_EVICTED_TOTAL).increment(1);
    }

    pub(super) fn suppressed() {
        metrics::counter!(EVENTS_SUPPRESSED_TOTAL).increment(1);
    }
}

/// Configures a [`Security`]; see each method for its default.
#[derive(Debug, Clone)]
#[must_use]
pub struct SecurityBuilder {
    events_capacity: usize,
    thresholds: Thresholds,
    ban_for: Duration,
    ban_by: BanKeys,
    max_tracked: usize,
    max_bans: usize,
    close_on_ban: bool,
    count_per_client_rate: bool,
    key_by: KeyBy,
    exempt: Vec<ClientKey>,
    deny: Vec<ClientKey>,
}

impl Default for SecurityBuilder {
    fn default() -> Self {
        Self {
            events_capacity: 1024,
            thresholds: Thresholds {
                window: Duration::from_secs(60),
                connects: None,
                auth_failures: None,
                rejections: None,
            },
            ban_for: Duration::from_secs(300),
            ban_by: BanKeys::ADDR,
            max_tracked: 100_000,
            max_bans: 100_000,
            close_on_ban: true,
            count_per_client_rate: true,
            key_by: KeyBy::default(),
            exempt: Vec::new(),
            deny: Vec::new(),
        }
    }
}

impl SecurityBuilder {
    /// How the detector keys client addresses ([`KeyBy::default`]: IPv4 by /32, IPv6
    /// by /64, an IPv4-mapped, 6to4, Teredo or NAT64 address as the IPv4 address it
    /// carries, by the IPv4 prefix). A client delegated a /56 and keyed by /64 could rotate 256
    /// networks before each is counted out; `KeyBy::new(32, 56)` counts and bans it
    /// whole (and everyone else in that /56 with it).
    pub const fn key_by(mut self, key_by: KeyBy) -> Self {
        self.key_by = key_by;
        self
    }

    /// Networks the detector never counts or bans for: nothing a connection from an
    /// address in one of them does (connects, failed logins, rejections) counts toward
    /// a ban of its address, client id or username (none by default). For the clients
    /// you run yourself, such as a health check with a fixed login or an office's NAT,
    /// which one bad client behind it would get banned with everyone else; fail2ban's
    /// `ignoreip`. They are still logged, and bans still apply to them: through the
    /// handle, restored ones, a client id or username's earned elsewhere, and a
    /// network's that holds them, earned by a neighbour (an exempt `::1/128` is in the
    /// `::/64` the detector keys its neighbours by: exempt whole client networks). An
    /// IPv4 network also holds the 6to4, Teredo and NAT64 addresses that carry an
    /// address in it, which the detector keys inside it ([`ClientKey::contains`]). Looked up when
    /// the detector counts, with one hash lookup per prefix length in the list
    /// ([`NetMap`]), however long it is.
    ///
    /// ```
    /// use aegis_mqtt::security::{ClientKey, Security};
    ///
    /// let checks: ClientKey = "10.0.9.0/24".parse().unwrap();
    /// let sec = Security::builder().max_auth_failures(5).exempt([checks]).build();
    /// # let _ = sec;
    /// ```
    pub fn exempt(mut self, networks: impl IntoIterator<Item = ClientKey>) -> Self {
        self.exempt.extend(networks);
        self
    }

    /// Networks whose connections are refused at once, before anything is read, as a
    /// banned address is (none by default): a static deny list, such as a blocklist of
    /// hijacked or abusive networks. Refused with [`SecurityError::Denied`] and counted
    /// as `aegis_rejections_total{layer="security", reason="denied"}`, not logged as
    /// events (the list is known; a denied scanner that reconnects in a loop would fill
    /// the log). Not bans: not listed, not lifted, not kept in a file. Over
    /// [`exempt`](Self::exempt), which only spares from bans. An IPv4 network also
    /// holds the 6to4, Teredo and NAT64 addresses that carry an address in it
    /// ([`ClientKey::contains`]): a denied network cannot come back through a 6to4 or
    /// Teredo relay or a NAT64 translator; `2002::/16`, `2001::/32` and `64:ff9b::/96` deny
    /// every 6to4, Teredo or NAT64 client.
    /// Looked up for every connection with one hash lookup per prefix length in the
    /// list ([`NetMap`]), however long it is.
    ///
    /// ```
    /// use aegis_mqtt::security::{ClientKey, Security};
    ///
    /// let drop_list: Vec<ClientKey> = ["192.0.2.0/24", "2001:db8:bad::/48"]
    ///     .iter()
    ///     .map(|net| net.parse().unwrap())
    ///     .collect();
    /// let sec = Security::builder().deny(drop_list).build();
    /// assert!(sec.is_denied("2001:db8:bad:1::7".parse().unwrap()));
    /// // The 6to4 site at 192.0.2.1.
    /// assert!(sec.is_denied("2002:c000:201:9::1".parse().unwrap()));
    /// ```
    pub fn deny(mut self, networks: impl IntoIterator<Item = ClientKey>) -> Self {
        self.deny.extend(networks);
        self
    }

    /// How many events the log keeps (1024 by default; 0 keeps none, the events still
    /// go to `tracing` and the metrics).
    pub const fn events_capacity(mut self, events: usize) -> Self {
        self.events_capacity = events;
        self
    }

    /// The detector's window (60 s by default): each key's counts start again after it.
    pub const fn window(mut self, window: Duration) -> Self {
        self.thresholds.window = window;
        self
    }

    /// How long the detector bans a key (300 s by default).
    pub const fn ban_for(mut self, duration: Duration) -> Self {
        self.ban_for = duration;
        self
    }

    /// Bans a key with more than `n` connects in one window (off by default). Connects
    /// are counted per address by the [`SecurityLayer`], per client id and username at
    /// the CONNECT.
    pub const fn max_connects(mut self, n: u32) -> Self {
        self.thresholds.connects = Some(n);
        self
    }

    /// Bans a key with more than `n` authentication failures in one window (off by
    /// default).
    pub const fn max_auth_failures(mut self, n: u32) -> Self {
        self.thresholds.auth_failures = Some(n);
        self
    }

    /// Bans a key with more than `n` rejections (blocked messages included) in one
    /// window (off by default).
    pub const fn max_rejections(mut self, n: u32) -> Self {
        self.thresholds.rejections = Some(n);
        self
    }

    /// Which keys the detector counts and bans ([`BanKeys::ADDR`], client addresses
    /// only, by default). Bans through the handle apply whatever this says.
    ///
    /// Counting usernames or client ids ([`BanKeys::ALL`]) catches a brute force of one
    /// account from many addresses, at a price: they are the client's own claims, made
    /// before any authentication, so any client can get a victim's username or client
    /// id banned by failing with it from a few addresses (each address's own ban comes
    /// with its own threshold), and the ban closes the victim's open sessions too.
    ///
    /// Usernames and client ids are keyed byte for byte: behind an authenticator that
    /// folds case, `Admin` and `admin` are two keys (see [the module
    /// docs](crate::security#where-it-goes)).
    pub const fn ban_by(mut self, keys: BanKeys) -> Self {
        self.ban_by = keys;
        self
    }

    /// Whether the detector bans client addresses (on by default).
    pub const fn ban_by_addr(mut self, on: bool) -> Self {
        self.ban_by.addr = on;
        self
    }

    /// Whether the detector bans usernames (off by default: see [`ban_by`](Self::ban_by)).
    pub const fn ban_by_username(mut self, on: bool) -> Self {
        self.ban_by.username = on;
        self
    }

    /// Whether the detector bans client ids (off by default: see [`ban_by`](Self::ban_by)).
    pub const fn ban_by_client_id(mut self, on: bool) -> Self {
        self.ban_by.client_id = on;
        self
    }

    /// How many keys of each class (IPv4 networks, IPv6 networks, names) the detector
    /// tracks at most (100,000 by default; see [Bounds](self#bounds)).
    pub const fn max_tracked(mut self, keys: usize) -> Self {
        self.max_tracked = keys;
        self
    }

    /// How many bans the table holds at most (100,000 by default); when full, a new ban
    /// evicts the one that ends soonest, but a ban by hand only for another ban by hand
    /// (see [Bounds](self#bounds)). With 0 no ban is ever stored, and a key that crosses
    /// a threshold is not refused either.
    pub const fn max_bans(mut self, bans: usize) -> Self {
        self.max_bans = bans;
        self
    }

    /// Whether a ban also closes the open connections it matches (on by default; see
    /// the [module docs](self)). Off, a ban applies to new connections only, and open
    /// connections cost no slot.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), aegis_core::BoxError> {
    /// use std::time::Duration;
    /// use aegis_core::Conn;
    /// use aegis_mqtt::security::{BanKey, Security};
    /// use tokio::io::DuplexStream;
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// let sec = Security::builder().close_on_ban(true).build(); // the default
    /// // A service that would serve its connection for ever.
    /// let forever = service_fn(|_: Conn<DuplexStream>| {
    ///     std::future::pending::<Result<(), std::io::Error>>()
    /// });
    /// let (_client, server) = tokio::io::duplex(64);
    /// let io = Conn::new(server, "192.0.2.7:4000".parse()?, "127.0.0.1:1883".parse()?);
    /// let conn = tokio::spawn(sec.layer().layer(forever).oneshot(io));
    /// tokio::task::yield_now().await; // the connection's task runs, and waits
    /// assert_eq!(sec.open_connections(), 1);
    ///
    /// sec.ban(BanKey::addr("192.0.2.7".parse()?), Duration::from_secs(60));
    /// let err = conn.await?.unwrap_err();
    /// assert_eq!(aegis_core::error::label_of(&*err), ("security", "closed_by_ban"));
    /// assert_eq!(sec.open_connections(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub const fn close_on_ban(mut self, on: bool) -> Self {
        self.close_on_ban = on;
        self
    }

    /// Whether the rate limiter's per-client refusals (`rate_limit` / `per_client`)
    /// count toward [`max_rejections`](Self::max_rejections) (on by default: a client
    /// over its own rate is the client's doing). Off, they are logged with severity
    /// `low` and never counted, as the `global` tier's and the overflow bucket's
    /// (`overflow`) always are: for when the
    /// per-client rate is not the client's to keep, such as an adaptive controller
    /// (`aegis_layers::adaptive`) lowering it for a slow broker, which would otherwise
    /// get clients banned for the broker's state.
    ///
    /// ```
    /// use aegis_mqtt::security::Security;
    ///
    /// // The per-client rate follows the broker's latency: its refusals ban nobody.
    /// let sec = Security::builder().max_rejections(100).count_per_client_rate(false).build();
    /// # let _ = sec;
    /// ```
    pub const fn count_per_client_rate(mut self, on: bool) -> Self {
        self.count_per_client_rate = on;
        self
    }

    /// The [`Security`].
    pub fn build(self) -> Security {
        Security {
            shared: Arc::new(Shared {
                thresholds: self.thresholds,
                ban_for: self.ban_for,
                ban_by: self.ban_by,
                count_per_client_rate: self.count_per_client_rate,
                key_by: self.key_by,
                exempt: self.exempt.into_iter().collect(),
                deny: self.deny.into_iter().collect(),
                log: EventLog::new(self.events_capacity),
                bans: Mutex::new(BanTable::new(self.max_bans)),
                detector: Mutex::new(Detector::new(self.max_tracked)),
                open: self.close_on_ban.then(|| Mutex::new(Slab::new())),
                ban_changes: AtomicU64::new(0),
            }),
        }
    }
}

/// The security event log, the ban table and the anomaly detector: a cheap-to-clone
/// handle (every clone shares them). See the [module docs](self).
#[derive(Clone)]
pub struct Security {
    shared: Arc<Shared>,
}

struct Shared {
    thresholds: Thresholds,
    ban_for: Duration,
    ban_by: BanKeys,
    /// Whether `rate_limit` / `per_client` refusals count toward the detector.
    count_per_client_rate: bool,
    key_by: KeyBy,
    /// Networks the detector never counts for.
    exempt: NetMap<()>,
    /// Networks refused at once.
    deny: NetMap<()>,
    log: EventLog,
    bans: Mutex<BanTable>,
    detector: Mutex<Detector>,
    /// The connections open under this `Security`'s layers, for a ban to close; `None`
    /// with `close_on_ban(false)`.
    open: Option<Mutex<Slab<Arc<ConnCtx>>>>,
    /// Changes to the bans so far (each put in place or lifted): a connection admitted
    /// before a ban and kept after its pass checks its address again, and a writer of
    /// the bans skips a write while it stays the same.
    ban_changes: AtomicU64,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("thresholds", &self.shared.thresholds)
            .field("ban_for", &self.shared.ban_for)
            .field("ban_by", &self.shared.ban_by)
            .field("count_per_client_rate", &self.shared.count_per_client_rate)
            .field("key_by", &self.shared.key_by)
            .field("exempt", &self.shared.exempt)
            .field("deny", &self.shared.deny.len())
            .field("bans", &self.shared.bans.lock().len())
            .field("tracked", &self.shared.detector.lock().len())
            .field("open", &self.open_connections())
            .field("events_total", &self.shared.log.total())
            .finish_non_exhaustive()
    }
}

impl Default for Security {
    fn default() -> Self {
        Self::builder().build()
    }
}

/// Who an event is about.
#[derive(Debug, Default, Clone)]
struct Who {
    addr: Option<SocketAddr>,
    client_id: Option<Arc<str>>,
    username: Option<Arc<str>>,
}

impl Who {
    fn on(&self, mut e: Event) -> Event {
        e.client_addr = self.addr;
        e.client_id.clone_from(&self.client_id);
        e.username.clone_from(&self.username);
        e
    }
}

impl Security {
    /// Starts a configuration with the defaults.
    pub fn builder() -> SecurityBuilder {
        SecurityBuilder::default()
    }

    /// A [`SecurityLayer`] over this `Security`.
    pub fn layer(&self) -> SecurityLayer {
        SecurityLayer::new(self.clone())
    }

    /// The bans in force, the soonest-ending first. The ban table's lock, which every
    /// connection's ban check takes, is held only to copy them, and for no more than 512
    /// at a time: they are sorted after. So the list is not one instant's: a ban put in
    /// place or lifted while it is made may be in it or not, and a ban lengthened
    /// meanwhile is listed once, with its new end. Each call copies, sorts and allocates
    /// every ban (up to `max_bans`): call it off an async runtime's worker threads when
    /// the table may be large.
    pub fn bans(&self) -> Vec<Ban> {
        self.listed(usize::MAX).0.soonest_first()
    }

    /// The `limit` bans in force that end last (those [`bans`](Self::bans) lists last),
    /// the soonest-ending first, and how many bans are in force. For an answer of a few:
    /// it copies only the `limit` bans that end last of each kind (by hand, the
    /// detector's), where `bans` copies the whole table (`max_bans`, 100,000 by
    /// default), under the ban table's lock no more than 512 at a time, as `bans` does.
    pub fn bans_ending_last(&self, limit: usize) -> (Vec<Ban>, usize) {
        let (listed, total) = self.listed(limit);
        let mut some = listed.soonest_first();
        some.drain(..some.len().saturating_sub(limit));
        (some, total)
    }

    /// The `limit` bans that end last of each kind, copied in runs of
    /// [`bans::LIST_RUN`], the lock let go between runs; and how many bans were in force
    /// when it began.
    fn listed(&self, limit: usize) -> (bans::Listed, usize) {
        let mut listed = bans::Listed::default();
        let mut total = 0;
        for class in 0..bans::EXPIRY_CLASSES {
            let (start, len) =
                self.with_bans(|t, now| (t.start_of_last(now, class, limit), t.len()));
            if class == 0 {
                total = len;
            }
            let (mut from, mut left) = match start {
                Some(start) => (Bound::Included(start), limit),
                None => continue,
            };
            while left > 0 {
                let run = left.min(bans::LIST_RUN);
                let (last, looked) =
                    self.with_bans(|t, now| t.copy_run(now, class, from, run, &mut listed.0));
                match last {
                    Some(last) if looked == run => {
                        from = Bound::Excluded(last);
                        left -= run;
                    }
                    // The class has no more.
                    _ => break,
                }
            }
        }
        (listed, total)
    }

    /// Bans `key` for `duration` from now (replacing a ban of the same key), and closes
    /// the open connections it matches unless built with
    /// [`close_on_ban(false)`](SecurityBuilder::close_on_ban). Logs a `ban` event (rule
    /// `manual`) and counts `aegis_security_bans_total{cause="manual"}`. When the table
    /// is full, the ban that ends soonest is evicted (a detector's first, see
    /// [Bounds](self#bounds)). A ban lasts at most [`MAX_BAN`]. A ban of an empty client
    /// id or username matches no one: every 3.1.1 clean session and every MQTT 5 client
    /// taking a server-assigned id has an empty client id.
    pub fn ban(&self, key: BanKey, duration: Duration) {
        self.put_ban(key, duration, Cause::Manual, None, &Who::default(), None);
    }

    /// Puts `bans` in place again, as [`bans`](Self::bans) listed them (from another
    /// `Security`, or this process's before a restart, through their JSON form), each until
    /// its `until` but for no longer than its `remaining` (so a wall clock behind at
    /// start-up cannot stretch a ban: read back from JSON, `remaining` is at most what was
    /// left when it was written), at most [`MAX_BAN`] from now, and with its reason; a ban
    /// that has ended is skipped. Each meets a ban of the same key as a new ban of its
    /// reason does (one by hand replaces it, a detector's only lengthens it: see the
    /// [module docs](self)), makes room in a full table as a new ban does (see
    /// [Bounds](self#bounds): they are put in place the soonest-ending first, so of each
    /// kind, by hand or by the detector, the table keeps those that end last), and closes
    /// the open connections it matches; unlike a new ban, it logs no event and counts
    /// nothing in
    /// `aegis_security_bans_total` (it is not a new ban), and it is put in place whatever
    /// [`exempt`](SecurityBuilder::exempt) says. Returns how many were put in place (a key
    /// given twice, twice).
    ///
    /// ```
    /// use std::time::Duration;
    /// use aegis_mqtt::security::{Ban, BanKey, Security};
    ///
    /// let before = Security::default();
    /// before.ban("198.51.100.0/24".parse().map(BanKey::Addr)?, Duration::from_secs(600));
    /// let saved = serde_json::to_string(&before.bans())?;
    ///
    /// let after = Security::default();
    /// let bans: Vec<Ban> = serde_json::from_str(&saved)?;
    /// assert_eq!(after.restore(bans), 1);
    /// assert!(after.is_banned(&BanKey::addr("198.51.100.7".parse()?)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn restore(&self, bans: impl IntoIterator<Item = Ban>) -> usize {
        // The soonest-ending first, as `bans` lists them: a full table then keeps the
        // bans that end last, whatever order they came in.
        let mut bans: Vec<Ban> = bans.into_iter().collect();
        bans.sort_by_key(|b| b.until);
        let mut restored = 0;
        for ban in bans {
            let Ok(left) = ban.until.duration_since(SystemTime::now()) else {
                continue;
            };
            let left = left.min(ban.remaining);
            if !left.is_zero()
                && !matches!(
                    self.place(&ban.key.normalized(), left, ban.reason, None),
                    Err(Inserted::Refused)
                )
            {
                restored += 1;
            }
        }
        restored
    }

    /// Whether `ip` is in a network of the deny list ([`SecurityBuilder::deny`]).
    pub fn is_denied(&self, ip: IpAddr) -> bool {
        self.shared.deny.holds(ip)
    }

    /// The key the detector counts and bans `ip` under: its network by
    /// [`key_by`](SecurityBuilder::key_by).
    ///
    /// ```
    /// use aegis_core::KeyBy;
    /// use aegis_mqtt::security::Security;
    ///
    /// let sec = Security::builder().key_by(KeyBy::new(24, 56)).build();
    /// let key = sec.addr_key("2001:db8:0:12::1".parse().unwrap());
    /// assert_eq!(key.to_string(), "addr:2001:db8::/56");
    /// let key = sec.addr_key("192.0.2.7".parse().unwrap());
    /// assert_eq!(key.to_string(), "addr:192.0.2.0/24");
    /// ```
    pub fn addr_key(&self, ip: IpAddr) -> BanKey {
        BanKey::Addr(self.shared.key_by.key(ip))
    }

    /// Lifts the ban of `key` (only that key's: lifting a network's ban leaves the bans
    /// of wider or narrower networks); `false` if it was not banned.
    pub fn unban(&self, key: &BanKey) -> bool {
        let key = key.clone().normalized();
        let lifted = self.with_bans(|t, now| t.remove(&key, now));
        if lifted {
            self.shared.ban_changes.fetch_add(1, Ordering::AcqRel);
        }
        lifted
    }

    /// How many times the bans were changed so far: each ban put in place (by the
    /// detector, the handle or [`restore`](Self::restore)) and each lifted, not the bans
    /// that end. Whoever keeps a copy of [`bans`](Self::bans) (a file, say) can skip
    /// listing them while this stays the same: nothing but their end changed.
    pub fn ban_changes(&self) -> u64 {
        self.shared.ban_changes.load(Ordering::Acquire)
    }

    /// Whether `key` is banned now: a name by its own ban, a network by any ban that
    /// holds all of it (`BanKey::Addr("192.0.2.7/32".parse()?)` is banned by a ban of
    /// `192.0.2.0/24`).
    pub fn is_banned(&self, key: &BanKey) -> bool {
        let key = key.clone().normalized();
        self.is_banned_normalized(&key)
    }

    /// How many connections are open under this `Security`'s layers (0 when built with
    /// [`close_on_ban(false)`](SecurityBuilder::close_on_ban), which does not keep them).
    pub fn open_connections(&self) -> usize {
        self.shared
            .open
            .as_ref()
            .map_or(0, |open| open.lock().len())
    }

    /// The latest `limit` events, **oldest first** (the newest is last).
    pub fn events(&self, limit: usize) -> Vec<Event> {
        self.shared.log.latest(limit)
    }

    /// How many events were recorded since this `Security` was built (the log keeps only
    /// the latest; events over their kind's rate are not recorded, see
    /// [`EVENTS_PER_SECOND`]).
    pub fn events_total(&self) -> u64 {
        self.shared.log.total()
    }

    fn is_banned_normalized(&self, key: &BanKey) -> bool {
        self.with_bans(|t, now| t.contains(key, now))
    }

    /// Whether the ban table is empty: the checks of every connection and CONNECT take
    /// this short way out (no clock read, no purge, no lookup) while nothing is banned.
    /// A ban that expired but is not purged yet keeps it `false`.
    fn no_bans(&self) -> bool {
        self.shared.bans.lock().len() == 0
    }

    /// Runs `f` on the ban table and keeps the `aegis_security_bans` gauge up to date.
    fn with_bans<R>(&self, f: impl FnOnce(&mut BanTable, Instant) -> R) -> R {
        #[cfg(test)]
        tests::BAN_LOCKS.with(|n| n.set(n.get() + 1));
        let (r, before, after) = {
            let mut t = self.shared.bans.lock();
            let before = t.len();
            let r = f(&mut t, Instant::now());
            (r, before, t.len())
        };
        if before != after {
            metrics::bans(after);
        }
        r
    }

    fn emit(&self, who: &Who, event: Event) {
        self.shared.log.emit(who.on(event));
    }

    /// Bans `key` and closes the open connections it matches but `spared` (one that its
    /// CONNACK refusal answers); `false` if the table takes no bans (`max_bans(0)`).
    fn put_ban(
        &self,
        key: BanKey,
        duration: Duration,
        cause: Cause,
        threshold: Option<u32>,
        who: &Who,
        spared: Option<&ConnCtx>,
    ) -> bool {
        let key = key.normalized();
        let duration = duration.min(MAX_BAN);
        let closed = match self.place(&key, duration, cause.as_str(), spared) {
            Ok(closed) => closed,
            Err(Inserted::Refused) => return false,
            // The key's ban in force already lasts as long (or is by hand): no new ban.
            Err(_) => return true,
        };
        metrics::banned(key.kind(), cause.as_str());
        let mut details = match threshold {
            Some(n) => format!(
                "{key} banned for {duration:?}: more than {n} {} in {:?}",
                cause.as_str().replace('_', " "),
                self.shared.thresholds.window
            ),
            None => format!("{key} banned for {duration:?} through the handle"),
        };
        if closed > 0 {
            let _ = write!(details, "; {closed} open connection(s) closed");
        }
        self.emit(
            who,
            Event::new(
                "security",
                EventKind::Ban,
                Severity::High,
                Some(cause.as_str()),
                details,
            ),
        );
        true
    }

    /// Puts the (normalized) `key` in place for `duration` with `reason` (see
    /// [`BanTable::insert`] for a key banned already), and closes the open connections it
    /// matches but `spared`; returns how many, or how the table did not put it in place:
    /// [`Inserted::Stands`] when a detector's ban changed nothing, [`Inserted::Refused`]
    /// when the table takes it not (`max_bans(0)`, or a detector's ban in a table full of
    /// bans by hand). Neither logs nor counts the ban.
    fn place(
        &self,
        key: &BanKey,
        duration: Duration,
        reason: &'static str,
        spared: Option<&ConnCtx>,
    ) -> Result<usize, Inserted> {
        match self.with_bans(|t, now| t.insert(key.clone(), now, duration, reason)) {
            Inserted::Placed => {}
            not => return Err(not),
        }
        // Before the pass: a connection admitted meanwhile checks its address again
        // once it is kept (`track_admitted`).
        self.shared.ban_changes.fetch_add(1, Ordering::AcqRel);
        Ok(self.close_open(key, spared))
    }

    /// Keeps `ctx` among the open connections a ban closes, unless built with
    /// `close_on_ban(false)`.
    fn track(&self, ctx: Arc<ConnCtx>) -> Tracked {
        let key = self
            .shared
            .open
            .as_ref()
            .map(|open| open.lock().insert(Arc::clone(&ctx)));
        Tracked { ctx, key }
    }

    /// Closes the open connections that the (normalized) `key` matches, but `spared`;
    /// returns how many. The pass holds the lock of the open connections; each
    /// connection's names are read under their own lock, which is never held while that
    /// one is taken.
    fn close_open(&self, key: &BanKey, spared: Option<&ConnCtx>) -> usize {
        let Some(open) = &self.shared.open else {
            return 0;
        };
        // Woken once the lock is released: a wake-up may take a lock of the runtime's
        // own, or (on another runtime) make a system call.
        let mut wake = Vec::new();
        let mut closed = 0;
        for (_, ctx) in open.lock().iter() {
            if spared.is_some_and(|s| std::ptr::eq(s, Arc::as_ptr(ctx))) {
                continue;
            }
            if ctx.matches(key) && !ctx.closed.swap(true, Ordering::AcqRel) {
                wake.extend(ctx.waker.take());
                closed += 1;
            }
        }
        wake.into_iter().for_each(Waker::wake);
        closed
    }

    /// Keeps `ctx`, from a connection admitted when the bans had changed `bans` times,
    /// among the open connections. A ban of its address put in place since, whose pass
    /// may have missed it, closes it at once.
    fn track_admitted(&self, ctx: Arc<ConnCtx>, bans: u64) -> Tracked {
        let tracked = self.track(ctx);
        if tracked.key.is_some()
            && self.ban_changes() != bans
            && self.is_banned_normalized(&BanKey::host(tracked.addr.ip()))
        {
            tracked.closed.store(true, Ordering::Release);
        }
        tracked
    }

    /// Refusals (by layer and reason label) that are not the client's doing: logged,
    /// never counted. `auth_timeout` may be the client's doing or the broker's: an
    /// enhanced authentication stalled by either side. Counting it would let a stalled
    /// broker ban its clients, so it is not counted either.
    fn not_the_clients_doing(&self, layer: &str, label: &str) -> bool {
        match layer {
            // An open circuit refuses every client: the upstream's state, not theirs.
            "circuit_breaker" => true,
            // The global tier is shared by every client: a flood from others, or an
            // adaptive controller lowering it for a slow broker, uses it up. So is the
            // overflow bucket, which every client beyond `max_keys` shares (a flood of
            // new addresses fills the table and drains it). So is the per-client tier
            // when that controller drives it
            // ([`count_per_client_rate(false)`](SecurityBuilder::count_per_client_rate)).
            "rate_limit" => {
                matches!(label, "global" | "overflow")
                    || (label == "per_client" && !self.shared.count_per_client_rate)
            }
            // A connection closed (or reset) before the sniffer saw enough to decide: a
            // TCP health check, or a client that gave up. Without the sniffer the MQTT
            // layer sees the same end as an IO error, which is no rejection.
            "sniff" => matches!(label, "eof" | "io"),
            // The MQTT policy's overflow buckets, shared as the rate limiter's is by
            // every address or client id beyond the tier's `max_keys`.
            "mqtt" if matches!(label, "connect_overflow" | "message_overflow") => true,
            _ => matches!(
                label,
                "server_unavailable"
                    | "connack_timeout"
                    | "upstream_closed"
                    | "server_busy"
                    | "auth_error"
                    | "auth_timeout"
            ),
        }
    }

    /// Counts `cause` for each of `keys` the detector bans on, unless `who` is from an
    /// exempt network; bans each key that crosses its threshold (closing the open
    /// connections it matches, but `spared`). Returns whether any is banned now (none is
    /// with `max_bans(0)`).
    fn count(&self, keys: &[BanKey], cause: Cause, who: &Who, spared: Option<&ConnCtx>) -> bool {
        if self.shared.thresholds.of(cause).is_none() {
            return false;
        }
        if who.addr.is_some_and(|a| self.shared.exempt.holds(a.ip())) {
            return false;
        }
        let now = Instant::now();
        let mut crossed = Vec::new();
        {
            let mut d = self.shared.detector.lock();
            for key in keys.iter().filter(|k| self.shared.ban_by.allows(k)) {
                match d.record(&self.shared.thresholds, key, cause, now) {
                    Recorded::Crossed(n) => crossed.push((key.clone(), n)),
                    Recorded::Untracked => metrics::untracked(),
                    Recorded::Off | Recorded::Counted => {}
                }
            }
        }
        let mut banned = false;
        for (key, n) in &crossed {
            banned |= self.put_ban(
                key.clone(),
                self.shared.ban_for,
                cause,
                Some(*n),
                who,
                spared,
            );
        }
        banned
    }

    /// The `SecurityLayer`'s check of a new connection: `false` (and a `rejection`
    /// event) if its address is banned, or is banned now for this connect.
    fn admit(&self, addr: SocketAddr) -> Result<(), SecurityError> {
        let who = Who {
            addr: Some(addr),
            ..Who::default()
        };
        self.refused(&who, addr)?;
        // This connection is not open yet: no need to spare it.
        let key = self.addr_key(addr.ip());
        if !self.count(std::slice::from_ref(&key), Cause::Connects, &who, None) {
            return Ok(());
        }
        self.emit_banned(
            &who,
            "client address banned now: too many connects".to_owned(),
        );
        Err(SecurityError::Banned)
    }

    /// Refuses `addr` (`who`'s) if it is denied, or banned (by any ban of a network that
    /// holds it); a refusal as banned is logged if it is due (at most once a second per
    /// ban), one as denied never.
    fn refused(&self, who: &Who, addr: SocketAddr) -> Result<(), SecurityError> {
        if self.is_denied(addr.ip()) {
            return Err(SecurityError::Denied);
        }
        if self.no_bans() {
            return Ok(());
        }
        let host = BanKey::host(addr.ip());
        let details = match self.with_bans(|t, now| t.refusal(&host, now)) {
            Refusal::NotBanned => return Ok(()),
            Refusal::Quiet => return Err(SecurityError::Banned),
            Refusal::Log { quiet: 0 } => "client address is banned".to_owned(),
            Refusal::Log { quiet } => format!(
                "client address is banned ({quiet} more refusals in the last {REFUSAL_EVENT_EVERY:?} not logged)"
            ),
        };
        self.emit_banned(who, details);
        Err(SecurityError::Banned)
    }

    fn emit_banned(&self, who: &Who, details: String) {
        self.emit(
            who,
            Event::new(
                "security",
                EventKind::Rejection,
                Severity::High,
                Some("banned"),
                details,
            ),
        );
    }

    /// Refuses a banned client address (or a denied one, [`SecurityBuilder::deny`]), for
    /// `aegis_core::serve::Serve::admit`: in the accept loop, before a task is spawned
    /// for the connection. The error is [`SecurityError::Banned`], counted as
    /// `aegis_rejections_total{layer="security",reason="banned"}` and logged as the
    /// [`SecurityLayer`]'s refusals are (at most once a second per ban), or
    /// [`SecurityError::Denied`], counted as `reason="denied"` and not logged. Unlike the
    /// layer, it counts nothing toward a ban: keep the layer in the stack, and it counts
    /// the connections this lets through.
    ///
    /// The address must be the client's: not behind a PROXY protocol sender, whose
    /// address the accept loop sees instead.
    ///
    /// ```
    /// # async fn run(listener: tokio::net::TcpListener) {
    /// use aegis_core::{proxy::Proxy, serve};
    /// use aegis_mqtt::security::Security;
    /// use tower::Layer;
    ///
    /// let security = Security::builder().build();
    /// let check = security.clone();
    /// let service = security
    ///     .layer()
    ///     .layer(Proxy::new("127.0.0.1:1884".parse().unwrap()));
    /// serve(listener, service)
    ///     .admit(move |peer| check.refuse_banned(peer))
    ///     .await;
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SecurityError::Banned`] (as a counted [`Rejected`]) when the address is banned,
    /// [`SecurityError::Denied`] when it is in the deny list.
    pub fn refuse_banned(&self, addr: SocketAddr) -> Result<(), aegis_core::BoxError> {
        let who = Who {
            addr: Some(addr),
            ..Who::default()
        };
        self.refused(&who, addr)
            .map_err(|e| aegis_core::error::reject(e).into())
    }

    /// Whether any of `keys` is banned; when one is, whether the refusal is logged
    /// ([`Refusal::Log`] of the first banned key whose refusal is logged) or not.
    fn refusal_of(&self, keys: &[BanKey]) -> Refusal {
        if self.no_bans() {
            return Refusal::NotBanned;
        }
        self.with_bans(|t, now| {
            let mut seen = Refusal::NotBanned;
            for key in keys {
                match t.refusal(key, now) {
                    Refusal::NotBanned => {}
                    log @ Refusal::Log { .. } => return log,
                    Refusal::Quiet => seen = Refusal::Quiet,
                }
            }
            seen
        })
    }
}

/// The security context of one connection, shared by the `SecurityLayer`'s future and
/// (through the task-local) the layers inside.
#[derive(Debug)]
struct ConnCtx {
    security: Security,
    addr: SocketAddr,
    /// The CONNECT's client id and user name, once read (one lock for both: they are
    /// set together).
    names: Mutex<Names>,
    /// Whether a layer inside reported the connection's end itself.
    reported: AtomicBool,
    /// The refusals under the ban that refused this CONNECT and were not logged since
    /// that ban's last logged one: its `banned` event says how many. (32 bits, which
    /// fit beside the two flags: 4 billion refusals in a second is not a case.)
    quiet_refusals: AtomicU32,
    /// Whether a ban closed the connection; its task is woken through `waker`.
    closed: AtomicBool,
    waker: AtomicWaker,
}

/// A connection's security context, kept among the open connections (if they are kept)
/// until it drops.
struct Tracked {
    ctx: Arc<ConnCtx>,
    /// Its slot among the open connections.
    key: Option<usize>,
}

impl Tracked {
    /// Whether a ban closed the connection; if not, `cx` is woken when one does.
    fn closed(&self, cx: &Context<'_>) -> bool {
        if self.key.is_none() {
            return false;
        }
        self.ctx.waker.register(cx.waker());
        self.ctx.closed.load(Ordering::Acquire)
    }
}

impl std::ops::Deref for Tracked {
    type Target = ConnCtx;

    fn deref(&self) -> &ConnCtx {
        &self.ctx
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let (Some(key), Some(open)) = (self.key, &self.ctx.security.shared.open) {
            open.lock().try_remove(key);
        }
    }
}

/// The names a connection gave in its CONNECT.
#[derive(Debug, Default)]
struct Names {
    client_id: Option<Arc<str>>,
    username: Option<Arc<str>>,
}

impl ConnCtx {
    fn new(security: Security, addr: SocketAddr) -> Self {
        Self {
            security,
            addr,
            names: Mutex::new(Names::default()),
            reported: AtomicBool::new(false),
            quiet_refusals: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// Whether the (normalized) ban `key` is this connection's address, or the client
    /// id or username of its CONNECT.
    fn matches(&self, key: &BanKey) -> bool {
        match key {
            BanKey::Addr(net) => net.contains(self.addr.ip()),
            // An empty name is no one's (see `on_connect`).
            BanKey::ClientId(id) => {
                !id.is_empty() && self.names.lock().client_id.as_ref() == Some(id)
            }
            BanKey::Username(user) => {
                !user.is_empty() && self.names.lock().username.as_ref() == Some(user)
            }
        }
    }

    fn who(&self) -> Who {
        let names = self.names.lock();
        Who {
            addr: Some(self.addr),
            client_id: names.client_id.clone(),
            username: names.username.clone(),
        }
    }

    /// The keys the detector counts for this connection: the address, then the client id
    /// (unless empty) and the username when known.
    fn detector_keys(&self, who: &Who) -> Vec<BanKey> {
        with_name_keys(who, |names| {
            let mut keys = Vec::with_capacity(1 + names.len());
            keys.push(self.security.addr_key(self.addr.ip()));
            keys.extend_from_slice(names);
            keys
        })
    }

    fn report(&self, r: Report<'_>) {
        let who = self.who();
        let cause = match r.kind {
            EventKind::AuthFailure => Some(Cause::AuthFailures),
            EventKind::Block | EventKind::Rejection => Some(Cause::Rejections),
            EventKind::Flag | EventKind::Ban => None,
        };
        // An authentication failure counts only as a denial (rule `denied`) or a flood of
        // checks from one address (`too_many_checks`): any other rule is the
        // authenticator failing to decide (the auth layer's other error labels).
        let not_counted = if r.kind == EventKind::AuthFailure {
            !matches!(r.rule, Some("denied" | "too_many_checks"))
        } else {
            r.rule
                .is_some_and(|rule| self.security.not_the_clients_doing(r.layer, rule))
        };
        self.security.emit(
            &who,
            Event::new(r.layer, r.kind, r.severity, r.rule, r.details),
        );
        if let Some(cause) = cause.filter(|_| !not_counted) {
            // A connection over a threshold by what it sent (blocked messages go on) is
            // closed too; one denied a login is answered by its CONNACK, not closed.
            let spared = (r.kind == EventKind::AuthFailure).then_some(self);
            self.security
                .count(&self.detector_keys(&who), cause, &who, spared);
        }
    }

    fn on_connect(&self, c: &Connect<'_>, shared: &mut SharedId<'_>) -> Result<(), MqttError> {
        // The policy keys on the same id: one allocation for both, unless it is too long
        // for the log.
        let id: Arc<str> = if c.client_id.len() <= MAX_NAME {
            shared.get()
        } else {
            Arc::from(bounded(c.client_id, MAX_NAME))
        };
        let user: Option<Arc<str>> = c.username.map(|u| Arc::from(bounded(u, MAX_NAME)));
        *self.names.lock() = Names {
            client_id: Some(Arc::clone(&id)),
            username: user.clone(),
        };
        let sec = &self.security;
        let addr = BanKey::host(self.addr.ip());
        // An empty name is no one's (a 3.1.1 clean session, an MQTT 5 client taking a
        // server-assigned id): a ban of it is never checked, as the detector never
        // counts one.
        let id_key = (!id.is_empty()).then_some(BanKey::ClientId(id));
        let user_key = user
            .as_ref()
            .filter(|u| !u.is_empty())
            .map(|u| BanKey::Username(Arc::clone(u)));
        let refusal = match (id_key, user_key) {
            (Some(id), Some(user)) => sec.refusal_of(&[addr, id, user]),
            (Some(name), None) | (None, Some(name)) => sec.refusal_of(&[addr, name]),
            (None, None) => sec.refusal_of(&[addr]),
        };
        match refusal {
            Refusal::NotBanned => {}
            Refusal::Log { quiet } => {
                // Logged by `on_error`, with this count, once the CONNACK is written.
                let quiet = u32::try_from(quiet).unwrap_or(u32::MAX);
                self.quiet_refusals.store(quiet, Ordering::Relaxed);
                return Err(MqttError::Banned);
            }
            Refusal::Quiet => {
                // Refused all the same (and counted in aegis_rejections_total), but not
                // one more event in the log.
                self.reported.store(true, Ordering::Relaxed);
                return Err(MqttError::Banned);
            }
        }
        let who = self.who();
        // Refused by its CONNACK, which the MQTT layer still has to send.
        if with_name_keys(&who, |keys| {
            sec.count(keys, Cause::Connects, &who, Some(self))
        }) {
            return Err(MqttError::Banned);
        }
        Ok(())
    }

    /// The end of the connection with error `e`: a rejection not reported yet becomes a
    /// `rejection` event and counts toward the detector.
    fn on_error(&self, e: &(dyn std::error::Error + 'static)) {
        if self.reported.swap(true, Ordering::Relaxed) {
            return;
        }
        let found = find::<Rejected>(e)
            .map(|r| (r.layer(), r.label(), r.to_string()))
            .or_else(|| find::<MqttError>(e).map(|m| (m.layer(), m.label(), m.to_string())))
            .or_else(|| find::<SecurityError>(e).map(|s| (s.layer(), s.label(), s.to_string())));
        let Some((layer, label, mut details)) = found else {
            return;
        };
        // A CONNECT refused under a client id or username ban: its event counts the
        // refusals not logged before it, as an address ban's does.
        let quiet = self.quiet_refusals.swap(0, Ordering::Relaxed);
        if quiet > 0 {
            let _ = write!(
                details,
                " ({quiet} more refusals in the last {REFUSAL_EVENT_EVERY:?} not logged)"
            );
        }
        let (severity, counted) = if label == "banned" {
            (Severity::High, false)
        } else if self.security.not_the_clients_doing(layer, label) {
            (Severity::Low, false)
        } else {
            (Severity::Medium, true)
        };
        let who = self.who();
        self.security.emit(
            &who,
            Event::new(layer, EventKind::Rejection, severity, Some(label), details),
        );
        if counted {
            self.security.count(
                &self.detector_keys(&who),
                Cause::Rejections,
                &who,
                Some(self),
            );
        }
    }
}

/// Calls `f` with the client id (unless empty) and username (unless empty) keys of
/// `who`, on the stack: this runs for every CONNECT.
fn with_name_keys<R>(who: &Who, f: impl FnOnce(&[BanKey]) -> R) -> R {
    let id = who.client_id.as_ref().filter(|n| !n.is_empty());
    let user = who.username.as_ref().filter(|n| !n.is_empty());
    let id = id.map(|id| BanKey::ClientId(Arc::clone(id)));
    let user = user.map(|u| BanKey::Username(Arc::clone(u)));
    match (id, user) {
        (Some(id), Some(user)) => f(&[id, user]),
        (Some(one), None) | (None, Some(one)) => f(&[one]),
        (None, None) => f(&[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(sec: &Security) -> Arc<ConnCtx> {
        ctx_from(sec, "192.0.2.7:1000")
    }

    thread_local! {
        /// How many times this thread took the ban table's lock through `with_bans`.
        pub(super) static BAN_LOCKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The bans are listed in runs of `LIST_RUN`, the lock let go between them, and the
    /// runs put together are what one hold of the lock copies: the whole table, or its
    /// last `limit`, whatever the limit against the runs' length.
    #[tokio::test(start_paused = true)]
    async fn bans_are_listed_in_runs_with_the_lock_let_go_between() {
        let run = bans::LIST_RUN;
        let sec = Security::builder().max_bans(10_000).build();
        let by_hand = 2 * run + 5;
        for i in 0..by_hand {
            let secs = 60 + u64::try_from(i).unwrap();
            sec.ban(
                BanKey::username(&format!("u{i}")),
                Duration::from_secs(secs),
            );
        }
        let detector = run + 3;
        let restored = sec.restore((0..detector).map(|i| {
            let d = Duration::from_secs(30 + 2 * u64::try_from(i).unwrap());
            Ban {
                key: BanKey::client_id(&format!("c{i}")),
                until: SystemTime::now() + d,
                remaining: d,
                reason: "connects",
            }
        }));
        assert_eq!(restored, detector);
        let reference = sec.with_bans(BanTable::list).soonest_first();
        assert_eq!(reference.len(), by_hand + detector);

        let before = BAN_LOCKS.with(std::cell::Cell::get);
        let all = sec.bans();
        let locks = BAN_LOCKS.with(std::cell::Cell::get) - before;
        assert_eq!(all, reference);
        // One hold per class to find where to start, then the detector's two runs
        // (512 + 3) and the three by hand (512 + 512 + 5).
        assert_eq!(locks, 2 + 2 + 3);

        for limit in [
            0,
            1,
            run - 1,
            run,
            run + 1,
            run + 3,
            2 * run + 4,
            2 * run + 5,
            5_000,
        ] {
            let (want, want_total) = sec.with_bans(|t, now| t.list_last(now, limit));
            let mut want = want.soonest_first();
            want.drain(..want.len().saturating_sub(limit));
            let (last, total) = sec.bans_ending_last(limit);
            assert_eq!(last, want, "limit {limit}");
            assert_eq!(last.len(), limit.min(by_hand + detector), "limit {limit}");
            assert_eq!(
                (total, want_total),
                (by_hand + detector, by_hand + detector)
            );
        }
    }

    fn ctx_from(sec: &Security, peer: &str) -> Arc<ConnCtx> {
        Arc::new(ConnCtx::new(sec.clone(), peer.parse().unwrap()))
    }

    /// One per connection, for its whole life: one lock for both names. With the waker a
    /// ban wakes, it and the `Arc`'s two counts fill one 128-byte allocation.
    #[test]
    fn a_connection_context_stays_small() {
        let size = std::mem::size_of::<ConnCtx>();
        assert!(size <= 112, "ConnCtx is {size} bytes");
    }

    fn block() -> Report<'static> {
        Report {
            layer: "inspect",
            kind: EventKind::Block,
            severity: Severity::Medium,
            rule: Some("no-secrets"),
            details: "blocked".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_block_over_a_threshold_closes_the_reporting_connection_and_its_peers() {
        // A blocked message does not end its connection: the ban it brings does.
        let sec = Security::builder().max_rejections(0).build();
        let (first, other) = (sec.track(ctx(&sec)), sec.track(ctx(&sec)));
        let elsewhere = sec.track(ctx_from(&sec, "192.0.2.8:1000"));
        assert_eq!(sec.open_connections(), 3);
        CTX.scope(Arc::clone(&first.ctx), async { report(block()) })
            .await;
        assert!(sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap())));
        assert!(first.closed.load(Ordering::Acquire));
        assert!(other.closed.load(Ordering::Acquire));
        assert!(!elsewhere.closed.load(Ordering::Acquire));
        let ban = sec.events(10).pop().unwrap();
        assert!(
            ban.details.ends_with("; 2 open connection(s) closed"),
            "{ban:?}"
        );
        drop((first, other, elsewhere));
        assert_eq!(sec.open_connections(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_denied_over_a_threshold_is_answered_by_its_connack_not_closed() {
        let sec = Security::builder().max_auth_failures(0).build();
        let (denied, other) = (sec.track(ctx(&sec)), sec.track(ctx(&sec)));
        CTX.scope(Arc::clone(&denied.ctx), async { report(auth_failure()) })
            .await;
        assert!(sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap())));
        assert!(!denied.closed.load(Ordering::Acquire));
        assert!(other.closed.load(Ordering::Acquire));
    }

    #[test]
    fn bans_match_as_they_are_stored() {
        // A mapped IPv6 address is its IPv4 address; a name over 256 bytes is cut the
        // same way in the ban and in the connection's context.
        let sec = Security::default();
        let by_addr = sec.track(ctx(&sec));
        sec.ban(
            BanKey::addr("::ffff:192.0.2.7".parse().unwrap()),
            Duration::from_secs(60),
        );
        assert!(by_addr.closed.load(Ordering::Acquire));
        let long = "x".repeat(300);
        // Remaining length 312 (10 + 2 + 300): 0xB8 0x02.
        let mut bytes = vec![
            0x10, 0xB8, 0x02, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0x01, 0x2c,
        ];
        bytes.extend_from_slice(long.as_bytes());
        let config = crate::Config::new().client_id_max_len(1024);
        let connect = crate::validate_connect(&bytes[..], &config).unwrap();
        let by_id = sec.track(ctx_from(&sec, "192.0.2.9:1000"));
        assert_eq!(
            by_id.on_connect(&connect, &mut SharedId::new(connect.client_id)),
            Ok(())
        );
        sec.ban(BanKey::client_id(&long), Duration::from_secs(60));
        assert!(by_id.closed.load(Ordering::Acquire));
    }

    #[test]
    fn a_connection_admitted_just_before_an_address_ban_is_closed_once_kept() {
        // The ban's pass ran between the admission and the tracking, and missed it.
        let sec = Security::default();
        let bans = sec.ban_changes();
        sec.ban(
            BanKey::addr("192.0.2.7".parse().unwrap()),
            Duration::from_secs(60),
        );
        let late = sec.track_admitted(ctx(&sec), bans);
        assert!(late.closed.load(Ordering::Acquire));
        // A ban of another key since leaves it open.
        let bans = sec.ban_changes();
        let other = sec.track_admitted(ctx_from(&sec, "192.0.2.8:1"), bans - 1);
        assert!(!other.closed.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn the_connect_that_crosses_a_threshold_is_refused_by_its_connack_not_closed() {
        // Two CONNECTs of one client id over a threshold of 1: the second is refused at
        // its CONNECT (the MQTT layer then answers it), the first, open, is closed.
        let sec = Security::builder()
            .max_connects(1)
            .ban_by(BanKeys::ALL)
            .build();
        let bytes = [
            0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1',
        ];
        let connect = crate::validate_connect(&bytes[..], &crate::Config::new()).unwrap();
        let (first, second) = (sec.track(ctx(&sec)), sec.track(ctx(&sec)));
        let mut id = SharedId::new(connect.client_id);
        assert_eq!(first.on_connect(&connect, &mut id), Ok(()));
        assert_eq!(
            second.on_connect(&connect, &mut SharedId::new(connect.client_id)),
            Err(MqttError::Banned)
        );
        assert!(first.closed.load(Ordering::Acquire));
        assert!(!second.closed.load(Ordering::Acquire));
    }

    fn auth_failure() -> Report<'static> {
        Report {
            layer: "auth",
            kind: EventKind::AuthFailure,
            severity: Severity::Medium,
            rule: Some("denied"),
            details: "bad password\n".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reports_carry_the_connection_and_auth_failures_ban_every_known_key() {
        let sec = Security::builder()
            .max_auth_failures(1)
            .ban_by(BanKeys::ALL)
            .build();
        // Outside a connection: nothing happens.
        report(auth_failure());
        mark_reported();
        assert_eq!(sec.events_total(), 0);
        let c = ctx(&sec);
        CTX.scope(Arc::clone(&c), async {
            let connect = crate::validate_connect(
                &[
                    0x10, 0x13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x82, 0, 60, 0, 2, b'c', b'1', 0,
                    3, b'b', b'o', b'b',
                ][..],
                &crate::Config::new(),
            )
            .unwrap();
            assert_eq!(
                on_connect(&connect, &mut SharedId::new(connect.client_id)),
                Ok(())
            );
            report(auth_failure());
            assert_eq!(sec.events_total(), 1);
            report(auth_failure());
        })
        .await;
        let events = sec.events(10);
        let e = &events[0];
        assert_eq!((e.layer, e.kind), ("auth", EventKind::AuthFailure));
        assert_eq!(e.client_addr, Some("192.0.2.7:1000".parse().unwrap()));
        assert_eq!(e.client_id.as_deref(), Some("c1"));
        assert_eq!(e.username.as_deref(), Some("bob"));
        assert_eq!(e.details, "bad password\\n");
        // The second failure crossed the threshold for all three keys.
        let bans: Vec<_> = events.iter().filter(|e| e.kind == EventKind::Ban).collect();
        assert_eq!(bans.len(), 3, "{events:?}");
        assert!(
            bans.iter()
                .all(|b| b.rule.as_deref() == Some("auth_failures"))
        );
        assert!(sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap())));
        assert!(sec.is_banned(&BanKey::client_id("c1")));
        assert!(sec.is_banned(&BanKey::username("bob")));
    }

    #[tokio::test(start_paused = true)]
    async fn an_authenticator_outage_is_logged_but_never_counted() {
        let sec = Security::builder().max_auth_failures(0).build();
        CTX.scope(ctx(&sec), async {
            for rule in ["timeout", "unavailable", "failed"] {
                report(Report {
                    rule: Some(rule),
                    ..auth_failure()
                });
            }
        })
        .await;
        assert_eq!(sec.events_total(), 3);
        assert!(sec.bans().is_empty());
        CTX.scope(ctx(&sec), async {
            report(Report {
                rule: Some("denied"),
                ..auth_failure()
            });
        })
        .await;
        assert!(sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap())));
    }

    /// A refusal of another layer, by its layer and label.
    #[derive(Debug)]
    struct Refusal(&'static str, &'static str);

    impl std::fmt::Display for Refusal {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} refused: {}", self.0, self.1)
        }
    }

    impl std::error::Error for Refusal {}

    impl aegis_core::error::Reject for Refusal {
        fn layer(&self) -> &'static str {
            self.0
        }

        fn label(&self) -> &'static str {
            self.1
        }
    }

    /// With `close_on_ban(false)` a session from an address banned by hand stays open;
    /// its rejections crossing a threshold leave the ban by hand as it was.
    #[tokio::test(start_paused = true)]
    async fn a_detector_ban_leaves_a_longer_ban_by_hand_as_it_was() {
        let sec = Security::builder()
            .max_rejections(0)
            .close_on_ban(false)
            .build();
        let key = BanKey::addr("192.0.2.7".parse().unwrap());
        let week = Duration::from_secs(7 * 86_400);
        sec.ban(key.clone(), week);
        let (events, changes) = (sec.events_total(), sec.ban_changes());
        ctx(&sec).on_error(&aegis_core::error::reject(Refusal(
            "rate_limit",
            "per_client",
        )));
        let bans = sec.bans();
        assert_eq!(bans.len(), 1);
        assert_eq!((&bans[0].key, bans[0].reason), (&key, "manual"));
        assert_eq!(bans[0].remaining, week);
        // The rejection is logged; no new ban is.
        assert_eq!(sec.events_total(), events + 1);
        assert_eq!(sec.ban_changes(), changes);
    }

    /// A connection closed or reset before the sniffer decided (a TCP health check's
    /// connect and close) is logged (low) but not counted: without the sniffer the MQTT
    /// layer sees the same end as an IO error, which is not counted either.
    #[tokio::test(start_paused = true)]
    async fn a_connection_closed_before_the_sniffer_decided_is_not_counted() {
        use aegis_layers::sniff::SniffError;
        let sec = Security::builder().max_rejections(0).build();
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        for err in [
            SniffError::Eof(0),
            SniffError::Eof(3),
            SniffError::Io(reset),
        ] {
            ctx(&sec).on_error(&aegis_core::error::reject(err));
            let e = sec.events(1).pop().unwrap();
            assert_eq!((e.layer, e.severity), ("sniff", Severity::Low));
        }
        assert_eq!(sec.events_total(), 3);
        assert!(sec.bans().is_empty());
        // What the sniffer refuses (here TLS on the MQTT port) still counts.
        let tls = SniffError::NotAllowed(aegis_layers::sniff::Protocol::Tls);
        ctx(&sec).on_error(&aegis_core::error::reject(tls));
        assert!(sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap())));
    }

    /// A refusal by the rate limiter's shared overflow bucket (every client beyond its
    /// `max_keys` shares it, so a flood of new addresses drains it) is logged (low) and
    /// never counted. It was counted as a client's own refusal: a flood got every new
    /// client banned.
    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_overflow_refusal_is_not_counted() {
        let sec = Security::builder().max_rejections(0).build();
        ctx(&sec).on_error(&aegis_core::error::reject(Refusal(
            "rate_limit",
            "overflow",
        )));
        let e = sec.events(1).pop().unwrap();
        assert_eq!(
            (e.severity, e.rule.as_deref()),
            (Severity::Low, Some("overflow"))
        );
        assert!(sec.bans().is_empty());
    }

    /// The MQTT policy's overflow refusals (`connect_overflow`, `message_overflow`) are
    /// logged (low) and never counted, as the rate limiter's `overflow`; its own rate
    /// refusals (`connect_rate`) count.
    #[tokio::test(start_paused = true)]
    async fn mqtt_policy_overflow_refusals_are_not_counted() {
        let sec = Security::builder().max_rejections(0).build();
        for (err, label) in [
            (crate::MqttError::ConnectOverflow, "connect_overflow"),
            (crate::MqttError::MessageOverflow, "message_overflow"),
        ] {
            ctx(&sec).on_error(&aegis_core::error::reject(err));
            let e = sec.events(1).pop().unwrap();
            assert_eq!(
                (e.layer, e.severity, e.rule.as_deref()),
                ("mqtt", Severity::Low, Some(label))
            );
        }
        assert!(sec.bans().is_empty());
        ctx(&sec).on_error(&aegis_core::error::reject(crate::MqttError::ConnectRate));
        assert!(sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap())));
    }

    /// A client's own rate-limit refusal (the per-client tier) counts.
    #[tokio::test(start_paused = true)]
    async fn a_per_client_rate_limit_refusal_counts() {
        let sec = Security::builder().max_rejections(0).build();
        ctx(&sec).on_error(&aegis_core::error::reject(Refusal(
            "rate_limit",
            "per_client",
        )));
        assert!(sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap())));
    }

    /// With `count_per_client_rate(false)` (an adaptive controller sets the per-client
    /// rate) a per-client refusal, reported or an error, is logged (low), never counted;
    /// other refusals still count.
    #[tokio::test(start_paused = true)]
    async fn per_client_rate_refusals_are_not_counted_when_told() {
        let sec = Security::builder()
            .max_rejections(0)
            .count_per_client_rate(false)
            .build();
        let per_client = || aegis_core::error::reject(Refusal("rate_limit", "per_client"));
        ctx(&sec).on_error(&per_client());
        let e = sec.events(1).pop().unwrap();
        assert_eq!(
            (e.severity, e.rule.as_deref()),
            (Severity::Low, Some("per_client"))
        );
        CTX.scope(ctx(&sec), async {
            report(Report {
                layer: "rate_limit",
                kind: EventKind::Rejection,
                severity: Severity::Medium,
                rule: Some("per_client"),
                details: "over its rate".into(),
            });
        })
        .await;
        assert_eq!(sec.events_total(), 2);
        assert!(sec.bans().is_empty());
        ctx(&sec).on_error(&aegis_core::error::reject(Refusal(
            "rate_limit",
            "concurrency",
        )));
        assert!(sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reported_end_is_not_reported_again_and_outages_are_not_counted() {
        let sec = Security::builder().max_rejections(0).build();
        let c = ctx(&sec);
        let err = aegis_core::error::reject(MqttError::NotAuthorized);
        CTX.scope(Arc::clone(&c), async { mark_reported() }).await;
        c.on_error(&err);
        assert_eq!(sec.events_total(), 0);
        // The broker is down: logged (low), never counted, even with a threshold of 0.
        let c = ctx(&sec);
        c.on_error(&aegis_core::error::reject(MqttError::ServerUnavailable));
        let e = sec.events(1).pop().unwrap();
        assert_eq!(e.severity, Severity::Low);
        assert_eq!(e.rule.as_deref(), Some("server_unavailable"));
        assert!(sec.bans().is_empty());
        // Nor an open circuit's refusal, nor the shared global rate limit's.
        let c = ctx(&sec);
        c.on_error(&aegis_core::error::reject(Refusal(
            "circuit_breaker",
            "open",
        )));
        let c = ctx(&sec);
        c.on_error(&aegis_core::error::reject(Refusal("rate_limit", "global")));
        let rules: Vec<_> = sec
            .events(2)
            .into_iter()
            .map(|e| (e.severity, e.rule))
            .collect();
        assert_eq!(
            rules,
            [
                (Severity::Low, Some("open".into())),
                (Severity::Low, Some("global".into()))
            ]
        );
        // An enhanced authentication that timed out: the client or the broker stalled
        // it, nobody can tell which. Logged (low), never counted.
        let c = ctx(&sec);
        c.on_error(&aegis_core::error::reject(MqttError::AuthTimeout));
        let e = sec.events(1).pop().unwrap();
        assert_eq!(e.severity, Severity::Low);
        assert_eq!(e.rule.as_deref(), Some("auth_timeout"));
        assert!(sec.bans().is_empty());
        // The broker closed the connection before its CONNACK (an outage, a restart):
        // as the proxy's copy carries it, in the client side's IO error. Logged (low),
        // never counted.
        let c = ctx(&sec);
        c.on_error(&aegis_core::proxy::ProxyError::ClientIo(
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                aegis_core::error::Rejected::uncounted(MqttError::UpstreamClosed),
            ),
        ));
        let e = sec.events(1).pop().unwrap();
        assert_eq!(e.severity, Severity::Low);
        assert_eq!(e.rule.as_deref(), Some("upstream_closed"));
        assert!(sec.bans().is_empty());
        // An error that is not a rejection is no event.
        let c = ctx(&sec);
        c.on_error(&std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(sec.events_total(), 5);
        // A rejection is, and counts: over 0 rejections bans the address.
        let c = ctx(&sec);
        c.on_error(&std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            MqttError::Malformed("x"),
        ));
        assert!(sec.is_banned(&BanKey::addr("192.0.2.7".parse().unwrap())));
    }
}
