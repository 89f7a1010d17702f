"""What every margin attack shares (docs/math.md §4): the damage, the Monte Carlo robustness
test, the result type, the resumable search state, and ``MarginAttack``, the class an attack of
the ``attack`` config group subclasses. Torch only, no Hydra."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lipvae.results import atomic_write_text, replace_atomically, torch_save
from lipvae.vae import VAE


def damage(vae: VAE, x: torch.Tensor, delta: torch.Tensor, samples: int = 0) -> torch.Tensor:
    """``‖g(μ(x+δ)) − g(μ(x))‖₂`` (eq. 4), or with ``samples > 0`` its sampled variant
    ``mean_k ‖g(z'_k) − g(z_k)‖``, ``z' ~ q(·|x+δ)``, ``z ~ q(·|x)``."""
    if samples <= 0:
        return reconstruction_distance(vae, x + delta, vae.decode(vae.encode(x).mean))
    q, q2 = vae.encode(x), vae.encode(x + delta)
    diff = vae.decode(q2.sample(samples)) - vae.decode(q.sample(samples))
    return diff.norm(dim=-1).mean(0)


def reconstruction_distance(vae: VAE, x: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``‖g(μ(x)) − clean‖₂`` per row: the damage of ``x`` against a precomputed ``clean``
    reconstruction (an attack computes that once, not at every step)."""
    return (vae.decode(vae.encode(x).mean) - clean).norm(dim=-1)


@contextmanager
def input_gradients_only(module: torch.nn.Module):
    """Within the block ``module``'s parameters need no gradient (restored after): an attack
    differentiates with respect to its input alone, and compiled backward passes otherwise
    compute the weights' gradients too (about 1.6x the time of a step)."""
    needed = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in needed:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in needed:
            p.requires_grad_(flag)


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
class AttackResult:
    """What a margin attack returns for a batch of inputs (``MarginAttack.estimate``)."""

    margin: torch.Tensor  # per input: the smallest radius found non-robust (max_radius if none)
    censored: torch.Tensor  # True where still robust at max_radius (the margin is a lower cut-off)
    radii_evaluated: int


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
        replace_atomically(self.path, lambda partial: torch_save(plain, partial))
        if lo is not None and hi is not None:
            rows = "".join(f"{i},{a:.6g},{b:.6g}\n" for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())))
            atomic_write_text(self.path.with_suffix(".csv"), "input,robust_up_to,non_robust_at\n" + rows)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".csv").unlink(missing_ok=True)


def descending_grid(max_radius: float, grid_step: float) -> list[float]:
    """The reference procedure's radii, largest first: ``max_radius, max_radius − grid_step, …,
    grid_step`` (the grid search of both pgd's ``search=grid`` and L-BFGS-B)."""
    k = int(round(max_radius / grid_step))
    return [grid_step * i for i in range(k, 0, -1)]


@dataclass(frozen=True)
class SearchSettings:
    """How a margin search walks the radii (the attack group's ``max_radius``, ``search``,
    ``tol``, ``grid_step``): ``bisection`` halves every input's bracket until it is narrower
    than ``tol``; ``grid`` is the reference's descending grid (``radii``)."""

    max_radius: float = 10.0
    search: str = "grid"
    tol: float = 0.05
    grid_step: float = 0.5

    @property
    def radii(self) -> list[float]:
        return descending_grid(self.max_radius, self.grid_step)


def grid_search(robust_at: Callable[[torch.Tensor, float], torch.Tensor], n: int, settings: SearchSettings,
                state: SearchState | None = None, progress: bool = True, desc: str = "margins (grid)",
                zero_first: bool = False, device=None, dtype=torch.float32, hold: tuple | None = None) -> AttackResult:
    """The reference's descending grid, one for every attack (pgd's ``search=grid`` and L-BFGS-B):
    each input is attacked at radius 0 (the input itself: one that fails there has margin 0 and
    is attacked no further) and at every radius of ``settings.radii``; its margin is the smallest
    radius found non-robust, ``max_radius`` (censored) where none was. ``robust_at(idx, t)``: the
    verdict of inputs ``idx`` at radius ``t``. ``zero_first``: radius 0 before the grid (L-BFGS-B's
    order, which spares the inputs that fail there) or after it (the batched attack's). After
    each radius the search saves its state (``hold = (get, set)``: the attack's own, e.g. its
    random streams), so an interrupted search continues to the answer an uninterrupted one gives."""
    radii = settings.radii
    order = [0.0, *radii] if zero_first else [*radii, 0.0]
    margin = torch.full((n,), float(settings.max_radius), dtype=dtype, device=device)
    censored = torch.ones(n, dtype=torch.bool, device=device)
    fails_at_zero = torch.zeros(n, dtype=torch.bool, device=device)
    done = 0
    if state is not None and (saved := state.load(device)) is not None:
        done, margin, censored, fails_at_zero = saved["done"], saved["margin"], saved["censored"], saved["fails_at_zero"]
        if hold is not None:
            hold[1](saved["hold"])
    for k, t in enumerate(tqdm(order, desc=desc, disable=not progress, leave=False)):
        if k < done:
            continue
        idx = (~fails_at_zero).nonzero().flatten()
        if len(idx):
            robust = robust_at(idx, t)
            if t == 0.0:
                fails_at_zero[idx] = ~robust
            else:
                margin[idx] = torch.where(robust, margin[idx], torch.full_like(margin[idx], t))
                censored[idx] &= robust
        if state is not None:
            state.save(done=k + 1, margin=margin, censored=censored, fails_at_zero=fails_at_zero,
                       **({"hold": hold[0]()} if hold is not None else {}))
    if state is not None:
        state.remove()  # finished: nothing left to continue
    margin = torch.where(fails_at_zero, torch.zeros_like(margin), margin)
    return AttackResult(margin, censored & ~fails_at_zero, len(radii) + 1)


class MarginAttack:
    """An estimator of each input's (r, p)-robustness margin: the smallest radius at which the
    attack finds a δ with ``P̂(‖g(z') − g(z)‖ ≤ r) ≤ p`` (an upper bound on the true margin).

    A new attack subclasses this and implements ``estimate``; a YAML file in ``conf/attack/``
    names it in ``_target_``. Its constructor takes the attack group's fields it needs, by name
    (``r``, ``p``, ``samples``, ``starts``, ``max_radius``, ``pixel_range``, … and any of its
    own); ``lipvae.build.build_attack`` passes exactly those.
    """

    #: how results.json names the attack (``estimated.method``); the class name when None
    name: str | None = None

    def __init__(self, r: float = 8.0, p: float = 0.5, samples: int = 40, starts: int = 5,
                 max_radius: float = 10.0, pixel_range: bool = True) -> None:
        self.r, self.p, self.samples, self.starts = float(r), float(p), int(samples), int(starts)
        self.max_radius, self.pixel_range = float(max_radius), bool(pixel_range)

    def estimate(self, vae: VAE, x: torch.Tensor, generator: torch.Generator, seed: int = 0,
                 progress: bool = True, state_path: Path | None = None) -> AttackResult:
        """Margins of the inputs ``x`` (``N × n``). ``generator`` (and ``seed``, for attacks that
        draw from NumPy) make it reproducible; with ``state_path`` an interrupted estimate
        continues where it stopped when called again the same way."""
        raise NotImplementedError
