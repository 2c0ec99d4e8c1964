//! The metric names of the whole workspace, in one place.
//!
//! Aegis records through the [`metrics`] facade: install any recorder
//! (`metrics-exporter-prometheus`, for example) and these series appear. Every label
//! value comes from a fixed set of strings; no client address, client id or other input
//! is ever a label.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_connections_total` | counter | `outcome`: `ok`, `rejected`, `error`, `over_capacity`, `aborted` | connections by how they ended (`over_capacity`: closed at accept by the connection cap; `aborted`: cut at the end of a shutdown drain) |
//! | `aegis_active_connections` | gauge | | connections being served now |
//! | `aegis_accept_errors_total` | counter | `kind`: `emfile`, `enfile`, `nobufs`, `nomem`, `connection`, `other` | failed `accept()` calls; the loop backs off and keeps serving |
//! | `aegis_rejections_total` | counter | `layer`, `reason` | typed rejections, see [`crate::error`]; each layer documents its reasons |
//! | `aegis_upstream_errors_total` | counter | `reason`: `connect_timeout`, `connect_refused`, `connect_error` | upstream connection failures of the proxy |
//! | `aegis_proxy_bytes_total` | counter | `direction`: `client_to_upstream`, `upstream_to_client` | bytes copied by the proxy, recorded when a direction goes idle or ends |
//! | `aegis_connection_duration_seconds` | histogram | `outcome` | how long each served connection lasted |
//!
//! Layers in `aegis-layers` and `aegis-mqtt` add their own series under the same
//! `aegis_` prefix and document them in their module docs; rejections always go through
//! `aegis_rejections_total`.

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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(paused)
            .build()
            .expect("a current-thread runtime");
        let out = metrics::with_local_recorder(&rec, || rt.block_on(f()));
        (out, snap)
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

        /// The value of the gauge named `name`, if it was set since the last snapshot.
        pub fn gauge(&self, name: &str) -> Option<f64> {
            self.0
                .iter()
                .find(|(k, _)| k.key().name() == name)
                .and_then(|(_, v)| match v {
                    DebugValue::Gauge(g) => Some(g.into_inner()),
                    _ => None,
                })
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
