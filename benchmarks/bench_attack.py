"""Estimated-margin speed: lipvae's batched attack vs a reference-style procedure.

The reference (Camuto et al. 2020 as used by the paper, written here from its description):
one image at a time, SciPy L-BFGS-B maximising ‖g(μ(x+δ)) − g(μ(x))‖ with δ = t·v/‖v‖ on
the sphere ‖δ‖ = t (pixels clipped to [0, 1]), 5 random restarts at every radius of the full
descending grid 10, 9.5, …, 0.5, then 40 Monte Carlo pairs per found δ; the margin is the
smallest radius judged non-robust. lipvae: all inputs and starts batched, projected gradient
ascent, bisection on the radius (tolerance 0.05). Same model, same inputs, one process.

    python benchmarks/bench_attack.py [--inputs 1] [--run <run dir>] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import optimize

from lipvae.attack import estimate_margins, robust_probability
from lipvae.data import ImageDataModule

R, P, SAMPLES, STARTS = 8.0, 0.5, 40, 5


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
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(VAEModule(vae, lr=1e-3), train_dataloaders=dm.train_dataloader())
    return vae.freeze().eval()


def reference_margin(vae, x: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> float:
    """One image, full descending grid, L-BFGS-B per restart (the baseline)."""
    x = x[None]
    with torch.no_grad():
        clean = vae.decode(vae.encode(x).mean)
    margin = 10.0
    for t in np.arange(10.0, 0.0, -0.5):

        def neg_damage(v):
            vt = torch.tensor(v, dtype=x.dtype, requires_grad=True)
            adv = torch.clamp(x + t * vt / vt.norm(), 0.0, 1.0)
            loss = -(vae.decode(vae.encode(adv).mean) - clean).norm()
            loss.backward()
            return loss.item(), vt.grad.double().numpy()

        robust = True
        for _ in range(STARTS):
            res = optimize.minimize(neg_damage, rng.standard_normal(x.shape[1]), jac=True, method="L-BFGS-B")
            v = torch.tensor(res.x, dtype=x.dtype)
            delta = (torch.clamp(x + t * v / v.norm(), 0.0, 1.0) - x)[:, None]
            robust &= bool(robust_probability(vae, x, delta, R, SAMPLES, gen).item() > P)
        if not robust:
            margin = float(t)
    return margin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=1)
    ap.add_argument("--run", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("LIPVAE_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    vae = trained_model(args.run, args.epochs)
    x = ImageDataModule(resplit=True).split("test").images[: args.inputs]

    start = time.perf_counter()
    ours = estimate_margins(vae, x, r=R, p=P, samples=SAMPLES, starts=STARTS, generator=torch.Generator().manual_seed(0))
    t_ours = time.perf_counter() - start
    print(f"lipvae on the same {len(x)} image(s): {t_ours:.2f} s, mean margin {ours.margin.mean().item():.4f}", flush=True)
    start = time.perf_counter()
    ours_grid = estimate_margins(vae, x, r=R, p=P, samples=SAMPLES, starts=STARTS, search="grid",
                                 generator=torch.Generator().manual_seed(0))
    t_grid = time.perf_counter() - start
    print(f"lipvae on the reference's grid, same image(s): {t_grid:.2f} s, mean margin "
          f"{ours_grid.margin.mean().item():.4f}", flush=True)
    x25 = ImageDataModule(resplit=True).split("test").images[:25]
    start = time.perf_counter()
    ours25 = estimate_margins(vae, x25, r=R, p=P, samples=SAMPLES, starts=STARTS, generator=torch.Generator().manual_seed(0))
    t25 = time.perf_counter() - start
    print(f"lipvae on 25 images (the paper's count): {t25:.2f} s = {25 / t25:.2f} images/s, "
          f"mean margin {ours25.margin.mean().item():.4f}", flush=True)

    start = time.perf_counter()
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    ref = []
    for i, xi in enumerate(x):
        ref.append(reference_margin(vae, xi, rng, gen))
        print(f"reference: image {i + 1}/{len(x)}, margin {ref[-1]:g}, {time.perf_counter() - start:.0f} s so far", flush=True)
    t_ref = time.perf_counter() - start

    print(f"{args.inputs} MNIST test images, r={R}, p={P}, {SAMPLES} samples x {STARTS} starts, threads={torch.get_num_threads()}")
    print(f"{'method':28s} {'seconds':>9s} {'images/s':>9s} {'mean margin':>12s}")
    print(f"{'reference (L-BFGS-B, grid)':28s} {t_ref:9.2f} {args.inputs / t_ref:9.3f} {np.mean(ref):12.4f}")
    print(f"{'lipvae (batched, bisection)':28s} {t_ours:9.2f} {args.inputs / t_ours:9.3f} {ours.margin.mean().item():12.4f}")
    print(f"{'lipvae (batched, grid)':28s} {t_grid:9.2f} {args.inputs / t_grid:9.3f} {ours_grid.margin.mean().item():12.4f}")
    print(f"speed-up: bisection {t_ref / t_ours:.1f}x, grid {t_ref / t_grid:.1f}x; on the grid, margins ours <= reference "
          f"on {int((ours_grid.margin.numpy() <= np.array(ref) + 1e-9).sum())}/{args.inputs} inputs")


if __name__ == "__main__":
    main()
