//! The accept loop.
//!
//! [`serve`] accepts connections from a [`Listener`] and spawns one task per connection
//! that drives a byte-stream service (a `tower::Service<Conn<Io>>`) to the end.
//!
//! - **Connection cap.** At most [`Serve::max_connections`] connections are served at
//!   once (10,000 by default), or, with [`Serve::connection_cap`], at most a
//!   [`ConnectionCap`] shared with other loops. A connection over the cap is reset at
//!   once, unread ([`Listener::refuse`], as a refusal by [`Serve::admit`] is), and
//!   counted as `aegis_connections_total{outcome="over_capacity"}`.
//! - **Accept errors never stop the loop.** Running out of descriptors (`EMFILE`,
//!   `ENFILE`) or memory (`ENOBUFS`, `ENOMEM`) backs off (1 ms, doubling up to 1 s) so the
//!   loop neither exits nor spins; errors about one connection (`ECONNABORTED`, ...) are
//!   skipped at once. Each is counted in `aegis_accept_errors_total{kind}`; those that
//!   back off are logged at `warn`, at most one line a second, saying how many since the
//!   last were not (`suppressed`).
//! - **Admission before a task.** [`Serve::admit`] decides on each accepted connection
//!   from its peer address before any task, buffer or span is made for it (an address
//!   ban, say): a refused one is reset at once ([`Listener::refuse`]) and counted as
//!   `aegis_connections_total{outcome="rejected"}`, like a refusal from the service.
//! - **The loop runs on a worker.** Awaiting the server spawns the accept loop as a task
//!   of its own and waits for it, so that a `#[tokio::main]` body, which a multi-thread
//!   runtime runs on the main thread and not on a worker, does not put the loop there
//!   (each connection would then cost two cross-thread wake-ups before its first byte).
//!   Dropping the awaiting future stops the loop; a panic in the loop resumes in it.
//! - **Readiness per connection.** The service's `poll_ready` is awaited inside the
//!   connection's task, so one slow decision never blocks the accept loop.
//! - **Graceful shutdown.** With [`Serve::with_graceful_shutdown`], the loop stops
//!   accepting when the signal fires (the listener is closed), serves the connections
//!   admitted before it and already waiting for the loop (queued for a [`Shard`]:
//!   [`Listener::poll_queued`]), waits for open connections to finish for up to
//!   [`Serve::drain_timeout`] (30 s by default), then aborts those still open. The
//!   returned [`Shutdown`] says whether the drain finished.
//! - **One runtime per core, if wanted.** [`share_out`] splits a `TcpListener` so that
//!   one runtime accepts and hands the connections in turn to `serve` loops on other
//!   runtimes, each polling its own connections (see [`share`] for when it helps).
//! - **A tracing span per connection.** Each connection's task runs in a `conn` span
//!   (debug level) with the `peer` address and an empty `client_id` field that a protocol
//!   layer records once it knows it (the MQTT layer does, from the CONNECT). Every event
//!   of the connection, each layer's rejection included, carries them; neither is ever a
//!   metric label. The accept loop runs in the caller's span and with the caller's
//!   subscriber; the connections' tasks, which would pay for that on every poll, log to
//!   the default subscriber of the thread that polls them. Set a global subscriber (as
//!   the gateways do): on a multi-thread runtime, one set for the calling thread alone
//!   (`tracing::subscriber::set_default`) sees the loop's events, not the connections'.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use std::time::Duration;
//! use aegis_core::{serve, proxy::Proxy};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let upstream = "127.0.0.1:1884".parse().unwrap();
//! let report = serve(listener, Proxy::new(upstream))
//!     .max_connections(5_000)
//!     .nodelay(true)
//!     .drain_timeout(Duration::from_secs(10))
//!     .with_graceful_shutdown(async { /* e.g. tokio::signal::ctrl_c() */ })
//!     .await;
//! assert!(report.drained());
//! # Ok(())
//! # }
//! ```

mod listener;
pub mod share;
mod task;

use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tower_service::Service;
use tracing::Instrument;

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;

pub use self::listener::Listener;
pub use self::share::{Acceptor, Shard, share_out};
pub use self::task::ConnectionCap;
use self::task::{Cap, ConnTask, Registry};
use crate::Conn;
use crate::error::BoxError;
use crate::metrics as m;

/// Accepts connections from `listener` and serves each with a clone of `service`.
///
/// See the [module docs](self) for the behaviour and an example.
pub fn serve<L, S>(listener: L, service: S) -> Serve<L, S> {
    Serve {
        listener,
        service,
        cap: Cap::Own(Serve::<L, S>::DEFAULT_MAX_CONNECTIONS),
        nodelay: false,
        drain_timeout: Serve::<L, S>::DEFAULT_DRAIN_TIMEOUT,
        admit: None,
    }
}

/// The decision of [`Serve::admit`].
type AdmitFn = dyn Fn(SocketAddr) -> Result<(), BoxError> + Send + Sync;

/// [`Serve::admit`]'s check, debug-printable.
#[derive(Clone)]
struct Admit(Arc<AdmitFn>);

impl std::fmt::Debug for Admit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Admit(..)")
    }
}

/// The accept loop, configured. Await it to serve forever, or call
/// [`with_graceful_shutdown`](Self::with_graceful_shutdown).
#[must_use = "the server does nothing unless you `.await` it"]
#[derive(Debug)]
pub struct Serve<L, S> {
    listener: L,
    service: S,
    cap: Cap,
    nodelay: bool,
    drain_timeout: Duration,
    admit: Option<Admit>,
}

/// The result of a graceful shutdown.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Shutdown {
    aborted: usize,
    cancelled: bool,
}

impl Shutdown {
    /// Whether every connection ended by itself within the drain timeout.
    pub const fn drained(&self) -> bool {
        self.aborted == 0 && !self.cancelled
    }

    /// The report of a drain that aborted `aborted` connections at its deadline.
    const fn after_drain(aborted: usize) -> Self {
        Self {
            aborted,
            cancelled: false,
        }
    }

    /// Whether the runtime shut down under the accept loop: there was no drain, and the
    /// connections still open were dropped with the runtime's tasks, uncounted.
    pub const fn cancelled(&self) -> bool {
        self.cancelled
    }

    /// How many connections were still open at the drain deadline and were aborted,
    /// with any handed to the loop before the signal that it had not taken by then
    /// ([`Listener::poll_queued`]).
    pub const fn aborted(&self) -> usize {
        self.aborted
    }
}

impl<L, S> Serve<L, S> {
    /// The default connection cap. The open-files limit must leave room for two
    /// descriptors per proxied connection.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
    /// How long a graceful shutdown waits for open connections by default.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

    /// Caps the connections served at once; one over the cap is reset at accept
    /// ([`Listener::refuse`]).
    /// Replaces a [`connection_cap`](Self::connection_cap) set before.
    ///
    /// # Panics
    ///
    /// If `max` is 0 or above `u32::MAX`.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.cap = Cap::own(max);
        self
    }

    /// Caps the connections served at once together with every other loop given a
    /// clone of `cap` (on other runtimes, say, with [`share_out`]); one over the cap is
    /// reset at accept, whichever loop accepted it. Replaces
    /// [`max_connections`](Self::max_connections). A graceful shutdown still drains
    /// only this loop's connections.
    ///
    /// ```
    /// # fn run(a: tokio::net::TcpListener, b: tokio::net::TcpListener) {
    /// use aegis_core::{serve, proxy::Proxy, serve::ConnectionCap};
    ///
    /// let upstream = "127.0.0.1:1884".parse().unwrap();
    /// let cap = ConnectionCap::new(10_000);
    /// // At most 10,000 connections in all, however they fall between the two.
    /// let one = serve(a, Proxy::new(upstream)).connection_cap(cap.clone());
    /// let two = serve(b, Proxy::new(upstream)).connection_cap(cap);
    /// # drop((one, two));
    /// # }
    /// ```
    pub fn connection_cap(mut self, cap: ConnectionCap) -> Self {
        self.cap = Cap::Shared(cap);
        self
    }

    /// Sets `TCP_NODELAY` on accepted connections (off by default).
    ///
    /// Each accepted stream costs a system call for it, unless the listening socket had
    /// it before it listened (see [`Listener::accepts_nodelay`]): on Linux, binding with
    /// [`tokio::net::TcpSocket`] and `set_nodelay(true)` saves that call.
    ///
    /// `false` sets nothing; it does not clear the option. Streams accepted from a
    /// listening socket that had `TCP_NODELAY` keep it on Linux, which passes it on,
    /// whatever is asked here.
    pub fn nodelay(mut self, nodelay: bool) -> Self {
        self.nodelay = nodelay;
        self
    }

    /// Decides on each accepted connection from its peer address, in the accept loop,
    /// before a task is spawned for it: `Err` resets it at once, unread
    /// ([`Listener::refuse`]: no FIN exchange, no `TIME_WAIT` left), counted as
    /// `aegis_connections_total{outcome="rejected"}` (count the reason in the error
    /// itself, with [`crate::error::reject`]). For checks that are cheap and need
    /// nothing but the address, such as an address ban
    /// (`aegis_mqtt::security::Security::refuse_banned`): a refusal then costs no task,
    /// no allocation for the connection and no wake-up of another worker.
    ///
    /// The peer address is the TCP peer's: behind a PROXY protocol sender it is the
    /// proxy, not the client.
    ///
    /// ```
    /// # async fn run(listener: tokio::net::TcpListener) {
    /// use aegis_core::{error::reject, serve, proxy::Proxy};
    ///
    /// # #[derive(Debug, thiserror::Error)]
    /// # #[error("banned")]
    /// # struct Banned;
    /// # impl aegis_core::error::Reject for Banned {
    /// #     fn layer(&self) -> &'static str { "example" }
    /// #     fn label(&self) -> &'static str { "banned" }
    /// # }
    /// let banned: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    /// serve(listener, Proxy::new("127.0.0.1:1884".parse().unwrap()))
    ///     .admit(move |peer| {
    ///         // On a dual-stack `[::]` listener an IPv4 client is `::ffff:192.0.2.7`:
    ///         // compare the canonical form, or key by `ClientKey`.
    ///         if peer.ip().to_canonical() == banned {
    ///             return Err(reject(Banned).into());
    ///         }
    ///         Ok(())
    ///     })
    ///     .await;
    /// # }
    /// ```
    pub fn admit<A>(mut self, admit: A) -> Self
    where
        A: Fn(SocketAddr) -> Result<(), BoxError> + Send + Sync + 'static,
    {
        self.admit = Some(Admit(Arc::new(admit)));
        self
    }

    /// How long a graceful shutdown waits for open connections before aborting them.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The same server over another listener made from this one.
    fn map_listener<M>(self, f: impl FnOnce(L) -> M) -> Serve<M, S> {
        Serve {
            listener: f(self.listener),
            service: self.service,
            cap: self.cap,
            nodelay: self.nodelay,
            drain_timeout: self.drain_timeout,
            admit: self.admit,
        }
    }

    /// Serves until `signal` completes, then stops accepting and drains.
    pub fn with_graceful_shutdown<F>(self, signal: F) -> WithGracefulShutdown<L, S, F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        WithGracefulShutdown {
            serve: self,
            signal,
        }
    }
}

/// [`Serve`] with a shutdown signal; await it to get the [`Shutdown`] report.
#[must_use = "the server does nothing unless you `.await` it"]
#[derive(Debug)]
pub struct WithGracefulShutdown<L, S, F> {
    serve: Serve<L, S>,
    signal: F,
}

/// The boxed future of a server: one per process, so the box costs nothing that matters.
pub type ServeFuture = Pin<Box<dyn Future<Output = Shutdown> + Send>>;

impl<L, S, F> IntoFuture for WithGracefulShutdown<L, S, F>
where
    L: Listener,
    S: Service<Conn<L::Io>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    F: Future<Output = ()> + Send + 'static,
{
    type Output = Shutdown;
    type IntoFuture = ServeFuture;

    fn into_future(self) -> Self::IntoFuture {
        spawn_run(self.serve, Some(self.signal))
    }
}

impl<L, S> IntoFuture for Serve<L, S>
where
    L: Listener,
    S: Service<Conn<L::Io>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Output = Shutdown;
    type IntoFuture = ServeFuture;

    fn into_future(self) -> Self::IntoFuture {
        spawn_run(self, None::<std::future::Pending<()>>)
    }
}

/// The first back-off after an accept error that a retry cannot fix at once.
const BACKOFF_MIN: Duration = Duration::from_millis(1);
/// The longest back-off: the loop retries at least once a second.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning this often for accept errors: out of descriptors under a churn of
/// connections, each accept that succeeds (a descriptor freed) starts the back-off again
/// at `BACKOFF_MIN`, and the errors came at the clients' pace, a warning each (some 380
/// a second, measured). Every error is still counted (`aegis_accept_errors_total`); a
/// warning says how many were not logged since the last (`suppressed`).
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Runs the accept loop as a task of its own and waits for it.
///
/// Under a multi-thread runtime the future given to `block_on` (the body of
/// `#[tokio::main]`) runs on the main thread, which is not one of the runtime's workers.
/// An accept loop there costs every connection two cross-thread wake-ups before its
/// first byte is read: the worker that polls the IO driver wakes the main thread to
/// accept, and the main thread hands the new task back to a worker through the shared
/// queue. On a worker, the loop runs where the listener's readiness arrives, and a task
/// it spawns runs next on the same thread.
///
/// The shutdown signal is polled once here, so that a signal ready at once stops the
/// loop before it accepts anything; then it waits in a task of its own, which tells the
/// loop through a oneshot channel. Polled by the loop itself, the signal would be polled
/// again at every accepted connection: the mqtt-gateway's two `tokio::signal` streams
/// cost about 190 instructions a poll each, about 550 per short MQTT session.
///
/// Both tasks run in the caller's span and with its subscriber. Dropping the returned
/// future closes the listener at once, as dropping the loop itself would, and aborts
/// both tasks. A panic in the loop resumes in the caller; a panic in the signal stops
/// the loop as the signal would, and resumes in the caller after the drain.
fn spawn_run<L, S, F>(serve: Serve<L, S>, signal: Option<F>) -> ServeFuture
where
    L: Listener,
    S: Service<Conn<L::Io>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    F: Future<Output = ()> + Send + 'static,
{
    use tracing::instrument::WithSubscriber;

    Box::pin(async move {
        let close = Arc::new(Mutex::new(None));
        let serve = serve.map_listener(|listener| {
            *close.lock() = Some(listener);
            Shared(Arc::clone(&close))
        });
        // Polled, so in the caller's span and subscriber: the tasks take both.
        let (signal, stop) = match signal {
            Some(signal) => {
                let mut signal = Box::pin(signal);
                let (fire, fired) = tokio::sync::oneshot::channel::<()>();
                let ready =
                    std::future::poll_fn(|cx| Poll::Ready(signal.as_mut().poll(cx).is_ready()))
                        .await;
                if ready {
                    let _ = fire.send(());
                    (None, Some(fired))
                } else {
                    let task = tokio::spawn(
                        async move {
                            signal.await;
                            let _ = fire.send(());
                        }
                        .in_current_span()
                        .with_current_subscriber(),
                    );
                    (Some(task), Some(fired))
                }
            }
            None => (None, None),
        };
        let stop = async move {
            match stop {
                // Fired, or dropped by a panic (resumed below).
                Some(fired) => drop(fired.await),
                None => std::future::pending().await,
            }
        };
        let task = tokio::spawn(run(serve, stop).in_current_span().with_current_subscriber());
        let mut tasks = StopOnDrop {
            task,
            signal,
            close,
        };
        let report = report_of((&mut tasks.task).await);
        // The loop stops only once the signal's task has sent or dropped `fire`, at its
        // very end (it may still be unwinding): wait for that end, to resume a panic.
        if let Some(signal) = tasks.signal.as_mut()
            && let Err(e) = signal.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        report
    })
}

/// The loop task's report. A panic resumes here; a task cancelled, which only a runtime
/// shutting down does, is a [`Shutdown::cancelled`] report, not a panic: the future
/// awaiting it may be polled by another worker of that runtime, during an ordinary
/// shutdown.
fn report_of(joined: Result<Shutdown, tokio::task::JoinError>) -> Shutdown {
    match joined {
        Ok(report) => report,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => {
            tracing::warn!("the runtime shut down under the accept loop: no drain");
            Shutdown {
                aborted: 0,
                cancelled: true,
            }
        }
    }
}

/// A listener the accept loop's task and the future waiting for it share, so that
/// dropping that future closes the listener at once, wherever the task is.
struct Shared<L>(Arc<Mutex<Option<L>>>);

impl<L: Listener> Listener for Shared<L> {
    type Io = L::Io;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Conn<Self::Io>>> {
        match self.0.lock().as_mut() {
            Some(listener) => listener.poll_accept(cx),
            // Closed by the dropped future, which also aborted this task: the abort
            // ends it at its next scheduling point.
            None => Poll::Pending,
        }
    }

    fn poll_accept_at(
        &mut self,
        cx: &mut Context<'_>,
        local: SocketAddr,
    ) -> Poll<io::Result<Conn<Self::Io>>> {
        match self.0.lock().as_mut() {
            Some(listener) => listener.poll_accept_at(cx, local),
            None => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self.0.lock().as_ref() {
            Some(listener) => listener.local_addr(),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn set_nodelay(io: &Self::Io, nodelay: bool) -> io::Result<()> {
        L::set_nodelay(io, nodelay)
    }

    fn accepts_nodelay(&self) -> bool {
        self.0.lock().as_ref().is_some_and(L::accepts_nodelay)
    }

    fn refuse(io: Self::Io) {
        L::refuse(io);
    }

    fn pass_on(
        &mut self,
        conn: Conn<Self::Io>,
        open: usize,
        shared_open: Option<usize>,
    ) -> Option<Conn<Self::Io>> {
        // Closed: the task is aborted; the connection closes unserved.
        self.0.lock().as_mut()?.pass_on(conn, open, shared_open)
    }

    fn poll_queued(&mut self, cx: &mut Context<'_>) -> Poll<Option<Conn<Self::Io>>> {
        match self.0.lock().as_mut() {
            Some(listener) => listener.poll_queued(cx),
            None => Poll::Ready(None),
        }
    }
}

impl<L> Drop for Shared<L> {
    /// The loop drops its listener to stop accepting: close it then, not when the last
    /// handle goes.
    fn drop(&mut self) {
        drop(self.0.lock().take());
    }
}

/// Closes the listener and aborts the accept loop's task and the signal's when the
/// future waiting for them is dropped.
struct StopOnDrop<L> {
    task: tokio::task::JoinHandle<Shutdown>,
    signal: Option<tokio::task::JoinHandle<()>>,
    close: Arc<Mutex<Option<L>>>,
}

impl<L> Drop for StopOnDrop<L> {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(signal) = &self.signal {
            signal.abort();
        }
        drop(self.close.lock().take());
    }
}

async fn run<L, S, F>(serve: Serve<L, S>, signal: F) -> Shutdown
where
    L: Listener,
    S: Service<Conn<L::Io>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    F: Future<Output = ()> + Send + 'static,
{
    let Serve {
        mut listener,
        service,
        cap,
        nodelay,
        drain_timeout,
        admit,
    } = serve;
    // Not again on each stream if the listener passes it on to them. (Setting it on the
    // listener here would be too late for connections already in its backlog.)
    let nodelay = nodelay && !listener.accepts_nodelay();
    let max_connections = cap.max();
    let registry = Registry::new(cap);
    let mut backoff = BACKOFF_MIN;
    let mut warnings = AcceptWarnings::default();
    tokio::pin!(signal);
    let bound = listener.local_addr();
    if let Ok(addr) = bound {
        tracing::info!(%addr, max_connections, "accepting connections");
    }
    // Bound to one address and port: every connection's local address is that one.
    let bound = bound
        .ok()
        .filter(|a| !a.ip().is_unspecified() && a.port() != 0);

    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut signal => break,
            res = std::future::poll_fn(|cx| match bound {
                Some(local) => listener.poll_accept_at(cx, local),
                None => listener.poll_accept(cx),
            }) => res,
        };
        let conn = match accepted {
            Ok(conn) => {
                backoff = BACKOFF_MIN;
                conn
            }
            Err(e) => {
                let kind = accept_error_kind(&e);
                metrics::counter!(m::ACCEPT_ERRORS_TOTAL, "kind" => kind).increment(1);
                if is_connection_error(&e) {
                    tracing::debug!(error = %e, "accept: connection failed before it was accepted");
                    continue;
                }
                warnings.warn(&e, kind, backoff);
                tokio::select! {
                    biased;
                    () = &mut signal => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };

        let peer = crate::Param::<crate::PeerAddr>::param(&conn);
        if let Some(Admit(admit)) = &admit
            && let Err(e) = admit(peer.0)
        {
            L::refuse(conn.into_inner());
            registry.refused();
            let (layer, reason) = crate::error::label_of(&*e);
            tracing::debug!(%peer, layer, reason, "connection refused at accept");
            continue;
        }
        // Admitted: served here, unless the listener passes it on (to another runtime).
        if let Some(conn) = listener.pass_on(conn, registry.open(), registry.shared_open()) {
            serve_one::<L, S>(&registry, &service, nodelay, conn);
        }
    }

    // One deadline for the whole drain: taking what is queued, then waiting.
    let until = crate::time::deadline(tokio::time::Instant::now(), drain_timeout);
    let cut = take_queued(&mut listener, &registry, service, nodelay, until).await;
    // Stop accepting: closing the listener refuses new connections at once.
    drop(listener);
    tracing::info!(
        in_flight = registry.open(),
        ?drain_timeout,
        "shutting down; draining connections"
    );
    let drained = tokio::time::timeout_at(until, registry.closed()).await;
    let aborted = if drained.is_ok() {
        0
    } else {
        let open = registry.open();
        tracing::warn!(open, "drain deadline reached; aborting open connections");
        registry.abort_all();
        // Aborted tasks drop their futures (closing the sockets) and free their slots.
        registry.closed().await;
        open
    };
    Shutdown::after_drain(aborted + cut)
}

/// The warnings of the accept errors that back off: at most one every [`WARN_EVERY`].
#[derive(Default)]
struct AcceptWarnings {
    /// When the last was logged, and how many errors since were not.
    last: Option<(tokio::time::Instant, u64)>,
}

impl AcceptWarnings {
    fn warn(&mut self, e: &io::Error, kind: &'static str, backoff: Duration) {
        let now = tokio::time::Instant::now();
        match &mut self.last {
            Some((last, suppressed)) if now < *last + WARN_EVERY => *suppressed += 1,
            _ => {
                let suppressed = self.last.map_or(0, |(_, n)| n);
                tracing::warn!(
                    error = %e,
                    kind,
                    ?backoff,
                    suppressed,
                    "accept failed; backing off"
                );
                self.last = Some((now, 0));
            }
        }
    }
}

/// At stop, serves the connections admitted before the signal and waiting for this loop
/// (queued by an `Acceptor` for its `Shard`: [`Listener::poll_queued`]), as those
/// already open are, waiting for them no later than `until`, the drain's deadline.
/// Returns how many it cut unserved: only a hand-out stalled past it leaves any.
async fn take_queued<L, S>(
    listener: &mut L,
    registry: &Arc<Registry>,
    service: S,
    nodelay: bool,
    until: tokio::time::Instant,
) -> usize
where
    L: Listener,
    S: Service<Conn<L::Io>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let took = tokio::time::timeout_at(until, async {
        // Moved in: a reference held across the await would need `S: Sync`.
        let service = service;
        while let Some(conn) = std::future::poll_fn(|cx| listener.poll_queued(cx)).await {
            serve_one::<L, S>(registry, &service, nodelay, conn);
        }
    })
    .await;
    if took.is_ok() {
        return 0;
    }
    // Past the deadline: what has arrived is cut, without waiting for more (nor being
    // stopped short by the task's budget, which `poll_recv` spends).
    let cut = std::future::poll_fn(|_| {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut cut = 0;
        while let Poll::Ready(Some(conn)) = listener.poll_queued(&mut cx) {
            drop(conn);
            registry.cut_unserved();
            cut += 1;
        }
        Poll::Ready(cut)
    });
    tokio::task::unconstrained(cut).await
}

/// Serves an admitted connection in a task of its own, under the cap. Over the cap: reset
/// at once, as a refusal by `admit` is (a dropped socket would close with a FIN and leave
/// a socket behind in `FIN_WAIT2` or `TIME_WAIT`).
fn serve_one<L, S>(registry: &Arc<Registry>, service: &S, nodelay: bool, conn: Conn<L::Io>)
where
    L: Listener,
    S: Service<Conn<L::Io>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let peer = crate::Param::<crate::PeerAddr>::param(&conn);
    let Some(slot) = registry.reserve() else {
        L::refuse(conn.into_inner());
        registry.over_capacity();
        tracing::debug!(%peer, "connection cap reached; refused");
        return;
    };
    let svc = service.clone();
    registry.spawn(slot, move |slot| {
        if nodelay && let Err(e) = L::set_nodelay(conn.get_ref(), true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        // Every event of the connection (a layer's rejection, say) carries its peer
        // address; a protocol layer records `client_id` once it knows it.
        let span = tracing::debug_span!("conn", %peer, client_id = tracing::field::Empty);
        ConnTask::new(svc, conn, slot).instrument(span)
    });
}

/// Errors that concern one connection, not the listener: retry at once.
fn is_connection_error(e: &io::Error) -> bool {
    // Linux's accept(2) also passes on the pending connection's own network errors,
    // "and the application should treat them like EAGAIN by retrying".
    #[cfg(target_os = "linux")]
    const PASSED_ON: [i32; 8] = ACCEPT_PASSES_ON;
    #[cfg(not(target_os = "linux"))]
    const PASSED_ON: [i32; 0] = [];
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error().is_some_and(|n| PASSED_ON.contains(&n))
}

/// The network errors of a pending connection that Linux's accept(2) passes on.
#[cfg(target_os = "linux")]
const ACCEPT_PASSES_ON: [i32; 8] = [
    libc::EPROTO,
    libc::ENOPROTOOPT,
    libc::EHOSTDOWN,
    libc::ENONET,
    libc::EHOSTUNREACH,
    libc::EOPNOTSUPP,
    libc::ENETUNREACH,
    libc::ENETDOWN,
];

/// A fixed label for an accept error.
fn accept_error_kind(e: &io::Error) -> &'static str {
    match crate::exhausted::exhausted(e) {
        Some(kind) => kind,
        None if is_connection_error(e) => "connection",
        None => "other",
    }
}

#[cfg(all(test, feature = "proxy"))]
mod tests {
    use super::*;
    use crate::proxy::{Proxy, TcpConnect};
    use tokio::net::TcpStream;

    /// The connection task's future lives for the connection's whole life inside a
    /// 128-byte-aligned task cell; keep it small enough for a 384-byte cell.
    #[test]
    fn connection_task_stays_small() {
        type Io = Conn<TcpStream>;
        type Task =
            ConnTask<Proxy, Io, crate::proxy::future::ResponseFuture<TcpConnect, Io, TcpStream>>;
        let size = std::mem::size_of::<Task>();
        assert!(size <= 288, "connection task future grew to {size} bytes");
        eprintln!("connection task future: {size} bytes");
    }

    /// The network errors Linux's accept passes on are the connection's: retried at
    /// once, not backed off as the listener's would be.
    #[cfg(target_os = "linux")]
    #[test]
    fn accept_retries_the_network_errors_linux_passes_on() {
        for errno in ACCEPT_PASSES_ON {
            let e = io::Error::from_raw_os_error(errno);
            assert!(is_connection_error(&e), "{e}");
            assert_eq!(accept_error_kind(&e), "connection", "{e}");
        }
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::ENOBUFS,
            libc::EBADF,
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(!is_connection_error(&e), "{e}");
        }
    }

    /// A loop task cancelled by its runtime's shutdown reports so; it does not panic in
    /// whatever polls the future waiting for it.
    #[tokio::test]
    async fn a_cancelled_loop_is_a_report_not_a_panic() {
        let task = tokio::spawn(std::future::pending::<Shutdown>());
        task.abort();
        let report = report_of(task.await);
        assert!(report.cancelled() && !report.drained(), "{report:?}");
        assert_eq!(report.aborted(), 0);
    }
}
