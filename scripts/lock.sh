#!/usr/bin/env bash
# Move the lock forward: re-resolve every package to the newest version pyproject.toml allows, build a fresh
# venv from the result, run the default test tier there, and write locks/<python>-<platform>-cpu.txt (and the
# GPU constraints beside it) only when that run is green. Prints what moved and the test result.
#
#   scripts/lock.sh                      with python3 (CLINICALBLIP_PYTHON=python3.12 scripts/lock.sh for another)
#   LOCK_TORCH=2.14.1 scripts/lock.sh    another torch (the CPU build; torch is pinned by hand, see below)
#   LOCK_SKIP_TESTS=1 scripts/lock.sh    resolve and write without the test run (only to start a lock for a new
#                                        Python; say so in the commit)
#
# When: after changing dependencies in pyproject.toml (the same commit carries the new lock), and on purpose
# now and then (e.g. monthly) to take upstream fixes, in a commit of its own. Never in CI: CI installs the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${CLINICALBLIP_PYTHON:-python3}"
TAG="$("$PY" scripts/lockfile.py tag)"
LOCK="locks/$TAG.txt"
TORCH="${LOCK_TORCH:-$(grep -oP '^torch==\K[^ +]+' "$LOCK" 2>/dev/null || echo 2.13.0)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/clinicalblip-lock.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
V="$WORK/venv"
echo "[lock] $TAG: resolving the newest allowed versions (torch $TORCH, CPU build) in $V"
"$PY" -m venv "$V"
"$V/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
# torch is pinned: an unpinned torch moves to a build the rest of the lock was not tested with, and on PyPI a
# plain torch is the multi-GB CUDA build. The CPU build comes from PyTorch's CPU index (or a local wheel).
"$V/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH" 2>/dev/null \
  || "$V/bin/python" -m pip install -q --disable-pip-version-check --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH"
echo "torch==$TORCH" > "$WORK/torch-pin.txt"  # the eager upgrade below must not move torch (nor pull CUDA)
"$V/bin/python" -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager -c "$WORK/torch-pin.txt" \
  -e ".[dev,tracking]"
"$V/bin/python" -m pip freeze --all --exclude-editable | grep -v '^pip==' > "$WORK/freeze.txt"
# sha256 of the artifact pip picks for each pin on this platform (metadata only: nothing is installed)
"$V/bin/python" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --no-deps \
  --report "$WORK/report.json" -r "$WORK/freeze.txt" 2>/dev/null \
  || "$V/bin/python" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --no-deps \
     --extra-index-url https://download.pytorch.org/whl/cpu --report "$WORK/report.json" -r "$WORK/freeze.txt"
mkdir -p locks
"$PY" scripts/lockfile.py write "$WORK/freeze.txt" "$WORK/report.json" "$WORK/new.txt"
echo "[lock] what moved against $LOCK:"
"$PY" scripts/lockfile.py diff "$LOCK" "$WORK/new.txt"

if [ "${LOCK_SKIP_TESTS:-0}" = 1 ]; then
  result="not run (LOCK_SKIP_TESTS=1)"
else
  # the candidate lock, installed exactly as scripts/venv.sh installs it, in a fresh venv; then the default tier
  cp "$WORK/new.txt" "$WORK/candidate.txt"
  mkdir -p "$WORK/repo" && git ls-files -z | xargs -0 -I{} cp --parents {} "$WORK/repo/" 2>/dev/null || true
  cp scripts/lockfile.py scripts/venv.sh "$WORK/repo/scripts/"
  mkdir -p "$WORK/repo/locks" && cp "$WORK/new.txt" "$WORK/repo/$LOCK"
  echo "[lock] running the default test tier against the candidate (a fresh venv from it)"
  start=$(date +%s)
  if (cd "$WORK/repo" && CLINICALBLIP_PYTHON="$PY" CLINICALBLIP_VENV="$WORK/testvenv" ./test.sh -p no:cacheprovider -q \
        > "$WORK/tests.log" 2>&1); then
    result="green: $(grep -E "passed" "$WORK/tests.log" | tail -1) in $(( $(date +%s) - start )) s"
  else
    tail -30 "$WORK/tests.log"
    echo "[lock] the default tier FAILED against the new versions: $LOCK left as it was."
    echo "[lock] tests: $(grep -E '[0-9]+ (passed|failed)' "$WORK/tests.log" | tail -1)"
    exit 1
  fi
fi
"$PY" scripts/lockfile.py constraints "$WORK/new.txt" "$WORK/constraints.txt"
# GPU users get the same pins with the CUDA build of torch: check that they resolve against PyPI's torch
# (=== is the exact version, so a local +cpu wheel cannot stand in; dry run: metadata only)
if "$V/bin/python" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed \
     --report "$WORK/gpu.json" -c "$WORK/constraints.txt" "torch===${TORCH%%+*}" ".[gpu]" > "$WORK/gpu.log" 2>&1; then
  gpu="resolves with $("$V/bin/python" -c "import json,sys; r=json.load(open(sys.argv[1])); print(next(i['metadata']['version'] for i in r['install'] if i['metadata']['name']=='torch'), 'and', sum(i['metadata']['name'].startswith('nvidia') for i in r['install']), 'nvidia packages')" "$WORK/gpu.json")"
else
  tail -5 "$WORK/gpu.log"; echo "[lock] the GPU constraints do not resolve with torch ${TORCH%%+*}: $LOCK left as it was."; exit 1
fi
cp "$WORK/new.txt" "$LOCK"
cp "$WORK/constraints.txt" "locks/$TAG-constraints.txt"
echo "[lock] wrote $LOCK and locks/$TAG-constraints.txt; tests: $result; GPU constraints: $gpu"
