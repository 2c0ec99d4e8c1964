//! [`WriteTimeout`]: a connector whose connections fail a write that makes no progress
//! for too long, so that a backend that stops reading cannot hold a connection for ever.
//!
//! hyper's client writes a request body only when the backend's socket takes it, and
//! polls the body only when it can write it. A backend that answers early (response
//! head, maybe body) and then stops reading the request body, or is stopped after
//! answering, fills the socket's send buffer: hyper's connection task then waits for
//! the socket alone, the request body's own deadline
//! ([`ClientBody`](crate::client_body::ClientBody)) is never polled, and nothing else
//! watches the connection: the client side is cut by the slowloris idle clock, but the
//! backend connection and its task stayed until the backend read or closed, possibly
//! for ever, one per such request.
//!
//! Each connection of a [`WriteTimeout`] connector is a [`WriteTimeoutIo`] (under the
//! [`TokioIo`] that hyper reads and writes through): a write
//! (`poll_write`, `poll_write_vectored`, `poll_flush`, `poll_shutdown`) that stays
//! pending, with no write finished in between, for longer than its limit fails with
//! [`io::ErrorKind::TimedOut`] (its source a [`WriteStalled`]), and hyper closes the
//! connection. Any write that finishes re-arms it. Reads are not limited: a pooled
//! connection waits on reads while idle, and the pool's idle timeout bounds that.
//! [`Upstream`](crate::proxy::Upstream) gives it the gateway's `backend_timeout`: a
//! write waits from the call at the earliest, so before the backend's response head the
//! response timeout ends the call first (`504`); after it, the call is over, and the
//! close shows only in the debug log (`backend write stalled past its limit`).
//!
//! The timer is one `Sleep` per connection, made at the first write that waits, and
//! moved only when it fires early, so the writes that finish cost no timer work.
//!
//! Each connection also carries a [`ConnUse`] (in its [`Connected`] extras, which
//! hyper-util's errors carry: `Error::connect_info`): [`stamp`]s of when it was opened
//! and of its last read that returned bytes, so that
//! [`Upstream`](crate::proxy::Upstream) can tell a call that failed on a reused
//! connection before any byte of its answer (the keep-alive race:
//! [`ConnUse::unanswered_since`]). It wraps the connector's stream below hyper's
//! [`TokioIo`] because there a read shows how many bytes it returned (tokio's `ReadBuf`,
//! filled before and after); hyper's `ReadBufCursor` does not, without `unsafe`.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::time::deadline;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tower::Service;

/// A connector whose connections fail a write stalled for longer than a limit. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct WriteTimeout<C> {
    inner: C,
    limit: Duration,
}

impl<C> WriteTimeout<C> {
    /// Wraps the connector `inner`: a write of its connections may wait `limit` at most.
    pub const fn new(inner: C, limit: Duration) -> Self {
        Self { inner, limit }
    }
}

impl<C, I> Service<Uri> for WriteTimeout<C>
where
    C: Service<Uri, Response = TokioIo<I>>,
{
    type Response = TokioIo<WriteTimeoutIo<I>>;
    type Error = C::Error;
    type Future = ResponseFuture<C::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(dst),
            limit: self.limit,
        }
    }
}

pin_project! {
    /// A connection on its way: the inner connector's, then its stream wrapped in a
    /// [`WriteTimeoutIo`].
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        limit: Duration,
    }
}

impl<F, I, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<TokioIo<I>, E>>,
{
    type Output = Result<TokioIo<WriteTimeoutIo<I>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let limit = *this.limit;
        this.inner
            .poll(cx)
            .map(|io| io.map(|io| TokioIo::new(WriteTimeoutIo::new(io.into_inner(), limit))))
    }
}

/// The sequence of the events [`ConnUse`] compares: one counter for the process, so
/// that events on different tasks and threads are ordered (a clock can read the same
/// twice, and does when paused). A call and a connection's opening add to it
/// ([`stamp`]); a read of bytes only loads it ([`ConnUse::read_bytes`]), so the reads,
/// the hot path, leave its cache line shared.
///
/// `Relaxed` is enough: every access to one atomic, whatever its ordering, has its place
/// in that atomic's one modification order, and that order agrees with happens-before
/// (coherence). So an event that happens after a [`stamp`] `s` (a read of the answer to
/// a call: the request was written after the call's stamp, and handed to the
/// connection's task through hyper's channel) sees more than `s`, and one that happens
/// before it sees `s` at most. Events that neither happens before the other are a race
/// either way; the stamps order no other memory.
static EVENTS: AtomicU64 = AtomicU64::new(1);

/// The next event's number, greater than every earlier one's, and than every value of
/// the counter an event that happened before it saw.
pub fn stamp() -> u64 {
    EVENTS.fetch_add(1, Ordering::Relaxed)
}

/// What a connection's reads tell of its use: when it was opened (a [`stamp`]), and its
/// last read that returned bytes (the counter's value then: more than the stamp of a
/// call it happened after). Shared by the connection and its [`Connected`] info.
#[derive(Debug, Clone)]
pub struct ConnUse(Arc<Stamps>);

#[derive(Debug)]
struct Stamps {
    opened: u64,
    bytes_read: AtomicU64,
}

impl ConnUse {
    fn new() -> Self {
        Self(Arc::new(Stamps {
            opened: stamp(),
            bytes_read: AtomicU64::new(0),
        }))
    }

    /// A read returned bytes (not the end of the stream, nor an error). Only the
    /// connection's task reads, one read after another, so the values stored grow.
    /// `Relaxed`: the caller that looks ([`Self::unanswered_since`]) has the error from
    /// that task through hyper's channel, which makes the store happen before its load.
    fn read_bytes(&self) {
        let now = EVENTS.load(Ordering::Relaxed);
        self.0.bytes_read.store(now, Ordering::Relaxed);
    }

    /// The `ConnUse` of the connection `connected` describes, if it is one of a
    /// [`WriteTimeout`] connector.
    pub fn of(connected: &Connected) -> Option<Self> {
        let mut extensions = hyper::http::Extensions::new();
        connected.get_extras(&mut extensions);
        extensions.get::<Self>().cloned()
    }

    /// Whether the connection was opened before `start` (a call's [`stamp`]: the pool
    /// gave the call a connection that had served before) and has read no byte since:
    /// no read that returned bytes happened after `start` (the last one saw the counter
    /// at `start` at most; the end of the stream and a failed read, a reset, return no
    /// bytes). So a call that failed on this connection failed before any byte of its
    /// answer came. (A read of the previous answer that raced `start` may count as one
    /// since: the call is then the backend's failure, as every call that failed after
    /// part of its answer is.)
    pub fn unanswered_since(&self, start: u64) -> bool {
        self.0.opened < start && self.0.bytes_read.load(Ordering::Relaxed) <= start
    }
}

pin_project! {
    /// A connection whose writes fail once they have waited longer than a limit without
    /// progress. Reads pass through, those that return bytes noted in its [`ConnUse`].
    /// See the [module docs](self).
    #[derive(Debug)]
    pub struct WriteTimeoutIo<I> {
        #[pin]
        io: I,
        limit: Duration,
        conn_use: ConnUse,
        // Since when the writes have waited: the last one was pending, and none finished
        // since.
        since: Option<Instant>,
        // Fires at `since + limit` or earlier (set for an earlier wait); moved on then.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<I> WriteTimeoutIo<I> {
    /// Wraps `io`: a write may wait `limit` at most.
    pub fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            limit,
            conn_use: ConnUse::new(),
            since: None,
            timer: None,
        }
    }
}

/// Passes on `poll`, the result of a write; a pending one fails past the limit.
fn check<T>(
    poll: Poll<io::Result<T>>,
    cx: &mut Context<'_>,
    limit: Duration,
    since: &mut Option<Instant>,
    timer: &mut Option<Pin<Box<Sleep>>>,
) -> Poll<io::Result<T>> {
    if poll.is_ready() {
        *since = None;
        return poll;
    }
    let until = deadline(*since.get_or_insert_with(Instant::now), limit);
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
    if wait_reached(timer.as_mut(), until, cx) {
        tracing::debug!(?limit, "backend write stalled past its limit");
        return Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            WriteStalled { limit },
        )));
    }
    Poll::Pending
}

/// Whether a wait that ends at `until` is over, polling `timer` for it (so `cx` is woken
/// at its end). The timer is kept from wait to wait: it may be armed for an earlier
/// wait's end, and is moved to `until` only when it fires before it (or is armed past
/// it), rather than at each wait, so that waits that end early leave it alone. Also
/// the backend body's wait for its next frame (`crate::backend_body`).
pub(crate) fn wait_reached(
    mut timer: Pin<&mut Sleep>,
    until: Instant,
    cx: &mut Context<'_>,
) -> bool {
    if timer.deadline() > until {
        timer.as_mut().reset(until);
    }
    while timer.as_mut().poll(cx).is_ready() {
        if timer.deadline() >= until {
            return true;
        }
        timer.as_mut().reset(until);
    }
    false
}

impl<I: AsyncRead> AsyncRead for WriteTimeoutIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let filled = buf.filled().len();
        let poll = this.io.poll_read(cx, buf);
        if buf.filled().len() > filled {
            this.conn_use.read_bytes();
        }
        poll
    }
}

impl<I: AsyncWrite> AsyncWrite for WriteTimeoutIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.io.poll_write(cx, buf);
        check(poll, cx, *this.limit, this.since, this.timer)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.io.poll_write_vectored(cx, bufs);
        check(poll, cx, *this.limit, this.since, this.timer)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.io.poll_flush(cx);
        check(poll, cx, *this.limit, this.since, this.timer)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.io.poll_shutdown(cx);
        check(poll, cx, *this.limit, this.since, this.timer)
    }
}

impl<I: Connection> Connection for WriteTimeoutIo<I> {
    fn connected(&self) -> Connected {
        self.io.connected().extra(self.conn_use.clone())
    }
}

/// The source of the [`io::ErrorKind::TimedOut`] error of a [`WriteTimeoutIo`]: its
/// writes waited longer than its limit without progress.
#[derive(Debug)]
pub struct WriteStalled {
    limit: Duration,
}

impl fmt::Display for WriteStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "write stalled for {:?}", self.limit)
    }
}

impl Error for WriteStalled {}

#[cfg(test)]
mod tests {
    use hyper::rt::{Read, Write};
    use hyper_util::client::legacy::connect::HttpConnector;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    /// A [`WriteTimeoutIo`] over one end of a pipe that holds 64 bytes, filled up.
    async fn full_pipe() -> (Pin<Box<WriteTimeoutIo<DuplexStream>>>, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64);
        let mut io = Box::pin(WriteTimeoutIo::new(ours, LIMIT));
        let n = std::future::poll_fn(|cx| io.as_mut().poll_write(cx, &[0; 64]))
            .await
            .unwrap();
        assert_eq!(n, 64);
        (io, theirs)
    }

    fn write(io: &mut Pin<Box<WriteTimeoutIo<DuplexStream>>>) -> Poll<io::Result<usize>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        io.as_mut().poll_write(&mut cx, b"x")
    }

    /// A connection of a [`WriteTimeout`] connector to a loopback listener, its
    /// [`ConnUse`], and the listener's end.
    async fn connection() -> (impl Read + Write + Unpin, ConnUse, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let mut connector = WriteTimeout::new(HttpConnector::new(), LIMIT);
        let io = connector.call(uri.parse().unwrap()).await.unwrap();
        let conn_use = ConnUse::of(&io.connected()).unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        (io, conn_use, peer)
    }

    /// One read of `io` through hyper's `Read`, as hyper's client reads: how many bytes.
    async fn read(io: &mut (impl Read + Unpin)) -> io::Result<usize> {
        let mut mem = [std::mem::MaybeUninit::uninit(); 64];
        let mut buf = hyper::rt::ReadBuf::uninit(&mut mem);
        std::future::poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, buf.unfilled())).await?;
        Ok(buf.filled().len())
    }

    /// A connection that served one answer, read whole: what the pool reuses.
    async fn reused() -> (impl Read + Write + Unpin, ConnUse, TcpStream) {
        let (mut io, conn_use, mut peer) = connection().await;
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
        peer.write_all(answer).await.unwrap();
        let mut got = 0;
        while got < answer.len() {
            got += read(&mut io).await.unwrap();
        }
        (io, conn_use, peer)
    }

    /// A backend that sent part of its answer on a reused connection and then reset it
    /// was taken for the keep-alive race (a call failed before any byte of its answer):
    /// a read of data and the reset's failed read made one read that returned, as a
    /// lone end of stream does.
    #[tokio::test]
    async fn a_read_of_data_then_a_reset_is_an_answer() {
        for part in [
            &b"HTTP/1.1 200 OK\r\nContent-Le"[..],
            b"HTTP/1.1 100 Continue\r\n\r\n",
        ] {
            let (mut io, conn_use, mut peer) = reused().await;
            let start = stamp();
            assert!(conn_use.unanswered_since(start), "nothing read yet");
            peer.write_all(part).await.unwrap();
            peer.set_zero_linger().unwrap();
            drop(peer);
            assert_eq!(read(&mut io).await.unwrap(), part.len());
            let part = String::from_utf8_lossy(part);
            assert!(!conn_use.unanswered_since(start), "{part:?} read");
            let e = read(&mut io).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
            assert!(
                !conn_use.unanswered_since(start),
                "{part:?}, then the reset"
            );
        }
    }

    /// A reused connection closed or reset before any byte since the call is
    /// unanswered; a connection opened after the call is not (it was not reused).
    #[tokio::test]
    async fn a_close_or_reset_before_any_byte_is_unanswered() {
        for reset in [false, true] {
            let (mut io, conn_use, peer) = reused().await;
            let start = stamp();
            if reset {
                peer.set_zero_linger().unwrap();
            }
            drop(peer);
            match read(&mut io).await {
                Ok(n) => assert!(!reset && n == 0, "reset {reset}: {n} bytes"),
                Err(e) => assert!(reset, "{e}"),
            }
            assert!(conn_use.unanswered_since(start), "reset {reset}");
        }
        let start = stamp();
        let (mut io, conn_use, peer) = connection().await;
        drop(peer);
        assert_eq!(read(&mut io).await.unwrap(), 0);
        assert!(!conn_use.unanswered_since(start), "a new connection");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_write_pending_past_the_limit_times_out() {
        let (mut io, _theirs) = full_pipe().await;
        assert!(write(&mut io).is_pending());
        tokio::time::advance(LIMIT - Duration::from_millis(1)).await;
        assert!(write(&mut io).is_pending(), "within the limit");
        tokio::time::advance(Duration::from_millis(1)).await;
        match write(&mut io) {
            Poll::Ready(Err(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
                assert!(e.get_ref().is_some_and(|e| e.is::<WriteStalled>()), "{e}");
            }
            other => panic!("not timed out: {other:?}"),
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_write_that_progresses_within_the_limit_does_not_time_out() {
        let (mut io, mut theirs) = full_pipe().await;
        let mut buf = [0; 64];
        for _ in 0..4 {
            assert!(write(&mut io).is_pending());
            tokio::time::advance(LIMIT - Duration::from_secs(1)).await;
            assert!(write(&mut io).is_pending(), "within the limit");
            // The peer reads a little: the next write goes through, and re-arms.
            assert_eq!(theirs.read(&mut buf[..1]).await.unwrap(), 1);
            assert!(matches!(write(&mut io), Poll::Ready(Ok(1))));
        }
        assert!(write(&mut io).is_pending());
        tokio::time::advance(LIMIT).await;
        assert!(
            matches!(write(&mut io), Poll::Ready(Err(_))),
            "a new wait is limited too"
        );
    }
}
