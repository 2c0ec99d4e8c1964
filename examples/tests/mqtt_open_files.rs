//! The mqtt-gateway's open-files budget (`examples/mqtt-gateway/open_files.rs`, compiled
//! here as it is in the gateway, with `examples/shared/nofile.rs`): a pure function of
//! the open-files limit, the number of runtimes and the configured cap, given here core
//! counts this machine does not have.

#[path = "../shared/nofile.rs"]
#[allow(dead_code)] // `raise` and `DESCRIPTORS_PER_CLIENT` are the gateways'.
mod nofile;
#[path = "../mqtt-gateway/open_files.rs"]
mod open_files;

use std::num::NonZeroUsize;

use open_files::{Budget, RUNTIME_DESCRIPTORS, SHARD_QUEUE, budget};

/// The default `server.max_connections`.
const DEFAULT_CAP: u64 = 10_000;

/// The runtimes besides the accepting one on `cores` cores with `server.runtime =
/// "per-core"`.
fn others(cores: usize) -> Option<NonZeroUsize> {
    NonZeroUsize::new(cores - 1)
}

/// The budget's descriptors never add up to more than the limit, and the queues take at
/// most a quarter of what the reserve and the runtimes' own descriptors leave (or are one
/// socket each).
fn assert_within(b: &Budget, cores: usize) {
    let limit = b.limit.unwrap();
    let n = cores as u64 - 1;
    assert_eq!(b.held, n * (RUNTIME_DESCRIPTORS + b.queue as u64), "{b:?}");
    assert!(
        nofile::FD_RESERVE + b.held + b.cap * b.per_client <= limit,
        "{cores} cores: {b:?}"
    );
    let left = limit - nofile::FD_RESERVE - n * RUNTIME_DESCRIPTORS;
    // At least one socket a queue, whatever is left.
    assert!(
        b.queue == 1 || n * b.queue as u64 <= left / 4,
        "{cores} cores: {b:?}"
    );
}

/// On 16 cores under a 1,024 limit (systemd's default soft limit) and on 64 under
/// 4,096, the sockets that may be queued for the other runtimes took 64 a runtime: 960
/// and 4,032 descriptors, more than the limit left, and the cap came to 1 client (a
/// reviewer, with `sched_getaffinity` faked: `--check` said `max_connections = 1`, and a
/// run refused 4 clients of 5). The queues are now shortened to a quarter of the budget,
/// and the runtimes' own descriptors counted: the cap is hundreds of clients.
#[test]
fn many_cores_under_a_small_limit_leave_a_useful_cap() {
    for (cores, limit, at_least) in [(16, 1024, 300), (64, 4096, 1400)] {
        let others = others(cores);
        // The fixed queue's budget: 64 held for each other runtime.
        let old = nofile::connection_cap(
            "server.max_connections",
            DEFAULT_CAP,
            Some(limit),
            2,
            (cores as u64 - 1) * SHARD_QUEUE as u64,
        );
        assert_eq!(old, 1, "{cores} cores: the case the fixed queue got wrong");

        let b = budget(DEFAULT_CAP, 2, Some(limit), others);
        assert!(b.cap >= at_least, "{cores} cores under {limit}: {b:?}");
        assert!(b.queue >= 1 && b.queue < SHARD_QUEUE, "{b:?}");
        assert_within(&b, cores);
        // With the embedded broker, three descriptors a client.
        let embedded = budget(DEFAULT_CAP, 3, Some(limit), others);
        assert_eq!(embedded.cap, (limit - 128 - b.held) / 3, "{embedded:?}");
        assert_within(&embedded, cores);
    }
}

/// The runtimes' own descriptors are counted: without the queues, 64 cores' would take
/// 252, more than the 128 kept for the gateway, in which they were left.
#[test]
fn each_other_runtime_holds_descriptors_of_its_own() {
    let b = budget(DEFAULT_CAP, 2, Some(1 << 20), others(64));
    assert_eq!(b.queue, SHARD_QUEUE, "{b:?}");
    // Four each, measured (`open_files::RUNTIME_DESCRIPTORS`).
    assert_eq!(b.held, 63 * (4 + 64), "{b:?}");
}

/// Under a limit that leaves room, each other runtime may queue [`SHARD_QUEUE`] sockets
/// as before; with no other runtime (work-stealing, or one core) nothing is held; with
/// the limit unknown nothing is cut.
#[test]
fn a_large_limit_keeps_the_full_queue() {
    let b = budget(DEFAULT_CAP, 2, Some(65_536), others(8));
    assert_eq!(b.queue, SHARD_QUEUE);
    assert_eq!(b.held, 7 * (RUNTIME_DESCRIPTORS + 64));
    assert_eq!(b.cap, DEFAULT_CAP);

    let alone = budget(DEFAULT_CAP, 2, Some(1024), None);
    assert_eq!((alone.queue, alone.held), (0, 0));
    assert_eq!(alone.cap, (1024 - 128) / 2);

    let unknown = budget(DEFAULT_CAP, 2, None, others(16));
    assert_eq!((unknown.queue, unknown.cap), (SHARD_QUEUE, DEFAULT_CAP));
}

/// Over core counts and limits, the descriptors the budget counts never pass the limit
/// while the cap is above its floor of 1 client, and the queues keep to their quarter.
#[test]
fn the_budget_stays_within_the_limit() {
    for cores in [2, 3, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128] {
        for limit in [512, 1024, 2048, 4096, 8192, 20_000, 65_536, 1 << 20] {
            let b = budget(u64::MAX, 2, Some(limit), others(cores));
            if b.cap > 1 {
                assert_within(&b, cores);
            }
            // Where the limit allows any connection with one-socket queues, it allows it
            // with the budget's: the queues never take the connections' share.
            let n = cores as u64 - 1;
            if limit >= 128 + n * (RUNTIME_DESCRIPTORS + 1) + 2 * 8 {
                assert!(b.cap > 1, "{cores} cores under {limit}: {b:?}");
            }
        }
    }
}
