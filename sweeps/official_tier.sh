#!/usr/bin/env bash
# Every figure's grid on the official MNIST split, one after another, two runs at a time on
# 2 CPU cores (docs/reproduction.md, "official split"). Each sweep writes into a fixed folder
# under ${OUT:-outputs/multirun/official} with resume=auto, so running this script again after
# an interruption skips the finished runs and continues the others from their last epoch.
#   bash sweeps/official_tier.sh [fig5_official fig5_seeds ...]
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-outputs/multirun/official}
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(fig5_official fig5_standard fig5_seeds fig6_7_official fig4_official fig3_official)
for preset in "${presets[@]}"; do
  start=$(date +%s)
  echo "== $preset: $(date -u +%FT%TZ)"
  "$PY" -m lipvae.train experiment="$preset" hydra/launcher=joblib hydra.launcher.n_jobs="${N_JOBS:-2}" \
      resume=auto hydra.sweep.dir="$OUT/$preset" -m
  echo "== $preset: $(( $(date +%s) - start )) s wall"
done
