"""The latent-space attack (paper eq. 3, Fig. 1): move x so that its posterior approaches that
of a target x_t, in the paper's hard (‖δ‖ ≤ C) and soft (norm penalty) variants."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipvae.attack.base import input_gradients_only
from lipvae.attack.pgd import projected_gradient
from lipvae.vae import VAE


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
    clean_gap: torch.Tensor  # ‖g(μ(x)) − g(μ(x_t))‖: how far the attack would have to go


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
    with torch.no_grad():
        qt = vae.encode(target)
    if kind == "soft":
        with input_gradients_only(vae):
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
        with input_gradients_only(vae):
            deltas, kls = projected_gradient(objective, x, radius, starts, steps, pixel_range, generator, maximise=False)
        pick = kls.argmin(dim=1)
        delta, kl = deltas[torch.arange(len(x)), pick], kls[torch.arange(len(x)), pick]
    with torch.no_grad():
        adv = x + delta
        rec = vae.decode(vae.encode(adv).mean)
        rec_t = vae.decode(qt.mean)
        rec_x = vae.decode(vae.encode(x).mean)
    return LatentAttack(adv, delta, rec, kl, (rec - rec_t).norm(dim=-1), (rec - rec_x).norm(dim=-1),
                        (rec_x - rec_t).norm(dim=-1))


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
