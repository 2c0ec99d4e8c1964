//! The gateway's `/metrics` endpoint (`--metrics`): its Prometheus recorder, served by
//! the mqtt-gateway's bounded endpoint server (`shared/metrics_endpoint.rs`). The
//! series are in the table of `main.rs`'s docs.

use aegis_layers::rate_limit::KeyBy;
use hyper::{Method, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// Bucket bounds (seconds) of `aegis_connection_duration_seconds`, so that it renders as
/// a Prometheus histogram rather than a summary: from a refused connection's
/// milliseconds to a keep-alive connection's minutes.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 75.0, 300.0, 1800.0,
];

/// The gateway's Prometheus recorder, to install (`metrics_endpoint::install_recorder`).
pub fn recorder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(aegis_core::metrics::CONNECTION_DURATION_SECONDS.to_string()),
            DURATION_BUCKETS,
        )
        .expect("the bounds are not empty")
}

/// Serves `GET /metrics` (the Prometheus text of `prometheus`) on `listener` until the
/// process ends, bounded as the mqtt-gateway's endpoint (`metrics_endpoint`); any other
/// path is `404`, another method `405`.
pub async fn serve(listener: TcpListener, prometheus: PrometheusHandle) {
    use crate::metrics_endpoint::{metrics, text};
    crate::metrics_endpoint::serve(listener, KeyBy::default(), move |req| {
        let res = match (req.uri().path(), req.method()) {
            ("/metrics", &Method::GET | &Method::HEAD) => metrics(&prometheus),
            ("/metrics", _) => text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
            _ => text(StatusCode::NOT_FOUND, "not found: the path is /metrics\n"),
        };
        std::future::ready(Ok(res))
    })
    .await;
}
