//! The mqtt-gateway's open-files budget: `server.max_connections` cut to what the
//! open-files limit allows ([`crate::nofile::connection_cap`]) once the descriptors that
//! no connection under the cap holds are set aside, and with `server.runtime =
//! "per-core"` how many accepted sockets may wait in each other runtime's queue. A pure
//! function of the limit, the number of runtimes and the configured values ([`budget`]),
//! so that `--check` and the run compute the same figures, and a test can give it any
//! core count.

use std::num::NonZeroUsize;

use crate::nofile;

/// With `server.runtime = "per-core"`, the most sockets the accepting runtime may have
/// handed to each other runtime and not yet seen taken (`aegis_core::serve::share_out`'s
/// queue): a runtime that is slow to take them (busy, or its thread descheduled) gets no
/// more, and the acceptor serves what comes itself. A queued socket holds a descriptor
/// that the connection cap counts only once its runtime takes it, so the queues'
/// descriptors are kept out of the cap's budget ([`Budget::held`]). It was the listen
/// backlog (1,024 a runtime) and uncounted: with one runtime stalled, the process ran out
/// of descriptors below `max_connections`, and clients admitted under the cap failed
/// their upstream connect (a reviewer, proved with one runtime's thread stopped). Under
/// a small limit the queues are shorter ([`queue_len`]).
pub(crate) const SHARD_QUEUE: usize = 64;

/// The descriptors each runtime besides the accepting one holds of its own (a tokio
/// current-thread runtime with every driver: two epoll instances, an eventfd, and its
/// signal driver's copy of the signal socket): 4, measured (`ls -l /proc/PID/fd` of the
/// gateway on 1, 2, 8 and 16 cores: 13, 17, 41 and 73). Not in [`nofile::FD_RESERVE`],
/// which is fixed: 128 are used up by the runtimes alone at about 32 cores.
pub(crate) const RUNTIME_DESCRIPTORS: u64 = 4;

/// The queues for the other runtimes take at most one part in this many of the
/// descriptors left for connections and queues ([`queue_len`]).
const QUEUE_SHARE: u64 = 4;

/// The open-files budget of a gateway serving from the accepting runtime and `others`
/// more ([`budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// The open-files limit (`None`: unknown, and nothing is cut).
    pub(crate) limit: Option<u64>,
    /// The descriptors each client holds.
    pub(crate) per_client: u64,
    /// The sockets that may wait in each other runtime's queue ([`queue_len`]); 0
    /// without other runtimes.
    pub(crate) queue: usize,
    /// The descriptors held outside the connection cap: each other runtime's own
    /// ([`RUNTIME_DESCRIPTORS`]) and the sockets queued for it (`queue`).
    pub(crate) held: u64,
    /// The connection cap: the requested one, cut to fit the limit
    /// ([`nofile::connection_cap`]: `(limit - FD_RESERVE - held) / per_client`, at
    /// least 1).
    pub(crate) cap: u64,
}

/// The sockets that may wait in each of `others` runtimes' queues under an open-files
/// `limit`: [`SHARD_QUEUE`], or less so that the queues together take at most a quarter
/// of what the limit leaves after [`nofile::FD_RESERVE`] and the runtimes' own
/// descriptors, and at least 1. With a fixed [`SHARD_QUEUE`] a runtime, 15 other
/// runtimes (16 cores) held 960 of a 1,024 limit and the cap came to 1 client.
pub(crate) fn queue_len(limit: Option<u64>, others: NonZeroUsize) -> usize {
    let Some(limit) = limit else {
        return SHARD_QUEUE;
    };
    let n = u64::try_from(others.get()).unwrap_or(u64::MAX);
    let free = limit
        .saturating_sub(nofile::FD_RESERVE)
        .saturating_sub(n.saturating_mul(RUNTIME_DESCRIPTORS));
    let queue = free / n.saturating_mul(QUEUE_SHARE);
    usize::try_from(queue)
        .unwrap_or(usize::MAX)
        .clamp(1, SHARD_QUEUE)
}

/// The budget of a gateway whose clients hold `per_client` descriptors each, with the
/// connection cap `requested` (`server.max_connections`), under the open-files `limit`,
/// serving from the accepting runtime and `others` more (`None`: the accepting one
/// only). Warns when it cuts the cap ([`nofile::connection_cap`]).
pub(crate) fn budget(
    requested: u64,
    per_client: u64,
    limit: Option<u64>,
    others: Option<NonZeroUsize>,
) -> Budget {
    let (queue, held) = match others {
        Some(others) => {
            let queue = queue_len(limit, others);
            let n = u64::try_from(others.get()).unwrap_or(u64::MAX);
            let each = RUNTIME_DESCRIPTORS.saturating_add(queue as u64);
            (queue, n.saturating_mul(each))
        }
        None => (0, 0),
    };
    let cap = nofile::connection_cap("server.max_connections", requested, limit, per_client, held);
    Budget {
        limit,
        per_client,
        queue,
        held,
        cap,
    }
}
