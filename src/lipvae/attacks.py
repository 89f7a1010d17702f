"""Attacks on VAEs and the estimated robustness margin (docs/math.md §4). Torch only, no Hydra.

Everything is batched: inputs × random starts run as one batch through the model, and the
estimated-margin bisection moves every input's bracket at once. Tensors stay on the model's
device; randomness comes from an explicit ``torch.Generator`` for reproducibility.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import optimize
from tqdm.auto import tqdm

from lipvae.results import atomic_write_text, replace_atomically
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


def _pgd(
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


def damage(vae: VAE, x: torch.Tensor, delta: torch.Tensor, samples: int = 0) -> torch.Tensor:
    """``‖g(μ(x+δ)) − g(μ(x))‖₂`` (eq. 4), or with ``samples > 0`` its sampled variant
    ``mean_k ‖g(z'_k) − g(z_k)‖``, ``z' ~ q(·|x+δ)``, ``z ~ q(·|x)``."""
    if samples <= 0:
        return (vae.decode(vae.encode(x + delta).mean) - vae.decode(vae.encode(x).mean)).norm(dim=-1)
    q, q2 = vae.encode(x), vae.encode(x + delta)
    diff = vae.decode(q2.sample(samples)) - vae.decode(q.sample(samples))
    return diff.norm(dim=-1).mean(0)


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
    return _pgd(
        lambda xr, d: damage(vae, xr, d, samples), x, radius, starts, steps, pixel_range, generator, maximise=True
    )


def gaussian_kl(mean, log_std, mean_t, log_std_t) -> torch.Tensor:
    """``KL(N(μ, σ²) ‖ N(μ_t, σ_t²))`` for diagonal Gaussians, summed over the last dim."""
    var, var_t = (2 * log_std).exp(), (2 * log_std_t).exp()
    return (log_std_t - log_std + (var + (mean - mean_t) ** 2) / (2 * var_t) - 0.5).sum(-1)


@dataclass
class LatentAttack:
    adversarial: torch.Tensor  # x + δ
    delta: torch.Tensor
    reconstruction: torch.Tensor  # g(μ(x + δ))
    kl: torch.Tensor  # KL(q(z|x+δ) ‖ q(z|x_t))
    dist_to_target: torch.Tensor  # ‖g(μ(x+δ)) − g(μ(x_t))‖
    dist_to_original: torch.Tensor  # ‖g(μ(x+δ)) − g(μ(x))‖


LATENT_KINDS = ("hard", "soft")


def latent_space_attack(
    vae: VAE,
    x: torch.Tensor,
    target: torch.Tensor,
    budget: float,
    starts: int = 1,
    steps: int = 100,
    pixel_range: bool = True,
    generator: torch.Generator | None = None,
    kind: str = "hard",
    penalty: float = 1.0,
    lr: float = 0.05,
) -> LatentAttack:
    """The latent-space attack (eq. 3) in the paper's two variants, batched:

    - ``hard``: minimise ``KL(q(z|x+δ) ‖ q(z|x_t))`` over ``‖δ‖ ≤ budget`` (projected gradient
      descent from ``starts`` random points on the sphere; the best start is kept);
    - ``soft``: minimise ``KL(q(z|x+δ) ‖ q(z|x_t)) + penalty · ‖δ‖₂`` with no norm limit
      (Adam on δ from 0, ``lr``; ``budget`` is not used).

    Either keeps ``x + δ ∈ [0, 1]`` with ``pixel_range``.
    """
    if kind not in LATENT_KINDS:
        raise ValueError(f"attack.latent.kind: unknown {kind!r}; accepted: {', '.join(LATENT_KINDS)}")
    with torch.no_grad():
        qt = vae.encode(target)
    if kind == "soft":
        delta = _soft_latent(vae, x, qt, penalty, steps, lr, pixel_range)
        with torch.no_grad():
            q = vae.encode(x + delta)
            kl = gaussian_kl(q.mean, q.log_std, qt.mean, qt.log_std)
    else:
        reps = starts

        def objective(xr, d):
            q = vae.encode(xr + d)
            mean_t, log_std_t = qt.mean.repeat_interleave(reps, 0), qt.log_std.repeat_interleave(reps, 0)
            return gaussian_kl(q.mean, q.log_std, mean_t, log_std_t)

        radius = torch.full((len(x),), float(budget), dtype=x.dtype, device=x.device)
        deltas, kls = _pgd(objective, x, radius, starts, steps, pixel_range, generator, maximise=False)
        pick = kls.argmin(dim=1)
        delta, kl = deltas[torch.arange(len(x)), pick], kls[torch.arange(len(x)), pick]
    with torch.no_grad():
        adv = x + delta
        rec = vae.decode(vae.encode(adv).mean)
        rec_t = vae.decode(qt.mean)
        rec_x = vae.decode(vae.encode(x).mean)
    return LatentAttack(adv, delta, rec, kl, (rec - rec_t).norm(dim=-1), (rec - rec_x).norm(dim=-1))


def _soft_latent(vae: VAE, x: torch.Tensor, qt, penalty: float, steps: int, lr: float, pixel_range: bool):
    """δ minimising ``KL(q(z|x+δ) ‖ q_t) + penalty·‖δ‖₂`` by Adam (per input; the sum over
    the batch separates), kept in the pixel box; the best δ seen per input is returned."""
    delta = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    best, best_val = delta.detach().clone(), torch.full((len(x),), math.inf, device=x.device, dtype=x.dtype)
    for k in range(steps + 1):
        with torch.enable_grad():
            q = vae.encode(x + delta)
            # ‖δ‖ has no gradient at 0; a tiny floor lets the first step leave it
            norm = (delta.pow(2).sum(-1) + 1e-12).sqrt()
            val = gaussian_kl(q.mean, q.log_std, qt.mean, qt.log_std) + penalty * norm
        with torch.no_grad():
            improved = val < best_val
            best_val = torch.where(improved, val, best_val)
            best = torch.where(improved[:, None], delta, best)
        if k == steps:
            break
        opt.zero_grad()
        val.sum().backward()
        opt.step()
        if pixel_range:
            with torch.no_grad():
                delta.copy_(torch.maximum(torch.minimum(delta, 1.0 - x), -x))
    return best


@torch.no_grad()
def robust_probability(vae: VAE, x: torch.Tensor, delta: torch.Tensor, r: float, samples: int, generator=None):
    """Monte Carlo ``P̂(‖g(z') − g(z)‖ ≤ r)``, ``z ~ q(·|x)``, ``z' ~ q(·|x+δ)`` independent,
    for δ of shape ``B × S × n``; returns ``B × S``."""
    b, s, n = delta.shape
    xr = x.repeat_interleave(s, dim=0)
    q, q2 = vae.encode(xr), vae.encode(xr + delta.reshape(b * s, n))
    eps = torch.randn((2, samples, b * s, q.mean.shape[-1]), generator=generator, device=x.device, dtype=x.dtype)
    z, z2 = q.mean + q.std * eps[0], q2.mean + q2.std * eps[1]
    dist = (vae.decode(z2) - vae.decode(z)).norm(dim=-1)
    return (dist <= r).to(x.dtype).mean(0).reshape(b, s)


@dataclass
class EstimatedMargins:
    margin: torch.Tensor  # per input: the smallest radius found non-robust (max_radius if none)
    censored: torch.Tensor  # True where still robust at max_radius (the margin is a lower cut-off)
    radii_evaluated: int


def _robust_at(vae, x, radius, r, p, samples, starts, steps, pixel_range, generator) -> torch.Tensor:
    """x is judged robust at ``radius`` only if every start leaves ``P̂ > p`` (docs/math.md §4)."""
    if torch.all(radius == 0):
        delta = torch.zeros(len(x), 1, x.shape[1], dtype=x.dtype, device=x.device)
    else:
        delta, _ = max_damage_attack(vae, x, radius, starts, steps, pixel_range, 0, generator)
    return (robust_probability(vae, x, delta, r, samples, generator) > p).all(dim=1)


class SearchState:
    """The margin search's state after each round (brackets or grid position, and the random
    generator's state), written to ``path`` so that an interrupted search continues where it
    stopped and gives the same answer as an uninterrupted one. A saved state is used only when
    the inputs, the settings and the generator's starting state are the same (``key``). Beside
    it, ``<path stem>.csv`` holds the partial table: per input, the largest radius found robust
    so far and the smallest found non-robust."""

    def __init__(self, path: Path, x: torch.Tensor, settings: tuple, generator: torch.Generator) -> None:
        self.path, self.generator = Path(path), generator
        digest = hashlib.sha256(x.detach().cpu().numpy().tobytes())
        digest.update(repr(settings).encode())
        digest.update(generator.get_state().numpy().tobytes())
        self.key = digest.hexdigest()

    def load(self, device) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # unreadable (e.g. cut off by a kill): start over
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return None
        self.generator.set_state(saved.pop("rng"))
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in saved.items()}

    def save(self, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None, **state) -> None:
        state = {"key": self.key, "rng": self.generator.get_state(), **state}
        if lo is not None and hi is not None:
            state.update(lo=lo, hi=hi)
        plain = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}
        replace_atomically(self.path, lambda partial: torch.save(plain, partial))
        if lo is not None and hi is not None:
            rows = "".join(f"{i},{a:.6g},{b:.6g}\n" for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())))
            atomic_write_text(self.path.with_suffix(".csv"), "input,robust_up_to,non_robust_at\n" + rows)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".csv").unlink(missing_ok=True)


#: The reference procedure's L-BFGS-B settings (the authors': SciPy's m, factr, pgtol).
LBFGS_DEFAULTS = {"maxcor": 100, "factr": 10.0, "pgtol": 1e-20, "maxiter": 15000}
METHODS = ("pgd", "lbfgs")


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


def _lbfgs_margins(vae, x, r, p, samples, starts, max_radius, grid_step, pixel_range, progress, state, lbfgs, seed):
    """The reference procedure, one input at a time: on the descending grid ``max_radius,
    max_radius − grid_step, …, grid_step`` each radius is attacked from ``starts`` L-BFGS-B
    restarts (stopping at the first that breaks it: the verdict is the same) and the margin is
    the smallest radius found non-robust. Input i draws from generators seeded by (seed, i), so
    a resumed search gives the answer an uninterrupted one would."""
    device = x.device
    n = len(x)
    k = int(round(max_radius / grid_step))
    radii = [grid_step * i for i in range(k, 0, -1)]
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
    if state is not None:
        state.remove()
    return EstimatedMargins(margin.to(device), censored.to(device), n * (len(radii) + 1))


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
    method: str = "pgd",
    lbfgs: dict | None = None,
    seed: int = 0,
) -> EstimatedMargins:
    """Estimated (r, p)-robustness margins (Camuto et al. 2020; paper Appendix D).

    ``bisection``: all inputs' brackets ``[robust, non-robust]`` halve together until
    narrower than ``tol``; the margin is the bracket's upper end. ``grid``: the reference's
    descending grid ``max_radius, max_radius − grid_step, …``, margin = smallest non-robust
    radius on it. Either way an input still robust at ``max_radius`` gets ``max_radius``
    and ``censored = True``. With ``state_path`` (and a ``generator``) the search saves its
    state after every round and, called again the same way, continues from it (``SearchState``);
    a finished search removes it.

    ``method``: ``pgd`` (the batched projected-gradient attack above) or ``lbfgs`` (the
    reference procedure, ``_lbfgs_margins``: one input at a time on the grid, whatever
    ``search`` says, with the pixel box, SciPy options ``lbfgs`` and NumPy seed ``seed``).
    """
    if method not in METHODS:
        raise ValueError(f"attack.method: unknown {method!r}; accepted: {', '.join(METHODS)}")
    if search not in ("bisection", "grid"):
        raise ValueError(f"attack.search: unknown {search!r}; accepted: bisection, grid")
    was_training = vae.training
    vae.eval()
    args = (r, p, samples, starts, steps, pixel_range, generator)
    state = None
    if state_path is not None and generator is not None:
        settings = (r, p, samples, starts, steps, max_radius, tol, search, grid_step, pixel_range)
        if method == "lbfgs":
            settings = (method, r, p, samples, starts, max_radius, grid_step, sorted((lbfgs or {}).items()), seed)
        state = SearchState(state_path, x, settings, generator)
    if method == "lbfgs":
        out = _lbfgs_margins(vae, x, r, p, samples, starts, max_radius, grid_step, pixel_range, progress, state,
                             lbfgs, seed)
        vae.train(was_training)
        return out
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
