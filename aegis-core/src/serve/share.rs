//! Handing accepted TCP connections out to several runtimes.
//!
//! [`share_out`] splits a `TcpListener` into an [`Acceptor`] and one or more [`Shard`]s,
//! each a [`Listener`] to [`serve`](super::serve) on a runtime of its own: one
//! current-thread runtime per core, say. The acceptor's runtime accepts every
//! connection and keeps every n-th one; the others go, in turn, to the shards, whose
//! runtimes register them with their own reactors. Each runtime then waits for its own
//! sockets' events in its own `epoll_wait`, as each thread of an event-driven proxy
//! does.
//!
//! Why: in tokio's work-stealing runtime one worker at a time polls the reactor for the
//! whole runtime. Under a churn of short MQTT sessions on two cores (the repository's
//! `BENCHMARKS.md`) the machine sat idle two to three times as long per session behind
//! the gateway as behind a C proxy with one event loop per thread; served from two
//! current-thread runtimes this way it idled 1.2 to 1.3 times as long, and the gateway
//! ran 2.5 % more sessions per second with 32 clients and 5 % more with 64, at the same
//! CPU per session.
//!
//! What it costs: a connection stays on the runtime that took it. Nothing moves work
//! between runtimes afterwards, so long-lived connections of unequal load can keep one
//! core busier than another, which work stealing would even out. And each runtime's
//! [`serve`](super::serve) has its own drain, and its own connection cap unless they
//! share one: give them clones of one [`ConnectionCap`](super::ConnectionCap)
//! ([`Serve::connection_cap`](super::Serve::connection_cap)), and a runtime takes a
//! connection whenever the runtimes together are under it. And a connection handed out
//! waits for the other runtime's thread to wake up and take it: at low load, tens of
//! microseconds on a virtual machine.
//!
//! - **In turn, or by load.** By default the acceptor keeps one connection in
//!   `shards + 1` and hands the others out in turn. By load ([`Acceptor::by_load`],
//!   when the runtimes share a cap) it keeps a connection while its runtime serves no
//!   more than an even share of all the open connections, and hands it out otherwise:
//!   at low load nothing moves, under load the shares stay even.
//! - **Bounded.** Each shard's queue holds at most `queue` connections. When a shard's
//!   queue is full, or its listener is gone (its `serve` stopped), the acceptor keeps
//!   the connection and its own runtime serves it: nothing accepted is dropped. Only
//!   a connection that cannot be taken out of the acceptor's reactor (deregistering
//!   it fails, which should not happen) is closed unserved, and counted as
//!   `aegis_connections_total{outcome="error"}`.
//! - **Admission first.** The acceptor's [`serve`](super::serve) admits each connection
//!   ([`Serve::admit`](super::Serve::admit): an address ban, say) before it keeps it or
//!   hands it out ([`Listener::pass_on`]): a refused connection costs no hand-out, and
//!   the shards' `serve` need no check of their own. Only admitted connections take a
//!   turn.
//! - **Accept errors** are the acceptor's `poll_accept` errors, which `serve` counts and
//!   backs off from as for any listener.
//! - **Shutdown.** Stop every runtime's `serve` with one signal. A shard whose acceptor
//!   is gone waits for nothing more. A shard's `serve`, when it stops, closes its queue
//!   (the acceptor keeps from then on what it would have handed to it) and serves in
//!   its drain the connections already queued for it, admitted before the signal
//!   ([`Listener::poll_queued`]), under the cap as any other: nothing admitted is
//!   closed unserved while the report says drained. It waits for a hand-out under way
//!   on the acceptor's thread, no longer than its drain timeout; one that arrives only
//!   after that is closed and counted in [`Shutdown::aborted`](super::Shutdown::aborted).
//!   A shard dropped with connections queued (its `serve` never ran, or its runtime shut
//!   down under it) closes them unserved and counts each as
//!   `aegis_connections_total{outcome="aborted"}`. Only one handed out in the very
//!   instant such a shard is dropped (between the acceptor's reserving a place in the
//!   queue and its sending) stays in the queue, open, unserved and uncounted, until the
//!   acceptor is dropped: tokio's channel closes what is queued when its receiver
//!   drops, not what is sent after. Stop the acceptor's `serve` with the same signal, as
//!   the example does, and it is closed soon after.
//!
//! # Example
//!
//! Two runtimes, each serving every other connection:
//!
//! ```
//! use std::num::NonZeroUsize;
//! use aegis_core::{Conn, serve};
//! use aegis_core::serve::share_out;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio::net::TcpStream;
//! use tower::service_fn;
//!
//! // Answers with the name of the thread that serves the connection.
//! let svc = service_fn(|mut conn: Conn<TcpStream>| async move {
//!     let name = std::thread::current().name().unwrap_or("").to_owned();
//!     conn.get_mut().write_all(name.as_bytes()).await
//! });
//! let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build();
//! let main = runtime()?;
//! let (acceptor, shards, addr) = main.block_on(async {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//!     let addr = listener.local_addr()?;
//!     let (acceptor, shards) = share_out(listener, NonZeroUsize::MIN, 64);
//!     Ok::<_, std::io::Error>((acceptor, shards, addr))
//! })?;
//! for shard in shards {
//!     let (svc, rt) = (svc.clone(), runtime()?);
//!     std::thread::Builder::new().name("shard".into()).spawn(move || {
//!         rt.block_on(async move { serve(shard, svc).with_graceful_shutdown(std::future::pending()).await })
//!     })?;
//! }
//! // This thread's runtime drives the acceptor and serves every other connection.
//! let names = main.block_on(async move {
//!     tokio::spawn(async move { serve(acceptor, svc).with_graceful_shutdown(std::future::pending()).await });
//!     let mut names = Vec::new();
//!     for _ in 0..4 {
//!         let mut client = TcpStream::connect(addr).await?;
//!         let mut name = String::new();
//!         client.read_to_string(&mut name).await?;
//!         names.push(name);
//!     }
//!     Ok::<_, std::io::Error>(names)
//! })?;
//! assert_eq!(names, ["main", "shard", "main", "shard"]);
//! # Ok::<_, std::io::Error>(())
//! ```

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::task::{Context, Poll};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::Listener;
use super::task::Outcome;
use crate::Conn;
use crate::metrics as m;

/// The [`Listener`] methods that [`Acceptor`] and [`Shard`] share: `TCP_NODELAY` as the
/// listener passed it on ([`share_out`] records it), and a refusal as a reset, as for
/// a `TcpListener`.
macro_rules! tcp_stream_listener {
    () => {
        fn set_nodelay(io: &TcpStream, nodelay: bool) -> io::Result<()> {
            io.set_nodelay(nodelay)
        }

        fn accepts_nodelay(&self) -> bool {
            self.nodelay
        }

        fn refuse(io: TcpStream) {
            <TcpListener as Listener>::refuse(io);
        }
    };
}

/// A connection on its way to a shard: the socket (out of the acceptor's reactor) and
/// its two addresses.
type Handed = (std::net::TcpStream, SocketAddr, SocketAddr);

/// Splits `listener` into an [`Acceptor`], which keeps one connection in `shards + 1`
/// for its own runtime, and `shards` [`Shard`]s, which get the others in turn, each
/// with a queue of at most `queue` connections (at least 1).
///
/// See the [module docs](self).
#[must_use]
pub fn share_out(
    listener: TcpListener,
    shards: NonZeroUsize,
    queue: usize,
) -> (Acceptor, Vec<Shard>) {
    let nodelay = listener.accepts_nodelay();
    let (txs, shards) = (0..shards.get())
        .map(|_| {
            let (tx, rx) = mpsc::channel(queue.max(1));
            (tx, Shard { rx, nodelay })
        })
        .unzip();
    let acceptor = Acceptor {
        listener,
        shards: txs,
        next: 0,
        nodelay,
        by_load: false,
    };
    (acceptor, shards)
}

/// The accepting end of [`share_out`]: a [`Listener`] that serves one connection in
/// `shards + 1` itself and hands the others to the shards in turn, or hands out by load
/// ([`by_load`](Self::by_load)).
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    shards: Vec<mpsc::Sender<Handed>>,
    /// In turn, whose turn the next connection is: 0 for this one, `i + 1` for shard
    /// `i`. By load, the next shard to hand a connection to.
    next: usize,
    nodelay: bool,
    /// Whether to hand out by load (under a cap the runtimes share).
    by_load: bool,
}

impl Acceptor {
    /// Hands out by load rather than in turn, when the `serve` of every runtime, this
    /// one's included, shares one [`ConnectionCap`](super::ConnectionCap)
    /// ([`Serve::connection_cap`](super::Serve::connection_cap)), whose count of open
    /// connections the acceptor's loop passes on ([`Listener::pass_on`]); without a
    /// shared cap it still hands out in turn. The acceptor keeps a connection while its
    /// runtime serves no more than an even share of the connections open in all of
    /// them (with those still queued for a shard), and hands it to the shards in turn
    /// otherwise. At low load no connection moves, so none waits for another core to
    /// wake up and take it; under load each runtime still gets an even share.
    #[must_use]
    pub fn by_load(mut self) -> Self {
        self.by_load = true;
        self
    }

    /// Connections handed out and not yet taken by their shards.
    fn queued(&self) -> usize {
        self.shards
            .iter()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .sum()
    }

    /// Hands `conn` to shard `i`; gives it back (still this runtime's) when the shard's
    /// queue is full or its listener gone.
    fn hand_out(&self, i: usize, conn: Conn<TcpStream>) -> Option<Conn<TcpStream>> {
        let Ok(permit) = self.shards[i].try_reserve() else {
            return Some(conn);
        };
        let peer = crate::Param::<crate::PeerAddr>::param(&conn).0;
        let local = crate::Param::<crate::LocalAddr>::param(&conn).0;
        match conn.into_inner().into_std() {
            Ok(socket) => {
                permit.send((socket, peer, local));
                None
            }
            // Deregistering failed: the socket is closed; nothing to serve.
            Err(e) => {
                tracing::debug!(error = %e, "could not hand a connection to another runtime");
                count_unserved(Outcome::Error);
                None
            }
        }
    }
}

/// Counts a connection closed before any service saw it, lasting 0 s, so that every
/// admitted connection is counted once: an `error` when it could not be handed out
/// (taking a socket out of the acceptor's reactor, or putting it into a shard's, fails
/// only if epoll refuses); `aborted` when it was queued for a shard dropped before it
/// took it (a shard whose `serve` stops takes what is queued and serves it). Rare, so
/// the metrics are looked up here.
fn count_unserved(outcome: Outcome) {
    let outcome = outcome.label();
    metrics::counter!(m::CONNECTIONS_TOTAL, "outcome" => outcome).increment(1);
    metrics::histogram!(m::CONNECTION_DURATION_SECONDS, "outcome" => outcome).record(0.0);
}

/// Accepts every connection; [`serve`](super::serve) admits each, then
/// [`pass_on`](Listener::pass_on) keeps it or hands it out.
impl Listener for Acceptor {
    type Io = TcpStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Conn<TcpStream>>> {
        Listener::poll_accept(&mut self.listener, cx)
    }

    fn poll_accept_at(
        &mut self,
        cx: &mut Context<'_>,
        local: SocketAddr,
    ) -> Poll<io::Result<Conn<TcpStream>>> {
        Listener::poll_accept_at(&mut self.listener, cx, local)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Keeps one admitted connection in `shards + 1` and hands the others to the
    /// shards in turn; by load under a shared cap, keeps it while this runtime's `open`
    /// connections are no more than an even share. Keeps one a shard cannot take.
    fn pass_on(
        &mut self,
        conn: Conn<TcpStream>,
        open: usize,
        shared_open: Option<usize>,
    ) -> Option<Conn<TcpStream>> {
        let shard = if let Some(all) = shared_open.filter(|_| self.by_load) {
            let runtimes = self.shards.len() + 1;
            if open.saturating_mul(runtimes) <= all + self.queued() {
                return Some(conn);
            }
            let i = self.next % self.shards.len();
            self.next = i + 1;
            i
        } else {
            let turn = self.next;
            self.next = (turn + 1) % (self.shards.len() + 1);
            match turn.checked_sub(1) {
                Some(i) => i,
                None => return Some(conn),
            }
        };
        self.hand_out(shard, conn)
    }

    tcp_stream_listener!();
}

/// A share of an [`Acceptor`]'s connections, to [`serve`](super::serve) on another
/// runtime: each connection is registered with the reactor of the runtime that polls
/// the shard.
#[derive(Debug)]
pub struct Shard {
    rx: mpsc::Receiver<Handed>,
    nodelay: bool,
}

impl Shard {
    /// The next connection handed to this shard, registered with this runtime's
    /// reactor; `None` once the queue is closed (the acceptor gone, or
    /// [`poll_queued`](Listener::poll_queued)) and empty.
    ///
    /// A connection this runtime's reactor cannot take (registering it fails: epoll's
    /// `max_user_watches` reached, or no memory) is closed and counted as lost, as one
    /// the acceptor cannot hand out is, and the shard goes on to the next.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Conn<TcpStream>>> {
        loop {
            let Some((socket, peer, local)) = std::task::ready!(self.rx.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            match TcpStream::from_std(socket) {
                Ok(io) => return Poll::Ready(Some(Conn::new(io, peer, local))),
                Err(e) => {
                    tracing::debug!(error = %e, "could not take a connection from another runtime");
                    count_unserved(Outcome::Error);
                }
            }
        }
    }
}

impl Listener for Shard {
    type Io = TcpStream;

    /// The next connection handed to this shard (one this runtime's reactor cannot take
    /// is closed and counted as lost). Once the acceptor is gone there are no more:
    /// `Pending` until the shard's `serve` stops.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Conn<TcpStream>>> {
        match std::task::ready!(self.poll_next(cx)) {
            Some(conn) => Poll::Ready(Ok(conn)),
            None => Poll::Pending,
        }
    }

    /// Always [`io::ErrorKind::NotConnected`]: a shard is bound to nothing itself; each
    /// connection it hands out carries the address it was accepted on.
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "a shard has no address of its own",
        ))
    }

    /// At stop: closes the queue, so that the acceptor keeps from now on what it would
    /// have handed here, and gives the connections already in it, one by one, for the
    /// stopping `serve` to serve in its drain. `Pending` only while a hand-out to this
    /// shard is under way on the acceptor's thread.
    fn poll_queued(&mut self, cx: &mut Context<'_>) -> Poll<Option<Conn<TcpStream>>> {
        self.rx.close();
        self.poll_next(cx)
    }

    tcp_stream_listener!();
}

/// A shard dropped with connections still queued (its `serve` never ran, or its runtime
/// shut down under it) closes them unserved: each is counted as
/// `aegis_connections_total{outcome="aborted"}`, lasting 0 s, as a connection cut at
/// the end of a drain is. The acceptor keeps what it would have handed here afterwards.
impl Drop for Shard {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(handed) = self.rx.try_recv() {
            drop(handed);
            count_unserved(Outcome::Aborted);
        }
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use super::*;
    use crate::metrics::testing::{capture, run};

    /// What counts a connection closed on its way to a shard: once, under its outcome,
    /// as one that ended at once (`Acceptor::hand_out` counts an `error` when
    /// `into_std` fails, `Shard::poll_next` when `from_std` does, which a test cannot
    /// make happen; a shard dropped with connections queued counts each `aborted`,
    /// tested in `tests/share.rs`).
    #[test]
    fn count_unserved_counts_one_connection_under_its_outcome() {
        for (outcome, label) in [(Outcome::Error, "error"), (Outcome::Aborted, "aborted")] {
            let ((), snap) = run(false, || async { count_unserved(outcome) });
            let got = capture(&snap);
            assert_eq!(got.counter(m::CONNECTIONS_TOTAL, &[("outcome", label)]), 1);
            assert_eq!(got.counter(m::CONNECTIONS_TOTAL, &[]), 1);
        }
    }
}
