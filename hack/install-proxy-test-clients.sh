#!/usr/bin/env bash
# Installs the unchanged HTTP clients that tests/secretless_clients.rs drives through the
# secretless egress proxy: curl, Python 3 with `requests` (urllib is in the standard library),
# Node.js with global fetch, and the npm package `undici` (Node 20's fetch ignores HTTPS_PROXY;
# see docs/secretless.md). Idempotent; run as root on Debian-like machines (CI), or with the
# tools already present elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if ((${#need_apt[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python3 -c 'import requests' 2>/dev/null || python3 -m pip install --quiet 'requests>=2.31,<3'

# undici 6 matches the fetch built into Node 20 and 22 (same dispatcher interface).
# tests/secretless_clients.rs looks for it here.
clients_dir=target/proxy-test-clients
if [ ! -f "$clients_dir/node_modules/undici/package.json" ]; then
  mkdir -p "$clients_dir"
  npm install --silent --no-audit --no-fund --prefix "$clients_dir" 'undici@^6.21' >/dev/null
fi

echo "proxy test clients: $(curl --version | head -n1 | cut -d' ' -f1-2), $(python3 --version)," \
  "requests $(python3 -c 'import requests; print(requests.__version__)'), node $(node --version)," \
  "undici $(node -p "require('./$clients_dir/node_modules/undici/package.json').version")"
