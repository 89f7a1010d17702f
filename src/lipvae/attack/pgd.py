"""lipvae's batched maximum-damage attack (``attack=pgd``, the default): every input and
random start in one batch, projected gradient steps on the sphere ‖δ‖ = t (cut by the pixel
box), and a bisection over radii that moves every input's bracket at once (or the reference's
descending grid). Tensors stay on the model's device."""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lipvae.attack.base import (
    AttackResult, MarginAttack, SearchSettings, SearchState, damage, grid_search, input_gradients_only,
    reconstruction_distance, robust_probability,
)
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
    clipped = torch.clamp(delta, lo, hi)
    outside = clipped.norm(dim=1) > r
    if not outside.any():
        return clipped
    idx = outside.nonzero().flatten()  # only these rows need the bisection on s
    d, ro, lo_o, hi_o = delta[idx], r[idx], lo.expand_as(delta)[idx], hi.expand_as(delta)[idx]
    s_lo, s_hi = torch.zeros_like(ro), torch.ones_like(ro)
    # enough halvings to pin s ∈ (0, 1] below the dtype's resolution (float32: 26, float64: 55)
    for _ in range(round(-math.log2(torch.finfo(delta.dtype).eps)) + 3):
        mid = 0.5 * (s_lo + s_hi)
        ok = torch.clamp(d * mid[:, None], lo_o, hi_o).norm(dim=1) <= ro
        s_lo = torch.where(ok, mid, s_lo)
        s_hi = torch.where(ok, s_hi, mid)
    clipped[idx] = torch.clamp(d * s_lo[:, None], lo_o, hi_o)
    return clipped


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
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient ascent/descent with normalised steps on ``‖δ‖ ≤ radius`` (∩ pixel
    box), ``starts`` random starts per input. Returns the best δ per (input, start), shape
    ``B × S × n``, and its objective, ``B × S``.

    ``objective(x_rep, delta)`` returns one value per row of the ``B·S × n`` batch.
    ``init`` (``B × S × n``): warm starts instead of random ones, each rescaled to ``radius``;
    the step size then starts at radius/10 instead of radius/2, so as not to jump away from them.
    """
    b, n = x.shape
    xr = x.repeat_interleave(starts, dim=0)
    rr = radius.to(x).repeat_interleave(starts)
    lo, hi = (-xr, 1.0 - xr) if pixel_range else (None, None)
    if init is None:
        delta = _random_on_sphere(xr.shape, rr, generator, x.device, x.dtype)
        first = 0.24
    else:
        delta = init.reshape(b * starts, n).to(x)
        delta = delta * (rr / delta.norm(dim=1).clamp_min(1e-30))[:, None]
        first = 0.045
    delta = project_ball_box(delta, rr, lo, hi)
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
            # step size decays from radius/2 (warm: radius/10) to radius/50 (cosine), per input's radius
            size = rr * (0.01 + first * (1 + math.cos(math.pi * k / steps)))
            step = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
            delta = project_ball_box(delta + size[:, None] * step, rr, lo, hi)
    return best.reshape(b, starts, n), (sign * best_val).reshape(b, starts)


#: torch.compile of ``reconstruction_distance``, for one model at a time (``compile=True``);
#: None once compiling failed for that model
_COMPILED: dict[int, object] = {}


def _distance_fn(vae: VAE, compile: bool):
    """``reconstruction_distance`` bound to ``vae``; with ``compile``, through ``torch.compile``
    (dynamic batch size, so the shrinking batches of a search reuse one graph). Where the
    compiler fails, the eager function is used from then on, after one warning."""
    eager = partial(reconstruction_distance, vae)
    if not compile:
        return eager
    key = id(vae)  # the compiled function holds vae, so the id is not reused while cached
    if key not in _COMPILED:
        _COMPILED.clear()  # a later model does not keep an earlier one alive
        _COMPILED[key] = torch.compile(eager, dynamic=True)

    def distance(x, clean):
        compiled = _COMPILED.get(key)
        if compiled is not None:
            try:
                return compiled(x, clean)
            except Exception as err:  # no C++ compiler, an unsupported device, ...
                warnings.warn(f"attack.compile: torch.compile failed ({type(err).__name__}); "
                              "attacking without it", stacklevel=2)
                _COMPILED[key] = None
        return eager(x, clean)

    return distance


def max_damage_attack(
    vae: VAE,
    x: torch.Tensor,
    radius,
    starts: int = 5,
    steps: int = 100,
    pixel_range: bool = True,
    samples: int = 0,
    generator: torch.Generator | None = None,
    compile: bool = False,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise the damage over ``‖δ‖ ≤ radius`` (and ``x + δ ∈ [0, 1]`` with ``pixel_range``).

    ``radius``: a number or one per input. Returns δ (``B × S × n``) and damage (``B × S``).
    ``compile``: run the network through ``torch.compile`` (``samples = 0`` only).
    ``init``: warm starts (``B × S × n``, e.g. the δ found at a nearby radius) instead of random ones.
    """
    radius = torch.as_tensor(radius, dtype=x.dtype, device=x.device).expand(len(x))
    if samples > 0:
        objective = lambda xr, d: damage(vae, xr, d, samples)  # noqa: E731
    else:  # the clean reconstruction g(μ(x)) does not move with δ: computed once, not every step
        with torch.no_grad():
            clean = vae.decode(vae.encode(x).mean).repeat_interleave(starts, dim=0)
        distance = _distance_fn(vae, compile)
        objective = lambda xr, d: distance(xr + d, clean)  # noqa: E731
    with input_gradients_only(vae):
        return projected_gradient(objective, x, radius, starts, steps, pixel_range, generator, maximise=True,
                                  init=init)


def _attack_and_test(vae, x, radius, r, p, samples, starts, steps, pixel_range, generator, compile=False,
                     init=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x is judged robust at ``radius`` only if every start leaves ``P̂ > p`` (docs/math.md §4).
    Returns that verdict per input and the δ found (``B × S × n``)."""
    if torch.all(radius == 0):
        delta = torch.zeros(len(x), 1, x.shape[1], dtype=x.dtype, device=x.device)
    else:
        delta, _ = max_damage_attack(vae, x, radius, starts, steps, pixel_range, 0, generator, compile, init)
    return (robust_probability(vae, x, delta, r, samples, generator) > p).all(dim=1), delta


def _robust_at(vae, x, radius, *args) -> torch.Tensor:
    return _attack_and_test(vae, x, radius, *args)[0]


#: the version of the saved search state's layout: a state saved by another layout is not resumed
#: (v4: the grid search's state is grid_search's, shared with L-BFGS-B)
STATE_LAYOUT = "v4"


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
    compile: bool = False,
    warm_steps: int = 0,
) -> AttackResult:
    """Estimated (r, p)-robustness margins (Camuto et al. 2020; paper Appendix D).

    ``bisection``: all inputs' brackets ``[robust, non-robust]`` halve together until
    narrower than ``tol``; the margin is the bracket's upper end. ``grid``: the reference's
    descending grid ``max_radius, max_radius − grid_step, …``, margin = smallest non-robust
    radius on it. Either way an input still robust at ``max_radius`` gets ``max_radius``
    and ``censored = True`` (bisection attacks ``max_radius`` only for inputs that a midpoint
    found robust: the others' brackets never reach it). ``compile``: the network runs through
    ``torch.compile`` (a one-off compilation, then faster steps; for long or repeated searches).
    ``warm_steps > 0`` (bisection only): an input's first radius is attacked from random starts
    with ``steps`` steps; every later one from the δ its starts found at the previous radius,
    rescaled, with ``min(warm_steps, steps)`` steps (0: random starts and ``steps`` steps at every radius).
    With ``state_path`` (and a ``generator``) the search saves its
    state after every round and, called again the same way, continues from it (``SearchState``);
    a finished search removes it.
    """
    was_training = vae.training
    vae.eval()
    verdict = Verdict(vae, x, r, p, samples, starts, steps, pixel_range, generator, compile,
                      warm_steps if search == "bisection" else 0)
    state = None
    if state_path is not None and generator is not None:
        settings = (r, p, samples, starts, steps, max_radius, tol, search, grid_step, pixel_range, warm_steps,
                    STATE_LAYOUT)
        state = SearchState(state_path, x, settings, generator)
    settings = SearchSettings(max_radius, search, tol, grid_step)
    try:
        if search == "grid":
            def robust_at(idx: torch.Tensor, t: float) -> torch.Tensor:
                return verdict.at(idx, torch.full((len(idx),), t, dtype=x.dtype, device=x.device))

            return grid_search(robust_at, len(x), settings, state, progress, zero_first=False, device=x.device,
                               dtype=x.dtype)
        return _bisection_margins(verdict, settings, state, progress)
    finally:
        vae.train(was_training)


class Verdict:
    """Whether inputs are robust at given radii (every start leaves P̂ > p), by the batched attack.
    With ``warm_steps`` an input attacked before starts from the δ of each start at its last radius,
    rescaled, with ``min(warm_steps, steps)`` steps; ``warm``/``warmed`` hold those δ (saved with
    the search's state)."""

    def __init__(self, vae, x, r, p, samples, starts, steps, pixel_range, generator, compile, warm_steps) -> None:
        self.vae, self.x, self.steps, self.warm_steps = vae, x, steps, warm_steps
        self.args = (r, p, samples, starts, steps, pixel_range, generator, compile)
        n = len(x)
        self.warm = torch.zeros(n, starts, x.shape[1], dtype=x.dtype, device=x.device) if warm_steps > 0 else None
        self.warmed = torch.zeros(n, dtype=torch.bool, device=x.device)

    def at(self, idx: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """The verdict for inputs ``idx`` at ``radius`` (one per input)."""
        if self.warm is None:
            return _robust_at(self.vae, self.x[idx], radius, *self.args)
        r, p, samples, starts, _, pixel_range, generator, compile = self.args
        robust = torch.empty(len(idx), dtype=torch.bool, device=self.x.device)
        for sel, is_warm in ((self.warmed[idx], True), (~self.warmed[idx], False)):
            if bool(sel.any()):
                j = idx[sel]
                init, k = (self.warm[j], min(self.warm_steps, self.steps)) if is_warm else (None, self.steps)
                robust[sel], self.warm[j] = _attack_and_test(self.vae, self.x[j], radius[sel], r, p, samples, starts,
                                                             k, pixel_range, generator, compile, init)
                self.warmed[j] = True
        return robust

    def all_at(self, radius: float) -> torch.Tensor:
        """Every input's verdict at one radius, from random starts."""
        x = self.x
        return _robust_at(self.vae, x, torch.full((len(x),), float(radius), dtype=x.dtype, device=x.device),
                          *self.args)


def _bisection_margins(verdict: Verdict, settings: SearchSettings, state, progress: bool) -> AttackResult:
    """Every input's bracket [robust, non-robust] halves at once until narrower than ``tol``;
    margin = the bracket's upper end. ``max_radius`` is attacked only for inputs that a midpoint
    found robust (or whose bracket is done): robust there means censored."""
    x, max_radius, tol = verdict.x, settings.max_radius, settings.tol
    full = torch.full((len(x),), float(max_radius), dtype=x.dtype, device=x.device)
    saved = state.load(x.device) if state is not None else None
    if saved is not None:
        evaluated, censored, top_known = saved["evaluated"], saved["censored"], saved["top_known"]
        lo, hi, active = saved["lo"], saved["hi"], saved["active"]
        if verdict.warm is not None:
            verdict.warm, verdict.warmed = saved["warm"], saved["warmed"]
    else:
        evaluated, robust_zero = 1, verdict.all_at(0.0)
        lo, hi = torch.zeros_like(full), torch.where(robust_zero, full, torch.zeros_like(full))
        active, censored = robust_zero.clone(), torch.zeros_like(robust_zero)
        top_known = torch.zeros_like(active)  # whether max_radius has been attacked
    total = max(0, math.ceil(math.log2(max_radius / tol)))
    with tqdm(total=total, desc="margins (bisection)", disable=not progress, leave=False) as bar:
        while True:
            if state is not None:
                extra = {"warm": verdict.warm, "warmed": verdict.warmed} if verdict.warm is not None else {}
                state.save(lo, hi, evaluated=evaluated, censored=censored, top_known=top_known, active=active,
                           **extra)
            top = active & ~top_known & (hi >= max_radius) & ((lo > 0) | (hi - lo <= tol))
            if bool(top.any()):
                idx = top.nonzero().flatten()
                robust = verdict.at(idx, full[idx])
                censored[idx], active[idx], top_known[idx] = robust, ~robust, True
                evaluated += 1
                continue
            todo = active & (hi - lo > tol)
            if not bool(todo.any()):
                break
            mid, idx = 0.5 * (lo + hi), todo.nonzero().flatten()
            robust = verdict.at(idx, mid[idx])
            lo[idx] = torch.where(robust, mid[idx], lo[idx])
            hi[idx] = torch.where(robust, hi[idx], mid[idx])
            evaluated += 1
            bar.update(1)
    if state is not None:
        state.remove()
    return AttackResult(hi, censored, evaluated)


class PGDAttack(MarginAttack):
    """``estimate_margins`` with the attack group's settings (``attack=pgd``)."""

    name = "pgd"

    def __init__(self, r: float = 8.0, p: float = 0.5, samples: int = 40, starts: int = 5, steps: int = 100,
                 max_radius: float = 10.0, tol: float = 0.05, search: str = "bisection", grid_step: float = 0.5,
                 pixel_range: bool = True, compile: bool = False, warm_steps: int = 0) -> None:
        super().__init__(r, p, samples, starts, max_radius, pixel_range)
        self.steps, self.tol, self.search, self.grid_step = int(steps), float(tol), str(search), float(grid_step)
        self.compile, self.warm_steps = bool(compile), int(warm_steps)

    def estimate(self, vae, x, generator, seed=0, progress=True, state_path=None) -> AttackResult:
        return estimate_margins(
            vae, x, r=self.r, p=self.p, samples=self.samples, starts=self.starts, steps=self.steps,
            max_radius=self.max_radius, tol=self.tol, search=self.search, grid_step=self.grid_step,
            pixel_range=self.pixel_range, generator=generator, progress=progress, state_path=state_path,
            compile=self.compile, warm_steps=self.warm_steps,
        )
