//! Tests of the rate-limiting layer, with paused tokio time.
#![cfg(feature = "rate-limit")]

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use aegis_core::error::{find, label_of};
use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::metrics::testing::{Captured, capture, run, run_watching};
use aegis_core::{BoxError, Conn};
use aegis_layers::rate_limit::{
    KeyBy, KeyedLimiter, MAX_BURST_REFILL, Quota, RateLimitLayer, RateLimited, metrics as m,
};
use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt, service_fn};

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn conn(ip: &str) -> Conn<()> {
    let peer = SocketAddr::new(ip.parse().unwrap(), 40_000);
    Conn::new((), peer, "127.0.0.1:1883".parse().unwrap())
}

fn ok_service() -> impl Service<Conn<()>, Response = (), Error = BoxError, Future: Send> + Clone {
    service_fn(|_: Conn<()>| async { Ok::<_, BoxError>(()) })
}

/// Sends one connection through `svc`; `Err` carries the rejection's reason label.
async fn try_conn<S>(svc: &mut S, ip: &str) -> Result<(), &'static str>
where
    S: Service<Conn<()>, Response = (), Error = BoxError>,
{
    match svc.ready().await.unwrap().call(conn(ip)).await {
        Ok(()) => Ok(()),
        Err(e) => {
            assert!(find::<RateLimited>(&*e).is_some(), "{e}");
            let (layer, reason) = label_of(&*e);
            assert_eq!(layer, "rate_limit");
            Err(reason)
        }
    }
}

fn rejections(c: &aegis_core::metrics::testing::Captured, reason: &str) -> u64 {
    c.counter(
        REJECTIONS_TOTAL,
        &[("layer", "rate_limit"), ("reason", reason)],
    )
}

#[test]
fn global_tier_limits_all_clients_together() {
    let ((), snap) = run(true, || async {
        let layer = RateLimitLayer::builder()
            .global(Quota::per_second(nz(2)))
            .build();
        let mut svc = layer.layer(ok_service());
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.3").await, Err("global"));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.3").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.4").await, Err("global"));
    });
    let c = capture(&snap);
    assert_eq!(rejections(&c, "global"), 2);
    assert_eq!(rejections(&c, "per_client"), 0);
}

#[test]
fn per_client_tier_limits_each_client_alone() {
    let ((), snap) = run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(2)))
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
        // Another client has its own budget.
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(handle.tracked_clients(), 2);
        // One connection every 500 ms comes back.
        tokio::time::advance(Duration::from_millis(499)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
    });
    assert_eq!(rejections(&capture(&snap), "per_client"), 3);
}

#[test]
fn tiers_stack_and_per_client_is_checked_before_global() {
    let ((), snap) = run(true, || async {
        let layer = RateLimitLayer::builder()
            .global(Quota::per_second(nz(3)))
            .per_client(Quota::per_second(nz(1)))
            .build();
        let mut svc = layer.layer(ok_service());
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        // A client's flood is refused per client and leaves the global budget intact.
        for _ in 0..10 {
            assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
        }
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.3").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.4").await, Err("global"));
    });
    let c = capture(&snap);
    assert_eq!(rejections(&c, "per_client"), 10);
    assert_eq!(rejections(&c, "global"), 1);
}

#[test]
fn a_connection_the_global_tier_refuses_has_spent_its_per_client_cell() {
    // Documented, not refunded: see the module docs' "Tiers".
    let ((), _) = run(true, || async {
        let layer = RateLimitLayer::builder()
            .global(Quota::per_second(nz(1)))
            .per_client(Quota::per_minute(nz(1)))
            .build();
        let mut svc = layer.layer(ok_service());
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Err("global"));
        tokio::time::advance(Duration::from_secs(1)).await;
        // The global tier has room again, but .2's one connection a minute is gone.
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Err("per_client"));
        assert_eq!(try_conn(&mut svc, "192.0.2.3").await, Ok(()));
    });
}

/// A service whose connections last until the test sends on their channel.
fn held_service(
    tx: tokio::sync::mpsc::UnboundedSender<oneshot::Sender<()>>,
) -> impl Service<Conn<()>, Response = (), Error = BoxError, Future: Send> + Clone {
    service_fn(move |_: Conn<()>| {
        let (done_tx, done_rx) = oneshot::channel();
        tx.send(done_tx).unwrap();
        async move {
            let _ = done_rx.await;
            Ok::<_, BoxError>(())
        }
    })
}

#[test]
fn concurrency_slot_is_released_on_completion_and_on_drop() {
    let ((), snap) = run(true, || async {
        let layer = RateLimitLayer::builder()
            .max_concurrent_per_client(2)
            .build();
        let handle = layer.handle();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut svc = layer.layer(held_service(tx));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();

        let mut first = Box::pin(svc.ready().await.unwrap().call(conn("192.0.2.1")));
        let second = svc.ready().await.unwrap().call(conn("192.0.2.1"));
        assert_eq!(handle.open_connections(ip), 2);
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("concurrency"));
        // Other clients are not affected.
        let other = svc.ready().await.unwrap().call(conn("192.0.2.2"));
        assert_eq!(handle.clients_connected(), 2);

        // Completion frees the slot, even while the finished future is still held.
        let done_first = rx.recv().await.unwrap();
        done_first.send(()).unwrap();
        first.as_mut().await.unwrap();
        assert_eq!(handle.open_connections(ip), 1);
        let third = svc.ready().await.unwrap().call(conn("192.0.2.1"));
        assert_eq!(handle.open_connections(ip), 2);
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("concurrency"));

        // Dropping (cancelling) a connection's future frees its slot too.
        drop(second);
        assert_eq!(handle.open_connections(ip), 1);
        drop(third);
        drop(other);
        assert_eq!(handle.open_connections(ip), 0);
        assert_eq!(
            handle.clients_connected(),
            0,
            "no entry outlives its connections"
        );
        drop(first);
    });
    assert_eq!(rejections(&capture(&snap), "concurrency"), 2);
}

#[test]
fn a_connection_refused_by_a_rate_gives_its_concurrency_slot_back() {
    run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(1)))
            .max_concurrent_per_client(5)
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
        assert_eq!(handle.open_connections("192.0.2.1".parse().unwrap()), 0);
    });
}

#[test]
fn ipv6_clients_are_grouped_by_64_so_rotation_does_not_escape() {
    let ((), snap) = run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(3)))
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        // A host rotating through its /64: every address is a new one, the key is not.
        for i in 1..=3 {
            let ip = format!("2001:db8:1:2:{i:x}::{i:x}");
            assert_eq!(try_conn(&mut svc, &ip).await, Ok(()), "{ip}");
        }
        for i in 4..100 {
            let ip = format!("2001:db8:1:2:{i:x}:{i:x}:{i:x}:{i:x}");
            assert_eq!(try_conn(&mut svc, &ip).await, Err("per_client"), "{ip}");
        }
        assert_eq!(handle.tracked_clients(), 1);
        // The neighbouring /64 is another client.
        assert_eq!(try_conn(&mut svc, "2001:db8:1:3::1").await, Ok(()));
        assert_eq!(handle.tracked_clients(), 2);
    });
    assert_eq!(rejections(&capture(&snap), "per_client"), 96);
}

#[test]
fn ipv6_prefix_is_configurable() {
    run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(1)))
            .key_by(KeyBy::new(32, 128))
            .build();
        let mut svc = layer.layer(ok_service());
        assert_eq!(try_conn(&mut svc, "2001:db8::1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "2001:db8::2").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "2001:db8::1").await, Err("per_client"));
    });
}

#[test]
fn ipv4_mapped_ipv6_is_the_same_client_as_ipv4() {
    run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(2)))
            .max_concurrent_per_client(10)
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "::ffff:192.0.2.1").await, Ok(()));
        assert_eq!(
            try_conn(&mut svc, "::ffff:192.0.2.1").await,
            Err("per_client")
        );
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
        assert_eq!(handle.tracked_clients(), 1);
    });
}

#[test]
fn a_6to4_site_is_one_client_over_every_subnet_and_over_ipv4() {
    let ((), snap) = run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(2)))
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        // The site at 192.0.2.1 (c000:0201) rotates its subnets, a /64 each: the
        // second connect spends its burst, the third is refused, from any subnet or
        // over IPv4.
        assert_eq!(try_conn(&mut svc, "2002:c000:201:1::1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "2002:c000:201:2::1").await, Ok(()));
        for ip in ["2002:c000:201:3::1", "2002:c000:201:ffff::1", "192.0.2.1"] {
            assert_eq!(try_conn(&mut svc, ip).await, Err("per_client"), "{ip}");
        }
        assert_eq!(handle.tracked_clients(), 1);
        // The next site is another client.
        assert_eq!(try_conn(&mut svc, "2002:c000:202:1::1").await, Ok(()));
    });
    assert_eq!(rejections(&capture(&snap), "per_client"), 3);
}

#[test]
fn teredo_clients_of_one_server_are_limited_apart() {
    run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(1)))
            .max_concurrent_per_client(10)
            .build();
        let mut svc = layer.layer(ok_service());
        // The Teredo server at 192.0.2.45 (c000:022d) serves clients behind
        // 198.51.100.1 and 198.51.100.2 (inverted in the last 32 bits), in one /64.
        let first = "2001:0:c000:22d:8000:f227:39cc:9bfe";
        assert_eq!(try_conn(&mut svc, first).await, Ok(()));
        assert_eq!(try_conn(&mut svc, first).await, Err("per_client"));
        let second = "2001:0:c000:22d:8000:f227:39cc:9bfd";
        assert_eq!(try_conn(&mut svc, second).await, Ok(()));
        // The first client over IPv4 is the same client.
        assert_eq!(try_conn(&mut svc, "198.51.100.1").await, Err("per_client"));
    });
}

/// With every slot taken, a new client is limited in the shared overflow bucket, and a
/// refusal there is `overflow`, not `per_client`: other clients drained that budget, so
/// it says nothing of this client's own rate (a ban detector must not count it). A
/// tracked client over its own budget is still `per_client`. Before, both were
/// `per_client`.
#[test]
fn a_refusal_by_the_overflow_bucket_is_overflow_not_per_client() {
    let ((), snap) = run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(1)).allow_burst(nz(2)))
            .max_keys(2)
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        for ip in ["192.0.2.1", "192.0.2.2"] {
            assert_eq!(try_conn(&mut svc, ip).await, Ok(()));
        }
        assert_eq!(handle.tracked_clients(), 2);
        // The flood: new clients drain the shared bucket's burst of 2.
        assert_eq!(try_conn(&mut svc, "198.51.100.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "198.51.100.2").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "198.51.100.3").await, Err("overflow"));
        // A new client that never connected before is refused by the others' use.
        assert_eq!(try_conn(&mut svc, "203.0.113.9").await, Err("overflow"));
        assert_eq!(handle.tracked_clients(), 2);
        // A tracked client over its own burst is refused for its own rate.
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
    });
    let c = capture(&snap);
    assert_eq!(rejections(&c, "overflow"), 2);
    assert_eq!(rejections(&c, "per_client"), 1);
}

/// [`Throttled::overflow`](aegis_layers::rate_limit::Throttled::overflow) tells the
/// overflow bucket's refusals from a key's own, for `check` and `check_n`.
#[test]
fn keyed_limiter_tells_an_overflow_refusal_from_the_keys_own() {
    run(true, || async {
        let limiter = KeyedLimiter::new(Quota::per_second(nz(1)).allow_burst(nz(3)), 1, "of");
        assert!(limiter.check(&1_u8).is_ok());
        assert!(limiter.check_n(&1_u8, nz(2)).is_ok());
        let own = limiter.check(&1_u8).unwrap_err();
        assert!(!own.overflow());
        // 2 is new, and the one slot is taken: the overflow bucket decides.
        assert!(limiter.check_n(&2_u8, nz(3)).is_ok());
        assert!(limiter.check(&2_u8).unwrap_err().overflow());
        assert!(limiter.check_n(&3_u8, nz(2)).unwrap_err().overflow());
        // A check the overflow bucket admitted leaves no trace on the next refusal.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(limiter.check(&1_u8).is_ok());
        assert!(limiter.check(&3_u8).is_ok());
        assert!(!limiter.check(&1_u8).unwrap_err().overflow());
        // More cells than any burst: no budget could take them, no overflow.
        assert!(!limiter.check_n(&4_u8, nz(4)).unwrap_err().overflow());
    });
}

#[test]
fn a_flood_of_a_million_addresses_stays_under_the_key_cap() {
    const CAP: usize = 1_000;
    const FLOOD: u32 = 1_000_000;
    let ((), snap) = run(true, || async {
        let limiter = KeyedLimiter::new(Quota::per_minute(nz(2)), CAP, "flood");
        let known = IpAddr::from([198, 51, 100, 1]);
        assert!(limiter.check(&known).is_ok());
        let mut allowed = 0_usize;
        for i in 0..FLOOD {
            let ip = IpAddr::from((0x0a00_0000_u32 + i).to_be_bytes());
            if limiter.check(&ip).is_ok() {
                allowed += 1;
            }
            assert!(limiter.len() <= CAP);
        }
        assert_eq!(limiter.len(), CAP);
        // CAP - 1 new keys got their own burst of 2 (one used each); the rest shared one
        // overflow bucket, which admitted its burst of 2 in all.
        assert_eq!(allowed, CAP - 1 + 2);
        // The client known before the flood still has its own second connection.
        assert!(limiter.check(&known).is_ok());
        assert!(limiter.check(&known).is_err());
    });
    let c = capture(&snap);
    let over = c.counter(m::OVERFLOW_TOTAL, &[("limiter", "flood")]);
    assert_eq!(over, u64::from(FLOOD) - (CAP as u64 - 1));
}

/// The keys gauge follows the store: 2, then 1 after the first eviction, then 0. Each
/// read is one capture, which drains what it reads (the counter's evictions since the
/// previous one; the gauge as last set since then, each insert and each tick set it).
#[test]
fn idle_keys_are_evicted_on_schedule_and_busy_ones_kept() {
    let alive_after_drop = run_watching(true, |snap| async move {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_minute(nz(2)))
            .evict_every(Duration::from_secs(10))
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        let evicted = |c: &Captured| c.counter(m::EVICTIONS_TOTAL, &[("limiter", "per_client")]);
        // 30 s per connection, burst 2. 192.0.2.1 is idle again after 30 s (one of two
        // used); .2 used both and is busy until 60 s.
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(handle.tracked_clients(), 2);
        assert_eq!(capture(&snap).gauge(m::KEYS), Some(2.0));
        let rt = tokio::runtime::Handle::current();
        assert_eq!(rt.metrics().num_alive_tasks(), 1, "the eviction task runs");

        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(
            handle.tracked_clients(),
            2,
            "not idle yet at the 10 s and 20 s ticks"
        );
        let c = capture(&snap);
        assert_eq!((c.gauge(m::KEYS), evicted(&c)), (Some(2.0), 0));
        tokio::time::sleep(Duration::from_secs(10)).await; // the 30 s tick
        assert_eq!(handle.tracked_clients(), 1, ".1 evicted at the 30 s tick");
        let c = capture(&snap);
        assert_eq!((c.gauge(m::KEYS), evicted(&c)), (Some(1.0), 1));
        // .2 kept its state: one connection back at 30 s, not a fresh burst of two.
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Err("per_client"));
        tokio::time::sleep(Duration::from_secs(30)).await; // the 60 s tick
        assert_eq!(handle.tracked_clients(), 1, ".2 is busy until 90 s");
        let c = capture(&snap);
        assert_eq!((c.gauge(m::KEYS), evicted(&c)), (Some(1.0), 0));
        tokio::time::sleep(Duration::from_secs(30)).await; // the 90 s tick
        assert_eq!(handle.tracked_clients(), 0);
        let c = capture(&snap);
        assert_eq!((c.gauge(m::KEYS), evicted(&c)), (Some(0.0), 1));

        // The task ends once the layer, its services and handles are gone.
        drop((layer, svc, handle));
        tokio::time::sleep(Duration::from_secs(11)).await;
        rt.metrics().num_alive_tasks()
    });
    assert_eq!(alive_after_drop, 0);
}

#[test]
fn rate_change_keeps_each_clients_state() {
    run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(10)))
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..10 {
            assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        }
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));

        // Double the rate and the burst. A reset would give .1 a fresh burst of 20.
        handle.set_per_client(Quota::per_second(nz(20)));
        assert_eq!(handle.per_client(), Some(Quota::per_second(nz(20))));
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
        // Its debt (TAT 1 s ahead) measured against the new quota: one comes back after
        // 1 s - 950 ms (new burst tolerance) = 50 ms.
        tokio::time::advance(Duration::from_millis(49)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
        // A new client gets the new burst.
        for _ in 0..20 {
            assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        }
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Err("per_client"));
    });
}

#[test]
fn global_rate_change_keeps_state_and_plain_rate_setters_keep_burst() {
    run(true, || async {
        let layer = RateLimitLayer::builder()
            .global(Quota::per_second(nz(2)))
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        // Away from the epoch, so a limiter rebuilt with another start would misread.
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        // Both cells of the burst used; at 100/s with burst 2 they still are, and one
        // comes back after 10 ms (not after the 1 s the old rate's state read as: a
        // raise must not lock out whoever is at the limit).
        handle.set_global_rate(nz(100));
        assert_eq!(
            handle.global(),
            Some(Quota::per_second(nz(100)).allow_burst(nz(2)))
        );
        assert_eq!(try_conn(&mut svc, "192.0.2.3").await, Err("global"));
        tokio::time::advance(Duration::from_millis(9)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.3").await, Err("global"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.3").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.4").await, Err("global"));
        // And lowering it hands out no burst: out of it at 1/s too, for 1 s.
        handle.set_global_rate(nz(1));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.4").await, Err("global"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.4").await, Ok(()));

        // Tiers can be turned off and on at run time; per-client rate keeps its burst.
        handle.disable_global();
        assert_eq!(handle.global(), None);
        assert_eq!(handle.per_client(), None);
        handle.set_per_client_rate(nz(5));
        assert_eq!(handle.per_client(), Some(Quota::per_second(nz(5))));
        handle.set_per_client_rate(nz(1));
        assert_eq!(
            handle.per_client(),
            Some(Quota::per_second(nz(1)).allow_burst(nz(5)))
        );
    });
}

#[test]
fn keyed_limiter_reports_wait_time_and_keeps_state_across_set_quota() {
    run(true, || async {
        let limiter: KeyedLimiter<&'static str> =
            KeyedLimiter::new(Quota::per_second(nz(1)), 10, "mqtt_client_id");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(limiter.check(&"sensor-1").is_ok());
        let wait = limiter.check(&"sensor-1").unwrap_err().wait();
        assert_eq!(wait, Duration::from_secs(1));
        limiter.set_quota(Quota::per_second(nz(4)));
        // Its whole burst (of 1) used: at 4/s its whole burst of 4, the last cell back
        // in 250 ms.
        let wait = limiter.check(&"sensor-1").unwrap_err().wait();
        assert_eq!(wait, Duration::from_millis(250));
        assert_eq!(limiter.quota(), Quota::per_second(nz(4)));
    });
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn poll_ready_delegates_and_never_waits_on_client_state() {
    let layer = RateLimitLayer::builder()
        .per_client(Quota::per_minute(nz(1)))
        .global(Quota::per_minute(nz(1)))
        .max_concurrent_per_client(1)
        .build();
    let (mut svc, mut inner) = tower_test::mock::spawn_layer::<Conn<()>, (), _>(layer);
    inner.allow(1);
    tokio_test::assert_ready_ok!(svc.poll_ready());
    let accepted = svc.call(conn("192.0.2.1"));
    let (_req, send) = inner.next_request().await.unwrap();
    // Every tier is now exhausted for this client, and globally.
    inner.allow(0);
    tokio_test::assert_pending!(svc.poll_ready(), "pending only because the inner is");
    inner.allow(5);
    tokio_test::assert_ready_ok!(svc.poll_ready());
    let err = svc.call(conn("192.0.2.1")).await.unwrap_err();
    assert_eq!(label_of(&*err), ("rate_limit", "concurrency"));
    tokio_test::assert_ready_ok!(svc.poll_ready());
    let err = svc.call(conn("192.0.2.2")).await.unwrap_err();
    assert_eq!(label_of(&*err), ("rate_limit", "global"));
    tokio_test::assert_ready_ok!(svc.poll_ready());
    send.send_response(());
    accepted.await.unwrap();
}

/// Reads what the server sends until it closes: `b"hi"` if served, nothing if refused.
async fn connect_from(local_ip: &str, server: SocketAddr) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(local_ip.parse().unwrap(), 0))
        .unwrap();
    let mut stream = sock.connect(server).await.unwrap();
    let mut got = Vec::new();
    // A refused connection is closed at once: EOF, or a reset if our data was unread.
    let _ = stream.read_to_end(&mut got).await;
    got
}

#[test]
fn over_real_sockets_a_burst_from_one_address_is_closed_while_others_are_served() {
    let (results, snap) = run(false, || async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // One a minute after a burst of 3: nothing replenishes during the test.
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_minute(nz(1)).allow_burst(nz(3)))
            .build();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(
                |mut c: Conn<tokio::net::TcpStream>| async move {
                    use tokio::io::AsyncWriteExt;
                    c.write_all(b"hi").await?;
                    c.shutdown().await?;
                    Ok::<_, BoxError>(())
                },
            ));
        tokio::spawn(aegis_core::serve(listener, svc).into_future());
        let mut results = Vec::new();
        for _ in 0..6 {
            results.push(connect_from("127.0.0.1", addr).await);
        }
        // The server keeps serving: another client address is still let through.
        results.push(connect_from("127.0.0.2", addr).await);
        results
    });
    let served: Vec<bool> = results.iter().map(|r| r == b"hi").collect();
    assert_eq!(served, [true, true, true, false, false, false, true]);
    assert!(results[3..6].iter().all(Vec::is_empty));
    assert_eq!(rejections(&capture(&snap), "per_client"), 3);
}

#[test]
fn a_huge_evict_every_waits_instead_of_killing_the_eviction_task() {
    let ((), _) = run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(1)))
            .evict_every(Duration::MAX) // "never"
            .build();
        let mut svc = layer.layer(ok_service());
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        let rt = tokio::runtime::Handle::current();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            rt.metrics().num_alive_tasks(),
            1,
            "the eviction task waits (Instant + Duration::MAX used to panic in it)"
        );
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        assert_eq!(rt.metrics().num_alive_tasks(), 1);
        assert_eq!(layer.handle().tracked_clients(), 1, "no eviction ran");
    });
}

#[test]
fn eviction_starts_again_after_the_first_runtime_shuts_down() {
    let layer = RateLimitLayer::builder()
        .per_client(Quota::per_second(nz(1)))
        .evict_every(Duration::from_secs(10))
        .build();
    let handle = layer.handle();
    let mut svc = layer.layer(ok_service());
    // The first connection starts the eviction task on this runtime, which then ends.
    let ((), _) = run(true, || async {
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
    });
    assert_eq!(handle.tracked_clients(), 1);
    // Another runtime: the next connection starts a new task, which evicts both
    // clients once they are idle (1 s) at its first tick (10 s).
    let (alive, _) = run(true, || async {
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(handle.tracked_clients(), 2);
        let alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        tokio::time::sleep(Duration::from_secs(11)).await;
        alive
    });
    assert_eq!(alive, 1, "a new eviction task");
    assert_eq!(handle.tracked_clients(), 0, "evicted by the new task");
}

#[test]
fn racing_threads_on_the_same_new_keys_take_one_slot_per_key() {
    // No tokio runtime: no eviction task, and `check` still works.
    let limiter: KeyedLimiter<u32> = KeyedLimiter::new(Quota::per_second(nz(1)), 150, "race");
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for k in 0..100 {
                    let _ = limiter.check(&k);
                }
            });
        }
    });
    assert_eq!(limiter.len(), 100);
    // The 50 slots left are all still free.
    for k in 100..150 {
        assert!(limiter.check(&k).is_ok());
    }
    assert_eq!(limiter.len(), 150);
}

#[test]
fn keyed_limiter_takes_an_injected_clock() {
    let clock = governor::clock::FakeRelativeClock::default();
    clock.advance(Duration::from_secs(100));
    let limiter = KeyedLimiter::with_clock(Quota::per_second(nz(2)), 10, "fake", clock.clone());
    assert!(limiter.check(&1_u8).is_ok());
    assert!(limiter.check(&1_u8).is_ok());
    assert_eq!(
        limiter.check(&1_u8).unwrap_err().wait(),
        Duration::from_millis(500)
    );
    clock.advance(Duration::from_millis(500));
    assert!(limiter.check(&1_u8).is_ok());
    // Idle by the injected clock's reading, not tokio's.
    assert_eq!(limiter.evict_idle(), 0);
    clock.advance(Duration::from_secs(1));
    assert_eq!(limiter.evict_idle(), 1);
    assert!(limiter.is_empty());
}

const YEAR: Duration = Duration::from_secs(31_557_600);

/// The burst of 1/hour clamped to [`MAX_BURST_REFILL`]: 1,281,023 cells.
fn clamped_hourly_burst() -> NonZeroU32 {
    let cells = MAX_BURST_REFILL.as_nanos() / Duration::from_secs(3600).as_nanos();
    nz(u32::try_from(cells).unwrap())
}

/// Quotas past governor's arithmetic (`interval * (burst - 1)` in `u64` nanoseconds: a
/// panic in debug builds, a wrap in release builds; an interval over 584 years: a panic
/// in any build) panicked in `build`. They are clamped to `MAX_BURST_REFILL`: the burst
/// cut to what refills in ~146 years, keeping the rate.
#[test]
fn quotas_past_governors_arithmetic_are_clamped_by_the_builder() {
    run(true, || async {
        // 1/hour with a burst of 5,124,097: 584.5 years to refill.
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_hour(nz(1)).allow_burst(nz(5_124_097)))
            .build();
        let handle = layer.handle();
        assert_eq!(
            handle.per_client(),
            Some(Quota::per_hour(nz(1)).allow_burst(clamped_hourly_burst()))
        );
        let mut svc = layer.layer(ok_service());
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));

        // One cell every 50 years, burst 10: 500 years; clamped to a burst of 2.
        let layer = RateLimitLayer::builder()
            .per_client(Quota::with_period(50 * YEAR).unwrap().allow_burst(nz(10)))
            // One cell every 600 years: past u64 nanoseconds; clamped to one cell every
            // ~146 years.
            .global(Quota::with_period(600 * YEAR).unwrap())
            .build();
        let handle = layer.handle();
        assert_eq!(
            handle.per_client(),
            Some(Quota::with_period(50 * YEAR).unwrap().allow_burst(nz(2)))
        );
        assert_eq!(
            handle.global(),
            Some(Quota::with_period(MAX_BURST_REFILL).unwrap())
        );
        let mut svc = layer.layer(ok_service());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        // The global tier's one cell is used (.2 spends a per-client cell on the way).
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Err("global"));
        handle.disable_global();
        // Each client had a burst of 2 and used one.
        for ip in ["192.0.2.1", "192.0.2.2"] {
            assert_eq!(try_conn(&mut svc, ip).await, Ok(()));
            assert_eq!(try_conn(&mut svc, ip).await, Err("per_client"));
        }
    });
}

/// The same quotas through the handle's setters, at run time (where a controller
/// would have panicked): clamped, and the states re-expressed for them.
#[test]
fn quotas_past_governors_arithmetic_are_clamped_by_the_handle_setters() {
    run(true, || async {
        let layer = RateLimitLayer::builder()
            .per_client(Quota::per_second(nz(10)))
            .build();
        let handle = layer.handle();
        let mut svc = layer.layer(ok_service());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));

        handle.set_per_client(Quota::per_hour(nz(1)).allow_burst(nz(5_124_097)));
        assert_eq!(
            handle.per_client(),
            Some(Quota::per_hour(nz(1)).allow_burst(clamped_hourly_burst()))
        );
        // The plain rate setter keeps the clamped burst: 1/s with it is within bounds.
        handle.set_per_client_rate(nz(1));
        assert_eq!(
            handle.per_client(),
            Some(Quota::per_second(nz(1)).allow_burst(clamped_hourly_burst()))
        );

        handle.set_per_client(Quota::with_period(50 * YEAR).unwrap().allow_burst(nz(10)));
        assert_eq!(
            handle.per_client(),
            Some(Quota::with_period(50 * YEAR).unwrap().allow_burst(nz(2)))
        );
        // .1 used a tenth of its burst (a cell of 10), so one whole cell of the 2 is
        // left; .2 has both.
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.1").await, Err("per_client"));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.2").await, Err("per_client"));

        handle.set_global(Quota::with_period(600 * YEAR).unwrap());
        assert_eq!(
            handle.global(),
            Some(Quota::with_period(MAX_BURST_REFILL).unwrap())
        );
        assert_eq!(try_conn(&mut svc, "192.0.2.3").await, Ok(()));
        assert_eq!(try_conn(&mut svc, "192.0.2.4").await, Err("global"));
        // Back to an ordinary rate: the global cell used ~146 years ahead is re-expressed
        // for it, as the one cell used of a burst of 1.
        // (A new client each time: a global refusal spends a per-client cell.)
        handle.set_global(Quota::per_second(nz(1)));
        assert_eq!(try_conn(&mut svc, "192.0.2.5").await, Err("global"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(try_conn(&mut svc, "192.0.2.6").await, Ok(()));
    });
}
