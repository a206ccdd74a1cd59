#!/usr/bin/env bash
# Runs the benchmarks against wsgate and the Socket.IO peer, in turns, in one invocation, and
# writes the side-by-side summary (median and min–max over the rounds, the method next to each
# figure). What each scenario measures and how: loadtest/README.md.
#
#   loadtest/compare.sh [--smoke] [--rounds N] [--out DIR] [--scenarios LIST] [--connections N]
#                       [--peer-workers N] [--memory-points LO,HI] [--targets LIST]
#
#   --rounds N          rounds of every scenario (default 5)
#   --scenarios LIST    default idle,fanout,burst,chat,storm,backend-storm,memory,floor
#   --connections N     connections of idle/fanout/burst/storm and sockets of floor (default 10000)
#   --peer-workers N    Socket.IO cluster workers (default 2; 0 = one process without node:cluster)
#   --memory-points L,H connections of the two memory points (default 2000,16000)
#   --targets LIST      servers to run, in this order (default wsgate,socketio)
#   --smoke             small and short (300 connections, 1 round, debug build): for CI
#
# Needs: cargo, node + npm (the peer's modules are installed with `npm ci`), redis-server and
# redis-cli, strace. With WSGATE_BIN and LOADTEST_BIN set, nothing is built. Every server it
# starts listens on 127.0.0.1 only and is stopped when the script ends.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

smoke=0
rounds=5
out=""
scenarios="idle,fanout,burst,chat,storm,backend-storm,memory,floor"
conns=10000
peer_workers=2
memory_points="2000,16000"
targets="wsgate,socketio"
profile="${PROFILE:-release}"
base_port="${BASE_PORT:-19100}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; rounds=1; conns=300; memory_points="100,300"; profile="${PROFILE:-debug}"; shift ;;
    --rounds) rounds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --scenarios) scenarios="$2"; shift 2 ;;
    --connections) conns="$2"; shift 2 ;;
    --peer-workers) peer_workers="$2"; shift 2 ;;
    --memory-points) memory_points="$2"; shift 2 ;;
    --targets) targets="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
done
IFS=',' read -r -a scen_list <<<"$scenarios"
IFS=',' read -r -a mem_list <<<"$memory_points"
IFS=',' read -r -a target_list <<<"$targets"

if [[ -z "$out" ]]; then
  out="$here/results/run-$(date -u +%Y%m%dT%H%M%SZ)"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
logs="$out/logs"
mkdir -p "$logs"

# ---------------------------------------------------------------- parameters
# (every figure's method is described in loadtest/README.md; keep the two in step)
if [[ "$smoke" == 1 ]]; then
  idle_args=(--connections "$conns" --hold 1)
  fan_rates="2000,5000"
  fan_args=(--connections "$conns" --recipients 100 --rates 2000,5000 --duration 1.5 --floor-seconds 0.5 --warmup 0.5 --no-stop
    --strace-seconds 1 --strace-rate 2000)
  burst_args=(--connections "$conns" --recipients 100 --rates 2000,5000 --duration 1.5 --burst 8 --floor-seconds 0.5 --warmup 0.5
    --no-stop --strace-seconds 1 --strace-rate 2000)
  chat_args=(--pairs 50 --rates 200 --duration 1.5)
  storm_args=(--connections "$conns" --keys 30 --spread 0.5 --deadline 20)
  bstorm_args=(--connections "$conns" --deadline 30 --limit 30)
  mem_hold=1
  mem_deadline=30
  floor_args=(--connections "$conns" --rate 5000 --duration 1 --size 200)
else
  # One recipient block is a tenth of the connections: each connection gets one message in ten.
  recip=$((conns / 10))
  idle_args=(--connections "$conns" --hold 3)
  # The sweep starts at a rate both servers sustain without loss; the write-call step runs at it.
  # The write-call count's window is 12 s: its ends fall anywhere in a publish of `recip`
  # deliveries, so the deliveries it holds are known to about one publish each side. At 3 s
  # that was ±7 % of the figure, too coarse to tell 1.0 call per delivery from 1.07; at 12 s
  # about ±2 %. Bursts (every 0.8 s at 10,000/s) get the same window.
  fan_args=(--connections "$conns" --recipients "$recip" --rates 10000,25000,50000,100000,200000 --duration 3
    --floor-seconds 0.5 --warmup 2 --strace-seconds 12 --strace-rate 10000)
  burst_args=(--connections "$conns" --recipients "$recip" --rates 10000,50000,100000,200000 --duration 3 --burst 8
    --floor-seconds 0.5 --warmup 2 --strace-seconds 12 --strace-rate 10000)
  chat_args=(--pairs 1000 --rates 2000,5000 --duration 3)
  storm_args=(--connections "$conns" --keys $((conns / 10)) --spread 1 --deadline 30)
  # As in a reconnect storm after a node loss: 4,000 distinct users at the same instant.
  bstorm_args=(--connections 4000 --deadline 60 --limit 8)
  mem_hold=10
  mem_deadline=120
  floor_args=(--connections "$conns" --rate 50000 --duration 2 --size 200)
fi

# A rough estimate of the duration (seconds per round and scenario, both targets, on 2 cores).
estimate=0
for scen in "${scen_list[@]}"; do
  if [[ "$smoke" == 1 ]]; then
    case "$scen" in
      idle) s=12 ;; fanout|burst) s=40 ;; chat) s=20 ;; storm) s=20 ;; backend-storm) s=20 ;; memory) s=30 ;; floor) s=8 ;; *) s=0 ;;
    esac
  else
    case "$scen" in
      idle) s=30 ;; fanout) s=90 ;; burst) s=85 ;; chat) s=40 ;; storm) s=50 ;; backend-storm) s=40 ;; memory) s=140 ;; floor) s=14 ;; *) s=0 ;;
    esac
  fi
  estimate=$((estimate + s))
done
echo "compare.sh: $rounds round(s) of ${scenarios}; expect about $(((estimate * rounds + 59) / 60)) minutes plus the build" >&2

# ---------------------------------------------------------------- build
for tool in cargo node npm redis-server redis-cli strace; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool is required" >&2; exit 1; }
done
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
if [[ ! -d "$peer_dir/node_modules/socket.io" || ! -d "$peer_dir/node_modules/bufferutil" ]]; then
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

# stop PID [more pids of the same server, which exit with it]
stop() {
  local p i
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  shift
  for p in "$@"; do
    for i in $(seq 1 50); do
      [[ -d "/proc/$p" ]] || break
      sleep 0.1
    done
  done
}

port_backend=$((base_port + 0))
port_redis=$((base_port + 1))
backend_url="http://127.0.0.1:$port_backend"
redis_url="redis://127.0.0.1:$port_redis"
token="loadtest-token"

"$WSGATE" demo-backend --listen "127.0.0.1:$port_backend" >"$logs/backend.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1 "$port_backend"

# Every server runs on Redis: wsgate on its Redis broker, Socket.IO on the redis adapter.
redis-server --port "$port_redis" --bind 127.0.0.1 --save '' --appendonly no >"$logs/redis.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1 "$port_redis"

# The storm's back-end: a servlet-like pool of 16 workers, 25 ms per request.
port_slow=$((base_port + 2))
slow_url="http://127.0.0.1:$port_slow"
"$LT" slow-backend --listen "127.0.0.1:$port_slow" --workers 16 --service-ms 25 >"$logs/slow-backend.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1 "$port_slow"

# start_server TARGET NODE_INDEX -> sets srv_pid (the process to stop), srv_pids (every process
# of the server, comma-separated: wsgate's one, or the peer's primary and workers), srv_ws,
# srv_admin. SERVER_BACKEND_URL overrides the back-end. Redis is emptied first, so every server
# starts from the same state.
start_server() {
  local target="$1" idx="$2"
  local backend_url="${SERVER_BACKEND_URL:-$backend_url}"
  local pub=$((base_port + 10 + idx * 2)) adm=$((base_port + 11 + idx * 2))
  if [[ "$idx" == 0 ]]; then
    redis-cli -p "$port_redis" flushall >/dev/null
  fi
  if [[ "$target" == "wsgate" ]]; then
    "$WSGATE" serve --listen "127.0.0.1:$pub" --admin-listen "127.0.0.1:$adm" \
      --backend-url "$backend_url" --api-token "$token" --log-level warn \
      --max-handshakes-per-ip 0 --redis-url "$redis_url" \
      --node-id "node$idx" >>"$logs/wsgate-$idx.log" 2>&1 &
    srv_pid=$!
    srv_pids="$srv_pid"
  else
    local ready="$logs/socketio-$idx.ready"
    rm -f "$ready"
    node "$peer_dir/server.js" --listen "127.0.0.1:$pub" --admin-listen "127.0.0.1:$adm" \
      --backend-url "$backend_url" --api-token "$token" --redis-url "$redis_url" \
      --workers "$peer_workers" --ready-file "$ready" >>"$logs/socketio-$idx.log" 2>&1 &
    srv_pid=$!
    local i
    for i in $(seq 1 300); do
      [[ -s "$ready" ]] && break
      sleep 0.1
    done
    [[ -s "$ready" ]] || { echo "compare.sh: the Socket.IO peer did not get ready (see $logs)" >&2; exit 1; }
    srv_pids="$(tr -d '\n' <"$ready")"
  fi
  pids+=("$srv_pid")
  srv_ws="ws://127.0.0.1:$pub"
  srv_admin="http://127.0.0.1:$adm"
  wait_port 127.0.0.1 "$pub"
  wait_port 127.0.0.1 "$adm"
}

run_lt() { # scenario target name args...
  local scen="$1" target="$2" name="$3"
  shift 3
  echo "== $name (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  # Run inside the result directory so that the recorded command line names no local path.
  # A run whose own checks fail (a limit exceeded, too few back) still wrote its result, and
  # the summary shows it: note the failure and go on with the other runs of the comparison.
  if ! (cd "$out" && "$LT" "$scen" --target "$target" --out . --name "$name" "$@") 2>&1 \
    | tee -a "$logs/loadtest.log" >&2; then
    echo "$name" >>"$out/failed-runs.txt"
    echo "compare.sh: $name failed its checks (listed in failed-runs.txt); going on" >&2
  fi
}

started=$(date +%s)
for r in $(seq 1 "$rounds"); do
  for scen in "${scen_list[@]}"; do
    if [[ "$scen" == floor ]]; then
      # The kernel's cost of one send() per message, with and without a reader on the sockets.
      for variant in reader noreader; do
        extra=()
        [[ "$variant" == noreader ]] && extra=(--no-reader)
        echo "== floor-$variant-r$r (load $(cut -d' ' -f1 /proc/loadavg))" >&2
        (cd "$out" && "$LT" floor --out . --name "floor-$variant-r$r" "${floor_args[@]}" "${extra[@]}") 2>&1 \
          | tee -a "$logs/loadtest.log" >&2
      done
      continue
    fi
    for target in "${target_list[@]}"; do
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
          run_lt "$lt_scen" "$target" "$scen-$target-r$r" --backend-url "$backend_url" --api-token "$token" \
            --url "$srv_ws" --admin-url "$srv_admin" --pid "$srv_pids" --user-prefix "$prefix" "${args[@]}"
          stop "$srv_pid" ${srv_pids//,/ }
          ;;
        backend-storm|memory)
          # N distinct users at once against the 16-worker back-end; for memory, held and RSS read.
          if [[ "$scen" == backend-storm ]]; then
            points=(0)
          else
            points=("${mem_list[@]}")
          fi
          for n in "${points[@]}"; do
            SERVER_BACKEND_URL="$slow_url" start_server "$target" 0
            sleep 0.5
            if [[ "$n" == 0 ]]; then
              name="backend-storm-$target-r$r"
              args=("${bstorm_args[@]}")
            else
              name="memory-$n-$target-r$r"
              # Storms of 4,000 at once (the backend-storm size) until all N are in: all N at
              # once starve a 2-core node's own back-end calls past their timeout.
              args=(--connections "$n" --wave 4000 --hold "$mem_hold" --deadline "$mem_deadline" --limit "$mem_deadline")
            fi
            run_lt backend-storm "$target" "$name" --backend-url "$slow_url" \
              --url "$srv_ws" --admin-url "$srv_admin" --pid "$srv_pids" --user-prefix "$prefix" \
              "${args[@]}"
            stop "$srv_pid" ${srv_pids//,/ }
          done
          ;;
        chat)
          start_server "$target" 0
          ws0="$srv_ws" ad0="$srv_admin" p0="$srv_pid" ps0="$srv_pids"
          start_server "$target" 1
          ws1="$srv_ws" ad1="$srv_admin" p1="$srv_pid" ps1="$srv_pids"
          sleep 0.5
          run_lt chat "$target" "chat-$target-r$r" --backend-url "$backend_url" --api-token "$token" \
            --url "$ws0,$ws1" --admin-url "$ad0,$ad1" \
            --pid "$ps0,$ps1" --user-prefix "$prefix" "${chat_args[@]}"
          stop "$p0" ${ps0//,/ }
          stop "$p1" ${ps1//,/ }
          ;;
        *) echo "unknown scenario $scen" >&2; exit 64 ;;
      esac
    done
  done
  echo "compare.sh: round $r of $rounds done after $(( ($(date +%s) - started) / 60 )) min" >&2
done

(cd "$out" && "$LT" compare --dir .)
echo "results: $out ($(( ($(date +%s) - started) / 60 )) min)" >&2
