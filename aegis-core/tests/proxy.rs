//! The upstream proxy over real loopback sockets.

use std::net::SocketAddr;
use std::time::Duration;

use aegis_core::error::label_of;
use aegis_core::metrics::testing::run;
use aegis_core::metrics::{self as m, testing};
use aegis_core::proxy::{Proxy, ProxyError, Transfer, Transferred};
use aegis_core::testing::dead_port;
use aegis_core::{BoxError, Conn};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Accepts one client on a loopback listener and proxies it to `upstream`.
async fn proxied_pair(
    upstream: SocketAddr,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<Transferred, BoxError>>,
) {
    proxied_through(upstream, |io| io).await
}

/// Accepts one client on a loopback listener and proxies it to `upstream`, its accepted
/// stream wrapped by `wrap`.
async fn proxied_through<I>(
    upstream: SocketAddr,
    wrap: impl FnOnce(TcpStream) -> I,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<Transferred, BoxError>>,
)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let client = TcpStream::connect(front_addr).await.unwrap();
    let (io, peer) = front.accept().await.unwrap();
    let conn = Conn::new(wrap(io), peer, front_addr);
    let task = tokio::spawn(Proxy::new(upstream).oneshot(conn));
    (client, task)
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

#[test]
fn large_random_payloads_arrive_exactly_in_both_directions() {
    const LEN: usize = 8 * 1024 * 1024 + 13;
    let ((up_got, down_got, up_sent, down_sent, t), snap) = run(false, || async {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let down_sent = random(LEN);
        let to_client = down_sent.clone();
        let up_task = tokio::spawn(async move {
            let (s, _) = upstream.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                w.write_all(&to_client).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            got
        });
        let (client, task) = proxied_pair(up_addr).await;
        let up_sent = random(LEN);
        let (mut r, mut w) = client.into_split();
        let payload = up_sent.clone();
        let writer = tokio::spawn(async move {
            // Uneven chunks, so reads and writes split at arbitrary points.
            for chunk in payload.chunks(7919) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut down_got = Vec::new();
        r.read_to_end(&mut down_got).await.unwrap();
        writer.await.unwrap();
        let up_got = up_task.await.unwrap();
        let t = task.await.unwrap().unwrap();
        (up_got, down_got, up_sent, down_sent, t)
    });
    assert_eq!(up_got.len(), LEN);
    assert!(up_got == up_sent, "client to upstream bytes differ");
    assert!(down_got == down_sent, "upstream to client bytes differ");
    assert_eq!(t.client_to_upstream, LEN as u64);
    assert_eq!(t.upstream_to_client, LEN as u64);
    let got = testing::capture(&snap);
    let up = got.counter(m::PROXY_BYTES_TOTAL, &[("direction", "client_to_upstream")]);
    let down = got.counter(m::PROXY_BYTES_TOTAL, &[("direction", "upstream_to_client")]);
    assert_eq!((up, down), (LEN as u64, LEN as u64));
}

/// One proxy serving several request/response connections counts every byte, and
/// registers its two byte counters with the recorder once, not per connection.
#[test]
fn byte_counters_are_registered_once_per_proxy() {
    const CONNECTIONS: usize = 5;
    let ((), snap, registered) = testing::run_counting(false, || async {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        // The upstream answers each request with it reversed, then closes.
        tokio::spawn(async move {
            loop {
                let (mut s, _) = upstream.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    s.read_to_end(&mut req).await.unwrap();
                    req.reverse();
                    s.write_all(&req).await.unwrap();
                });
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let proxy = Proxy::new(up_addr);
        for i in 0..CONNECTIONS {
            let mut client = TcpStream::connect(front_addr).await.unwrap();
            let (io, peer) = front.accept().await.unwrap();
            let task = tokio::spawn(proxy.clone().oneshot(Conn::new(io, peer, front_addr)));
            client
                .write_all(format!("request {i}").as_bytes())
                .await
                .unwrap();
            client.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, format!("{i} tseuqer").as_bytes());
            task.await.unwrap().unwrap();
        }
    });
    let got = testing::capture(&snap);
    let up = got.counter(m::PROXY_BYTES_TOTAL, &[("direction", "client_to_upstream")]);
    let down = got.counter(m::PROXY_BYTES_TOTAL, &[("direction", "upstream_to_client")]);
    let sent = ("request 0".len() * CONNECTIONS) as u64;
    assert_eq!((up, down), (sent, sent));
    assert_eq!(registered.of(m::PROXY_BYTES_TOTAL), 2);
}

#[tokio::test]
async fn client_half_close_does_not_cut_the_upstream_reply() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let up_task = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        // Read the whole request: this only ends if the client's FIN was forwarded.
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        // Only then answer, on the direction that is still open.
        let reply = [b"got ".as_slice(), &req].concat();
        s.write_all(&reply).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let (mut client, task) = proxied_pair(up_addr).await;
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"got request");
    up_task.await.unwrap();
    let t = task.await.unwrap().unwrap();
    assert_eq!(
        t,
        Transferred {
            client_to_upstream: 7,
            upstream_to_client: 11
        }
    );
}

#[tokio::test]
async fn upstream_half_close_does_not_cut_the_client_upload() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let up_task = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap();
        // The upstream has finished sending but still reads what the client uploads.
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let (mut client, task) = proxied_pair(up_addr).await;
    let mut banner = Vec::new();
    // EOF reaches the client: the upstream's FIN was forwarded.
    client.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner");
    let upload = random(300 * 1024);
    client.write_all(&upload).await.unwrap();
    client.shutdown().await.unwrap();
    assert!(up_task.await.unwrap() == upload);
    let t = task.await.unwrap().unwrap();
    assert_eq!(t.upstream_to_client, 6);
    assert_eq!(t.client_to_upstream, upload.len() as u64);
}

#[test]
fn refused_upstream_is_a_typed_error_and_counted() {
    let (err, snap) = run(false, || async {
        // Bound, not listening: refused, and held so that the front listener of
        // `proxied_pair` cannot get the port.
        let (_dead, addr) = dead_port();
        let (_client, task) = proxied_pair(addr).await;
        task.await.unwrap().unwrap_err()
    });
    let pe = aegis_core::error::find::<ProxyError>(&*err).expect("a ProxyError");
    assert!(matches!(pe, ProxyError::ConnectRefused { .. }), "{pe:?}");
    assert_eq!(label_of(&*err), ("proxy", "connect_refused"));
    assert_eq!(
        testing::counter(
            &snap,
            m::UPSTREAM_ERRORS_TOTAL,
            &[("reason", "connect_refused")]
        ),
        1
    );
}

#[test]
fn upstream_that_never_accepts_times_out_with_a_typed_error() {
    let (err, snap) = run(true, || async {
        // A listener with a full accept queue: the kernel drops further SYNs, so a
        // connect hangs until its timeout.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = sock.listen(0).unwrap();
        let addr = full.local_addr().unwrap();
        let mut fillers = Vec::new();
        loop {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => fillers.push(s),
                Err(_) => break,
            }
            assert!(fillers.len() < 64, "accept queue never filled");
        }
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let _client = TcpStream::connect(front_addr).await.unwrap();
        let (io, peer) = front.accept().await.unwrap();
        let proxy = Proxy::new(addr).connect_timeout(Duration::from_secs(3));
        let start = tokio::time::Instant::now();
        let err = proxy
            .oneshot(Conn::new(io, peer, front_addr))
            .await
            .unwrap_err();
        // Paused clock: exactly the configured timeout elapsed.
        assert_eq!(
            tokio::time::Instant::now().saturating_duration_since(start),
            Duration::from_secs(3)
        );
        drop((full, fillers));
        err
    });
    let pe = aegis_core::error::find::<ProxyError>(&*err).expect("a ProxyError");
    assert!(pe.is_timeout() && pe.is_connect(), "{pe:?}");
    assert_eq!(label_of(&*err), ("proxy", "connect_timeout"));
    assert_eq!(
        testing::counter(
            &snap,
            m::UPSTREAM_ERRORS_TOTAL,
            &[("reason", "connect_timeout")]
        ),
        1
    );
}

/// A client's stream that answers for its upstream at the shutdown: it writes `answer`
/// to the client before it shuts down, and (with `refuse`) fails every read after, as a
/// protocol wrapper that reports its refusal through its read does.
struct Answering {
    io: TcpStream,
    answer: &'static [u8],
    written: usize,
    shut: bool,
    refuse: bool,
}

impl Answering {
    fn new(io: TcpStream, answer: &'static [u8], refuse: bool) -> Self {
        Self {
            io,
            answer,
            written: 0,
            shut: false,
            refuse,
        }
    }
}

impl tokio::io::AsyncRead for Answering {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.shut && self.refuse {
            return std::task::Poll::Ready(Err(std::io::Error::other("refused")));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Answering {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.written < this.answer.len() {
            let n = std::task::ready!(
                std::pin::Pin::new(&mut this.io).poll_write(cx, &this.answer[this.written..])
            )?;
            this.written += n;
        }
        this.shut = true;
        std::pin::Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// An upstream that resets the connection it accepts: with `first`, after writing it
/// and being told to go on; with `after_data`, once the client's bytes have arrived (left
/// unread).
async fn resetting_upstream(
    first: Option<(&'static [u8], tokio::sync::oneshot::Receiver<()>)>,
    after_data: bool,
) -> SocketAddr {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        if let Some((first, go_on)) = first {
            s.write_all(first).await.unwrap();
            go_on.await.unwrap();
        }
        if after_data {
            let mut peek = [0u8; 1];
            s.peek(&mut peek).await.unwrap();
        }
        // Closed with a zero linger: a reset, whatever was read.
        s.set_zero_linger().unwrap();
        drop(s);
    });
    addr
}

/// A client that sends a request to an upstream that resets the connection unread:
/// asserts that the client gets the [`Answering`] stream's answer, then its end, and
/// returns the transfer's error.
async fn answered_after_a_reset(refuse: bool) -> BoxError {
    let upstream = resetting_upstream(None, true).await;
    let (mut client, task) =
        proxied_through(upstream, |io| Answering::new(io, b"unavailable", refuse)).await;
    client.write_all(b"request").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
        .await
        .expect("the client's connection ended")
        .unwrap();
    assert_eq!(got, b"unavailable");
    task.await.unwrap().unwrap_err()
}

/// An upstream that resets the connection before it has sent a byte (it closed with the
/// client's request unread): the client's stream is shut down as at the upstream's EOF,
/// so a wrapper that answers for a silent upstream at the shutdown gets its answer to
/// the client, and the transfer returns the upstream's reset.
#[tokio::test]
async fn an_upstream_reset_before_its_first_byte_shuts_the_clients_stream_down() {
    let err = answered_after_a_reset(false).await;
    let pe = aegis_core::error::find::<ProxyError>(&*err).expect("a ProxyError");
    match pe {
        ProxyError::UpstreamIo(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        other => panic!("{other:?}"),
    }
}

/// As above, with a wrapper that reports its answer through its next read (a refusal):
/// the transfer's error is the wrapper's, which says why the client was answered.
#[tokio::test]
async fn after_an_upstream_reset_a_refusal_read_from_the_client_stream_is_the_error() {
    let err = answered_after_a_reset(true).await;
    let pe = aegis_core::error::find::<ProxyError>(&*err).expect("a ProxyError");
    match pe {
        ProxyError::ClientIo(e) => assert_eq!(e.to_string(), "refused"),
        other => panic!("{other:?}"),
    }
}

/// After the upstream's first byte a reset ends the transfer at once: what reached the
/// client stands, and nothing is appended to it (the wrapper is not shut down).
#[tokio::test]
async fn an_upstream_reset_after_its_first_byte_ends_the_transfer_without_a_shutdown() {
    let (go_on, told) = tokio::sync::oneshot::channel();
    let upstream = resetting_upstream(Some((b"partial", told)), false).await;
    let (mut client, task) =
        proxied_through(upstream, |io| Answering::new(io, b"unavailable", false)).await;
    let mut got = vec![0u8; 7];
    client.read_exact(&mut got).await.unwrap();
    go_on.send(()).unwrap();
    // The reset may reach the client as an error or as an end.
    let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
        .await
        .expect("the client's connection ended");
    assert_eq!(got, b"partial");
    let err = task.await.unwrap().unwrap_err();
    let pe = aegis_core::error::find::<ProxyError>(&*err).expect("a ProxyError");
    assert!(matches!(pe, ProxyError::UpstreamIo(_)), "{pe:?}");
}

/// A client with its accepted stream, and a connection to an upstream whose far end has
/// sent `first` and then reset (zero linger), with the client's `request` sent after the
/// reset. Returned once the runtime has seen both the request at the accepted stream and
/// the reset at the upstream connection: a transfer made of them reads the request at
/// its first poll (the client's direction is copied first) and finds the reset by
/// writing it, before any read of the upstream.
async fn reset_under_the_clients_request(
    first: &[u8],
    request: &[u8],
) -> (TcpStream, TcpStream, TcpStream) {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (io, _) = front.accept().await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut far, _) = listener.accept().await.unwrap();
    far.write_all(first).await.unwrap();
    far.set_zero_linger().unwrap();
    drop(far);
    client.write_all(request).await.unwrap();
    // (A fresh accepted stream is readable to the runtime before anything came.)
    io.peek(&mut [0u8; 1]).await.unwrap();
    // The socket's error, left for the transfer's write to take.
    let ready = upstream.ready(tokio::io::Interest::ERROR).await.unwrap();
    assert!(ready.is_error());
    (client, io, upstream)
}

/// Transfers between the client's stream of [`reset_under_the_clients_request`], in an
/// [`Answering`] stream, and its reset upstream; returns what the client got to its
/// end, the transfer's error and the metrics.
fn transferred_into_a_reset(
    first: &'static [u8],
    refuse: bool,
) -> (Vec<u8>, ProxyError, metrics_util::debugging::Snapshotter) {
    let ((got, err), snap) = run(false, || async {
        let (mut client, io, upstream) = reset_under_the_clients_request(first, b"request").await;
        let transfer = Transfer::new(Answering::new(io, b"unavailable", refuse), upstream, 0);
        let err = tokio::time::timeout(Duration::from_secs(10), transfer)
            .await
            .expect("the transfer ended")
            .unwrap_err();
        let mut got = Vec::new();
        // The client's stream was dropped with nothing of the client's unread: an end.
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("the client's connection ended")
            .unwrap();
        (got, err)
    });
    (got, err, snap)
}

/// An upstream reset before its first byte, found by the write of the client's bytes
/// (they came in the same wake-up as the reset): as for a reset found by a read, the
/// client's stream is shut down, for a wrapper to answer, and the transfer returns the
/// reset. The request is not counted as copied: it never reached the upstream.
#[test]
fn an_upstream_reset_found_by_the_write_before_its_first_byte_shuts_the_clients_stream_down() {
    let (got, err, snap) = transferred_into_a_reset(b"", false);
    assert_eq!(got, b"unavailable");
    match err {
        ProxyError::UpstreamIo(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        other => panic!("{other:?}"),
    }
    let got = testing::capture(&snap);
    let up = got.counter(m::PROXY_BYTES_TOTAL, &[("direction", "client_to_upstream")]);
    let down = got.counter(m::PROXY_BYTES_TOTAL, &[("direction", "upstream_to_client")]);
    assert_eq!((up, down), (0, 0));
}

/// As above, with a wrapper that reports its answer through its next read: the
/// transfer's error is the wrapper's.
#[test]
fn after_an_upstream_reset_found_by_the_write_a_refusal_read_is_the_error() {
    let (got, err, _) = transferred_into_a_reset(b"", true);
    assert_eq!(got, b"unavailable");
    match err {
        ProxyError::ClientIo(e) => assert_eq!(e.to_string(), "refused"),
        other => panic!("{other:?}"),
    }
}

/// An upstream that sent bytes and then reset, the bytes unread when the write of the
/// client's bytes finds the reset: they reach the client, as a read would have found
/// them before the reset, and then the transfer ends at once, as after the upstream's
/// first byte (nothing is appended: the wrapper is not shut down).
#[test]
fn what_an_upstream_sent_before_a_reset_found_by_the_write_reaches_the_client_cut_short() {
    let (got, err, _) = transferred_into_a_reset(b"partial", false);
    assert_eq!(got, b"partial");
    assert!(matches!(err, ProxyError::UpstreamIo(_)), "{err:?}");
}

/// The upstream resets while the client's bytes wait in the copy for it to take them
/// (its buffers are full): the write finds the reset, and the client's stream is read
/// once more after its shutdown, not the waiting bytes written to the reset upstream,
/// so a refusal read is the transfer's error.
#[tokio::test]
async fn a_reset_under_waiting_client_bytes_still_reads_the_refusal() {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (io, _) = front.accept().await.unwrap();
    // Small socket buffers at both ends of the upstream connection, and an upstream that
    // reads nothing: the copy soon holds bytes it cannot write.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1).unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_send_buffer_size(4096).unwrap();
    let upstream = sock.connect(listener.local_addr().unwrap()).await.unwrap();
    let (far, _) = listener.accept().await.unwrap();
    let (mut reader, mut writer) = client.into_split();
    // More than the upstream connection holds; it fails once the proxy is gone.
    let upload = tokio::spawn(async move { writer.write_all(&random(1 << 20)).await });
    io.peek(&mut [0u8; 1]).await.unwrap();
    let mut transfer = std::pin::pin!(Transfer::new(
        Answering::new(io, b"unavailable", true),
        upstream,
        0
    ));
    // Until the copy holds bytes that the upstream does not take.
    std::future::poll_fn(|cx| {
        assert!(transfer.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await;
    far.set_zero_linger().unwrap();
    drop(far);
    let err = tokio::time::timeout(Duration::from_secs(10), transfer)
        .await
        .expect("the transfer ended")
        .unwrap_err();
    match err {
        ProxyError::ClientIo(e) => assert_eq!(e.to_string(), "refused"),
        other => panic!("{other:?}"),
    }
    let mut got = Vec::new();
    // Closed with the upload unread: the reset may follow the answer.
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut got))
        .await
        .expect("the client's connection ended");
    assert_eq!(got, b"unavailable");
    let _ = upload.await.unwrap();
}

/// An upstream connection that a test watches while a transfer owns it: the transfer
/// reads and writes through this, counting what it read, and the test peeks at what
/// still waits in the socket and waits for its error.
struct Watched {
    io: std::sync::Arc<TcpStream>,
    read: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            std::task::ready!(self.io.poll_read_ready(cx))?;
            match self.io.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    self.read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    return std::task::Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            std::task::ready!(self.io.poll_write_ready(cx))?;
            match self.io.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                res => return std::task::Poll::Ready(res),
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(
            socket2::SockRef::from(&*self.io).shutdown(std::net::Shutdown::Write),
        )
    }
}

/// The upstream sent more than the client's side of the copy holds, then closed (a
/// FIN), every byte of it past its own kernel; the client, reading nothing yet, sends
/// a byte, which the closed upstream's kernel answers with a reset, and then another,
/// whose write to the upstream fails. What the upstream sent (held in the copy, and
/// still unread at the upstream's socket) still reaches the client, all of it, before
/// its connection ends: the transfer stopped only the client's direction. It returned
/// every byte after the upstream's first at once, as if the upstream had cut them.
#[tokio::test]
async fn a_failed_write_to_the_upstream_after_its_first_byte_still_delivers_what_it_sent() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // More than the copy's buffer (64 KiB) and the socket buffers to the client hold,
    // less than those and the upstream connection's receive buffer (128 KiB by default
    // on Linux) hold: every byte leaves the upstream before it closes (the bytes a
    // closed socket still holds are lost at its reset, a direct connection's too).
    const LEN: usize = 128 * 1024 + 13;
    // Small socket buffers between the copy and the client (the accepted stream's send
    // buffer, inherited from the listener, and the client's receive buffer): the copy
    // soon holds bytes it cannot deliver.
    let (mut client, io) = client_pair(4096, 4096).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = Arc::new(
        TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap(),
    );
    let (mut far, _) = listener.accept().await.unwrap();
    let sent = random(LEN);
    let data = sent.clone();
    // The upstream sends it all, then closes: a FIN, as it read nothing.
    let far_task = tokio::spawn(async move {
        far.write_all(&data).await.unwrap();
        drop(far);
    });
    let read = Arc::new(AtomicUsize::new(0));
    let watched = Watched {
        io: upstream.clone(),
        read: read.clone(),
    };
    let transfer = tokio::spawn(Transfer::new(io, watched, 64 * 1024));
    // Until every byte has left the upstream: read by the copy, or waiting in the
    // socket (a peek, which leaves them there).
    let mut peek = vec![0u8; LEN];
    let queued = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let queued = upstream.peek(&mut peek).await.unwrap();
            if read.load(Ordering::Relaxed) + queued == LEN {
                break queued;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every byte of the upstream's left it");
    assert!(
        queued > 0,
        "the copy read everything: nothing waits at the upstream"
    );
    far_task.await.unwrap();
    reset_by_the_closed_upstream(&mut client, &upstream).await;
    // The second byte's write to the upstream fails.
    client.write_all(b"y").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
        .await
        .expect("the client's connection ended")
        .unwrap();
    assert_eq!(
        got.len(),
        LEN,
        "the client got {} of {LEN} bytes",
        got.len()
    );
    assert!(got == sent, "the upstream's bytes differ");
    // The transfer's error is the failed write's, as before there was a drain.
    match transfer.await.unwrap().unwrap_err() {
        ProxyError::UpstreamIo(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
}

/// The same drain, ended with the client's bytes unread: the upstream's whole answer and
/// its end were passed on (they wait in the client's socket), then the client sends one
/// byte, which the closed upstream answers with a reset, and a burst of 64 KiB, whose
/// write to the upstream fails. Closing the client's socket with that burst unread
/// would be a reset, and the kernel would throw away the answer it still held for the
/// client; so the transfer drops the client's bytes before it returns. It had read some
/// 16 KiB of them, and the client got a reset and a few KiB of its answer.
#[tokio::test]
async fn a_drain_that_ends_drops_the_clients_unread_bytes_before_the_close() {
    const LEN: usize = 256 * 1024 + 7;
    // A large send buffer towards the client and a small receive buffer at the client:
    // the copy hands the whole answer and its end to its socket at once, and most of it
    // waits there, in the gateway's kernel, for the client to read it.
    let (mut client, io) = client_pair(1 << 20, 4096).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut far, _) = listener.accept().await.unwrap();
    let sent = random(LEN);
    far.write_all(&sent).await.unwrap();
    drop(far);
    let watched = std::sync::Arc::new(upstream);
    let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upstream = Watched {
        io: watched.clone(),
        read: read.clone(),
    };
    let transfer = tokio::spawn(Transfer::new(io, upstream, 64 * 1024));
    // Until the copy has read the whole answer (it hands it and the end to the client's
    // socket in the same poll: the send buffer holds it all).
    tokio::time::timeout(Duration::from_secs(10), async {
        while read.load(std::sync::atomic::Ordering::Relaxed) < LEN {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the copy read the upstream's answer");
    reset_by_the_closed_upstream(&mut client, &watched).await;
    client.write_all(&vec![b'y'; 64 * 1024]).await.unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
        .await
        .expect("the client's connection ended");
    assert!(end.is_ok(), "{end:?} after {} of {LEN} bytes", got.len());
    assert!(got == sent, "the client got {} of {LEN} bytes", got.len());
    assert!(matches!(
        transfer.await.unwrap(),
        Err(ProxyError::UpstreamIo(_))
    ));
}

/// A client connection over loopback: the client's end (with a receive buffer of
/// `client_recv` bytes) and the accepted end (with a send buffer of `accepted_send`,
/// inherited from its listener), the copy's side.
async fn client_pair(accepted_send: u32, client_recv: u32) -> (TcpStream, TcpStream) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_send_buffer_size(accepted_send).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let front = sock.listen(1).unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(client_recv).unwrap();
    let client = sock.connect(front.local_addr().unwrap()).await.unwrap();
    let (accepted, _) = front.accept().await.unwrap();
    (client, accepted)
}

/// Sends the client's first byte, which the copy writes to the closed `upstream`, whose
/// kernel answers with a reset; returns once the reset is at the upstream's socket, so
/// that the copy's next write to it fails.
async fn reset_by_the_closed_upstream(client: &mut TcpStream, upstream: &TcpStream) {
    client.write_all(b"x").await.unwrap();
    let ready = tokio::time::timeout(
        Duration::from_secs(10),
        upstream.ready(tokio::io::Interest::ERROR),
    )
    .await
    .expect("the upstream's reset came")
    .unwrap();
    assert!(ready.is_error());
}
