//! `serve::share_out` over real loopback sockets: which runtime serves each connection,
//! and that nothing accepted is lost when a shard cannot take it, or stops.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use aegis_core::metrics::{self as m, testing};
use aegis_core::serve::{Acceptor, ConnectionCap, Shard, share_out};
use aegis_core::{Conn, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::service_fn;

/// Answers each connection with the name of the thread serving it, then closes it; or,
/// to `hold` it, with the name and a newline, then waits until the client closes it.
fn thread_name_service(
    hold: bool,
) -> impl tower::Service<
    Conn<TcpStream>,
    Response = (),
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<()>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |mut conn: Conn<TcpStream>| async move {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        if !hold {
            return conn.get_mut().write_all(name.as_bytes()).await;
        }
        conn.get_mut()
            .write_all(format!("{name}\n").as_bytes())
            .await?;
        let mut rest = Vec::new();
        conn.get_mut().read_to_end(&mut rest).await.map(drop)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Serves `shard` with [`thread_name_service`] (holding connections or not), under
/// `cap` if given, on a new thread named "shard" until the process ends.
fn serve_shard(shard: Shard, hold: bool, cap: Option<ConnectionCap>) {
    let rt = runtime();
    std::thread::Builder::new()
        .name("shard".into())
        .spawn(move || rt.block_on(serving(shard, hold, cap)))
        .unwrap();
}

/// `listener` served with [`thread_name_service`] (holding connections or not), under
/// `cap` if given, until the process ends.
async fn serving<L>(listener: L, hold: bool, cap: Option<ConnectionCap>)
where
    L: aegis_core::serve::Listener<Io = TcpStream>,
{
    let mut server = serve(listener, thread_name_service(hold));
    if let Some(cap) = cap {
        server = server.connection_cap(cap);
    }
    server.with_graceful_shutdown(std::future::pending()).await;
}

async fn name_of_server(client: &mut TcpStream) -> String {
    let mut name = String::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut name))
        .await
        .expect("the connection was answered")
        .unwrap();
    name
}

/// Serves `acceptor` on the current runtime, in a task of its own.
fn spawn_serving(acceptor: Acceptor) {
    tokio::spawn(serving(acceptor, false, None));
}

/// Connects `n` clients to `addr` one after the other: the names of the threads that
/// served them.
async fn names_of_servers(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        let mut client = TcpStream::connect(addr).await.unwrap();
        names.push(name_of_server(&mut client).await);
    }
    names
}

/// Binds a listener and splits it for one shard with a queue of `queue`.
fn split(
    rt: &tokio::runtime::Runtime,
    queue: usize,
) -> (aegis_core::serve::Acceptor, Shard, SocketAddr) {
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (acceptor, mut shards) = share_out(listener, NonZeroUsize::MIN, queue);
        (acceptor, shards.pop().unwrap(), addr)
    })
}

#[test]
fn connections_alternate_between_the_runtimes() {
    let rt = runtime();
    let me = std::thread::current().name().unwrap().to_owned();
    let (acceptor, shard, addr) = split(&rt, 8);
    serve_shard(shard, false, None);
    let names = rt.block_on(async move {
        spawn_serving(acceptor);
        names_of_servers(addr, 6).await
    });
    let expected: Vec<&str> = [me.as_str(), "shard"].repeat(3);
    assert_eq!(names, expected);
}

#[test]
fn a_full_queue_leaves_the_connection_with_the_acceptor_and_loses_nothing() {
    let rt = runtime();
    let me = std::thread::current().name().unwrap().to_owned();
    // A queue of one, and the shard not served yet: the first connection for it waits
    // in the queue, the second finds it full.
    let (acceptor, shard, addr) = split(&rt, 1);
    let (first, queued, third, fourth) = rt.block_on(async move {
        spawn_serving(acceptor);
        let mut first = TcpStream::connect(addr).await.unwrap();
        let first = name_of_server(&mut first).await;
        let queued = TcpStream::connect(addr).await.unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        let third = name_of_server(&mut third).await;
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        let fourth = name_of_server(&mut fourth).await;
        (first, queued, third, fourth)
    });
    assert_eq!([first, third, fourth], [me.as_str(); 3]);
    // Once the shard runs, the queued connection is served there.
    serve_shard(shard, false, None);
    let queued = rt.block_on(async move {
        let mut queued = queued;
        name_of_server(&mut queued).await
    });
    assert_eq!(queued, "shard");
}

#[test]
fn without_its_shards_the_acceptor_serves_every_connection() {
    let rt = runtime();
    let me = std::thread::current().name().unwrap().to_owned();
    let (acceptor, shard, addr) = split(&rt, 8);
    // The shard's serve has stopped (its listener is dropped).
    drop(shard);
    let names = rt.block_on(async move {
        spawn_serving(acceptor);
        names_of_servers(addr, 4).await
    });
    assert_eq!(names, [me.as_str(); 4]);
}

/// What a client connected from `from` hears: the serving thread's name, or `None` when
/// the connection was refused (closed or reset unanswered).
async fn answer_to(from: std::net::IpAddr, addr: SocketAddr) -> Option<String> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut client = socket.connect(addr).await.unwrap();
    let mut name = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut name))
        .await
        .expect("the connection was answered or closed");
    read.ok().filter(|_| !name.is_empty()).map(|_| name)
}

#[test]
fn the_acceptor_admits_before_it_hands_out() {
    let rt = runtime();
    let me = std::thread::current().name().unwrap().to_owned();
    let (acceptor, shard, addr) = split(&rt, 8);
    // The shard's serve checks nothing: whatever reaches it is answered.
    serve_shard(shard, false, None);
    let banned: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let allowed: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let (refused, names) = rt.block_on(async move {
        tokio::spawn(async move {
            serve(acceptor, thread_name_service(false))
                .admit(move |peer| {
                    if peer.ip() == banned {
                        return Err("banned".into());
                    }
                    Ok(())
                })
                .with_graceful_shutdown(std::future::pending())
                .await
        });
        let mut refused = Vec::new();
        for _ in 0..4 {
            refused.push(answer_to(banned, addr).await);
        }
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(answer_to(allowed, addr).await);
        }
        (refused, names)
    });
    // Had the acceptor handed connections out before the check, every other banned
    // connection would have been answered by the shard.
    assert_eq!(refused, [None, None, None, None]);
    // Refused connections take no turn: the admitted ones still alternate, from the top.
    let (me, shard) = (Some(me.as_str()), Some("shard"));
    assert_eq!(self::names(&names), [me, shard, me, shard]);
}

/// The first line a new client hears, or `None` when the connection closes unanswered
/// (over the cap).
async fn first_line(addr: SocketAddr) -> (TcpStream, Option<String>) {
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut byte))
            .await
            .expect("answered or closed");
        match read {
            Ok(1) if byte[0] != b'\n' => line.push(byte[0]),
            Ok(1) => return (client, Some(String::from_utf8(line).unwrap())),
            _ => return (client, None),
        }
    }
}

#[test]
fn a_shared_cap_counts_the_connections_of_every_runtime() {
    let rt = runtime();
    let me = std::thread::current().name().unwrap().to_owned();
    let (cap, addr) = split_under_cap(&rt, 2, false);
    let [first, second, third, fourth] = rt.block_on(async move {
        let (_held, first) = first_line(addr).await;
        let (closed, second) = first_line(addr).await;
        drop(closed);
        // The shard's connection has ended and given its place back.
        open_becomes(&cap, 1).await;
        // Two places in all: the acceptor's runtime takes a second connection although
        // it has one already (a cap split one each would refuse it)...
        let (_held_too, third) = first_line(addr).await;
        // ... and the shard refuses one although it has none open.
        let (_, fourth) = first_line(addr).await;
        [first, second, third, fourth]
    });
    assert_eq!(first.as_deref(), Some(me.as_str()));
    assert_eq!(second.as_deref(), Some("shard"));
    assert_eq!(third.as_deref(), Some(me.as_str()));
    assert_eq!(fourth, None);
}

/// Over a shared cap a connection is reset, not closed with a FIN, whichever runtime
/// took it: the shard's `serve` refuses it as the acceptor's does.
#[test]
fn over_the_cap_either_runtime_resets_the_connection() {
    let rt = runtime();
    let me = std::thread::current().name().unwrap().to_owned();
    let (_cap, addr) = split_under_cap(&rt, 1, false);
    let (first, to_shard, to_acceptor) = rt.block_on(async move {
        // In turn: the acceptor keeps the first (held: the only place), hands the
        // second to the shard, keeps the third.
        let (held, first) = first_line(addr).await;
        let to_shard = first_read(addr).await;
        let to_acceptor = first_read(addr).await;
        drop(held);
        (first, to_shard, to_acceptor)
    });
    assert_eq!(first.as_deref(), Some(me.as_str()));
    for (runtime, got) in [("shard", to_shard), ("acceptor", to_acceptor)] {
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the {runtime}'s connection over the cap must be reset, got {got:?}"
        );
    }
}

/// What a new client that writes nothing gets from its first read.
async fn first_read(addr: SocketAddr) -> std::io::Result<usize> {
    // The reset can arrive before the client's connect has returned.
    let mut client = TcpStream::connect(addr).await?;
    tokio::time::timeout(Duration::from_secs(10), client.read(&mut [0u8; 8]))
        .await
        .expect("refused at once, not left waiting")
}

/// Splits a listener for one shard, both serving [`thread_name_service`] holding connections under one
/// shared cap of `max`, the acceptor handing out in turn or, `by_load`, by load; the
/// shard on a thread named "shard", the acceptor in a task on `rt`.
fn split_under_cap(
    rt: &tokio::runtime::Runtime,
    max: usize,
    by_load: bool,
) -> (ConnectionCap, SocketAddr) {
    let (acceptor, shard, addr) = split(rt, 8);
    let cap = ConnectionCap::new(max);
    let acceptor = if by_load {
        acceptor.by_load()
    } else {
        acceptor
    };
    serve_shard(shard, true, Some(cap.clone()));
    rt.spawn(serving(acceptor, true, Some(cap.clone())));
    (cap, addr)
}

fn names(v: &[Option<String>]) -> Vec<Option<&str>> {
    v.iter().map(Option::as_deref).collect()
}

/// Waits (bounded) until `cap` counts `n` open connections.
async fn open_becomes(cap: &ConnectionCap, n: usize) {
    let wait = async {
        while cap.open() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the open connections reached the count");
}

#[test]
fn by_load_the_acceptor_keeps_connections_while_it_serves_no_more_than_its_share() {
    let rt = runtime();
    let me = std::thread::current().name().unwrap().to_owned();
    let (cap, addr) = split_under_cap(&rt, 100, true);
    let (one_at_a_time, held) = rt.block_on(async move {
        // One connection at a time: nothing moves.
        let mut one_at_a_time = Vec::new();
        for _ in 0..4 {
            let (client, name) = first_line(addr).await;
            one_at_a_time.push(name);
            drop(client);
            open_becomes(&cap, 0).await;
        }
        // Connections held open: even shares.
        let mut held = Vec::new();
        for n in 1..=4 {
            held.push(first_line(addr).await);
            open_becomes(&cap, n).await;
        }
        let names: Vec<Option<String>> = held.into_iter().map(|(_, name)| name).collect();
        (one_at_a_time, names)
    });
    let (me, shard) = (Some(me.as_str()), Some("shard"));
    assert_eq!(names(&one_at_a_time), [me; 4]);
    assert_eq!(names(&held), [me, shard, me, shard]);
}

/// Serves `acceptor` (in turn, on the current runtime) and connects `2 n` clients one
/// after the other: the acceptor answers every other one and hands the others to its
/// shard, which is not served yet. The clients left waiting in the shard's queue.
async fn queue_for_shard(acceptor: Acceptor, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let me = std::thread::current().name().unwrap().to_owned();
    spawn_serving(acceptor);
    let mut queued = Vec::new();
    for _ in 0..n {
        let mut kept = TcpStream::connect(addr).await.unwrap();
        assert_eq!(name_of_server(&mut kept).await, me);
        queued.push(TcpStream::connect(addr).await.unwrap());
    }
    // Answered only once the acceptor has handed the one before it out.
    let mut last = TcpStream::connect(addr).await.unwrap();
    assert_eq!(name_of_server(&mut last).await, me);
    queued
}

/// What each client hears until the server closes it: "" when closed unanswered.
async fn answers(clients: Vec<TcpStream>) -> Vec<String> {
    let mut names = Vec::new();
    for mut client in clients {
        let mut name = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut name));
        let _ = read.await.expect("answered or closed");
        names.push(name);
    }
    names
}

/// Connections the acceptor admitted and queued for a shard, whose runtime had not
/// taken them when the signal came, are served in the shard's drain: not closed
/// unserved while the report says drained. They take places in the cap as any other,
/// and give them back.
#[test]
fn connections_queued_for_a_shard_when_it_stops_are_served_in_its_drain() {
    const N: usize = 3;
    let rt = runtime();
    let (acceptor, shard, addr) = split(&rt, 8);
    let (go, held) = std::sync::mpsc::channel::<()>();
    let shard = std::thread::Builder::new()
        .name("shard".into())
        .spawn(move || {
            // Held: the shard's serve is not polled until its queue holds the N.
            held.recv().unwrap();
            testing::run(false, || async move {
                let cap = ConnectionCap::new(N);
                // The signal has come before the loop's first poll.
                let report = serve(shard, thread_name_service(false))
                    .connection_cap(cap.clone())
                    .with_graceful_shutdown(std::future::ready(()))
                    .await;
                (report, cap.open())
            })
        })
        .unwrap();
    let queued = rt.block_on(queue_for_shard(acceptor, addr, N));
    go.send(()).unwrap();
    let ((report, open), snap) = shard.join().unwrap();
    let names = rt.block_on(answers(queued));
    assert_eq!(names, ["shard"; N], "every queued client is served");
    let got = testing::capture(&snap);
    let ok = got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "ok")]);
    let all = got.counter(m::CONNECTIONS_TOTAL, &[]);
    assert_eq!((ok, all), (N as u64, N as u64));
    assert!(report.drained(), "{report:?}");
    assert_eq!(open, 0, "every place in the cap is given back");
}

/// A shard dropped with connections still queued (its serve never ran, its runtime is
/// gone) closes them unserved, and counts each as aborted.
#[test]
fn a_shard_dropped_with_connections_queued_counts_each_aborted() {
    const N: usize = 3;
    let rt = runtime();
    let (acceptor, shard, addr) = split(&rt, 8);
    let queued = rt.block_on(queue_for_shard(acceptor, addr, N));
    let ((), snap) = testing::run(false, || async move { drop(shard) });
    let got = testing::capture(&snap);
    let aborted = got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "aborted")]);
    let all = got.counter(m::CONNECTIONS_TOTAL, &[]);
    assert_eq!((aborted, all), (N as u64, N as u64));
    assert_eq!(rt.block_on(answers(queued)), [""; N]);
}

/// A listener that accepts nothing and, at stop, gives one queued connection, then
/// stalls as a hand-out under way on a stuck acceptor thread would, then gives a
/// second one, arrived only once the drain deadline has passed.
struct StalledQueue {
    queued: std::collections::VecDeque<Conn<TcpStream>>,
    polls: usize,
}

impl aegis_core::serve::Listener for StalledQueue {
    type Io = TcpStream;

    fn poll_accept(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<Conn<TcpStream>>> {
        std::task::Poll::Pending
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Err(std::io::ErrorKind::NotConnected.into())
    }

    fn poll_queued(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Conn<TcpStream>>> {
        self.polls += 1;
        match self.polls {
            // Stalled: nothing wakes the loop before its deadline, which polls it once
            // more (3) before the loop gives up waiting, and cuts what came (4).
            2 | 3 => std::task::Poll::Pending,
            _ => match self.queued.pop_front() {
                Some(conn) => std::task::Poll::Ready(Some(conn)),
                None => std::task::Poll::Pending,
            },
        }
    }
}

/// A hand-out stalled past the drain deadline: the loop waits for it no longer than
/// the drain timeout (no hang at shutdown), serves what came before, and cuts what came
/// after, counted as aborted and in the report, which then says not drained.
#[test]
fn a_connection_handed_over_after_the_drain_deadline_is_counted_aborted() {
    let ((report, answers), snap) = testing::run(true, || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        let mut queued = std::collections::VecDeque::new();
        for _ in 0..2 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (io, peer) = listener.accept().await.unwrap();
            queued.push_back(Conn::new(io, peer, addr));
        }
        let stalled = StalledQueue { queued, polls: 0 };
        let report = serve(stalled, thread_name_service(false))
            .drain_timeout(Duration::from_secs(5))
            .with_graceful_shutdown(std::future::ready(()))
            .await;
        (report, self::answers(clients).await)
    });
    let me = std::thread::current().name().unwrap().to_owned();
    assert_eq!(answers, [me.as_str(), ""]);
    assert!(!report.drained(), "{report:?}");
    assert_eq!(report.aborted(), 1);
    let got = testing::capture(&snap);
    let ok = got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "ok")]);
    let aborted = got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "aborted")]);
    assert_eq!((ok, aborted), (1, 1));
}
