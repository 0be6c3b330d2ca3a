#!/usr/bin/env bash
# Run the default test suite (CPU only, a few minutes): ./test.sh [pytest args]
# Opt-in tiers: ./test.sh -m gpu   ./test.sh -m distributed   ./test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
exec python -m pytest -q "$@"
