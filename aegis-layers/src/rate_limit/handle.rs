//! [`RateLimitHandle`]: read and change the rates at run time.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use governor::Quota;

use super::layer::Shared;

/// Reads and changes the rates of a [`RateLimitLayer`](super::RateLimitLayer) while it
/// serves, without resetting any client's state (see the
/// [module docs](super#changing-the-rate-at-run-time)).
///
/// Cheap to clone; all clones act on the same layer. A setter on a tier that is off turns
/// it on.
#[derive(Clone)]
pub struct RateLimitHandle {
    shared: Arc<Shared>,
}

impl RateLimitHandle {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Sets the per-client quota, clamped to
    /// [`MAX_BURST_REFILL`](super::MAX_BURST_REFILL) (never a panic, whatever the
    /// quota).
    pub fn set_per_client(&self, quota: Quota) {
        self.shared.per_client.set_quota(quota);
        self.shared.per_client_on.store(true, Ordering::Release);
    }

    /// Sets the per-client rate to `per_second` connections a second, keeping the
    /// current burst size (or a burst of `per_second` if the tier was off).
    pub fn set_per_client_rate(&self, per_second: NonZeroU32) {
        let burst = self.per_client().map_or(per_second, |q| q.burst_size());
        self.set_per_client(Quota::per_second(per_second).allow_burst(burst));
    }

    /// Turns the per-client rate off; the clients' state is kept for when it comes back.
    pub fn disable_per_client(&self) {
        self.shared.per_client_on.store(false, Ordering::Release);
    }

    /// The per-client quota (as clamped), `None` when that tier is off.
    pub fn per_client(&self) -> Option<Quota> {
        self.shared
            .per_client_on
            .load(Ordering::Acquire)
            .then(|| self.shared.per_client.quota())
    }

    /// Sets the global quota, clamped to [`MAX_BURST_REFILL`](super::MAX_BURST_REFILL)
    /// (never a panic, whatever the quota).
    pub fn set_global(&self, quota: Quota) {
        self.shared.global.set_quota(quota);
        self.shared.global_on.store(true, Ordering::Release);
    }

    /// Sets the global rate to `per_second` connections a second, keeping the current
    /// burst size (or a burst of `per_second` if the tier was off).
    pub fn set_global_rate(&self, per_second: NonZeroU32) {
        let burst = self.global().map_or(per_second, |q| q.burst_size());
        self.set_global(Quota::per_second(per_second).allow_burst(burst));
    }

    /// Turns the global rate off; its state is kept for when it comes back.
    pub fn disable_global(&self) {
        self.shared.global_on.store(false, Ordering::Release);
    }

    /// The global quota (as clamped), `None` when that tier is off.
    pub fn global(&self) -> Option<Quota> {
        self.shared
            .global_on
            .load(Ordering::Acquire)
            .then(|| self.shared.global.quota())
    }

    /// The cap on concurrent connections per client, if set.
    pub fn max_concurrent_per_client(&self) -> Option<u32> {
        self.shared.concurrency.as_ref().map(|c| c.max())
    }

    /// Clients with at least one connection open (0 when the concurrency tier is off).
    pub fn clients_connected(&self) -> usize {
        self.shared.concurrency.as_ref().map_or(0, |c| c.clients())
    }

    /// Connections `ip`'s client has open (0 when the concurrency tier is off).
    pub fn open_connections(&self, ip: std::net::IpAddr) -> u32 {
        let key = self.shared.key_by.key(ip);
        self.shared.concurrency.as_ref().map_or(0, |c| c.open(&key))
    }

    /// Clients the per-client tier tracks now.
    pub fn tracked_clients(&self) -> usize {
        self.shared.per_client.len()
    }

    /// Evicts idle clients now, as the scheduled eviction does; returns how many.
    pub fn evict_idle(&self) -> usize {
        self.shared.per_client.evict_idle()
    }
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle")
            .field("global", &self.global())
            .field("per_client", &self.per_client())
            .field(
                "max_concurrent_per_client",
                &self.max_concurrent_per_client(),
            )
            .finish()
    }
}
