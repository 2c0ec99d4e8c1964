//! [`RateLimitLayer`] and its builder.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use governor::Quota;
use tower_layer::Layer;

use super::clock::TokioClock;
use super::concurrency::ConcurrencyLimit;
use super::direct::DirectLimiter;
use super::keyed::{DEFAULT_EVICT_EVERY, DEFAULT_MAX_KEYS, KeyedLimiter};
use super::{ClientKey, KeyBy, RateLimit, RateLimitHandle};

/// The `limiter` label of the per-client tier's metrics.
pub(super) const PER_CLIENT: &str = "per_client";

/// State shared by the layer, every service it builds and every handle.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) key_by: KeyBy,
    pub(super) global_on: AtomicBool,
    pub(super) global: DirectLimiter,
    pub(super) per_client_on: AtomicBool,
    pub(super) per_client: KeyedLimiter<ClientKey>,
    pub(super) concurrency: Option<Arc<ConcurrencyLimit>>,
}

/// Applies [`RateLimit`] to a byte-stream service: a global rate, a per-client rate and
/// a cap on concurrent connections per client, each optional.
///
/// Every service built from one layer (and its clones) shares one state, so the limits
/// hold across all connections; [`handle`](Self::handle) changes the rates at run time.
/// See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// Starts a configuration with every tier off.
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder::default()
    }

    /// A handle that reads and changes the rates of this layer's services.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle::new(Arc::clone(&self.shared))
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Arc::clone(&self.shared))
    }
}

/// Configures a [`RateLimitLayer`]. Every tier is off until set.
#[derive(Clone, Debug)]
pub struct RateLimitBuilder {
    global: Option<Quota>,
    per_client: Option<Quota>,
    max_concurrent: Option<u32>,
    key_by: KeyBy,
    max_keys: usize,
    evict_every: Duration,
}

impl Default for RateLimitBuilder {
    fn default() -> Self {
        Self {
            global: None,
            per_client: None,
            max_concurrent: None,
            key_by: KeyBy::default(),
            max_keys: DEFAULT_MAX_KEYS,
            evict_every: DEFAULT_EVICT_EVERY,
        }
    }
}

impl RateLimitBuilder {
    /// Limits new connections from all clients together to `quota` (clamped to
    /// [`MAX_BURST_REFILL`](super::MAX_BURST_REFILL)).
    #[must_use]
    pub fn global(mut self, quota: Quota) -> Self {
        self.global = Some(quota);
        self
    }

    /// Limits new connections from each client (each [`ClientKey`]) to `quota` (clamped
    /// to [`MAX_BURST_REFILL`](super::MAX_BURST_REFILL)).
    #[must_use]
    pub fn per_client(mut self, quota: Quota) -> Self {
        self.per_client = Some(quota);
        self
    }

    /// Caps the connections each client may have open at once.
    #[must_use]
    pub fn max_concurrent_per_client(mut self, max: u32) -> Self {
        self.max_concurrent = Some(max);
        self
    }

    /// How client addresses become keys (default: IPv4 `/32`, IPv6 `/64`; an
    /// IPv4-mapped, 6to4, Teredo or NAT64 address as the IPv4 address it carries, by
    /// the IPv4 prefix).
    #[must_use]
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.key_by = key_by;
        self
    }

    /// The most clients the per-client tier tracks at once (default 100,000); new
    /// clients beyond it share one overflow bucket.
    #[must_use]
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// How often the per-client tier evicts idle clients (default 30 s). A duration
    /// past what a `tokio::time::Instant` holds (`Duration::MAX`) means some thirty
    /// years: no scheduled eviction.
    ///
    /// # Panics
    ///
    /// [`build`](Self::build) panics if it is zero.
    #[must_use]
    pub fn evict_every(mut self, every: Duration) -> Self {
        self.evict_every = every;
        self
    }

    /// Builds the layer and its shared state.
    pub fn build(self) -> RateLimitLayer {
        let clock = TokioClock::new();
        // A tier that is off still has a limiter, with a placeholder quota, so that the
        // handle can turn it on later without any lock on the connection path.
        let placeholder = Quota::per_second(std::num::NonZeroU32::MAX);
        let per_client = KeyedLimiter::with_clock(
            self.per_client.unwrap_or(placeholder),
            self.max_keys,
            PER_CLIENT,
            clock,
        )
        .evict_every(self.evict_every);
        RateLimitLayer {
            shared: Arc::new(Shared {
                key_by: self.key_by,
                global_on: AtomicBool::new(self.global.is_some()),
                global: DirectLimiter::new(self.global.unwrap_or(placeholder), clock),
                per_client_on: AtomicBool::new(self.per_client.is_some()),
                per_client,
                concurrency: self
                    .max_concurrent
                    .map(|m| Arc::new(ConcurrencyLimit::new(m))),
            }),
        }
    }
}
