//! One port, two protocols: MQTT is proxied to a broker, HTTP serves a health page.
//!
//! ```text
//! cargo run --example mqtt-and-health -- [UPSTREAM] [LISTEN]
//! ```
//!
//! Defaults: proxy MQTT to `127.0.0.1:1884`, listen on `127.0.0.1:1883`. The
//! [`SniffRouter`] reads each connection's first bytes: an MQTT CONNECT goes to the
//! upstream broker through [`Proxy`] (byte for byte, the sniffed bytes replayed first),
//! an HTTP/1 request goes to a bounded hyper server that answers `GET /healthz` with
//! `200 ok`, and anything else (TLS, HTTP/2, garbage, silence for 5 s) is closed.
//!
//! To poke it, run a broker on the upstream port (`mosquitto -p 1884`), then:
//!
//! ```text
//! curl -i http://127.0.0.1:1883/healthz                  # HTTP/1.1 200 OK ... ok
//! mosquitto_pub -h 127.0.0.1 -p 1883 -t demo -m hello    # reaches the broker
//! mosquitto_sub -h 127.0.0.1 -p 1883 -t demo             # in another terminal
//! openssl s_client -connect 127.0.0.1:1883               # closed: no TLS route
//! ```
//!
//! Set `RUST_LOG=debug` to see each rejection with its label.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use aegis_core::proxy::Proxy;
use aegis_core::serve;
use aegis_layers::sniff::{Http1, Protocols, SniffRouter};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};

/// `GET /healthz` answers `200 ok`; every other path `404`.
async fn health(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = if req.uri().path() == "/healthz" {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::NOT_FOUND, "not found")
    };
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    Ok(res)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let mut args = std::env::args().skip(1);
    let upstream: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:1884").parse()?;
    let listen: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:1883").parse()?;

    let router = SniffRouter::new()
        .timeout(Duration::from_secs(5))
        .route(
            Protocols::MQTT,
            Proxy::new(upstream).connect_timeout(Duration::from_secs(3)),
        )
        .route(
            Protocols::HTTP1,
            Http1::new(service_fn(health))
                .max_headers(32)
                .header_read_timeout(Duration::from_secs(5)),
        );

    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, %upstream, "mqtt-and-health listening");
    let report = serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    std::process::exit(i32::from(!report.drained()));
}
