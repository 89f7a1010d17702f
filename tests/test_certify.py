import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_cli
from lipvae.certify.__main__ import main as certify_main
from lipvae.certify.bounds import global_margin, margin
from lipvae.stored import load_model, load_state
from lipvae.errors import UserError



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained Lipschitz VAEs (learned and fixed σ) and a standard one, one multirun."""
    root = tmp_path_factory.mktemp("sweep")
    proc = run_cli(
        "experiment=smoke",
        "data.resplit=true",
        "logger.wandb.enabled=false",
        "trainer.enable_progress_bar=false",
        "model=lipschitz,standard",
        "model.encoder_std.mode=learned,fixed",
        f"hydra.sweep.dir={root}",
        "-m",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for results in root.glob("*/results.json"):
        r = json.loads(results.read_text())
        out[(r["model"]["kind"], r["model"]["encoder_std"]["mode"])] = results.parent
    assert len(out) == 4
    return out


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
    expected = margin(8.0, a, b, c, table.s, table.s_inf, 10, 0.5, "learned", "tight").margin
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
    from lipvae.config import build_datamodule

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
    assert certify_main(["model", str(run), "forms=paper,tight"]) == 0
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
    assert certify_main(["model", str(run), "forms=paper,tight", "--replace"]) == 0
    capsys.readouterr()
    replaced = json.loads((run / "results.json").read_text())
    assert replaced["certified"]["form"] == "paper" and replaced["soundness_violations"] == 0
    kept = run / replaced["evaluation"]["replaced"]
    assert json.loads((kept / "results.json").read_text()) == stored
    assert pd.read_csv(kept / "certified_margins.csv").equals(before)
    assert certify_main(["model", str(run / "checkpoints" / "last.ckpt"), "num_inputs=7"]) == 0
    assert json.loads(capsys.readouterr().out)["num_inputs"] == 7
    assert certify_main(["model", str(run / "checkpoints" / "last.ckpt"), "--replace"]) == 2
    assert "is a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["target=inf"], "target: got inf; accepted: a positive finite number"),
        (["target=0"], "target: got 0; accepted: a positive finite number"),
        (["target=1", "L=0"], "L: got 0; accepted: a positive finite number"),
        (["target=1", "gamma=-0.1"], "gamma: got -0.1; accepted: a positive finite number"),
        (["target=1", "p=1"], "p: got 1; accepted: a number in (0, 1)"),
        (["target=1", "m=1"], "m: got 1; accepted: an integer >= 2"),
    ],
)
def test_design_cli_refuses_what_has_no_answer(args, message, capsys):
    assert certify_main(["design", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err


def test_design_cli_rows_reach_the_target(capsys):
    assert certify_main(["design", "r=8", "p=0.5", "m=10", "target=0.5", "gamma=0.1", "L=5,12"]) == 0
    out = capsys.readouterr().out.splitlines()
    def override(line, key):
        return float(line.split(f"{key}=")[1].split()[0])

    L_for_gamma = override(out[2], "enc_L")
    assert float(global_margin(L_for_gamma / 4, L_for_gamma, gamma=0.1).margin) == pytest.approx(0.5, rel=1e-4)
    gamma_for_5 = override(out[3], "model.encoder_std.gamma")
    assert float(global_margin(5 / 4, 5, gamma=gamma_for_5).margin) == pytest.approx(0.5, rel=1e-4)
    assert "unreachable" in out[-1]  # L = 12: r/(ab) = 8/(3·12) < 0.5
    assert "enc_L=5 dec_L=5" in out[3]


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
    vae = VAE(kind="lipschitz", latent_dim=10, hidden=(32, 32), std_mode="fixed", gamma=0.1,
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
    vae = VAE(kind="lipschitz", latent_dim=10, hidden=(32, 32), std_mode="bounded", max_norm=1.0,
              encoder_mean_L=5.0, encoder_std_L=5.0, decoder_L=5.0)
    table, summary = _certify_random(vae)
    s = table["s"].to_numpy()
    assert (s > 1.0).any(), "the projection should overshoot max_norm in float32 on some inputs"
    assert s.max() <= max_norm_bound(vae)
    assert summary["global_margin"] <= table["certified_tight"].min() * (1 + 1e-12)
    c = summary["constants"]
    nominal = global_margin(c["a"], c["b"], m=10, c=c["c"], max_norm=1.0).margin
    assert nominal > table["certified_tight"].min() * (1 + 1e-12)  # max_norm itself would overclaim
