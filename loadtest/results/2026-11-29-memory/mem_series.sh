#!/bin/bash
# mem_series.sh BIN LABEL ROUNDS
for r in $(seq 1 $3); do
  for n in 2000 16000; do
    "$(dirname "$0")"/mem_point.sh $1 $n $2-r$r loadtest/results/2026-11-29-memory
  done
done
