//! What several test binaries share. Each one that uses it says `mod common;`.

use std::net::SocketAddr;

use tokio::net::TcpSocket;

/// A loopback port where connects are refused for as long as the returned socket lives:
/// bound, never listening. A port bound, read and closed again is free for anyone to
/// take meanwhile: the test's own front listener, or a client's ephemeral port, could get
/// it and accept the connect meant to be refused. `listen` on the socket makes the port
/// accept (an upstream that comes back).
pub(crate) fn dead_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}
