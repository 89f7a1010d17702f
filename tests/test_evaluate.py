"""``python -m lipvae.evaluate``: the evaluation pipeline run again on a finished run."""

import json
import shutil

import pandas as pd
import pytest
import torch

from conftest import run_cli
from lipvae.evaluate import main as evaluate_main
from lipvae.evaluate import soundness_violations


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli("experiment=smoke", "data.resplit=true", "logger.wandb.enabled=false",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture
def run(trained, tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("LIPVAE_DATA_DIR", str(synthetic_root))  # the data the run trained on
    return shutil.copytree(trained, tmp_path / "run")


def _consistent(folder, record):
    """The margins table, the certified table and the recorded summary agree with each other."""
    margins = pd.read_csv(folder / "margins.csv")
    certified = pd.read_csv(folder / "certified_margins.csv").set_index("index")
    assert record["estimated"]["mean"] == pytest.approx(margins["estimated"].mean())
    assert record["certified"]["mean"] == pytest.approx(certified["certified_tight"].mean())
    assert (margins["certified_tight"].to_numpy() == certified.loc[margins["index"], "certified_tight"].to_numpy()).all()
    assert record["soundness_violations"] == len(soundness_violations(margins, ["certified_tight"]))


@pytest.mark.slow
def test_replace_updates_margins_figures_and_soundness_together(run, capsys):
    stored = json.loads((run / "results.json").read_text())
    scatter = (run / "certified_vs_estimated.png").stat().st_mtime_ns
    assert evaluate_main([str(run), "attack.steps=40", "attack.starts=3", "--replace"]) == 0
    assert capsys.readouterr().out.startswith(f"evaluation written to {run};")
    r = json.loads((run / "results.json").read_text())
    assert (r["estimated"]["steps"], r["estimated"]["starts"]) == (40, 3)
    assert (r["config"]["attack"]["steps"], r["config"]["attack"]["starts"]) == (40, 3)
    assert r["metrics"] == stored["metrics"] and r["status"] == "completed"
    assert not r["evaluation"]["reused_estimated_margins"]
    _consistent(run, r)
    assert (run / "certified_vs_estimated.png").stat().st_mtime_ns > scatter
    kept = run / r["evaluation"]["replaced"]
    assert json.loads((kept / "results.json").read_text()) == stored  # nothing is lost
    made = json.loads((run / r["evaluation"]["made_in"] / "evaluation.json").read_text())
    assert made["estimated"] == r["estimated"] and made["soundness_violations"] == r["soundness_violations"]


@pytest.mark.slow
def test_a_stop_during_replace_leaves_the_run_as_it_was(run, capsys, monkeypatch):
    from lipvae.attack import PGDAttack

    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lipvae.lock"}

    def stop(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(PGDAttack, "estimate", stop)  # after the new certificates are written
    assert evaluate_main([str(run), "attack.steps=40", "certify.forms=[paper]", "--replace"]) == 130
    assert "interrupted; the run's own files are as they were" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lipvae.lock"}
    assert after == before


@pytest.mark.slow
def test_a_run_recorded_before_newer_fields_is_reevaluated_as_it_ran(run, capsys):
    """A run made by an older lipvae lacks fields added since (here trainer.strategy, the coupled
    form's settings and attack.warm_steps): re-evaluation fills them in (warm_steps with the old
    behaviour, 0), instead of refusing the run, and still reuses its unchanged attack."""
    from omegaconf import OmegaConf

    recorded = OmegaConf.load(run / ".hydra" / "config.yaml")
    for node, key in ((recorded.trainer, "strategy"), (recorded.certify, "coupled"), (recorded.attack, "warm_steps")):
        del node[key]
    OmegaConf.save(recorded, run / ".hydra" / "config.yaml")
    stored = json.loads((run / "results.json").read_text())
    stored["config"] = OmegaConf.to_container(recorded)
    (run / "results.json").write_text(json.dumps(stored))
    assert evaluate_main([str(run), "certify.p=[0.5,0.9]"]) == 0
    out = sorted((run / "evaluations").iterdir())[-1]
    made = json.loads((out / "evaluation.json").read_text())
    assert made["reused_estimated_margins"] and made["config"]["attack"]["warm_steps"] == 0
    assert made["config"]["certify"]["coupled"]["samples"] > 0  # today's defaults for the missing group fields


@pytest.mark.slow
def test_default_writes_beside_the_run_and_reuses_an_unchanged_attack(run, capsys):
    stored = json.loads((run / "results.json").read_text())
    margins = (run / "margins.csv").read_bytes()
    assert evaluate_main([str(run), "certify.p=[0.5,0.9]"]) == 0
    first = sorted((run / "evaluations").iterdir())
    assert len(first) == 1
    e = json.loads((first[0] / "evaluation.json").read_text())
    assert e["reused_estimated_margins"] and e["estimated"]["mean"] == pytest.approx(stored["estimated"]["mean"])
    assert e["latent_attack"] == stored["latent_attack"] and (first[0] / "latent_attack.png").is_file()
    _consistent(first[0], e)
    assert "certified_tight_r8_p0.9" in pd.read_csv(first[0] / "certified_margins.csv").columns
    assert json.loads((run / "results.json").read_text()) == stored and (run / "margins.csv").read_bytes() == margins
    # a changed attack (or --fresh) attacks again, into another folder
    assert evaluate_main([str(run), "seed=3"]) == 0
    assert evaluate_main([str(run), "--fresh"]) == 0
    folders = sorted((run / "evaluations").iterdir())
    assert len(folders) == 3
    for folder in folders[1:]:
        assert not json.loads((folder / "evaluation.json").read_text())["reused_estimated_margins"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["model.latent_dim=3"], "error: model.latent_dim: cannot change in a re-evaluation; accepted: certify.*, attack.*"),
        (["attack.stepz=3"], "error: attack.stepz: no such field; did you mean attack.steps?"),
        (["attack.steps=0"], "error: attack.steps: got 0; accepted: a positive integer"),
        (["certify.num_inputs=2"], "error: certify.num_inputs: got 2; accepted: null, or at least attack.num_inputs=5"),
        (["--replce"], "error: unknown flag --replce; accepted: --replace, --fresh"),
    ],
)
def test_bad_overrides_are_one_line_and_write_nothing(run, capsys, args, message):
    before = sorted(p.name for p in run.iterdir())
    assert evaluate_main([str(run), *args]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert sorted(p.name for p in run.iterdir()) == before


def test_missing_run_is_one_line(tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: run:")


def test_latent_attack_summary_says_how_far_toward_the_target(tmp_path):
    """No budget moves nothing; a budget large enough to replace the input reaches the target
    (share ≈ 1, every reconstruction nearer the target's than its own)."""
    from omegaconf import OmegaConf

    from lipvae.data import TensorBatches
    from lipvae.evaluate import _latent_attack
    from lipvae.vae import VAE

    torch.manual_seed(0)
    vae = VAE(latent_dim=2, hidden=(16, 16), std_mode="fixed", gamma=0.1).freeze().eval()
    gen = torch.Generator().manual_seed(0)
    test = TensorBatches(torch.rand(6, 784, generator=gen), torch.tensor([0, 1, 0, 1, 0, 1]), torch.arange(6))
    ac = OmegaConf.create({"pixel_range": True, "latent": {"kind": "hard", "budget": 0.0, "num_inputs": 6,
                                                           "steps": 200, "penalty": None, "lr": None}})
    still, _ = _latent_attack(vae, test, ac, "cpu", gen, tmp_path)
    assert still["median_share_moved"] == 0.0 and still["closer_to_target"] == 0.0
    ac.latent.budget = 28.0  # the pixel box's diameter: x + δ may become the target itself
    far, _ = _latent_attack(vae, test, ac, "cpu", gen, tmp_path)
    assert far["median_share_moved"] == pytest.approx(1.0, abs=0.05) and far["closer_to_target"] == 1.0
