//! The metric names of the whole workspace, in one place.
//!
//! Aegis records through the [`metrics`] facade: install any recorder
//! (`metrics-exporter-prometheus`, for example) and these series appear. Every label
//! value comes from a fixed set of strings; no client address, client id or other input
//! is ever a label.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_connections_total` | counter | `outcome`: `ok`, `rejected`, `error`, `over_capacity`, `aborted`, `panicked` | connections by how they ended (`over_capacity`: reset at accept by the connection cap; `aborted`: cut at the end of a shutdown drain, or queued for a `serve::Shard` dropped before it took it; `panicked`: its service panicked, a bug, and the connection was closed; `error` also counts a connection that `serve::share_out` could not hand to another runtime) |
//! | `aegis_active_connections` | gauge | | connections being served now |
//! | `aegis_accept_errors_total` | counter | `kind`: `emfile`, `enfile`, `nobufs`, `nomem`, `connection`, `other` | failed `accept()` calls; the loop backs off and keeps serving |
//! | `aegis_rejections_total` | counter | `layer`, `reason` | typed rejections, see [`crate::error`]; each layer documents its reasons |
//! | `aegis_upstream_errors_total` | counter | `reason`: `connect_timeout`, `connect_refused`, `local_resources`, `connect_error` | upstream connection failures of the proxy (`local_resources`: this host was out of descriptors, memory or local ports, `EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, `EADDRNOTAVAIL`; the upstream was not at fault) |
//! | `aegis_proxy_bytes_total` | counter | `direction`: `client_to_upstream`, `upstream_to_client` | bytes copied by the proxy, recorded when a direction goes idle or ends |
//! | `aegis_connection_duration_seconds` | histogram | `outcome` | how long each served connection lasted |
//!
//! Layers in `aegis-layers` and `aegis-mqtt` add their own series under the same
//! `aegis_` prefix and document them in their module docs; rejections always go through
//! `aegis_rejections_total`.
//!
//! The series recorded for every connection are looked up in the recorder once per
//! server or service ([`Handles`]), not once per connection: install the recorder before
//! `serve` starts its loop and before a service serves its first connection. `serve`
//! registers its series when the loop starts, so they appear at 0 from then on.

/// Metric handles registered with the recorder once, on first use, and shared by every
/// clone.
///
/// A `metrics::counter!` call looks its key up in the recorder on every call (the
/// Prometheus recorder also allocates a new handle each time). A metric recorded once
/// per connection costs that lookup once per connection; a service that keeps its
/// handles in a `Handles` pays it once, at the first connection. The aegis services keep
/// their per-connection metrics this way, and so can a user's own.
///
/// The handles belong to the recorder in force at the first use: install the recorder
/// before the server or service is first used. A recorder that drops series it has not
/// seen updated for a while (`metrics-exporter-prometheus`'s `idle_timeout`) detaches
/// them from handles kept this way: an evicted series does not come back, where a
/// macro call would have registered it again. Leave that timeout off for these series.
///
/// ```
/// use aegis_core::metrics::Handles;
/// use metrics::Counter;
///
/// #[derive(Clone, Default)]
/// struct Seen {
///     total: Handles<Counter>,
/// }
///
/// impl Seen {
///     fn count(&self) {
///         self.total
///             .get_or_register(|| metrics::counter!("example_seen_total"))
///             .increment(1);
///     }
/// }
///
/// let seen = Seen::default();
/// let clone = seen.clone();
/// seen.count();
/// clone.count(); // the same handle, registered once
/// ```
#[derive(Debug)]
pub struct Handles<T>(std::sync::Arc<std::sync::OnceLock<T>>);

impl<T> Handles<T> {
    /// No handles yet: they are registered at the first
    /// [`get_or_register`](Self::get_or_register).
    #[must_use]
    pub fn new() -> Self {
        Self(std::sync::Arc::new(std::sync::OnceLock::new()))
    }

    /// The handles, registered by `register` if this is the first use (of any clone).
    pub fn get_or_register(&self, register: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(register)
    }
}

impl<T> Clone for Handles<T> {
    fn clone(&self) -> Self {
        Self(std::sync::Arc::clone(&self.0))
    }
}

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// `aegis_connections_total{outcome}`.
pub const CONNECTIONS_TOTAL: &str = "aegis_connections_total";
/// `aegis_active_connections`.
pub const ACTIVE_CONNECTIONS: &str = "aegis_active_connections";
/// `aegis_accept_errors_total{kind}`.
pub const ACCEPT_ERRORS_TOTAL: &str = "aegis_accept_errors_total";
/// `aegis_rejections_total{layer, reason}`.
pub const REJECTIONS_TOTAL: &str = "aegis_rejections_total";
/// `aegis_upstream_errors_total{reason}`.
pub const UPSTREAM_ERRORS_TOTAL: &str = "aegis_upstream_errors_total";
/// `aegis_proxy_bytes_total{direction}`.
pub const PROXY_BYTES_TOTAL: &str = "aegis_proxy_bytes_total";
/// `aegis_connection_duration_seconds{outcome}`.
pub const CONNECTION_DURATION_SECONDS: &str = "aegis_connection_duration_seconds";

/// Helpers that read a [`metrics_util`] debugging recorder, for tests of this workspace
/// and of users' stacks.
///
/// A debugging snapshot *drains* what it reads: counters and gauges read back as 0 until
/// they change again. Each call below takes one snapshot, so a counter read twice returns
/// the increase since the previous read; sum the results when polling.
#[cfg(feature = "test-util")]
pub mod testing {
    use metrics_util::CompositeKey;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    /// Runs `f` to its end on a new current-thread runtime (every driver on; time paused
    /// from the start when `paused`) with its own debugging recorder, and returns the
    /// output and the recorder's snapshotter: a test sees only its own metrics, whatever
    /// runs beside it.
    ///
    /// ```
    /// use aegis_core::metrics::testing::{capture, run};
    ///
    /// let ((), snap) = run(true, || async {
    ///     metrics::counter!("aegis_example_total").increment(2);
    /// });
    /// assert_eq!(capture(&snap).counter("aegis_example_total", &[]), 2);
    /// ```
    ///
    /// # Panics
    ///
    /// If the runtime cannot be built.
    pub fn run<F: std::future::Future>(
        paused: bool,
        f: impl FnOnce() -> F,
    ) -> (F::Output, Snapshotter) {
        let rec = DebuggingRecorder::new();
        let snap = rec.snapshotter();
        (block_on_with(&rec, paused, f), snap)
    }

    /// [`run`], with the recorder's snapshotter handed to `f`: for a test that reads the
    /// metrics while it runs (a gauge between two steps, say).
    ///
    /// ```
    /// use aegis_core::metrics::testing::{capture, run_watching};
    ///
    /// run_watching(true, |snap| async move {
    ///     metrics::gauge!("aegis_example").set(1.0);
    ///     assert_eq!(capture(&snap).gauge("aegis_example"), Some(1.0));
    /// });
    /// ```
    ///
    /// # Panics
    ///
    /// If the runtime cannot be built.
    pub fn run_watching<F: std::future::Future>(
        paused: bool,
        f: impl FnOnce(Snapshotter) -> F,
    ) -> F::Output {
        let rec = DebuggingRecorder::new();
        let snap = rec.snapshotter();
        block_on_with(&rec, paused, || f(snap))
    }

    /// Runs `f` on a new current-thread runtime with `rec` as the local recorder.
    fn block_on_with<F: std::future::Future>(
        rec: &dyn metrics::Recorder,
        paused: bool,
        f: impl FnOnce() -> F,
    ) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(paused)
            .build()
            .expect("a current-thread runtime");
        metrics::with_local_recorder(rec, || rt.block_on(f()))
    }

    /// [`run`], with a recorder that also counts how many times each metric name is
    /// registered: each `metrics::counter!` (or gauge, histogram) call is one
    /// registration, a [`Handles`](super::Handles) one per service. A test of a hot path
    /// checks with it that the count does not grow with the connections served.
    ///
    /// ```
    /// use aegis_core::metrics::testing::run_counting;
    ///
    /// let ((), _snap, registered) = run_counting(true, || async {
    ///     for _ in 0..3 {
    ///         metrics::counter!("aegis_example_total").increment(1);
    ///     }
    /// });
    /// assert_eq!(registered.of("aegis_example_total"), 3);
    /// ```
    ///
    /// # Panics
    ///
    /// If the runtime cannot be built.
    pub fn run_counting<F: std::future::Future>(
        paused: bool,
        f: impl FnOnce() -> F,
    ) -> (F::Output, Snapshotter, Registrations) {
        let rec = Counting {
            inner: DebuggingRecorder::new(),
            counts: Registrations::default(),
        };
        let snap = rec.inner.snapshotter();
        let out = block_on_with(&rec, paused, f);
        (out, snap, rec.counts)
    }

    /// How many times each metric name was registered; see [`run_counting`].
    #[derive(Debug, Clone, Default)]
    pub struct Registrations(
        std::sync::Arc<parking_lot::Mutex<std::collections::HashMap<String, usize>>>,
    );

    impl Registrations {
        /// The registrations of `name`, over all its label values.
        pub fn of(&self, name: &str) -> usize {
            self.0.lock().get(name).copied().unwrap_or(0)
        }

        fn add(&self, key: &metrics::Key) {
            *self.0.lock().entry(key.name().to_owned()).or_default() += 1;
        }
    }

    struct Counting {
        inner: DebuggingRecorder,
        counts: Registrations,
    }

    impl metrics::Recorder for Counting {
        fn describe_counter(
            &self,
            key: metrics::KeyName,
            unit: Option<metrics::Unit>,
            description: metrics::SharedString,
        ) {
            self.inner.describe_counter(key, unit, description);
        }

        fn describe_gauge(
            &self,
            key: metrics::KeyName,
            unit: Option<metrics::Unit>,
            description: metrics::SharedString,
        ) {
            self.inner.describe_gauge(key, unit, description);
        }

        fn describe_histogram(
            &self,
            key: metrics::KeyName,
            unit: Option<metrics::Unit>,
            description: metrics::SharedString,
        ) {
            self.inner.describe_histogram(key, unit, description);
        }

        fn register_counter(
            &self,
            key: &metrics::Key,
            meta: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            self.counts.add(key);
            self.inner.register_counter(key, meta)
        }

        fn register_gauge(
            &self,
            key: &metrics::Key,
            meta: &metrics::Metadata<'_>,
        ) -> metrics::Gauge {
            self.counts.add(key);
            self.inner.register_gauge(key, meta)
        }

        fn register_histogram(
            &self,
            key: &metrics::Key,
            meta: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            self.counts.add(key);
            self.inner.register_histogram(key, meta)
        }
    }

    /// Every series of one snapshot, to read several values that belong together.
    #[derive(Debug)]
    pub struct Captured(Vec<(CompositeKey, DebugValue)>);

    /// Takes one snapshot (which drains the recorder) and keeps all of it.
    pub fn capture(snap: &Snapshotter) -> Captured {
        Captured(
            snap.snapshot()
                .into_vec()
                .into_iter()
                .map(|(k, _, _, v)| (k, v))
                .collect(),
        )
    }

    impl Captured {
        /// The sum of all counters named `name` whose labels include every
        /// `(key, value)` of `labels`.
        pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
            self.0
                .iter()
                .filter(|(k, _)| {
                    let key = k.key();
                    key.name() == name
                        && labels.iter().all(|(lk, lv)| {
                            key.labels().any(|l| l.key() == *lk && l.value() == *lv)
                        })
                })
                .map(|(_, v)| match v {
                    DebugValue::Counter(c) => *c,
                    _ => 0,
                })
                .sum()
        }

        /// The value of the gauge named `name` (its first series, whatever the labels):
        /// `None` if no gauge of that name was ever registered; else what it holds, which
        /// is `0.0` when it was registered and never set, or not set since the previous
        /// snapshot (a snapshot drains gauges to 0). So `Some(0.0)` does not show that
        /// anything set 0: set the gauge to another value first, or check a non-zero one.
        pub fn gauge(&self, name: &str) -> Option<f64> {
            self.0
                .iter()
                .find(|(k, _)| k.key().name() == name)
                .and_then(|(_, v)| match v {
                    DebugValue::Gauge(g) => Some(g.into_inner()),
                    _ => None,
                })
        }

        /// The samples of all histograms named `name` whose labels include every
        /// `(key, value)` of `labels` (in no promised order: sort them to compare
        /// several): `None` if no such histogram was ever registered; else the samples
        /// recorded since the previous snapshot (a snapshot drains histograms), which
        /// may be none.
        ///
        /// ```
        /// use aegis_core::metrics::testing::{capture, run};
        ///
        /// let ((), snap) = run(true, || async {
        ///     metrics::histogram!("aegis_example_seconds", "outcome" => "ok").record(1.5);
        /// });
        /// let got = capture(&snap);
        /// assert_eq!(
        ///     got.histogram("aegis_example_seconds", &[("outcome", "ok")]),
        ///     Some(vec![1.5])
        /// );
        /// assert_eq!(got.histogram("aegis_example_seconds", &[("outcome", "error")]), None);
        /// ```
        pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Option<Vec<f64>> {
            let mut found = None;
            for (k, v) in &self.0 {
                let key = k.key();
                let matches = key.name() == name
                    && labels
                        .iter()
                        .all(|(lk, lv)| key.labels().any(|l| l.key() == *lk && l.value() == *lv));
                if let (true, DebugValue::Histogram(xs)) = (matches, v) {
                    found
                        .get_or_insert_with(Vec::new)
                        .extend(xs.iter().map(|x| x.into_inner()));
                }
            }
            found
        }
    }

    /// One counter from a fresh snapshot: `capture(snap).counter(name, labels)`.
    ///
    /// The snapshot drains *every* series, so read several values with [`capture`].
    pub fn counter(snap: &Snapshotter, name: &str, labels: &[(&str, &str)]) -> u64 {
        capture(snap).counter(name, labels)
    }

    /// One gauge from a fresh snapshot: `capture(snap).gauge(name)`.
    pub fn gauge(snap: &Snapshotter, name: &str) -> Option<f64> {
        capture(snap).gauge(name)
    }
}
