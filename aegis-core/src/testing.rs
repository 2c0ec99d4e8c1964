//! Helpers for tests of this workspace and of services built on it (feature
//! `test-util`). The metrics ones are in [`crate::metrics::testing`].

use std::net::SocketAddr;

use tokio::net::TcpSocket;

/// A loopback port where connects are refused for as long as the returned socket lives:
/// bound, never listening. A port bound, read and closed again is free for anyone to
/// take meanwhile: the test's own front listener, a gateway it starts, or a client's
/// ephemeral port could get it and accept the connect meant to be refused. `listen` on
/// the socket makes the port accept (an upstream that comes back).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (socket, addr) = aegis_core::testing::dead_port();
/// assert!(tokio::net::TcpStream::connect(addr).await.is_err());
/// drop(socket);
/// # }
/// ```
///
/// # Panics
///
/// If no IPv4 loopback socket can be made or bound.
pub fn dead_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("an IPv4 socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("a loopback port");
    let addr = socket.local_addr().expect("its address");
    (socket, addr)
}
