//! Active health checks: probe every backend on a fixed interval and tell the pool.
//!
//! Every `interval` (the first round at once), each backend is probed concurrently
//! under `timeout`. A probe has one of three outcomes ([`Probe`]): it passes when the
//! backend answers well in time, fails otherwise (a bad answer, an error, the timeout),
//! and is **unchecked** when the gateway could not probe at all for want of its own
//! descriptors, memory or local ports (the connect failed with `EMFILE`, `ENFILE`,
//! `ENOBUFS`, `ENOMEM` or `EADDRNOTAVAIL`: [`ProxyError::LocalResources`], told apart as
//! the proxy tells them, [`crate::proxy::as_local_resources`]). [`Thresholds::fall`]
//! failures in a row mark a healthy backend unhealthy, [`Thresholds::rise`] passes in a
//! row mark it healthy again (one lost probe does not flap a backend). An unchecked
//! probe counts toward neither and breaks no streak: the backend keeps its verdict, as
//! if that round had not probed it. (Counted as a failure, a gateway out of descriptors
//! marked every backend unhealthy, and answered `503` until a round got through again.)
//! The verdict goes to [`Pool::set_healthy`], which starts the warm-up of a backend that
//! comes back. The probe is a function of the backend's address, so tests can script
//! it; the gateway's is [`http_probe`], a `GET /healthz` that wants a `2xx`.
//!
//! Every probe is counted in [`HEALTH_CHECKS_TOTAL`] by its outcome ([`Probe::label`]:
//! `passed`, `failed`, `local_resources`). An unchecked probe is logged at debug, and
//! with a warning at most once per [`SKIP_WARN_EVERY`]: a gateway short of descriptors
//! would otherwise warn once per backend and round.
//!
//! The task holds the pool weakly and ends at the first round after the pool is gone.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aegis_core::proxy::ProxyError;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

use crate::balance::Pool;

/// A probe's answer.
pub type ProbeFuture = Pin<Box<dyn Future<Output = Probe> + Send>>;

/// `aegis_http_health_checks_total{outcome}`: each probe, by [`Probe::label`].
pub const HEALTH_CHECKS_TOTAL: &str = "aegis_http_health_checks_total";

/// The least time between two warnings of unchecked probes (each is logged at debug).
pub const SKIP_WARN_EVERY: Duration = Duration::from_secs(60);

/// What a probe found.
#[derive(Debug)]
pub enum Probe {
    /// The backend answered well in time.
    Passed,
    /// It did not: a bad answer, an error, no answer in time.
    Failed,
    /// The gateway could not probe it: connecting failed for want of the gateway's own
    /// descriptors, memory or local ports. It says nothing of the backend, whose verdict
    /// and streak stay as they were.
    Unchecked(ProxyError),
}

impl Probe {
    /// The stable `outcome` label: `passed`, `failed`, or `local_resources`.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Unchecked(_) => "local_resources",
        }
    }
}

impl From<bool> for Probe {
    /// [`Passed`](Self::Passed) or [`Failed`](Self::Failed).
    fn from(passed: bool) -> Self {
        if passed { Self::Passed } else { Self::Failed }
    }
}

/// How many probes in a row change a verdict.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// Failed probes in a row that mark a healthy backend unhealthy (at least 1).
    pub fall: u32,
    /// Passed probes in a row that mark an unhealthy backend healthy (at least 1).
    pub rise: u32,
}

/// The shortest interval between two rounds of probes; a shorter one (zero) is taken as
/// this.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Starts the health checks of `pool`'s backends: a first round at once, then one every
/// `interval` (at least [`MIN_INTERVAL`]; `Duration::MAX` for no round after the first).
pub fn spawn<P>(
    pool: &Arc<Pool>,
    interval: Duration,
    timeout: Duration,
    thresholds: Thresholds,
    probe: P,
) -> JoinHandle<()>
where
    P: Fn(SocketAddr) -> ProbeFuture + Send + Sync + 'static,
{
    let mut streaks = vec![0_u32; pool.members().len()];
    let mut warned: Option<Instant> = None;
    let pool = Arc::downgrade(pool);
    tokio::spawn(async move {
        // tokio's `interval` panics on a zero period and adds the period to an instant
        // unchecked: `Duration::MAX` ("never again") would end the task at its first
        // tick, before any probe.
        let period = interval.clamp(MIN_INTERVAL, aegis_core::time::FAR_FUTURE);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            let mut round = JoinSet::new();
            for (i, member) in pool.members().iter().enumerate() {
                let answer = probe(member.addr);
                round.spawn(async move {
                    let probe = tokio::time::timeout(timeout, answer)
                        .await
                        .unwrap_or(Probe::Failed);
                    (i, probe)
                });
            }
            while let Some(done) = round.join_next().await {
                let Ok((i, probe)) = done else { continue };
                metrics::counter!(HEALTH_CHECKS_TOTAL, "outcome" => probe.label()).increment(1);
                let passed = match probe {
                    Probe::Passed => true,
                    Probe::Failed => false,
                    Probe::Unchecked(err) => {
                        // Neither a pass nor a failure: verdict and streak as they were.
                        log_unchecked(pool.members()[i].addr, &err, &mut warned);
                        continue;
                    }
                };
                if passed == pool.is_healthy(i) {
                    streaks[i] = 0; // agrees with the verdict
                    continue;
                }
                streaks[i] += 1;
                let needed = if passed {
                    thresholds.rise
                } else {
                    thresholds.fall
                };
                if streaks[i] < needed.max(1) {
                    continue;
                }
                streaks[i] = 0;
                pool.set_healthy(i, passed, Instant::now());
                let addr = pool.members()[i].addr;
                if passed {
                    tracing::info!(%addr, "backend healthy again; warming up");
                } else {
                    tracing::warn!(%addr, "backend unhealthy");
                }
            }
        }
    })
}

/// Logs a probe the gateway could not make for want of its own resources: at debug, and
/// with a warning when none was given within [`SKIP_WARN_EVERY`] (`warned`: when the last
/// one was).
fn log_unchecked(addr: SocketAddr, err: &ProxyError, warned: &mut Option<Instant>) {
    let cause = std::error::Error::source(err).map(ToString::to_string);
    let cause = cause.as_deref().unwrap_or("-");
    tracing::debug!(%addr, %cause, "health check skipped: the gateway is out of resources; the backend keeps its verdict");
    let now = Instant::now();
    if warned.is_none_or(|at| now.saturating_duration_since(at) >= SKIP_WARN_EVERY) {
        *warned = Some(now);
        tracing::warn!(
            %addr,
            %cause,
            "health checks skipped: the gateway is out of descriptors, memory or local ports; \
             the backends keep their verdicts (each skip at debug, this at most once a minute)"
        );
    }
}

/// The gateway's probe: `GET http://ADDR/healthz`, healthy on a `2xx` answer, unchecked
/// when the connect failed for want of the gateway's own descriptors, memory or local
/// ports ([`crate::proxy::as_local_resources`]). It uses its own client, not the proxy's
/// breakers: a probe failure is not traffic.
pub fn http_probe(connect_timeout: Duration) -> impl Fn(SocketAddr) -> ProbeFuture + Send + Sync {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build(connector);
    move |addr| {
        let client = client.clone();
        Box::pin(async move {
            let Ok(req) = Request::get(format!("http://{addr}/healthz")).body(Empty::new()) else {
                return Probe::Failed;
            };
            match client.request(req).await {
                Ok(res) => res.status().is_success().into(),
                Err(err) => crate::proxy::as_local_resources(&err, addr)
                    .map_or(Probe::Failed, Probe::Unchecked),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use aegis_layers::circuit_breaker::CircuitBreakerLayer;

    use super::*;
    use crate::balance::Member;

    fn pool_of(ports: &[u16]) -> Arc<Pool> {
        let members = ports
            .iter()
            .map(|&port| Member {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                weight: 1,
                breaker: CircuitBreakerLayer::builder("test").build().handle(),
            })
            .collect();
        Arc::new(Pool::new(members, Duration::ZERO))
    }

    const ONE: Thresholds = Thresholds { fall: 1, rise: 1 };

    /// tokio's `interval` panicked on both: the task ended before its first probe (a
    /// zero period) or right after it (`Duration::MAX`, added to an instant unchecked).
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn intervals_of_zero_and_duration_max_keep_the_checks_running() {
        for (interval, rounds_in_a_second) in [(Duration::ZERO, 10), (Duration::MAX, 1)] {
            let pool = pool_of(&[1]);
            let probes = Arc::new(AtomicUsize::new(0));
            let p = Arc::clone(&probes);
            let task = spawn(&pool, interval, Duration::from_secs(1), ONE, move |_| {
                p.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Probe::Failed })
            });
            tokio::time::sleep(Duration::from_millis(950)).await;
            assert_eq!(
                probes.load(Ordering::SeqCst),
                rounds_in_a_second,
                "{interval:?}"
            );
            assert!(!pool.is_healthy(0), "{interval:?}: the first round ran");
            assert!(!task.is_finished(), "{interval:?}: the task lives");
            task.abort();
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn probes_every_interval_and_marks_by_answer_or_timeout() {
        let pool = pool_of(&[1, 2]);
        let probes = Arc::new(AtomicUsize::new(0));
        let first_ok = Arc::new(AtomicBool::new(true));
        let (p, ok) = (Arc::clone(&probes), Arc::clone(&first_ok));
        let every = Duration::from_secs(5);
        let task = spawn(&pool, every, Duration::from_secs(1), ONE, move |addr| {
            p.fetch_add(1, Ordering::SeqCst);
            let ok = ok.load(Ordering::SeqCst);
            Box::pin(async move {
                if addr.port() == 2 {
                    std::future::pending::<()>().await; // backend 2 never answers
                }
                Probe::from(ok)
            })
        });

        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(probes.load(Ordering::SeqCst), 2, "one round at once");
        assert!(pool.is_healthy(0));
        assert!(!pool.is_healthy(1), "timed out after 1 s");

        first_ok.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(3000)).await; // t = 4.5 s
        assert_eq!(
            probes.load(Ordering::SeqCst),
            2,
            "nothing before the interval"
        );
        assert!(pool.is_healthy(0));
        tokio::time::sleep(Duration::from_millis(1000)).await; // t = 5.5 s
        assert_eq!(probes.load(Ordering::SeqCst), 4, "second round at 5 s");
        assert!(!pool.is_healthy(0), "answered false");

        drop(pool);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(task.is_finished(), "ends once the pool is gone");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn verdicts_change_only_after_fall_or_rise_probes_in_a_row() {
        let pool = pool_of(&[1]);
        let script = Arc::new(parking_lot::Mutex::new(vec![
            false, true, false, false, true, true, false, true, true,
        ]));
        let s = Arc::clone(&script);
        let thresholds = Thresholds { fall: 2, rise: 2 };
        let _task = spawn(
            &pool,
            Duration::from_secs(1),
            Duration::from_secs(1),
            thresholds,
            move |_| {
                let mut s = s.lock();
                let answer = if s.is_empty() { true } else { s.remove(0) };
                Box::pin(std::future::ready(answer.into()))
            },
        );
        let mut verdicts = Vec::new();
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_millis(10)).await; // the round at t = n s
            verdicts.push(pool.is_healthy(0));
            tokio::time::sleep(Duration::from_millis(990)).await;
        }
        // probes:  F     T     F     F      T      T     F     T     T
        assert_eq!(
            verdicts,
            [true, true, true, false, false, true, true, true, true]
        );
        assert!(script.lock().is_empty());
    }

    /// A probe the gateway could not make (out of descriptors: `EMFILE`) was a failure:
    /// with `fall: 2`, two rounds of them marked a healthy backend unhealthy. It now
    /// counts toward neither threshold and breaks no streak; each is counted and logged
    /// at debug, with one warning a minute.
    #[test]
    fn an_unchecked_probe_leaves_the_verdict_and_the_streak_as_they_were() {
        use aegis_core::metrics::testing::{capture, run};

        const U: Option<bool> = None; // unchecked
        let ((verdicts, snap), logs) =
            aegis_core::testing::capture_logs(tracing::Level::DEBUG, || {
                run(true, || async {
                    let pool = pool_of(&[1]);
                    // F U U U F T U T, then unchecked for good.
                    let script = parking_lot::Mutex::new(vec![
                        Some(false),
                        U,
                        U,
                        U,
                        Some(false),
                        Some(true),
                        U,
                        Some(true),
                    ]);
                    let thresholds = Thresholds { fall: 2, rise: 2 };
                    let every = Duration::from_secs(1);
                    let _task = spawn(&pool, every, every, thresholds, move |addr| {
                        let mut s = script.lock();
                        let next = if s.is_empty() { U } else { s.remove(0) };
                        let probe = match next {
                            Some(passed) => Probe::from(passed),
                            None => Probe::Unchecked(ProxyError::from_connect(
                                addr,
                                std::io::Error::from_raw_os_error(EMFILE),
                            )),
                        };
                        Box::pin(std::future::ready(probe))
                    });
                    let mut verdicts = Vec::new();
                    for _ in 0..8 {
                        tokio::time::sleep(Duration::from_millis(10)).await; // round at t = n s
                        verdicts.push(pool.is_healthy(0));
                        tokio::time::sleep(Duration::from_millis(990)).await;
                    }
                    // Rounds at t = 8 ..= 68 s, all unchecked.
                    tokio::time::sleep(Duration::from_millis(60_500)).await;
                    assert!(pool.is_healthy(0), "61 unchecked rounds left it healthy");
                    verdicts
                })
            });
        // probes:  F     U     U     U     F      T      U      T
        assert_eq!(
            verdicts,
            [true, true, true, true, false, false, false, true]
        );
        let metrics = capture(&snap); // one snapshot: a snapshot drains what it reads
        let checks = |outcome| metrics.counter(HEALTH_CHECKS_TOTAL, &[("outcome", outcome)]);
        assert_eq!(checks("failed"), 2);
        assert_eq!(checks("passed"), 2);
        assert_eq!(checks("local_resources"), 3 + 1 + 61);
        assert_eq!(
            logs.matches("health check skipped").count(),
            65,
            "each at debug:\n{logs}"
        );
        let warnings: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("health checks skipped"))
            .collect();
        assert_eq!(warnings.len(), 2, "at t = 1 s and 61 s:\n{logs}");
        assert!(
            warnings[0].contains("cause=Too many open files"),
            "{}",
            warnings[0]
        );
        assert_eq!(logs.matches("backend unhealthy").count(), 1, "{logs}");
    }

    /// `EMFILE` (24 on Linux, the BSDs and macOS).
    const EMFILE: i32 = 24;
}
