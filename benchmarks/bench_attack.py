"""Estimated-margin speed: lipvae's batched attack against the reference procedure.

The reference (``attack=lbfgs``, ``lipvae.attack.lbfgs``: the paper's, after Camuto et al.
2020): one image at a time, SciPy L-BFGS-B with the authors' settings (m = 100, factr = 10,
pgtol = 1e-20) maximising ‖g(μ(x+δ)) − g(μ(x))‖ over the sphere ‖δ‖ = t cut by the pixel box,
restarts at every radius of the descending grid 10, 9.5, …, 0.5, 40 Monte Carlo pairs per δ.
A full run costs many minutes per image, so it is measured on a subset and extrapolated:
``--radii`` radii of the grid, one L-BFGS-B run each, on every image. Every radius of the grid
needs at least one such run, so (grid size) × (median time of one run) is a *lower bound* on
the reference's time per image, and the speed-up printed is a lower bound too.

lipvae (``attack=pgd``): all inputs and starts in one batch, projected gradient ascent, and a
bisection on the radius (tolerance 0.05); timed as the median of ``--repeats`` runs after a
warm-up. Same model, same inputs, one process.

    python benchmarks/bench_attack.py [--inputs 5] [--repeats 3] [--radii 9.5,5,1] [--run <run dir>]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from lipvae.attack import LBFGS_DEFAULTS, estimate_margins, lbfgs_max_damage, robust_probability
from lipvae.data import ImageDataModule
from timing import machine, timed

R, P, SAMPLES, STARTS, MAX_RADIUS, GRID_STEP = 8.0, 0.5, 40, 5, 10.0, 0.5


def trained_model(run: str | None, epochs: int):
    if run:
        from lipvae.stored import load_model

        return load_model(Path(run))[0]
    import lightning as L

    from lipvae.module import VAEModule
    from lipvae.vae import VAE

    L.seed_everything(0, verbose=False)
    dm = ImageDataModule(resplit=True)
    vae = VAE()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(VAEModule(vae, lr=1e-3), train_dataloaders=dm.train_dataloader())
    return vae.freeze().eval()


def reference_runs(vae, x: torch.Tensor, radii: list[float]) -> tuple[list[float], dict]:
    """One L-BFGS-B run of the reference (authors' settings) per image and radius, each followed
    by its Monte Carlo test: the time of each run, and per radius how many images it broke."""
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    times, broken = [], {t: [] for t in radii}
    for i, xi in enumerate(x):
        for t in radii:
            start = time.perf_counter()
            delta, _ = lbfgs_max_damage(vae, xi, t, rng, LBFGS_DEFAULTS)
            robust = robust_probability(vae, xi[None], delta[None, None], R, SAMPLES, gen).item() > P
            times.append(time.perf_counter() - start)
            broken[t].append(not robust)
            print(f"reference: image {i + 1}/{len(x)}, radius {t:g}: {times[-1]:.1f} s, "
                  f"{'broken' if not robust else 'robust'}", flush=True)
    return times, broken


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--radii", default="9.5,5,1", help="grid radii at which the reference is timed")
    ap.add_argument("--run", default=None, help="a trained run's folder (default: train 2 epochs here)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.inputs < 5:
        raise SystemExit(f"error: --inputs: got {args.inputs}; accepted: an integer >= 5 (fixed costs dominate fewer)")
    os.environ.setdefault("LIPVAE_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    radii = [float(t) for t in args.radii.split(",")]
    vae = trained_model(args.run, args.epochs)
    test = ImageDataModule(resplit=True).split("test").images
    x, x25 = test[: args.inputs], test[:25]
    print(machine(), flush=True)

    def ours(inputs):
        return lambda: estimate_margins(vae, inputs, r=R, p=P, samples=SAMPLES, starts=STARTS,
                                        generator=torch.Generator().manual_seed(0), progress=False)

    t_ours, est = timed(ours(x), repeats=args.repeats)
    print(f"lipvae, {len(x)} images: {t_ours}, mean margin {est.margin.mean().item():.4f}", flush=True)
    t_25, est25 = timed(ours(x25), repeats=args.repeats)
    print(f"lipvae, 25 images: {t_25}, mean margin {est25.margin.mean().item():.4f}", flush=True)

    times, broken = reference_runs(vae, x, radii)
    per_run = float(np.median(times))
    grid = int(round(MAX_RADIUS / GRID_STEP))
    ref_per_image = grid * per_run  # at least one L-BFGS-B run per radius of the grid
    ours_per_image = t_ours.median / len(x)
    rows = {
        "machine": machine(),
        "inputs": len(x), "r": R, "p": P, "samples": SAMPLES, "starts": STARTS,
        "reference_run_s_median": per_run, "reference_run_s_range": [min(times), max(times)],
        "reference_runs_timed": len(times), "reference_per_image_s_lower_bound": ref_per_image,
        "lipvae_s": t_ours.runs, "lipvae_per_image_s": ours_per_image, "lipvae_mean_margin": est.margin.mean().item(),
        "lipvae_25_s": t_25.runs, "lipvae_25_mean_margin": est25.margin.mean().item(),
        "speedup_lower_bound": ref_per_image / ours_per_image,
        "speedup_lower_bound_25": 25 * ref_per_image / t_25.median,
    }
    print(f"\n{len(x)} MNIST test images, r={R}, p={P}, {SAMPLES} samples x {STARTS} starts")
    print(f"{'method':44s} {'s/image':>10s} {'mean margin':>12s}")
    print(f"{'reference, lower bound (' + str(grid) + ' radii x 1 run)':44s} {ref_per_image:10.1f} {'-':>12s}")
    print(f"{'lipvae (batched, bisection), ' + str(len(x)) + ' images':44s} {ours_per_image:10.3f} "
          f"{est.margin.mean().item():12.4f}")
    print(f"{'lipvae, 25 images':44s} {t_25.median / 25:10.3f} {est25.margin.mean().item():12.4f}")
    print(f"one reference L-BFGS-B run: {per_run:.2f} s median ({min(times):.2f}-{max(times):.2f}) over {len(times)} runs")
    print(f"speed-up, at least: {rows['speedup_lower_bound']:.0f}x ({len(x)} images), "
          f"{rows['speedup_lower_bound_25']:.0f}x (25 images)")
    for t in radii:  # the reference's verdict with one run against lipvae's margin on the same images
        agree = sum(est.margin[i].item() <= t + 0.05 for i, b in enumerate(broken[t]) if b)
        print(f"radius {t:g}: the reference broke {sum(broken[t])}/{len(x)} images with one run; "
              f"lipvae's margin is at most {t:g} (+ tol) on {agree} of them")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
