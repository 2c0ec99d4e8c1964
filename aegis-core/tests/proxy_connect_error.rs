//! `Proxy::on_connect_error`: the responder gets the client when the connect fails, and
//! only then. Real loopback sockets.

use std::error::Error;
use std::future::Future;
use std::pin::Pin;

use aegis_core::Conn;
use aegis_core::error::label_of;
use aegis_core::proxy::{OnConnectError, Proxy};
use aegis_core::testing::dead_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::{Service, ServiceExt};

/// Writes `sorry` to the client, closes it, and reports the error's labels.
#[derive(Clone)]
struct Sorry(mpsc::UnboundedSender<(&'static str, &'static str)>);

impl OnConnectError<Conn<TcpStream>> for Sorry {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn respond(&self, mut io: Conn<TcpStream>, error: &(dyn Error + 'static)) -> Self::Future {
        self.0.send(label_of(error)).unwrap();
        Box::pin(async move {
            io.write_all(b"sorry").await.unwrap();
            io.shutdown().await.unwrap();
        })
    }
}

/// A connected client and its accepted server side.
async fn client_pair() -> (TcpStream, Conn<TcpStream>) {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let client = TcpStream::connect(front_addr).await.unwrap();
    let (io, peer) = front.accept().await.unwrap();
    (client, Conn::new(io, peer, front_addr))
}

#[tokio::test]
async fn responder_gets_the_client_when_the_connect_is_refused() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (_dead, refused) = dead_port(); // held: `client_pair` cannot get the port
    let proxy = Proxy::new(refused).on_connect_error(Sorry(tx));
    let (mut client, conn) = client_pair().await;

    let err = proxy.oneshot(conn).await.unwrap_err();

    // The service still fails with the connector's error, labels intact.
    assert_eq!(label_of(&*err), ("proxy", "connect_refused"));
    // The responder saw the same error, once.
    assert_eq!(rx.try_recv(), Ok(("proxy", "connect_refused")));
    assert!(rx.try_recv().is_err());
    // It had the client's connection: its answer, then EOF.
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"sorry");
}

#[tokio::test]
async fn responder_is_not_called_when_the_connect_succeeds() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let up = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"pong").await.unwrap();
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let proxy = Proxy::new(up_addr).on_connect_error(Sorry(tx));
    let (mut client, conn) = client_pair().await;
    let task = tokio::spawn(proxy.oneshot(conn));

    client.write_all(b"ping").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"pong");
    let sent = task.await.unwrap().unwrap();
    assert_eq!(sent.client_to_upstream, 4);
    up.await.unwrap();
    // Not called: the only sender went away with the finished proxy future.
    assert_eq!(rx.recv().await, None);
}

#[tokio::test]
async fn the_default_responder_just_closes_the_client() {
    let (_dead, refused) = dead_port();
    let (mut client, conn) = client_pair().await;
    let err = Proxy::new(refused).oneshot(conn).await.unwrap_err();
    assert_eq!(label_of(&*err), ("proxy", "connect_refused"));
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty());
}

#[tokio::test]
async fn any_connector_error_reaches_the_responder_unchanged() {
    // A connector that fails with its own error type, as a layer around it would.
    #[derive(Debug, thiserror::Error)]
    #[error("no route today")]
    struct NoRoute;
    let connector = tower::service_fn(|()| async { Err::<TcpStream, _>(NoRoute) });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (mut client, conn) = client_pair().await;
    let err = Proxy::with_connector(connector)
        .on_connect_error(Sorry(tx))
        .oneshot(conn)
        .await
        .unwrap_err();
    assert!(err.is::<NoRoute>(), "{err:?}");
    assert_eq!(rx.try_recv(), Ok(("unknown", "unexpected")));
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"sorry");
}

/// A connector whose readiness fails, as a layer's around the connector can.
#[derive(Clone)]
struct NeverReady;

#[derive(Debug, thiserror::Error)]
#[error("the connector cannot be used")]
struct Unusable;

impl tower::Service<()> for NeverReady {
    type Response = TcpStream;
    type Error = Unusable;
    type Future = std::future::Ready<Result<TcpStream, Unusable>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Unusable>> {
        std::task::Poll::Ready(Err(Unusable))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        panic!("called while not ready")
    }
}

#[tokio::test]
async fn a_connector_that_is_not_ready_is_answered_like_a_failed_connect() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (mut client, conn) = client_pair().await;
    let mut proxy = Proxy::with_connector(NeverReady).on_connect_error(Sorry(tx));
    // The connector's readiness is the connection's, taken when it connects: the proxy
    // itself is ready.
    let ready = proxy.ready().await.expect("the proxy is ready");
    let err = ready.call(conn).await.unwrap_err();
    assert!(err.is::<Unusable>(), "{err:?}");
    assert_eq!(rx.try_recv(), Ok(("unknown", "unexpected")));
    assert!(rx.try_recv().is_err());
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"sorry");
}
