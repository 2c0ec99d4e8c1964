//! Per-key state with a bound: the purge both the auth cache and the security detector
//! run when full.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// How often a full map may drop its stale entries: a purge walks the whole map, so a
/// flood of new keys into a full one must not pay it on every insert.
pub(crate) const PURGE_EVERY: Duration = Duration::from_secs(1);

/// A map kept to a bound by its owner, with the time of its last purge.
#[derive(Debug)]
pub(crate) struct Bounded<K, V> {
    pub(crate) map: HashMap<K, V>,
    last_purge: Option<Instant>,
}

impl<K, V> Default for Bounded<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            last_purge: None,
        }
    }
}

impl<K: Eq + Hash, V> Bounded<K, V> {
    /// Whether a new key fits under `max`. When the map is full, drops the entries that
    /// `live` says are stale first, at most once per [`PURGE_EVERY`].
    pub(crate) fn room(&mut self, max: usize, now: Instant, live: impl FnMut(&V) -> bool) -> bool {
        if self.map.len() < max {
            return true;
        }
        let due = self
            .last_purge
            .is_none_or(|last| now.saturating_duration_since(last) >= PURGE_EVERY);
        if due {
            self.last_purge = Some(now);
            let mut live = live;
            self.map.retain(|_, v| live(v));
        }
        self.map.len() < max
    }
}
