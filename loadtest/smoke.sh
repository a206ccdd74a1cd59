#!/usr/bin/env bash
# A short run of every scenario against wsgate and the Socket.IO peer (small N, seconds long),
# so that the load generator and the peer cannot rot. Needs cargo, node + npm, redis-server,
# strace (perf, where installed and allowed, counts the write calls instead).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$here/compare.sh" --smoke --out "$out" "$@"
missing=0
# compare.sh goes on past a run that failed its own checks (and lists it); the smoke run does not.
if [[ -s "$out/failed-runs.txt" ]]; then
  echo "smoke: runs that failed their checks: $(tr '\n' ' ' <"$out/failed-runs.txt")" >&2
  missing=1
fi
# Every scenario must have produced a result for both targets.
for s in idle fanout burst chat storm backend-storm memory-100 memory-300; do
  for t in wsgate socketio; do
    if [[ ! -s "$out/$s-$t-r1.json" ]]; then
      echo "smoke: no result for $s against $t" >&2
      missing=1
    fi
  done
done
for f in floor-reader-r1 floor-noreader-r1 summary; do
  if [[ ! -s "$out/$f.json" ]]; then
    echo "smoke: no $f.json" >&2
    missing=1
  fi
done
# The write-call step must have counted something for both targets.
for t in wsgate socketio; do
  if ! grep -q '"total_per_delivery"' "$out/fanout-$t-r1.json" || grep -q '"error": "' "$out/fanout-$t-r1.json"; then
    echo "smoke: no socket write calls counted against $t" >&2
    missing=1
  fi
done
[[ "$missing" == 0 ]] || exit 1
echo "smoke: every scenario ran against wsgate and the Socket.IO peer (cluster mode)"
