//! The concurrency tier: a count of open connections per client, not a rate. Public as a
//! building block, as [`KeyedLimiter`](super::KeyedLimiter) is, for a server that caps
//! its clients' open connections outside a tower stack.

use std::fmt;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::ClientKey;

/// Open connections per client, at most `max` each: the tier of
/// [`max_concurrent_per_client`](super::RateLimitBuilder::max_concurrent_per_client). An
/// entry exists only while its client has a connection open, so the map never holds more
/// entries than there are live connections (bounded by the accept loop's connection
/// cap).
///
/// ```
/// use std::sync::Arc;
/// use aegis_layers::rate_limit::{ClientKey, ConcurrencyLimit};
///
/// let limit = Arc::new(ConcurrencyLimit::new(2));
/// let client = ClientKey::host("192.0.2.7".parse().unwrap());
/// let first = limit.acquire(client).unwrap();
/// let _second = limit.acquire(client).unwrap();
/// assert!(limit.acquire(client).is_none(), "a third is refused");
/// drop(first); // the connection ended
/// assert!(limit.acquire(client).is_some());
/// ```
#[derive(Debug)]
pub struct ConcurrencyLimit {
    max: u32,
    open: DashMap<ClientKey, u32>,
}

impl ConcurrencyLimit {
    /// At most `max` open connections per client (0: none).
    pub fn new(max: u32) -> Self {
        Self {
            max,
            open: DashMap::new(),
        }
    }

    /// Takes a slot for `key`, or `None` if it has `max` connections open. The slot is
    /// given back when dropped.
    pub fn acquire(self: &Arc<Self>, key: ClientKey) -> Option<ConcurrencySlot> {
        match self.open.entry(key) {
            Entry::Occupied(mut e) => {
                if *e.get() >= self.max {
                    return None;
                }
                *e.get_mut() += 1;
            }
            Entry::Vacant(e) => {
                if self.max == 0 {
                    return None;
                }
                e.insert(1);
            }
        }
        Some(ConcurrencySlot {
            tier: Arc::clone(self),
            key,
        })
    }

    /// The most open connections per client.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Open connections of `key`.
    pub fn open(&self, key: &ClientKey) -> u32 {
        self.open.get(key).map_or(0, |n| *n)
    }

    /// Clients with at least one connection open.
    pub fn clients(&self) -> usize {
        self.open.len()
    }

    fn release(&self, key: &ClientKey) {
        self.open.remove_if_mut(key, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// One open connection's slot, given back when dropped: when the connection's future
/// completes or is dropped (cancelled) before that.
pub struct ConcurrencySlot {
    tier: Arc<ConcurrencyLimit>,
    key: ClientKey,
}

impl Drop for ConcurrencySlot {
    fn drop(&mut self) {
        self.tier.release(&self.key);
    }
}

impl fmt::Debug for ConcurrencySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencySlot")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
