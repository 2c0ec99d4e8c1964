//! Connection rate limiting: a global rate, a per-client rate and a cap on concurrent
//! connections per client, with bounded state and rates that change at run time.
//!
//! [`RateLimitLayer`] sits in front of a byte-stream service and decides, once per
//! connection in `call`, whether to let it through. A refused connection is dropped at
//! once (which closes the socket) with a [`RateLimited`] error and counted in
//! `aegis_rejections_total{layer="rate_limit"}`; the inner service never sees it.
//! `poll_ready` only asks the inner service, so a limited client never stalls the
//! others.
//!
//! # Tiers
//!
//! Each tier is optional, and they stack: a connection must pass all that are on.
//!
//! | tier | builder | what it counts | reason label |
//! |---|---|---|---|
//! | concurrency | [`max_concurrent_per_client`](RateLimitBuilder::max_concurrent_per_client) | connections a client has open now (a count, not a rate) | `concurrency` |
//! | per client | [`per_client`](RateLimitBuilder::per_client) | new connections per client, as a GCRA [`Quota`] (rate and burst) | `per_client`; `overflow` for a client beyond [`max_keys`](RateLimitBuilder::max_keys), see [Bounded state](#bounded-state) |
//! | global | [`global`](RateLimitBuilder::global) | new connections from everyone together, as a [`Quota`] | `global` |
//!
//! They are checked in that order. A connection refused for concurrency consumes no
//! rate; the per-client rate comes before the global one so that one client's flood is
//! refused before it drains the budget everyone shares. A concurrency slot is given back
//! when the connection's future completes or is dropped (cancelled, or the connection
//! refused by a later tier).
//!
//! Rates are not given back: a connection the **global** tier refuses has already
//! spent one of its client's per-client cells. While the global rate is exhausted
//! (a flood, or an adaptive controller holding it low), a client that retries drains
//! its own per-client budget on connections that were never served, and may then be
//! refused for `per_client` for up to `burst / rate` after the global tier recovers.
//! Size the per-client burst with that in mind. (Refunding the cell would mean undoing
//! a GCRA step by hand in the right cell, the client's or the overflow bucket, under
//! the quota that was current, with other checks of the same client in between;
//! [`governor`] offers no such operation.)
//!
//! Rates use [`governor`]'s GCRA: a quota of `n` per second with burst `b` admits `b`
//! connections at once, then one every `1/n` s. A quota whose burst takes longer than
//! [`MAX_BURST_REFILL`] (about 146 years) to refill is clamped to it, wherever it comes
//! in (builder, handle, [`KeyedLimiter`]), rather than overflow `governor`'s arithmetic:
//! its burst is cut, keeping its rate.
//!
//! # Keying
//!
//! Clients are keyed by their *effective* address, [`aegis_core::ClientAddr`] (the peer,
//! or the address a trusted PROXY header gave), truncated to a network prefix: IPv4 by
//! `/32` and IPv6 by `/64` by default ([`KeyBy`] changes both). One IPv6 host usually
//! holds a whole `/64`, so keying by the full address would let it rotate addresses to
//! escape its limit. IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`) are folded to IPv4
//! first, so a dual-stack listener keys a client the same on either family. So are 6to4
//! addresses (`2002::/16`: the site's IPv4 address follows the prefix, and the site
//! picks any of 65,536 subnets, a `/64` each, after it) and Teredo addresses
//! (`2001::/32`: every client of one Teredo server shares a `/64`, and its own IPv4
//! address is in the last 32 bits), and addresses in the NAT64 well-known prefix
//! (`64:ff9b::/96`: behind a translator every IPv4 client shows there, its address in
//! the last 32 bits): each is keyed as the IPv4 address it carries, by the IPv4 prefix,
//! so a 6to4 site cannot rotate subnets past its limit and one Teredo or translated
//! client cannot use up the others' (see [IPv4 clients in IPv6
//! addresses](aegis_core::ClientKey#ipv4-clients-in-ipv6-addresses)). The keyed maps
//! hash with std's randomly seeded `SipHash`, which an attacker choosing addresses
//! cannot collide on purpose.
//!
//! # Bounded state
//!
//! The per-client tier keeps one GCRA state per client: the key and a 64-bit
//! theoretical arrival time (TAT) in a [`dashmap`] shard. Memory is bounded in two ways.
//!
//! - **Eviction.** A client whose burst is fully replenished (TAT in the past) is idle:
//!   its state decides exactly like no state, so dropping it changes no decision (but
//!   for a full table, below). The limiter evicts idle clients every
//!   [`evict_every`](RateLimitBuilder::evict_every) (30 s by default) from a tokio task
//!   it spawns on first use. The task holds only a
//!   `Weak` reference and ends at the first tick after the layer, its services and
//!   handles are all dropped. The task runs on the runtime of the first call; if that
//!   runtime shuts down while the limiter lives on, the next call on another runtime
//!   starts a new task. Outside a tokio runtime no task starts; call
//!   [`RateLimitHandle::evict_idle`] (or [`KeyedLimiter::evict_idle`]) yourself.
//! - **A hard cap.** At most [`max_keys`](RateLimitBuilder::max_keys) clients (100,000
//!   by default) are tracked. A *new* client beyond the cap is limited in one shared
//!   **overflow bucket** with the per-client quota, until eviction frees slots. A
//!   refusal there is [`RateLimited::Overflow`] (reason label `overflow`), not
//!   `per_client`: every untracked client shares that bucket, so the refusal says
//!   nothing about the client's own rate ([`Throttled::overflow`] tells it for a
//!   [`KeyedLimiter`]). A ban detector must not count it against the client, as it
//!   must not count `global` (`aegis_mqtt::security` counts neither).
//!
//! The trade-off of the overflow bucket: memory stays bounded whatever the flood (a
//! million spoofed or rotating addresses add nothing beyond the cap), and clients already
//! tracked keep their own budget, so known legitimate clients active since the last
//! eviction are not hurt. The cost is
//! that during such a flood all *new* clients share one client's budget, so a new
//! legitimate client may be refused (`overflow`) until the flood ends and eviction
//! catches up. "New" includes a known client that stayed idle past an eviction: its
//! state was dropped (it decided exactly like no state), so while the table is full it
//! comes back on the overflow bucket too. The alternatives were worse: refusing every
//! new client outright, or evicting busy clients to make room, which would reset an
//! attacker's own limit.
//!
//! The concurrency tier keeps an entry only while a client has a connection open, so
//! it never holds more entries than there are live connections (bounded by the accept
//! loop's `max_connections`).
//!
//! [`KeyedLimiter`] is the same machinery, public and generic over its key, for layers
//! that key by something else (an MQTT client id, say).
//!
//! # Changing the rate at run time
//!
//! [`RateLimitLayer::handle`] returns a [`RateLimitHandle`]: `set_per_client(Quota)`,
//! `set_global(Quota)`, and `set_per_client_rate` / `set_global_rate` taking a plain
//! `NonZeroU32` connections per second (keeping the current burst), for a controller
//! such as the `adaptive` layer to drive.
//!
//! A rate change resets no client. [`governor`] keeps the GCRA state (the TAT per key)
//! in a state store separate from the quota, so the store here is our own bounded one,
//! shared behind an `Arc`: a rate change builds a new `governor::RateLimiter` over the
//! *same* store and swaps it in with [`arc_swap`] (a lock-free pointer swap; connections
//! in flight finish on the limiter they loaded). Every TAT is stored in nanoseconds
//! since one epoch fixed when the limiter was created, and every `RateLimiter` built
//! over the store measures from that epoch.
//!
//! Each client keeps the part of its burst it has used: a client at its limit stays at
//! it, one with half its burst left has half of the new burst left (with the burst
//! kept, as the `*_rate` setters do: the cells it has used). A TAT is a time, and the
//! same time means another part of the burst under another quota, so a change
//! re-expresses every stored TAT for the new quota, in one pass over the tracked
//! clients (at most [`max_keys`](RateLimitBuilder::max_keys)) under a lock that keeps
//! changes one at a time; checks go on meanwhile, on the old limiter or the new one in
//! the order that can only refuse more during the pass, never admit more. Left as they were, raising the rate
//! tenfold would lock a client at its limit out for ten times its burst, and lowering it
//! would hand out burst again on every step of a controller cutting the rate.
//!
//! # Clock
//!
//! The default clock, [`TokioClock`], is monotonic tokio time, so tests that pause time
//! drive it. [`KeyedLimiter::with_clock`] takes any [`governor::clock::Clock`].
//!
//! # Metrics
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_rejections_total` | counter | `layer="rate_limit"`, `reason`: `global`, `per_client`, `overflow`, `concurrency` | refused connections |
//! | `aegis_rate_limit_keys` | gauge | `limiter` (`per_client` here) | keys tracked, set when a key is added and after each eviction |
//! | `aegis_rate_limit_evictions_total` | counter | `limiter` | idle keys evicted |
//! | `aegis_rate_limit_overflow_total` | counter | `limiter` | checks of new keys that went to the overflow bucket because the cap was reached |
//!
//! # Example
//!
//! ```
//! use std::num::NonZeroU32;
//! use aegis_core::{BoxError, Conn};
//! use aegis_layers::rate_limit::{Quota, RateLimitLayer, RateLimited};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let limit = RateLimitLayer::builder()
//!     .global(Quota::per_second(NonZeroU32::new(1_000).unwrap()))
//!     .per_client(Quota::per_second(NonZeroU32::new(2).unwrap()))
//!     .max_concurrent_per_client(16)
//!     .build();
//! let handle = limit.handle();
//! let mut svc = ServiceBuilder::new()
//!     .layer(limit)
//!     .service(service_fn(|_conn: Conn<()>| async { Ok::<_, BoxError>(()) }));
//!
//! let (peer, local) = ("192.0.2.1:4000".parse()?, "127.0.0.1:1883".parse()?);
//! for _ in 0..2 {
//!     svc.ready().await?.call(Conn::new((), peer, local)).await?;
//! }
//! // The third connection within the second is over the per-client burst.
//! let err = svc.ready().await?.call(Conn::new((), peer, local)).await.unwrap_err();
//! assert_eq!(aegis_core::error::label_of(&*err), ("rate_limit", "per_client"));
//! assert!(aegis_core::error::find::<RateLimited>(&*err).is_some());
//!
//! // An adaptive controller can lower the rate while serving, resetting no client.
//! handle.set_per_client_rate(NonZeroU32::new(1).unwrap());
//! assert_eq!(handle.per_client().unwrap().replenish_interval().as_secs(), 1);
//! # Ok(())
//! # }
//! ```

mod clock;
mod concurrency;
mod direct;
mod error;
pub mod future;
mod handle;
mod keyed;
mod layer;
mod service;
mod store;

pub use self::clock::TokioClock;
pub use self::concurrency::{ConcurrencyLimit, ConcurrencySlot};
pub use self::error::RateLimited;
pub use self::handle::RateLimitHandle;
pub use self::keyed::{
    DEFAULT_EVICT_EVERY, DEFAULT_MAX_KEYS, KeyedLimiter, MAX_BURST_REFILL, Throttled,
};
pub use self::layer::{RateLimitBuilder, RateLimitLayer};
pub use self::service::RateLimit;
pub use aegis_core::{ClientKey, KeyBy};
pub use governor::Quota;

/// The metric names of this module (see the [module docs](self#metrics)).
pub mod metrics {
    /// `aegis_rate_limit_keys{limiter}`: keys tracked.
    pub const KEYS: &str = "aegis_rate_limit_keys";
    /// `aegis_rate_limit_evictions_total{limiter}`: idle keys evicted.
    pub const EVICTIONS_TOTAL: &str = "aegis_rate_limit_evictions_total";
    /// `aegis_rate_limit_overflow_total{limiter}`: new keys limited in the overflow
    /// bucket.
    pub const OVERFLOW_TOTAL: &str = "aegis_rate_limit_overflow_total";

    #[allow(clippy::cast_precision_loss)] // key counts are far below 2^52
    pub(super) fn keys(limiter: &'static str, n: usize) {
        metrics::gauge!(KEYS, "limiter" => limiter).set(n as f64);
    }

    pub(super) fn evicted(limiter: &'static str, n: usize) {
        metrics::counter!(EVICTIONS_TOTAL, "limiter" => limiter).increment(n as u64);
    }

    pub(super) fn overflow(limiter: &'static str) {
        metrics::counter!(OVERFLOW_TOTAL, "limiter" => limiter).increment(1);
    }
}
