"""Time to certify 10,000 inputs with a paper-sized frozen Lipschitz VAE (the three closed
forms, the `cantelli` form, then the sampled `coupled` form on fewer inputs), and the paper
setup's global margins (r=8, p=0.5, m=10, γ=0.1, a=b=10) in each closed form.

With ``--runs``, for each finished run folder (trained, attacked): every form's mean certified
margin over the run's attacked inputs, divided by their mean estimated margin, and its time per
input (the run's r and p; the data the run used must be available):

    python benchmarks/bench_certify.py [--inputs 10000] [--coupled-inputs 200] [--repeats 3]
    python benchmarks/bench_certify.py --runs outputs/multirun/fig5/<date>/<time>/*_lipschitz_* [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lipvae.certify.bounds import CERTIFY_FORMS, FORMS, global_margin
from lipvae.certify.certificates import certify
from lipvae.vae import VAE
from timing import MNIST_SHAPE, machine, timed


def attacked_run(path: str):
    """A finished run's frozen VAE, config, folder, ``margins.csv`` table, test split and its
    attacked inputs ``x`` (the first ``len(margins.csv)``, checked against the table), r and p."""
    from lipvae.stored import rebuild_data
    from lipvae.stored import load_model

    vae, cfg, run_dir = load_model(Path(path))
    attacked = pd.read_csv(run_dir / "margins.csv")
    test = rebuild_data(run_dir, cfg).split("test")
    n = len(attacked)
    if not np.array_equal(test.index[:n].numpy(), attacked["index"].to_numpy()):
        raise SystemExit(f"{run_dir}: its test split is not the one it attacked (data.resplit, seed?)")
    return vae, cfg, run_dir, attacked, test, test.images[:n], float(cfg.attack.r), float(cfg.attack.p)


def runs_table(paths: list[str], repeats: int) -> pd.DataFrame:
    """Per run and form: mean certified ÷ mean estimated on the attacked inputs, time per input."""
    rows = []
    for path in paths:
        vae, cfg, run_dir, attacked, test, x, r, p = attacked_run(path)
        n = len(x)
        constants, estimated = vae.lipschitz_constants(), attacked["estimated"].mean()
        for form in CERTIFY_FORMS:
            def run():
                return certify(vae, x, test.index[:n].numpy(), test.labels[:n].numpy(), constants, [r], [p], [form])

            timing, (table, _) = timed(run, repeats=repeats)
            certified = table[f"certified_{form}"]
            rows.append({"run": run_dir.name, "hidden": "-".join(map(str, cfg.model.hidden)), "form": form,
                         "certified": certified.mean(), "estimated": estimated, "ratio": certified.mean() / estimated,
                         "certified share": (certified > 0).mean(),
                         "ms per input": 1000 * timing.median / n, "spread": f"{1000 * min(timing.runs) / n:.3g}–"
                         f"{1000 * max(timing.runs) / n:.3g}"})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=10000)
    ap.add_argument("--coupled-inputs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", nargs="+", help="finished run folders: certified ÷ estimated per form")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(machine())
    if args.runs:
        table = runs_table(args.runs, args.repeats)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(json.dumps(table.to_dict(orient="records")))
        return
    print("paper setup global margins (r=8, p=0.5, m=10, γ=0.1, a=b=10):")
    for form in FORMS:
        g = global_margin(10.0, 10.0, gamma=0.1, m=10, r=8.0, p=0.5, form=form)
        print(f"  {form:6s} {float(g.margin):.6f}  (R_M {float(g.markov):.6f}, R_chi2 {float(g.chi2):.6f})")
    x = torch.rand(args.inputs, 784)
    for mode in ("learned", "fixed"):
        vae = VAE(input_shape=MNIST_SHAPE, std_mode=mode, gamma=0.1).freeze().eval()
        constants = vae.lipschitz_constants()

        def certifying(inputs, forms):
            return lambda: certify(vae, inputs, np.arange(len(inputs)), np.zeros(len(inputs), dtype=int), constants,
                                   [8.0], [0.5], forms)

        timing, (table, summary) = timed(certifying(x, list(FORMS)), repeats=args.repeats)
        print(
            f"σ {mode:7s}: certified {len(table)} inputs x 3 forms in {timing} "
            f"({len(table) / timing.median:,.0f} inputs/s); mean tight margin {table['certified_tight'].mean():.4f}"
        )
        timing, (table, summary) = timed(certifying(x, ["cantelli"]), repeats=args.repeats)
        print(
            f"σ {mode:7s}: certified {len(table)} inputs, Cantelli form in {timing} "
            f"({len(table) / timing.median:,.0f} inputs/s); mean Cantelli margin {summary['mean']:.4f}"
        )
        timing, (table, summary) = timed(certifying(x[: args.coupled_inputs], ["coupled"]), repeats=args.repeats)
        print(
            f"σ {mode:7s}: certified {len(table)} inputs, coupled form (2,000 pairs each) in {timing} "
            f"({1000 * timing.median / len(table):.3g} ms per input); mean coupled margin {summary['mean']:.4f}"
        )

if __name__ == "__main__":
    main()
