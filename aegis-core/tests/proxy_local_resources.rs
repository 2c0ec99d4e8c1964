//! An upstream connect that fails for lack of descriptors on this host is
//! `ProxyError::LocalResources` (`local_resources`), not the upstream's `connect_error`.
//!
//! This test lowers the process's open-files limit, so it lives alone in its own test
//! binary (one process) and runs everything on one thread, as `tests/emfile.rs` does.

mod common;

use aegis_core::error::label_of;
use aegis_core::metrics::{self as m, testing};
use aegis_core::proxy::{ProxyError, TcpConnect};
use common::Exhausted;
use tokio::net::TcpListener;
use tower::ServiceExt;

#[test]
fn a_connect_without_a_descriptor_is_a_local_resources_error() {
    let ((), snap) = testing::run(false, || async {
        // A listening upstream: a connect with a descriptor to spare succeeds.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpConnect::new(upstream.local_addr().unwrap());

        let exhausted = Exhausted::now();
        let res = connect.clone().oneshot(()).await;

        // Give the descriptors back before asserting, so a failure still leaves
        // the process usable.
        drop(exhausted);

        let err = res.expect_err("no descriptor was left for the upstream socket");
        assert!(
            matches!(err, ProxyError::LocalResources { .. }),
            "not LocalResources: {err:?}"
        );
        assert_eq!(err.label(), "local_resources");
        assert!(err.is_connect());
        assert_eq!(label_of(&err), ("proxy", "local_resources"));

        // With descriptors back, the same connector reaches the upstream.
        connect.oneshot(()).await.expect("connects again");
    });
    let got = testing::capture(&snap);
    let counted = |reason| got.counter(m::UPSTREAM_ERRORS_TOTAL, &[("reason", reason)]);
    assert_eq!(counted("local_resources"), 1);
    assert_eq!(counted("connect_error"), 0);
}
