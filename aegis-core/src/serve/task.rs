//! The task that serves one connection, and the registry of open connections.
//!
//! Both are written for size: the task's future lives in every connection's task
//! allocation for the connection's whole life, so it holds only the service (until it
//! is called), the service's future and a 16-byte [`Slot`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use parking_lot::Mutex;
use pin_project_lite::pin_project;
use slab::Slab;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tower_service::Service;

use crate::error::{BoxError, Rejected, find, label_of};
use crate::metrics as m;

/// A connection cap that several accept loops share: give clones of one to the
/// [`serve`](super::serve) loops of several runtimes ([`Serve::connection_cap`]), the
/// [`Acceptor`](super::Acceptor) and [`Shard`](super::Shard)s of
/// [`share_out`](super::share_out) say, and they serve at most [`max`](Self::max)
/// connections between them, wherever each one is.
///
/// [`Serve::connection_cap`]: super::Serve::connection_cap
#[derive(Clone, Debug)]
pub struct ConnectionCap {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConnectionCap {
    /// A cap of `max` connections.
    ///
    /// # Panics
    ///
    /// If `max` is 0 or above `u32::MAX`, as [`Serve::max_connections`].
    ///
    /// [`Serve::max_connections`]: super::Serve::max_connections
    #[must_use]
    pub fn new(max: usize) -> Self {
        let max = valid_max(max);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// The most connections served at once by all the loops sharing the cap.
    #[must_use]
    pub const fn max(&self) -> usize {
        self.max
    }

    /// Connections open now, in all the loops sharing the cap.
    #[must_use]
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// `max`, checked as a connection cap.
///
/// # Panics
///
/// If `max` is 0 or above `u32::MAX`.
fn valid_max(max: usize) -> usize {
    assert!(
        max > 0 && u32::try_from(max).is_ok(),
        "max_connections must be in 1..=u32::MAX"
    );
    max
}

/// A loop's connection cap: its own, or one shared with other loops.
#[derive(Clone, Debug)]
pub(crate) enum Cap {
    Own(usize),
    Shared(ConnectionCap),
}

impl Cap {
    /// A cap of `max` connections of the loop's own.
    ///
    /// # Panics
    ///
    /// If `max` is 0 or above `u32::MAX`.
    pub(crate) fn own(max: usize) -> Self {
        Self::Own(valid_max(max))
    }

    /// The most connections served at once.
    pub(crate) const fn max(&self) -> usize {
        match self {
            Self::Own(max) => *max,
            Self::Shared(cap) => cap.max,
        }
    }
}

/// The connection tasks of a [`Registry`]: an abort handle per task, under an id that
/// tells a task from a later one given the same slab key.
#[derive(Debug, Default)]
struct Tasks {
    slab: Slab<(u64, Option<AbortHandle>)>,
    next_id: u64,
}

impl Tasks {
    /// The abort handle's place of the task `id` under `key`, if that entry is still
    /// its: the task may have ended, and its key gone to another.
    fn place(&mut self, key: u32, id: u64) -> Option<&mut Option<AbortHandle>> {
        self.slab
            .get_mut(key as usize)
            .filter(|(owner, _)| *owner == id)
            .map(|(_, place)| place)
    }
}

/// Open connections: this loop's permits (its open connections, which a drain waits
/// for), the cap shared with other loops if any, an abort handle per connection task,
/// and the connection metrics' handles.
#[derive(Debug)]
pub(crate) struct Registry {
    permits: Semaphore,
    max: usize,
    shared: Option<ConnectionCap>,
    tasks: Mutex<Tasks>,
    epoch: Instant,
    metrics: ConnMetrics,
}

impl Registry {
    /// Registers the connection metrics with the recorder in force (the loop calls this
    /// when it starts). Under a shared cap the loop's own permits are as many as the
    /// shared cap's: it may hold all of it.
    pub(crate) fn new(cap: Cap) -> Arc<Self> {
        let max = cap.max();
        let shared = match cap {
            Cap::Own(_) => None,
            Cap::Shared(cap) => Some(cap),
        };
        Arc::new(Self {
            permits: Semaphore::new(max),
            max,
            shared,
            tasks: Mutex::new(Tasks::default()),
            epoch: Instant::now(),
            metrics: ConnMetrics::register(),
        })
    }

    /// Counts a connection refused at accept (by `Serve::admit`): `rejected`, lasting 0 s.
    pub(crate) fn refused(&self) {
        self.metrics.record(Outcome::Rejected, 0.0);
    }

    /// Counts a connection refused at accept because the cap is reached.
    pub(crate) fn over_capacity(&self) {
        self.metrics.over_capacity.increment(1);
    }

    /// Counts a connection handed to the loop that it took too late to serve, at the
    /// drain deadline: `aborted`, lasting 0 s.
    pub(crate) fn cut_unserved(&self) {
        self.metrics.record(Outcome::Aborted, 0.0);
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Connections open now in every loop sharing this loop's cap, if it shares one.
    pub(crate) fn shared_open(&self) -> Option<usize> {
        self.shared.as_ref().map(ConnectionCap::open)
    }

    /// Takes a place for one more connection if the cap allows; `None` when it is full,
    /// and the caller still has the connection, to refuse it. Dropping the slot gives
    /// the place back.
    pub(crate) fn reserve(self: &Arc<Self>) -> Option<Slot> {
        let shared = match &self.shared {
            Some(cap) => Some(cap.permits.try_acquire().ok()?),
            None => None,
        };
        // Under a shared cap this loop cannot hold more than all of it: this succeeds
        // (and were it to fail, the shared permit would go back as it drops).
        self.permits.try_acquire().ok()?.forget();
        if let Some(permit) = shared {
            permit.forget();
        }
        self.metrics.active.increment(1);
        let started_ms = self.now_ms();
        // The entry goes in before the spawn and gets its handle after it, without the
        // lock held across: tokio drops a task spawned onto a runtime that is shutting
        // down at once, on this thread, and its `Slot` then takes the lock to leave.
        let (key, id) = {
            let mut tasks = self.tasks.lock();
            let id = tasks.next_id;
            tasks.next_id += 1;
            (tasks.slab.insert((id, None)), id)
        };
        let Ok(key) = u32::try_from(key) else {
            // More than 4 billion open connections cannot happen below the cap.
            self.tasks.lock().slab.remove(key);
            self.release();
            return None;
        };
        Some(Slot {
            reg: Arc::clone(self),
            key,
            id,
            started_ms,
        })
    }

    /// Spawns the connection task that `make` builds around `slot` (from
    /// [`reserve`](Self::reserve)), which the task holds until it ends.
    pub(crate) fn spawn<F>(&self, slot: Slot, make: impl FnOnce(Slot) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (key, id) = (slot.key, slot.id);
        let handle = tokio::spawn(make(slot)).abort_handle();
        if let Some(place) = self.tasks.lock().place(key, id) {
            *place = Some(handle);
        }
    }

    /// Waits until every connection has ended.
    pub(crate) async fn closed(&self) {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = self.permits.acquire_many(all).await;
    }

    /// Aborts every connection task still open.
    pub(crate) fn abort_all(&self) {
        let handles: Vec<AbortHandle> = (self.tasks.lock().slab.iter())
            .filter_map(|(_, (_, h))| h.clone())
            .collect();
        for h in handles {
            h.abort();
        }
    }

    /// Gives the connection's place back, then counts it gone: once the gauge shows it
    /// gone, its place is free.
    fn release(&self) {
        self.permits.add_permits(1);
        if let Some(shared) = &self.shared {
            shared.permits.add_permits(1);
        }
        self.metrics.active.decrement(1);
    }

    /// Milliseconds since the registry was created, wrapping after 49 days: enough for
    /// a duration histogram, in four bytes.
    #[allow(clippy::cast_possible_truncation)] // wrapping is the point
    fn now_ms(&self) -> u32 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u32
    }
}

/// How a served connection ended: the `outcome` label of `aegis_connections_total` and
/// `aegis_connection_duration_seconds` (`over_capacity` is counted apart, with no task).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Rejected,
    Error,
    Aborted,
    /// Its service's future panicked (tokio drops a panicking task's future while the
    /// panic unwinds): a bug in a layer or the service, not a drain.
    Panicked,
}

impl Outcome {
    /// Every outcome, in declaration order: `ConnMetrics::ended` is indexed by it.
    const ALL: [Self; 5] = [
        Self::Ok,
        Self::Rejected,
        Self::Error,
        Self::Aborted,
        Self::Panicked,
    ];

    /// The `outcome` label.
    pub(super) const fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Error => "error",
            Self::Aborted => "aborted",
            Self::Panicked => "panicked",
        }
    }
}

/// The handles of the connection metrics, registered once per server.
///
/// A metrics macro looks its key up in the recorder on every call, and the Prometheus
/// recorder allocates a new handle each time: four lookups and allocations per connection here
/// (the gauge up and down, the outcome's counter and histogram), a tenth of a short
/// connection's user-space instructions in the mqtt-gateway (callgrind).
#[derive(Debug)]
struct ConnMetrics {
    active: metrics::Gauge,
    over_capacity: metrics::Counter,
    /// Per [`Outcome`], in its order: the connection count and the duration histogram.
    ended: [(metrics::Counter, metrics::Histogram); Outcome::ALL.len()],
}

impl ConnMetrics {
    fn register() -> Self {
        Self {
            active: metrics::gauge!(m::ACTIVE_CONNECTIONS),
            over_capacity: metrics::counter!(m::CONNECTIONS_TOTAL, "outcome" => "over_capacity"),
            ended: Outcome::ALL.map(|o| {
                (
                    metrics::counter!(m::CONNECTIONS_TOTAL, "outcome" => o.label()),
                    metrics::histogram!(m::CONNECTION_DURATION_SECONDS, "outcome" => o.label()),
                )
            }),
        }
    }

    /// Counts the connection's end and how long it lasted.
    fn record(&self, outcome: Outcome, seconds: f64) {
        let (count, duration) = &self.ended[outcome as usize];
        count.increment(1);
        duration.record(seconds);
    }
}

/// One open connection's place in the [`Registry`]; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Slot {
    reg: Arc<Registry>,
    key: u32,
    started_ms: u32,
    /// Tells this connection's entry from a later one under the same `key`.
    id: u64,
}

impl Slot {
    /// Records how the connection ended.
    fn record(&self, outcome: Outcome) {
        let ms = self.reg.now_ms().wrapping_sub(self.started_ms);
        self.reg.metrics.record(outcome, f64::from(ms) / 1000.0);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut tasks = self.reg.tasks.lock();
            if tasks.place(self.key, self.id).is_some() {
                tasks.slab.remove(self.key as usize);
            }
        }
        self.reg.release();
    }
}

pin_project! {
    /// Drives one connection through the service: readiness, then the call.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub(crate) struct ConnTask<S, I, F> {
        #[pin]
        state: State<S, I, F>,
        slot: Slot,
    }

    impl<S, I, F> PinnedDrop for ConnTask<S, I, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !matches!(this.state.as_ref().get_ref(), State::Done) {
                // Dropped before it finished: while its poll panicked (tokio drops the
                // future as the panic unwinds), or aborted at the end of a drain (or
                // the runtime shut down).
                this.slot.record(if std::thread::panicking() {
                    Outcome::Panicked
                } else {
                    Outcome::Aborted
                });
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, I, F> {
        // Boxed: the service and the connection are only needed until the call, and the
        // task (allocated once, as large as its largest state) lives as long as the
        // connection. In the mqtt-gateway this made each task 256 bytes instead of 768.
        Ready { parts: Option<Box<(S, I)>> },
        Calling { #[pin] fut: F },
        Done,
    }
}

impl<S, I> ConnTask<S, I, S::Future>
where
    S: Service<I>,
{
    pub(crate) fn new(svc: S, conn: I, slot: Slot) -> Self {
        Self {
            state: State::Ready {
                parts: Some(Box::new((svc, conn))),
            },
            slot,
        }
    }
}

impl<S, I> Future for ConnTask<S, I, S::Future>
where
    S: Service<I>,
    S::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let res = loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Ready { parts } => {
                    let (svc, _) = &mut **parts.as_mut().expect("polled after completion");
                    if let Err(e) = ready!(svc.poll_ready(cx)) {
                        break Err(e.into());
                    }
                    let (mut svc, conn) = *parts.take().expect("polled after completion");
                    let fut = svc.call(conn);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    break ready!(fut.poll(cx)).map(drop).map_err(Into::into);
                }
                StateProj::Done => return Poll::Ready(()),
            }
        };
        let mut this = self.project();
        this.slot.record(outcome_of(&res));
        this.state.set(State::Done);
        Poll::Ready(())
    }
}

fn outcome_of(res: &Result<(), BoxError>) -> Outcome {
    match res {
        Ok(()) => Outcome::Ok,
        Err(e) => {
            let (layer, reason) = label_of(&**e);
            if find::<Rejected>(&**e).is_some() {
                tracing::debug!(layer, reason, error = %e, "connection rejected");
                Outcome::Rejected
            } else {
                tracing::debug!(layer, reason, error = %e, "connection failed");
                Outcome::Error
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each outcome is counted under its own literal label.
    #[cfg(feature = "test-util")]
    #[test]
    fn each_outcome_is_recorded_under_its_own_label() {
        use crate::metrics::testing::{capture, run};
        const OUTCOMES: [(Outcome, &str); 5] = [
            (Outcome::Ok, "ok"),
            (Outcome::Rejected, "rejected"),
            (Outcome::Error, "error"),
            (Outcome::Aborted, "aborted"),
            (Outcome::Panicked, "panicked"),
        ];
        // Every outcome, each once: a new one must be added here.
        assert_eq!(OUTCOMES.map(|(o, _)| o), Outcome::ALL);
        let ((), snap) = run(false, || async {
            let metrics = ConnMetrics::register();
            for (outcome, _) in OUTCOMES {
                metrics.record(outcome, 0.5);
            }
        });
        let got = capture(&snap);
        for (outcome, label) in OUTCOMES {
            let labels = [("outcome", label)];
            assert_eq!(got.counter(m::CONNECTIONS_TOTAL, &labels), 1, "{outcome:?}");
        }
    }

    /// tokio drops a task spawned onto a runtime that is shutting down at once, on the
    /// spawning thread: the connection's `Slot` then leaves the registry while `spawn` is
    /// still running. It must not wait for a lock `spawn` holds (a hang on SIGTERM).
    #[test]
    fn a_spawn_onto_a_runtime_shutting_down_frees_its_place() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
        let reg = rt.block_on(async { Registry::new(Cap::Own(4)) });
        drop(rt);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _runtime = handle.enter();
            let spawned = reg
                .reserve()
                .map(|slot| reg.spawn(slot, |slot| async move { drop(slot) }));
            tx.send((spawned, reg.open(), reg.tasks.lock().slab.len()))
        });
        // A guard against the hang, not a wait for an event: the thread answers at once
        // or never.
        let got = rx.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(
            got,
            Ok((Some(()), 0, 0)),
            "spawn deadlocked or leaked its place"
        );
    }

    /// A service as large as a deep layer stack, whose future is small.
    #[derive(Clone)]
    struct Big([u8; 4096]);

    impl Service<u8> for Big {
        type Response = ();
        type Error = BoxError;
        type Future = std::future::Ready<Result<(), BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: u8) -> Self::Future {
            std::future::ready(if self.0[usize::from(req)] == 0 {
                Ok(())
            } else {
                Err("set".into())
            })
        }
    }

    #[test]
    fn a_connection_task_does_not_hold_the_service_inline() {
        // The task is allocated once for the whole connection, as large as its largest
        // state; the service is only needed until the call.
        let size = std::mem::size_of::<ConnTask<Big, u8, <Big as Service<u8>>::Future>>();
        assert!(size <= 64, "{size} bytes");
    }

    #[tokio::test]
    async fn a_connection_task_with_a_boxed_service_runs_and_frees_its_slot() {
        let reg = Registry::new(Cap::own(1));
        let (tx, rx) = tokio::sync::oneshot::channel();
        reg.spawn(reg.reserve().unwrap(), |slot| {
            let task = ConnTask::new(Big([0; 4096]), 7, slot);
            async move {
                task.await;
                let _ = tx.send(());
            }
        });
        rx.await.unwrap();
        reg.closed().await;
        assert_eq!(reg.open(), 0);
    }
}
