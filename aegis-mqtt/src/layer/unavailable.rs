//! The answer to a client whose broker cannot be reached: a "server unavailable"
//! CONNACK from the gateway itself.

use std::error::Error;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::{label_of, reject};
use aegis_core::proxy::OnConnectError;
use aegis_core::{ClientAddr, Param, PeerAddr};
use tokio::io::AsyncWrite;
use tokio::time::Sleep;

use super::MqttIo;
use crate::MqttError;
use crate::error::Phase;

/// Answers an accepted CONNECT with "server unavailable" when the
/// [`Proxy`](aegis_core::proxy::Proxy) behind the [`MqttLayer`](super::MqttLayer) cannot
/// reach the broker: set it with
/// [`Proxy::on_connect_error`](aegis_core::proxy::Proxy::on_connect_error). See the
/// [module docs](super#when-the-broker-is-down) for an example.
///
/// Whatever the connector's error (refused, timed out, a circuit breaker failing fast),
/// a client that has no CONNACK yet gets the CONNACK its version expects: `20 02 00 03`
/// (3.1 / 3.1.1, return code 3) or `20 03 00 88 00` (5.0, reason 0x88), and the
/// connection closes. The refusal is counted in
/// `aegis_rejections_total{layer="mqtt", reason="server_unavailable"}` and logged at
/// debug level with the client's address and the error's labels; the proxy still returns
/// the connector's error, so `label_of` names the cause.
///
/// A client that does not take the answer within [`timeout`](Self::timeout) (5 s by
/// default) is closed all the same. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable {
    timeout: Duration,
}

impl Unavailable {
    /// The default time a client has to take the answer.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Answers with "server unavailable", giving each client
    /// [`Self::DEFAULT_TIMEOUT`] to take it.
    pub const fn new() -> Self {
        Self {
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Sets how long a client has to take the answer before it is closed anyway.
    #[must_use]
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Default for Unavailable {
    fn default() -> Self {
        Self::new()
    }
}

impl<J> OnConnectError<MqttIo<J>> for Unavailable
where
    J: AsyncWrite + Unpin + Param<PeerAddr> + Param<ClientAddr>,
{
    type Future = UnavailableFuture<J>;

    fn respond(&self, mut io: MqttIo<J>, error: &(dyn Error + 'static)) -> Self::Future {
        io.skip_connack_latency();
        let err = MqttError::ServerUnavailable;
        // Only a client still waiting for its CONNACK can be answered: after one, the
        // connection just closes.
        let answer = match io.session().version() {
            Some(v) if !io.connack_sent() => err.answer(Phase::Connect(Some(v))).bytes(),
            _ => Vec::new(),
        };
        drop(reject(err));
        let (cause_layer, cause) = label_of(error);
        tracing::debug!(
            peer = %Param::<PeerAddr>::param(&io),
            client = %Param::<ClientAddr>::param(&io),
            cause_layer,
            cause,
            error = %error,
            answered = !answer.is_empty(),
            "broker unreachable: answered the CONNECT with server unavailable"
        );
        UnavailableFuture {
            io: Some(io),
            answer,
            written: 0,
            step: Step::Write,
            timeout: self.timeout,
            sleep: None,
        }
    }
}

/// The future of [`Unavailable`]: writes the CONNACK, flushes and shuts the client's
/// stream down, within the answer timeout.
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct UnavailableFuture<J> {
    /// `None` once done.
    io: Option<MqttIo<J>>,
    answer: Vec<u8>,
    written: usize,
    step: Step,
    timeout: Duration,
    /// Armed on the first wait: a client that takes the answer at once costs no timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Write,
    Flush,
    Shutdown,
    Done,
}

impl<J> std::fmt::Debug for UnavailableFuture<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnavailableFuture")
            .field("step", &self.step)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl<J: AsyncWrite + Unpin> Future for UnavailableFuture<J> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(());
        };
        let mut io = Pin::new(io);
        loop {
            let res = match this.step {
                Step::Write if this.written == this.answer.len() => {
                    this.step = Step::Flush;
                    continue;
                }
                Step::Write => io
                    .as_mut()
                    .poll_write(cx, &this.answer[this.written..])
                    .map(|r| match r {
                        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => {
                            this.written += n;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }),
                Step::Flush => io.as_mut().poll_flush(cx).map_ok(|()| {
                    this.step = Step::Shutdown;
                }),
                Step::Shutdown => io.as_mut().poll_shutdown(cx).map_ok(|()| {
                    this.step = Step::Done;
                }),
                Step::Done => break,
            };
            match res {
                Poll::Ready(Ok(())) => {}
                // A client that cannot take the answer is closed all the same.
                Poll::Ready(Err(_)) => break,
                Poll::Pending => {
                    let timeout = this.timeout;
                    let sleep = this
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    break;
                }
            }
        }
        // Dropping the stream closes the connection.
        this.io = None;
        Poll::Ready(())
    }
}
