//! The accept loop survives running out of file descriptors.
//!
//! This test lowers the process's open-files limit, so it lives alone in its own test
//! binary (one process) and runs everything on one thread.

use std::fs::File;
use std::time::Duration;

use aegis_core::metrics::{self as m, testing};
use aegis_core::{Conn, serve};
use metrics_util::debugging::DebuggingRecorder;
use rlimit::Resource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[test]
fn accept_loop_keeps_serving_after_emfile() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&rec, || {
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let svc = tower::service_fn(|conn: Conn<TcpStream>| async move {
                let (mut r, mut w) = tokio::io::split(conn);
                tokio::io::copy(&mut r, &mut w).await
            });
            tokio::spawn(serve(listener, svc).into_future());

            // Lower the soft limit close to what is open, then use up every descriptor.
            let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
            let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
            rlimit::setrlimit(Resource::NOFILE, (open_now + 32).min(soft), hard).unwrap();
            let mut fillers = Vec::new();
            while let Ok(f) = File::open("/dev/null") {
                fillers.push(f);
            }
            // Free exactly one descriptor: the client's socket takes it, and the server's
            // accept() then fails with EMFILE.
            fillers.pop();
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(b"hello").await.unwrap();

            // Wait (bounded) until the loop has seen EMFILE a few times.
            let mut emfile = 0;
            let mut other = 0;
            let start = tokio::time::Instant::now();
            while emfile < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let got = testing::capture(&snap);
                emfile += got.counter(m::ACCEPT_ERRORS_TOTAL, &[("kind", "emfile")]);
                other += got.counter(m::ACCEPT_ERRORS_TOTAL, &[("kind", "other")]);
                assert!(
                    tokio::time::Instant::now().saturating_duration_since(start)
                        < Duration::from_secs(20),
                    "the loop never reported EMFILE"
                );
            }
            assert_eq!(other, 0);
            // It backs off instead of spinning: after another 300 ms of EMFILE, only a
            // handful more attempts (the back-off doubles from 1 ms).
            tokio::time::sleep(Duration::from_millis(300)).await;
            emfile += testing::counter(&snap, m::ACCEPT_ERRORS_TOTAL, &[("kind", "emfile")]);
            assert!(emfile <= 20, "accept loop spun on EMFILE: {emfile} errors");

            // Give the descriptors back: the waiting client is served, and new ones too.
            drop(fillers);
            rlimit::setrlimit(Resource::NOFILE, soft, hard).unwrap();
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
        });
    });
}
