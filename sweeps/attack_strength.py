"""Is a model's estimated margin an artefact of a weak attack? Re-attack the same inputs harder.

For each run folder, on its first ``--inputs`` test inputs (the ones the run attacked), compare
the estimated (r, p)-margin found by

- ``default``: the run's own attack settings (PGD, bisection);
- ``strong``: PGD with ``--steps`` steps, ``--starts`` random starts and ``--samples`` Monte
  Carlo pairs, bisection to 0.05;
- ``reference`` (first ``--reference-inputs`` inputs): the paper's procedure, SciPy L-BFGS-B per
  random restart on the sphere ‖δ‖ = t (pixels clipped to [0, 1]), 5 restarts, 40 samples, on
  the reference grid's radii 0.5, 1.0, … up to the first radius above the default margin. The
  reference margin is the smallest non-robust radius of its descending grid 10, 9.5, …, 0.5;
  radii above the ones tried cannot lower it, so the shortened grid gives the same answer
  whenever one of its radii is non-robust (otherwise the row says ``>`` its last radius).

A weaker attack reports a *larger* margin, so a model whose margin falls a lot under the strong
or the reference attack was flattered by the default one.

    python sweeps/attack_strength.py <run dir> [<run dir> ...] [--inputs 25] [--reference-inputs 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import optimize

from lipvae.attack import estimate_margins, robust_probability
from lipvae.stored import load_model, rebuild_data


def reference_margin(vae, x, r, p, t_max, rng, gen, samples=40, starts=5, step=0.5) -> tuple[float, bool]:
    """Smallest non-robust radius of the grid ``step, 2·step, …, ≤ t_max`` by L-BFGS-B restarts;
    (t_max, False) when every radius tried is robust."""
    x = x[None]
    with torch.no_grad():
        clean = vae.decode(vae.encode(x).mean)
    for t in np.arange(step, t_max + 1e-9, step):

        def neg_damage(v, t=t):
            vt = torch.tensor(v, dtype=x.dtype, requires_grad=True)
            adv = torch.clamp(x + t * vt / vt.norm(), 0.0, 1.0)
            loss = -(vae.decode(vae.encode(adv).mean) - clean).norm()
            loss.backward()
            return loss.item(), vt.grad.double().numpy()

        for _ in range(starts):
            res = optimize.minimize(neg_damage, rng.standard_normal(x.shape[1]), jac=True, method="L-BFGS-B")
            v = torch.tensor(res.x, dtype=x.dtype)
            delta = (torch.clamp(x + t * v / v.norm(), 0.0, 1.0) - x)[:, None]
            if robust_probability(vae, x, delta, r, samples, gen).item() <= p:
                return float(t), True  # the ascending scan's first failure is the grid's smallest
    return float(t_max), False


def check_run(run: Path, inputs: int, reference_inputs: int, steps: int, starts: int, samples: int) -> pd.DataFrame:
    vae, cfg, run_dir = load_model(run)
    att = cfg.attack
    test = rebuild_data(run_dir, cfg).split("test")
    x = test.images[:inputs]
    rows = {"index": test.index[:inputs].numpy()}
    timing = {}
    for name, kw in (
        ("default", dict(samples=att.samples, starts=att.starts, steps=att.steps, tol=att.tol)),
        ("strong", dict(samples=samples, starts=starts, steps=steps, tol=0.05)),
    ):
        start = time.perf_counter()
        with torch.enable_grad():
            est = estimate_margins(vae, x, r=att.r, p=att.p, max_radius=att.max_radius, progress=False,
                                   generator=torch.Generator().manual_seed(1), **kw)
        timing[name] = time.perf_counter() - start
        rows[name] = est.margin.numpy()
    ref = np.full(inputs, np.nan)
    found = np.zeros(inputs, dtype=bool)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(min(reference_inputs, inputs)):
        t_max = float(np.ceil(rows["default"][i] / 0.5) * 0.5 + 0.5)
        ref[i], found[i] = reference_margin(vae, x[i], att.r, att.p, t_max, rng, gen)
    timing["reference"] = time.perf_counter() - start
    table = pd.DataFrame({**rows, "reference": ref, "reference_found": found})
    table.attrs["timing"] = timing
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--inputs", type=int, default=25)
    ap.add_argument("--reference-inputs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="CSV of every input (default: print only)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tables = []
    print(f"{'run':44s} {'default':>8s} {'strong':>8s} {'ref (first k)':>14s} {'default (first k)':>18s}  seconds")
    for run in args.runs:
        t = check_run(run, args.inputs, args.reference_inputs, args.steps, args.starts, args.samples)
        k = int(t["reference"].notna().sum())
        ref = t["reference"].iloc[:k]
        ref_text = f"{ref.mean():.3f}" + ("" if t["reference_found"].iloc[:k].all() else " (>)")
        secs = ", ".join(f"{n} {s:.0f}" for n, s in t.attrs["timing"].items())
        print(f"{run.name[-44:]:44s} {t['default'].mean():8.3f} {t['strong'].mean():8.3f} {ref_text:>14s} "
              f"{t['default'].iloc[:k].mean():18.3f}  {secs}", flush=True)
        t.insert(0, "run", str(run))
        tables.append(t)
    if args.out:
        pd.concat(tables).to_csv(args.out, index=False)
        print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
