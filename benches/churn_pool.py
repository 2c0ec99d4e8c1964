#!/usr/bin/env python3
"""Rounds of benches/churn_pairs.sh series pooled: each target's ratio to HAProxy hardened
in the same round (sessions per second, CPU per session), its median over all the rounds
given, and a 95 % bootstrap interval of that median; each series' own medians too.

    python3 benches/churn_pool.py SERIES.jsonl [SERIES.jsonl ...]

One series of 24 to 48 rounds moves by a few per cent from the next (BENCHMARKS.md);
pooling series of the same build says how far the gateway is from HAProxy with the
uncertainty that is left, and the control (haproxy_hard_b, the same product as the
reference) shows what the method reads for two equal products. Pool only series of the
same builds and configurations, and choose the series before reading the result: the
script cannot tell.

The rounds of one series are not independent draws: without `RESTART=1` every round of a
series runs the same processes, whose layout in memory can favour one of them for as
long as it runs, and a series shares one machine's state at one time. So the bootstrap
resamples in two stages (4,000 times, a fixed seed, so the same files print the same
intervals): the series, with replacement, and then the rounds within each series drawn.
With one series it resamples its rounds alone, an interval that is too narrow by however
much the series' processes and moment set it apart.

Where a round has both HAProxy copies, a second table takes as the reference their
geometric mean (the two copies are the same product, so the mean halves the reference's
own noise); the control has no row there.
"""
import json
import math
import random
import statistics
import sys

REFERENCE = "haproxy_hard"
CONTROL = "haproxy_hard_b"
RESAMPLES = 4000


def rounds(path):
    """The churn runs of one series, by round: {round: {target: run}}."""
    by_round = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r.get("mode") != "churn":
                continue
            by_round.setdefault(r["pair"], {})[r["target"]] = r
    return by_round


def usable(run):
    return bool(run and run.get("per_s") and run.get("cpu_us"))


def ratios_of(runs, both):
    """{target: (rate, cpu)} for one round: each target over the reference, or with
    `both` over the geometric mean of the two HAProxy copies (None without both)."""
    ref = runs.get(REFERENCE)
    if not usable(ref):
        return {}
    per_s, cpu_us = ref["per_s"], ref["cpu_us"]
    if both:
        control = runs.get(CONTROL)
        if not usable(control):
            return {}
        per_s = math.sqrt(per_s * control["per_s"])
        cpu_us = math.sqrt(cpu_us * control["cpu_us"])
    out = {}
    for target, r in runs.items():
        if target == REFERENCE or (both and target == CONTROL) or not usable(r):
            continue
        out[target] = (r["per_s"] / per_s, r["cpu_us"] / cpu_us)
    return out


def interval(series, rng):
    """A 95 % interval of the pooled median of the (rate, cpu) pairs in `series` (a list
    of per-series lists), by the two-stage bootstrap: ((rate lo, hi), (cpu lo, hi))."""
    rates, cpus = [], []
    for _ in range(RESAMPLES):
        drawn = rng.choices(series, k=len(series)) if len(series) > 1 else series
        pool = [p for s in drawn for p in rng.choices(s, k=len(s))]
        rates.append(statistics.median(p[0] for p in pool))
        cpus.append(statistics.median(p[1] for p in pool))
    lo, hi = int(0.025 * RESAMPLES), int(0.975 * RESAMPLES) - 1
    rates.sort()
    cpus.sort()
    return (rates[lo], rates[hi]), (cpus[lo], cpus[hi])


def table(paths, both, rng):
    """Prints the pooled table; returns whether it had any row."""
    by_target = {}
    for path in paths:
        per_series = {}
        for runs in rounds(path).values():
            for target, pair in ratios_of(runs, both).items():
                per_series.setdefault(target, []).append(pair)
        for target, pairs in per_series.items():
            by_target.setdefault(target, []).append((path, pairs))
    if not by_target:
        return False
    print("| target | series | rounds | sessions/s: median [95 % interval] "
          "| CPU per session: median [95 % interval] |")
    print("|---|---|---|---|---|")
    for target in sorted(by_target):
        series = [pairs for _, pairs in by_target[target]]
        pooled = [p for s in series for p in s]
        (r_lo, r_hi), (c_lo, c_hi) = interval(series, rng)
        print(
            f"| {target} | {len(series)} | {len(pooled)} "
            f"| {statistics.median(p[0] for p in pooled):.3f} [{r_lo:.3f}, {r_hi:.3f}] "
            f"| {statistics.median(p[1] for p in pooled):.3f} [{c_lo:.3f}, {c_hi:.3f}] |"
        )
    print()
    print("Each series' medians (sessions/s, CPU per session):")
    print()
    for target in sorted(by_target):
        for path, pairs in by_target[target]:
            print(
                f"- {target}, {path} ({len(pairs)} rounds): "
                f"{statistics.median(p[0] for p in pairs):.3f}, "
                f"{statistics.median(p[1] for p in pairs):.3f}"
            )
    return True


def main(paths):
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rng = random.Random(1)
    print(f"{len(paths)} series pooled; ratios to {REFERENCE} in the same round")
    print()
    if not table(paths, False, rng):
        print(f"no rounds with {REFERENCE} and another target", file=sys.stderr)
        return 1
    print()
    print(f"Ratios to the geometric mean of {REFERENCE} and {CONTROL} in the same round")
    print()
    if not table(paths, True, rng):
        print(f"(no round has both {REFERENCE} and {CONTROL} and a third target)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
