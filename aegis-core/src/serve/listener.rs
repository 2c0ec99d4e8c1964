//! What the accept loop accepts from.

use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::Conn;

/// A source of accepted connections for [`serve`](super::serve).
///
/// Implemented for [`tokio::net::TcpListener`]. Implement it for other listeners, or skip
/// the accept loop entirely: every layer works on any [`Conn`].
pub trait Listener: Send + 'static {
    /// The accepted stream.
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    /// Accepts one connection, with its addresses.
    ///
    /// # Errors
    ///
    /// The error of the underlying `accept()`; the loop counts it, backs off where that
    /// helps (out of descriptors or memory) and keeps serving.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Conn<Self::Io>>>;

    /// Accepts one connection whose local address is `local`: the loop calls this instead
    /// of [`poll_accept`](Self::poll_accept) when the listener is bound to one address
    /// and port (not a wildcard), which every connection it accepts then shares. The
    /// default calls `poll_accept`; the `TcpListener` implementation skips asking each
    /// accepted socket its address (a `getsockname` system call per connection).
    ///
    /// # Errors
    ///
    /// As [`poll_accept`](Self::poll_accept).
    fn poll_accept_at(
        &mut self,
        cx: &mut Context<'_>,
        local: SocketAddr,
    ) -> Poll<io::Result<Conn<Self::Io>>> {
        let _ = local;
        self.poll_accept(cx)
    }

    /// The address the listener is bound to.
    ///
    /// # Errors
    ///
    /// When the socket cannot tell.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Sets `TCP_NODELAY` on an accepted stream, where that means anything.
    ///
    /// # Errors
    ///
    /// When the option cannot be set.
    fn set_nodelay(_io: &Self::Io, _nodelay: bool) -> io::Result<()> {
        Ok(())
    }

    /// Whether the streams this listener accepts already have `TCP_NODELAY`: set on the
    /// listening socket before it listened (`tokio::net::TcpSocket::set_nodelay`), which
    /// Linux passes on to every socket it accepts. The accept loop then does not set it
    /// again on each (one system call less per connection). The default says no.
    fn accepts_nodelay(&self) -> bool {
        false
    }

    /// Closes a connection the loop refuses without serving it: one [`Serve::admit`]
    /// refused, or one over the connection cap. The default drops it.
    ///
    /// [`Serve::admit`]: super::Serve::admit
    fn refuse(io: Self::Io) {
        drop(io);
    }

    /// Where the loop serves a connection it has admitted ([`Serve::admit`]): `Some`
    /// gives it back to be served by this loop, as the default does; `None` means the
    /// listener has passed it on, to be served elsewhere. `open` is how many
    /// connections this loop serves now; `shared_open`, under a cap shared with other
    /// loops ([`Serve::connection_cap`]), how many all of them serve (`None` without
    /// one). An [`Acceptor`](super::share::Acceptor) hands connections to other runtimes
    /// here, so that every connection is admitted, or refused, before it moves.
    ///
    /// [`Serve::admit`]: super::Serve::admit
    /// [`Serve::connection_cap`]: super::Serve::connection_cap
    fn pass_on(
        &mut self,
        conn: Conn<Self::Io>,
        open: usize,
        shared_open: Option<usize>,
    ) -> Option<Conn<Self::Io>> {
        let _ = (open, shared_open);
        Some(conn)
    }

    /// At shutdown, once the loop has stopped accepting: a connection accepted and
    /// admitted elsewhere and already waiting for this loop, which the loop then serves
    /// in its drain; `Ready(None)` once none is left and none can come. It never
    /// accepts a new one. A [`Shard`](super::Shard) gives here what its
    /// [`Acceptor`](super::Acceptor) had queued for it, so that no connection admitted
    /// before the signal is closed unserved; `Pending` only while a hand-out to it is
    /// under way on the acceptor's thread. The loop waits for it no longer than the
    /// drain timeout. The default has none.
    fn poll_queued(&mut self, cx: &mut Context<'_>) -> Poll<Option<Conn<Self::Io>>> {
        let _ = cx;
        Poll::Ready(None)
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Conn<Self::Io>>> {
        accept_tcp(self, cx, None)
    }

    fn poll_accept_at(
        &mut self,
        cx: &mut Context<'_>,
        local: SocketAddr,
    ) -> Poll<io::Result<Conn<Self::Io>>> {
        accept_tcp(self, cx, Some(local))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }

    fn set_nodelay(io: &Self::Io, nodelay: bool) -> io::Result<()> {
        io.set_nodelay(nodelay)
    }

    /// On Linux, the listening socket's own `TCP_NODELAY`, which the sockets it accepts
    /// inherit (tested in `tests/serve.rs`); elsewhere `false`.
    fn accepts_nodelay(&self) -> bool {
        cfg!(target_os = "linux") && socket2::SockRef::from(self).tcp_nodelay().unwrap_or(false)
    }

    /// Resets the connection (`SO_LINGER` 0): a refused connection then costs no FIN
    /// exchange and leaves no `TIME_WAIT` socket behind, which is what a reject rule of
    /// a TCP load balancer does too.
    fn refuse(io: Self::Io) {
        let _ = socket2::SockRef::from(&io).set_linger(Some(std::time::Duration::ZERO));
    }
}

/// Accepts from a `TcpListener`. `local`: the address every accepted socket shares (the
/// listener is bound to one); `None` asks each socket (`getsockname`), since on a
/// wildcard listener the local address is the one the client dialled.
fn accept_tcp(
    listener: &tokio::net::TcpListener,
    cx: &mut Context<'_>,
    local: Option<SocketAddr>,
) -> Poll<io::Result<Conn<tokio::net::TcpStream>>> {
    let (io, peer) = std::task::ready!(listener.poll_accept(cx))?;
    let local = match local {
        Some(local) => local,
        None => io.local_addr()?,
    };
    Poll::Ready(Ok(Conn::new(io, peer, local)))
}
