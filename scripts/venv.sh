# Sourced by train.sh, eval.sh and test.sh: create/use the virtual environment and install the project.
# CLINICALBLIP_VENV chooses the folder (default .venv); a stamp keyed on pyproject.toml skips reinstalling.
VENV="${CLINICALBLIP_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.clinicalblip-$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing (first run only)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: a bare 'torch' requirement would pull the multi-GB CUDA build on a CPU box.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==${CLINICALBLIP_TORCH:-2.13.0}" || "$VENV/bin/python" -m pip install -q torch
  fi
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$STAMP"
fi
export PATH="$PWD/$VENV/bin:$PATH"
# Everything here runs offline: models are built in code or read from local folders.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
# Warnings are not silenced globally: they are how PEFT and DeepSpeed report a setup that trains wrongly.
