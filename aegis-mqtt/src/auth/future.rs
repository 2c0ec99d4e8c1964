//! The future of [`Auth`](super::Auth).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use aegis_core::BoxError;
use aegis_core::error::Rejected;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use super::{AuthError, Decision};
use crate::MqttError;
use crate::layer::MqttIo;
use crate::security::{self, EventKind, Report, Severity};

/// A check in progress: boxed once per connection.
pub(super) type Check = Pin<Box<dyn Future<Output = Result<Decision, AuthError>> + Send>>;

pin_project! {
    /// The future of [`Auth`](super::Auth): checks the CONNECT, then either refuses the
    /// client (CONNACK 0x05 / 0x87) or runs the inner service's future.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<I, S, F> {
        #[pin]
        state: State<I, S, F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<I, S, F> {
        Checking {
            check: Check,
            io: Option<MqttIo<I>>,
            svc: Option<S>,
            client_id: Arc<str>,
            client_addr: SocketAddr,
        },
        Refusing { io: MqttIo<I>, err: MqttError },
        Inner { #[pin] fut: F },
        Done,
    }
}

impl<I, S, F> fmt::Debug for ResponseFuture<I, S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<I, S, F> ResponseFuture<I, S, F> {
    pub(super) const fn new(
        check: Check,
        io: MqttIo<I>,
        svc: S,
        client_id: Arc<str>,
        client_addr: SocketAddr,
    ) -> Self {
        Self {
            state: State::Checking {
                check,
                io: Some(io),
                svc: Some(svc),
                client_id,
                client_addr,
            },
        }
    }

    /// A connection whose CONNECT is gone already: refused as an authenticator error.
    pub(super) fn no_connect(io: MqttIo<I>, client_addr: SocketAddr) -> Self {
        tracing::debug!(%client_addr, "auth: no CONNECT left to check; refusing");
        security::report(Report {
            layer: "auth",
            kind: EventKind::AuthFailure,
            severity: Severity::Low,
            rule: Some("invalid"),
            details: "no CONNECT to authenticate".to_owned(),
        });
        security::mark_reported();
        Self {
            state: State::Refusing {
                io,
                err: MqttError::AuthError,
            },
        }
    }
}

/// Reports a refusal as a security event and a debug log line; the refusal itself is
/// counted in `aegis_rejections_total` when it is written.
fn report(outcome: &Result<Decision, AuthError>, client_id: &str, client_addr: SocketAddr) {
    // A denial is the client's doing, and so is a flood of checks from one address; an
    // authenticator that could not decide is not (the security layer logs it without
    // counting it toward a ban).
    let (rule, severity, details) = match outcome {
        Ok(_) => (
            "denied",
            Severity::Medium,
            "the authenticator denied the credentials".to_owned(),
        ),
        Err(e @ AuthError::TooManyChecks(_)) => (e.label(), Severity::Medium, e.to_string()),
        Err(e) => (
            e.label(),
            Severity::Low,
            format!("authentication failed closed: {e}"),
        ),
    };
    tracing::debug!(?client_id, %client_addr, rule, "auth: CONNECT refused");
    security::report(Report {
        layer: "auth",
        kind: EventKind::AuthFailure,
        severity,
        rule: Some(rule),
        details,
    });
    security::mark_reported();
}

impl<I, S> Future for ResponseFuture<I, S, S::Future>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Service<MqttIo<I>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Checking {
                    check,
                    io,
                    svc,
                    client_id,
                    client_addr,
                } => {
                    let outcome = ready!(check.as_mut().poll(cx));
                    let mut io = io
                        .take()
                        .expect("auth ResponseFuture polled after completion");
                    if let Ok(Decision::Allow) = outcome {
                        tracing::trace!(?client_id, %client_addr, "auth: CONNECT allowed");
                        // The check's time is not the broker's.
                        io.restart_connack_clock();
                        let mut svc = svc
                            .take()
                            .expect("auth ResponseFuture polled after completion");
                        let fut = svc.call(io);
                        state.set(State::Inner { fut });
                        continue;
                    }
                    report(&outcome, client_id, *client_addr);
                    let err = match outcome {
                        Ok(_) => MqttError::NotAuthorized,
                        Err(_) => MqttError::AuthError,
                    };
                    state.set(State::Refusing { io, err });
                }
                StateProj::Refusing { io, err } => {
                    let err = *err;
                    ready!(io.poll_refuse_connect(cx, err));
                    state.set(State::Done);
                    // Counted in `aegis_rejections_total` by `poll_refuse_connect`; wrapped
                    // as a rejection so that `label_of` names it, like the layer's own.
                    return Poll::Ready(Err(Rejected::uncounted(err).into()));
                }
                StateProj::Inner { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Done => panic!("auth ResponseFuture polled after completion"),
            }
        }
    }
}
