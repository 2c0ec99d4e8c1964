//! A hardened HTTP/1 reverse proxy in front of several backends.
//!
//! ```text
//! cargo run --example http-gateway -- [--listen 127.0.0.1:8080] --backend ADDR[@WEIGHT] [--backend ...]
//!     [--trusted-proxy CIDR ...] [--hsts-max-age SECS] [--max-body BYTES] [--rate PER_SEC]
//!     [--max-connections-per-client N] [--backend-idle-timeout DURATION] [--metrics ADDR|off]
//! ```
//!
//! Every connection goes through the Aegis layers: a PROXY protocol header is read only
//! from `--trusted-proxy` networks (otherwise the client is the socket's peer, and
//! `X-Forwarded-For` from clients is never believed), a cap on the connections one
//! client address has open at once (64 by default), a per-client connection rate that
//! an adaptive controller lowers when the backends' P95 latency passes 500 ms (each
//! sample counted as its client's: the P95 is taken without the one client address
//! holding the most of the slow answers, so that a client asking over and over for a
//! URL the backend is slow at cannot cut everyone's rate by itself; only a slowness
//! more than one client sees does, see `proxy::Upstream::record_latency`), and
//! slowloris deadlines (first byte 5 s, first request's headers 10 s, each up to 50 ms
//! early by a per-connection draw, 75 s within a request with no byte read from the
//! client nor written to it: a response the client takes keeps the connection however
//! long it lasts), hyper's header
//! read timeout of 11 s for each later request, counted from the end of the previous
//! response (so an idle keep-alive connection is closed after 11 s, a connection that
//! ended well: `outcome="ok"`; 1 s over the first request's 10 s, so that the slowloris
//! deadline cuts a slow first request and counts it, never hyper's clock in a tie),
//! and the 30 s
//! backend timeout for both the client's whole request body (from the call to the
//! backend) and a backend's response headers (30 s of the backend's own time, the time
//! spent waiting on the client's body left out), which also closes a backend connection whose writes have made no progress for
//! that long (a backend that answered and stopped reading the body), and bounds each
//! wait for the next piece of a backend's response body (a backend that stalls mid-body
//! has its body cut there, `body_timeout`). Each request then
//! passes header limits
//! (`431`), a transfer-coding check (`501` for a `Transfer-Encoding` other than one
//! `chunked`; a backend's answer with such a one is `502`), `Host` checks (`400` when an HTTP/1.1 request has none, or a request has
//! several or an invalid one; `400` too when an HTTP/1.0 request has none, which RFC 9112
//! allows: the gateway has no name of its own to give the backend, and hyper's client
//! would fill in the backend's own address, which the backend could put in a redirect;
//! Envoy refuses it too unless given a default host), a body limit (`413`), hop-by-hop header stripping (and `Expect`, see below),
//! forwarding headers replaced (`X-Forwarded-For` set to the client,
//! `X-Forwarded-Proto: http`, `X-Forwarded-Host` from `Host`; every other
//! `X-Forwarded-*`, `Forwarded`, `X-Real-IP`, the other client-IP, host and path
//! headers the gateway knows of, such as `True-Client-IP`, `CF-Connecting-IP`,
//! `X-Host` or `X-Original-URL` (a deny-list), removed
//! ([`CLIENT_ADDRESS_HEADERS`](crate::headers::CLIENT_ADDRESS_HEADERS)), and every header whose name has an
//! underscore, as nginx does), security response headers, only origin-form request targets (`/path`;
//! `OPTIONS *` is answered `200` by the gateway, `CONNECT` `405`, any other form `400`),
//! only the methods `GET`, `HEAD`, `POST`, `PUT`, `DELETE`, `OPTIONS` and `PATCH` (`TRACE`
//! is answered `405`, as hardened proxies do against cross-site tracing, any other
//! method `501`; an `OPTIONS` with `Max-Forwards: 0` is answered `200` by the gateway,
//! and one with a greater value is forwarded with it one less, RFC 9110 §7.6.2),
//! and a smooth weighted round-robin over the backends that skips open circuit breakers
//! and backends failing `GET /healthz` twice in a row (checked every 5 s; a check the
//! gateway cannot make for want of its own descriptors, memory or local ports counts
//! neither way, and the backend keeps its verdict), and ramps a
//! recovered backend up over 30 s. With no backend left: `503`. A backend's breaker
//! opens after 5 failures in a row for 10 s, then lets one request through as its probe,
//! which has the 30 s backend timeout like any other (the longer of the open time and
//! the backend timeout: a probe that had only the 10 s failed on a request slow but in
//! time, and re-opened the circuit for every client), and counts as failures only what
//! shows the backend failing: a connection refused or reset, a timeout, an answer the
//! gateway cannot relay (a transfer coding other than `chunked`, a `1xx` final answer, a `204` with a body),
//! and the backend's own `502`, `503` and `504`; not a connection closed or reset while
//! the client's request body was still being sent (the client's slow upload, or the
//! backend refusing it early: one client opened the circuit so). Its other `5xx` (`500`, `501`, `505`, ...) are relayed and
//! not counted: a client chooses the URL, method and version that get them (a stock
//! server answers `501` to an unknown method), and five of them opened the circuit for
//! every client.
//!
//! A request with `Expect: 100-continue` is forwarded without the header: the gateway
//! answers `100 Continue` itself as soon as the request has gone on to a backend, without
//! waiting for the backend's decision (nor relaying its own `100`), and sends the body at
//! once; a request the gateway refuses itself gets no `100`. (Forwarded, the header let a
//! backend that answers it early, and takes the body as unsent, read the body as its
//! next request on a pooled connection: request smuggling, `proxy.rs`.) A backend's answer that comes before the request body
//! has been sent whole (an early `401`, say) is relayed with `Connection: close`, and
//! once it is over the rest of the body is dropped unread and both connections are
//! closed (`client_body.rs`), instead of waiting up to 30 s for a body nobody reads.
//!
//! A client's read EOF ends its connection, as nginx does (its `499`): the gateway drops
//! the backend's request or answer at once when a client goes away, since at the TCP
//! level a client that closed and one that only shut its write side look the same
//! until the next write. So a client that half-closes once its request is sent (`nc
//! -N`, some scripts) gets no answer, though the backend may have run the request;
//! HAProxy, which serves half-closed clients, holds a vanished client's backend work
//! until its answer is written.
//!
//! A backend connection reads into a buffer of at most 64 KiB: a backend's answer head
//! must fit in it (a larger one is answered `502`), and a client that asks for a large
//! answer and does not read it holds some 240 KB of the gateway's memory, not 1 MB
//! (`proxy::BACKEND_MAX_BUF_SIZE`).
//!
//! Backend connections are kept alive for reuse, idle at most `--backend-idle-timeout`
//! (default 4 s). Keep it below the backends' own keep-alive timeout (5 s for Node.js,
//! uvicorn and Apache httpd; 2 s for gunicorn): a backend closes an idle connection at
//! its timeout, and a request the gateway sends on it just then crosses the close and
//! is lost (`502`). Such a loss, a reused connection closed or reset before any byte
//! of its answer, is counted `stale_connection` and not against the breaker.
//!
//! # Metrics
//!
//! `--metrics ADDR` (default `127.0.0.1:9091`, loopback) serves `GET /metrics`, the
//! Prometheus text format, with the bounded server of the mqtt-gateway's endpoint
//! (`examples/shared/metrics_endpoint.rs`: 16 connections, 4 per client network, 5 s
//! for the request headers, 30 s in all, no keep-alive); `--metrics off` serves none and
//! installs no recorder. A port that cannot be bound is an error at start-up. No series
//! holds a client address, host, path or header value; beyond loopback all the same,
//! bind it to an address the HTTP clients cannot reach: its caps are shared by all who
//! can.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_rejections_total` | counter | `layer="http"`, `reason`: `bad_target`, `bad_host`, `method`, `unknown_method`, `max_forwards`, `bad_body`, `body_stall`, `body_too_large`, `headers_too_large`, `transfer_coding`, `parse`, `header_timeout` | requests the gateway refused itself: `400` for a target that is not a path (`bad_target`; `OPTIONS *` is answered, not refused) or a missing, repeated or invalid `Host` (`bad_host`), `405` for `CONNECT` and `TRACE` (`method`), `501` for a method outside `Allow` (`unknown_method`), `400` for an `OPTIONS` whose `Max-Forwards` is not one number (`max_forwards`), `400` for a malformed or cut-off body (`bad_body`), `408` for a body still awaited at the backend timeout (`body_stall`), `413` for a body over `--max-body`, declared or streamed (`body_too_large`), `431` for headers over the limits, or a request head past hyper's 16 KiB buffer (`headers_too_large`), `501` for a `Transfer-Encoding` other than one `chunked` (`transfer_coding`), and hyper's `400` for a request head that does not parse (`parse`); a connection's first request head not in within hyper's header read timeout, closed without an answer (`header_timeout`: the slowloris deadline, counted `total`, cuts it first with these defaults). hyper's own refusals (a head too large or malformed, or late) close the connection, counted `rejected` in `aegis_connections_total` |
//! | `aegis_rejections_total` | counter | `layer="rate_limit"`, `reason`: `per_client`, `overflow`, `concurrency` | connections over the per-client rate (`--rate`, lowered by the controller), over the one budget at that rate that every new client shares while 100,000 client addresses are tracked (`overflow`), or over the per-client cap (`--max-connections-per-client`), closed at once |
//! | `aegis_rejections_total` | counter | `layer="slowloris"`, `reason`: `first_byte`, `total`, `idle` | connections cut by a deadline (first byte 5 s, first request's headers 10 s, 75 s within a request with no byte read from the client nor written to it) |
//! | `aegis_rejections_total` | counter | `layer="proxy_protocol"`, `reason`: `missing`, `timeout`, `too_long`, `invalid`, `eof`, `io` | with `--trusted-proxy` only: PROXY protocol headers refused (from trusted peers: any other peer is its own client, and a PROXY line it sends is its request's first bytes, refused as `layer="http"`, `reason="parse"`) |
//! | `aegis_rejections_total` | counter | `layer="circuit_breaker"`, `reason="open"` | calls to a backend its open breaker failed fast (the client got `503`, also counted `breaker_open` below) |
//! | `aegis_rejections_total` | counter | `layer="metrics_endpoint"`, `reason`: `concurrency`, `over_capacity` | connections to this `/metrics` endpoint reset at accept: over a client network's 4 (`concurrency`) or over its 16 (`over_capacity`) |
//! | `aegis_http_backend_errors_total` | counter | `reason`: `no_backend`, `breaker_open`, `timeout`, `connect`, `transfer_coding`, `during_upload`, `stale_connection`, `informational`, `no_content_body`, `failed`, `local_resources`, `truncated`, `truncated_held`, `body_timeout` | the gateway's own answer where a backend's was wanted: `503` with no backend available (`no_backend`) or the chosen one's breaker refusing the call (`breaker_open`), `504` when a backend did not answer within its 30 s (`timeout`), `502` when the connection to it failed (`connect`), it answered in a transfer coding the gateway does not implement (`transfer_coding`), the connection failed (closed, reset) while the client's request body was still being sent (`during_upload`: the backend gave up on a slow upload, or refused it early and closed; not counted against the backend's breaker), closed or reset a reused keep-alive connection before any byte of its answer (`stale_connection`: the keep-alive race, see `--backend-idle-timeout`; not counted against the backend's breaker), its final answer was a `1xx`, such as a `101 Switching Protocols` the gateway never asks for as it strips `Upgrade` (`informational`), it answered `204` with a `Transfer-Encoding` or a `Content-Length` other than `0`, a body that could reach the next client on the connection, which is not reused (`no_content_body`), or failed otherwise (`failed`), and `503` when the gateway could not connect for want of its own descriptors, memory or ports (`local_resources`, not counted against the backend's breaker); and a backend's answer cut off mid-body after its head was relayed (`truncated`: the client's connection is closed short of the body, and the backend's breaker counts a failure; not counted while the client's request body has not gone out whole), or so cut off after the client held the body back, not reading for over a second (`truncated_held`: maybe the backend's send timeout, which the client caused; not counted against the backend's breaker), or stalled mid-body, sending nothing for the 30 s backend timeout while the gateway waited on it (`body_timeout`: the body is cut there and the client's connection closed; the backend's breaker counts a failure, as for `truncated`) |
//! | `aegis_http_health_checks_total` | counter | `outcome`: `passed`, `failed`, `local_resources` | the health checks of the backends (`GET /healthz` every 5 s): answered `2xx` (`passed`), not, or not within 2 s (`failed`), or not made because the gateway could not connect for want of its own descriptors, memory or ports (`local_resources`: the backend keeps its verdict; logged at debug, and warned at most once a minute) |
//! | `aegis_circuit_state`, `aegis_circuit_transitions_total` | gauge, counter | `name`: `backend0`, `backend1`, ... in `--backend` order (`to` for the transitions) | each backend's breaker: 0 closed, 1 half-open, 2 open |
//! | `aegis_adaptive_rate`, `aegis_adaptive_p95_seconds`, `aegis_adaptive_decisions_total` | gauge, gauge, counter | `name="http_gateway"` (`direction` for the decisions) | the latency controller: the admitted per-client rate, the backends' P95 it decided on, its decisions |
//! | `aegis_rate_limit_keys`, `aegis_rate_limit_evictions_total`, `aegis_rate_limit_overflow_total` | gauge, counter, counter | `limiter="per_client"` | the rate limiter's client addresses tracked |
//! | `aegis_proxy_protocol_connections_total` | counter | `outcome` | with `--trusted-proxy` only: connections by the PROXY header they sent |
//! | `aegis_connections_total`, `aegis_active_connections`, `aegis_accept_errors_total`, `aegis_connection_duration_seconds` | counter, gauge, counter, histogram | `outcome`, `kind` | the accept loop's (see `aegis_core::metrics`): connections by how they ended (`rejected`: a layer's refusal above; `ok`: closed by either side between requests, a keep-alive connection closed idle at hyper's header read timeout among them), open now, failed accepts, durations |
//!
//! To poke it, start two backends (anything answering HTTP with a `/healthz`), then:
//!
//! ```text
//! cargo run --example http-gateway -- --backend 127.0.0.1:9001 --backend 127.0.0.1:9002@2
//! curl -i http://127.0.0.1:8080/                                  # spread 1:2, nosniff, DENY
//! curl -i -H 'X-Forwarded-For: 6.6.6.6' http://127.0.0.1:8080/    # the backend sees 127.0.0.1
//! curl -i -X OPTIONS --request-target '*' http://127.0.0.1:8080/  # 200, Allow: GET, ...
//! curl -i -H 'Content-Length: 9999999' --data-binary x http://127.0.0.1:8080/ # 413, on the header
//! curl -s 127.0.0.1:9091/metrics | grep aegis_                    # reason="body_too_large" 1
//! ```
//!
//! At start the soft open-files limit is raised to the hard one, and the cap of 10,000
//! connections served at once is kept within `(limit - 128) / 2` (each client holds its
//! socket and a backend connection), with a warning when that cuts it: out of
//! descriptors, accepts would fail and new clients wait in the backlog instead of being
//! reset at the cap. A backend connect that fails for lack of the gateway's own
//! descriptors, memory or ports is answered `503` and not counted against the backend;
//! a health check that fails so is skipped, and leaves the backend healthy or unhealthy
//! as it was (counted `local_resources` in `aegis_http_health_checks_total`).
//!
//! Set `RUST_LOG=debug` to see rejections, health changes and skipped health checks.

mod backend_body;
mod balance;
mod client_body;
mod gateway;
mod headers;
mod health;
#[path = "../shared/log_writer.rs"]
mod log_writer;
#[path = "../shared/metrics_endpoint.rs"]
mod metrics_endpoint;
mod metrics_http;
#[path = "../shared/nofile.rs"]
mod nofile;
mod proxy;
mod refusal;
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
    /// How long a backend connection is kept idle for reuse (`500ms`, `4s`; `0s`: none):
    /// keep it below the backends' own keep-alive timeout. [default: 4s]
    #[arg(long, value_name = "DURATION", value_parser = gateway::parse_idle_timeout)]
    backend_idle_timeout: Option<Duration>,
    /// Address of `/metrics` (Prometheus text), or `off`.
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:9091")]
    metrics: MetricsAddr,
}

/// `--metrics`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct MetricsAddr(Option<SocketAddr>);

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self(None));
        }
        s.parse()
            .map(|addr| Self(Some(addr)))
            .map_err(|e| format!("{e}: an address such as 127.0.0.1:9091, or off"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Lines are queued for a thread of their own (`log_writer`): a stdout nobody reads
    // loses lines, counted, instead of blocking every task that logs, and the ctrl-c
    // wait with them.
    let writer = log_writer::Lossy::start(std::io::stdout(), "http-gateway");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(writer.clone())
        .init();
    let result = run().await;
    writer.finish("stdout");
    result
}

/// The gateway, from its command line to ctrl-c.
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut config = Config::new(args.backends);
    config.trusted_proxies = args.trusted_proxies;
    config.hsts = args.hsts_max_age.map(Duration::from_secs);
    config.max_body = args.max_body;
    config.per_client_rate = args.rate;
    config.max_connections_per_client = args.max_connections_per_client;
    if let Some(idle) = args.backend_idle_timeout {
        config.backend_idle_timeout = idle;
    }
    config.per_client_burst = args
        .rate
        .saturating_mul(NonZeroU32::new(2).expect("non-zero"));
    // The soft open-files limit raised to the hard one, and the cap kept within it.
    let cap = nofile::connection_cap(
        "max_connections",
        u64::try_from(config.max_connections).unwrap_or(u64::MAX),
        nofile::raise(),
        nofile::DESCRIPTORS_PER_CLIENT,
        0,
    );
    config.max_connections = usize::try_from(cap).unwrap_or(usize::MAX);

    // Installed before the gateway starts: the layers keep the handles of the recorder in
    // force when they first count.
    let prometheus = match args.metrics.0 {
        Some(_) => Some(metrics_endpoint::install_recorder(metrics_http::recorder())?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let metrics_listener = match args.metrics.0 {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--metrics {addr}: cannot bind: {e}"))?,
        ),
        None => None,
    };
    let gateway = Gateway::start(&config, listener)?;
    let metrics_addr = match (metrics_listener, prometheus) {
        (Some(listener), Some(prometheus)) => {
            let addr = listener.local_addr()?;
            tokio::spawn(metrics_http::serve(listener, prometheus));
            addr.to_string()
        }
        _ => "off".to_string(),
    };
    tracing::info!(addr = %gateway.addr, metrics = %metrics_addr, backends = config.backends.len(), "http-gateway listening");
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
