//! The accept loop survives running out of file descriptors.
//!
//! This test lowers the process's open-files limit, so it lives alone in its own test
//! binary (one process) and runs everything on one thread, on tokio's paused clock: the
//! loop's back-off sleeps pass as soon as nothing else can run, so how many times it
//! retries over a span of time is exact.

mod common;

use std::time::Duration;

use aegis_core::metrics::{self as m, testing};
use aegis_core::{Conn, serve};
use common::Exhausted;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[test]
fn accept_loop_keeps_serving_after_emfile() {
    let ((), logs) = aegis_core::testing::capture_logs(tracing::Level::WARN, || {
        testing::run_watching(true, run);
    });
    // Nine errors in the first 300 ms and one at 511 ms, one warning for them; the next,
    // at 1,023 ms, says how many were not logged (at most one a second: a churn of
    // clients at the limit, each accept resetting the back-off, logged one an error
    // before).
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("accept failed"))
        .collect();
    assert_eq!(warnings.len(), 2, "{logs}");
    assert!(warnings[0].contains("suppressed=0"), "{logs}");
    assert!(warnings[1].contains("suppressed=9"), "{logs}");
}

async fn run(snap: metrics_util::debugging::Snapshotter) {
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = tower::service_fn(|conn: Conn<TcpStream>| async move {
            let (mut r, mut w) = tokio::io::split(conn);
            tokio::io::copy(&mut r, &mut w).await
        });
        tokio::spawn(serve(listener, svc).into_future());

        let mut exhausted = Exhausted::now();
        // Free exactly one descriptor: the client's socket takes it, and the server's
        // accept() then fails with EMFILE.
        exhausted.free_one();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"hello").await.unwrap();

        // Until the loop has seen EMFILE once. Yielding keeps the runtime busy, so no
        // virtual time passes meanwhile: the first error is now, and its first back-off
        // (1 ms) is still to run. (Each yield lets the I/O driver and the loop run; the
        // bound on them is a guard against a hang, not a measure.)
        let (mut emfile, mut other) = (0, 0);
        for yields in 0.. {
            tokio::task::yield_now().await;
            let got = testing::capture(&snap);
            emfile += got.counter(m::ACCEPT_ERRORS_TOTAL, &[("kind", "emfile")]);
            other += got.counter(m::ACCEPT_ERRORS_TOTAL, &[("kind", "other")]);
            if emfile > 0 {
                break;
            }
            assert!(yields < 100_000, "the loop never reported EMFILE");
        }
        assert_eq!((emfile, other), (1, 0), "one accept, one error");
        // It backs off instead of spinning: the back-off doubles from 1 ms, so in the
        // next 300 ms it retries after 1, 3, 7, 15, 31, 63, 127 and 255 ms, and next
        // at 511 ms.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = testing::capture(&snap);
        emfile += got.counter(m::ACCEPT_ERRORS_TOTAL, &[("kind", "emfile")]);
        other += got.counter(m::ACCEPT_ERRORS_TOTAL, &[("kind", "other")]);
        assert_eq!(emfile, 1 + 8, "EMFILE errors in 300 ms");
        assert_eq!(other, 0);
        // The retries at 511 ms (not logged either) and at 1,023 ms, a second after the
        // first warning: logged, saying nine were not.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let got = testing::capture(&snap);
        emfile += got.counter(m::ACCEPT_ERRORS_TOTAL, &[("kind", "emfile")]);
        assert_eq!(emfile, 1 + 8 + 2, "EMFILE errors in 1.1 s");

        // Give the descriptors back: the waiting client is served, and new ones too.
        drop(exhausted);
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(20), client.read_exact(&mut buf))
            .await
            .expect("the queued client is served once descriptors are free")
            .unwrap();
        assert_eq!(&buf, b"hello");
        let mut again = TcpStream::connect(addr).await.unwrap();
        again.write_all(b"again").await.unwrap();
        again.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");
    }
}
