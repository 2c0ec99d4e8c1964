#!/bin/bash
# Scratch (BENCHMARKS.md, item 1): as GATEWAY_B of benches/churn_pairs.sh; /tmp/gw-cpu was the build of incoming-cpu-scratch-2026-11-27.diff.
# Scratch: a reuseport listener per runtime steered by SO_INCOMING_CPU, each runtime's thread pinned to its CPU.
( sleep 0.3
  for t in /proc/$$/task/*; do
    tid=${t##*/}
    case $(cat $t/comm 2>/dev/null) in
      aegis-runtime-1) taskset -pc 1 $tid ;;
      gw-cpu) taskset -pc 0 $tid ;;
    esac
  done ) >/dev/null 2>&1 &
export AEGIS_SCRATCH_CPU=1
exec /tmp/gw-cpu "$@"
