#!/usr/bin/env bash
# Evaluation runbook: generate on a split, evaluate, and the ablations that show whether the model uses its
# inputs (each a row of the report):
#   trained       the model with the real clinical context
#   no_indication the indication left out of every prompt
#   shuffled      every study gets another study's indication (same distribution, wrong patient)
#   generic       every indication replaced by an uninformative one
#   blank_image   every image replaced by a blank one (does it read the image at all?)
# and, for a model trained with the prior study (data.prior), the prior ablations: prior withheld / report only /
# images only / both, each against the prior withheld (compare_priors.json, prior_ablations.md).
#
# Per run: preds_<mode>.jsonl, metrics_<mode>.json, preds_<mode>.html (the offline case viewer); then
# compare.json / compare.html (each ablation vs real: paired bootstrap CI and permutation p, Holm-corrected) and
# ablations.md (the table, with those p-values).
#
#   ./eval.sh MODEL_DIR MANIFEST [SPLIT] [OUT_DIR]
# defaults: the demo model and data from ./train.sh, split test, OUT_DIR=MODEL_DIR/eval
# Each ablation has its own predictions file (OUT_DIR/preds_CONTEXT.jsonl + .meta.json). A rerun resumes each
# file; after retraining, or with other settings, generate refuses and names the difference: remove OUT_DIR
# or run with GENERATE_ARGS=--overwrite. GENERATE_ARGS goes to every generate call (e.g. "--num-beams 3").
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
MODEL="${1:-runs/demo/stage2}"
MANIFEST="${2:-runs/demo/data/manifest.jsonl}"
SPLIT="${3:-test}"
OUT="${4:-$MODEL/eval}"
mkdir -p "$OUT"

MODES="real none shuffled generic blank_image"
for ctx in $MODES; do
  # shellcheck disable=SC2086  # GENERATE_ARGS: several flags
  clinicalblip generate "$MODEL" --manifest "$MANIFEST" --split "$SPLIT" --context "$ctx" --out "$OUT/preds_$ctx.jsonl" \
    ${GENERATE_ARGS:-}
  clinicalblip eval "$OUT/preds_$ctx.jsonl" --out "$OUT/metrics_$ctx.json" --html "$OUT/preds_$ctx.html" > /dev/null
done
# Paired significance of every ablation against the real-context run (Holm-corrected over the four ablations):
# compare.json, compare.html (biggest finding disagreements, linked into each run's viewer preds_<mode>.html).
clinicalblip compare $(for ctx in $MODES; do echo "$OUT/preds_$ctx.jsonl"; done) --names $MODES \
  --out "$OUT/compare.json" --html "$OUT/compare.html"
# The real run's viewer once more, now with the ablation rows and their p-values in its summary.
clinicalblip view "$OUT/preds_real.jsonl" --metrics "$OUT/metrics_real.json" --out "$OUT/preds_real.html" > /dev/null
python -m clinicalblip.demo ablations "$OUT"

# The prior study, for a model trained with data.prior: the same model with each study's linked prior withheld
# (none), only its report, only its images, both (what the model takes), each against none: compare_priors.json and
# prior_ablations.md (temporal F1, change F1, invented comparisons, clinical F1 with paired p-values).
TAKES=$(python -m clinicalblip.demo prior-of "$MODEL")
case "$TAKES" in
  both) PRIOR_MODES="none report images both" ;;
  report|images) PRIOR_MODES="none $TAKES" ;;
  *) PRIOR_MODES="" ;;
esac
if [ -n "$PRIOR_MODES" ]; then
  for pv in $PRIOR_MODES; do
    # shellcheck disable=SC2086
    clinicalblip generate "$MODEL" --manifest "$MANIFEST" --split "$SPLIT" --prior "$pv" \
      --out "$OUT/preds_prior_$pv.jsonl" ${GENERATE_ARGS:-}
    clinicalblip eval "$OUT/preds_prior_$pv.jsonl" --out "$OUT/metrics_prior_$pv.json" > /dev/null
  done
  # shellcheck disable=SC2046
  clinicalblip compare $(for pv in $PRIOR_MODES; do echo "$OUT/preds_prior_$pv.jsonl"; done) --names $PRIOR_MODES \
    --out "$OUT/compare_priors.json" > /dev/null
  python -m clinicalblip.demo prior-ablations "$OUT"
fi
