#!/bin/bash
# usage: mem_point.sh BIN N LABEL OUTDIR  -> prints "LABEL N rss_kib load"
BIN=$1; N=$2; LABEL=$3; OUT=$4
RPORT=${RPORT:-16391}; BPORT=${BPORT:-18093}; P=${P:-18091}; A=${A:-18092}
LT=target/release/wsgate-loadtest
redis-cli -p $RPORT flushall >/dev/null
$BIN serve --listen 127.0.0.1:$P --admin-listen 127.0.0.1:$A --redis-url redis://127.0.0.1:$RPORT \
  --backend-url http://127.0.0.1:$BPORT --max-handshakes-per-ip 0 --log-level warn > $OUT/node-$LABEL-$N.log 2>&1 &
NPID=$!
for i in $(seq 50); do curl -sf http://127.0.0.1:$A/readyz >/dev/null 2>&1 && break; sleep 0.2; done
sleep 1
L0=$(cut -d' ' -f1 /proc/loadavg)
$LT idle --url ws://127.0.0.1:$P --admin-url http://127.0.0.1:$A --backend-url http://127.0.0.1:$BPORT \
  --pid $NPID --connections $N --connect-concurrency ${CC:-1000} --connect-timeout 30 --hold 10 \
  --user-prefix "m$RANDOM-" --out $OUT --name idle-$LABEL-$N > $OUT/lt-$LABEL-$N.log 2>&1
L1=$(cut -d' ' -f1 /proc/loadavg)
kill -9 $NPID; wait $NPID 2>/dev/null
python3 - "$OUT/idle-$LABEL-$N.json" "$LABEL" "$N" "$L0" "$L1" <<'PY'
import json,sys
d=json.load(open(sys.argv[1])); r=d['results']
print(sys.argv[2], sys.argv[3], "connected", r['connected'], "failed", r['failed'], "rss_after_kib", r['server_rss_after_bytes']//1024, "rate %.0f"%r['connects_per_second'], "load", sys.argv[4], sys.argv[5])
PY
