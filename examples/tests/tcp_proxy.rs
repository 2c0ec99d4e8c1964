//! The `tcp-proxy` example's arguments: a bad connection cap is an error, not a panic.

#[allow(dead_code)] // of the shared helpers this test uses `example_bin` only
mod common;

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/examples/tcp-proxy`, checked to be newer than its sources.
fn tcp_proxy_bin() -> PathBuf {
    common::example_bin(
        "tcp-proxy",
        &[
            "examples/tcp-proxy.rs",
            "aegis-core/src",
            "aegis-layers/src",
        ],
    )
}

#[test]
fn a_cap_of_zero_or_past_u32_is_refused_with_an_error() {
    for (cap, why) in [("0", "Zero"), ("99999999999", "PosOverflow")] {
        let out = Command::new(tcp_proxy_bin())
            .args(["127.0.0.1:0", "127.0.0.1:9", cap])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // An error return exits 1; a panic (serve's assert on the cap) would exit 101.
        assert_eq!(out.status.code(), Some(1), "{cap}: {err}");
        assert!(
            err.contains(why) && !err.contains("panicked"),
            "{cap}: {err}"
        );
    }
}
