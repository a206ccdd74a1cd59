#!/usr/bin/env bash
# Per-user notifications through one Redis vs a Redis Cluster of 3 masters (+3 replicas):
# three wsgate nodes each time, the fanout scenario with one recipient per notification
# (each notification goes to one user channel, the Moqui normal case), rates stepped up until a
# step loses a message or misses its latency bound. Prints the highest lossless rate of each.
#
#   loadtest/shards.sh                          # 3,000 connections, default rates
#   CONNS=6000 RATES=10000,20000,40000 loadtest/shards.sh
#
# Needs the release binaries (cargo build --release -p wsgate -p wsgate-loadtest), redis-server
# and redis-cli (Redis 7). Ports are taken from 20000-40000 (a cluster bus port is port+10000).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
WSGATE=$root/target/release/wsgate
LT=$root/target/release/wsgate-loadtest
conns=${CONNS:-3000}
rates=${RATES:-5000,10000,20000,30000,40000,60000}
duration=${DURATION:-4}
out=${OUT:-$root/loadtest/results/run-shards-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for bin in "$WSGATE" "$LT"; do
  [[ -x "$bin" ]] || { echo "missing $bin: cargo build --release -p wsgate -p wsgate-loadtest" >&2; exit 1; }
done
command -v redis-cli >/dev/null || { echo "redis-cli missing: apt-get install redis-server" >&2; exit 1; }

base=$((20000 + RANDOM % 15000))
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

"$WSGATE" demo-backend --listen "127.0.0.1:$base" >"$work/backend.log" 2>&1 &
pids+=($!)
wait_port "$base"
backend="http://127.0.0.1:$base"
token=loadtest-token

redis() { # port [extra args...]
  local port=$1; shift
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" "$@" \
    >"$work/redis-$port.log" 2>&1 &
  pids+=($!)
  wait_port "$port"
}

# run NAME MODE URL: three gateway nodes on that Redis, then the fanout sweep.
run() {
  local name=$1 mode=$2 url=$3 ws=() admin=() node_pids=()
  for i in 0 1 2; do
    local pub=$((base + 100 + i * 2)) adm=$((base + 101 + i * 2))
    "$WSGATE" serve --listen "127.0.0.1:$pub" --admin-listen "127.0.0.1:$adm" \
      --backend-url "$backend" --api-token "$token" --log-level warn --max-handshakes-per-ip 0 \
      --node-id "$name$i" --redis-mode "$mode" --redis-url "$url" >"$work/$name-$i.log" 2>&1 &
    node_pids+=($!)
    ws+=("ws://127.0.0.1:$pub")
    admin+=("http://127.0.0.1:$adm")
    wait_port "$adm"
  done
  for a in "${admin[@]}"; do
    for _ in $(seq 200); do curl -sf "$a/readyz" >/dev/null && break; sleep 0.05; done
  done
  local IFS=,
  "$LT" fanout --target wsgate --url "${ws[*]}" --admin-url "${admin[*]}" --api-token "$token" \
    --backend-url "$backend" --pid "${node_pids[*]}" --connections "$conns" --recipients 1 \
    --rates "$rates" --duration "$duration" --out "$out" --name "$name" 2>&1 | tee "$out/$name.txt"
  unset IFS
  for p in "${node_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${node_pids[@]}" 2>/dev/null || true
}

# One shard: a single Redis.
redis $((base + 1))
run one-shard standalone "redis://127.0.0.1:$((base + 1))"

# Three shards: a Redis Cluster of 3 masters and 3 replicas.
ports=()
for i in 0 1 2 3 4 5; do
  p=$((base + 10 + i))
  redis "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf" --cluster-node-timeout 2000
  ports+=("127.0.0.1:$p")
done
redis-cli --cluster create "${ports[@]}" --cluster-replicas 1 --cluster-yes >"$work/create.log"
for _ in $(seq 200); do
  redis-cli -p $((base + 10)) cluster info | grep -q 'cluster_state:ok' && break
  sleep 0.1
done
run three-shards cluster "redis://127.0.0.1:$((base + 10)),redis://127.0.0.1:$((base + 11)),redis://127.0.0.1:$((base + 12))"

echo "results in $out"
