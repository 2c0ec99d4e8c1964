//! The decision cache and the single flight of callouts.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::future::poll_fn;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use aegis_core::{BoxError, ClientKey, KeyBy};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tower_service::Service;

use super::{AuthError, Credentials, Decision, metrics as m};
use crate::bounded::Bounded;

/// A digest of the credentials, the client's IP and the protocol version; the password
/// itself is never kept.
pub(crate) type Key = [u8; 32];

/// What one callout decided, as every check sharing it sees it.
type Outcome = Option<Result<Decision, AuthError>>;

/// The shared state of an [`AuthLayer`](super::AuthLayer) and all its services.
#[derive(Debug)]
pub(crate) struct Cache {
    /// Mixed into every key, so that a digest seen in memory cannot be matched against
    /// guessed passwords without it.
    salt: [u8; 16],
    inner: Mutex<Inner>,
    /// Checks waiting on a callout (leaders and the checks sharing theirs).
    pending: AtomicUsize,
    /// Gives each callout its own id.
    next_flight: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    entries: Bounded<Key, Entry>,
    /// The callout in flight for each key: its id and where its outcome goes.
    flights: HashMap<Key, (u64, watch::Receiver<Outcome>)>,
    /// The checks in flight (waiting for or running a callout) of each client address
    /// (keyed by [`Settings::key_by`]). An address is removed when its
    /// count returns to 0, so there are never more entries than checks in flight.
    checks: HashMap<ClientKey, usize>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    decision: Decision,
    expires: Instant,
}

/// How a layer's checks are configured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) ttl: Duration,
    pub(crate) deny_ttl: Duration,
    pub(crate) max_entries: usize,
    pub(crate) timeout: Duration,
    pub(crate) max_checks_per_addr: usize,
    pub(crate) key_by: KeyBy,
}

impl Cache {
    pub(crate) fn new() -> Self {
        // Two randomly seeded std hashers give 128 bits of per-process salt without a
        // dependency on a random number generator.
        let mut salt = [0; 16];
        salt[..8].copy_from_slice(&RandomState::new().hash_one(1_u8).to_le_bytes());
        salt[8..].copy_from_slice(&RandomState::new().hash_one(2_u8).to_le_bytes());
        Self {
            salt,
            inner: Mutex::new(Inner {
                entries: Bounded::default(),
                flights: HashMap::new(),
                checks: HashMap::new(),
            }),
            pending: AtomicUsize::new(0),
            next_flight: AtomicU64::new(0),
        }
    }

    /// The key of `creds`: SHA-256 over the salt and the length-prefixed client id,
    /// username and password (each absent one distinct from an empty one), the
    /// client's IP (not its port) and the protocol version (the authenticator is told
    /// it, and may decide on it).
    pub(crate) fn key(&self, creds: &Credentials) -> Key {
        fn field(h: &mut Sha256, v: Option<&[u8]>) {
            match v {
                None => h.update([0]),
                Some(v) => {
                    h.update([1]);
                    h.update((v.len() as u64).to_be_bytes());
                    h.update(v);
                }
            }
        }
        let mut h = Sha256::new();
        h.update(self.salt);
        field(&mut h, Some(creds.client_id.as_bytes()));
        field(&mut h, creds.username.as_deref().map(str::as_bytes));
        field(&mut h, creds.password.as_deref());
        match creds.client_addr.ip() {
            IpAddr::V4(ip) => field(&mut h, Some(&ip.octets())),
            IpAddr::V6(ip) => field(&mut h, Some(&ip.octets())),
        }
        // The protocol level of the CONNECT.
        field(&mut h, Some(&[creds.version.level()]));
        h.finalize().into()
    }

    /// How many checks are waiting on a callout now.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// How many client addresses have checks in flight now.
    pub(crate) fn addrs_checking(&self) -> usize {
        self.inner.lock().checks.len()
    }

    /// How many decisions are cached (expired ones included until purged).
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().entries.map.len()
    }

    /// Checks `creds`: from the cache, else by sharing a callout in flight for the same
    /// key, else by calling `authn` (under `settings.timeout`).
    pub(crate) async fn check<A>(
        self: Arc<Self>,
        mut authn: A,
        settings: Settings,
        creds: Credentials,
    ) -> Result<Decision, AuthError>
    where
        A: Service<Credentials, Response = Decision>,
        A::Error: Into<BoxError>,
    {
        let key = self.key(&creds);
        let addr = settings.key_by.key(creds.client_addr.ip());
        // The address's turn, taken by the first lookup that needs a callout and kept
        // (across takeovers) until the check ends or is dropped.
        let mut slot = None;
        loop {
            let step = self.lookup(&key, addr, &mut slot, settings.max_checks_per_addr);
            let rx = match step {
                Lookup::Hit(d) => return count(Ok(d), "hit"),
                Lookup::Refused => {
                    tracing::debug!(
                        client_addr = %creds.client_addr,
                        max = settings.max_checks_per_addr,
                        "auth: too many checks in flight from this address; refused"
                    );
                    return count(
                        Err(AuthError::TooManyChecks(settings.max_checks_per_addr)),
                        "refused",
                    );
                }
                Lookup::Lead(tx, id) => {
                    let _pending = Pending::new(&self.pending);
                    let lead = Lead {
                        cache: &self,
                        key,
                        id,
                        tx: Some(tx),
                    };
                    let outcome = callout(&mut authn, settings.timeout, creds).await;
                    lead.finish(&outcome, &settings);
                    return count(outcome, "miss");
                }
                Lookup::Wait(rx) => rx,
            };
            let _pending = Pending::new(&self.pending);
            let mut rx = rx;
            if let Ok(outcome) = rx.wait_for(Option::is_some).await
                && let Some(outcome) = outcome.clone()
            {
                return count(outcome, "shared");
            }
            // The leader was dropped before it decided: take over (or share a newer
            // callout).
        }
    }

    /// A cached decision, the callout in flight to wait on, or the lead of a new one;
    /// or a refusal, if the check needs a callout but `addr` has `max` checks in flight
    /// already. A check that needs a callout takes a turn of `addr` into `slot` (once).
    fn lookup<'a>(
        &'a self,
        key: &Key,
        addr: ClientKey,
        slot: &mut Option<Slot<'a>>,
        max: usize,
    ) -> Lookup {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        match inner.entries.map.get(key) {
            Some(e) if e.expires > now => return Lookup::Hit(e.decision),
            Some(_) => {
                inner.entries.map.remove(key);
            }
            None => {}
        }
        if slot.is_none() {
            if inner.checks.get(&addr).is_some_and(|&n| n >= max) {
                return Lookup::Refused;
            }
            *inner.checks.entry(addr).or_insert(0) += 1;
            *slot = Some(Slot { cache: self, addr });
        }
        if let Some((_, rx)) = inner.flights.get(key) {
            return Lookup::Wait(rx.clone());
        }
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        inner.flights.insert(*key, (id, rx));
        Lookup::Lead(tx, id)
    }
}

enum Lookup {
    Hit(Decision),
    Refused,
    Wait(watch::Receiver<Outcome>),
    Lead(watch::Sender<Outcome>, u64),
}

/// Counts one check's result and returns it.
fn count(outcome: Result<Decision, AuthError>, cache: &'static str) -> Result<Decision, AuthError> {
    let result = match &outcome {
        Ok(Decision::Allow) => "allow",
        Ok(Decision::Deny) => "deny",
        Err(AuthError::TooManyChecks(_)) => "too_many_checks",
        Err(_) => "error",
    };
    metrics::counter!(m::AUTH_TOTAL, "result" => result, "cache" => cache).increment(1);
    outcome
}

/// One callout, timed.
async fn callout<A>(
    authn: &mut A,
    timeout: Duration,
    creds: Credentials,
) -> Result<Decision, AuthError>
where
    A: Service<Credentials, Response = Decision>,
    A::Error: Into<BoxError>,
{
    let start = Instant::now();
    let call = async {
        poll_fn(|cx| authn.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        authn.call(creds).await.map_err(Into::into)
    };
    let outcome = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(AuthError::from_boxed(e)),
        Err(_) => Err(AuthError::Timeout(timeout)),
    };
    metrics::histogram!(m::CALLOUT_SECONDS).record(
        Instant::now()
            .saturating_duration_since(start)
            .as_secs_f64(),
    );
    outcome
}

/// Counts a check as waiting on a callout while it lives.
struct Pending<'a>(&'a AtomicUsize);

impl<'a> Pending<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One of a client address's turns: a check of it waiting for or running a callout.
/// Dropped (the check ended, or was dropped), it gives the turn back, and removes the
/// address once it has none left.
struct Slot<'a> {
    cache: &'a Cache,
    addr: ClientKey,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut inner = self.cache.inner.lock();
        if let Some(n) = inner.checks.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                inner.checks.remove(&self.addr);
            }
        }
    }
}

/// The lead of one callout. Dropped without [`finish`](Self::finish) (its check was
/// dropped), it removes its flight, and the checks waiting on it take over.
struct Lead<'a> {
    cache: &'a Cache,
    key: Key,
    id: u64,
    tx: Option<watch::Sender<Outcome>>,
}

impl Lead<'_> {
    /// Caches a decision, ends the flight and hands the outcome to the checks sharing it,
    /// all under one lock so that a new check sees either the flight or the entry.
    fn finish(mut self, outcome: &Result<Decision, AuthError>, settings: &Settings) {
        let mut inner = self.cache.inner.lock();
        if let Ok(decision) = outcome {
            let ttl = match decision {
                Decision::Allow => settings.ttl,
                Decision::Deny => settings.deny_ttl,
            };
            if !ttl.is_zero() {
                inner.insert(self.key, *decision, ttl, settings.max_entries);
            }
        }
        self.remove_flight(&mut inner);
        drop(inner);
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(outcome.clone()));
        }
    }

    fn remove_flight(&self, inner: &mut Inner) {
        if inner
            .flights
            .get(&self.key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            inner.flights.remove(&self.key);
        }
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let mut inner = self.cache.inner.lock();
            self.remove_flight(&mut inner);
            // Dropping the sender wakes the waiters, which take over.
        }
    }
}

impl Inner {
    /// Caches `decision` for `ttl`. A full cache first drops its expired entries (at
    /// most once per [`PURGE_EVERY`](crate::bounded::PURGE_EVERY)); if it is still full,
    /// the decision is not cached.
    fn insert(&mut self, key: Key, decision: Decision, ttl: Duration, max: usize) {
        let now = Instant::now();
        let Some(expires) = now.checked_add(ttl) else {
            return;
        };
        if !self.entries.map.contains_key(&key) && !self.entries.room(max, now, |e| e.expires > now)
        {
            metrics::counter!(m::CACHE_FULL_TOTAL).increment(1);
            return;
        }
        self.entries.map.insert(key, Entry { decision, expires });
    }
}
