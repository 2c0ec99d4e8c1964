//! `server.runtime = "per-core"`: the wait for the other runtimes' drain reports, bounded
//! by the drain deadline. Unbounded, one stalled runtime (its thread descheduled, stopped
//! by a debugger, stuck in a blocking call) kept the whole stop waiting as long as it
//! stalled, past `server.drain_timeout` and a supervisor's grace period (a reviewer,
//! proved with one runtime's thread stopped under ptrace).

use std::future::Future;

use tokio::time::Instant;

/// What the runtimes reported, together with the accepting runtime's own report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gathered {
    /// Whether every connection of every runtime ended within the drain: false when one
    /// was aborted, or a runtime ended without a report (a panic) or sent none in time.
    pub(crate) drained: bool,
    /// The connections aborted, in all the runtimes that reported.
    pub(crate) aborted: usize,
    /// The runtimes (numbered from 1, as their threads `aegis-runtime-N`) whose report
    /// did not come by the deadline.
    pub(crate) late: Vec<usize>,
}

/// Waits for `reports`, the other runtimes' `(drained, aborted)` in the order of their
/// numbers (an `Err` is a runtime that ended without a report), until `deadline` and no
/// longer; `mine` is the accepting runtime's own. A report that has not come by then
/// counts as not drained, and the runtime is named in a warning: the stop goes on without
/// it (the process ends with it).
pub(crate) async fn gather<F, E>(
    mine: (bool, usize),
    reports: impl IntoIterator<Item = F>,
    deadline: Instant,
) -> Gathered
where
    F: Future<Output = Result<(bool, usize), E>>,
{
    let (mut drained, mut aborted) = mine;
    let mut late = Vec::new();
    for (i, reported) in reports.into_iter().enumerate() {
        let runtime = i + 1;
        // A report already sent is taken even past the deadline: the future is polled
        // before the deadline is looked at.
        match tokio::time::timeout_at(deadline, reported).await {
            Ok(Ok((d, a))) => {
                drained &= d;
                aborted += a;
            }
            Ok(Err(_)) => {
                tracing::warn!(
                    runtime,
                    thread = %format!("aegis-runtime-{runtime}"),
                    "runtime ended without a drain report: counted as not drained"
                );
                drained = false;
            }
            Err(_) => {
                tracing::warn!(
                    runtime,
                    thread = %format!("aegis-runtime-{runtime}"),
                    "runtime sent no drain report by the drain deadline: counted as not \
                     drained, the stop goes on without it"
                );
                drained = false;
                late.push(runtime);
            }
        }
    }
    Gathered {
        drained,
        aborted,
        late,
    }
}
