//! The per-connection tracing span of the accept loop, over a real loopback socket.
//!
//! Alone in its own test binary: tracing caches each callsite's interest process-wide,
//! and a test running in parallel without a subscriber could make the span's callsite
//! look disabled to this one.

use std::future::{Future, IntoFuture};
use std::io;

use aegis_core::{Conn, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Runs `f` on `rt` with a DEBUG subscriber set for this thread only; returns its
/// result and the log lines.
fn with_logs<T>(rt: &tokio::runtime::Runtime, f: impl Future<Output = T>) -> (T, String) {
    aegis_core::testing::capture_logs(tracing::Level::DEBUG, || rt.block_on(f))
}

#[derive(Debug, thiserror::Error)]
#[error("refused by the test")]
struct Refused;

impl aegis_core::error::Reject for Refused {
    fn layer(&self) -> &'static str {
        "test"
    }
    fn label(&self) -> &'static str {
        "refused"
    }
}

#[test]
fn each_connection_runs_in_a_span_with_its_peer_and_client_id() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (client, text) = with_logs(&rt, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = tower::service_fn(|mut conn: Conn<TcpStream>| async move {
            let mut b = [0u8; 1];
            conn.read_exact(&mut b)
                .await
                .map_err(aegis_core::BoxError::from)?;
            // What a protocol layer does once it knows the client.
            tracing::Span::current().record("client_id", tracing::field::debug("sensor-7"));
            Err::<(), aegis_core::BoxError>(aegis_core::error::reject(Refused).into())
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            serve(listener, svc)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        let client = s.local_addr().unwrap();
        s.write_all(b"x").await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        stop_tx.send(()).unwrap();
        assert!(server.await.unwrap().drained());
        client
    });
    let line = text
        .lines()
        .find(|l| l.contains("connection rejected"))
        .unwrap_or_else(|| panic!("no rejection event in:\n{text}"));
    assert!(line.contains(&format!("peer={client}")), "{text}");
    assert!(line.contains("client_id=\"sensor-7\""), "{line}");
    assert!(line.contains("reason=\"refused\""), "{line}");
}

/// The accept loop runs as a task of its own: it takes the span and the subscriber of
/// whoever awaits the server. On a current-thread runtime, each connection's span is a
/// child of that span; on a multi-thread runtime, where the loop runs on a worker, the
/// loop's own events still reach a subscriber set for the awaiting thread only.
#[test]
fn the_loop_runs_in_the_callers_span_and_with_its_subscriber() {
    async fn echo_once(mut conn: Conn<TcpStream>) -> io::Result<()> {
        tracing::info!("conn event");
        let mut b = [0u8; 1];
        conn.read_exact(&mut b).await?;
        conn.write_all(&b).await
    }
    async fn one_session(addr: std::net::SocketAddr) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
    }
    let capture = |flavor: &str| {
        let rt = if flavor == "current_thread" {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        .enable_all()
        .build()
        .unwrap();
        let ((), text) = with_logs(&rt, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tracing::Instrument::instrument(
                serve(listener, tower::service_fn(echo_once)).into_future(),
                tracing::info_span!("listener", name = "public"),
            );
            tokio::select! {
                _ = server => panic!("the server stopped by itself"),
                () = one_session(addr) => {}
            }
        });
        text
    };

    let text = capture("current_thread");
    let accepting = text.lines().find(|l| l.contains("accepting connections"));
    let conn = text.lines().find(|l| l.contains("conn event"));
    assert!(
        accepting.is_some_and(|l| l.contains("listener{name=\"public\"}")),
        "{text}"
    );
    assert!(
        conn.is_some_and(|l| l.contains("listener{name=\"public\"}:conn{")),
        "{text}"
    );

    let text = capture("multi_thread");
    let accepting = text.lines().find(|l| l.contains("accepting connections"));
    assert!(
        accepting.is_some_and(|l| l.contains("listener{name=\"public\"}")),
        "the loop's event did not reach the caller's subscriber:\n{text}"
    );
}
