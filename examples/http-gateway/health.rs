//! Active health checks: probe every backend on a fixed interval and tell the pool.
//!
//! Every `interval` (the first round at once), each backend is probed concurrently
//! under `timeout`; a probe passes when it answers `true` in time, and fails otherwise
//! (a `false`, an error folded into `false`, the timeout). [`Thresholds::fall`] failures
//! in a row mark a healthy backend unhealthy, [`Thresholds::rise`] passes in a row mark
//! it healthy again (one lost probe does not flap a backend). The verdict goes to
//! [`Pool::set_healthy`], which starts the warm-up of a backend that comes back. The
//! probe is a function of the backend's address, so tests can script it; the gateway's
//! is [`http_probe`], a `GET /healthz` that wants a `2xx`.
//!
//! The task holds the pool weakly and ends at the first round after the pool is gone.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

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
pub type ProbeFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

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
                    let passed = tokio::time::timeout(timeout, answer).await.unwrap_or(false);
                    (i, passed)
                });
            }
            while let Some(done) = round.join_next().await {
                let Ok((i, passed)) = done else { continue };
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

/// The gateway's probe: `GET http://ADDR/healthz`, healthy on a `2xx` answer. It uses
/// its own client, not the proxy's breakers: a probe failure is not traffic.
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
                return false;
            };
            client
                .request(req)
                .await
                .is_ok_and(|res| res.status().is_success())
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
                Box::pin(async { false })
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
                ok
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
                Box::pin(std::future::ready(answer))
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
}
