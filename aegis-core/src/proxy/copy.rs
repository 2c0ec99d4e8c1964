//! Bidirectional copy that holds no buffer while a connection is idle.
//!
//! Each direction reads into a small stack buffer first. If everything read can be
//! written at once (the usual case for request/response traffic) no heap memory is ever
//! allocated. A heap buffer is allocated only when the writer cannot take all the bytes
//! (they must be kept), or when a read fills the whole stack buffer (data is streaming,
//! and a larger buffer moves it with fewer system calls). The heap buffer is freed as soon
//! as the reader has nothing more to give and the buffer is drained: an idle proxied
//! connection costs its sockets and its task, nothing more.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use crate::metrics::Handles;
use metrics::Counter;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ProxyError;

/// The two directions of `aegis_proxy_bytes_total`, registered once per [`Proxy`]
/// (not once per connection: each metrics macro call is a lookup in the recorder, and
/// the Prometheus recorder allocates a new handle each time).
///
/// [`Proxy`]: super::Proxy
#[derive(Debug)]
pub(crate) struct ByteCounters {
    to_upstream: Counter,
    to_client: Counter,
}

impl ByteCounters {
    fn register() -> Self {
        Self {
            to_upstream: metrics::counter!(
                crate::metrics::PROXY_BYTES_TOTAL,
                "direction" => "client_to_upstream"
            ),
            to_client: metrics::counter!(
                crate::metrics::PROXY_BYTES_TOTAL,
                "direction" => "upstream_to_client"
            ),
        }
    }
}

/// Bytes read onto the stack per read while no heap buffer is held.
///
/// Large enough for a typical MQTT or HTTP message in one read, small enough to live on
/// a worker thread's stack.
pub(crate) const STACK_BUF: usize = 8 * 1024;

/// Bytes of the client's read per read once they have nowhere to go (the upstream's
/// write failed), and dropped.
const DISCARD_BUF: usize = 1024;

/// Reads of the client's bytes to drop in one poll; if it has more, the task is woken
/// again instead of reading on, so a client that sends fast holds no worker.
const DISCARD_READS: usize = 16;

/// Reads of the client's bytes to drop once the drain has ended, before its socket is
/// closed: 1 MiB at most, in the last poll.
const ENDING_READS: usize = 1024;

/// The largest heap buffer a direction holds while data streams: 16 MiB, whatever was
/// asked for ([`Proxy::max_buffer`](super::Proxy::max_buffer)). A larger one moves no
/// more data per system call than a socket's buffers hold, and `usize::MAX` was one
/// 4 GiB allocation per direction of every streaming connection.
pub const MAX_BULK: usize = 16 << 20;

/// Bytes copied by each direction of a finished proxied connection.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from the client and written to the upstream.
    pub client_to_upstream: u64,
    /// Bytes read from the upstream and written to the client.
    pub upstream_to_client: u64,
}

/// Which end of a copy failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Read,
    Write,
}

/// One direction of the copy.
///
/// Kept small (48 bytes): it lives in every proxied connection's task.
#[derive(Debug)]
#[allow(clippy::struct_excessive_bools)] // five independent flags; a bitset saves nothing here
pub(crate) struct Half {
    /// Heap buffer, present only while bytes wait to be written or data streams.
    buf: Option<Box<[u8]>>,
    pos: u32,
    end: u32,
    total: u64,
    reported: u64,
    read_done: bool,
    done: bool,
    need_flush: bool,
    /// The reader's end is a reset: a read of nothing fails instead of ending the reads.
    eof_is_reset: bool,
}

impl Half {
    pub(crate) fn new() -> Self {
        Self {
            buf: None,
            pos: 0,
            end: 0,
            total: 0,
            reported: 0,
            read_done: false,
            done: false,
            need_flush: false,
            eof_is_reset: false,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Ends the reads, as at EOF: the next poll shuts the writer down.
    fn end_reads(&mut self) {
        self.read_done = true;
    }

    fn reads_ended(&self) -> bool {
        self.read_done
    }

    /// From now on the reader's end fails as a reset (`ConnectionReset`, on the read
    /// side) instead of shutting the writer down.
    fn reset_at_eof(&mut self) {
        self.eof_is_reset = true;
    }

    /// Whether nothing was read yet: nothing written, nothing waiting to be.
    fn nothing_read(&self) -> bool {
        self.total == 0 && (self.buf.is_none() || self.pos >= self.end)
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Whether this direction holds heap memory now.
    #[cfg(test)]
    pub(crate) fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }

    fn wrote(&mut self, n: usize) {
        self.total += n as u64;
        self.need_flush = true;
    }

    /// Whether bytes were copied since the last report.
    fn unreported(&self) -> bool {
        self.total > self.reported
    }

    /// Adds the bytes copied since the last report to `bytes`, this direction's
    /// `aegis_proxy_bytes_total`.
    pub(crate) fn report(&mut self, bytes: &Counter) {
        if self.unreported() {
            bytes.increment(self.total - self.reported);
            self.reported = self.total;
        }
    }

    /// The reader has nothing now: release the heap buffer, flush what was written, and
    /// wait.
    fn idle<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &Counter,
        mut w: Pin<&mut W>,
    ) -> Poll<Result<(), (Side, io::Error)>> {
        self.buf = None;
        if self.need_flush {
            ready!(w.as_mut().poll_flush(cx)).map_err(|e| (Side::Write, e))?;
            self.need_flush = false;
        }
        self.report(bytes);
        Poll::Pending
    }

    /// The read error of a reader whose end is a reset.
    fn reset() -> (Side, io::Error) {
        (Side::Read, io::ErrorKind::ConnectionReset.into())
    }

    /// Copies from `r` to `w` until `r` reaches EOF, then shuts `w` down; the bytes are
    /// counted in `bytes`.
    pub(crate) fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        bulk: usize,
        bytes: &Counter,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<Result<(), (Side, io::Error)>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Write out whatever waits in the heap buffer.
            if let Some(buf) = self.buf.as_deref()
                && self.pos < self.end
            {
                let (pos, end) = (self.pos as usize, self.end as usize);
                let n = ready!(w.as_mut().poll_write(cx, &buf[pos..end]))
                    .map_err(|e| (Side::Write, e))?;
                if n == 0 {
                    return Poll::Ready(Err((Side::Write, io::ErrorKind::WriteZero.into())));
                }
                // n <= end - pos, so it fits.
                self.pos += u32::try_from(n).unwrap_or(u32::MAX);
                self.wrote(n);
                continue;
            }

            if self.read_done {
                self.buf = None;
                if self.need_flush {
                    ready!(w.as_mut().poll_flush(cx)).map_err(|e| (Side::Write, e))?;
                    self.need_flush = false;
                }
                match ready!(w.as_mut().poll_shutdown(cx)) {
                    // The peer may already be gone; its half is closed either way.
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Poll::Ready(Err((Side::Write, e))),
                }
                self.done = true;
                self.report(bytes);
                return Poll::Ready(Ok(()));
            }

            if let Some(buf) = self.buf.as_deref_mut() {
                // Streaming: read straight into the heap buffer.
                let mut rb = ReadBuf::new(buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => return self.idle(cx, bytes, w),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Read, e))),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.pos = 0;
                        self.end = u32::try_from(n).unwrap_or(u32::MAX);
                        if n == 0 {
                            if self.eof_is_reset {
                                return Poll::Ready(Err(Self::reset()));
                            }
                            self.read_done = true;
                        }
                    }
                }
                continue;
            }

            // No heap buffer: read onto the stack. Uninitialised: this runs on every poll
            // of an idle direction, and zero-filling 8 KiB each time was the largest
            // single cost of a short connection in user space (callgrind).
            let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); STACK_BUF];
            let mut rb = ReadBuf::uninit(&mut stack);
            let n = match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => return self.idle(cx, bytes, w),
                Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Read, e))),
                Poll::Ready(Ok(())) => rb.filled().len(),
            };
            if n == 0 {
                if self.eof_is_reset {
                    return Poll::Ready(Err(Self::reset()));
                }
                self.read_done = true;
                continue;
            }
            let read = rb.filled();
            let mut off = 0;
            while off < n {
                match w.as_mut().poll_write(cx, &read[off..n]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err((Side::Write, io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(k)) => {
                        off += k;
                        self.wrote(k);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Write, e))),
                    Poll::Pending => break,
                }
            }
            let streaming = n == STACK_BUF;
            if off < n || streaming {
                // Keep the unwritten bytes; when a full stack buffer came in, data is
                // streaming and the larger buffer serves the next reads.
                let cap = if streaming { bulk } else { STACK_BUF };
                let mut buf = vec![0u8; cap].into_boxed_slice();
                let left = n - off;
                buf[..left].copy_from_slice(&read[off..n]);
                self.buf = Some(buf);
                self.pos = 0;
                self.end = u32::try_from(left).unwrap_or(u32::MAX);
            }
        }
    }
}

pin_project! {
    /// Copies both directions between a client and an upstream until both have ended.
    ///
    /// One side's EOF is forwarded as a write shutdown to the other side, and the other
    /// direction goes on until its own EOF (half-close).
    ///
    /// An upstream whose read fails before it has sent the client a byte (a reset: the
    /// upstream closed with the client's first bytes unread) also gets the client's
    /// stream shut down, as at its EOF, before the error is returned. So a wrapper of
    /// the client's stream that answers for a silent upstream at the shutdown (as
    /// `aegis_mqtt`'s does, with "server unavailable") answers this one too, and the
    /// client's stream is read once more after it: a wrapper that reports why through
    /// its read (a refusal) gives the transfer's error. Otherwise the upstream's error
    /// is returned. The same holds for a reset that the write of the client's bytes
    /// finds first (they came with it): what the upstream sent before it reset is still
    /// passed on, and if there was nothing, the client's stream is shut down; the
    /// client's bytes are not counted as copied. After the upstream's first byte a read
    /// failure ends the transfer at once: the client's connection closes, with what it
    /// was sent cut short. A write failure does not: the upstream may have sent more
    /// than the client has taken yet (a closed upstream's kernel resets at the client's
    /// next bytes, with what it sent before all handed over). The client's bytes are
    /// then read and dropped, and what the upstream sent (held in the copy, and still
    /// to be read from it) goes on to the client until the upstream's end or its read
    /// error, as through a direct connection, and then the write's error is returned.
    /// A client that takes nothing holds the drain up, as it holds up any copy to it, and
    /// meanwhile what it sends is read and dropped as fast as it comes. When the drain
    /// ends, the client's bytes still unread are read and dropped too, up to 1 MiB,
    /// before the transfer returns: bytes unread at the close of its socket would make
    /// the close a reset, which throws away what the kernel still had to send it. A
    /// client that sends more than that at that moment, or after it, still gets the reset.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    #[derive(Debug)]
    pub struct Transfer<A, B> {
        #[pin]
        client: A,
        #[pin]
        upstream: B,
        up: Half,
        down: Half,
        bulk: u32,
        bytes: Handles<ByteCounters>,
        // The upstream's error before its first byte, while what it sent before it is
        // read and the client's stream is shut down; or the error of a write to it,
        // while what it sent is passed on (the drain).
        upstream_failed: Option<io::Error>,
    }

    impl<A, B> PinnedDrop for Transfer<A, B> {
        fn drop(this: Pin<&mut Self>) {
            // A connection cut short (error, abort at shutdown) still reports its bytes.
            let this = this.project();
            if this.up.unreported() || this.down.unreported() {
                let bytes = this.bytes.get_or_register(ByteCounters::register);
                this.up.report(&bytes.to_upstream);
                this.down.report(&bytes.to_client);
            }
        }
    }
}

impl<A, B> Transfer<A, B> {
    /// Copies between `client` and `upstream`; `bulk` is the size of the heap buffer
    /// each direction uses while data streams (at least 8 KiB, at most [`MAX_BULK`]).
    pub fn new(client: A, upstream: B, bulk: usize) -> Self {
        Self::with_counters(client, upstream, bulk, Handles::new())
    }

    /// As [`new`](Self::new), counting bytes with the handles a [`Proxy`](super::Proxy)
    /// registered once for all its connections.
    pub(crate) fn with_counters(
        client: A,
        upstream: B,
        bulk: usize,
        bytes: Handles<ByteCounters>,
    ) -> Self {
        Self {
            client,
            upstream,
            up: Half::new(),
            down: Half::new(),
            // 8 KiB at least, `MAX_BULK` at most (which a u32 offset addresses).
            bulk: u32::try_from(bulk.clamp(STACK_BUF, MAX_BULK)).unwrap_or(u32::MAX),
            bytes,
            upstream_failed: None,
        }
    }
}

impl<A, B> Future for Transfer<A, B>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    type Output = Result<Transferred, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let bulk = *this.bulk as usize;
        let bytes = this.bytes.get_or_register(ByteCounters::register);
        // Once the upstream has failed, the client's bytes have nowhere to go: they are
        // no longer copied (before the upstream's first byte, the client's stream is read
        // once more below, after its shutdown; after it, they are dropped).
        if this.upstream_failed.is_none() {
            match this.up.poll_copy(
                cx,
                bulk,
                &bytes.to_upstream,
                this.client.as_mut(),
                this.upstream.as_mut(),
            ) {
                Poll::Ready(Err((Side::Write, source))) => {
                    // The upstream failed under the client's bytes: a reset that the
                    // write finds first (before the upstream's first byte, the client's
                    // bytes having come in the same wake-up; after it, the reset a
                    // closed upstream's kernel answers the client's bytes with). What it
                    // sent before it failed is still read and passed on, as a read would
                    // have found it; its end is its reset (the write took the socket's
                    // error, and the reads that follow end without one).
                    *this.upstream_failed = Some(source);
                    this.down.reset_at_eof();
                }
                Poll::Ready(Err((_, source))) => {
                    return Poll::Ready(Err(ProxyError::ClientIo(source)));
                }
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        loop {
            match this.down.poll_copy(
                cx,
                bulk,
                &bytes.to_client,
                this.upstream.as_mut(),
                this.client.as_mut(),
            ) {
                Poll::Ready(Err((Side::Read, source)))
                    if this.down.nothing_read() && !this.down.reads_ended() =>
                {
                    // Nothing of the upstream's reached the client: shut the client's
                    // stream down as at the upstream's EOF, for a wrapper to answer.
                    this.upstream_failed.get_or_insert(source);
                    this.down.end_reads();
                }
                Poll::Ready(Err((Side::Read, _)))
                    if draining(this.upstream_failed.as_ref(), this.down) =>
                {
                    // The drain's end (the upstream's end or reset): its error is the
                    // failed write's, once the client's unread bytes are dropped.
                    let source = this.upstream_failed.take().expect("draining");
                    return end_drain(cx, this.client.as_mut(), source);
                }
                Poll::Ready(Err((side, source))) => {
                    // In the drain, the upstream's failed write came first, and is the
                    // transfer's error whatever ends the drain, as it was before there was
                    // a drain.
                    return Poll::Ready(Err(
                        if side == Side::Write
                            && !draining(this.upstream_failed.as_ref(), this.down)
                        {
                            ProxyError::ClientIo(source)
                        } else {
                            ProxyError::UpstreamIo(this.upstream_failed.take().unwrap_or(source))
                        },
                    ));
                }
                Poll::Pending
                    if this.upstream_failed.is_some()
                        && !this.down.reads_ended()
                        && this.down.nothing_read() =>
                {
                    // After the failed write, the upstream has nothing to read now, and
                    // nothing of it was read: the client's stream is shut down. Its end
                    // is not waited for (a socket's comes at once, but another stream's
                    // might never). After its first byte, the drain waits for its end.
                    this.down.end_reads();
                }
                Poll::Ready(Ok(())) | Poll::Pending => break,
            }
        }
        if draining(this.upstream_failed.as_ref(), this.down) {
            // The client's bytes have nowhere to go: read and dropped, so that they do
            // not wait unread in its socket, whose close would then be a reset that
            // throws away what it still had to send the client. A client gone (or its
            // stream refusing) ends the drain, of no more use, with the upstream's error.
            if let Poll::Ready(Err(_)) = discard(cx, this.client.as_mut())
                && let Some(source) = this.upstream_failed.take()
            {
                return Poll::Ready(Err(ProxyError::UpstreamIo(source)));
            }
            if this.down.is_done() {
                // The upstream's end was passed on: the drain is over.
                let source = this.upstream_failed.take().expect("draining");
                return end_drain(cx, this.client.as_mut(), source);
            }
        }
        if this.down.is_done()
            && let Some(source) = this.upstream_failed.take()
        {
            // The client's stream is shut down. One more read of it, for a wrapper that
            // reports why it answered; what it reads is dropped (bytes of the client's
            // still waiting for the upstream included: its end is of no more use).
            let mut rest = [std::mem::MaybeUninit::<u8>::uninit(); 64];
            if let Poll::Ready(Err(e)) = this
                .client
                .as_mut()
                .poll_read(cx, &mut ReadBuf::uninit(&mut rest))
            {
                return Poll::Ready(Err(ProxyError::ClientIo(e)));
            }
            return Poll::Ready(Err(ProxyError::UpstreamIo(source)));
        }
        if this.up.is_done() && this.down.is_done() {
            Poll::Ready(Ok(Transferred {
                client_to_upstream: this.up.total(),
                upstream_to_client: this.down.total(),
            }))
        } else {
            Poll::Pending
        }
    }
}

/// Whether the transfer drains the upstream after a failed write to it: the write failed,
/// and something of the upstream's was read, before or since. (An upstream whose read
/// failed before its first byte has its reads ended at once: nothing more is read.)
fn draining(upstream_failed: Option<&io::Error>, down: &Half) -> bool {
    upstream_failed.is_some() && !down.nothing_read()
}

/// Reads the client's bytes and drops them, at most `reads` reads of `DISCARD_BUF`:
/// `Ready(Ok)` once it has nothing now or has ended, `Ready(Err)` if a read fails,
/// `Pending` when it had more (the task is not woken for it: the caller decides).
fn drop_reads<R: AsyncRead + ?Sized>(
    cx: &mut Context<'_>,
    mut r: Pin<&mut R>,
    reads: usize,
) -> Poll<io::Result<()>> {
    let mut sink = [std::mem::MaybeUninit::<u8>::uninit(); DISCARD_BUF];
    for _ in 0..reads {
        let mut rb = ReadBuf::uninit(&mut sink);
        match r.as_mut().poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Ready(Ok(())),
        }
    }
    Poll::Pending
}

/// During the drain: [`drop_reads`], `DISCARD_READS` at most a poll; when the client had
/// more, the task is woken again instead of reading on, so a client that sends fast
/// holds no worker.
fn discard<R: AsyncRead + ?Sized>(cx: &mut Context<'_>, r: Pin<&mut R>) -> Poll<io::Result<()>> {
    let res = drop_reads(cx, r, DISCARD_READS);
    if res.is_pending() {
        cx.waker().wake_by_ref();
    }
    res
}

/// The drain's end: drops the client's unread bytes (a close with bytes unread is a
/// reset, which throws away what its socket still had to send), at most
/// `ENDING_READS` reads, then returns the drain's error, the failed write's `source`.
fn end_drain<R: AsyncRead + ?Sized>(
    cx: &mut Context<'_>,
    client: Pin<&mut R>,
    source: io::Error,
) -> Poll<Result<Transferred, ProxyError>> {
    // Whatever it finds (nothing more now, an end, an error, or more than the bound),
    // the transfer ends here.
    let _ = drop_reads(cx, client, ENDING_READS);
    Poll::Ready(Err(ProxyError::UpstreamIo(source)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A transfer dropped with nothing copied (its upstream connected, then the
    /// connection was aborted) neither counts nor registers the byte counters.
    #[cfg(feature = "test-util")]
    #[test]
    fn a_transfer_that_copied_nothing_registers_nothing() {
        use crate::metrics::testing::run_counting;
        let ((), _snap, registered) = run_counting(false, || async {
            let (client, _c) = tokio::io::duplex(64);
            let (upstream, _u) = tokio::io::duplex(64);
            drop(Transfer::new(client, upstream, 64 * 1024));
        });
        assert_eq!(registered.of(crate::metrics::PROXY_BYTES_TOTAL), 0);
    }

    /// The buffer asked for is held between 8 KiB and `MAX_BULK`: `usize::MAX` was one
    /// 4 GiB allocation per direction once data streamed.
    #[test]
    fn the_bulk_buffer_is_bounded_both_ways() {
        for (asked, held) in [
            (0, STACK_BUF),
            (64 * 1024, 64 * 1024),
            (MAX_BULK, MAX_BULK),
            (MAX_BULK + 1, MAX_BULK),
            (usize::MAX, MAX_BULK),
        ] {
            let (client, _c) = tokio::io::duplex(64);
            let (upstream, _u) = tokio::io::duplex(64);
            let t = Transfer::new(client, upstream, asked);
            assert_eq!(t.bulk as usize, held, "asked for {asked}");
        }
    }

    #[tokio::test]
    async fn idle_half_holds_no_buffer_and_streaming_releases_it() {
        let (mut a_far, a) = tokio::io::duplex(1 << 20);
        let (b, mut b_far) = tokio::io::duplex(1 << 20);
        let mut half = Half::new();
        let (mut a, mut b) = (Box::pin(a), Box::pin(b));
        let mut cx = Context::from_waker(Waker::noop());

        // Idle: nothing to read, no buffer.
        assert!(
            half.poll_copy(&mut cx, 64 * 1024, &Counter::noop(), a.as_mut(), b.as_mut())
                .is_pending()
        );
        assert!(!half.holds_buffer());

        // A small message goes through from the stack.
        a_far.write_all(b"hello").await.unwrap();
        assert!(
            half.poll_copy(&mut cx, 64 * 1024, &Counter::noop(), a.as_mut(), b.as_mut())
                .is_pending()
        );
        assert!(!half.holds_buffer());
        let mut got = [0u8; 5];
        b_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");

        // A large burst streams through a heap buffer, freed once drained.
        let data = vec![0xA5u8; 300 * 1024];
        a_far.write_all(&data).await.unwrap();
        assert!(
            half.poll_copy(&mut cx, 64 * 1024, &Counter::noop(), a.as_mut(), b.as_mut())
                .is_pending()
        );
        assert!(!half.holds_buffer());
        let mut got = vec![0u8; data.len()];
        b_far.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data);
        assert_eq!(half.total(), 5 + data.len() as u64);
    }

    #[tokio::test]
    async fn blocked_writer_keeps_exactly_the_unwritten_bytes() {
        let (mut a_far, a) = tokio::io::duplex(1 << 16);
        // The upstream pipe takes only 16 bytes before it blocks.
        let (b, mut b_far) = tokio::io::duplex(16);
        let mut half = Half::new();
        let (mut a, mut b) = (Box::pin(a), Box::pin(b));
        let mut cx = Context::from_waker(Waker::noop());
        a_far.write_all(b"0123456789abcdefXYZ").await.unwrap();
        assert!(
            half.poll_copy(&mut cx, 64 * 1024, &Counter::noop(), a.as_mut(), b.as_mut())
                .is_pending()
        );
        assert!(half.holds_buffer(), "unwritten bytes must be kept");
        let mut got = [0u8; 16];
        b_far.read_exact(&mut got).await.unwrap();
        assert!(
            half.poll_copy(&mut cx, 64 * 1024, &Counter::noop(), a.as_mut(), b.as_mut())
                .is_pending()
        );
        assert!(!half.holds_buffer());
        let mut rest = [0u8; 3];
        b_far.read_exact(&mut rest).await.unwrap();
        assert_eq!(&got, b"0123456789abcdef");
        assert_eq!(&rest, b"XYZ");
    }
}
