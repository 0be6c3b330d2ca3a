#!/usr/bin/env bash
# clinicalblip runbook.
#
#   ./train.sh                      the embedded default, end to end on a CPU (~7.5 min on 2 cores, set-up
#                                   included): synthetic data, every tiny stage in order, generation on the
#                                   test split (+ ablations), evaluation, merge -> runs/demo/summary.json
#   ./train.sh CONFIG_DIR [k=v ...] the stages of a config set (stage*.yaml in name order), each starting
#                                   from the previous stage's folder, with the overrides applied to every stage
#
# Real models (paths or hub ids) on GPUs, e.g. InstructBLIP-Vicuna-7B on 8 GPUs with DeepSpeed ZeRO-2:
#   LAUNCH="accelerate launch --config_file configs/accelerate/zero2.yaml -m clinicalblip" \
#     ./train.sh configs/vicuna7b data.manifest=/data/mimic/manifest.jsonl
# LAUNCH defaults to a plain single process (python -m clinicalblip).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
LAUNCH="${LAUNCH:-python -m clinicalblip}"

if [ $# -gt 0 ]; then
  target="$1"; shift
  if [ -d "$target" ]; then stages=$(ls "$target"/stage*.yaml | sort); else stages="$target"; fi
  for cfg in $stages; do
    echo "== stage $cfg"
    $LAUNCH train "$cfg" "$@"
  done
  exit 0
fi

RUN=runs/demo
DATA=$RUN/data
start=$(date +%s)

# 1. The synthetic dataset: frontal + lateral images whose findings are drawn in, indications that
#    carry (and sometimes mislead about) prior information, reports from varied sentence templates.
#    Patients with 1-4 studies over time: findings that appear, grow, shrink or resolve, described against the
#    prior (the marker names the generator version, so an older dataset is rebuilt).
[ -f "$DATA/.complete-6000-priors" ] || { rm -rf "$DATA"; clinicalblip data synth --out "$DATA" --n 6000 --seed 0 && touch "$DATA/.complete-6000-priors"; }

# 2. The tiny stages, in order; stage 2 starts from stage 1's folder (see the YAML comments).
#    On a CPU machine with 2+ cores the stages run as DDP over gloo (accelerate launch), one single-threaded
#    process per core: as fast as one multi-threaded process (2 cores: ~130 samples/s either way) but
#    repeatable from run to run on the same machine, which multi-threaded CPU kernels are not (another CPU
#    or PyTorch build rounds differently: see README). The per-process batch is
#    divided so the global batch stays the configs' 16 (the same optimisation as one process; see
#    tests/test_resume_ddp.py). CLINICALBLIP_NPROC=1 trains in one process.
NPROC="${CLINICALBLIP_NPROC:-$(python -c 'import os, torch; print(1 if torch.cuda.is_available() else min(2, len(os.sched_getaffinity(0))))')}"
TRAIN=(clinicalblip train); PER_PROC=()
if [ "$NPROC" -gt 1 ]; then
  TRAIN=(accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes "$NPROC" -m clinicalblip train)
  PER_PROC=("train.batch_size=$(( 16 / NPROC ))")
  export OMP_NUM_THREADS=1
fi
rm -rf "$RUN/stage1" "$RUN/stage2" "$RUN/release" "$RUN/preds" "$RUN/metrics"
"${TRAIN[@]}" configs/tiny/stage1.yaml "${PER_PROC[@]}"
"${TRAIN[@]}" configs/tiny/stage2.yaml "${PER_PROC[@]}"
unset OMP_NUM_THREADS

# 3. Generation on the test split: the trained model with real indications, without the indication,
#    and with every indication replaced by a generic one (does it read the image?); plus a constant baseline.
clinicalblip generate "$RUN/stage2" --manifest "$DATA/manifest.jsonl" --split test --batch-size 64 --out "$RUN/preds/trained.jsonl"
clinicalblip generate "$RUN/stage2" --manifest "$DATA/manifest.jsonl" --split test --batch-size 64 --context none \
  --out "$RUN/preds/no_indication.jsonl"
clinicalblip generate "$RUN/stage2" --manifest "$DATA/manifest.jsonl" --split test --batch-size 64 --context generic \
  --out "$RUN/preds/generic_indication.jsonl"
python -m clinicalblip.demo constant --manifest "$DATA/manifest.jsonl" --out "$RUN/preds/constant.jsonl"
# The prior study (the stages take data.prior=both): the same model with each test study's prior withheld, only
# its report, only its images; "trained" above is both. Studies without a prior get the same input in all four.
for pv in none report images; do
  clinicalblip generate "$RUN/stage2" --manifest "$DATA/manifest.jsonl" --split test --batch-size 64 --prior "$pv" \
    --out "$RUN/preds/prior_$pv.jsonl"
done

# 4. Evaluation: BLEU/METEOR/ROUGE-L/CIDEr (R2Gen protocol) + clinical F1 over the synthetic findings.
for v in trained constant no_indication generic_indication prior_none prior_report prior_images; do
  clinicalblip eval "$RUN/preds/$v.jsonl" --out "$RUN/metrics/$v.json" --bootstrap 0 > /dev/null
done
# Each prior input against the no-prior input (paired: temporal F1, change F1, invented comparisons, ...).
clinicalblip compare "$RUN/preds/prior_none.jsonl" "$RUN/preds/prior_report.jsonl" "$RUN/preds/prior_images.jsonl" \
  "$RUN/preds/trained.jsonl" --names no_prior prior_report prior_images both --resamples 2000 \
  --out "$RUN/metrics/priors_compare.json" > /dev/null

# 5. Merge both stages into one release that plain transformers loads (verified on a probe batch).
clinicalblip merge "$RUN/stage2" --out "$RUN/release" --metrics "$RUN/metrics/trained.json"

python -m clinicalblip.demo summary "$RUN"
echo "done in $(( $(date +%s) - start )) s: $RUN/summary.json"
