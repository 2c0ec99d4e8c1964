//! Futures of the MQTT layer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use aegis_core::error::reject;
use aegis_core::{BoxError, Handshake, Param};
use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tower_service::Service;

use super::policy::ConnPolicy;
use super::{IoOptions, MqttIo, poll_write_answer};
use crate::{Config, MqttError, Next, Packet, Phase, Session};

/// One read while waiting for the CONNECT. The framer caps what is kept at the CONNECT
/// size limit (plus at most one read), whatever the client declares.
const READ_CHUNK: usize = 1024;

/// An accepted CONNECT: the session, the CONNECT's bytes, the bytes read after it (not
/// validated yet), the stream, and the connection's options and policy.
type Accepted<I> = (Session, Bytes, Bytes, I, IoOptions, Option<ConnPolicy>);

/// Reads the CONNECT, and writes the answer to a refused one.
#[derive(Debug)]
pub(super) struct ReadConnect<I> {
    io: Option<I>,
    session: Session,
    buf: Vec<u8>,
    /// A refusal being answered: the error, the answer and how much of it is written.
    answer: Option<(MqttError, Vec<u8>, usize)>,
    timeout: Duration,
    opts: IoOptions,
    policy: Option<ConnPolicy>,
    /// Armed on the first wait: a CONNECT already in the socket costs no timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

enum Step {
    Accepted(usize),
    Read,
    /// A refusal and its answer.
    Refused(MqttError, Vec<u8>),
}

impl<I> ReadConnect<I> {
    pub(super) fn new(
        io: I,
        config: Config,
        timeout: Duration,
        opts: IoOptions,
        policy: Option<ConnPolicy>,
    ) -> Self {
        Self {
            io: Some(io),
            session: Session::new(config),
            buf: Vec::new(),
            answer: None,
            timeout,
            opts,
            policy,
            sleep: None,
        }
    }

    /// One read of the CONNECT into `rb`: `Ready(Err)` at EOF (nothing read) or on a
    /// failed read, with the stream dropped.
    fn poll_read_connect(
        &mut self,
        cx: &mut Context<'_>,
        rb: &mut ReadBuf<'_>,
    ) -> Poll<Result<(), BoxError>>
    where
        I: AsyncRead + Unpin,
    {
        let io = self
            .io
            .as_mut()
            .expect("ReadConnect polled after completion");
        match ready!(Pin::new(io).poll_read(cx, rb)) {
            Ok(()) if rb.filled().is_empty() => {
                self.io = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a complete MQTT CONNECT",
                )
                .into()))
            }
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                self.io = None;
                Poll::Ready(Err(e.into()))
            }
        }
    }

    /// Waits for the stream under the connect timeout. At the timeout the connection is
    /// refused: as [`MqttError::ConnectTimeout`], or, when a refusal's answer is still
    /// being written (the client does not read it), as that refusal.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<Result<Accepted<I>, BoxError>> {
        let timeout = self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.io = None;
            let err = self
                .answer
                .take()
                .map_or(MqttError::ConnectTimeout, |(err, ..)| err);
            return Poll::Ready(Err(reject(err).into()));
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Future for ReadConnect<I> {
    type Output = Result<Accepted<I>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let io = this
                .io
                .as_mut()
                .expect("ReadConnect polled after completion");
            if let Some((err, bytes, written)) = &mut this.answer {
                let err = *err;
                if poll_write_answer(io, cx, bytes, written).is_pending() {
                    return this.wait(cx);
                }
                this.io = None;
                return Poll::Ready(Err(reject(err).into()));
            }
            // Nothing buffered yet (the usual case: the whole CONNECT arrives in one
            // read): take the CONNECT straight from the read, without a growing buffer.
            // Otherwise the read completes the part of a CONNECT kept in `buf`.
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut chunk);
            let fresh = this.buf.is_empty();
            match this.poll_read_connect(cx, &mut rb) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return this.wait(cx),
            }
            if !fresh {
                this.buf.extend_from_slice(rb.filled());
            }
            let data: &[u8] = if fresh { rb.filled() } else { &this.buf };
            let step = match this.session.next(data) {
                Ok(Next::Packet {
                    len,
                    packet: Packet::Connect(c),
                }) => {
                    // Names the client in every later event of the connection (the
                    // `conn` span of `aegis_core::serve` has the field; elsewhere this
                    // does nothing). Debug-quoted: the id is the client's own text.
                    tracing::Span::current()
                        .record("client_id", tracing::field::debug(c.client_id));
                    // Bans by client id or username (inside a `SecurityLayer`), then
                    // the policy (its connect rate, and inspection of the will).
                    let mut id = super::SharedId::new(c.client_id);
                    #[cfg(feature = "security")]
                    let checked = crate::security::on_connect(&c, &mut id).and_then(|()| {
                        this.policy
                            .as_mut()
                            .map_or(Ok(()), |p| p.on_connect(&c, &mut id))
                    });
                    #[cfg(not(feature = "security"))]
                    let checked = this
                        .policy
                        .as_mut()
                        .map_or(Ok(()), |p| p.on_connect(&c, &mut id));
                    match checked {
                        // Banned, over the policy's connect rate or a blocked will:
                        // answered as a CONNECT, not as a later packet (the session has
                        // accepted it already).
                        Err(e) => {
                            Step::Refused(e, e.answer(Phase::Connect(Some(c.version))).bytes())
                        }
                        Ok(()) => Step::Accepted(len),
                    }
                }
                Ok(Next::Packet { len, .. }) => Step::Accepted(len),
                Ok(Next::NeedMore(_)) => Step::Read,
                Err(e) => Step::Refused(e, this.session.answer(&e).bytes()),
            };
            match step {
                Step::Accepted(len) => {
                    let io = this.io.take().expect("ReadConnect polled after completion");
                    let (connect, rest) = if fresh {
                        // Copies of exactly the CONNECT and what followed it (usually
                        // nothing): one allocation.
                        let (connect, rest) = data.split_at(len);
                        let rest = if rest.is_empty() {
                            Bytes::new()
                        } else {
                            Bytes::copy_from_slice(rest)
                        };
                        (Bytes::copy_from_slice(connect), rest)
                    } else {
                        let mut all = Bytes::from(std::mem::take(&mut this.buf));
                        (all.split_to(len), all)
                    };
                    let session = std::mem::replace(&mut this.session, Session::new(Config::new()));
                    let policy = this.policy.take();
                    let opts = std::mem::take(&mut this.opts);
                    return Poll::Ready(Ok((session, connect, rest, io, opts, policy)));
                }
                Step::Refused(e, answer) => {
                    this.answer = Some((e, answer, 0));
                }
                // Part of a CONNECT: keep it (the read was not kept yet if it was the
                // first), and read the rest.
                Step::Read if fresh => this.buf.extend_from_slice(rb.filled()),
                Step::Read => {}
            }
        }
    }
}

pin_project! {
    /// The future of [`Mqtt`](super::Mqtt): reads the CONNECT, then runs the inner
    /// service's future.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<I, S, F> {
        #[pin]
        state: State<I, S, F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<I, S, F> {
        // Boxed: the CONNECT is read once, and the state stays as large as its largest
        // variant for the whole connection.
        Connect { read: Box<ReadConnect<I>>, svc: Option<S> },
        Inner { #[pin] fut: F },
    }
}

impl<I, S, F> std::fmt::Debug for ResponseFuture<I, S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<I, S, F> ResponseFuture<I, S, F> {
    pub(super) fn new(read: ReadConnect<I>, svc: S) -> Self {
        Self {
            state: State::Connect {
                read: Box::new(read),
                svc: Some(svc),
            },
        }
    }
}

impl<I, S> Future for ResponseFuture<I, S, S::Future>
where
    I: AsyncRead + AsyncWrite + Unpin + Param<Handshake>,
    S: Service<MqttIo<I>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Connect { read, svc } => {
                    let (session, connect, rest, io, opts, policy) =
                        ready!(Pin::new(&mut **read).poll(cx))?;
                    Param::<Handshake>::param(&io).complete();
                    let mut svc = svc.take().expect("ResponseFuture polled after completion");
                    let fut = svc.call(MqttIo::new(io, session, connect, rest, opts, policy));
                    self.as_mut().project().state.set(State::Inner { fut });
                }
                StateProj::Inner { fut } => return fut.poll(cx).map_err(Into::into),
            }
        }
    }
}
