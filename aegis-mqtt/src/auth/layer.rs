use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aegis_core::{BoxError, KeyBy};
use tower_layer::Layer;
use tower_service::Service;

use super::cache::{Cache, Settings};
use super::{Auth, AuthError, Credentials, Decision};

/// Authenticates each CONNECT with an authenticator `A` and caches its decisions. See the
/// [module docs](super) for an example.
///
/// Cheap to clone: the authenticator (itself cheap to clone) and an `Arc` of the cache
/// and of the callouts in flight, shared by every clone and every service it builds.
#[derive(Debug, Clone)]
#[must_use]
pub struct AuthLayer<A> {
    pub(super) authn: A,
    pub(super) settings: Settings,
    pub(super) cache: Arc<Cache>,
}

impl<A> AuthLayer<A> {
    /// Authenticates with `authn`; allows are cached for 60 s and denies for 5 s, at most
    /// 10,000 decisions in all, a callout gets 5 s, and each client address has at most 4
    /// checks in flight.
    pub fn new(authn: A) -> Self {
        Self {
            authn,
            settings: Settings {
                ttl: super::DEFAULT_TTL,
                deny_ttl: super::DEFAULT_DENY_TTL,
                max_entries: super::DEFAULT_MAX_ENTRIES,
                timeout: super::DEFAULT_TIMEOUT,
                max_checks_per_addr: super::DEFAULT_MAX_CHECKS_PER_ADDR,
                key_by: KeyBy::new(32, 64),
            },
            cache: Arc::new(Cache::new()),
        }
    }

    /// How long an allow is cached (60 s by default; zero: not cached).
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = ttl;
        self
    }

    /// How long a deny is cached (5 s by default; zero: not cached). A cached deny spares
    /// the service a brute force of the same credentials from the same address; a new
    /// password is another key and is checked at once.
    pub const fn deny_ttl(mut self, ttl: Duration) -> Self {
        self.settings.deny_ttl = ttl;
        self
    }

    /// The most decisions cached (10,000 by default). A full cache drops its expired
    /// decisions (at most once a second); while it is still full, new decisions are not
    /// cached (`aegis_mqtt_auth_cache_full_total`). Zero caches nothing.
    pub const fn max_entries(mut self, n: usize) -> Self {
        self.settings.max_entries = n;
        self
    }

    /// How long the authenticator has to decide (5 s by default); past it, the check
    /// fails with [`AuthError::Timeout`] and the client is refused.
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// The most checks a client address may have in flight, waiting for or running a
    /// callout (4 by default); clients are keyed by [`key_by`](Self::key_by) (IPv4 by
    /// address, IPv6 by /64).
    /// A check over it is refused at once with [`AuthError::TooManyChecks`], without
    /// reaching the authenticator, and reported with severity `medium` (counted toward a
    /// ban). A check answered from the cache takes no turn. See the
    /// [module docs](super#checks-per-address).
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    pub const fn max_checks_per_addr(mut self, n: usize) -> Self {
        assert!(n > 0, "max_checks_per_addr must be at least 1");
        self.settings.max_checks_per_addr = n;
        self
    }

    /// How client addresses are keyed for
    /// [`max_checks_per_addr`](Self::max_checks_per_addr) ([`KeyBy::default`]: IPv4 by
    /// /32, IPv6 by /64). Give it the `KeyBy` of the rest of the stack (its rate limits and
    /// security layer), so that a client is one client to all of them.
    pub const fn key_by(mut self, key_by: KeyBy) -> Self {
        self.settings.key_by = key_by;
        self
    }

    /// How many client addresses have checks in flight right now (each at most
    /// [`max_checks_per_addr`](Self::max_checks_per_addr)). For tests and diagnostics.
    pub fn addrs_checking(&self) -> usize {
        self.cache.addrs_checking()
    }

    /// The authenticator.
    pub const fn authenticator(&self) -> &A {
        &self.authn
    }

    /// How many checks are waiting on a callout right now: each callout in flight, plus
    /// each check sharing one. For tests and diagnostics.
    pub fn pending(&self) -> usize {
        self.cache.pending()
    }

    /// How many decisions are cached now (expired ones included until purged).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

impl<A> AuthLayer<A>
where
    A: Service<Credentials, Response = Decision> + Clone + Send + 'static,
    A::Error: Into<BoxError>,
    A::Future: Send,
{
    /// Checks `creds` without a connection: from the cache, by sharing a callout in flight
    /// for the same credentials, address and protocol version, or by calling the
    /// authenticator. This is what the service does with each CONNECT (and what the
    /// benchmark measures); the result is counted in `aegis_mqtt_auth_total`.
    ///
    /// # Errors
    ///
    /// The authenticator failed, timed out or could not be reached ([`AuthError`]).
    pub fn check(
        &self,
        creds: Credentials,
    ) -> impl Future<Output = Result<Decision, AuthError>> + Send + 'static {
        Arc::clone(&self.cache).check(self.authn.clone(), self.settings, creds)
    }
}

impl<S, A: Clone> Layer<S> for AuthLayer<A> {
    type Service = Auth<S, A>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}
