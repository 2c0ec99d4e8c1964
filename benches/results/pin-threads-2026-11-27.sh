#!/bin/bash
# Scratch (BENCHMARKS.md, item 1): as GATEWAY_B of benches/churn_pairs.sh; /tmp/gw-544af73 was the default build.
# Scratch: the gateway with its two runtime threads pinned, one per core.
( sleep 0.3
  for t in /proc/$$/task/*; do
    tid=${t##*/}
    case $(cat $t/comm 2>/dev/null) in
      aegis-runtime-1) taskset -pc 1 $tid ;;
      gw-544af73) taskset -pc 0 $tid ;;
    esac
  done ) >/dev/null 2>&1 &
exec /tmp/gw-544af73 "$@"
