#!/usr/bin/env bash
# The project's test command: install what the tests drive besides Rust (Debian's chromium and
# chromedriver for the Secrets page's browser tests), then run every test against the locked
# dependency set. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install-browser.sh >&2
cargo test --locked "$@"
