//! Authentication of each CONNECT: an authenticator decides, a TTL cache remembers.
//!
//! [`AuthLayer`] sits **inside** [`MqttLayer`](crate::layer::MqttLayer): it wraps the
//! service that `MqttLayer` hands each validated connection to, so it only ever sees
//! valid CONNECTs. For each one, the credentials ([`Credentials`]: client id, username,
//! password, client address, protocol version) go to an *authenticator*: any
//! `tower::Service<Credentials, Response = Decision>` that is `Clone + Send + 'static`,
//! with a `Send` future and an error convertible into a `BoxError`. Plug in your own, or
//! use one of the two shipped here:
//!
//! - [`HttpAuth`] (feature `auth-http`) POSTs the credentials as JSON to a URL;
//! - [`StaticAuth`] (feature `auth-static`) checks them against a file of users and
//!   argon2 password hashes.
//!
//! On [`Decision::Allow`] the inner service is called with the same
//! [`MqttIo`](crate::layer::MqttIo): the CONNECT's bytes reach it untouched. Otherwise the
//! client gets the version-correct CONNACK and the stream is shut down; the inner service
//! is never called.
//!
//! # Stacking
//!
//! `MqttLayer::new(config).layer(AuthLayer::new(authn).layer(proxy))`, or with a
//! `ServiceBuilder`, `MqttLayer` first:
//! `ServiceBuilder::new().layer(MqttLayer::new(config)).layer(AuthLayer::new(authn)).service(proxy)`.
//! The stream needs the [`ClientAddr`](aegis_core::ClientAddr) param (`aegis_core::Conn`
//! has it). A `SecurityLayer` goes outside the `MqttLayer` (see [`crate::security`]); the
//! auth layer's refusals then become its events.
//!
//! # Failing closed
//!
//! | outcome | refusal (`aegis_rejections_total{layer="mqtt"}` reason) | 3.1 / 3.1.1 | 5.0 |
//! |---|---|---|---|
//! | [`Decision::Deny`] | `not_authorized` | CONNACK `20 02 00 05` | CONNACK `20 03 00 87 00` |
//! | any [`AuthError`]: timeout, unreachable service, unexpected status, other error | `auth_error` | CONNACK `20 02 00 05` | CONNACK `20 03 00 87 00` |
//! | [`AuthError::TooManyChecks`]: too many checks in flight from the client's address ([below](#checks-per-address)) | `auth_error` | CONNACK `20 02 00 05` | CONNACK `20 03 00 87 00` |
//!
//! The service's future then fails with the [`MqttError`](crate::MqttError)
//! (`NotAuthorized` or `AuthError`) wrapped in an [`aegis_core::error::Rejected`] (counted
//! once, when the CONNACK is written): `aegis_core::error::label_of` names it and
//! `aegis_core::error::find::<MqttError>` reaches it. Each refusal is also a security event for the
//! `SecurityLayer` around the stack, if any ([`crate::security`]): kind `auth_failure`,
//! layer `auth`, rule `denied` (severity `medium`, counted toward `max_auth_failures`)
//! or the error's [label](AuthError::label) (severity `low`, logged but not counted: an
//! outage of the authenticator must not ban every client), except `too_many_checks`
//! (severity `medium`, counted: a flood from the client's address). A cached deny is reported
//! like any other, so a brute force still counts. Each refusal is also a `debug` log
//! line with the client id (Debug-quoted) and address; the password is
//! never logged, and [`Credentials`]' `Debug` redacts it.
//!
//! # Caching
//!
//! Decisions are cached under a SHA-256 digest of a per-process random salt, the client
//! id, username and password (length-prefixed), the client's IP address (not its port)
//! and the protocol version (which the authenticator is told). A changed password,
//! another client id, another address or another version is thus another key and is
//! checked anew; the password itself is never stored.
//!
//! - An allow is cached for [`ttl`](AuthLayer::ttl) (60 s by default), a deny for
//!   [`deny_ttl`](AuthLayer::deny_ttl) (5 s by default: long enough that a brute force of
//!   the same credentials does not reach the service on every attempt, short enough that
//!   a user fixed on the service gets in soon). Errors and timeouts are never cached.
//! - At most [`max_entries`](AuthLayer::max_entries) decisions (10,000 by default). A
//!   full cache drops its expired entries, at most once a second; if it is still full,
//!   the new decision is not cached (counted in `aegis_mqtt_auth_cache_full_total`).
//! - Single flight: concurrent checks of the same key share one callout. If the check
//!   leading a callout is dropped (its client went away), one of those waiting takes
//!   over with a callout of its own; none hangs.
//! - A callout has [`timeout`](AuthLayer::timeout) (5 s by default) to decide.
//!
//! # Checks per address
//!
//! A client that tries a new password on each CONNECT is never answered from the cache,
//! and the authenticators run only so many callouts at once
//! ([`StaticAuth::max_concurrent`], one argon2 verification per CPU;
//! [`HttpAuth::max_concurrent`]): the other checks wait for a turn, in one queue shared by
//! every client, and that wait counts toward the [`timeout`](AuthLayer::timeout). Without
//! a bound per client, a few addresses sending new passwords, each under any connection
//! rate limit, fill that queue: a real user's check times out in it
//! ([`AuthError::Timeout`], CONNACK 0x05), and so do the attackers' own, which as
//! authenticator errors are not counted toward a ban.
//!
//! So each client address has at most
//! [`max_checks_per_addr`](AuthLayer::max_checks_per_addr) checks in flight (4 by
//! default): waiting for or running a callout, its own or one it shares. Clients are
//! keyed by [`key_by`](AuthLayer::key_by): IPv4 by address, IPv6 by /64 by default, as
//! the other per-client limits (give it theirs).
//! A check over the cap is refused at once, without queueing and without reaching the
//! authenticator, with [`AuthError::TooManyChecks`] (CONNACK 0x05 / 0x87, counted in
//! `aegis_mqtt_auth_total{result="too_many_checks", cache="refused"}`), and reported to
//! the `SecurityLayer` with severity `medium`, rule `too_many_checks`: it counts toward
//! `max_auth_failures`, so a flooding address is banned (and the ban closes its
//! connections still waiting). A check answered from the cache takes no turn and is never
//! refused. The count of an address is kept under the cache's lock and given back when
//! its check ends or is dropped; an address with none in flight is forgotten, so the
//! layer never keeps more addresses than checks in flight.
//!
//! What the cap does not do: many addresses (a botnet, or an IPv6 attacker with many
//! /64s) can still fill the queue, `max_checks_per_addr` checks each; every one of them
//! is now held to that many and banned for flooding, but an authenticator's capacity is
//! still shared by all clients. Many legitimate clients behind one NAT address share
//! one count too: raise the cap for them.
//!
//! [`AuthLayer::check`] runs the same check without a connection.
//!
//! # Metrics
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_mqtt_auth_callout_seconds` | histogram | | latency of each callout to the authenticator, whatever its outcome (timeouts included) |
//! | `aegis_mqtt_auth_total` | counter | `result`: `allow`, `deny`, `error`, `too_many_checks`; `cache`: `hit`, `miss`, `shared`, `refused` | checks by result; `hit`: decided by the cache, `miss`: by a callout of its own, `shared`: by a callout another check made for the same key, `refused` (with `result="too_many_checks"`): refused without a callout, its address having [`max_checks_per_addr`](AuthLayer::max_checks_per_addr) checks in flight |
//! | `aegis_mqtt_auth_cache_full_total` | counter | | decisions not cached because the cache was full |
//!
//! Refusals are counted in `aegis_rejections_total{layer="mqtt", reason="not_authorized"
//! | "auth_error"}`.
//!
//! # The HTTP authenticator
//!
//! `HttpAuth` (feature `auth-http`) sends each callout as
//! `POST <url>` with `Content-Type: application/json` and a body such as
//!
//! ```json
//! {"client_id": "c1", "username": "alice", "password": "secret",
//!  "client_addr": "192.0.2.1:4000", "protocol": "3.1.1"}
//! ```
//!
//! `username` and `password` are `null` when the CONNECT has none; a password that is not
//! UTF-8 is sent as `"password_hex"` (lower-case hex) instead of `"password"`; `protocol`
//! is `"3.1"`, `"3.1.1"` or `"5.0"`. A 2xx answer allows, 401 and 403 deny, anything else
//! is an error ([`AuthError::Status`]). The status alone decides, as soon as it is in:
//! the answer's body is read and ignored afterwards, at most 4 KiB of it within 100 ms
//! (a longer or slower body costs its connection, not the decision), so that the
//! connection can be reused. Only `http://` URLs are supported (no TLS): run the service
//! on the same host or a trusted network.
//!
//! A client that tries a new password each time is never answered from the cache, so
//! at most [`HttpAuth::max_concurrent`] callouts run at once (32 by default), each on a
//! connection of its own (a callout's turn lasts until its answer's body is read), and
//! the pool keeps at most that many idle connections for reuse (for 90 s). Further
//! checks wait for a turn, holding no connection, and their wait counts toward the
//! layer's [`timeout`](AuthLayer::timeout): one that times out while waiting sends
//! nothing.
//!
//! # The file of users
//!
//! `StaticAuth` (feature `auth-static`) reads lines `username:PHC-hash`, where the hash
//! is an argon2 (`argon2id`, `argon2i` or `argon2d`) PHC string as written by
//! `StaticAuth::hash_password` or the `argon2` command line tool:
//!
//! ```text
//! # users of the gateway
//! alice:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$...
//! ```
//!
//! Blank lines and lines starting with `#` are skipped. A line that is not
//! `username:hash`, a hash that is not a valid argon2 PHC string (a plain-text password,
//! say) and a user given twice are errors naming the line.
//! [`StaticAuth::from_file`] reads a regular file only (a FIFO would hang the start,
//! `/dev/zero` never end) of at most [`StaticAuth::MAX_FILE_LEN`] bytes (64 MiB, over
//! half a million users); anything else is refused, a longer file too, never cut. A password is verified on
//! tokio's blocking pool; an unknown user, or a CONNECT without a password, is denied
//! after a verification against a dummy hash all the same, so the time taken does not
//! tell which users exist.
//!
//! A verification costs what the hash's parameters say, so every user of a file must
//! share one set: the same algorithm, version, memory (`m`), passes (`t`), lanes (`p`)
//! and output length (the salts differ, of course). The dummy hash is made with that set
//! when the file is loaded, and a file that mixes sets is refused, naming the first line
//! that differs: an unknown user's check could only cost the same as one of the sets.
//! To change the parameters, rehash every user's password with the new ones. A set over
//! [`StaticAuth::MAX_M_COST`] (2 GiB of memory), [`StaticAuth::MAX_T_COST`] (32 passes)
//! or [`StaticAuth::MAX_P_COST`] (64 lanes) is refused, naming its line, before
//! anything is hashed: argon2 itself allows 4 TiB and 2^32 - 1 passes, which the dummy
//! hash would try at load, and every login after.
//!
//! Each verification takes a blocking thread and the `m` KiB of memory of the file's
//! parameters (19 MiB with argon2's defaults) for as long as it runs, and a client that
//! tries a new password each time is never answered from the cache. So at most
//! [`StaticAuth::max_concurrent`] verifications run at once, one per CPU by default (at
//! least 2): argon2 then holds at most that many times `m` KiB (38 MiB for two, with the
//! defaults) and that many of tokio's blocking threads, which other users of
//! `spawn_blocking` keep. Further checks wait for a turn, holding neither, and their
//! wait counts toward the layer's [`timeout`](AuthLayer::timeout): one that times out
//! while waiting never starts a verification. A verification that has started cannot be
//! cancelled: it keeps its turn until it is done, even if its check timed out.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! use std::convert::Infallible;
//! use aegis_core::Conn;
//! use aegis_mqtt::auth::{AuthLayer, Credentials, Decision};
//! use aegis_mqtt::layer::{MqttIo, MqttLayer};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! // Allows user "alice" with password "pw"; anything else is denied.
//! let authn = service_fn(|c: Credentials| async move {
//!     let ok = c.username.as_deref() == Some("alice") && c.password.as_deref() == Some(b"pw");
//!     Ok::<_, Infallible>(if ok { Decision::Allow } else { Decision::Deny })
//! });
//! // The broker side: accepts the CONNECT, and reads what the client sent.
//! let broker = service_fn(|mut io: MqttIo<Conn<DuplexStream>>| async move {
//!     io.write_all(&[0x20, 0x02, 0x00, 0x00]).await?;
//!     let mut seen = Vec::new();
//!     io.read_to_end(&mut seen).await.map(|_| seen)
//! });
//! let svc = MqttLayer::default().layer(AuthLayer::new(authn).layer(broker));
//!
//! // A 3.1.1 CONNECT with client id "c", username `user` and password "pw".
//! let connect = |user: &[u8]| {
//!     let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60, 0, 1, b'c'];
//!     body.extend([0, user.len() as u8]);
//!     body.extend(user);
//!     body.extend([0, 2, b'p', b'w']);
//!     let mut frame = vec![0x10, body.len() as u8];
//!     frame.extend(body);
//!     frame
//! };
//! for (user, allowed) in [(&b"alice"[..], true), (b"mallory", false)] {
//!     let (mut client, server) = tokio::io::duplex(1024);
//!     let io = Conn::new(server, "192.0.2.1:4000".parse()?, "127.0.0.1:1883".parse()?);
//!     let conn = tokio::spawn(svc.clone().oneshot(io));
//!     client.write_all(&connect(user)).await?;
//!     client.shutdown().await?;
//!     let mut answer = Vec::new();
//!     client.read_to_end(&mut answer).await?;
//!     let result = conn.await?;
//!     if allowed {
//!         assert_eq!(result?, connect(user)); // the broker got the CONNECT, byte for byte
//!     } else {
//!         assert_eq!(answer, [0x20, 0x02, 0x00, 0x05]); // CONNACK: not authorized
//!         let err = result.unwrap_err();
//!         assert_eq!(aegis_core::error::label_of(&*err), ("mqtt", "not_authorized"));
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::Version;

mod cache;
pub mod error;
#[cfg(feature = "auth-static")]
mod file;
pub mod future;
#[cfg(feature = "auth-http")]
mod http;
mod layer;
mod service;

pub use self::error::AuthError;
#[cfg(feature = "auth-static")]
#[cfg_attr(docsrs, doc(cfg(feature = "auth-static")))]
pub use self::file::{StaticAuth, StaticAuthError};
#[cfg(feature = "auth-http")]
#[cfg_attr(docsrs, doc(cfg(feature = "auth-http")))]
pub use self::http::HttpAuth;
pub use self::layer::AuthLayer;
pub use self::service::Auth;

/// How long an allow is cached by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// How long a deny is cached by default.
pub const DEFAULT_DENY_TTL: Duration = Duration::from_secs(5);
/// How many decisions are cached at most by default.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// How long a callout may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many checks a client address may have in flight by default.
pub const DEFAULT_MAX_CHECKS_PER_ADDR: usize = 4;

/// The metric names of the auth layer (see the [module docs](super#metrics)).
pub mod metrics {
    /// `aegis_mqtt_auth_callout_seconds`: histogram of callout latency.
    pub const CALLOUT_SECONDS: &str = "aegis_mqtt_auth_callout_seconds";
    /// `aegis_mqtt_auth_total{result, cache}`: checks by result and cache use.
    pub const AUTH_TOTAL: &str = "aegis_mqtt_auth_total";
    /// `aegis_mqtt_auth_cache_full_total`: decisions not cached, the cache being full.
    pub const CACHE_FULL_TOTAL: &str = "aegis_mqtt_auth_cache_full_total";
}

/// What a client presented in its CONNECT, and where it connects from.
///
/// `Debug` shows whether a password was given, never the password.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Credentials {
    /// The client identifier (may be empty).
    pub client_id: Arc<str>,
    /// The user name, if the CONNECT has one.
    pub username: Option<Arc<str>>,
    /// The password, if the CONNECT has one (any bytes).
    pub password: Option<Bytes>,
    /// The client's address.
    pub client_addr: SocketAddr,
    /// The protocol version of the CONNECT.
    pub version: Version,
}

impl Credentials {
    /// Credentials with a client id, an optional username and password, from
    /// `client_addr`, over MQTT 3.1.1.
    pub fn new(
        client_id: impl Into<Arc<str>>,
        username: Option<&str>,
        password: Option<&[u8]>,
        client_addr: SocketAddr,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            username: username.map(Arc::from),
            password: password.map(Bytes::copy_from_slice),
            client_addr,
            version: Version::V3_1_1,
        }
    }

    /// The same credentials, for a CONNECT of `version`.
    #[must_use]
    pub const fn with_version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("client_addr", &self.client_addr)
            .field("version", &self.version)
            .finish()
    }
}

/// What an authenticator decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Let the client in.
    Allow,
    /// Refuse the client: CONNACK 0x05 (3.x) or 0x87 (5.0).
    Deny,
}
