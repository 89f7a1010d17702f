"""The *coupled* certificate (docs/math.md §3, "Coupled form"): a margin that sees how much the
model's own sampling noise moves its reconstruction, measured by Monte Carlo at the clean input.

With ``z = μ(x) + σ(x)ξ``, ``z' = μ(x+δ) + σ(x+δ)ξ'`` and ``w = μ(x) + σ(x)ξ'`` (the clean
input with the perturbed sample's noise), ``‖g(z') − g(z)‖ ≤ a(bt + ct‖ξ'‖∞) + ‖g(w) − g(z)‖``.
The first term has an exact law; the second, the *self-damage* ``D`` of x, does not depend on δ
and is sampled. Its tail is bounded above, for every threshold at once, by the empirical tail
plus the one-sided DKW (Massart) width, so the certificate holds with probability at least
``1 − alpha`` over the certifier's samples, like a randomized-smoothing certificate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import erfinv

from lipvae.networks import cpu_float64


def dkw_width(samples: int, alpha: float) -> float:
    """``ε`` with ``P(sup_τ (P(D > τ) − P̂(D > τ)) > ε) ≤ alpha`` for ``samples`` i.i.d. draws
    (one-sided Dvoretzky–Kiefer–Wolfowitz with Massart's constant, valid for ``alpha ≤ ½``)."""
    return math.sqrt(math.log(1.0 / alpha) / (2.0 * samples))


@torch.no_grad()
def self_damage(vae, x: torch.Tensor, samples: int, generator: torch.Generator, rows: int = 20000) -> np.ndarray:
    """``D = ‖g(w) − g(z)‖`` for ``samples`` independent pairs ``w, z ~ q(·|x)`` per row of ``x``,
    sorted ascending per row (float64, ``len(x) × samples``). ``rows``: decoder rows per pass."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    per_pass = max(1, rows // (2 * samples))
    out = []
    for chunk in torch.split(x, per_pass):
        q = vae.encode(chunk.to(device))
        shape = (2, samples, *q.mean.shape)
        eps = torch.randn(shape, generator=generator, device=device, dtype=q.mean.dtype)
        z = q.mean + q.std * eps
        dist = (vae.decode(z[0]) - vae.decode(z[1])).norm(dim=-1)  # samples × chunk
        out.append(cpu_float64(dist).T)
    vae.train(was_training)
    return torch.sort(torch.cat(out), dim=1).values.numpy()


def noise_quantile(beta, m: int) -> np.ndarray:
    """``k`` with ``P(‖ξ‖∞ > k) = beta`` for ``ξ ~ N(0, I_m)``: ``erf(k/√2)^m = 1 − beta``."""
    return math.sqrt(2.0) * erfinv((1.0 - np.asarray(beta, dtype=float)) ** (1.0 / m))


def coupled_margin(damages: np.ndarray, a: float, b: float, c: float, m: int, r: float, p: float, alpha: float):
    """Per-row certified margin and the threshold τ that gives it, from sorted self-damages.

    For a threshold τ the failure probability at ``‖δ‖ = t`` is at most
    ``P(‖ξ‖∞ > k) + P̄(τ) + ε`` with ``k = ((r − τ)/a − bt)/(ct)``, where ``P̄(τ)`` is the share of
    sampled ``D > τ`` and ε the DKW width. Every t below ``((r − τ)/a) / (b + c k_β)``, with
    ``β = 1 − p − P̄(τ) − ε`` and ``k_β`` the ``1 − β`` quantile of ``‖ξ‖∞``, is robust (with
    c = 0: below ``(r − τ)/(ab)``). The tail estimate is constant between two sampled values, where
    the margin falls as τ grows, so the sampled values are the only thresholds to try.
    Returns ``(margin, tau)``; margin 0 and tau NaN where no threshold certifies."""
    damages = np.asarray(damages, dtype=float)
    n = damages.shape[1]
    eps = dkw_width(n, alpha)
    above = np.stack([n - np.searchsorted(row, row, side="right") for row in damages])
    beta = (1.0 - p) - above / n - eps
    ok = (beta > 0) & (damages < r)
    reach = np.where(ok, (r - damages) / a, 0.0)
    if c > 0:
        k = noise_quantile(np.where(ok, beta, 0.5), m)
        t = reach / (b + c * k)
    else:
        t = reach / b
    best = np.argmax(t, axis=1)  # t is 0 wherever no threshold certifies (reach is 0 there)
    margin = t.max(axis=1)
    tau = np.where(margin > 0, np.take_along_axis(damages, best[:, None], axis=1)[:, 0], np.nan)
    # one float64 step toward 0: a margin is never rounded up
    return np.nextafter(margin, 0.0) * (margin > 0), tau
