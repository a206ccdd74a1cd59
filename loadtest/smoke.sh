#!/usr/bin/env bash
# A short run of every scenario against wsgate and the Socket.IO peer (small N, seconds long),
# so that the load generator and the peer cannot rot. Needs cargo, node + npm, redis-server.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$here/compare.sh" --smoke --out "$out" "$@"
# Every scenario must have produced a result for both targets.
missing=0
for s in idle fanout burst chat storm; do
  for t in wsgate socketio; do
    if [[ ! -s "$out/$s-$t-r1.json" ]]; then
      echo "smoke: no result for $s against $t" >&2
      missing=1
    fi
  done
done
if [[ ! -s "$out/backend-storm-wsgate-r1.json" ]]; then
  echo "smoke: no result for backend-storm against wsgate" >&2
  missing=1
fi
[[ "$missing" == 0 ]] || exit 1
echo "smoke: every scenario ran against wsgate and the Socket.IO peer"
