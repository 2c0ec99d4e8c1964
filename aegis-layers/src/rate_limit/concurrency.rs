//! The concurrency tier: a count of open connections per client, not a rate.

use std::fmt;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::ClientKey;

/// Open connections per client. An entry exists only while its client has a connection
/// open, so the map never holds more entries than there are live connections (bounded by
/// the accept loop's connection cap).
#[derive(Debug)]
pub(super) struct Concurrency {
    max: u32,
    open: DashMap<ClientKey, u32>,
}

impl Concurrency {
    pub(super) fn new(max: u32) -> Self {
        Self {
            max,
            open: DashMap::new(),
        }
    }

    /// Takes a slot for `key`, or `None` if it has `max` connections open.
    pub(super) fn acquire(self: &Arc<Self>, key: ClientKey) -> Option<Slot> {
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
        Some(Slot {
            tier: Arc::clone(self),
            key,
        })
    }

    pub(super) fn max(&self) -> u32 {
        self.max
    }

    /// Open connections of `key`.
    pub(super) fn open(&self, key: &ClientKey) -> u32 {
        self.open.get(key).map_or(0, |n| *n)
    }

    /// Clients with at least one connection open.
    pub(super) fn clients(&self) -> usize {
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
pub(super) struct Slot {
    tier: Arc<Concurrency>,
    key: ClientKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tier.release(&self.key);
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
