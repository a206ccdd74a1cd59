#!/usr/bin/env bash
# Instructions the gateway executes per delivery, counted by valgrind's callgrind. Unlike CPU
# time, an instruction count barely moves with what else the machine is doing, so two builds can
# be compared on a busy 2-core machine where their CPU times differ by less than the noise.
#   loadtest/instructions.sh [--connections N] [--rate R] [--seconds S] [--out DIR] [BIN...]
# Each BIN (default: the release build of this checkout) runs `serve` on the Redis broker under
# callgrind, with N subscribers (default 2,000, distinct users) and notifications to 1,000 of them
# at R deliveries/s (default 2,000: what a node slowed down fifty times by callgrind still
# sustains). After the warm-up, the counts are zeroed, S seconds (default 10) are counted, and
# the node's own wsgate_deliveries_total gives the deliveries of that window.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
conns=2000
rate=2000
seconds=10
out=""
base_port="${BASE_PORT:-19400}"
bins=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --connections) conns="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) echo "unknown argument: $1" >&2; exit 64 ;;
    *) bins+=("$1"); shift ;;
  esac
done
for tool in cargo redis-server redis-cli valgrind callgrind_control callgrind_annotate curl python3; do
  command -v "$tool" >/dev/null || {
    echo "instructions.sh: $tool is required (valgrind and callgrind_*: Debian's valgrind)" >&2
    exit 1
  }
done
[[ -z "$out" ]] && out="$here/results/instructions-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out/logs"
out="$(cd "$out" && pwd)"
if [[ -z "${LOADTEST_BIN:-}" || ${#bins[@]} -eq 0 ]]; then
  (cd "$root" && cargo build -q --release -p wsgate -p wsgate-loadtest)
fi
LT="${LOADTEST_BIN:-$root/target/release/wsgate-loadtest}"
[[ ${#bins[@]} -eq 0 ]] && bins=("$root/target/release/wsgate")
recipients=$((conns / 2))
[[ $recipients -gt 1000 ]] && recipients=1000

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {
  local i
  for i in $(seq 1 600); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "instructions.sh: nothing listens on $1:$2 (see $out/logs)" >&2
  return 1
}

port_backend=$base_port
port_redis=$((base_port + 1))
port_ws=$((base_port + 2))
port_admin=$((base_port + 3))
token="loadtest-token"
"${bins[0]}" demo-backend --listen "127.0.0.1:$port_backend" >"$out/logs/backend.log" 2>&1 &
pids+=($!)
redis-server --port "$port_redis" --bind 127.0.0.1 --save '' --appendonly no >"$out/logs/redis.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1 "$port_backend"
wait_port 127.0.0.1 "$port_redis"

deliveries() {
  curl -s "http://127.0.0.1:$port_admin/metrics" |
    awk '/^wsgate_deliveries_total/ {n += $2} END {printf "%d\n", n}'
}

echo "| build | instructions per delivery | deliveries counted | instructions |" >"$out/summary.md"
echo "| --- | ---: | ---: | ---: |" >>"$out/summary.md"
i=0
for bin in "${bins[@]}"; do
  i=$((i + 1))
  name="$i-$(basename "$bin")"
  redis-cli -p "$port_redis" flushall >/dev/null
  valgrind --tool=callgrind --callgrind-out-file="$out/$name.callgrind" \
    "$bin" serve --listen "127.0.0.1:$port_ws" --admin-listen "127.0.0.1:$port_admin" \
    --backend-url "http://127.0.0.1:$port_backend" --api-token "$token" --log-level warn \
    --max-handshakes-per-ip 0 --redis-url "redis://127.0.0.1:$port_redis" \
    >"$out/logs/$name.log" 2>&1 &
  node=$!
  pids+=("$node")
  wait_port 127.0.0.1 "$port_admin"
  # Under callgrind the node takes seconds to subscribe; until then it refuses upgrades.
  for _ in $(seq 1 1200); do
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port_admin/readyz")" == 200 ]] && break
    sleep 0.25
  done
  # Long enough for the warm-up, the counted window and a margin; the generator's own verdicts
  # (latency under callgrind) do not matter here.
  (cd "$out" && "$LT" fanout --target wsgate --out . --name "$name-load" \
    --backend-url "http://127.0.0.1:$port_backend" --api-token "$token" \
    --url "ws://127.0.0.1:$port_ws" --admin-url "http://127.0.0.1:$port_admin" --pid "$node" \
    --connections "$conns" --recipients "$recipients" --rates "$rate" \
    --duration $((seconds + 15)) --warmup 3 --floor-seconds 0 --strace-seconds 0 \
    --connect-concurrency 32 --connect-timeout 60 --p99-limit-ms 1000000 --no-stop \
    >"$out/logs/$name-load.log" 2>&1) &
  load=$!
  for _ in $(seq 1 1200); do
    grep -q "step 1: $rate deliveries/s =" "$out/logs/$name-load.log" 2>/dev/null && break
    kill -0 "$load" 2>/dev/null || break
    sleep 0.5
  done
  grep -q "step 1: $rate deliveries/s =" "$out/logs/$name-load.log" || {
    echo "instructions.sh: the load did not reach its counted step (see $out/logs/$name-load.log)" >&2
    exit 1
  }
  sleep 3
  callgrind_control -z "$node" >/dev/null
  d0=$(deliveries)
  sleep "$seconds"
  d1=$(deliveries)
  callgrind_control -d "$node" >/dev/null
  wait "$load" || true
  kill "$node" 2>/dev/null || true
  wait "$node" 2>/dev/null || true
  dump=$(ls -t "$out/$name.callgrind".* | head -1)
  total=$(callgrind_annotate --auto=no --threshold=100 "$dump" 2>/dev/null |
    awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
  # The functions that executed the most, each with what it ran itself (inlined code counts to
  # the function it was inlined into, under its own source file).
  callgrind_annotate --auto=no --threshold=100 "$dump" 2>/dev/null | head -100 >"$out/$name-functions.txt" || true
  n=$((d1 - d0))
  [[ $n -gt 0 ]] || { echo "instructions.sh: no deliveries counted for $bin" >&2; exit 1; }
  per=$(python3 -c "print(f'{$total / $n:,.0f}')")
  echo "$name: $per instructions per delivery ($n deliveries, $total instructions)"
  echo "| $name | $per | $n | $total |" >>"$out/summary.md"
done
echo "wrote $out/summary.md"
