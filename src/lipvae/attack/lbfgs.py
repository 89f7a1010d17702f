"""The reference procedure (``attack=lbfgs``; the paper's, after Camuto et al. 2020): one input
at a time, a descending grid of radii, SciPy L-BFGS-B from random restarts at each radius. Slow
(minutes per input on a CPU); for comparisons and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy import optimize
from lipvae.attack.base import AttackResult, MarginAttack, SearchSettings, SearchState, grid_search, robust_probability
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
                  lbfgs: dict | None = None, seed: int = 0) -> AttackResult:
    """The reference procedure on the descending grid ``max_radius, max_radius − grid_step, …,
    grid_step`` (``grid_search``, radius 0 first): at each radius every input still in play is
    attacked from ``starts`` L-BFGS-B restarts (stopping at the first that breaks it: the verdict
    is the same), and the margin is the smallest radius found non-robust. Input i draws from its
    own generators, seeded by (seed, i), so each input's answer does not depend on the others;
    a resumed search gives the answer an uninterrupted one would (``state_path``, with a
    ``generator`` whose state keys the saved one: the inputs' generators are saved with it)."""
    state = None
    if state_path is not None and generator is not None:
        settings = ("lbfgs", r, p, samples, starts, max_radius, grid_step, sorted((lbfgs or {}).items()), seed, "v2")
        state = SearchState(state_path, x, settings, generator)
    streams = _InputStreams(seed, len(x))
    was_training = vae.training
    vae.eval()
    device = x.device
    xs = x.detach().cpu()

    def robust_at(idx: torch.Tensor, t: float) -> torch.Tensor:
        robust = torch.ones(len(idx), dtype=torch.bool)
        for j, i in enumerate(idx.tolist()):
            rng, gen = streams.numpy[i], streams.torch[i]
            if t == 0.0:
                zero = torch.zeros(1, 1, xs.shape[1], dtype=xs.dtype)
                robust[j] = robust_probability(vae, xs[i][None], zero, r, samples, gen).item() > p
                continue
            for _ in range(starts):
                delta, _ = lbfgs_max_damage(vae, xs[i], t, rng, lbfgs, pixel_range)
                if robust_probability(vae, xs[i][None], delta[None, None], r, samples, gen).item() <= p:
                    robust[j] = False
                    break
        return robust

    vae.to("cpu")  # SciPy works on the CPU: the model goes there once, and back at the end
    try:
        found = grid_search(robust_at, len(x), SearchSettings(max_radius, "grid", grid_step=grid_step), state,
                            progress, desc="margins (L-BFGS-B)", zero_first=True, dtype=x.dtype,
                            hold=(streams.state, streams.restore))
    finally:
        vae.to(device)
        vae.train(was_training)
    return AttackResult(found.margin.to(device), found.censored.to(device), len(x) * found.radii_evaluated)


class _InputStreams:
    """Input i's random streams: NumPy's for the restarts' starting points, torch's (seeded from
    it) for the robustness test; their states are what a saved search holds (``state``)."""

    def __init__(self, seed: int, n: int) -> None:
        self.numpy = [np.random.default_rng([seed, i]) for i in range(n)]
        self.torch = [torch.Generator().manual_seed(int(rng.integers(2**62))) for rng in self.numpy]

    def state(self) -> dict:
        return {"numpy": json.dumps([rng.bit_generator.state for rng in self.numpy]),
                "torch": [g.get_state() for g in self.torch]}

    def restore(self, saved: dict) -> None:
        for rng, s in zip(self.numpy, json.loads(saved["numpy"])):
            rng.bit_generator.state = s
        for g, s in zip(self.torch, saved["torch"]):
            g.set_state(s.cpu().clone())  # a tensor of its own (set_state reads the storage)


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

    def estimate(self, vae, x, generator, seed=0, progress=True, state_path=None) -> AttackResult:
        return lbfgs_margins(vae, x, self.r, self.p, self.samples, self.starts, self.max_radius, self.grid_step,
                             self.pixel_range, progress, state_path, generator, self.lbfgs, seed)
