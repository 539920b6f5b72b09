#!/usr/bin/env bash
# Install what the browser tests of the Secrets page need (tests/ui_browser.rs): Debian's
# chromium and its chromedriver. Idempotent: does nothing when both are already installed.
# Needs root (or sudo) and the Debian package mirrors.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium and chromedriver already installed: $(chromedriver --version)"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends chromium chromium-driver
echo "installed: $(chromedriver --version)"
