#!/usr/bin/env bash
# The project's test command: install what the tests drive besides Rust (Debian's chromium and
# chromedriver for the Secrets page's browser tests; curl, Python requests and Node for the
# secretless proxy's client tests), then run every test against the locked
# dependency set. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install-browser.sh >&2
bash hack/install-proxy-test-clients.sh >&2
# Unchanged HTTP clients (curl, Python requests, Node + undici) for the secretless proxy tests.
bash hack/install-proxy-test-clients.sh >&2
cargo test --locked "$@"
