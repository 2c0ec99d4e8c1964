#!/usr/bin/env python3
"""Summary of benches/compare.sh: medians over the repetitions, one Markdown table.

    python3 benches/compare_summary.py RESULTS.jsonl

Below the table, warnings for runs that did not measure what their rows say: a hold that
held fewer sessions than it asked for (left out of the memory rows: its growth would be
divided by the sessions held, under a limit, not by the target), churn and latency runs
with failed sessions (counted in their percentiles) or with sessions whose DISCONNECT the
target did not close (missing from their rates), publish runs with errors (counted in
their percentiles or missing from their rates), runs in which mqtt-load itself failed to
open connections (`local_errors`: the load it offered was smaller), and a flood of
gw_all that no attacker got through (its addresses were banned before it began: the
figures are of a ban in place).
"""
import json
import math
import statistics
import sys

TARGETS = ["direct", "naive", "haproxy_plain", "haproxy_hard", "gw_off", "gw_all"]


def load(path):
    runs = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                runs.setdefault((r["scenario"], r["label"]), []).append(r)
    return runs


def cpu_s(r):
    """The target's CPU over the run in seconds: on-CPU nanoseconds from schedstat
    (`cpu_ns`), or utime + stime in clock ticks in files from before mqtt-load read it."""
    if "cpu_ns" in r:
        return r["cpu_ns"] / 1e9
    if "cpu_ticks" in r:
        return r["cpu_ticks"] / r["clk_tck"]
    return None


def cpu_us(r, denom_key):
    cpu = cpu_s(r)
    if cpu is None or not r.get(denom_key):
        return None
    return cpu * 1e6 / r[denom_key]


def failure_bound(n, x):
    """One-sided 95 % upper bound on a failure rate from x failures in n attempts, and
    its method: the rule of three (3 / n) when none failed, else Clopper-Pearson's exact
    bound (the rate at which x or fewer failures have probability 0.05), by bisection."""
    if n <= 0:
        return None, None
    if x == 0:
        return min(1.0, 3 / n), "rule of three"
    if x >= n:
        return 1.0, "Clopper-Pearson"

    def at_most_x(p):
        # P(X <= x) for X ~ Binomial(n, p), summed in logs.
        return sum(math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                            + k * math.log(p) + (n - k) * math.log1p(-p))
                   for k in range(x + 1))

    lo, hi = x / n, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if at_most_x(mid) > 0.05:
            lo = mid
        else:
            hi = mid
    return hi, "Clopper-Pearson"


class Total:
    """A row over every repetition at once (a sum, not a median): f(list of runs)."""

    def __init__(self, f):
        self.f = f


def legit_attempts(rs):
    return sum(r["legit_total"] for r in rs)


def legit_failures(rs):
    return sum(r["legit_total"] - r["legit_ok"] for r in rs)


def legit_bound(rs):
    bound, _ = failure_bound(legit_attempts(rs), legit_failures(rs))
    if bound is None:
        return None
    cell = f"{100 * bound:.3f}"
    return cell if bound <= 0.001 else cell + " (>= 99.9 % not shown)"


def short_hold(r):
    """Whether a hold run held fewer sessions than it asked for."""
    return r.get("held") is not None and r.get("requested") is not None and r["held"] < r["requested"]


def warnings(runs):
    """One line for each run that did not measure what its rows say (module doc)."""
    out = []
    for t in TARGETS:
        for r in runs.get(("hold", t), []):
            if short_hold(r):
                out.append(f"hold {t} rep {r['rep']}: held {r['held']:,} of {r['requested']:,} sessions"
                           f" ({r.get('failed', '?')} failed): left out of the memory rows")
        for scenario in ("latency", "churn"):
            for r in runs.get((scenario, t), []):
                if r.get("failed"):
                    out.append(f"{scenario} {t} rep {r['rep']}: {r['failed']:,} failed sessions"
                               f" (of {r['failed'] + r.get('ok', 0):,}; each counted as 3 s in the percentiles)")
                if r.get("disconnect_failed"):
                    out.append(f"{scenario} {t} rep {r['rep']}: {r['disconnect_failed']:,} sessions whose"
                               " DISCONNECT the target did not close in 1 s (or reset): not in `ok`"
                               " nor in sessions/s")
        for scenario in ("pub_qos0", "pub_qos1", "bytes"):
            for r in runs.get((scenario, t), []):
                if r.get("errors"):
                    out.append(f"{scenario} {t} rep {r['rep']}: {r['errors']} of {r.get('clients', '?')}"
                               " publishers failed (no session, closed, or unacknowledged by the end)")
    # mqtt-load's own failures (no socket, source port or address: EMFILE, EADDRINUSE,
    # ...), counted apart from the target's refusals from its `local_errors` on.
    for (scenario, t), rs in sorted(runs.items()):
        for r in rs:
            if r.get("local_errors"):
                out.append(f"{scenario} {t} rep {r['rep']}: {r['local_errors']:,} connections mqtt-load"
                           " itself failed to open (`local_errors`: not the target's refusals; the load"
                           " it offered was smaller)")
    for r in runs.get(("flood", "gw_all"), []):
        if r.get("accepted") == 0:
            since = f" (attackers from {r['attackers_from']})" if "attackers_from" in r else ""
            out.append(f"flood gw_all rep {r['rep']}: no attacker accepted{since}: banned from the"
                       " start, so it measures a ban already in place (an earlier flood from the same"
                       " addresses: before `attackers_from`, every repetition flooded from 127.0.3.1..10)")
    return out


def median(runs, scenario, target, f):
    vals = []
    for r in runs.get((scenario, target), []):
        try:
            v = f(r)
        except (KeyError, TypeError, ZeroDivisionError):
            v = None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


# How a row's targets are compared in the last three columns: a ratio (the default), a
# difference (values that can be negative), or not at all (times of occurrence).
RATIO, DIFF, WHEN = "ratio", "diff", "when"

# (row label, scenario, function of one run, higher is better?[, RATIO | DIFF | WHEN])
ROWS = [
    ("latency p50, connect->CONNACK, 1 client (us)", "latency", lambda r: r["p50_us"], False),
    ("latency p99, connect->CONNACK, 1 client (us)", "latency", lambda r: r["p99_us"], False),
    ("churn: sessions/s (32 clients)", "churn", lambda r: r["per_s"], True),
    ("churn: process CPU per session (us)", "churn", lambda r: cpu_us(r, "ops"), False),
    # From run l on (mqtt-load records utime apart since then, in clock ticks only): the
    # ticks' user share of the total above, so that the part is of the same clock.
    ("churn: of which user space (us)", "churn",
     lambda r: r["cpu_user_ticks"] / r["cpu_ticks"] * cpu_us(r, "ops"), False),
    ("churn: p99 connect->CONNACK under load (us)", "churn", lambda r: r["p99_us"], False),
    ("publish QoS 0, 64 B: msgs/s (4 clients)", "pub_qos0", lambda r: r["per_s"], True),
    ("publish QoS 0: process CPU per msg (us)", "pub_qos0", lambda r: cpu_us(r, "ops"), False),
    ("publish QoS 1, 64 B: msgs/s (4 clients)", "pub_qos1", lambda r: r["per_s"], True),
    ("raw bytes, QoS 0 64 KiB: MiB/s (4 clients)", "bytes", lambda r: r["mib_per_s"], True),
    # Only the first hold on each process counts: later ones reuse memory the allocator
    # (or HAProxy's pools) kept from the first, and show almost no growth. compare.sh
    # runs it first (from run s on), on fresh processes; before, after the other
    # scenarios, whose freed memory it partly reused.
    # A hold that held fewer sessions than asked for is left out (a warning names it).
    # Anonymous memory (RssAnon + RssShmem, from mqtt-load's `anon_*` on): VmRSS also
    # counts the code the first sessions page in (file-backed, once per process), which
    # its row divides by the sessions as if theirs; it stays for files from before.
    ("idle session: anonymous memory growth per connection, first hold (bytes)", "hold",
     lambda r: r.get("anon_bytes_per_conn") if r["rep"] == 1 and not short_hold(r) else None, False),
    ("idle session: VmRSS growth per connection, first hold, code paged in included (bytes)", "hold",
     lambda r: r.get("bytes_per_conn") if r["rep"] == 1 and not short_hold(r) else None, False),
    ("idle sessions: anonymous memory while holding them (MiB)", "hold",
     lambda r: None if short_hold(r) else r["anon_during"] / 1048576, False),
    ("idle sessions: RSS while holding them (MiB)", "hold",
     lambda r: None if short_hold(r) else r["rss_during"] / 1048576, False),
    ("flood: rejected conns/s", "flood", lambda r: r["rejected_per_s"], True),
    ("flood: attacker conns accepted", "flood", lambda r: r["accepted"], False),
    ("flood: process CPU per rejection (us)", "flood", lambda r: cpu_us(r, "rejected"), False),
    ("flood: CPU per rejection, net of admitted attackers and legit sessions (us)", "flood", None, False),
    ("flood: legit success (%)", "flood", lambda r: r["legit_success_pct"], True),
    # The goal (>= 99.9 %) over every repetition's attempts: a median of successes
    # cannot show it, a bound on the failure rate can (the lines below the table).
    ("flood: legit attempts, all repetitions", "flood", Total(legit_attempts), True),
    ("flood: legit failures, all repetitions", "flood", Total(legit_failures), False),
    ("flood: legit failure rate, 95 % upper bound (%)", "flood", Total(legit_bound), False),
    ("flood: legit p99 connect->CONNACK (us)", "flood", lambda r: r["legit_p99_us"], False),
    # Of the first connection of each of the 500 attacker slots (a slot reconnects when
    # cut, from mqtt-load's `reconnects` on; the rows below count those apart).
    ("slowloris: first connections cut within 100 ms of 3 s deadline (of 500)", "slowloris",
     lambda r: r["cut_within_100ms"], True),
    ("slowloris: first connections never cut within 4.5 s", "slowloris", lambda r: r["uncut"], False),
    # Negative when cut early: a ratio of two of them means nothing, their difference does.
    ("slowloris: cut lateness p50 (ms)", "slowloris", lambda r: r["late_p50_ms"], False, DIFF),
    ("slowloris: cut lateness max (ms)", "slowloris", lambda r: r["late_max_ms"], False, DIFF),
    ("slowloris: reconnections after a cut", "slowloris", lambda r: r["reconnects"], False),
    ("slowloris: attacking connections open, least after the first burst (of 500)", "slowloris",
     lambda r: r["open_min"], True),
    ("slowloris: attacking connections open, mean after the first burst", "slowloris",
     lambda r: r["open_mean"], True),
    ("slowloris: legit p99 before attack (us)", "slowloris", lambda r: r["legit_base_p99_us"], False),
    ("slowloris: legit p99 under attack (us)", "slowloris", lambda r: r["legit_p99_us"], False),
    # The goal's own ratio, taken within each repetition (the baseline moves between
    # repetitions as much as the attack moves it).
    ("slowloris: legit p99 under attack / before, per repetition", "slowloris",
     lambda r: r["legit_p99_us"] / r["legit_base_p99_us"] if r.get("legit_base_p99_us") else None, False),
    # Where the attack's tail comes from: the legitimate client's slowest session under
    # attack and when it started (its p99 of about 226 sessions is about the third
    # slowest; the attackers connect in the first tens of ms and are cut at 3 s, when
    # they reconnect at once).
    ("slowloris: legit slowest under attack (us)", "slowloris",
     lambda r: r["legit_slowest"][0][1] if r.get("legit_slowest") else None, False),
    ("slowloris: legit slowest under attack started at (ms)", "slowloris",
     lambda r: r["legit_slowest"][0][0] if r.get("legit_slowest") else None, False, WHEN),
    ("slowloris: legit success (%)", "slowloris", lambda r: 100.0 * r["legit_ok"] / max(r["legit_total"], 1), True),
    ("stall: first fast refusal after SIGSTOP (ms)", "stall", lambda r: r["fast_refusal_after_ms"], False),
    ("stall: attempts while stopped", "stall", lambda r: r["stalled_accepted"] + r["stalled_refused"] + r["stalled_timed_out"], False),
    ("stall: of those, refused", "stall", lambda r: r["stalled_refused"], False),
    ("stall: of those, timed out (3 s)", "stall", lambda r: r["stalled_timed_out"], False),
    ("stall: of those, answered only after >= 1 s", "stall", lambda r: r["stalled_answered_after_1s"], False),
    ("stall: first success after SIGCONT (ms)", "stall", lambda r: r["recovery_after_cont_ms"], False),
]


def fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return "-"
    return f"{a / b:.2f}"


def compare(a, b, how):
    """The cell comparing a with b in the last columns: a / b, a - b ("diff +5.00", for
    rows of values that can be negative), or "-" (for times of occurrence)."""
    if how == WHEN:
        return "-"
    if how == DIFF:
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return "-"
        return f"diff {a - b:+.2f}"
    return ratio(a, b)


def main():
    runs = load(sys.argv[1])
    reps = max((r["rep"] for rs in runs.values() for r in rs), default=0)
    print(f"Medians of {reps} repetition(s); CPU is the target process's on-CPU time "
          "(/proc/PID/task/*/schedstat; utime+stime in clock ticks for files from before "
          "mqtt-load read it; for `direct`, mosquitto itself). Rows marked \"all "
          "repetitions\" are sums, not medians.\n")
    head = ["metric"] + TARGETS + ["gw_all / haproxy_hard", "gw_off / haproxy_plain", "gw_all / direct"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, scenario, f, _, *how in ROWS:
        how = how[0] if how else RATIO
        if f is None:
            # The attackers a limiter admits are proxied sessions: take each one's CPU
            # (the churn median of that target) out before dividing by the rejections.
            vals = {}
            for t in TARGETS:
                per_session = median(runs, "churn", t, lambda r: cpu_us(r, "ops"))
                vals[t] = median(runs, scenario, t, lambda r, c=per_session: None if c is None or not r["rejected"]
                                 else (cpu_s(r) * 1e6 - (r["accepted"] + r.get("legit_ok", 0)) * c)
                                 / r["rejected"])
        elif isinstance(f, Total):
            vals = {}
            for t in TARGETS:
                rs = runs.get((scenario, t), [])
                try:
                    vals[t] = f.f(rs) if rs else None
                except (KeyError, TypeError):
                    vals[t] = None
        else:
            vals = {t: median(runs, scenario, t, f) for t in TARGETS}
        if all(v is None for v in vals.values()):
            continue
        cells = [label] + [v if isinstance(v, str) else fmt(v) for v in (vals[t] for t in TARGETS)]
        cells += [compare(vals["gw_all"], vals["haproxy_hard"], how),
                  compare(vals["gw_off"], vals["haproxy_plain"], how),
                  compare(vals["gw_all"], vals["direct"], how)]
        print("| " + " | ".join(cells) + " |")
    print()
    for w in warnings(runs):
        print(f"- **warning**: {w}")
    # Added latency over direct.
    for q in ("p50_us", "p99_us"):
        d = median(runs, "latency", "direct", lambda r: r[q])
        parts = []
        for t in TARGETS[1:]:
            v = median(runs, "latency", t, lambda r: r[q])
            parts.append(f"{t} {fmt(None if v is None or d is None else v - d)}")
        print(f"- added latency {q[:3]} over direct (us): " + ", ".join(parts))
    # The flood goal: the legitimate clients keep >= 99.9 % success. Shown when the 95 %
    # upper bound on their failure rate over every repetition's attempts is <= 0.1 %.
    parts = []
    for t in TARGETS:
        rs = runs.get(("flood", t), [])
        try:
            n, x = legit_attempts(rs), legit_failures(rs)
        except (KeyError, TypeError):
            continue
        bound, method = failure_bound(n, x)
        if bound is None:
            continue
        verdict = "shown" if bound <= 0.001 else "not shown"
        parts.append(f"{t} {x:,} failed of {n:,}: failure rate <= {100 * bound:.3f} % ({method}), {verdict}")
    if parts:
        print("- flood, legitimate success >= 99.9 % (95 % upper bound on the failure rate over all "
              "repetitions): " + "; ".join(parts))
    slow = [r for t in TARGETS for r in runs.get(("slowloris", t), [])]
    if slow:
        if all(r.get("late_from") == "before_connect" for r in slow):
            print("- slowloris lateness is timed from before each connect: an upper bound on how late"
                  " the target cut")
        else:
            print("- slowloris lateness of runs from before mqtt-load's `late_from` is timed from after"
                  " the connect returned: it reads early by the connect's delay")
    # The churn goals as ratios within each repetition: gw_all and HAProxy hardened run
    # two runs apart (gw_off between them, in either order), so a repetition's two runs
    # share the machine's state, which moves the medians above by more than the
    # products differ.
    for label, f in (("sessions/s", lambda r: r["per_s"]),
                     ("CPU per session", lambda r: cpu_us(r, "ops"))):
        pairs = paired(runs, "churn", "gw_all", "haproxy_hard", f)
        if pairs:
            print(f"- churn {label}, gw_all / haproxy_hard within each repetition: "
                  + ", ".join(f"{v:.2f}" for v in pairs)
                  + f" (median {statistics.median(pairs):.2f})")


def paired(runs, scenario, a, b, f):
    """f(a) / f(b) for each repetition that has both."""
    by_rep = {t: {r["rep"]: r for r in runs.get((scenario, t), [])} for t in (a, b)}
    out = []
    for rep in sorted(by_rep[a]):
        try:
            x, y = f(by_rep[a][rep]), f(by_rep[b][rep])
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        if x is not None and y:
            out.append(x / y)
    return out


if __name__ == "__main__":
    main()
