//! The gateways' observability endpoint: a small, bounded hyper 1 HTTP/1.1 server, and
//! the Prometheus recorder whose `/metrics` it serves.
//!
//! Shared by the `mqtt-gateway` (`metrics_http.rs`: `/metrics`, `/healthz`, `/readyz`,
//! `/events`, `/bans`) and the `http-gateway` (`/metrics`): each includes this file with
//! `#[path]`, as the tests include the examples' modules (the examples package has no
//! library: its dependencies are dev-dependencies).
//!
//! The server is bounded like everything else the gateways expose: at most
//! [`MAX_CONNECTIONS`] connections at once, [`MAX_PER_ADDRESS`] of them from one client
//! network (an address keyed by the [`KeyBy`] given, as the gateway's rate limits key
//! it: an IPv6 client by its /64 by default, since it can send from any address in it;
//! more are reset at accept, so that one client holding idle connections cannot starve
//! the scraper and the probes), [`HEADER_TIMEOUT`] to send the request headers,
//! [`CONNECTION_TIMEOUT`] in all, no keep-alive.
//!
//! Its refusals are counted in `aegis_rejections_total{layer="metrics_endpoint"}`
//! ([`REJECTION_LAYER`]), by `reason`: `concurrency` for a connection over its client
//! network's [`MAX_PER_ADDRESS`] (the reason the rate limiter's own per-client
//! connection cap gives), `over_capacity` for one over [`MAX_CONNECTIONS`] (the
//! outcome `aegis_connections_total` gives a connection over the gateway's cap). Both
//! series are registered when the server starts, at 0.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aegis_layers::rate_limit::{ConcurrencyLimit, KeyBy};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections the endpoint serves at once; a scraper and a probe or two need few.
pub(crate) const MAX_CONNECTIONS: usize = 16;

/// Connections one client network holds at once, of [`MAX_CONNECTIONS`].
pub(crate) const MAX_PER_ADDRESS: u32 = 4;

/// Time a client has to send its request headers.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection lasts at most, however slowly its client reads the answer.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The `layer` label of the endpoint's refusals in `aegis_rejections_total`.
pub(crate) const REJECTION_LAYER: &str = "metrics_endpoint";

/// Installs `builder`'s recorder (with no HTTP listener of its own) as the global
/// `metrics` recorder, and starts its upkeep task.
pub(crate) fn install_recorder(builder: PrometheusBuilder) -> Result<PrometheusHandle, String> {
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// A `text/plain` answer.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// The answer to `GET /metrics`: `prometheus` rendered in the Prometheus text format.
pub(crate) fn metrics(prometheus: &PrometheusHandle) -> Response<Full<Bytes>> {
    let mut res = text(StatusCode::OK, prometheus.render());
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

/// Serves `route` on `listener` until the process ends, within the bounds of the
/// [module docs](self); `key_by` keys client addresses for [`MAX_PER_ADDRESS`].
pub(crate) async fn serve<R, F>(listener: TcpListener, key_by: KeyBy, route: R)
where
    R: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let refused = |reason: &'static str| {
        metrics::counter!(
            aegis_core::metrics::REJECTIONS_TOTAL,
            "layer" => REJECTION_LAYER,
            "reason" => reason,
        )
    };
    // Registered now, so that both series read 0 until a refusal.
    let (over_address_cap, over_cap) = (refused("concurrency"), refused("over_capacity"));
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // The rate limiter's concurrency tier, keyed as the gateway's rate limits key.
    let per_address = Arc::new(ConcurrencyLimit::new(MAX_PER_ADDRESS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(16 * 1024);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over a cap: reset at once, unread, as the gateway's own accept loop refuses
        // (a plain drop would close with a FIN and leave a socket in FIN_WAIT2).
        let refuse = <tokio::net::TcpListener as aegis_core::serve::Listener>::refuse;
        let Some(slot) = per_address.acquire(key_by.key(peer.ip())) else {
            over_address_cap.increment(1);
            refuse(stream);
            continue;
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            over_cap.increment(1);
            refuse(stream);
            continue;
        };
        let route = route.clone();
        let conn = http.serve_connection(TokioIo::new(stream), service_fn(route));
        tokio::spawn(async move {
            // A client that never finishes is cut by the header timeout; one that reads
            // its answer slowly is bounded here.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop((permit, slot));
        });
    }
}
