"""The reference procedure (``attack=lbfgs``; the paper's, after Camuto et al. 2020): one input
at a time, a descending grid of radii, SciPy L-BFGS-B from random restarts at each radius. Slow
(minutes per input on a CPU); for comparisons and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import optimize
from tqdm.auto import tqdm

from lipvae.attack.base import EstimatedMargins, MarginAttack, SearchState, descending_grid, robust_probability
from lipvae.vae import VAE

#: The reference procedure's L-BFGS-B settings (the authors': SciPy's m, factr, pgtol).
LBFGS_DEFAULTS = {"maxcor": 100, "factr": 10.0, "pgtol": 1e-20, "maxiter": 15000}


def lbfgs_max_damage(
    vae: VAE, x: torch.Tensor, radius: float, rng: np.random.Generator, lbfgs: dict | None = None,
    pixel_range: bool = True,
):
    """The reference maximum-damage attack on one input ``x`` (shape ``n``): SciPy L-BFGS-B on
    a direction v, with ``δ = clip(x + t·v/‖v‖, 0, 1) − x`` (the sphere ‖δ‖ = t, cut by the
    pixel box; no clip without ``pixel_range``), from a random start. Returns δ (``n``) and its
    damage ``‖g(μ(x+δ)) − g(μ(x))‖``."""
    opts = {**LBFGS_DEFAULTS, **(lbfgs or {})}
    xc = x.detach().cpu().double()[None]
    cpu = vae.to("cpu")  # SciPy works on the CPU; the model is moved back by the caller
    with torch.no_grad():
        clean = cpu.decode(cpu.encode(xc.to(x.dtype)).mean).double()

    def delta_of(v: torch.Tensor) -> torch.Tensor:
        step = radius * v / v.norm().clamp_min(1e-30)
        return torch.clamp(xc + step, 0.0, 1.0) - xc if pixel_range else step[None]

    def neg_damage(v: np.ndarray):
        vt = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            adv = (xc + delta_of(vt)).to(x.dtype)  # the model's own precision
            loss = -(cpu.decode(cpu.encode(adv).mean).double() - clean).norm()
            loss.backward()
        return float(loss.detach()), vt.grad.numpy().astype(np.float64)

    start = rng.standard_normal(xc.shape[1])
    res = optimize.fmin_l_bfgs_b(neg_damage, start, m=opts["maxcor"], factr=opts["factr"], pgtol=opts["pgtol"],
                                 maxiter=opts["maxiter"], maxfun=max(opts["maxiter"], 15000))
    v = torch.tensor(res[0], dtype=torch.float64)
    return delta_of(v)[0].to(x.dtype), -float(res[1])


def lbfgs_margins(vae: VAE, x: torch.Tensor, r: float = 8.0, p: float = 0.5, samples: int = 40, starts: int = 5,
                  max_radius: float = 10.0, grid_step: float = 0.5, pixel_range: bool = True, progress: bool = True,
                  state_path: Path | None = None, generator: torch.Generator | None = None,
                  lbfgs: dict | None = None, seed: int = 0) -> EstimatedMargins:
    """The reference procedure, one input at a time: on the descending grid ``max_radius,
    max_radius − grid_step, …, grid_step`` each radius is attacked from ``starts`` L-BFGS-B
    restarts (stopping at the first that breaks it: the verdict is the same) and the margin is
    the smallest radius found non-robust. Input i draws from generators seeded by (seed, i), so
    a resumed search gives the answer an uninterrupted one would (``state_path``, with a
    ``generator`` whose state keys the saved one; the draws themselves come from ``seed``)."""
    state = None
    if state_path is not None and generator is not None:
        settings = ("lbfgs", r, p, samples, starts, max_radius, grid_step, sorted((lbfgs or {}).items()), seed)
        state = SearchState(state_path, x, settings, generator)
    was_training = vae.training
    vae.eval()
    device = x.device
    n = len(x)
    radii = descending_grid(max_radius, grid_step)
    margin = torch.full((n,), float(max_radius), dtype=x.dtype)
    censored = torch.ones(n, dtype=torch.bool)
    done = 0
    if state is not None and (saved := state.load("cpu")) is not None:
        done, margin, censored = saved["done"], saved["margin"], saved["censored"]
    vae.to("cpu")  # SciPy works on the CPU: the model goes there once, and back at the end
    try:
        for i in tqdm(range(n), desc="margins (L-BFGS-B)", disable=not progress, leave=False):
            if i < done:
                continue
            rng = np.random.default_rng([seed, i])
            cpu_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            xi = x[i].detach().cpu()
            zero = torch.zeros(1, 1, len(xi), dtype=xi.dtype)
            if robust_probability(vae, xi[None], zero, r, samples, cpu_gen).item() <= p:
                margin[i], censored[i] = 0.0, False
            else:
                for t in radii:
                    for _ in range(starts):
                        delta, _ = lbfgs_max_damage(vae, xi, t, rng, lbfgs, pixel_range)
                        if robust_probability(vae, xi[None], delta[None, None], r, samples, cpu_gen).item() <= p:
                            margin[i], censored[i] = t, False
                            break
            if state is not None:
                state.save(done=i + 1, margin=margin, censored=censored)
    finally:
        vae.to(device)
        vae.train(was_training)
    if state is not None:
        state.remove()
    return EstimatedMargins(margin.to(device), censored.to(device), n * (len(radii) + 1))


class LBFGSAttack(MarginAttack):
    """``lbfgs_margins`` with the attack group's settings; ``lbfgs``: SciPy's options over
    ``LBFGS_DEFAULTS``."""

    name = "lbfgs"
    search = "grid"  # the procedure is a descending grid of radii (recorded as estimated.search)

    def __init__(self, r: float = 8.0, p: float = 0.5, samples: int = 40, starts: int = 5,
                 max_radius: float = 10.0, grid_step: float = 0.5, pixel_range: bool = True,
                 lbfgs: dict | None = None) -> None:
        super().__init__(r, p, samples, starts, max_radius, pixel_range)
        self.grid_step, self.lbfgs = float(grid_step), {**LBFGS_DEFAULTS, **(lbfgs or {})}

    def estimate(self, vae, x, generator, seed=0, progress=True, state_path=None) -> EstimatedMargins:
        return lbfgs_margins(vae, x, self.r, self.p, self.samples, self.starts, self.max_radius, self.grid_step,
                             self.pixel_range, progress, state_path, generator, self.lbfgs, seed)
