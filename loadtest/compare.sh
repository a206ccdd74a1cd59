#!/usr/bin/env bash
# Runs every load-test scenario against wsgate and the Socket.IO peer, in turns, in one
# invocation, then prints the ratios (medians over rounds).
#
#   loadtest/compare.sh [--smoke] [--rounds N] [--out DIR] [--scenarios LIST] [--connections N]
#
# Needs: cargo, node + npm (the peer's modules are installed with `npm ci`), redis-server (for
# the two-node chat scenario). With WSGATE_BIN and LOADTEST_BIN set, nothing is built. Every server it starts listens on 127.0.0.1 only and is stopped
# when the script ends.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

smoke=0
rounds=3
out=""
scenarios="idle,fanout,burst,chat,storm,backend-storm"
conns=10000
profile="${PROFILE:-release}"
base_port="${BASE_PORT:-19100}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; rounds=1; conns=300; profile="${PROFILE:-debug}"; shift ;;
    --rounds) rounds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --scenarios) scenarios="$2"; shift 2 ;;
    --connections) conns="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
done

if [[ -z "$out" ]]; then
  out="$here/results/run-$(date -u +%Y%m%dT%H%M%SZ)"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
logs="$out/logs"
mkdir -p "$logs"

# ---------------------------------------------------------------- build
for tool in cargo node npm; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool is required" >&2; exit 1; }
done
if [[ ",$scenarios," == *",chat,"* ]] && ! command -v redis-server >/dev/null; then
  echo "compare.sh: redis-server is required for the chat scenario (apt-get install redis-server)" >&2
  exit 1
fi
cargo_flags=()
[[ "$profile" == "release" ]] && cargo_flags+=(--release)
if [[ -n "${WSGATE_BIN:-}" && -n "${LOADTEST_BIN:-}" ]]; then
  WSGATE="$WSGATE_BIN"
  LT="$LOADTEST_BIN"
else
  (cd "$root" && cargo build -q "${cargo_flags[@]}" -p wsgate -p wsgate-loadtest)
  target_dir="$(cd "$root" && cargo metadata --format-version 1 --no-deps | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).target_directory))')"
  bin="$target_dir/$profile"
  WSGATE="${WSGATE_BIN:-$bin/wsgate}"
  LT="${LOADTEST_BIN:-$bin/wsgate-loadtest}"
fi
peer_dir="$here/peers/socketio"
if [[ ! -d "$peer_dir/node_modules/socket.io" ]]; then
  (cd "$peer_dir" && npm ci --no-audit --no-fund --silent)
fi

# ---------------------------------------------------------------- processes
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do
    [[ -n "$p" ]] && kill "$p" 2>/dev/null || true
  done
  for p in "${pids[@]:-}"; do
    [[ -n "$p" ]] && wait "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT

wait_port() { # host port
  local i
  for i in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "compare.sh: nothing listens on $1:$2 (see $logs)" >&2
  return 1
}

stop() { # pid
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

port_backend=$((base_port + 0))
port_redis=$((base_port + 1))
backend_url="http://127.0.0.1:$port_backend"
token="loadtest-token"

"$WSGATE" demo-backend --listen "127.0.0.1:$port_backend" >"$logs/backend.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1 "$port_backend"

redis_pid=""
start_redis() {
  [[ -n "$redis_pid" ]] && return 0
  redis-server --port "$port_redis" --bind 127.0.0.1 --save '' --appendonly no >"$logs/redis.log" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  wait_port 127.0.0.1 "$port_redis"
}

# The back-end storm's back-end: a servlet-like pool of 16 workers, 25 ms per request.
port_slow=$((base_port + 2))
slow_url="http://127.0.0.1:$port_slow"
slow_pid=""
start_slow_backend() {
  [[ -n "$slow_pid" ]] && return 0
  "$LT" slow-backend --listen "127.0.0.1:$port_slow" --workers 16 --service-ms 25 >"$logs/slow-backend.log" 2>&1 &
  slow_pid=$!
  pids+=("$slow_pid")
  wait_port 127.0.0.1 "$port_slow"
}

# start_server TARGET NODE_INDEX [redis] -> sets srv_pid, srv_ws, srv_admin
# (SERVER_BACKEND_URL overrides the back-end.)
start_server() {
  local target="$1" idx="$2" redis="${3:-}"
  local backend_url="${SERVER_BACKEND_URL:-$backend_url}"
  local pub=$((base_port + 10 + idx * 2)) adm=$((base_port + 11 + idx * 2))
  if [[ "$target" == "wsgate" ]]; then
    local extra=()
    [[ -n "$redis" ]] && extra+=(--redis-url "redis://127.0.0.1:$port_redis")
    "$WSGATE" serve --listen "127.0.0.1:$pub" --admin-listen "127.0.0.1:$adm" \
      --backend-url "$backend_url" --api-token "$token" --log-level warn \
      --max-handshakes-per-ip 0 \
      --node-id "node$idx" "${extra[@]}" >"$logs/wsgate-$idx.log" 2>&1 &
  else
    local extra=()
    [[ -n "$redis" ]] && extra+=(--redis-url "redis://127.0.0.1:$port_redis")
    node "$peer_dir/server.js" --listen "127.0.0.1:$pub" --admin-listen "127.0.0.1:$adm" \
      --backend-url "$backend_url" --api-token "$token" "${extra[@]}" >"$logs/socketio-$idx.log" 2>&1 &
  fi
  srv_pid=$!
  pids+=("$srv_pid")
  srv_ws="ws://127.0.0.1:$pub"
  srv_admin="http://127.0.0.1:$adm"
  wait_port 127.0.0.1 "$pub"
  wait_port 127.0.0.1 "$adm"
}

# ---------------------------------------------------------------- parameters
if [[ "$smoke" == 1 ]]; then
  idle_args=(--connections "$conns" --hold 1)
  fan_args=(--connections "$conns" --recipients 100 --rates 2000,5000 --duration 2 --floor-seconds 1 --warmup 1 --no-stop)
  burst_args=(--connections "$conns" --recipients 100 --rates 5000 --duration 2 --burst 8 --floor-seconds 1 --warmup 1 --no-stop)
  chat_args=(--pairs 50 --rates 200 --duration 2)
  storm_args=(--connections "$conns" --keys 30 --spread 0.5 --deadline 20)
  bstorm_args=(--connections "$conns" --deadline 30 --limit 30)
else
  recip=$((conns / 10))
  idle_args=(--connections "$conns" --hold 5)
  fan_args=(--connections "$conns" --recipients "$recip" --rates 25000,50000,100000,150000,200000,250000 --duration 5 --floor-seconds 2)
  burst_args=(--connections "$conns" --recipients "$recip" --rates 50000,100000,200000,250000 --duration 5 --burst 16 --floor-seconds 2)
  chat_args=(--pairs 1000 --rates 2000,5000,10000 --duration 5)
  storm_args=(--connections "$conns" --keys $((conns / 10)) --spread 1 --deadline 30)
  # As in a reconnect storm after a node loss: 4,000 distinct users at the same instant.
  bstorm_args=(--connections 4000 --deadline 60 --limit 8)
fi

run_lt() { # scenario target name args...
  local scen="$1" target="$2" name="$3"
  shift 3
  echo "== $name" >&2
  # Run inside the result directory so that the recorded command line names no local path.
  (cd "$out" && "$LT" "$scen" --target "$target" --backend-url "$backend_url" --api-token "$token" \
    --out . --name "$name" "$@") 2>&1 | tee -a "$logs/loadtest.log" >&2
}

IFS=',' read -r -a scen_list <<<"$scenarios"
for r in $(seq 1 "$rounds"); do
  for scen in "${scen_list[@]}"; do
    for target in wsgate socketio; do
      prefix="r${r}${target:0:1}"
      case "$scen" in
        idle|fanout|burst|storm)
          start_server "$target" 0
          lt_scen="$scen"
          args=()
          case "$scen" in
            idle) args=("${idle_args[@]}") ;;
            fanout) args=("${fan_args[@]}") ;;
            burst) lt_scen=fanout; args=("${burst_args[@]}") ;;
            storm) args=("${storm_args[@]}") ;;
          esac
          sleep 0.5
          run_lt "$lt_scen" "$target" "$scen-$target-r$r" --url "$srv_ws" --admin-url "$srv_admin" \
            --pid "$srv_pid" --user-prefix "$prefix" "${args[@]}"
          stop "$srv_pid"
          ;;
        backend-storm)
          # wsgate only: the peer has no back-end admission to compare.
          [[ "$target" == "wsgate" ]] || continue
          start_slow_backend
          SERVER_BACKEND_URL="$slow_url" start_server wsgate 0
          sleep 0.5
          (cd "$out" && "$LT" backend-storm --target wsgate --backend-url "$slow_url" \
            --url "$srv_ws" --admin-url "$srv_admin" --pid "$srv_pid" --user-prefix "$prefix" \
            --connect-concurrency 4000 --out . --name "backend-storm-wsgate-r$r" "${bstorm_args[@]}") \
            2>&1 | tee -a "$logs/loadtest.log" >&2
          stop "$srv_pid"
          ;;
        chat)
          start_redis
          start_server "$target" 0 redis
          ws0="$srv_ws" ad0="$srv_admin" p0="$srv_pid"
          start_server "$target" 1 redis
          ws1="$srv_ws" ad1="$srv_admin" p1="$srv_pid"
          sleep 0.5
          run_lt chat "$target" "chat-$target-r$r" --url "$ws0,$ws1" --admin-url "$ad0,$ad1" \
            --pid "$p0,$p1" --user-prefix "$prefix" "${chat_args[@]}"
          stop "$p0"
          stop "$p1"
          ;;
        *) echo "unknown scenario $scen" >&2; exit 64 ;;
      esac
    done
  done
done

(cd "$out" && "$LT" compare --dir .)
echo "results: $out" >&2
