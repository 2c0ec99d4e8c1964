//! A bare TCP proxy built from aegis-core: listen, cap connections, proxy to an upstream,
//! drain on Ctrl-C.
//!
//! ```text
//! cargo run --example tcp-proxy -- [LISTEN] [UPSTREAM] [MAX_CONNECTIONS]
//! ```
//!
//! Defaults: listen on `127.0.0.1:7000`, proxy to `127.0.0.1:7001`, at most 10,000
//! connections. To poke it, run an upstream (`nc -lk 127.0.0.1 7001`) and a client
//! (`nc 127.0.0.1 7000`). Set `RUST_LOG=debug` to see each refused or failed connection
//! (an upstream down, the cap reached). The process exits
//! with status 0 when the drain finished and 1 when connections had to be aborted.

use std::net::SocketAddr;
use std::time::Duration;

use aegis_core::proxy::Proxy;
use aegis_core::serve;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:7000").parse()?;
    let upstream: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:7001").parse()?;
    // At least one (a cap of 0 or over `u32::MAX` is no cap `serve` takes).
    let max: std::num::NonZeroU32 = args.next().as_deref().unwrap_or("10000").parse()?;

    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, %upstream, max, "tcp-proxy listening");
    let proxy = Proxy::new(upstream).connect_timeout(Duration::from_secs(3));
    let report = serve(listener, proxy)
        .max_connections(usize::try_from(max.get())?)
        .nodelay(true)
        .drain_timeout(Duration::from_secs(10))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    tracing::info!(
        drained = report.drained(),
        aborted = report.aborted(),
        "stopped"
    );
    std::process::exit(i32::from(!report.drained()));
}
