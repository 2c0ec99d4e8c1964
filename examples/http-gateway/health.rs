//! Active health checks: probe every backend on a fixed interval and tell the pool.
//!
//! Every `interval` (the first round at once), each backend is probed concurrently
//! under `timeout`; a probe that answers `true` in time marks it healthy, anything else
//! (a `false`, an error folded into `false`, the timeout) unhealthy. The verdict goes
//! to [`Pool::set_healthy`], which starts the warm-up of a backend that comes back. The
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

/// Starts the health checks of `pool`'s backends.
pub fn spawn<P>(pool: &Arc<Pool>, interval: Duration, timeout: Duration, probe: P) -> JoinHandle<()>
where
    P: Fn(SocketAddr) -> ProbeFuture + Send + Sync + 'static,
{
    let pool = Arc::downgrade(pool);
    let probe = Arc::new(probe);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            let mut round = JoinSet::new();
            for (i, member) in pool.members().iter().enumerate() {
                let answer = probe(member.addr);
                round.spawn(async move {
                    (
                        i,
                        tokio::time::timeout(timeout, answer).await.unwrap_or(false),
                    )
                });
            }
            while let Some(done) = round.join_next().await {
                let Ok((i, healthy)) = done else { continue };
                if pool.set_healthy(i, healthy, Instant::now()) {
                    let addr = pool.members()[i].addr;
                    if healthy {
                        tracing::info!(%addr, "backend healthy again; warming up");
                    } else {
                        tracing::warn!(%addr, "backend unhealthy");
                    }
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

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn probes_every_interval_and_marks_by_answer_or_timeout() {
        let member = |port| Member {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
            breaker: CircuitBreakerLayer::builder("test").build().handle(),
        };
        let pool = Arc::new(Pool::new(vec![member(1), member(2)], Duration::ZERO));
        let probes = Arc::new(AtomicUsize::new(0));
        let first_ok = Arc::new(AtomicBool::new(true));
        let (p, ok) = (Arc::clone(&probes), Arc::clone(&first_ok));
        let task = spawn(
            &pool,
            Duration::from_secs(5),
            Duration::from_secs(1),
            move |addr| {
                p.fetch_add(1, Ordering::SeqCst);
                let ok = ok.load(Ordering::SeqCst);
                Box::pin(async move {
                    if addr.port() == 2 {
                        std::future::pending::<()>().await; // backend 2 never answers
                    }
                    ok
                })
            },
        );

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
}
