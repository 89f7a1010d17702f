#!/usr/bin/env bash
# Every figure's grid on the official MNIST split, one after another, two runs at a time on
# 2 CPU cores (docs/reproduction.md, "official split"). Each sweep writes into a fixed folder
# under ${OUT:-outputs/multirun/official} with resume=auto, so running this script again after
# an interruption skips the finished runs and continues the others from their last epoch.
#   bash sweeps/official_tier.sh [fig5 fig5_seeds ...]      (figures, each at tier=official)
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-outputs/multirun/official}
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(fig5 fig5_standard fig5_seeds fig6_7 fig4 fig3)
for preset in "${presets[@]}"; do
  start=$(date +%s)
  echo "== $preset: $(date -u +%FT%TZ)"
  "$PY" -m lipvae.train experiment="$preset" tier=official hydra/launcher=joblib hydra.launcher.n_jobs="${N_JOBS:-2}" \
      resume=auto hydra.sweep.dir="$OUT/${preset}_official" -m
  echo "== $preset: $(( $(date +%s) - start )) s wall"
done
