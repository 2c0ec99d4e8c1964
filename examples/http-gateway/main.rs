//! A hardened HTTP/1 reverse proxy in front of several backends.
//!
//! ```text
//! cargo run --example http-gateway -- [--listen 127.0.0.1:8080] --backend ADDR[@WEIGHT] [--backend ...]
//!     [--trusted-proxy CIDR ...] [--hsts-max-age SECS] [--max-body BYTES] [--rate PER_SEC]
//!     [--max-connections-per-client N]
//! ```
//!
//! Every connection goes through the Aegis layers: a PROXY protocol header is read only
//! from `--trusted-proxy` networks (otherwise the client is the socket's peer, and
//! `X-Forwarded-For` from clients is never believed), a cap on the connections one
//! client address has open at once (64 by default), a per-client connection rate that
//! an adaptive controller lowers when the backends' P95 latency passes 500 ms, and
//! slowloris deadlines (first byte 5 s, first request's headers 10 s, each up to 50 ms
//! early by a per-connection draw, 75 s of silence within a request), hyper's header
//! read timeout of 10 s for each later request, counted from the end of the previous
//! response (so an idle keep-alive connection is closed after 10 s), and the 30 s
//! backend timeout for both the client's whole request body (from the call to the
//! backend) and a backend's response headers (30 s of the backend's own time, the time
//! spent waiting on the client's body left out), which also closes a backend connection whose writes have made no progress for
//! that long (a backend that answered and stopped reading the body). Each request then
//! passes header limits
//! (`431`), a transfer-coding check (`501` for a `Transfer-Encoding` other than one
//! `chunked`; a backend's answer with such a one is `502`), `Host` checks (`400` when an HTTP/1.1 request has none, or a request has
//! several or an invalid one), a body limit (`413`), hop-by-hop header stripping,
//! forwarding headers replaced (`X-Forwarded-For` set to the client,
//! `X-Forwarded-Proto: http`, `X-Forwarded-Host` from `Host`; every other
//! `X-Forwarded-*`, `Forwarded`, `X-Real-IP` and client-IP header such as
//! `True-Client-IP` or `CF-Connecting-IP` removed, and every header whose name has an
//! underscore, as nginx does), security response headers, only origin-form request targets (`/path`;
//! `OPTIONS *` is answered `200` by the gateway, `CONNECT` `405`, any other form `400`),
//! and a smooth weighted round-robin over the backends that skips open circuit breakers
//! and backends failing `GET /healthz` twice in a row (checked every 5 s), and ramps a
//! recovered backend up over 30 s. With no backend left: `503`.
//!
//! To poke it, start two backends (anything answering HTTP with a `/healthz`), then:
//!
//! ```text
//! cargo run --example http-gateway -- --backend 127.0.0.1:9001 --backend 127.0.0.1:9002@2
//! curl -i http://127.0.0.1:8080/                                  # spread 1:2, nosniff, DENY
//! curl -i -H 'X-Forwarded-For: 6.6.6.6' http://127.0.0.1:8080/    # the backend sees 127.0.0.1
//! curl -i -X OPTIONS --request-target '*' http://127.0.0.1:8080/  # 200, Allow: GET, ...
//! curl -i -H 'Content-Length: 9999999' --data-binary x http://127.0.0.1:8080/ # 413, on the header
//! ```
//!
//! Set `RUST_LOG=debug` to see rejections and health changes.

mod balance;
mod client_body;
mod gateway;
mod headers;
mod health;
mod proxy;
mod sanitize;
mod server;
mod write_timeout;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use clap::Parser;

use crate::gateway::{BackendSpec, Config, Gateway};

/// A hardened HTTP/1 reverse proxy (see the file's docs).
#[derive(Debug, Parser)]
#[command(name = "http-gateway")]
struct Args {
    /// Where to listen (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A backend, `ADDR` or `ADDR@WEIGHT`; repeat for more.
    #[arg(long = "backend", required = true)]
    backends: Vec<BackendSpec>,
    /// A network whose PROXY protocol headers are believed; repeat for more.
    #[arg(long = "trusted-proxy")]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Sends `Strict-Transport-Security: max-age=SECS` (only behind TLS).
    #[arg(long)]
    hsts_max_age: Option<u64>,
    /// The most bytes of request body.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_body: usize,
    /// New connections per client and second (the controller's ceiling).
    #[arg(long, default_value = "20")]
    rate: NonZeroU32,
    /// Connections one client address may have open at once.
    #[arg(long, default_value = "64")]
    max_connections_per_client: NonZeroU32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut config = Config::new(args.backends);
    config.trusted_proxies = args.trusted_proxies;
    config.hsts = args.hsts_max_age.map(Duration::from_secs);
    config.max_body = args.max_body;
    config.per_client_rate = args.rate;
    config.max_connections_per_client = args.max_connections_per_client;
    config.per_client_burst = args
        .rate
        .saturating_mul(NonZeroU32::new(2).expect("non-zero"));

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let gateway = Gateway::start(&config, listener)?;
    tracing::info!(addr = %gateway.addr, backends = config.backends.len(), "http-gateway listening");
    let mut status = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            done = tokio::signal::ctrl_c() => break done?,
            _ = status.tick() => log_status(&gateway),
        }
    }
    drop(gateway);
    Ok(())
}

/// One line per backend: health, breaker, current weight; and the admitted rate.
fn log_status(gateway: &Gateway) {
    let now = tokio::time::Instant::now();
    for (i, (member, breaker)) in gateway
        .pool
        .members()
        .iter()
        .zip(&gateway.breakers)
        .enumerate()
    {
        tracing::info!(
            backend = %member.addr,
            healthy = gateway.pool.is_healthy(i),
            breaker = breaker.state().label(),
            weight = gateway.pool.weight_now(i, now),
            "backend status"
        );
    }
    let rate = gateway.rate.per_client().map(|q| q.replenish_interval());
    tracing::info!(per_client_interval = ?rate, "admitted rate");
}
