#!/usr/bin/env bash
# Copy the Prometheus rules and the Grafana dashboard from deploy/ into the chart
# (Helm cannot read files outside the chart directory). check_chart.py fails when
# the copies differ from the originals.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
files="$root/helm/wsgate/files"
copy() {
  local src="$root/$1" dst="$files/$2"
  if [[ -f "$src" ]]; then
    cp "$src" "$dst"
    echo "copied $1 -> helm/wsgate/files/$2"
  else
    echo "skipped $1 (not present; the chart keeps its placeholder)"
  fi
}
copy deploy/prometheus/wsgate.rules.yml wsgate.rules.yml
copy deploy/grafana/wsgate-dashboard.json wsgate-dashboard.json
