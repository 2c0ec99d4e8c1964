//! Connection metadata as typed params.
//!
//! See the [crate docs](crate#the-connection-contract) for why Aegis carries addresses on
//! the stream as typed params rather than in an extensions map.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::{fmt, io};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Handshake;

/// Read one typed value from a connection (after `linkerd_stack::Param`).
///
/// Every IO type a byte-stream service receives implements `Param<PeerAddr>`,
/// `Param<LocalAddr>` and `Param<ClientAddr>`, and every IO wrapper in Aegis forwards them
/// (see [`forward_params!`](crate::forward_params)).
pub trait Param<T> {
    /// Returns the value.
    fn param(&self) -> T;
}

/// The address of the socket's remote end, as the kernel reported it at accept.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(pub SocketAddr);

/// The local address the connection was accepted on.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalAddr(pub SocketAddr);

/// The *effective* client address: the [`PeerAddr`] unless a trusted source (a PROXY
/// protocol header from a configured trusted network, for example) replaced it.
///
/// Rate limiters, bans and logs key on this value. Only a layer that has verified the
/// source of the information may change it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientAddr(pub SocketAddr);

macro_rules! addr_display {
    ($($t:ident),+) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl From<$t> for SocketAddr {
            fn from(a: $t) -> SocketAddr {
                a.0
            }
        }
    )+};
}
addr_display!(PeerAddr, LocalAddr, ClientAddr);

/// The params every connection carries: a shorthand for trait bounds.
///
/// Implemented for every type that implements the three address params and
/// [`Handshake`].
pub trait ConnParams:
    Param<PeerAddr> + Param<LocalAddr> + Param<ClientAddr> + Param<Handshake>
{
}
impl<T> ConnParams for T where
    T: Param<PeerAddr> + Param<LocalAddr> + Param<ClientAddr> + Param<Handshake>
{
}

/// Forwards the address params of an IO wrapper to one of its fields.
///
/// Every IO wrapper must forward the params (and vectored writes), or the layers outside
/// it lose the client address. For a wrapper `Foo<I>` whose inner stream is the field
/// `io`:
///
/// ```
/// # use aegis_core::{forward_params, PeerAddr, LocalAddr, ClientAddr, Handshake};
/// struct Foo<I> { io: I }
/// forward_params!(Foo<I>.io: PeerAddr, LocalAddr, ClientAddr, Handshake);
/// ```
///
/// A wrapper that replaces one param (the effective client address, say) forwards the
/// others and implements that one itself.
#[macro_export]
macro_rules! forward_params {
    ($wrapper:ident<$io:ident>.$field:ident: $($param:ty),+ $(,)?) => {
        $(
            impl<$io: $crate::Param<$param>> $crate::Param<$param> for $wrapper<$io> {
                #[inline]
                fn param(&self) -> $param {
                    $crate::Param::<$param>::param(&self.$field)
                }
            }
        )+
    };
}

/// Forwards every `AsyncWrite` method of a `pin_project!` IO wrapper to one pinned field,
/// vectored writes included.
///
/// Use it as the whole body of the wrapper's `AsyncWrite` impl; the field must be
/// `#[pin]`. A wrapper that forgets `poll_write_vectored` or `is_write_vectored` silently
/// turns every vectored write above it into single writes, so no wrapper in Aegis writes
/// these by hand.
///
/// ```
/// use aegis_core::forward_async_write;
/// use pin_project_lite::pin_project;
/// use tokio::io::AsyncWrite;
///
/// pin_project! {
///     struct Counted<I> { #[pin] io: I, reads: u64 }
/// }
/// impl<I: AsyncWrite> AsyncWrite for Counted<I> {
///     forward_async_write!(io);
/// }
/// ```
#[macro_export]
macro_rules! forward_async_write {
    ($field:ident) => {
        #[inline]
        fn poll_write(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
            buf: &[u8],
        ) -> ::core::task::Poll<::std::io::Result<usize>> {
            $crate::__private::AsyncWrite::poll_write(self.project().$field, cx, buf)
        }

        #[inline]
        fn poll_write_vectored(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::core::task::Poll<::std::io::Result<usize>> {
            $crate::__private::AsyncWrite::poll_write_vectored(self.project().$field, cx, bufs)
        }

        #[inline]
        fn is_write_vectored(&self) -> bool {
            $crate::__private::AsyncWrite::is_write_vectored(&self.$field)
        }

        #[inline]
        fn poll_flush(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
        ) -> ::core::task::Poll<::std::io::Result<()>> {
            $crate::__private::AsyncWrite::poll_flush(self.project().$field, cx)
        }

        #[inline]
        fn poll_shutdown(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
        ) -> ::core::task::Poll<::std::io::Result<()>> {
            $crate::__private::AsyncWrite::poll_shutdown(self.project().$field, cx)
        }
    };
}

pin_project! {
    /// An accepted connection: a byte stream plus the addresses read once at accept.
    ///
    /// This is the request type of a byte-stream service built on [`serve`](fn@crate::serve).
    /// Users who run their own listener or acceptor (TLS, Unix sockets, QUIC streams)
    /// wrap their stream with [`Conn::new`] and can use every Aegis layer without the
    /// accept loop.
    ///
    /// The effective [`ClientAddr`] of a `Conn` is its peer address.
    #[derive(Debug)]
    pub struct Conn<I> {
        #[pin]
        io: I,
        peer: SocketAddr,
        local: SocketAddr,
    }
}

impl<I> Conn<I> {
    /// Wraps `io` with its addresses.
    pub const fn new(io: I, peer: SocketAddr, local: SocketAddr) -> Self {
        Self { io, peer, local }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The wrapped stream, mutably.
    pub fn get_mut(&mut self) -> &mut I {
        &mut self.io
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> I {
        self.io
    }
}

impl<I> Param<PeerAddr> for Conn<I> {
    #[inline]
    fn param(&self) -> PeerAddr {
        PeerAddr(self.peer)
    }
}

impl<I> Param<LocalAddr> for Conn<I> {
    #[inline]
    fn param(&self) -> LocalAddr {
        LocalAddr(self.local)
    }
}

impl<I> Param<ClientAddr> for Conn<I> {
    #[inline]
    fn param(&self) -> ClientAddr {
        ClientAddr(self.peer)
    }
}

impl<I> Param<Handshake> for Conn<I> {
    /// An untracked handle: a deadline layer outside replaces it with a tracked one.
    #[inline]
    fn param(&self) -> Handshake {
        Handshake::untracked()
    }
}

impl<I: AsyncRead> AsyncRead for Conn<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for Conn<I> {
    crate::forward_async_write!(io);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_reports_its_addresses_and_client_is_peer() {
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let c = Conn::new((), peer, local);
        assert_eq!(Param::<PeerAddr>::param(&c), PeerAddr(peer));
        assert_eq!(Param::<LocalAddr>::param(&c), LocalAddr(local));
        assert_eq!(Param::<ClientAddr>::param(&c), ClientAddr(peer));
        assert_eq!(ClientAddr(peer).to_string(), "192.0.2.1:4000");
    }
}
