#!/usr/bin/env bash
# The whole benchmark suite: in-process costs (criterion) and admission over TLS against a
# baseline server (examples/admission_load.rs), with memory and rotation cost. Prints tables;
# asserts nothing. Arguments go to the load test (e.g. --quick, --connections 64 --seconds 8).
# Run it on an otherwise idle machine: client and servers share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "# machine: $(nproc) cores, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
# The benchmark mode (`run --bench-synthetic-cache`) exists only in builds with the `bench` feature.
cargo build --locked --release --features bench --bin agentsecrets --example admission_load

echo
echo "## In-process (criterion; median time per operation)"
echo
echo "| benchmark | time |"
echo "|---|---|"
cargo bench --locked --bench admission -- --output-format bencher 2>/dev/null \
  | awk '/^test / { gsub(",", "", $5); ns = $5; unit = "ns";
                    if (ns >= 1000000) { ns = ns / 1000000; unit = "ms" } else if (ns >= 1000) { ns = ns / 1000; unit = "µs" }
                    printf "| %s | %.2f %s |\n", $2, ns, unit }'

echo
target/release/examples/admission_load "$@"
