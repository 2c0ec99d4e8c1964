#!/usr/bin/env python3
"""Rounds of benches/churn_pairs.sh series pooled: each target's ratio to HAProxy hardened
in the same round (sessions per second, CPU per session), its median over all the rounds
given, and a 95 % bootstrap interval of that median.

    python3 benches/churn_pool.py SERIES.jsonl [SERIES.jsonl ...]

One series of 24 to 48 rounds moves by a few per cent from the next (BENCHMARKS.md);
pooling series of the same build says how far the gateway is from HAProxy with the
uncertainty that is left, and the control (haproxy_hard_b, the same product as the
reference) shows what the method reads for two equal products. Pool only series of the
same builds and configurations: the script cannot tell. The bootstrap resamples the
rounds (4,000 times, a fixed seed, so the same files print the same intervals).
"""
import json
import random
import statistics
import sys

REFERENCE = "haproxy_hard"
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


def interval(xs, rng):
    """A 95 % bootstrap interval of the median of xs."""
    medians = sorted(
        statistics.median(rng.choices(xs, k=len(xs))) for _ in range(RESAMPLES)
    )
    return medians[int(0.025 * RESAMPLES)], medians[int(0.975 * RESAMPLES) - 1]


def main(paths):
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    ratios = {}
    for path in paths:
        for runs in rounds(path).values():
            ref = runs.get(REFERENCE)
            if not ref or not ref.get("per_s") or not ref.get("cpu_us"):
                continue
            for target, r in runs.items():
                if target == REFERENCE or not r.get("per_s") or not r.get("cpu_us"):
                    continue
                rate = r["per_s"] / ref["per_s"]
                cpu = r["cpu_us"] / ref["cpu_us"]
                ratios.setdefault(target, []).append((rate, cpu))
    if not ratios:
        print("no rounds with haproxy_hard and another target", file=sys.stderr)
        return 1
    rng = random.Random(1)
    print(f"{len(paths)} series pooled; ratios to {REFERENCE} in the same round")
    print()
    print("| target | rounds | sessions/s: median [95 % interval] | CPU per session: median [95 % interval] |")
    print("|---|---|---|---|")
    for target in sorted(ratios):
        pairs = ratios[target]
        rates = [p[0] for p in pairs]
        cpus = [p[1] for p in pairs]
        r_lo, r_hi = interval(rates, rng)
        c_lo, c_hi = interval(cpus, rng)
        print(
            f"| {target} | {len(pairs)} | {statistics.median(rates):.3f} "
            f"[{r_lo:.3f}, {r_hi:.3f}] | {statistics.median(cpus):.3f} "
            f"[{c_lo:.3f}, {c_hi:.3f}] |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
