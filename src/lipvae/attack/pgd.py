"""lipvae's batched maximum-damage attack (``attack=pgd``, the default): every input and
random start in one batch, projected gradient steps on the sphere ‖δ‖ = t (cut by the pixel
box), and a bisection over radii that moves every input's bracket at once (or the reference's
descending grid). Tensors stay on the model's device."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lipvae.attack.base import EstimatedMargins, MarginAttack, SearchState, damage, robust_probability
from lipvae.vae import VAE


def project_ball_box(
    delta: torch.Tensor, radius: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Euclidean projection of each row of ``delta`` (``N × n``) onto
    ``{‖δ‖₂ ≤ radius, lo ≤ δ ≤ hi}``, ``radius`` one per row.

    Without a box it is a rescaling. With one (``lo ≤ 0 ≤ hi``), the KKT conditions give
    ``δ = clip(s·y, lo, hi)`` with the largest ``s = 1/(1 + λ) ∈ (0, 1]`` that meets the
    norm; the clipped norm increases with s, so bisection finds it to float precision.
    """
    r = radius.to(delta).reshape(-1)
    if lo is None:
        norm = delta.norm(dim=1)
        return delta * torch.clamp(r / norm.clamp_min(1e-30), max=1.0)[:, None]
    clipped = torch.maximum(torch.minimum(delta, hi), lo)
    inside = clipped.norm(dim=1) <= r
    if inside.all():
        return clipped
    s_lo, s_hi = torch.zeros_like(r), torch.ones_like(r)
    for _ in range(50):
        mid = 0.5 * (s_lo + s_hi)
        ok = torch.maximum(torch.minimum(delta * mid[:, None], hi), lo).norm(dim=1) <= r
        s_lo = torch.where(ok, mid, s_lo)
        s_hi = torch.where(ok, s_hi, mid)
    projected = torch.maximum(torch.minimum(delta * s_lo[:, None], hi), lo)
    return torch.where(inside[:, None], clipped, projected)


def _random_on_sphere(shape, radius: torch.Tensor, generator, device, dtype) -> torch.Tensor:
    direction = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return direction * (radius / direction.norm(dim=1))[:, None]


def projected_gradient(
    objective,
    x: torch.Tensor,
    radius: torch.Tensor,
    starts: int,
    steps: int,
    pixel_range: bool,
    generator: torch.Generator | None,
    maximise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient ascent/descent with normalised steps on ``‖δ‖ ≤ radius`` (∩ pixel
    box), ``starts`` random starts per input. Returns the best δ per (input, start), shape
    ``B × S × n``, and its objective, ``B × S``.

    ``objective(x_rep, delta)`` returns one value per row of the ``B·S × n`` batch.
    """
    b, n = x.shape
    xr = x.repeat_interleave(starts, dim=0)
    rr = radius.to(x).repeat_interleave(starts)
    lo, hi = (-xr, 1.0 - xr) if pixel_range else (None, None)
    delta = project_ball_box(_random_on_sphere(xr.shape, rr, generator, x.device, x.dtype), rr, lo, hi)
    sign = 1.0 if maximise else -1.0
    best = delta.clone()
    best_val = torch.full((len(xr),), -math.inf, device=x.device, dtype=x.dtype)
    for k in range(steps + 1):
        delta.requires_grad_(True)
        with torch.enable_grad():
            val = sign * objective(xr, delta)
            (grad,) = torch.autograd.grad(val.sum(), delta)
        with torch.no_grad():
            improved = val > best_val
            best_val = torch.where(improved, val, best_val)
            best = torch.where(improved[:, None], delta, best)
            if k == steps:
                break
            # step size decays from radius/2 to radius/50 (cosine), per input's radius
            size = rr * (0.01 + 0.24 * (1 + math.cos(math.pi * k / steps)))
            step = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
            delta = project_ball_box(delta + size[:, None] * step, rr, lo, hi)
    return best.reshape(b, starts, n), (sign * best_val).reshape(b, starts)


def max_damage_attack(
    vae: VAE,
    x: torch.Tensor,
    radius,
    starts: int = 5,
    steps: int = 100,
    pixel_range: bool = True,
    samples: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise the damage over ``‖δ‖ ≤ radius`` (and ``x + δ ∈ [0, 1]`` with ``pixel_range``).

    ``radius``: a number or one per input. Returns δ (``B × S × n``) and damage (``B × S``).
    """
    radius = torch.as_tensor(radius, dtype=x.dtype, device=x.device).expand(len(x))
    return projected_gradient(
        lambda xr, d: damage(vae, xr, d, samples), x, radius, starts, steps, pixel_range, generator, maximise=True
    )


def _robust_at(vae, x, radius, r, p, samples, starts, steps, pixel_range, generator) -> torch.Tensor:
    """x is judged robust at ``radius`` only if every start leaves ``P̂ > p`` (docs/math.md §4)."""
    if torch.all(radius == 0):
        delta = torch.zeros(len(x), 1, x.shape[1], dtype=x.dtype, device=x.device)
    else:
        delta, _ = max_damage_attack(vae, x, radius, starts, steps, pixel_range, 0, generator)
    return (robust_probability(vae, x, delta, r, samples, generator) > p).all(dim=1)


def estimate_margins(
    vae: VAE,
    x: torch.Tensor,
    r: float = 8.0,
    p: float = 0.5,
    samples: int = 40,
    starts: int = 5,
    steps: int = 100,
    max_radius: float = 10.0,
    tol: float = 0.05,
    search: str = "bisection",
    grid_step: float = 0.5,
    pixel_range: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = True,
    state_path: Path | None = None,
) -> EstimatedMargins:
    """Estimated (r, p)-robustness margins (Camuto et al. 2020; paper Appendix D).

    ``bisection``: all inputs' brackets ``[robust, non-robust]`` halve together until
    narrower than ``tol``; the margin is the bracket's upper end. ``grid``: the reference's
    descending grid ``max_radius, max_radius − grid_step, …``, margin = smallest non-robust
    radius on it. Either way an input still robust at ``max_radius`` gets ``max_radius``
    and ``censored = True``. With ``state_path`` (and a ``generator``) the search saves its
    state after every round and, called again the same way, continues from it (``SearchState``);
    a finished search removes it.
    """
    was_training = vae.training
    vae.eval()
    args = (r, p, samples, starts, steps, pixel_range, generator)
    state = None
    if state_path is not None and generator is not None:
        settings = (r, p, samples, starts, steps, max_radius, tol, search, grid_step, pixel_range)
        state = SearchState(state_path, x, settings, generator)
    n = len(x)
    full = torch.full((n,), float(max_radius), dtype=x.dtype, device=x.device)
    if search == "grid":
        k = int(round(max_radius / grid_step))
        radii = [grid_step * i for i in range(k, 0, -1)]
        margin = full.clone()
        censored = torch.ones(n, dtype=torch.bool, device=x.device)
        done = 0
        if state is not None and (saved := state.load(x.device)) is not None:
            done, margin, censored = saved["done"], saved["margin"], saved["censored"]
        for i, t in enumerate(tqdm(radii, desc="margins (grid)", disable=not progress, leave=False)):
            if i < done:
                continue
            robust = _robust_at(vae, x, torch.full_like(full, t), *args)
            margin = torch.where(~robust, torch.full_like(full, t), margin)
            censored &= robust
            if state is not None:
                state.save(done=i + 1, margin=margin, censored=censored)
        zero_fail = ~_robust_at(vae, x, torch.zeros_like(full), *args)
        margin = torch.where(zero_fail, torch.zeros_like(full), margin)
        if state is not None:
            state.remove()  # finished: nothing left to continue
        vae.train(was_training)
        return EstimatedMargins(margin, censored & ~zero_fail, len(radii) + 1)

    saved = state.load(x.device) if state is not None else None
    if saved is not None:
        evaluated, robust_max, robust_zero = saved["evaluated"], saved["robust_max"], saved["robust_zero"]
        lo, hi, active = saved["lo"], saved["hi"], saved["active"]
    else:
        evaluated = 2
        robust_max = _robust_at(vae, x, full, *args)
        robust_zero = _robust_at(vae, x, torch.zeros_like(full), *args)
        lo = torch.zeros_like(full)
        hi = full.clone()
        active = ~robust_max & robust_zero
        hi = torch.where(robust_zero, hi, torch.zeros_like(hi))
    total = max(0, math.ceil(math.log2(max_radius / tol)))
    with tqdm(total=total, desc="margins (bisection)", disable=not progress, leave=False) as bar:
        while True:
            if state is not None:
                state.save(lo, hi, evaluated=evaluated, robust_max=robust_max, robust_zero=robust_zero,
                           active=active)
            if not bool((active & (hi - lo > tol)).any()):
                break
            todo = active & (hi - lo > tol)
            mid = 0.5 * (lo + hi)
            idx = todo.nonzero().flatten()
            robust = _robust_at(vae, x[idx], mid[idx], *args)
            lo[idx] = torch.where(robust, mid[idx], lo[idx])
            hi[idx] = torch.where(robust, hi[idx], mid[idx])
            evaluated += 1
            bar.update(1)
    if state is not None:
        state.remove()
    vae.train(was_training)
    return EstimatedMargins(hi, robust_max & robust_zero, evaluated)


class PGDAttack(MarginAttack):
    """``estimate_margins`` with the attack group's settings (``attack=pgd``)."""

    name = "pgd"

    def __init__(self, r: float = 8.0, p: float = 0.5, samples: int = 40, starts: int = 5, steps: int = 100,
                 max_radius: float = 10.0, tol: float = 0.05, search: str = "bisection", grid_step: float = 0.5,
                 pixel_range: bool = True) -> None:
        super().__init__(r, p, samples, starts, max_radius, pixel_range)
        self.steps, self.tol, self.search, self.grid_step = int(steps), float(tol), str(search), float(grid_step)

    def estimate(self, vae, x, generator, seed=0, progress=True, state_path=None) -> EstimatedMargins:
        return estimate_margins(
            vae, x, r=self.r, p=self.p, samples=self.samples, starts=self.starts, steps=self.steps,
            max_radius=self.max_radius, tol=self.tol, search=self.search, grid_step=self.grid_step,
            pixel_range=self.pixel_range, generator=generator, progress=progress, state_path=state_path,
        )
