"""Training-step time of a paper-sized Lipschitz VAE: lipvae's Björck layers vs deel-torchlip.

Both run in this process on the same batch (128 × 784, paper architecture: μ, σ, g are
3-layer MLPs with hidden widths 512, 512, latent 10, GroupSort2, continuous Bernoulli ELBO,
Adam). Reported as times and as ratios against lipvae's 3-iteration step.

    python benchmarks/bench_layers.py [--steps 20] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from torch import nn

from lipvae.networks import BjorckLinear
from lipvae.vae import VAE
from timing import Timing, machine


def time_steps(vae: nn.Module, x: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        loss = -vae.elbo(x)["elbo"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def deel_vae(latent: int = 10):
    """The same VAE with deel-torchlip's SpectralLinear (spectral norm + Björck) layers."""
    from deel import torchlip

    def mlp(sizes, lip, head):
        k = len(sizes) - 1
        layers = []
        for i in range(k):
            layers.append(torchlip.SpectralLinear(sizes[i], sizes[i + 1], k_coef_lip=lip ** (1 / k)))
            if i < k - 1:
                layers.append(torchlip.GroupSort2())
        if head:
            layers.append(nn.Sigmoid())
        return nn.Sequential(*layers)

    vae = VAE(kind="standard", latent_dim=latent)
    vae.encoder_mean = mlp([784, 512, 512, latent], 5.0, False)
    vae.encoder_std = mlp([784, 512, 512, latent], 5.0, True)  # σ ends in its sigmoid head, as lipvae's
    vae.decoder = mlp([latent, 512, 512, 784], 5.0, True)
    return vae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(128, 784)
    makers = {f"lipvae_bjorck{iters}": (lambda iters=iters: VAE(layer=partial(BjorckLinear, iters=iters))) for iters in (3, 50)}
    steps = {"lipvae_bjorck3": args.steps, "lipvae_bjorck50": max(3, args.steps // 16)}
    try:
        deel_vae()
        makers["deel_torchlip_spectral_linear"] = deel_vae
        steps["deel_torchlip_spectral_linear"] = args.steps
    except ImportError:
        print("deel-torchlip not installed: pip install deel-torchlip to compare")
    rows = {}
    for name, make in makers.items():
        # each repeat times a fresh model's steps (after 3 untimed ones): the median per step
        runs = [time_steps(make(), x, steps[name]) for _ in range(args.repeats)]
        rows[name] = Timing(runs)
    base = rows["lipvae_bjorck3"].median
    print(machine())
    print(f"batch=128, paper architecture, {args.repeats} repeats")
    print(f"{'layer':34s} {'s/step (median, min–max)':>30s} {'ratio vs lipvae (3 it)':>24s}")
    for name, t in rows.items():
        spread = f"{t.median:.4f} ({min(t.runs):.4f}–{max(t.runs):.4f})"
        print(f"{name:34s} {spread:>30s} {t.median / base:24.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v.runs for k, v in rows.items()}, f, indent=2)


if __name__ == "__main__":
    main()
