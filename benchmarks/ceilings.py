"""How far could each candidate tightening of the certificate go on a trained model?

For each finished run (trained and attacked), on its attacked inputs, this prints the mean
margin of the `tight`, `cantelli` and `coupled` forms beside an upper estimate of what each candidate form
of docs/math.md §3 ("Where the slack is") could certify at best, however well it were carried
out. Each ceiling gives the candidate an oracle for the quantity it would have to bound:

- (a) local encoder constants: μ's Jacobian has every singular value equal to b at every point
  (checked here), so no local bound on μ is below b; σ's local constant is at least the norm of
  its Jacobian at x, so the ceiling is the tight form with c replaced by that norm.
- (b) a local decoder constant on a latent ball holding 1 − ε of q(·|x) and reaching as far as
  μ(x+δ) can move: any sound constant there is at least the largest decoder Jacobian norm found
  in the ball (random points, then projected gradient ascent), K. Ceiling: the tight (and the
  coupled) form with a replaced by K and p by p + ε. The ball is the one needed to certify at
  least the tight margin; a form that certifies less is of no use.
- (c) the exact law of z' − z instead of Lemma 2's bounds on it: the largest t at which
  z' − z ~ N(Δμ, diag(σ'² + σ²)) keeps ‖Δ‖ ≤ r with probability > p when ‖Δ‖ ≤ a‖z' − z‖, for the
  worst of a restricted set of adversaries (Δμ of norm bt along a coordinate axis; Δσ of norm ct
  on one coordinate, spread evenly, 0, or spent raising σ' to 1 from the largest or the smallest
  σᵢ; σ' capped at 1, the sigmoid's maximum), by Monte Carlo. A full adversary can only do worse, so this overestimates what any bound could give.
- (b)+(c): both at once.

    python benchmarks/ceilings.py <run folder> [<run folder> ...] [--eps 0.01] [--pairs 4000]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from torch.func import jacfwd, jacrev, vmap

from bench_certify import attacked_run
from lipvae.certify.bounds import Constants, SigmaNorms, margin, margin_cantelli
from lipvae.certify.certificates import COUPLED_DEFAULTS
from lipvae.certify.coupled import coupled_margin, self_damage
from timing import machine


def jacobian_norms(fn, points: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
    """Spectral norm of ``fn``'s Jacobian at each row of ``points`` (forward mode: few inputs)."""
    return torch.cat([torch.linalg.matrix_norm(vmap(jacfwd(fn))(p), 2) for p in torch.split(points, chunk)])


def largest_slope_in_balls(fn, centres: torch.Tensor, radii: torch.Tensor, samples: int = 400, keep: int = 8,
                           steps: int = 60, seed: int = 0) -> torch.Tensor:
    """Per ball ``B(centre, radius)``: the largest Jacobian norm of ``fn`` found by sampling
    ``samples`` points uniformly, then ``steps`` of projected gradient ascent from the best
    ``keep``. A lower bound on ``fn``'s Lipschitz constant on that ball."""
    gen = torch.Generator().manual_seed(seed)
    n, m = centres.shape
    u = torch.randn(n, samples, m, generator=gen, dtype=centres.dtype)
    u = u / u.norm(dim=-1, keepdim=True) * torch.rand(n, samples, 1, generator=gen, dtype=centres.dtype) ** (1 / m)
    pts = centres[:, None] + u * radii[:, None, None]
    with torch.no_grad():
        norms = jacobian_norms(fn, pts.reshape(-1, m)).reshape(n, samples)
    best = norms.max(dim=1).values
    top = torch.take_along_dim(pts, norms.topk(keep, dim=1).indices[..., None], dim=1).reshape(-1, m)
    top = top.clone().requires_grad_(True)
    c, rad = centres.repeat_interleave(keep, 0), radii.repeat_interleave(keep, 0)[:, None]
    for i in range(steps):  # normalised gradient steps of rad/10 down to rad/1000, then back onto the ball
        (grad,) = torch.autograd.grad(jacobian_norms(fn, top).sum(), top)
        with torch.no_grad():
            size = rad * 0.1 * 0.01 ** (i / max(steps - 1, 1))
            d = top + size * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30) - c
            top.copy_(c + d * torch.clamp(rad / d.norm(dim=1, keepdim=True).clamp_min(1e-30), max=1.0))
    with torch.no_grad():
        return torch.maximum(best, jacobian_norms(fn, top).reshape(n, keep).max(dim=1).values)


def exact_law_ceiling(sigma: np.ndarray, a, b: float, c: float, r: float, p, pairs: int = 4000, seed: int = 0,
                      iters: int = 30) -> np.ndarray:
    """Per row of ``sigma`` (n × m): the largest t with ``P(a‖z' − z‖ > r) < 1 − p`` for every
    adversary of the restricted set (module docstring), by bisection on common random numbers.
    ``a`` and ``p`` may be per row."""
    n, m = sigma.shape
    a, p = np.broadcast_to(np.asarray(a, dtype=float), (n,)), np.broadcast_to(np.asarray(p, dtype=float), (n,))
    g = np.random.default_rng(seed).standard_normal((2, pairs, m))
    reach = (r / a)[:, None]
    allocations = [np.zeros(m), np.full(m, 1 / math.sqrt(m)), *np.eye(m)]

    def filled(t, order):  # spend the budget ‖Δσ‖ ≤ ct raising σ' to 1, coordinate by coordinate
        out, left = sigma.copy(), (c * t) ** 2
        for i in order.T:
            rows = np.arange(n)
            step = np.minimum(1.0 - sigma[rows, i], np.sqrt(np.maximum(left, 0.0)))
            out[rows, i] += step
            left = left - step**2
        return out

    def fails(t):  # t: (n,) -> does some adversary push P(‖z' − z‖ > r/a) to ≥ 1 − p?
        worst = np.zeros(n)
        order = np.argsort(-sigma, axis=1)
        candidates = [np.minimum(sigma + c * t[:, None] * d, 1.0) for d in allocations]  # σ' ≤ 1 (sigmoid)
        candidates += [filled(t, order), filled(t, order[:, ::-1])]
        for sig2 in candidates:
            noise = g[0][None] * sig2[:, None] - g[1][None] * sigma[:, None]  # n × pairs × m
            sq = (noise**2).sum(-1)
            for j in range(m):  # ‖Δμ e_j + noise‖² = ‖noise‖² + 2 bt noise_j + (bt)²
                shift = b * t[:, None]
                out = np.sqrt(sq + 2 * shift * noise[..., j] + shift**2) > reach
                worst = np.maximum(worst, out.mean(axis=1))
        return worst >= 1 - p

    lo, hi = np.zeros(n), np.full(n, 2 * r / (a * b) + 10 * math.sqrt(2) * sigma.max(axis=1) / b)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        bad = fails(mid)
        lo, hi = np.where(bad, lo, mid), np.where(bad, mid, hi)
    return lo


def ceilings(path: str, eps: float, pairs: int) -> dict:
    vae, _, run_dir, attacked, _, x, r, p = attacked_run(path)
    vae, x, n = vae.double().cpu(), x.double(), len(x)
    if vae.std_mode != "learned":
        raise SystemExit(f"{run_dir}: the ceilings are written for a learned σ (this run: {vae.std_mode})")
    measured = vae.lipschitz_constants()["measured"]
    a, b, c, m = measured["decoder"], measured["encoder_mean"], measured["encoder_std"], vae.latent_dim
    with torch.no_grad():
        q = vae.encode(x)
    sigma = q.std.numpy()
    s, s_inf = np.linalg.norm(sigma, axis=1), sigma.max(axis=1)
    norms = SigmaNorms(s, s_inf, m, "learned", (sigma**4).sum(axis=1) ** 0.25)
    tight = margin(r, Constants(a, b, c), norms, p).margin
    damages = self_damage(vae, x, int(COUPLED_DEFAULTS["samples"]),
                          torch.Generator().manual_seed(int(COUPLED_DEFAULTS["seed"])))
    alpha = float(COUPLED_DEFAULTS["alpha"])
    coupled = coupled_margin(damages, a, b, c, m, r, p, alpha)[0]
    cantelli = margin_cantelli(r, Constants(a, b, c), norms, p).margin

    # (a) μ is an exact scaled isometry; σ's local constant is at least ‖J_σ(x)‖.
    mu_sv = torch.linalg.svdvals(vmap(jacrev(vae.encoder_mean))(x)).detach() / b
    sigma_slope = torch.linalg.matrix_norm(vmap(jacrev(vae.encoder_std))(x), 2).detach().numpy()
    ceil_a = margin(r, Constants(a, b, sigma_slope), norms, p).margin

    # (b) the decoder's slope on the ball the form would need, to certify at least `tight`.
    xi = torch.randn(20000, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r_eps = torch.quantile((q.std[:, None] * xi).norm(dim=-1), 1 - eps, dim=1)
    K = largest_slope_in_balls(vae.decoder, q.mean, r_eps + b * torch.from_numpy(tight)).numpy()
    ceil_b = np.maximum(tight, margin(r, Constants(K, b, c), norms, p + eps).margin)
    ceil_b_coupled = np.maximum(tight, np.array([coupled_margin(damages[i:i + 1], K[i], b, c, m, r, p + eps, alpha)[0][0]
                                                 for i in range(n)]))
    # (c) the exact law of z' − z, and (b)+(c)
    ceil_c = exact_law_ceiling(sigma, a, b, c, r, p, pairs)
    ceil_bc = np.maximum(tight, exact_law_ceiling(sigma, K, b, c, r, p + eps, pairs))

    base = tight.mean()
    row = {"run": run_dir.name, "inputs": n, "a": a, "b": b, "c": c, "estimated": attacked["estimated"].mean(),
           "tight": base, "cantelli": cantelli.mean(), "coupled": coupled.mean(), "2x tight": 2 * base,
           "mu singular values / b": [float(mu_sv.min()), float(mu_sv.max())],
           "sigma slope / c": float(sigma_slope.mean() / c), "decoder slope on ball / a": float(K.mean() / a),
           "(a)": ceil_a.mean(), "(b) tight": ceil_b.mean(), "(b) coupled": ceil_b_coupled.mean(),
           "(c)": ceil_c.mean(), "(b)+(c)": ceil_bc.mean(), "r/(ab)": r / (a * b)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="finished run folders (learned σ, attacked)")
    ap.add_argument("--eps", type=float, default=0.01, help="probability the latent ball may miss (charged to p)")
    ap.add_argument("--pairs", type=int, default=4000, help="Monte Carlo pairs for the exact-law ceilings")
    args = ap.parse_args()
    if not 0 < args.eps < 0.5:
        raise SystemExit(f"--eps: got {args.eps}; expected a number in (0, 0.5)")
    torch.manual_seed(0)
    print(machine())
    rows = [ceilings(path, args.eps, args.pairs) for path in args.runs]
    for row in rows:
        base = row["tight"]
        print(f"\n{row['run']} ({row['inputs']} attacked inputs; a={row['a']:.4g}, b={row['b']:.4g}, c={row['c']:.4g})")
        print(f"  μ Jacobian singular values ÷ b: {row['mu singular values / b'][0]:.6f} … "
              f"{row['mu singular values / b'][1]:.6f}; σ slope at x ÷ c: {row['sigma slope / c']:.3f}; "
              f"decoder slope on the ball ÷ a: ≥ {row['decoder slope on ball / a']:.3f}")
        for key in ("estimated", "tight", "cantelli", "coupled", "(a)", "(b) tight", "(b) coupled", "(c)", "(b)+(c)", "r/(ab)"):
            print(f"  {key:12s} {row[key]:.3f}  ({row[key] / base:.2f}× tight)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
