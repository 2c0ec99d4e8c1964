//! A circuit breaker with [`HttpClassifier`] around hyper-util's client, in a small
//! reverse proxy: hyper's server in front, the breaker and the client behind it, a real
//! backend. Real loopback sockets throughout.
#![cfg(feature = "circuit-breaker")]

use std::convert::Infallible;
use std::net::SocketAddr;

use aegis_core::error::BoxError;
use aegis_core::testing::dead_port;
use aegis_layers::circuit_breaker::{
    CircuitBreakerLayer, CircuitHandle, CircuitState, HttpClassifier,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tower::{Layer, ServiceExt};

/// A healthy backend: reads the whole body, answers 200 with its length.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(http1::Builder::new().serve_connection(
                TokioIo::new(s),
                service_fn(|req: Request<Incoming>| async move {
                    let n = req.into_body().collect().await?.to_bytes().len();
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(n.to_string()))))
                }),
            ));
        }
    });
    addr
}

/// The proxy: forwards `/dead` to `dead`, anything else to `backend`, through the breaker
/// (`HttpClassifier`, five consecutive failures) and hyper-util's client. Each upstream
/// call runs in a task of its own, whatever becomes of the client's connection, and
/// reports its end on `done` (`true` for a response).
async fn proxy(
    backend: SocketAddr,
    dead: SocketAddr,
    done: mpsc::UnboundedSender<bool>,
) -> (SocketAddr, CircuitHandle) {
    let breaker = CircuitBreakerLayer::builder("upstream")
        .classifier(HttpClassifier)
        .build();
    let circuit = breaker.handle();
    let client = Client::builder(TokioExecutor::new()).build_http::<Incoming>();
    let upstream = breaker.layer(client);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let (upstream, done) = (upstream.clone(), done.clone());
            tokio::spawn(http1::Builder::new().serve_connection(
                TokioIo::new(s),
                service_fn(move |mut req: Request<Incoming>| {
                    let (upstream, done) = (upstream.clone(), done.clone());
                    async move {
                        let to = if req.uri().path() == "/dead" {
                            dead
                        } else {
                            backend
                        };
                        *req.uri_mut() = format!("http://{to}/").parse().unwrap();
                        let (tx, rx) = oneshot::channel();
                        tokio::spawn(async move {
                            let res: Result<_, BoxError> = upstream.oneshot(req).await;
                            done.send(res.is_ok()).unwrap();
                            let _ = tx.send(res);
                        });
                        Ok::<_, Infallible>(match rx.await.unwrap() {
                            Ok(res) => res.map(BodyExt::boxed),
                            Err(e) => {
                                let body = Full::new(Bytes::from(e.to_string()));
                                let mut res = Response::new(body.map_err(|n| match n {}).boxed());
                                *res.status_mut() = StatusCode::BAD_GATEWAY;
                                res
                            }
                        })
                    }
                }),
            ));
        }
    });
    (addr, circuit)
}

/// One whole request through the proxy: the response's status line.
async fn request(proxy: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn clients_aborting_their_uploads_do_not_open_the_circuit_but_a_dead_backend_does() {
    let (_dead, dead) = dead_port(); // refuses every connect
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let (proxy, circuit) = proxy(backend().await, dead, done_tx).await;

    assert_eq!(request(proxy, "/").await, "HTTP/1.1 200 OK");
    assert!(done.recv().await.unwrap());

    // Ten clients (twice the breaker's threshold) each start an upload and hang up half
    // way: the upstream call fails because the caller's body did, not the backend.
    for _ in 0..10 {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789")
            .await
            .unwrap();
        drop(s);
        assert!(
            !done.recv().await.unwrap(),
            "the aborted upload's call failed"
        );
        assert_eq!(
            circuit.state(),
            CircuitState::Closed,
            "the backend is healthy"
        );
    }
    assert_eq!(request(proxy, "/").await, "HTTP/1.1 200 OK");
    assert!(done.recv().await.unwrap());

    // A backend that refuses connections is the backend's failure: five open the circuit.
    for _ in 0..5 {
        assert_eq!(request(proxy, "/dead").await, "HTTP/1.1 502 Bad Gateway");
        assert!(!done.recv().await.unwrap());
    }
    assert_eq!(circuit.state(), CircuitState::Open);
}
