//! The process's open-files limit, and the connection cap it allows: shared by the
//! mqtt-gateway and the http-gateway (each includes this file with `#[path]`).
//!
//! Each proxied client holds descriptors of this process: its socket and the upstream
//! one (the http-gateway's backend connection, pooled between its requests), and with
//! the mqtt-gateway's embedded broker rumqttd's end of that too. Out of descriptors,
//! `accept()` fails with `EMFILE` and the accept loop backs off: new clients wait in the
//! kernel's backlog and time out instead of being reset at the cap, the clients already
//! in fail their upstream connect, and the metrics endpoint stops answering too (and
//! rumqttd, which retries a failed accept at once, spins a core). A service's soft limit
//! is often 1,024 (systemd's default, most login shells), about 500 clients, where the
//! default connection cap of both gateways is 10,000.
//!
//! So at start the soft limit is raised to the hard one (as Go's runtime does), and the
//! connection cap is kept within what it allows, with a warning when that cuts it:
//! `(limit - FD_RESERVE - held) / per_client`, at least 1, where `held` is what the
//! connections not under the cap and the runtimes beyond the first may hold (the
//! mqtt-gateway's, for each runtime but the accepting one: its own descriptors and the
//! sockets queued for it, its `open_files.rs`; 0 for the http-gateway).

/// Descriptors the process holds besides its connections' (standard streams, the
/// first runtime's epoll and event descriptors, the listeners, the metrics endpoint's
/// connections, the bans file, auth callouts), kept free by [`connection_cap`].
pub(crate) const FD_RESERVE: u64 = 128;

/// Descriptors of this process each proxied client holds: its socket and the upstream
/// one (three with the embedded broker: `broker::DESCRIPTORS_PER_CLIENT`).
pub(crate) const DESCRIPTORS_PER_CLIENT: u64 = 2;

/// Raises the soft open-files limit to the hard one; returns the limit now in force,
/// `None` where it cannot be read.
pub(crate) fn raise() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::debug!(error = %e, "cannot raise the open-files limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// `requested`, the connection cap that `setting` configures, kept within what an
/// open-files `limit` allows at `per_client` descriptors a client, besides
/// [`FD_RESERVE`] and `held` more that connections not under the cap and runtimes beyond
/// the first may hold (the mqtt-gateway's other runtimes and the sockets queued for
/// them), with a warning when that cuts it; `requested` when the limit is unknown.
pub(crate) fn connection_cap(
    setting: &'static str,
    requested: u64,
    limit: Option<u64>,
    per_client: u64,
    held: u64,
) -> u64 {
    let Some(limit) = limit else {
        return requested;
    };
    let fits = (limit.saturating_sub(FD_RESERVE.saturating_add(held)) / per_client.max(1)).max(1);
    if requested > fits {
        tracing::warn!(
            setting,
            max_connections = fits,
            configured = requested,
            open_files_limit = limit,
            descriptors_per_client = per_client,
            held_descriptors = held,
            "connection cap cut to what the open-files limit allows"
        );
        return fits;
    }
    requested
}
