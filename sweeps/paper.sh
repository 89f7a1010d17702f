#!/usr/bin/env bash
# The whole paper on 2 CPU cores, every model trained to convergence (conf/tier/converged.yaml):
# each stage is one sweep, two runs at a time (one core each), into a fixed folder under
# ${OUT:-outputs/paper} with resume=auto, so running this script again after a stop skips the
# finished runs and continues the others from their last epoch (a stop loses at most the epoch
# in progress). Then each stage's report, and Figure 5's paired comparison.
#   bash sweeps/paper.sh                 # every stage, in this order
#   bash sweeps/paper.sh fig5 fig3       # some of them
# Stages (38 models, plus 5 checks): fig5 (L = 5 ... 10 and the standard VAE, seeds 0, 1, 2;
# seeds 3 and 4 too for every arm where a seed's paired interval includes 0),
# fig1_2 (Figure 1's latent attack at budgets 1, 2, 3 on fig5's standard VAE seed 1, L = 5 seed 0
# and L = 10 seed 1, re-evaluated; Figure 2's data-free tightness figure),
# fig3 (fixed sigma: gamma 0.05 ... 0.4 x L = 5, 7, 10), fig4 (Fashion-MNIST, learned and fixed
# sigma; MNIST's two models are fig5's L = 5 and fig3's L = 5, gamma = 0.1), fig6_7 (2-D latent
# space), checks (512-512 widths on L = 5, L = 10 and the standard VAE; Bjorck layers on L = 5
# and L = 10; seed 0).
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-outputs/paper}
N_JOBS=${N_JOBS:-2}

train() {  # train <stage> <overrides...>
  local stage=$1; shift
  local start; start=$(date +%s)
  echo "== $stage: training, $(date -u +%FT%TZ)"
  "$PY" -m lipvae.train tier=converged "$@" hydra/launcher=joblib hydra.launcher.n_jobs="$N_JOBS" \
      resume=auto hydra.sweep.dir="$OUT/$stage" hydra.callbacks.sweep_summary.report=false -m
  echo "== $stage: $(( $(date +%s) - start )) s wall"
}

report() {  # report <stage> <run folders or sweeps...> (the stages' reports; the sweeps write none of their own)
  local stage=$1; shift
  "$PY" -m lipvae.report "$@" --out "$OUT/reports/$stage"
}

runs_where() {  # runs_where <sweep> <dotted.key=value ...>: the run folders whose results.json config matches
  "$PY" - "$@" <<'PY'
import json, sys
from pathlib import Path
sweep, wanted = Path(sys.argv[1]), [a.split("=", 1) for a in sys.argv[2:]]
for results in sorted(sweep.glob("*/results.json")):
    config = json.loads(results.read_text())["config"]
    def get(key):
        node = config
        for part in key.split("."):
            node = node[part]
        return node
    if all(str(get(k)) == v for k, v in wanted):
        print(results.parent)
PY
}

stage_fig5() {
  train fig5 experiment=fig5 seed=0,1,2
  report fig5 "$OUT/fig5"
  "$PY" sweeps/paired_margins.py "$OUT/fig5" | tee "$OUT/reports/fig5/paired_margins.txt"
  # 5 seeds for every arm with a seed whose paired interval includes 0 (and the standard VAE's
  # seeds 3 and 4, each Lipschitz run being paired with the standard VAE of its seed)
  local arms; arms=$("$PY" sweeps/paired_margins.py "$OUT/fig5" --undecided)
  if [ -n "$arms" ]; then
    train fig5_more experiment=fig5 "variant=standard,$arms" seed=3,4
    report fig5 "$OUT/fig5" "$OUT/fig5_more"
    "$PY" sweeps/paired_margins.py "$OUT/fig5" "$OUT/fig5_more" | tee "$OUT/reports/fig5/paired_margins.txt"
  fi
}
stage_fig1_2() {  # no training: Figure 1 on fig5's models, Figure 2 from the bounds alone
  mkdir -p "$OUT/reports/fig1"
  local runs budget run done
  runs="$(runs_where "$OUT/fig5" model.kind=standard seed=1) $(runs_where "$OUT/fig5" model.kind=lipschitz enc_L=5.0 seed=0)
        $(runs_where "$OUT/fig5" model.kind=lipschitz enc_L=10.0 seed=1)"
  for budget in 1 2 3; do
    for run in $runs; do
      done="$OUT/reports/fig1/$(basename "$run")_budget$budget.done"
      [ -f "$done" ] && continue  # evaluated by an earlier call of this script
      "$PY" -m lipvae.evaluate "$run" margins.latent.budget=$budget margins.latent.num_inputs=25 margins.certified_inputs=25
      touch "$done"
    done
  done
  "$PY" -m lipvae.certify tightness out="$OUT/reports/fig2_tightness.png"
}
stage_fig3() {
  train fig3 experiment=fig3 module.num_importance=10
  report fig3 "$OUT/fig3"
}
stage_fig4() {
  train fig4 experiment=fig4 data=fashion_mnist
  report fig4_fashion_mnist "$OUT/fig4"
  # MNIST: the learned-sigma model is fig5's L = 5 (seed 0), the fixed-sigma one fig3's L = 5, gamma = 0.1
  report fig4_mnist $(runs_where "$OUT/fig5" enc_L=5.0 seed=0 model.kind=lipschitz) \
      $(runs_where "$OUT/fig3" enc_L=5.0 model.encoder_std.gamma=0.1)
}
stage_fig6_7() {
  train fig6_7 experiment=fig6_7 module.num_importance=10
  report fig6_7 "$OUT/fig6_7"
}
stage_checks() {
  train widths experiment=fig5 'model.hidden=[512,512]' variant=standard,lipschitz_L5,lipschitz_L10
  train bjorck experiment=fig5 model/layer=bjorck variant=lipschitz_L5,lipschitz_L10
  report checks "$OUT/widths" "$OUT/bjorck"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(fig5 fig1_2 fig3 fig4 fig6_7 checks)
for stage in "${stages[@]}"; do
  declare -F "stage_$stage" >/dev/null || { echo "error: stage: got '$stage'; accepted: fig5, fig1_2, fig3, fig4, fig6_7, checks" >&2; exit 2; }
done
whole=$(date +%s)
for stage in "${stages[@]}"; do "stage_$stage"; done
echo "== the paper's stages ${stages[*]}: $(( $(date +%s) - whole )) s wall in this call"
# per stage, what its models would take on idle cores (their fastest epochs, summed), beside the
# wall time of this call: sweeps/paper_time.py (give it --log <this script's log> for every call's)
"$PY" sweeps/paper_time.py "$OUT"
