#!/usr/bin/env bash
# Peak and steady RSS of `agentsecrets run` with N AgentSecrets shaped as the API server returns
# them (managedFields, last-applied annotation, status), served by bench/fake_apiserver.py, and
# the same N in the synthetic benchmark mode for contrast. Prints a table; asserts nothing.
#
#   bash bench/memory.sh                 # N = 10000 and 100000
#   bash bench/memory.sh 10000           # one N
#   SKIP_BUILD=1 bash bench/memory.sh    # use the existing target/release/agentsecrets
#   BIN=/path/to/agentsecrets SKIP_BUILD=1 bash bench/memory.sh   # measure another build
#
# For each N: start the fake API server, point a kubeconfig at it (plain HTTP, no auth), start
# the operator with a fresh keyring and a self-signed serving certificate, wait for /readyz
# (AgentSecret cache listed), then for the controller to finish its first pass (the fake
# server's count of status PATCHes stops moving, or PASS_SECONDS, default 60), let it settle,
# and read VmHWM (peak) and VmRSS (steady) from /proc. The recorded sealed values were sealed
# under another keyring, so every
# object gets one status PATCH (KeyMissing) and one event on the first pass: the peak includes
# that reconcile traffic, as a first start after a key loss would.
set -euo pipefail
cd "$(dirname "$0")/.."

counts=("$@")
[ ${#counts[@]} -eq 0 ] && counts=(10000 100000)
settle=${SETTLE_SECONDS:-10}
# The first controller pass writes a status per object (see above): at 100 000 objects it
# takes longer than is worth waiting for, so it is watched for this long at most.
pass_limit=${PASS_SECONDS:-60}

# With the `bench` feature (as bench/run.sh builds it) for the synthetic contrast row; the feature
# adds code, not memory, to the measured operator.
[ -n "${SKIP_BUILD:-}" ] || cargo build --locked --release --features bench --bin agentsecrets
bin=${BIN:-$PWD/target/release/agentsecrets}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" keys generate >"$work/keyring.yaml"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=localhost -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mib() { awk -v kb="$1" 'BEGIN { printf "%.1f MiB", kb / 1024 }'; }
field() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$2/status"; }
stat_count() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], 0))' "$1" "$2" 2>/dev/null || echo 0; }

# Start the operator with the arguments given, wait for /readyz, print "seconds-to-ready".
start_operator() {
  local log=$1 admin=$2
  shift 2
  RUST_LOG=info POD_NAMESPACE=agent-secrets POD_NAME=bench \
    "$bin" run --webhook-addr 127.0.0.1:"$(free_port)" --admin-addr 127.0.0.1:"$admin" \
    --tls-cert "$work/tls.crt" --tls-key "$work/tls.key" --keyring "$work/keyring.yaml" \
    --lease-duration 15s "$@" >"$log" 2>&1 &
  operator=$!
  pids+=("$operator")
  local start=$SECONDS
  until [ "$(curl -s "http://127.0.0.1:$admin/readyz" || true)" = ok ]; do
    kill -0 "$operator" 2>/dev/null || { echo "operator exited; log: $log" >&2; tail -5 "$log" >&2; exit 1; }
    [ $((SECONDS - start)) -lt 900 ] || { echo "not ready after 900 s" >&2; exit 1; }
    sleep 0.5
  done
  ready_after=$((SECONDS - start))
}

# Measure with the fake API server: $1 = N, $2 = row label, further arguments go to the server.
measure_fake() {
  local n=$1 label=$2
  shift 2
  rm -f "$work/port" "$work/stats"
  python3 bench/fake_apiserver.py --objects "$n" --port-file "$work/port" \
    --stats-file "$work/stats" "$@" 2>"$work/fake.log" &
  fake=$!
  pids+=("$fake")
  until [ -s "$work/port" ]; do sleep 0.2; done
  cat >"$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: fake, cluster: {server: "http://127.0.0.1:$(cat "$work/port")"}}]
users: [{name: fake, user: {}}]
contexts: [{name: fake, context: {cluster: fake, user: fake, namespace: default}}]
current-context: fake
EOF
  KUBECONFIG=$work/kubeconfig start_operator "$work/run-$n.log" "$(free_port)"
  local ready_hwm last now
  ready_hwm=$(field VmHWM "$operator")
  # The first controller pass is over when the status PATCH count stops moving.
  last=-1
  local pass_start=$SECONDS
  while [ $((SECONDS - pass_start)) -lt "$pass_limit" ]; do
    sleep 5
    now=$(stat_count "$work/stats" "agentsecret patch status")
    [ "$now" = "$last" ] && break
    last=$now
  done
  sleep "$settle"
  rows+=("| $label | $n | ${ready_after} s | $(mib "$ready_hwm") | $(mib "$(field VmHWM "$operator")") | $(mib "$(field VmRSS "$operator")") | $last |")
  echo "# $label, N=$n: requests served: $(cat "$work/stats")" >&2
  kill "$operator" "$fake"
  wait "$operator" "$fake" 2>/dev/null || true
}

rows=()
for n in "${counts[@]}"; do
  # Objects as listed from an API server, the operator leading (webhook cache + controller).
  measure_fake "$n" "API-server-shaped, leader"
  # The same, but another replica holds the Lease: no controller, the webhook's cache alone.
  measure_fake "$n" "API-server-shaped, not leader (no controller)" \
    --foreign-lease agent-secrets/agent-secrets-controller

  # The same count in the synthetic benchmark mode (no cluster), for contrast.
  start_operator "$work/synthetic-$n.log" "$(free_port)" --bench-synthetic-cache "$((n / 20))x20"
  sleep "$settle"
  rows+=("| synthetic (\`--bench-synthetic-cache $((n / 20))x20\`) | $n | ${ready_after} s | — | $(mib "$(field VmHWM "$operator")") | $(mib "$(field VmRSS "$operator")") | — |")
  kill "$operator"
  wait "$operator" 2>/dev/null || true
done

echo "# machine: $(nproc) cores, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo
echo "| objects | AgentSecrets | ready after | peak RSS at ready | peak RSS (VmHWM) | steady RSS (VmRSS) | status PATCHes |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
