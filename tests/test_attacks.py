import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import every_kth_fast
import torch
from scipy import optimize, stats
from torch import nn

from lipvae.evaluation import other_class_targets, soundness_violations
from lipvae.attack import (
    damage,
    estimate_margins,
    gaussian_kl,
    latent_space_attack,
    lbfgs_margins,
    max_damage_attack,
    project_ball_box,
    projected_gradient,
    robust_probability,
)
from lipvae.certify.bounds import global_margin
from lipvae.certify.certificates import certify
from lipvae.vae import VAE, Posterior


def tiny_vae(**kw):
    torch.manual_seed(0)
    vae = VAE(input_dim=36, latent_dim=4, hidden=(16, 16), **kw).freeze().double()
    return vae.eval()


class LinearGaussianVAE(nn.Module):
    """μ(x) = Bx (all singular values b), σ ≡ γ, g(z) = Az with ‖Av‖ = a‖v‖: the (r, p)-margin
    is known in closed form (non-central χ²), and equals the tight fixed-σ certificate."""

    def __init__(self, n=30, m=3, a=2.0, b=3.0, gamma=0.2):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        u, _, vh = torch.linalg.svd(torch.randn(m, n, generator=g, dtype=torch.float64), full_matrices=False)
        q, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
        self.B, self.A, self.gamma, self.m = b * u @ vh, a * q, gamma, m
        self.latent_dim, self.std_mode, self.kind = m, "fixed", "lipschitz"
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        mean = x @ self.B.T
        std = torch.full_like(mean, self.gamma)
        return Posterior(mean, std, std.log())

    def decode(self, z):
        return z @ self.A.T

    def true_margin(self, r, p):
        x = r**2 / (2 * (self.A.norm(dim=0)[0].item()) ** 2 * self.gamma**2)
        b = torch.linalg.matrix_norm(self.B, ord=2).item()

        def robust_minus_p(t):
            return stats.ncx2.cdf(x, self.m, max(b**2 * t**2 / (2 * self.gamma**2), 1e-300)) - p

        return optimize.brentq(robust_minus_p, 1e-9, 100.0)


def test_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    n = 20
    x = torch.rand(50, n, generator=g, dtype=torch.float64)
    y = 2 * torch.randn(50, n, generator=g, dtype=torch.float64)
    radius = torch.rand(50, generator=g, dtype=torch.float64) * 1.5
    lo, hi = -x, 1 - x
    proj = project_ball_box(y, radius, lo, hi)
    assert torch.all(proj.norm(dim=1) <= radius + 1e-9)
    assert torch.all(proj >= lo - 1e-12) and torch.all(proj <= hi + 1e-12)
    # variational inequality ⟨y − P, w − P⟩ ≤ 0 for every feasible w characterises projection
    for _ in range(200):
        w = project_ball_box(torch.randn(50, n, generator=g, dtype=torch.float64), radius, lo, hi)
        assert torch.all(((y - proj) * (w - proj)).sum(1) <= 1e-7)
    plain = project_ball_box(y, radius)
    assert torch.allclose(plain.norm(dim=1), torch.minimum(y.norm(dim=1), radius))


@pytest.mark.parametrize("pixel_range", [True, False])
def test_max_damage_beats_random_and_respects_constraints(pixel_range):
    vae = tiny_vae()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 36, generator=g, dtype=torch.float64)
    radius = torch.linspace(0.2, 2.0, 10, dtype=torch.float64)
    delta, dmg = max_damage_attack(vae, x, radius, starts=3, steps=30, pixel_range=pixel_range, generator=g)
    assert torch.all(delta.norm(dim=-1) <= radius[:, None] + 1e-9)
    if pixel_range:
        adv = x[:, None] + delta
        assert torch.all(adv >= -1e-12) and torch.all(adv <= 1 + 1e-12)
    assert torch.allclose(dmg[:, 0], damage(vae, x, delta[:, 0]))
    rand = torch.randn(10, 200, 36, generator=g, dtype=torch.float64)
    rand = rand / rand.norm(dim=-1, keepdim=True) * radius[:, None, None]
    if pixel_range:
        rand = torch.stack([project_ball_box(rand[i], radius[i].expand(200), -x[i], 1 - x[i]) for i in range(10)])
    random_best = torch.stack([damage(vae, x[i].expand(200, -1), rand[i]).max() for i in range(10)])
    assert torch.all(dmg.max(1).values >= random_best)
    assert dmg.max(1).values.mean() > 1.5 * random_best.mean()


@pytest.mark.parametrize("warm_steps", [0, 8])
def test_estimated_margin_matches_the_analytic_one(warm_steps):
    model = LinearGaussianVAE()
    x = torch.rand(6, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    r, p = 1.5, 0.5
    truth = model.true_margin(r, p)
    certified = float(global_margin(2.0, 3.0, gamma=0.2, m=3, r=r, p=p, form="tight").margin)
    assert certified == pytest.approx(truth, rel=1e-6)  # this certificate is exact here
    est = estimate_margins(
        model, x, r=r, p=p, samples=4000, starts=2, steps=30, max_radius=3.0, tol=0.01,
        pixel_range=False, generator=torch.Generator().manual_seed(3), progress=False, warm_steps=warm_steps,
    )
    assert not est.censored.any()
    assert torch.allclose(est.margin, torch.full_like(est.margin, truth), atol=0.03)


def test_a_warm_start_begins_from_the_given_deltas_rescaled():
    x = torch.full((2, 5), 0.5, dtype=torch.float64)
    init = torch.tensor([[[1.0, 0, 0, 0, 0]], [[0, 0.1, 0.1, 0, 0]]], dtype=torch.float64)  # B=2, S=1
    radius = torch.tensor([0.3, 0.2], dtype=torch.float64)
    best, val = projected_gradient(lambda xr, d: -(d - init.reshape(2, 5)).norm(dim=1), x, radius, 1, 0, True,
                                   None, maximise=True, init=init)
    expected = init[:, 0] * (radius / init[:, 0].norm(dim=1))[:, None]
    assert torch.allclose(best[:, 0], expected) and torch.allclose(val[:, 0], -(expected - init[:, 0]).norm(dim=1))


@pytest.mark.slow
def test_bisection_and_grid_agree():
    vae = tiny_vae()
    x = torch.rand(8, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(r=1.0, p=0.5, samples=200, starts=2, steps=20, max_radius=3.0, progress=False)
    bis = estimate_margins(vae, x, tol=0.02, generator=torch.Generator().manual_seed(5), **kw)
    grid = estimate_margins(vae, x, search="grid", grid_step=0.25, generator=torch.Generator().manual_seed(5), **kw)
    assert (0 < bis.margin).all() and (bis.margin < 3.0).all()
    assert torch.all((grid.margin - bis.margin).abs() <= 0.25 + 0.02 + 0.05)
    assert bis.radii_evaluated < grid.radii_evaluated


def test_robust_probability_is_a_monte_carlo_probability():
    model = LinearGaussianVAE(gamma=0.3)
    x = torch.zeros(1, 30, dtype=torch.float64)
    delta = torch.zeros(1, 1, 30, dtype=torch.float64)
    r = 2.0
    exact = stats.chi2.cdf(r**2 / (2 * 4.0 * 0.09), 3)
    est = robust_probability(model, x, delta, r, 20000, torch.Generator().manual_seed(0))
    assert abs(est.item() - exact) < 4 * np.sqrt(exact * (1 - exact) / 20000)


def test_latent_attack_moves_towards_target():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(5, 36, generator=g, dtype=torch.float64)
    xt = torch.rand(5, 36, generator=g, dtype=torch.float64)
    q, qt = vae.encode(x), vae.encode(xt)
    before = gaussian_kl(q.mean, q.log_std, qt.mean, qt.log_std)
    res = latent_space_attack(vae, x, xt, budget=1.0, steps=60, generator=g)
    assert torch.all(res.kl < before)
    assert torch.all(res.delta.norm(dim=1) <= 1.0 + 1e-9)
    assert torch.all((res.adversarial >= -1e-12) & (res.adversarial <= 1 + 1e-12))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(qt.mean, qt.std)
    ).sum(-1)
    assert torch.allclose(before, ref)


def test_soundness_check_catches_a_planted_violation():
    """A model whose real encoder constant is 20× its nominal one, certified with the nominal
    constants: the attack must find inputs whose true margin is below the 'certificate'."""
    vae = VAE(
        input_dim=36, latent_dim=4, hidden=(16, 16), encoder_mean_L=1.0, decoder_L=2.0, std_mode="fixed", gamma=0.02
    )
    vae = vae.freeze().double().eval()
    honest = vae.lipschitz_constants()
    with torch.no_grad():
        vae.encoder_mean[0].weight.mul_(20.0)
    x = torch.rand(10, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    idx, labels = np.arange(10), np.zeros(10, dtype=int)
    r, p = 0.5, 0.5
    table, _ = certify(vae, x, idx, labels, honest, [r], [p], ["tight"])
    est = estimate_margins(vae, x, r=r, p=p, samples=200, starts=2, steps=20, max_radius=5.0, progress=False,
                           generator=torch.Generator().manual_seed(8))
    table["estimated"] = est.margin.numpy()
    bad = soundness_violations(table, ["certified_tight"])
    assert (table.certified_tight > 0.3).all()
    assert len(bad) >= 5, table
    # with the measured constants of the tampered model the certificates are sound again
    table2, _ = certify(vae, x, idx, labels, vae.lipschitz_constants(), [r], [p], ["tight"])
    table2["estimated"] = est.margin.numpy()
    assert soundness_violations(table2, ["certified_tight"]) == []


def _next_other_class(labels: list, i: int) -> int:
    """Brute force: the first of i + 1, i + 2, ... (cyclically) whose label differs; else i + 1."""
    n = len(labels)
    return next(((i + k) % n for k in range(1, n) if labels[(i + k) % n] != labels[i]), (i + 1) % n)


def test_other_class_targets():
    labels = torch.tensor([3, 3, 5, 3, 1])
    t = other_class_targets(labels)
    assert all(labels[t[i]] != labels[i] for i in range(5))
    gen = torch.Generator().manual_seed(0)
    for labels in (torch.randint(0, 3, (40,), generator=gen), torch.full((7,), -1), torch.tensor([2, 2, 2, 0]),
                   torch.tensor([4])):
        expected = [_next_other_class(labels.tolist(), i) for i in range(len(labels))]
        assert other_class_targets(labels).tolist() == expected
        assert other_class_targets(labels, 3).tolist() == expected[:3]
    # unlabelled, 10,000 test inputs, 25 attacked: milliseconds (the quadratic scan took ~9 minutes)
    assert other_class_targets(torch.full((10_000,), -1), 25).tolist() == list(range(1, 26))
    assert soundness_violations(pd.DataFrame({"index": [0], "estimated": [1.0]}), []) == []


def stop_after(n: int, real):
    """``real``, except that call n + 1 raises the KeyboardInterrupt a SIGTERM would."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] > n:
            raise KeyboardInterrupt("SIGTERM")
        return real(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("search,warm_steps", every_kth_fast([("bisection", 0), ("bisection", 4), ("grid", 0)], 3))
def test_an_interrupted_search_continues_to_the_same_answer(tmp_path, monkeypatch, search, warm_steps):
    import lipvae.attack.pgd as attacks

    vae = tiny_vae()
    x = torch.rand(6, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(r=1.0, p=0.5, samples=100, starts=2, steps=10, max_radius=3.0, tol=0.05, search=search,
              grid_step=0.5, progress=False, warm_steps=warm_steps)
    whole = estimate_margins(vae, x, generator=torch.Generator().manual_seed(5), **kw)

    real = attacks._attack_and_test  # one call per round (every radius after the first is warm)
    state = tmp_path / "attack_state.pt"
    monkeypatch.setattr(attacks, "_attack_and_test", stop_after(4, real))
    with pytest.raises(KeyboardInterrupt):
        estimate_margins(vae, x, generator=torch.Generator().manual_seed(5), state_path=state, **kw)
    assert state.is_file()
    if search == "bisection":  # the partial table brackets every margin found in the end
        partial = pd.read_csv(tmp_path / "attack_state.csv")
        assert len(partial) == 6 and (partial["robust_up_to"] <= whole.margin.numpy() + 1e-12).all()
        assert (whole.margin.numpy() <= partial["non_robust_at"] + 1e-12).all()
    counted = []
    monkeypatch.setattr(attacks, "_attack_and_test", lambda *a, **k: counted.append(1) or real(*a, **k))
    resumed = estimate_margins(vae, x, generator=torch.Generator().manual_seed(5), state_path=state, **kw)
    assert torch.equal(resumed.margin, whole.margin) and torch.equal(resumed.censored, whole.censored)
    assert len(counted) == whole.radii_evaluated - 4  # the 4 rounds done before the stop are not redone
    # another seed (or other settings) does not pick up the saved state
    other = estimate_margins(vae, x, generator=torch.Generator().manual_seed(6), state_path=state, **kw)
    assert other.radii_evaluated == whole.radii_evaluated


@pytest.mark.slow
def test_reference_lbfgs_margin_matches_the_analytic_one():
    model = LinearGaussianVAE()
    x = torch.rand(3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    r, p, step = 1.5, 0.5, 0.1
    truth = model.true_margin(r, p)
    est = lbfgs_margins(
        model, x, r=r, p=p, samples=4000, starts=2, max_radius=3.0, grid_step=step, pixel_range=False,
        lbfgs={"maxiter": 50}, generator=torch.Generator().manual_seed(3), progress=False,
    )
    assert not est.censored.any()
    # the grid's smallest non-robust radius: the first grid point at or above the truth
    assert torch.all((est.margin >= truth - 0.03) & (est.margin <= truth + step + 0.03)), (est.margin, truth)


@pytest.mark.slow
def test_reference_lbfgs_and_batched_pgd_agree(tmp_path, monkeypatch):
    import lipvae.attack.lbfgs as attacks

    vae = tiny_vae()
    x = torch.rand(3, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(r=1.0, p=0.5, samples=200, starts=2, max_radius=2.0, grid_step=0.25, progress=False)
    pgd = estimate_margins(vae, x, steps=20, search="grid", generator=torch.Generator().manual_seed(5), **kw)
    lb = dict(lbfgs={"maxiter": 15}, seed=7)  # enough for these margins (30 gives the same), half the time
    ref = lbfgs_margins(vae, x, generator=torch.Generator().manual_seed(5), **kw, **lb)
    assert (0 < ref.margin).all() and (ref.margin < 2.0).all()
    assert torch.all((ref.margin - pgd.margin).abs() <= 0.25 + 1e-9), (ref.margin, pgd.margin)
    # stopped after some restarts, the search continues to the same answer without redoing inputs
    real = attacks.lbfgs_max_damage
    state = tmp_path / "attack_state.pt"
    monkeypatch.setattr(attacks, "lbfgs_max_damage", stop_after(10, real))
    with pytest.raises(KeyboardInterrupt):
        lbfgs_margins(vae, x, generator=torch.Generator().manual_seed(5), state_path=state, **kw, **lb)
    done = torch.load(state, weights_only=True)["done"]
    assert 0 < done < 1 + 8  # radii finished of radius 0 and the 8 of the grid
    monkeypatch.setattr(attacks, "lbfgs_max_damage", real)
    resumed = lbfgs_margins(vae, x, generator=torch.Generator().manual_seed(5), state_path=state, **kw, **lb)
    assert torch.equal(resumed.margin, ref.margin) and not state.exists()


def test_soft_latent_attack_trades_kl_against_the_norm():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(6)
    x = torch.rand(5, 36, generator=g, dtype=torch.float64)
    xt = torch.rand(5, 36, generator=g, dtype=torch.float64)
    q, qt = vae.encode(x), vae.encode(xt)
    before = gaussian_kl(q.mean, q.log_std, qt.mean, qt.log_std)
    weak = latent_space_attack(vae, x, xt, budget=0.0, steps=150, kind="soft", penalty=0.1)
    strong = latent_space_attack(vae, x, xt, budget=0.0, steps=150, kind="soft", penalty=10.0)
    # each is at least as good as δ = 0 on its own objective, and a heavier penalty moves less
    assert torch.all(weak.kl + 0.1 * weak.delta.norm(dim=1) <= before + 1e-9)
    assert torch.all(strong.kl + 10.0 * strong.delta.norm(dim=1) <= before + 1e-9)
    assert torch.all(weak.delta.norm(dim=1) > strong.delta.norm(dim=1))
    assert torch.all(weak.kl < before) and weak.kl.mean() < strong.kl.mean()
    assert torch.all((weak.adversarial >= -1e-12) & (weak.adversarial <= 1 + 1e-12))


@pytest.mark.parametrize("scale, censored", [(0.5, True), (2.0, False)])
def test_inputs_still_robust_at_the_largest_radius_are_censored(scale, censored):
    # bisection attacks max_radius only for inputs a midpoint found robust: the verdict must
    # still be the one a direct attack there gives
    model = LinearGaussianVAE()
    x = torch.rand(4, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    truth = model.true_margin(1.5, 0.5)
    est = estimate_margins(model, x, r=1.5, p=0.5, samples=4000, starts=2, steps=20, max_radius=scale * truth,
                           tol=0.01, pixel_range=False, generator=torch.Generator().manual_seed(3), progress=False)
    assert est.censored.tolist() == [censored] * len(x)
    if censored:
        assert torch.all(est.margin == scale * truth)
    else:
        assert torch.allclose(est.margin, torch.full_like(est.margin, truth), atol=0.03)


def test_attacks_leave_the_models_parameters_alone():
    vae = tiny_vae()
    g = torch.Generator().manual_seed(0)
    x, xt = torch.rand(4, 36, generator=g, dtype=torch.float64), torch.rand(4, 36, generator=g, dtype=torch.float64)
    estimate_margins(vae, x, r=1.0, samples=20, starts=2, steps=5, max_radius=2.0, tol=0.5, generator=g,
                     progress=False)
    latent_space_attack(vae, x, xt, budget=1.0, steps=5, generator=g)
    latent_space_attack(vae, x, xt, budget=0.0, steps=5, kind="soft")
    assert all(p.requires_grad and p.grad is None for p in vae.parameters())


def test_a_failing_compiler_falls_back_to_the_eager_attack(monkeypatch):
    import lipvae.attack.pgd as pgd

    def broken_compile(fn, **kw):
        def call(*a):
            raise RuntimeError("no C++ compiler")
        return call

    vae = tiny_vae()
    x = torch.rand(4, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(r=1.0, p=0.5, samples=50, starts=2, steps=10, max_radius=3.0, tol=0.1, progress=False)
    eager = estimate_margins(vae, x, generator=torch.Generator().manual_seed(5), **kw)
    monkeypatch.setattr(pgd, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match=r"attack.compile: torch.compile failed \(RuntimeError\)") as said:
        fallback = estimate_margins(vae, x, generator=torch.Generator().manual_seed(5), compile=True, **kw)
    assert len(said) == 1 and torch.equal(fallback.margin, eager.margin)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile needs a C++ compiler on a CPU")
def test_compiled_attack_finds_the_eager_margins(monkeypatch):
    import lipvae.attack.pgd as pgd

    monkeypatch.setattr(pgd, "_COMPILED", {})
    vae = tiny_vae()
    x = torch.rand(6, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(r=1.0, p=0.5, samples=100, starts=2, steps=20, max_radius=3.0, tol=0.02, progress=False)
    eager = estimate_margins(vae, x, generator=torch.Generator().manual_seed(5), **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="attack.compile")  # compiled, not the fallback
        compiled = estimate_margins(vae, x, generator=torch.Generator().manual_seed(5), compile=True, **kw)
    assert torch.allclose(compiled.margin, eager.margin, atol=kw["tol"])  # same search, float rounding aside


@pytest.mark.parametrize("zero_first", [False, True])
def test_the_shared_grid_search_finds_the_smallest_non_robust_radius_and_resumes(tmp_path, zero_first):
    """grid_search (pgd's search=grid and L-BFGS-B) against brute force on a scripted verdict:
    input i is non-robust exactly on the radii of ``broken[i]``; radius 0 breaking means margin 0
    and no further attack; an interrupted search resumes to the same answer."""
    from lipvae.attack.base import SearchSettings, SearchState, grid_search

    settings = SearchSettings(max_radius=2.0, grid_step=0.5)  # radii 2, 1.5, 1, 0.5
    broken = [{2.0, 1.5}, {1.0, 2.0}, set(), {0.0}, {0.5, 1.5}]
    calls = []

    def robust_at(idx, t):
        calls.append((t, idx.tolist()))
        return torch.tensor([t not in broken[i] for i in idx.tolist()])

    found = grid_search(robust_at, 5, settings, progress=False, zero_first=zero_first, dtype=torch.float64)
    expect = [min(b - {0.0}) if b and 0.0 not in b else (0.0 if 0.0 in b else 2.0) for b in broken]
    assert found.margin.tolist() == expect and found.censored.tolist() == [False, False, True, False, False]
    assert found.radii_evaluated == 5
    attacked_after_zero = [i for t, idx in calls if t != 0.0 and zero_first for i in idx]
    assert 3 not in attacked_after_zero  # failed at radius 0: not attacked again
    # stopped after two radii, continued from the saved state: the same answer, the state gone
    x, gen = torch.zeros(5, 2), torch.Generator().manual_seed(0)
    state = SearchState(tmp_path / "s.pt", x, ("grid", zero_first), gen)
    budget = {"left": 2}

    def stops(idx, t):
        if budget["left"] == 0:
            raise KeyboardInterrupt
        budget["left"] -= 1
        return robust_at(idx, t)

    with pytest.raises(KeyboardInterrupt):
        grid_search(stops, 5, settings, state, progress=False, zero_first=zero_first, dtype=torch.float64)
    assert torch.load(tmp_path / "s.pt", weights_only=True)["done"] == 2
    budget["left"] = 99
    again = grid_search(stops, 5, settings, SearchState(tmp_path / "s.pt", x, ("grid", zero_first), gen),
                        progress=False, zero_first=zero_first, dtype=torch.float64)
    assert torch.equal(again.margin, found.margin) and not (tmp_path / "s.pt").exists()
