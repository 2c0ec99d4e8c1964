//! A circuit breaker around the proxy's connector, behind a stack that is polled ready
//! when a connection is accepted and calls the proxy only later (as a protocol layer
//! does once the client's first request arrives): the breaker admits a connection when
//! the proxy connects, so a client that connects and stays silent holds no half-open
//! probe. Real loopback sockets, `serve`, tokio's paused clock.
#![cfg(feature = "circuit-breaker")]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::proxy::{Proxy, TcpConnect};
use aegis_core::testing::dead_port;
use aegis_core::{BoxError, Conn, serve};
use aegis_layers::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::Layer;
use tower_service::Service;

const OPEN_FOR: Duration = Duration::from_secs(2);

/// Waits for the client's first byte before it calls the inner service, which it polled
/// ready before (the ready service moves into the connection's future, as the MQTT
/// layer's does). Reports each call, made right after `serve` polled it ready.
#[derive(Clone)]
struct FirstByte<S> {
    inner: S,
    called: mpsc::UnboundedSender<()>,
}

impl<S> Service<Conn<TcpStream>> for FirstByte<S>
where
    S: Service<Conn<TcpStream>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, conn: Conn<TcpStream>) -> Self::Future {
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        self.called.send(()).unwrap();
        Box::pin(async move {
            conn.get_ref().peek(&mut [0; 1]).await?;
            ready.call(conn).await.map(drop).map_err(Into::into)
        })
    }
}

/// Sends "hi" on each connection (the server's first byte: a success, judged by the
/// first read), then reads until the client is done.
fn upstream(listener: TcpListener) {
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                s.write_all(b"hi").await.unwrap();
                let _ = s.read_to_end(&mut Vec::new()).await;
            });
        }
    });
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_silent_client_holds_no_half_open_probe_and_a_real_one_closes_the_circuit() {
    let (down, addr) = dead_port(); // refuses until it listens
    let breaker = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(1))
        .open_for(OPEN_FOR) // and the probe timeout
        .half_open_permits(1)
        .build();
    let circuit = breaker.handle();
    let connector = breaker.judge_by_first_read().layer(TcpConnect::new(addr));
    let (called, mut calls) = mpsc::unbounded_channel();
    let stack = FirstByte {
        inner: Proxy::with_connector(connector),
        called,
    };
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let server = tokio::spawn(async move { serve(front, stack).await });

    // The upstream refuses a client's connect: the circuit opens.
    let mut tripping = TcpStream::connect(front_addr).await.unwrap();
    calls.recv().await.unwrap();
    tripping.write_all(b"x").await.unwrap();
    let mut got = Vec::new();
    let _ = tripping.read_to_end(&mut got).await;
    assert!(got.is_empty());
    assert_eq!(circuit.state(), CircuitState::Open);

    // The upstream recovers; the open period ends.
    upstream(down.listen(16).unwrap());
    tokio::time::sleep(OPEN_FOR + Duration::from_millis(100)).await;
    assert!(circuit.would_admit());

    // A client connects, is polled ready and called, and says nothing past the probe
    // timeout. It has not reached the connector: it held no probe, so nothing timed out.
    let silent = TcpStream::connect(front_addr).await.unwrap();
    calls.recv().await.unwrap();
    tokio::time::sleep(OPEN_FOR + Duration::from_secs(1)).await;
    assert_ne!(
        circuit.state(),
        CircuitState::Open,
        "a silent client's probe timed out"
    );
    assert!(circuit.would_admit());

    // A client that speaks is the probe, and the upstream's answer closes the circuit.
    let mut real = TcpStream::connect(front_addr).await.unwrap();
    calls.recv().await.unwrap();
    real.write_all(b"x").await.unwrap();
    let mut hi = [0; 2];
    real.read_exact(&mut hi).await.unwrap();
    assert_eq!(&hi, b"hi");
    assert_eq!(circuit.state(), CircuitState::Closed);

    drop((silent, real));
    server.abort();
}
