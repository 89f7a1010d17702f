import json
import re
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import PROJECT, every_kth_fast
import torch

from lipvae.certify.__main__ import main as certify_main
from lipvae.certify.bounds import Constants, SigmaNorms, global_margin, margin
from lipvae.stored import load_model, load_state
from lipvae.errors import UserError



@pytest.fixture
def runs(smoke_runs):
    """Two tiny trained Lipschitz VAEs (learned and fixed σ) and two standard ones."""
    return smoke_runs


@pytest.mark.slow
def test_callback_table_matches_bounds(runs):
    run = runs[("lipschitz", "learned")]
    r = json.loads((run / "results.json").read_text())
    cert = r["certified"]
    table = pd.read_csv(run / cert["table"])
    assert cert["num_inputs"] == len(table) == r["data"]["num_test"]
    assert {"index", "label", "s", "s_inf", "certified_tight", "certified_exact", "certified_paper"} <= set(table)
    a, b, c = (r["lipschitz"]["measured"][k] for k in ("decoder", "encoder_mean", "encoder_std"))
    assert (cert["constants"]["a"], cert["constants"]["b"], cert["constants"]["c"]) == (a, b, c)
    expected = margin(8.0, Constants(a, b, c), SigmaNorms(table.s, table.s_inf, 10, "learned"), 0.5, "tight").margin
    assert np.allclose(table.certified_tight, expected, rtol=1e-12)
    # a = 5/4, b = 5: the tight Markov term alone certifies any s ≤ √m (σ < 1) at r = 8
    assert cert["fraction_certified"] == 1.0 and cert["min"] > 0
    assert np.all(table.certified_tight >= table.certified_exact - 1e-12)
    assert np.all(table.certified_exact >= table.certified_paper - 1e-12)
    assert cert["mean"] == pytest.approx(table.certified_tight.mean())
    assert cert["global_margin"] is None
    assert (run / "certified_margins.png").is_file()


@pytest.mark.slow
def test_fixed_sigma_inputs_share_the_global_margin(runs):
    r = json.loads((runs[("lipschitz", "fixed")] / "results.json").read_text())
    cert = r["certified"]
    m = r["lipschitz"]["measured"]
    # the σ the model computes: float32(0.1), not 0.1
    g = float(global_margin(m["decoder"], m["encoder_mean"], gamma=float(np.float32(0.1)), m=10, r=8.0, p=0.5).margin)
    assert cert["global_margin"] == pytest.approx(g, rel=1e-12)
    assert cert["min"] == pytest.approx(g, rel=1e-6) and cert["min"] <= g * (1 + 1e-9)


@pytest.mark.slow
def test_standard_vae_gets_null_not_zero(runs):
    r = json.loads((runs[("standard", "learned")] / "results.json").read_text())
    assert r["certified"] is None and r["lipschitz"] is None


@pytest.mark.slow
def test_certificate_holds_on_the_trained_network(runs, monkeypatch, synthetic_root):
    """Monte Carlo on the real network: at ‖δ‖ just below the certified margin,
    P(‖g(z') − g(z)‖ ≤ r) must exceed p (docs/math.md §2) for random and gradient-chosen δ."""
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))  # the data the runs trained on
    vae, cfg, _ = load_model(runs[("lipschitz", "learned")])
    table = pd.read_csv(runs[("lipschitz", "learned")] / "certified_margins.csv")
    from lipvae.build import build_datamodule

    test = build_datamodule(cfg.data, cfg.seed).split("test")
    torch.manual_seed(0)
    r, p, n = 8.0, 0.5, 4000
    for i in range(5):
        x = test.images[i : i + 1].double()
        R = float(table.certified_tight[i])
        vae.double()
        delta = torch.randn_like(x, requires_grad=True)
        for _ in range(30):  # push the reconstruction away: a crude maximum-damage direction
            d = delta / delta.norm() * R * 0.999
            loss = (vae.decode(vae.encode(x + d).mean) - vae.decode(vae.encode(x).mean)).norm()
            (g,) = torch.autograd.grad(loss, delta)
            delta = (delta + 0.5 * g / g.norm()).detach().requires_grad_(True)
        d = (delta / delta.norm() * R * 0.999).detach()
        with torch.no_grad():
            q, q2 = vae.encode(x.expand(n, -1)), vae.encode((x + d).expand(n, -1))
            dist = (vae.decode(q2.sample()) - vae.decode(q.sample())).norm(dim=-1)
        assert (dist <= r).double().mean() > p


@pytest.mark.slow
def test_recertify_cli_reproduces_the_run_and_keeps_its_record(runs, capsys, tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))  # the data the runs trained on
    run = shutil.copytree(runs[("lipschitz", "learned")], tmp_path / "run")
    before = pd.read_csv(run / "certified_margins.csv")
    stored = json.loads((run / "results.json").read_text())
    assert certify_main(["model", str(run), "certify.forms=[paper,tight]"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["form"] == "paper" and summary["soundness_violations"] == 0
    out = Path(summary["written_to"])
    assert out.parent == run / "evaluations"
    after = pd.read_csv(out / "certified_margins.csv")
    assert np.allclose(after.certified_tight, before.certified_tight, rtol=1e-6)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["certified"]["form"] == "paper" and evaluation["reused_estimated_margins"]
    assert evaluation["estimated"]["mean"] == pytest.approx(stored["estimated"]["mean"])
    assert json.loads((run / "results.json").read_text()) == stored  # the run's record is untouched
    # --replace makes it the run's evaluation, everything together, and keeps the old files
    assert certify_main(["model", str(run), "certify.forms=[paper,tight]", "--replace"]) == 0
    capsys.readouterr()
    replaced = json.loads((run / "results.json").read_text())
    assert replaced["certified"]["form"] == "paper" and replaced["soundness_violations"] == 0
    kept = run / replaced["evaluation"]["replaced"]
    assert json.loads((kept / "results.json").read_text()) == stored
    assert pd.read_csv(kept / "certified_margins.csv").equals(before)
    assert certify_main(["model", str(run / "checkpoints" / "last.ckpt"), "margins.certified_inputs=7"]) == 0
    assert json.loads(capsys.readouterr().out)["num_inputs"] == 7
    assert certify_main(["model", str(run / "checkpoints" / "last.ckpt"), "--replace"]) == 2
    assert "is a checkpoint" in capsys.readouterr().err
    assert certify_main(["model", str(run), "margins.certified_inputs=0"]) == 2  # was ignored: certified every input
    assert capsys.readouterr().err.startswith("error: margins.certified_inputs: got 0; accepted: a positive integer or null")
    # the same overrides as lipvae.evaluate, but only the certificate's
    assert certify_main(["model", str(run), "attack.steps=3"]) == 2
    assert capsys.readouterr().err.startswith("error: attack.steps: cannot change in a re-evaluation; accepted: certify.*")
    standard = runs[("standard", "learned")]
    assert certify_main(["model", str(standard)]) == 2
    assert "has no certificates to recompute (model.kind=standard" in capsys.readouterr().err
    assert not (standard / "evaluations").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["target=inf"], "target: got inf; accepted: a positive finite number"),
        (["target=0"], "target: got 0; accepted: a positive finite number"),
        (["target=1", "L=[0]"], "L: got [0]; accepted: a list of positive finite numbers, e.g. [5,7]"),
        (["target=1", "gamma=[-0.1]"], "gamma: got [-0.1]; accepted: a list of positive finite numbers"),
        (["target=1", "L=-5"], "L: got [-5]"),  # a single value is a list of one
        (["target=1", "L=5,7"], "L=5,7: a sweep, which only training runs (with -m); a list is written L=[5,7]"),
        (["target=1", "Q=5"], "Q: no such field"),
        (["target=1", "p=abc"], "p: got 'abc'; accepted: a number in (0, 1)"),
        (["target=1", "p=1"], "p: got 1; accepted: a number in (0, 1)"),
        (["target=1", "m=1"], "m: got 1; accepted: an integer >= 2"),
    ],
)
def test_design_cli_refuses_what_has_no_answer(args, message, capsys):
    assert certify_main(["design", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err


def test_design_cli_rows_reach_the_target(capsys):
    assert certify_main(["design", "r=8", "p=0.5", "m=10", "target=0.5", "gamma=[0.1]", "L=[5,12]"]) == 0
    out = capsys.readouterr().out.splitlines()
    def override(line, key):
        return float(line.split(f"{key}=")[1].split()[0])

    L_for_gamma = override(out[2], "enc_L")
    assert float(global_margin(L_for_gamma / 4, L_for_gamma, gamma=0.1).margin) == pytest.approx(0.5, rel=1e-4)
    gamma_for_5 = override(out[3], "model.encoder_std.gamma")
    assert float(global_margin(5 / 4, 5, gamma=gamma_for_5).margin) == pytest.approx(0.5, rel=1e-4)
    assert "unreachable" in out[-1]  # L = 12: r/(ab) = 8/(3·12) < 0.5
    assert "enc_L=5 dec_L=5" in out[3]


def test_design_overrides_train_a_run_that_certifies_at_the_designed_setting(capsys):
    """The printed overrides, composed as training composes them, certify and attack at the design's
    r and p with its form first (the one results.json summarises), and the composed constants reach
    the target with that form; at the defaults the overrides name none of these."""
    from lipvae.compose import compose_config

    assert certify_main(["design", "target=1", "r=12", "p=0.9", "form=exact", "gamma=[0.1]", "L=[3]"]) == 0
    rows = [line.split("  ")[-1].split() for line in capsys.readouterr().out.splitlines() if line.startswith("largest")]
    assert len(rows) == 2
    for overrides in rows:
        cfg = compose_config(overrides)
        assert list(cfg.certify.r) == [12] and list(cfg.certify.p) == [0.9] and cfg.certify.forms[0] == "exact"
        assert (cfg.attack.r, cfg.attack.p) == (12, 0.9)
        got = global_margin(cfg.dec_L / 4, cfg.enc_L, gamma=cfg.model.encoder_std.gamma, m=cfg.model.latent_dim,
                            r=12, p=0.9, form="exact").margin
        assert float(got) >= 1 - 1e-6
    assert certify_main(["design", "target=1", "gamma=[0.1]", "L=[3]"]) == 0
    assert not any(k in capsys.readouterr().out for k in ("certify.", "attack."))


def test_certify_cli_errors_are_one_line(capsys, tmp_path):
    assert certify_main(["design", "target=1", "form=loose"]) == 2
    assert capsys.readouterr().err.strip() == "error: form: got 'loose'; accepted: paper, exact, tight"
    assert certify_main(["design", "target=1", "p=2"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: p: got 2; accepted: a number in (0, 1)")
    assert certify_main(["model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Exploit()}, f)
    with pytest.raises(UserError, match="cannot load"):
        load_state(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_every_run_ends_with_estimated_margins_and_soundness(runs):
    for (kind, mode), run in runs.items():
        r = json.loads((run / "results.json").read_text())
        est = r["estimated"]
        table = pd.read_csv(run / est["table"])
        assert est["num_inputs"] == len(table) == 5 and est["steps"] == 20
        assert est["mean"] == pytest.approx(table.estimated.mean())
        assert (table.estimated > 0).all() and (table.estimated <= 10.0).all()
        assert (run / "latent_attack.png").is_file()
        assert r["latent_attack"]["mean_kl"] >= 0
        if kind == "lipschitz":
            assert r["soundness_violations"] == 0
            cert = pd.read_csv(run / "certified_margins.csv").set_index("index")
            assert np.allclose(table.certified_tight, cert.loc[table["index"], "certified_tight"])
            assert (table.certified_tight <= table.estimated).all()
            assert (run / "certified_vs_estimated.png").is_file()
        else:
            assert r["soundness_violations"] is None and "certified_tight" not in table


def _certify_random(vae, n=2000, seed=0):
    from lipvae.certify.certificates import certify

    x = torch.rand(n, 784, generator=torch.Generator().manual_seed(seed))
    vae.freeze()
    constants = vae.lipschitz_constants()
    table, summary = certify(vae, x, np.arange(n), np.zeros(n), constants, [8.0], [0.5], ["tight"])
    return table, summary


def test_fixed_sigma_certificate_uses_the_float32_gamma():
    from lipvae.certify.certificates import computed_gamma
    from lipvae.vae import VAE

    torch.manual_seed(0)
    vae = VAE(kind="lipschitz", input_shape=(1, 28, 28), latent_dim=10, hidden=(32, 32), std_mode="fixed", gamma=0.1,
              encoder_mean_L=5.0, encoder_std_L=5.0, decoder_L=5.0)
    assert computed_gamma(vae) == float(np.float32(0.1)) > 0.1  # what the model runs with
    table, summary = _certify_random(vae)
    per_input = table["certified_tight"].to_numpy()
    glob = summary["global_margin"]
    a, b = summary["constants"]["a"], summary["constants"]["b"]
    assert glob == float(global_margin(a, b, gamma=float(np.float32(0.1)), m=10).margin)  # not γ = 0.1
    assert glob <= per_input.min() * (1 + 1e-12)  # Theorem 3 never claims more than Lemma 2 on an input


def test_bounded_sigma_global_margin_covers_the_float32_projection():
    from lipvae.certify.certificates import max_norm_bound
    from lipvae.vae import VAE

    torch.manual_seed(0)
    vae = VAE(kind="lipschitz", input_shape=(1, 28, 28), latent_dim=10, hidden=(32, 32), std_mode="bounded", max_norm=1.0,
              encoder_mean_L=5.0, encoder_std_L=5.0, decoder_L=5.0)
    table, summary = _certify_random(vae)
    s = table["s"].to_numpy()
    assert (s > 1.0).any(), "the projection should overshoot max_norm in float32 on some inputs"
    assert s.max() <= max_norm_bound(vae)
    assert summary["global_margin"] <= table["certified_tight"].min() * (1 + 1e-12)
    c = summary["constants"]
    nominal = global_margin(c["a"], c["b"], m=10, c=c["c"], max_norm=1.0).margin
    assert nominal > table["certified_tight"].min() * (1 + 1e-12)  # max_norm itself would overclaim


# ----------------------------------------------------------------- the coupled form (docs/math.md §3)


def test_dkw_width_bounds_the_tail_for_every_threshold_at_once():
    """Over many draws, sup_τ (P(D > τ) − P̂(D > τ)) exceeds the width in at most about alpha of
    them (Massart's one-sided bound), and a width half as large is exceeded far more often."""
    from lipvae.certify.coupled import dkw_width

    rng = np.random.default_rng(0)
    n, alpha, reps = 200, 0.1, 600
    d = np.sort(rng.exponential(size=(reps, n)), axis=1)  # P(D > τ) = exp(−τ)
    sup = np.max(np.exp(-d) - (n - 1 - np.arange(n)) / n, axis=1)
    eps = dkw_width(n, alpha)
    assert np.mean(sup > eps) <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / reps)
    assert np.mean(sup > eps / 2) > 3 * alpha


def test_noise_quantile_is_the_sup_norm_quantile():
    from lipvae.certify.coupled import noise_quantile

    xi = np.random.default_rng(1).standard_normal((200_000, 10))
    for beta in (0.05, 0.25, 0.45):
        k = noise_quantile(beta, 10)
        assert np.mean(np.abs(xi).max(axis=1) > k) == pytest.approx(beta, abs=4 * np.sqrt(beta * (1 - beta) / 2e5))


def _coupled_bound(t, tau, damages, a, b, c, m, r, eps):
    """The right-hand side of the coupled bound (docs/math.md §3), straight from its definition."""
    from scipy.special import erf

    tail = np.mean(damages > tau) + eps
    reach = (r - tau) / a - b * t
    if reach <= 0:
        return 1.0 + tail
    noise = 0.0 if c == 0 else 1.0 - erf(reach / (c * t) / np.sqrt(2)) ** m if t > 0 else 0.0
    return noise + tail


@pytest.mark.parametrize("c", every_kth_fast([1.25, 0.0], 2))
def test_coupled_margin_is_the_largest_radius_the_bound_certifies(c):
    """Brute force: for every threshold on a fine grid, bisect the largest t whose bound stays
    below 1 − p; the closed form must equal the best of them (never above)."""
    from lipvae.certify.coupled import coupled_margin, dkw_width

    rng = np.random.default_rng(2)
    a, b, m, r, p, alpha, n = 1.25, 5.0, 10, 8.0, 0.5, 1e-3, 400
    damages = np.sort(rng.gamma(4.0, 0.5, size=(3, n)), axis=1)
    damages[2] += 3.0  # a noisier input
    got, tau = coupled_margin(damages, a, b, c, m, r, p, alpha)
    eps = dkw_width(n, alpha)
    for i, row in enumerate(damages):
        best = 0.0
        for t_ in np.concatenate([row, (row[:-1] + row[1:]) / 2]):
            lo, hi = 0.0, r / (a * b)
            if _coupled_bound(1e-12, t_, row, a, b, c, m, r, eps) >= 1 - p:
                continue
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _coupled_bound(mid, t_, row, a, b, c, m, r, eps) < 1 - p else (lo, mid)
            best = max(best, lo)
        assert got[i] == pytest.approx(best, rel=1e-9) and got[i] <= best * (1 + 1e-12)
        assert _coupled_bound(got[i] * (1 - 1e-9), tau[i], row, a, b, c, m, r, eps) < 1 - p  # every t below it
    assert got[2] < got[0]  # more self-damage, smaller margin


def _random_lipschitz_vae(std_mode="learned", seed=0):
    from lipvae.vae import VAE

    torch.manual_seed(seed)
    vae = VAE(input_dim=12, latent_dim=3, hidden=(16, 16), encoder_mean_L=2.0, encoder_std_L=2.0, decoder_L=4.0,
              std_mode=std_mode, gamma=0.2)
    return vae.freeze().eval().double()


@pytest.mark.parametrize("std_mode", ["learned", "fixed"])
def test_coupled_certificate_holds_against_the_worst_delta_found(std_mode):
    """Monte Carlo on random small networks: at the coupled certified radius, the perturbation
    that an attack finds most damaging (mean and sampled damage, 3 starts each) still leaves
    P(‖g(z′) − g(z)‖ ≤ r) above p, on 10,000 pairs, up to 4 standard errors."""
    from lipvae.certify.certificates import certify

    vae = _random_lipschitz_vae(std_mode)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 12, generator=gen, dtype=torch.float64)
    r, p = 0.6, 0.5
    table, summary = certify(vae, x, np.arange(4), np.zeros(4, dtype=int), vae.lipschitz_constants(), [r], [p],
                             ["tight", "coupled"], coupled={"samples": 4000})
    radius = torch.tensor(table.certified_coupled.to_numpy())
    assert (radius > 0).all() and summary["by_r_p_form"]["r0.6_p0.5"]["coupled"]["global_margin"] is None
    _holds_against_the_worst_delta(vae, x, radius, r, p, gen)


def _holds_against_the_worst_delta(vae, x, radius, r, p, gen, n=10_000):
    """The most damaging δ within ``radius`` that an attack finds (mean and sampled damage, 3
    starts each) leaves P(‖g(z′) − g(z)‖ ≤ r) above p on n pairs, up to 4 standard errors; and
    the same check fails where it should: 40 times farther out, the attack breaks every input."""
    from lipvae.attack.base import robust_probability
    from lipvae.attack.pgd import max_damage_attack

    for samples in (0, 16):
        delta, _ = max_damage_attack(vae, x, radius, starts=3, steps=40, pixel_range=False, samples=samples,
                                     generator=gen)
        assert (delta.norm(dim=-1) <= radius[:, None] * (1 + 1e-9)).all()
        prob = robust_probability(vae, x, delta, r, n, gen)
        assert (prob > p - 4 * np.sqrt(p * (1 - p) / n)).all(), prob
    # far out, with enough starts and steps that the outcome does not hang on rounding (3 starts of
    # 40 steps left an input unbroken with ATen's default or AVX2 kernels, on Intel and AMD alike)
    delta, _ = max_damage_attack(vae, x, radius * 40, starts=8, steps=100, pixel_range=False, generator=gen)
    assert (robust_probability(vae, x, delta, r, n, gen).min(dim=1).values < p).all()


@pytest.mark.parametrize("std_mode", every_kth_fast(["learned", "bounded"], 2))
def test_cantelli_certificate_holds_against_the_worst_delta_found(std_mode):
    """As for the coupled form: at the Cantelli certified radius, which here exceeds the tight
    form's on every input, the most damaging δ an attack finds leaves P(‖g(z′) − g(z)‖ ≤ r) above
    p on 10,000 pairs; and far enough out the attack breaks every input."""
    from lipvae.certify.certificates import certify
    from lipvae.vae import VAE

    torch.manual_seed(0)  # the paper's latent size, where the σ terms weigh most
    vae = VAE(input_dim=40, latent_dim=10, hidden=(16, 16), encoder_mean_L=3.0, encoder_std_L=3.0, decoder_L=3.0,
              std_mode=std_mode, max_norm=1.2).freeze().eval().double()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(4, 40, generator=gen, dtype=torch.float64)
    r, p = 3.5, 0.5
    table, summary = certify(vae, x, np.arange(4), np.zeros(4, dtype=int), vae.lipschitz_constants(), [r], [p],
                             ["tight", "cantelli"])
    radius = torch.tensor(table.certified_cantelli.to_numpy())
    assert (table.certified_cantelli > table.certified_tight * 1.05).all() and (table.R_C_cantelli == radius.numpy()).all()
    glob = summary["by_r_p_form"]["r3.5_p0.5"]["cantelli"]["global_margin"]
    assert (glob is None) == (std_mode == "learned") and (glob is None or glob <= radius.min().item())
    _holds_against_the_worst_delta(vae, x, radius, r, p, gen)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["learned", "fixed"])
def test_coupled_and_cantelli_forms_in_a_recertified_run(runs, capsys, tmp_path, monkeypatch, synthetic_root, mode):
    """Opt-in through certify.forms: their columns, the coupled settings in the summary, no Theorem
    3 margin for the coupled form (the Cantelli one's with fixed σ: the tight one's, whose χ² term
    is the exact law there), the run's soundness check against the stored estimated margins, and
    the cap r/(ab) that no certificate using Lip(μ) = b and Lip(g) = a can pass."""
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))
    run = shutil.copytree(runs[("lipschitz", mode)], tmp_path / "run")
    assert certify_main(["model", str(run), "certify.forms=[coupled,tight,cantelli]", "margins.certified_inputs=40"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["form"] == "coupled" and summary["soundness_violations"] == 0
    assert summary["global_margin"] is None
    assert summary["coupled"]["samples"] == 2000 and summary["coupled"]["dkw_width"] == pytest.approx(0.04156, abs=1e-5)
    table = pd.read_csv(Path(summary["written_to"]) / "certified_margins.csv")
    a, b = summary["constants"]["a"], summary["constants"]["b"]
    assert len(table) == 40 and (table.certified_coupled > 0).all()
    assert (table.certified_coupled < 8.0 / (a * b)).all() and (table.tau_coupled > 0).all()
    assert (table.certified_cantelli >= table.certified_tight).all() and "R_C_cantelli" in table and "s_4" in table
    by = json.loads((Path(summary["written_to"]) / "evaluation.json").read_text())["certified"]["by_r_p_form"]["r8_p0.5"]
    assert by["cantelli"]["global_margin"] == by["tight"]["global_margin"]  # None, or equal (fixed σ)
    assert (by["tight"]["global_margin"] is None) == (mode == "learned")
    margins = pd.read_csv(Path(summary["written_to"]) / "margins.csv")
    assert (margins.certified_coupled <= margins.estimated).all()
    assert (margins.certified_cantelli <= margins.estimated).all()


@pytest.mark.slow
def test_the_documented_certify_and_evaluate_lines_compose(capsys):
    """Every `python -m lipvae.certify|evaluate` line of README and docs/ reads in Hydra's syntax:
    design's run as written; the run commands' overrides compose (their run folder is a placeholder)."""
    from lipvae.compose import compose_config, parse_overrides

    docs = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
    lines = [m.group(1).split("#")[0].split("`")[0].split() for d in docs
             for m in re.finditer(r"python -m (lipvae\.(?:certify|evaluate) [^\n]*)", d.read_text())]
    checked = 0
    for words in lines:
        args = [w for w in words[1:] if "=" in w and not w.startswith(("[", "…")) and "…" not in w]
        if words[0] == "lipvae.certify" and words[1] == "design" and any(w.startswith("target=") for w in words):
            assert certify_main(["design", *args]) == 0, words
            checked += 1
        elif (words[0] == "lipvae.evaluate" or words[1] == "model") and "--config-dir" not in words:  # that one:
            # test_extending's test_a_finished_run_is_reevaluated_with_a_new_attack_from_a_config_folder
            compose_config([text for text, _ in parse_overrides(args, sweeps="refuse")])
            checked += len(args)
    capsys.readouterr()
    assert checked >= 8


def test_the_design_answers_hold_for_measured_constants_slightly_above_nominal(capsys):
    """'L = 5, γ = 0.937341 → margin ≥ 1' certified 0.99999995 on a trained model whose measured
    constants sat ~1e-7 above nominal: every answer must hold up to the reporting tolerance."""
    from lipvae.certify.bounds import global_margin
    from lipvae.certify.certificates import LIPSCHITZ_TOLERANCE

    assert certify_main(["design", "target=1", "gamma=0.2", "L=5"]) == 0  # single values are lists of one
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("largest")]
    assert len(rows) == 2
    for row in rows:  # the values as the overrides print them
        values = dict(w.split("=", 1) for w in row if "=" in w)
        enc, gamma = float(values["enc_L"]), float(values["model.encoder_std.gamma"])
        worst = 1 + LIPSCHITZ_TOLERANCE  # the measured constants a run still reports as kept
        assert global_margin(0.25 * enc * worst, enc * worst, gamma=gamma, m=10, r=8, p=0.5, form="tight").margin >= 1
