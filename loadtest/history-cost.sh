#!/usr/bin/env bash
# What per-channel history (--history-ttl) costs: the same node on the same redis-server, with
# history on (60s) and off (0), in alternating turns for several rounds.
#   loadtest/history-cost.sh [--rounds N] [--connections N] [--rates R1,R2] [--out DIR]
# Per turn: the fanout scenario with one recipient per publish (one channel, one history append
# per publish) at each rate: achieved publishes/s, the gateway's CPU per delivered message, and
# redis-server's CPU per publish (from /proc). Then Redis memory per 1,000 retained messages:
# 1,000 notifications of the scenario's size to one user, `MEMORY USAGE` of that user's stream.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
rounds=5
conns=1000
rates="5000,10000,20000"
out=""
base_port="${BASE_PORT:-19300}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --connections) conns="$2"; shift 2 ;;
    --rates) rates="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
done
for tool in cargo redis-server redis-cli python3; do
  command -v "$tool" >/dev/null || { echo "history-cost.sh: $tool is required" >&2; exit 1; }
done
[[ -z "$out" ]] && out="$here/results/history-cost-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out/logs"
out="$(cd "$out" && pwd)"
if [[ -z "${WSGATE_BIN:-}" || -z "${LOADTEST_BIN:-}" ]]; then
  (cd "$root" && cargo build -q --release -p wsgate -p wsgate-loadtest)
fi
WSGATE="${WSGATE_BIN:-$root/target/release/wsgate}"
LT="${LOADTEST_BIN:-$root/target/release/wsgate-loadtest}"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0; sleep 0.1; done; echo "port $2 never opened" >&2; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

p_backend=$base_port p_redis=$((base_port + 1)) p_pub=$((base_port + 2)) p_adm=$((base_port + 3))
token=loadtest-token
"$WSGATE" demo-backend --listen "127.0.0.1:$p_backend" >"$out/logs/backend.log" 2>&1 &
pids+=($!)
redis-server --port "$p_redis" --bind 127.0.0.1 --save '' --appendonly no >"$out/logs/redis.log" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
wait_port 127.0.0.1 "$p_backend"
wait_port 127.0.0.1 "$p_redis"
hz=$(getconf CLK_TCK)

for r in $(seq 1 "$rounds"); do
  for ttl in 60s 0s; do
    name="fanout-history-$ttl-r$r"
    "$WSGATE" serve --listen "127.0.0.1:$p_pub" --admin-listen "127.0.0.1:$p_adm" \
      --backend-url "http://127.0.0.1:$p_backend" --api-token "$token" --log-level warn \
      --redis-url "redis://127.0.0.1:$p_redis" --history-ttl "$ttl" --node-id cost \
      >"$out/logs/wsgate-$name.log" 2>&1 &
    gw=$!
    wait_port 127.0.0.1 "$p_adm"
    sleep 0.5
    r0=$(cpu_ticks "$redis_pid")
    (cd "$out" && "$LT" fanout --url "ws://127.0.0.1:$p_pub" --admin-url "http://127.0.0.1:$p_adm" \
      --backend-url "http://127.0.0.1:$p_backend" --api-token "$token" --pid "$gw" \
      --connections "$conns" --recipients 1 --rates "$rates" --duration 4 --warmup 1 \
      --floor-seconds 0.5 --no-stop --user-prefix "h$ttl$r" --out . --name "$name") \
      >>"$out/logs/loadtest.log" 2>&1
    r1=$(cpu_ticks "$redis_pid")
    echo "$name redis_cpu_seconds $(python3 -c "print(($r1 - $r0) / $hz)")" >>"$out/redis-cpu.txt"
    kill "$gw"; wait "$gw" 2>/dev/null || true
  done
done

# Memory per 1,000 retained messages (the payload the scenario publishes, 200 bytes of message).
"$WSGATE" serve --listen "127.0.0.1:$p_pub" --admin-listen "127.0.0.1:$p_adm" \
  --backend-url "http://127.0.0.1:$p_backend" --api-token "$token" --log-level warn \
  --redis-url "redis://127.0.0.1:$p_redis" --history-ttl 600s --node-id cost >"$out/logs/wsgate-memory.log" 2>&1 &
gw=$!
wait_port 127.0.0.1 "$p_adm"
python3 - "$p_adm" "$token" <<'PY' >"$out/publish-memory.log"
import json, sys, urllib.request
port, token = sys.argv[1], sys.argv[2]
for i in range(1000):
    body = json.dumps({"userIds": ["memory-user"], "notification": {"topic": "T", "title": str(i), "message": {"n": "x" * 200}}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/notifications", body, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert urllib.request.urlopen(req).status == 202
PY
{
  echo "stream_entries $(redis-cli -p "$p_redis" XLEN '{wsgate:u:memory-user}:history')"
  echo "memory_usage_bytes $(redis-cli -p "$p_redis" MEMORY USAGE '{wsgate:u:memory-user}:history' SAMPLES 0)"
} >"$out/memory.txt"
kill "$gw"; wait "$gw" 2>/dev/null || true

python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys, pathlib
out, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
cpu = dict(l.split()[0::2] for l in (out / "redis-cpu.txt").read_text().splitlines())
rows = {}
for ttl in ("60s", "0s"):
    for r in range(1, rounds + 1):
        name = f"fanout-history-{ttl}-r{r}"
        res = json.loads((out / f"{name}.json").read_text())
        steps = res["results"]["steps"]
        sent = sum(s["publishes_sent"] for s in steps) or 1
        for s in steps:
            rows.setdefault((ttl, s["target_deliveries_per_second"]), []).append(
                (s["deliveries_per_second"], s["server_cpu_us_per_delivery"], s["lost"],
                 float(cpu[name]) * 1e6 / sent))
def med(v):
    return f"{statistics.median(v):.1f} (range {min(v):.1f}–{max(v):.1f})"
lines = ["| history | target publishes/s | delivered (= published) per second | gateway CPU µs per delivery | Redis CPU µs per publish (whole run) | lost |", "|---|---|---|---|---|---|"]
for (ttl, rate), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    lines.append(f"| {ttl} | {rate} | {med([x[0] for x in v])} | {med([x[1] for x in v])} | {med([x[3] for x in v])} | {sum(x[2] for x in v)} |")
mem = dict(l.split() for l in (out / "memory.txt").read_text().splitlines())
lines.append("")
lines.append(f"Redis memory for {mem['stream_entries']} retained messages: {mem['memory_usage_bytes']} bytes (MEMORY USAGE of the stream).")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
