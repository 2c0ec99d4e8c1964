//! The security layer: bans by address, client id and username, the anomaly detector,
//! the bounded event log and its `tracing` events, over in-process duplex streams (tokio's
//! clock paused where time matters) and one real loopback socket.
#![cfg(feature = "security")]

mod common;

use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::{BoxError, Reject, find, label_of};
use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::metrics::testing::{capture, run};
use aegis_core::testing::capture_logs;
use aegis_core::{ClientAddr, Conn, Handshake, Param, serve};
use aegis_mqtt::layer::{MqttIo, MqttLayer};
use aegis_mqtt::security::metrics as m;
use aegis_mqtt::security::{Ban, BanKey, EventKind, KeyBy, Security, SecurityLayer, Severity};
use aegis_mqtt::{Config, MqttError};
use common::head;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, Service, ServiceExt, service_fn};

fn addr(s: &str) -> BanKey {
    BanKey::addr(s.parse().unwrap())
}

fn conn(server: DuplexStream, peer: &str) -> Conn<DuplexStream> {
    Conn::new(
        server,
        peer.parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
    )
}

/// A 3.1.1 or 5.0 CONNECT with client id `id` and, if given, a username.
fn connect(v5: bool, id: &str, user: Option<&str>) -> Vec<u8> {
    let flags = if user.is_some() { 0x82 } else { 0x02 };
    let b = head("MQTT", if v5 { 5 } else { 4 }, flags);
    let b = if v5 { b.props(&[]) } else { b };
    let b = b.s(id);
    let b = match user {
        Some(u) => b.s(u),
        None => b,
    };
    b.frame(0x10)
}

/// A 3.1.1 CONNECT with the reserved flag bit set: malformed, refused by closing.
fn malformed() -> Vec<u8> {
    head("MQTT", 4, 0x03).s("x").frame(0x10)
}

/// A stream that counts the reads asked of it.
struct Probe {
    io: Conn<DuplexStream>,
    reads: Arc<AtomicUsize>,
}

impl AsyncRead for Probe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Probe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Param<ClientAddr> for Probe {
    fn param(&self) -> ClientAddr {
        Param::<ClientAddr>::param(&self.io)
    }
}

impl Param<Handshake> for Probe {
    fn param(&self) -> Handshake {
        Param::<Handshake>::param(&self.io)
    }
}

/// Serves one connection from `peer` whose CONNECT is already waiting, expecting a
/// refusal: its error, how many reads of the stream were asked for, and the client end.
async fn refused_waiting<S>(svc: &mut S, peer: &str) -> (BoxError, usize, DuplexStream)
where
    S: Service<Probe, Error = BoxError>,
    S::Response: std::fmt::Debug,
{
    let (mut client, server) = tokio::io::duplex(1024);
    client.write_all(&connect(false, "c1", None)).await.unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let probe = Probe {
        io: conn(server, peer),
        reads: Arc::clone(&reads),
    };
    let err = svc.ready().await.unwrap().call(probe).await.unwrap_err();
    (err, reads.load(Ordering::SeqCst), client)
}

/// What one connection through `SecurityLayer` + `MqttLayer` gave.
struct Run {
    /// The connection's result.
    result: Result<(), BoxError>,
    /// Everything the client received.
    got: Vec<u8>,
    /// How often the inner service (the broker) was called.
    calls: usize,
}

/// Serves one duplex connection from `peer` that sends `bytes` and closes, through
/// `SecurityLayer(sec)` and a default `MqttLayer` over a broker that accepts the CONNECT
/// and reads to the end.
async fn through_mqtt(sec: &Security, peer: &str, bytes: Vec<u8>) -> Run {
    through_broker(sec, peer, bytes, None).await
}

/// One connection from `peer` through `SecurityLayer(sec)` alone, over a service that
/// accepts it at once.
async fn through_security(sec: &Security, peer: &str) -> Result<(), BoxError> {
    let inner = service_fn(|_: Conn<DuplexStream>| async { Ok::<_, io::Error>(()) });
    let (_client, server) = tokio::io::duplex(64);
    sec.layer().layer(inner).oneshot(conn(server, peer)).await
}

fn labels(r: &Result<(), BoxError>) -> (&'static str, &'static str) {
    match r {
        Ok(()) => ("ok", "ok"),
        Err(e) => label_of(&**e),
    }
}

#[test]
fn an_address_ban_refuses_before_any_byte_is_read() {
    let ((), snap) = run(true, || async {
        let sec = Security::default();
        sec.ban(addr("192.0.2.7"), Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let broker = service_fn(move |_: MqttIo<Probe>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, io::Error>(()) }
        });
        let mut svc =
            SecurityLayer::new(sec.clone()).layer(MqttLayer::new(Config::new()).layer(broker));
        for peer in ["192.0.2.7:1000", "[::ffff:192.0.2.7]:1001"] {
            let (err, reads, mut client) = refused_waiting(&mut svc, peer).await;
            assert_eq!(label_of(&*err), ("security", "banned"), "{err}");
            assert_eq!(reads, 0, "not a byte was read");
            // The stream was dropped: the client sees the end, no answer.
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert!(got.is_empty());
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "the broker was never called"
        );
        // Both refused, but the second within a second of the first is not logged
        // again: a banned client reconnecting in a loop cannot flood the log.
        let events = sec.events(10);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].kind, EventKind::Ban);
        let e = &events[1];
        assert_eq!(e.kind, EventKind::Rejection);
        assert_eq!((e.layer, e.rule.as_deref()), ("security", Some("banned")));
        assert_eq!(e.severity, Severity::High);
        assert_eq!(e.client_addr, Some("192.0.2.7:1000".parse().unwrap()));
        assert_eq!(e.client_id, None);
        // Another address is served.
        let (client, server) = tokio::io::duplex(1024);
        let reads = Arc::new(AtomicUsize::new(0));
        let probe = Probe {
            io: conn(server, "192.0.2.8:1000"),
            reads: Arc::clone(&reads),
        };
        drop(client);
        let err = svc.ready().await.unwrap().call(probe).await.unwrap_err();
        assert_eq!(label_of(&*err), ("io", "unexpected_eof"));
        assert!(reads.load(Ordering::SeqCst) > 0);
        assert_eq!(sec.events_total(), 2, "an IO error is not an event");
        // A second later the next refusal is logged, with the count of the quiet ones.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_client, server) = tokio::io::duplex(1024);
        let reads = Arc::new(AtomicUsize::new(0));
        let probe = Probe {
            io: conn(server, "192.0.2.7:1002"),
            reads: Arc::clone(&reads),
        };
        let err = svc.ready().await.unwrap().call(probe).await.unwrap_err();
        assert_eq!(label_of(&*err), ("security", "banned"));
        let events = sec.events(1);
        assert_eq!(
            events[0].details,
            "client address is banned (1 more refusals in the last 1s not logged)"
        );
    });
    let c = capture(&snap);
    assert_eq!(
        c.counter(
            REJECTIONS_TOTAL,
            &[("layer", "security"), ("reason", "banned")]
        ),
        3,
        "every refusal is counted"
    );
    assert_eq!(
        c.counter(
            m::EVENTS_TOTAL,
            &[
                ("kind", "rejection"),
                ("layer", "security"),
                ("severity", "high")
            ]
        ),
        2,
        "one event per ban per second"
    );
    assert_eq!(
        c.counter(m::BANS_TOTAL, &[("key", "addr"), ("cause", "manual")]),
        1
    );
    assert_eq!(c.gauge(m::BANS), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn client_id_and_username_bans_get_the_banned_connack() {
    let sec = Security::default();
    sec.ban(BanKey::client_id("bad"), Duration::from_secs(60));
    sec.ban(BanKey::username("mallory"), Duration::from_secs(60));
    let cases = [
        (false, "bad", None, &[0x20, 0x02, 0x00, 0x05][..]),
        (true, "bad", None, &[0x20, 0x03, 0x00, 0x8A, 0x00][..]),
        (false, "ok", Some("mallory"), &[0x20, 0x02, 0x00, 0x05][..]),
        (
            true,
            "ok",
            Some("mallory"),
            &[0x20, 0x03, 0x00, 0x8A, 0x00][..],
        ),
    ];
    for (v5, id, user, answer) in cases {
        let r = through_mqtt(&sec, "192.0.2.7:1000", connect(v5, id, user)).await;
        assert_eq!(r.got, answer, "v5={v5} id={id} user={user:?}");
        assert_eq!(labels(&r.result), ("mqtt", "banned"));
        assert_eq!(r.calls, 0, "the broker was never called");
        let e = sec.events(1).pop().unwrap();
        assert_eq!(e.kind, EventKind::Rejection);
        assert_eq!((e.layer, e.rule.as_deref()), ("mqtt", Some("banned")));
        assert_eq!(e.severity, Severity::High);
        assert_eq!(e.client_id.as_deref(), Some(id));
        assert_eq!(e.username.as_deref(), user);
        assert_eq!(e.client_addr, Some("192.0.2.7:1000".parse().unwrap()));
    }
    // Neither is banned: served.
    let r = through_mqtt(&sec, "192.0.2.7:1000", connect(false, "ok", Some("alice"))).await;
    assert_eq!(labels(&r.result), ("ok", "ok"));
    assert_eq!(r.calls, 1);
    // Lifting the ban lets the client id in again.
    assert!(sec.unban(&BanKey::client_id("bad")));
    let r = through_mqtt(&sec, "192.0.2.7:1000", connect(true, "bad", None)).await;
    assert_eq!(labels(&r.result), ("ok", "ok"));
}

/// The reviewer's attack, in small: once the rate limiter tracks `max_keys` clients, a
/// flood of new addresses drains the overflow bucket every new client shares, and a
/// victim that never went over its own rate is refused there. Those refusals
/// (`rate_limit` / `overflow`) ban nobody; a tracked client over its own rate
/// (`per_client`) is still banned. Before, the victim was refused as `per_client` and
/// banned at its second refusal.
#[cfg(feature = "policy")]
#[test]
fn a_flood_from_others_draining_the_overflow_bucket_bans_no_victim() {
    use aegis_layers::rate_limit::{Quota, RateLimitLayer};
    use std::num::NonZeroU32;
    let ((), snap) = run(true, || async {
        let sec = Security::builder()
            .max_rejections(1)
            .window(Duration::from_secs(60))
            .build();
        let nz = |n| NonZeroU32::new(n).unwrap();
        let limit = RateLimitLayer::builder()
            .per_client(Quota::per_minute(nz(1)).allow_burst(nz(2)))
            .max_keys(1)
            .build();
        let inner = service_fn(|_: Conn<DuplexStream>| async { Ok::<_, io::Error>(()) });
        let svc = sec.layer().layer(limit.layer(inner));
        let through = |peer: &str| {
            let (_client, server) = tokio::io::duplex(64);
            svc.clone().oneshot(conn(server, peer))
        };
        // The one slot goes to the attacker's first address.
        assert_eq!(labels(&through("198.51.100.1:1").await), ("ok", "ok"));
        // Its flood of new addresses: the overflow bucket's burst of 2, then refusals.
        for i in 2..10 {
            let _ = through(&format!("198.51.100.{i}:1")).await;
        }
        // The victim's first connections ever: refused, by the others' flood.
        for port in 0..5 {
            assert_eq!(
                labels(&through(&format!("192.0.2.9:{port}")).await),
                ("rate_limit", "overflow")
            );
        }
        assert!(!sec.is_banned(&addr("192.0.2.9")), "{:?}", sec.bans());
        assert!(sec.bans().is_empty(), "{:?}", sec.bans());
        let e = sec.events(1).pop().unwrap();
        assert_eq!(
            (e.severity, e.rule.as_deref()),
            (Severity::Low, Some("overflow"))
        );
        // The tracked client over its own rate is the client's doing: counted, banned.
        assert_eq!(labels(&through("198.51.100.1:2").await), ("ok", "ok"));
        for port in 3..5 {
            assert_eq!(
                labels(&through(&format!("198.51.100.1:{port}")).await),
                ("rate_limit", "per_client")
            );
        }
        assert!(sec.is_banned(&addr("198.51.100.1")));
    });
    let c = capture(&snap);
    assert_eq!(
        c.counter(
            REJECTIONS_TOTAL,
            &[("layer", "rate_limit"), ("reason", "overflow")]
        ),
        6 + 5
    );
}

/// The same through the MQTT policy's `connect` tier, which keys addresses in the same
/// kind of store: with its `max_keys` taken, a victim's CONNECTs refused by the shared
/// overflow bucket get the `connect_rate` answer (CONNACK 0x05) but are
/// `connect_overflow`, which bans nobody; the tracked address over its own rate
/// (`connect_rate`) is banned. Before, the victim was banned at its second refusal.
#[cfg(feature = "policy")]
#[test]
fn connects_refused_by_the_policys_overflow_bucket_ban_no_victim() {
    use aegis_mqtt::layer::Policy;
    use aegis_mqtt::layer::policy::Quota;
    use std::num::NonZeroU32;
    run(true, || async {
        let sec = Security::builder()
            .max_rejections(1)
            .window(Duration::from_secs(60))
            .build();
        let policy = Policy::builder()
            .connect_per_addr(Quota::per_minute(NonZeroU32::new(1).unwrap()))
            .max_keys(1)
            .build();
        let broker = service_fn(|mut io: MqttIo<Conn<DuplexStream>>| async move {
            io.write_all(&common::connack_accepting(&io)).await?;
            let mut all = Vec::new();
            io.read_to_end(&mut all).await?;
            Ok::<_, io::Error>(())
        });
        let svc = SecurityLayer::new(sec.clone())
            .layer(MqttLayer::new(Config::new()).policy(policy).layer(broker));
        let through = |peer: &str, id: &str| {
            let (server, client) = common::client(1 << 12, connect(false, id, None));
            let svc = svc.clone();
            let conn = conn(server, peer);
            async move {
                let result = svc.oneshot(conn).await;
                (labels(&result), client.await.unwrap())
            }
        };
        // The tier's one slot, then the overflow bucket's one CONNECT.
        for peer in ["198.51.100.1:1", "198.51.100.2:1"] {
            let (result, got) = through(peer, "x").await;
            assert_eq!(result, ("ok", "ok"), "{peer}");
            assert_eq!(got, [0x20, 0x02, 0x00, 0x00]);
        }
        // The victim's first CONNECTs ever.
        for port in 0..4 {
            let (result, got) = through(&format!("192.0.2.9:{port}"), "victim").await;
            assert_eq!(result, ("mqtt", "connect_overflow"));
            assert_eq!(got, [0x20, 0x02, 0x00, 0x05]);
        }
        assert!(sec.bans().is_empty(), "{:?}", sec.bans());
        // The tracked address over its own rate: counted, banned at its second refusal.
        for port in 2..4 {
            let (result, _) = through(&format!("198.51.100.1:{port}"), "x").await;
            assert_eq!(result, ("mqtt", "connect_rate"));
        }
        assert!(sec.is_banned(&addr("198.51.100.1")));
    });
}

#[test]
fn a_connect_flood_bans_the_address_until_ban_for_ends() {
    let ((), snap) = run(true, || async {
        let sec = Security::builder()
            .max_connects(3)
            .window(Duration::from_secs(10))
            .ban_for(Duration::from_secs(60))
            .build();
        for port in 0..3 {
            let r = through_security(&sec, &format!("192.0.2.7:{port}")).await;
            assert_eq!(labels(&r), ("ok", "ok"), "connect {port}");
        }
        // The fourth in the window crosses the threshold: banned, this one included.
        let r = through_security(&sec, "192.0.2.7:3").await;
        assert_eq!(labels(&r), ("security", "banned"));
        let events = sec.events(10);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].kind, EventKind::Ban);
        assert_eq!(events[0].rule.as_deref(), Some("connects"));
        assert_eq!(events[0].severity, Severity::High);
        assert_eq!(events[0].client_addr, Some("192.0.2.7:3".parse().unwrap()));
        assert_eq!(events[1].kind, EventKind::Rejection);
        let bans = sec.bans();
        assert_eq!(bans.len(), 1);
        assert_eq!(bans[0].key, addr("192.0.2.7"));
        assert_eq!(bans[0].reason, "connects");
        assert_eq!(bans[0].remaining, Duration::from_secs(60));
        // Other addresses are not affected.
        assert_eq!(
            labels(&through_security(&sec, "192.0.2.8:0").await),
            ("ok", "ok")
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            labels(&through_security(&sec, "192.0.2.7:4").await),
            ("security", "banned")
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!sec.is_banned(&addr("192.0.2.7")));
        assert!(sec.bans().is_empty());
        assert_eq!(
            labels(&through_security(&sec, "192.0.2.7:5").await),
            ("ok", "ok")
        );
    });
    let c = capture(&snap);
    assert_eq!(
        c.counter(m::BANS_TOTAL, &[("key", "addr"), ("cause", "connects")]),
        1
    );
    assert_eq!(
        c.counter(m::EVENTS_TOTAL, &[("kind", "ban"), ("severity", "high")]),
        1
    );
    assert_eq!(c.gauge(m::BANS), Some(0.0), "the expired ban is gone");
}

/// A session from `peer` that stays open until a ban closes it.
fn open_session(sec: &Security, peer: &str) -> tokio::task::JoinHandle<Result<(), BoxError>> {
    let inner = service_fn(|_: Conn<DuplexStream>| std::future::pending::<io::Result<()>>());
    let (client, server) = tokio::io::duplex(64);
    let session = sec.layer().layer(inner).oneshot(conn(server, peer));
    tokio::spawn(async move {
        let _client = client;
        session.await
    })
}

/// Asserts that `session` ends, closed by a ban.
async fn closed_by_ban(session: tokio::task::JoinHandle<Result<(), BoxError>>) {
    // The clock is paused and nothing else is due: a session left open would hang here.
    let err = tokio::time::timeout(Duration::from_secs(1), session)
        .await
        .expect("the open session was closed")
        .unwrap()
        .unwrap_err();
    assert_eq!(label_of(&*err), ("security", "closed_by_ban"));
}

/// Four connects from four addresses of one network (as `key_by` keys them) cross a
/// threshold of 3, as four from one address would: the network is banned and listed as
/// `listed`, every address in it refused, and the session still open from the first
/// closed; `next`, in the next network, is served.
async fn a_rotating_client_is_banned_as_one(
    key_by: KeyBy,
    peers: [&str; 4],
    next: &str,
    listed: &str,
) {
    let sec = Security::builder().max_connects(3).key_by(key_by).build();
    let open = open_session(&sec, peers[0]);
    tokio::task::yield_now().await;
    assert_eq!(sec.open_connections(), 1);
    for peer in &peers[1..3] {
        assert_eq!(labels(&through_security(&sec, peer).await), ("ok", "ok"));
    }
    let r = through_security(&sec, peers[3]).await;
    assert_eq!(labels(&r), ("security", "banned"));
    closed_by_ban(open).await;
    let bans = serde_json::to_value(sec.bans()).unwrap();
    assert_eq!(bans[0]["value"], listed, "{bans}");
    for peer in peers {
        let ip = peer.parse::<SocketAddr>().unwrap().ip();
        assert!(sec.is_banned(&sec.addr_key(ip)), "{peer}");
        let r = through_security(&sec, peer).await;
        assert_eq!(labels(&r), ("security", "banned"), "{peer}");
    }
    assert_eq!(labels(&through_security(&sec, next).await), ("ok", "ok"));
}

#[tokio::test(start_paused = true)]
async fn ipv6_clients_are_counted_banned_and_closed_by_their_64() {
    let peers = [
        "[2001:db8:0:7::1]:4000",
        "[2001:db8:0:7::2]:1000",
        "[2001:db8:0:7::3]:1000",
        "[2001:db8:0:7:ffff::4]:1000",
    ];
    let (next, listed) = ("[2001:db8:0:8::1]:1000", "2001:db8:0:7::/64");
    a_rotating_client_is_banned_as_one(KeyBy::default(), peers, next, listed).await;
}

#[tokio::test(start_paused = true)]
async fn a_client_keyed_by_its_56_cannot_rotate_64s() {
    let peers = [
        "[2001:db8:0:100::1]:4000",
        "[2001:db8:0:101::1]:1000",
        "[2001:db8:0:1fe::1]:1000",
        "[2001:db8:0:1ff:ffff::4]:1000",
    ];
    let (next, listed) = ("[2001:db8:0:200::1]:1000", "2001:db8:0:100::/56");
    a_rotating_client_is_banned_as_one(KeyBy::new(32, 56), peers, next, listed).await;
    // Its /64s are in the banned /56.
    let sec = Security::builder().key_by(KeyBy::new(32, 56)).build();
    sec.ban(
        sec.addr_key("2001:db8:0:100::1".parse().unwrap()),
        Duration::from_secs(60),
    );
    assert!(sec.is_banned(&addr("2001:db8:0:1aa::9")));
    assert!(!sec.is_banned(&addr("2001:db8:0:200::9")));
}

#[tokio::test(start_paused = true)]
async fn a_6to4_site_cannot_rotate_its_subnets_and_is_one_client_with_its_ipv4_address() {
    // The site at 192.0.2.1 (c000:0201) from three of its 65,536 subnets (a /64 each),
    // and over IPv4: one client, banned as its IPv4 address, the 6to4 session closed.
    let peers = [
        "[2002:c000:201:1::1]:4000",
        "[2002:c000:201:2::1]:1000",
        "192.0.2.1:1000",
        "[2002:c000:201:ffff::4]:1000",
    ];
    let (next, listed) = ("[2002:c000:202:1::1]:1000", "192.0.2.1/32");
    a_rotating_client_is_banned_as_one(KeyBy::default(), peers, next, listed).await;
}

#[tokio::test(start_paused = true)]
async fn teredo_clients_of_one_server_are_counted_and_banned_apart() {
    // The client behind 198.51.100.1 (inverted: 39cc:9bfe) through the Teredo servers
    // at 192.0.2.45 and 203.0.113.1, and over IPv4: one client.
    let peers = [
        "[2001:0:c000:22d:8000:f227:39cc:9bfe]:4000",
        "[2001:0:cb00:7101:0:1:39cc:9bfe]:1000",
        "198.51.100.1:1000",
        "[2001:0:c000:22d:8000:1234:39cc:9bfe]:1000",
    ];
    // Another client of the first server, behind 198.51.100.2, is served.
    let (next, listed) = (
        "[2001:0:c000:22d:8000:f227:39cc:9bfd]:1000",
        "198.51.100.1/32",
    );
    a_rotating_client_is_banned_as_one(KeyBy::default(), peers, next, listed).await;
}

#[tokio::test(start_paused = true)]
async fn nat64_clients_behind_one_translator_are_counted_and_banned_apart() {
    // Behind a translator (SIIT-DC) every IPv4 client shows in 64:ff9b::/96: the one
    // at 198.51.100.1 through it and over IPv4 is one client.
    let peers = [
        "[64:ff9b::198.51.100.1]:4000",
        "198.51.100.1:1000",
        "[64:ff9b::c633:6401]:1000",
        "[64:ff9b::198.51.100.1]:1001",
    ];
    // Another client behind the same translator, in the same /64, is served.
    let (next, listed) = ("[64:ff9b::198.51.100.2]:1000", "198.51.100.1/32");
    a_rotating_client_is_banned_as_one(KeyBy::default(), peers, next, listed).await;
}

#[tokio::test(start_paused = true)]
async fn ipv4_deny_and_exempt_entries_hold_the_6to4_and_teredo_clients_inside_them() {
    let sec = Security::builder()
        .max_connects(1)
        .deny([
            "192.0.2.0/24".parse().unwrap(),
            // The 6to4 sites of 203.0.113.0/24, as an IPv6 network.
            "2002:cb00:7100::/40".parse().unwrap(),
        ])
        .exempt(["198.51.100.0/24".parse().unwrap()])
        .build();
    for peer in [
        "[2002:c000:201:1::1]:1",             // the 6to4 site at 192.0.2.1
        "[2001:0:cb00:7101:0:1:3fff:fdfe]:1", // Teredo, behind 192.0.2.1
        "[2002:cb00:7107:9::1]:1",            // the 6to4 site at 203.0.113.7
    ] {
        let r = through_security(&sec, peer).await;
        assert_eq!(labels(&r), ("security", "denied"), "{peer}");
    }
    // The IPv6 entry holds 203.0.113.7's 6to4 addresses, not its IPv4 address.
    let r = through_security(&sec, "203.0.113.7:1").await;
    assert_eq!(labels(&r), ("ok", "ok"));
    // The 6to4 and Teredo clients inside the exempt network count toward no ban.
    for _ in 0..5 {
        for peer in [
            "[2002:c633:6401:1::1]:1",
            "[2001:0:c000:22d:8000:f227:39cc:9bfe]:1",
        ] {
            assert_eq!(labels(&through_security(&sec, peer).await), ("ok", "ok"));
        }
    }
    assert!(sec.bans().is_empty(), "{:?}", sec.bans());
}

#[tokio::test(start_paused = true)]
async fn a_network_ban_refuses_and_closes_every_address_in_it() {
    let sec = Security::default();
    let inside = open_session(&sec, "198.51.100.7:4000");
    let outside = open_session(&sec, "198.51.101.7:4000");
    let mapped = open_session(&sec, "[::ffff:198.51.100.8]:4000");
    tokio::task::yield_now().await;
    assert_eq!(sec.open_connections(), 3);
    let net = BanKey::Addr("198.51.100.0/24".parse().unwrap());
    sec.ban(net.clone(), Duration::from_secs(60));
    for session in [inside, mapped] {
        closed_by_ban(session).await;
    }
    assert_eq!(sec.open_connections(), 1);
    assert!(!outside.is_finished());
    for peer in [
        "198.51.100.1:1",
        "198.51.100.255:1",
        "[::ffff:198.51.100.2]:1",
    ] {
        let r = through_security(&sec, peer).await;
        assert_eq!(labels(&r), ("security", "banned"), "{peer}");
    }
    assert_eq!(
        labels(&through_security(&sec, "198.51.99.1:1").await),
        ("ok", "ok")
    );
    let ban = sec
        .events(10)
        .into_iter()
        .find(|e| e.kind == EventKind::Ban)
        .unwrap();
    assert!(
        ban.details.contains("addr:198.51.100.0/24 banned") && ban.details.contains("2 open"),
        "{}",
        ban.details
    );
    // A narrower key is banned by the wider ban, but lifting it lifts nothing.
    assert!(sec.is_banned(&addr("198.51.100.7")));
    assert!(!sec.unban(&addr("198.51.100.7")));
    assert!(sec.unban(&net));
    assert_eq!(
        labels(&through_security(&sec, "198.51.100.1:1").await),
        ("ok", "ok")
    );
    outside.abort();
}

#[tokio::test(start_paused = true)]
async fn an_exempt_network_counts_toward_no_ban_but_bans_still_apply_to_it() {
    // Addresses counted: an exempt one connects as often as it likes.
    let by_addr = Security::builder()
        .max_connects(2)
        .exempt(["192.0.2.0/28".parse().unwrap()])
        .build();
    for _ in 0..10 {
        let r = through_security(&by_addr, "192.0.2.7:1").await;
        assert_eq!(labels(&r), ("ok", "ok"));
    }
    for expected in [("ok", "ok"), ("ok", "ok"), ("security", "banned")] {
        let r = through_security(&by_addr, "192.0.2.77:1").await;
        assert_eq!(labels(&r), expected);
    }

    // Rejections reported by a layer inside: counted for no key of an exempt address,
    // logged all the same.
    let by_rejections = Security::builder()
        .max_rejections(1)
        .exempt(["192.0.2.0/28".parse().unwrap()])
        .build();
    for _ in 0..5 {
        let r = through_mqtt(&by_rejections, "192.0.2.7:1", malformed()).await;
        assert_eq!(labels(&r.result), ("mqtt", "malformed"));
    }
    assert_eq!(by_rejections.events_total(), 5);
    assert!(by_rejections.bans().is_empty());
    for expected in [
        ("mqtt", "malformed"),
        ("mqtt", "malformed"),
        ("security", "banned"),
    ] {
        let r = through_mqtt(&by_rejections, "192.0.2.77:1", malformed()).await;
        assert_eq!(labels(&r.result), expected);
    }

    // Client ids counted, addresses not: the third connect of a client id is answered by
    // CONNACK 0x05, where an address over the threshold would be closed unanswered.
    let sec = Security::builder()
        .max_connects(2)
        .ban_by_addr(false)
        .ban_by_client_id(true)
        .exempt(["192.0.2.0/28".parse().unwrap()])
        .build();
    // Ten connects from an exempt address do not ban the client id they give.
    for _ in 0..10 {
        let r = through_mqtt(&sec, "192.0.2.7:1", connect(false, "dev", None)).await;
        assert_eq!(labels(&r.result), ("ok", "ok"));
    }
    assert!(sec.bans().is_empty(), "{:?}", sec.bans());
    // The same client id from outside the network: counted from its first connect.
    for _ in 0..2 {
        let r = through_mqtt(&sec, "192.0.2.77:1", connect(false, "dev", None)).await;
        assert_eq!(labels(&r.result), ("ok", "ok"));
    }
    let r = through_mqtt(&sec, "192.0.2.77:1", connect(false, "dev", None)).await;
    assert_eq!(r.got, [0x20, 0x02, 0x00, 0x05]);
    assert!(sec.is_banned(&BanKey::client_id("dev")));
    // A ban of that client id refuses it at an exempt address too, and a ban by hand of
    // an exempt address refuses it.
    let r = through_mqtt(&sec, "192.0.2.8:1", connect(false, "dev", None)).await;
    assert_eq!(r.got, [0x20, 0x02, 0x00, 0x05]);
    sec.ban(addr("192.0.2.7"), Duration::from_secs(60));
    assert_eq!(
        labels(&through_security(&sec, "192.0.2.7:1").await),
        ("security", "banned")
    );
}

#[tokio::test(start_paused = true)]
async fn bans_listed_as_json_are_restored_with_their_end_and_reason() {
    let before = Security::builder().max_connects(1).build();
    for _ in 0..2 {
        let _ = through_security(&before, "192.0.2.7:1").await;
    }
    before.ban(BanKey::username("mallory"), Duration::from_secs(600));
    before.ban(
        BanKey::Addr("198.51.100.0/24".parse().unwrap()),
        Duration::from_secs(900),
    );
    let saved = serde_json::to_string(&before.bans()).unwrap();

    let after = Security::default();
    let open = open_session(&after, "198.51.100.9:4000");
    tokio::task::yield_now().await;
    let bans: Vec<Ban> = serde_json::from_str(&saved).unwrap();
    assert_eq!(after.restore(bans), 3);
    closed_by_ban(open).await;
    let listed = |sec: &Security| {
        sec.bans()
            .into_iter()
            .map(|b| (b.key.to_string(), b.reason))
            .collect::<Vec<_>>()
    };
    assert_eq!(listed(&after), listed(&before));
    for (a, b) in after.bans().iter().zip(before.bans()) {
        // The JSON keeps milliseconds.
        let apart = a
            .until
            .duration_since(b.until)
            .unwrap_or_else(|e| e.duration());
        assert!(apart < Duration::from_millis(100), "{a:?} {b:?}");
    }
    assert_eq!(after.bans()[0].reason, "connects");
    assert!(after.bans()[2].remaining <= Duration::from_secs(900));
    assert_eq!(
        labels(&through_security(&after, "192.0.2.7:1").await),
        ("security", "banned")
    );
    assert_eq!(
        after.events_total(),
        1,
        "only the refusal: a restore logs no ban"
    );

    // A ban that has ended is skipped; a record that is not a ban is refused, whole.
    let ended = r#"[{"key":"addr","value":"192.0.2.1/32","until":"2001-01-01T00:00:00Z","reason":"manual"}]"#;
    let bans: Vec<Ban> = serde_json::from_str(ended).unwrap();
    assert_eq!(Security::default().restore(bans), 0);
    let record = |key: &str, value: &str, until: &str, reason: &str| {
        format!(r#"[{{"key":"{key}","value":"{value}","until":"{until}","reason":"{reason}"}}]"#)
    };
    let later = "2099-01-01T00:00:00Z";
    for (json, why) in [
        (
            record("ip", "192.0.2.1/32", later, "manual"),
            "not addr, username or client_id",
        ),
        (record("addr", "192.0.2.1", later, "manual"), "CIDR"),
        (record("username", "u", later, "whim"), "unknown"),
        (record("username", "u", "soon", "manual"), "timestamp"),
    ] {
        let err = serde_json::from_str::<Vec<Ban>>(&json).unwrap_err();
        assert!(err.to_string().contains(why), "{json}: {err}");
    }
    let fine = record("username", "u", later, "auth_failures");
    assert_eq!(
        serde_json::from_str::<Vec<Ban>>(&fine).unwrap()[0].reason,
        "auth_failures"
    );
}

/// A host whose wall clock is behind when it reads its bans back (no hardware clock,
/// NTP not yet synced) sees every `until` far ahead: the `remaining_secs` written with
/// each ban bounds it, so a 5-minute ban stays one.
#[tokio::test(start_paused = true)]
async fn a_wall_clock_behind_at_restore_does_not_stretch_a_ban() {
    let ten_days_ahead =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(10 * 86_400));
    let json = format!(
        r#"[{{"key":"addr","value":"192.0.2.1/32","until":"{ten_days_ahead}","remaining_secs":300,"reason":"connects"}}]"#
    );
    let bans: Vec<Ban> = serde_json::from_str(&json).unwrap();
    assert_eq!(bans[0].remaining, Duration::from_secs(300));
    let sec = Security::default();
    assert_eq!(sec.restore(bans), 1);
    let listed = sec.bans();
    assert!(
        listed[0].remaining <= Duration::from_secs(300),
        "{listed:?}"
    );
    assert!(sec.is_banned(&BanKey::addr("192.0.2.1".parse().unwrap())));
    tokio::time::advance(Duration::from_secs(301)).await;
    assert!(
        !sec.is_banned(&BanKey::addr("192.0.2.1".parse().unwrap())),
        "still banned past its 300 s: {:?}",
        sec.bans()
    );
    // Without `remaining_secs` (a record written by hand), `until` alone says it.
    let json = format!(
        r#"[{{"key":"addr","value":"192.0.2.1/32","until":"{ten_days_ahead}","reason":"manual"}}]"#
    );
    let bans: Vec<Ban> = serde_json::from_str(&json).unwrap();
    assert!(bans[0].remaining > Duration::from_secs(9 * 86_400));
}

#[test]
fn a_ban_lasts_at_most_a_century_and_its_end_can_always_be_written() {
    // 8,000 years would end in the year 10026, which RFC 3339 cannot write: cut to
    // MAX_BAN, whether asked through the handle or restored from a file.
    let sec = Security::default();
    sec.ban(
        BanKey::username("u"),
        Duration::from_secs(8_000 * 365 * 86_400),
    );
    let far =
        r#"[{"key":"client_id","value":"c","until":"9999-12-31T23:59:59Z","reason":"manual"}]"#;
    assert_eq!(
        sec.restore(serde_json::from_str::<Vec<Ban>>(far).unwrap()),
        1
    );
    let json = serde_json::to_string(&sec.bans()).unwrap();
    for ban in sec.bans() {
        assert!(ban.remaining <= aegis_mqtt::security::MAX_BAN, "{ban:?}");
    }
    assert!(json.contains("\"until\":\"21"), "{json}");
}

#[test]
fn ban_changes_count_puts_lifts_and_restores_and_a_full_table_keeps_the_longest() {
    let sec = Security::builder().max_bans(2).build();
    assert_eq!(sec.ban_changes(), 0);
    sec.ban(BanKey::username("a"), Duration::from_secs(60));
    assert!(!sec.unban(&BanKey::username("nobody")));
    assert_eq!(sec.ban_changes(), 1);
    assert!(sec.unban(&BanKey::username("a")));
    assert_eq!(sec.ban_changes(), 2);
    let record = |name: &str, until: &str| {
        format!(r#"{{"key":"username","value":"{name}","until":"{until}","reason":"manual"}}"#)
    };
    // Not in order: restore puts them in place the soonest-ending first, so the full
    // table keeps the two that end last.
    let json = format!(
        "[{},{},{},{}]",
        record("longest", "2099-01-01T00:00:00Z"),
        record("long", "2095-01-01T00:00:00Z"),
        record("short", "2090-01-01T00:00:00Z"),
        record("long", "2094-01-01T00:00:00Z"),
    );
    assert_eq!(
        sec.restore(serde_json::from_str::<Vec<Ban>>(&json).unwrap()),
        4
    );
    assert_eq!(sec.ban_changes(), 6);
    let names: Vec<String> = sec.bans().iter().map(|b| b.key.to_string()).collect();
    // "short" evicted; the "long" that ends later replaced the other.
    assert_eq!(names, ["username:\"long\"", "username:\"longest\""]);
    let json = serde_json::to_string(&sec.bans()).unwrap();
    assert!(
        json.contains("\"until\":\"2095-01-01T00:00:00.000Z\""),
        "{json}"
    );
}

#[test]
fn a_denied_network_is_refused_before_anything_is_read_and_counted_not_logged() {
    let ((), snap) = run(true, || async {
        let sec = Security::builder()
            .max_connects(1)
            .deny([
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8:bad::/48".parse().unwrap(),
            ])
            // Deny wins over exempt, which spares from bans only.
            .exempt(["192.0.2.0/28".parse().unwrap()])
            .build();
        let broker = service_fn(|_: MqttIo<Probe>| async { Ok::<_, io::Error>(()) });
        let mut svc = sec
            .layer()
            .layer(MqttLayer::new(Config::new()).layer(broker));
        // 192.0.2.200 twice: over max_connects, were it counted.
        for peer in [
            "192.0.2.7:1",
            "[::ffff:192.0.2.200]:1",
            "192.0.2.200:2",
            "[2001:db8:bad:7::1]:1",
        ] {
            let (err, reads, _client) = refused_waiting(&mut svc, peer).await;
            assert_eq!(label_of(&*err), ("security", "denied"), "{peer}");
            assert_eq!(reads, 0, "{peer}: read before refusing");
        }
        let err = sec
            .refuse_banned("192.0.2.9:1".parse().unwrap())
            .unwrap_err();
        assert_eq!(label_of(&*err), ("security", "denied"));
        assert!(sec.refuse_banned("198.51.100.1:1".parse().unwrap()).is_ok());
        // Denied connects count toward no ban and log no event.
        assert!(sec.bans().is_empty());
        assert_eq!(sec.events_total(), 0);
        assert_eq!(
            labels(&through_security(&sec, "198.51.100.1:1").await),
            ("ok", "ok")
        );
    });
    let c = capture(&snap);
    assert_eq!(
        c.counter(
            REJECTIONS_TOTAL,
            &[("layer", "security"), ("reason", "denied")]
        ),
        5
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_window_starts_the_count_again() {
    let sec = Security::builder()
        .max_connects(3)
        .window(Duration::from_secs(10))
        .build();
    for _ in 0..3 {
        assert_eq!(
            labels(&through_security(&sec, "192.0.2.7:1").await),
            ("ok", "ok")
        );
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    for _ in 0..3 {
        assert_eq!(
            labels(&through_security(&sec, "192.0.2.7:1").await),
            ("ok", "ok")
        );
    }
    assert_eq!(sec.events_total(), 0);
    assert_eq!(
        labels(&through_security(&sec, "192.0.2.7:1").await),
        ("security", "banned")
    );
}

#[tokio::test(start_paused = true)]
async fn connects_count_per_client_id_across_addresses() {
    // Addresses are not counted, client ids are: a client id that connects three times
    // from three addresses is banned at the third CONNECT.
    let sec = Security::builder()
        .max_connects(2)
        .ban_by_addr(false)
        .ban_by_client_id(true)
        .build();
    for i in 1..=2 {
        let r = through_mqtt(&sec, &format!("192.0.2.{i}:1"), connect(false, "dev", None)).await;
        assert_eq!(labels(&r.result), ("ok", "ok"));
    }
    let r = through_mqtt(&sec, "192.0.2.3:1", connect(true, "dev", None)).await;
    assert_eq!(r.got, [0x20, 0x03, 0x00, 0x8A, 0x00]);
    assert_eq!(r.calls, 0);
    assert!(sec.is_banned(&BanKey::client_id("dev")));
    assert!(!sec.is_banned(&addr("192.0.2.3")));
    let ban = sec
        .events(10)
        .into_iter()
        .find(|e| e.kind == EventKind::Ban)
        .expect("a ban event");
    assert_eq!(ban.rule.as_deref(), Some("connects"));
    assert_eq!(ban.client_id.as_deref(), Some("dev"));
    // Another client id from the same address is served.
    let r = through_mqtt(&sec, "192.0.2.3:2", connect(false, "other", None)).await;
    assert_eq!(labels(&r.result), ("ok", "ok"));
}

/// By default the detector bans addresses only: a client that connects in a victim's
/// name from several addresses gets its own addresses banned, never the victim's client
/// id or username.
#[tokio::test(start_paused = true)]
async fn by_default_no_client_can_get_a_victims_name_banned() {
    let sec = Security::builder().max_connects(2).build();
    for i in 1..=3 {
        for _ in 0..3 {
            let peer = format!("192.0.2.{i}:1");
            let _ = through_mqtt(&sec, &peer, connect(false, "victim", Some("alice"))).await;
        }
    }
    assert!(!sec.is_banned(&BanKey::client_id("victim")));
    assert!(!sec.is_banned(&BanKey::username("alice")));
    assert!(sec.is_banned(&addr("192.0.2.1")), "{:?}", sec.bans());
    assert!(sec.bans().iter().all(|b| matches!(b.key, BanKey::Addr(_))));
}

#[test]
fn malformed_connects_over_max_rejections_ban_the_address() {
    let ((), snap) = run(true, || async {
        let sec = Security::builder().max_rejections(2).build();
        for port in 0..3 {
            let r = through_mqtt(&sec, &format!("192.0.2.9:{port}"), malformed()).await;
            assert_eq!(labels(&r.result), ("mqtt", "malformed"), "connect {port}");
            assert_eq!(r.calls, 0);
            assert!(r.got.is_empty(), "a malformed 3.1.1 CONNECT gets no answer");
        }
        assert!(sec.is_banned(&addr("192.0.2.9")));
        let kinds: Vec<_> = sec
            .events(10)
            .iter()
            .map(|e| (e.kind, e.layer, e.rule.as_deref().map(str::to_owned)))
            .collect();
        assert_eq!(
            kinds,
            [
                (EventKind::Rejection, "mqtt", Some("malformed".into())),
                (EventKind::Rejection, "mqtt", Some("malformed".into())),
                (EventKind::Rejection, "mqtt", Some("malformed".into())),
                (EventKind::Ban, "security", Some("rejections".into())),
            ]
        );
        let first = &sec.events(10)[0];
        assert_eq!(first.severity, Severity::Medium);
        assert!(first.details.starts_with("malformed packet"), "{first:?}");
        // Now refused before the MQTT layer reads anything.
        let r = through_mqtt(&sec, "192.0.2.9:9", malformed()).await;
        assert_eq!(labels(&r.result), ("security", "banned"));
        // Another address is still only refused by the MQTT layer.
        let r = through_mqtt(&sec, "192.0.2.10:1", malformed()).await;
        assert_eq!(labels(&r.result), ("mqtt", "malformed"));
    });
    let c = capture(&snap);
    assert_eq!(
        c.counter(m::BANS_TOTAL, &[("key", "addr"), ("cause", "rejections")]),
        1
    );
    assert_eq!(
        c.counter(
            m::EVENTS_TOTAL,
            &[
                ("kind", "rejection"),
                ("layer", "mqtt"),
                ("severity", "medium")
            ]
        ),
        4
    );
}

/// A client that does not finish its CONNECT within `MqttLayer::connect_timeout` is
/// refused as `connect_timeout`: a rejection event, counted toward `max_rejections` as
/// the MQTT layer's other rejections are. It was a plain I/O error that the security
/// layer did not see: a client could hold connections open to the deadline forever.
#[test]
fn connect_timeouts_over_max_rejections_ban_the_address() {
    let ((), snap) = run(true, || async {
        let sec = Security::builder().max_rejections(2).build();
        let inner = service_fn(|_: MqttIo<Conn<DuplexStream>>| async { Ok::<_, BoxError>(()) });
        let svc = sec.layer().layer(
            MqttLayer::default()
                .connect_timeout(Duration::from_secs(3))
                .layer(inner),
        );
        for port in 0..3 {
            let (mut client, server) = tokio::io::duplex(64);
            client
                .write_all(&connect(false, "slow", None)[..5])
                .await
                .unwrap();
            let start = tokio::time::Instant::now();
            let r = svc
                .clone()
                .oneshot(conn(server, &format!("192.0.2.11:{port}")))
                .await;
            assert_eq!(labels(&r), ("mqtt", "connect_timeout"), "connect {port}");
            assert_eq!(
                tokio::time::Instant::now().saturating_duration_since(start),
                Duration::from_secs(3)
            );
            drop(client);
        }
        assert!(sec.is_banned(&addr("192.0.2.11")));
        let kinds: Vec<_> = sec
            .events(10)
            .iter()
            .map(|e| (e.kind, e.layer, e.rule.as_deref().map(str::to_owned)))
            .collect();
        let timeout = (EventKind::Rejection, "mqtt", Some("connect_timeout".into()));
        assert_eq!(
            kinds,
            [
                timeout.clone(),
                timeout.clone(),
                timeout,
                (EventKind::Ban, "security", Some("rejections".into())),
            ]
        );
    });
    assert_eq!(
        capture(&snap).counter(
            REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", "connect_timeout")]
        ),
        3
    );
}

/// Serves one duplex connection from `peer` that sends `bytes` and closes, through
/// `SecurityLayer(sec)` and a default `MqttLayer` over a broker that answers the CONNECT
/// with `connack` (a refusal, say) and reads to the end.
async fn through_broker_answering(
    sec: &Security,
    peer: &str,
    bytes: Vec<u8>,
    connack: &'static [u8],
) -> Run {
    through_broker(sec, peer, bytes, Some(connack)).await
}

/// [`through_mqtt`] and [`through_broker_answering`]: the broker answers `connack`, or
/// with `None` accepts the CONNECT in its version.
async fn through_broker(
    sec: &Security,
    peer: &str,
    bytes: Vec<u8>,
    connack: Option<&'static [u8]>,
) -> Run {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let broker = service_fn(move |mut io: MqttIo<Conn<DuplexStream>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let answer = connack.map_or_else(|| common::connack_accepting(&io), <[u8]>::to_vec);
            io.write_all(&answer).await?;
            let mut all = Vec::new();
            io.read_to_end(&mut all).await?;
            Ok::<_, io::Error>(())
        }
    });
    let svc = SecurityLayer::new(sec.clone()).layer(MqttLayer::new(Config::new()).layer(broker));
    let (server, client_task) = common::client(1 << 16, bytes);
    let result = svc.oneshot(conn(server, peer)).await;
    Run {
        result,
        got: client_task.await.unwrap(),
        calls: calls.load(Ordering::SeqCst),
    }
}

/// `aegis_mqtt::layer::metrics::BROKER_REFUSALS_TOTAL`.
const BROKER_REFUSALS: &str = "aegis_mqtt_broker_refusals_total";

/// The broker authenticates (the gateway has no auth layer): a login it refuses for its
/// credentials is an authentication failure all the same, an event that counts toward
/// `max_auth_failures`, so a brute force through the gateway is seen and banned.
#[test]
fn a_login_the_broker_refuses_is_an_auth_failure() {
    let cases: [(bool, &'static [u8], &str); 5] = [
        (false, &[0x20, 0x02, 0x00, 0x05], "not_authorized"),
        (false, &[0x20, 0x02, 0x00, 0x04], "bad_credentials"),
        (true, &[0x20, 0x03, 0x00, 0x86, 0x00], "bad_credentials"),
        (true, &[0x20, 0x03, 0x00, 0x87, 0x00], "not_authorized"),
        (true, &[0x20, 0x03, 0x00, 0x8C, 0x00], "bad_auth_method"),
    ];
    let ((), snap) = run(true, || async {
        for (i, (v5, connack, reason)) in cases.into_iter().enumerate() {
            let sec = Security::builder().max_auth_failures(0).build();
            let peer = format!("192.0.2.{}:1000", 7 + i);
            let r =
                through_broker_answering(&sec, &peer, connect(v5, "c1", Some("alice")), connack)
                    .await;
            assert_eq!(r.calls, 1);
            assert_eq!(r.got, connack, "the broker's CONNACK reaches the client");
            assert_eq!(labels(&r.result), ("ok", "ok"), "{reason}");
            let events = sec.events(10);
            let kinds: Vec<_> = events
                .iter()
                .map(|e| (e.kind, e.layer, e.rule.as_deref().map(str::to_owned)))
                .collect();
            assert_eq!(
                kinds,
                [
                    (EventKind::AuthFailure, "mqtt", Some("denied".into())),
                    (EventKind::Ban, "security", Some("auth_failures".into())),
                ],
                "{reason}"
            );
            let e = &events[0];
            assert_eq!(e.severity, Severity::Medium);
            assert_eq!(e.client_addr, Some(peer.parse().unwrap()));
            assert_eq!(e.client_id.as_deref(), Some("c1"));
            assert_eq!(e.username.as_deref(), Some("alice"));
            assert!(e.details.contains("broker"), "{e:?}");
            assert!(
                sec.is_banned(&addr(&format!("192.0.2.{}", 7 + i))),
                "{reason}"
            );
        }
    });
    let c = capture(&snap);
    for (reason, n) in [
        ("bad_credentials", 2),
        ("not_authorized", 2),
        ("bad_auth_method", 1),
        ("other", 0),
    ] {
        assert_eq!(
            c.counter(BROKER_REFUSALS, &[("reason", reason)]),
            n,
            "{reason}"
        );
    }
    assert_eq!(
        c.counter(
            m::BANS_TOTAL,
            &[("key", "addr"), ("cause", "auth_failures")]
        ),
        5
    );
    assert_eq!(
        c.counter(
            m::EVENTS_TOTAL,
            &[
                ("kind", "auth_failure"),
                ("layer", "mqtt"),
                ("severity", "medium")
            ]
        ),
        5
    );
}

/// A broker that refuses for any other reason (it is unavailable, busy, has banned the
/// client, ...) refuses nothing of the client's credentials: counted, no auth failure.
#[test]
fn a_broker_refusal_not_about_credentials_is_counted_but_no_auth_failure() {
    let cases: [(bool, &'static [u8]); 6] = [
        (false, &[0x20, 0x02, 0x00, 0x03]),
        (false, &[0x20, 0x02, 0x00, 0x02]),
        (true, &[0x20, 0x03, 0x00, 0x88, 0x00]),
        (true, &[0x20, 0x03, 0x00, 0x89, 0x00]),
        (true, &[0x20, 0x03, 0x00, 0x8A, 0x00]),
        (true, &[0x20, 0x03, 0x00, 0x97, 0x00]),
    ];
    let ((), snap) = run(true, || async {
        let sec = Security::builder()
            .max_auth_failures(0)
            .max_rejections(0)
            .build();
        for (v5, connack) in cases {
            let r = through_broker_answering(
                &sec,
                "192.0.2.7:1000",
                connect(v5, "c1", Some("alice")),
                connack,
            )
            .await;
            assert_eq!(r.got, connack);
            assert_eq!(labels(&r.result), ("ok", "ok"), "{connack:02x?}");
        }
        assert_eq!(sec.events_total(), 0, "{:?}", sec.events(10));
        assert!(!sec.is_banned(&addr("192.0.2.7")));
        // An accepting CONNACK is no refusal.
        let r = through_mqtt(&sec, "192.0.2.7:1000", connect(false, "c1", None)).await;
        assert_eq!(labels(&r.result), ("ok", "ok"));
    });
    let c = capture(&snap);
    assert_eq!(c.counter(BROKER_REFUSALS, &[("reason", "other")]), 6);
    for reason in ["bad_credentials", "not_authorized", "bad_auth_method"] {
        assert_eq!(c.counter(BROKER_REFUSALS, &[("reason", reason)]), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn the_handle_adds_lists_and_removes_bans() {
    let sec = Security::default();
    assert!(sec.bans().is_empty());
    sec.ban(addr("::ffff:192.0.2.1"), Duration::from_secs(30));
    sec.ban(BanKey::username("bob"), Duration::from_secs(10));
    sec.ban(BanKey::client_id("c1"), Duration::from_secs(20));
    // IPv4-mapped addresses are their IPv4 address.
    assert!(sec.is_banned(&addr("192.0.2.1")));
    assert!(sec.is_banned(&addr("::ffff:192.0.2.1")));
    assert!(!sec.is_banned(&addr("192.0.2.2")));
    assert!(!sec.is_banned(&BanKey::username("c1")), "keys are typed");
    let listed: Vec<_> = sec.bans().into_iter().map(|b| b.key).collect();
    assert_eq!(
        listed,
        [
            BanKey::username("bob"),
            BanKey::client_id("c1"),
            addr("192.0.2.1")
        ],
        "soonest-ending first"
    );
    assert!(sec.unban(&BanKey::client_id("c1")));
    assert!(!sec.unban(&BanKey::client_id("c1")));
    assert!(!sec.is_banned(&BanKey::client_id("c1")));
    // Banning again replaces the duration.
    sec.ban(addr("192.0.2.1"), Duration::from_secs(5));
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(!sec.is_banned(&addr("192.0.2.1")));
    let listed: Vec<_> = sec.bans().into_iter().map(|b| b.key).collect();
    assert_eq!(listed, [BanKey::username("bob")]);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(sec.bans().is_empty());
    // Every ban through the handle was an event.
    let manual = sec
        .events(100)
        .iter()
        .filter(|e| e.kind == EventKind::Ban && e.rule.as_deref() == Some("manual"))
        .count();
    assert_eq!(manual, 4);
}

#[test]
fn max_bans_evicts_the_ban_that_ends_soonest() {
    let ((), snap) = run(true, || async {
        let sec = Security::builder().max_bans(2).build();
        sec.ban(addr("192.0.2.1"), Duration::from_secs(30));
        sec.ban(addr("192.0.2.2"), Duration::from_secs(10));
        sec.ban(addr("192.0.2.3"), Duration::from_secs(20));
        let listed: Vec<_> = sec.bans().into_iter().map(|b| b.key).collect();
        assert_eq!(listed, [addr("192.0.2.3"), addr("192.0.2.1")]);
        assert!(!sec.is_banned(&addr("192.0.2.2")));
        for i in 10..100 {
            sec.ban(addr(&format!("192.0.2.{i}")), Duration::from_secs(100 + i));
        }
        assert_eq!(sec.bans().len(), 2);
        // The two that end last are kept.
        assert!(sec.is_banned(&addr("192.0.2.98")));
        assert!(sec.is_banned(&addr("192.0.2.99")));
    });
    assert_eq!(capture(&snap).gauge(m::BANS), Some(2.0));
}

#[test]
fn max_tracked_bounds_the_detector() {
    let ((), snap) = run(true, || async {
        let sec = Security::builder().max_connects(5).max_tracked(2).build();
        assert_eq!(
            labels(&through_security(&sec, "192.0.2.1:1").await),
            ("ok", "ok")
        );
        assert_eq!(
            labels(&through_security(&sec, "192.0.2.2:1").await),
            ("ok", "ok")
        );
        // The detector is full: a third address is not tracked, so never banned.
        for _ in 0..10 {
            assert_eq!(
                labels(&through_security(&sec, "192.0.2.3:1").await),
                ("ok", "ok")
            );
        }
        assert!(!sec.is_banned(&addr("192.0.2.3")));
        // The tracked ones still are counted: 1 + 5 is over 5.
        for _ in 0..4 {
            assert_eq!(
                labels(&through_security(&sec, "192.0.2.1:1").await),
                ("ok", "ok")
            );
        }
        assert_eq!(
            labels(&through_security(&sec, "192.0.2.1:1").await),
            ("security", "banned")
        );
        // Its window was dropped with the ban: there is room for a new key again.
        for _ in 0..5 {
            assert_eq!(
                labels(&through_security(&sec, "192.0.2.3:1").await),
                ("ok", "ok")
            );
        }
        assert_eq!(
            labels(&through_security(&sec, "192.0.2.3:1").await),
            ("security", "banned")
        );
    });
    assert_eq!(capture(&snap).counter(m::UNTRACKED_TOTAL, &[]), 10);
}

#[tokio::test(start_paused = true)]
async fn the_event_log_is_bounded_and_serializes_its_schema() {
    let sec = Security::builder().events_capacity(3).build();
    for i in 1..=4 {
        sec.ban(addr(&format!("192.0.2.{i}")), Duration::from_secs(60));
    }
    // A connection's event, with its address and ids.
    let r = through_mqtt(&sec, "192.0.2.1:4000", connect(false, "c\"1", Some("u"))).await;
    assert_eq!(labels(&r.result), ("security", "banned"));
    assert_eq!(sec.events_total(), 5);
    let seqs: Vec<u64> = sec.events(10).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [3, 4, 5], "the latest three, oldest first");
    let seqs: Vec<u64> = sec.events(2).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [4, 5]);
    assert!(sec.events(0).is_empty());

    let events = sec.events(2);
    let ban = serde_json::to_value(&events[0]).unwrap();
    let obj = ban.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "client_addr",
            "client_id",
            "details",
            "kind",
            "layer",
            "rule",
            "seq",
            "severity",
            "time",
            "username"
        ]
    );
    assert_eq!(ban["seq"], 4);
    assert_eq!(ban["kind"], "ban");
    assert_eq!(ban["layer"], "security");
    assert_eq!(ban["severity"], "high");
    assert_eq!(ban["rule"], "manual");
    assert_eq!(ban["client_addr"], serde_json::Value::Null);
    assert_eq!(ban["client_id"], serde_json::Value::Null);
    assert_eq!(
        ban["details"],
        "addr:192.0.2.4/32 banned for 60s through the handle"
    );
    // RFC 3339, UTC, milliseconds: 2026-11-26T01:02:03.456Z.
    let time = ban["time"].as_str().unwrap();
    assert_eq!(time.len(), 24, "{time}");
    assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
    assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");

    let rejection = serde_json::to_value(&events[1]).unwrap();
    assert_eq!(rejection["kind"], "rejection");
    assert_eq!(rejection["client_addr"], "192.0.2.1:4000");
    assert_eq!(rejection["rule"], "banned");
    // Refused before the CONNECT was read: no client id yet.
    assert_eq!(rejection["client_id"], serde_json::Value::Null);

    // Bans serialize as key, value, until, remaining_secs, reason.
    let bans = serde_json::to_value(sec.bans()).unwrap();
    assert_eq!(bans[0]["key"], "addr");
    assert_eq!(bans[0]["value"], "192.0.2.1/32");
    assert_eq!(bans[0]["remaining_secs"], 60);
    assert_eq!(bans[0]["reason"], "manual");
    assert!(humantime::parse_rfc3339(bans[0]["until"].as_str().unwrap()).is_ok());
    assert_eq!(
        serde_json::to_value(BanKey::username("u\n")).unwrap(),
        serde_json::json!({"key": "username", "value": "u\n"})
    );
}

#[tokio::test(start_paused = true)]
async fn a_connection_event_has_the_client_id_and_username() {
    // A malformed packet after an accepted CONNECT: the rejection event names the client.
    let sec = Security::default();
    let bytes = [
        connect(false, "dev\"42", Some("bob")),
        // SUBSCRIBE with packet id 0, which [MQTT-2.3.1-1] forbids.
        vec![0x82, 0x06, 0, 0, 0, 1, b'a', 0],
    ]
    .concat();
    let r = through_mqtt(&sec, "192.0.2.7:1000", bytes).await;
    assert_eq!(r.calls, 1);
    // The broker's read failed with the MQTT layer's rejection inside an IO error.
    let err = r.result.unwrap_err();
    let mqtt = find::<MqttError>(&*err).expect("an MQTT rejection");
    let e = sec.events(1).pop().expect("a rejection event");
    assert_eq!(e.kind, EventKind::Rejection);
    assert_eq!(e.layer, "mqtt");
    assert_eq!(e.rule.as_deref(), Some(mqtt.label()));
    assert_eq!(e.details, mqtt.to_string());
    assert_eq!(e.client_id.as_deref(), Some("dev\"42"));
    assert_eq!(e.username.as_deref(), Some("bob"));
    assert_eq!(sec.events_total(), 1);
}

#[test]
fn every_event_is_a_tracing_event_with_the_stable_fields() {
    // The other tests of this binary emit the same callsites on other threads, with no
    // subscriber: `capture_logs` makes tracing ask its subscriber too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let ((), text) = capture_logs(tracing::Level::INFO, || {
        rt.block_on(async {
            let sec = Security::default();
            sec.ban(BanKey::client_id("dev\"42"), Duration::from_secs(60));
            let r = through_mqtt(
                &sec,
                "192.0.2.7:1000",
                connect(false, "dev\"42", Some("bob")),
            )
            .await;
            assert_eq!(labels(&r.result), ("mqtt", "banned"));
            let r = through_mqtt(&sec, "192.0.2.7:1001", malformed()).await;
            assert_eq!(labels(&r.result), ("mqtt", "malformed"));
        });
    });
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("aegis::security") && l.contains("security event"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let ban = lines[0];
    assert!(ban.contains("WARN"), "{ban}");
    for field in [
        "kind=\"ban\"",
        "layer=\"security\"",
        "severity=\"high\"",
        "rule=\"manual\"",
        r#"details="client_id:\"dev\\\"42\" banned for 60s through the handle""#,
    ] {
        assert!(ban.contains(field), "{field} in {ban}");
    }
    assert!(
        !ban.contains("client_addr="),
        "no address for a manual ban: {ban}"
    );
    let banned = lines[1];
    for field in [
        "WARN",
        "kind=\"rejection\"",
        "layer=\"mqtt\"",
        "rule=\"banned\"",
        "client_addr=192.0.2.7:1000",
        r#"client_id="dev\"42""#,
        r#"username="bob""#,
    ] {
        assert!(banned.contains(field), "{field} in {banned}");
    }
    let malformed = lines[2];
    assert!(malformed.contains("INFO"), "{malformed}");
    assert!(malformed.contains("severity=\"medium\""), "{malformed}");
    assert!(malformed.contains("rule=\"malformed\""), "{malformed}");
    assert!(!malformed.contains("client_id="), "{malformed}");
}

#[tokio::test]
async fn a_banned_address_is_closed_on_a_real_socket() {
    let sec = Security::default();
    sec.ban(addr("127.0.0.1"), Duration::from_secs(600));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&served);
    let inner = service_fn(move |mut io: Conn<TcpStream>| {
        count.fetch_add(1, Ordering::SeqCst);
        async move { io.write_all(b"hello").await }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let accept_loop = tokio::spawn(
        serve(listener, sec.layer().layer(inner))
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .into_future(),
    );
    let guard = Duration::from_secs(10);
    let mut s = TcpStream::connect(local).await.unwrap();
    let client: SocketAddr = s.local_addr().unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(guard, s.read_to_end(&mut got))
        .await
        .expect("closed at once")
        .unwrap();
    assert!(got.is_empty());
    assert_eq!(served.load(Ordering::SeqCst), 0);
    let e = sec.events(1).pop().unwrap();
    assert_eq!(e.rule.as_deref(), Some("banned"));
    assert_eq!(e.client_addr, Some(client));

    assert!(sec.unban(&addr("127.0.0.1")));
    let mut s = TcpStream::connect(local).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(guard, s.read_to_end(&mut got))
        .await
        .expect("served")
        .unwrap();
    assert_eq!(got, b"hello");
    assert_eq!(served.load(Ordering::SeqCst), 1);
    stop_tx.send(()).unwrap();
    assert!(accept_loop.await.unwrap().drained());
}

#[tokio::test(start_paused = true)]
async fn refusals_under_a_client_id_ban_are_logged_once_a_second() {
    let sec = Security::default();
    sec.ban(BanKey::client_id("loop"), Duration::from_secs(60));
    for port in 0..5 {
        let run = through_mqtt(
            &sec,
            &format!("192.0.2.30:{port}"),
            connect(false, "loop", None),
        )
        .await;
        assert_eq!(run.got, [0x20, 0x02, 0x00, 0x05], "every one is refused");
        assert_eq!(labels(&run.result), ("mqtt", "banned"));
    }
    let banned = |events: &[aegis_mqtt::security::Event]| {
        events
            .iter()
            .filter(|e| e.rule.as_deref() == Some("banned"))
            .count()
    };
    assert_eq!(banned(&sec.events(100)), 1, "{:?}", sec.events(100));
    assert_eq!(sec.events(1)[0].details, "banned");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run = through_mqtt(&sec, "192.0.2.30:9", connect(false, "loop", None)).await;
    assert_eq!(run.got, [0x20, 0x02, 0x00, 0x05]);
    assert_eq!(banned(&sec.events(100)), 2);
    // As for an address ban, the event counts the refusals that were not logged.
    assert_eq!(
        sec.events(1)[0].details,
        "banned (4 more refusals in the last 1s not logged)"
    );
    // The next one within the second is quiet; the one after it counts just that one.
    through_mqtt(&sec, "192.0.2.30:10", connect(false, "loop", None)).await;
    assert_eq!(banned(&sec.events(100)), 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run = through_mqtt(&sec, "192.0.2.31:1", connect(true, "loop", None)).await;
    assert_eq!(labels(&run.result), ("mqtt", "banned"));
    assert_eq!(
        sec.events(1)[0].details,
        "banned (1 more refusals in the last 1s not logged)"
    );
}

#[test]
fn refuse_banned_refuses_only_banned_addresses_and_counts_nothing_toward_a_ban() {
    let ((), snap) = run(false, || async {
        let sec = Security::builder()
            .max_connects(2)
            .window(Duration::from_secs(10))
            .build();
        sec.ban(addr("127.0.0.2"), Duration::from_secs(60));
        // Ten checks of a good address: no ban, unlike ten connects through the layer.
        for port in 0..10 {
            let peer: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            assert!(sec.refuse_banned(peer).is_ok());
        }
        assert!(!sec.is_banned(&addr("127.0.0.1")));
        for peer in ["127.0.0.2:1", "[::ffff:127.0.0.2]:2"] {
            let err = sec.refuse_banned(peer.parse().unwrap()).unwrap_err();
            assert_eq!(label_of(&*err), ("security", "banned"));
        }

        // In the accept loop: the banned address never reaches the layer's service.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let inner = service_fn(move |_: Conn<TcpStream>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, io::Error>(()) }
        });
        let check = sec.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            serve(listener, sec.layer().layer(inner))
                .admit(move |peer| check.refuse_banned(peer))
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        for source in ["127.0.0.2", "127.0.0.1"] {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(format!("{source}:0").parse().unwrap()).unwrap();
            // The banned address is reset by the accept loop, possibly before `connect`
            // has returned; the other one is served (and closed by the inner service).
            match s.connect(at).await {
                Ok(mut s) => {
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                    assert!(rest.is_empty());
                }
                Err(e) => {
                    assert_eq!(source, "127.0.0.2", "{e}");
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
                }
            }
        }
        stop.send(()).unwrap();
        assert!(server.await.unwrap().drained());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "only 127.0.0.1 was served");
    });
    let got = capture(&snap);
    assert_eq!(
        got.counter(
            REJECTIONS_TOTAL,
            &[("layer", "security"), ("reason", "banned")]
        ),
        3
    );
}

#[test]
fn with_max_bans_0_crossing_a_threshold_refuses_nothing() {
    let ((), _snap) = run(true, || async {
        let sec = Security::builder()
            .max_connects(2)
            .window(Duration::from_secs(10))
            .max_bans(0)
            .build();
        // Over the threshold, but the table takes no bans: every connect is served.
        for port in 0..5 {
            let r = through_security(&sec, &format!("192.0.2.7:{port}")).await;
            assert_eq!(labels(&r), ("ok", "ok"), "connect {port}");
        }
        assert!(sec.bans().is_empty());
        assert!(
            sec.events(10).iter().all(|e| e.kind != EventKind::Ban),
            "{:?}",
            sec.events(10)
        );
    });
}

/// A broker behind the MQTT layer, on a real socket: answers the CONNECT with a CONNACK
/// and each PINGREQ with a PINGRESP, until the client closes.
async fn pinged_broker(mut io: MqttIo<Conn<TcpStream>>) -> io::Result<()> {
    let mut buf = [0; 256];
    let n = io.read(&mut buf).await?;
    assert_eq!(
        buf.get(..1),
        Some(&[0x10][..]),
        "the CONNECT comes first ({n} bytes)"
    );
    io.write_all(&[0x20, 2, 0, 0]).await?;
    loop {
        match io.read(&mut buf).await? {
            0 => return Ok(()),
            n => {
                for _ in buf[..n].chunks(2).filter(|p| *p == [0xC0, 0]) {
                    io.write_all(&[0xD0, 0]).await?;
                }
            }
        }
    }
}

const GUARD: Duration = Duration::from_secs(10);

/// `sec`'s layer over the MQTT layer over [`pinged_broker`], served on a loopback port.
struct Served {
    to: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    /// Whether the accept loop drained, once stopped.
    drained: tokio::task::JoinHandle<bool>,
}

async fn serve_pinged(sec: &Security) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = listener.local_addr().unwrap();
    let svc = sec
        .layer()
        .layer(MqttLayer::new(Config::new()).layer(service_fn(pinged_broker)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let drained = tokio::spawn(async move {
        let signal = async {
            let _ = stopped.await;
        };
        serve(listener, svc)
            .with_graceful_shutdown(signal)
            .await
            .drained()
    });
    Served { to, stop, drained }
}

/// A 3.1.1 session on a real socket from the loopback address `from` to `to`: CONNECT
/// with client id `id` (and `user`), then its CONNACK.
async fn session(to: SocketAddr, from: &str, id: &str, user: Option<&str>) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    s.write_all(&connect(false, id, user)).await.unwrap();
    let mut connack = [0; 4];
    tokio::time::timeout(GUARD, s.read_exact(&mut connack))
        .await
        .expect("a CONNACK")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    s
}

/// Whether the session is still served: a PINGREQ gets its PINGRESP.
async fn pings(s: &mut TcpStream) -> bool {
    if s.write_all(&[0xC0, 0]).await.is_err() {
        return false;
    }
    let mut resp = [0; 2];
    matches!(
        tokio::time::timeout(GUARD, s.read_exact(&mut resp)).await,
        Ok(Ok(_))
    ) && resp == [0xD0, 0]
}

/// Waits for the end of the session (EOF, or a reset) and returns what came before it.
async fn closed(s: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(GUARD, s.read_to_end(&mut rest))
        .await
        .expect("the session is closed");
    rest
}

#[test]
fn a_ban_closes_the_open_sessions_it_matches_and_no_other() {
    let ((), snap) = run(false, || async {
        let sec = Security::default();
        let served = serve_pinged(&sec).await;
        let to = served.to;
        let mut a = session(to, "127.0.0.1", "a", None).await;
        let mut b = session(to, "127.0.0.1", "b", Some("bob")).await;
        let mut c = session(to, "127.0.0.2", "c", None).await;
        let mut d = session(to, "127.0.0.1", "d", Some("dave")).await;
        assert_eq!(sec.open_connections(), 4);

        // Each key closes its own session, and leaves the others served.
        sec.ban(BanKey::client_id("a"), Duration::from_secs(600));
        assert!(closed(&mut a).await.is_empty());
        assert!(pings(&mut b).await && pings(&mut c).await && pings(&mut d).await);
        sec.ban(BanKey::username("bob"), Duration::from_secs(600));
        assert!(closed(&mut b).await.is_empty());
        assert!(pings(&mut c).await && pings(&mut d).await);
        sec.ban(addr("127.0.0.2"), Duration::from_secs(600));
        assert!(closed(&mut c).await.is_empty());
        assert!(pings(&mut d).await);

        // The ban events say what each closed; a ban that matches no open session too.
        sec.ban(BanKey::client_id("nobody"), Duration::from_secs(600));
        let details: Vec<String> = sec
            .events(10)
            .into_iter()
            .filter(|e| e.kind == EventKind::Ban)
            .map(|e| e.details)
            .collect();
        assert_eq!(details.len(), 4, "{details:?}");
        for d in &details[..3] {
            assert!(d.ends_with("; 1 open connection(s) closed"), "{d}");
        }
        assert!(!details[3].contains("closed"), "{}", details[3]);

        // The session left is served to its end; then none is kept.
        assert!(pings(&mut d).await);
        drop(d);
        served.stop.send(()).unwrap();
        assert!(served.drained.await.unwrap());
        assert_eq!(sec.open_connections(), 0);
    });
    let c = capture(&snap);
    assert_eq!(
        c.counter(
            REJECTIONS_TOTAL,
            &[("layer", "security"), ("reason", "closed_by_ban")]
        ),
        3
    );
    assert_eq!(
        c.counter(m::BANS_TOTAL, &[("key", "client_id"), ("cause", "manual")]),
        2
    );
}

/// An empty client id or username is no one's: every 3.1.1 clean session and MQTT 5
/// client asking for a server-assigned id has one. A ban of it (a mistaken script on the
/// admin endpoint, say) must neither close their open sessions nor refuse the next.
#[tokio::test]
async fn a_ban_of_an_empty_client_id_or_username_closes_and_refuses_no_one() {
    let sec = Security::default();
    let served = serve_pinged(&sec).await;
    let mut open = session(served.to, "127.0.0.1", "", Some("")).await;
    sec.ban(BanKey::client_id(""), Duration::from_secs(600));
    sec.ban(BanKey::username(""), Duration::from_secs(600));
    assert!(pings(&mut open).await, "the open session is left alone");
    // `session` asserts an accepting CONNACK.
    let mut next = session(served.to, "127.0.0.1", "", Some("")).await;
    assert!(pings(&mut next).await);
}

#[tokio::test]
async fn with_close_on_ban_off_a_ban_leaves_open_sessions_alone() {
    let sec = Security::builder().close_on_ban(false).build();
    // Kept to the end: dropping its stop would stop the loop.
    let served = serve_pinged(&sec).await;
    let to = served.to;
    let mut s = session(to, "127.0.0.1", "a", None).await;
    assert_eq!(sec.open_connections(), 0, "nothing kept to close");
    sec.ban(BanKey::client_id("a"), Duration::from_secs(600));
    sec.ban(addr("127.0.0.1"), Duration::from_secs(600));
    assert!(pings(&mut s).await);
    // New sessions are refused all the same: the address is refused at once.
    let mut refused = TcpStream::connect(to).await.unwrap();
    assert!(closed(&mut refused).await.is_empty());
}

#[tokio::test]
async fn a_client_id_over_max_connects_is_refused_at_its_connect_and_closed_where_open() {
    // The second CONNECT of "dev" crosses the threshold of 1: it gets its CONNACK
    // refusal, and the first session of "dev", open, is closed.
    let sec = Security::builder()
        .max_connects(1)
        .ban_by_addr(false)
        .ban_by_client_id(true)
        .build();
    // Kept to the end: dropping its stop would stop the loop.
    let served = serve_pinged(&sec).await;
    let to = served.to;
    let mut first = session(to, "127.0.0.1", "dev", None).await;
    let mut other = session(to, "127.0.0.1", "other", None).await;
    let mut second = TcpStream::connect(to).await.unwrap();
    second
        .write_all(&connect(false, "dev", None))
        .await
        .unwrap();
    assert_eq!(closed(&mut second).await, [0x20, 0x02, 0x00, 0x05]);
    assert!(closed(&mut first).await.is_empty());
    assert!(pings(&mut other).await);
    let ban = sec
        .events(10)
        .into_iter()
        .find(|e| e.kind == EventKind::Ban)
        .expect("a ban event");
    assert!(
        ban.details.ends_with("; 1 open connection(s) closed"),
        "{ban:?}"
    );
}

/// Bans and lifts of addresses and client ids while sessions start, send their CONNECT
/// and end on two worker threads: every session ends (closed by a ban, refused, or to
/// its end), nothing deadlocks, and no open connection is left kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_while_sessions_come_and_go_leave_nothing_kept() {
    let sec = Security::default();
    let broker = service_fn(|mut io: MqttIo<Conn<DuplexStream>>| async move {
        let mut buf = [0; 256];
        let _ = io.read(&mut buf).await?;
        io.write_all(&[0x20, 2, 0, 0]).await?;
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.map(drop)
    });
    let svc = sec
        .layer()
        .layer(MqttLayer::new(Config::new()).layer(broker));
    let sessions = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..2_000_u32 {
            let svc = svc.clone();
            tasks.spawn(async move {
                let (mut client, server) = tokio::io::duplex(1024);
                let peer = format!("192.0.2.{}:{}", i % 8 + 1, 1000 + i);
                let conn = tokio::spawn(svc.oneshot(conn(server, &peer)));
                let id = format!("c{}", i % 10);
                let _ = client.write_all(&connect(false, &id, None)).await;
                let mut connack = [0; 4];
                let _ = client.read_exact(&mut connack).await;
                tokio::task::yield_now().await;
                drop(client);
                labels(&conn.await.unwrap())
            });
        }
        let mut ended_by_bans = 0;
        while let Some(done) = tasks.join_next().await {
            let (layer, reason) = done.unwrap();
            if reason == "banned" || reason == "closed_by_ban" {
                ended_by_bans += 1;
            } else {
                assert_eq!((layer, reason), ("ok", "ok"));
            }
        }
        ended_by_bans
    });
    let banning = {
        let sec = sec.clone();
        let sessions_done = sessions.abort_handle();
        tokio::spawn(async move {
            let mut round = 0_u32;
            while !sessions_done.is_finished() {
                let key = if round.is_multiple_of(2) {
                    BanKey::client_id(&format!("c{}", round % 10))
                } else {
                    addr(&format!("192.0.2.{}", round % 8 + 1))
                };
                sec.ban(key.clone(), Duration::from_secs(60));
                tokio::task::yield_now().await;
                assert!(sec.unban(&key));
                round += 1;
            }
        })
    };
    let ended_by_bans = tokio::time::timeout(GUARD, async {
        let ended_by_bans = sessions.await.unwrap();
        banning.await.unwrap();
        ended_by_bans
    })
    .await
    .expect("every session ended and every ban was lifted");
    assert!(ended_by_bans > 0, "the bans ran beside the sessions");
    assert_eq!(sec.open_connections(), 0);
}
