//! Futures of the PROXY protocol layer.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::BoxError;
use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Sleep;
use tower_service::Service;

use super::header::{self, Parse, Refused};
use super::layer::{Config, HeaderMode};
use super::{ProxiedIo, ProxyHeader, ProxyProtocolError};

/// The first read's buffer: a v1 header (107 bytes at most) and a v2 header with IPv6
/// addresses and a few TLVs fit, so one read usually decides. Never above the cap.
const INITIAL_BUF: usize = 128;

/// What reading the header produced: the header (if believed), the bytes after it, and
/// the stream.
type Outcome<I> = (Option<ProxyHeader>, Bytes, I);

/// Reads and decides on a connection's PROXY header; passes a peer outside the trusted
/// networks on at once, unread.
#[derive(Debug)]
pub(super) struct ReadHeader<I> {
    io: Option<I>,
    /// Zero-filled to its length; `filled` bytes hold data. Grows to the v2 header's
    /// declared length, never beyond `max_len`. Empty for an untrusted peer, which is
    /// never read.
    buf: Vec<u8>,
    filled: usize,
    peer: IpAddr,
    trusted: bool,
    mode: HeaderMode,
    max_len: usize,
    timeout: Duration,
    /// Armed on the first read that has to wait: a header that is already in the
    /// socket costs no timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<I> ReadHeader<I> {
    pub(super) fn new(io: I, peer: IpAddr, config: &Config) -> Self {
        let trusted = config.trusts(peer);
        Self {
            io: Some(io),
            buf: if trusted {
                vec![0; INITIAL_BUF.min(config.max_header_len)]
            } else {
                Vec::new()
            },
            filled: 0,
            peer,
            trusted,
            mode: config.mode,
            max_len: config.max_header_len,
            timeout: config.timeout,
            sleep: None,
        }
    }

    /// Hands over the stream with the bytes read so far (`skip` of them consumed).
    fn finish(&mut self, header: Option<ProxyHeader>, skip: usize) -> Outcome<I> {
        let io = self.io.take().expect("ReadHeader polled after completion");
        (header, self.take_bytes(skip), io)
    }

    fn take_bytes(&mut self, skip: usize) -> Bytes {
        if self.filled <= skip {
            return Bytes::new();
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.truncate(self.filled);
        let mut bytes = Bytes::from(buf);
        bytes.advance(skip);
        bytes
    }

    /// Whether the connection of a trusted peer goes on without a header when the peer
    /// closes, or the deadline passes, before a decision: in [`HeaderMode::Optional`],
    /// when it has sent nothing, which is "no header". A trusted peer that has sent part
    /// of a signature or header owes the rest: a half header from a balancer is a
    /// fault. (An untrusted peer is never read: see `poll`.)
    fn passes_undecided(&self) -> bool {
        self.mode == HeaderMode::Optional && self.filled == 0
    }

    fn fail(&mut self, err: ProxyProtocolError) -> Result<Outcome<I>, ProxyProtocolError> {
        self.io = None;
        Err(err)
    }

    /// Decides on the bytes a trusted peer sent so far; `None` to read more.
    fn decide(&mut self) -> Option<Result<Outcome<I>, ProxyProtocolError>> {
        let data = &self.buf[..self.filled];
        Some(match header::parse(data, self.max_len) {
            Parse::Incomplete { need } => {
                if need > self.buf.len() {
                    // Only a v2 header asks for more than the first buffer, and `parse`
                    // has checked its declared length against the cap.
                    self.buf.resize(need.min(self.max_len), 0);
                }
                if self.filled < self.buf.len() {
                    return None;
                }
                self.fail(ProxyProtocolError::TooLong(self.max_len))
            }
            Parse::NotProxy => match self.mode {
                HeaderMode::Optional => Ok(self.finish(None, 0)),
                HeaderMode::Required => self.fail(ProxyProtocolError::Missing(self.peer)),
            },
            Parse::Header(raw) => {
                let len = raw.len;
                let all = self.take_bytes(0);
                let header = ProxyHeader::from_raw(&raw, &all);
                let io = self.io.take().expect("ReadHeader polled after completion");
                Ok((Some(header), all.slice(len.min(all.len())..), io))
            }
            Parse::Refused(Refused::TooLong) => {
                let cap = if data.starts_with(header::V1_SIGNATURE) {
                    header::V1_MAX_LEN
                } else {
                    self.max_len
                };
                self.fail(ProxyProtocolError::TooLong(cap))
            }
            Parse::Refused(Refused::Invalid(why)) => self.fail(ProxyProtocolError::Invalid(why)),
        })
    }
}

impl<I: AsyncRead + Unpin> Future for ReadHeader<I> {
    type Output = Result<Outcome<I>, ProxyProtocolError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if !this.trusted {
            // Never read, never wait, never believe: whatever an untrusted peer sends (a
            // PROXY line included) is the inner service's, which runs at once, with the
            // peer as the client. Waiting here for its first bytes would hold the
            // connection outside everything that keys on the client address (bans,
            // rate limits, per-client caps), which only the inner service applies.
            return Poll::Ready(Ok(this.finish(None, 0)));
        }
        loop {
            let io = this
                .io
                .as_mut()
                .expect("ReadHeader polled after completion");
            let mut rb = ReadBuf::new(&mut this.buf[this.filled..]);
            match Pin::new(io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        // EOF. The peer owed us a header, unless it may send none and
                        // sent nothing.
                        return Poll::Ready(if this.passes_undecided() {
                            Ok(this.finish(None, 0))
                        } else {
                            this.fail(ProxyProtocolError::Eof(this.filled))
                        });
                    }
                    this.filled += n;
                    if let Some(done) = this.decide() {
                        return Poll::Ready(done);
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(this.fail(ProxyProtocolError::Io(e))),
                Poll::Pending => {
                    let timeout = this.timeout;
                    let sleep = this
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The deadline is for the header; a silent peer that may send no
                    // header is passed on.
                    return Poll::Ready(if this.passes_undecided() {
                        Ok(this.finish(None, 0))
                    } else {
                        this.fail(ProxyProtocolError::Timeout(timeout))
                    });
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`ProxyProtocol`](super::ProxyProtocol): the header read,
    /// then the inner service's future.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<I, S, F> {
        #[pin]
        state: State<I, S, F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<I, S, F> {
        Reading { read: ReadHeader<I>, svc: Option<S> },
        Calling { #[pin] fut: F },
    }
}

impl<I, S, F> ResponseFuture<I, S, F> {
    pub(super) fn new(read: ReadHeader<I>, svc: S) -> Self {
        Self {
            state: State::Reading {
                read,
                svc: Some(svc),
            },
        }
    }
}

impl<I, S, F> std::fmt::Debug for ResponseFuture<I, S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Reading { .. } => "reading",
            State::Calling { .. } => "calling",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<I, S, F, R, E> Future for ResponseFuture<I, S, F>
where
    I: AsyncRead + Unpin,
    S: Service<ProxiedIo<I>, Future = F, Response = R, Error = E>,
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let fut = match self.as_mut().project().state.project() {
                StateProj::Calling { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Reading { read, svc } => {
                    let (header, rest, io) = match std::task::ready!(Pin::new(read).poll(cx)) {
                        Ok(ok) => ok,
                        // The stream was dropped in `fail`: the socket is closed.
                        Err(e) => return Poll::Ready(Err(aegis_core::error::reject(e).into())),
                    };
                    super::count(header.as_ref());
                    let mut svc = svc.take().expect("ResponseFuture polled after completion");
                    svc.call(ProxiedIo::new(header, rest, io))
                }
            };
            self.as_mut().project().state.set(State::Calling { fut });
        }
    }
}
