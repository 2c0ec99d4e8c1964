//! Futures of the sniffing layer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::{BoxError, Rewind};
use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::{
    Classification, Detection, Detections, MAX_DECISION_LEN, Protocol, Protocols, SniffError,
    Sniffed, classify,
};
use aegis_core::metrics::Handles;

/// Reads and classifies the first bytes of a connection.
///
/// Reads into a buffer of at most `max_prefix` bytes, as many times as needed until
/// [`classify()`] decides or the buffer is full (then [`Protocol::Unknown`]), under one
/// total deadline (then [`Protocol::Timeout`], a result and not an error). EOF and read
/// errors are [`SniffError`]s. Resolves to the detection, the bytes read and the stream.
///
/// The timer is only armed if a read has to wait: a client whose first bytes are
/// already in the socket costs no timer registration.
#[must_use = "futures do nothing unless you `.await` or poll them"]
#[derive(Debug)]
pub struct Detect<I> {
    io: Option<I>,
    /// The bytes read so far, at most `max_prefix`. Reads go through a buffer on the
    /// stack and only what arrived is kept: a 10-byte CONNECT costs 10 bytes here, not
    /// `max_prefix`, while thousands of connections are being sniffed at once.
    buf: Vec<u8>,
    max_prefix: usize,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The most one read of [`Detect`] asks for.
const READ_CHUNK: usize = 1024;

impl<I> Detect<I> {
    /// Starts detection on `io`: read at most `max_prefix` bytes (at least
    /// [`MAX_DECISION_LEN`], as [`SniffLayer::max_prefix`](super::SniffLayer::max_prefix)
    /// raises it) within `timeout`.
    pub fn new(io: I, max_prefix: usize, timeout: Duration) -> Self {
        Self {
            io: Some(io),
            buf: Vec::new(),
            // A cap of 0 would read into an empty buffer, which looks like EOF.
            max_prefix: max_prefix.max(MAX_DECISION_LEN),
            // As `tokio::time::sleep` does, a timeout past what an `Instant` holds
            // (`Duration::MAX` for "never") waits some thirty years instead of panicking.
            deadline: crate::time::deadline(Instant::now(), timeout),
            sleep: None,
        }
    }

    fn finish(&mut self, detection: Detection) -> (Detection, Bytes, I) {
        let buf = std::mem::take(&mut self.buf);
        let io = self.io.take().expect("Detect polled after completion");
        (detection, Bytes::from(buf), io)
    }
}

impl<I: AsyncRead + Unpin> Future for Detect<I> {
    type Output = Result<(Detection, Bytes, I), SniffError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        loop {
            let io = this.io.as_mut().expect("Detect polled after completion");
            let room = (this.max_prefix - this.buf.len()).min(READ_CHUNK);
            let mut rb = ReadBuf::uninit(&mut chunk[..room]);
            match Pin::new(io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        this.io = None;
                        return Poll::Ready(Err(SniffError::Eof(this.buf.len())));
                    }
                    this.buf.extend_from_slice(rb.filled());
                    match classify(&this.buf) {
                        Classification::Decided(d) => return Poll::Ready(Ok(this.finish(d))),
                        // The cap is reached without a decision: whatever it is, it is
                        // not known. (A guard: `classify` decides on `MAX_DECISION_LEN`
                        // bytes, and the cap is at least that.)
                        Classification::NeedMore if this.buf.len() == this.max_prefix => {
                            let d = Detection::new(Protocol::Unknown);
                            return Poll::Ready(Ok(this.finish(d)));
                        }
                        Classification::NeedMore => {}
                    }
                }
                Poll::Ready(Err(e)) => {
                    this.io = None;
                    return Poll::Ready(Err(SniffError::Io(e)));
                }
                Poll::Pending => {
                    let deadline = this.deadline;
                    let sleep = this
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if sleep.as_mut().poll(cx).is_ready() {
                        let d = Detection::new(Protocol::Timeout);
                        return Poll::Ready(Ok(this.finish(d)));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Drives [`Detect`] over `data` as a connection's bytes, in chunks of several
/// schedules (whole, byte by byte, sizes taken from the input), under the smallest cap
/// (0, raised to [`MAX_DECISION_LEN`]), a small one and the default, and panics if an
/// invariant breaks: the fuzz target's logic, also run over the seed corpus by the
/// unit tests.
///
/// - it decides within the bytes there are, without waiting (the stream never does);
/// - its reads never reach past the cap, and never into a full buffer (that read would
///   look like EOF);
/// - its decision is [`classify`]'s on the bytes it kept, which are the start of
///   `data` and at most the cap; [`classify`] decides the same on the first `cap`
///   bytes of `data` (a decision never changes as bytes arrive), and an undecided
///   `data` shorter than the cap is [`SniffError::Eof`];
/// - the bytes kept and the rest of the stream replay `data` exactly, as the
///   [`Sniffed`] the inner service gets does.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_detect(data: &[u8]) {
    for max_prefix in [0, 100, super::DEFAULT_MAX_PREFIX] {
        let cap = max_prefix.max(MAX_DECISION_LEN);
        let seen = &data[..data.len().min(cap)];
        let expected = classify(seen);
        let setup = || format!("cap {max_prefix}");
        crate::chunked::drive(data, cap, setup, |io, run| {
            let got = run.poll(Detect::new(io, max_prefix, Duration::from_secs(5)));
            match (got, expected) {
                (Ok((detection, prefix, io)), Classification::Decided(want)) => {
                    assert_eq!(detection, want, "({})", run.what());
                    assert!(
                        prefix.len() <= cap,
                        "kept {} bytes ({})",
                        prefix.len(),
                        run.what()
                    );
                    assert_eq!(
                        classify(&prefix),
                        Classification::Decided(detection),
                        "({})",
                        run.what()
                    );
                    run.replays(Rewind::new(prefix, io), data);
                }
                (Err(SniffError::Eof(n)), Classification::NeedMore) => {
                    assert_eq!(n, data.len(), "({})", run.what());
                    assert!(data.len() < cap, "undecided at the cap ({})", run.what());
                }
                (got, want) => panic!(
                    "detected {:?}, classify says {want:?} ({})",
                    got.map(|(d, prefix, _)| (d, prefix)),
                    run.what()
                ),
            }
        });
    }
}

pin_project! {
    /// The response future of [`Sniff`](super::Sniff) and
    /// [`SniffRouter`](super::SniffRouter): detection, then the inner service's future.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<I, S, F> {
        #[pin]
        state: State<I, S, F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<I, S, F> {
        // Boxed: detection is over after the first bytes, and the state stays as large
        // as its largest variant for the whole connection.
        Detecting {
            detect: Box<Detect<I>>,
            svc: Option<S>,
            allowed: Protocols,
            detections: Handles<Detections>,
        },
        Calling { #[pin] fut: F },
    }
}

impl<I, S, F> ResponseFuture<I, S, F> {
    pub(crate) fn new(
        detect: Detect<I>,
        svc: S,
        allowed: Protocols,
        detections: Handles<Detections>,
    ) -> Self {
        Self {
            state: State::Detecting {
                detect: Box::new(detect),
                svc: Some(svc),
                allowed,
                detections,
            },
        }
    }
}

impl<I, S, F> std::fmt::Debug for ResponseFuture<I, S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Detecting { .. } => "detecting",
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
    S: Service<Sniffed<I>, Future = F, Response = R, Error = E>,
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let fut = match self.as_mut().project().state.project() {
                StateProj::Calling { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Detecting {
                    detect,
                    svc,
                    allowed,
                    detections,
                } => {
                    let detected = std::task::ready!(Pin::new(&mut **detect).poll(cx));
                    let (detection, prefix, io) = match detected {
                        Ok(ok) => ok,
                        Err(e) => return Poll::Ready(Err(aegis_core::error::reject(e).into())),
                    };
                    let protocol = detection.protocol();
                    super::count_detection(detections, protocol);
                    if !allowed.contains(protocol) {
                        // `io` and the prefix are dropped here: the socket closes.
                        let err = aegis_core::error::reject(SniffError::NotAllowed(protocol));
                        return Poll::Ready(Err(err.into()));
                    }
                    let mut svc = svc.take().expect("ResponseFuture polled after completion");
                    svc.call(Sniffed::new(Rewind::new(prefix, io), detection))
                }
            };
            self.as_mut().project().state.set(State::Calling { fut });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Detection is over after the first bytes, but the future lives as long as the
    /// connection: its detection state (the stream, buffer, timer) is boxed, not inline.
    #[test]
    fn detection_state_does_not_stay_inline() {
        type Small = std::future::Ready<Result<(), BoxError>>;
        let small_io = std::mem::size_of::<ResponseFuture<u8, (), Small>>();
        let big_io = std::mem::size_of::<ResponseFuture<[u64; 64], (), Small>>();
        assert_eq!(small_io, big_io, "the stream is stored inline");
        assert!(big_io <= 32, "{big_io} bytes");
    }

    /// A cap of 0 is raised as the layer raises it: an empty read buffer would read as
    /// EOF for every client.
    #[tokio::test(start_paused = true)]
    async fn a_zero_cap_still_detects() {
        let (mut client, server) = tokio::io::duplex(64);
        let detect = Detect::new(server, 0, Duration::from_secs(5));
        tokio::io::AsyncWriteExt::write_all(&mut client, b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c")
            .await
            .unwrap();
        let (detection, prefix, _io) = detect.await.unwrap();
        assert_eq!(detection, Detection::mqtt(4));
        assert_eq!(prefix.len(), 12);
    }

    /// `Duration::MAX`, a user's "no timeout", is no panic: detection still decides on
    /// the bytes that come.
    #[tokio::test(start_paused = true)]
    async fn a_timeout_past_any_instant_waits_instead_of_panicking() {
        let (mut client, server) = tokio::io::duplex(64);
        let detect = Detect::new(server, 1024, Duration::MAX);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c")
            .await
            .unwrap();
        let (detection, prefix, _io) = detect.await.unwrap();
        assert_eq!(detection, Detection::mqtt(4));
        assert_eq!(&prefix[..2], b"\x10\x0c");
    }
}
