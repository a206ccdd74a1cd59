#!/usr/bin/env bash
# Install the tools that helm/check/check_chart.py needs into a cache directory:
#   - a Python venv with helm-python-sdk (the Helm engine as a library: lint, render,
#     values schema; no helm binary) and kubernetes-validate (Kubernetes OpenAPI schemas);
#   - @kubernetes-models/prometheus-operator from npm (ServiceMonitor / PrometheusRule
#     validators).
#
# Usage: bash helm/check/install.sh
# Directory: $WSGATE_TOOLS_DIR, default .tools in the repository root (it ignores itself in git).
# Needs: python3 (>= 3.10) with the venv module, node (>= 20) and npm.
#   Debian/Ubuntu: apt-get install -y python3 python3-venv nodejs npm
# Re-running is fast: each part is skipped while its pinned versions are installed.
set -euo pipefail

HELM_PYTHON_SDK_VERSION=0.2.2
KUBERNETES_VALIDATE_VERSION=1.37.0
PROMETHEUS_OPERATOR_MODELS_VERSION=6.0.0

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools="${WSGATE_TOOLS_DIR:-$root/.tools}"
mkdir -p "$tools"
tools="$(cd "$tools" && pwd)"
# Keep the cache out of git without touching the repository's .gitignore.
[[ -f "$tools/.gitignore" ]] || printf '*\n' > "$tools/.gitignore"

die() { echo "install.sh: $*" >&2; exit 1; }

# --- Python venv -----------------------------------------------------------------
py_stamp="$tools/venv/.wsgate-stamp"
py_want="helm-python-sdk==$HELM_PYTHON_SDK_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
if [[ -x "$tools/venv/bin/python" && -f "$py_stamp" && "$(cat "$py_stamp")" == "$py_want" ]] \
   && "$tools/venv/bin/python" -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
  echo "python tools: up to date ($py_want)"
else
  command -v python3 >/dev/null || die "python3 not found. Install it: apt-get install -y python3 python3-venv"
  python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "python3 >= 3.10 is needed (found $(python3 --version 2>&1))"
  rm -rf "$tools/venv"
  python3 -m venv "$tools/venv" \
    || die "python3 -m venv failed. Install the venv module: apt-get install -y python3-venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check $py_want
  echo "$py_want" > "$py_stamp"
  echo "python tools: installed ($py_want)"
fi

# --- npm: prometheus-operator models ---------------------------------------------
node_dir="$tools/node"
node_stamp="$node_dir/.wsgate-stamp"
node_want="@kubernetes-models/prometheus-operator@$PROMETHEUS_OPERATOR_MODELS_VERSION"
if [[ -f "$node_stamp" && "$(cat "$node_stamp")" == "$node_want" \
      && -d "$node_dir/node_modules/@kubernetes-models/prometheus-operator" ]]; then
  echo "node tools: up to date ($node_want)"
else
  command -v node >/dev/null || die "node not found. Install it: apt-get install -y nodejs npm"
  command -v npm >/dev/null || die "npm not found. Install it: apt-get install -y npm"
  node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
    || die "node >= 20 is needed (found $(node --version))"
  mkdir -p "$node_dir"
  [[ -f "$node_dir/package.json" ]] || printf '{\n  "name": "wsgate-chart-check-tools",\n  "private": true,\n  "type": "module"\n}\n' > "$node_dir/package.json"
  npm install --prefix "$node_dir" --no-audit --no-fund --loglevel=error "$node_want"
  echo "$node_want" > "$node_stamp"
  echo "node tools: installed ($node_want)"
fi

echo "tools ready in $tools"
echo "run: $tools/venv/bin/python helm/check/check_chart.py"
