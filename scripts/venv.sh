# Sourced by train.sh, eval.sh and test.sh: create/use the virtual environment and install the project from the
# lock (locks/<python>-<platform>-cpu.txt: exact versions with hashes; scripts/lock.sh moves it forward).
# CLINICALBLIP_VENV chooses the folder (default .venv); a stamp keyed on the lock and pyproject.toml skips
# reinstalling. A venv that does not match the lock is rebuilt, so a run never mixes versions.
VENV="${CLINICALBLIP_VENV:-.venv}"
CB_PY="${CLINICALBLIP_PYTHON:-python3}"
[ -x "$VENV/bin/python" ] && CB_PY="$VENV/bin/python"
CB_TAG="$("$CB_PY" scripts/lockfile.py tag 2>/dev/null || echo unknown)"
CB_LOCK="locks/$CB_TAG.txt"
if [ ! -f "$CB_LOCK" ]; then
  echo "[setup] error: no lock for this Python and machine ($CB_TAG; locks/ has: $(ls locks | tr '\n' ' '))." >&2
  echo "[setup] Use Python 3.11 on Linux x86_64 (CLINICALBLIP_PYTHON=python3.11), or make a lock for this one with" >&2
  echo "[setup] CLINICALBLIP_PYTHON=$CB_PY scripts/lock.sh, or install the version ranges yourself: pip install -e '.[dev]'" >&2
  return 2 2>/dev/null || exit 2
fi
STAMP="$VENV/.clinicalblip-$(cat pyproject.toml "$CB_LOCK" | sha256sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  if [ -d "$VENV" ] && ls "$VENV"/.clinicalblip-* >/dev/null 2>&1; then
    echo "[setup] the lock or pyproject.toml changed: rebuilding $VENV"
    rm -rf "$VENV"
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV ($CB_TAG)"
    "$CB_PY" -m venv "$VENV"
  fi
  echo "[setup] installing from $CB_LOCK (first run only)"
  # pip's "Location ... is ignored" lines come from a machine's pip.conf (find-links/extra-index folders that
  # do not exist), not from the install: dropped; every other pip message stays.
  cb_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
  # torch first, alone: its CPU build comes from PyTorch's CPU index (or a local wheel), never a CUDA build.
  grep -A1 '^torch==' "$CB_LOCK" > "$VENV/torch.lock"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r "$VENV/torch.lock" \
    2>/dev/null || cb_pip install -q --disable-pip-version-check --require-hashes --no-deps \
    --extra-index-url https://download.pytorch.org/whl/cpu -r "$VENV/torch.lock"
  cb_pip install -q --disable-pip-version-check --require-hashes --no-deps -r "$CB_LOCK"
  # the project itself, editable, built with the locked setuptools (no build isolation: nothing unlocked)
  cb_pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  "$VENV/bin/python" scripts/lockfile.py verify "$CB_LOCK" || { echo "[setup] error: $VENV does not match $CB_LOCK" >&2; return 1 2>/dev/null || exit 1; }
  touch "$STAMP"
fi
case "$VENV" in /*) export PATH="$VENV/bin:$PATH" ;; *) export PATH="$PWD/$VENV/bin:$PATH" ;; esac
export CLINICALBLIP_LOCK="$PWD/$CB_LOCK"
# Everything here runs offline: models are built in code or read from local folders.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
# Warnings are not silenced globally: they are how PEFT and DeepSpeed report a setup that trains wrongly.
